"""The one table of executor kinds: a name (``local``, ``dask``, ``ray``, or one a subclass
registers) maps to its class, and the class carries what the rest of the package needs to
know about it (``kind``, ``aliases``, ``title``, ``native_dashboard``, ``magic_options``).

Kept light on purpose: it imports nothing from flowdapt_nb, so ``config`` can resolve targets
through it and ``executors.base`` can register classes in it without an import loop. Built-in
classes are imported on first use only (their modules import Ray/Dask lazily themselves).

Adding a backend: subclass ``flowdapt_nb.executors.base.Executor`` with its own ``kind`` (and
the facts above); defining the class registers it. A built-in one is also named in
``_BUILTIN`` so a config can name it before its module was imported.
"""

from __future__ import annotations

import difflib
import importlib
import threading
import weakref
from typing import Any

# name -> dotted path of a built-in class, imported when first asked for
_BUILTIN = {
    "local": "flowdapt_nb.executors.local.LocalExecutor",
    "dask": "flowdapt_nb.executors.dask.DaskExecutor",
    "ray": "flowdapt_nb.executors.ray.RayExecutor",
}

_lock = threading.RLock()
# name -> class, in registration order after the built-ins (Any: Executor is not imported here)
_kinds: dict[str, Any] = {}
_classes: weakref.WeakSet[type] = weakref.WeakSet()  # every Executor class, kinds or not


def note_class(cls: type) -> None:
    """Called for ``Executor`` and every subclass as it is defined: a class that sets its own
    ``kind`` becomes that kind (a class defined again, e.g. a notebook cell run twice, replaces
    the earlier one). A built-in kind's name stays with its built-in class: a subclass that
    repeats ``kind = "local"`` is an executor class (a dotted target may name it), not "local"."""
    with _lock:
        _classes.add(cls)
        kind = cls.__dict__.get("kind")
        if not isinstance(kind, str) or not kind or kind == "base":
            return
        name = kind.lower()
        if name in _BUILTIN and _BUILTIN[name] != f"{cls.__module__}.{cls.__qualname__}":
            return
        _kinds[name] = cls


def unregister(kind: str) -> None:
    """Forget a registered kind (not a built-in one)."""
    with _lock:
        if kind.lower() not in _BUILTIN:
            _kinds.pop(kind.lower(), None)


def _load_builtin(name: str) -> Any:
    cls = _kinds.get(name)
    if cls is None:
        module_name, _, attr = _BUILTIN[name].rpartition(".")
        getattr(importlib.import_module(module_name), attr)  # defining it registers it
        cls = _kinds[name]
    return cls


def kinds() -> list[str]:
    """Every executor kind by name: the built-ins first, then registered ones."""
    with _lock:
        return [*_BUILTIN, *(k for k in _kinds if k not in _BUILTIN)]


def get(kind: str) -> Any:
    """The class of an executor kind (a KeyError for an unknown name)."""
    name = kind.lower()
    with _lock:
        if name in _BUILTIN:
            return _load_builtin(name)
        return _kinds[name]


def classes() -> dict[str, Any]:
    """Every kind and its class (built-ins imported)."""
    return {name: get(name) for name in kinds()}


def valid_text() -> str:
    """'local, dask, ray': the kinds, as error messages list them."""
    return ", ".join(kinds())


def is_executor_class(obj) -> bool:
    """True for ``Executor`` and its subclasses."""
    with _lock:
        return isinstance(obj, type) and obj in _classes


def resolve(target, line: int | None = None):
    """The class a config's ``target`` names: a kind (any case), an alias a class declares
    (Flowdapt's class paths, ``flowdapt_nb.LocalExecutor``), or a dotted path to an Executor
    class. A ConfigError names what is valid."""
    from ..errors import ConfigError

    valid = f"{valid_text()}, or a class path such as flowdapt.compute.executor.ray.RayExecutor"
    if not isinstance(target, str) or not target:
        raise ConfigError(
            f"'target' must name an executor: {valid_text()}, or a class path", key="target", line=line
        )
    if target.lower() in kinds():
        return get(target)
    for cls in classes().values():
        if target in cls.aliases:
            return cls
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        near = difflib.get_close_matches(target.lower(), kinds(), n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"valid: {valid}"
        raise ConfigError(f"unknown executor target '{target}'", key="target", line=line, hint=hint)
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"executor target '{target}' does not import ({exc})",
            key="target",
            line=line,
            hint=f"valid: {valid}",
        ) from None
    if not is_executor_class(cls):
        raise ConfigError(
            f"executor target '{target}' is not a flowdapt_nb Executor class",
            key="target",
            line=line,
            hint=f"valid: {valid}",
        )
    return cls
