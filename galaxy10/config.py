"""Training's settings: every cnn.py flag declared once, as a field of `Config` with its default, type,
choices and help; the presets and recipes as data; and how a command line, a preset and a resumed run's
saved settings become one `Config` (`parse_config`, `resumed_config`), whose precision is decided once
(`Config.resolve`).
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from galaxy10.distributed import DEVICES, launcher, native_bf16
from galaxy10.errors import Galaxy10Error
from galaxy10.models import DEFAULT_CHECKPOINT
from galaxy10.networks import ARCHITECTURES, DEFAULT_ARCH
from galaxy10.preprocessing import check_crop

PRECISIONS = ("auto", "fp32", "bf16")
AUGMENTATIONS = ("original", "dihedral", "rotation", "none")


# ---------------------------------------------------------------- recipes and presets: data


@dataclass(frozen=True)
class Recipe:
    """How the model is initialised and optimised; every checkpoint records which recipe made it.

    ``original`` is the original project's recipe exactly, kept so anyone can compare. ``default``
    departs from it only where a measurement showed it fails; each departure's field says why, and
    docs/results.md ("The training recipe") gives the measurements.
    """

    name: str
    head_init: str  # CNNModel's head_init
    optimizer: str  # "adam" or "adamw" (decoupled weight decay)
    weight_decay: float
    lr_scale: float  # the optimiser's peak learning rate is --lr x lr_scale
    schedule: str  # "plateau": ReduceLROnPlateau on val loss; "cosine": per-step warm-up, then cosine
    warmup: float  # share of the planned steps spent warming up linearly from 0 (cosine only)
    crop: float  # the centre crop, unless --crop says otherwise
    augment: str  # one of AUGMENTATIONS, unless --augment says otherwise


RECIPES: dict[str, Recipe] = {
    "default": Recipe(
        name="default",
        # The original's N(0, 0.01) hidden layers shrink the signal about a thousandfold before the
        # logits, and Adam's sign-like steps then kill their ReLUs: the original recipe hardly learns the
        # built-in sample. Kaiming init keeps the scale.
        head_init="kaiming",
        # Kaiming init alone, with the original's Adam at 1e-3, still learns little; AdamW with weight
        # decay at 0.3 x --lr, warmed up then cosine-annealed, learns the sample in a few epochs, where a
        # full rate or a slower classifier alone do not (docs/results.md, "The training recipe").
        optimizer="adamw",
        weight_decay=0.05,
        lr_scale=0.3,
        # A short CPU run never reaches ReduceLROnPlateau's first cut; warm-up then cosine decay
        # anneals within any epoch budget.
        schedule="cosine",
        warmup=0.1,
        # The galaxies fill the middle third of the frame (Dieleman et al. 2015 kept the central 207 of
        # 424 px); on real galaxies, docs/results.md's crop sweep.
        crop=0.5,
        # A galaxy has no up or down: the 8 exact flips and quarter turns beat the original's
        # augmentations and full-circle rotation on real galaxies (docs/results.md, the augment sweep).
        augment="dihedral",
    ),
    "original": Recipe(name="original", head_init="normal", optimizer="adam", weight_decay=0.0, lr_scale=1.0,
                       schedule="plateau", warmup=0.0, crop=1.0, augment="original"),
}
# Named sets of defaults for --preset; flags given on the command line win.
PRESETS: dict[str, dict[str, Any]] = {
    # cpu: what `make demo` trains without a GPU, on the built-in sample, in a few minutes on 2 cores
    # (its time and accuracy: docs/results.md, "The demo").
    "cpu": {"image_size": 64, "num_epochs": 6, "patience": 3},
    # real-cpu: the best recipe cross-validation found on the real galaxies of ../shared within 15 minutes
    # of training on 2 cores: a committee of 5 resnet18 members, answering with the 8 flips and quarter
    # turns averaged (docs/results.md, "Real galaxies, by cross-validation": the candidates and each one's
    # gain). The candidates trained 28 epochs a member; the preset trains 25, so that the committee fits 15
    # minutes of training on a 2-core machine without bfloat16 (its time is in the same table). Patience =
    # epochs, so early stopping never cuts the cosine schedule short.
    "real-cpu": {"arch": "resnet18", "image_size": 64, "num_epochs": 25, "patience": 25,
                 "learning_rate": 0.0033, "folds": 5, "serve_tta": True},
    # full: the whole Galaxy10 file on a GPU, as the published from-scratch recipes train (Pandya et al. 2023:
    # a dihedral-equivariant network, AdamW, rotations by any angle and flips, 100 epochs at 255 px; Dagli
    # 2023: mixup and label smoothing 0.1): the D4 network on the whole 256 px frame, rotated by any angle
    # (its symmetry covers the quarter turns exactly, augmentation the angles between), mixup, a cosine
    # schedule run to its end. Not yet measured: docs/results.md, "Full scale".
    "full": {"arch": "d4resnet18", "image_size": 256, "crop": 1.0, "augment": "rotation", "mixup": 0.2,
             "num_epochs": 100, "patience": 100, "batch_size": 64},
}
# (preset, --arch) -> the preset's settings for that network, where its own differ: `--preset real-cpu
# --arch deepcnn5` is the real-cpu preset for DeepCNN-5Block, whose steps cost more than resnet18's (a
# committee would not fit the budget) and which learns little at resnet18's learning rate (docs/results.md:
# training throughput, the network sweep).
PRESET_NETWORKS: dict[tuple[str, str], dict[str, Any]] = {
    ("real-cpu", "deepcnn5"): {"num_epochs": 80, "patience": 80, "learning_rate": 0.001, "folds": 1,
                               "serve_tta": False},
}


# ---------------------------------------------------------------- the flags


def flag(default: Any, help: str, *, name: str = "", kind: type | None = None,
         choices: Sequence[str] = (), negatable: bool = False) -> Any:
    """A Config field that is a cnn.py flag: --field-name (or `name`), its type that of the default (or
    `kind` where the default is None, which the help then explains), the values it may take; a `negatable`
    switch also has --no-field-name, to turn off what a preset turns on."""
    meta = {"help": help, "flag": name, "kind": kind, "choices": tuple(choices), "negatable": negatable}
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """Every setting of a training run: the original configuration, plus what a reproducible, resumable run
    needs. Each field is one flag of cnn.py."""

    train_dir: str = flag("balanced_data/train", "training images, one folder per class")
    val_dir: str = flag("balanced_data/val", "validation images, one folder per class")
    model_path: str = flag(DEFAULT_CHECKPOINT, "checkpoint to write (the best epoch by val loss)")
    image_size: int = flag(256, "side in pixels images are resized to (a multiple of 32)")
    batch_size: int = flag(32, "images per training step and process: under torchrun with N processes a "
                               "step takes N x this")
    num_epochs: int = flag(100, "most epochs to train", name="--epochs")
    learning_rate: float = flag(0.001, "base learning rate; the recipe's optimiser peaks at lr_scale x it",
                                name="--lr")
    num_classes: int | None = flag(None, "class folders expected in each data folder (default: as many as "
                                         "the training folder has)", kind=int)
    class_names: str = flag("", "a text FILE naming the classes, one line per class folder in folder order; "
                                "without it, the folder names (the folders 0 to 9 exactly are Galaxy10's)")
    patience: int = flag(10, "epochs without val-loss improvement before stopping early")
    min_delta: float = flag(0.0001, "smallest val-loss decrease that counts as an improvement")
    arch: str = flag(DEFAULT_ARCH, "the network (DeepCNN-5Block is the original's; the others are "
                                   "torchvision's, built from scratch)", choices=tuple(ARCHITECTURES))
    weights: str = flag("", "start a torchvision network from imagenet (torchvision's weights, downloaded "
                            "once) or a state-dict FILE of the same network; its classifier is new")
    recipe: str = flag("default", "how the model is initialised, augmented and optimised (original: the "
                                  "original project's recipe exactly, for comparison)",
                       choices=tuple(RECIPES))
    crop: float | None = flag(None, "keep the central fraction F of the shorter side before resizing; 1 is "
                                    "the whole frame (default: the recipe's: 0.5 default, 1 original)",
                              kind=float)
    augment: str | None = flag(None, "training augmentation: dihedral is the 8 flips and quarter turns, "
                                     "exact; rotation any angle (default: the recipe's: dihedral default, "
                                     "original original)", kind=str, choices=AUGMENTATIONS)
    preset: str = flag("", "a named set of defaults: cpu (the demo: a few minutes on a CPU), real-cpu (a "
                           "small set of real galaxies, 15 minutes on a CPU) or full (the whole Galaxy10 "
                           "file on a GPU); explicit flags win", choices=tuple(PRESETS))
    label_smoothing: float = flag(0.1, "the share of each label's target spread over the other classes")
    weight_decay: float | None = flag(None, "the optimiser's weight decay (default: the recipe's: 0.05 "
                                            "default, 0 original)", kind=float)
    mixup: float = flag(0.0, "mix each batch with itself reversed, images and labels, by a weight drawn from "
                             "Beta(A, A); 0 is off")
    cutmix: float = flag(0.0, "paste a box of each batch reversed into it, the labels mixed by the box's "
                              "area, drawn from Beta(A, A); 0 is off; with --mixup, each batch one of the "
                              "two")
    ema: float = flag(0.0, "validate and keep an exponential moving average of the weights with this decay "
                           "per step (e.g. 0.998); 0 is off")
    serve_tta: bool = flag(False, "record that the model answers with the image's 8 flips and quarter turns "
                                  "averaged, by default, wherever it is served (calibrated so); "
                                  "cnn_use_model.py --no-tta answers from the image alone", negatable=True)
    folds: int = flag(1, "train a committee of K members, each on K-1 folds of --train-dir and --val-dir "
                         "together (stratified) with its own fold for early stopping; report, calibrate and "
                         "flag on the out-of-fold answers; one checkpoint serves them as one model")
    seed: int = flag(42, "seed for weights, shuffling, augmentation and dropout")
    device: str = flag("auto", "auto picks cuda when available", choices=DEVICES)
    precision: str = flag("auto", "bfloat16 autocast for training and validation; auto uses it on CUDA and "
                                  "on CPUs that compute it natively (AVX512-BF16, AMX)", choices=PRECISIONS)
    workers: int = flag(2, "threads decoding images into the cache")
    skip_unreadable: bool = flag(False, "train without the images that cannot be read, with a count of them "
                                        "(without it, they are all listed in one error and nothing trains)")
    no_augment: bool = flag(False, "train on the images as they are (the same as --augment none)")
    no_dropout: bool = flag(False, "train without dropout")
    sync_bn: bool = flag(False, "under torchrun on GPUs, BatchNorm statistics over all processes' batches "
                                "(SyncBatchNorm); ignored in one process")
    resume: bool = flag(False, "continue the interrupted run of --model-path from <model stem>.resume.pth, "
                               "with its own settings: no other flag is needed")
    init_from: str = flag("", "start from the weights of this checkpoint (cnn.py's or the original "
                              "project's) with a fresh optimiser; with other classes, its network is kept "
                              "and the output layer is new (fine-tuning onto your own labels)")
    freeze_body: bool = flag(False, "train the output layer only, on the network --init-from gave (a linear "
                                    "probe: fast on a CPU, the usual first step with few labels)")
    compile: bool = flag(False, "torch.compile the model (slow to start, faster steps)")
    evaluate: bool = flag(False, "only write the evaluation report of --model-path on --val-dir")
    calibrate: bool = flag(False, "fit the temperature and the unlike-training statistics of --model-path on "
                                  "--val-dir and write them with its weights to <model stem>.calibrated.pth")

    @property
    def recipe_spec(self) -> Recipe:
        return RECIPES[self.recipe]

    @property
    def bf16(self) -> bool:
        """bfloat16 autocast: only meaningful once `resolve` has decided the precision."""
        return self.precision == "bf16"

    def resolve(self, device: torch.device) -> Config:
        """This configuration as it runs on `device`: the recipe's crop and augmentation where no flag chose
        them, and the precision decided (fp32 or bf16). The checkpoint records what ran."""
        recipe = self.recipe_spec
        return dataclasses.replace(
            self,
            crop=recipe.crop if self.crop is None else self.crop,
            augment="none" if self.no_augment else self.augment or recipe.augment,
            precision=resolve_precision(self.precision, device, self.arch),
        )

    def settings(self) -> dict[str, Any]:
        """The settings a checkpoint saves, which `resumed_config` reads back."""
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# What --resume may change: where the checkpoint lives and how the run is executed, not what it computes.
RESUME_MAY_CHANGE = frozenset({"model_path", "resume", "device", "workers", "compile", "skip_unreadable"})


def flag_name(name: str) -> str:
    return FIELDS[name].metadata["flag"] or f"--{name.replace('_', '-')}"


def resolve_precision(precision: str, device: torch.device, arch: str) -> str:
    """fp32 or bf16 for --precision on this device and network. auto takes bfloat16 on CUDA, and on CPUs that
    compute it natively for the networks it speeds up there (docs/results.md, training throughput);
    elsewhere bfloat16 is emulated and slower, so auto stays float32."""
    if precision != "auto":
        if precision == "bf16" and device.type == "cpu" and not native_bf16(device):
            raise Galaxy10Error("--precision bf16 needs a CUDA GPU or a CPU with AVX512-BF16 or AMX, which "
                                "this one lacks; use --precision fp32 (or auto)")
        return precision
    if device.type == "cuda" or (native_bf16(device) and ARCHITECTURES[arch].cpu_bf16):
        return "bf16"
    return "fp32"


# ---------------------------------------------------------------- the command line


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as the scripts report every user error: one line."""

    def error(self, message: str) -> Any:
        raise Galaxy10Error(f"{message} (see python cnn.py --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default except an empty one (an unset path or preset) or one the recipe decides."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default in ("", None) else super()._get_help_string(action)


def make_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The parser of cnn.py's flags, built from Config's fields; without `defaults` it yields only the flags
    given on the command line."""
    parser = OneLineParser(
        prog="cnn.py",
        description="Train DeepCNN-5Block (or another --arch) on class folders of galaxy images, or "
                    "--evaluate a checkpoint.",
        formatter_class=HelpFormatter,
        argument_default=None if defaults else argparse.SUPPRESS,
    )
    for name, f in FIELDS.items():
        meta = f.metadata
        help_text = meta["help"] + (f" (one of: {', '.join(meta['choices'])})" if meta["choices"] else "")
        default = f.default if defaults else argparse.SUPPRESS
        if isinstance(f.default, bool):
            action = argparse.BooleanOptionalAction if meta["negatable"] else "store_true"
            parser.add_argument(flag_name(name), dest=name, action=action, help=help_text, default=default)
        else:
            parser.add_argument(flag_name(name), dest=name, type=meta["kind"] or type(f.default),
                                default=default, help=help_text, metavar=flag_name(name)[2:].upper())
    return parser


def parse_config(argv: Sequence[str] | None) -> Config:
    """The flags as a Config: a --preset's settings (for the chosen --arch) replace the defaults, so flags
    given explicitly still win."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.preset:
        check_choice("preset", args.preset)
        parser.set_defaults(**PRESETS[args.preset])
        parser.set_defaults(**PRESET_NETWORKS.get((args.preset, parser.parse_args(argv).arch), {}))
        args = parser.parse_args(argv)
    config = Config(**vars(args))
    check_config(config)
    return config


def given_flags(argv: Sequence[str] | None) -> dict[str, Any]:
    """The settings the command line gave explicitly (not by default or preset)."""
    return vars(make_parser(defaults=False).parse_args(argv))


def resumed_config(saved: Mapping[str, Any], given: Mapping[str, Any]) -> Config:
    """--resume: the interrupted run's own settings, which a flag given now may not contradict (except
    where the checkpoint lives and how the run is executed). The saved precision is the one that ran."""
    config = Config(**{name: value for name, value in saved.items() if name in FIELDS})
    for name, value in given.items():
        contradicts = value != getattr(config, name) and value != "auto"
        if name not in RESUME_MAY_CHANGE and contradicts:
            raise Galaxy10Error(
                f"{flag_name(name)} {value} contradicts the interrupted run's {getattr(config, name)}: "
                "--resume continues that run as it was; drop the flag, or start a new run without --resume"
            )
    changes = {name: value for name, value in given.items() if name in RESUME_MAY_CHANGE}
    return dataclasses.replace(config, **{**changes, "resume": True})


def resume_command(config: Config) -> str:
    """The command line that continues this run: the checkpoint's path and --resume (the resume file holds
    every other setting)."""
    words = ["cnn.py"]
    if config.model_path != FIELDS["model_path"].default:
        words += ["--model-path", config.model_path]
    return f"{launcher()} {shlex.join([*words, '--resume'])}"


# ---------------------------------------------------------------- checks


def check_choice(name: str, value: Any) -> None:
    choices = FIELDS[name].metadata["choices"]
    if choices and value not in (None, "", *choices):
        raise Galaxy10Error(f"unknown {flag_name(name)} {value!r}; choose one of: {', '.join(choices)}")


def check_config(config: Config) -> None:
    """Settings that would otherwise fail deep inside PyTorch with a traceback."""
    for name in FIELDS:
        check_choice(name, getattr(config, name))
    if config.crop is not None:
        check_crop(config.crop)
    if config.weights and not ARCHITECTURES[config.arch].torchvision:
        raise Galaxy10Error(f"--weights starts a torchvision network: add --arch (one of "
                            f"{', '.join(a for a in ARCHITECTURES if a != DEFAULT_ARCH)}); DeepCNN-5Block "
                            "starts from a checkpoint with --init-from")
    if config.image_size < 32 or config.image_size % 32:
        raise Galaxy10Error(f"--image-size must be a positive multiple of 32 (the model halves it 5 times), "
                            f"not {config.image_size}")
    for name in ("batch_size", "num_epochs", "num_classes", "patience", "folds"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise Galaxy10Error(f"{flag_name(name)} must be at least 1, not {getattr(config, name)}")
    if not config.learning_rate > 0 or config.min_delta < 0:
        raise Galaxy10Error("--lr must be positive and --min-delta not negative")
    if not (0 <= config.label_smoothing < 1 and 0 <= config.ema < 1 and config.mixup >= 0 <= config.cutmix):
        raise Galaxy10Error("--label-smoothing and --ema must be in [0, 1), --mixup and --cutmix not "
                            "negative")
    if config.weight_decay is not None and config.weight_decay < 0:
        raise Galaxy10Error(f"--weight-decay must not be negative, not {config.weight_decay}")
    if config.freeze_body and not config.init_from:
        raise Galaxy10Error("--freeze-body trains the output layer on a network trained before: add "
                            "--init-from CHECKPOINT")
