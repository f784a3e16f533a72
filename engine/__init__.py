"""Local visual-inspection engine: PatchCore over frozen backbone features, no transports."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

# Set before torch or faiss loads (each brings its own GNU OpenMP runtime, which reads it once).
# An idle OpenMP thread busy-waits after each parallel region: by default 300 000 spins, ~7 ms
# on the 2-core EPYC, during which the other runtime's threads (faiss's search right after
# torch's forward pass, and back) find the cores taken. 10 000 spins (~0.2 ms) still bridge the
# gaps between the operators of one forward pass. Measured, bottle Lite0 @ 416 (8 477 rows), the
# approximate search right after a forward pass: 16.9 ms against 10.3 ms with this bound, and
# the ROI's kNN stage 32.7-35.0 against 27.1-29.9 ms (defective), 23.1-24.4 against 19.6-21.4
# (good). An operator's own value is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

try:
    __version__ = version("inspection-engine")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0"

__all__ = ["Engine", "Settings", "__version__"]


def __getattr__(name: str) -> object:
    # lazy: `import engine` stays light (no torch, no faiss) until the facade is used
    if name == "Engine":
        from engine.api import Engine

        return Engine
    if name == "Settings":
        from engine.settings import Settings

        return Settings
    raise AttributeError(name)
