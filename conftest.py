"""Test session set-up for every test path (tests/ and the nbval-run notebooks/): runs and artifacts
the suite records go to temp folders, never the user's data dir. Kept at the root, not in notebooks/,
so that `from conftest import ...` in tests/ always finds tests/conftest.py (the last one imported)."""

import os
import shutil
import tempfile

_TEMP_DIRS = []


def _temp_dir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    _TEMP_DIRS.append(path)
    return path


if "FLOWDAPT_NB_RUNS" not in os.environ:
    os.environ["FLOWDAPT_NB_RUNS"] = os.path.join(_temp_dir("fnb-runs-"), "runs.sqlite")
if "FLOWDAPT_NB_ARTIFACTS" not in os.environ:
    os.environ["FLOWDAPT_NB_ARTIFACTS"] = _temp_dir("fnb-artifacts-")


def pytest_unconfigure(config):
    for path in _TEMP_DIRS:
        shutil.rmtree(path, ignore_errors=True)
