"""The service's HTTP edge: the ASGI `Gate` in front of every route (auth, 415, 413,
failures by reason), uvicorn's HTTP/1.1 protocol with connection bounds, and one log line
per client error. Plain ASGI and uvicorn: BentoML wires them in (service.py)."""

import asyncio
import base64
import hmac
import io
import json
import logging
from collections.abc import Callable, Collection
from typing import Any

import uvicorn.config
from uvicorn.protocols.http.h11_impl import H11Protocol

Failed = Callable[[str], None]  # counts a rejected request by its reason


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


def error_body(kind: str, loc: list[str], msg: str) -> bytes:
    """The shape of BentoML's own 400 bodies: an error line and pydantic-style details."""
    detail = [{"type": kind, "loc": loc, "msg": msg}]
    return json.dumps({"error": msg, "detail": detail}).encode()


IMAGE_TYPES = frozenset({b"image/png", b"image/jpeg", b"image/webp"})  # raw request bodies


class Refused(Exception):
    """A request refused at the edge: its status, error type, field and one-line reason."""

    def __init__(self, status: int, kind: str, loc: list[str], msg: str) -> None:
        super().__init__(msg)
        self.status, self.kind, self.loc, self.msg = status, kind, loc, msg


class Gate:
    """ASGI middleware in front of every route: bearer-token auth (`open_paths`: health,
    readiness and metrics, stay open), JSON bodies only on `api_paths` (415), the request
    body limit (413) and validation failures by reason. `spec` answers GET /docs.json.
    A model of one `image_feature` also takes images on `api_paths`: `multipart/form-data`
    (one record per file part, in order) or a raw `image/png | jpeg | webp` body (one
    record), turned here into the JSON request of base64 records the API validates; a part
    whose header gives more than `max_pixels` is a 413 naming it, before any decoding; so is
    a JSON record's (the API's 400 of type `image_too_large` is sent as a 413)."""

    def __init__(
        self,
        app: Any,
        *,
        max_body_bytes: int,
        token: str,
        api_paths: Collection[str],
        open_paths: Collection[str],
        spec: Callable[[], bytes],
        failed: Failed,
        image_feature: str | None = None,
        max_pixels: int = 0,
    ) -> None:
        self.app, self.max_body = app, max_body_bytes
        self.image_feature, self.max_pixels = image_feature, max_pixels
        self.expected = f"Bearer {token}".encode() if token else None
        self.api_paths, self.open_paths = api_paths, open_paths
        self.spec, self.failed = spec, failed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        if self.expected and not hmac.compare_digest(given, self.expected):
            body = error_body("unauthorized", ["header", "authorization"], "bearer token required")
            return await respond(send, 401, body, [(b"www-authenticate", b"Bearer")])
        if scope["path"] == "/docs.json" and scope["method"] == "GET":
            return await respond(send, 200, self.spec())
        kind = media_type(headers)
        images = (
            scope["path"] in self.api_paths
            and self.image_feature is not None
            and (kind == b"multipart/form-data" or kind in IMAGE_TYPES)
        )
        if scope["path"] in self.api_paths and kind != b"application/json" and not images:
            # BentoML parses forms and multipart bodies too, and answered 500 to some
            self.failed("unsupported_media_type")
            msg = "Content-Type must be application/json" + (
                ", multipart/form-data or image/png | image/jpeg | image/webp"
                if self.image_feature
                else ""
            )
            body = error_body("unsupported_media_type", ["header", "content-type"], msg)
            return await respond(send, 415, body)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return await self.too_large(send)  # refused before reading a byte of it
        if not length or images:
            body, too_large = await read_body(receive, self.max_body)
            if too_large:
                return await self.too_large(send)
            if images:
                try:
                    body = await image_request(
                        scope, kind, body, self.image_feature, self.max_pixels
                    )
                except Refused as err:
                    self.failed(err.kind)
                    return await respond(send, err.status, error_body(err.kind, err.loc, err.msg))
                scope = json_scope(scope, len(body))
            receive = replay(body, receive)
        start: dict = {}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] == 400:
                start.update(message)  # sent with the body: an image too large makes it 413
                return
            if start and message["type"] == "http.response.body":
                reasons = count_failures(message.get("body", b""), self.failed)
                await send(start | {"status": 413} if "image_too_large" in reasons else start)
                start.clear()
            await send(message)

        await self.app(scope, receive, counting_send)

    async def too_large(self, send: Any) -> None:
        self.failed("body_too_large")
        msg = f"request body larger than {self.max_body} bytes (serve.max_body_bytes)"
        await respond(send, 413, error_body("body_too_large", ["body"], msg))


async def image_request(
    scope: dict, kind: bytes, body: bytes, feature: str, max_pixels: int
) -> bytes:
    """The JSON request (base64 records of `feature`) of a multipart or raw image body.

    Raises:
        Refused: a malformed form (400), a part that is not a file (400) or of a type that is
            no image (415), a file that is no image (400) or over `max_pixels` (413).
    """
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    if kind != b"multipart/form-data":
        files = [(["body"], body)]
    else:

        async def stream() -> Any:
            yield body

        parser = MultiPartParser(Headers(raw=scope["headers"]), stream())
        try:
            form = await parser.parse()
        except MultiPartException as err:
            raise Refused(400, "multipart_invalid", ["body"], str(err)) from None
        files = []
        for name, value in form.multi_items():
            loc = ["body", name]
            if not isinstance(value, UploadFile):  # a part without a filename: Starlette
                files.append((loc, field_bytes(value)))  # decoded it as text
                continue
            given = (value.content_type or "").split(";")[0].strip().lower()
            if given and not given.startswith("image/") and given != "application/octet-stream":
                msg = f"part {name!r}: {given} is not an image type"
                raise Refused(415, "unsupported_media_type", loc, msg)
            files.append((loc, await value.read()))
        if not files:
            raise Refused(400, "missing", ["body"], "no file part: send one image per part")
    records = []
    for loc, data in files:
        check_pixels(data, loc, max_pixels)
        records.append({feature: base64.b64encode(data).decode()})
    return json.dumps({"records": records}).encode()


def field_bytes(text: str) -> bytes:
    """The bytes of a form field Starlette decoded: as UTF-8 where they were valid UTF-8,
    else as Latin-1 (what an image's bytes are: PNG, JPEG and WebP headers are not UTF-8),
    which maps each byte to one character."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def check_pixels(data: bytes, loc: list[str], max_pixels: int) -> None:
    """A 413 for an image whose header gives more than `max_pixels`, before decoding; a
    400 for one Pillow cannot identify (the rest is checked as the record is validated)."""
    from PIL import Image, UnidentifiedImageError

    from fullstack_ml.runtime.images import FORMATS

    where = f"part {loc[1]!r}" if len(loc) > 1 else "body"
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            width, height = img.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        msg = f"{where}: not an image (none of {', '.join(FORMATS)})"
        raise Refused(400, "image_invalid", loc, msg) from None
    if width * height > max_pixels:
        pixels = f"{width}x{height} is {width * height:,} pixels"
        msg = f"{where}: {pixels}, over serve.max_pixels {max_pixels:,} (from its header)"
        raise Refused(413, "image_too_large", loc, msg)


def json_scope(scope: dict, length: int) -> dict:
    """`scope` with the headers of a JSON body of `length` bytes."""
    kept = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
    head = [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    return {**scope, "headers": kept + head}


def media_type(headers: dict[bytes, bytes]) -> bytes:
    """The request's media type, without parameters (`; charset=utf-8`), lower case."""
    return headers.get(b"content-type", b"").split(b";")[0].strip().lower()


def count_failures(body: bytes, failed: Failed) -> set[str]:
    """Count a 400 by the pydantic error types in its detail (`json_invalid`, `missing`...);
    returns them."""
    try:
        detail = json.loads(body).get("detail")
        reasons = {d["type"] for d in detail} if isinstance(detail, list) else {"invalid"}
    except (ValueError, AttributeError, KeyError, TypeError):
        reasons = {"invalid"}
    for reason in reasons:
        failed(reason)
    return reasons


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
    """A whole JSON response (`body`), with any further `headers`."""
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
    for the whole request timeout. BentoML does not let a service configure uvicorn.
    `bounded_http` sets the bounds (class attributes: uvicorn makes the instances)."""

    max_connections: int
    idle_timeout_s: float
    shutdown_grace_s: float
    failed: Failed
    idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.failed("too_many_connections")
            msg = f"more than {self.max_connections} open connections (serve.max_connections)"
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
        self.idle_timer = self.loop.call_later(self.idle_timeout_s, self.close_if_idle)

    def close_if_idle(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle_timer:
            self.idle_timer.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        super().shutdown()
        self.loop.call_later(self.shutdown_grace_s, self.transport.close)


def bounded_http(
    max_connections: int, idle_timeout_s: float, shutdown_grace_s: float, failed: Failed
) -> type[BoundedHTTP]:
    """`BoundedHTTP` with these bounds (`serve.max_connections`, `serve.idle_timeout_s`,
    `serve.shutdown_grace_s`), counting refused connections with `failed`."""
    bounds = {
        "max_connections": max_connections,
        "idle_timeout_s": idle_timeout_s,
        "shutdown_grace_s": shutdown_grace_s,
        "failed": staticmethod(failed),
    }
    return type("BoundedHTTP", (BoundedHTTP,), bounds)


def install(
    *, max_connections: int, idle_timeout_s: float, shutdown_grace_s: float, failed: Failed
) -> None:
    """Make uvicorn serve with `bounded_http(...)` and BentoML log a client error as one line.
    `bentoml serve` builds uvicorn's config itself, with the "auto" protocol: h11 here (no
    httptools installed). uvicorn's importer takes a class as it is."""
    protocol = bounded_http(max_connections, idle_timeout_s, shutdown_grace_s, failed)
    uvicorn.config.HTTP_PROTOCOLS["auto"] = protocol  # type: ignore[assignment]
    logging.getLogger("bentoml._internal.server.http_app").addFilter(OneLineClientErrors())
