"""The pieces behind the request budgets, on their own: bounded JSON, structure checks, the memory
budget, image headers, the ZeroMQ peer ledger, the log throttle, the origin rules."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from engine.budget import MemoryBudget
from engine.errors import PayloadTooLarge, ServerBusy
from engine.images import ImageLimits, probe
from engine.limits import ValueRefused, check_structure, parse_json
from engine.logs import LogThrottle
from http_compat.connections import ConnectionGuard
from http_compat.origin import host_allowed, host_name, origin_allowed
from ipc.backpressure import PeerLedger
from tests.support import encoded, noise, png_bytes, png_header_only

# --- JSON and structure ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "too_large", "syntax"), [
    ("[" * 5000 + "]" * 5000, True, False),          # more brackets than items allowed: refused unread
    ('{"k":' * 40 + "1" + "}" * 40, False, False),  # deeper than 32
    ("1" * 5000, False, False),                      # int digit limit
    ('{"x": NaN}', False, False),
    ('{"x": -Infinity}', False, False),
    ('{"x": 1e400}', False, False),
    (b"\xff\xfe\xfa", False, False),
    ('{"x": ', False, True),
    ("[" + "0," * 2000 + "0]", True, False),
])
def test_parse_json_refuses_each_class_with_its_kind(text: str | bytes, too_large: bool, syntax: bool) -> None:
    with pytest.raises(ValueRefused) as info:
        parse_json(text, max_depth=32, max_items=1000)
    assert (info.value.too_large, info.value.syntax) == (too_large, syntax), info.value


def test_parse_json_reads_standard_json_within_bounds() -> None:
    nested: object = 1
    for _ in range(31):
        nested = [nested]
    assert parse_json('{"a": [1, 2.5, "x", null, true]}', max_depth=32, max_items=100) == \
        {"a": [1, 2.5, "x", None, True]}
    assert parse_json(str(nested).replace(" ", ""), max_depth=32, max_items=100) == nested


def test_check_structure_counts_items_and_depth_without_recursion() -> None:
    deep: object = []
    for _ in range(100_000):                    # far past the recursion limit
        deep = [deep]
    with pytest.raises(ValueRefused) as info:
        check_structure(deep, max_depth=32, max_items=10**9)
    assert not info.value.too_large
    with pytest.raises(ValueRefused) as info:
        check_structure({"a": list(range(200))}, max_depth=32, max_items=100)
    assert info.value.too_large
    check_structure({"a": [[1, 2], {"b": 3}]}, max_depth=3, max_items=10)
    check_structure("not a container", max_depth=1, max_items=1)


# --- the memory budget ---------------------------------------------------------------------------------

def test_the_budget_queues_refuses_and_releases() -> None:
    budget = MemoryBudget(100, wait_s=0.3)
    with pytest.raises(PayloadTooLarge):
        with budget.hold(101):
            pass
    order: list[str] = []
    with budget.hold(80):
        waiter = threading.Thread(target=lambda: _hold_and_note(budget, 50, order))
        waiter.start()
        time.sleep(0.1)
        order.append("first done")
    waiter.join(5)
    assert order == ["first done", "second held"] and budget.used == 0
    with budget.hold(80):
        start = time.monotonic()
        with pytest.raises(ServerBusy):
            with budget.hold(50):
                pass
        assert 0.25 < time.monotonic() - start < 2.0
    assert budget.used == 0


def _hold_and_note(budget: MemoryBudget, nbytes: int, order: list[str]) -> None:
    with budget.hold(nbytes):
        order.append("second held")


# --- image headers --------------------------------------------------------------------------------------

def test_probe_reads_decoded_size_from_the_header() -> None:
    header = probe(png_header_only(8000, 8000))
    assert header is not None and (header.width, header.height, header.channels, header.sample_bytes) == \
        (8000, 8000, 3, 1)
    rgba16 = probe(png_bytes(np.zeros((10, 12, 4), np.uint16)))
    assert rgba16 is not None and rgba16.decoded_bytes == 10 * 12 * 4 * 2
    jpeg = probe(encoded(noise(16), ".jpg"))
    assert jpeg is not None and (jpeg.width, jpeg.channels) == (16, 3)
    assert probe(np.zeros((5, 6), np.uint16)) is not None and probe(b"not an image" * 5) is None
    limits = ImageLimits(max_bytes=10**9, max_pixels=10**9, max_decoded_bytes=500)     # 16x16x3 = 768
    assert limits.working_bytes(png_bytes(noise(16)), per_pixel=32) == 0          # refused at decode anyway
    with pytest.raises(PayloadTooLarge):
        limits.decode(png_bytes(noise(16)))
    small = ImageLimits(max_bytes=10**9, max_pixels=10**9, max_decoded_bytes=10**9)
    assert small.working_bytes(png_bytes(noise(16)), per_pixel=32) == 16 * 16 * (3 + 6 + 32)


# --- the ZeroMQ peer ledger ------------------------------------------------------------------------------

class _Tracker:
    def __init__(self) -> None:
        self.done = False


def test_peer_ledger_caps_pending_unread_and_inflight() -> None:
    ledger = PeerLedger(max_pending=2, max_unread_bytes=100, max_inflight_bytes=1000)
    assert ledger.admit(b"a", 10) is None and ledger.admit(b"a", 10) is None
    assert ledger.admit(b"a", 10) is not None                       # two in progress already
    assert ledger.admit(b"b", 10) is None                           # another client is not affected
    ledger.answered(b"a", 10)
    tracker = _Tracker()
    ledger.sent(b"a", tracker, 150)                                # type: ignore[arg-type]
    assert not ledger.may_send(b"a") and ledger.admit(b"a", 10) is not None
    tracker.done = True                                            # libzmq let the reply go
    assert ledger.may_send(b"a") and ledger.admit(b"a", 10) is None
    assert ledger.admit(b"c", 990) is not None                     # 30 bytes in flight + 990 > 1000
    for peer in (b"a", b"a", b"b"):
        ledger.answered(peer, 10)
    ledger.sweep()
    assert ledger.peers() == 0 and ledger.inflight_bytes == 0
    assert ledger.admit(b"c", 5000) is None                        # alone, a large request always fits


def test_a_real_tracker_reports_when_libzmq_has_sent() -> None:
    ctx = zmq.Context()
    try:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        tracker = push.send(b"x" * 200_000, copy=False, track=True)
        assert pull.recv() == b"x" * 200_000
        tracker.wait(5)
        assert tracker.done
    finally:
        ctx.destroy(linger=0)


# --- log throttle and origin rules ---------------------------------------------------------------------

def test_log_throttle_lets_one_line_through_per_interval_and_counts_the_rest() -> None:
    throttle = LogThrottle(0.2)
    assert throttle.due() == 0
    assert [throttle.due() for _ in range(50)] == [None] * 50
    time.sleep(0.25)
    assert throttle.due() == 50


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1:8000", True), ("localhost", True), ("[::1]:8000", True), ("app.localhost", True),
    ("127.9.9.9", True), ("evil.example", False), ("127.0.0.1.nip.io", False), ("", False), (None, True),
    ("plant-pc:8000", True), ("PLANT-PC", True),
])
def test_host_rules(host: str | None, allowed: bool) -> None:
    assert host_allowed(host, ["plant-pc"]) is allowed


def test_origin_rules() -> None:
    rules = {"own_port": 8000, "allowed_hosts": ["plant-pc"], "allowed_origins": ["http://gui.plant:8080"]}
    assert origin_allowed("http://127.0.0.1:8000", **rules)               # type: ignore[arg-type]
    assert origin_allowed("http://plant-pc:8000", **rules)                # type: ignore[arg-type]
    assert origin_allowed("http://gui.plant:8080/", **rules)              # type: ignore[arg-type]
    for origin in ("http://evil.example", "null", "http://localhost:3000", "http://127.0.0.1:8000.evil.example",
                   "file://", "http://127.0.0.1:99999"):
        assert not origin_allowed(origin, **rules), origin                 # type: ignore[arg-type]
    assert host_name("[::1]:80") == "::1" and host_name("Example.COM.") == "example.com"


# --- the REST connection cap ----------------------------------------------------------------------------

class _Conn:
    def __init__(self, name: str) -> None:
        self.name, self.closed = name, False

    def close_quietly(self) -> None:
        self.closed = True


def test_the_connection_cap_closes_bare_connections_before_kept_alive_ones() -> None:
    guard = ConnectionGuard(3, header_timeout_s=10)
    gui, bare1, bare2 = _Conn("gui"), _Conn("bare1"), _Conn("bare2")
    for conn in (gui, bare1, bare2):
        assert guard.admit(conn)                                   # type: ignore[arg-type]
    guard.busy(gui)                                                # type: ignore[arg-type]
    guard.idle(gui)                                                # served a request: kept alive
    newcomers = [_Conn(f"new{i}") for i in range(3)]
    for conn in newcomers:
        assert guard.admit(conn)                                   # type: ignore[arg-type]
    assert bare1.closed and bare2.closed and newcomers[0].closed and not gui.closed   # the GUI's survives
    assert len(guard) == 3 and guard.evicted == 3
    for conn in (gui, *newcomers[1:]):
        guard.busy(conn)                                           # type: ignore[arg-type]
    refused = _Conn("refused")
    assert not guard.admit(refused) and guard.refused == 1         # type: ignore[arg-type]
