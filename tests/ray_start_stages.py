"""Stages for tests/test_ray_start.py. They import nothing of flowdapt_nb themselves, so the
flowdapt_nb modules a Ray worker holds are the ones the executor made it import."""

from __future__ import annotations

import os
import sys
import time


def held_until(path: str) -> list[str]:
    """Runs until ``path`` exists (the test creates it once it saw this task running); returns
    the flowdapt_nb modules this worker process has imported."""
    deadline = time.monotonic() + 300
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(m for m in sys.modules if m.startswith("flowdapt_nb"))


def read_memory(key: str):
    import flowdapt_nb as fnb

    return fnb.cluster_memory.get(key)
