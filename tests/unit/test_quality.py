"""Sample-quality figures (raymem.audit.quality): Frechet distance against closed forms and scipy's sqrtm, MS-SSIM
diversity on identical, near-duplicate and independent images in 2D and 3D (no Ray)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.linalg

from raymem.audit.quality import frechet_distance, ms_ssim_diversity


def correlated_gaussian(n: int, d: int, seed: int) -> np.ndarray:
    """n samples (n, d) of a Gaussian with mean 0 and a fixed (seed-independent) full-rank covariance."""
    mixing = np.random.default_rng(1234).normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ mixing


def near_duplicates(n: int, spatial: tuple[int, ...], noise_sigma: float, seed: int) -> np.ndarray:
    """n images (n, 1, *spatial) in [0, 1]: one uniform-noise image plus independent Gaussian noise of noise_sigma."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(size=(1, 1, *spatial))
    return np.clip(base + rng.normal(scale=noise_sigma, size=(n, 1, *spatial)), 0.0, 1.0).astype(np.float32)


def independent_noise(n: int, spatial: tuple[int, ...], seed: int) -> np.ndarray:
    """n independent uniform-noise images (n, 1, *spatial) in [0, 1]."""
    return np.random.default_rng(seed).uniform(size=(n, 1, *spatial)).astype(np.float32)


def test_frechet_distance_of_mean_shifted_samples_approaches_squared_shift():
    mean_shift = np.array([1.0, -2.0, 0.5, 0.0])
    # each sample centred on its exact mean, so only the covariance estimates' noise separates FD from the shift
    a = correlated_gaussian(50_000, 4, seed=0)
    a -= a.mean(axis=0)
    b = correlated_gaussian(50_000, 4, seed=1)
    b += mean_shift - b.mean(axis=0)

    distance = frechet_distance(a, b)

    assert distance == pytest.approx(mean_shift @ mean_shift, abs=0.01)


def test_frechet_distance_of_a_sample_with_itself_is_zero():
    a = correlated_gaussian(200, 64, seed=0)

    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_is_symmetric():
    a = correlated_gaussian(300, 16, seed=0)
    b = correlated_gaussian(200, 16, seed=1) * 1.5 + 0.3

    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_distance_matches_the_sqrtm_formula_for_full_rank_covariances():
    a = correlated_gaussian(500, 8, seed=0)
    b = correlated_gaussian(400, 8, seed=1) * 0.7 + 1.0
    covariance_a, covariance_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    mean_difference = a.mean(axis=0) - b.mean(axis=0)
    sqrtm_distance = mean_difference @ mean_difference + np.trace(
        covariance_a + covariance_b - 2 * scipy.linalg.sqrtm(covariance_a @ covariance_b).real
    )

    assert frechet_distance(a, b) == pytest.approx(sqrtm_distance, rel=1e-8)


def test_frechet_distance_in_one_dimension_is_squared_mean_and_std_differences():
    rng = np.random.default_rng(0)
    a = rng.normal(loc=1.0, scale=2.0, size=(37, 1))
    b = rng.normal(loc=-0.5, scale=0.5, size=(23, 1))
    brute_force = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2

    assert frechet_distance(a, b) == pytest.approx(brute_force, rel=1e-10)


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite_and_non_negative():
    a = correlated_gaussian(16, 64, seed=0)
    b = correlated_gaussian(16, 64, seed=1)

    distance = frechet_distance(a, b)

    assert np.isfinite(distance) and distance >= 0.0


@pytest.mark.parametrize("shape_a, shape_b", [((1, 8), (10, 8)), ((10, 8), (1, 8)), ((10, 8), (10, 9))])
def test_frechet_distance_rejects_too_few_samples_or_different_dims_naming_the_shapes(shape_a, shape_b):
    with pytest.raises(ValueError, match=re.escape(str(shape_a)) + ".*" + re.escape(str(shape_b))):
        frechet_distance(np.zeros(shape_a), np.ones(shape_b))


def test_frechet_distance_rejects_non_finite_embeddings():
    b = correlated_gaussian(10, 8, seed=1)
    b[3, 2] = np.inf

    with pytest.raises(ValueError, match="embeddings b"):
        frechet_distance(correlated_gaussian(10, 8, seed=0), b)


def test_ms_ssim_diversity_of_identical_images_is_one():
    images = np.repeat(independent_noise(1, (32, 32), seed=0), 5, axis=0)

    assert ms_ssim_diversity(images, (0.0, 1.0)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("spatial", [(32, 32), (64, 64), (32, 32, 32)])
def test_ms_ssim_diversity_of_near_duplicates_exceeds_that_of_independent_noise(spatial):
    duplicates = near_duplicates(6, spatial, noise_sigma=0.05, seed=0)
    noise = independent_noise(6, spatial, seed=1)

    assert ms_ssim_diversity(duplicates, (0.0, 1.0)) > ms_ssim_diversity(noise, (0.0, 1.0)) + 0.5


def test_ms_ssim_diversity_from_sampled_pairs_estimates_the_all_pairs_mean():
    # 24 near-duplicates and 24 noise images: 276 of the 1128 pairs are near-duplicate pairs
    images = np.concatenate([near_duplicates(24, (32, 32), 0.05, seed=0), independent_noise(24, (32, 32), seed=1)])
    all_pairs_mean = ms_ssim_diversity(images, (0.0, 1.0), max_pairs=10**6)

    sampled_mean = ms_ssim_diversity(images, (0.0, 1.0), max_pairs=256, seed=3)

    assert sampled_mean == pytest.approx(all_pairs_mean, abs=0.08)


def test_ms_ssim_diversity_rejects_a_single_image():
    with pytest.raises(ValueError, match="N >= 2"):
        ms_ssim_diversity(independent_noise(1, (32, 32), seed=0), (0.0, 1.0))


def test_ms_ssim_diversity_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="spatial shape"):
        ms_ssim_diversity(independent_noise(4, (32, 4), seed=0), (0.0, 1.0))


def test_ms_ssim_diversity_rejects_non_finite_images():
    images = independent_noise(4, (32, 32), seed=0)
    images[2, 0, 5, 5] = np.nan

    with pytest.raises(ValueError, match="1 non-finite"):
        ms_ssim_diversity(images, (0.0, 1.0))
