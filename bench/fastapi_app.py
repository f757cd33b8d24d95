"""The baseline for bench/serve.py: the model behind a plain FastAPI app, one call per request.

What a user would write instead of the BentoML service: the same model file, the same request
validation and the same response content, served by one uvicorn worker with default settings
(POST /predict_proba: a `def` route, as the service's; POST /predict_proba_async: the same
as an `async def` route):

    BENCH_MODEL_DIR=<dir with model.pt2 and schema.json> uvicorn bench.fastapi_app:app
"""

import json
import os
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, create_model

from fullstack_ml.runtime.program import load_program

MODEL_DIR = Path(os.environ["BENCH_MODEL_DIR"])
SCHEMA: dict[str, Any] = json.loads((MODEL_DIR / "schema.json").read_text())
FEATURES: list[str] = [f["name"] for f in SCHEMA["features"]]
CLASSES: list[Any] = SCHEMA["classes"]
MODEL = load_program(MODEL_DIR / "model.pt2")

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


def run_model(records: list[Any]) -> list[Prediction]:
    x = torch.tensor([[getattr(r, f) for f in FEATURES] for r in records])
    with torch.inference_mode():
        probs = torch.softmax(MODEL(x), dim=1)
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
