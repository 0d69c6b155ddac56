"""Training by epochs: checkpoint selection (keep the best state, count the checks since
it last improved for early stopping, restore it at the end) and the shared epoch loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from bmad.algorithm import Algorithm, Batch, batch_images, valid_image_auroc


class BestCheckpoint:
    """The best weights of ``modules`` seen so far, by a value where higher is better.

    ``check(value, epoch)`` after each selection point (None = no verdict, e.g. a valid
    split without both classes: neither kept nor counted as stale); ``stop`` tells when
    ``patience`` checks in a row have not improved; ``restore()`` loads the kept weights.
    States are copied to the CPU, so a GPU run does not hold two models in device memory.
    """

    def __init__(self, modules: nn.Module | Mapping[str, nn.Module], patience: int | None = None) -> None:
        self.modules = dict(modules) if isinstance(modules, Mapping) else {"": modules}
        self.patience = patience
        self.value: float | None = None
        self.epoch: int | None = None
        self.state: dict[str, dict[str, torch.Tensor]] | None = None
        self.stale = 0

    def check(self, value: float | None, epoch: int) -> bool:
        """Keep the current weights if ``value`` beats the best so far; True when kept."""
        if value is None:
            return False
        if self.value is not None and value <= self.value:
            self.stale += 1
            return False
        self.value, self.epoch, self.stale = float(value), epoch, 0
        self.state = {name: {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
                      for name, module in self.modules.items()}
        return True

    @property
    def stop(self) -> bool:
        """True when ``patience`` checks in a row brought no improvement."""
        return self.patience is not None and self.stale >= self.patience

    def restore(self) -> dict[str, Any] | None:
        """Load the kept weights back; returns ``{"selected_epoch": ...}`` for the history,
        or None when nothing was kept."""
        if self.state is None:
            return None
        for name, module in self.modules.items():
            module.load_state_dict(self.state[name])
        return {"selected_epoch": self.epoch}


def train_by_epochs(
    algo: Algorithm,
    train: Iterable[Batch],
    val: Iterable[Batch] | None,
    step: Callable[[torch.Tensor], float],
    best: BestCheckpoint,
    *,
    epochs: int,
    selection: str,
    eval_every: int,
    passes: int = 1,
) -> None:
    """The epoch loop shared by the natively trained algorithms.

    Each epoch runs ``step(images) -> loss`` over ``train`` ``passes`` times and appends
    {"epoch", "train_loss"} to ``algo.history``. ``selection``: "train_loss" keeps the
    epoch with the lowest mean loss; "val_auroc" the best image AUROC on ``val`` (checked
    every ``eval_every`` epochs and after the last; stored as "val_image_auroc"); "last"
    keeps the last epoch. ``best`` holds the modules and the patience; at the end the
    selected weights are restored and {"selected_epoch", "selection"[, "val_image_auroc"]}
    is appended.
    """
    name = f"{type(algo).__name__}.fit"
    for epoch in range(1, epochs + 1):
        losses = [step(batch_images(b)) for _ in range(passes) for b in train]
        if not losses:
            raise ValueError(f"{name}: the training set is empty")
        record: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        if selection == "train_loss":
            best.check(-record["train_loss"], epoch)
        elif selection == "val_auroc" and val is not None and (epoch % eval_every == 0 or epoch == epochs):
            record["val_image_auroc"] = valid_image_auroc(algo, val)
            best.check(record["val_image_auroc"], epoch)
        algo.history.append(record)
        if best.stop:
            break
    selected = best.restore()
    if selected is not None:
        selected["selection"] = selection
        if selection == "val_auroc":
            selected["val_image_auroc"] = best.value
        algo.history.append(selected)
