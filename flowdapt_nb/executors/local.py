"""LocalExecutor: a pool of threads or processes on this machine (``local_pool``)."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import uuid
from multiprocessing.managers import SyncManager

import cloudpickle
import psutil

from .. import arg_layout
from ..config import LocalConfig
from ..engine import Backend, Outcome, items_of
from ..errors import ConfigError
from ..events import ResourceSample
from ..lru import LRU
from ..memory_store import MemoryStore
from ..units import auto_cpus, parse_bytes
from ..worker import TaskInfo, default_worker_name, execute
from ..worker_events import ChunkWatch, EventBatch
from .base import Executor
from .local_pool import ProcessPool, ThreadPool, exit_with_parent, send_events

# --- process workers ----------------------------------------------------------------------------

_batch = EventBatch(0.05)  # per worker process: 'running' reports, one queue message per batch
_chunks = ChunkWatch(0.05)  # items of a chunk that run long are reported running all the same
_loaded: LRU[str, object] = LRU(64)  # per worker process: key -> function or context
_loads = 0  # per worker process: files unpickled so far (tests check a function is loaded once)


def _load_shipped(shipped: tuple):
    """A function or run context the driver wrote to a file once (``_LocalBackend._ship``),
    loaded once per worker process: tasks carry only its key and path."""
    key, path = shipped[:2]

    def load():
        global _loads
        _loads += 1
        with open(path, "rb") as f:
            return cloudpickle.loads(f.read())

    return _loaded.get_or_load(key, load)


def _load_context(shipped: tuple):
    """A run's context, with the cluster memory proxy loaded once per worker process: unpickling
    a manager proxy connects and authenticates to the manager (~1 ms), too much to pay per run."""
    ctx = _load_shipped(shipped)
    if shipped[2] is not None and ctx.memory is None:
        ctx.memory = _load_shipped(shipped[2])
    return ctx


def _process_task(fn_shipped: tuple, ctx_shipped: tuple, info: TaskInfo, args_blob: bytes) -> bytes:
    fn, ctx = _load_shipped(fn_shipped), _load_context(ctx_shipped)
    flat = cloudpickle.loads(args_blob)
    report = lambda event: _batch.add(event, send_events)  # noqa: E731
    return _pickle_outcome(*execute(ctx, fn, info, flat, report, _worker_name()))


def _process_chunk(fn_shipped: tuple, ctx_shipped: tuple, infos: list, args_blob: bytes):
    """Several tasks of one stage, one after another; their outcomes pickled together (or one
    by one when some result can't be pickled: only that item fails)."""
    fn, ctx = _load_shipped(fn_shipped), _load_context(ctx_shipped)
    worker = _worker_name()
    report = _chunks.open(send_events)
    outcomes = [
        execute(ctx, fn, info, flat, report, worker)
        for info, flat in zip(infos, cloudpickle.loads(args_blob))
    ]
    _chunks.close(report)
    try:
        return cloudpickle.dumps(outcomes)
    except Exception:
        return [_pickle_outcome(meta, value) for meta, value in outcomes]


def _pickle_outcome(meta: dict, value) -> bytes:
    try:
        return cloudpickle.dumps((meta, value))
    except Exception as exc:
        from ..worker import portable_error

        meta["ok"], meta["error"] = (
            False,
            portable_error(
                TypeError(f"the stage's result ({type(value).__name__}) can't be pickled back: {exc}"), ""
            ),
        )
        return cloudpickle.dumps((meta, None))


_my_name: str | None = None


def _worker_name() -> str:
    global _my_name
    if _my_name is None:
        _my_name = default_worker_name()
    return _my_name


def _thread_chunk(ctx, fn, tasks: list, worker: str, on_event=None) -> list:
    def each(batch: list) -> None:
        for event in batch:
            on_event(event)

    report = _chunks.open(each) if on_event is not None else None
    outcomes = [execute(ctx, fn, info, flat, report, worker, portable=False) for info, flat in tasks]
    _chunks.close(report)
    return outcomes


class _StoreManager(SyncManager):
    pass


_StoreManager.register(
    "MemoryStore", MemoryStore, exposed=("put", "get", "lookup", "exists", "delete", "clear", "listing")
)


_psutil_processes: dict = {}


def _process(pid: int):
    """psutil measures CPU between two calls on the same Process object: keep one per pid."""
    p = _psutil_processes.get(pid)
    if p is None or not p.is_running():
        p = _psutil_processes[pid] = psutil.Process(pid)
    return p


# --- the backend --------------------------------------------------------------------------------


class _LocalBackend(Backend):
    kind = "local"

    def __init__(self, executor: LocalExecutor, cpus: int, use_processes: bool):
        self.executor = executor
        self.cpus = cpus
        self.use_processes = use_processes
        # The pool has one worker per slot, so one-slot tasks may wait in its queue: a few there
        # keep workers busy across the round trip to the engine (longer for processes). More
        # would only add contention for the GIL in a thread pool.
        self.prefetch = 4 * cpus if use_processes else cpus
        # Tiny items go in chunks of about this much work: a process round trip costs more.
        self.chunk_seconds = 0.02 if use_processes else 0.005
        self._thread_worker = f"thread:{os.getpid()}"
        if use_processes:
            self._ship_dir = tempfile.mkdtemp(prefix="flowdapt-nb-local-")
            self._ship_lock = threading.Lock()
            self._shipped_fns: dict[str, tuple] = {}  # hash of a pickled function -> (key, path)
            self.function_ships = 0  # function files written (one per function version)
            self._memory_shipped: tuple | None = None  # (the memory proxy, its (key, path))
            self.pool: ProcessPool | ThreadPool = ProcessPool(cpus, on_events=self._on_events)
        else:
            self.pool = ThreadPool(cpus)
            self.stop_note = (
                "local threads can't be stopped: the stage's thread runs on and holds its slot "
                "until the stage returns (LocalExecutor(use_processes=True) kills it instead)"
            )

    @property
    def capacity(self) -> int:  # type: ignore[override]  # a property here: it shrinks
        """Slots a new run may use: on threads, minus those still held by tasks of a cancelled or
        timed-out run (a thread can't be killed; it is free again only when its stage returns)."""
        if isinstance(self.pool, ThreadPool):
            return max(0, self.cpus - self.pool.stuck)
        return self.cpus

    def _on_events(self, batch: list) -> None:
        for one in batch:  # a batch from one worker process
            try:
                self.executor._on_worker_event(one)
            except Exception:  # a bad event must not stop the pool's thread
                pass

    def _ship(self, data: bytes, key: str | None = None) -> tuple:
        """Write a pickled function or run context once for the worker processes; tasks then
        carry (key, path), not the bytes (a context holds the whole run input: sent with every
        task it would cost O(items) per task)."""
        key = key or uuid.uuid4().hex
        path = os.path.join(self._ship_dir, key)
        with open(path, "wb") as f:
            f.write(data)
        return key, path

    def put_context(self, ctx):
        """Threads: the context itself. Processes: (key, path, memory): the context written once
        for the run without the cluster memory proxy, which is written once per executor
        (workers keep it: see ``_load_context``)."""
        if not self.use_processes:
            return ctx
        memory = None
        if ctx.memory is not None:
            if self._memory_shipped is None or self._memory_shipped[0] is not ctx.memory:
                self._memory_shipped = (ctx.memory, self._ship(cloudpickle.dumps(ctx.memory)))
            memory = self._memory_shipped[1]
            ctx = ctx.for_task(ctx.stage, ctx.item)  # a shallow copy, without the proxy
            ctx.memory = None
        return (*self._ship(cloudpickle.dumps(ctx)), memory)

    def put_function(self, fn):
        if not self.use_processes:
            return fn
        try:
            data = cloudpickle.dumps(fn)
        except Exception as exc:
            raise ConfigError(
                f"function {getattr(fn, '__name__', fn)!r} can't be sent to a worker process "
                f"({exc}); use LocalExecutor(use_processes=False)",
                key="target",
            ) from None
        # One file per function version (its pickled bytes), kept until close: workers load each
        # version once, not once per run (loading a notebook function costs ~0.1-1 s cold).
        key = "fn-" + hashlib.blake2b(data, digest_size=16).hexdigest()
        with self._ship_lock:
            shipped = self._shipped_fns.get(key)
            if shipped is None:
                shipped = self._shipped_fns[key] = self._ship(data, key)
                self.function_ships += 1
        return shipped

    def release_run(self, ctx_handle, fn_handles) -> None:
        if self.use_processes:
            for _, path in [ctx_handle[:2]]:  # function and memory files stay for the next run
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def submit(self, fn_handle, ctx_handle, info, flat_args, resources, on_done):
        if self.use_processes:
            # a task whose worker dies goes once more to a fresh one before it fails
            future = self.pool.submit(
                _process_task, fn_handle, ctx_handle, info, cloudpickle.dumps(flat_args)
            )
        else:
            future = self.pool.submit(
                execute,
                ctx_handle,
                fn_handle,
                info,
                flat_args,  # errors stay in-process
                self.executor._on_worker_event,
                self._thread_worker,
                False,
            )

        def done(f: cf.Future):
            if f.cancelled():
                return
            try:
                result = f.result()
                outcome = Outcome.from_report(*(cloudpickle.loads(result) if self.use_processes else result))
            except BaseException as exc:  # its worker died (a WorkerDiedError says how), or an argument
                outcome = Outcome.failure(exc)  # couldn't be pickled: the result never came back
            on_done(outcome)

        future.add_done_callback(done)
        return future

    def submit_chunk(self, fn_handle, ctx_handle, tasks, resources, on_done):
        if self.use_processes:
            # a chunk whose worker dies fails at once: the engine sends its items again one by one
            future = self.pool.submit(
                _process_chunk,
                fn_handle,
                ctx_handle,
                [t[0] for t in tasks],
                cloudpickle.dumps([t[1] for t in tasks]),
                retry=False,
            )
        else:
            future = self.pool.submit(
                _thread_chunk,
                ctx_handle,
                fn_handle,
                tasks,
                self._thread_worker,
                self.executor._on_worker_event,
            )

        def done(f: cf.Future):
            if f.cancelled():
                return
            try:
                result = f.result()
                if not self.use_processes:
                    pairs = result
                elif isinstance(result, bytes):
                    pairs = cloudpickle.loads(result)
                else:  # pickled one by one
                    pairs = [cloudpickle.loads(blob) for blob in result]
                outcomes = [Outcome.from_report(meta, value) for meta, value in pairs]
            except BaseException as exc:  # the chunk as a whole: the engine retries each item alone
                on_done.failed(exc)
                return
            on_done.done(outcomes)

        future.add_done_callback(done)
        return future

    def split(self, handle):
        return [(arg_layout.value(), item) for item in items_of(handle, "?", "its dependency's output")]

    def fetch(self, handle):
        return handle

    def cancel(self, task_refs):
        """Processes: a running task's worker process is terminated, killed after a 1 s grace
        period, and replaced; threads: a running task can't be stopped (see ``capacity``).
        Queued tasks never start. Returns at once."""
        for f in {id(f): f for f in task_refs}.values():  # a chunk's items share one future
            self.pool.cancel(f)

    def close(self, grace: float = 1.0) -> None:
        """Bounded: queued tasks are cancelled, worker processes still busy after ``grace`` s are
        killed, stuck threads (daemons) are left to end with the interpreter."""
        self.pool.close(grace)
        if self.use_processes:
            shutil.rmtree(self._ship_dir, ignore_errors=True)


class LocalExecutor(Executor):
    """Runs stages in a local pool of threads (``use_processes=False``) or processes (default).

    ``cpus="auto"`` is usable cores - 1 (at least 1). A stage's ``resources.cpus`` is how many of
    the pool's slots each of its tasks takes, so it limits how many run at once.

    >>> with LocalExecutor(use_processes=False, cpus=2) as ex:   # doctest: +SKIP
    ...     print(ex.run(wf).result)
    """

    kind = "local"
    Config = LocalConfig
    title = "Local executor"
    native_dashboard = None
    magic_options = ("--cpus", "--threads", "--processes")

    def __init__(self, _config=None, _compute=None, **fields):
        super().__init__(_config, _compute, **fields)
        self.cpus = auto_cpus() if self.config.cpus == "auto" else int(self.config.cpus)
        self._manager: _StoreManager | None = None
        self._memory = None

    def _open(self):
        if self.config.use_processes:
            self._step("starting the cluster memory process")
            self._manager = _StoreManager(ctx=multiprocessing.get_context("spawn"))
            self._manager.start(exit_with_parent, (os.getpid(),))  # no orphan if the driver is killed
            self._memory = self._manager.MemoryStore()
        else:
            self._memory = MemoryStore()
        self._step("starting the worker pool")
        return _LocalBackend(self, self.cpus, self.config.use_processes)

    def _shutdown(self):
        backend, self._backend = self._backend, None
        try:
            backend.close()
        finally:
            if self._manager is not None:
                self._manager.shutdown()
                self._manager = None
            self._memory = None

    def _address(self):
        return f"local {'processes' if self.config.use_processes else 'threads'} x{self.cpus}"

    def _check_stage_resources(self, stage):
        for name, amount in stage.resources.items():
            if name == "cpus":
                if amount > self.cpus:
                    raise ConfigError(
                        f"asks for cpus: {amount} but the local executor has {self.cpus} "
                        f"slot(s); ask for at most {self.cpus} or give the executor more cpus",
                        stage=stage.name,
                        key="resources.cpus",
                    )
            elif name == "memory":
                total = psutil.virtual_memory().total
                if parse_bytes(amount) > total:
                    raise ConfigError(
                        f"asks for memory: {amount} but this machine has {total / 1e9:.1f} GB",
                        stage=stage.name,
                        key="resources.memory",
                    )
            elif amount:
                raise ConfigError(
                    f"asks for resource '{name}': {amount}, which the local executor doesn't "
                    f"have (it offers: cpus {self.cpus}); use a Dask or Ray executor with "
                    f"resources: {{{name}: N}}",
                    stage=stage.name,
                    key=f"resources.{name}",
                )

    def _workers(self):
        return [
            {"name": w, "resources": {"cpus": self.cpus} if i == 0 else {}}
            for i, w in enumerate(self._worker_ids())
        ]

    def _worker_ids(self):
        if self.config.use_processes and self._backend is not None:
            return [f"pid:{pid}" for pid in sorted(self._backend.pool.pids())] or ["local"]
        return ["local"]

    def _sample(self):
        now = time.time()
        backend = self._backend
        if backend is None:
            return []
        mem = psutil.virtual_memory()
        procs = [_process(os.getpid())]
        if self.config.use_processes:
            procs += [_process(pid) for pid in backend.pool.pids() if psutil.pid_exists(pid)]
        cpu, rss = 0.0, 0
        for p in procs:
            try:
                cpu += p.cpu_percent(None)
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        from ..telemetry import add_gpu, add_up, available_given, running_requests

        # in use: what running tasks hold, and at least the slots the engine has handed out
        used = add_up(running_requests(self))
        used["cpus"] = min(self.cpus, max(used.get("cpus", 0.0), self.cpus - self._free_slots()))
        total = {"cpus": self.cpus}
        if any(
            "memory" in s.resources
            for handle, _ in list(self._active.values())
            for s in handle.run.definition.stages
        ):
            total["memory"] = mem.total  # a stage asks for memory: show how much running tasks hold
        sample = ResourceSample(
            "local",
            now,
            cpu_percent=cpu,
            memory_used=rss,
            memory_limit=mem.total,
            resources_total=total,
            resources_available=available_given(total, used),
        )
        add_gpu(sample)
        return [sample]

    def _free_slots(self) -> float:
        backend = self._backend
        used = float(self.cpus - backend.capacity) if backend is not None else 0.0  # stuck threads
        for _, engine in list(self._active.values()):
            if engine is not None and engine.free_slots is not None and engine.slots is not None:
                used += engine.slots - engine.free_slots
        return max(0.0, self.cpus - used)
