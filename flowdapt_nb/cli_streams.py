"""Where output goes during ``flowdapt-nb run``: stdout carries only the result.

Two pieces:

- ``OutputPipe``: while stages run, file descriptors 1 and 2 of the driver point at one pipe, and
  a thread hands each line that comes out of it to the progress view (which prints it above the
  live bar, or as is). So everything printed, by our threads, by worker processes started now
  (they inherit the descriptors), by Dask's and Ray's forwarded output, by C code, reaches stderr
  in whole lines, and never tears the bar drawn in place.
- ``StagePrefixStream``: stands in for ``sys.stdout``/``sys.stderr`` in a process that runs stages
  and prefixes each line a stage prints with ``(stage[item])``. It reads the task from the run
  context the worker sets around each call, so it needs no hook in the executors. The CLI sets
  ``FLOWDAPT_NB_STAGE_PREFIX=1``; processes that inherit it (local worker processes, the workers
  of a Ray or Dask cluster the CLI starts) install it when they import flowdapt_nb. Dask's own
  forwarding already prefixes lines with the stage and worker, so Dask tasks are left alone.
"""

from __future__ import annotations

import io
import os
import select
import sys
import threading

PREFIX_ENV = "FLOWDAPT_NB_STAGE_PREFIX"


# --- the (stage[item]) prefix -------------------------------------------------------------------


def _task_label() -> str | None:
    from .context import current_context

    ctx = current_context()
    if ctx is None or ctx.stage is None or ctx.executor == "dask":
        return None
    return f"({ctx.stage}[{ctx.item}]) " if ctx.item is not None else f"({ctx.stage}) "


class StagePrefixStream(io.TextIOBase):
    """Writes from inside a stage's call go out line by line, each prefixed with the stage and
    item; any other write passes through untouched. A stage's partial line waits for its newline
    (or a flush), so lines printed by two tasks at once never mix."""

    def __init__(self, original):
        self.original = original
        self._partial: dict[int, str] = {}  # thread id -> a prefixed line still being written
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        label = _task_label()
        if label is None:
            return self.original.write(text)
        key = threading.get_ident()
        with self._lock:
            pending = self._partial.pop(key, None)
            out = []
            for piece in text.splitlines(keepends=True):
                if pending is None:
                    pending = label
                pending += piece
                if piece.endswith(("\n", "\r")):
                    out.append(pending)
                    pending = None
            if pending is not None:
                self._partial[key] = pending
        if out:
            self.original.write("".join(out))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            waiting, self._partial = "".join(self._partial.values()), {}
        try:
            if waiting:
                self.original.write(waiting)
            self.original.flush()
        except (OSError, ValueError):
            pass

    # what code that looks past the text stream expects of sys.stdout
    def isatty(self) -> bool:
        return self.original.isatty()

    def fileno(self) -> int:
        return self.original.fileno()

    @property
    def encoding(self):
        return getattr(self.original, "encoding", "utf-8")

    @property
    def errors(self):
        return getattr(self.original, "errors", "strict")

    @property
    def buffer(self):
        return self.original.buffer

    def __getattr__(self, name):
        return getattr(self.original, name)


def install_stage_prefix() -> None:
    """Prefix what stages print in this process (idempotent)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, StagePrefixStream):
            setattr(sys, name, StagePrefixStream(stream))


def uninstall_stage_prefix() -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, StagePrefixStream):
            stream.flush()
            setattr(sys, name, stream.original)


# --- descriptors 1 and 2 into one pipe ----------------------------------------------------------


_DRAIN_MARK = b"\x00flowdapt-nb: drained\x00"  # a line no program prints: OutputPipe.drain's mark


def _flush_std_streams() -> None:
    """What Python holds for stdout and stderr goes to their descriptors now (in write order)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # a replaced or closed stream
            pass


class OutputPipe:
    """``with OutputPipe(emit) as pipe:`` sends every line written to fd 1 or 2 meanwhile to
    ``emit(line)`` (from a reader thread); ``pipe.stderr`` is a text file on the real stderr for
    the progress view. Without usable descriptors (no stdout at all) it does nothing and
    ``stderr`` is ``sys.stderr``."""

    def __init__(self, emit):
        self.emit = emit
        self.stderr = sys.stderr
        self._saved: dict[int, int] = {}
        self._read_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._drained = threading.Event()

    def __enter__(self) -> OutputPipe:
        _flush_std_streams()
        try:
            saved = {fd: os.dup(fd) for fd in (1, 2)}
        except OSError:  # no stdout or stderr to move: print as we are
            return self
        self._saved = saved
        read_fd, write_fd = os.pipe()
        os.set_inheritable(read_fd, False)
        self._read_fd = read_fd
        self.stderr = open(
            os.dup(saved[2]),
            "w",
            encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
            errors="replace",
            buffering=1,
            closefd=True,
        )
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._thread = threading.Thread(
            target=self._read, args=(read_fd,), name="flowdapt-nb-output-pipe", daemon=True
        )
        self._thread.start()
        return self

    def _read(self, fd: int) -> None:
        rest = b""
        while True:
            try:
                ready, _, _ = select.select([fd], [], [], 0.1)
                chunk = os.read(fd, 65536) if ready else None
            except (OSError, ValueError):
                break
            if chunk == b"":
                break
            if chunk is None:
                if self._stop.is_set():
                    break
                continue
            rest += chunk
            *lines, rest = rest.split(b"\n")
            for line in lines:
                if line == _DRAIN_MARK:
                    self._drained.set()
                else:
                    self._emit(line)
        if rest:
            self._emit(rest)

    def drain(self, timeout: float = 2.0) -> bool:
        """Wait until every line written to the pipe so far has gone to ``emit``: a stage's last
        lines are printed before the view's final one, not after it. A mark written now comes
        out of the pipe after them (a pipe keeps order). True if it came within ``timeout``."""
        if not self._saved or self._thread is None:
            return True
        _flush_std_streams()
        self._drained.clear()
        try:
            os.write(1, _DRAIN_MARK + b"\n")
        except OSError:
            return False
        return self._drained.wait(timeout)

    def _emit(self, raw: bytes) -> None:
        try:
            self.emit(raw.decode("utf-8", "replace").rstrip("\r"))
        except Exception:  # an output line must never take the run down
            pass

    def __exit__(self, *exc) -> None:
        if not self._saved:
            return
        _flush_std_streams()
        for fd, saved in self._saved.items():  # our write ends close here; children may keep theirs
            os.dup2(saved, fd)
            os.close(saved)
        self._saved = {}
        # what is still in the pipe drains (a worker's last lines); the reader stops once it
        # finds the pipe empty, without waiting for processes that still hold it open to exit
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._read_fd is not None:
            try:
                os.close(self._read_fd)
            except OSError:
                pass
        try:
            self.stderr.flush()
        except (OSError, ValueError):
            pass
