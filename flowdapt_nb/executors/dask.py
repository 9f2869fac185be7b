"""DaskExecutor: start a LocalCluster, or attach to a running scheduler by ``cluster_address``."""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import time
import traceback
import uuid
import warnings
from typing import Any

from .. import arg_layout
from ..config import DaskConfig
from ..engine import Backend, Outcome, items_of
from ..errors import ClusterLostError, ConfigError, RemoteError, UnserializableResultError
from ..events import ResourceSample
from ..memory_store import MemoryStore
from ..output_capture import RunOutputBudget
from ..units import parse_bytes, usable_cores
from ..worker import execute
from ..worker_events import ChunkWatch, EventBatch
from .base import Executor
from .cluster import apply_env, check_resource_request, ensure_reachable, gpu_count

EVENT_TOPIC = "flowdapt-nb-task"
OUTPUT_TOPIC = "flowdapt-nb-output"
CHUNK_TOPIC = "flowdapt-nb-chunk"  # one report per chunk: how each of its items ended
# Seconds a cancelled (or timed-out) task may take to return by itself before its worker is
# restarted to free the thread it holds.
RESTART_GRACE = 2.0
RESTART_TIMEOUT = 30  # seconds a worker's nanny gets to restart it
CHUNK_SECONDS = 0.05  # work per chunk once a fan-out's items turn out tiny (see Backend.chunk_seconds)
REPORT_GRACE = 2.0  # seconds a finished chunk waits for its report before the driver fetches it
PUT_PRIORITY = 100  # a run's context and functions are loaded ahead of queued tasks (Dask's default: 0)

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
_chunks = ChunkWatch(0.05)  # items of a chunk that run long are reported running all the same


class _QuietStageFailures(logging.Filter):
    """A stage's error reaches the driver with its traceback; the worker needn't log it too."""

    def filter(self, record):
        return not (str(record.msg).startswith("Compute Failed") and "_dask_task" in str(record.args))


_quiet = _QuietStageFailures()


def _on_worker(ctx):
    """This Dask worker, set up for a run's tasks (its logging filter, the run's env vars)."""
    from distributed import get_worker

    worker = get_worker()
    worker_log = logging.getLogger("distributed.worker")
    if _quiet not in worker_log.filters:
        worker_log.addFilter(_quiet)
    apply_env(ctx.config.get("env_vars") or {})
    return worker


def _call(worker, fn, ctx, info, flat, report) -> tuple[dict, object]:
    """One stage call with what it prints forwarded: (meta, value); never raises.

    Whatever the stage does, the worker survives it: ``SystemExit`` and ``KeyboardInterrupt``
    (which would end the worker process, and leave the task's future *cancelled*) come back as
    a RemoteError naming them, and a result that can't be serialized fails here, naming this
    stage, rather than later where it would be fetched."""
    from ..output_capture import capture

    def send(stream, text):
        worker.log_event(
            OUTPUT_TOPIC,
            {
                "run": info.run,
                "stage": info.stage,
                "item": info.item,
                "stream": stream,
                "text": text,
                "worker": worker.address,
            },
        )

    start = time.time()
    with capture(send):
        try:
            meta, value = execute(ctx, fn, info, flat, report, worker.address)
        except BaseException as exc:  # KeyboardInterrupt from the stage: it must not end the worker
            meta, value = (
                {
                    "ok": False,
                    "start": start,
                    "end": time.time(),
                    "worker": worker.address,
                    "error": RemoteError.standing_in_for(exc, traceback.format_exc()),
                },
                None,
            )
    if meta["ok"]:
        problem = _unserializable(value)
        if problem is not None:
            meta["ok"], meta["error"], value = (
                False,
                UnserializableResultError(type(value).__name__, problem),
                None,
            )
    return meta, value


def _dask_task(fn, ctx, info, *flat):
    """Run one stage call on a Dask worker; failures raise the stage's own exception (see
    ``_call`` for what the worker survives)."""
    worker = _on_worker(ctx)
    meta, value = _call(
        worker, fn, ctx, info, flat, lambda event: _batch.add(event, lambda b: _log(worker, b))
    )
    finished = {
        "run": info.run,
        "stage": info.stage,
        "item": info.item,
        "state": "finished" if meta["ok"] else "failed",
        "time": meta["end"],
        "start": meta["start"],
        "end": meta["end"],
        "worker": worker.address,
    }
    _batch.drop(finished)
    _log(worker, finished)
    if not meta["ok"]:
        error = meta["error"]
        if not isinstance(error, Exception):  # SystemExit raised here would end the worker
            error = RemoteError.standing_in_for(error, getattr(error, "remote_traceback", None))
        raise error
    return value


def _dask_task_picked(fn, ctx, info, picks, *sources):
    """``_dask_task`` for a task whose arguments include items of chunks: Dask moves each chunk
    here once, and the items are picked out on this worker."""
    return _dask_task(fn, ctx, info, *picks.unpack(sources))


def _dask_chunk(fn, ctx, spec, *sources):
    """Several calls of one stage, one after another, on one worker: a chunk is one Dask task,
    so tiny items pay Dask's per-task cost once per chunk, not once each.

    Returns (values, report): the items' values in order (None where an item failed), and the
    report that also goes to the driver at once on ``CHUNK_TOPIC`` (it says how each item
    ended, with its timings and its own error). A failing item never fails the chunk: the
    chunk's future fails only when the chunk as a whole does (its worker died), and the engine
    then sends its items again one by one."""
    worker = _on_worker(ctx)
    flat = spec.picks.unpack(sources)
    report = _chunks.open(lambda batch: _log(worker, batch))
    metas, values, pos = [], [], 0
    try:
        for info, count in zip(spec.infos, spec.counts):
            meta, value = _call(worker, fn, ctx, info, flat[pos : pos + count], report)
            pos += count
            metas.append((meta["start"], meta["end"], None if meta["ok"] else _pickled_error(meta["error"])))
            values.append(value)
    finally:
        _chunks.close(report)
    blob = pickle.dumps(metas, protocol=5)
    try:
        worker.log_event(CHUNK_TOPIC, {"key": spec.key, "worker": worker.address, "metas": blob})
    except Exception:  # the driver then asks for the report itself (see _DaskBackend._late_report)
        pass
    return values, blob


def _chunk_report(chunk) -> bytes:
    """A finished chunk's report, fetched when its CHUNK_TOPIC message did not come."""
    return chunk[1]


def _pick(chunk, pos):
    """One item of a chunk as a future of its own (for ``split``)."""
    return chunk[0][pos]


def _pickled_error(error: BaseException) -> bytes:
    """An item's error for the chunk's report, pickled alone: one error the driver can't load
    (its class is not importable there) spoils no other item's."""
    import cloudpickle

    try:
        return cloudpickle.dumps(error)
    except Exception:
        return cloudpickle.dumps(RemoteError.standing_in_for(error, getattr(error, "remote_traceback", None)))


class _Picks:
    """Where each argument of a task comes from: (source index, position in that chunk's
    values, or None for the source itself). Sources are the distinct futures the task gets,
    so a chunk that many items come from travels once. Dask does not look inside this object
    (a list of tuples it would walk item by item)."""

    __slots__ = ("picks",)

    def __init__(self, picks: list):
        self.picks = picks

    def unpack(self, sources) -> list:
        return [sources[i] if pos is None else sources[i][0][pos] for i, pos in self.picks]


class _ChunkSpec:
    """What a chunk runs: its key (for its report), each item's TaskInfo and argument count,
    and where the arguments come from. Opaque to Dask, which would otherwise walk every
    TaskInfo looking for futures."""

    __slots__ = ("key", "infos", "counts", "picks")

    def __init__(self, key: str, infos: list, counts: list, picks: _Picks):
        self.key, self.infos, self.counts, self.picks = key, infos, counts, picks


class _Item:
    """The handle of an item that ran in a chunk: the chunk's future and the item's position.
    Consumers get the chunk's future as an argument and pick the item out on their own worker
    (``_Picks``); nothing passes through the driver unless the driver needs the value."""

    __slots__ = ("future", "pos")

    def __init__(self, future, pos: int):
        self.future, self.pos = future, pos


def _pack(flat: list) -> tuple[_Picks, list]:
    """Task arguments (futures and chunk items) as (picks, distinct source futures)."""
    sources: list = []
    index: dict = {}
    picks = []
    for arg in flat:
        item = isinstance(arg, _Item)
        future = arg.future if item else arg
        key = getattr(future, "key", None)
        i = index.get(key) if key is not None else None
        if i is None:
            i = len(sources)
            sources.append(future)
            if key is not None:
                index[key] = i
        picks.append((i, arg.pos if item else None))
    return _Picks(picks), sources


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


def _loaded(blob: bytes):
    """On a worker: a run's context or stage function, from the bytes the driver sent."""
    return pickle.loads(blob)


def _task_call(fn_handle, ctx_handle, info, flat) -> tuple:
    """(task function, its arguments) for one lone task: items of chunks among the arguments go
    as their chunks' futures, picked out on the worker."""
    if any(isinstance(arg, _Item) for arg in flat):
        picks, sources = _pack(flat)
        return _dask_task_picked, (fn_handle, ctx_handle, info, picks, *sources)
    return _dask_task, (fn_handle, ctx_handle, info, *flat)


def _loaded_error(blob: bytes) -> BaseException:
    """An item's error from its chunk's report; a RemoteError when its class can't be loaded here."""
    try:
        return pickle.loads(blob)
    except Exception as exc:
        return RemoteError("Exception", f"an error whose class can't be loaded in the driver ({exc})")


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


MEMORY_CALL_TIMEOUT = 60.0  # seconds a cluster memory call may take (a large put over a slow link)


class _DaskMemory:
    """Cluster memory through a Dask actor; the same calls as MemoryStore, blocking."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name):
        if name.startswith("_") or name == "actor":  # unpickling looks things up before __init__
            raise AttributeError(name)
        method = getattr(self.actor, name)
        return lambda *args: self._answer(method(*args), name)

    def _answer(self, future, name: str):
        """An actor call's answer, waited for at most MEMORY_CALL_TIMEOUT: a call to an actor
        whose worker died never answers (Dask logs the lost connection, the caller waits on)."""
        try:
            return future.result(timeout=MEMORY_CALL_TIMEOUT)
        except TimeoutError as exc:
            raise ConnectionError(
                f"cluster memory did not answer {name}() within {MEMORY_CALL_TIMEOUT:g} s: its Dask "
                f"worker {getattr(self.actor, '_address', '?')} is gone or stuck (the next run gets "
                f"a new, empty one when the worker has left)"
            ) from exc


# --- the backend --------------------------------------------------------------------------------


class _DaskBackend(Backend):
    kind = "dask"

    def __init__(self, executor: DaskExecutor, client):
        self.executor = executor
        self.client = client
        self.address = client.scheduler.address if client.scheduler is not None else "?"
        self.stoppers: set[threading.Thread] = set()
        # Tiny items go in chunks of about this much work: a Dask task costs the driver's
        # scheduler and the worker ~1-3 ms, about as much as a raw client.map item.
        self.chunk_seconds = CHUNK_SECONDS
        self.parallelism = 1  # worker threads, read at each run's start (sizes chunks)
        # Chunks sent and not yet reported to the engine; each chunk's report (its CHUNK_TOPIC
        # message), kept when it comes before the future's completion, as it normally does; and
        # chunks whose future finished first, waiting for their report.
        self._sent: set = set()
        self._reports: dict = {}
        self._late: dict = {}
        self._chunk_lock = threading.Lock()
        # (run, stage, item) -> (start, end, worker) from a lone task's own 'finished' report,
        # which reaches the driver just before the future's completion: the engine sizes chunks
        # from these timings.
        self._timings: dict = {}

    def put_run(self, ctx, fns):
        """The run's context and stage functions as tasks of their own (one graph update),
        not scattered data: a scattered value whose last copy is lost with its worker is gone
        for good (Dask's memory manager keeps one copy where tasks need it), and every task that
        needs it is cancelled; a task's result Dask computes again on a survivor. They go as
        pickled bytes, so the scheduler, which loads every graph, needs none of the user's
        modules, and run first (priority) on whichever worker is free. Waits while a worker
        restarts to free a cancelled task's thread."""
        for stopper in list(self.stoppers):
            stopper.join(RESTART_GRACE + RESTART_TIMEOUT + 5)
        import cloudpickle

        tag = f"{ctx.run.uid[:8]}-{uuid.uuid4().hex[:6]}"
        keys = [f"run-context-{tag}", *(f"stage-function-{i}-{tag}" for i in range(len(fns)))]
        blobs = [cloudpickle.dumps(value, protocol=5) for value in (ctx, *fns)]
        try:
            with warnings.catch_warnings():  # a big run input is no news to the user who gave it
                warnings.filterwarnings("ignore", message="Sending large graph")
                handles = self.client.map(_loaded, blobs, key=keys, pure=False, priority=PUT_PRIORITY)
        except Exception as exc:
            self._raise_lost_cluster(exc)
            raise
        try:  # the run's stages were just checked against the workers: this is a cached look
            infos = self.executor._recent_worker_infos(5.0)
            self.parallelism = max(1, sum(int(w.get("nthreads") or 1) for w in infos.values()))
        except Exception:
            pass
        return handles[0], handles[1:]

    def release_run(self, ctx_handle, fn_handles) -> None:
        """The run's context and functions go now, not whenever their futures are
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
        func, args = _task_call(fn_handle, ctx_handle, info, flat_args)
        future = self.client.submit(
            func, *args, pure=False, key=self._key(info), resources=worker_resources or None
        )
        self._watch(future, on_done, info)
        return future

    def submit_many(self, ctx_handle, calls, refs):
        """Consecutive tasks with the same function, resources and argument count (a fanned-out
        stage) go to the scheduler as one ``client.map``: one graph update, not one per task."""
        prepared = [
            (*_task_call(fn_handle, ctx_handle, info, flat), fn_handle, info, resources, on_done)
            for fn_handle, info, flat, resources, on_done in calls
        ]
        start = 0
        while start < len(prepared):
            func, args, fn_handle, _, resources, _ = prepared[start]
            end = start + 1
            while (
                end < len(prepared)
                and prepared[end][0] is func
                and prepared[end][2] is fn_handle
                and prepared[end][4] == resources
                and len(prepared[end][1]) == len(args)
            ):
                end += 1
            group = prepared[start:end]
            worker_resources = self.executor._task_resources(resources)
            if len(group) == 1:
                futures = [
                    self.client.submit(
                        func,
                        *args,
                        pure=False,
                        key=self._key(group[0][3]),
                        resources=worker_resources or None,
                    )
                ]
            else:
                columns = [[call[1][i] for call in group] for i in range(len(args))]
                futures = self.client.map(
                    func,
                    *columns,
                    pure=False,
                    key=[self._key(call[3]) for call in group],
                    resources=worker_resources or None,
                )
            for future, call in zip(futures, group):
                self._watch(future, call[5], call[3])
            refs.extend(futures)
            start = end

    def submit_chunk(self, fn_handle, ctx_handle, tasks, resources, on_done):
        """One Dask task runs the items one after another (``_dask_chunk``); each item's outcome
        comes from the chunk's report, and an item's value stays in the chunk's result on its
        worker (its handle is an ``_Item``)."""
        infos = [info for info, _ in tasks]
        first = infos[0]
        key = f"{first.stage}-{first.item}+{len(infos)}-{first.run[:8]}"
        picks, sources = _pack([arg for _, args in tasks for arg in args])
        spec = _ChunkSpec(key, infos, [len(args) for _, args in tasks], picks)
        worker_resources = self.executor._task_resources(resources)
        with self._chunk_lock:
            self._sent.add(key)
        try:
            future = self.client.submit(
                _dask_chunk,
                fn_handle,
                ctx_handle,
                spec,
                *sources,
                pure=False,
                key=key,
                resources=worker_resources or None,
            )
        except BaseException:
            with self._chunk_lock:
                self._sent.discard(key)
            raise
        future.add_done_callback(lambda f: self._chunk_done(f, on_done))
        return future

    def _chunk_done(self, future, on_done) -> None:
        """A chunk's future ended: its items' outcomes (from its report) or, when the chunk
        failed as a whole, the error; the engine then sends the items again one by one."""
        key = future.key
        if future.status != "finished":
            with self._chunk_lock:
                self._sent.discard(key)
                self._reports.pop(key, None)
            on_done.failed(self._failure(future))
            return
        with self._chunk_lock:
            report = self._reports.pop(key, None)
            if report is None:
                self._late[key] = (future, on_done)
            else:
                self._sent.discard(key)
        if report is None:  # not in yet (it normally comes first): wait a moment, then ask for it
            timer = threading.Timer(REPORT_GRACE, self._late_report, (key,))
            timer.daemon = True
            timer.start()
            return
        on_done.done(self._outcomes(future, report["metas"], report["worker"]))

    def _on_chunk_report(self, msg: dict) -> None:
        """A chunk's report from its worker (CHUNK_TOPIC): kept until its future completes, or,
        when the future completed first, handed on now. Reports of chunks this backend did not
        send (another client's, on a shared cluster) are ignored."""
        key = msg.get("key")
        with self._chunk_lock:
            if key not in self._sent:
                return
            late = self._late.pop(key, None)
            if late is None:
                self._reports[key] = msg
                return
            self._sent.discard(key)
        future, on_done = late
        on_done.done(self._outcomes(future, msg["metas"], msg["worker"]))

    def _late_report(self, key) -> None:
        """A finished chunk whose report never came: ask its worker for the copy in its result."""
        with self._chunk_lock:
            late = self._late.pop(key, None)
            self._sent.discard(key)
        if late is None:
            return
        future, on_done = late
        try:
            blob = self.client.submit(_chunk_report, future, pure=False).result(timeout=60)
            who = self.client.who_has([future]).get(key) or ["?"]
        except Exception as exc:
            on_done.failed(self._lost_cluster(exc) or exc)
            return
        on_done.done(self._outcomes(future, blob, who[0]))

    def _outcomes(self, future, blob: bytes, worker: str) -> list:
        outcomes = []
        for pos, (start, end, error) in enumerate(pickle.loads(blob)):
            if error is None:
                outcomes.append(Outcome(True, _Item(future, pos), None, start, end, worker))
            else:
                outcomes.append(Outcome(False, None, _loaded_error(error), start, end, worker))
        return outcomes

    def _failure(self, future) -> BaseException:
        """Why a future ended without a result (error, lost data, cancelled)."""
        status = future.status
        if status == "error":
            try:
                exc = future.exception()
            except Exception as err:  # the scheduler went away
                exc = err
            return self._lost_cluster(exc) or exc
        if status == "lost":
            return RuntimeError("the task's data was lost: a Dask worker died")
        return self._cancelled_error(future)  # by Dask (lost scheduler, lost inputs) or by us

    def _watch(self, future, on_done, info) -> None:
        """Every way a future ends reaches the engine: finished, error, lost, cancelled; with
        the task's timings from its worker when its report came first (it normally does)."""
        key = (info.run, info.stage, info.item)

        def done(f):
            start, end, worker = self._timings.pop(key, None) or (None, time.time(), None)
            if f.status == "finished":
                on_done(Outcome(True, f, None, start, end, worker))
            elif f.status == "error":  # the stage's own error: Dask's exception is the stage's
                try:
                    exc = f.exception()
                except Exception as err:  # the scheduler went away
                    exc = err
                on_done(Outcome(False, error=exc, start=start, end=end, worker=worker))
            else:
                on_done(Outcome.failure(self._failure(f)))

        future.add_done_callback(done)

    def _note_timing(self, event: dict) -> None:
        """A lone task's 'finished' or 'failed' report: its timings, for its outcome."""
        if len(self._timings) > 100_000:  # reports whose futures never completed here
            self._timings.clear()
        self._timings[(event["run"], event["stage"], event["item"])] = (
            event.get("start"),
            event.get("end"),
            event.get("worker"),
        )

    def _cancelled_error(self, future) -> BaseException:
        cancelled = getattr(getattr(future, "_state", None), "exception", None)
        lost = self._lost_cluster(cancelled)
        if lost is not None:
            return lost
        reason = getattr(cancelled, "reason", None) or "unknown"
        detail = getattr(cancelled, "msg", None)
        restarted = self.executor.restarts and time.time() - self.executor.restarts[-1]["time"] < 120
        return RuntimeError(
            f"Dask cancelled this task (reason: {reason}"
            + (f": {detail}" if detail else "")
            + "); a worker it needed died or its "
            "inputs were lost"
            + (
                "; a worker was restarted just before to stop a task that timed out or was cancelled"
                if restarted
                else ""
            )
        )

    def split(self, handle):
        if isinstance(handle, _Item):
            handle = self.client.submit(_pick, handle.future, handle.pos, pure=False)
        seq = self.client.submit(_as_items, handle, pure=False)
        try:
            count = self.client.submit(len, seq, pure=False).result()
        except Exception as exc:
            self._raise_lost_cluster(exc)
            raise
        return [(arg_layout.item(k), seq) for k in range(count)]

    def fetch(self, handle):
        return self.fetch_many([handle])[0]

    def fetch_many(self, handles):
        """Values to the driver: each chunk that items come from travels once, whole."""
        futures: dict = {}
        for h in handles:
            future = h.future if isinstance(h, _Item) else h
            futures.setdefault(future.key, future)
        try:
            values = dict(zip(futures, self.client.gather(list(futures.values()))))
        except Exception as exc:
            self._raise_lost_cluster(exc)
            raise
        return [values[h.future.key][0][h.pos] if isinstance(h, _Item) else values[h.key] for h in handles]

    def _raise_lost_cluster(self, exc: BaseException) -> None:
        """Raise a ClusterLostError (caused by ``exc``) when ``exc`` says the scheduler went away."""
        lost = self._lost_cluster(exc)
        if lost is not None:
            raise lost from exc

    def _lost_cluster(self, exc: BaseException | None) -> ClusterLostError | None:
        """A ClusterLostError for an exception that says the scheduler went away, else None."""
        if getattr(exc, "reason", None) == "scheduler-connection-lost" or self.client.status in (
            "closing",
            "closed",
        ):
            return ClusterLostError(
                f"lost the Dask scheduler at {self.address}: the run can't finish, its tasks and data "
                f"were on that cluster; start the scheduler again, then close() and start() the executor"
            )
        return None

    def cancel(self, task_refs):
        """Cancel the tasks and give their worker threads back: in the background (the engine
        never waits), a task still running ``RESTART_GRACE`` s later has its worker restarted by
        its nanny (a thread can't be stopped any other way)."""
        futures = list({f.key: f for f in task_refs if f is not None}.values())  # a chunk's items share one
        if not futures:
            return
        stopper = threading.Thread(
            target=self._stop, args=(futures,), name="flowdapt-nb-dask-stop", daemon=True
        )
        self.stoppers.add(stopper)
        stopper.start()

    def _stop(self, futures) -> None:
        try:
            keys = {f.key for f in futures}
            self.client.cancel(futures, force=True, reason="flowdapt-nb run ended (timeout or cancel)")
            deadline = time.monotonic() + RESTART_GRACE
            stuck: dict = {}
            while True:
                stuck = {
                    w: ks
                    for w, ks in self.client.run(_running_keys, keys, on_error="return").items()
                    if isinstance(ks, list) and ks
                }
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
    tls = (c.cluster_address or "").startswith("tls://")
    if given and not tls:
        name = next(iter(given))
        raise ConfigError(
            f"'{name}' is set but cluster_address '{c.cluster_address}' is not tls://...",
            key=name,
            hint="write the scheduler's address as tls://HOST:PORT",
        )
    if not tls:
        return None
    missing = [n for n in ("tls_ca_file", "tls_client_cert") if n not in given]
    if missing:
        raise ConfigError(
            f"cluster_address '{c.cluster_address}' uses TLS but '{missing[0]}' is not set",
            key=missing[0],
            hint="give tls_ca_file, tls_client_cert and tls_client_key (PEM file paths)",
        )
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
    config: DaskConfig

    def __init__(self, _config=None, _compute=None, **fields):
        super().__init__(_config, _compute, **fields)
        self.client = None
        self.cluster = None
        self._memory = None
        self._memory_lock = threading.Lock()  # one replacement of a departed cluster memory at a time
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
                    raise ConfigError(
                        f"'{tls_set[0]}' is for attaching to a TLS scheduler but no cluster_address is set",
                        key=tls_set[0],
                        hint="give cluster_address: tls://HOST:PORT",
                    )
                n_workers = usable_cores() if c.cpus == "auto" else int(c.cpus)
                threads = 1 if c.threads == "auto" else int(c.threads)
                gpus = {"disabled": 0, "auto": gpu_count()}.get(c.gpus, c.gpus)
                worker_resources = {"cpus": threads, **({"gpus": gpus} if gpus else {}), **c.resources}
                dashboard = (
                    f"{c.scheduler_host}:{c.dashboard_port}"
                    if c.dashboard_port is not None
                    else f"{c.scheduler_host}:0"
                )
                self._step("starting the Dask scheduler, its dashboard and the workers")
                self.cluster = LocalCluster(
                    n_workers=0 if c.adaptive else n_workers,
                    threads_per_worker=threads,
                    memory_limit=parse_bytes(c.memory) if c.memory != "auto" else "auto",
                    host=c.scheduler_host,
                    scheduler_port=c.scheduler_port,
                    dashboard_address=dashboard,
                    protocol=f"{c.scheduler_scheme}://",
                    processes=True,
                    resources=worker_resources,
                    env=dict(c.env_vars),
                    silence_logs=logging.ERROR,
                )
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
                    self.client = Client(
                        c.cluster_address,
                        timeout=c.connect_timeout,
                        set_as_default=False,
                        **({"security": security} if security is not None else {}),
                    )
                except (OSError, TypeError) as exc:
                    if security is None:
                        raise
                    # a refused handshake fails at once; say which address and which settings to check
                    raise ConnectionError(
                        f"no TLS connection to the Dask scheduler at cluster_address '{c.cluster_address}' "
                        f"within {c.connect_timeout:g} s ({exc}); check the certificate settings tls_ca_file, "
                        f"tls_client_cert and tls_client_key: the client certificate must be signed by a CA "
                        f"the scheduler trusts, and tls_ca_file must be the CA that signed the scheduler's"
                    ) from None
            if not self.owns_cluster:
                # the cluster memory's actor needs a worker: a scheduler whose workers are still
                # joining (or one with a no-workers-timeout) would fail or hold the start here
                self._step("waiting for a Dask worker to join")
                try:
                    self.client.wait_for_workers(1, timeout=c.connect_timeout)
                except Exception:  # an adaptive cluster may start workers only once a task comes
                    pass
            self._step("starting cluster memory (a Dask actor)")
            self._memory = self._new_memory_store()
            self.client.subscribe_topic(EVENT_TOPIC, self._on_task_event)
            self.client.subscribe_topic(OUTPUT_TOPIC, self._on_output)
            self.client.subscribe_topic(CHUNK_TOPIC, self._on_chunk_report)
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
                self.client.cancel(
                    [self._memory.actor._future] if hasattr(self._memory.actor, "_future") else []
                )
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
        backend = self._backend if isinstance(self._backend, _DaskBackend) else None
        for one in (
            batch if isinstance(batch, (list, tuple)) else [batch]
        ):  # a batch (msgpack: a tuple) or one
            if one.get("state") != "running" and backend is not None and one.get("run") in self._active:
                backend._note_timing(one)
            self._on_worker_event(one)

    def _on_chunk_report(self, event) -> None:
        backend = self._backend
        if isinstance(backend, _DaskBackend):
            backend._on_chunk_report(event[1])

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
        record: dict[str, Any] = {
            "time": time.time(),
            "tasks": sorted(k for ks in stuck.values() for k in ks),
            "workers": {a: "restarting" if a in nannied else "left running: no nanny" for a in addresses},
        }
        self.restarts.append(record)
        del self.restarts[:-20]
        logger.warning(
            "restarting Dask worker(s) %s: tasks %s still ran after being cancelled%s",
            ", ".join(nannied) or "(none)",
            ", ".join(record["tasks"]),
            "".join(
                f"; {a} has no nanny, its thread stays busy until the stage returns"
                for a in addresses
                if a not in nannied
            ),
        )
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
        if actor_worker in nannied and self.client is client:
            self._replace_memory(memory, str(actor_worker), "restarted")

    def _replace_memory(self, old, worker: str, what: str) -> None:
        """A new, empty cluster memory in place of ``old``, whose worker is gone, said in a
        warning (a call to an actor whose worker is gone never answers). Once: a second caller
        that saw the same ``old`` finds it replaced already."""
        with self._memory_lock:
            if self._memory is not old:
                return
            try:
                self._memory = self._new_memory_store()
                logger.warning("the cluster memory was on %s Dask worker %s; it starts empty", what, worker)
            except Exception as exc:
                logger.warning(
                    "the cluster memory was on %s Dask worker %s and could not be made again: %s",
                    what,
                    worker,
                    exc,
                )

    def _worker_memory_handle(self):
        """The cluster memory a run's stages reach; one whose worker left the cluster (killed, out
        of memory, scaled down) is replaced first, or the run's first call to it would wait (up to
        MEMORY_CALL_TIMEOUT). The worker list is the one the run's resource check just read."""
        memory = self._memory
        worker = getattr(getattr(memory, "actor", None), "_address", None)
        if worker is not None and self.client is not None:
            try:
                infos = self._recent_worker_infos()
            except Exception:  # a scheduler not answering is the run's to find, not this check's
                infos = {}
            if infos and worker not in infos:
                self._replace_memory(memory, worker, "departed")
        return self._memory

    def _new_memory_store(self) -> _DaskMemory:
        actor_future = self.client.submit(MemoryStore, actor=True, pure=False)
        actor = actor_future.result(timeout=MEMORY_CALL_TIMEOUT)
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
        stamp, infos = getattr(self, "_infos_cache", (None, {}))
        if stamp is None or now - stamp > max_age:
            infos = self._worker_infos()
            self._infos_cache = (now, infos)
        return infos

    def _check_stage_resources(self, stage):
        workers = self._recent_worker_infos()
        if not workers and not self.config.adaptive:
            workers = self._wait_for_workers()
        if not workers and not self.config.adaptive:
            raise ConfigError(
                f"the Dask cluster has no workers (none joined within connect_timeout, "
                f"{self.config.connect_timeout:g} s)",
                key="cluster_address",
            )
        offered = [dict(w.get("resources") or {}) for w in workers.values()]
        soft = {
            "cpus": max((w.get("nthreads", 1) for w in workers.values()), default=1),
            "memory": max((w.get("memory_limit") or 0 for w in workers.values()), default=0) or float("inf"),
        }
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
        return [
            {
                "name": addr,
                "nthreads": w.get("nthreads"),
                "memory_limit": w.get("memory_limit"),
                "resources": dict(w.get("resources") or {}),
            }
            for addr, w in self._worker_infos().items()
        ]

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
            used = {
                k: max(held.get(addr, {}).get(k, 0.0), mine.get(k, 0.0), executing if k == "cpus" else 0)
                for k in total
            }
            available = {k: max(0, v - used[k]) for k, v in total.items()}
            gpu = w.get("gpu") or {}
            out.append(
                ResourceSample(
                    addr,
                    now,
                    cpu_percent=metrics.get("cpu"),
                    memory_used=metrics.get("memory"),
                    memory_limit=w.get("memory_limit"),
                    resources_total=total,
                    resources_available=available,
                    gpu_percent=metrics.get("gpu_utilization"),
                    gpu_memory_used=metrics.get("gpu_memory_used"),
                    gpu_memory_limit=gpu.get("memory-total"),
                )
            )
        return out
