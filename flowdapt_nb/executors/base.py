"""What every executor shares: lifecycle, run/submit on the engine, history, telemetry hooks."""

from __future__ import annotations

import atexit
import copy
import queue
import threading
import time
import weakref
from collections import deque
from typing import Any, Self

from ..config import ExecutorFields, validate_fields
from ..context import RunContext, RunInfo
from ..engine import Backend, Engine, check_root_inputs
from ..errors import ConfigError, ExecutorClosedError
from ..events import EventBus, ExecutorEvent, TaskEvent
from ..run import RunHandle, WorkflowRun
from ..sizes import estimate_bytes
from ..units import parse_bytes
from ..workflow import load_workflow
from . import registry

_current: Executor | None = None
_live: weakref.WeakSet[Executor] = weakref.WeakSet()
CLOSE_WAIT = 3.0  # seconds close() gives cancelled runs to end before it shuts the backend down
# Seconds close() waits for a start under way (an engine's start can't be interrupted); a start
# still going after that stops what it started when it ends.
START_CLOSE_WAIT = 30.0
# an ended run's rows are packed once it is this old (the run store writes a batch every 0.5 s:
# by then its log is there to reuse) and not the newest
PACK_AFTER = 1.0


class _DriverThreads:
    """An executor's daemon threads that drive runs (one run each at a time), kept ``IDLE`` s
    after their run, until the executor closes: starting a thread per run cost ~0.3 ms of a tiny
    run's ~1 ms on a loaded machine."""

    IDLE = 30.0
    _STOP = object()

    def __init__(self):
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue] = []
        self._stopped = False

    def start(self, fn) -> None:
        with self._lock:
            self._stopped = False
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), name="flowdapt-nb-run", daemon=True).start()
        inbox.put(fn)

    def _serve(self, inbox: queue.SimpleQueue) -> None:
        while True:
            try:
                fn = inbox.get(timeout=self.IDLE)
            except queue.Empty:
                with self._lock:
                    if inbox in self._idle:  # else start() just took it: its run is on the way
                        self._idle.remove(inbox)
                        return
                continue
            if fn is self._STOP:
                return
            try:
                fn()
            except BaseException:  # drive() keeps the run's outcome; the thread serves on
                pass
            fn = None
            with self._lock:
                if self._stopped:
                    return
                self._idle.append(inbox)

    def stop(self) -> None:
        """Idle threads end now; a thread driving a run ends after it."""
        with self._lock:
            self._stopped = True
            idle, self._idle = self._idle, []
        for inbox in idle:
            inbox.put(self._STOP)


_storage_default: dict = {}  # (environment it depends on) -> the default storage folder


def _close_at_exit(executors=None) -> None:
    """At interpreter exit, close every executor still running (``executors``: these only): a
    cluster it started is stopped, an attached one only disconnected (distributed and
    ipyparallel close their clusters at exit the same way). ``__del__`` alone is not enough:
    at exit it may run late, after the engines' own exit hooks, or never."""
    for ex in list(_live if executors is None else executors):
        try:
            if ex.running:
                ex.close()
        except Exception:  # one executor's failure must not leave the others running
            pass


def _keep_exit_hook_first() -> None:
    """(Re-)register ``_close_at_exit`` so it runs before the exit hooks Ray, Dask and
    multiprocessing registered while this executor started (atexit runs the newest first)."""
    atexit.unregister(_close_at_exit)
    atexit.register(_close_at_exit)


def current_executor() -> Executor | None:
    """The executor started most recently that is still running."""
    if _current is not None and _current.running:
        return _current
    for ex in list(_live):
        if ex.running:
            return ex
    return None


class Executor:
    """Base of LocalExecutor, DaskExecutor and RayExecutor.

    >>> import flowdapt_nb as fnb
    >>> with fnb.LocalExecutor(use_processes=False, cpus=2) as ex:   # doctest: +SKIP
    ...     run = ex.run(workflow, input={"n": 3})
    """

    kind = "base"
    Config: type[ExecutorFields] = ExecutorFields
    # What the rest of the package knows about a kind lives here, on its class (see
    # ``executors.registry``); a subclass that leaves one out gets the default
    # ``__init_subclass__`` derives from its ``kind`` and class name.
    aliases: tuple[str, ...] = ()  # other names a config's target may use (Flowdapt's class path...)
    title: str = ""  # the executor card's title, e.g. "Ray executor"
    native_dashboard: str | None = None  # the engine's own dashboard, as a link names it (None: none)
    # options of ``%flowdapt executor KIND`` this kind takes; each fills the field of its name
    # (--address: cluster_address, --resource: resources); a FlowdaptMagics trait named
    # ``<kind>_<field>`` (e.g. ray_logging_level) fills that field too
    magic_options: tuple[str, ...] = ("--cpus", "--gpus", "--memory", "--resource", "--address")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "kind" in own:
            label = cls.kind.capitalize()
            if "title" not in own:
                cls.title = f"{label} executor"
            if "aliases" not in own:  # Flowdapt's class path and our top-level name
                cls.aliases = (
                    f"flowdapt.compute.executor.{cls.kind}.{cls.__name__}",
                    f"flowdapt_nb.{cls.__name__}",
                )
            if "native_dashboard" not in own:
                cls.native_dashboard = f"{label} dashboard"
        registry.note_class(cls)

    def __init__(self, _config: ExecutorFields | None = None, _compute: dict | None = None, **fields):
        self.config = _config if _config is not None else validate_fields(self.Config, fields)
        compute = _compute or {}
        self.default_namespace = str(compute.get("default_namespace") or "default")
        self.storage = compute.get("storage")
        self.events = EventBus()
        self._backend: Backend | None = None
        self._history: deque[WorkflowRun] = deque(maxlen=self.config.history_limit)
        self._active: dict[str, tuple[RunHandle, Engine | None]] = {}
        self._lock = threading.RLock()
        self._closing = False  # close() is under way: no new runs
        self._closed = False  # closed: run()/submit() refuse until start() is called again
        self._sampler: Any = None  # flowdapt_nb.telemetry.ResourceSampler while running
        # the cluster memory store (or a handle to it) while running: each backend has its own kind
        self._memory: Any = None
        self._started_at: float | None = None
        self._drivers = _DriverThreads()
        self._starting: threading.Event | None = None  # set while a start is under way
        self._start_phase: str | None = None
        self._start_error: BaseException | None = None
        self._start_error_unraised = False
        self._start_cancelled = False  # close() came during the start
        self._start_parked: threading.Event | None = None  # holds a background start's thread
        self._run_store: Any = None  # flowdapt_nb.run_store.RunStore while running (None: runs: off)

    # --- lifecycle ---
    @property
    def running(self) -> bool:
        return self._backend is not None

    @property
    def owns_cluster(self) -> bool:
        """True when this executor started its cluster (and so stops it on close)."""
        return getattr(self.config, "cluster_address", None) in (None, "local")

    @property
    def state(self) -> str:
        """'stopped', 'starting: <what it is doing>', 'running', or 'failed: <error>' (a start
        that failed; the next ``run``/``submit`` raises its error)."""
        if self.running:
            return "running"
        if self._starting is not None:
            return f"starting: {self._start_phase}" if self._start_phase else "starting"
        if self._start_error is not None:
            return f"failed: {type(self._start_error).__name__}: {self._start_error}"
        return "stopped"

    @property
    def start_error(self) -> BaseException | None:
        """The exception of the last start that failed (None after a start that worked)."""
        return self._start_error

    @property
    def start_phase(self) -> str | None:
        """What a start under way is doing now, when the executor says (else None)."""
        return self._start_phase if self._starting is not None else None

    def _step(self, phase: str) -> None:
        """Say what the start is doing now (shown in ``state`` and the start feedback)."""
        self._start_phase = phase

    def start(self, wait: bool = True) -> Self:
        """Start (or attach to) the engine; returns self. Starting twice is a no-op.

        ``wait=False`` returns at once and starts in a thread: ``state`` shows how far it got,
        the first ``run``/``submit`` (or ``wait_started()``) waits for it, and a start that
        failed is raised by that call (``state`` says 'failed: ...' until then).

        >>> ex = fnb.RayExecutor().start(wait=False)   # doctest: +SKIP
        >>> ex.state                                     # doctest: +SKIP
        'starting: starting the Ray node'
        """
        with self._lock:
            if self.running:
                return self
            starting = self._starting
            if starting is None:
                self._starting = threading.Event()
                self._start_error = None
                self._start_error_unraised = False
                self._start_cancelled = False
                self._start_phase = None
        if starting is not None:  # a start already under way
            if self._start_cancelled:  # close() is undoing it: start again once it is gone
                starting.wait()
                return self.start(wait=wait)
            if wait:
                self.wait_started()
            return self
        if wait:
            self._start_and_signal(background=False)
        else:
            threading.Thread(
                target=self._start_and_signal, args=(True,), name="flowdapt-nb-start", daemon=True
            ).start()
        return self

    def wait_started(self, timeout: float | None = None) -> Executor:
        """Wait for a start under way (``start(wait=False)``); raise its error if it failed.
        A TimeoutError after ``timeout`` s (the start goes on)."""
        starting = self._starting
        if starting is not None and not starting.wait(timeout):
            raise TimeoutError(
                f"the {type(self).__name__} is still starting after {timeout} s ({self.state})"
            )
        error = self._start_error
        if error is not None and self._start_error_unraised:
            self._start_error_unraised = False  # raised once; a later run starts it again
            raise error
        return self

    def _start_and_signal(self, background: bool) -> None:
        parked = self._start_parked = threading.Event() if background else None
        try:
            self._start_now()
        except BaseException as exc:
            self._start_error = exc
            self._start_error_unraised = background  # a waiting start() raised it already
            if not background:
                raise
        finally:
            with self._lock:
                starting, self._starting = self._starting, None
            if starting is not None:
                starting.set()
        if parked is not None and self.running:
            # Ray starts its node's processes with a parent-death signal (Linux PR_SET_PDEATHSIG),
            # which fires when the *thread* that started them ends: this one waits for close().
            parked.wait()

    def _start_now(self) -> None:
        """Open the backend and go live (in the caller's thread, or the start thread)."""
        global _current
        backend = self._open()
        with self._lock:
            if self._start_cancelled:  # close() came during the start: undo what it made
                self._backend = backend
                try:
                    self._shutdown()
                finally:
                    self._backend = None
                    self._closed = True
                return
            self._closed = False
            self.events.reopen()
            self._attach_run_store()
            self._backend = backend
            self._started_at = time.time()
            _current = self
            _live.add(self)
            _keep_exit_hook_first()
            self._start_sampler()

    def make_current(self) -> Executor:
        """Make this the executor that notebook-level ``cluster_memory`` calls use (starting or
        running an executor does this too)."""
        global _current
        _current = self
        return self

    def close(self) -> None:
        """Cancel active runs, stop samplers, and shut down what this executor started.

        Returns within a few seconds whatever the stages do: active runs end ``cancelled``
        ("executor closed during the run"; their ``run()``/``wait()`` raise
        :class:`ExecutorClosedError`), tasks still running are stopped (local processes:
        terminated, killed after a grace period; local threads can't be killed: a stuck stage's
        daemon thread is left to end on its own). ``with ex:`` and ``%flowdapt stop`` close this
        way. A closed executor refuses ``run``/``submit`` until ``start()`` is called again.
        """
        global _current
        starting = self._starting
        if starting is not None:  # a start under way: it undoes itself as soon as it is done
            self._start_cancelled = True
            self._closed = True
            starting.wait(START_CLOSE_WAIT)
        with self._lock:  # held only to take the active runs: their own threads need the lock to end
            if not self.running or self._closing:
                return
            self._closing = True
            active = list(self._active.values())
        try:
            for handle, engine in active:
                if engine is not None:
                    engine.closing = True
                handle.cancel()
            deadline = time.monotonic() + CLOSE_WAIT
            for handle, _ in active:
                handle._finished.wait(max(0.0, deadline - time.monotonic()))
            with self._lock:
                self._drivers.stop()
                self._stop_sampler()
                try:
                    self._shutdown()
                finally:
                    self._backend = None
                    self._closed = True
                    if self._start_parked is not None:  # the thread of a background start ends
                        self._start_parked.set()
                    if _current is self:
                        _current = None
                    # subscribers (an ExecutorCard shown elsewhere) learn it stopped, then the bus closes
                    self.events.publish(ExecutorEvent(self.kind, "stopped"))
                    self.events.close()
        finally:
            self._closing = False

    def __enter__(self) -> Executor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # a forgotten executor must not leave its cluster behind
        try:
            if self.running:
                self.close()
        except Exception:
            pass

    # --- subclass hooks ---
    def _open(self) -> Backend:
        raise NotImplementedError

    def _shutdown(self) -> None:
        raise NotImplementedError

    def _dashboard_url(self) -> str | None:
        return None

    def _address(self) -> str | None:
        return None

    def _workers(self) -> list[dict]:
        return []

    @property
    def memory_store(self):
        """The cluster memory store of this executor (a running executor only)."""
        if self._memory is None:
            raise RuntimeError("the executor is not running; start it to use cluster memory")
        return self._memory

    # --- info ---
    def info(self) -> dict:
        """kind, state, address, dashboard_url, workers and resource totals."""
        workers = self._workers() if self.running else []
        totals: dict[str, float] = {}
        for w in workers:
            for name, amount in (w.get("resources") or {}).items():
                totals[name] = totals.get(name, 0) + amount
        return {
            "kind": self.kind,
            "state": self.state,
            "address": self._address() if self.running else None,
            "owns_cluster": self.owns_cluster,
            "dashboard_url": self._dashboard_url() if self.running else None,
            "workers": workers,
            "resources": totals,
            "runs": len(self._history),
            "active_runs": len(self._active),
        }

    @property
    def history(self) -> list[WorkflowRun]:
        """Runs of this executor, newest last.

        Bounded by count (``history_limit`` runs) and by bytes: results are kept newest first
        up to ``history_bytes`` (default 256 MB, sizes estimated cheaply: buffers of arrays and
        frames, bytes, a sample of a container's elements); an older run past that stays as a
        record (state, timings, tasks, errors) without its result: ``result`` None,
        ``result_dropped`` True and ``result_note`` saying so. The newest run keeps its result
        whatever its size. The run object ``run()`` returned to you keeps its result: only
        the history's copy drops it.
        """
        return list(self._history)

    def _trim_history(self) -> None:
        """Drop results of older runs past the ``history_bytes`` budget (newest kept)."""
        budget = parse_bytes(self.config.history_bytes)
        with self._lock:
            used, newest = 0, True
            for i in range(len(self._history) - 1, -1, -1):
                run = self._history[i]
                if not run.done or run.result_dropped:
                    continue
                size = getattr(run, "_result_bytes", None)
                if size is None:
                    size = estimate_bytes(run.result) if run.result is not None else 0
                    run._result_bytes = size  # type: ignore[attr-defined]  # measured once per run
                if newest or used + size <= budget:
                    used += size
                    newest = False
                    continue
                record = copy.copy(run)  # the caller's run object keeps its result
                record.result = None
                record.result_dropped = True
                record.result_note = (
                    f"result (about {size / 1e6:.1f} MB) dropped from ex.history: newer "
                    f"results use its history_bytes budget ({budget / 1e6:.0f} MB)"
                )
                self._history[i] = record

    def _pack_history(self) -> None:
        """Pack the task rows of ended runs in the history (``WorkflowRun._pack``), all but the
        newest and those that ended in the last ``PACK_AFTER`` seconds: by then the run store
        has encoded their log, so packing reuses it, and a run just looked at stays unpacked."""
        cutoff = time.time() - PACK_AFTER
        with self._lock:
            older = list(self._history)[:-1]
        for run in older:
            if run._packed is None and run.done and (run._finished or 0) < cutoff:
                run._pack()

    # --- runs ---
    def _validate_run(self, workflow, run_input):
        wf = load_workflow(workflow)
        if run_input is not None and not isinstance(run_input, dict):
            raise ConfigError(
                f"run input must be a dict of keyword arguments, not {type(run_input).__name__}", key="input"
            )
        fns = wf.resolve(allowed_targets=self.config.allowed_targets)  # checked before any import
        check_root_inputs(wf, fns, run_input or {})
        for stage in wf.stages:
            self._check_stage_resources(stage)
        return wf, fns

    def _check_stage_resources(self, stage) -> None:
        """A stage resource request no worker can ever satisfy is a ConfigError (subclasses)."""

    def submit(
        self,
        workflow,
        input: dict | None = None,
        namespace: str | None = None,
        timeout: float | None = None,
        cache: bool | None = None,
    ) -> RunHandle:
        """Start a run and return at once with its handle (``wait``, ``cancel``, ``done``, ``run``).

        >>> handle = ex.submit(wf, input={"n": 10})   # doctest: +SKIP
        >>> run = handle.wait()                        # doctest: +SKIP
        """
        global _current
        if not self.running and (self._starting is not None or self._start_error_unraised):
            self.wait_started()  # start(wait=False) under way: wait for it; raise its error if it failed
        if self._closed or self._closing:
            raise ExecutorClosedError(
                f"this {type(self).__name__} was closed; call .start() to start it again before running"
            )
        if not self.running:
            self.start()
        _current = self  # cluster memory from the notebook means the executor used last
        wf, fns = self._validate_run(workflow, input)
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout < float("inf")
        ):
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}", key="timeout")
        if namespace is not None and (not isinstance(namespace, str) or not namespace):
            # 0, False or "" are mistakes, not "the default" (None is)
            raise ConfigError(
                f"namespace must be a non-empty string (None means the executor's default), "
                f"got {namespace!r}",
                key="namespace",
            )
        namespace = namespace or self.default_namespace
        hits: dict = {}
        if cache or (cache is None and any(s.options.get("cache") for s in wf.stages)):
            from ..stage_cache import prepare  # cache=True/False for the run, else each stage's options.cache

            fns, hits = prepare(wf, fns, dict(input or {}), cache, namespace, self._storage_for_workers())
        run = WorkflowRun(wf, input, namespace, self.kind)
        handle = RunHandle(run, self)
        ctx = RunContext(
            input=dict(input or {}),
            namespace=namespace,
            executor=self.kind,
            run=RunInfo(run.uid, run.name, run.workflow),
            definition=wf.to_dict(),
            config=self.config_dict(),
            memory=self._worker_memory_handle(),
            artifacts=self._storage_for_workers(),
        )
        backend = self._backend
        if backend is None:  # closed since the check above
            raise ExecutorClosedError(
                f"this {type(self).__name__} was closed while the run was being "
                f"submitted; call .start() to start it again"
            )
        engine = Engine(backend, self.events, run, fns, ctx, handle._cancel, timeout)
        engine.cache_hits = hits
        with self._lock:
            if self._closing or not self.running:
                raise ExecutorClosedError(
                    f"this {type(self).__name__} was closed while the run was being "
                    f"submitted; call .start() to start it again"
                )
            self._history.append(run)
            self._active[run.uid] = (handle, engine)

        def drive():
            try:
                engine.execute()
            finally:
                with self._lock:
                    self._active.pop(run.uid, None)
                try:
                    self._trim_history()
                finally:
                    handle._finished.set()
                try:
                    self._pack_history()  # after the caller has its run: it never waits for this
                except Exception:  # housekeeping: a run's record stays as it was
                    pass

        if self._run_store is not None:  # recorded as it goes, by the store's own thread
            self._run_store.begin(run, self)
        self._drivers.start(drive)
        return handle

    def run(
        self,
        workflow,
        input: dict | None = None,
        namespace: str | None = None,
        timeout: float | None = None,
        cache: bool | None = None,
    ) -> WorkflowRun:
        """Run a workflow and block until it ends. A failing stage raises ``StageError``;
        Ctrl-C cancels the run (remote tasks too) and records it as cancelled. ``cache=True``
        reuses stored outputs of stages whose fingerprint is unchanged (``flowdapt_nb.stage_cache``;
        None: each stage's ``options.cache``).

        >>> run = ex.run(wf, input={"n": 10}); run.result   # doctest: +SKIP
        """
        extra = {"cache": cache} if cache is not None else {}  # a subclass's submit may predate cache=
        handle = self.submit(workflow, input=input, namespace=namespace, timeout=timeout, **extra)
        try:
            while not handle._finished.wait(0.05):
                pass
        except KeyboardInterrupt:
            handle.cancel()
            handle._finished.wait(30)
            raise
        return handle.wait()

    def _attach_run_store(self) -> None:
        """Record this executor's runs in the run store its ``runs:`` setting names (the bus is
        new after each start, so the store subscribes again)."""
        from ..run_store import attach_executor

        self._run_store = attach_executor(self)

    def _storage_for_workers(self):
        """The storage setting stages use; with none set, the driver's default folder, resolved
        here once so every worker writes where the notebook reads."""
        if self.storage is not None:
            return self.storage
        import os

        from ..artifacts import ENV_VAR, parse_setting

        key = (os.environ.get(ENV_VAR), os.environ.get("XDG_DATA_HOME"), os.environ.get("HOME"), os.getcwd())
        folder = _storage_default.get(key)
        if folder is None:  # resolved once per environment: platformdirs costs ~0.1 ms a run
            folder = _storage_default[key] = parse_setting(None)[0]
        return folder

    def config_dict(self) -> dict:
        return {"target": self.kind, **self.config.model_dump(mode="json")}

    def _worker_memory_handle(self) -> Any:
        """What a stage's cluster_memory calls reach: picklable for process/cluster workers."""
        return self._memory

    def _on_worker_event(self, event: dict) -> None:
        """A task reported from its worker (running, or finished with its own timings)."""
        entry = self._active.get(event.get("run") or "")
        if entry is None:
            return
        handle, _ = entry
        run = handle.run
        stage, item, state, worker = event["stage"], event["item"], event["state"], event.get("worker")
        # A task still queued here ran from its start time: that is its 'running' report, or, when
        # that was skipped (Dask drops it for a task that ended at once), its ending report.
        started = event["time"] if state == "running" else event.get("start")
        with run._event_lock:
            recorded = started is not None and run._record(stage, item, "running", started, worker=worker)
            if recorded and started is not None and self.events.listening_for("task"):
                self.events.publish(TaskEvent(run.uid, stage, item, "running", started, worker))
            if state != "running":  # the engine publishes how a task ended; this adds its timings
                run._record(
                    stage,
                    item,
                    None,
                    event["time"],
                    worker=worker,
                    start=event.get("start"),
                    end=event.get("end"),
                )

    # --- telemetry (filled in by flowdapt_nb.telemetry) ---
    def _start_sampler(self) -> None:
        from ..telemetry import ResourceSampler

        self._sampler = ResourceSampler(self, self.config.sample_interval, self.config.resource_history_limit)
        self._sampler.start()

    def _stop_sampler(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None

    def _sample(self) -> list:
        """One resource sample per worker (subclasses)."""
        return []

    def resources(self):
        """pandas DataFrame, one row per worker/node now: cpu, memory, gpu, logical resources."""
        import pandas as pd

        if not self.running:
            return pd.DataFrame()
        samples = self._sample()
        return pd.DataFrame([s.to_row() for s in samples])

    def resource_history(self):
        """Recent resource samples (bounded), one row per worker per sample."""
        import pandas as pd

        if self._sampler is None:
            return pd.DataFrame()
        return self._sampler.history_frame()

    # --- display ---
    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        addr = f" at {self._address()}" if self.running and self._address() else ""
        return f"<{type(self).__name__} {state}{addr}>"

    def _repr_html_(self) -> str:
        from ..render import executor_html

        return executor_html(self)


registry.note_class(Executor)
