"""How a failed stage's error reads in a notebook: the user's own frames first, ours hidden.

A StageError's cause went through our worker wrapper, the engine and the executor before the
user's function raised; those frames say nothing to the user. IPython shows what
``stage_error_traceback`` returns instead of its usual traceback (through the exception's
``_render_traceback_``); with ``%config FlowdaptMagics.full_tracebacks = True`` it shows
everything again.
"""

from __future__ import annotations

import os
import re
import sysconfig
import types

_OURS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the flowdapt_nb package
_LIBRARIES = tuple(
    {
        os.path.abspath(p)
        for p in (
            sysconfig.get_paths().get("stdlib"),
            sysconfig.get_paths().get("purelib"),
            sysconfig.get_paths().get("platlib"),
        )
        if p
    }
)
HIDDEN_NOTE = (
    "(flowdapt_nb's own frames are hidden; %config FlowdaptMagics.full_tracebacks = True shows them)"
)


def is_ours(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_OURS + os.sep)


def _is_plumbing(filename: str) -> bool:
    """Ours, or a library's (the executor's or Python's) before the user's code was reached."""
    path = os.path.abspath(filename)
    return is_ours(path) or (not filename.startswith("<") and path.startswith(_LIBRARIES))


def user_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` from the first frame of the user's code on, without our frames after it."""
    frames = []
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    start = next((i for i, t in enumerate(frames) if not _is_plumbing(t.tb_frame.f_code.co_filename)), None)
    if start is None:
        return None
    kept = [t for t in frames[start:] if not is_ours(t.tb_frame.f_code.co_filename)]
    out = None
    for t in reversed(kept):
        out = types.TracebackType(out, t.tb_frame, t.tb_lasti, t.tb_lineno)
    return out


_FRAME = re.compile(r'^  File "([^"]+)", line \d+')


def user_traceback_text(text: str) -> str:
    """A worker's formatted traceback without the leading frames of our (and libraries') code."""
    lines = text.rstrip().splitlines()
    if not lines:
        return text
    head: list[str] = []
    tail: list[str] = []
    blocks: list[tuple[str, list[str]]] = []  # (file of the frame, its lines)
    current: list[str] | None = None  # the lines of the frame being read
    for line in lines:
        match = _FRAME.match(line)
        if match:
            current = [line]
            blocks.append((match.group(1), current))
        elif current is not None and line.startswith("    "):
            current.append(line)
        elif not blocks:
            head.append(line)
        else:
            current = None
            tail.append(line)
    start = next((i for i, (f, _) in enumerate(blocks) if not _is_plumbing(f)), None)
    if start is None:
        return text.rstrip()
    kept = [b for b in blocks[start:] if not is_ours(b[0])]
    return "\n".join(head + [x for _, block in kept for x in block] + tail)


def stage_error_traceback(shell, etype, value, tb, tb_offset=None, full: bool = False) -> list[str]:
    """Structured traceback lines for a StageError: the stage's own error with the user's frames,
    then the StageError's one line (which stage, which item)."""
    formatter = shell.InteractiveTB
    if full:
        return formatter.structured_traceback(etype, value, tb, tb_offset=tb_offset)
    lines: list[str] = []
    cause = value.__cause__
    if cause is not None:
        mine = user_frames(cause.__traceback__)
        remote = getattr(cause, "remote_traceback", None)
        if mine is not None:
            lines += formatter.structured_traceback(type(cause), cause, mine)
        elif remote:
            lines.append(user_traceback_text(remote))
        else:
            lines.append(f"{type(cause).__name__}: {cause}")
        lines.append("\nThe above exception failed the stage:\n")
    headline = str(value).split("\n\nTraceback from the worker:")[0]
    lines.append(f"{etype.__name__}: {headline}")
    lines.append(HIDDEN_NOTE)
    return lines


def show_user_frames(exc: BaseException, shell, magics) -> BaseException:
    """Make IPython show ``exc`` (a StageError) through ``stage_error_traceback``: IPython calls an
    exception's ``_render_traceback_`` instead of formatting it itself. The switch is read when
    the error is shown."""

    def render():
        try:
            return stage_error_traceback(
                shell, type(exc), exc, exc.__traceback__, full=bool(getattr(magics, "full_tracebacks", False))
            )
        except Exception:  # never lose the error over its display
            return shell.InteractiveTB.structured_traceback(type(exc), exc, exc.__traceback__)

    try:
        exc._render_traceback_ = render  # type: ignore[attr-defined]  # IPython's per-exception hook
    except AttributeError:  # pragma: no cover - an exception type with __slots__
        pass
    return exc
