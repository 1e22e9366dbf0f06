"""Ray Train (V2) loop for the contrastive copy detector: DDP over workers, checkpoints, resume, rank-0 MLflow.

The science (encoder, NT-Xent, augmentations, accuracy) is in raymem.models.detector / copy_transforms and
raymem.audit.accuracy; this module only streams data, schedules epochs, checkpoints and logs.

Resume: rerun with the same ``out`` and ``run_name``; Ray Train restores the latest checkpoint, the same MLflow run
is reopened, and training continues at the next epoch.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from raymem import runtime, storage, tracking
from raymem.config import DetectorTrainConfig
from raymem.data import shards
from raymem.train.shared import crash_once, progress_line, quiet_train_reports, say

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
DETECTOR_FILE = "detector.pt"


def run_root(cfg: DetectorTrainConfig) -> str:
    return storage.join(cfg.out, "detector")


def detector_uri(cfg: DetectorTrainConfig) -> str:
    """Where the final detector checkpoint lands: <out>/detector/<run_name>/detector.pt."""
    return storage.join(run_root(cfg), cfg.run_name, DETECTOR_FILE)


def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{rank}:{epoch}".encode()).digest()[:4], "little")


def _validation_images(dataset: str, limit: int) -> tuple[torch.Tensor, list[str]]:
    table = shards.load_split(dataset, "val", ["image", "patient_id"]).slice(0, limit)
    return torch.from_numpy(shards.images_of(table).astype("float32")), table["patient_id"].to_pylist()


def _train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    from mlflow.tracking import MlflowClient

    from raymem.audit.accuracy import accuracy_with_baselines
    from raymem.models.copy_transforms import TRANSFORM_PRESETS, random_transform
    from raymem.models.detector import build_detector, cosine_lr, detector_checkpoint, train_step

    quiet_train_reports(loop_config["log_level"])

    cfg = DetectorTrainConfig(**loop_config["cfg"])
    # Float sums split over threads: a thread count from the config, not the machine, keeps the weights the same.
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    model = build_detector(cfg.preset, loop_config["spatial_dims"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr_initial)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
    model = ray.train.torch.prepare_model(model)
    bare_model = model.module if hasattr(model, "module") else model
    tracked = tracking.TrackedRun(MlflowClient(loop_config["tracking_uri"]), loop_config["run_id"],
                                  loop_config["tracking_uri"]) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    bounds = TRANSFORM_PRESETS[cfg.augmentation]

    for epoch in range(start_epoch, cfg.epochs):
        lr = cosine_lr(epoch, cfg.epochs, cfg.lr_initial, cfg.lr_final)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = torch.Generator(device=device).manual_seed(_epoch_seed(cfg.seed, rank, epoch))
        augment = functools.partial(random_transform, bounds=bounds, generator=generator)
        losses = []
        for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=True):
            images = torch.from_numpy(batch["image"]).to(device, torch.float32)
            patients = batch["patient_id"] if cfg.patient_aware else None
            if patients is not None and len(set(patients)) < 2:
                patients = None  # a one-patient batch falls back to the paper's loss rather than skipping (DDP)
            losses.append(train_step(model, optimizer, images, patients, augment, temperature=cfg.temperature,
                                     autocast_bf16=device.type == "cuda"))
            if cfg.fail_at_epoch == epoch and rank == 0:
                crash_once(loop_config["failure_marker"], epoch, cfg.checkpoint_every)
        metrics = {"train_loss": float(sum(losses) / max(len(losses), 1)), "lr": lr, "epoch": epoch}
        last = epoch == cfg.epochs - 1
        if rank == 0 and (last or (epoch + 1) % cfg.eval_every == 0):
            images, patient_ids = _validation_images(cfg.dataset, cfg.eval_max_images)
            metrics.update(accuracy_with_baselines(bare_model, images.to(device), patient_ids, seed=cfg.seed))
        if tracked is not None:
            tracking.log_metrics(tracked, metrics, step=epoch)
            if progress_line(epoch, cfg.epochs):
                say(f"detector {cfg.run_name}: epoch {epoch + 1}/{cfg.epochs} loss {metrics['train_loss']:.4g}")
        if last or (epoch + 1) % cfg.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as folder:
                saved = None
                if rank == 0:
                    torch.save({"model": bare_model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                               Path(folder) / STATE_FILE)
                    torch.save(detector_checkpoint(bare_model, cfg.preset), Path(folder) / DETECTOR_FILE)
                    saved = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=f"epoch-{epoch:05d}")
        else:
            ray.train.report(metrics)


def train_detector(cfg: DetectorTrainConfig) -> dict[str, Any]:
    """Train (or resume) the detector; returns {"detector": URI, "run_id", "metrics"} of the last epoch."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raymem.data.stream import open_split, ordered_ingest

    manifest = shards.read_manifest(cfg.dataset)
    # Incomplete batches are dropped and the accuracy compares images with each other: fail now, not after an epoch.
    shards.require_images(cfg.dataset, "train", cfg.batch_size * cfg.num_workers,
                          f"one training step (batch_size x num_workers = {cfg.batch_size} x {cfg.num_workers}: "
                          "lower them for a small split)")
    shards.require_images(cfg.dataset, "val", 2, "the detector's validation accuracy")
    train_data = open_split(cfg.dataset, "train", columns=("image", "patient_id"))
    uri = tracking.tracking_uri(cfg.out) if not storage.is_s3(cfg.out) else tracking.tracking_uri()
    with tracking.run(cfg.experiment, f"detector/{cfg.run_name}", uri=uri,
                      tags={"raymem.stage": "train-detector", "raymem.dataset": cfg.dataset}) as tracked:
        tracking.log_params(tracked, {k: v for k, v in cfg.model_dump().items() if k != "fail_at_epoch"})
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"cfg": cfg.model_dump(), "spatial_dims": manifest["spatial_dims"], "run_id": tracked.run_id,
                               "tracking_uri": uri,
                               "failure_marker": storage.join(run_root(cfg), cfg.run_name, ".injected-failure"),
                               "log_level": runtime.train_log_level()},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                                   resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                logging_config=ray.train.LoggingConfig(log_level=runtime.train_log_level()),
                name=cfg.run_name, storage_path=storage.absolute(run_root(cfg)),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None)),
            datasets={"train": train_data}, dataset_config=ordered_ingest(),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as folder:
            storage.write_bytes(detector_uri(cfg), (Path(folder) / DETECTOR_FILE).read_bytes())
        tracking.log_metrics(tracked, {"epochs_completed": result.metrics["epoch"] + 1})
    return {"detector": detector_uri(cfg), "run_id": tracked.run_id, "metrics": result.metrics}
