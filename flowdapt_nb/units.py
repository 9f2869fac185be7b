"""Parse sizes such as ``8GB`` and counts such as ``auto``; write durations for people."""

from __future__ import annotations

import os
import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value) -> int:
    """``"8GB"`` -> 8_000_000_000; ``"512MiB"``, ``1024`` and ``"1.5 GB"`` work too.

    >>> parse_bytes("2GiB")
    2147483648
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '8GB', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a size can't be negative, got {value!r}")
        return int(value)
    match = _SIZE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size like '8GB', '512MiB' or a number of bytes, got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def usable_cores() -> int:
    """Cores this process may use (affinity aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def auto_cpus() -> int:
    """Flowdapt's ``cpus: auto``: usable cores - 1, but at least 1."""
    return max(1, usable_cores() - 1)


def fmt_duration(seconds: float | None) -> str:
    """A duration as people read it: ``<1 ms``, ``12 ms``, ``3.4 s``, ``2 m 05 s``, ``1 h 02 m``;
    ``–`` for none (a task that never ran)."""
    if seconds is None or seconds != seconds:  # None or NaN
        return "–"
    if 0 <= seconds < 0.0005:  # a tiny task: "0 ms" read as if it took no time at all
        return "<1 ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} m {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} m"
