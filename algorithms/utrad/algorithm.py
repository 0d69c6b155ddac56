"""UTRAD with BMAD's settings: a U-shaped transformer autoencoder reconstructing frozen
ResNet-18 feature tokens; Adam lr 1e-4, betas (0.5, 0.999), batch 8, 150 epochs, 256 px."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from algorithms.inputs import as_hw, imagenet_normalize
from algorithms.utrad.torch_model import FeatureTokens, UTransformer, anomaly_map, utrad_loss
from bmad.algorithm import Algorithm, Batch, Prediction
from bmad.registry import register
from bmad.training import BestCheckpoint, train_by_epochs
from bmad.weights import create_timm_backbone, resolve_weights, timm_spec

SELECTIONS = ("train_loss", "val_auroc", "last")


@register("utrad")
class Utrad(Algorithm):
    """UTRAD (Chen et al. 2022): reconstruct normal feature tokens; the map is the scaled
    reconstruction error averaged over pooling scales, the score its maximum.

    - ``backbone``: timm name of the frozen CNN whose layer1-3 give the tokens;
      ``resnet18.tv_in1k`` = torchvision's ImageNet V1 ResNet-18 (official code).
    - ``input_size``: 256 (official and BMAD); H/4 and W/4 must be divisible by the
      product of ``patch_sizes`` (64 by default).
    - ``d_model`` 512, ``n_heads`` 8, ``ff_dim`` 2048, ``dropout`` 0.1, ``n_layers`` 4
      (per level, encoder and decoder), ``patch_sizes`` (4, 4, 4), ``bottleneck_dim`` 128:
      the paper's / official code's transformer. ``train_positions``: False, as the official
      code (its positional tables are read through ``.data`` and never trained).
    - ``lr`` 1e-4, ``betas`` (0.5, 0.999), ``batch_size`` 8, ``epochs`` 150: BMAD's config
      (its code hard-codes batch 8 and 150 epochs).
    - ``selection``: "train_loss" keeps the epoch with the lowest mean training loss (BMAD's
      code); "val_auroc" the best image AUROC on the valid split every ``eval_every``
      epochs; "last" the last epoch. ``patience`` (in selection checks) stops early.

    Map pooling scales are the cumulative window products (1, 4, 16, 64 by default, the
    official scales). ``scale_normalize``: True divides the error by the scale head's
    prediction (official); False maps the plain reconstruction error (the scale head is
    still trained, unused).
    """

    family = "reconstruction (transformer)"
    pixel_level = True
    channels = 3
    size_multiple = 16

    def __init__(
        self,
        backbone: str = "resnet18.tv_in1k",
        input_size: int | tuple[int, int] = 256,
        d_model: int = 512,
        n_heads: int = 8,
        ff_dim: int = 2048,
        dropout: float = 0.1,
        n_layers: int = 4,
        patch_sizes: Sequence[int] = (4, 4, 4),
        bottleneck_dim: int = 128,
        train_positions: bool = False,
        scale_normalize: bool = True,
        lr: float = 1e-4,
        betas: Sequence[float] = (0.5, 0.999),
        epochs: int = 150,
        batch_size: int = 8,
        selection: str = "train_loss",
        eval_every: int = 10,
        patience: int | None = None,
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
    ) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        size = as_hw(input_size)
        if size is None:
            raise ValueError("UTRAD builds its positional table for a fixed input size: input_size cannot be None")
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        windows = math.prod(self.patch_sizes)
        if any(s % 16 or (s // 4) % windows for s in size):
            raise ValueError(f"input_size {size}: each side must be a multiple of 16 whose quarter is divisible "
                             f"by {windows} (the product of patch_sizes {self.patch_sizes})")
        self.backbone = backbone
        self.input_size = size
        self.d_model = int(d_model)
        self.n_heads = int(n_heads)
        self.ff_dim = int(ff_dim)
        self.dropout = float(dropout)
        self.n_layers = int(n_layers)
        self.bottleneck_dim = int(bottleneck_dim)
        self.train_positions = bool(train_positions)
        self.scale_normalize = bool(scale_normalize)
        self.lr = lr
        self.betas = tuple(float(b) for b in betas)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.selection = selection
        self.eval_every = int(eval_every)
        self.patience = patience
        self.pretrained = pretrained
        self.weights = weights
        if pretrained:
            resolve_weights(timm_spec(backbone), weights)  # a missing file fails now, not after data loading
        self.tokens: FeatureTokens | None = None
        self.model: UTransformer | None = None

    # -- building -------------------------------------------------------------------------
    def build(self) -> tuple[FeatureTokens, UTransformer]:
        """The frozen token extractor and the transformer (built once, on first use)."""
        if self.model is None:
            cnn = create_timm_backbone(self.backbone, self.pretrained, self.weights, features_only=True,
                                       out_indices=(1, 2, 3))
            in_channels = sum(cnn.feature_info.channels())
            grid = (self.input_size[0] // 4, self.input_size[1] // 4)
            self.tokens = FeatureTokens(cnn).to(self.device)
            self.model = UTransformer(in_channels, grid, self.d_model, self.n_heads, self.ff_dim, self.dropout,
                                      self.n_layers, self.patch_sizes, self.bottleneck_dim,
                                      self.train_positions).to(self.device)
        return self.tokens, self.model

    def modules(self) -> Iterator[nn.Module]:
        """The token extractor and the transformer (built if needed)."""
        yield from self.build()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> ImageNet-normalised -> feature tokens [B, C, H/4, W/4]."""
        tokens, _ = self.build()
        return tokens(imagenet_normalize(images, self.device))

    # -- training -------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the transformer's trainable parameters (not the positional tables)."""
        _, model = self.build()
        return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.lr, betas=self.betas)

    def training_step(self, images: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
        """One Adam step on a batch of normal images; returns the loss."""
        _, model = self.build()
        model.train()
        feats = self.features(images)
        loss = utrad_loss(feats, *model(feats))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Train for ``epochs`` epochs and keep the checkpoint chosen by ``selection``."""
        _, model = self.build()
        optimizer = self.make_optimizer()
        train_by_epochs(self, train, val, lambda x: self.training_step(x, optimizer),
                        BestCheckpoint(model, self.patience), epochs=self.epochs, selection=self.selection,
                        eval_every=self.eval_every)
        model.eval()

    # -- scoring --------------------------------------------------------------------------
    @torch.no_grad()
    def predict_map(self, images: torch.Tensor) -> Prediction:
        """Multi-scale scaled-error maps at the input size; score = the map's maximum."""
        _, model = self.build()
        model.eval()
        feats = self.features(images)
        recon, scale = model(feats)
        pools = [math.prod(self.patch_sizes[:i]) for i in range(len(self.patch_sizes) + 1)]
        maps = anomaly_map(feats, recon, scale if self.scale_normalize else None, pools, tuple(images.shape[-2:]))
        return Prediction(maps.flatten(1).amax(dim=1), maps)
