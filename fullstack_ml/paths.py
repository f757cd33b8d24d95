"""Every artifact path of the pipeline, declared once (relative to the repo root, where DVC
runs the stages); `dvc.yaml` names the same paths (tests/test_layout.py checks it)."""

from pathlib import Path

PARAMS = Path("params.yaml")
RAW_DIR = Path("data/raw")
DATA_DIR = Path("data/curated")
SCHEMA = DATA_DIR / "schema.json"
SPLITS = ("train", "val", "test")
PROFILE_DIR = Path("reports/profile")
REFERENCE_PROFILE = PROFILE_DIR / "train.bin"
FP32_DIR = Path("models/fp32")
STUDENT_DIR = Path("models/student")
COMPRESSED_DIR = Path("models/compressed")
COMPRESS_REPORT = Path("reports/compress.html")
DIST_DIR = Path("dist")
DEVICE_DIR = Path("models/device")  # model.onnx + preprocess.json + schema.json + runner.py
DEVICE_RUNNER = Path("deploy/device_runner.py")  # copied in: numpy, onnxruntime (Pillow: images)
# DVCLive's folders (metrics.json, plots/metrics/*.tsv), written by the training loop
LIVE = {"train": Path("dvclive/train"), "distil": Path("dvclive/distil")}
TRAIN_CURVES = LIVE["train"] / "plots/metrics"
DISTIL_CURVES = LIVE["distil"] / "plots/metrics"
DISTIL_LIVE_SUMMARY = LIVE["distil"] / "metrics.json"  # an output; metrics/distil.json heads it
CONFUSION = Path("plots/confusion.csv")
COMPRESS_PLOT = Path("plots/compress.csv")
COMPRESS_DETAILS = Path("reports/compress.json")  # every candidate, the serving plan (measured)
COMPRESS_ANSWERS = Path("reports/compress_answers.npz")  # model.pt2 on the test split, eager
PER_CLASS = Path("plots/per_class.csv")  # precision, recall, F1 and support per class
VALIDATE_DETAILS = Path("reports/validate.json")  # the release gate's every figure, bento tag
PREDICTIONS_DIR = Path("data/predictions")  # the predict stage's default output and rejects
PREDICT_REPORT = Path("reports/predict.html")  # drift of the scored rows, rejects by reason
BUILD_REPORT = Path("reports/build.html")  # the build report; the bento serves it at /card
METRICS = {
    stage: Path(f"metrics/{stage}.json")
    for stage in ("profile", "eval", "distil", "compress", "validate", "predict")
} | {"train": LIVE["train"] / "metrics.json"}


def split_file(name: str, data_dir: Path = DATA_DIR) -> Path:
    """A curated split: `<name>.parquet`, a file (pandas engine) or a folder of parts (ray)."""
    return Path(data_dir) / f"{name}.parquet"
