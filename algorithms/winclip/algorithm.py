"""WinCLIP (Jeong et al., CVPR 2023) through anomalib 2.7's ``WinClipModel``, with an injected CLIP.

anomalib's ``WinClipModel.__init__`` downloads ViT-B-16-plus-240 through
``open_clip.create_model_and_transforms``. Here the module is created without running
that constructor: :func:`winclip_model` sets up the same state (the CLIP with
``output_tokens``, its grid, the sliding-window masks, the empty embedding buffers) around
a CLIP built offline by :func:`~algorithms.clip.models.build_clip`; everything after
that (``setup``, ``forward``) is anomalib's own code. tests/test_winclip.py checks the
result against anomalib's class built by its own constructor.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.clip.base import ClipAlgorithm
from algorithms.clip.benches import FALLBACK_CLASS, class_name_for
from bmad.algorithm import Batch, Prediction
from bmad.registry import register
from bmad.weights import WeightSpec


def bench_relative(path: str | os.PathLike) -> str:
    """``path`` from its split folder on (``train/good/img/x.png``), as records store file lists."""
    parts = Path(path).parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("train", "valid", "test"):
            return Path(*parts[i:]).as_posix()
    return Path(path).as_posix()


def winclip_model(clip: nn.Module, *, scales: Sequence[int], temperature: float, backbone: str,
                  pretrained: str | None) -> nn.Module:
    """anomalib's ``WinClipModel`` around ``clip``, built without its downloading constructor.

    Sets the attributes and buffers ``WinClipModel.__init__`` sets (anomalib 2.7), then
    nothing else: ``setup(class_name, reference_images)`` collects the embeddings.
    """
    from anomalib.models.image.winclip.torch_model import WinClipModel

    model = WinClipModel.__new__(WinClipModel)
    super(WinClipModel, model).__init__()
    model.backbone = backbone
    model.pretrained = pretrained
    model.temperature = temperature
    model.class_name = None
    model.reference_images = None
    model.scales = tuple(scales)
    model.apply_transform = False
    model.k_shot = 0
    model.clip = clip
    model._transform = None  # only read when apply_transform is True
    clip.visual.output_tokens = True
    model.grid_size = clip.visual.grid_size
    model.register_buffer_list("masks", model._generate_masks(), persistent=False)
    model.register_buffer("_text_embeddings", torch.empty(0))
    model.register_buffer_list("_visual_embeddings", [torch.empty(0) for _ in model.scales])
    model.register_buffer("_patch_embeddings", torch.empty(0))
    return model


@register("winclip")
class WinClip(ClipAlgorithm):
    """Zero-shot (``k_shot=0``) or few-shot WinCLIP; anomalib's raw scores and maps.

    - ``class_name``: the object word of the prompt ensemble; "auto" picks it from the
      bench folder of the training images (:data:`CLASS_NAMES`: Brain, Liver, retinal OCT,
      Chest X-ray film, histopathological image; "object" otherwise).
    - ``k_shot``: number of normal reference images, drawn uniformly from the whole
      training set with a seeded generator (anomalib takes the first k of its loader).
    - ``scales`` (2, 3) and ``temperature`` 0.07: anomalib's (the paper's).
    - ``clip_model`` / ``clip_weights`` / ``image_size``: ViT-B-16-plus-240, laion400m_e31,
      240 (anomalib's fixed backbone and input size), built offline.

    Inputs: resized by the harness (bilinear; anomalib's pre-processor uses bicubic) and
    normalised with OpenAI CLIP's mean/std as anomalib's pre-processor does.
    """

    pixel_level = True
    channels = 3

    def __init__(
        self,
        class_name: str = "auto",
        k_shot: int = 0,
        scales: Sequence[int] = (2, 3),
        temperature: float = 0.07,
        clip_model: str = "ViT-B-16-plus-240",
        clip_weights: str | WeightSpec | None = "laion400m_e31",
        image_size: int = 240,
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
    ) -> None:
        if k_shot < 0:
            raise ValueError(f"k_shot must be >= 0, got {k_shot}")
        self.class_name = class_name
        self.k_shot = int(k_shot)
        self.scales = tuple(int(s) for s in scales)
        self.temperature = float(temperature)
        self.model: nn.Module | None = None
        self.prompt_class: str | None = None
        self.reference_paths: list[str | None] = []
        self._init_clip(clip_model=clip_model, clip_weights=clip_weights, image_size=image_size,
                        pretrained=pretrained, weights=weights)

    def build_modules(self, clip: nn.Module) -> None:
        """anomalib's module around the frozen CLIP."""
        self.model = winclip_model(clip, scales=self.scales, temperature=self.temperature, backbone=self.clip_model,
                                   pretrained=self.clip_weights if self.pretrained else None)

    def _model_size(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        side = (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != side:
            x = F.interpolate(x, size=side, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        return x

    def draw_references(self, train: Iterable[Batch]) -> tuple[torch.Tensor, list[str | None]]:
        """``k_shot`` training images drawn uniformly without replacement (reservoir sampling, seeded).

        Returns the images [k, C, H, W] (on the CPU, at the loader's size) and their paths from the
        split folder on (None for batches without paths).
        """
        rng = np.random.default_rng(self.draw_seed())
        kept: list[torch.Tensor] = []
        paths: list[str | None] = []
        seen = 0
        for batch in train:
            images = self.images_of(batch)
            names = batch.get("path") if isinstance(batch, dict) else None
            for j in range(images.shape[0]):
                slot = seen if seen < self.k_shot else int(rng.integers(0, seen + 1))
                if slot < self.k_shot:
                    image = images[j].detach().cpu().clone()
                    name = None if names is None else bench_relative(names[j])
                    if slot == len(kept):
                        kept.append(image)
                        paths.append(name)
                    else:
                        kept[slot], paths[slot] = image, name
                seen += 1
        if not kept:
            raise ValueError("WinCLIP few-shot needs training images, got none")
        return torch.stack(kept), paths

    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Collect the text embeddings and, with ``k_shot``, the reference images' (no training)."""
        self.build()
        name = self.class_name
        if name == "auto":
            first = next(iter(train), None)
            path = first.get("path") if isinstance(first, dict) else None
            name = class_name_for(path[0]) if path else FALLBACK_CLASS
        references = None
        self.reference_paths = []
        if self.k_shot:
            images, self.reference_paths = self.draw_references(train)
            references = self.prepare(self._model_size(images))
        self.prompt_class = name
        self.model.setup(name, references)
        self.history.append({"epoch": 0, "class_name": name, "reference_images": list(self.reference_paths)})

    @torch.no_grad()
    def predict_map(self, images: torch.Tensor) -> Prediction:
        """anomalib's ``WinClipModel`` forward: image scores and maps (resized to the input size)."""
        self.build()
        out = self.model(self.prepare(self._model_size(images)))
        maps = out.anomaly_map.reshape(images.shape[0], 1, *out.anomaly_map.shape[-2:])
        if tuple(maps.shape[-2:]) != tuple(images.shape[-2:]):
            maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return Prediction(out.pred_score.reshape(-1), maps[:, 0])
