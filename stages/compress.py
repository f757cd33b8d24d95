"""compress: prune and quantize the FP32 model (Intel Neural Compressor), measure, report.

Builds the configured model (`compress.prune`, then `compress.method`: one INC method by
name, or `auto`, INC's autotune over `compress.tune.methods`) and every pipeline of
`compress.pipelines` (steps: `distil`, `prune_structured`, `prune_global_unstructured`,
then one quantization method). Each result is saved as a torch.export program and measured
on the test split against FP32: file size, score (accuracy, or R^2) and latency at several
batch sizes, eager and compiled by Inductor. `compress.select` says which one is written to
`models/compressed/` (with the execution path to serve per batch size in `model.json`);
fails past `compress.max_accuracy_drop`. Writes `metrics/compress.json`,
`plots/compress.csv` and `reports/compress.html`.
"""

import html
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn

from stages.common import StageError, atomic_dir, run, write_atomic, write_json
from stages.export import compile_module, fastest_paths, load_program, save_program
from stages.ingest import load_split
from stages.model import (
    SCORE_NAME,
    decode,
    encode_split,
    encode_targets,
    load_fp32,
    predict_logits,
    score,
)
from stages.prune import check_prune, finetune, prune_model, sparsity
from stages.quantize import calibrator, inc_config, quantize, quiet_inc, tune

log = logging.getLogger("stages.compress")
FP32_DIR = Path("models/fp32")
STUDENT_DIR = Path("models/student")
OUT_DIR = Path("models/compressed")
METRICS = Path("metrics/compress.json")
PLOT = Path("plots/compress.csv")
REPORT = Path("reports/compress.html")
PRUNE_STEPS = {"prune_structured": "structured", "prune_global_unstructured": "global_unstructured"}
OBJECTIVES = ("size", "latency")
SELECT = ("method", "best")


def method_names(cfg: DictConfig) -> list[str]:
    """Valid `compress.method` values: the configured INC methods, `auto`, `none` (FP32)."""
    return [*cfg.methods, "auto", "none"]


def main_steps(cfg: DictConfig) -> list[str]:
    """The steps of the configured model: `compress.prune` (if any), `compress.method`."""
    prune = [] if cfg.prune.method == "none" else [f"prune_{cfg.prune.method}"]
    return [*prune, cfg.method]


def check_config(cfg: DictConfig, student_dir: Path | None) -> dict[str, list[str]]:
    """The pipelines to build (name -> steps), the configured one first; StageError naming
    the key at fault."""
    names = method_names(cfg)
    if cfg.method not in names:
        raise StageError(f"compress.method: unknown method {cfg.method!r} ({', '.join(names)})")
    check_prune(cfg.prune)
    if cfg.objective not in OBJECTIVES:
        raise StageError(f"compress.objective: {cfg.objective!r} is not one of {OBJECTIVES}")
    if cfg.select not in SELECT:
        raise StageError(f"compress.select: {cfg.select!r} is not one of {SELECT}")
    pipelines = {"+".join(main_steps(cfg)): main_steps(cfg)}
    for name, steps in (cfg.get("pipelines") or {}).items():  # `~compress.pipelines`: none
        steps = list(steps)
        key = f"compress.pipelines.{name}"
        valid = ["distil", *PRUNE_STEPS, *names]
        for i, step in enumerate(steps):
            if step not in valid:
                raise StageError(f"{key}: unknown step {step!r} ({', '.join(valid)})")
            if step == "distil" and i != 0:
                raise StageError(f"{key}: 'distil' must be the first step")
            if step in names and i != len(steps) - 1:
                raise StageError(f"{key}: the quantization method {step!r} must be the last step")
        if "distil" in steps and (student_dir is None or not (student_dir / "model.pt").exists()):
            raise StageError(
                f"{key}: step 'distil' needs the student model in "
                f"{student_dir or STUDENT_DIR}/ (run the distil stage first)"
            )
        pipelines.setdefault(name, steps)
    return pipelines


def median_latency_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median time of one forward pass, after a few warm-up passes."""
    times = []
    with torch.inference_mode():
        for i in range(repeats + 5):
            start = time.perf_counter()
            model(x)
            if i >= 5:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def latencies(model: nn.Module, x: np.ndarray, cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Latency (ms) of `model` eager and, if `compress.compile`, Inductor-compiled, at each
    batch size of `compress.batch_sizes` (rows of `x`, cycled)."""
    xt = torch.from_numpy(x)
    paths = {"eager": model}
    if cfg.compile:
        torch._dynamo.reset()
        try:
            paths["compiled"] = compile_module(model, x.shape[1])
        except Exception as err:  # noqa: BLE001  reported, the eager numbers still count
            log.warning("torch.compile failed (%s: %s)", type(err).__name__, err)
    return {
        path: {
            str(b): median_latency_ms(m, xt[np.arange(b) % len(xt)], cfg.latency_repeats)
            for b in cfg.batch_sizes
        }
        for path, m in paths.items()
    }


def measure(
    module: nn.Module, path: Path, test: tuple[np.ndarray, np.ndarray], meta: dict, cfg: DictConfig
) -> dict[str, Any]:
    """Save `module` to `path`, load it back and measure the loaded program: file size,
    score on `test`, latency per execution path and batch size."""
    x, y = test
    save_program(module, path, torch.from_numpy(x[:2]))
    program = load_program(path)
    times = latencies(program, x, cfg)
    best = {b: min(t[b] for t in times.values()) for b in times["eager"]}
    first, last = str(min(cfg.batch_sizes)), str(max(cfg.batch_sizes))
    return {
        "size_bytes": path.stat().st_size,
        SCORE_NAME[meta["task"]]: score(y, decode(predict_logits(program, x), meta), meta["task"]),
        "latency_ms_batch1": best[first],
        "latency_ms_batch256": best[last],
        "latency_ms": times,
    }


def build(
    steps: list[str],
    fp32: tuple[nn.Module, dict],
    data: dict[str, Any],
    cfg: DictConfig,
    student_dir: Path | None,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Run `steps` from the FP32 model: (exportable model, its metadata, step details)."""
    model, meta = fp32
    details: dict[str, Any] = {"steps": steps}
    for step in steps:
        if step == "distil":
            model, meta = load_fp32(student_dir)
        elif step in PRUNE_STEPS:
            model, meta = prune_model(model, PRUNE_STEPS[step], cfg.prune.sparsity, meta)
            model = finetune(model, data["train"], meta["task"], cfg.prune, data["seed"])
            details["sparsity"] = sparsity(model)
            details["hidden_sizes"] = meta["model"].get("hidden_sizes")
        elif step == "auto":
            model, details["tuning"] = auto(model, meta, data, cfg)
        elif step != "none":
            run_fn = calibrator(data["val"], cfg.calibration_batches, cfg.calibration_batch_size)
            example = torch.from_numpy(data["val"][: cfg.calibration_batch_size])
            model = quantize(model, inc_config(cfg.methods, step), run_fn, example)
    return model, meta, details


def auto(
    model: nn.Module, meta: dict, data: dict[str, Any], cfg: DictConfig
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """INC autotune over `compress.tune.methods`, scored on the val split; of the trials
    within `compress.max_accuracy_drop` of the model on val, the smallest (objective size)
    or the fastest at the largest batch (objective latency)."""
    if data["val_y"] is None:
        raise StageError("compress.method=auto: tuning needs the val split's labels")
    val_x, val_y = data["val"], data["val_y"]

    def evaluate(candidate: nn.Module) -> float:
        return score(val_y, decode(predict_logits(candidate, val_x), meta), meta["task"])

    baseline = evaluate(model)
    run_fn = calibrator(val_x, cfg.calibration_batches, cfg.calibration_batch_size)
    example = torch.from_numpy(val_x[: cfg.calibration_batch_size])
    trials = tune(
        model, cfg.methods, list(cfg.tune.methods), evaluate, run_fn, example, cfg.tune.max_trials
    )
    rows, best = [], None
    for name, candidate, value in trials:
        m = measure(candidate, data["scratch"] / f"auto_{name}.pt2", (val_x, val_y), meta, cfg)
        (data["scratch"] / f"auto_{name}.pt2").unlink()
        key = m["size_bytes"] if cfg.objective == "size" else m["latency_ms_batch256"]
        within = (baseline - value) * 100 <= cfg.max_accuracy_drop
        rows.append({"method": name, "val_score": value, "within_budget": within, **m})
        log.info("autotune trial %s: val %.4f, %s %.4g", name, value, cfg.objective, key)
        if within and (best is None or key < best[0]):
            best = (key, name, candidate)
    if best is None:
        raise StageError(
            f"compress.method=auto: no trial of {list(cfg.tune.methods)} is within "
            f"compress.max_accuracy_drop={cfg.max_accuracy_drop} on the val split"
        )
    for row in rows:
        row["chosen"] = row["method"] == best[1]
    return best[2], rows


def check_budget(fp32: float, new: float, max_drop: float, name: str = "accuracy") -> float:
    """The drop of the score `name` in points; StageError when it exceeds `max_drop`."""
    drop = (fp32 - new) * 100
    if drop > max_drop:
        raise StageError(
            f"compressed {name} {new:.4f} is {drop:.2f} points below FP32 "
            f"{fp32:.4f}, over the budget compress.max_accuracy_drop={max_drop}"
        )
    return drop


def pick(results: dict[str, dict], first: str, cfg: DictConfig, name: str) -> str:
    """The pipeline to write: the configured one (`select: method`), or the best within the
    budget by `compress.objective` (`select: best`)."""
    if cfg.select == "method":
        return first
    fp32 = results["fp32"][name]
    within = [
        k
        for k, r in results.items()
        if k != "fp32" and (fp32 - r[name]) * 100 <= cfg.max_accuracy_drop
    ]
    if not within:
        return max((k for k in results if k != "fp32"), key=lambda k: results[k][name])
    key = "size_bytes" if cfg.objective == "size" else "latency_ms_batch256"
    return min(within, key=lambda k: results[k][key])


def compress(
    fp32_dir: Path,
    val: np.ndarray,
    test: tuple[np.ndarray, np.ndarray],
    cfg: DictConfig,
    out_dir: Path,
    *,
    val_y: np.ndarray | None = None,
    train: tuple[np.ndarray, np.ndarray] | None = None,
    student_dir: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Build and measure the configured model and pipelines, check the budget, write `out_dir`.

    Args:
        val: encoded val features (calibration); `val_y` its labels (tuning, `auto` only).
        test: encoded test features and truth (the measurements).
        train: encoded train features and encoded targets (fine-tuning after pruning).
        student_dir: the distilled student (`models/student`), for pipelines with `distil`.
        seed: for the fine-tuning after pruning.

    Returns:
        The comparison written to the metrics file.
    """
    pipelines = check_config(cfg, student_dir)
    if train is None and cfg.prune.finetune_epochs:  # callers measuring the method alone
        skipped = [k for k, st in list(pipelines.items())[1:] if set(st) & PRUNE_STEPS.keys()]
        for key in skipped:
            log.warning("pipeline %s skipped: fine-tuning after pruning needs the train split", key)
            del pipelines[key]
    quiet_inc()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        data = {"val": val, "val_y": val_y, "train": train, "seed": seed}
        return _compress(fp32_dir, test, cfg, out_dir, pipelines, data, student_dir)
    finally:
        torch.set_num_threads(threads)


def _compress(
    fp32_dir: Path,
    test: tuple[np.ndarray, np.ndarray],
    cfg: DictConfig,
    out_dir: Path,
    pipelines: dict[str, list[str]],
    data: dict[str, Any],
    student_dir: Path | None,
) -> dict[str, Any]:
    """`compress` once its config is checked (`data`: val, val_y, train, seed)."""
    fp32 = load_fp32(fp32_dir)
    meta = fp32[1]
    name = SCORE_NAME[meta["task"]]
    with atomic_dir(out_dir) as tmp:
        data["scratch"] = tmp
        log.info("measuring FP32 on %d test rows", len(test[0]))
        results = {"fp32": measure(fp32[0], tmp / "fp32.pt2", test, meta, cfg)}
        built = {}
        for key, steps in pipelines.items():
            log.info("pipeline %s: %s", key, " -> ".join(steps))
            model, new_meta, details = build(steps, fp32, data, cfg, student_dir)
            results[key] = {**measure(model, tmp / f"{key}.pt2", test, meta, cfg), **details}
            built[key] = new_meta
            if cfg.select == "method" and len(results) == 2:  # fail before the report's
                check_budget(results["fp32"][name], results[key][name], cfg.max_accuracy_drop, name)
        chosen = pick(results, next(iter(pipelines)), cfg, name)
        drop = check_budget(
            results["fp32"][name], results[chosen][name], cfg.max_accuracy_drop, name
        )
        (tmp / f"{chosen}.pt2").rename(tmp / "model.pt2")
        serving = serving_plan(results["fp32"], results[chosen], cfg)
        if "fp32" not in {p.split("_")[0] for _, p in serving["plan"]}:
            (tmp / "fp32.pt2").unlink()
            serving["programs"].pop("fp32")
        for key in pipelines:
            (tmp / f"{key}.pt2").unlink(missing_ok=True)
        write_json(tmp / "model.json", {**built[chosen], "compression": chosen, "serving": serving})
    base = results["fp32"]
    for r in results.values():
        r["size_ratio"] = r["size_bytes"] / base["size_bytes"]
        for b in ("batch1", "batch256"):
            r[f"latency_ratio_{b}"] = (
                r[f"latency_ms_{b}"]
                / base["latency_ms"]["eager"][
                    str(max(cfg.batch_sizes) if b == "batch256" else min(cfg.batch_sizes))
                ]
            )
    top = results[chosen]
    return {
        "method": chosen,
        "fp32": base,
        "compressed": top,
        "size_ratio": top["size_ratio"],
        "accuracy_drop_points": drop,
        "latency_ratio_batch1": top["latency_ratio_batch1"],
        "latency_ratio_batch256": top["latency_ratio_batch256"],
        "serving": serving,
        "candidates": results,
    }


def serving_plan(fp32: dict, chosen: dict, cfg: DictConfig) -> dict[str, Any]:
    """The execution paths the service may use, their latencies and the fastest per batch
    size. FP32 paths only with `compress.fp32_fallback` (FP32 answers can differ from the
    compressed model's, which the validate stage's parity check rejects)."""
    latency = {f"compressed_{p}": t for p, t in chosen["latency_ms"].items()}
    if cfg.fp32_fallback:
        latency |= {f"fp32_{p}": t for p, t in fp32["latency_ms"].items()}
    plan = fastest_paths(latency, set(latency))
    return {
        "programs": {"compressed": "model.pt2", "fp32": "fp32.pt2"},
        "latency_ms": latency,
        "plan": plan,
    }


COLUMNS = ["size_bytes", "size_ratio", "latency_ms_batch1", "latency_ratio_batch1",
           "latency_ms_batch256", "latency_ratio_batch256"]  # fmt: skip


def table(result: dict[str, Any], score_name: str) -> pd.DataFrame:
    """One row per candidate (FP32 first): size, score, best-path latency and ratios."""
    rows = []
    for k, r in result["candidates"].items():
        row = {"name": k, score_name: r[score_name], **{c: r[c] for c in COLUMNS}}
        for path, times in r["latency_ms"].items():
            for b in (min(times, key=int), max(times, key=int)):
                row[f"{path}_ms_batch{b}"] = times[b]
        rows.append({**row, "selected": k == result["method"]})
    return pd.DataFrame(rows)


def bar_chart(df: pd.DataFrame) -> str:
    """An inline SVG: size and latency ratios vs FP32 per candidate, as horizontal bars."""
    series = [("size_ratio", "#4e79a7"), ("latency_ratio_batch1", "#f28e2b"),
              ("latency_ratio_batch256", "#59a14f")]  # fmt: skip
    scale = 300 / max(1.0, float(df[[s for s, _ in series]].max().max()))
    row_h, left = 16 * len(series) + 10, 220
    parts = []
    for i, r in enumerate(df.itertuples()):
        y = 20 + i * row_h
        parts.append(f'<text x="0" y="{y + 14}" font-size="12">{html.escape(r.name)}</text>')
        for j, (col, color) in enumerate(series):
            v = getattr(r, col)
            yy = y + j * 16
            parts.append(
                f'<rect x="{left}" y="{yy}" width="{v * scale:.1f}" height="14" fill="{color}"/>'
                f'<text x="{left + v * scale + 4:.1f}" y="{yy + 11}" font-size="10">{v:.2f}</text>'
            )
    legend = "".join(
        f'<rect x="{left + k * 170}" y="0" width="10" height="10" fill="{c}"/>'
        f'<text x="{left + k * 170 + 14}" y="10" font-size="11">{s}</text>'
        for k, (s, c) in enumerate(series)
    )
    one = left + scale
    height = 30 + len(df) * row_h
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + 380}" height="{height}">'
        f'{legend}<line x1="{one}" y1="14" x2="{one}" y2="{height}" stroke="#999" '
        f'stroke-dasharray="3"/>{"".join(parts)}</svg>'
    )


def write_report(result: dict[str, Any], score_name: str, csv: Path, page: Path) -> None:
    """The comparison as a CSV (DVC plots) and an HTML page (table and bar chart)."""
    df = table(result, score_name)
    write_atomic(csv, df.to_csv(index=False, float_format="%.6g"))
    plan = ", ".join(f"batch >= {b}: {p}" for b, p in result["serving"]["plan"])
    write_atomic(
        page,
        "<!doctype html><html><head><meta charset='utf-8'><title>Compression report</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}</style>"
        f"</head><body><h1>Compression report</h1><p>Selected: <b>{html.escape(result['method'])}"
        f"</b>; serving paths: {html.escape(plan)}. Latency: the faster of eager and "
        "Inductor-compiled, ratios against FP32 eager.</p>"
        f"{df.to_html(index=False, float_format=lambda v: f'{v:.4g}')}"
        f"<h2>Ratios vs FP32 (dashed line: 1.0)</h2>{bar_chart(df)}</body></html>\n",
    )


def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    _, meta = load_fp32(FP32_DIR)
    try:
        val_x, val_y = encode_split(load_split("val"), meta)
        test_xy = encode_split(load_split("test"), meta)
        train_df = load_split("train")
        train = (encode_split(train_df, meta)[0], encode_targets(train_df[meta["target"]], meta))
    except (KeyError, ValueError) as err:
        raise StageError(f"curated splits do not match the model: {err}") from None
    result = compress(
        FP32_DIR,
        val_x,
        test_xy,
        cfg.compress,
        OUT_DIR,
        val_y=val_y,
        train=train,
        student_dir=STUDENT_DIR if STUDENT_DIR.exists() else None,
        seed=cfg.seed,
    )
    write_json(METRICS, result)
    name = SCORE_NAME[meta["task"]]
    write_report(result, name, PLOT, REPORT)
    log.info("\n%s", table(result, name).to_string(index=False, float_format="%.4g"))
    log.info(
        "%s: size %.2fx FP32, %s %.4f -> %.4f, latency b1 %.2fx b256 %.2fx -> %s",
        result["method"],
        result["size_ratio"],
        name,
        result["fp32"][name],
        result["compressed"][name],
        result["latency_ratio_batch1"],
        result["latency_ratio_batch256"],
        OUT_DIR,
    )


if __name__ == "__main__":
    run(main)
