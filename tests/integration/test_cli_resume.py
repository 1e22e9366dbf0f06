"""`raymem train-ldm` as a user runs it, in a process of its own with its own local Ray cluster: killed (SIGKILL, the
driver and every process it started, no cleanup) once the first diffusion epoch's checkpoint is registered, then
the same command rerun. The rerun must resume: the same MLflow run, the epochs after the last registered checkpoint
trained once each (none redone before it, none skipped), and the optimiser state restored with the weights."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from raymem.localcluster import BIN, kill_tree
from raymem.train.ldm import STATE_FILE

pytestmark = pytest.mark.slow

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


def _wait_for_checkpoint(process: subprocess.Popen, snapshot: Path, epoch: int, log: Path, timeout_s: float = 300):
    """Until Ray Train has registered epoch's checkpoint (written and reported are not enough: a driver lost before
    the controller takes the report resumes one checkpoint earlier, which would be right, but not this test)."""
    deadline = time.monotonic() + timeout_s
    while f"epoch-{epoch:05d}" not in (snapshot.read_text() if snapshot.exists() else ""):
        assert process.poll() is None, f"train-ldm ended (rc {process.returncode}) first:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no checkpoint of epoch {epoch} in {timeout_s} s"
        time.sleep(0.05)


def test_a_killed_train_ldm_resumes_from_its_checkpoint_when_the_command_is_rerun(tmp_path, make_phantom_dataset):
    import mlflow

    dataset = make_phantom_dataset("xray2d", patients=8, per_patient=2)
    out = tmp_path / "out"
    settings = tmp_path / "ldm.yaml"
    settings.write_text("ddim_steps: 3\ngrid_samples: 2\neval_max_images: 4\n")
    command = [str(BIN / "raymem"), "train-ldm", "--dataset", dataset, "--out", str(out), "--config", str(settings),
               "--autoencoder-epochs", "1", "--diffusion-epochs", "2", "--batch-size", "4", "--num-workers", "1"]
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_AUTH_MODE="disabled", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    run_folder = out / "ldm" / "ldm"
    log = tmp_path / "killed.log"

    with log.open("w") as sink:
        killed = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_checkpoint(killed, run_folder / SNAPSHOT, 1, log)
        finally:
            kill_tree(killed)
    killed_at_ms = time.time() * 1000
    # The last checkpoint the killed driver registered: epoch 1, or 2 if it was quicker than the kill.
    registered = max(int(epoch) for epoch in re.findall(r"epoch-(\d{5})", (run_folder / SNAPSHOT).read_text()))
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-5000:]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("raymem").experiment_id])
    assert [(run.info.run_name, run.info.status) for run in runs] == [("ldm/ldm", "FINISHED")]
    history = client.get_metric_history(runs[0].info.run_id, "epoch")
    before = sorted(m.step for m in history if m.timestamp < killed_at_ms)
    after = sorted(m.step for m in history if m.timestamp >= killed_at_ms)
    # Before the kill: epochs 0 (the autoencoder) to the registered one, each once, perhaps the next one in flight
    # (trained, logged, its checkpoint not registered yet). After: only the epochs after the registered checkpoint,
    # each once; a rerun that restarted would log from 0, one that trusted an unregistered checkpoint would skip.
    assert (before[:registered + 1], len(before) - registered - 1 in (0, 1), after) == (
        list(range(registered + 1)), True, list(range(registered + 1, 3))), (registered, before, after)
    # The UNet's optimiser came back with the weights: its Adam counts both diffusion epochs' steps, twice the
    # autoencoder's one epoch on the same batches; a fresh optimiser after the restore would count one epoch's.
    state = torch.load(run_folder / "epoch-00002" / STATE_FILE, map_location="cpu", weights_only=True)
    autoencoder, unet = ({int(p["step"]) for p in state[name]["state"].values()}
                         for name in ("autoencoder_optimizer", "unet_optimizer"))
    assert (len(autoencoder), unet) == (1, {2 * min(autoencoder)})
