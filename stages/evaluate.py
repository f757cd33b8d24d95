"""evaluate: score the FP32 model on the test split.

Writes `metrics/eval.json` (classification: accuracy, macro F1; regression: RMSE, MAE,
R^2), `plots/per_class.csv` (precision, recall, F1 and support per class; a header alone for
regression) and `plots/confusion.csv` (actual vs predicted per test row, in the split's order:
a DVC confusion plot for classes; of a classifier also the probability it gave the predicted
class, which ranks the build report's most confused test images).
"""

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from scipy.special import softmax
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    mean_absolute_error,
    precision_recall_fscore_support,
    r2_score,
    root_mean_squared_error,
)

from fullstack_ml.curated import load_split
from fullstack_ml.model import decode, encode_split, load_fp32, predict_logits
from fullstack_ml.paths import CONFUSION, FP32_DIR, METRICS, PER_CLASS
from fullstack_ml.stage import StageError, run, write_atomic, write_json

log = logging.getLogger("stages.evaluate")


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list) -> dict:
    """Accuracy, macro F1 and per-class precision/recall/F1/support (class indices in)."""
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro")),
        "per_class": {
            str(c): {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, c in enumerate(classes)
        },
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {
        "rmse": float(root_mean_squared_error(y_true, y_pred)),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "r2": float(r2_score(y_true, y_pred)),
    }


def evaluate(model_dir: Path, test: pd.DataFrame) -> tuple[dict[str, Any], pd.DataFrame]:
    """Metrics of the saved FP32 model on `test`, and the actual/predicted table (a row per
    test row, in its order; of a classifier with the predicted class's probability)."""
    model, meta = load_fp32(model_dir)
    try:
        x, y = encode_split(test, meta)
    except (KeyError, ValueError) as err:
        raise StageError(f"test split does not match the model: {err}") from None
    logits = predict_logits(model, x)
    pred = decode(logits, meta)
    if meta["task"] == "regression":
        return regression_metrics(y, pred), pd.DataFrame({"actual": y, "predicted": pred})
    classes = meta["classes"]
    probability = softmax(logits.astype(np.float64), axis=1)[np.arange(len(pred)), pred]
    confusion = pd.DataFrame(
        {
            "actual": [str(classes[i]) for i in y],
            "predicted": [str(classes[i]) for i in pred],
            # 4 decimals: what the report shows, and stable across hosts' last float bits
            "probability": probability.round(4),
        }
    )
    return classification_metrics(y, pred, classes), confusion


def main(cfg: DictConfig) -> None:
    test = load_split("test")
    log.info("evaluating %s on %d test rows", FP32_DIR, len(test))
    metrics, confusion = evaluate(FP32_DIR, test)
    # the headline figures are metrics (`dvc exp show`); the per-class ones a plot
    per_class = pd.DataFrame.from_dict(metrics.pop("per_class", {}), orient="index")
    per_class = per_class.reindex(columns=["precision", "recall", "f1", "support"])
    write_json(METRICS["eval"], metrics)
    write_atomic(PER_CLASS, per_class.rename_axis("class").to_csv())
    write_atomic(CONFUSION, confusion.to_csv(index=False))
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    log.info("%s -> %s, %s", shown, METRICS["eval"], CONFUSION)


if __name__ == "__main__":
    run(main)
