"""The build report (model card): one self-contained HTML page per build, gathered from
what the stages wrote. Lineage, the data (a histogram per feature from the whylogs
sketches, missing values, drifted features first, the class balance; of an image set,
thumbnails per class, its statistics per image as features and the files ingest rejected),
training curves (DVCLive), evaluation (of an image set with the misclassified test images the
model was surest of), the compression trade-off, the release gate, and the limits a user
should know.

Every figure taken from a metrics file is written as `data-metric="<file>.<key>"` with its
exact value in `data-value`, so a test can hold the page to the files."""

import base64
import csv
import hashlib
import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset

from fullstack_ml.charts import (
    CSP,
    PALETTE,
    bars_svg,
    histogram_svg,
    lines_svg,
    scatter_svg,
    sketch_histogram,
    thumbnail_grid,
    thumbnails,
)
from fullstack_ml.images import feature_caption, thumbnail_png
from fullstack_ml.paths import (
    COMPRESS_DETAILS,
    COMPRESS_PLOT,
    CONFUSION,
    DATA_DIR,
    LIVE,
    METRICS,
    PARAMS,
    PER_CLASS,
    PROFILE_DIR,
    SCHEMA,
    SPLITS,
    split_file,
)
from fullstack_ml.runtime.drift import load_profile
from fullstack_ml.schema import Schema, parse_schema
from fullstack_ml.stage import git_commit

STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 12px}"
    "table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #ddd;"
    "padding:2px 6px;font-size:13px;text-align:right}td:first-child,th:first-child"
    "{text-align:left}.drift td{background:#f7c6c6}.small{color:#555;font-size:12px}"
    ".grid{display:flex;flex-wrap:wrap;gap:8px}.cell{border:1px solid #eee;padding:4px;"
    "font-size:11px;width:164px}.cell.drifted{border-color:#e15759;background:#fdeeee}"
    "code{font-size:12px}.lineage td{text-align:left}"
)
CONFUSED = 16  # the most confused test images shown (16x16 digits: about 300 bytes each)
CONFUSED_PAIRS = 5  # the (actual, predicted) pairs most often wrong, named above them


def files_sha256(root: Path) -> str:
    """One digest of every file under `root` (relative names and bytes, in name order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(root).rglob("*") if p.is_file())
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table of plain text (escaped here)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _json(path: Path) -> Any:
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


def _rows(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def curves(live_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """DVCLive's per-step TSVs of a run: metric -> (step, value) points."""
    out = {}
    for tsv in sorted((Path(live_dir) / "plots/metrics").glob("*.tsv")):
        rows = _rows(tsv, "\t")
        out[tsv.stem] = [(float(r["step"]), float(r[tsv.stem])) for r in rows]
    return out


def gather(bento_tag: str | None, gate: dict[str, Any] | None) -> dict[str, Any]:
    """Everything the page shows, read from the build's files (relative to the repo root).
    `gate`: the release gate's `metrics` (headline) and `details` (None before the bento is
    validated)."""
    schema = parse_schema(_json(SCHEMA))
    views = {s: load_profile(PROFILE_DIR / f"{s}.bin") for s in SPLITS}
    drift = _json(PROFILE_DIR / "drift.json") or {}
    images = _json(PROFILE_DIR / "images.json")  # an image set's (the profile stage's)
    # an image feature's statistics per image are numeric columns of the profiles
    stats = {name: f["stats"] for name, f in ((images or {}).get("features") or {}).items()}
    features = []
    for column in [c for f in schema.features for c in (f, *stats.get(f, ()))]:
        kind = schema.kinds.get(column, "numeric")
        summaries = {s: v.get_column(column).to_summary_dict() for s, v in views.items()}
        top = summaries["train"].get("frequent_items/frequent_strings") or []
        features.append(
            {
                "name": column,
                "kind": kind,
                "histogram": sketch_histogram(views["train"], column)
                if kind == "numeric"
                else None,
                "top": [(i.value, int(i.est)) for i in top[:6]],
                "missing": {s: int(m.get("counts/null", 0)) for s, m in summaries.items()},
                "drift": {s: (drift.get(s) or {}).get(column) or {} for s in drift},
            }
        )
    constraints = _json(PROFILE_DIR / "constraints.json") or []
    confusion = _rows(CONFUSION)
    return {
        "lineage": {
            "git_commit": git_commit(),
            "params_sha256": hashlib.sha256(PARAMS.read_bytes()).hexdigest(),
            "data_sha256": files_sha256(DATA_DIR),
            "bento_tag": bento_tag or "-",
        },
        "schema": {
            "task": schema.task,
            "target": schema.target,
            "rows": schema.rows,
            "features": len(schema.features),
        },
        "features": features,
        "classes": _json(PROFILE_DIR / "classes.json"),  # classification: rows per class
        "images": images,
        "constraints": {
            "passed": sum(r["passed"] for r in constraints),
            "failed": [f"{r['constraint']} ({r['split']})" for r in constraints if not r["passed"]],
        },
        "metrics": {name: _json(METRICS[name]) for name in ("profile", "eval", "compress")},
        "curves": {name: curves(path) for name, path in LIVE.items()},
        "confusion": confusion,
        "confused": confused_images(confusion, schema, split_file("test")),
        "per_class": _rows(PER_CLASS),
        "candidates": _rows(COMPRESS_PLOT),
        "outlier_rows": _json(PROFILE_DIR / "outliers.json"),  # the profile's EDA
        "detector": (_json(COMPRESS_DETAILS) or {}).get("outliers"),  # the shipped detector
        "gate": gate,
    }


def confused_images(
    rows: list[dict[str, str]], schema: Schema, test: Path, most: int = CONFUSED
) -> list[dict[str, Any]]:
    """The misclassified test images the model was surest of, at most `most`: evaluate's
    `plots/confusion.csv` (`rows`: a row per test row, in the split's order) ranked by the
    probability given to the wrong class (ties in row order), each with its row, source
    path, true and predicted class, that probability and its thumbnails (base64 PNGs per
    image feature, from the curated `test` split). Empty for a model of a table, a model
    that got every test image right, or rows of another test split than `test`."""
    if not schema.images or not rows or "probability" not in rows[0]:
        return []
    wrong = [i for i, r in enumerate(rows) if r["actual"] != r["predicted"]]
    wrong = sorted(wrong, key=lambda i: -float(rows[i]["probability"]))[:most]
    if not wrong or not Path(test).exists():
        return []
    split = pyarrow.dataset.dataset(test)  # a file, or a folder of parts (as pandas reads it)
    if split.count_rows() != len(rows):
        return []  # evaluate scored another test split: the rows are not these images
    columns = [c for c in ("path", *schema.images) if c in split.schema.names]
    values = split.take(pa.array(wrong), columns=columns).to_pylist()
    return [
        {
            "row": i,
            "path": v.get("path"),
            "actual": rows[i]["actual"],
            "predicted": rows[i]["predicted"],
            "probability": float(rows[i]["probability"]),
            "images": {
                name: None
                if v.get(name) is None
                else base64.b64encode(thumbnail_png(bytes(v[name]))).decode()
                for name in schema.images
            },
        }
        for i, v in zip(wrong, values, strict=True)
    ]


def confused_pairs(rows: list[dict[str, str]], most: int = CONFUSED_PAIRS) -> list[tuple]:
    """The (actual, predicted, test rows) pairs of classes most often confused, the most
    first (ties in class order)."""
    counts = Counter((r["actual"], r["predicted"]) for r in rows if r["actual"] != r["predicted"])
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], _order(kv[0][0]), _order(kv[0][1])))
    return [(a, p, n) for (a, p), n in ranked[:most]]


def confused_part(confused: list[dict[str, Any]], rows: list[dict[str, str]]) -> str:
    """The most confused test images (`confused_images`) as a grid of thumbnails, each
    captioned with its path, true and predicted class and that class's probability, under
    the class pairs most often confused."""
    if not confused:
        return ""
    esc = html.escape
    pairs = ", ".join(f"{esc(a)} taken for {esc(p)} ({n})" for a, p, n in confused_pairs(rows))
    wrong = sum(r["actual"] != r["predicted"] for r in rows)
    cells = []
    for c in confused:
        name = str(c["path"] if c["path"] is not None else f"test row {c['row']}")
        caption = f"true {c['actual']}, predicted {c['predicted']} ({c['probability']:.3f})"
        images = list(c["images"].values())
        cells.append(
            f"<div class='cell' data-row='{c['row']}'>"
            f"{thumbnails(images, name, 48, [f'{name}: {caption}'] * len(images))}<br>"
            f"<code>{esc(name)}</code><br>{esc(caption)}</div>"
        )
    return (
        f"<h3>Most confused test images: {len(confused)} of the {wrong} misclassified, the"
        " model's surest first</h3>"
        f"<p>Classes most often confused (actual taken for predicted, test images): {pairs}.</p>"
        f"<div class='grid'>{''.join(cells)}</div>"
    )


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metric(file: str, key: str, value: Any) -> str:
    """A figure from `metrics/<file>.json` as a cell the test can check against the file."""
    return (
        f"<td data-metric='{file}.{key}' data-value='{html.escape(json.dumps(value))}'>"
        f"{html.escape(_fmt(value))}</td>"
    )


def _table(file: str, figures: dict[str, Any] | None, keys: list[str] | None = None) -> str:
    if not figures:
        return f"<p class='small'>metrics/{file}.json: not built</p>"
    keys = keys or [k for k, v in figures.items() if not isinstance(v, dict | list)]
    rows = "".join(f"<tr><td>{html.escape(k)}</td>{metric(file, k, figures[k])}</tr>" for k in keys)
    return f"<table>{rows}</table>"


def _drifted(features: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in features:
        for split, score in f["drift"].items():
            if score.get("drift_category") == "DRIFT":
                out.setdefault(split, []).append(f["name"])
    return out


def data_section(facts: dict[str, Any]) -> str:
    """Rows, drifted features (highlighted, first), missing values, a chart per feature."""
    features, rows = facts["features"], facts["schema"]["rows"]
    drifted = _drifted(features)
    names = {n for cols in drifted.values() for n in cols}
    parts = [
        "<h2 id='data'>Data</h2><p>"
        + ", ".join(f"{html.escape(s)}: {n:,} rows" for s, n in rows.items())
        + f"; task {html.escape(facts['schema']['task'])}, target "
        f"<code>{html.escape(facts['schema']['target'])}</code>,"
        f" {facts['schema'].get('features', len(features))} features.</p>"
    ]
    counts = (facts["metrics"]["profile"] or {}).get("drifted_columns", {})
    cells = "".join(
        f"<tr><td>{html.escape(s)}</td>{metric('profile', f'drifted_columns.{s}', n)}</tr>"
        for s, n in counts.items()
    )
    parts.append(f"<table><tr><th>split</th><th>drifted columns</th></tr>{cells}</table>")
    if drifted:
        items = "".join(
            f"<li><b>{html.escape(s)}</b>: {html.escape(', '.join(cols))}</li>"
            for s, cols in drifted.items()
        )
        parts.append(
            f"<div class='drift'><h3>Drifted features (vs train)</h3><ul>{items}</ul></div>"
        )
    else:
        parts.append("<p>Drift against train: no feature drifted in any split.</p>")
    missing = [f for f in features if any(f["missing"].values())]
    if missing:
        cells = [[f["name"], *(f"{f['missing'].get(s, 0):,}" for s in rows)] for f in missing]
        parts.append("<h3>Missing values</h3>" + table(["feature", *rows], cells))
    else:
        parts.append("<p>Missing values: none in any split.</p>")
    if facts.get("classes"):
        parts.append(classes_table(facts["classes"]))
    if facts.get("images"):
        parts.append(images_part(facts["images"], facts.get("classes")))
    c = facts["constraints"]
    failed = "".join(f"<li>{html.escape(x)}</li>" for x in c["failed"])
    parts.append(f"<p>Constraints: {c['passed']} passed, {len(c['failed'])} failed.</p>")
    if failed:
        parts.append(f"<ul>{failed}</ul>")
    cells = []
    shown = [f for f in features if f["kind"] != "image"]  # an image: its statistics, above
    for f in sorted(shown, key=lambda f: f["name"] not in names):  # drifted first
        chart = (
            histogram_svg(f["histogram"])
            if f["histogram"]
            else bars_svg(f["top"], colour=PALETTE[1])
            if f["top"]
            else "<span class='small'>no values</span>"
        )
        drift = ", ".join(
            f"{html.escape(s)} p={d['pvalue']:.3g}"
            for s, d in f["drift"].items()
            if d.get("pvalue") is not None
        )
        edges = f["histogram"]["edges"] if f["histogram"] else None
        span = f"{edges[0]:.3g} to {edges[-1]:.3g}" if edges else f"{len(f['top'])} top values"
        cells.append(
            f"<div class='cell{' drifted' if f['name'] in names else ''}'>"
            f"<b>{html.escape(f['name'])}</b><br>{chart}<br>"
            f"<span class='small'>{span}; {drift or 'no drift test'}</span></div>"
        )
    parts.append(
        "<h3>Features (train split, from the whylogs sketches)</h3>"
        f"<div class='grid'>{''.join(cells)}</div>"
    )
    return "".join(parts)


def classes_table(classes: dict[str, dict[str, int]]) -> str:
    """Rows per class and split (the profile's exact counts), the largest class over the
    smallest per split last."""
    splits = list(classes)
    labels = list(dict.fromkeys(c for counts in classes.values() for c in counts))
    cells = [[c, *(f"{classes[s].get(c, 0):,}" for s in splits)] for c in labels]
    ratios = []
    for s in splits:
        values = list(classes[s].values())
        ratios.append(f"{max(values) / min(values):.3g}" if values and min(values) else "-")
    cells.append(["largest / smallest", *ratios])
    return f"<h3>Class balance ({len(labels)} classes)</h3>" + table(["class", *splits], cells)


def images_part(images: dict[str, Any], classes: dict[str, dict[str, int]] | None) -> str:
    """An image set: its size and mode, thumbnails of each class's first training images
    (inline data URIs) and the files ingest rejected, counted by reason."""
    parts = []
    for name, f in images["features"].items():
        parts.append(
            f"<h3>Images: <code>{html.escape(name)}</code></h3><p>"
            f"{html.escape(feature_caption(f))}; its statistics per image are the features"
            " charted below.</p>"
            + thumbnail_grid(f["samples"], (classes or {}).get("train"), height=32)
        )
    rejected = images.get("rejected") or {}
    if rejected.get("files"):
        parts.append(
            f"<p>Files rejected by ingest: {rejected['files']:,}</p>"
            + table(["reason", "files"], [[k, f"{n:,}"] for k, n in rejected["kinds"].items()])
        )
    else:
        parts.append("<p>Files rejected by ingest: none.</p>")
    return "".join(parts)


def training_section(facts: dict[str, Any]) -> str:
    parts = ["<h2 id='training'>Training (DVCLive)</h2>"]
    for run, series in facts["curves"].items():
        if not series:
            parts.append(f"<p class='small'>{run}: no curves</p>")
            continue
        losses = {k: v for k, v in series.items() if k.endswith("_loss")}
        scores = {
            k: v for k, v in series.items() if k.startswith(("train_", "val_")) and k not in losses
        }
        parts.append(
            f"<h3>{html.escape(run)}</h3><div class='grid'>"
            f"{lines_svg(losses, 'epoch', 'loss')}{lines_svg(scores, 'epoch', 'score')}</div>"
        )
    return "".join(parts)


def evaluation_section(facts: dict[str, Any]) -> str:
    parts = ["<h2 id='evaluation'>Evaluation (test split)</h2>"]
    parts.append(_table("eval", facts["metrics"]["eval"]))
    pairs = facts["confusion"]
    if pairs and facts["schema"]["task"] == "regression":  # a value per row: their errors
        errors = [float(p["predicted"]) - float(p["actual"]) for p in pairs]
        counts, edges = np.histogram(errors, bins=20)
        hist = {"counts": counts.tolist(), "edges": edges.tolist()}
        parts.append(
            f"<h3>Errors on the {len(errors)} test rows (predicted - actual)</h3>"
            + histogram_svg(hist, width=420, height=120)
        )
    elif pairs:
        labels = sorted({p["actual"] for p in pairs} | {p["predicted"] for p in pairs}, key=_order)
        counts: dict[tuple[str, str], int] = {}
        for p in pairs:
            counts[p["actual"], p["predicted"]] = counts.get((p["actual"], p["predicted"]), 0) + 1
        top = max(counts.values())
        head = "".join(f"<th>{html.escape(b)}</th>" for b in labels)
        body = []
        for a in labels:
            cells = []
            for b in labels:
                n = counts.get((a, b), 0)
                # the diagonal in blue by count; errors in red, 4x stronger to stand out
                rgb, alpha = ("78,121,167", n / top) if a == b else ("225,87,89", 4 * n / top)
                shade = f"rgba({rgb},{min(alpha, 1):.2f})"
                cells.append(f"<td style='background:{shade if n else '#fff'}'>{n or ''}</td>")
            body.append(f"<tr><th>{html.escape(a)}</th>{''.join(cells)}</tr>")
        parts.append(
            "<h3>Confusion matrix (rows: actual, columns: predicted)</h3>"
            f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"
        )
        parts.append(confused_part(facts.get("confused") or [], pairs))
    return "".join(parts)


def compression_section(facts: dict[str, Any]) -> str:
    rows = facts["candidates"]
    parts = ["<h2 id='compression'>Compression</h2>"]
    parts.append(_table("compress", facts["metrics"]["compress"]))
    if rows:
        score = list(rows[0])[1]  # plots/compress.csv: name, the score, sizes, latencies
        points = [
            {"name": r["name"], "size_ratio": float(r["size_ratio"]),
             "latency_ratio_batch256": float(r["latency_ratio_batch256"]),
             "selected": r["selected"] == "True"}
            for r in rows
        ]  # fmt: skip
        parts.append(
            "<h3>Size vs latency at batch 256, against FP32 (dashed: 1.0)</h3>"
            + scatter_svg(points, "size_ratio", "latency_ratio_batch256")
        )
        keys = [score, "size_ratio", "latency_ratio_batch1", "latency_ratio_batch256"]
        cells = [
            [
                r["name"] + (" (chosen)" if r["selected"] == "True" else ""),
                *(_fmt(float(r[k])) for k in keys),
            ]
            for r in rows
        ]
        parts.append(table(["candidate", *keys], cells))
    return "".join(parts)


def outliers_section(facts: dict[str, Any]) -> str:
    """The outlying training rows (profile) and the detector the bento ships (compress):
    every candidate's AUROC per shift of val, its cost, and the choice."""
    parts = ["<h2 id='outliers'>Outliers</h2>"]
    rows = facts.get("outlier_rows")
    if rows:
        parts.append(
            f"<p>Training rows: {rows['outliers']:,} of {rows['rows']:,} ({rows['rate']:.2%}) over"
            f" Q3 + {rows['fence']:g} x IQR of {html.escape(rows['detector'])}'s scores (PyOD)."
            " The highest scores, with the features furthest from the train median:</p>"
        )
        cells = [
            [
                str(r["row"]),
                _fmt(r["score"]),
                "; ".join(
                    f"{f['feature']} = {f['value']:.4g} (z {f['z']:.3g})" for f in r["features"]
                ),
            ]
            for r in rows["top"]
        ]
        parts.append(table(["train row", "score", "furthest features"], cells))
    found = facts.get("detector")
    if found:
        chosen, candidates = found["chosen"], found["candidates"]
        shifts = list(next(iter(candidates.values()))["auroc"])
        parts.append(
            f"<p>Shipped detector: <b>{html.escape(chosen)}</b>, threshold"
            f" {found['threshold']:.4g} (set on {found['val_rows']} val rows at"
            f" outliers.target_fpr {found['target_fpr']:g}); it flags {found['test_outliers']}"
            f" of {found['test_rows']} test rows ({found['test_rate']:.2%}). AUROC of val"
            " against shifted val, per candidate:</p>"
        )
        cells = [
            [
                name + (" (chosen)" if name == chosen else ""),
                *(_fmt(c["auroc"][s]) for s in shifts),
                _fmt(c["mean_auroc"]),
                _fmt(c["us_per_record"]),
                "yes" if c["served"] else "no",
            ]
            for name, c in candidates.items()
        ]
        head = ["candidate", *shifts, "mean AUROC", "us per record", "servable"]
        parts.append(table(head, cells))
    if len(parts) == 1:
        parts.append("<p class='small'>not built</p>")
    return "".join(parts)


def gate_section(facts: dict[str, Any]) -> str:
    head = "<h2 id='gate'>Release gate (validate)</h2>"
    if facts["gate"] is None:
        return (
            f"{head}<p>Measured on this bento after packaging (every test record's answer, "
            "the SLO load, the burst): <code>metrics/validate.json</code> and the build's "
            "<code>reports/build.html</code> hold its figures.</p>"
        )
    headline, details = facts["gate"]["metrics"], facts["gate"]["details"]
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td>"
        + (metric("validate", k, v) if k in headline else f"<td>{html.escape(_fmt(v))}</td>")
        + "</tr>"
        for k, v in details.items()
    )
    return f"{head}<table>{rows}</table>"


def limits(facts: dict[str, Any]) -> list[str]:
    """What a user should know: the weakest classes, drift, the compression's costs."""
    out = []
    per_class = sorted(facts["per_class"], key=lambda r: float(r["f1"]))
    if per_class:
        weak = ", ".join(
            f"{r['class']} (F1 {float(r['f1']):.3f}, {r['support']} rows)" for r in per_class[:3]
        )
        out.append(f"Weakest classes on the test split: {weak}.")
    for split, cols in _drifted(facts["features"]).items():
        out.append(f"{len(cols)} feature(s) drifted in {split} against train: {', '.join(cols)}.")
    rejected = (facts.get("images") or {}).get("rejected") or {}
    if rejected.get("files"):
        kinds = ", ".join(f"{k} {n}" for k, n in rejected["kinds"].items())
        out.append(f"Ingest rejected {rejected['files']} image files ({kinds}).")
    c = facts["metrics"]["compress"] or {}
    if c.get("latency_ratio_batch1", 0) > 1:
        out.append(
            f"The compressed model ({c['method']}) is {c['latency_ratio_batch1']:.2f}x FP32's "
            "latency at batch 1 on the build machine: INT8 pays off on batches, not lone requests."
        )
    if c.get("accuracy_drop_points"):
        out.append(f"Compression costs {c['accuracy_drop_points']:.2f} points of accuracy.")
    rows = facts["schema"]["rows"]
    out.append(f"Trained on {rows.get('train', 0):,} rows; scored on {rows.get('test', 0):,}.")
    return out


def render(facts: dict[str, Any]) -> str:
    """The page: self-contained (inline CSS and SVG; no script, font or request)."""
    lin = facts["lineage"]
    lineage = "".join(
        f"<tr><td>{k}</td><td><code>{html.escape(str(v))}</code></td></tr>" for k, v in lin.items()
    )
    nav = " | ".join(
        f"<a href='#{a}'>{t}</a>"
        for a, t in (("data", "data"), ("training", "training"), ("evaluation", "evaluation"),
                     ("compression", "compression"), ("outliers", "outliers"),
                     ("gate", "release gate"), ("limits", "limits"))
    )  # fmt: skip
    notes = "".join(f"<li>{html.escape(x)}</li>" for x in limits(facts))
    return page(
        "Build report",
        f"<p>{nav}</p><h2 id='lineage'>Lineage</h2><table class='lineage'>{lineage}</table>"
        + data_section(facts)
        + training_section(facts)
        + evaluation_section(facts)
        + compression_section(facts)
        + outliers_section(facts)
        + gate_section(facts)
        + f"<h2 id='limits'>Limits</h2><ul>{notes}</ul>",
    )


def page(title: str, body: str) -> str:
    """A self-contained HTML page (inline CSS and SVG; no script, font or request)."""
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def _order(label: str) -> tuple[int, Any]:
    try:
        return 0, float(label)
    except ValueError:
        return 1, label
