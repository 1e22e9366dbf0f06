"""Batched random image transforms for the copy detector: positive-pair augmentation and bounded "copies".

One transform family serves both purposes; only the bounds differ (``TRANSFORM_PRESETS``):

- ``"paper"``: the paper's positive-pair augmentation (rotation up to +-5 degrees with p=0.5, flip with p=0.5).
- ``"strong"``: the paper's set plus random resized crop, contrast/brightness, gamma, Gaussian noise and blur.
- ``"copy"`` and ``"copy_strong"``: what a generative model might do to a training image it reproduces; the accuracy
  evaluation (``raymem.audit.accuracy``) transforms held-out images with them and asks the detector to find the
  original. Every parameter is applied (p=1) except the flip, so each copy is transformed. Because the detector
  trains on this family, scores on these copies are optimistic; ``raymem.models.heldout_copies`` holds copy families
  it never trains on (elastic deformation, resolution loss, texture loss, the LDM autoencoder's round trip).

Images are ``(B, C, *spatial)`` tensors with 2 or 3 spatial dimensions; one code path serves both (``affine_grid`` /
``grid_sample`` and separable convolutions switched by the number of spatial dimensions). Geometry works in pixel
units, so rotations stay rotations on non-square images. Intensity bounds are relative to each image's own range
(max - min), so the same bounds fit X-ray in [0, 1] and CT/MR in [-1, 1]. All randomness comes from the
``torch.Generator`` passed in, so the same generator (device and seed) gives the same transforms. Parameters and noise
are drawn on the generator's device; a generator on the images' device avoids host-to-device copies of the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TransformBounds:
    """Bounds and probabilities of the random transform; every default is "off".

    rotation_deg: each rotation angle is uniform in [-rotation_deg, rotation_deg] (one angle in 2D, one per axis in
        3D), applied with probability rotation_p.
    flip_p: probability of mirroring the last spatial axis (left-right).
    crop_scale: (min, max) fraction of each side kept by a random resized crop that stays inside the image (a zoom
        in), applied with probability crop_p.
    contrast: (min, max) factor, log-uniform, scaling intensities about the image mean; brightness_shift: the maximum
        absolute shift as a fraction of the image range; both applied together with probability intensity_p.
    gamma: (min, max) exponent, log-uniform, applied to the image rescaled to [0, 1], with probability gamma_p.
    noise_std: the maximum standard deviation of additive Gaussian noise as a fraction of the image range (the
        standard deviation is uniform in [0, noise_std]), applied with probability noise_p.
    blur_sigma_px: the maximum Gaussian blur sigma in pixels (uniform in [0, blur_sigma_px]), with probability blur_p.
    """

    rotation_deg: float = 0.0
    rotation_p: float = 0.0
    flip_p: float = 0.0
    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_p: float = 0.0
    contrast: tuple[float, float] = (1.0, 1.0)
    brightness_shift: float = 0.0
    intensity_p: float = 0.0
    gamma: tuple[float, float] = (1.0, 1.0)
    gamma_p: float = 0.0
    noise_std: float = 0.0
    noise_p: float = 0.0
    blur_sigma_px: float = 0.0
    blur_p: float = 0.0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_p") and not 0.0 <= value <= 1.0:
                raise ValueError(f"TransformBounds.{field.name} = {value} is a probability: give a value in [0, 1]")
        for name in ("rotation_deg", "brightness_shift", "noise_std", "blur_sigma_px"):
            if getattr(self, name) < 0:
                raise ValueError(f"TransformBounds.{name} = {getattr(self, name)} must be >= 0")
        for name, lowest in (("crop_scale", 0.0), ("contrast", 0.0), ("gamma", 0.0)):
            low, high = getattr(self, name)
            if not lowest < low <= high:
                raise ValueError(f"TransformBounds.{name} = {(low, high)} must satisfy 0 < min <= max")
        if self.crop_scale[1] > 1.0:
            raise ValueError(f"TransformBounds.crop_scale = {self.crop_scale}: a crop keeps at most the whole image")


TRANSFORM_PRESETS: dict[str, TransformBounds] = {
    # Dar et al.: torchio RandomAffine(degrees=5, p=0.5) and RandomFlip(p=0.5) on the left-right axis.
    "paper": TransformBounds(rotation_deg=5.0, rotation_p=0.5, flip_p=0.5),
    # Covers the "copy_strong" bounds below, so the detector is trained on what it is evaluated on.
    "strong": TransformBounds(
        rotation_deg=15.0, rotation_p=0.8, flip_p=0.5, crop_scale=(0.8, 1.0), crop_p=0.5,
        contrast=(0.7, 1.4), brightness_shift=0.1, intensity_p=0.8, gamma=(0.7, 1.4), gamma_p=0.5,
        noise_std=0.05, noise_p=0.5, blur_sigma_px=1.0, blur_p=0.3,
    ),
    "copy": TransformBounds(
        rotation_deg=5.0, rotation_p=1.0, flip_p=0.5,
        contrast=(0.9, 1.1), brightness_shift=0.05, intensity_p=1.0, noise_std=0.02, noise_p=1.0,
    ),
    "copy_strong": TransformBounds(
        rotation_deg=15.0, rotation_p=1.0, flip_p=0.5, crop_scale=(0.85, 1.0), crop_p=1.0,
        contrast=(0.75, 1.33), brightness_shift=0.1, intensity_p=1.0, gamma=(0.75, 1.33), gamma_p=1.0,
        noise_std=0.05, noise_p=1.0, blur_sigma_px=1.0, blur_p=0.5,
    ),
}


@dataclass(frozen=True)
class TransformParams:
    """The drawn parameters of one batch, all on the generator's device; B = batch size, S = spatial dims.

    rotation_deg (B, 1 in 2D or 3 in 3D: about the W, H, D axes); flipped (B,) bool; crop_scale (B,) side fraction
    kept; crop_offset (B, S) crop centre in normalised coordinates, ordered (W, H[, D]) as ``affine_grid`` orders
    them; contrast (B,); brightness_shift (B,) fraction of range; gamma (B,); noise_std (B,) fraction of range;
    blur_sigma_px (B,).
    """

    rotation_deg: torch.Tensor
    flipped: torch.Tensor
    crop_scale: torch.Tensor
    crop_offset: torch.Tensor
    contrast: torch.Tensor
    brightness_shift: torch.Tensor
    gamma: torch.Tensor
    noise_std: torch.Tensor
    blur_sigma_px: torch.Tensor


def sample_transform(
    bounds: TransformBounds, batch_size: int, spatial_dims: int, generator: torch.Generator
) -> TransformParams:
    """Draw the parameters of ``batch_size`` independent transforms within ``bounds`` from ``generator``."""
    assert spatial_dims in (2, 3), spatial_dims
    device = generator.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch_size, *shape, generator=generator, device=device)

    def happens(p: float) -> torch.Tensor:
        return uniform(0.0, 1.0) < p

    def log_uniform(low_high: tuple[float, float]) -> torch.Tensor:
        return uniform(math.log(low_high[0]), math.log(low_high[1])).exp()

    one = torch.ones(batch_size, device=device)
    rotation_axes = 1 if spatial_dims == 2 else 3
    rotated = happens(bounds.rotation_p)[:, None]
    rotation_deg = uniform(-bounds.rotation_deg, bounds.rotation_deg, rotation_axes) * rotated
    flipped = happens(bounds.flip_p)
    crop_scale = torch.where(happens(bounds.crop_p), uniform(*bounds.crop_scale), one)
    crop_offset = uniform(-1.0, 1.0, spatial_dims) * (1.0 - crop_scale)[:, None]
    intensity = happens(bounds.intensity_p)
    contrast = torch.where(intensity, log_uniform(bounds.contrast), one)
    brightness_shift = uniform(-bounds.brightness_shift, bounds.brightness_shift) * intensity
    gamma = torch.where(happens(bounds.gamma_p), log_uniform(bounds.gamma), one)
    noise_std = uniform(0.0, bounds.noise_std) * happens(bounds.noise_p)
    blur_sigma_px = uniform(0.0, bounds.blur_sigma_px) * happens(bounds.blur_p)
    return TransformParams(
        rotation_deg, flipped, crop_scale, crop_offset, contrast, brightness_shift, gamma, noise_std, blur_sigma_px
    )


def apply_transform(images: torch.Tensor, params: TransformParams, generator: torch.Generator) -> torch.Tensor:
    """Transform ``images`` (B, C, *spatial) with ``params``; ``generator`` draws the noise. Returns (B, C, *spatial).

    Order: geometry (rotation, flip, crop; outside the image is filled with the image's minimum), blur, gamma,
    contrast/brightness, noise.
    """
    spatial_dims = images.dim() - 2
    assert spatial_dims in (2, 3), images.shape
    params = TransformParams(*(getattr(params, f.name).to(images.device) for f in fields(TransformParams)))
    reduce_dims = tuple(range(1, images.dim()))
    low = images.amin(dim=reduce_dims, keepdim=True)
    theta = _sampling_affine(params, images.shape[2:]).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Sampling (image - min) with zero padding fills the outside with the image's minimum (torchio's "minimum" pad).
    out = F.grid_sample(images - low, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + low
    out = gaussian_blur(out, params.blur_sigma_px)

    low = out.amin(dim=reduce_dims, keepdim=True)
    value_range = (out.amax(dim=reduce_dims, keepdim=True) - low).clamp_min(1e-6)
    unit = ((out - low) / value_range).clamp(0.0, 1.0) ** _per_sample(params.gamma, out)
    mean = unit.mean(dim=reduce_dims, keepdim=True)
    unit = (unit - mean) * _per_sample(params.contrast, out) + mean + _per_sample(params.brightness_shift, out)
    out = unit * value_range + low
    if bool((params.noise_std > 0).any()):
        noise = torch.randn(out.shape, generator=generator, device=generator.device).to(out.device, out.dtype)
        out = out + noise * _per_sample(params.noise_std, out) * value_range
    return out


def random_transform(images: torch.Tensor, bounds: TransformBounds, generator: torch.Generator) -> torch.Tensor:
    """Transform each image of ``images`` (B, C, *spatial) by an independent draw within ``bounds``; same shape out.

    Positive-pair augmentation for training is ``functools.partial(random_transform, bounds=TRANSFORM_PRESETS["paper"],
    generator=generator)``.
    """
    params = sample_transform(bounds, images.shape[0], images.dim() - 2, generator)
    return apply_transform(images, params, generator)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against ``like`` (B, C, *spatial)."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _sampling_affine(params: TransformParams, spatial_shape: torch.Size) -> torch.Tensor:
    """The (B, S, S+1) matrices ``affine_grid`` takes: output coordinates -> input coordinates, normalised to [-1, 1].

    The rotation acts in pixel units (half-extents E): theta = scale * E^-1 R E Flip, plus the crop offset.
    """
    spatial_dims = len(spatial_shape)
    radians = params.rotation_deg * (math.pi / 180.0)
    rotation = _rotation_matrix(radians, spatial_dims)
    half_extent = torch.tensor(list(reversed(spatial_shape)), dtype=radians.dtype, device=radians.device) / 2.0
    rotation = rotation * half_extent[None, None, :] / half_extent[None, :, None]
    flip = torch.ones(len(radians), spatial_dims, device=radians.device)
    flip[:, 0] = torch.where(params.flipped, -1.0, 1.0)  # affine_grid's first coordinate is the last axis (W)
    linear = rotation * flip[:, None, :] * params.crop_scale[:, None, None]
    return torch.cat([linear, params.crop_offset[:, :, None]], dim=2)


def _rotation_matrix(radians: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """(B, 1) angles -> (B, 2, 2); (B, 3) angles about the x, y, z axes -> (B, 3, 3) = Rz Ry Rx."""
    cos, sin = radians.cos(), radians.sin()
    if spatial_dims == 2:
        return torch.stack([torch.cat([cos, -sin], 1), torch.cat([sin, cos], 1)], dim=1)
    batch = len(radians)
    matrices = []
    for axis in range(3):
        matrix = torch.eye(3, device=radians.device).repeat(batch, 1, 1)
        first, second = [a for a in range(3) if a != axis]
        matrix[:, first, first] = cos[:, axis]
        matrix[:, first, second] = -sin[:, axis]
        matrix[:, second, first] = sin[:, axis]
        matrix[:, second, second] = cos[:, axis]
        matrices.append(matrix)
    return matrices[2] @ matrices[1] @ matrices[0]


def gaussian_blur(images: torch.Tensor, sigma_px: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, per-image sigma (B,) in pixels, replicate padding; sigma 0 leaves an image as is."""
    radius = math.ceil(3.0 * float(sigma_px.max()))
    if radius == 0:
        return images
    batch, channels, *spatial_shape = images.shape
    spatial_dims = len(spatial_shape)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    sigma = sigma_px.to(images.dtype).clamp_min(1e-3).repeat_interleave(channels)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B*C, 2r+1)
    convolve = F.conv2d if spatial_dims == 2 else F.conv3d
    out = images.reshape(1, batch * channels, *spatial_shape)
    for axis in range(spatial_dims):
        shape = [batch * channels, 1] + [1] * spatial_dims
        shape[2 + axis] = 2 * radius + 1
        padding = [0, 0] * spatial_dims
        padding[2 * (spatial_dims - 1 - axis) : 2 * (spatial_dims - 1 - axis) + 2] = [radius, radius]
        out = convolve(F.pad(out, padding, mode="replicate"), kernel.view(shape), groups=batch * channels)
    return out.reshape(images.shape)
