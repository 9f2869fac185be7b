"""Widgets, headless: each one driven through real runs on local threads, Dask and Ray, checked by
its trait values (the same values the page draws)."""

from __future__ import annotations

import html
import re
import subprocess
import sys
import time

import pytest
import stages
from conftest import make_executor, poll

import flowdapt_nb as fnb

widgets = pytest.importorskip("flowdapt_nb.widgets")

KINDS = ["threads", "dask", "ray"]


@pytest.fixture(params=KINDS)
def ex(request):
    executor = make_executor(request.param)
    yield executor
    if request.param == "threads":
        executor.close()


def slow_squares(n_delay=0.3):
    return fnb.Workflow(
        "slow-squares",
        stages=[
            fnb.Stage("numbers", stages.numbers),
            fnb.Stage("square", stages.slow, type="parameterized", depends_on=["numbers"]),
            fnb.Stage("total", stages.total, depends_on=["square"]),
        ],
    )


def counts_from_tasks(run) -> dict:
    tasks = run.tasks
    out = {}
    names = {
        "finished": "done",
        "running": "running",
        "failed": "failed",
        "queued": "queued",
        "cancelled": "cancelled",
    }
    for stage in run.definition.stage_names:
        mine = tasks[tasks["stage"] == stage]
        row = {v: int((mine["state"] == k).sum()) for k, v in names.items()}
        cached = int((mine["state"] == "cached").sum())  # reused outputs count as done too
        row["done"] += cached
        if cached:
            row["cached"] = cached
        row["total"] = len(mine)
        out[stage] = row
    return out


# --- TaskDashboard ------------------------------------------------------------------------------


def test_task_dashboard_follows_a_run_and_matches_run_tasks(ex):
    dash = widgets.TaskDashboard(ex)
    seen = []
    dash.observe(lambda change: seen.append(dict(change["new"].get("square", {}))), names="stage_counts")
    handle = ex.submit(slow_squares(), input={"n": 8})
    poll(lambda: dash.run_id == handle.run.uid, before=ex.events.flush, what="condition")
    handle.wait(120)
    poll(
        lambda: dash.run_state == "finished" and dash.stage_counts["total"]["done"] == 1,
        before=ex.events.flush,
        what="condition",
    )
    run = handle.run
    assert dash.run_name == run.name
    assert dash.stage_counts == counts_from_tasks(run)
    assert dash.stage_counts["square"]["done"] == 8
    # the bar moved: it was seen part-way, with some items done and some not
    assert any(0 < s.get("done", 0) < 8 for s in seen), seen
    dones = [s.get("done", 0) for s in seen if s]
    assert dones == sorted(dones)  # never goes backwards
    assert dash.stage_states == {"numbers": "finished", "square": "finished", "total": "finished"}
    assert dash.throughput["square"] and dash.throughput["square"] > 0
    assert dash.eta["square"] == 0
    assert dash.recent_tasks and dash.recent_tasks[0]["stage"] == "total"
    assert all(r["worker"] for r in dash.recent_tasks if r["state"] == "finished")
    assert dash.failed_tasks == []
    body = dash._body.value
    assert 'data-stage="square"' in body and "8/8" in body and "fnb-seg-done" in body
    # an ended run's recent tasks carry clock times: "3 s ago" would be wrong once nothing redraws it
    assert " ago<" not in body and re.search(r'fnb-muted">\d\d:\d\d:\d\d<', body), body[-2000:]
    text = repr(dash)
    assert "square" in text and "8/8 done" in text and run.name in text
    dash.close()


def test_task_dashboard_shows_dropped_items_and_their_tracebacks(ex):
    wf = fnb.Workflow(
        "partial",
        stages=[
            fnb.Stage("numbers", stages.numbers),
            fnb.Stage("check", stages.fail_on_three, type="parameterized", depends_on=["numbers"]),
            fnb.Stage("total", stages.total, depends_on=["check"]),
        ],
    )
    dash = widgets.TaskDashboard(ex)
    run = ex.run(wf, input={"n": 5})
    assert run.result == 0 + 1 + 2 + 4
    poll(
        lambda: dash.run_id == run.uid and dash.run_state == "finished" and dash.failed_tasks,
        before=ex.events.flush,
        what="condition",
    )
    assert dash.stage_counts == counts_from_tasks(run)
    assert dash.stage_counts["check"]["failed"] == 1 and dash.stage_counts["check"]["done"] == 4
    [failed] = dash.failed_tasks
    assert (failed["stage"], failed["item"]) == ("check", 3)
    assert "ValueError: item 3 is bad" in failed["error"]
    # open the failed item to its worker traceback, as the dropdown does
    option = [v for _, v in dash._failed_pick.options if v == ("check", 3)]
    assert option
    dash._failed_pick.value = option[0]
    assert "fail_on_three" in dash.traceback_text and "item 3 is bad" in dash.traceback_text
    assert dash.traceback_text == run.failures[0].traceback
    assert "fail_on_three" in dash._traceback.value
    assert "item 3 is bad" in dash._body.value and "dropped under allow_partial_failure" in dash._body.value
    assert "failed check[3]: ValueError: item 3 is bad" in repr(dash)
    dash.close()


def test_task_dashboard_shows_a_failed_run(ex):
    wf = fnb.Workflow(
        "broken",
        stages=[
            fnb.Stage("numbers", stages.numbers),
            fnb.Stage("explode", stages.boom, depends_on=["numbers"]),
        ],
    )
    dash = widgets.TaskDashboard(ex)
    with pytest.raises(fnb.StageError):
        ex.run(wf, input={"n": 2})
    run = ex.history[-1]
    poll(
        lambda: dash.run_id == run.uid and dash.run_state == "failed" and dash.failed_tasks,
        before=ex.events.flush,
        what="condition",
    )
    assert dash.stage_states["explode"] == "failed"
    text = dash.show_traceback("explode", None)
    assert "boom happened" in text and "def boom" not in text and "boom" in text
    assert "KeyError" in text
    assert "boom happened" in dash._body.value  # the run's error on the dashboard
    dash.close()


def test_task_dashboard_pinned_to_a_run_and_picker():
    ex = make_executor("threads")
    try:
        first = ex.run(slow_squares(), input={"n": 2})
        dash = widgets.TaskDashboard(ex, run=first)
        second = ex.run(slow_squares(), input={"n": 3})
        ex.events.flush()
        assert dash.run_id == first.uid and dash.stage_counts["square"]["total"] == 2
        # the picker lists the runs; choosing "follow" moves to the newest
        values = [v for _, v in dash._picker.options]
        assert first.uid in values and second.uid in values
        dash._picker.value = "__follow__"
        assert dash.run_id == second.uid and dash.stage_counts["square"]["total"] == 3
        dash._picker.value = first.uid
        assert dash.run_id == first.uid
        # a dashboard opened mid-run starts from the run's record, then follows
        handle = ex.submit(slow_squares(), input={"n": 6})
        poll(
            lambda: handle.run.tasks["state"].eq("finished").sum() >= 2,
            before=ex.events.flush,
            what="condition",
        )
        late = widgets.TaskDashboard(ex)
        assert late.run_id == handle.run.uid and late.stage_counts["numbers"]["done"] == 1
        handle.wait(60)
        poll(lambda: late.stage_counts["square"]["done"] == 6, before=ex.events.flush, what="condition")
        assert late.stage_counts == counts_from_tasks(handle.run)
        late.close()
        dash.close()
    finally:
        ex.close()


def test_task_dashboard_is_throttled_and_unsubscribes_on_close():
    ex = make_executor("threads")
    try:
        before = len(ex.events._subs)
        dash = widgets.TaskDashboard(ex)
        assert len(ex.events._subs) == before + 1
        wf = fnb.Workflow(
            "many",
            stages=[
                fnb.Stage("numbers", stages.numbers),
                fnb.Stage("square", stages.square, type="parameterized", depends_on=["numbers"]),
            ],
        )
        start_redraws = dash.redraws
        t0 = time.monotonic()
        run = ex.run(wf, input={"n": 600})
        deadline = time.monotonic() + 10
        while dash.stage_counts.get("square", {}).get("done") != 600 and time.monotonic() < deadline:
            time.sleep(0.05)  # no flush: only the dispatcher's throttled deliveries
        elapsed = time.monotonic() - t0
        assert dash.stage_counts["square"]["done"] == 600, "throttled batches should still arrive"
        redraws = dash.redraws - start_redraws
        assert redraws <= elapsed * 10 + 3, (redraws, elapsed)  # ~1800 events, at most ~10 redraws/s
        assert len(run.tasks) == 601
        dash.close()
        assert len(ex.events._subs) == before
    finally:
        ex.close()


# --- ResourceDashboard --------------------------------------------------------------------------


def test_resource_dashboard_per_worker_gauges_and_series(ex):
    cpu_key = {"local": "cpus", "dask": "cpus", "ray": "CPU"}[ex.kind]
    dash = widgets.ResourceDashboard(ex, window=120)
    poll(
        lambda: dash.workers and all(f"{cpu_key}_total" in dash.latest[w] for w in dash.workers),
        before=ex.events.flush,
        what="condition",
    )
    expected_workers = {"local": 1, "dask": 2, "ray": 1}[ex.kind]
    assert len(dash.workers) == expected_workers
    total_cpus = sum(dash.latest[w][f"{cpu_key}_total"] for w in dash.workers)
    assert total_cpus == 2
    if ex.kind in ("dask", "ray"):  # Dask: per worker; Ray: per node
        assert all(dash.latest[w]["hamster_wheels_total"] == 2 for w in dash.workers)
    baseline = sum(dash.latest[w][f"{cpu_key}_used"] or 0 for w in dash.workers)
    peak = [baseline]
    wf = fnb.Workflow(
        "busy", stages=[fnb.Stage("work", stages.slow, type="parameterized", options={"map_on": "xs"})]
    )
    handle = ex.submit(wf, input={"xs": list(range(8)), "delay": 1.0})

    def busier():
        used = sum(dash.latest[w].get(f"{cpu_key}_used") or 0 for w in dash.workers)
        peak.append(used)
        return used > baseline

    poll(busier, timeout=60, before=ex.events.flush, what="condition")
    handle.wait(120)
    assert max(peak) > baseline
    assert dash.samples >= 2
    if ex.kind in ("local", "dask"):  # measured on every worker (Ray: on this machine's node)
        assert all(dash.latest[w]["cpu_percent"] is not None for w in dash.workers)
        assert all(dash.latest[w]["memory_used"] for w in dash.workers)
    body = dash._body.value
    assert "fnb-spark" in body and "<polyline" in body and "fnb-gauge" in body
    assert cpu_key in body
    text = repr(dash)
    assert f"{cpu_key} " in text and "worker(s)" in text
    # samples older than the window drop out
    dash.window = 0.5
    time.sleep(0.6)
    dash._redraw()
    assert dash.samples <= len(dash.workers)
    dash.close()


def test_resource_dashboard_draws_gpus_when_workers_have_them():
    # a GPU node's sample, published on a real executor's stream as a sampler would
    from flowdapt_nb.events import ResourceSample

    ex = make_executor("threads")
    try:
        dash = widgets.ResourceDashboard(ex)
        now = time.time()
        for i, (busy, gpu) in enumerate([(1, 35.0), (2, 70.0)]):
            ex.events.publish(
                ResourceSample(
                    "gpu-node",
                    now - 1 + i,
                    cpu_percent=50.0,
                    memory_used=int(20e9),
                    memory_limit=int(64e9),
                    gpu_percent=gpu,
                    gpu_memory_used=int(40e9),
                    gpu_memory_limit=int(80e9),
                    resources_total={"CPU": 8, "GPU": 2},
                    resources_available={"CPU": 8 - busy, "GPU": 2 - busy},
                )
            )
        ex.events.flush()
        assert dash.latest["gpu-node"]["gpu_percent"] == 70.0
        assert dash.latest["gpu-node"]["GPU_used"] == 2 and dash.latest["gpu-node"]["CPU_used"] == 2
        body = dash._body.value
        assert "<th>gpu</th>" in body and "70%" in body and "40.0 GB" in body
        assert "gpu 70%" in repr(dash) and "GPU 2/2" in repr(dash)
        dash.close()
    finally:
        ex.close()


def test_executor_card_of_an_executor_not_started():
    ex = fnb.LocalExecutor(use_processes=False, cpus=1)
    card = widgets.ExecutorCard(ex)
    assert card.state == "stopped" and card.stop_button.disabled and card.n_workers == 0
    assert "stopped" in repr(card)
    card.close()


# --- ExecutorCard and Dashboard ---------------------------------------------------------------


def test_executor_card_shows_the_executor(ex):
    card = widgets.ExecutorCard(ex)
    info = ex.info()
    assert card.kind == ex.kind and card.state == "running"
    assert card.address == str(info["address"]) and card.address
    assert card.n_workers == len(info["workers"]) >= 1
    assert card.resources == info["resources"]
    if ex.kind in ("dask", "ray"):
        assert card.dashboard_url.startswith("http://127.0.0.1:")
        assert card.dashboard_url in card._body.value
    else:
        assert card.dashboard_url == ""
    assert not card.stop_button.disabled
    text = repr(card)
    assert ex.kind in text and "running" in text and card.address in text
    page = card._repr_html_()
    assert "<style>" not in page and "<svg" not in page and card.address in page  # sanitizer-safe
    bundle = card._repr_mimebundle_()
    assert bundle["text/plain"] == text and "application/vnd.jupyter.widget-view+json" in bundle
    card.close()


@pytest.mark.parametrize("kind", ["threads", "dask"])
def test_executor_card_stop_button_closes_the_executor(kind):
    ex = (
        fnb.LocalExecutor(use_processes=False, cpus=2)
        if kind == "threads"
        else fnb.DaskExecutor(cpus=1, threads=1)
    )
    ex.start()
    try:
        card = widgets.ExecutorCard(ex)
        assert card.state == "running"
        dashboard = card.dashboard_url
        card.stop_button.click()
        assert not ex.running
        assert card.state == "stopped" and card.stop_button.disabled
        assert "stopped" in card._body.value and "stopped" in repr(card)
        # nothing of the stopped cluster is shown as if still there: no workers, no live link
        assert card.n_workers == 0 and card.resources == {} and card.active_runs == 0
        assert "workers:   0" in repr(card)
        if dashboard:  # the Dask cluster it started is gone, and its dashboard with it
            assert card.dashboard_url == "" and dashboard not in card._body.value
        card.close()
    finally:
        ex.close()


def test_executor_card_turns_stopped_when_the_executor_is_closed_elsewhere():
    ex = fnb.LocalExecutor(use_processes=False, cpus=1).start()
    card = widgets.ExecutorCard(ex)
    try:
        assert card.state == "running"
        ex.close()  # not through the card: %flowdapt stop, another cell, a script
        assert card.state == "stopped" and card.stop_button.disabled
        assert "stopped" in card._body.value
        assert card.n_workers == 0 and "workers:   0" in repr(card)
        ex.start()  # started again, its event stream delivers again
        seen = []
        token = ex.events.subscribe(seen.append, kinds=("run",), throttle=0.05)
        ex.run(slow_squares(), input={"n": 2})
        poll(
            lambda: any(e.state == "finished" for batch in seen for e in batch),
            before=ex.events.flush,
            what="condition",
        )
        ex.events.unsubscribe(token)
    finally:
        card.close()
        ex.close()


def test_dashboard_links_the_native_dashboard_and_moves(ex):
    dash = widgets.Dashboard(ex)
    assert isinstance(dash.tasks, widgets.TaskDashboard) and isinstance(
        dash.resources, widgets.ResourceDashboard
    )
    if ex.kind in ("dask", "ray"):
        assert dash.dashboard_url.startswith("http://127.0.0.1:")
        assert dash.dashboard_url in dash._header.value and "fnb-native-link" in dash._header.value
    else:
        assert dash.dashboard_url == "" and "fnb-native-link" not in dash._header.value
    run = ex.run(slow_squares(), input={"n": 4})
    poll(
        lambda: dash.tasks.run_id == run.uid and dash.tasks.stage_counts["total"]["done"] == 1,
        before=ex.events.flush,
        what="condition",
    )
    poll(lambda: dash.resources.workers, before=ex.events.flush, what="condition")
    assert dash.tasks.stage_counts == counts_from_tasks(run)
    page = dash._repr_html_()
    assert "square" in page and "Resources" in page
    text = repr(dash)
    assert "TaskDashboard" in text and "ResourceDashboard" in text
    subs = len(ex.events._subs)
    dash.close()
    assert len(ex.events._subs) == subs - 2


# --- StageMapper --------------------------------------------------------------------------------


def _namespace():
    return {
        "numbers": stages.numbers,
        "square": stages.square,
        "total": stages.total,
        "slow": stages.slow,
        "add": stages.add,
        "fail_on_three": stages.fail_on_three,
        "not_a_function": 42,
    }


def test_mapper_lists_functions_and_builds_a_workflow():
    mapper = widgets.StageMapper(namespace=_namespace())
    assert {"numbers", "square", "total", "slow", "add"} <= set(mapper.functions)
    assert "not_a_function" not in mapper.functions
    assert any("square(x)" in label for label, _ in mapper.functions_w.options)
    assert mapper.workflow_error  # no stages yet
    mapper.name_w.value = "squares"
    mapper.add_stage("numbers", "numbers")
    mapper.add_stage("square", "square", type="parameterized", depends_on=["numbers"], resources={"cpus": 1})
    mapper.add_stage("total", "total", depends_on=["square"])
    assert mapper.errors == {} and mapper.workflow_error == ""
    wf = mapper.workflow
    assert isinstance(wf, fnb.Workflow) and wf.name == "squares"
    assert wf.stage_names == ["numbers", "square", "total"]
    assert wf.stage("square").type == "parameterized" and wf.stage("square").resources == {"cpus": 1}
    # the DAG is drawn from the mapping
    assert "<svg" in mapper.svg and ">square [*]<" in mapper.svg and mapper.svg.count("<line") == 2
    # the UI's "Add as stage" picks the function and chains it after the last stage
    mapper.functions_w.value = "slow"
    mapper.add_fn_w.click()
    assert mapper.stages["slow"].deps_w.value == ("total",) or list(mapper.stages["slow"].deps_w.value) == [
        "total"
    ]
    mapper.remove_stage("slow")
    assert mapper.stage_names() == ["numbers", "square", "total"]
    # renaming a stage renames it where others depend on it
    mapper.stages["square"].name_w.value = "sq"
    assert list(mapper.stages["total"].deps_w.value) == ["sq"] and mapper.errors == {}
    text = repr(mapper)
    assert "sq [*]: square <- numbers" in text
    page = mapper._repr_html_()
    assert "<svg" not in page and "fnb-dag-box" in page and "sq" in page  # the DAG as HTML boxes
    mapper.close()


def test_mapper_shows_invalid_mappings_on_their_stages():
    mapper = widgets.StageMapper(namespace=_namespace())
    mapper.add_stage("a", "numbers")
    mapper.add_stage("b", "square", type="parameterized", depends_on=["nope"])  # unknown dependency: no raise
    assert "depends on unknown stage 'nope'" in mapper.errors["b"]
    assert "unknown stage" in mapper.stages["b"].error_w.value
    assert "fnb-invalid" in mapper.stages["b"]._dom_classes
    assert "fnb-valid" in mapper.stages["a"]._dom_classes
    assert 'stroke="#e53935"' in mapper.svg  # marked on the DAG too
    with pytest.raises(fnb.ConfigError, match="unknown stage 'nope'"):
        _ = mapper.workflow
    with pytest.raises(fnb.ConfigError):
        mapper.export_yaml()
    # a cycle is shown on every stage in it
    mapper.set_stage("b", depends_on=["a"])
    assert "b" not in mapper.errors
    mapper.set_stage("a", depends_on=["b"])
    assert "dependency cycle" in mapper.errors["a"] and "dependency cycle" in mapper.errors["b"]
    mapper.set_stage("a", depends_on=[])
    assert mapper.errors == {}
    # a target that is neither a notebook function nor an import path
    mapper.set_stage("a", target="nubmers")
    assert "did you mean 'numbers'?" in mapper.errors["a"]
    mapper.set_stage("a", target="stages.numbers")  # an import path typed in
    assert mapper.errors == {}
    mapper.set_stage("a", target="no_such_module.func")
    assert "does not import" in mapper.errors["a"]
    mapper.set_stage("a", target="numbers")
    # a parameterized root needs map_on; a signature that can't take the dependency outputs
    mapper.add_stage("c", "square", type="parameterized")
    assert "map_on" in mapper.errors["c"]
    mapper.set_stage("c", map_on="xs")
    assert "c" not in mapper.errors
    mapper.add_stage("d", "square", depends_on=["a", "b"])
    assert "positional argument" in mapper.errors["d"]
    mapper.set_stage("d", target="add")
    assert "d" not in mapper.errors
    # duplicate names, bad names, bad resources
    mapper.add_stage("d", "total", depends_on=["b"])
    assert "also named 'd'" in mapper.errors["d"]
    mapper.remove_stage(mapper._rows[-1])
    mapper.set_stage("d", resources="cpus=lots")
    assert "resources.cpus must be a non-negative number" in mapper.errors["d"]
    mapper.set_stage("d", resources="cpus=1, memory=1GB")
    assert mapper.errors == {}
    mapper.name_w.value = "bad name!"
    assert "workflow name" in mapper.workflow_error
    with pytest.raises(fnb.ConfigError, match="workflow name"):
        _ = mapper.workflow
    mapper.name_w.value = "fine"
    assert mapper.workflow.stage("d").resources == {"cpus": 1, "memory": "1GB"}
    # the UI never raises: a bad action lands in the status line
    mapper.set_stage("a", depends_on=["zzz"])
    mapper.export_w.click()
    assert "unknown stage 'zzz'" in html.unescape(mapper.status_w.value)
    assert "! depends on unknown stage 'zzz'" in repr(mapper)
    mapper.close()


def test_mapper_exported_yaml_round_trips_and_runs(ex, tmp_path):
    mapper = widgets.StageMapper(namespace=_namespace())
    mapper.name_w.value = "mapped"
    mapper.add_stage("numbers", stages.numbers)
    mapper.add_stage(
        "square", stages.square, type="parameterized", depends_on=["numbers"], allow_partial_failure=False
    )
    mapper.add_stage("total", "total", depends_on=["square"])
    path = tmp_path / "mapped.yaml"
    text = mapper.export_yaml(path)
    assert path.read_text() == text and mapper.yaml_w.value == text
    loaded = fnb.load_workflow(text)
    assert loaded.to_dict() == mapper.workflow.to_dict()
    assert loaded.stage("numbers").target == "stages.numbers"
    assert loaded.stage("square").options == {"allow_partial_failure": False}
    run = ex.run(loaded, input={"n": 5})
    assert run.result == sum(i * i for i in range(5))
    # and loads back into a mapper unchanged
    other = widgets.StageMapper(namespace={})
    other.load(path)
    assert other.export_yaml() == text and other.name == "mapped"
    mapper.close()
    other.close()


def test_mapper_runs_and_colours_the_dag(ex):
    mapper = widgets.StageMapper(namespace=_namespace())
    mapper.add_stage("numbers", "numbers")
    mapper.add_stage("square", "slow", type="parameterized", depends_on=["numbers"])
    mapper.add_stage("total", "total", depends_on=["square"])
    seen = []
    mapper.observe(lambda c: seen.append(dict(c["new"])), names="stage_states")
    handle = mapper.run(ex, input={"n": 6})
    assert mapper.executor is ex
    run = handle.wait(120)
    assert run.result == sum(range(6))
    poll(lambda: mapper.stage_states.get("total") == "finished", before=ex.events.flush, what="condition")
    assert mapper.stage_states == {"numbers": "finished", "square": "finished", "total": "finished"}
    assert mapper.run_state == "finished"
    assert any(s.get("square") == "running" for s in seen), seen
    assert mapper.svg.count("#43a047") == 3  # three green stages
    assert "finished" in mapper.stages["total"].state_w.value
    assert "result:" in mapper.status_w.value and "15" in mapper.status_w.value
    mapper.close()


def test_mapper_buttons_drive_it_like_a_user():
    calls = []

    def numbers(n=3):
        return list(range(n))

    def double(x):  # a notebook function: not importable, resolved from the namespace
        calls.append(x)
        return 2 * x

    ns = {"numbers": numbers, "double": double}
    ex = make_executor("threads")
    mapper = widgets.StageMapper(namespace=ns, executor=ex)
    try:
        mapper.functions_w.value = "numbers"
        mapper.add_fn_w.click()
        mapper.functions_w.value = "double"
        mapper.add_fn_w.click()
        assert mapper.stage_names() == ["numbers", "double"]
        mapper.stages["double"].type_w.value = "parameterized"
        assert mapper.errors == {}
        mapper.input_w.value = "{'n': 4}"
        mapper.run_w.click()
        assert mapper._handle is not None
        run = mapper._handle.wait(30)
        assert run.result == [0, 2, 4, 6] and sorted(calls) == [0, 1, 2, 3]
        poll(lambda: mapper.run_state == "finished", before=ex.events.flush, what="condition")
        assert mapper.run_w.description == "Run"
        # a bad input is shown, not raised
        mapper.input_w.value = "[1, 2]"
        mapper.run_w.click()
        assert "must be a dict" in mapper.status_w.value
        # Export YAML shows it; Load takes it back (also from a Workflow variable in the namespace)
        mapper.export_w.click()
        assert "kind: workflow" in mapper.yaml_w.value and "target: double" in mapper.yaml_w.value
        ns["wf_saved"] = fnb.Workflow("saved", stages=[fnb.Stage("only", "numbers")])
        mapper.load_w.click()
        assert "wf_saved" in [v for _, v in mapper.load_pick_w.options]
        mapper.load_pick_w.value = "wf_saved"
        mapper.load_go_w.click()
        assert mapper.stage_names() == ["only"] and mapper.name == "saved"
        assert "loaded saved" in html.unescape(mapper.status_w.value)
        mapper.load_w.click()
        mapper.load_pick_w.value = None
        mapper.load_text_w.value = (
            "kind: workflow\nmetadata: {name: pasted}\nspec:\n  stages:\n    - {name: x, target: numbers}\n"
        )
        mapper.load_go_w.click()
        assert mapper.name == "pasted" and mapper.stage_names() == ["x"] and mapper.errors == {}
        # new functions defined later show up on refresh
        ns["later"] = lambda: 1
        ns["later"].__name__ = "later"
        mapper.refresh_w.click()
        assert "later" in mapper.functions
    finally:
        mapper.close()
        ex.close()


def test_mapper_run_button_cancels_a_run_in_progress():
    ex = make_executor("threads")
    mapper = widgets.StageMapper(namespace=_namespace(), executor=ex)
    try:
        mapper.add_stage("work", "slow", type="parameterized", map_on="xs")
        mapper.input_w.value = "xs=[1, 2, 3, 4, 5, 6, 7, 8]"
        mapper.run_w.click()
        handle = mapper._handle
        poll(lambda: mapper.stage_states.get("work") == "running", before=ex.events.flush, what="condition")
        assert mapper.run_w.description == "Cancel"
        mapper.run_w.click()
        assert handle.wait(30).state == "cancelled"
        poll(lambda: mapper.run_state == "cancelled", before=ex.events.flush, what="condition")
        assert handle.run.state == "cancelled" and mapper.run_w.description == "Run"
    finally:
        mapper.close()
        ex.close()


def test_mapper_uses_its_own_thread_pool_when_no_executor_runs():
    # in a fresh interpreter, where no executor of this test session is running
    code = """
import flowdapt_nb as fnb, stages
from flowdapt_nb.widgets import StageMapper
assert fnb.current_executor() is None
mapper = StageMapper(namespace={"numbers": stages.numbers})
mapper.add_stage("numbers", "numbers")
handle = mapper.run(input={"n": 3})
assert handle.wait(30).result == [0, 1, 2]
own = mapper._own_executor
assert own is not None and own.kind == "local" and own.running
mapper.close()
assert not own.running
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


# --- views and imports ------------------------------------------------------------------------


def test_every_widget_has_html_and_text_views():
    from IPython.core.formatters import DisplayFormatter

    formatter = DisplayFormatter()  # IPython's, without making a global shell
    ex = make_executor("threads")
    try:
        ex.run(slow_squares(0), input={"n": 2})
        made = [
            widgets.ExecutorCard(ex),
            widgets.TaskDashboard(ex),
            widgets.ResourceDashboard(ex),
            widgets.Dashboard(ex),
            widgets.StageMapper(namespace=_namespace()),
        ]
        for w in made:
            page = w._repr_html_()
            text = repr(w)
            # inline styles only: a saved untrusted notebook drops <style> blocks and <svg>
            assert "<style" not in page and "<svg" not in page and 'style="' in page, type(w)
            assert text and "\n" in text or len(text) > 20, type(w)
            assert "<" not in text.splitlines()[0] or "lambda" in text, text
            bundle = w._repr_mimebundle_()
            assert bundle["text/plain"] == text
            # what a notebook stores: the live view, and HTML and text for nbconvert and terminals
            data, _ = formatter.format(w)
            assert {"application/vnd.jupyter.widget-view+json", "text/html", "text/plain"} <= set(data)
            assert data["text/plain"] == text and data["text/html"] == page
            w.close()
    finally:
        ex.close()


def test_import_flowdapt_nb_stays_light():
    code = (
        "import sys, flowdapt_nb; assert 'ipywidgets' not in sys.modules; "
        "import flowdapt_nb.widgets; assert 'ipywidgets' in sys.modules; "
        "assert 'ray' not in sys.modules and 'distributed' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
