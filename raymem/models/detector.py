"""The contrastive copy detector: encoders, projection head, NT-Xent loss, one training step, embedding.

Paper (Dar et al.): 2D X-ray uses a ResNet-50 with a 1-channel stem and a 128-d output on 512x512 inputs in [0, 1];
3D CT/MR uses a small encoder of stride-2 convolutions with residual blocks and GroupNorm, a 1x1 convolution to 8
channels on a 4^3 grid and a dense head to 32 dimensions. Adam, lr 1e-4 with cosine decay to 5e-5, NT-Xent at
temperature 0.07. The paper starts the 2D ResNet-50 from ImageNet weights; raymem starts from random weights (nothing
is downloaded at run time).

The embedding that audits use is the output of the projection head (``CopyDetector.forward``), as in the paper: the
2D network's final 128-d linear layer and the 3D network's 32-d dense head.

Every encoder serves 2D and 3D inputs: ``spatial_dims`` switches the convolutions, as in MONAI.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import Conv, Norm, Pool
from monai.networks.nets import ResNet
from monai.utils import ensure_tuple_rep
from torch import nn

from raymem.models.checkpoint import CheckpointError, load_state

# Plain-value presets: keyword arguments of CopyDetector (all but spatial_dims). "resnet" backbones are
# monai.networks.nets.ResNet with these arguments; "strided" backbones are StridedResidualEncoder.
DETECTOR_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's 2D detector: torchvision's ResNet-50 layout with a 1-channel stem and a final linear layer to 128.
    "paper2d": {
        "backbone": "resnet",
        "backbone_config": {
            "block": "bottleneck", "layers": (3, 4, 6, 3), "block_inplanes": (64, 128, 256, 512),
            "conv1_t_size": 7, "conv1_t_stride": 2, "no_max_pool": False, "bias_downsample": False,
        },
        "embedding_dim": 128, "projection_hidden": None, "dropout": 0.0,
    },
    # ResNet-18 for smaller 2D runs.
    "small2d": {
        "backbone": "resnet",
        "backbone_config": {
            "block": "basic", "layers": (2, 2, 2, 2), "block_inplanes": (64, 128, 256, 512),
            "conv1_t_size": 7, "conv1_t_stride": 2, "no_max_pool": False, "bias_downsample": False,
        },
        "embedding_dim": 128, "projection_hidden": None, "dropout": 0.0,
    },
    # The paper's 3D detector for CT at 64^3: four stride-2 stages to a 4^3 grid of 8 channels, 512 -> 128 -> 32.
    # For MRNet volumes (32x256x256) the paper downsamples by (8, 64, 64): six stages with strides
    # ((2,2,2),) * 3 + ((1,2,2),) * 3 and channels up to 1024 (override backbone_config).
    "paper3d": {
        "backbone": "strided",
        "backbone_config": {
            "stem_channels": 16, "channels": (32, 64, 128, 256), "strides": (2, 2, 2, 2),
            "num_groups": 8, "out_channels": 8, "pooled_size": 4,
        },
        "embedding_dim": 32, "projection_hidden": 128, "dropout": 0.5,
    },
    # The paper's 3D design shrunk for CPU tests: 32 pixels per side -> 4 in three stages.
    "tiny": {
        "backbone": "strided",
        "backbone_config": {
            "stem_channels": 8, "channels": (8, 16, 32), "strides": (2, 2, 2),
            "num_groups": 4, "out_channels": 8, "pooled_size": 4,
        },
        "embedding_dim": 32, "projection_hidden": 64, "dropout": 0.0,
    },
}

# Input side length (pixels per spatial axis) each preset is designed for.
PRESET_INPUT_SIZE: dict[str, int] = {"paper2d": 512, "small2d": 256, "paper3d": 64, "tiny": 32}


class StridedResidualEncoder(nn.Module):
    """Stride-2 convolutions, each followed by a residual block with GroupNorm (the paper's 3D encoder, any dims).

    Input (B, in_channels, *spatial) -> output (B, out_channels * pooled_size ** spatial_dims): the last stage is
    projected to ``out_channels`` by a 1x1 convolution, average-pooled to a ``pooled_size`` grid per axis (a no-op
    when the strides already give that grid) and flattened, so the layout of features in the image is kept.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        stem_channels: channels of the first 3x3 convolution.
        channels: output channels of each stage.
        strides: per stage, a stride for every axis (int) or per axis (sequence).
        num_groups: GroupNorm groups (must divide every stage's channels).
        out_channels: channels of the 1x1 projection before flattening.
        pooled_size: grid size per axis before flattening.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        stem_channels: int,
        channels: Sequence[int],
        strides: Sequence[int | Sequence[int]],
        num_groups: int,
        out_channels: int,
        pooled_size: int,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.stem = conv(in_channels, stem_channels, kernel_size=3, padding=1)
        stages = []
        previous = stem_channels
        for stage_channels, stride in zip(channels, strides, strict=True):
            stride = ensure_tuple_rep(stride, spatial_dims)
            # A kernel of stride + 2 with padding 1 gives floor(n / stride) outputs: the paper's 4-wide stride-2
            # kernels, and 3-wide ones on an axis a stage leaves at full size.
            kernel_size = tuple(s + 2 for s in stride)
            stages.append(
                nn.Sequential(
                    conv(previous, stage_channels, kernel_size=kernel_size, stride=stride, padding=1),
                    _ResidualBlock(spatial_dims, stage_channels, num_groups),
                )
            )
            previous = stage_channels
        self.stages = nn.Sequential(*stages)
        self.final = nn.Sequential(Norm[Norm.GROUP, spatial_dims](num_groups, previous), nn.SiLU())
        self.project = conv(previous, out_channels, kernel_size=1)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](pooled_size)
        self.out_features = out_channels * pooled_size**spatial_dims

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.project(self.final(self.stages(self.stem(images))))
        return self.pool(features).flatten(1)


class _ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus the input; shape preserved."""

    def __init__(self, spatial_dims: int, channels: int, num_groups: int) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        group_norm = Norm[Norm.GROUP, spatial_dims]
        self.body = nn.Sequential(
            group_norm(num_groups, channels), nn.SiLU(), conv(channels, channels, kernel_size=3, padding=1),
            group_norm(num_groups, channels), nn.SiLU(), conv(channels, channels, kernel_size=3, padding=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.body(features)


class CopyDetector(nn.Module):
    """Encoder plus projection head: images (B, in_channels, *spatial) -> embeddings (B, embedding_dim).

    Args:
        spatial_dims: 2 or 3.
        backbone: "resnet" (monai.networks.nets.ResNet, global average pooling) or "strided"
            (StridedResidualEncoder).
        backbone_config: keyword arguments of that backbone, without spatial_dims and input channels.
        embedding_dim: output size; the embedding the audits use.
        projection_hidden: hidden width of a two-layer head (Linear -> ReLU -> Dropout -> Linear), or None for a
            single linear layer (the paper's 2D head).
        dropout: dropout in the two-layer head (active in training only).
        in_channels: image channels (1 for the medical images raymem handles).
    """

    def __init__(
        self,
        spatial_dims: int,
        backbone: str,
        backbone_config: dict[str, Any],
        embedding_dim: int,
        projection_hidden: int | None = None,
        dropout: float = 0.0,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims = {spatial_dims}: the copy detector takes 2D or 3D images (2 or 3)")
        self.config = {
            "spatial_dims": spatial_dims, "backbone": backbone, "backbone_config": dict(backbone_config),
            "embedding_dim": embedding_dim, "projection_hidden": projection_hidden, "dropout": dropout,
            "in_channels": in_channels,
        }
        if backbone == "resnet":
            self.encoder = ResNet(
                spatial_dims=spatial_dims, n_input_channels=in_channels, feed_forward=False, **backbone_config
            )
            feature_dim = self.encoder.in_planes  # channels of the last stage, after global pooling
        elif backbone == "strided":
            self.encoder = StridedResidualEncoder(spatial_dims, in_channels, **backbone_config)
            feature_dim = self.encoder.out_features
        else:
            raise ValueError(f"backbone = {backbone!r}: choose 'resnet' or 'strided'")
        if projection_hidden is None:
            self.head = nn.Linear(feature_dim, embedding_dim)
        else:
            self.head = nn.Sequential(
                nn.Linear(feature_dim, projection_hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(projection_hidden, embedding_dim),
            )

    @property
    def embedding_dim(self) -> int:
        return self.config["embedding_dim"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, in_channels, *spatial) -> embeddings (B, embedding_dim)."""
        return self.head(self.encoder(images))


def build_detector(preset: str, spatial_dims: int, **overrides: Any) -> CopyDetector:
    """A randomly initialised detector from ``DETECTOR_PRESETS[preset]``, with any constructor argument overridden."""
    if preset not in DETECTOR_PRESETS:
        raise ValueError(f"detector preset {preset!r} is unknown: choose one of {sorted(DETECTOR_PRESETS)}")
    return CopyDetector(spatial_dims=spatial_dims, **{**DETECTOR_PRESETS[preset], **overrides})


def detector_checkpoint(model: CopyDetector, preset: str) -> dict[str, Any]:
    """The checkpoint dict: {"preset", "spatial_dims", "state_dict", "embedding_dim", "config"}; tensors on CPU.

    ``config`` holds every CopyDetector argument, so ``load_detector`` rebuilds the model without the preset table.
    Serialise it with ``torch.save``.
    """
    config = dict(model.config)
    return {
        "preset": preset,
        "spatial_dims": config.pop("spatial_dims"),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "embedding_dim": model.embedding_dim,
        "config": config,
    }


def load_detector(checkpoint: dict[str, Any] | bytes, source: str = "the detector checkpoint") -> CopyDetector:
    """Rebuild a detector (in eval mode, on CPU) from ``detector_checkpoint``'s dict or its ``torch.save`` bytes.

    source: the checkpoint's URI, named when it is not a detector checkpoint (:class:`CheckpointError`).
    """
    if isinstance(checkpoint, bytes):
        checkpoint = load_state(checkpoint, source)
    missing = {"spatial_dims", "state_dict", "config"} - set(checkpoint)
    if missing:
        raise CheckpointError(f"{source} is not a detector checkpoint: it lacks {sorted(missing)} "
                              "(`raymem train-detector` writes <out>/detector/<run_name>/detector.pt)")
    model = CopyDetector(spatial_dims=checkpoint["spatial_dims"], **checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    patient_ids: Sequence[Any] | torch.Tensor | None = None,
    temperature: float = 0.07,
) -> torch.Tensor:
    """NT-Xent (InfoNCE) over two views, patient-aware. Returns a scalar loss.

    z1, z2: (B, d) embeddings of the two views of B images (row i of each is the same image).
    patient_ids: (B,) patient of each image, or None when every image counts as its own patient (the paper's loss).

    Among the 2B embeddings, the positives of an anchor are all other embeddings of the same patient (its other view,
    and both views of the patient's other images); its negatives are the embeddings of other patients, so
    same-patient pairs are never negatives. For each anchor i and positive p the loss is
    -log(exp(s_ip) / (exp(s_ip) + sum_n exp(s_in))) with s the cosine similarity divided by the temperature and n over
    i's negatives; it is averaged over i's positives, then over anchors. With one image per patient this is exactly
    SimCLR's NT-Xent. Computed in float32 whatever the input dtype.
    """
    batch = z1.shape[0]
    assert z1.shape == z2.shape and z1.dim() == 2, (z1.shape, z2.shape)
    # The patients are counted on the host: a check on the device tensors would make every GPU step wait on a read-back.
    if patient_ids is None:
        n_patients = batch
        patient_codes = torch.arange(batch, device=z1.device)
    else:
        ids = patient_ids.cpu().numpy() if isinstance(patient_ids, torch.Tensor) else np.asarray(patient_ids)
        assert len(ids) == batch, (len(ids), batch)
        patients, codes_on_host = np.unique(ids, return_inverse=True)
        n_patients = len(patients)
        patient_codes = torch.from_numpy(codes_on_host.reshape(-1)).to(z1.device)
    if n_patients < 2:
        raise ValueError("the batch holds images of one patient only: contrastive training needs at least two patients")
    codes = torch.cat([patient_codes, patient_codes])
    same_patient = codes[:, None] == codes[None, :]
    embeddings = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = embeddings @ embeddings.T / temperature  # (2B, 2B)
    positive = same_patient & ~torch.eye(2 * batch, dtype=torch.bool, device=z1.device)
    negatives_logsumexp = logits.masked_fill(same_patient, float("-inf")).logsumexp(dim=1, keepdim=True)
    # -log(e^s / (e^s + e^N)) = softplus(N - s): stable, and the other positives stay out of the denominator.
    pair_loss = F.softplus(negatives_logsumexp - logits)
    anchor_loss = (pair_loss * positive).sum(dim=1) / positive.sum(dim=1)
    return anchor_loss.mean()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    patient_ids: Sequence[Any] | torch.Tensor | None,
    augment: Callable[[torch.Tensor], torch.Tensor],
    *,
    temperature: float = 0.07,
    autocast_bf16: bool = False,
) -> float:
    """One optimisation step on a batch; returns the loss.

    images: (B, 1, *spatial) on the model's device. As in the paper, a positive pair is an image and an augmented view
    of itself: the views are ``images`` and ``augment(images)`` (e.g. ``functools.partial(random_transform,
    bounds=TRANSFORM_PRESETS["paper"], generator=g)``). patient_ids: see ``nt_xent_loss``. autocast_bf16: run the
    forward pass under bfloat16 autocast (no loss scaling needed); the loss is computed in float32.
    """
    model.train()
    with torch.no_grad():
        views = torch.cat([images, augment(images)])
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        embeddings = model(views)
    z1, z2 = embeddings.float().chunk(2)
    loss = nt_xent_loss(z1, z2, patient_ids, temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def cosine_lr(step: int, total_steps: int, lr_initial: float = 1e-4, lr_final: float = 5e-5) -> float:
    """Learning rate at ``step`` of ``total_steps``: cosine decay from lr_initial to lr_final (paper: 1e-4 -> 5e-5)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return lr_final + 0.5 * (lr_initial - lr_final) * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def embed(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    batch_size: int = 64,
    *,
    autocast_bf16: bool = False,
) -> np.ndarray:
    """Embeddings (N, d) float32 of ``images`` (N, 1, *spatial), moved batch by batch to the model's device.

    Puts the model in eval mode (dropout off, BatchNorm running statistics).
    """
    model.eval()
    device = next(model.parameters()).device
    images = torch.as_tensor(images)
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device, torch.float32, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            chunks.append(model(batch).float().cpu())
    return torch.cat(chunks).numpy()
