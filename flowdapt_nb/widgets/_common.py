"""What every widget shares: the style sheet, number formats, gauges and sparklines drawn as
HTML/SVG text in Python, the base class that subscribes to an executor's event stream, and
``inline_styles``, which turns the widgets' class-styled HTML into the inline-styled HTML that a
saved, untrusted notebook (JupyterLab's sanitizer, GitHub, nbviewer) still shows styled."""

from __future__ import annotations

import base64
import html
import threading
import time
from html.parser import HTMLParser

import ipywidgets as widgets

from ..states import COLOURS as STATE_COLOURS
from ..units import fmt_duration  # noqa: F401  (the widgets write durations with it)

THROTTLE = 0.1  # seconds between redraws: at most ~10 a second

COLOURS = STATE_COLOURS  # one palette: flowdapt_nb.states

CSS = """
<style>
.fnb{font-family:var(--jp-ui-font-family,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif);
 font-size:12.5px;line-height:1.45;color:var(--jp-ui-font-color1,#1f2328);white-space:normal}
.fnb *{box-sizing:border-box}
.fnb-panel,.fnb-box{border:1px solid var(--jp-border-color2,#e0e3e7);border-radius:8px;padding:10px 14px;
 background:var(--jp-layout-color1,#fff);margin:4px 0;min-width:0;overflow-x:auto}
.fnb-box .widget-html-content{line-height:1.45}
.fnb-box > .widget-hbox{margin:2px 0}
.fnb-head{display:flex;align-items:center;gap:10px;flex-wrap:wrap;margin-bottom:8px}
.fnb-title{font-weight:600;font-size:14px}
.fnb-sub{font-weight:600;font-size:11px;text-transform:uppercase;letter-spacing:.05em;
 color:var(--jp-ui-font-color2,#6a737d);margin:10px 0 4px}
.fnb-muted{color:var(--jp-ui-font-color2,#6a737d)}
.fnb-spacer{flex:1}
.fnb-badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:10.5px;line-height:18px;color:#fff;
 font-weight:600;text-transform:uppercase;letter-spacing:.04em;white-space:nowrap}
.fnb-stats{display:flex;gap:22px;flex-wrap:wrap;margin:2px 0 8px}
.fnb-stat{display:flex;flex-direction:column}
.fnb-stat b{font-size:18px;font-weight:600;font-variant-numeric:tabular-nums;line-height:1.2}
.fnb-stat span{font-size:10.5px;text-transform:uppercase;letter-spacing:.05em;color:var(--jp-ui-font-color2,#6a737d)}
.fnb-table{border-collapse:collapse;width:100%}
.fnb-table th{text-align:left;font-weight:600;font-size:10.5px;text-transform:uppercase;letter-spacing:.04em;
 color:var(--jp-ui-font-color2,#6a737d);border-bottom:1px solid var(--jp-border-color2,#e0e3e7);padding:3px 8px}
.fnb-table td{padding:4px 8px;border-bottom:1px solid var(--jp-border-color3,#f0f2f4);vertical-align:middle;
 white-space:nowrap}
.fnb-table tr:last-child td{border-bottom:none}
.fnb-num{text-align:right;font-variant-numeric:tabular-nums}
.fnb-mono{font-family:var(--jp-code-font-family,SFMono-Regular,Menlo,Consolas,monospace);font-size:11.5px}
.fnb-bar{display:flex;height:12px;border-radius:6px;overflow:hidden;background:var(--jp-layout-color3,#eceff1);
 min-width:180px;width:100%}
.fnb-seg{height:100%;transition:width .25s ease}
.fnb-seg-done{background:#43a047}.fnb-seg-failed{background:#e53935}.fnb-seg-cancelled{background:#fb8c00}
.fnb-seg-queued{background:#b0bec5}
.fnb-seg-running{background:repeating-linear-gradient(135deg,#1e88e5 0 6px,#64b5f6 6px 12px);
 background-size:17px 17px;animation:fnb-stripes 1s linear infinite}
@keyframes fnb-stripes{from{background-position:0 0}to{background-position:17px 0}}
.fnb-legend{display:flex;gap:14px;font-size:11px;color:var(--jp-ui-font-color2,#6a737d);margin-top:4px}
.fnb-dot{display:inline-block;width:9px;height:9px;border-radius:2px;margin-right:4px;vertical-align:-1px}
.fnb-err{color:#c62828}
.fnb-ok{color:#2e7d32}
.fnb-pre{font-family:var(--jp-code-font-family,monospace);font-size:11.5px;white-space:pre-wrap;
 background:var(--jp-layout-color2,#f6f8fa);border:1px solid var(--jp-border-color2,#e0e3e7);border-left:3px solid #e53935;
 border-radius:4px;padding:8px 10px;margin:4px 0;max-height:320px;overflow:auto}
.fnb-gauge{display:flex;align-items:center;gap:6px}
.fnb-gauge-track{position:relative;width:90px;height:8px;border-radius:4px;background:var(--jp-layout-color3,#eceff1);
 overflow:hidden;flex:none}
.fnb-gauge-fill{position:absolute;left:0;top:0;bottom:0;border-radius:4px}
.fnb-gauge-text{font-variant-numeric:tabular-nums;min-width:86px}
.fnb-spark{display:block;margin-top:3px}
.fnb-cell{display:flex;flex-direction:column}
.fnb-res{display:inline-flex;align-items:center;gap:4px;margin-right:10px}
.fnb-kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px}
.fnb-kv span:nth-child(odd){color:var(--jp-ui-font-color2,#6a737d)}
.fnb-link{color:var(--jp-brand-color1,#1976d2);text-decoration:none;font-weight:600}
.fnb-link:hover{text-decoration:underline}
.fnb-empty{color:var(--jp-ui-font-color2,#6a737d);font-style:italic;padding:6px 0}
.fnb-stage-error{color:#c62828;font-size:11.5px}
.fnb-dag svg{max-width:100%;height:auto}
</style>
"""  # noqa: E501  (one CSS rule runs long; the text is saved in the tutorials' outputs, so it stays as is)


def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def badge(state: str | None, text: str | None = None) -> str:
    state = state or "pending"
    colour = COLOURS.get(state, "#757575")
    return f'<span class="fnb-badge" style="background:{colour}">{esc(text or state)}</span>'


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def fmt_amount(name: str, value: float | None) -> str:
    """A logical resource amount: bytes for memory-like ones, else a short number."""
    if value is None:
        return "–"
    if "memory" in name.lower():
        return fmt_bytes(value)
    return f"{value:g}" if float(value).is_integer() else f"{value:.2f}"


def fmt_rate(rate: float | None) -> str:
    if not rate:
        return "–"
    if rate >= 10:
        return f"{rate:.0f}/s"
    if rate >= 1:
        return f"{rate:.1f}/s"
    return f"{rate * 60:.1f}/min"


def level_colour(frac: float | None) -> str:
    if frac is None:
        return "#90a4ae"
    if frac < 0.6:
        return "#43a047"
    if frac < 0.85:
        return "#fb8c00"
    return "#e53935"


def gauge(frac: float | None, text: str, colour: str | None = None) -> str:
    """A small horizontal gauge with its value as text (coloured by level unless ``colour``)."""
    width = 0 if frac is None else max(0.0, min(1.0, frac)) * 100
    return (
        f'<div class="fnb-gauge"><div class="fnb-gauge-track"><div class="fnb-gauge-fill" '
        f'style="width:{width:.1f}%;background:{colour or level_colour(frac)}"></div></div>'
        f'<span class="fnb-gauge-text">{esc(text)}</span></div>'
    )


def sparkline(
    points: list[tuple[float, float]],
    t0: float,
    t1: float,
    vmax: float | None = None,
    width: int = 120,
    height: int = 26,
    colour: str = "#1e88e5",
) -> str:
    """An SVG sparkline of ``(time, value)`` points over the window ``[t0, t1]``."""
    pts = [(t, v) for t, v in points if v is not None and t >= t0]
    if not pts:
        return (
            f'<svg class="fnb-spark" width="{width}" height="{height}"><line x1="0" y1="{height - 1}" '
            f'x2="{width}" y2="{height - 1}" stroke="#cfd8dc" stroke-dasharray="2,3"/></svg>'
        )
    top = vmax if vmax else max(v for _, v in pts) or 1.0
    span = max(t1 - t0, 1e-9)

    def xy(t, v):
        x = (t - t0) / span * (width - 2) + 1
        y = height - 2 - max(0.0, min(1.0, v / top)) * (height - 4)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(t, v) for t, v in pts)
    first_x = (pts[0][0] - t0) / span * (width - 2) + 1
    last_x = (pts[-1][0] - t0) / span * (width - 2) + 1
    area = f"{first_x:.1f},{height - 1} {line} {last_x:.1f},{height - 1}"
    last = xy(*pts[-1]).split(",")
    return (
        f'<svg class="fnb-spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f'<polygon points="{area}" fill="{colour}" fill-opacity="0.15"/>'
        f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.5" '
        f'stroke-linejoin="round"/><circle cx="{last[0]}" cy="{last[1]}" r="2" fill="{colour}"/></svg>'
    )


def stacked_bar(counts: dict, total: int) -> str:
    """A progress bar of done / failed / cancelled / running / queued segments."""
    if total <= 0:
        return '<div class="fnb-bar"></div>'
    segs = []
    for key in ("done", "failed", "cancelled", "running", "queued"):
        n = counts.get(key, 0)
        if n:
            segs.append(
                f'<div class="fnb-seg fnb-seg-{key}" style="width:{n / total * 100:.2f}%" '
                f'title="{n} {key}"></div>'
            )
    return f'<div class="fnb-bar">{"".join(segs)}</div>'


def legend() -> str:
    items = [("done", "#43a047"), ("running", "#1e88e5"), ("failed", "#e53935"), ("queued", "#b0bec5")]
    return (
        '<div class="fnb-legend">'
        + "".join(f'<span><span class="fnb-dot" style="background:{c}"></span>{k}</span>' for k, c in items)
        + "</div>"
    )


def ago(t: float | None, now: float | None = None) -> str:
    if t is None:
        return "–"
    delta = max(0.0, (now or time.time()) - t)
    if delta < 1:
        return "now"
    if delta < 60:
        return f"{delta:.0f} s ago"
    return f"{delta / 60:.0f} min ago"


def clock(t: float | None) -> str:
    """A moment as the kernel's local wall-clock time (``14:03:27``): what an ended run's rows
    show, since "3 s ago" is wrong as soon as nothing redraws it (a saved notebook, a run that
    ended an hour ago)."""
    return "–" if t is None else time.strftime("%H:%M:%S", time.localtime(t))


def style_widget() -> widgets.HTML:
    """The style sheet, carried by a hidden HTML widget inside each top-level widget."""
    return widgets.HTML(CSS, layout=widgets.Layout(display="none"))


def html_widget(**layout) -> widgets.HTML:
    return widgets.HTML("", layout=widgets.Layout(width="100%", **layout))


class FeedWidget(widgets.VBox):
    """A VBox that draws from an executor's event stream.

    Subclasses call ``_subscribe(executor, kinds)`` and implement ``_on_events(batch)``; batches
    arrive throttled from the bus's dispatcher thread (or from ``events.flush()``), and drawing is
    serialised by a lock. ``close()`` unsubscribes. ``_repr_html_`` and ``__repr__`` give the
    static views for nbconvert and terminals.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._draw_lock = threading.RLock()
        self._subscriptions: list[tuple] = []
        self._closed = False

    def _subscribe(self, executor, kinds, throttle: float = THROTTLE) -> None:
        token = executor.events.subscribe(self._deliver, kinds=kinds, throttle=throttle)
        self._subscriptions.append((executor, token))

    def _unsubscribe_all(self) -> None:
        for executor, token in self._subscriptions:
            try:
                executor.events.unsubscribe(token)
            except Exception:
                pass
        self._subscriptions = []

    def _deliver(self, batch) -> None:
        if self._closed:
            return
        if not isinstance(batch, list):
            batch = [batch]
        with self._draw_lock:
            if not self._closed:
                self._on_events(batch)

    def _on_events(self, batch: list) -> None:  # pragma: no cover - subclasses
        raise NotImplementedError

    def close(self) -> None:
        """Stop following the executor and close the widget's views."""
        self._closed = True
        self._unsubscribe_all()
        for child in list(self.children):
            _close_tree(child)
        super().close()

    def _repr_mimebundle_(self, **kwargs):
        data = super()._repr_mimebundle_(**kwargs)
        if data is not None:
            data["text/plain"] = repr(self)
        return data

    def _repr_html_(self) -> str:
        # inline styles only: a saved notebook opened untrusted drops <style> blocks and <svg>
        return inline_styles('<div class="fnb">' + self._static_html() + "</div>")

    def _static_html(self) -> str:
        """The widget as static HTML (for nbconvert, nbviewer): its inner HTML in a panel."""
        return '<div class="fnb-panel">' + self._inner_html() + "</div>"

    def _inner_html(self) -> str:  # pragma: no cover - subclasses
        return ""


def _close_tree(widget) -> None:
    for child in list(getattr(widget, "children", ()) or ()):
        _close_tree(child)
    try:
        widget.close()
    except Exception:
        pass


# --- sanitizer-safe static HTML ------------------------------------------------------------------
# A saved notebook that is not trusted (a fresh clone) is sanitized: <style> blocks and inline
# <svg> are dropped, inline ``style`` attributes with plain values (no var()) and tables survive.
# So the static views carry every class's look as inline styles, written out here once.
_MUTED = "color:#6a737d"
_FONT = "font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif"
_MONO = "font-family:SFMono-Regular,Menlo,Consolas,monospace;font-size:11.5px"
CLASS_STYLES = {
    "fnb": f"{_FONT};font-size:12.5px;line-height:1.45;color:#1f2328;white-space:normal",
    "fnb-panel": "border:1px solid #e0e3e7;border-radius:8px;padding:10px 14px;background:#ffffff;margin:4px 0;"
    "overflow-x:auto",
    "fnb-box": "border:1px solid #e0e3e7;border-radius:8px;padding:10px 14px;background:#ffffff;margin:4px 0",
    "fnb-head": "display:flex;align-items:center;gap:10px;flex-wrap:wrap;margin-bottom:8px",
    "fnb-title": "font-weight:600;font-size:14px",
    "fnb-sub": "font-weight:600;font-size:11px;text-transform:uppercase;letter-spacing:0.05em;color:#6a737d;"
    "margin:10px 0 4px",
    "fnb-muted": _MUTED,
    "fnb-spacer": "flex:1",
    "fnb-badge": "display:inline-block;border-radius:10px;padding:0 8px;font-size:10.5px;line-height:18px;"
    "color:#ffffff;font-weight:600;text-transform:uppercase;letter-spacing:0.04em;white-space:nowrap",
    "fnb-stats": "display:flex;gap:22px;flex-wrap:wrap;margin:2px 0 8px",
    "fnb-stat": "display:flex;flex-direction:column",
    "fnb-table": "border-collapse:collapse;width:100%",
    "fnb-num": "text-align:right",
    "fnb-mono": _MONO,
    "fnb-bar": "display:flex;height:12px;border-radius:6px;overflow:hidden;background:#eceff1;min-width:180px;"
    "width:100%",
    "fnb-seg": "height:100%",
    "fnb-seg-done": "background:#43a047",
    "fnb-seg-failed": "background:#e53935",
    "fnb-seg-cancelled": "background:#fb8c00",
    "fnb-seg-queued": "background:#b0bec5",
    "fnb-seg-running": "background:#1e88e5",
    "fnb-legend": "display:flex;gap:14px;font-size:11px;color:#6a737d;margin-top:4px",
    "fnb-dot": "display:inline-block;width:9px;height:9px;border-radius:2px;margin-right:4px;vertical-align:-1px",
    "fnb-err": "color:#c62828",
    "fnb-ok": "color:#2e7d32",
    "fnb-pre": "font-family:SFMono-Regular,Menlo,Consolas,monospace;font-size:11.5px;white-space:pre-wrap;"
    "background:#f6f8fa;border:1px solid #e0e3e7;border-left:3px solid #e53935;border-radius:4px;"
    "padding:8px 10px;margin:4px 0;max-height:320px;overflow:auto",
    "fnb-gauge": "display:flex;align-items:center;gap:6px",
    "fnb-gauge-track": "position:relative;width:90px;height:8px;border-radius:4px;background:#eceff1;"
    "overflow:hidden;flex:none",
    "fnb-gauge-fill": "position:absolute;left:0;top:0;bottom:0;border-radius:4px",
    "fnb-gauge-text": "min-width:86px",
    "fnb-cell": "display:flex;flex-direction:column",
    "fnb-res": "display:inline-flex;align-items:center;gap:4px;margin-right:10px",
    "fnb-kv": "display:grid;grid-template-columns:max-content 1fr;gap:2px 14px",
    "fnb-link": "color:#1976d2;text-decoration:none;font-weight:600",
    "fnb-empty": "color:#6a737d;font-style:italic;padding:6px 0",
    "fnb-stage-error": "color:#c62828;font-size:11.5px",
}
# (ancestor class, tag): the style sheet's descendant rules
DESCENDANT_STYLES = {
    ("fnb-table", "th"): "text-align:left;font-weight:600;font-size:10.5px;text-transform:uppercase;"
    "letter-spacing:0.04em;color:#6a737d;border-bottom:1px solid #e0e3e7;padding:3px 8px",
    (
        "fnb-table",
        "td",
    ): "text-align:left;padding:4px 8px;border-bottom:1px solid #f0f2f4;vertical-align:middle;"
    "white-space:nowrap",
    ("fnb-stat", "b"): "font-size:18px;font-weight:600;line-height:1.2",
    ("fnb-stat", "span"): "font-size:10.5px;text-transform:uppercase;letter-spacing:0.05em;color:#6a737d",
}
_DROPPED = {"svg", "style", "script"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Inliner(HTMLParser):
    """Rewrites HTML: each element gets its classes' styles inline (its own ``style`` last, so it
    wins), <style>/<script> are dropped, and <svg> too, or replaced by its ``data-fallback`` HTML."""

    def __init__(self):
        super().__init__(convert_charrefs=False)
        self.out: list[str] = []
        self.stack: list[list] = []  # [classes, tag, children seen]
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        self._start(tag, attrs, closed=False)

    def handle_startendtag(self, tag, attrs):
        self._start(tag, attrs, closed=True)

    def _start(self, tag, attrs, closed):
        if self.skip or tag in _DROPPED:
            fallback = dict(attrs).get("data-fallback") if tag == "svg" and not self.skip else None
            if fallback:  # an SVG that carries its own sanitizer-safe HTML, base64 (dag.dag_svg)
                try:
                    self.out.append(inline_styles(base64.b64decode(fallback).decode()))
                except ValueError:
                    pass
            if not closed and tag not in _VOID:
                self.skip += 1
            return
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        open_classes = {c for entry in self.stack for c in entry[0]}
        # descendant rules first, then the element's own classes (so .fnb-num's right alignment
        # wins over the table cell's left), then its own style attribute
        rules = [css for (anc, t), css in DESCENDANT_STYLES.items() if t == tag and anc in open_classes]
        rules += [CLASS_STYLES[c] for c in classes if c in CLASS_STYLES]
        if self.stack:
            parent = self.stack[-1]
            parent[2] += 1
            if "fnb-kv" in parent[0] and parent[2] % 2:  # the grid's labels (odd children) are muted
                rules.append(_MUTED)
        if attrs.get("style"):
            rules.append(attrs["style"])
        if rules:
            attrs["style"] = ";".join(r.strip().rstrip(";") for r in rules if r.strip())
        text = "".join(
            f' {k}="{html.escape(v, quote=True)}"' if v is not None else f" {k}" for k, v in attrs.items()
        )
        self.out.append(f"<{tag}{text}{' /' if closed else ''}>")
        if not closed and tag not in _VOID:
            self.stack.append([classes, tag, 0])

    def handle_endtag(self, tag):
        if self.skip:
            if tag not in _VOID:
                self.skip -= 1
            return
        if tag in _VOID:
            return
        # close up to the matching open element (tolerates unclosed children)
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][1] == tag:
                del self.stack[i:]
                break
        self.out.append(f"</{tag}>")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)

    def handle_entityref(self, name):
        if not self.skip:
            self.out.append(f"&{name};")

    def handle_charref(self, name):
        if not self.skip:
            self.out.append(f"&#{name};")


def inline_styles(markup: str) -> str:
    """``markup`` with every ``fnb-*`` class's look written into inline ``style`` attributes and
    <style>/<svg> removed: what still reads well after a notebook sanitizer."""
    parser = _Inliner()
    parser.feed(markup)
    parser.close()
    return "".join(parser.out)
