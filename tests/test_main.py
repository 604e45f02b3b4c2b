"""main.py: the upload page and JSON API, every error path, and that uploads never touch the disk."""
from __future__ import annotations

import asyncio
import base64
import csv
import dataclasses
import hashlib
import io
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from starlette.responses import PlainTextResponse

import cnn_use_model as cum
import main
from cnn_use_model import grad_cam, predict
from galaxy10 import models, networks, preprocessing, registry, trust, web
from galaxy10.dataset import CLASS_NAMES
from galaxy10.errors import run_cli
from galaxy10.models import is_resume_file
from galaxy10.prediction import ANSWERS
from galaxy10.uploads import UploadLimitMiddleware
from galaxy10.web import read_upload
from main import create_app

from helpers import (
    biased_checkpoint,
    bomb_png,
    listening_socket,
    one_thread_env,
    png_bytes,
    save_original_checkpoint,
    truncated,
)

pytestmark = pytest.mark.usefixtures("cpu_inference")  # the references are CPU float32

ROOT = Path(__file__).resolve().parents[1]
BALANCED = "based_on_balanced_data_model"
PLAIN = "based_on_data_model"
# Output biases that give the tiny random models distinct, readable answers.
SPREAD_BIAS = (0.2, 0.9, 2.4, 1.6, -0.5, 0.6, 0.3, 1.1, -0.2, 0.8)  # favours class 2
CIGAR_BIAS = tuple(8.0 if i == 4 else 0.0 for i in range(10))  # certain of class 4
MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    biased_checkpoint(folder / f"{BALANCED}.pth", SPREAD_BIAS, val_acc=0.62)
    biased_checkpoint(folder / f"{PLAIN}.pth", CIGAR_BIAS)
    (folder / "notes.pth").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pth")
    return folder


@pytest.fixture(scope="module")
def client(models_dir: Path) -> TestClient:
    with TestClient(create_app(models_dir, max_upload_mb=MAX_UPLOAD_MB)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def galaxy_png() -> bytes:
    """A small synthetic galaxy (a bright elliptical blob), for tests that do not need a real one."""
    yy, xx = np.mgrid[0:64, 0:64]
    blob = np.exp(-(((xx - 32) / 12.0) ** 2 + ((yy - 32) / 6.0) ** 2))
    rgb = (np.stack([blob, blob * 0.9, blob * 0.7], axis=-1) * 255).astype(np.uint8)
    return png_bytes(Image.fromarray(rgb))


def meter_bars(html: str) -> list[tuple[str, float, str]]:
    """(label, meter value, percentage text) for every confidence bar on a result page."""
    pattern = re.compile(
        r'<label class="bar-label" for="(bar-\d+)">([^<]+)</label>\s*'
        r'<meter id="\1" class="bar-meter" min="0" max="1" value="([\d.]+)">[^<]*</meter>\s*'
        r'<span class="bar-value">([\d.]+%)</span>'
    )
    return [(label, float(value), text) for _, label, value, text in pattern.findall(html)]


def data_images(html: str) -> list[Image.Image]:
    urls = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', html)
    return [Image.open(io.BytesIO(base64.b64decode(url))) for url in urls]


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# ---------------------------------------------------------------- pages


def test_index_offers_models_by_name_never_by_path(client: TestClient, models_dir: Path) -> None:
    response = client.get("/")
    assert response.status_code == 200
    html = response.text
    assert '<html lang="en" dir="ltr">' in html
    assert '<link rel="stylesheet" href="/static/style.css">' in html
    assert 'name="file"' in html and 'type="file"' in html
    assert re.findall(r'<option value="([^"]+)"', html) == [BALANCED, PLAIN]
    assert str(models_dir) not in html and ".pth" not in html
    assert "notes" not in html and "foreign" not in html
    assert "62.0%" in html  # the balanced model's validation accuracy
    assert "script-src" not in response.headers["content-security-policy"]


def test_stylesheet_is_served(client: TestClient) -> None:
    response = client.get("/static/style.css")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/css")
    assert ":focus-visible" in response.text and "@media" in response.text


def test_without_a_model_the_page_says_how_to_train_and_the_api_answers_503(
    tmp_path: Path, galaxy_png: bytes
) -> None:
    with TestClient(create_app(tmp_path)) as empty:
        page = empty.get("/")
        assert page.status_code == 200
        assert "python cnn.py" in page.text and "make demo" in page.text
        assert "<form" not in page.text
        api = empty.post("/api/predict", files={"file": ("g.png", galaxy_png, "image/png")})
        assert api.status_code == 503
        assert "python cnn.py" in api.json()["detail"]
        html = empty.post("/upload-file/", files={"file": ("g.png", galaxy_png, "image/png")})
        assert html.status_code == 503 and "No model available" in html.text
        assert empty.get("/healthz").json() == {"status": "ok", "models": 0}
        assert empty.get("/api/models").json() == {"default": None, "models": []}


def test_result_page_shows_class_sorted_bars_and_grad_cam(
    client: TestClient, models_dir: Path, real_galaxies: list[tuple[Path, int]]
) -> None:
    path, _ = real_galaxies[0]
    response = client.post(
        "/upload-file/",
        files={"file": (path.name, path.read_bytes(), "image/jpeg")},
        data={"network": BALANCED},
    )
    assert response.status_code == 200
    html = response.text
    bars = meter_bars(html)
    assert sorted(label for label, _, _ in bars) == sorted(CLASS_NAMES)
    values = [value for _, value, _ in bars]
    assert values == sorted(values, reverse=True) and sum(values) == pytest.approx(1, abs=1e-4)
    assert all(text == f"{value * 100:.1f}%" for _, value, text in bars)
    expected = predict(path, models_dir / f"{BALANCED}.pth")
    assert bars[0][0] == expected.class_name == CLASS_NAMES[2]
    assert f'<p id="verdict-class" class="verdict-class">{expected.class_name}</p>' in html
    assert f"{BALANCED} (DeepCNN-5Block, 32 px input)" in html
    assert "256&times;256 px, RGB, JPEG" in html and path.name in html
    preview, overlay = data_images(html)
    assert preview.size == overlay.size == (256, 256)
    # The overlay is the preview tinted by the heat map, not a copy of it.
    assert np.abs(np.asarray(preview, float) - np.asarray(overlay, float)).mean() > 5
    assert 'alt="Grad-CAM heat map' in html


def test_result_page_uses_the_chosen_network(client: TestClient, galaxy_png: bytes) -> None:
    response = client.post(
        "/upload-file/", files={"file": ("g.png", galaxy_png, "image/png")}, data={"network": PLAIN}
    )
    assert response.status_code == 200
    assert meter_bars(response.text)[0][0] == CLASS_NAMES[4]
    assert f"{PLAIN} (DeepCNN-5Block, 32 px input)" in response.text
    assert "64&times;64 px, RGB, PNG" in response.text


def test_result_page_reports_the_original_size_and_mode_of_a_large_upload(client: TestClient) -> None:
    grey = Image.fromarray(np.random.default_rng(3).integers(0, 256, (600, 800), dtype=np.uint8))
    response = client.post("/upload-file/", files={"file": ("wide.png", png_bytes(grey))})
    assert response.status_code == 200
    assert "800&times;600 px, L, PNG" in response.text
    assert [image.size for image in data_images(response.text)] == [(512, 384), (512, 384)]


# ---------------------------------------------------------------- JSON API


def test_api_predict_matches_cnn_use_model(
    client: TestClient, models_dir: Path, real_galaxies: list[tuple[Path, int]]
) -> None:
    for path, _ in real_galaxies[::20]:
        response = client.post("/api/predict", files={"file": (path.name, path.read_bytes())})
        assert response.status_code == 200
        body = response.json()
        expected = predict(path, models_dir / f"{BALANCED}.pth")
        assert body["model"] == BALANCED
        assert (body["class_id"], body["class_name"]) == (expected.class_id, expected.class_name)
        assert body["confidence"] == pytest.approx(expected.confidence, abs=1e-6)
        assert list(body["probabilities"]) == list(CLASS_NAMES)
        assert list(body["probabilities"].values()) == pytest.approx(expected.probabilities, abs=1e-6)


def test_api_predict_uses_the_named_model(client: TestClient, galaxy_png: bytes) -> None:
    response = client.post("/api/predict", files={"file": ("g.png", galaxy_png)}, data={"model": PLAIN})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == PLAIN
    assert body["class_id"] == 4 and body["class_name"] == CLASS_NAMES[4]
    assert body["confidence"] == max(body["probabilities"].values()) > 0.9


@pytest.mark.parametrize("name", [PLAIN, f"{PLAIN}.pth", f"{BALANCED}.pth"])
def test_a_model_is_found_by_its_name_or_its_file_name(
    client: TestClient, galaxy_png: bytes, name: str
) -> None:
    # The original page posted `network=based_on_balanced_data_model.pth`; scripts written for it still work.
    expected = name.removesuffix(".pth")
    page = client.post("/upload-file/", files={"file": ("g.png", galaxy_png)}, data={"network": name})
    assert page.status_code == 200 and f"{expected} (DeepCNN-5Block, 32 px input)" in page.text
    answer = client.post("/api/predict", files={"file": ("g.png", galaxy_png)}, data={"model": name})
    assert answer.status_code == 200 and answer.json()["model"] == expected


def test_api_models_and_healthz(client: TestClient) -> None:
    listing = client.get("/api/models").json()
    assert listing["default"] == BALANCED
    assert [m["name"] for m in listing["models"]] == [BALANCED, PLAIN]
    first = listing["models"][0]
    assert first["image_size"] == 32 and first["num_classes"] == 10
    assert (first["architecture"], first["crop"]) == ("DeepCNN-5Block", 1.0)
    assert first["class_names"] == list(CLASS_NAMES)
    assert first["val_acc"] == pytest.approx(0.62) and first["default"] is True
    assert client.get("/healthz").json() == {"status": "ok", "models": 2}


def test_a_cropping_models_grad_cam_covers_only_the_region_it_saw(tmp_path: Path) -> None:
    path = biased_checkpoint(tmp_path / "cropped.pth", (0.2, 0.9, 2.4, 1.6, -0.5, 0.6, 0.3, 1.1, -0.2, 0.8))
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["preprocessing"]["crop"] = 0.5
    torch.save(checkpoint, path)
    grey = png_bytes(Image.fromarray(np.full((80, 80, 3), 180, dtype=np.uint8)))
    with TestClient(create_app(tmp_path)) as client:
        page = client.post("/upload-file/", files={"file": ("g.png", grey, "image/png")}).text
        listing = client.get("/api/models").json()["models"][0]
        index = client.get("/").text
    assert listing["crop"] == 0.5 and "centre 50%" in index
    assert "from the central 50% of the frame" in page
    preview, cam = (np.asarray(image).astype(int) for image in data_images(page))
    assert abs(cam[:10, :10].mean() - preview[:10, :10].mean() / 2) < 4  # outside the crop: dimmed
    assert np.abs(cam[30:50, 30:50] - preview[30:50, 30:50]).max() > 20  # inside: the heat map's colours


def test_openapi_docs(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/predict", "/api/models", "/healthz"} <= set(paths)
    assert {"404", "413", "415"} <= set(paths["/api/predict"]["post"]["responses"])


def test_default_model_order(tmp_path: Path) -> None:
    biased_checkpoint(tmp_path / "a_first_by_name.pth", SPREAD_BIAS)
    biased_checkpoint(tmp_path / f"{BALANCED}.pth", SPREAD_BIAS)
    with TestClient(create_app(tmp_path)) as preferred:
        assert preferred.get("/api/models").json()["default"] == BALANCED
    with TestClient(create_app(tmp_path, default_model="a_first_by_name")) as chosen:
        assert chosen.get("/api/models").json()["default"] == "a_first_by_name"


def test_a_model_trained_while_serving_appears(tmp_path: Path) -> None:
    with TestClient(create_app(tmp_path)) as live:
        assert live.get("/healthz").json()["models"] == 0
        biased_checkpoint(tmp_path / "fresh.pth", SPREAD_BIAS)
        assert live.get("/healthz").json()["models"] == 1
        assert '<option value="fresh" selected>' in live.get("/").text
        # cnn.py's per-epoch resume file is the last epoch, not a finished model: never offered.
        biased_checkpoint(tmp_path / "fresh.resume.pth", SPREAD_BIAS)
        assert [m["name"] for m in live.get("/api/models").json()["models"]] == ["fresh"]


def test_the_original_projects_checkpoint_is_served_by_name(tmp_path: Path, galaxy_png: bytes) -> None:
    ours = biased_checkpoint(tmp_path / f"{BALANCED}.pth", SPREAD_BIAS, val_acc=0.62)
    save_original_checkpoint(tmp_path / "model.pth", torch.load(ours, weights_only=True)["model_state_dict"],
                             val_acc=0.84)
    with TestClient(create_app(tmp_path)) as served:
        assert re.findall(r'<option value="([^"]+)"', served.get("/").text) == [BALANCED, "model"]
        listing = {m["name"]: m for m in served.get("/api/models").json()["models"]}
        assert listing["model"]["val_acc"] == pytest.approx(0.84) and listing["model"]["image_size"] == 32
        answers = [
            served.post("/api/predict", files={"file": ("g.png", galaxy_png)}, data={"model": name}).json()
            for name in (BALANCED, "model")
        ]
    assert answers[1]["model"] == "model"
    # Two models loaded apart, run on whichever pool threads served them: equal, not bit for bit.
    assert answers[1]["probabilities"] == pytest.approx(answers[0]["probabilities"], abs=1e-6)


# ---------------------------------------------------------------- models that look at the image

# The tests above use models whose answer hardly depends on the image. These answer by colour, by weights
# set by hand: whatever the server does wrong to an image (crop, channel order, scaling, another request's
# image) changes the class, not just a probability in the sixth decimal.
DARK, RED, GREEN, BLUE = 0, 1, 2, 3  # class ids; the other six are never the answer
COLOUR_SCALE = 20.0  # logit units per full-brightness colour: confident answers, far from any tie
CROPPED = "cropped_deepcnn"  # DeepCNN-5Block, 32 px, trained with --crop 0.5
TORCHVISION = "resnet"  # resnet18, 32 px, the whole frame


def colour_network(arch: str, size: int) -> torch.nn.Module:
    """A network whose penultimate features are the red, green and blue it sees, and whose logits are: red
    for red, green (x1.1) for green, blue (x1.2) for blue, so blue beats green beats red where several show,
    and dark (a constant half) where nothing is bright. Every convolution passes channels 0-2 through (its
    centre tap), the rest is zero, BatchNorm is the identity: DeepCNN-5Block's max-pools keep the brightest
    of each colour in the model's view; resnet18's residual paths keep a sparse sample of the (ImageNet-
    normalised) pixels, so it is shown plain colours."""
    network = networks.build_model(arch, len(CLASS_NAMES), size)
    torchvision = networks.architecture(arch).torchvision
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.reset_parameters()  # weight 1, bias 0, running mean 0, running variance 1
        if torchvision:
            passing = [network.net.conv1] + [m[0] for n, m in network.net.named_modules()
                                             if n.endswith("downsample")]
        else:
            passing = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
        for conv in passing:
            k, j = (side // 2 for side in conv.kernel_size)
            for c in range(3):
                conv.weight[c, c, k, j] = 1
        linears = [m for m in network.modules() if isinstance(m, torch.nn.Linear)]
        for hidden in linears[:-1]:
            for c in range(3):
                hidden.weight[c, c] = 1
        # What a full-brightness channel is by the time it reaches the features.
        full = [(1 - m) / s for m, s in zip(networks.IMAGENET_MEAN, networks.IMAGENET_STD, strict=True)] \
            if torchvision else [1.0, 1.0, 1.0]
        out = linears[-1]
        for class_id, channel, weight in ((RED, 0, 1.0), (GREEN, 1, 1.1), (BLUE, 2, 1.2)):
            out.weight[class_id, channel] = COLOUR_SCALE * weight / full[channel]
        out.bias[DARK] = COLOUR_SCALE / 2
        out.bias[BLUE + 1:] = -COLOUR_SCALE
    return network.eval()


def colour_checkpoint(path: Path, arch: str = networks.DEFAULT_ARCH, size: int = 32, crop: float = 1.0
                      ) -> Path:
    """A colour_network saved as cnn.py saves a model trained with --arch `arch` --image-size `size`
    --crop `crop`."""
    record = models.ModelRecord(arch, CLASS_NAMES, preprocessing.Preprocessing.for_network(arch, size, crop),
                                metrics=models.Metrics(epoch=3, val_loss=0.5, val_acc=0.9))
    state = colour_network(arch, size).state_dict()
    models.Checkpoint(record, state, models.TrainingState({}, {})).save(path)
    return path


def reference_class(path: Path, image: Image.Image, preprocessing: preprocessing.Preprocessing | None = None,
                    to_input: Callable[[torch.Tensor], torch.Tensor] = preprocessing.to_model_input) -> int:
    """The class the checkpoint's float32 network gives the image, prepared as its record says, or by
    `preprocessing` and `to_input` where a test plays a server that gets them wrong."""
    checkpoint = models.read_checkpoint(path)
    prepare = preprocessing or checkpoint.record.preprocessing
    with torch.no_grad():
        return int(checkpoint.model()(to_input(prepare(image)[None])).argmax())


def flat(rgb: tuple[int, int, int], side: int = 64) -> Image.Image:
    return Image.new("RGB", (side, side), rgb)


def framed(centre: tuple[int, int, int], border: tuple[int, int, int]) -> Image.Image:
    """A 64 px image whose central 40 px square is one colour, the border another: a model that crops the
    central half (32 px) sees only the centre, one shown the whole frame sees both."""
    image = flat(border)
    image.paste(centre, (12, 12, 52, 52))
    return image


PURE_RED, PURE_GREEN, PURE_BLUE, DIM_GREY = (230, 20, 20), (20, 230, 20), (20, 20, 230), (50, 50, 50)
# name: (image, its class as the model was trained (the central half), its class from the whole frame)
FRAMED = {
    "red in blue": (framed(PURE_RED, PURE_BLUE), RED, BLUE),
    "green in blue": (framed(PURE_GREEN, PURE_BLUE), GREEN, BLUE),
    "dim grey in red": (framed(DIM_GREY, PURE_RED), DARK, RED),
    "blue in red": (framed(PURE_BLUE, PURE_RED), BLUE, BLUE),
}


@pytest.fixture(scope="module")
def colour_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("colour_models")
    colour_checkpoint(folder / f"{CROPPED}.pth", crop=0.5)
    colour_checkpoint(folder / f"{TORCHVISION}.pth", arch="resnet18")
    return folder


@pytest.fixture(scope="module")
def colour_client(colour_models: Path) -> Iterator[TestClient]:
    with TestClient(create_app(colour_models, default_model=CROPPED)) as test_client:
        yield test_client


def served_class(client: TestClient, image: Image.Image, model: str, route: str = "/api/predict") -> str:
    """The class name the server gives the image, from the JSON API or the result page."""
    if route == "/api/predict":
        response = client.post(route, files={"file": ("g.png", png_bytes(image))}, data={"model": model})
        assert response.status_code == 200, response.text
        return response.json()["class_name"]
    response = client.post(route, files={"file": ("g.png", png_bytes(image))}, data={"network": model})
    assert response.status_code == 200, response.text
    verdict = re.search(r'<p id="verdict-class" class="verdict-class">([^<]+)</p>', response.text)
    assert verdict is not None and meter_bars(response.text)[0][0] == verdict[1]
    return verdict[1]


@pytest.mark.parametrize("route", ["/api/predict", "/upload-file/"])
@pytest.mark.parametrize("case", list(FRAMED))
def test_the_answer_is_what_the_model_sees_through_its_crop(
    colour_client: TestClient, colour_models: Path, case: str, route: str
) -> None:
    image, trained, whole_frame = FRAMED[case]
    path = colour_models / f"{CROPPED}.pth"
    assert reference_class(path, image) == trained
    # Serving the whole frame to a model trained on the central half would answer this:
    assert reference_class(path, image, preprocessing.Preprocessing(32, crop=1.0)) == whole_frame
    assert served_class(colour_client, image, CROPPED, route) == CLASS_NAMES[trained]


@pytest.mark.parametrize("route", ["/api/predict", "/upload-file/"])
def test_the_answer_follows_the_models_channel_order_and_scaling(
    colour_client: TestClient, colour_models: Path, route: str
) -> None:
    path = colour_models / f"{CROPPED}.pth"
    red, dim = flat(PURE_RED), flat(DIM_GREY)
    assert reference_class(path, red) == RED and reference_class(path, dim) == DARK
    # A server that fed BGR, or left the pixels in 0-255, would answer these:
    bgr = lambda x: preprocessing.to_model_input(x.flip(1))  # noqa: E731
    assert reference_class(path, red, to_input=bgr) == BLUE
    assert reference_class(path, dim, to_input=lambda x: x.float()) == BLUE
    assert served_class(colour_client, red, CROPPED, route) == CLASS_NAMES[RED]
    assert served_class(colour_client, dim, CROPPED, route) == CLASS_NAMES[DARK]


def test_concurrent_requests_each_get_their_own_images_answer(colour_client: TestClient) -> None:
    images = [(image, trained) for image, trained, _ in list(FRAMED.values())[:3]] + [(flat(PURE_BLUE), BLUE)]
    assert len({trained for _, trained in images}) == 4  # four different answers to mix up

    def call(i: int) -> tuple[str, str]:
        image, trained = images[i % len(images)]
        route = "/upload-file/" if (i // len(images)) % 2 else "/api/predict"
        return served_class(colour_client, image, CROPPED, route), CLASS_NAMES[trained]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(32)))
    wrong = [(i, got, want) for i, (got, want) in enumerate(results) if got != want]
    assert wrong == []


def test_a_torchvision_network_is_listed_and_classifies(
    colour_client: TestClient, colour_models: Path
) -> None:
    index = colour_client.get("/").text
    assert re.findall(r'<option value="([^"]+)"', index) == [CROPPED, TORCHVISION]
    row = re.search(rf'<th scope="row">{TORCHVISION}</th>(.*?)</tr>', index, re.S)
    assert row is not None
    assert re.findall(r"<td>([^<]*)</td>", row[1]) == [
        "resnet18", "32&times;32 px", "10", "90.0%", "not recorded"]

    listing = {m["name"]: m for m in colour_client.get("/api/models").json()["models"]}
    assert listing[TORCHVISION] == {
        "name": TORCHVISION, "architecture": "resnet18", "image_size": 32, "crop": 1.0, "num_classes": 10,
        "class_names": list(CLASS_NAMES), "val_acc": pytest.approx(0.9), "epoch": 3,
        "trained_on": "not recorded", "default": False,
    }
    assert listing[CROPPED]["architecture"] == "DeepCNN-5Block" and listing[CROPPED]["crop"] == 0.5

    path = colour_models / f"{TORCHVISION}.pth"
    for colour, expected in ((PURE_GREEN, GREEN), (PURE_BLUE, BLUE), (DIM_GREY, DARK)):
        assert reference_class(path, flat(colour)) == expected
        page = colour_client.post("/upload-file/", files={"file": ("g.png", png_bytes(flat(colour)))},
                                  data={"network": TORCHVISION})
        assert page.status_code == 200
        assert f"{TORCHVISION} (resnet18, 32 px input)" in page.text
        bars = meter_bars(page.text)
        assert sorted(label for label, _, _ in bars) == sorted(CLASS_NAMES)
        assert bars[0][0] == CLASS_NAMES[expected]
        assert len(data_images(page.text)) == 2  # the upload and its Grad-CAM
        assert served_class(colour_client, flat(colour), TORCHVISION) == CLASS_NAMES[expected]


def test_routes_are_plain_functions_of_their_dependencies(colour_models: Path) -> None:
    models_on_offer = registry.ModelRegistry(colour_models, default_name=TORCHVISION)
    listing = web.api_models(models_on_offer)
    assert listing.default == TORCHVISION
    assert [(m.name, m.architecture, m.default) for m in listing.models] == [
        (TORCHVISION, "resnet18", True), (CROPPED, "DeepCNN-5Block", False)]
    assert web.healthz(models_on_offer) == {"status": "ok", "models": 2}
    served = models_on_offer.get(f"{CROPPED}.pth")
    assert (served.name, served.path, served.record.crop) == (CROPPED, colour_models / f"{CROPPED}.pth", 0.5)


def test_an_apps_registry_can_be_overridden(tmp_path: Path, colour_models: Path) -> None:
    app = create_app(tmp_path)  # an empty folder
    app.dependency_overrides[web.get_registry] = lambda: registry.ModelRegistry(colour_models, CROPPED)
    with TestClient(app) as overridden:
        assert overridden.get("/healthz").json() == {"status": "ok", "models": 2}
        assert re.findall(r'<option value="([^"]+)"', overridden.get("/").text) == [CROPPED, TORCHVISION]
        assert served_class(overridden, flat(PURE_GREEN), CROPPED) == CLASS_NAMES[GREEN]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("route", ["/api/predict", "/upload-file/"])
def test_upload_over_the_declared_limit_gets_413(client: TestClient, route: str) -> None:
    too_big = b"\0" * (MAX_UPLOAD_MB * 2**20 + 1)
    response = client.post(route, files={"file": ("big.png", too_big, "image/png")})
    assert response.request.headers["content-length"].isdigit()
    assert response.status_code == 413
    if route.startswith("/api/"):
        detail = "the upload is larger than the 1 MB limit: choose a smaller image"
        assert response.json() == {"detail": detail}
    else:
        assert "The upload is too large" in response.text and 'href="/"' in response.text


@pytest.mark.parametrize(("extra", "refused"), [(0, False), (1, True)])
def test_the_limit_is_counted_in_mebibytes(client: TestClient, galaxy_png: bytes, extra: int, refused: bool
                                           ) -> None:
    """--max-upload-mb 1 is 2**20 bytes of request body: exactly that is read, one byte more is refused."""
    boundary = "galaxyboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"g.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + galaxy_png
    tail = f"\r\n--{boundary}--\r\n".encode()
    padding = b"\0" * (MAX_UPLOAD_MB * 2**20 + extra - len(head) - len(tail))  # after the PNG's end
    body = head + padding + tail
    assert len(body) == MAX_UPLOAD_MB * 2**20 + extra
    response = client.post("/api/predict", content=body,
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert (response.status_code == 413) == refused, response.text


@pytest.mark.parametrize("route", ["/api/predict", "/upload-file/"])
def test_chunked_upload_over_the_limit_gets_413(client: TestClient, route: str) -> None:
    boundary = "galaxyboundary"
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body():
        yield head
        for _ in range(3 * MAX_UPLOAD_MB * 16):  # 3 MB in 64 KiB chunks
            yield b"\0" * 2**16
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        route, content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert "larger than the 1 MB limit" in response.text


def run_middleware(headers: list[tuple[bytes, bytes]], chunks: int) -> tuple[int, list[dict]]:
    """Drive UploadLimitMiddleware (limit 100 bytes) over an app that reads the whole body."""
    received = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b"x" * 40, "more_body": received < chunks}

    async def send(message: dict) -> None:
        sent.append(message)

    async def app(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        await PlainTextResponse("read it all")(scope, receive, send)

    middleware = UploadLimitMiddleware(app, 100, lambda scope: PlainTextResponse("too large", 413))
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""}
    asyncio.run(middleware(scope, receive, send))
    return received, sent


def test_middleware_never_reads_a_body_declared_too_large() -> None:
    received, sent = run_middleware([(b"content-length", b"10000000000")], chunks=10**9)
    assert received == 0
    assert sent[0]["status"] == 413 and sent[1]["body"] == b"too large"


def test_middleware_stops_reading_a_stream_at_the_limit() -> None:
    # A stream of 1,000 chunks: a middleware that failed to count would read them all (and answer 200)
    # in a moment, not hang.
    received, sent = run_middleware([], chunks=1000)
    assert received == 3  # 120 bytes: the first chunk over 100
    assert sent[0]["status"] == 413 and len(sent) == 2


def test_middleware_passes_a_body_within_the_limit() -> None:
    received, sent = run_middleware([(b"content-length", b"80")], chunks=2)
    assert received == 2
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"read it all"


@pytest.fixture(scope="module")
def bad_uploads(galaxy_png: bytes) -> dict[str, bytes]:
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return {
        "text": b"This is a text file, not a galaxy.\n" * 20,
        "random bytes": np.random.default_rng(1).bytes(4096),
        "truncated PNG": truncated(png_bytes(noisy)),
        "truncated JPEG": truncated(png_bytes(noisy, "JPEG")),
    }


@pytest.mark.parametrize("kind", ["text", "random bytes", "truncated PNG", "truncated JPEG"])
@pytest.mark.parametrize("route", ["/api/predict", "/upload-file/"])
def test_non_images_get_415(client: TestClient, bad_uploads: dict[str, bytes], kind: str, route: str) -> None:
    response = client.post(route, files={"file": ("galaxy.png", bad_uploads[kind], "image/png")})
    assert response.status_code == 415
    if route.startswith("/api/"):
        assert "not a readable image" in response.json()["detail"]
    else:
        assert "Not an image this server can read" in response.text and 'href="/"' in response.text


@pytest.mark.parametrize("route", ["/api/predict", "/upload-file/"])
def test_empty_file_gets_400(client: TestClient, route: str) -> None:
    response = client.post(route, files={"file": ("empty.png", b"", "image/png")})
    assert response.status_code == 400
    assert "the uploaded file is empty" in response.text


@pytest.mark.parametrize(
    ("side", "message"),
    [
        # over PIL's own bomb limit: PIL notices, the same message as ours
        (20_000, "is 400,000,000 pixels, more than the 40,000,000 pixels allowed: use a smaller image"),
        (8_000, "is 8000x8000 pixels, more than the 40,000,000 pixels allowed: use a smaller image"),
    ],
)
@pytest.mark.parametrize("route", ["/api/predict", "/upload-file/"])
def test_decompression_bomb_gets_400(client: TestClient, route: str, side: int, message: str) -> None:
    response = client.post(route, files={"file": ("bomb.png", bomb_png(side, side), "image/png")})
    assert response.status_code == 400
    assert message in response.text


@pytest.mark.parametrize(
    ("route", "field", "name"),
    [
        ("/api/predict", "model", "nope"),
        ("/upload-file/", "network", "nope"),
        ("/upload-file/", "network", "../../etc/passwd"),
        ("/upload-file/", "network", "/etc/passwd"),
        ("/upload-file/", "network", "../x.pth"),
        ("/upload-file/", "network", f"sub/{BALANCED}.pth"),
        ("/upload-file/", "network", f"./{BALANCED}.pth"),
        ("/api/predict", "model", f"../{PLAIN}.pth"),
        ("/api/predict", "model", f"{PLAIN}.pth.pth"),
        ("/api/predict", "model", "notes.pth"),
    ],
)
def test_unknown_model_gets_404(
    client: TestClient, galaxy_png: bytes, route: str, field: str, name: str
) -> None:
    response = client.post(route, files={"file": ("g.png", galaxy_png)}, data={field: name})
    assert response.status_code == 404
    assert f"unknown model {name!r}; available: {BALANCED}, {PLAIN}" in response.text.replace("&#39;", "'")


def test_a_path_to_a_real_checkpoint_elsewhere_is_refused(
    client: TestClient, galaxy_png: bytes, tmp_path: Path
) -> None:
    outside = biased_checkpoint(tmp_path / "outside.pth", CIGAR_BIAS)
    for name in (str(outside), str(outside.with_suffix(""))):
        response = client.post("/api/predict", files={"file": ("g.png", galaxy_png)}, data={"model": name})
        assert response.status_code == 404


@pytest.mark.parametrize("route", ["/api/predict", "/upload-file/"])
def test_missing_file_field_gets_422(client: TestClient, route: str) -> None:
    response = client.post(route, data={"network": BALANCED, "model": BALANCED})
    assert response.status_code == 422
    if route.startswith("/api/"):
        assert response.json() == {"detail": "the form is incomplete (file: Field required)"}
    else:
        assert "The form is incomplete" in response.text and "file: Field required" in response.text


@pytest.mark.parametrize("route", ["/api/predict", "/upload-file/"])
def test_a_malformed_form_gets_400(client: TestClient, route: str) -> None:
    response = client.post(route, content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert response.status_code == 400
    assert "Missing boundary in multipart." in response.text


def test_unknown_page_gets_a_friendly_404(client: TestClient) -> None:
    response = client.get("/no/such/page")
    assert response.status_code == 404
    assert "Back to the upload form" in response.text


# ---------------------------------------------------------------- a listed model that goes away


def overwrite_with_garbage(path: Path) -> None:
    path.write_bytes(b"this file was a checkpoint\n" * 100)


DAMAGE = {"deleted": Path.unlink, "overwritten with garbage": overwrite_with_garbage}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("when", ["before the request", "during the request"])
@pytest.mark.parametrize(("route", "field"), [("/api/predict", "model"), ("/upload-file/", "network")])
def test_a_listed_model_that_breaks_gets_503(
    tmp_path: Path, galaxy_png: bytes, monkeypatch: pytest.MonkeyPatch,
    damage: str, when: str, route: str, field: str,
) -> None:
    target = biased_checkpoint(tmp_path / f"{BALANCED}.pth", SPREAD_BIAS)  # warmed (cached) at startup
    biased_checkpoint(tmp_path / f"{PLAIN}.pth", CIGAR_BIAS)  # so the folder never runs out of models
    with TestClient(create_app(tmp_path)) as served:
        assert re.findall(r'<option value="([^"]+)"', served.get("/").text) == [BALANCED, PLAIN]
        if when == "before the request":
            DAMAGE[damage](target)
        else:  # after the name was looked up, before the model is used

            def damaging_read_upload(file):
                DAMAGE[damage](target)
                return read_upload(file)

            monkeypatch.setattr(web, "read_upload", damaging_read_upload)
        response = served.post(route, files={"file": ("g.png", galaxy_png)}, data={field: BALANCED})
    assert response.status_code == 503
    detail = f"model '{BALANCED}' could not be loaded; reload the page to see the models"
    assert detail in response.text.replace("&#39;", "'")
    assert str(tmp_path) not in response.text


def test_a_model_deleted_while_the_folder_is_listed_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    biased_checkpoint(tmp_path / "kept.pth", SPREAD_BIAS)
    vanishing = biased_checkpoint(tmp_path / "vanishing.pth", SPREAD_BIAS)

    def deleted_once_listed(path: Path) -> bool:  # runs after the folder was listed, before each file is read
        if path == vanishing:
            path.unlink()
        return is_resume_file(path)

    with TestClient(create_app(tmp_path)) as served:
        monkeypatch.setattr(registry, "is_resume_file", deleted_once_listed)
        response = served.get("/api/models")
    assert response.status_code == 200
    assert [m["name"] for m in response.json()["models"]] == ["kept"]
    assert not vanishing.exists()


# ---------------------------------------------------------------- nothing written anywhere


@pytest.fixture
def temporary_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The temporary files created while the test runs, by the call that made each.

    Counted where they are made: a file from TemporaryFile is unlinked at birth (O_TMPFILE on Linux),
    so no folder listing ever shows it.
    """
    created: list[str] = []

    def recording(name: str, make: Callable[..., Any]) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:
            created.append(name)
            return make(*args, **kwargs)

        return record

    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, recording(name, getattr(tempfile, name)))
    spooled = tempfile.SpooledTemporaryFile
    monkeypatch.setattr(spooled, "rollover", recording("SpooledTemporaryFile.rollover", spooled.rollover))
    return created


def test_an_upload_up_to_the_limit_stays_in_memory(models_dir: Path, temporary_files: list[str]) -> None:
    # Noise hardly compresses: a 5.6 MB PNG, over five times Starlette's default 1 MB in-memory spool.
    noise = np.random.default_rng(4).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)
    upload = png_bytes(Image.fromarray(noise))
    assert 5 * 2**20 < len(upload) < 6 * 2**20
    with TestClient(create_app(models_dir, max_upload_mb=6)) as test_client:
        for route in ("/api/predict", "/upload-file/"):
            response = test_client.post(route, files={"file": ("big.png", upload, "image/png")})
            assert response.status_code == 200
    assert temporary_files == []


def test_hostile_file_names_write_nothing_anywhere(
    models_dir: Path, galaxy_png: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    temporary_files: list[str],
) -> None:
    before = {folder: tree_digest(ROOT / folder) for folder in ("static", "templates")}
    models_before = tree_digest(models_dir)
    cwd, temp = tmp_path / "cwd", tmp_path / "temp"
    cwd.mkdir()
    temp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    # Over Starlette's default 1 MB in-memory spool, which would put it in a temporary file.
    big = png_bytes(Image.fromarray(np.random.default_rng(2).integers(0, 256, (700, 700, 3), dtype=np.uint8)))
    assert len(big) > 2**20
    names = [
        "../templates/index.html", "..\\..\\x.png", "/tmp/owned.png", "../../static/x.png", "<b>bold</b>.png",
    ]
    with TestClient(create_app(models_dir, max_upload_mb=5)) as test_client:
        for name in names:
            for route in ("/api/predict", "/upload-file/"):
                response = test_client.post(route, files={"file": (name, big, "image/png")})
                assert response.status_code == 200
        page = test_client.post("/upload-file/", files={"file": ("<b>bold</b>.png", galaxy_png)}).text
    assert "&lt;b&gt;bold&lt;/b&gt;.png" in page and "<b>bold</b>" not in page
    assert {folder: tree_digest(ROOT / folder) for folder in ("static", "templates")} == before
    assert tree_digest(models_dir) == models_before
    assert list(cwd.iterdir()) == [] and list(temp.iterdir()) == [] and temporary_files == []
    assert not Path("/tmp/owned.png").exists()


# ---------------------------------------------------------------- serving


def test_the_default_model_is_warmed_at_startup_not_at_build(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    warmed: list[Path] = []

    def recording_predict(source, model_path, **kwargs):
        warmed.append(Path(model_path))
        return predict(source, model_path, **kwargs)

    monkeypatch.setattr(web, "predict", recording_predict)
    app = create_app(models_dir)
    assert warmed == []
    with TestClient(app):
        assert warmed == [models_dir / f"{BALANCED}.pth"]


def test_concurrent_requests_all_succeed(client: TestClient, galaxy_png: bytes) -> None:
    def call(i: int) -> tuple[int, str]:
        if i % 2:
            response = client.post("/upload-file/", files={"file": ("g.png", galaxy_png)})
            return response.status_code, meter_bars(response.text)[0][0]
        response = client.post("/api/predict", files={"file": ("g.png", galaxy_png)})
        return response.status_code, response.json()["class_name"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(16)))
    assert results == [(200, CLASS_NAMES[2])] * 16


def test_at_most_one_inference_per_core_at_a_time(
    models_dir: Path, galaxy_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    requests = 6
    changed = threading.Condition()
    count = {"arrived": 0, "inside": 0, "most inside": 0}
    gate = threading.Semaphore(0)  # every inference waits here until the test lets them all go

    def arriving(file):  # each request's last step before it waits for an inference slot
        with changed:
            count["arrived"] += 1
            changed.notify_all()
        return read_upload(file)

    def gated(infer):
        def slow_infer(*args, **kwargs):
            with changed:
                count["inside"] += 1
                count["most inside"] = max(count["most inside"], count["inside"])
                changed.notify_all()
            gate.acquire(timeout=60)
            with changed:
                count["inside"] -= 1
            return infer(*args, **kwargs)

        return slow_infer

    def call(i: int) -> int:
        route = "/upload-file/" if i % 2 else "/api/predict"
        return test_client.post(route, files={"file": ("g.png", galaxy_png)}).status_code

    with TestClient(create_app(models_dir)) as test_client:  # the default model warms before the gates
        monkeypatch.setattr(web, "read_upload", arriving)
        monkeypatch.setattr(web, "predict", gated(predict))
        monkeypatch.setattr(web, "grad_cam", gated(grad_cam))
        with ThreadPoolExecutor(requests) as pool:
            pending = [pool.submit(call, i) for i in range(requests)]
            try:
                with changed:  # every request is past its upload, and the first inferences are waiting
                    assert changed.wait_for(lambda: count["arrived"] == requests and count["inside"] >= 2, 60)
            finally:
                gate.release(requests)  # whatever happened, so that no request is left waiting
            assert [future.result(60) for future in pending] == [200] * requests
    assert count["most inside"] == 2


def test_inference_does_not_block_the_event_loop(
    client: TestClient, galaxy_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_predict(*args, **kwargs):
        entered.set()
        release.wait(10)
        return predict(*args, **kwargs)

    monkeypatch.setattr(web, "predict", slow_predict)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/api/predict", files={"file": ("g.png", galaxy_png)})
        assert entered.wait(10)
        assert client.get("/healthz").status_code == 200  # answered while the prediction is stuck
        assert not pending.done()
        release.set()
        assert pending.result(10).status_code == 200


# ---------------------------------------------------------------- command line


def test_help_states_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 127.0.0.1)", "(default: 8000)", "(default: .)", "(default: 10)"):
        assert default in text
    assert f"(default: {BALANCED} if present" in text


def test_cli_serves_the_app_on_the_given_address(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    served = {}
    monkeypatch.setattr(main.uvicorn, "run", lambda app, **kwargs: served.update(app=app, **kwargs))
    args = ["--models-dir", str(models_dir), "--port", "8123", "--max-upload-mb", "2"]
    assert run_cli(main.main, args) == 0
    assert isinstance(served["app"], FastAPI) and (served["host"], served["port"]) == ("127.0.0.1", 8123)
    out = capsys.readouterr().out
    assert "http://127.0.0.1:8123" in out and f"2 model(s) in {models_dir}: {BALANCED}, {PLAIN}" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models-dir", "no/such/folder"], "error: models folder no/such/folder not found"),
        (["--max-upload-mb", "0"], "error: --max-upload-mb must be positive"),
        (["--default-model", "nope"], "error: no model 'nope' in"),
    ],
)
def test_cli_errors_are_one_line(
    args: list[str], message: str, models_dir: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(models_dir)
    monkeypatch.setattr(main.uvicorn, "run", lambda *a, **k: pytest.fail("must not serve"))
    assert run_cli(main.main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


@pytest.mark.parametrize(("port", "message"), [
    ("99999", "port 99999 is outside 0-65535: choose a free one, e.g. 8080"),
    ("-1", "port -1 is outside 0-65535: choose a free one, e.g. 8080"),
    ("http", "'http' is not a port number (0-65535)"),
])
def test_a_port_outside_the_range_is_a_usage_error(
    port: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--port", port])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith(f": error: argument --port: {message}")
    assert err.count("error") == 1 and "Traceback" not in err


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something listens on, for the duration of the test."""
    with listening_socket() as server:
        yield server.getsockname()[1]


def port_taken_error(port: int) -> str:
    return (f"error: 127.0.0.1:{port} is already in use: stop what listens there or choose another port "
            "(--port 8080, or `make demo PORT=8080`)")


def test_check_port_fails_on_a_port_in_use(
    taken_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(main.uvicorn, "run", lambda *a, **k: pytest.fail("must not serve"))
    assert run_cli(main.main, ["--port", str(taken_port), "--check-port"]) == 2
    assert capsys.readouterr().err == port_taken_error(taken_port) + "\n"


@pytest.mark.skipif(sys.platform != "linux", reason="a held port counts as free only on Linux")
def test_check_port_passes_on_a_free_port_and_leaves_it_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main.uvicorn, "run", lambda *a, **k: pytest.fail("must not serve"))
    opened: list[socket.socket] = []

    class RecordedSocket(socket.socket):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    # Bound with SO_REUSEADDR but not listening, as uvicorn's socket is before it serves: on Linux the
    # port still counts as free, yet no other process can take it while the test runs.
    with socket.socket() as reserved:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        with monkeypatch.context() as patch:
            patch.setattr(main.socket, "socket", RecordedSocket)
            assert run_cli(main.main, ["--port", str(port), "--check-port"]) == 0
        assert len(opened) == 1 and opened[0].fileno() == -1  # the check let go of its socket
        reserved.listen()  # and a server can listen on the port


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.e2e
def test_make_demo_stops_before_training_when_the_port_is_taken(taken_port: int, tmp_path: Path) -> None:
    done = subprocess.run(
        ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path), "demo",
         f"PY={sys.executable}", "RUNTIME=", f"PORT={taken_port}", "SAMPLE_N=60"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if "error: " in line][0] == port_taken_error(taken_port)
    assert list(tmp_path.iterdir()) == [], "the demo started its pipeline"


def trust_checkpoint(path: Path, temperature: float, flag_everything: bool | None) -> Path:
    """A colour model trained (so its record says) on the built-in synthetic sample, with a temperature,
    and outlier statistics that flag every image (True), none (False), or no statistics at all (None)."""
    colour_checkpoint(path)
    checkpoint = models.read_checkpoint(path)
    width = networks.staged(checkpoint.model()).head[-1].in_features
    space = trust.Gaussian(torch.zeros(len(CLASS_NAMES), width), torch.eye(width))  # the penultimate's
    outliers = None if flag_everything is None else trust.Outliers(
        (space,), (0.0,), (1.0,), -math.inf if flag_everything else math.inf)
    checkpoint.record = dataclasses.replace(
        checkpoint.record, temperature=temperature, outliers=outliers,
        trained_on=models.TrainingData("balanced_data/train", 2380, synthetic=True))
    checkpoint.save(path)
    return path


@pytest.mark.parametrize(("temperature", "flag_everything", "flag", "warning"), [
    (1.0, False, "ok", None),
    (1.0, None, "ok", None),
    (1000.0, False, "uncertain", "The model is unsure about this image"),
    (1.0, True, "unlike-training", "This image does not look like the galaxies this model was trained on"),
])
def test_the_page_and_the_api_say_how_far_to_trust_an_answer(
    tmp_path: Path, temperature: float, flag_everything: bool | None, flag: str, warning: str | None
) -> None:
    trust_checkpoint(tmp_path / "demo.pth", temperature, flag_everything)
    red = png_bytes(flat((200, 30, 30)))
    with TestClient(create_app(tmp_path)) as client:
        answer = client.post("/api/predict", files={"file": ("g.png", red)}).json()
        page = client.post("/upload-file/", files={"file": ("g.png", red)}).text
        index = client.get("/").text
    assert answer["flag"] == flag and 0 <= answer["entropy"] <= 1 and 0 <= answer["margin"] <= 1
    assert (answer["confidence"] < 0.5) == (flag == "uncertain")
    if warning is None:
        assert 'role="alert"' not in page
    else:  # in words, above the verdict and the bars
        assert page.index(warning) < page.index('id="verdict-class"') < page.index('class="bars"')
    assert "the built-in synthetic sample (2,380 images)" in page and "Synthetic galaxies only" in page
    assert "validation accuracy 90.0%" in page
    row = re.search(r"<tr>\s*<th scope=\"row\">demo.*?</tr>", index, re.S)
    assert row is not None and "90.0%" in row[0] and "the built-in synthetic sample (2,380 images)" in row[0]


# ---------------------------------------------------------------- one answer, every output; main:app


def test_the_csv_row_and_the_api_agree_on_every_answer_field(
    tmp_path: Path, galaxy_png: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """One image through cnn_use_model.py --out and through /api/predict: the same model, the same answer
    fields (class, confidence, entropy, margin, flag), whatever the temperature."""
    (tmp_path / "models").mkdir()
    ckpt = trust_checkpoint(tmp_path / "models" / "demo.pth", 1.7, False)
    image = tmp_path / "galaxy.png"
    image.write_bytes(galaxy_png)
    out = tmp_path / "answers.csv"
    assert run_cli(cum.cli_main, [str(image), "--model", str(ckpt), "--out", str(out)]) == 0
    with out.open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    with TestClient(create_app(ckpt.parent)) as client:
        answer = client.post("/api/predict", files={"file": ("galaxy.png", galaxy_png)}).json()
    for name, (kind, _) in ANSWERS.items():
        expected = kind(row[name])
        assert answer[name] == (pytest.approx(expected, abs=1e-9) if kind is float else expected), name


@pytest.mark.e2e
def test_uvicorn_serves_main_app_with_several_workers_from_the_environment(
    tmp_path: Path, galaxy_png: bytes
) -> None:
    """`uvicorn main:app --workers 2`, configured by the environment as `python main.py` is by its flags."""
    biased_checkpoint(tmp_path / f"{BALANCED}.pth", SPREAD_BIAS)
    with listening_socket() as probe:
        port = probe.getsockname()[1]
    env = one_thread_env(GALAXY10_MODELS_DIR=str(tmp_path), GALAXY10_MAX_UPLOAD_MB="1")
    command = [sys.executable, "-m", "uvicorn", "main:app", "--workers", "2", "--port", str(port)]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        health = wait_for_http(f"{base}/healthz", server)
        assert health == {"status": "ok", "models": 1}
        answer = httpx.post(f"{base}/api/predict", files={"file": ("g.png", galaxy_png)}, timeout=60).json()
        assert answer["class_name"] == CLASS_NAMES[2] and answer["model"] == BALANCED
        big = httpx.post(f"{base}/api/predict", files={"file": ("g.png", b"0" * 2**21)}, timeout=60)
        assert big.status_code == 413 and "1 MB limit" in big.json()["detail"]
    finally:
        server.terminate()
        log = server.communicate(timeout=60)[0].decode()
    assert "Traceback" not in log and log.count("Application startup complete") == 2, log


def wait_for_http(url: str, process: subprocess.Popen, seconds: float = 120) -> Any:
    """The JSON a URL answers once its server is up; fails if the server exits or never answers."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0].decode()
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {seconds:.0f} s")


def test_the_page_lists_the_answer_fields_its_declaration_gives(client: TestClient, galaxy_png: bytes
                                                                ) -> None:
    page = client.post("/upload-file/", files={"file": ("g.png", galaxy_png)}).text
    answer = client.post("/api/predict", files={"file": ("g.png", galaxy_png)}).json()
    for name, (_, how) in ANSWERS.items():
        if how.page:
            value = answer[name]
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            assert f"<dt>{how.page.capitalize()}</dt><dd>{shown}</dd>" in page, name
