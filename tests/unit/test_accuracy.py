"""Copy-retrieval and re-identification accuracy on constructed embeddings whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymem.audit.accuracy import (
    accuracy_with_baselines,
    copy_retrieval_metrics,
    flatten_pixels,
    make_copies,
    pearson_similarity,
    reidentification_auc,
    roc_auc,
    score_embedding,
)
from raymem.models.detector import build_detector


def random_embeddings(count: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)


def test_pearson_similarity_is_numpy_corrcoef():
    a, b = random_embeddings(4, seed=1), random_embeddings(3, seed=2)

    similarity = pearson_similarity(a, b)

    np.testing.assert_allclose(similarity.numpy(), np.corrcoef(a, b)[:4, 4:], atol=1e-6)


def test_pearson_similarity_names_constant_rows():
    embeddings = random_embeddings(3)
    embeddings[1] = 0.5

    with pytest.raises(ValueError, match=r"rows \[1\]"):
        pearson_similarity(embeddings, embeddings)


def test_roc_auc_counts_ties_as_one_half():
    # Pairs (positive, negative): 0.9>0.5, 0.9>0.1, 0.5=0.5 (one half), 0.5>0.1 -> 3.5 of 4.
    assert roc_auc([0.9, 0.5], [0.5, 0.1]) == 0.875


def test_near_identical_copies_are_all_retrieved_with_auc_one():
    originals = random_embeddings(50)
    copies = originals + 0.01 * random_embeddings(50, seed=1)

    metrics = copy_retrieval_metrics(originals, copies)

    assert metrics == {"top1": 1.0, "auc": 1.0}


def test_unrelated_copies_score_auc_about_one_half():
    metrics = copy_retrieval_metrics(random_embeddings(200), random_embeddings(200, seed=1))

    assert abs(metrics["auc"] - 0.5) < 0.05


def test_embeddings_clustered_by_patient_reidentify_perfectly():
    patient_ids = np.repeat(np.arange(20), 3)
    embeddings = random_embeddings(20)[patient_ids] + 0.05 * random_embeddings(60, seed=1)

    assert reidentification_auc(embeddings, patient_ids) == 1.0


def test_reidentification_needs_a_patient_with_two_images():
    with pytest.raises(ValueError, match="two images"):
        reidentification_auc(random_embeddings(5), ["a", "b", "c", "d", "e"])


def test_copies_repeat_with_the_same_seed():
    images = torch.rand(5, 1, 16, 16)

    first = make_copies(images, "copy_strong", seed=3, batch_size=2)

    assert torch.equal(first, make_copies(images, "copy_strong", seed=3, batch_size=2))


def test_raw_pixels_find_untransformed_copies_and_reidentify_a_repeated_image():
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images[3] = images[0] + 0.01 * torch.rand(1, 8, 8)  # patient "a" has two nearly identical images
    patient_ids = ["a", "b", "c", "a", "d", "e"]

    scores = score_embedding(flatten_pixels, images, {"copy": images.clone()}, patient_ids)

    assert scores == {"copy_top1": 1.0, "copy_auc": 1.0, "reid_auc": 1.0}


def test_detector_and_both_baselines_are_scored_on_every_metric():
    coarse = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    images = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")
    patient_ids = ["a", "a", "b", "b", "c", "c", "d", "d"]

    scores = accuracy_with_baselines(build_detector("tiny", spatial_dims=2), images, patient_ids, batch_size=4)

    metrics = ["copy_top1", "copy_auc", "copy_strong_top1", "copy_strong_auc", "reid_auc"]
    expected = {f"{name}/{metric}" for name in ("detector", "raw_pixel", "random_encoder") for metric in metrics}
    assert set(scores) == expected and all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in scores.values())
