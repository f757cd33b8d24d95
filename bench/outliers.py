"""Outlier-detection benchmark (issue 35): how well each candidate detector tells shifted
rows from ordinary ones, whether the shipped threshold keeps its false-positive rate, and
what scoring costs the service.

1. **AUROC on held-out shifted data**, per shift, for every candidate of
   `fullstack_ml.outliers.candidates`, fitted on train views as the compress stage fits them;
   the one `fit_detector` ships (chosen on val and the pipeline's own shifts of val) is
   marked. Inliers: the test split; outliers: shifted copies of it (the selection saw
   `shifted`'s out_of_range, swapped and noise of val). Target: AUROC >= 0.95 on far shifts.
   - digits (`models/fp32`, `models/compressed/model.pt2`, `data/curated`): *far* shifts
     put ink where train has almost none: Gaussian noise (sd 4 of 0-16, clipped) and
     inversion (16 - x) light the blank background; the rows of scikit-learn's iris, wine,
     breast_cancer and diabetes (each feature min-max scaled to 0-16 over its data set, each
     row tiled to 64 values) are stripes, not strokes; rotation by 90 degrees moves the top
     and bottom rows' ink into the left and right columns, blank in train (std 0-0.1 of
     16: encoded, such a row lies two orders of magnitude further out than a test row).
     Rotation by 180 degrees is *near*: the same strokes upside down in the same frame,
     each pixel within what train shows there; only the shape tells it, and an upturned 0,
     1 or 8 is still a digit, so no detector is expected to reach 0.95 there.
   - wine (scikit-learn, 13 numeric features, split as digits is, the project's MLP
     trained here by a plain torch loop): 1, 2 and 3 features per row pushed past train's
     range by 0.5-2 ranges (the pipeline's own `out_of_range` shift on 1 feature; here on
     test), the two columns of most different scale exchanged, every column moved (a
     random permutation without a fixed point). All far: each moves some value many train
     standard deviations from any train row.
2. **FPR on test at the shipped threshold**, target `outliers.target_fpr` +- 0.5 points:
   digits split anew (stratified, `data.split`'s proportions) for `--splits` seeds, a model
   trained per split here, the detector fitted and its threshold set on val by
   `fit_detector`, the rate it flags on test. The conformal rule's expectation is
   (n + 1 - rank) / (n + 1) of n val rows: below the target (0.74% for 270 rows).
3. **Serving overhead of the outlier score**, target <= 10% of p50 at concurrency 1 and 64:
   the bento (`dist/fullstack_ml.bento`, copied first) served, one-record /predict loaded
   by wrk (or Python threads without wrk); /metrics gives the records per model call. The
   service adds per model call `detector.score`, `detector.flags`, one histogram `observe`
   per record and one counter `inc` (Prometheus values in memory, and mmap'd as under
   `bentoml serve`'s multiprocess mode), and the answers' outlier fields: timed in process
   (median of `--repeats`) at the mean batch of each concurrency's load (the one of median
   p50 of `--rounds`); added: score and flags, the slower observe loop, the fields. Two
   ratios: added / p50, and added x model calls/s (the worker's time share: under
   saturation latency grows by it). An A/B of two HTTP medians would be noise here (1-2 ms
   medians move 0.66-2x between identical runs).

    python -m bench.outliers                  # after `make repro`: models/, data/, dist/
    python -m bench.outliers --splits 50 --duration 20 --rounds 5
    python -m bench.outliers --smoke          # models trained here for 2 epochs: seconds
    python -m bench.outliers --smoke --bento B --url U --split TEST   # serving too

`--smoke` trains its digits and wine models here (2 epochs), re-splits twice, and measures
serving only with `--bento` (and `--url`: a server already serving it; tests/ share one).
"""

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn

from bench.runtime import markdown
from fullstack_ml.outliers import SERVED, Views, auroc, candidates, fit_detector, shifted
from fullstack_ml.paths import SPLITS
from fullstack_ml.runtime.outliers import Detector
from fullstack_ml.runtime.preprocess import Preprocessor
from fullstack_ml.stage import ROOT, compose

BENTO = ROOT / "dist/fullstack_ml.bento"
TEST = ROOT / "data/curated/test.parquet"
PIXELS = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
OTHER_TABLES = ("iris", "wine", "breast_cancer", "diabetes")
FAR = 0.95  # the AUROC target on far shifts
FPR_TOLERANCE = 0.005  # +- 0.5 points
OVERHEAD = 0.10  # of p50
CONCURRENCY = (1, 64)
SPACE = {"mahalanobis": "input", "ecod": "input", "iforest": "input"}
SPACE |= {"max_softmax": "logits", "energy": "logits", "knn_penultimate": "penultimate"}
SMOKE = {"splits": 2, "epochs": 2, "duration": 1, "warmup": 1, "rounds": 1, "repeats": 200}


# --- models and views ------------------------------------------------------------------


def quick_model(
    train: pd.DataFrame, target: str, cfg: DictConfig, epochs: int, seed: int
) -> tuple[Preprocessor, nn.Module]:
    """The project's MLP (conf/model; conf/train's optimizer, lr, batch size) fitted on
    `train` by a plain torch loop: what the model-space candidates need (logits, features)."""
    from hydra.utils import instantiate

    from fullstack_ml.model import build_network, label_indices
    from fullstack_ml.runtime.preprocess import fit_preprocessor

    pre = fit_preprocessor(train, [c for c in train.columns if c != target], [])
    classes = sorted(train[target].unique().tolist())
    torch.manual_seed(seed)
    model = build_network(cfg.model, pre.width, len(classes))
    x = torch.from_numpy(pre.encode_frame(train))
    y = torch.from_numpy(label_indices(train[target], classes))
    optimizer = instantiate(cfg.train.optimizer)(model.parameters(), lr=cfg.train.lr)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(cfg.train.batch_size):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return pre, model.eval()


def views_of(
    pre: Preprocessor, fp32: nn.Module, logits_of: nn.Module
) -> Callable[[pd.DataFrame], Views]:
    """A frame's views as `stages.compress.outliers.fit_outliers` builds them: the encoded
    records, the logits of `logits_of` (the shipped program, or here the FP32 model), the
    FP32 model's penultimate layer."""
    from fullstack_ml.model import predict_logits
    from stages.compress.outliers import penultimate

    def views(frame: pd.DataFrame) -> Views:
        x = pre.encode_frame(frame)
        return {"x": x, "logits": predict_logits(logits_of, x), "features": penultimate(fp32, x)}

    return views


def pipeline_digits() -> tuple[Preprocessor, Callable[[pd.DataFrame], Views], dict]:
    """The pipeline's preprocessing, views (FP32 model, compressed program) and splits."""
    from fullstack_ml.curated import load_split
    from fullstack_ml.model import load_fp32, preprocessor
    from fullstack_ml.runtime.program import load_program

    needed = [ROOT / "models/fp32/model.pt", ROOT / "models/compressed/model.pt2", TEST]
    if missing := [str(p.relative_to(ROOT)) for p in needed if not p.is_file()]:
        sys.exit(f"error: {', '.join(missing)} not found: run `make repro` first")
    fp32, meta = load_fp32(ROOT / "models/fp32")
    pre = preprocessor(meta)
    program = load_program(ROOT / "models/compressed/model.pt2")
    return pre, views_of(pre, fp32, program), {s: load_split(s) for s in SPLITS}


def resplit(data: pd.DataFrame, cfg: DictConfig, seed: int) -> dict[str, pd.DataFrame]:
    """`data` split as the ingest stage splits it (`data.split`), with `seed`."""
    from stages.ingest.split import split_table

    return split_table(data, "target", cfg.data.split, seed, "classification")


# --- shifts ----------------------------------------------------------------------------


def other_table(name: str) -> np.ndarray:
    """The rows of another scikit-learn data set as digits: each feature min-max scaled to
    0-16 over the data set, each row tiled to 64 values, rounded (digits are integers)."""
    import sklearn.datasets

    x = getattr(sklearn.datasets, f"load_{name}")().data.astype(np.float64)
    low, high = x.min(0), x.max(0)
    x = 16 * (x - low) / np.where(high > low, high - low, 1.0)
    return np.round(np.tile(x, -(-64 // x.shape[1]))[:, :64])


def digits_shifts(test: pd.DataFrame, seed: int) -> dict[str, tuple[str, pd.DataFrame]]:
    """Held-out shifts of digits' `test`: name -> (far or near, frame of pixels)."""
    rng = np.random.default_rng(seed)
    x = test[PIXELS].to_numpy(np.float64)
    noise = np.clip(np.round(x + rng.normal(0, 4, x.shape)), 0, 16)

    def frame(v: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(v, columns=PIXELS)

    def rotated(quarters: int) -> pd.DataFrame:
        return frame(np.rot90(x.reshape(-1, 8, 8), quarters, axes=(1, 2)).reshape(-1, 64))

    out = {"noise": ("far", frame(noise)), "inversion": ("far", frame(16 - x))}
    out |= {name: ("far", frame(other_table(name))) for name in OTHER_TABLES}
    return out | {"rotation_90": ("far", rotated(1)), "rotation_180": ("near", rotated(2))}


def wine_shifts(
    test: pd.DataFrame, train: pd.DataFrame, numeric: list[str], seed: int
) -> tuple[dict[str, tuple[str, pd.DataFrame]], str]:
    """Held-out shifts of wine's `test` (all far) and a line naming the swapped columns."""
    rng = np.random.default_rng(seed)
    low, high = train[numeric].min().to_numpy(), train[numeric].max().to_numpy()
    span, x = high - low, test[numeric].to_numpy(np.float64)
    out = {}
    for k in (1, 2, 3):
        pushed = x.copy()
        for row in range(len(x)):
            cols = rng.choice(len(numeric), k, replace=False)
            far = rng.uniform(0.5, 2.0, k) * span[cols]
            up = rng.random(k) < 0.5
            pushed[row, cols] = np.where(up, high[cols] + far, low[cols] - far)
        out[f"out_of_range_{k}"] = ("far", pushed)
    scale = train[numeric].abs().median().to_numpy()
    a, b = int(scale.argmax()), int(scale.argmin())
    swapped = x.copy()
    swapped[:, [a, b]] = x[:, [b, a]]
    out["swap_2"] = ("far", swapped)
    order = np.arange(len(numeric))
    while (order == np.arange(len(numeric))).any():  # a permutation moving every column
        order = rng.permutation(len(numeric))
    out["permuted"] = ("far", x[:, order])
    frames = {
        n: (kind, test.assign(**dict(zip(numeric, v.T, strict=True))))
        for n, (kind, v) in out.items()
    }
    note = f"swap_2 exchanges {numeric[a]} and {numeric[b]} (train medians {scale[a]:.3g}, "
    return frames, note + f"{scale[b]:.3g})"


# --- 1. AUROC --------------------------------------------------------------------------


def shipped_detector(
    pre: Preprocessor,
    views: Callable[[pd.DataFrame], Views],
    frames: dict[str, pd.DataFrame],
    target_fpr: float,
    seed: int,
) -> tuple[list[Views], Detector]:
    """The train, val and test views, and the detector `fit_detector` ships: fitted and
    chosen as `stages.compress.outliers.fit_outliers` does (val and `shifted` val)."""
    train, val, test = (views(frames[s]) for s in SPLITS)
    selection = shifted(frames["val"], frames["train"], pre.numeric, pre.categorical, seed)
    shifts = {n: views(f) for n, f in selection.items()}
    detector, _ = fit_detector(train, val, shifts, "classification", target_fpr, seed)
    return [train, val, test], detector


def scores_of(score: Callable[[Views], Any], views: Views) -> np.ndarray:
    got = score(views)
    return np.asarray(got[0] if isinstance(got, tuple) else got, dtype=np.float64)


def auroc_tables(
    title: str,
    pre: Preprocessor,
    views: Callable[[pd.DataFrame], Views],
    frames: dict[str, pd.DataFrame],
    shifts: dict[str, tuple[str, pd.DataFrame]],
    cfg: DictConfig,
) -> tuple[str, Detector]:
    """The AUROC table (test against each held-out shift, per candidate, the shipped one
    marked) and the shipped detector's flag rates at its threshold."""
    (train, _, test), detector = shipped_detector(
        pre, views, frames, cfg.outliers.target_fpr, cfg.seed
    )
    held = {n: views(f) for n, (_, f) in shifts.items()}
    far = [n for n, (kind, _) in shifts.items() if kind == "far"]
    rows = []
    for name, score in candidates(train, "classification", cfg.seed).items():
        inliers = scores_of(score, test)
        got = {n: auroc(inliers, scores_of(score, v)) for n, v in held.items()}
        worst = min(got[n] for n in far)
        rows.append(
            {"candidate": name, "space": SPACE.get(name, "?"),
             "served": "yes" if name in SERVED else "no",
             "ships": "yes" if name == detector.kind else "",
             **{f"{n} ({shifts[n][0]})": f"{v:.3f}" for n, v in got.items()},
             "min far": f"{worst:.3f}", f"far >= {FAR}": "yes" if worst >= FAR else "no"}
        )  # fmt: skip
    none = detector.rank > detector.val_rows  # conformal_rank's n + 1: nothing flagged
    threshold = "none" if none else f"{detector.threshold:.4g}"
    flagged = {"shipped": detector.kind, "threshold": threshold}
    for name, v in {"test": test, **held}.items():
        rate = detector.flags(detector.score(v["x"], v["logits"])).mean()
        flagged[name if name == "test" else f"{name} ({shifts[name][0]})"] = f"{100 * rate:.1f}"
    text = [f"AUROC, {title}: test ({len(frames['test'])} rows) against each shifted copy"]
    text += [markdown(rows), "", f"flagged at the shipped threshold, % of rows ({title})"]
    text += [markdown([flagged])]
    if none:
        least = int(np.ceil((1 - detector.target_fpr) / detector.target_fpr - 1e-9))
        text += [f"no threshold: {detector.val_rows} val rows are too few for target_fpr "
                 f"{detector.target_fpr:g} (the conformal rule needs >= {least}): nothing "
                 "is flagged"]  # fmt: skip
    return "\n".join(text), detector


def digits_auroc(args: argparse.Namespace, cfg: DictConfig) -> str:
    from fullstack_ml.sources import load_digits_frame

    if args.smoke:
        frames = resplit(load_digits_frame(), cfg, cfg.seed)
        pre, model = quick_model(frames["train"], "target", cfg, args.epochs, cfg.seed)
        views = views_of(pre, model, model)
        title = f"digits (MLP trained here, {args.epochs} epochs)"
    else:
        pre, views, frames = pipeline_digits()
        title = "digits (the pipeline's model and splits)"
    shifts = digits_shifts(frames["test"], cfg.seed)
    text, detector = auroc_tables(title, pre, views, frames, shifts, cfg)
    shipped = ROOT / "models/compressed/outliers.json"
    if not args.smoke and shipped.is_file():
        kept = json.loads(shipped.read_text())
        text += (f"\nmodels/compressed/outliers.json: {kept['kind']}, threshold "
                 f"{kept['threshold']:.6g}; refitted here: {detector.kind}, threshold "
                 f"{detector.threshold:.6g}")  # fmt: skip
    return text


def wine_auroc(args: argparse.Namespace, cfg: DictConfig) -> str:
    from sklearn.datasets import load_wine

    frames = resplit(load_wine(as_frame=True).frame, cfg, cfg.seed)
    pre, model = quick_model(frames["train"], "target", cfg, args.epochs, cfg.seed)
    shifts, note = wine_shifts(frames["test"], frames["train"], pre.numeric, cfg.seed)
    title = f"wine (MLP trained here, {args.epochs} epochs)"
    text, _ = auroc_tables(title, pre, views_of(pre, model, model), frames, shifts, cfg)
    return f"{text}\n{note}"


# --- 2. FPR ----------------------------------------------------------------------------


def fpr_table(args: argparse.Namespace, cfg: DictConfig) -> str:
    """Digits split anew per seed: the shipped rule's threshold on val, its rate on test."""
    from fullstack_ml.sources import load_digits_frame

    digits, target_fpr, runs = load_digits_frame(), cfg.outliers.target_fpr, []
    for seed in range(args.splits):
        frames = resplit(digits, cfg, seed)
        pre, model = quick_model(frames["train"], "target", cfg, args.epochs, seed)
        views = views_of(pre, model, model)
        (_, _, test), detector = shipped_detector(pre, views, frames, target_fpr, seed)
        flags = detector.flags(detector.score(test["x"], test["logits"]))
        runs.append((detector, float(flags.mean()), len(flags)))
        print(f"split {seed}: {detector.kind}, test FPR {100 * flags.mean():.2f}%", file=sys.stderr)
    fpr = np.array([r[1] for r in runs])
    n, rank = runs[0][0].val_rows, runs[0][0].rank
    kinds = Counter(r[0].kind for r in runs)
    mean = float(fpr.mean())
    row = {
        "re-splits": len(runs), "val rows": n, "test rows": runs[0][2],
        "step pt": f"{100 / runs[0][2]:.2f}", "target %": f"{100 * target_fpr:.2f}",
        "conformal expectation %": f"{100 * (n + 1 - rank) / (n + 1):.2f}",
        "mean %": f"{100 * mean:.2f}", "sd pt": f"{100 * fpr.std(ddof=min(1, len(fpr) - 1)):.2f}",
        "min %": f"{100 * fpr.min():.2f}", "max %": f"{100 * fpr.max():.2f}",
        "mean - target pt": f"{100 * (mean - target_fpr):+.2f}",
        "within +-0.5 pt": "yes" if abs(mean - target_fpr) <= FPR_TOLERANCE else "no",
        "shipped": ", ".join(f"{k} {v}" for k, v in kinds.items()),
    }  # fmt: skip
    title = f"FPR on test at the threshold set on val (digits re-split, MLP {args.epochs} epochs)"
    return f"{title}\n{markdown([row])}"


# --- 3. serving overhead ---------------------------------------------------------------


def batch_totals(port: int) -> tuple[float, float]:
    """fullstack_ml_batch_records' sum and count, from /metrics."""
    from fullstack_ml.bento import request

    status, body = request(port, "GET", "/metrics")
    if status != 200:
        sys.exit(f"error: GET /metrics answered {status}")
    totals = {"sum": 0.0, "count": 0.0}
    for line in body.decode().splitlines():
        for key in totals:
            if line.startswith(f"fullstack_ml_batch_records_{key}"):
                totals[key] += float(line.rsplit(" ", 1)[1])
    return totals["sum"], totals["count"]


def http_cell(url: str, body: Path, concurrency: int, duration: int) -> dict[str, float]:
    """One load of /predict at `concurrency`: p50 ms, req/s, model calls/s, records a call."""
    port = urlparse(url).port or 80
    before, start = batch_totals(port), time.perf_counter()
    if shutil.which("wrk"):
        from bench.serve import wrk

        got = wrk(f"{url}/predict", body, concurrency, duration)
        errors = got["non2xx"] + got["socket"]
    else:  # Python threads on kept-alive connections (the validate stage's load)
        from stages.validate import load

        got = load(port, [body.read_bytes()], concurrency, duration)
        got["p50"], errors = got["p50_ms"], got["error_rate"]
    wall, after = time.perf_counter() - start, batch_totals(port)
    if errors:
        sys.exit(f"error: /predict at concurrency {concurrency}: {errors} errors")
    calls = after[1] - before[1]
    return {"p50": got["p50"], "rps": got["rps"], "calls_s": calls / wall,
            "records": (after[0] - before[0]) / max(calls, 1)}  # fmt: skip


def median_us(fn: Callable[[], Any], repeats: int) -> float:
    """Median microseconds of `fn()` over `repeats` calls (after one)."""
    fn()
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    return float(np.median(times) * 1e6)


@contextlib.contextmanager
def multiprocess_values(folder: Path) -> Iterator[None]:
    """prometheus_client metrics created meanwhile keep their values in mmap'd files, as in
    `bentoml serve`'s workers (PROMETHEUS_MULTIPROC_DIR set before prometheus_client loads)."""
    from prometheus_client import values

    previous, old = values.ValueClass, os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    values.ValueClass = values.MultiProcessValue()
    try:
        yield
    finally:
        values.ValueClass = previous
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR")
        if old is not None:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = old


def added_costs(
    detector: Detector, x: np.ndarray, logits: np.ndarray, batch: int, repeats: int, work: Path
) -> dict[str, float]:
    """Microseconds per model call of `batch` records that the outlier score adds: score and
    flags, the Prometheus loop (`service.observed`: in memory, and mmap'd as served) and
    the answers' outlier fields (`runtime.records.outlier_fields`)."""
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client import Counter as PromCounter

    from fullstack_ml.runtime.records import outlier_fields

    rows = np.arange(batch) % len(x)
    xb, lb = np.ascontiguousarray(x[rows]), np.ascontiguousarray(logits[rows])
    scores = detector.score(xb, lb)
    flags = detector.flags(scores)

    def observe_loop() -> Callable[[], None]:
        registry = CollectorRegistry()
        hist = Histogram("score", "s", buckets=detector.buckets, registry=registry)
        count = PromCounter("outliers", "o", registry=registry)

        def loop() -> None:
            for s in scores.tolist():
                hist.observe(s)
            count.inc(int(flags.sum()))

        return loop

    memory = observe_loop()
    work.mkdir(parents=True, exist_ok=True)
    with multiprocess_values(work):
        mmapped = observe_loop()
    return {
        "score": median_us(lambda: detector.flags(detector.score(xb, lb)), repeats),
        "memory": median_us(memory, repeats),
        "mmap": median_us(mmapped, repeats),
        "fields": median_us(lambda: outlier_fields(scores, flags), repeats),
    }


@contextlib.contextmanager
def served(args: argparse.Namespace, bento: Path) -> Iterator[str]:
    """The URL of `args.url`, or of `bento` served here (no token)."""
    if args.url:
        yield args.url.rstrip("/")
        return
    from fullstack_ml.bento import serve_bento

    with serve_bento(bento, env={"FULLSTACK_ML_API_TOKEN": ""}) as server:
        yield server.url


def serving_table(args: argparse.Namespace, work: Path) -> str:
    from fullstack_ml.bento import raw_records
    from fullstack_ml.model import predict_logits
    from fullstack_ml.runtime.meta import read_meta
    from fullstack_ml.runtime.outliers import load_detector
    from fullstack_ml.runtime.program import load_program

    if args.smoke and not args.bento:
        return "serving overhead: skipped (--smoke serves only a --bento given; tests/ do)"
    source = Path(args.bento or BENTO)
    if not source.is_file() or not Path(args.split).is_file():
        sys.exit(f"error: {source} or {args.split} not found: run `make repro` first")
    bento = work / "fullstack_ml.bento"
    shutil.copyfile(source, bento)  # the pipeline may rewrite dist/ meanwhile
    with tarfile.open(bento) as tar:
        tar.extractall(work / "bento", filter="data")
    model_dir = next((work / "bento/models").rglob("outliers.json")).parent
    meta, detector = read_meta(model_dir), load_detector(model_dir)
    test = pd.read_parquet(args.split)
    x = Preprocessor.from_dict(meta["preprocessing"]).encode_frame(test)
    logits = predict_logits(load_program(model_dir / "model.pt2"), x)
    body = work / "body.json"
    body.write_text(json.dumps({"records": raw_records(test.head(1), meta["features"])}))
    cells: dict[int, list[dict[str, float]]] = {c: [] for c in CONCURRENCY}
    with served(args, bento) as url:
        for c in CONCURRENCY:  # steady state at each concurrency
            http_cell(url, body, c, args.warmup)
        for _ in range(args.rounds):  # alternated: shared cores drift
            for c in CONCURRENCY:
                cells[c].append(http_cell(url, body, c, args.duration))
    rows = []
    for c, runs in cells.items():
        p50 = sorted(r["p50"] for r in runs)
        cell = sorted(runs, key=lambda r: r["p50"])[len(runs) // 2]  # the median p50's load
        batch = max(1, round(cell["records"]))
        cost = added_costs(detector, x, logits, batch, args.repeats, work / f"prom-{c}")
        added = cost["score"] + max(cost["memory"], cost["mmap"]) + cost["fields"]
        per_p50, share = added / (cell["p50"] * 1e3), added * 1e-6 * cell["calls_s"]
        rows.append(
            {"concurrency": c, "p50 ms": f"{cell['p50']:.2f}",
             "p50 min-max": f"{p50[0]:.2f}-{p50[-1]:.2f}", "req/s": f"{cell['rps']:.0f}",
             "model calls/s": f"{cell['calls_s']:.0f}",
             "records per call": f"{cell['records']:.2f}",
             "batch timed": batch, "score+flags us": f"{cost['score']:.1f}",
             "observe us (memory)": f"{cost['memory']:.1f}",
             "observe us (mmap)": f"{cost['mmap']:.1f}",
             "answer fields us": f"{cost['fields']:.1f}", "added us": f"{added:.1f}",
             "added / p50 %": f"{100 * per_p50:.2f}",
             "added x calls/s %": f"{100 * share:.2f}",
             f"<= {100 * OVERHEAD:.0f}%": "yes" if max(per_p50, share) <= OVERHEAD else "no"}
        )  # fmt: skip
    load = "wrk" if shutil.which("wrk") else "Python threads"
    title = (f"serving overhead of the outlier score ({detector.kind}): one-record /predict, "
             f"{load}, the load with the median p50 of {args.rounds} x {args.duration} s per "
             f"concurrency; in process: median of {args.repeats} calls")  # fmt: skip
    return f"{title}\n{markdown(rows)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="digits,wine,fpr,serving")
    parser.add_argument("--splits", type=int, default=20, help="digits re-splits for the FPR")
    parser.add_argument("--epochs", type=int, default=30, help="of the models trained here")
    parser.add_argument("--duration", type=int, default=10, help="seconds per load")
    parser.add_argument("--warmup", type=int, default=2, help="seconds per concurrency")
    parser.add_argument("--rounds", type=int, default=3, help="loads per concurrency")
    parser.add_argument("--repeats", type=int, default=2000, help="in-process timings")
    parser.add_argument("--bento", help=f"a bento file (default {BENTO.relative_to(ROOT)})")
    parser.add_argument("--url", help="a server already serving --bento (else served here)")
    parser.add_argument("--split", default=str(TEST), help="rows for the requests")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE}, models trained here")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    torch.set_num_threads(1)  # as the service; the other core serves or loads
    cfg = compose([])
    parts: dict[str, Callable[[], str]] = {
        "digits": lambda: digits_auroc(args, cfg),
        "wine": lambda: wine_auroc(args, cfg),
        "fpr": lambda: fpr_table(args, cfg),
        "serving": lambda: serving_table(args, work),
    }
    with tempfile.TemporaryDirectory(prefix="bench-outliers-") as tmp:
        work = Path(tmp)
        for name in args.parts.split(","):
            print(parts[name](), flush=True)
            print()
    print(f"cores: {len(os.sched_getaffinity(0))}; torch threads: 1")


if __name__ == "__main__":
    main()
