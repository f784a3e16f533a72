"""Command line: ``python -m engine serve`` (both doors) and ``python -m engine check``."""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
import threading
import time

__all__ = ["main"]


def _check(args: argparse.Namespace) -> int:
    """Load the configured backbone, extract features from one image, print a ready line."""
    import numpy as np

    from engine.api import Engine
    from engine.settings import Settings

    engine = Engine(Settings())
    side = engine.backbone_info.input_size
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    start = time.perf_counter()
    features = engine.extractor([image])
    ms = (time.perf_counter() - start) * 1000
    print(f"ready: backbone={engine.backbone_info.name} device={engine.device} "
          f"features={tuple(features.shape)} extract_ms={ms:.1f} ({engine.backbone_reason})", flush=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from engine.api import Engine
    from engine.logs import configure_logging
    from engine.settings import Settings

    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    import structlog

    log = structlog.get_logger("engine.serve")
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    # installed before the doors start: a SIGTERM while the second door is starting must
    # still shut down cleanly, not kill the process
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    if hasattr(signal, "SIGBREAK"):  # Ctrl+Break in a Windows console
        signal.signal(signal.SIGBREAK, _on_signal)
    engine = Engine(settings)
    doors = []
    try:
        if settings.zmq_enabled:
            from ipc.server import IpcServer

            ipc = IpcServer(engine, settings)
            ipc.start()
            doors.append(ipc)
        if settings.http_enabled:
            from http_compat.server import HttpServer

            http = HttpServer(engine, settings)
            http.start()
            doors.append(http)
    except Exception:
        for door in reversed(doors):
            door.stop()
        raise
    ready = {"backbone": engine.backbone_info.name, "device": engine.device}
    if settings.zmq_enabled:
        ready["zmq"] = doors[0].endpoint
    if settings.http_enabled:
        ready["http"] = f"http://{settings.http_host}:{doors[-1].port}"
    log.info("serving", **ready)
    print("ready: " + " ".join(f"{k}={v}" for k, v in ready.items()), flush=True)
    while not stop.wait(0.5):
        pass
    log.info("shutting_down")
    for door in reversed(doors):
        door.stop()
    engine.close()
    log.info("stopped")
    return 0


def _evaluate(argv: list[str]) -> int:
    from engine.evaluate import main as evaluate_main

    return evaluate_main(argv)


def main(argv: list[str] | None = None) -> int:
    multiprocessing.freeze_support()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "evaluate":
        return _evaluate(argv[1:])
    parser = argparse.ArgumentParser(prog="inspection-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the engine with the ZeroMQ door and the REST shim (default)")
    sub.add_parser("check", help="load the backbone, extract features from one image, print a ready line")
    sub.add_parser("evaluate", help="image/pixel AUROC on an MVTec-layout category (see --help)")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
