"""Building open_clip models offline, with weights found through :mod:`bmad.weights`.

``build_clip(name, tag)`` creates the architecture with random weights (never a
download), then loads the weights named by ``tag``:

- an open_clip pretrained tag (``"openai"``, ``"laion400m_e31"``, ...): the file
  ``open_clip/<model>.<tag>.safetensors`` found by :func:`bmad.weights.resolve_weights`
  (explicit path, ``$BMAD_WEIGHTS``, then open_clip's hub / URL caches);
- a :class:`~bmad.weights.WeightSpec` (e.g. CheXzero's file, which no library serves);
- None: random initialisation (tests, ``--random-init``).

OpenAI weights need QuickGELU: models loaded with tag ``"openai"`` are built with
it, as are the ``-quickgelu`` names. OpenAI's original ``.pt`` files are TorchScript
archives; they are refused unless ``allow_torchscript`` (they can run code), and
``bmad weights fetch open_clip/<model>.openai`` saves plain tensors instead.

``hf-hub:<repo>`` names (BiomedCLIP) are built by open_clip from the Hugging Face
cache with the network off; ``local-dir:<folder>`` reads ``open_clip_config.json``
and ``open_clip_pytorch_model.bin`` (or ``open_clip_model.safetensors``) from a folder.

``TINY_CLIP`` names a 3.7M-parameter CLIP registered for tests.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bmad.errors import WeightsError
from bmad.weights import WeightSpec, load_checkpoint, open_clip_spec, resolve_weights

TINY_CLIP = "bmad-tiny-clip"
"""A tiny CLIP (embed 64; ViT 4 x 64, patch 32 at 224; text 2 x 64) for tests."""

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"


def register_tiny() -> None:
    """Make :data:`TINY_CLIP` known to open_clip (idempotent)."""
    import open_clip

    if open_clip.get_model_config(TINY_CLIP) is None:
        open_clip.add_model_config(Path(__file__).with_name(f"{TINY_CLIP}.json"))


def weight_spec(model_name: str, tag: str | WeightSpec) -> WeightSpec:
    """The :class:`WeightSpec` of ``tag`` for ``model_name`` (a spec is returned as is)."""
    if isinstance(tag, WeightSpec):
        return tag
    return open_clip_spec(model_name.removesuffix("-quickgelu") if tag == "openai" else model_name, tag)


def build_clip(
    model_name: str,
    tag: str | WeightSpec | None,
    *,
    weights: str | os.PathLike | None = None,
    image_size: int | None = None,
    allow_torchscript: bool = False,
) -> nn.Module:
    """An open_clip CLIP model in eval mode, its weights found offline.

    ``tag``: the weights (see the module docstring), None for random weights;
    ``weights``: an explicit file or folder (as ``--weights``); ``image_size``:
    open_clip's ``force_image_size`` (the positional embedding is resized when the
    weights were trained at another size).
    """
    import open_clip

    register_tiny()
    if model_name.startswith((HF_HUB, LOCAL_DIR)):
        return _build_hub(model_name, tag is not None, weights, image_size)
    if open_clip.get_model_config(model_name) is None:
        raise WeightsError(
            f"unknown open_clip model {model_name!r}",
            hint=f"a name from open_clip.list_models(), {TINY_CLIP!r}, hf-hub:<repo> or local-dir:<folder>",
        )
    path = resolve_weights(weight_spec(model_name, tag), weights) if tag is not None else None
    quick_gelu = tag == "openai" or model_name.endswith("-quickgelu")
    model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu,
                                   force_image_size=image_size)
    if path is not None:
        load_clip_weights(model, path, allow_torchscript=allow_torchscript)
    return model.eval()


def load_clip_weights(model: nn.Module, path: str | os.PathLike, *, allow_torchscript: bool = False) -> None:
    """Load a CLIP state dict (open_clip / OpenAI key names) into ``model``, strictly.

    The vision positional embedding is resized to the model's grid when it differs.
    """
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    path = Path(path)
    if _is_torchscript(path):
        if not allow_torchscript:
            raise WeightsError(
                f"{path} is a TorchScript archive (OpenAI's release format), which can run code when loaded",
                hint="on a connected machine `bmad weights fetch open_clip/<model>.openai` saves plain tensors; "
                "or pass allow_torchscript=true (--param allow_torchscript=true) if you trust the file",
            )
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = load_checkpoint(path)
    state = {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = torch.zeros_like(model.logit_bias)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights in {path} do not fit the model: {str(exc).splitlines()[0]}",
                           hint="check the model name matches the checkpoint (e.g. ViT-B-32 for CheXzero)") from None


def _is_torchscript(path: Path) -> bool:
    if path.suffix == ".safetensors" or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or n.endswith("code/__torch__.py") or "/code/" in n
                   for n in zf.namelist())


def _build_hub(model_name: str, pretrained: bool, weights: str | os.PathLike | None,
               image_size: int | None) -> nn.Module:
    """BiomedCLIP-style models: a hub repo (from the offline cache) or a local folder."""
    import open_clip

    if model_name.startswith(LOCAL_DIR):
        folder = Path(model_name[len(LOCAL_DIR):]).expanduser()
        cfg_file = folder / "open_clip_config.json"
        if not cfg_file.is_file():
            raise WeightsError(f"{folder} has no open_clip_config.json",
                               hint="a local-dir: folder holds open_clip_config.json and the weights file")
        model_cfg = json.loads(cfg_file.read_text())["model_cfg"]
        name = f"bmad-local-{abs(hash(str(folder.resolve())))}"
        with tempfile.TemporaryDirectory(prefix="bmad-clipcfg-") as tmp:
            (Path(tmp) / f"{name}.json").write_text(json.dumps(model_cfg))
            open_clip.add_model_config(Path(tmp) / f"{name}.json")
        weights = weights or next((folder / f for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
                                   if (folder / f).is_file()), None)
        if pretrained and weights is None:
            raise WeightsError(f"{folder} has no open_clip_model.safetensors or open_clip_pytorch_model.bin")
        try:
            with _hub_offline():
                model = open_clip.create_model(name, pretrained=None, force_image_size=image_size)
        except Exception as exc:  # noqa: BLE001 - the HF text tower's config must be cached
            raise _hub_error(model_name, exc) from None
        if pretrained:
            load_clip_weights(model, weights)
        return model.eval()
    if not pretrained:
        raise WeightsError(f"{model_name} is built from its hub files, which --random-init does not read",
                           hint="tests use the tiny CLIP (clip_model=bmad-tiny-clip)")
    try:
        with _hub_offline():
            model = open_clip.create_model(model_name, pretrained=None, force_image_size=image_size)
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(model_name, exc) from None
    return model.eval()


def _hub_error(model_name: str, exc: Exception) -> WeightsError:
    return WeightsError(
        f"cannot build {model_name} offline: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
        hint="on a connected machine run open_clip.create_model_and_transforms('<name>') once (it fills the "
        "Hugging Face cache, text tower config included), or download the repo into a folder and pass "
        "local-dir:<folder>; see docs/algorithms.md",
    )


class _hub_offline:  # noqa: N801 - used as a context manager
    """HF_HUB_OFFLINE=1 for the duration (the hub cache is read, never the network)."""

    def __enter__(self) -> None:
        import huggingface_hub.constants as hf_constants

        self._env = os.environ.get("HF_HUB_OFFLINE")
        self._const = hf_constants.HF_HUB_OFFLINE
        os.environ["HF_HUB_OFFLINE"] = "1"
        hf_constants.HF_HUB_OFFLINE = True

    def __exit__(self, *exc: Any) -> None:
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = self._const
        if self._env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = self._env


def tokenizer_for(model_name: str, context_length: int | None = None) -> Any:
    """open_clip's tokenizer for ``model_name`` (offline for hub models: from the cache;
    for ``local-dir:`` folders, from their ``open_clip_config.json``)."""
    import open_clip

    register_tiny()
    with _hub_offline():
        try:
            if model_name.startswith(LOCAL_DIR):
                folder = Path(model_name[len(LOCAL_DIR):]).expanduser()
                text_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"].get("text_cfg", {})
                length = context_length or text_cfg.get("context_length", 77)
                if "hf_tokenizer_name" in text_cfg:
                    return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=length,
                                                           **text_cfg.get("tokenizer_kwargs", {}))
                return open_clip.tokenizer.SimpleTokenizer(context_length=length)
            return open_clip.get_tokenizer(model_name, context_length=context_length)
        except Exception as exc:  # noqa: BLE001
            raise _hub_error(model_name, exc) from None


def freeze(module: nn.Module) -> nn.Module:
    """``module`` with every parameter frozen, in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
