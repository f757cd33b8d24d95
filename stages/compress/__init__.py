"""compress: prune and quantize the FP32 model (Intel Neural Compressor), measure, report.

Builds the configured model (`compress.prune`, then `compress.method`: one INC method by
name, or `auto`, INC's autotune over `compress.tune.methods`) and every pipeline of
`compress.pipelines` (none by default; `experiment=compression_study` lists them all;
steps: `distil`, `prune_structured`, `prune_global_unstructured`, then one quantization
method). Each result is saved as a torch.export program and measured
on the test split against FP32: file size, score (accuracy, or R^2) and latency at several
batch sizes, eager and compiled by Inductor (FP32 compiled only when it may ship or is
compared with pipelines). `compress.select` says which one is written to
`models/compressed/` (with the execution path to serve per batch size in `model.json`);
fails past `compress.max_accuracy_drop`. Writes `metrics/compress.json`,
`plots/compress.csv`, `reports/compress.html`, and `reports/compress_answers.npz`: the
shipped program's own answers on the test split (eager), which the validate stage holds the
served ones to.
"""

import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from fullstack_ml.answers import save_answers
from fullstack_ml.curated import load_split
from fullstack_ml.model import (
    SCORE_NAME,
    decode,
    encode_split,
    encode_targets,
    load_fp32,
    predict_logits,
    score,
)
from fullstack_ml.paths import (
    COMPRESS_ANSWERS,
    COMPRESS_DETAILS,
    COMPRESS_PLOT,
    COMPRESS_REPORT,
    COMPRESSED_DIR,
    FP32_DIR,
    METRICS,
    STUDENT_DIR,
)
from fullstack_ml.progress import track
from fullstack_ml.runtime.meta import write_meta
from fullstack_ml.runtime.program import fastest_paths, torch_threads
from fullstack_ml.stage import StageError, atomic_dir, write_json
from stages.compress.measure import measure
from stages.compress.prune import check_prune, finetune, prune_model, sparsity
from stages.compress.quantize import calibrator, inc_config, quantize, quiet_inc, tune
from stages.compress.report import table, write_report

log = logging.getLogger("stages.compress")
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
        The comparison written to the metrics file, and `answers`: the shipped program's on
        the test split (eager), which are not.
    """
    pipelines = check_config(cfg, student_dir)
    if train is None and cfg.prune.finetune_epochs:  # callers measuring the method alone
        skipped = [k for k, st in list(pipelines.items())[1:] if set(st) & PRUNE_STEPS.keys()]
        for key in skipped:
            log.warning("pipeline %s skipped: fine-tuning after pruning needs the train split", key)
            del pipelines[key]
    quiet_inc()
    with torch_threads(cfg.threads):
        data = {"val": val, "val_y": val_y, "train": train, "seed": seed}
        return _compress(fp32_dir, test, cfg, out_dir, pipelines, data, student_dir)


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
        # FP32 compiled only where it may ship or is compared: eager is the ratios' baseline
        study = cfg.fp32_fallback or len(pipelines) > 1
        results = {
            "fp32": measure(fp32[0], tmp / "fp32.pt2", test, meta, cfg, cfg.compile and study)
        }
        built = {}
        candidates = track(pipelines.items(), len(pipelines), "compress", "candidate", log)
        for key, steps in candidates:
            log.info("pipeline %s: %s", key, " -> ".join(steps))
            model, new_meta, details = build(steps, fp32, data, cfg, student_dir)
            check = None
            if cfg.select == "method" and len(results) == 1:  # fail before timing it
                fp32_score = results["fp32"][name]
                check = partial(check_budget, fp32_score, max_drop=cfg.max_accuracy_drop, name=name)
            results[key] = {
                **measure(model, tmp / f"{key}.pt2", test, meta, cfg, check=check),
                **details,
            }
            built[key] = new_meta
        chosen = pick(results, next(iter(pipelines)), cfg, name)
        drop = check_budget(
            results["fp32"][name], results[chosen][name], cfg.max_accuracy_drop, name
        )
        (tmp / f"{chosen}.pt2").rename(tmp / "model.pt2")
        serving = serving_plan(results["fp32"], results[chosen], cfg)
        if not cfg.fp32_fallback:  # by config, not by measurement: the same files every run
            (tmp / "fp32.pt2").unlink()
        for key in pipelines:
            (tmp / f"{key}.pt2").unlink(missing_ok=True)
        # no measured figure here (the serving plan goes to metrics): same inputs, same bytes
        write_meta(tmp, {**built[chosen], "compression": chosen})
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
    answers = {key: r.pop("answers") for key, r in results.items()}
    top = results[chosen]
    return {
        "answers": answers[chosen],
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
    compressed model's, which the validate stage's parity check rejects). Measured, so it is
    written to metrics/compress.json, which the package stage ships in the bento."""
    latency = {f"compressed_{p}": t for p, t in chosen["latency_ms"].items()}
    programs = {"compressed": "model.pt2"}
    if cfg.fp32_fallback:
        latency |= {f"fp32_{p}": t for p, t in fp32["latency_ms"].items()}
        programs["fp32"] = "fp32.pt2"
    plan = fastest_paths(latency, set(latency))
    return {"programs": programs, "latency_ms": latency, "plan": plan}


def headline(result: dict[str, Any], name: str) -> dict[str, Any]:
    """What `dvc exp show` compares: the chosen method, its score and its ratios to FP32
    (the candidates and per-batch latencies stay in the details file)."""
    keys = ["size_ratio", "accuracy_drop_points", "latency_ratio_batch1", "latency_ratio_batch256"]
    return {"method": result["method"], name: result["compressed"][name]} | {
        k: result[k] for k in keys
    }


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
        COMPRESSED_DIR,
        val_y=val_y,
        train=train,
        student_dir=STUDENT_DIR if STUDENT_DIR.exists() else None,
        seed=cfg.seed,
    )
    name = SCORE_NAME[meta["task"]]
    # what validate holds the server's answers to
    save_answers(COMPRESS_ANSWERS, result.pop("answers"), COMPRESSED_DIR / "model.pt2")
    write_json(COMPRESS_DETAILS, result)
    write_json(METRICS["compress"], headline(result, name))
    write_report(result, name, COMPRESS_PLOT, COMPRESS_REPORT)
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
        COMPRESSED_DIR,
    )
