"""The BentoML service: POST /predict (batched), GET /metadata, health and /metrics.

The model, its preprocessing and its schema come from the BentoML model store (the bento
pins the exact tag); batching and naming come from the `serve` section of params.yaml.
"""

import json
import os
from pathlib import Path
from typing import Annotated, Any

import bentoml
import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

with bentoml.importing():
    import torch

    from stages.export import load_program

SERVE: dict[str, Any] = yaml.safe_load(Path(__file__).with_name("params.yaml").read_text())["serve"]
# The bento pins its model with the `model_tag` argument; run from source, MODEL_TAG or latest.
MODEL_TAG = (
    getattr(bentoml.use_arguments(), "model_tag", None)
    or os.environ.get("MODEL_TAG")
    or f"{SERVE['model_name']}:latest"
)
STORED = bentoml.models.get(MODEL_TAG)
SCHEMA: dict[str, Any] = json.loads(Path(STORED.path_of("schema.json")).read_text())
FEATURES: list[str] = [f["name"] for f in SCHEMA["features"]]
CLASSES: list[Any] = SCHEMA["classes"]

# Any finite JSON number; strings, booleans, NaN and infinities are 400s naming the field.
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


async def metadata(_: Request) -> JSONResponse:
    return JSONResponse({"model_tag": str(STORED.tag), "schema": SCHEMA, **STORED.info.metadata})


# @bentoml.api routes are POST; GET /metadata comes from a small mounted Starlette app.
@bentoml.asgi_app(Starlette(routes=[Route("/metadata", metadata, methods=["GET"])]), path="/")
@bentoml.service(
    name=SERVE["service_name"], workers=SERVE["workers"], traffic={"timeout": SERVE["timeout"]}
)
class Classifier:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.model = load_program(self.model_ref.path_of("model.pt2"))

    @bentoml.api(
        batchable=True,
        max_batch_size=SERVE["max_batch_size"],
        max_latency_ms=SERVE["max_latency_ms"],
        input_spec=PredictRequest,
    )
    def predict(self, records: list[Record]) -> list[Prediction]:  # type: ignore[valid-type]
        """Label and class probabilities for each record (raw feature values)."""
        x = torch.tensor([[getattr(r, f) for f in FEATURES] for r in records])
        with torch.inference_mode():
            probs = torch.softmax(self.model(x), dim=1)
        return [
            Prediction(
                label=CLASSES[best],
                probabilities={str(c): v for c, v in zip(CLASSES, p, strict=True)},
            )
            for best, p in zip(probs.argmax(1).tolist(), probs.tolist(), strict=True)
        ]
