"""Thread counts: the configured faiss count holds in every thread that searches, not only the
thread that configured it (OpenMP keeps its count per thread); helper threads run a request's
independent steps beside it only when one is idle."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import cv2
import faiss
import numpy as np
import pytest
import torch

from engine.knn import build_index, knn_distances
from engine.threads import _Helpers, configure_threads, usable_cores


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


def test_a_step_runs_beside_the_caller_on_an_idle_helper_and_reraises_there() -> None:
    helpers = _Helpers()
    helpers.configure(2)
    wait = helpers.start(lambda: threading.current_thread().name)
    assert wait().startswith("beside")

    def fails() -> None:
        raise ValueError("bad step")

    wait_failed = helpers.start(fails)
    with pytest.raises(ValueError, match="bad step"):
        wait_failed()


def test_a_step_runs_in_the_callers_thread_when_every_helper_is_busy_or_helpers_are_off() -> None:
    helpers = _Helpers()
    helpers.configure(2)
    release = threading.Event()
    busy = [helpers.start(lambda: release.wait(10)) for _ in range(2)]
    try:
        assert helpers.start(lambda: threading.current_thread().name)() == threading.current_thread().name
    finally:
        release.set()
    assert all(wait() for wait in busy)
    # the helpers are free again once their steps ended
    assert helpers.start(lambda: threading.current_thread().name)().startswith("beside")
    helpers.configure(1)
    assert helpers.start(lambda: threading.current_thread().name)() == threading.current_thread().name


@pytest.mark.parametrize("operator_value", [None, "300000"])
def test_importing_the_engine_bounds_openmp_spinning_unless_the_operator_chose(operator_value: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if operator_value is not None:
        env["GOMP_SPINCOUNT"] = operator_value
    # the variable must be in place before torch loads its OpenMP runtime, which reads it once
    probe = "import engine, os, torch, faiss; print(os.environ['GOMP_SPINCOUNT'])"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip() == (operator_value or "10000")
