"""The copy detector's random transforms checked against numpy written here from the documented semantics.

Geometry: an output pixel p (centred pixel units, x along W, y along H) samples the input at
scale * R(angle) * Flip * p + offset * (W/2, H/2), bilinearly, the outside filled with the image's minimum.
Blur: a Gaussian truncated at ceil(3 * the batch's largest sigma), replicate padding. Intensity: gamma on the image
rescaled to [0, 1], then contrast about the mean and a brightness shift, all relative to the image's range.
Sampling: each parameter's documented distribution, checked on 20,000 draws.

Written to kill the mutants that survived ``tools/mutation.sh raymem/models/copy_transforms.py``.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

from raymem.models.copy_transforms import (
    TRANSFORM_PRESETS,
    TransformBounds,
    apply_transform,
    gaussian_blur,
    random_transform,
    sample_transform,
)

DRAWS = 20_000


def identity_params(batch_size: int, spatial_dims: int, **changes):
    """Parameters of the identity transform (every bound off), with some fields replaced."""
    params = sample_transform(TransformBounds(), batch_size, spatial_dims, torch.Generator().manual_seed(0))
    return dataclasses.replace(params, **changes)


def random_images(*shape: int, low: float = 0.0, high: float = 1.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(*shape, generator=generator)


# --- numpy references ------------------------------------------------------------------------------------------


def bilinear_zero_padded(image: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """image (H, W) sampled at column u, row v (pixel indices, may be fractional); outside the image counts 0."""
    height, width = image.shape
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    out = np.zeros(u.shape)
    for du in (0, 1):
        for dv in (0, 1):
            weight = (1 - np.abs(u - (u0 + du))) * (1 - np.abs(v - (v0 + dv)))
            col, row = u0 + du, v0 + dv
            inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
            values = np.where(inside, image[np.clip(row, 0, height - 1), np.clip(col, 0, width - 1)], 0.0)
            out += weight * values
    return out


def reference_geometry_2d(image: np.ndarray, degrees: float, flipped: bool, scale: float,
                          offset_xy: tuple[float, float], low: float | None = None) -> np.ndarray:
    """One (H, W) image rotated by ``degrees`` in pixel units, mirrored, zoomed in and shifted; outside = ``low``
    (by default the image's minimum)."""
    height, width = image.shape
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    x, y = cols + 0.5 - width / 2, rows + 0.5 - height / 2
    if flipped:
        x = -x
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    x_in = scale * (cos * x - sin * y) + offset_xy[0] * width / 2
    y_in = scale * (sin * x + cos * y) + offset_xy[1] * height / 2
    low = image.min() if low is None else low
    return bilinear_zero_padded(image - low, x_in + width / 2 - 0.5, y_in + height / 2 - 0.5) + low


def reference_blur(image: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """Separable Gaussian (truncated at ``radius``, normalised) with edge-replicating padding, over every axis."""
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / max(sigma, 1e-3)) ** 2)
    kernel /= kernel.sum()
    out = image.astype(np.float64)
    for axis in range(image.ndim):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(image.ndim)], mode="edge")
        out = sum(weight * np.take(padded, np.arange(k, k + image.shape[axis]), axis=axis)
                  for k, weight in enumerate(kernel))
    return out


def reference_intensity(image: np.ndarray, gamma: float, contrast: float, brightness: float) -> np.ndarray:
    """Gamma, contrast about the mean and brightness, relative to the whole image's range (all channels)."""
    low, value_range = image.min(), image.max() - image.min()
    unit = ((image - low) / value_range) ** gamma
    unit = (unit - unit.mean()) * contrast + unit.mean() + brightness
    return unit * value_range + low


# --- the paper's augmentation is pinned ------------------------------------------------------------------------


def test_the_paper_preset_is_rotation_up_to_5_degrees_at_half_probability_and_a_half_probability_flip():
    assert TRANSFORM_PRESETS["paper"] == TransformBounds(rotation_deg=5.0, rotation_p=0.5, flip_p=0.5)


def test_the_paper_augmentation_rotates_half_of_the_images_by_up_to_5_degrees_both_ways():
    params = sample_transform(TRANSFORM_PRESETS["paper"], DRAWS, 2, torch.Generator().manual_seed(0))
    angles = params.rotation_deg[:, 0].numpy()

    # half the angles are 0, the other half uniform in [-5, 5] (mean absolute angle 2.5): 1.25 over all draws
    observed = (np.mean(angles != 0), angles.min(), angles.max(), np.abs(angles).mean())
    np.testing.assert_allclose(observed, (0.5, -5.0, 5.0, 1.25), atol=0.05)


def test_the_paper_augmentation_turns_an_image_by_the_drawn_angle():
    image = random_images(1, 1, 24, 32, seed=3)
    generator = torch.Generator().manual_seed(5)
    params = sample_transform(TRANSFORM_PRESETS["paper"], 1, 2, generator)

    out = apply_transform(image, params, generator)

    expected = reference_geometry_2d(image[0, 0].numpy(), float(params.rotation_deg[0, 0]),
                                     bool(params.flipped[0]), 1.0, (0.0, 0.0))
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-5)


# --- sampling: each parameter's distribution -------------------------------------------------------------------

BOUNDS = TransformBounds(
    rotation_deg=10.0, rotation_p=0.3, flip_p=0.7, crop_scale=(0.6, 0.9), crop_p=0.4,
    contrast=(0.5, 1.5), brightness_shift=0.2, intensity_p=0.6, gamma=(0.8, 1.25), gamma_p=0.2,
    noise_std=0.1, noise_p=0.9, blur_sigma_px=2.0, blur_p=0.15,
)


@pytest.fixture(params=[2, 3])
def drawn(request):
    return request.param, sample_transform(BOUNDS, DRAWS, request.param, torch.Generator().manual_seed(1))


def test_rotation_angles_are_uniform_within_the_bound_with_their_probability(drawn):
    _, params = drawn
    turned = params.rotation_deg[params.rotation_deg[:, 0] != 0].numpy()

    observed = (len(turned) / DRAWS, turned.min(), turned.max(), turned.mean(), turned.std())
    np.testing.assert_allclose(observed, (0.3, -10.0, 10.0, 0.0, 10 / math.sqrt(3)), atol=0.1)


def test_a_2d_draw_has_one_angle_and_a_3d_draw_one_per_axis_all_turned_together(drawn):
    spatial_dims, params = drawn
    turned = params.rotation_deg != 0

    assert (params.rotation_deg.shape, bool((turned.all(1) == turned.any(1)).all())) == (
        (DRAWS, 1 if spatial_dims == 2 else 3), True)


def test_flips_happen_with_their_probability(drawn):
    _, params = drawn

    assert params.flipped.float().mean().item() == pytest.approx(0.7, abs=0.02)


def test_crop_scales_are_uniform_within_the_bounds_with_their_probability(drawn):
    _, params = drawn
    cropped = params.crop_scale[params.crop_scale != 1].numpy()

    observed = (len(cropped) / DRAWS, cropped.min(), cropped.max(), cropped.mean())
    np.testing.assert_allclose(observed, (0.4, 0.6, 0.9, 0.75), atol=0.01)


def test_crop_centres_are_uniform_over_the_room_the_crop_leaves_and_zero_without_a_crop(drawn):
    spatial_dims, params = drawn
    cropped = params.crop_scale != 1
    relative = (params.crop_offset[cropped] / (1 - params.crop_scale[cropped])[:, None]).numpy()

    observed = (params.crop_offset.shape[1], relative.min(), relative.max(), relative.mean(),
                float(params.crop_offset[~cropped].abs().max()))
    np.testing.assert_allclose(observed, (spatial_dims, -1.0, 1.0, 0.0, 0.0), atol=0.02)


def test_contrast_is_log_uniform_within_the_bounds_with_brightness_in_the_same_samples(drawn):
    _, params = drawn
    changed = params.contrast != 1
    log_contrast = params.contrast[changed].log().numpy()

    observed = (changed.float().mean().item(), log_contrast.min(), log_contrast.max(), log_contrast.mean(),
                float((params.brightness_shift[~changed] == 0).float().mean()))
    expected = (0.6, math.log(0.5), math.log(1.5), (math.log(0.5) + math.log(1.5)) / 2, 1.0)
    np.testing.assert_allclose(observed, expected, atol=0.01)


def test_brightness_shifts_are_uniform_within_the_bound(drawn):
    _, params = drawn
    shifts = params.brightness_shift[params.contrast != 1].numpy()

    np.testing.assert_allclose((shifts.min(), shifts.max(), shifts.mean()), (-0.2, 0.2, 0.0), atol=0.01)


def test_gamma_is_log_uniform_within_the_bounds_with_its_probability(drawn):
    _, params = drawn
    log_gamma = params.gamma[params.gamma != 1].log().numpy()

    observed = (len(log_gamma) / DRAWS, log_gamma.min(), log_gamma.max(), log_gamma.mean())
    expected = (0.2, math.log(0.8), math.log(1.25), (math.log(0.8) + math.log(1.25)) / 2)
    np.testing.assert_allclose(observed, expected, atol=0.01)


def test_noise_levels_are_uniform_up_to_the_bound_with_their_probability(drawn):
    _, params = drawn
    noisy = params.noise_std[params.noise_std != 0].numpy()

    observed = (len(noisy) / DRAWS, noisy.min(), noisy.max(), noisy.mean())
    np.testing.assert_allclose(observed, (0.9, 0.0, 0.1, 0.05), atol=0.01)


def test_blur_sigmas_are_uniform_up_to_the_bound_with_their_probability(drawn):
    _, params = drawn
    blurred = params.blur_sigma_px[params.blur_sigma_px != 0].numpy()

    observed = (len(blurred) / DRAWS, blurred.min(), blurred.max(), blurred.mean())
    np.testing.assert_allclose(observed, (0.15, 0.0, 2.0, 1.0), atol=0.02)


def test_a_probability_of_one_transforms_every_sample_and_zero_none():
    every = TransformBounds(rotation_deg=5.0, rotation_p=1.0, flip_p=1.0, crop_scale=(0.5, 0.9), crop_p=1.0,
                            contrast=(1.1, 1.2), intensity_p=1.0, gamma=(1.1, 1.2), gamma_p=1.0,
                            noise_std=0.1, noise_p=1.0, blur_sigma_px=1.0, blur_p=1.0)
    params = sample_transform(every, 500, 2, torch.Generator().manual_seed(2))

    changed = [params.rotation_deg != 0, params.flipped, params.crop_scale != 1, params.contrast != 1,
               params.gamma != 1, params.noise_std != 0, params.blur_sigma_px != 0]
    assert [bool(c.all()) for c in changed] == [True] * 7


def test_a_probability_of_zero_never_happens_even_on_a_draw_of_exactly_zero(monkeypatch):
    """torch.rand draws from [0, 1): 0.0 itself can come (one draw in 2 ** 24). A transform at probability 0 must
    stay off on it, so the comparison with p is strict. Every draw is made 0.0 here."""
    bounds = TransformBounds(rotation_deg=5.0, crop_scale=(0.5, 0.9), contrast=(1.1, 1.2), brightness_shift=0.1,
                             gamma=(1.1, 1.2), noise_std=0.1, blur_sigma_px=1.0)
    monkeypatch.setattr(torch, "rand", lambda *shape, generator=None, device=None: torch.zeros(*shape, device=device))

    params = sample_transform(bounds, 4, 2, torch.Generator().manual_seed(0))

    assert [params.rotation_deg.abs().max().item(), params.flipped.any().item(), params.crop_scale.min().item(),
            params.contrast.max().item(), params.brightness_shift.abs().max().item(), params.gamma.max().item(),
            params.noise_std.max().item(), params.blur_sigma_px.max().item()] == [0.0, False, 1.0, 1.0, 0.0, 1.0,
                                                                                  0.0, 0.0]


# --- geometry against numpy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("degrees", "flipped", "scale", "offset"), [
    (7.0, False, 1.0, (0.0, 0.0)),
    (-12.0, True, 1.0, (0.0, 0.0)),
    (0.0, False, 0.8, (0.15, -0.1)),
    (20.0, True, 0.7, (-0.2, 0.25)),
])
def test_geometry_on_a_non_square_image_matches_numpy(degrees, flipped, scale, offset):
    image = random_images(1, 1, 20, 28, low=-1.0, high=1.0, seed=4)
    params = identity_params(1, 2, rotation_deg=torch.tensor([[degrees]]), flipped=torch.tensor([flipped]),
                             crop_scale=torch.tensor([scale]), crop_offset=torch.tensor([offset]))

    out = apply_transform(image, params, torch.Generator())

    expected = reference_geometry_2d(image[0, 0].numpy(), degrees, flipped, scale, offset)
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-5)


def test_each_image_of_a_batch_gets_its_own_geometry_and_its_own_minimum_outside():
    images = torch.cat([random_images(1, 1, 16, 16, low=-1.0, high=0.0, seed=6),
                        random_images(1, 1, 16, 16, low=0.5, high=2.0, seed=7),
                        random_images(1, 1, 16, 16, low=0.0, high=1.0, seed=8)])
    params = identity_params(3, 2, rotation_deg=torch.tensor([[10.0], [0.0], [-25.0]]),
                             flipped=torch.tensor([False, True, False]))

    out = apply_transform(images, params, torch.Generator())

    expected = [reference_geometry_2d(images[b, 0].numpy(), d, f, 1.0, (0.0, 0.0))
                for b, d, f in [(0, 10.0, False), (1, 0.0, True), (2, -25.0, False)]]
    np.testing.assert_allclose(out[:, 0].numpy(), np.stack(expected), atol=1e-5)


def test_the_outside_of_a_multichannel_image_is_filled_with_its_minimum_over_all_channels():
    image = torch.stack([random_images(16, 16, low=-1.0, high=0.0, seed=9),
                         random_images(16, 16, low=0.5, high=1.0, seed=10)])[None]
    params = identity_params(1, 2, rotation_deg=torch.tensor([[30.0]]))

    out = apply_transform(image, params, torch.Generator())

    low = float(image.min())
    expected = [reference_geometry_2d(image[0, c].numpy(), 30.0, False, 1.0, (0.0, 0.0), low=low) for c in range(2)]
    np.testing.assert_allclose(out[0].numpy(), np.stack(expected), atol=1e-5)


@pytest.mark.parametrize(("axis", "rot90_dims"), [(0, (1, 2)), (1, (1, 3)), (2, (2, 3))])
def test_a_90_degree_rotation_about_one_volume_axis_is_rot90_in_the_other_two(axis, rot90_dims):
    # axis 0, 1, 2 = x (W), y (H), z (D); the rotation turns (first, second) of the other two axes like the 2D
    # rotation turns (x, y), which is rot90 over the tensor dims (second, first) of a (C, D, H, W) volume.
    volume = random_images(1, 1, 8, 8, 8, seed=7)
    angles = torch.zeros(1, 3)
    angles[0, axis] = 90.0

    out = apply_transform(volume, identity_params(1, 3, rotation_deg=angles), torch.Generator())

    torch.testing.assert_close(out[0], torch.rot90(volume[0], 1, dims=rot90_dims), atol=1e-5, rtol=0)


def test_volume_rotations_compose_as_z_then_y_then_x_on_the_image():
    # The sampling matrix Rz Ry Rx maps output to input coordinates, so the image is turned about z first.
    volume = random_images(1, 1, 8, 8, 8, seed=8)
    params = identity_params(1, 3, rotation_deg=torch.tensor([[90.0, 90.0, 90.0]]))

    out = apply_transform(volume, params, torch.Generator())

    expected = torch.rot90(torch.rot90(torch.rot90(volume[0], 1, dims=(2, 3)), 1, dims=(1, 3)), 1, dims=(1, 2))
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)


def linear_resampling_matrix(size: int, scale: float, flipped: bool) -> np.ndarray:
    """(size, size) weights of 1D linear interpolation at input index scale * (+-(i + 0.5 - size / 2)) + size / 2 - 0.5."""
    centred = np.arange(size) + 0.5 - size / 2
    u = scale * (-centred if flipped else centred) + size / 2 - 0.5
    return np.clip(1 - np.abs(u[:, None] - np.arange(size)[None, :]), 0, None)


def test_a_volume_flip_mirrors_only_the_last_axis_and_a_crop_zooms_every_axis():
    volume = random_images(1, 1, 6, 8, 10, seed=9)
    params = identity_params(1, 3, flipped=torch.tensor([True]), crop_scale=torch.tensor([0.5]))

    out = apply_transform(volume, params, torch.Generator())

    # no rotation: the sampling separates into 1D linear interpolation along D, H and W (flipped along W only)
    depth, height, width = (linear_resampling_matrix(6, 0.5, False), linear_resampling_matrix(8, 0.5, False),
                            linear_resampling_matrix(10, 0.5, True))
    expected = np.einsum("ad,bh,cw,dhw->abc", depth, height, width, volume[0, 0].numpy())
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-5)


# --- blur against numpy ----------------------------------------------------------------------------------------


def test_2d_blur_of_each_image_matches_a_numpy_gaussian_with_replicate_padding():
    images = random_images(3, 2, 11, 17, seed=10)
    sigmas = torch.tensor([0.7, 1.6, 0.0])

    out = gaussian_blur(images, sigmas)

    radius = math.ceil(3 * 1.6)
    expected = np.stack([[reference_blur(images[b, c].numpy(), float(sigmas[b]), radius) for c in range(2)]
                         for b in range(3)])
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


def test_3d_blur_matches_a_numpy_gaussian_with_replicate_padding():
    volume = random_images(1, 1, 5, 7, 9, seed=11)

    out = gaussian_blur(volume, torch.tensor([1.2]))

    np.testing.assert_allclose(out[0, 0].numpy(), reference_blur(volume[0, 0].numpy(), 1.2, 4), atol=1e-5)


def test_a_sigma_below_one_sixth_pixel_leaves_the_images_unchanged():
    images = random_images(2, 1, 8, 8, seed=12)

    out = gaussian_blur(images, torch.tensor([0.1, 0.0]))

    torch.testing.assert_close(out, images, atol=1e-6, rtol=0)


def test_a_third_of_a_pixel_sigma_blurs_with_a_3_tap_kernel():
    images = random_images(1, 1, 8, 9, seed=21)

    out = gaussian_blur(images, torch.tensor([0.33]))

    np.testing.assert_allclose(out[0, 0].numpy(), reference_blur(images[0, 0].numpy(), 0.33, 1), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_every_transform_keeps_the_images_dtype(dtype):
    images = random_images(4, 1, 16, 16, seed=22).to(dtype)
    everything = dataclasses.replace(TRANSFORM_PRESETS["copy_strong"], blur_p=1.0)

    out = random_transform(images, everything, torch.Generator().manual_seed(4))

    assert out.dtype == dtype


def test_apply_transform_blurs_with_each_samples_sigma():
    images = random_images(2, 1, 12, 12, seed=13)

    out = apply_transform(images, identity_params(2, 2, blur_sigma_px=torch.tensor([0.0, 1.0])), torch.Generator())

    expected = [images[0, 0].numpy(), reference_blur(images[1, 0].numpy(), 1.0, 3)]
    np.testing.assert_allclose(out[:, 0].numpy(), np.stack(expected), atol=1e-5)


# --- intensity against numpy -----------------------------------------------------------------------------------


def test_gamma_contrast_and_brightness_are_relative_to_each_images_range_over_all_channels():
    images = torch.stack([random_images(2, 10, 14, low=-0.3, high=0.2, seed=14),
                          random_images(2, 10, 14, low=0.2, high=3.0, seed=15),
                          random_images(2, 10, 14, low=0.0, high=1.0, seed=16)])
    changes = {"gamma": torch.tensor([0.8, 1.3, 1.0]), "contrast": torch.tensor([1.2, 0.7, 1.0]),
               "brightness_shift": torch.tensor([0.05, -0.1, 0.0])}

    out = apply_transform(images, identity_params(3, 2, **changes), torch.Generator())

    expected = [reference_intensity(images[b].numpy(), float(changes["gamma"][b]), float(changes["contrast"][b]),
                                    float(changes["brightness_shift"][b])) for b in range(3)]
    np.testing.assert_allclose(out.numpy(), np.stack(expected), atol=1e-5)


def test_noise_has_each_samples_standard_deviation_times_its_range_and_none_at_zero():
    images = torch.stack([random_images(1, 64, 64, low=0.0, high=2.0, seed=17),
                          random_images(1, 64, 64, low=-1.0, high=1.0, seed=18),
                          random_images(1, 64, 64, seed=19)])
    params = identity_params(3, 2, noise_std=torch.tensor([0.1, 0.03, 0.0]))

    residual = apply_transform(images, params, torch.Generator().manual_seed(0)) - images

    observed = residual.reshape(3, -1).std(dim=1).numpy()
    np.testing.assert_allclose(observed, [0.1 * 2.0, 0.03 * 2.0, 0.0], rtol=0.05, atol=1e-5)


def test_a_constant_image_stays_constant_under_every_intensity_change():
    images = torch.full((1, 1, 8, 8), -0.25)
    params = identity_params(1, 2, gamma=torch.tensor([1.3]), contrast=torch.tensor([1.4]),
                             brightness_shift=torch.tensor([0.0]))

    out = apply_transform(images, params, torch.Generator())

    torch.testing.assert_close(out, images, atol=1e-6, rtol=0)


def test_random_transform_of_a_multichannel_batch_transforms_both_channels_of_an_image_alike():
    images = random_images(3, 2, 16, 16, seed=20)
    images[:, 1] = images[:, 0]  # two identical channels
    noiseless = dataclasses.replace(TRANSFORM_PRESETS["copy_strong"], noise_p=0.0)

    out = random_transform(images, noiseless, torch.Generator().manual_seed(3))

    assert (out.shape, torch.equal(out[:, 0], out[:, 1]), (out - images).abs().amax(dim=(1, 2, 3)).min() > 0.01) == (
        images.shape, True, True)


# --- bounds validation -----------------------------------------------------------------------------------------


def test_bounds_accept_the_edges_of_every_range():
    bounds = TransformBounds(rotation_deg=0.0, rotation_p=1.0, flip_p=0.0, crop_scale=(1.0, 1.0), crop_p=1.0,
                             contrast=(0.01, 0.01), gamma=(3.0, 3.0), noise_std=0.0, blur_sigma_px=0.0)

    assert (bounds.rotation_p, bounds.flip_p, bounds.crop_scale) == (1.0, 0.0, (1.0, 1.0))


@pytest.mark.parametrize(("changes", "message"), [
    ({"rotation_p": -0.1}, "TransformBounds.rotation_p = -0.1 is a probability: give a value in [0, 1]"),
    ({"blur_p": 1.01}, "TransformBounds.blur_p = 1.01 is a probability: give a value in [0, 1]"),
    ({"rotation_deg": -1.0}, "TransformBounds.rotation_deg = -1.0 must be >= 0"),
    ({"brightness_shift": -0.1}, "TransformBounds.brightness_shift = -0.1 must be >= 0"),
    ({"noise_std": -0.1}, "TransformBounds.noise_std = -0.1 must be >= 0"),
    ({"blur_sigma_px": -0.1}, "TransformBounds.blur_sigma_px = -0.1 must be >= 0"),
    ({"crop_scale": (0.0, 0.5)}, "TransformBounds.crop_scale = (0.0, 0.5) must satisfy 0 < min <= max"),
    ({"contrast": (1.2, 1.1)}, "TransformBounds.contrast = (1.2, 1.1) must satisfy 0 < min <= max"),
    ({"gamma": (-1.0, 1.0)}, "TransformBounds.gamma = (-1.0, 1.0) must satisfy 0 < min <= max"),
    ({"crop_scale": (0.9, 1.1)}, "TransformBounds.crop_scale = (0.9, 1.1): a crop keeps at most the whole image"),
])
def test_bounds_out_of_range_are_refused_with_the_field_and_the_rule(changes, message):
    with pytest.raises(ValueError) as refused:
        TransformBounds(**changes)

    assert str(refused.value) == message
