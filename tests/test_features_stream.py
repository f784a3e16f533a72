"""FeatureExtractor.stream: batches in order, side by side on CPU threads, same features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.backbones.efficientnet_lite import load_efficientnet_lite
from engine.errors import InvalidImage
from engine.features import FeatureExtractor

SIDE = 64


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(load_efficientnet_lite("efficientnet_lite0", input_size=SIDE), "cpu", "fp32", 2)


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(n)]


def test_workers_give_the_sequential_features_in_order(extractor: FeatureExtractor) -> None:
    images = _images(9)
    skipped = {3, 4}
    load = lambda i: None if i in skipped else images[i]  # noqa: E731
    threads = torch.get_num_threads()
    serial = list(extractor.stream(len(images), load, workers=1))
    parallel = list(extractor.stream(len(images), load, workers=2))
    assert torch.get_num_threads() == threads
    assert [b.end for b in parallel] == [2, 4, 6, 8, 9]
    assert [b.indices for b in parallel] == [b.indices for b in serial] == [[0, 1], [2], [5], [6, 7], [8]]
    kept = [i for b in parallel for i in b.indices]
    assert [b.features.shape[0] for b in parallel] == [2, 1, 1, 2, 1]
    got = np.concatenate([b.features for b in parallel if b.features is not None])
    want = np.concatenate([b.features for b in serial if b.features is not None])
    direct = extractor([images[i] for i in kept])
    assert got.shape == want.shape == direct.shape
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(want, direct, rtol=1e-4, atol=1e-4)
    assert all(b.load_s >= 0 and b.extract_s >= 0 for b in parallel)


def test_a_load_error_reaches_the_caller(extractor: FeatureExtractor) -> None:
    images = _images(6)

    def load(i: int) -> np.ndarray:
        if i == 4:
            raise InvalidImage("image 4 is not an image")
        return images[i]

    with pytest.raises(InvalidImage, match="image 4"):
        list(extractor.stream(len(images), load, workers=2))
