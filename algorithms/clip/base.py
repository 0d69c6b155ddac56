"""The base class of the CLIP-based methods: a frozen CLIP built offline, plus helpers."""

from __future__ import annotations

import os
from typing import ClassVar

import torch
from torch import nn

from algorithms.clip.models import HF_HUB, LOCAL_DIR, OPENAI_MEAN, OPENAI_STD, build_clip, freeze, weight_spec
from bmad.algorithm import Algorithm, Batch, batch_images
from bmad.weights import WeightSpec, resolve_weights


class ClipAlgorithm(Algorithm):
    """A method built on a frozen open_clip model.

    Subclasses call :meth:`_init_clip` from ``__init__`` with their constructor's
    ``clip_model`` (an open_clip model name, ``hf-hub:``/``local-dir:``, or
    ``bmad-tiny-clip`` for tests), ``clip_weights`` (open_clip tag or a
    :class:`WeightSpec`), ``image_size``, ``pretrained`` and ``weights``. With
    ``pretrained`` the weights file is located at construction, so a missing file fails
    before any data is read. The CLIP is built on first use (:meth:`build`), after the
    runner has seeded, and frozen; the trainable parts are the subclass's own modules,
    so :meth:`parameter_counts` reports them as the trainable parameters.

    ``mean`` / ``std``: the input normalisation (OpenAI's by default). The harness
    resizes inputs to ``image_size`` (``input_size``); :meth:`prepare` replicates
    grayscale to 3 channels and normalises.
    """

    family = "CLIP"
    mean: ClassVar[tuple[float, float, float]] = OPENAI_MEAN
    std: ClassVar[tuple[float, float, float]] = OPENAI_STD

    clip_model: str
    clip_weights: str | None
    image_size: int
    pretrained: bool
    weights: str | None
    allow_torchscript: bool

    def _init_clip(
        self,
        *,
        clip_model: str,
        clip_weights: str | WeightSpec | None,
        image_size: int,
        pretrained: bool,
        weights: str | os.PathLike | None,
        allow_torchscript: bool = False,
    ) -> None:
        self.clip_model = clip_model
        self._weight_spec = clip_weights if isinstance(clip_weights, WeightSpec) else None
        self.clip_weights = clip_weights.name if isinstance(clip_weights, WeightSpec) else clip_weights
        self.image_size = int(image_size)
        self.input_size = (self.image_size, self.image_size)
        self.pretrained = bool(pretrained)
        self.weights = None if weights is None else str(weights)
        self.allow_torchscript = bool(allow_torchscript)
        self.clip: nn.Module | None = None
        hub = clip_model.startswith((HF_HUB, LOCAL_DIR))
        if self.pretrained and not hub and clip_weights is not None:
            resolve_weights(weight_spec(clip_model, clip_weights), self.weights)

    # -- building -----------------------------------------------------------------------
    def build(self) -> nn.Module:
        """The frozen CLIP (built once), and the subclass's modules (:meth:`build_modules`)."""
        if self.clip is None:
            tag = self._weight_spec or self.clip_weights
            self.clip = freeze(build_clip(self.clip_model, tag if self.pretrained else None, weights=self.weights,
                                          image_size=self.image_size, allow_torchscript=self.allow_torchscript))
            self.clip.to(self.device)
            self.build_modules(self.clip)
            for module in self.modules():
                module.to(self.device)
        return self.clip

    def build_modules(self, clip: nn.Module) -> None:
        """Create the trainable modules (prompts, adapters) for ``clip``; none by default."""

    def to(self, device: str | torch.device) -> ClipAlgorithm:
        self.device = torch.device(device)
        self.build()
        for module in self.modules():
            module.to(self.device)
        return self

    # -- inputs -------------------------------------------------------------------------
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> 3 channels, normalised, on the method's device."""
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @staticmethod
    def images_of(batch: Batch) -> torch.Tensor:
        """The image tensor of a training batch."""
        return batch_images(batch)

    @staticmethod
    def draw_seed() -> int:
        """A seed for the synthesis draws, taken from torch's RNG (the runner seeds it per run)."""
        return int(torch.randint(0, 2**31 - 1, ()).item())
