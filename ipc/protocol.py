"""Wire format of the ZeroMQ door: one msgpack map per message, version 1 (see docs/ipc.md).

Request: ``{"v": 1, "op": str, "id": str, "api_key"?: str, "args": {...}}``.
Reply:   ``{"v": 1, "id": ..., "ok": true, "result": {...}}`` or
         ``{"v": 1, "id": ..., "ok": false, "status": int, "error": {"code": str, "message": str}}``.
Arrays travel as ``{"dtype": str, "shape": [d0, d1, ...], "data": bytes}`` (C order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from engine.errors import InvalidImage
from engine.limits import ValueRefused, check_structure

__all__ = [
    "OPS",
    "PROTOCOL_VERSION",
    "OpInfo",
    "UnpackLimits",
    "array_from_wire",
    "array_to_wire",
    "image_from_wire",
    "pack",
    "peek_envelope",
    "unpack",
]

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class OpInfo:
    """How the client may treat an op: retry it after a timeout, and wait longer for it.

    ``part``: the Engine attribute whose method serves the op (None: the Engine itself)."""

    idempotent: bool
    long: bool = False
    part: str | None = None


# op name = the method name on the Engine (or on its ``part``); args = its keyword arguments
# (``progress`` is the server's).
OPS: dict[str, OpInfo] = {
    "health": OpInfo(idempotent=True),
    "fit_ok": OpInfo(idempotent=False, long=True),
    "calibrate_ng": OpInfo(idempotent=False),
    "infer": OpInfo(idempotent=True),
    "infer_batch": OpInfo(idempotent=True),
    "state": OpInfo(idempotent=True),
    "manifest": OpInfo(idempotent=True),
    "list_models": OpInfo(idempotent=True),
    "delete_model": OpInfo(idempotent=False),
    "dataset_upload": OpInfo(idempotent=False),
    "dataset_list": OpInfo(idempotent=True),
    "dataset_file": OpInfo(idempotent=True),
    "dataset_meta": OpInfo(idempotent=True),
    "dataset_delete": OpInfo(idempotent=False),
    "dataset_clear": OpInfo(idempotent=False),
    "calibrate_dataset": OpInfo(idempotent=False, long=True),
    "infer_dataset": OpInfo(idempotent=True, long=True),
    # model lifecycle
    "versions": OpInfo(idempotent=True, part="lifecycle"),
    "activate": OpInfo(idempotent=True, part="lifecycle"),
    "add_ok": OpInfo(idempotent=False, long=True, part="lifecycle"),
    "mark_ok": OpInfo(idempotent=False, long=True, part="lifecycle"),
    "mark_ng": OpInfo(idempotent=False, part="lifecycle"),
    "export_model": OpInfo(idempotent=True, part="lifecycle"),
    "import_model": OpInfo(idempotent=False, part="lifecycle"),
    # observability
    "history": OpInfo(idempotent=True, part="monitor"),
    "drift": OpInfo(idempotent=True, part="monitor"),
    "explain_patch": OpInfo(idempotent=True, part="monitor"),
}

_IMAGE_DTYPES = ("uint8", "uint16")
_ARRAY_KEYS = frozenset({"dtype", "shape", "data"})


def _default(obj: Any) -> Any:
    # results are plain pydantic dumps; these cover what a manifest dict may still hold
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"cannot send a {type(obj).__name__} over the wire")


def pack(message: Any) -> bytes:
    """One message as msgpack bytes (tuples become arrays, bytes stay bin)."""
    return msgpack.packb(message, default=_default, use_bin_type=True, datetime=False)


@dataclass(frozen=True)
class UnpackLimits:
    """What unpacking one message may build, checked while it is built (``unpack``)."""

    max_container_len: int = 100_000    # items in one array or map
    max_items: int = 250_000            # containers and items in the whole message
    max_depth: int = 32                 # nested arrays and maps
    max_str_len: int = 1024 * 1024      # characters of one string (bins are bounded by the message size)


class _Counter:
    """The list and map hook of one unpack: counts what was built, stops it past the limit."""

    def __init__(self, limit: int) -> None:
        self.limit, self.items, self.containers = limit, 0, 0

    def __call__(self, container: Any) -> Any:
        self.containers += 1
        self.items += 1 + len(container)
        if self.items > self.limit:
            raise ValueRefused(f"more than {self.limit} items in one message", too_large=True)
        return container


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the protocol")


def unpack(data: bytes | memoryview, limits: UnpackLimits | None = None) -> Any:
    """The object in one msgpack message; ValueError on anything that is not exactly one.

    With ``limits``: ``ValueRefused`` when the message breaks them, raised while unpacking (a
    message of 16 MiB of empty arrays stops at ``max_items``, before it costs more memory);
    ``too_large`` for lengths and counts (413), not for depth (400).
    """
    if limits is None:
        options: dict[str, Any] = {}
    else:
        counter = _Counter(limits.max_items)
        options = {"list_hook": counter, "object_hook": counter, "max_str_len": limits.max_str_len,
                   "max_array_len": limits.max_container_len, "max_map_len": limits.max_container_len,
                   "ext_hook": _no_ext}
    try:
        value = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True, **options)
    except ValueRefused:
        raise
    except Exception as exc:  # ExtraData, FormatError, StackError, UnicodeDecodeError, ...
        detail = f": {exc}" if str(exc) else ""
        message = f"not a msgpack message ({type(exc).__name__}{detail})"
        if "exceeds max_" in str(exc):    # msgpack's own length limits
            raise ValueRefused(message, too_large=True) from exc
        raise ValueError(message) from exc
    if limits is not None and counter.containers > limits.max_depth:   # fewer cannot nest deeper
        check_structure(value, max_depth=limits.max_depth, max_items=limits.max_items)
    return value


def peek_envelope(data: bytes | memoryview, prefix: int = 64 * 1024) -> dict[str, Any]:
    """The top-level entries of a request map that come before ``args`` (its other scalar keys:
    ``v``, ``op``, ``id``, ``api_key``), read from the first ``prefix`` bytes only; {} when the
    message does not start as a map. Lets a server refuse a wrong API key before it unpacks a
    large ``args``.
    """
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=prefix, max_str_len=4096,
                                max_bin_len=4096, max_array_len=16, max_map_len=16, max_ext_len=0)
    unpacker.feed(bytes(data[:prefix]))
    found: dict[str, Any] = {}
    try:
        for _ in range(min(unpacker.read_map_header(), 8)):
            key = unpacker.unpack()
            if key == "args" or not isinstance(key, str):
                break
            found[key] = unpacker.unpack()
    except Exception:   # cut by the prefix, not a map, a value over the tiny limits: stop there
        pass
    return found


def array_to_wire(arr: np.ndarray) -> dict[str, Any]:
    """``{"dtype", "shape", "data"}`` of a C-contiguous copy (or view) of ``arr``."""
    arr = np.ascontiguousarray(arr)
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": arr.tobytes()}


def array_from_wire(obj: Any, dtypes: tuple[str, ...] = ("uint8", "uint16", "float32")) -> np.ndarray:
    """A read-only array viewing ``obj["data"]``; ValueError when the dict does not describe one."""
    if hasattr(obj, "model_dump"):          # a RawArray result model
        obj = obj.model_dump(mode="python")
    if not isinstance(obj, dict) or set(obj) != _ARRAY_KEYS:
        raise ValueError("an array is a map with exactly the keys dtype, shape, data")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise ValueError(f"shape must be a list of positive ints, got {shape!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data must be bytes, got {type(data).__name__}")
    itemsize = np.dtype(dtype).itemsize
    expected = math.prod(shape) * itemsize
    if len(data) != expected:
        raise ValueError(f"data holds {len(data)} bytes, shape {list(shape)} of {dtype} needs {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)   # no copy, no decode


def image_from_wire(obj: Any) -> Any:
    """An image argument as the engine takes it: encoded bytes unchanged, a raw buffer as an array.

    Raises:
        InvalidImage: a raw buffer map that is not (H, W) or (H, W, C) uint8/uint16 with C in 1, 3, 4.
    """
    if not isinstance(obj, dict):
        return obj            # encoded file bytes, or a wrong type the arg validation reports
    try:
        arr = array_from_wire(obj, _IMAGE_DTYPES)
    except ValueError as exc:
        raise InvalidImage(f"raw image buffer: {exc}") from exc
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise InvalidImage(
            f"raw image buffer: shape must be [h, w] or [h, w, c] with c in 1, 3, 4, got {list(arr.shape)}")
    return arr
