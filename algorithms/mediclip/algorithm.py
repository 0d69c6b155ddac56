"""MediCLIP (Zhang et al., MICCAI 2024): few-shot CLIP adaptation with synthetic medical anomalies.

A frozen CLIP ViT; trainable 1x1-conv adapters on the tokens after three blocks and
class-specific learned prompts; trained with focal + Dice loss on MediCLIP's multi-task
synthetic anomalies (CutPaste, GaussIntensityChange, Source, Identity) made from the few
normal training images. Map = P(anomaly) per pixel, score = its maximum.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.clip.base import ClipAlgorithm
from algorithms.clip.encode import encode_image
from algorithms.clip.losses import dice_loss, focal_loss
from algorithms.clip.models import tokenizer_for
from algorithms.clip.prompts import TextCache
from algorithms.mediclip.torch_model import MediCLIPHead
from algorithms.synthesis.rng import rng_for
from algorithms.synthesis.tasks import MediCLIPSynthesis
from bmad.algorithm import Batch, Prediction
from bmad.registry import register
from bmad.weights import WeightSpec


@register("mediclip")
class MediCLIP(ClipAlgorithm):
    """MediCLIP on a frozen OpenAI CLIP ViT-L/14 at 224.

    Defaults (paper unless said): ``layers`` (11, 17, 23), the 0-based blocks whose output
    tokens feed the adapters (the paper's "12th, 18th and 24th layers"); ``n_ctx`` 8 learned
    tokens per class word; ``temperature`` 0.07 (None: the official code's plain cosine, which
    confines the probabilities to about [0.12, 0.88]); ``causal_mask`` True (False: the
    official code's text transformer without its causal mask); Adam ``lr`` 1e-3, ``betas``
    (0.5, 0.999) and ``batch_size`` 8 (official code), ``epochs`` 200 (official configs), the
    last epoch's weights are kept (no model selection); ``poisson`` True: CutPaste blends with
    Poisson editing as the paper says (False: the official code's hard paste). Weights: open_clip's
    ``ViT-L-14`` / ``openai`` file (QuickGELU); ``allow_torchscript`` accepts OpenAI's original
    TorchScript ``.pt`` (it can run code: only for a trusted file).

    Training: the normal training images (the few-shot set, ``--shots`` 4/8/16/32) are kept in
    memory as uint8 at ``image_size`` (grayscale when their channels are equal, as the official
    code's); each epoch visits them in a seeded random order and every image gets
    :class:`MediCLIPSynthesis` with the other training images as CutPaste sources, drawn from
    ``rng_for(seed, epoch, index)`` with ``seed`` drawn at the start of :meth:`fit`.
    """

    family = "CLIP"
    pixel_level = True
    channels = 3
    square = True

    def __init__(
        self,
        clip_model: str = "ViT-L-14",
        clip_weights: str | WeightSpec | None = "openai",
        image_size: int = 224,
        layers: Sequence[int] | str = (11, 17, 23),
        n_ctx: int = 8,
        temperature: float | None = 0.07,
        causal_mask: bool = True,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.5, 0.999),
        batch_size: int = 8,
        epochs: int = 200,
        poisson: bool = True,
        pretrained: bool = True,
        weights: str | None = None,
        allow_torchscript: bool = False,
    ) -> None:
        if isinstance(layers, str):
            layers = [int(s) for s in layers.split(",") if s.strip()]
        self.layers = tuple(int(i) for i in layers)
        if not self.layers:
            raise ValueError("layers must name at least one ViT block")
        self.n_ctx = int(n_ctx)
        self.temperature = None if temperature is None else float(temperature)
        self.causal_mask = bool(causal_mask)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.batch_size = int(batch_size)
        self.epochs = int(epochs)
        self.poisson = bool(poisson)
        self._text = TextCache()
        self._init_clip(clip_model=clip_model, clip_weights=clip_weights, image_size=image_size,
                        pretrained=pretrained, weights=weights, allow_torchscript=allow_torchscript)

    def build_modules(self, clip: nn.Module) -> None:
        """The adapters and prompts for ``clip`` (fails on blocks the ViT does not have)."""
        visual = clip.visual
        depth = len(visual.transformer.resblocks)
        bad = [i for i in self.layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"layers {bad} out of range: {self.clip_model} has {depth} vision blocks (0-based)")
        self.head = MediCLIPHead(
            width=visual.transformer.width, embed_dim=visual.output_dim, text_width=clip.ln_final.weight.shape[0],
            grid=visual.grid_size, tokenizer=tokenizer_for(self.clip_model), layers=self.layers, n_ctx=self.n_ctx,
            temperature=self.temperature, causal_mask=self.causal_mask,
        )
        self._text.clear()

    # -- the model ----------------------------------------------------------------------
    def _sized(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` resized (bilinear) to ``image_size`` if they are not already."""
        side = self.image_size
        if tuple(images.shape[-2:]) == (side, side):
            return images
        return F.interpolate(images.float(), size=(side, side), mode="bilinear", align_corners=False)

    def probabilities(self, images: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities (B, 2, S, S) at ``image_size`` S for images in [0, 1]; ``text`` defaults
        to the cached text features (gradients then reach the adapters only)."""
        clip = self.build()
        with torch.no_grad():
            tokens = encode_image(clip, self.prepare(self._sized(images)), keep=self.layers).intermediates
        if text is None:
            text = self._text.get("text", lambda: self.head.text_features(clip)).to(self.device)
        return self.head(tokens, text, (self.image_size, self.image_size))

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Focal + Dice loss of one batch (images in [0, 1], masks (B, S, S)), text recomputed with gradients."""
        probs = self.probabilities(images, self.head.text_features(self.build()))
        masks = masks.to(probs.device, probs.dtype)
        return focal_loss(probs, masks) + dice_loss(probs[:, 1], masks)

    # -- training -----------------------------------------------------------------------
    def _keep_uint8(self, train: Iterable[Batch]) -> list[np.ndarray]:
        """The training images as uint8 (S, S) arrays, or (S, S, 3) if any is coloured."""
        arrays = []
        for batch in train:
            x = self._sized(self.images_of(batch).float())
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            arrays.append((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        if not arrays:
            raise ValueError("MediCLIP.fit got no training images")
        stack = np.concatenate(arrays)
        gray = bool((stack == stack[..., :1]).all())
        return list(stack[..., 0] if gray else stack)

    def _synthesise(self, images: list[np.ndarray], indices: Sequence[int], synthesis: MediCLIPSynthesis,
                    seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of synthetic anomalies: images (B, C, S, S) in [0, 1] and masks (B, S, S)."""
        xs, ys = [], []
        for i in indices:
            support = [im for j, im in enumerate(images) if j != i] or [images[i]]
            image, mask = synthesis(images[i], support, rng_for(seed, epoch, i))
            xs.append(image if image.ndim == 3 else image[..., None])
            ys.append(mask)
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div_(255.0)
        return x.to(self.device), torch.from_numpy(np.stack(ys)).to(self.device)

    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Train adapters and prompts for ``epochs`` on synthetic anomalies of the training images;
        ``val`` is not used (the last epoch is kept)."""
        self.build()
        images = self._keep_uint8(train)
        seed = self.draw_seed()
        order = torch.Generator().manual_seed(seed)
        synthesis = MediCLIPSynthesis(poisson=self.poisson)
        params = [p for p in self.head.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.lr, betas=self.betas)
        self._text.clear()
        self.head.train()
        for epoch in range(self.epochs):
            perm = torch.randperm(len(images), generator=order).tolist()
            total, seen = 0.0, 0
            for start in range(0, len(perm), self.batch_size):
                idx = perm[start : start + self.batch_size]
                x, y = self._synthesise(images, idx, synthesis, seed, epoch)
                loss = self.loss(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            self.history.append({"epoch": epoch + 1, "train_loss": total / seen})
        self.head.eval()
        self._text.clear()

    # -- inference ----------------------------------------------------------------------
    def predict_map(self, images: torch.Tensor) -> Prediction:
        """Map = P(anomaly) at ``image_size`` (resized back to the input size if it differs); score = its max."""
        with torch.no_grad():
            anomaly = self.probabilities(images)[:, 1]
            scores = anomaly.flatten(1).amax(dim=1)
            if tuple(anomaly.shape[-2:]) != tuple(images.shape[-2:]):
                anomaly = F.interpolate(anomaly[:, None], size=tuple(images.shape[-2:]), mode="bilinear",
                                        align_corners=False)[:, 0]
        return Prediction(scores, anomaly)
