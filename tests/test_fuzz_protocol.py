"""Property-based fuzzing of the ZeroMQ door's message decoding and request validation.

* ``ipc.protocol``: ``unpack`` reads what msgpack reads, or raises ValueError (cut or padded
  messages, non-text map keys included); ``pack`` round-trips exactly; ``array_from_wire`` raises
  only ValueError, ``image_from_wire`` only InvalidImage, whatever the bytes or maps.
* ``IpcServer``'s request path (parse, check, bind args, call the engine) on arbitrary msgpack maps,
  near-valid requests included: always a reply map, never ``internal_error``.

``FUZZ_EXAMPLES`` sets the number of examples per test (default 200).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from engine.api import Engine
from engine.errors import InvalidImage
from engine.lifecycle import Lifecycle
from engine.monitor import Monitor
from ipc.protocol import OPS, array_from_wire, image_from_wire, pack, unpack
from ipc.server import IpcServer, _Job
from service.serve import ServeConfig
from tests.support import noise, png_bytes

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
# no subnormal floats: the engine flushes denormals to zero (engine.features, for CPU speed), and
# hypothesis refuses to generate them once that processor flag is set
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# what msgpack can carry (ints within 64 bits, text and bin kept apart)
FLOATS = st.floats(allow_subnormal=False)
SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | FLOATS | st.text(max_size=20)
           | st.binary(max_size=40))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)

_OK = png_bytes(noise(16))
RAW_BUFFERS = st.fixed_dictionaries({
    "dtype": st.sampled_from(["uint8", "uint16", "float32", "int64", "<u2", ""]) | st.text(max_size=6),
    "shape": st.lists(st.integers(-2, 20) | st.booleans() | st.floats(0, 5, allow_subnormal=False)
                      | st.text(max_size=2), max_size=4) | SCALARS,
    "data": st.binary(max_size=1300) | SCALARS,
}, optional={"extra": SCALARS})
IMAGES = st.sampled_from([_OK, _OK[:40], b"", b"\x89PNG\r\n\x1a\n"]) | RAW_BUFFERS | VALUES
IDS = st.sampled_from(["cam1", "a", "../x", "a/b", "", "con", "x" * 200, "é"]) | SCALARS
NUMBERS = FLOATS | st.integers(-(2**63), 2**64 - 1) | st.sampled_from([0.1, "0.1", True, None])
SHAPES = (st.sampled_from(['{"kind": "circle", "cx": 8, "cy": 8, "r": 4}', "{", "[]", "null"])
          | st.fixed_dictionaries({"kind": st.sampled_from(["rect", "circle", "annulus", "x"])},
                                  optional={k: NUMBERS for k in ("x", "y", "w", "h", "cx", "cy", "r", "r_inner")})
          | VALUES)

# a likely value for each argument name the engine's methods take, mixed with anything at all
BY_NAME: dict[str, st.SearchStrategy[Any]] = {
    "role_id": IDS, "roi_id": IDS, "recipe_id": IDS, "filename": IDS, "operator_id": IDS,
    "mm_per_px": NUMBERS, "default_mm_per_px": NUMBERS, "score_percentile": NUMBERS, "area_mm2_thr": NUMBERS,
    "image": IMAGES, "images": st.lists(IMAGES, max_size=3) | IMAGES, "shape": SHAPES,
    "ok_scores": st.lists(NUMBERS, max_size=4) | VALUES, "ng_scores": st.lists(NUMBERS, max_size=4) | VALUES,
    "label": st.sampled_from(["ok", "ng", "OK", "../ok"]) | SCALARS,
    "heatmap": st.sampled_from(["png", "uint8", "float32", "none", "jpeg"]) | SCALARS,
    "items": st.lists(st.fixed_dictionaries({}, optional={"roi_id": IDS, "image": IMAGES, "mm_per_px": NUMBERS,
                                                          "shape": SHAPES, "bogus": SCALARS}) | VALUES, max_size=3),
    "meta": st.dictionaries(st.text(max_size=6), VALUES, max_size=3) | VALUES,
}


def _params(op: str) -> list[str]:
    owner = {"lifecycle": Lifecycle, "monitor": Monitor}.get(OPS[op].part or "", Engine)
    return [p for p in inspect.signature(getattr(owner, op)).parameters if p not in ("self", "progress")]


@st.composite
def requests(draw: st.DrawFn) -> dict[Any, Any]:
    op = draw(st.sampled_from(sorted(OPS)) | st.text(max_size=12) | SCALARS)
    names = _params(op) if isinstance(op, str) and op in OPS else []
    args: dict[Any, Any] = {}
    for name in names:
        if draw(st.integers(0, 3)):               # most args present, some missing
            args[name] = draw(BY_NAME.get(name, VALUES) | VALUES if draw(st.integers(0, 9)) == 0
                              else BY_NAME.get(name, VALUES))
    args.update(draw(st.dictionaries(st.text(max_size=8), VALUES, max_size=2 if draw(st.booleans()) else 0)))
    msg: dict[Any, Any] = {"v": draw(st.sampled_from([1, 1, 1, 1, 2, 0, "1", None])), "op": op,
                           "id": draw(st.text(max_size=8) | st.integers(-5, 5) | SCALARS),
                           "args": args if draw(st.integers(0, 9)) else draw(VALUES)}
    for key in draw(st.sets(st.sampled_from(["v", "op", "id", "args"]), max_size=1)):
        del msg[key]
    msg.update(draw(st.dictionaries(st.sampled_from(["api_key", "extra", "progress"]), SCALARS, max_size=1)))
    return msg


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IpcServer]:
    """An IpcServer that is never started: requests go straight to its request path."""
    config = ServeConfig.of(data_root=tmp_path_factory.mktemp("fuzz_ipc"), backbone="efficientnet_lite0",
                            input_size=32, device="cpu", log_level="WARNING", zmq_endpoint="tcp://127.0.0.1:*")
    engine = Engine(config.engine)
    rng = np.random.default_rng(1)
    engine.fit_ok("cam1", "a", 0.1, [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)])
    engine.calibrate_ng("cam1", "a", 0.1, [1.0])
    yield IpcServer(engine, config.ipc)
    engine.close()


def _serve_one(server: IpcServer, payload: bytes) -> dict[str, Any]:
    reply = server._handle(_Job(envelope=[b"peer", b""], frame=zmq.Frame(payload), msg=None))
    decoded = unpack(server._pack(reply))          # the reply always packs
    assert isinstance(decoded, dict) and decoded["v"] == 1 and isinstance(decoded["ok"], bool)
    if not decoded["ok"]:
        assert decoded["error"]["code"] != "internal_error", decoded
        assert decoded["status"] in (400, 401, 404, 409, 413, 428, 500, 503, 507), decoded
        assert isinstance(decoded["error"]["message"], str) and decoded["error"]["message"]
    return decoded


@FUZZ
@given(msg=requests())
def test_near_valid_requests_never_fail_inside(server: IpcServer, msg: dict[Any, Any]) -> None:
    _serve_one(server, msgpack.packb(msg, use_bin_type=True))


@FUZZ
@given(msg=st.dictionaries(st.text(max_size=6) | st.binary(max_size=4), VALUES, max_size=6) | VALUES)
def test_arbitrary_maps_are_refused_cleanly(server: IpcServer, msg: Any) -> None:
    reply = _serve_one(server, msgpack.packb(msg, use_bin_type=True))
    if not isinstance(msg, dict) or msg.get("v") != 1:
        assert reply["ok"] is False and reply["status"] == 400


@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_are_refused_cleanly(server: IpcServer, data: bytes) -> None:
    _serve_one(server, data)


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down (NaN equals NaN, True is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _packb(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# random bytes, real messages, and messages whose map keys are not text (valid msgpack, refused here)
NON_TEXT_KEYS = st.integers(-5, 5) | st.booleans() | st.floats(0, 1, allow_subnormal=False)
WIRE_BYTES = (st.binary(max_size=200) | VALUES.map(_packb)
              | st.dictionaries(NON_TEXT_KEYS, SCALARS, min_size=1, max_size=3).map(_packb))


@FUZZ
@given(data=WIRE_BYTES)
def test_unpack_reads_what_msgpack_reads_or_raises_value_error(data: bytes) -> None:
    try:
        expected = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # whatever msgpack raises, unpack must turn it into a ValueError
        with pytest.raises(ValueError, match=r"^not a msgpack message \(") as info:
            unpack(data)
        assert type(exc).__name__ in str(info.value) and info.value.__cause__ is not None
    else:
        assert _same(unpack(data), expected), (data, expected)


@FUZZ
@given(value=VALUES, cut=st.integers(1, 64), extra=st.binary(min_size=1, max_size=8))
def test_pack_unpack_round_trip_and_framing(value: Any, cut: int, extra: bytes) -> None:
    """One message is exactly one value: a proper prefix or trailing bytes are refused."""
    data = pack(value)
    assert _same(unpack(data), value), (value, data)
    with pytest.raises(ValueError, match="not a msgpack message"):
        unpack(data[: max(0, len(data) - cut)])
    with pytest.raises(ValueError, match="not a msgpack message"):
        unpack(data + extra)


@FUZZ
@given(obj=RAW_BUFFERS | VALUES)
def test_wire_arrays_raise_only_typed_errors(obj: Any) -> None:
    try:
        arr = array_from_wire(obj)
    except ValueError:
        pass
    else:
        assert arr.dtype.name in ("uint8", "uint16", "float32") and not arr.flags.writeable
    try:
        image = image_from_wire(obj)
    except InvalidImage:
        return
    if isinstance(obj, dict):
        assert isinstance(image, np.ndarray) and image.ndim in (2, 3)
