"""predict: score new rows, or new image files, with the model the pipeline built, or with a
bento (a released one), as the service would answer each.

Reads `predict.input` with the ingest stage's sources (a file, a glob, a partitioned Parquet
folder, an s3:// URL, a SQL table or query), types each feature as the model's `schema.json`
says, and scores batches of `predict.batch_rows` with the bento's runtime: the training
preprocessing and the compressed program on the execution path the compress stage measured
fastest for batches of that size (every batch runs on it). For a model with an image feature
the input may also be image files (`images.py`): a folder of them, a glob, or a manifest.
Writes, each through a temporary file (or staging table) that replaces the destination only
once the run has succeeded (a failed run leaves the previous files and table, or none):
- `predict.output` (.parquet or .csv, a local path or an fsspec URL; or a SQLAlchemy URL with
  `predict.output_table`): the id columns (or `row`, the input's row number; image files:
  `path`), `label` and `proba_<class>` per class (or `value`), `outlier` and `outlier_score`
  (as the service's);
- `predict.rejects` (CSV): each row the service would refuse (a feature that is not a number,
  not finite, or out of the model's range; an image that cannot be read or decoded), with
  `row` or `path`, the id columns and the reason;
- `metrics/predict.json` (rows, predicted, rejected, reject rate, drifted features,
  outliers and their rate) and
  `reports/predict.html` (drift of a uniform sample of the scored rows against the training
  profile; an image by its statistics, `<feature>.<stat>`, as the profile stage profiles it).
Fails when the reject rate passes `predict.max_reject_rate` or the drifted features pass
`predict.max_drifted_features`: predictions + rejects always equal the input rows.

Modules: `model` (the model or bento), `tables` (engine=pandas), `ray_engine` (engine=ray),
`images` (image files), `score` (checks and answers), `sample` (drift), `report`; the
writers are `fullstack_ml.sinks`.
"""

import contextlib
import logging
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fullstack_ml.gates import rate_bounds, rate_over
from fullstack_ml.paths import COMPRESSED_DIR, METRICS, PREDICT_REPORT
from fullstack_ml.progress import track
from fullstack_ml.runtime.drift_pool import drifted
from fullstack_ml.runtime.meta import read_meta
from fullstack_ml.runtime.preprocess import Preprocessor
from fullstack_ml.sinks import Sink, SqlTable, TableFile
from fullstack_ml.stage import StageError, write_atomic, write_json
from stages.predict.model import open_model
from stages.predict.ray_engine import check_tables, ray_parts
from stages.predict.report import report
from stages.predict.sample import Sample, drift
from stages.predict.score import answer_columns, load_runtime
from stages.predict.tables import local_parts

log = logging.getLogger("stages.predict")


def predict(cfg: DictConfig, seed: int, address: str | None = None) -> dict[str, Any]:
    """Score `cfg.input` (the `predict` config) and write the predictions and rejects;
    returns the figures of `metrics/predict.json` and the drift scores per feature.
    `address`: with `predict.engine=ray`, the Ray cluster to join (None: a local Ray)."""
    ids = [str(c) for c in cfg.id_columns or []]
    size = int(cfg.batch_rows)
    if size < 1:
        raise StageError(f"predict.batch_rows: {size} is not a positive number of rows")
    if cfg.engine not in ("pandas", "ray"):
        raise StageError(f"predict.engine: {cfg.engine!r} is not pandas | ray")
    with open_model(cfg.bento) as model, contextlib.ExitStack() as stack:
        if cfg.engine == "ray":
            from fullstack_ml import ray_session

            meta = read_meta(model.dir)
            check_tables(cfg, meta)
            stack.enter_context(ray_session.session(address, cpus=int(cfg.workers)))
            scoring = ray_parts(cfg, model, meta, ids, seed)
        else:
            threads, max_pixels = int(cfg.threads), int(cfg.max_pixels)
            rt = load_runtime(model.dir, model.serving, size, ids, cfg.runtime, threads, max_pixels)
            meta = rt.meta
            scoring = local_parts(cfg, model, rt, seed)
        source, unit, keys = scoring.source, scoring.unit, scoring.ids or ["row"]
        pre = Preprocessor.from_dict(meta["preprocessing"])
        label = pd.Series(np.asarray(meta.get("classes") or [0])).dtype
        options = OmegaConf.to_container(cfg.storage_options) if cfg.storage_options else {}
        out: Sink = (
            SqlTable(str(cfg.output), str(cfg.output_table), "predict.output")
            if cfg.output_table
            else TableFile(str(cfg.output), "predict.output", options)
        )
        rejects = TableFile(str(cfg.rejects), "predict.rejects", options)
        sample = Sample(int(cfg.drift_rows), seed) if cfg.drift else None
        reasons_seen: Counter = Counter()
        rows = outliers = 0
        try:
            # checked and typed a part (a Parquet row group, a CSV block) at a time, scored
            # `size` rows at a time
            for frame, reasons, good, drawn in track(
                scoring.parts, None, "predict", unit[:-1], log, lambda p: len(p[0])
            ):
                ok = reasons == None  # noqa: E711  elementwise
                if not scoring.ids:
                    frame.insert(0, "row", np.arange(rows, rows + len(frame)))
                rows += len(frame)
                if ok.all():
                    out.write(frame)
                elif ok.any():
                    answers = frame[ok].reset_index(drop=True).astype({"outlier": bool})
                    out.write(answers.astype({"label": label}) if "label" in answers else answers)
                if ok.any():
                    outliers += int(frame.loc[ok, "outlier"].astype(bool).sum())
                if not ok.all():
                    rejects.write(frame.loc[~ok, keys].assign(reason=reasons[~ok]))
                    reasons_seen.update(reasons[~ok])
                if sample is not None and good and len(next(iter(good.values()))):
                    sample.add(good, drawn)
            predicted, rejected = out.rows, rejects.rows
            if predicted + rejected != rows:  # never a row lost: a bug, not bad input
                raise AssertionError(f"{predicted} + {rejected} rows written of {rows}")
            rate = rejected / rows
            # on evidence: the rate's lower 95% bound (1 bad row of 10 is no sign of > 1%)
            if rate_over(rejected, rows, cfg.max_reject_rate):
                reason, count = reasons_seen.most_common(1)[0]
                raise StageError(
                    f"{source}: {rejected} of {rows} {unit} rejected ({rate:.2%}, at least "
                    f"{rate_bounds(rejected, rows)[0]:.2%} at 95% confidence > "
                    f"predict.max_reject_rate={cfg.max_reject_rate}); most often "
                    f"{reason!r} ({count} {unit})"
                )
            scores, sampled = {}, 0
            if sample is not None and predicted:
                scores, sampled = drift(sample, model.reference, pre.categorical)
            shifted = drifted(scores)
            limit = cfg.max_drifted_features
            if limit is not None and len(shifted) > limit:
                raise StageError(
                    f"{source}: {len(shifted)} features drifted from training (more than "
                    f"predict.max_drifted_features={limit}): {', '.join(shifted[:5])}"
                )
            out.finish(pd.DataFrame(columns=[*keys, *answer_columns(meta)]))
            rejects.finish(pd.DataFrame(columns=[*keys, "reason"]))
            out.commit()
            rejects.commit()
        except BaseException:
            out.discard()
            rejects.discard()
            raise
    log.info(
        "%d %s: %d predicted -> %s, %d rejected -> %s; %d features drifted",
        *(rows, unit, predicted, cfg.output, rejected, cfg.rejects, len(shifted)),
    )
    figures = {
        "rows": rows,
        "predicted": predicted,
        "rejected": rejected,
        "reject_rate": rate,
        "drifted_features": len(shifted),
        "outliers": outliers,  # rows the bento's detector flags (answers' `outlier`)
        "outlier_rate": outliers / predicted if predicted else 0.0,
    }
    reasons = dict(reasons_seen.most_common())
    return {
        "metrics": figures,
        "drift": scores,
        "sampled": sampled,
        "reasons": reasons,
    }


def main(cfg: DictConfig) -> None:
    result = predict(cfg.predict, cfg.seed, OmegaConf.select(cfg, "cluster.address"))
    write_json(METRICS["predict"], result["metrics"])
    source = str(cfg.predict.input.get("path") or cfg.predict.input.get("source"))
    write_atomic(PREDICT_REPORT, report(result, source, str(cfg.predict.bento or COMPRESSED_DIR)))
