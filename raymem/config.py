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

    format: Literal["auto", "nifti", "dicom", "png", "medmnist"] = Field(
        default="auto", description="input format; 'auto': per file, by extension (DICOM also by its marker)")
    spatial_dims: Literal[2, 3] = Field(
        default=2, description="axes per image; images with another number of axes are set aside")
    size: tuple[int, ...] = Field(default=(64, 64), description="output shape per spatial axis, (H, W) or (D, H, W)")
    fit: Literal["resize", "crop_or_pad"] = Field(
        default="resize", description="how images reach size: 'resize' resamples (field of view kept, spacing "
                                      "scaled); 'crop_or_pad' centre-crops or pads with the image minimum")
    modality: Literal["auto", "CT", "MR", "XR", "OT"] = Field(
        default="auto", description="override the modality (NIfTI and PNG files carry none)")
    intensity_range: tuple[float, float] = Field(
        default=(0.0, 1.0), description="(low, high) that every image's intensities are mapped onto")
    ct_window_hu: tuple[float, float] = Field(
        default=(-1000.0, 1000.0), description="CT window (HU): clipped and mapped onto intensity_range")
    percentiles: tuple[float, float] = Field(default=(0.5, 99.5), description="MR/X-ray intensity scaling percentiles")
    dtype: Literal["float16", "float32"] = Field(default="float16", description="dtype of the images in the shards")
    patient_pattern: str = Field(
        default="auto",
        description="how a file's path names its patient (NIfTI, PNG; DICOM without PatientID): 'auto' = the first "
                    "folder below the folders all files share (patient/image, patient/study/series/image); or a "
                    "regex over the path relative to SRC whose group (?P<patient>...) names the patient")
    val_fraction: float = Field(
        default=0.1, ge=0.0, le=0.5,
        description="share of patients in the validation split (the audit's null); MedMNIST keeps its own splits")
    test_fraction: float = Field(default=0.1, ge=0.0, le=0.5, description="share of patients in the test split")
    seed: int = Field(default=0, description="seed of the patient split")
    max_file_mb: float = Field(default=2048.0, gt=0, description="larger files (MiB) are set aside unread")
    max_voxels: int = Field(default=512**3, gt=0, description="images with more voxels (before fitting) are set aside")
    strict: bool = Field(
        default=False, description="stop at the first bad file instead of setting it aside in quarantine.parquet")
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
        if pattern == "auto":
            return pattern
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

    enabled: bool = Field(default=True, description="off: training images are used as stored")
    flip_prob: float = Field(
        default=0.5, ge=0.0, le=1.0, description="probability of a left-right flip (last spatial axis); the paper: 0.5")
    rotate_prob: float = Field(
        default=0.5, ge=0.0, le=1.0, description="probability of a rotation in the (H, W) plane; the paper: 0.5")
    max_rotation_deg: float = Field(
        default=5.0, ge=0.0, le=180.0, description="angle drawn uniformly in +- this (degrees); the paper: 5")


class AuditConfig(_Strict):
    """The memorization audit's search and threshold settings (paper values as defaults)."""

    percentile: float = Field(
        default=95.0, gt=0.0, lt=100.0,
        description="P of the threshold ('paper': the P-th percentile of each training sample's best "
                    "validation correlation); the paper: 95")
    top_k: int = Field(
        default=5, ge=1, le=1000, description="training neighbours kept per synthetic sample in matches.parquet")
    calibration: Literal["paper", "matched", "generator"] = Field(
        default="paper",
        description="the headline null (all available are reported): 'paper', each training sample's best "
                    "validation match; 'matched', each validation sample's best training match for copies and a "
                    "max-of-n quantile for memorized samples; 'generator', the matched construction on the samples "
                    "of a generator trained on held-out patients (needs them) (raymem.audit.metrics)")
    reference: Literal["generator", "all"] = Field(
        default="generator",
        description="the training set the generated samples are compared with: 'generator', the generator's own "
                    "training set when the synthetic set comes from a raymem LDM run (its training_ids.json), else "
                    "the whole train split; 'all', always the whole train split")
    plant_copies: int = Field(
        default=0, ge=0,
        description="N known copies mixed into the synthetic set and scored: transformed training images, plus N "
                    "transformed held-out ones as known novel (image audit); noisy training embeddings "
                    "(embedding audit)")
    seed: int = Field(default=0, description="draws the planted samples, the bootstraps of the intervals and, "
                                             "without a test split, the validation halves (by patient)")


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
    run_name: str = Field(
        default="detector", pattern=r"^[A-Za-z0-9_.-]+$",
        description="names the checkpoints and the MLflow run detector/<run_name>; the same name resumes")
    preset: Literal["tiny", "small2d", "paper2d", "paper3d"] = Field(
        default="tiny",
        description="encoder: 'paper2d' ResNet-50 to 128-d (512 px), 'small2d' ResNet-18 (256 px), 'paper3d' "
                    "strided 3D encoder to 32-d (64^3), 'tiny' a small strided encoder (32 px, CPU tests)")
    epochs: int = Field(default=200, ge=1, le=100_000, description="the paper: 200")
    batch_size: int = Field(default=64, ge=2, le=4096, description="per worker; the paper: 64 (2D), 10 (3D)")
    lr_initial: float = Field(default=1e-4, gt=0, description="Adam learning rate at the first epoch; the paper: 1e-4")
    lr_final: float = Field(
        default=5e-5, ge=0, description="end of the cosine decay from lr_initial over epochs; the paper: 5e-5")
    temperature: float = Field(default=0.07, gt=0, le=10, description="NT-Xent temperature; the paper: 0.07")
    augmentation: Literal["paper", "strong"] = Field(
        default="paper",
        description="positive-pair views: 'paper', flip p=0.5 and rotation up to 5 degrees p=0.5; 'strong' adds "
                    "crop, contrast, gamma, noise and blur")
    patient_aware: bool = Field(default=True, description="same-patient images are positives, never negatives")
    num_workers: int = Field(default=2, ge=1, le=1024, description="Ray Train workers (DDP processes)")
    use_gpu: bool = Field(default=False, description="one GPU per worker (bfloat16 autocast)")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs Ray reserves per worker")
    checkpoint_every: int = Field(default=1, ge=1, description="epochs between checkpoints (the last always saved)")
    eval_every: int = Field(default=5, ge=1, description="epochs between validation accuracy runs (rank 0)")
    eval_max_images: int = Field(
        default=512, ge=8, description="validation images scored for copy retrieval against the baselines")
    max_failures: int = Field(
        default=2, ge=0, description="restarts from the latest checkpoint after a worker failure, then give up")
    experiment: str = Field(default="raymem", description="MLflow experiment")
    seed: int = Field(
        default=0, description="initial weights (the same on every worker), per-epoch augmentation, evaluation copies")
    fail_at_epoch: int | None = Field(default=None, description="test-only: crash a worker once at this epoch")


class EmbedConfig(_Strict):
    """Embedding a dataset with a trained detector (``raymem embed``)."""

    detector: str = Field(description="detector checkpoint URI (detector.pt)")
    data: str = Field(description="dataset URI")
    out: str = Field(description="output URI: <out>/<split>/part-*.parquet in the embedding schema")
    splits: tuple[str, ...] = Field(
        default=("train", "val", "test"), description="dataset splits to embed (empty ones skipped)")
    batch_size: int = Field(default=64, ge=1, description="images per detector forward pass")
    num_actors: int = Field(default=2, ge=1, description="Ray Data actors, each holding one detector")
    use_gpu: bool = Field(default=False, description="one GPU per actor")


class LDMTrainConfig(_Strict):
    """Latent diffusion model training (``raymem train-ldm``): autoencoder epochs, then diffusion epochs.

    Epochs are numbered across both stages: 0 .. autoencoder_epochs-1 train the autoencoder, the rest the diffusion
    UNet; checkpoints are <out>/ldm/<run_name>/epoch-<E>. Loss settings default to MONAI's LDM tutorials.
    """

    dataset: str = Field(description="dataset URI (a committed raymem dataset)")
    out: str = Field(description="storage root URI: checkpoints under <out>/ldm/<run_name>")
    run_name: str = Field(
        default="ldm", pattern=r"^[A-Za-z0-9_.-]+$",
        description="names the checkpoints and the MLflow run ldm/<run_name>; the same name resumes")
    preset: Literal["tiny", "small", "paper2d", "paper3d-ct", "paper3d-mri"] = Field(
        default="tiny", description="model size (a study factor)")
    split: Literal["train", "test"] = Field(
        default="train", description="the split trained on; 'test': the generator-null (the same LDM trained only on "
                                     "held-out patients, whose samples are audited against the training set)")
    train_size: int | None = Field(
        default=None, ge=1, description="nested subset size of the split trained on (None: all)")
    subset_seed: int = Field(default=0, description="for one seed, the subset of size n lies inside that of size m > n")
    augment: AugmentConfig = Field(default=AugmentConfig(enabled=False), description="a study factor")
    autoencoder_epochs: int = Field(default=100, ge=1, le=100_000, description="epochs of the first stage")
    diffusion_epochs: int = Field(
        default=300, ge=1, le=100_000, description="epochs of the diffusion UNet after the autoencoder's; a study "
                                                   "factor (training length)")
    batch_size: int = Field(default=8, ge=1, le=4096, description="per worker")
    epoch_repeats: int = Field(
        default=1, ge=1, le=10_000,
        description="passes over the worker's shard per epoch, held in memory after the first: for tiny training "
                    "subsets (memorization studies), where Ray Data's start per pass would dominate")
    lr_autoencoder: float = Field(default=1e-4, gt=0, description="Adam learning rate of the autoencoder")
    lr_diffusion: float = Field(default=1e-4, gt=0, description="Adam learning rate of the diffusion UNet")
    kl_weight: float = Field(default=1e-6, ge=0, description="autoencoder loss: L1 + kl_weight * KL")
    adversarial_weight: float = Field(default=0.0, ge=0, description="> 0 adds the PatchGAN loss (MONAI tutorial: 0.01)")
    lr_discriminator: float = Field(
        default=5e-4, gt=0, description="Adam learning rate of the PatchGAN (when adversarial_weight > 0)")
    perceptual_weight: float = Field(default=0.0, ge=0, description="> 0 needs perceptual_weights_file")
    perceptual_weights_file: str | None = Field(default=None, description="local torchvision ResNet-50 state dict")
    num_train_timesteps: int = Field(
        default=1000, ge=10, le=10_000, description="DDPM noise steps (scaled-linear schedule); kept for sampling")
    ddim_steps: int = Field(default=50, ge=1, le=1000, description="DDIM steps for the sample grid")
    num_workers: int = Field(default=2, ge=1, le=1024, description="Ray Train workers (DDP processes)")
    use_gpu: bool = Field(default=False, description="one GPU per worker (bfloat16 autocast)")
    cuda_graphs: bool = Field(
        default=False,
        description="replay the autoencoder's and the UNet's training forward and backward from CUDA graphs "
                    "(needs use_gpu and one worker): these networks wait on kernel launches, and replay made the "
                    "small presets' steps many times faster on an H200 (docs/benchmarks.md)")
    cpus_per_worker: float = Field(
        default=1.0, gt=0, description="CPUs Ray reserves per worker; also its torch thread count")
    checkpoint_every: int = Field(default=1, ge=1, description="epochs between checkpoints (the last always saved)")
    keep_checkpoints: int | None = Field(
        default=None, ge=1, description="the most recent checkpoints kept, besides keep_epochs (older ones are "
                                        "deleted as training goes; each holds the model and its optimisers); None: "
                                        "every checkpoint, so any saved epoch can be sampled")
    keep_epochs: list[int] = Field(
        default_factory=list, description="epochs whose checkpoints are never deleted (a sweep: the audited ones)")
    grid_every: int = Field(default=10, ge=1, description="diffusion epochs between sample grids logged to MLflow")
    grid_samples: int = Field(default=8, ge=1, le=64, description="images per logged sample grid")
    eval_max_images: int = Field(default=32, ge=1, description="validation and fixed-batch images (rank 0)")
    max_failures: int = Field(
        default=2, ge=0, description="restarts from the latest checkpoint after a worker failure, then give up")
    experiment: str = Field(default="raymem", description="MLflow experiment")
    seed: int = Field(
        default=0, description="initial weights (the same on every worker), per-epoch augmentation, order and noise")
    fail_at_epoch: int | None = Field(default=None, description="test-only: crash a worker once at this epoch")

    @model_validator(mode="after")
    def _perceptual_needs_weights(self) -> LDMTrainConfig:
        if self.perceptual_weight > 0 and not self.perceptual_weights_file:
            raise ValueError("perceptual_weights_file: needed when perceptual_weight > 0 (nothing is downloaded)")
        if self.cuda_graphs and not (self.use_gpu and self.num_workers == 1):
            raise ValueError(f"cuda_graphs: needs use_gpu: true and num_workers: 1 (got use_gpu {self.use_gpu}, "
                             f"num_workers {self.num_workers}); DDP's gradient hooks cannot be captured in a graph")
        return self


class SampleConfig(_Strict):
    """Sampling a trained LDM at scale (``raymem sample``) into a synthetic dataset."""

    run: str = Field(description="the training run's folder URI: <out>/ldm/<run_name>")
    epoch: int | None = Field(default=None, ge=0, description="checkpoint epoch; None: the latest")
    n: int = Field(ge=1, description="number of synthetic samples")
    out: str = Field(description="output dataset URI (shard schema; patient_id 'synthetic')")
    ddim_steps: int = Field(default=50, ge=1, le=1000, description="DDIM denoising steps per sample")
    seed: int = Field(default=0, description="base seed; sample i uses sample_seed(seed, i), recorded in its source")
    batch_size: int = Field(default=16, ge=1, description="samples generated together per actor call")
    num_actors: int = Field(default=2, ge=1, description="Ray Data actors, each holding one LDM")
    use_gpu: bool = Field(default=False, description="one GPU per actor")
