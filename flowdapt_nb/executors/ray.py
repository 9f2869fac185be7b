"""RayExecutor: start a local Ray, or attach to a running cluster by ``cluster_address``."""

from __future__ import annotations

import contextlib
import difflib
import logging
import threading
import time
import uuid
from typing import Any

import psutil

from .. import arg_layout
from ..config import RayConfig
from ..engine import Backend, Outcome
from ..errors import ClusterLostError, ConfigError, attach_remote_traceback
from ..events import ResourceSample
from ..memory_store import MemoryStore
from ..units import parse_bytes, usable_cores
from .base import Executor
from .call_gate import CallGate, GateClosed
from .cluster import check_resource_request, ensure_reachable, free_port, gpu_count
from .ray_node import (
    LOOPBACK,
    HeadMonitor,
    TokenRefusedError,
    attach_with_token,
    check_token,
    driver_outlives_head,
    ensure_private_token,
    loopback_node,
    tighten_token,
    undo_attach_with_token,
)
from .ray_tasks import (
    CANCEL_GRACE,
    KV_NAMESPACE,
    NODE_ID_CHARS,
    STUCK,
    EventSink,
    RayMemory,
    cancel_key,
    count_items,
    node_of_worker,
    ray_chunk,
    ray_task,
    split_items,
    stuck_prefix,
    task_label,
)

log = logging.getLogger("flowdapt_nb")
CANCEL_FLAG_TTL = 300.0  # seconds a cancelled run's flag stays for its tasks still queued (task_cancel)
CANCEL_REFS_FOR = 60.0  # seconds a cancelled run's task refs are kept for a force cancel (later: last resort)
NODES_FRESH = 2.0  # seconds a run's resource check reuses the cluster's node list
_remote: dict = {}  # the remote functions/actors, made on first use (import ray lazily)
_RAY_NAMES = {"cpus": "CPU", "gpus": "GPU"}  # our stage resource names -> Ray's


def _remotes():
    if not _remote:
        import ray

        _remote["task"] = ray.remote(ray_task)
        _remote["chunk"] = ray.remote(ray_chunk)
        _remote["count"] = ray.remote(count_items)
        _remote["items"] = ray.remote(split_items)
        _remote["sink"] = ray.remote(EventSink)
        _remote["store"] = ray.remote(MemoryStore)
    return _remote


class _Helpers:
    """The executor's helper actors, seen from the driver: the event sink and the cluster memory.

    Made just after the first run's first tasks are sent (or at the driver's first use of cluster
    memory), and never awaited: each actor needs a worker process of its own, and made before the
    first task they would take the node's pre-started worker from it (the first result then came
    1-3 s later on a loaded machine). Until the sink has answered once, a run's tasks carry the
    run's refs themselves instead of a key to look up. A helper that died is replaced at the next
    run: the sink under a new name (workers cache actors by name), the memory under the same one
    (run contexts already sent name it)."""

    def __init__(self, executor: RayExecutor):
        self.executor = executor
        self.lock = threading.Lock()
        self.started = False
        self.closing = False  # the executor is closing: a probe cut short by it is no news
        self.probes: dict[str, Any] = {}  # which -> the first call still unanswered
        self.sink: Any = None  # actor handles (Ray's are untyped)
        self.sink_name = _sink_name()
        self.sink_names = {self.sink_name}  # every name used: the key-value reports' prefixes
        self.sink_state = "none"  # none | starting | ready | dead
        self.memory: Any = None
        self.memory_state = "none"
        spec = executor.config.cluster_memory_actor
        self.memory_name = spec.name if spec is not None else f"flowdapt_nb_memory_{uuid.uuid4().hex[:8]}"
        self.gate = CallGate()  # every Ray call off the closing thread goes through it

    def start(self) -> None:
        """Make both actors (once; returns at once)."""
        if self.started:
            return
        with self.lock:
            if self.started:
                return
            self.new_sink(self.sink_name)
            self.new_memory()
            self.started = True

    def memory_actor(self):
        """The memory actor's handle, made now if it wasn't yet."""
        if self.memory is None:
            self.start()
        return self.memory

    def new_sink(self, name: str | None = None) -> None:
        """Collects workers' task reports and holds each run's refs. Restarted by Ray if its
        process dies; a killed one is replaced at the next run, under a new name."""
        self.sink_name = name or _sink_name()
        self.sink_names.add(self.sink_name)
        with self.gate:
            self.sink = (
                _remotes()["sink"]
                .options(
                    num_cpus=0,
                    name=self.sink_name,
                    max_restarts=-1,
                    max_task_retries=3,
                    scheduling_strategy=_on_driver_node(),
                )
                .remote()
            )
            self.sink_state = "starting"
            self._watch("sink", self.sink, self.sink.lookup.remote(""))

    def new_memory(self) -> None:
        spec = self.executor.config.cluster_memory_actor
        if spec is None:
            with self.gate:  # _on_driver_node asks Ray for the node id
                strategy = _on_driver_node()
            opts = dict(num_cpus=0, max_concurrency=1000, name=self.memory_name, scheduling_strategy=strategy)
        else:
            opts = dict(
                num_cpus=spec.num_cpus,
                max_concurrency=spec.max_concurrency,
                name=spec.name,
                resources=dict(spec.resources) or None,
                get_if_exists=True,
            )
        with self.gate:
            self.memory = _remotes()["store"].options(**opts).remote()
            self.memory_state = "starting"
            self._watch("memory", self.memory, self.memory.exists.remote("", ""))

    def _watch(self, which: str, handle, probe) -> None:
        """``<which>_state`` turns 'ready' (or 'dead') when the actor answers its first call."""

        def done(fut):
            if self.probes.get(which) is probe:
                self.probes.pop(which, None)
            if self.closing or getattr(self, which) is not handle:  # closing, or replaced meanwhile
                return
            try:
                fut.result()
                setattr(self, f"{which}_state", "ready")
            except BaseException as exc:
                log.warning("the %s actor did not start: %s: %s", which, type(exc).__name__, exc)
                setattr(self, f"{which}_state", "dead")

        self.probes[which] = probe
        probe.future().add_done_callback(done)

    def settle(self, ray, timeout: float = 2.0) -> None:
        """Before killing the actors: let first calls still in flight end (bounded). Killed under
        one, Ray logs '(raylet) Task EventSink.lookup failed. There are 3 retries remaining' into
        the notebook after a quick run then `%flowdapt stop`."""
        pending = list(self.probes.values())
        if pending:
            try:
                ray.wait(pending, num_returns=len(pending), timeout=timeout, fetch_local=False)
            except Exception:
                pass

    def replace_memory(self, exc: BaseException) -> None:
        """Before a run: a cluster memory actor that died is replaced, under the same name (what
        it held is lost: said in the log here, and to any stage that called it while it was gone)."""
        log.warning(
            "the cluster memory actor '%s' died (%s): what it held is lost; starting a new one",
            self.memory_name,
            type(exc).__name__,
        )
        self.new_memory()

    def replace_sink(self, exc: BaseException) -> None:
        log.warning("the executor's event sink actor died (%s); starting a new one", type(exc).__name__)
        self.new_sink()

    def handles(self) -> list:
        return [h for h in (self.memory, self.sink) if h is not None]


def _sink_name() -> str:
    return f"flowdapt_nb_events_{uuid.uuid4().hex[:8]}"


# --- the backend --------------------------------------------------------------------------------


class _RayBackend(Backend):
    kind = "ray"

    def __init__(self, executor: RayExecutor, helpers: _Helpers):
        import ray

        self.ray = ray
        self.executor = executor
        self.helpers = helpers
        self._task_fns: dict = {}
        self._runs: dict = {}  # run key -> (key or refs as tasks carry it, refs, sink name)
        self._kv_prefixes: set[str] = set()  # sink names whose key-value reports are read
        # Tiny items go in chunks of about this much work (a Ray task costs ~0.5 ms to send).
        self.chunk_seconds = 0.02
        self.parallelism = max(1, int(ray.cluster_resources().get("CPU", 1)))
        # Tasks sent whose outcome hasn't reached the engine: a lost head fails them all at once
        # (Ray itself would report nothing). meta ref -> (on_done, whether it is a chunk, run uid,
        # task label)
        self._pending: dict = {}
        self._cancel_flags: dict[str, float] = {}  # run uid -> when its cancel flag was raised
        self._cancelled: dict[str, dict] = {}  # run uid -> {task label: meta ref} (task_cancel)
        self._pending_lock = threading.Lock()
        self.lost: ClusterLostError | None = None
        self._stop = threading.Event()
        self.gate = helpers.gate
        self._poller = threading.Thread(target=self._poll_events, name="flowdapt-nb-ray-events", daemon=True)
        self._poller.start()
        c = executor.config
        self._monitor = HeadMonitor(
            self._on_lost,
            c.connection_monitor_interval,
            c.ping_timeout,
            c.ping_failure_threshold,
            gate=self.gate,
        ).start()

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
                with self.gate:
                    return self.ray.get(refs, timeout=1.0)
            except GetTimeoutError:
                continue

    def _on_lost(self, reason: str) -> None:
        """From the head monitor: fail every task in flight, then disconnect (in this thread)."""
        self.lost = ClusterLostError(
            f"lost the Ray cluster at {self.executor.config.cluster_address or self.executor._address()}: "
            f"{reason}. The run can't "
            f"finish: its tasks and data were on that cluster. The executor disconnected (this "
            f"process keeps running); once the cluster is back, start() the executor again"
        )
        log.error("%s", self.lost)
        self.executor._disconnecting = threading.current_thread()
        with self._pending_lock:
            pending, self._pending = list(self._pending.values()), {}
        for on_done, chunk, _run, _label in pending:
            try:
                if chunk:
                    on_done.failed(self.lost)
                else:
                    on_done(Outcome.failure(self.lost))
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
        their refs under a key that every task of the run carries (while the sink is still
        starting, the tasks carry the refs). A helper actor that died (killed, its node lost) is
        replaced here, before the run needs it."""
        from ray.exceptions import RayActorError

        self._check()
        helpers = self.helpers
        probe = None
        with self.gate:
            if helpers.memory_state == "ready":  # asked alongside register: one wait for both
                probe = helpers.memory.exists.remote("", "")
            elif helpers.memory_state == "dead":
                helpers.replace_memory(RuntimeError("it did not start"))
            key = uuid.uuid4().hex
            refs = [self.ray.put(ctx)] + [self.ray.put(fn) for fn in fns]
        run = refs
        if helpers.sink_state == "ready":
            try:
                with self.gate:
                    registered = helpers.sink.register.remote(key, refs)
                self._get(registered)
                run = key
            except RayActorError as exc:
                helpers.replace_sink(exc)
        elif helpers.sink_state == "dead":
            helpers.replace_sink(RuntimeError("it did not start"))
        if probe is not None:
            try:
                self._get(probe)
            except RayActorError as exc:
                helpers.replace_memory(exc)
        self._runs[key] = (run, refs, helpers.sink_name)  # the driver owns the refs until the run ends
        return key, list(range(1, len(refs)))

    def release_run(self, ctx_handle, fn_handles) -> None:
        run, _, _ = self._runs.pop(ctx_handle, (None, None, None))
        if self.lost is None and isinstance(run, str):
            try:
                with self.gate:
                    self.helpers.sink.release.remote(ctx_handle)
            except GateClosed:  # closing: the sink goes with the executor
                pass

    def _task_fn(self, resources: dict):
        """The remote task with this stage's options, made once per distinct resources."""
        key = tuple(sorted(resources.items()))
        task = self._task_fns.get(key)
        if task is None:
            task = self._task_fns[key] = _remotes()["task"].options(
                num_returns=2, **self.executor._task_options(resources)
            )
        return task

    def submit_many(self, ctx_handle, calls, refs) -> None:
        super().submit_many(ctx_handle, calls, refs)
        self.helpers.start()  # after the first tasks: they get the node's pre-started workers

    def submit(self, fn_handle, ctx_handle, info, flat_args, resources, on_done):
        self._check()
        head = (
            self.helpers.sink_name,
            self._runs[ctx_handle][0],
            fn_handle,
            (info.run, info.stage, info.item, info.layout, info.kwargs),
        )
        with self.gate:
            meta_ref, value_ref = self._task_fn(resources).remote(head, *flat_args)
            with self._pending_lock:
                self._pending[meta_ref] = (on_done, False, info.run, task_label(info.stage, info.item))
            # Ray calls back when the (small) meta object is ready: no polling, no added latency.
            meta_ref.future().add_done_callback(lambda fut: self._done(fut, meta_ref, value_ref, on_done))
        return meta_ref

    def submit_chunk(self, fn_handle, ctx_handle, tasks, resources, on_done):
        self._check()
        flat, counts = [], []
        for _info, args in tasks:
            flat.extend(args)
            counts.append(len(args))
        head = (
            self.helpers.sink_name,
            self._runs[ctx_handle][0],
            fn_handle,
            [(i.run, i.stage, i.item, i.layout, i.kwargs) for i, _ in tasks],
            counts,
        )
        with self.gate:
            refs = (
                _remotes()["chunk"]
                .options(num_returns=len(tasks) + 1, **self.executor._task_options(resources))
                .remote(head, *flat)
            )
            self.helpers.start()
            meta_ref, value_refs = refs[0], refs[1:]
            with self._pending_lock:
                first = tasks[0][0]
                self._pending[meta_ref] = (on_done, True, first.run, task_label(first.stage, first.item))
            meta_ref.future().add_done_callback(
                lambda fut: self._chunk_done(fut, meta_ref, value_refs, on_done)
            )
        return meta_ref

    def _chunk_done(self, fut, meta_ref, value_refs, on_done) -> None:
        if not self._claim(meta_ref) or self._stop.is_set() or fut.cancelled():
            return
        try:
            metas = fut.result()
        except BaseException as exc:  # the chunk as a whole: the engine retries each item alone
            on_done.failed(_unwrap(exc))
            return
        on_done.done([Outcome.from_report(m, ref) for m, ref in zip(metas, value_refs)])

    def _done(self, fut, meta_ref, value_ref, on_done) -> None:
        if not self._claim(meta_ref) or self._stop.is_set() or fut.cancelled():
            return
        try:
            meta = fut.result()
        except BaseException as exc:  # failed at the system level (worker died, cancelled)
            on_done(Outcome.failure(_unwrap(exc)))
            return
        on_done(Outcome.from_report(meta, value_ref))

    def _poll_events(self) -> None:
        # Often while a run is active (a task's 'running' report reaches the driver within ~0.1 s
        # of its start: 0.05 s in the worker's batch, then up to 0.05 s here), rarely when idle.
        while not self._stop.wait(0.05 if self.executor._active or self._cancelling() else 0.5):
            if not self._connected():
                return
            try:
                with self.gate:
                    events = self._read_kv_reports()
                    if self._cancel_flags:
                        self._force_stuck()
                        self._expire_cancel_flags()
                    if self.helpers.sink_state == "ready":  # else not made yet, or starting
                        try:
                            events += self.ray.get(self.helpers.sink.drain.remote(), timeout=2)
                        except Exception:
                            pass
            except GateClosed:
                return
            for event in events:
                self.executor._on_worker_event(event)

    def _read_kv_reports(self) -> list:
        """Reports of runs sent while the sink was starting (see ray_tasks._sender), taken out of
        the GCS's key-value store; once no such run is active, what is left there is cleared."""
        import pickle

        from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_list

        events: list = []
        try:
            prefixes = {sink for run, _, sink in self._runs.copy().values() if not isinstance(run, str)}
            if not prefixes and not self._kv_prefixes:
                return events
            for prefix in prefixes | self._kv_prefixes:
                for key in _internal_kv_list(f"{prefix}:".encode(), namespace=KV_NAMESPACE):
                    value = _internal_kv_get(key, namespace=KV_NAMESPACE)
                    _internal_kv_del(key, namespace=KV_NAMESPACE)
                    if value is not None:
                        events.extend(pickle.loads(value))
            self._kv_prefixes -= self._kv_prefixes - prefixes  # read once more after their runs
            self._kv_prefixes |= prefixes
        except Exception:  # reports are telemetry: a failed read never stops the poller
            pass
        return events

    def split(self, handle):
        """Count the items, then one task returns them as that many objects: two round trips
        (a streaming generator took one per item)."""
        self._check()
        remotes = _remotes()
        with self.gate:
            counted = remotes["count"].options(num_cpus=0).remote(handle)
        self.helpers.start()
        status, count = self._get(counted)
        if status == "error":
            raise count
        if count == 0:
            return []
        with self.gate:
            refs = remotes["items"].options(num_cpus=0, num_returns=count).remote(handle)
        return [(arg_layout.value(), ref) for ref in ([refs] if count == 1 else refs)]

    def fetch(self, handle):
        return self._get(handle)

    def fetch_many(self, handles):
        return self._get(list(handles))

    def cancel(self, task_refs):
        """Raise the runs' cancel flags; the worker processes stop the tasks (see task_cancel:
        ``ray.cancel`` can abort this process in Ray 2.60). The engine never waits: the flag is
        written from a thread."""
        if self.lost is not None:
            return
        runs = set()
        with self._pending_lock:  # nobody listens for these any more
            for ref in task_refs:
                entry = self._pending.pop(ref, None) if ref is not None else None
                if entry is not None:
                    runs.add(entry[2])
                    self._cancelled.setdefault(entry[2], {})[entry[3]] = ref
        now = time.monotonic()
        for run in runs:  # from now on: expired with the flag, whether or not writing it works
            self._cancel_flags[run] = now
        if runs:
            threading.Thread(
                target=self._flag_cancelled, args=(runs,), name="flowdapt-nb-ray-cancel", daemon=True
            ).start()

    def _connected(self) -> bool:
        """Ray calls from a background thread are safe: once closing or disconnected, one would
        start a new local Ray (ray.cancel/wait/get start one when none is connected). Closing
        ends this driver's tasks anyway."""
        return not self._stop.is_set() and self.lost is None and self.ray.is_initialized()

    def _flag_cancelled(self, runs) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        for run in runs:
            if not self._connected():
                return
            try:
                with self.gate:
                    _internal_kv_put(cancel_key(run), b"1", overwrite=True, namespace=KV_NAMESPACE)
            except GateClosed:  # the executor is closing: Ray ends this driver's tasks
                return
            except Exception as exc:  # the run is cancelled all the same; its tasks run to their end
                log.warning("could not tell Ray's workers that run %s is cancelled: %s", run, exc)

    def _cancelling(self) -> bool:
        """A run was cancelled moments ago: its stuck tasks may soon need a force-cancel."""
        flags = self._cancel_flags
        return bool(flags) and time.monotonic() - max(flags.values(), default=0.0) < 3 * CANCEL_GRACE

    def _force_stuck(self) -> None:
        """Force-cancel the tasks their workers report stuck after their interrupt, then delete
        the report: the worker holds the task's reply until then (see task_cancel), so the
        cancel finds it running, never completing, and Ray's cancel race can't strike. Reports
        of other drivers' runs are left alone. Called under the gate."""
        from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_list

        try:
            keys = _internal_kv_list(STUCK, namespace=KV_NAMESPACE)
        except Exception:
            return
        for key in keys:
            run, _, label = key[len(STUCK) :].decode().partition(":")
            if run not in self._cancel_flags:
                continue  # another driver's run
            ref = self._cancelled.get(run, {}).pop(label, None)  # none after CANCEL_REFS_FOR
            try:
                if ref is not None:
                    self.ray.cancel(ref, force=True)
            except Exception:  # already ended: nothing to stop
                pass
            try:
                _internal_kv_del(key, namespace=KV_NAMESPACE)
            except Exception:
                pass

    def _expire_cancel_flags(self, every_flag: bool = False) -> None:
        """Flags of runs cancelled long ago (their queued tasks have all started and stopped)
        leave the key-value store; all of them when the executor closes (under the gate, or once
        it is shut, from the closing thread)."""
        from ray.experimental.internal_kv import _internal_kv_del

        now = time.monotonic()
        for run, raised in list(self._cancel_flags.items()):
            if now - raised > CANCEL_REFS_FOR:  # a task stuck later ends by its own last resort
                self._cancelled.pop(run, None)
            if every_flag or now - raised > CANCEL_FLAG_TTL:
                self._cancel_flags.pop(run, None)
                self._cancelled.pop(run, None)
                try:
                    _internal_kv_del(cancel_key(run), namespace=KV_NAMESPACE)
                    _internal_kv_del(stuck_prefix(run), del_by_prefix=True, namespace=KV_NAMESPACE)
                except Exception:
                    pass

    def close(self) -> None:
        """Stop the threads, then shut the call gate: once this returns no thread of ours is
        inside a Ray call, and ray.shutdown() is safe (see call_gate)."""
        self._stop.set()
        self._monitor.stop()
        if self._poller is not threading.current_thread():
            self._poller.join(timeout=5)
        if not self.gate.close(timeout=10):
            log.warning("a Ray call of this executor still runs after 10 s; shutting Ray down anyway")


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps errors; keep the original type and the worker's traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        attach_remote_traceback(cause, getattr(exc, "traceback_str", None) or str(exc))
        return cause
    return exc


def _on_driver_node():
    """Our helper actors (event sink, cluster memory) live on the driver's node: on a
    multi-node cluster, losing a worker node must not take the run's refs and the cluster
    memory with it (a restarted sink elsewhere would come back empty). Hard: a soft affinity
    let Ray place them on another node now and then (seen on a loaded machine, every node on
    127.0.0.1). The driver's node can always host them (no CPU asked), and if it is lost the
    driver has lost its own raylet anyway. (A driver attaching to nodes that share its IP
    joins the head's.)"""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


class RayExecutor(Executor):
    """Runs stages as Ray tasks: a local Ray it starts, or a cluster (``cluster_address``).

    Stage resources become task options (``num_cpus``, ``num_gpus``, ``memory``, custom), the
    ``cluster_memory_actor`` holds cluster memory, and data stays in Ray's object store between
    stages.

    >>> ex = RayExecutor(cpus=2).start()     # doctest: +SKIP
    """

    kind = "ray"
    Config = RayConfig
    config: RayConfig

    def __init__(self, _config=None, _compute=None, **fields):
        super().__init__(_config, _compute, **fields)
        self._ctx = None
        self._memory = None
        self._helpers: _Helpers | None = None
        self._offered_cache: tuple[float, list[dict]] | None = None  # (when read, per node)
        self._lost: ClusterLostError | None = None  # why the executor disconnected by itself
        self._disconnecting: threading.Thread | None = None  # disconnecting after a lost head

    # --- lifecycle ---
    def start(self, wait: bool = True) -> RayExecutor:
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
        if c.gpus == "disabled":
            gpus = 0
        elif c.gpus == "auto":
            gpus = gpu_count()
        else:
            gpus = c.gpus
        return {"CPU": cpus, "GPU": gpus, **c.resources}

    def _check_memory_actor(self, offered: dict) -> None:
        actor = self.config.cluster_memory_actor
        if actor is None:
            return
        names = sorted(offered)
        for name, amount in actor.resources.items():
            if name not in offered:
                near = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
                hint = (
                    f"the nearest the cluster has is '{near[0]}'"
                    if near
                    else f"the cluster offers: {', '.join(names)}"
                )
                raise ConfigError(
                    f"cluster_memory_actor.resources asks for '{name}', which no Ray node has; "
                    f"the actor could never start",
                    key=f"cluster_memory_actor.resources.{name}",
                    hint=hint,
                )
            if amount > offered[name]:
                raise ConfigError(
                    f"cluster_memory_actor.resources asks for {name}: {amount} but the cluster "
                    f"has {offered[name]:g}",
                    key=f"cluster_memory_actor.resources.{name}",
                )
        if actor.num_cpus > offered.get("CPU", 0):
            raise ConfigError(
                f"cluster_memory_actor.num_cpus is {actor.num_cpus} but the cluster has "
                f"{offered.get('CPU', 0):g} CPU",
                key="cluster_memory_actor.num_cpus",
            )

    def _open(self):
        import ray

        c = self.config
        if not self.owns_cluster:  # an unreachable address is the error to report, whatever else runs
            ensure_reachable("Ray", c.cluster_address, 6379, c.connect_timeout)
        if ray.is_initialized():
            raise RuntimeError(
                "Ray is already initialized in this process (another RayExecutor or "
                "ray.init()); close it first: one Ray connection per process"
            )
        init_kwargs = dict(
            log_to_driver=c.log_to_driver,
            logging_level=_level(c.logging_level),
            runtime_env=self._runtime_env() or None,
            namespace="flowdapt_nb",
            configure_logging=True,
        )
        if self.owns_cluster:
            planned = self._node_resources_planned()
            self._check_memory_actor({k: v for k, v in planned.items() if v} | {"CPU": planned["CPU"]})
            init_kwargs.update(
                num_cpus=planned["CPU"],
                num_gpus=planned["GPU"],
                resources=dict(c.resources) or None,
                include_dashboard=c.include_dashboard,
                dashboard_host=c.dashboard_host,
            )
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
        token_mode_set = not self.owns_cluster and attach_with_token()
        children_before = _child_pids()
        self._step(
            "starting the Ray node (GCS, raylet)"
            if self.owns_cluster
            else f"connecting to the Ray cluster at {c.cluster_address}"
        )
        try:
            driver_outlives_head()
            with loopback_node() if self.owns_cluster else contextlib.nullcontext():
                self._ctx = self._init_with_retry(init_kwargs, children_before)
            tighten_token()
            if not self.owns_cluster:
                self._check_memory_actor(ray.cluster_resources())
            # The helper actors (event sink, cluster memory) are made after the first run's first
            # tasks are sent: see _Helpers.
            self._helpers = helpers = _Helpers(self)
            self._memory = RayMemory(helpers.memory_name, helpers)
            backend = _RayBackend(self, helpers)
        except BaseException:
            self._memory = self._helpers = None
            _shutdown_and_reap(children_before)  # never leave a half-started Ray behind
            if token_mode_set:
                undo_attach_with_token()
            raise
        return backend

    @property
    def _sink(self):
        """The event sink actor's handle (None until the first run made it)."""
        return self._helpers.sink if self._helpers is not None else None

    def _init_with_retry(self, init_kwargs: dict, children_before: set[int]):
        """ray.init; a local start that timed out (Ray waits a fixed 30 s for its raylet, too short
        on a busy machine) is cleaned up and tried once more."""
        import ray

        if not self.owns_cluster:  # a head that listens may still be starting: retry until the deadline
            address = self.config.cluster_address or ""
            deadline = time.monotonic() + self.config.connect_timeout
            while True:
                try:
                    # a refused token is a clear error at once (ray.init would retry ~20 s, then
                    # fail without naming it); a GCS that doesn't answer yet is tried again
                    # raises only for the token; anything else is ray.init's to judge
                    if "://" not in address:
                        check_token(address, max(0.5, min(5.0, deadline - time.monotonic())))
                    return ray.init(**init_kwargs)
                except TokenRefusedError:
                    raise
                except ConnectionError as exc:
                    if time.monotonic() > deadline:
                        raise ConnectionError(
                            f"can't attach to the Ray cluster at cluster_address "
                            f"'{address}' within {self.config.connect_timeout:g} s: "
                            f"{exc}"
                        ) from None
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

    def _shutdown(self):
        import ray

        backend = self._backend
        if self._helpers is not None:
            self._helpers.closing = True
        if backend is not None:
            backend.close()
        lost = backend is not None and backend.lost is not None
        if not self.owns_cluster and not lost and self._helpers is not None:
            self._helpers.settle(ray)
            for handle in self._helpers.handles():  # leave nothing of ours on a cluster we only visited
                try:
                    ray.kill(handle)
                except Exception:
                    pass
            _clear_kv_reports(self._helpers.sink_names)
            if backend is not None:
                backend._expire_cancel_flags(every_flag=True)
        self._memory = self._helpers = self._ctx = self._offered_cache = None
        ray.shutdown()

    # --- resources ---
    def _nodes(self) -> list[dict]:
        import ray

        try:
            with self._ray_gate():
                return [n for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
        except GateClosed:
            return []

    def _ray_gate(self) -> CallGate:
        """The connected backend's call gate (see call_gate): Ray calls made from dashboards'
        and samplers' threads go through it. GateClosed when not connected."""
        backend = self._backend
        if not isinstance(backend, _RayBackend) or backend.lost is not None:
            raise GateClosed("the executor is not connected to Ray")
        return backend.gate

    def _check_stage_resources(self, stage):
        try:
            check_resource_request(stage, self._offered(), "Ray")
            return
        except ConfigError:  # a node may have joined since the list was read: ask once more
            pass
        # outside the except: the error a user sees has no chained "during handling" context
        check_resource_request(stage, self._offered(fresh=True), "Ray")

    def _offered(self, fresh: bool = False) -> list[dict]:
        """What each live node offers, in stage resource names. Read from the GCS at most every
        ``NODES_FRESH`` s: every stage of every run is checked, and a GCS round trip per stage
        was most of a tiny run's fixed cost."""
        cached = self._offered_cache
        if not fresh and cached is not None and time.monotonic() - cached[0] < NODES_FRESH:
            return cached[1]
        offered = []
        for node in self._nodes():
            res = dict(node.get("Resources") or {})
            mapped = {"cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0), "memory": res.get("memory", 0)}
            mapped.update(
                {
                    k: v
                    for k, v in res.items()
                    if k not in ("CPU", "GPU", "memory", "object_store_memory")
                    and not k.startswith("node:")
                    and not k.startswith("accelerator_type")
                }
            )
            offered.append(mapped)
        self._offered_cache = (time.monotonic(), offered)
        return offered

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
        return [
            {
                "name": n["NodeID"][:NODE_ID_CHARS],
                "address": n.get("NodeManagerAddress"),
                "resources": {
                    k: v for k, v in (n.get("Resources") or {}).items() if not k.startswith("node:")
                },
            }
            for n in self._nodes()
        ]

    def _sample(self):
        import ray
        from ray._private import state as ray_state

        now = time.time()
        try:
            with self._ray_gate():  # the state API re-reads Ray's global state: never mid-shutdown
                if not ray.is_initialized():
                    return []
                try:
                    available = ray_state.available_resources_per_node()
                except Exception:
                    available = {}
                local_ip = ray.util.get_node_ip_address()
                nodes = self._nodes()
        except GateClosed:
            return []
        from ..telemetry import add_up, running_requests

        # What our running tasks hold, by node (a worker's name carries its node id: see
        # ray_tasks.worker_name). Ray's view lags 1-3 s behind: while we run something it can
        # only add to ours; with no run of ours on a cluster we own, nothing of ours is in use.
        by_node: dict[str | None, list] = {}
        for worker, request in running_requests(self):
            by_node.setdefault(node_of_worker(worker), []).append((worker, request))
        trust_ours = self.owns_cluster and not self._active and self.config.cluster_memory_actor is None
        out = []
        for node in nodes:
            total = {
                k: v
                for k, v in (node.get("Resources") or {}).items()
                if not k.startswith("node:") and k != "object_store_memory"
            }
            avail = available.get(node["NodeID"], {})
            short_id = node["NodeID"][:NODE_ID_CHARS]
            mine = add_up(by_node.get(short_id, []), _RAY_NAMES)
            used = {k: (0.0 if trust_ours else max(v - avail.get(k, 0.0), 0.0)) for k, v in total.items()}
            used = {k: max(u, mine.get(k, 0.0)) for k, u in used.items()}
            sample = ResourceSample(
                short_id,
                now,
                resources_total=total,
                resources_available={k: max(0.0, total[k] - used[k]) for k in total},
            )
            if node.get("NodeManagerAddress") == local_ip:  # this machine: measure it directly
                vm = psutil.virtual_memory()
                sample.cpu_percent = psutil.cpu_percent(None)
                sample.memory_used, sample.memory_limit = vm.total - vm.available, vm.total
                from ..telemetry import add_gpu

                add_gpu(sample)
            out.append(sample)
        return out


def _clear_kv_reports(sink_names) -> None:
    """Reports left in the GCS's key-value store (see ray_tasks._sender) go with the executor."""
    from ray.experimental.internal_kv import _internal_kv_del

    for name in sink_names:
        try:
            _internal_kv_del(f"{name}:".encode(), del_by_prefix=True, namespace=KV_NAMESPACE)
        except Exception:
            pass


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
