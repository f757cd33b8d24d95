"""profile: whylogs profiles of the curated splits, data-quality constraints, drift.

Writes `reports/profile/{train,val,test}.bin` (whylogs profiles), `constraints.json`,
`drift.json` and `report.html` (self-contained), and `metrics/profile.json`.
Fails, writing nothing, when a constraint is violated on a split, or when the share of
outlying training rows (`profile.outliers`, PyOD; listed in `outliers.json` and the report)
is over `profile.outliers.max_rate` by its lower 95% bound.

A split (one Parquet file or a folder of part files) is read in record batches: each batch
is profiled and the profiles merged, so memory does not grow with rows. Set-membership
checks (class labels, categories seen in train, `in_set`) are counted exactly with pyarrow
alongside; whylogs' frequent items are approximate.
"""

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fullstack_ml.curated import split_path
from fullstack_ml.gates import rate_bounds, rate_over
from fullstack_ml.outliers import row_outliers
from fullstack_ml.paths import METRICS, PROFILE_DIR, SCHEMA, SPLITS
from fullstack_ml.runtime.drift import drift_scores
from fullstack_ml.runtime.drift_pool import drifted
from fullstack_ml.schema import parse_schema
from fullstack_ml.stage import StageError, atomic_dir, read_json, write_atomic, write_json
from stages.profile.batches import (
    BATCH_ROWS,
    SplitSource,
    batch_frame,
    iter_batches,
    profile_bytes,
    profile_split,
    profile_splits,
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


def profile(
    splits: Mapping[str, SplitSource],
    schema: dict[str, Any],
    cfg: DictConfig,
    out_dir: Path,
    engine: str = "pandas",
    address: str | None = None,
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
    if engine == "ray":
        with ray_data(address):  # one Ray for all the splits
            profiles = {
                n: profile_split(s, set_checks, batch_rows, engine, n) for n, s in splits.items()
            }
    elif engine == "pandas":
        profiles = profile_splits(splits, set_checks, batch_rows, processes)
    else:
        raise StageError(f"engine: unknown engine {engine!r} (pandas | ray)")
    for name, source in splits.items():
        if profiles[name].view is None:
            where = f" ({source})" if isinstance(source, (str, os.PathLike)) else ""
            raise StageError(f"{name} split{where}: no data")
        missing = [c for c in parsed.columns if profiles[name].view.get_column(c) is None]
        if missing:
            raise StageError(f"{name} split: column {missing[0]!r} of schema.json is missing")
        log.info("profiled %s: %d rows", name, profiles[name].rows)
    report = check_constraints(checks, profiles)
    raise_on_failures(report)
    log.info("constraints: %d passed on %s", len(report), ", ".join(profiles))
    views = {name: p.view for name, p in profiles.items()}
    categorical = parsed.categorical
    target = parsed.target if parsed.task == "classification" else None
    drift = {
        s: drift_scores(views[s], views["train"], target, categorical)
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
    vocab = {c.column: c for c in vocabulary_checks(parsed)}
    summaries: dict[str, dict[str, Any]] = {}
    for name, prof in profiles.items():
        columns = {c: column_summary(prof.view, c, parsed.kind(c)) for c in parsed.columns}
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
        page = render_html(summaries, report, drift, parsed, outliers)
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
    features = [*schema.numeric, *schema.categorical]
    frames = [batch_frame(b) for b in iter_batches(source, batch_rows, features)]
    train = pd.concat(frames, ignore_index=True)[features] if frames else pd.DataFrame()
    try:
        detector = instantiate(cfg.detector)
    except Exception as err:  # hydra wraps import and argument errors alike
        raise StageError(f"profile.outliers.detector: {err}") from None
    found = row_outliers(
        train, schema.numeric, schema.categorical, detector, cfg.fence, cfg.top, cfg.max_fit_rows
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


def main(cfg: DictConfig) -> None:
    schema = read_json(SCHEMA)
    splits = {name: split_path(name) for name in SPLITS}
    engine = OmegaConf.select(cfg, "data.engine", default="pandas") or "pandas"
    address = OmegaConf.select(cfg, "cluster.address")
    summary = profile(splits, schema, cfg.profile, PROFILE_DIR, engine, address)
    write_json(METRICS["profile"], summary)
    log.info(
        "wrote %s (profiles, constraints, drift, report.html), %s", PROFILE_DIR, METRICS["profile"]
    )
