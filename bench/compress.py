"""Compression benchmark: every configured method and pipeline against FP32 eager, one run.

Runs `stages.compress.compress` on the pipeline's FP32 model (`models/fp32`) and curated
splits (`data/curated`; run `make repro` first) into a temporary folder, with conf/ composed
plus the overrides given, then prints per candidate (FP32 first): file size, test score and
median latency at batch 1 and at the largest batch, eager and Inductor-compiled, each as a
ratio to FP32 eager measured in the same run. Latency uses `compress.threads` torch threads
(1, as the service). `best` is the faster path; the serving plan follows the table.

    python -m bench.compress                      # the default config
    python -m bench.compress compress.latency_repeats=200 compress.fp32_fallback=true
"""

import logging
import sys
import tempfile
from pathlib import Path

import pandas as pd

from fullstack_ml.model import SCORE_NAME, encode_split, encode_targets, load_fp32
from fullstack_ml.stage import ROOT, compose
from stages.compress import compress


def main(overrides: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    cfg = compose(overrides)
    fp32_dir, curated = ROOT / "models/fp32", ROOT / "data/curated"
    if not (fp32_dir / "model.pt").exists():
        sys.exit("error: models/fp32 not found; run make repro first")
    _, meta = load_fp32(fp32_dir)
    splits = {s: pd.read_parquet(curated / f"{s}.parquet") for s in ("train", "val", "test")}
    val_x, val_y = encode_split(splits["val"], meta)
    train_x = encode_split(splits["train"], meta)[0]
    train = (train_x, encode_targets(splits["train"][meta["target"]], meta))
    with tempfile.TemporaryDirectory() as tmp:
        result = compress(
            fp32_dir,
            val_x,
            encode_split(splits["test"], meta),
            cfg.compress,
            Path(tmp) / "compressed",
            val_y=val_y,
            train=train,
            student_dir=ROOT / "models/student",
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
