"""Capture what a stage prints, per thread, so it can be sent to the driver (Dask workers)."""

from __future__ import annotations

import io
import sys
import threading

_local = threading.local()
_installed = False
_install_lock = threading.Lock()


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
    global _installed
    with _install_lock:
        if not _installed:
            sys.stdout = _Router(sys.stdout, "stdout")
            sys.stderr = _Router(sys.stderr, "stderr")
            _installed = True


class capture:
    """``with capture(send):`` calls ``send(stream, line)`` for each full line printed in this thread."""

    def __init__(self, send):
        self.send = send
        self.buffers = {"stdout": "", "stderr": ""}

    def _sink(self, stream, text):
        buf = self.buffers[stream] + text
        *lines, rest = buf.split("\n")
        self.buffers[stream] = rest
        for line in lines:
            self.send(stream, line)

    def __enter__(self):
        install()
        _local.sink = self._sink
        return self

    def __exit__(self, *exc):
        _local.sink = None
        for stream, rest in self.buffers.items():
            if rest:
                self.send(stream, rest)
        return False
