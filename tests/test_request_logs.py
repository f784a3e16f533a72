"""Request-scoped logs: a request's id reaches the engine's own log lines, on both doors.

Runs the real service (``python -m service``) with JSON logs on stderr, sends a fit and an infer
with known ids through each door, stops it, and reads the log lines back.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ipc import EngineClient
from tests.support import REPO, free_port, noise, png_bytes

SIDE = 64


def _start(root: Path, log: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    zmq_endpoint, http_port = f"tcp://127.0.0.1:{free_port()}", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKEND_", "PATCHCORE_", "CALIB_"))}
    env.update(BACKEND_DATA_ROOT=str(root), BACKEND_ZMQ_ENDPOINT=zmq_endpoint, BACKEND_HTTP_PORT=str(http_port),
               BACKEND_INPUT_SIZE=str(SIDE), BACKEND_BACKBONE="efficientnet_lite0", BACKEND_DEVICE="cpu",
               BACKEND_LOG_LEVEL="INFO", BACKEND_LOG_JSON="true")
    with log.open("wb") as stderr:   # the child keeps its own handle
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=stderr)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if sel.select(timeout=0.5) and proc.stdout.readline().startswith(b"ready:"):
            sel.close()
            return proc, zmq_endpoint, f"http://127.0.0.1:{http_port}"
    sel.close()
    proc.kill()
    proc.wait(30)
    proc.stdout.close()
    raise AssertionError(f"the service did not start: {log.read_text(errors='replace')[-2000:]}")


def _lines(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue   # a third-party line that is not JSON
    return out


@pytest.fixture(scope="module")
def log_lines(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("request_logs")
    log = root / "service.log"
    proc, zmq_endpoint, base_url = _start(root / "data", log)
    images = [png_bytes(noise(SIDE, seed=i)) for i in range(3)]
    try:
        with EngineClient(zmq_endpoint, timeout=60, retries=0) as client:
            client.call("fit_ok", {"role_id": "cam1", "roi_id": "z", "mm_per_px": 0.1, "images": images},
                        request_id="zmq-fit-7f3a")
            client.call("infer", {"role_id": "cam1", "roi_id": "z", "mm_per_px": 0.1, "image": images[0],
                                  "allow_uncalibrated": True}, request_id="zmq-infer-91c2")
        with httpx.Client(base_url=base_url, timeout=60) as web:
            files = [("images", (f"{i}.png", img, "image/png")) for i, img in enumerate(images)]
            r = web.post("/fit_ok", data={"role_id": "cam1", "roi_id": "h", "mm_per_px": "0.1"}, files=files,
                         headers={"X-Request-Id": "rest-fit-5d10"})
            assert r.status_code == 200, r.text
            r = web.post("/infer", data={"role_id": "cam1", "roi_id": "h", "mm_per_px": "0.1",
                                         "allow_uncalibrated": "true"},
                         files={"image": ("x.png", images[0], "image/png")},
                         headers={"X-Request-Id": "rest-infer-c4e8"})
            assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()
    return _lines(log)


@pytest.mark.parametrize(("request_id", "event", "op", "roi_id"), [
    ("zmq-fit-7f3a", "fit_done", "fit_ok", "z"),
    ("zmq-infer-91c2", "infer", "infer", "z"),
    ("rest-fit-5d10", "fit_done", "fit_ok", "h"),
    ("rest-infer-c4e8", "infer", "infer", "h"),
])
def test_engine_log_lines_carry_the_request_id(log_lines: list[dict[str, Any]], request_id: str, event: str,
                                               op: str, roi_id: str) -> None:
    mine = [line for line in log_lines if line.get("request_id") == request_id]
    engine_lines = [line for line in mine if line.get("event") == event]
    assert len(engine_lines) == 1, f"no single {event} line for {request_id}: {mine}"
    assert engine_lines[0]["op"] == op and engine_lines[0]["role_id"] == "cam1" and engine_lines[0]["roi_id"] == roi_id
    # the engine logs with its own logger; the door's request line carries the same id
    assert engine_lines[0]["logger"].startswith("engine")
    assert any(line.get("event") in ("zmq_request", "http_request") for line in mine)


def test_a_request_id_does_not_leak_into_the_next_request(log_lines: list[dict[str, Any]]) -> None:
    infers = [line for line in log_lines if line.get("event") == "infer"]
    assert sorted(line["request_id"] for line in infers) == ["rest-infer-c4e8", "zmq-infer-91c2"]
    fits = [line for line in log_lines if line.get("event") == "fit_done"]
    assert {line["request_id"]: line["roi_id"] for line in fits} == {"zmq-fit-7f3a": "z", "rest-fit-5d10": "h"}
