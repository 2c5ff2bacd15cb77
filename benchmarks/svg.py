"""Small SVG charts in pure Python (no matplotlib), for the plots of docs/benchmarks.md.

The text of a chart depends only on its data (fixed number formats, no timestamps), so the docs'
plots can be regenerated and compared byte for byte (tests/test_report.py). Two kinds:

* :func:`bars`: horizontal grouped bars, one group per label, one bar per series, on a linear or
  log axis (a missing value leaves its slot empty);
* :func:`scatter`: points of several series on log-log axes, with an optional horizontal
  reference line (e.g. speedup 1).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple
from xml.sax.saxutils import escape

# Colour-blind-safe palette (Okabe-Ito), in series order.
COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
FONT = "font-family=\"DejaVu Sans, Arial, sans-serif\""


def _f(x: float) -> str:
    """A coordinate with one decimal, without a trailing '.0'."""
    s = f"{x:.1f}"
    return s[:-2] if s.endswith(".0") else s


def _num(v: float) -> str:
    """A tick or value label: 3 significant digits, plain notation."""
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _log_ticks(lo: float, hi: float) -> List[float]:
    """1, 2, 5 x powers of ten within [lo, hi] (at least the two ends' decades)."""
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            t = m * 10.0 ** e
            if lo <= t * (1 + 1e-9) and t <= hi * (1 + 1e-9):
                ticks.append(t)
    return ticks


def _lin_ticks(hi: float) -> List[float]:
    step = 10.0 ** math.floor(math.log10(hi))
    for m in (1, 2, 5, 10):
        if hi / (step * m) <= 6:
            step *= m
            break
    n = int(hi / step + 1e-9)
    return [k * step for k in range(n + 1)]


class _Axis:
    """Maps data values to pixels along [p0, p1]."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float, log: bool):
        if log:
            lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
            self.ticks = _log_ticks(lo, hi)
        else:
            self.ticks = _lin_ticks(hi)
            lo, hi = 0.0, self.ticks[-1]
        self.lo, self.hi, self.p0, self.p1, self.log = lo, hi, p0, p1, log

    def __call__(self, v: float) -> float:
        if self.log:
            t = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            t = (v - self.lo) / (self.hi - self.lo)
        return self.p0 + t * (self.p1 - self.p0)


def _text(x, y, s, size=12, anchor="start", extra=""):
    return (f'<text x="{_f(x)}" y="{_f(y)}" font-size="{size}" text-anchor="{anchor}" {FONT}'
            f'{extra}>{escape(s)}</text>')


def _legend(series: Sequence[str], x: float, y: float, marker: str) -> List[str]:
    out = []
    for i, name in enumerate(series):
        c = COLORS[i % len(COLORS)]
        yy = y + 18 * i
        if marker == "rect":
            out.append(f'<rect x="{_f(x)}" y="{_f(yy - 9)}" width="12" height="10" fill="{c}"/>')
        else:
            out.append(f'<circle cx="{_f(x + 6)}" cy="{_f(yy - 4)}" r="4" fill="{c}"/>')
        out.append(_text(x + 18, yy, name, 12))
    return out


def _svg(width: float, height: float, body: List[str]) -> str:
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{_f(width)}" '
                      f'height="{_f(height)}" viewBox="0 0 {_f(width)} {_f(height)}">',
                      f'<rect width="{_f(width)}" height="{_f(height)}" fill="white"/>']
                     + body + ["</svg>", ""])


def bars(title: str, labels: Sequence[str], series: Sequence[str],
         values: Dict[Tuple[str, str], float], x_label: str, log: bool = True,
         value_labels: bool = True) -> str:
    """Horizontal grouped bars: ``values[(label, series)]`` (missing keys: no bar)."""
    vals = [v for v in values.values() if v is not None and v > 0]
    if not vals:
        raise ValueError(f"bars {title!r}: no positive value to plot")
    bar_h, gap = 14, 10
    group_h = bar_h * len(series) + gap
    left, right, top = 150, 90, 44
    legend_w = 20 + 8 * max(len(s) for s in series)
    width = 760 + legend_w
    plot_w = width - left - right - legend_w
    height = top + group_h * len(labels) + 46
    ax = _Axis(min(vals), max(vals), left, left + plot_w, log)
    bottom = top + group_h * len(labels)
    body = [_text(left, 24, title, 15, extra=' font-weight="bold"')]
    for t in ax.ticks:
        x = ax(t)
        body.append(f'<line x1="{_f(x)}" y1="{top}" x2="{_f(x)}" y2="{_f(bottom)}" '
                    'stroke="#dddddd"/>')
        body.append(_text(x, bottom + 16, _num(t), 11, "middle"))
    body.append(_text(left + plot_w / 2, bottom + 36, x_label, 12, "middle"))
    for g, label in enumerate(labels):
        y0 = top + g * group_h + gap / 2
        body.append(_text(left - 8, y0 + bar_h * len(series) / 2 + 4, label, 12, "end"))
        for s, name in enumerate(series):
            v = values.get((label, name))
            if v is None or v <= 0:
                continue
            y = y0 + s * bar_h
            w = max(ax(v) - left, 1.0)
            c = COLORS[s % len(COLORS)]
            body.append(f'<rect x="{left}" y="{_f(y)}" width="{_f(w)}" height="{bar_h - 2}" '
                        f'fill="{c}"/>')
            if value_labels:
                body.append(_text(left + w + 4, y + bar_h - 4, _num(v), 10))
    body.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{_f(bottom)}" stroke="black"/>')
    body += _legend(series, width - legend_w - 10, top + 10, "rect")
    return _svg(width, height, body)


def scatter(title: str, series: Sequence[str], points: Dict[str, List[Tuple[float, float]]],
            x_label: str, y_label: str, hline: Optional[float] = None) -> str:
    """Log-log scatter of ``points[series] = [(x, y), ...]``, with an optional line y = hline."""
    xs = [p[0] for s in series for p in points.get(s, [])]
    ys = [p[1] for s in series for p in points.get(s, [])] + ([hline] if hline else [])
    if not xs or min(xs) <= 0 or min(ys) <= 0:
        raise ValueError(f"scatter {title!r}: needs positive points")
    left, top, plot_w, plot_h = 70, 44, 560, 340
    legend_w = 20 + 8 * max(len(s) for s in series)
    width, height = left + plot_w + 30 + legend_w, top + plot_h + 56
    ax_x = _Axis(min(xs), max(xs), left, left + plot_w, True)
    ax_y = _Axis(min(ys), max(ys), top + plot_h, top, True)
    body = [_text(left, 24, title, 15, extra=' font-weight="bold"')]
    for t in ax_x.ticks:
        x = ax_x(t)
        body.append(f'<line x1="{_f(x)}" y1="{top}" x2="{_f(x)}" y2="{top + plot_h}" '
                    'stroke="#dddddd"/>')
        body.append(_text(x, top + plot_h + 16, _num(t), 11, "middle"))
    for t in ax_y.ticks:
        y = ax_y(t)
        body.append(f'<line x1="{left}" y1="{_f(y)}" x2="{left + plot_w}" y2="{_f(y)}" '
                    'stroke="#dddddd"/>')
        body.append(_text(left - 6, y + 4, _num(t), 11, "end"))
    body.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
                'stroke="black"/>')
    if hline:
        y = ax_y(hline)
        body.append(f'<line x1="{left}" y1="{_f(y)}" x2="{left + plot_w}" y2="{_f(y)}" '
                    'stroke="black" stroke-dasharray="5,4"/>')
    for i, s in enumerate(series):
        c = COLORS[i % len(COLORS)]
        for x, y in points.get(s, []):
            body.append(f'<circle cx="{_f(ax_x(x))}" cy="{_f(ax_y(y))}" r="3.5" fill="{c}" '
                        'fill-opacity="0.75"/>')
    body.append(_text(left + plot_w / 2, top + plot_h + 38, x_label, 12, "middle"))
    body.append(_text(16, top + plot_h / 2, y_label, 12, "middle",
                      extra=f' transform="rotate(-90 16 {_f(top + plot_h / 2)})"'))
    body += _legend(series, left + plot_w + 20, top + 14, "circle")
    return _svg(width, height, body)
