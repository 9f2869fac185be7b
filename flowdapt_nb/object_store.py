"""The object store: keep values between stages and runs, in cluster memory or on storage.

>>> import flowdapt_nb as fnb
>>> fnb.object_store.put("model", model)                          # doctest: +SKIP
>>> fnb.object_store.get("model")                                 # doctest: +SKIP
>>> fnb.object_store.put("model", model, strategy="artifact")     # doctest: +SKIP

Strategies:

- ``"fallback"`` (the default): put into cluster memory; when the value can't go there (no
  executor is running, or cluster memory refuses it) it becomes an artifact instead. ``get``
  and ``exists`` look in cluster memory first, then at the artifacts; ``delete`` removes both.
- ``"cluster_memory"``: cluster memory only. Fast; gone when the executor closes.
- ``"artifact"``: storage only (any fsspec URL, see :mod:`flowdapt_nb.artifacts`). Slower; it
  outlives the executor. Putting an artifact drops an older copy of the key from cluster
  memory, so ``get`` never returns the older value.

So a value meant for a later session (a trained model, a cleaned dataset) is put with
``strategy="artifact"``; a value for the next stage or the next run of the same executor uses the
default.

Inside a stage, ``namespace=None`` is the run's namespace and the storage is the executor's
(``services.storage`` or ``artifacts:`` in its config). From a notebook or script it is the
current executor's default namespace and storage, or, when none runs, namespace ``"default"`` and
the default location. Every function also takes ``storage=`` (a URL or mapping) to name another.
"""

from __future__ import annotations

import builtins
import logging

import cloudpickle

from . import pickling
from .artifacts import ArtifactStore, check_name, store_for
from .context import current_context

log = logging.getLogger(__name__)

STRATEGIES = ("cluster_memory", "artifact", "fallback")
DEFAULT_STRATEGY = "fallback"


def _strategy(strategy) -> str:
    if strategy is None:
        return DEFAULT_STRATEGY
    if strategy not in STRATEGIES:
        import difflib

        near = difflib.get_close_matches(str(strategy), STRATEGIES, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ValueError(
            f"unknown object store strategy {strategy!r}: use one of {', '.join(STRATEGIES)}{hint}"
        )
    return strategy


class _Scope:
    """Where a call reads and writes: the memory store (or None), namespace, storage, writer."""

    def __init__(self, memory, namespace: str, storage_setting, run: str | None, stage: str | None):
        self.memory = memory
        self.namespace = check_name(namespace, "namespace")
        self._setting = storage_setting
        self._storage: ArtifactStore | None = None
        self.run = run
        self.stage = stage

    @property
    def storage(self) -> ArtifactStore:
        if self._storage is None:
            self._storage = store_for(self._setting)
        return self._storage


def _scope(namespace: str | None, storage) -> _Scope:
    ctx = current_context()
    if ctx is not None:
        return _Scope(
            ctx.memory,
            namespace if namespace is not None else ctx.namespace,
            storage if storage is not None else ctx.artifacts,
            str(ctx.run),
            ctx.stage,
        )
    from .executors.base import current_executor

    ex = current_executor()
    memory = None
    if ex is not None:
        try:
            memory = ex.memory_store
        except Exception:  # closing right now
            memory = None
    if namespace is None:  # only None means the default: 0, False or "" are refused by _Scope
        namespace = ex.default_namespace if ex is not None else "default"
    return _Scope(
        memory,
        namespace,
        storage if storage is not None else (ex.storage if ex is not None else None),
        None,
        None,
    )


def _need_memory(scope: _Scope):
    if scope.memory is None:
        raise RuntimeError(
            "cluster memory needs a running executor: start one first "
            "(e.g. fnb.LocalExecutor().start() or %flowdapt executor local), "
            "or use strategy='artifact'"
        )
    return scope.memory


def put(key: str, value, namespace: str | None = None, strategy: str | None = None, *, storage=None) -> str:
    """Store ``value`` under ``key``; returns where it went: ``"cluster_memory"`` or ``"artifact"``.

    ``strategy``: ``"fallback"`` (default: cluster memory, else an artifact), ``"cluster_memory"``
    or ``"artifact"``. Any value cloudpickle can pickle; a pandas DataFrame is kept as Parquet
    on storage when pyarrow is installed.
    """
    strategy = _strategy(strategy)
    check_name(key)
    scope = _scope(namespace, storage)
    ns = scope.namespace
    if strategy == "cluster_memory":
        _need_memory(scope).put(ns, key, _pickle(value), type(value).__name__)
        return "cluster_memory"
    if strategy == "fallback" and scope.memory is not None:
        blob = _pickle(value)
        try:
            scope.memory.put(ns, key, blob, type(value).__name__)
            return "cluster_memory"
        except Exception as exc:  # cluster memory refused it (too big, its actor gone...): keep it on storage
            log.warning(
                "cluster memory could not hold %r (%s: %s); writing it as an artifact",
                key,
                type(exc).__name__,
                exc,
            )
    scope.storage.put(ns, key, value, run=scope.run, stage=scope.stage)
    if scope.memory is not None:  # an older copy in cluster memory must not shadow the new artifact
        try:
            scope.memory.delete(ns, key)
        except Exception as exc:  # pragma: no cover - memory going away is fine here
            log.debug("dropping %r from cluster memory failed: %s", key, exc)
    return "artifact"


def _pickle(value) -> bytes:
    return pickling.dumps(value, "the object store holds")


def _memory(scope: _Scope, strategy: str, method: str, *args, default=None):
    """Call cluster memory. With ``cluster_memory`` it must be there and answer; with
    ``fallback`` a missing or unreachable one (its server died) answers ``default``."""
    if strategy == "artifact":
        return default
    if scope.memory is None:
        if strategy == "cluster_memory":
            _need_memory(scope)
        return default
    try:
        return getattr(scope.memory, method)(*args)
    except Exception as exc:
        if strategy == "cluster_memory":
            raise
        log.warning(
            "cluster memory is unreachable (%s: %s); using the artifacts only", type(exc).__name__, exc
        )
        return default


def get(key: str, namespace: str | None = None, strategy: str | None = None, *, storage=None):
    """The value under ``key``: from cluster memory, else from the artifacts (default strategy).
    A missing key raises ``KeyError``."""
    strategy = _strategy(strategy)
    check_name(key)
    scope = _scope(namespace, storage)
    blob = _memory(scope, strategy, "lookup", scope.namespace, key)
    if blob is not None:
        return cloudpickle.loads(blob)
    if strategy == "cluster_memory":
        raise KeyError(f"{key!r} is not in cluster memory namespace '{scope.namespace}'")
    try:
        return scope.storage.get(scope.namespace, key)
    except KeyError:
        if strategy == "fallback":
            raise KeyError(
                f"{key!r} is neither in cluster memory nor among the artifacts of namespace "
                f"'{scope.namespace}' ({scope.storage.url})"
            ) from None
        raise KeyError(
            f"{key!r} is not among the artifacts of namespace '{scope.namespace}' ({scope.storage.url})"
        ) from None


def exists(key: str, namespace: str | None = None, strategy: str | None = None, *, storage=None) -> bool:
    """True when ``get`` would find ``key``."""
    strategy = _strategy(strategy)
    check_name(key)
    scope = _scope(namespace, storage)
    if _memory(scope, strategy, "exists", scope.namespace, key, default=False):
        return True
    return strategy != "cluster_memory" and scope.storage.exists(scope.namespace, key)


def delete(key: str, namespace: str | None = None, strategy: str | None = None, *, storage=None) -> bool:
    """Remove ``key`` (from both places with the default strategy); True if it was anywhere."""
    strategy = _strategy(strategy)
    check_name(key)
    scope = _scope(namespace, storage)
    removed = bool(_memory(scope, strategy, "delete", scope.namespace, key, default=False))
    if strategy != "cluster_memory":
        removed = scope.storage.delete(scope.namespace, key) or removed
    return removed


def list(namespace: str | None = None, strategy: str | None = None, *, storage=None) -> builtins.list[str]:  # noqa: A001
    """The keys of ``namespace``, sorted: in cluster memory and/or the artifacts."""
    strategy = _strategy(strategy)
    scope = _scope(namespace, storage)
    keys = {row[1] for row in _memory(scope, strategy, "listing", scope.namespace, default=())}
    if strategy != "cluster_memory":
        keys.update(scope.storage.keys(scope.namespace))
    return sorted(keys)


LISTING_COLUMNS = ["namespace", "key", "where", "type", "bytes", "created", "run", "location"]


def listing(namespace: str | None = None, *, storage=None, with_stage: bool = False):
    """pandas DataFrame of what the object store holds, every namespace unless one is named:
    namespace, key, where (``memory`` | ``artifact``), type, bytes, created, run (that stored
    an artifact), location; ``with_stage``: and stage (the stage that stored it).

    Used by ``%flowdapt memory``; a key in both places has two rows (memory first).
    """
    import pandas as pd

    if namespace is not None:
        check_name(namespace, "namespace")
    scope = _scope("default", storage)
    rows = []
    for ns, key, type_name, size, put_at in _memory(scope, "fallback", "listing", namespace, default=()):
        rows.append(
            (ns, key, "memory", type_name, size, pd.Timestamp(put_at, unit="s", tz="UTC"), None, None, None)
        )
    for meta in scope.storage.listing(namespace):
        created = pd.Timestamp(meta["created"]) if meta.get("created") else pd.NaT
        rows.append(
            (
                meta.get("namespace"),
                meta.get("key"),
                "artifact",
                meta.get("type"),
                meta.get("size"),
                created,
                meta.get("run"),
                meta.get("stage"),
                meta.get("location"),
            )
        )
    frame = pd.DataFrame(rows, columns=[*LISTING_COLUMNS[:-1], "stage", LISTING_COLUMNS[-1]])
    if not with_stage:
        frame = frame.drop(columns="stage")
    if len(frame):
        frame["created"] = pd.to_datetime(frame["created"], utc=True)
        order = frame["where"].map({"memory": 0, "artifact": 1})
        frame = frame.assign(_o=order).sort_values(["namespace", "key", "_o"]).drop(columns="_o")
        frame = frame.reset_index(drop=True)
    return frame


def namespace_sizes(*, storage=None):
    """pandas DataFrame, one row per namespace and place: namespace, where, keys, bytes."""
    import pandas as pd

    frame = listing(storage=storage)
    if not len(frame):
        return pd.DataFrame(columns=["namespace", "where", "keys", "bytes"])
    return frame.groupby(["namespace", "where"], as_index=False).agg(
        keys=("key", "count"), bytes=("bytes", "sum")
    )


def storage_url(*, storage=None) -> str:
    """The storage location the object store would use here and now."""
    return _scope("default", storage).storage.url
