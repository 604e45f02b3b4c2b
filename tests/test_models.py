"""models.py: the networks, preprocessing and the checkpoint format (the original project's included),
and the layout rule that the shared modules and inference never import the training script."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load, original_layout, same_weights, save_original_checkpoint

import models
from galaxy10 import CLASS_NAMES, Galaxy10Error

SCRIPTS = {"load_data", "preprocess_and_balancing", "sample_data", "cnn", "cnn_use_model", "main"}


# ---------------------------------------------------------------- the networks


def test_model_has_the_original_size_and_takes_other_sizes() -> None:
    assert sum(p.numel() for p in models.CNNModel().parameters()) == 76_091_946
    for size in (32, 64, 96):
        assert models.CNNModel(10, size).eval()(torch.zeros(2, 3, size, size)).shape == (2, 10)
    with pytest.raises(ValueError, match="multiple of 32"):
        models.CNNModel(10, 48)


def head_signal(model: models.CNNModel, x: torch.Tensor) -> list[float]:
    """RMS of the classifier's input, then of each of its Linear layers' outputs (the last: the logits)."""
    h = torch.flatten(model.features(x), 1)
    rms = [h.pow(2).mean().sqrt().item()]
    for layer in model.classifier[1:]:
        h = layer(h)
        if isinstance(layer, torch.nn.Linear):
            rms.append(h.pow(2).mean().sqrt().item())
    return rms


@pytest.mark.parametrize("size", [32, 64])
@torch.no_grad()
def test_the_default_initialisation_keeps_the_heads_signal_and_the_original_loses_it(size: int) -> None:
    torch.manual_seed(0)
    x = torch.rand(16, 3, size, size)
    default = head_signal(models.CNNModel(10, size, head_init="kaiming").eval(), x)
    original = head_signal(models.CNNModel(10, size).eval(), x)
    # Kaiming's fan-in scaling keeps a ReLU layer's second moment (He et al. 2015); over 16 images and
    # random weights each hidden layer stays within 2x of the head's input.
    assert all(0.5 < rms / default[0] < 2 for rms in default[1:-1])
    # The output layer stays N(0, 0.01): logits about 0.01 x sqrt(32) = 0.06 of the last hidden layer,
    # small enough for near-uniform first predictions, large enough not to vanish.
    assert 0.01 < default[-1] / default[-2] < 0.2
    # The original's N(0, 0.01) hidden layers shrink the signal over a thousandfold before the logits.
    assert original[-1] / original[0] < 1e-3


# ---------------------------------------------------------------- checkpoints


def test_an_original_checkpoint_loads_as_one_of_this_projects(
    original_model: models.CNNModel, tmp_path: Path
) -> None:
    path = save_original_checkpoint(tmp_path / "model.pth", original_model.state_dict(), val_acc=0.84)
    assert "features.2.0.weight" in load(path)["model_state_dict"]  # the original's nested names
    checkpoint = models.load_checkpoint(path)
    assert checkpoint["source"] == "original" and checkpoint["architecture"] == models.ARCHITECTURE
    assert (checkpoint["image_size"], checkpoint["class_names"]) == (32, list(CLASS_NAMES))
    assert checkpoint["preprocessing"] == models.PREPROCESSING
    assert (checkpoint["epoch"], checkpoint["final_val_acc"]) == (1, 0.84)
    assert same_weights(checkpoint["model_state_dict"], original_model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(models.model_from_checkpoint(checkpoint)(x), original_model.eval()(x))


@pytest.mark.parametrize("size", [256, 64])
def test_the_first_linear_layers_width_gives_the_image_size(size: int) -> None:
    with torch.device("meta"):  # shapes only: a 256 px model would take 304 MB
        state = original_layout(models.CNNModel(image_size=size).state_dict())
    assert state["classifier.1.weight"].shape[1] == 512 * (size // 32) ** 2  # 32768 at 256 px
    checkpoint = models.from_original_checkpoint({"epoch": 3, "model_state_dict": state})
    assert checkpoint is not None and checkpoint["image_size"] == size


def test_weights_that_do_not_fit_the_recorded_model_are_a_user_error(tmp_path: Path) -> None:
    """A file that says 32 px but holds a 64 px model's weights: one clear error, as the web page's 503
    and the scripts' one line need, not a RuntimeError from load_state_dict."""
    path = tmp_path / "mislabelled.pth"
    models.save_checkpoint({**models.checkpoint_metadata(32),
                            "model_state_dict": models.CNNModel(image_size=64).state_dict()}, path)
    with pytest.raises(Galaxy10Error, match="do not fit a 32 px DeepCNN-5Block with 10 classes"):
        models.model_from_checkpoint(models.load_checkpoint(path))


# ---------------------------------------------------------------- which module imports which


def loaded_by(module: str) -> set[str]:
    """Every module that importing `module` loads, in a fresh interpreter."""
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(done.stdout.split())


@pytest.mark.parametrize(("module", "forbidden"), [
    ("models", SCRIPTS),
    ("distributed", SCRIPTS),
    ("catalog", SCRIPTS | {"models"}),  # it is given the classifying function instead
    ("cnn_use_model", {"cnn"}),
    ("main", {"cnn"}),
])
def test_shared_modules_import_no_script_and_inference_never_the_training_script(
    module: str, forbidden: set[str]
) -> None:
    assert loaded_by(module) & forbidden == set()
