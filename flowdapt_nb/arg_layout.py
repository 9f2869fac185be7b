"""How a task's flat argument list regroups into the stage's positional arguments.

The engine sends each task its dependencies' outputs as one flat list of handles (so a backend
can resolve them all: Ray refs, Dask futures), with a *layout*: one entry per positional
argument, saying how many flat values it takes. ``worker.regroup`` rebuilds the arguments.

Entries are built with the functions below and carry the enum's plain one-letter value: a
layout travels with every task, and an enum member would cost ~3 us more per task to unpickle.
Read an entry's kind with ``Arg(entry[0])`` (or compare ``entry[0] == Arg.VALUE``).
"""

from __future__ import annotations

from enum import Enum


class Arg(str, Enum):
    """The kind of one layout entry (a ``str`` enum: it compares equal to its tag)."""

    VALUE = "v"  # (VALUE,): the next flat value as it is
    GATHERED = "g"  # (GATHERED, k): the next k flat values as one list (a fan-out's results)
    ITEM = "i"  # (ITEM, n): item n of the next flat value (a dependency split on the worker)
    CONSTANT = "c"  # (CONSTANT, v): v itself, carried in the layout (an item of the run input)


_VALUE = (Arg.VALUE.value,)


def value() -> tuple:
    """The next flat value, as it is."""
    return _VALUE


def gathered(count: int) -> tuple:
    """The next ``count`` flat values, as one list."""
    return (Arg.GATHERED.value, count)


def item(index: int) -> tuple:
    """Item ``index`` of the next flat value."""
    return (Arg.ITEM.value, index)


def constant(v) -> tuple:
    """``v`` itself; takes no flat value."""
    return (Arg.CONSTANT.value, v)


def takes_flat_value(entry: tuple) -> bool:
    """False for an entry that carries its value itself (a constant)."""
    return entry[0] != Arg.CONSTANT
