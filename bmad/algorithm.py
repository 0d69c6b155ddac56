"""The algorithm contract: ``fit(train, val)`` then ``predict_map(images)``.

Every detector in bmad, built-in or plugin, is a subclass of :class:`Algorithm`.
Hyper-parameters are constructor keyword arguments with published defaults
(scikit-learn style); the runner records them via :meth:`Algorithm.get_config`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch


@dataclass
class Prediction:
    """Output of :meth:`Algorithm.predict_map` for a batch of B images.

    ``scores``: float array [B], higher means more anomalous.
    ``maps``: float32 array [B, H, W] at the input resolution, or None for
    image-level-only algorithms.
    """

    scores: np.ndarray
    maps: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.scores = np.asarray(_to_numpy(self.scores), dtype=np.float64).reshape(-1)
        if self.maps is not None:
            maps = np.asarray(_to_numpy(self.maps), dtype=np.float32)
            if maps.ndim == 4 and maps.shape[1] == 1:
                maps = maps[:, 0]
            if maps.ndim != 3 or maps.shape[0] != self.scores.shape[0]:
                raise ValueError(
                    f"Prediction.maps must be [B, H, W] with B={self.scores.shape[0]}, got {maps.shape}"
                )
            self.maps = maps


def _to_numpy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return x


Batch = torch.Tensor | dict[str, Any]


class Algorithm:
    """Base class of every anomaly detector.

    Class attributes describe the method to the registry and the harness:

    - ``family``: a short word ("memory bank", "flow", "reconstruction", ...).
    - ``pixel_level``: True if :meth:`predict_map` returns real anomaly maps.
    - ``channels``: channels the method expects; grayscale benches are replicated.
    - ``size_multiple``: the harness rounds the input size up to a multiple of it.
    - ``fixed_sizes``: if set, the only input sizes (square side) the method accepts;
      the harness picks the nearest one.
    - ``square``: the method accepts square inputs only; the harness uses the larger side.

    Instance attribute ``input_size`` (H, W), when not None, is the size images are
    resized to before ``fit``/``predict_map``; None means the bench's size.
    ``history`` collects per-epoch training records (loss, validation metric) that
    the runner copies into the run record.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "other"
    pixel_level: ClassVar[bool] = True
    channels: ClassVar[int] = 3
    size_multiple: ClassVar[int] = 1
    fixed_sizes: ClassVar[tuple[int, ...] | None] = None
    square: ClassVar[bool] = False

    input_size: tuple[int, int] | None = None
    device: torch.device = torch.device("cpu")

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-epoch training records of this instance (created on first use)."""
        return self.__dict__.setdefault("_history", [])

    # -- the contract -----------------------------------------------------------------
    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Learn from batches of normal images (float [B, C, H, W] in [0, 1]).

        Batches from the runner are dicts: "image" [B, C, H, W], "label" [B] (0 good,
        1 Ungood), "mask" [B, H, W] (0/1; zeros where none), "path" (list of str);
        :func:`batch_images` extracts the images. ``val`` (labelled, from the valid
        split) is for checkpoint selection only.
        """
        raise NotImplementedError

    def predict_map(self, images: torch.Tensor) -> Prediction:
        """Score a batch of images (float [B, C, H, W] in [0, 1])."""
        raise NotImplementedError

    # -- harness helpers --------------------------------------------------------------
    def to(self, device: str | torch.device) -> Algorithm:
        """Move the method to ``device``; subclasses holding modules move them too."""
        self.device = torch.device(device)
        for module in self.modules():
            module.to(self.device)
        return self

    def modules(self) -> Iterator[torch.nn.Module]:
        """The torch modules this instance holds (attributes that are ``nn.Module``)."""
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                yield value

    def parameter_counts(self) -> dict[str, int]:
        """Total and trainable parameter counts over :meth:`modules` (shared ones once)."""
        seen: set[int] = set()
        total = trainable = 0
        for module in self.modules():
            for p in module.parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        return {"total": total, "trainable": trainable}

    @classmethod
    def param_names(cls) -> list[str]:
        """Names of the constructor's hyper-parameters."""
        sig = inspect.signature(cls.__init__)
        return [
            n
            for n, p in sig.parameters.items()
            if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]

    def get_config(self) -> dict[str, Any]:
        """Resolved hyper-parameters: constructor arguments read back from attributes.

        A subclass stores each constructor argument under the same attribute name
        (scikit-learn's convention); arguments it does not store are omitted.
        """
        return {n: getattr(self, n) for n in self.param_names() if hasattr(self, n)}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({params})"


def batch_images(batch: Batch) -> torch.Tensor:
    """The image tensor [B, C, H, W] of a batch (a tensor, or a dict with key "image")."""
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def valid_image_auroc(algo: Algorithm, val: Iterable[Batch]) -> float | None:
    """Image AUROC of ``algo`` on labelled batches (the valid split, for checkpoint
    selection); None when they do not hold both classes."""
    from bmad.metrics import image_auroc

    scores, labels = [], []
    for batch in val:
        scores.append(algo.predict_map(batch_images(batch)).scores)
        labels.append(np.asarray(batch["label"]))
    if not labels:
        return None
    y = np.concatenate(labels)
    if len(np.unique(y)) < 2:
        return None
    return image_auroc(np.concatenate(scores), y)
