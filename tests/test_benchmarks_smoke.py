"""The benchmark script runs end to end at its tiny size, so it can't rot.

It asserts only that the run completes and writes its files: timings belong in benchmarks/,
never in an assertion."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)
def test_benchmark_runs_at_tiny_size(tmp_path):
    env = dict(os.environ)
    env.pop("RAY_TMPDIR", None)  # the script gives Ray its own temp dir and removes it
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--size", "tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"

    data = json.loads((tmp_path / "bench-tiny.json").read_text())
    rows = data["rows"]
    sections = {r["section"] for r in rows}
    assert sections == {"overhead", "throughput", "dag", "data", "startup", "watching", "perrun"}
    assert {r["backend"] for r in rows} == {"threads", "processes", "dask", "ray"}
    assert not data["meta"]["failures"]
    assert not data["meta"]["leftovers"], "the benchmark left processes running"
    for row in rows:
        # a time is never 0; memory above the start can be (the run reused pages the process had)
        measured = row["flowdapt_nb"] >= 0 if row["unit"] == "MB" else row["flowdapt_nb"] > 0
        assert measured and row["baseline"] >= 0, row

    with (tmp_path / "bench-tiny.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    table = (tmp_path / "bench-tiny.md").read_text()
    assert table.count("\n| ") == len(rows) + 1  # header + one line per row
    assert "| section |" in proc.stdout or "section" in proc.stdout
