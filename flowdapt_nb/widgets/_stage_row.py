"""The editor of one stage in the StageMapper, the dependency adder it shares with the mapper's
side panel, and the resources parser (``cpus=1, memory=1GB``). The run input is parsed by
:mod:`flowdapt_nb.run_input`, like the CLI's and the magic's."""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any

import ipywidgets as widgets
import yaml

from ._common import badge, esc

_ROW_CSS = """
<style>
.fnb-stage-row{border:1px solid var(--jp-border-color2,#e0e3e7);border-left:4px solid #90a4ae;border-radius:6px;
 padding:4px 6px;margin:3px 0;background:var(--jp-layout-color1,#fff)}
.fnb-stage-row.fnb-invalid{border-left-color:#e53935;background:var(--jp-layout-color1,#fff)}
.fnb-stage-row.fnb-valid{border-left-color:#43a047}
.fnb-mapper-side{border-left:1px solid var(--jp-border-color2,#e0e3e7);padding-left:12px;margin-left:8px;
 min-width:0;overflow:hidden}
.fnb-mapper-side select{max-width:100%}
</style>
"""

_PLACEHOLDER_INPUT = "run input: n=200 max_degree=6, or {'n': 200}"


def _signature(fn) -> str:
    try:
        return f"{fn.__name__}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return getattr(fn, "__name__", repr(fn))


_INTERNAL_MODULES = (
    "IPython",
    "ipykernel",
    "ipywidgets",
    "traitlets",
    "jupyter",
    "comm",
    "flowdapt_nb",
    "io",
    "_io",
    "builtins",
    "_sitebuiltins",
)


def _internal(fn) -> bool:
    """Functions the shell puts in a notebook's namespace (ipykernel's ``open``, ...), not the user's."""
    module = getattr(fn, "__module__", None) or ""
    return module.split(".")[0] in _INTERNAL_MODULES


def _shell_hidden() -> dict:
    """What IPython itself put in the user namespace (hidden from ``%who``)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "user_ns_hidden", None) or {}


def parse_resources(text: str) -> dict:
    """``"cpus=1, memory=1GB"`` (or ``{cpus: 1}``) -> ``{"cpus": 1, "memory": "1GB"}``."""
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError("resources must be a mapping like {cpus: 1}")
        return {str(k): v for k, v in data.items()}
    out: dict[str, Any] = {}
    for part in re.split(r"[,;]\s*|\s+(?=[A-Za-z_][\w-]*\s*[=:])", text):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=") if "=" in part else part.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"resources: can't read {part!r}; write name=amount, e.g. cpus=1, memory=1GB")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def format_resources(resources: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in (resources or {}).items())


def add_dependency(tags_w: widgets.TagsInput, name: str) -> bool:
    """Add ``name`` to a dependency list (a TagsInput), once; an unknown name is added too, so the
    mapper can say what is wrong with it. Returns whether it was added."""
    name = (name or "").strip()
    if not name or name in tags_w.value:
        return False
    if tags_w.allowed_tags and name not in tags_w.allowed_tags:
        tags_w.allowed_tags = sorted(set(tags_w.allowed_tags) | {name})
    tags_w.value = [*tags_w.value, name]
    return True


def dependency_tags(flex: str, min_width: str) -> widgets.TagsInput:
    """A stage's dependency list, one tag per stage (none: a root)."""
    return widgets.TagsInput(
        value=[],
        allowed_tags=[],
        allow_duplicates=False,
        placeholder="none: a root",
        layout=widgets.Layout(flex=flex, width="auto", min_width=min_width),
    )


def dependency_label() -> widgets.HTML:
    return widgets.HTML(
        '<span class="fnb fnb-muted">depends on</span>', layout=widgets.Layout(width="76px", flex="0 0 76px")
    )


def dependency_adder(tags_w: widgets.TagsInput) -> widgets.Combobox:
    """A box where a stage name typed (or picked) and committed with Enter is added to ``tags_w``.

    Why not TagsInput's own box: it hides itself once a tag is there, and in the browser Enter
    after picking a suggestion, or on a name not yet allowed, adds nothing. A Combobox with
    ``continuous_update=False`` sends its value on Enter (or when it loses focus), and we add it."""
    box = widgets.Combobox(
        value="",
        options=[],
        ensure_option=False,
        continuous_update=False,
        placeholder="+ stage, Enter",
        tooltip="type a stage name and press Enter",
        layout=widgets.Layout(width="140px", flex="0 0 140px"),
    )

    def _on_value(change) -> None:
        if change["new"].strip():
            add_dependency(tags_w, change["new"])
            box.value = ""  # ready for the next one

    box.observe(_on_value, names="value")
    return box


def _wrap_row(children) -> widgets.HBox:
    """One line of a stage editor: wraps instead of pushing its last item off the edge."""
    return widgets.HBox(
        children,
        layout=widgets.Layout(flex_flow="row wrap", align_items="center", width="100%", min_width="0"),
    )


class _StageRow(widgets.VBox):
    """The editor of one stage; ``editor`` is the mapper's row editor (``mapper_rows.StageRows``)."""

    def __init__(
        self,
        editor,
        name: str,
        target: str,
        type: str,
        depends_on: list,
        map_on: str,
        resources: str,
        allow_partial_failure: bool,
        extra_options: dict,
        extra: dict,
        explicit_partial: bool,
    ):
        self.editor = editor
        self.extra_options = dict(extra_options)
        self.extra = dict(extra)
        self.explicit_partial = explicit_partial
        # a fixed-width badge: a state appearing after a run must not move the remove button
        self.state_w = widgets.HTML(layout=widgets.Layout(width="92px", flex="0 0 92px", overflow="hidden"))
        self.name_w = widgets.Text(
            value=name,
            placeholder="stage name",
            continuous_update=False,
            tooltip="stage name",
            layout=widgets.Layout(width="150px", flex="0 1 150px", min_width="90px"),
        )
        self.target_w = widgets.Combobox(
            value=target,
            options=editor.functions,
            ensure_option=False,
            placeholder="function or import path",
            continuous_update=False,
            layout=widgets.Layout(flex="1 1 140px", width="auto", min_width="100px"),
        )
        self.type_w = widgets.Dropdown(
            options=["simple", "parameterized"],
            value=type,
            layout=widgets.Layout(width="125px", flex="0 1 125px", min_width="105px"),
        )
        self.remove_w = widgets.Button(
            icon="trash", tooltip="remove this stage", layout=widgets.Layout(width="36px", flex="0 0 36px")
        )
        self.deps_w = dependency_tags(flex="1 1 140px", min_width="120px")
        self.dep_add_w = dependency_adder(self.deps_w)
        self.map_on_w = widgets.Text(
            value=map_on,
            description="map_on",
            placeholder="input key",
            continuous_update=False,
            style={"description_width": "58px"},
            layout=widgets.Layout(width="210px"),
        )
        self.resources_w = widgets.Text(
            value=resources,
            placeholder="cpus=1, memory=1GB",
            description="resources",
            continuous_update=False,
            style={"description_width": "66px"},
            layout=widgets.Layout(width="250px", flex="0 1 250px", min_width="180px"),
        )
        self.partial_w = widgets.Checkbox(
            value=allow_partial_failure,
            description="allow partial failure",
            indent=False,
            layout=widgets.Layout(width="auto"),
        )
        self.error_w = widgets.HTML()
        self.deps_w.allowed_tags = sorted(set(depends_on) | set(editor.stage_names()))
        self.deps_w.value = list(depends_on)
        label = dependency_label()
        self.options_row = _wrap_row(
            [widgets.HTML("", layout=widgets.Layout(width="76px")), self.map_on_w, self.partial_w]
        )
        super().__init__(
            [
                # one line: name, target and type shrink to their minimum widths, the badge and the
                # delete button keep theirs, so the button stays at the row's right end (never wraps away)
                widgets.HBox(
                    [self.name_w, self.target_w, self.type_w, self.state_w, self.remove_w],
                    layout=widgets.Layout(
                        flex_flow="row nowrap", align_items="center", width="100%", min_width="0"
                    ),
                ),
                _wrap_row([label, self.deps_w, self.dep_add_w, self.resources_w]),
                self.options_row,
                self.error_w,
            ],
            layout=widgets.Layout(min_width="0"),
        )
        self.add_class("fnb-stage-row")
        self._show_type_fields()
        for w in (
            self.name_w,
            self.target_w,
            self.type_w,
            self.deps_w,
            self.map_on_w,
            self.resources_w,
            self.partial_w,
        ):
            w.observe(self._changed, names="value")
        self.remove_w.on_click(lambda _: editor.remove_stage(self))
        self._last_name = name

    def _show_type_fields(self) -> None:
        param = self.type_w.value == "parameterized"
        self.map_on_w.layout.display = "" if param and not self.deps_w.value else "none"
        self.partial_w.layout.display = "" if param else "none"
        self.options_row.layout.display = "" if param else "none"

    def _changed(self, change) -> None:
        owner = change["owner"]
        if owner is self.name_w:
            old, new = self._last_name, change["new"].strip()
            self._last_name = new
            self.editor.renamed(self, old, new)
        self._show_type_fields()
        self.editor.changed()

    @property
    def name(self) -> str:
        return self.name_w.value.strip()

    def set_error(self, message: str | None) -> None:
        if message:
            self.error_w.value = f'<div class="fnb fnb-stage-error">⚠ {esc(message)}</div>'
            self.remove_class("fnb-valid")
            self.add_class("fnb-invalid")
        else:
            self.error_w.value = ""
            self.remove_class("fnb-invalid")
            self.add_class("fnb-valid")

    def set_state(self, state: str | None) -> None:
        self.state_w.value = f'<div class="fnb">{badge(state)}</div>' if state else ""

    def fields(self) -> dict:
        """This stage as the keyword arguments of ``add_stage``."""
        return {
            "name": self.name,
            "target": self.target_w.value.strip(),
            "type": self.type_w.value,
            "depends_on": list(self.deps_w.value),
            "map_on": self.map_on_w.value.strip() or None,
            "resources": self.resources_w.value.strip(),
            "allow_partial_failure": self.partial_w.value,
        }
