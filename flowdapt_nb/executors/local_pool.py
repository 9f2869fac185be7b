"""The local executor's own pools of worker processes and threads.

``concurrent.futures`` pools can't do what the local executor must: a ProcessPoolExecutor breaks
as a whole when one worker dies (every queued and running item fails with it) and can't kill the
one worker that runs a timed-out task; a ThreadPoolExecutor's threads are joined at interpreter
exit, so a stuck stage keeps a script or the CLI from ever ending. These pools hand out
``concurrent.futures.Future`` objects like those do, and:

- processes: one task per worker process at a time, the rest wait here in the driver. A worker
  that dies fails only the task it was running (retried once on a fresh process first, unless the
  caller retries itself), is replaced, and nothing else notices. ``cancel`` of a running task
  terminates its process (then kills it after a grace period) and starts a new one. Workers ignore
  SIGINT (the driver decides), and exit when the driver goes away.
- threads: daemon threads. A running task can't be stopped: ``cancel`` only stops counting on it,
  and ``stuck`` says how many threads are still held by such tasks.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

KILL_GRACE = 1.0  # seconds between SIGTERM and SIGKILL for a worker whose task was cancelled


class WorkerDiedError(RuntimeError):
    """The worker process running a task died (os._exit, a crash, a kill, out of memory)."""


# --- in a worker process ------------------------------------------------------------------------

_conn = None  # this worker's end of its pipe to the driver
_send_lock = threading.Lock()


def send_events(batch: list) -> None:
    """In a worker process: send a batch of task reports to the driver on the worker's pipe."""
    if _conn is not None:
        with _send_lock:
            _conn.send(("ev", batch))


def _watch_parent(parent: int) -> None:
    """A worker must not outlive its driver (killed, or exited without closing the pool)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def exit_with_parent(parent: int) -> None:
    """In a helper process the driver started (a worker, the memory manager): exit when the
    driver ``parent`` is gone, however it went."""
    threading.Thread(
        target=_watch_parent, args=(parent,), name="flowdapt-nb-parent-watch", daemon=True
    ).start()


def _worker_main(conn, parent: int) -> None:
    global _conn
    _conn = conn
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the driver: it cancels and closes
    exit_with_parent(parent)
    with _send_lock:
        conn.send(("ready",))  # a worker that dies before this never ran anything: no task is at fault
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message is None:
            break
        job_id, fn, args = message
        try:
            reply = ("done", job_id, True, fn(*args))
        except BaseException as exc:  # KeyboardInterrupt from a stage too: the task fails, not the worker
            reply = ("done", job_id, False, exc)
        with _send_lock:
            try:
                conn.send(reply)
            except Exception as exc:  # the error itself can't be pickled
                conn.send(
                    (
                        "done",
                        job_id,
                        False,
                        RuntimeError(f"{type(reply[3]).__name__}: {reply[3]} (can't be sent back: {exc})"),
                    )
                )
    # Threads a stage started (even non-daemon ones) must not keep the process alive.
    os._exit(0)


# --- in the driver ------------------------------------------------------------------------------


class _Job:
    __slots__ = ("id", "future", "fn", "args", "retry", "tries", "worker", "started")

    def __init__(self, id_: int, fn, args, retry: bool):
        self.id, self.fn, self.args, self.retry = id_, fn, args, retry
        self.future: cf.Future = cf.Future()
        self.tries = 0  # times its worker died under it
        self.started = False  # its future says 'running' (once, however often it is sent)
        self.worker: _Worker | None = None


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe(duplex=True)
        # not daemonic: a stage may start processes of its own (the atexit hook below stops ours)
        self.process = ctx.Process(
            target=_worker_main, args=(child, os.getpid()), name="flowdapt-nb-local-worker"
        )
        self.process.start()
        child.close()
        self.job: _Job | None = None
        self.ready = False  # it said it started (imports done)
        self.kill_at: float | None = None  # set when its task was cancelled: SIGKILL then

    @property
    def pid(self) -> int:
        return self.process.pid


_live_pools: weakref.WeakSet[ProcessPool] = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    """At interpreter exit, before multiprocessing joins its children: stop our workers (a stuck
    stage would otherwise hold the exit forever). Registered after multiprocessing's own hook,
    so it runs first."""
    for pool in list(_live_pools):
        try:
            pool.close(grace=0.5)
        except Exception:
            pass


class ProcessPool:
    """``size`` worker processes (spawned), one task each at a time.

    ``submit(fn, *args)`` returns a Future; ``fn`` and ``args`` must pickle. ``on_events`` gets
    the batches workers send with :func:`send_events` (on the pool's own thread).
    """

    def __init__(self, size: int, on_events: Callable[[list], None] | None = None):
        self.size = size
        self.on_events = on_events
        self._ctx = multiprocessing.get_context("spawn")  # not fork: beside Ray/Dask threads it can deadlock
        self._lock = threading.Lock()
        self._queue: deque[_Job] = deque()
        self._jobs: dict[int, _Job] = {}
        self._next_id = 0
        self._closing = False
        self._closed_workers: list[_Worker] = []  # taken by close(): a second close finishes them
        self._wake_r, self._wake_w = os.pipe()
        # A wake-up byte is in the pipe and the loop has not read it yet: later submits need not
        # write another (each write hands the GIL to the pool's thread: ~40 us on a busy machine).
        self._wake_pending = False
        os.set_blocking(self._wake_w, False)
        self._workers: list[_Worker] = [_Worker(self._ctx) for _ in range(size)]
        self.replaced = 0  # worker processes started to replace dead or killed ones
        self._failed_starts = 0  # workers in a row that died before they were ready
        self._broken: str | None = None  # why no worker can start (then every task fails at once)
        self._thread = threading.Thread(target=self._loop, name="flowdapt-nb-local-pool", daemon=True)
        self._thread.start()
        _live_pools.add(self)

    # --- the caller's side ---
    def submit(self, fn, *args, retry: bool = True) -> cf.Future:
        """Queue ``fn(*args)`` for a worker. ``retry``: if its worker dies, run it once more on a
        fresh worker before failing it (False: fail at once, the caller retries as it sees fit)."""
        with self._lock:
            if self._closing:
                raise RuntimeError("the local process pool is closed")
            if self._broken:
                raise RuntimeError(self._broken)
            job = _Job(self._next_id, fn, args, retry)
            self._next_id += 1
            self._jobs[job.id] = job
            self._queue.append(job)
        self._wake()
        return job.future

    def cancel(self, future: cf.Future) -> None:
        """Stop a task: a queued one never starts; a running one has its process terminated
        (killed ``KILL_GRACE`` s later if still there) and replaced. Never blocks."""
        with self._lock:
            job = next((j for j in self._jobs.values() if j.future is future), None)
            if job is None:
                return
            if job.worker is None:
                if job in self._queue:
                    self._queue.remove(job)
                del self._jobs[job.id]
                future.cancel()
                return
            worker = job.worker
            if worker.kill_at is None:
                worker.kill_at = time.monotonic() + KILL_GRACE
                _signal(worker.pid, signal.SIGTERM)
        self._wake()

    def pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._workers]

    def close(self, grace: float = 1.0) -> None:
        """Cancel what waits, ask idle workers to exit, and kill whatever is left after
        ``grace`` seconds (a stuck task, a stage's non-daemon thread). Returns within about
        ``grace`` + 1 s. Calling it again (an interrupted close, the exit hook) kills what is left."""
        with self._lock:
            self._closing = True
            for job in self._queue:
                job.future.cancel()
            self._queue.clear()
        self._wake()
        self._thread.join(grace + 1.0)
        with self._lock:
            workers, self._workers = self._workers, []
            self._closed_workers += workers
            workers = self._closed_workers
        deadline = time.monotonic() + grace
        for w in workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
        for w in workers:
            if w.process.is_alive():
                w.process.kill()
        for w in workers:
            w.process.join(1.0)
            w.conn.close()
        with self._lock:  # once only: a file descriptor number closed twice may be someone else's by then
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            if not job.future.done():
                _settle(job.future, exc=WorkerDiedError("the local executor closed while this task ran"))

    # --- the pool's thread ---
    def _wake(self) -> None:
        """Make the pool's thread look at the queue (and its workers) now. Whatever the caller
        changed before this call is seen: the loop clears ``_wake_pending`` only after it read
        the pipe, and looks at the queue after that."""
        fd = self._wake_w
        if fd < 0 or self._wake_pending:
            return
        self._wake_pending = True
        try:
            os.write(fd, b"x")
        except (BlockingIOError, OSError):  # already woken (pipe full) or closing
            pass

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._closing:
                    break
                sends = self._assign()
            for worker, job in sends:
                self._send(worker, job)
            with self._lock:
                workers = list(self._workers)
            waits: dict[Any, _Worker | None] = {self._wake_r: None}
            for w in workers:
                waits[w.conn] = w
                waits[w.process.sentinel] = w
            kill_soonest = min((w.kill_at for w in workers if w.kill_at), default=None)
            timeout = 0.5 if kill_soonest is None else max(0.0, min(0.5, kill_soonest - time.monotonic()))
            dead = self._serve_ready(waits, timeout)
            now = time.monotonic()
            for w in workers:
                if w.kill_at is not None and now >= w.kill_at and w.process.is_alive():
                    w.process.kill()
            for w in dead:
                self._replace(w)
        self._ask_workers_to_exit()

    def _serve_ready(self, waits: dict, timeout: float) -> set[_Worker]:
        """Wait up to ``timeout`` s for a message, a worker's end or a wake-up, and serve what
        came; returns the workers whose process ended."""
        try:
            ready = multiprocessing.connection.wait(list(waits), timeout)
        except OSError:
            ready = []
        dead: set[_Worker] = set()
        for obj in ready:
            if obj == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
                self._wake_pending = False  # after the read: a wake-up from now on writes again
                continue
            worker = waits[obj]
            if obj is worker.conn:
                if not self._receive(worker):
                    dead.add(worker)
            else:  # its process ended: read what it sent before it went
                while worker.conn.poll() and self._receive(worker):
                    pass
                dead.add(worker)
        return dead

    def _ask_workers_to_exit(self) -> None:
        """Closing: every idle worker is asked to exit, a busy one terminated (close() kills
        what is still alive after its grace)."""
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            try:
                if w.job is None:
                    w.conn.send(None)
                else:
                    w.process.terminate()
            except (OSError, ValueError):
                pass

    def _assign(self) -> list:
        """Idle workers take queued jobs (under the lock)."""
        sends = []
        for worker in self._workers:
            if not self._queue:
                break
            if worker.job is None and worker.kill_at is None:
                job = self._queue.popleft()
                if not job.started:
                    if not job.future.set_running_or_notify_cancel():  # cancelled while queued
                        self._jobs.pop(job.id, None)
                        continue
                    job.started = True
                job.worker, worker.job = worker, job
                sends.append((worker, job))
        return sends

    def _send(self, worker: _Worker, job: _Job) -> None:
        try:
            worker.conn.send((job.id, job.fn, job.args))
        except (OSError, ValueError):  # the worker is gone: its sentinel says so next; the job waits
            with self._lock:
                if worker.job is job:
                    worker.job, job.worker = None, None
                    self._queue.appendleft(job)
        except Exception as exc:  # the task itself can't be pickled: only it fails
            with self._lock:
                if worker.job is job:
                    worker.job = job.worker = None
                    self._jobs.pop(job.id, None)
            _settle(job.future, exc=exc)

    def _receive(self, worker: _Worker) -> bool:
        """One message from a worker; False when its pipe is closed."""
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            return False
        except Exception as exc:  # a reply that can't be unpickled here: the task fails
            message = (
                "done",
                worker.job.id if worker.job else -1,
                False,
                RuntimeError(f"the task's outcome can't be read in the driver: {exc}"),
            )
        if message[0] == "ready":
            worker.ready = True
            self._failed_starts = 0
            return True
        if message[0] == "ev":
            if self.on_events is not None:
                try:
                    self.on_events(message[1])
                except Exception:  # telemetry never stops the pool
                    pass
            return True
        _, job_id, ok, value = message
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if worker.job is job:
                worker.job = None
        if job is None:
            return True
        if worker.kill_at is not None:  # cancelled: what it returned after all is not wanted
            _settle(job.future, exc=cf.CancelledError("cancelled: its worker process was stopped"))
        elif ok:
            _settle(job.future, value=value)
        else:
            _settle(job.future, exc=value)
        return True

    def _replace(self, worker: _Worker) -> None:
        """A worker process ended: the task it ran fails (or goes again once), a new process
        takes its place."""
        worker.process.join(0.1)
        code = worker.process.exitcode
        try:
            worker.conn.close()
        except OSError:
            pass
        failures: list[tuple[_Job, BaseException]] = []
        with self._lock:
            job, worker.job = worker.job, None
            cancelled = worker.kill_at is not None
            if not worker.ready and not cancelled:
                self._failed_starts += 1
                if self._failed_starts >= 3 and not self._broken:  # don't respawn in a loop
                    self._broken = (
                        f"local worker processes exit as they start ({_exit_text(code)}, "
                        f"{self._failed_starts} in a row); the driver's stderr says why"
                    )
            if worker in self._workers:
                self._workers.remove(worker)
                if not self._closing and not self._broken:
                    self._workers.append(_Worker(self._ctx))
                    self.replaced += 1
            if self._broken and not self._workers:  # nothing will ever run what waits
                while self._queue:
                    waiting = self._queue.popleft()
                    self._jobs.pop(waiting.id, None)
                    failures.append((waiting, RuntimeError(self._broken)))
            failed = self._job_of_dead_worker(job, worker, cancelled, code) if job is not None else None
        if job is not None and failed is not None:
            failures.append((job, failed))
        for one, exc in failures:
            if not one.started:
                one.future.set_running_or_notify_cancel()
            _settle(one.future, exc=exc)

    def _job_of_dead_worker(
        self, job: _Job, worker: _Worker, cancelled: bool, code: int | None
    ) -> BaseException | None:
        """(Under the lock.) The task of a worker that ended goes again (it never started, or
        its first death) or fails: the error it fails with, None when it goes again."""
        job.worker = None
        if not worker.ready and not cancelled and not self._broken:  # it never ran: not its fault
            self._queue.appendleft(job)
            return None
        if job.retry and job.tries == 0 and not self._closing and worker.ready and not cancelled:
            job.tries += 1
            self._queue.appendleft(job)
            return None
        self._jobs.pop(job.id, None)
        if not worker.ready and not cancelled:
            return RuntimeError(self._broken)
        if cancelled:
            return cf.CancelledError("cancelled: its worker process was stopped")
        return WorkerDiedError(
            f"the local worker process (pid {worker.pid}) running this task died "
            f"({_exit_text(code)}){' twice, on two processes' if job.tries else ''}"
        )


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except (OSError, TypeError):
        pass


def _settle(future: cf.Future, value: Any = None, exc: BaseException | None = None) -> None:
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
    except cf.InvalidStateError:  # already settled (cancelled while queued)
        pass


class ThreadPool:
    """``size`` daemon threads. ``cancel`` of a running task can't stop it (Python threads can't
    be killed): its thread stays ``stuck`` until the stage returns, and daemon threads never hold
    up interpreter exit."""

    def __init__(self, size: int, name: str = "flowdapt-nb-local"):
        self.size = size
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running: dict[cf.Future, threading.Thread] = {}
        self._abandoned: set[cf.Future] = set()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(size)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn, *args) -> cf.Future:
        future: cf.Future = cf.Future()
        self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            future, fn, args = entry
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._running[future] = threading.current_thread()
            try:
                result = fn(*args)
            except BaseException as exc:
                with self._lock:
                    self._running.pop(future, None)
                    self._abandoned.discard(future)
                future.set_exception(exc)
            else:
                with self._lock:
                    self._running.pop(future, None)
                    self._abandoned.discard(future)
                future.set_result(result)

    def cancel(self, future: cf.Future) -> None:
        """A queued task never starts; a running one goes on (see the class doc) and its thread
        counts as ``stuck`` until it ends."""
        if future.cancel():
            return
        with self._lock:
            if future in self._running:
                self._abandoned.add(future)

    @property
    def stuck(self) -> int:
        """Threads still running a task that was cancelled or timed out."""
        with self._lock:
            return len(self._abandoned)

    def close(self, grace: float = 1.0) -> None:
        """Cancel queued tasks and stop the threads; a thread stuck in a stage is left behind
        (daemon: it never blocks exit). Returns within about ``grace`` s."""
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is not None:
                entry[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + grace
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
