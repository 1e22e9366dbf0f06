"""The copy detector's compute core: presets, NT-Xent, training step, embedding, checkpoints, transforms."""

from __future__ import annotations

import dataclasses
import functools
import io

import pytest
import torch
import torch.nn.functional as F

from raymem.models.copy_transforms import (
    TRANSFORM_PRESETS,
    TransformBounds,
    apply_transform,
    random_transform,
    sample_transform,
)
from raymem.models.detector import (
    DETECTOR_PRESETS,
    build_detector,
    cosine_lr,
    detector_checkpoint,
    embed,
    load_detector,
    nt_xent_loss,
    train_step,
)


def smooth_images(count: int, spatial_dims: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(count, 1, *[size] * spatial_dims) random smooth images in [0, 1]: coarse noise, upsampled."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, *[size // 8] * spatial_dims, generator=generator)
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    return F.interpolate(coarse, size=[size] * spatial_dims, mode=mode, align_corners=False)


def identity_params(batch_size: int, spatial_dims: int, **changes: torch.Tensor):
    params = sample_transform(TransformBounds(), batch_size, spatial_dims, torch.Generator().manual_seed(0))
    return dataclasses.replace(params, **changes)


# --- presets ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("preset", "spatial_dims"), [("tiny", 2), ("tiny", 3), ("small2d", 2), ("paper3d", 3)])
def test_preset_embeds_a_small_batch_to_its_embedding_dim(preset, spatial_dims):
    model = build_detector(preset, spatial_dims).eval()
    images = smooth_images(2, spatial_dims)

    with torch.no_grad():
        embeddings = model(images)

    assert embeddings.shape == (2, DETECTOR_PRESETS[preset]["embedding_dim"])


def test_paper2d_is_resnet50_with_one_channel_stem_and_128d_head():
    # torchvision's resnet50 has 25,557,032 parameters; a 1-channel stem removes 6,272 and a 2048 -> 128 head
    # instead of 2048 -> 1000 removes 1,786,728.
    model = build_detector("paper2d", spatial_dims=2)

    assert sum(p.numel() for p in model.parameters()) == 25_557_032 - 6_272 - 1_786_728


def test_paper3d_head_maps_a_4_cubed_grid_of_8_channels_to_32():
    model = build_detector("paper3d", spatial_dims=3)

    linear_shapes = [(m.in_features, m.out_features) for m in model.head if isinstance(m, torch.nn.Linear)]
    assert linear_shapes == [(512, 128), (128, 32)]


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="paper2d"):
        build_detector("resnet9000", spatial_dims=2)


# --- NT-Xent ---------------------------------------------------------------------------------------------------


def test_nt_xent_without_patients_is_simclr_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 6, 8, generator=generator)
    embeddings = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (embeddings @ embeddings.T / 0.07).fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(6, 12), torch.arange(0, 6)])
    simclr = F.cross_entropy(logits, partner)

    loss = nt_xent_loss(z1, z2, patient_ids=None, temperature=0.07)

    torch.testing.assert_close(loss, simclr)


@pytest.mark.parametrize("same_patient", [True, False])
def test_moving_a_same_patient_image_closer_lowers_the_loss_and_a_different_patient_raises_it(same_patient):
    # Images 0 and 1 (patient "a" or "a"/"b"), image 2 another patient; image 1 moves from far to near image 0.
    anchor, other = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    patient_ids = ["a", "a", "c"] if same_patient else ["a", "b", "c"]

    def loss_with_image1_at(angle: float) -> torch.Tensor:
        image1 = torch.tensor([torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle)), 0.0])
        views = torch.stack([anchor, image1, other])
        return nt_xent_loss(views, views, patient_ids=patient_ids, temperature=0.5)

    far, near = loss_with_image1_at(2.5), loss_with_image1_at(0.3)

    assert (near < far) == same_patient


@pytest.mark.parametrize("patient_ids", [["p"] * 4, torch.tensor([7, 7, 7, 7]), None])
def test_nt_xent_refuses_a_batch_of_one_patient(patient_ids):
    z = torch.randn(4 if patient_ids is not None else 1, 8)  # without ids, one image is one patient

    with pytest.raises(ValueError, match="one patient"):
        nt_xent_loss(z, z, patient_ids=patient_ids)


def test_nt_xent_takes_two_patients_in_any_id_type():
    z1, z2 = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))

    losses = [nt_xent_loss(z1, z2, patient_ids=ids) for ids in (["a", "a", "b", "b"], torch.tensor([3, 3, 9, 9]))]

    torch.testing.assert_close(losses[0], losses[1])


# --- training and embedding ------------------------------------------------------------------------------------


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_detector("tiny", spatial_dims=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = smooth_images(8, spatial_dims=2)
    patient_ids = [f"p{i // 2}" for i in range(8)]
    generator = torch.Generator().manual_seed(1)
    augment = functools.partial(random_transform, bounds=TRANSFORM_PRESETS["paper"], generator=generator)

    losses = [train_step(model, optimizer, images, patient_ids, augment) for _ in range(10)]

    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])


def test_embed_in_batches_equals_one_forward_pass():
    model = build_detector("tiny", spatial_dims=3).eval()
    volumes = smooth_images(5, spatial_dims=3)
    with torch.no_grad():
        expected = model(volumes).numpy()

    embeddings = embed(model, volumes, batch_size=2)

    assert embeddings.dtype == "float32" and abs(embeddings - expected).max() < 1e-5


def test_checkpoint_bytes_rebuild_the_same_detector():
    model = build_detector("tiny", spatial_dims=2, embedding_dim=16)
    buffer = io.BytesIO()
    torch.save(detector_checkpoint(model, preset="tiny"), buffer)
    images = smooth_images(3, spatial_dims=2)

    loaded = load_detector(buffer.getvalue())

    assert (embed(loaded, images) == embed(model, images)).all()


def test_cosine_lr_decays_from_paper_start_to_paper_end():
    rates = [cosine_lr(step, total_steps=100) for step in range(101)]

    assert rates[0] == pytest.approx(1e-4) and rates[-1] == pytest.approx(5e-5) and rates == sorted(rates, reverse=True)


# --- transforms ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_transforms_repeat_with_the_same_seed_and_differ_with_another(spatial_dims):
    images = smooth_images(4, spatial_dims, size=16)
    bounds = TRANSFORM_PRESETS["strong"]

    first = random_transform(images, bounds, torch.Generator().manual_seed(7))
    again = random_transform(images, bounds, torch.Generator().manual_seed(7))
    other = random_transform(images, bounds, torch.Generator().manual_seed(8))

    assert torch.equal(first, again) and not torch.allclose(first, other)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_sampled_copy_parameters_stay_within_their_bounds(spatial_dims):
    bounds = TRANSFORM_PRESETS["copy_strong"]

    params = sample_transform(bounds, 2000, spatial_dims, torch.Generator().manual_seed(0))

    within = [
        params.rotation_deg.abs().max() <= bounds.rotation_deg,
        params.rotation_deg.abs().amin(dim=1).min() > 0,  # rotation_p = 1: every copy is rotated
        0.4 < params.flipped.float().mean() < 0.6,
        ((params.crop_scale >= bounds.crop_scale[0]) & (params.crop_scale <= bounds.crop_scale[1])).all(),
        (params.crop_offset.abs() <= (1 - params.crop_scale)[:, None]).all(),
        ((params.contrast >= bounds.contrast[0]) & (params.contrast <= bounds.contrast[1])).all(),
        params.brightness_shift.abs().max() <= bounds.brightness_shift,
        ((params.gamma >= bounds.gamma[0]) & (params.gamma <= bounds.gamma[1])).all(),
        ((params.noise_std > 0) & (params.noise_std <= bounds.noise_std)).all(),
        params.blur_sigma_px.max() <= bounds.blur_sigma_px,
    ]
    assert all(bool(check) for check in within)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_transform_with_every_parameter_off_returns_the_images(spatial_dims):
    images = smooth_images(3, spatial_dims, size=16)

    out = random_transform(images, TransformBounds(), torch.Generator().manual_seed(0))

    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_a_90_degree_rotation_is_rot90_and_a_flip_mirrors_the_last_axis():
    images = smooth_images(2, spatial_dims=3, size=8)
    params = identity_params(2, 3, rotation_deg=torch.tensor([[0.0, 0.0, 90.0], [0.0, 0.0, 0.0]]),
                             flipped=torch.tensor([False, True]))

    out = apply_transform(images, params, torch.Generator())

    expected = torch.stack([torch.rot90(images[0], 1, dims=(2, 3)), images[1].flip(-1)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_rotation_is_in_pixel_units_on_a_non_square_image():
    # An isotropic blob at the centre of a 16 x 32 image is unchanged by a rotation; rotating in normalised
    # coordinates instead would stretch it into an ellipse.
    rows, cols = torch.meshgrid(torch.arange(16) + 0.5 - 8, torch.arange(32) + 0.5 - 16, indexing="ij")
    blob = torch.exp(-(rows**2 + cols**2) / (2 * 3.0**2))[None, None]

    rotated = apply_transform(blob, identity_params(1, 2, rotation_deg=torch.tensor([[30.0]])), torch.Generator())

    assert (rotated - blob).abs().max() < 0.03


def test_blur_keeps_a_constant_image_constant():
    images = torch.full((2, 1, 12, 12, 12), 0.25)
    params = identity_params(2, 3, blur_sigma_px=torch.tensor([1.0, 0.5]))

    out = apply_transform(images, params, torch.Generator())

    torch.testing.assert_close(out, images)


def test_transform_bounds_reject_a_probability_above_one():
    with pytest.raises(ValueError, match="flip_p"):
        TransformBounds(flip_p=1.5)
