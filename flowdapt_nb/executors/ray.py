"""RayExecutor: start a local Ray, or attach to a running cluster by ``cluster_address``."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict

import psutil

from ..config import RayConfig
from ..engine import Backend, Outcome, items_of
from ..errors import ClusterLostError, ConfigError, UnserializableResultError
from ..events import ResourceSample
from ..memory_store import MemoryStore
from ..units import parse_bytes, usable_cores
from ..worker import TaskInfo, execute
from ..worker_events import ChunkWatch, EventBatch
from .base import Executor
from .cluster import check_resource_request, ensure_reachable, free_port, gpu_count
from .ray_node import (LOOPBACK, HeadMonitor, driver_outlives_head, ensure_private_token, loopback_node,
                       tighten_token)

log = logging.getLogger("flowdapt_nb")
# Seconds a cancelled (or timed-out) task gets to stop by itself before its worker process is
# killed (Ray's plain cancel reaches a stage in time.sleep or C code only when that returns).
CANCEL_GRACE = 2.0
_remote: dict = {}  # the remote functions/actors, made on first use (import ray lazily)


# --- on the worker ------------------------------------------------------------------------------

_batch = EventBatch(0.05, leading=True)  # per worker process: 'running' reports, one actor call per batch
_chunks = ChunkWatch(0.05)  # items of a chunk that run long are reported running all the same


_MISSING = object()
_cached: "OrderedDict[str, object]" = OrderedDict()  # per worker process: object id -> object
_actors: dict = {}  # per worker process: actor name -> handle


def _cached_get(ref):
    """A stage function or run context, deserialized once per worker process. It comes as an
    object ref nested in the task's first argument, which Ray leaves unresolved: each task then
    carries a reference, not the object (a run context holds the whole run input, so it grows
    with the number of items)."""
    import ray
    key = ref.hex()
    obj = _cached.get(key, _MISSING)
    if obj is _MISSING:
        obj = _cached[key] = ray.get(ref)
        if len(_cached) > 32:
            _cached.popitem(last=False)
    else:
        _cached.move_to_end(key)
    return obj


def _actor(name: str):
    """An actor by name, looked up once per worker process (a handle passed with every task
    would be serialized and registered with every task)."""
    handle = _actors.get(name)
    if handle is None:
        import ray
        handle = _actors[name] = ray.get_actor(name)
    return handle


_run_keys: "OrderedDict[str, list]" = OrderedDict()  # per worker process: run key -> its refs


def _run_refs(sink: str, key: str) -> list:
    """A run's [context ref, function refs...], asked of the sink actor once per worker process
    (the few most recent runs are kept: a worker lets go of older runs' objects)."""
    import ray
    refs = _run_keys.get(key)
    if refs is None:
        refs = ray.get(_actor(sink).lookup.remote(key))
        if refs is None:
            raise RuntimeError(f"run {key} is over: its context and functions are gone")
        _run_keys[key] = refs
        while len(_run_keys) > 4:
            _run_keys.popitem(last=False)
    else:
        _run_keys.move_to_end(key)
    return refs


def _run_parts(sink: str, key: str, fn_index: int) -> tuple:
    """A stage's function and the run's context, for a task of the run ``key``."""
    refs = _run_refs(sink, key)
    return _cached_get(refs[fn_index]), _cached_get(refs[0])


_RAY_NAMES = {"cpus": "CPU", "gpus": "GPU"}  # our stage resource names -> Ray's


def _worker_name() -> str:
    name = _actors.get(None)  # cached beside the actor handles: one per worker process
    if name is None:
        import ray
        name = _actors[None] = f"{ray.util.get_node_ip_address()}:{os.getpid()}"
    return name


def _ray_task(head, *flat):
    """One stage call. ``head`` is (event sink name, run key, stage function index, the TaskInfo
    fields): plain values, which Ray serializes far faster than object refs or a dataclass (that
    cost is paid per task, in the driver). ``flat`` are the dependency outputs Ray resolves."""
    sink, key, fn_index, info = head
    fn, ctx = _run_parts(sink, key, fn_index)
    report = (lambda event: _batch.add(event, _actor(sink).push.remote)) if sink is not None else None
    meta, value = execute(ctx, fn, TaskInfo(*info), flat, report, _worker_name())
    if not meta["ok"]:
        return meta, None
    return _checked(meta, value)


def _ray_chunk(head, *flat):
    """Several calls of one stage, one after another: returns their metas, then each value as
    an object of its own (the task runs with ``num_returns`` = items + 1), so items stay apart
    in the object store exactly as if each had been a task."""
    sink, key, fn_index, infos, counts = head
    fn, ctx = _run_parts(sink, key, fn_index)
    worker = _worker_name()
    metas, values, pos = [], [], 0
    report = _chunks.open(_actor(sink).push.remote) if sink is not None else None
    for info, count in zip(infos, counts):
        meta, value = execute(ctx, fn, TaskInfo(*info), flat[pos:pos + count], report, worker)
        if meta["ok"]:
            meta, value = _checked(meta, value)
        pos += count
        metas.append(meta)
        values.append(value if meta["ok"] else None)
    _chunks.close(report)
    return (metas, *values)


_PLAIN = (type(None), bool, int, float, complex, str, bytes)


def _checked(meta: dict, value):
    """(meta, value), or a failed meta when Ray can't serialize the value: Ray would store the
    error in the value's object, and it would surface later, naming no stage (the run's result)
    or blaming the stage that receives it. Ray's own serializer decides; arrays' buffers are
    referenced out of band, not copied."""
    if type(value) in _PLAIN:
        return meta, value
    import ray
    try:
        ray._private.worker.global_worker.get_serialization_context().serialize(value)
        return meta, value
    except Exception as exc:
        meta = dict(meta, ok=False, error=UnserializableResultError(type(value).__name__, f"{type(exc).__name__}: {exc}"))
        return meta, None


def _ray_count(value):
    """How many items a parameterized stage gets from this output (or why it can't map over it)."""
    try:
        return ("ok", len(items_of(value, "?", "its dependency's output")))
    except Exception as exc:
        return ("error", exc)


def _ray_items(value):
    """The items, each its own object (the task runs with ``num_returns`` = their count)."""
    items = items_of(value, "?", "its dependency's output")
    return items[0] if len(items) == 1 else tuple(items)


class _EventSink:
    """Per executor: collects workers' batched task events, and keeps each active run's context
    and function refs for workers to look up (so tasks carry a short key, not refs)."""

    def __init__(self):
        self.events: list = []
        self.runs: dict = {}

    def register(self, key, refs):
        self.runs[key] = refs

    def lookup(self, key):
        return self.runs.get(key)

    def release(self, key):
        self.runs.pop(key, None)

    def push(self, batch):
        self.events.extend(batch)

    def drain(self):
        out, self.events = self.events, []
        return out


def _remotes():
    if not _remote:
        import ray
        _remote["task"] = ray.remote(_ray_task)
        _remote["chunk"] = ray.remote(_ray_chunk)
        _remote["count"] = ray.remote(_ray_count)
        _remote["items"] = ray.remote(_ray_items)
        _remote["sink"] = ray.remote(_EventSink)
        _remote["store"] = ray.remote(MemoryStore)
    return _remote


class _RayMemory:
    """Cluster memory in the named actor; the same calls as MemoryStore, blocking. Travels to
    workers as the actor's name (looked up there once per process, again after the actor was
    replaced)."""

    def __init__(self, name: str, actor=None):
        self.name = name
        self.actor = actor

    def __reduce__(self):
        return (_RayMemory, (self.name,))

    def __getattr__(self, method_name):
        if method_name.startswith("_") or method_name in ("actor", "name"):
            raise AttributeError(method_name)
        return lambda *args: self._call(method_name, args)

    def _call(self, method_name, args):
        import ray
        from ray.exceptions import RayActorError
        for attempt in (1, 2):
            try:
                actor = self.actor if self.actor is not None else _actor(self.name)
                return ray.get(getattr(actor, method_name).remote(*args))
            except (RayActorError, ValueError) as exc:  # ValueError: no actor of that name now
                _actors.pop(self.name, None)  # a new actor of that name may have replaced it
                if self.actor is not None or attempt == 2:
                    raise RuntimeError(
                        f"the cluster memory actor '{self.name}' died ({type(exc).__name__}): what it "
                        f"held is lost; the executor starts a new one at its next run") from None


# --- the backend --------------------------------------------------------------------------------

class _RayBackend(Backend):
    kind = "ray"

    def __init__(self, executor: "RayExecutor", sink, sink_name: str):
        import ray
        self.ray = ray
        self.executor = executor
        self.sink = sink
        self.sink_name = sink_name
        self._task_fns: dict = {}
        self._runs: dict = {}  # run key -> its context and function refs
        # Tiny items go in chunks of about this much work (a Ray task costs ~0.5 ms to send).
        self.chunk_seconds = 0.02
        self.parallelism = max(1, int(ray.cluster_resources().get("CPU", 1)))
        # Tasks sent whose outcome hasn't reached the engine: a lost head fails them all at once
        # (Ray itself would report nothing). meta ref -> (on_done, whether it is a chunk)
        self._pending: dict = {}
        self._pending_lock = threading.Lock()
        self.lost: ClusterLostError | None = None
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_events, name="flowdapt-nb-ray-events", daemon=True)
        self._poller.start()
        c = executor.config
        self._monitor = HeadMonitor(self._on_lost, c.connection_monitor_interval, c.ping_timeout,
                                    c.ping_failure_threshold).start()

    # --- a lost head ---
    def _check(self) -> None:
        """Refuse any Ray call once the head is lost: it would block, or, once disconnected,
        make Ray start a new local cluster in this process."""
        if self.lost is not None:
            raise self.lost

    def _get(self, refs):
        """ray.get that gives up when the head is lost (a plain one would wait for ever)."""
        from ray.exceptions import GetTimeoutError
        while True:
            self._check()
            try:
                return self.ray.get(refs, timeout=1.0)
            except GetTimeoutError:
                continue

    def _on_lost(self, reason: str) -> None:
        """From the head monitor: fail every task in flight, then disconnect (in this thread)."""
        self.lost = ClusterLostError(
            f"lost the Ray cluster at {self.executor.config.cluster_address or self.executor._address()}: "
            f"{reason}. The run can't "
            f"finish: its tasks and data were on that cluster. The executor disconnected (this "
            f"process keeps running); once the cluster is back, start() the executor again")
        log.error("%s", self.lost)
        self.executor._disconnecting = threading.current_thread()
        with self._pending_lock:
            pending, self._pending = list(self._pending.values()), {}
        now = time.time()
        for on_done, chunk in pending:
            try:
                on_done(self.lost if chunk else Outcome(False, error=self.lost, end=now))
            except Exception:
                pass
        self.executor._head_lost(self.lost)

    def _claim(self, meta_ref) -> bool:
        """True once per task: whoever claims it (Ray's callback, or a lost head) reports it."""
        with self._pending_lock:
            return self._pending.pop(meta_ref, None) is not None

    # --- runs and tasks ---
    def put_run(self, ctx, fns):
        """The run's context and functions go to the object store once; the sink actor holds
        their refs under a key that every task of the run carries. A helper actor that died
        (killed, its node lost) is replaced here, before the run needs it."""
        from ray.exceptions import RayActorError
        self._check()
        memory = self.executor._memory
        probe = memory.actor.exists.remote("", "") if memory is not None else None  # alongside register
        key = uuid.uuid4().hex
        refs = [self.ray.put(ctx)] + [self.ray.put(fn) for fn in fns]
        try:
            self._get(self.sink.register.remote(key, refs))
        except RayActorError as exc:
            log.warning("the executor's event sink actor died (%s); starting a new one", type(exc).__name__)
            self.sink, self.sink_name = self.executor._start_sink()
            self._get(self.sink.register.remote(key, refs))
        if probe is not None:
            try:
                self._get(probe)
            except RayActorError as exc:
                self.executor._replace_memory_actor(exc)
        self._runs[key] = refs  # the driver owns them until the run ends
        return key, list(range(1, len(refs)))

    def release_run(self, ctx_handle, fn_handles) -> None:
        self._runs.pop(ctx_handle, None)
        if self.lost is None:
            self.sink.release.remote(ctx_handle)

    def _task_fn(self, resources: dict):
        """The remote task with this stage's options, made once per distinct resources."""
        key = tuple(sorted(resources.items()))
        task = self._task_fns.get(key)
        if task is None:
            task = self._task_fns[key] = _remotes()["task"].options(
                num_returns=2, **self.executor._task_options(resources))
        return task

    def submit(self, fn_handle, ctx_handle, info, flat_args, resources, on_done):
        self._check()
        head = (self.sink_name, ctx_handle, fn_handle, (info.run, info.stage, info.item, info.layout, info.kwargs))
        meta_ref, value_ref = self._task_fn(resources).remote(head, *flat_args)
        with self._pending_lock:
            self._pending[meta_ref] = (on_done, False)
        # Ray calls back when the (small) meta object is ready: no polling, no added latency.
        meta_ref.future().add_done_callback(lambda fut: self._done(fut, meta_ref, value_ref, on_done))
        return meta_ref

    def submit_chunk(self, fn_handle, ctx_handle, tasks, resources, on_done):
        self._check()
        flat, counts = [], []
        for info, args in tasks:
            flat.extend(args)
            counts.append(len(args))
        head = (self.sink_name, ctx_handle, fn_handle,
                [(i.run, i.stage, i.item, i.layout, i.kwargs) for i, _ in tasks], counts)
        refs = _remotes()["chunk"].options(num_returns=len(tasks) + 1,
                                           **self.executor._task_options(resources)).remote(head, *flat)
        meta_ref, value_refs = refs[0], refs[1:]
        with self._pending_lock:
            self._pending[meta_ref] = (on_done, True)
        meta_ref.future().add_done_callback(lambda fut: self._chunk_done(fut, meta_ref, value_refs, on_done))
        return meta_ref

    def _chunk_done(self, fut, meta_ref, value_refs, on_done) -> None:
        if not self._claim(meta_ref) or self._stop.is_set() or fut.cancelled():
            return
        try:
            metas = fut.result()
        except BaseException as exc:  # the chunk as a whole: the engine retries each item alone
            on_done(_unwrap(exc))
            return
        on_done([Outcome(True, ref, None, m["start"], m["end"], m["worker"]) if m["ok"]
                 else Outcome(False, None, m["error"], m["start"], m["end"], m["worker"])
                 for m, ref in zip(metas, value_refs)])

    def _done(self, fut, meta_ref, value_ref, on_done) -> None:
        if not self._claim(meta_ref) or self._stop.is_set() or fut.cancelled():
            return
        try:
            meta = fut.result()
        except BaseException as exc:  # failed at the system level (worker died, cancelled)
            on_done(Outcome(False, error=_unwrap(exc), end=time.time()))
            return
        if meta["ok"]:
            on_done(Outcome(True, value_ref, None, meta["start"], meta["end"], meta["worker"]))
        else:
            on_done(Outcome(False, None, meta["error"], meta["start"], meta["end"], meta["worker"]))

    def _poll_events(self) -> None:
        # Often while a run is active (a task's 'running' report reaches the driver within ~0.1 s
        # of its start: 0.05 s in the worker's batch, then up to 0.05 s here), rarely when idle.
        while not self._stop.wait(0.05 if self.executor._active else 0.5):
            if not self._connected():
                return
            try:
                events = self.ray.get(self.sink.drain.remote(), timeout=5)
            except Exception:
                continue
            for event in events:
                self.executor._on_worker_event(event)

    def split(self, handle):
        """Count the items, then one task returns them as that many objects: two round trips
        (a streaming generator took one per item)."""
        self._check()
        remotes = _remotes()
        status, count = self._get(remotes["count"].options(num_cpus=0).remote(handle))
        if status == "error":
            raise count
        if count == 0:
            return []
        refs = remotes["items"].options(num_cpus=0, num_returns=count).remote(handle)
        return [(("v",), ref) for ref in ([refs] if count == 1 else refs)]

    def fetch(self, handle):
        return self._get(handle)

    def fetch_many(self, handles):
        return self._get(list(handles))

    def cancel(self, task_refs):
        """Cancel at once (a stage in Python code gets KeyboardInterrupt); what still runs after
        ``CANCEL_GRACE`` s (time.sleep, C code) has its worker process killed, so its CPU goes
        back to Ray. The engine never waits: the second step runs in a thread."""
        refs = [ref for ref in task_refs if ref is not None]
        if not refs or self.lost is not None:
            return
        with self._pending_lock:  # nobody listens for these any more
            for ref in refs:
                self._pending.pop(ref, None)
        threading.Thread(target=self._stop_tasks, args=(refs,), name="flowdapt-nb-ray-cancel",
                         daemon=True).start()

    def _connected(self) -> bool:
        """Ray calls from a background thread are safe: once closing or disconnected, one would
        start a new local Ray (ray.cancel/wait/get start one when none is connected). Closing
        ends this driver's tasks anyway."""
        return not self._stop.is_set() and self.lost is None and self.ray.is_initialized()

    def _stop_tasks(self, refs) -> None:
        for ref in refs:  # one call per task: thousands of them must not hold up the engine
            if not self._connected():
                return
            try:
                self.ray.cancel(ref, force=False, recursive=True)
            except Exception:
                pass
        deadline = time.monotonic() + CANCEL_GRACE
        while refs and time.monotonic() < deadline and self._connected():
            try:
                _, refs = self.ray.wait(refs, num_returns=len(refs), timeout=0.2, fetch_local=False)
            except Exception:
                return
        for ref in refs:
            if not self._connected():
                return
            try:
                self.ray.cancel(ref, force=True, recursive=True)
            except Exception:
                pass

    def close(self) -> None:
        self._stop.set()
        self._monitor.stop()
        if self._poller is not threading.current_thread():
            self._poller.join(timeout=5)


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps errors; keep the original type and the worker's traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        cause.remote_traceback = getattr(exc, "traceback_str", None) or str(exc)
        return cause
    return exc


def _on_driver_node():
    """Our helper actors (event sink, cluster memory) live on the driver's node: on a
    multi-node cluster, losing a worker node must not take the run's refs and the cluster
    memory with it (a restarted sink elsewhere would come back empty). Soft: a node that
    can't host them never blocks the start."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)


class RayExecutor(Executor):
    """Runs stages as Ray tasks: a local Ray it starts, or a cluster (``cluster_address``).

    Stage resources become task options (``num_cpus``, ``num_gpus``, ``memory``, custom), the
    ``cluster_memory_actor`` holds cluster memory, and data stays in Ray's object store between
    stages.

    >>> ex = RayExecutor(cpus=2).start()     # doctest: +SKIP
    """

    kind = "ray"
    Config = RayConfig

    def __init__(self, _config=None, _compute=None, **fields):
        super().__init__(_config, _compute, **fields)
        self._ctx = None
        self._memory = None
        self._sink = None
        self._memory_actor_name = None
        self._lost: ClusterLostError | None = None  # why the executor disconnected by itself
        self._disconnecting: threading.Thread | None = None  # disconnecting after a lost head

    # --- lifecycle ---
    def start(self, wait: bool = True) -> "RayExecutor":
        """Start a local Ray node (on 127.0.0.1 only), or attach to ``cluster_address``;
        returns self. Also re-attaches after the executor lost its cluster. ``wait=False``:
        see :meth:`Executor.start`."""
        worker = self._disconnecting
        if worker is not None and worker is not threading.current_thread():
            worker.join(120)  # Ray can't start again until the old connection is gone
        self._lost = None
        return super().start(wait=wait)

    def close(self) -> None:
        worker = self._disconnecting
        if worker is not None and worker is not threading.current_thread():
            # after a lost head, disconnecting takes Ray ~20 s: it goes on in the background
            worker.join(5)
            return
        super().close()

    close.__doc__ = Executor.close.__doc__

    def submit(self, workflow, input=None, namespace=None, timeout=None, cache=None):
        if self._lost is not None:  # say why, not just "closed"
            raise ClusterLostError(f"{self._lost} (the executor is disconnected; call start())")
        return super().submit(workflow, input=input, namespace=namespace, timeout=timeout, cache=cache)

    submit.__doc__ = Executor.submit.__doc__

    def _head_lost(self, error: ClusterLostError) -> None:
        """The head monitor found the cluster gone: let the runs end on the error they were
        given, then close (disconnecting from Ray before Ray ends this process)."""
        self._lost = error
        self._disconnecting = threading.current_thread()
        try:
            deadline = time.monotonic() + 5
            while self._active and time.monotonic() < deadline:
                time.sleep(0.05)
            super().close()
        finally:
            self._disconnecting = None

    def _runtime_env(self) -> dict:
        c = self.config
        env: dict = {}
        if c.env_vars:
            env["env_vars"] = dict(c.env_vars)
        if c.working_dir:
            env["working_dir"] = c.working_dir
        if c.py_modules:
            env["py_modules"] = list(c.py_modules)
        if c.pip:
            env["pip"] = list(c.pip)
        if c.conda:
            env["conda"] = c.conda
        if c.container:
            env["container"] = c.container
        if c.runtime_env_config:
            env["config"] = c.runtime_env_config
        return env

    def _node_resources_planned(self) -> dict:
        c = self.config
        cpus = usable_cores() if c.cpus == "auto" else int(c.cpus)
        gpus = {"disabled": 0, "auto": gpu_count()}.get(c.gpus, c.gpus)
        return {"CPU": cpus, "GPU": gpus, **c.resources}

    def _check_memory_actor(self, offered: dict) -> None:
        actor = self.config.cluster_memory_actor
        if actor is None:
            return
        names = sorted(offered)
        for name, amount in actor.resources.items():
            if name not in offered:
                near = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
                hint = f"the nearest the cluster has is '{near[0]}'" if near else \
                    f"the cluster offers: {', '.join(names)}"
                raise ConfigError(f"cluster_memory_actor.resources asks for '{name}', which no Ray node has; "
                                  f"the actor could never start", key=f"cluster_memory_actor.resources.{name}",
                                  hint=hint)
            if amount > offered[name]:
                raise ConfigError(f"cluster_memory_actor.resources asks for {name}: {amount} but the cluster "
                                  f"has {offered[name]:g}", key=f"cluster_memory_actor.resources.{name}")
        if actor.num_cpus > offered.get("CPU", 0):
            raise ConfigError(f"cluster_memory_actor.num_cpus is {actor.num_cpus} but the cluster has "
                              f"{offered.get('CPU', 0):g} CPU", key="cluster_memory_actor.num_cpus")

    def _open(self):
        import ray
        c = self.config
        if not self.owns_cluster:  # an unreachable address is the error to report, whatever else runs
            ensure_reachable("Ray", c.cluster_address, 6379, c.connect_timeout)
        if ray.is_initialized():
            raise RuntimeError("Ray is already initialized in this process (another RayExecutor or "
                               "ray.init()); close it first: one Ray connection per process")
        init_kwargs = dict(log_to_driver=c.log_to_driver, logging_level=_level(c.logging_level),
                           runtime_env=self._runtime_env() or None, namespace="flowdapt_nb",
                           configure_logging=True)
        if self.owns_cluster:
            planned = self._node_resources_planned()
            self._check_memory_actor({k: v for k, v in planned.items() if v} | {"CPU": planned["CPU"]})
            init_kwargs.update(num_cpus=planned["CPU"], num_gpus=planned["GPU"],
                               resources=dict(c.resources) or None, include_dashboard=c.include_dashboard,
                               dashboard_host=c.dashboard_host)
            # Ray's fixed default port would collide with any other Ray on the machine.
            init_kwargs["dashboard_port"] = c.dashboard_port if c.dashboard_port is not None else free_port()
            if c.memory != "auto":
                init_kwargs["_memory"] = parse_bytes(c.memory)
            if c.object_store_memory not in (None, "auto"):
                init_kwargs["object_store_memory"] = parse_bytes(c.object_store_memory)
            # Every service of the node on loopback: other machines can't reach it (see loopback_node)
            init_kwargs["_node_ip_address"] = LOOPBACK
            ensure_private_token()
        else:
            ensure_reachable("Ray", c.cluster_address, 6379, c.connect_timeout)
            init_kwargs["address"] = c.cluster_address
            # Ray turns token authentication on by itself only when it starts a cluster; a driver
            # attaching by address must be told, or the head refuses it (InvalidAuthToken).
            if "RAY_AUTH_MODE" not in os.environ and os.path.exists(os.path.expanduser("~/.ray/auth_token")):
                os.environ["RAY_AUTH_MODE"] = "token"
                try:  # Ray caches its config at import: refresh it, as Ray itself does
                    from ray._raylet import Config
                    Config.initialize("")
                except Exception:
                    pass
        children_before = _child_pids()
        self._step("starting the Ray node (GCS, raylet)" if self.owns_cluster
                   else f"connecting to the Ray cluster at {c.cluster_address}")
        try:
            driver_outlives_head()
            with loopback_node() if self.owns_cluster else contextlib.nullcontext():
                self._ctx = self._init_with_retry(init_kwargs, children_before)
            tighten_token()
            if not self.owns_cluster:
                self._check_memory_actor(ray.cluster_resources())
            self._step("starting the event sink and cluster memory (Ray actors)")
            sink, sink_name = self._start_sink()
            actor = self._start_memory_actor(_remotes()["store"])
            self._memory = _RayMemory(self._memory_actor_name, actor)
        except BaseException:
            self._memory = self._sink = None
            _shutdown_and_reap(children_before)  # never leave a half-started Ray behind
            raise
        return _RayBackend(self, sink, sink_name)

    def _start_sink(self):
        """The actor that collects workers' task reports and holds each run's refs (a new name
        each time: workers cache actors by name). Restarted by Ray if its process dies; a killed
        one is replaced at the next run."""
        name = f"flowdapt_nb_events_{uuid.uuid4().hex[:8]}"
        self._sink = _remotes()["sink"].options(num_cpus=0, name=name, max_restarts=-1, max_task_retries=3,
                                                scheduling_strategy=_on_driver_node()).remote()
        return self._sink, name

    def _replace_memory_actor(self, exc: BaseException) -> None:
        """Before a run: a cluster memory actor that died is replaced, under the same name (what
        it held is lost: said in the log here, and to any stage that called it while it was gone)."""
        log.warning("the cluster memory actor '%s' died (%s): what it held is lost; starting a new one",
                    self._memory_actor_name, type(exc).__name__)
        actor = self._start_memory_actor(_remotes()["store"])
        self._memory = _RayMemory(self._memory_actor_name, actor)

    def _init_with_retry(self, init_kwargs: dict, children_before: set[int]):
        """ray.init; a local start that timed out (Ray waits a fixed 30 s for its raylet, too short
        on a busy machine) is cleaned up and tried once more."""
        import ray
        if not self.owns_cluster:  # a head that listens may still be starting: retry until the deadline
            deadline = time.monotonic() + self.config.connect_timeout
            while True:
                try:
                    return ray.init(**init_kwargs)
                except ConnectionError as exc:
                    if time.monotonic() > deadline:
                        raise ConnectionError(f"can't attach to the Ray cluster at cluster_address "
                                              f"'{self.config.cluster_address}' within "
                                              f"{self.config.connect_timeout:g} s: {exc}") from None
                    ray.shutdown()
                    time.sleep(1)
        try:
            return ray.init(**init_kwargs)
        except Exception as exc:
            if "timed out during startup" not in str(exc):
                raise
            log.warning("Ray start-up timed out on a busy machine; trying once more")
            _shutdown_and_reap(children_before)
            return ray.init(**init_kwargs)

    def _start_memory_actor(self, store_cls):
        import ray
        spec = self.config.cluster_memory_actor
        if spec is None:  # a replacement keeps the name: run contexts already sent name it
            name = self._memory_actor_name or f"flowdapt_nb_memory_{uuid.uuid4().hex[:8]}"
            opts = dict(num_cpus=0, max_concurrency=1000, name=name, scheduling_strategy=_on_driver_node())
        else:
            opts = dict(num_cpus=spec.num_cpus, max_concurrency=spec.max_concurrency, name=spec.name,
                        resources=dict(spec.resources) or None, get_if_exists=True)
        self._memory_actor_name = opts["name"]
        actor = store_cls.options(**opts).remote()
        try:
            ray.get(actor.exists.remote("", ""), timeout=60)
        except Exception as exc:
            raise RuntimeError(f"the cluster memory actor '{opts['name']}' did not start within 60 s: {exc}") from exc
        return actor

    def _shutdown(self):
        import ray
        backend = self._backend
        if backend is not None:
            backend.close()
        lost = backend is not None and backend.lost is not None
        if not self.owns_cluster and not lost:  # leave nothing of ours on a cluster we only visited
            for handle in (self._memory.actor if self._memory else None, self._sink):
                if handle is not None:
                    try:
                        ray.kill(handle)
                    except Exception:
                        pass
        self._memory = self._sink = self._ctx = None
        ray.shutdown()

    # --- resources ---
    def _connected(self) -> bool:
        """Ray calls are safe: a call once disconnected would start a new local Ray."""
        import ray
        backend = self._backend
        return backend is not None and backend.lost is None and ray.is_initialized()

    def _nodes(self) -> list[dict]:
        import ray
        if not self._connected():
            return []
        return [n for n in ray.nodes() if n.get("Alive")]

    def _check_stage_resources(self, stage):
        offered = []
        for node in self._nodes():
            res = dict(node.get("Resources") or {})
            mapped = {"cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0), "memory": res.get("memory", 0)}
            mapped.update({k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory",
                                                                       "object_store_memory")
                           and not k.startswith("node:") and not k.startswith("accelerator_type")})
            offered.append(mapped)
        check_resource_request(stage, offered, "Ray")

    def _task_options(self, resources: dict) -> dict:
        opts: dict = {"num_cpus": resources.get("cpus", 1)}
        if resources.get("gpus"):
            opts["num_gpus"] = resources["gpus"]
        if resources.get("memory"):
            opts["memory"] = parse_bytes(resources["memory"])
        custom = {k: v for k, v in resources.items() if k not in ("cpus", "gpus", "memory") and v}
        if custom:
            opts["resources"] = custom
        return opts

    # --- info ---
    def _address(self):
        if self._ctx is None:
            return None
        return self._ctx.address_info.get("gcs_address") or self._ctx.address_info.get("address")

    def _dashboard_url(self):
        url = getattr(self._ctx, "dashboard_url", None) if self._ctx is not None else None
        if not url:
            return None
        return url if url.startswith("http") else f"http://{url}"

    def _workers(self):
        return [{"name": n["NodeID"][:12], "address": n.get("NodeManagerAddress"),
                 "resources": {k: v for k, v in (n.get("Resources") or {}).items() if not k.startswith("node:")}}
                for n in self._nodes()]

    def _sample(self):
        import ray
        from ray._private import state as ray_state
        if not self._connected():
            return []
        now = time.time()
        try:
            available = ray_state.available_resources_per_node()
        except Exception:
            available = {}
        from ..telemetry import add_up, running_requests
        local_ip = ray.util.get_node_ip_address()
        nodes = self._nodes()
        # What our running tasks hold, by node (a worker is named ip:pid; where several nodes
        # share an IP, only Ray's own view can tell them apart). Ray's view lags 1-3 s behind:
        # while we run something it can only add to ours; with no run of ours on a cluster we
        # own, nothing of ours is in use.
        by_ip: dict[str, list] = {}
        for worker, request in running_requests(self):
            by_ip.setdefault(str(worker or "").rsplit(":", 1)[0], []).append((worker, request))
        ips = [n.get("NodeManagerAddress") for n in nodes]
        trust_ours = self.owns_cluster and not self._active and self.config.cluster_memory_actor is None
        out = []
        for node in nodes:
            total = {k: v for k, v in (node.get("Resources") or {}).items() if not k.startswith("node:")
                     and k != "object_store_memory"}
            avail = available.get(node["NodeID"], {})
            ip = node.get("NodeManagerAddress")
            mine = add_up(by_ip.get(ip, []) if ips.count(ip) == 1 else [], _RAY_NAMES)
            used = {k: (0.0 if trust_ours else max(v - avail.get(k, 0.0), 0.0)) for k, v in total.items()}
            used = {k: max(u, mine.get(k, 0.0)) for k, u in used.items()}
            sample = ResourceSample(node["NodeID"][:12], now, resources_total=total,
                                    resources_available={k: max(0.0, total[k] - used[k]) for k in total})
            if node.get("NodeManagerAddress") == local_ip:  # this machine: measure it directly
                vm = psutil.virtual_memory()
                sample.cpu_percent = psutil.cpu_percent(None)
                sample.memory_used, sample.memory_limit = vm.total - vm.available, vm.total
                from ..telemetry import add_gpu
                add_gpu(sample)
            out.append(sample)
        return out


def _child_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _shutdown_and_reap(children_before: set[int]) -> None:
    """ray.shutdown(), then end any process our own failed ray.init started (ray.shutdown
    doesn't know a node whose start-up timed out)."""
    import ray
    try:
        ray.shutdown()
    except Exception:
        pass
    ours = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.pid not in children_before and "ray" in " ".join(proc.cmdline()):
                ours.append(proc)
        except psutil.Error:
            pass
    for proc in ours:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(ours, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _level(level) -> int:
    return level if isinstance(level, int) else getattr(logging, str(level).upper(), logging.WARNING)
