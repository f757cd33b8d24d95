"""predict: score a table of new rows with the model the pipeline built, or with a bento (a
released one), as the service would answer each row.

Reads `predict.input` with the ingest stage's sources (a file, a glob, a partitioned Parquet
folder, an s3:// URL, a SQL table or query), types each feature as the model's `schema.json`
says, and scores batches of `predict.batch_rows` with the bento's runtime: the training
preprocessing and the compressed program on the execution path the compress stage measured
fastest for batches of that size (every batch runs on it).
Writes, each through a temporary file (or staging table) that replaces the destination only
once the run has succeeded (a failed run leaves the previous files and table, or none):
- `predict.output` (.parquet or .csv, a local path or an fsspec URL; or a SQLAlchemy URL with
  `predict.output_table`): the id columns (or `row`, the input's row number), `label` and
  `proba_<class>` per class (or `value`), `outlier` and `outlier_score` (as the service's);
- `predict.rejects` (CSV): each row the service would refuse (a feature that is not a number,
  not finite, or out of the model's range), with `row`, the id columns and the reason;
- `metrics/predict.json` (rows, predicted, rejected, reject rate, drifted features,
  outliers and their rate) and
  `reports/predict.html` (drift of a uniform sample of the scored rows against the training
  profile).
Fails when the reject rate passes `predict.max_reject_rate` or the drifted features pass
`predict.max_drifted_features`: predictions + rejects always equal the input rows.
"""

import contextlib
import html
import logging
import os
import pickle
import tarfile
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fullstack_ml.card import page, table
from fullstack_ml.gates import rate_bounds, rate_over
from fullstack_ml.paths import (
    COMPRESS_DETAILS,
    COMPRESSED_DIR,
    METRICS,
    PREDICT_REPORT,
    REFERENCE_PROFILE,
    SCHEMA,
)
from fullstack_ml.progress import track
from fullstack_ml.runtime.drift import drift_scores, load_profile, new_profile, reproducible
from fullstack_ml.runtime.drift_pool import drifted
from fullstack_ml.runtime.engine import Engine, load_engine, softmax
from fullstack_ml.runtime.meta import read_meta
from fullstack_ml.runtime.outliers import Detector, load_detector
from fullstack_ml.runtime.preprocess import Preprocessor
from fullstack_ml.sources import (
    db_problem,
    iter_source,
    open_url,
    sql_engine,
    sql_url,
    storage_problem,
)
from fullstack_ml.stage import UMASK, StageError, read_json, run, write_atomic, write_json

log = logging.getLogger("stages.predict")
OUTLIER_COLUMNS = ["outlier", "outlier_score"]  # the bento's outlier detector's answers


class Model(NamedTuple):
    """What scoring needs, from the pipeline's files or from a bento's model."""

    dir: Path  # model.pt2 and model.json (and fp32.pt2 where shipped)
    schema: dict[str, Any]
    serving: dict[str, Any] | None  # the measured execution plan (None: eager)
    reference: Path  # the training profile, for drift
    name: str  # for messages and metrics


@contextmanager
def open_model(bento: str | None) -> Iterator[Model]:
    """The pipeline's `models/compressed` (`bento` None), or the model inside a bento file,
    unpacked into a temporary folder for the run."""
    if not bento:
        yield Model(
            COMPRESSED_DIR,
            read_json(SCHEMA),
            read_json(COMPRESS_DETAILS).get("serving"),
            REFERENCE_PROFILE,
            str(COMPRESSED_DIR),
        )
        return
    path = Path(bento)
    if not path.is_file():
        raise StageError(f"predict.bento: {bento}: not found")
    with tempfile.TemporaryDirectory(prefix="predict-bento-") as tmp:
        try:
            with tarfile.open(path) as tar:
                wanted = [m for m in tar.getmembers() if m.name.lstrip("./").startswith("models/")]
                tar.extractall(tmp, members=wanted, filter="data")
        except (tarfile.TarError, OSError) as err:
            raise StageError(f"predict.bento: {bento}: not a bento file ({err})") from None
        found = sorted(Path(tmp).glob("models/*/*/model.json"))
        if len(found) != 1:
            raise StageError(f"predict.bento: {bento}: holds {len(found)} models, not one")
        folder = found[0].parent
        serving = folder / "serving.json"
        yield Model(
            folder,
            read_json(folder / "schema.json"),
            read_json(serving) if serving.exists() else None,
            folder / "reference_profile.bin",
            f"{bento} ({folder.parent.name}:{folder.name})",
        )


def check_batch(frame: pd.DataFrame, pre: Preprocessor) -> tuple[dict[str, Any], np.ndarray]:
    """The model's features of `frame` typed as in training (feature -> array), and per row
    the reason the service would refuse it (None: the row is scored), the first failing
    feature's."""
    reasons = np.full(len(frame), None, dtype=object)
    typed = {}
    for name, (low, high) in zip(pre.numeric, pre.limits(), strict=True):
        raw = frame[name]
        if pd.api.types.is_bool_dtype(raw):  # true/false is no number to the service either
            values, text = np.full(len(raw), np.nan), raw.notna().to_numpy()
        elif pd.api.types.is_numeric_dtype(raw):
            values, text = raw.to_numpy(dtype="float64", na_value=np.nan), None
        else:  # text (a CSV column, say): numbers in it are numbers
            values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
            text = raw.notna().to_numpy() & np.isnan(values)
        with np.errstate(invalid="ignore"):
            outside = (values < low) | (values > high)
        checks = [(np.isinf(values), "not finite"), (outside & ~np.isinf(values), "")]
        for bad, why in [(text, "not a number"), *checks]:
            if bad is not None and bad.any():
                why = why or f"outside the model's range [{low:.4g}, {high:.4g}]"
                reasons[bad & (reasons == None)] = f"{name}: {why}"  # noqa: E711  elementwise
        typed[name] = values
    for name in pre.categorical:  # any value is a category; an unseen one counts as unknown
        raw = frame[name]
        typed[name] = raw.where(raw.isna(), raw.astype(str)).to_numpy(dtype=object)
    return typed, reasons


def score(
    engine: Engine,
    pre: Preprocessor,
    meta: dict[str, Any],
    typed: dict[str, Any],
    size: int,
    detector: Detector,
) -> pd.DataFrame:
    """The service's answers for rows that passed `check_batch`, scored `size` rows per
    call: `label` and `proba_<class>` per class (classification), or `value` (regression),
    then `outlier` and `outlier_score` (the bento's outlier detector)."""
    rows = len(next(iter(typed.values())))
    # encoded `size` rows at a time, each batch's arrays in cache (1M rows of 64 features:
    # 0.28 s in batches of 1024 against 1.06 s in parts of 131,072 rows, 3.3 s at once)
    outs, scores = [], []
    for i in range(0, rows, size):
        x = pre.encode({k: v[i : i + size] for k, v in typed.items()})
        outs.append(engine(x))
        scores.append(detector.score(x, outs[-1]))
    out, odd = np.concatenate(outs), np.concatenate(scores)
    flags = {"outlier": detector.flags(odd), "outlier_score": odd}
    if meta["task"] == "regression":
        value = out[:, 0].astype("float64") * pre.target_std + pre.target_mean
        return pd.DataFrame({"value": value, **flags})
    probs = softmax(out).astype("float64")
    classes = meta["classes"]
    answer = {"label": np.asarray(classes)[probs.argmax(1)]}
    answer |= {f"proba_{c}": probs[:, i] for i, c in enumerate(classes)}
    return pd.DataFrame(answer | flags)


FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


class TableFile:
    """A table written batch by batch to a local temporary file that replaces `dest` on
    `commit()` (a rename beside a local `dest`; one upload to a URL), and is removed on
    `discard()`: a reader of `dest` sees the previous file or the whole new one."""

    def __init__(self, dest: str, key: str, storage_options: dict | None = None) -> None:
        suffix = os.path.splitext(dest.lower())[1]
        if suffix not in FORMATS:
            raise StageError(f"{key}: {dest}: write .parquet or .csv")
        self.dest, self.key, self.format = dest, key, FORMATS[suffix]
        self.remote = "://" in dest and not dest.startswith("file://")
        self.options = storage_options or {}
        folder = None if self.remote else Path(dest).parent
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{Path(dest).name}.tmp-", dir=folder)
        os.close(fd)
        self.writer: Any = None  # a Parquet file's
        self.started, self.rows = False, 0

    def write(self, frame: pd.DataFrame) -> None:
        if self.format == "csv":  # the header once, then rows
            frame.to_csv(
                self.tmp, mode="a" if self.started else "w", header=not self.started, index=False
            )
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.tmp, table.schema.remove_metadata())
            self.writer.write_table(table.cast(self.writer.schema))
        self.started = True
        self.rows += len(frame)

    def finish(self, empty: pd.DataFrame) -> None:
        """Close the file; `empty` (no rows, the columns) is written when nothing was."""
        if not self.started:
            self.write(empty)
        if self.writer is not None:
            self.writer.close()
        os.chmod(self.tmp, 0o666 & ~UMASK)

    def commit(self) -> None:
        """Move the finished file into place."""
        if not self.remote:
            os.replace(self.tmp, self.dest)
            return
        fs, path = open_url(self.dest, self.options, self.key)
        try:
            fs.put_file(self.tmp, path)
        except Exception as err:
            raise StageError(f"{self.dest}: {storage_problem(err, remote=True)}") from None
        finally:
            Path(self.tmp).unlink(missing_ok=True)

    def discard(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):  # already closed
                self.writer.close()
        Path(self.tmp).unlink(missing_ok=True)


class SqlTable:
    """A table written batch by batch to a staging table that replaces `table` in one
    transaction on `commit()` (PostgreSQL and SQLite change tables transactionally) and is
    dropped on `discard()`: a reader sees the previous table or the whole new one."""

    def __init__(self, url: str, table: str, key: str) -> None:
        self.parsed = sql_url(url, key)
        self.where = f"{self.parsed.render_as_string(hide_password=True)} table {table}"
        self.engine = sql_engine(self.parsed, self.where, must_exist=False)
        schema, _, self.name = table.rpartition(".")
        self.schema = schema or None
        self.staging = f"{self.name}__predict_{os.getpid()}"
        self.started, self.rows = False, 0

    def _run(self, action: Any) -> None:
        import sqlalchemy as sa

        try:
            action()
        except sa.exc.DBAPIError as err:
            raise StageError(f"{self.where}: {db_problem(err, self.parsed)}") from None
        except sa.exc.SQLAlchemyError as err:
            raise StageError(f"{self.where}: {str(err).splitlines()[0]}") from None

    def write(self, frame: pd.DataFrame) -> None:
        mode = "append" if self.started else "replace"
        self._run(
            lambda: frame.to_sql(
                self.staging, self.engine, schema=self.schema, if_exists=mode, index=False
            )
        )
        self.started, self.rows = True, self.rows + len(frame)

    def finish(self, empty: pd.DataFrame) -> None:
        if not self.started:
            self.write(empty)

    def commit(self) -> None:
        import sqlalchemy as sa

        quote = self.engine.dialect.identifier_preparer.quote
        staging = ".".join(quote(p) for p in (self.schema, self.staging) if p)

        def swap() -> None:
            with self.engine.begin() as conn:
                target = sa.Table(self.name, sa.MetaData(), schema=self.schema)
                conn.execute(sa.schema.DropTable(target, if_exists=True))
                conn.execute(sa.text(f"ALTER TABLE {staging} RENAME TO {quote(self.name)}"))

        self._run(swap)
        self.engine.dispose()

    def discard(self) -> None:
        import sqlalchemy as sa

        with contextlib.suppress(sa.exc.SQLAlchemyError), self.engine.begin() as conn:
            staging = sa.Table(self.staging, sa.MetaData(), schema=self.schema)
            conn.execute(sa.schema.DropTable(staging, if_exists=True))
        self.engine.dispose()


class Sample:
    """A uniform sample of at most `size` rows of a stream of parts (feature -> array): each
    row gets a uniform random key and the rows of the `size` smallest keys are kept
    (bottom-k sampling). Bounded memory, one whylogs profile at the end, and samples merge:
    a row that did not enter a part of the stream's sample cannot be in the whole's, so
    Ray's actors send the driver only the rows that entered their own."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.rng = size, np.random.default_rng(seed)
        self.keys = np.empty(0)
        self.rows: dict[str, np.ndarray] = {}

    def add(self, part: dict[str, np.ndarray], keys: np.ndarray | None = None) -> np.ndarray:
        """Add a part's rows (`keys`: theirs; None: drawn here; `part` may be empty, to keep
        keys only). Returns which of them entered the sample."""
        if keys is None:
            keys = self.rng.random(len(next(iter(part.values()))))
        full = len(self.keys) >= self.size
        taken = keys < (self.keys.max() if full else np.inf)
        new = keys[taken]
        if not len(new):
            return taken
        rows = {c: v[taken] for c, v in part.items()}
        if not full:  # every row enters; past `size`, the largest keys leave
            self.keys = np.concatenate([self.keys, new])
            self.rows = {
                c: np.concatenate([self.rows[c], v]) if self.rows else v for c, v in rows.items()
            }
            if len(self.keys) > self.size:
                keep = np.sort(np.argpartition(self.keys, self.size - 1)[: self.size])
                self.keys, self.rows = self.keys[keep], {c: v[keep] for c, v in self.rows.items()}
            return taken
        keep = np.argpartition(np.concatenate([self.keys, new]), self.size - 1)[: self.size]
        slots = np.setdiff1d(np.arange(self.size), keep, assume_unique=True)  # in place
        incoming = keep[keep >= self.size] - self.size
        self.keys[slots] = new[incoming]
        for c, v in rows.items():
            self.rows[c][slots] = v[incoming]
        return taken

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, copy=False)


def answer_columns(meta: dict[str, Any]) -> list[str]:
    if meta["task"] == "regression":
        return ["value", *OUTLIER_COLUMNS]
    return ["label", *(f"proba_{c}" for c in meta["classes"]), *OUTLIER_COLUMNS]


class Runtime(NamedTuple):
    """The service's runtime for one model, loaded once per process (or Ray actor)."""

    meta: dict[str, Any]
    pre: Preprocessor
    engine: Engine
    size: int  # rows per model call
    ids: list[str]
    detector: Detector


def load_runtime(
    model: Path, serving: dict | None, size: int, ids: list[str], runtime: str, threads: int
) -> Runtime:
    """The model on `runtime` (`predict.runtime`, the server's), with `threads` intra-op
    threads (the server's, so that Inductor compiles the server's kernels; an actor: 1)."""
    meta = read_meta(model)
    pre = Preprocessor.from_dict(meta["preprocessing"])
    try:
        engine = load_engine(model, serving, pre.width, runtime, threads, log, batch=size)
    except ValueError as err:
        raise StageError(f"predict.runtime: {err}") from None
    try:
        detector = load_detector(model)
    except FileNotFoundError as err:
        raise StageError(str(err)) from None
    return Runtime(meta, pre, engine, size, ids, detector)


def score_part(
    part: pd.DataFrame, rt: Runtime
) -> tuple[pd.DataFrame, np.ndarray, dict[str, np.ndarray]]:
    """A part's rows answered as the service would, in order: a frame of the id columns
    and the answers (missing on rejected rows), the reason per row (None: scored), and the
    typed features of the scored rows (for the drift sample)."""
    typed, reasons = check_batch(part, rt.pre)
    ok = reasons == None  # noqa: E711  elementwise
    frame = part[rt.ids].reset_index(drop=True)
    good = typed if ok.all() else {k: v[ok] for k, v in typed.items()}
    if ok.any():
        answers = score(rt.engine, rt.pre, rt.meta, good, rt.size, rt.detector)
        answers.index = np.flatnonzero(ok)  # rejected rows: missing answers
        frame = frame.join(answers) if len(frame.columns) else answers.reindex(frame.index)
    else:
        frame = frame.reindex(columns=[*rt.ids, *answer_columns(rt.meta)])
    return frame, reasons, good


Scored = tuple[pd.DataFrame, np.ndarray, dict[str, np.ndarray], np.ndarray | None]


def check_columns(columns: Any, meta: dict[str, Any], ids: list[str], source: str) -> None:
    for column in [*meta["features"], *ids]:
        if column not in columns:
            what = "id column" if column in ids else "feature"
            raise StageError(f"{source}: {what} {column!r} missing (the model needs it)")


def local_parts(
    cfg: DictConfig, model: Model, rt: Runtime, seed: int
) -> tuple[str, Iterator[Scored]]:
    """engine=pandas: the input streamed and scored part by part in this process."""
    source, frames = iter_source(cfg.input, seed, "predict.input", text=rt.pre.numeric)
    first = next(frames, None)
    if first is None or first.empty:
        raise StageError(f"{source}: no data rows")
    check_columns(first.columns, rt.meta, rt.ids, source)
    log.info("scoring %s with %s", source, model.name)
    return source, ((*score_part(part, rt), None) for part in chain([first], frames))


class RayScorer:
    """engine=ray: a Ray Data actor that loads the model once (its files: `files[0]`, a
    reference to file name -> bytes in the object store, so any node can load it) and
    scores blocks; the block's rows that enter the actor's own drift sample go to the
    driver with their keys (pickled into the first row of `__sample`)."""

    def __init__(self, files: list[Any], serving: Any, cfg: dict, seed: int) -> None:
        import ray

        with tempfile.TemporaryDirectory(prefix="predict-model-") as tmp:  # loaded whole
            for name, data in ray.get(files[0]).items():
                (Path(tmp) / name).write_bytes(data)
            size, ids = cfg["batch_rows"], cfg["id_columns"]
            self.rt = load_runtime(Path(tmp), serving, size, ids, cfg["runtime"], 1)
        self.sample = Sample(cfg["drift_rows"], seed) if cfg["drift"] else None
        self.seed = seed

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        frame, reasons, good = score_part(part, self.rt)
        frame["__reason"] = reasons
        blob: list[bytes | None] = [None] * len(frame)
        if self.sample is not None and good and len(next(iter(good.values()))):
            # keys seeded by the block's rows: the same input gives the same sample
            digest = pd.util.hash_pandas_object(part, index=False).to_numpy()
            rng = np.random.default_rng([self.seed, int(digest.sum())])
            keys = rng.random(len(next(iter(good.values()))))
            taken = self.sample.add({}, keys)
            blob[0] = pickle.dumps(({k: v[taken] for k, v in good.items()}, keys[taken]))
        frame["__sample"] = blob
        return frame


def ray_parts(
    cfg: DictConfig, model: Model, meta: dict[str, Any], ids: list[str], seed: int
) -> tuple[str, Iterator[Scored]]:
    """engine=ray: the input as a Ray dataset, scored by `predict.workers` actors
    (`map_batches`), the answers streamed back in the input's order."""
    import ray.data

    from fullstack_ml.ray_session import bounded_ray_data
    from fullstack_ml.ray_source import ray_source, stage_error

    bounded_ray_data()
    warnings.filterwarnings("ignore", "The minimum number of concurrent actors")  # few blocks
    options = ray.data.DataContext.get_current().execution_options
    ordered = options.preserve_order  # restored when the answers are in: the Ray is shared
    options.preserve_order = True  # the driver numbers the rows
    try:
        ds, source, empty = ray_source(cfg.input, seed, "predict.input")
        check_columns([str(c) for c in empty.columns], meta, ids, source)
    except BaseException:
        options.preserve_order = ordered
        raise
    log.info("scoring %s with %s on Ray Data (%d actors)", source, model.name, cfg.workers)
    files = {p.name: p.read_bytes() for p in model.dir.iterdir() if p.is_file()}
    plain = OmegaConf.to_container(cfg)
    scored = ds.map_batches(
        RayScorer,
        fn_constructor_args=([ray.put(files)], model.serving, plain, seed),
        batch_format="pandas",
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=int(cfg.workers)),
        num_cpus=1,
    )

    def parts() -> Iterator[Scored]:
        try:
            for frame in scored.iter_batches(batch_size=None, batch_format="pandas"):
                reasons = frame.pop("__reason").to_numpy(dtype=object)
                blobs = frame.pop("__sample")  # one per actor's block: a batch may join blocks
                found = [pickle.loads(b) for b in blobs[blobs.notna()]]
                rows, keys = {}, None
                if found:
                    rows = {k: np.concatenate([f[0][k] for f in found]) for k in found[0][0]}
                    keys = np.concatenate([f[1] for f in found])
                yield frame, np.where(pd.isna(reasons), None, reasons), rows, keys
        except Exception as err:  # a StageError raised in an actor arrives wrapped
            raise stage_error(err) from None
        finally:
            options.preserve_order = ordered

    return source, parts()


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

            stack.enter_context(ray_session.session(address, cpus=int(cfg.workers)))
            meta = read_meta(model.dir)
            source, parts = ray_parts(cfg, model, meta, ids, seed)
        else:
            rt = load_runtime(model.dir, model.serving, size, ids, cfg.runtime, int(cfg.threads))
            meta = rt.meta
            source, parts = local_parts(cfg, model, rt, seed)
        categorical = Preprocessor.from_dict(meta["preprocessing"]).categorical
        keys = ids or ["row"]
        label = pd.Series(np.asarray(meta.get("classes") or [0])).dtype
        options = OmegaConf.to_container(cfg.storage_options) if cfg.storage_options else {}
        out: TableFile | SqlTable = (
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
                parts, None, "predict", "row", log, lambda p: len(p[0])
            ):
                ok = reasons == None  # noqa: E711  elementwise
                if not ids:
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
                    f"{source}: {rejected} of {rows} rows rejected ({rate:.2%}, at least "
                    f"{rate_bounds(rejected, rows)[0]:.2%} at 95% confidence > "
                    f"predict.max_reject_rate={cfg.max_reject_rate}); most often "
                    f"{reason!r} ({count} rows)"
                )
            scores, sampled = {}, 0
            if sample is not None and predicted:  # whylogs on every row: half of the loop
                profile, rows_sampled = new_profile(), sample.frame()
                sampled = len(rows_sampled)
                profile.track(pandas=rows_sampled)
                view = reproducible(profile.view())
                reference = load_profile(model.reference)
                scores = drift_scores(view, reference, categorical=categorical)
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
        "%d rows: %d predicted -> %s, %d rejected -> %s; %d features drifted",
        *(rows, predicted, cfg.output, rejected, cfg.rejects, len(shifted)),
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
    return {"metrics": figures, "drift": scores, "sampled": sampled, "reasons": reasons}


def report(result: dict[str, Any], source: str, model: str) -> str:
    """`reports/predict.html`: the run's figures, rejects by reason, drift per feature."""
    figures = result["metrics"]
    rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in figures.items()]
    parts = [f"<p>{html.escape(source)}, scored with {html.escape(model)}.</p>"]
    parts.append(table(["figure", "value"], rows))
    if result["reasons"]:
        parts.append("<h2>Rejected rows by reason</h2>")
        parts.append(table(["reason", "rows"], [[r, str(n)] for r, n in result["reasons"].items()]))
    scores = result["drift"]
    if scores:
        order = sorted(scores, key=lambda c: (scores[c] or {}).get("pvalue", 1.0) or 0.0)
        parts.append("<h2>Drift against the training profile (lowest p-value first)</h2>")
        parts.append(
            table(
                ["feature", "p-value", "category"],
                [
                    [c, f"{scores[c]['pvalue']:.3g}", scores[c]["drift_category"]]
                    if scores[c]
                    else [c, "", "not scored"]
                    for c in order
                ],
            )
        )
    return page("Batch predictions", "".join(parts))


def main(cfg: DictConfig) -> None:
    result = predict(cfg.predict, cfg.seed, OmegaConf.select(cfg, "cluster.address"))
    write_json(METRICS["predict"], result["metrics"])
    source = str(cfg.predict.input.get("path") or cfg.predict.input.get("source"))
    write_atomic(PREDICT_REPORT, report(result, source, str(cfg.predict.bento or COMPRESSED_DIR)))


if __name__ == "__main__":
    run(main)
