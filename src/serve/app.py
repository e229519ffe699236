"""The HTTP application: Open Inference Protocol v2 endpoints, the images-in endpoint, /metrics, and the rules every
request passes (bearer token, body limit, request id, in-flight count, draining).

``create_app(models, settings)`` is the interface the server (and Ray Serve, Docker) build on: ``models`` are loaded
and warmed-up :class:`~medq.serve.models.ServedModel` s, ``settings`` the config's ``serve:`` section. The app gives
each model its own batcher (queue + worker thread) and stops them at its lifespan's shutdown, after the last request;
the engines stay open (their owner closes them).

Answers: 200 with the result; 400 ``{"error": one line}`` for a malformed body, an undecodable image (naming the
multipart part), a form field where a file part belongs, a wrong tensor name, shape or datatype, values the run's
preprocessing never gives; 401 without the token; 404 for an unknown model or version; 413 for a body above
``serve.max_body_mb`` (after undoing a gzip/deflate Content-Encoding); 415 for another Content-Encoding; 503 +
Retry-After when the model's queue is full, the server is at its limit of requests and connections or draining; 504
when a request waited past its deadline.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from medq.data.decode import UnreadableImage
from medq.hwinfo import physical_cores
from medq.serve.batching import Batcher, DeadlineExceeded, QueueFull, Stopped
from medq.serve.metrics import CONTENT_TYPE, Metrics
from medq.serve.models import ServedModel
from medq.serve.protocol import (HEADER_LENGTH, BadRequest, UnsupportedEncoding, decompress, encode_infer,
                                 parse_infer)

log = logging.getLogger("medq")
SERVER_NAME = "medq"
EXTENSIONS = ["binary_tensor_data"]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
RETRY_AFTER_S = "1"


class ServeError(Exception):
    """An answer other than 200: ``status`` and one line."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class ServerState:
    """What the signal handler and the endpoints share: draining, how many requests are being handled, and the cap on
    requests and open connections (``limit``; None: none) beyond which a request gets 503 + Retry-After at once."""

    draining: bool = False
    in_flight: int = 0
    limit: int | None = None
    connections: Callable[[], int] = lambda: 0  # open connections, this one's included (the server's count)

    def idle(self) -> bool:
        return self.in_flight == 0

    def over_limit(self) -> bool:
        """Checked before this request counts: ``limit`` others in flight, or more than ``limit`` connections with
        its own (uvicorn's limit_concurrency did this, answering a plain-text 503 instead of the JSON error)."""
        return self.limit is not None and (self.in_flight >= self.limit or self.connections() > self.limit)


class BodyLimit:
    """Refuse bodies above ``limit`` bytes: from Content-Length before reading, else while the body streams in."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = JSONResponse({"error": self._message(int(length))}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ServeError(413, self._message(seen))
            return message

        await self.app(scope, limited, send)

    def _message(self, size: int) -> str:
        return (f"request body of {size} bytes is above serve.max_body_mb ({self.limit / 2 ** 20:g} MiB); send "
                "smaller images or raise the limit")


class EveryRequest:
    """What every request passes: a request id (the client's X-Request-ID if well-formed, echoed back), the bearer
    token, the in-flight count, the request counter and latency histogram, one log line, and a 500 with one line for a
    bug. A plain ASGI middleware: Starlette's ``@app.middleware("http")`` runs each request through extra tasks and
    memory streams, a cost paid per request on the event loop that also feeds the batcher."""

    def __init__(self, app: Any, *, token: str | None, state: ServerState, metrics: Metrics, models: frozenset[str]):
        self.app, self.token, self.state, self.metrics, self.models = app, token, state, metrics, models

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id  # request.state.request_id in the endpoints
        status: int | None = None  # set when the answer starts

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        started = time.perf_counter()
        path = scope["path"]
        over_limit = not path.startswith("/v2/health/") and self.state.over_limit()  # probes carry no body
        self.state.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            if over_limit:  # the connection closes, so a client holding idle ones gives them back
                await JSONResponse({"error": f"the server is at its limit of {self.state.limit} requests and "
                                    "connections at once; retry after a second"}, status_code=503,
                                   headers={"Retry-After": RETRY_AFTER_S, "Connection": "close"}
                                   )(scope, receive, send_with_id)
            elif self.token is not None and not path.startswith("/v2/health/") and \
                    not _authorized(headers.get("authorization", ""), self.token):
                await JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer …)"},
                                   status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:  # a bug: the traceback to the log under the request id, one line to the client
            log.exception("serve: request %s failed", request_id)
            if status is not None:  # the answer had started: the client sees the connection end
                raise
            await JSONResponse({"error": f"internal error; the server log has the details (request {request_id})"},
                               status_code=500)(scope, receive, send_with_id)
        finally:
            self.state.in_flight -= 1
            self.metrics.in_flight.dec()
        seconds = time.perf_counter() - started
        name = scope.get("path_params", {}).get("name")
        model = name if name in self.models else "-"
        endpoint = _endpoint(path)
        self.metrics.requests.labels(model, endpoint, str(status)).inc()
        if endpoint in ("infer", "predict"):
            self.metrics.latency.labels(model, endpoint).observe(seconds)
        log.info("serve: request %s %s %s → %d in %.1f ms", request_id, scope["method"], path, status, seconds * 1000)


def create_app(models: Sequence[ServedModel], settings: Any, *, token: str | None = None,
               state: ServerState | None = None, metrics: Metrics | None = None) -> FastAPI:
    """The application serving ``models`` under the ``serve:`` settings."""
    by_name = {m.name: m for m in models}
    if len(by_name) != len(models):
        raise ValueError("two served models share a name")
    state = state or ServerState()
    metrics = metrics or Metrics()
    batchers = {m.name: Batcher(m.engine, max_batch_size=settings.max_batch_size,
                                max_queue_delay_s=settings.max_queue_delay_ms / 1000,
                                max_queue_size=settings.max_queue_size, name=m.name, on_batch=metrics.on_batch(m.name))
                for m in models}
    for name, batcher in batchers.items():
        metrics.queued.labels(name).set_function(lambda b=batcher: b.queued_images)
    timeout_s = settings.request_timeout_ms / 1000
    # images decoded at once, in threads beside the batcher's: decoding overlaps inference, and memory stays bounded
    decoders = anyio.CapacityLimiter(settings.decode_threads or physical_cores())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for batcher in batchers.values():  # what is queued still runs
            await anyio.to_thread.run_sync(batcher.close, settings.drain_timeout_s)

    app = FastAPI(title="medq serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.models, app.state.server, app.state.metrics = by_name, state, metrics
    body_limit = int(settings.max_body_mb * 2 ** 20)
    app.add_middleware(BodyLimit, limit=body_limit)
    # outside BodyLimit (added later = outer): a 413 is counted and logged too
    app.add_middleware(EveryRequest, token=token, state=state, metrics=metrics, models=frozenset(by_name))

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> Response:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    def served(name: str, version: str | None = None) -> ServedModel:
        model = by_name.get(name)
        if model is None:
            raise ServeError(404, f"model {name!r} is not served here; served: {', '.join(sorted(by_name))}")
        if version is not None and version != model.version:
            raise ServeError(404, f"model {name!r} has version {model.version}, not {version!r}")
        return model

    async def infer(model: ServedModel, x: np.ndarray, request: Request) -> np.ndarray:
        if state.draining or not model.ready:
            raise ServeError(503, "the server is shutting down" if state.draining else f"{model.name} is not ready",
                             {"Retry-After": RETRY_AFTER_S})
        try:
            future = batchers[model.name].submit(x, timeout_s)
        except (QueueFull, Stopped) as exc:
            raise ServeError(503, str(exc), {"Retry-After": RETRY_AFTER_S}) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except (asyncio.TimeoutError, DeadlineExceeded):
            raise ServeError(504, f"{model.name}: no answer within serve.request_timeout_ms "
                             f"({settings.request_timeout_ms:g} ms)") from None
        except Stopped as exc:
            raise ServeError(503, str(exc), {"Retry-After": RETRY_AFTER_S}) from None
        except Exception as exc:  # noqa: BLE001 - the engine failed: the server's fault, not the request's
            log.error("serve: request %s: %s failed on its batch: %s: %s", request.state.request_id, model.name,
                      type(exc).__name__, exc)
            raise ServeError(500, f"{model.name}: the model failed on this batch ({type(exc).__name__}); the "
                             f"server log has the details (request {request.state.request_id})") from None

    # --- health and metadata ----------------------------------------------------------------------------------

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        from medq import __version__

        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        ok = not state.draining and all(m.ready for m in by_name.values())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict[str, Any]:
        return served(name, version).metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        ok = served(name, version).ready and not state.draining
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None) -> dict[str, Any]:
        """Triton's model-configuration extension, for clients that ask (tritonclient's get_model_config)."""
        model = served(name, version)
        return {"name": model.name, "platform": model.metadata()["platform"],
                "max_batch_size": settings.max_batch_size,
                "input": [{"name": model.input.name, "data_type": "TYPE_FP32", "dims": list(model.input.shape)}],
                "output": [{"name": model.output.name, "data_type": "TYPE_FP32", "dims": list(model.output.shape)}],
                "dynamic_batching": {"max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000)}}

    # --- inference --------------------------------------------------------------------------------------------

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_tensor(name: str, request: Request, version: str | None = None) -> Response:
        model = served(name, version)
        body = await _inflated_body(request, body_limit)
        try:
            parsed = parse_infer(body, request.headers.get(HEADER_LENGTH), model.input, model.output,
                                 settings.max_batch_size)
        except BadRequest as exc:
            raise ServeError(400, f"{name}: {exc}") from None
        y = await infer(model, parsed.x, request)
        content, headers = encode_infer(model.name, model.version, parsed, y)
        return Response(content, headers=headers)

    @app.post("/v1/models/{name}/predict")
    async def predict_images(name: str, request: Request) -> Response:
        model = served(name)
        files, multipart = await _images(request, settings.max_batch_size, body_limit)
        inputs = []
        for number, (file, data) in enumerate(files, 1):
            try:
                inputs.append(await anyio.to_thread.run_sync(model.image_input, data, limiter=decoders))
            except UnreadableImage as exc:  # the whole request is refused: no answer is given for a part alone
                what = "the image" if not multipart else f"file part {number} ({file!r}) of {len(files)}"
                raise ServeError(400, f"{name}: {what} cannot be read: {exc}") from None
        x = np.stack([x for x, _ in inputs])
        y = await infer(model, x, request)
        answers = [model.answer(p, file, warning) for (file, _), (_, warning), p in zip(files, inputs, y)]
        return JSONResponse({"predictions": answers} if multipart else answers[0])

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    return app


async def _inflated_body(request: Request, limit: int) -> bytes:
    """The request's body with its gzip or deflate Content-Encoding undone (415 for another encoding): at most
    ``limit + 1`` bytes are inflated, so a compressed bomb is a 413, never the server's memory."""
    encoding = request.headers.get("content-encoding", "")
    try:
        body = decompress(await request.body(), encoding, limit)
    except UnsupportedEncoding as exc:
        raise ServeError(415, str(exc)) from None
    except BadRequest as exc:
        raise ServeError(400, str(exc)) from None
    if len(body) > limit:
        raise ServeError(413, f"the request body inflates to more than serve.max_body_mb ({limit / 2 ** 20:g} MiB); "
                         "send smaller images or raise the limit")
    return body


async def _images(request: Request, max_images: int, max_bytes: int) -> tuple[list[tuple[str | None, bytes]], bool]:
    """([(the client's file name or None, bytes)] per image, multipart?): a multipart form's file parts, or the
    whole body as one image; either may come gzip- or deflate-compressed (Content-Encoding)."""
    if request.headers.get("content-encoding", "").strip().lower() not in ("", "identity"):
        body = await _inflated_body(request, max_bytes)

        async def inflated() -> dict:  # the form parser reads the inflated body, not the wire's
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(request.scope, inflated)
    content_type = request.headers.get("content-type", "")
    multipart = content_type.startswith("multipart/")
    if multipart:
        if not content_type.startswith("multipart/form-data"):
            raise ServeError(400, f"Content-Type {content_type.split(';')[0]!r}: send images as multipart/form-data "
                             "file parts, or one image as the body")
        try:
            form = await request.form(max_files=max_images, max_fields=max_images, max_part_size=max_bytes)
        except StarletteHTTPException as exc:  # python-multipart's refusal: too many parts, no boundary, ...
            raise ServeError(400, f"the multipart body cannot be read: {exc.detail} (at most serve.max_batch_size "
                             f"{max_images} file parts)") from None
        files = []
        for number, (field, part) in enumerate(form.multi_items(), 1):
            if not hasattr(part, "read"):  # a part without a filename: a form field, which would go unanswered
                raise ServeError(400, f"part {number} ({field!r}) is a form field, not a file; send each image as a "
                                 f"file part with a filename (curl -F {field}=@FILE)")
            files.append((part.filename, await part.read()))
        if not files:
            raise ServeError(400, "the multipart body holds no file parts; send each image as a file part")
    elif content_type.startswith("application/x-www-form-urlencoded"):  # curl -d: line breaks stripped from the file
        raise ServeError(400, "Content-Type application/x-www-form-urlencoded: the file may have been altered on the "
                         "way (curl -d drops its line-break bytes); send it with curl --data-binary @FILE or as a "
                         "multipart file part (curl -F image=@FILE)")
    else:
        files = [(None, await request.body())]
    if len(files) > max_images:
        raise ServeError(400, f"{len(files)} images in one request, above serve.max_batch_size {max_images}")
    empty = [i for i, (_, data) in enumerate(files) if not data]
    if empty:
        raise ServeError(400, "the request body is empty; send a PNG, JPEG or DICOM file as the body"
                         if not multipart else f"file part {empty[0] + 1} is empty")
    return files, multipart


def _authorized(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _endpoint(path: str) -> str:
    """A fixed label per route (never the raw path: clients must not grow the metric's label set)."""
    for suffix in ("infer", "predict", "ready", "config"):
        if path.endswith("/" + suffix):
            return suffix
    if path.startswith("/v2/models/"):
        return "metadata"
    return {"/metrics": "metrics", "/v2": "server", "/v2/health/live": "live", "/v2/health/ready": "ready"}.get(
        path, "other")
