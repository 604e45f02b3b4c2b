"""Started by tests/test_distributed.py under torchrun (not a test itself): what each process takes of an
odd-sized training set, and what validate() gives it after a step that leaves every process's BatchNorm
statistics different. Writes rank-<r>.json, and rank 0 its weights and val images, into the folder argv[1]."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from galaxy10 import distributed, fitting, training
from galaxy10.config import Config
from galaxy10.data import ImageCache, iterate_batches

from helpers import new_run

TRAIN_IMAGES = 9  # two processes take 4 each per epoch; one sits out
EPOCHS = 3
SEED = 3


def shares(train: ImageCache) -> list[list[int]]:
    """Per epoch, the ids (labels) of the images this process is given, drawn as training draws them."""
    generator = torch.Generator().manual_seed(SEED)
    epochs = range(EPOCHS)
    return [[int(i) for _, ids in iterate_batches(train, 2, generator) for i in ids] for _ in epochs]


def main(out: Path) -> None:
    # float32 (not --precision auto): test_distributed compares validate()'s loss with a float32 evaluate()
    # at 1e-5, which bfloat16 autocast on a CPU that computes it natively would miss.
    config = Config(image_size=32, batch_size=2, num_classes=2, device="cpu", seed=SEED, no_dropout=True,
                        precision="fp32")
    cpu = torch.device("cpu")
    images = torch.randint(0, 256, (TRAIN_IMAGES, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with fitting.training_processes(config.device):
        taken = shares(ImageCache(images, torch.arange(TRAIN_IMAGES), cpu))
        labels = torch.arange(TRAIN_IMAGES) % 2
        val = ImageCache(images[:5], labels[:5], cpu)  # 5: the processes' parts differ in size
        run = new_run(config, ["a", "b"], ImageCache(images, labels, cpu), val)
        rank = distributed.rank()
        own = slice(2 * rank, 2 * rank + 2)  # each process trains on images of its own
        run.forward.train()
        training.train_step(run.forward, run.optimizer, run.criterion, images[own], labels[own], None)
        own_statistics = [float(b.sum()) for name, b in run.model.named_buffers() if "running_mean" in name]
        loss, accuracy = training.validate(run)
        if rank == 0:
            torch.save({"model": run.model.state_dict(), "val_images": val.images, "val_labels": val.labels},
                       out / "rank-0.pt")
    result = {"rank": rank, "taken": taken, "val_loss": loss, "val_accuracy": accuracy,
              "running_means": own_statistics}
    (out / f"rank-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
