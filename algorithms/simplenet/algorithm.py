"""SimpleNet with the official recipe (``run.sh``; BMAD published no settings for it):
WideResNet-50 layer2+3, 1536-d adaptor, noise std 0.015, margin 0.5, 40 x 4 epochs, 288 px."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from algorithms.inputs import as_hw, imagenet_normalize
from algorithms.simplenet.torch_model import (
    Adaptor,
    Discriminator,
    PatchFeatures,
    anomalous_features,
    score_maps,
    truncated_l1,
)
from bmad.algorithm import Algorithm, Batch, Prediction
from bmad.registry import register
from bmad.training import BestCheckpoint, train_by_epochs
from bmad.weights import create_timm_backbone, resolve_weights, timm_spec

LAYERS = {"layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}
SELECTIONS = ("val_auroc", "last")


@register("simplenet")
class SimpleNet(Algorithm):
    """SimpleNet (Liu et al. 2023): a discriminator separating adapted normal patch features
    from Gaussian-noised copies; map = -D per patch, upsampled and smoothed; score = max.

    Defaults are the official ``run.sh`` (BMAD has no SimpleNet code or config):

    - ``backbone`` ``wide_resnet50_2.tv_in1k`` (torchvision's ImageNet V1 weights, as the
      official code), ``layers`` ("layer2", "layer3"), ``patchsize`` 3,
      ``pretrain_embed_dimension`` / ``target_embed_dimension`` 1536;
    - ``input_size`` 288, a square resize (the official Resize(329) + CenterCrop(288)
      would cut off much of BMAD's non-square images; METHODS_NATIVE recommends a resize);
    - ``noise_std`` 0.015; discriminator ``dsc_layers`` 2, ``dsc_hidden`` 1024,
      ``dsc_margin`` 0.5 (th+ = 0.5, th- = -0.5), Adam ``dsc_lr`` 2e-4, weight decay 1e-5;
      adaptor AdamW ``adaptor_lr`` 1e-4 (the official 0.1 x lr 1e-3), weight decay 0.01
      (AdamW's default, as the official code);
    - ``meta_epochs`` 40 of ``gan_epochs`` 4 passes, ``batch_size`` 8;
    - ``sigma`` 4: Gaussian smoothing of the upsampled map (pixels at ``input_size``).

    ``selection``: the official code keeps the meta-epoch with the best image AUROC on the
    *test* set; here "val_auroc" uses the valid split (every ``eval_every`` meta-epochs,
    and the last; without a valid split with both classes the last is kept), "last" the
    last meta-epoch. ``patience`` (in evaluations) stops early.
    """

    family = "one-class + synthesis"
    pixel_level = True
    channels = 3
    size_multiple = 16

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[str] = ("layer2", "layer3"),
        input_size: int | tuple[int, int] = 288,
        patchsize: int = 3,
        pretrain_embed_dimension: int = 1536,
        target_embed_dimension: int = 1536,
        noise_std: float = 0.015,
        dsc_layers: int = 2,
        dsc_hidden: int = 1024,
        dsc_margin: float = 0.5,
        dsc_lr: float = 2e-4,
        dsc_weight_decay: float = 1e-5,
        adaptor_lr: float = 1e-4,
        adaptor_weight_decay: float = 0.01,
        meta_epochs: int = 40,
        gan_epochs: int = 4,
        batch_size: int = 8,
        sigma: float = 4.0,
        selection: str = "val_auroc",
        eval_every: int = 1,
        patience: int | None = None,
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
    ) -> None:
        unknown = [name for name in layers if name not in LAYERS]
        if unknown or not layers:
            raise ValueError(f"layers must be names among {tuple(LAYERS)}, got {tuple(layers)}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        size = as_hw(input_size)
        if size is None:
            raise ValueError("SimpleNet needs an input_size (the official 288, or another multiple of 16)")
        self.backbone = backbone
        self.layers = tuple(sorted(layers, key=LAYERS.get))
        self.input_size = size
        self.patchsize = int(patchsize)
        self.pretrain_embed_dimension = int(pretrain_embed_dimension)
        self.target_embed_dimension = int(target_embed_dimension)
        self.noise_std = float(noise_std)
        self.dsc_layers = int(dsc_layers)
        self.dsc_hidden = int(dsc_hidden)
        self.dsc_margin = float(dsc_margin)
        self.dsc_lr = dsc_lr
        self.dsc_weight_decay = dsc_weight_decay
        self.adaptor_lr = adaptor_lr
        self.adaptor_weight_decay = adaptor_weight_decay
        self.meta_epochs = int(meta_epochs)
        self.gan_epochs = int(gan_epochs)
        self.batch_size = int(batch_size)
        self.sigma = float(sigma)
        self.selection = selection
        self.eval_every = int(eval_every)
        self.patience = patience
        self.pretrained = pretrained
        self.weights = weights
        if pretrained:
            resolve_weights(timm_spec(backbone), weights)  # a missing file fails now, not after data loading
        self.extractor: PatchFeatures | None = None
        self.adaptor: Adaptor | None = None
        self.discriminator: Discriminator | None = None

    # -- building -------------------------------------------------------------------------
    def build(self) -> tuple[PatchFeatures, Adaptor, Discriminator]:
        """The frozen feature extractor, the adaptor and the discriminator (built once)."""
        if self.extractor is None:
            cnn = create_timm_backbone(self.backbone, self.pretrained, self.weights, features_only=True,
                                       out_indices=tuple(LAYERS[name] for name in self.layers))
            self.extractor = PatchFeatures(cnn, self.patchsize, self.pretrain_embed_dimension,
                                           self.target_embed_dimension).to(self.device)
            self.adaptor = Adaptor(self.target_embed_dimension).to(self.device)
            self.discriminator = Discriminator(self.target_embed_dimension, self.dsc_hidden,
                                               self.dsc_layers).to(self.device)
        return self.extractor, self.adaptor, self.discriminator

    def modules(self) -> Iterator[nn.Module]:
        """The extractor, adaptor and discriminator (built if needed)."""
        yield from self.build()

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[0, 1] images -> ImageNet-normalised -> patch features [B*h*w, D] and the grid (h, w)."""
        extractor, _, _ = self.build()
        return extractor(imagenet_normalize(images, self.device))

    # -- training -------------------------------------------------------------------------
    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        """AdamW for the adaptor, Adam for the discriminator (the official pair)."""
        _, adaptor, discriminator = self.build()
        return [
            torch.optim.AdamW(adaptor.parameters(), lr=self.adaptor_lr, weight_decay=self.adaptor_weight_decay),
            torch.optim.Adam(discriminator.parameters(), lr=self.dsc_lr, weight_decay=self.dsc_weight_decay),
        ]

    def training_step(self, images: torch.Tensor, optimizers: list[torch.optim.Optimizer]) -> float:
        """One step: adapted features vs. noised copies through one discriminator pass."""
        _, adaptor, discriminator = self.build()
        adaptor.train()
        discriminator.train()
        feats, _ = self.embed(images)
        q = adaptor(feats)
        scores = discriminator(torch.cat([q, anomalous_features(q, self.noise_std)]))[:, 0]
        loss = truncated_l1(scores[: len(q)], scores[len(q):], self.dsc_margin, -self.dsc_margin)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        return float(loss.detach())

    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """``meta_epochs`` x ``gan_epochs`` passes; keep the meta-epoch chosen by ``selection``."""
        _, adaptor, discriminator = self.build()
        optimizers = self.make_optimizers()
        train_by_epochs(self, train, val, lambda x: self.training_step(x, optimizers),
                        BestCheckpoint({"adaptor": adaptor, "discriminator": discriminator}, self.patience),
                        epochs=self.meta_epochs, selection=self.selection, eval_every=self.eval_every,
                        passes=self.gan_epochs)
        adaptor.eval()
        discriminator.eval()

    # -- scoring --------------------------------------------------------------------------
    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """-D(adaptor(features)) per patch: [B, h, w], higher = more anomalous."""
        _, adaptor, discriminator = self.build()
        adaptor.eval()
        discriminator.eval()
        with torch.no_grad():
            feats, (h, w) = self.embed(images)
            return -discriminator(adaptor(feats)).reshape(images.shape[0], h, w)

    def predict_map(self, images: torch.Tensor) -> Prediction:
        """Score = max of the raw patch scores; map = upsampled, Gaussian-smoothed patch scores."""
        scores = self.patch_scores(images)
        maps = score_maps(scores, tuple(images.shape[-2:]), self.sigma)
        return Prediction(scores.flatten(1).amax(dim=1), maps)
