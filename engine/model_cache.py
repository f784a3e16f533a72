"""A thread-safe LRU of loaded models, keyed by (recipe, role, roi)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["ModelCache"]

K = TypeVar("K")
V = TypeVar("V")


class ModelCache(Generic[K, V]):
    """At most ``capacity`` values; ``get_or_load`` loads a missing key once, even under contention."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[K, threading.Lock] = {}
        self._generation: dict[K, int] = {}      # bumped by put and invalidate

    def get_or_load(self, key: K, load: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
                generation = self._generation.get(key, 0)
            value = load()
            with self._lock:
                # a put or invalidate during the load (a refit, a calibration) is newer than what
                # load() read: keep it rather than overwrite it with a stale value
                if self._generation.get(key, 0) == generation:
                    self._items[key] = value
                    self._items.move_to_end(key)
                    while len(self._items) > self.capacity:
                        self._items.popitem(last=False)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._generation[key] = self._generation.get(key, 0) + 1
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def invalidate(self, key: K) -> None:
        with self._lock:
            self._generation[key] = self._generation.get(key, 0) + 1
            self._items.pop(key, None)

    def keys(self) -> list[K]:
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
