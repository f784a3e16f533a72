"""Hostile and careless clients against a real ``python -m service`` process (both doors, loopback).

The server runs as a child process so its own memory (VmRSS, and the peak VmHWM, reset before each
measurement), its open descriptors and its log can be watched. It has an API key (the
unauthenticated cases), runs with ``RLIMIT_NOFILE`` 1024 (the machine's ``ulimit -n`` is larger; 1024
is the common default, so 1 100 idle connections exceed what the process may open), a 256 MiB
working-memory budget, and short header/body timeouts so the slow-client cases finish quickly.

The classes and their answers are the table "Hostile clients" in docs/reliability.md.
"""

from __future__ import annotations

import inspect
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import zmq

from engine.api import Engine
from engine.errors import InvalidId, InvalidInput
from engine.validate import check_filename, positive_number
from http_compat import routes as http_routes, routes_datasets as http_dataset_routes
from ipc import EngineClient, RemoteError
from ipc.protocol import OPS
from tests.support import REPO, Doors, ServiceProcess, door_settings, noise, png_bytes, service_process

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc for the server's memory")

KEY, ROLE, ROI, MM, SIDE = "k3y", "cam1", "a", 0.1, 64
MIB = 1024 * 1024
BUDGET = 256 * MIB
HEADER_TIMEOUT_S, BODY_GAP_S, BODY_TIMEOUT_S = 2.0, 3.0, 5.0
# TCP_DEFER_ACCEPT of 2 s is two SYN-ACK retransmissions: the door sees a silent connection after 1 + 2 s
DEFERRED_S = 3.0
SAMPLE = png_bytes(noise(400))          # ~480 KB: a reply worth hoarding


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = {"BACKEND_API_KEY": KEY, "BACKEND_MEMORY_BUDGET": str(BUDGET), "BACKEND_MEMORY_WAIT_S": "30",
           "BACKEND_HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "BACKEND_HTTP_BODY_GAP_S": str(BODY_GAP_S),
           "BACKEND_HTTP_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S), "BACKEND_LOG_LEVEL": "WARNING"}
    proc = service_process(tmp_path_factory.mktemp("hostile"), env, max_files=1024)
    try:
        with EngineClient(proc.zmq_endpoint, api_key=KEY, timeout=120) as client:
            fit = client.call("fit_ok", {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM,
                                         "images": [png_bytes(noise(SIDE, seed=s)) for s in range(6)]})
            client.call("calibrate_ng", {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM,
                                         "ok_scores": list(fit["ok_scores"])})
            client.call("dataset_upload", {"role_id": ROLE, "roi_id": ROI, "label": "ok", "image": SAMPLE,
                                           "filename": "big.png"})
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def zmq_client(server: ServiceProcess) -> Iterator[EngineClient]:
    with EngineClient(server.zmq_endpoint, api_key=KEY, timeout=60, retries=0) as client:
        yield client


@pytest.fixture
def web(server: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        yield client


def _both_doors_answer(server: ServiceProcess, timeout: float = 5.0) -> None:
    """/health over a new REST connection and ``health`` over a new ZeroMQ socket, within ``timeout``."""
    start = time.monotonic()
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=timeout) as web:
        assert web.get("/health").status_code == 200
    with EngineClient(server.zmq_endpoint, api_key=KEY, timeout=timeout, retries=0) as client:
        assert client.call("health")["status"] == "ok"
    assert time.monotonic() - start < timeout


def _raw_zmq(server: ServiceProcess, payload: bytes, timeout_s: float = 10.0) -> tuple[dict[str, Any], float]:
    """The reply to one raw request frame and the seconds it took."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(server.zmq_endpoint)
        start = time.perf_counter()
        sock.send(payload)
        assert sock.poll(int(timeout_s * 1000), zmq.POLLIN), "no reply"
        reply = msgpack.unpackb(sock.recv())
        return reply, time.perf_counter() - start
    finally:
        sock.close(linger=0)


def _peak_growth(server: ServiceProcess, action: Callable[[], Any]) -> tuple[Any, int]:
    """(what ``action`` returned, how far the server's peak RSS rose above its RSS before it)."""
    time.sleep(0.2)
    server.reset_peak()
    before = server.rss
    result = action()
    time.sleep(0.3)                      # let replies and buffers be freed (the peak stays)
    return result, server.peak_rss - before


# --- memory before authentication ------------------------------------------------------------------

def _array_header(n: int) -> bytes:
    return b"\xdd" + struct.pack(">I", n)


UNAUTHENTICATED_16_MB = {
    # a 16 MB msgpack array of empty arrays (the reported case: 9 s and +1.1 GB)
    "array_of_empty_arrays": (_array_header(16 * MIB - 5) + b"\x90" * (16 * MIB - 5), 413, "payload_too_large"),
    # a map whose args (256 x 65 535 empty arrays) come before a wrong key: unpacked within the item budget
    "args_before_the_key": (b"\x83\xa1v\x01\xa4args" + _array_header(256)
                            + (b"\xdc" + struct.pack(">H", 65535) + b"\x90" * 65535) * 256
                            + msgpack.packb("api_key") + msgpack.packb("wrong"), 413, "payload_too_large"),
    # the key first: refused before the 16 MB of args is unpacked at all
    "wrong_key_first": (msgpack.packb({"v": 1, "op": "infer", "id": "x", "api_key": "wrong",
                                       "args": {"image": bytes(16 * MIB)}}), 401, "unauthorized"),
}


@pytest.mark.parametrize("case", sorted(UNAUTHENTICATED_16_MB))
def test_an_unauthenticated_16_mb_message_is_answered_fast_and_costs_little(server: ServiceProcess,
                                                                             case: str) -> None:
    payload, status, code = UNAUTHENTICATED_16_MB[case]
    assert len(payload) >= 16 * MIB - 5
    (reply, seconds), growth = _peak_growth(server, lambda: _raw_zmq(server, payload))
    assert (reply["status"], reply["error"]["code"]) == (status, code), reply
    assert seconds < 1.0, seconds
    assert growth < 64 * MIB, f"peak RSS rose {growth / MIB:.1f} MiB"
    _both_doors_answer(server)


def test_an_unauthenticated_16_mb_upload_is_refused_from_its_headers(server: ServiceProcess) -> None:
    def post() -> bytes:
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
            sock.sendall(b"POST /fit_ok HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: %d\r\n\r\n" % (16 * MIB))
            try:
                for _ in range(16):
                    sock.sendall(bytes(MIB))
            except OSError:               # the server answered and closed without reading the body
                pass
            return sock.recv(65536)

    start = time.perf_counter()
    reply, growth = _peak_growth(server, post)
    assert reply.startswith(b"HTTP/1.1 401") and b"unauthorized" in reply, reply[:200]
    assert time.perf_counter() - start < 2.0
    assert growth < 64 * MIB, f"peak RSS rose {growth / MIB:.1f} MiB"


# --- replies nobody reads ----------------------------------------------------------------------------

def test_a_client_that_never_reads_its_replies_cannot_make_the_server_hoard_them(server: ServiceProcess) -> None:
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVHWM, 1)          # its libzmq stops reading too: TCP back-pressure reaches the server
    dealer.setsockopt(zmq.RCVBUF, 4096)
    request = msgpack.packb({"v": 1, "op": "dataset_file", "id": "r", "api_key": KEY,
                             "args": {"role_id": ROLE, "roi_id": ROI, "label": "ok", "filename": "big.png"}})
    dealer.connect(server.zmq_endpoint)

    def flood() -> None:
        for _ in range(1000):                  # 1 000 x 480 KB = 480 MB of replies if all were kept
            dealer.send_multipart([b"", request])
        time.sleep(3.0)

    try:
        _, growth = _peak_growth(server, flood)
        assert growth < 128 * MIB, f"peak RSS rose {growth / MIB:.1f} MiB"
        with EngineClient(server.zmq_endpoint, api_key=KEY, timeout=10, retries=0) as other:   # others are served
            assert other.call("dataset_file", {"role_id": ROLE, "roi_id": ROI, "label": "ok",
                                               "filename": "big.png"})["data"] == SAMPLE
        _both_doors_answer(server)
    finally:
        dealer.close(linger=0)
    dropped = [line for line in server.log_lines() if "zmq_reply_dropped" in line]
    assert len(dropped) <= 10, f"{len(dropped)} drop lines: the log is rate-limited"


# --- unbounded lists -----------------------------------------------------------------------------------

def test_batches_and_score_lists_have_item_limits_on_both_doors(zmq_client: EngineClient, web: httpx.Client) -> None:
    tiny = png_bytes(noise(8))
    items = [{"roi_id": ROI, "mm_per_px": MM, "image": tiny}] * 2500
    start = time.perf_counter()
    with pytest.raises(RemoteError) as info:
        zmq_client.call("infer_batch", {"role_id": ROLE, "items": items})
    assert (info.value.status, info.value.code) == (413, "payload_too_large")
    assert time.perf_counter() - start < 2.0
    n = 300                                          # max_batch_items is 256
    files = [("images", (f"{i}.png", tiny, "image/png")) for i in range(n)]
    r = web.post("/infer_batch", data={"role_id": ROLE, "items": "[" + ",".join(['{"roi_id":"a"}'] * n) + "]"},
                 files=files)
    assert (r.status_code, r.json()["code"]) == (413, "payload_too_large"), r.text
    with pytest.raises(RemoteError) as info:
        zmq_client.call("calibrate_ng", {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM,
                                         "ok_scores": [1.0] * 100_001})
    assert (info.value.status, info.value.code) == (413, "payload_too_large")


def test_a_json_body_of_a_million_wrong_items_is_refused_before_validation(server: ServiceProcess,
                                                                          web: httpx.Client) -> None:
    body = b'{"role_id":"cam1","roi_id":"a","mm_per_px":0.1,"ok_scores":[' + b",".join([b'"x"'] * 1_000_000) + b"]}"
    assert len(body) < 4 * MIB                  # under the 4 MiB JSON body limit: the item bound refuses it

    def post() -> httpx.Response:
        return web.post("/calibrate_ng", content=body, headers={"Content-Type": "application/json"})

    start = time.perf_counter()
    r, growth = _peak_growth(server, post)
    assert (r.status_code, r.json()["code"]) == (413, "payload_too_large"), r.text[:300]
    assert len(r.content) < 1000 and time.perf_counter() - start < 2.0
    assert growth < 64 * MIB, f"peak RSS rose {growth / MIB:.1f} MiB"


# --- idle and dripping connections ---------------------------------------------------------------------

def _connect_idle(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
    return socks


def test_1100_idle_connections_leave_both_doors_answering(server: ServiceProcess) -> None:
    lines_before = len(server.log_lines())
    idle = _connect_idle(server.http_port, 1100)
    try:
        time.sleep(0.5)
        assert server.open_files() < 1024
        _both_doors_answer(server, timeout=5.0)
        more = _connect_idle(server.http_port, 1100)      # a second wave while the first is held
        idle += more
        time.sleep(0.5)
        _both_doors_answer(server, timeout=5.0)
        assert server.open_files() < 1024
    finally:
        for s in idle:
            s.close()
    time.sleep(HEADER_TIMEOUT_S + 1)
    _both_doors_answer(server)
    new_lines = server.log_lines()[lines_before:]
    assert len(new_lines) < 60, f"{len(new_lines)} log lines for 2 200 idle connections"
    assert not any("out of system resource" in line for line in new_lines)


def test_half_sent_headers_get_408_and_a_silent_connection_is_closed(server: ServiceProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=20) as silent, \
            socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-")
        start = time.perf_counter()
        reply = slow.recv(1000)
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply, reply
        assert slow.recv(100) == b""
        assert time.perf_counter() - start < HEADER_TIMEOUT_S + 2
        assert silent.recv(100) == b""                       # closed, nothing said: nothing was asked
        # on Linux the kernel holds a silent connection for about the header timeout before the door
        # sees it (TCP_DEFER_ACCEPT, on the SYN-ACK retransmission schedule), then the door's timer runs
        held = DEFERRED_S if hasattr(socket, "TCP_DEFER_ACCEPT") else 0.0
        assert time.perf_counter() - start < held + HEADER_TIMEOUT_S + 2


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="the kernel holds silent connections on Linux")
def test_silent_connections_wait_in_the_kernel_and_cost_the_door_nothing(server: ServiceProcess) -> None:
    before = server.open_files()
    silent = _connect_idle(server.http_port, 400)
    talking = socket.socket()
    try:
        time.sleep(0.5)
        assert server.open_files() < before + 20            # none accepted: no descriptor, no eviction
        _both_doors_answer(server, timeout=5.0)
        talking.connect(("127.0.0.1", server.http_port))
        talking.sendall(b"GET /he")                            # a first byte: the door takes it at once
        time.sleep(0.5)
        assert server.open_files() >= before + 1
    finally:
        for s in silent:
            s.close()
        talking.close()


def test_a_body_dripped_byte_by_byte_is_cut_at_the_body_deadline(server: ServiceProcess) -> None:
    body = b'{"role_id": "cam1", "roi_id": "a", "mm_per_px": 0.1, "ok_scores": [1.0, 2.0]}'
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=20) as sock:
        sock.sendall(b"POST /calibrate_ng HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: k3y\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        start = time.perf_counter()
        reply = b""
        for byte in body:                                    # one byte per second, under the gap limit
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(1.0)
            try:
                reply = sock.recv(1000)
            except TimeoutError:
                continue
            break
        elapsed = time.perf_counter() - start
        sock.settimeout(3.0)
        while chunk := sock.recv(1000):                      # headers and body may come in two writes
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply, reply
        assert BODY_TIMEOUT_S - 1 < elapsed < BODY_TIMEOUT_S + 3


# --- memory amplification within limits ------------------------------------------------------------------

def _png_16bit_rgba_zeros(side: int) -> bytes:
    """A valid 16-bit RGBA PNG of zeros, compressed row by row (the array is never built)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # after a full flush the compressor starts afresh, so every further zero row compresses to the
    # same bytes: compress two rows, repeat the second, and end with the checksum of all the rows
    packer, row = zlib.compressobj(9), bytes(1 + side * 8)
    first = packer.compress(row) + packer.flush(zlib.Z_FULL_FLUSH)
    again = packer.compress(row) + packer.flush(zlib.Z_FULL_FLUSH)
    end = packer.flush()
    checksum = 1
    for _ in range(side):
        checksum = zlib.adler32(row, checksum)
    stream = first + again * (side - 1) + end[:-4] + struct.pack(">I", checksum)
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return _png_16bit_rgba_zeros(8000)


def test_a_small_png_that_decodes_to_512_mib_is_refused_from_its_header(server: ServiceProcess, bomb: bytes) -> None:
    assert len(bomb) < 1 * MIB
    form = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.1"}

    def four_at_once_on_each_door() -> list[tuple[int, str]]:
        def by_zmq() -> tuple[int, str]:
            with EngineClient(server.zmq_endpoint, api_key=KEY, timeout=30, retries=0) as client:
                try:
                    client.call("infer", {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM, "image": bomb})
                except RemoteError as exc:
                    return exc.status, exc.code
                return 200, ""

        def by_rest() -> tuple[int, str]:
            with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=30) as web:
                r = web.post("/infer", data=form, files={"image": ("b.png", bomb, "image/png")})
                return r.status_code, r.json()["code"]

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda f: f(), [by_zmq] * 4 + [by_rest] * 4))

    start = time.perf_counter()
    answers, growth = _peak_growth(server, four_at_once_on_each_door)
    assert answers == [(413, "payload_too_large")] * 8
    assert time.perf_counter() - start < 5.0
    assert growth < 64 * MIB, f"peak RSS rose {growth / MIB:.1f} MiB"


def test_concurrent_large_images_queue_for_the_memory_budget(server: ServiceProcess) -> None:
    """2000x2000 RGB ROIs: each needs ~164 MB of working memory by the engine's estimate, so the
    256 MiB budget lets one run at a time; eight sent at once all succeed, one after the other."""
    ramp = np.linspace(0, 255, 2000, dtype=np.uint8)
    image = png_bytes(np.dstack([np.tile(ramp, (2000, 1))] * 3))
    form = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.1", "heatmap": "none"}

    def eight_at_once() -> list[int]:
        def by_zmq() -> int:
            with EngineClient(server.zmq_endpoint, api_key=KEY, timeout=120, retries=0) as client:
                return 200 if client.call("infer", {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM, "image": image,
                                                    "heatmap": "none"})["score"] >= 0 else 0

        def by_rest() -> int:
            with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=120) as web:
                return web.post("/infer", data=form, files={"image": ("r.png", image, "image/png")}).status_code

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda f: f(), [by_zmq, by_rest] * 4))

    statuses, growth = _peak_growth(server, eight_at_once)
    assert statuses == [200] * 8
    assert growth < BUDGET, f"peak RSS rose {growth / MIB:.1f} MiB with a {BUDGET // MIB} MiB budget"


def test_the_server_log_stayed_quiet(server: ServiceProcess) -> None:
    """After every class above: no traceback, no internal_error, no flood."""
    lines = server.log_lines()
    assert not [line for line in lines if "internal_error" in line or "Traceback" in line][:3]
    assert len(lines) < 2000, len(lines)



# =====================================================================================================
# The classes that need no process of their own: one engine behind both doors in this process, without
# an API key (the default), so every request below would reach the engine if a rule did not stop it.
# =====================================================================================================

@pytest.fixture(scope="module")
def doors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doors]:
    settings = door_settings(tmp_path_factory.mktemp("hostile_doors"), http_allowed_hosts=["plant-pc"],
                             http_allowed_origins=["http://gui.plant:8080"])
    engine = Engine(settings.engine)
    engine.fit_ok(ROLE, ROI, MM, [png_bytes(noise(SIDE, seed=s)) for s in range(4)])
    engine.calibrate_ng(ROLE, ROI, MM, [1.0, 2.0])
    d = Doors(engine, settings, timeout=60)
    yield d
    d.close()
    engine.close()


def _model_dir(doors: Doors, roi: str) -> Path:
    return doors.engine.data_root / "models" / ROLE / roi


def _files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- cross-site writes ----------------------------------------------------------------------------------

CROSS_SITE = [
    ({"Origin": "http://evil.example"}, 403, "cross_site_request"),
    ({"Origin": "null"}, 403, "cross_site_request"),                      # sandboxed frame, file:// page
    ({"Origin": "http://localhost:3000"}, 403, "cross_site_request"),     # another local page
    ({"Sec-Fetch-Site": "cross-site"}, 403, "cross_site_request"),
    ({"Host": "evil.example"}, 400, "invalid_host"),                       # DNS rebinding
    ({"Host": "127.0.0.1.nip.io:8000"}, 400, "invalid_host"),
]


@pytest.mark.parametrize(("headers", "status", "code"), CROSS_SITE, ids=lambda v: str(v)[:40])
def test_a_forged_write_from_a_web_page_is_refused(doors: Doors, headers: dict[str, str], status: int,
                                                    code: str) -> None:
    calibrated = _files_under(_model_dir(doors, ROI))
    form = {"role_id": ROLE, "roi_id": "forged", "mm_per_px": "0.1"}
    image = {"images": ("a.png", png_bytes(noise(SIDE)), "image/png")}
    for r in (doors.web.post("/fit_ok", data=form, files=image, headers=headers),
              doors.web.post("/fit_ok", data={**form, "roi_id": ROI}, files=image, headers=headers),
              doors.web.post("/calibrate_ng", json={"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM,
                                                   "ok_scores": [50.0]}, headers=headers),
              doors.web.delete("/models", params={"role_id": ROLE, "roi_id": ROI}, headers=headers),
              doors.web.delete("/datasets/clear", params={"role_id": ROLE, "roi_id": ROI}, headers=headers)):
        assert (r.status_code, r.json()["code"]) == (status, code), r.text
    assert not _model_dir(doors, "forged").exists()
    assert _files_under(_model_dir(doors, ROI)) == calibrated


def test_the_gui_curl_the_own_page_and_configured_names_keep_working(doors: Doors) -> None:
    origin = doors.http.url
    form = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.1"}
    image = {"image": ("a.png", png_bytes(noise(SIDE)), "image/png")}
    for headers in ({}, {"Origin": origin}, {"Origin": "http://gui.plant:8080"}, {"Host": "plant-pc:8000"},
                    {"Host": "localhost"}, {"Sec-Fetch-Site": "same-origin", "Origin": origin}):
        r = doors.web.post("/infer", data=form, files=image, headers=headers)
        assert r.status_code == 200, (headers, r.text)
    # safe methods are not checked for origin: a foreign page cannot read the reply (no CORS headers)
    r = doors.web.get("/health", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert doors.web.get("/health", headers={"Host": "evil.example"}).status_code == 400


# --- stored values ----------------------------------------------------------------------------------

def test_a_calibration_that_would_store_infinity_is_refused_on_both_doors(doors: Doors) -> None:
    stored = _files_under(_model_dir(doors, ROI))
    for ok, ng in (([1.7e308], None), ([1.7e308, 1.7e308], None), ([1.7e308], [1.7e308])):
        args = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM, "ok_scores": ok, "ng_scores": ng}
        assert doors.zmq_answer("calibrate_ng", args) == (400, "invalid_input")
        status, body = doors.http_answer("POST", "/calibrate_ng", json=args)
        assert (status, body["code"]) == (400, "invalid_input"), body
    assert _files_under(_model_dir(doors, ROI)) == stored
    result = doors.zmq.call("infer", {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM, "image": png_bytes(noise(SIDE))})
    assert result["threshold"] == doors.engine.state(ROLE, ROI).threshold


@pytest.mark.parametrize("mm", [1e200, 1e-9, 5e3])
def test_mm_per_px_outside_the_sane_range_is_refused(doors: Doors, mm: float) -> None:
    image = png_bytes(noise(SIDE))
    assert doors.zmq_answer("infer", {"role_id": ROLE, "roi_id": ROI, "mm_per_px": mm, "image": image}) \
        == (400, "invalid_input")
    assert doors.zmq_answer("fit_ok", {"role_id": ROLE, "roi_id": "range", "mm_per_px": mm,
                                       "images": [image]}) == (400, "invalid_input")
    status, body = doors.http_answer("POST", "/infer", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": repr(mm)},
                                     files={"image": ("a.png", image)})
    assert (status, body["code"]) == (400, "invalid_input"), body
    assert not _model_dir(doors, "range").exists()


@pytest.mark.parametrize(("zmq_meta", "metas", "status", "code"), [
    ({"x": float("nan")}, '{"x": NaN}', 400, "invalid_input"),
    ({"x": float("inf")}, '{"x": Infinity}', 400, "invalid_input"),
    ({"x": "y" * 70_000}, '{"x": "' + "y" * 70_000 + '"}', 413, "payload_too_large"),
])
def test_metadata_must_be_standard_bounded_json(doors: Doors, zmq_meta: dict[str, Any], metas: str, status: int,
                                               code: str) -> None:
    args = {"role_id": ROLE, "roi_id": "meta", "label": "ok", "image": png_bytes(noise(SIDE)), "filename": "m.png"}
    assert doors.zmq_answer("dataset_upload", {**args, "meta": zmq_meta}) == (status, code)
    got, body = doors.http_answer("POST", "/datasets/ok/upload", data={"role_id": ROLE, "roi_id": "meta",
                                                                      "metas": metas},
                                  files={"images": ("m.png", args["image"], "image/png")})
    assert (got, body["code"]) == (status, code), body
    assert doors.engine.dataset_list(ROLE, "meta").classes["ok"].count == 0


OLD_METADATA = {      # what an older version could store, or a hand edit: each breaks one sample only
    "nan.png": b'{"mm_per_px": NaN}',
    "deep.png": b'{"k":' * 3000 + b"1" + b"}" * 3000,
    "digits.png": b'{"mm_per_px": ' + b"1" * 5000 + b"}",
    "deep_shape_text.png": b'{"shape_json": "' + b"[" * 3000 + b'"}',
    "bad_utf8.png": b'{"mm_per_px": 0.1, "note": "\xff\xfe"}',
    "text_mm.png": b'{"mm_per_px": "abc"}',
    "list.png": b"[1, 2, 3]",
}


def test_stored_samples_of_an_older_version_fail_one_item_each(doors: Doors) -> None:
    engine, roi = doors.engine, "old"
    engine.fit_ok(ROLE, roi, MM, [png_bytes(noise(SIDE, seed=s)) for s in range(3)])
    for i, name in enumerate(["good1.png", "good2.png", *OLD_METADATA]):
        engine.dataset_upload(ROLE, roi, "ok" if i % 2 == 0 else "ng", png_bytes(noise(SIDE, seed=20 + i)), name,
                              {"mm_per_px": MM})
    folder = engine.data_root / "datasets" / ROLE / roi
    for name, content in OLD_METADATA.items():
        (next(folder.glob(f"*/{name}")).with_name(name + ".meta.json")).write_bytes(content)
    for result in (doors.zmq.call("infer_dataset", {"role_id": ROLE, "roi_id": roi}),
                   doors.http_answer("POST", "/infer_dataset", json={"role_id": ROLE, "roi_id": roi})[1]):
        failed = {item["filename"] for item in result["items"] if item["error"]}
        assert failed == set(OLD_METADATA), result
        assert result["n_total"] == 2 + len(OLD_METADATA)
    assert doors.zmq.call("calibrate_dataset", {"role_id": ROLE, "roi_id": roi})["threshold"] > 0
    status, body = doors.http_answer("POST", "/calibrate_dataset", json={"role_id": ROLE, "roi_id": roi})
    assert status == 200, body
    for name in OLD_METADATA:        # the metadata op answers what it can read, {} for the rest
        label = next(folder.glob(f"*/{name}")).parent.name
        status, meta = doors.http_answer("GET", "/datasets/meta", params={"role_id": ROLE, "roi_id": roi,
                                                                          "label": label, "filename": name})
        readable = name in ("deep_shape_text.png", "text_mm.png")
        assert status == 200 and (meta != {}) == readable, (name, str(meta)[:80])
    assert doors.http_answer("GET", "/datasets/list", params={"role_id": ROLE, "roi_id": roi})[0] == 200


# --- no 500 from input: every parse-error class on every route and op ------------------------------------

DEEP_JSON = "[" * 5000 + "]" * 5000
DIGITS = "1" * 5000
# text that reaches a route as a form field, a JSON value, a query value or a header
TEXT_CLASSES = {"deep_json": DEEP_JSON, "digits": DIGITS, "nan": "NaN",
                "deep_object": '{"k":' * 3000 + "1" + "}" * 3000, "rfc2047": "=?utf-8?b?!!!?=",
                "huge_list": "[" + "0," * 300_000 + "0]"}
BAD_BYTES = b"\xff\xfe\xfa\x00\xc3("
RAW_BODIES = {
    "deep_json": DEEP_JSON.encode(),
    "digits": b'{"role_id": "cam1", "roi_id": "a", "mm_per_px": ' + DIGITS.encode() + b', "ok_scores": [1]}',
    "nan": b'{"role_id": "cam1", "roi_id": "a", "mm_per_px": NaN}',
    "bad_utf8": BAD_BYTES,
    "utf16": '{"role_id": "cam1"}'.encode("utf-16"),
    "huge_list": TEXT_CLASSES["huge_list"].encode(),
}
CLIENT_ERRORS = {400, 404, 409, 413, 422, 428}


def _http_routes() -> list[tuple[str, str, set[str]]]:
    """(method, path, fields) of every route of the door, from its routers, plus the docs pages."""
    out: list[tuple[str, str, set[str]]] = [("GET", path, set()) for path in ("/docs", "/openapi.json", "/nope")]
    for route in [*http_routes.router.routes, *http_dataset_routes.router.routes]:
        for method in sorted(getattr(route, "methods", None) or ()):
            if method in ("HEAD", "OPTIONS"):
                continue
            dependant = getattr(route, "dependant", None)
            fields = {p.alias for p in (dependant.query_params + dependant.body_params)} if dependant else set()
            out.append((method, route.path.replace("{label}", "ok"), fields))
    return out


def _http_probes(method: str, path: str, fields: set[str]) -> Iterator[dict[str, Any]]:
    base = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.1", "label": "ok", "filename": "x.png"}
    image = ("a.png", png_bytes(noise(SIDE)), "image/png")
    files = [("images" if "images" in fields else "image", image)] if fields & {"image", "images"} else None
    for field in sorted(fields - {"images", "images[]", "image"}) or ["role_id"]:
        for text in TEXT_CLASSES.values():
            if method == "GET" or method == "DELETE":
                yield {"params": {**base, field: text[:8000]}}
            elif path in ("/calibrate_ng", "/calibrate_dataset", "/infer_dataset"):
                yield {"json": {**base, "mm_per_px": 0.1, "ok_scores": [1.0], field: text}}
            else:
                yield {"data": {**base, field: text}, "files": files}
        if method == "POST" and path not in ("/calibrate_ng", "/calibrate_dataset", "/infer_dataset"):
            yield {"data": base, "files": [*(files or []), (field, (None, BAD_BYTES))]}   # non-UTF-8 field
    if files:
        for name in ("=?utf-8?b?!!!?=", "=?x-unknown?q?a.png?=", "=?utf-8?q?caf=C3=A9.png?=", "=?utf-8?q?good.png?="):
            yield {"data": base, "files": [(files[0][0], (name, image[1], "image/png"))]}
    if path in ("/calibrate_ng", "/calibrate_dataset", "/infer_dataset"):
        for body in RAW_BODIES.values():
            yield {"content": body, "headers": {"Content-Type": "application/json"}}
    yield {"params": {"recipe_id": "%ff"}, "headers": {"X-Recipe-Id": b"\xe9t\xe9\xff"}}


def test_no_parse_error_class_is_a_500_on_any_route(doors: Doors) -> None:
    routes = _http_routes()
    assert len(routes) >= 17
    seen: dict[int, int] = {}
    for method, path, fields in routes:
        for probe in _http_probes(method, path, fields):
            r = doors.web.request(method, path, **probe)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            if r.status_code >= 300:
                assert r.status_code in CLIENT_ERRORS, (method, path, str(probe)[:200], r.text[:300])
                assert r.json()["code"] not in ("internal_error", "http_error"), (method, path, r.text[:300])
    assert seen.get(500, 0) == 0 and sum(seen.values()) > 300, seen
    doors.assert_healthy()


def _hole(args: dict[str, Any], name: str, raw: bytes) -> bytes:
    """A request whose arg ``name`` is the raw msgpack ``raw`` (which msgpack itself would not write)."""
    payload = msgpack.packb({"v": 1, "op": "x", "id": "p", "args": {**args, name: "\x00HOLE\x00"}})
    return payload.replace(msgpack.packb("\x00HOLE\x00"), raw, 1)


ZMQ_CLASSES = {   # raw msgpack values
    "deep_nesting": (b"\x91" * 5000 + b"\xc0", 400, "malformed_message"),
    "huge_list": (b"\xdd" + struct.pack(">I", 300_000) + b"\xc0" * 300_000, 413, "payload_too_large"),
    "invalid_utf8_str": (b"\xa6" + BAD_BYTES, 400, "malformed_message"),
    "map_with_int_keys": (b"\x81\x01\x02", 400, "malformed_message"),
    "ext_type": (b"\xd4\x01\x00", 400, "malformed_message"),
    "big_int": (msgpack.packb(2**64 - 1), None, None),
    "nan": (msgpack.packb(float("nan")), None, None),
    "digits_text": (msgpack.packb(DIGITS), None, None),
    "bin": (msgpack.packb(BAD_BYTES), None, None),
}


def test_no_parse_error_class_is_a_500_on_any_op(doors: Doors) -> None:
    base = {"role_id": ROLE, "roi_id": "fuzz", "mm_per_px": MM, "label": "ok", "filename": "x.png",
            "image": png_bytes(noise(SIDE)), "images": [png_bytes(noise(SIDE))], "ok_scores": [1.0],
            "items": [{"roi_id": ROI, "mm_per_px": MM, "image": png_bytes(noise(SIDE))}]}
    count = 0
    for op in OPS:
        part = OPS[op].part
        method = getattr(getattr(doors.engine, part) if part else doors.engine, op)
        params = [p for p in inspect.signature(method).parameters if p != "progress"]
        args = {p: base[p] for p in params if p in base}
        for name in params or ["role_id"]:
            for raw, status, code in ZMQ_CLASSES.values():
                payload = _hole(args, name, raw).replace(msgpack.packb("x"), msgpack.packb(op), 1)
                reply = doors.zmq_raw(payload, timeout_ms=60_000)
                assert reply is not None, (op, name)
                count += 1
                if reply["ok"]:
                    continue
                assert reply["status"] < 500 and reply["error"]["code"] != "internal_error", (op, name, reply)
                if status is not None:
                    assert (reply["status"], reply["error"]["code"]) == (status, code), (op, name, reply)
    assert count > 400
    doors.assert_healthy()


# --- the smaller ones ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["con .png", "AUX  .png", "com1 .png", "NUL.png", "lpt9.x.png", "Con.PNG",
                                  "prn .  .png"])
def test_windows_device_names_are_refused_on_every_os(doors: Doors, name: str) -> None:
    with pytest.raises(InvalidId):
        check_filename(name)
    image = png_bytes(noise(SIDE))
    assert doors.zmq_answer("dataset_upload", {"role_id": ROLE, "roi_id": "win", "label": "ok", "image": image,
                                               "filename": name}) == (400, "invalid_id")
    for files, metas in (({"image": (name, image)}, None), ({"image": ("ok.png", image)}, f'{{"filename": "{name}"}}')):
        status, body = doors.http_answer("POST", "/datasets/ok/upload", data={"role_id": ROLE, "roi_id": "win",
                                                                             **({"metas": metas} if metas else {})},
                                         files=files)
        assert (status, body["code"]) == (400, "invalid_id"), body
    assert doors.engine.dataset_list(ROLE, "win").classes["ok"].count == 0


def test_a_form_field_over_1_mib_is_413(doors: Doors) -> None:
    status, body = doors.http_answer("POST", "/infer", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.1",
                                                            "shape": " " * (MIB + 10)},
                                     files={"image": ("a.png", png_bytes(noise(SIDE)))})
    assert (status, body["code"]) == (413, "payload_too_large"), body


@pytest.mark.parametrize(("changes", "code"), [
    ({"v": True}, "unsupported_version"), ({"v": 1.0}, "unsupported_version"), ({"v": "1"}, "unsupported_version"),
    ({"id": 7}, "malformed_message"), ({"id": 7.5}, "malformed_message"),
])
def test_zmq_version_and_id_are_typed_as_documented(doors: Doors, changes: dict[str, Any], code: str) -> None:
    reply = doors.zmq_raw(msgpack.packb({"v": 1, "op": "health", "id": "x", **changes}))
    assert reply is not None and (reply["status"], reply["error"]["code"]) == (400, code), reply


def test_one_malformed_raw_item_fails_only_its_item(doors: Doors) -> None:
    good = png_bytes(noise(SIDE))
    bad = {"dtype": "uint8", "shape": [SIDE, SIDE, 3], "data": b"\x00" * 10}       # data too short
    items = [{"roi_id": ROI, "mm_per_px": MM, "image": good}, {"roi_id": ROI, "mm_per_px": MM, "image": bad},
             {"roi_id": ROI, "mm_per_px": MM, "image": good}]
    result = doors.zmq.call("infer_batch", {"role_id": ROLE, "items": items})
    assert result["n_errors"] == 1 and result["items"][1]["error"]["code"] == "invalid_image"
    assert result["items"][0]["result"]["score"] == result["items"][2]["result"]["score"]


def test_a_second_image_part_on_infer_is_refused(doors: Doors) -> None:
    files = [("image", ("a.png", png_bytes(noise(SIDE)), "image/png")),
             ("image", ("b.png", png_bytes(noise(SIDE, seed=1)), "image/png"))]
    status, body = doors.http_answer("POST", "/infer", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.1"},
                                     files=files)
    assert (status, body["code"]) == (400, "invalid_input"), body


@pytest.mark.parametrize("text", ["0.1_0", "0x1p-3", "0,1", " "])
def test_mm_per_px_text_must_be_a_plain_decimal(doors: Doors, text: str) -> None:
    status, body = doors.http_answer("POST", "/infer", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": text},
                                     files={"image": ("a.png", png_bytes(noise(SIDE)))})
    assert (status, body["code"]) == (422, "validation_error"), body
    with pytest.raises(InvalidInput):
        positive_number(text)


def test_a_sample_deleted_during_a_dataset_fit_is_left_out_of_it(doors: Doors) -> None:
    engine, roi = doors.engine, "shrinking"
    # batch size 1 on the CPU, and the extraction reads at most 2 images per worker ahead: the last
    # sample is still unread when the first image's features are in
    count = 2 * engine.settings.fit_workers + 3
    for i in range(count):
        engine.dataset_upload(ROLE, roi, "ok", png_bytes(noise(SIDE, seed=40 + i)), f"s{i}.png")
    last = f"s{count - 1}.png"

    def delete_the_last_one(stage: str, done: int, total: int) -> None:
        if stage == "extract" and done == 1:
            engine.dataset_delete(ROLE, roi, "ok", last)

    fit = engine.fit_ok(ROLE, roi, MM, use_dataset=True, progress=delete_the_last_one)
    assert fit.n_images == count - 1
    sources = engine.manifest(ROLE, roi)["ok_scores"]["sources"]
    assert last not in sources and set(sources) <= {f"s{i}.png" for i in range(count - 1)}


# --- out of descriptors ---------------------------------------------------------------------------------

_OUT_OF_FILES = r"""
import asyncio, resource, socket, sys
sys.path.insert(0, sys.argv[1])
from http_compat.connections import SheddingListener

resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
listener = SheddingListener(socket.create_server(("127.0.0.1", 0), backlog=512))
print(listener.getsockname()[1], flush=True)
held = []

class Hold(asyncio.Protocol):          # keeps every connection: the process soon has no descriptor left
    def connection_made(self, transport):
        held.append(transport)

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Hold, sock=listener, backlog=512)   # asyncio listens again: 100 by default
    await loop.run_in_executor(None, sys.stdin.readline)     # until the test has looked
    print("held", len(held), "shed", listener.shed, flush=True)
    server.close()

asyncio.run(main())
"""


def _was_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_out_of_descriptors_the_listener_sheds_connections_and_logs_once() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _OUT_OF_FILES, str(REPO)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    port = int(proc.stdout.readline())
    clients = _connect_idle(port, 300)
    # a connect the kernel could not queue at once is retried after 1, 3, 7, 15 s: wait long enough
    open_ones, deadline = list(clients), time.monotonic() + 45
    try:
        while len(open_ones) > 64 and time.monotonic() < deadline:     # at most 64 descriptors: the rest shed
            time.sleep(0.2)
            open_ones = [c for c in open_ones if not _was_closed(c)]
        closed = 300 - len(open_ones)
        proc.stdin.write("look\n")              # counted while every client is still connected
        proc.stdin.flush()
        lines = []
        while not (lines and lines[-1].startswith("held")):
            lines.append(proc.stdout.readline())
    finally:
        for c in clients:
            c.close()
    out = "".join(lines) + proc.communicate(timeout=30)[0]
    held, shed = (int(v) for v in lines[-1].split()[1::2])
    assert held < 64 and shed >= 300 - 64 and closed >= 300 - 64, out[-2000:]
    assert held + shed == 300
    assert out.count("http_out_of_descriptors") == 1, out[-2000:]       # one line per 10 s, not one per attempt
    assert "out of system resource" not in out
