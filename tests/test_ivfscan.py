"""The C scans of an inverted file's lists (engine/_ivfscan.c): exact against brute force, approximate
against its rule."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from threading import Barrier

import numpy as np
import pytest

from engine import ivfscan

pytestmark = pytest.mark.skipif(not ivfscan.BUILT, reason="C scan not built (no C compiler at install)")


def _lists(n: int, d: int, dim: int, sizes: list[int], seed: int,
           offset: float = 0.0) -> tuple[ivfscan.TiledLists, np.ndarray, np.ndarray]:
    """Tiled lists of random rows (true rows of ``dim``, coordinates their first ``d`` values, a
    lower bound of the true distance), with lists of the given sizes, and the rows."""
    assert sum(sizes) == n
    rng = np.random.default_rng(seed)
    rows = (rng.normal(size=(n, dim)) + offset).astype(np.float32)
    coords = np.ascontiguousarray(rows[:, :d])
    list_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    spans = list(itertools.pairwise(list_start.tolist()))
    centres = np.stack([coords[s:e].mean(0) if e > s else np.zeros(d, np.float32) for s, e in spans])
    radius = np.array([np.sqrt(((coords[s:e] - centres[i]) ** 2).sum(1).max()) if e > s else 0.0
                       for i, (s, e) in enumerate(spans)], dtype=np.float32)
    return (ivfscan.TiledLists.of(coords, list_start, centres.astype(np.float32), radius, rows, centres), rows,
            coords)


def _tiled_over(coords: np.ndarray, rows: np.ndarray, sizes: list[int]) -> ivfscan.TiledLists:
    """Tiled lists of consecutive rows of the given (nonzero) sizes, their balls around their mean
    coordinates."""
    list_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    spans = list(itertools.pairwise(list_start.tolist()))
    centres = np.stack([coords[s:e].mean(0) for s, e in spans]).astype(np.float32)
    radius = np.array([np.sqrt(((coords[s:e] - centres[i]) ** 2).sum(1).max()) for i, (s, e) in enumerate(spans)],
                      dtype=np.float32)
    return ivfscan.TiledLists.of(coords, list_start, centres, radius, rows, centres)


def _merged(tiled: ivfscan.TiledLists, queries: np.ndarray, reach_sq: np.ndarray, k: int,
            shown: np.ndarray | None, step: int) -> np.ndarray:
    parts = [tiled.exact(queries[:, : tiled.dims], queries, reach_sq, k, shown,
                         slice(first, min(tiled.lists, first + step))) for first in range(0, tiled.lists, step)]
    return np.sort(np.concatenate(parts, axis=1), axis=1)[:, :k]


def _brute(rows: np.ndarray, queries: np.ndarray, k: int, shown: np.ndarray | None = None) -> np.ndarray:
    sq = ((queries[:, None, :].astype(np.float64) - rows[None].astype(np.float64)) ** 2).sum(-1)
    if shown is not None:
        sq[:, ~shown] = np.inf
    return np.sort(sq, axis=1)[:, :k]


@pytest.mark.parametrize(("d", "dim"), [(7, 20), (16, 16), (32, 152), (5, 9)])
@pytest.mark.parametrize("k", [1, 4])
def test_the_scan_over_any_list_ranges_equals_brute_force(d: int, dim: int, k: int) -> None:
    """Lists of odd sizes (an empty one, some shorter than a panel), dimensions off the lane count,
    ranges of one or several panels of lists: the k nearest of the rows within reach."""
    sizes = [37, 0, 5, 16, 64, 1, 90, 17, 33, 2, 41, 22, 7, 19, 50, 3, 13]
    tiled, rows, _ = _lists(sum(sizes), d, dim, sizes, seed=d + dim)
    rng = np.random.default_rng(1)
    queries = np.concatenate([rows[rng.choice(len(rows), 40)] + rng.normal(size=(40, dim)).astype(np.float32) * 0.3,
                              rng.normal(size=(20, dim)).astype(np.float32) * 3])          # near the rows, and outliers
    truth = _brute(rows, queries, k)
    reach_sq = (truth[:, -1] * 1.001 + 1e-6).astype(np.float32)
    for step in (ivfscan.LANES, 2 * ivfscan.LANES, tiled.lists):
        np.testing.assert_allclose(_merged(tiled, queries, reach_sq, k, None, step), truth, rtol=1e-5, atol=1e-5)
    # a reach below the nearest row's distance: no row qualifies (coordinates are the rows' first values,
    # so a row outside the reach in coordinates is outside it in truth too, but not conversely)
    short = _merged(tiled, queries, (truth[:, 0] * 0.25).astype(np.float32), k, None, tiled.lists)
    coords_sq = _brute(rows[:, :d], queries[:, :d], 1)[:, 0]
    assert np.all(np.isinf(short[coords_sq > truth[:, 0] * 0.25 * 1.01]))


def test_hidden_rows_are_never_returned() -> None:
    sizes = [30, 70, 20, 50, 10, 60]
    tiled, rows, _ = _lists(sum(sizes), 8, 24, sizes, seed=3)
    rng = np.random.default_rng(4)
    queries = rows[rng.choice(len(rows), 30)] + rng.normal(size=(30, 24)).astype(np.float32) * 0.1
    shown = rng.random(len(rows)) < 0.4
    truth = _brute(rows, queries, 2, shown)
    got = _merged(tiled, queries, np.full(len(queries), np.inf, np.float32), 2, shown, ivfscan.LANES)
    np.testing.assert_allclose(got, truth, rtol=1e-5, atol=1e-5)


def test_a_range_ending_inside_a_panel_of_lists_scans_only_its_lists() -> None:
    """A query nearest to a row of a list past the range's end, in the same panel of lists, gets
    the nearest row of the range's lists: the lists past the end are held apart."""
    sizes = [12, 9, 30, 7, 25, 16, 11, 20]
    tiled, rows, _ = _lists(sum(sizes), 6, 18, sizes, seed=11)
    rng = np.random.default_rng(12)
    queries = rows[rng.choice(len(rows), 23)] + rng.normal(size=(23, 18)).astype(np.float32) * 0.2
    inf = np.full(len(queries), np.inf, np.float32)
    for end in (1, 3, 5, 8):
        in_range = np.arange(len(rows)) < sum(sizes[:end])
        got = tiled.exact(queries[:, : tiled.dims], queries, inf, 2, None, slice(0, end))
        np.testing.assert_allclose(got, _brute(rows, queries, 2, in_range), rtol=1e-5, atol=1e-5)


def test_calls_sharing_a_count_of_taken_panels_split_the_lists_between_them() -> None:
    """Threads scanning the same lists with one shared count each take panels of lists none has
    taken: together they take every panel once (the count ends one past the last for each call),
    and the minimum of their results is the whole scan's."""
    sizes = [25, 3, 40, 16, 9, 33, 1, 60] * 9
    tiled, rows, _ = _lists(sum(sizes), 8, 24, sizes, seed=21)
    rng = np.random.default_rng(22)
    queries = np.concatenate([rows[rng.choice(len(rows), 30)] + rng.normal(size=(30, 24)).astype(np.float32) * 0.2,
                              rng.normal(size=(10, 24)).astype(np.float32) * 3])
    truth = _brute(rows, queries, 1)
    reach_sq = (truth[:, 0] * 1.001 + 1e-6).astype(np.float32)
    panels = -(-tiled.lists // ivfscan.LANES)
    for calls in (1, 2, 3):
        taken = np.zeros(1, dtype=np.int64)

        def scan(_: int, taken: np.ndarray = taken) -> np.ndarray:
            return tiled.exact(queries[:, : tiled.dims], queries, reach_sq, 1, None, slice(0, tiled.lists), None, taken)

        with ThreadPoolExecutor(calls) as pool:
            parts = list(pool.map(scan, range(calls)))
        assert taken[0] == panels + calls
        np.testing.assert_allclose(np.minimum.reduce(parts), truth, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="taken"):
        tiled.exact(queries[:, : tiled.dims], queries, reach_sq, 1, None, slice(0, tiled.lists), None,
                    np.zeros(2, dtype=np.int64))


def test_bad_buffers_and_ranges_are_refused() -> None:
    sizes = [20, 20, 20]
    tiled, rows, coords = _lists(60, 4, 8, sizes, seed=5)
    queries, reach = rows[:3], np.ones(3, np.float32)
    with pytest.raises(ValueError, match="query size"):
        tiled.exact(coords[:3], rows[:2], reach, 1, None, slice(0, 3))
    with pytest.raises(ValueError, match="list range"):
        tiled.exact(coords[:3], queries, reach, 1, None, slice(1, 3))          # not the start of a panel
    with pytest.raises(ValueError, match="list range"):
        tiled.exact(coords[:3], queries, reach, 1, None, slice(0, 4))
    with pytest.raises(ValueError, match="shown size"):
        tiled.exact(coords[:3], queries, reach, 1, np.ones(59, bool), slice(0, 3))
    with pytest.raises(ValueError, match="k"):
        tiled.exact(coords[:3], queries, reach, 65, None, slice(0, 3))
    with pytest.raises(ValueError, match="cover"):
        ivfscan.TiledLists.of(coords, np.array([0, 20, 50]), np.zeros((2, 4), np.float32), np.zeros(2, np.float32),
                              rows, np.zeros((2, 4), np.float32))
    empty = tiled.exact(coords[:0], rows[:0], reach[:0], 1, None, slice(0, 3))
    assert empty.shape == (0, 1)


def _near_tie(last_taken: float, first_left: float) -> bool:
    return first_left - last_taken < 1e-4 * first_left


def _approximate_reference(tiled_rows: np.ndarray, coords: np.ndarray, sizes: list[int], centroids: np.ndarray,
                           queries: np.ndarray, nprobe: int, candidates: int, k: int
                           ) -> tuple[np.ndarray, np.ndarray]:
    """The approximate rule in float64, and for each query whether it is clear of near ties
    (the nprobe-th and next centroid, the candidates-th and next row, 1e-4 apart relatively)."""
    owner = np.repeat(np.arange(len(sizes)), sizes)
    q = queries.astype(np.float64)
    out = np.full((len(q), k), np.inf)
    clear = np.ones(len(q), dtype=bool)
    for i, (query, coord) in enumerate(zip(q, q[:, : coords.shape[1]], strict=True)):
        to_lists = ((centroids.astype(np.float64) - coord) ** 2).sum(1)      # an empty list takes a probe too
        order = np.argsort(to_lists)
        if nprobe < len(order) and _near_tie(to_lists[order[nprobe - 1]], to_lists[order[nprobe]]):
            clear[i] = False
        rows = np.flatnonzero(np.isin(owner, order[:nprobe]))
        to_rows = ((coords[rows].astype(np.float64) - coord) ** 2).sum(1)
        picked = np.argsort(to_rows)
        if candidates < len(picked) and _near_tie(to_rows[picked[candidates - 1]], to_rows[picked[candidates]]):
            clear[i] = False
        chosen = rows[picked[:candidates]]
        true_sq = np.sort(((tiled_rows[chosen].astype(np.float64) - query) ** 2).sum(1))[:k]
        out[i, : len(true_sq)] = true_sq
    return out, clear


@pytest.mark.parametrize(("d", "dim"), [(7, 20), (32, 152), (5, 9)])
@pytest.mark.parametrize(("nprobe", "candidates", "k"), [(1, 1, 1), (2, 8, 1), (3, 8, 4), (5, 40, 2)])
def test_the_approximate_scan_follows_its_rule(d: int, dim: int, nprobe: int, candidates: int, k: int) -> None:
    """Each query's nprobe lists of nearest centroid, their candidates rows nearest in coordinates,
    the k nearest of those by true distance: the reference's answer for every query clear of ties."""
    sizes = [37, 0, 5, 16, 64, 1, 90, 17, 33, 2, 41, 22, 7, 19, 50, 3, 13]
    tiled, rows, coords = _lists(sum(sizes), d, dim, sizes, seed=d * dim)
    rng = np.random.default_rng(2)
    queries = np.concatenate([rows[rng.choice(len(rows), 40)] + rng.normal(size=(40, dim)).astype(np.float32) * 0.3,
                              rng.normal(size=(20, dim)).astype(np.float32) * 3])
    spans = list(itertools.pairwise(np.concatenate([[0], np.cumsum(sizes)]).tolist()))
    centroids = np.stack([coords[s:e].mean(0) if e > s else np.zeros(d, np.float32) for s, e in spans])
    found = tiled.approximate(queries[:, :d], queries, nprobe, candidates, k, None)
    expected, clear = _approximate_reference(rows, coords, sizes, centroids, queries, nprobe, candidates, k)
    assert clear.sum() >= 45
    np.testing.assert_allclose(found[clear], expected[clear], rtol=1e-4, atol=1e-5)
    # true distances to real rows: never below the exact nearest ones
    assert np.all(found >= _brute(rows, queries, k) * (1 - 1e-5) - 1e-6)


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_the_probe_choices_first_look_leaves_the_probes_unchanged(offset: float) -> None:
    """The probe choice looks at each panel of centroids on its first SPLIT coordinates first (the
    rest by their lengths): the same answers, bit for bit, as comparing every centroid in full,
    with 200 lists (most panels left after the first look), outlying queries, and coordinates far
    from the origin (large norms: the rounding slack's case)."""
    sizes = [int(v) for v in np.random.default_rng(7).integers(0, 30, 200)]
    tiled, rows, _ = _lists(sum(sizes), 32, 64, sizes, seed=8, offset=offset)
    assert tiled.centroid_tails is not None
    full = replace(tiled, centroid_tails=None)
    rng = np.random.default_rng(9)
    queries = np.concatenate([rows[rng.choice(len(rows), 60)] + rng.normal(size=(60, 64)).astype(np.float32) * 0.2,
                              rows[:40] + rng.normal(size=(40, 64)).astype(np.float32) * 4])
    for nprobe, candidates, k in ((1, 4, 1), (3, 8, 2), (8, 16, 4)):
        looked = tiled.approximate(queries[:, :32], queries, nprobe, candidates, k, None)
        np.testing.assert_array_equal(looked, full.approximate(queries[:, :32], queries, nprobe, candidates, k, None))
    with pytest.raises(ValueError, match="centroid tails"):
        replace(tiled, centroid_tails=tiled.centroid_tails[:-1]).approximate(queries[:, :32], queries, 1, 4, 1, None)


def test_the_approximate_scan_probing_everything_is_exact_and_hides_rows() -> None:
    sizes = [20, 0, 33, 16, 7, 41]
    tiled, rows, _ = _lists(sum(sizes), 6, 12, sizes, seed=11)
    rng = np.random.default_rng(4)
    queries = rng.normal(size=(30, 12)).astype(np.float32)
    everything = tiled.approximate(queries[:, :6], queries, tiled.lists, len(rows), 3, None)
    np.testing.assert_allclose(everything, _brute(rows, queries, 3), rtol=1e-5, atol=1e-5)
    shown = rng.random(len(rows)) < 0.5
    hidden = tiled.approximate(queries[:, :6], queries, tiled.lists, len(rows), 3, shown)
    np.testing.assert_allclose(hidden, _brute(rows, queries, 3, shown), rtol=1e-5, atol=1e-5)
    # fewer shown rows than k in the probed lists: +inf where none is left
    few = np.zeros(len(rows), dtype=bool)
    few[[3, 50]] = True
    two = tiled.approximate(queries[:, :6], queries, tiled.lists, len(rows), 3, few)
    assert np.isfinite(two[:, :2]).all() and np.isinf(two[:, 2]).all()
    with pytest.raises(ValueError, match="nprobe"):
        tiled.approximate(queries[:, :6], queries, tiled.lists + 1, 8, 1, None)
    with pytest.raises(ValueError, match="candidates"):
        tiled.approximate(queries[:, :6], queries, 1, 2, 3, None)


@pytest.mark.parametrize(("n", "dim", "axes"), [(1, 5, 1), (7, 152, 31), (40, 100, 32), (9, 70, 45), (3, 80, 64)])
def test_the_c_projection_gives_the_float64_coordinates_to_float32_rounding(n: int, dim: int, axes: int) -> None:
    """Principal coordinates and the residual length, odd row counts and axes past one block of
    the C loop included: within float32 rounding of the float64 computation, and computed in
    float64 when precise."""
    rng = np.random.default_rng(dim + axes)
    rows = (rng.normal(size=(n, dim)) * rng.uniform(0.5, 3.0, size=dim)).astype(np.float32)
    mean = rng.normal(size=dim)
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:, :axes].T                # axes dim, orthonormal
    centred = rows.astype(np.float64) - mean
    principal = centred @ basis.T
    residual = np.sqrt(np.maximum((centred**2).sum(1) - (principal**2).sum(1), 0.0))
    found = ivfscan.Projector.of(mean, basis)(rows)
    assert found.shape == (n, axes + 1) and found.dtype == np.float32
    scale = np.abs(centred).sum(1).max()
    np.testing.assert_allclose(found[:, :axes], principal, atol=2e-6 * scale)
    # the residual from a difference of squares: float32 cancellation bounds its error by the norms
    largest = float(np.linalg.norm(centred, axis=1).max())
    np.testing.assert_allclose(found[:, axes], residual, atol=np.sqrt(4e-6) * largest)
    # precise: computed in float64, only the output rounded to float32 (the exact scan's bounds)
    exact = ivfscan.Projector.of(mean.astype(np.float32), basis.astype(np.float32))(rows, precise=True)
    centred32 = rows.astype(np.float64) - mean.astype(np.float32)
    principal32 = centred32 @ basis.astype(np.float32).T.astype(np.float64)
    residual32 = np.sqrt(np.maximum((centred32**2).sum(1) - (principal32**2).sum(1), 0.0))
    np.testing.assert_allclose(exact[:, :axes], principal32, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(exact[:, axes], residual32, rtol=1e-6, atol=1e-5)


def test_the_c_projection_refuses_what_it_cannot_hold() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="64 axes"):
        ivfscan.Projector.of(np.zeros(100), np.linalg.qr(rng.normal(size=(100, 100)))[0][:, :65].T)(
            np.zeros((2, 100), np.float32))
    projector = ivfscan.Projector.of(np.zeros(10), np.eye(10)[:3])
    with pytest.raises(ValueError, match="sizes"):
        projector(np.zeros((2, 11), np.float32))
    assert projector(np.zeros((0, 10), np.float32)).shape == (0, 4)


@pytest.mark.parametrize(("n", "first", "finer"), [(1000, 31, 32), (37, 9, 20), (5, 12, 0)])
def test_calls_sharing_a_projection_split_the_rows_and_each_returns_with_all_of_them(n: int, first: int,
                                                                                      finer: int) -> None:
    """Threads filling the same outputs with one shared progress each project chunks of rows none
    has taken (the count of chunks ends one past the last for each call) and each returns only
    once every row is projected: what it sees then is the whole projection, bit for bit."""
    dim = 48
    rng = np.random.default_rng(n)
    rows = (rng.normal(size=(n, dim)) * np.linspace(3.0, 0.2, dim)).astype(np.float32)
    mean = rng.normal(size=dim).astype(np.float32)
    projector = ivfscan.Projector.of(mean, np.linalg.qr(rng.normal(size=(dim, dim)))[0][:, : first + finer].T)
    if finer:
        want, want_finer = projector.split(rows, first)
    else:
        want, want_finer = projector(rows, precise=True), None
    chunks = -(-n // 16)
    for calls in (1, 2, 3):
        out = np.full((n, first + 1), np.nan, dtype=np.float32)
        outputs = None if not finer else ivfscan.Finer(np.full((n, ivfscan.EXT_AXES), np.nan, dtype=np.float32),
                                                        np.full(n, np.nan, dtype=np.float32))
        progress = np.zeros(2, dtype=np.int64)
        start = Barrier(calls)

        def fill(_: int, out: np.ndarray = out, outputs: ivfscan.Finer | None = outputs,
                 progress: np.ndarray = progress, start: Barrier = start) -> tuple[np.ndarray, ...]:
            start.wait()
            projector.fill(rows, out, outputs, progress)
            return (out.copy(),) if outputs is None else (out.copy(), outputs.coords.copy(), outputs.rest.copy())

        with ThreadPoolExecutor(calls) as pool:
            seen = list(pool.map(fill, range(calls)))
        assert progress.tolist() == [chunks + calls, n]
        for got in seen:
            assert np.array_equal(got[0], want)
            if want_finer is not None:
                assert np.array_equal(got[1], want_finer.coords) and np.array_equal(got[2], want_finer.rest)
    # a call that finds the first chunk taken by another, not yet projected, projects the rest and waits for it
    out = np.full((n, first + 1), np.nan, dtype=np.float32)
    outputs = None if not finer else ivfscan.Finer(np.empty((n, ivfscan.EXT_AXES), dtype=np.float32),
                                                    np.empty(n, dtype=np.float32))
    progress = np.array([1, 0], dtype=np.int64)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(projector.fill, rows, out, outputs, progress)
        wait([call], timeout=0.2)
        assert not call.done() and progress[1] == n - min(n, 16)
        assert np.isnan(out[:16]).all() and np.array_equal(out[16:], want[16:])
        out[:16] = want[:16]
        progress[1] += min(n, 16)
        call.result(timeout=10)
    if finer:
        with pytest.raises(ValueError, match="finer"):
            projector.fill(rows, np.empty((n, first + 1), np.float32), None, np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="progress"):
        projector.fill(rows, np.empty((n, first + 1), np.float32), want_finer, np.zeros(1, dtype=np.int64))


@pytest.mark.parametrize(("dim", "first", "finer"), [(152, 31, 32), (40, 9, 20), (12, 3, 8)])
def test_the_split_projection_gives_the_first_axes_and_the_finer_coordinates(dim: int, first: int,
                                                                          finer: int) -> None:
    """The first axes' coordinates as a projector of those axes alone gives them (bit for bit);
    the others' coordinates (zeros past them) and the residual past all axes, from float64; the
    first residual splits into the finer part: w^2 = |finer|^2 + rest^2."""
    rng = np.random.default_rng(dim)
    rows = (rng.normal(size=(77, dim)) * np.linspace(3.0, 0.2, dim)).astype(np.float32)
    mean = rng.normal(size=dim).astype(np.float32)
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:, : first + finer].T.astype(np.float32)
    coords, found = ivfscan.Projector.of(mean, basis).split(rows, first)
    assert np.array_equal(coords, ivfscan.Projector.of(mean, basis[:first])(rows, precise=True))
    centred = rows.astype(np.float64) - mean
    principal = centred @ basis.T.astype(np.float64)
    assert found.coords.shape == (77, ivfscan.EXT_AXES) and found.rest.shape == (77,)
    np.testing.assert_allclose(found.coords[:, :finer], principal[:, first:], rtol=1e-6, atol=1e-6)
    assert not found.coords[:, finer:].any()
    rest = np.sqrt(np.maximum((centred**2).sum(1) - (principal**2).sum(1), 0.0))
    np.testing.assert_allclose(found.rest, rest, rtol=1e-5, atol=1e-5)
    w_sq = (found.coords.astype(np.float64) ** 2).sum(1) + found.rest.astype(np.float64) ** 2
    np.testing.assert_allclose(coords[:, first].astype(np.float64) ** 2, w_sq, rtol=1e-5)
    with pytest.raises(ValueError, match="split"):
        ivfscan.Projector.of(mean, basis).split(rows, first + finer)
    if finer + first < dim:
        with pytest.raises(ValueError, match="split"):
            ivfscan.Projector.of(mean, np.linalg.qr(rng.normal(size=(dim, dim)))[0][:, : min(dim, 64)].T)\
                .split(rows, min(dim, 64) - ivfscan.EXT_AXES - 1)


@pytest.mark.parametrize("k", [1, 3])
def test_the_exact_scan_with_the_second_bound_equals_brute_force(k: int) -> None:
    """Projected rows (principal coordinates and the residual) with the finer coordinates of the
    next axes: the scan's results equal brute force's and the one-bound scan's, outlying queries
    (a defect's, whose reach takes in much of the memory) and hidden rows included."""
    rng = np.random.default_rng(k)
    dim, first = 48, 8
    spectrum = np.geomspace(4.0, 0.1, dim)
    rows = (rng.normal(size=(3000, dim)) * spectrum).astype(np.float32)
    mean = rows.mean(0)
    basis = np.linalg.svd(rows - mean, full_matrices=False)[2].astype(np.float32)      # dim dim, by variance
    projector = ivfscan.Projector.of(mean, basis[: first + ivfscan.EXT_AXES])
    coords, finer = projector.split(rows, first)
    one = _tiled_over(coords, rows, [int(v) for v in np.diff(np.linspace(0, len(rows), 41).round())])
    two = one.with_finer(finer)
    queries = np.concatenate([rows[rng.choice(len(rows), 60)] + rng.normal(size=(60, dim)).astype(np.float32) * 0.2,
                              (rng.normal(size=(40, dim)) * spectrum * 3).astype(np.float32)])
    q_coords, q_finer = projector.split(queries, first)
    shown = rng.random(len(rows)) < 0.7
    for hidden in (None, shown):
        truth = _brute(rows, queries, k, hidden)
        reach_sq = (truth[:, -1] * 1.001 + 1e-6).astype(np.float32)
        for step in (ivfscan.LANES, two.lists):
            parts = [two.exact(q_coords, queries, reach_sq, k, hidden, slice(s, min(two.lists, s + step)), q_finer)
                     for s in range(0, two.lists, step)]
            found = np.sort(np.concatenate(parts, axis=1), axis=1)[:, :k]
            np.testing.assert_allclose(found, truth, rtol=1e-5, atol=1e-5)
        whole = slice(0, two.lists)
        assert np.array_equal(two.exact(q_coords, queries, reach_sq, k, hidden, whole, q_finer),
                              one.exact(q_coords, queries, reach_sq, k, hidden, whole))


def test_the_second_bound_refuses_coordinates_that_do_not_match() -> None:
    sizes = [20, 20, 20]
    tiled, rows, coords = _lists(60, 4, 8, sizes, seed=5)
    with pytest.raises(ValueError, match="per position"):
        tiled.with_finer(ivfscan.Finer(np.zeros((59, ivfscan.EXT_AXES), np.float32), np.zeros(59, np.float32)))
    two = tiled.with_finer(ivfscan.Finer(np.zeros((60, ivfscan.EXT_AXES), np.float32), np.zeros(60, np.float32)))
    short = ivfscan.Finer(np.zeros((2, ivfscan.EXT_AXES), np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="second bound"):
        two.exact(coords[:3], rows[:3], np.ones(3, np.float32), 1, None, slice(0, 3), short)


def test_the_banded_product_refuses_bands_and_sizes_it_cannot_hold() -> None:
    """The anomaly map's kernel checks what it is given before it reads memory."""
    left = np.ones((4, 3), np.float32)
    bt = np.zeros((3, ivfscan.LANES), np.float32)
    out = np.zeros((4, 10), np.float32)
    good = np.array([[0, 3]], np.int32)
    ivfscan.banded_rows(left, bt, good, 10, slice(0, 4), out)
    with pytest.raises(ValueError, match="band"):
        ivfscan.banded_rows(left, bt, np.array([[0, 4]], np.int32), 10, slice(0, 4), out)
    with pytest.raises(ValueError, match="sizes"):
        ivfscan.banded_rows(left, bt, good, 10, slice(0, 3), out)         # left has 4 rows, not 3
    with pytest.raises(ValueError, match="sizes"):
        ivfscan.banded_rows(left, bt, good, 10, slice(1, 5), out)         # past the last row


def _projected_lists(n: int, dim: int, at: int, finer: int, sizes: list[int],
                     seed: int) -> tuple[ivfscan.TiledLists, ivfscan.Projector, np.ndarray]:
    """Tiled lists of random rows in the coordinates of a projection on ``at`` axes (the second
    bound's ``finer`` axes after them, where not 0), the projector, and the rows."""
    rng = np.random.default_rng(seed)
    rows = (rng.normal(size=(n, dim)) * np.linspace(3.0, 0.3, dim)).astype(np.float32)
    mean = rows.mean(0)
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:, : at + finer].T
    projector = ivfscan.Projector.of(mean, basis)
    coords, extra = projector.split(rows, at) if finer else (projector(rows, precise=True), None)
    tiled = _tiled_over(coords, rows, sizes)
    return (tiled if extra is None else tiled.with_finer(extra)), projector, rows


@pytest.mark.parametrize("helpers", [0, 1, 3])
@pytest.mark.parametrize(("finer", "k"), [(0, 1), (16, 1), (16, 3)])
def test_the_team_scans_give_the_single_thread_scans_results(helpers: int, finer: int, k: int) -> None:
    """The scans shared by the calling thread and the extension's helpers (projecting the queries
    themselves) give the distances of one thread's scans over the same coordinates: exact ones
    equal to brute force, and the approximate scan's own picks, bit for bit."""
    sizes = [40, 3, 70, 16, 25, 61, 9, 33, 48, 17, 52, 30] * 3
    tiled, projector, rows = _projected_lists(sum(sizes), 24, 7, finer, sizes, seed=finer + k)
    rng = np.random.default_rng(helpers)
    queries = np.concatenate([rows[rng.choice(len(rows), 150)] + rng.normal(size=(150, 24)).astype(np.float32) * 0.3,
                              rng.normal(size=(60, 24)).astype(np.float32) * 4])
    truth = _brute(rows, queries, k)
    reach_sq = (truth[:, -1] * 1.001 + 1e-4).astype(np.float32)
    shown = rng.random(len(rows)) > 0.2
    previous = ivfscan.helpers()
    try:
        assert ivfscan.set_helpers(helpers) == (helpers if ivfscan.HELPERS else 0)
        coords, extra = projector.split(queries, 7) if finer else (projector(queries, precise=True), None)
        alone = tiled.exact(coords, queries, reach_sq, k, None, slice(0, tiled.lists), extra)
        np.testing.assert_allclose(alone, truth, rtol=1e-5, atol=1e-5)
        picker = ivfscan.Projector.of(projector.mean, np.asarray(projector.axes_t64[:, :7].T))
        picks = tiled.approximate(picker(queries), queries, 3, 8, k, shown)
        # calls in a row: helpers that are still waiting on the core for work join them
        exact_members, approximate_members = [], []
        for _ in range(12):
            shared, members = tiled.exact_shared(queries, reach_sq, k, None, projector)
            np.testing.assert_array_equal(shared, alone)
            exact_members.append(members)
            picked, members = tiled.approximate_shared(queries, picker, 3, 8, k, shown)
            np.testing.assert_array_equal(picked, picks)
            approximate_members.append(members)
        for counts in (exact_members, approximate_members):
            assert min(counts) >= 1 and max(counts) <= 1 + helpers
            assert max(counts) > 1 or helpers == 0 or not ivfscan.HELPERS
        hidden, _ = tiled.exact_shared(queries, np.full(len(queries), 1e9, np.float32), k, shown, projector)
        np.testing.assert_allclose(hidden, _brute(rows, queries, k, shown), rtol=1e-5, atol=1e-4)
        with pytest.raises(ValueError, match="projector"):
            tiled.approximate_shared(queries, projector if finer else ivfscan.Projector.of(
                projector.mean, np.asarray(projector.axes_t64[:, :6].T)), 3, 8, k, None)
    finally:
        ivfscan.set_helpers(previous)


def test_team_scans_from_several_threads_at_once_each_get_their_own_results() -> None:
    """Callers that find the team at work on another's scan run theirs alone: every result is
    still its own, whichever ran with the helpers."""
    sizes = [30, 45, 12, 60, 27, 50] * 6
    tiled, projector, rows = _projected_lists(sum(sizes), 20, 9, 0, sizes, seed=5)
    rng = np.random.default_rng(6)
    batches = [rows[rng.choice(len(rows), 80)] + rng.normal(size=(80, 20)).astype(np.float32) * s
               for s in (0.1, 0.5, 2.0, 5.0)]
    truths = [_brute(rows, q, 1) for q in batches]
    previous = ivfscan.helpers()
    ivfscan.set_helpers(1)
    try:
        def scan(i: int) -> list[int]:
            members = []
            for _ in range(30):
                found, count = tiled.exact_shared(batches[i], (truths[i][:, 0] * 1.001 + 1e-4).astype(np.float32), 1,
                                                  None, projector)
                np.testing.assert_allclose(found, truths[i], rtol=1e-5, atol=1e-5)
                members.append(count)
            return members

        with ThreadPoolExecutor(4) as pool:
            counts = [c for part in pool.map(scan, range(4)) for c in part]
        assert set(counts) <= {1, 2}
    finally:
        ivfscan.set_helpers(previous)


@pytest.mark.skipif(not ivfscan.HELPERS or not hasattr(os, "fork"), reason="no helper threads (pthreads) here")
def test_a_forked_child_scans_without_the_parents_helpers() -> None:
    """A child forked while the parent has helper threads has none of them: its scans run on its
    own thread (no wait for helpers that are not there) and give the same results."""
    sizes = [30, 45, 12, 60] * 4
    tiled, projector, rows = _projected_lists(sum(sizes), 16, 5, 0, sizes, seed=8)
    queries = rows[:50] + 0.2
    truth = _brute(rows, queries, 1)
    reach_sq = (truth[:, 0] * 1.001 + 1e-4).astype(np.float32)
    previous = ivfscan.helpers()
    ivfscan.set_helpers(2)
    try:
        tiled.exact_shared(queries, reach_sq, 1, None, projector)
        child = os.fork()
        if child == 0:
            found, members = tiled.exact_shared(queries, reach_sq, 1, None, projector)
            os._exit(0 if members == 1 and np.allclose(found, truth, rtol=1e-5, atol=1e-5) else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        ivfscan.set_helpers(previous)


def test_the_helper_count_is_bounded() -> None:
    previous = ivfscan.helpers()
    try:
        assert ivfscan.set_helpers(-3) == 0 and ivfscan.helpers() == 0
        if ivfscan.HELPERS:
            assert ivfscan.set_helpers(1000) == 15 and ivfscan.helpers() == 15
    finally:
        ivfscan.set_helpers(previous)
