"""Shared wrapper for the anomalib 2.7 baselines: the wrapper changes nothing but the plumbing.

The Lightning module is built with ``post_processor=False, evaluator=False,
visualizer=False`` and no pre-processor, and its torch model (``lm.model``) is driven
directly, without anomalib's Engine or datamodules (see ANOMALIB_NOTES.md). The
harness has already resized the images; the wrapper only applies ImageNet
normalisation and returns anomalib's raw (un-normalised) scores and maps.

Adding an anomalib model means subclassing :class:`AnomalibAlgorithm`: set
``anomalib_class``, store the constructor arguments, return them from
:meth:`~AnomalibAlgorithm.model_kwargs`, and override the hooks that differ
(:meth:`~AnomalibAlgorithm.pre_processor`, ``needs_input_size``,
:meth:`~AnomalibAlgorithm.weights_spec`, :meth:`~AnomalibAlgorithm.load_pretrained`,
:meth:`~AnomalibAlgorithm.frozen_modules`, ``imagenet_normalize``, ``square``; for
gradient-trained ones also :meth:`~AnomalibTrainedAlgorithm.make_optimizers`,
:meth:`~AnomalibTrainedAlgorithm.optimizer_settings`,
:meth:`~AnomalibTrainedAlgorithm.on_fit_start`,
:meth:`~AnomalibTrainedAlgorithm.step_losses`,
:meth:`~AnomalibTrainedAlgorithm.accepts_train_batch` and ``grad_clip_norm``).

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

from algorithms.inputs import as_hw, imagenet_normalize, three_channels
from bmad.algorithm import Algorithm, Batch, Prediction, batch_images, valid_image_auroc
from bmad.training import BestCheckpoint
from bmad.weights import WeightSpec, load_checkpoint, load_into, offline_random_init, resolve_weights, timm_spec


class AnomalibAlgorithm(Algorithm):
    """Base class of the anomalib-backed algorithms.

    Hooks for subclasses:

    - ``anomalib_class``: the class name in ``anomalib.models`` (e.g. "Patchcore").
    - :meth:`model_kwargs`: the hyper-parameters passed to that class.
    - ``trains_by_epochs``: False for memory-bank models (one pass over the training
      set, then :meth:`fit_memory_bank`, the module's ``fit()``); gradient-trained ones subclass
      :class:`AnomalibTrainedAlgorithm`.
    - ``imagenet_normalize``: False for models that take [0, 1] input (DRAEM).
    - ``needs_input_size``: True for classes that read their input size from the
      pre-processor at construction (RD4AD, CS-Flow, GANomaly): :meth:`pre_processor`
      then gives a resize to :meth:`model_input_size` and ``input_size`` may not be None.
    - :meth:`pre_processor`: for classes that read their input size from it.
    - :meth:`weights_spec` / :meth:`load_pretrained`: which weights, loaded where.
    - :meth:`frozen_modules`: sub-modules that are never trained (set to
      ``requires_grad=False`` so that the reported trainable parameter count is honest;
      they get no gradients under anomalib either).

    The module is built on first use (``fit``, ``to``, ``modules``) so that
    construction stays cheap; the runner seeds before that. With ``pretrained`` the
    weights are located at construction, so a missing file fails at once.
    """

    anomalib_class: ClassVar[str] = ""
    trains_by_epochs: ClassVar[bool] = False
    imagenet_normalize: ClassVar[bool] = True
    needs_input_size: ClassVar[bool] = False

    backbone: str

    def __init__(
        self,
        *,
        input_size: int | tuple[int, int] | None,
        pretrained: bool,
        weights: str | None,
    ) -> None:
        self.input_size = as_hw(input_size)
        if self.needs_input_size and self.input_size is None:
            raise ValueError(
                f"{type(self).__name__} builds its network for a fixed input size: input_size cannot be None"
            )
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
        resized and the wrapper normalises), so none by default. Classes that read their
        input size from it (``needs_input_size``) get a resize to :meth:`model_input_size`."""
        if not self.needs_input_size:
            return False
        from anomalib.pre_processing import PreProcessor
        from torchvision.transforms.v2 import Resize

        return PreProcessor(transform=Resize(self.model_input_size(), antialias=True))

    def model_input_size(self) -> tuple[int, int] | None:
        """The size the harness resizes inputs to: ``input_size`` under the class's
        constraints (``size_multiple``, ``fixed_sizes``, ``square``); None if unset."""
        if self.input_size is None:
            return None
        from bmad.runner import input_size_for

        return input_size_for(self, self.input_size)

    def frozen_modules(self, lm: nn.Module) -> list[nn.Module]:
        """Sub-modules of ``lm`` that are never trained (none by default)."""
        return []

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
            # The modes a fresh module trains in: Lightning (2.x) never calls .train(); it trains
            # the module as built (frozen extractors set to eval by anomalib) and restores these
            # per-module modes after each validation.
            self._train_modes = {name: m.training for name, m in lm.named_modules()}
            if self._weights_path is not None:
                self.load_pretrained(lm, load_checkpoint(self._weights_path), str(self._weights_path))
            if not self.trains_by_epochs:
                lm.requires_grad_(False)  # nothing is trained: report 0 trainable parameters
            for module in self.frozen_modules(lm):
                module.requires_grad_(False)  # used under no_grad by anomalib: never trained
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
        self.training_mode(lm)
        n_images = 0
        with torch.no_grad():
            for batch in train:
                images = self._prepare(batch_images(batch))
                lm.model(images)
                n_images += images.shape[0]
            if n_images == 0:
                raise ValueError(f"{type(self).__name__}.fit: the training set is empty")
            self.fit_memory_bank(lm)
        lm.eval()

    def fit_memory_bank(self, lm: Any) -> None:
        """After the embedding pass: the module's own ``fit()`` (PatchCore replaces its coreset loop)."""
        lm.fit()

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

    def training_mode(self, lm: nn.Module) -> None:
        """Put ``lm`` in the modes it trains in under Lightning: each sub-module as it was
        built (``lm.train()`` would also switch the frozen extractors to train mode)."""
        modes = self._train_modes
        for name, module in lm.named_modules():
            module.training = modes.get(name, True)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the module's input: on the device, 3 channels, normalised."""
        if self.imagenet_normalize:
            return imagenet_normalize(images, self.device)
        return three_channels(images, self.device)


class AnomalibTrainedAlgorithm(AnomalibAlgorithm):
    """Base class of the gradient-trained anomalib models.

    Training reuses the module's own ``training_step`` and ``backward`` (CFA's keeps
    its graph) with the optimisers of :meth:`make_optimizers` (the module's
    ``configure_optimizers`` unless BMAD's settings differ). Manual-optimisation
    modules (CFLOW, GANomaly) get ``optimizers()`` and ``manual_backward`` without a
    Trainer. Every ``eval_every`` epochs (and after the last) the image AUROC on the
    valid split is computed; the best checkpoint is kept and restored at the end (BMAD's
    selection: validation only, never test). ``patience`` (in evaluations) stops early.
    ``history`` gets ``{"epoch", "train_loss"[, other losses][, "skipped_batches"]
    [, "val_image_auroc"]}`` per epoch and a final ``{"selected_epoch", "val_image_auroc"}``.

    Hooks: :meth:`make_optimizers` / :meth:`optimizer_settings` (BMAD's hyper-parameters
    on the module's own optimisers), :meth:`on_fit_start` (Lightning hooks the module
    relies on, run without a Trainer), :meth:`step_losses` (what a ``training_step``
    returned -> the losses recorded), :meth:`accepts_train_batch` (batches the module
    cannot train on), ``grad_clip_norm`` (the Trainer's ``gradient_clip_val``, by norm,
    over each optimiser's parameters, as Lightning clips).
    """

    trains_by_epochs: ClassVar[bool] = True
    grad_clip_norm: ClassVar[float | None] = None

    epochs: int
    eval_every: int
    patience: int | None
    batch_size: int

    def make_optimizers(self, lm: nn.Module) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Optimisers and LR schedulers: the module's ``configure_optimizers``, with
        :meth:`optimizer_settings` written into every parameter group."""
        optimizers, schedulers = _split_optimizers(lm.configure_optimizers())
        settings = self.optimizer_settings()
        for opt in optimizers:
            for group in opt.param_groups:
                for key, value in settings.items():
                    if key not in group:
                        raise ValueError(f"{type(opt).__name__} has no hyper-parameter {key!r}")
                    group[key] = tuple(value) if isinstance(value, list) else value
                    if key == "lr" and "initial_lr" in group:  # a scheduler was already attached
                        group["initial_lr"] = value
        for sched in schedulers:
            if hasattr(sched, "base_lrs"):
                sched.base_lrs = [g.get("initial_lr", g["lr"]) for g in sched.optimizer.param_groups]
        return optimizers, schedulers

    def optimizer_settings(self) -> dict[str, Any]:
        """Hyper-parameters (``lr``, ``betas``, ``weight_decay``...) that replace those of
        the module's optimisers in every parameter group; none by default."""
        return {}

    def on_fit_start(self, lm: nn.Module, train: Iterable[Batch]) -> None:
        """Work the module does before its first epoch under Lightning (e.g. CFA's centroid)."""

    def step_losses(self, out: Any) -> dict[str, float]:
        """What ``training_step`` returned -> ``{"train_loss": ..., other losses}``."""
        loss = out["loss"] if isinstance(out, dict) else out
        return {"train_loss": float(loss.detach().sum()) if isinstance(loss, torch.Tensor) else float(loss)}

    def accepts_train_batch(self, images: torch.Tensor) -> bool:
        """False for a (prepared) batch the module cannot train on; it is skipped and
        counted in the epoch's ``skipped_batches`` (e.g. CFLOW's too-small last batch)."""
        return True

    def image_batches(self, batches: Iterable[Batch]) -> Iterator[Any]:
        """bmad batches -> anomalib ``ImageBatch``es of prepared images (lazily)."""
        from anomalib.data import ImageBatch

        for batch in batches:
            yield ImageBatch(image=self._prepare(batch_images(batch)))

    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Train for ``epochs`` epochs, select the best checkpoint on ``val``."""
        lm = self.build()
        optimizers, schedulers = self.make_optimizers(lm)
        if not lm.automatic_optimization:
            single = optimizers[0] if len(optimizers) == 1 else optimizers
            lm.optimizers = lambda use_pl_optimizer=True: single  # no Trainer: hand them over directly
            lm.manual_backward = lambda loss, *a, **k: loss.backward(*a, **k)
        self.training_mode(lm)
        self.on_fit_start(lm, train)
        best = BestCheckpoint(lm, self.patience)
        step = 0
        for epoch in range(1, self.epochs + 1):
            self.training_mode(lm)
            losses: dict[str, list[float]] = {"train_loss": []}
            skipped = 0
            with warnings.catch_warnings():  # self.log() without a Trainer warns once per call
                warnings.simplefilter("ignore")
                for batch in self.image_batches(train):
                    if not self.accepts_train_batch(batch.image):
                        skipped += 1
                        continue
                    for key, value in self._train_step(lm, batch, optimizers, step).items():
                        losses.setdefault(key, []).append(value)
                    step += 1
            if not losses["train_loss"]:
                raise ValueError(f"{type(self).__name__}.fit: no training batch in epoch {epoch}"
                                 + (f" ({skipped} skipped as too small)" if skipped else ""))
            for sched in schedulers:
                sched.step()
            record: dict[str, Any] = {"epoch": epoch}
            record.update({key: float(np.mean(values)) for key, values in losses.items()})
            if skipped:
                record["skipped_batches"] = skipped
            if val is not None and (epoch % self.eval_every == 0 or epoch == self.epochs):
                record["val_image_auroc"] = valid_image_auroc(self, val)
                best.check(record["val_image_auroc"], epoch)  # None (one class only) cannot select
            self.history.append(record)
            if best.stop:
                break
        selected = best.restore()
        if selected is not None:
            self.history.append({**selected, "val_image_auroc": best.value})
        lm.eval()

    def _train_step(
        self, lm: nn.Module, batch: Any, optimizers: list[torch.optim.Optimizer], step: int
    ) -> dict[str, float]:
        """One ``training_step``; with automatic optimisation, Lightning's zero_grad ->
        the module's ``backward`` -> gradient clipping -> step."""
        out = lm.training_step(batch, step)
        if lm.automatic_optimization:
            loss = out["loss"] if isinstance(out, dict) else out
            for opt in optimizers:
                opt.zero_grad()
            lm.backward(loss)
            for opt in optimizers:
                if self.grad_clip_norm is not None:
                    params = [p for group in opt.param_groups for p in group["params"]]
                    torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
                opt.step()
        return self.step_losses(out)


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
