"""What runs in Ray's worker processes for the Ray executor: the stage tasks, the event sink
actor, cluster memory seen from a stage.

Kept apart from ``ray.py`` and light on imports (no pydantic config, no engine): every new Ray
worker process imports this module before its first task, and the executor's whole module cost
the first result of a fresh cluster ~0.6 s on a loaded machine."""

from __future__ import annotations

import os
import time

from ..errors import UnserializableResultError
from ..lru import LRU
from ..worker import TaskInfo, execute
from ..worker_events import ChunkWatch, EventBatch
from .task_cancel import CancelWatch

_batch = EventBatch(0.05, leading=True)  # per worker process: 'running' reports, one actor call per batch
_chunks = ChunkWatch(0.05)  # items of a chunk that run long are reported running all the same


_cached: LRU[str, object] = LRU(32)  # per worker process: object id -> object
_actors: dict = {}  # per worker process: actor name -> handle


def _cached_get(ref):
    """A stage function or run context, deserialized once per worker process. It comes as an
    object ref nested in the task's first argument, which Ray leaves unresolved: each task then
    carries a reference, not the object (a run context holds the whole run input, so it grows
    with the number of items)."""
    import ray

    return _cached.get_or_load(ref.hex(), lambda: ray.get(ref))


def named_actor(name: str, wait: float = 0.0):
    """An actor by name, looked up once per worker process (a handle passed with every task
    would be serialized and registered with every task). ``wait``: seconds to keep looking for
    a name not registered yet (the driver creates its helper actors just after a run's first
    tasks are sent, so a task may start a moment before they exist)."""
    handle = _actors.get(name)
    if handle is None:
        import ray

        deadline = time.monotonic() + wait
        while True:
            try:
                handle = _actors[name] = ray.get_actor(name)
                break
            except ValueError:  # no actor of that name (yet)
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
    return handle


HELPER_WAIT = 30.0  # seconds a worker looks for a helper actor's name before giving up


KV_NAMESPACE = "flowdapt_nb"  # where reports wait in the GCS's key-value store (see _sender)
CANCEL_GRACE = 2.0  # seconds a cancelled task may take to stop before it is force-cancelled


def cancel_key(run: str) -> bytes:
    """The key-value key whose presence says the run ``run`` (its uid) is cancelled."""
    return f"cancel:{run}".encode()


STUCK = b"stuck:"  # keys "stuck:<run uid>:<task label>": tasks that did not stop (task_cancel)


def stuck_prefix(run: str) -> bytes:
    """The keys of the cancelled run's tasks that did not stop: ``<this><task label>``."""
    return STUCK + f"{run}:".encode()


def task_label(stage: str, item: int | None) -> str:
    """A task (or a chunk, by its first item) as the driver and its worker both name it."""
    return stage if item is None else f"{stage}[{item}]"


def _flagged(run: str) -> bool:
    from ray.experimental.internal_kv import _internal_kv_exists

    return bool(_internal_kv_exists(cancel_key(run), namespace=KV_NAMESPACE))


def _report_stuck(run: str, task: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(stuck_prefix(run) + task.encode(), b"", namespace=KV_NAMESPACE)


def _still_stuck(run: str, task: str) -> bool:
    """The driver deletes the report once it has force-cancelled the task."""
    from ray.experimental.internal_kv import _internal_kv_exists

    return bool(_internal_kv_exists(stuck_prefix(run) + task.encode(), namespace=KV_NAMESPACE))


_cancels = CancelWatch(_flagged, _report_stuck, _still_stuck, grace=CANCEL_GRACE)  # per worker process


def _sender(sink: str, key):
    """Sends a batch of reports to the event sink; the actor is looked up when the first batch
    goes (in the batching thread, never in the task's). A run sent while the sink was still
    starting (``key`` is then its refs) reports through the GCS's key-value store instead, under
    ``<sink>:``, which the driver reads while such a run is active: the sink's own start (a worker
    process of its own, seconds on a loaded machine) would hold the reports back."""
    if isinstance(key, str):
        return lambda batch: named_actor(sink, HELPER_WAIT).push.remote(batch)

    def put(batch):
        import pickle
        import uuid

        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(f"{sink}:{uuid.uuid4().hex}".encode(), pickle.dumps(batch), namespace=KV_NAMESPACE)

    return put


_run_keys: LRU[str, list] = LRU(4)  # per worker process: run key -> its refs


def _run_refs(sink: str, key, run: str) -> list | None:
    """A run's [context ref, function refs...], asked of the sink actor once per worker process
    (the few most recent runs are kept: a worker lets go of older runs' objects). A run sent
    while the sink was still starting carries the list itself in ``key``. None: the run ``run``
    (its uid) was cancelled and is over; nobody waits for its tasks."""
    import ray

    if isinstance(key, list):
        return key
    refs = _run_keys.get(key)
    if refs is None:
        refs = ray.get(named_actor(sink).lookup.remote(key))
        if refs is None:
            if _flagged(run):
                return None
            raise RuntimeError(f"run {key} is over: its context and functions are gone")
        _run_keys.put(key, refs)
    return refs


def _run_parts(sink: str, key: str, fn_index: int, run: str) -> tuple | None:
    """A stage's function and the run's context, for a task of the run ``key`` (None: the run
    was cancelled and is over)."""
    refs = _run_refs(sink, key, run)
    return None if refs is None else (_cached_get(refs[fn_index]), _cached_get(refs[0]))


NODE_ID_CHARS = 12  # a Ray node id (56 hex characters) is shown by its first ones


def worker_name(ip: str, pid: int, node_id: str) -> str:
    """A Ray worker process as the worker column shows it: ``<node IP>:<pid>@<node id[:12]>``.
    The node id tells nodes apart where several share an IP (nodes of one machine)."""
    return f"{ip}:{pid}@{node_id[:NODE_ID_CHARS]}"


def node_of_worker(worker) -> str | None:
    """The short node id in a worker name made by ``worker_name`` (None for other names)."""
    text = str(worker or "")
    return text.rsplit("@", 1)[1] if "@" in text else None


def _worker_name() -> str:
    name = _actors.get(None)  # cached beside the actor handles: one per worker process
    if name is None:
        import ray

        name = _actors[None] = worker_name(
            ray.util.get_node_ip_address(), os.getpid(), ray.get_runtime_context().get_node_id()
        )
    return name


def ray_task(head, *flat):
    """One stage call. ``head`` is (event sink name, run key, stage function index, the TaskInfo
    fields): plain values, which Ray serializes far faster than object refs or a dataclass (that
    cost is paid per task, in the driver). ``flat`` are the dependency outputs Ray resolves."""
    sink, key, fn_index, info = head
    run = info[0]
    parts = None if _cancels.cancelled(run) else _run_parts(sink, key, fn_index, run)
    if parts is None:
        return _cancelled_meta(), None
    fn, ctx = parts
    worker = _worker_name()
    report = None
    if sink is not None:
        send = _sender(sink, key)
        report = lambda event: _batch.add(event, send)  # noqa: E731
        _batch.start()  # not inside the task: an interrupt could come at any line there
    cancelled, outcome = _cancels.run(
        run, task_label(info[1], info[2]), lambda: execute(ctx, fn, TaskInfo(*info), flat, report, worker)
    )
    if cancelled:  # the run was cancelled (see task_cancel)
        return _cancelled_meta(), None
    meta, value = outcome
    if not meta["ok"]:
        return meta, None
    return _checked(meta, value)


def ray_chunk(head, *flat):
    """Several calls of one stage, one after another: returns their metas, then each value as
    an object of its own (the task runs with ``num_returns`` = items + 1), so items stay apart
    in the object store exactly as if each had been a task. Items after a cancel are not run."""
    sink, key, fn_index, infos, counts = head
    run = infos[0][0]
    done: list[tuple] = []  # (meta, value) per item run
    parts = None if _cancels.cancelled(run) else _run_parts(sink, key, fn_index, run)
    if parts is not None:
        fn, ctx = parts
        worker = _worker_name()
        report = _chunks.open(_sender(sink, key)) if sink is not None else None
        _cancels.run(  # cancelled: the items not done yet are not run
            run,
            task_label(infos[0][1], infos[0][2]),
            lambda: _run_chunk(ctx, fn, infos, counts, flat, report, worker, done),
        )
        _chunks.close(report)
    # values are checked outside the task's window: Ray's serializer must not be interrupted
    checked = [_checked(meta, value) if meta["ok"] else (meta, None) for meta, value in done]
    checked += [(_cancelled_meta(), None)] * (len(infos) - len(done))
    return ([meta for meta, _ in checked], *(value if meta["ok"] else None for meta, value in checked))


def _run_chunk(ctx, fn, infos, counts, flat, report, worker, done: list) -> None:
    pos = 0
    for info, count in zip(infos, counts):
        if _cancels.cancelled(info[0]):
            return
        done.append(execute(ctx, fn, TaskInfo(*info), flat[pos : pos + count], report, worker))
        pos += count


def _cancelled_meta() -> dict:
    """What a task of a cancelled run reports (the driver has stopped listening for it)."""
    now = time.time()
    return {"ok": False, "start": now, "end": now, "worker": None, "error": RunCancelledInWorker()}


class RunCancelledInWorker(Exception):
    """A cancelled run's task stopped in its worker (the driver already marked it cancelled)."""


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
        error = UnserializableResultError(type(value).__name__, f"{type(exc).__name__}: {exc}")
        meta = dict(meta, ok=False, error=error)
        return meta, None


def count_items(value):
    """How many items a parameterized stage gets from this output (or why it can't map over it)."""
    from ..engine import items_of

    try:
        return ("ok", len(items_of(value, "?", "its dependency's output")))
    except Exception as exc:
        return ("error", exc)


def split_items(value):
    """The items, each its own object (the task runs with ``num_returns`` = their count)."""
    from ..engine import items_of

    items = items_of(value, "?", "its dependency's output")
    return items[0] if len(items) == 1 else tuple(items)


class EventSink:
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


class RayMemory:
    """Cluster memory in the named actor; the same calls as MemoryStore, blocking. Travels to
    workers as the actor's name (looked up there once per process, again after the actor was
    replaced). In the driver, ``helpers`` (the executor's ``_Helpers``) makes the actor on first use."""

    def __init__(self, name: str, helpers=None):
        self.name = name
        self.helpers = helpers

    def __reduce__(self):
        return (RayMemory, (self.name,))

    @property
    def actor(self):
        """The actor's handle in the driver (None until it was made, and in workers)."""
        return self.helpers.memory if self.helpers is not None else None

    def __getattr__(self, method_name):
        if method_name.startswith("_") or method_name in ("actor", "name", "helpers"):
            raise AttributeError(method_name)
        return lambda *args: self._call(method_name, args)

    def _call(self, method_name, args):
        import ray
        from ray.exceptions import RayActorError

        for attempt in (1, 2):
            try:
                if self.helpers is not None:  # the driver: clear of the executor closing (call_gate)
                    with self.helpers.gate:
                        actor = self.helpers.memory_actor()
                        return ray.get(getattr(actor, method_name).remote(*args))
                actor = named_actor(self.name, HELPER_WAIT if attempt == 1 else 0.0)
                return ray.get(getattr(actor, method_name).remote(*args))
            except (RayActorError, ValueError) as exc:  # ValueError: no actor of that name now
                _actors.pop(self.name, None)  # a new actor of that name may have replaced it
                if self.helpers is not None or attempt == 2:
                    raise RuntimeError(
                        f"the cluster memory actor '{self.name}' died ({type(exc).__name__}): what it "
                        f"held is lost; the executor starts a new one at its next run"
                    ) from None
