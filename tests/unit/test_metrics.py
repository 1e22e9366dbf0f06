"""Audit figures against a brute-force float64 reference, the float64 decision rule, calibration, ground truth
(raymem.audit.metrics through raymem.audit.embeddings.run_audit in one process; no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymem.audit import metrics, statistics
from raymem.audit.embeddings import evaluation_split, run_audit
from raymem.audit.embeddings import numeric_items


def write_embeddings(path, embeddings: np.ndarray, prefix: str, rows_per_patient: int | None = 2) -> str:
    """An embedding-schema Parquet file; sample ids '<prefix><row>', patients '<prefix>p<row // rows_per_patient>'."""
    columns = {
        "sample_id": [f"{prefix}{i}" for i in range(len(embeddings))],
        "embedding": pa.array(list(embeddings.astype(np.float32)), type=pa.list_(pa.float32(), embeddings.shape[1])),
    }
    if rows_per_patient is not None:
        columns["patient_id"] = [f"{prefix}p{i // rows_per_patient}" for i in range(len(embeddings))]
    pq.write_table(pa.table(columns), path, row_group_size=97)
    return str(path)


def pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Brute-force float64 Pearson correlation of every row of x with every row of y."""
    def standardized(rows):
        rows = rows.astype(np.float64) - rows.astype(np.float64).mean(axis=1, keepdims=True)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return standardized(x) @ standardized(y).T


def flag_rate(scores: np.ndarray, threshold: float, n_draws: int, groups: np.ndarray | None = None,
              largest_eval_patient: int = 2) -> float:
    """Brute force from the definition: per training unit (image, or patient = all its rows), c = evaluation samples
    scoring above threshold with it; measured at n' = min(m, n - largest evaluation patient) draws as
    1 - C(n - c, n') / C(n, n'), the mean r' carried to m draws as 1 - (1 - r') ** (m / n')."""
    above = scores > threshold  # (n_train, n_eval)
    if groups is not None:
        above = np.array([above[groups == g].any(axis=0) for g in np.unique(groups)])
    n = above.shape[1]
    measured = min(n_draws, n - largest_eval_patient)
    rate = np.mean([1 - math.comb(n - c, measured) / math.comb(n, measured) for c in above.sum(axis=1)])
    return float(1 - (1 - rate) ** (n_draws / measured))


def reference_audit(train, val, test, synthetic, train_patients, percentile, k):
    """Every figure of the audit, straight from the definitions on the full float64 score matrices."""
    syn_train, train_val, train_test = pearson(synthetic, train), pearson(train, val), pearson(train, test)
    n_synthetic = len(synthetic)
    figures = {"top_k": np.argsort(-syn_train, axis=1, kind="stable")[:, :k].tolist()}
    for name in ("paper", "matched"):
        if name == "paper":
            tau_copies = tau_memorized = np.percentile(train_val.max(axis=1), percentile)
            implied = [(train_val.max(axis=1) > tau_copies).mean()] * 2
        else:
            tau_copies = np.percentile(train_val.max(axis=0), percentile)
            tau_memorized = np.quantile(train_val.ravel(), (percentile / 100) ** (1 / n_synthetic))
            tail = (train_val.ravel() > tau_memorized).mean()
            implied = [(train_val.max(axis=0) > tau_copies).mean(), 1 - (1 - tail) ** n_synthetic]
        is_copy, is_memorized = syn_train.max(axis=1) > tau_copies, syn_train.max(axis=0) > tau_memorized
        patients = np.unique(train_patients)
        n_memorized_patients = sum(is_memorized[train_patients == p].any() for p in patients)
        figures[name] = {
            "threshold_copies": tau_copies,
            "threshold_memorized": tau_memorized,
            "is_copy": is_copy.tolist(),
            "is_memorized": is_memorized.tolist(),
            "n_memorized_patients": n_memorized_patients,
            "pct_copies": 100 * is_copy.mean(),
            "pct_memorized_train": 100 * is_memorized.mean(),
            "pct_memorized_patients": 100 * n_memorized_patients / len(patients),
            "implied_fpr_copies": implied[0],
            "implied_fpr_memorized": implied[1],
            "measured_fpr_copies": (train_test.max(axis=0) > tau_copies).mean(),
            "measured_fpr_memorized": flag_rate(train_test, tau_memorized, n_synthetic),
            "measured_fpr_memorized_patients": flag_rate(train_test, tau_memorized, n_synthetic, train_patients),
        }
    return figures


def observed_audit(result, calibration_runs):
    """The same figures read from audits run with calibration "paper" and "matched"."""
    synthetic_rows = result.matches.filter(pa.compute.equal(result.matches["kind"], "synthetic"))
    figures = {"top_k": synthetic_rows["neighbour_indices"].to_pylist()}
    for name, run in calibration_runs.items():
        rows = run.matches
        calibration = run.metrics["calibrations"][name]
        figures[name] = {
            "threshold_copies": calibration["threshold_copies"],
            "threshold_memorized": calibration["threshold_memorized"],
            "is_copy": [v for v, kind in zip(rows["is_copy"].to_pylist(), rows["kind"].to_pylist()) if kind == "synthetic"],
            "is_memorized": [v for v, kind in zip(rows["is_memorized"].to_pylist(), rows["kind"].to_pylist()) if kind == "train"],
            **{key: calibration[key] for key in ("n_memorized_patients", "pct_copies", "pct_memorized_train",
                                                  "pct_memorized_patients", "implied_fpr_copies",
                                                  "implied_fpr_memorized", "measured_fpr_copies",
                                                  "measured_fpr_memorized", "measured_fpr_memorized_patients")},
        }
    return figures


def assert_same_figures(observed: dict, expected: dict) -> None:
    """Numbers equal to within float64 rounding, decisions and indices exactly."""
    def flat(figures, prefix=""):
        for key, value in figures.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    observed, expected = dict(flat(observed)), dict(flat(expected))
    numbers = {key for key, value in expected.items() if not isinstance(value, list)}
    assert {key: observed[key] for key in numbers} == pytest.approx({key: expected[key] for key in numbers}, rel=0, abs=1e-12)
    assert {key: observed[key] for key in set(expected) - numbers} == {key: expected[key] for key in set(expected) - numbers}


def near_threshold_copies(train: np.ndarray, rows: np.ndarray, targets: np.ndarray, rng) -> np.ndarray:
    """Synthetic rows whose correlation with train[rows] is targets (before float32 rounding)."""
    made = []
    for row, target in zip(rows, targets):
        anchor = train[row] - train[row].mean()
        anchor /= np.linalg.norm(anchor)
        other = rng.standard_normal(len(anchor))
        other -= other.mean() + (other - other.mean()) @ anchor * anchor
        other /= np.linalg.norm(other)
        made.append(target * anchor + np.sqrt(1 - target**2) * other)
    return np.array(made)


@pytest.mark.parametrize(
    "n_train, n_val, n_novel, d, k, percentile, block_rows",
    [(300, 120, 150, 24, 5, 95.0, 64), (257, 91, 200, 8, 3, 90.0, 100), (200, 160, 90, 64, 1, 99.0, 4096)],
)
def test_audit_equals_float64_reference_with_planted_near_duplicates(tmp_path, n_train, n_val, n_novel, d, k,
                                                                       percentile, block_rows):
    rng = np.random.default_rng(n_train)
    train, val = rng.standard_normal((n_train, d)), rng.standard_normal((n_val, d))
    test = np.concatenate([rng.standard_normal((n_val - 10, d)), train[:10] + 0.3 * rng.standard_normal((10, d))])
    train_patients = np.array([f"tp{i // 2}" for i in range(n_train)])
    tau = np.percentile(pearson(train, val).max(axis=1), percentile)
    duplicated = rng.choice(n_train, 40, replace=False)
    synthetic = np.concatenate([
        rng.standard_normal((n_novel, d)),
        train[duplicated[:20]] + rng.uniform(0.01, 1.0, (20, 1)) * rng.standard_normal((20, d)),
        near_threshold_copies(train, duplicated[20:], tau + np.linspace(-2e-7, 2e-7, 20), rng),
    ]).astype(np.float32)
    uris = [write_embeddings(tmp_path / f"{name}.parquet", data, prefix)
            for name, data, prefix in (("train", train, "t"), ("val", val, "v"), ("synthetic", synthetic, "s"))]
    test_uri = write_embeddings(tmp_path / "test.parquet", test, "e")
    expected = reference_audit(*(x.astype(np.float32) for x in (train, val, test)), synthetic, train_patients,
                               percentile, k)
    assert np.abs(pearson(synthetic, train.astype(np.float32)).max(axis=1) - expected["paper"]["threshold_copies"]).min() < 1e-6

    runs = {name: run_audit(*uris, test_uri=test_uri, percentile=percentile, top_k=k, calibration=name,
                            block_rows=block_rows, progress=False) for name in ("paper", "matched")}

    assert_same_figures(observed_audit(runs["paper"], runs), expected)


def test_ties_and_scores_exactly_at_the_threshold_follow_the_definitions(tmp_path):
    """+-1 embeddings with d = 16 make every score an exact multiple of 1/8: many exact ties, many scores exactly
    equal to tau (not memorized, not copies: strictly greater is required), lowest index wins a tie."""
    rng = np.random.default_rng(1)

    def signs(n):
        rows = np.ones((n, 16))
        for row in rows:
            row[rng.permutation(16)[:8]] = -1
        return rows

    train, val, test, synthetic = signs(200), signs(80), signs(90), signs(150)
    uris = [write_embeddings(tmp_path / f"{name}.parquet", data, prefix)
            for name, data, prefix in (("train", train, "t"), ("val", val, "v"), ("synthetic", synthetic, "s"))]
    test_uri = write_embeddings(tmp_path / "test.parquet", test, "e")
    expected = reference_audit(train, val, test, synthetic, np.array([f"tp{i // 2}" for i in range(200)]), 80.0, 4)
    assert (pearson(synthetic, train).max(axis=1) == expected["paper"]["threshold_copies"]).any()
    assert (pearson(test, train).max(axis=1) == expected["matched"]["threshold_copies"]).any()

    runs = {name: run_audit(*uris, test_uri=test_uri, percentile=80.0, top_k=4, calibration=name, block_rows=37,
                            progress=False) for name in ("paper", "matched")}

    assert_same_figures(observed_audit(runs["paper"], runs), expected)


def test_decisions_near_the_threshold_use_the_float64_scores():
    rng = np.random.default_rng(2)
    exact = rng.uniform(0.2, 0.9, 1000)
    approximate = exact + rng.uniform(-5e-4, 5e-4, 1000)  # float32-like errors, within the decision band
    recomputed = []

    def recompute(rows):
        recomputed.extend(rows)
        return exact[rows, None], rows[:, None]

    null = metrics.Neighbours(approximate[:, None], np.arange(1000)[:, None], recompute)

    tau = metrics.percentile_threshold(null, 95.0)

    assert (tau, null.exceeds(tau).tolist()) == (np.percentile(exact, 95.0), (exact > tau).tolist())


def test_max_of_draws_threshold_is_the_quantile_of_all_pair_scores():
    rng = np.random.default_rng(3)
    all_scores = rng.uniform(-1, 1, 5000)
    needed = metrics.top_pairs_needed(5000, 95.0, 40)
    kept = np.argsort(-all_scores)[: needed + 10]
    pairs = metrics.TopPairs(all_scores[kept] + 1e-4, kept, kept, 5000, lambda rows, cols: all_scores[rows])

    threshold = metrics.max_of_draws_threshold(pairs, 95.0, 40)

    assert threshold == pytest.approx(np.quantile(all_scores, 0.95 ** (1 / 40)), abs=1e-15)


def test_paper_calibration_flags_far_more_than_five_percent_and_matched_about_five(tmp_path):
    """The issue's example: 3,000 training and 600 validation samples, 3,000 genuinely new synthetic samples."""
    rng = np.random.default_rng(4)
    uris = [write_embeddings(tmp_path / f"{name}.parquet", rng.standard_normal((n, 32)), prefix)
            for name, n, prefix in (("train", 3000, "t"), ("val", 600, "v"), ("synthetic", 3000, "s"))]

    calibrations = run_audit(*uris, progress=False).metrics["calibrations"]

    flagged = {name: (figures["pct_copies"], figures["pct_memorized_train"]) for name, figures in calibrations.items()}
    assert flagged["paper"][0] > 15 and all(3 <= pct <= 7.5 for pct in flagged["matched"]), flagged


def test_planted_copies_are_found_and_scored_against_the_truth(tmp_path):
    rng = np.random.default_rng(5)
    uris = [write_embeddings(tmp_path / f"{name}.parquet", rng.standard_normal((n, 32)), prefix)
            for name, n, prefix in (("train", 400, "t"), ("val", 100, "v"), ("synthetic", 300, "s"))]

    planted = run_audit(*uris, calibration="matched", plant_copies=30, progress=False).metrics["planted"]

    assert (planted["n_copies"], planted["n_novel"], planted["sensitivity"], planted["roc_auc"],
            planted["source_top1_rate"]) == (30, 30, 1.0, 1.0, 1.0)


def test_planted_samples_stay_out_of_the_generators_figures(tmp_path):
    """Planted copies of training images must not count as the generator's copies, flag training images or
    patients, or change the number of draws of the matched memorized threshold."""
    rng = np.random.default_rng(15)
    uris = [write_embeddings(tmp_path / f"{name}.parquet", rng.standard_normal((n, 32)), prefix)
            for name, n, prefix in (("train", 400, "t"), ("val", 100, "v"), ("synthetic", 120, "s"))]
    test_uri = write_embeddings(tmp_path / "test.parquet", rng.standard_normal((100, 32)), "e")
    bare = run_audit(*uris, test_uri=test_uri, calibration="matched", progress=False).metrics

    planted = run_audit(*uris, test_uri=test_uri, calibration="matched", plant_copies=40, progress=False).metrics

    headline = ("n_synthetic", "n_copies", "n_memorized_train", "n_memorized_patients", "threshold_memorized",
                "measured_fpr_memorized")
    assert ({key: planted[key] for key in headline}, planted["planted"]["sensitivity"]) == (
        {key: bare[key] for key in headline}, 1.0)


def test_hand_labels_are_compared_with_the_audit_decision(tmp_path):
    rng = np.random.default_rng(6)
    train = rng.standard_normal((100, 16))
    synthetic = np.concatenate([train[:3] + 0.01 * rng.standard_normal((3, 16)), rng.standard_normal((50, 16))])
    uris = [write_embeddings(tmp_path / f"{name}.parquet", data, prefix)
            for name, data, prefix in (("train", train, "t"), ("val", rng.standard_normal((40, 16)), "v"),
                                       ("synthetic", synthetic, "s"))]
    labels = tmp_path / "labels.csv"
    labels.write_text("synthetic_id,train_id,label\ns0,t0,copy\ns1,t1,copy\ns2,t2,novel\ns3,t5,novel\n")

    agreement = run_audit(*uris, labels_csv=str(labels), progress=False).metrics["labels"]

    assert (agreement["n_labels"], agreement["agreement"], agreement["sensitivity"]) == (4, 0.75, 1.0)


def test_constant_or_non_finite_embeddings_are_named_in_the_error(tmp_path):
    rng = np.random.default_rng(7)
    synthetic = rng.standard_normal((20, 8))
    synthetic[4] = 3.0
    synthetic[11, 2] = np.nan
    uris = [write_embeddings(tmp_path / f"{name}.parquet", data, prefix)
            for name, data, prefix in (("train", rng.standard_normal((20, 8)), "t"),
                                       ("val", rng.standard_normal((20, 8)), "v"), ("synthetic", synthetic, "s"))]

    with pytest.raises(ValueError, match=r"synthetic embeddings .*sample_id s4, s11"):
        run_audit(*uris, progress=False)


def test_validation_patients_seen_in_training_are_refused(tmp_path):
    rng = np.random.default_rng(8)
    uris = [write_embeddings(tmp_path / f"{name}.parquet", rng.standard_normal((10, 8)), "x")
            for name in ("train", "val", "synthetic")]

    with pytest.raises(ValueError, match="val patients must not appear in train"):
        run_audit(*uris, progress=False)


def test_validation_split_shares_no_patient_and_halves_the_rows():
    patients = np.repeat([f"p{i}" for i in range(50)], np.arange(50) % 4 + 1)

    first, second = metrics.split_by_patient(patients, np.random.default_rng(9))

    assert not set(patients[first]) & set(patients[second]) and abs(len(first) - len(second)) <= 4


def test_detection_figures_count_against_the_truth():
    truth = np.array([True, True, True, False, False, False, False])
    flagged = np.array([True, True, False, True, False, False, False])
    scores = np.array([0.9, 0.8, 0.5, 0.7, 0.1, 0.2, 0.3])

    figures = metrics.detection_figures(truth, flagged, scores)

    assert (figures["sensitivity"], figures["specificity"], figures["precision"], figures["roc_auc"]) == pytest.approx(
        (2 / 3, 3 / 4, 2 / 3, 11 / 12)
    )


def test_known_copies_embedded_apart_are_scored_and_listed(tmp_path):
    rng = np.random.default_rng(10)
    train = rng.standard_normal((200, 16))
    planted = np.concatenate([train[[7, 3]] + 0.01 * rng.standard_normal((2, 16)), rng.standard_normal((2, 16))])
    uris = [write_embeddings(tmp_path / f"{name}.parquet", data, prefix)
            for name, data, prefix in (("train", train, "t"), ("val", rng.standard_normal((60, 16)), "v"),
                                       ("synthetic", rng.standard_normal((100, 16)), "s"))]
    planted_uri = write_embeddings(tmp_path / "planted.parquet", planted, "k", rows_per_patient=None)

    result = run_audit(*uris, planted_uri=planted_uri, planted={"k0": "t7", "k1": "t3"}, planted_novel=["k2", "k3"],
                       progress=False)

    rows = result.matches.filter(pa.compute.equal(result.matches["kind"], "planted"))
    assert (result.metrics["planted"]["sensitivity"], result.metrics["planted"]["source_top1_rate"],
            rows["planted_from"].to_pylist(), result.metrics["n_synthetic"]) == (1.0, 1.0, ["t7", "t3", None, None], 100)


def test_measured_copy_rate_is_the_share_of_test_samples_above_the_threshold_in_use(tmp_path):
    rng = np.random.default_rng(11)
    train, val = rng.standard_normal((300, 16)), rng.standard_normal((80, 16))
    test = np.concatenate([rng.standard_normal((70, 16)), train[:10] + 0.2 * rng.standard_normal((10, 16))])
    uris = [write_embeddings(tmp_path / f"{name}.parquet", data, prefix)
            for name, data, prefix in (("train", train, "t"), ("val", val, "v"),
                                       ("synthetic", rng.standard_normal((90, 16)), "s"))]
    test_uri = write_embeddings(tmp_path / "test.parquet", test, "e", rows_per_patient=4)

    figures = {name: run_audit(*uris, test_uri=test_uri, calibration=name, progress=False).metrics
               for name in ("paper", "matched")}

    best = pearson(test, train).max(axis=1)
    for name, audit in figures.items():
        expected = (best > audit["threshold_copies"]).mean()
        lo, hi = audit["ci95"]["measured_fpr_copies"]
        assert (audit["fpr_source"], audit["n_eval"], audit["measured_fpr_copies"]) == ("test", 80, expected)
        assert lo < expected < hi


def test_headline_figures_carry_intervals_that_hold_them(tmp_path):
    rng = np.random.default_rng(12)
    train = rng.standard_normal((200, 16))
    synthetic = np.concatenate([train[:20] + 0.05 * rng.standard_normal((20, 16)), rng.standard_normal((40, 16))])
    uris = [write_embeddings(tmp_path / f"{name}.parquet", data, prefix)
            for name, data, prefix in (("train", train, "t"), ("val", rng.standard_normal((80, 16)), "v"),
                                       ("synthetic", synthetic, "s"))]
    test_uri = write_embeddings(tmp_path / "test.parquet", rng.standard_normal((80, 16)), "e")

    audit = run_audit(*uris, test_uri=test_uri, progress=False).metrics

    figures = ("pct_copies", "pct_memorized_train", "pct_memorized_patients", "measured_fpr_copies",
               "measured_fpr_memorized", "measured_fpr_memorized_patients")
    assert all(audit["ci95"][key][0] <= audit[key] <= audit["ci95"][key][1] and key in audit["ci_method"]
               for key in figures), {key: (audit[key], audit["ci95"].get(key)) for key in figures}
    assert audit["ci95"]["pct_copies"] == pytest.approx(
        [100 * bound for bound in statistics.wilson_interval(audit["n_copies"], 60)])


def test_the_reference_is_the_generators_own_training_set(tmp_path):
    """Copies of images outside the generator's training set are not its memorization; n_train and n_patients
    count its own training set."""
    rng = np.random.default_rng(13)
    train = rng.standard_normal((200, 16))
    synthetic = np.concatenate([train[[1, 2, 150]] + 0.01 * rng.standard_normal((3, 16)),
                                rng.standard_normal((40, 16))])
    uris = [write_embeddings(tmp_path / f"{name}.parquet", data, prefix)
            for name, data, prefix in (("train", train, "t"), ("val", rng.standard_normal((80, 16)), "v"),
                                       ("synthetic", synthetic, "s"))]

    audit = run_audit(*uris, reference_ids=[f"t{i}" for i in range(16)], calibration="matched",
                      progress=False).metrics

    assert (audit["n_train"], audit["n_patients"], audit["n_memorized_train"], audit["reference"]["n_train_split"]) == (
        16, 8, 2, 200)


def test_without_a_test_split_one_validation_half_calibrates_and_the_other_evaluates(tmp_path):
    rng = np.random.default_rng(14)
    train, val = rng.standard_normal((150, 16)).astype(np.float32), rng.standard_normal((60, 16)).astype(np.float32)
    uris = [write_embeddings(tmp_path / f"{name}.parquet", data, prefix)
            for name, data, prefix in (("train", train, "t"), ("val", val, "v"),
                                       ("synthetic", rng.standard_normal((50, 16)), "s"))]
    calibrating, evaluating = evaluation_split(np.array([f"vp{i // 2}" for i in range(60)]), 3)

    audit = run_audit(*uris, seed=3, progress=False).metrics

    expected_tau = np.percentile(pearson(train, val[calibrating]).max(axis=1), 95)
    expected_fpr = (pearson(val[evaluating], train).max(axis=1) > expected_tau).mean()
    assert (audit["fpr_source"], audit["threshold"], audit["measured_fpr_copies"]) == pytest.approx(
        ("val-half", expected_tau, expected_fpr), abs=1e-12)
    assert any("no test split" in warning for warning in audit["warnings"])


def test_few_evaluation_patients_give_a_warning(tmp_path):
    rng = np.random.default_rng(16)
    uris = [write_embeddings(tmp_path / f"{name}.parquet", rng.standard_normal((n, 16)), prefix)
            for name, n, prefix in (("train", 100, "t"), ("val", 60, "v"), ("synthetic", 100, "s"))]
    test_uri = write_embeddings(tmp_path / "test.parquet", rng.standard_normal((16, 16)), "e", rows_per_patient=2)

    warnings = run_audit(*uris, test_uri=test_uri, progress=False).metrics["warnings"]

    assert [w for w in warnings if "evaluation patients" in w] == [
        "only 8 evaluation patients (fewer than 10): the measured false-positive rates are too uncertain to state; "
        "see their 95 % intervals"]


def test_generator_null_calibration_holds_the_null_samples_copy_rate(tmp_path):
    """Smooth generated samples (a shared mean added) score high against everything: the generator-null's samples
    show it, and its threshold holds their copy rate at the nominal 5 %."""
    rng = np.random.default_rng(17)
    shift = 2.0 * rng.standard_normal(16)
    uris = [write_embeddings(tmp_path / f"{name}.parquet", data, prefix)
            for name, data, prefix in (("train", rng.standard_normal((200, 16)) + shift, "t"),
                                       ("val", rng.standard_normal((80, 16)) + shift, "v"),
                                       ("synthetic", 0.3 * rng.standard_normal((60, 16)) + shift, "s"))]
    null_uri = write_embeddings(tmp_path / "null.parquet", 0.3 * rng.standard_normal((100, 16)) + shift, "n",
                                rows_per_patient=None)

    calibrations = run_audit(*uris, null_uri=null_uri, calibration="generator", progress=False).metrics["calibrations"]

    assert calibrations["paper"]["generator_fpr_copies"] > 0.5
    assert calibrations["generator"]["generator_fpr_copies"] == pytest.approx(0.05, abs=0.011)


def test_mlflow_names_carry_each_interval():
    items = dict(numeric_items({"pct_copies": 37.5, "ci95": {"pct_copies": [24.3, 52.7]},
                                "calibrations": {"paper": {"ci95": {"measured_fpr_copies": [0.01, 0.2]}}}}))

    assert items == {"pct_copies": 37.5, "pct_copies_ci_lo": 24.3, "pct_copies_ci_hi": 52.7,
                     "calibrations.paper.measured_fpr_copies_ci_lo": 0.01,
                     "calibrations.paper.measured_fpr_copies_ci_hi": 0.2}


def test_memorized_share_of_the_shared_subset_counts_only_its_members():
    assert metrics.pct_memorized_of_subset(["a", "b", "x"], ["a", "b", "c", "d"]) == 50.0


def test_early_stop_on_the_copies_budget():
    assert "budget" in metrics.memorization_stop_reason([1.0, 30.0], max_pct_copies=25.0)


def test_early_stop_when_copies_rise_for_p_audits_in_a_row():
    assert [metrics.memorization_stop_reason(history, rising_audits=2) is not None
            for history in ([5.0, 6.0], [5.0, 6.0, 7.0], [5.0, 7.0, 6.0, 8.0])] == [False, True, False]


def test_no_stopping_rule_never_stops():
    assert metrics.memorization_stop_reason([0.0, 50.0, 100.0]) is None


def test_a_memorized_rate_carried_far_beyond_the_measurable_draws_gets_a_warning(tmp_path):
    rng = np.random.default_rng(18)
    uris = [write_embeddings(tmp_path / f"{name}.parquet", rng.standard_normal((n, 16)), prefix)
            for name, n, prefix in (("train", 100, "t"), ("val", 60, "v"), ("synthetic", 100, "s"))]
    small, large = (write_embeddings(tmp_path / f"test{n}.parquet", rng.standard_normal((n, 16)), "e") for n in (40, 60))

    warned = [any("carried up by an upper bound" in w for w in run_audit(*uris, test_uri=test, progress=False)
                  .metrics["warnings"]) for test in (small, large)]

    assert warned == [True, False]  # 38 measurable draws < 100 / 2 <= 58


@pytest.mark.parametrize("seed", range(5))
def test_validation_split_keeps_each_patients_rows_together_when_rows_are_interleaved(seed):
    # rows of one patient scattered through the table: a split by row position cannot land on patient boundaries
    rng = np.random.default_rng(seed)
    patients = rng.permutation(np.repeat([f"p{i}" for i in range(30)], np.arange(30) % 5 + 1))

    first, second = metrics.split_by_patient(patients, np.random.default_rng(100 + seed))

    assert sorted(np.concatenate([first, second]).tolist()) == list(range(len(patients)))  # every row, once
    assert not set(patients[first]) & set(patients[second])
    for patient in set(patients):  # all of a patient's rows on one side
        rows = set(np.flatnonzero(patients == patient).tolist())
        assert rows <= set(first.tolist()) or rows <= set(second.tolist())
    assert abs(len(first) - len(second)) <= 2 * 5  # halves within one patient's rows of each other, either way
