"""Errors the ZeroMQ client raises; callers never import zmq to catch one.

* IpcError
  - RemoteError: the server replied ``ok: false`` (``status``, ``code``, ``message``)
  - EngineUnavailable: no reply within the timeout, after the allowed retries
"""

from __future__ import annotations

__all__ = ["EngineUnavailable", "IpcError", "RemoteError"]


class IpcError(Exception):
    """Base of the client-side errors of the ZeroMQ door."""


class RemoteError(IpcError):
    """The engine answered with an error: ``status`` is HTTP-like, ``code`` is the stable wire code."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


class EngineUnavailable(IpcError):
    """No reply came in time; the socket was reset (and idempotent ops were retried)."""
