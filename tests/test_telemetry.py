"""Live telemetry on every executor: task events from the workers, resource samples, tables."""

import threading

import stages as st
from conftest import poll

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow


def test_running_task_is_seen_running_while_it_runs(executor):
    seen = []
    token = executor.events.subscribe(seen.append, kinds={"task"})
    try:
        handle = executor.submit(
            Workflow("slow", stages=[Stage("slow", st.slow)]), input={"x": 1, "delay": 3}
        )
        running = poll(
            lambda: [e for e in seen if e.run == handle.run.uid and e.state == "running"], timeout=20
        )
        assert running and not handle.done()
        tasks = handle.run.tasks
        assert tasks.state.item() == "running" and tasks.start.notna().item()
        assert running[0].worker  # reported from the worker side
        handle.wait(30)
    finally:
        executor.events.unsubscribe(token)


def test_each_item_produces_its_events_in_order(executor):
    events = []
    lock = threading.Lock()

    def collect(batch):
        with lock:
            events.extend(batch)

    token = executor.events.subscribe(collect, kinds={"task"}, throttle=0.05)
    try:
        run = executor.run(
            Workflow(
                "order",
                stages=[
                    Stage("numbers", st.numbers),
                    Stage("check", st.fail_on_three, type="parameterized", depends_on=["numbers"]),
                ],
            ),
            input={"n": 6},
        )
        executor.events.flush()
    finally:
        executor.events.unsubscribe(token)
    mine = [e for e in events if e.run == run.uid and e.stage == "check"]
    for item in range(6):
        states = [e.state for e in mine if e.item == item]
        expected_end = "failed" if item == 3 else "finished"
        assert states == ["queued", "running", expected_end], (item, states)
    failed = [e for e in mine if e.state == "failed"]
    assert len(failed) == 1 and "ValueError" in failed[0].error and "item 3 is bad" in failed[0].error
    # the tables agree with the stream
    stages = run.stages.set_index("stage")
    assert stages.loc["check", "finished"] == 5 and stages.loc["check", "failed"] == 1
    assert stages.loc["check", "throughput"] > 0 and stages.loc["check", "duration"] > 0
    assert run.tasks.groupby("stage").size().to_dict() == {"check": 6, "numbers": 1}


def test_run_events_bracket_the_run(executor):
    seen = []
    token = executor.events.subscribe(seen.append, kinds={"run"})
    try:
        run = executor.run(Workflow("r", stages=[Stage("numbers", st.numbers)]), input={"n": 1})
    finally:
        executor.events.unsubscribe(token)
    assert [e.state for e in seen if e.run == run.uid] == ["running", "finished"]


def test_samples_show_real_workers_and_resources(executor):
    frame = poll(lambda: (lambda f: f if not f.empty else None)(executor.resources()), timeout=30)
    assert frame is not None and len(frame) >= 1
    workers = {w["name"] for w in executor.info()["workers"]}
    if executor.kind == "dask":
        assert set(frame.worker) == workers and len(workers) == 2
        assert (frame["hamster_wheels_total"] == 2).all()
        assert frame.cpu_percent.notna().all() and frame.memory_used.notna().all()
    elif executor.kind == "ray":
        assert (frame["hamster_wheels_total"] == 2).all() and (frame["CPU_total"] == 2).all()
        assert frame.cpu_percent.notna().all()
    else:
        assert (frame["cpus_total"] == 2).all() and frame.memory_used.notna().all()
    history = poll(lambda: (lambda f: f if len(f) >= 2 else None)(executor.resource_history()), timeout=30)
    assert history is not None and {"worker", "time", "cpu_percent"} <= set(history.columns)


def test_sample_stream_and_bounded_history():
    with fnb.LocalExecutor(use_processes=False, cpus=2, sample_interval=0.02, resource_history_limit=5) as ex:
        samples = []
        token = ex.events.subscribe(samples.append, kinds={"sample"})
        handle = ex.submit(
            Workflow("long", stages=[Stage("slow", st.slow, type="parameterized", options={"map_on": "xs"})]),
            input={"xs": [1, 2, 3, 4], "delay": 0.4},
        )
        poll(lambda: len(samples) > 20, timeout=20)
        assert len(ex.resource_history()) <= 5
        busy = [s.resources_available["cpus"] for s in samples]
        assert min(busy) < 2  # the samples saw slots in use
        handle.wait(30)
        ex.events.unsubscribe(token)


def test_closing_stops_every_sampler_thread():
    def ours():
        return [t for t in threading.enumerate() if t.name.startswith("flowdapt-nb") and t.is_alive()]

    before = set(ours())
    for kind in (False, True):
        ex = fnb.LocalExecutor(use_processes=kind, cpus=1, sample_interval=0.05).start()
        ex.events.subscribe(lambda batch: None, throttle=0.05)
        ex.run(Workflow("t", stages=[Stage("numbers", st.numbers)]), input={"n": 2})
        assert set(ours()) - before
        ex.close()
        assert poll(lambda: not (set(ours()) - before), timeout=10), set(ours()) - before


def test_closing_a_dask_executor_stops_its_threads():
    def ours():
        return {t for t in threading.enumerate() if t.name.startswith("flowdapt-nb") and t.is_alive()}

    before = ours()
    ex = fnb.DaskExecutor(cpus=1, threads=1, sample_interval=0.05).start()
    assert ex.run(Workflow("t", stages=[Stage("numbers", st.numbers)]), input={"n": 2}).result == [0, 1]
    ex.close()
    assert poll(lambda: not (ours() - before), timeout=10)
