"""Command line of the engine library: ``python -m engine check`` and ``python -m engine evaluate``.

Serving (the engine with its ZeroMQ and REST doors) is the service's job: ``python -m service``.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def _check() -> int:
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "evaluate":
        from engine.evaluate import main as evaluate_main

        return evaluate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="load the backbone, extract features from one image, print a ready line")
    sub.add_parser("evaluate", help="image/pixel AUROC on MVTec-layout categories (see evaluate --help)")
    sub.add_parser("serve", help="moved: run `python -m service` (the engine with both doors)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        print("python -m engine serve moved: the engine with its doors is `python -m service` "
              "(or `make run`)", file=sys.stderr)
        return 2
    return _check()


if __name__ == "__main__":
    sys.exit(main())
