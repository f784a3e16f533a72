"""The one ASGI middleware in front of every route: request id, API key, body size, last-resort 500.

Runs before routing, so it also covers unknown paths, ``/docs`` and ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
import uuid

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from http_compat.errors import BodyTimeout, BodyTooLarge, error_response

__all__ = ["REQUEST_ID_HEADER", "RequestGate"]

log = structlog.get_logger("http_compat")

REQUEST_ID_HEADER = "X-Request-Id"
# A client id is echoed only when it is short, visible ASCII (a GUID, a trace id); anything else
# is replaced so a header value can never smuggle a line break or a huge string into logs.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:{}\-]{1,128}")
_CLOSE = {"Connection": "close"}
# Longest wait for the next chunk of a request body. uvicorn has no body timeout of its own: an
# upload that stalls would otherwise hold its connection (and delay shutdown) forever.
BODY_READ_TIMEOUT_S = 60.0


class _ReplyState:
    """The status of the reply, once its start was sent (0 before)."""

    status: int = 0

    @property
    def started(self) -> bool:
        return self.status != 0


class RequestGate:
    """Tags each request with an id, checks ``X-API-Key`` and the body size, and turns any
    unexpected exception into a 500 ``internal_error`` body (never a traceback)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_request_bytes: int) -> None:
        self.app = app
        self._key = None if api_key is None else api_key.encode("utf-8")
        self._max = max_request_bytes
        self._body_timeout = BODY_READ_TIMEOUT_S

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
        refusal = self._refuse(headers)
        if refusal is not None:
            status, code, message = refusal
            # The body was never read: close the connection rather than leave the client's upload
            # (possibly gigabytes) hanging on a keep-alive connection.
            await error_response(status, code, message, rid, headers=_CLOSE)(scope, receive, send)
            return
        try:
            await self.app(scope, self._counted(receive), send)
        except BodyTooLarge as exc:
            if reply.started:
                raise
            await error_response(413, "payload_too_large", str(exc.detail), rid, headers=exc.headers)(
                scope, receive, send
            )
        except BodyTimeout as exc:
            if reply.started:
                raise
            await error_response(408, "request_timeout", str(exc.detail), rid, headers=exc.headers)(
                scope, receive, send
            )
        except Exception:
            if reply.started:
                raise
            log.exception("http_unhandled_error", method=scope.get("method"))
            await error_response(500, "internal_error", "internal server error", rid)(scope, receive, send)

    def _counted(self, receive: Receive) -> Receive:
        """``receive`` with the body size limit and the per-chunk read timeout enforced."""
        received = 0
        body_done = False

        async def receive_counted() -> Message:
            nonlocal received, body_done
            if body_done:   # after the body, receive() waits for a disconnect: no timeout there
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self._body_timeout)
            except asyncio.TimeoutError:
                raise BodyTimeout(self._body_timeout) from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self._max:   # a chunked body has no Content-Length to check up front
                    raise BodyTooLarge(self._max)
            return message

        return receive_counted

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
