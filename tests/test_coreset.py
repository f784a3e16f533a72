"""Greedy k-center coreset: the cell-pruned loop against the plain one, covering radius against an
exact greedy reference, and the contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.coreset import (
    CoresetRule,
    _greedy_dense,
    covering_radius,
    greedy_cells,
    greedy_coreset,
    principal_axes,
    project,
)

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


@pytest.fixture(scope="module")
def large_bank() -> np.ndarray:
    """12 000 x 24 points around 60 centres of unequal spread: above the size where cells are used."""
    gen = np.random.default_rng(5)
    centres = gen.normal(size=(60, 24)) * 3.0
    member = gen.integers(0, 60, 12_000)
    spread = gen.uniform(0.2, 1.5, 60)[member, None]
    return (centres[member] + spread * gen.normal(size=(12_000, 24))).astype(np.float32)


@pytest.mark.parametrize("n_cells", [1, 7, 110, 400])
def test_cells_pick_what_the_plain_loop_picks(large_bank: np.ndarray, n_cells: int) -> None:
    """Pruning by cells is exact: the same rows, in the same order, whatever the cell count."""
    k = 1200
    plain = _greedy_dense(torch.from_numpy(large_bank), k, 17).numpy()
    cells = greedy_cells(large_bank, k, 17, n_cells=n_cells)
    np.testing.assert_array_equal(cells, plain)


def test_cells_exact_with_any_partition(large_bank: np.ndarray) -> None:
    """The grouping only decides speed: cells drawn on unrelated coordinates still pick the same rows."""
    k = 600
    plain = _greedy_dense(torch.from_numpy(large_bank), k, 3).numpy()
    unrelated = np.random.default_rng(9).normal(size=(len(large_bank), 4)).astype(np.float32)
    np.testing.assert_array_equal(greedy_cells(large_bank, k, 3, partition=unrelated, n_cells=50), plain)
    np.testing.assert_array_equal(greedy_cells(large_bank, k, 3, partition=large_bank[:, :2], n_cells=50), plain)


def test_coreset_unprojected_matches_exact_greedy_radius(large_bank: np.ndarray) -> None:
    k = 1200
    sel = greedy_coreset(torch.from_numpy(large_bank), k, projection_dim=None, seed=0)
    _check_selection(sel, len(large_bank), k)
    first = int(torch.randint(len(large_bank), (1,), generator=torch.Generator().manual_seed(0)))
    reference = _exact_greedy_radius(large_bank.astype(np.float64), k, first)
    assert covering_radius(torch.from_numpy(large_bank), sel) == pytest.approx(reference, rel=1e-3)


def test_principal_axes_orthonormal_and_ordered(large_bank: np.ndarray) -> None:
    x = torch.from_numpy(large_bank)
    mean, axes = principal_axes(x, seed=0)
    assert axes.shape == (24, 24)
    torch.testing.assert_close(axes.T @ axes, torch.eye(24), atol=1e-5, rtol=0)
    z = project(x, mean, axes)
    variance = z.var(0)
    assert torch.all(variance[:-1] >= variance[1:] - 1e-3)            # decreasing variance
    torch.testing.assert_close(z.mean(0), torch.zeros(24), atol=1e-3, rtol=0)
    # all axes kept: a rotation, distances unchanged
    torch.testing.assert_close(torch.cdist(z[:50], z[50:100]), torch.cdist(x[:50], x[50:100]), atol=1e-3, rtol=1e-4)


def test_coreset_projected_radius_close_to_exact_greedy(bank: np.ndarray, reference_radius: float) -> None:
    sel = greedy_coreset(torch.from_numpy(bank), K, seed=0, projection_dim=32)
    _check_selection(sel, N, K)
    assert covering_radius(torch.from_numpy(bank), sel) <= FACTOR * reference_radius


def test_coreset_same_seed_same_result(bank: np.ndarray) -> None:
    x = torch.from_numpy(bank)
    a = greedy_coreset(x, 50, seed=3)
    b = greedy_coreset(x, 50, seed=3)
    c = greedy_coreset(x, 50, seed=4)
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


def test_coreset_bad_shape_raises() -> None:
    with pytest.raises(ValueError, match="x must be"):
        greedy_coreset(torch.zeros(10), 2)


def test_coreset_no_duplicates_with_repeated_rows() -> None:
    """Regression: with repeated rows (flat image areas give identical patch features) every
    min-distance reaches 0 before k picks, and argmax used to pick already-picked rows again."""
    base = np.random.default_rng(0).normal(size=(100, 16)).astype(np.float32)
    x = torch.from_numpy(np.repeat(base, 20, axis=0))                     # 2000 rows, 100 distinct
    idx = _check_selection(greedy_coreset(x, 200), 2000, 200)
    assert len(np.unique(idx // 20)) == 100                               # every distinct row kept
    assert covering_radius(x, torch.from_numpy(idx)) == pytest.approx(0.0, abs=1e-2)
    assert greedy_coreset(torch.zeros(10, 4), 5).tolist() == [0, 1, 2, 3, 4]
    big = torch.from_numpy(np.repeat(base, 100, axis=0))                  # 10 000 rows: cells
    idx = _check_selection(greedy_coreset(big, 300), 10_000, 300)
    assert len(np.unique(idx // 100)) == 100


def test_covering_radius_known_answer() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [0.0, 1.0]])
    assert covering_radius(x, torch.tensor([0])) == pytest.approx(10.0)
    assert covering_radius(x, torch.tensor([0, 2])) == pytest.approx(5.0)
    assert covering_radius(x, torch.arange(4)) == pytest.approx(0.0, abs=1e-6)


def test_rule_keeps_exact_picks_up_to_its_row_limit() -> None:
    rule = CoresetRule(projection_dim=192, exact_max_rows=200_000, large_projection_dim=96)
    assert rule.axes(200_000, 152) is None            # Lite0 features as they are: exact greedy
    assert rule.axes(200_001, 152) == 96
    assert rule.axes(200_000, 384) == 192
    assert rule.axes(600_000, 384) == 96
    assert rule.axes(600_000, 64) is None             # fewer dimensions than the large limit
    assert CoresetRule(projection_dim=None).axes(10, 384) is None
    assert CoresetRule(projection_dim=None, exact_max_rows=5).axes(10, 384) == 96
