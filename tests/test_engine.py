"""Workflow semantics, one suite over four executors: local threads, local processes, Dask, Ray."""

import time

import pytest
import stages as st
from conftest import poll

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow


def wf(*stages, name="w"):
    return Workflow(name, stages=list(stages))


def test_two_stage_map_and_reduce(executor):
    run = executor.run(
        wf(
            Stage("numbers", st.numbers),
            Stage("square", st.square, type="parameterized", depends_on=["numbers"]),
            Stage("total", st.total, depends_on=["square"]),
        ),
        input={"n": 5},
    )
    assert run.state == "finished" and run.result == 30
    assert run.started_at <= run.finished_at
    assert run in executor.history and executor.history[-1] is run
    tasks = run.tasks
    assert len(tasks) == 7 and set(tasks.state) == {"finished"}
    assert list(tasks[tasks.stage == "square"].sort_values("item").item) == [0, 1, 2, 3, 4]
    assert tasks.worker.notna().all()
    stages = run.stages.set_index("stage")
    assert stages.loc["square", "finished"] == 5 and stages.loc["total", "state"] == "finished"


def test_root_input_is_filtered_to_signature(executor):
    def root(a, b=2):
        return (a, b)

    def takes_all(**kwargs):
        return sorted(kwargs.items())

    run = executor.run(wf(Stage("r", root), Stage("k", takes_all)), input={"a": 1, "zzz": 9})
    assert run.result == [(1, 2), [("a", 1), ("zzz", 9)]]


def test_missing_required_input_names_it(executor):
    def root(needed):
        return needed

    with pytest.raises(fnb.ConfigError, match="stage 'r'.*'needed'"):
        executor.run(wf(Stage("r", root)), input={"other": 1})


def test_dependencies_arrive_in_depends_on_order(executor):
    def a():
        return "a"

    def b():
        return "b"

    def join(first, second):
        return first + second

    run = executor.run(wf(Stage("a", a), Stage("b", b), Stage("j", join, depends_on=["b", "a"])))
    assert run.result == "ba"


def test_parameterized_over_dict_keys_and_extra_dependencies(executor):
    def mapping():
        return {"x": 1, "y": 2, "z": 3}

    def offset():
        return 100

    def pick(key, table, off):
        return f"{key}{table[key] + off}"

    run = executor.run(
        wf(
            Stage("m", mapping),
            Stage("o", offset),
            Stage("p", pick, type="parameterized", depends_on=["m", "m2", "o"]),
            Stage("m2", mapping),
        )
    )
    assert run.result == ["x101", "y102", "z103"]


def test_parameterized_root_maps_on_input_key(executor):
    def scale(x, factor=1):
        return x * factor

    stage = Stage("scale", scale, type="parameterized", options={"map_on": "values"})
    run = executor.run(wf(stage), input={"values": [1, 2, 3], "factor": 10})
    assert run.result == [10, 20, 30]


def test_map_on_key_missing_is_an_error(executor):
    stage = Stage("scale", st.square, type="parameterized", options={"map_on": "values"})
    with pytest.raises(fnb.ConfigError, match="stage 'scale'.*map_on"):
        executor.run(wf(stage), input={"other": [1]})


def test_map_over_non_iterable_fails_naming_stage(executor):
    def one():
        return 5

    run_wf = wf(Stage("one", one), Stage("sq", st.square, type="parameterized", depends_on=["one"]))
    with pytest.raises(fnb.StageError, match="stage 'sq'.*int") as err:
        executor.run(run_wf)
    assert err.value.stage == "sq" and err.value.run.state == "failed"


def test_partial_failure_drops_items_and_records_them(executor):
    run = executor.run(
        wf(
            Stage("numbers", st.numbers),
            Stage("check", st.fail_on_three, type="parameterized", depends_on=["numbers"]),
        ),
        input={"n": 5},
    )
    assert run.state == "finished" and run.result == [0, 1, 2, 4]
    assert len(run.failures) == 1
    failure = run.failures[0]
    assert failure.stage == "check" and failure["item"] == 3
    assert "ValueError" in failure.error and "item 3 is bad" in failure.error
    assert "fail_on_three" in failure.traceback
    tasks = run.tasks
    assert tasks[(tasks.stage == "check") & (tasks["item"] == 3)].state.item() == "failed"


def test_partial_failure_off_fails_the_run(executor):
    stage = Stage(
        "check",
        st.fail_on_three,
        type="parameterized",
        depends_on=["numbers"],
        options={"allow_partial_failure": False},
    )
    with pytest.raises(fnb.StageError) as err:
        executor.run(wf(Stage("numbers", st.numbers), stage), input={"n": 5})
    assert err.value.stage == "check" and err.value.item == 3
    assert isinstance(err.value.__cause__, ValueError)
    assert executor.history[-1].state == "failed"


def test_stage_error_keeps_type_message_and_remote_traceback(executor):
    with pytest.raises(fnb.StageError) as err:
        executor.run(wf(Stage("numbers", st.numbers), Stage("explode", st.boom, depends_on=["numbers"])))
    exc = err.value
    assert exc.stage == "explode" and "stage 'explode'" in str(exc)
    assert isinstance(exc.__cause__, KeyError) and "boom happened" in str(exc.__cause__)
    assert "def boom" in exc.__cause__.remote_traceback or "boom" in exc.__cause__.remote_traceback
    run = exc.run
    assert run.state == "failed" and "KeyError" in run.error and run in executor.history


def test_several_terminal_stages_all_run(executor):
    def a():
        return 1

    def b(x):
        return x + 1

    def c(x):
        return x + 2

    run = executor.run(wf(Stage("a", a), Stage("b", b, depends_on=["a"]), Stage("c", c, depends_on=["a"])))
    assert run.result == [2, 3]
    assert set(run.tasks.stage) == {"a", "b", "c"}


def test_stage_starts_as_soon_as_its_dependencies_finish(executor):
    def slow_root():
        time.sleep(1.5)
        return 1

    def fast_root():
        return 2

    def after_fast(x):
        return x

    if isinstance(executor, fnb.DaskExecutor):  # a task an earlier test left running holds a
        # worker's one thread; the roots would then queue on the other, one after the other
        client = executor.client
        poll(
            lambda: len(client.scheduler_info()["workers"]) >= 2 and not any(client.processing().values()),
            what="two idle Dask workers",
        )
    run = executor.run(
        wf(
            Stage("slow", slow_root),
            Stage("fast", fast_root),
            Stage("after", after_fast, depends_on=["fast"]),
        )
    )
    tasks = run.tasks.set_index("stage")
    assert tasks.loc["after", "start"] < tasks.loc["slow", "end"]


def test_fan_out_runs_items_in_parallel(executor):
    stage = Stage("slow", st.slow, type="parameterized", options={"map_on": "xs"})
    run = executor.run(wf(stage), input={"xs": [1, 2, 3, 4], "delay": 0.6})
    assert run.result == [1, 2, 3, 4]
    t = run.tasks.sort_values("start")
    overlaps = sum(1 for i in range(len(t) - 1) if t.start.iloc[i + 1] < t.end.iloc[i])
    assert overlaps >= 1


def test_empty_fan_out_gives_empty_list(executor):
    run = executor.run(
        wf(
            Stage("numbers", st.numbers), Stage("sq", st.square, type="parameterized", depends_on=["numbers"])
        ),
        input={"n": 0},
    )
    assert run.result == []


def test_run_context_inside_a_stage(executor):
    run = executor.run(wf(Stage("ctx", st.context_info), name="ctxflow"), input={"n": 1}, namespace="team-a")
    info = run.result
    assert info["namespace"] == "team-a" and info["executor"] == executor.kind
    assert info["run"] == run.uid and info["input"] == {"n": 1}
    assert info["stage"] == "ctx" and info["workflow"] == "ctxflow"


def test_run_context_outside_a_stage_is_an_error():
    with pytest.raises(RuntimeError, match="only inside a running workflow stage"):
        fnb.get_run_context()


def test_cluster_memory_across_stages_runs_and_namespaces(executor):
    def writer():
        fnb.cluster_memory.put("model", {"weights": [1, 2, 3]})
        fnb.cluster_memory.put("fn", lambda v: v * 2)  # any picklable value
        return "written"

    def reader(_):
        return fnb.cluster_memory.get("model")["weights"], fnb.cluster_memory.get("fn")(21)

    def other_namespace():
        return fnb.cluster_memory.exists("model")

    fnb.cluster_memory.clear()
    run = executor.run(wf(Stage("w", writer), Stage("r", reader, depends_on=["w"])), namespace="ns1")
    assert run.result == ([1, 2, 3], 42)
    assert executor.run(wf(Stage("o", other_namespace)), namespace="ns2").result is False
    assert executor.run(wf(Stage("o", other_namespace)), namespace="ns1").result is True
    assert fnb.cluster_memory.get("model", namespace="ns1") == {"weights": [1, 2, 3]}
    with pytest.raises(KeyError):
        fnb.cluster_memory.get("model")  # the default namespace has no such key
    assert fnb.cluster_memory.delete("model", namespace="ns1") is True
    assert not fnb.cluster_memory.exists("model", namespace="ns1")
    fnb.cluster_memory.clear()


def test_submit_returns_at_once_and_can_be_cancelled(executor):
    stage = Stage("slow", st.slow, type="parameterized", options={"map_on": "xs"})
    handle = executor.submit(wf(stage), input={"xs": list(range(8)), "delay": 1.0})
    assert not handle.done() and handle.run.state in ("pending", "running")
    time.sleep(0.3)
    assert handle.cancel() is True
    run = handle.wait(30)
    assert run.state == "cancelled" and handle.done()
    assert "cancelled" in set(run.tasks.state)
    assert executor.run(wf(Stage("numbers", st.numbers)), input={"n": 2}).result == [0, 1]


def test_wait_with_timeout_raises_and_run_goes_on(executor):
    stage = Stage("slow", st.slow, type="parameterized", options={"map_on": "xs"})
    handle = executor.submit(wf(stage), input={"xs": [1], "delay": 1.0})
    with pytest.raises(TimeoutError):
        handle.wait(0.05)
    assert handle.wait(30).result == [1]


def test_run_workflow_default_is_a_local_thread_pool():
    run = fnb.run_workflow(wf(Stage("numbers", st.numbers)), input={"n": 3})
    assert run.result == [0, 1, 2] and run.executor == "local"


def test_yaml_workflow_with_import_path_targets(executor):
    text = """
kind: workflow
metadata: {name: squares}
spec:
  stages:
    - {name: numbers, target: stages.numbers}
    - {name: square, target: stages.square, type: parameterized, depends_on: [numbers]}
    - {name: total, target: stages.total, depends_on: [square]}
"""
    assert executor.run(fnb.load_workflow(text), input={"n": 4}).result == 14
    assert executor.run(text, input={"n": 3}).result == 5


def test_history_is_bounded():
    with fnb.LocalExecutor(use_processes=False, cpus=1, history_limit=3) as ex:
        for n in range(5):
            ex.run(wf(Stage("numbers", st.numbers)), input={"n": n})
        assert [r.result for r in ex.history] == [[0, 1], [0, 1, 2], [0, 1, 2, 3]]


def test_local_cpus_resource_limits_concurrency():
    stage = Stage("slow", st.slow, type="parameterized", options={"map_on": "xs"}, resources={"cpus": 2})
    with fnb.LocalExecutor(use_processes=False, cpus=2) as ex:
        run = ex.run(wf(stage), input={"xs": [1, 2, 3], "delay": 0.3})
        t = run.tasks.sort_values("start")
        assert all(t.start.iloc[i + 1] >= t.end.iloc[i] for i in range(len(t) - 1))
        with pytest.raises(fnb.ConfigError, match="cpus: 3"):
            ex.run(wf(stage.model_copy(update={"resources": {"cpus": 3}})), input={"xs": [1]})
        with pytest.raises(fnb.ConfigError, match="hamster_wheels"):
            ex.run(wf(stage.model_copy(update={"resources": {"hamster_wheels": 1}})), input={"xs": [1]})


def test_process_pool_runs_lambdas_and_notebook_functions():
    offset = 7
    with fnb.LocalExecutor(use_processes=True, cpus=2) as ex:
        run = ex.run(
            wf(
                Stage("n", lambda: [1, 2]),
                Stage("m", lambda x: x + offset, type="parameterized", depends_on=["n"]),
            )
        )
        assert run.result == [8, 9]
        assert len(set(run.tasks.worker)) >= 1 and all(w.startswith("") for w in run.tasks.worker)


# --- shared helpers: one pickling error, one LRU ------------------------------------------------


class _RefusesPickling:
    """pickle.PicklingError from its own __reduce__ (a type whose library forbids pickling)."""

    def __reduce__(self):
        import pickle

        raise pickle.PicklingError("this object stays where it is")


def test_unpicklable_values_are_one_type_error_in_every_store(tmp_path):
    import threading

    for value, why in ((threading.Lock(), "lock"), (_RefusesPickling(), "this object stays")):
        with pytest.raises(TypeError, match=rf"^artifacts hold values cloudpickle can pickle; .*{why}"):
            fnb.object_store.put("bad", value, "ns", strategy="artifact", storage=str(tmp_path))
        with (
            pytest.raises(
                TypeError, match=rf"^the object store holds values cloudpickle can pickle; .*{why}"
            ),
            fnb.LocalExecutor(use_processes=False, cpus=1, _compute={"storage": str(tmp_path)}),
        ):
            fnb.object_store.put("bad", value, "ns", strategy="cluster_memory")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing half-written


def test_lru_keeps_the_most_recently_used():
    from flowdapt_nb.lru import LRU

    loads = []
    cache = LRU(2)

    def load(key):
        loads.append(key)
        return key.upper()

    assert [cache.get_or_load(k, lambda k=k: load(k)) for k in "aba"] == ["A", "B", "A"]
    assert loads == ["a", "b"]  # "a" the second time came from the cache
    cache.put("c", "C")  # "b" is the least recently used now: it goes
    assert "b" not in cache and "a" in cache and len(cache) == 2
    assert cache.get("b") is None and cache.get("a") == "A"
    with pytest.raises(ValueError):
        LRU(0)


# --- the backend contract ------------------------------------------------------------------------


def test_backend_is_an_abc_with_three_required_methods():
    from flowdapt_nb.engine import Backend

    class Partial(Backend):
        def submit(self, *args):
            return None

    with pytest.raises(TypeError, match="abstract methods fetch, split"):
        Partial()


def test_outcome_from_a_workers_report():
    from flowdapt_nb.context import RunContext, RunInfo
    from flowdapt_nb.engine import Outcome
    from flowdapt_nb.worker import TaskInfo, execute

    ctx = RunContext(input={}, namespace="ns", executor="local", run=RunInfo("r"), definition={}, config={})
    ok = Outcome.from_report(*execute(ctx, lambda: 7, TaskInfo("r", "s", None, ()), []))
    assert ok.ok and ok.value == 7 and ok.error is None and ok.start <= ok.end and ok.worker
    bad = Outcome.from_report(execute(ctx, st.boom, TaskInfo("r", "s", None, ()), [])[0], "a handle")
    assert not bad.ok and bad.value is None and isinstance(bad.error, KeyError)
    lost = Outcome.failure(RuntimeError("worker died"))
    assert not lost.ok and lost.start is None and lost.end is not None


def _inline_executor():
    """A backend written against the contract alone: tasks run inline in the calling thread,
    chunks of a fan-out report through ChunkReport.done, or .failed for a chunk holding item 3
    (the engine must then send those items again, one by one)."""
    from flowdapt_nb import arg_layout
    from flowdapt_nb.engine import Backend, Outcome
    from flowdapt_nb.executors import registry
    from flowdapt_nb.executors.base import Executor
    from flowdapt_nb.worker import execute

    class InlineBackend(Backend):
        kind = "inline"
        chunk_seconds = 1.0  # every fan-out item is tiny: chunks as soon as timings are in
        capacity = 2
        chunks: list = []  # the items of each chunk sent
        alone: list = []  # the items sent alone

        def submit(self, fn, ctx, info, flat_args, resources, on_done):
            self.alone.append(info.item)
            on_done(Outcome.from_report(*execute(ctx, fn, info, flat_args, portable=False)))
            return info.task_id

        def submit_chunk(self, fn, ctx, tasks, resources, on_done):
            items = [info.item for info, _ in tasks]
            self.chunks.append(items)
            if 3 in items and len(items) > 1:
                on_done.failed(RuntimeError("the chunk's worker died"))
            else:
                on_done.done(
                    [
                        Outcome.from_report(*execute(ctx, fn, info, flat, portable=False))
                        for info, flat in tasks
                    ]
                )
            return tuple(items)

        def split(self, handle):
            return [(arg_layout.value(), v) for v in handle]

        def fetch(self, handle):
            return handle

    class InlineExecutor(Executor):
        kind = "inline"

        def _open(self):
            self._memory = None
            return InlineBackend()

        def _shutdown(self):
            pass

    registry.unregister("inline")  # a test-only kind: it stays out of the table
    return InlineExecutor


def test_a_backend_on_the_contract_alone_runs_chunks_and_retries_a_failed_chunk():
    executor_class = _inline_executor()
    with executor_class() as ex:
        run = ex.run(
            wf(
                Stage("numbers", st.numbers),
                Stage("square", st.square, type="parameterized", depends_on=["numbers"]),
            ),
            input={"n": 40},
        )
        backend = ex._backend
    assert run.result == [x * x for x in range(40)]
    chunked = [c for c in backend.chunks if len(c) > 1]
    assert chunked, backend.chunks  # the engine did send chunks
    failed = next(c for c in chunked if 3 in c)
    assert set(failed) <= set(backend.alone)  # the failed chunk's items went again, one by one


# --- task events only for task listeners -------------------------------------------------------


@pytest.mark.parametrize("use_processes", [False, True])
def test_task_events_are_built_only_when_someone_listens_for_tasks(monkeypatch, use_processes):
    """A run-only subscriber (the run store) costs no task events; a task subscriber gets them
    all. Every TaskEvent built is counted (the engine's and the executor's own)."""
    from flowdapt_nb import engine
    from flowdapt_nb.events import TaskEvent
    from flowdapt_nb.executors import base

    built: list = []

    class CountedTaskEvent(TaskEvent):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(engine, "TaskEvent", CountedTaskEvent)
    monkeypatch.setattr(base, "TaskEvent", CountedTaskEvent)
    flow = wf(
        Stage("numbers", st.numbers),
        Stage("square", st.square, type="parameterized", depends_on=["numbers"]),
        Stage("total", st.total, depends_on=["square"]),
    )
    with fnb.LocalExecutor(use_processes=use_processes, cpus=2, runs=False) as ex:
        runs: list = []
        token = ex.events.subscribe(runs.append, kinds=["run"])
        assert not ex.events.listening_for("task") and ex.events.listening_for("run")
        run = ex.run(flow, input={"n": 30})
        assert run.result == sum(x * x for x in range(30)) and set(run.tasks.state) == {"finished"}
        assert built == [] and {e.state for e in runs if e.run == run.uid} == {"running", "finished"}
        ex.events.unsubscribe(token)

        tasks: list = []
        ex.events.subscribe(tasks.append, kinds=["task"])
        assert ex.events.listening_for("task")
        run = ex.run(flow, input={"n": 30})
        mine = [e for e in tasks if e.run == run.uid]
        assert len(run.tasks) == 32 and len({(e.stage, e.item) for e in mine}) == 32
        for state in ("queued", "running", "finished"):  # each task's every state, once
            assert sum(e.state == state for e in mine) == 32
        assert len(built) >= len(mine)
