"""Start-up and first-inference figures of the bundle (or of the source tree), for packaging/README.md.

    python packaging/measure.py [--exe dist/inspection-engine/inspection-engine] [--runs 3] [--evict]
    python packaging/measure.py --source            # the same with `python -m service`

Prepares a data root once (fit on 10 MVTec AD bottle images, 128 px, calibrate), then per run:
starts the server on it, times process start -> first ZeroMQ ``health`` reply, the first ``infer``
(model loaded from disk, first backbone call) and a second one over ZeroMQ, then SIGTERM -> exit.
``--evict`` drops the bundle's files from the page cache first (Linux posix_fadvise), which is the
state after a reboot: a "cold" start. Prints one line per run and the medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ipc.client import EngineClient  # noqa: E402
from ipc.errors import EngineUnavailable  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle"
MMPP = 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _png(path: Path) -> bytes:
    img = cv2.resize(cv2.imread(str(path), cv2.IMREAD_COLOR), (128, 128), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".png", img)[1].tobytes()


def _evict(folder: Path) -> None:
    """Ask the kernel to drop ``folder``'s files from the page cache (no-op off Linux)."""
    if not hasattr(os, "posix_fadvise"):
        return
    os.sync()  # dirty pages (a fresh build) are not dropped
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Server:
    def __init__(self, cmd: list[str], data_root: Path) -> None:
        self.endpoint = f"tcp://127.0.0.1:{_free_port()}"
        env = {**os.environ, "BACKEND_DATA_ROOT": str(data_root), "BACKEND_ZMQ_ENDPOINT": self.endpoint,
               "BACKEND_HTTP_PORT": str(_free_port()), "BACKEND_BACKBONE": "efficientnet_lite0"}
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, cwd=data_root.parent, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ready:"):
                self.ready.set()

    def first_health(self, client: EngineClient, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}")
            try:
                client.health(timeout=1.0)
                return time.perf_counter() - self.started
            except EngineUnavailable:
                continue
        raise SystemExit("no health reply")

    def stop(self) -> tuple[int, float]:
        # the ZeroMQ door answers before the REST door is up and the signal handlers are set;
        # a SIGTERM in that window ends the process with the default action
        self.ready.wait(120)
        t0 = time.perf_counter()
        self.proc.send_signal(signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGTERM)  # type: ignore[attr-defined]
        code = self.proc.wait(60)
        return code, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    exe_name = "inspection-engine" + (".exe" if os.name == "nt" else "")
    parser.add_argument("--exe", type=Path, default=ROOT / "dist" / "inspection-engine" / exe_name)
    parser.add_argument("--source", action="store_true", help="measure `python -m service` instead")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--evict", action="store_true", help="drop the bundle's files from the page cache per run")
    args = parser.parse_args(argv)
    cmd = [sys.executable, "-m", "service"] if args.source else [str(args.exe)]
    train = [_png(p) for p in sorted((DATA / "train" / "good").glob("*.png"))[:10]]
    probe = _png(sorted((DATA / "test" / "broken_large").glob("*.png"))[0])
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(tmp) / "data"
        server = Server(cmd, data_root)
        with EngineClient(server.endpoint, long_timeout=600) as client:
            server.first_health(client)
            fit = client.fit_ok("m", "roi", MMPP, train)
            client.calibrate_ng("m", "roi", MMPP, list(fit.ok_scores))
        server.stop()
        rows = []
        for run in range(args.runs):
            if args.evict and not args.source:
                _evict(args.exe.parent)
            server = Server(cmd, data_root)
            with EngineClient(server.endpoint, timeout=120) as client:
                health_s = server.first_health(client)
                t0 = time.perf_counter()
                client.infer("m", "roi", MMPP, probe)
                first_ms = (time.perf_counter() - t0) * 1000
                t0 = time.perf_counter()
                client.infer("m", "roi", MMPP, probe)
                second_ms = (time.perf_counter() - t0) * 1000
            code, stop_s = server.stop()
            rows.append((health_s, first_ms, second_ms, stop_s))
            print(f"run {run + 1}: first health {health_s:.2f} s, first infer {first_ms:.0f} ms, "
                  f"second infer {second_ms:.0f} ms, SIGTERM -> exit {code} in {stop_s:.2f} s", flush=True)
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    print(f"median of {len(rows)} ({'source' if args.source else args.exe}, {'evicted' if args.evict else 'warm'} "
          f"page cache, {os.cpu_count()} CPUs, {platform.platform()}, load avg "
          f"{os.getloadavg()[0] if hasattr(os, 'getloadavg') else 'n/a'}): first health {med[0]:.2f} s, "
          f"first infer {med[1]:.0f} ms, second infer {med[2]:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
