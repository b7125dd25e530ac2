"""Self-contained static HTML pages and SVG plots: the building blocks of every report visalign writes.

`write_html_report(path, title, sections)` writes one page (images embedded as base64 PNG, no scripts, nothing
loaded from elsewhere); a `Section` holds paragraphs, a table, a `Plot` (`bar_plot`, `line_plot`) and an image grid
of `GridRow`s whose `GridCell`s carry ✓/✗ `Mark`s. The bench and compare reports (`visalign.benchmarks.report`),
`visalign demo` and the reward-hacking monitor (`visalign.monitor`) all build on these; nothing here knows about
prompt sets, judges or scores.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from visalign.files import to_pil

# ---------------------------------------------------------------------------------------------------------------
# SVG plots


@dataclass(frozen=True)
class Plot:
    """An SVG figure made by `bar_plot` or `line_plot` (its text already escaped)."""

    svg: str


_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#9c755f", "#edc948")


def _text(x: float, y: float, s: str, anchor: str = "middle", size: int = 11, extra: str = "") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {extra}>{html.escape(str(s))}</text>'
    )


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi] in about `n` steps."""
    hi = hi if hi > lo else lo + 1
    raw = (hi - lo) / n
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    start, stop = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return [start + i * step for i in range(round((stop - start) / step) + 1)]


def _svg_open(width: float, height: float, title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" font-family="sans-serif">',
        _text(width / 2, 16, title, size=13),
    ]


def _y_axis(ticks: Sequence[float], y: Any, left: float, right: float, label: str, mid: float) -> list[str]:
    out = []
    for t in ticks:
        out.append(f'<line x1="{left}" x2="{right:.1f}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#ddd"/>')
        out.append(_text(left - 4, y(t) + 4, f"{t:.4g}", "end", 10))
    return out + [_text(14, mid, label, extra=f'transform="rotate(-90 14 {mid:.1f})"')]


def _legend(names: Sequence[str], x: float, y: float) -> list[str]:
    """Color keys stacked at (x, y), to the right of the plot area; nothing for a single series."""
    if len(names) < 2:
        return []
    out = []
    for i, name in enumerate(names):
        out.append(f'<rect x="{x:.1f}" y="{y + 14 * i:.1f}" width="10" height="10" fill="{_PALETTE[i % 8]}"/>')
        out.append(_text(x + 14, y + 9 + 14 * i, name, "start", 10))
    return out


def _legend_width(names: Sequence[str]) -> float:
    return 30 + 6 * max(len(n) for n in names) if len(names) > 1 else 0


def bar_plot(
    series: dict[str, dict[str, float | None]],
    *,
    intervals: dict[str, dict[str, Sequence[float] | None]] | None = None,
    title: str = "",
    ylabel: str = "",
    ymax: float | None = None,
) -> Plot:
    """Grouped bars: `series` maps a series name (e.g. "before") to {category: value}; optional error bars
    `intervals` in the same layout ({series: {category: (low, high)}}); the y axis starts at 0."""
    names = list(series)
    cats = list(dict.fromkeys(c for s in series.values() for c in s))
    if not cats:
        raise ValueError("`series` has no values")
    tops = [v for s in series.values() for v in s.values() if v is not None]
    tops += [ci[1] for s in (intervals or {}).values() for ci in s.values() if ci is not None]
    ticks = _ticks(0, ymax if ymax is not None else max(tops + [1e-9]))
    top = ticks[-1]
    bar, gap, left, plot_h, top_pad = 14, 12, 56, 200, 36
    group_w = bar * len(names) + gap
    plot_w = 10 + group_w * len(cats)
    width = max(left + plot_w + 10 + _legend_width(names), 7 * len(title) + 20)
    height = top_pad + plot_h + 16 + 4.2 * max(len(c) for c in cats)
    y = lambda v: top_pad + plot_h * (1 - min(max(v, 0), top) / top)  # noqa: E731
    out = _svg_open(width, height, title) + _y_axis(ticks, y, left, left + plot_w, ylabel, top_pad + plot_h / 2)
    for i, cat in enumerate(cats):
        x0 = left + 10 + i * group_w
        for k, name in enumerate(names):
            v = series[name].get(cat)
            if v is None:
                continue
            x = x0 + k * bar
            out.append(
                f'<rect x="{x}" y="{y(v):.1f}" width="{bar - 2}" height="{y(0) - y(v):.1f}" '
                f'fill="{_PALETTE[k % 8]}"><title>{html.escape(f"{name} {cat}: {v:.4g}")}</title></rect>'
            )
            ci = (intervals or {}).get(name, {}).get(cat)
            if ci is not None:
                cx = x + (bar - 2) / 2
                out.append(f'<line x1="{cx}" x2="{cx}" y1="{y(ci[0]):.1f}" y2="{y(ci[1]):.1f}" stroke="#222"/>')
        lx, ly = x0 + (group_w - gap) / 2, top_pad + plot_h + 12
        out.append(_text(lx, ly, cat, "end", 10, f'transform="rotate(-40 {lx:.1f} {ly:.1f})"'))
    out += _legend(names, left + plot_w + 10, top_pad)
    return Plot("\n".join(out + ["</svg>"]))


def line_plot(
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    markers: Sequence[tuple[float, float, str]] = (),
) -> Plot:
    """Lines: `series` maps a name to `(x, y)` points (e.g. reward per training step); non-finite points are
    skipped. `markers` are labelled `(x, y, label)` points (e.g. a goal), drawn as hollow diamonds with dashed
    guides to both axes and kept inside the axes' range."""
    clean = {name: [(a, b) for a, b in pts if math.isfinite(a) and math.isfinite(b)] for name, pts in series.items()}
    if not all(math.isfinite(a) and math.isfinite(b) for a, b, _ in markers):
        raise ValueError(f"`markers` must be finite (x, y, label) points, got {list(markers)}")
    points = [p for pts in clean.values() for p in pts]
    if not points:
        raise ValueError("`series` has no finite points")
    points += [(a, b) for a, b, _ in markers]
    xt = _ticks(min(p[0] for p in points), max(p[0] for p in points))
    yt = _ticks(min(p[1] for p in points), max(p[1] for p in points))
    left, plot_w, top_pad, plot_h = 64, 440, 30, 220
    width, height = left + plot_w + 20 + _legend_width(list(clean)), top_pad + plot_h + 50
    px = lambda v: left + plot_w * (v - xt[0]) / (xt[-1] - xt[0])  # noqa: E731
    py = lambda v: top_pad + plot_h * (1 - (v - yt[0]) / (yt[-1] - yt[0]))  # noqa: E731
    out = _svg_open(width, height, title) + _y_axis(yt, py, left, left + plot_w, ylabel, top_pad + plot_h / 2)
    out += [_text(px(t), top_pad + plot_h + 14, f"{t:.4g}", size=10) for t in xt]
    out.append(_text(left + plot_w / 2, top_pad + plot_h + 36, xlabel))
    for k, (name, pts) in enumerate(clean.items()):
        coords = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in pts)
        out.append(
            f'<polyline points="{coords}" fill="none" stroke="{_PALETTE[k % 8]}" stroke-width="2">'
            f"<title>{html.escape(name)}</title></polyline>"
        )
    for a, b, label in markers:
        x, y = px(a), py(b)
        guide = 'stroke="#888" stroke-dasharray="4 3"'
        out.append(f'<line x1="{left}" x2="{x:.1f}" y1="{y:.1f}" y2="{y:.1f}" {guide}/>')
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y:.1f}" y2="{top_pad + plot_h}" {guide}/>')
        out.append(
            f'<path d="M{x:.1f},{y - 6:.1f} L{x + 6:.1f},{y:.1f} L{x:.1f},{y + 6:.1f} L{x - 6:.1f},{y:.1f} Z" '
            f'fill="none" stroke="#222" stroke-width="1.5"><title>{html.escape(label)}</title></path>'
        )
        right_half = x > left + plot_w / 2
        out.append(_text(x - 8 if right_half else x + 8, y - 8, label, "end" if right_half else "start", 10))
    out += _legend(list(clean), left + plot_w + 20, top_pad)
    return Plot("\n".join(out + ["</svg>"]))


# ---------------------------------------------------------------------------------------------------------------
# HTML


@dataclass
class Mark:
    """A pass/fail mark under an image: `passed` True (✓), False (✗) or None (not judged)."""

    label: str
    passed: bool | None
    reason: str = ""


@dataclass
class GridCell:
    """An image (`Tensor` `[3, H, W]` in [0, 1], PIL image, PNG bytes or a file path; None = missing) and marks."""

    image: Any
    marks: Sequence[Mark] = ()
    caption: str = ""


@dataclass
class GridRow:
    prompt: str
    cells: Sequence[GridCell]
    note: str = ""


@dataclass
class Section:
    """A report section: paragraphs, then a table (`columns` + `rows`), a plot, and an image grid."""

    title: str
    paragraphs: Sequence[str] = ()
    columns: Sequence[str] = ()
    rows: Sequence[Sequence[Any]] = ()
    plot: Plot | None = None
    grid: Sequence[GridRow] = ()
    grid_columns: Sequence[str] = field(default_factory=tuple)


def image_data_url(image: Any, max_side: int = 256) -> str:
    """A `data:image/png;base64,...` URL of `image`, downscaled so its longer side is at most `max_side`."""
    if isinstance(image, torch.Tensor):
        pil = to_pil(image)
    elif isinstance(image, Image.Image):
        pil = image.convert("RGB")
    elif isinstance(image, bytes):
        pil = Image.open(io.BytesIO(image)).convert("RGB")
    elif isinstance(image, (str, Path)):
        pil = Image.open(image).convert("RGB")
    else:
        raise ValueError(f"`image` must be a tensor, PIL image, PNG bytes or path, got {type(image).__name__}")
    if max(pil.size) > max_side:
        pil.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 13px; }
th { background: #f3f3f3; }
.grid td { vertical-align: top; }
.prompt { max-width: 320px; font-size: 13px; }
.prompt small { color: #666; }
img { image-rendering: pixelated; display: block; }
.mark { display: inline-block; font-size: 11px; padding: 0 4px; margin: 1px; border-radius: 3px; }
.pass { background: #d4edda; } .fail { background: #f8d7da; } .none { background: #e2e3e5; }
details { font-size: 11px; max-width: 260px; }
"""


def _cell_html(cell: GridCell, max_side: int) -> str:
    e = html.escape
    if cell.image is None:
        body = '<div class="mark none">missing</div>'
    else:
        try:
            url = image_data_url(cell.image, max_side)
        except (OSError, SyntaxError, ValueError) as error:  # a truncated or damaged file: say so, draw the rest
            url = None
            body = f'<div class="mark none" title="{e(str(error))}">unreadable</div>'
        if url is not None:
            body = f'<img src="{url}" width="{max(96, min(max_side, 160))}" alt="{e(cell.caption)}">'
    symbol = {True: ("✓", "pass"), False: ("✗", "fail"), None: ("–", "none")}
    marks = "".join(
        f'<span class="mark {symbol[m.passed][1]}" title="{e(m.reason)}">{symbol[m.passed][0]} {e(m.label)}</span>'
        for m in cell.marks
    )
    reasons = "".join(f"<li>{e(m.label)}: {e(m.reason)}</li>" for m in cell.marks if m.reason)
    details = f"<details><summary>reasons</summary><ul>{reasons}</ul></details>" if reasons else ""
    caption = f"<div><small>{e(cell.caption)}</small></div>" if cell.caption else ""
    return f"<td>{body}{caption}<div>{marks}</div>{details}</td>"


def _section_html(section: Section, max_side: int) -> str:
    e = html.escape
    out = [f"<h2>{e(section.title)}</h2>"] + [f"<p>{e(p)}</p>" for p in section.paragraphs]
    if section.columns:
        out.append("<table><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in section.columns) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in section.rows]
        out.append("</table>")
    if section.plot is not None:
        if not isinstance(section.plot, Plot):
            raise ValueError(f"`plot` must be a Plot from bar_plot/line_plot, got {type(section.plot).__name__}")
        out.append(f"<div>{section.plot.svg}</div>")
    if section.grid:
        out.append('<table class="grid">')
        if section.grid_columns:
            out.append("<tr><th>Prompt</th>" + "".join(f"<th>{e(c)}</th>" for c in section.grid_columns) + "</tr>")
        for row in section.grid:
            note = f"<br><small>{e(row.note)}</small>" if row.note else ""
            out.append(
                f'<tr><td class="prompt">{e(row.prompt)}{note}</td>'
                + "".join(_cell_html(c, max_side) for c in row.cells)
                + "</tr>"
            )
        out.append("</table>")
    return "\n".join(out)


def write_html_report(
    path: str | Path, title: str, sections: Sequence[Section], *, subtitle: str = "", max_side: int = 256
) -> Path:
    """Write a self-contained static HTML report and return its path.

    Args:
        path: the `.html` file to write (parent folders are created).
        title: the page title; `subtitle` a line under it.
        sections: `Section(title, paragraphs=(), columns=(), rows=(), plot=None, grid=(), grid_columns=())`, in
            order. A table is `columns` (header strings) plus `rows` (lists of values, shown with `str`). `plot` is a
            `Plot` from `bar_plot(series, intervals=..., title=..., ylabel=...)` or `line_plot(series, ...)`.
            `grid` is a list of `GridRow(prompt, cells, note="")`, one per prompt, whose `cells` are
            `GridCell(image, marks=(Mark(label, passed, reason), ...), caption="")`; `grid_columns` names the
            columns (e.g. `["before", "after"]` or image ids). Images are tensors `[3, H, W]` in [0, 1], PIL
            images, PNG bytes or paths; they are embedded as base64 PNG, downscaled to at most `max_side` pixels.
        max_side: the longest embedded image side.

    Every prompt, caption, label, reason and table value is HTML-escaped; the page has no scripts and loads nothing.
    """
    body = [f"<h1>{html.escape(title)}</h1>"] + ([f"<p>{html.escape(subtitle)}</p>"] if subtitle else [])
    body += [_section_html(s, max_side) for s in sections]
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
