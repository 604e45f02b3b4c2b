"""trust.py and what carries it: calibration by temperature, entropy and margin, the unlike-training flag,
their place in the checkpoint's record, in every prediction, and `cnn.py --calibrate`."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnn
import cnn_use_model as cum
from galaxy10 import models, networks, preprocessing, trust
from galaxy10.dataset import CLASS_NAMES
from galaxy10.errors import run_cli

from helpers import (
    aged,
    colour_folders,
    file_stamp,
    galaxy_array,
    save_original_checkpoint,
    spread_checkpoint,
)

pytestmark = pytest.mark.usefixtures("cpu_inference", "one_torch_thread")


# ---------------------------------------------------------------- the measures


def test_the_fitted_temperature_undoes_a_known_overconfidence() -> None:
    """Labels drawn from softmax(logits / 2): the model is overconfident by a factor 2, which the fit finds,
    and the negative log-likelihood drops."""
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4000, 10, generator=generator)
    labels = torch.multinomial((logits / 2).softmax(1), 1, generator=generator).squeeze(1)
    temperature = trust.fit_temperature(logits, labels)
    assert temperature == pytest.approx(2.0, rel=0.1)
    assert trust.nll(logits, labels, temperature) < trust.nll(logits, labels) - 0.05


def test_a_validation_set_without_errors_does_not_make_every_answer_certain() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    assert trust.fit_temperature(logits, torch.tensor([0, 1, 0])) == trust.TEMPERATURE_RANGE[0]


def test_entropy_and_margin_span_certain_to_uniform() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.7, 0.2, 0.1]])
    entropy, margin = trust.entropy(probs), trust.margin(probs)
    assert entropy.tolist() == pytest.approx([0.0, 1.0, 0.7298], abs=1e-4)
    assert margin.tolist() == pytest.approx([1.0, 0.0, 0.5])


def test_outliers_flag_the_share_asked_of_validation_and_far_images() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat(200)
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])

    def galaxies(n: int) -> list[torch.Tensor]:  # two feature spaces, as a network's stages give them
        return [centres[labels[:n]] + torch.randn(n, 4, generator=generator),
                torch.randn(n, 6, generator=generator)]

    train, val = galaxies(600), galaxies(300)
    outliers = trust.fit_outliers(train, labels, val, flagged_share=0.05)
    assert outliers.unlike(val).float().mean().item() == pytest.approx(0.05, abs=0.01)
    far = [20 * torch.randn(100, 4, generator=generator), 20 * torch.randn(100, 6, generator=generator)]
    assert outliers.unlike(far).float().mean().item() > 0.9
    # Far in one space only (the early stages see noise that the penultimate features miss): still flagged.
    assert outliers.unlike([far[0], galaxies(100)[1]]).float().mean().item() > 0.9
    assert outliers.unlike([galaxies(100)[0], far[1]]).float().mean().item() > 0.9
    usual = [centres, torch.zeros(3, 6)]  # the class means themselves are as usual as it gets
    assert not outliers.unlike(usual).any()
    # Given more spaces than it was fitted on, it scores the last ones: a record with the penultimate
    # features' statistics only (an older checkpoint) works with a network that gives every stage's.
    penultimate_only = trust.fit_outliers(train[1:], labels, val[1:], flagged_share=0.05)
    assert torch.equal(penultimate_only.unlike(far), penultimate_only.unlike(far[1:]))


def test_statistics_fitted_on_the_validation_images_alone_do_not_flag_new_images_like_them() -> None:
    """--calibrate has no training images: 80 images in 60 dimensions lie far closer to the Gaussian fitted
    on them than new images from the same distribution do, so a threshold set on them in-sample flags most
    new images; cross-fitted, about the share asked."""
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(2).repeat(40)

    def images(n: int) -> list[torch.Tensor]:
        return [torch.randn(n, 60, generator=generator) + labels[:n, None] * 2.0]

    val, new = images(80), images(80)
    in_sample = trust.fit_outliers(val, labels, val, flagged_share=0.05)
    assert in_sample.unlike(new).float().mean() > 0.5
    cross_fitted = trust.fit_outliers_on_val(val, labels, flagged_share=0.05)
    assert cross_fitted.unlike(new).float().mean() < 0.2
    assert cross_fitted.unlike([40 * torch.randn(20, 60, generator=generator)]).all()


def test_a_record_from_before_the_feature_ensemble_flags_as_it_did(tmp_path: Path) -> None:
    """Its penultimate Gaussian and threshold on the distance: the same images flagged as then."""
    generator = torch.Generator().manual_seed(2)
    labels = torch.arange(2).repeat(50)
    features = torch.randn(100, 5, generator=generator) + labels[:, None] * 3.0
    space = trust.fit_gaussian(features, labels)
    images = torch.randn(200, 5, generator=generator) * 2
    old_threshold = float(torch.quantile(space.distance(features), 0.9))
    saved = {"means": space.means, "precision": space.precision, "threshold": old_threshold}
    record = models.ModelRecord.from_dict({**models.read_checkpoint(spread_checkpoint(
        tmp_path / "m.pth", size=32)).record.to_dict(), "outliers": saved})
    assert record.outliers is not None
    assert torch.equal(record.outliers.unlike([images]), space.distance(images) > old_threshold)


@pytest.mark.parametrize(("confidence", "unlike", "flag"), [
    (0.9, False, "ok"), (0.3, False, "uncertain"), (0.9, True, "unlike-training"),
    (0.3, True, "unlike-training"), (0.9, None, "ok"), (0.3, None, "uncertain"),
])
def test_the_flag(confidence: float, unlike: bool | None, flag: str) -> None:
    assert trust.flag(confidence, unlike) == flag


# ---------------------------------------------------------------- in predictions


def calibrated_copy(source: Path, path: Path, temperature: float, outliers: trust.Outliers | None) -> Path:
    checkpoint = models.read_checkpoint(source)
    checkpoint.record = dataclasses.replace(checkpoint.record, temperature=temperature, outliers=outliers)
    checkpoint.save(path)
    return path


def features_of(path: Path, images: list[np.ndarray]) -> list[torch.Tensor]:
    """The plain float32 model's features of these images, per space (what the statistics are fitted on)."""
    from galaxy10 import networks

    checkpoint = models.read_checkpoint(path)
    network = networks.staged(checkpoint.model().eval())
    batch = torch.stack([checkpoint.record.preprocessing(Image.fromarray(a)) for a in images])
    with torch.no_grad():
        return network(preprocessing.to_model_input(batch))[0]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return spread_checkpoint(tmp_path_factory.mktemp("trust") / "plain.pth", size=64, centred=False)


def test_every_prediction_is_calibrated_by_the_records_temperature(plain: Path, tmp_path: Path) -> None:
    hot = calibrated_copy(plain, tmp_path / "hot.pth", 3.0, None)
    images = [galaxy_array(seed, 64) for seed in range(6)]
    for exact in (True, False):
        before = torch.tensor([p.probabilities for p in cum.predict_batch(images, plain, exact=exact)])
        after = torch.tensor([p.probabilities for p in cum.predict_batch(images, hot, exact=exact)])
        # softmax(z / 3) from softmax(z): the same classes, every answer less sure.
        expected = (before.log() / 3).softmax(1)
        torch.testing.assert_close(after, expected, rtol=0, atol=2e-3 if not exact else 1e-6)
        assert torch.equal(after.argmax(1), before.argmax(1))
        assert (after.max(1).values < before.max(1).values).all()
    single = cum.predict(images[0], hot, exact=True)
    batch_of_one = cum.predict_batch(images[:1], hot, exact=True)[0]
    assert single.probabilities == pytest.approx(batch_of_one.probabilities, abs=1e-6)
    tta = cum.predict(images[0], hot, tta=True, exact=True)
    assert max(tta.probabilities) < max(cum.predict(images[0], plain, tta=True, exact=True).probabilities)


@pytest.mark.slow  # trains a model or runs the network many times
def test_images_far_from_the_training_features_are_flagged_in_every_output(
    plain: Path, tmp_path: Path
) -> None:
    galaxies = [galaxy_array(seed, 64) for seed in range(40)]
    features = features_of(plain, galaxies)
    labels = torch.zeros(len(galaxies), dtype=torch.long)
    outliers = trust.fit_outliers(features, labels, features, flagged_share=0.05)
    path = calibrated_copy(plain, tmp_path / "flagging.pth", 1.0, outliers)
    noise = [np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8) for seed in range(8)]
    far = features_of(plain, noise)
    assert outliers.unlike(far).all(), "the test's noise images must lie far from the galaxies"
    predictions = cum.predict_batch(galaxies[:10] + noise, path, exact=True)
    assert [p.flag for p in predictions[10:]] == ["unlike-training"] * 8
    assert sum(p.flag == "unlike-training" for p in predictions[:10]) <= 2
    assert cum.predict(noise[0], path).flag == "unlike-training"  # the bfloat16 path where the CPU has it
    assert cum.grad_cam(noise[0], path)[0].flag == "unlike-training"
    # Without the statistics (an older checkpoint), nothing is flagged unlike-training.
    assert all(p.flag != "unlike-training" for p in cum.predict_batch(noise, plain, exact=True))
    out = tmp_path / "out.csv"
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(noise[:3]):
        Image.fromarray(image).save(folder / f"noise{i}.png")
    assert run_cli(cum.cli_main, [str(folder), "--model", str(path), "--csv", str(out)]) == 0
    assert out.read_text().count("unlike-training") == 3


def test_min_confidence_moves_answers_between_ok_and_uncertain(plain: Path, tmp_path: Path) -> None:
    images = [galaxy_array(seed, 64) for seed in range(8)]
    confident = cum.predict_batch(images, plain, min_confidence=0.0)
    doubtful = cum.predict_batch(images, plain, min_confidence=1.0)
    assert {p.flag for p in confident} == {"ok"} and {p.flag for p in doubtful} == {"uncertain"}
    with pytest.raises(SystemExit) as refused:  # argparse's usage error, as for every other flag
        cum.cli_main([str(tmp_path), "--model", str(plain), "--min-confidence", "2"])
    assert refused.value.code == 2


# ---------------------------------------------------------------- fitted by training and by --calibrate


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    colour_folders(root / "train", classes=("0", "1"), per_class=8, seed=0)
    colour_folders(root / "val", classes=("0", "1"), per_class=4, seed=1)
    return root


@pytest.mark.slow
def test_training_calibrates_and_reports_before_and_after(folders: Path, tmp_path: Path) -> None:
    model_path = tmp_path / "m.pth"
    args = ["--train-dir", str(folders / "train"), "--val-dir", str(folders / "val"), "--model-path",
            str(model_path), "--image-size", "32", "--batch-size", "4", "--epochs", "2", "--num-classes", "2",
            "--workers", "1", "--device", "cpu", "--precision", "fp32"]
    assert run_cli(cnn.main, args) == 0
    record = models.read_record(model_path)
    report = json.loads(models.output_path(model_path, "report.json").read_text())
    calibration = report["calibration"]
    assert record.temperature == calibration["temperature"] and record.outliers is not None
    assert record.outliers.threshold == calibration["outlier_threshold"]
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-9
    assert report["ece"] == pytest.approx(calibration["ece_after"])
    assert 0 <= calibration["val_flagged_unlike_training"] <= 0.25  # 1 of 8 validation images at most


@pytest.mark.slow  # trains a model or runs the network many times
def test_calibrate_writes_a_new_file_and_never_rewrites_the_original(
    original_model: networks.CNNModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    val = tmp_path / "val"
    colour_folders(val, classes=tuple(str(c) for c in range(10)), per_class=2, seed=3)
    original = aged(save_original_checkpoint(tmp_path / "model.pth", original_model.state_dict()))
    before = file_stamp(original)
    assert models.read_record(original).outliers is None  # the original's: no statistics, no such flag
    args = ["--calibrate", "--model-path", str(original), "--val-dir", str(val), "--device", "cpu",
            "--workers", "1"]
    assert run_cli(cnn.main, args) == 0
    assert file_stamp(original) == before
    calibrated = tmp_path / "model.calibrated.pth"
    record = models.read_record(calibrated)
    assert record.source == "original" and record.outliers is not None and record.temperature > 0
    weights = models.read_checkpoint(calibrated).weights
    assert all(torch.equal(weights[k], v) for k, v in models.read_checkpoint(original).weights.items())
    assert f"wrote {calibrated}" in capsys.readouterr().out
    prediction = cum.predict(galaxy_array(0), calibrated)
    assert prediction.flag in trust.FLAGS and math.isfinite(prediction.entropy)
    assert record.class_names == CLASS_NAMES


# ---------------------------------------------------------------- a run that learned nothing says so


@pytest.mark.slow  # trains a model or runs the network many times
def test_a_run_that_learned_nothing_says_it_against_the_baselines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One noisy square under both names, 3 of one class and 1 of the other to validate on: nothing to learn,
    so the last lines set the model against always answering the larger class, with a warning."""
    colour_folders(tmp_path / "train", per_class=4, seed=0, same=True)
    (tmp_path / "val").mkdir()
    colour_folders(tmp_path / "val_a", per_class=3, seed=1, same=True)
    (tmp_path / "val_a" / "0").rename(tmp_path / "val" / "0")
    colour_folders(tmp_path / "val_b", per_class=1, seed=2, same=True)
    (tmp_path / "val_b" / "1").rename(tmp_path / "val" / "1")
    model_path = tmp_path / "m.pth"
    args = ["--train-dir", str(tmp_path / "train"), "--val-dir", str(tmp_path / "val"), "--model-path",
            str(model_path), "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--workers", "1",
            "--device", "cpu", "--precision", "fp32"]
    assert run_cli(cnn.main, args) == 0
    captured = capsys.readouterr()
    report = json.loads(models.output_path(model_path, "report.json").read_text())
    assert report["baselines"] == {"majority_class": 0, "majority_accuracy": 0.75,
                                   "majority_macro_f1": pytest.approx(2 * 0.75 / 1.75 / 2),
                                   "chance_accuracy": 0.5}
    (warning,) = [line for line in captured.err.splitlines() if line.startswith("warning: the model")]
    assert "always answering 0 scores 75.00%" in warning


def test_calibration_that_makes_the_ece_worse_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """Fitting T minimises the likelihood, which can leave a few images' ECE worse: a warning, not silence."""
    from galaxy10.evaluation import calibration_report

    logits = torch.tensor([[-2.4, 1.3, -2.9], [-2.7, -1.0, 0.3], [0.7, 0.7, 2.1], [1.7, 0.2, -1.2],
                           [-0.6, 0.1, 1.7], [-0.1, -1.9, 1.1], [-1.3, -3.6, 1.2], [2.1, -1.6, 0.5]])
    labels = torch.tensor([1, 2, 1, 0, 1, 2, 1, 0])
    temperature = trust.fit_temperature(logits, labels)
    calibration = calibration_report(logits, labels, temperature, 0.0)
    err = capsys.readouterr().err
    worse = calibration["ece_after"] > calibration["ece_before"]
    assert worse == ("warning: calibration made the ECE worse" in err)
    assert worse, calibration  # this case is built to: the likelihood's T is not the ECE's
