"""Training: DeepCNN-5Block (or another --arch) on class folders of galaxy images, with early stopping.

    python cnn.py                      # the original configuration: balanced_data/, 256 px
    python cnn.py --preset cpu         # a CPU-sized profile: 64 px, 6 epochs (the demo's)
    python cnn.py --recipe original    # the original project's initialisation, optimiser and schedule
    python cnn.py --resume --model-path model.pth   # continue an interrupted run, with its own settings
    python cnn.py --init-from model.pth   # fine-tune any checkpoint, the original project's included
    python cnn.py --evaluate --model-path based_on_balanced_data_model.pth   # report only
    torchrun --nproc_per_node 4 cnn.py   # data-parallel on 4 GPUs: 4 x 32 images a step

Every image is decoded once into a uint8 tensor cache (on the GPU when it fits); batches are sliced from it
and augmented on the device, so no PIL work happens per step. Beside the checkpoint (the best epoch by
validation loss) it writes ``<stem>.history.json``, ``<stem>.curves.png``, ``<stem>.report.json`` and
``<stem>.confusion.png``, and while training ``<stem>.resume.pth``.

This script is the command line; the work is the galaxy10 package's: the flags, presets and recipes in
galaxy10/config.py, the run in galaxy10/fitting.py, the loop in galaxy10/training.py, the data in
galaxy10/data.py, the report and calibration in galaxy10/evaluation.py, what a model is in
galaxy10/models.py.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from galaxy10.config import given_flags, parse_config, resumed_config
from galaxy10.distributed import launched_by_torchrun, select_device
from galaxy10.errors import Galaxy10Error, run_cli
from galaxy10.evaluation import calibrate_checkpoint, evaluate_checkpoint
from galaxy10.fitting import (
    fit,
    network_of_init_from,
    resume_after_restart,
    saved_settings,
    training_processes,
)
from galaxy10.models import load_checkpoint
from galaxy10.networks import CNNModel

# The names this script has always exported, for `from cnn import ...`.
__all__ = ["CNNModel", "fit", "load_checkpoint", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    if config.evaluate or config.calibrate:
        flag = "--evaluate" if config.evaluate else "--calibrate"
        if launched_by_torchrun():
            raise Galaxy10Error(f"{flag} runs in one process: use `python cnn.py {flag}`, not torchrun")
        evaluate_checkpoint(config) if config.evaluate else calibrate_checkpoint(config)
        return
    if config.sync_bn and launched_by_torchrun() and select_device(config.device).type != "cuda":
        raise Galaxy10Error("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernel); drop it "
                            "on CPU")
    with training_processes(config.device):
        config = resume_after_restart(config)
        if config.resume:
            config = resumed_config(saved_settings(config.model_path), given_flags(argv))
        fit(network_of_init_from(config, given_flags(argv)))


if __name__ == "__main__":
    sys.exit(run_cli(main))
