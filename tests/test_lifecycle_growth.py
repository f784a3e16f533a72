"""The maths of add_ok (engine/growth.py) against plain reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.coreset import greedy_coreset
from engine.growth import estimate_radius, nearest, select_rows
from engine.knn import Distance, prepare_rows


def _pairwise(a: np.ndarray, b: np.ndarray, distance: Distance) -> np.ndarray:
    a, b = prepare_rows(a, distance).astype(np.float64), prepare_rows(b, distance).astype(np.float64)
    if distance == "l2":
        return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))
    return 1.0 - a @ b.T


def _reference(rows: np.ndarray, bank: np.ndarray, radius: float, distance: Distance, at_least: int) -> list[int]:
    """The greedy continuation written out plainly: farthest row from every kept row, one at a time."""
    gap = _pairwise(rows, bank, distance).min(1)
    taken: list[int] = []
    while True:
        j = int(np.argmax(gap))
        if gap[j] <= 0 or (gap[j] <= radius and len(taken) >= at_least):
            return taken
        taken.append(j)
        gap = np.minimum(gap, _pairwise(rows, rows[j:j + 1], distance)[:, 0])
        gap[j] = 0.0


def _spread(rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.normal(size=(150, 8)), rng.normal(3.0, 1.0, size=(50, 8))]).astype(np.float32)


def _clustered(rng: np.random.Generator) -> np.ndarray:
    """Near-duplicates, as the same part region in many images: batches end early, windows widen."""
    centres = rng.normal(0.0, 4.0, size=(12, 8))
    return (centres[rng.integers(0, 12, 600)] + rng.normal(0.0, 0.05, size=(600, 8))).astype(np.float32)


@pytest.mark.parametrize("layout", [_spread, _clustered])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("at_least", [0, 5, 60])
def test_select_rows_is_the_greedy_continuation(layout: object, distance: Distance, at_least: int) -> None:
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(40, 8)).astype(np.float32)
    rows = layout(rng)                                                       # type: ignore[operator]
    nn, _ = nearest(bank, rows, distance, 1)
    radius = float(np.quantile(nn, 0.7))
    chosen = select_rows(rows, nn, radius, distance, at_least)
    expected = _reference(rows, bank, radius, distance, at_least)
    assert sorted(chosen.tolist()) == sorted(expected)
    assert len(chosen) >= min(at_least, len(rows))
    grown = np.concatenate([bank, rows[chosen]])
    assert _pairwise(rows, grown, distance).min(1).max() <= radius * (1 + 1e-5)   # every new row covered


def test_nearest_matches_brute_force_with_k() -> None:
    rng = np.random.default_rng(4)
    bank, queries = rng.normal(size=(60, 6)).astype(np.float32), rng.normal(size=(25, 6)).astype(np.float32)
    nn, mean3 = nearest(bank, queries, "l2", 3)
    dist = np.sort(_pairwise(queries, bank, "l2"), axis=1)
    assert nn == pytest.approx(dist[:, 0], rel=1e-4) and mean3 == pytest.approx(dist[:, :3].mean(1), rel=1e-4)


def test_the_radius_estimate_is_close_to_a_coreset_s_own_covering_radius() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    keep = greedy_coreset(torch.from_numpy(x), 300, projection_dim=None, seed=0).numpy()
    bank = x[keep]
    covering = float(_pairwise(x, bank, "l2").min(1).max())
    estimate = estimate_radius(bank, "l2", seed=0)
    assert covering * 0.95 <= estimate <= covering * 1.6     # kept rows are at least the radius apart
    assert estimate_radius(bank[:1], "l2", seed=0) == 0.0
