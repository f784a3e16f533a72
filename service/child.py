"""``python -m service`` as a child process on loopback, for soaks and end-to-end tests that watch
the server from outside: its resident memory, descriptors and log, and its answers on both doors.

The child gets a clean environment (no ``BACKEND_*``, ``PATCHCORE_*`` or ``CALIB_*`` variable of the
caller leaks in), free loopback ports for both doors, and the settings it is given.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["ServiceProcess", "free_port"]

_REPO = Path(__file__).resolve().parents[1]
_SETTING_PREFIXES = ("BACKEND_", "PATCHCORE_", "CALIB_")


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """The service started with ``env`` (its ``BACKEND_*`` settings), ready when constructed.

    Args:
        data_root: the child's ``BACKEND_DATA_ROOT``.
        log_path: where its stderr (the structured log) goes.
        env: settings on top of the ports and the data root.
        max_files: the child's RLIMIT_NOFILE (POSIX), None = inherited.
        ready_timeout: seconds to wait for its ``ready:`` line.
    """

    def __init__(self, data_root: Path, log_path: Path, env: dict[str, str] | None = None, *,
                 max_files: int | None = None, ready_timeout: float = 120.0) -> None:
        self.http_port = free_port()
        self.zmq_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = log_path
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(_SETTING_PREFIXES)}
        child_env.update(BACKEND_DATA_ROOT=str(data_root), BACKEND_ZMQ_ENDPOINT=self.zmq_endpoint,
                         BACKEND_HTTP_PORT=str(self.http_port))
        child_env.update(env or {})
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=_REPO, env=child_env,
                                     stdout=subprocess.PIPE, stderr=self._log,
                                     preexec_fn=_limit_files(max_files) if max_files else None)
        self._wait_ready(ready_timeout)

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not sel.select(timeout=0.5):
                    continue
                line = self.proc.stdout.readline()
                if line.startswith(b"ready:"):
                    return
                if not line:
                    break
        self.stop()
        raise RuntimeError(f"python -m service did not start; see {self.log_path}")

    def _status(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} line")

    @property
    def rss(self) -> int:
        """Resident memory now (bytes; Linux)."""
        return self._status("VmRSS")

    @property
    def peak_rss(self) -> int:
        """Peak resident memory since start or the last ``reset_peak`` (bytes; Linux)."""
        return self._status("VmHWM")

    def reset_peak(self) -> None:
        """Start a new peak measurement (Linux: writing 5 to clear_refs resets VmHWM to VmRSS)."""
        with open(f"/proc/{self.proc.pid}/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def log_lines(self) -> list[str]:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def _limit_files(count: int) -> Callable[[], None]:
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))

    return limit
