"""The BentoML service: typed, batched /predict and /predict_proba, /metadata, /drift,
the build report at /card, health, readiness and Prometheus /metrics.

The model, its schema and the training reference profile come from the BentoML model store
(the bento pins the exact tag); limits, batching and monitoring come from the `serve`
section of params.yaml. Bearer-token auth is on when FULLSTACK_ML_API_TOKEN is set.
"""

import asyncio
import gc
import hmac
import json
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import cache, cached_property
from operator import attrgetter
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import bentoml
import uvicorn.config
import yaml
from bentoml.exceptions import InvalidArgument
from bentoml.validators import ContentType
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, create_model
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

# torch and whylogs are imported where they are used, in the serving workers: `bentoml
# build` and the `bentoml serve` supervisor import this module too, and need neither
# (each took several seconds of every package and serve start).
with bentoml.importing():
    import numpy as np

    from fullstack_ml.runtime.batching import Batcher
    from fullstack_ml.runtime.meta import read_meta
    from fullstack_ml.runtime.preprocess import Preprocessor
if TYPE_CHECKING:
    import torch

SERVE: dict[str, Any] = yaml.safe_load(Path(__file__).with_name("params.yaml").read_text())["serve"]
if SERVE["max_records"] > SERVE["max_batch_size"]:
    raise ValueError("params.yaml: serve.max_records must not exceed serve.max_batch_size")
LOG = logging.getLogger("bentoml.fullstack_ml")  # BentoML sets up its loggers in workers


class OneLineClientErrors(logging.Filter):
    """BentoML logs every 400 as a traceback that quotes the request's values (pydantic's
    `input_value`): 10 MB of log in 20 s of bad requests, and clients' data in the log.
    Such a record becomes one INFO line: the route and each error's field and type."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError):
            errors = error.errors(include_input=False, include_context=False, include_url=False)
            named = [f"{'.'.join(map(str, e['loc'])) or 'body'} {e['type']}" for e in errors]
            more = f" and {len(named) - 5} more" if len(named) > 5 else ""
            record.msg = "400 on %s: %s%s"
            record.args = (record.args[0], "; ".join(named[:5]), more)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(OneLineClientErrors())
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
# The execution path per batch size that the compress stage measured fastest (absent: eager).
SERVING_FILE = Path(STORED.path_of("serving.json"))
SERVING: dict[str, Any] | None = (
    json.loads(SERVING_FILE.read_text()) if SERVING_FILE.exists() else None
)
PRE = Preprocessor.from_dict(META["preprocessing"])  # fitted on train, saved with the model
FEATURES: list[str] = META["features"]
CLASSES: list[Any] = META["classes"]
CLASSIFY = META["task"] == "classification"


@cache
def metrics() -> SimpleNamespace:
    """The project's Prometheus metrics, created in the worker (after BentoML has set up
    prometheus_client's multiprocess directory)."""
    from prometheus_client import Counter, Gauge, Histogram

    def up_to(most: int) -> list[int]:
        return [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if b < most] + [most]

    return SimpleNamespace(
        predictions=Counter("fullstack_ml_predictions", "Predictions per class", ["label"]),
        records=Histogram(
            "fullstack_ml_records_per_request",
            "Records per accepted prediction request",
            buckets=up_to(SERVE["max_records"]),
        ),
        batch=Histogram(
            "fullstack_ml_batch_records",
            "Records per model call (requests batched together)",
            buckets=up_to(SERVE["max_batch_size"]),
        ),
        failures=Counter(
            "fullstack_ml_validation_failures", "Rejected requests by reason", ["reason"]
        ),
        pvalue=Gauge(
            "fullstack_ml_drift_pvalue",
            "Drift p-value of the serving window against train",
            ["feature"],
            multiprocess_mode="mostrecent",
        ),
        category=Gauge(
            "fullstack_ml_drift_category",
            "Drift category: 0 no drift, 1 possible drift, 2 drift",
            ["feature"],
            multiprocess_mode="mostrecent",
        ),
        window=Gauge(
            "fullstack_ml_drift_window_records",
            "Records in the drift window",
            multiprocess_mode="mostrecent",
        ),
    )


def one_or_many(value: Any) -> Any:
    """A single record (a JSON object) is a list of one."""
    return [value] if isinstance(value, dict) else value


def observe_records(records: list[Any]) -> list[Any]:
    metrics().records.observe(len(records))
    return records


# Numeric features: a JSON number or null (missing: imputed as in training) that the model's
# float32 input can hold (`Preprocessor.limits`); strings, booleans, NaN, infinities and
# numbers out of that range are 400s naming the field. Categorical features: a string or null
# (a value unseen in training counts as unknown). Every feature is required.
def number(low: float, high: float) -> Any:
    return Annotated[float, Field(strict=True, allow_inf_nan=False, ge=low, le=high)]


Category = Annotated[str, Field(strict=True)]
# Each feature is a field named f0, f1, ... with the feature's name as its alias: a record,
# its spec and its errors use the real names, and any column name works, `sepal.length`
# (an attribute path to attrgetter), `_id` (private in pydantic) or `model_config` alike.
FIELDS = {name: f"f{i}" for i, name in enumerate(FEATURES)}
Record = create_model(
    "Record",
    __config__=ConfigDict(extra="forbid"),
    **{
        FIELDS[name]: (number(low, high) | None, Field(alias=name))
        for name, (low, high) in zip(PRE.numeric, PRE.limits(), strict=True)
    },
    **{FIELDS[name]: (Category | None, Field(alias=name)) for name in PRE.categorical},
)
feature_values = attrgetter(*FIELDS.values()) if len(FIELDS) > 1 else lambda r: (r.f0,)


class PredictRequest(BaseModel):
    """`records`: one record, or a list of 1 to `serve.max_records` records."""

    model_config = ConfigDict(extra="forbid")
    records: Annotated[
        list[Record],  # type: ignore[valid-type]
        # The schema says a list (BentoML's clients cannot encode a union); an object passes.
        BeforeValidator(one_or_many),
        Field(
            min_length=1,
            max_length=SERVE["max_records"],
            description="A list of records, or one record (an object): feature -> number",
        ),
        AfterValidator(observe_records),
    ]


class Label(BaseModel):
    label: int | str


class Value(BaseModel):
    value: float  # a regression model's prediction


class LabelProbabilities(Label):
    probabilities: dict[str, float]  # class label -> probability


# Declared, the media type spares BentoML a JSON schema build for every response.
Predictions = Annotated[list[Label if CLASSIFY else Value], ContentType("application/json")]
LabelsProbabilities = Annotated[list[LabelProbabilities], ContentType("application/json")]


class DriftMonitor:
    """The latest `window` records served, profiled with whylogs and scored against the
    training profile with the profile stage's algorithm (KS per feature)."""

    def __init__(self, features: list[str], window: int, min_records: int) -> None:
        self.features, self.min_records = features, min_records
        self.buffer = np.zeros((window, len(features)), dtype=np.float32)
        self.seen = 0
        self.scored_at = -1  # `seen` when last scored
        self.lock = threading.Lock()
        self.reference = ""  # the training profile's file

    def add(self, rows: np.ndarray) -> None:
        window = len(self.buffer)
        with self.lock:
            kept = rows[-window:]
            start = self.seen + len(rows) - len(kept)
            self.buffer[(start + np.arange(len(kept))) % window] = kept
            self.seen += len(rows)

    def score(self) -> dict[str, Any]:
        """Per-feature drift of the window; also sets the drift gauges."""
        with self.lock:
            seen, rows = self.seen, self.buffer[: min(self.seen, len(self.buffer))].copy()
        result: dict[str, Any] = {"records_seen": seen, "window_records": len(rows)}
        metrics().window.set(len(rows))
        if len(rows) < self.min_records:
            return {**result, "status": "insufficient_data", "min_records": self.min_records}
        from fullstack_ml.runtime.drift_pool import CATEGORIES, drifted, window_drift

        scorer = self.scorer
        try:
            scores = scorer.submit(window_drift, rows, self.features, self.reference).result()
        except BrokenProcessPool:  # the helper died (killed, out of memory): start another
            LOG.warning("drift helper process died; starting a new one")
            with self.lock:
                if self.__dict__.get("scorer") is scorer:
                    del self.scorer  # the cached_property makes a new pool on next use
            scores = self.scorer.submit(window_drift, rows, self.features, self.reference)
            scores = scores.result()
        for feature, s in scores.items():
            metrics().pvalue.labels(feature=feature).set(s["pvalue"])
            metrics().category.labels(feature=feature).set(CATEGORIES.index(s["drift_category"]))
        self.scored_at = seen
        return {**result, "status": "ok", "drifted": drifted(scores), "features": scores}

    @cached_property
    def scorer(self) -> ProcessPoolExecutor:
        """A helper process: whylogs holds the GIL for ~0.15 s per score, which in the
        serving process stalls every request in flight (p99 x3 at 64 concurrent)."""
        from fullstack_ml.runtime.drift_pool import helper_pool

        return helper_pool()

    def refresh_forever(self, every_s: float) -> None:
        while True:
            time.sleep(every_s)
            if self.seen != self.scored_at:
                self.score()


# Numeric features only: the window is a float matrix (categorical drift: not yet monitored).
MONITOR = DriftMonitor(PRE.numeric, SERVE["drift"]["window_records"], SERVE["drift"]["min_records"])


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
        body = error_body("not_found", ["path"], "this bento was packaged without a build report")
        return Response(body, 404, media_type="application/json")
    return HTMLResponse(path.read_bytes())


def error_body(kind: str, loc: list[str], msg: str) -> bytes:
    """The shape of BentoML's own 400 bodies: an error line and pydantic-style details."""
    detail = [{"type": kind, "loc": loc, "msg": msg}]
    return json.dumps({"error": msg, "detail": detail}).encode()


def error_schema(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ClientError"}}},
    }


ERRORS = {  # every error the API routes answer, by status: one body shape (error_body's)
    "400": error_schema("A field failed validation: `detail` names each, by `loc` and `type`"),
    "401": error_schema("Bearer token missing or wrong (when FULLSTACK_ML_API_TOKEN is set)"),
    "413": error_schema("Body larger than serve.max_body_bytes"),
    "415": error_schema("Content-Type is not application/json"),
    "503": error_schema("More open connections than serve.max_connections"),
}
CLIENT_ERROR = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string"},
        "detail": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "loc", "msg"],
                "properties": {
                    "type": {"type": "string"},
                    "loc": {
                        "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    },
                    "msg": {"type": "string"},
                },
            },
        },
    },
}


def json_get(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    ok = {"description": description, "content": {"application/json": {"schema": schema}}}
    return {"get": {"tags": ["Service APIs"], "responses": {"200": ok, "401": ERRORS["401"]}}}


GET_ROUTES = {
    "/card": {
        "get": {
            "tags": ["Service APIs"],
            "responses": {
                "200": {
                    "description": "The build report: lineage, data, training, evaluation, "
                    "compression and limits (self-contained HTML)",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                },
                "401": ERRORS["401"],
                "404": error_schema("The bento was packaged without a build report"),
            },
        }
    },
    "/metadata": json_get(
        "The model's tag, its input schema and the build's lineage and metrics",
        {"type": "object", "required": ["model_tag", "schema"]},
    ),
    "/drift": json_get(
        "Drift of the latest records served against the training profile, per feature",
        {
            "type": "object",
            "required": ["records_seen", "window_records", "status"],
            "properties": {
                "records_seen": {"type": "integer"},
                "window_records": {"type": "integer"},
                "status": {"enum": ["ok", "insufficient_data"]},
                "features": {"type": "object"},
            },
        },
    ),
}


@cache
def openapi_spec() -> bytes:
    """BentoML's spec of the service, made true: the error responses the API routes send
    (BentoML declares `detail` a string, and 404 and 500, which they never answer), their
    body as required, the GET routes of the mounted app, which BentoML leaves out, and the
    bearer token where auth is on."""
    spec = Classifier.openapi_spec.asdict()
    spec["components"]["schemas"]["ClientError"] = CLIENT_ERROR
    for path in API_PATHS:
        post = spec["paths"][path]["post"]
        post["responses"] = {"200": post["responses"][200], **ERRORS}  # keys: int in BentoML's
        post["requestBody"]["required"] = True  # a JSON body, always
    spec["paths"].update(GET_ROUTES)
    if os.environ.get(TOKEN_ENV):
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, item in spec["paths"].items():
            for operation in item.values():
                if path not in OPEN_PATHS:
                    operation["security"] = [{"bearer": []}]
    return json.dumps(spec).encode()


class Gate:
    """ASGI middleware in front of every route: bearer-token auth (health, readiness and
    metrics stay open), JSON bodies only on the API routes (415), the request body limit
    (413) and validation failures by reason."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app, self.max_body = app, max_body_bytes
        token = os.environ.get(TOKEN_ENV, "")
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        if self.expected and not hmac.compare_digest(given, self.expected):
            body = error_body("unauthorized", ["header", "authorization"], "bearer token required")
            return await respond(send, 401, body, [(b"www-authenticate", b"Bearer")])
        if scope["path"] == "/docs.json" and scope["method"] == "GET":
            return await respond(send, 200, openapi_spec())
        if scope["path"] in API_PATHS and media_type(headers) != b"application/json":
            # BentoML parses forms and multipart bodies too, and answered 500 to some
            metrics().failures.labels(reason="unsupported_media_type").inc()
            msg = "Content-Type must be application/json"
            body = error_body("unsupported_media_type", ["header", "content-type"], msg)
            return await respond(send, 415, body)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return await self.too_large(send)  # refused before reading a byte of it
        if not length:
            body, too_large = await read_body(receive, self.max_body)
            if too_large:
                return await self.too_large(send)
            receive = replay(body, receive)
        status = 0

        async def counting_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif status == 400 and message["type"] == "http.response.body":
                count_failures(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, counting_send)

    async def too_large(self, send: Any) -> None:
        metrics().failures.labels(reason="body_too_large").inc()
        msg = f"request body larger than {self.max_body} bytes (serve.max_body_bytes)"
        await respond(send, 413, error_body("body_too_large", ["body"], msg))


def media_type(headers: dict[bytes, bytes]) -> bytes:
    """The request's media type, without parameters (`; charset=utf-8`), lower case."""
    return headers.get(b"content-type", b"").split(b";")[0].strip().lower()


def count_failures(body: bytes) -> None:
    """Count a 400 by the pydantic error types in its detail (`json_invalid`, `missing`...)."""
    try:
        detail = json.loads(body).get("detail")
        reasons = {d["type"] for d in detail} if isinstance(detail, list) else {"invalid"}
    except (ValueError, AttributeError, KeyError, TypeError):
        reasons = {"invalid"}
    for reason in reasons:
        metrics().failures.labels(reason=reason).inc()


async def read_body(receive: Any, limit: int) -> tuple[bytes, bool]:
    """The whole request body, or (what was read, True) once it passes `limit`; a body far
    past the limit is not read to its end."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
        if size > limit and (not more or size > 16 * limit):
            return b"", True
    return b"".join(chunks), size > limit


def replay(body: bytes, receive: Any) -> Any:
    """An ASGI receive that gives the body already read, then waits on the connection's own
    `receive` (for the client's disconnect). Reporting a disconnect at once made responses
    that listen for one, the docs page at `/`, send 0 bytes of their body."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


async def respond(send: Any, status: int, body: bytes, headers: list | None = None) -> None:
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class BoundedHTTP(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, which `bentoml serve` runs, with the bounds it lacks: a
    connection with no request in flight (idle, or still sending its headers) is closed
    `serve.idle_timeout_s` after it opened or after its last response (uvicorn times out
    only connections that have had a response: 500 idle sockets stayed open); one past
    `serve.max_connections` gets a 503 and is closed; on shutdown, a request still in
    flight after `serve.shutdown_grace_s` (a stalled body) is cut off rather than awaited
    for the whole request timeout. BentoML does not let a service configure uvicorn."""

    idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > SERVE["max_connections"]:
            metrics().failures.labels(reason="too_many_connections").inc()
            msg = f"more than {SERVE['max_connections']} open connections (serve.max_connections)"
            body = error_body("too_many_connections", ["connection"], msg)
            head = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            transport.write(
                f"{head}content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            )
            transport.write(body)
            transport.close()
            return
        self.close_when_idle()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.close_when_idle()

    def close_when_idle(self) -> None:
        if self.idle_timer:
            self.idle_timer.cancel()
        self.idle_timer = self.loop.call_later(SERVE["idle_timeout_s"], self.close_if_idle)

    def close_if_idle(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle_timer:
            self.idle_timer.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        super().shutdown()
        self.loop.call_later(SERVE["shutdown_grace_s"], self.transport.close)


# `bentoml serve` builds uvicorn's config itself, with the "auto" protocol: h11 here (no
# httptools installed). uvicorn's importer takes a class as it is.
uvicorn.config.HTTP_PROTOCOLS["auto"] = BoundedHTTP  # type: ignore[assignment]


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
)
class Classifier:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        from fullstack_ml.runtime.drift_pool import load_reference

        # The drift helper starts first, on the other core while this one loads and compiles
        # the model: started last, its start-up (1-2 s of CPU) overlapped the first requests.
        MONITOR.reference = self.model_ref.path_of("reference_profile.bin")
        MONITOR.scorer.submit(load_reference, MONITOR.reference)  # start it, load the profile

        import torch

        from fullstack_ml.runtime.program import load_runner

        # Idle OpenMP threads spin between the many small ops of the INT8 graph and take the
        # CPU the event loop needs; one intra-op thread per worker serves more, not less.
        torch.set_num_threads(SERVE["torch_threads"])
        PRE.encode({name: [None] for name in FEATURES})  # imports what it needs (pandas for
        # categories) now, not at the first request
        # The execution path measured fastest per batch size by the compress stage (INT8 compiled
        # by Inductor, or eager); a path that fails to compile (no C++ compiler in the image)
        # is logged and left out.
        self.model = load_runner(
            Path(self.model_ref.path_of("model.pt2")).parent, SERVING, PRE.width, LOG
        )
        refresh = threading.Thread(
            target=MONITOR.refresh_forever, args=(SERVE["drift"]["refresh_s"],), daemon=True
        )
        refresh.start()
        most, observe = SERVE["max_batch_size"], metrics().batch.observe
        self.batched_labels = Batcher(self.labels, most, observe)
        self.batched_probabilities = Batcher(self.labels_probabilities, most, observe)
        # BentoML's per-request middleware leaves cyclic garbage that reaches the oldest
        # generation, whose full passes then stall every request for 0.1-0.25 s under load.
        # Freeze what is loaded now; collect the young generation less often.
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)

    def outputs(self, records: list[Any]) -> "torch.Tensor":
        """The model's outputs on raw records, encoded by the training preprocessing."""
        columns = dict(zip(FEATURES, zip(*map(feature_values, records), strict=True), strict=True))
        import torch

        if PRE.numeric:
            MONITOR.add(np.array([columns[f] for f in PRE.numeric], dtype=np.float32).T)
        with torch.inference_mode():
            return self.model(torch.from_numpy(PRE.encode(columns)))

    def probabilities(self, records: list[Any]) -> "torch.Tensor":
        import torch

        probs = torch.softmax(self.outputs(records), dim=1)
        for index, n in Counter(probs.argmax(1).tolist()).items():
            metrics().predictions.labels(label=str(CLASSES[index])).inc(n)
        return probs

    def labels(self, records: list[Any]) -> list[Label | Value]:
        if not CLASSIFY:
            values = (self.outputs(records)[:, 0] * PRE.target_std + PRE.target_mean).tolist()
            metrics().predictions.labels(label="value").inc(len(values))
            return [Value(value=v) for v in values]
        best = self.probabilities(records).argmax(1).tolist()
        return [Label(label=CLASSES[i]) for i in best]

    def labels_probabilities(self, records: list[Any]) -> list[LabelProbabilities]:
        probs = self.probabilities(records)
        return [
            LabelProbabilities(
                label=CLASSES[best], probabilities=dict(zip(map(str, CLASSES), p, strict=True))
            )
            for best, p in zip(probs.argmax(1).tolist(), probs.tolist(), strict=True)
        ]

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


Classifier.add_asgi_middleware(Gate, max_body_bytes=SERVE["max_body_bytes"])
