"""Executor configs: Flowdapt's documented example, short names, class paths, and clear errors."""

import pytest

import flowdapt_nb as fnb

FLOWDAPT_EXAMPLE = """\
services:
  compute:
    default_namespace: default
    executor:
      target: flowdapt.compute.executor.ray.RayExecutor
      log_to_driver: True
      env_vars:
        OMP_NUM_THREADS: 1
      gpus: 1
      cpus: 2
      memory: 8GB
      resources:
        hamster_wheels: 6
      cluster_memory_actor:
        name: actor_name
        num_cpus: 1
        max_concurrency: 1000
        resources:
          hamster_wheel: 1
"""


def test_flowdapt_documented_example_loads_unchanged():
    ex = fnb.executor_from_config(FLOWDAPT_EXAMPLE)
    assert ex.kind == "ray" and not ex.running
    assert ex.config.cpus == 2 and ex.config.gpus == 1 and ex.config.memory == "8GB"
    assert ex.config.env_vars == {"OMP_NUM_THREADS": "1"}
    assert ex.config.resources == {"hamster_wheels": 6}
    assert ex.config.cluster_memory_actor.name == "actor_name"
    assert ex.default_namespace == "default"


@pytest.mark.parametrize(
    "target,kind",
    [
        ("local", "local"),
        ("dask", "dask"),
        ("ray", "ray"),
        ("flowdapt.compute.executor.local.LocalExecutor", "local"),
        ("flowdapt.compute.executor.dask.DaskExecutor", "dask"),
        ("flowdapt.compute.executor.ray.RayExecutor", "ray"),
        ("flowdapt_nb.executors.local.LocalExecutor", "local"),
        ("flowdapt_nb.LocalExecutor", "local"),
    ],
)
def test_targets(target, kind):
    assert fnb.executor_from_config({"target": target}).kind == kind
    assert fnb.executor_from_config({"__target__": target}).kind == kind


def test_executor_mapping_alone_and_path(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("target: local\nuse_processes: false\ncpus: 2\n")
    ex = fnb.executor_from_config(path)
    assert ex.kind == "local" and ex.cpus == 2 and ex.config.use_processes is False
    assert fnb.executor_from_config(str(path)).cpus == 2


def test_unknown_key_names_line_and_nearest():
    with pytest.raises(fnb.ConfigError) as err:
        fnb.executor_from_config("target: dask\ncpus: 2\nthread: 1\n")
    msg = str(err.value)
    assert "line 3" in msg and "'thread'" in msg and "did you mean 'threads'" in msg
    assert err.value.line == 3 and err.value.key == "thread"


def test_unknown_key_in_whole_config_has_its_line():
    text = FLOWDAPT_EXAMPLE.replace("      cpus: 2\n", "      cpuz: 2\n")
    with pytest.raises(fnb.ConfigError) as err:
        fnb.executor_from_config(text)
    assert err.value.line == 10 and "cpus" in str(err.value)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("target: local\ncpus: -1\n", "cpus"),
        ("target: dask\nmemory: lots\n", "memory"),
        ("target: local\nuse_processes: maybe\n", "use_processes"),
        ("target: nope\n", "unknown executor target"),
        ("target: mypkg.nothing.Here\n", "does not import"),
        ("cpus: 2\n", "no 'target'"),
        ("target: local\n\tcpus: 2\n", "invalid YAML"),
        ("- a\n- b\n", "mapping"),
        ("", "empty"),
        ("services:\n  compute: {}\n", "services.compute.executor"),
    ],
)
def test_bad_configs(text, needle):
    with pytest.raises(fnb.ConfigError) as err:
        fnb.executor_from_config(text)
    assert needle in str(err.value)


def test_target_typo_suggests_short_name():
    with pytest.raises(fnb.ConfigError, match="did you mean 'dask'"):
        fnb.executor_from_config("target: dsk")


def test_inert_flowdapt_field_warns():
    with pytest.warns(UserWarning, match="tasks_per_worker"):
        fnb.executor_from_config({"target": "ray", "tasks_per_worker": 4})


def test_constructor_validates_too():
    with pytest.raises(fnb.ConfigError, match="cpus"):
        fnb.LocalExecutor(cpus=0)
    with pytest.raises(fnb.ConfigError, match="did you mean 'use_processes'"):
        fnb.LocalExecutor(use_process=False)


def test_auto_cpus_is_cores_minus_one():
    from flowdapt_nb.units import usable_cores

    assert fnb.LocalExecutor().cpus == max(1, usable_cores() - 1)


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, flowdapt_nb; heavy = [m for m in ('ray', 'dask', 'distributed', 'IPython', "
        "'pandas', 'ipywidgets') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _with_database(value: str, executor: str = "{target: local, use_processes: false, cpus: 1}") -> str:
    return f"services:\n  database: {value}\n  compute:\n    executor: {executor}\n"


def test_services_database_is_the_run_store_setting(tmp_path):
    """Flowdapt keeps runs in the database under services: the same values as runs:."""
    import sqlite3
    import time

    db = tmp_path / "flowdapt-runs.sqlite"
    ex = fnb.executor_from_config(_with_database(str(db)))
    assert ex.config.runs == str(db)
    with ex:
        run = ex.run(fnb.Workflow("db", stages=[fnb.Stage("one", lambda: 1)]))
    deadline = time.monotonic() + 30  # the store writes from its own thread (0.5 s batches)
    rows: list = []
    while not rows and time.monotonic() < deadline:
        with sqlite3.connect(db) as con:
            rows = con.execute("SELECT uid FROM runs WHERE uid = ?", (run.uid,)).fetchall()
        time.sleep(0.05)
    assert rows == [(run.uid,)]
    assert fnb.executor_from_config(_with_database("':memory:'")).config.runs == ":memory:"
    assert fnb.executor_from_config(_with_database("off")).config.runs is False
    assert fnb.executor_from_config(_with_database("null")).config.runs is None  # the default store
    mine = fnb.executor_from_config(_with_database("':memory:'", "{target: local, runs: off}"))
    assert mine.config.runs is False  # runs: beside the executor wins


@pytest.mark.parametrize("value", ["5", "[a.sqlite]", "''", "{path: x.sqlite}"])
def test_services_database_bad_value_is_one_clear_error(value):
    with pytest.raises(fnb.ConfigError) as info:
        fnb.executor_from_config(_with_database(value))
    text = str(info.value)
    assert text.startswith("line 2: ") and "'services.database'" in text
    assert "a file path, ':memory:', or off" in text and info.value.key == "services.database"


def test_services_database_of_flowdapt_server_warns():
    setting = "{__target__: flowdapt.lib.database.storage.tdb.TinyDBStorage}"
    with pytest.warns(UserWarning, match="services.database names a Flowdapt database class"):
        ex = fnb.executor_from_config(_with_database(setting))
    assert ex.config.runs is None
