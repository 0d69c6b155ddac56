"""Deep SVDD (Ruff et al., ICML 2018), one-class objective, as a bmad algorithm."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from algorithms.deepsvdd.torch_model import LeNetAutoencoder, LeNetEncoder, gcn_l1, init_center, svdd_scores
from algorithms.inputs import as_hw, imagenet_normalize, three_channels
from bmad.algorithm import Algorithm, Batch, Prediction, batch_images, valid_image_auroc
from bmad.registry import register

NORMALIZATIONS = ("gcn", "imagenet")


@register("deepsvdd")
class DeepSVDD(Algorithm):
    """Bias-free LeNet mapping normal images close to a fixed centre c; score: ||phi(x) - c||^2.

    Training (paper, official code, BMAD's config): optional autoencoder pretraining whose
    encoder initialises phi, then c = mean phi(x) over the training set (phi in eval mode,
    near-zero coordinates pushed to +-``center_eps``), then minimise mean ||phi(x) - c||^2 with
    Adam and a step decay (x0.1 at each milestone). Score: ||phi(x) - c||^2. No maps.

    - ``input_size``: 32 (BMAD runs the CIFAR-10 LeNet at 32 x 32 x 3 on every bench); phi is
      sized for any multiple of 8.
    - ``rep_dim``: 128 (CIFAR-10 LeNet).
    - ``normalize``: "gcn" (paper: per-image global contrast normalisation, L1, then min-max
      scaling with the training set's min and max) or "imagenet" (BMAD's ImageNet mean/std).
    - ``lr`` 1e-4, ``epochs`` 300, ``lr_milestones`` (50,), ``batch_size`` 200 (BMAD's config);
      ``weight_decay`` 0.5e-6 (official CIFAR-10 recipe and the issue; BMAD's config: 0.5e-7).
    - ``pretrain`` True; ``ae_lr`` 1e-5, ``ae_epochs`` 300, ``ae_lr_milestones`` (250,),
      ``ae_weight_decay`` 0.5e-6 (BMAD's config), ``ae_batch_size`` 64 (hard-coded in BMAD).
    - ``center_eps``: 0.1 (official code).
    - ``eval_every``: None keeps the last epoch (the official code); k validates the image
      AUROC on the valid split every k Deep SVDD epochs (and after the last) and keeps the best.

    The training images are held in memory at the working size (32 x 32 x 3 floats: 12 KB each)
    and batched here with a seeded shuffle, so the two stages can use their own batch sizes.
    """

    family = "one-class"
    pixel_level = False
    channels = 3
    size_multiple = 8

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        rep_dim: int = 128,
        normalize: str = "gcn",
        lr: float = 1e-4,
        epochs: int = 300,
        lr_milestones: Sequence[int] = (50,),
        weight_decay: float = 0.5e-6,
        batch_size: int = 200,
        pretrain: bool = True,
        ae_lr: float = 1e-5,
        ae_epochs: int = 300,
        ae_lr_milestones: Sequence[int] = (250,),
        ae_weight_decay: float = 0.5e-6,
        ae_batch_size: int = 64,
        center_eps: float = 0.1,
        eval_every: int | None = None,
    ) -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.input_size = as_hw(input_size)
        self.rep_dim = rep_dim
        self.normalize = normalize
        self.lr = lr
        self.epochs = epochs
        self.lr_milestones = tuple(lr_milestones)
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.pretrain = pretrain
        self.ae_lr = ae_lr
        self.ae_epochs = ae_epochs
        self.ae_lr_milestones = tuple(ae_lr_milestones)
        self.ae_weight_decay = ae_weight_decay
        self.ae_batch_size = ae_batch_size
        self.center_eps = center_eps
        self.eval_every = eval_every
        self.net: LeNetEncoder | None = None
        self.center: torch.Tensor | None = None
        self._minmax: tuple[float, float] = (0.0, 1.0)

    # -- input ------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the network's input (on the device, 3 channels, normalised)."""
        if self.normalize == "gcn":
            lo, hi = self._minmax
            return (gcn_l1(three_channels(images, self.device)) - lo) / (hi - lo)
        return imagenet_normalize(images, self.device)

    # -- the contract -----------------------------------------------------------------
    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Autoencoder pretraining (if ``pretrain``), centre, then the one-class objective."""
        raw = [batch_images(b).to(torch.float32).cpu() for b in train]
        if not raw:
            raise ValueError("DeepSVDD.fit: the training set is empty")
        images = torch.cat(raw)
        if self.normalize == "gcn":
            g = gcn_l1(images)
            lo, hi = float(g.min()), float(g.max())
            self._minmax = (lo, hi if hi > lo else lo + 1.0)
        x = self.preprocess(images)
        size = (x.shape[-2], x.shape[-1])
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))

        self.net = LeNetEncoder(x.shape[1], size, self.rep_dim).to(self.device)
        if self.pretrain:
            ae = LeNetAutoencoder(x.shape[1], size, self.rep_dim).to(self.device)
            self._train_autoencoder(ae, x, gen)
            self.net.load_state_dict(ae.encoder.state_dict())

        self.center = init_center(self.embed(x), self.center_eps)
        self._train_svdd(x, gen, val)

    def _train_autoencoder(self, ae: LeNetAutoencoder, x: torch.Tensor, gen: torch.Generator) -> None:
        """Minimise the per-image summed squared reconstruction error, averaged over the batch."""
        opt = torch.optim.Adam(ae.parameters(), lr=self.ae_lr, weight_decay=self.ae_weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.ae_lr_milestones), gamma=0.1)
        ae.train()
        for epoch in range(1, self.ae_epochs + 1):
            losses = []
            for idx in torch.randperm(len(x), generator=gen).split(self.ae_batch_size):
                xb = x[idx.to(x.device)]
                loss = ((ae(xb) - xb) ** 2).flatten(1).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            sched.step()
            self.history.append({"stage": "autoencoder", "epoch": epoch, "train_loss": float(np.mean(losses))})

    def _train_svdd(self, x: torch.Tensor, gen: torch.Generator, val: Iterable[Batch] | None) -> None:
        """Minimise mean ||phi(x) - c||^2 (phi in train mode: BN uses batch statistics)."""
        net, center = self.net, self.center
        assert net is not None and center is not None
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.lr_milestones), gamma=0.1)
        best: tuple[float, dict[str, torch.Tensor] | None, int] = (-1.0, None, 0)
        for epoch in range(1, self.epochs + 1):
            net.train()
            losses = []
            for idx in torch.randperm(len(x), generator=gen).split(self.batch_size):
                loss = svdd_scores(net(x[idx.to(x.device)]), center).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            sched.step()
            record: dict[str, Any] = {"stage": "svdd", "epoch": epoch, "train_loss": float(np.mean(losses))}
            if val is not None and self.eval_every and (epoch % self.eval_every == 0 or epoch == self.epochs):
                auroc = valid_image_auroc(self, val)
                record["val_image_auroc"] = auroc
                if auroc is not None and auroc > best[0]:
                    best = (auroc, copy.deepcopy(net.state_dict()), epoch)
            self.history.append(record)
        net.eval()
        if best[1] is not None:
            net.load_state_dict(best[1])
            self.history.append({"selected_epoch": best[2], "val_image_auroc": best[0]})

    @torch.no_grad()
    def embed(self, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """phi(x) in eval mode for preprocessed images ``x`` [N, C, H, W] -> [N, rep_dim]."""
        if self.net is None:
            raise RuntimeError("DeepSVDD: call fit() first")
        self.net.eval()
        return torch.cat([self.net(part) for part in x.split(chunk)])

    def predict_map(self, images: torch.Tensor) -> Prediction:
        """Scores ||phi(x) - c||^2; no maps."""
        if self.center is None:
            raise RuntimeError("DeepSVDD: call fit() first")
        feats = self.embed(self.preprocess(images))
        return Prediction(scores=svdd_scores(feats, self.center.to(feats.device)), maps=None)

    def to(self, device: str | torch.device) -> DeepSVDD:
        """Move phi and c to ``device``."""
        super().to(device)
        if self.center is not None:
            self.center = self.center.to(self.device)
        return self
