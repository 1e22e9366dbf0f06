"""Faults in raymem.audit.accuracy that test_accuracy.py and test_heldout_accuracy.py let through (issue 18).

Each test here was written against surviving mutmut mutants (docs/mutation-survivors.md, "audit/accuracy.py").
The held-out copy figures metrics.json and the report print (sensitivity at 95 % specificity, ROC AUC, top-1, their
intervals) are recomputed by a plain numpy reference written from the docstrings: Mann-Whitney pair counts for the
AUC, numpy.percentile thresholds, the textbook Wilson interval, and the percentile bootstrap drawn by the documented
protocol (one numpy generator seeded with ``seed``: the copies' indices, then the negatives'). No Ray.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from raymem.audit import accuracy
from raymem.audit.accuracy import (
    best_original_scores,
    copies_of,
    copy_detection_figures,
    copy_retrieval_metrics,
    flatten_pixels,
    heldout_copy_accuracy,
    make_copies,
    reidentification_auc,
    score_embedding,
    sensitivity_at_specificity,
    training_copy_family,
)

Z95 = 1.959963984540054


def wilson(k: int, n: int) -> list[float]:
    """The textbook Wilson score interval at 95 %."""
    centre = (k + Z95**2 / 2) / (n + Z95**2)
    half = Z95 * math.sqrt(k * (n - k) / n + Z95**2 / 4) / (n + Z95**2)
    return [centre - half, centre + half]


def pair_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Mann-Whitney: the share of (positive, negative) pairs ordered right, ties counting one half."""
    p, n = np.asarray(positive, np.float64)[:, None], np.asarray(negative, np.float64)[None, :]
    return float(((p > n) + 0.5 * (p == n)).mean())


def reference_figures(positive, negative, found, n_bootstrap: int, seed: int) -> dict:
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    threshold = float(np.percentile(negative, 95.0))
    n_found = int(sum(score > threshold for score in positive))
    rng = np.random.default_rng(seed)
    positive_index = rng.integers(0, len(positive), size=(n_bootstrap, len(positive)))
    negative_index = rng.integers(0, len(negative), size=(n_bootstrap, len(negative)))
    aucs, sensitivities = [], []
    for draw in range(n_bootstrap):
        drawn_positive, drawn_negative = positive[positive_index[draw]], negative[negative_index[draw]]
        aucs.append(pair_auc(drawn_positive, drawn_negative))
        sensitivities.append(float(np.mean(drawn_positive > np.percentile(drawn_negative, 95.0))))
    n_top1 = int(np.sum(found))
    return {
        "sensitivity_at_95_specificity": n_found / len(positive),
        "threshold": threshold,
        "roc_auc": pair_auc(positive, negative),
        "top1": n_top1 / len(positive),
        "n_positive": len(positive),
        "n_negative": len(negative),
        "ci95": {
            "sensitivity_at_95_specificity": wilson(n_found, len(positive)),
            "sensitivity_at_95_specificity_bootstrap": list(np.percentile(sensitivities, [2.5, 97.5])),
            "roc_auc": list(np.percentile(aucs, [2.5, 97.5])),
            "top1": wilson(n_top1, len(positive)),
        },
    }


def flat(value, key: str = "") -> dict:
    """A nested figures dict as {"ci95.roc_auc[0]": number, ...}, for a key-for-key comparison at a tolerance."""
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in flat(item, f"{key}.{name}" if key else name).items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{key}[{i}]").items()}
    return {key: value}


def same_figures(actual: dict, expected: dict, rel: float) -> bool:
    actual, expected = flat(actual), flat(expected)
    assert sorted(actual) == sorted(expected)
    assert actual == pytest.approx(expected, rel=rel, abs=1e-12)
    return True


def tied_scores(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores on a 0.05 grid, so positives tie with negatives and with the 95th percentile (31 negatives: the
    percentile is an order statistic, 0.95 * 30 = 28.5 lies between two)."""
    rng = np.random.default_rng(seed)
    negative = rng.integers(0, 14, size=31) * 0.05
    positive = rng.integers(8, 20, size=17) * 0.05
    positive[:3] = np.sort(negative)[[28, 29, 30]]  # at and around the threshold
    return positive, negative, rng.random(17) < 0.7


@pytest.mark.parametrize("seed", [0, 5])
def test_copy_detection_figures_equal_the_numpy_reference_ties_included(seed):
    positive, negative, found = tied_scores(seed)

    figures = copy_detection_figures(positive, negative, found, n_bootstrap=300, seed=seed)

    assert same_figures(figures, reference_figures(positive, negative, found, 300, seed), rel=1e-12)


def test_float32_scores_give_the_float64_figures_and_seed_0_is_the_default():
    positive, negative, found = tied_scores(1)
    positive32, negative32 = (positive + 1e-3).astype(np.float32), (negative + 1e-3).astype(np.float32)

    figures = copy_detection_figures(positive32, negative32, found, n_bootstrap=200)

    assert same_figures(figures, reference_figures(positive32, negative32, found, 200, 0), rel=1e-12)


def test_the_threshold_is_the_95th_percentile_of_the_negatives_in_float64():
    negative = (np.arange(30) / 29 + 1e-3).astype(np.float32)  # 0.95 * 29 = 27.55: an interpolated threshold
    positive = np.array([0.9, 0.95, 0.96, 0.99], dtype=np.float32)

    sensitivity, threshold = sensitivity_at_specificity(positive, negative)

    expected = float(np.percentile(negative.astype(np.float64), 95.0))
    assert (threshold, sensitivity) == (expected, float(np.mean(positive.astype(np.float64) > expected)))


def test_a_copy_as_close_to_another_original_as_to_its_own_is_not_a_top1_hit():
    rng = np.random.default_rng(0)
    originals = rng.normal(size=(3, 16))
    originals[1] = originals[0]  # two identical originals: their copies tie

    assert copy_retrieval_metrics(originals, originals)["top1"] == pytest.approx(1 / 3)


def test_the_auc_of_an_empty_set_is_refused():
    with pytest.raises(AssertionError):
        accuracy.roc_auc(np.array([]), np.array([0.1, 0.2]))
    with pytest.raises(AssertionError):
        accuracy.roc_auc(np.array([0.1, 0.2]), np.array([]))


def test_a_copy_is_a_top1_hit_against_its_own_row_of_other_originals_not_the_best_of_all_rows():
    rng = np.random.default_rng(2)
    originals = rng.normal(size=(3, 64))
    originals[2] = originals[1] + 0.1 * rng.normal(size=64)  # originals 1 and 2 correlate at about 0.99
    copies = originals.copy()
    copies[0] = originals[0] + rng.normal(size=64)  # its own original at about 0.7, the others near 0

    assert copy_retrieval_metrics(originals, copies)["top1"] == 1.0


def test_pearson_similarity_is_float32_and_float64_embeddings_are_scored_as_the_audit_scores_float32():
    rng = np.random.default_rng(3)
    originals, queries = rng.normal(size=(5, 30)), rng.normal(size=(4, 30))

    scores, _ = best_original_scores(originals, queries)
    rounded, _ = best_original_scores(originals.astype(np.float32), queries.astype(np.float32))

    assert (accuracy.pearson_similarity(queries, originals).dtype, scores.tolist()) == (torch.float32,
                                                                                        rounded.tolist())


def test_best_original_scores_are_float64_correlations():
    rng = np.random.default_rng(1)
    originals = rng.normal(size=(6, 40)).astype(np.float32)
    queries = (originals[[2, 0, 5]] + 0.3 * rng.normal(size=(3, 40))).astype(np.float32)

    scores, index = best_original_scores(originals, queries)

    correlations = np.corrcoef(queries.astype(np.float64), originals.astype(np.float64))[:3, 3:]
    assert (scores.dtype, index.tolist()) == (np.float64, correlations.argmax(axis=1).tolist())
    np.testing.assert_allclose(scores, correlations.max(axis=1), rtol=1e-13, atol=1e-14)


def test_re_identification_with_no_repeated_patient_says_how_many_images_and_patients():
    with pytest.raises(ValueError, match=r"^re-identification needs at least one patient with two images and at least "
                                         r"two patients; got 3 images of 3 patients$"):
        reidentification_auc(np.random.default_rng(0).normal(size=(3, 8)), ["a", "b", "c"])


# ------------------------------------------------------------------------------------------------ the copies


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_copies_follow_seed_and_batch_size_with_seed_0_and_batches_of_64_by_default():
    originals = images(70)
    default = make_copies(originals, "copy")

    assert torch.equal(default, copies_of(originals, training_copy_family("copy"), seed=0, batch_size=64))
    assert torch.equal(make_copies(originals, "copy", seed=3, batch_size=8),
                       copies_of(originals, training_copy_family("copy"), seed=3, batch_size=8))
    # the test means something: another seed, or other batches, give other copies
    assert not torch.equal(default, make_copies(originals, "copy", seed=3))
    assert not torch.equal(default, make_copies(originals, "copy", batch_size=65))
    assert not torch.equal(default, copies_of(originals, training_copy_family("copy"), seed=0, batch_size=65))


def test_copies_of_default_to_seed_0_and_batches_of_64():
    originals = images(70)

    assert torch.equal(copies_of(originals, noisy), copies_of(originals, noisy, seed=0, batch_size=64))
    assert not torch.equal(copies_of(originals, noisy), copies_of(originals, noisy, seed=0, batch_size=65))
    assert not torch.equal(copies_of(originals, noisy), copies_of(originals, noisy, seed=1, batch_size=64))


def test_copies_and_raw_pixels_are_float32_whatever_the_input():
    originals = images(4).double().numpy()

    assert (copies_of(originals, lambda batch, generator: batch * 0.5).dtype, flatten_pixels(originals).dtype) == (
        torch.float32, torch.float32)


@pytest.mark.parametrize(("patients", "has_reid"), [(["a", "a", "b"], True), (["a", "a", "a"], False),
                                                    (["a", "b", "c"], False)])
def test_re_identification_is_scored_exactly_when_some_but_not_all_images_share_a_patient(patients, has_reid):
    originals = images(3)
    seen = []

    def embed_fn(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.dtype)
        return flatten_pixels(batch)

    scores = score_embedding(embed_fn, originals.double().numpy(), {"copy": make_copies(originals, "copy")}, patients)

    assert ("reid_auc" in scores, set(seen)) == (has_reid, {torch.float32})


# ------------------------------------------------------------------------------------ held-out copy accuracy


def noisy(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise of 5-9x the images' sd, its level drawn once a batch: copies' scores overlap the negatives', so no figure
    saturates at 0 or 1 and every copy's score moves every figure; other batches draw other copies."""
    level = 1.5 + torch.rand(1, generator=generator, dtype=batch.dtype)
    return batch + level * torch.randn(batch.shape, generator=generator, dtype=batch.dtype)


def shifted(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return batch + 0.02 * torch.rand(batch.shape, generator=generator, dtype=batch.dtype)


def copy_seed(seed: int, family: str, role: str) -> int:
    """The documented per-family, per-role seed: stable whichever other families are scored."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{family}:{role}".encode()).digest()[:8], "little") & (2**63 - 1)


def reference_heldout(originals, negatives, families, seed: int, batch_size: int, n_bootstrap: int) -> dict:
    flat = originals.flatten(1).double().numpy()
    results = {}
    for name, family in families.items():
        scores = {}
        for role, source in (("originals", originals), ("negatives", negatives)):
            generator = torch.Generator().manual_seed(copy_seed(seed, name, role))
            copies = torch.cat([family(source[start:start + batch_size], generator)
                                for start in range(0, len(source), batch_size)]).flatten(1).double().numpy()
            correlation = np.corrcoef(copies, flat)[:len(copies), len(copies):]
            scores[role] = (correlation.max(axis=1), correlation.argmax(axis=1))
        results[name] = reference_figures(scores["originals"][0], scores["negatives"][0],
                                          scores["originals"][1] == np.arange(len(originals)), n_bootstrap, seed)
    return results


def test_heldout_copy_accuracy_equals_the_reference_with_the_documented_copy_seeds_and_batches():
    originals, negatives = images(70, seed=1), images(24, seed=2)

    result = heldout_copy_accuracy(flatten_pixels, originals, negatives, {"noisy": noisy, "shifted": shifted},
                                   seed=3, batch_size=16, n_bootstrap=150)

    expected = reference_heldout(originals, negatives, {"noisy": noisy, "shifted": shifted}, 3, 16, 150)
    assert (sorted(result), result["target_specificity"], result["n_originals"], result["n_negatives"]) == (
        ["ci_method", "families", "n_negatives", "n_originals", "target_specificity"], 0.95, 70, 24)
    assert same_figures(result["families"], expected, rel=1e-9)
    assert "Wilson score interval" in result["ci_method"] and "percentile bootstrap (150 resamples, copies and " \
        "negatives resampled separately" in result["ci_method"]


def test_heldout_copy_accuracy_defaults_to_seed_0_batches_of_64_and_float32_images():
    originals, negatives = images(70, seed=4).double(), images(21, seed=5).double()
    seen = []

    def embed_fn(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.dtype)
        return flatten_pixels(batch)

    result = heldout_copy_accuracy(embed_fn, originals.numpy(), negatives.numpy(), {"noisy": noisy}, n_bootstrap=100)

    expected = reference_heldout(originals.float(), negatives.float(), {"noisy": noisy}, 0, 64, 100)
    assert set(seen) == {torch.float32} and same_figures(result["families"], expected, rel=1e-9)


def test_one_original_is_enough_and_none_is_refused():
    result = heldout_copy_accuracy(flatten_pixels, images(1), images(20, seed=1), {"noisy": noisy}, n_bootstrap=20)

    assert result["n_originals"] == 1
    with pytest.raises(ValueError, match=r"needs at least one original and 20 negatives for a 95th percentile; got 0 "
                                         r"and 20"):
        heldout_copy_accuracy(flatten_pixels, images(0), images(20, seed=1), {"noisy": noisy})


def test_images_of_two_shapes_are_refused_naming_both():
    with pytest.raises(ValueError, match=r"^originals \(3, 1, 16, 16\) and negatives \(20, 1, 16, 17\) differ in shape "
                                         r"beyond the first axis; give images of one shape \(N, 1, \*spatial\)$"):
        heldout_copy_accuracy(flatten_pixels, images(3), torch.rand(20, 1, 16, 17), {"noisy": noisy})


def test_patient_lists_are_checked_only_together_and_only_for_shared_patients():
    originals, negatives = images(3), images(20, seed=1)
    alone = heldout_copy_accuracy(flatten_pixels, originals, negatives, {"noisy": noisy}, n_bootstrap=20,
                                  original_patients=["p0", "p1", "p2"])
    disjoint = heldout_copy_accuracy(flatten_pixels, originals, negatives, {"noisy": noisy}, n_bootstrap=20,
                                     original_patients=["p0", "p1", "p2"],
                                     negative_patients=[f"q{i}" for i in range(20)])

    assert alone == disjoint
    with pytest.raises(ValueError, match=r"^4 patients are among both originals and negatives \(e.g. \['p0', 'p1', "
                                         r"'p2'\]\)"):
        heldout_copy_accuracy(flatten_pixels, images(4), negatives, {"noisy": noisy},
                              original_patients=["p0", "p1", "p2", "p3"],
                              negative_patients=["p3", "p2", "p1", "p0", *(f"q{i}" for i in range(16))])


@pytest.mark.parametrize(("role", "message"), [("originals", "returned 3 of 3 images unchanged"),
                                               ("negatives", "returned 20 of 20 images unchanged")])
def test_a_family_that_leaves_one_set_unchanged_is_named(role, message):
    originals, negatives = 0.6 + 0.4 * images(3), 0.4 * images(20, seed=1)

    def bright_only(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:  # alters pixels above 0.5
        return torch.where(batch > 0.5, batch * 0.9, batch)

    def dark_only(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:  # alters pixels below 0.5
        return torch.where(batch < 0.5, batch * 0.9, batch)

    family = {"originals": dark_only, "negatives": bright_only}[role]
    with pytest.raises(ValueError, match=f"^copy family 'partial' {message}: a copy family must alter every image, "
                                         "or its figures measure exact duplicates$"):
        heldout_copy_accuracy(flatten_pixels, originals, negatives, {"partial": family})


def test_a_family_that_changes_the_shape_or_makes_non_finite_values_is_named():
    originals, negatives = images(3), images(20, seed=1)
    with pytest.raises(ValueError, match=r"^copy family 'crop' changed the image shape \(3, 1, 16, 16\) to "
                                         r"\(3, 1, 15, 15\)$"):
        heldout_copy_accuracy(flatten_pixels, originals, negatives, {"crop": lambda b, g: b[..., 1:, 1:]})
    with pytest.raises(ValueError, match=r"^copy family 'nan' made non-finite values$"):
        heldout_copy_accuracy(flatten_pixels, originals, negatives, {"nan": lambda b, g: b / 0.0 - b / 0.0})


def test_constant_embeddings_name_at_most_ten_rows():
    rows = np.random.default_rng(0).normal(size=(14, 5))
    rows[:11] = 1.0
    with pytest.raises(ValueError, match=r"^11 embeddings are constant or not finite \(rows \[0, 1, 2, 3, 4, 5, 6, 7, 8, "
                                         r"9\]\)"):
        accuracy.pearson_similarity(rows, rows)


def test_the_raw_pixel_baseline_is_scored_on_copies_of_the_seed_and_batch_size_given_seed_0_and_64_by_default():
    from raymem.models.detector import build_detector

    coarse = torch.rand(70, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    originals = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear")
    patients = [f"p{i // 2}" for i in range(70)]
    model = build_detector("tiny", spatial_dims=2)

    def raw_pixel(seed: int, batch_size: int) -> dict:
        copies = {level: make_copies(originals, level, seed=seed, batch_size=batch_size)
                  for level in ("copy", "copy_strong")}
        return {f"raw_pixel/{k}": v for k, v in score_embedding(flatten_pixels, originals, copies, patients).items()}

    default = accuracy.accuracy_with_baselines(model, originals, patients)
    given = accuracy.accuracy_with_baselines(model, originals, patients, seed=2, batch_size=16)

    assert {k: v for k, v in default.items() if k.startswith("raw_pixel/")} == raw_pixel(0, 64)
    assert {k: v for k, v in given.items() if k.startswith("raw_pixel/")} == raw_pixel(2, 16) != raw_pixel(0, 64)


def test_constant_embeddings_are_refused_naming_their_rows():
    rows = np.random.default_rng(0).normal(size=(14, 5))
    rows[[1, 12]] = 7.0
    with pytest.raises(ValueError, match=r"^2 embeddings are constant or not finite \(rows \[1, 12\]\): Pearson "
                                         r"correlation is undefined for them; check the images and the detector$"):
        accuracy.pearson_similarity(rows, rows)
