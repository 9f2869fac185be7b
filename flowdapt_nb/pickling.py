"""Pickling a user's value for a store, with one error when it can't be pickled.

The object store, artifacts (and cluster memory) all refuse an unpicklable value the same way:
a ``TypeError`` that names the store and the value's type; any other failure (a full disk, a
closed file) passes through as it is.
"""

from __future__ import annotations

import pickle
from typing import IO

import cloudpickle


def is_pickling_error(exc: BaseException) -> bool:
    """True when ``exc`` says a value can't be pickled (``pickle.PicklingError``, or the
    ``TypeError``/``AttributeError`` a lock or a local object raises, or a library's own
    ``...PicklingError``)."""
    return (
        isinstance(exc, (pickle.PicklingError, TypeError, AttributeError))
        or "pickl" in type(exc).__name__.lower()
    )


def unpicklable(value, holds: str, exc: BaseException) -> TypeError:
    """The error for a value a store can't keep; ``holds`` names the store with its verb
    ("the object store holds", "artifacts hold")."""
    return TypeError(f"{holds} values cloudpickle can pickle; {type(value).__name__} is not: {exc}")


def dumps(value, holds: str) -> bytes:
    """``cloudpickle.dumps(value)``; an unpicklable value is a TypeError saying what ``holds`` it."""
    try:
        return cloudpickle.dumps(value)
    except Exception as exc:
        if is_pickling_error(exc):
            raise unpicklable(value, holds, exc) from None
        raise


def dump(value, file: IO[bytes], holds: str) -> None:
    """``cloudpickle.dump(value, file)`` (protocol 5); errors as :func:`dumps`."""
    try:
        cloudpickle.dump(value, file, protocol=5)
    except Exception as exc:
        if is_pickling_error(exc):
            raise unpicklable(value, holds, exc) from None
        raise
