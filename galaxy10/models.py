"""What a model is: one typed record (`ModelRecord`) of a checkpoint's network, image size, crop, classes,
preprocessing, precision, what it was trained on and how well it did, and the checkpoint file that holds it
with its weights (`Checkpoint`). Training, inference and the web page all read checkpoints through here, and
nothing else reads a checkpoint's keys.

`read_checkpoint` reads this project's checkpoints, older ones included, and the original project's
(converted in memory, never rewritten), with `torch.load(weights_only=True)`; `read_record` reads only the
record; `Checkpoint.save` writes atomically. `load_checkpoint` gives the raw dictionary (the file format) for
those who want it. The files beside a checkpoint are named by `output_path`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from galaxy10.dataset import CLASS_NAMES
from galaxy10.errors import Galaxy10Error
from galaxy10.files import atomic_path
from galaxy10.networks import (
    ARCHITECTURE,
    ARCHITECTURES,
    CHANNELS,
    DEFAULT_ARCH,
    Architecture,
    CNNModel,
    build_model,
    by_title,
)
from galaxy10.preprocessing import Preprocessing
from galaxy10.trust import CommitteeOutliers, Gaussian, Outliers, Trust

PRECISIONS_RUN = ("fp32", "bf16")  # what a training run computed in
# The original project's checkpoints (its model.pth and based_on_balanced_data_model.pth) hold exactly
# these keys: no architecture record, and weights named after its nested blocks.
ORIGINAL_KEYS = frozenset(
    {"epoch", "model_state_dict", "optimizer_state_dict", "train_history", "final_val_loss", "final_val_acc"}
)
# The original's features were Sequential(block, MaxPool2d, block, MaxPool2d, ...), each block a
# Sequential of 3 x (Conv2d, BatchNorm2d, ReLU), so its weights are `features.<2 x block>.<layer>.<param>`.
NESTED_FEATURE = re.compile(r"(features\.(\d+)\.(\d+))\.\w+")
RESUME_KIND = "resume.pth"
DEFAULT_CHECKPOINT = "based_on_balanced_data_model.pth"  # what cnn.py writes and the others read by default


# ---------------------------------------------------------------- what a model is


@dataclass(frozen=True)
class TrainingData:
    """What a model was trained on: the training folder, its image count, and whether it was the built-in
    synthetic sample (sample_data.py) or real images; None where the checkpoint predates the record."""

    path: str | None = None
    images: int | None = None
    synthetic: bool | None = None

    def describe(self) -> str:
        """In words, for the web page: "the built-in synthetic sample (2,380 images)"."""
        count = "" if self.images is None else f" ({self.images:,} images)"
        if self.synthetic:
            return f"the built-in synthetic sample{count}"
        if self.synthetic is False:
            return f"real images{count}"
        return f"images{count}" if count else "not recorded"


@dataclass(frozen=True)
class Metrics:
    """How the kept weights did: their epoch, validation loss and accuracy, and the epochs the run trained."""

    epoch: int | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    epochs_trained: int | None = None


@dataclass(frozen=True)
class ModelRecord:
    """Everything a checkpoint says of its model except the weights: enough to rebuild the network, prepare
    its input and describe it. `settings` is the training run's configuration (cnn.py's flags), which
    `--resume` reads back."""

    arch: str  # an --arch name
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    precision: str | None = None  # what training computed in (fp32, bf16); None: not recorded
    recipe: str = "original"
    weights: str | None = None  # what --weights started the network from
    source: str = "cnn.py"  # "original": the original project's checkpoint, converted in memory
    trained_on: TrainingData = TrainingData()
    metrics: Metrics = Metrics()
    settings: Mapping[str, Any] = field(default_factory=dict, compare=False)
    temperature: float = 1.0  # calibrates the probabilities: softmax(logits / temperature)
    # What flags an image unlike the training set (trust.py); None: none is flagged.
    outliers: Trust | None = field(default=None, compare=False)
    members: int = 1  # a committee (cnn.py --folds K) serves the mean of K networks' calibrated answers
    # What the models it was fine-tuned from (--init-from) were trained on, the first one first.
    lineage: tuple[TrainingData, ...] = ()
    tta: bool = False  # answers with the 8 flips and quarter turns averaged by default (cnn.py --serve-tta)

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @property
    def title(self) -> str:
        """The network's name as checkpoints and the web page give it (DeepCNN-5Block, resnet18, ...)."""
        return self.architecture.title

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @property
    def crop(self) -> float:
        return self.preprocessing.crop

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def build(self, head_init: str = "normal") -> nn.Module:
        """A fresh network of this record's architecture, size, classes and normalisation."""
        normalisation = {} if self.preprocessing.mean is None else {
            "mean": self.preprocessing.mean, "std": self.preprocessing.std}
        return build_model(self.arch, self.num_classes, self.image_size, head_init, **normalisation)

    def check_network(self, arch: str, image_size: int, flag: str, path: str | os.PathLike[str]) -> None:
        """One line unless a run of --arch `arch` at `image_size` px can take these weights."""
        if arch != self.arch:
            raise Galaxy10Error(f"{flag}: {path} is a {self.title}; pass --arch {self.arch}")
        if image_size != self.image_size:
            raise Galaxy10Error(f"{flag}: {path} was trained at {self.image_size} px; "
                                f"pass --image-size {self.image_size}")

    def check_classes(self, class_names: Sequence[str], data: str | os.PathLike[str],
                      path: str | os.PathLike[str]) -> None:
        """One line unless the folders of `data` hold the classes this model was trained on."""
        if tuple(class_names) != self.class_names:
            raise Galaxy10Error(f"{data} has classes {list(class_names)} but {path} was trained on "
                                f"{list(self.class_names)}: use data with the same class folders")

    def describe_training(self) -> str:
        """What the model learned from, in words, its lineage included: "real images (396 images),
        fine-tuned from a network trained on the built-in synthetic sample (2,380 images)"."""
        text = self.trained_on.describe()
        if self.lineage:
            earlier = ", then ".join(t.describe() for t in self.lineage)
            text += f", fine-tuned from a network trained on {earlier}"
        return text

    def synthetic_warning(self) -> str | None:
        """What to say of answers about real galaxies when the model learned from synthetic ones, or None."""
        if self.trained_on.synthetic:
            return "synthetic galaxies only: do not trust its answers about real galaxies"
        if any(t.synthetic for t in self.lineage):
            return ("its network first learned from synthetic galaxies: check its answers against real "
                    "galaxies you know before trusting them")
        return None

    def with_metrics(self, **changes: Any) -> ModelRecord:
        return replace(self, metrics=replace(self.metrics, **changes))

    def to_dict(self) -> dict[str, Any]:
        """The record as checkpoint keys (the original's among them: epoch, final_val_loss, final_val_acc)."""
        return {
            "architecture": self.title,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.to_dict(),
            "precision": self.precision,
            "recipe": self.recipe,
            "weights": self.weights,
            "source": self.source,
            "trained_on": dataclasses.asdict(self.trained_on),
            "lineage": [dataclasses.asdict(t) for t in self.lineage],
            "tta": self.tta,
            "config": dict(self.settings),
            "epoch": self.metrics.epoch,
            "final_val_loss": self.metrics.val_loss,
            "final_val_acc": self.metrics.val_acc,
            "epochs_trained": self.metrics.epochs_trained,
            "temperature": self.temperature,
            "outliers": _outliers_dict(self.outliers),
            "members": self.members,
        }

    @classmethod
    def from_dict(cls, checkpoint: Mapping[str, Any]) -> ModelRecord:
        """The record of a checkpoint of any age; what an older one did not record is None (or, for the
        recipe, the original's, which every run used before recipes were recorded)."""
        settings = checkpoint.get("config") or {}
        trained_on = checkpoint.get("trained_on") or {"path": settings.get("train_dir")}
        precision = checkpoint.get("precision", settings.get("precision"))
        return cls(
            arch=by_title(checkpoint["architecture"]).name,
            class_names=tuple(checkpoint["class_names"]),
            preprocessing=Preprocessing.from_dict(checkpoint["image_size"], checkpoint["preprocessing"]),
            precision=precision if precision in PRECISIONS_RUN else None,
            recipe=checkpoint.get("recipe", "original"),
            weights=checkpoint.get("weights"),
            source=checkpoint.get("source", "cnn.py"),
            trained_on=TrainingData(**trained_on),
            metrics=Metrics(
                epoch=checkpoint.get("best_epoch", checkpoint.get("epoch")),
                val_loss=_float_or_none(checkpoint.get("final_val_loss")),
                val_acc=_float_or_none(checkpoint.get("final_val_acc")),
                epochs_trained=checkpoint.get("epochs_trained"),
            ),
            settings=settings,
            temperature=float(checkpoint.get("temperature", 1.0)),
            outliers=_outliers(checkpoint.get("outliers")),
            members=int(checkpoint.get("members", 1)),
            lineage=tuple(TrainingData(**t) for t in checkpoint.get("lineage") or ()),
            tta=bool(checkpoint.get("tta", False)),
        )


def _outliers_dict(outliers: Trust | None) -> dict[str, Any] | None:
    if outliers is None:
        return None
    if isinstance(outliers, CommitteeOutliers):
        return {"members": [_outliers_dict(member) for member in outliers.members]}
    return {"spaces": [{"means": g.means, "precision": g.precision} for g in outliers.spaces],
            "centre": list(outliers.centre), "scale": list(outliers.scale), "threshold": outliers.threshold}


def _outliers(saved: Mapping[str, Any] | None) -> Trust | None:
    """The unlike-training statistics (a committee's, per member); a record from before the feature ensemble
    held the penultimate features' Gaussian and a threshold on its distance, which is that one space's score
    with centre 0 and scale 1 on the log distance."""
    if saved is None:
        return None
    if "members" in saved:
        return CommitteeOutliers(tuple(_outliers(member) for member in saved["members"]))
    if "spaces" not in saved:
        return Outliers((Gaussian(saved["means"], saved["precision"]),), (0.0,), (1.0,),
                        math.log(max(saved["threshold"], 1e-12)))
    return Outliers(tuple(Gaussian(space["means"], space["precision"]) for space in saved["spaces"]),
                    tuple(saved["centre"]), tuple(saved["scale"]), float(saved["threshold"]))


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass
class TrainingState:
    """What a checkpoint keeps of the run beside the model: the optimiser and the history (as the
    original's did), and in a resume file the schedule, early stopping and every process's random streams,
    to continue as if never stopped."""

    optimizer: dict[str, Any]
    history: dict[str, list[float]]
    scheduler: dict[str, Any] | None = None
    early_stopping: dict[str, Any] | None = None
    rng: list[dict[str, Any]] | None = None  # one per process
    average: dict[str, Any] | None = None  # --ema's averaged weights and its step count, in a resume file

    def to_dict(self) -> dict[str, Any]:
        keys: dict[str, Any] = {"optimizer_state_dict": self.optimizer, "train_history": self.history}
        if self.scheduler is not None:
            keys |= {"scheduler_state_dict": self.scheduler, "early_stopping": self.early_stopping}
        if self.average is not None:
            keys["weight_average"] = self.average
        if self.rng:
            keys["rng"] = self.rng[0]
            if len(self.rng) > 1:
                keys["rng_per_process"] = self.rng
        return keys

    @classmethod
    def from_dict(cls, checkpoint: Mapping[str, Any]) -> TrainingState:
        rng = checkpoint.get("rng_per_process") or ([checkpoint["rng"]] if "rng" in checkpoint else None)
        return cls(checkpoint.get("optimizer_state_dict") or {}, checkpoint.get("train_history") or {},
                   checkpoint.get("scheduler_state_dict"), checkpoint.get("early_stopping"), rng,
                   checkpoint.get("weight_average"))


@dataclass
class Checkpoint:
    """A checkpoint file's contents: the model's record, its weights and the training state."""

    record: ModelRecord
    weights: dict[str, torch.Tensor]
    training: TrainingState | None = None

    def model(self) -> nn.Module:
        """The trained network in eval mode (a committee's first member); weights that do not fit the record
        (a damaged or hand-edited file) are a Galaxy10Error, not a RuntimeError deep in torch."""
        return self.networks()[0]

    def networks(self) -> list[nn.Module]:
        """The trained networks in eval mode: one, or a committee's members in order."""
        return [self._network(weights) for weights in self.member_weights()]

    def member_weights(self) -> list[dict[str, torch.Tensor]]:
        """The weights of each network: a committee's are stored under members.<k>. in one state dict."""
        if self.record.members == 1:
            return [self.weights]
        return [{name.split(".", 2)[2]: tensor for name, tensor in self.weights.items()
                 if name.startswith(f"members.{k}.")} for k in range(self.record.members)]

    def _network(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        record = self.record
        model = record.build()
        try:
            model.load_state_dict(weights)
        except (RuntimeError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0]
            raise Galaxy10Error(f"the weights do not fit a {record.image_size} px {record.title} with "
                                f"{record.num_classes} classes ({first}); use a checkpoint written by cnn.py"
                                ) from None
        return model.eval()

    def to_dict(self) -> dict[str, Any]:
        keys = {**self.record.to_dict(), "model_state_dict": self.weights}
        if self.training is not None:
            keys |= self.training.to_dict()
            if self.training.scheduler is None:  # a model checkpoint, not a resume file
                keys["best_epoch"] = self.record.metrics.epoch
        return keys

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the checkpoint atomically."""
        with atomic_path(path) as tmp:
            torch.save(self.to_dict(), tmp)

    @classmethod
    def committee(cls, record: ModelRecord, members: list[dict[str, torch.Tensor]]) -> Checkpoint:
        """One checkpoint of several networks' weights (one record, `record.members` of them)."""
        weights = {f"members.{k}.{name}": tensor
                   for k, state in enumerate(members) for name, tensor in state.items()}
        return cls(replace(record, members=len(members)), weights)

    @classmethod
    def from_dict(cls, checkpoint: Mapping[str, Any]) -> Checkpoint:
        training = TrainingState.from_dict(checkpoint) if "optimizer_state_dict" in checkpoint else None
        return cls(ModelRecord.from_dict(checkpoint), checkpoint["model_state_dict"], training)


def read_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", mmap: bool = False
) -> Checkpoint:
    """One of this project's checkpoints (of any age), or the original project's converted in memory, read
    safely; a file that is not one is one line."""
    raw = load_checkpoint(path, map_location, mmap)
    try:
        return Checkpoint.from_dict(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise Galaxy10Error(f"{path} is a damaged checkpoint ({type(err).__name__}: {err}); "
                            "use a .pth file written by cnn.py") from None


def read_record(path: str | os.PathLike[str]) -> ModelRecord:
    """A checkpoint's record alone; memory-mapped, so a 913 MB checkpoint's weights are never read."""
    return read_checkpoint(path, mmap=True).record


# ---------------------------------------------------------------- checkpoint files


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """The raw dictionary of one of this project's checkpoints, or of the original project's converted to
    one, loaded safely (no arbitrary unpickling). Code of this project reads `read_checkpoint` instead."""
    path = Path(path)
    if not path.is_file():
        raise Galaxy10Error(f"checkpoint {path} not found: train one with `python cnn.py`")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for foreign or damaged files
        raise Galaxy10Error(
            f"{path} is not a checkpoint of this project ({type(err).__name__}); "
            "use a .pth file written by cnn.py"
        ) from None
    if isinstance(checkpoint, dict) and checkpoint.keys() == ORIGINAL_KEYS:
        checkpoint = from_original_checkpoint(checkpoint)
    if not isinstance(checkpoint, dict) or by_title(checkpoint.get("architecture")) is None:
        raise Galaxy10Error(
            f"{path} is not a checkpoint written by cnn.py (of {ARCHITECTURE} or another --arch network); "
            "train one with `python cnn.py`"
        )
    return checkpoint


def from_original_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The original project's checkpoint as one of this project's (source "original"), or None when its
    weights are not DeepCNN-5Block's. The original trained on Galaxy10's classes with this project's
    preprocessing, the whole frame; its image size is read from the weights."""
    state = checkpoint["model_state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        return None
    image_size = image_size_from_classifier(state)
    if image_size is None:
        return None
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation work
        expected = CNNModel(len(CLASS_NAMES), image_size).state_dict()
    weights = flatten_feature_names(state, expected)
    if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in expected.items()}:
        return None
    record = ModelRecord(
        DEFAULT_ARCH, CLASS_NAMES, Preprocessing(image_size), source="original",
        # It stored one more than the last epoch, whose weights it kept.
        metrics=Metrics(checkpoint["epoch"] - 1, _float_or_none(checkpoint["final_val_loss"]),
                        _float_or_none(checkpoint["final_val_acc"])),
    )
    training = TrainingState(checkpoint["optimizer_state_dict"], checkpoint["train_history"])
    return Checkpoint(record, weights, training).to_dict()


def image_size_from_classifier(state: dict[str, torch.Tensor]) -> int | None:
    """The input side a DeepCNN-5Block state implies: the first Linear layer (after the Flatten) reads
    CHANNELS[-1] maps of (side / 32)^2 cells, so 32768 inputs mean 256 px. None when no side fits."""
    first_linear = state.get("classifier.1.weight")
    if first_linear is None or first_linear.dim() != 2:
        return None
    cells = first_linear.shape[1] // CHANNELS[-1]
    side = math.isqrt(cells)
    if side < 1 or side * side * CHANNELS[-1] != first_linear.shape[1]:
        return None
    return side * 2 ** len(CHANNELS)


def flatten_feature_names(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` with the original's nested feature layers renamed to this model's flat ones.

    Both list the same conv and BatchNorm layers in network order, so the k-th nested layer with weights
    becomes the k-th flat one; a state of any other layout keeps names that the caller's check rejects.
    """
    nested = sorted({(int(m[2]), int(m[3]), m[1]) for key in state if (m := NESTED_FEATURE.fullmatch(key))})
    flat = sorted({key.rsplit(".", 1)[0] for key in expected if key.startswith("features.")},
                  key=lambda name: int(name.split(".")[1]))
    renamed = {old: new for (_, _, old), new in zip(nested, flat, strict=False)}

    def rename(key: str) -> str:
        layer, _, param = key.rpartition(".")
        return f"{renamed.get(layer, layer)}.{param}"

    return {rename(key): value for key, value in state.items()}


def output_path(model_path: str | os.PathLike[str], kind: str) -> Path:
    """A file beside the checkpoint with the same stem: ``model.pth`` -> ``model.<kind>``."""
    return Path(model_path).with_suffix(f".{kind}")


def resume_path(model_path: str | os.PathLike[str]) -> Path:
    """The resume file of a run writing `model_path`: its last finished epoch, whole."""
    return output_path(model_path, RESUME_KIND)


def is_resume_file(path: str | os.PathLike[str]) -> bool:
    """A resume file (a run in progress), not a model to serve."""
    return Path(path).name.endswith(f".{RESUME_KIND}")
