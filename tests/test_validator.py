"""The one workflow validator (``workflow.validate_workflow`` / ``workflow_problems``): every problem
found at once, as data (stage, key, YAML line, message, hint); ``load_workflow`` raises them all in
one ConfigError; the StageMapper shows each on its row, and agrees with the loader on the
bad-input corpus's workflows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import flowdapt_nb as fnb
from flowdapt_nb.workflow import Problem, workflow_problems

widgets = pytest.importorskip("flowdapt_nb.widgets")

CASES_DIR = Path(__file__).resolve().parent / "bad_inputs"

# four mistakes in one file: a resource, a duplicate name, an unknown dependency, a cycle
SEVERAL = """\
kind: workflow
metadata: {name: several}
spec:
  stages:
    - name: numbers
      target: stages.numbers
      resources: {cpus: -1}
    - name: square
      target: stages.square
      type: parameterized
      depends_on: [numbrs]
    - name: numbers
      target: stages.total
    - name: a
      target: stages.square
      depends_on: [b]
    - name: b
      target: stages.square
      depends_on: [a]
"""
# (index, stage, key, line, fragment of the message, fragment of the hint)
SEVERAL_EXPECTED = [
    (0, "numbers", "resources.cpus", 7, "resources.cpus must be a non-negative number, got -1", None),
    (
        2,
        "numbers",
        None,
        12,
        "duplicate stage name 'numbers' (stage 1 has it too)",
        "stage names must be unique",
    ),
    (1, "square", "depends_on", 11, "depends on unknown stage 'numbrs'", "did you mean 'numbers'?"),
    (3, "a", "depends_on", 16, "dependency cycle a -> b -> a", None),
]


def test_every_problem_is_reported_as_data():
    problems = workflow_problems(SEVERAL)
    assert all(isinstance(p, Problem) for p in problems)
    got = [(p.index, p.stage, p.key, p.line) for p in problems]
    assert got == [e[:4] for e in SEVERAL_EXPECTED], got
    for problem, (*_, message, hint) in zip(problems, SEVERAL_EXPECTED):
        assert message in problem.message
        if hint is not None:
            assert hint in problem.hint
    cycle = problems[-1]
    assert cycle.positions == (3, 4)  # both stages of the cycle are marked
    assert problems[0].positions == (0,)


def test_loading_raises_every_problem_in_one_line():
    with pytest.raises(fnb.ConfigError) as info:
        fnb.load_workflow(SEVERAL)
    err = info.value
    text = str(err)
    # read as the first problem (as before: its line, stage and key), the others listed after it
    assert text.startswith("line 7: stage 'numbers': resources.cpus must be a non-negative number")
    assert (err.line, err.stage, err.key) == (7, "numbers", "resources.cpus")
    assert "\n" not in text and "[and 3 more: (2) line 12: stage 'numbers': duplicate stage name" in text
    assert "(3) line 11: stage 'square': depends on unknown stage 'numbrs'; did you mean 'numbers'?" in text
    assert "(4) line 16: stage 'a': dependency cycle a -> b -> a" in text
    assert err.problems == workflow_problems(SEVERAL)
    # the same from a Workflow built in code (no YAML lines there)
    with pytest.raises(fnb.ConfigError) as built:
        fnb.Workflow(
            "w", stages=[fnb.Stage("a", "stages.numbers", depends_on=["zz"]), fnb.Stage("a", "stages.total")]
        )
    assert [p.message for p in built.value.problems] == [
        "duplicate stage name 'a' (stage 1 has it too)",
        "depends on unknown stage 'zz'",
    ]


def test_one_problem_reads_as_before():
    text = SEVERAL.replace("cpus: -1", "cpus: 1").split("    - name: square")[0]
    with pytest.raises(fnb.ConfigError) as info:
        fnb.load_workflow(
            text.replace("target: stages.numbers", "target: stages.numbers\n      type: fanout")
        )
    assert (
        str(info.value) == "line 7: stage 'numbers': type 'fanout' is not valid; use simple or parameterized"
    )
    assert info.value.problems == workflow_problems(
        text.replace("target: stages.numbers", "target: stages.numbers\n      type: fanout")
    )
    assert workflow_problems(text) == []


def test_cli_validate_lists_every_problem(tmp_path):
    (tmp_path / "several.yaml").write_text(SEVERAL)
    proc = subprocess.run(
        [sys.executable, "-m", "flowdapt_nb.cli", "validate", "several.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr  # validate: 1, a bad file
    assert "line 7: " in errors[0] and "(4) line 16: stage 'a': dependency cycle a -> b -> a" in errors[0]


# --- the mapper shows them on their rows ----------------------------------------------------------


def _fill(mapper, data: dict) -> None:
    """Put a workflow resource's stages into the mapper as a user would, one add_stage each."""
    mapper.name = str(data["metadata"]["name"])
    for raw in data["spec"]["stages"]:
        raw = dict(raw)
        mapper.add_stage(raw.pop("name", None), raw.pop("target", None), **raw)


def test_mapper_shows_every_problem_on_its_row():
    mapper = widgets.StageMapper(namespace={})
    try:
        _fill(mapper, yaml.safe_load(SEVERAL))
        rows = mapper._rows
        expected_rows = {
            0: ["resources.cpus must be a non-negative number"],
            1: ["depends on unknown stage 'numbrs'; did you mean 'numbers'?"],
            2: ["duplicate stage name 'numbers' (stage 1 has it too)"],
            3: ["dependency cycle a -> b -> a"],
            4: ["dependency cycle a -> b -> a"],
        }
        for i, row in enumerate(rows):
            for fragment in expected_rows[i]:
                assert fragment in row.error_w.value.replace("&#x27;", "'").replace("&gt;", ">"), (
                    i,
                    row.error_w.value,
                )
            assert "fnb-invalid" in row._dom_classes
        assert "dependency cycle" in mapper.errors["a"] and "dependency cycle" in mapper.errors["b"]
        assert "depends on unknown stage 'numbrs'" in mapper.errors["square"]
        # what code asking for the workflow gets: the loader's error, every problem listed
        with pytest.raises(fnb.ConfigError) as info:
            _ = mapper.workflow
        assert [p.message for p in info.value.problems] == [p.message for p in workflow_problems(SEVERAL)]
        # fixing one row clears that row only
        mapper.set_stage("square", depends_on=["numbers"])
        assert "square" not in mapper.errors and "fnb-valid" in mapper.stages["square"]._dom_classes
        assert "fnb-invalid" in rows[0]._dom_classes
    finally:
        mapper.close()


# --- mapper and loader agree on the bad-input corpus's workflows ----------------------------------

# workflow cases the mapper's editor cannot hold as written (it reads a text box, a list, a checkbox)
NOT_IN_MAPPER = {
    "workflow_alias_bomb": "YAML-level",
    "workflow_deep_nesting": "YAML-level",
    "workflow_duplicate_key": "YAML-level",
    "workflow_malformed_yaml": "YAML-level",
    "workflow_tab_indent": "YAML-level",
    "workflow_is_executor_config": "not a workflow",
    "workflow_kind_config": "not a workflow",
    "workflow_top_key_near_miss": "document keys",
    "workflow_spec_key_near_miss": "document keys",
    "workflow_stages_mapping": "document keys",
    "workflow_depends_on_string": "the editor keeps a list",
    "workflow_target_number": "the editor keeps text",
    "workflow_map_on_not_a_name": "map_on is a text box",
    "workflow_partial_failure_not_bool": "a checkbox",
    "workflow_name_trailing_newline": "the name box is stripped",
    "workflow_stage_name_trailing_newline": "the name box is stripped",
}


def _workflow_cases() -> list:
    cases = []
    for path in sorted(CASES_DIR.glob("workflow_*.yaml")):
        case = yaml.safe_load(path.read_text())
        if case["kind"] == "workflow" and path.stem not in NOT_IN_MAPPER:
            cases.append(pytest.param(case["input"], id=path.stem))
    return cases


def _as_data(problems) -> list:
    return [(p.index, p.stage, p.key, p.message, p.hint, p.positions) for p in problems]


@pytest.mark.parametrize("text", _workflow_cases())
def test_mapper_and_loader_agree(text):
    loader = workflow_problems(text, namespace={})
    assert loader, "a bad-input case must have a problem"
    with pytest.raises(fnb.ConfigError) as info:
        fnb.load_workflow(text)
    assert info.value.problems[0].message == loader[0].message  # the loader raises what it finds
    mapper = widgets.StageMapper(namespace={})
    try:
        _fill(mapper, yaml.safe_load(text))
        assert _as_data(mapper.problems) == _as_data(loader)
        for problem in loader:
            for i in problem.positions:
                assert "fnb-invalid" in mapper._rows[i]._dom_classes
    finally:
        mapper.close()


def test_corpus_cases_left_out_of_the_comparison_exist():
    stems = {p.stem for p in CASES_DIR.glob("workflow_*.yaml")}
    assert set(NOT_IN_MAPPER) <= stems and len(_workflow_cases()) >= 12


def test_a_long_chain_is_checked_without_recursion():
    """Stages listed from the first dependent to the root: a depth-first search as deep as the
    chain (3,000 stages) must not hit Python's recursion limit; a cycle through all is one problem."""
    n = 3000
    stages = [
        {"name": f"s{i}", "target": "stages.numbers", "depends_on": [f"s{i + 1}"] if i < n - 1 else []}
        for i in range(n)
    ]
    document = {"kind": "workflow", "metadata": {"name": "chain"}, "spec": {"stages": stages}}
    assert len(fnb.load_workflow(document).stages) == n
    stages[-1]["depends_on"] = ["s0"]
    problems = workflow_problems(document)
    assert len(problems) == 1 and problems[0].message.startswith("dependency cycle s0 -> s1 -> s2 ")
    assert problems[0].message.endswith("s2999 -> s0") and len(problems[0].positions) == n
