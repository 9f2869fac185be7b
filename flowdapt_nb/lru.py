"""A small bounded cache that forgets the least recently used entry first.

Worker processes keep stage functions, run contexts and a run's object refs in one of these, so
a long-lived worker holds only the few it used last.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_MISSING = object()


class LRU(Generic[K, V]):
    """At most ``maxsize`` entries; using one (``get``, ``get_or_load``) makes it the newest.

    >>> cache = LRU(2)
    >>> cache.get_or_load("a", lambda: 1), cache.get_or_load("b", lambda: 2)
    (1, 2)
    >>> cache.get("a"); cache.put("c", 3); "b" in cache   # "b" was the least recently used
    1
    False
    """

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError("an LRU needs room for at least one entry")
        self.maxsize = maxsize
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K, default=None):
        """The value under ``key`` (now the most recently used), else ``default``."""
        with self._lock:
            value = self._data.get(key, _MISSING)
            if value is _MISSING:
                return default
            self._data.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        """Keep ``value`` under ``key`` as the newest entry; the oldest goes past ``maxsize``."""
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def get_or_load(self, key: K, load: Callable[[], V]) -> V:
        """The value under ``key``; on a miss, ``load()`` (called without the lock: it may be
        slow) and keep what it returns."""
        value = self.get(key, _MISSING)
        if value is _MISSING:
            value = load()
            self.put(key, value)
        return value

    def keys(self) -> list[K]:
        """The keys, least recently used first (a snapshot)."""
        with self._lock:
            return list(self._data)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
