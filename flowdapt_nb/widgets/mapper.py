"""StageMapper: map notebook functions (or import paths) onto workflow stages, see the DAG drawn
as the mapping changes, validate as you go, then Run, Export YAML, or Load an existing workflow.

Everything the widget does is reachable from code too (``add_stage``, ``load``, ``workflow``,
``export_yaml``, ``run``), so a notebook can build a workflow with it and test it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ipywidgets as widgets
import yaml
from traitlets import Dict, List, Unicode

from ..dag import dag_svg
from ..errors import ConfigError
from ..run_input import parse_run_input
from ..workflow import (
    Problem,
    Stage,
    Workflow,
    load_workflow,
    problems_error,
    user_namespace,
    validate_workflow,
)
from ._common import FeedWidget, badge, esc, fmt_duration, html_widget, style_widget
from ._stage_row import (
    _PLACEHOLDER_INPUT,
    _ROW_CSS,
    _internal,
    _shell_hidden,
    _signature,
    _StageRow,
    _wrap_row,
    dependency_adder,
    format_resources,
    parse_resources,
)
from ._tracker import RunTracker


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
    shown on their stage and kept in ``errors`` ({stage: message}) and ``workflow_error``; they are
    raised (as ConfigError) only when code asks for ``workflow``, ``export_yaml`` or ``run``.
    Traits: ``name``, ``functions``, ``errors``, ``workflow_error``, ``stage_states``, ``yaml``,
    ``status``, ``run_state``, ``svg``.
    """

    name = Unicode("workflow")
    functions = List()
    errors = Dict()
    workflow_error = Unicode("")
    stage_states = Dict()
    yaml = Unicode("")
    status = Unicode("")
    run_state = Unicode("")
    svg = Unicode("")

    def __init__(self, namespace: dict | None = None, *, executor=None, workflow=None, name: str = "workflow",
                 **kwargs):
        super().__init__(**kwargs)
        self._namespace = namespace
        self._callables: dict[str, Callable] = {}
        self.executor = executor
        self._own_executor = None
        self._watched = None
        self._tracker: RunTracker | None = None
        self._run_mapped: list | None = None  # the stages as they were when the last run started
        self._handle = None
        self._rows: list[_StageRow] = []
        self._hold = 0
        self._built: Workflow | None = None
        self._problems: list[Problem] = []
        self.name = name

        # --- toolbar ---
        self.name_w = widgets.Text(value=name, description="workflow", continuous_update=False,
                                   style={"description_width": "62px"}, layout=widgets.Layout(width="230px"))
        self.add_w = widgets.Button(description="Add stage", icon="plus", layout=widgets.Layout(width="110px"))
        self.run_w = widgets.Button(description="Run", icon="play", button_style="success",
                                    layout=widgets.Layout(width="90px"))
        self.export_w = widgets.Button(description="Export YAML", icon="download", layout=widgets.Layout(width="125px"))
        self.load_w = widgets.Button(description="Load…", icon="upload", layout=widgets.Layout(width="90px"))
        self.input_w = widgets.Text(placeholder=_PLACEHOLDER_INPUT, continuous_update=False,
                                    layout=widgets.Layout(flex="1 1 160px", width="auto"))
        self.status_w = html_widget()
        # --- stages and DAG ---
        self.rows_box = widgets.VBox(layout=widgets.Layout(flex="3 1 0%", min_width="520px"))
        self.empty_w = widgets.HTML('<div class="fnb fnb-empty">No stages yet: pick a function on the right '
                                    'and press “Add as stage”, or Load a workflow.</div>')
        self.dag_w = widgets.HTML(layout=widgets.Layout(width="100%"))
        self.functions_w = widgets.Select(options=[], rows=7, layout=widgets.Layout(width="auto"))
        self.add_fn_w = widgets.Button(description="Add as stage", icon="plus-circle",
                                       layout=widgets.Layout(width="130px"))
        self.refresh_w = widgets.Button(icon="refresh", tooltip="look for new notebook functions",
                                        layout=widgets.Layout(width="36px"))
        # the new stage's dependencies, proposed from the function's signature and editable
        self.new_deps_w = widgets.TagsInput(value=[], allowed_tags=[], allow_duplicates=False,
                                            placeholder="none: a root",
                                            layout=widgets.Layout(flex="1 1 120px", width="auto", min_width="0"))
        self.new_dep_add_w = dependency_adder(self.new_deps_w)
        self.proposal_w = widgets.HTML()
        self.proposal_w.add_class("fnb-proposal")
        self.help_w = widgets.HTML(_HELP)
        self._proposed_key = None
        side = widgets.VBox([
            widgets.HTML('<div class="fnb fnb-sub">DAG</div>'), self.dag_w,
            widgets.HTML('<div class="fnb fnb-sub">Notebook functions</div>'), self.functions_w,
            _wrap_row([widgets.HTML('<span class="fnb fnb-muted">depends on</span>',
                                    layout=widgets.Layout(width="76px", flex="0 0 76px")),
                       self.new_deps_w, self.new_dep_add_w]),
            self.proposal_w,
            widgets.HBox([self.add_fn_w, self.refresh_w]), self.help_w],
            layout=widgets.Layout(flex="2 1 0%", min_width="260px"))
        side.add_class("fnb-mapper-side")
        # --- export / load panels ---
        self.yaml_w = widgets.Textarea(layout=widgets.Layout(width="100%", height="180px"))
        self.save_path_w = widgets.Text(placeholder="file name, e.g. workflow.yaml", continuous_update=False,
                                        layout=widgets.Layout(width="280px"))
        self.save_w = widgets.Button(description="Save", icon="save", layout=widgets.Layout(width="80px"))
        self.export_box = widgets.VBox([widgets.HTML('<div class="fnb fnb-sub">Workflow YAML</div>'), self.yaml_w,
                                        widgets.HBox([self.save_path_w, self.save_w])],
                                       layout=widgets.Layout(display="none"))
        self.load_pick_w = widgets.Dropdown(description="from", options=[], style={"description_width": "40px"},
                                            layout=widgets.Layout(width="320px"))
        self.load_text_w = widgets.Textarea(placeholder="…or paste a workflow's YAML, or a path to one",
                                            layout=widgets.Layout(width="100%", height="120px"))
        self.load_go_w = widgets.Button(description="Load", icon="check", button_style="primary",
                                        layout=widgets.Layout(width="90px"))
        self.load_box = widgets.VBox([widgets.HTML('<div class="fnb fnb-sub">Load a workflow</div>'),
                                      self.load_pick_w, self.load_text_w, self.load_go_w],
                                     layout=widgets.Layout(display="none"))

        self.children = [
            style_widget(), widgets.HTML(_ROW_CSS, layout=widgets.Layout(display="none")),
            widgets.HTML('<div class="fnb"><div class="fnb-head" style="margin:0"><span class="fnb-title">'
                         'Stage mapper</span><span class="fnb-muted">functions → stages → workflow</span>'
                         '</div></div>'),
            _wrap_row([self.name_w, self.add_w, self.run_w, self.export_w, self.load_w, self.input_w]),
            self.status_w,
            widgets.HBox([widgets.VBox([self.empty_w, self.rows_box], layout=widgets.Layout(flex="3 1 0%")), side],
                         layout=widgets.Layout(width="100%", align_items="flex-start")),
            self.export_box, self.load_box]
        self.add_class("fnb-stage-mapper")
        self.add_class("fnb-box")

        self.name_w.observe(self._on_name, names="value")
        self.observe(self._on_name_trait, names="name")
        self.add_w.on_click(lambda _: self._ui(self._add_from_ui, None))
        self.add_fn_w.on_click(lambda _: self._ui(self._add_from_ui, self.functions_w.value))
        self.refresh_w.on_click(lambda _: self.refresh_functions())
        self.functions_w.observe(lambda _: self._propose(), names="value")
        self.input_w.observe(lambda _: self._propose(), names="value")
        self.run_w.on_click(lambda _: self._ui(self._run_from_ui))
        self.export_w.on_click(lambda _: self._ui(self._export_from_ui))
        self.save_w.on_click(lambda _: self._ui(self._save_from_ui))
        self.load_w.on_click(lambda _: self._ui(self._toggle_load))
        self.load_go_w.on_click(lambda _: self._ui(self._load_from_ui))

        self._hook_registered = False
        if namespace is None:
            self._register_hook()
        self.refresh_functions()
        if workflow is not None:
            self.load(workflow)
        else:
            self._changed()

    # --- the namespace ---
    def _ns(self) -> dict:
        ns = dict(user_namespace() if self._namespace is None else self._namespace)
        ns.update(self._callables)
        return ns

    def refresh_functions(self, *_) -> list[str]:
        """Look for functions in the namespace again (done after every notebook cell)."""
        ns = self._ns()
        hidden = _shell_hidden() if self._namespace is None else {}
        names = sorted(k for k, v in ns.items() if not k.startswith("_") and hidden.get(k) is not v and
                       ((inspect.isfunction(v) and not _internal(v)) or k in self._callables))
        if names != list(self.functions):
            self.functions = names
            current = self.functions_w.value
            self.functions_w.options = [(_signature(ns[n]), n) for n in names]
            if current in names:
                self.functions_w.value = current
            for row in self._rows:
                row.target_w.options = names
        return names

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
        return [r.name for r in getattr(self, "_rows", [])]

    @property
    def stages(self) -> dict[str, _StageRow]:
        """The stage editors by name (``mapper.stages['square'].deps_w.value = [...]``)."""
        return {r.name: r for r in self._rows}

    def add_stage(self, name: str | None = None, target: Any = None, *, type: str = "simple",
                  depends_on=None, map_on: str | None = None, resources=None, options: dict | None = None,
                  allow_partial_failure: bool | None = None, **extra) -> _StageRow:
        """Add a stage. ``target`` is a function's name, an import path, or a callable.
        Problems are shown on the stage (and in ``errors``), never raised."""
        target_text = self._target_text(target)
        if name is None:
            base = target_text.rpartition(".")[2] or "stage"
            name = base
            n = 2
            while name in self.stage_names():
                name = f"{base}_{n}"
                n += 1
        if isinstance(depends_on, str):
            depends_on = [depends_on]
        options = dict(options or {})
        map_on = map_on if map_on is not None else options.pop("map_on", None)
        options.pop("map_on", None)
        explicit = "allow_partial_failure" in options or allow_partial_failure is not None
        partial = allow_partial_failure if allow_partial_failure is not None else options.pop(
            "allow_partial_failure", True)
        options.pop("allow_partial_failure", None)
        res_text = resources if isinstance(resources, str) else format_resources(resources or {})
        row = _StageRow(self, name, target_text, type if type in ("simple", "parameterized") else "simple",
                        list(depends_on or []), map_on or "", res_text, bool(partial), options,
                        {k: v for k, v in extra.items() if v is not None}, explicit)
        if type not in ("simple", "parameterized"):
            row.extra["_bad_type"] = type
        self._rows.append(row)
        self.rows_box.children = tuple(self._rows)
        self._changed()
        return row

    def _target_text(self, target) -> str:
        if target is None:
            return ""
        if callable(target) and not isinstance(target, str):
            label = Stage("x", target).target_name()
            ns = self._ns()
            if ns.get(label) is not target and "." not in label:
                self._callables[label] = target
                self.refresh_functions()
            return label
        return str(target)

    def set_stage(self, name: str, **fields) -> _StageRow:
        """Change a stage's fields (name, target, type, depends_on, map_on, resources,
        allow_partial_failure) as if edited in the widget."""
        row = self.stages[name]
        self._hold += 1
        try:
            for key, value in fields.items():
                if key == "name":
                    row.name_w.value = value
                elif key == "target":
                    row.target_w.value = self._target_text(value)
                elif key == "type":
                    row.type_w.value = value
                elif key == "depends_on":
                    value = [value] if isinstance(value, str) else list(value)
                    row.deps_w.allowed_tags = sorted(set(row.deps_w.allowed_tags) | set(value))
                    row.deps_w.value = value
                elif key == "map_on":
                    row.map_on_w.value = value or ""
                elif key == "resources":
                    row.resources_w.value = value if isinstance(value, str) else format_resources(value)
                elif key == "allow_partial_failure":
                    row.explicit_partial = True
                    row.partial_w.value = bool(value)
                else:
                    raise TypeError(f"set_stage() got an unknown field {key!r}")
        finally:
            self._hold -= 1
        self._changed()
        return row

    def remove_stage(self, stage) -> None:
        """Remove a stage (by name or its editor); stages depending on it show the error."""
        row = stage if isinstance(stage, _StageRow) else self.stages[stage]
        self._rows.remove(row)
        self.rows_box.children = tuple(self._rows)
        row.close()
        self._changed()

    def clear(self) -> None:
        for row in list(self._rows):
            row.close()
        self._rows = []
        self.rows_box.children = ()
        self._changed()

    def load(self, workflow) -> Workflow:
        """Load an existing workflow (a Workflow, YAML text, a path, or a dict) into the mapper."""
        wf = load_workflow(workflow)
        self._hold += 1
        try:
            self.clear()
            self.name_w.value = wf.name
            for s in wf.stages:
                extra = {k: getattr(s, k) for k in ("description", "version", "priority")}
                self.add_stage(s.name, s.target, type=s.type, depends_on=list(s.depends_on),
                               resources=dict(s.resources), options=dict(s.options), **extra)
        finally:
            self._hold -= 1
        self._reset_run()
        self._changed()
        return wf

    # --- building and validating ---
    def _on_name(self, change) -> None:
        self.name = change["new"].strip()
        self._changed()

    def _on_name_trait(self, change) -> None:  # ``mapper.name = ...`` from code
        if hasattr(self, "name_w") and self.name_w.value.strip() != change["new"]:
            self.name_w.value = change["new"]

    def _renamed(self, row, old: str, new: str) -> None:
        if not old or old == new:
            return
        self._hold += 1
        try:
            for other in self._rows:
                if other is not row and old in other.deps_w.value:
                    other.deps_w.allowed_tags = sorted(set(other.deps_w.allowed_tags) | {new})
                    other.deps_w.value = [new if d == old else d for d in other.deps_w.value]
        finally:
            self._hold -= 1

    def _changed(self) -> None:
        if self._hold or not hasattr(self, "dag_w"):
            return
        with self._draw_lock:
            names = self.stage_names()
            for row in self._rows:
                allowed = sorted((set(names) - {row.name}) | set(row.deps_w.value))
                if list(row.deps_w.allowed_tags) != allowed:
                    row.deps_w.allowed_tags = allowed
                others = [n for n in names if n and n != row.name]
                if list(row.dep_add_w.options) != others:
                    row.dep_add_w.options = others
            self._propose()
            # A finished run's status goes only when the stages really changed: a notebook cell
            # that edits nothing (every cell triggers this) must not grey out the last run.
            if self._tracker is not None and self._tracker.run.done and self._mapped() != self._run_mapped:
                self._reset_run()
            self._validate()
            self._redraw()

    def _spec(self, row: _StageRow, ns: dict) -> tuple[dict, Problem | None]:
        """A row as a stage mapping for the validator, and the problem reading its resources box
        (a text field of this editor, not a workflow rule), if any."""
        f = row.fields()
        target: Any = f["target"]
        if target in self._callables:
            target = self._callables[target]
        elif target in ns and callable(ns[target]):
            target = ns[target]
        options = dict(row.extra_options)
        if f["type"] == "parameterized":
            if f["map_on"] and not f["depends_on"]:
                options["map_on"] = f["map_on"]
            if not f["allow_partial_failure"] or row.explicit_partial:
                options["allow_partial_failure"] = f["allow_partial_failure"]
        problem = None
        try:
            resources = parse_resources(f["resources"])
        except (ValueError, yaml.YAMLError) as exc:
            resources = {}
            problem = Problem(str(exc), stage=f["name"], key="resources", index=self._rows.index(row))
        spec = {"name": f["name"], "target": target, "type": row.extra.get("_bad_type", f["type"]),
                "depends_on": f["depends_on"], "options": options, "resources": resources}
        spec.update({k: v for k, v in row.extra.items() if not k.startswith("_")})
        return spec, problem

    def _validate(self) -> dict:
        """Check the mapping with the one workflow validator (``workflow.validate_workflow``, as
        ``load_workflow`` does, plus each target resolved) and show each problem on its row."""
        ns = self._ns()
        specs = [self._spec(row, ns) for row in self._rows]
        document = {"kind": "workflow", "metadata": {"name": self.name}, "spec": {"stages": [s for s, _ in specs]}}
        built, problems = validate_workflow(document, namespace=ns)
        problems = [p for _, p in specs if p is not None] + problems
        per_row: list[list[str]] = [[] for _ in self._rows]
        for problem in problems:
            for i in problem.positions:
                if problem.text not in per_row[i]:
                    per_row[i].append(problem.text)
        errors = {}
        for i, row in enumerate(self._rows):
            message = "; ".join(per_row[i])
            row.set_error(message)
            if message:
                errors[row.name or f"stage {i + 1}"] = message
        self._problems = problems
        self.errors = errors
        self.workflow_error = "; ".join(p.text for p in problems if not p.positions)
        self._built = built if not problems else None
        self.yaml = self._built.to_yaml() if self._built is not None else ""
        return errors

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
        self.yaml_w.value = text
        self.export_box.layout.display = ""
        if path is not None:
            Path(path).write_text(text)
            self._say(f"saved {esc(path)}", ok=True)
        return text

    # --- running ---
    def _executor_for(self, executor):
        if executor is not None:
            return executor
        if self.executor is not None and self.executor.running:
            return self.executor
        from ..executors.base import current_executor
        ex = current_executor()
        if ex is not None:
            return ex
        if self._own_executor is None or not self._own_executor.running:
            from ..executors.local import LocalExecutor
            self._own_executor = LocalExecutor(use_processes=False).start()
        return self._own_executor

    def run(self, executor=None, input: dict | None = None, namespace: str | None = None):
        """Submit the workflow as mapped and return its RunHandle at once; the DAG shows the
        stages' states as it runs (``handle.wait()`` blocks until it ends)."""
        self._clear_run()
        wf = self.workflow
        self._run_mapped = self._mapped()
        ex = self._executor_for(executor)
        self.executor = ex
        with self._draw_lock:
            self._watch(ex)
            handle = ex.submit(wf, input=input, namespace=namespace)
            self._handle = handle
            self._tracker = RunTracker(handle.run)
            self._redraw()
        return handle

    def _watch(self, ex) -> None:
        if self._watched is ex:
            return
        self._unsubscribe_all()
        self._subscribe(ex, kinds=("task", "run"))
        self._watched = ex

    def _on_events(self, batch: list) -> None:
        tracker = self._tracker
        if tracker is None:
            return
        changed = False
        for event in batch:
            if event.kind == "task":
                changed = tracker.apply(event) or changed
            elif event.kind == "run" and event.run == tracker.uid:
                changed = True
        if changed:
            self._redraw()

    def _mapped(self) -> list:
        """The stages as edited now (compared with what the last run was started from)."""
        return [row.fields() for row in self._rows]

    def _reset_run(self) -> None:
        self._tracker = None
        self._handle = None

    def _clear_run(self) -> None:
        """Forget a finished run's status (its state, result or error) before a new attempt."""
        if self._tracker is not None and self._tracker.run.done:
            self._reset_run()
            self._redraw()

    # --- drawing ---
    def _redraw(self) -> None:
        tracker = self._tracker
        states = tracker.stage_states() if tracker is not None else {}
        run_state = tracker.run.state if tracker is not None else ""
        for row in self._rows:
            row.set_state(states.get(row.name))
        self.svg = self._svg(states)
        self.dag_w.value = f'<div class="fnb fnb-dag">{self.svg}</div>'
        self.empty_w.layout.display = "none" if self._rows else ""
        running = tracker is not None and not tracker.run.done
        self.run_w.description = "Cancel" if running else "Run"
        self.run_w.icon = "stop" if running else "play"
        self.run_w.button_style = "warning" if running else "success"
        self.status_w.value = '<div class="fnb">' + self._status_html() + "</div>"
        # the traits last: whoever watches them (a test, a notebook) sees the page already drawn
        self.stage_states = states
        self.run_state = run_state

    def _svg(self, states: dict) -> str:
        seen = set()
        stages = []
        for i, row in enumerate(self._rows):
            name = row.name or f"stage {i + 1}"
            if name in seen:
                continue
            seen.add(name)
            stages.append(SimpleNamespace(name=name, depends_on=list(row.deps_w.value), type=row.type_w.value))
        if not stages:
            return ('<svg xmlns="http://www.w3.org/2000/svg" width="220" height="60" font-family="sans-serif" '
                    'font-size="12"><rect x="1" y="1" width="218" height="58" rx="6" fill="none" stroke="#b0bec5" '
                    'stroke-dasharray="4,3"/><text x="110" y="34" text-anchor="middle" fill="#78909c">'
                    'no stages yet</text></svg>')
        return dag_svg(SimpleNamespace(stages=stages), states, self.errors)

    def _status_html(self) -> str:
        parts = []
        result_table = ""
        tracker = self._tracker
        if tracker is not None:
            run = tracker.run
            totals = tracker.totals()
            parts.append(f'{badge(run.state)} <span class="fnb-mono">{esc(run.name)}</span> · '
                         f'<span class="fnb-mapper-done">{totals["done"]}/{totals["total"]}</span> tasks'
                         + (f' · <span class="fnb-err">{totals["failed"]} failed</span>' if totals["failed"] else "")
                         + f' · {fmt_duration(run.duration)}')
            if run.state == "finished":
                table = _table_html(run.result)
                if table is not None:
                    result_table = table
                else:
                    text = repr(run.result)
                    parts.append(f'<span class="fnb-muted">result:</span> <span class="fnb-mono">'
                                 f'{esc(text[:160] + ("…" if len(text) > 160 else ""))}</span>')
            elif run.error:
                parts.append(f'<span class="fnb-err">{esc(run.error)}</span>')
        if self.workflow_error:
            parts.append(f'<span class="fnb-err">⚠ {esc(self.workflow_error)}</span>')
        elif self.errors:
            n = len(self.errors)
            parts.append(f'<span class="fnb-err">⚠ {n} stage{"s" if n > 1 else ""} need'
                         f'{"" if n > 1 else "s"} attention (marked in red)</span>')
        elif self._built is not None and tracker is None:
            parts.append(f'<span class="fnb-ok">✓ valid: {len(self._rows)} stage'
                         f'{"s" if len(self._rows) != 1 else ""}</span>')
        if self.status:
            parts.append(self.status)
        return '<div style="margin:4px 2px">' + " &nbsp;·&nbsp; ".join(parts) + "</div>" + result_table

    def _say(self, message_html: str, ok: bool = False) -> None:
        self.status = f'<span class="{"fnb-ok" if ok else "fnb-err"}">{message_html}</span>'
        self.status_w.value = '<div class="fnb">' + self._status_html() + "</div>"

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
        if self._handle is not None and not self._handle.done():
            self._handle.cancel()
            self._say("cancelling…", ok=True)
            return
        self._clear_run()  # one current status: the last run's line goes as soon as Run is pressed
        self.run(input=parse_run_input(self.input_w.value))

    # --- proposing a new stage's dependencies ---
    def propose_dependencies(self, function) -> tuple[list[str], str]:
        """The dependencies "Add as stage" proposes for ``function`` (a name in the namespace or a
        callable), and why, in one line. The rule (also the widget's help text):

        - a **root** (no dependencies) when no stage can fill its parameters: it has no required
          positional parameter, each one is a key of the run input typed in the input box, or it
          needs more than there are stages; a root's parameters come from the run input;
        - otherwise one dependency per required positional parameter, in order: the stage of that
          name (or whose function has that name), else the most recently added stages not
          matched by name, in the order they were added.
        """
        fn = self._ns().get(function) if isinstance(function, str) else function
        label = function if isinstance(function, str) else getattr(function, "__name__", "function")
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            return [], f"{label}: no signature to read, so a root"
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        required = [p.name for p in params if p.kind in kinds and p.default is p.empty]
        stages = [(row.name, row.target_w.value.strip().rpartition(".")[2]) for row in self._rows if row.name]
        try:
            given = set(parse_run_input(self.input_w.value))
        except ConfigError:
            given = set()
        if not required:
            return [], "a root: no required parameter, so any parameter comes from the run input"
        if given and set(required) <= given:
            return [], f"a root: {', '.join(required)} from the run input"
        if len(required) > len(stages):
            why = "no stages yet" if not stages else f"{len(stages)} stage(s) can't fill {len(required)}"
            return [], f"a root ({why}): {', '.join(required)} from the run input"
        chosen: dict[str, tuple[str, str]] = {}
        for param in required:
            for name, target in stages:
                if param in (name, target) and name not in {c for c, _ in chosen.values()}:
                    chosen[param] = (name, "same name")
                    break
        unmatched = [p for p in required if p not in chosen]
        used = {c for c, _ in chosen.values()}
        pool = [name for name, _ in stages if name not in used]
        for param, name in zip(unmatched, pool[len(pool) - len(unmatched):]):
            chosen[param] = (name, "latest stage")
        deps = [chosen[p][0] for p in required]
        return deps, "; ".join(f"{p} ← {chosen[p][0]} ({chosen[p][1]})" for p in required)

    def _propose(self) -> None:
        """Preselect the proposed dependencies of the function picked in the list; redone only
        when the pick, the stages or the run input change, so the user's edits stay."""
        if not hasattr(self, "new_deps_w"):
            return
        function = self.functions_w.value
        names = [r.name for r in self._rows if r.name]
        key = (function, tuple((r.name, r.target_w.value) for r in self._rows), self.input_w.value)
        if key == self._proposed_key:
            return
        self._proposed_key = key
        self.new_deps_w.allowed_tags = sorted(set(names))
        self.new_dep_add_w.options = names
        if not function:
            self.new_deps_w.value = []
            self.proposal_w.value = ""
            return
        deps, why = self.propose_dependencies(function)
        self.new_deps_w.value = deps
        self.proposal_w.value = f'<div class="fnb fnb-muted" style="white-space:normal">{esc(why)}</div>'

    def _export_from_ui(self) -> None:
        if self.export_box.layout.display == "" and self.yaml_w.value:
            self.export_box.layout.display = "none"
            return
        self.export_yaml()
        if not self.save_path_w.value:
            self.save_path_w.value = f"{self.name}.yaml"

    def _save_from_ui(self) -> None:
        path = self.save_path_w.value.strip()
        if not path:
            raise ValueError("give a file name to save to")
        self.export_yaml(path)

    def _toggle_load(self) -> None:
        if self.load_box.layout.display == "":
            self.load_box.layout.display = "none"
            return
        found = [(k, v) for k, v in self._ns().items() if isinstance(v, Workflow) and not k.startswith("_")]
        stored = [(f"%%flowdapt workflow {name}", ("stored", name)) for name in sorted(_stored_workflows())]
        self.load_pick_w.options = ([("(paste YAML below)", None)] + [(f"{k} ({v.name})", k) for k, v in found]
                                    + stored)
        self.load_box.layout.display = ""

    def _load_from_ui(self) -> None:
        key = self.load_pick_w.value
        if isinstance(key, tuple):  # one a %%flowdapt workflow cell defined
            src = _stored_workflows().get(key[1])
            if src is None:
                raise ValueError(f"workflow '{key[1]}' is no longer stored by %flowdapt")
        else:
            src = self._ns()[key] if key else self.load_text_w.value.strip()
        if not src:
            raise ValueError("pick a workflow, or paste its YAML (or a path to it)")
        wf = self.load(src)
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
        if self._own_executor is not None:
            self._own_executor.close()
            self._own_executor = None

    def _static_html(self) -> str:
        rows = []
        for i, row in enumerate(self._rows):
            f = row.fields()
            err = self.errors.get(row.name or f"stage {i + 1}")
            rows.append(f'<tr><td><b>{esc(f["name"])}</b></td><td class="fnb-mono">{esc(f["target"])}</td>'
                        f'<td>{esc(f["type"])}</td><td>{esc(", ".join(f["depends_on"]))}</td>'
                        f'<td>{esc(f["map_on"] or "")}</td><td class="fnb-mono">{esc(f["resources"])}</td>'
                        f'<td class="fnb-err" style="white-space:normal">{esc(err or "")}</td></tr>')
        table = ('<table class="fnb-table"><tr><th>stage</th><th>target</th><th>type</th><th>depends on</th>'
                 '<th>map_on</th><th>resources</th><th>problem</th></tr>' + "".join(rows) + "</table>")
        werr = f'<div class="fnb-err">{esc(self.workflow_error)}</div>' if self.workflow_error else ""
        return (f'<div class="fnb-panel"><div class="fnb-head"><span class="fnb-title">Stage mapper: '
                f'{esc(self.name)}</span></div>{werr}<div class="fnb-dag">{self._svg(self.stage_states)}</div>'
                f'{table}</div>')

    def __repr__(self) -> str:
        lines = [f"StageMapper {self.name!r}: {len(self._rows)} stage(s)"
                 + (f", run {self.run_state}" if self.run_state else "")]
        for i, row in enumerate(self._rows):
            f = row.fields()
            deps = f" <- {', '.join(f['depends_on'])}" if f["depends_on"] else ""
            kind = " [*]" if f["type"] == "parameterized" else ""
            state = self.stage_states.get(f["name"])
            lines.append(f"  {f['name'] or '?'}{kind}: {f['target'] or '?'}{deps}" + (f"  ({state})" if state else ""))
            err = self.errors.get(row.name or f"stage {i + 1}")
            if err:
                lines.append(f"    ! {err}")
        if self.workflow_error:
            lines.append(f"  ! {self.workflow_error}")
        return "\n".join(lines)


def _stored_workflows() -> dict:
    """Workflows defined by ``%%flowdapt workflow`` cells (name -> Workflow), when the extension
    is loaded in this IPython session; found through IPython's magics registry, so this widget
    needs nothing from the notebook layer."""
    try:
        from IPython import get_ipython
        shell = get_ipython()
        magics = shell.magics_manager.registry.get("FlowdaptMagics") if shell is not None else None
        return dict(getattr(magics, "workflows", None) or {})
    except Exception:
        return {}


_TABLE_ROWS = 10


def _table_html(result) -> str | None:
    """A pandas DataFrame (or Series) result as a table of its first and last rows; None for
    anything else. pandas is only looked at when the run already imported it."""
    import sys
    pd = sys.modules.get("pandas")
    if pd is None or not isinstance(result, (pd.DataFrame, pd.Series)):
        return None
    frame = result.to_frame() if isinstance(result, pd.Series) else result
    rows, cols = frame.shape
    html = frame.to_html(max_rows=_TABLE_ROWS, max_cols=12, border=0, classes="fnb-table fnb-result-table")
    return (f'<div style="margin:2px 2px 6px"><span class="fnb-muted">result: DataFrame, {rows} rows × '
            f'{cols} columns' + (f" (first and last {_TABLE_ROWS // 2} shown)" if rows > _TABLE_ROWS else "")
            + f'</span><div style="max-height:320px;overflow:auto;max-width:100%">{html}</div></div>')


_HELP = """<details class="fnb" style="font-size:11.5px;margin-top:4px"><summary class="fnb-muted">
How "Add as stage" picks dependencies</summary><div style="white-space:normal;line-height:1.45">
The proposal is shown above the button; change it before adding (× removes one, type a stage name
and press Enter to add one). A new stage is a <b>root</b> (no dependencies; its parameters come from
the run input) when no stage can fill its parameters: it has no required positional parameter, each
one is a key of the run input typed above, or it needs more than there are stages. Otherwise it gets
one dependency per required parameter, in order: the stage with that parameter's name (or whose
function has that name), else the most recently added stages, in the order they were added.
Run input: <code>n=200 max_degree=6</code>, <code>{"n": 200}</code> or <code>{'n': 200}</code>.
</div></details>"""
