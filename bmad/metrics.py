"""Evaluation metrics: the only place bmad defines them (definitions: docs/metrics.md).

Image metrics (AUROC, AP) are exact rank statistics on the image scores. Pixel metrics
(pixel AUROC, AUPRO, Dice) stream over the test set in chunks of whole images, so the
maps may be a ``np.memmap`` and a RESC-sized set (1,805 x 512 x 1024, ~1e9 pixels)
is scored in bounded extra memory.

How the pixel metrics stay exact without sorting 1e9 values: every map value is
rounded to float32 (the algorithm contract's map dtype; float32 inputs are unchanged)
and mapped to an order-preserving uint32 key. A first pass counts normal pixels,
anomalous pixels and per-region weights per *bucket* (the key's top 16 bits), so
pixels in different buckets are already ordered exactly. A bucket that holds both
classes (and that the metric needs) is then resolved by the key's low 16 bits in a
further pass (one pass per group of buckets whose tables fit in ``_TABLE_BYTES``;
usually one). Each metric is built from per-bin terms along the sorted values (a sum,
or for best Dice a maximum): it is computed on the buckets, and each resolved
bucket's term is replaced by its exact sub-bin terms. Extra memory: the sub-bin
tables (at most ``_TABLE_BYTES``) plus a few arrays per chunk of ``_CHUNK_PIXELS``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

__all__ = ["aupro", "best_dice", "compute_all", "dice", "image_ap", "image_auroc", "pixel_auroc"]

_B = 1 << 16  # buckets (top 16 key bits) and sub-bins per bucket (low 16 bits)
_CHUNK_PIXELS = 1 << 22  # pixels per streamed chunk (at least one whole image)
_TABLE_BYTES = 1 << 30  # memory for the sub-bin tables of one resolving pass

# Raw float32 top 16 bits -> key bucket. Keys order floats: negatives have all bits
# flipped, non-negatives get the sign bit set. Finite floats land in buckets
# [0x0080, 0xFF7F]; the buckets outside hold -inf/+inf/NaN.
_t = np.arange(_B, dtype=np.int64)
_TOP = np.where(_t < 0x8000, _t | 0x8000, 0xFFFF - _t)
del _t
_FINITE = slice(0x0080, 0xFF80)

# 8-connectivity inside each image (as OpenCV's connectedComponents, used by anomalib),
# none across images of a [N, H, W] block.
_EIGHT = np.zeros((3, 3, 3), dtype=bool)
_EIGHT[1] = True


# ----------------------------------------------------------------------------- image level


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of image scores (ties count 1/2; equals scikit-learn)."""
    neg, pos = _image_bins(scores, labels)
    n_pos, n_neg = pos.sum(), neg.sum()
    _need_both("image AUROC", "images", n_pos, n_neg)
    return float(_u_terms(neg, pos, 0.0).sum() / (n_pos * n_neg))


def image_ap(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision of image scores, sum over thresholds of dRecall x Precision.

    No interpolation; tied scores form one threshold (equals scikit-learn's
    ``average_precision_score``).
    """
    neg, pos = _image_bins(scores, labels)
    n_pos = pos.sum()
    if n_pos == 0:
        raise ValueError("image AP is undefined: labels contain no anomalous (1) image")
    tp, fp = np.cumsum(pos[::-1]), np.cumsum(neg[::-1])
    return float(np.sum(pos[::-1] / n_pos * tp / (tp + fp)))


def _image_bins(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Normal and anomalous counts per distinct score, in ascending score order."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"scores and labels must be 1-D of equal length, got shapes {s.shape} and {y.shape}")
    if s.size == 0:
        raise ValueError("scores are empty")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    _, inv = np.unique(s, return_inverse=True)
    total = np.bincount(inv).astype(np.float64)
    pos = np.bincount(inv, weights=(y == 1).astype(np.float64), minlength=total.size)
    return total - pos, pos


# ----------------------------------------------------------------------------- pixel level


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """AUROC over all pixels of all images (exact on float32 values, ties count 1/2)."""
    maps, masks = _pixel_inputs(maps, masks)
    stats = _scan(maps, masks, regions=False)
    return _evaluate(maps, masks, stats, [_PixelAuroc(stats)])[0]


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD).

    PRO(t) is the mean over every 8-connected ground-truth region of the test set of
    the fraction of its pixels scoring >= t; FPR(t) is the fraction of all normal
    pixels (mask 0, in any image) scoring >= t. The curve starts at (0, 0), is
    integrated by trapezoids up to ``fpr_limit`` (end point linearly interpolated)
    and divided by ``fpr_limit``.
    """
    maps, masks = _pixel_inputs(maps, masks)
    stats = _scan(maps, masks, regions=True)
    return _evaluate(maps, masks, stats, [_Aupro(stats, fpr_limit)])[0]


def dice(maps: ArrayLike, masks: ArrayLike, threshold: float = 0.5) -> float:
    """Global Dice 2TP / (2TP + FP + FN) of ``(map - min) / (max - min) >= threshold``.

    min and max are taken over the whole set; constant maps normalise to 0.
    """
    maps, masks = _pixel_inputs(maps, masks)
    stats = _scan(maps, masks, regions=False)
    return _evaluate(maps, masks, stats, [_Dice(stats, threshold)])[0]


def best_dice(maps: ArrayLike, masks: ArrayLike) -> float:
    """Oracle Dice: the best global Dice over every threshold (uses the test masks)."""
    maps, masks = _pixel_inputs(maps, masks)
    stats = _scan(maps, masks, regions=False)
    return _evaluate(maps, masks, stats, [_BestDice(stats)])[0]


def compute_all(
    scores: ArrayLike,
    labels: ArrayLike,
    maps: ArrayLike | None = None,
    masks: ArrayLike | None = None,
) -> dict[str, float | None]:
    """All metrics of a run; the pixel ones are None when ``maps`` or ``masks`` is None.

    The pixel metrics share their passes over the maps.
    """
    out: dict[str, float | None] = {
        "image_auroc": image_auroc(scores, labels),
        "image_ap": image_ap(scores, labels),
        "pixel_auroc": None,
        "aupro": None,
        "dice": None,
        "best_dice": None,
    }
    if maps is not None and masks is not None:
        maps, masks = _pixel_inputs(maps, masks)
        stats = _scan(maps, masks, regions=True)
        plans = [_PixelAuroc(stats), _Aupro(stats, 0.3), _Dice(stats, 0.5), _BestDice(stats)]
        values = _evaluate(maps, masks, stats, plans)
        out.update(zip(("pixel_auroc", "aupro", "dice", "best_dice"), values))
    return out


def _pixel_inputs(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = np.asanyarray(maps), np.asanyarray(masks)  # no copy: a memmap stays on disk
    if maps.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got shape {maps.shape}")
    if masks.shape != maps.shape:
        raise ValueError(f"masks shape {masks.shape} does not match maps shape {maps.shape}")
    if maps.size == 0:
        raise ValueError("maps are empty")
    return maps, masks


def _need_both(metric: str, what: str, n_pos: float, n_neg: float) -> None:
    if n_pos == 0:
        raise ValueError(f"{metric} is undefined: no anomalous {what} (only one class present)")
    if n_neg == 0:
        raise ValueError(f"{metric} is undefined: no normal {what} (only one class present)")


# ----------------------------------------------------------------------------- streaming


@dataclass
class _Chunk:
    values: np.ndarray  # float32, flat, -0.0 replaced by +0.0
    bits: np.ndarray  # uint32 view of values
    pos: np.ndarray  # bool, flat: anomalous pixel
    weights: np.ndarray | None  # float64, one per anomalous pixel: 1 / size of its region
    n_regions: int


def _chunks(maps: np.ndarray, masks: np.ndarray, regions: bool) -> Iterator[_Chunk]:
    """Blocks of whole images, read one at a time (a memmap is paged in block by block)."""
    n, h, w = maps.shape
    step = max(1, _CHUNK_PIXELS // (h * w))
    for i in range(0, n, step):
        block = maps[i : i + step]
        values = np.empty(block.shape, dtype=np.float32)
        np.add(block, 0, out=values, casting="unsafe")  # float32 copy; -0.0 + 0 == +0.0
        pos = np.asarray(masks[i : i + step]) > 0
        weights, n_regions = _region_weights(pos) if regions else (None, 0)
        values = values.reshape(-1)
        yield _Chunk(values, values.view(np.uint32), pos.reshape(-1), weights, n_regions)


def _region_weights(pos: np.ndarray) -> tuple[np.ndarray, int]:
    """1 / region size for each anomalous pixel (C order) of a [b, H, W] block, and #regions."""
    lab, n_regions = ndimage.label(pos, structure=_EIGHT)
    lab = lab[pos]
    sizes = np.bincount(lab, minlength=1).astype(np.float64)
    sizes[0] = 1.0  # background: no anomalous pixel has label 0
    return 1.0 / sizes[lab], n_regions


def _low_bits(bits: np.ndarray) -> np.ndarray:
    """Low 16 key bits (sub-bin inside a bucket) of raw float32 bits."""
    return ((bits & 0xFFFF) ^ ((bits >> 31) * np.uint32(0xFFFF))).astype(np.int64)


@dataclass
class _Stats:
    neg: np.ndarray  # float64 [_B]: normal pixels per bucket
    pos: np.ndarray  # float64 [_B]: anomalous pixels per bucket
    posw: np.ndarray | None  # float64 [_B]: sum of 1 / region size per bucket
    n_regions: int
    vmin: float
    vmax: float
    n_pixels: int

    @property
    def n_neg(self) -> float:
        return float(self.neg.sum())

    @property
    def n_pos(self) -> float:
        return float(self.pos.sum())


def _scan(maps: np.ndarray, masks: np.ndarray, regions: bool) -> _Stats:
    """First pass: per-bucket histograms, region count, min and max."""
    counts = np.zeros(2 * _B, dtype=np.int64)
    posw = np.zeros(_B) if regions else None
    n_regions, vmin, vmax = 0, np.inf, -np.inf
    for c in _chunks(maps, masks, regions):
        top = _TOP[c.bits >> 16]
        if posw is not None:
            posw += np.bincount(top[c.pos], weights=c.weights, minlength=_B)
            n_regions += c.n_regions
        top <<= 1
        top |= c.pos
        counts += np.bincount(top, minlength=2 * _B)
        vmin, vmax = min(vmin, float(c.values.min())), max(vmax, float(c.values.max()))
    counts = counts.reshape(_B, 2)
    if counts[: _FINITE.start].any() or counts[_FINITE.stop :].any():
        raise ValueError("maps contain NaN or infinite values (or values beyond float32 range)")
    neg, pos = counts[:, 0].astype(np.float64), counts[:, 1].astype(np.float64)
    return _Stats(neg, pos, posw, n_regions, vmin, vmax, int(counts.sum()))


def _resolve(
    maps: np.ndarray, masks: np.ndarray, buckets: np.ndarray, weights: bool, n_pixels: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]]:
    """Exact sub-bin histograms (neg, pos, posw; ascending) of the given buckets.

    Buckets are resolved in groups whose tables fit in ``_TABLE_BYTES``; each group
    costs one pass over the data.
    """
    cdtype = np.uint32 if n_pixels < 2**32 else np.int64
    one = cdtype(1)  # a scalar of the table's dtype keeps np.add.at on its fast path
    per_bucket = _B * (2 * np.dtype(cdtype).itemsize + (8 if weights else 0))
    size = max(1, _TABLE_BYTES // per_bucket)
    for g in range(0, len(buckets), size):
        group = buckets[g : g + size]
        slot = np.full(_B, -1, dtype=np.int64)
        slot[group] = np.arange(len(group))
        slot = slot[_TOP]  # indexed by raw top bits
        counts = np.zeros(len(group) * 2 * _B, dtype=cdtype)
        posw = np.zeros(len(group) * _B) if weights else None
        for c in _chunks(maps, masks, weights):
            s = slot[c.bits >> 16]
            sel = np.flatnonzero(s >= 0)
            if sel.size:
                bits = c.bits[sel]
                np.add.at(counts, (s[sel] << 17) | (_low_bits(bits) << 1) | c.pos[sel], one)
            if posw is not None and c.weights.size:
                bits = c.bits[c.pos]
                s = slot[bits >> 16]
                keep = s >= 0
                np.add.at(posw, (s[keep] << 16) | _low_bits(bits[keep]), c.weights[keep])
        counts = counts.reshape(len(group), _B, 2)
        for j, b in enumerate(group):
            neg, pos = counts[j].T.astype(np.float64)
            yield int(b), neg, pos, None if posw is None else posw[j * _B : (j + 1) * _B]


class _Plan:
    """One metric: its value on the bucket histogram plus exact corrections per bucket."""

    buckets: np.ndarray  # buckets this metric needs resolved
    needs_weights = False

    def add(self, bucket: int, neg: np.ndarray, pos: np.ndarray, posw: np.ndarray | None) -> None:
        raise NotImplementedError

    def result(self) -> float:
        raise NotImplementedError


def _evaluate(maps: np.ndarray, masks: np.ndarray, stats: _Stats, plans: Sequence[_Plan]) -> list[float]:
    """Resolve the union of the buckets the plans need (shared passes) and finish them."""
    wanted = [set(p.buckets.tolist()) for p in plans]
    buckets = np.array(sorted(set().union(*wanted)), dtype=np.int64)
    weights = any(p.needs_weights for p in plans)
    for b, neg, pos, posw in _resolve(maps, masks, buckets, weights, stats.n_pixels):
        for plan, want in zip(plans, wanted):
            if b in want:
                plan.add(b, neg, pos, posw)
    return [float(p.result()) for p in plans]


def _mixed(stats: _Stats) -> np.ndarray:
    return (stats.neg > 0) & (stats.pos > 0)


def _excl_cumsum(x: np.ndarray) -> np.ndarray:
    return np.concatenate(([0.0], np.cumsum(x)[:-1]))


# ----------------------------------------------------------------------------- per-bin terms


def _u_terms(neg: np.ndarray, pos: np.ndarray, neg_below: float) -> np.ndarray:
    """Mann-Whitney terms of ascending bins: pos x (#neg below + #neg tied / 2)."""
    return pos * (neg_below + _excl_cumsum(neg) + 0.5 * neg)


def _pro_area(
    neg: np.ndarray, posw: np.ndarray, neg_above: float, posw_above: float, n_neg: float, n_regions: int, limit: float
) -> float:
    """Trapezoid area of descending bins of the PRO curve, cut at FPR ``limit``."""
    cn = neg_above + np.cumsum(neg)
    f1 = cn / n_neg
    f0 = np.concatenate(([neg_above], cn[:-1])) / n_neg
    cw = posw_above + np.cumsum(posw)
    p1 = cw / n_regions
    p0 = np.concatenate(([posw_above], cw[:-1])) / n_regions
    inside = f1 <= limit
    area = float(np.sum(((f1 - f0) * (p0 + p1) * 0.5)[inside]))
    cross = np.flatnonzero(~inside & (f0 < limit))
    if cross.size:  # at most one bin crosses the limit; interpolate its end point
        i = cross[0]
        p_lim = p0[i] + (p1[i] - p0[i]) * (limit - f0[i]) / (f1[i] - f0[i])
        area += 0.5 * (p0[i] + p_lim) * (limit - f0[i])
    return area


def _dice_terms(neg: np.ndarray, pos: np.ndarray, fp_above: float, tp_above: float, n_pos: float) -> np.ndarray:
    """Dice at each descending bin's threshold (all pixels >= it predicted anomalous)."""
    tp = tp_above + np.cumsum(pos)
    fp = fp_above + np.cumsum(neg)
    return 2 * tp / (tp + fp + n_pos)


# ----------------------------------------------------------------------------- metric plans


class _PixelAuroc(_Plan):
    def __init__(self, stats: _Stats) -> None:
        self.n_pos, self.n_neg = stats.n_pos, stats.n_neg
        _need_both("pixel AUROC", "pixels", self.n_pos, self.n_neg)
        self.neg_below = _excl_cumsum(stats.neg)
        self.terms = _u_terms(stats.neg, stats.pos, 0.0)
        self.buckets = np.flatnonzero(_mixed(stats))
        self.total = float(self.terms.sum())

    def add(self, bucket: int, neg: np.ndarray, pos: np.ndarray, posw: np.ndarray | None) -> None:
        self.total += float(_u_terms(neg, pos, self.neg_below[bucket]).sum()) - self.terms[bucket]

    def result(self) -> float:
        return self.total / (self.n_pos * self.n_neg)


class _Aupro(_Plan):
    needs_weights = True

    def __init__(self, stats: _Stats, limit: float) -> None:
        if not 0 < limit <= 1:
            raise ValueError(f"fpr_limit must be in (0, 1], got {limit}")
        if stats.posw is None or stats.n_regions == 0:
            raise ValueError("AUPRO is undefined: no anomalous region in the masks")
        if stats.n_neg == 0:
            raise ValueError("AUPRO is undefined: no normal pixel in the masks")
        self.limit, self.n_neg, self.n_regions = float(limit), stats.n_neg, stats.n_regions
        self.neg_above = (_excl_cumsum(stats.neg[::-1]))[::-1]
        self.posw_above = (_excl_cumsum(stats.posw[::-1]))[::-1]
        args = (self.n_neg, self.n_regions, self.limit)
        self.area = _pro_area(stats.neg[::-1], stats.posw[::-1], 0.0, 0.0, *args)
        started = self.neg_above / self.n_neg < self.limit  # bucket begins left of the limit
        self.buckets = np.flatnonzero(_mixed(stats) & started)
        self.coarse = {
            int(b): _pro_area(stats.neg[b : b + 1], stats.posw[b : b + 1], self.neg_above[b], self.posw_above[b], *args)
            for b in self.buckets
        }

    def add(self, bucket: int, neg: np.ndarray, pos: np.ndarray, posw: np.ndarray | None) -> None:
        args = (self.neg_above[bucket], self.posw_above[bucket], self.n_neg, self.n_regions, self.limit)
        self.area += _pro_area(neg[::-1], posw[::-1], *args) - self.coarse[bucket]

    def result(self) -> float:
        return min(1.0, self.area / self.limit)  # a perfect map's sum of trapezoids can round to 1 + 2e-16


class _BestDice(_Plan):
    def __init__(self, stats: _Stats) -> None:
        self.n_pos = stats.n_pos
        if self.n_pos == 0:
            raise ValueError("Dice is undefined: no anomalous pixel in the masks")
        neg, pos = stats.neg[::-1], stats.pos[::-1]
        tp, fp = np.cumsum(pos), np.cumsum(neg)
        # each bucket's term is the Dice at its smallest value, a threshold that exists
        self.best = max(0.0, float(np.max(2 * tp / (tp + fp + self.n_pos))))
        self.tp_above, self.fp_above = (tp - pos)[::-1], (fp - neg)[::-1]
        # a bucket can beat that only if it could with all its positives and none of its negatives
        bound = (2 * tp / (tp + fp - neg + self.n_pos))[::-1]
        self.buckets = np.flatnonzero(_mixed(stats) & (bound > self.best))

    def add(self, bucket: int, neg: np.ndarray, pos: np.ndarray, posw: np.ndarray | None) -> None:
        d = _dice_terms(neg[::-1], pos[::-1], self.fp_above[bucket], self.tp_above[bucket], self.n_pos)
        self.best = max(self.best, float(d.max()))

    def result(self) -> float:
        return self.best


class _Dice(_Plan):
    def __init__(self, stats: _Stats, threshold: float) -> None:
        self.n_pos = stats.n_pos
        if self.n_pos == 0:
            raise ValueError("Dice is undefined: no anomalous pixel in the masks")
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        key = _threshold_key(stats.vmin, stats.vmax, float(threshold))
        self.tp = self.fp = 0.0
        self.low = 0
        self.buckets = np.zeros(0, dtype=np.int64)
        if key is None:  # nothing reaches the threshold
            return
        if key == _key(stats.vmin):  # everything does
            self.tp, self.fp = self.n_pos, stats.n_neg
            return
        bucket, self.low = key >> 16, key & 0xFFFF
        self.tp, self.fp = float(stats.pos[bucket + 1 :].sum()), float(stats.neg[bucket + 1 :].sum())
        if stats.pos[bucket] + stats.neg[bucket] > 0:
            self.buckets = np.array([bucket])

    def add(self, bucket: int, neg: np.ndarray, pos: np.ndarray, posw: np.ndarray | None) -> None:
        self.tp += float(pos[self.low :].sum())
        self.fp += float(neg[self.low :].sum())

    def result(self) -> float:
        return 2 * self.tp / (self.tp + self.fp + self.n_pos)


def _key(value: float) -> int:
    bits = int(np.array(value, dtype=np.float32).view(np.uint32))
    return bits | 0x80000000 if bits < 0x80000000 else ~bits & 0xFFFFFFFF


def _value(key: int) -> float:
    bits = key ^ 0x80000000 if key >= 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array(bits, dtype=np.uint32).view(np.float32))


def _threshold_key(vmin: float, vmax: float, threshold: float) -> int | None:
    """Smallest key whose value v has (v - vmin) / (vmax - vmin) >= threshold (float64).

    That normalised value is non-decreasing in v, so a bisection over keys finds it;
    None when even vmax falls short.
    """
    span = vmax - vmin

    def hit(key: int) -> bool:
        return ((_value(key) - vmin) / span if span > 0 else 0.0) >= threshold

    lo, hi = _key(vmin), _key(vmax)
    if not hit(hi):
        return None
    if hit(lo):
        return lo
    while hi - lo > 1:  # hit(lo) is False, hit(hi) is True
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hit(mid) else (mid, hi)
    return hi
