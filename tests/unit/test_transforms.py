"""Shape fitting, intensity normalisation and the paper's augmentation, in 2D and 3D."""

import numpy as np
import pytest

from raymem.data.transforms import fit_to_shape, make_augment, normalise_intensity


def ramp(shape: tuple[int, ...]) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


@pytest.mark.parametrize(
    ("shape", "spacing_mm", "target", "expected_spacing_mm"),
    [
        ((40, 60), (0.5, 0.5), (20, 30), (1.0, 1.0)),  # 2D downsample
        ((10, 12), (2.0, 1.0), (20, 24), (1.0, 0.5)),  # 2D upsample
        ((16, 20, 24), (3.0, 1.0, 1.0), (8, 10, 12), (6.0, 2.0, 2.0)),  # 3D downsample
        ((5, 8, 8), (5.0, 0.8, 0.8), (10, 16, 4), (2.5, 0.4, 1.6)),  # 3D mixed
    ],
)
def test_resize_gives_exact_shape_and_scaled_spacing(shape, spacing_mm, target, expected_spacing_mm):
    resized, new_spacing_mm = fit_to_shape(ramp(shape), spacing_mm, target, mode="resize")

    assert (resized.shape, resized.dtype, new_spacing_mm) == (target, np.float32, pytest.approx(expected_spacing_mm))


def test_resize_downsampling_averages_instead_of_aliasing():
    stripes = np.tile(np.array([0.0, 1.0], dtype=np.float32), (48, 24))  # one-pixel stripes along x

    resized, _ = fit_to_shape(stripes, (1.0, 1.0), (16, 16), mode="resize")

    # at 3x each output pixel centre lands on one input pixel: sampling alone gives 1, 0, 1, ...;
    # averaging gives the mean grey (edge columns see the border, so the interior is checked)
    np.testing.assert_allclose(resized[:, 1:-1], 0.5, atol=0.02)


def test_resize_to_the_same_shape_is_identity():
    volume = ramp((4, 5, 6))

    resized, _ = fit_to_shape(volume, (1.0, 1.0, 1.0), (4, 5, 6), mode="resize")

    np.testing.assert_allclose(resized, volume, rtol=1e-6)


def test_crop_or_pad_centres_and_pads_with_the_minimum():
    image = ramp((4, 2)) + 10.0  # minimum 10

    fitted, _ = fit_to_shape(image, (0.5, 0.7), (2, 4), mode="crop_or_pad")

    # rows 1-2 kept, one column of 10 on each side
    np.testing.assert_array_equal(fitted, [[10.0, 12.0, 13.0, 10.0], [10.0, 14.0, 15.0, 10.0]])


def test_crop_or_pad_keeps_spacing_in_3d():
    fitted, spacing_mm = fit_to_shape(ramp((3, 9, 4)), (2.0, 1.0, 1.0), (5, 4, 4), mode="crop_or_pad")

    assert (fitted.shape, spacing_mm) == ((5, 4, 4), (2.0, 1.0, 1.0))


def test_unknown_fit_mode_is_refused():
    with pytest.raises(ValueError, match="'resize' or 'crop_or_pad'"):
        fit_to_shape(ramp((4, 4)), (1.0, 1.0), (2, 2), mode="zoom")


def test_target_shape_of_another_rank_is_refused():
    with pytest.raises(ValueError, match="has 3 axes but the image has 2"):
        fit_to_shape(ramp((4, 4)), (1.0, 1.0), (2, 2, 2))


def test_normalise_ct_uses_the_hu_window():
    hounsfield = np.array([-2000.0, -1000.0, 0.0, 500.0, 3000.0], dtype=np.float32)

    normalised = normalise_intensity(hounsfield, "CT", ct_window_hu=(-1000.0, 1000.0))

    np.testing.assert_allclose(normalised, [0.0, 0.0, 0.5, 0.75, 1.0])


def test_normalise_mr_clips_to_its_own_percentiles_into_the_range():
    image = np.concatenate([np.linspace(0.0, 100.0, 998), [1e6, -1e6]]).astype(np.float32).reshape(10, 10, 10)

    normalised = normalise_intensity(image, "MR", intensity_range=(-1.0, 1.0), percentiles=(1.0, 99.0))

    # outliers clip to the ends; the bulk spreads over the range
    assert (normalised.dtype, normalised.min(), normalised.max(), float(np.median(normalised))) == (
        np.float32,
        -1.0,
        1.0,
        pytest.approx(0.0, abs=0.02),
    )


def test_normalise_mostly_background_image_falls_back_to_min_max():
    image = np.zeros((100, 100), dtype=np.float32)
    image[0, 0] = 50.0  # one bright pixel: both percentiles are 0

    normalised = normalise_intensity(image, "XR")

    assert (normalised[0, 0], normalised[1, 1]) == (1.0, 0.0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_augment_with_zero_probabilities_is_identity(spatial_dims):
    batch = np.random.default_rng(0).random((3, 1) + (8,) * spatial_dims, dtype=np.float32)
    augment = make_augment(spatial_dims=spatial_dims, flip_prob=0.0, rotate_prob=0.0, seed=0)

    np.testing.assert_array_equal(augment(batch), batch)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_augment_at_probability_one_changes_every_sample_but_keeps_shape_dtype_and_range(spatial_dims):
    batch = np.random.default_rng(0).random((4, 1) + (12,) * spatial_dims, dtype=np.float32)
    augment = make_augment(spatial_dims=spatial_dims, flip_prob=1.0, rotate_prob=1.0, seed=0)

    augmented = augment(batch)

    changed = [not np.allclose(after, before) for after, before in zip(augmented, batch)]
    assert (augmented.shape, augmented.dtype, all(changed), augmented.min() >= 0.0, augmented.max() <= 1.0) == (
        batch.shape,
        np.float32,
        True,
        True,
        True,
    )


def test_augment_flip_is_left_right():
    image = np.zeros((1, 1, 4, 4), dtype=np.float32)
    image[0, 0, :, 0] = 1.0  # left column

    flipped = make_augment(spatial_dims=2, flip_prob=1.0, rotate_prob=0.0, seed=0)(image)

    np.testing.assert_array_equal(flipped[0, 0], image[0, 0, :, ::-1])


def test_augment_rotates_3d_volumes_in_plane_only():
    volume = np.broadcast_to(np.arange(6, dtype=np.float32)[:, None, None], (1, 1, 6, 10, 10)).copy()

    rotated = make_augment(spatial_dims=3, flip_prob=0.0, rotate_prob=1.0, seed=0)(volume)

    # each z slice is constant, so a rotation about z leaves it as it was
    np.testing.assert_allclose(rotated, volume, atol=1e-5)


def test_augment_is_deterministic_for_a_seed():
    batch = np.random.default_rng(0).random((4, 1, 16, 16), dtype=np.float32)

    first = make_augment(spatial_dims=2, seed=7)(batch)
    second = make_augment(spatial_dims=2, seed=7)(batch)

    np.testing.assert_array_equal(first, second)


def _bar_angle_deg(image: np.ndarray) -> float:
    """Orientation (degrees) of the principal axis of a non-negative 2D image, from its second central moments."""
    rows, cols = np.indices(image.shape, dtype=np.float64)
    weights = image / image.sum()
    r0, c0 = (weights * rows).sum(), (weights * cols).sum()
    mu_rr = (weights * (rows - r0) ** 2).sum()
    mu_cc = (weights * (cols - c0) ** 2).sum()
    mu_rc = (weights * (rows - r0) * (cols - c0)).sum()
    return float(np.degrees(0.5 * np.arctan2(2 * mu_rc, mu_cc - mu_rr)))


def _horizontal_bar(size: int = 64) -> np.ndarray:
    image = np.zeros((1, 1, size, size), dtype=np.float32)
    image[0, 0, size // 2 - 1:size // 2 + 2, 8:size - 8] = 1.0
    return image


def test_the_papers_rotation_turns_images_by_up_to_5_degrees_both_ways():
    bar = _horizontal_bar()
    assert abs(_bar_angle_deg(bar[0, 0])) < 1e-6
    angles = [_bar_angle_deg(make_augment(spatial_dims=2, flip_prob=0.0, rotate_prob=1.0, seed=seed)(bar)[0, 0])
              for seed in range(40)]

    # within +-5 degrees (moment estimate on a 3-pixel bar: 0.5 degree of slack), not the identity, both senses,
    # and spread over the range rather than a constant tilt
    assert max(abs(angle) for angle in angles) <= 5.5
    assert min(angles) < -2.5 and max(angles) > 2.5
    assert sum(abs(angle) > 0.25 for angle in angles) >= 35


def test_rotation_is_drawn_with_its_probability():
    bar = _horizontal_bar()
    augment = make_augment(spatial_dims=2, flip_prob=0.0, rotate_prob=0.5, seed=3)
    rotated = [abs(_bar_angle_deg(augment(bar)[0, 0])) > 0.05 for _ in range(120)]

    # 120 draws at p = 0.5: 60 expected, 47-73 holds with probability > 0.99
    assert 47 <= sum(rotated) <= 73


def test_the_ldms_augmentation_defaults_are_the_papers():
    from raymem.config import AugmentConfig

    defaults = AugmentConfig()
    assert (defaults.flip_prob, defaults.rotate_prob, defaults.max_rotation_deg) == (0.5, 0.5, 5.0)
