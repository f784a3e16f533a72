"""Process-wide thread counts of the compute libraries, set once when the engine starts.

``threads`` (``BACKEND_TORCH_THREADS``) goes to torch's intra-op pool, faiss's OpenMP pool,
OpenCV and the workers of an exact memory search. Unset, torch and OpenCV keep their defaults
(one thread per core), faiss and the exact-search workers get one per usable core.

The BLAS libraries in the process (numpy's, faiss's and OpenCV's OpenBLAS) get one thread
whatever the setting: the engine's own matrix products are small (a 900 x 900 anomaly map is a
(900, 28) x (28, 900) product), and on a busy 2-core machine a two-thread BLAS stalled on them
(35 ms instead of 1.6 ms for that map), its idle threads busy-waiting beside the forward pass.
When the setting still reached BLAS, ``BACKEND_TORCH_THREADS=2`` on the 2-core AVX-512 EPYC gave
8.2 ROIs/s through the ZeroMQ door against 19.8 unset (bottle Lite0 @ 416 px, one client), and
the forward pass at 224 px took 62 ms instead of 7-9.
Concurrent requests bring their own parallelism. The C allocator gets one arena per usable core
(``engine.heap``), where glibc would give every thread that allocates beside another its own, and
keeps the blocks of a forward pass for the next one instead of mapping them afresh.

OpenMP keeps its thread count per thread: a count set at start-up reaches only the thread that
set it (limiting the OpenMP-built BLAS that faiss ships even set faiss to one thread there, and
nowhere else). So the faiss count is applied by :func:`use_faiss_threads` in the thread that
searches, before it searches.

:func:`run_shared` lends the same count of helper threads to a request's independent steps
(its heatmap encoding beside its region extraction, the bands of its anomaly map).

GNU OpenMP (torch's and faiss's, each its own copy) also keeps a *team* of threads for every
thread that has started a parallel region, for that thread's life; while a runtime's threads
outnumber the cores, every team's barriers sleep instead of spinning, and a forward pass
(hundreds of parallel regions) or a search gets much slower. Requests arrive on many threads
(the ZeroMQ workers, the REST door's pool), so inferences run on the engine's own inference
thread (:func:`run_inference`; one per core with one torch thread, where no teams form), and
long work that is not an inference (fits, calibrations from samples, added images) on a thread
that ends with it (:func:`on_fresh_thread`), taking its teams along. Bottle Lite0 @ 224 px,
16 386 rows, 2-core EPYC, the same ROI 20 times from the main thread, two other threads, the
main thread again: forward 20-41 ms and the whole inference 73-98 ms as each computed in its
own thread and the teams piled up, against 19-25 and 72-85 ms through the inference thread.
At 416 px, where each parallel region does ~3.5x more work, no difference was measured.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from threading import Barrier, BoundedSemaphore, Lock, Thread, local
from typing import Generic, TypeVar

from engine.heap import keep_freed_memory, limit_arenas, release_free_memory

__all__ = ["InTurn", "SizedPool", "configure_threads", "on_fresh_thread", "run_inference", "run_shared",
           "usable_cores", "use_faiss_threads"]

_T = TypeVar("_T")

_faiss_threads = 0     # 0: not configured (library use without an engine): OpenMP's own default


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def configure_threads(threads: int | None) -> None:
    """Set the pools; call once at start-up (the BLAS limit holds for the whole process)."""
    global _faiss_threads

    import cv2
    import torch
    from threadpoolctl import threadpool_limits

    from engine.search import configure_exact_workers

    if threads is not None:
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
    threadpool_limits(limits=1, user_api="blas")
    limit_arenas(usable_cores())
    keep_freed_memory()
    _faiss_threads = threads or usable_cores()
    # one thread with a team of all cores, or (one torch thread each) one per core
    _inference.configure(usable_cores() if threads == 1 else max(1, usable_cores() // (threads or usable_cores())))
    configure_exact_workers(_faiss_threads)
    _helpers.configure(_faiss_threads)
    use_faiss_threads()


def use_faiss_threads() -> None:
    """Give the calling thread the configured faiss (OpenMP) thread count; cheap when it has it."""
    if _faiss_threads:
        import faiss

        if faiss.omp_get_max_threads() != _faiss_threads:
            faiss.omp_set_num_threads(_faiss_threads)


def on_fresh_thread(fn: Callable[[], _T]) -> _T:
    """``fn()`` on a new thread that ends with it (in the caller's context variables, such as
    the request id the logs carry); its result, or its exception re-raised here. What the work
    freed goes back to the operating system once it ends (``engine.heap``)."""
    done: Future[_T] = Future()
    context = contextvars.copy_context()

    def run() -> None:
        try:
            _flush_denormals()
            done.set_result(context.run(fn))
        except BaseException as exc:          # handed to the caller, re-raised there
            done.set_exception(exc)

    thread = Thread(target=run, name="engine-work", daemon=True)
    thread.start()
    thread.join()
    release_free_memory()
    return done.result()


class SizedPool:
    """A thread pool of a configured size, all its threads started on first use.

    A ThreadPoolExecutor starts a thread per submission while none is idle; started all at
    once, no thread is created while a request waits on the pool (and the process's thread
    count stays put). A new size takes a new pool. The old one is dropped, not shut down: work
    that holds it finishes there, and its idle threads end when it is collected.
    """

    def __init__(self, name: str, size: int, initializer: Callable[..., object] | None = None,
                 initargs: tuple[object, ...] = ()) -> None:
        self._name, self._initializer, self._initargs = name, initializer, initargs
        self._size = size
        self._pool: ThreadPoolExecutor | None = None
        self._lock = Lock()

    @property
    def size(self) -> int:
        return self._size

    def resize(self, size: int) -> bool:
        """Set the size; True when it changed."""
        with self._lock:
            if size == self._size:
                return False
            self._size, self._pool = size, None
            return True

    def get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                count = max(1, self._size)
                pool = ThreadPoolExecutor(count, thread_name_prefix=self._name, initializer=self._initializer,
                                          initargs=self._initargs)
                started = Barrier(count)          # each thread holds one wait until all are started
                for wait in [pool.submit(started.wait, 30.0) for _ in range(count)]:
                    wait.result()
                self._pool = pool
            return self._pool


class _Helpers:
    """Helper threads for steps of a request that can run beside each other.

    A step runs on a helper only when one is idle: with every helper busy (several requests at
    once, already using the cores) it runs in the request's own thread, so a request never
    waits in a queue behind another one's step.
    """

    def __init__(self) -> None:
        self._pool = SizedPool("beside", 0)
        self._idle = BoundedSemaphore(1)

    def configure(self, count: int) -> None:
        """One helper per thread of the configured count; 1 (or 0) turns helpers off."""
        count = max(0, int(count))
        if self._pool.resize(count):
            self._idle = BoundedSemaphore(max(1, count))

    def share(self, drain: Callable[[], None]) -> Callable[[], None]:
        """Start ``drain`` on an idle helper, if one is. Returns a function that waits for it, or
        calls it off when it has not started yet: a drain only takes work the caller takes
        otherwise, so a helper slow to wake from idle costs nothing."""
        idle = self._idle
        if self._pool.size < 2 or not idle.acquire(blocking=False):
            return lambda: None

        def run() -> None:
            try:
                drain()
            finally:
                idle.release()

        try:
            future = self._pool.get().submit(run)
        except RuntimeError:                 # the pool is gone (interpreter shutting down)
            idle.release()
            return lambda: None

        def wait() -> None:
            if future.cancel():
                idle.release()
            else:
                future.result()

        return wait


_helpers = _Helpers()

_on_inference_thread = local()


def _flush_denormals() -> None:
    """Denormal floats flushed to zero in this thread (a per-thread processor flag): denormal
    activations made EfficientNet-Lite0 forwards 10-100x slower on x86 (``engine.features``)."""
    import torch

    torch.set_flush_denormal(True)


def _mark_inference_thread() -> None:
    _on_inference_thread.yes = True
    _flush_denormals()


class _InferenceThreads:
    """The threads inferences run on, whichever thread asks; queued in arrival order."""

    def __init__(self) -> None:
        self._pool = SizedPool("inference", 1, initializer=_mark_inference_thread)

    def configure(self, count: int) -> None:
        self._pool.resize(max(1, int(count)))

    def run(self, fn: Callable[[], _T]) -> _T:
        if getattr(_on_inference_thread, "yes", False):
            return fn()
        return self._pool.get().submit(contextvars.copy_context().run, fn).result()


_inference = _InferenceThreads()


def run_inference(fn: Callable[[], _T]) -> _T:
    """``fn()`` on an inference thread (in place when called from one), in the caller's context
    variables; its result, or its exception re-raised here."""
    return _inference.run(fn)


class InTurn(Generic[_T]):
    """Steps taken one after another by every thread that calls :meth:`drain` (a request's
    thread and its helpers), each taking the next step no one has taken yet; ``results`` are in
    the order of the steps once every drain has returned."""

    def __init__(self, steps: Sequence[Callable[[], _T]]) -> None:
        self._steps = steps
        self._results: list[_T | None] = [None] * len(steps)
        self._positions = iter(range(len(steps)))
        self._lock = Lock()

    def drain(self) -> None:
        while True:
            with self._lock:
                position = next(self._positions, -1)
            if position < 0:
                return
            self._results[position] = self._steps[position]()

    @property
    def results(self) -> list[_T]:
        return self._results  # type: ignore[return-value]


def run_shared(steps: Sequence[Callable[[], _T]]) -> Callable[[], list[_T]]:
    """Start ``steps`` on an idle helper thread, if one is, which takes them one
    after another in order. Returns a function that takes the steps no one has taken yet in the
    calling thread, waits for the helper's (or calls the helper off if it has not started), and
    gives every result in the order of ``steps``: the caller does its own work in between, then
    shares what is left. Without an idle helper every step runs in that function."""
    turns = InTurn(steps)
    helped = _helpers.share(turns.drain)

    def finish() -> list[_T]:
        turns.drain()
        helped()
        return turns.results

    return finish
