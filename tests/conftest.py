"""Shared fixtures: the MVTec AD bottle folder (real images; tests that need it skip without it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import MVTEC_BOTTLE

# Test fits are tiny (a few images at 64-224 px): they keep 10 % of their patches, as the tests'
# expected memories and decisions were worked out for. The engine's default (1.5 %) is sized for
# hundreds of images; tests of the defaults pass it explicitly (test_quality_bottle).
os.environ.setdefault("PATCHCORE_CORESET_RATIO", "0.1")


@pytest.fixture(scope="session")
def bottle_dir() -> Path:
    """``<shared>/data/mvtec_ad/bottle``; skips the requesting test when the folder is absent."""
    if not (MVTEC_BOTTLE / "train" / "good").is_dir():
        pytest.skip(f"MVTec AD bottle images not found at {MVTEC_BOTTLE}")
    return MVTEC_BOTTLE
