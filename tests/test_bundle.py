"""Smoke test of the frozen one-folder bundle (packaging/): both doors, real images, same scores.

Builds ``dist/inspection-engine/`` with ``packaging/build.py`` unless the bundle there was built
after the last change to the sources (engine/, ipc/, http_compat/, packaging/, pyproject.toml) and
to the installed packages; starts the executable with no argument (= serve) on a temporary data
root and free ports; runs health -> fit -> calibrate -> infer over ZeroMQ (raw arrays) and over
REST (PNG files) on MVTec AD bottle images; checks every score against an in-process
``engine.api.Engine`` with the same settings; then stops it with SIGTERM and expects exit code 0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.support import MVTEC_BOTTLE, REPO, encoded, free_port, load_bgr, png_bytes

SIZE = 128            # ROI side sent (the files are 900 x 900)
MMPP = 0.1
ROLE = "bundle"
TOL = 1e-5
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
BUILD_TIMEOUT_S = 900
READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60
SOURCES = ("engine", "ipc", "http_compat", "packaging", "pyproject.toml")

pytestmark = [
    pytest.mark.bundle,
    pytest.mark.slow,                 # fits on real images too
    pytest.mark.timeout(1500),
    pytest.mark.skipif(not all((MVTEC_BOTTLE / sub).is_dir() for sub in ("train/good", "test/broken_large")),
                       reason=f"MVTec AD bottle images (train/good, test/broken_large) not found at {MVTEC_BOTTLE}"),
    pytest.mark.skipif(importlib.util.find_spec("PyInstaller") is None,
                       reason="PyInstaller is not installed (pip install -e '.[bundle]')"),
]


def _build_module() -> ModuleType:
    # loaded by path: a plain ``import packaging`` is the PyPI package of that name
    spec = importlib.util.spec_from_file_location("inspection_engine_build", REPO / "packaging" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _newest_input_mtime() -> float:
    """Latest change to a source file, or to the set of installed packages (site-packages entries)."""
    stamps = [Path(sysconfig.get_paths()["purelib"]).stat().st_mtime]
    for name in SOURCES:
        path = REPO / name
        files = [path] if path.is_file() else [p for p in path.rglob("*")
                                               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".md"]
        stamps += [p.stat().st_mtime for p in files]
    return max(stamps)


def _fresh_bundle(build: ModuleType, dist: Path) -> bool:
    info_file = build.bundle_dir(dist) / "BUILD_INFO.json"
    if not build.executable(dist).is_file() or not info_file.is_file():
        return False
    info = json.loads(info_file.read_text(encoding="utf-8"))
    return info.get("trim") is True and float(info.get("started_at", 0)) >= _newest_input_mtime()


@pytest.fixture(scope="module")
def executable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = _build_module()
    dist = REPO / "dist"
    if not _fresh_bundle(build, dist):
        log = tmp_path_factory.mktemp("build") / "build.log"
        with log.open("wb") as out:
            try:
                proc = subprocess.run([sys.executable, str(REPO / "packaging" / "build.py")], cwd=REPO,
                                      stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"bundle build took over {BUILD_TIMEOUT_S} s; log: {log}")
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        assert proc.returncode == 0, f"packaging/build.py failed ({proc.returncode}):\n{tail}"
        print(tail[-1500:])
    exe = build.executable(dist)
    assert exe.is_file(), exe
    return exe


@pytest.fixture(scope="module")
def images() -> dict[str, list[np.ndarray]]:
    return {
        "train": [load_bgr(p, SIZE) for p in sorted((MVTEC_BOTTLE / "train" / "good").glob("*.png"))[:10]],
        "test": [load_bgr(p, SIZE) for p in sorted((MVTEC_BOTTLE / "test" / "good").glob("*.png"))[:2]]
        + [load_bgr(p, SIZE) for p in sorted((MVTEC_BOTTLE / "test" / "broken_large").glob("*.png"))[:3]],
        "ng": [load_bgr(p, SIZE) for p in sorted((MVTEC_BOTTLE / "test" / "broken_large").glob("*.png"))[3:6]],
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The settings both engines run with (the frozen one through its environment)."""
    return {
        "BACKEND_ZMQ_ENDPOINT": f"tcp://127.0.0.1:{free_port()}",
        "BACKEND_HTTP_HOST": "127.0.0.1",
        "BACKEND_HTTP_PORT": str(free_port()),
        "BACKEND_BACKBONE": "efficientnet_lite0",   # pinned: a DINOv2 file in the torch hub cache must not switch it
        "BACKEND_LOG_JSON": "true",
        "TORCH_HOME": str(tmp_path_factory.mktemp("torch_home")),
    }


class Frozen:
    """The bundle's executable running ``serve`` (no argument)."""

    def __init__(self, exe: Path, env: dict[str, str], workdir: Path) -> None:
        self.stderr_path = workdir / "stderr.log"
        self._stderr = self.stderr_path.open("wb")
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([str(exe)], env={**os.environ, **env}, cwd=workdir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, **kwargs)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def stderr_tail(self, n: int = 3000) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")[-n:]

    def wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(5)
                pytest.fail(f"bundle exited ({self.proc.returncode}) before ready:\n{self.stderr_tail()}")
            if line.startswith("ready:"):
                return line
        pytest.fail(f"no ready: line within {timeout} s:\n{self.stderr_tail()}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGTERM)  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


@pytest.fixture(scope="module")
def frozen(executable: Path, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Frozen]:
    workdir = tmp_path_factory.mktemp("frozen")
    app = Frozen(executable, {**env, "BACKEND_DATA_ROOT": str(workdir / "data")}, workdir)
    try:
        yield app
    finally:
        app.close()


@pytest.fixture(scope="module")
def ready(frozen: Frozen, env: dict[str, str]) -> dict[str, str]:
    """The ``ready:`` line's fields, after timing start-up to the first ZeroMQ health reply."""
    from ipc.client import EngineClient
    from ipc.errors import EngineUnavailable

    # ZeroMQ queues a request until the server binds: this times process start -> first reply
    deadline = time.monotonic() + READY_TIMEOUT_S
    with EngineClient(env["BACKEND_ZMQ_ENDPOINT"], timeout=1.0, retries=0) as client:
        while True:
            if frozen.proc.poll() is not None:
                pytest.fail(f"bundle exited ({frozen.proc.returncode}) during start-up:\n{frozen.stderr_tail()}")
            try:
                health = client.health()
                break
            except EngineUnavailable:
                if time.monotonic() > deadline:
                    pytest.fail(f"no health reply within {READY_TIMEOUT_S} s:\n{frozen.stderr_tail()}")
    startup_s = time.perf_counter() - frozen.started
    line = frozen.wait_ready(READY_TIMEOUT_S)
    print(f"\nbundle: first health reply {startup_s:.1f} s after start; {line}")
    assert health.backbone == "efficientnet_lite0" and health.weights_sha256 == LITE0_SHA256
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    assert fields["zmq"] == env["BACKEND_ZMQ_ENDPOINT"]
    assert fields["http"] == f"http://127.0.0.1:{env['BACKEND_HTTP_PORT']}"
    return fields


@pytest.fixture(scope="module")
def reference(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The source tree's engine, in this process, with the frozen one's settings."""
    from engine.api import Engine
    from engine.settings import Settings

    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    try:
        engine = Engine(Settings(data_root=tmp_path_factory.mktemp("reference")))
        yield engine
        engine.close()
    finally:
        mp.undo()


def _run(door: Any, roi: str, encode: Any, images: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """health -> fit -> raw NG scores -> calibrate -> infer, through ``door`` (engine-like calls)."""
    out: dict[str, Any] = {"health": door.health()}
    fit = door.fit_ok(ROLE, roi, MMPP, [encode(i) for i in images["train"]])
    out["ok_scores"] = list(fit["ok_scores"])
    out["ng_scores"] = [door.infer(ROLE, roi, MMPP, encode(i), allow_uncalibrated=True, heatmap="none")["score"]
                        for i in images["ng"]]
    calib = door.calibrate_ng(ROLE, roi, MMPP, out["ok_scores"], out["ng_scores"])
    out["threshold"] = calib["threshold"]
    t0 = time.perf_counter()
    first = door.infer(ROLE, roi, MMPP, encode(images["test"][0]))
    out["first_infer_ms"] = (time.perf_counter() - t0) * 1000
    results = [first] + [door.infer(ROLE, roi, MMPP, encode(i)) for i in images["test"][1:]]
    out["scores"] = [r["score"] for r in results]
    out["decisions"] = [r["decision"] for r in results]
    out["thresholds"] = [r["threshold"] for r in results]
    out["heatmap_png"] = [bool(r.get("heatmap_png") or r.get("heatmap_png_base64")) for r in results]
    return out


class _EngineDoor:
    """Engine / EngineClient results as dicts."""

    def __init__(self, target: Any) -> None:
        self._t = target

    def health(self) -> dict[str, Any]:
        return self._t.health().model_dump()

    def fit_ok(self, *args: Any, **kw: Any) -> dict[str, Any]:
        return self._t.fit_ok(*args, **kw).model_dump()

    def calibrate_ng(self, *args: Any, **kw: Any) -> dict[str, Any]:
        return self._t.calibrate_ng(*args, **kw).model_dump()

    def infer(self, *args: Any, **kw: Any) -> dict[str, Any]:
        return self._t.infer(*args, **kw).model_dump()


class _RestDoor:
    """The REST contract (multipart for images, JSON for calibrate_ng) with httpx."""

    def __init__(self, client: Any) -> None:
        self._c = client

    def _ok(self, response: Any) -> dict[str, Any]:
        assert response.status_code == 200, response.text
        return dict(response.json())

    def health(self) -> dict[str, Any]:
        return self._ok(self._c.get("/health"))

    def fit_ok(self, role: str, roi: str, mmpp: float, images: list[bytes]) -> dict[str, Any]:
        files = [("images", (f"ok{i}.png", data, "image/png")) for i, data in enumerate(images)]
        return self._ok(self._c.post("/fit_ok", data={"role_id": role, "roi_id": roi, "mm_per_px": str(mmpp)},
                                     files=files))

    def calibrate_ng(self, role: str, roi: str, mmpp: float, ok: list[float], ng: list[float]) -> dict[str, Any]:
        return self._ok(self._c.post("/calibrate_ng", json={"role_id": role, "roi_id": roi, "mm_per_px": mmpp,
                                                            "ok_scores": ok, "ng_scores": ng}))

    def infer(self, role: str, roi: str, mmpp: float, image: bytes, *, allow_uncalibrated: bool = False,
              heatmap: str = "png") -> dict[str, Any]:
        data = {"role_id": role, "roi_id": roi, "mm_per_px": str(mmpp),
                "allow_uncalibrated": str(allow_uncalibrated).lower(), "heatmap": heatmap}
        return self._ok(self._c.post("/infer", data=data, files={"image": ("roi.png", image, "image/png")}))


def _assert_same(frozen: dict[str, Any], source: dict[str, Any], door: str) -> None:
    for key in ("ok_scores", "ng_scores", "scores", "thresholds"):
        got, want = np.asarray(frozen[key], dtype=np.float64), np.asarray(source[key], dtype=np.float64)
        assert got.shape == want.shape, (door, key, got, want)
        diff = float(np.max(np.abs(got - want)))
        assert diff <= TOL, f"{door} {key}: frozen {got.tolist()} vs source {want.tolist()} (max diff {diff:.3g})"
    assert abs(frozen["threshold"] - source["threshold"]) <= TOL
    assert frozen["decisions"] == source["decisions"], door
    assert all(frozen["heatmap_png"]), door
    for key in ("backbone", "weights_sha256", "input_size", "device"):
        assert frozen["health"][key] == source["health"][key], (door, key)


def test_zmq_door_matches_source_engine(ready: dict[str, str], reference: Any,
                                        images: dict[str, list[np.ndarray]]) -> None:
    from ipc.client import EngineClient

    with EngineClient(ready["zmq"], timeout=120, long_timeout=600) as client:
        got = _run(_EngineDoor(client), "zmq", np.ascontiguousarray, images)
    want = _run(_EngineDoor(reference), "zmq", np.ascontiguousarray, images)
    print(f"\nzmq: first infer {got['first_infer_ms']:.0f} ms (source {want['first_infer_ms']:.0f} ms); "
          f"scores {np.round(got['scores'], 4).tolist()} decisions {got['decisions']}")
    _assert_same(got, want, "zmq")
    assert got["decisions"][:2] == ["ok", "ok"] and "ng" in got["decisions"][2:]


def test_rest_door_matches_source_engine(ready: dict[str, str], reference: Any,
                                         images: dict[str, list[np.ndarray]]) -> None:
    import httpx

    # the other formats go through Pillow's plugins (imported by name at run time)
    others = [encoded(images["test"][-1], ext) for ext in (".jpg", ".bmp", ".tiff")]
    with httpx.Client(base_url=ready["http"], timeout=600) as client:
        door = _RestDoor(client)
        got = _run(door, "rest", png_bytes, images)
        got_others = [door.infer(ROLE, "rest", MMPP, data, heatmap="none")["score"] for data in others]
    ref = _EngineDoor(reference)
    want = _run(ref, "rest", png_bytes, images)
    want_others = [ref.infer(ROLE, "rest", MMPP, data, heatmap="none")["score"] for data in others]
    print(f"\nrest: first infer {got['first_infer_ms']:.0f} ms (source {want['first_infer_ms']:.0f} ms); "
          f"scores {np.round(got['scores'], 4).tolist()}; jpg/bmp/tiff {np.round(got_others, 4).tolist()}")
    _assert_same(got, want, "rest")
    assert np.max(np.abs(np.subtract(got_others, want_others))) <= TOL, (got_others, want_others)


def test_the_c_exact_scan_is_bundled_where_it_was_built(executable: Path) -> None:
    """The bundle carries the C exact scan the source install has (without it the engine falls back
    to the numpy search: the same answers, slower)."""
    from engine import ivfscan

    found = sorted(p.name for p in executable.parent.rglob("_ivfscan*"))
    assert bool(found) == ivfscan.BUILT, found


def test_sigterm_stops_cleanly(ready: dict[str, str], frozen: Frozen) -> None:
    assert frozen.proc.poll() is None, f"bundle died:\n{frozen.stderr_tail()}"
    t0 = time.perf_counter()
    frozen.terminate()
    try:
        code = frozen.proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"bundle still running {STOP_TIMEOUT_S} s after SIGTERM:\n{frozen.stderr_tail()}")
    print(f"\nstopped in {time.perf_counter() - t0:.1f} s")
    assert code == 0, f"exit code {code}:\n{frozen.stderr_tail()}"
    assert '"stopped"' in frozen.stderr_tail(20000)
