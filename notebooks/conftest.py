"""Notebook tests (nbval) keep what the tutorials record out of the user's data dir: runs and
artifacts go to temp folders (tests/conftest.py does the same for the test files)."""

import os
import tempfile

os.environ.setdefault("FLOWDAPT_NB_RUNS", os.path.join(tempfile.mkdtemp(prefix="fnb-nb-runs-"), "runs.sqlite"))
os.environ.setdefault("FLOWDAPT_NB_ARTIFACTS", tempfile.mkdtemp(prefix="fnb-nb-artifacts-"))
