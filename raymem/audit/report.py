"""The audit's self-contained visual report (``report.html``).

One HTML file that a radiologist and a privacy officer can read offline: a summary table, histograms of the
synthetic-to-train scores against the held-out null with tau marked, the top copies side by side, and a per-patient
table. Every image is an embedded ``data:`` URI and the page's Content-Security-Policy forbids any other fetch, so
opening it contacts no server. Compute core: no Ray.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from raymem import storage

HISTOGRAM_BINS = 50
SLICE_GAP_PX = 2
SCAN_HEIGHT_PX = 256
SCAN_MAX_WIDTH_PX = 384
REQUIRED_METRICS = (
    "threshold", "percentile", "n_train", "n_val", "n_synthetic", "n_memorized_train", "pct_memorized_train",
    "n_copies", "pct_copies", "n_patients", "pct_memorized_patients",
)
# Measured false-positive rates shown when present (fractions in [0, 1]; pct_* metrics are the percentages).
FPR_METRICS = (
    ("measured_fpr_copies", "Measured false-positive rate, copies (evaluation samples above tau)"),
    ("measured_fpr_memorized", "Measured false-positive rate, memorized images (n_synthetic novel draws)"),
    ("measured_fpr_memorized_patients", "Measured false-positive rate, memorized patients"),
    ("generator_fpr_copies", "Generator-null samples flagged as copies"),
    ("implied_fpr", "Implied false-positive rate at tau (in-sample, by construction)"),
)
PLANTED_METRICS = (("sensitivity", "Sensitivity (known copies flagged)"),
                   ("specificity", "Specificity (known novel images not flagged)"),
                   ("precision", "Precision"), ("roc_auc", "ROC AUC"))
# What the null distribution behind tau is, and what tau means for false positives, per calibration.
NULL_DESCRIPTIONS = {
    "paper": "each training sample's highest correlation with any validation sample",
    "matched": "each validation sample's highest correlation with any training sample",
    "generator": "each generator-null sample's highest correlation with any training sample (a generator trained "
                 "only on held-out patients)",
}
FALSE_POSITIVE_NOTES = {
    "paper": "By construction {tail:g} % of training samples have an unseen validation patient scoring above tau: "
    "the implied false-positive rate. A synthetic sample is searched among all training samples, more candidates "
    "than the validation samples behind the null when there are more training than validation samples, so "
    "genuinely new samples cross tau more often than that; the matched calibration corrects for this.",
    "matched": "The null searches held-out validation samples among the same training samples the synthetic "
    "samples are searched in, so about {tail:g} % of genuinely new real images score above tau: the implied "
    "false-positive rate.",
    "generator": "The null is the samples of the same generator trained only on held-out patients, searched among "
    "the same training samples, so about {tail:g} % of a generator's novel samples score above tau even when "
    "they are shifted from real images (smooth, low-texture samples).",
}
PATIENT_KEYS = ("patient_id", "n_train_images", "n_memorized", "best_score")
# Nothing but embedded images and the inline style sheet may load: no scripts, fonts or network fetches.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_STYLE = """
body { font-family: sans-serif; margin: 1.5rem auto; max-width: 75rem; padding: 0 1rem; color: #222; }
.warning { background: #fff3cd; border: 1px solid #e0b400; padding: 0.6rem 1rem; border-radius: 4px; }
.banner { background: #b00020; color: #fff; padding: 0.8rem 1rem; font-weight: bold; border-radius: 4px; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.flagged td { background: #fdecea; }
figure { margin: 0; }
img.scan { display: block; margin-bottom: 0.3rem; }
img.pixelated { image-rendering: pixelated; }
img.plot { max-width: 100%; }
"""


@dataclass(frozen=True)
class CopyPair:
    """A synthetic sample and its most similar training sample.

    Images are optional (embedding-only audits have none): channel-first ``(1, H, W)`` or ``(1, D, H, W)``, or
    spatial-only ``(H, W)`` or ``(D, H, W)``; any float range (each is min-max scaled for display).
    """

    synthetic_id: str
    train_id: str
    patient_id: str
    score: float
    synthetic_image: np.ndarray | None = None
    train_image: np.ndarray | None = None


def image_to_png_data_uri(image: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URI of an image, min-max scaled to 8-bit grayscale.

    image: ``(1, H, W)`` / ``(H, W)`` is shown as is; ``(1, D, H, W)`` / ``(D, H, W)`` as its three orthogonal
    mid-slices side by side (``[D // 2]`` of shape (H, W), ``[:, H // 2]`` of shape (D, W), ``[:, :, W // 2]`` of
    shape (D, H)), separated by ``SLICE_GAP_PX`` black columns, vertically centred, scaled over the whole volume.
    """
    return _png_data_uri_of_plane(_display_plane(image))


def render_report(
    *,
    metrics: dict,
    synthetic_top1: np.ndarray,
    null_scores: np.ndarray,
    pairs: Sequence[CopyPair],
    patients: Sequence[dict],
    title: str = "raymem memorization audit",
) -> str:
    """The report as one self-contained HTML document.

    metrics: the audit's metrics (``REQUIRED_METRICS``; optional ``calibration`` and ``OPTIONAL_FRACTION_METRICS``).
    synthetic_top1: (n_synthetic,) each synthetic sample's highest correlation with any training sample.
    null_scores: (n_null,) the nearest-neighbour correlations tau is the percentile of (train->val for the paper's
        calibration, val->train for ``calibration="matched"``).
    pairs: the copies to show side by side; shown by descending score.
    patients: one dict per training patient with ``PATIENT_KEYS``: ``n_train_images`` (training images of that
        patient), ``n_memorized`` (of those, memorized), ``best_score`` (highest correlation of any synthetic sample
        with any of them); shown by descending risk (n_memorized, then best_score).
    """
    missing = [key for key in REQUIRED_METRICS if key not in metrics]
    if missing:
        raise ValueError(f"metrics lacks {missing}: pass the metrics dict the audit wrote (metrics.json)")
    threshold = float(metrics.get("threshold_copies", metrics["threshold"]))
    percentile = float(metrics["percentile"])
    calibration = str(metrics.get("calibration", "paper"))
    if calibration not in NULL_DESCRIPTIONS:
        raise ValueError(f"metrics['calibration'] is {calibration!r}: expected one of {sorted(NULL_DESCRIPTIONS)}")
    null_description = NULL_DESCRIPTIONS[calibration]
    # Tables first: they validate the inputs before the slower histogram is drawn.
    summary_table = html_table(
        ["Figure", "Value"], [[_text(label), _text(value)] for label, value in _summary_rows(metrics)],
        table_id="summary",
    )
    pairs_table = _pairs_table(pairs, threshold)
    patients_table = _patients_table(patients)
    histogram_uri = _histogram_png_data_uri(
        _scores("synthetic_top1", synthetic_top1), _scores("null_scores", null_scores), threshold, null_description
    )
    calibration_table = _calibrations_table(metrics.get("calibrations", {}))
    distribution_table = _distribution_table(metrics.get("distribution", {}))
    planted_table = _planted_table(metrics.get("planted"))
    heldout_table = _heldout_table(metrics.get("detector_heldout"))
    warnings = "".join(f'<p class="warning">Warning: {_text(w)}</p>' for w in metrics.get("warnings", []))
    sections = [
        f"<h1>{_text(title)}</h1>",
        '<p class="banner">This report shows images of patients from the training data. Handle it as patient data: '
        "store and share it only where the training images themselves may go.</p>",
        warnings,
        "<h2>Summary: the generator's own samples against its training set</h2>",
        summary_table,
        *(["<h2>Every calibration, with false-positive rates measured on held-out patients at its own thresholds"
           "</h2>", calibration_table] if calibration_table else []),
        *(["<h2>Planted ground truth (scored apart: not in the figures above)</h2>", planted_table]
          if planted_table else []),
        *(["<h2>The detector on copies it never trained on (sensitivity at 95 % specificity)</h2>", heldout_table]
          if heldout_table else []),
        "<h2>How to read this</h2>",
        _how_to_read(percentile, calibration),
        "<h2>Score distributions</h2>",
        distribution_table,
        f'<figure><img class="plot" src="{histogram_uri}" alt="Histograms of synthetic-to-train correlations and of '
        f'the null ({_text(null_description)}) on shared bins, tau = {threshold:.4f} marked"></figure>',
        f"<h2>Top copies ({len(pairs)})</h2>",
        pairs_table,
        f"<h2>Patients ({len(patients)})</h2>",
        patients_table,
    ]
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
        f"<title>{_text(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def with_interval(value: float, interval: Sequence[float] | None, fmt: str = "{:.1f}", unit: str = " %") -> str:
    """'37.5 % (95 % CI 24.3-52.7)': a figure with its interval, in the figure's own units."""
    text = fmt.format(value) + unit
    if interval is None:
        return text
    return f"{text} (95 % CI {fmt.format(interval[0])}-{fmt.format(interval[1])})"


def _calibrations_table(calibrations: dict) -> str:
    """One row per calibration (metrics['calibrations']): thresholds, figures and measured rates with intervals."""
    columns = [("threshold_copies", "tau (copies)", "{:.4f}", ""), ("threshold_memorized", "tau (memorized)", "{:.4f}", ""),
               ("pct_copies", "copies", "{:.1f}", " %"), ("pct_memorized_train", "memorized images", "{:.1f}", " %"),
               ("pct_memorized_patients", "memorized patients", "{:.1f}", " %"),
               ("measured_fpr_copies", "measured FPR copies", "{:.3f}", ""),
               ("measured_fpr_memorized", "measured FPR memorized images", "{:.3f}", ""),
               ("measured_fpr_memorized_patients", "measured FPR memorized patients", "{:.3f}", ""),
               ("generator_fpr_copies", "generator-null flagged as copies", "{:.3f}", "")]
    rows = [[_text(name)] + [_text(with_interval(float(figures[key]), figures.get("ci95", {}).get(key), fmt, unit))
                             if figures.get(key) is not None else "–" for key, _, fmt, unit in columns]
            for name, figures in calibrations.items()]
    return html_table(["calibration"] + [column[1] for column in columns], rows, table_id="calibrations",
                      number_columns=set(range(1, len(columns) + 1))) if rows else ""


def _planted_table(planted: dict | None) -> str:
    """The planted ground truth (metrics['planted']): counts, and detection figures with their intervals."""
    if not planted:
        return ""
    rows = [["Known copies / known novel images", f"{planted['n_copies']} / {planted['n_novel']}"]]
    for key, label in PLANTED_METRICS:
        if planted.get(key) is not None:
            rows.append([label, with_interval(float(planted[key]), planted.get("ci95", {}).get(key), "{:.3f}", "")])
    return html_table(["Figure", "Value"], [[_text(a), _text(b)] for a, b in rows], table_id="planted")


def _heldout_table(heldout: dict | None) -> str:
    """metrics['detector_heldout']: per held-out copy family, sensitivity at 95 % specificity and ROC AUC."""
    if not heldout or "families" not in heldout:
        return ""
    rows = [[_text(name), _text(with_interval(f["sensitivity_at_95_specificity"],
                                              f["ci95"].get("sensitivity_at_95_specificity"), "{:.3f}", "")),
             _text(with_interval(f["roc_auc"], f["ci95"].get("roc_auc"), "{:.3f}", "")),
             _text(f"{f['n_positive']} / {f['n_negative']}")]
            for name, f in heldout["families"].items()]
    return html_table(["copy family", "sensitivity at 95 % specificity", "ROC AUC", "copies / negatives"], rows,
                      table_id="detector-heldout")


def _distribution_table(distribution: dict) -> str:
    """Mean and percentiles of the synthetic-to-train top-1 scores next to the nulls (metrics['distribution'])."""
    stats = ["mean", "p50", "p75", "p90", "p95", "p99"]
    labels = {"synthetic_top1": "synthetic -> nearest training", "null_train_to_val": "null: training -> nearest "
              "validation", "null_val_to_train": "null: validation -> nearest training",
              "eval_to_train": "evaluation (held-out) -> nearest training",
              "generator_null_to_train": "generator-null samples -> nearest training"}
    rows = [[_text(labels.get(name, name))] + [_text(f"{float(values[s]):.4f}") for s in stats]
            for name, values in distribution.items()]
    return html_table(["scores"] + stats, rows, table_id="distribution", number_columns=set(range(1, 7)))


def write_report(out_uri: str, html: str) -> None:
    """Write the report's HTML (UTF-8) to a local path or ``s3://`` URI."""
    storage.write_bytes(out_uri, html.encode("utf-8"))


def _display_plane(image: np.ndarray) -> np.ndarray:
    """The (rows, columns) uint8 plane :func:`image_to_png_data_uri` encodes."""
    spatial = np.asarray(image)
    if spatial.ndim in (3, 4) and spatial.shape[0] == 1:
        spatial = spatial[0]
    if spatial.ndim not in (2, 3):
        raise ValueError(
            f"image of shape {np.shape(image)} is neither 2D ((1, H, W) or (H, W)) nor 3D ((1, D, H, W) or "
            f"(D, H, W)): pass a single-channel image"
        )
    if not np.isfinite(spatial).all():
        raise ValueError(f"image of shape {np.shape(image)} contains NaN or infinite values: fix or drop it")
    intensities = _to_uint8(spatial)
    if intensities.ndim == 2:
        return intensities
    depth, height, width = intensities.shape
    return _side_by_side([intensities[depth // 2], intensities[:, height // 2, :], intensities[:, :, width // 2]])


def _png_data_uri_of_plane(plane: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(plane).save(buffer, format="PNG")
    return _png_data_uri(buffer.getvalue())


def _to_uint8(spatial: np.ndarray) -> np.ndarray:
    """Min-max scale to 0..255 (a constant image becomes all 0); same shape."""
    values = spatial.astype(np.float64)
    low, high = values.min(), values.max()
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.round((values - low) * scale).astype(np.uint8)


def _side_by_side(planes: list[np.ndarray]) -> np.ndarray:
    """2D uint8 planes of any sizes -> one (max height, sum of widths + gaps) plane, vertically centred, black fill."""
    height = max(plane.shape[0] for plane in planes)
    width = sum(plane.shape[1] for plane in planes) + SLICE_GAP_PX * (len(planes) - 1)
    canvas = np.zeros((height, width), dtype=np.uint8)
    column = 0
    for plane in planes:
        top = (height - plane.shape[0]) // 2
        canvas[top : top + plane.shape[0], column : column + plane.shape[1]] = plane
        column += plane.shape[1] + SLICE_GAP_PX
    return canvas


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _scores(name: str, values: np.ndarray) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise ValueError(f"{name} holds {bad} NaN or infinite scores: rerun the audit on finite embeddings")
    return scores


def _histogram_png_data_uri(
    synthetic_top1: np.ndarray, null_scores: np.ndarray, threshold: float, null_description: str
) -> str:
    """Two stacked histograms on the same bins and x axis, each with tau as a dashed vertical line."""
    edges = np.histogram_bin_edges(np.concatenate([synthetic_top1, null_scores, [threshold]]), bins=HISTOGRAM_BINS)
    figure = Figure(figsize=(8, 5.5), dpi=100, layout="constrained")
    axes = figure.subplots(2, 1, sharex=True)
    panels = (
        (synthetic_top1, "Synthetic samples: highest correlation with any training sample", "#b00020"),
        (null_scores, f"Null: {null_description}", "#3465a4"),
    )
    for ax, (scores, label, colour) in zip(axes, panels):
        ax.hist(scores, bins=edges, color=colour, alpha=0.8)
        ax.axvline(threshold, color="black", linestyle="--", label=f"tau = {threshold:.4f}")
        ax.set_title(f"{label} (n = {scores.size})", fontsize=10)
        ax.set_ylabel("samples")
        ax.legend(loc="upper left")
    axes[-1].set_xlabel("Pearson correlation of detector embeddings")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return _png_data_uri(buffer.getvalue())


def _summary_rows(metrics: dict) -> list[tuple[str, str]]:
    """(label, value) rows of the summary table, as plain text; every figure with its 95 % interval when the
    metrics carry one (``ci95``)."""
    ci95 = metrics.get("ci95", {})
    threshold_copies = float(metrics.get("threshold_copies", metrics["threshold"]))
    rows = [("Calibration", str(metrics.get("calibration", "paper"))),
            ("Threshold tau in use (copies)", f"{threshold_copies:.4f}")]
    if "threshold_memorized" in metrics and metrics["threshold_memorized"] != threshold_copies:
        rows.append(("Threshold tau in use (memorized images)", f"{float(metrics['threshold_memorized']):.4f}"))
    rows += [
        ("The paper's tau (P-th percentile of each training sample's best validation match)",
         f"{float(metrics['threshold']):.4f}"),
        ("Percentile P", f"{float(metrics['percentile']):g}"),
    ]
    reference = metrics.get("reference", {})
    rows += [
        ("Training set compared with", f"{reference.get('source', 'train split')}: {int(metrics['n_train'])} images"
                                       f" of {int(metrics['n_patients'])} patients"),
        ("Validation samples (calibration)", f"{int(metrics['n_val'])}"),
    ]
    if "n_eval" in metrics:
        source = {"test": "test split (held-out patients)",
                  "val-half": "half of the validation patients (no test split)"}.get(metrics.get("fpr_source"), "")
        rows.append(("Evaluation samples (false-positive rates)",
                     f"{int(metrics['n_eval'])} of {int(metrics.get('n_eval_patients', 0))} patients, {source}"))
    rows += [
        ("Generated samples", f"{int(metrics['n_synthetic'])}"),
        ("Copies among generated samples",
         f"{int(metrics['n_copies'])}: " + with_interval(float(metrics["pct_copies"]), ci95.get("pct_copies"))),
        ("Memorized training images",
         f"{int(metrics['n_memorized_train'])}: "
         + with_interval(float(metrics["pct_memorized_train"]), ci95.get("pct_memorized_train"))),
        ("Memorized patients", with_interval(float(metrics["pct_memorized_patients"]),
                                             ci95.get("pct_memorized_patients"))),
    ]
    for key, label in FPR_METRICS:
        if metrics.get(key) is not None:
            value = float(metrics[key])
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"metrics['{key}'] = {value} is not a fraction in [0, 1]: pass fractions (pct_* hold percentages)"
                )
            rows.append((label, with_interval(value, ci95.get(key), "{:.3f}", "")))
    return rows


def _how_to_read(percentile: float, calibration: str) -> str:
    paragraphs = [
        "Scores are Pearson correlations of the copy detector's embeddings, from -1 to 1; 1 means the detector "
        "sees the two images as the same.",
        f"The threshold tau is percentile P = {percentile:g} of the null: {NULL_DESCRIPTIONS[calibration]}, "
        "where validation patients never appear in training.",
        FALSE_POSITIVE_NOTES[calibration].format(tail=100.0 - percentile),
        "A synthetic sample is a copy when its score with its most similar training sample is strictly greater "
        "than tau. A training sample is memorized when some synthetic sample scores strictly greater than tau with "
        "it, and a patient is memorized when any of their training images is. The figures describe the generator's "
        "own samples against the images it trained on; planted copies are scored apart.",
        "Every figure carries a 95 % interval: Wilson intervals for shares of generated samples and of patients, "
        "widened for several images per patient (design effect) for shares of images, and a jackknife over "
        "evaluation patients for the memorized false-positive rates. The false-positive rates are measured at the "
        "thresholds in use on held-out patients that neither trained the generator nor set the threshold; they "
        "assume generated novel samples resemble real held-out images, which the generator-null calibration "
        "checks when it is given. Details: docs/statistics.md.",
        "A 3D volume, stored as (depth, height, width), appears as three orthogonal mid-slices side by side: the "
        "middle depth slice, the middle row, the middle column, one pixel per voxel (voxel spacing not applied).",
        "A score is evidence for review, not a verdict: look at the pairs side by side.",
    ]
    return "\n".join(f"<p>{_text(paragraph)}</p>" for paragraph in paragraphs)


def _pairs_table(pairs: Sequence[CopyPair], threshold: float) -> str:
    ranked = sorted(pairs, key=lambda pair: -pair.score)
    rows = [
        [
            str(rank),
            _sample_cell(pair.synthetic_id, pair.synthetic_image, "synthetic"),
            _sample_cell(pair.train_id, pair.train_image, "training"),
            f"{pair.score:.4f}",
            "yes" if pair.score > threshold else "no",
            _text(pair.patient_id),
        ]
        for rank, pair in enumerate(ranked, start=1)
    ]
    flagged = {index for index, pair in enumerate(ranked) if pair.score > threshold}
    headers = ["#", "Synthetic sample", "Most similar training sample", "Score", "Above tau", "Patient"]
    return html_table(headers, rows, empty_text="No pairs to show.", number_columns={0, 3}, flagged_rows=flagged,
                  table_id="copies")


def _sample_cell(sample_id: str, image: np.ndarray | None, kind: str) -> str:
    label = f"<code>{_text(sample_id)}</code>"
    if image is None:
        return label
    try:
        plane = _display_plane(image)
    except ValueError as err:
        raise ValueError(f"{kind} sample {sample_id!r}: {err}") from err
    rows, columns = plane.shape
    # Shown SCAN_HEIGHT_PX tall unless that makes it wider than SCAN_MAX_WIDTH_PX (3D triptychs); aspect kept.
    zoom = min(SCAN_HEIGHT_PX / rows, SCAN_MAX_WIDTH_PX / columns)
    css_class = "scan pixelated" if zoom > 1 else "scan"
    return (
        f'<img class="{css_class}" src="{_png_data_uri_of_plane(plane)}" width="{round(columns * zoom)}" '
        f'height="{round(rows * zoom)}" alt="{_text(kind)} sample {_text(sample_id)}">{label}'
    )


def _patients_table(patients: Sequence[dict]) -> str:
    for patient in patients:
        missing = [key for key in PATIENT_KEYS if key not in patient]
        if missing:
            raise ValueError(f"patient row {patient!r} lacks {missing}: each row needs {list(PATIENT_KEYS)}")
    ranked = sorted(
        patients, key=lambda row: (-int(row["n_memorized"]), -float(row["best_score"]), str(row["patient_id"]))
    )
    rows = [
        [_text(row["patient_id"]), str(int(row["n_train_images"])), str(int(row["n_memorized"])),
         f"{float(row['best_score']):.4f}"]
        for row in ranked
    ]
    flagged = {index for index, row in enumerate(ranked) if int(row["n_memorized"]) > 0}
    headers = ["Patient", "Training images", "Memorized", "Best score"]
    return html_table(headers, rows, empty_text="No patients to show.", number_columns={1, 2, 3},
                  flagged_rows=flagged, table_id="patients")


def html_table(
    headers: list[str],
    rows: list[list[str]],
    *,
    table_id: str,
    empty_text: str = "",
    number_columns: Collection[int] = (),
    flagged_rows: Collection[int] = (),
) -> str:
    """An HTML table of rows of cells that are already HTML (callers escape text); flagged rows are highlighted."""
    if not rows:
        return f"<p>{_text(empty_text)}</p>"
    head = "".join(f"<th>{_text(header)}</th>" for header in headers)
    body = []
    for index, row in enumerate(rows):
        row_class = ' class="flagged"' if index in flagged_rows else ""
        cells = "".join(
            f'<td class="number">{cell}</td>' if column in number_columns else f"<td>{cell}</td>"
            for column, cell in enumerate(row)
        )
        body.append(f"<tr{row_class}>{cells}</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(body) + "\n</tbody></table>"


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)
