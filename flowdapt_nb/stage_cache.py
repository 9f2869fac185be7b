"""The stage cache: a stage whose fingerprint is unchanged reuses its stored output.

A stage's fingerprint hashes its function (source, defaults, closure and the globals its code
names, as far as they can be hashed), its type and options, the run input it takes (a root
stage) and its dependencies' fingerprints, so changing one function re-runs that stage and
everything downstream, nothing upstream. Outputs are artifacts in the run's namespace (cached
values never cross namespaces), one per task: a parameterized stage reuses per item.

Turned on per stage (``options.cache: true``) or per run (``ex.run(..., cache=True)``).
"""

from __future__ import annotations

import hashlib
import inspect
import pickle
import types

PREFIX = "fnb-cache-"
_MAX_VALUE_BYTES = 1_000_000  # a global bigger than this pickled counts by its type and id only


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def _value_bytes(value) -> bytes:
    try:
        data = pickle.dumps(value, protocol=4)
    except Exception:
        try:
            import cloudpickle

            data = cloudpickle.dumps(value)
        except Exception:
            return repr(value).encode()
    return data if len(data) <= _MAX_VALUE_BYTES else f"{type(value).__qualname__}@{id(value)}".encode()


def function_fingerprint(fn, _seen: set | None = None, depth: int = 0) -> str:
    """Hash of a function's source, defaults, closure and the globals its code reads (functions
    among them by their own fingerprint, modules by name and version)."""
    seen = _seen if _seen is not None else set()
    if id(fn) in seen or depth > 3:
        return "recursive"
    seen.add(id(fn))
    target = inspect.unwrap(fn) if callable(fn) else fn
    if isinstance(target, types.BuiltinFunctionType) or not hasattr(target, "__code__"):
        mod = getattr(target, "__module__", "") or ""
        return _digest("callable", mod, getattr(target, "__qualname__", repr(target)))
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError):
        source = target.__code__.co_code.hex()
    parts = [source, _value_bytes(target.__defaults__), _value_bytes(target.__kwdefaults__)]
    for cell in target.__closure__ or ():
        try:
            parts.append(_part(cell.cell_contents, seen, depth))
        except ValueError:  # an empty cell
            parts.append("empty")
    names = set(target.__code__.co_names)
    for const in target.__code__.co_consts:  # nested functions' globals too
        if isinstance(const, types.CodeType):
            names.update(const.co_names)
    for name in sorted(names):
        if name in target.__globals__:
            parts.append(name)
            parts.append(_part(target.__globals__[name], seen, depth))
    return _digest(*parts)


def _part(value, seen: set, depth: int):
    if isinstance(value, types.ModuleType):
        return f"module {value.__name__} {getattr(value, '__version__', '')}"
    if isinstance(value, (types.FunctionType, types.MethodType)):
        return function_fingerprint(value, seen, depth + 1)
    if isinstance(value, type):
        return f"class {value.__module__}.{value.__qualname__}"
    return _value_bytes(value)


def stage_fingerprints(wf, fns: dict, run_input: dict) -> dict[str, str]:
    """Each stage's fingerprint, dependencies first."""
    from .workflow import root_kwargs, topological_order

    out: dict[str, str] = {}
    for name in topological_order(wf):
        stage = wf.stage(name)
        options = {k: v for k, v in (stage.options or {}).items() if k != "cache"}
        taken = root_kwargs(stage, fns[name], run_input) if not stage.depends_on else {}
        mapped = run_input.get(stage.map_on) if stage.type == "parameterized" and stage.map_on else None
        out[name] = _digest(
            function_fingerprint(fns[name]),
            stage.type,
            _value_bytes(options),
            _value_bytes(sorted(taken.items())),
            _value_bytes(mapped),
            *(out[d] for d in stage.depends_on),
        )
    return out


def cache_key(fingerprint: str, item: int | None) -> str:
    return f"{PREFIX}{fingerprint[:32]}-{'s' if item is None else item}"


class CachedCall:
    """A stage function that first looks for its output under its task's cache key (in the run's
    namespace, on the executor's storage), and stores the output when it had to run."""

    def __init__(self, fn, fingerprint: str):
        self.fn = fn
        self.fingerprint = fingerprint
        self.__name__ = getattr(fn, "__name__", "stage")
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)
        self.__module__ = getattr(fn, "__module__", None) or type(fn).__module__
        try:
            self.__signature__ = inspect.signature(fn)
        except (TypeError, ValueError):
            pass

    def __call__(self, *args, **kwargs):
        from . import object_store
        from .context import get_run_context

        key = cache_key(self.fingerprint, get_run_context().item)
        if object_store.exists(key, strategy="artifact"):
            return object_store.get(key, strategy="artifact")
        value = self.fn(*args, **kwargs)
        try:
            object_store.put(key, value, strategy="artifact")
        except Exception as exc:  # a value that can't be stored is not cached; the task still succeeds
            import warnings

            warnings.warn(
                f"stage cache: output of '{get_run_context().stage}' not stored "
                f"({type(exc).__name__}: {exc})",
                RuntimeWarning,
                stacklevel=2,
            )
        return value


def wants_cache(stage, run_cache: bool | None) -> bool:
    """The run's ``cache=`` when given, else the stage's ``options.cache``."""
    return bool(run_cache) if run_cache is not None else bool((stage.options or {}).get("cache"))


def prepare(
    wf, fns: dict, run_input: dict, run_cache: bool | None, namespace: str, storage
) -> tuple[dict, dict]:
    """Wrap the stages that cache; returns (fns to run, {stage: set of items already cached}).
    The second says which tasks will be reused (None in the set: a simple stage's one task)."""
    from . import object_store

    cached_stages = [s for s in wf.stages if wants_cache(s, run_cache)]
    if not cached_stages:
        return fns, {}
    prints = stage_fingerprints(wf, fns, run_input)
    keys = set(object_store.list(namespace, strategy="artifact", storage=storage))
    wrapped, hits = dict(fns), {}
    for stage in cached_stages:
        fp = prints[stage.name]
        wrapped[stage.name] = CachedCall(fns[stage.name], fp)
        head = cache_key(fp, None).rsplit("-", 1)[0] + "-"
        found = set()
        for key in keys:
            if key.startswith(head):
                tail = key[len(head) :]
                found.add(None if tail == "s" else int(tail) if tail.isdigit() else tail)
        hits[stage.name] = found
    return wrapped, hits


CACHE_COLUMNS = ["namespace", "stage", "item", "type", "bytes", "created", "run", "key"]


def listing(namespace: str | None = None, *, storage=None):
    """pandas DataFrame of cached stage outputs, one row per task: namespace, stage, item (NA
    for a simple stage's one task), type, bytes, created, run (the run that stored it), key.

    >>> from flowdapt_nb import stage_cache
    >>> stage_cache.listing("tutorial09")  # doctest: +SKIP
    """
    import pandas as pd

    from . import object_store

    frame = object_store.listing(namespace, storage=storage, with_stage=True)
    if frame.empty or "key" not in frame:
        return pd.DataFrame(columns=CACHE_COLUMNS)
    keys = frame["key"].astype(str)
    cached = keys.str.startswith(PREFIX) & (frame["where"] == "artifact")
    frame = frame[cached]
    tail = keys[cached].str.rsplit("-", n=1).str[-1]
    # an item's index, or NA: a simple stage's one task ("s"), or a key this code didn't write
    frame = frame.assign(item=pd.to_numeric(tail.where(tail.str.fullmatch(r"\d+"))).astype("Int64"))
    # grouped by the run that stored them (oldest first), its stages in the order they ran
    by_run = frame.groupby("run", dropna=False)["created"].transform("min")
    by_stage = frame.groupby(["run", "stage"], dropna=False)["created"].transform("min")
    frame = frame.assign(_run=by_run, _stage=by_stage).sort_values(
        ["namespace", "_run", "run", "_stage", "stage", "item"], na_position="first"
    )
    return frame[CACHE_COLUMNS].reset_index(drop=True)


def clear(namespace: str | None = None, *, storage=None) -> int:
    """Delete cached stage outputs (of one namespace, or all); returns how many."""
    from . import object_store

    frame = listing(namespace, storage=storage)
    count = 0
    for row in frame.to_dict("records"):
        if object_store.delete(row["key"], row.get("namespace"), strategy="artifact", storage=storage):
            count += 1
    return count
