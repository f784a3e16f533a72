"""``kill -9`` of ``python -m service`` in the middle of ``fit_ok`` and of calibrations, over and over.

Fits: each round starts a fresh server process on the same data root, checks what the previous kill
left (recovery ran at start-up: no ``.<roi>.staging-*`` / ``.old-*`` / ``.trash-*`` folders; the
model folder is either byte-identical to the one before the kill, or a complete new model one
version up; either one loads and scores over ZeroMQ), then sends ``fit_ok`` over ZeroMQ and kills
the process: half of the rounds after a random delay anywhere in the fit, half at a random point
shortly after the fit's ``save`` progress event (the write-and-swap window). A last round lets a
fit complete. Marked slow (about 1.5-2.5 min on 2 cores).

Calibrations: each round queues a burst of ``calibrate_ng`` calls (every fifth round a refit
first, which carries the calibration over) and kills the process at a random point of the burst;
after the restart, ``state``, ``infer``, the ``manifest`` op and the files on disk must name the
same calibration, one the burst (or the round before) could have written. About 2-3 min on 2 cores
(21 process starts dominate: 195 s measured at load average 4-5 on the shared 2-core VM).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from ipc import EngineClient
from tests.support import REPO, free_port, png_bytes

pytestmark = pytest.mark.slow

ROLE, ROI, MM, SIDE = "cam1", "a", 0.1, 64
KILLS = int(os.environ.get("CRASH_KILLS", "20"))


class Serve:
    """``python -m service`` on the data root, ZeroMQ only, with progress events."""

    def __init__(self, root: Path, log: Path) -> None:
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.events = f"tcp://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKEND_", "PATCHCORE_", "CALIB_"))}
        env.update(BACKEND_DATA_ROOT=str(root), BACKEND_ZMQ_ENDPOINT=self.endpoint, BACKEND_ZMQ_EVENTS=self.events,
                   BACKEND_HTTP_ENABLED="false", BACKEND_INPUT_SIZE=str(SIDE), BACKEND_BACKBONE="efficientnet_lite0",
                   BACKEND_DEVICE="cpu", BACKEND_ZMQ_WORKERS="1", BACKEND_LOG_LEVEL="WARNING")
        self._log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=self._log)
        self._wait_ready(90.0)

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline, seen = time.monotonic() + timeout, b""
        while time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                line = self.proc.stdout.readline()
                seen += line
                if line.startswith(b"ready:"):
                    sel.close()
                    return
                if not line and self.proc.poll() is not None:
                    break
        sel.close()
        self.kill()
        raise AssertionError(f"serve did not print ready: (exit {self.proc.returncode}); stdout {seen[-500:]!r}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def _images(seed: int, n: int = 6) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png_bytes(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)) for _ in range(n)]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _fit_args(seed: int) -> dict[str, Any]:
    return {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM, "images": _images(seed)}


def _crash_point(role_dir: Path) -> str:
    """Where the kill landed, read from the folders it left (before any recovery)."""
    names = [p.name for p in role_dir.iterdir()]
    staging = any(".staging-" in n for n in names)
    old = any(".old-" in n for n in names)
    if old:
        return "removing the old folder" if ROI in names else "between the swap's two renames"
    return "writing the new folder" if staging else "outside the save"


def _check_and_load(serve: Serve, role_dir: Path, before: dict[str, str], version: int) -> tuple[str, int]:
    """What the last kill left, after the start-up recovery: ("old" | "new", model version)."""
    leftovers = sorted(p.name for p in role_dir.iterdir() if p.name.startswith("."))
    assert leftovers == [], f"recovery left {leftovers}"
    after = _hashes(role_dir / ROI)
    with EngineClient(serve.endpoint, timeout=60, retries=0) as client:
        state = client.call("state", {"role_id": ROLE, "roi_id": ROI})
        result = client.call("infer", {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM, "image": _images(999, 1)[0],
                                       "allow_uncalibrated": True, "heatmap": "none"})
    assert np.isfinite(result["score"])
    if after == before:
        assert state["model_version"] == version
        return "old", version
    # not the old files: then a complete new model (the kill came after the swap)
    assert set(after) == {"embeddings.npy", "coreset.faiss", "manifest.json", "sources.npy"}, after
    assert state["model_version"] == version + 1 and result["model_version"] == version + 1
    return "new", version + 1


def test_kill_9_during_fit_keeps_a_loadable_model(tmp_path: Path) -> None:
    rnd = random.Random(20240607)
    root, log = tmp_path / "data", tmp_path / "serve.log"
    role_dir = root / "models" / ROLE
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    outcomes: list[str] = []
    points: list[str] = []
    try:
        serve = Serve(root, log)
        with EngineClient(serve.endpoint, timeout=120, retries=0) as client:
            client.call("fit_ok", _fit_args(0))                     # warms the process up
            start = time.perf_counter()
            version = client.call("fit_ok", _fit_args(1))["model_version"]
            fit_s = time.perf_counter() - start
        before = _hashes(role_dir / ROI)

        for round_ in range(KILLS):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(serve.events)
            req = ctx.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.connect(serve.endpoint)
            time.sleep(0.2)                                          # let the SUB connection settle
            req.send(msgpack.packb({"v": 1, "op": "fit_ok", "id": f"k{round_}", "args": _fit_args(100 + round_)}))
            if round_ % 2 == 0:                                      # anywhere in the fit (or just after)
                time.sleep(rnd.uniform(0.0, 1.3 * fit_s))
            else:                                                    # inside the write-and-swap window
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and sub.poll(int((deadline - time.monotonic()) * 1000)):
                    if msgpack.unpackb(sub.recv()).get("stage") == "save":
                        break
                time.sleep(rnd.uniform(0.0, 0.03))
            serve.kill()
            req.close(linger=0)
            sub.close(linger=0)
            points.append(_crash_point(role_dir))

            serve = Serve(root, log)                                  # start-up recovery runs here
            outcome, version = _check_and_load(serve, role_dir, before, version)
            outcomes.append(outcome)
            before = _hashes(role_dir / ROI)

        # no leftover blocks a later fit: one more fit, not killed, completes and is served
        with EngineClient(serve.endpoint, timeout=120, retries=0) as client:
            fit = client.call("fit_ok", _fit_args(7))
            assert fit["model_version"] == version + 1
            assert client.call("infer", {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM, "image": _images(5, 1)[0],
                                         "allow_uncalibrated": True})["model_version"] == version + 1
        serve.stop()
        assert sorted(p.name for p in role_dir.iterdir()) == [ROI]
    finally:
        if "serve" in locals() and serve.proc.poll() is None:
            serve.kill()
        ctx.term()
    assert len(outcomes) == KILLS
    print(f"kill -9 rounds: {outcomes.count('old')} kept the old model, {outcomes.count('new')} committed the new one; "
          f"killed at: {', '.join(f'{p} x{points.count(p)}' for p in sorted(set(points)))}")


CALIBRATION_KILLS = int(os.environ.get("CRASH_CALIBRATION_KILLS", "20"))
BURST = 12                        # calibrations queued per round (the one worker's queue holds 16)


def _calibration_request(round_: int, i: int) -> tuple[dict[str, Any], float, float]:
    """A calibrate_ng request whose threshold is known exactly: OK scores [v, v] give
    quantile(v) * 1.1 (the default safety factor); ``area_mm2_thr`` tells the calls apart too."""
    value, area = 1.0 + 100.0 * round_ + i, float(i + 1)
    args = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM, "ok_scores": [value, value], "area_mm2_thr": area}
    return args, value * 1.1, area


def _calibration_seen(serve: Serve, role_dir: Path) -> tuple[int, float, float]:
    """(model version, threshold, area) that state, infer, the manifest op and the files all agree on."""
    leftovers = sorted(p.name for p in role_dir.iterdir() if p.name.startswith("."))
    assert leftovers == [], f"recovery left {leftovers}"
    assert not [p.name for p in (role_dir / ROI).iterdir() if p.name.startswith(".")]
    with EngineClient(serve.endpoint, timeout=60, retries=0) as client:
        state = client.call("state", {"role_id": ROLE, "roi_id": ROI})
        manifest = client.call("manifest", {"role_id": ROLE, "roi_id": ROI})
        result = client.call("infer", {"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM,
                                       "image": _images(999, 1)[0], "heatmap": "none"})
    on_disk = json.loads((role_dir / ROI / "calibration.json").read_text())
    assert state["calib_present"] is True
    assert state["threshold"] == result["threshold"] == manifest["threshold"] == on_disk["threshold"]
    assert result["area_mm2_thr"] == manifest["area_mm2_thr"] == on_disk["area_mm2_thr"]
    assert state["model_version"] == result["model_version"] == manifest["model_version"] == on_disk["model_version"]
    return state["model_version"], state["threshold"], result["area_mm2_thr"]


def test_kill_9_during_calibrations_keeps_state_and_infer_in_step(tmp_path: Path) -> None:
    rnd = random.Random(20241130)
    root, log = tmp_path / "data", tmp_path / "serve.log"
    role_dir = root / "models" / ROLE
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    outcomes: list[str] = []
    try:
        serve = Serve(root, log)
        with EngineClient(serve.endpoint, timeout=120, retries=0) as client:
            client.call("fit_ok", _fit_args(0))
            start = time.perf_counter()
            for i in range(BURST):
                client.call("calibrate_ng", _calibration_request(0, i)[0])
            burst_s = time.perf_counter() - start
            start = time.perf_counter()
            client.call("fit_ok", _fit_args(1))
            fit_s = time.perf_counter() - start
        seen = _calibration_seen(serve, role_dir)
        for round_ in range(1, CALIBRATION_KILLS + 1):
            refit = round_ % 5 == 0
            burst = [_calibration_request(round_, i) for i in range(BURST - 1 if refit else BURST)]
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(serve.endpoint)
            messages = [{"v": 1, "op": "calibrate_ng", "id": f"c{round_}-{i}", "args": args}
                        for i, (args, _, _) in enumerate(burst)]
            if refit:
                messages.insert(0, {"v": 1, "op": "fit_ok", "id": f"f{round_}", "args": _fit_args(500 + round_)})
            for message in messages:
                dealer.send_multipart([b"", msgpack.packb(message)])
            time.sleep(rnd.uniform(0.0, burst_s + (fit_s if refit else 0.0)))
            serve.kill()
            dealer.close(linger=0)

            serve = Serve(root, log)
            version, threshold, area = _calibration_seen(serve, role_dir)
            written = {(t, a) for _, t, a in burst}
            if version == seen[0] + 1:
                assert refit, "the model version moved without a refit"
                outcomes.append("refit committed")     # its carried threshold, or one of the burst after it
            else:
                assert version == seen[0]
                assert (threshold, area) in written | {seen[1:]}, (threshold, area)
                outcomes.append("unchanged" if (threshold, area) == seen[1:] else "calibrated")
            seen = (version, threshold, area)
        serve.stop()
    finally:
        if "serve" in locals() and serve.proc.poll() is None:
            serve.kill()
        ctx.term()
    assert len(outcomes) == CALIBRATION_KILLS
    print(f"kill -9 during calibrations: {', '.join(f'{o} x{outcomes.count(o)}' for o in sorted(set(outcomes)))}")
