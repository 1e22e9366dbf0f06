"""Sweep dashboards are built from a real MLflow sqlite store laid out as `raymem sweep` logs it."""

from __future__ import annotations

import base64
import csv
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from raymem.dashboard import FRECHET, FRECHET_BASELINE, Trial, _per_epoch_figure, build_dashboard

EXPERIMENT = "phantom-study"
SWEEP = "grid"
AUTOENCODER_EPOCHS = 2
# trial key -> factors, final status, {global epoch of each audit: (% memorized, % copies)}, last epoch trained,
# early-stop epoch tag. Audits at global epochs 3, 5, 7 are after 2, 4, 6 diffusion epochs.
TRIALS = {
    "n128-aug0-tiny": ({"train_size": "128", "augment": "False"}, "FINISHED", {3: (10.0, 4.0), 5: (30.0, 6.0)}, 5,
                       "5"),
    "n16-aug1-tiny": ({"train_size": "16", "augment": "True"}, "FINISHED",
                      {3: (20.0, 10.0), 5: (25.0, 12.5), 7: (35.0, 20.0)}, 7, None),
    "n128-aug1-tiny": ({"train_size": "128", "augment": "True"}, "FAILED", {3: (5.0, 2.0)}, 4, None),
    "n16-aug0-tiny": ({"train_size": "16", "augment": "False"}, "FINISHED",
                      {3: (40.0, 30.0), 5: (50.0, 40.0), 7: (62.5, 55.0)}, 7, None),
}


def _log_trial(client: MlflowClient, exp_id: str, parent_id: str, key: str, spec) -> None:
    factors, status, audits, last_epoch, early_stop = spec
    tags = {"mlflow.parentRunId": parent_id, "raymem.kind": "trial", "raymem.sweep": SWEEP, "raymem.trial": key}
    if early_stop is not None:
        tags["raymem.early_stopped_epoch"] = early_stop
    run_id = client.create_run(exp_id, tags=tags, run_name=key).info.run_id
    params = {**{f"factor.{name}": value for name, value in factors.items()}, "factor.preset": "tiny",
              "autoencoder_epochs": str(AUTOENCODER_EPOCHS), "config_hash": f"hash-{key}"}
    stamp = int(time.time() * 1000)
    metrics = [Metric("diffusion.val_fixed", 1.0 / epoch, stamp, epoch)
               for epoch in range(AUTOENCODER_EPOCHS, last_epoch + 1)]
    for epoch, (memorized, copies) in audits.items():
        metrics += [Metric("memorization.pct_memorized_train", memorized, stamp, epoch),
                    Metric("memorization.pct_copies", copies, stamp, epoch),
                    Metric("memorization.pct_memorized_patients", memorized + 1.0, stamp, epoch),
                    Metric("memorization.pct_memorized_shared", memorized + 2.0, stamp, epoch),
                    Metric("quality.frechet_distance", 100.0 / epoch, stamp, epoch),
                    Metric("quality.frechet_distance_real_baseline", 10.0 / int(factors["train_size"]), stamp, epoch),
                    Metric("quality.ms_ssim_diversity", 0.5, stamp, epoch)]
    client.log_batch(run_id, metrics=metrics, params=[Param(name, value) for name, value in params.items()])
    client.set_terminated(run_id, status=status)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with an older, empty sweep and the 2 sizes x 2 augment sweep (one FAILED trial)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    now = int(time.time() * 1000)
    client.create_run(exp_id, start_time=now - 60_000, run_name="sweep/older",
                      tags={"raymem.kind": "sweep", "raymem.sweep": "older"})
    parent_id = client.create_run(exp_id, start_time=now, run_name=f"sweep/{SWEEP}",
                                  tags={"raymem.kind": "sweep", "raymem.sweep": SWEEP}).info.run_id
    client.log_param(parent_id, "factors", "train_size,augment,preset")
    for key, spec in TRIALS.items():
        _log_trial(client, exp_id, parent_id, key, spec)
    return {"uri": uri, "client": client, "parent_id": parent_id, "root": root}


@pytest.fixture(scope="module")
def dashboard(store):
    """The dashboard of the experiment's latest sweep (no sweep named), logged to its parent run."""
    return build_dashboard(EXPERIMENT, str(store["root"] / "dashboard"), tracking_uri=store["uri"])


class ImageSources(HTMLParser):
    def __init__(self, page: str):
        super().__init__()
        self.sources: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.sources += [value for name, value in attrs if name == "src"]


def _csv_rows(dashboard) -> list[dict]:
    with open(Path(dashboard["out"]) / "trials.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_the_latest_sweep_is_chosen_when_none_is_named(store, dashboard):
    assert (dashboard["parent_run_id"], dashboard["trials"]) == (store["parent_id"], len(TRIALS))


def test_each_factor_with_two_levels_gets_a_plot_and_every_plot_decodes(dashboard):
    pngs = {Path(path).name: Image.open(path) for path in dashboard["files"] if path.endswith(".png")}

    assert set(pngs) == {"memorization_vs_train_size.png", "memorization_vs_augment.png", "per_epoch.png"}
    assert all(image.width >= 800 and image.height >= 400 for image in pngs.values())


def test_index_embeds_every_png_as_a_data_uri_and_fetches_nothing(dashboard):
    out = Path(dashboard["out"])
    sources = ImageSources((out / "index.html").read_text(encoding="utf-8")).sources
    expected = {"data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
                for path in out.glob("*.png")}

    assert set(sources) == expected and not any(src.startswith(("http://", "https://")) for src in sources)


def test_trials_csv_holds_each_trials_figures_at_its_last_audit(dashboard):
    rows = {row["trial"]: (row["status"], row["last_audit_diffusion_epochs"], float(row["pct_memorized_train"]),
                           float(row["pct_copies"]), row["early_stop_diffusion_epochs"])
            for row in _csv_rows(dashboard)}

    assert rows == {
        "n16-aug0-tiny": ("FINISHED", "6", 62.5, 55.0, ""),
        "n16-aug1-tiny": ("FINISHED", "6", 35.0, 20.0, ""),
        "n128-aug0-tiny": ("FINISHED", "4", 30.0, 6.0, "4"),
        "n128-aug1-tiny": ("FAILED", "2", 5.0, 2.0, ""),
    }


def test_trials_csv_holds_each_trials_frechet_distance_beside_its_real_baseline(dashboard):
    rows = {row["trial"]: (float(row["frechet_distance"]), float(row["frechet_distance_real_baseline"]))
            for row in _csv_rows(dashboard)}

    assert rows == {"n16-aug0-tiny": (100.0 / 7, 0.625), "n16-aug1-tiny": (100.0 / 7, 0.625),
                    "n128-aug0-tiny": (100.0 / 5, 10.0 / 128), "n128-aug1-tiny": (100.0 / 3, 10.0 / 128)}


def test_per_epoch_plot_draws_each_trials_frechet_baseline_dotted_in_its_panel_with_a_legend():
    trial = Trial(key="n8-aug0-tiny", run_id="run", status="FINISHED", factors={"train_size": "8"},
                  autoencoder_epochs=1, early_stopped_epoch=None,
                  histories={FRECHET: {1: 1.4, 2: 1.1}, FRECHET_BASELINE: {1: 1.2, 2: 1.2}})

    panel = next(ax for ax in _per_epoch_figure([trial]).axes if ax.get_title().startswith("Frechet"))
    dotted = [(list(line.get_xdata()), list(line.get_ydata()), line.get_label()) for line in panel.get_lines()
              if line.get_linestyle() == ":"]
    legend = [text.get_text() for text in panel.get_legend().get_texts()]

    assert (dotted, legend) == ([([1, 2], [1.2, 1.2], "n8-aug0-tiny: real sample of the same size (baseline)")],
                                ["synthetic samples", "real sample of the same size (baseline)"])


def test_trials_are_listed_in_numeric_order_of_their_levels(dashboard):
    assert [row["trial"] for row in _csv_rows(dashboard)] == [
        "n16-aug0-tiny", "n16-aug1-tiny", "n128-aug0-tiny", "n128-aug1-tiny"]


def test_the_dashboard_is_logged_to_the_parent_run(store, dashboard):
    logged = store["client"].list_artifacts(store["parent_id"], "dashboard")

    assert sorted(Path(item.path).name for item in logged) == sorted(Path(path).name for path in dashboard["files"])


def test_a_missing_sweep_is_an_error_naming_it_and_the_sweeps_found(store, tmp_path):
    with pytest.raises(ValueError, match=r"'no-such-sweep'.*\['grid', 'older'\]"):
        build_dashboard(EXPERIMENT, str(tmp_path), tracking_uri=store["uri"], sweep="no-such-sweep")
