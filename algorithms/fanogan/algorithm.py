"""f-AnoGAN (Schlegl et al., Medical Image Analysis 2019) as a bmad algorithm."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from algorithms.fanogan.torch_model import ARCHITECTURES, anomaly_score, build_networks, gradient_penalty, izif_loss
from algorithms.inputs import as_hw
from bmad.algorithm import Algorithm, Batch, Prediction, batch_images, valid_image_auroc
from bmad.registry import register


@register("fanogan")
class FAnoGAN(Algorithm):
    """WGAN-GP + izi_f encoder; score: image + critic-feature residual of x -> G(E(x)).

    Two stages on normal images: a WGAN-GP (generator G, critic D), then, with G and D frozen,
    the izi_f encoder E trained on ||x - G(E(x))||^2 + kappa ||f(x) - f(G(E(x)))||^2 (f: D's
    last features). Score: the same sum per image, A(x) = A_R + kappa A_D (the paper's).

    - ``architecture``: "resnet" (the paper's residual WGAN-GP, ``dim`` 64) or "dcgan" (BMAD's
      vendored PyTorch port; with ``input_size=224`` it is BMAD's exact setting).
    - ``input_size`` 64 (the paper's; BMAD: 224). Square, a multiple of 16. Images are scaled
      to [-1, 1].
    - ``latent_dim`` 100, ``batch_size`` 32, Adam ``lr`` 2e-4, ``betas`` (0.5, 0.999) for all
      three networks, ``n_critic`` 5 (G steps on batches 0, 5, 10, ... of each epoch),
      ``lambda_gp`` 10, ``kappa`` 1 (BMAD's config; the paper's official code: latent 128,
      batch 64, Adam 1e-4 (0, 0.9), encoder RMSProp 5e-5).
    - ``epochs`` 200 for each stage (BMAD); ``encoder_epochs`` overrides the second stage's.
    - ``residual_map``: False (BMAD reports no maps); True returns the paper's residual map
      |x - G(E(x))| averaged over channels (the instance then reports ``pixel_level``).
    - ``eval_every``: None keeps the last epochs (BMAD); k validates the image AUROC on the
      valid split every k encoder epochs (and after the last) and keeps the best encoder.
    """

    family = "reconstruction (GAN)"
    pixel_level = False
    channels = 3
    size_multiple = 16
    square = True

    def __init__(
        self,
        architecture: str = "resnet",
        input_size: int | tuple[int, int] = 64,
        latent_dim: int = 100,
        dim: int = 64,
        epochs: int = 200,
        encoder_epochs: int | None = None,
        batch_size: int = 32,
        lr: float = 2e-4,
        betas: Sequence[float] = (0.5, 0.999),
        n_critic: int = 5,
        lambda_gp: float = 10.0,
        kappa: float = 1.0,
        residual_map: bool = False,
        eval_every: int | None = None,
    ) -> None:
        if architecture not in ARCHITECTURES:
            raise ValueError(f"f-AnoGAN architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        self.architecture = architecture
        self.input_size = as_hw(input_size)
        self.latent_dim = latent_dim
        self.dim = dim
        self.epochs = epochs
        self.encoder_epochs = encoder_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.betas = tuple(betas)
        self.n_critic = n_critic
        self.lambda_gp = lambda_gp
        self.kappa = kappa
        self.residual_map = residual_map
        self.eval_every = eval_every
        self.pixel_level = residual_map  # instance value: maps only with residual_map
        self.generator: torch.nn.Module | None = None
        self.critic: torch.nn.Module | None = None
        self.encoder: torch.nn.Module | None = None

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> [-1, 1], 3 channels, on the device."""
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x * 2 - 1

    # -- training ---------------------------------------------------------------------
    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Stage 1 (WGAN-GP), then stage 2 (izi_f encoder)."""
        first = next(iter(train), None)
        if first is None:
            raise ValueError("FAnoGAN.fit: the training set is empty")
        _, c, h, w = batch_images(first).shape
        if h != w:
            raise ValueError(f"f-AnoGAN needs square inputs, got {h} x {w}")
        nets = build_networks(self.architecture, self.latent_dim, c, h, self.dim)
        self.generator, self.critic, self.encoder = (n.to(self.device) for n in nets)
        rng = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        self._train_gan(train, rng)
        self._train_encoder(train, val)
        for net in (self.generator, self.critic, self.encoder):
            net.requires_grad_(True)  # all three were trained (the count of trainable parameters)
            net.eval()

    def _train_gan(self, train: Iterable[Batch], rng: torch.Generator) -> None:
        g, d = self.generator, self.critic
        assert g is not None and d is not None
        opt_g = torch.optim.Adam(g.parameters(), lr=self.lr, betas=self.betas)
        opt_d = torch.optim.Adam(d.parameters(), lr=self.lr, betas=self.betas)
        for epoch in range(1, self.epochs + 1):
            g.train()
            d.train()
            logs: dict[str, list[float]] = {"train_loss": [], "wasserstein": [], "gp": [], "g_loss": []}
            for i, batch in enumerate(train):
                x = self._prepare(batch_images(batch))
                z = torch.randn(x.shape[0], self.latent_dim, generator=rng).to(self.device)
                alpha = torch.rand(x.shape[0], 1, 1, 1, generator=rng).to(self.device)
                with torch.no_grad():  # the critic's step needs no graph through G
                    fake = g(z)
                w_dist = d(x).mean() - d(fake).mean()
                gp = gradient_penalty(d, x, fake, alpha)
                d_loss = -w_dist + self.lambda_gp * gp
                opt_d.zero_grad()
                d_loss.backward()
                opt_d.step()
                if i % self.n_critic == 0:
                    g_loss = -d(g(z)).mean()
                    opt_g.zero_grad()
                    g_loss.backward()
                    opt_g.step()
                    logs["g_loss"].append(float(g_loss.detach()))
                logs["train_loss"].append(float(d_loss.detach()))
                logs["wasserstein"].append(float(w_dist.detach()))
                logs["gp"].append(float(gp.detach()))
            self.history.append({"stage": "wgan_gp", "epoch": epoch, **{k: float(np.mean(v)) for k, v in logs.items()}})

    def _train_encoder(self, train: Iterable[Batch], val: Iterable[Batch] | None) -> None:
        g, d, e = self.generator, self.critic, self.encoder
        assert g is not None and d is not None and e is not None
        for frozen in (g, d):
            frozen.eval()
            frozen.requires_grad_(False)
        opt = torch.optim.Adam(e.parameters(), lr=self.lr, betas=self.betas)
        n_epochs = self.epochs if self.encoder_epochs is None else self.encoder_epochs
        best: tuple[float, dict[str, torch.Tensor] | None, int] = (-1.0, None, 0)
        for epoch in range(1, n_epochs + 1):
            e.train()
            losses = []
            for batch in train:
                loss = izif_loss(g, d, e, self._prepare(batch_images(batch)), self.kappa)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            record: dict[str, Any] = {"stage": "encoder", "epoch": epoch, "train_loss": float(np.mean(losses))}
            if val is not None and self.eval_every and (epoch % self.eval_every == 0 or epoch == n_epochs):
                auroc = valid_image_auroc(self, val)
                record["val_image_auroc"] = auroc
                if auroc is not None and auroc > best[0]:
                    best = (auroc, copy.deepcopy(e.state_dict()), epoch)
            self.history.append(record)
        if best[1] is not None:
            e.load_state_dict(best[1])
            self.history.append({"selected_epoch": best[2], "val_image_auroc": best[0]})

    # -- inference --------------------------------------------------------------------
    @torch.no_grad()
    def predict_map(self, images: torch.Tensor) -> Prediction:
        """Scores A(x); with ``residual_map``, maps |x - G(E(x))| averaged over channels."""
        if self.encoder is None or self.generator is None or self.critic is None:
            raise RuntimeError("FAnoGAN: call fit() first")
        for net in (self.generator, self.critic, self.encoder):
            net.eval()
        scores, residual = anomaly_score(self.generator, self.critic, self.encoder, self._prepare(images), self.kappa)
        return Prediction(scores=scores, maps=residual.mean(1) if self.residual_map else None)
