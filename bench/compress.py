"""Compression benchmark: every candidate of the compression study against FP32 eager, one run.

Runs `stages.compress.compress` on the pipeline's FP32 model (`models/fp32`) and curated
splits (`data/curated`; run `make repro` first) into a temporary folder, with conf/ composed
with `experiment=compression_study` (its candidates; another `experiment=` replaces it)
plus the overrides given, then prints per candidate (FP32 first): file size, test score and
median latency at batch 1 and at the largest batch, eager and Inductor-compiled, each as a
ratio to FP32 eager measured in the same run. Latency uses `compress.threads` torch threads
(1, as the service). `best` is the faster path; the serving plan follows the table.

    python -m bench.compress                      # the default config
    python -m bench.compress compress.latency_repeats=200 compress.fp32_fallback=true
    python -m bench.compress --smoke              # a model trained for 1 epoch here: seconds

`--smoke` builds its own FP32 model and student in a temporary folder (the ingest, train
and distil stages' functions, 1 epoch each, Ray Train's local mode), then measures three
pipelines (distil, structured pruning, 4-bit weights) eager only, few repeats: the same
code paths as the full run, without the `make repro` models or Inductor's compile time.
"""

import logging
import sys
import tempfile
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, open_dict

from fullstack_ml.model import SCORE_NAME, encode_split, encode_targets, load_fp32
from fullstack_ml.stage import ROOT, compose
from stages.compress import compress

SMOKE = [
    "train.epochs=1",
    "train.num_workers=0",
    "distil.epochs=1",
    "compress.compile=false",
    "compress.latency_repeats=2",
    "compress.batch_sizes=[1,16]",
    "compress.calibration_batches=1",
    "compress.prune.finetune_epochs=1",
    "compress.max_accuracy_drop=100",  # 1 epoch: accuracy is not the point
    "outliers.candidates=[mahalanobis]",  # bench.runtime's bento: the served detector alone
]
SMOKE_PIPELINES = {  # replace compress.pipelines (an override would merge into it)
    "distil_int8": ["distil", "int8_static"],
    "structured_int8": ["prune_structured", "int8_static"],
    "woq_int4": ["woq_int4"],
}


def build_small(cfg: DictConfig, work: Path, student: bool = True) -> tuple[Path, Path, Path]:
    """FP32 model, curated splits and (if `student`) student built in `work` by the stages'
    functions."""
    from stages.distil import distil
    from stages.ingest import ingest
    from stages.train import train

    fp32_dir, curated = work / "fp32", work / "curated"
    ingest(cfg.data, cfg.seed, curated)
    train(cfg, curated, fp32_dir)
    if student:
        distil(cfg, curated, fp32_dir, work / "student")
    return fp32_dir, curated, work / "student"


def main(args: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    smoke = "--smoke" in args
    overrides = [a for a in args if a != "--smoke"]
    if not smoke and not any(o.startswith("experiment=") for o in overrides):
        overrides = ["experiment=compression_study", *overrides]
    cfg = compose([*SMOKE, *overrides] if smoke else overrides)
    if smoke:
        with open_dict(cfg):
            cfg.compress.pipelines = SMOKE_PIPELINES
    with tempfile.TemporaryDirectory() as tmp:
        if smoke:
            fp32_dir, curated, student = build_small(cfg, Path(tmp) / "built")
        else:
            fp32_dir, curated = ROOT / "models/fp32", ROOT / "data/curated"
            student = ROOT / "models/student"
            if not (fp32_dir / "model.pt").exists():
                sys.exit("error: models/fp32 not found; run make repro first")
        report(cfg, fp32_dir, curated, student, Path(tmp) / "compressed")


def report(cfg: DictConfig, fp32_dir: Path, curated: Path, student: Path, out: Path) -> None:
    """Run `compress` on the model in `fp32_dir` into `out` and print the ratios."""
    _, meta = load_fp32(fp32_dir)
    splits = {s: pd.read_parquet(curated / f"{s}.parquet") for s in ("train", "val", "test")}
    val_x, val_y = encode_split(splits["val"], meta)
    train_x = encode_split(splits["train"], meta)[0]
    train = (train_x, encode_targets(splits["train"][meta["target"]], meta))
    result = compress(
        fp32_dir,
        val_x,
        encode_split(splits["test"], meta),
        cfg.compress,
        out,
        val_y=val_y,
        train=train,
        student_dir=student,
        seed=cfg.seed,
    )
    name = SCORE_NAME[meta["task"]]
    base = result["fp32"]["latency_ms"]["eager"]
    small, large = min(base, key=int), max(base, key=int)
    rows = []
    for key, r in result["candidates"].items():
        row = {"name": key, "size": r["size_ratio"], name: r[name]}
        for b in (small, large):
            for path in ("eager", "compiled"):
                if path in r["latency_ms"]:
                    row[f"b{b} {path}"] = r["latency_ms"][path][b] / base[b]
            row[f"b{b} best"] = min(t[b] for t in r["latency_ms"].values()) / base[b]
        rows.append(row)
    print(f"ratios to FP32 eager (FP32 eager: batch {small} {base[small]:.4f} ms, "
          f"batch {large} {base[large]:.4f} ms); size: to the FP32 .pt2 file "
          f"({result['fp32']['size_bytes']} bytes)")  # fmt: skip
    print(pd.DataFrame(rows).to_string(index=False, float_format="%.3f"))
    print(f"selected: {result['method']}; serving plan (batch >= n: path): "
          f"{result['serving']['plan']}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
