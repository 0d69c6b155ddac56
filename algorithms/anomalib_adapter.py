"""Shared wrapper for the anomalib 2.7 baselines: the wrapper changes nothing but the plumbing.

The Lightning module is built with ``post_processor=False, evaluator=False,
visualizer=False`` and no pre-processor, and its torch model (``lm.model``) is driven
directly, without anomalib's Engine or datamodules (see ANOMALIB_NOTES.md). The
harness has already resized the images; the wrapper only applies ImageNet
normalisation and returns anomalib's raw (un-normalised) scores and maps.

Adding an anomalib model means subclassing :class:`AnomalibAlgorithm`: set
``anomalib_class``, store the constructor arguments, return them from
:meth:`~AnomalibAlgorithm.model_kwargs`, and override the hooks that differ
(:meth:`~AnomalibAlgorithm.pre_processor`, :meth:`~AnomalibAlgorithm.weights_spec`,
:meth:`~AnomalibAlgorithm.load_pretrained`, ``imagenet_normalize``).

``anomalib`` is imported only when a model is built: importing it costs ~10 s and ~1 GB.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bmad.algorithm import Algorithm, Batch, Prediction, batch_images
from bmad.weights import WeightSpec, load_checkpoint, load_into, offline_random_init, resolve_weights, timm_spec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def as_hw(size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """``224`` -> ``(224, 224)``; ``(H, W)`` (or a JSON list) -> ``(H, W)``; None stays None."""
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


class AnomalibAlgorithm(Algorithm):
    """Base class of the anomalib-backed algorithms.

    Hooks for subclasses:

    - ``anomalib_class``: the class name in ``anomalib.models`` (e.g. "Patchcore").
    - :meth:`model_kwargs`: the hyper-parameters passed to that class.
    - ``trains_by_epochs``: False for memory-bank models (one pass over the training
      set, then the module's ``fit()``); gradient-trained ones subclass
      :class:`AnomalibTrainedAlgorithm`.
    - ``imagenet_normalize``: False for models that take [0, 1] input (DRAEM).
    - :meth:`pre_processor`: for classes that read their input size from it.
    - :meth:`weights_spec` / :meth:`load_pretrained`: which weights, loaded where.

    The module is built on first use (``fit``, ``to``, ``modules``) so that
    construction stays cheap; the runner seeds before that. With ``pretrained`` the
    weights are located at construction, so a missing file fails at once.
    """

    anomalib_class: ClassVar[str] = ""
    trains_by_epochs: ClassVar[bool] = False
    imagenet_normalize: ClassVar[bool] = True

    backbone: str

    def __init__(
        self,
        *,
        input_size: int | tuple[int, int] | None,
        pretrained: bool,
        weights: str | None,
    ) -> None:
        self.input_size = as_hw(input_size)
        self.pretrained = pretrained
        self.weights = weights
        self._weights_path: Path | None = resolve_weights(self.weights_spec(), weights) if pretrained else None
        self._lm: nn.Module | None = None

    # -- hooks ------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``anomalib_class`` (besides ``pre_trained`` and components)."""
        raise NotImplementedError

    def pre_processor(self) -> nn.Module | bool:
        """The pre-processor handed to the module; it is never applied (inputs arrive
        resized and the wrapper normalises), so none by default. CS-Flow and GANomaly
        read their input size from it: give them a resize to ``input_size``."""
        return False

    def weights_spec(self) -> WeightSpec:
        """The pretrained weights this configuration needs (timm's for ``backbone``)."""
        return timm_spec(self.backbone)

    def load_pretrained(self, lm: nn.Module, state_dict: dict[str, Any], source: str) -> None:
        """Load the pretrained ``state_dict`` into the built Lightning module ``lm``."""
        load_into(lm.model.feature_extractor.feature_extractor, state_dict, source=source)

    # -- building ---------------------------------------------------------------------
    def build(self) -> nn.Module:
        """The anomalib Lightning module (built once; random init, then pretrained weights)."""
        if self._lm is None:
            with warnings.catch_warnings():  # anomalib's own deprecation notices, not the user's concern
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                import anomalib.models

            cls = getattr(anomalib.models, self.anomalib_class)
            kwargs = self.model_kwargs()
            if "pre_trained" in inspect.signature(cls).parameters:
                kwargs["pre_trained"] = False
            with offline_random_init():
                lm = cls(
                    **kwargs,
                    pre_processor=self.pre_processor(),
                    post_processor=False,
                    evaluator=False,
                    visualizer=False,
                )
            if self._weights_path is not None:
                self.load_pretrained(lm, load_checkpoint(self._weights_path), str(self._weights_path))
            if not self.trains_by_epochs:
                lm.requires_grad_(False)  # nothing is trained: report 0 trainable parameters
            self._lm = lm.to(self.device).eval()
        return self._lm

    def modules(self) -> Iterator[nn.Module]:
        """The Lightning module (built if needed)."""
        yield self.build()

    # -- the contract -----------------------------------------------------------------
    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Memory-bank models: one pass to collect embeddings, then the module's ``fit()``.

        ``val`` is not used: there is no checkpoint to select.
        """
        if self.trains_by_epochs:
            raise NotImplementedError(f"{type(self).__name__}: gradient training is not wired yet")
        lm = self.build()
        lm.train()
        n_images = 0
        with torch.no_grad():
            for batch in train:
                images = self._prepare(batch_images(batch))
                lm.model(images)
                n_images += images.shape[0]
            if n_images == 0:
                raise ValueError(f"{type(self).__name__}.fit: the training set is empty")
            lm.fit()
        lm.eval()

    def predict_map(self, images: torch.Tensor) -> Prediction:
        """Raw anomalib scores [B] and maps [B, H, W] at the input resolution."""
        lm = self.build()
        lm.eval()
        x = self._prepare(images)
        with torch.no_grad():
            out = lm.model(x)
        b, _, h, w = x.shape
        scores = out.pred_score.reshape(b)
        maps = None
        if self.pixel_level and out.anomaly_map is not None:
            maps = out.anomaly_map.reshape(b, h, w)
        return Prediction(scores=scores, maps=maps)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.imagenet_normalize:
            mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x


class AnomalibTrainedAlgorithm(AnomalibAlgorithm):
    """Base class of the gradient-trained anomalib models.

    Training reuses the module's own ``training_step`` and ``backward`` (CFA's keeps
    its graph) with the optimisers of :meth:`make_optimizers` (the module's
    ``configure_optimizers`` unless BMAD's settings differ). Manual-optimisation
    modules (CFLOW, GANomaly) get ``optimizers()`` and ``manual_backward`` without a
    Trainer. Every ``eval_every`` epochs (and after the last) the image AUROC on the
    valid split is computed; the best checkpoint is kept and restored at the end (BMAD's
    selection: validation only, never test). ``patience`` (in evaluations) stops early.
    ``history`` gets ``{"epoch", "train_loss"[, "val_image_auroc"]}`` per epoch and a
    final ``{"selected_epoch", "val_image_auroc"}``.
    """

    trains_by_epochs: ClassVar[bool] = True
    grad_clip_norm: ClassVar[float | None] = None

    epochs: int
    eval_every: int
    patience: int | None
    batch_size: int

    def make_optimizers(self, lm: nn.Module) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Optimisers and LR schedulers: the module's ``configure_optimizers`` by default."""
        return _split_optimizers(lm.configure_optimizers())

    def on_fit_start(self, lm: nn.Module, train: Iterable[Batch]) -> None:
        """Work the module does before its first epoch under Lightning (e.g. CFA's centroid)."""

    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Train for ``epochs`` epochs, select the best checkpoint on ``val``."""
        import copy

        from anomalib.data import ImageBatch

        lm = self.build()
        optimizers, schedulers = self.make_optimizers(lm)
        if not lm.automatic_optimization:
            single = optimizers[0] if len(optimizers) == 1 else optimizers
            lm.optimizers = lambda use_pl_optimizer=True: single  # no Trainer: hand them over directly
            lm.manual_backward = lambda loss, *a, **k: loss.backward(*a, **k)
        self.on_fit_start(lm, train)
        best: tuple[float, dict[str, torch.Tensor] | None, int] = (-1.0, None, 0)
        stale = 0
        step = 0
        for epoch in range(1, self.epochs + 1):
            lm.train()
            losses = []
            with warnings.catch_warnings():  # self.log() without a Trainer warns once per call
                warnings.simplefilter("ignore")
                for batch in train:
                    losses.append(self._train_step(lm, ImageBatch(image=self._prepare(batch_images(batch))),
                                                   optimizers, step))
                    step += 1
            for sched in schedulers:
                sched.step()
            record: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None}
            if val is not None and (epoch % self.eval_every == 0 or epoch == self.epochs):
                auroc = self._validate(val)
                record["val_image_auroc"] = auroc
                if auroc is not None and auroc > best[0]:
                    state = {k: v.detach().to("cpu", copy=True) for k, v in lm.state_dict().items()}
                    best, stale = (auroc, state, epoch), 0
                elif auroc is not None:  # a valid split without both classes cannot select
                    stale += 1
            self.history.append(record)
            if self.patience is not None and stale >= self.patience:
                break
        if best[1] is not None:
            lm.load_state_dict(copy.deepcopy(best[1]))
            self.history.append({"selected_epoch": best[2], "val_image_auroc": best[0]})
        lm.eval()

    def _train_step(self, lm: nn.Module, batch: Any, optimizers: list[torch.optim.Optimizer], step: int) -> float:
        out = lm.training_step(batch, step)
        loss = out["loss"] if isinstance(out, dict) else out
        if lm.automatic_optimization:
            for opt in optimizers:
                opt.zero_grad()
            lm.backward(loss)
            if self.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(lm.parameters(), self.grad_clip_norm)
            for opt in optimizers:
                opt.step()
        return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)

    def _validate(self, val: Iterable[Batch]) -> float | None:
        """Image AUROC on the valid split (None when it lacks a class)."""
        from bmad.metrics import image_auroc

        scores, labels = [], []
        for batch in val:
            scores.append(self.predict_map(batch_images(batch)).scores)
            labels.append(np.asarray(batch["label"]))
        y = np.concatenate(labels)
        if len(np.unique(y)) < 2:
            return None
        return image_auroc(np.concatenate(scores), y)


def _split_optimizers(conf: Any) -> tuple[list[torch.optim.Optimizer], list[Any]]:
    """Lightning's ``configure_optimizers`` return forms -> (optimisers, schedulers)."""
    if isinstance(conf, torch.optim.Optimizer):
        return [conf], []
    if isinstance(conf, dict):
        sched = conf.get("lr_scheduler")
        sched = sched.get("scheduler") if isinstance(sched, dict) else sched
        return [conf["optimizer"]], [sched] if sched is not None else []
    if isinstance(conf, tuple) and len(conf) == 2 and isinstance(conf[0], list):
        return list(conf[0]), [s["scheduler"] if isinstance(s, dict) else s for s in conf[1]]
    return list(conf), []
