"""Faults in raymem.audit.quality that test_quality.py and test_quality_reference.py let through (issue 18).

Each test here was written against a surviving mutmut mutant (docs/mutation-survivors.md, "audit/quality.py"):
boundaries of the input checks (two rows, two images, a split of two rows, a pool of exactly n rows), float64
arithmetic from float32 embeddings, the real baseline when neither pool holds n rows, the number of MS-SSIM
scales at every side where it changes, the smallest side of a non-square image, integer images, and a mean taken
over several batches of pairs. Expected values are stated by hand or come from the float64 MS-SSIM reference of
test_quality_reference.py (no Ray).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_quality_reference import close_to, mixed_noise, reference_diversity

from raymem.audit import quality
from raymem.audit.quality import (
    MS_SSIM_SCALE_WEIGHTS,
    FrechetReference,
    fixed_reference,
    frechet_distance,
    ms_ssim_diversity,
    real_baseline_sample,
)

# ------------------------------------------------------------------------------------------- Frechet distance


def test_float32_embeddings_are_scored_in_float64():
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(40, 6)) * 1e3 + 5e3).astype(np.float32)  # large offsets: float32 sums would round
    b = (rng.normal(size=(30, 6)) * 1e3 + 5e3).astype(np.float32)

    assert frechet_distance(a, b) == frechet_distance(a.astype(np.float64), b.astype(np.float64))


def test_two_rows_each_are_enough_and_give_the_one_dimensional_closed_form():
    a, b = np.array([[0.0], [2.0]]), np.array([[5.0], [9.0]])
    # 1D: (mean_a - mean_b)^2 + (sd_a - sd_b)^2 with ddof=1: means 1 and 7, sds sqrt(2) and sqrt(8)
    assert frechet_distance(a, b) == pytest.approx(36.0 + (np.sqrt(2.0) - np.sqrt(8.0)) ** 2, rel=1e-12)


@pytest.mark.parametrize(("a", "b"), [(np.zeros(8), np.zeros((10, 8))), (np.zeros((10, 8)), np.zeros(8))])
def test_a_one_dimensional_array_is_refused_naming_the_shapes(a, b):
    with pytest.raises(ValueError, match=r"frechet_distance needs two embedding arrays \(n, d\) and \(m, d\) .* got "
                                         r"shapes \((8,|10, 8)"):
        frechet_distance(a, b)


@pytest.mark.parametrize("bad", ["a", "b"])
def test_non_finite_embeddings_are_named_a_or_b(bad):
    rows = {"a": np.ones((5, 3)) * np.arange(3), "b": np.ones((6, 3)) * np.arange(3)}
    rows[bad][2, 1] = np.nan
    with pytest.raises(ValueError, match=f"frechet_distance: embeddings {bad} \\(.*\\) hold 1 non-finite values"):
        frechet_distance(rows["a"], rows["b"])


# ------------------------------------------------------------------------------ fixed reference, real baseline


def held_out(split_rows: dict[str, int], d: int = 3, seed: int = 0) -> dict:
    """split -> (sample_ids, patient_ids, embeddings): one patient per row."""
    rng = np.random.default_rng(seed)
    return {split: ([f"{split}{i:03d}" for i in range(n)], [f"{split}-p{i}" for i in range(n)],
                    rng.normal(size=(n, d))) for split, n in split_rows.items()}


def test_a_held_out_split_of_two_rows_is_a_reference_and_size_two_is_allowed():
    reference = fixed_reference(held_out({"val": 2}), None, seed=0)
    two = fixed_reference(held_out({"test": 5}), 2, seed=0)

    assert (reference.split, reference.size, two.split, two.size) == ("val", 2, "test", 2)


def test_no_usable_held_out_split_names_test_or_val_and_a_size_under_two_is_refused():
    with pytest.raises(ValueError, match=r"needs a held-out split \(test or val\) with at least 2 embeddings; got "
                                         r"splits \{'val': 1, 'train': 9\}"):
        fixed_reference(held_out({"val": 1, "train": 9}), None, seed=0)
    with pytest.raises(ValueError, match=r"fixed_reference: size must be at least 2 .* got 1"):
        fixed_reference(held_out({"val": 5}), 1, seed=0)


def reference_with_spare(n_spare: int, d: int = 3) -> FrechetReference:
    rng = np.random.default_rng(1)
    return FrechetReference(split="test", sample_ids=("r0", "r1"), embeddings=rng.normal(size=(2, d)),
                            spare=rng.normal(size=(n_spare, d)))


def test_a_baseline_of_two_rows_is_allowed_and_one_row_is_refused():
    reference = reference_with_spare(5)
    sample, source = real_baseline_sample(reference, 2, ([], np.zeros((0, 3))), seed=0)

    assert (sample.shape, source) == ((2, 3), "held-out")
    with pytest.raises(ValueError, match=r"real_baseline_sample: n must be at least 2 .* got 1"):
        real_baseline_sample(reference, 1, ([], np.zeros((0, 3))), seed=0)


def test_a_held_out_pool_of_exactly_n_rows_gives_every_one_of_them():
    reference = reference_with_spare(4)
    train = ([f"t{i}" for i in range(10)], np.arange(30.0).reshape(10, 3))

    sample, source = real_baseline_sample(reference, 4, train, seed=0)

    assert (source, sample.tolist()) == ("held-out", reference.spare.tolist())


def test_with_neither_pool_holding_n_rows_the_baseline_is_every_row_of_the_larger():
    reference = reference_with_spare(3)
    train = (["t2", "t0", "t1", "t3", "t4"], np.arange(15.0).reshape(5, 3))

    sample, source = real_baseline_sample(reference, 8, train, seed=0)

    # every training row, in sample_id order (t0, t1, t2, t3, t4)
    assert (source, sample.tolist()) == ("train", np.arange(15.0).reshape(5, 3)[[1, 2, 0, 3, 4]].tolist())


# --------------------------------------------------------------------------------------------------- MS-SSIM


@pytest.mark.parametrize(("side", "n_scales"), [
    (7, 1), (13, 1), (14, 2), (27, 2), (28, 3), (56, 3), (62, 3), (63, 4), (64, 4), (111, 4), (112, 5), (300, 5),
])
def test_the_number_of_scales_changes_exactly_where_the_window_and_monais_size_check_allow(side, n_scales):
    """By hand, with window k = 7: L scales need side // 2**(L-1) >= 7 and side // max(1, L-1)**2 > 6. 56 keeps 3
    (56 // 8 = 7 fits the window, but 56 // 9 = 6 fails MONAI's check); 63 is the first side with 4."""
    weights = quality._scale_weights((side, side + 5))
    prefix = MS_SSIM_SCALE_WEIGHTS[:n_scales]

    assert weights == pytest.approx([weight / sum(prefix) for weight in prefix], rel=1e-12)


def test_a_side_smaller_than_the_window_is_refused():
    with pytest.raises(ValueError, match=r"every spatial side >= 7 pixels .* got spatial shape \(6, 40\)"):
        quality._scale_weights((6, 40))


def test_a_non_square_image_gets_the_scales_of_its_smallest_side():
    images = mixed_noise(4, (16, 64), seed=4)
    expected = reference_diversity(images, 1.0, 2, itertools.combinations(range(4), 2))  # 16 pixels: 2 scales

    assert ms_ssim_diversity(images, (0.0, 1.0)) == close_to(expected)


def test_two_images_are_enough_and_one_pair_at_most_is_allowed():
    images = mixed_noise(3, (32, 32), seed=5)
    expected_two = reference_diversity(images[:2], 1.0, 3, [(0, 1)])
    first, second = quality._pair_indices(3, max_pairs=1, seed=0)

    assert ms_ssim_diversity(images[:2], (0.0, 1.0)) == close_to(expected_two)
    assert ms_ssim_diversity(images, (0.0, 1.0), max_pairs=1) == close_to(
        reference_diversity(images, 1.0, 3, zip(first, second)))


@pytest.mark.parametrize(("images", "value_range", "max_pairs", "message"), [
    (np.zeros((1, 1, 32, 32)), (0.0, 1.0), 256,
     r"ms_ssim_diversity needs at least two 2D or 3D images \(N, C, \*spatial\) with N >= 2; got shape \(1, 1, 32, 32\)"),
    (np.zeros((3, 1, 32, 32)), (0.5, 0.5), 256, r"value_range must be \(low, high\) with high > low; got \(0.5, 0.5\)"),
    (np.zeros((3, 1, 32, 32)), (0.0, 1.0), 0, r"max_pairs must be at least 1; got 0"),
])
def test_bad_inputs_are_refused_naming_what_is_wrong(images, value_range, max_pairs, message):
    with pytest.raises(ValueError, match=message):
        ms_ssim_diversity(images, value_range, max_pairs=max_pairs)


def test_integer_images_are_scored_as_their_float_values():
    """A PNG's 8-bit pixels, value range 0-255: the same score as the same values in float32."""
    images = np.round(mixed_noise(4, (32, 32), seed=6) * 255).astype(np.uint8)

    assert ms_ssim_diversity(images, (0.0, 255.0)) == ms_ssim_diversity(images.astype(np.float32), (0.0, 255.0))


def test_the_mean_over_several_batches_of_pairs_is_the_mean_over_all_pairs(monkeypatch):
    images = mixed_noise(6, (32, 32), seed=7)
    expected = reference_diversity(images, 1.0, 3, itertools.combinations(range(6), 2))
    monkeypatch.setattr(quality, "MS_SSIM_BATCH_VOXELS", 2 * 32 * 32)  # 2 pairs a batch: 15 pairs in 8 batches

    assert ms_ssim_diversity(images, (0.0, 1.0)) == close_to(expected)


def test_more_than_256_pairs_are_sampled_down_to_256_with_seed_0_by_default():
    images = mixed_noise(24, (16, 16), seed=8)  # 276 pairs
    first, second = quality._pair_indices(24, max_pairs=256, seed=0)

    assert ms_ssim_diversity(images, (0.0, 1.0)) == close_to(reference_diversity(images, 1.0, 2, zip(first, second)))
