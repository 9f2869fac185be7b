"""DaskExecutor: start a LocalCluster, or attach to a running scheduler by ``cluster_address``."""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import time
import traceback

from ..config import DaskConfig
from ..engine import Backend, Outcome, items_of
from ..errors import ClusterLostError, ConfigError, RemoteError, UnserializableResultError
from ..events import ResourceSample
from ..memory_store import MemoryStore
from ..output_capture import RunOutputBudget
from ..units import parse_bytes, usable_cores
from ..worker import execute
from ..worker_events import EventBatch
from .base import Executor
from .cluster import apply_env, check_resource_request, ensure_reachable, gpu_count

EVENT_TOPIC = "flowdapt-nb-task"
OUTPUT_TOPIC = "flowdapt-nb-output"
# Seconds a cancelled (or timed-out) task may take to return by itself before its worker is
# restarted to free the thread it holds.
RESTART_GRACE = 2.0
RESTART_TIMEOUT = 30  # seconds a worker's nanny gets to restart it

logger = logging.getLogger("flowdapt_nb.dask")


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
    """Run one stage call on a Dask worker; failures raise the stage's own exception.

    Whatever the stage does, the worker survives it: ``SystemExit`` and ``KeyboardInterrupt``
    (which would end the worker process, and leave the task's future *cancelled*) travel as a
    RemoteError naming them, and a result that can't be serialized fails here, naming this
    stage, rather than later where it would be fetched."""
    from distributed import get_worker
    from ..output_capture import capture
    worker = get_worker()
    worker_log = logging.getLogger("distributed.worker")
    if _quiet not in worker_log.filters:
        worker_log.addFilter(_quiet)
    apply_env(ctx.config.get("env_vars") or {})

    def send(stream, text):
        worker.log_event(OUTPUT_TOPIC, {"run": info.run, "stage": info.stage, "item": info.item,
                                        "stream": stream, "text": text, "worker": worker.address})

    start = time.time()
    with capture(send):
        try:
            meta, value = execute(ctx, fn, info, flat,
                                  lambda event: _batch.add(event, lambda b: _log(worker, b)), worker.address)
        except BaseException as exc:  # KeyboardInterrupt from the stage: it must not end the worker
            meta, value = {"ok": False, "start": start, "end": time.time(), "worker": worker.address,
                           "error": RemoteError.standing_in_for(exc, traceback.format_exc())}, None
    if meta["ok"]:
        problem = _unserializable(value)
        if problem is not None:
            meta["ok"], meta["error"], value = False, UnserializableResultError(type(value).__name__, problem), None
    finished = {"run": info.run, "stage": info.stage, "item": info.item,
                "state": "finished" if meta["ok"] else "failed", "time": meta["end"],
                "start": meta["start"], "end": meta["end"], "worker": worker.address}
    _batch.drop(finished)
    _log(worker, finished)
    if not meta["ok"]:
        error = meta["error"]
        if not isinstance(error, Exception):  # SystemExit raised here would end the worker
            error = RemoteError.standing_in_for(error, getattr(error, "remote_traceback", None))
        raise error
    return value


_PLAIN = (type(None), bool, int, float, complex, str, bytes)


def _unserializable(value) -> str | None:
    """Why ``value`` can't leave its worker, or None when it can.

    Dask serializes a result only when another worker or the driver asks for it: a result that
    can't be would fail there, as a raw TypeError naming no stage, or as the failure of the stage
    that consumes it. Checked here, it fails the stage that returned it. Pickle protocol 5 with
    out-of-band buffers copies no array data; the pickle is written nowhere."""
    if type(value) in _PLAIN:
        return None
    try:
        pickle.Pickler(_Discard(), protocol=5, buffer_callback=_out_of_band).dump(value)
        return None
    except Exception as exc:
        first = exc  # pickle's own words are the clearest ("cannot pickle '_thread.lock' object")
    from distributed.protocol import serialize
    pickle_log = logging.getLogger("distributed.protocol.pickle")
    was_disabled, pickle_log.disabled = pickle_log.disabled, True  # its traceback would say it again
    try:  # Dask's own serializers and cloudpickle (lambdas, local classes) may still manage
        serialize(value, on_error="raise")
        return None
    except Exception:
        return f"{type(first).__name__}: {first}"
    finally:
        pickle_log.disabled = was_disabled


class _Discard:
    def write(self, data) -> int:
        return len(data)


def _out_of_band(buffer) -> bool:
    return False  # leave the buffer out of the stream: nothing copies it


def _used_resources(dask_scheduler=None) -> dict:
    """On the scheduler: what each worker's running tasks hold of its resources."""
    return {addr: dict(ws.used_resources) for addr, ws in list(dask_scheduler.workers.items())}


def _not_our_sampling(record) -> bool:
    """A scheduler in this process logs each sample's call as 'Run out-of-band function': not news."""
    return not (str(record.msg).startswith("Run out-of-band") and "_used_resources" in str(record.args))


def _as_items(value):
    return items_of(value, "?", "its dependency's output")


def _end_worker_process(dask_worker=None) -> None:
    """On a worker: end its process now (its nanny starts a fresh one). A graceful close would
    wait on the thread that a cancelled stage still holds."""
    os._exit(70)


def _running_keys(keys, dask_worker=None) -> list:
    """On a worker: which of ``keys`` its threads still run (a cancelled task keeps its thread,
    and with it a slot, until the stage returns)."""
    state = dask_worker.state
    return [ts.key for ts in list(state.executing | state.long_running) if ts.key in keys]


# Workers we end on purpose: the scheduler (in this process for a LocalCluster) would log an
# ERROR for the call that ended them, which never answers.
_ending: set = set()


class _QuietEndedWorkers(logging.Filter):
    def filter(self, record):
        text = str(record.msg)
        return not (text.startswith("broadcast to ") and any(f"to {a} failed" in text for a in list(_ending)))


logging.getLogger("distributed.scheduler").addFilter(_QuietEndedWorkers())


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
        self.address = client.scheduler.address if client.scheduler is not None else "?"
        self.stoppers: set[threading.Thread] = set()

    # Broadcast: scattered data held by one worker alone would be lost with it, and every task
    # needing it would wait forever; replicas let Dask reschedule work after a worker dies.
    def put_context(self, ctx):
        return self.client.scatter(ctx, broadcast=True, hash=False)

    def put_function(self, fn):
        return self.client.scatter(fn, broadcast=True, hash=False)

    def put_run(self, ctx, fns):
        """The context and every stage function in one scatter: one round trip per run, not one
        per stage. Waits while a worker restarts to free a cancelled task's thread: data
        scattered to it now would be lost with it."""
        for stopper in list(self.stoppers):
            stopper.join(RESTART_GRACE + RESTART_TIMEOUT + 5)
        try:
            handles = self.client.scatter([ctx, *fns], broadcast=True, hash=False)
        except Exception as exc:
            raise self._lost_cluster(exc) or exc
        return handles[0], handles[1:]

    def release_run(self, ctx_handle, fn_handles) -> None:
        """The run's scattered context and functions go now, not whenever their futures are
        garbage-collected (a worker restarted later would otherwise report them lost)."""
        for future in [ctx_handle, *fn_handles]:
            try:
                future.release()
            except Exception:
                pass

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

    def _watch(self, future, on_done) -> None:
        """Every way a future ends reaches the engine: finished, error, lost, cancelled."""
        def done(f):
            status = f.status
            if status == "finished":
                on_done(Outcome(True, f, end=time.time()))
            elif status == "error":
                try:
                    exc = f.exception()
                except Exception as err:  # the scheduler went away
                    exc = err
                on_done(Outcome(False, error=exc, end=time.time()))
            elif status == "lost":
                on_done(Outcome(False, error=RuntimeError("the task's data was lost: a Dask worker died"),
                                end=time.time()))
            else:  # cancelled: by Dask (lost scheduler, lost inputs) or by us (then nobody listens)
                on_done(Outcome(False, error=self._cancelled_error(f), end=time.time()))

        future.add_done_callback(done)

    def _cancelled_error(self, future) -> BaseException:
        cancelled = getattr(getattr(future, "_state", None), "exception", None)
        lost = self._lost_cluster(cancelled)
        if lost is not None:
            return lost
        reason = getattr(cancelled, "reason", None) or "unknown"
        detail = getattr(cancelled, "msg", None)
        restarted = self.executor.restarts and time.time() - self.executor.restarts[-1]["time"] < 120
        return RuntimeError(f"Dask cancelled this task (reason: {reason}"
                            + (f": {detail}" if detail else "") + "); a worker it needed died or its "
                            "inputs were lost" + ("; a worker was restarted just before to stop a task "
                                                  "that timed out or was cancelled" if restarted else ""))

    def split(self, handle):
        seq = self.client.submit(_as_items, handle, pure=False)
        try:
            count = self.client.submit(len, seq, pure=False).result()
        except Exception as exc:
            raise self._lost_cluster(exc) or exc
        return [(("i", k), seq) for k in range(count)]

    def fetch(self, handle):
        try:
            return handle.result()
        except Exception as exc:
            raise self._lost_cluster(exc) or exc

    def fetch_many(self, handles):
        try:
            return self.client.gather(handles)
        except Exception as exc:
            raise self._lost_cluster(exc) or exc

    def _lost_cluster(self, exc: BaseException) -> ClusterLostError | None:
        """A ClusterLostError for an exception that says the scheduler went away, else None."""
        if getattr(exc, "reason", None) == "scheduler-connection-lost" or self.client.status in ("closing", "closed"):
            return ClusterLostError(
                f"lost the Dask scheduler at {self.address}: the run can't finish, its tasks and data "
                f"were on that cluster; start the scheduler again, then close() and start() the executor")
        return None

    def cancel(self, task_refs):
        """Cancel the tasks and give their worker threads back: in the background (the engine
        never waits), a task still running ``RESTART_GRACE`` s later has its worker restarted by
        its nanny (a thread can't be stopped any other way)."""
        futures = [f for f in task_refs if f is not None]
        if not futures:
            return
        stopper = threading.Thread(target=self._stop, args=(futures,), name="flowdapt-nb-dask-stop", daemon=True)
        self.stoppers.add(stopper)
        stopper.start()

    def _stop(self, futures) -> None:
        try:
            keys = {f.key for f in futures}
            self.client.cancel(futures, force=True, reason="flowdapt-nb run ended (timeout or cancel)")
            deadline = time.monotonic() + RESTART_GRACE
            stuck: dict = {}
            while True:
                stuck = {w: ks for w, ks in self.client.run(_running_keys, keys, on_error="return").items()
                         if isinstance(ks, list) and ks}
                if not stuck or time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
            if stuck:
                self.executor._restart_workers(sorted(stuck), stuck)
        except Exception as exc:  # the cluster went away, or closed under us: nothing left to stop
            logger.debug("stopping cancelled Dask tasks: %s", exc)
        finally:
            self.stoppers.discard(threading.current_thread())


_TLS_FIELDS = ("tls_ca_file", "tls_client_cert", "tls_client_key")


def _security(c: DaskConfig):
    """The ``distributed.security.Security`` for attaching to ``cluster_address``, or None (plain tcp).

    TLS fields need a ``tls://`` address, and a ``tls://`` address needs at least ``tls_ca_file``
    and ``tls_client_cert`` (a scheduler started with TLS only talks to clients that present one).
    """
    given = {name: getattr(c, name) for name in _TLS_FIELDS if getattr(c, name) is not None}
    tls = c.cluster_address.startswith("tls://")
    if given and not tls:
        name = next(iter(given))
        raise ConfigError(f"'{name}' is set but cluster_address '{c.cluster_address}' is not tls://...",
                          key=name, hint="write the scheduler's address as tls://HOST:PORT")
    if not tls:
        return None
    missing = [n for n in ("tls_ca_file", "tls_client_cert") if n not in given]
    if missing:
        raise ConfigError(f"cluster_address '{c.cluster_address}' uses TLS but '{missing[0]}' is not set",
                          key=missing[0], hint="give tls_ca_file, tls_client_cert and tls_client_key "
                                               "(PEM file paths)")
    from distributed.security import Security
    return Security(require_encryption=True, **given)


class DaskExecutor(Executor):
    """Runs stages on Dask: a LocalCluster it owns, or a running cluster (``cluster_address``).

    Workers advertise ``cpus`` (threads), ``gpus`` and custom ``resources`` as in Flowdapt, so
    stage resources restrict where tasks run. ``cpus: auto`` is one worker per usable core.

    A run that times out or is cancelled cancels its tasks; a task still running 2 s later
    (``RESTART_GRACE``) has its worker process ended, and the worker's nanny starts a fresh one
    (``ex.restarts`` lists these), so the next run doesn't wait behind it. What a stage prints
    reaches the driver in blocks, at most 1 MB per task and 10 MB per run (see
    :mod:`flowdapt_nb.output_capture`). A lost scheduler fails the run with ``ClusterLostError``.

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
        self._output_budget = RunOutputBudget()
        self.restarts: list[dict] = []  # workers restarted to free cancelled tasks' threads

    # --- lifecycle ---
    def _open(self):
        from distributed import Client, LocalCluster
        c = self.config
        try:
            if self.owns_cluster:
                tls_set = [n for n in _TLS_FIELDS if getattr(c, n) is not None]
                if tls_set:  # an owned cluster isn't started with these certificates: say so, don't ignore
                    raise ConfigError(f"'{tls_set[0]}' is for attaching to a TLS scheduler but no "
                                      f"cluster_address is set", key=tls_set[0],
                                      hint="give cluster_address: tls://HOST:PORT")
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
                security = _security(c)
                ensure_reachable("Dask", c.cluster_address, 8786, c.connect_timeout)
                try:
                    self.client = Client(c.cluster_address, timeout=c.connect_timeout, set_as_default=False,
                                         **({"security": security} if security is not None else {}))
                except (OSError, TypeError) as exc:
                    if security is None:
                        raise
                    # a refused handshake fails at once; say which address and which settings to check
                    raise ConnectionError(
                        f"no TLS connection to the Dask scheduler at cluster_address '{c.cluster_address}' "
                        f"within {c.connect_timeout:g} s ({exc}); check the certificate settings tls_ca_file, tls_client_cert "
                        f"and tls_client_key: the client certificate must be signed by a CA the scheduler "
                        f"trusts, and tls_ca_file must be the CA that signed the scheduler's") from None
            self._step("starting cluster memory (a Dask actor)")
            self._memory = self._new_memory_store()
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
        stoppers = list(getattr(self._backend, "stoppers", ()))
        self._close_quietly()
        deadline = time.monotonic() + 2  # with the client closed they end at their next call
        for stopper in stoppers:
            stopper.join(max(0.0, deadline - time.monotonic()))

    # --- worker events ---
    def _on_task_event(self, event) -> None:
        _, batch = event
        for one in batch if isinstance(batch, (list, tuple)) else [batch]:  # a batch (msgpack: a tuple) or one
            self._on_worker_event(one)

    def _on_output(self, event) -> None:
        """A block of lines a task printed: printed here, each line with its stage and worker,
        up to the run's output budget."""
        _, msg = event
        stream = sys.stdout if msg["stream"] == "stdout" else sys.stderr
        text = msg.get("text", msg.get("line", ""))
        text, note = self._output_budget.admit(msg.get("run"), text)
        where = msg["stage"] + (f"[{msg['item']}]" if msg.get("item") is not None else "")
        prefix = f"({where} {msg['worker']}) "
        if text is not None:
            stream.write("".join(f"{prefix}{line}\n" for line in text.split("\n")))
        if note is not None:
            stream.write(f"{prefix}{note}\n")

    # --- stopping stuck tasks ---
    def _restart_workers(self, addresses: list, stuck: dict) -> None:
        """End the worker processes whose threads still run cancelled tasks; their nannies start
        fresh ones, as after any worker crash, and Dask reruns elsewhere whatever else they ran.
        A worker without a nanny (``dask worker --no-nanny``) would not come back: it is left
        alone, and its thread stays busy until the stage returns. The cluster memory lives on one
        worker: when that one restarts, a new, empty store replaces it, and a warning says so.

        (``Client.restart_workers`` asks the worker to close first, which waits on the stuck
        thread; when its nanny then kills it, the worker sometimes never comes back.)"""
        client = self.client
        if client is None:
            return
        memory = self._memory
        actor_worker = getattr(getattr(memory, "actor", None), "_address", None)
        infos = client.scheduler_info(n_workers=-1)["workers"]
        before = len(infos)
        nannied = [a for a in addresses if (infos.get(a) or {}).get("nanny")]
        record = {"time": time.time(), "tasks": sorted(k for ks in stuck.values() for k in ks),
                  "workers": {a: "restarting" if a in nannied else "left running: no nanny" for a in addresses}}
        self.restarts.append(record)
        del self.restarts[:-20]
        logger.warning("restarting Dask worker(s) %s: tasks %s still ran after being cancelled%s",
                       ", ".join(nannied) or "(none)", ", ".join(record["tasks"]),
                       "".join(f"; {a} has no nanny, its thread stays busy until the stage returns"
                               for a in addresses if a not in nannied))
        if not nannied:
            return
        if len(_ending) > 256:
            _ending.clear()
        _ending.update(nannied)
        client.run(_end_worker_process, workers=nannied, on_error="return")
        # back when the old workers are gone and as many as before are registered again
        deadline = time.monotonic() + RESTART_TIMEOUT
        while True:
            now = client.scheduler_info(n_workers=-1)["workers"]
            back = len(now) >= before and not set(nannied) & set(now)
            if back or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        record["workers"].update(dict.fromkeys(nannied, "OK" if back else "timed out"))
        if actor_worker in nannied and memory is self._memory and self.client is client:
            try:
                self._memory = self._new_memory_store()
                logger.warning("the cluster memory was on restarted Dask worker %s; it starts empty",
                               actor_worker)
            except Exception as exc:
                logger.warning("the cluster memory was on restarted Dask worker %s and could not be "
                               "made again: %s", actor_worker, exc)

    def _new_memory_store(self) -> "_DaskMemory":
        actor_future = self.client.submit(MemoryStore, actor=True, pure=False)
        actor = actor_future.result()
        actor._client, actor._future = self.client, actor_future  # our client is not the default one
        return _DaskMemory(actor)

    # --- resources ---
    def _worker_infos(self) -> dict:
        if self.client is None:
            return {}
        self._wait_for_restarts()
        return self.client.scheduler_info(n_workers=-1)["workers"]

    def _wait_for_restarts(self) -> None:
        """A worker restarting to free a cancelled task's thread is away for a few seconds:
        checks of the workers (a new run's, ``info()``) wait for it rather than see it missing."""
        backend = self._backend
        for stopper in list(getattr(backend, "stoppers", ())):
            stopper.join(RESTART_GRACE + RESTART_TIMEOUT + 5)

    def _wait_for_workers(self) -> dict:
        """Workers a nanny is restarting (one that died for memory, say) come back in a few
        seconds: a run waits for them up to connect_timeout instead of failing at once."""
        deadline = time.monotonic() + self.config.connect_timeout
        while time.monotonic() < deadline:
            time.sleep(0.25)
            infos = self._worker_infos()
            if infos:
                self._infos_cache = (time.monotonic(), infos)
                return infos
        return {}

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
            workers = self._wait_for_workers()
        if not workers and not self.config.adaptive:
            raise ConfigError(f"the Dask cluster has no workers (none joined within connect_timeout, "
                              f"{self.config.connect_timeout:g} s)", key="cluster_address")
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
