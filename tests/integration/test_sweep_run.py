"""`raymem sweep` end to end: a tiny 2 sizes x 2 seeds grid on phantoms, audited at 2 epochs per trial.

Real parts only: each sweep driver starts a real local Ray cluster, logs to a real `mlflow server` on 127.0.0.1,
and is a real process. The first driver is killed (SIGKILL, with its Ray processes) once a trial has finished;
the rerun must resume without redoing that trial (one seed of its combination) and run the rest, the other seed of
that combination included. A second sweep of the same study injects a crash to show a failed trial's MLflow run
ends FAILED.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from raymem.localcluster import BIN, kill_tree

# The killed-driver fixture runs two sweeps (about 330 s alone, 600 s beside a second test worker)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "study-tiny-xray2d.yaml"
STUDY, SWEEP = "raymem-tiny-study", "tiny"
SEEDS = (0, 1)
TRIALS = {f"n{n}-aug0-tiny-e2-s{seed}" for n in (8, 16) for seed in SEEDS}
AUDITED_EPOCHS = [1, 2]  # 1 autoencoder epoch (0), then diffusion epochs 1 and 2, audit_every 1


def _sweep_command(config: Path) -> list[str]:
    return [str(BIN / "raymem"), "sweep", "--config", str(config)]


def _files(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def study_env(mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-root")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(RAYMEM_STORAGE_ROOT=str(root), MLFLOW_TRACKING_URI=mlflow_server, RAY_DATA_DISABLE_PROGRESS_BARS="1",
               RAY_AUTH_MODE="disabled")
    return {"root": root, "env": env, "mlflow": mlflow_server, "logs": tmp_path_factory.mktemp("sweep-logs")}


@pytest.fixture(scope="module")
def resumed_sweep(study_env):
    """Start the sweep, kill its driver once one trial has finished, rerun it to the end."""
    trials_dir = study_env["root"] / "sweeps" / STUDY / SWEEP / "trials"
    with open(study_env["logs"] / "first.log", "w") as log:
        first = subprocess.Popen(_sweep_command(CONFIG), cwd=REPO, env=study_env["env"], stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        finished: list[Path] = []
        while not finished:
            assert first.poll() is None, (study_env["logs"] / "first.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "no trial finished within 600 s"
            time.sleep(2)
            finished = sorted(trials_dir.glob("*/trial.json"))
        kill_tree(first)
    finished_trial = finished[0].parent
    before = _files(finished_trial)
    second = subprocess.run(_sweep_command(CONFIG), cwd=REPO, env=study_env["env"], capture_output=True, text=True,
                            timeout=900)
    return {"first_finished": finished_trial, "before": before, "after": _files(finished_trial), "second": second}


def _runs(mlflow_uri: str, sweep: str) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`raymem.sweep` = '{sweep}'",
                              max_results=100)
    parents = [run for run in runs if run.data.tags.get("raymem.kind") == "sweep"]
    children = [run for run in runs if run.data.tags.get("raymem.kind") == "trial"]
    return client, parents, children


def test_rerun_after_a_killed_driver_finishes_the_sweep(resumed_sweep):
    second = resumed_sweep["second"]
    assert second.returncode == 0 and "resuming" in second.stdout, (second.stdout + second.stderr)[-5000:]


def test_a_trial_finished_before_the_kill_is_not_redone(resumed_sweep):
    assert resumed_sweep["after"] == resumed_sweep["before"], resumed_sweep["first_finished"]


def test_the_rerun_skips_the_seed_finished_before_the_kill_and_runs_every_other(resumed_sweep):
    done = resumed_sweep["first_finished"].name
    resumed = next((line for line in resumed_sweep["second"].stdout.splitlines() if "resuming" in line), "")
    finished = {path.parent.name for path in resumed_sweep["first_finished"].parent.glob("*/trial.json")}
    assert (done in resumed, finished) == (True, TRIALS), resumed_sweep["second"].stdout[-3000:]


def test_one_parent_run_with_a_finished_child_run_per_trial(resumed_sweep, study_env):
    _, parents, children = _runs(study_env["mlflow"], SWEEP)
    assert (len(parents), parents[0].info.status, sorted((run.data.tags["raymem.trial"], run.info.status,
                                                          run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id)
                                                         for run in children)) == (
        1, "FINISHED", sorted((trial, "FINISHED", True) for trial in TRIALS))


PER_AUDIT_METRICS = ("memorization.pct_copies", "memorization.pct_memorized_shared", "quality.frechet_distance",
                     "quality.frechet_distance_real_baseline", "quality.fd_reference_size",
                     "quality.fd_real_baseline_size", "quality.ms_ssim_diversity")


def test_child_runs_hold_factors_and_per_epoch_figures(resumed_sweep, study_env):
    client, _, children = _runs(study_env["mlflow"], SWEEP)
    seen = {}
    for run in children:
        steps = {metric: sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
                 for metric in PER_AUDIT_METRICS}
        seen[run.data.tags["raymem.trial"]] = (run.data.params["factor.train_size"], run.data.params["seed"],
                                               run.data.params["ldm.seed"], steps)
    expected_steps = dict.fromkeys(PER_AUDIT_METRICS, AUDITED_EPOCHS)
    assert seen == {f"n{n}-aug0-tiny-e2-s{seed}": (str(n), str(seed), str(seed), expected_steps)
                    for n in (8, 16) for seed in SEEDS}


def test_every_trial_scores_frechet_distance_against_the_studys_one_reference_beside_a_baseline_of_its_size(
        resumed_sweep, study_env):
    # The tiny study has no test split: the reference is all 8 val images (4 patients), so the baseline is drawn
    # from the study's training images, as many as the trial samples (its training-set size).
    _, parents, children = _runs(study_env["mlflow"], SWEEP)
    seen = {run.data.tags["raymem.trial"]: (
        run.data.params["quality.fd_reference_split"], run.data.params["quality.fd_reference_size"],
        run.data.metrics["quality.fd_reference_size"], run.data.params["quality.fd_real_baseline_source"],
        run.data.metrics["quality.fd_real_baseline_size"]) for run in children}
    parent = (parents[0].data.params["quality.fd_reference_split"], parents[0].data.params["quality.fd_reference_size"])
    assert (parent, seen) == (("val", "8"), {f"n{n}-aug0-tiny-e2-s{seed}": ("val", "8", 8.0, "train", float(n))
                                            for n in (8, 16) for seed in SEEDS})


def test_dashboard_plots_are_logged_to_the_parent_run(resumed_sweep, study_env):
    from PIL import Image

    client, parents, _ = _runs(study_env["mlflow"], SWEEP)
    parent_id = parents[0].info.run_id
    names = {Path(item.path).name for item in client.list_artifacts(parent_id, "dashboard")}
    plot = client.download_artifacts(parent_id, "dashboard/memorization_vs_train_size.png",
                                     str(study_env["logs"]))
    width, height = Image.open(io.BytesIO(Path(plot).read_bytes())).size
    assert {"index.html", "per_epoch.png", "memorization_vs_train_size.png", "verdicts.json",
            "trials.csv"} <= names and width > 400 and height > 200


def test_the_parent_run_holds_the_training_size_verdicts_over_both_seeds(resumed_sweep, study_env):
    _, parents, _ = _runs(study_env["mlflow"], SWEEP)
    metrics = parents[0].data.metrics
    assert {name: metrics.get(f"verdict.train_size.{name}.all.n_seeds")
            for name in ("pct_memorized_train", "pct_copies")} == {"pct_memorized_train": 2.0, "pct_copies": 2.0}


def _child_figures(client, run, metric: str = "memorization.pct_copies") -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}


@pytest.fixture(scope="module")
def crashed_then_retried(resumed_sweep, study_env, tmp_path_factory):
    """A one-trial sweep whose LDM worker dies in the first diffusion epoch (no Tune retry), then the same command
    rerun: the crashed trial is retried from its checkpoint. Both early-stopping rules are on at their tightest: a
    copies budget of 0 % and a stop after one rise."""
    study = yaml.safe_load(CONFIG.read_text())
    study.update(sweep="crash", factors={"train_size": [8]}, seeds=[0],
                 early_stop={"max_pct_copies": 0.0, "rising_audits": 1})
    study["ldm"].update(fail_at_epoch=1, max_failures=0)  # a worker dies in the first diffusion epoch, once
    config = tmp_path_factory.mktemp("crash") / "crash.yaml"
    config.write_text(yaml.safe_dump(study))

    def sweep_once() -> dict:
        result = subprocess.run(_sweep_command(config), cwd=REPO, env=study_env["env"], capture_output=True,
                                text=True, timeout=600)
        client, parents, children = _runs(study_env["mlflow"], "crash")
        return {"result": result, "parents": [run.info.status for run in parents],
                "children": [(run.data.tags["raymem.trial"], run.info.status) for run in children],
                "tags": [run.data.tags for run in children],
                "figures": [_child_figures(client, run) for run in children],
                "epochs": [sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch"))
                           for run in children]}

    crashed = sweep_once()
    return {"crashed": crashed, "retried": sweep_once(),
            "trial_folder": study_env["root"] / "sweeps" / STUDY / "crash" / "trials" / "n8-aug0-tiny-e2-s0"}


def test_a_crashed_trial_ends_failed_and_the_sweep_says_so(crashed_then_retried):
    crashed = crashed_then_retried["crashed"]
    assert (crashed["result"].returncode, [status for _, status in crashed["children"]], crashed["parents"]) == (
        1, ["FAILED"], ["FAILED"]), (crashed["result"].stdout + crashed["result"].stderr)[-5000:]


def test_rerunning_a_failed_sweep_retries_the_crashed_trial_in_the_same_runs(crashed_then_retried):
    retried = crashed_then_retried["retried"]
    assert (retried["result"].returncode, retried["children"], retried["parents"]) == (
        0, [("n8-aug0-tiny-e2-s0", "FINISHED")], ["FINISHED"]), \
        (retried["result"].stdout + retried["result"].stderr)[-5000:]


def test_early_stopping_in_a_sweep_follows_its_rules_on_the_trials_own_figures(crashed_then_retried):
    """The retried trial stops at its first audit with copies over the 0 % budget (a rise from 0 is one too), and
    trains and audits nothing after it; with no copies at any audit (the tiny study's trials copy nothing) neither
    rule may fire: 0 is not over a budget of 0, and equal figures are not a rise."""
    [tags], [figures], [epochs] = (crashed_then_retried["retried"][key] for key in ("tags", "figures", "epochs"))
    stop = next((epoch for epoch in AUDITED_EPOCHS if figures[epoch] > 0), None)
    audited = AUDITED_EPOCHS[:AUDITED_EPOCHS.index(stop) + 1] if stop is not None else AUDITED_EPOCHS
    trained = sorted(path.name for path in crashed_then_retried["trial_folder"].rglob("epoch-*")
                     if (path / "ldm.pt").exists())
    # Each epoch trained once: the autoencoder epoch before the crash, the diffusion epochs after the retry.
    assert (tags.get("raymem.early_stopped_epoch"), sorted(figures), epochs, trained[-1]) == (
        None if stop is None else str(stop), audited, list(range(audited[-1] + 1)), f"epoch-{audited[-1]:05d}"), \
        (tags, figures)
