"""Soak with hostile clients: normal inspections beside attackers, against one ``python -m service``.

Starts the real server (both doors on loopback, an API key, a temporary data root), fits and
calibrates two ROIs, warms up, then runs the same closed-loop inspections in alternating windows of
``--seconds`` (``--rounds`` pairs, so load drift on a shared machine hits both alike): on an
otherwise idle server, and while hostile clients attack both doors at once:

* ZeroMQ: unauthenticated 16 MB messages (an array of empty arrays), a wrong key before 16 MB of
  args, a DEALER that sends 500 ``dataset_file`` requests every 5 s and never reads, 2 500-item
  ``infer_batch`` calls;
* REST: 600 idle connections kept open (reopened as the server closes them), 20 slow-header
  connections, bodies dripped a byte a second, 8000x8000 16-bit PNG bombs, 4 MB JSON bodies of a
  million wrong items, forged cross-site ``/fit_ok`` posts;
* on request only (``--attacks rest_one_byte_connections``): 600 connections that each send one
  byte of a request line, reopened as the connection cap evicts them.

Prints latency percentiles of the normal inspections per door in both phases and their p99 ratio,
the server's resident memory (sampled every 0.2 s) and what the attackers got back. Exit status 0
when the normal inspections had no error, their p99 under attack stayed within ``--max-ratio`` of
the idle p99 on each door, and the server's RSS stayed within ``--max-rss-growth`` MiB of its
post-warm-up value.

    .venv/bin/python bench/soak_hostile.py                              # 3 x (20 s + 20 s), ~3 min
    .venv/bin/python bench/soak_hostile.py --rounds 1 --seconds 10      # a quick look
    .venv/bin/python bench/soak_hostile.py --attacks rest_idle_connections   # one attack alone
    .venv/bin/python bench/soak_hostile.py --attackers-nice 19      # attackers' own CPU out of the way
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run as a script from anywhere

from bench.soak import _images, _percentiles  # noqa: E402
from ipc import EngineClient, RemoteError  # noqa: E402
from service.child import ServiceProcess  # noqa: E402

ROLE, MM, KEY = "soak", 0.1, "soak-key"
MIB = 1024 * 1024


def _start(root: Path, args: argparse.Namespace) -> ServiceProcess:
    """``python -m service`` with both doors and an API key."""
    env = {"BACKEND_INPUT_SIZE": str(args.input_size), "BACKEND_BACKBONE": "efficientnet_lite0",
           "BACKEND_DEVICE": "cpu", "BACKEND_ZMQ_WORKERS": str(args.workers), "BACKEND_LOG_LEVEL": "WARNING",
           "BACKEND_API_KEY": KEY}
    if args.torch_threads:
        env["BACKEND_TORCH_THREADS"] = str(args.torch_threads)
    return ServiceProcess(root, root / "serve.log", env)


# --- normal inspections -----------------------------------------------------------------------------

def _inspect(server: ServiceProcess, args: argparse.Namespace, pool: list[bytes], seconds: float) -> dict[str, Any]:
    """Closed-loop infers for ``seconds``: ``--clients`` ZeroMQ clients and one REST client."""
    latencies: dict[str, list[float]] = {"zmq": [], "rest": []}
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def record(door: str, start: float, error: str | None) -> None:
        with lock:
            latencies[door].append((time.perf_counter() - start) * 1e3)
            if error:
                errors[f"{door}:{error}"] += 1

    def zmq_client(k: int) -> None:
        with EngineClient(server.zmq_endpoint, api_key=KEY, timeout=60, retries=0) as client:
            i = 0
            while time.monotonic() < deadline:
                start, error = time.perf_counter(), None
                try:
                    client.call("infer", {"role_id": ROLE, "roi_id": "ab"[(i + k) % 2], "mm_per_px": MM,
                                          "image": pool[(i * 7 + k) % len(pool)]})
                except RemoteError as exc:
                    error = exc.code
                except Exception as exc:  # noqa: BLE001 - a timeout or a broken client counts as an error
                    error = type(exc).__name__
                record("zmq", start, error)
                i += 1

    def rest_client() -> None:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as web:
            i = 0
            while time.monotonic() < deadline:
                start, error = time.perf_counter(), None
                try:
                    r = web.post("/infer", data={"role_id": ROLE, "roi_id": "ab"[i % 2], "mm_per_px": str(MM)},
                                 files={"image": ("roi.png", pool[(i * 3) % len(pool)], "image/png")})
                    error = None if r.status_code == 200 else str(r.json().get("code", r.status_code))
                except Exception as exc:  # noqa: BLE001
                    error = type(exc).__name__
                record("rest", start, error)
                i += 1

    threads = [threading.Thread(target=zmq_client, args=(k,)) for k in range(args.clients)]
    threads.append(threading.Thread(target=rest_client))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors}


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in values.items()}


# --- hostile clients --------------------------------------------------------------------------------

class Attackers:
    """Hostile clients in threads until ``stop``; ``answers`` counts what each got back."""

    def __init__(self, server: ServiceProcess, names: list[str]) -> None:
        self.server = server
        self.stop = threading.Event()
        self.answers: dict[str, Counter[str]] = {name: Counter() for name in names}
        self._names = names
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._threads: list[threading.Thread] = []
        self._local = threading.local()
        # built once: the attackers' own CPU should go into sending, not into building payloads
        n = 16 * MIB - 5
        self._empty_arrays = b"\xdd" + struct.pack(">I", n) + b"\x90" * n
        self._wrong_key = msgpack.packb({"v": 1, "op": "infer", "id": "x", "api_key": "wrong",
                                         "args": {"image": bytes(16 * MIB)}})
        self._batch = msgpack.packb({"v": 1, "op": "infer_batch", "id": "b", "api_key": KEY, "args": {
            "role_id": ROLE, "items": [{"roi_id": "a", "mm_per_px": MM, "image": _images(8, 1, 0)[0]}] * 2500}})
        self._bomb = _png_16bit_rgba_zeros(8000)
        self._million = (b'{"role_id":"soak","roi_id":"a","mm_per_px":0.1,"ok_scores":['
                         + b",".join([b'"x"'] * 1_000_000) + b"]}")
        self._forged = _images(64, 1, 5)[0]

    def start(self) -> None:
        self.stop.clear()
        for name in self._names:
            every, attack = ATTACKS[name]
            thread = threading.Thread(target=self._loop, args=(name, every, getattr(self, attack)), daemon=True)
            self._threads.append(thread)
            thread.start()

    def pause(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)
        self._threads = []

    def close(self) -> None:
        self.pause()
        self._ctx.destroy(linger=0)


    def _loop(self, name: str, every: float, attack: Callable[[], str]) -> None:
        while not self.stop.is_set():
            try:
                outcome = attack()
            except Exception as exc:  # noqa: BLE001 - the attacker's own failures are outcomes too
                outcome = type(exc).__name__
            self.answers[name][outcome] += 1
            self.stop.wait(every)

    def _zmq_raw(self, payload: bytes) -> str:
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.server.zmq_endpoint)
            sock.send(payload)
            if not sock.poll(10_000, zmq.POLLIN):
                return "no_reply"
            reply = msgpack.unpackb(sock.recv())
            return f"{reply.get('status')} {reply.get('error', {}).get('code')}"
        finally:
            sock.close(linger=0)

    def _zmq_array_of_empty_arrays(self) -> str:
        return self._zmq_raw(self._empty_arrays)

    def _zmq_wrong_key(self) -> str:
        return self._zmq_raw(self._wrong_key)

    def _zmq_big_batch(self) -> str:
        return self._zmq_raw(self._batch)

    def _dealer_never_reads(self) -> str:
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVHWM, 1)
        dealer.setsockopt(zmq.RCVBUF, 4096)
        request = msgpack.packb({"v": 1, "op": "dataset_file", "id": "d", "api_key": KEY, "args": {
            "role_id": ROLE, "roi_id": "a", "label": "ok", "filename": "big.png"}})
        try:
            dealer.connect(self.server.zmq_endpoint)
            for _ in range(500):
                dealer.send_multipart([b"", request])
            self.stop.wait(5.0)
        finally:
            dealer.close(linger=0)
        return "sent 500"

    def _rest_post(self, path: str, **kwargs: Any) -> str:
        web = getattr(self._local, "web", None)
        if web is None:                   # one client per attacker thread: its own set-up costs CPU too
            web = self._local.web = httpx.Client(base_url=self.server.url, timeout=30)
        r = web.post(path, **kwargs)
        return f"{r.status_code} {r.json().get('code')}"

    def _rest_bomb(self) -> str:
        return self._rest_post("/infer", headers={"X-API-Key": KEY},
                               data={"role_id": ROLE, "roi_id": "a", "mm_per_px": str(MM)},
                               files={"image": ("bomb.png", self._bomb, "image/png")})

    def _rest_json_million(self) -> str:
        return self._rest_post("/calibrate_ng", content=self._million,
                               headers={"X-API-Key": KEY, "Content-Type": "application/json"})

    def _rest_cross_site(self) -> str:
        return self._rest_post("/fit_ok", headers={"X-API-Key": KEY, "Origin": "http://evil.example"},
                               data={"role_id": ROLE, "roi_id": "forged", "mm_per_px": str(MM)},
                               files={"images": ("x.png", self._forged, "image/png")})

    def _rest_idle(self) -> str:
        """Keep 600 silent connections open, reopening those the server closed, for the whole phase."""
        return self._rest_held(b"")

    def _rest_one_byte(self) -> str:
        """The same with connections that each send one byte of a request line and then nothing."""
        return self._rest_held(b"G")

    def _rest_held(self, first: bytes) -> str:
        socks: list[socket.socket] = []
        reopened = 0
        while not self.stop.is_set():
            alive = []
            for s in socks:
                try:
                    if s.recv(1, socket.MSG_DONTWAIT) == b"":
                        s.close()
                        reopened += 1
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
                    reopened += 1
                    continue
                alive.append(s)
            socks = alive
            while len(socks) < 600:
                s = socket.socket()
                if first:
                    s.settimeout(2.0)
                    try:
                        s.connect(("127.0.0.1", self.server.http_port))
                        s.sendall(first)
                    except OSError:
                        s.close()
                        continue
                    s.setblocking(False)
                else:
                    s.setblocking(False)
                    try:
                        s.connect(("127.0.0.1", self.server.http_port))
                    except BlockingIOError:
                        pass
                socks.append(s)
            self.stop.wait(1.0)
        for s in socks:
            s.close()
        return f"reopened {reopened}"

    def _rest_slow(self) -> str:
        """20 connections sending a header byte a second, and one dripping a body; reopen when closed."""
        head = b"POST /calibrate_ng HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + KEY.encode()
        closed = 0
        conns: list[tuple[socket.socket, int]] = []
        while not self.stop.is_set():
            while len(conns) < 20:
                conns.append((socket.create_connection(("127.0.0.1", self.server.http_port), timeout=5), 0))
            kept = []
            for sock, sent in conns:
                try:
                    sock.sendall(head[sent:sent + 1] if sent < len(head) else b"x")
                    kept.append((sock, sent + 1))
                except OSError:
                    sock.close()
                    closed += 1
            conns = kept
            self.stop.wait(1.0)
        for sock, _ in conns:
            sock.close()
        return f"closed by the server {closed}"


# name: (seconds between attacks, method of Attackers)
ATTACKS: dict[str, tuple[float, str]] = {
    "zmq_16mb_unauthenticated": (0.5, "_zmq_array_of_empty_arrays"),
    "zmq_wrong_key_16mb_args": (0.5, "_zmq_wrong_key"),
    "zmq_batch_2500_items": (1.0, "_zmq_big_batch"),
    "zmq_dealer_never_reads": (0.0, "_dealer_never_reads"),
    "rest_png_bomb": (1.0, "_rest_bomb"),
    "rest_json_million_items": (1.0, "_rest_json_million"),
    "rest_cross_site_fit": (0.2, "_rest_cross_site"),
    "rest_idle_connections": (0.0, "_rest_idle"),
    "rest_one_byte_connections": (0.0, "_rest_one_byte"),
    "rest_slow_headers_and_drip": (0.0, "_rest_slow"),
}
# the classes of docs/reliability.md; a flood of connections that each send one byte (past the
# kernel's hold of silent ones) is run on its own: see docs/reliability.md, "Soak with hostile clients"
DEFAULT_ATTACKS = [name for name in ATTACKS if name != "rest_one_byte_connections"]


def _png_16bit_rgba_zeros(side: int) -> bytes:
    """A valid 16-bit RGBA PNG of zeros (under 1 MB; 512 MiB decoded at 8000 px)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), bytes(1 + side * 8)
    first = packer.compress(row) + packer.flush(zlib.Z_FULL_FLUSH)
    again = packer.compress(row) + packer.flush(zlib.Z_FULL_FLUSH)
    end = packer.flush()
    checksum = 1
    for _ in range(side):
        checksum = zlib.adler32(row, checksum)
    stream = first + again * (side - 1) + end[:-4] + struct.pack(">I", checksum)
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


# --- the run ------------------------------------------------------------------------------------------

def _sampled(server: ServiceProcess, action: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], list[int]]:
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            samples.append(server.rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        return action(), samples
    finally:
        stop.set()
        sampler.join()


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="soak-hostile-"))
    server = _start(root, args)
    try:
        pool = _images(args.side, 40, seed=1)
        with EngineClient(server.zmq_endpoint, api_key=KEY, timeout=600, retries=0) as admin:
            for roi, seed in (("a", 2), ("b", 3)):
                fit = admin.call("fit_ok", {"role_id": ROLE, "roi_id": roi, "mm_per_px": MM,
                                            "images": _images(args.side, 12, seed)})
                admin.call("calibrate_ng", {"role_id": ROLE, "roi_id": roi, "mm_per_px": MM,
                                            "ok_scores": list(fit["ok_scores"])})
            big = cv2_png(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8))
            admin.call("dataset_upload", {"role_id": ROLE, "roi_id": "a", "label": "ok", "image": big,
                                          "filename": "big.png"})
        _inspect(server, args, pool, args.warmup_seconds)
        rss_start, lines_start = server.rss, len(server.log_lines())
        windows: dict[str, list[dict[str, Any]]] = {"idle": [], "attacked": []}
        rss: dict[str, list[int]] = {"idle": [], "attacked": []}
        answers: dict[str, Counter[str]] = {name: Counter() for name in args.attacks}
        for _ in range(args.rounds):          # alternating windows: load drift on a shared machine hits both
            for phase in ("idle", "attacked"):
                attacker = _attacker_process(server, args) if phase == "attacked" else None
                result, samples = _sampled(server, lambda: _inspect(server, args, pool, args.seconds))
                if attacker is not None:
                    for name, counts in _attacker_answers(attacker).items():
                        answers[name].update(counts)
                windows[phase].append(result)
                rss[phase] += samples
        time.sleep(2.0)
        return _report(args, server, windows, answers, rss_start, rss, lines_start)
    finally:
        server.stop()


def _attacker_process(server: ServiceProcess, args: argparse.Namespace) -> subprocess.Popen[str]:
    """The attackers in a process of their own (as a hostile program would be): their CPU and GIL
    do not slow the inspection clients of this process."""
    proc = subprocess.Popen([sys.executable, __file__, "--attack", server.zmq_endpoint, str(server.http_port),
                             str(args.seconds), "--attacks", ",".join(args.attacks)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: os.nice(args.attackers_nice)) if args.attackers_nice else None)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "attacking"
    return proc


def _attacker_answers(proc: subprocess.Popen[str]) -> dict[str, dict[str, int]]:
    out, _ = proc.communicate(timeout=120)
    answers: dict[str, dict[str, int]] = json.loads(out)
    return answers


def _attack(zmq_endpoint: str, http_port: int, seconds: float, names: list[str]) -> None:
    """``--attack`` mode: run the attackers for ``seconds``, print what they got back as JSON."""
    target = argparse.Namespace(zmq_endpoint=zmq_endpoint, http_port=http_port, url=f"http://127.0.0.1:{http_port}")
    attackers = Attackers(target, names)   # type: ignore[arg-type]
    print("attacking", flush=True)
    attackers.start()
    time.sleep(seconds)
    attackers.close()
    print(json.dumps({name: dict(c) for name, c in attackers.answers.items()}))


def cv2_png(image: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".png", image)[1].tobytes()


def _report(args: argparse.Namespace, server: ServiceProcess, windows: dict[str, list[dict[str, Any]]],
            answers: dict[str, Counter[str]], rss_start: int, rss: dict[str, list[int]],
            lines_start: int) -> dict[str, Any]:
    phases: dict[str, Any] = {}
    for phase, results in windows.items():
        merged = {door: [ms for r in results for ms in r["latencies"][door]] for door in ("zmq", "rest")}
        errors: Counter[str] = sum((r["errors"] for r in results), Counter())
        phases[phase] = {"zmq_ms": _rounded(_percentiles(merged["zmq"])),
                         "rest_ms": _rounded(_percentiles(merged["rest"])),
                         "requests": {door: len(v) for door, v in merged.items()}, "errors": dict(errors)}
    idle, attacked = phases["idle"], phases["attacked"]
    ratio = {door: round(attacked[f"{door}_ms"]["p99"] / idle[f"{door}_ms"]["p99"], 2) for door in ("zmq", "rest")}
    figures = {"after_warmup": round(rss_start / MIB, 1), "idle_peak": round(max(rss["idle"]) / MIB, 1),
               "attacked_peak": round(max(rss["attacked"]) / MIB, 1), "end": round(server.rss / MIB, 1)}
    figures["attacked_growth"] = round(figures["attacked_peak"] - figures["after_warmup"], 1)
    return {"settings": {"seconds": args.seconds, "rounds": args.rounds, "clients": args.clients, "side": args.side,
                         "input_size": args.input_size, "workers": args.workers, "cpus": os.cpu_count(),
                         "load_avg": [round(v, 2) for v in os.getloadavg()], "attacks": args.attacks},
            "idle": idle, "attacked": attacked, "p99_ratio": ratio, "rss_mib": figures,
            "attackers": {name: dict(c.most_common(4)) for name, c in answers.items()},
            "server_log_lines_during_run": len(server.log_lines()) - lines_start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each window")
    parser.add_argument("--rounds", type=int, default=3, help="idle/attacked window pairs, alternated")
    parser.add_argument("--attacks", type=lambda v: v.split(","), default=DEFAULT_ATTACKS,
                        help=f"comma-separated subset of: {', '.join(ATTACKS)}")
    parser.add_argument("--warmup-seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2, help="concurrent ZeroMQ inspection clients")
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--attackers-nice", type=int, default=0,
                        help="CPU niceness of the attacker process (a remote attacker's CPU is not the server's)")
    parser.add_argument("--torch-threads", type=int, default=0, help="BACKEND_TORCH_THREADS; 0 = the default")
    parser.add_argument("--max-ratio", type=float, default=2.0, help="allowed p99 under attack / idle p99")
    parser.add_argument("--max-rss-growth", type=float, default=512.0, help="MiB above the post-warm-up RSS")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--attack", nargs=3, metavar=("ZMQ", "HTTP_PORT", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attack:
        _attack(args.attack[0], int(args.attack[1]), float(args.attack[2]), args.attacks)
        return 0
    report = run(args)
    errors = report["idle"]["errors"] or report["attacked"]["errors"]
    ok = (not errors and max(report["p99_ratio"].values()) <= args.max_ratio
          and report["rss_mib"]["attacked_growth"] <= args.max_rss_growth)
    report["verdict"] = "PASS" if ok else "FAIL"
    print(json.dumps(report, indent=2) if args.json else _text(report))
    return 0 if ok else 1


def _text(report: dict[str, Any]) -> str:
    s, r = report["settings"], report["rss_mib"]
    lines = [f"hostile soak: {s['rounds']} x ({s['seconds']} s idle + {s['seconds']} s attacked), "
             f"{s['clients']} ZeroMQ + 1 REST inspection clients, "
             f"ROI {s['side']} px, input {s['input_size']} px, {s['cpus']} CPUs, load {s['load_avg']}"]
    for phase in ("idle", "attacked"):
        p = report[phase]
        lines.append(f"  {phase:8s} ZeroMQ ms {p['zmq_ms']}  REST ms {p['rest_ms']}  n {p['requests']}  "
                     f"errors {p['errors'] or 'none'}")
    lines.append(f"  p99 attacked / idle: {report['p99_ratio']}")
    lines.append(f"  server RSS MiB: after warm-up {r['after_warmup']}, idle peak {r['idle_peak']}, "
                 f"attacked peak {r['attacked_peak']} (+{r['attacked_growth']}), end {r['end']}")
    lines.append(f"  server log lines during both phases: {report['server_log_lines_during_run']}")
    for name, answers in report["attackers"].items():
        lines.append(f"  {name}: {answers}")
    lines.append(f"  verdict: {report['verdict']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
