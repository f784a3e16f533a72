"""Shared fixtures: the MVTec AD bottle folder (real images; tests that need it skip without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import MVTEC_BOTTLE


@pytest.fixture(scope="session")
def bottle_dir() -> Path:
    """``<shared>/data/mvtec_ad/bottle``; skips the requesting test when the folder is absent."""
    if not (MVTEC_BOTTLE / "train" / "good").is_dir():
        pytest.skip(f"MVTec AD bottle images not found at {MVTEC_BOTTLE}")
    return MVTEC_BOTTLE
