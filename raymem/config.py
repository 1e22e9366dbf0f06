"""Typed configuration: every default, range and preset name lives here.

Configs are YAML files validated on load; a bad value raises :class:`ConfigError` naming the field and what it
accepts. CLI flags override file values (``--set section.field=value`` style overrides are applied before
validation, so they are checked the same way).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raymem import storage


class ConfigError(ValueError):
    """A configuration value out of range or of the wrong type; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestConfig(_Strict):
    """How raw images become a sharded dataset (``raymem ingest``)."""

    format: Literal["auto", "nifti", "dicom", "png", "medmnist"] = "auto"
    spatial_dims: Literal[2, 3] = 2
    size: tuple[int, ...] = Field(default=(64, 64), description="output shape per spatial axis, (H, W) or (D, H, W)")
    fit: Literal["resize", "crop_or_pad"] = "resize"
    modality: Literal["auto", "CT", "MR", "XR", "OT"] = Field(
        default="auto", description="override the modality (NIfTI and PNG files carry none)")
    intensity_range: tuple[float, float] = (0.0, 1.0)
    ct_window_hu: tuple[float, float] = (-1000.0, 1000.0)
    percentiles: tuple[float, float] = Field(default=(0.5, 99.5), description="MR/X-ray intensity scaling percentiles")
    dtype: Literal["float16", "float32"] = "float16"
    patient_pattern: str = Field(
        default=r"(?P<patient>[^/]+)/[^/]+$",
        description="regex over the path relative to SRC; its 'patient' group names the patient (NIfTI, PNG)")
    val_fraction: float = Field(default=0.1, ge=0.0, le=0.5)
    test_fraction: float = Field(default=0.1, ge=0.0, le=0.5)
    seed: int = 0
    max_file_mb: float = Field(default=2048.0, gt=0)
    max_voxels: int = Field(default=512**3, gt=0)
    strict: bool = False
    synthetic: bool = Field(
        default=False, description="images from a generator: no patients (patient_id 'synthetic'), paths kept as source")

    @field_validator("size")
    @classmethod
    def _size_range(cls, size: tuple[int, ...]) -> tuple[int, ...]:
        if not all(4 <= s <= 4096 for s in size):
            raise ValueError(f"every entry must be in [4, 4096], got {list(size)}")
        return size

    @field_validator("patient_pattern")
    @classmethod
    def _pattern_has_group(cls, pattern: str) -> str:
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from err
        if "patient" not in compiled.groupindex:
            raise ValueError("needs a named group (?P<patient>...)")
        return pattern

    @model_validator(mode="before")
    @classmethod
    def _expand_size(cls, values: Any) -> Any:
        # `size: 64` (or `--size 64`) means 64 along every spatial axis.
        size = values.get("size") if isinstance(values, dict) else None
        if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1):
            side = size if isinstance(size, int) else size[0]
            values = {**values, "size": (side,) * int(values.get("spatial_dims", 2))}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> IngestConfig:
        if len(self.size) != self.spatial_dims:
            raise ValueError(f"size: needs {self.spatial_dims} entries for spatial_dims={self.spatial_dims}, "
                             f"got {list(self.size)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction: must leave patients for training (sum < 1)")
        lo, hi = self.intensity_range
        if not lo < hi:
            raise ValueError(f"intensity_range: low must be below high, got {[lo, hi]}")
        return self


class AugmentConfig(_Strict):
    """Training-time augmentation (the paper's: flip p=0.5, rotation up to 5 degrees p=0.5). A study factor."""

    enabled: bool = True
    flip_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    rotate_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    max_rotation_deg: float = Field(default=5.0, ge=0.0, le=180.0)


class AuditConfig(_Strict):
    """The memorization audit's search and threshold settings (paper values as defaults)."""

    percentile: float = Field(default=95.0, gt=0.0, lt=100.0)
    top_k: int = Field(default=5, ge=1, le=1000)
    calibration: Literal["paper", "matched"] = "paper"
    plant_copies: int = Field(default=0, ge=0)
    seed: int = 0


def _format_errors(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or model.__name__
        lines.append(f"  {field}: {item['msg']} (got {item.get('input')!r})")
    return f"invalid {model.__name__}:\n" + "\n".join(lines)


def validate(model: type[BaseModel], values: dict[str, Any]) -> Any:
    """Build a config from plain values; :class:`ConfigError` names each bad field."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, model)) from None


def load(model: type[BaseModel], uri: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """Load a YAML config file (local or s3://), apply overrides (None values ignored) and validate."""
    values: dict[str, Any] = {}
    if uri is not None:
        try:
            loaded = yaml.safe_load(storage.read_bytes(uri)) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{uri} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{uri} must hold a mapping of field: value, got {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return validate(model, values)


class DetectorTrainConfig(_Strict):
    """Contrastive copy-detector training (``raymem train-detector``); paper values as defaults where it gives them."""

    dataset: str = Field(description="dataset URI (a committed raymem dataset)")
    out: str = Field(description="storage root URI: checkpoints under <out>/detector/<run_name>")
    run_name: str = Field(default="detector", pattern=r"^[A-Za-z0-9_.-]+$")
    preset: Literal["tiny", "small2d", "paper2d", "paper3d"] = "tiny"
    epochs: int = Field(default=200, ge=1, le=100_000)
    batch_size: int = Field(default=64, ge=2, le=4096, description="per worker; the paper: 64 (2D), 10 (3D)")
    lr_initial: float = Field(default=1e-4, gt=0)
    lr_final: float = Field(default=5e-5, ge=0)
    temperature: float = Field(default=0.07, gt=0, le=10)
    augmentation: Literal["paper", "strong"] = "paper"
    patient_aware: bool = Field(default=True, description="same-patient images are positives, never negatives")
    num_workers: int = Field(default=2, ge=1, le=1024)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    checkpoint_every: int = Field(default=1, ge=1)
    eval_every: int = Field(default=5, ge=1, description="epochs between validation accuracy runs (rank 0)")
    eval_max_images: int = Field(default=512, ge=8)
    max_failures: int = Field(default=2, ge=0)
    experiment: str = "raymem"
    seed: int = 0
    fail_at_epoch: int | None = Field(default=None, description="test-only: crash a worker once at this epoch")


class EmbedConfig(_Strict):
    """Embedding a dataset with a trained detector (``raymem embed``)."""

    detector: str = Field(description="detector checkpoint URI (detector.pt)")
    data: str = Field(description="dataset URI")
    out: str = Field(description="output URI: <out>/<split>/part-*.parquet in the embedding schema")
    splits: tuple[str, ...] = ("train", "val", "test")
    batch_size: int = Field(default=64, ge=1)
    num_actors: int = Field(default=2, ge=1)
    use_gpu: bool = False


class LDMTrainConfig(_Strict):
    """Latent diffusion model training (``raymem train-ldm``): autoencoder epochs, then diffusion epochs.

    Epochs are numbered across both stages: 0 .. autoencoder_epochs-1 train the autoencoder, the rest the diffusion
    UNet; checkpoints are <out>/ldm/<run_name>/epoch-<E>. Loss settings default to MONAI's LDM tutorials.
    """

    dataset: str = Field(description="dataset URI (a committed raymem dataset)")
    out: str = Field(description="storage root URI: checkpoints under <out>/ldm/<run_name>")
    run_name: str = Field(default="ldm", pattern=r"^[A-Za-z0-9_.-]+$")
    preset: Literal["tiny", "small", "paper2d", "paper3d-ct", "paper3d-mri"] = Field(
        default="tiny", description="model size (a study factor)")
    train_size: int | None = Field(default=None, ge=1, description="nested training subset size (None: all)")
    subset_seed: int = Field(default=0, description="for one seed, the subset of size n lies inside that of size m > n")
    augment: AugmentConfig = Field(default=AugmentConfig(enabled=False), description="a study factor")
    autoencoder_epochs: int = Field(default=100, ge=1, le=100_000)
    diffusion_epochs: int = Field(default=300, ge=1, le=100_000)
    batch_size: int = Field(default=8, ge=1, le=4096, description="per worker")
    epoch_repeats: int = Field(
        default=1, ge=1, le=10_000,
        description="passes over the worker's shard per epoch, held in memory after the first: for tiny training "
                    "subsets (memorization studies), where Ray Data's start per pass would dominate")
    lr_autoencoder: float = Field(default=1e-4, gt=0)
    lr_diffusion: float = Field(default=1e-4, gt=0)
    kl_weight: float = Field(default=1e-6, ge=0)
    adversarial_weight: float = Field(default=0.0, ge=0, description="> 0 adds the PatchGAN loss (MONAI tutorial: 0.01)")
    lr_discriminator: float = Field(default=5e-4, gt=0)
    perceptual_weight: float = Field(default=0.0, ge=0, description="> 0 needs perceptual_weights_file")
    perceptual_weights_file: str | None = Field(default=None, description="local torchvision ResNet-50 state dict")
    num_train_timesteps: int = Field(default=1000, ge=10, le=10_000)
    ddim_steps: int = Field(default=50, ge=1, le=1000, description="DDIM steps for the sample grid")
    num_workers: int = Field(default=2, ge=1, le=1024)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    checkpoint_every: int = Field(default=1, ge=1, description="epochs between checkpoints (the last always saved)")
    grid_every: int = Field(default=10, ge=1, description="diffusion epochs between sample grids logged to MLflow")
    grid_samples: int = Field(default=8, ge=1, le=64)
    eval_max_images: int = Field(default=32, ge=1, description="validation and fixed-batch images (rank 0)")
    max_failures: int = Field(default=2, ge=0)
    experiment: str = "raymem"
    seed: int = 0
    fail_at_epoch: int | None = Field(default=None, description="test-only: crash a worker once at this epoch")

    @model_validator(mode="after")
    def _perceptual_needs_weights(self) -> LDMTrainConfig:
        if self.perceptual_weight > 0 and not self.perceptual_weights_file:
            raise ValueError("perceptual_weights_file: needed when perceptual_weight > 0 (nothing is downloaded)")
        return self


class SampleConfig(_Strict):
    """Sampling a trained LDM at scale (``raymem sample``) into a synthetic dataset."""

    run: str = Field(description="the training run's folder URI: <out>/ldm/<run_name>")
    epoch: int | None = Field(default=None, ge=0, description="checkpoint epoch; None: the latest")
    n: int = Field(ge=1, description="number of synthetic samples")
    out: str = Field(description="output dataset URI (shard schema; patient_id 'synthetic')")
    ddim_steps: int = Field(default=50, ge=1, le=1000)
    seed: int = Field(default=0, description="base seed; sample i uses sample_seed(seed, i), recorded in its source")
    batch_size: int = Field(default=16, ge=1)
    num_actors: int = Field(default=2, ge=1)
    use_gpu: bool = False
