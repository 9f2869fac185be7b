"""The store behind cluster memory: pickled values by (namespace, key).

One class, served as it is (threads), from a multiprocessing manager (local processes), or
inside a Ray / Dask actor, so every executor holds any picklable value the same way.
"""

from __future__ import annotations

import threading
import time


class MemoryStore:
    """Thread-safe map of (namespace, key) -> (pickled bytes, type name, time)."""

    def __init__(self):
        self._data: dict[tuple[str, str], tuple[bytes, str, float]] = {}
        self._lock = threading.Lock()

    def put(self, namespace: str, key: str, blob: bytes, type_name: str) -> None:
        with self._lock:
            self._data[(namespace, key)] = (blob, type_name, time.time())

    def get(self, namespace: str, key: str) -> bytes:
        with self._lock:
            entry = self._data.get((namespace, key))
        if entry is None:
            raise KeyError(key)
        return entry[0]

    def lookup(self, namespace: str, key: str):
        """The blob, or None when the key is missing (no exception across process boundaries)."""
        with self._lock:
            entry = self._data.get((namespace, key))
        return None if entry is None else entry[0]

    def exists(self, namespace: str, key: str) -> bool:
        with self._lock:
            return (namespace, key) in self._data

    def delete(self, namespace: str, key: str) -> bool:
        with self._lock:
            return self._data.pop((namespace, key), None) is not None

    def clear(self, namespace: str | None = None) -> int:
        with self._lock:
            doomed = [k for k in self._data if namespace is None or k[0] == namespace]
            for k in doomed:
                del self._data[k]
            return len(doomed)

    def listing(self, namespace: str | None = None) -> list[tuple[str, str, str, int, float]]:
        """(namespace, key, type, size in bytes, time put) for each entry."""
        with self._lock:
            return [
                (ns, key, type_name, len(blob), t)
                for (ns, key), (blob, type_name, t) in sorted(self._data.items())
                if namespace is None or ns == namespace
            ]
