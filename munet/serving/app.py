"""The HTTP routes of ``munet serve``: ``POST /v1/predict``, ``GET /v1/tasks``, ``GET /healthz``, ``GET /metrics``.

Every bad request gets a 4xx answer ``{"error": "..."}`` that names the problem; an unexpected failure while
answering one request is a 500 for that request alone, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from munet.api import MultitaskSystem
from munet.data.images import image_header
from munet.errors import DataError, MunetError
from munet.predict import to_uint8_images
from munet.serving import MAX_READ_S, MAX_WAIT_MS
from munet.serving.batcher import Batcher, QueueFull
from munet.serving.metrics import ServeMetrics

ENDPOINTS = ("/v1/predict", "/v1/tasks", "/healthz", "/metrics")
JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
IMAGE_FIELDS = ("image", "images")  # the multipart fields that carry image files


@dataclass(frozen=True)
class Limits:
    """Bounds on requests and on the work waiting (defaults suit one CPU machine).

    Attributes:
        max_body_bytes: largest request body; larger ones are refused with 413 before they are read.
        max_images: images in one request.
        max_pixels: pixels (height x width) of one image, checked from its header before it is decoded.
        max_request_pixels: pixels of all the images of one request together (decoded, 3 bytes each), so that a
            small body of large compressed images cannot take the server's memory.
        max_queue: requests waiting for a batch; beyond it requests are refused with 503.
        max_batch_images: images in one forward batch (requests keep joining a batch until it holds this many).
        max_wait_ms: how long a batch waits for more requests after its first.
        read_timeout_s: how long a request's headers, and then its body, may take to arrive: a body slower than
            this is answered 408 and slow headers close the connection, so that clients that stall cannot hold the
            server's connections.
    """

    max_body_bytes: int = 16 << 20
    max_images: int = 64
    max_pixels: int = 4096 * 4096
    max_request_pixels: int = 4 * 4096 * 4096
    max_queue: int = 256
    max_batch_images: int = 64
    max_wait_ms: float = 5.0
    read_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.max_wait_ms <= MAX_WAIT_MS:  # inf would hold every request forever; nan is no time
            raise MunetError(f"the batch wait (--max-wait-ms) must be in 0-{MAX_WAIT_MS} ms, got {self.max_wait_ms}")
        if not 0 < self.read_timeout_s <= MAX_READ_S:
            raise MunetError(f"the read timeout (--read-timeout-s) must be in (0, {MAX_READ_S}] s, got "
                             f"{self.read_timeout_s}")
        small = [name for name, value in asdict(self).items()
                 if name not in ("max_wait_ms", "read_timeout_s") and value < 1]
        if small:
            raise MunetError(f"serving limits must be >= 1: {', '.join(f'{n} = {getattr(self, n)}' for n in small)}")


class RequestError(Exception):
    """A bad request: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def create_app(system: MultitaskSystem, tasks: list[str] | None = None, limits: Limits = Limits()) -> FastAPI:
    """The server's application for ``system``.

    Args:
        system: the run's multitask system (``munet.load``).
        tasks: the tasks served (default: all of the run's).
        limits: request and queue bounds.
    """
    served = list(tasks or system.tasks)
    metrics = ServeMetrics()
    batcher = Batcher(system.predict_tasks, metrics, limits.max_wait_ms / 1000, limits.max_batch_images,
                      limits.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="munet", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics  # read by tests and benchmarks
    app.state.limits = limits  # read by the server (its header timeout)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        try:
            _check_length(request, limits.max_body_bytes)
            response = await call_next(request)
        except RequestError as err:
            response = _error(err.status, err.message)
        except Exception as err:  # noqa: BLE001 - one request's failure must not take the server down
            response = _error(500, f"internal error: {type(err).__name__}: {err}")
        metrics.observe(endpoint, response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> Response:
        return _error(err.status, err.message)

    @app.exception_handler(StarletteHTTPException)  # unknown routes and methods: the same {"error": ...} body
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        routes = "POST /v1/predict, GET (or HEAD) /v1/tasks, /healthz, /metrics"
        return _error(err.status_code, f"{err.detail}: {request.method} {request.url.path} (routes: {routes})")

    @app.api_route("/healthz", methods=["GET", "HEAD"])  # HEAD: what health checkers send
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "tasks": len(served)}

    @app.api_route("/metrics", methods=["GET", "HEAD"])  # HEAD: what health checkers send
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.api_route("/v1/tasks", methods=["GET", "HEAD"])  # HEAD: what health checkers send
    async def task_list() -> dict[str, Any]:
        return {"run": str(system.run_dir), "complete": system.complete,
                "tasks": [_describe(system, t) for t in served]}

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict[str, Any]:
        try:
            blobs, tasks = await asyncio.wait_for(_read_request(request, limits), limits.read_timeout_s)
        except TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {limits.read_timeout_s:g} s; send it "
                                    "whole and promptly") from None
        tasks = _resolve_tasks(tasks, served)
        images = await asyncio.to_thread(_decode, blobs, limits)
        try:
            answers = await batcher.submit(images, tasks)
        except QueueFull:
            raise RequestError(503, f"the server is busy ({limits.max_queue} requests waiting); retry shortly") \
                from None
        return {"tasks": tasks,
                "predictions": [{t: asdict(answers[t][i]) for t in tasks} for i in range(len(images))]}

    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _check_length(request: Request, max_bytes: int) -> None:
    """Refuses a body that is too large before reading it; a body must declare its length to be bounded."""
    if request.method != "POST":
        return
    declared = request.headers.get("content-length")
    if declared is None:
        raise RequestError(411, "send the request body with a Content-Length header (chunked bodies are not accepted)")
    if not declared.isdigit():
        raise RequestError(400, f"the Content-Length header {declared!r} is not a number of bytes")
    if int(declared) > max_bytes:
        raise RequestError(413, f"the request body ({declared} bytes) exceeds the limit of {max_bytes} bytes; send "
                                "fewer or smaller images per request")


async def _read_request(request: Request, limits: Limits) -> tuple[list[bytes], list[str]]:
    """The encoded images and the requested task names (``["all"]`` when none) of a multipart or JSON request."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == MULTIPART_TYPE:
        blobs, tasks = await _read_multipart(request, limits.max_images)
    elif content_type == JSON_TYPE:
        blobs, tasks = _read_json(await request.body())
    else:
        raise RequestError(415, f"unsupported content type {content_type or 'none'!r}: send {MULTIPART_TYPE} (image "
                                f"files, task fields) or {JSON_TYPE} ({{\"images\": [base64, ...], \"tasks\": [...]}})")
    if not blobs:
        raise RequestError(400, "the request holds no images: send image files (multipart field `image`) or "
                                "base64 strings (JSON key `images`)")
    if len(blobs) > limits.max_images:
        raise RequestError(413, f"{len(blobs)} images in one request; the limit is {limits.max_images}")
    return blobs, tasks or ["all"]


async def _read_multipart(request: Request, max_images: int) -> tuple[list[bytes], list[str]]:
    boundary = re.search(r'boundary="?([^";]+)', request.headers.get("content-type", ""))
    # the parser drops a last part that its closing boundary never ends: an upload cut short read as "no images"
    if boundary and b"--" + boundary.group(1).encode() + b"--" not in await request.body():
        raise RequestError(400, "malformed multipart body: its closing boundary is missing (the upload was cut short)")
    try:
        form = await request.form(max_files=max_images + 1)
    except Exception as err:  # noqa: BLE001 - starlette raises several types for malformed bodies
        if "too many files" in str(err).lower():  # starlette's bound on the parts it spools, past ours
            raise RequestError(413, f"more than {max_images + 1} files in one request; the limit is {max_images} "
                                    "images") from err
        raise RequestError(400, f"malformed multipart body: {err}") from err
    blobs, tasks = [], []
    for key, value in form.multi_items():
        if isinstance(value, UploadFile) and key in IMAGE_FIELDS:
            blobs.append(await value.read())
        elif isinstance(value, UploadFile):
            raise RequestError(400, f"form field {key!r} holds a file; send images in the field `image` (e.g. curl "
                                    "-F image=@photo.png) and task names as text (-F task=NAME)")
        elif key in ("task", "tasks"):
            tasks.append(value.strip())  # split at commas later, unless the whole value names a task
        elif key in IMAGE_FIELDS:
            raise RequestError(400, f"form field {key!r} holds text; send it as a file (a part with a filename, e.g. "
                                    "curl -F image=@photo.png)")
        else:
            raise RequestError(400, f"unknown form field {key!r}: send image files and `task` fields")
    return blobs, tasks


def _read_json(body: bytes) -> tuple[list[bytes], list[str]]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, an integer too long, nested too deep
        raise RequestError(400, f"the body is not valid JSON: {type(err).__name__}: {err}") from None
    if not isinstance(doc, dict):
        raise RequestError(400, 'the JSON body must be an object: {"images": [base64, ...], "tasks": [...]}')
    images, tasks = doc.get("images", []), doc.get("tasks", doc.get("task", []))
    images = [images] if isinstance(images, str) else images
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise RequestError(400, '"images" must be a list of base64 strings (encoded image files)')
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise RequestError(400, '"tasks" must be a list of task names, or "all"')
    blobs = []
    for number, text in enumerate(images):
        try:  # a data URL's header ("data:image/png;base64,") is optional
            blobs.append(base64.b64decode(text.split(",", 1)[-1], validate=True))
        except (binascii.Error, ValueError) as err:
            raise RequestError(400, f"image number {number} is not valid base64: {err}") from err
    return blobs, tasks


def _resolve_tasks(requested: list[str], served: list[str]) -> list[str]:
    """The served tasks a request names: each value is a task (a ``split:`` task's name holds commas), ``all``, or a
    comma-separated list of them."""
    names = [name.strip() for value in requested
             for name in ([value] if value in served or value == "all" else value.split(",")) if name.strip()]
    if requested and not names:  # an empty field, or only commas: once answered with no task at all
        raise RequestError(400, f"the task field {', '.join(map(repr, requested))} names no task; give task names, a "
                                "comma-separated list or `all`, or leave it out for every task")
    unknown = [t for t in names if t not in served and t != "all"]
    if unknown:
        raise RequestError(400, f"unknown task(s) {', '.join(map(repr, unknown))}; this server answers: "
                                f"{', '.join(served)} (or `all`)")
    return served if "all" in names else list(dict.fromkeys(names))


def _decode(blobs: list[bytes], limits: Limits) -> list[torch.Tensor]:
    """uint8 images, each checked for size from its header before any is decoded."""
    total = 0
    for number, blob in enumerate(blobs):
        try:
            (height, width), _ = image_header(io.BytesIO(blob), f"number {number}")
        except DataError as err:
            if isinstance(err.__cause__, Image.DecompressionBombError):  # its header declares too many pixels
                raise RequestError(413, f"image number {number} is too large to decode: {err.__cause__} (PIL's "
                                        "limit, past this server's own): resize it first") from None
            raise RequestError(400, str(err)) from None
        if height * width > limits.max_pixels:
            raise RequestError(413, f"image number {number} has {width}x{height} pixels; the limit is "
                                    f"{limits.max_pixels} pixels: resize it first")
        total += height * width
    if total > limits.max_request_pixels:
        raise RequestError(413, f"the request's {len(blobs)} images hold {total} pixels together; the limit is "
                                f"{limits.max_request_pixels} per request: send fewer or smaller images per request")
    try:
        return to_uint8_images(blobs)
    except DataError as err:
        raise RequestError(400, str(err)) from None


def _describe(system: MultitaskSystem, task: str) -> dict[str, Any]:
    path = system.path(task)
    return {"name": task, "classes": system.class_names[task], "image_size": int(path.hparams["ds_image_size"]),
            "parameters": path.num_params(), "path_id": path.id}
