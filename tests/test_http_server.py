"""HttpServer on a real loopback socket: lifecycle, binding rules, API key, size limits, probing."""

from __future__ import annotations

import signal
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from engine.api import Engine
from http_compat.server import HttpServer
from service.serve import ServeConfig


def _settings(root: Path, **overrides: object) -> ServeConfig:
    base: dict[str, object] = {"data_root": root, "backbone": "efficientnet_lite0", "input_size": 224,
                               "device": "cpu", "http_host": "127.0.0.1", "http_port": 0}
    return ServeConfig.of(**{**base, **overrides})


def raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are and read the reply until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(":", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v.strip() for k, v in headers.items()}, body


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(_settings(tmp_path_factory.mktemp("engine")).engine)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def limited(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    """A server with an API key and a 4 KiB request limit."""
    srv = HttpServer(engine, _settings(tmp_path_factory.mktemp("limited"), api_key="k3y",
                                       max_request_bytes=4096).http)
    srv.start()
    yield srv
    srv.stop()


def test_port_zero_binds_a_free_port_and_stop_releases_it(engine: Engine, tmp_path: Path) -> None:
    a, b = HttpServer(engine, _settings(tmp_path).http), HttpServer(engine, _settings(tmp_path).http)
    with a, b:
        assert a.port != b.port and a.port > 0
        r = httpx.get(f"{a.url}/openapi.json", headers={"X-Request-Id": "probe-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "probe-1"
        port = a.port
        a.stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    a.stop()   # idempotent


def test_start_leaves_signal_handlers_alone(engine: Engine, tmp_path: Path) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with HttpServer(engine, _settings(tmp_path).http):
        assert {sig: signal.getsignal(sig) for sig in before} == before


def test_start_twice_is_an_error(engine: Engine, tmp_path: Path) -> None:
    with HttpServer(engine, _settings(tmp_path).http) as srv, pytest.raises(RuntimeError):
        srv.start()


def test_busy_port_raises_oserror_in_start(engine: Engine, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        srv = HttpServer(engine, _settings(tmp_path, http_port=taken.getsockname()[1]).http)
        with pytest.raises(OSError):
            srv.start()
        with pytest.raises(RuntimeError):
            _ = srv.port


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.10.5", "plant-pc"])
def test_non_loopback_host_needs_allow_remote(engine: Engine, tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="allow_remote"):
        HttpServer(engine, _settings(tmp_path, http_host=host).http)


def test_allowed_remote_bind_logs_a_warning(engine: Engine, tmp_path: Path) -> None:
    with capture_logs() as events:
        with HttpServer(engine, _settings(tmp_path, http_host="0.0.0.0", allow_remote=True).http) as srv:
            assert httpx.get(f"http://127.0.0.1:{srv.port}/openapi.json").status_code == 200
    warnings = [e for e in events if e["event"] == "http_remote_bind"]
    assert warnings and warnings[0]["log_level"] == "warning" and warnings[0]["api_key_set"] is False


def test_api_key_guards_every_path(limited: HttpServer) -> None:
    for path in ("/health", "/openapi.json", "/docs", "/does-not-exist"):
        r = httpx.get(f"{limited.url}{path}")
        assert r.status_code == 401, path
        assert r.json()["code"] == "unauthorized"
        assert r.json()["request_id"] == r.headers["x-request-id"]
    assert httpx.get(f"{limited.url}/openapi.json", headers={"X-API-Key": "wrong"}).status_code == 401
    ok = httpx.get(f"{limited.url}/openapi.json", headers={"X-API-Key": "k3y"})
    assert ok.status_code == 200
    assert ok.json()["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"


def test_declared_content_length_over_limit_is_413_before_the_body(limited: HttpServer) -> None:
    status, headers, body = raw_http(limited.port, (
        b"POST /fit_ok HTTP/1.1\r\nHost: x\r\nX-API-Key: k3y\r\nX-Request-Id: big-1\r\n"
        b"Content-Type: multipart/form-data; boundary=\"b\"\r\nContent-Length: 10000000000\r\n\r\n"))
    assert status == 413
    assert headers["x-request-id"] == "big-1"
    assert httpx.Response(413, content=body).json() == {
        "error": "request body of 10000000000 bytes exceeds the 4096 byte limit",
        "code": "payload_too_large", "request_id": "big-1"}


def test_chunked_body_over_limit_is_413(limited: HttpServer) -> None:
    chunk = b'{"role_id": "r", "roi_id": "' + b"x" * 5000 + b'"}'
    # no terminating chunk: the server must answer once the limit is crossed, without the rest
    status, headers, body = raw_http(limited.port, (
        b"POST /calibrate_ng HTTP/1.1\r\nHost: x\r\nX-API-Key: k3y\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"))
    assert status == 413
    assert httpx.Response(413, content=body).json()["code"] == "payload_too_large"
    assert len(headers["x-request-id"]) == 32


GUI_PATHS = ["/health", "/fit_ok", "/calibrate_ng", "/infer", "/state", "/manifest", "/datasets/ok/upload",
             "/datasets/ng/upload", "/datasets/list", "/datasets/file", "/datasets/meta", "/datasets/clear",
             "/calibrate_dataset", "/infer_dataset"]


@pytest.mark.parametrize("path", GUI_PATHS)
def test_options_probe_says_supported(limited: HttpServer, path: str) -> None:
    r = httpx.options(f"{limited.url}{path}", headers={"X-API-Key": "k3y"})
    assert r.status_code == 405 or 200 <= r.status_code < 300


def test_options_probe_on_unknown_path_is_404(limited: HttpServer) -> None:
    r = httpx.options(f"{limited.url}/datasets/export", headers={"X-API-Key": "k3y"})
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_keep_alive_replies_are_not_delayed_by_nagle(engine: Engine, tmp_path: Path) -> None:
    # A listening socket made with proto 0 leaves TCP_NODELAY off on accepted connections, and
    # every reply on a kept-alive connection then waits ~40 ms for a delayed ACK.
    with HttpServer(engine, _settings(tmp_path).http) as srv, \
            socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            sock.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while not reply.endswith(b'"}'):
                reply += sock.recv(65536)
            times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 0.030, times
