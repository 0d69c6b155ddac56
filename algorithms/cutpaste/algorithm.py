"""CutPaste (Li et al., CVPR 2021) as a bmad algorithm: self-supervised training + Gaussian density."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from algorithms.cutpaste.augment import VARIANTS, make_views
from algorithms.cutpaste.torch_model import (
    CutPasteNet,
    GaussianDensity,
    default_sigma,
    extract_patches,
    patch_positions,
    random_patch_crops,
    receptive_field_upsample,
)
from algorithms.inputs import as_hw, imagenet_normalize
from bmad.algorithm import Algorithm, Batch, Prediction, batch_images, valid_image_auroc
from bmad.registry import register
from bmad.weights import create_timm_backbone, resolve_weights, timm_spec


@register("cutpaste")
class CutPaste(Algorithm):
    """ResNet-18 trained to spot CutPaste defects; score: Mahalanobis distance of its embedding.

    A ResNet-18 + projection head learns to tell normal images from CutPaste-augmented ones;
    a Gaussian density (mean + Ledoit-Wolf precision) on the L2-normalised 512-d embeddings of
    the normal training images gives the score (Mahalanobis distance).

    Defaults (BMAD's config, which vendors Runinho's PyTorch port; Li et al.'s settings where noted):

    - ``backbone``: timm "resnet18.tv_in1k" (torchvision's ImageNet weights, as BMAD), random
      with ``pretrained=False``; ``head_layers`` 2 (head 512-512-128, BMAD).
    - ``variant``: "3way" (BMAD; Li et al.'s best): original / CutPaste / scar, labels 0 / 1 / 2;
      also "normal", "scar" and "union" (binary).
    - ``input_size`` 256 (Li et al., BMAD).
    - ``steps`` 256: optimiser steps of ``batch_size`` 64 images (each giving 3 views: 192
      inputs); BMAD's and Runinho's config calls them "epochs". ``freeze_steps`` 20: the trunk
      gets no gradient for the first 20 steps (its BN statistics still update, train mode).
    - SGD ``lr`` 0.03, ``momentum`` 0.9, ``weight_decay`` 3e-5, one cosine cycle over ``steps``.
    - ``patch_size``: None (image level, BMAD). An int gives Li et al.'s patch-level
      localisation: train on one random ``patch_size`` crop per image, fit the density on
      patch embeddings (``density_patches`` per training image, drawn at random among the
      positions every ``patch_stride`` pixels; ASSUMED 16), score every patch of a test image, and spread the scores
      back to pixels with Gaussian weights of width ``smoothing_sigma`` (None: patch / 4);
      image score = the largest patch score. Li et al. use 64 and stride 4 at 256.
    - ``eval_every``: None keeps the last step (BMAD); k validates the image AUROC on the
      valid split every k steps (refitting the density) and keeps the best.
    """

    family = "self-supervised"
    pixel_level = False
    channels = 3

    def __init__(
        self,
        backbone: str = "resnet18.tv_in1k",
        variant: str = "3way",
        head_layers: int = 2,
        input_size: int | tuple[int, int] = 256,
        steps: int = 256,
        freeze_steps: int = 20,
        lr: float = 0.03,
        momentum: float = 0.9,
        weight_decay: float = 3e-5,
        batch_size: int = 64,
        patch_size: int | None = None,
        patch_stride: int = 4,
        smoothing_sigma: float | None = None,
        density_patches: int = 16,
        eval_every: int | None = None,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"CutPaste variant must be one of {VARIANTS}, got {variant!r}")
        self.backbone = backbone
        self.variant = variant
        self.head_layers = head_layers
        self.input_size = as_hw(input_size)
        self.steps = steps
        self.freeze_steps = freeze_steps
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.smoothing_sigma = smoothing_sigma
        self.density_patches = density_patches
        self.eval_every = eval_every
        self.pretrained = pretrained
        self.weights = weights
        self.pixel_level = patch_size is not None  # instance value: maps only at patch level
        self._weights_path: Path | None = resolve_weights(timm_spec(backbone), weights) if pretrained else None
        self.net: CutPasteNet | None = None
        self.density = GaussianDensity()

    # -- building and input -----------------------------------------------------------
    def build(self) -> CutPasteNet:
        """The network (built once: the trunk with its pretrained weights, a fresh head)."""
        if self.net is None:
            trunk = create_timm_backbone(self.backbone, self.pretrained, self._weights_path, num_classes=0)
            n_classes = 3 if self.variant == "3way" else 2
            self.net = CutPasteNet(trunk, trunk.num_features, self.head_layers, n_classes).to(self.device)
        return self.net

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> ImageNet-normalised 3-channel input on the device."""
        return imagenet_normalize(x, self.device)

    # -- training ---------------------------------------------------------------------
    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """``steps`` SGD steps on the variant's views, then the density on the training embeddings."""
        net = self.build()
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
        opt = torch.optim.SGD(net.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.steps))
        stream = _fixed_batches(train, self.batch_size)
        best: tuple[float, dict[str, Any] | None, int] = (-1.0, None, 0)
        for step in range(self.steps):
            net.backbone.requires_grad_(step >= self.freeze_steps)
            net.train()
            images = next(stream)
            if self.patch_size is not None:
                images = random_patch_crops(images, self.patch_size, rng)
            views, labels = make_views(images, self.variant, rng)
            _, logits = net(self._normalize(views))
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            record: dict[str, Any] = {"step": step + 1, "train_loss": float(loss.detach()),
                                      "lr": opt.param_groups[0]["lr"]}
            sched.step()
            done = step + 1
            if val is not None and self.eval_every and (done % self.eval_every == 0 or done == self.steps):
                self.fit_density(train, rng)
                auroc = valid_image_auroc(self, val)
                record["val_image_auroc"] = auroc
                if auroc is not None and auroc > best[0]:
                    best = (auroc, copy.deepcopy({"net": net.state_dict(), "density": self.density.state_dict()}), done)
            self.history.append(record)
        net.backbone.requires_grad_(True)
        net.eval()
        if best[1] is not None:
            net.load_state_dict(best[1]["net"])
            self.density.load_state_dict(best[1]["density"])
            self.history.append({"selected_step": best[2], "val_image_auroc": best[0]})
        else:
            self.fit_density(train, rng)

    @torch.no_grad()
    def fit_density(self, train: Iterable[Batch], rng: np.random.Generator) -> None:
        """Fit the Gaussian density on the embeddings of the (un-augmented) training images,
        or of their patches at patch level."""
        net = self.build()
        net.eval()
        feats = []
        if self.patch_size is None:
            for batch in train:
                feats.append(net.backbone(self._normalize(batch_images(batch))))
        else:
            for batch in train:
                images = self._normalize(batch_images(batch))
                ys, xs = self._grid(images.shape[-2:])
                n_pos = len(ys) * len(xs)
                for img in images:
                    patches = extract_patches(img[None], ys, xs, self.patch_size)
                    if self.density_patches < n_pos:
                        keep = np.sort(rng.choice(n_pos, self.density_patches, replace=False))
                        patches = patches[torch.as_tensor(keep, device=patches.device)]
                    feats.extend(net.backbone(chunk) for chunk in patches.split(256))
        if not feats:
            raise ValueError("CutPaste.fit: the training set is empty")
        self.density.fit(torch.cat(feats))
        self.density.to(self.device)

    def _grid(self, size: torch.Size | tuple[int, int]) -> tuple[list[int], list[int]]:
        assert self.patch_size is not None
        return (patch_positions(int(size[0]), self.patch_size, self.patch_stride),
                patch_positions(int(size[1]), self.patch_size, self.patch_stride))

    # -- inference --------------------------------------------------------------------
    @torch.no_grad()
    def predict_map(self, images: torch.Tensor) -> Prediction:
        """Image level: Mahalanobis distance of each image's embedding, no maps. Patch level:
        per-patch distances spread to pixels (maps), image score = the largest patch score."""
        net = self.build()
        net.eval()
        x = self._normalize(images)
        if self.patch_size is None:
            return Prediction(scores=self.density(net.backbone(x)), maps=None)
        ys, xs = self._grid(x.shape[-2:])
        grids = []
        for img in x:
            patches = extract_patches(img[None], ys, xs, self.patch_size)
            scores = torch.cat([self.density(net.backbone(chunk)) for chunk in patches.split(256)])
            grids.append(scores.view(len(ys), len(xs)))
        grid = torch.stack(grids).float()
        sigma = self.smoothing_sigma or default_sigma(self.patch_size)
        maps = receptive_field_upsample(grid, ys, xs, self.patch_size, tuple(x.shape[-2:]), sigma)
        return Prediction(scores=grid.flatten(1).amax(1), maps=maps)


def _fixed_batches(train: Iterable[Batch], size: int) -> Iterator[torch.Tensor]:
    """Endless batches of exactly ``size`` images, cycling through ``train`` (re-iterated,
    so a shuffling loader reshuffles each pass); like Runinho's repeated dataset with drop_last."""
    buffer: list[torch.Tensor] = []
    held = 0
    while True:
        seen = False
        for batch in train:
            seen = True
            buffer.append(batch_images(batch))
            held += len(buffer[-1])
            while held >= size:
                joined = torch.cat(buffer)
                yield joined[:size]
                buffer, held = [joined[size:]], held - size
        if not seen:
            raise ValueError("CutPaste.fit: the training set is empty")
