"""How well an embedding finds copies and re-identifies patients, measured on held-out images.

Any embedding function is scored by the same code, so the detector is compared with two baselines:
raw-pixel Pearson correlation (the flattened pixels are the "embedding") and a randomly initialised encoder of the
detector's architecture. Similarity is the audit's: Pearson correlation (centre each vector, L2-normalise, dot).

- Copy retrieval, per copy level of ``raymem.models.copy_transforms.TRANSFORM_PRESETS`` ("copy": rotation up to
  +-5 degrees, flip p=0.5, contrast x0.9-1.1, brightness +-5 % of range, noise sigma up to 2 % of range;
  "copy_strong": rotation up to +-15 degrees, flip p=0.5, crop keeping 85-100 % of each side, contrast x0.75-1.33,
  brightness +-10 %, gamma 0.75-1.33, noise sigma up to 5 %, blur sigma up to 1 px with p=0.5). Each image is
  transformed and searched among all N originals. ``top1``: the fraction whose original scores strictly higher than
  every other original. ``auc``: ROC AUC of the N copy pairs (copy i, original i) against the N(N-1) non-copy pairs
  (copy i, original j != i), other images of the same patient included.
- Re-identification AUC: over all pairs of distinct originals, same-patient pairs against different-patient pairs.
- Held-out copy accuracy (``heldout_copy_accuracy``): copies made by families the detector never trains on
  (``raymem.models.heldout_copies``: elastic deformation, resolution loss, local texture loss, and the LDM's own
  autoencoder round trip), scored as an audit scores them: each copy's best correlation among all originals against
  the same statistic for novel images of other patients under the same family. Sensitivity at 95 % specificity
  (Wilson interval) and ROC AUC (stratified bootstrap interval) per family.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from raymem.audit import metrics
from raymem.audit.statistics import BOOTSTRAP_DRAWS, wilson_interval
from raymem.models.copy_transforms import TRANSFORM_PRESETS, random_transform
from raymem.models.detector import CopyDetector, embed
from raymem.models.heldout_copies import AUTOENCODER_FAMILY, HELDOUT_FAMILIES, CopyFamily, deterministic_family
from raymem.search.kernel import find_invalid_rows, standardize

EmbedFn = Callable[[torch.Tensor], "np.ndarray | torch.Tensor"]
COPY_LEVELS = ("copy", "copy_strong")
TARGET_SPECIFICITY = 0.95  # held-out copy accuracy: the threshold is this quantile of the negatives' scores
MIN_NEGATIVES = 20  # one negative is 1 / m of them: fewer than 20 cannot resolve a 5 % false-positive rate


def pearson_similarity(queries: np.ndarray | torch.Tensor, references: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Pearson correlation of every query row (n, d) with every reference row (m, d): (n, m) float32.

    Computed on the queries' device (numpy arrays: CPU).
    """
    queries = _standardized(queries)
    return queries @ _standardized(references).to(queries.device).T


def roc_auc(positive_scores: np.ndarray | torch.Tensor, negative_scores: np.ndarray | torch.Tensor) -> float:
    """``raymem.audit.metrics.roc_auc`` for tensors or arrays of any shape."""
    positive = torch.as_tensor(positive_scores).detach().cpu().double().numpy().ravel()
    negative = torch.as_tensor(negative_scores).detach().cpu().double().numpy().ravel()
    assert len(positive) and len(negative), (len(positive), len(negative))
    return metrics.roc_auc(positive, negative)


def copy_retrieval_metrics(
    original_embeddings: np.ndarray | torch.Tensor, copy_embeddings: np.ndarray | torch.Tensor
) -> dict[str, float]:
    """{"top1", "auc"} of copies (N, d) searched among originals (N, d); row i of each is the same image."""
    similarity = pearson_similarity(copy_embeddings, original_embeddings)  # row: a copy; column: an original
    copy_scores = similarity.diagonal()
    is_other = ~torch.eye(len(similarity), dtype=torch.bool, device=similarity.device)
    best_other = similarity.masked_fill(~is_other, float("-inf")).amax(dim=1)
    return {
        "top1": int((copy_scores > best_other).sum()) / len(similarity),
        "auc": roc_auc(copy_scores, similarity[is_other]),
    }


def reidentification_auc(embeddings: np.ndarray | torch.Tensor, patient_ids: Sequence[Any]) -> float:
    """ROC AUC of same-patient pairs against different-patient pairs among all pairs of distinct rows of (N, d)."""
    similarity = pearson_similarity(embeddings, embeddings)
    codes = torch.from_numpy(np.unique(np.asarray(patient_ids), return_inverse=True)[1].reshape(-1))
    codes = codes.to(similarity.device)
    assert len(codes) == len(similarity), (len(codes), len(similarity))
    upper = torch.triu(torch.ones_like(similarity, dtype=torch.bool), diagonal=1)
    same = (codes[:, None] == codes[None, :]) & upper
    different = (codes[:, None] != codes[None, :]) & upper
    if not bool(same.any()) or not bool(different.any()):
        raise ValueError(
            "re-identification needs at least one patient with two images and at least two patients; "
            f"got {len(codes)} images of {int(codes.max()) + 1} patients"
        )
    return roc_auc(similarity[same], similarity[different])


def make_copies(
    images: np.ndarray | torch.Tensor, level: str, *, seed: int = 0, batch_size: int = 64
) -> torch.Tensor:
    """Copies (N, C, *spatial) of ``images`` under the bounded transforms of ``TRANSFORM_PRESETS[level]``.

    Transformed in batches of ``batch_size`` on the images' device; the same (seed, batch_size) gives the same copies.
    """
    return copies_of(images, training_copy_family(level), seed=seed, batch_size=batch_size)


def training_copy_family(level: str) -> CopyFamily:
    """The copy family of ``TRANSFORM_PRESETS[level]`` (the detector's own transform family) as a callable."""
    bounds = TRANSFORM_PRESETS[level]
    return lambda images, generator: random_transform(images, bounds, generator)


def copies_of(
    images: np.ndarray | torch.Tensor, family: CopyFamily, *, seed: int = 0, batch_size: int = 64
) -> torch.Tensor:
    """Copies (N, C, *spatial) float32 of ``images`` (N, C, *spatial) under a copy family, batch by batch.

    One generator on the images' device, seeded with ``seed``, serves every batch: the same (seed, batch_size) gives
    the same copies.
    """
    images = torch.as_tensor(images, dtype=torch.float32)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    batches = [images[start : start + batch_size] for start in range(0, len(images), batch_size)]
    return torch.cat([family(batch, generator) for batch in batches])


def flatten_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The raw-pixel baseline's "embedding": images (N, C, *spatial) -> (N, C * prod(spatial)) float32."""
    return torch.as_tensor(images, dtype=torch.float32).flatten(1)


def score_embedding(
    embed_fn: EmbedFn,
    images: np.ndarray | torch.Tensor,
    copies: Mapping[str, torch.Tensor],
    patient_ids: Sequence[Any],
) -> dict[str, float]:
    """Accuracy of one embedding function: {f"{level}_top1", f"{level}_auc"} per copy level, and "reid_auc".

    images: (N, C, *spatial) originals; copies: level -> (N, C, *spatial) copies from ``make_copies``;
    embed_fn: (n, C, *spatial) -> (n, d). "reid_auc" is left out when no patient has two images or
    all are one patient's.
    """
    originals = embed_fn(torch.as_tensor(images, dtype=torch.float32))
    scores = {}
    for level, level_copies in copies.items():
        for name, value in copy_retrieval_metrics(originals, embed_fn(level_copies)).items():
            scores[f"{level}_{name}"] = value
    if 1 < len(set(patient_ids)) < len(patient_ids):
        scores["reid_auc"] = reidentification_auc(originals, patient_ids)
    return scores


def accuracy_with_baselines(
    model: CopyDetector,
    images: np.ndarray | torch.Tensor,
    patient_ids: Sequence[Any],
    *,
    copy_levels: Sequence[str] = COPY_LEVELS,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """Score the detector, the raw-pixel baseline and a randomly initialised copy of the detector on the same copies.

    images: (N, 1, *spatial) held-out originals (patients never seen in training); patient_ids: (N,).
    Returns plain floats keyed "<embedding>/<metric>", embedding in {"detector", "raw_pixel", "random_encoder"},
    metric as in ``score_embedding`` (e.g. "detector/copy_strong_auc"), ready for ``mlflow.log_metrics``.
    """
    copies = {level: make_copies(images, level, seed=seed, batch_size=batch_size) for level in copy_levels}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random_encoder = CopyDetector(**model.config).to(next(model.parameters()).device)
    embedders: dict[str, EmbedFn] = {
        "detector": functools.partial(embed, model, batch_size=batch_size),
        "raw_pixel": flatten_pixels,
        "random_encoder": functools.partial(embed, random_encoder, batch_size=batch_size),
    }
    return {
        f"{name}/{metric}": value
        for name, embed_fn in embedders.items()
        for metric, value in score_embedding(embed_fn, images, copies, patient_ids).items()
    }


def sensitivity_at_specificity(
    positive_scores: np.ndarray, negative_scores: np.ndarray, specificity: float = TARGET_SPECIFICITY
) -> tuple[float, float]:
    """(sensitivity, threshold): threshold = ``numpy.percentile`` (linear interpolation) of the negatives' scores at
    100 * specificity; sensitivity = the share of positive scores strictly above it. Scores: (n,) and (m,)."""
    threshold = float(np.percentile(np.asarray(negative_scores, dtype=np.float64), 100.0 * specificity))
    return float(np.mean(np.asarray(positive_scores) > threshold)), threshold


def best_original_scores(
    original_embeddings: np.ndarray | torch.Tensor, query_embeddings: np.ndarray | torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's highest Pearson correlation among the originals, and its index (ties: lowest index).

    original_embeddings (N, d), query_embeddings (n, d) -> scores (n,) float64, indices (n,) int64. Computed in float64,
    so no score near a threshold needs recomputing.
    """
    similarity = _standardized(query_embeddings, torch.float64) @ _standardized(original_embeddings, torch.float64).T
    best = similarity.max(dim=1)
    return best.values.cpu().numpy(), best.indices.cpu().numpy()


def copy_detection_figures(
    positive_scores: np.ndarray,
    negative_scores: np.ndarray,
    own_original_found: np.ndarray,
    *,
    n_bootstrap: int = BOOTSTRAP_DRAWS,
    seed: int = 0,
) -> dict[str, Any]:
    """Sensitivity at 95 % specificity, ROC AUC and top-1 of copies, with 95 % intervals (see ``ci_method``).

    positive_scores (n,): each copy's best correlation among the originals; negative_scores (m,): the same for novel
    images; own_original_found (n,) bool: the copy's best match is its own original. The sensitivity's Wilson interval
    takes the threshold as given; ``sensitivity_at_95_specificity_bootstrap`` re-estimates the threshold in each
    resample, so it also holds the threshold's own uncertainty from m negatives.
    """
    positive = np.asarray(positive_scores, dtype=np.float64)
    negative = np.asarray(negative_scores, dtype=np.float64)
    sensitivity, threshold = sensitivity_at_specificity(positive, negative)
    n_positive, n_negative = len(positive), len(negative)
    n_found = int(np.sum(positive > threshold))
    n_top1 = int(np.sum(own_original_found))
    rng = np.random.default_rng(seed)
    positive_draws = positive[rng.integers(0, n_positive, size=(n_bootstrap, n_positive))]
    negative_draws = negative[rng.integers(0, n_negative, size=(n_bootstrap, n_negative))]
    ranks = rankdata(np.concatenate([positive_draws, negative_draws], axis=1), axis=1)
    auc_draws = (ranks[:, :n_positive].sum(axis=1) - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)
    thresholds = np.percentile(negative_draws, 100.0 * TARGET_SPECIFICITY, axis=1)
    sensitivity_draws = np.mean(positive_draws > thresholds[:, None], axis=1)
    tails = [2.5, 97.5]
    return {
        "sensitivity_at_95_specificity": sensitivity,
        "threshold": threshold,
        "roc_auc": metrics.roc_auc(positive, negative),
        "top1": n_top1 / n_positive,
        "n_positive": n_positive,
        "n_negative": n_negative,
        "ci95": {
            "sensitivity_at_95_specificity": list(wilson_interval(n_found, n_positive)),
            "sensitivity_at_95_specificity_bootstrap": np.percentile(sensitivity_draws, tails).tolist(),
            "roc_auc": np.percentile(auc_draws, tails).tolist(),
            "top1": list(wilson_interval(n_top1, n_positive)),
        },
    }


def heldout_copy_accuracy(
    embed_fn: EmbedFn,
    originals: np.ndarray | torch.Tensor,
    negatives: np.ndarray | torch.Tensor,
    families: Mapping[str, CopyFamily] | None = None,
    *,
    autoencoder_round_trip: Callable[[torch.Tensor], torch.Tensor] | None = None,
    original_patients: Sequence[Any] | None = None,
    negative_patients: Sequence[Any] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    n_bootstrap: int = BOOTSTRAP_DRAWS,
) -> dict[str, Any]:
    """How well an embedding finds copies made by families it never trained on, scored as the audit scores them.

    embed_fn: images (n, 1, *spatial) float32 tensor -> embeddings (n, d) (numpy or torch).
    originals: (N, 1, *spatial) float32, the images that may be copied (e.g. a generator's training images, one per
        patient so that copies are independent). negatives: (M, 1, *spatial) float32, images of other patients, M >= 20.
    families: name -> copy family ``(images, generator) -> copies``; None: ``HELDOUT_FAMILIES``. Pass
        ``{"copy": training_copy_family("copy"), ...}`` to score the training transforms the same way.
    autoencoder_round_trip: images (n, 1, *spatial) -> reconstructions, e.g.
        ``raymem.models.heldout_copies.autoencoder_round_trip(ldm)``; adds the family "autoencoder".
    original_patients (N,), negative_patients (M,): when both are given, a patient in both raises.

    Per family, every original and every negative is copied; each copy's score is its best Pearson correlation among
    the N originals' embeddings (positives: copies of originals; negatives: copies of the negatives). The threshold is
    the 95th percentile of the negatives' scores and a copy is found when its score is strictly above it.
    Returns a plain dict for metrics.json: {"families": {name: copy_detection_figures(...)}, "target_specificity",
    "n_originals", "n_negatives", "ci_method"}. A family that returns any image unchanged raises ValueError.
    """
    originals = torch.as_tensor(originals, dtype=torch.float32)
    negatives = torch.as_tensor(negatives, dtype=torch.float32)
    if originals.shape[1:] != negatives.shape[1:]:
        raise ValueError(f"originals {tuple(originals.shape)} and negatives {tuple(negatives.shape)} differ in shape "
                         "beyond the first axis; give images of one shape (N, 1, *spatial)")
    if len(originals) == 0 or len(negatives) < MIN_NEGATIVES:
        raise ValueError(f"held-out copy accuracy needs at least one original and {MIN_NEGATIVES} negatives for a "
                         f"95th percentile; got {len(originals)} and {len(negatives)}")
    if original_patients is not None and negative_patients is not None:
        shared = set(original_patients) & set(negative_patients)
        if shared:
            raise ValueError(f"{len(shared)} patients are among both originals and negatives (e.g. "
                             f"{sorted(map(str, shared))[:3]}): negatives must be other patients' images")
    families = dict(HELDOUT_FAMILIES if families is None else families)
    if autoencoder_round_trip is not None:
        families[AUTOENCODER_FAMILY] = deterministic_family(autoencoder_round_trip)
    original_embeddings = embed_fn(originals)
    results = {}
    for name, family in families.items():
        positive_copies = _checked_copies(name, originals, family, seed=_copy_seed(seed, name, "originals"),
                                          batch_size=batch_size)
        negative_copies = _checked_copies(name, negatives, family, seed=_copy_seed(seed, name, "negatives"),
                                          batch_size=batch_size)
        positive_scores, best_index = best_original_scores(original_embeddings, embed_fn(positive_copies))
        negative_scores, _ = best_original_scores(original_embeddings, embed_fn(negative_copies))
        results[name] = copy_detection_figures(positive_scores, negative_scores,
                                               best_index == np.arange(len(originals)), n_bootstrap=n_bootstrap,
                                               seed=seed)
    return {
        "families": results,
        "target_specificity": TARGET_SPECIFICITY,
        "n_originals": len(originals),
        "n_negatives": len(negatives),
        "ci_method": (
            "sensitivity_at_95_specificity and top1: Wilson score interval over copies, threshold taken as given; "
            f"sensitivity_at_95_specificity_bootstrap and roc_auc: percentile bootstrap ({n_bootstrap} resamples, "
            "copies and negatives resampled separately, the threshold re-estimated in each)"
        ),
    }


def _copy_seed(seed: int, family: str, role: str) -> int:
    """The seed of one family's copies of one image set: stable whichever other families are scored with it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{family}:{role}".encode()).digest()[:8], "little") & (2**63 - 1)


def _checked_copies(name: str, images: torch.Tensor, family: CopyFamily, *, seed: int, batch_size: int) -> torch.Tensor:
    """``copies_of`` images (n, C, *spatial), refusing a family that changes the shape, leaves an image unchanged or
    makes non-finite values."""
    copies = copies_of(images, family, seed=seed, batch_size=batch_size)
    if copies.shape != images.shape:
        raise ValueError(f"copy family {name!r} changed the image shape {tuple(images.shape)} to {tuple(copies.shape)}")
    unchanged = (copies == images).flatten(1).all(dim=1)
    if bool(unchanged.any()):
        raise ValueError(f"copy family {name!r} returned {int(unchanged.sum())} of {len(images)} images unchanged: "
                         "a copy family must alter every image, or its figures measure exact duplicates")
    if not bool(torch.isfinite(copies).all()):
        raise ValueError(f"copy family {name!r} made non-finite values")
    return copies


def _standardized(vectors: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, d) -> (n, d) rows in ``dtype`` centred and L2-normalised as the audit's search does; invalid rows raise."""
    rows = torch.as_tensor(vectors, dtype=torch.float32)
    invalid = torch.nonzero(find_invalid_rows(rows)).flatten()
    if len(invalid):
        raise ValueError(
            f"{len(invalid)} embeddings are constant or not finite (rows {invalid[:10].tolist()}): "
            "Pearson correlation is undefined for them; check the images and the detector"
        )
    return standardize(rows, dtype)
