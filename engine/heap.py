"""The C heap under long-running work: few arenas, and freed memory given back.

glibc's allocator keeps what threads free in *arenas* for later use, up to 8 arenas per core,
each thread allocating from its own. A fit frees hundreds of MiB (the patch features of its
images, the coreset's working arrays); through the doors the request, the model load and the
inferences around it run on a dozen threads, and each arena kept its share, so a serving
process grew refit after refit. Three measures, each where glibc offers it (nothing is done
elsewhere: Windows, macOS, musl):

* :func:`limit_arenas` at start-up: one arena per usable core. Bottle Lite0 @ 224 px, a 3 136
  row projected memory, 2-core EPYC, 12 refits through the ZeroMQ door beside 4 clients'
  inferences: resident memory 623 -> 767 MiB with glibc's default, flat at 515-546 MiB with 2
  arenas; inference latency unchanged within noise.
* :func:`release_free_memory` after long work (``engine.threads.on_fresh_thread``). Bottle Lite0
  @ 416 px, 209 images, three fits in one process: resident memory after each fit 884 / 1022 /
  894 MiB without, 578 / 607 / 613 MiB with (the trim takes ~20 ms).
* :func:`keep_freed_memory` at start-up: blocks below 32 MiB come from the arenas, and an arena
  gives its free top back only above 32 MiB (or at the trims above). glibc's defaults (128 KiB for
  both) adapt upwards only when a large block is freed after being mapped on its own; until some
  code does that, every forward pass mapped its activations afresh and the kernel zeroed their
  pages: bottle Lite0 @ 416 px, 3 000-4 500 page faults per inference and the forward pass 17-25
  ms instead of 13-15 (it happened in processes where no faiss search ran between forward
  passes, whose buffers raised the thresholds as a side effect). With the free tops kept up to
  64 MiB, the soak below grew 423 -> 451 MiB over its refits (FAIL); up to 32 MiB, 412 -> 418.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from functools import cache
from typing import Any

__all__ = ["keep_freed_memory", "limit_arenas", "release_free_memory"]

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MMAP_THRESHOLD = 32 * 2**20    # glibc's largest (64-bit)
_TRIM_THRESHOLD = 32 * 2**20


@cache
def _libc(name: str) -> Any:
    """A function of the process's own C library when it is glibc's, else None."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    return function


def limit_arenas(count: int) -> bool:
    """At most ``count`` allocator arenas from now on (arenas already made stay); True when set."""
    mallopt = _libc("mallopt")
    return mallopt is not None and bool(mallopt(ctypes.c_int(_M_ARENA_MAX), ctypes.c_int(max(1, int(count)))))


def keep_freed_memory(mmap_threshold: int = _MMAP_THRESHOLD, trim_threshold: int = _TRIM_THRESHOLD) -> bool:
    """Blocks below ``mmap_threshold`` bytes from the arenas, free arena tops above
    ``trim_threshold`` given back (fixed: glibc stops adapting them); True when set."""
    mallopt = _libc("mallopt")
    return (mallopt is not None and bool(mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(int(mmap_threshold))))
            and bool(mallopt(ctypes.c_int(_M_TRIM_THRESHOLD), ctypes.c_int(int(trim_threshold)))))


def release_free_memory() -> bool:
    """Give the allocator's free pages back to the operating system; True when some were."""
    trim = _libc("malloc_trim")
    return trim is not None and bool(trim(ctypes.c_size_t(0)))
