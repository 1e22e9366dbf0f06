"""Sweep dashboards: comparison plots, a trials table and a static HTML page built from a sweep's MLflow runs.

Reads the runs ``raymem sweep`` logs (one experiment per study, a parent run per sweep tagged ``raymem.kind=sweep``,
a child run per trial tagged ``raymem.kind=trial`` with ``factor.<name>`` params and per-epoch metric histories whose
step is the global epoch) and writes into a local folder:

- ``memorization_vs_<factor>.png``: memorization and copies at each trial's last audit against each swept factor
  with at least two levels, one line per combination of the other factors' levels;
- ``per_epoch.png``: memorization, copies, Frechet distance (with its real-vs-real baseline) and validation loss
  against diffusion epochs trained;
- ``trials.csv`` and ``index.html`` (self-contained: plots embedded as data URIs, nothing fetched, no scripts).

MLflow is read through an explicit ``MlflowClient(tracking_uri)``; no global MLflow or matplotlib state is touched
(figures render on the Agg canvas directly, without pyplot).
"""

from __future__ import annotations

import base64
import csv
import html
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from raymem.audit.report import CONTENT_SECURITY_POLICY, html_table

KIND_TAG = "raymem.kind"
SWEEP_TAG = "raymem.sweep"
TRIAL_TAG = "raymem.trial"
EARLY_STOP_TAG = "raymem.early_stopped_epoch"
PARENT_TAG = "mlflow.parentRunId"
FACTOR_PARAM_PREFIX = "factor."
ARTIFACT_PATH = "dashboard"

MEMORIZED = "memorization.pct_memorized_train"
COPIES = "memorization.pct_copies"
PATIENTS = "memorization.pct_memorized_patients"
SHARED = "memorization.pct_memorized_shared"
FRECHET = "quality.frechet_distance"
FRECHET_BASELINE = "quality.frechet_distance_real_baseline"
DIVERSITY = "quality.ms_ssim_diversity"
VAL_LOSS = "diffusion.val_fixed"
METRICS = (MEMORIZED, COPIES, PATIENTS, SHARED, FRECHET, FRECHET_BASELINE, DIVERSITY, VAL_LOSS)
# Figures read at each trial's last audit: the last step at which memorization was logged (audits log it).
LAST_AUDIT_COLUMNS = (
    (MEMORIZED, "pct_memorized_train", "Memorized training images %", "{:.1f}"),
    (COPIES, "pct_copies", "Copies %", "{:.1f}"),
    (PATIENTS, "pct_memorized_patients", "Memorized patients %", "{:.1f}"),
    (SHARED, "pct_memorized_shared", "Memorized, shared subset %", "{:.1f}"),
    (FRECHET, "frechet_distance", "Frechet distance", "{:#.4g}"),
    (FRECHET_BASELINE, "frechet_distance_real_baseline", "Frechet distance, real baseline", "{:#.4g}"),
    (DIVERSITY, "ms_ssim_diversity", "MS-SSIM diversity", "{:.3f}"),
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
    histories: metric key -> {global epoch: value}, the latest value where a step was logged twice.
    early_stopped_epoch: the global epoch of the ``raymem.early_stopped_epoch`` tag, None when not stopped early.
    """

    key: str
    run_id: str
    status: str
    factors: dict[str, str]
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
    exp_id, parent = _parent_run(client, experiment, sweep)
    sweep_name = parent.data.tags.get(SWEEP_TAG, parent.info.run_name)
    children = _search_all(
        client, exp_id, f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and tags.`{KIND_TAG}` = 'trial'")
    if not children:
        raise ValueError(f"sweep {sweep_name!r} of experiment {experiment!r} has no trial runs yet: build the "
                         "dashboard once its trials have started")
    trials = [_read_trial(client, run) for run in children]
    factors = _factor_names(parent.data.params, trials)
    levels = {name: _ordered_levels(trial.factors.get(name) for trial in trials) for name in factors}
    trials.sort(key=lambda trial: (_level_ranks(trial, factors, levels), trial.key))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, str]] = []  # (file name, alt text)
    for name in factors:
        if len(levels[name]) >= 2:
            file_name = f"memorization_vs_{name}.png"
            _save_png(_factor_figure(trials, name, factors, levels), out / file_name)
            plots.append((file_name, f"Memorization and copies at each trial's last audit against {name}"))
    _save_png(_per_epoch_figure(trials), out / "per_epoch.png")
    plots.append(("per_epoch.png", "Memorization, copies, Frechet distance (dotted: its real-vs-real baseline) and "
                                   "validation loss against diffusion epochs trained, one line per trial"))

    columns = _columns(factors)
    rows = [_row(trial, factors) for trial in trials]
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[key for key, _, _ in columns])
        writer.writeheader()
        writer.writerows({key: "" if row[key] is None else row[key] for key, _, _ in columns} for row in rows)
    page = _render_page(experiment=experiment, sweep=sweep_name, parent_run_id=parent.info.run_id,
                        tracking_uri=tracking_uri, columns=columns, rows=rows,
                        plots=[(file_name, alt, (out / file_name).read_bytes()) for file_name, alt in plots])
    (out / "index.html").write_text(page, encoding="utf-8")

    files = [str(out / name) for name in ("index.html", "trials.csv", *(file_name for file_name, _ in plots))]
    if log_to_parent:
        for path in files:
            client.log_artifact(parent.info.run_id, path, ARTIFACT_PATH)
    return {"out": out_dir, "files": files, "parent_run_id": parent.info.run_id, "trials": len(trials)}


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
        autoencoder_epochs=int(params["autoencoder_epochs"]),
        early_stopped_epoch=int(early_stop) if early_stop not in (None, "") else None,
        histories=histories,
    )


def _factor_names(parent_params: dict[str, str], trials: list[Trial]) -> list[str]:
    """The parent's ``factors`` param in its order, else every factor a trial logged, sorted."""
    if parent_params.get("factors"):
        return [name.strip() for name in parent_params["factors"].split(",") if name.strip()]
    return sorted({name for trial in trials for name in trial.factors})


def _ordered_levels(values: Iterable[str | None]) -> list[str]:
    """The distinct logged levels: in numeric order when all parse as numbers, else sorted as strings."""
    distinct = {value for value in values if value is not None}
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return sorted(distinct)


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


def _outside_legend(figure: Figure, handles: list[Line2D], title: str) -> None:
    """One legend for all panels, right of them, so it never hides data."""
    figure.legend(handles=handles, title=title, loc="outside right upper", fontsize=8, title_fontsize=9,
                  ncols=1 if len(handles) <= 20 else 2)


def _factor_figure(trials: list[Trial], factor: str, factors: list[str], levels: dict[str, list[str]]) -> Figure:
    """Two panels (memorized %, copies %) against ``factor``'s levels (evenly spaced, in order), one line per
    combination of the other factors' levels; each point is one trial's figure at its last audit."""
    others = [name for name in factors if name != factor]
    audited = [trial for trial in trials if trial.last_audit_epoch is not None and factor in trial.factors
               and all(name in trial.factors for name in others)]
    lines: dict[tuple[str, ...], list[Trial]] = {}
    for trial in audited:
        lines.setdefault(tuple(trial.factors[name] for name in others), []).append(trial)
    order = sorted(lines, key=lambda combo: tuple(levels[name].index(level) for name, level in zip(others, combo)))
    colours = _colours(len(order))
    position = {level: index for index, level in enumerate(levels[factor])}

    figure = Figure(figsize=(11, 4.5), dpi=FIGURE_DPI, layout="constrained")
    figure.suptitle(f"Memorization against {factor} (each trial at its last audit)")
    axes = figure.subplots(1, len(FACTOR_PANELS))
    for ax, (metric, y_label) in zip(axes, FACTOR_PANELS):
        for combo, colour in zip(order, colours):
            points = sorted((position[trial.factors[factor]], trial.at_last_audit(metric)) for trial in lines[combo]
                            if trial.at_last_audit(metric) is not None)
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", color=colour)
        ax.set_xticks(range(len(levels[factor])), levels[factor])
        ax.set_xlim(-0.3, len(levels[factor]) - 0.7)
        ax.set_xlabel(factor)
        ax.set_ylabel(y_label)
        ax.set_ylim(bottom=0)  # percentages: a flat 0 % line sits on the axis, not mid-plot
        ax.set_title(y_label[0].upper() + y_label[1:], fontsize=10)
        ax.grid(alpha=0.3)
    labels = [", ".join(f"{name}={level}" for name, level in zip(others, combo)) or "all trials" for combo in order]
    _outside_legend(figure, [Line2D([], [], color=colour, marker="o", label=label)
                             for label, colour in zip(labels, colours)], "other factors")
    return figure


def _per_epoch_figure(trials: list[Trial]) -> Figure:
    """A 2 x 2 grid of ``PER_EPOCH_PANELS`` against diffusion epochs trained, one line per trial; a dashed vertical
    line in the trial's colour marks an early stop."""
    colours = _colours(len(trials))
    figure = Figure(figsize=(13, 8), dpi=FIGURE_DPI, layout="constrained")
    figure.suptitle("Per-epoch figures of every trial")
    axes = figure.subplots(2, 2, sharex=True).ravel()
    for ax, (metric, title, y_label) in zip(axes, PER_EPOCH_PANELS):
        baseline = PER_EPOCH_BASELINES.get(metric)
        for trial, colour in zip(trials, colours):
            epochs, values = trial.curve(metric)
            ax.plot(epochs, values, color=colour, marker="o" if metric != VAL_LOSS else None, markersize=4)
            if baseline is not None:
                epochs, values = trial.curve(baseline[0])
                ax.plot(epochs, values, color=colour, linestyle=":", marker="x", markersize=4,
                        label=f"{trial.key}: {baseline[1]}")
            if trial.early_stopped_epoch is not None:
                ax.axvline(trial.diffusion_epochs_trained(trial.early_stopped_epoch), color=colour, linestyle="--",
                           linewidth=1)
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
    _outside_legend(figure, [Line2D([], [], color=colour, label=_legend_label(trial))
                             for trial, colour in zip(trials, colours)], "trial (dashed: early stop)")
    return figure


def _legend_label(trial: Trial) -> str:
    notes = [] if trial.status == "FINISHED" else [trial.status]
    if trial.early_stopped_epoch is not None:
        notes.append(f"stopped at {trial.diffusion_epochs_trained(trial.early_stopped_epoch)}")
    return f"{trial.key} ({', '.join(notes)})" if notes else trial.key


def _save_png(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure).print_png(str(path))


def _columns(factors: list[str]) -> list[tuple[str, str, str | None]]:
    """(trials.csv column, HTML header, number format or None for text) of each table column."""
    return [
        ("trial", "Trial", None),
        *((f"{FACTOR_PARAM_PREFIX}{name}", name, None) for name in factors),
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
        "status": trial.status,
        "last_audit_diffusion_epochs": None if last_audit is None else trial.diffusion_epochs_trained(last_audit),
        **{column: trial.at_last_audit(metric) for metric, column, _, _ in LAST_AUDIT_COLUMNS},
        "early_stop_diffusion_epochs": None if trial.early_stopped_epoch is None
        else trial.diffusion_epochs_trained(trial.early_stopped_epoch),
        "run_id": trial.run_id,
    }


def _render_page(*, experiment: str, sweep: str, parent_run_id: str, tracking_uri: str,
                 columns: list[tuple[str, str, str | None]], rows: list[dict],
                 plots: list[tuple[str, str, bytes]]) -> str:
    """index.html: title, trials table, the plots as data URIs, and how to compare the runs in the MLflow UI."""
    title = f"raymem sweep {sweep} ({experiment})"
    number_columns = {index for index, (_, _, number_format) in enumerate(columns) if number_format}
    cells = [[_cell(row[key], number_format) for key, _, number_format in columns] for row in rows]
    flagged = {index for index, row in enumerate(rows) if row["status"] != "FINISHED"}
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


def _cell(value, number_format: str | None) -> str:
    if value is None:
        return "–"
    if number_format is None:
        return _escape(value)
    return _escape(number_format.format(value))


def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)
