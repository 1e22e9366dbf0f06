"""Sample-quality figures logged beside memorization: Frechet distance and MS-SSIM diversity (no Ray).

- ``frechet_distance``: the Frechet distance between Gaussians fitted to two sets of embeddings. FID's Inception
  network needs downloaded weights, so raymem computes it in the copy detector's embedding space (DESIGN.md).
- ``fixed_reference``, ``real_baseline_sample`` and ``frechet_figures``: what a sweep's Frechet distances are
  measured against. With tens of samples in d = 32 the estimator's small-sample bias is larger than most
  differences between generators, and it shrinks as either set grows; a trial scored against its own training
  images therefore scores lower the more it copies them, and trials of different sizes are incomparable. So every
  trial of a study is scored against one held-out reference, and beside each score stands the score of a real
  sample of the synthetic set's size against that reference: the floor a perfect generator would reach at that size.
- ``ms_ssim_diversity``: the mean multi-scale SSIM over pairs of synthetic samples, the diversity measure of the
  medical LDM literature (Pinaya et al. 2022); lower means more diverse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_ms_ssim

# Wang et al. 2003's five scale weights (MONAI's default), finest scale first; small images keep a prefix of them.
MS_SSIM_SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# A 7-pixel window (+-2 sigma of the standard sigma 1.5) instead of the standard 11 leaves 32x32 images three
# scales instead of two, and 64x64 images four instead of three.
MS_SSIM_KERNEL_SIZE = 7
MS_SSIM_KERNEL_SIGMA = 1.5
MS_SSIM_BATCH_VOXELS = 2**22  # voxels per image batch (16 MiB of float32) when the pairs are scored in batches


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to embeddings a (n, d) and b (m, d), computed in float64.

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with sample covariances (ddof=1).
    Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b, which equal those of the
    symmetric positive semi-definite S_a^(1/2) S_b S_a^(1/2); ``numpy.linalg.eigh`` gives them accurately even when
    n, m < d makes the covariances singular, so no eps*I regularisation (pytorch-fid's fallback for
    ``scipy.linalg.sqrtm``) is needed. Eigenvalues and the result are clipped at 0 against rounding.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(
            "frechet_distance needs two embedding arrays (n, d) and (m, d) with the same d and n, m >= 2; "
            f"got shapes {a.shape} and {b.shape}"
        )
    for name, embeddings in (("a", a), ("b", b)):
        n_invalid = int((~np.isfinite(embeddings)).sum())
        if n_invalid:
            raise ValueError(
                f"frechet_distance: embeddings {name} {embeddings.shape} hold {n_invalid} non-finite values"
            )
    mean_difference = a.mean(axis=0) - b.mean(axis=0)
    covariance_a = np.cov(a, rowvar=False, ddof=1).reshape(a.shape[1], a.shape[1])  # reshape: d = 1 gives a 0-d array
    covariance_b = np.cov(b, rowvar=False, ddof=1).reshape(b.shape[1], b.shape[1])
    sqrt_covariance_a = _psd_sqrt(covariance_a)
    product_eigenvalues = np.linalg.eigvalsh(sqrt_covariance_a @ covariance_b @ sqrt_covariance_a)
    trace_sqrt_product = np.sqrt(np.clip(product_eigenvalues, 0.0, None)).sum()
    distance = mean_difference @ mean_difference + np.trace(covariance_a) + np.trace(covariance_b)
    return max(float(distance - 2.0 * trace_sqrt_product), 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite (d, d) matrix; negative rounding clipped."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


# Held-out splits in order of preference for the Frechet reference: the first with at least 2 rows is used.
FD_REFERENCE_SPLITS = ("test", "val")


@dataclass(frozen=True)
class FrechetReference:
    """The fixed real embeddings every trial of a study measures its Frechet distance against.

    split: the held-out split they come from. sample_ids (r,) and embeddings (r, d): the reference rows, in
    sample_id order. spare (q, d): the held-out rows of patients with no image in the reference (the rest of its
    split and the other held-out splits), in sample_id order: where the real-vs-real baseline is drawn from first,
    so that, like a generator's samples, it is independent of the reference.
    """

    split: str
    sample_ids: tuple[str, ...]
    embeddings: np.ndarray
    spare: np.ndarray

    @property
    def size(self) -> int:
        return len(self.sample_ids)


def fixed_reference(
    held_out: Mapping[str, tuple[Sequence[str], Sequence[str], np.ndarray]], size: int | None, seed: int
) -> FrechetReference:
    """The reference of a study: ``size`` rows (all when None or when the split holds fewer) of its held-out split.

    held_out: split name -> (sample_ids (m,), patient_ids (m,), embeddings (m, d)); splits absent or with fewer
    than 2 rows are skipped. The reference split is the first of ``FD_REFERENCE_SPLITS`` present. Its rows are put
    in sample_id order before a permutation drawn with ``seed`` picks ``size`` of them, so the reference depends
    only on the embeddings, ``size`` and ``seed``, never on the order the files were read in: every trial of a
    study, reading the study's embeddings, gets the same one.
    """
    usable = {split: _in_id_order(*rows) for split, rows in held_out.items()
              if split in FD_REFERENCE_SPLITS and len(rows[0]) >= 2}
    if not usable:
        raise ValueError(f"fixed_reference needs a held-out split ({' or '.join(FD_REFERENCE_SPLITS)}) with at least "
                         f"2 embeddings; got splits {_row_counts(held_out)}: give the study a val or test split")
    if size is not None and size < 2:
        raise ValueError(f"fixed_reference: size must be at least 2 (a covariance needs two rows) or None; got {size}")
    split = next(name for name in FD_REFERENCE_SPLITS if name in usable)
    sample_ids, patient_ids, embeddings = usable[split]
    chosen = np.zeros(len(sample_ids), dtype=bool)
    chosen[np.random.default_rng(seed).permutation(len(sample_ids))[:size]] = True
    reference_patients = set(patient_ids[chosen])
    spare_ids, spare = [], []
    for ids, patients, rows in usable.values():
        independent = np.array([patient not in reference_patients for patient in patients], dtype=bool)
        spare_ids.append(ids[independent])
        spare.append(rows[independent])
    spare_ids, spare = np.concatenate(spare_ids), np.concatenate(spare)
    return FrechetReference(split=split, sample_ids=tuple(sample_ids[chosen]), embeddings=embeddings[chosen],
                            spare=spare[np.argsort(spare_ids.astype(str), kind="stable")])


def real_baseline_sample(
    reference: FrechetReference, n: int, train: tuple[Sequence[str], np.ndarray], seed: int
) -> tuple[np.ndarray, str]:
    """A real sample (n, d) to score against ``reference`` beside a synthetic set of n rows, and where it came from.

    Drawn without replacement with ``seed`` from ``reference.spare`` ("held-out") when it holds n rows, else from
    train = (sample_ids (m,), embeddings (m, d)), the study's training images ("train": patients outside every
    held-out split, so also independent of the reference). Neither holding n rows: every row of the larger, which
    is then fewer than n (the caller records the size). Rows are put in sample_id order first, so the sample, like
    the reference, depends only on the embeddings, n and ``seed``.
    """
    if n < 2:
        raise ValueError(f"real_baseline_sample: n must be at least 2 (a covariance needs two rows); got {n}")
    pools = [(reference.spare, "held-out"), (_in_id_order(*train)[-1], "train")]
    pool, source = next(((rows, name) for rows, name in pools if len(rows) >= n),
                        max(pools, key=lambda pool: len(pool[0])))
    picked = np.sort(np.random.default_rng(seed).permutation(len(pool))[:n])
    return pool[picked], source


def frechet_figures(synthetic: np.ndarray, reference: FrechetReference, baseline: np.ndarray) -> dict[str, float]:
    """A synthetic set's Frechet distance to the fixed reference, and the real-vs-real baseline beside it.

    synthetic (n, d): the generator's embeddings; baseline (n, d): ``real_baseline_sample``'s real sample of the same
    size. Returns {"frechet_distance", "frechet_distance_real_baseline", "fd_reference_size", "fd_real_baseline_size"}.
    A generator as good as the real data scores near the baseline at any n; a gap above it is the generator's.
    """
    return {
        "frechet_distance": frechet_distance(synthetic, reference.embeddings),
        "frechet_distance_real_baseline": frechet_distance(baseline, reference.embeddings),
        "fd_reference_size": reference.size,
        "fd_real_baseline_size": len(baseline),
    }


def _in_id_order(sample_ids: Sequence[str], *columns: Sequence) -> tuple[np.ndarray, ...]:
    """(sample_ids (m,), *columns (m, ...)) sorted by sample_id; the ids must be unique."""
    ids = np.asarray(sample_ids, dtype=object)
    arrays = [np.asarray(column) for column in columns]
    assert all(len(array) == len(ids) for array in arrays), (ids.shape, [array.shape for array in arrays])
    assert len(set(ids)) == len(ids), "sample_ids must be unique"
    order = np.argsort(ids.astype(str), kind="stable")
    return ids[order], *(array[order] for array in arrays)


def _row_counts(held_out: Mapping[str, tuple[Sequence[str], np.ndarray]]) -> dict[str, int]:
    return {split: len(rows[0]) for split, rows in held_out.items()}


def ms_ssim_diversity(
    images: np.ndarray, value_range: tuple[float, float], *, max_pairs: int = 256, seed: int = 0
) -> float:
    """Mean MS-SSIM over distinct pairs of images (N, C, *spatial), 2D or 3D; lower means more diverse.

    All N(N-1)/2 pairs are scored when there are at most ``max_pairs``, else ``max_pairs`` distinct pairs drawn
    without replacement with ``seed``. MONAI's ``compute_ms_ssim`` scores them with data_range =
    value_range[1] - value_range[0], a Gaussian window of ``MS_SSIM_KERNEL_SIZE`` pixels (sigma
    ``MS_SSIM_KERNEL_SIGMA``), and the first L of ``MS_SSIM_SCALE_WEIGHTS``, renormalised to sum to 1.

    Scales: L is the largest of 1..5 for which, with s the smallest spatial side and k the window,
    s // 2**(L-1) >= k (the window fits the coarsest scale, which is halved L-1 times) and s // max(1, L-1)**2 > k-1
    (MONAI's size check). For k = 7: 32 pixels give L = 3, 64 give L = 4, 16 give L = 2.

    Finiteness: a scale's contrast (or the coarsest scale's SSIM) can be negative, and a negative base under a
    fractional weight is NaN. MONAI 1.6.1 clamps every per-scale value at 0 (``relu``) before the weighted product,
    so such a pair scores 0 and the mean stays finite; the result is checked to be finite.
    """
    images = np.asarray(images)
    spatial_dims = images.ndim - 2
    if spatial_dims not in (2, 3) or len(images) < 2:
        raise ValueError(
            "ms_ssim_diversity needs at least two 2D or 3D images (N, C, *spatial) with N >= 2; "
            f"got shape {images.shape}"
        )
    n_invalid = int((~np.isfinite(images)).sum())
    if n_invalid:
        raise ValueError(f"ms_ssim_diversity: images {images.shape} hold {n_invalid} non-finite values")
    data_range = float(value_range[1]) - float(value_range[0])
    if not data_range > 0:
        raise ValueError(f"ms_ssim_diversity: value_range must be (low, high) with high > low; got {value_range}")
    if max_pairs < 1:
        raise ValueError(f"ms_ssim_diversity: max_pairs must be at least 1; got {max_pairs}")
    weights = _scale_weights(images.shape[2:])
    first, second = _pair_indices(len(images), max_pairs, seed)
    image_tensor = torch.as_tensor(images, dtype=torch.float32)
    pairs_per_batch = max(1, MS_SSIM_BATCH_VOXELS // math.prod(images.shape[1:]))
    scores = []
    for start in range(0, len(first), pairs_per_batch):
        batch = slice(start, start + pairs_per_batch)
        scores.append(
            compute_ms_ssim(
                image_tensor[first[batch]],
                image_tensor[second[batch]],
                spatial_dims=spatial_dims,
                data_range=data_range,
                kernel_size=MS_SSIM_KERNEL_SIZE,
                kernel_sigma=MS_SSIM_KERNEL_SIGMA,
                weights=weights,
            ).reshape(-1)
        )
    mean_score = float(torch.cat(scores).double().mean())
    assert math.isfinite(mean_score), f"MS-SSIM of {len(first)} pairs of images {images.shape} is {mean_score}"
    return mean_score


def _scale_weights(spatial_shape: tuple[int, ...]) -> tuple[float, ...]:
    """The first L of ``MS_SSIM_SCALE_WEIGHTS``, renormalised, for the largest L the smallest side allows."""
    smallest_side = min(spatial_shape)
    n_scales = max(
        (
            n
            for n in range(1, len(MS_SSIM_SCALE_WEIGHTS) + 1)
            if smallest_side // 2 ** (n - 1) >= MS_SSIM_KERNEL_SIZE
            and smallest_side // max(1, n - 1) ** 2 > MS_SSIM_KERNEL_SIZE - 1
        ),
        default=0,
    )
    if n_scales == 0:
        raise ValueError(
            f"ms_ssim_diversity needs every spatial side >= {MS_SSIM_KERNEL_SIZE} pixels (the SSIM window); "
            f"got spatial shape {spatial_shape}"
        )
    weights = MS_SSIM_SCALE_WEIGHTS[:n_scales]
    return tuple(weight / sum(weights) for weight in weights)


def _pair_indices(n_images: int, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pairs (first[p] < second[p]) of n_images: all N(N-1)/2, or max_pairs drawn with seed.

    Pair codes k enumerate the pairs column by column, (0,1), (0,2), (1,2), (0,3), ...; the pair of code k has
    second = (1 + isqrt(1 + 8k)) // 2 and first = k - second (second - 1) / 2, so large N needs no pair table.
    """
    n_pairs = n_images * (n_images - 1) // 2
    if n_pairs <= max_pairs:
        codes = np.arange(n_pairs)
    else:
        codes = np.sort(np.random.default_rng(seed).choice(n_pairs, size=max_pairs, replace=False))
    second = np.array([(1 + math.isqrt(1 + 8 * int(code))) // 2 for code in codes], dtype=np.int64)
    first = codes - second * (second - 1) // 2
    return first, second
