"""``HttpServer``: the REST shim served by uvicorn in a background thread of the host process."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import math
import os
import socket
import threading
import time
from collections.abc import Iterator

import structlog
import uvicorn

from engine.api import Engine
from http_compat.app import create_app
from http_compat.connections import (
    ConnectionGuard,
    GuardedProtocol,
    SheddingListener,
    defer_until_data,
    fit_to_descriptors,
)
from http_compat.settings import HttpSettings

__all__ = ["HttpServer", "is_loopback"]

log = structlog.get_logger("http_compat")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; any other name counts as remote."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port).

    Raises:
        OSError: the address is in use or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on accepted sockets whose
    # proto says TCP, and without it Nagle + delayed ACK add ~40 ms to every keep-alive reply
    # (socket.create_server leaves proto at 0).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if os.name != "nt":
            # POSIX: rebind at once after a restart. Not on Windows, where the flag would let
            # another process bind the same port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


class _ThreadServer(uvicorn.Server):
    """A uvicorn server that leaves process signals to the host application."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would install SIGINT/SIGTERM handlers; the engine's host owns those.
        yield


class HttpServer:
    """Runs ``create_app(engine, settings)`` on ``settings.http_host:http_port``.

    ``start()`` binds the socket in the caller's thread (so a busy port raises ``OSError`` there)
    and returns once uvicorn accepts connections; ``stop()`` drains in-flight requests.

    Raises:
        ValueError: ``http_host`` is not loopback and ``settings.allow_remote`` is false.
    """

    def __init__(self, engine: Engine, settings: HttpSettings) -> None:
        host = settings.http_host
        if not is_loopback(host) and not settings.allow_remote:
            raise ValueError(
                f"refusing to bind the HTTP door to non-loopback host {host!r}: set allow_remote "
                "(BACKEND_ALLOW_REMOTE=true) to expose it to the network"
            )
        self._engine = engine
        self._settings = settings
        self._server: _ThreadServer | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._failure: BaseException | None = None
        self.guard: ConnectionGuard | None = None     # the open connections, once started

    @property
    def port(self) -> int:
        """The port actually bound (the chosen one when ``http_port`` is 0)."""
        if self._port is None:
            raise RuntimeError("HttpServer is not started")
        return self._port

    @property
    def url(self) -> str:
        host = self._settings.http_host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Bind, start serving in a daemon thread, and wait until uvicorn has started."""
        if self._thread is not None:
            raise RuntimeError("HttpServer already started")
        host, port = self._settings.http_host, self._settings.http_port
        sock = _listen(host.strip("[]"), port)
        defer_until_data(sock, self._settings.http_header_timeout_s)
        self._port = int(sock.getsockname()[1])
        if not is_loopback(host):
            log.warning("http_remote_bind", host=host, port=self._port, api_key_set=self._settings.api_key is not None,
                        note="non-loopback host (allow_remote=true): reachable from other machines")
        server = _ThreadServer(self._config())
        self._server = server
        self._thread = threading.Thread(target=self._serve, args=(server, SheddingListener(sock)), name="http-compat",
                                        daemon=True)
        self._thread.start()
        self._wait_started(server, timeout)
        log.info("http_listening", url=self.url)

    def _config(self) -> uvicorn.Config:
        s = self._settings
        cap = fit_to_descriptors(s.http_max_connections)
        if cap < s.http_max_connections:
            log.warning("http_max_connections_lowered", configured=s.http_max_connections, used=cap,
                        reason="the process's file descriptor limit (ulimit -n)")
        self.guard = ConnectionGuard(cap, s.http_header_timeout_s)
        return uvicorn.Config(
            create_app(self._engine, s),
            http=functools.partial(GuardedProtocol, guard=self.guard),   # type: ignore[arg-type]
            log_config=None,          # the host application owns logging configuration
            lifespan="off",
            proxy_headers=False,      # no proxy in front; never trust X-Forwarded-For
            server_header=False,
            # longer than the idle timeout of .NET's connection pool (60-100 s), so the server never
            # closes a pooled connection just as the GUI sends its next request on it
            timeout_keep_alive=s.http_keepalive_timeout_s,   # type: ignore[arg-type]
            access_log=False,         # RequestGate logs each request as a structured event
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let running requests finish for up to ``timeout`` s, then cancel them."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.config.timeout_graceful_shutdown = max(1, math.ceil(timeout))
        server.should_exit = True
        thread.join(timeout + 1.0)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5.0)
        if thread.is_alive():
            log.error("http_stop_timeout", seconds=timeout + 6.0)
        self._server = self._thread = None
        self._port = None

    def __enter__(self) -> HttpServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self, server: _ThreadServer, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - uvicorn reports startup failures as SystemExit
            self._failure = exc
            log.exception("http_failed", note="the HTTP door stopped with an error")
        finally:
            sock.close()

    def _wait_started(self, server: _ThreadServer, timeout: float) -> None:
        thread = self._thread
        assert thread is not None
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                self._server = self._thread = None
                self._port = None
                raise RuntimeError("HTTP door failed to start") from self._failure
            if time.monotonic() > deadline:
                self.stop(timeout=1.0)
                raise TimeoutError(f"HTTP door did not start within {timeout} s")
            thread.join(0.01)
