"""The compression report: a CSV for DVC plots and an HTML page (table and bar chart)."""

import html
from pathlib import Path
from typing import Any

import pandas as pd

from fullstack_ml.stage import write_atomic

COLUMNS = ["size_bytes", "size_ratio", "latency_ms_batch1", "latency_ratio_batch1",
           "latency_ms_batch256", "latency_ratio_batch256"]  # fmt: skip


def table(result: dict[str, Any], score_name: str) -> pd.DataFrame:
    """One row per candidate (FP32 first): size, score, best-path latency and ratios."""
    rows = []
    for k, r in result["candidates"].items():
        row = {"name": k, score_name: r[score_name], **{c: r[c] for c in COLUMNS}}
        for path, times in r["latency_ms"].items():
            for b in (min(times, key=int), max(times, key=int)):
                row[f"{path}_ms_batch{b}"] = times[b]
        rows.append({**row, "selected": k == result["method"]})
    return pd.DataFrame(rows)


def bar_chart(df: pd.DataFrame) -> str:
    """An inline SVG: size and latency ratios vs FP32 per candidate, as horizontal bars."""
    series = [("size_ratio", "#4e79a7"), ("latency_ratio_batch1", "#f28e2b"),
              ("latency_ratio_batch256", "#59a14f")]  # fmt: skip
    scale = 300 / max(1.0, float(df[[s for s, _ in series]].max().max()))
    row_h, left = 16 * len(series) + 10, 220
    parts = []
    for i, r in enumerate(df.itertuples()):
        y = 20 + i * row_h
        parts.append(f'<text x="0" y="{y + 14}" font-size="12">{html.escape(r.name)}</text>')
        for j, (col, color) in enumerate(series):
            v = getattr(r, col)
            yy = y + j * 16
            parts.append(
                f'<rect x="{left}" y="{yy}" width="{v * scale:.1f}" height="14" fill="{color}"/>'
                f'<text x="{left + v * scale + 4:.1f}" y="{yy + 11}" font-size="10">{v:.2f}</text>'
            )
    legend = "".join(
        f'<rect x="{left + k * 170}" y="0" width="10" height="10" fill="{c}"/>'
        f'<text x="{left + k * 170 + 14}" y="10" font-size="11">{s}</text>'
        for k, (s, c) in enumerate(series)
    )
    one = left + scale
    height = 30 + len(df) * row_h
    return (
        # wide enough for the whole legend (its last label was cut at left + 380)
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + 3 * 170 + 10}" height="{height}">'
        f'{legend}<line x1="{one}" y1="14" x2="{one}" y2="{height}" stroke="#999" '
        f'stroke-dasharray="3"/>{"".join(parts)}</svg>'
    )


def write_report(result: dict[str, Any], score_name: str, csv: Path, page: Path) -> None:
    """The comparison as a CSV (DVC plots) and an HTML page (table and bar chart)."""
    df = table(result, score_name)
    write_atomic(csv, df.to_csv(index=False, float_format="%.6g"))
    plan = ", ".join(f"batch >= {b}: {p}" for b, p in result["serving"]["plan"])
    write_atomic(
        page,
        "<!doctype html><html><head><meta charset='utf-8'><title>Compression report</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 6px;text-align:right;"
        "font-size:12px}.wide{overflow-x:auto}</style>"
        f"</head><body><h1>Compression report</h1><p>Selected: <b>{html.escape(result['method'])}"
        f"</b>; serving paths: {html.escape(plan)}. Latency: the faster of eager and "
        "Inductor-compiled, ratios against FP32 eager.</p>"
        f"<div class='wide'>{df.to_html(index=False, float_format=lambda v: f'{v:.4g}')}</div>"
        f"<h2>Ratios vs FP32 (dashed line: 1.0)</h2>{bar_chart(df)}</body></html>\n",
    )
