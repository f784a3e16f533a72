"""Greedy k-center coreset: covering radius against an exact greedy reference, and its contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.coreset import _split_k, covering_radius, greedy_coreset

N, D, K = 2000, 64, 200   # 10 %, PatchCore's usual ratio
FACTOR = 1.15             # allowed covering radius over the exact greedy reference


def _exact_greedy_radius(x: np.ndarray, k: int, first: int = 0) -> float:
    """Covering radius of an exact (float64, full-dimension, unchunked) greedy k-center."""
    min_d = np.linalg.norm(x - x[first], axis=1)
    for _ in range(k - 1):
        j = int(np.argmax(min_d))
        min_d = np.minimum(min_d, np.linalg.norm(x - x[j], axis=1))
    return float(min_d.max())


def _brute_radius(x: np.ndarray, selected: np.ndarray) -> float:
    d = np.linalg.norm(x[:, None, :] - x[selected][None, :, :], axis=2)   # N k
    return float(d.min(1).max())


@pytest.fixture(scope="module")
def bank() -> np.ndarray:
    """2000 x 64 points around 20 cluster centres (seeded)."""
    gen = np.random.default_rng(0)
    centres = gen.normal(size=(20, D)) * 4.0
    return (centres[gen.integers(0, 20, N)] + gen.normal(size=(N, D))).astype(np.float32)


@pytest.fixture(scope="module")
def reference_radius(bank: np.ndarray) -> float:
    return _exact_greedy_radius(bank.astype(np.float64), K)


def _check_selection(sel: torch.Tensor, n: int, k: int) -> np.ndarray:
    idx = sel.numpy()
    assert idx.shape == (k,)
    assert len(np.unique(idx)) == k                       # no duplicates
    assert np.all(np.diff(idx) > 0)                       # sorted ascending
    assert idx.min() >= 0 and idx.max() < n
    return idx


def test_coreset_radius_close_to_exact_greedy(bank: np.ndarray, reference_radius: float) -> None:
    sel = greedy_coreset(torch.from_numpy(bank), K, seed=0)
    idx = _check_selection(sel, N, K)
    radius = covering_radius(torch.from_numpy(bank), sel)
    assert radius == pytest.approx(_brute_radius(bank, idx), rel=1e-4)
    assert radius <= FACTOR * reference_radius
    # and it is a real thinning: much better than k random rows
    random_rows = np.sort(np.random.default_rng(1).choice(N, K, replace=False))
    assert radius < _brute_radius(bank, random_rows)


def test_coreset_chunked_radius_close_to_exact_greedy(bank: np.ndarray, reference_radius: float) -> None:
    sel = greedy_coreset(torch.from_numpy(bank), K, seed=0, chunk_size=300)   # 7 chunks
    _check_selection(sel, N, K)
    assert covering_radius(torch.from_numpy(bank), sel) <= FACTOR * reference_radius


def test_coreset_projected_radius_close_to_exact_greedy(bank: np.ndarray, reference_radius: float) -> None:
    sel = greedy_coreset(torch.from_numpy(bank), K, seed=0, projection_dim=32)
    _check_selection(sel, N, K)
    assert covering_radius(torch.from_numpy(bank), sel) <= FACTOR * reference_radius


def test_coreset_same_seed_same_result(bank: np.ndarray) -> None:
    x = torch.from_numpy(bank)
    a = greedy_coreset(x, 50, seed=3, chunk_size=500)
    b = greedy_coreset(x, 50, seed=3, chunk_size=500)
    c = greedy_coreset(x, 50, seed=4, chunk_size=500)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_coreset_k_equal_n_returns_all() -> None:
    x = torch.randn(37, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy_coreset(x, 37), torch.arange(37))


def test_coreset_k_one() -> None:
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    assert greedy_coreset(x, 1).shape == (1,)


@pytest.mark.parametrize("k", [0, -1, 11])
def test_coreset_bad_k_raises(k: int) -> None:
    with pytest.raises(ValueError, match="k must be in 1..10"):
        greedy_coreset(torch.zeros(10, 3), k)


def test_coreset_bad_shape_and_chunk_raise() -> None:
    with pytest.raises(ValueError, match="x must be"):
        greedy_coreset(torch.zeros(10), 2)
    with pytest.raises(ValueError, match="chunk_size"):
        greedy_coreset(torch.zeros(10, 3), 2, chunk_size=0)


def test_coreset_no_duplicates_with_repeated_rows() -> None:
    """Regression: with repeated rows (flat image areas give identical patch features) every
    min-distance reaches 0 before k picks, and argmax used to pick already-picked rows again."""
    base = np.random.default_rng(0).normal(size=(100, 16)).astype(np.float32)
    x = torch.from_numpy(np.repeat(base, 20, axis=0))                     # 2000 rows, 100 distinct
    idx = _check_selection(greedy_coreset(x, 200), 2000, 200)
    assert len(np.unique(idx // 20)) == 100                               # every distinct row kept
    assert covering_radius(x, torch.from_numpy(idx)) == pytest.approx(0.0, abs=1e-2)
    _check_selection(greedy_coreset(x, 200, chunk_size=500), 2000, 200)
    assert greedy_coreset(torch.zeros(10, 4), 5).tolist() == [0, 1, 2, 3, 4]


def test_covering_radius_known_answer() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [0.0, 1.0]])
    assert covering_radius(x, torch.tensor([0])) == pytest.approx(10.0)
    assert covering_radius(x, torch.tensor([0, 2])) == pytest.approx(5.0)
    assert covering_radius(x, torch.arange(4)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("k", "sizes", "expected"),
    [
        (10, [50, 50], [5, 5]),
        (4, [3, 3, 3], [2, 1, 1]),             # 4/3 each: the one remainder goes to the first tie
        (9, [3, 3, 3], [3, 3, 3]),             # k == total: every row
        (7, [10, 1, 1], [6, 1, 0]),
        (1, [1000, 1, 1], [1, 0, 0]),
    ],
)
def test_split_k_known_shares(k: int, sizes: list[int], expected: list[int]) -> None:
    assert _split_k(k, sizes) == expected


@pytest.mark.parametrize("seed", range(20))
def test_split_k_sums_to_k_within_sizes(seed: int) -> None:
    gen = np.random.default_rng(seed)
    sizes = [int(s) for s in gen.integers(1, 50, gen.integers(1, 8))]
    k = int(gen.integers(1, sum(sizes) + 1))
    shares = _split_k(k, sizes)
    assert sum(shares) == k
    assert all(0 <= share <= size for share, size in zip(shares, sizes, strict=True))
    # proportional: each share within one of its exact proportion
    assert all(abs(share - k * size / sum(sizes)) < 1 + 1e-9 for share, size in zip(shares, sizes, strict=True))
