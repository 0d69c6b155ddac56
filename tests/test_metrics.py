"""bmad.metrics against scikit-learn, anomalib and slow, obviously-correct references."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from bmad import metrics

TOL = 1e-9


# ----------------------------------------------------------------------------- references


def label_regions(mask: np.ndarray, eight: bool = True) -> list[np.ndarray]:
    """Connected regions of a 2-D mask by flood fill, one boolean mask per region."""
    steps = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)]
    if not eight:
        steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    seen = np.zeros(mask.shape, dtype=bool)
    regions = []
    for i, j in zip(*np.nonzero(mask)):
        if seen[i, j]:
            continue
        region = np.zeros(mask.shape, dtype=bool)
        stack = [(i, j)]
        seen[i, j] = True
        while stack:
            a, b = stack.pop()
            region[a, b] = True
            for da, db in steps:
                y, x = a + da, b + db
                if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not seen[y, x]:
                    seen[y, x] = True
                    stack.append((y, x))
        regions.append(region)
    return regions


def ref_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3, eight: bool = True) -> float:
    """MVTec AD AUPRO recomputed from scratch at every distinct map value."""
    maps = maps.astype(np.float32)
    masks = masks > 0
    regions = [(n, r) for n in range(len(masks)) for r in label_regions(masks[n], eight)]
    normal = maps[~masks]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(float(np.mean(normal >= t)))
        ys.append(float(np.mean([np.mean(maps[n][r] >= t) for n, r in regions])))
    area = 0.0
    for i in range(1, len(xs)):
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < limit:
                y = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += (limit - x0) * (y0 + y) / 2
            break
    return area / limit


def ref_dice(maps: np.ndarray, masks: np.ndarray, threshold: float) -> float:
    x = maps.astype(np.float32).astype(np.float64)
    span = x.max() - x.min()
    norm = (x - x.min()) / span if span > 0 else np.zeros_like(x)
    pred, gt = norm >= threshold, masks > 0
    return 2 * np.sum(pred & gt) / (np.sum(pred) + np.sum(gt))


def ref_best_dice(maps: np.ndarray, masks: np.ndarray) -> float:
    x, gt = maps.astype(np.float32), masks > 0
    return max([0.0] + [2 * np.sum((x >= t) & gt) / (np.sum(x >= t) + np.sum(gt)) for t in np.unique(x)])


def blobs(rng: np.random.Generator, n: int, h: int, w: int, level: float = 0.6) -> np.ndarray:
    """Blob-shaped masks (several regions per image); every other image all normal."""
    masks = ndimage.gaussian_filter(rng.random((n, h, w)), (0, 2, 2)) > level - 0.1
    masks[::2] = False
    return masks


def smooth_maps(rng: np.random.Generator, masks: np.ndarray, signal: float = 0.05) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.random(masks.shape), (0, 1, 1))
    return (noise + signal * masks).astype(np.float32)


@pytest.fixture
def tiny_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """One image per chunk and one bucket per resolving pass: every streaming seam is hit."""
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 1)
    monkeypatch.setattr(metrics, "_TABLE_BYTES", 1)


# ----------------------------------------------------------------------------- image level


@pytest.mark.parametrize("levels", [None, 3, 2])
@pytest.mark.parametrize("n", [2, 3, 7, 200])
def test_image_metrics_equal_sklearn(n: int, levels: int | None) -> None:
    rng = np.random.default_rng(n * 10 + (levels or 0))
    for _ in range(5):
        scores = rng.integers(0, levels, n).astype(float) if levels else rng.normal(size=n)
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        assert metrics.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
        assert metrics.image_ap(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=TOL)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=2, max_size=40))
def test_image_metrics_property(pairs: list[tuple[int, bool]]) -> None:
    scores = np.array([s for s, _ in pairs], dtype=float) / 7
    labels = np.array([y for _, y in pairs], dtype=int)
    if labels.min() == labels.max():
        with pytest.raises(ValueError, match="only one class"):
            metrics.image_auroc(scores, labels)
        return
    assert metrics.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert metrics.image_ap(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=TOL)


def test_image_metrics_known_values() -> None:
    # pairs (anomalous, normal) ordered right: (3,1) (3,2) (2,1) and the tie (2,2) counts 1/2
    assert metrics.image_auroc([3, 2, 2, 1], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)
    assert metrics.image_ap([3, 2, 1], [1, 0, 1]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert metrics.image_ap([1.0, 2.0], [1, 1]) == 1.0  # AP needs no normal image


# ----------------------------------------------------------------------------- pixel AUROC


def pixel_sklearn(maps: np.ndarray, masks: np.ndarray) -> float:
    # float32 values (what bmad scores), widened so scikit-learn's float32 arithmetic cannot overflow
    return roc_auc_score(masks.ravel() > 0, maps.astype(np.float32).astype(np.float64).ravel())


@pytest.mark.parametrize("kind", ["uniform", "quantised", "negative", "low_bits", "smooth"])
def test_pixel_auroc_equals_sklearn(kind: str) -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((5, 24, 40)) < 0.3
    maps = rng.random(masks.shape).astype(np.float32) + 0.1 * masks
    if kind == "quantised":
        maps = np.round(maps * 2) / 2
    elif kind == "negative":
        maps = (maps - 0.6) * 1e3
    elif kind == "low_bits":  # one top-16-bit bucket: only the exact second level orders them
        bits = np.float32(0.7).view(np.uint32) + rng.integers(0, 40, masks.shape) + 7 * masks
        maps = bits.astype(np.uint32).view(np.float32)
    elif kind == "smooth":
        maps = smooth_maps(rng, masks, signal=0.02)
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(pixel_sklearn(maps, masks), abs=TOL)


def test_pixel_auroc_streaming_seams(tiny_passes: None) -> None:
    rng = np.random.default_rng(2)
    masks = blobs(rng, 6, 20, 30)
    maps = smooth_maps(rng, masks)
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(pixel_sklearn(maps, masks), abs=TOL)


special = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-38, 0.5, 0.50000006, -0.5, 3.0e38, -3.0e38, 7.0, 7.0000005])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(special, st.booleans()), min_size=6, max_size=6 * 4))
def test_pixel_auroc_property(pairs: list[tuple[float, bool]]) -> None:
    k = len(pairs) // 6 * 6
    maps = np.array([v for v, _ in pairs[:k]], dtype=np.float32).reshape(-1, 2, 3)
    masks = np.array([y for _, y in pairs[:k]]).reshape(maps.shape)
    if masks.all() or not masks.any():
        with pytest.raises(ValueError, match="only one class"):
            metrics.pixel_auroc(maps, masks)
        return
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(pixel_sklearn(maps, masks), abs=TOL)


def test_pixel_inputs_memmap_uint8_float64(tmp_path) -> None:
    rng = np.random.default_rng(3)
    masks = blobs(rng, 4, 16, 16)
    maps = rng.random(masks.shape)  # float64: scored at float32 precision (documented)
    mm = np.lib.format.open_memmap(tmp_path / "maps.npy", mode="w+", dtype=np.float32, shape=maps.shape)
    mm[:] = maps
    mm.flush()
    mm = np.load(tmp_path / "maps.npy", mmap_mode="r")
    expected = pixel_sklearn(maps, masks)
    assert metrics.pixel_auroc(mm, masks) == pytest.approx(expected, abs=TOL)
    assert metrics.pixel_auroc(maps, masks.astype(np.uint8) * 255) == pytest.approx(expected, abs=TOL)


# ----------------------------------------------------------------------------- AUPRO


def hand_made() -> tuple[np.ndarray, np.ndarray]:
    """4 images 6x7: several regions of different sizes, a diagonal pair, an empty mask, ties."""
    masks = np.zeros((4, 6, 7), dtype=bool)
    masks[0, 0:2, 0:2] = True  # 4-pixel region
    masks[0, 4, 5] = True  # 1-pixel region
    masks[0, 3:6, 2] = True  # 3-pixel line
    masks[1, 1, 1] = masks[1, 2, 2] = True  # diagonal neighbours: one region under 8-connectivity
    masks[1, 5, 0:7] = True
    # image 2: empty mask (only normal pixels); image 3: a region covering most of it
    masks[3, 1:6, 1:6] = True
    values = np.array([0.0, 0.1, 0.2, 0.2, 0.4, 0.5, 0.9, 1.0], dtype=np.float32)
    rng = np.random.default_rng(4)
    maps = values[rng.integers(0, len(values), masks.shape)]
    maps = np.where(masks, maps + np.float32(0.2), maps).astype(np.float32)
    return maps, masks


@pytest.mark.parametrize("limit", [0.3, 0.05, 0.5, 1.0])
def test_aupro_hand_made_equals_reference(limit: float) -> None:
    maps, masks = hand_made()
    assert metrics.aupro(maps, masks, fpr_limit=limit) == pytest.approx(ref_aupro(maps, masks, limit), abs=TOL)


def test_aupro_uses_8_connectivity() -> None:
    maps, masks = hand_made()
    eight, four = ref_aupro(maps, masks, eight=True), ref_aupro(maps, masks, eight=False)
    assert abs(eight - four) > 1e-3  # the case distinguishes the two
    assert metrics.aupro(maps, masks) == pytest.approx(eight, abs=TOL)


def test_aupro_all_normal_images_only_add_false_positives() -> None:
    maps, masks = hand_made()
    extra_maps = np.concatenate([maps, np.full((2, 6, 7), 0.95, np.float32)])
    extra_masks = np.concatenate([masks, np.zeros((2, 6, 7), bool)])
    value = metrics.aupro(extra_maps, extra_masks)
    assert value == pytest.approx(ref_aupro(extra_maps, extra_masks), abs=TOL)
    assert value < metrics.aupro(maps, masks)  # high scores on normal images cost overlap at low FPR


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_aupro_random_equals_reference(seed: int, tiny_passes: None) -> None:
    rng = np.random.default_rng(seed)
    masks = blobs(rng, 4, 12, 14)
    maps = np.round(smooth_maps(rng, masks, signal=0.1) * 64) / 64 if seed == 7 else smooth_maps(rng, masks)
    assert metrics.aupro(maps, masks) == pytest.approx(ref_aupro(maps, masks), abs=TOL)


def test_aupro_matches_anomalib() -> None:
    torch = pytest.importorskip("torch")
    anomalib_metrics = pytest.importorskip("anomalib.metrics", reason="anomalib is not importable")
    rng = np.random.default_rng(8)
    masks = blobs(rng, 8, 64, 64)
    maps = smooth_maps(rng, masks, signal=0.1)
    peer = anomalib_metrics.AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3)
    peer.update(SimpleNamespace(anomaly_map=torch.from_numpy(maps), gt_mask=torch.from_numpy(masks.astype(np.int64))))
    assert metrics.aupro(maps, masks) == pytest.approx(float(peer.compute()), abs=1e-3)


# ----------------------------------------------------------------------------- Dice


def test_dice_hand_made() -> None:
    maps = np.array([[[0.0, 1.0, 2.0, 4.0]]], dtype=np.float32)  # normalised: 0, .25, .5, 1
    assert metrics.dice(maps, np.array([[[0, 0, 1, 1]]])) == 1.0  # 0.5 itself is predicted (>=)
    gt = np.array([[[0, 1, 1, 0]]])
    assert metrics.dice(maps, gt) == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # TP 1, FP 1, FN 1
    assert metrics.dice(maps, gt, threshold=0.25) == pytest.approx(2 * 2 / (2 * 2 + 1))  # TP 2, FP 1
    assert metrics.dice(maps, gt, threshold=0.0) == pytest.approx(2 * 2 / (2 * 2 + 2))  # all predicted
    assert metrics.dice(maps, gt, threshold=1.01) == 0.0  # nothing predicted
    assert metrics.best_dice(maps, gt) == pytest.approx(0.8)  # threshold at 1.0: TP 2, FP 1
    # min and max are over the whole set: a second image shifts the normalisation
    two = np.concatenate([maps, np.array([[[8.0, 8.0, 8.0, 8.0]]], np.float32)])
    assert metrics.dice(two, np.concatenate([gt, np.zeros_like(gt)])) == 0.0  # 8 is the only value >= 4
    constant = np.ones((1, 2, 2), np.float32)
    assert metrics.dice(constant, np.array([[[1, 0], [0, 0]]])) == 0.0  # constant maps normalise to 0


@pytest.mark.parametrize("seed", [9, 10])
def test_dice_random_equals_reference(seed: int, tiny_passes: None) -> None:
    rng = np.random.default_rng(seed)
    masks = blobs(rng, 4, 10, 12)
    maps = smooth_maps(rng, masks, signal=0.2)
    for t in (0.5, 0.3, 0.77):
        assert metrics.dice(maps, masks, t) == pytest.approx(ref_dice(maps, masks, t), abs=TOL)
    best = metrics.best_dice(maps, masks)
    assert best == pytest.approx(ref_best_dice(maps, masks), abs=TOL)
    assert best >= metrics.dice(maps, masks)


def test_dice_threshold_between_close_float32_values() -> None:
    # 1.5 +- a few ulps normalises to about 0.5 (min 1, max 2): the threshold must split them exactly
    bits = np.int64(np.float32(1.5).view(np.uint32)) + np.arange(-3, 3)
    row = np.concatenate([bits.astype(np.uint32).view(np.float32), [np.float32(2.0)]])
    maps = np.stack([row, np.ones(7, np.float32)])[:, None, :]
    masks = np.zeros(maps.shape, bool)
    masks[0, 0, 2:5] = True  # 1.5 - 1 ulp, 1.5, 1.5 + 1 ulp
    # predicted: 1.5, 1.5 + 1 ulp, 1.5 + 2 ulp, 2.0 -> TP 2, FP 2, FN 1
    assert metrics.dice(maps, masks) == pytest.approx(4 / 7) == ref_dice(maps, masks, 0.5)
    assert metrics.best_dice(maps, masks) == pytest.approx(ref_best_dice(maps, masks), abs=TOL)


# ----------------------------------------------------------------------------- compute_all, errors


def test_compute_all_matches_single_metrics() -> None:
    rng = np.random.default_rng(11)
    masks = blobs(rng, 6, 16, 20)
    maps = smooth_maps(rng, masks)
    scores, labels = maps.max(axis=(1, 2)), masks.any(axis=(1, 2)).astype(int)
    out = metrics.compute_all(scores, labels, maps, masks)
    assert list(out) == ["image_auroc", "image_ap", "pixel_auroc", "aupro", "dice", "best_dice"]
    assert out["pixel_auroc"] == pytest.approx(pixel_sklearn(maps, masks), abs=TOL)
    assert out["aupro"] == pytest.approx(ref_aupro(maps, masks), abs=TOL)
    assert out["dice"] == pytest.approx(ref_dice(maps, masks, 0.5), abs=TOL)
    assert out["best_dice"] == pytest.approx(ref_best_dice(maps, masks), abs=TOL)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert all(isinstance(v, float) for v in out.values())
    image_only = metrics.compute_all(scores, labels, maps, None)
    assert image_only["image_ap"] == out["image_ap"]
    assert [image_only[k] for k in ("pixel_auroc", "aupro", "dice", "best_dice")] == [None] * 4


def test_errors_are_clear() -> None:
    maps, masks = hand_made()
    with pytest.raises(ValueError, match="no anomalous images"):
        metrics.image_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="no normal images"):
        metrics.image_auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="equal length"):
        metrics.image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.image_ap([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="0 .normal. or 1"):
        metrics.image_auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="does not match"):
        metrics.pixel_auroc(maps, masks[:, :5])
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        metrics.aupro(maps[0], masks[0])
    bad = maps.copy()
    bad[1, 2, 3] = np.nan
    for fn in (metrics.pixel_auroc, metrics.aupro, metrics.dice, metrics.best_dice):
        with pytest.raises(ValueError, match="NaN or infinite"):
            fn(bad, masks)
    bad[1, 2, 3] = -np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.pixel_auroc(bad, masks)
    empty = np.zeros_like(masks)
    with pytest.raises(ValueError, match="no anomalous pixels"):
        metrics.pixel_auroc(maps, empty)
    with pytest.raises(ValueError, match="no anomalous region"):
        metrics.aupro(maps, empty)
    with pytest.raises(ValueError, match="no normal pixel"):
        metrics.aupro(maps, np.ones_like(masks))
    with pytest.raises(ValueError, match="no anomalous pixel"):
        metrics.dice(maps, empty)
    with pytest.raises(ValueError, match="no anomalous pixel"):
        metrics.best_dice(maps, empty)
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(maps, masks, fpr_limit=0.0)
