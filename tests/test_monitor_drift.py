"""Drift on real bottle images: a clean stream stays ``ok``; a brightness or blur shift raises
``alarm`` within the window, is logged, and is published on the ZeroMQ events socket.

One model per shift (20 OK images, EfficientNet-Lite0 at 112 px), a window of 50 scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
import zmq
from structlog.testing import capture_logs

from engine.api import Engine
from engine.settings import Settings
from tests.support import Doors, door_settings, load_bgr, png_bytes

SIDE, INPUT, MM, ROLE, WINDOW = 224, 112, 0.1, "line", 50
Shift = Callable[[np.ndarray], np.ndarray]


def _brighter(image: np.ndarray) -> np.ndarray:
    return np.clip(image.astype(np.int16) + 50, 0, 255).astype(np.uint8)


def _blurred(image: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), 2.0)


@pytest.fixture(scope="module")
def line(bottle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, list[np.ndarray]]]:
    root = tmp_path_factory.mktemp("drift")
    engine = Engine(Settings(data_root=root / "data", backbone="efficientnet_lite0", input_size=INPUT,
                             drift_window=WINDOW, history_flush_interval_s=0.05))
    train = sorted((bottle_dir / "train" / "good").glob("*.png"))
    fit_images = [png_bytes(load_bgr(p, SIDE)) for p in train[:20]]
    for roi in ("clean", "bright", "blur"):
        engine.fit_ok(ROLE, roi, MM, fit_images)
    stream = [load_bgr(p, SIDE) for p in train[20:120]]     # OK parts the fits never saw
    yield engine, stream
    engine.close()


def _run(engine: Engine, roi: str, images: list[np.ndarray], shift: Shift | None = None) -> list[str]:
    states = []
    for image in images:
        engine.infer(ROLE, roi, MM, png_bytes(shift(image) if shift else image), allow_uncalibrated=True,
                     heatmap="none")
        states.append(engine.monitor.drift(ROLE, roi).state)
    return states


def test_the_clean_stream_stays_ok(line: tuple[Engine, list[np.ndarray]]) -> None:
    engine, stream = line
    assert _run(engine, "clean", stream) == ["ok"] * len(stream)
    drift = engine.monitor.drift(ROLE, "clean")
    assert drift.reference == "baseline" and drift.n_window == WINDOW and drift.ks_p is not None


@pytest.mark.parametrize(("roi", "shift"), [("bright", _brighter), ("blur", _blurred)])
def test_a_shift_raises_the_alarm_within_the_window(line: tuple[Engine, list[np.ndarray]], roi: str,
                                                    shift: Shift) -> None:
    engine, stream = line
    assert set(_run(engine, roi, stream[:WINDOW])) == {"ok"}           # the line as commissioned
    with capture_logs() as logs:
        states = _run(engine, roi, stream[WINDOW:2 * WINDOW], shift)
    assert "alarm" in states, states
    first = states.index("alarm")
    assert first < WINDOW and all(state == "alarm" for state in states[first:])
    changed = [e for e in logs if e["event"] == "drift_state_changed" and e["state"] == "alarm"]
    assert len(changed) == 1 and changed[0]["roi_id"] == roi and changed[0]["log_level"] == "warning"
    drift = engine.monitor.drift(ROLE, roi)
    assert drift.ks_d is not None and drift.ks_d >= 0.3 and drift.changed_at is not None


def test_a_state_change_is_published_on_the_events_socket(line: tuple[Engine, list[np.ndarray]],
                                                          tmp_path: Path) -> None:
    engine, stream = line
    engine.fit_ok(ROLE, "events", MM, [png_bytes(img) for img in stream[80:100]])
    config = door_settings(tmp_path, zmq_events="tcp://127.0.0.1:*")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        with Doors(engine, config) as doors:
            assert doors.ipc.events_endpoint is not None
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(doors.ipc.events_endpoint)
            time.sleep(0.3)                       # the subscription reaches the publisher
            for i, image in enumerate([*stream[:WINDOW], *map(_blurred, stream[WINDOW:2 * WINDOW])]):
                doors.zmq.call("infer", {"role_id": ROLE, "roi_id": "events", "mm_per_px": MM, "heatmap": "none",
                                         "image": png_bytes(image), "allow_uncalibrated": True}, request_id=f"r{i}")
                if doors.zmq.call("drift", {"role_id": ROLE, "roi_id": "events"})["state"] == "alarm":
                    break
            events = []
            while sub.poll(2000, zmq.POLLIN):
                events.append(msgpack.unpackb(sub.recv()))
    finally:
        sub.close(linger=0)
        ctx.term()
    drift = [e for e in events if e.get("op") == "drift"]
    assert drift and drift[-1]["state"] == "alarm" and drift[-1]["stage"] == "drift_state"
    assert drift[-1]["roi_id"] == "events" and drift[-1]["id"] == f"r{i}" and drift[-1]["total"] == WINDOW
