"""Process-wide thread counts of the compute libraries, set once when the engine starts.

``threads`` (``BACKEND_TORCH_THREADS``) goes to torch's intra-op pool, faiss's OpenMP pool,
OpenCV and the BLAS libraries numpy and faiss call. Unset, torch, faiss and OpenCV keep their
defaults (one thread per core) and BLAS gets one thread: the engine's own matrix products are
small (a 900 x 900 anomaly map is a (900, 28) x (28, 900) product), and on a busy 2-core
machine a two-thread BLAS stalled on them (35 ms instead of 1.6 ms for that map, measured).
Concurrent requests bring their own parallelism.
"""

from __future__ import annotations

__all__ = ["configure_threads"]


def configure_threads(threads: int | None) -> None:
    """Set the pools; call once at start-up (the BLAS limit holds for the whole process)."""
    import cv2
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    if threads is not None:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        cv2.setNumThreads(threads)
    threadpool_limits(limits=threads or 1, user_api="blas")
