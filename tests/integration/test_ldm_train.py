"""LDM training on a real 2-worker TorchTrainer (Ray Train V2): 2D with a crash in epoch 2 and resume, 3D, sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raymem import config, storage
from raymem.data import shards
from raymem.generate import sample_run, saved_epochs
from raymem.train.ldm import STATE_FILE, TRAINING_IDS_FILE, train_ldm

pytestmark = pytest.mark.slow


def _train_cfg(dataset: str, out: str, **overrides) -> config.LDMTrainConfig:
    values = {"dataset": dataset, "out": out, "preset": "tiny", "autoencoder_epochs": 2, "diffusion_epochs": 2,
              "batch_size": 4, "num_workers": 2, "cpus_per_worker": 1.0, "lr_autoencoder": 1e-3,
              "lr_diffusion": 1e-3, "ddim_steps": 4, "grid_every": 2, "grid_samples": 4, "eval_max_images": 8,
              "run_name": "ldm"}
    return config.validate(config.LDMTrainConfig, {**values, **overrides})


def _mlflow_runs(out: str):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("raymem")
    return client, client.search_runs([experiment.experiment_id])


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _adam_steps(optimizer_state: dict) -> set[int]:
    """The step counts Adam holds for its parameters (one value when every parameter was stepped alike)."""
    return {int(param["step"]) for param in optimizer_state["state"].values()}


def test_2d_training_survives_a_crash_in_epoch_2_and_losses_fall(ray_cluster, tmp_path, make_phantom_dataset):
    dataset = make_phantom_dataset("xray2d", patients=12, per_patient=2)
    out = str(tmp_path / "out")

    # Retention on: the latest checkpoint and epoch 1's (asked for) survive; 0 and 2 go as training moves on.
    result = train_ldm(_train_cfg(dataset, out, fail_at_epoch=1, max_failures=1, train_size=16, keep_checkpoints=1,
                                  keep_epochs=[1]))

    client, runs = _mlflow_runs(out)
    run_id = runs[0].info.run_id
    recon = _history(client, run_id, "autoencoder.recon_train_fixed")
    diffusion = _history(client, run_id, "diffusion.train_fixed")
    assert storage.exists(storage.join(result["run"], ".injected-failure"))
    assert result["metrics"]["epoch"] == 3
    assert [r.info.status for r in runs] == ["FINISHED"]
    # Each epoch logged once: the crash in epoch 1 resumed from epoch 0's checkpoint, it did not start over.
    assert sorted(m.step for m in client.get_metric_history(run_id, "epoch")) == [0, 1, 2, 3]
    assert saved_epochs(result["run"]) == [1, 3]
    assert recon[1] < recon[0] and diffusion[3] < diffusion[2]
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/samples-epoch-00003.png"]
    # The optimiser state resumed too: the autoencoder's Adam counts both of its epochs' steps (the crash fell in
    # its second), as many as the UNet's Adam for its two uninterrupted epochs; a fresh optimiser after the
    # restore would count one epoch's steps only.
    state = torch.load(f"{result['run']}/epoch-00003/{STATE_FILE}", map_location="cpu", weights_only=True)
    autoencoder_steps, unet_steps = _adam_steps(state["autoencoder_optimizer"]), _adam_steps(state["unet_optimizer"])
    assert len(unet_steps) == 1 and unet_steps.pop() > 0
    assert autoencoder_steps == _adam_steps(state["unet_optimizer"])


def test_3d_training_then_sampling_any_saved_epoch(ray_cluster, tmp_path, make_phantom_dataset):
    dataset = make_phantom_dataset("ct3d", patients=8, per_patient=1)
    out = str(tmp_path / "out")
    trained = train_ldm(_train_cfg(dataset, out, autoencoder_epochs=1, diffusion_epochs=2, batch_size=2,
                                   grid_every=10, eval_max_images=2))

    summary = sample_run(config.validate(config.SampleConfig, {
        "run": trained["run"], "epoch": 1, "n": 5, "out": str(tmp_path / "syn"), "ddim_steps": 3, "batch_size": 2,
        "num_actors": 1}))

    table = shards.load_split(str(tmp_path / "syn"), "train")
    images = shards.images_of(table)
    manifest = shards.read_manifest(dataset)
    assert summary["epoch"] == 1 and table.num_rows == 5
    assert images.shape == (5, *manifest["image_shape"]) and images.dtype == np.dtype(manifest["dtype"])
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(table["patient_id"].to_pylist()) == {"synthetic"}
    assert all(":epoch-1:seed-" in source for source in table["source"].to_pylist())
    # Without train_size the generator saw the whole split, and says so.
    assert json.loads(storage.read_bytes(storage.join(trained["run"], TRAINING_IDS_FILE))) == \
        sorted(shards.load_split(dataset, "train", ["sample_id"])["sample_id"].to_pylist())


def test_the_generator_null_trains_on_a_nested_subset_of_test_split_images_only(ray_cluster, tmp_path,
                                                                                make_phantom_dataset):
    dataset = make_phantom_dataset("xray2d", patients=8, per_patient=2, test_fraction=0.25)  # 2 test patients
    out = str(tmp_path / "out")

    result = train_ldm(_train_cfg(dataset, out, split="test", train_size=3, autoencoder_epochs=1, diffusion_epochs=1,
                                  num_workers=1, batch_size=2, grid_every=10, eval_max_images=2))

    trained = json.loads(storage.read_bytes(storage.join(result["run"], TRAINING_IDS_FILE)))
    test_ids = set(shards.load_split(dataset, "test", ["sample_id"])["sample_id"].to_pylist())
    _, runs = _mlflow_runs(out)
    assert (len(trained), set(trained) <= test_ids, len(test_ids), runs[0].data.params["split"]) == \
        (3, True, 4, "test")
