"""Ray Train (V2) loop for the latent diffusion model: autoencoder epochs, then diffusion epochs, DDP over workers.

The science (networks, losses, latent scale, DDIM sampling) is in raymem.models.ldm; this module streams data,
schedules epochs, checkpoints, retries and logs. Epochs are numbered across both stages (0 .. autoencoder_epochs-1
train the autoencoder, the rest the UNet) and checkpoints are <out>/ldm/<run_name>/epoch-<E>/ with ``state.pt``
(resume) and ``ldm.pt`` (what ``raymem sample`` loads). By default every one is kept, so any saved epoch can be
sampled; ``keep_checkpoints`` bounds them to the most recent few plus ``keep_epochs`` (a sweep keeps its audited ones).
The images trained on are ``cfg.split`` ("train"; "test" for the generator-null), or its nested ``train_size`` subset;
their sample ids are written to <run>/training_ids.json, the generator's exact training set for an audit.

Augmentation (a study factor) is drawn in the loop from a (seed, rank, epoch) seed, so every epoch sees new draws.
Resume: rerun with the same ``out`` and ``run_name``; Ray Train restores the latest checkpoint, the same MLflow run
is reopened, and training continues at the next epoch.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raymem import runtime, storage, tracking
from raymem.config import LDMTrainConfig
from raymem.data import shards
from raymem.train.shared import crash_once, progress_line, quiet_train_reports, say

STATE_FILE = "state.pt"
LDM_FILE = "ldm.pt"
TRAINING_IDS_FILE = "training_ids.json"
CHECKPOINT_PRIORITY = "checkpoint_priority"  # reported with each checkpoint; see checkpoint_priority
_KEPT_EPOCH_BONUS = 1_000_000_000


def run_uri(cfg: LDMTrainConfig) -> str:
    """The run's folder, <out>/ldm/<run_name>: what ``raymem sample --run`` takes."""
    return storage.join(cfg.out, "ldm", cfg.run_name)


def nested_subset(sample_ids: Sequence[str], size: int, seed: int) -> list[str]:
    """``size`` ids: the first of a seeded permutation of the sorted ids, so for one seed smaller subsets nest."""
    if size > len(sample_ids):
        raise ValueError(f"train_size={size} is larger than the split it is drawn from ({len(sample_ids)} images); "
                         "lower train_size or leave it unset for all")
    ordered = sorted(sample_ids)
    return [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))[:size]]


def _epoch_seed(seed: int, rank: int, epoch: int, repeat: int = 0) -> int:
    return int.from_bytes(hashlib.sha256(f"ldm:{seed}:{rank}:{epoch}:{repeat}".encode()).digest()[:4], "little")


def _images(dataset: str, split: str, sample_ids: Sequence[str] | None, limit: int) -> torch.Tensor:
    """Up to ``limit`` images (N, 1, *spatial) float32 of a split (restricted to ``sample_ids``), in stored order."""
    table = shards.load_split(dataset, split, ["sample_id", "image"])
    if sample_ids is not None:
        wanted = set(sample_ids)
        table = table.filter(np.array([sid in wanted for sid in table["sample_id"].to_pylist()], dtype=bool))
    return torch.from_numpy(shards.images_of(table.slice(0, limit)).astype(np.float32))


def _log_grid(tracked: tracking.TrackedRun, images: torch.Tensor, value_range: tuple[float, float], epoch: int) -> None:
    from PIL import Image

    from raymem.models.ldm import image_grid

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"samples-epoch-{epoch:05d}.png"
        Image.fromarray(image_grid(images.cpu().numpy(), value_range)).save(path)
        tracked.client.log_artifact(tracked.run_id, str(path), artifact_path="samples")


def _train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    from mlflow.tracking import MlflowClient

    from raymem.data.transforms import make_augment
    from raymem.models import ldm as core

    quiet_train_reports(loop_config["log_level"])

    cfg = LDMTrainConfig(**loop_config["cfg"])
    meta = loop_config["dataset_meta"]
    spatial_dims, value_range = meta["spatial_dims"], tuple(meta["intensity_range"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    autocast_bf16 = device.type == "cuda"
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    model = core.build_ldm(cfg.preset, spatial_dims)
    autoencoder_optimizer = torch.optim.Adam(model.autoencoder.parameters(), lr=cfg.lr_autoencoder)
    unet_optimizer = torch.optim.Adam(model.unet.parameters(), lr=cfg.lr_diffusion)
    discriminator = core.build_discriminator(cfg.preset, spatial_dims) if cfg.adversarial_weight > 0 else None
    discriminator_optimizer = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr_discriminator) \
        if discriminator is not None else None
    start_epoch, latent_scale_ready = 0, False
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        autoencoder_optimizer.load_state_dict(state["autoencoder_optimizer"])
        unet_optimizer.load_state_dict(state["unet_optimizer"])
        if discriminator is not None:
            discriminator.load_state_dict(state["discriminator"])
            discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        start_epoch, latent_scale_ready = state["epoch"] + 1, state["latent_scale_ready"]
    model.to(device)
    # DDP wrappers share parameters with `model`; the training steps go through them, evaluation through `model`.
    autoencoder = ray.train.torch.prepare_model(model.autoencoder)
    unet = ray.train.torch.prepare_model(model.unet)
    if cfg.cuda_graphs and device.type == "cuda":  # the steps replay both networks from CUDA graphs
        autoencoder, unet = core.GraphedModule(autoencoder, autocast_bf16), core.GraphedModule(unet, autocast_bf16)
    adversary = core.Adversary(ray.train.torch.prepare_model(discriminator), discriminator_optimizer,
                               cfg.adversarial_weight) if discriminator is not None else None
    perceptual = core.build_perceptual_loss(spatial_dims, cfg.perceptual_weights_file).to(device) \
        if cfg.perceptual_weight > 0 else None
    scheduler = core.noise_scheduler(cfg.num_train_timesteps)
    tracked = tracking.TrackedRun(MlflowClient(loop_config["tracking_uri"]), loop_config["run_id"],
                                  loop_config["tracking_uri"]) if rank == 0 else None
    if rank == 0:
        val_images = _images(cfg.dataset, "val", None, cfg.eval_max_images).to(device)
        fixed_train_images = _images(cfg.dataset, cfg.split, loop_config["training_ids"],
                                     cfg.eval_max_images).to(device)
    shard = ray.train.get_dataset_shard("train")
    total_epochs = cfg.autoencoder_epochs + cfg.diffusion_epochs

    def batches(epoch: int, repeats: int):
        """The epoch's batches: the worker's shard streamed once; with repeats > 1 it is held in memory and
        replayed reshuffled (tiny training subsets, where Ray Data's per-pass start would dominate)."""
        def augmenter(repeat: int):
            if not cfg.augment.enabled:
                return lambda images: images
            return make_augment(spatial_dims=spatial_dims, flip_prob=cfg.augment.flip_prob,
                                rotate_prob=cfg.augment.rotate_prob, max_rotation_deg=cfg.augment.max_rotation_deg,
                                seed=_epoch_seed(cfg.seed, rank, epoch, repeat))

        stream = (np.asarray(batch["image"], dtype=np.float32)
                  for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=True))
        if repeats == 1:
            augment = augmenter(0)
            yield from (torch.from_numpy(augment(images)).to(device) for images in stream)
            return
        held = np.concatenate(list(stream))
        for repeat in range(repeats):
            augment = augmenter(repeat)
            order = np.random.default_rng(_epoch_seed(cfg.seed, rank, epoch, repeat)).permutation(len(held))
            for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
                yield torch.from_numpy(augment(held[order[start:start + cfg.batch_size]])).to(device)

    for epoch in range(start_epoch, total_epochs):
        in_diffusion = epoch >= cfg.autoencoder_epochs
        if in_diffusion and not latent_scale_ready:
            moments = sum((core.latent_moments(model, images) for images in batches(epoch, 1)),
                          torch.zeros(3, dtype=torch.float64, device=device))
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(moments)
            model.latent_scale.fill_(core.latent_scale_from_moments(moments))
            latent_scale_ready = True
        generator = torch.Generator(device=device).manual_seed(_epoch_seed(cfg.seed, rank, epoch))
        losses: dict[str, list[float]] = defaultdict(list)
        started, seen, first_batch_s = time.perf_counter(), 0, 0.0
        for images in batches(epoch, cfg.epoch_repeats):
            if seen == 0:
                first_batch_s = time.perf_counter() - started  # Ray Data's per-epoch pipeline start
            seen += images.shape[0]
            if in_diffusion:
                losses["diffusion_train"].append(core.diffusion_step(
                    unet, unet_optimizer, scheduler, model.encode(images), generator, autocast_bf16))
            else:
                terms = core.autoencoder_step(autoencoder, autoencoder_optimizer, images, kl_weight=cfg.kl_weight,
                                              adversary=adversary, perceptual=perceptual,
                                              perceptual_weight=cfg.perceptual_weight, autocast_bf16=autocast_bf16)
                for name, value in terms.items():
                    losses[f"{name}_train"].append(value)
            if cfg.fail_at_epoch == epoch and rank == 0:
                crash_once(loop_config["failure_marker"], epoch, cfg.checkpoint_every)
        stage = "diffusion" if in_diffusion else "autoencoder"
        metrics: dict[str, float] = {f"{stage}/{name}": float(np.mean(values)) for name, values in losses.items()}
        # Training throughput of this worker, data streaming included, and the wait for the epoch's first batch
        # (benchmarks/ldm.py compares both to a plain loop).
        metrics |= {"epoch": epoch, f"{stage}/images_per_s": seen / (time.perf_counter() - started),
                    f"{stage}/first_batch_s": first_batch_s}
        last = epoch == total_epochs - 1
        if rank == 0:
            if in_diffusion:
                metrics["diffusion/val_fixed"] = core.fixed_diffusion_loss(model, scheduler, val_images, cfg.seed,
                                                                           autocast_bf16)
                metrics["diffusion/train_fixed"] = core.fixed_diffusion_loss(model, scheduler, fixed_train_images,
                                                                             cfg.seed, autocast_bf16)
                if last or (epoch + 1 - cfg.autoencoder_epochs) % cfg.grid_every == 0:
                    grid = core.sample_images(model, val_images.shape[2:], range(cfg.grid_samples),
                                              ddim_steps=cfg.ddim_steps, num_train_timesteps=cfg.num_train_timesteps,
                                              value_range=value_range, autocast_bf16=autocast_bf16)
                    _log_grid(tracked, grid, value_range, epoch)
            else:
                metrics["autoencoder/recon_val"] = core.reconstruction_l1(model, val_images)
                metrics["autoencoder/recon_train_fixed"] = core.reconstruction_l1(model, fixed_train_images)
            tracking.log_metrics(tracked, metrics, step=epoch)
            if progress_line(epoch, total_epochs):
                loss = "diffusion/diffusion_train" if in_diffusion else "autoencoder/recon_train"
                say(f"ldm {cfg.run_name}: epoch {epoch + 1}/{total_epochs} ({stage}), {loss.split('/')[1]} "
                    f"{metrics.get(loss, float('nan')):.4g}, {time.perf_counter() - started:.0f} s")
        if last or (epoch + 1) % cfg.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as folder:
                saved = None
                if rank == 0:
                    state = {"model": model.state_dict(), "autoencoder_optimizer": autoencoder_optimizer.state_dict(),
                             "unet_optimizer": unet_optimizer.state_dict(), "epoch": epoch,
                             "latent_scale_ready": latent_scale_ready}
                    if discriminator is not None:
                        state |= {"discriminator": discriminator.state_dict(),
                                  "discriminator_optimizer": discriminator_optimizer.state_dict()}
                    torch.save(state, Path(folder) / STATE_FILE)
                    trained = max(0, epoch + 1 - cfg.autoencoder_epochs)
                    (Path(folder) / LDM_FILE).write_bytes(core.ldm_checkpoint(
                        model, preset=cfg.preset, image_shape=meta["image_shape"],
                        metadata={**meta, "epoch": epoch, "diffusion_epochs_trained": trained,
                                  "run_name": cfg.run_name, "num_train_timesteps": cfg.num_train_timesteps}))
                    saved = ray.train.Checkpoint.from_directory(folder)
                ray.train.report({**metrics, CHECKPOINT_PRIORITY: checkpoint_priority(epoch, cfg.keep_epochs)},
                                 checkpoint=saved, checkpoint_dir_name=f"epoch-{epoch:05d}")
        else:
            ray.train.report(metrics)


def checkpoint_priority(epoch: int, keep_epochs: Collection[int]) -> int:
    """The score Ray Train keeps checkpoints by (highest kept): an epoch of ``keep_epochs`` above every other, then
    newer above older, so the checkpoints deleted first are the oldest ones nobody asked to keep."""
    return epoch + (_KEPT_EPOCH_BONUS if epoch in keep_epochs else 0)


def _checkpoint_config(cfg: LDMTrainConfig):
    """Every checkpoint, or the ``keep_checkpoints`` most recent plus ``keep_epochs``. Ray Train deletes the
    lowest-priority ones beyond ``num_to_keep`` and never the latest (the one a restart resumes from)."""
    import ray.train

    if cfg.keep_checkpoints is None:
        return ray.train.CheckpointConfig(num_to_keep=None)
    return ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints + len(set(cfg.keep_epochs)),
                                      checkpoint_score_attribute=CHECKPOINT_PRIORITY, checkpoint_score_order="max")


def _dataset_meta(dataset: str, split: str) -> dict[str, Any]:
    """What sampling needs to write synthetic rows like the dataset's: shape, range, dtype, modality, spacing, config."""
    manifest = shards.read_manifest(dataset)
    first = shards.load_split(dataset, split, ["spacing", "modality"]).slice(0, 1).to_pylist()
    if not first:
        hint = " (the generator-null's held-out patients): ingest with ingest.test_fraction > 0" if split == "test" \
            else ""
        raise shards.DatasetError(f"{dataset} has no {split} images to train an LDM on{hint}")
    return {"dataset": dataset, "spatial_dims": manifest["spatial_dims"], "image_shape": manifest["image_shape"],
            "intensity_range": manifest["intensity_range"], "dtype": manifest["dtype"],
            "modality": first[0]["modality"], "spacing_mm": first[0]["spacing"], "dataset_config": manifest["config"]}


def _check_shape(preset: str, image_shape: Sequence[int]) -> None:
    from raymem.models.ldm import LDM_PRESETS

    values = LDM_PRESETS[preset]
    factor = 2 ** (len(values["autoencoder"]["channels"]) - 1 + len(values["unet"]["channels"]) - 1)
    if any(side % factor for side in image_shape[1:]):
        raise ValueError(f"preset {preset!r} needs image sides divisible by {factor}, the dataset has "
                         f"{list(image_shape[1:])}; ingest at another size or choose another preset")


def train_ldm(cfg: LDMTrainConfig, *, tracked: tracking.TrackedRun | None = None,
              callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train (or resume) an LDM; returns {"run": run folder URI, "run_id", "metrics" of the last epoch}.

    tracked: an open MLflow run to log into (a sweep trial's run, which the caller opens, parametrises and ends);
    None opens the run ``ldm/<run_name>`` here. callbacks: Ray Train callbacks (a sweep passes TuneReportCallback).
    Rerunning with a larger ``diffusion_epochs`` continues from the last checkpoint: training in segments.
    """
    from raymem.data.stream import open_split

    meta = _dataset_meta(cfg.dataset, cfg.split)
    _check_shape(cfg.preset, meta["image_shape"])
    split_ids = shards.load_split(cfg.dataset, cfg.split, ["sample_id"])["sample_id"].to_pylist()
    training_ids = nested_subset(split_ids, cfg.train_size, cfg.subset_seed) if cfg.train_size is not None else None
    n_images = len(training_ids if training_ids is not None else split_ids)
    if n_images < cfg.batch_size * cfg.num_workers:  # incomplete batches are dropped: nothing would be trained on
        raise ValueError(f"{n_images} {cfg.split} images to train on, fewer than batch_size x num_workers = "
                         f"{cfg.batch_size} x {cfg.num_workers}; lower batch_size or num_workers")
    # Written for every run, so an audit knows exactly which images the generator saw.
    storage.write_bytes(storage.join(run_uri(cfg), TRAINING_IDS_FILE),
                        json.dumps(training_ids if training_ids is not None else sorted(split_ids)).encode())
    train_data = open_split(cfg.dataset, cfg.split, sample_ids=training_ids)
    if tracked is not None:
        return _fit(cfg, meta, training_ids, train_data, tracked, callbacks)
    uri = tracking.tracking_uri(cfg.out) if not storage.is_s3(cfg.out) else tracking.tracking_uri()
    artifacts = storage.join(cfg.out, "mlartifacts") if storage.is_s3(cfg.out) else \
        str(Path(cfg.out).absolute() / "mlartifacts")
    with tracking.run(cfg.experiment, f"ldm/{cfg.run_name}", uri=uri, artifact_location=artifacts,
                      tags={"raymem.stage": "train-ldm", "raymem.dataset": cfg.dataset}) as opened:
        tracking.log_params(opened, {k: v for k, v in cfg.model_dump().items() if k != "fail_at_epoch"})
        return _fit(cfg, meta, training_ids, train_data, opened, callbacks)


def _fit(cfg: LDMTrainConfig, meta: dict[str, Any], training_ids: list[str] | None, train_data,
         tracked: tracking.TrackedRun, callbacks: Sequence[Any]) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from raymem.data.stream import ordered_ingest

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg.model_dump(), "dataset_meta": meta, "training_ids": training_ids,
                           "run_id": tracked.run_id, "tracking_uri": tracked.uri,
                           "failure_marker": storage.join(run_uri(cfg), ".injected-failure"),
                           "log_level": runtime.train_log_level()},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            logging_config=ray.train.LoggingConfig(log_level=runtime.train_log_level()),
            name=cfg.run_name, storage_path=storage.absolute(storage.join(cfg.out, "ldm")), callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=_checkpoint_config(cfg)),
        datasets={"train": train_data}, dataset_config=ordered_ingest(),
    )
    result = trainer.fit()
    tracking.log_metrics(tracked, {"epochs_completed": result.metrics["epoch"] + 1})
    return {"run": run_uri(cfg), "run_id": tracked.run_id, "metrics": result.metrics}
