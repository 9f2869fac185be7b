"""The StageMapper's function picker: the namespace stage targets resolve in, the notebook
functions found there, and "Add as stage" with the dependencies it proposes for the one picked."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import ipywidgets as widgets

from ..errors import ConfigError
from ..run_input import parse_run_input
from ..workflow import Stage, user_namespace
from ._common import esc
from ._stage_row import (
    _internal,
    _shell_hidden,
    _signature,
    _wrap_row,
    dependency_adder,
    dependency_label,
    dependency_tags,
)


class FunctionPicker:
    """The functions a stage can run, and the dependencies proposed for a new stage.

    ``namespace`` is where names resolve (None: the notebook's); ``stages()`` gives the stages as
    (name, target text) in order; ``run_input()`` the text of the run input box."""

    def __init__(
        self,
        namespace: dict | None,
        stages: Callable[[], list[tuple[str, str]]],
        run_input: Callable[[], str],
    ):
        self.namespace = namespace
        self.callables: dict[str, Callable] = {}  # callables given as targets that the namespace lacks
        self.names: list[str] = []
        self._stages = stages
        self._run_input = run_input
        self._proposed_key: tuple | None = None
        self.functions_w = widgets.Select(options=[], rows=7, layout=widgets.Layout(width="auto"))
        self.add_fn_w = widgets.Button(
            description="Add as stage", icon="plus-circle", layout=widgets.Layout(width="130px")
        )
        self.refresh_w = widgets.Button(
            icon="refresh", tooltip="look for new notebook functions", layout=widgets.Layout(width="36px")
        )
        # the new stage's dependencies, proposed from the function's signature and editable
        self.new_deps_w = dependency_tags(flex="1 1 120px", min_width="0")
        self.new_dep_add_w = dependency_adder(self.new_deps_w)
        self.proposal_w = widgets.HTML()
        self.proposal_w.add_class("fnb-proposal")
        self.help_w = widgets.HTML(_HELP)
        self.children = [
            widgets.HTML('<div class="fnb fnb-sub">Notebook functions</div>'),
            self.functions_w,
            _wrap_row(
                [
                    dependency_label(),
                    self.new_deps_w,
                    self.new_dep_add_w,
                ]
            ),
            self.proposal_w,
            widgets.HBox([self.add_fn_w, self.refresh_w]),
            self.help_w,
        ]

    def ns(self) -> dict:
        """The namespace names resolve in, with the callables given as targets."""
        ns = dict(user_namespace() if self.namespace is None else self.namespace)
        ns.update(self.callables)
        return ns

    def refresh(self) -> bool:
        """Look for functions in the namespace again; whether the list changed."""
        ns = self.ns()
        hidden = _shell_hidden() if self.namespace is None else {}
        names = sorted(
            k
            for k, v in ns.items()
            if not k.startswith("_")
            and hidden.get(k) is not v
            and ((inspect.isfunction(v) and not _internal(v)) or k in self.callables)
        )
        if names == self.names:
            return False
        self.names = names
        current = self.functions_w.value
        self.functions_w.options = [(_signature(ns[n]), n) for n in names]
        if current in names:
            self.functions_w.value = current
        return True

    def target_text(self, target) -> tuple[str, bool]:
        """A target as the text a stage editor shows, and whether a callable the namespace lacks
        was kept for it (so the function list must be refreshed)."""
        if target is None:
            return "", False
        if callable(target) and not isinstance(target, str):
            label = Stage("x", target).target_name()
            if self.ns().get(label) is not target and "." not in label:
                self.callables[label] = target
                return label, True
            return label, False
        return str(target), False

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
        fn = self.ns().get(function) if isinstance(function, str) else function
        label = function if isinstance(function, str) else getattr(function, "__name__", "function")
        try:
            params = list(inspect.signature(fn).parameters.values())  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return [], f"{label}: no signature to read, so a root"
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        required = [p.name for p in params if p.kind in kinds and p.default is p.empty]
        stages = [(name, target.strip().rpartition(".")[2]) for name, target in self._stages() if name]
        root = self._root_reason(required, len(stages))
        if root is not None:
            return [], root
        chosen = _match_parameters(required, stages)
        deps = [chosen[p][0] for p in required]
        return deps, "; ".join(f"{p} ← {chosen[p][0]} ({chosen[p][1]})" for p in required)

    def _root_reason(self, required: list[str], stage_count: int) -> str | None:
        """Why a function with these required parameters is a root; None if it is not one."""
        try:
            given = set(parse_run_input(self._run_input()))
        except ConfigError:
            given = set()
        if not required:
            return "a root: no required parameter, so any parameter comes from the run input"
        if given and set(required) <= given:
            return f"a root: {', '.join(required)} from the run input"
        if len(required) > stage_count:
            why = "no stages yet" if not stage_count else f"{stage_count} stage(s) can't fill {len(required)}"
            return f"a root ({why}): {', '.join(required)} from the run input"
        return None

    def propose(self) -> None:
        """Preselect the proposed dependencies of the function picked in the list; redone only
        when the pick, the stages or the run input change, so the user's edits stay."""
        function = self.functions_w.value
        stages = self._stages()
        key = (function, tuple(stages), self._run_input())
        if key == self._proposed_key:
            return
        self._proposed_key = key
        names = [name for name, _ in stages if name]
        self.new_deps_w.allowed_tags = sorted(set(names))
        self.new_dep_add_w.options = names
        if not function:
            self.new_deps_w.value = []
            self.proposal_w.value = ""
            return
        deps, why = self.propose_dependencies(function)
        self.new_deps_w.value = deps
        self.proposal_w.value = f'<div class="fnb fnb-muted" style="white-space:normal">{esc(why)}</div>'


def _match_parameters(required: list[str], stages: list[tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """Each required parameter's stage and why: the stage of its name (or whose function has its
    name), else the latest stages not yet taken, in the order they were added."""
    chosen: dict[str, tuple[str, str]] = {}
    for param in required:
        for name, target in stages:
            if param in (name, target) and name not in {c for c, _ in chosen.values()}:
                chosen[param] = (name, "same name")
                break
    unmatched = [p for p in required if p not in chosen]
    used = {c for c, _ in chosen.values()}
    pool = [name for name, _ in stages if name not in used]
    for param, name in zip(unmatched, pool[len(pool) - len(unmatched) :]):
        chosen[param] = (name, "latest stage")
    return chosen


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
