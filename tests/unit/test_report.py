"""The HTML report renders self-contained, escaped, sorted pages from audit results (no browser here)."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from raymem.audit.report import CopyPair, image_to_png_data_uri, render_report, write_report

PNG_PREFIX = "data:image/png;base64,"
METRICS = {
    "threshold": 0.93, "percentile": 95.0, "n_train": 40, "n_val": 10, "n_synthetic": 40,
    "n_memorized_train": 6, "pct_memorized_train": 15.0, "n_copies": 12, "pct_copies": 30.0,
    "n_patients": 8, "pct_memorized_patients": 37.5,
}
REQUIRED_LABELS = [
    "Calibration", "Threshold tau in use (copies)",
    "The paper's tau (P-th percentile of each training sample's best validation match)", "Percentile P",
    "Training set compared with", "Validation samples (calibration)", "Generated samples",
    "Copies among generated samples", "Memorized training images", "Memorized patients",
]


class ParsedPage(HTMLParser):
    """A rendered report: start tags, URL-bearing attributes, image sources, and each table's rows as cell text."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.start_tags: list[str] = []
        self.resource_urls: list[str] = []
        self.image_sources: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._rows: list[list[str]] | None = None
        self._cells: list[str] | None = None
        self._text: list[str] | None = None
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.start_tags.append(tag)
        self.resource_urls += [value for name, value in attrs if name in ("src", "href", "srcset", "data", "poster")]
        if tag == "img":
            self.image_sources.append(attributes["src"])
        if tag == "table":
            self._rows = self.tables.setdefault(attributes["id"], [])
        elif tag == "tr" and self._rows is not None:
            self._cells = []
        elif tag in ("td", "th") and self._cells is not None:
            self._text = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._text is not None:
            self._cells.append("".join(self._text).strip())
            self._text = None
        elif tag == "tr" and self._cells is not None:
            self._rows.append(self._cells)
            self._cells = None
        elif tag == "table":
            self._rows = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def decode_png(data_uri: str) -> np.ndarray:
    assert data_uri.startswith(PNG_PREFIX)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_uri[len(PNG_PREFIX):]))))


def render(*, metrics=METRICS, pairs=(), patients=()) -> str:
    rng = np.random.default_rng(0)
    return render_report(
        metrics=metrics, synthetic_top1=rng.uniform(0.7, 1.0, 40), null_scores=rng.uniform(0.6, 0.95, 40),
        pairs=pairs, patients=patients,
    )


@pytest.fixture(scope="module")
def full_page() -> ParsedPage:
    """A report with every optional metric, a 2D pair, a 3D pair and an id-only pair."""
    rng = np.random.default_rng(1)
    image_2d = rng.normal(size=(1, 8, 10)).astype(np.float32)
    volume = rng.normal(size=(1, 4, 6, 8)).astype(np.float32)
    metrics = METRICS | {
        "calibration": "paper", "implied_fpr": 0.05, "n_eval": 40, "n_eval_patients": 10, "fpr_source": "test",
        "measured_fpr_copies": 0.1, "ci95": {"pct_copies": [24.3, 52.7], "measured_fpr_copies": [0.04, 0.23]},
        "warnings": ["only 9 calibration (val) patients"],
        "planted": {"n_copies": 24, "n_novel": 24, "sensitivity": 0.875, "specificity": 0.9, "precision": 0.9,
                    "roc_auc": 0.97, "ci95": {"sensitivity": [0.69, 0.96]}},
    }
    pairs = [
        CopyPair("syn-2d", "train-2d", "patient-a", 0.99, image_2d + 0.01, image_2d),
        CopyPair("syn-3d", "train-3d", "patient-b", 0.97, volume, volume * 2.0),
        CopyPair("syn-ids", "train-ids", "patient-c", 0.95),
    ]
    patients = [{"patient_id": "patient-a", "n_train_images": 5, "n_memorized": 2, "best_score": 0.99}]
    return ParsedPage(render(metrics=metrics, pairs=pairs, patients=patients))


def test_page_loads_nothing_but_embedded_pngs(full_page):
    external = [url for url in full_page.resource_urls if not url.startswith(PNG_PREFIX)]
    external += [tag for tag in full_page.start_tags if tag in ("script", "link", "iframe", "object", "embed")]
    assert external == []


def test_page_embeds_the_histogram_and_both_images_of_each_imaged_pair(full_page):
    assert len(full_page.image_sources) == 1 + 2 + 2


def test_summary_shows_intervals_and_evaluation_rates_when_present(full_page):
    rows = {row[0]: row[1] for row in full_page.tables["summary"][1:]}
    assert (rows["Copies among generated samples"],
            rows["Measured false-positive rate, copies (evaluation samples above tau)"],
            rows["Evaluation samples (false-positive rates)"]) == (
        "12: 30.0 % (95 % CI 24.3-52.7)", "0.100 (95 % CI 0.040-0.230)", "40 of 10 patients, test split (held-out patients)")


def test_warnings_are_shown_above_the_summary():
    page = render(metrics=METRICS | {"warnings": ["only 8 evaluation patients (fewer than 10)"]})

    assert '<p class="warning">Warning: only 8 evaluation patients (fewer than 10)</p>' in page.split("<table")[0]


def test_planted_truth_is_shown_apart(full_page):
    assert full_page.tables["planted"][1:3] == [["Known copies / known novel images", "24 / 24"],
                                               ["Sensitivity (known copies flagged)", "0.875 (95 % CI 0.690-0.960)"]]


def test_summary_omits_optional_metrics_when_absent():
    labels = [row[0] for row in ParsedPage(render()).tables["summary"][1:]]
    assert labels == REQUIRED_LABELS


def test_embedding_only_audit_lists_pairs_by_score_with_ids_and_no_pair_images():
    pairs = [CopyPair("syn-1", "train-7", "p-1", 0.91), CopyPair("syn-2", "train-3", "p-2", 0.98)]

    page = ParsedPage(render(pairs=pairs))

    assert (page.tables["copies"][1:], len(page.image_sources)) == (
        [["1", "syn-2", "train-3", "0.9800", "yes", "p-2"], ["2", "syn-1", "train-7", "0.9100", "no", "p-1"]],
        1,
    )


def test_patients_are_sorted_by_memorized_images_then_best_score():
    patients = [
        {"patient_id": "quiet", "n_train_images": 9, "n_memorized": 0, "best_score": 0.99},
        {"patient_id": "one-copy", "n_train_images": 3, "n_memorized": 1, "best_score": 0.95},
        {"patient_id": "two-copies", "n_train_images": 4, "n_memorized": 2, "best_score": 0.94},
        {"patient_id": "one-copy-higher", "n_train_images": 2, "n_memorized": 1, "best_score": 0.97},
    ]

    page = ParsedPage(render(patients=patients))

    assert [row[0] for row in page.tables["patients"][1:]] == ["two-copies", "one-copy-higher", "one-copy", "quiet"]


def test_identifiers_are_escaped_so_they_show_as_text():
    hostile = "<script>alert(1)</script>"
    patients = [{"patient_id": hostile, "n_train_images": 1, "n_memorized": 1, "best_score": 0.99}]

    page = ParsedPage(render(pairs=[CopyPair(hostile, "train-1", hostile, 0.99)], patients=patients))

    assert (page.tables["copies"][1][1], page.tables["patients"][1][0], "script" in page.start_tags) == (
        hostile, hostile, False,
    )


def test_matched_calibration_describes_its_validation_to_training_null():
    page = render(metrics=METRICS | {"calibration": "matched"})

    assert "each validation sample&#x27;s highest correlation with any training sample" in page


def test_2d_image_is_min_max_scaled_to_8_bit():
    image = np.array([[[-1.0, 0.0, 1.0], [3.0, 1.0, -1.0]]], dtype=np.float32)

    pixels = decode_png(image_to_png_data_uri(image))

    np.testing.assert_array_equal(pixels, [[0, 64, 128], [255, 128, 0]])


def test_3d_volume_shows_its_three_mid_slices_side_by_side():
    volume = np.arange(4 * 6 * 8, dtype=np.float32).reshape(1, 4, 6, 8)
    scaled = np.round(volume[0] * 255.0 / volume.max()).astype(np.uint8)
    expected = np.zeros((6, 8 + 2 + 8 + 2 + 6), dtype=np.uint8)
    expected[:, 0:8] = scaled[2]  # middle depth slice, (H, W) = (6, 8)
    expected[1:5, 10:18] = scaled[:, 3, :]  # middle row, (D, W) = (4, 8), centred in 6 rows
    expected[1:5, 20:26] = scaled[:, :, 4]  # middle column, (D, H) = (4, 6)

    pixels = decode_png(image_to_png_data_uri(volume))

    np.testing.assert_array_equal(pixels, expected)


def test_image_with_nan_is_rejected_naming_the_sample():
    image = np.ones((1, 4, 4), dtype=np.float32)
    image[0, 1, 1] = np.nan

    with pytest.raises(ValueError, match="synthetic sample 'syn-bad'"):
        render(pairs=[CopyPair("syn-bad", "train-1", "p-1", 0.99, image, np.ones((1, 4, 4)))])


def test_percentage_given_for_a_fraction_metric_is_rejected():
    with pytest.raises(ValueError, match="implied_fpr"):
        render(metrics=METRICS | {"implied_fpr": 5.0})


def test_missing_metric_is_named():
    metrics = {key: value for key, value in METRICS.items() if key != "n_copies"}

    with pytest.raises(ValueError, match="n_copies"):
        render(metrics=metrics)


def test_write_report_stores_the_page_as_utf8(tmp_path):
    page = "<p>Klinikum Köln — τ</p>"
    target = tmp_path / "audit" / "report.html"

    write_report(str(target), page)

    assert target.read_text(encoding="utf-8") == page


def test_both_calibrations_and_score_distributions_are_tabled():
    figures = {"threshold_copies": 0.93, "threshold_memorized": 0.94, "pct_copies": 40.0, "pct_memorized_train": 30.0,
               "pct_memorized_patients": 50.0, "implied_fpr_copies": 0.05, "measured_fpr_copies": 0.33,
               "measured_fpr_memorized": 0.05}
    metrics = {**METRICS, "calibrations": {"paper": figures, "matched": {**figures, "measured_fpr_copies": 0.06}},
               "distribution": {"synthetic_top1": dict.fromkeys(["mean", "p50", "p75", "p90", "p95", "p99"], 0.9)}}

    page = render(metrics=metrics)

    assert ">0.330<" in page and ">0.060<" in page and "synthetic -&gt; nearest training" in page
