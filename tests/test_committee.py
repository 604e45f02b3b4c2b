"""A committee (cnn.py --folds K): K members, each trained on K-1 folds and never shown its own; reported,
calibrated and flagged on the out-of-fold answers; one checkpoint that every consumer serves as one model
(the mean of the members' calibrated answers); --resume keeps finished members; --init-from both ways."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import cnn
import cnn_use_model as cum
from galaxy10 import committee, fitting, models, networks, training, trust
from galaxy10.errors import run_cli
from galaxy10.preprocessing import to_model_input
from main import create_app

from helpers import colour_folders, png_bytes

pytestmark = [pytest.mark.usefixtures("one_torch_thread", "cpu_inference"), pytest.mark.slow]
FOLDS = 3


def args(data: Path, model_path: Path, *extra: str) -> list[str]:
    return ["--train-dir", str(data / "train"), "--val-dir", str(data / "val"), "--model-path",
            str(model_path), "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--workers", "1",
            "--device", "cpu", "--precision", "fp32", "--folds", str(FOLDS), *extra]


@pytest.fixture(scope="module")
def three_colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("three")
    colour_folders(root / "train", classes=("0", "1", "2"), per_class=3, seed=0)
    colour_folders(root / "val", classes=("0", "1", "2"), per_class=1, seed=1)
    return root


@pytest.fixture(scope="module")
def trained(three_colours: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_path = tmp_path_factory.mktemp("committee") / "committee.pth"
    assert run_cli(cnn.main, args(three_colours, model_path)) == 0
    return model_path


def test_a_committee_is_one_checkpoint_reported_on_its_out_of_fold_answers(trained: Path) -> None:
    checkpoint = models.read_checkpoint(trained)
    record = checkpoint.record
    assert record.members == FOLDS and len(checkpoint.networks()) == FOLDS
    assert isinstance(record.outliers, trust.CommitteeOutliers) and len(record.outliers.members) == FOLDS
    report = json.loads(models.output_path(trained, "report.json").read_text())
    assert report["folds"] == FOLDS and report["n_samples"] == 12  # every image, each answered once
    assert report["calibration"]["temperature"] == record.temperature
    assert record.metrics.val_acc == report["accuracy"] and report["train_seconds"] > 0
    assert sorted(p.name for p in trained.parent.glob("*.pth")) == ["committee.pth"]  # members' files gone
    assert len(list(trained.parent.glob("committee.fold*.history.json"))) == FOLDS


def test_the_folds_are_stratified_and_keep_a_copy_with_its_original() -> None:
    labels = np.repeat([0, 1, 2], 6)
    groups = list(range(18))
    groups[1] = groups[0]  # an augmented copy of image 0
    folds = committee.assign_folds(labels, groups, 3, seed=0)
    assert folds[0] == folds[1]
    per_fold = [np.bincount(labels[folds == f], minlength=3).tolist() for f in range(3)]
    assert per_fold == [[2, 2, 2]] * 3


def test_every_consumer_serves_the_members_mean(trained: Path, tmp_path: Path) -> None:
    """predict is the mean of the members' calibrated probabilities (by hand, float32); folders, catalogs,
    embeddings (the members' side by side), Grad-CAM and the web page serve the same committee."""
    checkpoint = models.read_checkpoint(trained)
    image = Image.new("RGB", (32, 32), (200, 60, 40))
    x = to_model_input(checkpoint.record.preprocessing(image)[None])
    with torch.no_grad():
        logits = torch.stack([network(x)[0] for network in checkpoint.networks()])
    temperature = checkpoint.record.temperature
    by_hand = torch.stack([trust.calibrated(member, temperature) for member in logits]).mean(0)
    answer = cum.predict(image, trained, exact=True)
    np.testing.assert_allclose(answer.probabilities, by_hand.double().numpy(), atol=1e-5)
    path = tmp_path / "red.png"
    image.save(path)
    out = tmp_path / "answers.parquet"
    command = [str(path), "--model", str(trained), "--embeddings", str(out), "--exact"]
    assert run_cli(cum.cli_main, command) == 0
    row = pq.read_table(out).to_pylist()[0]
    width = networks.staged(checkpoint.networks()[0]).head[-1].in_features
    assert row["class_id"] == answer.class_id and len(row["embedding"]) == FOLDS * width
    gradcam_answer, heatmap = cum.grad_cam(image, trained)
    assert gradcam_answer.class_id == answer.class_id and heatmap.shape == (32, 32)
    with TestClient(create_app(trained.parent)) as client:
        api = client.post("/api/predict", files={"file": ("red.png", png_bytes(image))}).json()
        page = client.post("/upload-file/", files={"file": ("red.png", png_bytes(image))})
    assert api["class_id"] == answer.class_id and page.status_code == 200


def test_init_from_a_committee_starts_one_model_from_its_first_member_and_a_committee_by_member(
    trained: Path, three_colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = models.read_checkpoint(trained).member_weights()
    started: list[dict[str, torch.Tensor]] = []
    real_start_from = fitting.start_from

    def recording(run, weights, source):  # what each run was started from
        started.append(weights)
        real_start_from(run, weights, source)

    monkeypatch.setattr(fitting, "start_from", recording)
    one = args(three_colours, tmp_path / "one.pth", "--init-from", str(trained))
    one[one.index("--folds") + 1] = "1"  # one model
    assert run_cli(cnn.main, one) == 0
    assert all(torch.equal(started[0][name], members[0][name]) for name in members[0])
    assert run_cli(cnn.main, args(three_colours, tmp_path / "again.pth", "--init-from", str(trained))) == 0
    for k in range(FOLDS):
        assert all(torch.equal(started[1 + k][name], members[k][name]) for name in members[k])


def test_a_killed_committee_resumes_keeping_its_finished_members(
    three_colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model_path = tmp_path / "c.pth"
    real_train_one_epoch = training.train_one_epoch
    epochs: list[int] = []

    def killed_in_the_second_member(run, epoch):
        epochs.append(epoch)
        if len(epochs) == 4:  # member 2's second epoch (each trains 2)
            raise KeyboardInterrupt
        return real_train_one_epoch(run, epoch)

    monkeypatch.setattr(training, "train_one_epoch", killed_in_the_second_member)
    assert run_cli(cnn.main, args(three_colours, model_path, "--epochs", "2")) == 130
    monkeypatch.undo()
    assert committee.member_path(model_path, 0).is_file()
    assert models.resume_path(committee.member_path(model_path, 1)).is_file()
    capsys.readouterr()
    assert run_cli(cnn.main, ["--model-path", str(model_path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "member 1 of 3" not in out and "member 2 of 3" in out and "resuming after epoch 1 of 2" in out
    assert models.read_record(model_path).members == FOLDS
