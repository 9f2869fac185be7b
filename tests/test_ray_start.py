"""Ray start to first result: the executor's helper actors (event sink, cluster memory) are made
after the first run's first tasks are sent, never awaited at start, and a Ray worker imports
only the light worker-side module. The guarantees stay: 'running' reports of the very first
run arrive while it runs, cluster memory works from the driver before any run and from stages.

Timings are never asserted (benchmarks/run.py --sections startup measures them)."""

from __future__ import annotations

import pytest
import ray_start_stages as st
from conftest import poll

import flowdapt_nb as fnb

pytestmark = pytest.mark.timeout(600)


def _helper_actors() -> list[str]:
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("flowdapt_nb_")
    )


def test_first_run_waits_on_no_helper_actor_and_is_reported_live(ray_cluster, tmp_path):
    ray_cluster.close()  # one Ray per process: a fresh one of our own
    ex = fnb.RayExecutor(cpus=2, include_dashboard=False, logging_level="error").start()
    try:
        assert _helper_actors() == []  # nothing but the node itself at start
        running = []
        ex.events.subscribe(lambda e: running.append(e) if e.state == "running" else None, kinds={"task"})
        release = tmp_path / "go"
        wf = fnb.Workflow("held", stages=[fnb.Stage("held", st.held_until)])
        handle = ex.submit(wf, input={"path": str(release)})
        # the first run's task is seen running while it runs (its report waits for the sink actor
        # that its own start made, then travels as usual)
        poll(
            lambda: [e for e in running if e.run == handle.run.uid and e.stage == "held"],
            timeout=300,
            what="a 'running' report of the first run's task while it ran",
        )
        assert not handle.done()
        release.touch()
        run = handle.wait(300)
        assert run.state == "finished"
        # the worker imported the light worker-side module, not the executor's (pydantic config, engine)
        modules = run.result
        assert "flowdapt_nb.executors.ray_tasks" in modules, modules
        assert not {"flowdapt_nb.config", "flowdapt_nb.engine", "flowdapt_nb.executors.ray"} & set(modules), (
            modules
        )
        # the helpers exist now, and later runs go through the sink as before
        names = _helper_actors()
        assert any(n.startswith("flowdapt_nb_events_") for n in names), names
        assert any(n.startswith("flowdapt_nb_memory_") for n in names), names
        ex.make_current()
        fnb.cluster_memory.put("k", 41)
        reader = fnb.Workflow("r", stages=[fnb.Stage("read", st.read_memory)])
        for _ in range(2):
            assert ex.run(reader, input={"key": "k"}, timeout=300).result == 41
    finally:
        ex.close()


def test_cluster_memory_from_the_driver_before_any_run(ray_cluster):
    """The memory actor is made at its first use when that comes before any run."""
    ray_cluster.close()
    ex = ray_cluster.get()  # a fresh shared executor (later tests reuse it)
    assert _helper_actors() == []
    ex.make_current()
    fnb.cluster_memory.put("early", [1, 2])
    assert fnb.cluster_memory.get("early") == [1, 2]
    reader = fnb.Workflow("r", stages=[fnb.Stage("read", st.read_memory)])
    assert ex.run(reader, input={"key": "early"}, timeout=300).result == [1, 2]


def test_worker_column_and_resource_rows_name_the_ray_node(ray_cluster):
    """Every task's worker reads <node IP>:<pid>@<node id[:12]> and every resource row is named
    by the node id: nodes that share an IP (several on one machine) stay apart. The helper
    actors run on the driver's node."""
    import ray
    from ray._private.state import actors

    ex = ray_cluster.get()
    run = ex.run(
        fnb.Workflow("w", stages=[fnb.Stage("held", st.held_until)]), input={"path": "/"}, timeout=300
    )
    node = ray.get_runtime_context().get_node_id()
    (worker,) = run.tasks["worker"]
    address, short = worker.rsplit("@", 1)
    assert short == node[:12] and address.rsplit(":", 1)[1].isdigit(), worker
    assert list(ex.resources()["worker"]) == [node[:12]]
    helpers = {
        a["Name"]: a["Address"]["NodeID"]
        for a in actors(actor_state_name="ALIVE").values()
        if (a.get("Name") or "").startswith("flowdapt_nb_")
    }
    assert helpers and set(helpers.values()) == {node}, helpers
