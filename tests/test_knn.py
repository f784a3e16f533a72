"""kNN distances: faiss flat index against the torch matrix-product path and a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from engine.knn import TorchBank, build_index, deserialize_index, knn_distances, serialize_index


def _reference(bank: np.ndarray, queries: np.ndarray, distance: str, k: int) -> np.ndarray:
    if distance == "l2":
        d = np.sqrt(((queries[:, None, :] - bank[None, :, :]) ** 2).sum(-1))
    else:
        b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        d = 1.0 - q @ b.T
    return np.sort(d, axis=1)[:, :k].mean(1)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 3])
def test_faiss_and_torch_agree_with_reference(distance: str, k: int) -> None:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(400, 24)).astype(np.float32)
    queries = rng.normal(size=(50, 24)).astype(np.float32)
    expected = _reference(bank.astype(np.float64), queries.astype(np.float64), distance, k)
    by_faiss = knn_distances(build_index(bank, distance), queries, distance, k)
    by_torch = TorchBank(bank, distance, "cpu").distances(queries, k)
    np.testing.assert_allclose(by_faiss, expected, atol=1e-4)
    np.testing.assert_allclose(by_torch, expected, atol=1e-4)


def test_query_equal_to_a_bank_row_has_zero_distance() -> None:
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(100, 8)).astype(np.float32)
    dist = knn_distances(build_index(bank, "l2"), bank[:5], "l2", 1)
    # faiss's BLAS path computes |q|^2 + |b|^2 - 2 q.b: rounding leaves ~1e-3 after the sqrt
    np.testing.assert_allclose(dist, 0.0, atol=1e-2)


def test_index_survives_serialization() -> None:
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(64, 16)).astype(np.float32)
    queries = rng.normal(size=(10, 16)).astype(np.float32)
    index = build_index(bank, "l2")
    restored = deserialize_index(serialize_index(index))
    assert restored.ntotal == 64
    np.testing.assert_array_equal(knn_distances(index, queries, "l2"), knn_distances(restored, queries, "l2"))


def test_k_larger_than_bank_is_clamped() -> None:
    bank = np.eye(3, dtype=np.float32)
    dist = knn_distances(build_index(bank, "l2"), bank[:1], "l2", k=10)
    assert dist.shape == (1,)
    np.testing.assert_allclose(dist, (0 + np.sqrt(2) * 2) / 3, atol=1e-5)


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, d)).astype(np.float32) * 4
    return (centres[rng.integers(0, 64, n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_ivf_is_tuned_to_the_recall_target_on_held_out_queries(distance: str) -> None:
    from engine.knn import build_search_index

    bank, probes, fresh = _clustered(20_000, 32, 0), _clustered(1000, 32, 1), _clustered(1000, 32, 2)
    index, choice = build_search_index(bank, distance, ivf_min_rows=10_000, probe_queries=probes)
    assert choice.kind == "ivf" and 1 <= choice.nprobe <= choice.nlist and choice.recall >= 0.99
    exact = knn_distances(build_index(bank, distance), fresh, distance)
    approx = knn_distances(index, fresh, distance)
    assert np.all(approx >= exact - 1e-4)                     # never closer than the true neighbour
    assert np.mean(approx <= exact + 1e-4) >= 0.97            # and finds it on unseen queries too


def test_ivf_keeps_its_probe_count_through_serialization() -> None:
    from engine.knn import build_search_index, set_nprobe

    bank, probes = _clustered(12_000, 16, 3), _clustered(500, 16, 4)
    index, choice = build_search_index(bank, "l2", ivf_min_rows=10_000, probe_queries=probes)
    restored = deserialize_index(serialize_index(index))
    set_nprobe(restored, choice.nprobe)
    np.testing.assert_array_equal(knn_distances(index, probes, "l2"), knn_distances(restored, probes, "l2"))


def test_small_banks_stay_flat() -> None:
    from engine.knn import build_search_index

    index, choice = build_search_index(_clustered(500, 8, 5), "l2", ivf_min_rows=10_000,
                                       probe_queries=_clustered(10, 8, 6))
    assert choice.kind == "flat" and index.ntotal == 500
