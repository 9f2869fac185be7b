"""Workflow resources: loading, round-trips, and every check that runs before a run."""

import pytest

import flowdapt_nb as fnb

SQUARES = """\
kind: workflow
metadata: {name: squares}
spec:
  stages:
    - name: numbers
      target: stages.numbers
    - name: square
      target: stages.square
      type: parameterized
      depends_on: [numbers]
      options: {allow_partial_failure: true}
      resources: {cpus: 1, memory: 1GB}
    - name: total
      target: stages.total
      depends_on: [square]
"""


def test_load_and_round_trip(tmp_path):
    wf = fnb.load_workflow(SQUARES)
    assert wf.name == "squares" and wf.stage_names == ["numbers", "square", "total"]
    assert wf.stage("square").type == "parameterized"
    again = fnb.load_workflow(wf.to_yaml())
    assert again.to_dict() == wf.to_dict()
    assert fnb.load_workflow(wf.to_dict()).to_dict() == wf.to_dict()
    path = tmp_path / "wf.yaml"
    path.write_text(SQUARES)
    assert fnb.load_workflow(path).name == "squares"


def test_callable_targets_export_by_name():
    def prepare():
        return [1, 2]

    wf = fnb.Workflow("w", stages=[fnb.Stage("a", prepare), fnb.Stage("b", "stages.total", depends_on=["a"])])
    d = wf.to_dict()
    assert d["kind"] == "workflow" and d["spec"]["stages"][0]["target"] == "prepare"
    assert d["spec"]["stages"][1]["depends_on"] == ["a"]


def _stage_yaml(stages: str) -> str:
    return "kind: workflow\nmetadata: {name: bad}\nspec:\n  stages:\n" + stages


@pytest.mark.parametrize(
    "stages,needle,line",
    [
        (
            "    - name: a\n      target: stages.numbers\n      depends_on: b\n",
            "depends_on must be a list",
            7,
        ),
        ("    - name: a\n      target: stages.numbers\n      depends_on: [zz]\n", "unknown stage 'zz'", 7),
        (
            "    - name: a\n      target: stages.numbers\n    - name: a\n      target: stages.square\n",
            "duplicate stage name 'a'",
            7,
        ),
        (
            "    - name: a\n      target: stages.square\n      depends_on: [b]\n"
            "    - name: b\n      target: stages.square\n      depends_on: [a]\n",
            "cycle",
            7,
        ),
        ("    - name: a\n      target: stages.square\n      depends_on: [a]\n", "depends on itself", 7),
        ("    - name: 'a b'\n      target: stages.numbers\n", "not valid", 5),
        ("    - name: a\n      targt: stages.numbers\n", "did you mean 'target'", 6),
        ("    - name: a\n      target: stages.numbers\n      type: fanout\n", "simple or parameterized", 7),
        ("    - name: a\n      target: stages.square\n      type: parameterized\n", "map_on", 5),
        (
            "    - name: a\n      target: stages.numbers\n      options: {allow_partial_fail: true}\n",
            "did you mean 'allow_partial_failure'",
            7,
        ),
        ("    - name: a\n      target: stages.numbers\n      resources: {cpus: -1}\n", "non-negative", 7),
        ("    - name: a\n      target: stages.numbers\n      resources: {memory: lots}\n", "memory", 7),
    ],
)
def test_structural_errors_name_stage_and_line(stages, needle, line):
    with pytest.raises(fnb.ConfigError) as err:
        fnb.load_workflow(_stage_yaml(stages))
    assert needle in str(err.value)
    assert err.value.line == line, str(err.value)


def test_empty_stages_and_bad_name():
    with pytest.raises(fnb.ConfigError, match="no stages"):
        fnb.load_workflow("kind: workflow\nmetadata: {name: w}\nspec: {stages: []}\n")
    with pytest.raises(fnb.ConfigError, match="workflow name"):
        fnb.load_workflow(
            "kind: workflow\nmetadata: {name: 'w w'}\nspec: {stages: [{name: a, target: x.y}]}\n"
        )
    with pytest.raises(fnb.ConfigError, match="no stages"):
        fnb.Workflow("w", stages=[])


def test_target_errors_name_the_stage():
    wf = fnb.load_workflow(_stage_yaml("    - name: a\n      target: nosuchmodule.func\n"))
    with pytest.raises(fnb.ConfigError, match="stage 'a'.*does not import"):
        wf.resolve()
    wf = fnb.load_workflow(_stage_yaml("    - name: a\n      target: not_defined_anywhere\n"))
    with pytest.raises(fnb.ConfigError, match="stage 'a'.*neither a function defined in the notebook"):
        wf.resolve(namespace={})


def test_target_raising_on_import(tmp_path, monkeypatch):
    (tmp_path / "explodes_on_import.py").write_text("raise RuntimeError('import-time failure')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    wf = fnb.load_workflow(_stage_yaml("    - name: a\n      target: explodes_on_import.f\n"))
    with pytest.raises(fnb.ConfigError, match="stage 'a'.*RuntimeError: import-time failure"):
        wf.resolve()


def test_dependent_stage_with_no_arguments_is_rejected():
    def nothing():
        return 1

    wf = fnb.Workflow(
        "w", stages=[fnb.Stage("a", "stages.numbers"), fnb.Stage("b", nothing, depends_on=["a"])]
    )
    with pytest.raises(fnb.ConfigError, match="stage 'b'.*takes 0 positional"):
        wf.resolve()


def test_notebook_namespace_lookup():
    def make():
        return 3

    wf = fnb.load_workflow(_stage_yaml("    - name: a\n      target: make\n"))
    assert wf.resolve(namespace={"make": make})["a"] is make
