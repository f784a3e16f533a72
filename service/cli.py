"""Command line of the service: ``serve`` (default), ``check`` and ``evaluate`` (the engine's own)."""

from __future__ import annotations

import argparse
import multiprocessing
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    multiprocessing.freeze_support()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("check", "evaluate"):
        from engine.__main__ import main as engine_main

        return engine_main(argv)
    parser = argparse.ArgumentParser(prog="inspection-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the engine with the ZeroMQ door and the REST shim (default)")
    sub.add_parser("check", help="load the backbone, extract features from one image, print a ready line")
    sub.add_parser("evaluate", help="image/pixel AUROC on an MVTec-layout category (see evaluate --help)")
    parser.parse_args(argv)
    from service.serve import serve

    return serve()
