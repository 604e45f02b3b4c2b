"""Your own labels: --init-from a checkpoint of other classes keeps its network and starts a new output layer,
--freeze-body trains that layer alone, class names follow the folders (or a --class-names file), and a
3-class model goes from training to every output and the web page."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import cnn
import cnn_use_model as cum
from galaxy10 import models, networks
from galaxy10.errors import run_cli
from galaxy10.networks import last_linear_name
from main import create_app

from helpers import assert_one_line_error, colour_folders, png_bytes, same_weights, save_original_checkpoint

COARSE = ("smooth", "disk", "merging")

pytestmark = pytest.mark.usefixtures("one_torch_thread", "cpu_inference")


@pytest.fixture(scope="module")
def coarse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coarse")
    colour_folders(root / "train", classes=COARSE, per_class=4, seed=0)
    colour_folders(root / "val", classes=COARSE, per_class=2, seed=1)
    return root


def args(data: Path, model_path: Path, *extra: str) -> list[str]:
    return ["--train-dir", str(data / "train"), "--val-dir", str(data / "val"),
            "--model-path", str(model_path), "--image-size", "32", "--batch-size", "4", "--epochs", "1",
            "--workers", "1", "--device", "cpu", "--precision", "fp32", *extra]


def body(weights: dict[str, torch.Tensor], output: str) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in weights.items() if not name.startswith(output)}


@pytest.mark.slow
def test_a_galaxy10_checkpoint_becomes_a_classifier_of_other_labels(
    coarse: Path, original_model: networks.CNNModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The original project's 10-class model onto 3 classes: its network is kept and a new output layer is
    trained; with --freeze-body nothing else moves, not even BatchNorm's statistics."""
    source = save_original_checkpoint(tmp_path / "model.pth", original_model.state_dict())
    probe = tmp_path / "probe.pth"
    assert run_cli(cnn.main, args(coarse, probe, "--init-from", str(source), "--freeze-body")) == 0
    out = capsys.readouterr().out
    assert f"starting from {source}: kept its network" in out and "new: the output layer for 3 classes" in out
    tuned = models.read_checkpoint(probe)
    assert tuned.record.class_names == tuple(sorted(COARSE))  # the folders' names, in folder order
    output = f"{last_linear_name(original_model)}."
    assert same_weights(body(tuned.weights, output), body(original_model.state_dict(), output))
    assert tuned.weights[f"{output}weight"].shape == (3, 32)
    fresh = networks.CNNModel(3, 32, head_init="kaiming")
    assert not torch.equal(tuned.weights[f"{output}weight"], fresh.state_dict()[f"{output}weight"])
    # Without --freeze-body the whole network trains on from the kept weights.
    whole = tmp_path / "whole.pth"
    assert run_cli(cnn.main, args(coarse, whole, "--init-from", str(source))) == 0
    assert not same_weights(body(models.read_checkpoint(whole).weights, output), body(tuned.weights, output))


@pytest.mark.slow
def test_a_torchvision_network_is_fine_tuned_onto_other_labels(coarse: Path, tmp_path: Path) -> None:
    ten = tmp_path / "ten"
    colour_folders(ten / "train", classes=tuple("abcd"), per_class=2, seed=2)
    colour_folders(ten / "val", classes=tuple("abcd"), per_class=1, seed=3)
    first = tmp_path / "first.pth"
    assert run_cli(cnn.main, args(ten, first, "--arch", "resnet18")) == 0
    probe = tmp_path / "probe.pth"
    assert run_cli(cnn.main, args(coarse, probe, "--arch", "resnet18", "--init-from", str(first),
                                  "--freeze-body")) == 0
    before, after = models.read_checkpoint(first).weights, models.read_checkpoint(probe).weights
    assert same_weights(body(after, "net.fc."), body(before, "net.fc."))
    assert after["net.fc.weight"].shape == (3, 512)


def test_another_network_or_size_is_still_one_line(
    coarse: Path, original_model: networks.CNNModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = save_original_checkpoint(tmp_path / "model.pth", original_model.state_dict())
    assert run_cli(cnn.main, args(coarse, tmp_path / "m.pth", "--init-from", str(source), "--arch",
                                  "resnet18")) == 2
    assert_one_line_error(capsys, "is a DeepCNN-5Block; pass --arch deepcnn5")
    assert run_cli(cnn.main, [*args(coarse, tmp_path / "m.pth", "--init-from", str(source)), "--image-size",
                              "64"]) == 2
    assert_one_line_error(capsys, "was trained at 32 px; pass --image-size 32")
    assert run_cli(cnn.main, args(coarse, tmp_path / "m.pth", "--freeze-body")) == 2
    assert_one_line_error(capsys, "--freeze-body", "--init-from")


@pytest.mark.slow
def test_class_names_come_from_a_file_whose_count_must_match(coarse: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    names = tmp_path / "names.txt"
    names.write_text("Disks\nMergers\n")  # two names for three folders
    assert run_cli(cnn.main, args(coarse, tmp_path / "m.pth", "--class-names", str(names))) == 2
    assert_one_line_error(capsys, "--class-names", "2 distinct name(s) for 3 class folders")
    assert not (tmp_path / "m.pth").exists()
    names.write_text("Disk galaxies\nMergers\nSmooth galaxies\n")  # folder order: disk, merging, smooth
    assert run_cli(cnn.main, args(coarse, tmp_path / "m.pth", "--class-names", str(names))) == 0
    named = models.read_record(tmp_path / "m.pth").class_names
    assert named == ("Disk galaxies", "Mergers", "Smooth galaxies")


@pytest.mark.slow
def test_three_classes_from_training_to_every_output_and_the_web_page(coarse: Path, tmp_path: Path) -> None:
    model_path = tmp_path / "models" / "coarse.pth"
    model_path.parent.mkdir()
    assert run_cli(cnn.main, args(coarse, model_path)) == 0
    classes = list(models.read_record(model_path).class_names)
    assert classes == sorted(COARSE)  # the folders' names, in folder order
    image = next((coarse / "val" / "disk").iterdir())
    prediction = cum.predict(image, model_path)
    assert prediction.class_names == tuple(classes) and len(prediction.probabilities) == 3
    out = tmp_path / "out.csv"
    assert run_cli(cum.cli_main, [str(coarse / "val"), "--model", str(model_path), "--csv", str(out)]) == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [c for c in rows[0] if c in classes] == classes and len(rows) == 6
    assert all(row["class_name"] in classes for row in rows)
    assert run_cli(cnn.main, ["--evaluate", "--model-path", str(model_path), "--val-dir", str(coarse / "val"),
                              "--device", "cpu"]) == 0
    with TestClient(create_app(model_path.parent)) as client:
        answer = client.post("/api/predict", files={"file": ("g.png", png_bytes(Image.open(image)))}).json()
        page = client.post("/upload-file/", files={"file": ("g.png", png_bytes(Image.open(image)))}).text
        listed = client.get("/api/models").json()["models"][0]
    assert set(answer["probabilities"]) == set(classes)
    assert page.count('class="bar-meter"') == 3 and "Confidence for all 3 classes" in page
    assert listed["num_classes"] == 3 and listed["class_names"] == classes


# ---------------------------------------------------------------- what a model learned from, kept


@pytest.mark.slow
def test_a_fine_tuned_model_keeps_its_lineage_and_its_synthetic_warning(
    coarse: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model trained on the synthetic sample, fine-tuned onto real labels: the new checkpoint says what its
    network learned from first, and the command line, the API and the page still warn."""
    synthetic = tmp_path / "synthetic"
    colour_folders(synthetic / "train", classes=COARSE, per_class=4, seed=2)
    colour_folders(synthetic / "val", classes=COARSE, per_class=2, seed=3)
    (synthetic / "dataset.json").write_text('{"synthetic": true}')
    base, tuned = tmp_path / "models" / "base.pth", tmp_path / "models" / "tuned.pth"
    base.parent.mkdir()
    assert run_cli(cnn.main, args(synthetic, base)) == 0
    assert run_cli(cnn.main, args(coarse, tuned, "--init-from", str(base))) == 0
    record = models.read_record(tuned)
    assert not record.trained_on.synthetic and [t.synthetic for t in record.lineage] == [True]
    learned = record.describe_training()
    assert learned.startswith("real images (12 images), fine-tuned from a network trained on the built-in "
                              "synthetic sample (12 images)")
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 40, 40)).save(image)
    capsys.readouterr()
    assert run_cli(cum.cli_main, [str(image), "--model", str(tuned)]) == 0
    err = capsys.readouterr().err
    assert f"model tuned.pth: learned from {learned}" in err
    assert "warning: tuned.pth: its network first learned from synthetic galaxies" in err
    with TestClient(create_app(tuned.parent)) as client:
        listed = {m["name"]: m for m in client.get("/api/models").json()["models"]}
        page = client.post("/upload-file/", files={"file": ("red.png", png_bytes(Image.open(image))),
                                                   "network": (None, "tuned")}).text
    assert listed["tuned"]["trained_on"] == learned
    assert "Its network first learned from synthetic galaxies" in page
