"""CLAP (Park et al., 2024): contrastive-prompt M2IB attention + EAR's inpainting U-Net."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from algorithms.clap.prompts import prompts_for
from algorithms.clap.saliency import clap_attention, clap_mask, m2ib_saliency
from algorithms.clap.torch_model import GMS_C, UNet, mean_filter, msgms_loss, msgms_map, obfuscate
from algorithms.clip.base import ClipAlgorithm
from algorithms.clip.models import HF_HUB, LOCAL_DIR, tokenizer_for
from bmad.algorithm import Batch, Prediction, batch_images
from bmad.registry import register

BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
HUB_WEIGHTS = "hub"
"""``clip_weights`` value meaning "the weights shipped with a hf-hub: / local-dir: model"."""


@register("clap")
class Clap(ClipAlgorithm):
    """CLAP: a U-Net reconstructs images whose suspected-lesion regions are mosaicked.

    1. Attention: M2IB saliency of BiomedCLIP for a positive (lesion) and a negative
       (normal) prompt, each min-max normalised; ``A = A_pos - A_neg``.
    2. Mask ``M = A > mean(A) + q3_factor * std(A)`` per image; the input becomes
       ``x * (1 - M) + mosaic(x) * M``.
    3. A U-Net is trained (normal images only) to map the obfuscated image back to the
       original with MSE + MSGMS; the anomaly map is the MSGMS error between the input
       and its reconstruction, box-filtered; the score is its maximum.

    Sources: paper (prompts of Table 1, the Q3 threshold, 20 epochs of 3k random
    samples, obfuscated input at inference, MSGMS scoring); M2IB / MedCLIP-SAMv2
    (``m2ib_*``); ASSUMED where neither says (``unet_widths``, ``mosaic_block``, ``lr``,
    ``batch_size``, ``msgms_weight``, ``smooth_kernel``, the ``generic`` prompts). See
    docs/algorithms/clap.md.

    Training masks are computed once per image at the start of :meth:`fit` (they depend
    only on the frozen CLIP and the image) and kept in memory, packed to bits.
    """

    family = "CLIP"
    pixel_level = True
    channels = 3

    def __init__(
        self,
        anatomy: str = "generic",
        positive_prompt: str | None = None,
        negative_prompt: str | None = None,
        clip_model: str = BIOMEDCLIP,
        clip_weights: str | None = HUB_WEIGHTS,
        image_size: int = 224,
        unet_size: int = 256,
        m2ib_layer: int = 7,
        m2ib_beta: float = 0.1,
        m2ib_steps: int = 10,
        m2ib_lr: float = 1.0,
        m2ib_copies: int = 10,
        m2ib_alpha_init: float = 5.0,
        m2ib_chunk: int = 8,
        q3_factor: float = 0.674,
        mosaic_block: int = 8,
        unet_widths: Sequence[int] = (64, 128, 256, 512),
        lr: float = 1e-4,
        batch_size: int = 16,
        epochs: int = 20,
        samples_per_epoch: int | None = 3000,
        msgms_weight: float = 1.0,
        msgms_scales: Sequence[int] = (1, 2, 4),
        gms_c: float = GMS_C,
        smooth_kernel: int = 21,
        obfuscate_at_test: bool = True,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        prompts_for(anatomy)  # fail early on an unknown anatomy
        hub = clip_model.startswith((HF_HUB, LOCAL_DIR))
        if pretrained and clip_weights == HUB_WEIGHTS and not hub:
            raise ValueError(f"clip_weights={HUB_WEIGHTS!r} is for hf-hub:/local-dir: models; for {clip_model!r} "
                             "give an open_clip tag (e.g. clip_weights=openai), or pretrained=false (--random-init)")
        self.anatomy = anatomy
        self.positive_prompt = positive_prompt
        self.negative_prompt = negative_prompt
        self.unet_size = int(unet_size)
        self.m2ib_layer = int(m2ib_layer)
        self.m2ib_beta = float(m2ib_beta)
        self.m2ib_steps = int(m2ib_steps)
        self.m2ib_lr = float(m2ib_lr)
        self.m2ib_copies = int(m2ib_copies)
        self.m2ib_alpha_init = float(m2ib_alpha_init)
        self.m2ib_chunk = int(m2ib_chunk)
        self.q3_factor = float(q3_factor)
        self.mosaic_block = int(mosaic_block)
        self.unet_widths = tuple(int(w) for w in unet_widths)
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.epochs = int(epochs)
        self.samples_per_epoch = None if samples_per_epoch is None else int(samples_per_epoch)
        self.msgms_weight = float(msgms_weight)
        self.msgms_scales = tuple(int(s) for s in msgms_scales)
        self.gms_c = float(gms_c)
        self.smooth_kernel = int(smooth_kernel)
        self.obfuscate_at_test = bool(obfuscate_at_test)
        self._init_clip(clip_model=clip_model, clip_weights=clip_weights, image_size=image_size,
                        pretrained=pretrained, weights=weights)
        self.input_size = (self.unet_size, self.unet_size)  # the U-Net's size; the CLIP gets image_size
        self.unet: UNet | None = None
        self._text: torch.Tensor | None = None
        self._masks: dict[str, np.ndarray] = {}
        self._predict_generator: torch.Generator | None = None

    # -- parts --------------------------------------------------------------------------
    def build_modules(self, clip: torch.nn.Module) -> None:
        """The U-Net (random initialisation; the only trainable part)."""
        self.unet = UNet(self.channels, self.unet_widths)

    def prompts(self) -> tuple[str, str]:
        """The (positive, negative) prompts: explicit ones, else the anatomy's."""
        pair = prompts_for(self.anatomy)
        return self.positive_prompt or pair.positive, self.negative_prompt or pair.negative

    def text_features(self) -> torch.Tensor:
        """(2, E) embeddings of the positive and negative prompts (computed once)."""
        clip = self.build()
        if self._text is None:
            tokens = tokenizer_for(self.clip_model)(list(self.prompts())).to(self.device)
            with torch.no_grad():
                self._text = clip.encode_text(tokens).float()
        return self._text

    def to(self, device: str | torch.device) -> Clap:
        self._text = None  # re-encoded on the new device
        super().to(device)
        return self

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    # -- masks --------------------------------------------------------------------------
    def masks(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """CLAP's suspected-lesion masks (B, H, W) bool for images (B, 3, H, W) in [0, 1]."""
        clip = self.build()
        text = self.text_features()
        out = []
        for chunk in images.split(max(1, self.m2ib_chunk)):
            side = (self.image_size, self.image_size)
            small = F.interpolate(chunk, size=side, mode="bilinear", align_corners=False, antialias=True)
            saliency = m2ib_saliency(
                clip, self.prepare(small), text, layer=self.m2ib_layer, beta=self.m2ib_beta, steps=self.m2ib_steps,
                lr=self.m2ib_lr, copies=self.m2ib_copies, alpha_init=self.m2ib_alpha_init,
                out_size=tuple(chunk.shape[-2:]), generator=generator,
            )
            out.append(clap_mask(clap_attention(saliency), self.q3_factor))
        return torch.cat(out)

    def _images(self, batch: Batch) -> torch.Tensor:
        x = batch_images(batch).to(self.device, torch.float32)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    @staticmethod
    def _keys(batch: Batch, images: torch.Tensor) -> list[str]:
        """Cache keys: the batch's file paths, else a hash of each image's content."""
        if isinstance(batch, dict) and batch.get("path") is not None:
            return [str(p) for p in batch["path"]]
        return [hashlib.sha1(x.detach().cpu().numpy().tobytes()).hexdigest() for x in images]

    def _fill_mask_cache(self, train: Iterable[Batch], generator: torch.Generator) -> None:
        bar = tqdm(desc="CLAP masks (M2IB)", unit="img", disable=None)
        for batch in train:
            x = self._images(batch)
            keys = self._keys(batch, x)
            todo = [i for i, k in enumerate(keys) if k not in self._masks]
            if todo:
                masks = self.masks(x[todo], generator).cpu().numpy()
                for i, m in zip(todo, masks):
                    self._masks[keys[i]] = np.packbits(m)
            bar.update(len(keys))
        bar.close()

    def _cached_masks(self, keys: list[str], shape: tuple[int, int]) -> torch.Tensor:
        n = shape[0] * shape[1]
        bits = np.stack([np.unpackbits(self._masks[k], count=n).reshape(shape) for k in keys])
        return torch.from_numpy(bits.astype(bool)).to(self.device)

    # -- the contract -------------------------------------------------------------------
    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """MSE + ``msgms_weight`` * MSGMS between the reconstruction of the obfuscated images and them."""
        recon = self.unet(obfuscate(images, masks, self.mosaic_block))
        return F.mse_loss(recon, images) + self.msgms_weight * msgms_loss(recon, images, self.msgms_scales, self.gms_c)

    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Compute the training masks once, then train the U-Net; ``val`` is not used."""
        self.build()
        seed = self.draw_seed()
        self._fill_mask_cache(train, self._generator(seed))
        self._predict_generator = self._generator(seed + 1)
        optimizer = torch.optim.Adam(self.unet.parameters(), lr=self.lr)
        for epoch in range(1, self.epochs + 1):
            self.unet.train()
            seen, total = 0, 0.0
            for batch in train:
                x = self._images(batch)
                keys = self._keys(batch, x)
                if self.samples_per_epoch is not None:
                    x, keys = x[: self.samples_per_epoch - seen], keys[: self.samples_per_epoch - seen]
                loss = self.loss(x, self._cached_masks(keys, tuple(x.shape[-2:])))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(x)
                seen += len(x)
                if self.samples_per_epoch is not None and seen >= self.samples_per_epoch:
                    break
            self.history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "samples": seen})
        self.unet.eval()

    def predict_map(self, images: torch.Tensor) -> Prediction:
        """MSGMS error between each image and the U-Net's reconstruction of its obfuscated version."""
        self.build()
        x = self._images(images)
        if self._predict_generator is None or self._predict_generator.device.type != self.device.type:
            self._predict_generator = self._generator(self.draw_seed())
        inputs = obfuscate(x, self.masks(x, self._predict_generator), self.mosaic_block) if self.obfuscate_at_test else x
        self.unet.eval()
        with torch.no_grad():
            recon = self.unet(inputs)
            maps = mean_filter(msgms_map(x, recon, self.msgms_scales, self.gms_c), self.smooth_kernel)
        return Prediction(maps.flatten(1).amax(1), maps)
