"""Helpers shared by the suite's sections: machine facts, memory, timing, images, child processes."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.images import IMAGE_SUFFIXES
from engine.sampling import spread

ROOT = Path(__file__).resolve().parents[2]
BOTTLE = ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle"
ROLE = "bench"
MM = 0.05                     # mm per pixel of every benchmark ROI (areas are not what is measured)


# --- logs and progress -----------------------------------------------------------------------

def quiet_logs() -> None:
    """Engine logs off (it logs one structlog line per infer: printing them would be timed too)."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.basicConfig(level=logging.WARNING)
    for name in ("engine", "ipc", "http_compat", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


def say(section: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {section}: {message}", file=sys.stderr, flush=True)


def apply_threads(threads: int | None) -> None:
    """Set torch and faiss threads in this process (None: leave the defaults)."""
    if not threads:
        return
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


# --- machine -----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def total_ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """What the report prints at the top: the numbers mean nothing without it."""
    import faiss
    import torch

    from engine import ivfscan

    cuda = torch.cuda.is_available()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "ram_gib": None if total_ram_bytes() is None else round(total_ram_bytes() / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss": getattr(faiss, "__version__", "?"),
        "search_scans": "c" if ivfscan.AVAILABLE else "numpy",
        "numpy": np.__version__,
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "load_avg": load_avg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


# --- memory ------------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; psutil elsewhere; peak as last resort)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak RSS of this process since it started (getrusage; torch allocations included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RssSampler:
    """Peak RSS above the level at entry, sampled every ``interval`` s in a thread.

    tracemalloc does not see torch's allocator and ru_maxrss only gives the process's lifetime
    peak, so a block's own peak is sampled: ``peak_delta`` = max RSS seen - RSS at entry.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def peak_delta(self) -> int:
        return self.peak - self.start


def mib(n: float | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


# --- timing ------------------------------------------------------------------------------------

def stats(ms: Sequence[float]) -> dict[str, Any]:
    """p50 (median), p90 and p99 (nearest rank: p99 is the max when n < 100), mean, min, max, n;
    milliseconds."""
    values = sorted(float(v) for v in ms)
    if not values:
        return {"n": 0}
    n = len(values)
    p90, p99 = (values[min(n - 1, max(0, math.ceil(q * n) - 1))] for q in (0.9, 0.99))
    return {"n": n, "p50": round(float(np.median(values)), 3), "p90": round(p90, 3), "p99": round(p99, 3),
            "mean": round(sum(values) / n, 3), "min": round(values[0], 3), "max": round(values[-1], 3)}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def round_robin(calls: dict[str, Callable[[], Any]], budget_s: float, n_min: int, n_max: int,
                warmup: int = 2) -> dict[str, list[float]]:
    """Milliseconds per call of each callable, called in turn (a, b, c, a, b, c, ...) so that
    drift and other processes' load hit all of them alike. The number of rounds is chosen from
    the warm-up's cost to fit ``budget_s``, between ``n_min`` and ``n_max``."""
    start = time.perf_counter()
    for _ in range(max(1, warmup)):
        for fn in calls.values():
            fn()
    round_s = (time.perf_counter() - start) / max(1, warmup)
    n = int(min(n_max, max(n_min, budget_s / max(round_s, 1e-6))))
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(n):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - t0) * 1000.0)
    return out


# --- images ------------------------------------------------------------------------------------

def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def bottle_train() -> list[Path]:
    return image_files(BOTTLE / "train" / "good")


def bottle_test(defect: str) -> list[Path]:
    return image_files(BOTTLE / "test" / defect)


def read_rgb(path: Path, side: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, resized to side x side (INTER_AREA) when side is given."""
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read image {path}")
    if side is not None and bgr.shape[:2] != (side, side):
        bgr = cv2.resize(bgr, (side, side), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def png_bytes(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def synthetic_rgb(side: int, seed: int) -> np.ndarray:
    """A smooth random RGB image, for when the bottle data is missing."""
    import cv2

    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 3)


class AugmentedImages(Sequence):  # type: ignore[type-arg]
    """``n`` RGB training images made lazily from the bottle train set (209 images).

    The first min(n, 209) items are distinct original images (evenly spaced); the rest are
    flipped / rotated (90, 180, 270) / cropped (85-100 % of the side, random offset) copies,
    deterministic per index. Originals are cached once downscaled to ``source_side`` (448), so
    producing an item costs a slice and a copy, not a PNG decode. Without the bottle data,
    smooth random images stand in (and ``source`` says so).
    """

    def __init__(self, n: int, source_side: int = 448) -> None:
        self.n = n
        self.side = source_side
        self.files = bottle_train()
        self.source = "MVTec AD bottle train/good (augmented beyond 209)" if self.files else "synthetic"
        count = len(self.files) if self.files else 64
        self.order = spread(count, min(n, count))
        if n > count:  # every original first, then augmentations of each in turn
            self.order = list(range(count))
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.n

    def _base(self, index: int) -> np.ndarray:
        if index not in self._cache:
            self._cache[index] = (read_rgb(self.files[index], self.side) if self.files
                                  else synthetic_rgb(self.side, index))
        return self._cache[index]

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        base = self._base(self.order[i % len(self.order)])
        variant = i // len(self.order)
        if variant == 0:
            return base
        rng = np.random.default_rng(i)
        img = base
        if variant % 2:
            img = img[:, ::-1]
        if (variant // 2) % 2:
            img = img[::-1]
        img = np.rot90(img, k=int(rng.integers(0, 4)))
        frac = rng.uniform(0.85, 1.0)
        crop = int(round(img.shape[0] * frac))
        y, x = (int(v) for v in rng.integers(0, img.shape[0] - crop + 1, 2))
        return np.ascontiguousarray(img[y : y + crop, x : x + crop])


# --- backbones ---------------------------------------------------------------------------------

def dinov2_weights(folder: Path) -> Path:
    """Random-init DINOv2 ViT-S/14 weights in Meta layout, saved as a .pth in ``folder``.

    The timings do not depend on the weights' values; only the architecture matters.
    """
    import torch

    from engine.backbones.dinov2 import DinoV2ViTS14

    path = Path(folder) / "dinov2_vits14_random_init.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(DinoV2ViTS14().state_dict(), path)
    return path


def backbone_kwargs(name: str, side: int, scratch: Path) -> dict[str, Any]:
    """Settings keyword arguments that select a backbone at an input side."""
    kwargs: dict[str, Any] = {"backbone": name, "input_size": side}
    if name == "dinov2_vits14":
        kwargs["weights"] = dinov2_weights(scratch)
    return kwargs


# --- child processes ---------------------------------------------------------------------------

def run_child(target: str, params: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``module:function(params) -> dict`` in a fresh Python process and return its dict.

    A fresh process per measurement gives a clean RSS and ru_maxrss. The child's stderr goes to
    ours (progress lines); on failure the dict holds ``error``.
    """
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        params_path, result_path = Path(tmp) / "params.json", Path(tmp) / "result.json"
        params_path.write_text(json.dumps(params, default=str))
        cmd = [sys.executable, "-m", "bench.suite.worker", target, str(params_path), str(result_path)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, stdout=sys.stderr)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if result_path.exists():
            return json.loads(result_path.read_text())
        return {"error": f"child {target} exited with code {proc.returncode} and no result"}


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=prefix)
