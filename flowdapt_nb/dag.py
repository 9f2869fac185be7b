"""Draw a workflow's DAG as SVG from Python (no JavaScript), coloured by stage state."""

from __future__ import annotations

import html

from .render import STATE_COLOURS


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


def dag_svg(wf, states: dict | None = None, errors: dict | None = None, box_w: int = 130,
            box_h: int = 34, gap_x: int = 30, gap_y: int = 40) -> str:
    """SVG text of the DAG. ``states`` maps stage name -> state for colours; ``errors`` marks stages."""
    states = states or {}
    errors = errors or {}
    rows = layers(wf)
    width = max((len(r) for r in rows), default=1) * (box_w + gap_x) + gap_x
    height = len(rows) * (box_h + gap_y) + gap_y
    pos = {}
    for y, row in enumerate(rows):
        offset = (width - len(row) * (box_w + gap_x) + gap_x) / 2
        for x, name in enumerate(row):
            pos[name] = (offset + x * (box_w + gap_x), gap_y / 2 + y * (box_h + gap_y))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'font-family="sans-serif" font-size="12">',
             '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto">'
             '<path d="M0,0 L8,4 L0,8 z" fill="#607d8b"/></marker></defs>']
    stage_by_name = {s.name: s for s in wf.stages}
    for s in wf.stages:
        for dep in s.depends_on:
            if dep in pos and s.name in pos:
                x1, y1 = pos[dep][0] + box_w / 2, pos[dep][1] + box_h
                x2, y2 = pos[s.name][0] + box_w / 2, pos[s.name][1]
                parts.append(f'<line x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" '
                             f'stroke="#607d8b" marker-end="url(#arrow)"/>')
    for name, (x, y) in pos.items():
        state = states.get(name)
        fill = STATE_COLOURS.get(state, "#eceff1") if state else "#eceff1"
        text_colour = "white" if state and state not in ("pending",) else "#263238"
        stroke = "#e53935" if name in errors else "#455a64"
        dash = ' stroke-dasharray="4,2"' if stage_by_name[name].type == "parameterized" else ""
        title = html.escape(errors.get(name) or f"{name}: {state or 'not run'}")
        parts.append(f'<g><title>{title}</title><rect x="{x:.0f}" y="{y:.0f}" width="{box_w}" height="{box_h}" '
                     f'rx="6" fill="{fill}" stroke="{stroke}" stroke-width="{3 if name in errors else 1.5}"{dash}/>'
                     f'<text x="{x + box_w / 2:.0f}" y="{y + box_h / 2 + 4:.0f}" text-anchor="middle" '
                     f'fill="{text_colour}">{html.escape(name[:18])}'
                     f'{" [*]" if stage_by_name[name].type == "parameterized" else ""}</text></g>')
    parts.append("</svg>")
    return "".join(parts)
