"""The profile's self-contained HTML page: drifted features first, the class balance, an
image set's thumbnails per class and rejected files, per-split summaries with a histogram
per numeric column (from its whylogs sketch; an image's statistics are numeric columns),
drift, constraints."""

import html
import json
from typing import Any

from fullstack_ml.charts import (
    CSP,
    PALETTE,
    bars_svg,
    histogram_svg,
    sketch_histogram,
    thumbnail_grid,
    thumbnails,
)
from fullstack_ml.images import feature_caption
from fullstack_ml.runtime.drift import DatasetProfileView, json_safe
from fullstack_ml.schema import Schema


def column_summary(view: DatasetProfileView, column: str, kind: str) -> dict[str, Any]:
    """What the report shows of one column: its kind, counts, and the numeric distribution or
    the distinct estimate and top values (an image column: counts alone)."""
    s = view.get_column(column).to_summary_dict()
    out: dict[str, Any] = {
        "kind": kind,
        "count": s.get("counts/n", 0),
        "missing": s.get("counts/null", 0),
    }
    if kind == "image":
        return out
    if kind == "numeric":
        for key in ("mean", "stddev", "min", "q_25", "median", "q_75", "max"):
            out[key] = json_safe(s.get(f"distribution/{key}"))
        out["histogram"] = sketch_histogram(view, column)
    else:
        out["distinct"] = json_safe(s.get("cardinality/est"))
        items = s.get("frequent_items/frequent_strings") or []
        out["top"] = [[i.value, int(i.est)] for i in items[:5]]
    return out


def _chart(hist: dict | None) -> str:
    return histogram_svg(hist, width=120, height=24) if hist else "-"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def render_html(
    summaries: dict[str, dict[str, dict[str, Any]]],
    constraints: list[dict[str, Any]],
    drift: dict[str, dict[str, Any]],
    schema: Schema,
    outliers: dict[str, Any] | None = None,
    classes: dict[str, dict[str, int]] | None = None,
    images: dict[str, Any] | None = None,
) -> str:
    """One self-contained page (no scripts, no network; images inline as data URIs): a
    summary per split and column (`summaries`: split -> rows and column ->
    `column_summary`), the class balance (`classes`: split -> class -> rows), an image
    set's thumbnails, oddest images and rejected files (`images`: `images.json`), the drift
    of each split against train, the outlying training rows
    (`fullstack_ml.outliers.row_outliers`) and the constraints with their observed values."""
    esc = html.escape
    drifted = {
        col for scores in drift.values() for col, d in scores.items()
        if (d or {}).get("drift_category") == "DRIFT"
    }  # fmt: skip
    parts = [
        "<h2>Drifted features (against train)</h2><p>"
        + (esc(", ".join(sorted(drifted))) if drifted else "none")
        + "</p>"
    ]
    if classes:
        parts.append(classes_html(classes))
    if images:
        parts.append(images_html(images, (classes or {}).get("train")))
    for split, summary in summaries.items():
        columns = summary["columns"]
        parts.append(f"<h2 id='split-{esc(split)}'>Split {esc(split)}: {summary['rows']} rows</h2>")
        kind = {c: columns[c].get("kind") or schema.kind(c) for c in columns}
        numeric = [c for c in columns if kind[c] == "numeric"]
        categorical = [c for c in columns if kind[c] != "numeric"]
        if numeric:
            keys = ("count", "missing", "mean", "stddev", "min", "q_25", "median", "q_75", "max")
            head = "".join(f"<th>{k}</th>" for k in keys) + "<th>distribution (sketch)</th>"
            body = "".join(
                f"<tr{' class=bad' if c in drifted else ''}><td>{esc(c)}</td>"
                + "".join(f"<td>{_fmt(columns[c].get(k))}</td>" for k in keys)
                + f"<td>{_chart(columns[c].get('histogram'))}</td></tr>"
                for c in numeric
            )
            parts.append(
                f"<h3>Numeric columns</h3><table><tr><th>column</th>{head}</tr>{body}</table>"
            )
        if categorical:
            body = []
            for c in categorical:
                s = columns[c]
                top = ", ".join(f"{esc(str(v))} ({n})" for v, n in s.get("top", []))
                unseen = s.get("unseen")
                unseen_cell = (
                    "-" if unseen is None else f"{unseen['rate']:.2%} ({unseen['outside']})"
                )
                body.append(
                    f"<tr><td>{esc(c)}</td><td>{s['count']}</td><td>{s['missing']}</td>"
                    f"<td>{_fmt(s.get('distinct'))}</td><td>{top or '-'}</td>"
                    f"<td>{unseen_cell}</td></tr>"
                )
            parts.append(
                "<h3>Categorical and other columns</h3><table><tr><th>column</th><th>count</th>"
                "<th>missing</th><th>distinct (est.)</th><th>top values (est. count)</th>"
                f"<th>unseen in train / unknown class</th></tr>{''.join(body)}</table>"
            )
    colour = {"NO_DRIFT": "#d7f2d7", "POSSIBLE_DRIFT": "#fff2b3", "DRIFT": "#f7c6c6"}
    if drift:
        head = "".join(
            f"<th>{esc(s)} algorithm</th><th>{esc(s)} p-value</th><th>{esc(s)} category</th>"
            for s in drift
        )
        body = []
        for col in next(iter(drift.values())):
            cells = []
            for scores in drift.values():
                s = scores.get(col) or {}
                cat = s.get("drift_category") or "UNKNOWN"
                p = "-" if s.get("pvalue") is None else f"{s['pvalue']:.4g}"
                cells.append(
                    f"<td>{esc(s.get('algorithm') or '-')}</td><td>{p}</td>"
                    f"<td style='background:{colour.get(cat, '#eee')}'>{cat}</td>"
                )
            body.append(f"<tr><td>{esc(col)}</td>{''.join(cells)}</tr>")
        parts.append(
            "<h2>Drift against train</h2>"
            f"<table><tr><th>column</th>{head}</tr>{''.join(body)}</table>"
        )
    if outliers:
        parts.append(outliers_html(outliers))
    failed = [r for r in constraints if not r["passed"]]
    rows = "".join(
        f"<tr class='{'ok' if r['passed'] else 'bad'}'><td>{esc(r['split'])}</td>"
        f"<td>{esc(r['constraint'])}</td><td>{esc(json.dumps(r['observed'], default=str))}</td>"
        f"<td>{'passed' if r['passed'] else 'FAILED'}</td><td>{esc(r['source'])}</td></tr>"
        for r in sorted(constraints, key=lambda r: r["passed"])
    )
    parts.append(
        f"<h2>Constraints: {len(constraints) - len(failed)} passed, {len(failed)} failed</h2>"
        f"<details{' open' if failed else ''}><summary>every constraint with its observed value"
        "</summary><table><tr><th>split</th><th>constraint</th><th>observed</th><th>result</th>"
        f"<th>from</th></tr>{rows}</table></details>"
    )
    anchors = [(f"split-{s}", s) for s in summaries]
    anchors += [("classes", "classes")] if classes else []
    anchors += [("images", "images")] if images else []
    nav = " | ".join(f"<a href='#{esc(a)}'>{esc(t)}</a>" for a, t in anchors)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        "<title>Data profile</title><style>"
        "body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
        "tr.bad td{background:#f7c6c6}</style></head><body>"
        f"<h1>Data profile</h1><p>{nav}</p>{''.join(parts)}</body></html>"
    )


def outliers_html(found: dict[str, Any]) -> str:
    """The outlying training rows: the share over the fence, and the top rows with the
    features furthest from typical (robust z-scores)."""
    esc = html.escape
    rows = "".join(
        f"<tr{' class=bad' if r['outlier'] else ''}><td>{r['row']}</td><td>{r['score']:.4g}</td>"
        "<td>"
        + esc(
            "; ".join(
                f"{f['feature']} = {f['value']:.4g} (median {f['median']:.4g}, z {f['z']:.3g})"
                for f in r["features"]
            )
        )
        + "</td></tr>"
        for r in found["top"]
    )
    return (
        f"<h2 id='outliers'>Outlying training rows: {found['outliers']} of {found['rows']}"
        f" ({found['rate']:.2%})</h2><p>{esc(found['detector'])} (PyOD) scores every row; a row"
        f" over {found['threshold']:.4g} (Q3 + {found['fence']:g} x IQR of the scores) is an"
        " outlier. The highest scores, with the features furthest from the train median:</p>"
        f"<table><tr><th>train row</th><th>score</th><th>furthest features</th></tr>{rows}"
        "</table>"
    )


def classes_html(classes: dict[str, dict[str, int]]) -> str:
    """Rows per class and split (exact counts), each with its share of the split, and the
    ratio of the largest class to the smallest per split."""
    esc = html.escape
    splits = list(classes)
    labels = list(dict.fromkeys(c for counts in classes.values() for c in counts))
    totals = {s: sum(classes[s].values()) for s in splits}
    body = "".join(
        f"<tr><td>{esc(c)}</td>"
        + "".join(
            f"<td>{classes[s].get(c, 0):,} ({classes[s].get(c, 0) / max(totals[s], 1):.1%})</td>"
            for s in splits
        )
        + "</tr>"
        for c in labels
    )
    ratio = "".join(f"<td>{_imbalance(classes[s])}</td>" for s in splits)
    head = "".join(f"<th>{esc(s)}</th>" for s in splits)
    train = classes.get("train") or next(iter(classes.values()))
    chart = bars_svg(list(train.items())[:40], width=320, colour=PALETTE[2])
    return (
        f"<h2 id='classes'>Classes: {len(labels)}</h2>"
        f"<table><tr><th>class</th>{head}</tr>{body}"
        f"<tr><td>largest / smallest</td>{ratio}</tr></table>{chart}"
    )


def _imbalance(counts: dict[str, int]) -> str:
    """The largest class's rows over the smallest's ("-" where a class has none)."""
    values = list(counts.values())
    return f"{max(values) / min(values):.3g}" if values and min(values) else "-"


def images_html(images: dict[str, Any], train_counts: dict[str, int] | None = None) -> str:
    """An image set: per image feature its size and mode, thumbnails of each class's first
    training images, the oddest training images (the outlier detector's top rows), and
    the files ingest rejected, counted by reason."""
    esc = html.escape
    parts = []
    for name, feature in images["features"].items():
        parts.append(
            f"<h2 id='images'>Images: {esc(name)}</h2><p>{esc(feature_caption(feature))};"
            f" profiled by their statistics per image: {esc(', '.join(feature['stats']))}.</p>"
            "<h3>Train's first images of each class</h3>"
            + thumbnail_grid(feature["samples"], train_counts)
        )
    oddest = images.get("oddest") or []
    if oddest:
        cells = "".join(
            f"<tr{' class=bad' if r['outlier'] else ''}><td>{r['row']}</td>"
            f"<td>{esc(str(r['path'] or '-'))}</td><td>{r['score']:.4g}</td>"
            f"<td>{thumbnails(list(r['images'].values()), str(r['row']))}</td></tr>"
            for r in oddest
        )
        parts.append(
            "<h3>The oddest training images (outlier scores of their statistics)</h3>"
            "<table><tr><th>train row</th><th>path</th><th>score</th><th>image</th></tr>"
            f"{cells}</table>"
        )
    rejected = images.get("rejected") or {}
    if rejected.get("files"):
        kinds = "".join(
            f"<tr><td>{esc(k)}</td><td>{n:,}</td></tr>" for k, n in rejected["kinds"].items()
        )
        shown = "".join(
            f"<tr><td>{esc(p)}</td><td>{esc(r)}</td></tr>" for p, r, _ in rejected["shown"]
        )
        listed = len(rejected["shown"])
        first = f" (the first {listed})" if rejected["files"] > listed else ""
        parts.append(
            f"<h3 id='rejected'>Files rejected by ingest: {rejected['files']:,}</h3>"
            f"<table><tr><th>reason</th><th>files</th></tr>{kinds}</table>"
            f"<details><summary>the files{first}"
            f"</summary><table><tr><th>path</th><th>reason</th></tr>{shown}</table></details>"
        )
    else:
        parts.append("<p>Files rejected by ingest: none (bad files, duplicates, leaks).</p>")
    return "".join(parts)
