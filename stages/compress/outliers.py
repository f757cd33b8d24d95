"""The outlier detector shipped beside the compressed program (`outliers.json`): candidates
fitted on train and measured on val and shifted val (`fullstack_ml.outliers`), on the
encoded records, the shipped program's logits and the FP32 model's penultimate layer."""

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from fullstack_ml.model import predict_logits, preprocessor
from fullstack_ml.outliers import fit_detector, shifted
from fullstack_ml.runtime.outliers import DETECTOR_FILE
from fullstack_ml.runtime.program import load_program
from fullstack_ml.stage import StageError, write_json

log = logging.getLogger("stages.compress")


def penultimate(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The input of the model's last linear layer for each row of `x`."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    got: list[torch.Tensor] = []
    hook = last.register_forward_pre_hook(lambda _, args: got.append(args[0].detach()))
    try:
        model.eval()
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(torch.as_tensor(x[i : i + batch_size]))
    finally:
        hook.remove()
    return torch.cat(got).numpy() if got else np.zeros((0, last.in_features), np.float32)


def fit_outliers(
    program: Path,
    fp32: nn.Module,
    meta: dict[str, Any],
    frames: dict[str, pd.DataFrame],
    cfg: Any,
    out_dir: Path,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit, measure and choose the detector on `frames` (train, val, test) by `cfg` (the
    `outliers` config: target_fpr, candidates, max_fit_rows), write it to
    `out_dir`/outliers.json; returns the report: every candidate's AUROC per shift and cost,
    the choice, its threshold and the rate it flags on test."""
    pre, module = preprocessor(meta), load_program(program)
    target_fpr = cfg.target_fpr

    def views(frame: pd.DataFrame) -> dict[str, np.ndarray]:
        x = pre.encode_frame(frame)
        return {"x": x, "logits": predict_logits(module, x), "features": penultimate(fp32, x)}

    train, val, test = (frames[s] for s in ("train", "val", "test"))
    if len(train) > cfg.max_fit_rows:  # kNN and PyOD's detectors on a sample (seeded)
        train = train.sample(cfg.max_fit_rows, random_state=seed).sort_index()
    shifts = {
        name: views(frame)
        for name, frame in shifted(
            val, train, pre.numeric, pre.categorical, seed, pre.images
        ).items()
    }
    try:
        detector, report = fit_detector(
            views(train), views(val), shifts, meta["task"], target_fpr, seed, cfg.candidates
        )
    except ValueError as err:
        raise StageError(f"outliers: {err}") from None
    write_json(out_dir / DETECTOR_FILE, detector.to_dict())
    if detector.rank > detector.val_rows:
        need = math.ceil(1 / target_fpr) - 1
        log.warning(
            "outliers: %d val rows are too few to set a threshold at outliers.target_fpr=%g"
            " (it needs at least %d): the shipped detector flags nothing; raise target_fpr or"
            " the val split",
            detector.val_rows,
            target_fpr,
            need,
        )
    on_test = views(test)
    flagged = detector.flags(detector.score(on_test["x"], on_test["logits"]))
    return {
        **report,
        "threshold": detector.threshold,
        "target_fpr": target_fpr,
        "val_rows": detector.val_rows,
        "rank": detector.rank,
        "test_outliers": int(flagged.sum()),
        "test_rows": len(flagged),
        "test_rate": float(flagged.mean()) if len(flagged) else 0.0,
        "flags_nothing": detector.rank > detector.val_rows,  # too few val rows for target_fpr
    }
