"""MVFA's parts: paired residual adapters inside a frozen CLIP ViT, its text prompt ensemble, and the
zero-shot and memory-bank comparisons.

The frozen CLIP is not a sub-module of :class:`MVFAAdapters`: it is passed to ``forward``, so a
state dict of the adapters holds the trainable parameters only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.clip.encode import encode_image

RESIDUAL: tuple[float, float, float] = (0.8, 0.1, 0.1)
"""Weights of (tokens, segmentation adapter output, detection adapter output) in the residual mix."""

NORMAL_STATES: tuple[str, ...] = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage",
)
"""State phrases of the normal prompts (official code; ``{}`` is the object word)."""

ABNORMAL_STATES: tuple[str, ...] = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
"""State phrases of the abnormal prompts (official code)."""

TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a photo of one {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "a low resolution photo of a {}.", "a photo of a large {}.", "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
)
"""The 35 sentence templates of the official prompt ensemble (CLIP's ImageNet-style templates)."""


def prompt_texts(class_name: str) -> tuple[list[str], list[str]]:
    """The normal and abnormal prompts for ``class_name``: every state phrase in every template."""
    normal = [t.format(s.format(class_name)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(class_name)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal, abnormal


@torch.no_grad()
def text_features(clip: nn.Module, tokenizer: Any, class_name: str) -> torch.Tensor:
    """T (E, 2): per class, the mean of the L2-normalised prompt features, L2-normalised (normal first)."""
    device = next(clip.parameters()).device
    columns = []
    for texts in prompt_texts(class_name):
        features = F.normalize(clip.encode_text(tokenizer(texts).to(device)), dim=-1)
        columns.append(F.normalize(features.mean(dim=0), dim=0))
    return torch.stack(columns, dim=1)


class Adapter(nn.Module):
    """Linear(W -> E, no bias) -> LeakyReLU -> Linear(E -> W, no bias) -> LeakyReLU.

    ``forward`` returns the hidden features (.., E), which are compared with the text features,
    and the output (.., W), which goes back into the residual stream.
    """

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, width, bias=False)
        self.act = nn.LeakyReLU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.act(self.down(x))
        return hidden, self.act(self.up(hidden))


@dataclass
class AdaptedFeatures:
    """Hidden features of the adapters, one (B, P, E) tensor per adapted block (class token dropped)."""

    seg: list[torch.Tensor]
    det: list[torch.Tensor]


class MVFAAdapters(nn.Module):
    """A segmentation and a detection :class:`Adapter` after each of ``layers`` (1-based ViT blocks).

    After block l the tokens x become ``0.8 x + 0.1 seg(x) + 0.1 det(x)`` (:data:`RESIDUAL`) before
    they enter block l + 1; the adapters' hidden features are the outputs.
    """

    def __init__(self, *, width: int, embed_dim: int, layers: Sequence[int],
                 residual: tuple[float, float, float] = RESIDUAL) -> None:
        super().__init__()
        self.layers = tuple(int(i) for i in layers)
        self.residual = residual
        self.seg = nn.ModuleList(Adapter(width, embed_dim) for _ in self.layers)
        self.det = nn.ModuleList(Adapter(width, embed_dim) for _ in self.layers)

    def mix(self, j: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adapter pair ``j`` on tokens ``x``: (mixed tokens, segmentation hidden, detection hidden)."""
        seg_hidden, seg_out = self.seg[j](x)
        det_hidden, det_out = self.det[j](x)
        a, b, c = self.residual
        return a * x + b * seg_out + c * det_out, seg_hidden, det_hidden

    def forward(self, clip: nn.Module, images: torch.Tensor) -> AdaptedFeatures:
        """Run the vision tower on prepared ``images`` with the adapters in its residual stream."""
        depth = len(clip.visual.transformer.resblocks)
        seg: dict[int, torch.Tensor] = {}
        det: dict[int, torch.Tensor] = {}

        def adapt(layer: int, x: torch.Tensor) -> torch.Tensor:
            mixed, seg[layer], det[layer] = self.mix(self.layers.index(layer), x)
            return mixed

        def hook(i: int, x: torch.Tensor) -> torch.Tensor:
            # called before block i (0-based), i.e. on the output of block i (1-based)
            return adapt(i, x) if i in self.layers else x

        out = encode_image(clip, images, before_block=hook, keep=(depth - 1,) if depth in self.layers else ())
        if depth in self.layers:  # no block follows the last one: adapt its output here
            adapt(depth, out.intermediates[depth - 1])
        return AdaptedFeatures([seg[i][:, 1:] for i in self.layers], [det[i][:, 1:] for i in self.layers])


def class_logits(features: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(B, P, 2): ``logit_scale`` x cosine similarity of each patch feature with the normal / abnormal text."""
    return logit_scale * F.normalize(features, dim=-1) @ text


def to_grid(values: torch.Tensor, size: int) -> torch.Tensor:
    """(B, P, C) patch values -> (B, C, size, size), bilinear (align_corners=True) from the square patch grid."""
    b, p, c = values.shape
    side = round(p**0.5)
    if side * side != p:
        raise ValueError(f"{p} patches do not form a square grid")
    grid = values.transpose(1, 2).reshape(b, c, side, side)
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)


def seg_probabilities(features: torch.Tensor, text: torch.Tensor, logit_scale: float, size: int) -> torch.Tensor:
    """(B, 2, size, size): class logits upsampled to ``size``, then softmaxed over the two classes."""
    return to_grid(class_logits(features, text, logit_scale), size).softmax(dim=1)


def patch_anomaly(features: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(B, P): per-patch P(abnormal) without upsampling (the detection head's view)."""
    return class_logits(features, text, logit_scale).softmax(dim=-1)[..., 1]


def memory_distance(features: torch.Tensor, bank: torch.Tensor, chunk: int = 32768) -> torch.Tensor:
    """(B, P): 1 - the highest cosine similarity of each patch feature with the (N, E) L2-normalised ``bank``."""
    query = F.normalize(features, dim=-1).flatten(0, 1)
    best = torch.full((query.shape[0],), -torch.inf, device=query.device, dtype=query.dtype)
    for start in range(0, bank.shape[0], chunk):
        best = torch.maximum(best, (query @ bank[start : start + chunk].T).amax(dim=1))
    return (1.0 - best).view(features.shape[:2])


def augment_views(images: torch.Tensor) -> torch.Tensor:
    """The official few-shot augmentation: (N, C, H, W) -> (11 N, C, H, W), in blocks of N: the images,
    rotations by -pi/8, -pi/16, pi/16, pi/8, translations by (+-0.1, +-0.1) in normalised coordinates
    (5% of the side), a horizontal and a vertical flip. Resampling is bilinear with reflected borders."""
    x = images.float()
    n = x.shape[0]
    thetas = []
    for angle in (-torch.pi / 8, -torch.pi / 16, torch.pi / 16, torch.pi / 8):
        c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
        thetas.append(torch.tensor([[c, -s, 0.0], [s, c, 0.0]]))
    for a, b in ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1)):
        thetas.append(torch.tensor([[1.0, 0.0, a], [0.0, 1.0, b]]))
    views = [x]
    for theta in thetas:
        grid = F.affine_grid(theta.to(x.device).expand(n, 2, 3), list(x.shape), align_corners=False)
        views.append(F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False))
    views += [x.flip(-1), x.flip(-2)]
    return torch.cat(views)
