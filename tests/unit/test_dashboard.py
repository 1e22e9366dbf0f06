"""Sweep dashboards are built from a real MLflow sqlite store laid out as `raymem sweep` logs it."""

from __future__ import annotations

import base64
import csv
import json
import math
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from raymem.audit.statistics import SAME_DIRECTION, SHOWN
from raymem.audit.verdicts import CONFOUNDED
from raymem.dashboard import (COPIES, FRECHET, FRECHET_BASELINE, MEMORIZED, Trial, _factor_figure, _per_epoch_figure,
                              build_dashboard, read_sweep)

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
                    Metric("quality.ms_ssim_diversity", 0.5, stamp, epoch),
                    Metric("audit.pct_memorized_train_ci_lo", memorized - 5.0, stamp, epoch),
                    Metric("audit.pct_memorized_train_ci_hi", memorized + 7.5, stamp, epoch)]
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
    trial = Trial(key="n8-aug0-tiny", run_id="run", status="FINISHED", factors={"train_size": "8"}, seed=None,
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


def _bands(ax) -> list[dict[float, tuple[float, float]]]:
    """Each shaded band (fill_between's PolyCollection) drawn on ``ax``, as x -> (lo, hi)."""
    from matplotlib.collections import PolyCollection

    bands = []
    for band in (c for c in ax.collections if isinstance(c, PolyCollection)):
        bounds: dict[float, list[float]] = {}
        for path in band.get_paths():
            for x, y in path.vertices:
                bounds.setdefault(round(float(x), 6), []).append(float(y))
        bands.append({x: (min(ys), max(ys)) for x, ys in sorted(bounds.items())})
    return bands


def _error_bars(ax) -> list[tuple[float, float, float]]:
    """(x, lo, hi) of every vertical error bar (errorbar's LineCollections) drawn on ``ax``, sorted."""
    from matplotlib.collections import LineCollection

    return sorted((float(segment[0][0]), float(min(segment[:, 1])), float(max(segment[:, 1])))
                  for bars in ax.collections if isinstance(bars, LineCollection) for segment in bars.get_segments())


def test_a_single_seed_study_shows_each_audits_own_interval_as_error_bars_not_bands(store):
    # Against augment (x 0: False, 1: True), each trial at its last audit with the interval logged with it
    # (memorized - 5, memorized + 7.5): at 16 images 62.5 and 35 %, at 128 images 30 and 5 %.
    memorized_panel = _factor_figure(read_sweep(store["client"], EXPERIMENT, SWEEP), "augment").axes[0]

    assert (_error_bars(memorized_panel), _bands(memorized_panel)) == (
        [(0.0, 25.0, 37.5), (0.0, 57.5, 70.0), (1.0, 0.0, 12.5), (1.0, 30.0, 42.5)], [])


SEEDED_EXPERIMENT, SEEDED_SWEEP = "seeded-study", "seeds"
T_975_1DF = 12.706204736174696  # Student-t 97.5 % quantile, 1 degree of freedom: the interval over 2 seeds
# (train_size, seed) -> {global epoch: (% memorized, % copies)}; audits after 2 and 4 diffusion epochs.
SEEDED_TRIALS = {
    ("8", 0): {3: (50.0, 20.0), 5: (80.0, 40.0)},
    ("8", 1): {3: (40.0, 10.0), 5: (60.0, 30.0)},
    ("16", 0): {3: (20.0, 5.0), 5: (40.0, 10.0)},
    ("16", 1): {3: (10.0, 5.0), 5: (30.0, 20.0)},
}


@pytest.fixture(scope="module")
def seeded_store(store, tmp_path_factory):
    """A sweep of 2 training-set sizes x 2 seeds, logged as `raymem sweep` logs one (seed as a param), in its own
    experiment of the same store (a second sqlite store would cost its schema migrations again)."""
    root, uri, client = tmp_path_factory.mktemp("seeded"), store["uri"], store["client"]
    exp_id = client.create_experiment(SEEDED_EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    parent_id = client.create_run(exp_id, run_name=f"sweep/{SEEDED_SWEEP}",
                                  tags={"raymem.kind": "sweep", "raymem.sweep": SEEDED_SWEEP}).info.run_id
    client.log_param(parent_id, "factors", "train_size")
    for (size, seed), audits in SEEDED_TRIALS.items():
        key = f"n{size}-aug0-tiny-e4-s{seed}"
        run_id = client.create_run(exp_id, run_name=key, tags={
            "mlflow.parentRunId": parent_id, "raymem.kind": "trial", "raymem.sweep": SEEDED_SWEEP,
            "raymem.trial": key}).info.run_id
        stamp = int(time.time() * 1000)
        metrics = [Metric(name, value, stamp, epoch) for epoch, (memorized, copies) in audits.items()
                   for name, value in ((MEMORIZED, memorized), (COPIES, copies))]
        params = {"factor.train_size": size, "factor.augment": "False", "factor.preset": "tiny",
                  "factor.diffusion_epochs": "4", "seed": str(seed), "autoencoder_epochs": str(AUTOENCODER_EPOCHS)}
        client.log_batch(run_id, metrics=metrics, params=[Param(name, value) for name, value in params.items()])
        client.set_terminated(run_id, status="FINISHED")
    return {"uri": uri, "client": client, "root": root, "parent_id": parent_id}


@pytest.fixture(scope="module")
def seeded_dashboard(seeded_store):
    return build_dashboard(SEEDED_EXPERIMENT, str(seeded_store["root"] / "dashboard"),
                           tracking_uri=seeded_store["uri"])


def test_factor_plot_shades_the_95_percent_interval_over_seeds(seeded_store):
    # Memorized at the last audit: 80 and 60 % at 8 images (mean 70, sd 14.1), 40 and 30 % at 16 (mean 35, sd 7.1);
    # the t interval's half-width is t * sd / sqrt(2) = 10 t and 5 t.
    memorized_panel = _factor_figure(read_sweep(seeded_store["client"], SEEDED_EXPERIMENT, None), "train_size").axes[0]

    assert _bands(memorized_panel) == [{0.0: pytest.approx((70 - 10 * T_975_1DF, 70 + 10 * T_975_1DF)),
                                        1.0: pytest.approx((35 - 5 * T_975_1DF, 35 + 5 * T_975_1DF))}]


def test_per_epoch_curves_show_the_mean_over_seeds_with_its_band(seeded_store):
    # Copies after 2 and 4 diffusion epochs: at 8 images 20 and 10 %, then 40 and 30 % (sd 7.1 both times); at 16
    # images 5 and 5 % (no spread: a band of width 0), then 10 and 20 %.
    sweep = read_sweep(seeded_store["client"], SEEDED_EXPERIMENT, None)
    copies_panel = next(ax for ax in _per_epoch_figure(sweep.trials, sweep.groups()).axes
                        if ax.get_title().startswith("Copies"))
    half = 5 * T_975_1DF

    assert ([list(line.get_ydata()) for line in copies_panel.get_lines()], _bands(copies_panel)) == (
        [[15.0, 35.0], [5.0, 15.0]],
        [{2.0: pytest.approx((15 - half, 15 + half)), 4.0: pytest.approx((35 - half, 35 + half))},
         {2.0: pytest.approx((5.0, 5.0)), 4.0: pytest.approx((15 - half, 15 + half))}])


class TableRows(HTMLParser):
    """The body rows (cell texts) of the table with ``table_id``."""

    def __init__(self, page: str, table_id: str):
        super().__init__()
        self.table_id, self.inside, self.in_cell, self.rows = table_id, False, False, []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.inside = dict(attrs).get("id") == self.table_id
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag == "td":
            self.rows[-1].append("")
            self.in_cell = True

    def handle_endtag(self, tag):
        self.inside = self.inside and tag != "table"
        self.in_cell = self.in_cell and tag != "td"

    def handle_data(self, data):
        if self.in_cell:
            self.rows[-1][-1] += data


def test_the_page_holds_each_factors_verdict_with_its_effect_and_interval(seeded_dashboard):
    # Memorized from 8 to 16 images, paired by seed: seed 0 40 - 80 = -40, seed 1 30 - 60 = -30: mean -35, sd 7.07,
    # half-width 5 t = 63.5: the interval reaches above 0.
    page = (Path(seeded_dashboard["out"]) / "index.html").read_text(encoding="utf-8")
    rows = [row for row in TableRows(page, "verdicts").rows if row[:2] == ["train_size", "pct_memorized_train"]]

    assert rows == [["train_size", "pct_memorized_train", "falls", "–", "8", "16", "-35.0",
                     f"[{-35 - 5 * T_975_1DF:+.1f}, {-35 + 5 * T_975_1DF:+.1f}]", "2", SAME_DIRECTION]]


def test_the_verdicts_are_written_as_json_and_logged_to_the_parent_run(seeded_store, seeded_dashboard):
    logged = seeded_store["client"].download_artifacts(seeded_store["parent_id"], "dashboard/verdicts.json",
                                                       str(seeded_store["root"]))
    training_length = [entry for entry in json.loads(Path(logged).read_text())
                       if entry["factor"] == "training_length" and entry["figure"] == "pct_copies"]
    # Copies from 2 to 4 diffusion epochs: at 8 images +20 and +20 (no spread), at 16 images +5 and +15.
    assert [(entry["at"]["train_size"], entry["from"], entry["to"], entry["mean"], entry["n_seeds"],
             math.isclose(entry["lo"], entry["hi"])) for entry in training_length] == [
        ("8", "2", "4", 20.0, 2, True), ("16", "2", "4", 10.0, 2, False)]


def test_a_model_size_verdict_names_the_trial_whose_unet_did_not_train(store, tmp_path):
    # tiny against paper2d over 2 seeds; paper2d seed 1's fixed-batch diffusion loss is still 0.98 at its last audit
    # (global epoch 5), though it had fallen to 0.4 at its first: the verdict is read at the last.
    client, experiment = store["client"], "untrained-study"
    exp_id = client.create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    parent_id = client.create_run(exp_id, run_name="sweep/sizes",
                                  tags={"raymem.kind": "sweep", "raymem.sweep": "sizes"}).info.run_id
    client.log_param(parent_id, "factors", "preset")
    for preset, seed, copies, losses in (("tiny", 0, 60.0, (0.3, 0.05)), ("tiny", 1, 62.0, (0.3, 0.04)),
                                         ("paper2d", 0, 80.0, (0.3, 0.1)), ("paper2d", 1, 5.0, (0.4, 0.98))):
        key = f"n16-aug0-{preset}-e4-s{seed}"
        run_id = client.create_run(exp_id, run_name=key, tags={
            "mlflow.parentRunId": parent_id, "raymem.kind": "trial", "raymem.sweep": "sizes",
            "raymem.trial": key}).info.run_id
        stamp = int(time.time() * 1000)
        metrics = [Metric(name, value, stamp, epoch) for epoch, figure in ((3, 10.0), (5, copies))
                   for name, value in ((MEMORIZED, figure), (COPIES, figure))]
        metrics += [Metric("diffusion.train_fixed", loss, stamp, epoch) for epoch, loss in zip((3, 5), losses)]
        params = {"factor.preset": preset, "seed": str(seed), "autoencoder_epochs": str(AUTOENCODER_EPOCHS)}
        client.log_batch(run_id, metrics=metrics, params=[Param(name, value) for name, value in params.items()])
        client.set_terminated(run_id, status="FINISHED")

    built = build_dashboard(experiment, str(tmp_path / "dashboard"), tracking_uri=store["uri"])
    page = (Path(built["out"]) / "index.html").read_text(encoding="utf-8")
    verdicts = {(row[0], row[1], row[3]): row[-1] for row in TableRows(page, "verdicts").rows if row}

    assert verdicts == {
        ("preset", "pct_memorized_train", "–"): f"{CONFOUNDED} (preset=paper2d, seed 1)",
        ("preset", "pct_copies", "–"): f"{CONFOUNDED} (preset=paper2d, seed 1)",
        ("training_length", "pct_memorized_train", "preset=tiny"): SHOWN,
        ("training_length", "pct_copies", "preset=tiny"): SHOWN,
        ("training_length", "pct_memorized_train", "preset=paper2d"): f"{CONFOUNDED} (preset=paper2d, seed 1)",
        ("training_length", "pct_copies", "preset=paper2d"): f"{CONFOUNDED} (preset=paper2d, seed 1)"}
    with open(Path(built["out"]) / "trials.csv", newline="", encoding="utf-8") as handle:
        losses = {row["trial"]: float(row["diffusion_loss_train"]) for row in csv.DictReader(handle)}
    assert losses == {"n16-aug0-tiny-e4-s0": 0.05, "n16-aug0-tiny-e4-s1": 0.04, "n16-aug0-paper2d-e4-s0": 0.1,
                      "n16-aug0-paper2d-e4-s1": 0.98}
    assert page.count('class="flagged"') == 1  # the untrained trial's row, shaded like a failed one
