"""Every figure an embedding audit prints or logs, against an independent float64 computation (issue 18).

The audit runs through its real entry points, in one process (no Ray): ``raymem audit-embeddings`` (raymem.cli.main:
metrics.json, the JSON it prints, the MLflow metric names it logs, matches.parquet) and ``run_audit`` with planted
samples from a URI, as ``raymem audit`` calls it (the planted figures, the per-patient table and the top pairs the
report shows, and the report itself). The expected values are written from DESIGN.md (thresholds, decisions,
shares) and docs/statistics.md (intervals) with plain numpy and loops: ``np.corrcoef`` score matrices,
``np.percentile`` / ``np.quantile``, loops over patients, the textbook Wilson interval, Kish's design effect and a
delete-one-patient jackknife. No raymem function computes an expected value.

The fixture has n_train 121 (the generator's own training set, inside a train split of 133), n_val 81, n_test 97,
n_synthetic 150, n_null 90; patients of 1-4 correlated images. Among the generated samples: a copy of one of two
near-identical images of a patient (one sample flags both), a copy of an image duplicated in a second patient (one
sample flags two patients), an image copied twice, three images of one patient copied, single copies, a copy of a
train-split image outside the generator's training set, four samples within DECISION_BAND of a copy threshold (the
float64 recheck), the rest novel. 0.95 * (121 - 1) and 0.95 * (81 - 1) are whole numbers, so the paper's and the
matched copy threshold equal a null score exactly: that null sample is not above it (strictly greater, DESIGN.md);
every other decision is at least 1e-9 from its threshold (the reference asserts it).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import re
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymem import cli
from raymem.audit.embeddings import numeric_items, run_audit
from raymem.audit.report import CopyPair, render_report

D = 24
PERCENTILE = 95.0
TOP_K = 3
HEADLINE = "matched"
DECISION_BAND = 1e-3  # DESIGN.md: scores this close to a threshold are recomputed in float64
REPORT_PAIRS = 24  # the report's top pairs
Z = NormalDist().inv_cdf(0.975)
SUMMARY_PERCENTILES = (50, 75, 90, 95, 99)
# Figures with no independent reference here: the planted and labelled AUC's bootstrap intervals (random draws).
UNREFERENCED = {"planted.roc_auc_ci_lo", "planted.roc_auc_ci_hi", "labels.roc_auc_ci_lo", "labels.roc_auc_ci_hi"}
SEARCH_SCORE_TOLERANCE = 1e-6  # scores that decide nothing keep the float32 search's precision (DESIGN.md)


# ---------------------------------------------------------------------------------------------------- the data


def patient_sizes(rng, n_images: int) -> list[int]:
    sizes = []
    while sum(sizes) < n_images:
        sizes.append(int(rng.integers(1, 5)))
    sizes[-1] -= sum(sizes) - n_images
    return [size for size in sizes if size > 0]


def patient_images(rng, sizes: list[int], prefix: str, within: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """(rows (n, D), patient ids (n,)): each image is within * its patient's own vector plus independent noise."""
    rows, patients = [], []
    for p, size in enumerate(sizes):
        base = rng.standard_normal(D)
        rows.append(within * base + math.sqrt(1 - within**2) * rng.standard_normal((size, D)))
        patients += [f"{prefix}{p}"] * size
    return np.concatenate(rows), np.array(patients)


def noisy(rng, rows: np.ndarray, noise: float | np.ndarray) -> np.ndarray:
    return rows + np.reshape(noise, (-1, 1)) * rng.standard_normal(rows.shape)


def at_correlation(rng, anchor: np.ndarray, target: float) -> np.ndarray:
    """A vector whose Pearson correlation with anchor is target (before float32 rounding)."""
    centred = (anchor - anchor.mean()) / np.linalg.norm(anchor - anchor.mean())
    other = rng.standard_normal(len(anchor))
    other -= other.mean()
    other -= (other @ centred) * centred
    return target * centred + math.sqrt(1 - target**2) * other / np.linalg.norm(other)


def f32(rows: np.ndarray) -> np.ndarray:
    """What the Parquet files hold (float32), as float64 for the reference."""
    return rows.astype(np.float32).astype(np.float64)


def make_sets(seed: int = 20):
    rng = np.random.default_rng(seed)
    own, own_patients = patient_images(rng, patient_sizes(rng, 121), "tp")
    rows_of = [np.flatnonzero(own_patients == p) for p in dict.fromkeys(own_patients)]  # in file order
    twins, three, shared = (next(rows for rows in rows_of if len(rows) == size) for size in (2, 3, 4))
    other_patient = next(rows for rows in rows_of if len(rows) == 2 and rows[0] != twins[0])
    own[twins[1]] = noisy(rng, own[twins[:1]], 0.03)[0]  # near-identical images of one patient
    own[shared[1]] = noisy(rng, own[other_patient[:1]], 0.03)[0]  # and of two patients: one sample flags both
    used = np.concatenate([twins, three, shared, other_patient])
    others = [i for i in range(len(own)) if i not in used]
    copied_twice, singles = others[5], others[20:80:15]
    excluded, excluded_patients = patient_images(rng, [4, 5, 3], "xp")
    half = 60
    while own_patients[half] == own_patients[half - 1]:
        half += 1  # a patient boundary: the excluded patients sit between two of the generator's own patients
    train = np.concatenate([own[:half], excluded, own[half:]])
    train_patients = np.concatenate([own_patients[:half], excluded_patients, own_patients[half:]])
    in_reference = np.concatenate([np.ones(half, bool), np.zeros(len(excluded), bool), np.ones(len(own) - half, bool)])

    val, val_patients = patient_images(rng, patient_sizes(rng, 81), "vp")
    test, test_patients = patient_images(rng, patient_sizes(rng, 97), "ep")
    copies = np.concatenate([
        noisy(rng, own[twins[:1]], 0.2),
        noisy(rng, own[other_patient[:1]], 0.2),
        noisy(rng, own[[copied_twice, copied_twice]], np.array([0.1, 0.3])),
        noisy(rng, own[three], np.array([0.05, 0.15, 0.25])),
        noisy(rng, own[singles], rng.uniform(0.02, 0.4, len(singles))),
        noisy(rng, excluded[:1], 0.1),
    ])
    # four generated samples within DECISION_BAND of the paper's and the matched copy threshold (not within 1e-9)
    own_val = correlation(f32(own), f32(val))
    taus = [np.percentile(own_val.max(axis=1), PERCENTILE), np.percentile(own_val.max(axis=0), PERCENTILE)]
    near = np.array([at_correlation(rng, own[others[i]], tau + offset)
                     for i, (tau, offset) in zip((90, 95, 100, 105), itertools.product(taus, (-4e-4, 4e-4)))])
    synthetic = np.concatenate([copies, near, rng.standard_normal((150 - len(copies) - len(near), D))])
    synthetic = synthetic[rng.permutation(150)]
    null = noisy(rng, test[rng.choice(len(test), 90, replace=False)], 0.3)
    planted_sources = rng.choice(len(own), 5, replace=False)
    planted = np.concatenate([noisy(rng, own[planted_sources], 0.15),
                              noisy(rng, test[rng.choice(len(test), 5, replace=False)], 0.15)])
    return {
        "train": train, "train_patients": train_patients, "in_reference": in_reference,
        "val": val, "val_patients": val_patients, "test": test, "test_patients": test_patients,
        "synthetic": synthetic, "null": null, "planted": planted, "planted_sources": planted_sources,
    }


def write_set(path, rows: np.ndarray, ids, patients=None) -> str:
    columns = {"sample_id": list(ids),
               "embedding": pa.array(list(rows.astype(np.float32)), pa.list_(pa.float32(), rows.shape[1]))}
    if patients is not None:
        columns["patient_id"] = list(patients)
    pq.write_table(pa.table(columns), path, row_group_size=50)
    return str(path)


def write_inputs(folder, sets) -> dict:
    train_ids = np.array([f"t{i}" for i in range(len(sets["train"]))])
    own_ids = train_ids[sets["in_reference"]]
    uris = {
        "train": write_set(folder / "train.parquet", sets["train"], train_ids, sets["train_patients"]),
        "val": write_set(folder / "val.parquet", sets["val"], [f"v{i}" for i in range(81)], sets["val_patients"]),
        "test": write_set(folder / "test.parquet", sets["test"], [f"e{i}" for i in range(97)], sets["test_patients"]),
        "synthetic": write_set(folder / "synthetic.parquet", sets["synthetic"], [f"s{i}" for i in range(150)]),
        "null-synthetic": write_set(folder / "null.parquet", sets["null"], [f"n{i}" for i in range(90)]),
    }
    reference_ids = folder / "training_ids.json"
    reference_ids.write_text(json.dumps(list(np.random.default_rng(0).permutation(own_ids))))  # any order
    uris["reference-ids"] = str(reference_ids)
    planted_ids = [f"k{i}" for i in range(10)]
    uris["planted"] = write_set(folder / "planted.parquet", sets["planted"], planted_ids)
    planted_from = {planted_ids[i]: str(own_ids[source]) for i, source in enumerate(sets["planted_sources"])}
    # hand labels (synthetic id, training id, label): the three best copies, three novel samples, two disagreements
    syn_train = correlation(f32(sets["synthetic"]), f32(sets["train"][sets["in_reference"]]))
    copy_rows = np.argsort(-syn_train.max(axis=1))[:3]
    novel_rows = np.argsort(syn_train.max(axis=1))[:3]
    labels = [(f"s{i}", own_ids[syn_train[i].argmax()], "copy") for i in copy_rows]
    labels += [(f"s{novel_rows[0]}", own_ids[syn_train[novel_rows[0]].argmax()], "copy"),  # the audit disagrees
               (f"s{novel_rows[1]}", own_ids[7], "novel"), (f"s{novel_rows[2]}", own_ids[50], "novel"),
               (f"s{copy_rows[1]}", own_ids[syn_train[copy_rows[2]].argmax()], "novel")]
    labels_csv = folder / "labels.csv"
    labels_csv.write_text("synthetic_id,train_id,label\n" + "".join(f"{a},{b},{c}\n" for a, b, c in labels))
    uris["labels"] = str(labels_csv)
    return {"uris": uris, "own_ids": own_ids, "planted_ids": planted_ids, "planted_from": planted_from,
            "labels": labels}


# ------------------------------------------------------------------------------------- the reference computation


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Pearson correlation of every row of a with every row of b (numpy's corrcoef, float64)."""
    return np.corrcoef(a, b)[: len(a), len(a):]


def wilson(share: float, n: float) -> list[float]:
    """The 95 % Wilson score interval of a share of n trials: (x + z^2/2 -+ z sqrt(x (n - x) / n + z^2 / 4)) / (n + z^2)
    with x = share * n (n may be an effective size)."""
    if n <= 0:
        return [0.0, 1.0]
    x = share * n
    half = Z * math.sqrt(x * (n - x) / n + Z**2 / 4)
    return [max(0.0, (x + Z**2 / 2 - half) / (n + Z**2)), min(1.0, (x + Z**2 / 2 + half) / (n + Z**2))]


def kish_design_effect(flags, clusters) -> float:
    """Kish's design effect (docs/statistics.md): the cluster-robust (ratio estimator) variance of mean(flags) over
    the binomial one, at least 1."""
    n = len(flags)
    share = sum(flags) / n
    totals: dict = {}
    for flag, cluster in zip(flags, clusters):
        total, size = totals.get(cluster, (0, 0))
        totals[cluster] = (total + int(flag), size + 1)
    if len(totals) < 2 or share in (0.0, 1.0):
        return 1.0
    c = len(totals)
    robust = c / (c - 1) * sum((total - share * size) ** 2 for total, size in totals.values()) / n**2
    return max(1.0, robust / (share * (1 - share) / n))


def flagged_share(flags, design_effect: float = 1.0) -> tuple[float, list[float]]:
    n = len(flags)
    share = sum(flags) / n
    return share, wilson(share, n / design_effect)


def memorized_rate(above: np.ndarray, eval_groups, n_draws: int) -> tuple[float, list[float]]:
    """docs/statistics.md, measured_fpr_memorized: above (units, n_eval) bool, unit has that evaluation sample above
    the threshold. Rate at n' = min(m, n_eval - largest group) draws without replacement, a delete-one-group
    jackknife for the Wilson effective size, estimate and upper end carried to m draws by 1 - (1 - r) ** (m / n')."""
    n_eval = above.shape[1]
    groups = sorted(set(eval_groups))
    largest = max(list(eval_groups).count(g) for g in groups)
    n_prime = max(1, min(n_draws, n_eval - largest))

    def rate(columns: list[int]) -> float:
        n = len(columns)
        flagged = [1 - math.comb(n - int(row[columns].sum()), n_prime) / math.comb(n, n_prime) for row in above]
        return sum(flagged) / len(above)

    if not above.any():
        return 0.0, [0.0, 1 - (1 - wilson(0.0, n_eval)[1]) ** n_draws]
    estimate = rate(list(range(n_eval)))
    replicates = [rate([j for j in range(n_eval) if eval_groups[j] != g]) for g in groups]
    mean = sum(replicates) / len(groups)
    se = math.sqrt((len(groups) - 1) / len(groups) * sum((r - mean) ** 2 for r in replicates))
    lo, hi = wilson(estimate, n_eval) if se == 0 or estimate in (0.0, 1.0) else wilson(
        estimate, estimate * (1 - estimate) / se**2)
    power = n_draws / n_prime
    return 1 - (1 - estimate) ** power, [lo, 1 - (1 - hi) ** power]


def per_patient(patients: np.ndarray, rows_of_patient) -> dict:
    return {p: rows_of_patient(np.flatnonzero(patients == p)) for p in sorted(set(patients))}


def calibration_reference(name, s, percentile: float) -> dict:
    """One calibration's metrics.json entry from the score matrices s (DESIGN.md, docs/statistics.md)."""
    n_synthetic, n_train = s["syn_train"].shape
    if name == "paper":
        null = s["train_val"].max(axis=1)
        tau_copies = tau_memorized = float(np.percentile(null, percentile))
        implied_copies = implied_memorized = float(np.mean(null > tau_copies))
    else:
        pairs = s["train_val"] if name == "matched" else s["train_null"]
        null = pairs.max(axis=0)
        tau_copies = float(np.percentile(null, percentile))
        tau_memorized = float(np.quantile(pairs.ravel(), (percentile / 100) ** (1 / n_synthetic)))
        implied_copies = float(np.mean(null > tau_copies))
        implied_memorized = 1 - (1 - np.mean(pairs.ravel() > tau_memorized)) ** n_synthetic
    is_copy = s["syn_train"].max(axis=1) > tau_copies
    best_of_train = s["syn_train"].max(axis=0)
    is_memorized = best_of_train > tau_memorized
    flagged_by = s["syn_train"].argmax(axis=0)
    patients = s["train_patients"]
    memorized_patient = per_patient(patients, lambda rows: bool(is_memorized[rows].any()))
    patient_flagged_by = per_patient(patients, lambda rows: flagged_by[rows[best_of_train[rows].argmax()]])

    n_copies, n_memorized = int(is_copy.sum()), int(is_memorized.sum())
    memorized_flags = list(memorized_patient.values())
    image_deff = (kish_design_effect(is_memorized, patients)
                  + kish_design_effect(is_memorized, [f"s{flagged_by[j]}" if is_memorized[j] else f"image{j}"
                                                      for j in range(n_train)]) - 1)
    patient_deff = kish_design_effect(memorized_flags, [f"s{patient_flagged_by[p]}" if flag else p
                                                        for p, flag in memorized_patient.items()])
    eval_flags = s["test_train"].max(axis=1) > tau_copies
    above_eval = s["train_test"] > tau_memorized
    patient_above_eval = np.array(list(per_patient(patients, lambda rows: above_eval[rows].any(axis=0)).values()))
    shares = {
        "pct_copies": (100, flagged_share(is_copy)),
        "pct_memorized_train": (100, flagged_share(is_memorized, image_deff)),
        "pct_memorized_patients": (100, flagged_share(memorized_flags, patient_deff)),
        "measured_fpr_copies": (1, flagged_share(eval_flags, kish_design_effect(eval_flags, s["test_patients"]))),
        "measured_fpr_memorized": (1, memorized_rate(above_eval, s["test_patients"], n_synthetic)),
        "measured_fpr_memorized_patients": (1, memorized_rate(patient_above_eval, s["test_patients"], n_synthetic)),
    }
    if "train_null" in s:  # each null sample its own group (docs/statistics.md)
        shares["generator_fpr_copies"] = (1, flagged_share(s["null_train"].max(axis=1) > tau_copies))
        shares["generator_fpr_memorized"] = (1, memorized_rate(s["train_null"] > tau_memorized,
                                                               list(range(s["train_null"].shape[1])), n_synthetic))
    figures = {"threshold_copies": tau_copies, "threshold_memorized": tau_memorized,
               "n_memorized_train": n_memorized, "n_copies": n_copies,
               "n_memorized_patients": sum(memorized_flags),
               "implied_fpr_copies": implied_copies, "implied_fpr_memorized": float(implied_memorized)}
    figures.update({key: factor * value for key, (factor, (value, _)) in shares.items()})
    figures["ci95"] = {key: [factor * bound for bound in interval] for key, (factor, (_, interval)) in shares.items()}
    return {**figures, "_is_copy": is_copy, "_is_memorized": is_memorized}


def detection_reference(is_positive: np.ndarray, is_flagged: np.ndarray, scores: np.ndarray) -> dict:
    positive, negative = scores[is_positive], scores[~is_positive]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in positive for q in negative)
    true_pos, false_pos = int((is_positive & is_flagged).sum()), int((~is_positive & is_flagged).sum())
    n_pos, n_neg = int(is_positive.sum()), int((~is_positive).sum())
    rates = {"sensitivity": (true_pos, n_pos), "specificity": (n_neg - false_pos, n_neg),
             "precision": (true_pos, true_pos + false_pos)}
    return {"n_positive": n_pos, "n_negative": n_neg, "true_positives": true_pos, "false_positives": false_pos,
            **{key: hits / total for key, (hits, total) in rates.items()}, "roc_auc": wins / (n_pos * n_neg),
            "ci95": {key: wilson(hits / total, total) for key, (hits, total) in rates.items()}}


def summary(values: np.ndarray) -> dict:
    return {"mean": float(np.mean(values)), **{f"p{p}": float(np.percentile(values, p)) for p in SUMMARY_PERCENTILES}}


def reference_audit(sets, inputs, *, headline: str = HEADLINE, percentile: float = PERCENTILE,
                    with_null: bool = True, planted: bool = False, labels: bool = True) -> dict:
    """Every figure of metrics.json (and the matches, the patient rows, the top pairs), from the definitions."""
    train = f32(sets["train"][sets["in_reference"]])
    train_patients = sets["train_patients"][sets["in_reference"]]
    own_ids = inputs["own_ids"]
    synthetic, val, test = f32(sets["synthetic"]), f32(sets["val"]), f32(sets["test"])
    s = {"syn_train": correlation(synthetic, train), "train_val": correlation(train, val),
         "train_test": correlation(train, test), "train_patients": train_patients,
         "test_patients": list(sets["test_patients"])}
    s["test_train"] = s["train_test"].T
    if with_null:
        s["train_null"] = correlation(train, f32(sets["null"]))
        s["null_train"] = s["train_null"].T
    names = ["paper", "matched"] + (["generator"] if with_null else [])
    calibrations = {name: calibration_reference(name, s, percentile) for name in names}
    chosen = calibrations[headline]
    n_synthetic, n_train = s["syn_train"].shape
    thresholds = {name: (c["threshold_copies"], c["threshold_memorized"]) for name, c in calibrations.items()}
    syn_best, train_best = s["syn_train"].max(axis=1), s["syn_train"].max(axis=0)
    near_copy = np.zeros(n_synthetic, bool)
    near_memorized = np.zeros(n_train, bool)
    for tau_copies, tau_memorized in thresholds.values():
        near_copy |= np.abs(syn_best - tau_copies) <= DECISION_BAND
        near_memorized |= np.abs(train_best - tau_memorized) <= DECISION_BAND

    metrics = {
        "threshold": calibrations["paper"]["threshold_copies"], "percentile": percentile, "top_k": TOP_K,
        "n_train": n_train, "n_val": len(val), "n_synthetic": n_synthetic,
        "n_patients": len(set(train_patients)), "n_eval": len(test),
        "n_eval_patients": len(set(sets["test_patients"])),
        "reference": {"n_train": n_train, "n_train_split": len(sets["train"])},
        **{key: value for key, value in chosen.items() if not key.startswith("_")},
        "implied_fpr": chosen["implied_fpr_copies"],
        "calibrations": {name: {k: v for k, v in c.items() if not k.startswith("_")}
                         for name, c in calibrations.items()},
        "distribution": {"synthetic_top1": summary(syn_best), "null_train_to_val": summary(s["train_val"].max(axis=1)),
                         "null_val_to_train": summary(s["train_val"].max(axis=0)),
                         "eval_to_train": summary(s["test_train"].max(axis=1))},
        "n_scores_recomputed_float64": int(near_copy.sum() + near_memorized.sum()),
    }
    if with_null:
        metrics["n_null"] = len(sets["null"])
        metrics["distribution"]["generator_null_to_train"] = summary(s["null_train"].max(axis=1))
    tau_copies = chosen["threshold_copies"]
    if labels:
        own_row = {str(sample_id): j for j, sample_id in enumerate(own_ids)}
        queries = {f"s{i}": synthetic[i] for i in range(n_synthetic)}
        scores = np.array([correlation(queries[a][None], train[own_row[b]][None])[0, 0]
                           for a, b, _ in inputs["labels"]])
        truth = np.array([label == "copy" for *_, label in inputs["labels"]])
        metrics["labels"] = {**detection_reference(truth, scores > tau_copies, scores),
                             "n_labels": len(truth), "agreement": float(np.mean((scores > tau_copies) == truth))}
        assert np.abs(scores - tau_copies).min() > 1e-9
    if planted:
        planted_train = correlation(f32(sets["planted"]), train)
        is_copy = np.arange(10) < 5
        metrics["planted"] = {"n_copies": 5, "n_novel": 5,
                              **detection_reference(is_copy, planted_train.max(axis=1) > tau_copies,
                                                    planted_train.max(axis=1)),
                              "source_top1_rate": float(np.mean(planted_train[:5].argmax(axis=1)
                                                                == sets["planted_sources"]))}
        assert np.abs(planted_train.max(axis=1) - tau_copies).min() > 1e-9

    # ties: only the null sample at each copy threshold's order statistic equals it; nothing else is near one
    for name, (tau_c, tau_m) in thresholds.items():
        null_scores = {"paper": s["train_val"].max(axis=1), "matched": s["train_val"].max(axis=0),
                       "generator": s.get("null_train", np.zeros((1, 1))).max(axis=1)}[name]
        gaps = [np.abs(syn_best - tau_c), np.abs(train_best - tau_m), np.abs(s["test_train"].max(axis=1) - tau_c),
                np.abs(s["train_test"] - tau_m).ravel(), np.abs(null_scores[null_scores != tau_c] - tau_c),
                np.abs(np.abs(syn_best - tau_c) - DECISION_BAND), np.abs(np.abs(train_best - tau_m) - DECISION_BAND)]
        if name != "paper":  # the single-pair tail behind implied_fpr_memorized
            pairs = (s["train_val"] if name == "matched" else s["train_null"]).ravel()
            gaps.append(np.abs(pairs[pairs != tau_m] - tau_m))
        if with_null:
            gaps += [np.abs(s["null_train"].max(axis=1) - tau_c), np.abs(s["train_null"] - tau_m).ravel()]
        assert min(gap.min() for gap in gaps) > 1e-9, f"the fixture puts a decision at calibration {name}'s threshold"

    patient_table = []
    for p in sorted(set(train_patients)):
        rows = np.flatnonzero(train_patients == p)
        patient_table.append({"patient_id": p, "n_train_images": len(rows),
                              "n_memorized": int(chosen["_is_memorized"][rows].sum()),
                              "best_score": float(train_best[rows].max())})
    patient_table.sort(key=lambda row: (-row["n_memorized"], -row["best_score"], row["patient_id"]))
    top_k = np.argsort(-s["syn_train"], axis=1)[:, :TOP_K]
    best_first = np.argsort(-syn_best)[:REPORT_PAIRS]
    return {
        "metrics": metrics,
        "patients": patient_table,
        "top_pairs": [{"synthetic_id": f"s{i}", "train_id": str(own_ids[top_k[i, 0]]),
                       "patient_id": str(train_patients[top_k[i, 0]]), "score": float(syn_best[i]),
                       "is_copy": bool(chosen["_is_copy"][i])} for i in best_first],
        "matches": {
            "synthetic": {"sample_id": [f"s{i}" for i in range(n_synthetic)], "patient_id": [None] * n_synthetic,
                          "neighbour_indices": top_k.tolist(),
                          "neighbour_ids": [[str(own_ids[j]) for j in row] for row in top_k],
                          "is_copy": chosen["_is_copy"].tolist(), "is_memorized": [None] * n_synthetic,
                          "score_exact": near_copy.tolist()},
            "train": {"sample_id": [str(i) for i in own_ids], "patient_id": list(train_patients),
                      "neighbour_indices": [[int(j)] for j in s["syn_train"].argmax(axis=0)],
                      "neighbour_ids": [[f"s{j}"] for j in s["syn_train"].argmax(axis=0)],
                      "is_copy": [None] * n_train, "is_memorized": chosen["_is_memorized"].tolist(),
                      "score_exact": near_memorized.tolist()},
        },
        "matches_scores": {"synthetic": np.take_along_axis(s["syn_train"], top_k, axis=1),
                           "train": train_best[:, None]},
    }


def mlflow_names(figures: dict, prefix: str = "") -> dict[str, float]:
    """The metric names MLflow gets (docs/statistics.md): nested keys joined by dots, ci95 as <figure>_ci_lo/_hi."""
    names = {}
    for key, value in figures.items():
        if key == "ci95":
            for figure, (lo, hi) in value.items():
                names[f"{prefix}{figure}_ci_lo"], names[f"{prefix}{figure}_ci_hi"] = lo, hi
        elif isinstance(value, dict):
            names.update(mlflow_names(value, f"{prefix}{key}."))
        else:
            names[f"{prefix}{key}"] = value
    return names


def tolerance(name: str) -> float:
    """Decided figures are float64 (DESIGN.md); score summaries are of float32 search scores."""
    return SEARCH_SCORE_TOLERANCE if name.startswith("distribution.") else 1e-9


def assert_every_figure_matches(observed: dict, expected: dict) -> None:
    logged = dict(numeric_items(observed))
    wanted = mlflow_names(expected)
    assert (sorted(set(logged) - set(wanted) - UNREFERENCED), sorted(set(wanted) - set(logged))) == ([], []), \
        "figures without a reference (first list) or missing from metrics.json (second)"
    counts = {name for name, value in wanted.items() if isinstance(value, int) and not isinstance(value, bool)}
    assert {name: logged[name] for name in counts} == {name: wanted[name] for name in counts}
    wrong = {name: (logged[name], wanted[name]) for name in sorted(set(wanted) - counts)
             if not abs(logged[name] - wanted[name]) <= tolerance(name)}
    assert wrong == {}, "figure: (audit, reference)"


# ------------------------------------------------------------------------------------------------------ the runs


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audit-reference")
    sets = make_sets()
    inputs = write_inputs(folder, sets)
    return sets, inputs, folder


@pytest.fixture(scope="module")
def cli_audit(fixture):
    """`raymem audit-embeddings` on the fixture: (exit code, printed JSON, metrics.json, matches.parquet)."""
    sets, inputs, folder = fixture
    uris, out = inputs["uris"], folder / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["audit-embeddings", *(f"--{name}={uris[name]}" for name in (
            "train", "val", "test", "synthetic", "null-synthetic", "reference-ids", "labels")),
            f"--calibration={HEADLINE}", f"--top-k={TOP_K}", f"--percentile={PERCENTILE}", f"--out={out}"])
    return (code, json.loads(printed.getvalue()), json.loads((out / "metrics.json").read_text()),
            pq.read_table(out / "matches.parquet"))


@pytest.fixture(scope="module")
def image_audit(fixture):
    """run_audit as `raymem audit` calls it: known copies and known novel samples embedded at a URI."""
    sets, inputs, _ = fixture
    uris = inputs["uris"]
    return run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"],
                     null_uri=uris["null-synthetic"], reference_ids=json.loads(Path(uris["reference-ids"]).read_text()),
                     percentile=PERCENTILE, top_k=TOP_K, calibration=HEADLINE, planted_uri=uris["planted"],
                     planted=inputs["planted_from"], planted_novel=inputs["planted_ids"][5:],
                     labels_csv=uris["labels"], progress=False)


@pytest.fixture(scope="module")
def expected(fixture):
    sets, inputs, _ = fixture
    return reference_audit(sets, inputs, planted=True)


# ----------------------------------------------------------------------------------------------------- the tests


def test_every_figure_of_audit_embeddings_equals_the_reference(cli_audit, expected):
    code, printed, written, _ = cli_audit
    wanted = {key: value for key, value in expected["metrics"].items() if key != "planted"}

    assert (code, printed) == (0, written)
    assert_every_figure_matches(written, wanted)


def test_the_fixture_counts_are_those_of_the_generators_own_sets(cli_audit):
    """n_train != n_synthetic != n_val != n_eval, so a wrong denominator gives a wrong share."""
    written = cli_audit[2]

    assert ({key: written[key] for key in ("n_train", "n_val", "n_synthetic", "n_eval", "n_null", "fpr_source")},
            written["reference"]["n_train_split"]) == (
        {"n_train": 121, "n_val": 81, "n_synthetic": 150, "n_eval": 97, "n_null": 90, "fpr_source": "test"}, 133)


def test_the_fixture_exercises_every_rule(expected):
    """The reference is not vacuous: copies, a patient with three memorized images, a generated sample that flags
    two images and one that flags two patients, a design effect that widens the memorized interval, the null sample
    at the paper's tau not counted (strictly greater), decisions recomputed in float64 within DECISION_BAND."""
    figures, train_rows = expected["metrics"], expected["matches"]["train"]
    flagged = [(ids[0], patient) for ids, patient, memorized in zip(
        train_rows["neighbour_ids"], train_rows["patient_id"], train_rows["is_memorized"]) if memorized]
    patients_flagged_by = {sample: {p for s, p in flagged if s == sample} for sample, _ in flagged}
    plain_wilson = [100 * bound for bound in wilson(figures["n_memorized_train"] / 121, 121)]

    assert (figures["n_copies"] >= 10, expected["patients"][0]["n_memorized"],
            len(flagged) > len(patients_flagged_by), max(map(len, patients_flagged_by.values())),
            figures["ci95"]["pct_memorized_train"][1] - figures["ci95"]["pct_memorized_train"][0]
            > plain_wilson[1] - plain_wilson[0], figures["calibrations"]["paper"]["implied_fpr_copies"],
            figures["n_scores_recomputed_float64"] >= 4) == (True, 3, True, 2, True, 6 / 121, True)


def test_matches_parquet_equals_the_reference_row_by_row(cli_audit, expected):
    matches = cli_audit[3]
    columns = ("sample_id", "patient_id", "neighbour_indices", "neighbour_ids", "is_copy", "is_memorized",
               "score_exact")
    observed = {kind: {column: matches.filter(pa.compute.equal(matches["kind"], kind))[column].to_pylist()
                       for column in columns} for kind in ("synthetic", "train")}
    scores = {kind: np.array(matches.filter(pa.compute.equal(matches["kind"], kind))["neighbour_scores"].to_pylist())
              for kind in ("synthetic", "train")}

    assert (observed, matches["kind"].to_pylist()) == (expected["matches"], ["synthetic"] * 150 + ["train"] * 121)
    assert {kind: np.abs(scores[kind] - expected["matches_scores"][kind]).max() < SEARCH_SCORE_TOLERANCE
            for kind in scores} == {"synthetic": True, "train": True}


def test_planted_labels_and_generator_figures_of_the_image_audit_equal_the_reference(image_audit, expected):
    assert_every_figure_matches(image_audit.metrics, expected["metrics"])


def test_per_patient_table_and_top_pairs_equal_the_reference(image_audit, expected):
    def split(rows, score):
        return ([{key: value for key, value in row.items() if key != score} for row in rows],
                [row[score] for row in rows])

    top_pairs = [{key: pair[key] for key in ("synthetic_id", "train_id", "patient_id", "score", "is_copy")}
                 for pair in image_audit.top_pairs]
    (patients, best), (pairs, scores) = split(image_audit.patients, "best_score"), split(top_pairs, "score")

    assert (patients, pairs) == (split(expected["patients"], "best_score")[0], split(expected["top_pairs"], "score")[0])
    assert (best, scores) == (pytest.approx(split(expected["patients"], "best_score")[1], abs=SEARCH_SCORE_TOLERANCE),
                              pytest.approx(split(expected["top_pairs"], "score")[1], abs=SEARCH_SCORE_TOLERANCE))


def test_the_report_shows_the_reference_figures(image_audit, expected):
    """The summary, the patients and the top pairs as the report prints them, rebuilt from the reference."""
    pairs = [CopyPair(synthetic_id=p["synthetic_id"], train_id=p["train_id"], patient_id=p["patient_id"],
                      score=p["score"]) for p in image_audit.top_pairs]
    html = render_report(metrics=image_audit.metrics, synthetic_top1=image_audit.synthetic_top1,
                         null_scores=image_audit.null_scores_matched, pairs=pairs, patients=image_audit.patients)
    figures = expected["metrics"]

    def shown(value, interval, fmt="{:.1f}", unit=" %"):
        return f"{fmt.format(value)}{unit} (95 % CI {fmt.format(interval[0])}-{fmt.format(interval[1])})"

    summary = [
        f"{figures['n_copies']}: " + shown(figures["pct_copies"], figures["ci95"]["pct_copies"]),
        f"{figures['n_memorized_train']}: " + shown(figures["pct_memorized_train"],
                                                    figures["ci95"]["pct_memorized_train"]),
        shown(figures["pct_memorized_patients"], figures["ci95"]["pct_memorized_patients"]),
        *(shown(figures[key], figures["ci95"][key], "{:.3f}", "") for key in (
            "measured_fpr_copies", "measured_fpr_memorized", "measured_fpr_memorized_patients",
            "generator_fpr_copies")),
        f"{figures['threshold_copies']:.4f}", f"{figures['threshold_memorized']:.4f}", f"{figures['threshold']:.4f}",
        f"{figures['n_train']} images of {figures['n_patients']} patients",
    ]
    patient_rows = [f"<td>{row['patient_id']}</td><td class=\"number\">{row['n_train_images']}</td>"
                    f"<td class=\"number\">{row['n_memorized']}</td><td class=\"number\">{row['best_score']:.4f}</td>"
                    for row in expected["patients"]]
    shown_patients = re.findall(r"<tr[^>]*>(<td>[^<]*</td>(?:<td class=\"number\">[^<]*</td>){3})</tr>",
                                html.split('id="patients"')[1])
    pair_scores = re.findall(r"<td class=\"number\">(\d+\.\d{4})</td><td>(yes|no)</td>", html.split('id="copies"')[1])

    assert ([text for text in summary if text not in html], shown_patients, pair_scores) == (
        [], patient_rows, [(f"{p['score']:.4f}", "yes" if p["is_copy"] else "no") for p in expected["top_pairs"]])


def test_a_generator_trained_on_held_out_patients_gives_the_null(tmp_path):
    """Synthetic samples that are noisy copies of test patients' images (a generator that never saw the training
    patients): every figure equals the reference, and each memorized share's 95 % interval holds the false-positive
    rate measured at the same threshold (no memorization beyond the null)."""
    rng = np.random.default_rng(21)
    own, own_patients = patient_images(rng, patient_sizes(rng, 140), "tp")
    val, val_patients = patient_images(rng, patient_sizes(rng, 90), "vp")
    test, test_patients = patient_images(rng, patient_sizes(rng, 240), "ep")
    sets = {"train": own, "train_patients": own_patients, "in_reference": np.ones(140, bool), "val": val,
            "val_patients": val_patients, "test": test, "test_patients": test_patients,
            "synthetic": noisy(rng, test[rng.choice(240, 160, replace=False)], 0.1)}
    uris = [write_set(tmp_path / f"{name}.parquet", sets[name], [f"{name[0]}{i}" for i in range(len(sets[name]))],
                      sets.get(f"{name}_patients")) for name in ("train", "val", "synthetic")]
    test_uri = write_set(tmp_path / "test.parquet", test, [f"e{i}" for i in range(240)], test_patients)
    inputs = {"own_ids": np.array([f"t{i}" for i in range(140)]), "planted_ids": [], "labels": []}

    audited = run_audit(*uris, test_uri=test_uri, percentile=PERCENTILE, top_k=TOP_K, calibration="matched",
                        progress=False).metrics

    wanted = reference_audit(sets, inputs, with_null=False, labels=False)["metrics"]
    wanted["reference"] = {"n_train": 140}
    assert_every_figure_matches(audited, wanted)
    covered = {key: (wanted["ci95"][key][0] <= scale * wanted[fpr] <= wanted["ci95"][key][1], wanted[key])
               for key, fpr, scale in (("pct_copies", "measured_fpr_copies", 100),
                                       ("pct_memorized_train", "measured_fpr_memorized", 100),
                                       ("pct_memorized_patients", "measured_fpr_memorized_patients", 100))}
    assert all(inside for inside, _ in covered.values()), covered
