"""The stage cache (issue 19, part 2): hits and misses per stage after editing a function,
changing an input and changing a dependency, on every executor; cached tasks show as 'cached';
cached outputs never cross namespaces."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import cache_stages as cs
import pandas as pd
import pytest

import flowdapt_nb as fnb
from flowdapt_nb import stage_cache, widgets


def workflow(numbers=cs.numbers, score=cs.score, total=cs.total, **options):
    return fnb.Workflow(
        "cached_squares",
        stages=[
            fnb.Stage("numbers", numbers, options=options),
            fnb.Stage("score", score, type="parameterized", depends_on=["numbers"], options=options),
            fnb.Stage("total", total, depends_on=["score"], options=options),
        ],
    )


def states(run) -> dict:
    return {stage: dict(Counter(group["state"])) for stage, group in run.tasks.groupby("stage")}


class Marks:
    """What really ran since the last look (the stages write their names to a file)."""

    def __init__(self, path):
        self.path, self.seen = path, 0

    def new(self) -> Counter:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        fresh, self.seen = lines[self.seen :], len(lines)
        return Counter(fresh)


def test_hits_and_misses_on_each_executor(executor, tmp_path):
    ns = f"cache-{uuid.uuid4().hex[:8]}"  # a namespace of its own: nothing cached before
    marks = Marks(tmp_path / "ran.txt")
    inp = {"n": 4, "marker": str(marks.path)}

    first = executor.run(workflow(), input=inp, namespace=ns, cache=True)
    assert first.result == 14 and marks.new() == {"numbers": 1, "score": 4, "total": 1}
    assert states(first) == {"numbers": {"finished": 1}, "score": {"finished": 4}, "total": {"finished": 1}}

    again = executor.run(workflow(), input=inp, namespace=ns, cache=True)
    assert again.result == 14 and marks.new() == {}  # nothing ran
    assert states(again) == {"numbers": {"cached": 1}, "score": {"cached": 4}, "total": {"cached": 1}}
    assert again.stages.set_index("stage")["state"].tolist() == ["finished"] * 3
    assert again.stages["cached"].tolist() == [1, 4, 1]

    edited = executor.run(workflow(score=cs.score_edited), input=inp, namespace=ns, cache=True)
    assert edited.result == 18  # the edited stage and everything downstream ran; nothing upstream
    assert marks.new() == {"score": 4, "total": 1}
    assert states(edited)["numbers"] == {"cached": 1}

    bigger = executor.run(workflow(), input={**inp, "n": 5}, namespace=ns, cache=True)
    assert bigger.result == 30 and marks.new() == {"numbers": 1, "score": 5, "total": 1}  # a new input

    elsewhere = executor.run(workflow(), input=inp, namespace=f"{ns}-other", cache=True)
    assert elsewhere.result == 14 and marks.new() == {
        "numbers": 1,
        "score": 4,
        "total": 1,
    }  # namespaces apart

    uncached = executor.run(workflow(), input=inp, namespace=ns)  # cache off: runs, reuses nothing
    assert marks.new() == {"numbers": 1, "score": 4, "total": 1} and "cached" not in set(
        uncached.tasks["state"]
    )


@pytest.fixture
def threads():
    with fnb.LocalExecutor(use_processes=False, cpus=2) as ex:
        yield ex


def test_changing_a_dependency_reruns_downstream_only(threads, tmp_path):
    ns = f"cache-{uuid.uuid4().hex[:8]}"
    marks = Marks(tmp_path / "ran.txt")
    inp = {"n": 3, "marker": str(marks.path)}
    threads.run(workflow(), input=inp, namespace=ns, cache=True)
    marks.new()
    run = threads.run(workflow(numbers=cs.numbers_shifted), input=inp, namespace=ns, cache=True)
    assert run.result == 1 + 4 + 9 and marks.new() == {"numbers": 1, "score": 3, "total": 1}
    # the unchanged functions downstream re-ran: their dependency's fingerprint changed
    assert states(run) == {"numbers": {"finished": 1}, "score": {"finished": 3}, "total": {"finished": 1}}


def test_per_stage_option_and_run_override(threads, tmp_path):
    ns = f"cache-{uuid.uuid4().hex[:8]}"
    marks = Marks(tmp_path / "ran.txt")
    inp = {"n": 3, "marker": str(marks.path)}
    wf = fnb.Workflow(
        "partly_cached",
        stages=[
            fnb.Stage("numbers", cs.numbers, options={"cache": True}),
            fnb.Stage("score", cs.score, type="parameterized", depends_on=["numbers"]),
            fnb.Stage("total", cs.total, depends_on=["score"]),
        ],
    )
    threads.run(wf, input=inp, namespace=ns)
    marks.new()
    run = threads.run(wf, input=inp, namespace=ns)  # options.cache on 'numbers' only
    assert marks.new() == {"score": 3, "total": 1} and states(run)["numbers"] == {"cached": 1}
    threads.run(wf, input=inp, namespace=ns, cache=False)  # the run's cache=False wins
    assert marks.new() == {"numbers": 1, "score": 3, "total": 1}


def test_a_global_the_function_reads_is_part_of_its_fingerprint(threads, tmp_path):
    ns = f"cache-{uuid.uuid4().hex[:8]}"
    env = {"fnb": fnb, "FACTOR": 2}
    exec("def scale(x):\n    return x * FACTOR\n", env)  # a notebook-style function reading a global
    wf = lambda: workflow(score=env["scale"])  # noqa: E731
    assert threads.run(wf(), input={"n": 3}, namespace=ns, cache=True).result == 6
    assert set(threads.run(wf(), input={"n": 3}, namespace=ns, cache=True).tasks["state"]) == {"cached"}
    env["FACTOR"] = 10
    run = threads.run(wf(), input={"n": 3}, namespace=ns, cache=True)
    assert run.result == 30 and states(run)["score"] == {"finished": 3}


def test_cached_run_of_slow_stages_runs_none_of_them(threads, tmp_path):
    ns = f"cache-{uuid.uuid4().hex[:8]}"
    marks = Marks(tmp_path / "ran.txt")
    inp = {"n": 3, "marker": str(marks.path)}
    wf = workflow(total=cs.slow_total)
    threads.run(wf, input=inp, namespace=ns, cache=True)
    assert marks.new()["slow_total"] == 1
    started = time.perf_counter()
    run = threads.run(wf, input=inp, namespace=ns, cache=True)
    print(f"cached run of a workflow with a 1 s stage: {time.perf_counter() - started:.3f} s")
    assert marks.new() == {} and states(run)["total"] == {"cached": 1}  # the 1 s stage did not run


def test_listing_and_clearing(threads, tmp_path):
    ns = f"cache-{uuid.uuid4().hex[:8]}"
    first = threads.run(workflow(), input={"n": 2}, namespace=ns, cache=True)
    listed = stage_cache.listing(ns)
    assert len(listed) == 4 and all(k.startswith(stage_cache.PREFIX) for k in listed["key"])  # 1 + 2 + 1
    assert list(listed.columns) == stage_cache.CACHE_COLUMNS
    # one row per task, named by its stage and item (NA: a simple stage's one task)
    assert [(s, None if pd.isna(i) else int(i)) for s, i in zip(listed["stage"], listed["item"])] == [
        ("numbers", None),
        ("score", 0),
        ("score", 1),
        ("total", None),
    ]
    assert set(listed["run"]) == {first.uid}
    assert stage_cache.clear(ns) == 4 and stage_cache.listing(ns).empty
    run = threads.run(workflow(), input={"n": 2}, namespace=ns, cache=True)
    assert "cached" not in set(run.tasks["state"])


def test_listing_orders_stages_as_they_ran_and_reads_any_key(threads):
    """Stages in the order they ran (not by name), each run's rows together; a key under the
    cache's prefix that no stage wrote still lists (item NA) and clears."""
    ns = f"cache-{uuid.uuid4().hex[:8]}"
    wf = fnb.Workflow(
        "renamed",
        stages=[
            fnb.Stage("zeta", cs.numbers),
            fnb.Stage("alpha", cs.score, type="parameterized", depends_on=["zeta"]),
        ],
    )
    first = threads.run(wf, input={"n": 2}, namespace=ns, cache=True)
    second = threads.run(wf, input={"n": 1}, namespace=ns, cache=True)  # zeta again (new input)
    fnb.object_store.put(f"{stage_cache.PREFIX}x-1.5", 1, namespace=ns, strategy="artifact")
    listed = stage_cache.listing(ns)
    stray = listed[listed["stage"].isna()]
    assert list(stray["key"]) == [f"{stage_cache.PREFIX}x-1.5"] and stray["item"].isna().all()
    ran = listed[listed["stage"].notna()]
    rows = [(r, s, None if pd.isna(i) else int(i)) for r, s, i in zip(ran["run"], ran["stage"], ran["item"])]
    assert rows == [
        (first.uid, "zeta", None),
        (first.uid, "alpha", 0),
        (first.uid, "alpha", 1),
        (second.uid, "zeta", None),  # a new input: zeta and everything after it ran again
        (second.uid, "alpha", 0),
    ]
    assert stage_cache.clear(ns) == 6 and stage_cache.listing(ns).empty


@pytest.fixture
def shell():
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    sh.extension_manager.load_extension("flowdapt_nb")
    yield sh
    sh.magics_manager.registry["FlowdaptMagics"]._close_current()
    sh.extension_manager.unload_extension("flowdapt_nb")


def test_magics_run_cache_and_cache_listing(shell, capsys):
    ns = f"cache-{uuid.uuid4().hex[:8]}"
    line = lambda text: shell.run_line_magic("flowdapt", text)  # noqa: E731
    line("executor local --threads --cpus 2")
    shell.run_cell_magic(
        "flowdapt",
        "workflow magic_cached",
        "- {name: numbers, target: cache_stages.numbers}\n"
        "- {name: score, target: cache_stages.score, type: parameterized, depends_on: [numbers]}\n",
    )
    first = line(f"run magic_cached --input n=3 --namespace {ns} --cache")
    second = line(f"run magic_cached --input n=3 --namespace {ns} --cache")
    plain = line(f"run magic_cached --input n=3 --namespace {ns}")
    assert set(first.tasks["state"]) == {"finished"} and set(plain.tasks["state"]) == {"finished"}
    assert set(second.tasks["state"]) == {"cached"} and second.result == first.result == [0, 1, 4]
    listed = line(f"cache --namespace {ns}")
    assert len(listed) == 4 and set(listed["namespace"]) == {ns}
    capsys.readouterr()
    assert line(f"cache clear --namespace {ns}") is None
    assert f"cleared 4 cached stage output(s) of namespace {ns}" in capsys.readouterr().out
    assert line(f"cache -n {ns}").empty


def unpicklable(xs):
    import threading

    return threading.Lock()  # no storage can hold it


def test_an_output_that_cannot_be_stored_still_succeeds_and_a_stored_run_shows_cached(threads):
    ns = f"cache-{uuid.uuid4().hex[:8]}"
    wf = fnb.Workflow(
        "lock_out",
        stages=[fnb.Stage("numbers", cs.numbers), fnb.Stage("lock", unpicklable, depends_on=["numbers"])],
    )
    with pytest.warns(RuntimeWarning, match="output of 'lock' not stored"):
        run = threads.run(wf, input={"n": 2}, namespace=ns, cache=True)
    assert run.state == "finished" and states(run) == {"lock": {"finished": 1}, "numbers": {"finished": 1}}
    again = threads.run(wf, input={"n": 2}, namespace=ns, cache=True)
    assert states(again) == {"lock": {"finished": 1}, "numbers": {"cached": 1}}
    threads._run_store.flush()
    stored = fnb.load_run(again.uid, store=threads._run_store.path)
    assert stored.tasks.set_index("stage")["state"].to_dict() == {"numbers": "cached", "lock": "finished"}
    dash = stored.dashboard()  # the tracker counts a reused output as done
    try:
        assert "1/1 done" in repr(dash).split("numbers", 1)[1].splitlines()[0]
    finally:
        dash.close()
    # a live dashboard of the cached run shows the reuse: the stage's cached count, the task's state
    tasks = widgets.TaskDashboard(threads)
    try:
        third = threads.run(wf, input={"n": 2}, namespace=ns, cache=True)
        deadline = time.monotonic() + 30  # the dashboard redraws from the event feed, throttled
        while not (
            tasks.run_id == third.uid
            and tasks.run_state == "finished"
            and tasks.stage_counts.get("numbers", {}).get("cached") == 1
        ):
            assert time.monotonic() < deadline, (tasks.run_id, third.uid, tasks.stage_counts)
            time.sleep(0.05)
        assert tasks.stage_counts["numbers"]["done"] == 1 and "cached" not in tasks.stage_counts["lock"]
        assert [r["state"] for r in tasks.recent_tasks if r["stage"] == "numbers"] == ["cached"]
        assert "1 cached" in tasks._body.value
    finally:
        tasks.close()
