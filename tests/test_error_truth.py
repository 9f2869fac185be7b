"""Errors that tell the truth (issue 14 points 10 and 11): an exception that can't travel keeps
its type, message and traceback on every executor; a result that can't travel fails the stage
that returned it."""

import pickle
import threading

import cloudpickle
import pytest

import flowdapt_nb as fnb
from flowdapt_nb import Stage, Workflow
from flowdapt_nb.errors import RemoteError, UnserializableResultError

pytestmark = pytest.mark.timeout(300)


class HoldsLock(Exception):
    """Can't be pickled: it holds a lock."""

    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


class NeedsTwo(Exception):
    """Pickles, but can't be unpickled: its __init__ wants two arguments, args holds one."""

    def __init__(self, what, epoch):
        super().__init__(f"{what} at epoch {epoch}")


def fit_model():
    raise HoldsLock("model diverged at epoch 7")


def fit_other():
    raise NeedsTwo("loss exploded", 3)


def make_lock():
    return threading.Lock()


def use(x):
    return repr(x)


def make_lambda():
    return lambda y: y + 1  # pickle can't, cloudpickle can: this result does travel


def call_it(f):
    return f(41)


def test_remote_error_round_trips_through_pickle_and_cloudpickle():
    err = RemoteError("mymod.HoldsLock", "model diverged", "Traceback (most recent call last): ...")
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        back = loads(dumps(err))
        assert type(back) is RemoteError
        assert (back.type_name, back.message, back.remote_traceback) == (
            "mymod.HoldsLock",
            "model diverged",
            "Traceback (most recent call last): ...",
        )
        assert str(back) == "mymod.HoldsLock: model diverged"
    back = pickle.loads(pickle.dumps(UnserializableResultError("lock", "TypeError: cannot pickle")))
    assert back.type_name == "lock" and "can't be serialized" in str(back)


@pytest.mark.parametrize(
    "stage_fn, type_name, message",
    [
        (fit_model, "HoldsLock", "model diverged at epoch 7"),
        (fit_other, "NeedsTwo", "loss exploded at epoch 3"),
    ],
)
def test_an_exception_that_cant_travel_keeps_type_message_and_traceback(
    executor, stage_fn, type_name, message
):
    with pytest.raises(fnb.StageError) as err:
        executor.run(Workflow("w", stages=[Stage("fit", stage_fn)]))
    first = str(err.value).splitlines()[0]
    assert first.startswith("stage 'fit' failed: ") and f"{type_name}: {message}" in first, first
    assert "RemoteError" not in first and "__init__()" not in str(err.value)
    cause = err.value.__cause__
    assert stage_fn.__name__ in cause.remote_traceback and "Traceback from the worker" in str(err.value)
    if executor.kind == "local" and not executor.config.use_processes:  # nothing was pickled:
        assert type(cause).__name__ == type_name and str(cause) == message  # the stage's own object
    else:
        assert isinstance(cause, RemoteError) and cause.type_name.endswith(type_name)
        assert cause.message == message
    assert executor.history[-1].state == "failed"


@pytest.mark.parametrize("two_stages", [False, True], ids=["terminal", "with-consumer"])
def test_dask_result_that_cant_be_serialized_fails_the_stage_that_returned_it(dask_executor, two_stages):
    stages = [Stage("make", make_lock)] + ([Stage("use", use, depends_on=["make"])] if two_stages else [])
    with pytest.raises(fnb.StageError) as err:
        dask_executor.run(Workflow("unpicklable", stages=stages))
    assert err.value.stage == "make"
    assert isinstance(err.value.__cause__, UnserializableResultError)
    first = str(err.value).splitlines()[0]
    assert "stage 'make' failed" in first and "lock" in first and "can't be serialized" in first, first
    assert dask_executor.history[-1].failed_stage == "make"


def test_dask_result_only_cloudpickle_can_serialize_still_travels(dask_executor):
    wf = Workflow("lam", stages=[Stage("make", make_lambda), Stage("call", call_it, depends_on=["make"])])
    assert dask_executor.run(wf).result == 42
    assert dask_executor.run(Workflow("lam1", stages=[Stage("make", make_lambda)])).result(1) == 2
