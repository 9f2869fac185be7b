"""Stage functions for the stage-cache tests: each call that really runs appends its name to the
file named by the run input's 'marker', so a test can tell a reused output from a fresh one."""

import time

import flowdapt_nb as fnb


def _mark(name):
    path = fnb.get_run_context().input.get("marker")
    if path:
        with open(path, "a") as fh:
            fh.write(name + "\n")


def numbers(n=4):
    _mark("numbers")
    return list(range(n))


def numbers_shifted(n=4):
    _mark("numbers")
    return list(range(1, n + 1))


def score(x):
    _mark("score")
    return x * x


def score_edited(x):
    _mark("score")
    return x * x + 1


def total(xs):
    _mark("total")
    return sum(xs)


def slow_total(xs):
    _mark("slow_total")
    time.sleep(1.0)
    return sum(xs)
