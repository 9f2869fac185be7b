"""Convenience entry points."""

from __future__ import annotations


def run_workflow(
    workflow,
    input: dict | None = None,
    executor=None,
    namespace: str = "default",
    timeout: float | None = None,
):
    """Run ``workflow`` (a Workflow, YAML text, path or dict) and return its WorkflowRun.

    With ``executor=None`` a local thread pool is started for this run and closed after it.

    >>> import flowdapt_nb as fnb
    >>> wf = fnb.Workflow("w", stages=[fnb.Stage("a", lambda x: x * 2)])
    >>> fnb.run_workflow(wf, input={"x": 21}).result
    42
    """
    if executor is not None:
        return executor.run(workflow, input=input, namespace=namespace, timeout=timeout)
    from .executors.local import LocalExecutor

    with LocalExecutor(use_processes=False) as ex:
        return ex.run(workflow, input=input, namespace=namespace, timeout=timeout)
