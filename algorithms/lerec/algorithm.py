"""The BMAD thesis method ("language-enhanced reconstruction", Bao 2024, ch. 4) as a bmad algorithm."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.clip.base import ClipAlgorithm
from algorithms.clip.models import tokenizer_for
from algorithms.clip.prompts import TextCache, prompt_ids
from algorithms.lerec.augment import laplacian_enhance
from algorithms.lerec.torch_model import ADAPTER_PLACES, LerecHead, anomaly_map, reconstruction_loss
from bmad.algorithm import Batch, Prediction
from bmad.registry import register
from bmad.weights import WeightSpec


@register("lerec")
class Lerec(ClipAlgorithm):
    """Per-patch learned prompts whose text features reconstruct a frozen CLIP's patch features.

    No public code exists; items marked ASSUMED are our reading of the thesis
    (docs/algorithms/lerec.md lists them).

    - ``clip_model`` / ``clip_weights`` / ``image_size``: ViT-B-16+ (laion400m_e31) at 256,
      a 16 x 16 grid (thesis §4.3.3; the positional embedding is resized from 240).
    - ``n_ctx``: M = 16 learned tokens per prompt (thesis, best of 8/16/24/32); one prompt
      per grid position (N = grid^2), no class word (ASSUMED: "[sot] X*M [eot]").
    - ``layers``: 1-based vision blocks whose projected patch tokens are reconstructed
      (ASSUMED (3, 6, 9, 12): the thesis' best is "layers 1, 2, 3 and 4", read as four
      evenly spaced blocks of the 12; pass (1, 2, 3, 4) for the literal reading).
    - ``adapter_on``: "text" (Eq. 4.2: the adapter's output from the last block's patch
      feature is added to that patch's context tokens) or "image" (METHODS_CLIP.md's
      reading: a residual adapter on the last block's features, image-independent text).
    - ``adapter_reduction``: hidden size E / 16 (thesis).
    - ``text_layers``: None (ASSUMED: the text tower's output for every layer) or the
      1-based text blocks paired with ``layers`` (Eq. 4.2's literal ``E_text^k``).
    - ``pyramid_levels``: K of the Laplacian-pyramid enhancement ``(I + S_K) / 2``
      (ASSUMED 2 and the halving; 0 turns it off); ``enhance_at_test``: the thesis applies
      it to every input image (Fig. 4.1), False applies it in training only.
    - ``lr`` / ``epochs``: AdamW, 1e-3, 400 (thesis); ``weight_decay`` 0.01 (AdamW's
      default, ASSUMED), ``batch_size`` 8 (ASSUMED), ``ctx_init_std`` 0.02 (CoOp's, ASSUMED).

    Map: the sum over layers of the bilinearly upsampled ``1 - cos`` grids; score: its
    maximum. The last epoch's prompts are kept (the thesis states no model selection).
    """

    pixel_level = True
    channels = 3

    def __init__(
        self,
        clip_model: str = "ViT-B-16-plus-240",
        clip_weights: str | WeightSpec | None = "laion400m_e31",
        image_size: int = 256,
        n_ctx: int = 16,
        layers: Sequence[int] = (3, 6, 9, 12),
        adapter_on: str = "text",
        adapter_reduction: int = 16,
        text_layers: Sequence[int] | None = None,
        pyramid_levels: int = 2,
        enhance_at_test: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        epochs: int = 400,
        batch_size: int = 8,
        ctx_init_std: float = 0.02,
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
    ) -> None:
        if adapter_on not in ADAPTER_PLACES:
            raise ValueError(f"adapter_on must be one of {ADAPTER_PLACES}, got {adapter_on!r}")
        if text_layers is not None and len(text_layers) != len(layers):
            raise ValueError("text_layers must give one text block per entry of layers")
        if n_ctx < 1 or pyramid_levels < 0 or epochs < 0:
            raise ValueError("n_ctx must be >= 1, pyramid_levels and epochs >= 0")
        self.n_ctx = int(n_ctx)
        self.layers = tuple(int(k) for k in layers)
        self.adapter_on = adapter_on
        self.adapter_reduction = int(adapter_reduction)
        self.text_layers = None if text_layers is None else tuple(int(k) for k in text_layers)
        self.pyramid_levels = int(pyramid_levels)
        self.enhance_at_test = bool(enhance_at_test)
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.ctx_init_std = ctx_init_std
        self.head: LerecHead | None = None
        self.text_cache = TextCache()
        self._init_clip(clip_model=clip_model, clip_weights=clip_weights, image_size=image_size,
                        pretrained=pretrained, weights=weights)

    def build_modules(self, clip: nn.Module) -> None:
        """The prompts and the adapter, sized from ``clip`` (grid, widths, depths)."""
        vision_depth, text_depth = len(clip.visual.transformer.resblocks), len(clip.transformer.resblocks)
        towers = {"layers": (self.layers, vision_depth), "text_layers": (self.text_layers or (), text_depth)}
        for name, (blocks, depth) in towers.items():
            if any(not 1 <= k <= depth for k in blocks):
                raise ValueError(f"{name} {blocks} must be 1-based blocks of the {depth}-block tower of "
                                 f"{self.clip_model}")
        ids, starts = prompt_ids(tokenizer_for(self.clip_model), [""], self.n_ctx, [""])
        ids = ids[:, : int(ids.argmax(dim=-1)) + 1]  # cut after end-of-text (exact under the causal mask)
        self.grid = tuple(clip.visual.grid_size)
        self.head = LerecHead(
            n_patches=self.grid[0] * self.grid[1],
            n_ctx=self.n_ctx,
            ctx_dim=clip.token_embedding.weight.shape[1],
            embed_dim=clip.visual.output_dim,
            token_ids=ids,
            start=int(starts[0]),
            vision_blocks=[k - 1 for k in self.layers],
            last_block=vision_depth - 1,
            text_blocks=None if self.text_layers is None else [k - 1 for k in self.text_layers],
            adapter_on=self.adapter_on,
            reduction=self.adapter_reduction,
            init_std=self.ctx_init_std,
        )

    def inputs(self, images: torch.Tensor, *, train: bool) -> torch.Tensor:
        """Images in [0, 1] -> model size, Laplacian enhancement (training, and test unless off), normalised."""
        x = images.to(self.device, torch.float32)
        side = (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != side:
            x = F.interpolate(x, size=side, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        if train or self.enhance_at_test:
            x = laplacian_enhance(x, self.pyramid_levels)
        return self.prepare(x)

    def training_step(self, images: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
        """One AdamW step on a batch of normal images; returns the loss (Eq. 4.5)."""
        clip = self.build()
        self.head.train()
        self.text_cache.clear()  # the prompts change
        loss = reconstruction_loss(self.head.distances(clip, self.inputs(images, train=True)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the prompts and the adapter."""
        self.build()
        return torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Train the prompts and the adapter for ``epochs`` on normal images (``val`` unused)."""
        optimizer = self.make_optimizer()
        for epoch in range(1, self.epochs + 1):
            total, n = 0.0, 0
            for batch in train:
                images = self.images_of(batch)
                total += self.training_step(images, optimizer) * images.shape[0]
                n += images.shape[0]
            self.history.append({"epoch": epoch, "train_loss": total / max(n, 1)})

    @torch.no_grad()
    def predict_map(self, images: torch.Tensor) -> Prediction:
        """Summed upsampled ``1 - cos`` maps at the input size; score = the map's maximum."""
        clip = self.build()
        self.head.eval()
        text = None
        if self.adapter_on == "image":
            text = list(self.text_cache.get("prompts", lambda: torch.stack(self.head.text_features(clip))))
        distances = self.head.distances(clip, self.inputs(images, train=False), text)
        maps = anomaly_map(distances, self.grid, tuple(images.shape[-2:]))
        return Prediction(maps.flatten(1).amax(dim=1), maps)
