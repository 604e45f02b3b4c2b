"""models.py: the networks, preprocessing and the checkpoint format (the original project's included),
and the layout rule that the shared modules and inference never import the training script."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from galaxy10 import models, networks, preprocessing
from galaxy10.dataset import CLASS_NAMES
from galaxy10.errors import Galaxy10Error

from helpers import ROOT, load, original_layout, same_weights, save_original_checkpoint, unsafe_checkpoint

SCRIPTS = {"load_data", "preprocess_and_balancing", "sample_data", "cnn", "cnn_use_model", "main"}
# the training script and the package's training modules
TRAINING = {"cnn", *(f"galaxy10.{name}" for name in ("config", "data", "augment", "training", "run",
                                                     "fitting", "evaluation"))}
# Keys of a checkpoint file: only models.py reads them.
# (Those that other dictionaries share, such as a report's class_names, are left out.)
CHECKPOINT_KEYS = {"model_state_dict", "optimizer_state_dict", "train_history", "architecture", "image_size",
                   "num_classes", "preprocessing", "final_val_acc", "final_val_loss", "epochs_trained",
                   "trained_on", "scheduler_state_dict", "rng_per_process", "temperature", "outliers"}


# ---------------------------------------------------------------- the networks


def test_model_has_the_original_size_and_takes_other_sizes() -> None:
    assert sum(p.numel() for p in networks.CNNModel().parameters()) == 76_091_946
    for size in (32, 64, 96):
        assert networks.CNNModel(10, size).eval()(torch.zeros(2, 3, size, size)).shape == (2, 10)
    with pytest.raises(ValueError, match="multiple of 32"):
        networks.CNNModel(10, 48)


def randomised_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """The model in eval mode with BatchNorm statistics and scales a trained model might have (fresh ones
    are the identity, which would hide a wrong fold)."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.uniform_(-0.2, 0.2, generator=generator)
    return model.eval()


@pytest.mark.parametrize("arch", list(networks.ARCHITECTURES))
@torch.no_grad()
def test_every_network_splits_where_grad_cam_looks_and_folds_its_batchnorm(arch: str) -> None:
    torch.manual_seed(0)
    model = randomised_batchnorm(networks.build_model(arch, 10, 64))
    x = torch.rand(2, 3, 64, 64)
    body, head = networks.split_at_last_conv(model)
    activation = body(x)
    assert activation.dim() == 4 and activation.shape[2:] in ((2, 2), (4, 4))  # a convolutional stage's map
    torch.testing.assert_close(head(activation), model(x), rtol=0, atol=0)
    folded = networks.fold_batchnorm(body)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(head(folded(x)), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", list(networks.ARCHITECTURES))
@torch.no_grad()
def test_the_staged_network_gives_every_scales_features_and_the_models_logits(arch: str) -> None:
    """A feature per resolution, its channels averaged, then the penultimate features; asked for fewer
    (a record scoring fewer spaces), the last ones, the same numbers, from fewer cuts."""
    torch.manual_seed(0)
    model = randomised_batchnorm(networks.build_model(arch, 10, 64))
    x = torch.rand(2, 3, 64, 64)
    network = networks.staged(model)
    features, logits = network(x)
    torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)
    assert len(features) == len(network.stages) >= 4  # DeepCNN-5Block: 5 resolutions
    assert features[-1].shape == (2, network.head[-1].in_features)
    first = network.stages[0](x).mean(dim=(2, 3))  # a D4 network's fields: their orientations averaged too
    first = first.view(len(first), -1, network.orientations).mean(2)
    torch.testing.assert_close(features[0], first, rtol=1e-5, atol=1e-6)
    for count in (1, 3):
        fewer, fewer_logits = networks.staged(model, features=count)(x)
        assert len(fewer) == count
        for ours, full in zip(fewer, features[-count:], strict=True):
            torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fewer_logits, logits, rtol=1e-5, atol=1e-5)


def test_a_torchvision_network_is_torchvisions_own_after_imagenet_normalisation() -> None:
    torch.manual_seed(0)
    ours = networks.build_model("resnet18", 10, 64).eval()
    theirs = torchvision.models.get_model("resnet18", num_classes=10).eval()
    theirs.load_state_dict(ours.net.state_dict())
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(networks.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(networks.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(ours(x), theirs((x - mean) / std))
    # mean and std come from the checkpoint's preprocessing, so they are not among the weights
    assert set(ours.state_dict()) == {f"net.{key}" for key in theirs.state_dict()}


def test_an_unknown_architecture_is_one_line_listing_the_choices() -> None:
    with pytest.raises(Galaxy10Error, match="unknown --arch 'vgg16'; choose one of: deepcnn5, resnet18"):
        networks.architecture("vgg16")


def head_signal(model: networks.CNNModel, x: torch.Tensor) -> list[float]:
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
    default = head_signal(networks.CNNModel(10, size, head_init="kaiming").eval(), x)
    original = head_signal(networks.CNNModel(10, size).eval(), x)
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
    original_model: networks.CNNModel, tmp_path: Path
) -> None:
    path = save_original_checkpoint(tmp_path / "model.pth", original_model.state_dict(), val_acc=0.84)
    assert "features.2.0.weight" in load(path)["model_state_dict"]  # the original's nested names
    checkpoint = models.read_checkpoint(path)
    record = checkpoint.record
    assert record.source == "original" and record.title == networks.ARCHITECTURE and record.arch == "deepcnn5"
    assert (record.image_size, record.class_names, record.crop) == (32, CLASS_NAMES, 1.0)
    assert record.preprocessing == preprocessing.Preprocessing(32) and record.recipe == "original"
    assert (record.metrics.epoch, record.metrics.val_acc) == (1, 0.84)
    assert checkpoint.training is not None and checkpoint.training.history["val_acc"] == [0.84]
    assert same_weights(checkpoint.weights, original_model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(checkpoint.model()(x), original_model.eval()(x))
    # The raw dictionary of the file format, for those who read it: the original's keys, converted.
    raw = models.load_checkpoint(path)
    assert (raw["epoch"], raw["final_val_acc"], raw["architecture"]) == (1, 0.84, "DeepCNN-5Block")


def test_a_checkpoint_with_an_unsafe_pickle_is_refused_in_one_line_and_its_code_never_runs(
    tmp_path: Path
) -> None:
    path = unsafe_checkpoint(tmp_path / "bad.pth", tmp_path / "ran")
    with pytest.raises(Galaxy10Error) as refused:
        models.load_checkpoint(path)
    assert "bad.pth" in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "ran").exists()
    # The payload is real: loaded the unsafe way, it runs.
    torch.load(path, weights_only=False)
    assert (tmp_path / "ran").is_dir()


@pytest.mark.parametrize("size", [256, 64])
def test_the_first_linear_layers_width_gives_the_image_size(size: int) -> None:
    with torch.device("meta"):  # shapes only: a 256 px model would take 304 MB
        state = original_layout(networks.CNNModel(image_size=size).state_dict())
    assert state["classifier.1.weight"].shape[1] == 512 * (size // 32) ** 2  # 32768 at 256 px
    checkpoint = models.from_original_checkpoint({
        "epoch": 3, "model_state_dict": state, "optimizer_state_dict": {}, "train_history": {},
        "final_val_loss": 1.0, "final_val_acc": 0.5})
    assert checkpoint is not None
    assert models.Checkpoint.from_dict(checkpoint).record.image_size == size


@pytest.mark.parametrize("arch", ["deepcnn5", "resnet18", "convnext_tiny"])
def test_the_architecture_and_preprocessing_round_trip_through_a_checkpoint(
    arch: str, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    model = randomised_batchnorm(networks.build_model(arch, 3, 32))
    path = tmp_path / "m.pth"
    record = models.ModelRecord(arch, ("a", "b", "c"), preprocessing.Preprocessing.for_network(arch, 32, 0.6),
                                precision="bf16", recipe="default",
                                trained_on=models.TrainingData("data/train", 12, synthetic=True),
                                metrics=models.Metrics(epoch=3, val_loss=0.5, val_acc=0.75),
                                settings={"arch": arch, "learning_rate": 0.01})
    models.Checkpoint(record, model.state_dict()).save(path)
    checkpoint = models.read_checkpoint(path)
    assert checkpoint.record == record and checkpoint.record.settings == record.settings
    assert checkpoint.record.architecture == networks.ARCHITECTURES[arch] and checkpoint.record.crop == 0.6
    assert (checkpoint.record.preprocessing.mean is not None) == networks.ARCHITECTURES[arch].torchvision
    assert models.read_record(path) == record
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.model()(x), model(x), rtol=0, atol=0)


def test_older_checkpoints_load_into_the_record_with_what_they_did_not_record_unknown(tmp_path: Path) -> None:
    """A checkpoint written before the record (no crop, recipe, precision or training data): the whole frame,
    the original recipe, the precision its config gave, the training folder its config named."""
    path = tmp_path / "older.pth"
    torch.save({"architecture": "DeepCNN-5Block", "image_size": 32, "num_classes": 2,
                "class_names": ["a", "b"],
                "preprocessing": {"color": "RGB", "resize": "PIL bilinear", "scale": "uint8 / 255"},
                "config": {"precision": "fp32", "train_dir": "old/train"}, "epoch": 4, "best_epoch": 3,
                "final_val_acc": 0.5, "model_state_dict": networks.CNNModel(2, 32).state_dict()}, path)
    record = models.read_record(path)
    assert (record.crop, record.recipe, record.precision) == (1.0, "original", "fp32")
    assert record.trained_on == models.TrainingData("old/train")
    assert record.trained_on.describe() == "not recorded"
    assert (record.metrics.epoch, record.metrics.val_acc) == (3, 0.5)


def test_the_record_says_what_a_model_was_trained_on() -> None:
    assert models.TrainingData("d", 2380, True).describe() == "the built-in synthetic sample (2,380 images)"
    assert models.TrainingData("d", 460, False).describe() == "real images (460 images)"


def galaxy_frame(width: int = 90, height: int = 60) -> Image.Image:
    """A frame whose centre differs from its edges, so a crop shows."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_the_crop_keeps_the_central_square_of_the_shorter_side() -> None:
    frame = galaxy_frame()  # 90 x 60: the central 30 x 30 square at crop 0.5
    expected = frame.resize((32, 32), Image.BILINEAR, box=(30, 15, 60, 45))
    cropped = preprocessing.image_to_tensor(frame, 32, 0.5).permute(1, 2, 0).numpy()
    assert np.array_equal(cropped, np.asarray(expected))
    # crop 1 keeps the original's preprocessing: the whole frame, squashed to a square
    whole = frame.resize((32, 32), Image.BILINEAR)
    whole_input = preprocessing.image_to_tensor(frame, 32).permute(1, 2, 0).numpy()
    assert np.array_equal(whole_input, np.asarray(whole))
    with pytest.raises(Galaxy10Error, match="--crop"):
        preprocessing.check_crop(0.0)


# ---------------------------------------------------------------- --weights


def save_state_dict(path: Path, arch: str, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """A state-dict file as torchvision users save one: torch.save(model.state_dict(), path)."""
    torch.manual_seed(7)
    state = torchvision.models.get_model(arch, num_classes=num_classes).state_dict()
    torch.save(state, path)
    return state


def test_weights_from_a_state_dict_file_start_the_backbone_and_keep_a_new_classifier(tmp_path: Path) -> None:
    file = str(tmp_path / "resnet18.pth")
    state = save_state_dict(tmp_path / "resnet18.pth", "resnet18")
    torch.manual_seed(0)
    model = networks.build_model("resnet18", 10, 32)
    fresh_fc = model.net.fc.weight.clone()
    assert networks.load_pretrained(model, "resnet18", file) == file
    loaded = model.net.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items() if not key.startswith("fc."))
    assert model.net.fc.weight.shape == (10, 512) and torch.equal(model.net.fc.weight, fresh_fc)


def test_weights_of_another_network_are_a_user_error(tmp_path: Path) -> None:
    save_state_dict(tmp_path / "resnet50.pth", "resnet50")
    resnet18 = networks.build_model("resnet18", 10, 32)
    with pytest.raises(Galaxy10Error, match="does not hold resnet18's weights"):
        networks.load_pretrained(resnet18, "resnet18", str(tmp_path / "resnet50.pth"))
    with pytest.raises(Galaxy10Error, match="needs a torchvision network"):
        networks.load_pretrained(networks.build_model("deepcnn5", 10, 32), "deepcnn5", "imagenet")


def test_imagenet_weights_come_from_torchs_cache_and_offline_the_error_says_what_to_put_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise OSError("no route to host")  # what urllib raises without a network

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    model = networks.build_model("resnet18", 10, 32)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(Galaxy10Error, match=rf"put resnet18-f37072fd.pth \(from https://.*\) into {cache}"):
        networks.load_pretrained(model, "resnet18", "imagenet")
    cache.mkdir(parents=True, exist_ok=True)
    state = save_state_dict(cache / "resnet18-f37072fd.pth", "resnet18")  # as if downloaded once
    source = networks.load_pretrained(model, "resnet18", "imagenet")
    assert source == "imagenet (ResNet18_Weights.IMAGENET1K_V1)"
    assert torch.equal(model.net.conv1.weight, state["conv1.weight"])


def test_weights_that_do_not_fit_the_recorded_model_are_a_user_error(tmp_path: Path) -> None:
    """A file that says 32 px but holds a 64 px model's weights: one clear error, as the web page's 503
    and the scripts' one line need, not a RuntimeError from load_state_dict."""
    path = tmp_path / "mislabelled.pth"
    record = models.ModelRecord("deepcnn5", CLASS_NAMES, preprocessing.Preprocessing(32))
    models.Checkpoint(record, networks.CNNModel(image_size=64).state_dict()).save(path)
    with pytest.raises(Galaxy10Error, match="do not fit a 32 px DeepCNN-5Block with 10 classes"):
        models.read_checkpoint(path).model()


# ---------------------------------------------------------------- which module imports which


def loaded_by(module: str) -> set[str]:
    """Every module that importing `module` loads, in a fresh interpreter."""
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(done.stdout.split())


@pytest.mark.parametrize(("module", "forbidden"), [
    ("galaxy10.models", SCRIPTS | TRAINING),
    ("galaxy10.networks", SCRIPTS | TRAINING | {"galaxy10.models"}),
    ("galaxy10.distributed", SCRIPTS | TRAINING),
    ("galaxy10.reports", SCRIPTS | TRAINING),
    ("galaxy10.trust", SCRIPTS | TRAINING | {"galaxy10.models"}),
    ("galaxy10.images", SCRIPTS | TRAINING | {"galaxy10.models"}),
    ("galaxy10.inputs", SCRIPTS | TRAINING | {"galaxy10.models"}),
    # it is given the classifying function instead of the model code
    ("galaxy10.catalog", SCRIPTS | TRAINING | {"galaxy10.models", "galaxy10.inference"}),
    ("cnn_use_model", TRAINING | SCRIPTS - {"cnn_use_model"}),
    ("main", TRAINING | SCRIPTS - {"main"}),
])
@pytest.mark.slow
def test_shared_modules_import_no_script_and_inference_never_the_training_script(
    module: str, forbidden: set[str]
) -> None:
    assert loaded_by(module) & forbidden == set()


def test_no_source_file_but_models_reads_a_checkpoints_keys() -> None:
    """What a checkpoint holds is read through models.ModelRecord and models.Checkpoint only: no other
    module of the project indexes a dictionary by a checkpoint's key."""
    import ast

    found = []
    for path in sorted([*ROOT.glob("*.py"), *ROOT.glob("galaxy10/*.py")]):
        if path.relative_to(ROOT).as_posix() == "galaxy10/models.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            key = node.slice if isinstance(node, ast.Subscript) else None
            call = node.func if isinstance(node, ast.Call) else None
            if isinstance(call, ast.Attribute) and call.attr == "get" and node.args:
                key = node.args[0]
            if isinstance(key, ast.Constant) and key.value in CHECKPOINT_KEYS:
                found.append(f"{path.name}:{node.lineno} {key.value}")
    assert found == []
