"""Pipeline benchmark: `dvc repro` from scratch, stage by stage, against each stage's own work.

Clones this repository's commit `--rev` (default HEAD; uncommitted changes are not in it) into
a temporary folder with a fresh DVC cache, DVC site cache, BentoML store and Inductor cache
(nothing reused but this virtual environment), recomposes params.yaml with the `--set`
overrides (`python -m fullstack_ml.stage key=value ...`, what `dvc exp run -S` does), then
runs the whole pipeline as a user does, one `dvc repro --force` (without --force DVC skips
a stage whose outputs are all in git and whose inputs rebuilt to the committed dvc.lock's
bytes, as evaluate's do), timing each stage from its "Running stage" line to the next one
(DVC's hashing and caching of its outputs included) and DVC's own start and planning before
the first (row `dvc`), then a no-op `dvc repro`.
Then, in this process with the clone's code on the clone's artifacts (imports done before
the clock starts), each stage's own work:
  ingest    pyarrow reading the curated splits and writing them again (the rows' I/O floor)
  profile   whylogs `why.log` of each curated split's rows
  train     bench.train's plain PyTorch loop for the epochs the stage ran, 1 torch thread (a
            Ray Train worker's; more threads on 2 shared cores measured 80 s, not 3 s)
  evaluate  the stage's `evaluate` on the test split (the stage minus process and DVC)
  distil    the same loop for the student (distil.lr, the epochs the stage ran), plus the
            teacher's forward pass over the train rows each epoch (its soft labels)
  compress  the stage's `compress` with the configured method alone (no report pipelines):
            FP32 and the method built, measured and gated (what ships)
  package   the stage's `package` (model store, bento build, export)
  validate  the compressed model's answers on the test split in process, plus the load the
            gate is configured to apply (0.5 s warm-up + serve.slo.duration_s, then the burst
            phase: serve.slo.burst_s + settle_s + 2.4 s of lone requests: a fixed time)
  predict   the stage's `predict` on its configured input (the test split), in process: the
            program loaded (and compiled, as served), the rows checked, scored, profiled
  report    gathering the build's files and rendering the build report (fullstack_ml.card)
A stage not listed has no baseline ('-'). Prints wall s, work s and wall / work per stage:
start-up, imports, Ray and DVC's hashing and caching show as a ratio above 1.

    python -m bench.pipeline                          # the default config at HEAD
    python -m bench.pipeline --rev main~3 --set train.epochs=5 --keep
    python -m bench.pipeline --smoke                  # experiment=smoke, ingest and profile
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMOKE_SET = ["experiment=smoke"]
SMOKE_UNTIL = "profile"


def sh(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    """Run `cmd`, its output appended to `log`; its wall time, or exit naming the failure."""
    began = time.perf_counter()
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    took = time.perf_counter() - began
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode} (log {log}):\n{tail}")
    return took


def repro(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict[str, float]:
    """Run `dvc repro ...`, its output appended to `log`: the wall time of DVC's start and
    planning (`dvc`) and of each stage it ran, or exit naming the failure."""
    starts = {"dvc": time.perf_counter()}
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        env = {**env, "PYTHONUNBUFFERED": "1"}  # DVC's lines when they happen
        pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        with subprocess.Popen(cmd, cwd=cwd, env=env, **pipe) as proc:
            for line in proc.stdout:
                out.write(line)
                if started := re.match(r"Running stage '([^']+)'", line):
                    starts[started[1]] = time.perf_counter()
    stamps = [*starts.values(), time.perf_counter()]
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode} (log {log}):\n{tail}")
    return {name: stamps[i + 1] - stamps[i] for i, name in enumerate(starts)}


def clone(rev: str, repo: Path, env: dict[str, str], log: Path) -> str:
    """A git clone of this repository at `rev` in `repo`, with DVC's caches inside it."""
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if sha.returncode != 0:
        sys.exit(f"error: --rev {rev!r}: not a commit of {ROOT}")
    sh(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(repo)], ROOT, env, log)
    sh(["git", "checkout", "--quiet", sha.stdout.strip()], repo, env, log)
    site = repo.parent / "dvc-site-cache"  # DVC's index and state: fresh, removed with the rest
    sh(["dvc", "config", "--local", "core.site_cache_dir", str(site)], repo, env, log)
    return sha.stdout.strip()


def stage_order(repo: Path) -> list[str]:
    """The stages in the order `dvc repro` runs them."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import get_active_graph, plan_repro

    with Repo(str(repo)) as dvc:
        return [s.name for s in plan_repro(get_active_graph(dvc.index.graph))]


def timed(fn: Callable[[], Any]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


# ---------------------------------------------------------------- each stage's own work


def work_ingest(repo: Path, cfg: Any) -> float:
    import pyarrow.parquet as pq

    from fullstack_ml.curated import split_path
    from fullstack_ml.paths import SPLITS

    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        for name in SPLITS:
            table = pq.read_table(split_path(name, repo / "data/curated"))
            pq.write_table(table, Path(tmp) / f"{name}.parquet")
        return time.perf_counter() - began


def work_profile(repo: Path, cfg: Any) -> float:
    try:  # the project's whylogs fixes, where the revision has them
        import fullstack_ml.runtime.whylogs_compat  # noqa: F401
    except ImportError:
        import numpy as np

        np.unicode_ = getattr(np, "unicode_", np.str_)  # whylogs 1.6 on numpy 2
    import pandas as pd
    import whylogs as why

    from fullstack_ml.curated import split_path
    from fullstack_ml.paths import SPLITS

    paths = [split_path(name, repo / "data/curated") for name in SPLITS]
    why.log(pd.read_parquet(paths[0]).head(8)).view()  # whylogs' lazy set-up, not timed
    return timed(lambda: [why.log(pd.read_parquet(p)).view() for p in paths])


def work_train(repo: Path, cfg: Any) -> float:
    import torch  # noqa: F401  imported before the clock
    from omegaconf import OmegaConf

    from bench.train import child_torch

    run = json.loads((repo / "dvclive/train/metrics.json").read_text())["step"]
    loop = OmegaConf.merge(cfg, {"train": {"epochs": run}})
    return timed(lambda: child_torch(loop, repo / "data/curated", 1))


def work_distil(repo: Path, cfg: Any) -> float:
    from omegaconf import OmegaConf

    from bench.train import child_torch
    from fullstack_ml.curated import load_split
    from fullstack_ml.model import encode_split, load_fp32, predict_logits

    run = json.loads((repo / "dvclive/distil/metrics.json").read_text())["step"]
    loop = OmegaConf.merge(cfg, {"train": {"epochs": run, "lr": cfg.distil.lr}})
    loop.model = cfg.distil.student
    teacher, meta = load_fp32(repo / "models/fp32")
    x, _ = encode_split(load_split("train", repo / "data/curated"), meta)

    def both() -> None:
        child_torch(loop, repo / "data/curated", 1)
        for _ in range(run):
            predict_logits(teacher, x)

    return timed(both)


def work_evaluate(repo: Path, cfg: Any) -> float:
    from fullstack_ml.curated import load_split
    from stages.evaluate import evaluate

    return timed(lambda: evaluate(repo / "models/fp32", load_split("test", repo / "data/curated")))


def work_compress(repo: Path, cfg: Any) -> float:
    import torch
    from omegaconf import OmegaConf

    from fullstack_ml.curated import load_split
    from fullstack_ml.model import encode_split, encode_targets, load_fp32
    from stages.compress import compress

    data, fp32 = repo / "data/curated", repo / "models/fp32"
    method = OmegaConf.merge(cfg.compress, {"pipelines": None})

    def run(out: Path) -> None:
        torch.manual_seed(cfg.seed)
        _, meta = load_fp32(fp32)
        val_x, val_y = encode_split(load_split("val", data), meta)
        frames = {name: load_split(name, data) for name in ("train", "val", "test")}
        train = frames["train"]
        train_xy = (encode_split(train, meta)[0], encode_targets(train[meta["target"]], meta))
        test = encode_split(frames["test"], meta)
        odd = (frames, cfg.outliers)  # the outlier detector too, as the stage
        compress(
            fp32, val_x, test, method, out, val_y=val_y, train=train_xy, seed=cfg.seed, outliers=odd
        )

    with tempfile.TemporaryDirectory() as tmp:
        return timed(lambda: run(Path(tmp) / "compressed"))


def work_package(repo: Path, cfg: Any) -> float:
    from stages.package import build_metadata, package

    model, metrics = repo / "models/compressed", repo / "metrics"
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / "serving.json"
        serving = json.loads((repo / "reports/compress.json").read_text())["serving"]
        plan.write_text(json.dumps(serving))
        files = {
            "model.pt2": model / "model.pt2",
            "model.json": model / "model.json",
            "schema.json": repo / "data/curated/schema.json",
            "reference_profile.bin": repo / "reports/profile/train.bin",
            "serving.json": plan,
            "outliers.json": model / "outliers.json",
        }
        if (model / "fp32.pt2").exists():  # compress.fp32_fallback
            files["fp32.pt2"] = model / "fp32.pt2"
        if (model / "model.onnx").exists():  # compress.runtimes
            files["model.onnx"] = model / "model.onnx"
        shown = [metrics / "eval.json", metrics / "compress.json"]
        metadata = build_metadata(repo / "params.yaml", shown)
        return timed(lambda: package(files, metadata, cfg.serve, Path(tmp) / "dist"))


def work_validate(repo: Path, cfg: Any) -> float:
    """The load the gate is configured to send (its reference answers come from compress):
    the timed load, burst and settling, and its lone requests at the p50 the run measured."""
    slo = cfg.serve.slo
    timed_s = float(slo.duration_s + slo.burst_s + slo.settle_s)
    if "lone_requests" not in slo:  # a revision before 2026-12-07: three 0.4 s windows a side
        return timed_s + 2 * 3 * 0.4
    lone = slo.warmup_requests + 2 * slo.lone_requests
    p50_ms = json.loads((repo / "reports/validate.json").read_text())["lone_p50_ms"]
    return timed_s + lone * p50_ms / 1000


def work_report(repo: Path, cfg: Any) -> float:
    from fullstack_ml.card import gather, render

    tag = json.loads((repo / "dist/bento.json").read_text())["bento_tag"]
    gate = {
        "metrics": json.loads((repo / "metrics/validate.json").read_text()),
        "details": json.loads((repo / "reports/validate.json").read_text()),
    }
    here = Path.cwd()
    os.chdir(repo)  # the card reads the build's files from the repo root, as the stage does
    try:
        return timed(lambda: render(gather(tag, gate)))
    finally:
        os.chdir(here)


def work_predict(repo: Path, cfg: Any) -> float:
    from stages.predict import predict

    here = Path.cwd()
    os.chdir(repo)  # the stage's paths are relative to the repo root
    try:
        return timed(lambda: predict(cfg.predict, cfg.seed))
    finally:
        os.chdir(here)


WORK: dict[str, Callable[[Path, Any], float]] = {
    "ingest": work_ingest,
    "profile": work_profile,
    "train": work_train,
    "evaluate": work_evaluate,
    "distil": work_distil,
    "compress": work_compress,
    "package": work_package,
    "validate": work_validate,
    "report": work_report,
    "predict": work_predict,
}


# ---------------------------------------------------------------- the run and the report


def table(walls: dict[str, float], works: dict[str, float | None]) -> str:
    """Markdown: stage, wall s, work s, wall / work; then the total."""
    out = ["| stage | wall s | work s | ratio |", "|---|---:|---:|---:|"]
    for stage, wall in walls.items():
        work = works.get(stage)
        cells = f"{work:.2f} | {wall / work:.1f}" if work else "- | -"
        out.append(f"| {stage} | {wall:.1f} | {cells} |")
    total, done = sum(walls.values()), sum(w for w in works.values() if w)
    out.append(f"| total | {total:.1f} | {done:.2f} | {total / done:.1f} |")
    return "\n".join(out)


def bench(args: argparse.Namespace, work: Path) -> str:
    """Clone, run the stages one by one, the no-op repro, then the baselines: the report."""
    repo, log = work / "repo", work / "dvc.log"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env |= {"RAY_USAGE_STATS_ENABLED": "0", "BENTOML_DO_NOT_TRACK": "true"}  # as the Makefile
    env |= {"BENTOML_HOME": str(work / "bentoml"), "WHYLOGS_NO_ANALYTICS": "1"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-stages")
    began = time.perf_counter()
    sha = clone(args.rev, repo, env, log)
    if args.set:
        sh([str(BIN / "python"), "-m", "fullstack_ml.stage", *args.set], repo, env, log)
    setup = time.perf_counter() - began
    order = stage_order(repo)
    if args.until:
        if args.until not in order:
            sys.exit(f"error: --until {args.until!r}: not a stage ({', '.join(order)})")
        order = order[: order.index(args.until) + 1]
    until = [args.until] if args.until else []
    walls = repro(["dvc", "repro", "--force", *until], repo, env, log)
    print(f"dvc repro --force: {sum(walls.values()):.1f} s", file=sys.stderr)
    mark = log.stat().st_size
    noop = sh(["dvc", "repro", *until], repo, env, log)
    reran = [ln for ln in log.read_text()[mark:].splitlines() if ln.startswith("Running stage")]
    # the baselines: the clone's code, our own Inductor cache (cold, as the stage's was)
    os.environ.update({k: env[k] for k in ("BENTOML_HOME", "WHYLOGS_NO_ANALYTICS")})
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-baseline")
    sys.path.insert(0, str(repo))
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(repo / "params.yaml")
    works = {}
    for stage in order:
        works[stage] = WORK[stage](repo, cfg) if stage in WORK else None
        print(f"{stage} work: {works[stage]}", file=sys.stderr)
    head = f"{args.rev} ({sha[:10]}), overrides {args.set or 'none'}; clone + params {setup:.1f} s"
    verdict = f"reran {reran}" if reran else "nothing rerun"
    tail = f"no-op dvc repro: {noop:.2f} s ({verdict})"
    return f"{head}\n{table(walls, works)}\n\n{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD", help="the commit to clone (default HEAD)")
    parser.add_argument("--set", nargs="*", default=[], help="Hydra overrides (params.yaml)")
    parser.add_argument("--until", help="run the stages up to this one only")
    parser.add_argument("--keep", action="store_true", help="keep the clone and its logs")
    parser.add_argument(
        "--smoke", action="store_true", help=f"{SMOKE_SET}, up to {SMOKE_UNTIL}: seconds"
    )
    args = parser.parse_args()
    if args.smoke:
        args.set = [*SMOKE_SET, *args.set]
        args.until = args.until or SMOKE_UNTIL
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        report = bench(args, work)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(report)


if __name__ == "__main__":
    main()
