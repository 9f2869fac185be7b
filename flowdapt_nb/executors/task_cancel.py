"""Stopping a cancelled run's task from inside the Ray worker process that runs it.

Why not ``ray.cancel``: in Ray 2.60 a cancel that meets a task whose reply has just reached the
driver aborts the driver process (``task_manager.cc: Check failed ... Tried to complete task that
was not pending``; Ray's cancel/push race, ray-project/ray #54527 fixed two of its variants, not
this one). Cancelling a busy run's queued chunks hit it about once in twenty cancels, and the
driver is the user's kernel. So the driver only raises a flag for the run (a key in Ray's
key-value store), and each worker process watches the flag of the run whose task it is running:

- a task of a run already seen cancelled returns at once, without calling the stage;
- a running task gets ``KeyboardInterrupt`` (at its next Python line, as Ray's own cancel does);
- a task still running ``grace`` s later (``time.sleep``, C code) is reported stuck, and the
  driver force-cancels that one task (Ray ends its worker process quietly, so its CPU goes back).
  A task reported stuck holds its reply until the driver has done so (``leave``): the force
  cancel always finds it still running, never completing, which is what the race needs. Should
  the driver not come within ``last_resort`` s (gone, busy), the process ends itself; Ray then
  logs the worker's death and retries the task in a new process, where the run is over
  (``ray_tasks._run_refs``) or seen cancelled at once.

Light on imports: every Ray worker process imports this (through ``ray_tasks``)."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

RECENT_RUNS = 64  # cancelled runs a worker process remembers


class CancelWatch:
    """Per worker process: which runs are cancelled, and the task of one to stop.

    ``is_flagged(run)`` reads the driver's flag (one key-value read), from a thread of its own,
    never from the task's: every ``poll`` s while the task is young, then less often as it ages
    (a tenth of its age, at most ``max_poll`` s: a cluster's workers share one key-value store).
    ``report_stuck(run, task)`` tells the driver that task still runs ``grace`` s after its
    interrupt; ``still_stuck(run, task)`` is true until the driver has force-cancelled it."""

    def __init__(
        self,
        is_flagged: Callable[[str], bool],
        report_stuck: Callable[[str, str], None],
        still_stuck: Callable[[str, str], bool],
        poll: float = 0.1,
        max_poll: float = 1.0,
        grace: float = 2.0,
        last_resort: float = 30.0,
    ):
        self._is_flagged = is_flagged
        self._report_stuck = report_stuck
        self._still_stuck = still_stuck
        self.poll = poll
        self.max_poll = max_poll
        self.grace = grace
        self.last_resort = last_resort
        self._lock = threading.Lock()
        self._cancelled: dict[str, None] = {}  # insertion-ordered: the oldest is dropped first
        # the task running: (token, run, thread ident, task name, when it started)
        self._current: tuple[int, str, int, str, float] | None = None
        self._interrupted: tuple[int, float] | None = None  # (token, when)
        self._reported: tuple[int, float] | None = None  # (token, when) of the last stuck report
        self._tokens = 0
        self._left = 0  # token of the task that last left
        self._busy = threading.Event()  # a task is running: the watcher has work
        self._thread: threading.Thread | None = None

    def cancelled(self, run: str) -> bool:
        """True once this process has seen the run's flag (no remote call)."""
        return run in self._cancelled

    def enter(self, run: str, task: str) -> None:
        """The calling thread now runs ``task`` (its name for ``report_stuck``) of ``run`` (one
        task at a time per process, as Ray runs them). Start whatever threads the task's own
        reporting needs before this: an interrupt may come at any line after it."""
        with self._lock:
            self._tokens += 1
            self._current = (self._tokens, run, threading.get_ident(), task, time.monotonic())
            self._busy.set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="flowdapt-nb-cancel", daemon=True)
                self._thread.start()

    def leave(self) -> None:
        """The calling thread's task is over. An interrupt sent to it and not raised yet is
        withdrawn: nothing reaches the code that runs after the task (Ray's own). A task reported
        stuck waits here for the driver's force cancel. Safe to call twice: call it again where
        the interrupt is caught (it may come inside the first call); ``run`` does both."""
        me = threading.get_ident()
        while True:
            try:
                with self._lock:
                    current = self._current
                    if current is None or current[2] != me:
                        return
                    token = current[0]
                    if self._interrupted is not None and self._interrupted[0] == token:
                        _send_async(me, None)
                    self._current = None
                    self._left = token
                    self._busy.clear()
                    reported = self._reported if self._reported and self._reported[0] == token else None
                break
            except KeyboardInterrupt:  # the interrupt meant for the task that just ended
                continue
        if reported is not None:
            self._await_force_cancel(current[1], current[3], reported[1] + self.last_resort)

    def run(self, run: str, task: str, call: Callable[[], Any]) -> tuple[bool, Any]:
        """``call()`` as ``task`` of ``run``: (False, its result), or (True, None) when this watch
        interrupted it (the run was cancelled). A stage's own KeyboardInterrupt goes on up. The
        interrupt may land anywhere after ``enter``, even inside ``leave``: both levels catch it.

        >>> cancelled, outcome = watch.run(run, "stage[3]", lambda: execute(...))  # doctest: +SKIP
        """
        try:
            try:
                self.enter(run, task)
                return False, call()
            finally:
                self.leave()
        except KeyboardInterrupt:
            self.leave()
            if not self.interrupted_last():
                raise  # the stage's own
            return True, None

    def interrupted_last(self) -> bool:
        """Whether this watch interrupted the task that last left (else a KeyboardInterrupt
        came from the stage itself)."""
        return self._interrupted is not None and self._interrupted[0] == self._left

    def _await_force_cancel(self, run: str, task: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                if not self._still_stuck(run, task):
                    return
            except Exception:  # the driver's answer can't be read: the deadline stands
                pass
            time.sleep(0.05)

    def _watch(self) -> None:
        while True:
            self._busy.wait()
            current = self._current
            if current is None:
                continue
            token, run, started = current[0], current[1], current[4]
            if run not in self._cancelled and not self._ask(run):
                age = time.monotonic() - started
                time.sleep(min(self.max_poll, max(self.poll, age / 10)))
                continue
            self._stop(token)
            time.sleep(self.poll)

    def _ask(self, run: str) -> bool:
        try:
            flagged = self._is_flagged(run)
        except Exception:  # the flag can't be read (cluster going away): the run goes on
            return False
        if flagged:
            self._cancelled[run] = None
            if len(self._cancelled) > RECENT_RUNS:
                self._cancelled.pop(next(iter(self._cancelled)))
        return flagged

    def _stop(self, token: int) -> None:
        """Interrupt the task of ``token`` once; report it stuck if it still runs ``grace`` s
        later; end the process after ``last_resort`` s."""
        with self._lock:
            current = self._current
            if current is None or current[0] != token:
                return
            now = time.monotonic()
            if self._interrupted is None or self._interrupted[0] != token:
                self._interrupted = (token, now)
                _send_async(current[2], KeyboardInterrupt)
                return
            waited = now - self._interrupted[1]
            report = waited >= self.grace and (self._reported is None or self._reported[0] != token)
            if report:
                self._reported = (token, now)
        if waited >= self.grace + self.last_resort:
            os.kill(os.getpid(), signal.SIGKILL)
        if report:
            try:
                self._report_stuck(current[1], current[3])
            except Exception:  # the driver can't be told: the last resort stands
                pass


def _send_async(thread_ident: int, exc_type: type[BaseException] | None) -> None:
    """Raise ``exc_type`` in that thread at its next Python line (None withdraws one not raised
    yet). Unlike a signal, it never reaches Ray's own threads."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_ident), ctypes.py_object(exc_type) if exc_type is not None else None
    )
