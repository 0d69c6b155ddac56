"""Pretrained weights: where they are found offline, and how they are loaded safely.

A backbone's weights are described by a :class:`WeightSpec` (``timm/<model>.<tag>``,
``torchvision/<WeightsEnum>.<member>``, ``open_clip/<model>.<tag>``, or ``file/<path>``
for checkpoints no library distributes, such as CheXzero) and found, in order, at

1. an explicit path (the runner's ``--weights``; a file, or a folder laid out like
   ``BMAD_WEIGHTS``),
2. the ``$BMAD_WEIGHTS`` folder: ``timm/<model>.<tag>.safetensors`` (or ``.pth``),
   ``torchvision/<file name of the torchvision URL>``,
   ``open_clip/<model>.<tag>.safetensors`` (or ``.bin``, ``.pt``, ``.pth``), ``<path>``,
3. the libraries' caches: the Hugging Face hub cache (timm, open_clip), then
   ``$TORCH_HOME/hub/checkpoints`` (torchvision, and timm's legacy URLs) or
   ``~/.cache/clip`` (open_clip's URL downloads).

Nothing here downloads, except :func:`fetch`, which a user runs on a connected
machine. Checkpoints are data, not code: :func:`load_checkpoint` reads safetensors,
or pickles with ``weights_only=True``, and refuses anything else.
See docs/weights.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from bmad.errors import WeightsError

logger = logging.getLogger(__name__)

ENV_WEIGHTS = "BMAD_WEIGHTS"
"""Environment variable naming the folder of local pretrained weights."""

_TIMM_EXTENSIONS = (".safetensors", ".pth")
_OPEN_CLIP_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")
_OPEN_CLIP_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_OPEN_CLIP_URL_CACHE = "~/.cache/clip"
_WRAPPER_KEYS = ("state_dict", "model")


# -- what a set of weights is called --------------------------------------------------
@dataclass(frozen=True)
class WeightSpec:
    """One set of pretrained weights and the names it is known by.

    ``source``: "timm", "torchvision", "open_clip" or "file"; ``key``: timm's or
    open_clip's ``<model>.<tag>``, torchvision's ``<WeightsEnum>.<member>``, or the
    file's path inside a weights folder; ``hf_repo``: the Hugging Face repo the
    library downloads from ("" if none) and ``hf_files`` the file names it uses
    there; ``url``: the download URL whose file name the library's cache uses ("" if
    none), cached in ``url_cache`` ("" = the torch hub's ``checkpoints``);
    ``obtain``: how to get a file no library downloads (source "file").
    """

    source: str
    key: str
    hf_repo: str = ""
    url: str = ""
    hf_files: tuple[str, ...] = _HF_FILES
    url_cache: str = ""
    obtain: str = ""

    @property
    def name(self) -> str:
        """``<source>/<key>``: the name used in messages and by ``bmad weights fetch``."""
        return f"{self.source}/{self.key}"

    def folder_files(self) -> list[str]:
        """Accepted paths relative to a weights folder, the canonical one first."""
        if self.source == "torchvision":
            return [f"torchvision/{_url_file(self.url)}"]
        if self.source == "open_clip":
            return [f"open_clip/{self.key}{ext}" for ext in _OPEN_CLIP_EXTENSIONS]
        if self.source == "file":
            return [self.key]
        return [f"timm/{self.key}{ext}" for ext in _TIMM_EXTENSIONS]

    def cache_files(self) -> list[Path]:
        """Existing files for these weights in the libraries' caches (no network)."""
        found: list[Path] = []
        if self.hf_repo:
            from huggingface_hub import try_to_load_from_cache

            for filename in self.hf_files:
                hit = try_to_load_from_cache(self.hf_repo, filename)
                if isinstance(hit, str):
                    found.append(Path(hit))
        if self.url:
            hub = self.url_folder() / _url_file(self.url)
            if hub.is_file():
                found.append(hub)
        return found

    def url_folder(self) -> Path:
        """The folder where the library caches ``url``'s download."""
        if self.url_cache:
            return Path(self.url_cache).expanduser()
        return Path(torch.hub.get_dir()) / "checkpoints"


def _url_file(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def timm_spec(model_name: str) -> WeightSpec:
    """The weights timm would load for ``model_name`` (``"resnet18"`` -> ``resnet18.a1_in1k``).

    A name with a tag (``"wide_resnet50_2.tv_in1k"``) picks those weights.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsError(
            f"timm has no pretrained weights for {model_name!r}",
            hint="check the backbone name, or run with --random-init",
        )
    arch = model_name.split(".", 1)[0]
    key = f"{arch}.{cfg.tag}" if cfg.tag else arch
    return WeightSpec("timm", key, hf_repo=cfg.hf_hub_id or "", url=cfg.url or "")


def torchvision_spec(weights_name: str) -> WeightSpec:
    """The torchvision weights ``weights_name`` (e.g. ``"Wide_ResNet50_2_Weights.IMAGENET1K_V1"``)."""
    from torchvision.models import get_weight

    try:
        weights = get_weight(weights_name)
    except (ValueError, KeyError, AttributeError) as exc:
        raise WeightsError(f"unknown torchvision weights {weights_name!r}: {exc}") from None
    return WeightSpec("torchvision", weights_name, url=weights.url)


def open_clip_spec(model_name: str, tag: str) -> WeightSpec:
    """The weights open_clip calls ``tag`` for ``model_name`` (``"ViT-B-32", "openai"``)."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(model_name, tag)
    if not cfg or not (cfg.get("url") or cfg.get("hf_hub")):
        known = ", ".join(list_pretrained_tags_by_model(model_name)) or "none"
        raise WeightsError(
            f"open_clip has no weights {tag!r} for model {model_name!r}",
            hint=f"its tags: {known}; or give a local file with --weights",
        )
    hf_repo, hf_files = "", _OPEN_CLIP_HF_FILES
    if cfg.get("hf_hub"):  # "org/repo/" (the default file names) or "org/repo/file"
        hf_repo, filename = os.path.split(cfg["hf_hub"])
        if filename:
            hf_files = (filename,)
    return WeightSpec("open_clip", f"{model_name}.{tag}", hf_repo=hf_repo, url=cfg.get("url", ""),
                      hf_files=hf_files, url_cache=_OPEN_CLIP_URL_CACHE)


def file_spec(path: str, obtain: str) -> WeightSpec:
    """A checkpoint no library downloads, looked for at ``path`` in a weights folder."""
    return WeightSpec("file", path, obtain=obtain)


def spec_from_name(name: str) -> WeightSpec:
    """Parse ``timm/<model>[.<tag>]``, ``torchvision/<WeightsEnum>.<member>`` or ``open_clip/<model>.<tag>``."""
    source, _, key = name.partition("/")
    if source == "timm" and key:
        return timm_spec(key)
    if source == "torchvision" and key:
        return torchvision_spec(key)
    if source == "open_clip" and "." in key:
        model, _, tag = key.rpartition(".")
        return open_clip_spec(model, tag)
    raise WeightsError(
        f"bad weights name {name!r}",
        hint="use timm/<model>[.<tag>] (e.g. timm/wide_resnet50_2), "
        "torchvision/<WeightsEnum>.<member> (e.g. torchvision/Wide_ResNet50_2_Weights.IMAGENET1K_V1) or "
        "open_clip/<model>.<tag> (e.g. open_clip/ViT-B-16-plus-240.laion400m_e31)",
    )


# -- finding the file -----------------------------------------------------------------
def resolve_weights(spec: WeightSpec, explicit: str | os.PathLike | None = None) -> Path:
    """The local file holding ``spec``'s weights, or a WeightsError saying where to put it.

    Order: ``explicit`` (a file, or a folder searched like ``BMAD_WEIGHTS``; when given,
    nothing else is searched), ``$BMAD_WEIGHTS``, then the library caches.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            hit = _first_in_folder(path, spec)
            if hit is not None:
                return hit
            raise WeightsError(
                f"no weights for {spec.name} in folder {path}",
                hint=f"expected {path / spec.folder_files()[0]}",
            )
        raise WeightsError(f"weights file {path} does not exist")

    looked: list[str] = []
    folder = os.environ.get(ENV_WEIGHTS)
    if folder:
        hit = _first_in_folder(Path(folder).expanduser(), spec)
        if hit is not None:
            return hit
        looked.append(f"${ENV_WEIGHTS} ({folder})")
    cached = spec.cache_files()
    if cached:
        return cached[0]
    if spec.hf_repo:
        looked.append("the Hugging Face cache")
    if spec.url:
        looked.append(str(spec.url_folder()))

    canonical = spec.folder_files()[0]
    where = f"{folder}/{canonical}" if folder else f"$BMAD_WEIGHTS/{canonical} (set BMAD_WEIGHTS to a folder)"
    get = (f"{spec.obtain}" if spec.source == "file"
           else f"on a connected machine `bmad weights fetch {spec.name}` writes it there")
    raise WeightsError(
        f"pretrained weights {spec.name} not found offline (looked in: {', '.join(looked) or 'nowhere else'})",
        hint=f"put the file at {where}, or pass --weights FILE; {get}; or run with --random-init",
    )


def _first_in_folder(folder: Path, spec: WeightSpec) -> Path | None:
    for rel in spec.folder_files():
        candidate = folder / rel
        if candidate.is_file():
            return candidate
    return None


# -- loading it safely ----------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint as a state dict, never executing code from it.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``, which refuses pickled classes and functions.
    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and a DataParallel
    ``module.`` prefix are removed. Tensors are loaded on the CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise WeightsError(f"cannot read {path} as safetensors: {exc}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            detail = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln), type(exc).__name__)
            raise WeightsError(
                f"refusing to load {path}: it holds pickled objects or code, not only tensors ({detail})",
                hint="a checkpoint must be plain data; re-save its state dict (or convert it to "
                ".safetensors) on a machine where you trust the file",
            ) from None
        except Exception as exc:  # noqa: BLE001 - corrupt or foreign files
            raise WeightsError(f"cannot read {path} as a torch checkpoint: {exc}") from None
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, Any]:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds no state dict (no tensors found)")
    keys = list(obj)
    if all(isinstance(k, str) and k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


@dataclass(frozen=True)
class LoadReport:
    """Key counts of :func:`load_into`."""

    matched: int
    missing: int
    unexpected: int


def load_into(module: nn.Module, state_dict: Mapping[str, Any], *, source: str = "checkpoint") -> LoadReport:
    """Load ``state_dict`` into ``module`` non-strictly and report the key counts.

    Extra keys (a classifier head, layers a feature extractor drops) are ignored;
    a WeightsError is raised when no key matches or a shape differs.
    """
    own = set(module.state_dict())
    matched = own & set(state_dict)
    if not matched:
        raise WeightsError(
            f"none of the {len(state_dict)} keys in {source} match the model "
            f"(model keys look like {sorted(own)[:3]}, file keys like {sorted(state_dict)[:3]})"
        )
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"weights in {source} do not fit the model: {exc}") from None
    report = LoadReport(len(matched), len(result.missing_keys), len(result.unexpected_keys))
    log = logger.warning if report.missing else logger.info
    log(
        "loaded %s: %d keys matched, %d missing, %d unexpected",
        source, report.matched, report.missing, report.unexpected,
    )
    return report


def create_timm_backbone(
    name: str, pretrained: bool, weights: str | os.PathLike | None = None, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, with pretrained weights found offline.

    With ``pretrained`` the weights are resolved first (a WeightsError comes before
    any model is built) and loaded with :func:`load_into`; ``kwargs`` must keep the
    pretrained layers' shapes (use ``num_classes=0`` or ``features_only=True``).
    """
    import timm

    path = resolve_weights(timm_spec(name), weights) if pretrained else None
    with offline_random_init():
        model = timm.create_model(name, pretrained=False, **kwargs)
    if path is not None:
        load_into(model, load_checkpoint(path), source=str(path))
    return model


# -- keeping libraries offline --------------------------------------------------------
class _RandomInit(dict):
    """Stands in for a torchvision state dict inside :func:`offline_random_init`."""


_RANDOM_INIT = _RandomInit()


@contextlib.contextmanager
def offline_random_init() -> Iterator[None]:
    """Build models without any download: pretrained requests give random weights.

    Inside the block the torch hub and Hugging Face caches point at an empty
    temporary folder, ``HF_HUB_OFFLINE=1``, timm skips loading pretrained weights and
    torchvision builders keep their random initialisation. For models that load
    weights themselves (STFPM's teacher, CFA, CS-Flow); real weights are then
    loaded with :func:`load_into`. Not thread-safe (it patches module attributes).
    """
    import huggingface_hub.constants as hf_constants
    import timm.models._builder as timm_builder
    import torchvision.models._api as tv_api

    original_load_state_dict = nn.Module.load_state_dict

    def load_state_dict(self: nn.Module, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        if state_dict is _RANDOM_INIT:
            return nn.modules.module._IncompatibleKeys([], [])
        return original_load_state_dict(self, state_dict, *args, **kwargs)

    with tempfile.TemporaryDirectory(prefix="bmad-offline-") as tmp, contextlib.ExitStack() as stack:
        hf_cache = os.path.join(tmp, "huggingface", "hub")
        env = {
            "TORCH_HOME": os.path.join(tmp, "torch"),
            "HF_HOME": os.path.join(tmp, "huggingface"),
            "HF_HUB_CACHE": hf_cache,
            "HF_HUB_OFFLINE": "1",
        }
        stack.enter_context(mock.patch.dict(os.environ, env))
        stack.enter_context(mock.patch.object(torch.hub, "_hub_dir", os.path.join(tmp, "torch", "hub")))
        stack.enter_context(mock.patch.object(hf_constants, "HF_HUB_OFFLINE", True))
        stack.enter_context(mock.patch.object(hf_constants, "HF_HUB_CACHE", hf_cache))
        stack.enter_context(mock.patch.object(timm_builder, "load_pretrained", _skip_pretrained))
        stack.enter_context(mock.patch.object(tv_api.WeightsEnum, "get_state_dict", _random_state_dict))
        stack.enter_context(mock.patch.object(nn.Module, "load_state_dict", load_state_dict))
        yield


def _skip_pretrained(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    logger.info("offline: %s keeps its random initialisation", type(model).__name__)


def _random_state_dict(self: Any, *args: Any, **kwargs: Any) -> _RandomInit:
    logger.info("offline: torchvision weights %s not loaded (random initialisation)", self)
    return _RANDOM_INIT


# -- fetching (connected machines only) -----------------------------------------------
def fetch(name: str, folder: str | os.PathLike | None = None) -> Path:
    """Download weights ``name`` into ``folder`` (default ``$BMAD_WEIGHTS``); needs network.

    timm and open_clip weights are saved as ``timm/<model>.<tag>.safetensors`` and
    ``open_clip/<model>.<tag>.safetensors`` (plain tensors, also for OpenAI's TorchScript
    releases), torchvision ones under their original file name in ``torchvision/``.
    """
    from bmad.fsutil import write_bytes_atomic

    target = folder if folder is not None else os.environ.get(ENV_WEIGHTS)
    if not target:
        raise WeightsError("no folder to fetch weights into", hint=f"pass a folder or set {ENV_WEIGHTS}")
    spec = spec_from_name(name)
    dest = Path(target).expanduser() / spec.folder_files()[0]
    dest.parent.mkdir(parents=True, exist_ok=True)
    if spec.source == "torchvision":
        torch.hub.download_url_to_file(spec.url, str(dest))
    elif spec.source == "open_clip":  # OpenAI's TorchScript archives are converted to plain tensors here
        import open_clip
        from safetensors.torch import save

        model_name, _, tag = spec.key.rpartition(".")
        model = open_clip.create_model(model_name, pretrained=tag)
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        write_bytes_atomic(dest, save(state))
    else:
        import timm
        from safetensors.torch import save

        model = timm.create_model(spec.key, pretrained=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        write_bytes_atomic(dest, save(state))
    return dest
