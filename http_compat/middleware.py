"""The one ASGI middleware in front of every route: request id, ``Host`` and ``Origin`` rules, API
key, body size and time limits, JSON body bounds, last-resort 500.

Runs before routing, so it also covers unknown paths, ``/docs`` and ``/openapi.json``. Everything
it refuses is refused from the headers, or from a JSON body read within its byte limit, before
any route (or the multipart parser) runs.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
import uuid
from dataclasses import dataclass

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.limits import ValueRefused, parse_json
from http_compat.errors import BodyTimeout, BodyTooLarge, error_response
from http_compat.origin import UNSAFE_METHODS, host_allowed, origin_allowed

__all__ = ["BODY_READ_TIMEOUT_S", "REQUEST_ID_HEADER", "GateLimits", "RequestGate"]

log = structlog.get_logger("http_compat")

REQUEST_ID_HEADER = "X-Request-Id"
# A client id is echoed only when it is short, visible ASCII (a GUID, a trace id); anything else
# is replaced so a header value can never smuggle a line break or a huge string into logs.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:{}\-]{1,128}")
_CLOSE = {"Connection": "close"}
# Default longest wait for the next chunk of a request body. uvicorn has no body timeout of its
# own: an upload that stalls would otherwise hold its connection (and delay shutdown) forever.
BODY_READ_TIMEOUT_S = 60.0
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


@dataclass(frozen=True)
class GateLimits:
    """The gate's rules: allowed hosts and origins (``http_compat.origin``), body time limits and
    the bounds of a JSON body."""

    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    body_gap_s: float = BODY_READ_TIMEOUT_S
    body_timeout_s: float = 300.0
    max_json_bytes: int = 4 * 1024 * 1024
    max_json_depth: int = 32
    max_json_items: int = 250_000


class _ReplyState:
    """The status of the reply, once its start was sent (0 before)."""

    status: int = 0

    @property
    def started(self) -> bool:
        return self.status != 0


class RequestGate:
    """Tags each request with an id, checks ``Host``, ``Origin``, ``X-API-Key``, the body size and
    time, and JSON bodies, and turns any unexpected exception into a 500 ``internal_error`` body
    (never a traceback)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_request_bytes: int,
                 limits: GateLimits | None = None) -> None:
        self.app = app
        self._key = None if api_key is None else api_key.encode("utf-8")
        self._max = max_request_bytes
        self._limits = limits or GateLimits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        client_id = headers.get(REQUEST_ID_HEADER, "")
        rid = client_id if _CLIENT_ID.fullmatch(client_id) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        # each request runs in its own task (its own context copy), and the routes' worker threads
        # inherit it: every log line of this request, the engine's included, carries these fields
        structlog.contextvars.bind_contextvars(request_id=rid, op=scope.get("path", "").strip("/"))
        reply = _ReplyState()
        t0 = time.perf_counter()

        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                reply.status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            await self._serve(scope, receive, send_tagged, headers, rid, reply)
        finally:
            log.info("http_request", method=scope.get("method"), status=reply.status,
                     ms=round((time.perf_counter() - t0) * 1e3, 3))

    async def _serve(self, scope: Scope, receive: Receive, send: Send, headers: Headers, rid: str,
                     reply: _ReplyState) -> None:
        refusal = self._cross_site(scope, headers) or self._refuse(headers)
        if refusal is not None:
            status, code, message = refusal
            # The body was never read: close the connection rather than leave the client's upload
            # (possibly gigabytes) hanging on a keep-alive connection.
            await error_response(status, code, message, rid, headers=_CLOSE)(scope, receive, send)
            return
        try:
            receive = self._counted(receive)
            if _has_json_body(scope, headers):
                receive, refusal = await self._json_body(receive)
                if refusal is not None:
                    await error_response(*refusal, rid)(scope, receive, send)
                    return
            await self.app(scope, receive, send)
        except (BodyTooLarge, BodyTimeout) as exc:
            if reply.started:
                raise
            code = "payload_too_large" if exc.status_code == 413 else "request_timeout"
            await error_response(exc.status_code, code, str(exc.detail), rid, headers=exc.headers)(
                scope, receive, send)
        except Exception:
            if reply.started:
                raise
            log.exception("http_unhandled_error", method=scope.get("method"))
            await error_response(500, "internal_error", "internal server error", rid)(scope, receive, send)

    def _counted(self, receive: Receive) -> Receive:
        """``receive`` with the body size limit and the body time limits enforced: no chunk may take
        longer than ``body_gap_s``, the whole body no longer than ``body_timeout_s``."""
        received = 0
        body_done = False
        deadline = time.monotonic() + self._limits.body_timeout_s
        gap = self._limits.body_gap_s

        async def receive_counted() -> Message:
            nonlocal received, body_done
            if body_done:   # after the body, receive() waits for a disconnect: no timeout there
                return await receive()
            wait = min(gap, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.001))
            except asyncio.TimeoutError:
                raise BodyTimeout(gap if wait >= gap else self._limits.body_timeout_s) from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self._max:   # a chunked body has no Content-Length to check up front
                    raise BodyTooLarge(self._max)
            return message

        return receive_counted

    async def _json_body(self, receive: Receive) -> tuple[Receive, tuple[int, str, str] | None]:
        """Read a JSON body within ``max_json_bytes`` and check its bounds before FastAPI parses it
        (a 4 MB body of a million wrong-typed items would otherwise become a million validation
        errors). Syntax errors are left to FastAPI (422, as before); the rest is refused here."""
        limits, chunks, size = self._limits, [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive, None                       # the client left: nothing to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limits.max_json_bytes:
                raise BodyTooLarge(limits.max_json_bytes)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            if body.strip():
                parse_json(body, max_depth=limits.max_json_depth, max_items=limits.max_json_items)
        except ValueRefused as exc:
            if exc.too_large:
                return receive, (413, "payload_too_large", f"JSON body: {exc}")
            if not exc.syntax:
                return receive, (400, "invalid_input", f"JSON body: {exc}")
        return _replay(body, receive), None

    def _cross_site(self, scope: Scope, headers: Headers) -> tuple[int, str, str] | None:
        """(status, code, message) for a foreign ``Host``, or a page's state-changing request."""
        limits = self._limits
        if not host_allowed(headers.get("host"), limits.allowed_hosts):
            return 400, "invalid_host", (f"Host {headers.get('host', '')[:100]!r} is not a name of this server "
                                         "(loopback names, or http_allowed_hosts)")
        if scope.get("method") not in UNSAFE_METHODS:
            return None
        origin, fetch_site = headers.get("origin"), headers.get("sec-fetch-site")
        own_port = (scope.get("server") or (None, None))[1] or 0
        if origin is not None and not origin_allowed(origin, own_port=own_port, allowed_hosts=limits.allowed_hosts,
                                                     allowed_origins=limits.allowed_origins):
            return 403, "cross_site_request", f"requests from web pages of {origin[:100]!r} are refused"
        if origin is None and fetch_site == "cross-site":
            return 403, "cross_site_request", "cross-site requests from web pages are refused"
        return None

    def _refuse(self, headers: Headers) -> tuple[int, str, str] | None:
        """(status, code, message) when the request must be answered without reading its body."""
        if self._key is not None:
            given = headers.get("x-api-key")   # Headers decode as latin-1: re-encode gives the raw bytes
            if given is None:
                return 401, "unauthorized", "missing X-API-Key header"
            if not hmac.compare_digest(given.encode("latin-1"), self._key):
                return 401, "unauthorized", "invalid API key"
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max:
            return 413, "payload_too_large", (
                f"request body of {int(length)} bytes exceeds the {self._max} byte limit"
            )
        return None


def _has_json_body(scope: Scope, headers: Headers) -> bool:
    """A request FastAPI would parse as JSON: a body-carrying method that is not a form."""
    if scope.get("method") not in UNSAFE_METHODS:
        return False
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    return not media.startswith(_FORM_TYPES) and headers.get("content-length") != "0"


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then waits on the real one (for the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
