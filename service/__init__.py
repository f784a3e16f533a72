"""The inspection service: one engine and its two doors in one process (the composition root).

``python -m service`` (or the ``inspection-engine`` console script, or the frozen bundle) builds
the engine from its settings, starts the ZeroMQ door and the REST shim on it, and stops them on
SIGINT/SIGTERM. ``engine`` knows nothing of this package; the doors know only the engine.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from service.cli import main as cli_main

    return cli_main(argv)
