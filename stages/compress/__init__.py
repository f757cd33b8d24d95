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
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn

from fullstack_ml.answers import save_answers
from fullstack_ml.curated import load_split
from fullstack_ml.gates import budget_verdict, paired_drop, paired_error_drop
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
from fullstack_ml.runtime.engine import ONNX_FILE, PORTABLE, RUNTIMES, runtime_of
from fullstack_ml.runtime.meta import write_meta
from fullstack_ml.runtime.program import fastest_paths, torch_threads
from fullstack_ml.stage import StageError, atomic_dir, write_json
from stages.compress.measure import measure, portable
from stages.compress.outliers import fit_outliers
from stages.compress.prune import check_prune, finetune, prune_model, sparsity
from stages.compress.quantize import (
    calibrator,
    family,
    inc_config,
    int8_layers,
    quantizable_layers,
    quantize,
    quiet_inc,
    trials,
    tune,
    with_fp32_layers,
)
from stages.compress.report import table, write_report

log = logging.getLogger("stages.compress")
PRUNE_STEPS = {"prune_structured": "structured", "prune_global_unstructured": "global_unstructured"}
OBJECTIVES = ("size", "latency")
SELECT = ("method", "best")
UNDECIDED = ("warn", "fail")  # compress.undecided: when the rows cannot tell


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
    if cfg.undecided not in UNDECIDED:
        raise StageError(f"compress.undecided: {cfg.undecided!r} is not one of {UNDECIDED}")
    if not 0.5 < cfg.confidence < 1:
        raise StageError(f"compress.confidence: {cfg.confidence!r} is not in (0.5, 1)")
    for runtime in cfg.runtimes:
        if runtime not in PORTABLE:
            raise StageError(f"compress.runtimes: {runtime!r} is not one of {sorted(PORTABLE)}")
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
            model, details["tuning"] = auto(model, meta, data, cfg, data["judge"])
        elif step != "none":
            run_fn = calibrator(data["val"], cfg.calibration_batches, cfg.calibration_batch_size)
            example = torch.from_numpy(data["val"][: cfg.calibration_batch_size])
            config = inc_config(cfg.methods, step)
            model = quantize(model, config, run_fn, example)
            if family(config) == "pt2e":
                details["int8_layers"] = layers = int8_layers(model)
                if not any(done for done, _ in layers.values()):
                    raise StageError(
                        f"compress.methods.{step}: the quantized graph runs no layer on INT8"
                        " weights (the quantizer returned FP32)"
                    )
    return model, meta, details


def auto(
    model: nn.Module, meta: dict, data: dict[str, Any], cfg: DictConfig, judge: Callable
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """INC autotune over `compress.tune.methods`, scored on the val split for INC; of the
    trials the budget judges `within` (`judge`, on the eval rows), the smallest (objective
    size) or the fastest at the largest batch (objective latency); with none within, the
    least drop that is not `over`, which `decide` then warns about or fails."""
    if data["val_y"] is None:
        raise StageError("compress.method=auto: tuning needs the val split's labels")
    val_x, val_y = data["val"], data["val_y"]

    def evaluate(candidate: nn.Module) -> float:
        return score(val_y, decode(predict_logits(candidate, val_x), meta), meta["task"])

    run_fn = calibrator(val_x, cfg.calibration_batches, cfg.calibration_batch_size)
    example = torch.from_numpy(val_x[: cfg.calibration_batch_size])
    trials = tune(
        model, cfg.methods, list(cfg.tune.methods), evaluate, run_fn, example, cfg.tune.max_trials
    )
    rows, candidates = [], {}
    for name, candidate, value in trials:
        m = measure(candidate, data["scratch"] / f"auto_{name}.pt2", (val_x, val_y), meta, cfg)
        (data["scratch"] / f"auto_{name}.pt2").unlink()
        gate = judge(candidate)
        rows.append({"method": name, "val_score": value, "gate": gate, **m})
        candidates[name] = candidate
        log.info("autotune trial %s: val %.4f, budget %s", name, value, gate["verdict"])
    key = "size_bytes" if cfg.objective == "size" else "latency_ms_batch256"
    best = best_candidate([(r["method"], r["gate"], r[key]) for r in rows])
    for row in rows:
        row["chosen"] = row["method"] == best
        del row["answers"]
    return candidates[best], rows


def best_candidate(candidates: list[tuple[str, dict[str, Any], float]]) -> str:
    """Of (name, gate, cost) triples in order of preference (the configured one first): the
    least cost judged `within` the budget; with none, the first not judged `over` (a smaller
    drop that the rows cannot tell from noise is not worth a larger model); with none, the
    least drop."""
    within = [c for c in candidates if c[1]["verdict"] == "within"]
    if within:
        return min(within, key=lambda c: c[2])[0]
    pool = [c for c in candidates if c[1]["verdict"] != "over"]
    return pool[0][0] if pool else min(candidates, key=lambda c: (c[1]["drop"], c[2]))[0]


def judge(
    model: nn.Module, reference: np.ndarray, rows: dict[str, Any], meta: dict, cfg: DictConfig
) -> dict[str, Any]:
    """The accuracy budget's verdict on `model` against the FP32 model's answers `reference`,
    paired on the same rows (`rows`: x, y, splits): `fullstack_ml.gates.paired_drop` and
    `budget_verdict` (regression: the R^2 drop, bootstrapped)."""
    answers = decode(predict_logits(model, rows["x"]), meta)
    y = rows["y"]
    if meta["task"] == "classification":
        drop = paired_drop(reference == y, answers == y, cfg.confidence)
    else:
        drop = paired_error_drop(
            (reference - y) ** 2, (answers - y) ** 2, float(((y - y.mean()) ** 2).sum()),
            cfg.confidence,
        )  # fmt: skip
    return {
        **drop,
        "splits": rows["splits"],
        "verdict": budget_verdict(drop, cfg.max_accuracy_drop),
    }


def decide(gate: dict[str, Any], cfg: DictConfig, chosen: str, name: str) -> None:
    """Fail (StageError, one line) when `chosen`'s drop is over the budget, or undecided and
    `compress.undecided` is `fail`; log one warning line when it is undecided and `warn`."""
    budget, rows = cfg.max_accuracy_drop, f"{gate['rows']} rows of {gate['splits']}"
    seen = f"{name} drop {gate['drop']:.2f} points on {rows}"
    if "lost" in gate:
        seen += f" ({gate['lost']} rows lost, {gate['won']} won against FP32)"
    level = f"{cfg.confidence:.0%} confidence"
    if gate["verdict"] == "over":
        raise StageError(
            f"compressed model {chosen}: {seen}, at least {gate['drop_low']:.2f} at {level}: "
            f"over the budget compress.max_accuracy_drop={budget}"
        )
    if gate["verdict"] == "within":
        return
    if gate["verdict"] == "unresolvable":
        why = (
            f"{rows} cannot resolve compress.max_accuracy_drop={budget}: with no disagreement "
            f"at all the drop would be bounded only below {gate['resolution']:.2f} points"
        )
    else:
        why = (
            f"{rows} cannot tell whether {chosen} is within compress.max_accuracy_drop={budget}:"
            f" its drop is between {gate['drop_low']:.2f} and {gate['drop_high']:.2f} points"
            f" at {level}"
        )
    if cfg.undecided == "fail":
        raise StageError(f"{why}; {seen} (compress.undecided=fail)")
    log.warning("%s; shipping %s, %s (compress.undecided=warn)", why, chosen, seen)


def worth_falling_back(gate: dict[str, Any]) -> bool:
    """Whether layers left in FP32 could do better: the budget is missed, or undecided on rows
    that could show it (on rows too few to show it, no candidate can be `within`)."""
    return gate["verdict"] in ("over", "undecided")


def can_fall_back(steps: list[str], cfg: DictConfig) -> bool:
    """Whether INC's per-layer fallback applies: `compress.fallback.max_layers` > 0 and the
    last step a PT2E INT8 method."""
    method = steps[-1]
    if cfg.fallback.max_layers <= 0 or method not in cfg.methods:
        return False
    return family(inc_config(cfg.methods, method)) == "pt2e"


def fall_back(
    steps: list[str],
    fp32: tuple[nn.Module, dict],
    data: dict[str, Any],
    cfg: DictConfig,
    student_dir: Path | None,
    judge: Callable,
) -> list[tuple[str, nn.Module, dict[str, Any]]]:
    """INC's accuracy-aware tuning for a PT2E method that missed the budget: `autotune` over
    the method with one layer left in FP32 each, then, most sensitive first (the layer whose
    fallback lost the fewest rows), with 2, 3, ... layers left in FP32, as INC 2.x's basic
    strategy did; every trial judged by the budget. (name, model, gate) per trial."""
    source, _, _ = build(steps[:-1], fp32, data, cfg, student_dir)
    method, layers = steps[-1], quantizable_layers(source)
    run_fn = calibrator(data["val"], cfg.calibration_batches, cfg.calibration_batch_size)
    example = torch.from_numpy(data["val"][: cfg.calibration_batch_size])

    def evaluate(candidate: nn.Module) -> float:  # INC's score: higher is better
        return 100 - judge(candidate)["drop"]  # INC divides by the baseline's (100)

    def run(sets: list[list[str]]) -> list[tuple[str, nn.Module, dict[str, Any]]]:
        configs = [with_fp32_layers(cfg.methods, method, fp) for fp in sets]
        done = trials(source, configs, evaluate, run_fn, example)
        # judged again as exported: the weights folded to INT8, as the model ships
        return [
            (f"{method}+fp32:{','.join(fp)}", model, judge(model))
            for fp, (model, _) in zip(sets, done, strict=True)
        ]

    singles = run([[layer] for layer in layers[: cfg.fallback.max_layers]])
    tried = list(singles)
    if all(g["verdict"] != "within" for _, _, g in singles) and len(layers) > 2:
        order = [layers[i] for i, _ in sorted(enumerate(singles), key=lambda t: t[1][2]["drop"])]
        tried += run([order[:k] for k in range(2, min(len(layers), cfg.fallback.max_layers + 1))])
    for name, _, gate in tried:
        log.info("fallback %s: drop %.2f points, budget %s", name, gate["drop"], gate["verdict"])
    return tried


def pick(results: dict[str, dict], first: str, cfg: DictConfig) -> str:
    """The pipeline to write: the configured one (`select: method`), or the best by the
    budget's verdicts and `compress.objective` (`select: best`, see `best_candidate`)."""
    if cfg.select == "method":
        return first
    key = "size_bytes" if cfg.objective == "size" else "latency_ms_batch256"
    return best_candidate([(k, r["gate"], r[key]) for k, r in results.items() if k != "fp32"])


def eval_rows(
    names: list[str], val: np.ndarray, val_y: np.ndarray | None, test: tuple[np.ndarray, ...]
) -> dict[str, Any]:
    """The rows the accuracy budget is judged on: the splits `compress.eval_split` stacked
    (val only where its labels were given); x, y and their names."""
    parts = {"val": (val, val_y), "test": test}
    if unknown := [n for n in names if n not in parts]:
        raise StageError(f"compress.eval_split: {unknown[0]!r} is not one of val, test")
    got = [n for n in names if parts[n][1] is not None] or ["test"]
    return {
        "x": np.concatenate([parts[n][0] for n in got]),
        "y": np.concatenate([parts[n][1] for n in got]),
        "splits": "+".join(got),
    }


def state_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers: the size a candidate will have, before it
    is saved."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


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
    outliers: tuple[dict[str, pd.DataFrame], DictConfig] | None = None,
) -> dict[str, Any]:
    """Build and measure the configured model and pipelines, check the budget, write `out_dir`.

    Args:
        val: encoded val features (calibration); `val_y` its labels (tuning, `auto` only).
        test: encoded test features and truth (the measurements).
        train: encoded train features and encoded targets (fine-tuning after pruning).
        student_dir: the distilled student (`models/student`), for pipelines with `distil`.
        seed: for the fine-tuning after pruning.
        outliers: the raw train, val and test frames and the `outliers` config: fit the
            outlier detector (`stages.compress.outliers`) into `out_dir` too.

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
        rows = eval_rows(list(cfg.eval_split), val, val_y, test)
        data = {"val": val, "val_y": val_y, "train": train, "seed": seed, "eval": rows}
        data["outliers"] = outliers
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
    """`compress` once its config is checked (`data`: val, val_y, train, seed and eval, the
    budget's rows; `_compress` adds `judge`, the budget's verdict on a model, and `scratch`)."""
    fp32 = load_fp32(fp32_dir)
    meta = fp32[1]
    name = SCORE_NAME[meta["task"]]
    reference = decode(predict_logits(fp32[0], data["eval"]["x"]), meta)
    judge_fn = partial(judge, reference=reference, rows=data["eval"], meta=meta, cfg=cfg)
    data["judge"] = judge_fn
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
        first = None
        for key, steps in candidates:
            log.info("pipeline %s: %s", key, " -> ".join(steps))
            model, new_meta, details = build(steps, fp32, data, cfg, student_dir)
            if steps[-1] == "auto":
                gate = next(r["gate"] for r in details["tuning"] if r["chosen"])
            else:
                gate = judge_fn(model)
            if first is None and worth_falling_back(gate) and can_fall_back(steps, cfg):
                tried = fall_back(steps, fp32, data, cfg, student_dir, judge_fn)
                details["fallback"] = [{"name": n, **g} for n, _, g in tried]
                options = [(n, g, state_bytes(m)) for n, m, g in tried]
                best = best_candidate([(key, gate, state_bytes(model)), *options])
                if best != key:
                    key, (_, model, gate) = best, next(t for t in tried if t[0] == best)
            if first is None and cfg.select == "method" and gate["verdict"] == "over":
                decide(gate, cfg, key, name)  # fails before anything is timed
            first = first or key
            results[key] = {**measure(model, tmp / f"{key}.pt2", test, meta, cfg), **details}
            results[key]["gate"] = gate
            built[key] = new_meta
        chosen = pick(results, first, cfg)
        gate = results[chosen]["gate"]
        decide(gate, cfg, chosen, name)
        (tmp / f"{chosen}.pt2").rename(tmp / "model.pt2")
        log.info("exporting model.pt2 to ONNX for %s", ", ".join(cfg.runtimes) or "no runtime")
        onnx = portable(tmp / "model.pt2", tmp / ONNX_FILE, test[0], meta, cfg)
        serving = serving_plan(results["fp32"], results[chosen], onnx, cfg)
        detector = None
        if data["outliers"]:
            frames, settings = data["outliers"]
            log.info("fitting the outlier detector (outliers.target_fpr %s)", settings.target_fpr)
            program = tmp / "model.pt2"
            detector = fit_outliers(program, fp32[0], meta, frames, settings, tmp, data["seed"])
        keep = {"model.pt2", *(["fp32.pt2"] if cfg.fp32_fallback else [])}
        for program in tmp.glob("*.pt2"):  # by config, not by measurement: the same files
            if program.name not in keep:
                program.unlink()
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
        "accuracy_drop_points": gate["drop"],
        "accuracy_drop_bound": gate["drop_high"],
        "budget": gate["verdict"],
        "latency_ratio_batch1": top["latency_ratio_batch1"],
        "latency_ratio_batch256": top["latency_ratio_batch256"],
        "serving": serving,
        "candidates": results,
        **({"outliers": detector} if detector else {}),
    }


def serving_plan(fp32: dict, chosen: dict, onnx: dict, cfg: DictConfig) -> dict[str, Any]:
    """The execution paths the service may use, their latencies, the fastest per batch size
    and `runtime`, what `serve.runtime: auto` serves on (`fullstack_ml.runtime.engine`).
    FP32 paths only with `compress.fp32_fallback` (FP32 answers can differ from the
    compressed model's, which the validate stage's parity check rejects). Measured, so it is
    written to reports/compress.json, which the package stage ships in the bento."""
    latency = {f"compressed_{p}": t for p, t in chosen["latency_ms"].items()}
    programs = {"compressed": "model.pt2"}
    if cfg.fp32_fallback:
        latency |= {f"fp32_{p}": t for p, t in fp32["latency_ms"].items()}
        programs["fp32"] = "fp32.pt2"
    usable = {r: t for r, t in onnx["latency_ms"].items() if r not in onnx["unusable"]}
    latency |= {f"compressed_{r}": t for r, t in usable.items()}
    plan = fastest_paths(latency, set(latency))
    return {
        "programs": programs,
        "latency_ms": latency,
        "plan": plan,
        "runtime": fastest_runtime(latency),
        "unusable": onnx["unusable"],
        "parity": onnx["parity"],
        "qdq_ops": onnx["qdq_ops"],
    }


def fastest_runtime(latency: dict[str, dict[str, float]]) -> str:
    """The runtime of least geometric-mean latency over the measured batch sizes, each at
    its fastest path (a worker runs one runtime: one on onnxruntime never imports torch).
    A tie goes to the runtime named first in `RUNTIMES` (inductor)."""
    best: dict[str, dict[str, float]] = {}
    for path, times in latency.items():
        mine = best.setdefault(runtime_of(path), {})
        for b, t in times.items():
            mine[b] = min(mine.get(b, float("inf")), t)
    mean = {r: float(np.exp(np.mean(np.log(list(t.values()))))) for r, t in best.items()}
    return min(RUNTIMES, key=lambda r: mean.get(r, float("inf")))


def headline(result: dict[str, Any], name: str) -> dict[str, Any]:
    """What `dvc exp show` compares: the chosen method, its score and its ratios to FP32
    (the candidates and per-batch latencies stay in the details file)."""
    keys = ["size_ratio", "accuracy_drop_points", "accuracy_drop_bound"]
    keys += ["latency_ratio_batch1", "latency_ratio_batch256"]
    out = {"method": result["method"], name: result["compressed"][name]} | {
        k: result[k] for k in keys
    }
    if found := result.get("outliers"):  # the shipped detector: its AUROC and test rate
        chosen = found["chosen"]
        out |= {"outlier_detector": chosen, "outlier_rate_test": found["test_rate"]}
        out["outlier_mean_auroc"] = found["candidates"][chosen]["mean_auroc"]
    return out


def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    _, meta = load_fp32(FP32_DIR)
    try:
        frames = {name: load_split(name) for name in ("train", "val", "test")}
        val_x, val_y = encode_split(frames["val"], meta)
        test_xy = encode_split(frames["test"], meta)
        train_df = frames["train"]
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
        outliers=(frames, cfg.outliers),
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
