"""Issue 9's bad-input corpus: each file in tests/bad_inputs/ is one user mistake.

Every case must end in exactly one clear error: a ConfigError / StageError from the Python API, a
one-line UsageError from the magics, or a non-zero exit with one ``error:`` line from the CLI,
never a Python traceback. The message names what is wrong (the case's ``names`` fragments, its
``line``, ``key`` and ``stage``) and says what is valid (``valid``). Cases that reach an executor
run on threads, processes, Dask and Ray (the session's shared clusters; the local pools once per
module), and the executor must run a quick workflow afterwards. See tests/bad_inputs/README.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import stages as st
import yaml
from conftest import make_executor
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow

CASES_DIR = Path(__file__).resolve().parent / "bad_inputs"
EXECUTOR_KINDS = ("threads", "processes", "dask", "ray")
CASE_KINDS = ("executor_config", "workflow", "run_input", "magic_line", "magic_cell", "cli_args")
REACHES_EXECUTOR = ("workflow", "run_input")  # on all four executors unless the case narrows it
CASE_KEYS = {"kind", "about", "input", "expect", "executors", "run_input", "timeout", "setup", "files"}
EXPECT_KEYS = {"error", "exit_code", "names", "valid", "line", "key", "stage"}
ERRORS = {"ConfigError": fnb.ConfigError, "StageError": fnb.StageError, "UsageError": UsageError}

# numbers -> square (a map) -> total: n=3 gives 0 + 1 + 4
QUICK = Workflow(
    "quick",
    stages=[
        Stage("numbers", st.numbers),
        Stage("square", st.square, type="parameterized", depends_on=["numbers"]),
        Stage("total", st.total, depends_on=["square"]),
    ],
)
QUICK_CELL = """%%flowdapt workflow quick
- {name: numbers, target: stages.numbers}
- {name: square, target: stages.square, type: parameterized, depends_on: [numbers]}
- {name: total, target: stages.total, depends_on: [square]}
"""
# Topics issue 9 names, each with at least one case.
REQUIRED = [
    "config_malformed_yaml",
    "config_tab_indent",
    "workflow_tab_indent",
    "config_wrong_type_bool",
    "config_negative_cpus",
    "config_memory_lots",
    "config_unknown_target",
    "config_unknown_key_near_miss",
    "workflow_stage_key_near_miss",
    "workflow_option_near_miss",
    "workflow_cycle",
    "workflow_self_dependency",
    "workflow_duplicate_stage_names",
    "run_target_raises_on_import",
    "run_wrong_arity",
    "run_map_over_non_iterable",
    "run_map_on_key_missing",
    "run_resource_cluster_lacks",
    "magic_run_resource_cluster_lacks",
    "magic_run_input_without_value",
    "cli_input_without_value",
    "magic_unknown_subcommand",
    "magic_unknown_flag",
    "magic_run_unknown_workflow",
    "cli_missing_config_file",
    "workflow_kind_config",
    "cli_workflow_kind_config",
    # issue 14: hostile files
    "config_alias_bomb",
    "workflow_alias_bomb",
    "cli_validate_alias_bomb",
    "cell_workflow_alias_bomb",
    "config_deep_nesting",
    "workflow_deep_nesting",
    "cli_run_deep_nesting",
    "cli_run_not_utf8",
    "cli_validate_not_utf8",
    "magic_run_not_utf8",
    "cli_timeout_nan",
    "workflow_name_trailing_newline",
    "cli_run_target_not_allowed",
]


def _load_cases() -> dict:
    """Every case file, checked against the case format so a typo in a case fails loudly."""
    cases = {}
    for path in sorted(CASES_DIR.glob("*.yaml")):
        case = yaml.safe_load(path.read_text())
        where = f"tests/bad_inputs/{path.name}"
        assert isinstance(case, dict) and case.get("kind") in CASE_KINDS, (
            f"{where}: kind must be one of {CASE_KINDS}"
        )
        assert not set(case) - CASE_KEYS, f"{where}: unknown fields {set(case) - CASE_KEYS}"
        assert case.get("about") and "input" in case, f"{where}: needs about and input"
        expect = case.get("expect") or {}
        assert not set(expect) - EXPECT_KEYS, f"{where}: unknown expect fields {set(expect) - EXPECT_KEYS}"
        assert expect.get("names") and expect.get("valid"), (
            f"{where}: expect needs names (what is wrong) and valid (what is valid)"
        )
        if case["kind"] == "cli_args":
            assert isinstance(case["input"], list) and expect.get("exit_code"), (
                f"{where}: args list, exit_code"
            )
        else:
            assert expect.get("error") in ERRORS, f"{where}: expect.error must be one of {list(ERRORS)}"
        assert set(case.get("executors") or []) <= set(EXECUTOR_KINDS), f"{where}: executors"
        cases[path.stem] = case
    return cases


CASES = _load_cases()


def _params(*kinds: str) -> list:
    out = []
    for name, case in CASES.items():
        if case["kind"] not in kinds:
            continue
        on = case.get("executors") or (list(EXECUTOR_KINDS) if case["kind"] in REACHES_EXECUTOR else [None])
        out += [pytest.param(name, kind, id=f"{name}-{kind}" if kind else name) for kind in on]
    return out


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def executors():
    """``executors(kind)``: a started executor; Dask and Ray are the session's shared clusters,
    the local pools are made once for this module."""
    local: dict = {}

    def get(kind):
        if kind in ("threads", "processes"):
            if kind not in local or not local[kind].running:
                local[kind] = make_executor(kind)
            return local[kind].make_current()
        return make_executor(kind)

    yield get
    for ex in local.values():
        ex.close()


@pytest.fixture(scope="module")
def shell():
    sh = InteractiveShell.instance()
    before = set(sh.user_ns)
    sh.extension_manager.load_extension("flowdapt_nb")
    _run_ok(sh, QUICK_CELL)
    yield sh
    magics = sh.magics_manager.registry["FlowdaptMagics"]
    magics.current = None  # the shared clusters are not the magics' to close
    sh.extension_manager.unload_extension("flowdapt_nb")
    for name in set(sh.user_ns) - before:
        sh.user_ns.pop(name, None)


# --- checks -------------------------------------------------------------------------------------


def _check_fragments(text: str, fragments: list, what: str) -> None:
    for fragment in fragments:
        assert fragment in text, f"the error should contain {what} {fragment!r}:\n{text}"


def _check_error(err: BaseException, case: dict) -> None:
    """One clear error of the expected type, naming what the case says, in one line."""
    expect = case["expect"]
    assert type(err) is ERRORS[expect["error"]], f"{type(err).__name__}: {err}"
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, f"the error should be one line:\n{text}"
    _check_fragments(text, expect["names"], "what is wrong:")
    _check_fragments(text, expect["valid"], "what is valid:")
    if isinstance(err, fnb.ConfigError):
        # one error: not shown as raised while handling another one
        assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), repr(
            err.__context__
        )
        for field in ("line", "key", "stage"):
            if field in expect:
                assert getattr(err, field) == expect[field], (
                    f"{field}: {getattr(err, field)!r} != {expect[field]!r}"
                )
        if "line" in expect:
            assert text.startswith(f"line {expect['line']}: "), text
    elif isinstance(err, fnb.StageError):
        assert err.stage == expect["stage"] and err.__cause__ is not None
        assert err.run.state == "failed" and f"stage '{expect['stage']}'" in err.run.error


def _no_warnings_from_us(caught) -> None:
    ours = [
        str(w.message) for w in caught if "flowdapt_nb" in (w.filename or "") or "flowdapt" in str(w.message)
    ]
    assert not ours, f"a bad input should give one error, not warnings too: {ours}"


def _last_run(ex):
    history = ex.history
    return history[-1] if history else None


def _assert_usable(ex, err: BaseException, before) -> None:
    """The executor still runs; a ConfigError left no run behind, a failed run is on record."""
    assert ex.running
    if isinstance(err, fnb.StageError):
        assert _last_run(ex) is err.run and err.run.state == "failed" and err.run.finished_at is not None
    else:
        assert _last_run(ex) is before, "an input refused before the run must not leave a run record"
    run = ex.run(QUICK, input={"n": 3})
    assert run.state == "finished" and run.result == 5


# --- the corpus ---------------------------------------------------------------------------------


def test_corpus_covers_issue_9():
    assert len(CASES) >= 40
    assert {c["kind"] for c in CASES.values()} == set(CASE_KINDS)
    missing = [name for name in REQUIRED if name not in CASES]
    assert not missing, f"cases issue 9 asks for are missing: {missing}"
    assert (CASES_DIR / "raises_on_import.py").is_file()


@pytest.mark.parametrize("name,kind", _params("executor_config"))
def test_executor_config(name, kind):
    case = CASES[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(fnb.ConfigError) as info:
            fnb.executor_from_config(case["input"])
    _check_error(info.value, case)
    _no_warnings_from_us(caught)


@pytest.mark.parametrize("name,kind", _params("workflow"))
def test_workflow(name, kind, executors):
    """The workflow is refused when loaded, and again, the same way, when given to a running executor."""
    case = CASES[name]
    with pytest.raises(fnb.ConfigError) as direct:
        fnb.load_workflow(case["input"])
    _check_error(direct.value, case)
    ex = executors(kind)
    before = _last_run(ex)
    with pytest.raises(fnb.ConfigError) as via_run:
        ex.run(case["input"], input={"n": 3})
    assert str(via_run.value) == str(direct.value)
    _assert_usable(ex, via_run.value, before)


@pytest.mark.parametrize("name,kind", _params("run_input"))
def test_run_input(name, kind, executors):
    case = CASES[name]
    ex = executors(kind)
    before = _last_run(ex)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Exception) as info:
            ex.run(case["input"], input=case.get("run_input"), timeout=case.get("timeout"))
    _check_error(info.value, case)
    _no_warnings_from_us(caught)
    _assert_usable(ex, info.value, before)


def _run_cell(shell, text: str):
    with capture_output() as cap:
        result = shell.run_cell(text, store_history=False, silent=False)
    return result, cap.stdout, cap.stderr


def _run_ok(shell, text: str):
    result, out, err = _run_cell(shell, text)
    assert result.success, f"set-up cell failed: {result.error_in_exec!r}\n{out}\n{err}"
    return result.result


@pytest.mark.parametrize("name,kind", _params("magic_line", "magic_cell"))
def test_magic(name, kind, shell, executors):
    """The cell runs in a real IPython shell: one UsageError line, no traceback; the magics'
    current executor (when the case has one) stays and still runs."""
    case = CASES[name]
    magics = shell.magics_manager.registry["FlowdaptMagics"]
    ex = executors(kind) if kind else None
    stored = dict(magics.workflows)
    magics.current = ex
    try:
        for cell in case.get("setup") or []:
            _run_ok(shell, cell)
        before = _last_run(ex) if ex is not None else None
        result, out, err = _run_cell(shell, case["input"])
        error = result.error_in_exec
        assert isinstance(error, UsageError), f"{error!r}\n{out}\n{err}"
        _check_error(error, case)
        assert "Traceback" not in out + err and "Error" not in out, out + err
        assert err.strip() == f"UsageError: {error}", f"one line on stderr, got:\n{err}"
        if "line" in case["expect"]:
            assert f"cell line {case['expect']['line']}: " in str(error), str(error)
        if ex is not None:
            assert magics.current is ex and ex.running, "a mistake must leave the current executor alone"
            assert _last_run(ex) is before
            run = _run_ok(shell, "%flowdapt run quick --input n=3")
            assert run.state == "finished" and run.result == 5 and ex.history[-1] is run
    finally:
        magics.current = None
        magics.workflows.clear()
        magics.workflows.update(stored)


def _cli() -> list:
    script = Path(sys.executable).with_name("flowdapt-nb")
    return [str(script)] if script.exists() else [sys.executable, "-m", "flowdapt_nb.cli"]


@pytest.mark.parametrize("name,kind", _params("cli_args"))
def test_cli(name, kind, tmp_path):
    """``flowdapt-nb`` as a user runs it: a non-zero exit and one ``error:`` line, no traceback."""
    case = CASES[name]
    expect = case["expect"]
    for file_name, text in (case.get("files") or {}).items():  # !!binary: bytes as they are (not UTF-8)
        (tmp_path / file_name).write_bytes(text) if isinstance(text, bytes) else (
            tmp_path / file_name
        ).write_text(text)
    proc = subprocess.run(
        [*_cli(), *map(str, case["input"])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == expect["exit_code"], f"exit {proc.returncode}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.stdout.strip() == "", f"a failed command prints no result: {proc.stdout}"
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, f"exactly one error: line on stderr, got:\n{proc.stderr}"
    _check_fragments(errors[0], expect["names"], "what is wrong:")
    _check_fragments(proc.stderr, expect["valid"], "what is valid:")
    if "line" in expect:
        assert f"line {expect['line']}: " in errors[0], errors[0]
