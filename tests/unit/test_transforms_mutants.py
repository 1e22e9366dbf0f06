"""Ingest's shape and intensity transforms and the paper's augmentation, checked against numpy written here.

Resize: Gaussian anti-aliasing (sigma = (shrink factor - 1) / 2 voxels, edge-replicating) then linear interpolation
at half-pixel centres (the input coordinate of output pixel i is (i + 0.5) * size / target - 0.5, clamped to the
image). Crop/pad: centred, the extra pixel of an odd difference after the image. Intensity: clip and map linearly.

Written to kill the mutants that survived ``tools/mutation.sh raymem/data/transforms.py``.
"""

import numpy as np
import pytest
import scipy.ndimage

from raymem.data.transforms import fit_to_shape, make_augment, normalise_intensity


def linear_resampling_matrix(size: int, target: int) -> np.ndarray:
    """(target, size) weights of linear interpolation at half-pixel centres, clamped at the edges."""
    source = np.clip((np.arange(target) + 0.5) * size / target - 0.5, 0, size - 1)
    return np.clip(1 - np.abs(source[:, None] - np.arange(size)[None, :]), 0, None)


def reference_resize(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = array.astype(np.float64)
    for axis, (size, target) in enumerate(zip(array.shape, shape)):
        if size > target:
            out = scipy.ndimage.gaussian_filter1d(out, (size / target - 1) / 2, axis=axis, mode="nearest")
    for axis, (size, target) in enumerate(zip(array.shape, shape)):
        out = np.moveaxis(np.tensordot(linear_resampling_matrix(size, target), out, axes=(1, axis)), 0, axis)
    return out


def random_image(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


# --- resize ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "target"), [
    ((30, 10), (10, 20)),  # H shrinks 3x (sigma 1), W grows 2x (no smoothing)
    ((9, 16), (12, 4)),  # H grows, W shrinks 4x (sigma 1.5)
    ((8, 15, 6), (4, 5, 9)),  # 3D: D shrinks 2x (sigma 0.5), H 3x (sigma 1), W grows
])
def test_resize_smooths_shrinking_axes_then_interpolates_linearly(shape, target):
    image = random_image(*shape, seed=1)

    resized, _ = fit_to_shape(image, (1.0,) * len(shape), target, mode="resize")

    np.testing.assert_allclose(resized, reference_resize(image, target), atol=1e-5)


def test_resize_is_the_default_fit_and_scales_spacing_by_old_over_new_size():
    image = random_image(12, 8, seed=2)

    resized, spacing_mm = fit_to_shape(image, (0.6, 2.0), (4, 16))

    assert (spacing_mm, resized.dtype) == (pytest.approx((1.8, 1.0)), np.float32)


@pytest.mark.parametrize("mode", ["resize", "crop_or_pad"])
def test_a_float64_image_comes_out_float32(mode):
    image = np.random.default_rng(3).random((10, 6))  # float64

    fitted, _ = fit_to_shape(image, (1.0, 1.0), (5, 9), mode=mode)

    assert fitted.dtype == np.float32


# --- crop or pad -----------------------------------------------------------------------------------------------


def test_crop_of_an_odd_difference_drops_the_extra_pixel_at_the_end():
    image = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)

    fitted, _ = fit_to_shape(image, (1.0, 1.0), (4, 2), mode="crop_or_pad")

    # rows: 7 -> 4 keeps rows 1-4; columns: 5 -> 2 keeps columns 1-2
    np.testing.assert_array_equal(fitted, [[6, 7], [11, 12], [16, 17], [21, 22]])


def test_pad_of_an_odd_difference_puts_the_extra_pixel_at_the_end_and_fills_with_the_minimum():
    image = np.array([[5.0, -3.0], [2.0, 4.0]], dtype=np.float32)

    fitted, _ = fit_to_shape(image, (1.0, 1.0), (5, 3), mode="crop_or_pad")

    m = -3.0
    expected = [[m, m, m], [5.0, -3.0, m], [2.0, 4.0, m], [m, m, m], [m, m, m]]
    np.testing.assert_array_equal(fitted, expected)


def test_crop_and_pad_in_3d_mix_per_axis():
    volume = np.arange(3 * 6 * 2, dtype=np.float64).reshape(3, 6, 2) + 1.0

    fitted, _ = fit_to_shape(volume, (1.0, 1.0, 1.0), (2, 3, 5), mode="crop_or_pad")

    expected = np.full((2, 3, 5), 1.0)
    expected[:, :, 1:3] = volume[0:2, 1:4, :]
    assert (fitted.dtype, fitted.tolist()) == (np.float32, expected.tolist())


# --- errors ----------------------------------------------------------------------------------------------------


def test_an_unknown_fit_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError) as refused:
        fit_to_shape(np.zeros((4, 4)), (1.0, 1.0), (2, 2), mode="zoom")

    assert str(refused.value) == "fit mode must be 'resize' or 'crop_or_pad', got 'zoom'"


def test_a_target_of_another_rank_is_refused_with_both_ranks():
    with pytest.raises(ValueError) as refused:
        fit_to_shape(np.zeros((4, 4)), (1.0, 1.0), (2, 2, 2))

    assert str(refused.value) == "target shape (2, 2, 2) has 3 axes but the image has 2"


# --- intensity -------------------------------------------------------------------------------------------------


def test_ct_by_default_maps_minus_1000_to_1000_hu_onto_0_to_1():
    hounsfield = np.array([-1500.0, -1000.0, -500.0, 0.0, 250.0, 1000.0, 2000.0], dtype=np.float32)

    normalised = normalise_intensity(hounsfield, "CT")

    np.testing.assert_allclose(normalised, [0.0, 0.0, 0.25, 0.5, 0.625, 1.0, 1.0])


def test_ct_with_a_custom_window_and_range():
    hounsfield = np.array([-200.0, -100.0, 100.0, 300.0, 400.0], dtype=np.float32)

    normalised = normalise_intensity(hounsfield, "CT", intensity_range=(-1.0, 1.0), ct_window_hu=(-100.0, 300.0))

    np.testing.assert_allclose(normalised, [-1.0, -1.0, 0.0, 1.0, 1.0])


def test_mr_by_default_clips_to_its_0_5_and_99_5_percentiles_onto_0_to_1():
    image = np.arange(1001, dtype=np.float32)  # percentiles 0.5 and 99.5 are 5 and 995

    normalised = normalise_intensity(image, "MR")

    expected = np.clip((image - 5.0) / 990.0, 0.0, 1.0)
    np.testing.assert_allclose(normalised, expected, atol=1e-6)


def test_xray_into_a_signed_range_with_its_own_percentiles():
    image = np.arange(101, dtype=np.float32)  # percentiles 10 and 80 are 10 and 80

    normalised = normalise_intensity(image, "XR", intensity_range=(-1.0, 1.0), percentiles=(10.0, 80.0))

    expected = np.clip((image - 10.0) / 70.0 * 2.0 - 1.0, -1.0, 1.0)
    np.testing.assert_allclose(normalised, expected, atol=1e-6)


def test_a_constant_image_maps_to_the_low_end_of_the_range():
    normalised = normalise_intensity(np.full((3, 4), 7.0, dtype=np.float32), "MR", intensity_range=(-1.0, 1.0))

    assert (normalised.dtype, normalised.tolist()) == (np.float32, [[-1.0] * 4] * 3)


def test_a_ct_window_of_zero_width_maps_to_the_low_end_of_the_range():
    normalised = normalise_intensity(np.array([-10.0, 0.0, 10.0]), "CT", intensity_range=(0.2, 0.8),
                                     ct_window_hu=(0.0, 0.0))

    np.testing.assert_allclose(normalised, [0.2, 0.2, 0.2])


# --- augmentation ----------------------------------------------------------------------------------------------


def test_the_3d_flip_mirrors_the_last_axis():
    volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 1, 2, 3, 4)

    flipped = make_augment(spatial_dims=3, flip_prob=1.0, rotate_prob=0.0, seed=0)(volume)

    np.testing.assert_array_equal(flipped, volume[..., ::-1])


def _bar_angle_deg(image: np.ndarray) -> float:
    """Orientation (degrees) of the principal axis of a non-negative 2D image, from its second central moments."""
    rows, cols = np.indices(image.shape, dtype=np.float64)
    weights = image / image.sum()
    covariance = np.cov(np.stack([cols.ravel(), rows.ravel()]), aweights=weights.ravel())
    return float(np.degrees(0.5 * np.arctan2(2 * covariance[0, 1], covariance[0, 0] - covariance[1, 1])))


def test_the_default_augmentation_is_the_papers_half_flips_and_half_rotations_up_to_5_degrees():
    bars = np.zeros((200, 1, 40, 40), dtype=np.float32)
    bars[:, 0, 19:22, 4:28] = 1.0  # a horizontal bar left of centre: a flip moves it right

    augmented = make_augment(spatial_dims=2, seed=11)(bars)[:, 0]

    flipped = np.mean([np.average(np.arange(40), weights=image.sum(axis=0)) > 20 for image in augmented])
    angles = np.abs([_bar_angle_deg(image) for image in augmented])
    # 200 draws at p = 0.5: within 0.5 +- 0.12 with probability > 0.999; the moment estimate of the largest angle
    # on a 3-pixel bar reads up to 5% low, and 6 degrees would read above 5.5
    assert (abs(flipped - 0.5) < 0.12, abs(np.mean(angles > 0.05) - 0.5) < 0.12, 4.5 < angles.max() <= 5.5) == (
        True, True, True)
