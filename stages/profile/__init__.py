"""profile: whylogs profiles of the curated splits, data-quality constraints, drift.

Writes `reports/profile/{train,val,test}.bin` (whylogs profiles), `constraints.json`,
`drift.json` and `report.html` (self-contained), and `metrics/profile.json`; for a
classification task, `classes.json` (exact class counts per split); for an image set,
`images.json` (thumbnails per class, the oddest training images, the files ingest rejected).

An image feature is profiled by its statistics per image (`runtime.images.image_stats`:
brightness, contrast, sharpness, hue and saturation), numeric columns `<feature>.<stat>` that
the constraints, drift and the outlier detector take as any numeric column; the column of
the images itself holds its counts (missing values) and is not scored for drift.

Fails, writing nothing, when a constraint is violated on a split, or when the share of
outlying training rows (`profile.outliers`, PyOD; listed in `outliers.json` and the report)
is over `profile.outliers.max_rate` by its lower 95% bound.

A split (one Parquet file or a folder of part files) is read in record batches: each batch
is profiled and the profiles merged, so memory does not grow with rows. Set-membership
checks (class labels, categories seen in train, `in_set`) are counted exactly with pyarrow
alongside; whylogs' frequent items are approximate.
"""

import base64
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fullstack_ml.curated import split_path
from fullstack_ml.gates import rate_bounds, rate_over
from fullstack_ml.images import REJECTED, rejection_kind, stat_columns_of, thumbnail_png
from fullstack_ml.outliers import row_outliers
from fullstack_ml.paths import DATA_DIR, METRICS, PROFILE_DIR, SCHEMA, SPLITS
from fullstack_ml.runtime.drift import drift_scores, holm
from fullstack_ml.runtime.drift_pool import drifted
from fullstack_ml.schema import Schema, parse_schema
from fullstack_ml.stage import StageError, atomic_dir, read_json, write_atomic, write_json
from stages.profile.batches import (
    BATCH_ROWS,
    SplitSource,
    iter_batches,
    profile_bytes,
    profile_split,
    profile_splits,
    profiled_frame,
    ray_data,
)
from stages.profile.constraints import (
    build_checks,
    check_constraints,
    raise_on_failures,
    vocabulary_checks,
)
from stages.profile.report import column_summary, render_html

log = logging.getLogger("stages.profile")
SAMPLES_PER_CLASS = 5  # thumbnails per class in the reports: train's first, in split order
SAMPLED_CLASSES = 40  # classes shown with thumbnails (each class's count is shown)
REJECTED_SHOWN = 100  # rejected files listed by name (every one is counted by its reason)


def profile(
    splits: Mapping[str, SplitSource],
    schema: dict[str, Any],
    cfg: DictConfig,
    out_dir: Path,
    engine: str = "pandas",
    address: str | None = None,
    rejected: Path | None = None,
) -> dict[str, Any]:
    """Profile every split, check constraints, score drift against train, write `out_dir`.

    Args:
        splits: split name -> a Parquet file or folder of part files, a frame, or a
            callable yielding record batches or frames; must include "train".
        schema: the parsed `schema.json`.
        cfg: the `profile` config section.
        out_dir: replaced, on success only, by the profiles and reports.
        engine: "pandas" (batches one after another here) or "ray" (Ray Data tasks).
        address: with engine "ray", the Ray cluster to join (None: a local Ray).
        rejected: ingest's `rejected.csv` of an image set (path, reason), if any.

    Returns:
        The summary written to the metrics file.
    """
    if "train" not in splits:
        raise StageError("profile: no train split (drift and constraints are against it)")
    parsed = parse_schema(schema)
    constraints = OmegaConf.to_container(cfg.constraints, resolve=True)
    checks = build_checks(constraints, parsed, splits)  # a bad key fails before profiling
    set_checks = {c.set_check for c in checks if c.set_check} | set(vocabulary_checks(parsed))
    batch_rows = int(cfg.get("batch_rows") or BATCH_ROWS)
    processes = cfg.get("processes")
    if processes is not None and (not isinstance(processes, int) or processes < 1):
        raise StageError(f"profile.processes: {processes!r} is not a number >= 1 or null")
    images = parsed.images
    stats = stat_columns_of(images)  # image feature -> its statistics' columns
    profiled = [c for column in parsed.columns for c in (column, *stats.get(column, ()))]
    if engine == "ray":
        with ray_data(address):  # one Ray for all the splits
            profiles = {
                n: profile_split(s, set_checks, batch_rows, engine, n, images=images)
                for n, s in splits.items()
            }
    elif engine == "pandas":
        profiles = profile_splits(splits, set_checks, batch_rows, processes, images)
    else:
        raise StageError(f"engine: unknown engine {engine!r} (pandas | ray)")
    for name, source in splits.items():
        if profiles[name].view is None:
            where = f" ({source})" if isinstance(source, (str, os.PathLike)) else ""
            raise StageError(f"{name} split{where}: no data")
        missing = [c for c in profiled if profiles[name].view.get_column(c) is None]
        if missing:
            raise StageError(f"{name} split: column {missing[0]!r} of schema.json is missing")
        log.info("profiled %s: %d rows", name, profiles[name].rows)
    report = check_constraints(checks, profiles)
    raise_on_failures(report)
    log.info("constraints: %d passed on %s", len(report), ", ".join(profiles))
    views = {name: p.view for name, p in profiles.items()}
    categorical = parsed.categorical
    target = parsed.target if parsed.task == "classification" else None
    # an image column's profile holds its counts alone (Chi-square on no items: p = 1);
    # its drift is its statistics', so it is left out of the scores and of Holm's count
    drift = {
        s: holm(
            {
                c: score
                for c, score in drift_scores(views[s], views["train"], target, categorical).items()
                if c not in images
            }
        )
        for s in splits
        if s != "train"
    }
    for split, scores in drift.items():
        log.info(
            "drift %s vs train: %d of %d columns DRIFT %s",
            split,
            len(drifted(scores)),
            len(scores),
            drifted(scores) or "",
        )
    bad = {s: drifted(d) for s, d in drift.items() if drifted(d)}
    if cfg.drift.fail_on_drift and bad:
        raise StageError(f"drift against train (profile.drift.fail_on_drift): {bad}")
    outliers = training_outliers(splits["train"], parsed, cfg.get("outliers"), batch_rows)
    classes = None
    if parsed.task == "classification":
        classes = {n: class_counts(s, parsed, batch_rows) for n, s in splits.items()}
    pictures = None
    if images:
        pictures = image_facts(splits["train"], parsed, outliers, rejected, batch_rows)
    kinds = {c: parsed.kind(c) for c in parsed.columns}
    kinds |= {c: "numeric" for columns in stats.values() for c in columns}
    vocab = {c.column: c for c in vocabulary_checks(parsed)}
    summaries: dict[str, dict[str, Any]] = {}
    for name, prof in profiles.items():
        columns = {c: column_summary(prof.view, c, kinds[c]) for c in profiled}
        for c, check in vocab.items():
            columns[c]["unseen"] = prof.outside(check)
        summaries[name] = {"rows": prof.rows, "columns": columns}
    with atomic_dir(out_dir) as tmp:
        for name, view in views.items():
            (tmp / f"{name}.bin").write_bytes(profile_bytes(view))
        write_json(tmp / "constraints.json", report)
        write_json(tmp / "drift.json", drift)
        if outliers:
            write_json(tmp / "outliers.json", outliers)
        if classes is not None:
            write_json(tmp / "classes.json", classes)
        if pictures is not None:
            write_json(tmp / "images.json", pictures)
        page = render_html(summaries, report, drift, parsed, outliers, classes, pictures)
        write_atomic(tmp / "report.html", page)
    summary = {  # the headline figures (row counts: schema.json)
        "constraints_passed": len(report),
        "drifted_columns": {s: len(drifted(d)) for s, d in drift.items()},
    }
    if outliers:
        summary["outlier_rows_rate"] = round(outliers["rate"], 6)
    if parsed.categories:  # the rate of values unseen in train, per categorical feature
        summary["unseen_categories"] = {
            name: {c: round(p.outside(vocab[c])["rate"], 6) for c in parsed.categories}
            for name, p in profiles.items()
            if name != "train"
        }
    return summary


def training_outliers(
    source: SplitSource, schema: Any, cfg: DictConfig | None, batch_rows: int
) -> dict[str, Any] | None:
    """The outlying training rows (`fullstack_ml.outliers.row_outliers`) by `cfg`
    (`profile.outliers`; None: not looked for); a StageError when their share is over
    `max_rate` by its lower 95% bound (a few rows of a small split are no evidence)."""
    if not cfg:
        return None
    # an image's statistics are numeric features here (`fullstack_ml.images.with_image_stats`)
    numeric = [*schema.numeric, *(c for cs in stat_columns_of(schema.images).values() for c in cs)]
    features = [*numeric, *schema.categorical]
    frames, rows = [], 0
    columns = None if schema.images else [*schema.features]  # ingest's image statistics too
    for batch in iter_batches(source, batch_rows, columns):
        frames.append(profiled_frame(batch, schema.images, "train split", rows)[features])
        rows += batch.num_rows
    train = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=features)
    try:
        detector = instantiate(cfg.detector)
    except Exception as err:  # hydra wraps import and argument errors alike
        raise StageError(f"profile.outliers.detector: {err}") from None
    found = row_outliers(
        train, numeric, schema.categorical, detector, cfg.fence, cfg.top, cfg.max_fit_rows
    )
    log.info(
        "outlying training rows (%s): %d of %d", found["detector"], found["outliers"], found["rows"]
    )
    limit = cfg.get("max_rate")
    if limit is not None and rate_over(found["outliers"], found["rows"], limit):
        low = rate_bounds(found["outliers"], found["rows"])[0]
        top = ", ".join(
            f"{r['row']} ({r['features'][0]['feature']})" for r in found["top"][:3] if r["features"]
        )
        raise StageError(
            f"train split: {found['outliers']} of {found['rows']} rows are outliers"
            f" ({found['rate']:.2%}, at least {100 * low:.2g}% at 95%), over"
            f" profile.outliers.max_rate {limit:.2%}; the oddest rows: {top}"
        )
    return found


def class_counts(source: SplitSource, schema: Schema, batch_rows: int) -> dict[str, int]:
    """Rows per class of a split, exactly (pyarrow), the schema's classes first in its order
    (0 where absent), then any other value; missing values are not counted."""
    counts = {str(c): 0 for c in schema.classes}
    for batch in iter_batches(source, batch_rows, [schema.target]):
        column = batch.column(schema.target)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        for item in pc.value_counts(column.drop_null()).to_pylist():
            key = str(item["values"])
            counts[key] = counts.get(key, 0) + int(item["counts"])
    known = {str(c) for c in schema.classes}
    return {k: counts[k] for k in counts if k in known} | {
        k: counts[k] for k in sorted(counts) if k not in known
    }


def image_facts(
    train: SplitSource,
    schema: Schema,
    outliers: dict[str, Any] | None,
    rejected: Path | None,
    batch_rows: int,
) -> dict[str, Any]:
    """What the reports show of an image set (`images.json`): per image feature its size,
    mode, statistics and thumbnails (base64 PNG) of train's first `SAMPLES_PER_CLASS`
    images of each of the first `SAMPLED_CLASSES` classes, in split order; the oddest
    training images (the outlier detector's top rows), and the files ingest rejected."""
    target, features = schema.target, schema.image
    classes = [str(c) for c in schema.classes][:SAMPLED_CLASSES]
    samples: dict[str, dict[str, list[str]]] = {f: {c: [] for c in classes} for f in features}
    odd = {r["row"]: r for r in (outliers or {}).get("top", [])}
    oddest: dict[int, dict[str, Any]] = {}
    wanted = len(classes) * SAMPLES_PER_CLASS
    taken, rows = 0, 0
    shown = samples[features[0]]
    for batch in iter_batches(train, batch_rows):  # all columns: "path" where there is one
        labels = [str(v) for v in batch.column(target).to_pylist()]
        paths = batch.column("path").to_pylist() if "path" in batch.column_names else None
        values = {f: batch.column(f).to_pylist() for f in features}
        for i, label in enumerate(labels):
            row = rows + i
            if row in odd:
                oddest[row] = {
                    "row": row,
                    "path": paths[i] if paths else None,
                    "score": odd[row]["score"],
                    "outlier": odd[row]["outlier"],
                    "images": {f: _thumbnail(values[f][i]) for f in features},
                }
            whole = all(values[f][i] is not None for f in features)
            if whole and label in shown and len(shown[label]) < SAMPLES_PER_CLASS:
                for f in features:
                    samples[f][label].append(_thumbnail(values[f][i]))
                taken += 1
        rows += batch.num_rows
        if taken >= wanted and len(oddest) == len(odd):
            break
    return {
        "features": {
            f: {
                **{k: schema.images[f][k] for k in ("size", "mode", "resize")},
                "stats": stat_columns_of({f: schema.images[f]})[f],
                "samples": samples[f],
            }
            for f in features
        },
        "oddest": [oddest[r] for r in odd if r in oddest],  # the detector's order
        "rejected": rejected_files(rejected),
    }


def _thumbnail(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(thumbnail_png(bytes(value))).decode()


def rejected_files(path: Path | None) -> dict[str, Any]:
    """ingest's `rejected.csv` (path, reason): the count, the count by kind of reason
    (`fullstack_ml.images.rejection_kind`) and the first `REJECTED_SHOWN` files."""
    if path is None or not Path(path).exists():
        return {"files": 0, "kinds": {}, "shown": []}
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise StageError(f"{path}: cannot read as CSV: {err}") from None
    for column in ("path", "reason"):
        if column not in frame.columns:
            raise StageError(f"{path}: column {column!r} missing (ingest writes path, reason)")
    kinds = frame["reason"].map(rejection_kind)
    return {
        "files": len(frame),
        "kinds": {str(k): int(n) for k, n in kinds.value_counts(sort=False).items()},
        "shown": [
            [p, r, k]
            for p, r, k in zip(
                frame["path"][:REJECTED_SHOWN],
                frame["reason"][:REJECTED_SHOWN],
                kinds[:REJECTED_SHOWN],
                strict=True,
            )
        ],
    }


def main(cfg: DictConfig) -> None:
    schema = read_json(SCHEMA)
    splits = {name: split_path(name) for name in SPLITS}
    engine = OmegaConf.select(cfg, "data.engine", default="pandas") or "pandas"
    address = OmegaConf.select(cfg, "cluster.address")
    rejected = DATA_DIR / REJECTED  # an image set's, from ingest
    summary = profile(splits, schema, cfg.profile, PROFILE_DIR, engine, address, rejected)
    write_json(METRICS["profile"], summary)
    log.info(
        "wrote %s (profiles, constraints, drift, report.html), %s", PROFILE_DIR, METRICS["profile"]
    )
