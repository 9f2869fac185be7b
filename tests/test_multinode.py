"""Beyond one machine: multi-node Ray and Dask clusters on 127.0.0.1 (every node its own set of
processes, started by the engines' own command lines), placement of stages by logical resources,
and the loss of a worker node mid-run."""

from __future__ import annotations

import os
import threading
import time

import pytest

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow

from clusters_multinode import DaskNodes, RayNodes, kill_tree

pytestmark = pytest.mark.timeout(300)  # a hang fails one test, not the suite


def placement_workflow():
    """Two parameterized stages: one may only run where ``gpu_node`` is, one where ``big_memory`` is."""
    def on_gpu(x):
        return ("gpu", x, os.getpid())

    def on_big(x):
        return ("big", x, os.getpid())

    return Workflow("placement", stages=[
        Stage("on_gpu", on_gpu, type="parameterized", options={"map_on": "xs"},
              resources={"cpus": 1, "gpu_node": 1}),
        Stage("on_big", on_big, type="parameterized", options={"map_on": "xs"},
              resources={"cpus": 1, "big_memory": 1}),
    ])


def wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"{what} not within {timeout} s")
        time.sleep(0.5)


# --- Ray -------------------------------------------------------------------------------------

@pytest.fixture
def ray_nodes(ray_cluster):
    ray_cluster.close()  # one Ray connection per process: the shared cluster steps aside
    nodes = RayNodes({"gpu": ["--num-gpus", "1", "--resources", '{"gpu_node": 1}'],
                      "big": ["--resources", '{"big_memory": 1}']})
    with nodes:
        yield nodes


def test_ray_stages_run_on_the_node_with_their_resources(ray_nodes):
    ex = fnb.RayExecutor(cluster_address=ray_nodes.address, logging_level="error", connect_timeout=60)
    ex.start()
    try:
        wait_for(lambda: len(ex.info()["workers"]) == 3, 120,
                 f"3 Ray nodes (logs: {ray_nodes.log('gpu')} {ray_nodes.log('big')})")
        assert ex.info()["resources"].get("gpu_node") == 1 and ex.info()["resources"].get("big_memory") == 1
        run = ex.run(placement_workflow(), input={"xs": [1, 2, 3]})
        tasks = run.tasks
        assert len(tasks) == 6 and set(tasks["state"]) == {"finished"}, tasks
        # The worker column is ip:pid. Every node here is on this one machine (Ray names it by
        # the machine's routed IP, not the node's 127.0.0.1), so the pid tells the node: a Ray
        # worker process descends from its node's `ray start` process.
        for stage, node in (("on_gpu", "gpu"), ("on_big", "big")):
            workers = tasks[tasks["stage"] == stage]["worker"]
            assert {ray_nodes.node_of_pid(int(w.rsplit(":", 1)[1])) for w in workers} == {node}, workers
        # One row per node in the resource table, each with its own logical resources.
        frame = ex.resources()
        assert len(frame) == 3, frame
        names = list(frame.columns)
        assert frame.iloc[:, 0].nunique() == 3, names
        text = frame.to_string()
        assert "gpu_node" in text and "big_memory" in text, text
    finally:
        ex.close()


# --- Dask ------------------------------------------------------------------------------------

def dask_executor(nodes: DaskNodes, workers: int) -> fnb.DaskExecutor:
    ex = fnb.DaskExecutor(cluster_address=nodes.address, connect_timeout=60)
    ex.start()
    wait_for(lambda: len(ex.info()["workers"]) == workers, 120,
             f"{workers} Dask workers (logs: {[nodes.log(n) for n in nodes.worker_resources]})")
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
            assert len(frame) == 2 and set(frame.iloc[:, 0]) == {nodes.worker_address("gpu"),
                                                                 nodes.worker_address("big")}, frame
            text = frame.to_string()
            assert "gpu_node" in text and "big_memory" in text, text
        finally:
            ex.close()
