"""DaskExecutor: start a LocalCluster, or attach to a running scheduler by ``cluster_address``."""

from __future__ import annotations

import logging
import sys
import time

from ..config import DaskConfig
from ..engine import Backend, Outcome, items_of
from ..errors import ConfigError
from ..events import ResourceSample
from ..memory_store import MemoryStore
from ..units import parse_bytes, usable_cores
from ..worker import execute
from ..worker_events import EventBatch
from .base import Executor
from .cluster import apply_env, check_resource_request, ensure_reachable, gpu_count

EVENT_TOPIC = "flowdapt-nb-task"
OUTPUT_TOPIC = "flowdapt-nb-output"


# --- on the worker ------------------------------------------------------------------------------

def _log(worker, payload) -> None:
    try:
        worker.log_event(EVENT_TOPIC, payload)
    except Exception:  # telemetry must never fail a task
        pass


# Per worker process: a task's 'running' report waits up to 0.02 s to go out in a batch, and is
# dropped if the task finishes first (its 'finished' report carries its start time). Each report
# is a scheduler message and a client callback, and a LocalCluster's scheduler shares the
# driver's process: tiny tasks then cost one report each, not two. 'finished' goes at once, so it
# reaches the driver before the task's result does.
_batch = EventBatch(0.02)


class _QuietStageFailures(logging.Filter):
    """A stage's error reaches the driver with its traceback; the worker needn't log it too."""

    def filter(self, record):
        return not (str(record.msg).startswith("Compute Failed") and "_dask_task" in str(record.args))


_quiet = _QuietStageFailures()


def _dask_task(fn, ctx, info, *flat):
    """Run one stage call on a Dask worker; failures raise the stage's own exception."""
    from distributed import get_worker
    from ..output_capture import capture
    worker = get_worker()
    worker_log = logging.getLogger("distributed.worker")
    if _quiet not in worker_log.filters:
        worker_log.addFilter(_quiet)
    apply_env(ctx.config.get("env_vars") or {})

    def send(stream, line):
        worker.log_event(OUTPUT_TOPIC, {"stage": info.stage, "item": info.item, "stream": stream,
                                        "line": line, "worker": worker.address})

    with capture(send):
        meta, value = execute(ctx, fn, info, flat, lambda event: _batch.add(event, lambda b: _log(worker, b)),
                              worker.address)
    finished = {"run": info.run, "stage": info.stage, "item": info.item,
                "state": "finished" if meta["ok"] else "failed", "time": meta["end"],
                "start": meta["start"], "end": meta["end"], "worker": worker.address}
    _batch.drop(finished)
    _log(worker, finished)
    if not meta["ok"]:
        raise meta["error"]
    return value


def _used_resources(dask_scheduler=None) -> dict:
    """On the scheduler: what each worker's running tasks hold of its resources."""
    return {addr: dict(ws.used_resources) for addr, ws in list(dask_scheduler.workers.items())}


def _not_our_sampling(record) -> bool:
    """A scheduler in this process logs each sample's call as 'Run out-of-band function': not news."""
    return not (str(record.msg).startswith("Run out-of-band") and "_used_resources" in str(record.args))


def _as_items(value):
    return items_of(value, "?", "its dependency's output")


class _DaskMemory:
    """Cluster memory through a Dask actor; the same calls as MemoryStore, blocking."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name):
        if name.startswith("_") or name == "actor":  # unpickling looks things up before __init__
            raise AttributeError(name)
        method = getattr(self.actor, name)
        return lambda *args: method(*args).result()


# --- the backend --------------------------------------------------------------------------------

class _DaskBackend(Backend):
    kind = "dask"

    def __init__(self, executor: "DaskExecutor", client):
        self.executor = executor
        self.client = client

    # Broadcast: scattered data held by one worker alone would be lost with it, and every task
    # needing it would wait forever; replicas let Dask reschedule work after a worker dies.
    def put_context(self, ctx):
        return self.client.scatter(ctx, broadcast=True, hash=False)

    def put_function(self, fn):
        return self.client.scatter(fn, broadcast=True, hash=False)

    def put_run(self, ctx, fns):
        """The context and every stage function in one scatter: one round trip per run, not one
        per stage."""
        handles = self.client.scatter([ctx, *fns], broadcast=True, hash=False)
        return handles[0], handles[1:]

    @staticmethod
    def _key(info) -> str:
        return f"{info.stage}-{info.item if info.item is not None else 's'}-{info.run[:8]}"

    def submit(self, fn_handle, ctx_handle, info, flat_args, resources, on_done):
        worker_resources = self.executor._task_resources(resources)
        future = self.client.submit(_dask_task, fn_handle, ctx_handle, info, *flat_args, pure=False,
                                    key=self._key(info), resources=worker_resources or None)
        self._watch(future, on_done)
        return future

    def submit_many(self, ctx_handle, calls, refs):
        """Consecutive tasks with the same function, resources and argument count (a fanned-out
        stage) go to the scheduler as one ``client.map``: one graph update, not one per task."""
        start = 0
        while start < len(calls):
            fn_handle, _, flat, resources, _ = calls[start]
            end = start + 1
            while (end < len(calls) and calls[end][0] is fn_handle and calls[end][3] == resources
                   and len(calls[end][2]) == len(flat)):
                end += 1
            group = calls[start:end]
            if len(group) == 1:
                _, info, flat_args, resources, on_done = group[0]
                refs.append(self.submit(fn_handle, ctx_handle, info, flat_args, resources, on_done))
            else:
                n = len(group)
                columns = [[call[2][i] for call in group] for i in range(len(flat))]
                worker_resources = self.executor._task_resources(resources)
                futures = self.client.map(_dask_task, [fn_handle] * n, [ctx_handle] * n,
                                          [call[1] for call in group], *columns, pure=False,
                                          key=[self._key(call[1]) for call in group],
                                          resources=worker_resources or None)
                for future, call in zip(futures, group):
                    self._watch(future, call[4])
                refs.extend(futures)
            start = end

    @staticmethod
    def _watch(future, on_done) -> None:
        def done(f):
            if f.status == "finished":
                on_done(Outcome(True, f, end=time.time()))
            elif f.status == "error":
                try:
                    exc = f.exception()
                except Exception as err:  # the scheduler went away
                    exc = err
                on_done(Outcome(False, error=exc, end=time.time()))
            elif f.status == "lost":
                on_done(Outcome(False, error=RuntimeError("the task's data was lost: a Dask worker died"),
                                end=time.time()))

        future.add_done_callback(done)

    def split(self, handle):
        seq = self.client.submit(_as_items, handle, pure=False)
        count = self.client.submit(len, seq, pure=False).result()
        return [(("i", k), seq) for k in range(count)]

    def fetch(self, handle):
        return handle.result()

    def fetch_many(self, handles):
        return self.client.gather(handles)

    def cancel(self, task_refs):
        if task_refs:
            self.client.cancel(list(task_refs), force=True)


class DaskExecutor(Executor):
    """Runs stages on Dask: a LocalCluster it owns, or a running cluster (``cluster_address``).

    Workers advertise ``cpus`` (threads), ``gpus`` and custom ``resources`` as in Flowdapt, so
    stage resources restrict where tasks run. ``cpus: auto`` is one worker per usable core.

    >>> ex = DaskExecutor(cpus=2, threads=1).start()   # doctest: +SKIP
    >>> ex.info()["dashboard_url"]                     # doctest: +SKIP
    'http://127.0.0.1:8787/status'
    """

    kind = "dask"
    Config = DaskConfig

    def __init__(self, _config=None, _compute=None, **fields):
        super().__init__(_config, _compute, **fields)
        self.client = None
        self.cluster = None
        self._memory = None
        self._advertised: set[str] = set()

    # --- lifecycle ---
    def _open(self):
        from distributed import Client, LocalCluster
        c = self.config
        try:
            if self.owns_cluster:
                n_workers = usable_cores() if c.cpus == "auto" else int(c.cpus)
                threads = 1 if c.threads == "auto" else int(c.threads)
                gpus = {"disabled": 0, "auto": gpu_count()}.get(c.gpus, c.gpus)
                worker_resources = {"cpus": threads, **({"gpus": gpus} if gpus else {}), **c.resources}
                dashboard = f"{c.scheduler_host}:{c.dashboard_port}" if c.dashboard_port is not None \
                    else f"{c.scheduler_host}:0"
                self._step("starting the Dask scheduler, its dashboard and the workers")
                self.cluster = LocalCluster(
                    n_workers=0 if c.adaptive else n_workers, threads_per_worker=threads,
                    memory_limit=parse_bytes(c.memory) if c.memory != "auto" else "auto",
                    host=c.scheduler_host, scheduler_port=c.scheduler_port, dashboard_address=dashboard,
                    protocol=f"{c.scheduler_scheme}://", processes=True, resources=worker_resources,
                    env=dict(c.env_vars), silence_logs=logging.ERROR)
                if c.adaptive:
                    self.cluster.adapt(minimum=1, maximum=n_workers)
                self._step("connecting the client to the new cluster")
                self.client = Client(self.cluster, timeout=c.connect_timeout, set_as_default=False)
                if c.adaptive:
                    self.client.wait_for_workers(1, timeout=60)
            else:
                self._step(f"connecting to the Dask scheduler at {c.cluster_address}")
                ensure_reachable("Dask", c.cluster_address, 8786, c.connect_timeout)
                self.client = Client(c.cluster_address, timeout=c.connect_timeout, set_as_default=False)
            actor_future = self.client.submit(MemoryStore, actor=True, pure=False)
            actor = actor_future.result()
            actor._client, actor._future = self.client, actor_future  # our client is not the default one
            self._memory = _DaskMemory(actor)
            self.client.subscribe_topic(EVENT_TOPIC, self._on_task_event)
            self.client.subscribe_topic(OUTPUT_TOPIC, self._on_output)
            self.client.forward_logging()
        except BaseException:
            self._close_quietly()
            raise
        return _DaskBackend(self, self.client)

    def _close_quietly(self) -> None:
        client, cluster = self.client, self.cluster
        self.client = self.cluster = None
        self._memory = None
        for thing in (client, cluster):
            if thing is not None:
                try:
                    thing.close()
                except Exception:
                    pass

    def _shutdown(self):
        if self.client is not None and self._memory is not None and not self.owns_cluster:
            try:
                self.client.cancel([self._memory.actor._future] if hasattr(self._memory.actor, "_future") else [])
            except Exception:
                pass
        self._close_quietly()

    # --- worker events ---
    def _on_task_event(self, event) -> None:
        _, batch = event
        for one in batch if isinstance(batch, (list, tuple)) else [batch]:  # a batch (msgpack: a tuple) or one
            self._on_worker_event(one)

    def _on_output(self, event) -> None:
        _, msg = event
        stream = sys.stdout if msg["stream"] == "stdout" else sys.stderr
        where = msg["stage"] + (f"[{msg['item']}]" if msg.get("item") is not None else "")
        print(f"({where} {msg['worker']}) {msg['line']}", file=stream)

    # --- resources ---
    def _worker_infos(self) -> dict:
        return self.client.scheduler_info(n_workers=-1)["workers"] if self.client is not None else {}

    def _recent_worker_infos(self, max_age: float = 1.0) -> dict:
        """Worker infos at most ``max_age`` s old: checking a run's stages asks the scheduler
        once, not once per stage."""
        now = time.monotonic()
        stamp, infos = getattr(self, "_infos_cache", (None, None))
        if stamp is None or now - stamp > max_age:
            infos = self._worker_infos()
            self._infos_cache = (now, infos)
        return infos

    def _check_stage_resources(self, stage):
        workers = self._recent_worker_infos()
        if not workers and not self.config.adaptive:
            raise ConfigError("the Dask cluster has no workers", key="cluster_address")
        offered = [dict(w.get("resources") or {}) for w in workers.values()]
        soft = {"cpus": max((w.get("nthreads", 1) for w in workers.values()), default=1),
                "memory": max((w.get("memory_limit") or 0 for w in workers.values()), default=0) or float("inf")}
        check_resource_request(stage, offered, "Dask", soft)

    def _task_resources(self, resources: dict) -> dict:
        advertised = self._advertised_names()
        out = {}
        for name, amount in resources.items():
            if name in advertised and amount:
                out[name] = parse_bytes(amount) if name == "memory" else amount
        return out

    def _advertised_names(self) -> set:
        if not self._advertised:
            self._advertised = {n for w in self._worker_infos().values() for n in (w.get("resources") or {})}
        return self._advertised

    # --- info ---
    def _address(self):
        return self.client.scheduler.address if self.client is not None else None

    def _dashboard_url(self):
        try:
            return self.client.dashboard_link if self.client is not None else None
        except Exception:
            return None

    def _workers(self):
        return [{"name": addr, "nthreads": w.get("nthreads"), "memory_limit": w.get("memory_limit"),
                 "resources": dict(w.get("resources") or {})} for addr, w in self._worker_infos().items()]

    def _scheduler_used_resources(self) -> dict:
        """{worker address: resources held by its tasks now}, the scheduler's own book-keeping
        (``WorkerState.used_resources``); empty where the scheduler won't run our function."""
        log = logging.getLogger("distributed.worker")
        if _not_our_sampling not in log.filters:
            log.addFilter(_not_our_sampling)
        try:
            return self.client.run_on_scheduler(_used_resources) or {}
        except Exception:
            return {}

    def _sample(self):
        if self.client is None:
            return []
        from ..telemetry import add_up, running_requests
        now = time.time()
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        held = self._scheduler_used_resources()
        ours: dict[str, list] = {}
        for worker, request in running_requests(self):
            ours.setdefault(worker, []).append((worker, request))
        out = []
        for addr, w in info.items():
            metrics = w.get("metrics", {})
            total = dict(w.get("resources") or {})
            executing = metrics.get("task_counts", {}).get("executing", metrics.get("executing", 0)) or 0
            # in use: the scheduler's own count of what it handed out, and what our running tasks
            # hold (a stage that asks for no cpus still runs on a thread)
            mine = add_up(ours.get(addr, []))
            used = {k: max(held.get(addr, {}).get(k, 0.0), mine.get(k, 0.0), executing if k == "cpus" else 0)
                    for k in total}
            available = {k: max(0, v - used[k]) for k, v in total.items()}
            gpu = w.get("gpu") or {}
            out.append(ResourceSample(addr, now, cpu_percent=metrics.get("cpu"), memory_used=metrics.get("memory"),
                                      memory_limit=w.get("memory_limit"), resources_total=total,
                                      resources_available=available,
                                      gpu_percent=metrics.get("gpu_utilization"),
                                      gpu_memory_used=metrics.get("gpu_memory_used"),
                                      gpu_memory_limit=gpu.get("memory-total")))
        return out
