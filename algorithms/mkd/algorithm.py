"""MKD with BMAD's settings: VGG16 teacher, the small cloner, lambda 0.01, Adam lr 1e-3,
batch 64, 201 epochs at 224 px; guided-backpropagation maps."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from algorithms.inputs import as_hw, imagenet_normalize
from algorithms.mkd.torch_model import (
    SCORE_TAPS,
    Cloner,
    Teacher,
    distillation_loss,
    feature_difference_map,
    saliency_map,
)
from bmad.algorithm import Algorithm, Batch, Prediction
from bmad.registry import register
from bmad.training import BestCheckpoint, train_by_epochs
from bmad.weights import WeightSpec, load_checkpoint, load_into, resolve_weights, torchvision_spec

LOCALIZATIONS = ("gbp", "gradients", "feature_diff")
SELECTIONS = ("last", "val_auroc")
TEACHER_WEIGHTS = "VGG16_Weights.IMAGENET1K_V1"


@register("mkd")
class Mkd(Algorithm):
    """Multiresolution Knowledge Distillation (Salehi et al. 2021): a small cloner learns to
    reproduce a pretrained VGG16's activations on normal images; the discrepancy is the score,
    the gradient of that discrepancy with respect to the input pixels the map.

    - ``lamda`` 0.01: weight of the distance (MSE) term beside the direction (1 - cos) term
      (BMAD's config and the official default; 0.5 for MVTec in the official code);
      ``direction_only`` drops the distance term (official option).
    - ``lr`` 1e-3 (Adam), ``batch_size`` 64, ``epochs`` 201 (BMAD's config says 200; its
      loop, like the official one, runs 201), ``input_size`` 224 (BMAD).
    - Training compares pool2-pool5; the score (and the gradient maps) pool3-pool5, as the
      official test code.
    - ``localization``: "gbp" (guided backpropagation through the cloner's ReLUs; the
      official config and BMAD's), "gradients" (plain input gradients) or "feature_diff"
      (per-position 1 - cos + lamda x squared difference, upsampled and summed: cheap, no
      backward pass). Gradient maps: sum of |grad| over channels, scaled by its 99th
      percentile, Gaussian blur ``sigma`` 4 (``gaussian_passes`` times: 1 official, 2 in
      BMAD's code), then the paper's morphological opening (3x3) if ``opening``.
      Gradient maps are normalised per image, as the official code.
    - ``selection``: "last" keeps the last epoch (official and BMAD); "val_auroc" the best
      image AUROC on the valid split every ``eval_every`` epochs. ``patience`` (in
      evaluations) stops early.
    - ``pretrained``: the teacher's torchvision ImageNet weights (``vgg16-397923af.pth``);
      False gives a random (Xavier-uniform) teacher, as the official ``pretrain: False``.
    """

    family = "teacher-student"
    pixel_level = True
    channels = 3
    size_multiple = 32

    def __init__(
        self,
        lamda: float = 0.01,
        direction_only: bool = False,
        lr: float = 1e-3,
        epochs: int = 201,
        batch_size: int = 64,
        input_size: int | tuple[int, int] = 224,
        localization: str = "gbp",
        sigma: float = 4.0,
        gaussian_passes: int = 1,
        opening: bool = True,
        selection: str = "last",
        eval_every: int = 10,
        patience: int | None = None,
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
    ) -> None:
        if localization not in LOCALIZATIONS:
            raise ValueError(f"localization must be one of {LOCALIZATIONS}, got {localization!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        size = as_hw(input_size)
        if size is None or any(s % 32 for s in size):
            raise ValueError(f"input_size must be set, with sides multiples of 32 (VGG16's five pools), got {size}")
        self.lamda = float(lamda)
        self.direction_only = bool(direction_only)
        self.lr = lr
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.input_size = size
        self.localization = localization
        self.sigma = float(sigma)
        self.gaussian_passes = int(gaussian_passes)
        self.opening = bool(opening)
        self.selection = selection
        self.eval_every = int(eval_every)
        self.patience = patience
        self.pretrained = pretrained
        self.weights = weights
        self._weights_path = resolve_weights(self.weights_spec(), weights) if pretrained else None
        self.teacher: Teacher | None = None
        self.cloner: Cloner | None = None

    # -- building -------------------------------------------------------------------------
    @staticmethod
    def weights_spec() -> WeightSpec:
        """torchvision's ImageNet V1 VGG16 (``torchvision/vgg16-397923af.pth``)."""
        return torchvision_spec(TEACHER_WEIGHTS)

    def build(self) -> tuple[Teacher, Cloner]:
        """The teacher (pretrained weights loaded) and the cloner (built once)."""
        if self.cloner is None:
            teacher = Teacher()
            if self._weights_path is not None:
                state = load_checkpoint(self._weights_path)
                features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
                load_into(teacher.features, features or state, source=str(self._weights_path))
            self.teacher = teacher.to(self.device)
            self.cloner = Cloner().to(self.device)
        return self.teacher, self.cloner

    def modules(self) -> Iterator[nn.Module]:
        """The teacher and the cloner (built if needed)."""
        yield from self.build()

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> 3 channels, ImageNet-normalised, on the device."""
        return imagenet_normalize(images, self.device)

    # -- training -------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the cloner (default betas, no weight decay)."""
        _, cloner = self.build()
        return torch.optim.Adam(cloner.parameters(), lr=self.lr)

    def training_step(self, images: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
        """One Adam step of the cloner towards the teacher on pool2-pool5; returns the loss."""
        teacher, cloner = self.build()
        cloner.train()
        x = self.prepare(images)
        with torch.no_grad():  # the teacher is never updated: its graph is not needed
            target = teacher(x)
        loss = distillation_loss(cloner(x), target, self.lamda, self.direction_only).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Train the cloner for ``epochs`` epochs; keep the epoch chosen by ``selection``."""
        _, cloner = self.build()
        optimizer = self.make_optimizer()
        train_by_epochs(self, train, val, lambda x: self.training_step(x, optimizer),
                        BestCheckpoint(cloner, self.patience), epochs=self.epochs, selection=self.selection,
                        eval_every=self.eval_every)
        cloner.eval()

    # -- scoring --------------------------------------------------------------------------
    def scores_and_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Per-image loss over pool3-pool5 [B], and the cloner's and teacher's taps there."""
        teacher, cloner = self.build()
        cloner.eval()
        student, target = cloner(x)[-SCORE_TAPS:], teacher(x)[-SCORE_TAPS:]
        return distillation_loss(student, target, self.lamda, self.direction_only), student, target

    @torch.no_grad()
    def image_scores(self, images: torch.Tensor) -> np.ndarray:
        """The pool3-pool5 loss per image (the score alone: no map, no backward pass)."""
        scores, _, _ = self.scores_and_taps(self.prepare(images))
        return scores.cpu().numpy()

    def predict_map(self, images: torch.Tensor) -> Prediction:
        """Score = the pool3-pool5 loss; map per ``localization`` at the input size."""
        size = tuple(images.shape[-2:])
        x = self.prepare(images)
        if self.localization == "feature_diff":
            with torch.no_grad():
                scores, student, target = self.scores_and_taps(x)
                maps = feature_difference_map(student, target, self.lamda, size, self.direction_only)
            return Prediction(scores, maps)
        _, cloner = self.build()
        x.requires_grad_(True)
        with torch.enable_grad():
            if self.localization == "gbp":
                with cloner.guided_backprop():
                    scores, _, _ = self.scores_and_taps(x)
                    (grad,) = torch.autograd.grad(scores.sum(), x)  # eval-mode BN: images independent
            else:
                scores, _, _ = self.scores_and_taps(x)
                (grad,) = torch.autograd.grad(scores.sum(), x)
        grads = grad.detach().cpu().numpy()
        maps = np.stack([saliency_map(g, self.sigma, self.gaussian_passes, self.opening) for g in grads])
        return Prediction(scores.detach(), maps)
