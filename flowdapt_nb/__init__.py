"""flowdapt_nb: Flowdapt's executors (local, Dask, Ray) in Jupyter and scripts.

>>> import flowdapt_nb as fnb
>>> wf = fnb.Workflow("hello", stages=[fnb.Stage("greet", lambda: "hi")])
>>> fnb.run_workflow(wf).result
'hi'

Heavy libraries (Ray, Dask, IPython, pandas) load only when used.
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

if os.environ.get("FLOWDAPT_NB_STAGE_PREFIX") == "1":  # a process `flowdapt-nb run` started: see cli_streams
    from .cli_streams import install_stage_prefix as _install_stage_prefix

    _install_stage_prefix()

_EXPORTS = {
    "ConfigError": "flowdapt_nb.errors",
    "StageError": "flowdapt_nb.errors",
    "RunTimeoutError": "flowdapt_nb.errors",
    "ExecutorClosedError": "flowdapt_nb.errors",
    "executor_from_config": "flowdapt_nb.config",
    "load_workflow": "flowdapt_nb.workflow",
    "Workflow": "flowdapt_nb.workflow",
    "Stage": "flowdapt_nb.workflow",
    "WorkflowRun": "flowdapt_nb.run",
    "RunHandle": "flowdapt_nb.run",
    "get_run_context": "flowdapt_nb.context",
    "RunContext": "flowdapt_nb.context",
    "Executor": "flowdapt_nb.executors.base",
    "current_executor": "flowdapt_nb.executors.base",
    "LocalExecutor": "flowdapt_nb.executors.local",
    "DaskExecutor": "flowdapt_nb.executors.dask",
    "RayExecutor": "flowdapt_nb.executors.ray",
    "run_workflow": "flowdapt_nb.api",
    "runs": "flowdapt_nb.run_history",
    "load_run": "flowdapt_nb.run_history",
}
_MODULES = {"cluster_memory", "object_store", "widgets"}

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(f"flowdapt_nb.{name}")
    else:
        raise AttributeError(f"module 'flowdapt_nb' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__


def load_ipython_extension(ipython) -> None:
    """``%load_ext flowdapt_nb`` registers the ``%flowdapt`` magics."""
    from .notebook.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    from .notebook.magics import unload_ipython_extension as unload

    unload(ipython)
