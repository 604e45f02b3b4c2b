"""The web front end: an upload page and a JSON API that classify a galaxy image.

`GET /` is the upload form, `POST /upload-file/` the result page (class, confidence bars for every class,
Grad-CAM), `POST /api/predict` the same prediction as JSON, `GET /api/models` and `GET /healthz` what is
served, `/docs` the OpenAPI page. Uploads stay in memory (uploads.py).

Each route is a module-level function on `router`, given what it needs by FastAPI dependencies
(`get_registry`, `get_pages`, `get_inference_slots`, `get_settings`: what `create_app` put on `app.state`,
which `app.dependency_overrides` can replace); `create_app` only assembles the app from `Settings`, which
main.py's flags or the environment (`Settings.from_environment`, for `uvicorn main:app --workers 4`) give.
What a prediction says is prediction.py's: the API's response model and the page's facts derive from it.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import os
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from PIL import Image
from pydantic import BaseModel, create_model
from pydantic import Field as SchemaField
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from galaxy10.errors import Galaxy10Error
from galaxy10.images import ImageError, ImageTooLargeError, open_image
from galaxy10.inference import grad_cam, overlay_heatmap, predict
from galaxy10.prediction import ANSWERS, Prediction
from galaxy10.preprocessing import to_rgb8
from galaxy10.registry import (
    PREFERRED_MODEL,
    TRAIN_HINT,
    ModelRegistry,
    ServedModel,
    ServiceError,
    log,
    model_unavailable,
)
from galaxy10.uploads import MalformedForm, UploadLimitMiddleware, text_field, upload_form, uploaded_file

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES_DIR = ROOT / "templates"
STATIC_DIR = ROOT / "static"
PREVIEW_SIDE = 512  # longest side of the images embedded in the result page
# HTML pages load nothing but our stylesheet and inline data: images; no script runs at all.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


# ---------------------------------------------------------------- what is served, and how


def setting(default: Any, help: str, env: str) -> Any:
    """A Settings field: main.py's flag --field-name and the environment variable `env` both set it."""
    return field(default=default, metadata={"help": help, "env": env})


@dataclass(frozen=True)
class Settings:
    """What the app serves and its limits; checked when made, so a bad value is one line. main.py's flags
    are made from these fields, and so are the environment variables `uvicorn main:app` reads."""

    models_dir: Path = setting(Path("."), "folder with the .pth checkpoints cnn.py wrote",
                               "GALAXY10_MODELS_DIR")
    max_upload_mb: float = setting(10.0, "largest upload accepted, in MB of 2^20 bytes",
                                   "GALAXY10_MAX_UPLOAD_MB")
    default_model: str | None = setting(None, f"name (file stem) of the model to offer first (default: "
                                              f"{PREFERRED_MODEL} if present, else the first by name)",
                                        "GALAXY10_DEFAULT_MODEL")

    def __post_init__(self) -> None:
        object.__setattr__(self, "models_dir", Path(self.models_dir))
        if not self.models_dir.is_dir():
            raise Galaxy10Error(f"models folder {self.models_dir} not found: point --models-dir (or "
                                f"{env_name('models_dir')}) at the folder of your .pth files")
        if not self.max_upload_mb > 0:
            raise Galaxy10Error(f"--max-upload-mb must be positive, got {self.max_upload_mb} (or set "
                                f"{env_name('max_upload_mb')})")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """The settings the environment variables give (each field's `env`), the defaults elsewhere."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            text = environ.get(f.metadata["env"])
            if text:
                values[f.name] = parse_setting(f.name, text)
        return cls(**values)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_upload_text(self) -> str:
        return f"{self.max_upload_mb:g} MB"


SETTINGS = {f.name: f for f in dataclasses.fields(Settings)}


def env_name(name: str) -> str:
    return SETTINGS[name].metadata["env"]


def parse_setting(name: str, text: str) -> Any:
    """A setting's value from text (a flag's or an environment variable's)."""
    if name == "max_upload_mb":
        try:
            return float(text)
        except ValueError:
            raise Galaxy10Error(f"--max-upload-mb must be a number of MB, not {text!r} (or set "
                                f"{env_name(name)})") from None
    return Path(text) if name == "models_dir" else text


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
FormDep = Annotated[FormData, Depends(upload_form)]


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


def the_file(form: FormData) -> UploadFile:
    """The form's `file`, or the 422 that says it is missing."""
    file = uploaded_file(form, "file")
    if file is None:
        raise ServiceError(422, "the form is incomplete (file: Field required)")
    return file


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
    """The API's answer: the prediction's answer fields, every class's probability, the model's name."""
    probabilities = dict(zip(prediction.class_names, prediction.probabilities, strict=True))
    return {**prediction.answers(), "probabilities": probabilities, "model": model.name}


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

# The answer fields as prediction.py declares them, then every class's probability and the model.
PredictionOut = create_model(
    "PredictionOut",
    **{name: (kind, SchemaField(description=how.help)) for name, (kind, how) in ANSWERS.items()},
    probabilities=(dict[str, float], SchemaField(description="every class's calibrated probability")),
    model=(str, SchemaField(description="the name of the model that answered")),
)


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


def upload_body(fields: dict[str, str]) -> dict[str, Any]:
    """The OpenAPI request body of an upload route: multipart, a `file` and these text fields (the form is
    parsed by uploads.upload_form, so FastAPI cannot see it)."""
    properties = {"file": {"type": "string", "format": "binary", "description": "the galaxy image (PNG, "
                                                                                 "JPEG, FITS, ...)"},
                  **{name: {"type": "string", "description": help} for name, help in fields.items()}}
    schema = {"type": "object", "properties": properties, "required": ["file"]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


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
        trained_on=record.describe_training(),
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


async def malformed_form(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MalformedForm)
    return error_response(request, 400, exc.message)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(request, exc.status_code, str(exc.detail))


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{err['loc'][-1]}: {err['msg']}" for err in exc.errors())
    return error_response(request, 422, f"the form is incomplete ({problems})")


# ---------------------------------------------------------------- the routes

# Model work runs in plain `def` routes: FastAPI runs them in its thread pool, off the event loop.
router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index(request: Request, registry: RegistryDep, pages: PagesDep) -> HTMLResponse:
    return pages.render(request, "index.html", models=registry.models(), train_hint=TRAIN_HINT)


@router.post("/upload-file/", response_class=HTMLResponse, include_in_schema=False)
def upload_file(request: Request, registry: RegistryDep, pages: PagesDep, inference_slots: SlotsDep,
                form: FormDep) -> HTMLResponse:
    file = the_file(form)
    model = registry.get(text_field(form, "network"))
    upload = read_upload(file)
    with inference_slots, answered_as_service_errors(model):
        prediction, heatmap = grad_cam(upload.image, model.path)
        context = result_context(upload, prediction, heatmap, model)
    return pages.render(request, "image_result.html", **context)


@router.post("/api/predict", response_model=PredictionOut, responses=_errors(400, 404, 413, 415, 422, 503),
             openapi_extra=upload_body({"model": "a name from /api/models; default: the first"}))
def api_predict(registry: RegistryDep, inference_slots: SlotsDep, form: FormDep) -> dict[str, Any]:
    file = the_file(form)
    served = registry.get(text_field(form, "model"))
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
    """Warm the default model (load it into inference's cache) before the first request."""
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
    max_upload_mb: float = SETTINGS["max_upload_mb"].default,
    default_model: str | None = None,
) -> FastAPI:
    """Build the app: nothing is loaded until it starts (the default model is warmed then)."""
    return app_for(Settings(Path(models_dir), max_upload_mb, default_model))


def app_for(settings: Settings) -> FastAPI:
    """The app serving these settings."""
    app = FastAPI(
        title="Galaxy10 DECaLS classifier",
        description="Classify a galaxy image into one of the ten Galaxy10 DECaLS morphology classes.",
        lifespan=lifespan,
    )
    app.state.settings = settings  # upload_form's spool, among others
    app.state.registry = ModelRegistry(settings.models_dir, settings.default_model)
    app.state.pages = Pages(settings)
    app.state.inference_slots = threading.BoundedSemaphore(os.cpu_count() or 1)
    app.include_router(router)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(MalformedForm, malformed_form)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes, too_large=too_large)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
