"""The service's OpenAPI spec made true: BentoML's spec with the error responses the API
routes send, the GET routes it leaves out, and the bearer token where auth is on."""

import copy
from collections.abc import Collection
from typing import Any


def error_schema(description: str) -> dict[str, Any]:
    """A response whose body is a `ClientError` (`fullstack_ml.runtime.http.error_body`)."""
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
    """A GET route answering JSON of `schema`, or 401."""
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


# The bodies an image model's API routes take besides JSON (`runtime.http.Gate`).
IMAGE_BODIES = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "description": "One record per file part, in order (any part names)",
            "additionalProperties": {"type": "string", "format": "binary"},
        }
    },
    **{
        f"image/{kind}": {"schema": {"type": "string", "format": "binary"}}
        for kind in ("png", "jpeg", "webp")
    },
}


def fixed_spec(
    spec: dict[str, Any],
    api_paths: Collection[str],
    open_paths: Collection[str],
    auth: bool,
    images: bool = False,
) -> dict[str, Any]:
    """BentoML's `spec` of the service, made true: the error responses the `api_paths` send
    (BentoML declares `detail` a string, and 404 and 500, which they never answer), their
    body as required, the GET routes of the mounted app, which BentoML leaves out, and the
    bearer token where `auth` is on (on every path but `open_paths`), and with `images` the
    multipart and raw image bodies. `spec` is left as it is."""
    spec = copy.deepcopy(spec)
    spec["components"]["schemas"]["ClientError"] = CLIENT_ERROR
    for path in api_paths:
        post = spec["paths"][path]["post"]
        post["responses"] = {"200": post["responses"][200], **ERRORS}  # keys: int in BentoML's
        post["requestBody"]["required"] = True  # a JSON body, always
        if images:
            post["requestBody"]["content"].update(copy.deepcopy(IMAGE_BODIES))
            post["responses"]["413"] = error_schema(
                "Body larger than serve.max_body_bytes, or an image over serve.max_pixels"
            )
    spec["paths"].update(copy.deepcopy(GET_ROUTES))  # its operations get `security` below
    if auth:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, item in spec["paths"].items():
            for operation in item.values():
                if path not in open_paths:
                    operation["security"] = [{"bearer": []}]
    return spec
