"""Held-out copy families: outside the detector's training transforms, and each one a real, seeded copy."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

from raymem.config import DetectorTrainConfig
from raymem.data import phantoms
from raymem.data.transforms import normalise_intensity
from raymem.models import ldm as core
from raymem.models.copy_transforms import TRANSFORM_PRESETS, TransformBounds
from raymem.models.heldout_copies import AUTOENCODER_FAMILY, HELDOUT_FAMILIES, autoencoder_round_trip

FAMILIES = sorted(HELDOUT_FAMILIES)


def phantom_xrays(patients: int, size: int = 32) -> torch.Tensor:
    """(patients, 1, size, size) phantom chest X-rays in [0, 1], one per patient: alike, as real X-rays are."""
    images = [normalise_intensity(image.array, image.modality)[None]
              for image in phantoms.generate("xray2d", patients=patients, images_per_patient=1, size=size, seed=0)]
    return torch.from_numpy(np.stack(images)).float()


@pytest.fixture
def one_torch_thread():
    """On a loaded 2-core machine two threads made a tiny autoencoder step ~20x slower (as tests/unit/test_ldm.py
    found); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pixel_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of every image of a (n, ...) with every image of b (m, ...): (n, m) float64."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T


def copies(name: str, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return HELDOUT_FAMILIES[name](images, torch.Generator().manual_seed(seed))


def test_training_presets_hold_none_of_the_heldout_families():
    heldout = set(HELDOUT_FAMILIES) | {AUTOENCODER_FAMILY}

    assert not heldout & set(TRANSFORM_PRESETS)


def test_detector_training_can_only_choose_transform_bounds_presets():
    # The training loop augments with random_transform(TRANSFORM_PRESETS[cfg.augmentation]): bounds of rotation,
    # flip, crop, intensity, noise and blur, which cannot express a deformation field, resampling or an autoencoder.
    choices = set(typing.get_args(DetectorTrainConfig.model_fields["augmentation"].annotation))

    assert choices <= set(TRANSFORM_PRESETS) and all(
        isinstance(TRANSFORM_PRESETS[choice], TransformBounds) for choice in choices)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_heldout_copy_differs_from_its_source(name):
    images = phantom_xrays(12)

    largest_change = (copies(name, images) - images).abs().flatten(1).amax(dim=1)

    assert bool((largest_change > 0.02).all()), largest_change


@pytest.mark.parametrize("name", FAMILIES)
def test_every_heldout_copy_is_closest_to_its_own_source(name):
    images = phantom_xrays(12)

    correlation = pixel_correlation(copies(name, images), images)

    assert torch.equal(correlation.argmax(dim=1), torch.arange(12))


@pytest.mark.parametrize("name", FAMILIES)
def test_heldout_copies_stay_within_each_image_range(name):
    images = phantom_xrays(6) * 0.5 + 0.25  # ranges differ from [0, 1], so a clamp to [0, 1] would not do

    out = copies(name, images)

    low, high = images.flatten(1).amin(1), images.flatten(1).amax(1)
    assert bool((out.flatten(1).amin(1) >= low - 1e-6).all() and (out.flatten(1).amax(1) <= high + 1e-6).all())


@pytest.mark.parametrize("name", FAMILIES)
def test_heldout_copies_repeat_with_the_same_seed_and_change_with_another(name):
    images = phantom_xrays(4)

    first, again, other = copies(name, images, seed=1), copies(name, images, seed=1), copies(name, images, seed=2)

    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("name", FAMILIES)
def test_heldout_families_copy_volumes_through_the_same_code(name):
    coarse = torch.rand(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    volumes = torch.nn.functional.interpolate(coarse, size=(8, 16, 16), mode="trilinear")

    out = copies(name, volumes)

    assert out.shape == volumes.shape and bool(((out - volumes).abs().flatten(1).amax(1) > 1e-3).all())


def test_a_trained_autoencoders_round_trip_is_closest_to_its_input_and_not_the_input(one_torch_thread):
    # Eight phantoms at 16x16 correlate up to 0.91 with each other in pixels; 120 steps bring every round trip
    # closest to its own input (measured: from step 100 on; at step 60 four of eight are closest to another image).
    images = phantom_xrays(8, size=16)
    torch.manual_seed(0)
    ldm = core.build_ldm("tiny", spatial_dims=2)
    optimizer = torch.optim.Adam(ldm.autoencoder.parameters(), lr=3e-3)
    for _ in range(120):
        core.autoencoder_step(ldm.autoencoder, optimizer, images, kl_weight=1e-6)

    reconstructions = autoencoder_round_trip(ldm, value_range=(0.0, 1.0), batch_size=3)(images)

    correlation = pixel_correlation(reconstructions, images)
    assert torch.equal(correlation.argmax(dim=1), torch.arange(8)) and not torch.allclose(reconstructions, images)
