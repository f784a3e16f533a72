"""Cross-site protection of the REST door: which ``Host`` names it answers to, and which web pages
may send it state-changing requests.

Why: the door listens on loopback, without an API key by default, and a web page open on the same
PC can reach it. A browser sends a form POST to ``http://127.0.0.1:8000`` from any page without a
CORS preflight (the page cannot read the reply, but the write happens: a forged ``/fit_ok``
retrains a model and drops its calibration). And a page of an attacker's domain whose DNS name is
made to resolve to 127.0.0.1 (DNS rebinding) is, to the browser, same-origin with the door.

The rules:

* ``Host`` must be a loopback name (``localhost``, ``*.localhost``, ``127.x.x.x``, ``::1``), the
  address the door is bound to, or one of ``http_allowed_hosts`` (``*`` allows any): a rebound
  attacker's domain arrives as its own name and is refused (400 ``invalid_host``).
* A state-changing request (POST, PUT, PATCH, DELETE) that a browser marks as coming from a page
  (``Origin``, or ``Sec-Fetch-Site: cross-site``) must come from the door's own origin (its
  ``/docs`` page) or one of ``http_allowed_origins``; else 403 ``cross_site_request``.

The existing .NET GUI, curl, httpx and the ZeroMQ clients send no ``Origin`` and a loopback
``Host``: they are not affected. Safe methods (GET, HEAD, OPTIONS) are not checked for origin:
they change nothing, and without CORS headers a foreign page cannot read their replies.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["UNSAFE_METHODS", "host_allowed", "host_name", "origin_allowed"]

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def host_name(host: str) -> str:
    """The name of a ``Host`` header value, lower case, without port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    if host.count(":") > 1:                  # a bare IPv6 address (as urlsplit gives it)
        return host
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host.rstrip(".")


def _is_loopback(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(host: str | None, allowed: Iterable[str]) -> bool:
    """True for a loopback name or one of ``allowed`` (``*`` allows every name). A request without
    ``Host`` (HTTP/1.0) is allowed: browsers always send one."""
    if host is None:
        return True
    names = {host_name(name) for name in allowed}
    return "*" in names or _is_loopback(host_name(host)) or host_name(host) in names


def origin_allowed(origin: str, *, own_port: int, allowed_hosts: Iterable[str], allowed_origins: Iterable[str]) -> bool:
    """True when a page of ``origin`` may send state-changing requests: one of ``allowed_origins``
    (``*`` allows all), or an http(s) origin on an allowed host and this door's own port."""
    origin = origin.strip().lower().rstrip("/")
    listed = {o.strip().lower().rstrip("/") for o in allowed_origins}
    if "*" in listed or origin in listed:
        return True
    if origin == "null":                     # sandboxed frames, file:// pages
        return False
    parts = urlsplit(origin)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and parts.hostname is not None and port == own_port
            and host_allowed(parts.hostname, allowed_hosts))
