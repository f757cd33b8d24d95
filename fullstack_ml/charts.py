"""Small inline SVG charts for the self-contained HTML reports (no scripts, no fonts, no
requests), a column's histogram read from its whylogs sketch rather than its rows, and
image thumbnails inline as data URIs.

Drawn by hand on purpose: a digits profile has 64 histograms of about 1 KB each here;
a plotting library (none that draws static, self-contained charts is installed) would
add a dependency and tens of KB per chart."""

import html
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fullstack_ml.runtime.drift import DatasetProfileView

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1")
# A report page's Content-Security-Policy: nothing but the page itself and images inside it
# (thumbnails as data URIs); a request for anything else is refused (and logged by the
# browser), so a page that needed one would show it in the test that opens it.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def sketch_histogram(view: DatasetProfileView, column: str, bins: int = 20) -> dict | None:
    """`bins` equal-width counts between the column's min and max, from the KLL sketch of
    its whylogs distribution metric (so it costs the same at any row count); None when the
    column has no numeric values."""
    metric = view.get_column(column).get_metric("distribution")
    sketch = metric.kll.value if metric is not None else None
    if sketch is None or sketch.is_empty():
        return None
    low, high = sketch.get_min_value(), sketch.get_max_value()
    n = sketch.get_n()
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return {"edges": [low, high], "counts": [n]}
    edges = [low + (high - low) * i / bins for i in range(bins + 1)]
    masses = sketch.get_pmf(edges[1:-1])  # below the first inner edge, ..., from the last
    return {"edges": edges, "counts": [round(m * n) for m in masses]}


def histogram_svg(hist: dict, width: int = 160, height: int = 36, colour: str = PALETTE[0]) -> str:
    """Bars of `hist` (`sketch_histogram`), each with its range and count as a tooltip."""
    counts, edges = hist["counts"], hist["edges"]
    top, w = max(max(counts), 1), width / len(counts)
    bars = []
    for i, c in enumerate(counts):
        h = (height - 2) * c / top
        lo, hi = edges[min(i, len(edges) - 1)], edges[min(i + 1, len(edges) - 1)]
        bars.append(
            f'<rect x="{i * w:.1f}" y="{height - h:.1f}" width="{max(w - 1, 1):.1f}" '
            f'height="{h:.1f}" fill="{colour}"><title>{lo:.4g} to {hi:.4g}: {c}</title></rect>'
        )
    return f'<svg width="{width}" height="{height}" role="img">{"".join(bars)}</svg>'


def bars_svg(items: Sequence[tuple[str, float]], width: int = 160, colour: str = PALETTE[0]) -> str:
    """Horizontal bars, one per (label, value), labels at the left, values at the right."""
    if not items:
        return ""
    top = max(max(v for _, v in items), 1e-12)
    row, left = 14, 80
    parts = []
    for i, (label, value) in enumerate(items):
        y, w = i * row, (width - left - 40) * value / top
        parts.append(
            f'<text x="0" y="{y + 10}" font-size="10">{html.escape(str(label))[:14]}</text>'
            f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="10" fill="{colour}"/>'
            f'<text x="{left + w + 3:.1f}" y="{y + 10}" font-size="10">{value:,.0f}</text>'
        )
    return f'<svg width="{width}" height="{row * len(items)}">{"".join(parts)}</svg>'


def _ticks(low: float, high: float) -> tuple[float, float]:
    if high <= low:
        return low - 0.5, high + 0.5
    pad = (high - low) * 0.05
    return low - pad, high + pad


Scale = Callable[[float], float]


def _frame(
    xs: list[float],
    ys: list[float],
    size: tuple[int, int],
    margins: tuple[int, int, int, int],
    names: tuple[str, str],
) -> tuple[Scale, Scale, list[str]]:
    """Scales from data to the plot area (`margins`: left, bottom, top, right) and the area's
    box, each axis's data range and name."""
    (a0, a1), (b0, b1) = _span(xs), _span(ys)
    (x0, x1), (y0, y1) = _ticks(a0, a1), _ticks(b0, b1)
    (width, height), (left, bottom, top, right) = size, margins
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + pw * (x - x0) / (x1 - x0)

    def sy(y: float) -> float:
        return top + ph * (1 - (y - y0) / (y1 - y0))

    parts = [
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>',
        _label(4, sy(b1) + 4, f"{b1:.3g}"),
        _label(4, sy(b0), f"{b0:.3g}"),
        _label(sx(a0), height - 14, f"{a0:.3g}"),
        _label(sx(a1) - 16, height - 14, f"{a1:.3g}"),
        _label(left + pw / 2 - 20, height - 2, names[0]),
        _label(4, top - 6, names[1]),
    ]
    return sx, sy, parts


def lines_svg(
    series: dict[str, Sequence[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    width: int = 420,
    height: int = 220,
) -> str:
    """A line per series (name -> (x, y) points) on shared axes, with a legend."""
    points = [p for s in series.values() for p in s]
    if not points:
        return "<p>no data</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    sx, sy, parts = _frame(xs, ys, (width, height), (48, 30, 20, 10), (xlabel, ylabel))
    for k, (name, pts) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        lx = 56 + 130 * k
        parts.append(f'<rect x="{lx}" y="24" width="10" height="3" fill="{colour}"/>')
        parts.append(_label(lx + 14, 30, name))
    return f'<svg width="{width}" height="{height}" role="img">{"".join(parts)}</svg>'


def scatter_svg(
    points: Sequence[dict[str, Any]], x: str, y: str, width: int = 460, height: int = 260
) -> str:
    """One dot per point (dicts with `name`, `x`, `y` keys and `selected`), labelled; the
    selected one larger and outlined. Dashed lines mark 1.0 on each axis (FP32)."""
    xs, ys = [p[x] for p in points] + [1.0], [p[y] for p in points] + [1.0]
    left, bottom, top, right = margins = (48, 30, 18, 120)
    sx, sy, parts = _frame(xs, ys, (width, height), margins, (x, y))
    dash = 'stroke="#999" stroke-dasharray="3"'
    parts.append(
        f'<line x1="{sx(1):.1f}" y1="{top}" x2="{sx(1):.1f}" y2="{height - bottom}" {dash}/>'
    )
    parts.append(
        f'<line x1="{left}" y1="{sy(1):.1f}" x2="{width - right}" y2="{sy(1):.1f}" {dash}/>'
    )
    for p in points:
        cx, cy = sx(p[x]), sy(p[y])
        r, ring = (6, ' stroke="#000" stroke-width="2"') if p.get("selected") else (4, "")
        parts.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r}" fill="{PALETTE[0]}"{ring}>'
            f"<title>{html.escape(p['name'])}: {x} {p[x]:.3g}, {y} {p[y]:.3g}</title></circle>"
        )
        parts.append(_label(cx + 8, cy + 4, p["name"] + (" (chosen)" if p.get("selected") else "")))
    return f'<svg width="{width}" height="{height}" role="img">{"".join(parts)}</svg>'


def _span(values: Any) -> tuple[float, float]:
    values = [float(v) for v in values]
    return min(values), max(values)


def _label(x: float, y: float, text: str) -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="10">{html.escape(text)}</text>'


def data_uri(png_base64: str) -> str:
    """A PNG (base64) as an `<img>` source that needs no request (CSP `img-src data:`)."""
    return "data:image/png;base64," + png_base64


def thumbnails(
    images: Sequence[str | None], label: str, height: int = 48, title: Sequence[str] = ()
) -> str:
    """`<img>` tags of base64 PNGs (None: skipped) `height` pixels high, small ones scaled up
    with hard pixel edges; `title`: a tooltip per image."""
    tags = []
    for i, png in enumerate(images):
        if png is None:
            continue
        tip = f' title="{html.escape(title[i])}"' if i < len(title) else ""
        tags.append(
            f'<img src="{data_uri(png)}" alt="{html.escape(label)}"{tip} style="height:'
            f'{height}px;image-rendering:pixelated;margin:1px;border:1px solid #ddd">'
        )
    return "".join(tags)


def thumbnail_grid(
    samples: Mapping[str, Sequence[str | None]],
    counts: Mapping[str, int] | None = None,
    height: int = 48,
) -> str:
    """A row per class: its name, its count (`counts`, e.g. train's) and its sample images
    (`samples`: class -> base64 PNGs), as one table."""
    rows = "".join(
        f"<tr><td>{html.escape(str(label))}</td>"
        + (f"<td>{counts.get(label, 0):,}</td>" if counts is not None else "")
        + f"<td style='text-align:left'>{thumbnails(images, str(label), height)}</td></tr>"
        for label, images in samples.items()
    )
    head = "<th>class</th>" + ("<th>train rows</th>" if counts is not None else "")
    return f"<table><tr>{head}<th>samples</th></tr>{rows}</table>"
