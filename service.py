"""The BentoML service: typed, batched /predict and /predict_proba, /metadata, /drift,
the build report at /card, health, readiness and Prometheus /metrics.

The model, its schema and the training reference profile come from the BentoML model store
(the bento pins the exact tag); limits, batching and monitoring come from the `serve`
section of params.yaml. Bearer-token auth is on when FULLSTACK_ML_API_TOKEN is set. The
work is in fullstack_ml.runtime: `http` (the gate and connection bounds), `openapi`,
`monitor` (metrics, drift), `records` (request types), `batching` and `engine` (the model on
`serve.runtime`: onnxruntime, openvino or Inductor; a worker off Inductor imports no torch).
"""

import gc
import json
import os
import threading
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import anyio
import bentoml
import yaml
from bentoml._internal.utils import circus
from bentoml.exceptions import InvalidArgument
from bentoml.validators import ContentType
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

# The runtime and whylogs are imported where they are used, in the serving workers: `bentoml
# build` and the `bentoml serve` supervisor import this module too, and need neither
# (torch and whylogs took several seconds of every package and serve start).
with bentoml.importing():
    from fullstack_ml.runtime import http, monitor, openapi
    from fullstack_ml.runtime.batching import Batcher
    from fullstack_ml.runtime.engine import choose_runtime
    from fullstack_ml.runtime.meta import read_meta
    from fullstack_ml.runtime.monitor import LOG, DriftMonitor
    from fullstack_ml.runtime.outliers import load_detector
    from fullstack_ml.runtime.preprocess import Preprocessor
    from fullstack_ml.runtime.records import (
        Answers,
        Label,
        LabelProbabilities,
        Value,
        monitored,
        predict_request,
        record_model,
    )
SERVE: dict[str, Any] = yaml.safe_load(Path(__file__).with_name("params.yaml").read_text())["serve"]
if SERVE["max_records"] > SERVE["max_batch_size"]:
    raise ValueError("params.yaml: serve.max_records must not exceed serve.max_batch_size")
SLIM_IMAGE = "python:3.11-slim"  # the base of a bento off torch (the Classifier's image)
TOKEN_ENV = "FULLSTACK_ML_API_TOKEN"  # the bearer token; never in params or the bento
OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})  # no auth, ever
API_PATHS = frozenset({"/predict", "/predict_proba"})  # JSON bodies only (415 otherwise)
# The bento pins its model with the `model_tag` argument; run from source, MODEL_TAG or latest.
MODEL_TAG = (
    getattr(bentoml.use_arguments(), "model_tag", None)
    or os.environ.get("MODEL_TAG")
    or f"{SERVE['model_name']}:latest"
)
STORED = bentoml.models.get(MODEL_TAG)
SCHEMA: dict[str, Any] = json.loads(Path(STORED.path_of("schema.json")).read_text())
META: dict[str, Any] = read_meta(Path(STORED.path_of("model.json")).parent)
# The runtime and execution paths the compress stage measured fastest (absent: eager torch).
SERVING_FILE = Path(STORED.path_of("serving.json"))
SERVING: dict[str, Any] | None = (
    json.loads(SERVING_FILE.read_text()) if SERVING_FILE.exists() else None
)
RUNTIME = choose_runtime(SERVE["runtime"], SERVING)  # serve.runtime; auto: the measured one
PRE = Preprocessor.from_dict(META["preprocessing"])  # fitted on train, saved with the model
DETECTOR = load_detector(Path(STORED.path_of("model.json")).parent)  # outliers.json
FEATURES: list[str] = META["features"]
CLASSIFY = META["task"] == "classification"
# A model of one image feature also takes multipart and raw image bodies (runtime.http.Gate).
IMAGE_FEATURE = FEATURES[0] if list(PRE.images) == FEATURES else None


def metrics() -> monitor.Metrics:
    """The service's Prometheus metrics (created at first use, in the worker)."""
    buckets = tuple(DETECTOR.buckets)
    return monitor.metrics(SERVE["max_records"], SERVE["max_batch_size"], buckets)


def observed(scores: Any, flags: Any) -> None:
    """Outlier scores (fullstack_ml_outlier_score) and outliers (fullstack_ml_outliers)."""
    gauges = metrics()
    for score in scores.tolist():
        gauges.outlier_score.observe(score)
    if n := int(flags.sum()):
        gauges.outliers.inc(n)


def counted(label: str, n: int) -> None:
    """Count predictions of a label (fullstack_ml_predictions, by label)."""
    metrics().predictions.labels(label=label).inc(n)


def failed(reason: str) -> None:
    """Count a rejected request (fullstack_ml_validation_failures, by reason)."""
    metrics().failures.labels(reason=reason).inc()


http.install(
    max_connections=SERVE["max_connections"],
    idle_timeout_s=SERVE["idle_timeout_s"],
    shutdown_grace_s=SERVE["shutdown_grace_s"],
    failed=failed,
)


def respawn_sooner(create: Any, check_delay_s: float) -> Any:
    """`bentoml serve`'s supervisor (circus) looks for dead workers every 10 s, its fixed
    `check_delay`: a killed worker answered again 8.5 s later, on average, here; 1.5 s at 1 s
    (BentoML offers no setting; this wraps the function that builds it)."""
    return lambda watchers, **kw: create(watchers, **{"check_delay": check_delay_s, **kw})


circus.create_standalone_arbiter = respawn_sooner(circus.create_standalone_arbiter, 1.0)
Record = record_model(PRE, FEATURES, SERVE["max_pixels"])
PredictRequest = predict_request(
    Record, SERVE["max_records"], lambda n: metrics().records.observe(n)
)
# Declared, the media type spares BentoML a JSON schema build for every response.
Predictions = Annotated[list[Label if CLASSIFY else Value], ContentType("application/json")]
LabelsProbabilities = Annotated[list[LabelProbabilities], ContentType("application/json")]
# Numeric features and images' statistics: the window is a float matrix (categorical drift:
# not yet monitored).
MONITOR = DriftMonitor(
    monitored(PRE), SERVE["drift"]["window_records"], SERVE["drift"]["min_records"], metrics
)


async def metadata(_: Request) -> JSONResponse:
    # the registry version this bento was fetched as (`make serve VERSION=` or `STAGE=`)
    release = os.environ.get("FULLSTACK_ML_RELEASE") or None
    return JSONResponse(
        {"model_tag": str(STORED.tag), "release": release, "schema": SCHEMA, **STORED.info.metadata}
    )


async def drift(_: Request) -> JSONResponse:
    return JSONResponse(await anyio.to_thread.run_sync(MONITOR.score))


async def card(_: Request) -> Response:
    """The build report the bento was packaged with (`fullstack_ml.card`): an HTML page."""
    path = Path(STORED.path_of("card.html"))
    if not path.is_file():
        msg = "this bento was packaged without a build report"
        body = http.error_body("not_found", ["path"], msg)
        return Response(body, 404, media_type="application/json")
    return HTMLResponse(path.read_bytes())


@cache
def openapi_spec() -> bytes:
    """BentoML's spec of the service, made true (`fullstack_ml.runtime.openapi`)."""
    spec = Classifier.openapi_spec.asdict()
    auth = bool(os.environ.get(TOKEN_ENV))
    images = IMAGE_FEATURE is not None
    return json.dumps(openapi.fixed_spec(spec, API_PATHS, OPEN_PATHS, auth, images)).encode()


# @bentoml.api routes are POST; the GET routes come from a small mounted Starlette app.
@bentoml.asgi_app(
    Starlette(routes=[Route(f"/{f.__name__}", f) for f in (metadata, drift, card)]), path="/"
)
@bentoml.service(
    name=SERVE["service_name"],
    workers=SERVE["workers"],
    traffic={"timeout": SERVE["timeout"]},
    # BentoML records spans for every request even when none is sampled: a quarter of the
    # per-request CPU. Drop this to trace the prediction routes with an exporter.
    tracing={"excluded_urls": ["/predict"]},  # a regex: /predict_proba too
    # Off Inductor, no compiler: BentoML's image for a Debian distro apt-installs
    # build-essential and git (1 GB with torch); an Image whose distro it has no install
    # command for gets none (deploy/container.sh builds it on a Debian base of Python alone).
    image=None if RUNTIME == "inductor" else bentoml.images.Image(SLIM_IMAGE, distro="none"),
)
class Classifier:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        from fullstack_ml.runtime.drift_pool import load_reference
        from fullstack_ml.runtime.engine import load_engine

        # The drift helper starts first, on the other core while this one loads the model:
        # started last, its start-up (1-2 s of CPU) overlapped the first requests.
        MONITOR.reference = self.model_ref.path_of("reference_profile.bin")
        MONITOR.scorer.submit(load_reference, MONITOR.reference)  # start it, load the profile
        if not PRE.images:  # imports what it needs (pandas for categories) now, not at the
            PRE.encode({name: [None] for name in FEATURES})  # first request
        # On Inductor, a path that fails to compile (no C++ compiler) is logged and left out.
        folder = Path(self.model_ref.path_of("model.json")).parent
        engine = load_engine(folder, SERVING, PRE.width, RUNTIME, SERVE["threads"], LOG)
        self.answers = Answers(engine, PRE, META, DETECTOR, MONITOR.add, counted, observed)
        metrics().starts.inc()  # a worker restarting shows as this counter rising
        refresh = threading.Thread(
            target=MONITOR.refresh_forever, args=(SERVE["drift"]["refresh_s"],), daemon=True
        )
        refresh.start()
        most, observe = SERVE["max_batch_size"], metrics().batch.observe
        self.batched_labels = Batcher(self.answers.labels, most, observe)
        self.batched_probabilities = Batcher(self.answers.labels_probabilities, most, observe)
        # BentoML's per-request middleware leaves cyclic garbage that reaches the oldest
        # generation, whose full passes then stall every request for 0.1-0.25 s under load.
        # Freeze what is loaded now; collect the young generation less often.
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)

    # Batched across requests by the service itself (fullstack_ml.runtime.batching says why
    # not by BentoML's adaptive batching).
    @bentoml.api(input_spec=PredictRequest)
    async def predict(self, records: list[Record]) -> Predictions:  # type: ignore[valid-type]
        """The predicted label (or value, for a regression model) of each record."""
        return await self.batched_labels(records)

    @bentoml.api(input_spec=PredictRequest)
    async def predict_proba(self, records: list[Record]) -> LabelsProbabilities:  # type: ignore[valid-type]
        """The predicted label and the probability of every class, for each record."""
        if not CLASSIFY:
            raise InvalidArgument("a regression model has no class probabilities: use /predict")
        return await self.batched_probabilities(records)


Classifier.add_asgi_middleware(
    http.Gate,
    max_body_bytes=SERVE["max_body_bytes"],
    token=os.environ.get(TOKEN_ENV, ""),
    api_paths=API_PATHS,
    open_paths=OPEN_PATHS,
    spec=openapi_spec,
    failed=failed,
    image_feature=IMAGE_FEATURE,
    max_pixels=SERVE["max_pixels"],
)
