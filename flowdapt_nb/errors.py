"""Exceptions raised to users: one clear message naming what is wrong and what is valid."""

from __future__ import annotations


def attach_remote_traceback(exc: BaseException, text: str | None) -> None:
    """Keep a worker's formatted traceback on ``exc`` as ``exc.remote_traceback`` (read back with
    ``getattr(exc, "remote_traceback", None)``); exception types with ``__slots__`` refuse it."""
    try:
        exc.remote_traceback = text  # type: ignore[attr-defined]  # an attribute we add to any exception
    except Exception:  # exceptions with __slots__
        pass


class ConfigError(ValueError):
    """A bad executor config or workflow.

    The message names the key (or stage) and, when the input was YAML, its line.

    >>> raise ConfigError("unknown key 'cpu'", key="cpu", line=3, hint="did you mean 'cpus'?")
    Traceback (most recent call last):
    ...
    flowdapt_nb.errors.ConfigError: line 3: unknown key 'cpu'; did you mean 'cpus'?
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        line: int | None = None,
        stage: str | None = None,
        hint: str | None = None,
    ):
        self.key = key
        self.line = line
        self.stage = stage
        self.hint = hint
        self.message = message
        self.problems: list = []  # every problem when a workflow has several (workflow.Problem records)
        text = message
        if stage is not None and f"stage '{stage}'" not in message:
            text = f"stage '{stage}': {text}"
        if line is not None:
            text = f"line {line}: {text}"
        if hint:
            text = f"{text}; {hint}"
        super().__init__(text)


class StageError(RuntimeError):
    """A stage of a workflow run failed.

    ``.stage`` names the stage, ``.run`` is the :class:`WorkflowRun` (state ``failed``), and the
    original exception is chained as ``__cause__`` (with ``remote_traceback`` holding the worker's
    formatted traceback).
    """

    def __init__(self, stage: str, run, cause: BaseException | None = None, item: int | None = None):
        self.stage = stage
        self.run = run
        self.item = item
        where = f"stage '{stage}'" + (f" (item {item})" if item is not None else "")
        if cause is not None:
            # a RemoteError's text already starts with the original type's name
            detail = str(cause) if isinstance(cause, RemoteError) else f"{type(cause).__name__}: {cause}"
            tb = getattr(cause, "remote_traceback", None)
        else:
            detail, tb = "failed", None
        message = f"{where} failed: {detail}"
        if tb:
            message += "\n\nTraceback from the worker:\n" + tb.rstrip()
        super().__init__(message)


class RunTimeoutError(TimeoutError):
    """A workflow run exceeded its ``timeout`` (or a stage its ``options.timeout``)."""

    def __init__(self, message: str, run=None, stage: str | None = None):
        self.run = run
        self.stage = stage
        super().__init__(message)


class RemoteError(Exception):
    """Stands in for a worker exception that could not be pickled back to the driver (or must
    not be raised on a worker as it is: ``SystemExit``, ``KeyboardInterrupt``).

    Keeps the original type's name, its message and the worker's traceback text, and pickles
    itself with all three, so it crosses any number of process boundaries intact.

    >>> import pickle
    >>> err = pickle.loads(pickle.dumps(RemoteError("mod.Oops", "it broke", "Traceback ...")))
    >>> str(err), err.type_name, err.remote_traceback
    ('mod.Oops: it broke', 'mod.Oops', 'Traceback ...')
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str | None = None):
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__(f"{type_name}: {message}")

    @classmethod
    def standing_in_for(cls, exc: BaseException, tb_text: str | None = None) -> RemoteError:
        """A RemoteError for ``exc``: its qualified type name, message and traceback text."""
        name = type(exc).__qualname__
        module = type(exc).__module__
        if module not in (None, "builtins"):
            name = f"{module}.{name}"
        return cls(name, str(exc), tb_text if tb_text is not None else getattr(exc, "remote_traceback", None))

    def __reduce__(self):
        # Exception's default reduce passes self.args (one string) to __init__, which needs two
        return (type(self), (self.type_name, self.message, self.remote_traceback))


class UnserializableResultError(TypeError):
    """A stage returned a value that can't be serialized to leave its worker.

    Raised on the worker, so the task fails and the run's ``StageError`` names the stage that
    returned the value (not the stage that would have received it).
    """

    def __init__(self, type_name: str, detail: str):
        self.type_name = type_name
        self.detail = detail
        super().__init__(
            f"the stage's result ({type_name}) can't be serialized to leave its worker: {detail}"
        )

    def __reduce__(self):
        return (type(self), (self.type_name, self.detail))


class ClusterLostError(RuntimeError):
    """The executor lost its cluster (the Dask scheduler or Ray head went away) during a run."""


class ExecutorClosedError(RuntimeError):
    """The executor was closed while a run was going (``ex.close()``, ``%flowdapt stop`` from
    another thread), or a closed executor was asked to run: call ``ex.start()`` to use it again.
    ``.run`` is the :class:`WorkflowRun` (state ``cancelled``) when a run was closed under."""

    def __init__(self, message: str, run=None):
        self.run = run
        super().__init__(message)
