"""MVFA (Huang et al., CVPR 2024): multi-level visual feature adapters in a frozen CLIP ViT, compared with
text prompts (zero-shot branch) and with the few-shot normal images' features (memory-bank branch).

A segmentation and a detection adapter after ViT blocks 6, 12, 18 and 24 feed back into the residual
stream (x <- 0.8 x + 0.1 seg + 0.1 det). Their hidden features are compared with the text features of
normal / abnormal prompt ensembles and with a memory bank of normal patch features; the two maps are
averaged. The official few-shot mode trains on labelled abnormal images; this is the normal-only variant:
the adapters learn from MediCLIP-style synthetic anomalies made from the few normal training images.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.clip.base import ClipAlgorithm
from algorithms.clip.benches import CLASS_NAMES, FALLBACK_CLASS, bench_key
from algorithms.clip.losses import dice_loss, focal_loss
from algorithms.clip.models import tokenizer_for
from algorithms.clip.prompts import TextCache
from algorithms.mvfa.torch_model import (
    AdaptedFeatures,
    MVFAAdapters,
    augment_views,
    memory_distance,
    patch_anomaly,
    seg_probabilities,
    text_features,
    to_grid,
)
from algorithms.synthesis.rng import rng_for
from algorithms.synthesis.tasks import MediCLIPSynthesis
from bmad.algorithm import Batch, Prediction
from bmad.registry import register
from bmad.weights import WeightSpec

IMAGE_LEVEL_BENCHES = frozenset({"retina_oct2017", "oct2017", "chest", "rsna", "histopathology", "camelyon16"})
"""Benches the official code scores with the detection head (those without pixel masks)."""

MAX_BANK_BYTES = 8 * 2**30
"""The largest memory bank :meth:`MVFA.fit` builds (float32); MVFA is a few-shot method."""

SCORE_HEADS = ("auto", "seg", "det")


def _as_layers(layers: Sequence[int] | str) -> tuple[int, ...]:
    if isinstance(layers, str):
        layers = [int(s) for s in layers.strip("[]()").split(",") if s.strip()]
    out = tuple(sorted({int(i) for i in layers}))
    if not out:
        raise ValueError("layers must name at least one ViT block")
    return out


@register("mvfa")
class MVFA(ClipAlgorithm):
    """MVFA, normal-only few-shot variant, on OpenAI's CLIP ViT-L/14@336 run at 240.

    Defaults (source in docs/algorithms/mvfa.md): ``layers`` (6, 12, 18, 24), 1-based ViT blocks
    after which the adapter pairs sit; ``class_name`` "auto" (the object word from the bench folder,
    :data:`CLASS_NAMES`); ``image_score`` "auto" ("seg": maximum of the fused map; "det": the fused
    detection-head score; "auto": "det" on :data:`IMAGE_LEVEL_BENCHES`, "seg" elsewhere, as the official
    code); ``zero_shot_weight`` 0.5 (the fused map is w x zero-shot + (1 - w) x memory bank);
    ``logit_scale`` 100; Adam ``lr`` 1e-3, ``betas`` (0.5, 0.999), ``batch_size`` 16, ``epochs`` 50;
    ``augment`` True (the official rotations, translations and flips of the few-shot images, for
    training and the memory bank); ``poisson`` True (MediCLIP synthesis's Poisson-blended CutPaste);
    ``bce_with_logits`` False (True: the official code's BCE-with-logits applied to a probability);
    ``official_gelu`` False (True: plain GELU in the CLIP, as the official code runs OpenAI's weights);
    ``normalize_input`` True (False: no mean/std normalisation, as the official code).

    Training: the normal training images (``--shots K``) are kept as uint8 at ``image_size`` (one
    channel when grayscale), augmented, and every view gets :class:`MediCLIPSynthesis` each epoch
    (CutPaste sources: views of the other images), drawn from ``rng_for(seed, epoch, view index)``,
    ``seed`` from :meth:`draw_seed`. Loss per adapted block: focal + Dice on the upsampled segmentation
    probabilities, BCE of the detection head's mean patch P(abnormal) against "the mask is not empty".
    The last epoch is kept; then the memory bank stores the views' adapted patch features.
    """

    family = "CLIP"
    pixel_level = True
    channels = 3
    square = True

    def __init__(
        self,
        clip_model: str = "ViT-L-14-336",
        clip_weights: str | WeightSpec | None = "openai",
        image_size: int = 240,
        layers: Sequence[int] | str = (6, 12, 18, 24),
        class_name: str = "auto",
        image_score: str = "auto",
        zero_shot_weight: float = 0.5,
        logit_scale: float = 100.0,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.5, 0.999),
        batch_size: int = 16,
        epochs: int = 50,
        augment: bool = True,
        poisson: bool = True,
        bce_with_logits: bool = False,
        official_gelu: bool = False,
        normalize_input: bool = True,
        pretrained: bool = True,
        weights: str | None = None,
        allow_torchscript: bool = False,
    ) -> None:
        if image_score not in SCORE_HEADS:
            raise ValueError(f"image_score must be one of {SCORE_HEADS}, got {image_score!r}")
        if not 0.0 <= float(zero_shot_weight) <= 1.0:
            raise ValueError(f"zero_shot_weight must be in [0, 1], got {zero_shot_weight}")
        self.layers = _as_layers(layers)
        self.class_name = class_name
        self.image_score = image_score
        self.zero_shot_weight = float(zero_shot_weight)
        self.logit_scale = float(logit_scale)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.batch_size = int(batch_size)
        self.epochs = int(epochs)
        self.augment = bool(augment)
        self.poisson = bool(poisson)
        self.bce_with_logits = bool(bce_with_logits)
        self.official_gelu = bool(official_gelu)
        self.normalize_input = bool(normalize_input)
        self.prompt_class: str = FALLBACK_CLASS if class_name == "auto" else class_name
        self.score_head: str = "seg" if image_score == "auto" else image_score
        self.banks: dict[str, list[torch.Tensor]] | None = None
        self._text = TextCache()
        self._init_clip(clip_model=clip_model, clip_weights=clip_weights, image_size=image_size,
                        pretrained=pretrained, weights=weights, allow_torchscript=allow_torchscript)

    def build_modules(self, clip: nn.Module) -> None:
        """The adapters for ``clip`` (fails on blocks the ViT does not have); GELU swapped in if asked."""
        visual = clip.visual
        depth = len(visual.transformer.resblocks)
        bad = [i for i in self.layers if not 1 <= i <= depth]
        if bad:
            raise ValueError(f"layers {bad} out of range: {self.clip_model} has vision blocks 1..{depth} (1-based)")
        if self.official_gelu:
            use_plain_gelu(clip)
        self.adapters = MVFAAdapters(width=visual.transformer.width, embed_dim=visual.output_dim, layers=self.layers)
        self._text.clear()
        self.banks = None

    # -- the model ----------------------------------------------------------------------
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """3 channels on the device; normalised with OpenAI's mean/std unless ``normalize_input`` is off."""
        if self.normalize_input:
            return super().prepare(images)
        x = images.to(self.device, torch.float32)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def _sized(self, images: torch.Tensor) -> torch.Tensor:
        side = self.image_size
        if tuple(images.shape[-2:]) == (side, side):
            return images
        return F.interpolate(images.float(), size=(side, side), mode="bilinear", align_corners=False)

    def features(self, images: torch.Tensor) -> AdaptedFeatures:
        """The adapters' hidden patch features for images in [0, 1] (gradients reach the adapters)."""
        clip = self.build()
        return self.adapters(clip, self.prepare(self._sized(images)))

    def text(self) -> torch.Tensor:
        """T (E, 2) for the prompt class (cached; the text tower is frozen)."""
        clip = self.build()
        name = self.prompt_class
        return self._text.get(name, lambda: text_features(clip, tokenizer_for(self.clip_model), name)).to(self.device)

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, segmentation, detection) loss of a batch: images in [0, 1], masks (B, S, S) at ``image_size``."""
        feats, text = self.features(images), self.text()
        masks = masks.to(self.device, torch.float32)
        labels = masks.flatten(1).amax(dim=1)
        seg = torch.zeros((), device=self.device)
        for f in feats.seg:
            probs = seg_probabilities(f, text, self.logit_scale, self.image_size)
            seg = seg + focal_loss(probs, masks) + dice_loss(probs[:, 1], masks)
        bce = F.binary_cross_entropy_with_logits if self.bce_with_logits else F.binary_cross_entropy
        det = torch.zeros((), device=self.device)
        for f in feats.det:
            det = det + bce(patch_anomaly(f, text, self.logit_scale).mean(dim=1), labels)
        return seg + det, seg, det

    def zero_shot_map(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, S, S): P(abnormal) from the text comparison, summed over the adapted blocks."""
        text = self.text()
        return sum(seg_probabilities(f, text, self.logit_scale, self.image_size)[:, 1] for f in feats)

    def memory_map(self, feats: Sequence[torch.Tensor], banks: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, S, S): the cosine distance to the nearest memory-bank feature, upsampled, summed over blocks."""
        return sum(to_grid(memory_distance(f, bank)[..., None], self.image_size)[:, 0] for f, bank in zip(feats, banks))

    # -- training -----------------------------------------------------------------------
    def _collect(self, train: Iterable[Batch]) -> tuple[torch.Tensor, list[str]]:
        """The training images (N, C, S, S) in [0, 1] on the CPU, C = 1 when every image is grayscale,
        and their paths."""
        arrays, paths = [], []
        for batch in train:
            x = self._sized(self.images_of(batch).float()).clamp(0, 1).cpu()
            arrays.append(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
            if isinstance(batch, dict) and batch.get("path") is not None:
                paths.extend(str(p) for p in batch["path"])
        if not arrays:
            raise ValueError("MVFA.fit got no training images")
        stack = torch.cat(arrays)
        gray = bool((stack == stack[:, :1]).all())
        return (stack[:, :1] if gray else stack), paths

    def _views(self, images: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The training views (augmented if ``augment``) and the index of the image each comes from."""
        if not self.augment:
            return images, list(range(images.shape[0]))
        views = augment_views(images).clamp_(0, 1)
        return views, [i % images.shape[0] for i in range(views.shape[0])]

    @staticmethod
    def _uint8(views: torch.Tensor) -> list[np.ndarray]:
        """Views as uint8 arrays for the synthesis: (S, S) for one channel, else (S, S, C)."""
        x = (views * 255).round().to(torch.uint8)
        return list((x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)).numpy())

    def _synthesise(self, views: list[np.ndarray], origin: list[int], indices: Sequence[int],
                    synthesis: MediCLIPSynthesis, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of synthetic anomalies: images (B, C, S, S) in [0, 1] and masks (B, S, S)."""
        xs, ys = [], []
        for i in indices:
            support = ([v for j, v in enumerate(views) if origin[j] != origin[i]]
                       or [v for j, v in enumerate(views) if j != i] or [views[i]])
            image, mask = synthesis(views[i], support, rng_for(seed, epoch, i))
            xs.append(image if image.ndim == 3 else image[..., None])
            ys.append(mask)
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div_(255.0)
        return x.to(self.device), torch.from_numpy(np.stack(ys)).to(self.device)

    def _resolve(self, paths: Sequence[str]) -> None:
        """The prompt class and the image-score head, from the bench folder when "auto"."""
        key = bench_key(paths[0]) if paths else None
        if self.class_name == "auto":
            self.prompt_class = CLASS_NAMES.get(key or "", FALLBACK_CLASS)
        if self.image_score == "auto":
            self.score_head = "det" if key in IMAGE_LEVEL_BENCHES else "seg"

    def _check_bank_size(self, n_views: int) -> None:
        grid = self.clip.visual.grid_size
        heads = 2 if self.score_head == "det" else 1
        size = 4 * n_views * grid[0] * grid[1] * self.clip.visual.output_dim * len(self.layers) * heads
        if size > MAX_BANK_BYTES:
            raise ValueError(f"MVFA's memory bank for {n_views} views would take {size / 2**30:.1f} GiB; it is a "
                             "few-shot method: run it with --shots K (or --param augment=false)")

    @torch.no_grad()
    def _memory(self, views: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """The L2-normalised patch features of ``views`` per adapted block (detection ones only if scored)."""
        heads = ("seg", "det") if self.score_head == "det" else ("seg",)
        parts: dict[str, list[list[torch.Tensor]]] = {h: [[] for _ in self.layers] for h in heads}
        for start in range(0, views.shape[0], self.batch_size):
            feats = self.features(views[start : start + self.batch_size])
            for head in heads:
                for layer, f in zip(parts[head], getattr(feats, head)):
                    layer.append(F.normalize(f, dim=-1).flatten(0, 1))
        return {h: [torch.cat(layer) for layer in parts[h]] for h in heads}

    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Train the adapters for ``epochs`` on synthetic anomalies of the (augmented) training images, then
        fill the memory bank; ``val`` is not used (the last epoch is kept)."""
        self.build()
        images, paths = self._collect(train)
        self._resolve(paths)
        views, origin = self._views(images)
        self._check_bank_size(views.shape[0])
        self.history.append({"epoch": 0, "class_name": self.prompt_class, "image_score": self.score_head,
                             "views": views.shape[0]})
        synth_views = self._uint8(views) if self.epochs else []
        seed = self.draw_seed()
        order = torch.Generator().manual_seed(seed)
        synthesis = MediCLIPSynthesis(poisson=self.poisson)
        optimizer = torch.optim.Adam(self.adapters.parameters(), lr=self.lr, betas=self.betas)
        self.banks = None
        self.adapters.train()
        for epoch in range(self.epochs):
            perm = torch.randperm(len(synth_views), generator=order).tolist()
            sums, seen = np.zeros(3), 0
            for start in range(0, len(perm), self.batch_size):
                idx = perm[start : start + self.batch_size]
                x, y = self._synthesise(synth_views, origin, idx, synthesis, seed, epoch)
                losses = self.loss(x, y)
                optimizer.zero_grad(set_to_none=True)
                losses[0].backward()
                optimizer.step()
                sums += [float(v.detach()) * len(idx) for v in losses]
                seen += len(idx)
            total, seg, det = (float(v) for v in sums / seen)
            self.history.append({"epoch": epoch + 1, "train_loss": total, "seg_loss": seg, "det_loss": det})
        self.adapters.eval()
        self.banks = self._memory(views)

    # -- inference ----------------------------------------------------------------------
    def predict_map(self, images: torch.Tensor) -> Prediction:
        """Map = w x zero-shot + (1 - w) x memory-bank map (segmentation adapters), resized to the input;
        score = its maximum ("seg") or the same fusion of the detection head's image scores ("det")."""
        if self.banks is None:
            raise RuntimeError("MVFA.predict_map needs the memory bank: call fit first")
        w = self.zero_shot_weight
        with torch.no_grad():
            feats = self.features(images)
            fused = w * self.zero_shot_map(feats.seg) + (1 - w) * self.memory_map(feats.seg, self.banks["seg"])
            if self.score_head == "seg":
                scores = fused.flatten(1).amax(dim=1)
            else:
                text = self.text()
                zero = sum(patch_anomaly(f, text, self.logit_scale).mean(dim=1) for f in feats.det)
                scores = w * zero + (1 - w) * self.memory_map(feats.det, self.banks["det"]).flatten(1).mean(dim=1)
            if tuple(fused.shape[-2:]) != tuple(images.shape[-2:]):
                fused = F.interpolate(fused[:, None], size=tuple(images.shape[-2:]), mode="bilinear",
                                      align_corners=False)[:, 0]
        return Prediction(scores, fused)


def use_plain_gelu(clip: nn.Module) -> int:
    """Replace every QuickGELU of ``clip``'s transformer MLPs by ``nn.GELU`` (how the official MVFA code
    runs OpenAI's weights); returns how many were replaced."""
    from open_clip.transformer import QuickGELU

    count = 0
    for module in clip.modules():
        if isinstance(module, nn.Sequential) and isinstance(getattr(module, "gelu", None), QuickGELU):
            module.gelu = nn.GELU()
            count += 1
    return count
