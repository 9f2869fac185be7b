"""Notebook widgets (ipywidgets 8), drawn from an executor's event stream; they compute nothing.

- ``ExecutorCard(executor)``: kind, state, address, dashboard link, workers, resources, Stop.
- ``StageMapper(namespace=None)``: map notebook functions onto stages, see the DAG, run, export.
- ``TaskDashboard(executor, run=None)``: per stage progress, throughput, ETA, recent and failed tasks.
- ``ResourceDashboard(executor, window=300)``: per worker CPU, memory, GPU, logical resources.
- ``Dashboard(executor)``: tasks and resources together, with the native Ray/Dask dashboard link.

Every widget updates from threads by assigning traits (throttled to ~10 redraws a second), has
``_repr_html_`` and a plain ``__repr__`` for nbconvert and terminals, and ``close()`` unsubscribes.
"""

from .card import ExecutorCard
from .dashboard import Dashboard
from .mapper import StageMapper
from .resources import ResourceDashboard
from .tasks import TaskDashboard

__all__ = ["ExecutorCard", "StageMapper", "ResourceDashboard", "TaskDashboard", "Dashboard"]
