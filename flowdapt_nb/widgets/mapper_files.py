"""The StageMapper's Export and Load panels: the workflow's YAML shown and saved to a file, and a
workflow picked to load (a Workflow in the notebook, one a ``%%flowdapt workflow`` cell stored,
or YAML pasted, or a path)."""

from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets

from ..workflow import Workflow


class FilePanels:
    """The two panels, hidden until their button is pressed."""

    def __init__(self):
        self.yaml_w = widgets.Textarea(layout=widgets.Layout(width="100%", height="180px"))
        self.save_path_w = widgets.Text(
            placeholder="file name, e.g. workflow.yaml",
            continuous_update=False,
            layout=widgets.Layout(width="280px"),
        )
        self.save_w = widgets.Button(description="Save", icon="save", layout=widgets.Layout(width="80px"))
        self.export_box = widgets.VBox(
            [
                widgets.HTML('<div class="fnb fnb-sub">Workflow YAML</div>'),
                self.yaml_w,
                widgets.HBox([self.save_path_w, self.save_w]),
            ],
            layout=widgets.Layout(display="none"),
        )
        self.load_pick_w = widgets.Dropdown(
            description="from",
            options=[],
            style={"description_width": "40px"},
            layout=widgets.Layout(width="320px"),
        )
        self.load_text_w = widgets.Textarea(
            placeholder="…or paste a workflow's YAML, or a path to one",
            layout=widgets.Layout(width="100%", height="120px"),
        )
        self.load_go_w = widgets.Button(
            description="Load", icon="check", button_style="primary", layout=widgets.Layout(width="90px")
        )
        self.load_box = widgets.VBox(
            [
                widgets.HTML('<div class="fnb fnb-sub">Load a workflow</div>'),
                self.load_pick_w,
                self.load_text_w,
                self.load_go_w,
            ],
            layout=widgets.Layout(display="none"),
        )

    def show_yaml(self, text: str, path: str | Path | None = None) -> None:
        self.yaml_w.value = text
        self.export_box.layout.display = ""
        if path is not None:
            Path(path).write_text(text)

    def hide_export(self) -> bool:
        """Export pressed again: hide the YAML shown; False when it was not shown."""
        if self.export_box.layout.display == "" and self.yaml_w.value:
            self.export_box.layout.display = "none"
            return True
        return False

    def save_path(self) -> str:
        path = self.save_path_w.value.strip()
        if not path:
            raise ValueError("give a file name to save to")
        return path

    def toggle_load(self, ns: dict) -> None:
        """Show the Load panel with the workflows there are to pick; hide it if shown."""
        if self.load_box.layout.display == "":
            self.load_box.layout.display = "none"
            return
        found = [(k, v) for k, v in ns.items() if isinstance(v, Workflow) and not k.startswith("_")]
        stored = [(f"%%flowdapt workflow {name}", ("stored", name)) for name in sorted(stored_workflows())]
        self.load_pick_w.options = (
            [("(paste YAML below)", None)] + [(f"{k} ({v.name})", k) for k, v in found] + stored
        )
        self.load_box.layout.display = ""

    def picked(self, ns: dict):
        """What the Load panel names: a Workflow, YAML text, or a path."""
        key = self.load_pick_w.value
        if isinstance(key, tuple):  # one a %%flowdapt workflow cell defined
            src = stored_workflows().get(key[1])
            if src is None:
                raise ValueError(f"workflow '{key[1]}' is no longer stored by %flowdapt")
        else:
            src = ns[key] if key else self.load_text_w.value.strip()
        if not src:
            raise ValueError("pick a workflow, or paste its YAML (or a path to it)")
        return src


def stored_workflows() -> dict:
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
