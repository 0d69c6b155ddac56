"""Bench reading: layouts, masks, channels, resizing, few-shot, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bmad.benches import parse_bench_list, resolve_bench
from bmad.data import (
    check_masks,
    few_shot,
    list_split,
    make_loader,
    read_image,
    read_mask,
    resize_maps,
    to_channels,
)
from bmad.errors import DataError, UsageError
from tests.conftest import make_bench


@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("mask_dir", ["anomaly_mask", "label"])
def test_layout_variants_list_the_same_samples(tmp_path: Path, img_level: bool, mask_dir: str) -> None:
    root = make_bench(tmp_path / "B", img_level=img_level, mask_dir=mask_dir)
    train, valid, test = (list_split(root, s) for s in ("train", "valid", "test"))
    assert len(train) == 24 and all(s.label == 0 and s.mask is None for s in train)
    assert [s.label for s in valid] == [0] * 3 + [1] * 3
    assert [s.label for s in test] == [0] * 8 + [1] * 8
    for s in valid + test:
        assert (s.mask is not None) == bool(s.label)
        if s.mask is not None:
            assert s.mask.stem == s.path.stem and s.mask.parent.name == mask_dir


def test_reader_matches_anomalib_bmad_reader(tmp_path: Path) -> None:
    """bmad lists the same images, masks and labels as anomalib's own BMAD reader."""
    bmad_reader = pytest.importorskip("anomalib.data.datasets.image.bmad")
    # anomalib's reader expects train/good/*.png and {valid,test}/<cls>/img + label/
    root = make_bench(tmp_path / "Brain", img_level=True, mask_dir="label", train_img_level=False)
    for split in ("train", "valid", "test"):
        theirs = bmad_reader.make_bmad_dataset(root, split=split)
        ours = list_split(root, split)
        assert sorted(map(str, theirs.image_path)) == sorted(str(s.path) for s in ours)
        t_label = dict(zip(map(str, theirs.image_path), theirs.label_index))
        t_mask = dict(zip(map(str, theirs.image_path), theirs.mask_path))
        for s in ours:
            assert t_label[str(s.path)] == s.label
            theirs_mask = t_mask[str(s.path)]
            assert (str(s.mask) if s.mask else None) == (theirs_mask if theirs_mask else None)


def test_masks_are_binarised_and_images_scaled(tmp_path: Path) -> None:
    p = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 1], [128, 255]], np.uint8)).save(p)
    assert read_mask(p).tolist() == [[False, True], [True, True]]
    img = read_image(p)
    assert img.shape == (1, 2, 2) and img.dtype == np.float32
    assert img.max() == 1.0 and img.min() == 0.0


def test_16bit_png_keeps_its_range(tmp_path: Path) -> None:
    p = tmp_path / "d.png"
    arr = np.array([[0, 1000], [30000, 65535]], np.uint16)
    Image.fromarray(arr).save(p)
    img = read_image(p)
    np.testing.assert_allclose(img[0], arr / 65535.0, rtol=1e-6)


def test_channels_and_resizing(bench_dir: Path) -> None:
    test = list_split(bench_dir, "test")
    loader = make_loader(test, input_size=(48, 40), eval_size=(32, 32), channels=3, batch_size=5)
    b = next(iter(loader))
    assert b["image"].shape == (5, 3, 48, 40)
    assert torch.equal(b["image"][:, 0], b["image"][:, 2])  # grayscale replicated
    assert b["mask"].shape == (5, 32, 32)
    assert float(b["image"].min()) >= 0.0 and float(b["image"].max()) <= 1.0
    rgb = torch.rand(2, 3, 4, 4)
    assert torch.allclose(to_channels(rgb, 1)[:, 0], rgb.mean(1))
    maps = np.random.rand(2, 16, 8).astype(np.float32)
    assert resize_maps(maps, (32, 32)).shape == (2, 32, 32)


def test_unlabelled_mask_pixels_match_disk(bench_dir: Path) -> None:
    test = list_split(bench_dir, "test")
    loader = make_loader(test, input_size=(32, 32), eval_size=(32, 32), channels=1, batch_size=64)
    b = next(iter(loader))
    for i, s in enumerate(test):
        expect = read_mask(s.mask) if s.mask else np.zeros((32, 32), bool)
        assert np.array_equal(b["mask"][i].numpy().astype(bool), expect)
    assert all(b["mask"][i].sum() > 0 for i, s in enumerate(test) if s.label == 1)


def test_few_shot_is_seeded_and_sorted(bench_dir: Path) -> None:
    train = list_split(bench_dir, "train")
    a, b, c = few_shot(train, 5, 0), few_shot(train, 5, 0), few_shot(train, 5, 1)
    assert a == b and a != c and len(a) == 5
    assert [s.path for s in a] == sorted(s.path for s in a)
    with pytest.raises(DataError, match="more images than the training split"):
        few_shot(train, 1000, 0)


def test_bad_inputs_name_the_file(bench_dir: Path, tmp_path: Path) -> None:
    junk = bench_dir / "test" / "good" / "img" / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(DataError, match="notes.txt is not an image file"):
        list_split(bench_dir, "test")
    junk.unlink()

    bad = bench_dir / "test" / "good" / "img" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="broken.png"):
        read_image(bad)
    bad.unlink()

    mask = sorted((bench_dir / "test" / "Ungood" / "anomaly_mask").iterdir())[0]
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    with pytest.raises(DataError, match=f"mask {mask} is 12x10"):
        check_masks(list_split(bench_dir, "test"))

    empty = tmp_path / "Empty"
    (empty / "train" / "good" / "img").mkdir(parents=True)
    with pytest.raises(DataError, match="split 'train' .* is empty"):
        list_split(empty, "train")

    orphan = bench_dir / "valid" / "Ungood" / "anomaly_mask" / "nobody.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(orphan)
    with pytest.raises(DataError, match="nobody.png has no image"):
        list_split(bench_dir, "valid")


def test_bench_names_and_missing_folders(tmp_path: Path) -> None:
    assert parse_bench_list("all") == ["brats2021", "liver", "resc", "oct2017", "rsna", "camelyon16"]
    assert parse_bench_list("clip") == ["zhanglab", "chexpert", "brainmri", "vindr", "busi"]
    assert parse_bench_list("clip,brainmri,all")[:5] == parse_bench_list("clip")
    with pytest.raises(UsageError, match="(?s)unknown bench 'brats'.*did you mean brats2021"):
        parse_bench_list("brats")
    with pytest.raises(DataError, match="bmad prepare brats2021"):
        resolve_bench("brats2021", tmp_path)
    make_bench(tmp_path / "Brain")
    assert resolve_bench("brats2021", tmp_path).root == tmp_path / "Brain"
    fb = resolve_bench(f"folder:{tmp_path / 'Brain'}")
    assert fb.name == "folder-Brain" and fb.spec.pixel_masks
