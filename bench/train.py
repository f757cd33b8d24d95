"""Training benchmark: the train stage on Ray Train against a plain PyTorch loop.

The same model (conf/model/), data (the synthetic source, ingested and encoded by the
stages), batch size, optimizer, epochs and validation pass each epoch:
  (a) the train stage's `fit` on Ray Train (`TorchTrainer`): in local mode (0 workers, the
      default: in the calling process) and with 1 and 2 CPU workers (Ray Data shards);
  (b) a single-process PyTorch loop over the same encoded arrays, shuffled each epoch, with
      1 torch thread (what one Ray worker gets: Ray sets OMP_NUM_THREADS to its CPUs) and
      with torch's default threads.
Each run is a fresh process, one at a time. Prints wall time split into start-up (process
start to the first epoch, Ray's start and dataset building included) and the median
epoch, samples/s, and the per-epoch ratio (a)/(b, 1 thread). Target: <= 1.15 at 1 worker.

    python -m bench.train --rows 200000 --epochs 5 --workers 0,1,2
    python -m bench.train --smoke      # 2,000 rows, 2 epochs, local mode against 1 thread

`--gpu` (on a machine with a GPU; bench/gpu_check.sh) instead trains with one Ray Train
worker on the CPU, on the GPU in FP32 and on the GPU with bf16 autocast, and prints
samples/s against the CPU run. `--set key=value ...` adds Hydra overrides to every run.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable)
TARGET = 1.15
SMOKE = {"rows": 2000, "epochs": 2, "workers": "0"}  # seconds: the same runs, tiny


GPU_RUNS = {
    "Ray Train CPU (gloo)": ["train.use_gpu=false"],
    "Ray Train GPU fp32 (nccl)": ["train.use_gpu=true", "train.precision=fp32"],
    "Ray Train GPU bf16 (nccl)": ["train.use_gpu=true", "train.precision=bf16"],
}


def overrides(rows: int, epochs: int) -> list[str]:
    return [
        "data=synthetic",
        f"data.synthetic.rows={rows}",
        f"train.epochs={epochs}",
        "train.early_stopping.patience=null",  # every epoch runs
    ]


def child_ray(cfg: Any, data: Path, workers: int) -> dict[str, Any]:
    """The train stage's `fit` with `workers` Ray Train workers."""
    from omegaconf import OmegaConf

    from fullstack_ml.curated import read_schema, read_splits
    from fullstack_ml.trainer import fit
    from stages.train import model_meta

    schema = read_schema(data)
    splits, fit_on = read_splits(data, 200_000)
    train_cfg = {**OmegaConf.to_container(cfg.train, resolve=True), "num_workers": workers}
    meta = model_meta(schema, fit_on, OmegaConf.to_container(cfg.model), train_cfg)
    _, history, _ = fit(splits, meta, train_cfg, cfg.seed, None, schema.rows["train"])
    return {"epochs": [h["epoch_s"] for h in history], "rows": schema.rows["train"]}


def child_torch(cfg: Any, data: Path, threads: int | None) -> dict[str, Any]:
    """A plain PyTorch loop: what a user would write without Ray."""
    import numpy as np
    import pandas as pd
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from torch import nn

    from fullstack_ml.curated import read_schema
    from fullstack_ml.model import build_network, encode_targets, num_outputs, preprocessor
    from stages.train import model_meta

    if threads:
        torch.set_num_threads(threads)
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)
    train, val = (pd.read_parquet(data / f"{s}.parquet") for s in ("train", "val"))
    model_cfg = OmegaConf.to_container(cfg.model)
    meta = model_meta(read_schema(data), train, model_cfg, train_cfg)
    pre, target = preprocessor(meta), meta["target"]
    x = torch.from_numpy(pre.encode_frame(train))
    y = torch.from_numpy(encode_targets(train[target], meta))
    vx = torch.from_numpy(pre.encode_frame(val))
    vy = torch.from_numpy(encode_targets(val[target], meta))
    torch.manual_seed(cfg.seed)
    model = build_network(cfg.model, pre.width, num_outputs(meta), pre.image_shape)
    optimizer = instantiate(train_cfg["optimizer"])(model.parameters(), lr=train_cfg["lr"])
    loss_fn = nn.CrossEntropyLoss()
    rng, size, epochs = np.random.default_rng(cfg.seed), train_cfg["batch_size"], []
    for _ in range(train_cfg["epochs"]):
        began = time.perf_counter()
        model.train()
        order = torch.from_numpy(rng.permutation(len(x)))
        for i in range(0, len(x), size):
            batch = order[i : i + size]
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            hits = sum(
                (model(vx[i : i + 1024]).argmax(1) == vy[i : i + 1024]).sum().item()
                for i in range(0, len(vx), 1024)
            )
        assert hits >= 0
        epochs.append(time.perf_counter() - began)
    return {"epochs": epochs, "rows": len(x), "threads": torch.get_num_threads()}


def run_child(args: list[str]) -> dict[str, Any]:
    began = time.perf_counter()
    proc = subprocess.run([BIN, "-m", "bench.train", *args], capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"bench.train {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    result["startup"] = wall - sum(result["epochs"])
    result["epoch"] = statistics.median(result["epochs"])
    return result


def gpu_table(runs: dict[str, dict[str, Any]]) -> None:
    """samples/s per run and against the first (CPU) run."""
    cpu = next(iter(runs.values()))
    print("| run | start-up s | median epoch s | samples/s | speed-up vs CPU |")
    print("|---|---:|---:|---:|---:|")
    for name, r in runs.items():
        cells = [f"{r['startup']:.1f}", f"{r['epoch']:.2f}", f"{r['rows'] / r['epoch']:,.0f}"]
        print(f"| {name} | {' | '.join(cells)} | {cpu['epoch'] / r['epoch']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic rows (all splits)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", default="0,1,2", help="Ray Train workers (0: local mode)")
    parser.add_argument("--gpu", action="store_true", help="CPU vs GPU training (see above)")
    parser.add_argument("--set", nargs="*", default=[], help="Hydra overrides for every run")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE}: seconds, for the tests")
    parser.add_argument("--child", choices=["ray", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    from fullstack_ml.stage import compose

    cfg = compose(overrides(args.rows, args.epochs) + args.set)
    if args.child == "ray":
        print(json.dumps(child_ray(cfg, args.data, args.n)))
        return
    if args.child == "torch":
        print(json.dumps(child_torch(cfg, args.data, args.n or None)))
        return
    from stages.ingest import ingest

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = Path(tmp) / "curated"
        ingest(cfg.data, cfg.seed, data)
        common = ["--rows", str(args.rows), "--epochs", str(args.epochs), "--data", str(data)]
        if args.gpu:
            gpu_table(
                {
                    k: run_child([*common, "--child", "ray", "--n", "1", "--set", *args.set, *v])
                    for k, v in GPU_RUNS.items()
                }
            )
            return
        common += ["--set", *args.set]
        runs = {"torch, 1 thread": run_child([*common, "--child", "torch", "--n", "1"])}
        if not args.smoke:  # the same loop and code as above, torch's threads aside
            runs["torch, default threads"] = run_child([*common, "--child", "torch"])
        for k in (int(w) for w in args.workers.split(",")):
            label = f"Ray Train, {k} worker(s)" if k else "Ray Train, local mode"
            runs[label] = run_child([*common, "--child", "ray", "--n", str(k)])
    base = runs["torch, 1 thread"]["epoch"]
    train_rows = runs["torch, 1 thread"]["rows"]
    print(f"\n{args.rows} synthetic rows ({train_rows} train), {args.epochs} epochs")
    print("| run | start-up s | median epoch s | samples/s | epoch / torch 1 thread |")
    print("|---|---:|---:|---:|---:|")
    for name, r in runs.items():
        cells = [f"{r['startup']:.1f}", f"{r['epoch']:.2f}", f"{r['rows'] / r['epoch']:,.0f}"]
        print(f"| {name} | {' | '.join(cells)} | {r['epoch'] / base:.2f} |")
    one = next((r for n, r in runs.items() if n.startswith("Ray Train, 1 ")), None)
    if one:
        ratio = one["epoch"] / base
        verdict = "met" if ratio <= TARGET else "NOT met"
        print(f"\nTarget: Ray Train 1 worker per epoch <= {TARGET}x plain PyTorch: {ratio:.2f}x")
        print(f"({verdict})")


if __name__ == "__main__":
    main()
