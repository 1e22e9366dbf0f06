"""Held-out copy accuracy: the operating point, its intervals, and the scoring of copy families with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from raymem.audit.accuracy import (
    copy_detection_figures,
    flatten_pixels,
    heldout_copy_accuracy,
    training_copy_family,
)
from raymem.audit.statistics import wilson_interval
from raymem.models.heldout_copies import HELDOUT_FAMILIES


def noise_images(count: int, seed: int) -> torch.Tensor:
    """(count, 1, 8, 8) independent uniform images: every pair unrelated."""
    return torch.rand(count, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def smooth_images(count: int, seed: int) -> torch.Tensor:
    """(count, 1, 16, 16) smooth random images (4x4 noise, upsampled): room for every held-out family."""
    coarse = torch.rand(count, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear")


def slightly_noisy(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return images + 0.05 * torch.randn(images.shape, generator=generator)


def unrelated(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(images.shape, generator=generator)


def brute_force_sensitivity(positive: list[float], negative: list[float]) -> float:
    """The 95th percentile by hand (linear interpolation between order statistics), then a count with a loop."""
    ordered = sorted(negative)
    position = 0.95 * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    threshold = ordered[below] + (position - below) * (ordered[above] - ordered[below])
    found = 0
    for score in positive:
        if score > threshold:
            found += 1
    return found / len(positive)


def test_sensitivity_at_95_specificity_equals_a_brute_force_count():
    rng = np.random.default_rng(0)
    positive = np.round(rng.normal(0.8, 0.1, 37), 2)  # rounded: ties with the threshold's neighbours occur
    negative = np.round(rng.normal(0.6, 0.1, 53), 2)

    figures = copy_detection_figures(positive, negative, np.ones(37, dtype=bool), n_bootstrap=10)

    assert figures["sensitivity_at_95_specificity"] == brute_force_sensitivity(list(positive), list(negative))


def test_the_auc_interval_holds_the_auc_and_the_sensitivity_interval_is_wilson():
    rng = np.random.default_rng(1)
    positive, negative = rng.normal(1.0, 1.0, 80), rng.normal(0.0, 1.0, 120)

    figures = copy_detection_figures(positive, negative, np.zeros(80, dtype=bool), n_bootstrap=500)

    low, high = figures["ci95"]["roc_auc"]
    found = round(figures["sensitivity_at_95_specificity"] * 80)
    assert low < figures["roc_auc"] < high and figures["ci95"]["sensitivity_at_95_specificity"] == list(
        wilson_interval(found, 80))


def test_mildly_noisy_copies_are_all_found_by_raw_pixels():
    result = heldout_copy_accuracy(flatten_pixels, noise_images(40, seed=0), noise_images(40, seed=1),
                                   {"noisy": slightly_noisy})

    figures = result["families"]["noisy"]
    assert (figures["sensitivity_at_95_specificity"], figures["roc_auc"], figures["top1"]) == (1.0, 1.0, 1.0)


def test_copies_that_keep_nothing_of_the_original_score_near_chance():
    result = heldout_copy_accuracy(flatten_pixels, noise_images(200, seed=0), noise_images(200, seed=1),
                                   {"unrelated": unrelated}, n_bootstrap=200)

    assert abs(result["families"]["unrelated"]["roc_auc"] - 0.5) < 0.12


def test_negatives_are_copied_by_the_family_too():
    # Every image is a shared anatomy plus its own detail, and the family keeps only the anatomy: copies then match
    # every original equally well, and so do the negatives' copies, so the AUC is near chance. Were the negatives
    # scored uncopied, their own detail would lower their scores and the copies would look found (AUC near 1).
    anatomy = torch.linspace(0.0, 1.0, 64).view(1, 1, 8, 8)

    def keep_only_the_anatomy(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return anatomy + 1e-3 * torch.rand(images.shape, generator=generator)

    result = heldout_copy_accuracy(flatten_pixels, anatomy + 0.3 * noise_images(100, seed=0),
                                   anatomy + 0.3 * noise_images(100, seed=1), {"anatomy": keep_only_the_anatomy},
                                   n_bootstrap=200)

    assert abs(result["families"]["anatomy"]["roc_auc"] - 0.5) < 0.15


def test_a_family_that_returns_the_originals_unchanged_is_refused():
    def identity(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return images.clone()

    with pytest.raises(ValueError, match="unchanged"):
        heldout_copy_accuracy(flatten_pixels, noise_images(5, seed=0), noise_images(20, seed=1), {"same": identity})


def test_negatives_of_the_originals_patients_are_refused():
    with pytest.raises(ValueError, match="both originals and negatives"):
        heldout_copy_accuracy(flatten_pixels, noise_images(5, seed=0), noise_images(20, seed=1),
                              {"noisy": slightly_noisy}, original_patients=["p0", "p1", "p2", "p3", "p4"],
                              negative_patients=[f"p{i}" for i in range(4, 24)])


def test_the_result_is_plain_json_with_the_heldout_and_autoencoder_families():
    def round_trip(images: torch.Tensor) -> torch.Tensor:
        return 0.9 * images + 0.05

    result = heldout_copy_accuracy(flatten_pixels, smooth_images(8, seed=0), smooth_images(20, seed=1),
                                   autoencoder_round_trip=round_trip, n_bootstrap=50)

    assert json.loads(json.dumps(result)) == result and set(result["families"]) == {*HELDOUT_FAMILIES, "autoencoder"}


def test_a_family_draws_the_same_copies_whichever_families_come_with_it():
    originals, negatives = noise_images(10, seed=0), noise_images(20, seed=1)
    families = {"copy": training_copy_family("copy"), "noisy": slightly_noisy}

    alone = heldout_copy_accuracy(flatten_pixels, originals, negatives, {"noisy": slightly_noisy}, n_bootstrap=20)
    together = heldout_copy_accuracy(flatten_pixels, originals, negatives, families, n_bootstrap=20)

    assert alone["families"]["noisy"] == together["families"]["noisy"]
