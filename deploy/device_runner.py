"""Score records with the device artifact (`make device`: model.onnx, preprocess.json,
schema.json) and nothing else: Python with numpy and onnxruntime, no torch, no fullstack-ml.

    python -m venv bare && bare/bin/pip install onnxruntime numpy
    bare/bin/python models/device/runner.py models/device < records.jsonl > answers.jsonl

Each input line is one record, a JSON object of feature -> value (null: missing), as the
service's /predict takes; each output line is its answer, as /predict_proba gives
(classification: label and class probabilities) or /predict (regression: value).
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def encode(records: list[dict], pre: dict) -> np.ndarray:
    """The training preprocessing: numbers imputed (median) and standardised, categories
    one-hot over the train vocabulary (slot 0: unknown or missing)."""
    width = len(pre["numeric"]) + sum(len(pre["vocab"][c]) + 1 for c in pre["categorical"])
    x = np.zeros((len(records), width), dtype=np.float32)
    for i, name in enumerate(pre["numeric"]):
        values = np.array([r[name] for r in records], dtype=np.float64)  # None -> nan
        values = np.where(np.isnan(values), pre["median"][i], values)
        x[:, i] = (values - pre["mean"][i]) / pre["std"][i]
    offset = len(pre["numeric"])
    for name in pre["categorical"]:
        slots = {value: k + 1 for k, value in enumerate(pre["vocab"][name])}
        for row, record in enumerate(records):
            x[row, offset + slots.get(record[name], 0)] = 1.0
        offset += len(pre["vocab"][name]) + 1
    return x


def answers(outputs: np.ndarray, pre: dict) -> list[dict]:
    if pre["task"] == "regression":
        return [{"value": float(v * pre["target_std"] + pre["target_mean"])} for v in outputs[:, 0]]
    z = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    names = [str(c) for c in pre["classes"]]
    return [
        {
            "label": pre["classes"][p.argmax()],
            "probabilities": dict(zip(names, p.tolist(), strict=True)),
        }
        for p in probs
    ]


def main(folder: str) -> None:
    pre = json.loads((Path(folder) / "preprocess.json").read_text())
    session = ort.InferenceSession(str(Path(folder) / "model.onnx"))
    records = [json.loads(line) for line in sys.stdin if line.strip()]
    for start in range(0, len(records), 256):
        batch = records[start : start + 256]
        outputs = session.run(None, {pre["input"]: encode(batch, pre)})[0]
        for answer in answers(outputs, pre):
            print(json.dumps(answer))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
