"""Issue 14 points 12, 13, 14, 16, 17, 18, 19: hostile and odd input, fed for real.

YAML bombs, deep nesting and non-UTF-8 files go through the real parser, the real CLI (a
subprocess with a timeout, so a regression fails one test instead of eating the machine) and a
real IPython shell; object-store paths are real files in a temporary store; allowed_targets is
checked on real runs of every executor.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import stages as st
import yaml
from kernel_support import cli as run_cli

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow
from flowdapt_nb.artifacts import MAX_NAME_BYTES, ArtifactStore
from flowdapt_nb.yamlsrc import MAX_ALIAS_EXPANSION, MAX_DEPTH, parse_yaml

TESTS_DIR = Path(__file__).resolve().parent


def _bomb(levels: int = 9, indent: str = "") -> str:
    """The billion-laughs document: 9 levels expand to 9**9 (387 million) strings."""
    lines = [f'{indent}a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{indent}a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


BOMB_WORKFLOW = (
    "kind: workflow\nmetadata:\n  name: w\n  annotations:\n"
    + _bomb(indent="    ")
    + "spec:\n  stages:\n    - {name: a, target: builtins.list}\n"
)
BOMB_CONFIG = "target: local\nuse_processes: false\nresources:\n" + _bomb(indent="  ")
LATIN1_WORKFLOW = (
    "kind: workflow\nmetadata: {name: w, description: caf\xe9}\nspec:\n  stages:\n"
    "    - {name: a, target: builtins.list}\n"
).encode("latin-1")


def _deep(depth: int, what: str) -> str:
    value = "[" * depth + "]" * depth
    if what == "workflow":
        return (
            "kind: workflow\nmetadata: {name: w}\nspec:\n  stages:\n"
            f"    - {{name: a, target: builtins.list, description: {value}}}\n"
        )
    return f"target: local\nuse_processes: {value}\n"


def _python(code: str, timeout: float = 120, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: a parser regression (minutes, gigabytes) fails this
    one test by its timeout instead of stalling the suite."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def cli(*args, cwd, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=cwd, timeout=timeout, env={"PYTHONWARNINGS": "ignore", **(env or {})})


def _one_error_line(proc) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, f"exactly one error line, got:\n{proc.stderr}"
    return errors[0]


# --- 14: YAML alias bombs and large files -------------------------------------------------------


@pytest.mark.parametrize("what", ["workflow", "config"])
def test_alias_bomb_is_refused_at_once(what):
    """556 bytes that took 60 s and 6 GB: one ConfigError naming the anchor's line, in a fresh
    interpreter bounded by its timeout."""
    text = BOMB_WORKFLOW if what == "workflow" else BOMB_CONFIG
    call = "load_workflow" if what == "workflow" else "executor_from_config"
    proc = _python(
        f"""
        import flowdapt_nb as fnb
        try:
            fnb.{call}({text!r})
        except fnb.ConfigError as exc:
            print("ConfigError:", exc)
        """,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    assert out.startswith("ConfigError: line ") and "\n" not in out, out
    assert "YAML aliases expand this document by 490,329,036 values" in out
    assert f"at most {MAX_ALIAS_EXPANSION:,}" in out and "repeat fewer aliases" in out


def test_alias_bomb_cli_and_magic(tmp_path):
    """The CLI (validate and run) and a %%flowdapt workflow cell in a real IPython shell."""
    (tmp_path / "bomb.yaml").write_text(BOMB_WORKFLOW)
    for args, code in ((["validate", "bomb.yaml"], 1), (["run", "bomb.yaml"], 2)):
        proc = cli(*args, cwd=tmp_path, timeout=60)
        assert proc.returncode == code, proc.stderr
        assert "aliases expand" in _one_error_line(proc) and proc.stdout == ""
    cell = "%%flowdapt workflow\n" + BOMB_WORKFLOW
    proc = _python(
        f"""
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "flowdapt_nb")
        result = shell.run_cell({cell!r})
        err = result.error_in_exec
        print(type(err).__name__, "|", err)
        """,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("UsageError | %%flowdapt workflow: cell line "), proc.stdout
    assert "aliases expand" in proc.stdout and proc.stdout.count("\n") == 1, proc.stdout


def test_aliases_keep_safe_load_semantics():
    """Ordinary anchors, aliases and merge keys still load exactly as yaml.safe_load does."""
    text = textwrap.dedent("""\
        defaults: &defaults {cpus: 2, env_vars: {A: "1"}}
        shared: &xs [1, 2, 3]
        one: {<<: *defaults, cpus: 4}
        two: *xs
        three: [*xs, *xs]
        """)
    source = parse_yaml(text)
    assert source.data == yaml.safe_load(text)
    assert source.data["one"] == {"cpus": 4, "env_vars": {"A": "1"}}  # an override is no duplicate
    assert source.line_of(("one", "cpus")) == 3 and source.line_of(("three",)) == 5
    assert source.line_of(("three", 1)) == 2  # an alias in a list: its anchor's line
    assert not [p for p in source.lines if None in p]


def test_recursive_alias_is_refused():
    with pytest.raises(fnb.ConfigError) as info:
        parse_yaml("a: &a [1, *a]\n")
    assert str(info.value).startswith("line 1: a YAML alias refers to the anchor it is inside")


def test_large_plausible_file_parses_once_with_the_c_loader(tmp_path):
    """A 1 MB workflow (a table of 30,000 rows in its metadata) loads to what safe_load gives.
    It is parsed once, with libyaml's loader when PyYAML has it."""
    import flowdapt_nb.yamlsrc as yamlsrc

    if yaml.__with_libyaml__:
        assert yamlsrc._LOADER is yaml.CSafeLoader
    path = tmp_path / "big.yaml"
    path.write_text(
        "kind: workflow\nmetadata:\n  name: w\n  annotations:\n    table:\n"
        + "".join(f"      - [{i}, {i * 2}, x{i}]\n" for i in range(30_000))
        + "spec:\n  stages:\n    - {name: a, target: builtins.list}\n"
    )
    assert 0.8e6 < path.stat().st_size < 1e6
    proc = _python(
        f"""
        import yaml, flowdapt_nb as fnb
        from flowdapt_nb import yamlsrc
        text = open({str(path)!r}).read()
        parses = []
        loader = yamlsrc._LOADER
        class Counting(loader):
            def get_single_node(self):
                parses.append(1)
                return super().get_single_node()
        yamlsrc._LOADER = Counting
        wf = fnb.load_workflow({str(path)!r})
        assert wf.metadata["annotations"] == yaml.safe_load(text)["metadata"]["annotations"]
        print(len(parses), len(wf.metadata["annotations"]["table"]))
        """,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "30000"]


# --- 12: deep nesting, non-UTF-8 files -----------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_DEPTH + 50, 1000, 5000])
@pytest.mark.parametrize("what", ["workflow", "config"])
def test_deep_nesting_is_one_config_error(what, depth):
    load = fnb.load_workflow if what == "workflow" else fnb.executor_from_config
    with pytest.raises(fnb.ConfigError) as info:
        load(_deep(depth, what))
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"line {5 if what == 'workflow' else 2}: "), text
    assert "nest" in text and f"more than {MAX_DEPTH} levels deep" in text
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_nesting_below_the_limit_still_loads():
    """A config 90 levels deep is legal YAML: refused for its type, not for its depth."""
    with pytest.raises(fnb.ConfigError, match="'use_processes': Input should be a valid boolean"):
        fnb.executor_from_config(_deep(MAX_DEPTH - 10, "config"))


def test_not_utf8_files_are_one_config_error(tmp_path):
    wf_path, cfg_path = tmp_path / "latin1.yaml", tmp_path / "config.yaml"
    wf_path.write_bytes(LATIN1_WORKFLOW)
    cfg_path.write_bytes("target: local\n# r\xe9sum\xe9\n".encode("latin-1"))
    for load, path, line in ((fnb.load_workflow, wf_path, 2), (fnb.executor_from_config, cfg_path, 2)):
        with pytest.raises(fnb.ConfigError) as info:
            load(path)
        assert str(info.value) == (
            f"line {line}: {path}: the file is not UTF-8 text (byte 0xe9 cannot be decoded); save it as UTF-8"
        )
        assert info.value.__context__ is None or info.value.__suppress_context__
    utf16 = tmp_path / "utf16.yaml"  # YAML allows UTF-16 with a byte order mark
    utf16.write_bytes(
        "kind: workflow\nmetadata: {name: w, description: café}\nspec:\n  stages:\n"
        "    - {name: a, target: builtins.list}\n".encode("utf-16")
    )
    assert fnb.load_workflow(utf16).metadata["description"] == "café"


@pytest.mark.parametrize("case", ["latin1", "deep"])
def test_magic_run_on_bad_file_is_one_usage_error(case, tmp_path):
    path = tmp_path / f"{case}.yaml"
    if case == "latin1":
        path.write_bytes(LATIN1_WORKFLOW)
    else:
        path.write_text(_deep(1000, "workflow"))
    proc = _python(
        f"""
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "flowdapt_nb")
        shell.run_line_magic("flowdapt", "executor local --threads --cpus 1")
        try:
            result = shell.run_cell("%flowdapt run {path}")
            err = result.error_in_exec
            print(type(err).__name__, "|", err)
        finally:
            shell.run_line_magic("flowdapt", "stop")
        """,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    first = next(line for line in proc.stdout.splitlines() if " | " in line)
    assert first.startswith("UsageError | %flowdapt run: line "), proc.stdout
    assert ("not UTF-8" if case == "latin1" else "nesting depth") in first
    assert "Traceback" not in proc.stdout + proc.stderr


# --- 12: the CLI's output and arguments ----------------------------------------------------------

PRINTING_STAGES = """\
import math

def numbers(n=3):
    print("PRINTED-BY-numbers")
    return list(range(n))

def odd(x):
    print("PRINTED-BY-odd", x)
    return [1.5, math.nan, math.inf, -math.inf][x]
"""
PRINTING_WORKFLOW = """\
kind: workflow
metadata: {name: printing}
spec:
  stages:
    - {name: numbers, target: clistages_print.numbers}
    - {name: odd, target: clistages_print.odd, type: parameterized, depends_on: [numbers]}
"""
CONFIGS = {
    "threads": "target: local\nuse_processes: false\ncpus: 2\n",
    "processes": "target: local\nuse_processes: true\ncpus: 2\n",
    "dask": "target: dask\ncpus: 1\nthreads: 1\n",
    "ray": "target: ray\ncpus: 1\ninclude_dashboard: false\nlogging_level: error\n",
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_cli_stdout_is_only_the_json_result(kind, tmp_path):
    """Stage prints go to stderr on every executor; NaN and infinities print as null with a note,
    so stdout is strict JSON."""
    (tmp_path / "clistages_print.py").write_text(PRINTING_STAGES)
    (tmp_path / "wf.yaml").write_text(PRINTING_WORKFLOW)
    (tmp_path / "cfg.yaml").write_text(CONFIGS[kind])
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = cli("run", "wf.yaml", "--config", "cfg.yaml", "--input", "n=4", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr

    def no_constants(name):
        raise AssertionError(f"stdout holds {name}, which is not JSON")

    assert json.loads(proc.stdout, parse_constant=no_constants) == [1.5, None, None, None]
    assert "PRINTED-BY" not in proc.stdout
    assert "PRINTED-BY-numbers" in proc.stderr and "PRINTED-BY-odd 3" in proc.stderr
    assert (
        "note: the result holds NaN or infinite numbers; JSON has none, so they print as null" in proc.stderr
    )


def test_cli_result_that_is_not_json_prints_as_a_json_string(tmp_path):
    (tmp_path / "wf.yaml").write_text(
        "kind: workflow\nmetadata: {name: w}\nspec:\n  stages:\n    - {name: a, target: builtins.object}\n"
    )
    (tmp_path / "cfg.yaml").write_text(CONFIGS["threads"])
    proc = cli("run", "wf.yaml", "-c", "cfg.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout).startswith("<object object at ")
    assert "note: the result (object) is not JSON; printed its repr as a JSON string" in proc.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "NaN"])
def test_cli_timeout_must_be_finite_and_positive(value, tmp_path):
    (tmp_path / "wf.yaml").write_text(
        "kind: workflow\nmetadata: {name: w}\nspec:\n  stages:\n    - {name: a, target: builtins.list}\n"
    )
    proc = cli("run", "wf.yaml", f"--timeout={value}", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    line = _one_error_line(proc)
    assert f"argument --timeout: must be a positive number of seconds, got {value}" in line


@pytest.mark.parametrize("case", ["latin1", "deep"])
def test_cli_on_bad_files_exits_with_one_line(case, tmp_path):
    path = tmp_path / "bad.yaml"
    if case == "latin1":
        path.write_bytes(LATIN1_WORKFLOW)
    else:
        path.write_text(_deep(1000, "workflow"))
    for args, code in ((["validate", "bad.yaml"], 1), (["run", "bad.yaml"], 2)):
        proc = cli(*args, cwd=tmp_path, timeout=120)
        assert proc.returncode == code, proc.stderr
        line = _one_error_line(proc)
        assert line.count("bad.yaml") == 1, line
        assert ("not UTF-8 text" if case == "latin1" else "nesting depth") in line


# --- 16: a workflow file is code; allowed_targets ------------------------------------------------


def test_help_says_a_workflow_file_is_code(tmp_path):
    from flowdapt_nb.workflow import TARGETS_ARE_CODE

    assert "A workflow file is code" in TARGETS_ARE_CODE and "allowed_targets" in TARGETS_ARE_CODE
    for args in (["--help"], ["run", "--help"], ["validate", "--help"]):
        proc = cli(*args, cwd=tmp_path, timeout=60)
        assert proc.returncode == 0
        text = " ".join(proc.stdout.split())
        assert " ".join(TARGETS_ARE_CODE.split()) in text, proc.stdout


EVIL_MODULE = """\
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("import-time code ran")

def run(cmd):
    Path(__file__).with_name("CALLED").write_text(cmd)
"""
EVIL_WORKFLOW = """\
kind: workflow
metadata: {name: innocent-report}
spec:
  stages:
    - {name: report, target: %s, type: parameterized, options: {map_on: steps}}
"""


@pytest.fixture
def evil_project(tmp_path):
    (tmp_path / "evilmod_h1.py").write_text(EVIL_MODULE)
    (tmp_path / "evil.yaml").write_text(EVIL_WORKFLOW % "evilmod_h1.run")
    (tmp_path / "system.yaml").write_text(EVIL_WORKFLOW % "os.system")
    (tmp_path / "allowed.yaml").write_text(
        "target: local\nuse_processes: false\ncpus: 1\nallowed_targets: [mypkg., __main__]\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return tmp_path, env


def test_cli_validate_resolve_imports_unless_allowed_targets_refuses(evil_project):
    """Without an allow-list, validate --resolve runs the module's import-time code (so this
    test can fail); with one, the target is refused before import."""
    path, env = evil_project
    proc = cli("validate", "--resolve", "evil.yaml", "allowed.yaml", cwd=path, env=env, timeout=60)
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert (
        "evil.yaml: stage 'report': target 'evilmod_h1.run' is not allowed: allowed_targets permits "
        "only mypkg., __main__"
    ) in line
    assert "allowed.yaml: ok" in proc.stdout and not (path / "IMPORTED").exists()
    proc = cli("validate", "--resolve", "evil.yaml", cwd=path, env=env, timeout=60)
    assert proc.returncode == 0 and (path / "IMPORTED").exists(), proc.stderr


def test_cli_run_refuses_targets_outside_allowed_targets(evil_project):
    path, env = evil_project
    marker = path / "PWNED"
    proc = cli(
        "run",
        "system.yaml",
        "-c",
        "allowed.yaml",
        "--input",
        f"steps=['touch {marker}']",
        cwd=path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    line = _one_error_line(proc)
    assert (
        "stage 'report': target 'os.system' is not allowed: allowed_targets permits only mypkg., __main__"
        in line
    )
    assert not marker.exists()
    proc = cli("run", "evil.yaml", "-c", "allowed.yaml", "--input", "steps=[x]", cwd=path, env=env)
    assert proc.returncode == 2 and not (path / "IMPORTED").exists() and not (path / "CALLED").exists()


@pytest.mark.parametrize("kind", ["local", "dask", "ray"])
def test_allowed_targets_is_a_field_of_every_executor(kind):
    ex = fnb.executor_from_config(f"target: {kind}\nallowed_targets: [mypkg., __main__]\n")
    assert ex.config.allowed_targets == ["mypkg.", "__main__"]
    ex = fnb.executor_from_config(
        f"services:\n  compute:\n    allowed_targets: [stages.]\n    executor:\n      target: {kind}\n"
    )
    assert ex.config.allowed_targets == ["stages."]
    with pytest.raises(fnb.ConfigError) as info:
        fnb.executor_from_config(f"target: {kind}\nallowed_targets: [os system]\n")
    assert str(info.value).startswith(
        "line 2: 'allowed_targets': allowed_targets holds 'os system': each entry is an import-path prefix"
    )


def test_allowed_targets_on_every_executor(executor, tmp_path, monkeypatch):
    """A real run on each executor: a target outside the list is refused before its module is
    imported (no import-time code runs), one inside runs."""
    (tmp_path / "evilmod_h1_run.py").write_text(EVIL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    evil = Workflow(
        "evil",
        stages=[
            Stage("numbers", st.numbers),
            Stage("report", "evilmod_h1_run.run", type="parameterized", depends_on=["numbers"]),
        ],
    )
    good = Workflow(
        "good", stages=[Stage("numbers", "stages.numbers"), Stage("total", st.total, depends_on=["numbers"])]
    )
    before = executor.config.allowed_targets
    executor.config.allowed_targets = ["stages."]
    try:
        with pytest.raises(fnb.ConfigError) as info:
            executor.run(evil, input={"n": 2})
        assert str(info.value) == (
            "stage 'report': target 'evilmod_h1_run.run' is not allowed: allowed_targets "
            "permits only stages.; add a prefix of it to allowed_targets in the executor "
            "config if you trust that code"
        )
        assert "evilmod_h1_run" not in sys.modules and not (tmp_path / "IMPORTED").exists()
        assert executor.run(good, input={"n": 4}).result == 6
    finally:
        executor.config.allowed_targets = before


def test_allowed_targets_prefix_rules():
    from flowdapt_nb.workflow import is_allowed, target_path

    assert is_allowed("mypkg.models.train", ["mypkg."]) and is_allowed("mypkg.train", ["mypkg"])
    assert not is_allowed("mypkg_evil.train", ["mypkg"]) and not is_allowed("mypkg_evil.x", ["mypkg."])
    assert is_allowed("__main__.f", ["__main__"]) and not is_allowed("os.system", ["__main__"])
    assert target_path("f") == "__main__.f" and target_path("pkg.mod:Cls.m") == "pkg.mod.Cls.m"
    assert target_path(st.square) == "stages.square"


def test_notebook_targets_and_allowed_targets_in_ipython():
    """In a real IPython shell with allowed_targets [__main__]: a function defined in the notebook
    runs; an imported os.system under a notebook name, or an import path, is refused."""
    proc = _python(
        """
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "flowdapt_nb")
        def cell(text):
            r = shell.run_cell(text)
            err = r.error_in_exec or r.error_before_exec
            print(type(err).__name__ if err else "ok", "|", err if err else r.result)
        cell("%%flowdapt executor\\ntarget: local\\nuse_processes: false\\ncpus: 1\\nallowed_targets: [__main__]\\n")
        cell("def double(n=2):\\n    return n * 2\\nfrom os import system")
        cell("%%flowdapt workflow mine\\n- {name: d, target: double}")
        cell("%%flowdapt workflow sneaky\\n- {name: s, target: system}")
        cell("%%flowdapt workflow imported\\n- {name: g, target: os.getcwd}")
        cell("%flowdapt run mine --input n=5\\n")
        cell("_.result")
        cell("%flowdapt run sneaky")
        cell("%flowdapt run imported")
        shell.run_line_magic("flowdapt", "stop")
        """,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " | " in line]
    assert lines[-2].startswith(
        "UsageError | %flowdapt run: stage 's': target 'system' in the notebook is "
        "posix.system, which is not allowed: allowed_targets permits only __main__"
    ), lines
    assert lines[-1].startswith("UsageError | %flowdapt run: stage 'g': target 'os.getcwd' is not allowed"), (
        lines
    )
    assert "ok | 10" in lines, lines


# --- 13: names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["s\n", "s\r", "a b", "a/b", "", "ünï"])
def test_names_are_matched_whole(name):
    with pytest.raises(fnb.ConfigError, match="is not valid: use letters, digits"):
        Workflow("w", stages=[Stage(name, "builtins.list")])
    with pytest.raises(fnb.ConfigError, match="is not valid: use letters, digits"):
        fnb.load_workflow({"name": name, "stages": [{"name": "a", "target": "builtins.list"}]})


def put_in_namespace(namespace):
    fnb.cluster_memory.put("k", 1, namespace=namespace)


@pytest.mark.parametrize("namespace", [123, 0, False, "", ("a", "b"), b"ns"])
def test_cluster_memory_namespace_must_be_a_string(namespace):
    """Refused with one clear error, on the notebook side and inside a stage; the listing and
    %flowdapt memory keep working."""
    with fnb.LocalExecutor(use_processes=False, cpus=1) as ex:
        for call in (
            lambda: fnb.cluster_memory.put("k", 1, namespace=namespace),
            lambda: fnb.cluster_memory.get("k", namespace=namespace),
            lambda: fnb.cluster_memory.listing(namespace=namespace),
        ):
            with pytest.raises(TypeError) as info:
                call()
            assert str(info.value) == (
                f"cluster memory namespaces are non-empty strings (None means the default), got {namespace!r}"
            )
        with pytest.raises(TypeError, match="object store namespaces are non-empty strings"):
            fnb.object_store.put("k", 1, namespace=namespace)
        wf = Workflow("w", stages=[Stage("put", put_in_namespace)])
        with pytest.raises(fnb.StageError) as info:
            ex.run(wf, input={"namespace": namespace})
        assert "TypeError: cluster memory namespaces are non-empty strings" in str(info.value)
        fnb.cluster_memory.put("k", 1)  # None: the default namespace
        assert list(fnb.cluster_memory.listing()["namespace"]) == ["default"]
        assert len(fnb.object_store.listing(storage="memory://h1-names"))


# --- 12, 17: object-store paths ------------------------------------------------------------------


def test_long_key_is_a_clear_error(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    for key in ("k" * 300, "ü" * 40):  # 40 characters, 240 once percent-encoded
        with pytest.raises(ValueError) as info:
            store.put("default", key, 1)
        assert f"is too long: {len(key) if key[0] == 'k' else 240} characters once encoded" in str(info.value)
        assert f"at most {MAX_NAME_BYTES}" in str(info.value)
        for call in (fnb.object_store.put, fnb.object_store.get):
            args = (key, 1) if call is fnb.object_store.put else (key,)
            with pytest.raises(ValueError, match="too long"):
                call(*args, strategy="artifact", storage=str(tmp_path / "store"))
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("meta.json"))
    store.put("default", "k" * MAX_NAME_BYTES, 1)
    assert store.get("default", "k" * MAX_NAME_BYTES) == 1


@pytest.mark.parametrize("data", ["../../../victim.txt", "/VICTIM", "../model2/meta.json", ".tmp-x", ""])
def test_tampered_meta_never_reads_or_deletes_outside(data, tmp_path):
    root = tmp_path / "store"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    store = ArtifactStore(str(root))
    store.put("default", "model", 1)
    store.put("default", "model2", 2)
    meta_path = root / "default" / "model" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["data"] = str(victim) if data == "/VICTIM" else data
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError) as info:
        store.get("default", "model")
    assert "has a meta.json whose data file is" in str(info.value) and "refusing to use it" in str(info.value)
    store.put("default", "model", 3)  # the next put replaces the tampered meta.json...
    assert (
        victim.read_text() == "precious" and store.get("default", "model2") == 2
    )  # ...deleting nothing else
    assert store.get("default", "model") == 3
    meta_path.write_text(json.dumps(meta))
    assert store.delete("default", "model") and victim.read_text() == "precious"


def test_symlinked_value_file_is_refused(tmp_path):
    root = tmp_path / "store"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    store = ArtifactStore(str(root))
    meta = store.put("default", "model", 1)
    value = root / "default" / "model" / meta["data"]
    value.unlink()
    value.symlink_to(victim)
    with pytest.raises(ValueError, match="outside the artifact store"):
        store.get("default", "model")
    store.put("default", "model", 2)
    assert victim.read_text() == "precious" and store.get("default", "model") == 2


# --- 18: every Flowdapt default loads ------------------------------------------------------------

FLOWDAPT_DEFAULTS = {  # Flowdapt 0.1.52's executor signatures, every field at its default
    "local": """\
        target: flowdapt.compute.executor.local.LocalExecutor
        use_processes: true
        cpus: auto
        cluster_memory_socket_path: /tmp/flowdapt-cluster-memory.sock
        """,
    "dask": """\
        target: flowdapt.compute.executor.dask.DaskExecutor
        cluster_address: null
        scheduler_host: 127.0.0.1
        scheduler_port: 6684
        scheduler_scheme: tcp
        dashboard_port: 9968
        cpus: auto
        gpus: disabled
        threads: auto
        memory: auto
        adaptive: false
        pip: []
        env_vars: {}
        resources: {}
        upload_plugins: false
        """,
    "ray": """\
        target: flowdapt.compute.executor.ray.RayExecutor
        cluster_address: null
        strategy: group_by_group
        cpus: auto
        gpus: null
        resources: null
        object_store_memory: null
        dashboard_host: 127.0.0.1
        dashboard_port: 9969
        log_to_driver: true
        logging_level: null
        working_dir: null
        py_modules: null
        pip: null
        conda: null
        env_vars: null
        container: null
        upload_plugins: true
        cluster_memory_actor: null
        mapper_actor: null
        runtime_env_config: null
        connection_monitor_interval: 15
        max_reconnect_retries: 2048
        base_reconnect_delay: 5.0
        max_reconnect_delay: 60.0
        ping_timeout: 10.0
        ping_failure_threshold: 3
        tasks_per_worker: null
        """,
}


@pytest.mark.parametrize("kind", list(FLOWDAPT_DEFAULTS))
def test_every_flowdapt_default_loads_without_warnings(kind):
    text = textwrap.dedent(FLOWDAPT_DEFAULTS[kind])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = fnb.executor_from_config(text)
    assert ex.kind == kind
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]
    whole = "services:\n  compute:\n    executor:\n" + textwrap.indent(text, "      ")
    assert fnb.executor_from_config(whole).kind == kind  # inside a whole Flowdapt config too


def test_gpus_null_means_what_flowdapt_meant():
    """Flowdapt's Ray passes gpus: null to ray.init (Ray counts the GPUs): our 'auto'."""
    assert fnb.executor_from_config("target: ray\ngpus: null\n").config.gpus == "auto"
    assert fnb.executor_from_config("target: dask\ngpus: null\n").config.gpus == "disabled"
    with pytest.warns(UserWarning, match="upload_plugins"):  # a value that differs from the default
        fnb.executor_from_config("target: dask\nupload_plugins: true\n")


# --- 19: callables as targets in workflow dicts ---------------------------------------------------


class Scaler:
    @staticmethod
    def twice(xs):
        return [2 * x for x in xs]


def test_workflow_dict_with_callables_runs_and_round_trips():
    wf = fnb.load_workflow(
        {
            "kind": "workflow",
            "metadata": {"name": "calls"},
            "spec": {
                "stages": [
                    {"name": "numbers", "target": st.numbers},
                    {"name": "twice", "target": Scaler.twice, "depends_on": ["numbers"]},
                    {"name": "total", "target": st.total, "depends_on": ["twice"]},
                ]
            },
        }
    )
    with fnb.LocalExecutor(use_processes=False, cpus=1) as ex:
        assert ex.run(wf, input={"n": 4}).result == 12
    text = wf.to_yaml()
    stages_out = yaml.safe_load(text)["spec"]["stages"]
    assert [s["target"] for s in stages_out] == [
        "stages.numbers",
        "test_hostile_input:Scaler.twice",
        "stages.total",
    ]
    again = fnb.load_workflow(text).resolve()
    assert again == {"numbers": st.numbers, "twice": Scaler.twice, "total": st.total}
    with pytest.raises(
        fnb.ConfigError,
        match="target must be an import path, a notebook function's name or a callable, not int",
    ):
        fnb.load_workflow({"name": "w", "stages": [{"name": "a", "target": 3}]})


def test_notebook_function_target_serializes_to_its_name():
    proc = _python(
        """
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        shell.run_cell("import flowdapt_nb as fnb\\ndef make(n=3):\\n    return list(range(n))\\n"
                       "wf = fnb.load_workflow({'name': 'nb', 'stages': [{'name': 'a', 'target': make}]})")
        print(shell.user_ns["wf"].to_yaml())
        again = shell.user_ns["fnb"].load_workflow(shell.user_ns["wf"].to_yaml())
        print(again.resolve()["a"] is shell.user_ns["make"])
        """,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "target: make\n" in proc.stdout and proc.stdout.strip().endswith("True")


def test_nan_is_not_a_stage_timeout():
    with pytest.raises(fnb.ConfigError, match="positive number of seconds"):
        Workflow("w", stages=[Stage("a", "builtins.list", options={"timeout": math.nan})])


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b"])
def test_control_characters_are_one_config_error_with_a_line(char):
    with pytest.raises(fnb.ConfigError) as info:
        fnb.load_workflow(f"kind: workflow\nmetadata: {{name: w}}\n{char}: 1\n")
    assert str(info.value) == (
        f"line 3: invalid YAML: unacceptable character #x{ord(char):04x}: control "
        "characters are not allowed; remove the control character "
        "(YAML text may not hold them)"
    )


@pytest.mark.parametrize("depth", [MAX_DEPTH + 50, 1000, 5000])
def test_pure_python_loader_gives_the_same_errors(depth, monkeypatch):
    """Where PyYAML lacks libyaml, its own loader recurses once per level: a RecursionError
    becomes the same one-line ConfigError; the bomb is refused the same way."""
    import flowdapt_nb.yamlsrc as yamlsrc

    monkeypatch.setattr(yamlsrc, "_LOADER", yaml.SafeLoader)
    with pytest.raises(fnb.ConfigError) as info:
        fnb.executor_from_config(_deep(depth, "config"))
    assert f"YAML nested more than {MAX_DEPTH} levels deep" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(fnb.ConfigError, match="YAML aliases expand this document by 490,329,036 values"):
        fnb.executor_from_config(BOMB_CONFIG)


@pytest.mark.parametrize("namespace", [0, False, "", 123])
def test_run_namespace_must_be_a_non_empty_string(namespace):
    """ex.run(namespace=0) used to mean the default namespace silently."""
    wf = fnb.Workflow("ns", stages=[fnb.Stage("one", lambda: 1)])
    with fnb.LocalExecutor(use_processes=False, cpus=1) as ex:
        with pytest.raises(fnb.ConfigError, match="namespace must be a non-empty string"):
            ex.run(wf, namespace=namespace)
        assert ex.run(wf, namespace=None).result == 1


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0, -1, True, "10"])
def test_run_timeout_must_be_positive_and_finite(timeout):
    wf = fnb.Workflow("to", stages=[fnb.Stage("one", lambda: 1)])
    with (
        fnb.LocalExecutor(use_processes=False, cpus=1) as ex,
        pytest.raises(fnb.ConfigError, match="timeout must be a positive number of seconds"),
    ):
        ex.run(wf, timeout=timeout)
