"""LDM compute core (no Ray): sampling shape/range/seeds in 2D and 3D, latent scale, checkpoints, losses, and the
smallest memorization demonstration (a tiny LDM trained long on 4 images reproduces them; trained briefly it does not).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymem.data import phantoms, transforms
from raymem.models import ldm as core
from raymem.train.ldm import checkpoint_priority, nested_subset


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny preset's ops are too small to gain from a second thread, and on a loaded 2-core machine two threads
    per process made a diffusion step 5-13x slower (measured at load 8). Module scope: the autoencoder fixture runs
    with it too; restored afterwards for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_samples_have_the_image_shape_and_range_and_depend_only_on_their_seed(spatial_dims):
    torch.manual_seed(0)
    model = core.build_ldm("tiny", spatial_dims)
    spatial = (16,) * spatial_dims

    batch = core.sample_images(model, spatial, seeds=[7, 8, 9], ddim_steps=2, value_range=(0.0, 1.0))
    alone = core.sample_images(model, spatial, seeds=[8], ddim_steps=2, value_range=(0.0, 1.0))

    assert batch.shape == (3, 1, *spatial) and batch.dtype == torch.float32
    assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=1e-4)


def test_latent_scale_from_training_data_gives_unit_variance_latents():
    torch.manual_seed(0)
    model = core.build_ldm("tiny", 2)
    images = torch.rand(6, 1, 16, 16)

    moments = core.latent_moments(model, images[:3]) + core.latent_moments(model, images[3:])
    model.latent_scale.fill_(core.latent_scale_from_moments(moments))

    assert float(model.encode(images).std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)


def test_checkpoint_round_trip_keeps_the_latent_scale_and_the_samples():
    torch.manual_seed(0)
    model = core.build_ldm("tiny", 2)
    model.latent_scale.fill_(3.5)

    loaded, state = core.load_ldm(core.ldm_checkpoint(model, preset="tiny", image_shape=(1, 16, 16),
                                                      metadata={"epoch": 4}))

    assert float(loaded.latent_scale) == 3.5 and state["metadata"] == {"epoch": 4}
    torch.testing.assert_close(core.sample_images(loaded, (16, 16), [1], ddim_steps=2),
                               core.sample_images(model, (16, 16), [1], ddim_steps=2))


def test_adversarial_autoencoder_step_updates_the_discriminator():
    torch.manual_seed(0)
    model = core.build_ldm("tiny", 2)
    discriminator = core.build_discriminator("tiny", 2)
    adversary = core.Adversary(discriminator, torch.optim.Adam(discriminator.parameters(), 1e-3), weight=0.01)
    before = [p.detach().clone() for p in discriminator.parameters()]

    terms = core.autoencoder_step(model.autoencoder, torch.optim.Adam(model.autoencoder.parameters(), 1e-3),
                                  torch.rand(2, 1, 16, 16), kl_weight=1e-6, adversary=adversary)

    assert set(terms) == {"recon", "kl", "generator_adv", "discriminator"}
    assert any(not torch.equal(a, b) for a, b in zip(before, discriminator.parameters()))


def test_perceptual_loss_without_a_local_weights_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="perceptual_weight to 0"):
        core.build_perceptual_loss(2, str(tmp_path / "resnet50.pth"))


def test_training_subsets_nest_for_one_seed():
    ids = [f"s-{i:03d}" for i in range(50)]

    small, large = nested_subset(ids, 10, seed=3), nested_subset(ids, 30, seed=3)

    assert len(set(small)) == 10 and set(small) < set(large)
    # the shared subset is the larger one's prefix, in order, and the order does not depend on the input's order
    assert large[:10] == small and nested_subset(list(reversed(ids)), 30, seed=3) == large
    # another seed draws another subset (so the seed is used), and the draw is not just the first ids
    assert nested_subset(ids, 10, seed=4) != small and small != sorted(ids)[:10]


def _nearest_training_correlation(samples: torch.Tensor, training: torch.Tensor) -> torch.Tensor:
    """Per sample, the pixel Pearson correlation with its most similar training image."""
    def unit(x):
        x = x.flatten(1) - x.flatten(1).mean(1, keepdim=True)
        return x / x.norm(dim=1, keepdim=True)
    return (unit(samples) @ unit(training).T).max(1).values


# The tiny preset at 16x16 (latents 3x4x4): a diffusion step on 16 latents costs ~30 ms on one core, so the long run
# (500 steps) takes ~15-60 s with the machine idle to loaded. The four phantoms are alike (pairwise pixel correlation
# up to 0.82) and their mean image correlates 0.91 with its nearest: a blurry average stays below the 0.95 threshold.
MEMORIZATION_SIZE = 16


@pytest.fixture(scope="module")
def four_images_and_autoencoder():
    images = torch.from_numpy(np.stack([
        transforms.normalise_intensity(image.array, image.modality, intensity_range=(0.0, 1.0),
                                       ct_window_hu=(-1000.0, 1000.0), percentiles=(0.5, 99.5))[None]
        for image in phantoms.generate("xray2d", patients=4, images_per_patient=1, size=MEMORIZATION_SIZE, seed=0)]))
    torch.manual_seed(0)
    model = core.build_ldm("tiny", 2)
    optimizer = torch.optim.Adam(model.autoencoder.parameters(), 1e-3)
    for _ in range(150):
        core.autoencoder_step(model.autoencoder, optimizer, images, kl_weight=1e-6)
    model.latent_scale.fill_(core.latent_scale_from_moments(core.latent_moments(model, images)))
    return images, model.state_dict()


def _train_diffusion_and_sample(images: torch.Tensor, autoencoded_state: dict, steps: int, seed: int) -> torch.Tensor:
    """8 DDIM samples of the tiny UNet after ``steps`` updates (Adam, lr 3e-3 decayed linearly to 0) on the latents."""
    torch.manual_seed(seed)
    model = core.build_ldm("tiny", 2)
    model.load_state_dict(autoencoded_state)
    latents = model.encode(images).repeat(4, 1, 1, 1)  # 4 copies per step: more timesteps seen per update
    optimizer = torch.optim.Adam(model.unet.parameters(), 3e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    scheduler, generator = core.noise_scheduler(), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        core.diffusion_step(model.unet, optimizer, scheduler, latents, generator)
        decay.step()
    return core.sample_images(model, images.shape[2:], seeds=range(8), ddim_steps=20)


def test_a_tiny_ldm_trained_long_on_four_images_reproduces_them(four_images_and_autoencoder):
    images, state = four_images_and_autoencoder

    samples = _train_diffusion_and_sample(images, state, steps=500, seed=1)

    assert float(_nearest_training_correlation(samples, images).median()) > 0.95  # measured 0.986-0.988


def test_the_same_tiny_ldm_trained_briefly_does_not(four_images_and_autoencoder):
    images, state = four_images_and_autoencoder

    samples = _train_diffusion_and_sample(images, state, steps=40, seed=1)

    assert float(_nearest_training_correlation(samples, images).median()) < 0.95  # measured 0.23-0.32


def test_checkpoints_are_dropped_oldest_first_and_asked_for_epochs_last():
    # Ray Train deletes the lowest priority first: epochs nobody asked to keep, oldest first, then kept ones.
    epochs = [0, 1, 2, 3, 4, 5]
    assert sorted(epochs, key=lambda epoch: checkpoint_priority(epoch, {1, 3})) == [0, 2, 4, 5, 1, 3]
