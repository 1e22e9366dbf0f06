"""Shape and intensity transforms applied at ingest, and the paper's training augmentation.

Images are spatial-only arrays, 2D ``(H, W)`` or 3D ``(D, H, W)``; one code path serves both,
switched by the number of axes (``spatial_dims``).
"""

import math
from collections.abc import Callable

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

_LINEAR_MODES = {2: "bilinear", 3: "trilinear"}


def _resize(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear resample of (H, W) or (D, H, W) to ``shape``, covering the same field of view.

    Axes that shrink are Gaussian-smoothed first (sigma = (factor - 1) / 2 voxels, as scikit-image's
    anti-aliasing does), so downsampling a 512^3 CT to 64^3 averages voxels instead of skipping them;
    torch's own antialias option exists for 2D only.
    """
    shrink_factors = [size / target for size, target in zip(array.shape, shape)]
    sigmas_voxels = [max(0.0, (factor - 1.0) / 2.0) for factor in shrink_factors]
    if any(sigmas_voxels):
        array = scipy.ndimage.gaussian_filter(array, sigma=sigmas_voxels, mode="nearest")
    batch = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    resized = F.interpolate(batch, size=shape, mode=_LINEAR_MODES[array.ndim], align_corners=False)
    return resized[0, 0].numpy()


def _crop_or_pad(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Centre crop axes longer than ``shape``, centre pad shorter ones with the image minimum."""
    crops, pads = [], []
    for size, target in zip(array.shape, shape):
        start = max(0, (size - target) // 2)
        crops.append(slice(start, start + min(size, target)))
        pad_before = max(0, target - size) // 2
        pads.append((pad_before, max(0, target - size) - pad_before))
    return np.pad(array[tuple(crops)], pads, constant_values=array.min()).astype(np.float32)


def fit_to_shape(
    array: np.ndarray, spacing_mm: tuple[float, ...], shape: tuple[int, ...], mode: str = "resize"
) -> tuple[np.ndarray, tuple[float, ...]]:
    """Bring an (H, W) or (D, H, W) image to exactly ``shape`` (same number of axes).

    mode "resize": linear resample (anti-aliased where an axis shrinks); the field of view is
        kept, so spacing_mm scales by old size / new size per axis.
    mode "crop_or_pad": centre crop / pad with the image minimum; spacing_mm unchanged.
    Returns (float32 array of ``shape``, spacing_mm).
    """
    if len(shape) != array.ndim:
        raise ValueError(f"target shape {tuple(shape)} has {len(shape)} axes but the image has {array.ndim}")
    if mode == "resize":
        new_spacing_mm = tuple(
            spacing * size / target for spacing, size, target in zip(spacing_mm, array.shape, shape)
        )
        return _resize(array, tuple(shape)), new_spacing_mm
    if mode == "crop_or_pad":
        return _crop_or_pad(array, tuple(shape)), tuple(spacing_mm)
    raise ValueError(f"fit mode must be 'resize' or 'crop_or_pad', got {mode!r}")


def normalise_intensity(
    array: np.ndarray,
    modality: str,
    *,
    intensity_range: tuple[float, float] = (0.0, 1.0),
    ct_window_hu: tuple[float, float] = (-1000.0, 1000.0),
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """Map intensities linearly onto ``intensity_range``; returns float32 of the same shape.

    CT (values in HU): clip to ``ct_window_hu``, a fixed window, so a given HU maps to the same
    value in every scan. MR/XR/OT (arbitrary units): clip to the image's own ``percentiles``,
    falling back to its min/max when those coincide (an image that is mostly background).
    """
    out_low, out_high = intensity_range
    if modality == "CT":
        low, high = ct_window_hu
    else:
        low, high = (float(value) for value in np.percentile(array, percentiles))
        if high <= low:
            low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.full(array.shape, out_low, dtype=np.float32)
    unit = (np.clip(array, low, high) - low) / (high - low)
    return np.clip(unit * (out_high - out_low) + out_low, out_low, out_high).astype(np.float32)


def make_augment(
    *,
    spatial_dims: int,
    flip_prob: float = 0.5,
    rotate_prob: float = 0.5,
    max_rotation_deg: float = 5.0,
    seed: int | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """The paper's augmentation: a left-right flip, then a small rotation, each sample drawn independently.

    Flip: along the last spatial axis (x) with probability ``flip_prob``. Rotation: an angle uniform
    in +-``max_rotation_deg`` with probability ``rotate_prob``, in the (H, W) plane (for 3D, around
    the z axis), bilinear with border padding. The returned callable maps a batch
    (B, C, *spatial) float32 to a new array of the same shape and dtype, each sample clipped to its
    own input range. The same ``seed`` gives the same sequence of augmentations.
    """
    assert spatial_dims in (2, 3), spatial_dims
    # Imported here: MONAI takes seconds to import, which every ingest worker would otherwise pay.
    from monai.transforms import Compose, RandFlip, RandRotate

    augment_sample = Compose(
        [
            RandFlip(prob=flip_prob, spatial_axis=spatial_dims - 1),
            # range_x is the rotation in the plane of the last two spatial axes (2D: the only angle).
            RandRotate(
                range_x=math.radians(max_rotation_deg),
                prob=rotate_prob,
                keep_size=True,
                mode="bilinear",
                padding_mode="border",
            ),
        ]
    )
    augment_sample.set_random_state(seed=seed)

    def augment(batch: np.ndarray) -> np.ndarray:
        assert batch.ndim == spatial_dims + 2, (batch.shape, spatial_dims)
        augmented = np.empty_like(batch)
        for index, sample in enumerate(batch):
            augmented[index] = np.clip(np.asarray(augment_sample(sample)), sample.min(), sample.max())
        return augmented

    return augment
