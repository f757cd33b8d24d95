"""The baseline for bench/serve.py: the model behind a plain FastAPI app, one call per request.

What a user would write instead of the BentoML service: the same model file, the same request
validation and the same response content, served by one uvicorn worker with default settings
(POST /predict_proba: a `def` route, as the service's; POST /predict_proba_async: the same
as an `async def` route):

    BENCH_MODEL_DIR=<dir with model.pt2 and schema.json> uvicorn bench.fastapi_app:app

The baseline for bench/images.py: POST /predict_images (`def`) and /predict_images_async take
multipart uploads, one image per part named `file`, each decoded and checked as the service
decodes it (`runtime.images.decode` by the schema's size and mode) and normalised as in
training, then answered by the FP32 ConvNet in torch eager (`BENCH_FP32_DIR`: model.pt and
model.json): what a user who trained it writes. (Not model.pt2: eager torch runs the INT8
program's quantize/dequantize ops one by one, 2.7x slower than FP32 at batch 1 here, 5.4 vs
2.0 ms for a 64x64 RGB cnn_small: a baseline nobody would pick.)
"""

import json
import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, UploadFile
from pydantic import BaseModel, ConfigDict, Field, create_model

from fullstack_ml.runtime.images import BadImage, decode
from fullstack_ml.runtime.preprocess import image_spec
from fullstack_ml.runtime.program import load_program

MODEL_DIR = Path(os.environ["BENCH_MODEL_DIR"])
SCHEMA: dict[str, Any] = json.loads((MODEL_DIR / "schema.json").read_text())
FEATURES: list[str] = [f["name"] for f in SCHEMA["features"]]
CLASSES: list[Any] = SCHEMA["classes"]
MODEL = load_program(MODEL_DIR / "model.pt2")
FP32_DIR = os.environ.get("BENCH_FP32_DIR")  # the image routes' model
IMAGES = [f for f in SCHEMA["features"] if f.get("kind") == "image"]
IMAGE: dict[str, Any] | None = IMAGES[0] if IMAGES else None

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Record = create_model(
    "Record", __config__=ConfigDict(extra="forbid"), **{name: (Number, ...) for name in FEATURES}
)


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    records: Annotated[list[Record], Field(min_length=1)]  # type: ignore[valid-type]


class Prediction(BaseModel):
    label: int | str
    probabilities: dict[str, float]  # class label -> probability


app = FastAPI()


def network() -> torch.nn.Module | None:
    """The FP32 network of `BENCH_FP32_DIR` in eval mode; None where it is not set."""
    if not FP32_DIR:
        return None
    from fullstack_ml.model import load_fp32

    return load_fp32(Path(FP32_DIR))[0]


NETWORK = network()


def run_model(records: list[Any]) -> list[Prediction]:
    x = torch.tensor([[getattr(r, f) for f in FEATURES] for r in records])
    with torch.inference_mode():
        return answers(MODEL(x))


def run_images(files: list[bytes]) -> list[Prediction]:
    """Uploaded image files decoded, normalised and answered by the FP32 network."""
    if NETWORK is None or IMAGE is None:
        raise HTTPException(404, "no image model: set BENCH_FP32_DIR to an image model's")
    spec = image_spec(IMAGE)
    try:
        pixels = np.stack([decode(data, spec) for data in files]).astype(np.float32) / 255
    except BadImage as err:
        raise HTTPException(400, f"file: {err}") from None
    pixels -= np.asarray(IMAGE["mean"], dtype=np.float32)
    pixels /= np.asarray(IMAGE["std"], dtype=np.float32)
    x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).reshape(len(files), -1))  # C x H x W
    with torch.inference_mode():
        return answers(NETWORK(x))


def answers(logits: torch.Tensor) -> list[Prediction]:
    probs = torch.softmax(logits, dim=1)
    return [
        Prediction(
            label=CLASSES[best],
            probabilities={str(c): v for c, v in zip(CLASSES, p, strict=True)},
        )
        for best, p in zip(probs.argmax(1).tolist(), probs.tolist(), strict=True)
    ]


# The two ways users write it: a blocking call in a `def` route runs in the thread pool;
# in an `async def` route it runs on the event loop. Which is faster depends on the model.
@app.post("/predict_proba")
def predict_proba(request: PredictRequest) -> list[Prediction]:
    return run_model(request.records)


@app.post("/predict_proba_async")
async def predict_proba_async(request: PredictRequest) -> list[Prediction]:
    return run_model(request.records)


@app.post("/predict_images")
def predict_images(file: list[UploadFile]) -> list[Prediction]:
    return run_images([part.file.read() for part in file])


@app.post("/predict_images_async")
async def predict_images_async(file: list[UploadFile]) -> list[Prediction]:
    return run_images([await part.read() for part in file])
