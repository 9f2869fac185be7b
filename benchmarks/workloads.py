"""Stage functions the benchmarks run, identical for flowdapt_nb and the raw engines.

``run.py`` registers this module with cloudpickle by value, so process pools, Dask workers and Ray
workers receive the functions themselves and need not import ``benchmarks``.
"""

from __future__ import annotations

import hashlib
import time

# --- overhead: tiny items ---------------------------------------------------------------------


def inc(x):
    """A tiny task: what remains of its time is the engine's overhead."""
    return x + 1


# --- throughput: CPU-bound items --------------------------------------------------------------


def burn(x, rounds=1000):
    """Real CPU work that releases the GIL (OpenSSL PBKDF2), so a thread pool scales like a
    process pool; ``rounds`` is calibrated to ~20 ms on this machine."""
    hashlib.pbkdf2_hmac("sha256", b"flowdapt", x.to_bytes(8, "little"), rounds)
    return x


def calibrate_rounds(target_s: float, trials: int = 7) -> tuple[int, float]:
    """PBKDF2 rounds that take about ``target_s`` on one core here, and the measured seconds per
    call (the fastest of ``trials``: other load on the machine only ever adds time)."""

    def best(rounds, n):
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            burn(i, rounds)
            out.append(time.perf_counter() - t0)
        return min(out)

    rounds = 1000
    while best(rounds, 3) < 0.002:
        rounds *= 4
    rounds = max(1, int(rounds * target_s / best(rounds, trials)))
    return rounds, best(rounds, trials)


# --- the five-stage DAG: two branches, two fan-outs ----------------------------------------
#
#   source ──> left  (fan-out) ──> reduce ──┐
#        └───> right (fan-out) ─────────────┴──> combine
#


def source(n, rounds=1000):
    """The root: a list of n items, each carrying the work it asks for."""
    burn(0, rounds)
    return [(x, rounds) for x in range(n)]


def left(item):
    x, rounds = item
    burn(x, rounds)
    return x * 2


def right(item):
    x, rounds = item
    burn(x, rounds)
    return x * 3


def reduce_sum(values):
    return sum(values)


def combine(total, rights):
    return total + sum(rights)


def reduce_star(*values):  # Ray resolves top-level refs only: the raw Ray version passes them spread
    return sum(values)


def combine_star(total, *rights):
    return total + sum(rights)


def dag_expected(n: int) -> int:
    return sum(2 * x for x in range(n)) + sum(3 * x for x in range(n))


# --- data between stages ------------------------------------------------------------------


def make_array(mb=200):
    import numpy as np

    return np.ones(int(mb * 1e6) // 8, dtype=np.float64)


def scale(a):
    return a * 2.0


def total(a):
    return float(a.sum())


def call_pickled(fn_blob, *args):
    """The raw process-pool baseline: a cloudpickled function shipped with each call."""
    import cloudpickle

    return cloudpickle.loads(fn_blob)(*args)


def data_expected(mb: int) -> float:
    return 2.0 * (int(mb * 1e6) // 8)


# --- per run: a tiny four-stage DAG (source, fan-out, fan-in, one more) ----------------------


def tiny_source(n=4):
    return list(range(n))


def tiny_inc(x):
    return x + 1


def tiny_sum(values):
    return sum(values)


def tiny_double(total):
    return 2 * total


def tiny_expected(n: int = 4) -> int:
    return 2 * sum(x + 1 for x in range(n))
