"""equivariant.py: group convolutions over the 8 symmetries of the square, tested against turning and
mirroring the input, and `--arch d4resnet18`, whose answer is the same for an image in any of its 8
orientations, through the model users get (float32 and bfloat16)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnn_use_model as cum
from galaxy10 import equivariant, inference, models, networks
from galaxy10.dataset import CLASS_NAMES
from galaxy10.preprocessing import Preprocessing, to_model_input

from helpers import galaxy_array

pytestmark = pytest.mark.usefixtures("cpu_inference")


def turned_fields(fields: torch.Tensor, u: int) -> torch.Tensor:
    """What symmetry u does to a group convolution's output: field orientation g becomes orientation u.g's
    place, each map turned by u (L_u y_{u^-1 g})."""
    n, channels, h, w = fields.shape
    planes = fields.view(n, channels // 8, 8, h, w)
    inverse_times = equivariant.group_table()[u]  # g -> u^-1 g
    return torch.stack([equivariant.transform(planes[:, :, inverse_times[g]], u) for g in range(8)], dim=2
                       ).view(n, channels, h, w)


def test_the_eight_symmetries_form_the_group_of_the_square() -> None:
    table = equivariant.group_table()
    assert all(sorted(row) == list(range(8)) for row in table)  # each g^-1 h once: a group's table
    assert [table[g][g] for g in range(8)] == [0] * 8  # g^-1 g is the identity
    probe = torch.arange(16.0).view(4, 4)
    assert len({tuple(equivariant.transform(probe, g).flatten().tolist()) for g in range(8)}) == 8


@pytest.mark.parametrize("u", range(8))
def test_lifting_and_group_convolutions_turn_with_their_input(u: int) -> None:
    torch.manual_seed(u)
    lift = equivariant.LiftingConv(3, 4, 5).double()
    conv = equivariant.GroupConv(4, 5, 3).double()
    image = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    fields = lift(image)
    torch.testing.assert_close(lift(equivariant.transform(image, u)), turned_fields(fields, u))
    torch.testing.assert_close(conv(turned_fields(fields, u)), turned_fields(conv(fields), u))


@torch.no_grad()
def test_folding_the_field_norms_changes_no_answer() -> None:
    torch.manual_seed(0)
    model = networks.build_model(networks.D4_ARCH, 10, 64).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # fresh ones are the identity, which would hide a fault
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 64, 64)
    body, head = networks.split_at_last_conv(model)
    folded = networks.fold_batchnorm(body)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(head(folded(x)), model(x), rtol=1e-4, atol=1e-3)


def d4_checkpoint(path: Path, size: int = 32) -> Path:
    """A random d4resnet18 whose output layer spreads the logits over a few units, as a trained model's."""
    torch.manual_seed(0)
    model = networks.build_model(networks.D4_ARCH, len(CLASS_NAMES), size).eval()
    probe = torch.from_numpy(np.stack([galaxy_array(s, size) for s in range(16)])).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = model(to_model_input(probe))
        mean = logits.mean(0)
        scale = 3.0 / (logits - mean).std()
        model.classifier[-1].weight.mul_(scale)
        model.classifier[-1].bias.copy_(-mean * scale)
    record = models.ModelRecord(networks.D4_ARCH, CLASS_NAMES, Preprocessing(size))
    models.Checkpoint(record, model.state_dict()).save(path)
    return path


@pytest.fixture
def bf16_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bfloat16 pass on any CPU (emulated where the CPU lacks it), with a model cache of its own."""
    monkeypatch.setattr(inference, "native_bf16", lambda device: device.type == "cpu")
    monkeypatch.setattr(inference, "_models", inference.FileCache())


@pytest.mark.slow  # trains a model or runs the network many times
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_d4_networks_answer_is_the_same_in_every_orientation(
    tmp_path: Path, precision: str, request: pytest.FixtureRequest
) -> None:
    """The same class, and probabilities within 0.02 in bfloat16 (float32: rounding), for 6 images in each of
    the 8 flips and quarter turns, through cnn_use_model's prepared model."""
    if precision == "bf16":
        request.getfixturevalue("bf16_everywhere")
    ckpt = d4_checkpoint(tmp_path / "d4.pth")
    images = [galaxy_array(seed) for seed in range(6)]
    answers = {g: cum.predict_batch([np.ascontiguousarray(equivariant.transform(torch.from_numpy(a).permute(
        2, 0, 1), g).permute(1, 2, 0).numpy()) for a in images], ckpt, exact=precision == "fp32")
        for g in range(8)}
    assert len({p.class_id for p in answers[0]}) > 1, "the images should not all get one class"
    for g in range(1, 8):
        assert [p.class_id for p in answers[g]] == [p.class_id for p in answers[0]]
        gap = np.abs(np.array([p.probabilities for p in answers[g]]) - [p.probabilities for p in answers[0]])
        assert gap.max() < (0.02 if precision == "bf16" else 1e-4), (g, gap.max())


def test_a_d4_models_grad_cam_turns_with_the_image(tmp_path: Path) -> None:
    ckpt = d4_checkpoint(tmp_path / "d4.pth")
    image = galaxy_array(3)
    prediction, heatmap = cum.grad_cam(Image.fromarray(image), ckpt)
    assert prediction.class_id == cum.predict(image, ckpt, exact=True).class_id
    assert heatmap.shape == (32, 32) and heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)
    turned = np.ascontiguousarray(np.rot90(image))  # a quarter turn, counter-clockwise
    _, turned_heatmap = cum.grad_cam(Image.fromarray(turned), ckpt)
    assert np.abs(turned_heatmap - np.rot90(heatmap)).max() < 1e-3
