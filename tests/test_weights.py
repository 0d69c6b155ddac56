"""bmad.weights: safe checkpoint loading, the offline resolver, random init without network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bmad.errors import WeightsError
from bmad.weights import (
    WeightSpec,
    create_timm_backbone,
    load_checkpoint,
    load_into,
    offline_random_init,
    resolve_weights,
    timm_spec,
)


def small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict()


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


class NotATensor:
    """A custom class: unpickling it would import and run this module's code."""

    def __init__(self) -> None:
        self.payload = 1


class RunsCode:
    """Unpickling this calls os.mkdir: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


# -- load_checkpoint ---------------------------------------------------------------------
def test_safetensors_round_trip(tmp_path):
    state = small_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    assert_same(load_checkpoint(tmp_path / "w.safetensors"), state)


def test_torch_state_dict_round_trip_and_unwrapping(tmp_path):
    state = small_state()
    torch.save(state, tmp_path / "plain.pth")
    assert_same(load_checkpoint(tmp_path / "plain.pth"), state)
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "lightning.ckpt")
    assert_same(load_checkpoint(tmp_path / "lightning.ckpt"), state)
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")
    assert_same(load_checkpoint(tmp_path / "ddp.pt"), state)


@pytest.mark.parametrize("payload", ["class", "code"])
def test_pickled_objects_are_refused(tmp_path, payload):
    marker = tmp_path / "code_ran"
    obj = NotATensor() if payload == "class" else RunsCode(marker)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": small_state(), "extra": obj}, path)
    with pytest.raises(WeightsError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "refusing" in str(err.value)
    assert not marker.exists()


def test_missing_and_tensorless_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    torch.save({"epoch": 1}, tmp_path / "meta.pt")
    with pytest.raises(WeightsError, match="no state dict"):
        load_checkpoint(tmp_path / "meta.pt")


def test_load_into_reports_and_rejects():
    torch.manual_seed(0)
    target = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    source = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(2, 2)).state_dict()
    report = load_into(target, source)
    assert (report.matched, report.missing, report.unexpected) == (2, 0, 2)
    assert_same(target.state_dict(), {k: source[k] for k in ("0.weight", "0.bias")})
    with pytest.raises(WeightsError, match="none of the"):
        load_into(target, {"fc.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="do not fit"):
        load_into(target, {"0.weight": torch.zeros(1)})


# -- the resolver ------------------------------------------------------------------------
@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty, private BMAD_WEIGHTS / HF / torch-hub folders; returns their paths."""
    import huggingface_hub.constants

    paths = {"weights": tmp_path / "weights", "hf": tmp_path / "hf", "hub": tmp_path / "torch_hub"}
    monkeypatch.setenv("BMAD_WEIGHTS", str(paths["weights"]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(paths["hf"]))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(paths["hub"]))
    return paths


SPEC = WeightSpec("timm", "resnet18.a1_in1k", hf_repo="timm/resnet18.a1_in1k",
                  url="https://example.org/weights/resnet18_a1_0-d63eafa0.pth")


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_resolver_order(tmp_path, caches):
    hub = touch(caches["hub"] / "checkpoints" / "resnet18_a1_0-d63eafa0.pth")
    assert resolve_weights(SPEC) == hub

    commit = "0" * 40
    repo = caches["hf"] / "models--timm--resnet18.a1_in1k"
    touch(repo / "refs" / "main").write_text(commit)
    hf = touch(repo / "snapshots" / commit / "model.safetensors")
    assert resolve_weights(SPEC) == hf

    local = touch(caches["weights"] / "timm" / "resnet18.a1_in1k.pth")
    assert resolve_weights(SPEC) == local
    preferred = touch(caches["weights"] / "timm" / "resnet18.a1_in1k.safetensors")
    assert resolve_weights(SPEC) == preferred

    explicit = touch(tmp_path / "mine.safetensors")
    assert resolve_weights(SPEC, explicit) == explicit
    folder = tmp_path / "other"
    in_folder = touch(folder / "timm" / "resnet18.a1_in1k.safetensors")
    assert resolve_weights(SPEC, folder) == in_folder


def test_explicit_path_is_not_silently_replaced(tmp_path, caches):
    touch(caches["weights"] / "timm" / "resnet18.a1_in1k.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights(SPEC, tmp_path / "typo.safetensors")
    with pytest.raises(WeightsError, match="timm/resnet18.a1_in1k.safetensors"):
        resolve_weights(SPEC, tmp_path)


def test_missing_weights_message(caches, monkeypatch):
    with pytest.raises(WeightsError) as err:
        resolve_weights(timm_spec("wide_resnet50_2"))
    message = str(err.value)
    assert f"{caches['weights']}/timm/wide_resnet50_2.racm_in1k.safetensors" in message
    assert "--weights" in message and "--random-init" in message
    assert "bmad weights fetch timm/wide_resnet50_2.racm_in1k" in message

    monkeypatch.delenv("BMAD_WEIGHTS")
    with pytest.raises(WeightsError, match=r"\$BMAD_WEIGHTS/timm/wide_resnet50_2.racm_in1k.safetensors"):
        resolve_weights(timm_spec("wide_resnet50_2"))


def test_timm_spec_names():
    assert timm_spec("resnet18").name == "timm/resnet18.a1_in1k"
    tv = timm_spec("wide_resnet50_2.tv_in1k")
    assert tv.name == "timm/wide_resnet50_2.tv_in1k" and tv.url.endswith("wide_resnet50_2-95faca4d.pth")
    with pytest.raises(WeightsError):
        timm_spec("no_such_model_xyz")


# -- building backbones offline ----------------------------------------------------------
def test_create_timm_backbone_loads_local_file(caches):
    torch.manual_seed(1)
    random_model = create_timm_backbone("resnet18", pretrained=False, num_classes=0)
    path = caches["weights"] / "timm" / "resnet18.a1_in1k.safetensors"
    path.parent.mkdir(parents=True)
    save_file(random_model.state_dict(), str(path))

    torch.manual_seed(2)
    loaded = create_timm_backbone("resnet18", pretrained=True, num_classes=0)
    assert_same(loaded.state_dict(), random_model.state_dict())

    path.unlink()
    with pytest.raises(WeightsError, match="resnet18.a1_in1k"):
        create_timm_backbone("resnet18", pretrained=True, num_classes=0)


def test_offline_random_init_builds_without_network():
    import huggingface_hub.constants
    import timm
    import torchvision

    env_before = dict(os.environ)
    offline_before = huggingface_hub.constants.HF_HUB_OFFLINE
    with offline_random_init():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        torch.manual_seed(0)
        asked = timm.create_model("resnet18", pretrained=True)
        torch.manual_seed(0)
        plain = timm.create_model("resnet18", pretrained=False)
        assert_same(asked.state_dict(), plain.state_dict())
        torchvision.models.resnet18(weights="DEFAULT")  # random init, no download
    assert dict(os.environ) == env_before
    assert offline_before == huggingface_hub.constants.HF_HUB_OFFLINE
    model = torch.nn.Linear(2, 2)
    model.load_state_dict(torch.nn.Linear(2, 2).state_dict())  # the patch is gone
