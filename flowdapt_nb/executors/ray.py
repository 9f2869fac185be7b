"""RayExecutor: start a local Ray, or attach to a running cluster by ``cluster_address``."""

from __future__ import annotations

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
from ..errors import ConfigError
from ..events import ResourceSample
from ..memory_store import MemoryStore
from ..units import parse_bytes, usable_cores
from ..worker import TaskInfo, execute
from ..worker_events import ChunkWatch, EventBatch
from .base import Executor
from .cluster import check_resource_request, ensure_reachable, free_port, gpu_count

log = logging.getLogger("flowdapt_nb")
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
    return meta, value


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
        pos += count
        metas.append(meta)
        values.append(value if meta["ok"] else None)
    _chunks.close(report)
    return (metas, *values)


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
    """Cluster memory in the configured actor; the same calls as MemoryStore, blocking."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name):
        if name.startswith("_") or name == "actor":
            raise AttributeError(name)
        import ray
        method = getattr(self.actor, name)
        return lambda *args: ray.get(method.remote(*args))


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
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_events, name="flowdapt-nb-ray-events", daemon=True)
        self._poller.start()

    def put_run(self, ctx, fns):
        """The run's context and functions go to the object store once; the sink actor holds
        their refs under a key that every task of the run carries."""
        key = uuid.uuid4().hex
        refs = [self.ray.put(ctx)] + [self.ray.put(fn) for fn in fns]
        self.ray.get(self.sink.register.remote(key, refs))
        self._runs[key] = refs  # the driver owns them until the run ends
        return key, list(range(1, len(refs)))

    def release_run(self, ctx_handle, fn_handles) -> None:
        self._runs.pop(ctx_handle, None)
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
        head = (self.sink_name, ctx_handle, fn_handle, (info.run, info.stage, info.item, info.layout, info.kwargs))
        meta_ref, value_ref = self._task_fn(resources).remote(head, *flat_args)
        # Ray calls back when the (small) meta object is ready: no polling, no added latency.
        meta_ref.future().add_done_callback(lambda fut: self._done(fut, value_ref, on_done))
        return meta_ref

    def submit_chunk(self, fn_handle, ctx_handle, tasks, resources, on_done):
        flat, counts = [], []
        for info, args in tasks:
            flat.extend(args)
            counts.append(len(args))
        head = (self.sink_name, ctx_handle, fn_handle,
                [(i.run, i.stage, i.item, i.layout, i.kwargs) for i, _ in tasks], counts)
        refs = _remotes()["chunk"].options(num_returns=len(tasks) + 1,
                                           **self.executor._task_options(resources)).remote(head, *flat)
        meta_ref, value_refs = refs[0], refs[1:]
        meta_ref.future().add_done_callback(lambda fut: self._chunk_done(fut, value_refs, on_done))
        return meta_ref

    def _chunk_done(self, fut, value_refs, on_done) -> None:
        if self._stop.is_set() or fut.cancelled():
            return
        try:
            metas = fut.result()
        except BaseException as exc:  # the chunk as a whole: the engine retries each item alone
            on_done(_unwrap(exc))
            return
        on_done([Outcome(True, ref, None, m["start"], m["end"], m["worker"]) if m["ok"]
                 else Outcome(False, None, m["error"], m["start"], m["end"], m["worker"])
                 for m, ref in zip(metas, value_refs)])

    def _done(self, fut, value_ref, on_done) -> None:
        if self._stop.is_set() or fut.cancelled():
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
            try:
                events = self.ray.get(self.sink.drain.remote(), timeout=5)
            except Exception:
                continue
            for event in events:
                self.executor._on_worker_event(event)

    def split(self, handle):
        """Count the items, then one task returns them as that many objects: two round trips
        (a streaming generator took one per item)."""
        remotes = _remotes()
        status, count = self.ray.get(remotes["count"].options(num_cpus=0).remote(handle))
        if status == "error":
            raise count
        if count == 0:
            return []
        refs = remotes["items"].options(num_cpus=0, num_returns=count).remote(handle)
        return [(("v",), ref) for ref in ([refs] if count == 1 else refs)]

    def fetch(self, handle):
        return self.ray.get(handle)

    def fetch_many(self, handles):
        return self.ray.get(list(handles))

    def cancel(self, task_refs):
        for ref in task_refs:
            try:
                self.ray.cancel(ref, force=False, recursive=True)
            except Exception:
                pass

    def close(self) -> None:
        self._stop.set()
        self._poller.join(timeout=5)


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps errors; keep the original type and the worker's traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        cause.remote_traceback = getattr(exc, "traceback_str", None) or str(exc)
        return cause
    return exc


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

    # --- lifecycle ---
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
        try:
            self._ctx = self._init_with_retry(init_kwargs, children_before)
            if not self.owns_cluster:
                self._check_memory_actor(ray.cluster_resources())
            remotes = _remotes()
            sink_name = f"flowdapt_nb_events_{uuid.uuid4().hex[:8]}"
            self._sink = remotes["sink"].options(num_cpus=0, name=sink_name).remote()
            self._memory = _RayMemory(self._start_memory_actor(remotes["store"]))
        except BaseException:
            self._memory = self._sink = None
            _shutdown_and_reap(children_before)  # never leave a half-started Ray behind
            raise
        return _RayBackend(self, self._sink, sink_name)

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
        if spec is None:
            opts = dict(num_cpus=0, max_concurrency=1000, name=f"flowdapt_nb_memory_{uuid.uuid4().hex[:8]}")
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
        if not self.owns_cluster:  # leave nothing of ours on a cluster we only visited
            for handle in (self._memory.actor if self._memory else None, self._sink):
                if handle is not None:
                    try:
                        ray.kill(handle)
                    except Exception:
                        pass
        self._memory = self._sink = self._ctx = None
        ray.shutdown()

    # --- resources ---
    def _nodes(self) -> list[dict]:
        import ray
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
