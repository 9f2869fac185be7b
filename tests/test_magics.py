"""The %flowdapt magics through a real IPython shell (local threads, Dask, Ray) and a real kernel.

Notebook functions are defined with ``shell.run_cell`` so they live in the shell's namespace,
as they would in a notebook. Dask is the session's shared cluster (attached by address) or one
the magic starts; Ray allows one connection per process, so the Ray test closes the shared Ray
and lets the magic start its own.
"""

from __future__ import annotations

import _thread
import re
import threading
import time

import psutil
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from kernel_support import kernel_manager

import flowdapt_nb as fnb

NOTEBOOK = """
import time
import flowdapt_nb as fnb

def numbers(n=4):
    return list(range(n))

def square(x):
    return x * x

def total(xs):
    return sum(xs)

def nap(x):
    time.sleep(1.0)
    return x

def fails(x):
    if x == 2:
        raise ValueError("two is bad")
    return x

def remember(xs):
    fnb.cluster_memory.put("seen", list(xs))
    return len(xs)
"""

SQUARES = """\
kind: workflow
metadata: {name: squares}
spec:
  stages:
    - {name: numbers, target: numbers}
    - {name: square, target: square, type: parameterized, depends_on: [numbers]}
    - {name: total, target: total, depends_on: [square]}
"""

SLOW = """\
- {name: numbers, target: numbers}
- {name: nap, target: nap, type: parameterized, depends_on: [numbers]}
"""

REMEMBER = """\
- {name: numbers, target: numbers}
- {name: remember, target: remember, depends_on: [numbers]}
"""

STRICT = """\
- {name: numbers, target: numbers}
- name: fails
  target: fails
  type: parameterized
  depends_on: [numbers]
  options: {allow_partial_failure: false}
"""


@pytest.fixture(scope="module")
def shell():
    sh = InteractiveShell.instance()
    before = set(sh.user_ns)
    sh.extension_manager.load_extension("flowdapt_nb")
    result = sh.run_cell(NOTEBOOK)
    result.raise_error()
    yield sh
    sh.extension_manager.unload_extension("flowdapt_nb")
    for name in set(sh.user_ns) - before:
        sh.user_ns.pop(name, None)


@pytest.fixture
def magics(shell):
    """The registered FlowdaptMagics; each test ends with no executor and default traits."""
    m = shell.magics_manager.registry["FlowdaptMagics"]
    yield m
    m._close_current()
    shell.config.pop("FlowdaptMagics", None)  # what %config stored
    for name, trait in m.traits(config=True).items():
        setattr(m, name, trait.default())


def line(shell, text):
    return shell.run_line_magic("flowdapt", text)


def cell(shell, first, body):
    return shell.run_cell_magic("flowdapt", first, body)


def define_workflows(shell):
    with capture_output():
        cell(shell, "workflow", SQUARES)
        cell(shell, "workflow slow", SLOW)
        cell(shell, "workflow remember", REMEMBER)
        cell(shell, "workflow strict", STRICT)


def new_children(before: set) -> list[psutil.Process]:
    """Processes started since ``before``, less multiprocessing's resource tracker (one per
    interpreter, shared by every spawn pool, ending with the interpreter)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid not in before and "multiprocessing.resource_tracker" not in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def assert_gone(procs, timeout=30):
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive if p.is_running()]}"


def interrupt_when_running(shell, previous=None, after=0.6):
    """Send the main thread a real SIGINT-style interrupt once a new run is under way."""

    def go():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            run = shell.user_ns.get("flowdapt_run")
            if run is not None and run is not previous and run.state == "running":
                time.sleep(after)
                if not run.done:
                    _thread.interrupt_main()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def check_interrupt_cancels(shell, ex):
    """A KeyboardInterrupt during a blocking run cancels it; the executor stays usable."""
    previous = shell.user_ns.get("flowdapt_run")
    thread = interrupt_when_running(shell, previous)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        line(shell, "run slow --input n=8")
    thread.join(5)
    assert time.monotonic() - t0 < 4  # 8 one-second naps on 2 slots would take 4 s
    run = shell.user_ns["flowdapt_run"]
    assert run is not previous and run.state == "cancelled" and run.done
    assert ex.history[-1] is run and ex.running
    assert "cancelled" in set(run.tasks.state)
    again = line(shell, "run squares --input n=3")
    assert again.state == "finished" and again.result == 5


# --- subcommands and errors that need no executor ---------------------------------------------


def test_help_and_unknown_subcommands(shell, magics):
    with capture_output() as cap:
        line(shell, "help")
    for sub in (
        "executor",
        "%%flowdapt workflow",
        "workflows",
        "run",
        "status",
        "dashboard",
        "memory",
        "stop",
        "flowdapt_executor",
        "flowdapt_run",
        "_flowdapt_run",
    ):
        assert sub in cap.stdout
    with capture_output() as cap:
        line(shell, "")
    assert "%flowdapt run NAME" in cap.stdout
    for args in ("run --help", "help run"):
        with capture_output() as cap:
            line(shell, args)
        assert "--input-json" in cap.stdout and "--background" in cap.stdout
    with pytest.raises(UsageError, match=r"%flowdapt help: unknown subcommand 'rnu'; did you mean 'run'\?"):
        line(shell, "help rnu")
    with pytest.raises(UsageError, match=r"unknown subcommand 'bogus'; valid: executor, workflow"):
        line(shell, "bogus")
    with pytest.raises(UsageError, match=r"unknown subcommand 'exector'; did you mean 'executor'\?"):
        line(shell, "exector local")
    with pytest.raises(UsageError, match="'run' takes no cell body"):
        cell(shell, "run squares", "x")
    with pytest.raises(UsageError, match="needs a subcommand"):
        cell(shell, "", "target: local")
    from flowdapt_nb.notebook.magics import FlowdaptMagics

    assert "%flowdapt executor" in FlowdaptMagics.flowdapt.__doc__  # what %flowdapt? shows


def test_no_executor_yet(shell, magics):
    define_workflows(shell)
    for sub in ("run squares", "dashboard", "memory"):
        with pytest.raises(UsageError, match=r"no executor yet; start one with %flowdapt executor local"):
            line(shell, sub)
    with capture_output() as cap:
        line(shell, "status")
        line(shell, "stop")
    assert "no executor" in cap.stdout and "no executor to stop" in cap.stdout


# --- executors: line, cell, replacement -------------------------------------------------------


def test_executor_line_local_and_flag_errors(shell, magics):
    with capture_output() as cap:
        assert line(shell, "executor local --threads --cpus 2") is None
    ex = shell.user_ns["flowdapt_executor"]
    assert ex is magics.current and ex.running and ex.kind == "local"
    assert ex.config.use_processes is False and ex.cpus == 2
    assert "LocalExecutor" in cap.outputs[0].data["text/plain"]
    assert "flowdapt-executor" in cap.outputs[0].data["text/html"]
    bad = {
        "local --bogus": r"%flowdapt executor: unrecognized arguments: --bogus; valid options: --address",
        "local --cpus two": r"argument --cpus: invalid int value: 'two'",
        "local --gpus 1": r"only dask and ray take --gpus",
        "local --address tcp://127.0.0.1:1": r"only dask and ray take --address",
        "local --threads --processes": r"give --threads or --processes, not both",
        "dask --threads": r"--threads/--processes choose the local executor's pool",
        "dask --address tcp://127.0.0.1:1 --cpus 2": r"--cpus can't be used with --address",
        "rey": r"unknown executor 'rey'; did you mean 'ray'\?",
        "dask --resource wheels": r"--resource takes key=value",
        "dask --resource wheels=many": r"resource 'wheels' needs a non-negative number",
        "local --set cpu=2": r"unknown key 'cpu'; did you mean 'cpus'\?",
        "local --cpus 0 --set cpus=-1": r"cpus must be 'auto' or a whole number >= 1",
        "local --set 'target=ray'": r"the executor kind is the first argument",
        'local --set "x=1': r"No closing quotation",
    }
    for args, message in bad.items():
        with pytest.raises(UsageError, match=message) as info:
            line(shell, f"executor {args}")
        assert "\n" not in str(info.value)
    assert magics.current is ex and ex.running  # a mistake leaves the current executor alone
    with pytest.raises(UsageError, match=r"could not start the dask executor: can't reach the Dask cluster"):
        line(shell, "executor dask --address tcp://127.0.0.1:9 --set connect_timeout=0.5")
    assert not ex.running and magics.current is None  # replaced: the old one was closed first
    assert "flowdapt_executor" not in shell.user_ns


def test_config_traits(shell, magics):
    shell.run_line_magic("config", "FlowdaptMagics.cpus = 1")
    shell.run_line_magic("config", "FlowdaptMagics.executor_variable = 'my_ex'")
    shell.run_line_magic("config", "FlowdaptMagics.run_variable = 'my_run'")
    shell.run_line_magic("config", "FlowdaptMagics.executor = 'LOCAL'")
    shell.run_line_magic("config", "FlowdaptMagics.namespace = 'traits'")
    with capture_output():
        line(shell, "executor")
        cell(shell, "workflow", SQUARES)
    ex = shell.user_ns["my_ex"]
    assert ex.kind == "local" and ex.cpus == 1 and ex.config.use_processes is False
    run = line(shell, "run squares")
    assert shell.user_ns["my_run"] is run and run.namespace == "traits" and run.result == 14
    shell.run_line_magic("config", "FlowdaptMagics.executor = 'spark'")  # refused (traitlets logs it)
    assert magics.executor == "local"
    for name in ("my_ex", "my_run"):
        shell.user_ns.pop(name, None)


def test_executor_cells(shell, magics):
    with capture_output():
        cell(shell, "executor", "target: local\nuse_processes: false\ncpus: 2\n")
    ex = shell.user_ns["flowdapt_executor"]
    assert ex.kind == "local" and ex.cpus == 2 and ex.running
    full = """\
services:
  compute:
    default_namespace: from-config
    executor:
      target: flowdapt.compute.executor.local.LocalExecutor
      use_processes: false
      cpus: 1
"""
    with capture_output():
        cell(shell, "executor", full)
        cell(shell, "workflow", SQUARES)
    second = shell.user_ns["flowdapt_executor"]
    assert second is not ex and not ex.running and second.cpus == 1
    assert line(shell, "run squares --input n=2").namespace == "from-config"
    # errors name the cell's own lines (the magic line is line 1)
    errors = {
        "target: local\nuse_processes: false\ncpu: 2\n": r"^%%flowdapt executor: cell line 4: unknown key 'cpu'; "
        r"did you mean 'cpus'\?$",
        full.replace("cpus: 1", "cpuss: 1"): r"cell line 8: unknown key 'cpuss'; did you mean 'cpus'\?",
        "target: local\ncpus: [1\n": r"cell line 4: invalid YAML",
        "target: local\n\tcpus: 2\n": r"cell line 3: invalid YAML: found .*'\\t'",
        "target: lokal\n": r"cell line 2: unknown executor target 'lokal'; did you mean 'local'\?",
        "use_processes: false\n": r"has no 'target'",
        "# nothing yet\n": r"the config is empty",
        "services:\n  compute: {}\n": r"services.compute.executor",
    }
    for body, message in errors.items():
        with pytest.raises(UsageError, match=message):
            cell(shell, "executor", body)
    with pytest.raises(UsageError, match="takes no options"):
        cell(shell, "executor --cpus 2", "target: local")
    assert magics.current is second and second.running


def test_replacing_executors_leaks_no_process(shell, magics):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with capture_output():
        line(shell, "executor local --processes --cpus 2")
        define_workflows(shell)
    first = magics.current
    assert first.config.use_processes and line(shell, "run squares").result == 14
    local_procs = new_children(before)
    assert local_procs  # the store manager and pool workers
    with capture_output():
        line(shell, "executor dask --cpus 1 --memory 1GB --resource hamster_wheels=1")
    assert not first.running
    assert_gone(local_procs)
    dask_ex = magics.current
    assert dask_ex.kind == "dask" and dask_ex.owns_cluster
    assert [w["resources"].get("hamster_wheels") for w in dask_ex.info()["workers"]] == [1]
    assert line(shell, "run squares --input n=3").result == 5
    dask_procs = new_children(before)
    assert dask_procs
    with capture_output():
        line(shell, "executor local --threads")
    assert not dask_ex.running
    assert_gone(dask_procs)
    assert not new_children(before)
    with capture_output() as cap:
        line(shell, "stop")
    assert "local executor stopped" in cap.stdout and magics.current is None
    assert "flowdapt_executor" not in shell.user_ns


# --- workflows --------------------------------------------------------------------------------


def test_stage_mapper_loads_a_workflow_from_a_workflow_cell(shell, magics):
    from flowdapt_nb.widgets import StageMapper

    with capture_output():
        cell(shell, "workflow for-mapper", SQUARES)
    mapper = StageMapper()
    try:
        mapper.load_w.click()
        labels = dict(mapper.load_pick_w.options)
        assert labels["%%flowdapt workflow for-mapper"] == ("stored", "for-mapper")
        mapper.load_pick_w.value = ("stored", "for-mapper")
        mapper.load_go_w.click()
        assert mapper.name == "for-mapper" and mapper.stage_names() == ["numbers", "square", "total"]
        assert mapper.errors == {}
    finally:
        mapper.close()


def test_workflow_cells(shell, magics):
    with capture_output() as cap:
        assert cell(shell, "workflow", SQUARES) is None
    html = cap.outputs[-1].data["text/html"]
    assert "fnb-dag-box" in html and "<svg" not in html and "squares" in html  # the DAG as HTML boxes
    assert "Workflow('squares'" in cap.outputs[-1].data["text/plain"]
    with capture_output():
        cell(shell, "workflow renamed", SQUARES)  # NAME wins over metadata.name
        cell(shell, "workflow only-stages", SLOW)  # just the list of stages
        cell(shell, "workflow", "name: short\nstages:\n  - {name: a, target: numbers}\n")
    wf = line(shell, "workflow renamed")
    assert (
        isinstance(wf, fnb.Workflow)
        and wf.name == "renamed"
        and wf.stage_names == ["numbers", "square", "total"]
    )
    assert line(shell, "workflow only-stages").stage("nap").type == "parameterized"
    table = line(shell, "workflows")
    assert {"squares", "renamed", "only-stages", "short"} <= set(table.workflow)
    assert table.set_index("workflow").loc["squares", "dag"] == "numbers; square<-numbers; total<-square"
    # a target not defined yet is a note, not an error: it may be defined before the run
    with capture_output() as cap:
        cell(shell, "workflow later", "- {name: a, target: defined_later}\n")
    assert "stage 'a'" in cap.stderr and "defined_later" in cap.stderr and "%flowdapt run later" in cap.stderr
    errors = {
        (
            "workflow",
            SQUARES.replace("depends_on: [numbers]", "depnds_on: [numbers]"),
        ): r"^%%flowdapt workflow: cell line 7: stage 'square': unknown key 'depnds_on'; did you mean 'depends_on'\?$",
        (
            "workflow",
            SQUARES.replace("[square]", "square"),
        ): r"cell line 8: stage 'total': depends_on must be a list",
        (
            "workflow",
            "- {name: a, target: numbers}\n",
        ): r"the workflow needs a name: %%flowdapt workflow NAME",
        (
            "workflow w",
            "- {name: a, target: numbers, depends_on: [b]}\n",
        ): r"cell line 2: stage 'a': depends on unknown stage 'b'",
        ("workflow w", "- {name: a target: numbers}\n"): r"cell line 2: invalid YAML",
        ("workflow bad name!", SLOW): r"unrecognized arguments: name!",
        ("workflow bad.name", SLOW): r"workflow name 'bad.name' is not valid",
    }
    for (first, body), message in errors.items():
        with pytest.raises(UsageError, match=message):
            cell(shell, first, body)
    with pytest.raises(UsageError, match=r"unknown workflow 'squars'; did you mean 'squares'\? stored: "):
        line(shell, "workflow squars")
    with pytest.raises(UsageError, match="give the workflow as a cell"):
        line(shell, "workflow")
    with pytest.raises(UsageError, match="takes no arguments"):
        line(shell, "workflows extra")


# --- runs on local threads --------------------------------------------------------------------


def test_run_local(shell, magics):
    with capture_output():
        line(shell, "executor local --threads --cpus 2")
        define_workflows(shell)
    ex = magics.current
    run = line(shell, "run squares --input n=5")
    assert isinstance(run, fnb.WorkflowRun) and run.state == "finished" and run.result == 30
    assert shell.user_ns["flowdapt_run"] is run and ex.history[-1] is run
    run = line(shell, "run squares --input-json '{\"n\": 3}' --namespace ns1 -o kept")
    assert run.result == 5 and run.namespace == "ns1" and shell.user_ns["kept"] is run
    run = line(shell, "run squares --input-json '{\"n\": 3}' --input n=4")  # --input wins
    assert run.result == 14 and run.input == {"n": 4}
    handle = line(shell, "run slow --input n=2 --background -o bg")
    assert isinstance(handle, fnb.RunHandle) and not handle.done()
    assert shell.user_ns["_flowdapt_run"] is handle and shell.user_ns["bg"] is handle
    assert shell.user_ns["flowdapt_run"] is handle.run
    assert handle.wait(30).result == [0, 1] and handle.run.state == "finished"
    # a Workflow variable in the notebook runs too
    shell.run_cell("wf_var = fnb.Workflow('from-var', stages=[fnb.Stage('a', numbers)])").raise_error()
    assert line(shell, "run wf_var --input n=2").result == [0, 1]
    errors = {
        "squares --input n": r"--input takes key=value with a Python identifier as key, got 'n'",
        "squares --input-json '[1]'": r"--input-json must be a JSON object",
        "squares --input-json '{n: 1}'": r"--input-json is not valid JSON",
        "squares --bogus": r"unrecognized arguments: --bogus; valid options: --background",
        "squares --timeout soon": r"argument --timeout: invalid float value",
        "squares -o 1x": r"-o takes a Python variable name",
        "squars": r"unknown workflow 'squars'; did you mean 'squares'\?",
        "": r"the following arguments are required: name",
    }
    for args, message in errors.items():
        with pytest.raises(UsageError, match=message) as info:
            line(shell, f"run {args}")
        assert "\n" not in str(info.value)
    shell.run_cell("def needs(k): return k").raise_error()
    with capture_output():
        cell(shell, "workflow needs", "- {name: a, target: needs}\n")
    with pytest.raises(UsageError, match=r"stage 'a': needs input 'k' .*; pass it with --input k=\.\.\.$"):
        line(shell, "run needs")
    with capture_output():
        cell(shell, "workflow later", "- {name: a, target: not_defined_anywhere}\n")
    with pytest.raises(UsageError, match="target 'not_defined_anywhere' is neither a function defined"):
        line(shell, "run later")
    # a failing stage raises StageError, its cause the stage's own exception
    with pytest.raises(
        fnb.StageError, match=r"stage 'fails' \(item 2\) failed: ValueError: two is bad"
    ) as info:
        line(shell, "run strict")
    assert isinstance(info.value.__cause__, ValueError)
    assert shell.user_ns["flowdapt_run"].state == "failed"
    assert line(shell, "run squares").result == 14  # still usable


def test_memory_and_status_local(shell, magics):
    with capture_output():
        line(shell, "executor local --threads")
        define_workflows(shell)
    assert len(line(shell, "memory")) == 0
    assert line(shell, "run remember --input n=3 --namespace nb").result == 3
    shell.run_cell("fnb.cluster_memory.put('model', {'w': 1})").raise_error()
    frame = line(shell, "memory")
    assert set(zip(frame.namespace, frame.key)) == {("nb", "seen"), ("default", "model")}
    assert list(line(shell, "memory nb").key) == ["seen"]
    assert frame.set_index("key").loc["model", "type"] == "dict" and (frame.bytes > 0).all()
    with capture_output() as cap:
        runs = line(shell, "status")
    assert "LocalExecutor" in cap.outputs[0].data["text/plain"]
    assert list(runs.state) == ["finished"] and runs.name.iloc[0].startswith("remember-")
    with capture_output() as cap:
        line(shell, "dashboard")
    assert "no native dashboard" in cap.stdout
    assert any("cpus_total" in o.data.get("text/plain", "") for o in cap.outputs)  # the resources table
    with pytest.raises(UsageError, match="takes no arguments"):
        line(shell, "status now")
    with pytest.raises(UsageError, match=r"%flowdapt memory: unrecognized arguments: b"):
        line(shell, "memory a b")


def test_interrupt_cancels_local(shell, magics):
    with capture_output():
        line(shell, "executor local --threads --cpus 2")
        define_workflows(shell)
    check_interrupt_cancels(shell, magics.current)


# --- Dask -------------------------------------------------------------------------------------


def test_dask_attached(shell, magics, dask_cluster):
    shared = dask_cluster.get()
    address = shared.info()["address"]
    with capture_output() as cap:
        line(shell, f"executor dask --address {address}")
        define_workflows(shell)
    ex = magics.current
    assert ex.kind == "dask" and not ex.owns_cluster and ex.info()["address"] == address
    assert "DaskExecutor" in cap.outputs[0].data["text/plain"]
    run = line(shell, "run squares --input n=4")
    assert run.result == 14 and run.executor == "dask"
    assert set(run.tasks.worker) <= {w["name"] for w in ex.info()["workers"]}
    assert line(shell, "run remember --input n=2 --namespace dk").result == 2
    assert list(line(shell, "memory dk").key) == ["seen"]
    handle = line(shell, "run squares --background --input n=3")
    assert handle.wait(30).result == 5
    with capture_output() as cap:
        line(shell, "dashboard")
    link = cap.outputs[0].data
    assert link["text/plain"].startswith("dask dashboard: http://") and "<a href=" in link["text/html"]
    with capture_output() as cap:
        runs = line(shell, "status")
    assert len(runs) == 3
    check_interrupt_cancels(shell, ex)
    with capture_output():
        line(shell, "stop")
    assert not ex.running and shared.running  # attached: the cluster stays up
    assert shared.run(fnb.load_workflow(line(shell, "workflow squares")), input={"n": 2}).result == 1


# --- Ray --------------------------------------------------------------------------------------


def test_ray(shell, magics, ray_cluster):
    ray_cluster.close()  # one Ray connection per process: the magic starts its own
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with capture_output() as cap:
        line(shell, "executor ray --cpus 2 --resource hamster_wheels=1 --set include_dashboard=false")
        define_workflows(shell)
    ex = magics.current
    assert ex.kind == "ray" and ex.running and ex.owns_cluster
    assert "RayExecutor" in cap.outputs[0].data["text/plain"]
    assert ex.info()["resources"].get("hamster_wheels") == 1
    run = line(shell, "run squares --input n=4")
    assert run.result == 14 and run.executor == "ray"
    assert line(shell, "run remember --input n=3 --namespace rn").result == 3
    frame = line(shell, "memory rn")
    assert list(frame.key) == ["seen"] and frame.type.iloc[0] == "list"
    handle = line(shell, "run squares --background --input n=2 -o rbg")
    assert shell.user_ns["rbg"] is handle and handle.wait(60).result == 1
    with capture_output() as cap:
        line(shell, "dashboard")
    assert "no native dashboard (started with include_dashboard: false)" in cap.stdout
    with capture_output():
        assert len(line(shell, "status")) == 3
    with pytest.raises(fnb.StageError, match="two is bad"):
        line(shell, "run strict")
    check_interrupt_cancels(shell, ex)
    first_procs = new_children(before)
    assert first_procs
    # a second Ray replaces the first: its processes end before the new one starts
    with capture_output():
        cell(shell, "executor", "target: ray\ncpus: 1\ninclude_dashboard: false\nlogging_level: error\n")
    second = magics.current
    assert not ex.running and second.running and second is shell.user_ns["flowdapt_executor"]
    assert_gone(first_procs)
    assert line(shell, "run squares --input n=3").result == 5
    with pytest.raises(
        UsageError,
        match=r"cell line 4: unknown key 'include_dashbord'; "
        r"did you mean 'include_dashboard'\?",
    ):
        cell(shell, "executor", "target: ray\ncpus: 1\ninclude_dashbord: false\n")
    second_procs = new_children(before)
    with capture_output() as cap:
        line(shell, "stop")
    assert "ray executor stopped" in cap.stdout
    assert_gone(second_procs)


# --- extension lifecycle ----------------------------------------------------------------------


def test_unload_closes_the_executor(shell, magics):
    with capture_output():
        line(shell, "executor local --threads")
    ex = magics.current
    shell.extension_manager.unload_extension("flowdapt_nb")
    try:
        assert not ex.running
        assert "flowdapt" not in shell.magics_manager.magics["line"]
        assert not any(type(c).__name__ == "FlowdaptMagics" for c in shell.configurables)
    finally:
        shell.extension_manager.load_extension("flowdapt_nb")
    assert "flowdapt" in shell.magics_manager.magics["cell"]
    with capture_output():
        shell.run_line_magic("load_ext", "flowdapt_nb")  # twice: still one set of magics
    assert sum(type(c).__name__ == "FlowdaptMagics" for c in shell.configurables) == 1


# --- a real kernel: Ctrl-C is a SIGINT to the kernel process ------------------------------------


def _execute(kc, code, timeout=60):
    """Run code in the kernel; return (reply content, iopub messages)."""
    msgs = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=msgs.append)
    return reply["content"], msgs


def _stdout(msgs):
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")


def test_kernel_interrupt_cancels_the_run(tmp_path):
    with kernel_manager(tmp_path) as (km, kc):
        kernel_pid = km.provisioner.process.pid
        setup = (
            NOTEBOOK + "\nget_ipython().run_line_magic('load_ext', 'flowdapt_nb')\n"
            "get_ipython().run_line_magic('flowdapt', 'executor local --threads --cpus 2')\n"
            f"get_ipython().run_cell_magic('flowdapt', 'workflow slow', {SLOW!r})\n"
            f"get_ipython().run_cell_magic('flowdapt', 'workflow', {SQUARES!r})\n"
        )
        content, msgs = _execute(kc, setup)
        assert content["status"] == "ok", content
        # the executor card: a widget (with HTML and text fallbacks) in a kernel
        # (the start feedback's output becomes the card: an update of that display)
        cards = [
            m["content"]["data"]
            for m in msgs
            if m["msg_type"] in ("display_data", "update_display_data")
            and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]
        ]
        assert cards and "text/html" in cards[0] and "text/plain" in cards[0]
        # a blocking run of 8 one-second naps on 2 threads; interrupt it once it is running
        msg_id = kc.execute("%flowdapt run slow --input n=8")
        progress_id, deadline = None, time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = kc.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] in ("display_data", "update_display_data"):
                progress_id = msg["content"]["transient"]["display_id"]
                text = msg["content"]["data"]["text/plain"]
                if msg["msg_type"] == "update_display_data" and re.search(r"nap \d/8 \d running", text):
                    break
        assert progress_id is not None
        t0 = time.monotonic()
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=30)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert "cancelled" in reply["content"]["evalue"]
        assert time.monotonic() - t0 < 3
        content, msgs = _execute(
            kc,
            "print(flowdapt_run.state, len(flowdapt_executor.history), "
            "flowdapt_executor.running, sorted(set(flowdapt_run.tasks.state)))",
        )
        out = _stdout(msgs)
        assert out.startswith("cancelled 1 True") and "'cancelled'" in out, out
        # the executor is usable: the next run finishes, its progress display ends as 'finished'
        content, msgs = _execute(kc, "r = %flowdapt run squares --input n=4\nprint(r.state, r.result)")
        assert content["status"] == "ok" and _stdout(msgs).strip() == "finished 14"
        updates = [m for m in msgs if m["msg_type"] in ("display_data", "update_display_data")]
        assert updates and "[finished" in updates[-1]["content"]["data"]["text/plain"]
        assert "flowdapt-progress" in updates[-1]["content"]["data"]["text/html"]
        content, msgs = _execute(kc, "%flowdapt dashboard")
        shown = [m["content"]["data"] for m in msgs if m["msg_type"] == "display_data"]
        assert content["status"] == "ok" and "application/vnd.jupyter.widget-view+json" in shown[-1]
        assert "no native dashboard" in _stdout(msgs)
        content, msgs = _execute(kc, "%flowdapt stop\nprint('flowdapt_executor' in globals())")
        assert content["status"] == "ok" and _stdout(msgs).endswith("stopped\nFalse\n")
    assert not psutil.pid_exists(kernel_pid) or psutil.Process(kernel_pid).status() == psutil.STATUS_ZOMBIE
