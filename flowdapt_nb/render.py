"""HTML and text views of executors, workflows and runs, for nbconvert, nbviewer and terminals."""

from __future__ import annotations

import html

STATE_COLOURS = {"pending": "#9e9e9e", "queued": "#9e9e9e", "running": "#1e88e5", "finished": "#43a047",
                 "failed": "#e53935", "cancelled": "#fb8c00", "skipped": "#bdbdbd"}


def _badge(state: str) -> str:
    colour = STATE_COLOURS.get(state, "#757575")
    return (f'<span style="background:{colour};color:white;border-radius:3px;padding:1px 6px;'
            f'font-size:90%">{html.escape(state)}</span>')


def executor_html(ex) -> str:
    info = ex.info()
    dash = info.get("dashboard_url")
    link = f'<a href="{html.escape(dash)}" target="_blank">{html.escape(dash)}</a>' if dash else "none"
    totals = ", ".join(f"{k}: {v:g}" for k, v in info["resources"].items()) or "-"
    return (f'<div class="flowdapt-executor"><b>{type(ex).__name__}</b> {_badge(info["state"])}'
            f'<table><tr><td>kind</td><td>{info["kind"]}</td></tr>'
            f'<tr><td>address</td><td>{html.escape(str(info["address"] or "-"))}</td></tr>'
            f'<tr><td>dashboard</td><td>{link}</td></tr>'
            f'<tr><td>workers</td><td>{len(info["workers"])}</td></tr>'
            f'<tr><td>resources</td><td>{html.escape(totals)}</td></tr></table></div>')


def workflow_html(wf) -> str:
    from .dag import dag_svg
    rows = "".join(f"<tr><td>{html.escape(s.name)}</td><td><code>{html.escape(s.target_name())}</code></td>"
                   f"<td>{s.type}</td><td>{html.escape(', '.join(s.depends_on))}</td></tr>" for s in wf.stages)
    return (f'<div class="flowdapt-workflow"><b>Workflow {html.escape(wf.name)}</b>'
            f'<div>{dag_svg(wf)}</div><table><tr><th>stage</th><th>target</th><th>type</th>'
            f'<th>depends on</th></tr>{rows}</table></div>')


def run_html(run) -> str:
    dur = f"{run.duration:.2f} s" if run.duration is not None else "-"
    stages = run.stages
    rows = "".join(f"<tr><td>{html.escape(r.stage)}</td><td>{_badge(r.state)}</td><td>{r.finished}/{r.tasks}</td>"
                   f"<td>{r.failed}</td></tr>" for r in stages.itertuples())
    err = f"<div style='color:#e53935'>{html.escape(run.error)}</div>" if run.error else ""
    fails = (f"<div>{len(run.failures)} item(s) dropped under allow_partial_failure: "
             + html.escape("; ".join(f"{f.stage}[{f.item}] {f.error}" for f in run.failures[:5]))
             + "</div>") if run.failures else ""
    return (f'<div class="flowdapt-run"><b>Run {html.escape(run.name)}</b> {_badge(run.state)} '
            f'on {run.executor} in {dur}{err}{fails}<table><tr><th>stage</th><th>state</th>'
            f'<th>done</th><th>failed</th></tr>{rows}</table></div>')
