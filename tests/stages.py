"""Importable stage functions used by the behaviour tests (workers import them by path)."""

import os
import time

import flowdapt_nb as fnb


def numbers(n=5):
    return list(range(n))


def square(x):
    return x * x


def total(xs):
    return sum(xs)


def add(a, b):
    return a + b


def fail_on_three(x):
    if x == 3:
        raise ValueError(f"item {x} is bad")
    return x


def boom(*args):
    raise KeyError("boom happened")


def slow(x, delay=0.3):
    time.sleep(delay)
    return x


def env_value(name="FNB_TEST_ENV"):
    return os.environ.get(name)


def context_info():
    ctx = fnb.get_run_context()
    return {
        "namespace": ctx.namespace,
        "executor": ctx.executor,
        "run": str(ctx.run),
        "input": dict(ctx.input),
        "stage": ctx.stage,
        "workflow": ctx.definition["metadata"]["name"],
    }


def pid_then_sleep(path, delay=4.0):
    """Write this worker's pid to ``path``, then work for a while (a worker-death target)."""
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(delay)
    return os.getpid()


def fail_every_seventh(x):
    if x % 7 == 0:
        raise ValueError(f"item {x} is a multiple of 7")
    return x


def lock_on_five(x):
    """Item 5's result is a lock, which can't be pickled back from a worker process."""
    import threading

    return threading.Lock() if x == 5 else x


def nap(x, delay=0.001):
    time.sleep(delay)
    return x


def _refuse_to_load():
    raise RuntimeError("this result can't be loaded in the driver")


class _LoadsNowhere:
    """Pickles fine in a worker; unpickling it (in the driver) raises."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def unloadable_on_five(x):
    return _LoadsNowhere() if x == 5 else x


def started_at():
    return time.time()
