"""Sweep dashboards: comparison plots, a trials table and a static HTML page built from a sweep's MLflow runs.

Reads the runs ``raymem sweep`` logs (one experiment per study, a parent run per sweep tagged ``raymem.kind=sweep``,
a child run per trial tagged ``raymem.kind=trial`` with ``factor.<name>`` params and per-epoch metric histories whose
step is the global epoch) and writes into a local folder:

- ``memorization_vs_<factor>.png``: memorization and copies at each trial's last audit against each swept factor
  with at least two levels, one line per combination of the other factors' levels: the mean over the seeds of
  that combination with its 95 % interval as a shaded band (``statistics.seed_interval``), or, for a combination
  run with one seed, the audit's own 95 % interval as error bars where it was logged;
- ``per_epoch.png``: memorization, copies, Frechet distance (with its real-vs-real baseline) and validation loss
  against diffusion epochs trained, one line per combination, drawn the same way;
- ``verdicts.json``: each factor's effect over seeds with its 95 % interval and the verdict on the paper's
  direction (``raymem.audit.verdicts``);
- ``trials.csv`` and ``index.html`` (self-contained: plots embedded as data URIs, nothing fetched, no scripts).

Trials of one combination are those that differ only in their ``seed`` param (``raymem sweep`` logs it).

MLflow is read through an explicit ``MlflowClient(tracking_uri)``; no global MLflow or matplotlib state is touched
(figures render on the Agg canvas directly, without pyplot).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from raymem.audit import verdicts as verdicts_core
from raymem.audit.report import CONTENT_SECURITY_POLICY, html_table
from raymem.audit.statistics import SeedMean, seed_interval

KIND_TAG = "raymem.kind"
SWEEP_TAG = "raymem.sweep"
TRIAL_TAG = "raymem.trial"
EARLY_STOP_TAG = "raymem.early_stopped_epoch"
PARENT_TAG = "mlflow.parentRunId"
FACTOR_PARAM_PREFIX = "factor."
SEED_PARAM = "seed"
ARTIFACT_PATH = "dashboard"

MEMORIZED = "memorization.pct_memorized_train"
COPIES = "memorization.pct_copies"
PATIENTS = "memorization.pct_memorized_patients"
SHARED = "memorization.pct_memorized_shared"
FRECHET = "quality.frechet_distance"
FRECHET_BASELINE = "quality.frechet_distance_real_baseline"
DIVERSITY = "quality.ms_ssim_diversity"
VAL_LOSS = "diffusion.val_fixed"
TRAIN_LOSS = "diffusion.train_fixed"  # the fixed training batch's diffusion loss: did the trial train (verdicts)
# Each audit's own 95 % interval of a headline figure (audit.<figure>_ci_lo / _ci_hi, raymem.audit.images).
AUDIT_INTERVALS = {metric: (f"audit.{metric.split('.')[-1]}_ci_lo", f"audit.{metric.split('.')[-1]}_ci_hi")
                   for metric in (MEMORIZED, COPIES)}
METRICS = (MEMORIZED, COPIES, PATIENTS, SHARED, FRECHET, FRECHET_BASELINE, DIVERSITY, VAL_LOSS, TRAIN_LOSS,
           *(bound for bounds in AUDIT_INTERVALS.values() for bound in bounds))
# The metric of each figure the verdicts are given for.
VERDICT_METRICS = {"pct_memorized_train": MEMORIZED, "pct_copies": COPIES}
# Figures read at each trial's last audit: the last step at which memorization was logged (audits log it).
LAST_AUDIT_COLUMNS = (
    (MEMORIZED, "pct_memorized_train", "Memorized training images %", "{:.1f}"),
    (COPIES, "pct_copies", "Copies %", "{:.1f}"),
    (PATIENTS, "pct_memorized_patients", "Memorized patients %", "{:.1f}"),
    (SHARED, "pct_memorized_shared", "Memorized, shared subset %", "{:.1f}"),
    (FRECHET, "frechet_distance", "Frechet distance", "{:#.4g}"),
    (FRECHET_BASELINE, "frechet_distance_real_baseline", "Frechet distance, real baseline", "{:#.4g}"),
    (DIVERSITY, "ms_ssim_diversity", "MS-SSIM diversity", "{:.3f}"),
    (TRAIN_LOSS, "diffusion_loss_train", "Diffusion loss, fixed training batch (did it train?)", "{:.3f}"),
)
# (metric, panel title, y label) of per_epoch.png, row by row.
PER_EPOCH_PANELS = (
    (MEMORIZED, "Memorized training images", "memorized training images (%)"),
    (COPIES, "Copies among synthetic samples", "copies among synthetic samples (%)"),
    (FRECHET, "Frechet distance to the study's held-out reference (detector space)", "Frechet distance"),
    (VAL_LOSS, "Validation diffusion loss (fixed batch)", "validation loss"),
)
# A panel's baseline, drawn dotted in each trial's colour: (metric, legend label). The real-vs-real baseline is a
# real sample as large as the synthetic set scored against the same reference: the floor of the estimator's
# small-sample bias, so a trial is read by its gap above its own baseline.
PER_EPOCH_BASELINES = {
    FRECHET: (FRECHET_BASELINE, "real sample of the same size (baseline)"),
}
# (metric, y label) of each memorization_vs_<factor>.png panel.
FACTOR_PANELS = (
    (MEMORIZED, "memorized training images (%)"),
    (COPIES, "copies among synthetic samples (%)"),
)
FIGURE_DPI = 100
BAND_ALPHA = 0.2

_STYLE = """
body { font-family: sans-serif; margin: 1.5rem auto; max-width: 90rem; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.flagged td { background: #fdecea; }
figure { margin: 0 0 1.5rem; }
img.plot { max-width: 100%; }
"""


@dataclass(frozen=True)
class Trial:
    """One child run of the sweep as the dashboard reads it.

    factors: swept factor name -> level as MLflow logged it ("16", "True", "tiny"); absent when not logged.
    seed: the ``seed`` param, None when not logged.
    histories: metric key -> {global epoch: value}, the latest value where a step was logged twice.
    early_stopped_epoch: the global epoch of the ``raymem.early_stopped_epoch`` tag, None when not stopped early.
    """

    key: str
    run_id: str
    status: str
    factors: dict[str, str]
    seed: int | None
    autoencoder_epochs: int
    early_stopped_epoch: int | None
    histories: dict[str, dict[int, float]]

    def diffusion_epochs_trained(self, epoch: int) -> int:
        """Diffusion epochs trained after global epoch ``epoch`` (0-based, autoencoder epochs first)."""
        return epoch + 1 - self.autoencoder_epochs

    @property
    def last_audit_epoch(self) -> int | None:
        """The global epoch of the last audit, None when the trial was never audited."""
        steps = self.histories.get(MEMORIZED, {})
        return max(steps) if steps else None

    def at_last_audit(self, metric: str) -> float | None:
        epoch = self.last_audit_epoch
        return None if epoch is None else self.histories.get(metric, {}).get(epoch)

    def curve(self, metric: str) -> tuple[list[int], list[float]]:
        """(diffusion epochs trained, values) of a metric, by epoch."""
        points = sorted(self.histories.get(metric, {}).items())
        return [self.diffusion_epochs_trained(epoch) for epoch, _ in points], [value for _, value in points]

    @property
    def combination_key(self) -> str:
        """The key without its seed suffix (``n8-aug0-tiny-e2-s1`` -> ``n8-aug0-tiny-e2``): names the trial's
        combination of factor levels."""
        suffix = f"-s{self.seed}"
        return self.key[:-len(suffix)] if self.seed is not None and self.key.endswith(suffix) else self.key


@dataclass(frozen=True)
class Group:
    """The trials of one combination of factor levels: they differ only in their seed (one trial without seeds)."""

    label: str
    trials: tuple[Trial, ...]

    def at_last_audit(self, metric: str) -> SeedMean:
        """The mean over seeds of each trial's figure at its last audit, with its 95 % interval."""
        return seed_interval([value for trial in self.trials
                              if (value := trial.at_last_audit(metric)) is not None])

    def curve(self, metric: str) -> tuple[list[int], list[SeedMean]]:
        """(diffusion epochs trained, the mean over the seeds logged at that length with its 95 % interval)."""
        by_epochs: dict[int, list[float]] = {}
        for trial in self.trials:
            for epochs, value in zip(*trial.curve(metric)):
                by_epochs.setdefault(epochs, []).append(value)
        points = sorted(by_epochs.items())
        return [epochs for epochs, _ in points], [seed_interval(values) for _, values in points]

    def audit_interval(self, metric: str, epoch: int | None = None) -> tuple[float, float] | None:
        """The single trial's own 95 % interval of ``metric`` at global epoch ``epoch`` (default: its last audit);
        None for a group of several seeds (its band is across seeds) or where no interval was logged."""
        if len(self.trials) != 1 or metric not in AUDIT_INTERVALS:
            return None
        trial = self.trials[0]
        epoch = trial.last_audit_epoch if epoch is None else epoch
        lo, hi = (trial.histories.get(bound, {}).get(epoch) for bound in AUDIT_INTERVALS[metric])
        return None if lo is None or hi is None else (lo, hi)


@dataclass(frozen=True)
class Sweep:
    """A sweep as the dashboard reads it: its parent run, its trials (sorted by their levels), the swept factors
    in order and each factor's levels, smallest first."""

    experiment: str
    name: str
    parent: object
    trials: list[Trial]
    factors: list[str]
    levels: dict[str, list[str]]

    def groups(self, trials: list[Trial] | None = None) -> list[Group]:
        """The trials (default: all) grouped by their combination of levels, in the trials' order."""
        grouped: dict[tuple[str | None, ...], list[Trial]] = {}
        for trial in self.trials if trials is None else trials:
            grouped.setdefault(tuple(trial.factors.get(name) for name in self.factors), []).append(trial)
        return [Group(members[0].combination_key, tuple(members)) for members in grouped.values()]

    def verdicts(self) -> list[dict]:
        """raymem.audit.verdicts.factor_verdicts over the finished trials that were audited."""
        runs = []
        for trial in self.trials:
            audits = sorted(trial.histories.get(MEMORIZED, {}))
            if trial.status != "FINISHED" or not audits:
                continue
            first, last = audits[0], audits[-1]
            runs.append(verdicts_core.SeedRun(
                levels={name: trial.factors[name] for name in self.factors if name in trial.factors},
                seed=trial.seed,
                first={figure: trial.histories.get(metric, {}).get(first, math.nan)
                       for figure, metric in VERDICT_METRICS.items()},
                last={figure: trial.histories.get(metric, {}).get(last, math.nan)
                      for figure, metric in VERDICT_METRICS.items()},
                first_epochs=trial.diffusion_epochs_trained(first), last_epochs=trial.diffusion_epochs_trained(last),
                last_loss=trial.histories.get(TRAIN_LOSS, {}).get(last, math.nan)))
        return verdicts_core.factor_verdicts(runs, self.factors, tuple(VERDICT_METRICS))


def build_dashboard(experiment: str, out_dir: str, *, tracking_uri: str, sweep: str | None = None,
                    log_to_parent: bool = True) -> dict:
    """Write the sweep's dashboard into the local folder ``out_dir`` and (by default) log it to the parent run.

    experiment: the study's MLflow experiment name. sweep: the sweep's name (tag ``raymem.sweep``); None picks the
    experiment's most recently started sweep. The files are logged under artifact path ``dashboard`` of the
    parent run when ``log_to_parent``.
    Returns {"out": out_dir, "files": [local paths written], "parent_run_id": ..., "trials": number of trials}.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    read = read_sweep(client, experiment, sweep)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, str]] = []  # (file name, alt text)
    for name in read.factors:
        if len(read.levels[name]) >= 2:
            file_name = f"memorization_vs_{name}.png"
            _save_png(_factor_figure(read, name), out / file_name)
            plots.append((file_name, f"Memorization and copies at each trial's last audit against {name}: the mean "
                                     "over seeds with its 95 % interval"))
    _save_png(_per_epoch_figure(read.trials, read.groups()), out / "per_epoch.png")
    plots.append(("per_epoch.png", "Memorization, copies, Frechet distance (dotted: its real-vs-real baseline) and "
                                   "validation loss against diffusion epochs trained, one line per combination of "
                                   "factor levels: the mean over seeds with its 95 % interval"))
    verdicts = verdicts_core.verdicts_json(read.verdicts())
    (out / "verdicts.json").write_text(json.dumps(verdicts, indent=2), encoding="utf-8")

    columns = _columns(read.factors)
    rows = [_row(trial, read.factors) for trial in read.trials]
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[key for key, _, _ in columns])
        writer.writeheader()
        writer.writerows({key: "" if row[key] is None else row[key] for key, _, _ in columns} for row in rows)
    page = _render_page(experiment=experiment, sweep=read.name, parent_run_id=read.parent.info.run_id,
                        tracking_uri=tracking_uri, columns=columns, rows=rows, verdicts=verdicts,
                        plots=[(file_name, alt, (out / file_name).read_bytes()) for file_name, alt in plots])
    (out / "index.html").write_text(page, encoding="utf-8")

    files = [str(out / name) for name in ("index.html", "trials.csv", "verdicts.json",
                                          *(file_name for file_name, _ in plots))]
    if log_to_parent:
        for path in files:
            client.log_artifact(read.parent.info.run_id, path, ARTIFACT_PATH)
    return {"out": out_dir, "files": files, "parent_run_id": read.parent.info.run_id, "trials": len(read.trials),
            "verdicts": verdicts}


def read_sweep(client, experiment: str, sweep: str | None) -> Sweep:
    """The named sweep (None: the experiment's most recently started one) with its trial runs."""
    exp_id, parent = _parent_run(client, experiment, sweep)
    sweep_name = parent.data.tags.get(SWEEP_TAG, parent.info.run_name)
    children = _search_all(
        client, exp_id, f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and tags.`{KIND_TAG}` = 'trial'")
    if not children:
        raise ValueError(f"sweep {sweep_name!r} of experiment {experiment!r} has no trial runs yet: build the "
                         "dashboard once its trials have started")
    trials = [_read_trial(client, run) for run in children]
    factors = _factor_names(parent.data.params, trials)
    levels = {name: verdicts_core.ordered_levels(name, (trial.factors.get(name) for trial in trials))
              for name in factors}
    trials.sort(key=lambda trial: (_level_ranks(trial, factors, levels), trial.seed or 0, trial.key))
    return Sweep(experiment, sweep_name, parent, trials, factors, levels)


def _parent_run(client, experiment: str, sweep: str | None):
    """(experiment id, parent run) of the named sweep, else of the experiment's most recently started sweep."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(exp.name for exp in client.search_experiments())
        raise ValueError(f"MLflow experiment {experiment!r} does not exist at this tracking URI (experiments "
                         f"found: {names}): pass the study name the sweep logged to")
    parents = _search_all(client, found.experiment_id, f"tags.`{KIND_TAG}` = 'sweep'",
                          order_by=["attributes.start_time DESC"])
    if not parents:
        raise ValueError(f"experiment {experiment!r} has no sweep runs (tag {KIND_TAG}=sweep): run `raymem sweep` "
                         "first, or pass the experiment it logged to")
    if sweep is None:
        return found.experiment_id, parents[0]
    named = [run for run in parents if run.data.tags.get(SWEEP_TAG) == sweep]
    if not named:
        sweeps = sorted({run.data.tags.get(SWEEP_TAG, "") for run in parents})
        raise ValueError(f"sweep {sweep!r} not found in experiment {experiment!r}; sweeps found: {sweeps}")
    return found.experiment_id, named[0]


def _search_all(client, exp_id: str, filter_string: str, order_by: list[str] | None = None) -> list:
    """Every run matching ``filter_string``, over all result pages."""
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string, order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _read_trial(client, run) -> Trial:
    params, tags = run.data.params, run.data.tags
    key = tags.get(TRIAL_TAG) or run.info.run_name or run.info.run_id
    if "autoencoder_epochs" not in params:
        raise ValueError(f"trial run {key!r} ({run.info.run_id}) has no param autoencoder_epochs, needed to count "
                         "diffusion epochs: was it logged by `raymem sweep`?")
    histories = {}
    for metric in METRICS:
        if metric in run.data.metrics:
            history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: (m.step, m.timestamp))
            histories[metric] = {point.step: point.value for point in history}
    early_stop = tags.get(EARLY_STOP_TAG)
    return Trial(
        key=key, run_id=run.info.run_id, status=run.info.status,
        factors={name[len(FACTOR_PARAM_PREFIX):]: value for name, value in params.items()
                 if name.startswith(FACTOR_PARAM_PREFIX)},
        seed=int(params[SEED_PARAM]) if params.get(SEED_PARAM) not in (None, "") else None,
        autoencoder_epochs=int(params["autoencoder_epochs"]),
        early_stopped_epoch=int(early_stop) if early_stop not in (None, "") else None,
        histories=histories,
    )


def _factor_names(parent_params: dict[str, str], trials: list[Trial]) -> list[str]:
    """The parent's ``factors`` param in its order, else every factor a trial logged, sorted."""
    if parent_params.get("factors"):
        return [name.strip() for name in parent_params["factors"].split(",") if name.strip()]
    return sorted({name for trial in trials for name in trial.factors})


def _level_ranks(trial: Trial, factors: list[str], levels: dict[str, list[str]]) -> tuple[int, ...]:
    """Position of the trial's level of each factor (a missing level sorts last)."""
    return tuple(levels[name].index(trial.factors[name]) if name in trial.factors else len(levels[name])
                 for name in factors)


def _colours(count: int) -> list:
    """``count`` distinguishable line colours (qualitative maps while they last, then a sequential one)."""
    if count <= 10:
        return [colormaps["tab10"](index) for index in range(count)]
    if count <= 20:
        return [colormaps["tab20"](index) for index in range(count)]
    return [colormaps["viridis"](index / (count - 1)) for index in range(count)]


def _outside_legend(figure: Figure, handles: list[Line2D], title: str, loc: str = "outside right upper") -> None:
    """One legend for all panels, outside them (right, or below), so it never hides data or the title."""
    below = loc.startswith("outside lower")
    figure.legend(handles=handles, title=title, loc=loc, fontsize=8, title_fontsize=9,
                  ncols=(min(len(handles), 2) if below else 1 if len(handles) <= 20 else 2))


def _draw_with_interval(ax, xs: list[float], means: list[SeedMean], colour, *,
                        single: list[tuple[float, float] | None] | None = None, **line) -> None:
    """A line through the means; a shaded band between their 95 % bounds where two or more seeds were measured; and
    where one was (``single``: that trial's own interval at each point, or None), error bars from it."""
    ax.plot(xs, [mean.mean for mean in means], color=colour, **line)
    if any(mean.n >= 2 for mean in means):
        ax.fill_between(xs, [mean.lo for mean in means], [mean.hi for mean in means], color=colour,
                        alpha=BAND_ALPHA, linewidth=0)
    bars = [(x, mean.mean, bounds) for x, mean, bounds in zip(xs, means, single or [None] * len(xs))
            if bounds is not None]
    if bars:
        ax.errorbar([x for x, _, _ in bars], [y for _, y, _ in bars],
                    yerr=[[y - lo for _, y, (lo, _) in bars], [hi - y for _, y, (_, hi) in bars]],
                    fmt="none", ecolor=colour, capsize=3, linewidth=1)


def _factor_figure(sweep: Sweep, factor: str) -> Figure:
    """Two panels (memorized %, copies %) against ``factor``'s levels (evenly spaced, in order), one line per
    combination of the other factors' levels; each point is the mean over seeds of the trials' figure at their last
    audit, with its 95 % band (several seeds) or the audit's own interval as error bars (one seed)."""
    others = [name for name in sweep.factors if name != factor]
    audited = [trial for trial in sweep.trials if trial.last_audit_epoch is not None and factor in trial.factors
               and all(name in trial.factors for name in others)]
    lines: dict[tuple[str, ...], list[Group]] = {}
    for group in sweep.groups(audited):
        lines.setdefault(tuple(group.trials[0].factors[name] for name in others), []).append(group)
    order = sorted(lines, key=lambda combo: tuple(sweep.levels[name].index(level)
                                                  for name, level in zip(others, combo)))
    colours = _colours(len(order))
    position = {level: index for index, level in enumerate(sweep.levels[factor])}

    figure = Figure(figsize=(11, 5), dpi=FIGURE_DPI, layout="constrained")
    figure.suptitle(f"Memorization against {factor} (each trial at its last audit; band: 95 % interval over seeds)")
    axes = figure.subplots(1, len(FACTOR_PANELS))
    for ax, (metric, y_label) in zip(axes, FACTOR_PANELS):
        for combo, colour in zip(order, colours):
            points = sorted((position[group.trials[0].factors[factor]], group.at_last_audit(metric),
                             group.audit_interval(metric)) for group in lines[combo]
                            if group.at_last_audit(metric).n > 0)
            _draw_with_interval(ax, [x for x, _, _ in points], [mean for _, mean, _ in points], colour,
                                single=[bounds for _, _, bounds in points], marker="o")
        ax.set_xticks(range(len(sweep.levels[factor])), sweep.levels[factor])
        ax.set_xlim(-0.3, len(sweep.levels[factor]) - 0.7)
        ax.set_xlabel(factor)
        ax.set_ylabel(y_label)
        ax.set_ylim(bottom=0)  # percentages: a flat 0 % line sits on the axis, not mid-plot
        ax.set_title(y_label[0].upper() + y_label[1:], fontsize=10)
        ax.grid(alpha=0.3)
    labels = [", ".join(f"{name}={level}" for name, level in zip(others, combo)) or "all trials" for combo in order]
    _outside_legend(figure, [Line2D([], [], color=colour, marker="o", label=label)
                             for label, colour in zip(labels, colours)], "other factors", loc="outside lower center")
    return figure


def _per_epoch_figure(trials: list[Trial], groups: list[Group] | None = None) -> Figure:
    """A 2 x 2 grid of ``PER_EPOCH_PANELS`` against diffusion epochs trained, one line per group of trials (default:
    one per trial), the mean over its seeds with a 95 % band, or, for one seed, the audit's own interval as error
    bars; a dashed vertical line in the group's colour marks each early stop."""
    groups = groups if groups is not None else [Group(trial.key, (trial,)) for trial in trials]
    colours = _colours(len(groups))
    figure = Figure(figsize=(13, 8), dpi=FIGURE_DPI, layout="constrained")
    figure.suptitle("Per-epoch figures of every combination of factor levels (band: 95 % interval over seeds)")
    axes = figure.subplots(2, 2, sharex=True).ravel()
    for ax, (metric, title, y_label) in zip(axes, PER_EPOCH_PANELS):
        baseline = PER_EPOCH_BASELINES.get(metric)
        for group, colour in zip(groups, colours):
            epochs, means = group.curve(metric)
            single = None
            if len(group.trials) == 1:
                trial = group.trials[0]
                single = [group.audit_interval(metric, epoch) for epoch in sorted(trial.histories.get(metric, {}))]
            _draw_with_interval(ax, epochs, means, colour, single=single,
                                marker="o" if metric != VAL_LOSS else None, markersize=4)
            if baseline is not None:
                epochs, means = group.curve(baseline[0])
                ax.plot(epochs, [mean.mean for mean in means], color=colour, linestyle=":", marker="x",
                        markersize=4, label=f"{group.label}: {baseline[1]}")
            for trial in group.trials:
                if trial.early_stopped_epoch is not None:
                    ax.axvline(trial.diffusion_epochs_trained(trial.early_stopped_epoch), color=colour,
                               linestyle="--", linewidth=1)
        if baseline is not None:
            ax.legend(handles=[Line2D([], [], color="0.3", marker="o", markersize=4, label="synthetic samples"),
                               Line2D([], [], color="0.3", linestyle=":", marker="x", markersize=4, label=baseline[1])],
                      fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(y_label)
        if metric.startswith("memorization."):
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("diffusion epochs trained")
    _outside_legend(figure, [Line2D([], [], color=colour, label=_legend_label(group))
                             for group, colour in zip(groups, colours)], "trials (dashed: early stop)")
    return figure


def _legend_label(group: Group) -> str:
    trials = group.trials
    notes = [f"{len(trials)} seeds"] if len(trials) > 1 else []
    unfinished = [trial.status for trial in trials if trial.status != "FINISHED"]
    if unfinished:
        notes.append(unfinished[0] if len(trials) == 1 else f"{len(unfinished)} not finished")
    stops = [trial.diffusion_epochs_trained(trial.early_stopped_epoch) for trial in trials
             if trial.early_stopped_epoch is not None]
    if stops:
        notes.append(f"stopped at {', '.join(map(str, stops))}")
    return f"{group.label} ({', '.join(notes)})" if notes else group.label


def _save_png(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure).print_png(str(path))


def _columns(factors: list[str]) -> list[tuple[str, str, str | None]]:
    """(trials.csv column, HTML header, number format or None for text) of each table column."""
    return [
        ("trial", "Trial", None),
        *((f"{FACTOR_PARAM_PREFIX}{name}", name, None) for name in factors),
        (SEED_PARAM, "Seed", None),
        ("status", "Status", None),
        ("last_audit_diffusion_epochs", "Diffusion epochs at last audit", "{:d}"),
        *((column, header, number_format) for _, column, header, number_format in LAST_AUDIT_COLUMNS),
        ("early_stop_diffusion_epochs", "Early stop (diffusion epochs)", "{:d}"),
        ("run_id", "MLflow run", None),
    ]


def _row(trial: Trial, factors: list[str]) -> dict:
    """One table row: text, ints and floats as read from MLflow; None where nothing was logged."""
    last_audit = trial.last_audit_epoch
    return {
        "trial": trial.key,
        **{f"{FACTOR_PARAM_PREFIX}{name}": trial.factors.get(name) for name in factors},
        SEED_PARAM: trial.seed,
        "status": trial.status,
        "last_audit_diffusion_epochs": None if last_audit is None else trial.diffusion_epochs_trained(last_audit),
        **{column: trial.at_last_audit(metric) for metric, column, _, _ in LAST_AUDIT_COLUMNS},
        "early_stop_diffusion_epochs": None if trial.early_stopped_epoch is None
        else trial.diffusion_epochs_trained(trial.early_stopped_epoch),
        "run_id": trial.run_id,
    }


def _render_page(*, experiment: str, sweep: str, parent_run_id: str, tracking_uri: str,
                 columns: list[tuple[str, str, str | None]], rows: list[dict], verdicts: list[dict],
                 plots: list[tuple[str, str, bytes]]) -> str:
    """index.html: title, verdicts and trials tables, the plots as data URIs, and how to compare the runs in the
    MLflow UI."""
    title = f"raymem sweep {sweep} ({experiment})"
    number_columns = {index for index, (_, _, number_format) in enumerate(columns) if number_format}
    cells = [[_cell(row[key], number_format) for key, _, number_format in columns] for row in rows]
    # Failed trials, and trials whose UNet did not train (verdicts.UNTRAINED_LOSS), are shaded.
    flagged = {index for index, row in enumerate(rows) if row["status"] != "FINISHED"
               or verdicts_core.did_not_train(row["diffusion_loss_train"])}
    table = html_table([header for _, header, _ in columns], cells, table_id="trials",
                   number_columns=number_columns, flagged_rows=flagged)
    figures = "\n".join(
        f'<figure><img class="plot" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
        f'alt="{_escape(alt)}"><figcaption>{_escape(file_name)}</figcaption></figure>'
        for file_name, alt, png in plots)
    open_ui = (f"open {tracking_uri} in a browser" if tracking_uri.startswith(("http://", "https://"))
               else f"run <code>mlflow ui --backend-store-uri {_escape(tracking_uri)}</code> and open the address it "
                    "prints")
    sections = [
        f"<h1>{_escape(title)}</h1>",
        f"<p>MLflow experiment <code>{_escape(experiment)}</code>, parent run <code>{_escape(parent_run_id)}</code>. "
        "Each trial's figures are read at its last audit; memorization and copies are percentages (0-100). "
        "Frechet distances are to one held-out reference shared by every trial; with few samples the distance is "
        "mostly the estimator's bias, so read each beside its real baseline (a real sample as large as the "
        "synthetic set, against the same reference). Rows of trials that did not finish are highlighted.</p>",
        "<h2>Verdicts on the paper's directions</h2>",
        "<p>Each factor's effect on a figure is its value at the factor's last level minus at its first, seed by seed "
        "with the other factors fixed (training length: each trial's last audit minus its first), in percentage "
        "points; the mean over seeds with its 95 % Student-t interval. <em>shown</em>: the whole interval lies on "
        "the paper's side of 0; <em>same direction, not significant</em>: the mean does, the interval does not (or "
        "one seed gives no interval); <em>not shown</em>: the mean is 0 or the other way.</p>",
        _verdict_table(verdicts),
        f"<h2>Trials ({len(rows)})</h2>",
        table,
        "<h2>Plots</h2>",
        figures,
        "<h2>Comparing the runs in the MLflow UI</h2>",
        f"<p>To compare, {open_ui}; open experiment <code>{_escape(experiment)}</code>, expand the parent run "
        f"<code>sweep/{_escape(sweep)}</code> to list its child runs (one per trial), select them and press "
        "<em>Compare</em>. The parallel-coordinates plot over the <code>factor.*</code> params and the "
        "<code>memorization.*</code> metrics shows which factors drive memorization; the metric charts plot each "
        "trial's per-epoch history (x axis: step = global epoch, autoencoder epochs first). This page is also "
        f"logged to the parent run under <code>{ARTIFACT_PATH}/</code>.</p>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
        f"<title>{_escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n" + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


DIRECTION_WORDS = {"down": "falls", "up": "rises"}


def _verdict_table(verdicts: list[dict]) -> str:
    """One row per factor, combination of the other factors and figure (verdicts.json's entries)."""
    headers = ["Factor", "Figure", "Paper: the figure", "Other factors", "From", "To", "Effect (points)",
               "95 % interval", "Seeds", "Verdict"]
    rows = [[_escape(entry["factor"]), _escape(entry["figure"]), _escape(DIRECTION_WORDS[entry["direction"]]),
             _escape(", ".join(f"{name}={level}" for name, level in entry["at"].items()) or "–"),
             _escape(entry["from"]), _escape(entry["to"]), _cell(entry["mean"], "{:+.1f}"),
             "–" if entry["lo"] is None else _escape(f"[{entry['lo']:+.1f}, {entry['hi']:+.1f}]"),
             _cell(entry["n_seeds"], "{:d}"), _escape(_verdict_words(entry))] for entry in verdicts]
    return html_table(headers, rows, table_id="verdicts", number_columns={6, 7, 8},
                      empty_text="No factor has two levels measured at both ends yet.")


def _verdict_words(entry: dict) -> str:
    """The verdict, and the trials that did not train where it is confounded."""
    untrained = entry.get("untrained") or []
    return entry["verdict"] + (f" ({'; '.join(untrained)})" if untrained else "")


def _cell(value, number_format: str | None) -> str:
    if value is None:
        return "–"
    if number_format is None:
        return _escape(value)
    return _escape(number_format.format(value))


def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)
