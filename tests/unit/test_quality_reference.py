"""MS-SSIM diversity (raymem.audit.quality.ms_ssim_diversity) against an independent float64 reference.

The reference below is written from the published definition of MS-SSIM (Wang, Simoncelli & Bovik 2003) with
plain numpy, and nothing of MONAI or raymem but the public window and scale-weight constants and, for which pairs
a sampled mean is taken over, ``_pair_indices`` (whose pairs are checked on their own below). Where the paper leaves
a choice open, the reference makes the one MONAI 1.6.1's ``compute_ms_ssim`` makes (monai/metrics/regression.py),
which is what ``ms_ssim_diversity``'s docstring promises:

- the window is separable: a 1D Gaussian sampled at integer offsets from its centre, normalised to sum 1, per axis;
- local means, variances and covariance are "valid" filterings (no padding: a side of s pixels gives s - k + 1);
- C1 = (0.01 R)^2, C2 = (0.03 R)^2 with the data range R = value_range[1] - value_range[0];
- each scale's value is the mean over the whole map (channels and pixels) of the contrast-structure term cs, and at
  the coarsest scale of the full SSIM (luminance times cs); that mean is clamped at 0 before it is raised to its
  weight, so a scale of negative contrast makes the pair score 0 rather than NaN;
- between scales each image is 2x2 (2x2x2 in 3D) average-pooled with stride 2, an odd last row dropped;
- the weights are the first n of Wang et al.'s five, renormalised to sum 1, with n per the docstring: 32 pixels give
  3 scales, 64 give 4 (the tests state n; the reference does not derive it).

Tolerance: MONAI computes in float32, its Gaussian window included, so the window sums to 1 only within a few
float32 epsilons (1.2e-7). Local variances are E[x^2] - E[x]^2 with E[x]^2 near 0.25, while pooled noise at the
coarse scales has variances near 1e-3: a relative error of order 1e-5 there. Measured: 2D scores differ from the
float64 reference by at most 4e-6 (relative), 32^3 volumes by 2e-5; MONAI run in float64 with a float64 window
matches it to 1e-8, so the difference is float32's. rel = 1e-4 keeps a margin of 5 over the worst case; abs = 1e-5
serves scores near 0. The subtlest fault tried, a window sigma of 1.6 instead of 1.5, moves these scores by 1.7e-4
to 2.5e-3 relative, and fails every comparison.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from raymem.audit.quality import (
    MS_SSIM_KERNEL_SIGMA,
    MS_SSIM_KERNEL_SIZE,
    MS_SSIM_SCALE_WEIGHTS,
    _pair_indices,
    ms_ssim_diversity,
)

K1, K2 = 0.01, 0.03  # Wang et al.'s stability constants
RELATIVE_TOLERANCE, ABSOLUTE_TOLERANCE = 1e-4, 1e-5  # float32 inside MONAI against float64 here (module docstring)


# ---------------------------------------------------------------------------------------------------- the reference


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    """A 1D Gaussian (size,) sampled at offsets -(size-1)/2 .. (size-1)/2, summing to 1."""
    offsets = np.arange(size) - (size - 1) / 2
    window = np.exp(-(offsets**2) / (2 * sigma**2))
    return window / window.sum()


def filter_valid(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Weighted local means of image (C, *spatial) under the separable window, no padding: (C, *(s - k + 1))."""
    for axis in range(1, image.ndim):
        image = sliding_window_view(image, len(window), axis=axis) @ window  # the window axis comes last
    return image


def average_pool(image: np.ndarray) -> np.ndarray:
    """Means of 2x2 (2x2x2) blocks of image (C, *spatial), an odd last row dropped: (C, *(s // 2))."""
    even = image[(slice(None), *(slice(0, 2 * (side // 2)) for side in image.shape[1:]))]
    blocked_shape = [image.shape[0], *(n for side in even.shape[1:] for n in (side // 2, 2))]
    return even.reshape(blocked_shape).mean(axis=tuple(range(2, len(blocked_shape), 2)))


def scale_similarities(x: np.ndarray, y: np.ndarray, data_range: float, n_scales: int) -> np.ndarray:
    """Per-scale values (n_scales,) of images x, y (C, *spatial), finest first, before the clamp at 0.

    Mean cs at every scale but the coarsest, mean SSIM at the coarsest.
    """
    window = gaussian_window(MS_SSIM_KERNEL_SIZE, MS_SSIM_KERNEL_SIGMA)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    x, y = x.astype(np.float64), y.astype(np.float64)
    values = []
    for scale in range(n_scales):
        if scale > 0:
            x, y = average_pool(x), average_pool(y)
        mean_x, mean_y = filter_valid(x, window), filter_valid(y, window)
        variance_x = filter_valid(x * x, window) - mean_x**2
        variance_y = filter_valid(y * y, window) - mean_y**2
        covariance = filter_valid(x * y, window) - mean_x * mean_y
        contrast_structure = (2 * covariance + c2) / (variance_x + variance_y + c2)
        luminance = (2 * mean_x * mean_y + c1) / (mean_x**2 + mean_y**2 + c1)
        values.append((contrast_structure if scale < n_scales - 1 else luminance * contrast_structure).mean())
    return np.array(values)


def reference_ms_ssim(x: np.ndarray, y: np.ndarray, data_range: float, n_scales: int) -> float:
    """MS-SSIM of images x, y (C, *spatial): the product of the clamped per-scale values to the renormalised weights."""
    weights = np.array(MS_SSIM_SCALE_WEIGHTS[:n_scales])
    weights /= weights.sum()
    clamped = np.maximum(scale_similarities(x, y, data_range, n_scales), 0.0)
    return float(np.prod(clamped**weights))


def reference_diversity(images: np.ndarray, data_range: float, n_scales: int, pairs) -> float:
    """Mean reference MS-SSIM of images (N, C, *spatial) over pairs, an iterable of (i, j)."""
    return float(np.mean([reference_ms_ssim(images[i], images[j], data_range, n_scales) for i, j in pairs]))


def close_to(expected: float):
    """pytest.approx at the tolerance of MONAI's float32 against this float64 reference (module docstring)."""
    return pytest.approx(expected, rel=RELATIVE_TOLERANCE, abs=ABSOLUTE_TOLERANCE)


# ---------------------------------------------------------------------------------------------------- the images


def mixed_noise(n: int, spatial: tuple[int, ...], seed: int, channels: int = 1) -> np.ndarray:
    """n float32 images (n, channels, *spatial) in [0, 1]: image i mixes one shared noise image and its own noise,
    in a proportion that changes with i, so every pair has a different similarity at every scale."""
    rng = np.random.default_rng(seed)
    shared = rng.uniform(size=(1, channels, *spatial))
    own = rng.uniform(size=(n, channels, *spatial))
    shared_weight = np.linspace(0.9, 0.3, n).reshape(n, *(1,) * (len(spatial) + 1))
    return (shared_weight * shared + (1 - shared_weight) * own).astype(np.float32)


def opposite_coarse_pattern(side: int, sign: float, noise: np.ndarray) -> np.ndarray:
    """A float32 image (1, side, side): shared fine noise plus sign times a pattern one period across."""
    rows, columns = np.mgrid[0:side, 0:side] / side
    pattern = np.sin(2 * np.pi * columns) * np.cos(2 * np.pi * rows)
    return (0.5 + sign * 0.1 * pattern + noise).astype(np.float32)[None]


# ---------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize(
    ("spatial", "channels", "n_scales"),
    [((32, 32), 1, 3), ((64, 64), 1, 4), ((33, 45), 1, 3), ((32, 32), 2, 3), ((32, 32, 32), 1, 3)],
    ids=["32x32-3-scales", "64x64-4-scales", "33x45-odd-sides-3-scales", "2-channel-32x32", "32^3-3-scales"],
)
def test_ms_ssim_diversity_is_the_mean_over_all_pairs_of_the_reference_ms_ssim(spatial, channels, n_scales):
    n_images = 5 if len(spatial) == 2 else 3
    images = mixed_noise(n_images, spatial, seed=0, channels=channels)
    expected = reference_diversity(images, 1.0, n_scales, itertools.combinations(range(n_images), 2))

    diversity = ms_ssim_diversity(images, (0.0, 1.0))

    assert diversity == close_to(expected)


def test_ms_ssim_diversity_uses_the_width_of_the_value_range_as_data_range():
    images = 2 * mixed_noise(5, (32, 32), seed=1) - 1
    expected = reference_diversity(images, 2.0, 3, itertools.combinations(range(5), 2))

    diversity = ms_ssim_diversity(images, (-1.0, 1.0))

    assert diversity == close_to(expected)


def test_ms_ssim_diversity_of_sampled_pairs_is_the_mean_over_the_drawn_pairs():
    images = mixed_noise(8, (32, 32), seed=2)
    first, second = _pair_indices(8, max_pairs=6, seed=3)
    expected = reference_diversity(images, 1.0, 3, zip(first, second))

    diversity = ms_ssim_diversity(images, (0.0, 1.0), max_pairs=6, seed=3)

    assert diversity == close_to(expected)


@pytest.mark.parametrize(("n_images", "max_pairs", "seed"), [(8, 6, 3), (50, 300, 0), (5, 256, 0), (5, 10, 7)])
def test_pair_indices_are_the_requested_number_of_distinct_ordered_pairs(n_images, max_pairs, seed):
    first, second = _pair_indices(n_images, max_pairs, seed)
    pairs = list(zip(first.tolist(), second.tolist()))

    all_pairs = set(itertools.combinations(range(n_images), 2))  # every (i, j) with 0 <= i < j < n_images
    assert len(set(pairs)) == len(pairs) == min(max_pairs, len(all_pairs)) and set(pairs) <= all_pairs


def test_ms_ssim_diversity_of_identical_images_is_one():
    images = np.repeat(mixed_noise(1, (64, 64), seed=4), 3, axis=0)

    assert ms_ssim_diversity(images, (0.0, 1.0)) == close_to(1.0)


def test_a_pair_with_negative_coarse_contrast_counts_as_zero_in_the_mean():
    # a and b share their fine noise but carry opposite coarse patterns: similar at fine scales, anti-correlated
    # at the coarsest, whose negative value under a fractional weight would be NaN without the clamp
    noise = np.random.default_rng(5).uniform(-0.3, 0.3, size=(64, 64))
    a, b = opposite_coarse_pattern(64, 1.0, noise), opposite_coarse_pattern(64, -1.0, noise)
    images = np.stack([a, b, mixed_noise(1, (64, 64), seed=6)[0]])
    finest, *_, coarsest = scale_similarities(a, b, 1.0, 4)
    assert coarsest < 0 < finest
    expected = reference_diversity(images, 1.0, 4, [(0, 1), (0, 2), (1, 2)])

    diversity = ms_ssim_diversity(images, (0.0, 1.0))

    assert diversity == close_to(expected)
