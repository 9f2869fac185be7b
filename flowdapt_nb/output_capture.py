"""Capture what a stage prints, per thread, so it can be sent to the driver (Dask workers).

What a task prints goes out in blocks of whole lines (at most every ``FLUSH_SECONDS`` or
``FLUSH_BYTES``), not one message per line, and only its first ``TASK_OUTPUT_LIMIT`` bytes go at
all: the rest is counted and replaced by one ``[output truncated: N bytes dropped]`` note. A
stage that prints 100 MB so costs the driver one megabyte, not a hundred.
"""

from __future__ import annotations

import io
import sys
import threading
import time
import weakref

TASK_OUTPUT_LIMIT = 1_000_000  # bytes of one task's output forwarded to the driver, per task
RUN_OUTPUT_LIMIT = 10_000_000  # bytes of one run's output the driver prints (see RunOutputBudget)
FLUSH_BYTES = 64 * 1024  # a block goes out once this much waits...
FLUSH_SECONDS = 0.2  # ...or once its oldest line waited this long

_local = threading.local()
_install_lock = threading.Lock()


def truncation_note(dropped: int) -> str:
    return f"[output truncated: {dropped} bytes dropped]"


def _nbytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))


class _Router(io.TextIOBase):
    """Stands in for sys.stdout/stderr: writes from a capturing thread go to its sink."""

    def __init__(self, original, stream: str):
        self.original = original
        self.stream = stream

    def write(self, text):
        sink = getattr(_local, "sink", None)
        if sink is not None:
            sink(self.stream, text)
            return len(text)
        return self.original.write(text)

    def flush(self):
        try:
            self.original.flush()
        except Exception:
            pass

    def isatty(self):
        return False

    @property
    def encoding(self):
        return getattr(self.original, "encoding", "utf-8")


def install() -> None:
    """Route sys.stdout/stderr through a _Router, again if someone swapped them since (pytest,
    a kernel): a process-wide 'done' flag would leave a later capture writing past its sink."""
    with _install_lock:
        if not isinstance(sys.stdout, _Router):
            sys.stdout = _Router(sys.stdout, "stdout")
        if not isinstance(sys.stderr, _Router):
            sys.stderr = _Router(sys.stderr, "stderr")


# One thread per process sends what captures left waiting (a stage that prints a line and then
# computes for a minute shows that line at once, not at its end).
_active: weakref.WeakSet[capture] = weakref.WeakSet()
_flusher: threading.Thread | None = None


def _flush_loop() -> None:
    while True:
        time.sleep(FLUSH_SECONDS)
        for cap in list(_active):
            try:
                cap.flush(whole_lines=True, due_only=True)
            except Exception:  # forwarding output must never fail anything
                pass


def _ensure_flusher() -> None:
    global _flusher
    with _install_lock:
        if _flusher is None:
            _flusher = threading.Thread(target=_flush_loop, name="flowdapt-nb-output", daemon=True)
            _flusher.start()


class capture:
    """``with capture(send):`` calls ``send(stream, text)`` with blocks of whole lines printed in
    this thread (``text`` ends without its last newline), at most ``limit`` bytes in all; past
    that, the bytes are counted and one ``[output truncated: N bytes dropped]`` note is sent per
    stream at the end."""

    def __init__(self, send, limit: int = TASK_OUTPUT_LIMIT):
        self.send = send
        self.limit = limit
        self.kept = 0
        self.dropped = {"stdout": 0, "stderr": 0}
        self.buffers: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.sizes = {"stdout": 0, "stderr": 0}
        self.since: dict[str, float | None] = {
            "stdout": None,
            "stderr": None,
        }  # when the oldest waiting text came
        self.lock = threading.Lock()  # the buffers
        self.sending = threading.RLock()  # one sender at a time, so blocks go out in order

    def _sink(self, stream, text):
        if not text:
            return
        n = _nbytes(text)
        with self.lock:
            room = self.limit - self.kept
            if n > room:
                if room <= 0:
                    self.dropped[stream] += n
                    return
                text = text[:room]  # characters; for ASCII also bytes (a note counts the rest)
                kept = _nbytes(text)
                self.dropped[stream] += n - kept
                n = kept
            self.kept += n
            self.buffers[stream].append(text)
            self.sizes[stream] += n
            if self.since[stream] is None:
                self.since[stream] = time.monotonic()
            full = self.sizes[stream] >= FLUSH_BYTES
        if full:
            self.flush(whole_lines=True)

    def flush(self, whole_lines: bool = False, due_only: bool = False) -> None:
        """Send what waits: whole lines only (the rest waits for its newline), or everything."""
        with self.sending:
            self._flush(whole_lines, due_only)

    def _flush(self, whole_lines: bool, due_only: bool) -> None:
        for stream in ("stdout", "stderr"):
            with self.lock:
                since = self.since[stream]
                if since is None or (due_only and time.monotonic() - since < FLUSH_SECONDS):
                    continue
                text = "".join(self.buffers[stream])
                rest = ""
                if whole_lines:
                    cut = text.rfind("\n")
                    if cut < 0 and self.sizes[stream] < FLUSH_BYTES:
                        continue  # a line still being written
                    if cut >= 0:
                        text, rest = text[:cut], text[cut + 1 :]
                self.buffers[stream] = [rest] if rest else []
                self.sizes[stream] = _nbytes(rest) if rest else 0
                self.since[stream] = time.monotonic() if rest else None
            if text or not whole_lines:
                self.send(stream, text)

    def __enter__(self):
        install()
        _ensure_flusher()
        _local.sink = self._sink
        _active.add(self)
        return self

    def __exit__(self, *exc):
        _local.sink = None
        _active.discard(self)
        with self.sending:
            self._send_rest()
        return False

    def _send_rest(self) -> None:
        for stream in ("stdout", "stderr"):
            with self.lock:
                text = "".join(self.buffers[stream])
                self.buffers[stream], self.sizes[stream], self.since[stream] = [], 0, None
            if text.endswith("\n"):
                text = text[:-1]
            if text:
                self.send(stream, text)
            if self.dropped[stream]:
                self.send(stream, truncation_note(self.dropped[stream]))


class RunOutputBudget:
    """In the driver: how much of each run's forwarded output is printed (``limit`` bytes per
    run, then one note and nothing more of that run). Remembers the last ``runs`` runs only."""

    def __init__(self, limit: int = RUN_OUTPUT_LIMIT, runs: int = 64):
        self.limit = limit
        self.runs = runs
        self.used: dict[str | None, int] = {}  # run uid -> bytes printed (insertion order: oldest first)
        self.lock = threading.Lock()

    def admit(self, run: str | None, text: str) -> tuple[str | None, str | None]:
        """(what to print, a note to print once the budget is spent) for ``text`` of ``run``."""
        n = _nbytes(text)
        with self.lock:
            used = self.used.pop(run, 0)
            self.used[run] = used + n
            while len(self.used) > self.runs:
                self.used.pop(next(iter(self.used)))
        if used + n <= self.limit:
            return text, None
        if used > self.limit:
            return None, None
        return None, (
            f"[output truncated: this run printed more than {self.limit} bytes; "
            f"the rest of its output is dropped]"
        )
