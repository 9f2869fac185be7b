"""The StageMapper's DAG and state view: the DAG drawn from the rows (coloured by stage state,
problems in red), the status line (the run's state and result, the mapping's problems), and the
static forms (HTML, text) a notebook shows where widgets don't render."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import ipywidgets as widgets

from ..dag import dag_svg
from ._common import badge, esc, fmt_duration, html_widget

_NO_STAGES_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="220" height="60" font-family="sans-serif" '
    'font-size="12"><rect x="1" y="1" width="218" height="58" rx="6" fill="none" stroke="#b0bec5" '
    'stroke-dasharray="4,3"/><text x="110" y="34" text-anchor="middle" fill="#78909c">'
    "no stages yet</text></svg>"
)


class MapperView:
    """The DAG, the status line, and the note shown while there are no stages."""

    def __init__(self):
        self.dag_w = widgets.HTML(layout=widgets.Layout(width="100%"))
        self.status_w = html_widget()
        self.empty_w = widgets.HTML(
            '<div class="fnb fnb-empty">No stages yet: pick a function on the right '
            "and press “Add as stage”, or Load a workflow.</div>"
        )

    def draw(self, svg: str, status_html: str, has_stages: bool) -> None:
        self.dag_w.value = f'<div class="fnb fnb-dag">{svg}</div>'
        self.empty_w.layout.display = "none" if has_stages else ""
        self.show_status(status_html)

    def show_status(self, status_html: str) -> None:
        self.status_w.value = '<div class="fnb">' + status_html + "</div>"


def stages_svg(rows, states: dict, errors: dict) -> str:
    """The DAG of the rows as edited (each name once; a nameless row as "stage N")."""
    seen = set()
    stages = []
    for i, row in enumerate(rows):
        name = row.name or f"stage {i + 1}"
        if name in seen:
            continue
        seen.add(name)
        stages.append(SimpleNamespace(name=name, depends_on=list(row.deps_w.value), type=row.type_w.value))
    if not stages:
        return _NO_STAGES_SVG
    return dag_svg(SimpleNamespace(stages=stages), states, errors)


def status_html(tracker, workflow_error: str, errors: dict, valid_stages: int | None, message: str) -> str:
    """One current status: the run (state, tasks, result or error), the mapping's problems or
    that it is valid (``valid_stages``: its stage count, None when not valid), then ``message``."""
    parts = []
    result_table = ""
    if tracker is not None:
        parts.append(_run_line(tracker))
        run = tracker.run
        if run.state == "finished":
            result_table = table_html(run.result) or ""
            if not result_table:
                text = repr(run.result)
                parts.append(
                    f'<span class="fnb-muted">result:</span> <span class="fnb-mono">'
                    f"{esc(text[:160] + ('…' if len(text) > 160 else ''))}</span>"
                )
        elif run.error:
            parts.append(f'<span class="fnb-err">{esc(run.error)}</span>')
    if workflow_error:
        parts.append(f'<span class="fnb-err">⚠ {esc(workflow_error)}</span>')
    elif errors:
        n = len(errors)
        parts.append(
            f'<span class="fnb-err">⚠ {n} stage{"s" if n > 1 else ""} need'
            f"{'' if n > 1 else 's'} attention (marked in red)</span>"
        )
    elif valid_stages is not None and tracker is None:
        parts.append(
            f'<span class="fnb-ok">✓ valid: {valid_stages} stage{"s" if valid_stages != 1 else ""}</span>'
        )
    if message:
        parts.append(message)
    return '<div style="margin:4px 2px">' + " &nbsp;·&nbsp; ".join(parts) + "</div>" + result_table


def _run_line(tracker) -> str:
    run = tracker.run
    totals = tracker.totals()
    return (
        f'{badge(run.state)} <span class="fnb-mono">{esc(run.name)}</span> · '
        f'<span class="fnb-mapper-done">{totals["done"]}/{totals["total"]}</span> tasks'
        + (f' · <span class="fnb-err">{totals["failed"]} failed</span>' if totals["failed"] else "")
        + f" · {fmt_duration(run.duration)}"
    )


_TABLE_ROWS = 10


def table_html(result) -> str | None:
    """A pandas DataFrame (or Series) result as a table of its first and last rows; None for
    anything else. pandas is only looked at when the run already imported it."""
    pd = sys.modules.get("pandas")
    if pd is None or not isinstance(result, (pd.DataFrame, pd.Series)):
        return None
    frame = result.to_frame() if isinstance(result, pd.Series) else result
    rows, cols = frame.shape
    html = frame.to_html(max_rows=_TABLE_ROWS, max_cols=12, border=0, classes="fnb-table fnb-result-table")
    return (
        f'<div style="margin:2px 2px 6px"><span class="fnb-muted">result: DataFrame, {rows} rows × '
        f"{cols} columns"
        + (f" (first and last {_TABLE_ROWS // 2} shown)" if rows > _TABLE_ROWS else "")
        + f'</span><div style="max-height:320px;overflow:auto;max-width:100%">{html}</div></div>'
    )


def static_html(name: str, rows, errors: dict, workflow_error: str, svg: str) -> str:
    """The mapper as a table of its stages with their problems, and the DAG."""
    cells = []
    for i, row in enumerate(rows):
        f = row.fields()
        err = errors.get(row.name or f"stage {i + 1}")
        cells.append(
            f'<tr><td><b>{esc(f["name"])}</b></td><td class="fnb-mono">{esc(f["target"])}</td>'
            f"<td>{esc(f['type'])}</td><td>{esc(', '.join(f['depends_on']))}</td>"
            f'<td>{esc(f["map_on"] or "")}</td><td class="fnb-mono">{esc(f["resources"])}</td>'
            f'<td class="fnb-err" style="white-space:normal">{esc(err or "")}</td></tr>'
        )
    table = (
        '<table class="fnb-table"><tr><th>stage</th><th>target</th><th>type</th><th>depends on</th>'
        "<th>map_on</th><th>resources</th><th>problem</th></tr>" + "".join(cells) + "</table>"
    )
    werr = f'<div class="fnb-err">{esc(workflow_error)}</div>' if workflow_error else ""
    return (
        f'<div class="fnb-panel"><div class="fnb-head"><span class="fnb-title">Stage mapper: '
        f'{esc(name)}</span></div>{werr}<div class="fnb-dag">{svg}</div>{table}</div>'
    )


def text(name: str, rows, errors: dict, workflow_error: str, states: dict, run_state: str) -> str:
    """The mapper as plain text: one line per stage, its state and problems."""
    lines = [f"StageMapper {name!r}: {len(rows)} stage(s)" + (f", run {run_state}" if run_state else "")]
    for i, row in enumerate(rows):
        f = row.fields()
        deps = f" <- {', '.join(f['depends_on'])}" if f["depends_on"] else ""
        kind = " [*]" if f["type"] == "parameterized" else ""
        state = states.get(f["name"])
        lines.append(
            f"  {f['name'] or '?'}{kind}: {f['target'] or '?'}{deps}" + (f"  ({state})" if state else "")
        )
        err = errors.get(row.name or f"stage {i + 1}")
        if err:
            lines.append(f"    ! {err}")
    if workflow_error:
        lines.append(f"  ! {workflow_error}")
    return "\n".join(lines)
