"""PPAD (Sun et al., MICCAI 2024) and CoOp on CheXzero: prompts trained on normal shots plus SAS anomalies."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.clip import ClipAlgorithm, TextCache, tokenizer_for
from algorithms.ppad.torch_model import (
    CHEXZERO_MEAN,
    CHEXZERO_MODEL,
    CHEXZERO_STD,
    CHEXZERO_WEIGHTS,
    CLASSES,
    PositionPrompts,
    clip_logits,
)
from algorithms.ppad.views import VIEW_NAMES, get_view
from algorithms.synthesis import rng_for, sas
from bmad.algorithm import Batch, Prediction
from bmad.registry import register


def combine_views(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """PPAD's score from per-view anomaly probabilities (B, V): M = max_v p_v if M > threshold,
    else mean_v p_v."""
    top = probs.max(dim=1).values
    return torch.where(top > threshold, top, probs.mean(dim=1))


class PromptAnomalyAlgorithm(ClipAlgorithm):
    """Prompt learning on a frozen CLIP for image-level anomaly detection (PPAD's recipe).

    Subclasses create ``self.prompts`` in :meth:`build_modules` and implement
    :meth:`text_features` (V, C, E) and :meth:`image_features` (B, E) for per-sample view
    indices. Training, per sample and epoch, from ``rng_for(seed, epoch, index)``: a view
    uniformly, then with probability ``anomaly_prob`` a SAS anomaly inside the view's region
    (target [0, 1]) else the normal image (target [1, 0]); BCE-with-logits on the two logits
    exp(logit_scale) * cos; SGD with momentum, cosine decay over ``epochs`` (stepped per
    epoch). Inference: p_v = softmax(logits)[anomaly class] for every view, combined by
    :func:`combine_views` (one view: p itself). Text features are recomputed every training
    step and cached at inference.
    """

    pixel_level = False
    channels = 1  # CheXzero's preprocessing: grayscale, replicated to 3 channels by prepare()
    mean: ClassVar[tuple[float, float, float]] = CHEXZERO_MEAN
    std: ClassVar[tuple[float, float, float]] = CHEXZERO_STD

    views: tuple[str, ...]
    classes: tuple[str, ...]
    epochs: int
    lr: float
    momentum: float
    batch_size: int
    anomaly_prob: float
    threshold: float

    def _init_prompting(self, *, views: Sequence[str], classes: Sequence[str], epochs: int, lr: float,
                        momentum: float, batch_size: int, anomaly_prob: float, threshold: float = 0.8) -> None:
        self.views = tuple(get_view(v).words for v in views)
        if not self.views:
            raise ValueError("at least one view is needed")
        self.classes = tuple(classes)
        if len(self.classes) != 2:
            raise ValueError(f"two classes (normal, anomaly) are needed, got {self.classes}")
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.batch_size = int(batch_size)
        self.anomaly_prob = float(anomaly_prob)
        self.threshold = float(threshold)
        self.prompts: nn.Module | None = None
        self._text_cache = TextCache()
        self._regions: dict[tuple[int, int], list[np.ndarray]] = {}

    # -- the model -------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """Text features (V, C, E) of every view and class."""
        raise NotImplementedError

    def image_features(self, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Image features (B, E) of prepared images seen through views ``views`` (B,)."""
        raise NotImplementedError

    def logits(self, images: torch.Tensor, views: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C) of prepared images, each against its view's text features."""
        return clip_logits(self.build(), self.image_features(images, views), text[views])

    # -- training ----------------------------------------------------------------------
    def synthesise(self, images: torch.Tensor, seed: int, epoch: int, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training inputs for a batch whose first sample has index ``start`` in the epoch.

        Returns the prepared images (B, 3, H, W), the view indices (B,) and the targets
        (B, 2). Images are made uint8 grayscale (channel mean), SAS works on that, and all
        samples (normal or not) are fed back from the uint8 image.
        """
        gray = np.rint(images.detach().float().mean(dim=1).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
        regions = self._view_regions(gray.shape[1], gray.shape[2])
        views, targets, out = [], [], []
        for i, img in enumerate(gray):
            rng = rng_for(seed, epoch, start + i)
            v = int(rng.integers(len(self.views)))
            anomalous = bool(rng.random() < self.anomaly_prob)
            if anomalous:
                img, _ = sas(img, regions[v], rng)
            views.append(v)
            targets.append([0.0, 1.0] if anomalous else [1.0, 0.0])
            out.append(img)
        x = torch.from_numpy(np.stack(out)).float().div_(255).unsqueeze(1)
        return (self.prepare(x), torch.tensor(views, device=self.device),
                torch.tensor(targets, device=self.device))

    def _view_regions(self, height: int, width: int) -> list[np.ndarray]:
        if (height, width) not in self._regions:
            self._regions[(height, width)] = [get_view(v).region(height, width) for v in self.views]
        return self._regions[(height, width)]

    def step_loss(self, images: torch.Tensor, seed: int, epoch: int, start: int) -> torch.Tensor:
        """The training loss of one batch of [0, 1] images (draws from ``(seed, epoch, start + i)``)."""
        x, views, targets = self.synthesise(images, seed, epoch, start)
        return F.binary_cross_entropy_with_logits(self.logits(x, views, self.text_features()), targets)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates."""
        self.build()
        return [p for p in self.prompts.parameters() if p.requires_grad]

    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Train the prompts on normal images (``val`` is not used: PPAD keeps the last epoch)."""
        self.build()
        seed = self.draw_seed()
        params = self.trainable_parameters()
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.epochs, 1))
        self._text_cache.clear()
        self.prompts.train()
        for epoch in range(self.epochs):
            total, seen = 0.0, 0
            lr = optimizer.param_groups[0]["lr"]
            for batch in train:
                images = self.images_of(batch)
                loss = self.step_loss(images, seed, epoch, seen)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * images.shape[0]
                seen += images.shape[0]
            if seen == 0:
                raise ValueError("no training images")
            schedule.step()
            self.history.append({"epoch": epoch + 1, "train_loss": total / seen, "lr": lr})
        self.prompts.eval()
        self._text_cache.clear()

    # -- inference ---------------------------------------------------------------------
    def view_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Anomaly probabilities (B, V) of [0, 1] images under every view."""
        self.build()
        with torch.no_grad():
            x = self.prepare(images)
            text = self._text_cache.get("text", self.text_features)
            probs = []
            for v in range(len(self.views)):
                views = torch.full((x.shape[0],), v, dtype=torch.long, device=x.device)
                probs.append(self.logits(x, views, text).softmax(dim=-1)[:, 1])
        return torch.stack(probs, dim=1)

    def predict_map(self, images: torch.Tensor) -> Prediction:
        """Image scores only (``pixel_level = False``)."""
        probs = self.view_probabilities(images)
        scores = probs[:, 0] if probs.shape[1] == 1 else combine_views(probs, self.threshold)
        return Prediction(scores.cpu().numpy(), None)


@register("coop", views=("",), image_prompt=False)
@register("ppad")
class PPAD(PromptAnomalyAlgorithm):
    """PPAD: position-guided text and image prompts on frozen CheXzero (``coop``: the empty view
    only, no image prompt).

    Defaults from the paper / METHODS_CLIP.md section 1: CheXzero ViT-B/32 (its logit scale
    kept), the five views, 16 generic context vectors, a 49 x 768 image prompt, SGD lr 1e-3
    momentum 0.9, cosine over 100 epochs, batch 64, SAS with probability 0.5, threshold 0.8.
    Trained in fp32 (the official code trains fp16 prompts without loss scaling).
    ``clip_model="bmad-tiny-clip"`` (tests) sizes the prompts from that model.
    """

    def __init__(
        self,
        clip_model: str = CHEXZERO_MODEL,
        pretrained: bool = True,
        weights: str | None = None,
        image_size: int = 224,
        views: Sequence[str] = VIEW_NAMES,
        classes: Sequence[str] = CLASSES,
        n_ctx: int = 16,
        image_prompt: bool = True,
        epochs: int = 100,
        lr: float = 1e-3,
        momentum: float = 0.9,
        batch_size: int = 64,
        anomaly_prob: float = 0.5,
        threshold: float = 0.8,
    ) -> None:
        self.n_ctx = int(n_ctx)
        self.image_prompt = bool(image_prompt)
        self._init_prompting(views=views, classes=classes, epochs=epochs, lr=lr, momentum=momentum,
                             batch_size=batch_size, anomaly_prob=anomaly_prob, threshold=threshold)
        self._init_clip(clip_model=clip_model, clip_weights=CHEXZERO_WEIGHTS, image_size=image_size,
                        pretrained=pretrained, weights=weights)

    def build_modules(self, clip: nn.Module) -> None:
        """The position prompts, sized from ``clip``."""
        self.prompts = PositionPrompts(clip, tokenizer_for(self.clip_model), self.views, classes=self.classes,
                                       n_ctx=self.n_ctx, image_prompt=self.image_prompt)

    def text_features(self) -> torch.Tensor:
        """Text features (V, 2, E) of the views' prompts."""
        return self.prompts.text_features(self.build())

    def image_features(self, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Image features (B, E), each image's masked patches replaced by the image prompt."""
        return self.prompts.image_features(self.build(), images, views)
