"""Local visual-inspection engine: PatchCore over frozen backbone features, no transports."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

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
