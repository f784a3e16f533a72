"""Thread counts: the configured faiss count holds in every thread that searches, not only the
thread that configured it (OpenMP keeps its count per thread); helper threads run a request's
independent steps beside it only when one is idle; inferences run on the inference thread
whoever asks, and other long work on threads that end, so OpenMP teams do not pile up."""

from __future__ import annotations

import contextvars
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import faiss
import numpy as np
import pytest
import torch

from engine.api import Engine
from engine.knn import build_index, knn_distances
from engine.settings import Settings
from engine.threads import (
    SizedPool,
    _Helpers,
    configure_threads,
    on_fresh_thread,
    run_inference,
    run_shared,
    usable_cores,
)
from tests.support import part_png

_REQUEST = contextvars.ContextVar("request", default="none")


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


@pytest.mark.parametrize("threads", [2, None])
def test_blas_runs_on_one_thread_whatever_the_setting(threads: int | None, restored_threads: None) -> None:
    """Two BLAS threads stalled the forward pass and the map's small products: 2 threads set on
    2 cores gave 8 ROIs/s against 20 unset."""
    from threadpoolctl import threadpool_info

    configure_threads(threads)
    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert blas and all(pool["num_threads"] == 1 for pool in blas)


def _name_on_start(names: list[str]) -> tuple[Callable[[], None], threading.Event]:
    """A drain that records the thread it runs on, and the event it sets once it has."""
    started = threading.Event()

    def drain() -> None:
        names.append(threading.current_thread().name)
        started.set()

    return drain, started


def test_a_step_runs_beside_the_caller_on_an_idle_helper_and_reraises_there() -> None:
    helpers = _Helpers()
    helpers.configure(2)
    names: list[str] = []
    drain, started = _name_on_start(names)
    wait = helpers.share(drain)
    assert started.wait(10)
    wait()
    assert names[0].startswith("beside")
    failed = threading.Event()

    def fails() -> None:
        failed.set()
        raise ValueError("bad step")

    wait_failed = helpers.share(fails)
    assert failed.wait(10)
    with pytest.raises(ValueError, match="bad step"):
        wait_failed()


def test_a_step_runs_in_the_callers_thread_when_every_helper_is_busy_or_helpers_are_off() -> None:
    helpers = _Helpers()
    helpers.configure(2)
    release, holding = threading.Event(), threading.Barrier(3)

    def hold() -> None:
        holding.wait(10)
        release.wait(10)

    busy = [helpers.share(hold) for _ in range(2)]
    names: list[str] = []
    try:
        holding.wait(10)                           # both helpers are running a step
        drain, _ = _name_on_start(names)
        helpers.share(drain)()
        assert names == []                         # no helper took it: the request's thread does the step
    finally:
        release.set()
    for wait in busy:
        wait()
    # the helpers are free again once their steps ended
    drain, started = _name_on_start(names)
    wait = helpers.share(drain)
    assert started.wait(10)
    wait()
    assert names[0].startswith("beside")
    helpers.configure(1)
    drain, _ = _name_on_start(names)
    helpers.share(drain)()
    assert len(names) == 1


def test_shared_steps_are_taken_by_a_helper_and_by_the_caller_and_come_back_in_order(
        restored_threads: None) -> None:
    configure_threads(2)
    me = threading.current_thread().name
    helper_took_one, caller_took_the_rest = threading.Event(), threading.Event()

    def first() -> str:
        helper_took_one.set()
        assert caller_took_the_rest.wait(10)       # blocked until the caller has taken the others
        return threading.current_thread().name

    def last() -> str:
        caller_took_the_rest.set()
        return threading.current_thread().name

    finish = run_shared([first, lambda: threading.current_thread().name, last])
    assert helper_took_one.wait(10)
    taken = finish()
    assert taken[0].startswith("beside") and taken[1:] == [me, me]


def test_shared_steps_reraise_in_the_caller_and_run_there_when_helpers_are_off(restored_threads: None) -> None:
    configure_threads(2)

    def fails() -> str:
        raise ValueError("bad step")

    with pytest.raises(ValueError, match="bad step"):
        run_shared([fails, fails])()
    configure_threads(1)
    me = threading.current_thread().name
    assert run_shared([lambda: threading.current_thread().name, lambda: "second"])() == [me, "second"]


def test_a_helper_that_has_not_started_is_called_off_and_its_slot_freed() -> None:
    """A shared drain only takes work the caller would take: when the helper is slow to start,
    the caller does it all and does not wait for the helper to wake."""
    helpers = _Helpers()
    helpers.configure(2)
    release = threading.Event()
    blockers = [helpers._pool.get().submit(release.wait, 10) for _ in range(2)]   # both threads held
    ran: list[str] = []
    try:
        wait = helpers.share(lambda: ran.append(threading.current_thread().name))
        wait()                                     # called off: returns while both threads are held
        assert ran == [] and not any(blocker.done() for blocker in blockers)
    finally:
        release.set()
    assert all(blocker.result() for blocker in blockers)
    both, names = threading.Barrier(3), []

    def together() -> None:
        both.wait(10)
        names.append(threading.current_thread().name)

    waits = [helpers.share(together) for _ in range(2)]
    both.wait(10)                                  # both slots were free again: two steps at once
    for wait in waits:
        wait()
    assert len(names) == 2 and all(name.startswith("beside") for name in names)


def test_a_sized_pool_starts_all_its_threads_at_once() -> None:
    pool = SizedPool("started-at-once", 3)
    executor = pool.get()
    assert sum(t.name.startswith("started-at-once") for t in threading.enumerate()) == 3
    executor.shutdown()


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


def _denormal_times_one() -> float:
    return float(torch.tensor([1e-39], dtype=torch.float32)[0] * 1.0)


def _where() -> tuple[int, str]:
    return threading.get_ident(), _REQUEST.get()


def test_inferences_run_on_one_thread_whoever_asks_in_the_askers_context(restored_threads: None) -> None:
    configure_threads(None)                               # torch's default count: one inference thread
    _REQUEST.set("main")
    first = run_inference(_where)
    seen: list[tuple[int, str]] = []

    def ask() -> None:
        _REQUEST.set("other")
        seen.append(run_inference(_where))

    asker = threading.Thread(target=ask)
    asker.start()
    asker.join()
    assert first[0] == seen[0][0] != threading.get_ident()
    assert (first[1], seen[0][1]) == ("main", "other")
    assert run_inference(lambda: run_inference(threading.get_ident)) == first[0]     # nested: in place
    assert run_inference(_denormal_times_one) == on_fresh_thread(_denormal_times_one) == 0.0   # flushed there

    def fails() -> None:
        raise ValueError("bad inference")

    with pytest.raises(ValueError, match="bad inference"):
        run_inference(fails)


@pytest.mark.skipif(usable_cores() < 2, reason="one inference thread per core needs two cores")
def test_one_torch_thread_gives_one_inference_thread_per_core(restored_threads: None) -> None:
    configure_threads(1)                       # no OpenMP teams form: forwards may run side by side
    both = threading.Barrier(2, timeout=10)
    askers = [threading.Thread(target=lambda: run_inference(both.wait)) for _ in range(2)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    assert not both.broken                     # both waits ran at once, on two inference threads


def test_fresh_thread_work_ends_with_its_thread_and_reraises_here() -> None:
    _REQUEST.set("fit")
    ident, request = on_fresh_thread(_where)
    assert ident != threading.get_ident() and request == "fit"
    assert ident not in {t.ident for t in threading.enumerate()}

    def fails() -> None:
        raise KeyError("bad fit")

    with pytest.raises(KeyError, match="bad fit"):
        on_fresh_thread(fails)


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _settle(expected: int, timeout_s: float = 5.0) -> int:
    """The process's thread count once it comes back to ``expected`` (ended threads take a moment)."""
    deadline = time.monotonic() + timeout_s
    while _os_threads() != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return _os_threads()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or usable_cores() < 2,
                    reason="counts the process's threads in /proc; teams form with two cores or more")
def test_fits_and_inferences_from_many_threads_leave_no_openmp_teams_behind(tmp_path: Path) -> None:
    """A door's worker threads live on: had they run forward passes or searches themselves, each
    would keep torch and faiss teams, every later inference paying for them."""
    engine = Engine(Settings(data_root=tmp_path, backbone="efficientnet_lite0", input_size=112, coreset_ratio=0.5,
                             ivf_min_rows=500))
    train = [part_png(seed, side=112) for seed in range(12)]
    try:
        engine.fit_ok("r", "a", 0.1, train)
        engine.infer("r", "a", 0.1, part_png(99, side=112), allow_uncalibrated=True)      # the pools start
        workers = [ThreadPoolExecutor(1) for _ in range(3)]                          # live on, like a door's
        for worker in workers:
            worker.submit(int).result()                                              # started, idle
        before = _settle(_os_threads())
        for worker in workers:
            worker.submit(engine.infer, "r", "a", 0.1, part_png(7, side=112), allow_uncalibrated=True).result()
        workers[0].submit(engine.fit_ok, "r", "a", 0.1, train).result()
        assert engine.manifest("r", "a")["model_version"] == 2
        assert _settle(before) == before
        for worker in workers:
            worker.shutdown()
    finally:
        engine.close()
