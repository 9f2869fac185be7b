"""Beyond one machine: multi-node Ray and Dask clusters on 127.0.0.1 (every node its own set of
processes, started by the engines' own command lines), placement of stages by logical resources,
and the loss of a worker node mid-run."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil
import pytest
from clusters_multinode import DaskNodes, RayNodes, kill_tree, wait_for_workers
from conftest import poll

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow

pytestmark = pytest.mark.timeout(300)  # a hang fails one test, not the suite


def fan_out(name: str, fn, **resources) -> Stage:
    """A parameterized stage over the run input's ``xs``, asking for ``resources``."""
    return Stage(name, fn, type="parameterized", options={"map_on": "xs"}, resources=resources)


def placement_workflow():
    """Two parameterized stages: one may only run where ``gpu_node`` is, one where ``big_memory`` is."""

    def on_gpu(x):
        return ("gpu", x, os.getpid())

    def on_big(x):
        return ("big", x, os.getpid())

    return Workflow(
        "placement",
        stages=[
            fan_out("on_gpu", on_gpu, cpus=1, gpu_node=1),
            fan_out("on_big", on_big, cpus=1, big_memory=1),
        ],
    )


# --- Ray -------------------------------------------------------------------------------------


@pytest.fixture
def ray_nodes(ray_cluster):
    ray_cluster.close()  # one Ray connection per process: the shared cluster steps aside
    nodes = RayNodes(
        {
            "gpu": ["--num-gpus", "1", "--resources", '{"gpu_node": 1}'],
            "big": ["--resources", '{"big_memory": 1}'],
        }
    )
    with nodes:
        yield nodes


def test_ray_stages_run_on_the_node_with_their_resources(ray_nodes):
    ex = fnb.RayExecutor(cluster_address=ray_nodes.address, logging_level="error", connect_timeout=60)
    ex.start()
    try:
        poll(
            lambda: len(ex.info()["workers"]) == 3,
            120,
            0.5,
            what=f"3 Ray nodes (logs: {ray_nodes.log('gpu')} {ray_nodes.log('big')})",
        )
        assert ex.info()["resources"].get("gpu_node") == 1 and ex.info()["resources"].get("big_memory") == 1
        run = ex.run(placement_workflow(), input={"xs": [1, 2, 3]})
        tasks = run.tasks
        assert len(tasks) == 6 and set(tasks["state"]) == {"finished"}, tasks
        ids = ray_nodes.node_ids()

        def node_of(label: str) -> str | None:
            """Our node whose Ray node id (or its first 12 characters) a worker label carries."""
            return next((name for name, node_id in ids.items() if node_id[:12] in str(label)), None)

        # The worker column reads ip:pid@node-id: every node here has the same IP (this machine's),
        # so the node id is what tells them apart.
        for stage, node in (("on_gpu", "gpu"), ("on_big", "big")):
            workers = tasks[tasks["stage"] == stage]["worker"]
            assert {node_of(w) for w in workers} == {node}, (workers, ids)
        # One row per node in the resource table, named by its node id, each with its own
        # logical resources.
        frame = ex.resources()
        rows = {node_of(label): row for label, (_, row) in zip(frame.iloc[:, 0], frame.iterrows())}
        assert set(rows) == {"head", "gpu", "big"}, (frame, ids)
        assert rows["gpu"]["gpu_node_total"] == 1 and rows["big"]["big_memory_total"] == 1, frame
        assert not rows["big"]["gpu_node_total"] > 0 and not rows["gpu"]["big_memory_total"] > 0, frame
    finally:
        ex.close()


# --- Dask ------------------------------------------------------------------------------------


def dask_executor(nodes: DaskNodes, workers: int) -> fnb.DaskExecutor:
    ex = fnb.DaskExecutor(cluster_address=nodes.address, connect_timeout=60)
    ex.start()
    wait_for_workers(ex, workers, logs=nodes.logs)
    return ex


def test_dask_stages_run_on_the_worker_with_their_resources():
    with DaskNodes({"gpu": "cpus=1 gpu_node=1", "big": "cpus=1 big_memory=1"}) as nodes:
        ex = dask_executor(nodes, 2)
        try:
            run = ex.run(placement_workflow(), input={"xs": [1, 2, 3]})
            tasks = run.tasks
            assert len(tasks) == 6 and set(tasks["state"]) == {"finished"}, tasks
            # The worker column is the Dask worker's address: the one that has the resource.
            assert set(tasks[tasks["stage"] == "on_gpu"]["worker"]) == {nodes.worker_address("gpu")}, tasks
            assert set(tasks[tasks["stage"] == "on_big"]["worker"]) == {nodes.worker_address("big")}, tasks
            frame = ex.resources()
            assert len(frame) == 2 and set(frame.iloc[:, 0]) == {
                nodes.worker_address("gpu"),
                nodes.worker_address("big"),
            }, frame
            text = frame.to_string()
            assert "gpu_node" in text and "big_memory" in text, text
        finally:
            ex.close()


# --- node loss -------------------------------------------------------------------------------


def slow_square(x):
    time.sleep(2)
    return x * x


def held_on(worker_name: str, marker_dir: str, seconds: float = 0.5):
    """A stage that squares its item, except on the Dask worker named ``worker_name``: there it
    leaves a marker file and holds its task until that worker is killed. So the test knows a task
    is in flight there from the worker itself (the 'running' report can lag seconds behind on a
    loaded machine, and a 2 s task could finish unseen), and no result ever finishes there."""

    def square(x):
        from distributed import get_worker

        if get_worker().name == worker_name:
            Path(marker_dir, str(x)).touch()
            time.sleep(600)
        time.sleep(seconds)
        return x * x

    return square


def test_dask_lost_worker_mid_run_is_retried_on_the_survivor(tmp_path):
    with DaskNodes({"a": "cpus=1", "b": "cpus=1"}) as nodes:
        ex = dask_executor(nodes, 2)
        try:
            wf = Workflow(
                "loss",
                stages=[fan_out("slow", held_on("a", str(tmp_path)), cpus=1)],
            )
            handle = ex.submit(wf, input={"xs": list(range(6))})
            poll(
                lambda: any(tmp_path.iterdir()),
                120,
                0.5,
                what=f"a task in flight on worker a ({handle.run.tasks})",
            )
            kill_tree(nodes.procs["a"])  # the node's nanny and worker, SIGKILL: no goodbye to the scheduler
            run = handle.wait(240)
            # The scheduler noticed the lost worker and ran its tasks again on the survivor.
            assert run.state == "finished" and not run.failures, run.tasks
            assert run.result == [x * x for x in range(6)], run.tasks
            assert set(run.tasks["worker"]) == {nodes.worker_address("b")}, run.tasks
            poll(lambda: len(ex.resources()) == 1, 60, 0.5, what="the lost worker gone from ex.resources()")
            assert list(ex.resources().iloc[:, 0]) == [nodes.worker_address("b")]
            assert ex.run(wf, input={"xs": [3]}).result == [9]  # the executor goes on
        finally:
            ex.close()


def test_dask_lost_only_worker_with_a_resource_fails_the_run_in_bounded_time(tmp_path):
    # Dask keeps a task that no live worker can run waiting ("no-worker") until a worker with its
    # resources joins; the scheduler's no-workers-timeout turns that wait into the task's error.
    env = {"DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT": "5s"}
    with DaskNodes({"gpu": "cpus=1 gpu_node=1", "big": "cpus=1 big_memory=1"}, scheduler_env=env) as nodes:
        ex = dask_executor(nodes, 2)
        try:
            wf = Workflow(
                "loss",
                stages=[fan_out("on_gpu", held_on("gpu", str(tmp_path)), cpus=1, gpu_node=1)],
            )
            handle = ex.submit(wf, input={"xs": list(range(4))})
            poll(lambda: any(tmp_path.iterdir()), 120, 0.5, what="a task in flight on worker gpu")
            kill_tree(nodes.procs["gpu"])  # no item finished there: every one waits for a gpu_node
            with pytest.raises(fnb.StageError) as err:
                handle.wait(240)
            print(type(err.value), err.value)
            assert "on_gpu" in str(err.value)
            poll(lambda: len(ex.resources()) == 1, 60, 0.5, what="the lost worker gone from ex.resources()")
            assert list(ex.resources().iloc[:, 0]) == [nodes.worker_address("big")]
            big = Workflow(
                "next", stages=[Stage("on_big", slow_square, resources={"cpus": 1, "big_memory": 1})]
            )
            assert ex.run(big, input={"x": 4}).result == 16
        finally:
            ex.close()


def held_on_ray_node(node_id: str, marker_dir: str, seconds: float = 0.5):
    """As ``held_on``, for Ray: on the node ``node_id`` the task marks itself and holds until the
    node is killed; elsewhere it squares its item."""

    def square(x):
        import ray

        if ray.get_runtime_context().get_node_id() == node_id:
            Path(marker_dir, str(x)).touch()
            time.sleep(600)
        time.sleep(seconds)
        return x * x

    return square


def test_ray_lost_worker_node_mid_run_is_retried_on_the_survivors(ray_cluster, tmp_path):
    ray_cluster.close()  # one Ray connection per process
    with RayNodes({"a": [], "b": []}) as nodes:
        ex = fnb.RayExecutor(cluster_address=nodes.address, logging_level="error", connect_timeout=60)
        ex.start()
        try:
            poll(lambda: len(ex.info()["workers"]) == 3, 120, 0.5, what="3 Ray nodes")
            import ray
            from ray._private.state import actors  # from the GCS: this head runs no dashboard

            ids = nodes.node_ids()
            # Our helper actors are made with a run's first tasks, and start in the background.
            assert ex.run(Workflow("warm", stages=[Stage("one", lambda: 1)])).result == 1

            def alive_helpers() -> dict[str, str]:
                return {
                    a["Name"]: a["Address"]["NodeID"]
                    for a in actors(actor_state_name="ALIVE").values()
                    if (a.get("Name") or "").startswith("flowdapt_nb_")
                }

            poll(
                lambda: len(alive_helpers()) >= 2,
                120,
                1.0,
                what="the event sink and cluster memory actors alive",
            )
            helpers = alive_helpers()
            # The node to lose: a worker node with neither the driver (every node is on
            # 127.0.0.1, so the driver may have joined any of them) nor our helper actors (event
            # sink, cluster memory; pinned to the driver's node). Losing those is losing
            # the run's bookkeeping, not a worker.
            driver = ray.get_runtime_context().get_node_id()
            assert set(helpers.values()) == {driver}, (helpers, driver, ids)  # hard affinity (H2)
            busy = {driver}
            spare = [name for name in ("a", "b") if ids[name] not in busy]
            assert spare, f"every worker node holds the driver or a helper: nodes {ids}, helpers {helpers}"
            victim = spare[0]
            wf = Workflow(
                "loss",
                stages=[fan_out("slow", held_on_ray_node(ids[victim], str(tmp_path)), cpus=1)],
            )
            handle = ex.submit(wf, input={"xs": list(range(9))})
            poll(lambda: any(tmp_path.iterdir()), 120, 0.5, what=f"a task in flight on node {victim}")
            kill_tree(nodes.procs[victim])  # the node's raylet and its workers, SIGKILL
            run = handle.wait(240)
            # Ray retries a task whose worker died (max_retries, 3 by default) on a live node.
            table = run.tasks[["item", "state", "worker", "error"]].to_string()
            assert run.state == "finished" and not run.failures, table
            assert run.result == [x * x for x in range(9)], table
            # Where the worker column names Ray nodes (ip:pid@node), none names the lost one.
            assert not any(ids[victim][:12] in str(w) for w in run.tasks["worker"]), table
            poll(lambda: len(ex.resources()) == 2, 90, 0.5, what="the lost node gone from ex.resources()")
            assert ex.run(wf, input={"xs": [3]}).result == [9]  # the executor goes on
        finally:
            ex.close()


# --- larger than memory (Dask) ---------------------------------------------------------------


def make_block(i):
    """25 MB of random bytes (not compressible: spilling must really write them)."""
    return os.urandom(25 * 2**20)


def block_size(block):
    return len(block)


def test_dask_fan_out_larger_than_worker_memory_completes_by_spilling():
    # 40 x 25 MB = 1000 MB of blocks held at once on two workers of 400 MB each: they only fit
    # because Dask spills what exceeds a worker's memory target to its local disk. (Bigger blocks
    # on smaller workers pass the nanny's 95 % line now and then: the worker is restarted.)
    with DaskNodes({"a": "cpus=1", "b": "cpus=1"}, memory_limit="400MB") as nodes:
        ex = dask_executor(nodes, 2)
        peak, stop = [0], threading.Event()
        driver = psutil.Process()
        driver_base = driver_peak = driver.memory_info().rss

        def watch_disk():  # the workers' spill files live under their local directory (nodes.dir)
            nonlocal driver_peak
            while not stop.wait(0.2):
                driver_peak = max(driver_peak, driver.memory_info().rss)
                size = 0
                for p in Path(nodes.dir).rglob("*"):
                    try:
                        size += p.stat().st_size if p.is_file() and not p.name.endswith(".log") else 0
                    except OSError:
                        pass
                peak[0] = max(peak[0], size)

        watcher = threading.Thread(target=watch_disk, daemon=True)
        watcher.start()
        try:
            wf = Workflow(
                "spill",
                stages=[
                    Stage("make", make_block, type="parameterized", options={"map_on": "xs"}),
                    Stage("size", block_size, type="parameterized", depends_on=["make"]),
                    Stage("total", sum, depends_on=["size"]),
                ],
            )
            run = ex.run(wf, input={"xs": list(range(40))}, timeout=240)
            assert run.state == "finished" and not run.failures and run.result == 40 * 25 * 2**20
            assert peak[0] > 100 * 2**20, f"spilled at most {peak[0] / 2**20:.0f} MiB to disk"
            # The blocks never travel to the driver: its memory stays flat (well under one block).
            assert driver_peak - driver_base < 40 * 2**20, (
                f"driver grew {(driver_peak - driver_base) / 2**20:.0f} MiB"
            )
            print(
                f"spill peak {peak[0] / 2**20:.0f} MiB, driver growth {(driver_peak - driver_base) / 2**20:.1f} MiB"
            )
        finally:
            stop.set()
            watcher.join(10)
            ex.close()


def too_big(x):
    """About 400 MB in one piece: more than a whole 300 MB worker."""
    block = os.urandom(400 * 2**20)
    return len(block)


def test_dask_item_that_can_never_fit_fails_the_stage_clearly():
    # The nanny ends a worker past 95 % of its memory limit; the run fails naming the stage and
    # the worker's death (seen here: "Dask cancelled this task ...; a worker it needed died"),
    # not a hang, and the driver is untouched.
    with DaskNodes({"a": "cpus=1", "b": "cpus=1"}, memory_limit="300MB") as nodes:
        ex = dask_executor(nodes, 2)
        try:
            wf = Workflow("huge", stages=[Stage("huge", too_big)])
            with pytest.raises(fnb.StageError) as err:
                ex.run(wf, input={"x": 1}, timeout=240)
            text = str(err.value)
            assert "stage 'huge'" in text and "died" in text, text
            assert (
                ex.run(Workflow("ok", stages=[Stage("ok", block_size)]), input={"block": b"abc"}).result == 3
            )
        finally:
            ex.close()
