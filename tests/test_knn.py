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


def test_an_ivf_index_keeps_its_probe_count_through_serialization() -> None:
    """Models stored with a plain IndexIVFFlat (before the projected layout) still load."""
    import faiss

    from engine.knn import set_nprobe

    rng = np.random.default_rng(3)
    bank = rng.normal(size=(4000, 16)).astype(np.float32)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(16), 16, 32)
    ivf.train(bank)
    ivf.add(bank)
    restored = deserialize_index(serialize_index(ivf))
    set_nprobe(restored, 5)
    assert faiss.extract_index_ivf(restored).nprobe == 5
    more, _ = restored.search(bank[10:20] + 0.5, 1)
    fewer, _ = ivf.search(bank[10:20] + 0.5, 1)
    assert np.all(more <= fewer + 1e-5)               # more lists probed: never a worse neighbour
