"""One run loop for every executor.

The loop keeps a dependency map and launches each stage the moment its dependencies are done
(not group by group), fans parameterized stages out item by item, and collects results and
failures as backends report completions on a queue. Backends only submit, split, fetch and cancel;
everything about workflow semantics lives here, so all executors behave alike.
"""

from __future__ import annotations

import abc
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import arg_layout
from .errors import ClusterLostError, ConfigError, ExecutorClosedError, RunTimeoutError, StageError
from .events import EventBus, RunEvent, TaskEvent
from .run import WorkflowRun
from .worker import TaskInfo
from .workflow import Stage, Workflow, root_kwargs


@dataclass
class Outcome:
    """What a backend reports when a task ends."""

    ok: bool
    value: Any = None  # a backend handle (the value itself for local)
    error: BaseException | None = None
    start: float | None = None
    end: float | None = None
    worker: str | None = None

    @classmethod
    def from_report(cls, meta: dict, value: Any = None) -> Outcome:
        """The outcome a worker reported (``worker.execute``'s meta: ok, error, start, end,
        worker); ``value`` is the result's handle (kept only when the task succeeded)."""
        ok = meta["ok"]
        return cls(ok, value if ok else None, meta["error"], meta["start"], meta["end"], meta["worker"])

    @classmethod
    def failure(cls, error: BaseException) -> Outcome:
        """A task whose worker never reported (it died, its result or argument could not be
        moved, the cluster went away), ending now with ``error``."""
        return cls(False, error=error, end=time.time())


class ChunkReport:
    """How a backend reports the end of a chunk (``Backend.submit_chunk``), exactly once:
    ``done(outcomes)``, one outcome per task in order, or ``failed(error)`` when the chunk
    failed as a whole (its worker died, an argument or result could not be moved): the engine
    then sends each of its tasks again alone."""

    __slots__ = ("_put", "_group")

    def __init__(self, put: Callable[[Any], None], group: list):
        self._put, self._group = put, group

    def done(self, outcomes: list[Outcome]) -> None:
        self._put(_ChunkEnd(self._group, outcomes, None))

    def failed(self, error: BaseException) -> None:
        self._put(_ChunkEnd(self._group, None, error))


@dataclass
class _ChunkEnd:
    group: list  # the chunk's _Pending tasks
    outcomes: list[Outcome] | None  # None: the chunk failed as a whole with ``error``
    error: BaseException | None


@dataclass
class Value:
    """A simple stage's output: one backend handle."""

    handle: Any


@dataclass
class Gathered:
    """A parameterized stage's output: item handles in item order (failed items dropped)."""

    handles: list


@dataclass
class _StageRun:
    stage: Stage
    fn_handle: Any = None
    total: int | None = None
    done: int = 0
    results: dict = field(default_factory=dict)
    launched_at: float | None = None
    finished: bool = False
    waiting: int = 0  # tasks of this stage queued in the engine, not yet sent
    mean: float = 0.0  # recent seconds per task on a worker (moving average): it sizes chunks
    timed: int = 0  # tasks that reported their timings
    chunkable: bool = False  # a fan-out of one-CPU tasks on a backend that takes chunks
    last_chunk: int = 1  # size of its last chunk: the next may be at most twice that
    # Without slot limits (Ray) a chunkable fan-out's tasks wait here, not in the engine's queue,
    # and go out a few sends per worker at a time: a whole fan-out sent at once could never be
    # chunked, and its first, slow-starting tasks would not decide the rest.
    held: deque = field(default_factory=deque)
    sends: int = 0  # sends in flight (a lone task or a chunk each)


@dataclass
class _Pending:
    stage: str
    info: TaskInfo
    flat: list
    need: float
    alone: bool = False  # sent alone: its chunk failed as a whole, so each item gets its own try


class Backend(abc.ABC):
    """What an executor provides to the engine. Handles are opaque: values (local), Dask futures,
    or Ray object refs. A backend implements ``submit``, ``split`` and ``fetch``; the rest have
    defaults it may override."""

    kind = "base"
    capacity: int | None = None  # slots the engine must respect itself (local); None: the engine's own
    # One-slot tasks the backend may hold queued beyond ``capacity`` because its own workers (as
    # many as there are slots) bound how many run at once; None: no limit. Handing them over
    # early keeps workers busy instead of idle between a completion and the next submit.
    prefetch: int | None = 0
    # Seconds of work worth sending as one chunk when a fan-out's items turn out tiny: the items
    # then go to a worker together and run one after another, so the fixed cost of a round trip
    # is paid once per chunk, not per item. None: every task goes alone (see ``submit_chunk``).
    chunk_seconds: float | None = None
    # Workers that run tasks at once, for a backend without ``capacity``: sizes chunks so that
    # every worker still gets a share at the end of a stage.
    parallelism: int = 1
    # What a timeout can't do on this backend, said in the RunTimeoutError (local threads: a
    # running stage can't be stopped); None: its tasks are stopped.
    stop_note: str | None = None

    def put_context(self, ctx) -> Any:
        return ctx

    def release_run(self, ctx_handle, fn_handles: list) -> None:  # noqa: B027  (optional hook)
        """The run has ended: what ``put_run`` made for it may go."""

    def put_run(self, ctx, fns: list) -> tuple[Any, list]:
        """Handles for a run's context and its stage functions (a backend that sends them to
        the cluster in one message overrides this)."""
        return self.put_context(ctx), [self.put_function(fn) for fn in fns]

    def put_function(self, fn) -> Any:
        return fn

    @abc.abstractmethod
    def submit(
        self,
        fn_handle,
        ctx_handle,
        info: TaskInfo,
        flat_args: list,
        resources: dict,
        on_done: Callable[[Outcome], None],
    ) -> Any:
        """Send one task; call ``on_done`` once with its :class:`Outcome` (from any thread).
        Returns the task's ref (what ``cancel`` takes)."""

    def submit_many(self, ctx_handle, calls: list, refs: list) -> None:
        """Submit several tasks at once; ``calls`` holds (fn_handle, info, flat_args, resources,
        on_done) tuples. Appends each task's ref to ``refs`` as it goes out, so that what was sent
        can be cancelled if a later submission fails. Backends that can batch (one scheduler
        message for many tasks) override this."""
        for fn_handle, info, flat_args, resources, on_done in calls:
            refs.append(self.submit(fn_handle, ctx_handle, info, flat_args, resources, on_done))

    def submit_chunk(
        self, fn_handle, ctx_handle, tasks: list[tuple[TaskInfo, list]], resources: dict, on_done: ChunkReport
    ) -> Any:
        """Run several one-slot tasks of one stage on one worker, one after another; report
        their end once through ``on_done`` (:class:`ChunkReport`: ``done`` or ``failed``).
        Only called when ``chunk_seconds`` is set."""
        raise NotImplementedError(f"{type(self).__name__} sets chunk_seconds but has no submit_chunk")

    @abc.abstractmethod
    def split(self, handle) -> list[tuple[tuple, Any]]:
        """Items of a dependency output as (layout entry, flat argument) pairs (entries from
        :mod:`flowdapt_nb.arg_layout`)."""

    @abc.abstractmethod
    def fetch(self, handle) -> Any:
        """The value behind a handle, here in the driver."""

    def fetch_many(self, handles: list) -> list:
        return [self.fetch(h) for h in handles]

    def cancel(self, task_refs: list) -> None:  # noqa: B027  (optional hook)
        """Stop these tasks and give their slots back within a bounded time (cancel, grace
        period, then kill what the backend owns); must not block the engine for more than ~1 s.
        Called when a run or stage times out or is cancelled (by the user, or by ``close()``)."""

    def slots_needed(self, stage: Stage) -> float:
        return float(stage.resources.get("cpus", 1) or 0)


def a_type(value) -> str:
    """'an int', 'a str': a value's type name with its article, for messages."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def items_of(value, stage_name: str, source: str) -> list:
    """The list a parameterized stage maps over: a dict maps over its keys."""
    if isinstance(value, dict):
        return list(value.keys())
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(
            f"stage '{stage_name}' maps over {source}, which is {a_type(value)}, not a list, tuple or dict"
        )
    return list(value)


CHUNK_AFTER = 2  # finished tasks of a stage needed before its mean duration may size chunks
CHUNK_MAX = 1000  # items in one chunk at most
# Sends (lone tasks or chunks) per worker in flight for a chunkable fan-out on a backend without
# slot limits: more than its workers run at once, so none idles, few enough that what is still
# waiting can go in chunks sized by the latest timings.
SEND_DEPTH = 4
MEAN_WEIGHT = 0.2  # weight of each new timing in a stage's moving-average task duration


class Engine:
    """Runs one workflow run on a backend. Used by every executor through ``Executor.submit``."""

    def __init__(
        self,
        backend: Backend,
        events: EventBus,
        run: WorkflowRun,
        fns: dict,
        ctx,
        cancel_event,
        timeout: float | None = None,
    ):
        self.backend = backend
        self.events = events
        self.publish = events.publish
        self.run = run
        self.wf: Workflow = run.definition
        self.fns = fns
        self.ctx = ctx
        self.cancel_event = cancel_event
        self.closing = False  # set (before cancel_event) when the executor is closed under the run
        self.deadline = time.monotonic() + timeout if timeout else None
        self.timeout = timeout
        self.completions: queue.Queue = queue.Queue()
        self.ctx_handle: Any = None  # set by put_run when the run starts
        self.fn_handles: list | None = None
        self.outputs: dict[str, Any] = {}
        self.splits: dict[str, list] = {}  # stage -> its output's items, split for a fan-out
        self.stage_runs: dict[str, _StageRun] = {}
        self.inflight: dict[tuple, tuple] = {}  # (stage, item) -> (task ref, slots)
        self.waiting: deque[_Pending] = deque()
        # slots this run may use (read once: may shrink); None: the backend has no slot limit
        self.slots: float | None = backend.capacity
        self.free_slots: float | None = self.slots
        self.exact_inflight = 0  # tasks in flight that need other than one slot (no prefetch then)
        self.remaining_deps = {s.name: set(s.depends_on) for s in self.wf.stages}
        self.consumers = {s.name: 0 for s in self.wf.stages}
        for s in self.wf.stages:
            for d in s.depends_on:
                self.consumers[d] += 1
        self.terminal = [s.name for s in self.wf.terminal_stages()]
        self.cache_hits: dict = {}  # stage -> items the stage cache reuses: they end 'cached'

    # --- events ---
    def _task_event(self, stage, item, state, t=None, worker=None, error=None, start=None, end=None):
        """Record and publish a task's new state. A task that ends before its worker's 'running'
        report arrived gets its running event first (with the worker's own start time), so every
        task's events reach subscribers in order: queued, running, then how it ended."""
        t = t or time.time()
        with self.run._event_lock:
            reached_states = self.run._advance(stage, item, state, t, worker, error, start, end)
            if not reached_states or not self.events.listening_for("task"):
                return  # recorded on the run; nobody subscribes to task events
            if worker is None:  # the worker's own report may have named it
                worker = self.run._task_worker(stage, item)
            for reached in reached_states:
                if reached == state:
                    self.publish(TaskEvent(self.run.uid, stage, item, state, t, worker, error))
                else:  # the implied 'running', at the worker's start time
                    self.publish(TaskEvent(self.run.uid, stage, item, reached, start or t, worker))

    def _run_event(self, state, error=None):
        self.publish(RunEvent(self.run.uid, self.run.workflow, state, time.time(), error))

    # --- the loop ---
    def execute(self) -> None:
        run = self.run
        run._set_state("running")
        self._run_event("running")
        try:
            fns = [self.fns[s.name] for s in self.wf.stages]
            self.ctx_handle, self.fn_handles = self.backend.put_run(self.ctx, fns)
            for stage, fn_handle in zip(self.wf.stages, self.fn_handles):
                self.stage_runs[stage.name] = _StageRun(stage, fn_handle, chunkable=self._chunkable(stage))
            for stage in self.wf.stages:
                if not stage.depends_on:
                    self._launch(stage)
            self._pump()
            while not all(sr.finished for sr in self.stage_runs.values()):
                self._check_limits()
                try:
                    ended = self.completions.get(timeout=0.05)
                except queue.Empty:
                    continue
                self._take(ended)
                while True:  # drain what else is ready before pumping
                    try:
                        ended = self.completions.get_nowait()
                    except queue.Empty:
                        break
                    self._take(ended)
                self._pump()
            results = self._collect()
            run.result = results
            run._set_state("finished")
            self._run_event("finished")
        except _Cancelled:
            if self.closing:
                run.exception = ExecutorClosedError(
                    f"run {run.name}: executor closed during the run", run=run
                )
                self._abort("cancelled", "executor closed during the run")
            else:
                self._abort("cancelled", "cancelled by the user")
        except (StageError, RunTimeoutError) as exc:
            run.exception = exc
            self._abort("failed", str(exc).split("\n\n")[0])
        except BaseException as exc:  # an engine or backend fault: the run record is kept
            run.exception = exc
            self._abort("failed", f"{type(exc).__name__}: {exc}")
        finally:
            if self.fn_handles is not None:
                try:
                    self.backend.release_run(self.ctx_handle, self.fn_handles)
                except Exception:  # releasing is housekeeping: it never changes the run's outcome
                    pass

    def _check_limits(self):
        if self.cancel_event.is_set():
            raise _Cancelled()
        now = time.monotonic()
        # what a timeout can't stop on this backend (local threads), said where it happens
        note = f"; {self.backend.stop_note}" if self.backend.stop_note and self.inflight else ""
        if self.deadline and now > self.deadline:
            raise RunTimeoutError(f"run {self.run.name} timed out after {self.timeout} s{note}", run=self.run)
        for sr in self.stage_runs.values():
            limit = sr.stage.timeout
            if limit and sr.launched_at and not sr.finished and now - sr.launched_at > limit:
                raise RunTimeoutError(
                    f"stage '{sr.stage.name}' timed out after {limit} s (options.timeout){note}",
                    run=self.run,
                    stage=sr.stage.name,
                )

    def _abort(self, state: str, message: str) -> None:
        refs = [ref for ref, _ in self.inflight.values() if ref is not None]
        try:
            self.backend.cancel(refs)
        except Exception:
            pass
        for stage, item in list(self.inflight):
            self._task_event(stage, item, "cancelled")
        held = [p for sr in self.stage_runs.values() for p in sr.held]
        for pending in [*self.waiting, *held]:
            self._task_event(pending.stage, pending.info.item, "cancelled")
        for sr in self.stage_runs.values():
            sr.held.clear()
        self.inflight.clear()
        self.waiting.clear()
        self.outputs.clear()
        self.splits.clear()
        if (
            state == "failed"
            and self.run.failed_stage is None
            and isinstance(self.run.exception, RunTimeoutError)
        ):
            self.run.failed_stage = self.run.exception.stage
        self.run._set_state(state, message)
        self._run_event(state, message)

    # --- launching ---
    def _launch(self, stage: Stage) -> None:
        sr = self.stage_runs[stage.name]
        sr.launched_at = time.monotonic()
        dep_outputs = [self.outputs[d] for d in stage.depends_on]
        kwargs = root_kwargs(stage, self.fns[stage.name], self.run.input) if not stage.depends_on else {}
        if stage.type == "simple":
            layout, flat = self._layout(dep_outputs)
            sr.total = 1
            self._enqueue(stage, TaskInfo(self.run.uid, stage.name, None, tuple(layout), kwargs), flat)
        else:
            if stage.depends_on:
                first, rest = dep_outputs[0], dep_outputs[1:]
                try:
                    if isinstance(first, Gathered):
                        items = [(arg_layout.value(), h) for h in first.handles]
                    elif stage.depends_on[0] in self.splits:  # split once per output, however many
                        items = self.splits[stage.depends_on[0]]  # stages map over it
                    else:
                        items = self.splits[stage.depends_on[0]] = self.backend.split(first.handle)
                except Exception as exc:
                    source = f"the output of '{stage.depends_on[0]}'"
                    text = str(exc)
                    if "maps over its dependency's output" in text:  # backends split without the names
                        exc = TypeError(
                            text.replace("stage '?'", f"stage '{stage.name}'").replace(
                                "its dependency's output", source
                            )
                        )
                    elif isinstance(exc, TypeError) and "maps over" not in text:
                        exc = TypeError(f"stage '{stage.name}' maps over {source}: {exc}")
                    self._fail_stage(stage, None, exc)
                    return
            else:
                key = stage.map_on
                if key not in self.run.input:
                    raise StageError(
                        stage.name,
                        self.run,
                        KeyError(
                            f"options.map_on is '{key}' but the run input has no such key "
                            f"(input keys: {', '.join(sorted(self.run.input)) or 'none'})"
                        ),
                    )
                try:
                    values = items_of(self.run.input[key], stage.name, f"input['{key}']")
                except TypeError as exc:
                    raise StageError(stage.name, self.run, exc) from exc
                items, rest = [(arg_layout.constant(v), None) for v in values], []
            rest_layout, rest_flat = self._layout(rest)
            sr.total = len(items)
            uid = self.run.uid
            self._enqueue_many(
                stage,
                [
                    (
                        TaskInfo(uid, stage.name, index, (entry, *rest_layout), kwargs),
                        ([arg] if arg_layout.takes_flat_value(entry) else []) + rest_flat,
                    )
                    for index, (entry, arg) in enumerate(items)
                ],
            )
            if not items:
                self._finish_stage(stage)
        for dep in stage.depends_on:  # release outputs nobody else needs (Ray refs, Dask futures)
            self.consumers[dep] -= 1
            if self.consumers[dep] == 0 and dep not in self.terminal:
                self.outputs.pop(dep, None)
                self.splits.pop(dep, None)

    @staticmethod
    def _layout(outputs: list) -> tuple[list, list]:
        layout, flat = [], []
        for out in outputs:
            if isinstance(out, Gathered):
                layout.append(arg_layout.gathered(len(out.handles)))
                flat.extend(out.handles)
            else:
                layout.append(arg_layout.value())
                flat.append(out.handle)
        return layout, flat

    def _enqueue(self, stage: Stage, info: TaskInfo, flat: list) -> None:
        self._enqueue_many(stage, [(info, flat)])

    def _enqueue_many(self, stage: Stage, tasks: list[tuple[TaskInfo, list]]) -> None:
        """Queue a stage's tasks: recorded and announced together (a fan-out may have thousands)."""
        need = self.backend.slots_needed(stage) if self.free_slots is not None else 0
        name = stage.name
        sr = self.stage_runs[name]
        pendings = (_Pending(name, info, flat, need) for info, flat in tasks)
        # without slot limits a chunkable fan-out is sent a few at a time until its timings are in
        (sr.held if sr.chunkable and self.free_slots is None else self.waiting).extend(pendings)
        sr.waiting += len(tasks)
        t = time.time()
        with self.run._event_lock:
            new = self.run._queue_tasks(name, [info.item for info, _ in tasks], t)
            if self.events.listening_for("task"):
                for item in new:
                    self.publish(TaskEvent(self.run.uid, name, item, "queued", t))

    def _chunk_size(self, sr: _StageRun) -> int:
        """How many of a fan-out's waiting items to send as one chunk: enough for about
        ``backend.chunk_seconds`` of work by the mean so far, but never so many that a worker
        could sit idle at the end of the stage (at least two chunks per slot stay to share)."""
        if not sr.chunkable or sr.timed < CHUNK_AFTER:
            return 1
        by_time = int((self.backend.chunk_seconds or 0.0) / max(sr.mean, 1e-9))  # chunkable: it is set
        spread = sr.waiting // (2 * (self.backend.capacity or self.backend.parallelism or 1))
        # grow step by step: a mean from the first few items may not hold for the rest, and a
        # chunk, once started, runs to its end
        return max(1, min(by_time, spread, 2 * sr.last_chunk, CHUNK_MAX))

    def _chunkable(self, stage: Stage) -> bool:
        return bool(
            self.backend.chunk_seconds
            and stage.type == "parameterized"
            and self.backend.slots_needed(stage) == 1
            and not any(amount for name, amount in stage.resources.items() if name != "cpus")
        )

    def _take_held(self, batch: list) -> None:
        """Groups from fan-outs' own queues (backends without slot limits), up to SEND_DEPTH
        sends per worker in flight per stage. Other stages' tasks never wait behind them."""
        depth = SEND_DEPTH * (self.backend.parallelism or 1)
        for sr in self.stage_runs.values():
            while sr.held and sr.sends < depth:
                size = 1 if sr.held[0].alone else self._chunk_size(sr)
                group = [sr.held.popleft()]
                while len(group) < size and sr.held and not sr.held[0].alone:
                    group.append(sr.held.popleft())
                self._take_group(sr, group)
                batch.append(group)

    def _take_group(self, sr: _StageRun, group: list) -> None:
        sr.waiting -= len(group)
        sr.sends += 1
        if len(group) > 1:
            sr.last_chunk = len(group)
        # a chunk takes its first task's slot; the others take none (need None)
        for i, member in enumerate(group):
            self.inflight[(member.stage, member.info.item)] = (None, member.need if i == 0 else None)

    def _requeue(self, pending: _Pending) -> None:
        """Back to the front of its queue (not sent after all, or to be sent again alone)."""
        sr = self.stage_runs[pending.stage]
        (sr.held if sr.chunkable and self.free_slots is None else self.waiting).appendleft(pending)
        sr.waiting += 1

    def _fits(self, pending: _Pending) -> bool:
        """Whether a task may go now, on a backend with slots (``free_slots`` is not None)."""
        assert self.free_slots is not None
        if pending.need <= self.free_slots or not self.inflight:
            return True
        if pending.need != 1 or self.exact_inflight:
            return False
        prefetch = self.backend.prefetch
        return prefetch is None or self.free_slots > -prefetch

    def _pump(self) -> None:
        """Submit waiting tasks; with a slot capacity (local), only as many as fit (one-slot
        tasks also up to the backend's ``prefetch``: its workers then bound what runs at once)."""
        batch: list[list[_Pending]] = []  # groups: one task, or a chunk of one stage's tasks
        while self.waiting:
            pending = self.waiting[0]
            sr = self.stage_runs[pending.stage]
            if self.free_slots is not None:
                if not self._fits(pending):
                    break
                self.free_slots -= pending.need
                if pending.need != 1:
                    self.exact_inflight += 1
            group = [self.waiting.popleft()]
            size = self._chunk_size(sr) if len(self.waiting) and not pending.alone else 1
            while (
                len(group) < size
                and self.waiting
                and self.waiting[0].stage == pending.stage
                and not self.waiting[0].alone
            ):
                group.append(self.waiting.popleft())
            self._take_group(sr, group)
            batch.append(group)
        self._take_held(batch)
        if batch:
            self._submit(batch)

    def _submit(self, batch: list[list[_Pending]]) -> None:
        """Hand a batch to the backend: lone tasks in one call (Dask sends them in one message),
        each chunk in one call of its own."""
        sent: list[tuple[list[_Pending], Any]] = []  # (group, its ref) as each goes out
        lone: list[list[_Pending]] = []

        def send_lone():
            calls, refs = [], []
            for (pending,) in lone:
                sr = self.stage_runs[pending.stage]
                key = (pending.stage, pending.info.item)
                calls.append(
                    (
                        sr.fn_handle,
                        pending.info,
                        pending.flat,
                        sr.stage.resources,
                        lambda outcome, key=key: self.completions.put((key, outcome)),
                    )
                )
            try:
                self.backend.submit_many(self.ctx_handle, calls, refs)
            finally:
                sent.extend(zip(lone, refs))
                lone.clear()

        try:
            for group in batch:
                if len(group) == 1:
                    lone.append(group)
                    continue
                if lone:
                    send_lone()
                sr = self.stage_runs[group[0].stage]
                ref = self.backend.submit_chunk(
                    sr.fn_handle,
                    self.ctx_handle,
                    [(p.info, p.flat) for p in group],
                    sr.stage.resources,
                    ChunkReport(self.completions.put, group),
                )
                sent.append((group, ref))
            if lone:
                send_lone()
        finally:
            for group, ref in sent:
                for p in group:
                    key = (p.stage, p.info.item)
                    self.inflight[key] = (ref, self.inflight[key][1])
            done = {id(group) for group, _ in sent}
            for group in reversed([g for g in batch if id(g) not in done]):  # never sent: waiting again
                self.stage_runs[group[0].stage].sends -= 1
                for p in reversed(group):
                    self._release((p.stage, p.info.item))
                    self._requeue(p)

    # --- completions ---
    def _release(self, key) -> None:
        _, need = self.inflight.pop(key)
        if self.free_slots is not None and need is not None:
            self.free_slots += need
            if need != 1:
                self.exact_inflight -= 1

    def _take(self, ended: tuple | _ChunkEnd) -> None:
        """One completion from the queue: a task's (its key, its Outcome), or a chunk's end."""
        if isinstance(ended, _ChunkEnd):
            _raise_if_cluster_lost(ended.error, ended.outcomes or [])
            group = ended.group
            if (group[0].stage, group[0].info.item) in self.inflight:
                self.stage_runs[group[0].stage].sends -= 1
            if ended.outcomes is None:
                self._retry_alone(group, ended.error)
            else:
                self._complete_chunk([((p.stage, p.info.item), o) for p, o in zip(group, ended.outcomes)])
        else:
            key, outcome = ended
            _raise_if_cluster_lost(None, [outcome])
            if key in self.inflight:
                self.stage_runs[key[0]].sends -= 1
            self._complete(key, outcome)

    def _retry_alone(self, group: list[_Pending], error: BaseException | None) -> None:
        """A chunk failed as a whole (its worker died, a result or argument couldn't be moved):
        its items go again, each alone, so only the item at fault fails."""
        retry = [p for p in group if (p.stage, p.info.item) in self.inflight]
        for p in reversed(retry):
            self._release((p.stage, p.info.item))
            p.alone = True
            self._requeue(p)

    @staticmethod
    def _timed(sr: _StageRun, outcome: Outcome) -> None:
        """A task's duration, when its worker reported one: the moving average forgets slow
        first calls (a cold worker)."""
        if outcome.start is None or outcome.end is None:
            return
        seconds = outcome.end - outcome.start
        sr.mean = seconds if not sr.timed else sr.mean + MEAN_WEIGHT * (seconds - sr.mean)
        sr.timed += 1

    def _complete_chunk(self, pairs: list) -> None:
        """A chunk's outcomes: its finished items recorded in one step (a chunk may hold hundreds
        of microsecond tasks), anything else one by one, in item order either way."""
        stage_name = pairs[0][0][0]
        sr = self.stage_runs[stage_name]
        done = [(key[1], o) for key, o in pairs if o.ok and key in self.inflight]
        if len(done) < len(pairs):  # a failure or a cancelled item: the general path keeps it exact
            for key, outcome in pairs:
                self._complete(key, outcome)
            return
        for key, _ in pairs:
            self._release(key)
        results = sr.results
        for item, outcome in done:
            results[item] = outcome.value
            self._timed(sr, outcome)
        with self.run._event_lock:
            reached = self.run._finish_tasks(stage_name, done)
            if self.events.listening_for("task"):
                uid = self.run.uid
                for item, outcome, ran in reached:
                    if ran:  # went from queued to finished: its 'running' is implied
                        self.publish(
                            TaskEvent(
                                uid, stage_name, item, "running", outcome.start or outcome.end, outcome.worker
                            )
                        )
                    self.publish(TaskEvent(uid, stage_name, item, "finished", outcome.end, outcome.worker))
        hits = self.cache_hits.get(stage_name)
        if hits:
            for item, outcome in done:
                if item in hits:
                    self._task_event(stage_name, item, "cached", outcome.end, outcome.worker)
        sr.done += len(done)
        if sr.done == sr.total:
            self._finish_stage(sr.stage)

    def _complete(self, key, outcome: Outcome) -> None:
        if key not in self.inflight:
            return  # already cancelled
        self._release(key)
        stage_name, item = key
        sr = self.stage_runs[stage_name]
        stage = sr.stage
        self._timed(sr, outcome)
        if outcome.ok:
            self._task_event(
                stage_name,
                item,
                "finished",
                outcome.end,
                outcome.worker,
                start=outcome.start,
                end=outcome.end,
            )
            if item in self.cache_hits.get(stage_name, ()):
                self._task_event(stage_name, item, "cached", outcome.end, outcome.worker)
            sr.results[item] = outcome.value
        else:
            exc = outcome.error or RuntimeError("the task failed without saying why")  # never None here
            summary = f"{type(exc).__name__}: {exc}"
            self._task_event(
                stage_name,
                item,
                "failed",
                outcome.end,
                outcome.worker,
                summary,
                start=outcome.start,
                end=outcome.end,
            )
            if stage.type == "parameterized" and stage.allow_partial_failure:
                self.run._add_failure(stage_name, item, exc)
            else:
                self._fail_stage(stage, item, exc)
        sr.done += 1
        if sr.done == sr.total:
            self._finish_stage(stage)

    def _fail_all_items(self, stage: Stage, total: int):
        """A fan-out under allow_partial_failure whose every item failed: partial failure means
        some items survived, so the stage fails, naming each item's error."""
        failures = [f for f in self.run.failures if f.stage == stage.name]
        shown = "; ".join(f"item {f.item}: {f.error}" for f in failures[:5])
        more = f"; and {len(failures) - 5} more (run.failures)" if len(failures) > 5 else ""
        exc = AllItemsFailedError(
            f"all {total} items failed (allow_partial_failure keeps a stage only "
            f"when some items succeed): {shown}{more}"
        )
        if failures and failures[0].traceback:
            exc.remote_traceback = failures[0].traceback  # the first item's, shown with the StageError
        self.run.failed_stage = stage.name
        error = StageError(stage.name, self.run, exc)
        exc.__cause__ = failures[0].exception if failures else None
        error.__cause__ = exc
        raise error

    def _fail_stage(self, stage: Stage, item, exc: BaseException):
        self.run.failed_stage = stage.name
        error = StageError(stage.name, self.run, exc, item=item)
        error.__cause__ = exc
        raise error

    def _finish_stage(self, stage: Stage) -> None:
        sr = self.stage_runs[stage.name]
        if sr.total and not sr.results and stage.type == "parameterized":
            self._fail_all_items(stage, sr.total)
        sr.finished = True
        if stage.type == "simple":
            self.outputs[stage.name] = Value(sr.results.get(None))
        else:
            self.outputs[stage.name] = Gathered([sr.results[i] for i in sorted(sr.results)])
        sr.results = {}
        for other in self.wf.stages:
            deps = self.remaining_deps[other.name]
            if stage.name in deps:
                deps.discard(stage.name)
                if not deps:
                    self._launch(other)

    def _collect(self):
        values = []
        for name in self.terminal:
            out = self.outputs[name]
            if isinstance(out, Gathered):
                values.append(self.backend.fetch_many(out.handles))
            else:
                values.append(self.backend.fetch(out.handle))
        self.outputs.clear()
        self.splits.clear()
        return values[0] if len(values) == 1 else values


def _raise_if_cluster_lost(error: BaseException | None, outcomes: list[Outcome]) -> None:
    """A lost cluster is not the stage's fault: it ends the run with the backend's
    ClusterLostError instead of failing every item in flight with it."""
    if isinstance(error, ClusterLostError):
        raise error
    for o in outcomes:
        lost = getattr(o, "error", None)
        if isinstance(lost, ClusterLostError):
            raise lost


class _Cancelled(Exception):
    pass


class AllItemsFailedError(RuntimeError):
    """Every item of a fan-out failed, though it allows partial failure (the StageError's cause)."""

    remote_traceback: str | None = None  # the first item's worker traceback


def check_root_inputs(wf: Workflow, fns: dict, run_input: dict) -> None:
    """Before the run: every root stage gets its required input (a ConfigError names it)."""
    for stage in wf.stages:
        if not stage.depends_on:
            root_kwargs(stage, fns[stage.name], run_input)
            if stage.type == "parameterized":
                if stage.map_on not in (run_input or {}):
                    raise ConfigError(
                        f"options.map_on is '{stage.map_on}' but the run input has no such "
                        f"key (input keys: {', '.join(sorted(run_input or {})) or 'none'})",
                        stage=stage.name,
                        key="options.map_on",
                    )
                items_check = run_input[stage.map_on]
                if isinstance(items_check, (str, bytes)) or not hasattr(items_check, "__iter__"):
                    raise ConfigError(
                        f"maps over input['{stage.map_on}'], which is "
                        f"{a_type(items_check)}, not a list, tuple or dict",
                        stage=stage.name,
                        key="options.map_on",
                    )
