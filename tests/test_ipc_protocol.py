"""The ZeroMQ door's protocol over real loopback sockets: framing, refusals, auth, limits, restarts.

No fitted model is needed here; tests/test_ipc_engine.py runs every op on real images.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from pydantic import SecretStr

import ipc
from engine.api import Engine
from engine.errors import InvalidImage
from ipc import EngineClient, EngineUnavailable, IpcServer, RemoteError, array_from_wire, array_to_wire
from ipc.protocol import image_from_wire
from service.serve import ServeConfig

LOOPBACK = "tcp://127.0.0.1:*"
StartServer = Callable[..., IpcServer]


@pytest.fixture(scope="module")
def base_settings(tmp_path_factory: pytest.TempPathFactory) -> ServeConfig:
    return ServeConfig.of(data_root=tmp_path_factory.mktemp("ipc_protocol"), input_size=128,
                    backbone="efficientnet_lite0", coreset_ratio=0.1, zmq_endpoint=LOOPBACK, zmq_workers=2)


@pytest.fixture(scope="module")
def engine(base_settings: ServeConfig) -> Iterator[Engine]:
    eng = Engine(base_settings.engine)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def start_server(engine: Engine, base_settings: ServeConfig) -> Iterator[StartServer]:
    """Start an IpcServer on the shared engine with some settings changed; all stopped at the end."""
    servers: list[IpcServer] = []

    def start(**changes: Any) -> IpcServer:
        srv = IpcServer(engine, base_settings.ipc.model_copy(update=changes))
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop(timeout=5)


@pytest.fixture(scope="module")
def server(start_server: StartServer) -> IpcServer:
    return start_server()


@pytest.fixture
def client(server: IpcServer) -> Iterator[EngineClient]:
    with EngineClient(server.endpoint, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.term()


def _exchange(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, frames: list[bytes],
              kind: int = zmq.REQ, timeout_ms: int = 5000) -> list[bytes] | None:
    """Send raw frames on a fresh socket; the reply frames, or None if none came in time."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms, zmq.POLLIN):
            return None
        return sock.recv_multipart()
    finally:
        sock.close(linger=0)


def _raw_reply(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, payload: bytes) -> dict[str, Any]:
    frames = _exchange(ctx, endpoint, [payload])
    assert frames is not None, "the server did not reply"
    assert len(frames) == 1
    reply = msgpack.unpackb(frames[0])
    assert isinstance(reply, dict)
    return reply


def _request(op: str, args: dict[str, Any] | None = None, **extra: Any) -> bytes:
    return msgpack.packb({"v": 1, "op": op, "id": "r1", "args": args or {}, **extra})


def _assert_error(reply: dict[str, Any], status: int, code: str) -> None:
    assert reply["v"] == 1
    assert reply["ok"] is False, reply
    assert (reply["status"], reply["error"]["code"]) == (status, code), reply
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]


def _ipc_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("ipc-")}


# -- package surface -----------------------------------------------------------------------------


def test_all_lists_the_public_names() -> None:
    public = {n for n in vars(ipc) if not n.startswith("_")} - {"client", "errors", "protocol", "server", "settings"}
    assert set(ipc.__all__) == public


# -- framing and refusals ------------------------------------------------------------------------


def test_health_round_trip_echoes_id(server: IpcServer, zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    reply = _raw_reply(zctx, server.endpoint, _request("health"))
    assert reply["ok"] is True and reply["id"] == "r1" and reply["v"] == 1
    assert reply["result"]["status"]


def test_endpoint_resolves_the_random_port(server: IpcServer) -> None:
    assert server.endpoint.startswith("tcp://127.0.0.1:")
    assert int(server.endpoint.rsplit(":", 1)[1]) > 0
    assert server.events_endpoint is None


def test_malformed_msgpack_gets_400(server: IpcServer, zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    for garbage in (b"\xc1", b"", msgpack.packb({"v": 1}) + b"trailing", b"\x92\x01"):
        reply = _raw_reply(zctx, server.endpoint, garbage)
        _assert_error(reply, 400, "malformed_message")
        assert reply["id"] is None


def test_non_map_gets_400(server: IpcServer, zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    for obj in ([1, 2], "health", 7, None):
        _assert_error(_raw_reply(zctx, server.endpoint, msgpack.packb(obj)), 400, "malformed_message")


def test_unknown_top_level_key_gets_400(server: IpcServer, zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    reply = _raw_reply(zctx, server.endpoint, _request("health", arg={}))
    _assert_error(reply, 400, "malformed_message")
    assert reply["id"] == "r1"


def test_unknown_op_gets_400(server: IpcServer, zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    for op in ("fit", "__init__", "close", 3):
        _assert_error(_raw_reply(zctx, server.endpoint, _request(op)), 400, "unknown_op")  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_protocol_version_mismatch_is_clear(server: IpcServer, zctx: zmq.Context[zmq.Socket[bytes]],
                                            version: Any) -> None:
    payload = msgpack.packb({"v": version, "op": "health", "id": "r1", "args": {}})
    reply = _raw_reply(zctx, server.endpoint, payload)
    _assert_error(reply, 400, "unsupported_version")
    assert "v1" in reply["error"]["message"]


def test_missing_version_is_a_mismatch(server: IpcServer, zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    reply = _raw_reply(zctx, server.endpoint, msgpack.packb({"op": "health", "id": "r1"}))
    _assert_error(reply, 400, "unsupported_version")


@pytest.mark.parametrize(
    ("op", "args", "fragment"),
    [
        ("state", {"role_id": "a"}, "roi_id"),                                      # missing
        ("state", {"role_id": "a", "roi_id": "b", "colour": "red"}, "colour"),     # unknown
        ("state", {"role_id": 1, "roi_id": "b"}, "role_id"),                        # wrong type
        ("infer", {"role_id": "a", "roi_id": "b", "mm_per_px": "0.1", "image": b"x"}, "mm_per_px"),
        ("infer", {"role_id": "a", "roi_id": "b", "mm_per_px": True, "image": b"x"}, "mm_per_px"),
        ("infer", {"role_id": "a", "roi_id": "b", "mm_per_px": 0.1, "image": "x.png"}, "image"),
        ("infer", {"role_id": "a", "roi_id": "b", "mm_per_px": 0.1, "image": b"x", "heatmap": "jpeg"}, "heatmap"),
        ("calibrate_ng", {"role_id": "a", "roi_id": "b", "mm_per_px": 0.1, "ok_scores": "1,2"}, "ok_scores"),
        ("fit_ok", {"role_id": "a", "roi_id": "b", "mm_per_px": 0.1, "images": [b"x", 3]}, "images"),
        ("dataset_upload", {"role_id": "a", "roi_id": "b", "label": "maybe", "image": b"x"}, "label"),
        ("fit_ok", {"role_id": "a", "roi_id": "b", "mm_per_px": 0.1, "progress": "x"}, "progress"),
    ],
)
def test_bad_args_get_400_invalid_args(client: EngineClient, op: str, args: dict[str, Any], fragment: str) -> None:
    with pytest.raises(RemoteError) as info:
        client.call(op, args)
    assert (info.value.status, info.value.code) == (400, "invalid_args")
    assert fragment in info.value.message


def test_args_must_be_a_map(server: IpcServer, zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    reply = _raw_reply(zctx, server.endpoint, msgpack.packb({"v": 1, "op": "health", "id": "r1", "args": [1]}))
    _assert_error(reply, 400, "invalid_args")


def test_dealer_with_extra_frames_gets_an_answer(server: IpcServer, zctx: zmq.Context[zmq.Socket[bytes]],
                                                 client: EngineClient) -> None:
    frames = _exchange(zctx, server.endpoint, [b"", _request("health"), b"extra"], kind=zmq.DEALER)
    assert frames is not None and frames[0] == b""
    _assert_error(msgpack.unpackb(frames[1]), 400, "malformed_message")
    # a DEALER without the empty delimiter is answered the same way it asked
    frames = _exchange(zctx, server.endpoint, [_request("health")], kind=zmq.DEALER)
    assert frames is not None and len(frames) == 1 and msgpack.unpackb(frames[0])["ok"] is True
    assert client.health().status


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(
    st.binary(max_size=256),
    st.dictionaries(st.text(max_size=5), st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=5),
                                                   st.binary(max_size=8)), max_size=5).map(msgpack.packb),
))
def test_garbage_always_gets_a_refusal(server: IpcServer, zctx: zmq.Context[zmq.Socket[bytes]],
                                       payload: bytes) -> None:
    reply = _raw_reply(zctx, server.endpoint, payload)
    assert reply["ok"] is False and 400 <= reply["status"] < 500


def test_client_vanishing_mid_request_does_not_hurt_others(
    server: IpcServer, zctx: zmq.Context[zmq.Socket[bytes]], client: EngineClient
) -> None:
    for _ in range(5):
        sock = zctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        sock.send(_request("state", {"role_id": "gone", "roi_id": "r"}))
        sock.close(linger=0)
    assert client.health().status


def test_unexpected_engine_failure_is_500_and_the_server_lives(
    base_settings: ServeConfig, zctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    class _BrokenState(Engine):
        # the real engine with one method broken on purpose: only the door's error mapping is tested
        def state(self, role_id: str, roi_id: str, *, recipe_id: str | None = None) -> Any:
            raise RuntimeError("disk on fire")

    eng = _BrokenState(base_settings.engine)
    srv = IpcServer(eng, base_settings.ipc)
    srv.start()
    try:
        with EngineClient(srv.endpoint, timeout=10) as c:
            with pytest.raises(RemoteError) as info:
                c.state("a", "b")
            assert (info.value.status, info.value.code) == (500, "internal_error")
            assert "disk on fire" not in info.value.message      # short message, details in the log
            assert c.health().status
    finally:
        srv.stop(timeout=5)
        eng.close()


# -- images on the wire --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        {"data": b"\x00" * 11, "shape": [2, 2, 3], "dtype": "uint8"},          # wrong length
        {"data": b"\x00" * 16, "shape": [2, 2, 2], "dtype": "uint8"},          # c = 2
        {"data": b"\x00" * 48, "shape": [2, 2, 3], "dtype": "float32"},        # dtype
        {"data": b"\x00" * 8, "shape": [2, 2, 1, 2], "dtype": "uint8"},        # 4 dims
        {"data": b"\x00" * 4, "shape": [4], "dtype": "uint8"},                 # 1 dim
        {"data": b"\x00" * 4, "shape": [2, 2], "dtype": "uint8", "x": 1},      # extra key
        {"data": "text", "shape": [2, 2], "dtype": "uint8"},                   # data not bytes
        {"data": b"", "shape": [0, 2], "dtype": "uint8"},                      # empty
    ],
)
def test_bad_raw_buffer_gets_400_invalid_image(client: EngineClient, image: dict[str, Any]) -> None:
    with pytest.raises(RemoteError) as info:
        client.call("infer", {"role_id": "a", "roi_id": "b", "mm_per_px": 0.1, "image": image})
    assert (info.value.status, info.value.code) == (400, "invalid_image")


@hsettings(max_examples=50, deadline=None)
@given(
    shape=st.lists(st.integers(1, 7), min_size=2, max_size=3).map(tuple),
    dtype=st.sampled_from(["uint8", "uint16", "float32"]),
    seed=st.integers(0, 2**16),
)
def test_array_round_trips_without_copy(shape: tuple[int, ...], dtype: str, seed: int) -> None:
    arr = (np.random.default_rng(seed).random(shape) * 200).astype(dtype)
    wire = msgpack.unpackb(msgpack.packb(array_to_wire(arr)))
    back = array_from_wire(wire)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_image_from_wire_keeps_encoded_bytes_and_checks_channels() -> None:
    assert image_from_wire(b"\x89PNG") == b"\x89PNG"
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(image_from_wire(array_to_wire(arr)), arr)
    with pytest.raises(InvalidImage):
        image_from_wire(array_to_wire(np.zeros((2, 3, 5), np.uint8)))


# -- auth, limits, binding -----------------------------------------------------------------------


def test_api_key_is_required_when_set(start_server: StartServer) -> None:
    srv = start_server(api_key=SecretStr("s3cret"))
    for key in (None, "wrong", "s3cret "):
        with EngineClient(srv.endpoint, api_key=key, timeout=10) as c:
            with pytest.raises(RemoteError) as info:
                c.health()
            assert (info.value.status, info.value.code) == (401, "unauthorized")
            with pytest.raises(RemoteError) as info:
                c.state("a", "b")
            assert info.value.status == 401
    with EngineClient(srv.endpoint, api_key="s3cret", timeout=10) as c:
        assert c.health().status


def test_oversize_messages(start_server: StartServer) -> None:
    srv = start_server(zmq_max_message_bytes=1 << 20, max_request_bytes=256 << 10)
    args = {"role_id": "a", "roi_id": "b", "mm_per_px": 0.1}
    with EngineClient(srv.endpoint, timeout=2, retries=0) as c, EngineClient(srv.endpoint, timeout=10) as other:
        # above the in-code limit, below the socket cap: answered
        with pytest.raises(RemoteError) as info:
            c.infer(**args, image=b"\x00" * (512 << 10))
        assert (info.value.status, info.value.code) == (413, "payload_too_large")
        # above ZMQ_MAXMSGSIZE: libzmq drops it and the sender's connection, so no reply comes
        with pytest.raises(EngineUnavailable):
            c.infer(**args, image=b"\x00" * (2 << 20))
        assert other.health().status          # the others were not disturbed
        assert c.health().status              # nor the sender, once it reconnected


def test_non_loopback_bind_needs_allow_remote(engine: Engine, base_settings: ServeConfig) -> None:
    before = _ipc_threads()
    for endpoint in ("tcp://0.0.0.0:*", "tcp://*:*", "tcp://192.168.1.10:5555", "tcp://eth0:5555"):
        srv = IpcServer(engine, base_settings.ipc.model_copy(update={"zmq_endpoint": endpoint}))
        with pytest.raises(ValueError, match="allow_remote|ALLOW_REMOTE"):
            srv.start()
    srv = IpcServer(engine, base_settings.ipc.model_copy(update={"zmq_events": "tcp://0.0.0.0:*"}))
    with pytest.raises(ValueError):
        srv.start()
    assert _ipc_threads() == before


def test_endpoint_in_use_is_an_oserror(engine: Engine, base_settings: ServeConfig, server: IpcServer) -> None:
    before = _ipc_threads()
    clash = IpcServer(engine, base_settings.ipc.model_copy(update={"zmq_endpoint": server.endpoint}))
    with pytest.raises(OSError, match="cannot bind"):
        clash.start()
    assert _ipc_threads() == before
    with pytest.raises(RuntimeError):
        _ = clash.endpoint


def test_bad_client_endpoint_is_a_valueerror() -> None:
    with EngineClient("nonsense://x", timeout=1) as c:
        with pytest.raises(ValueError, match="cannot connect"):
            c.health()


def test_ipc_path_endpoint(start_server: StartServer, tmp_path: Path) -> None:
    srv = start_server(zmq_endpoint=f"ipc://{tmp_path}/engine.sock")
    assert srv.endpoint == f"ipc://{tmp_path}/engine.sock"
    with EngineClient(srv.endpoint, timeout=10) as c:
        assert c.health().status


# -- lifecycle -----------------------------------------------------------------------------------


def test_stop_closes_and_joins_everything(engine: Engine, base_settings: ServeConfig) -> None:
    before = set(_ipc_threads())
    srv = IpcServer(engine, base_settings.ipc.model_copy(update={"zmq_events": LOOPBACK, "zmq_workers": 3}))
    srv.start()
    assert len(_ipc_threads()) == len(before) + 5          # front, 3 workers, events
    srv.stop(timeout=5)
    assert _ipc_threads() == before
    srv.stop()                                             # twice is harmless


def test_timeout_then_recovery_across_a_restart(engine: Engine, base_settings: ServeConfig) -> None:
    first = IpcServer(engine, base_settings.ipc)
    first.start()
    endpoint = first.endpoint                              # the random port, kept for the restart
    with EngineClient(endpoint, timeout=0.5, retries=1) as c:
        assert c.health().status
        first.stop(timeout=5)
        t0 = time.monotonic()
        with pytest.raises(EngineUnavailable):
            c.health()
        assert time.monotonic() - t0 < 3                   # 2 attempts x 0.5 s, no hang
        with pytest.raises(EngineUnavailable):             # not idempotent: one attempt, no retry
            c.delete_model("a", "b")
        second = IpcServer(engine, base_settings.ipc.model_copy(update={"zmq_endpoint": endpoint}))
        second.start()
        try:
            assert second.endpoint == endpoint
            c.timeout = 10
            assert c.health().status
        finally:
            second.stop(timeout=5)


def test_client_close_is_idempotent_and_final(server: IpcServer) -> None:
    c = EngineClient(server.endpoint, timeout=5)
    assert c.health().status
    c.close()
    c.close()
    with pytest.raises(RuntimeError):
        c.health()
