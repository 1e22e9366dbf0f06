"""One seed, one result: a small pipeline run twice with one seed into two folders writes the same metrics.json.

The pipeline is the demo's in miniature (PNG files ingested by Ray Data, a 2-worker DDP detector, 2-actor embedding
and sampling, an LDM, the audit with planted copies), so every place where Ray could reorder data is on the path:
ingest block order, the DDP split between workers, batch composition in actor pools, the LDM's stream order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from raymem import config, storage
from raymem.data import phantoms
from raymem.jobconfig import JobConfig, run_stage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

STAGES = ("data", "train-detector", "train-ldm", "sample", "audit")
JOB = {
    "experiment": "determinism",
    "run_name": "same-seed",
    "data": {"source": "raw/xray2d"},
    "ingest": {"spatial_dims": 2, "size": 32, "val_fraction": 0.25, "test_fraction": 0.25},
    "detector": {"preset": "tiny", "epochs": 1, "batch_size": 8, "num_workers": 2, "eval_every": 1,
                 "eval_max_images": 16},
    "embed": {"batch_size": 8, "num_actors": 2},
    "ldm": {"preset": "tiny", "train_size": 8, "autoencoder_epochs": 1, "diffusion_epochs": 1, "batch_size": 4,
            "epoch_repeats": 2, "num_workers": 1, "ddim_steps": 3, "grid_every": 1, "grid_samples": 1,
            "eval_max_images": 4},
    "sample": {"n": 8, "ddim_steps": 3, "batch_size": 2, "num_actors": 2},
    "audit": {"percentile": 95.0, "top_k": 3, "plant_copies": 4, "seed": 0, "distributed": True},
}


def run_pipeline(root: Path, stages=STAGES, **overrides) -> str:
    """Run the job's stages under ``root`` (phantom PNG files first); returns metrics.json with the root masked."""
    job = config.validate(JobConfig, {**JOB, **overrides, "storage_root": str(root)})
    raw = storage.join(str(root), "raw", "xray2d")
    if not storage.exists(raw):
        phantoms.write_files(raw, "xray2d", patients=16, images_per_patient=3, size=32, seed=0, file_format="png",
                             progress=False)
    for stage in stages:
        run_stage(job, stage)
    text = Path(job.paths()["audit"], "metrics.json").read_text()
    return text.replace(str(root), "<root>")  # the only place a run's folder appears (the LDM run it audited)


def test_one_seed_gives_one_metrics_json_and_another_sample_seed_another(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYMEM_PSEUDONYM_KEY", "determinism-test")  # a random key would give new patient ids
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # each run tracks into its own folder

    first = run_pipeline(tmp_path / "first")
    second = run_pipeline(tmp_path / "second")
    # Another sample seed on the first run's dataset, detector and LDM: the audit must see the difference.
    shutil.copytree(tmp_path / "first", tmp_path / "reseeded",
                    ignore=lambda folder, names: [n for n in names if n in ("synthetic", "audits", "mlflow.db")])
    reseeded = run_pipeline(tmp_path / "reseeded", ("sample", "audit"), sample={**JOB["sample"], "seed": 1})

    assert (json.loads(second), json.loads(reseeded) != json.loads(first)) == (json.loads(first), True)
