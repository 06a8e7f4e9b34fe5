"""Small bar charts as inline SVG, written by hand (no plotting library, no network).

Every bar is a ``<rect class="bar s-N">`` carrying ``data-series``, ``data-category``
and ``data-value`` and a ``<title>`` tooltip, so that the chart can be read (and
tested) from the DOM; heights are proportional to the values (one scale per chart,
given in the ``data-scale`` attribute of the ``<svg>``: pixels per unit).
Every label is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

PLOT_HEIGHT = 170          # pixels for the tallest tick
TOP = 34                   # room for the legend
LEFT = 52
RIGHT = 16
BAR = 16
BAR_GAP = 3
GROUP_GAP = 22


@dataclass(frozen=True)
class Series:
    name: str
    values: tuple[float, ...]


def nice_step(value: float, ticks: int = 4) -> float:
    """A tick step of 1, 2, 2.5 or 5 times a power of ten, a whole number (the charts count
    things), such that ``ticks`` steps reach ``value``."""
    raw = max(value, 1) / ticks
    if raw <= 1:
        return 1.0
    exp = math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        step = m * 10 ** exp
        if step >= raw and step == int(step):
            return float(step)
    return float(10 ** (exp + 1))  # pragma: no cover


def nice_axis(value: float) -> tuple[float, int]:
    """(top of the y axis, number of ticks): the lowest top at least ``value`` made of 3 to 5 nice
    steps (4 preferred on a tie)."""
    return min(((nice_step(value, n) * n, n) for n in (4, 5, 3)), key=lambda t: (t[0], t[1] != 4))


def nice_max(value: float) -> float:
    return nice_axis(value)[0]


def _num(v: float) -> str:
    return f"{v:g}" if v != int(v) else f"{int(v)}"


def _fmt(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".")


def grouped_bars(title: str, categories: Sequence[str], series: Sequence[Series], *, ylabel: str,
                 chart_id: str = "") -> Markup:
    """A grouped bar chart: one group per category, one bar per series in each group."""
    ns = max(1, len(series))
    top_value = max([v for s in series for v in s.values] + [0])
    ymax, ticks = nice_axis(top_value)
    scale = PLOT_HEIGHT / ymax
    group_w = ns * BAR + (ns - 1) * BAR_GAP
    plot_w = max(len(categories), 1) * (group_w + GROUP_GAP) + GROUP_GAP
    # the first category's rotated label must not run off the left edge
    left = max(LEFT, int(len(categories[0]) * 6.2 * 0.77) - GROUP_GAP - group_w // 2 + 6) if categories else LEFT
    legend_w = sum(24 + 7 * len(s.name) + 18 for s in series)
    width = left + max(plot_w, legend_w) + RIGHT
    label_room = 18 + int(max([len(c) for c in categories] + [4]) * 6.2 * 0.64)
    height = TOP + PLOT_HEIGHT + label_room
    base_y = TOP + PLOT_HEIGHT
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" '
        f'data-scale="{_fmt(scale)}" data-ymax="{_num(ymax)}"' + (f' id="{escape(chart_id)}"' if chart_id else "")
        + ">",
        f"<title>{escape(title)}</title>",
    ]
    # legend
    x = left
    for k, s in enumerate(series):
        out.append(f'<g class="legend"><rect class="swatch s-{k}" x="{x}" y="10" width="14" height="14"/>'
                   f'<text x="{x + 19}" y="22">{escape(s.name)}</text></g>')
        x += 24 + 7 * len(s.name) + 18
    # grid and y ticks
    for i in range(ticks + 1):
        v = ymax * i / ticks
        y = base_y - v * scale
        out.append(f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{_fmt(y)}" y2="{_fmt(y)}"/>')
        out.append(f'<text class="tick" x="{left - 6}" y="{_fmt(y + 4)}" text-anchor="end">{_num(v)}</text>')
    out.append(f'<text class="ylabel" transform="translate(14 {base_y - PLOT_HEIGHT / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(ylabel)}</text>')
    out.append(f'<line class="axis" x1="{left}" x2="{left + plot_w}" y1="{base_y}" y2="{base_y}"/>')
    # bars
    for c, cat in enumerate(categories):
        gx = left + GROUP_GAP + c * (group_w + GROUP_GAP)
        for k, s in enumerate(series):
            v = s.values[c] if c < len(s.values) else 0
            h = v * scale
            bx = gx + k * (BAR + BAR_GAP)
            out.append(
                f'<rect class="bar s-{k}" x="{bx}" y="{_fmt(base_y - h)}" width="{BAR}" height="{_fmt(h)}" '
                f'data-series="{escape(s.name)}" data-category="{escape(cat)}" data-value="{_num(v)}">'
                f"<title>{escape(cat)}, {escape(s.name)}: {_num(v)}</title></rect>")
            out.append(f'<text class="val" x="{bx + BAR / 2}" y="{_fmt(base_y - h - 3)}" '
                       f'text-anchor="middle">{_num(v)}</text>')
        lx = gx + group_w / 2
        out.append(f'<text class="cat" transform="translate({_fmt(lx + 4)} {base_y + 10}) rotate(-40)" '
                   f'text-anchor="end">{escape(cat)}</text>')
    out.append("</svg>")
    return Markup("\n".join(out))


__all__ = ["Series", "grouped_bars", "nice_max", "nice_step"]
