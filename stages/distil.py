"""distil: knowledge distillation of a smaller student network (`distil.student`, an entry of
conf/model/) from the FP32 teacher's soft labels, trained on Ray Train like the teacher.

Writes `models/student/` (the same format as `models/fp32/`: the compress stage can prune and
quantize it) and `metrics/distil.json` (the student's score, its drop in points from the
teacher's, their parameter ratio; sizes and counts go to the log);
its per-epoch curves through DVCLive in `dvclive/distil/`.
"""

import logging
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from fullstack_ml.curated import load_split, read_schema, read_splits
from fullstack_ml.model import (
    SCORE_NAME,
    decode,
    encode_split,
    load_fp32,
    predict_logits,
    save_fp32,
)
from fullstack_ml.model import score as score_of
from fullstack_ml.paths import DATA_DIR, FP32_DIR, LIVE, METRICS, STUDENT_DIR
from fullstack_ml.stage import StageError, atomic_dir, run, write_json
from fullstack_ml.train_worker import best_epoch
from fullstack_ml.trainer import SAMPLE_ROWS, fit

log = logging.getLogger("stages.distil")


def check_distil(cfg: dict[str, Any]) -> None:
    """Fail before Ray starts, naming the key, when `distil.*` is out of range."""
    t, alpha = cfg["temperature"], cfg["alpha"]
    if not isinstance(t, int | float) or isinstance(t, bool) or t <= 0:
        raise StageError(f"distil.temperature: expected a number > 0, got {t!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise StageError(f"distil.alpha: expected a number in [0, 1], got {alpha!r}")


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def file_size(model: nn.Module, meta: dict[str, Any]) -> int:
    """Bytes of the model as `save_fp32` writes it."""
    with tempfile.TemporaryDirectory() as tmp:
        save_fp32(model, Path(tmp), meta)
        return (Path(tmp) / "model.pt").stat().st_size


def distil(
    cfg: DictConfig,
    data_dir: Path,
    teacher_dir: Path,
    out_dir: Path,
    live_dir: Path | None = None,
) -> dict[str, Any]:
    """Train `cfg.distil.student` on the splits in `data_dir` from the teacher in
    `teacher_dir`, save it to `out_dir` and return the comparison on the test split; with
    `live_dir`, log each epoch there with DVCLive."""
    distil_cfg = OmegaConf.to_container(cfg.distil, resolve=True)
    check_distil(distil_cfg)
    teacher, teacher_meta = load_fp32(teacher_dir)
    rows = read_schema(data_dir).rows["train"]  # the curated data exists
    train_cfg = {
        **OmegaConf.to_container(cfg.train, resolve=True),
        "epochs": distil_cfg["epochs"],
        "lr": distil_cfg["lr"],
    }
    meta = {
        **teacher_meta,  # the same features, classes and preprocessing
        "model": distil_cfg["student"],
        "train": {k: v for k, v in train_cfg.items() if k != "optimizer"},
        "distilled_from": {
            "model": teacher_meta["model"],
            "temperature": distil_cfg["temperature"],
            "alpha": distil_cfg["alpha"],
        },
    }
    splits, _ = read_splits(data_dir, SAMPLE_ROWS)
    cluster = OmegaConf.to_container(cfg.cluster, resolve=True)
    student, history, trained_on = fit(
        splits,
        meta,
        train_cfg,
        cfg.seed,
        cluster,
        rows,
        teacher=teacher,
        distill={k: distil_cfg[k] for k in ("temperature", "alpha")},
        live_dir=live_dir,
    )
    x, y = encode_split(load_split("test", data_dir), teacher_meta)
    name, task = SCORE_NAME[meta["task"]], meta["task"]
    scores = {
        who: score_of(y, decode(predict_logits(model, x), meta), task)
        for who, model in (("teacher", teacher), ("student", student))
    }
    sizes = {"teacher": file_size(teacher, teacher_meta), "student": file_size(student, meta)}
    counts = {"teacher": parameters(teacher), "student": parameters(student)}
    with atomic_dir(out_dir) as tmp:
        save_fp32(student, tmp, {**meta, "trained_on": trained_on})
    return {
        f"teacher_{name}": scores["teacher"],
        f"student_{name}": scores["student"],
        "drop_points": (scores["teacher"] - scores["student"]) * 100,
        "teacher_parameters": counts["teacher"],
        "student_parameters": counts["student"],
        "parameter_ratio": counts["student"] / counts["teacher"],
        "teacher_bytes": sizes["teacher"],
        "student_bytes": sizes["student"],
        "epochs_run": len(history),
        "best_epoch": best_epoch(history, train_cfg["early_stopping"]),
    }


def main(cfg: DictConfig) -> None:
    result = distil(cfg, DATA_DIR, FP32_DIR, STUDENT_DIR, LIVE["distil"])
    name = next(n for n in SCORE_NAME.values() if f"student_{n}" in result)
    headline = [f"student_{name}", "drop_points", "parameter_ratio"]  # the rest: the log
    write_json(METRICS["distil"], {k: result[k] for k in headline})
    log.info(
        "student %s %.4f (%.2f points below the teacher) with %.3fx its parameters"
        " (%d of %d; %d of %d bytes) -> %s",
        name,
        result[f"student_{name}"],
        result["drop_points"],
        result["parameter_ratio"],
        result["student_parameters"],
        result["teacher_parameters"],
        result["student_bytes"],
        result["teacher_bytes"],
        STUDENT_DIR,
    )


if __name__ == "__main__":
    run(main)
