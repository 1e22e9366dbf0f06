"""raymem.audit.report: the whole rendered page against a reviewed snapshot, and the parts a snapshot cannot pin
(the pixels and sizes of the embedded images, the histogram, the input checks), against hand-computed values.

Written to pin down behaviour that mutation testing (tools/mutation.sh) found unchecked: test_report.py checks the
page's structure and a few figures, so a changed label, unit, format, sort key or paragraph passed it."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raymem.audit import report
from raymem.audit.report import CopyPair, html_table, render_report, with_interval

GOLDEN = Path(__file__).parent / "golden" / "report.html"
PNG_PREFIX = "data:image/png;base64,"
METRICS = {
    "threshold": 0.93, "percentile": 95.0, "n_train": 48, "n_val": 12, "n_synthetic": 30,
    "n_memorized_train": 6, "pct_memorized_train": 12.5, "n_copies": 9, "pct_copies": 30.0,
    "n_patients": 8, "pct_memorized_patients": 37.5,
}


def full_metrics() -> dict:
    """Every optional part of the metrics, each figure distinct so that a figure shown in another's place shows."""
    figures = {"threshold_copies": 0.9412, "threshold_memorized": 0.9533, "pct_copies": 33.3,
               "pct_memorized_train": 12.5, "pct_memorized_patients": 37.5, "measured_fpr_copies": 0.0417,
               "measured_fpr_memorized": 0.125, "measured_fpr_memorized_patients": 0.25, "generator_fpr_copies": None,
               "ci95": {"pct_copies": [17.9, 52.8], "measured_fpr_copies": [0.0074, 0.2024]}}
    return METRICS | {
        "calibration": "generator", "threshold_copies": 0.9412, "threshold_memorized": 0.9533,
        "reference": {"source": "generator training set"}, "n_eval": 24, "n_eval_patients": 4, "fpr_source": "test",
        "measured_fpr_copies": 0.0417, "measured_fpr_memorized": 0.125, "measured_fpr_memorized_patients": 0.25,
        "generator_fpr_copies": 0.0333, "implied_fpr": 0.05,
        "ci95": {"pct_copies": [17.9, 52.8], "pct_memorized_train": [4.4, 30.9], "pct_memorized_patients": [13.7, 69.4],
                 "measured_fpr_copies": [0.0074, 0.2024], "measured_fpr_memorized": [0.0434, 0.3103],
                 "measured_fpr_memorized_patients": [0.0456, 0.6994], "generator_fpr_copies": [0.0059, 0.1667]},
        "warnings": ["only 4 evaluation patients (fewer than 10)", "a <b>bold</b> & quoted 'warning'"],
        "calibrations": {"paper": figures, "generator": {**figures, "generator_fpr_copies": 0.0333}},
        "distribution": {"synthetic_top1": {"mean": 0.81, "p50": 0.8, "p75": 0.85, "p90": 0.9, "p95": 0.93,
                                            "p99": 0.97},
                         "null_train_to_val": {"mean": 0.71, "p50": 0.7, "p75": 0.75, "p90": 0.8, "p95": 0.9,
                                               "p99": 0.95},
                         "null_val_to_train": {"mean": 0.72, "p50": 0.71, "p75": 0.76, "p90": 0.81, "p95": 0.91,
                                               "p99": 0.96},
                         "eval_to_train": {"mean": 0.73, "p50": 0.72, "p75": 0.77, "p90": 0.82, "p95": 0.92,
                                           "p99": 0.97},
                         "generator_null_to_train": {"mean": 0.61, "p50": 0.6, "p75": 0.65, "p90": 0.7, "p95": 0.75,
                                                     "p99": 0.8},
                         "custom_scores": {"mean": 0.51, "p50": 0.5, "p75": 0.55, "p90": 0.6, "p95": 0.65,
                                           "p99": 0.7}},
        "planted": {"n_copies": 10, "n_novel": 12, "sensitivity": 0.9, "specificity": 0.9167, "precision": None,
                    "roc_auc": 0.975, "ci95": {"sensitivity": [0.596, 0.982]}},
        "detector_heldout": {"families": {"elastic": {"sensitivity_at_95_specificity": 0.8, "roc_auc": 0.95,
                                                      "n_positive": 20, "n_negative": 40,
                                                      "ci95": {"roc_auc": [0.9, 0.99],
                                                               "sensitivity_at_95_specificity": [0.6, 0.92]}}}},
    }


def pairs() -> list[CopyPair]:
    image = np.arange(8 * 10, dtype=np.float32).reshape(1, 8, 10)
    volume = np.arange(4 * 6 * 300, dtype=np.float32).reshape(4, 6, 300)
    return [CopyPair("syn-low", "train-low", "p-low", 0.9412),  # exactly tau: not above it
            CopyPair("syn-2d", "train-2d", "p-a", 0.99, image, image[0]),
            CopyPair("syn-3d", "train-3d", "p-b", 0.97, volume, volume)]


def patients() -> list[dict]:
    return [{"patient_id": "tie-b", "n_train_images": 3, "n_memorized": 1, "best_score": 0.95},
            {"patient_id": "tie-a", "n_train_images": 2, "n_memorized": 1, "best_score": 0.95},
            {"patient_id": "none", "n_train_images": 9, "n_memorized": 0, "best_score": 0.999},
            {"patient_id": "two", "n_train_images": 4, "n_memorized": 2, "best_score": 0.94}]


def render_full() -> str:
    rng = np.random.default_rng(0)
    return render_report(metrics=full_metrics(), synthetic_top1=rng.uniform(0.7, 1.0, 30),
                         null_scores=rng.uniform(0.6, 0.95, 12), pairs=pairs(), patients=patients(),
                         title="Audit <of> 'chest'")


def without_pngs(page: str) -> str:
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,PNG", page)


def decode_png(data_uri: str) -> np.ndarray:
    assert data_uri.startswith(PNG_PREFIX)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_uri[len(PNG_PREFIX):]))))


def test_the_page_matches_its_reviewed_snapshot():
    """The whole page but its PNG bytes: every label, unit, format, interval, sort order, escape and paragraph.
    A deliberate change: RAYMEM_WRITE_GOLDEN=1 rewrites tests/unit/golden/report.html (and fails), then read the
    diff before committing it."""
    page = without_pngs(render_full())
    if os.environ.get("RAYMEM_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(page, encoding="utf-8")
        pytest.fail(f"wrote {GOLDEN}: review its diff, then rerun without RAYMEM_WRITE_GOLDEN")

    assert page == GOLDEN.read_text(encoding="utf-8")


def test_every_calibration_renders_its_own_null_and_false_positive_note():
    notes = {name: without_pngs(render_report(metrics=METRICS | {"calibration": name}, synthetic_top1=[0.9],
                                              null_scores=[0.8], pairs=[], patients=[]))
             for name in report.NULL_DESCRIPTIONS}

    for name, page in notes.items():
        note = report.FALSE_POSITIVE_NOTES[name].format(tail=5.0).replace("'", "&#x27;")
        assert (report.NULL_DESCRIPTIONS[name].replace("'", "&#x27;") in page, note in page,
                f"Calibration</td><td>{name}<" in page) == (True, True, True), name


def test_an_unknown_calibration_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"metrics\['calibration'\] is 'bogus': expected one of "
                                         r"\['generator', 'matched', 'paper'\]"):
        render_report(metrics=METRICS | {"calibration": "bogus"}, synthetic_top1=[0.9], null_scores=[0.8],
                      pairs=[], patients=[])


def test_the_paper_calibration_is_the_default_and_a_missing_metric_is_named_with_the_fix():
    page = render_report(metrics=METRICS, synthetic_top1=[0.9], null_scores=[0.8], pairs=[], patients=[])
    with pytest.raises(ValueError) as raised:
        render_report(metrics={k: v for k, v in METRICS.items() if k not in ("n_val", "pct_copies")},
                      synthetic_top1=[0.9], null_scores=[0.8], pairs=[], patients=[])

    assert ("Calibration</td><td>paper<" in page, "<p>No pairs to show.</p>" in page,
            "<p>No patients to show.</p>" in page,
            str(raised.value)) == (True, True, True, "metrics lacks ['n_val', 'pct_copies']: pass the metrics dict "
                                                     "the audit wrote (metrics.json)")


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_a_false_positive_rate_at_either_end_of_zero_to_one_is_shown(value):
    page = render_report(metrics=METRICS | {"implied_fpr": value}, synthetic_top1=[0.9], null_scores=[0.8],
                         pairs=[], patients=[])

    assert f"(in-sample, by construction)</td><td>{value:.3f}</td>" in page


@pytest.mark.parametrize("value", [-0.01, 1.5])
def test_a_false_positive_rate_outside_zero_to_one_is_refused_with_the_fix(value):
    with pytest.raises(ValueError) as raised:
        render_report(metrics=METRICS | {"measured_fpr_copies": value}, synthetic_top1=[0.9], null_scores=[0.8],
                      pairs=[], patients=[])

    assert str(raised.value) == (f"metrics['measured_fpr_copies'] = {value} is not a fraction in [0, 1]: pass "
                                 "fractions (pct_* hold percentages)")


def test_one_threshold_for_both_figures_is_shown_once():
    page = render_report(metrics=METRICS | {"threshold_copies": 0.95, "threshold_memorized": 0.95},
                         synthetic_top1=[0.9], null_scores=[0.8], pairs=[], patients=[])

    assert ("(memorized images)" in page, "Threshold tau in use (copies)</td><td>0.9500<" in page) == (False, True)


def test_with_interval_formats_the_figure_and_both_bounds_in_the_given_format():
    assert (with_interval(37.5, None), with_interval(37.5, [24.25, 52.75]),
            with_interval(0.04166, (0.0074, 0.2), "{:.3f}", "")) == (
        "37.5 %", "37.5 % (95 % CI 24.2-52.8)", "0.042 (95 % CI 0.007-0.200)")


def test_the_summary_row_without_an_evaluation_source_leaves_the_source_blank():
    page = render_report(metrics=METRICS | {"n_eval": 7}, synthetic_top1=[0.9], null_scores=[0.8], pairs=[],
                         patients=[])

    assert "Evaluation samples (false-positive rates)</td><td>7 of 0 patients, </td>" in page


def test_a_half_of_validation_evaluation_is_named():
    page = render_report(metrics=METRICS | {"n_eval": 7, "n_eval_patients": 3, "fpr_source": "val-half"},
                         synthetic_top1=[0.9], null_scores=[0.8], pairs=[], patients=[])

    assert "7 of 3 patients, half of the validation patients (no test split)</td>" in page


def test_a_held_out_table_without_families_is_left_out():
    page = render_report(metrics=METRICS | {"detector_heldout": {"skipped": "no detector"}}, synthetic_top1=[0.9],
                         null_scores=[0.8], pairs=[], patients=[])

    assert "detector-heldout" not in page


def test_a_patient_row_without_a_key_is_refused_naming_the_row_and_the_keys():
    row = {"patient_id": "p-1", "n_train_images": 2, "best_score": 0.9}

    with pytest.raises(ValueError) as raised:
        render_report(metrics=METRICS, synthetic_top1=[0.9], null_scores=[0.8], pairs=[], patients=[row])

    assert str(raised.value) == (f"patient row {row!r} lacks ['n_memorized']: each row needs ['patient_id', "
                                 "'n_train_images', 'n_memorized', 'best_score']")


def test_non_finite_scores_are_refused_with_their_count():
    with pytest.raises(ValueError) as raised:
        render_report(metrics=METRICS, synthetic_top1=[0.9], null_scores=[[np.nan, 0.8], [np.inf, 0.7]],
                      pairs=[], patients=[])

    assert str(raised.value) == "null_scores holds 2 NaN or infinite scores: rerun the audit on finite embeddings"


@pytest.mark.parametrize("shape", [(4,), (1, 1, 1, 1, 4), (2, 3, 4, 4), (1, 2, 3, 4, 4)])
def test_an_image_that_is_not_a_single_channel_2d_or_3d_image_is_refused_naming_its_shape(shape):
    with pytest.raises(ValueError) as raised:
        report.image_to_png_data_uri(np.zeros(shape, dtype=np.float32))

    assert str(raised.value).startswith(f"image of shape {shape} ") and "is neither 2D ((1, H, W) or (H, W)) nor 3D ((1, D, H, W) or (D, H, W)): pass a single-channel " \
           "image" in str(raised.value)


def test_a_2d_image_with_or_without_its_channel_and_a_volume_of_depth_one_encode_as_documented():
    image = np.array([[0.0, 2.0], [4.0, 1.0]], dtype=np.float32)
    volume = np.arange(1 * 3 * 5, dtype=np.float64).reshape(1, 3, 5)  # (D, H, W) with D = 1

    with_channel, bare = decode_png(report.image_to_png_data_uri(image[None])), decode_png(
        report.image_to_png_data_uri(image))
    plane = report._display_plane(volume[None])  # (1, D, H, W): a volume, 3 x (5 + 2 + 5 + 2 + 3) side by side

    assert (with_channel.tolist(), bare.tolist(), plane.shape) == ([[0, 128], [255, 64]], [[0, 128], [255, 64]],
                                                                   (3, 17))


def test_a_constant_image_is_black_and_a_nan_is_named():
    with pytest.raises(ValueError, match=r"image of shape \(1, 2, 2\) contains NaN or infinite values: fix or drop"):
        report.image_to_png_data_uri(np.array([[[0.0, np.inf], [1.0, 2.0]]]))

    assert decode_png(report.image_to_png_data_uri(np.full((1, 3, 4), 7.5))).tolist() == [[0] * 4] * 3


def test_planes_of_different_heights_are_centred_side_by_side_with_black_gaps():
    tall, short = np.full((5, 2), 9, dtype=np.uint8), np.full((2, 3), 7, dtype=np.uint8)

    canvas = report._side_by_side([tall, short, short])

    expected = np.zeros((5, 2 + 2 + 3 + 2 + 3), dtype=np.uint8)
    expected[:, 0:2] = 9
    expected[1:3, 4:7] = 7
    expected[1:3, 9:12] = 7
    np.testing.assert_array_equal(canvas, expected)


def test_pair_images_are_scaled_to_the_row_height_or_the_column_width_keeping_aspect():
    page = render_full()
    sizes = dict(re.findall(r'<img class="([a-z ]+)" src="data:image/png;base64,[^"]+" (width="\d+" height="\d+") '
                            r'alt="synthetic', page)[i][::-1] for i in range(2))

    # 8 x 10 pixels: 256 / 8 = 32 < 384 / 10, so 320 x 256, drawn pixelated; the triptych of a (D, H, W) of
    # 4 x 6 x 300 is 6 x (300 + 2 + 300 + 2 + 6) = 6 x 610: 384 / 610 < 1, so 384 x round(6 * 384 / 610) = 384 x 4
    assert sizes == {'width="320" height="256"': "scan pixelated", 'width="384" height="4"': "scan"}


def test_pair_images_carry_the_right_pixels_in_the_right_cells():
    page = render_full()
    cells = re.findall(r'src="(data:image/png;base64,[^"]+)"[^>]*alt="(synthetic|training) sample (syn|train)-2d"',
                       page)

    expected = np.round(np.arange(80, dtype=np.float64).reshape(8, 10) * 255.0 / 79.0).astype(np.uint8)
    assert [kind for _, kind, _ in cells] == ["synthetic", "training"]
    for uri, _, _ in cells:
        np.testing.assert_array_equal(decode_png(uri), expected)


def test_an_unreadable_training_image_is_named_as_training():
    image = np.ones((1, 4, 4))
    with pytest.raises(ValueError, match=r"^training sample 'train-9': image of shape \(2, 3, 4, 4\)"):
        render_report(metrics=METRICS, synthetic_top1=[0.9], null_scores=[0.8], patients=[],
                      pairs=[CopyPair("syn-9", "train-9", "p", 0.9, image, np.ones((2, 3, 4, 4)))])


def test_the_histogram_is_800_by_550_with_both_panels_coloured_and_tau_drawn():
    uri = report._histogram_png_data_uri(np.full(20, 0.9), np.linspace(0.5, 0.8, 20), 0.85, "the null")
    pixels = decode_png(uri)[..., :3].astype(int)

    def share_near(colour: str, rows: slice) -> float:
        target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        blended = np.round(0.8 * target + 0.2 * 255)  # alpha 0.8 over white
        return float((np.abs(pixels[rows] - blended).max(axis=-1) <= 3).mean())

    top, bottom = slice(0, 275), slice(275, 550)
    assert pixels.shape == (550, 800, 3)
    assert (share_near("#b00020", top) > 0.005, share_near("#b00020", bottom),
            share_near("#3465a4", bottom) > 0.005, share_near("#3465a4", top)) == (True, 0.0, True, 0.0)


def test_the_histogram_bins_span_scores_and_tau_in_fifty_equal_bins():
    """The synthetic bars sit where the synthetic scores are: all 20 at one value fill one bin of 50 across
    [0, 1] (the threshold 1.0 widens the range), so the red bar is 1/50 of the axis wide."""
    pixels = decode_png(report._histogram_png_data_uri(np.full(20, 0.0), np.full(20, 0.0), 1.0, "n"))[..., :3]
    red = np.round(0.8 * np.array([0xb0, 0x00, 0x20]) + 0.2 * 255)
    columns = np.flatnonzero((np.abs(pixels[:275].astype(int) - red).max(axis=-1) <= 3).any(axis=0))
    axis = np.flatnonzero((pixels[:275] == 0).all(axis=-1).sum(axis=0) > 100)  # the frame's left and right sides

    width_share = (columns.max() - columns.min() + 1) / (axis.max() - axis.min())
    assert 1 / 50 * 0.8 < width_share < 1 / 50 * 1.2, width_share


def test_an_empty_table_shows_its_text_and_a_table_escapes_its_headers():
    assert (html_table(["a"], [], table_id="t", empty_text="Nothing <here>."),
            html_table(["<a>"], [["x", "1"]], table_id="t", number_columns={1}, flagged_rows={0})) == (
        "<p>Nothing &lt;here&gt;.</p>",
        '<table id="t"><thead><tr><th>&lt;a&gt;</th></tr></thead><tbody>\n'
        '<tr class="flagged"><td>x</td><td class="number">1</td></tr>\n</tbody></table>')


def test_a_report_without_optional_figures_has_none_of_their_sections():
    page = render_report(metrics=METRICS | {"calibrations": {}, "planted": {}, "detector_heldout": {}},
                         synthetic_top1=[0.9], null_scores=[0.8], pairs=[], patients=[])

    headings = re.findall(r"<h2>([^<(]+)", page)
    assert headings == ["Summary: the generator's own samples against its training set", "How to read this",
                        "Score distributions", "Top copies ", "Patients "]


def test_planted_figures_without_intervals_are_shown_bare():
    planted = {"n_copies": 4, "n_novel": 5, "sensitivity": 0.75, "specificity": 0.8}

    page = render_report(metrics=METRICS | {"planted": planted}, synthetic_top1=[0.9], null_scores=[0.8], pairs=[],
                         patients=[])

    assert "<td>Sensitivity (known copies flagged)</td><td>0.750</td>" in page and "ROC AUC" not in page


@pytest.mark.parametrize("rows, css_class", [(256, "scan"), (200, "scan pixelated"), (300, "scan")])
def test_only_an_image_drawn_larger_than_its_pixels_is_pixelated(rows, css_class):
    image = np.arange(rows * 4, dtype=np.float32).reshape(1, rows, 4)

    page = render_report(metrics=METRICS, synthetic_top1=[0.9], null_scores=[0.8], patients=[],
                         pairs=[CopyPair("syn", "train", "p", 0.95, image, image)])

    assert re.findall(r'<img class="([a-z ]+)" src="data:image/png;base64,[^"]+" width="\d+" height="256"',
                      page) == [css_class] * 2


def test_the_default_title_and_training_set_name_and_scores_given_as_a_column():
    page = render_report(metrics=METRICS, synthetic_top1=np.array([[0.9], [0.7]]), null_scores=np.array([[0.8]]),
                         pairs=[], patients=[])

    assert "<title>raymem memorization audit</title>" in page and "<h1>raymem memorization audit</h1>" in page
    assert "<td>Training set compared with</td><td>train split: 48 images of 8 patients</td>" in page


def test_non_finite_synthetic_scores_are_named():
    with pytest.raises(ValueError, match=r"^synthetic_top1 holds 1 NaN or infinite scores"):
        render_report(metrics=METRICS, synthetic_top1=[0.9, np.nan], null_scores=[0.8], pairs=[], patients=[])


def test_tau_is_one_dashed_black_line_at_the_same_place_in_both_panels():
    """Both panels share the x axis: tau = 0.7, among scores from 0 to 1 (null) and 0.5 to 0.6 (synthetic), is drawn
    at the same column, black and dashed (gaps along it), in the upper and the lower half."""
    pixels = decode_png(report._histogram_png_data_uri(np.linspace(0.5, 0.6, 30), np.linspace(0.0, 1.0, 30), 0.7,
                                                       "n"))[..., :3].astype(int)
    black = (pixels < 40).all(axis=-1)

    def tau_column(rows: slice) -> tuple[int, float]:
        """The column, left of the frame's right side, with the longest run of black pixels, and its black share."""
        counts = black[rows].sum(axis=0)
        frame = np.flatnonzero(counts > 0.6 * (rows.stop - rows.start))
        inside = np.arange(frame.min() + 5, frame.max() - 5)
        column = int(inside[np.argmax(counts[inside])])
        return column, float(counts[column]) / (rows.stop - rows.start)

    (upper, upper_share), (lower, lower_share) = tau_column(slice(40, 250)), tau_column(slice(300, 500))
    left, right = np.flatnonzero(black[300:500].sum(axis=0) > 120)[[0, -1]]  # the lower frame's sides
    # x axis from 0 to 1 with matplotlib's 5 % margins: tau = 0.7 at (0.05 + 0.7) / 1.1 of the frame's width
    assert abs(upper - lower) <= 1 and abs(lower - (left + (right - left) * 0.75 / 1.1)) <= 3, (upper, lower)
    assert 0.3 < upper_share < 0.9 and 0.3 < lower_share < 0.9, (upper_share, lower_share)  # dashed, not solid


def drawn_figures(monkeypatch) -> list:
    """The matplotlib figures the report draws, kept for inspection (the PNG's text is pixels no test reads)."""
    figures = []

    class Kept(report.Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            figures.append(self)

    monkeypatch.setattr(report, "Figure", Kept)
    return figures


def test_the_histograms_titles_labels_legend_and_layout_say_what_is_drawn(monkeypatch):
    figures = drawn_figures(monkeypatch)

    render_report(metrics=METRICS | {"calibration": "matched"}, synthetic_top1=np.linspace(0.6, 0.95, 30),
                  null_scores=np.linspace(0.5, 0.9, 12), pairs=[], patients=[])

    (figure,) = figures
    top, bottom = figure.axes
    assert [ax.get_title() for ax in (top, bottom)] == [
        "Synthetic samples: highest correlation with any training sample (n = 30)",
        f"Null: {report.NULL_DESCRIPTIONS['matched']} (n = 12)"]
    assert {ax.title.get_fontsize() for ax in (top, bottom)} == {10}
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in (top, bottom)] == [
        ("", "samples"), ("Pearson correlation of detector embeddings", "samples")]
    assert [[text.get_text() for text in ax.get_legend().get_texts()] for ax in (top, bottom)] == [
        ["tau = 0.9300"], ["tau = 0.9300"]]
    for ax in (top, bottom):  # the legend in the upper left corner of its panel (as drawn into the PNG)
        legend, panel = ax.get_legend().get_window_extent(), ax.get_window_extent()
        assert (abs(legend.x0 - panel.x0) < 15, abs(legend.y1 - panel.y1) < 15) == (True, True)
    assert top.get_shared_x_axes().joined(top, bottom)
    assert type(figure.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
    assert (tuple(figure.get_size_inches()), figure.dpi) == ((8.0, 5.5), 100)
