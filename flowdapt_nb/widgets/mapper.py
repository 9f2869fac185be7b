"""StageMapper: map notebook functions (or import paths) onto workflow stages, see the DAG drawn
as the mapping changes, validate as you go, then Run, Export YAML, or Load an existing workflow.

Everything the widget does is reachable from code too (``add_stage``, ``load``, ``workflow``,
``export_yaml``, ``run``), so a notebook can build a workflow with it and test it.

The widget is composed of parts with one job each: the row editor (``mapper_rows``), the function
picker with its proposed dependencies (``mapper_picker``), the DAG and state view
(``mapper_view``), the run controls (``mapper_run``) and the Export / Load panels
(``mapper_files``). This module wires them together and validates the mapping with the one
workflow validator (``workflow.validate_workflow``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ipywidgets as widgets
from traitlets import Dict, List, Unicode

from ..errors import ConfigError
from ..run_input import parse_run_input
from ..workflow import Problem, Workflow, load_workflow, problems_error, validate_workflow
from . import mapper_view as view
from ._common import FeedWidget, esc, style_widget
from ._stage_row import _ROW_CSS, _StageRow, _wrap_row
from .mapper_files import FilePanels
from .mapper_picker import FunctionPicker
from .mapper_rows import StageRows
from .mapper_run import RunControls


class StageMapper(FeedWidget):
    """Build a workflow from notebook functions, watch its DAG, run it, export it.

    >>> mapper = StageMapper()                                   # doctest: +SKIP
    >>> mapper.add_stage("numbers", "numbers")                   # doctest: +SKIP
    >>> mapper.add_stage("square", "square", type="parameterized", depends_on=["numbers"])  # doctest: +SKIP
    >>> mapper.workflow.to_yaml()                                # doctest: +SKIP
    >>> mapper.run(ex, input={"n": 10}).wait()                   # doctest: +SKIP

    "Add as stage" proposes the new stage's dependencies (see :meth:`propose_dependencies`); they
    are shown, and can be changed, under the function list before the stage is added.

    ``namespace`` is where function names resolve (None: the notebook's). Validation problems are
    shown on their stage and kept in ``errors`` ({stage: message}), ``workflow_error`` and
    ``problems`` (as data); they are raised (as ConfigError) only when code asks for ``workflow``,
    ``export_yaml`` or ``run``.
    Traits: ``name``, ``functions``, ``errors``, ``workflow_error``, ``stage_states``, ``yaml``,
    ``status``, ``run_state``, ``svg``.
    """

    name = Unicode("workflow")
    functions: List[str] = List()
    errors = Dict()
    workflow_error = Unicode("")
    stage_states = Dict()
    yaml = Unicode("")
    status = Unicode("")
    run_state = Unicode("")
    svg = Unicode("")

    def __init__(
        self, namespace: dict | None = None, *, executor=None, workflow=None, name: str = "workflow", **kwargs
    ):
        super().__init__(**kwargs)
        self._ready = False  # edits made while the parts are built redraw nothing
        self._watched = None
        self._built: Workflow | None = None
        self._problems: list[Problem] = []
        self._runs = RunControls(executor)
        self._editor = StageRows(lambda: list(self.functions), self._target_text, self._changed)
        self._picker = FunctionPicker(namespace, self._stage_targets, lambda: self.input_w.value)
        self._view = view.MapperView()
        self._files = FilePanels()
        self.name = name
        self._expose_parts(name)
        self._lay_out()
        self._wire()
        self._ready = True
        self._hook_registered = False
        if namespace is None:
            self._register_hook()
        self.refresh_functions()
        if workflow is not None:
            self.load(workflow)
        else:
            self._changed()

    def _expose_parts(self, name: str) -> None:
        """The parts' widgets under the names notebooks and tests use (``mapper.run_w``, ...)."""
        self.name_w = widgets.Text(
            value=name,
            description="workflow",
            continuous_update=False,
            style={"description_width": "62px"},
            layout=widgets.Layout(width="230px"),
        )
        self.add_w = widgets.Button(
            description="Add stage", icon="plus", layout=widgets.Layout(width="110px")
        )
        self.export_w = widgets.Button(
            description="Export YAML", icon="download", layout=widgets.Layout(width="125px")
        )
        self.load_w = widgets.Button(description="Load…", icon="upload", layout=widgets.Layout(width="90px"))
        self.run_w, self.input_w = self._runs.run_w, self._runs.input_w
        self.rows_box = self._editor.box
        self.status_w, self.dag_w, self.empty_w = self._view.status_w, self._view.dag_w, self._view.empty_w
        picker = self._picker
        self.functions_w, self.add_fn_w, self.refresh_w = (
            picker.functions_w,
            picker.add_fn_w,
            picker.refresh_w,
        )
        self.new_deps_w, self.new_dep_add_w = picker.new_deps_w, picker.new_dep_add_w
        self.proposal_w, self.help_w = picker.proposal_w, picker.help_w
        files = self._files
        self.yaml_w, self.save_path_w, self.save_w = files.yaml_w, files.save_path_w, files.save_w
        self.export_box, self.load_box = files.export_box, files.load_box
        self.load_pick_w, self.load_text_w, self.load_go_w = (
            files.load_pick_w,
            files.load_text_w,
            files.load_go_w,
        )

    def _lay_out(self) -> None:
        side = widgets.VBox(
            [widgets.HTML('<div class="fnb fnb-sub">DAG</div>'), self.dag_w, *self._picker.children],
            layout=widgets.Layout(flex="2 1 0%", min_width="260px"),
        )
        side.add_class("fnb-mapper-side")
        self.children = [
            style_widget(),
            widgets.HTML(_ROW_CSS, layout=widgets.Layout(display="none")),
            widgets.HTML(
                '<div class="fnb"><div class="fnb-head" style="margin:0"><span class="fnb-title">'
                'Stage mapper</span><span class="fnb-muted">functions → stages → workflow</span>'
                "</div></div>"
            ),
            _wrap_row([self.name_w, self.add_w, self.run_w, self.export_w, self.load_w, self.input_w]),
            self.status_w,
            widgets.HBox(
                [widgets.VBox([self.empty_w, self.rows_box], layout=widgets.Layout(flex="3 1 0%")), side],
                layout=widgets.Layout(width="100%", align_items="flex-start"),
            ),
            self.export_box,
            self.load_box,
        ]
        self.add_class("fnb-stage-mapper")
        self.add_class("fnb-box")

    def _wire(self) -> None:
        self.name_w.observe(self._on_name, names="value")
        self.observe(self._on_name_trait, names="name")
        self.add_w.on_click(lambda _: self._ui(self._add_from_ui, None))
        self.add_fn_w.on_click(lambda _: self._ui(self._add_from_ui, self.functions_w.value))
        self.refresh_w.on_click(lambda _: self.refresh_functions())
        self.functions_w.observe(lambda _: self._picker.propose(), names="value")
        self.input_w.observe(lambda _: self._picker.propose(), names="value")
        self.run_w.on_click(lambda _: self._ui(self._run_from_ui))
        self.export_w.on_click(lambda _: self._ui(self._export_from_ui))
        self.save_w.on_click(lambda _: self._ui(lambda: self.export_yaml(self._files.save_path())))
        self.load_w.on_click(lambda _: self._ui(lambda: self._files.toggle_load(self._ns())))
        self.load_go_w.on_click(lambda _: self._ui(self._load_from_ui))

    # --- the parts' state, under the names code has used ---
    @property
    def executor(self):
        return self._runs.executor

    @executor.setter
    def executor(self, value) -> None:
        self._runs.executor = value

    @property
    def _own_executor(self):
        return self._runs.own_executor

    @property
    def _handle(self):
        return self._runs.handle

    @property
    def _rows(self) -> list[_StageRow]:
        return self._editor.rows

    # --- the namespace ---
    def _ns(self) -> dict:
        return self._picker.ns()

    def refresh_functions(self, *_) -> list[str]:
        """Look for functions in the namespace again (done after every notebook cell)."""
        if self._picker.refresh():
            self.functions = list(self._picker.names)
            for row in self._rows:
                row.target_w.options = self._picker.names
        return list(self.functions)

    def _target_text(self, target) -> str:
        text, kept = self._picker.target_text(target)
        if kept:
            self.refresh_functions()
        return text

    def _stage_targets(self) -> list[tuple[str, str]]:
        return [(row.name, row.target_w.value) for row in self._rows]

    def _register_hook(self) -> None:
        try:
            from IPython import get_ipython
        except ImportError:  # pragma: no cover
            return
        ip = get_ipython()
        if ip is not None and hasattr(ip, "events"):
            ip.events.register("post_run_cell", self._post_run_cell)
            self._hook_registered = True

    def _post_run_cell(self, *_):
        if not self._closed:
            self.refresh_functions()
            self._changed()

    # --- stages from code ---
    def stage_names(self) -> list[str]:
        return self._editor.stage_names()

    @property
    def stages(self) -> dict[str, _StageRow]:
        """The stage editors by name (``mapper.stages['square'].deps_w.value = [...]``)."""
        return self._editor.by_name()

    def add_stage(
        self,
        name: str | None = None,
        target: Any = None,
        *,
        type: str = "simple",
        depends_on=None,
        map_on: str | None = None,
        resources=None,
        options: dict | None = None,
        allow_partial_failure: bool | None = None,
        **extra,
    ) -> _StageRow:
        """Add a stage. ``target`` is a function's name, an import path, or a callable.
        Problems are shown on the stage (and in ``errors``), never raised."""
        return self._editor.add(
            name,
            target,
            type=type,
            depends_on=depends_on,
            map_on=map_on,
            resources=resources,
            options=options,
            allow_partial_failure=allow_partial_failure,
            extra=extra,
        )

    def set_stage(self, name: str, **fields) -> _StageRow:
        """Change a stage's fields (name, target, type, depends_on, map_on, resources,
        allow_partial_failure) as if edited in the widget."""
        return self._editor.set(name, **fields)

    def remove_stage(self, stage) -> None:
        """Remove a stage (by name or its editor); stages depending on it show the error."""
        self._editor.remove_stage(stage)

    def clear(self) -> None:
        self._editor.clear()

    def load(self, workflow) -> Workflow:
        """Load an existing workflow (a Workflow, YAML text, a path, or a dict) into the mapper."""
        wf = load_workflow(workflow)
        with self._editor.held():
            self.clear()
            self.name_w.value = wf.name
            for s in wf.stages:
                extra = {k: getattr(s, k) for k in ("description", "version", "priority")}
                self.add_stage(
                    s.name,
                    s.target,
                    type=s.type,
                    depends_on=list(s.depends_on),
                    resources=dict(s.resources),
                    options=dict(s.options),
                    **extra,
                )
        self._runs.reset()
        self._changed()
        return wf

    # --- building and validating ---
    def _on_name(self, change) -> None:
        self.name = change["new"].strip()
        self._changed()

    def _on_name_trait(self, change) -> None:  # ``mapper.name = ...`` from code
        if self.name_w.value.strip() != change["new"]:
            self.name_w.value = change["new"]

    def _changed(self) -> None:
        if not self._ready or self._editor.holding:
            return
        with self._draw_lock:
            self._editor.sync_choices()
            self._picker.propose()
            # A finished run's status goes only when the stages really changed: a notebook cell
            # that edits nothing (every cell triggers this) must not grey out the last run.
            if self._runs.stale(self._editor.mapped()):
                self._runs.reset()
            self._validate()
            self._redraw()

    def _validate(self) -> dict:
        """Check the mapping with the one workflow validator (as ``load_workflow`` does, plus
        each target resolved in the namespace) and show each problem on its row."""
        ns = self._ns()
        specs = self._editor.specs(ns)
        document = {
            "kind": "workflow",
            "metadata": {"name": self.name},
            "spec": {"stages": [spec for spec, _ in specs]},
        }
        built, problems = validate_workflow(document, namespace=ns)
        problems = [p for _, p in specs if p is not None] + problems
        self._problems = problems
        self.errors = self._editor.show(problems)
        self.workflow_error = "; ".join(p.text for p in problems if not p.positions)
        self._built = built if not problems else None
        self.yaml = self._built.to_yaml() if self._built is not None else ""
        return self.errors

    def validate(self) -> dict:
        """Check the mapping now; returns ``errors`` ({stage: message}), also shown on the stages."""
        with self._draw_lock:
            return self._validate()

    @property
    def problems(self) -> list[Problem]:
        """Every problem of the mapping as data (``workflow.Problem``: stage, key, message, hint,
        the rows it concerns), as ``load_workflow`` finds them, plus targets that do not resolve."""
        return list(self._problems)

    @property
    def valid(self) -> bool:
        return self._built is not None

    @property
    def workflow(self) -> Workflow:
        """The workflow as mapped (a ``fnb.Workflow``); ConfigError if the mapping has problems."""
        with self._draw_lock:
            self._validate()
            if self._built is None:
                raise problems_error(self._problems)  # every problem, as load_workflow raises them
            return self._built

    def export_yaml(self, path: str | Path | None = None) -> str:
        """The workflow resource as YAML (``load_workflow`` and Flowdapt read it); written to
        ``path`` when given."""
        text = self.workflow.to_yaml()
        self._files.show_yaml(text, path)
        if path is not None:
            self._say(f"saved {esc(path)}", ok=True)
        return text

    # --- running ---
    def run(self, executor=None, input: dict | None = None, namespace: str | None = None):
        """Submit the workflow as mapped and return its RunHandle at once; the DAG shows the
        stages' states as it runs (``handle.wait()`` blocks until it ends)."""
        self._clear_run()
        wf = self.workflow
        ex = self._runs.executor_for(executor)
        with self._draw_lock:
            self._watch(ex)
            handle = self._runs.start(ex, wf, input, namespace, self._editor.mapped())
            self._redraw()
        return handle

    def _watch(self, ex) -> None:
        if self._watched is ex:
            return
        self._unsubscribe_all()
        self._subscribe(ex, kinds=("task", "run"))
        self._watched = ex

    def _on_events(self, batch: list) -> None:
        if self._runs.apply(batch):
            self._redraw()

    def _clear_run(self) -> None:
        """Forget a finished run's status (its state, result or error) before a new attempt."""
        if self._runs.finished:
            self._runs.reset()
            self._redraw()

    # --- drawing ---
    def _redraw(self) -> None:
        states, run_state = self._runs.states()
        self._editor.set_states(states)
        self.svg = view.stages_svg(self._rows, states, self.errors)
        self._view.draw(self.svg, self._status_html(), bool(self._rows))
        self._runs.draw_button()
        # the traits last: whoever watches them (a test, a notebook) sees the page already drawn
        self.stage_states = states
        self.run_state = run_state

    def _status_html(self) -> str:
        valid = len(self._rows) if self._built is not None else None
        return view.status_html(self._runs.tracker, self.workflow_error, self.errors, valid, self.status)

    def _say(self, message_html: str, ok: bool = False) -> None:
        self.status = f'<span class="{"fnb-ok" if ok else "fnb-err"}">{message_html}</span>'
        self._view.show_status(self._status_html())

    # --- buttons ---
    def _ui(self, fn, *args) -> None:
        """Run a button's action; a mistake is shown in the status line, never raised."""
        self.status = ""
        try:
            fn(*args)
        except ConfigError as exc:
            self._say(esc(str(exc)))
        except Exception as exc:
            self._say(esc(f"{type(exc).__name__}: {exc}"))

    def _add_from_ui(self, target) -> None:
        if not target:  # "Add stage": a blank stage, a root until the user gives it dependencies
            self.add_stage(f"stage{len(self._rows) + 1}", None)
            return
        self.add_stage(None, target, depends_on=list(self.new_deps_w.value))

    def _run_from_ui(self) -> None:
        if self._runs.cancel():
            self._say("cancelling…", ok=True)
            return
        self._clear_run()  # one current status: the last run's line goes as soon as Run is pressed
        self.run(input=parse_run_input(self.input_w.value))

    def propose_dependencies(self, function) -> tuple[list[str], str]:
        """The dependencies "Add as stage" proposes for ``function`` (a name in the namespace or a
        callable), and why, in one line; the rule is :meth:`FunctionPicker.propose_dependencies`'s
        (also the widget's help text)."""
        return self._picker.propose_dependencies(function)

    def _export_from_ui(self) -> None:
        if self._files.hide_export():
            return
        self.export_yaml()
        if not self.save_path_w.value:
            self.save_path_w.value = f"{self.name}.yaml"

    def _load_from_ui(self) -> None:
        wf = self.load(self._files.picked(self._ns()))
        self.load_box.layout.display = "none"
        self._say(f"loaded {esc(wf.name)}: {len(wf.stages)} stages", ok=True)

    # --- lifecycle and views ---
    def close(self) -> None:
        if self._hook_registered:
            try:
                from IPython import get_ipython

                get_ipython().events.unregister("post_run_cell", self._post_run_cell)
            except Exception:
                pass
            self._hook_registered = False
        for row in self._rows:
            row.close()
        super().close()
        self._runs.close()

    def _static_html(self) -> str:
        svg = view.stages_svg(self._rows, self.stage_states, self.errors)
        return view.static_html(self.name, self._rows, self.errors, self.workflow_error, svg)

    def __repr__(self) -> str:
        return view.text(
            self.name, self._rows, self.errors, self.workflow_error, self.stage_states, self.run_state
        )
