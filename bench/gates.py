"""Gates benchmark: each gate's false-failure rate on a busy machine, and its power against a
planted regression, counted over repeated runs.

- **latency** (the release gate, `stages.validate.validate`): `--runs` runs on the bento the
  pipeline built (`dist/`, its answers in `reports/`), then `--runs` on the same bento with
  BentoML's adaptive batching put back in its service.py (`@bentoml.api(batchable=True)`,
  as before commit 8f669e6: lone requests stayed 25-30x slower for minutes after a burst).
  Each run is a fresh `bentoml serve`, as in `dvc repro -f -s validate`.
- **accuracy** (the compress stage's budget, `stages.compress.compress`): scikit-learn's wine
  (178 rows) with a categorical column and 3% missing values, ingested, trained and
  compressed by the stages' functions for `--seeds` seeds; then the same with a planted
  broken INT8 model (one INT8 weight tensor negated: one corrupted layer, in
  every candidate the fallback tries too), on wine and on the pipeline's digits model.
  `--exp-runs N` also runs wine through `dvc exp run` in a temporary clone for N seeds.
- **drift** (profile, predict, `/drift`): digits split anew for 2 x `--seeds` seeds, val
  against train, as is and with one pixel shifted.

While it runs, `--busy` processes spin (one core of two kept busy by default), as a user's
machine is. Prints a table per gate: runs, failures, rate, and the figures each gate judged.

    python -m bench.gates --runs 20 --seeds 10                 # after `make repro`
    python -m bench.gates --gates accuracy --seeds 10 --exp-runs 10
    python -m bench.gates --smoke    # 1 run of each, on a bento and models built here: seconds
"""

import argparse
import contextlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fullstack_ml.stage import ROOT, StageError, compose

BENTO = ROOT / "dist/fullstack_ml.bento"
ROUTE = '''    @bentoml.api(input_spec=PredictRequest)
    async def predict(self, records: list[Record]) -> Predictions:  # type: ignore[valid-type]
        """The predicted label (or value, for a regression model) of each record."""
        return await self.batched_labels(records)
'''
STICKY = """    @bentoml.api(
        batchable=True, max_batch_size=256, max_latency_ms=1000, input_spec=PredictRequest
    )
    def predict(self, records: list[Record]) -> Predictions:  # type: ignore[valid-type]
        return self.answers.labels(records)
"""
WINE = ["data=csv", "data.target=cultivar", "profile=basic"]
SMOKE = ["train.epochs=3", "compress.compile=false", "compress.latency_repeats=2"]
SMOKE += ["compress.batch_sizes=[1,16]", "outliers.candidates=[mahalanobis,energy]"]
SMOKE_SLO = {"lone_requests": 200}


@contextlib.contextmanager
def busy(cores: int) -> Iterator[None]:
    """`cores` processes spinning for the duration (another program on the user's machine)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def sticky_bento(bento: Path, out: Path) -> Path:
    """`bento` with BentoML's adaptive batching in place of the service's own batcher."""
    tree = out / "tree"
    with tarfile.open(bento) as tar:
        tar.extractall(tree, filter="data")
    service = tree / "src/service.py"
    text = service.read_text()
    if ROUTE not in text:
        sys.exit("error: service.py's /predict route changed; update bench/gates.py ROUTE")
    service.write_text(text.replace(ROUTE, STICKY))
    planted = out / "sticky.bento"
    with tarfile.open(planted, "w:gz") as tar:
        tar.add(tree, arcname=".")
    return planted


def answers_file(model_dir: Path, test: pd.DataFrame, out: Path) -> Path:
    """The compressed program's answers on `test`, as the compress stage keeps them."""
    from fullstack_ml.answers import save_answers
    from fullstack_ml.model import decode, encode_split, predict_logits
    from fullstack_ml.runtime.meta import read_meta
    from fullstack_ml.runtime.program import load_program

    meta = read_meta(model_dir)
    x, _ = encode_split(test, meta)
    answers = decode(predict_logits(load_program(model_dir / "model.pt2"), x), meta)
    save_answers(out, answers, model_dir / "model.pt2")
    return out


def latency_runs(
    bento: Path, model_dir: Path, test: pd.DataFrame, answers: Path, slo: Any, runs: int
) -> list[dict[str, Any]]:
    """`runs` release gates on `bento`: each one's verdict and the figures it judged."""
    from fullstack_ml.gates import missed_slos
    from stages.validate import release_figures

    out = []
    for _ in range(runs):
        try:  # what stages.validate.validate does, keeping the figures of a failed gate
            r = release_figures(bento, test, model_dir / "model.pt2", answers, slo)
            failed = "; ".join(missed_slos(r, slo))
        except StageError as err:
            r, failed = {}, str(err)
        out.append({"failed": failed, **r})
    return out


def latency(args: argparse.Namespace, work: Path) -> str:
    from fullstack_ml.curated import load_split

    cfg = compose(args.overrides)
    slo = cfg.serve.slo
    if args.smoke:
        built = build_wine(work / "smoke", 0, SMOKE, package=True)
        bento, model_dir, test = built["bento"], built["model_dir"], built["test"]
        for key, value in SMOKE_SLO.items():
            slo[key] = value
    else:
        if not BENTO.is_file():
            sys.exit(f"error: {BENTO} not found: run `make repro` first")
        bento, model_dir, test = BENTO, ROOT / "models/compressed", load_split("test")
    answers = answers_file(model_dir, test, work / "answers.npz")
    planted = sticky_bento(bento, work / "planted")
    rows = []
    with busy(args.busy):
        for name, file in (("default build", bento), ("planted: adaptive batching", planted)):
            for r in latency_runs(file, model_dir, test, answers, slo, args.runs):
                rows.append({"build": name, **r})
    return latency_table(rows)


def latency_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| build | runs | failed | rate | after/before p50 (min-max) | lower bound (max) "
             "| +ms lower bound (max) | p99 ms (max) | req/s (min) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for build in dict.fromkeys(r["build"] for r in rows):
        runs = [r for r in rows if r["build"] == build]
        failed = sum(bool(r["failed"]) for r in runs)

        def col(key: str, runs: list = runs) -> np.ndarray:
            return np.array([r[key] for r in runs if key in r], dtype=float)

        ratio = col("after_burst_ratio")
        spread = f"{ratio.min():.2f}-{ratio.max():.2f}x" if len(ratio) else "-"
        figures = [
            f"{col(k).max():.2f}" if len(col(k)) else "-"
            for k in ("after_burst_ratio_low", "after_burst_diff_low_ms", "p99_ms")
        ]
        rps = f"{col('rps').min():.0f}" if len(col("rps")) else "-"
        lines.append(
            f"| {build} | {len(runs)} | {failed} | {failed / len(runs):.2f} | {spread} | "
            f"{' | '.join(figures)} | {rps} |"
        )
    why = [f"- {r['build']}: {r['failed']}" for r in rows if r["failed"]][:3]
    return "\n".join(["latency gate (serve.slo):", *lines, *why])


def wine_csv(path: Path, seed: int = 0) -> Path:
    """scikit-learn's wine (178 rows) with a categorical column (`colour_band`, from colour
    intensity) and 3% of its feature values missing, as a user's CSV file."""
    from sklearn.datasets import load_wine

    raw = load_wine(as_frame=True)
    df = raw.data.copy()
    df["colour_band"] = pd.cut(
        df["color_intensity"], [0, 3, 6, 100], labels=["pale", "mid", "deep"]
    )
    df["colour_band"] = df["colour_band"].astype(str)
    rng = np.random.default_rng(seed)
    features = [c for c in df.columns if c != "colour_band"]
    mask = rng.random((len(df), len(features))) < 0.03
    df[features] = df[features].mask(mask)
    df["cultivar"] = [raw.target_names[t] for t in raw.target]
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def build_wine(
    work: Path, seed: int, more: list[str], package: bool = False, corrupt: int | None = None
) -> dict[str, Any]:
    """Wine ingested, trained and compressed by the stages' functions with `seed` (and the
    bento packaged, with `package`); {error: the compress stage's one line} where it fails."""
    from fullstack_ml.curated import load_split
    from stages.ingest import ingest
    from stages.train import train

    csv = wine_csv(work / "wine.csv")
    cfg = compose([*WINE, f"data.path={csv}", f"seed={seed}", *more])
    curated, fp32 = work / "curated", work / "fp32"
    ingest(cfg.data, cfg.seed, curated)
    train(cfg, curated, fp32)
    splits = {s: load_split(s, curated) for s in ("train", "val", "test")}
    out = run_compress(cfg, fp32, splits, work / "compressed", corrupt)
    if package and "error" not in out:
        out |= package_wine(cfg, work, curated, splits)
    out["test"] = splits["test"]
    return out


def run_compress(
    cfg: Any, fp32: Path, splits: dict[str, pd.DataFrame], out: Path, corrupt: int | None
) -> dict[str, Any]:
    """The compress stage's function on `fp32`: its figures, or its one-line error."""
    from fullstack_ml.model import encode_split, load_fp32
    from stages.compress import compress

    _, meta = load_fp32(fp32)
    (val_x, val_y), test = (encode_split(splits[s], meta) for s in ("val", "test"))
    with planted_layer(corrupt):
        try:
            odd = (splits, cfg.outliers)  # the outlier detector too, as the stage
            result = compress(
                fp32, val_x, test, cfg.compress, out, val_y=val_y, seed=cfg.seed, outliers=odd
            )
        except StageError as err:
            return {"error": str(err)}
    (out / "serving.json").write_text(json.dumps(result["serving"]))
    return {"result": result, "model_dir": out}


@contextlib.contextmanager
def planted_layer(seed: int | None) -> Iterator[None]:
    """With `seed`: every INT8 model INC makes gets one INT8 weight tensor negated (one
    corrupted layer: the `seed % count`-th in the graph's order), fallback candidates
    included, so leaving one layer in FP32 cannot dodge it."""
    quantize = importlib.import_module("stages.compress.quantize")  # the module, not the function
    original = quantize.fold_weight_quantization

    def corrupted(gm: Any) -> None:
        original(gm)
        weights = [b for n, b in gm.named_buffers() if n.startswith("int8_weight_")]
        if weights:
            weight = weights[seed % len(weights)]
            weight.copy_(weight.neg().clamp(-127, 127))

    if seed is not None:
        quantize.fold_weight_quantization = corrupted
    try:
        yield
    finally:
        quantize.fold_weight_quantization = original


def package_wine(
    cfg: Any, work: Path, curated: Path, splits: dict[str, pd.DataFrame]
) -> dict[str, Any]:
    from fullstack_ml.runtime.drift import profile_frame
    from fullstack_ml.stage import git_commit
    from stages.package import package

    out = work / "compressed"
    train = pd.read_parquet(curated / "train.parquet")
    (out / "reference_profile.bin").write_bytes(profile_frame(train).serialize())
    shutil.copyfile(curated / "schema.json", out / "schema.json")
    names = ("model.pt2", "model.json", "schema.json", "reference_profile.bin", "serving.json")
    names += ("model.onnx",) if (out / "model.onnx").exists() else ()  # compress.runtimes
    names += ("outliers.json",)
    info = package(
        {n: out / n for n in names}, {"git_commit": git_commit()}, cfg.serve, work / "dist"
    )
    return {"bento": work / "dist" / info["file"]}


def accuracy(args: argparse.Namespace, work: Path) -> str:
    more = [*args.overrides, *(SMOKE if args.smoke else [])]
    rows = []
    with busy(args.busy):
        for seed in range(args.seeds):
            out = build_wine(work / f"wine-{seed}", seed, more)
            rows.append(accuracy_row("wine", seed, out))
        for seed in range(args.seeds):
            out = build_wine(work / f"wine-planted-{seed}", seed, more, corrupt=seed)
            rows.append(accuracy_row("wine, planted broken layer", seed, out))
        if not args.smoke:
            rows += planted_digits(args, work)
        if args.exp_runs:
            rows += exp_runs(args.exp_runs, work)
    return accuracy_table(rows)


def planted_digits(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """The pipeline's digits model (`models/fp32`, `data/curated`) with a broken INT8 layer."""
    from fullstack_ml.curated import load_split

    if not (ROOT / "models/fp32/model.pt").is_file():
        sys.exit("error: models/fp32 not found: run `make repro` first")
    cfg = compose(args.overrides)
    splits = {s: load_split(s) for s in ("train", "val", "test")}
    return [
        accuracy_row(
            "digits, planted broken layer",
            seed,
            run_compress(cfg, ROOT / "models/fp32", splits, work / f"digits-{seed}", seed),
        )
        for seed in range(args.seeds)
    ]


def exp_runs(n: int, work: Path) -> list[dict[str, Any]]:
    """Wine through `dvc exp run` (the whole pipeline) in a temporary clone, `n` seeds."""
    repo = work / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    wine_csv(repo / "data/raw/wine.csv")
    rows = []
    for seed in range(n):
        sets = [*WINE, "data.path=data/raw/wine.csv", f"seed={seed}"]
        cmd = ["dvc", "exp", "run", *[a for s in sets for a in ("-S", s)]]
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        result = {}
        if proc.returncode == 0:
            result = json.loads((repo / "metrics/compress.json").read_text())
            details = json.loads((repo / "reports/compress.json").read_text())
            result["budget"] = details["budget"]
        error = "" if proc.returncode == 0 else last
        rows.append({"data": "wine, dvc exp run", "seed": seed, "error": error, **result})
    return rows


def accuracy_row(data: str, seed: int, out: dict[str, Any]) -> dict[str, Any]:
    if "error" in out:
        return {"data": data, "seed": seed, "error": out["error"]}
    r = out["result"]
    gate = r["compressed"]["gate"]
    return {
        "data": data,
        "seed": seed,
        "error": "",
        "method": r["method"],
        "size_ratio": r["size_ratio"],
        "accuracy_drop_points": r["accuracy_drop_points"],
        "accuracy_drop_bound": r["accuracy_drop_bound"],
        "budget": gate["verdict"],
        "rows": gate["rows"],
    }


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| data | runs | failed | rate | verdicts | drop points (max) | size ratio (max) |",
             "|---|---:|---:|---:|---|---:|---:|"]  # fmt: skip
    for data in dict.fromkeys(r["data"] for r in rows):
        runs = [r for r in rows if r["data"] == data]
        failed = sum(bool(r["error"]) for r in runs)
        verdicts = pd.Series([r.get("budget", "failed") for r in runs]).value_counts()
        drops = [r["accuracy_drop_points"] for r in runs if "accuracy_drop_points" in r]
        sizes = [r["size_ratio"] for r in runs if "size_ratio" in r]
        lines.append(
            f"| {data} | {len(runs)} | {failed} | {failed / len(runs):.2f} | "
            f"{', '.join(f'{k} {v}' for k, v in verdicts.items())} | "
            f"{max(drops) if drops else float('nan'):.2f} | "
            f"{max(sizes) if sizes else float('nan'):.3f} |"
        )
    why = [f"- {r['data']} seed {r['seed']}: {r['error']}" for r in rows if r["error"]][:4]
    return "\n".join(["accuracy gate (compress.max_accuracy_drop):", *lines, *why])


def drift(args: argparse.Namespace, work: Path) -> str:
    """The drift gate on digits split anew for each seed (val against train: no drift), then
    with one pixel of val shifted by 2 (of 0-16): runs with any column called drifted, by
    whylogs' own per-column categories and by the Holm-adjusted ones the gate uses."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from fullstack_ml.runtime.drift import drift_scores, profile_frame

    digits = load_digits(as_frame=True).frame
    rows = []
    for seed in range(args.seeds * 2):
        train, val = train_test_split(digits, test_size=0.15, random_state=seed)
        for planted in (False, True):
            val = val.assign(**{"pixel_3_3": val["pixel_3_3"] + 2}) if planted else val
            scores = drift_scores(profile_frame(val), profile_frame(train), "target")
            raw = sum(s is not None and s["pvalue"] < 0.05 for s in scores.values())
            holm = sum(s is not None and s["drift_category"] == "DRIFT" for s in scores.values())
            rows.append({"planted": planted, "raw": raw, "holm": holm})
    lines = ["| val against train | runs | any column p < 0.05 | any column drifted (Holm) |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for planted, name in ((False, "re-split, no drift"), (True, "pixel_3_3 + 2 planted")):
        runs = [r for r in rows if r["planted"] == planted]
        lines.append(
            f"| {name} | {len(runs)} | {sum(r['raw'] > 0 for r in runs)} | "
            f"{sum(r['holm'] > 0 for r in runs)} |"
        )
    return "\n".join(["drift gate (profile.drift.fail_on_drift, 65 columns):", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gates", default="latency,accuracy,drift")
    parser.add_argument("--runs", type=int, default=20, help="release gates per build")
    parser.add_argument("--seeds", type=int, default=10, help="accuracy runs per data set")
    parser.add_argument("--exp-runs", type=int, default=0, help="wine via dvc exp run, seeds")
    parser.add_argument("--busy", type=int, default=1, help="processes spinning meanwhile")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.seeds, args.exp_runs, args.busy = 1, 1, 0, 0
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    gates: dict[str, Callable[[argparse.Namespace, Path], str]] = {
        "latency": latency,
        "accuracy": accuracy,
        "drift": drift,
    }
    with tempfile.TemporaryDirectory(prefix="bench-gates-") as tmp:
        os.environ["BENTOML_HOME"] = f"{tmp}/bentoml"  # the wine bentos: not the user's store
        for name in args.gates.split(","):
            print(gates[name](args, Path(tmp) / name), flush=True)
            print()
    print(f"busy: {args.busy} process(es) spinning; cores: {len(os.sched_getaffinity(0))}")


if __name__ == "__main__":
    main()
