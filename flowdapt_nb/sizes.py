"""A cheap estimate of how many bytes a value holds in memory (for bounding ``ex.history``).

Never pickles or walks a large value whole: arrays and frames report their buffers, containers
are sampled and scaled up.
"""

from __future__ import annotations

import sys

SAMPLE = 100  # elements of a container measured; the rest are assumed alike
DEPTH = 4  # containers nested deeper count at their shallow size


def estimate_bytes(value, _depth: int = 0) -> int:
    """Approximate bytes held by ``value``: ``len`` of bytes-like values, ``nbytes`` of numpy
    arrays, ``memory_usage(deep=False)`` of pandas objects (object columns count their pointers
    only), containers by a sample of their elements, anything else by ``sys.getsizeof``.

    >>> estimate_bytes(bytearray(1000)) >= 1000
    True
    """
    if value is None or isinstance(value, (bool, int, float, complex)):
        return sys.getsizeof(value)
    if isinstance(value, (bytes, bytearray, str)):
        return sys.getsizeof(value)
    if isinstance(value, memoryview):
        return value.nbytes
    nbytes = getattr(value, "nbytes", None)  # numpy arrays (and array-likes that say)
    if isinstance(nbytes, int) and type(value).__module__.startswith(("numpy", "torch", "cupy", "jax")):
        return nbytes
    module = type(value).__module__
    if module.startswith("pandas"):
        usage = getattr(value, "memory_usage", None)
        if usage is not None:
            try:
                total = usage(index=True, deep=False)
                return int(total.sum() if hasattr(total, "sum") else total)
            except Exception:
                pass
    if _depth >= DEPTH:
        return sys.getsizeof(value)
    if isinstance(value, dict):
        return sys.getsizeof(value) + _sampled(list(_first(value.items())), len(value), _depth, pairs=True)
    if isinstance(value, (list, tuple, set, frozenset)):
        return sys.getsizeof(value) + _sampled(list(_first(value)), len(value), _depth)
    if isinstance(nbytes, int):
        return nbytes
    return sys.getsizeof(value)


def _first(iterable):
    for i, x in enumerate(iterable):
        if i >= SAMPLE:
            return
        yield x


def _sampled(sample: list, total: int, depth: int, pairs: bool = False) -> int:
    if not sample:
        return 0
    if pairs:
        measured = sum(estimate_bytes(k, depth + 1) + estimate_bytes(v, depth + 1) for k, v in sample)
    else:
        measured = sum(estimate_bytes(x, depth + 1) for x in sample)
    return measured * total // len(sample)
