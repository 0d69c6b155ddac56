"""Checkpoint selection for algorithms trained by epochs: keep the best state, count the
checks since it last improved (early stopping), restore it at the end."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


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
