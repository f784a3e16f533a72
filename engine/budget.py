"""The process-wide working-memory budget: big requests wait their turn, or get 503, instead of
exhausting memory together.

Each request reserves what its images will take (``engine.images.ImageHeader``, read before
decoding) for as long as it holds them; the sum of reservations never exceeds the budget. A request
that does not fit waits up to ``wait_s`` for others to finish, then gets ``ServerBusy`` (503); one
that could never fit gets ``PayloadTooLarge`` (413) at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from engine.errors import PayloadTooLarge, ServerBusy

__all__ = ["MemoryBudget"]

log = structlog.get_logger("engine.budget")


class MemoryBudget:
    """``total`` bytes shared by every thread of the process."""

    def __init__(self, total: int, wait_s: float) -> None:
        self.total = total
        self._wait_s = wait_s
        self._used = 0
        self._changed = threading.Condition()

    @property
    def used(self) -> int:
        return self._used

    @contextmanager
    def hold(self, nbytes: int, what: str = "request") -> Iterator[None]:
        """Reserve ``nbytes`` for the ``with`` block.

        Raises:
            PayloadTooLarge: ``nbytes`` exceeds the whole budget.
            ServerBusy: the budget stayed full for ``wait_s`` seconds.
        """
        if nbytes > self.total:
            raise PayloadTooLarge(f"{what} needs about {nbytes} bytes of working memory; "
                                  f"the process budget is {self.total}")
        self._reserve(nbytes, what)
        try:
            yield
        finally:
            with self._changed:
                self._used -= nbytes
                self._changed.notify_all()

    def _reserve(self, nbytes: int, what: str) -> None:
        deadline = time.monotonic() + self._wait_s
        with self._changed:
            while self._used + nbytes > self.total:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("memory_budget_full", needed=nbytes, used=self._used, total=self.total)
                    raise ServerBusy(f"{what} needs about {nbytes} bytes of working memory and the "
                                     f"process budget is in use; retry later")
                self._changed.wait(left)
            self._used += nbytes
