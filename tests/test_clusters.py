"""Dask and Ray specifics: attach to running clusters, resources, data locality, the documented
example config, env vars and worker output."""

import threading
import time

import psutil
import pytest
import stages as st
from clusters_multinode import DaskNodes, RayNodes, free_port, wait_for_workers
from test_config import FLOWDAPT_EXAMPLE

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow


def notebook_style_workflow():
    """Stages defined at run time (closures), so workers can't import them: they travel by value."""
    base = 10

    def make(n):
        return list(range(n))

    def bump(x):
        return x + base

    def gather(xs):
        return sorted(xs)

    return Workflow(
        "attached",
        stages=[
            Stage("make", make),
            Stage("bump", bump, type="parameterized", depends_on=["make"]),
            Stage("gather", gather, depends_on=["bump"]),
        ],
    )


@pytest.mark.parametrize("kind", ["dask", "ray"])
def test_stage_resources_are_checked_and_honoured(kind, request):
    ex = request.getfixturevalue(f"{kind}_executor")
    good = Stage(
        "wheel",
        st.square,
        type="parameterized",
        options={"map_on": "xs"},
        resources={"cpus": 1, "hamster_wheels": 1},
    )
    assert ex.run(Workflow("w", stages=[good]), input={"xs": [1, 2]}).result == [1, 4]
    bad = good.model_copy(update={"resources": {"hamster_wheel": 1}})
    with pytest.raises(fnb.ConfigError) as err:
        ex.run(Workflow("w", stages=[bad]), input={"xs": [1]})
    assert "hamster_wheel'" in str(err.value) and "hamster_wheels" in str(err.value)
    too_many = good.model_copy(update={"resources": {"hamster_wheels": 99}})
    with pytest.raises(fnb.ConfigError, match="hamster_wheels: 99"):
        ex.run(Workflow("w", stages=[too_many]), input={"xs": [1]})


@pytest.mark.parametrize("kind", ["dask", "ray"])
def test_env_vars_reach_workers(kind, request):
    ex = request.getfixturevalue(f"{kind}_executor")
    assert ex.run(Workflow("env", stages=[Stage("e", st.env_value)])).result == kind


@pytest.mark.parametrize("kind", ["dask", "ray"])
def test_stage_print_reaches_the_driver(kind, request, capfd):
    ex = request.getfixturevalue(f"{kind}_executor")
    marker = f"hello-from-stage-{kind}-{time.time_ns()}"

    def talk():
        print(marker)
        return 1

    ex.run(Workflow("talk", stages=[Stage("talk", talk)]))
    seen = ""
    deadline = time.time() + 15
    while marker not in seen and time.time() < deadline:
        time.sleep(0.3)
        out, err = capfd.readouterr()
        seen += out + err
    assert marker in seen


@pytest.mark.parametrize("kind", ["dask", "ray"])
def test_info_has_dashboard_workers_and_resources(kind, request):
    import urllib.request

    ex = request.getfixturevalue(f"{kind}_executor")
    info = ex.info()
    assert info["kind"] == kind and info["state"] == "running" and info["workers"]
    assert info["resources"].get("hamster_wheels") == (4 if kind == "dask" else 2)
    url = info["dashboard_url"]
    assert url and "127.0.0.1" in url
    deadline = time.time() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.status == 200
                break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


@pytest.mark.parametrize("kind", ["dask", "ray"])
def test_data_stays_in_the_cluster(kind, request):
    """A ~200 MB array passed between two stages must not pass through the driver."""
    ex = request.getfixturevalue(f"{kind}_executor")

    def make_array():
        import numpy as np

        return np.ones(25_000_000, dtype="float64")  # 200 MB

    def double(a):
        return a * 2

    def summarize(a):
        return float(a.sum())

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop_flag = threading.Event()

    def watch():
        while not stop_flag.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run = ex.run(
            Workflow(
                "big",
                stages=[
                    Stage("make", make_array),
                    Stage("double", double, depends_on=["make"]),
                    Stage("sum", summarize, depends_on=["double"]),
                ],
            )
        )
    finally:
        stop_flag.set()
        watcher.join()
    assert run.result == 50_000_000.0
    assert peak[0] - base < 80 * 2**20, f"driver grew by {(peak[0] - base) / 2**20:.0f} MiB"


def test_attach_to_running_dask_cluster():
    with DaskNodes({"w1": "cpus=1 gpus=0", "w2": "cpus=1 gpus=0"}) as nodes:
        ex = fnb.DaskExecutor(cluster_address=nodes.address)
        ex.start()
        wait_for_workers(ex, 2, 60, logs=nodes.logs)
        assert not ex.owns_cluster and len(ex.info()["workers"]) == 2
        run = ex.run(notebook_style_workflow(), input={"n": 4})
        assert run.result == [10, 11, 12, 13]
        fnb.cluster_memory.put("k", "v")
        assert fnb.cluster_memory.get("k") == "v"
        ex.close()
        assert all(p.poll() is None for p in nodes.procs.values())  # close() left the cluster running
        again = fnb.DaskExecutor(cluster_address=nodes.address).start()
        assert again.run(notebook_style_workflow(), input={"n": 1}).result == [10]
        again.close()


def test_attach_to_running_ray_cluster(ray_cluster):
    ray_cluster.close()  # one Ray connection per process
    with RayNodes({}, head_cpus=2, head_args=["--resources", '{"hamster_wheels": 1}']) as nodes:
        ex = fnb.RayExecutor(cluster_address=nodes.address, logging_level="error")
        ex.start()
        assert not ex.owns_cluster
        run = ex.run(notebook_style_workflow(), input={"n": 3})
        assert run.result == [10, 11, 12]
        assert ex.info()["resources"].get("hamster_wheels") == 1
        ex.close()
        assert nodes.procs["head"].poll() is None  # close() left the cluster running
        again = fnb.RayExecutor(cluster_address=nodes.address, logging_level="error").start()
        assert again.run(notebook_style_workflow(), input={"n": 1}).result == [10]
        again.close()


@pytest.mark.parametrize(
    "cls,address", [(fnb.DaskExecutor, "tcp://127.0.0.1:{port}"), (fnb.RayExecutor, "127.0.0.1:{port}")]
)
def test_unreachable_address_fails_fast_and_clearly(cls, address):
    port = free_port()  # nothing listens here
    ex = cls(cluster_address=address.format(port=port), connect_timeout=2)
    started = time.time()
    with pytest.raises(ConnectionError, match="can't reach the .* cluster at cluster_address"):
        ex.start()
    assert time.time() - started < 15 and not ex.running


def test_documented_example_config_typo_then_fixed(ray_cluster):
    import ray

    ray_cluster.close()
    ex = fnb.executor_from_config(FLOWDAPT_EXAMPLE)
    with pytest.raises(fnb.ConfigError) as err:
        ex.start()
    assert "hamster_wheel'" in str(err.value) and "hamster_wheels" in str(err.value)
    assert not ex.running and not ray.is_initialized()  # nothing left half-started
    fixed = fnb.executor_from_config(
        FLOWDAPT_EXAMPLE.replace("hamster_wheel: 1", "hamster_wheels: 1"),
        logging_level="error",
        include_dashboard=False,
    )
    with fixed:
        info = fixed.info()
        assert info["resources"]["GPU"] == 1 and info["resources"]["hamster_wheels"] == 6
        assert info["resources"]["CPU"] == 2 and info["resources"]["memory"] == 8e9
        fnb.cluster_memory.put("x", [1, 2])
        assert fnb.cluster_memory.get("x") == [1, 2]
        assert (
            fixed.run(
                Workflow("env", stages=[Stage("e", st.env_value)]), input={"name": "OMP_NUM_THREADS"}
            ).result
            == "1"
        )
