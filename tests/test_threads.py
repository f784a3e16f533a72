"""Thread counts: the configured faiss count holds in every thread that searches, not only the
thread that configured it (OpenMP keeps its count per thread)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import cv2
import faiss
import numpy as np
import pytest
import torch

from engine.knn import build_index, knn_distances
from engine.threads import configure_threads, usable_cores


@pytest.fixture
def restored_threads() -> Iterator[None]:
    """The process's pools as the engine leaves them by default, after the test changed them."""
    torch_before, cv_before = torch.get_num_threads(), cv2.getNumThreads()
    yield
    configure_threads(None)
    torch.set_num_threads(torch_before)
    cv2.setNumThreads(cv_before)


def _faiss_threads_seen_by_a_new_thread_that_searches() -> int:
    rng = np.random.default_rng(0)
    index = build_index(rng.normal(size=(500, 8)).astype(np.float32), "l2")
    seen: list[int] = []

    def search() -> None:
        faiss.omp_set_num_threads(7)               # whatever count the thread had before
        knn_distances(index, rng.normal(size=(50, 8)).astype(np.float32), "l2")
        seen.append(faiss.omp_get_max_threads())

    worker = threading.Thread(target=search)
    worker.start()
    worker.join()
    return seen[0]


@pytest.mark.parametrize("threads", [1, 2, None])
def test_the_faiss_thread_count_reaches_every_thread_that_searches(threads: int | None,
                                                                   restored_threads: None) -> None:
    configure_threads(threads)
    expected = threads or usable_cores()
    # the configuring thread too: limiting the BLAS faiss ships used to leave faiss on one thread here
    assert faiss.omp_get_max_threads() == expected
    assert _faiss_threads_seen_by_a_new_thread_that_searches() == expected
