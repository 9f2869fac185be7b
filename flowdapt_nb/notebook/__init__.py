"""The notebook layer: the ``%flowdapt`` magics (``flowdapt_nb.notebook.magics``) and their
progress display. Widgets live in ``flowdapt_nb.widgets``.

``%load_ext flowdapt_nb`` registers the magics; ``%flowdapt help`` lists what they do. The
magics push these names into the notebook's namespace (renamable through ``%config``):

- ``flowdapt_executor``: the executor started by ``%flowdapt executor`` / ``%%flowdapt executor``;
- ``flowdapt_run``: the WorkflowRun of the last ``%flowdapt run``;
- ``_flowdapt_run``: the RunHandle of the last ``%flowdapt run ... --background``.

Nothing here is imported by ``import flowdapt_nb``; IPython loads only with the extension.
"""

from __future__ import annotations

__all__ = ["FlowdaptMagics", "load_ipython_extension", "unload_ipython_extension"]


def __getattr__(name: str):
    if name in __all__:
        from . import magics

        return getattr(magics, name)
    raise AttributeError(f"module 'flowdapt_nb.notebook' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    from .magics import unload_ipython_extension as unload

    unload(ipython)
