"""`flowdapt-nb run` and `flowdapt-nb validate`: the same YAML, headless."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "flowdapt_nb.cli"]

STAGES = """\
def numbers(n=3):
    return list(range(n))

def square(x):
    return x * x

def total(xs):
    return sum(xs)

def explode(xs):
    raise ValueError("the total exploded")
"""

WORKFLOW = """\
kind: workflow
metadata: {name: squares}
spec:
  stages:
    - name: numbers
      target: clistages.numbers
    - name: square
      target: clistages.square
      type: parameterized
      depends_on: [numbers]
    - name: total
      target: clistages.%s
      depends_on: [square]
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "clistages.py").write_text(STAGES)
    (tmp_path / "wf.yaml").write_text(WORKFLOW % "total")
    (tmp_path / "bad_wf.yaml").write_text(WORKFLOW % "explode")
    (tmp_path / "threads.yaml").write_text("target: local\nuse_processes: false\ncpus: 2\n")
    (tmp_path / "flowdapt.yaml").write_text(
        "services:\n  compute:\n    executor:\n      target: flowdapt.compute.executor.local.LocalExecutor\n"
        "      cpus: 2\n"
    )
    return tmp_path


def cli(*args, cwd):
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_run_prints_json_result(project):
    out = cli("run", "wf.yaml", "--input", "n=4", cwd=project)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == 14


@pytest.mark.parametrize("config", ["threads.yaml", "flowdapt.yaml"])
def test_run_with_config(project, config):
    out = cli("run", "wf.yaml", "--config", config, "--input-json", '{"n": 5}', cwd=project)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == 30


def test_run_failure_exits_non_zero_naming_stage_and_error(project):
    out = cli("run", "bad_wf.yaml", "--config", "threads.yaml", cwd=project)
    assert out.returncode == 1
    assert "stage 'total'" in out.stderr and "ValueError: the total exploded" in out.stderr
    assert out.stdout == ""


def test_run_bad_input_and_missing_files(project):
    out = cli("run", "wf.yaml", "--input", "no_equals_sign", cwd=project)
    assert out.returncode == 2 and "--input takes key=value" in out.stderr
    out = cli("run", "missing.yaml", cwd=project)
    assert out.returncode == 2 and "not found" in out.stderr
    out = cli("run", "wf.yaml", "--config", "nope.yaml", cwd=project)
    assert out.returncode == 2 and "not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_validate(project):
    (project / "typo.yaml").write_text("target: dask\nthread: 2\n")
    ok = cli("validate", "wf.yaml", "threads.yaml", "flowdapt.yaml", cwd=project)
    assert ok.returncode == 0 and ok.stdout.count(": ok") == 3
    bad = cli("validate", "wf.yaml", "typo.yaml", cwd=project)
    assert bad.returncode == 1
    assert "typo.yaml: line 2: unknown key 'thread'; did you mean 'threads'?" in bad.stderr


def test_entry_point_is_installed():
    exe = Path(sys.executable).parent / "flowdapt-nb"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "run" in out.stdout and "validate" in out.stdout
