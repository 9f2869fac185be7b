"""HTML and text views of executors, workflows and runs, for nbconvert, nbviewer and terminals.

Everything here is inline-styled HTML and plain tables: a saved notebook that is not trusted is
sanitized (no <style>, no inline <svg>), and must still read well.
"""

from __future__ import annotations

import html

from .dag import dag_html
from .states import COLOURS, colour, text_colour

STATE_COLOURS = COLOURS  # kept for older imports; the palette lives in flowdapt_nb.states

_BOX = (
    "font-family:sans-serif;font-size:12.5px;line-height:1.45;color:#1f2328;border:1px solid #e0e3e7;"
    "border-radius:8px;padding:8px 12px;margin:4px 0;background:#ffffff;display:inline-block;min-width:320px"
)
_TH = (
    "text-align:left;font-weight:600;font-size:10.5px;text-transform:uppercase;color:#6a737d;"
    "border-bottom:1px solid #e0e3e7;padding:3px 8px"
)
_TD = "padding:3px 8px;border-bottom:1px solid #f0f2f4;text-align:left"


def badge(state: str, text: str | None = None) -> str:
    """A coloured state badge (inline-styled)."""
    return (
        f'<span style="display:inline-block;background:{colour(state)};color:{text_colour(state)};'
        f"border-radius:10px;padding:0 8px;font-size:10.5px;line-height:18px;font-weight:600;"
        f'text-transform:uppercase;white-space:nowrap">{html.escape(text or state)}</span>'
    )


_badge = badge


def _table(head: list[str], rows: list[list[str]]) -> str:
    ths = "".join(f'<th style="{_TH}">{h}</th>' for h in head)
    trs = "".join("<tr>" + "".join(f'<td style="{_TD}">{c}</td>' for c in row) + "</tr>" for row in rows)
    return f'<table style="border-collapse:collapse;margin-top:6px"><tr>{ths}</tr>{trs}</table>'


def executor_html(ex) -> str:
    info = ex.info()
    dash = info.get("dashboard_url")
    link = f'<a href="{html.escape(dash)}" target="_blank">{html.escape(dash)}</a>' if dash else "none"
    totals = ", ".join(f"{k}: {v:g}" for k, v in info["resources"].items()) or "-"
    rows = [
        ["kind", html.escape(str(info["kind"]))],
        ["address", html.escape(str(info["address"] or "-"))],
        ["dashboard", link],
        ["workers", str(len(info["workers"]))],
        ["resources", html.escape(totals)],
    ]
    return (
        f'<div class="flowdapt-executor" style="{_BOX}"><b style="font-size:14px">{html.escape(type(ex).__name__)}</b> '
        f"{badge(info['state'])}{_table(['', ''], rows)}</div>"
    )


def workflow_html(wf, states: dict | None = None) -> str:
    """A workflow: its DAG drawn as boxes and its stages as a table."""
    rows = [
        [
            f"<b>{html.escape(s.name)}</b>",
            f"<code>{html.escape(s.target_name())}</code>",
            html.escape(s.type),
            html.escape(", ".join(s.depends_on)) or "–",
        ]
        for s in wf.stages
    ]
    return (
        f'<div class="flowdapt-workflow" style="{_BOX}"><b style="font-size:14px">Workflow {html.escape(wf.name)}</b>'
        f"<div>{dag_html(wf, states)}</div>{_table(['stage', 'target', 'type', 'depends on'], rows)}</div>"
    )


def run_html(run) -> str:
    dur = f"{run.duration:.2f} s" if run.duration is not None else "-"
    stages = run.stages
    rows = [
        [html.escape(r.stage), badge(r.state), f"{r.finished}/{r.tasks}", str(r.failed)]
        for r in stages.itertuples()
    ]
    err = (
        f'<div style="color:#c62828;white-space:pre-wrap">{html.escape(run.error)}</div>' if run.error else ""
    )
    fails = (
        (
            f"<div>{len(run.failures)} item(s) dropped under allow_partial_failure: "
            + html.escape("; ".join(f"{f.stage}[{f.item}] {f.error}" for f in run.failures[:5]))
            + "</div>"
        )
        if run.failures
        else ""
    )
    return (
        f'<div class="flowdapt-run" style="{_BOX}"><b style="font-size:14px">Run {html.escape(run.name)}</b> '
        f"{badge(run.state)} "
        f"on {html.escape(str(run.executor))} in {dur}{err}{fails}"
        f"<div>{dag_html(run.definition, dict(zip(stages['stage'], stages['state'])))}</div>"
        f"{_table(['stage', 'state', 'done', 'failed'], rows)}</div>"
    )
