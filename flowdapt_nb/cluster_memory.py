"""Cluster memory: values shared by every stage and worker of a running executor.

>>> import flowdapt_nb as fnb
>>> fnb.cluster_memory.put("model", {"w": 1})      # doctest: +SKIP
>>> fnb.cluster_memory.get("model")                # doctest: +SKIP
{'w': 1}

Inside a stage, ``namespace=None`` means the run's namespace; outside, the executor's default.
Values travel pickled (cloudpickle), so any picklable value works on every executor, and ``get``
returns a copy.
"""

from __future__ import annotations

import cloudpickle

from .context import current_context


def _check_namespace(namespace) -> str | None:
    """None (the default namespace) or a non-empty string: ``0``, ``False`` or ``""`` are mistakes,
    not "the default", and a number would break every listing."""
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise TypeError(
            f"cluster memory namespaces are non-empty strings (None means the default), got {namespace!r}"
        )
    return namespace


def _store_and_namespace(namespace: str | None):
    namespace = _check_namespace(namespace)
    ctx = current_context()
    if ctx is not None and ctx.memory is not None:
        return ctx.memory, namespace if namespace is not None else ctx.namespace
    from .executors.base import current_executor

    ex = current_executor()
    if ex is None:
        raise RuntimeError(
            "cluster memory needs a running executor: start one first "
            "(e.g. fnb.LocalExecutor().start() or %flowdapt executor local)"
        )
    return ex.memory_store, namespace if namespace is not None else ex.default_namespace


def _check_key(key) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"cluster memory keys are non-empty strings, got {key!r}")
    return key


def put(key: str, value, namespace: str | None = None) -> None:
    """Store ``value`` under ``key`` (any picklable value)."""
    store, ns = _store_and_namespace(namespace)
    try:
        blob = cloudpickle.dumps(value)
    except Exception as exc:
        raise TypeError(
            f"cluster memory holds picklable values; {type(value).__name__} is not: {exc}"
        ) from None
    store.put(ns, _check_key(key), blob, type(value).__name__)


def get(key: str, namespace: str | None = None):
    """The value under ``key``; a missing key raises ``KeyError``."""
    store, ns = _store_and_namespace(namespace)
    blob = store.lookup(ns, _check_key(key))
    if blob is None:
        raise KeyError(f"{key!r} is not in cluster memory namespace '{ns}'")
    return cloudpickle.loads(blob)


def exists(key: str, namespace: str | None = None) -> bool:
    store, ns = _store_and_namespace(namespace)
    return bool(store.exists(ns, _check_key(key)))


def delete(key: str, namespace: str | None = None) -> bool:
    """Remove ``key``; True if it was there."""
    store, ns = _store_and_namespace(namespace)
    return bool(store.delete(ns, _check_key(key)))


def clear(namespace: str | None = None) -> int:
    """Remove every key (of one namespace when given); returns how many."""
    store, _ = _store_and_namespace(None)
    return int(store.clear(_check_namespace(namespace)))


def listing(namespace: str | None = None):
    """pandas DataFrame of what cluster memory holds: namespace, key, type, size, put_at."""
    import pandas as pd

    store, _ = _store_and_namespace(None)
    rows = store.listing(_check_namespace(namespace))
    frame = pd.DataFrame(rows, columns=["namespace", "key", "type", "bytes", "put_at"])
    frame["put_at"] = pd.to_datetime(frame["put_at"], unit="s", utc=True)
    return frame
