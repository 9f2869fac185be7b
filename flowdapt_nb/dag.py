"""Draw a workflow's DAG from Python (no JavaScript), coloured by stage state: as SVG for live
widgets, and as inline-styled HTML boxes (``dag_html``) for saved outputs, which a notebook
sanitizer keeps (it drops inline <svg>)."""

from __future__ import annotations

import base64
import html

from .states import colour, text_colour

_EMPTY_FILL = "#eceff1"


def layers(wf) -> list[list[str]]:
    """Stages by depth: roots first, each stage one layer below its deepest dependency."""
    depth: dict[str, int] = {}
    stages = {s.name: s for s in wf.stages}

    def d(name, seen=()):
        if name in depth:
            return depth[name]
        deps = [x for x in stages[name].depends_on if x in stages and x not in seen]
        depth[name] = 0 if not deps else 1 + max(d(x, seen + (name,)) for x in deps)
        return depth[name]

    for name in stages:
        d(name)
    out: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for s in wf.stages:
        out[depth[s.name]].append(s.name)
    return out


def dag_svg(
    wf,
    states: dict | None = None,
    errors: dict | None = None,
    box_w: int = 130,
    box_h: int = 34,
    gap_x: int = 30,
    gap_y: int = 40,
) -> str:
    """SVG text of the DAG. ``states`` maps stage name -> state for colours; ``errors`` marks stages."""
    states = states or {}
    errors = errors or {}
    rows = layers(wf)
    width = max((len(r) for r in rows), default=1) * (box_w + gap_x) + gap_x
    height = len(rows) * (box_h + gap_y) + gap_y
    pos: dict[str, tuple[float, float]] = {}
    for level, row in enumerate(rows):
        offset = (width - len(row) * (box_w + gap_x) + gap_x) / 2
        for column, name in enumerate(row):
            pos[name] = (offset + column * (box_w + gap_x), gap_y / 2 + level * (box_h + gap_y))
    # data-fallback: the same DAG as sanitizer-safe HTML, which static views put in the SVG's place
    # (widgets._common.inline_styles), since a saved untrusted notebook drops inline <svg>
    # (base64, so searching the SVG's text finds only what it draws)
    fallback = base64.b64encode(dag_html(wf, states, errors).encode()).decode()
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'font-family="sans-serif" font-size="12" data-fallback="{fallback}">',
        '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto">'
        '<path d="M0,0 L8,4 L0,8 z" fill="#607d8b"/></marker></defs>',
    ]
    stage_by_name = {s.name: s for s in wf.stages}
    for s in wf.stages:
        for dep in s.depends_on:
            if dep in pos and s.name in pos:
                x1, y1 = pos[dep][0] + box_w / 2, pos[dep][1] + box_h
                x2, y2 = pos[s.name][0] + box_w / 2, pos[s.name][1]
                parts.append(
                    f'<line x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" '
                    f'stroke="#607d8b" marker-end="url(#arrow)"/>'
                )
    for name, (x, y) in pos.items():
        state = states.get(name)
        fill = colour(state) if state else _EMPTY_FILL
        ink = text_colour(state) if state else "#263238"
        stroke = "#e53935" if name in errors else "#455a64"
        dash = ' stroke-dasharray="4,2"' if stage_by_name[name].type == "parameterized" else ""
        title = html.escape(errors.get(name) or f"{name}: {state or 'not run'}")
        parts.append(
            f'<g><title>{title}</title><rect x="{x:.0f}" y="{y:.0f}" width="{box_w}" height="{box_h}" '
            f'rx="6" fill="{fill}" stroke="{stroke}" stroke-width="{3 if name in errors else 1.5}"{dash}/>'
            f'<text x="{x + box_w / 2:.0f}" y="{y + box_h / 2 + 4:.0f}" text-anchor="middle" '
            f'fill="{ink}">{html.escape(name[:18])}'
            f"{' [*]' if stage_by_name[name].type == 'parameterized' else ''}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def dag_html(wf, states: dict | None = None, errors: dict | None = None) -> str:
    """The DAG as sanitizer-safe HTML: one table row of boxes per layer (roots first), an arrow
    row between layers, and in each box what it runs after. Only inline styles and a table, so a
    saved, untrusted notebook, GitHub and nbviewer still draw it as boxes."""
    states = states or {}
    errors = errors or {}
    stage_by_name = {s.name: s for s in wf.stages}
    rows = []
    for depth, layer in enumerate(layers(wf)):
        if depth:
            rows.append(
                '<tr><td style="text-align:center;color:#607d8b;font-size:14px;line-height:1;'
                'padding:0">&#8595;</td></tr>'
            )
        boxes = []
        for name in layer:
            stage = stage_by_name[name]
            state = states.get(name)
            fill = colour(state) if state else _EMPTY_FILL
            ink = text_colour(state) if state else "#263238"
            border = (
                "2px solid #e53935"
                if name in errors
                else ("1.5px dashed #455a64" if stage.type == "parameterized" else "1.5px solid #455a64")
            )
            title = html.escape(errors.get(name) or f"{name}: {state or 'not run'}", quote=True)
            after = (
                f'<br><span style="font-size:10px;opacity:0.85">after {html.escape(", ".join(stage.depends_on))}'
                f"</span>"
                if stage.depends_on
                else ""
            )
            boxes.append(
                f'<span class="fnb-dag-box" title="{title}" style="display:inline-block;min-width:96px;'
                f"padding:5px 10px;margin:2px 6px;border:{border};border-radius:6px;background:{fill};"
                f"color:{ink};font-family:sans-serif;font-size:12px;line-height:1.3;text-align:center;"
                f'vertical-align:top"><b>{html.escape(name)}</b>'
                f"{' [*]' if stage.type == 'parameterized' else ''}{after}</span>"
            )
        rows.append(
            f'<tr><td style="text-align:center;padding:2px 0;white-space:nowrap">{"".join(boxes)}</td></tr>'
        )
    return (
        '<table class="fnb-dag-table" style="border-collapse:collapse;margin:4px 0;border:none">'
        + "".join(rows)
        + "</table>"
    )
