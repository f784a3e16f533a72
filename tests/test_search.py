"""The memory search: approximate results bound the exact ones, exact re-scoring equals brute force."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

import engine.search
from engine import ivfscan
from engine.knn import build_index, deserialize_index, knn_distances, prepare_rows, serialize_index
from engine.search import MemorySearch, _inverted_rows, build_search_index, configure_exact_workers, keep_rows


@pytest.fixture(params=["numpy", "c-scan", "c-scan-finer"])
def native(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The searches of an inverted file: numpy and faiss, and the C scans where they were built,
    the exact one with its second bound (at any memory size) and without it."""
    if request.param != "numpy" and not ivfscan.AVAILABLE:
        pytest.skip("C scans not built")
    monkeypatch.setattr(engine.search, "_FINER_ROWS", 0 if request.param == "c-scan-finer" else 1 << 62)
    return request.param != "numpy"


def _clustered(n: int, d: int, seed: int, spread: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(48, d)).astype(np.float32) * 4
    return (centres[rng.integers(0, 48, n)] + rng.normal(size=(n, d)) * spread).astype(np.float32)


@pytest.fixture(scope="module")
def bank() -> np.ndarray:
    return _clustered(15_000, 32, 0)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    q = _clustered(600, 32, 1)
    q[:100] = _clustered(100, 32, 2, spread=4.0)                      # outliers, as defects are
    return q


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 3])
def test_exact_equals_brute_force_and_search_bounds_it(bank: np.ndarray, queries: np.ndarray, distance: str,
                                                       k: int, native: bool) -> None:
    index, choice = build_search_index(bank, distance, ivf_min_rows=1000, probe_queries=_clustered(400, 32, 3),
                                       axes=16)
    assert choice.kind == "projected_ivf" and choice.as_dict()["axes"] == 16
    search = MemorySearch(deserialize_index(serialize_index(index)), bank, distance, k, nprobe=choice.nprobe,
                          native=native)
    truth = knn_distances(build_index(bank, distance), queries, distance, k)
    approx, reach = search.search(queries)
    assert np.all(approx >= truth - 1e-4)                     # a search that misses is never closer
    np.testing.assert_allclose(search.exact(queries, reach), truth, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(search.exact(queries, reach * 3), truth, rtol=1e-4, atol=1e-4)  # a loose reach


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_a_row_filter_hides_rows_from_both_searches(bank: np.ndarray, queries: np.ndarray, distance: str,
                                                    native: bool) -> None:
    index, choice = build_search_index(bank, distance, ivf_min_rows=1000, probe_queries=_clustered(400, 32, 3),
                                       axes=16)
    search = MemorySearch(index, bank, distance, 1, nprobe=choice.nprobe, native=native)
    allowed = np.random.default_rng(4).random(len(bank)) < 0.5
    truth = knn_distances(build_index(bank[allowed], distance), queries, distance, 1)
    approx, reach = search.search(queries, keep_rows(allowed))
    assert np.all(approx >= truth - 1e-4)
    np.testing.assert_allclose(search.exact(queries, reach, keep_rows(allowed)), truth, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 3])
def test_queries_whose_probed_lists_hold_no_allowed_row_still_get_their_nearest(
        bank: np.ndarray, queries: np.ndarray, distance: str, k: int, native: bool) -> None:
    """The filter hides every row of the lists the queries probe, so the approximate search finds
    none it may return: they are searched over the allowed rows, not given an infinite distance."""
    index, choice = build_search_index(bank, distance, ivf_min_rows=1000, probe_queries=_clustered(400, 32, 3),
                                       axes=16)
    search = MemorySearch(index, bank, distance, k, nprobe=1, native=native)
    near = queries[100:]                                              # the patches near the memory
    _, probed = search.ivf.quantizer.search(search.projection(prepare_rows(near, distance), precise=False), 1)
    _, ids, lists = _inverted_rows(search.ivf)
    allowed = np.ones(len(bank), dtype=bool)
    allowed[ids[np.isin(lists, probed)]] = False                      # every row of the lists they probe
    assert allowed.any() and not allowed.all()
    truth = knn_distances(build_index(bank[allowed], distance), near, distance, k)
    approx, reach = search.search(near, keep_rows(allowed))
    assert np.all(np.isfinite(approx)) and np.all(np.isfinite(reach))
    assert np.all(approx >= truth - 1e-4)
    np.testing.assert_allclose(search.exact(near, reach, keep_rows(allowed)), truth, rtol=1e-4, atol=1e-4)


def test_plain_ivf_models_are_searched_exactly_too(bank: np.ndarray, queries: np.ndarray, native: bool) -> None:
    """Models stored with a full-dimension IndexIVFFlat keep loading, and get exact re-scoring."""
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(32), 32, 64)
    ivf.train(bank)
    ivf.add(bank)
    search = MemorySearch(deserialize_index(serialize_index(ivf)), bank, "l2", 1, nprobe=2, native=native)
    truth = knn_distances(build_index(bank, "l2"), queries, "l2", 1)
    approx, reach = search.search(queries)
    assert search.approximate and np.all(approx >= truth - 1e-4) and np.any(approx > truth + 1e-3)
    np.testing.assert_allclose(search.exact(queries, reach), truth, rtol=1e-4, atol=1e-4)


def test_rows_kept_in_block_order_still_answer_by_memory_row(bank: np.ndarray, queries: np.ndarray) -> None:
    """The search keeps the rows in its own order; its answers still name and measure the memory's rows."""
    index, choice = build_search_index(bank, "l2", ivf_min_rows=1000, probe_queries=_clustered(400, 32, 3), axes=16)
    search = MemorySearch(index, bank, "l2", 1, nprobe=choice.nprobe)
    rows = np.random.default_rng(5).choice(len(bank), 200, replace=False)
    approx, _ = search.search(bank[rows])
    np.testing.assert_allclose(approx, 0.0, atol=1e-3)         # each row finds itself among its candidates
    distance, ids = search.nearest(queries)
    truth_sq, truth_ids = faiss.knn(queries, bank, 1)
    np.testing.assert_array_equal(ids, truth_ids[:, 0])
    np.testing.assert_allclose(distance, np.sqrt(truth_sq[:, 0]), rtol=1e-4, atol=1e-4)


def test_an_index_missing_memory_rows_is_refused(bank: np.ndarray) -> None:
    index, choice = build_search_index(bank, "l2", ivf_min_rows=1000, probe_queries=_clustered(400, 32, 3), axes=16)
    with pytest.raises(ValueError, match="ids are not the memory's rows"):
        MemorySearch(index, bank[:-1], "l2", 1, nprobe=choice.nprobe)


def test_small_memories_stay_flat_and_exact(queries: np.ndarray) -> None:
    small = _clustered(500, 32, 5)
    index, choice = build_search_index(small, "l2", ivf_min_rows=1000, probe_queries=queries)
    assert choice.kind == "flat" and choice.as_dict() == {"kind": "flat", "nlist": 0, "nprobe": 0, "recall": 1.0}
    search = MemorySearch(index, small, "l2", 1)
    assert not search.approximate
    np.testing.assert_allclose(search.search(queries)[0], knn_distances(build_index(small, "l2"), queries, "l2"),
                               rtol=1e-6)


def test_probe_count_reaches_the_recall_target_on_held_out_rows(bank: np.ndarray) -> None:
    probes = _clustered(500, 32, 6)
    index, choice = build_search_index(bank, "l2", ivf_min_rows=1000, probe_queries=probes, axes=16,
                                       target_recall=0.9)
    found = MemorySearch(index, bank, "l2", 1, nprobe=choice.nprobe).search(probes)[0]
    truth = knn_distances(build_index(bank, "l2"), probes, "l2")
    recall = float(np.mean(found <= truth * 1.001 + 1e-3))
    assert choice.recall == pytest.approx(recall, abs=0.02)
    assert choice.recall >= 0.9 or choice.nprobe == min(choice.nlist, 16)


@pytest.mark.parametrize("k", [1, 3])
def test_a_block_compares_only_the_lists_its_queries_need_with_the_same_exact_result(
    bank: np.ndarray, queries: np.ndarray, k: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Patches near the memory need a few lists of a block, outliers all of them: the product
    over the lists needed gives brute force's distances either way, with and without a filter."""
    taken: list[bool] = []                                   # per block searched: the whole block?
    columns = engine.search._Blocks._columns

    def recorded(blocks: object, block: int, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = columns(blocks, block, wanted)                  # type: ignore[arg-type]
        taken.append(out[1] is None)
        return out

    monkeypatch.setattr(engine.search._Blocks, "_columns", recorded)
    index, choice = build_search_index(bank, "l2", ivf_min_rows=1000, probe_queries=_clustered(400, 32, 3), axes=16)
    search = MemorySearch(index, bank, "l2", k, nprobe=choice.nprobe, native=False)
    allowed = np.random.default_rng(8).random(len(bank)) < 0.6
    for group, whole in ((queries[100:104], False), (queries[:100], True)):   # a few near the memory, outliers
        taken.clear()
        _, reach = search.search(group)
        _, reach_allowed = search.search(group, keep_rows(allowed))
        np.testing.assert_allclose(search.exact(group, reach), knn_distances(build_index(bank, "l2"), group, "l2", k),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(search.exact(group, reach_allowed, keep_rows(allowed)),
                                   knn_distances(build_index(bank[allowed], "l2"), group, "l2", k),
                                   rtol=1e-4, atol=1e-4)
        assert taken and (any(taken) if whole else not all(taken))


@pytest.mark.skipif(not ivfscan.AVAILABLE, reason="C scans not built")
@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("workers", [1, 3])
def test_the_c_approximate_search_gives_faiss_distances(bank: np.ndarray, queries: np.ndarray, distance: str, k: int,
                                                        workers: int) -> None:
    """The same rule as faiss's inverted-file search (probed lists of nearest centroid, candidates
    nearest in coordinates, the k nearest of those by true distance), so the same distances, also
    with a filter and with the queries shared out over workers; near ties in coordinates may pick
    another candidate, so a few queries may differ, never below the exact distance."""
    index, choice = build_search_index(bank, distance, ivf_min_rows=1000, probe_queries=_clustered(400, 32, 3),
                                       axes=16)
    in_faiss = MemorySearch(index, bank, distance, k, nprobe=choice.nprobe, native=False)
    in_c = MemorySearch(index, bank, distance, k, nprobe=choice.nprobe, native=True)
    allowed = keep_rows(np.random.default_rng(5).random(len(bank)) < 0.6)
    configure_exact_workers(workers)
    try:
        for only in (None, allowed):
            for nprobe in (1, choice.nprobe, 8):
                expected = in_faiss.search(queries, only, nprobe=nprobe)
                found = in_c.search(queries, only, nprobe=nprobe)
                for ours, theirs in zip(found, expected, strict=True):
                    assert np.mean(np.isclose(ours, theirs, rtol=1e-5, atol=1e-6)) >= 0.99
    finally:
        configure_exact_workers(1)
    truth = knn_distances(build_index(bank, distance), queries, distance, k)
    assert np.all(in_c.search(queries)[0] >= truth - 1e-4)


@pytest.fixture
def shared_exact_search() -> Iterator[None]:
    """Exact searches shared out over three workers for the test, one (inline) after it."""
    configure_exact_workers(3)
    yield
    configure_exact_workers(1)


@pytest.mark.parametrize("k", [1, 3])
def test_exact_search_shared_out_over_workers_equals_brute_force(bank: np.ndarray, queries: np.ndarray, k: int,
                                                                 shared_exact_search: None, native: bool) -> None:
    """Outlying queries reach many blocks: their work is shared out, from many request threads at once."""
    index, choice = build_search_index(bank, "l2", ivf_min_rows=1000, probe_queries=_clustered(400, 32, 3), axes=16)
    search = MemorySearch(index, bank, "l2", k, nprobe=choice.nprobe, native=native)
    truth = knn_distances(build_index(bank, "l2"), queries, "l2", k)
    allowed = np.random.default_rng(7).random(len(bank)) < 0.7
    truth_allowed = knn_distances(build_index(bank[allowed], "l2"), queries, "l2", k)
    _, reach = search.search(queries)
    _, reach_allowed = search.search(queries, keep_rows(allowed))
    with ThreadPoolExecutor(4) as pool:
        plain = [pool.submit(search.exact, queries, reach * 2) for _ in range(4)]
        hidden = [pool.submit(search.exact, queries, reach_allowed, keep_rows(allowed)) for _ in range(4)]
        for future in plain:
            np.testing.assert_allclose(future.result(), truth, rtol=1e-4, atol=1e-4)
        for future in hidden:
            np.testing.assert_allclose(future.result(), truth_allowed, rtol=1e-4, atol=1e-4)


def test_searches_in_flight_survive_a_change_of_worker_count(bank: np.ndarray, queries: np.ndarray,
                                                              shared_exact_search: None, native: bool) -> None:
    """Each engine set up in a process configures the workers: searches already running go on."""
    index, choice = build_search_index(bank, "l2", ivf_min_rows=1000, probe_queries=_clustered(400, 32, 3), axes=16)
    search = MemorySearch(index, bank, "l2", 1, nprobe=choice.nprobe, native=native)
    truth = knn_distances(build_index(bank, "l2"), queries, "l2", 1)
    _, reach = search.search(queries)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(search.exact, queries, reach * 2) for _ in range(8)]
        for count in (2, 3, 4, 2, 3):
            configure_exact_workers(count)
        for future in futures:
            np.testing.assert_allclose(future.result(), truth, rtol=1e-4, atol=1e-4)


def test_an_exact_search_does_not_wait_for_busy_workers(bank: np.ndarray, queries: np.ndarray,
                                                        shared_exact_search: None, native: bool) -> None:
    """The caller takes the blocks itself while every worker is held elsewhere (a core slow to
    wake, another search): the search finishes, exact, without them."""
    index, choice = build_search_index(bank, "l2", ivf_min_rows=1000, probe_queries=_clustered(400, 32, 3), axes=16)
    search = MemorySearch(index, bank, "l2", 1, nprobe=choice.nprobe, native=native)
    truth = knn_distances(build_index(bank, "l2"), queries, "l2", 1)
    _, reach = search.search(queries)
    release = threading.Event()
    workers = engine.search._exact_workers._pool.get()
    held = [workers.submit(release.wait, 60) for _ in range(3)]
    try:
        with ThreadPoolExecutor(1) as caller:
            result = caller.submit(search.exact, queries, reach * 2).result(timeout=30)
        np.testing.assert_allclose(result, truth, rtol=1e-4, atol=1e-4)
        assert not any(future.done() for future in held)         # the workers were held throughout
    finally:
        release.set()
