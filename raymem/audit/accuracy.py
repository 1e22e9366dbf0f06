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
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from raymem.audit import metrics
from raymem.models.copy_transforms import TRANSFORM_PRESETS, random_transform
from raymem.models.detector import CopyDetector, embed
from raymem.search.kernel import find_invalid_rows, standardize

EmbedFn = Callable[[torch.Tensor], "np.ndarray | torch.Tensor"]
COPY_LEVELS = ("copy", "copy_strong")


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
    images = torch.as_tensor(images, dtype=torch.float32)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    bounds = TRANSFORM_PRESETS[level]
    batches = [images[start : start + batch_size] for start in range(0, len(images), batch_size)]
    return torch.cat([random_transform(batch, bounds, generator) for batch in batches])


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
    embed_fn: (n, C, *spatial) -> (n, d). "reid_auc" is left out when no patient has two images.
    """
    originals = embed_fn(torch.as_tensor(images, dtype=torch.float32))
    scores = {}
    for level, level_copies in copies.items():
        for name, value in copy_retrieval_metrics(originals, embed_fn(level_copies)).items():
            scores[f"{level}_{name}"] = value
    if len(set(patient_ids)) < len(patient_ids):
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


def _standardized(vectors: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(n, d) -> (n, d) float32 rows centred and L2-normalised as the audit's search does; invalid rows raise."""
    rows = torch.as_tensor(vectors, dtype=torch.float32)
    invalid = torch.nonzero(find_invalid_rows(rows)).flatten()
    if len(invalid):
        raise ValueError(
            f"{len(invalid)} embeddings are constant or not finite (rows {invalid[:10].tolist()}): "
            "Pearson correlation is undefined for them; check the images and the detector"
        )
    return standardize(rows)
