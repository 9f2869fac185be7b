"""The StageMapper's row editor: one ``_StageRow`` per stage, in order. Adds, changes, removes and
renames stages, keeps each row's dependency choices current, gives the rows as stage mappings for
the workflow validator and shows the problems it finds on their rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ipywidgets as widgets
import yaml

from ..workflow import STAGE_TYPES, Problem
from ._stage_row import _StageRow, format_resources, parse_resources


class StageRows:
    """The stage editors. ``functions()`` lists the names a target box offers, ``target_text``
    turns a target (a name, an import path, a callable) into its text, and ``on_change()`` is
    called after every edit unless the rows are :meth:`held`."""

    def __init__(
        self,
        functions: Callable[[], list[str]],
        target_text: Callable[[Any], str],
        on_change: Callable[[], None],
    ):
        self.rows: list[_StageRow] = []
        self.box = widgets.VBox(layout=widgets.Layout(flex="3 1 0%", min_width="520px"))
        self._functions = functions
        self._target_text = target_text
        self._on_change = on_change
        self._hold = 0

    # --- what a _StageRow calls back ---
    @property
    def functions(self) -> list[str]:
        return self._functions()

    def stage_names(self) -> list[str]:
        return [r.name for r in self.rows]

    def changed(self) -> None:
        if not self._hold:
            self._on_change()

    def renamed(self, row: _StageRow, old: str, new: str) -> None:
        """A stage renamed: stages depending on it follow."""
        if not old or old == new:
            return
        with self.held():
            for other in self.rows:
                if other is not row and old in other.deps_w.value:
                    other.deps_w.allowed_tags = sorted(set(other.deps_w.allowed_tags) | {new})
                    other.deps_w.value = [new if d == old else d for d in other.deps_w.value]

    def remove_stage(self, stage) -> None:
        row = stage if isinstance(stage, _StageRow) else self.by_name()[stage]
        self.rows.remove(row)
        self.box.children = tuple(self.rows)
        row.close()
        self.changed()

    # --- editing ---
    @contextmanager
    def held(self) -> Iterator[None]:
        """Several edits as one: ``on_change`` is not called meanwhile."""
        self._hold += 1
        try:
            yield
        finally:
            self._hold -= 1

    @property
    def holding(self) -> bool:
        return self._hold > 0

    def by_name(self) -> dict[str, _StageRow]:
        return {r.name: r for r in self.rows}

    def add(
        self,
        name: str | None,
        target: Any,
        *,
        type: str,
        depends_on,
        map_on: str | None,
        resources,
        options: dict | None,
        allow_partial_failure: bool | None,
        extra: dict,
    ) -> _StageRow:
        target_text = self._target_text(target)
        if name is None:
            name = self._free_name(target_text.rpartition(".")[2] or "stage")
        if isinstance(depends_on, str):
            depends_on = [depends_on]
        options = dict(options or {})
        map_on = map_on if map_on is not None else options.get("map_on")
        explicit = "allow_partial_failure" in options or allow_partial_failure is not None
        partial = (
            allow_partial_failure
            if allow_partial_failure is not None
            else options.get("allow_partial_failure", True)
        )
        options = {k: v for k, v in options.items() if k not in ("map_on", "allow_partial_failure")}
        res_text = resources if isinstance(resources, str) else format_resources(resources or {})
        row = _StageRow(
            self,
            name,
            target_text,
            type if type in STAGE_TYPES else "simple",
            list(depends_on or []),
            map_on or "",
            res_text,
            bool(partial),
            options,
            {k: v for k, v in extra.items() if v is not None},
            explicit,
        )
        if type not in STAGE_TYPES:
            row.extra["_bad_type"] = type  # shown as the validator's problem, the dropdown can't hold it
        self.rows.append(row)
        self.box.children = tuple(self.rows)
        self.changed()
        return row

    def _free_name(self, base: str) -> str:
        name, n = base, 2
        while name in self.stage_names():
            name = f"{base}_{n}"
            n += 1
        return name

    def set(self, name: str, **fields) -> _StageRow:
        """Change a stage's fields as if edited in its row."""
        row = self.by_name()[name]
        with self.held():
            for key, value in fields.items():
                self._set_field(row, key, value)
        self.changed()
        return row

    def _set_field(self, row: _StageRow, key: str, value) -> None:
        if key == "depends_on":
            value = [value] if isinstance(value, str) else list(value)
            row.deps_w.allowed_tags = sorted(set(row.deps_w.allowed_tags) | set(value))
            row.deps_w.value = value
        elif key == "resources":
            row.resources_w.value = value if isinstance(value, str) else format_resources(value)
        elif key == "allow_partial_failure":
            row.explicit_partial = True
            row.partial_w.value = bool(value)
        elif key in _TEXT_FIELDS:
            box, convert = _TEXT_FIELDS[key]
            getattr(row, box).value = convert(self, value)
        else:
            raise TypeError(f"set_stage() got an unknown field {key!r}")

    def clear(self) -> None:
        for row in list(self.rows):
            row.close()
        self.rows = []
        self.box.children = ()
        self.changed()

    def sync_choices(self) -> None:
        """Each row's dependency choices: every other stage, and what it already names."""
        names = self.stage_names()
        for row in self.rows:
            allowed = sorted((set(names) - {row.name}) | set(row.deps_w.value))
            if list(row.deps_w.allowed_tags) != allowed:
                row.deps_w.allowed_tags = allowed
            others = [n for n in names if n and n != row.name]
            if list(row.dep_add_w.options) != others:
                row.dep_add_w.options = others

    # --- what the rows hold ---
    def mapped(self) -> list[dict]:
        """The stages as edited now (compared with what the last run was started from)."""
        return [row.fields() for row in self.rows]

    def specs(self, ns: dict) -> list[tuple[dict, Problem | None]]:
        """Each row as a stage mapping for the validator (targets found in ``ns`` as callables),
        with the problem reading its resources box (a text field of this editor, not a workflow
        rule), if any."""
        return [_spec(i, row, ns) for i, row in enumerate(self.rows)]

    def show(self, problems: list[Problem]) -> dict[str, str]:
        """Each problem on the rows it concerns; returns {stage: message} for the rows with one."""
        per_row: list[list[str]] = [[] for _ in self.rows]
        for problem in problems:
            for i in problem.positions:
                if problem.text not in per_row[i]:
                    per_row[i].append(problem.text)
        errors = {}
        for i, row in enumerate(self.rows):
            message = "; ".join(per_row[i])
            row.set_error(message)
            if message:
                errors[row.name or f"stage {i + 1}"] = message
        return errors

    def set_states(self, states: dict) -> None:
        for row in self.rows:
            row.set_state(states.get(row.name))


# set_stage's plain fields: the row's box, and the value as that box holds it
_TEXT_FIELDS: dict[str, tuple[str, Callable[[StageRows, Any], Any]]] = {
    "name": ("name_w", lambda rows, v: v),
    "target": ("target_w", lambda rows, v: rows._target_text(v)),
    "type": ("type_w", lambda rows, v: v),
    "map_on": ("map_on_w", lambda rows, v: v or ""),
}


def _spec(i: int, row: _StageRow, ns: dict) -> tuple[dict, Problem | None]:
    f = row.fields()
    target: Any = f["target"]
    if target in ns and callable(ns[target]):
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
        problem = Problem(str(exc), stage=f["name"], key="resources", index=i)
    spec = {
        "name": f["name"],
        "target": target,
        "type": row.extra.get("_bad_type", f["type"]),
        "depends_on": f["depends_on"],
        "options": options,
        "resources": resources,
    }
    spec.update({k: v for k, v in row.extra.items() if not k.startswith("_")})
    return spec, problem
