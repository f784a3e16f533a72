"""Connection-level defences of the REST door, below the ASGI app: a cap on open connections, a
time limit on request headers, and an accept loop that survives running out of file descriptors.

uvicorn accepts every connection and keeps an idle one until its first request, however long;
half-sent headers are waited for forever; and when the process runs out of descriptors, asyncio's
accept loop logs one error per pending connection per loop tick (hundreds of thousands of lines a
minute) while the door answers nobody. Here:

* ``ConnectionGuard`` keeps at most ``max_connections`` open. At the cap a new connection closes the
  one idle longest (no request in progress), preferring connections that never completed a request
  over kept-alive ones; when every one is busy the new one gets a 503 and is closed. So idle
  connections, however many, cannot lock out ``/health`` or the GUI.
* ``SheddingListener`` accepts at most 4 connections per event-loop iteration, so a flood of
  connections is taken in slices between the requests of the connections already open.
* ``GuardedProtocol`` (uvicorn's h11 protocol) gives a new connection, and a request begun on a
  kept-alive one, ``header_timeout_s`` to send its complete headers: then 408 and close (nothing was
  received: just close). Idle kept-alive connections keep uvicorn's ``timeout_keep_alive``.
* ``SheddingListener`` is the listening socket: when ``accept`` fails with EMFILE/ENFILE it frees a
  spare descriptor, accepts the waiting connection and closes it at once (the client sees a reset
  instead of hanging), takes the spare back, and logs once per 10 s with a count.
* ``defer_until_data`` (Linux): the kernel hands a connection to the door only once its first bytes
  arrive, or after ``header_timeout_s`` (then the header timeout above applies). A flood of silent
  connections then costs the door nothing: without it, 600 silent connections reopened as the cap
  evicted them cost ~300 accepts and evictions a second on the event loop, and inspections on
  kept-alive connections waited behind them (REST p99 3.4x an idle server's; 0.8x with it).
  Connections that send a byte are the cap's and the header timeout's, as before.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import socket
import time
from collections import OrderedDict
from typing import Any

import structlog
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.logs import LogThrottle

__all__ = ["ConnectionGuard", "GuardedProtocol", "SheddingListener", "defer_until_data", "fit_to_descriptors"]

log = structlog.get_logger("http_compat")

_EXHAUSTED = (errno.EMFILE, errno.ENFILE)
# connections accepted per event-loop iteration: a burst of thousands is taken in slices, with the
# requests of connections already open served in between. 4 rather than 32: under a flood of
# connections that each sent one byte (600, reopened as evicted: ~300 evictions a second), REST p99
# of kept-alive inspections was 2.1x an idle server's with 4 and 4.3x with 32, side by side
_ACCEPT_BURST = 4


def _raw_reply(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error reply with the door's JSON body, for a connection no app serves."""
    body = json.dumps({"error": message, "code": code, "request_id": ""}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


class ConnectionGuard:
    """The open connections of one server and the cap on them (event loop thread only)."""

    def __init__(self, max_connections: int, header_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self._open: set[GuardedProtocol] = set()
        # idle connections, longest idle first: those that never completed a request (a flood of
        # bare connections) are closed before those kept alive between requests (the GUI's)
        self._fresh: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self._kept: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self._throttle = LogThrottle()
        self.evicted = self.refused = self.timed_out = 0

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, conn: GuardedProtocol) -> bool:
        """Count ``conn`` in (as idle), closing the longest-idle connection when at the cap; False
        when every open connection is serving a request (``conn`` must then be refused). O(1): a
        flood of new connections costs the event loop little per connection."""
        if len(self._open) >= self.max_connections:
            idle = self._fresh or self._kept
            if not idle:
                self.refused += 1
                self._note("http_connection_refused", "every connection is serving a request")
                return False
            victim, _ = idle.popitem(last=False)
            self._open.discard(victim)
            victim.close_quietly()
            self.evicted += 1
            self._note("http_connection_evicted", "at the connection cap: the longest-idle one was closed")
        self._open.add(conn)
        self._fresh[conn] = None
        return True

    def busy(self, conn: GuardedProtocol) -> None:
        """``conn`` is serving a request: it cannot be evicted."""
        self._fresh.pop(conn, None)
        self._kept.pop(conn, None)

    def idle(self, conn: GuardedProtocol) -> None:
        """``conn`` finished a request: it is now the most recently idle kept-alive connection."""
        if conn in self._open:
            self._kept.pop(conn, None)
            self._kept[conn] = None

    def closed(self, conn: GuardedProtocol) -> None:
        self._open.discard(conn)
        self.busy(conn)

    def _note(self, event: str, reason: str) -> None:
        skipped = self._throttle.due()
        if skipped is not None:
            log.warning(event, reason=reason, cap=self.max_connections, since_last_line=skipped,
                        evicted=self.evicted, refused=self.refused, header_timeouts=self.timed_out)


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol under a ``ConnectionGuard`` and a header time limit."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard
        self._header_timer: Any = None
        self._received_since_response = False

    @property
    def in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self._guard.admit(self):
            transport.write(_raw_reply(503, "Service Unavailable", "server_busy",
                                       "too many connections are serving requests; retry later"))
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self.in_request:
            self._received_since_response = True
            if self._header_timer is None:        # the first bytes of a request on a kept-alive connection
                self._arm()
        super().data_received(data)
        if self.in_request:
            self._disarm()
            self._guard.busy(self)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._guard.idle(self)
        self._received_since_response = False

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._guard.closed(self)
        super().connection_lost(exc)

    def close_quietly(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self._guard.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.in_request or self.transport.is_closing():
            return
        self._guard.timed_out += 1
        if self._received_since_response:
            self.transport.write(_raw_reply(408, "Request Timeout", "request_timeout",
                                            f"request headers not received within {self._guard.header_timeout_s:g} s"))
        self.transport.close()


class SheddingListener(socket.socket):
    """A listening socket whose ``accept`` sheds connections instead of failing when the process has
    no descriptor left (see the module docstring). Only the selector event loop calls ``accept``;
    Windows' proactor loop accepts through IOCP and has no descriptor limit of this kind."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self._spare: int | None = _open_spare()
        self._throttle = LogThrottle()
        self._pause_until = 0.0
        self._burst = 0
        self.shed = 0

    def accept(self) -> tuple[socket.socket, Any]:
        if time.monotonic() < self._pause_until or self._burst >= _ACCEPT_BURST:
            raise BlockingIOError(errno.EAGAIN, "accepting paused")
        try:
            accepted = super().accept()
        except OSError as exc:
            if exc.errno not in _EXHAUSTED:
                raise
            if self._shed_one():
                raise BlockingIOError(errno.EAGAIN, "connection shed") from None
            # no spare to shed with: let the event loop back off (it pauses accepting for 1 s), and
            # refuse the rest of this burst quietly instead of failing once per pending connection
            self._pause_until = time.monotonic() + 1.0
            raise
        if self._burst == 0:
            try:
                asyncio.get_running_loop().call_soon(self._next_burst)   # runs in the next loop iteration
            except RuntimeError:                                         # accept() outside an event loop
                return accepted
        self._burst += 1
        return accepted

    def _next_burst(self) -> None:
        self._burst = 0

    def _shed_one(self) -> bool:
        skipped = self._throttle.due()
        if skipped is not None:
            log.error("http_out_of_descriptors", note="new connections are closed at once until descriptors "
                      "are free", shed_since_last_line=skipped, shed_total=self.shed)
        if self._spare is None:
            self._spare = _open_spare()
            return False
        os.close(self._spare)
        self._spare = None
        try:
            fd, _ = self._accept()   # type: ignore[attr-defined]
            socket.close(fd)
            self.shed += 1
        except OSError:
            pass
        self._spare = _open_spare()
        return True

    def close(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        super().close()


def defer_until_data(sock: socket.socket, seconds: float) -> bool:
    """Have the kernel accept connections on ``sock`` only once they have sent data, or after about
    ``seconds`` (Linux ``TCP_DEFER_ACCEPT``, rounded up to the SYN-ACK retransmission schedule:
    1, 3, 7, 15 ... s). False where the platform has no such option (Windows, macOS)."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None:
        return False
    sock.setsockopt(socket.IPPROTO_TCP, option, max(1, math.ceil(seconds)))
    return True


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


def fit_to_descriptors(max_connections: int, reserve: int = 128) -> int:
    """``max_connections`` lowered so the connections use at most half of the descriptors the
    process may open (the rest: ZeroMQ, model files, uploads spooled to disk)."""
    try:
        import resource
    except ImportError:          # Windows: sockets are handles, not limited descriptors
        return max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(4, min(max_connections, soft // 2 - reserve // 2, soft - reserve))
