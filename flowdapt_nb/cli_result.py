"""What ``flowdapt-nb run`` says when a run ends: the result (stdout or ``--output FILE``), and on
failure the failed stage, the user's frames of its traceback, and the dropped items as a table."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path

FORMATS = ("json", "pickle", "parquet")
_SUFFIXES = {".json": "json", ".pkl": "pickle", ".pickle": "pickle", ".parquet": "parquet", ".pq": "parquet"}
TABLE_ROWS = 20  # rows of the failures table before "... and N more"


# --- the result ---------------------------------------------------------------------------------


def jsonable(value) -> tuple[str, str | None]:
    """The result as one valid JSON text, and a note for stderr when it had to be changed:
    NaN and infinities become null; a value JSON can't hold becomes its repr as a JSON string."""
    try:
        return json.dumps(value, default=_fallback, allow_nan=False), None
    except ValueError:  # NaN or an infinity somewhere: JSON has no such numbers
        try:
            text = json.dumps(_finite(json.loads(json.dumps(value, default=_fallback))), allow_nan=False)
            return text, "the result holds NaN or infinite numbers; JSON has none, so they print as null"
        except (TypeError, ValueError, RecursionError):
            pass
    except (TypeError, RecursionError):
        pass
    return json.dumps(repr(value)), (
        f"the result ({type(value).__name__}) is not JSON; printed its repr as a JSON string"
    )


def _finite(value):
    """Plain JSON data with NaN / infinities replaced by None (iterative: no recursion limit)."""
    root = [value]
    stack = [(root, 0)]
    while stack:
        holder, key = stack.pop()
        item = holder[key]
        if isinstance(item, float) and not math.isfinite(item):
            holder[key] = None
        elif isinstance(item, list):
            stack.extend((item, i) for i in range(len(item)))
        elif isinstance(item, dict):
            stack.extend((item, k) for k in item)
    return root[0]


def _fallback(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError


def output_format(path: str | None, fmt: str | None) -> str:
    """``--format`` if given, else from ``--output``'s suffix (.json, .pkl/.pickle, .parquet/.pq).
    Raises ValueError naming the valid choices."""
    if fmt:
        return fmt
    if path is None:
        return "json"
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"--output {path}: can't tell the format from the suffix {suffix or '(none)'!r}; "
            f"use .json, .pkl, .pickle, .parquet or .pq, or give --format json|pickle|parquet"
        )
    return _SUFFIXES[suffix]


def write_result(value, path: str | None, fmt: str, stdout, note) -> None:
    """Write the run's result: JSON text to ``stdout`` (no path) or to ``path`` in ``fmt``.
    ``note(text)`` tells stderr what was changed to fit. Raises ValueError when the result can't
    be written in that format (parquet of something that is not a DataFrame)."""
    if fmt == "parquet":
        import pandas as pd

        if isinstance(value, pd.Series):
            value = value.to_frame()
        if not isinstance(value, pd.DataFrame):
            raise ValueError(
                f"--format parquet needs a pandas DataFrame (or Series) result; this run's result "
                f"is {type(value).__name__}: use --format json or pickle"
            )
        if path is None:
            raise ValueError("--format parquet writes a file: give --output FILE")
        value.to_parquet(path)
        return
    if fmt == "pickle":
        if path is None:
            raise ValueError("--format pickle writes a file: give --output FILE")
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        _write_atomic(path, data)
        return
    text, changed = jsonable(value)
    if changed:
        note(changed)
    if path is None:
        stdout.write(text + "\n")
        stdout.flush()
    else:
        _write_atomic(path, (text + "\n").encode())


def _write_atomic(path: str, data: bytes) -> None:
    """A half-written file never stands under the final name."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


# --- failures -----------------------------------------------------------------------------------


def failure_text(exc, verbose: bool = False) -> str:
    """A failed run, for stderr: which stage failed and how, then its traceback; only the
    user's frames unless ``verbose`` (flowdapt_nb's own and the libraries' before it hidden)."""
    headline = str(exc).split("\n\nTraceback from the worker:")[0]
    cause = getattr(exc, "__cause__", None)
    tb = getattr(cause, "remote_traceback", None) if cause is not None else None
    if tb is None and cause is not None and cause.__traceback__ is not None:
        import traceback

        tb = "".join(traceback.format_exception(cause)).rstrip()
    lines = [f"error: run failed: {headline}"]
    if tb:
        if verbose:
            lines.append(tb.rstrip())
        else:
            from .notebook.tracebacks import user_traceback_text

            shown = user_traceback_text(tb)
            lines.append(shown)
            if shown.strip() != tb.strip():
                lines.append("(flowdapt_nb's own frames are hidden; --verbose shows them)")
    return "\n".join(lines)


def failures_table(rows: list[dict], title: str) -> str:
    """A short text table (stage, item, error) of failed or dropped items."""
    if not rows:
        return ""
    shown = rows[:TABLE_ROWS]
    cells = [("stage", "item", "error")] + [
        (str(r.get("stage")), "-" if r.get("item") is None else str(r.get("item")), _one_line(r.get("error")))
        for r in shown
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(2)]
    lines = [title]
    for stage, item, error in cells:
        lines.append(f"  {stage:<{widths[0]}}  {item:>{widths[1]}}  {error}")
    if len(rows) > len(shown):
        lines.append(f"  ... and {len(rows) - len(shown)} more")
    return "\n".join(lines)


def _one_line(error) -> str:
    text = " ".join(str(error or "").split())
    text = re.sub(r"Traceback \(most recent call last\):.*", "", text).strip()
    return text if len(text) <= 120 else text[:117] + "..."
