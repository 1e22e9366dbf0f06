"""Latent diffusion model (LDM): MONAI AutoencoderKL + DiffusionModelUNet in its latent space, 2D and 3D.

The generator whose memorization raymem measures (Dar et al.): an autoencoder is trained first (L1 reconstruction,
KL weight, optional PatchGAN adversarial loss, optional perceptual loss from a local weights file), then a denoising
UNet is trained in its latent space with the DDPM loss over 1000 steps; samples come from DDIM with a configurable
number of steps. Latents are the encoder mean times ``latent_scale`` (1 / std of the training latents, computed
from training data before the diffusion stage and stored in the state dict), so the diffusion model sees unit
variance.

Every function serves 2D and 3D: ``spatial_dims`` switches the networks; images are (B, 1, *spatial) and latents
(B, latent_channels, *spatial / downsample_factor). Pure torch + MONAI: no Ray.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss, PerceptualLoss
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from raymem.models.checkpoint import CheckpointError, load_state

# Plain-value presets (the model-size factor of the study): keyword arguments of AutoencoderKL, DiffusionModelUNet
# and PatchDiscriminator (all but spatial_dims and channel counts fixed by the data), and the input shape each is
# designed for. paper2d / paper3d-* follow MONAI's generative LDM tutorials, the models the paper's code builds on.
LDM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "input_shape": {2: (32, 32), 3: (32, 32, 32)},
        "autoencoder": {"channels": (16, 32, 32), "latent_channels": 3, "num_res_blocks": 1, "norm_num_groups": 8,
                        "attention_levels": (False, False, False), "with_encoder_nonlocal_attn": False,
                        "with_decoder_nonlocal_attn": False},
        "unet": {"channels": (32, 64), "attention_levels": (False, True), "num_res_blocks": 1, "norm_num_groups": 8,
                 "num_head_channels": (0, 32)},
        "discriminator": {"channels": 16, "num_layers_d": 2},
    },
    "small": {
        "input_shape": {2: (64, 64), 3: (64, 64, 64)},
        "autoencoder": {"channels": (32, 64, 64), "latent_channels": 3, "num_res_blocks": 1, "norm_num_groups": 16,
                        "attention_levels": (False, False, False), "with_encoder_nonlocal_attn": False,
                        "with_decoder_nonlocal_attn": False},
        "unet": {"channels": (64, 128, 128), "attention_levels": (False, True, True), "num_res_blocks": 1,
                 "norm_num_groups": 16, "num_head_channels": (0, 64, 64)},
        "discriminator": {"channels": 32, "num_layers_d": 3},
    },
    "paper2d": {
        "input_shape": {2: (256, 256)},
        "autoencoder": {"channels": (128, 128, 256), "latent_channels": 3, "num_res_blocks": 2, "norm_num_groups": 32,
                        "attention_levels": (False, False, False), "with_encoder_nonlocal_attn": False,
                        "with_decoder_nonlocal_attn": False},
        "unet": {"channels": (128, 256, 512), "attention_levels": (False, True, True), "num_res_blocks": 2,
                 "norm_num_groups": 32, "num_head_channels": (0, 256, 512)},
        "discriminator": {"channels": 64, "num_layers_d": 3},
    },
    "paper3d-ct": {
        "input_shape": {3: (64, 64, 64)},
        "autoencoder": {"channels": (32, 64, 64), "latent_channels": 3, "num_res_blocks": 1, "norm_num_groups": 16,
                        "attention_levels": (False, False, True), "with_encoder_nonlocal_attn": False,
                        "with_decoder_nonlocal_attn": False},
        "unet": {"channels": (32, 64, 64), "attention_levels": (False, True, True), "num_res_blocks": 1,
                 "norm_num_groups": 16, "num_head_channels": (0, 64, 64)},
        "discriminator": {"channels": 32, "num_layers_d": 3},
    },
    "paper3d-mri": {
        "input_shape": {3: (32, 128, 128)},
        "autoencoder": {"channels": (32, 64, 64), "latent_channels": 3, "num_res_blocks": 1, "norm_num_groups": 16,
                        "attention_levels": (False, False, False), "with_encoder_nonlocal_attn": False,
                        "with_decoder_nonlocal_attn": False},
        "unet": {"channels": (64, 128, 128), "attention_levels": (False, True, True), "num_res_blocks": 1,
                 "norm_num_groups": 16, "num_head_channels": (0, 64, 64)},
        "discriminator": {"channels": 32, "num_layers_d": 3},
    },
}

# The noise schedule of MONAI's LDM tutorials (and Stable Diffusion): scaled-linear betas over 1000 steps.
NOISE_SCHEDULE = {"schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195}


class LatentDiffusion(nn.Module):
    """An AutoencoderKL and a DiffusionModelUNet over its latents, with the latent scale as a buffer.

    Args:
        spatial_dims: 2 or 3.
        preset: a key of LDM_PRESETS (the model size).
    """

    def __init__(self, spatial_dims: int, preset: str) -> None:
        super().__init__()
        values = LDM_PRESETS[preset]
        self.spatial_dims = spatial_dims
        self.autoencoder = AutoencoderKL(spatial_dims=spatial_dims, in_channels=1, out_channels=1,
                                         **values["autoencoder"])
        latent_channels = values["autoencoder"]["latent_channels"]
        self.unet = DiffusionModelUNet(spatial_dims=spatial_dims, in_channels=latent_channels,
                                       out_channels=latent_channels, **values["unet"])
        self.downsample_factor = 2 ** (len(values["autoencoder"]["channels"]) - 1)
        self.latent_channels = latent_channels
        self.register_buffer("latent_scale", torch.tensor(1.0))

    def latent_shape(self, image_spatial: Sequence[int]) -> tuple[int, ...]:
        """(latent_channels, *spatial / downsample_factor) for images of spatial shape ``image_spatial``."""
        assert all(side % self.downsample_factor == 0 for side in image_spatial), (image_spatial, self.downsample_factor)
        return (self.latent_channels, *(side // self.downsample_factor for side in image_spatial))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, *spatial) -> scaled latents (B, C, *latent_spatial): the encoder mean times latent_scale."""
        z_mu, _ = self.autoencoder.encode(images)
        return z_mu * self.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, *latent_spatial) -> images (B, 1, *spatial)."""
        return self.autoencoder.decode(latents / self.latent_scale)


def build_ldm(preset: str, spatial_dims: int) -> LatentDiffusion:
    if preset not in LDM_PRESETS:
        raise ValueError(f"unknown LDM preset {preset!r}; choose one of {sorted(LDM_PRESETS)}")
    return LatentDiffusion(spatial_dims, preset)


def build_discriminator(preset: str, spatial_dims: int) -> PatchDiscriminator:
    """The PatchGAN discriminator of the adversarial autoencoder loss: (B, 1, *spatial) -> list of feature maps."""
    return PatchDiscriminator(spatial_dims=spatial_dims, in_channels=1, out_channels=1,
                              **LDM_PRESETS[preset]["discriminator"])


def build_perceptual_loss(spatial_dims: int, weights_file: str) -> PerceptualLoss:
    """MONAI's ResNet-50 perceptual loss (2.5D for volumes) from a local torchvision ResNet-50 state dict.

    Nothing is downloaded: the weights must be a local file (e.g. torchvision's resnet50 ImageNet weights, copied in).
    """
    if not Path(weights_file).is_file():
        raise FileNotFoundError(f"perceptual_weights_file {weights_file!r} does not exist; give a local ResNet-50 "
                                "state dict, or set perceptual_weight to 0")
    if importlib.util.find_spec("torchvision") is None:
        raise ModuleNotFoundError("the perceptual loss needs torchvision (pip install torchvision matching torch), "
                                  "or set perceptual_weight to 0")
    return PerceptualLoss(spatial_dims=spatial_dims, network_type="resnet50", is_fake_3d=spatial_dims == 3,
                          fake_3d_ratio=0.25, pretrained=True, pretrained_path=weights_file)


def noise_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, **NOISE_SCHEDULE)


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over latent elements, averaged over the batch: a scalar."""
    per_element = z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1
    return 0.5 * per_element.flatten(1).sum(1).mean()


@dataclass
class Adversary:
    """The optional adversarial part of the autoencoder loss: a discriminator, its optimizer and the loss weight."""

    discriminator: nn.Module
    optimizer: torch.optim.Optimizer
    weight: float
    loss: PatchAdversarialLoss = field(default_factory=lambda: PatchAdversarialLoss(criterion="least_squares"))


def autoencoder_step(autoencoder: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, *,
                     kl_weight: float, adversary: Adversary | None = None, perceptual: nn.Module | None = None,
                     perceptual_weight: float = 0.0, autocast_bf16: bool = False) -> dict[str, float]:
    """One autoencoder update on images (B, 1, *spatial): L1 + kl_weight * KL (+ perceptual, + adversarial).

    ``autoencoder`` may be DDP-wrapped (its forward gives reconstruction, z_mu, z_sigma). With an ``adversary`` the
    discriminator is updated after the autoencoder, on real images and the detached reconstructions in one pass.
    Returns the loss terms as floats: recon (L1), kl, and with an adversary generator_adv and discriminator.
    """
    autoencoder.train()
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        reconstruction, z_mu, z_sigma = autoencoder(images)
        reconstruction = reconstruction.float()
        recon = F.l1_loss(reconstruction, images)
        kl = kl_divergence(z_mu.float(), z_sigma.float())
        loss = recon + kl_weight * kl
        if perceptual is not None:
            loss = loss + perceptual_weight * perceptual(reconstruction, images)
        terms = {"recon": recon, "kl": kl}
        if adversary is not None:
            fake_logits = adversary.discriminator(reconstruction)[-1]
            terms["generator_adv"] = adversary.loss(fake_logits, target_is_real=True, for_discriminator=False)
            loss = loss + adversary.weight * terms["generator_adv"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if adversary is not None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            logits = adversary.discriminator(torch.cat([reconstruction.detach(), images]))[-1].float()
            fake, real = logits.chunk(2)
            terms["discriminator"] = 0.5 * (adversary.loss(fake, target_is_real=False, for_discriminator=True)
                                            + adversary.loss(real, target_is_real=True, for_discriminator=True))
        adversary.optimizer.zero_grad(set_to_none=True)
        terms["discriminator"].backward()
        adversary.optimizer.step()
    return {name: float(value.detach()) for name, value in terms.items()}


@torch.no_grad()
def reconstruction_l1(ldm: LatentDiffusion, images: torch.Tensor) -> float:
    """Mean absolute error of the deterministic reconstruction (decode(encoder mean)) of images (B, 1, *spatial)."""
    ldm.eval()
    return float(F.l1_loss(ldm.autoencoder.reconstruct(images), images))


@torch.no_grad()
def latent_moments(ldm: LatentDiffusion, images: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares) of the unscaled latents of images (B, 1, *spatial), float64 (3,).

    Moments add across batches and workers (all-reduce), so the scale is the same on every worker.
    """
    ldm.eval()
    z_mu, _ = ldm.autoencoder.encode(images)
    z_mu = z_mu.double()
    return torch.stack([torch.tensor(z_mu.numel(), dtype=torch.float64, device=z_mu.device), z_mu.sum(),
                        z_mu.pow(2).sum()])


def latent_scale_from_moments(moments: torch.Tensor) -> float:
    """1 / std of the training latents from summed (count, sum, sum of squares)."""
    count, total, total_sq = (float(v) for v in moments)
    assert count > 1, "no training latents to compute the scale from"
    variance = max(total_sq / count - (total / count) ** 2, 1e-12)
    return float(variance ** -0.5)


class GraphedModule:
    """A module whose training forward and backward replay from CUDA graphs (``torch.cuda.make_graphed_callables``)
    for inputs of the shape they were captured with; other shapes (a last, smaller batch) run it eagerly.

    These networks are bound by kernel launches on a GPU: replaying the captured kernels instead of launching each
    one from Python made the tiny and small UNets' diffusion steps 4.7x / 6.5x the plain MONAI loop's images/s at its
    batch, about 21x at 4x the batch, on an H200 (docs/benchmarks.md). Captured on the first call, in training mode, under bf16 autocast when ``autocast_bf16``
    (without autocast's weight cache, which a graph cannot hold). CUDA only; one process: DDP's gradient hooks
    cannot be captured. Drop-in for the module in ``autoencoder_step`` and ``diffusion_step``.
    """

    def __init__(self, module: nn.Module, autocast_bf16: bool) -> None:
        self.module, self.autocast_bf16 = module, autocast_bf16
        self.graphed: Callable | None = None
        self.shapes: tuple[tuple[int, ...], ...] | None = None

    def train(self, mode: bool = True) -> GraphedModule:
        self.module.train(mode)
        return self

    def __call__(self, *inputs: torch.Tensor, **named: torch.Tensor):
        inputs = inputs + tuple(named.values())  # (x, timesteps=...) as the steps call them, positionally
        shapes = tuple(tuple(tensor.shape) for tensor in inputs)
        if self.graphed is None:
            self.module.train()
            samples = tuple(tensor.detach().clone() for tensor in inputs)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast_bf16, cache_enabled=False):
                self.graphed = torch.cuda.make_graphed_callables(self.module, samples)
            self.shapes = shapes
        if shapes != self.shapes:
            return self.module(*inputs)
        return self.graphed(*inputs)


def diffusion_loss(unet: nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, autocast_bf16: bool = False) -> torch.Tensor:
    """DDPM epsilon-prediction MSE for latents (B, C, *latent_spatial), noise of the same shape, timesteps (B,)."""
    noisy = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=timesteps)
    with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        predicted = unet(noisy, timesteps=timesteps)
    return F.mse_loss(predicted.float(), noise)


def diffusion_step(unet: nn.Module, optimizer: torch.optim.Optimizer, scheduler: DDPMScheduler,
                   latents: torch.Tensor, generator: torch.Generator, autocast_bf16: bool = False) -> float:
    """One UNet update on scaled latents (B, C, *latent_spatial) with random noise and timesteps from ``generator``."""
    unet.train()
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    timesteps = torch.randint(0, scheduler.num_train_timesteps, (latents.shape[0],), generator=generator,
                              device=latents.device)
    loss = diffusion_loss(unet, scheduler, latents, noise, timesteps, autocast_bf16)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def fixed_diffusion_loss(ldm: LatentDiffusion, scheduler: DDPMScheduler, images: torch.Tensor, seed: int = 0,
                         autocast_bf16: bool = False) -> float:
    """Diffusion loss of images (B, 1, *spatial) at evenly spaced timesteps and seeded noise: comparable over epochs."""
    ldm.eval()
    latents = ldm.encode(images)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = torch.linspace(0, scheduler.num_train_timesteps - 1, latents.shape[0]).round().long().to(
        latents.device)
    return float(diffusion_loss(ldm.unet, scheduler, latents, noise, timesteps, autocast_bf16))


def initial_noise(latent_shape: Sequence[int], seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, *latent_shape) standard normal noise, sample i drawn from its own seed: a sample does not depend on its batch."""
    return torch.stack([torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(seed)))
                        for seed in seeds]).to(device)


@torch.no_grad()
def sample_images(ldm: LatentDiffusion, image_spatial: Sequence[int], seeds: Sequence[int], *, ddim_steps: int,
                  num_train_timesteps: int = 1000, value_range: tuple[float, float] = (0.0, 1.0),
                  autocast_bf16: bool = False) -> torch.Tensor:
    """Deterministic DDIM (eta 0) samples, one per seed: float32 (N, 1, *image_spatial) clipped to ``value_range``."""
    ldm.eval()
    device = ldm.latent_scale.device
    scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps, clip_sample=False, **NOISE_SCHEDULE)
    scheduler.set_timesteps(ddim_steps)
    latents = initial_noise(ldm.latent_shape(image_spatial), seeds, device)
    for timestep in scheduler.timesteps.tolist():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            predicted = ldm.unet(latents, timesteps=torch.full((latents.shape[0],), timestep, device=device))
        latents, _ = scheduler.step(predicted.float(), timestep, latents)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        images = ldm.decode(latents)
    return images.float().clamp(*value_range)


def image_grid(images: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0), columns: int = 4) -> np.ndarray:
    """Images (N, 1, *spatial) -> one uint8 (rows * H, columns * W) picture; volumes show their middle slice."""
    planes = images[:, 0]
    while planes.ndim > 3:
        planes = planes[:, planes.shape[1] // 2]
    low, high = value_range
    planes = np.clip((planes - low) / (high - low), 0.0, 1.0)
    rows = -(-len(planes) // columns)
    height, width = planes.shape[1:]
    grid = np.zeros((rows * height, columns * width), dtype=np.float32)
    for index, plane in enumerate(planes):
        row, column = divmod(index, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = plane
    return (grid * 255).round().astype(np.uint8)


def ldm_checkpoint(ldm: LatentDiffusion, *, preset: str, image_shape: Sequence[int], metadata: dict[str, Any]) -> bytes:
    """Everything sampling needs, as bytes: preset, spatial_dims, weights (with latent_scale), image shape, metadata."""
    buffer = io.BytesIO()
    torch.save({"preset": preset, "spatial_dims": ldm.spatial_dims, "image_shape": list(image_shape),
                "model": ldm.state_dict(), "metadata": metadata}, buffer)
    return buffer.getvalue()


def load_ldm(checkpoint: bytes, device: torch.device | str = "cpu",
             source: str = "the LDM checkpoint") -> tuple[LatentDiffusion, dict[str, Any]]:
    """(model in eval mode on ``device``, the checkpoint's other entries) from :func:`ldm_checkpoint` bytes.

    source: the checkpoint's URI, named when it is not an LDM checkpoint (:class:`CheckpointError`).
    """
    state = load_state(checkpoint, source)
    missing = {"preset", "spatial_dims", "image_shape", "model", "metadata"} - set(state)
    if missing:
        raise CheckpointError(f"{source} is not an LDM checkpoint: it lacks {sorted(missing)} "
                              "(`raymem train-ldm` writes <out>/ldm/<run_name>/epoch-<E>/ldm.pt)")
    ldm = build_ldm(state["preset"], state["spatial_dims"])
    ldm.load_state_dict(state.pop("model"))
    return ldm.to(device).eval(), state
