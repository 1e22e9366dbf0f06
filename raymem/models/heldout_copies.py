"""Held-out copy families: ways a generator may reproduce a training image that the copy detector never trains on.

The detector's positive pairs come from ``raymem.models.copy_transforms.random_transform`` under
``TRANSFORM_PRESETS`` (rotation, flip, crop, contrast, gamma, noise, blur). Scoring it only on those transforms
measures how well it learned its own augmentation, not how it finds what a generator gives back. The families here
are of other kinds, and no training path uses them (tests/unit/test_heldout_copies.py checks the presets):

- ``"elastic"``: a smooth random displacement field (control points on a coarse grid, interpolated), up to
  ``max_displacement`` of each side (default 5 %: 1.6 px at 32 px, 26 px at 512 px). Anatomy bends; no rigid motion.
- ``"resample"``: resolution and bit-depth loss: area downsampling by a factor uniform in ``factor`` (default 2-4),
  linear upsampling back, intensities quantised to ``levels`` levels of the image's own range (default 32).
- ``"texture_loss"``: local inpainting-like loss of detail: ``regions`` boxes (default 3, each side 20-40 % of the
  image's) are replaced by a strongly smoothed version of the image (sigma 8 % of the shortest side), with soft
  edges; the smooth, low-texture look of generated images, in patches.
- ``"autoencoder"`` (``autoencoder_round_trip``): encode and decode with a trained raymem LDM autoencoder; every
  image an LDM generates leaves through this decoder, so this is what a generated copy looks like.

A copy family is a callable ``(images (B, C, *spatial), generator) -> copies (B, C, *spatial)``; all randomness comes
from the ``torch.Generator`` (drawn on its device, like copy_transforms), so a seed gives the same copies. One code
path serves 2D and 3D (the number of spatial dimensions switches it). Sizes are fractions of each side, so the same
family means the same thing at 32 and 512 pixels. The elastic, resample and texture families keep every value within
the image's own [min, max]. Pure torch: no Ray.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from raymem.models.copy_transforms import gaussian_blur

if TYPE_CHECKING:
    from raymem.models.ldm import LatentDiffusion

CopyFamily = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
AUTOENCODER_FAMILY = "autoencoder"


def elastic_deformation(images: torch.Tensor, generator: torch.Generator, *, max_displacement: float = 0.05,
                        control_points: int = 5) -> torch.Tensor:
    """Warp each image of (B, C, *spatial) by its own smooth displacement field; returns (B, C, *spatial).

    Each axis's displacement is uniform in [-max_displacement, max_displacement] (a fraction of that axis's length)
    at ``control_points`` points per axis, linearly interpolated over the image. Borders repeat the edge pixel.
    """
    batch, spatial_dims = images.shape[0], images.dim() - 2
    assert spatial_dims in (2, 3) and control_points >= 2, (images.shape, control_points)
    control = torch.rand(batch, spatial_dims, *[control_points] * spatial_dims, generator=generator,
                         device=generator.device).to(images.device, images.dtype)
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    field = F.interpolate(control * 2.0 - 1.0, size=images.shape[2:], mode=mode, align_corners=True)
    # grid_sample's coordinates span [-1, 1] along each axis, so a fraction f of the side is 2f; the grid's last
    # dimension orders the axes (W, H[, D]), the field's channels are in any fixed order (each is i.i.d.).
    displacement = (2.0 * max_displacement) * field.movedim(1, -1)
    identity = torch.eye(spatial_dims, spatial_dims + 1, device=images.device, dtype=images.dtype)
    grid = F.affine_grid(identity.expand(batch, -1, -1), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid + displacement, mode="bilinear", padding_mode="border", align_corners=False)


def resample_loss(images: torch.Tensor, generator: torch.Generator, *, factor: tuple[float, float] = (2.0, 4.0),
                  levels: int = 32) -> torch.Tensor:
    """Downsample (area) each image of (B, C, *spatial) by a factor uniform in ``factor``, upsample it back
    (linear), and quantise it to ``levels`` evenly spaced values of its own range; returns (B, C, *spatial)."""
    spatial_dims = images.dim() - 2
    assert spatial_dims in (2, 3) and 1.0 < factor[0] <= factor[1] and levels >= 2, (images.shape, factor, levels)
    factors = factor[0] + (factor[1] - factor[0]) * torch.rand(images.shape[0], generator=generator,
                                                               device=generator.device)
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    copies = []
    for image, image_factor in zip(images.split(1), factors.tolist(), strict=True):
        small = [max(2, round(side / image_factor)) for side in image.shape[2:]]
        low_resolution = F.interpolate(image, size=small, mode="area")
        copies.append(F.interpolate(low_resolution, size=image.shape[2:], mode=mode, align_corners=False))
    out = torch.cat(copies)
    reduce_dims = tuple(range(1, images.dim()))
    low = images.amin(dim=reduce_dims, keepdim=True)
    value_range = (images.amax(dim=reduce_dims, keepdim=True) - low).clamp_min(1e-6)
    steps = ((out - low) / value_range * (levels - 1)).round().clamp(0, levels - 1)
    return low + steps / (levels - 1) * value_range


def texture_loss(images: torch.Tensor, generator: torch.Generator, *, regions: int = 3,
                 region_side: tuple[float, float] = (0.2, 0.4), smoothing: float = 0.08) -> torch.Tensor:
    """Replace ``regions`` random boxes of each image of (B, C, *spatial) by a smoothed version of the image.

    Box sides are uniform in ``region_side`` (fractions of each side), boxes lie inside the image, and the smoothing
    is a Gaussian of sigma ``smoothing`` times the shortest side; box edges are softened by a 1-pixel Gaussian.
    Returns (B, C, *spatial).
    """
    batch, channels, *spatial = images.shape
    spatial_dims = len(spatial)
    assert spatial_dims in (2, 3) and regions >= 1, (images.shape, regions)
    assert 0.0 < region_side[0] <= region_side[1] <= 1.0, region_side

    def uniform(low: float, high: float) -> torch.Tensor:
        draws = torch.rand(batch, regions, spatial_dims, generator=generator, device=generator.device)
        return (low + (high - low) * draws).to(images.device)

    half_side = uniform(*region_side) / 2.0  # (B, regions, S), fractions of each side
    centre = half_side + (1.0 - 2.0 * half_side) * uniform(0.0, 1.0)
    inside = torch.zeros(batch, 1, *spatial, dtype=torch.bool, device=images.device)
    for region in range(regions):
        in_box = torch.ones_like(inside)
        for axis, side in enumerate(spatial):
            position = (torch.arange(side, device=images.device, dtype=images.dtype) + 0.5) / side
            near = (position[None, :] - centre[:, region, axis, None]).abs() <= half_side[:, region, axis, None]
            shape = [batch, 1] + [1] * spatial_dims
            shape[2 + axis] = side
            in_box = in_box & near.view(shape)
        inside = inside | in_box
    mask = gaussian_blur(inside.to(images.dtype), torch.ones(batch, device=images.device))
    sigma_px = torch.full((batch,), smoothing * min(spatial), device=images.device)
    smoothed = gaussian_blur(images, sigma_px)
    return mask * smoothed + (1.0 - mask) * images


HELDOUT_FAMILIES: dict[str, CopyFamily] = {
    "elastic": elastic_deformation,
    "resample": resample_loss,
    "texture_loss": texture_loss,
}


def autoencoder_round_trip(ldm: LatentDiffusion, *, value_range: tuple[float, float] | None = None,
                           batch_size: int = 64) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (N, 1, *spatial) -> decode(encode(images)) (N, 1, *spatial) float32 on the images' device.

    ``ldm``: a trained ``raymem.models.ldm.LatentDiffusion`` (e.g. ``load_ldm(<run>/epoch-<E>/ldm.pt bytes)[0]``);
    runs on its device in batches of ``batch_size``. The round trip is deterministic (the encoder mean, as
    ``sample_images`` decodes latents); ``value_range`` clamps it as ``sample_images`` clamps generated samples.
    """

    @torch.no_grad()
    def round_trip(images: torch.Tensor) -> torch.Tensor:
        ldm.eval()
        device = ldm.latent_scale.device
        out = torch.cat([ldm.decode(ldm.encode(batch.to(device, torch.float32))).float().to(images.device)
                         for batch in images.split(batch_size)])
        return out.clamp(*value_range) if value_range is not None else out

    return round_trip


def deterministic_family(transform: Callable[[torch.Tensor], torch.Tensor]) -> CopyFamily:
    """A deterministic image transform (e.g. ``autoencoder_round_trip``) as a copy family that ignores the
    generator."""

    @functools.wraps(transform)
    def family(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return transform(images)

    return family

