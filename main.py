"""The web front end: an upload page and a JSON API that classify a galaxy image.

    python main.py                                  # http://127.0.0.1:8000, checkpoints from .
    python main.py --models-dir runs --port 8080

`GET /` is the upload form, `POST /upload-file/` the result page (class, confidence bars for all
ten classes, Grad-CAM), `POST /api/predict` the same prediction as JSON, `GET /api/models` and
`GET /healthz` what is served, `/docs` the OpenAPI page. Uploads stay in memory: nothing a client
sends is ever written to disk, not even to a temporary file.

Each route is a module-level function on `router`, given what it needs by FastAPI dependencies
(`get_registry`, `get_pages`, `get_inference_slots`, `get_settings`: what `create_app` put on `app.state`,
which `app.dependency_overrides` can replace); `create_app` only assembles the app. The models on offer are
described by their checkpoints' records (`models.read_record`), read again only when a file changes.
"""
from __future__ import annotations

import argparse
import base64
import errno
import io
import logging
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from PIL import Image
from pydantic import BaseModel
from starlette.datastructures import FormData, Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnn_use_model import Prediction, grad_cam, overlay_heatmap, predict
from galaxy10 import FileCache, Galaxy10Error, run_cli
from images import ImageError, ImageTooLargeError, open_image
from models import ModelRecord, is_resume_file, read_record, to_rgb8

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
# The checkpoint cnn.py writes by default; served first unless --default-model says otherwise.
PREFERRED_MODEL = "based_on_balanced_data_model"
DEFAULT_MAX_UPLOAD_MB = 10.0
PREVIEW_SIDE = 512  # longest side of the images embedded in the result page
TRAIN_HINT = "train one with `python cnn.py` (or `make demo` for a quick CPU-sized one)"
# HTML pages load nothing but our stylesheet and inline data: images; no script runs at all.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

log = logging.getLogger("galaxy10.web")


class ServiceError(Exception):
    """A request that cannot be served, with the status code and message the client gets."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def model_unavailable(name: str) -> ServiceError:
    """A model the page listed whose file has since been deleted or damaged: the server's fault, not the
    client's, so 503 (not 404), whether the file went before the request or during it."""
    return ServiceError(503, f"model {name!r} could not be loaded; reload the page to see the models")


# ---------------------------------------------------------------- upload size limit


class UploadTooLarge(Exception):
    """Raised from `receive` once a request body crosses the limit."""


class UploadLimitMiddleware:
    """Pure ASGI middleware: answer 413 for a request body over `max_bytes`, never reading past it.

    A declared Content-Length over the limit is refused before a byte of the body is read; a body
    without one (chunked) is counted as it streams in and cut off at the first chunk over the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, too_large: Callable[[Scope], Response]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.too_large = too_large

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.too_large(scope)(scope, receive, send)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise UploadTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            # Whatever the app made of the aborted body (FastAPI turns it into a 400) is dropped.
            if received > self.max_bytes:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if received <= self.max_bytes:
                raise
        if received > self.max_bytes and not started:
            await self.too_large(scope)(scope, receive, send)


# ---------------------------------------------------------------- uploads kept in memory


class InMemoryUploadRequest(Request):
    """A request whose uploaded files stay in memory up to the app's upload limit.

    Starlette spools an uploaded file over 1 MB (`MultiPartParser.spool_max_size`) to a temporary
    file, and `Request.form()` has no setting for it (Starlette 1.10). Raising that class attribute
    would change every app in the process, so a multipart body is parsed here by a parser of our own
    whose spool is this app's limit; UploadLimitMiddleware has already refused any body over it.
    It overrides Starlette's private `_get_form`, which `form()` calls; test_main uploads 5 MB and
    fails if a Starlette upgrade makes a temporary file again.
    """

    async def _get_form(self, **limits: Any) -> FormData:
        media_type = self.headers.get("content-type", "").partition(";")[0].strip().lower()
        if self._form is None and media_type == "multipart/form-data":
            async with aclosing(self.stream()) as stream:
                parser = MultiPartParser(self.headers, stream, **limits)
                parser.spool_max_size = self.app.state.settings.max_upload_bytes
                try:
                    self._form = await parser.parse()
                except MultiPartException as err:  # as Starlette answers a malformed form
                    raise StarletteHTTPException(400, err.message) from None
        # The form parsed above, or any other body read by Starlette as usual.
        return await super()._get_form(**limits)


class InMemoryUploadRoute(APIRoute):
    """A route that hands its endpoint an InMemoryUploadRequest (FastAPI's custom route class hook)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def in_memory_handler(request: Request) -> Response:
            return await handler(InMemoryUploadRequest(request.scope, request.receive))

        return in_memory_handler


# ---------------------------------------------------------------- what is served, and how


@dataclass(frozen=True)
class Settings:
    """What `create_app` was asked for (main.py's flags); checked when made, so a bad flag is one line."""

    models_dir: Path
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    default_model: str | None = None

    def __post_init__(self) -> None:
        if not Path(self.models_dir).is_dir():
            raise Galaxy10Error(
                f"models folder {self.models_dir} not found: pass --models-dir with your .pth files")
        if not self.max_upload_mb > 0:
            raise Galaxy10Error(f"--max-upload-mb must be positive, got {self.max_upload_mb}")
        object.__setattr__(self, "models_dir", Path(self.models_dir))

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_upload_text(self) -> str:
        return f"{self.max_upload_mb:g} MB"


@dataclass(frozen=True)
class ServedModel:
    """One checkpoint on offer: known to clients only by its name (the file stem), described by its record."""

    name: str
    path: Path
    record: ModelRecord


class ModelRegistry:
    """The checkpoints of this project (or the original project's) in one folder, by name (the file stem).

    The folder is re-listed on every call so a model trained while the server runs shows up; a file's
    record is read only when the file is new or changed. Files that `read_record` refuses are left out,
    and so are resume files. Clients choose among these names; they never name a path.
    """

    def __init__(self, folder: Path, default_name: str | None = None) -> None:
        self.folder = folder
        self.default_name = default_name
        self._records: FileCache[ModelRecord | None] = FileCache()  # None: not a checkpoint we serve
        self._lock = threading.Lock()
        self._offered: set[str] = set()  # every name a listing has shown, for get() to tell gone from unknown

    def models(self) -> list[ServedModel]:
        """The available models, the default one first, then by name."""
        paths = sorted(p for p in self.folder.glob("*.pth") if p.is_file() and not is_resume_file(p))
        found = [model for path in paths if (model := self._served(path)) is not None]
        with self._lock:
            self._offered.update(model.name for model in found)
        return sorted(found, key=lambda m: (m.name != self.default_name, m.name != PREFERRED_MODEL, m.name))

    def get(self, name: str | None) -> ServedModel:
        """The model called `name` (the default for an empty name), or a 503/404 ServiceError.

        The original page posted the checkpoint's file name, so `NAME.pth` also finds NAME; either
        way it is only looked up among the names on offer, never opened as a path. A name offered
        earlier whose file has since been deleted or damaged gets 503, as when that happens mid-request.
        """
        models = self.models()
        if not models:
            raise ServiceError(503, f"no trained model is available: {TRAIN_HINT}")
        if not name:
            return models[0]
        candidates = (name, name.removesuffix(".pth"))
        by_name = {model.name: model for model in models}
        for candidate in candidates:
            if candidate in by_name:
                return by_name[candidate]
        with self._lock:
            gone = [candidate for candidate in candidates if candidate in self._offered]
        if gone:
            raise model_unavailable(gone[0])
        available = ", ".join(m.name for m in models)
        raise ServiceError(404, f"unknown model {name!r}; available: {available}")

    def _served(self, path: Path) -> ServedModel | None:
        try:
            record = self._records.get(path, lambda: _read_record_or_none(path))
        except OSError:  # deleted since the folder was listed
            return None
        return None if record is None else ServedModel(path.stem, path, record)


def _read_record_or_none(path: Path) -> ModelRecord | None:
    try:
        # Memory-mapped: listing a 913 MB checkpoint reads its record, not its weights or optimizer state.
        return read_record(path)
    except Galaxy10Error as err:
        log.warning("ignoring %s: %s", path.name, err)
        return None


class Pages:
    """The HTML pages: a template rendered with this server's limits and security headers."""

    def __init__(self, settings: Settings) -> None:
        self.templates = Jinja2Templates(
            env=Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=True))
        self.max_upload_text = settings.max_upload_text

    def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("max_upload", self.max_upload_text)
        return self.templates.TemplateResponse(
            request, template, context, status_code=status_code, headers=PAGE_HEADERS
        )


# What the routes are given, from app.state (set by create_app); tests may swap any of them through
# app.dependency_overrides.


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_pages(request: Request) -> Pages:
    return request.app.state.pages


def get_inference_slots(request: Request) -> threading.BoundedSemaphore:
    """One inference at a time per core: more only adds memory (Grad-CAM keeps activations), not speed."""
    return request.app.state.inference_slots


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
PagesDep = Annotated[Pages, Depends(get_pages)]
SlotsDep = Annotated[threading.BoundedSemaphore, Depends(get_inference_slots)]


# ---------------------------------------------------------------- classifying one upload


@dataclass(frozen=True)
class Upload:
    """An uploaded image, decoded in memory, and what the page says about it."""

    image: Image.Image
    filename: str
    format: str
    size: tuple[int, int]
    mode: str


@contextmanager
def answered_as_service_errors(model: ServedModel | None = None) -> Iterator[None]:
    """Turn the inference module's errors into the status code and message the client gets."""
    try:
        yield
    except ImageTooLargeError as err:  # a decompression bomb, or just too many pixels: never decoded
        raise ServiceError(400, str(err)) from None
    except ImageError as err:
        raise ServiceError(415, str(err)) from None
    except Galaxy10Error as err:
        if model is None:
            raise
        # The file vanished or changed since it was listed; the server log keeps the path, not the client.
        log.error("model %s failed to load: %s", model.name, err)
        raise model_unavailable(model.name) from None


def read_upload(file: UploadFile) -> Upload:
    """Decode an upload from memory, or raise the ServiceError that says what is wrong with it."""
    data = file.file.read()
    if not data:
        raise ServiceError(400, "the uploaded file is empty: choose a galaxy image (PNG or JPEG)")
    with answered_as_service_errors():
        image = open_image(data)
    return Upload(
        image=image,
        filename=(file.filename or "")[:120],
        format=image.format or "unknown",
        size=image.size,
        mode=image.mode,
    )


def prediction_json(prediction: Prediction, model: ServedModel) -> dict[str, Any]:
    """The API's answer: the class, its (calibrated) confidence, how far to trust it (entropy, margin, flag),
    every class's probability, the model's name."""
    return {
        "class_id": prediction.class_id,
        "class_name": prediction.class_name,
        "confidence": prediction.confidence,
        "entropy": prediction.entropy,
        "margin": prediction.margin,
        "flag": prediction.flag,
        "probabilities": dict(zip(prediction.class_names, prediction.probabilities, strict=True)),
        "model": model.name,
    }


def data_url(image: Image.Image) -> str:
    """An image as an inline JPEG data: URL, so nothing is written to disk to show it."""
    buffer = io.BytesIO()
    to_rgb8(image).save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def result_context(
    upload: Upload, prediction: Prediction, heatmap: np.ndarray, model: ServedModel
) -> dict[str, Any]:
    """What image_result.html shows: the upload, the Grad-CAM overlay and the sorted confidences."""
    preview = to_rgb8(upload.image).copy()  # to_rgb8 may hand back the upload itself
    preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    bars = sorted(
        zip(prediction.class_names, prediction.probabilities, strict=True), key=lambda bar: -bar[1]
    )
    return {
        "upload": upload,
        "prediction": prediction,
        "model": model,
        "bars": bars,
        "preview_url": data_url(preview),
        "cam_url": data_url(overlay_heatmap(preview, heatmap, model.record.crop)),
        "preview_size": preview.size,
    }


# ---------------------------------------------------------------- API schemas (for /docs)


class PredictionOut(BaseModel):
    class_id: int
    class_name: str
    confidence: float
    entropy: float
    margin: float
    flag: str
    probabilities: dict[str, float]
    model: str


class ModelOut(BaseModel):
    name: str
    architecture: str
    image_size: int
    crop: float
    num_classes: int
    class_names: list[str]
    val_acc: float | None
    epoch: int | None
    trained_on: str
    default: bool


class ModelsOut(BaseModel):
    default: str | None
    models: list[ModelOut]


class HealthOut(BaseModel):
    status: str
    models: int


class ErrorOut(BaseModel):
    detail: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorOut} for code in codes}


def describe_model(model: ServedModel, default: bool) -> ModelOut:
    """What /api/models says of one model: its name and its record."""
    record = model.record
    return ModelOut(
        name=model.name,
        architecture=record.title,
        image_size=record.image_size,
        crop=record.crop,
        num_classes=record.num_classes,
        class_names=list(record.class_names),
        val_acc=record.metrics.val_acc,  # a fraction, at the epoch the checkpoint kept
        epoch=record.metrics.epoch,
        trained_on=record.trained_on.describe(),
        default=default,
    )


# ---------------------------------------------------------------- errors, as a page or as JSON


def error_response(request: Request, status_code: int, detail: str) -> Response:
    if request.url.path.startswith("/api/") or request.url.path == "/healthz":
        return JSONResponse({"detail": detail}, status_code=status_code)
    return get_pages(request).render(request, "error.html", status_code, code=status_code, detail=detail)


def too_large(scope: Scope) -> Response:
    """UploadLimitMiddleware's answer (Starlette has put the app in the scope before any middleware)."""
    request = Request(scope)
    limit = get_settings(request).max_upload_text
    detail = f"the upload is larger than the {limit} limit: choose a smaller image"
    return error_response(request, 413, detail)


async def service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return error_response(request, exc.status_code, exc.detail)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(request, exc.status_code, str(exc.detail))


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{err['loc'][-1]}: {err['msg']}" for err in exc.errors())
    return error_response(request, 422, f"the form is incomplete ({problems})")


# ---------------------------------------------------------------- the routes

# Every route hands its endpoint an InMemoryUploadRequest. Model work runs in plain `def` routes: FastAPI
# runs them in its thread pool, off the event loop.
router = APIRouter(route_class=InMemoryUploadRoute)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index(request: Request, registry: RegistryDep, pages: PagesDep) -> HTMLResponse:
    return pages.render(request, "index.html", models=registry.models(), train_hint=TRAIN_HINT)


@router.post("/upload-file/", response_class=HTMLResponse, include_in_schema=False)
def upload_file(
    request: Request,
    registry: RegistryDep,
    pages: PagesDep,
    inference_slots: SlotsDep,
    file: Annotated[UploadFile, File()],
    network: Annotated[str | None, Form()] = None,
) -> HTMLResponse:
    model = registry.get(network)
    upload = read_upload(file)
    with inference_slots, answered_as_service_errors(model):
        prediction, heatmap = grad_cam(upload.image, model.path)
        context = result_context(upload, prediction, heatmap, model)
    return pages.render(request, "image_result.html", **context)


@router.post("/api/predict", response_model=PredictionOut, responses=_errors(400, 404, 413, 415, 422, 503))
def api_predict(
    registry: RegistryDep,
    inference_slots: SlotsDep,
    file: Annotated[UploadFile, File(description="the galaxy image (PNG, JPEG, ...)")],
    model: Annotated[str | None, Form(description="a name from /api/models; default: the first")] = None,
) -> dict[str, Any]:
    served = registry.get(model)
    upload = read_upload(file)
    with inference_slots, answered_as_service_errors(served):
        prediction = predict(upload.image, served.path)
    return prediction_json(prediction, served)


@router.get("/api/models", response_model=ModelsOut)
def api_models(registry: RegistryDep) -> ModelsOut:
    models = registry.models()
    default = models[0].name if models else None
    return ModelsOut(default=default, models=[describe_model(m, m.name == default) for m in models])


@router.get("/healthz", response_model=HealthOut)
def healthz(registry: RegistryDep) -> dict[str, Any]:
    return {"status": "ok", "models": len(registry.models())}


# ---------------------------------------------------------------- the application


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Warm the default model (load it into cnn_use_model's cache) before the first request."""
    registry: ModelRegistry = app.state.registry
    models = await run_in_threadpool(registry.models)
    if models:
        default = models[0]
        blank = Image.new("RGB", (default.record.image_size, default.record.image_size))
        await run_in_threadpool(predict, blank, default.path)
        log.info("serving %d model(s); default %s", len(models), default.name)
    else:
        log.warning("no trained model in %s: %s", registry.folder, TRAIN_HINT)
    yield


def create_app(
    models_dir: str | os.PathLike[str] = ".",
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    default_model: str | None = None,
) -> FastAPI:
    """Build the app: nothing is loaded until it starts (the default model is warmed then)."""
    settings = Settings(Path(models_dir), max_upload_mb, default_model)
    app = FastAPI(
        title="Galaxy10 DECaLS classifier",
        description="Classify a galaxy image into one of the ten Galaxy10 DECaLS morphology classes.",
        lifespan=lifespan,
    )
    app.state.settings = settings  # InMemoryUploadRequest's spool, among others
    app.state.registry = ModelRegistry(settings.models_dir, settings.default_model)
    app.state.pages = Pages(settings)
    app.state.inference_slots = threading.BoundedSemaphore(os.cpu_count() or 1)
    app.include_router(router)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes, too_large=too_large)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# ---------------------------------------------------------------- command line


def port_number(text: str) -> int:
    """argparse type for --port: uvicorn would end a port outside 0-65535 in a traceback."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535: choose a free one, e.g. 8080")
    return port


def check_port_free(host: str, port: int) -> None:
    """Fail now, not after minutes of `make demo` training, if HOST:PORT is taken.

    Binds the way uvicorn will, then lets go of the socket at once.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn does: a port left in TIME_WAIT by a server just stopped counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise Galaxy10Error(
                    f"{host}:{port} is already in use: stop what listens there or choose another port "
                    "(--port 8080, or `make demo PORT=8080`)"
                ) from None
            raise Galaxy10Error(
                f"cannot listen on {host}:{port} ({err.strerror or err}): pass another --host or --port"
            ) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the galaxy upload page and JSON API with uvicorn.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument(
        "--models-dir", default=".", help="folder with the .pth checkpoints cnn.py wrote (default: .)"
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help=f"largest upload accepted, in MB (default: {DEFAULT_MAX_UPLOAD_MB:g})",
    )
    parser.add_argument(
        "--default-model",
        default=None,
        help=f"name (file stem) of the model to offer first (default: {PREFERRED_MODEL} if present, "
        "else the first by name)",
    )
    parser.add_argument(
        "--check-port",
        action="store_true",
        help="only check that --host:--port is free, then exit (make demo does this before training)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.check_port:
        check_port_free(args.host, args.port)
        return
    app = create_app(args.models_dir, args.max_upload_mb, args.default_model)
    names = [m.name for m in app.state.registry.models()]
    if args.default_model and args.default_model not in names:
        found = ", ".join(names) or "none"
        raise Galaxy10Error(f"no model {args.default_model!r} in {args.models_dir} (found: {found})")
    print(f"{len(names)} model(s) in {args.models_dir}: {', '.join(names) or TRAIN_HINT}")
    print(f"Serving the galaxy classifier on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    sys.exit(run_cli(main))
