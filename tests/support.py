"""Helpers the test modules share: data paths, image bytes, small-engine settings, both doors.

Fixtures live in ``tests/conftest.py``; this module holds plain functions and classes, imported
as ``from tests.support import ...``.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import cv2
import httpx
import msgpack
import numpy as np
import pytest
import zmq

from engine.api import Engine
from http_compat.server import HttpServer
from ipc import EngineClient, IpcServer, RemoteError
from service.child import ServiceProcess, free_port
from service.serve import ServeConfig

__all__ = ["MVTEC_BOTTLE", "REPO", "Doors", "ServiceProcess", "door_settings", "encoded", "free_port", "load_bgr",
           "noise", "part_png", "png_bytes", "png_header_only", "service_process"]

REPO = Path(__file__).resolve().parents[1]
# real data for tests and benchmarks only, next to the checkout (never copied into the repo)
MVTEC_BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"


# --- images --------------------------------------------------------------------------------------

def encoded(image: np.ndarray, ext: str) -> bytes:
    """``image`` as the bytes of an image file, written by OpenCV (a 3-channel array is taken as BGR).

    ``ext`` names the format, as in ``cv2.imencode``: ".png", ".jpg", ".bmp", ".tiff".
    """
    ok, buf = cv2.imencode(ext, image)
    assert ok, f"{ext} encoding failed for an array of shape {image.shape} and dtype {image.dtype}"
    return buf.tobytes()


def png_bytes(image: np.ndarray) -> bytes:
    """``image`` as PNG file bytes (see ``encoded``)."""
    return encoded(image, ".png")


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR (correct CRCs) declaring width x height 8-bit RGB, and a tiny
    IDAT far too short for those pixels: what a decoder must refuse from the header or the data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)       # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def noise(height: int, width: int | None = None, seed: int = 0) -> np.ndarray:
    """A (height, width, 3) uint8 image of uniform random pixels (square when width is None)."""
    shape = (height, height if width is None else width, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def part_png(seed: int, defect: bool = False, side: int = 64) -> bytes:
    """PNG of a synthetic part: one fixed texture plus sensor noise (``seed``); ``defect`` adds a red
    disc of radius side/7 that a PatchCore model fitted on the plain parts scores far above them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] * (64 / side)
    base = 128 + 60 * np.sin(xx / 6.0) * np.cos(yy / 9.0)
    image = np.clip(base[..., None] + rng.normal(0, 6, (side, side, 3)), 0, 255).astype(np.uint8)
    if defect:
        center = (side * (20 + seed % 24) // 64, side * (24 + seed % 16) // 64)
        cv2.circle(image, center, max(2, side // 7), (0, 0, 255), -1)
    return png_bytes(image)


def load_bgr(path: Path, side: int) -> np.ndarray:
    """A colour image file as an (side, side, 3) BGR uint8 array, downscaled with INTER_AREA."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, f"cannot read {path}"
    return cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)


# --- servers -------------------------------------------------------------------------------------

def door_settings(root: Path, **changes: Any) -> ServeConfig:
    """A small CPU engine (EfficientNet-Lite0 at 64 px) with both doors on loopback, free ports;
    ``changes`` are settings field names of any of the four settings objects."""
    base: dict[str, Any] = {"data_root": root, "backbone": "efficientnet_lite0", "input_size": 64, "device": "cpu",
                            "zmq_endpoint": "tcp://127.0.0.1:*", "zmq_workers": 2, "http_host": "127.0.0.1",
                            "http_port": 0, "log_level": "WARNING"}
    return ServeConfig.of(**{**base, **changes})


class Doors:
    """One engine behind both doors, started, with a ZeroMQ client and an HTTP client.

    ``api_key`` is sent by both clients; ``timeout`` (s) applies to both. Use as a context
    manager or call ``close``; the engine is the caller's to close.
    """

    def __init__(self, engine: Engine, config: ServeConfig, api_key: str | None = None,
                 timeout: float = 30.0) -> None:
        self.engine, self.config = engine, config
        self.ipc, self.http = IpcServer(engine, config.ipc), HttpServer(engine, config.http)
        self.ipc.start()
        self.http.start()
        self.zmq = EngineClient(self.ipc.endpoint, api_key=api_key, timeout=timeout, retries=0)
        self.web = httpx.Client(base_url=self.http.url, timeout=timeout,
                                headers={"X-API-Key": api_key} if api_key else None)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()

    def __enter__(self) -> Doors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.zmq.close()
        self.web.close()
        self._ctx.term()
        self.http.stop(timeout=2)
        self.ipc.stop(timeout=2)

    def zmq_answer(self, op: str, args: dict[str, Any]) -> tuple[int, Any]:
        """(200, result) or (status, error code)."""
        try:
            return 200, self.zmq.call(op, args)
        except RemoteError as exc:
            return exc.status, exc.code

    def zmq_error(self, op: str, args: dict[str, Any]) -> tuple[int, str, str]:
        """(status, code, message) of the error the call must raise."""
        with pytest.raises(RemoteError) as info:
            self.zmq.call(op, args)
        return info.value.status, info.value.code, info.value.message

    def zmq_raw(self, payload: bytes, timeout_ms: int = 10_000) -> dict[str, Any] | None:
        """The reply map to one raw request frame, or None when none came within ``timeout_ms``."""
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.ipc.endpoint)
            sock.send(payload)
            if not sock.poll(timeout_ms, zmq.POLLIN):
                return None
            reply = msgpack.unpackb(sock.recv())
            assert isinstance(reply, dict)
            return reply
        finally:
            sock.close(linger=0)

    def http_answer(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) of one request on the REST door."""
        r = self.web.request(method, path, **kwargs)
        return r.status_code, r.json()

    def assert_healthy(self) -> None:
        assert self.zmq.call("health")["status"] == "ok"
        status, body = self.http_answer("GET", "/health")
        assert status == 200 and body["status"] == "ok"


def service_process(root: Path, env: dict[str, str] | None = None, max_files: int | None = None) -> ServiceProcess:
    """``python -m service`` in a child process with a small CPU engine (Lite0 at 64 px, 2 ZeroMQ
    workers, INFO log), for tests that watch the server's own memory, descriptors and log;
    ``env`` adds or overrides settings."""
    settings = {"BACKEND_BACKBONE": "efficientnet_lite0", "BACKEND_INPUT_SIZE": "64", "BACKEND_DEVICE": "cpu",
                "BACKEND_ZMQ_WORKERS": "2", "BACKEND_LOG_LEVEL": "INFO", **(env or {})}
    return ServiceProcess(root / "data", root / "service.log", settings, max_files=max_files)
