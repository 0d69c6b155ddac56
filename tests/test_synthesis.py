"""Anomaly synthesis (algorithms.synthesis): PPAD's SAS, MediCLIP's tasks and composer, the seeding rule."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from algorithms.synthesis import (
    SAS_WEIGHTS,
    TASKS,
    MediCLIPSynthesis,
    apply_sas,
    close_and_fill,
    cut_paste,
    deformed_shape,
    draw_sas_lesion,
    fill_polygon,
    gamma_map,
    gauss_intensity_change,
    paste,
    perlin_noise,
    perlin_shape,
    poisson_blend,
    random_corner,
    rng_for,
    sas,
    source_deformation,
)

S = 224


def textured(size: tuple[int, int] = (S, S), channels: int | None = None, seed: int = 0) -> np.ndarray:
    """A smooth random uint8 image in [20, 235] (no saturated pixels)."""
    shape = size if channels is None else (*size, channels)
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 2)
    return (20 + (noise - noise.min()) / (noise.max() - noise.min()) * 215).round().astype(np.uint8)


def placed(mask: np.ndarray, corner: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    out = np.zeros(size, dtype=bool)
    out[corner[0] : corner[0] + mask.shape[0], corner[1] : corner[1] + mask.shape[1]] = mask
    return out


# --- seeding ------------------------------------------------------------------------------------


def test_rng_for_depends_on_the_whole_triple_only():
    first = rng_for(3, 1, 7).random(5)
    assert np.array_equal(first, rng_for(3, 1, 7).random(5))
    for other in [(4, 1, 7), (3, 2, 7), (3, 1, 8)]:
        assert not np.array_equal(first, rng_for(*other).random(5))


# --- shapes -------------------------------------------------------------------------------------


def test_fill_polygon_matches_a_half_plane_test():
    vertices = np.array([[2.3, 1.7], [17.6, 4.2], [13.1, 15.4], [3.2, 12.9]])  # convex, counter-clockwise in (x, y)
    rows, cols = np.indices((20, 20))
    inside = np.ones((20, 20), dtype=bool)
    for (xa, ya), (xb, yb) in zip(vertices, np.roll(vertices, -1, axis=0)):
        inside &= (xb - xa) * (rows - ya) - (yb - ya) * (cols - xa) > 0
    assert np.array_equal(fill_polygon(vertices, (20, 20)), inside)


def test_fill_polygon_fills_a_concave_polygon_and_clips_to_the_canvas():
    # An L: the square [0.5, 8.5]^2 minus [4.5, 8.5] x [0.5, 4.5] (x, y), partly off the canvas on the left.
    vertices = np.array([[-3.5, 0.5], [4.5, 0.5], [4.5, 4.5], [8.5, 4.5], [8.5, 8.5], [-3.5, 8.5]])
    expected = np.zeros((10, 10), dtype=bool)
    expected[1:9, 0:9] = True
    expected[1:5, 5:9] = False
    assert np.array_equal(fill_polygon(vertices, (10, 10)), expected)


def test_perlin_noise_vanishes_on_the_lattice_corner():
    noise = perlin_noise((32, 48), np.random.default_rng(0))
    assert noise.shape == (32, 48)
    assert noise[0, 0] == 0.0
    assert np.abs(noise).max() <= np.sqrt(2) + 1e-9


@pytest.mark.parametrize("size", [(23, 23), (60, 31), (134, 120)])
def test_perlin_shape_has_its_size_and_at_least_20_percent_fill(size):
    for i in range(20):
        mask = perlin_shape(size, rng_for(0, 0, i))
        assert mask.shape == size and mask.dtype == bool
        assert mask.mean() >= 0.2


def test_deformed_shape_mask_and_edge_distance_agree():
    for i in range(20):
        rng = rng_for(1, 0, i)
        shape = deformed_shape((S, S), (0.2, 0.6), rng)
        assert shape.kind in ("rectangle", "ellipse")
        assert shape.mask.any() and max(shape.mask.shape) <= round(0.6 * S)
        grid = np.indices(shape.mask.shape).reshape(2, -1).T
        assert np.array_equal(shape.contains(grid).reshape(shape.mask.shape), shape.mask)
        pixels = np.argwhere(shape.mask)
        origin = pixels[rng.integers(len(pixels))].astype(float)
        angles = rng.uniform(0, 2 * np.pi, 50)
        directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        distance = shape.edge_distance(origin, directions)
        assert np.all(shape.contains(origin + directions * (distance - 1e-6)[:, None]))
        assert not np.any(shape.contains(origin + directions * (distance + 1e-6)[:, None]))


def test_deformed_shape_draws_both_kinds():
    kinds = Counter(deformed_shape((S, S), (0.2, 0.6), rng_for(2, 0, i)).kind for i in range(40))
    assert kinds["rectangle"] >= 8 and kinds["ellipse"] >= 8


# --- SAS ----------------------------------------------------------------------------------------


def test_gamma_map_on_a_hand_made_square():
    mask = np.zeros((9, 9), dtype=bool)
    mask[2:7, 2:7] = True
    rows, cols = np.indices((9, 9))
    depth = np.minimum.reduce([rows - 1, 7 - rows, cols - 1, 7 - cols])  # 1 on the square's rim, 3 at its centre
    expected = np.where(mask, 1 + depth / 3 * 2.0, 1.0)
    assert np.allclose(gamma_map(mask, 2.0), expected)


def test_gamma_map_matches_scipy_edt_on_an_irregular_mask_touching_the_border():
    mask = np.zeros((40, 50), dtype=bool)
    mask[0:12, 30:50] = True  # touches the top and right edges
    mask[8:30, 10:25] = True
    mask[14:18, 14:18] = False  # a hole
    distance = ndimage.distance_transform_edt(mask)
    assert np.allclose(gamma_map(mask, -0.99), 1 + distance / distance.max() * -0.99)
    assert np.array_equal(gamma_map(np.zeros((5, 5), dtype=bool), 3.0), np.ones((5, 5)))


def _gamma_corrected(image: np.ndarray, mask: np.ndarray, weight: float) -> np.ndarray:
    gamma = gamma_map(mask, weight)
    return np.rint(np.clip((image / 255.0) ** gamma * 255.0, 0, 255)).astype(np.uint8)


def test_sas_changes_only_the_lesion_with_the_drawn_gamma():
    image = textured()
    for i in range(10):
        out, mask = sas(image, None, rng_for(0, 0, i))
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert mask.dtype == bool and mask.any()
        assert np.array_equal(out[~mask], image[~mask])
        lesion = draw_sas_lesion(image.shape, None, rng_for(0, 0, i))
        assert np.array_equal(lesion.mask, mask) and lesion.weight in SAS_WEIGHTS
        expected = _gamma_corrected(image, mask, lesion.weight)
        assert np.array_equal(out[mask], expected[mask])
        assert np.any(out[mask] != image[mask])


@pytest.mark.parametrize("weight", SAS_WEIGHTS)
def test_sas_with_a_fixed_weight_follows_the_formula(weight):
    image = textured(seed=1)
    out, mask = sas(image, None, rng_for(5, 0, 0), weights=(weight,))
    assert np.array_equal(out, np.where(mask, _gamma_corrected(image, mask, weight), image))
    # Brightening (w < 0 lowers gamma) or darkening (w > 0) inside.
    change = out[mask].astype(int) - image[mask]
    assert (change >= 0).all() if weight < 0 else (change <= 0).all()


def test_sas_handles_three_channels_alike():
    gray = textured(seed=2)
    out, mask = sas(np.repeat(gray[..., None], 3, axis=2), None, rng_for(0, 0, 3))
    out_gray, mask_gray = sas(gray, None, rng_for(0, 0, 3))
    assert np.array_equal(mask, mask_gray)
    assert all(np.array_equal(out[..., k], out_gray) for k in range(3))


PPAD_VIEWS = {
    "left": (slice(None), slice(0, 112)),
    "right": (slice(None), slice(112, S)),
    "upper": (slice(0, 120), slice(None)),
    "lower": (slice(120, S), slice(None)),
}


def test_sas_centre_lies_in_the_view_regions_bounding_box():
    centroids = {}
    for name, window in PPAD_VIEWS.items():
        region = np.zeros((S, S), dtype=bool)
        region[window] = True
        rows, cols = np.nonzero(region)
        means = []
        for i in range(30):
            lesion = draw_sas_lesion((S, S), region, rng_for(0, 0, i))
            assert rows.min() <= lesion.centre[0] <= rows.max() and cols.min() <= lesion.centre[1] <= cols.max()
            assert lesion.mask.any()
            means.append(np.argwhere(lesion.mask).mean(axis=0))
        centroids[name] = np.mean(means, axis=0)
    assert centroids["left"][1] < S / 2 < centroids["right"][1]
    assert centroids["upper"][0] < S / 2 < centroids["lower"][0]


def test_sas_centre_for_an_irregular_region():
    region = np.zeros((S, S), dtype=bool)
    region[40:90, 150:200] = True
    region[60:70, 100:160] = True  # bounding box: rows 40-89, columns 100-199
    for i in range(30):
        row, col = draw_sas_lesion((S, S), region, rng_for(1, 2, i)).centre
        assert 40 <= row <= 89 and 100 <= col <= 199


def test_sas_is_deterministic_per_seed_epoch_index():
    image = textured()
    a_img, a_mask = sas(image, None, rng_for(7, 3, 11))
    b_img, b_mask = sas(image, None, rng_for(7, 3, 11))
    c_img, c_mask = sas(image, None, rng_for(7, 3, 12))
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_mask, c_mask)


def test_sas_rejects_bad_inputs():
    with pytest.raises(TypeError):
        sas(textured().astype(np.float32), None, rng_for(0, 0, 0))
    with pytest.raises(ValueError, match="empty"):
        sas(textured(), np.zeros((S, S), dtype=bool), rng_for(0, 0, 0))


def test_apply_sas_leaves_an_empty_lesion_image_unchanged():
    image = textured()
    lesion = draw_sas_lesion(image.shape, None, rng_for(0, 0, 0))
    empty = type(lesion)(mask=np.zeros_like(lesion.mask), centre=lesion.centre, weight=lesion.weight)
    assert np.array_equal(apply_sas(image, empty), image)


# --- MediCLIP tasks -----------------------------------------------------------------------------


def test_gauss_intensity_change_only_touches_the_mask():
    image = textured()
    for i in range(8):
        rng = rng_for(0, 0, i)
        mask = perlin_shape((80, 70), rng)
        corner = random_corner(mask.shape, image.shape, rng)
        out = gauss_intensity_change(image, mask, corner, rng)
        where = placed(mask, corner, image.shape)
        assert out.shape == image.shape and out.dtype == np.float64
        assert np.array_equal(out[~where], image[~where])
        changed = np.abs(out - image) > 1e-9
        assert changed[where].mean() > 0.5
        assert np.abs(out - image).max() <= 0.6 * 255 + 1e-9


def test_cut_paste_hard_paste_copies_the_source_inside_the_mask():
    image = textured()
    source = np.full((S, S), 77, dtype=np.uint8)
    rng = rng_for(0, 0, 1)
    mask = perlin_shape((60, 90), rng)
    corner = random_corner(mask.shape, image.shape, rng)
    out = cut_paste(image, source, mask, corner, rng, poisson=False)
    where = placed(mask, corner, image.shape)
    assert np.all(out[where] == 77.0)
    assert np.array_equal(out[~where], image[~where])


def test_paste_hard_copies_an_arbitrary_patch_exactly():
    image = textured(channels=3)
    patch = textured((40, 30), channels=3, seed=9).astype(float)
    mask = perlin_shape((40, 30), rng_for(0, 0, 2))
    out = paste(image, patch, mask, (100, 150), poisson=False)
    assert np.array_equal(out[100:140, 150:180][mask], patch[mask])
    where = placed(mask, (100, 150), (S, S))
    assert np.array_equal(out[~where], image[~where])


@pytest.mark.parametrize("corner", [(0, 0), (70, 90), (S - 50, S - 40)])
def test_poisson_blend_reproduces_the_image_from_its_own_gradients(corner):
    image = textured(channels=2).astype(float)
    window = slice(corner[0], corner[0] + 50), slice(corner[1], corner[1] + 40)
    patch = image[window] - 20.0  # same gradients, another level
    mask = np.zeros((50, 40), dtype=bool)
    mask[1:-1, 1:-1] = perlin_shape((48, 38), rng_for(0, 0, 3))
    out = poisson_blend(image, patch, mask, corner)
    assert np.allclose(out, image, atol=1e-6)
    # A flat patch gives the harmonic fill: strictly inside the range of the border values.
    flat = poisson_blend(image, np.zeros_like(patch), mask, corner)
    where = placed(mask, corner, (S, S))
    assert np.array_equal(flat[~where], image[~where])
    assert np.all(flat[where] >= image.min() - 1e-9) and np.all(flat[where] <= image.max() + 1e-9)
    assert not np.allclose(flat[where], image[where])


def test_cut_paste_poisson_changes_only_the_mask():
    image = textured()
    source = textured(seed=5)
    rng = rng_for(0, 0, 4)
    mask = perlin_shape((70, 70), rng)
    corner = random_corner(mask.shape, image.shape, rng)
    out = cut_paste(image, source, mask, corner, rng)
    where = placed(mask, corner, image.shape)
    assert np.array_equal(out[~where], image[~where])
    assert np.abs(out[where] - image[where]).max() > 1.0
    assert out.min() >= 0 and out.max() <= 255


def test_source_deformation_leaves_pixels_outside_the_shape_untouched():
    image = textured()
    for i in range(8):
        rng = rng_for(0, 0, i)
        shape = deformed_shape(image.shape, (0.2, 0.6), rng)
        corner = random_corner(shape.mask.shape, image.shape, rng)
        out = source_deformation(image, shape, corner, rng)
        where = placed(shape.mask, corner, image.shape)
        assert np.array_equal(out[~where], image[~where])
        assert np.any(np.abs(out[where] - image[where]) > 0.5)
        assert out.min() >= image.min() and out.max() <= image.max()


def test_close_and_fill_closes_gaps_fills_holes_and_keeps_the_border():
    mask = np.zeros((12, 12), dtype=bool)
    mask[2:9, 2:9] = True
    mask[4:7, 4:7] = False  # hole
    mask[2:9, 5] = False  # one-pixel gap
    mask[10:12, 10:12] = True  # touches the image corner
    expected = np.zeros((12, 12), dtype=bool)
    expected[2:9, 2:9] = True
    expected[10:12, 10:12] = True
    assert np.array_equal(close_and_fill(mask), expected)


# --- composer -----------------------------------------------------------------------------------


def test_composer_draws_each_task_about_a_quarter_of_the_time():
    image = textured((48, 48))
    support = [textured((48, 48), seed=1)]
    synthesis = MediCLIPSynthesis()
    n = 400
    tasks, passes = Counter(), Counter()
    for i in range(n):
        result = synthesis.synthesize(image, support, rng_for(0, 0, i))
        tasks[result.task] += 1
        passes[result.passes] += 1
        assert result.image.dtype == np.uint8 and result.image.shape == image.shape
        assert result.mask.dtype == bool and result.mask.shape == image.shape
        if result.task == "identity":
            assert not result.mask.any() and np.array_equal(result.image, image)
        else:
            assert result.mask.any() and 1 <= result.passes <= 2
            assert not np.any((result.image != image) & ~result.mask)
    assert set(tasks) == set(TASKS)
    assert all(0.17 * n <= tasks[t] <= 0.33 * n for t in TASKS), tasks
    assert 0.35 <= passes[2] / (n - tasks["identity"]) <= 0.65, passes


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("channels", [None, 3])
def test_composer_single_task_returns_matching_image_and_mask(task, channels):
    image = textured((96, 96), channels=channels)
    support = [textured((96, 96), channels=channels, seed=3)]
    synthesis = MediCLIPSynthesis(probabilities={task: 1.0}, poisson=False)
    for i in range(3):
        out, mask = synthesis(image, support, rng_for(0, 0, i))
        assert out.shape == image.shape and out.dtype == np.uint8 and mask.shape == (96, 96)
        changed = (out != image) if channels is None else (out != image).any(axis=2)
        assert not np.any(changed & ~mask)
        if task == "identity":
            assert not mask.any() and np.array_equal(out, image)
        else:
            assert mask.any() and changed.any()


def test_composer_is_deterministic_per_seed_epoch_index():
    image = textured((96, 96))
    support = [textured((96, 96), seed=1)]
    synthesis = MediCLIPSynthesis()
    runs = [synthesis(image, support, rng_for(1, 2, i)) for i in (0, 0, 1, 2, 3)]
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    assert any(not np.array_equal(runs[0][1], other[1]) for other in runs[2:])


def test_composer_rejects_bad_settings():
    with pytest.raises(ValueError, match="sum to 1"):
        MediCLIPSynthesis(probabilities={"cut_paste": 0.5, "identity": 0.4})
    with pytest.raises(ValueError, match="unknown"):
        MediCLIPSynthesis(probabilities={"sink": 1.0})
    with pytest.raises(ValueError, match="support"):
        MediCLIPSynthesis()(textured((32, 32)), [], rng_for(0, 0, 0))
    with pytest.raises(TypeError):
        MediCLIPSynthesis()(textured((32, 32)).astype(float), [textured((32, 32))], rng_for(0, 0, 0))
