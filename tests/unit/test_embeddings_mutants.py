"""raymem.audit.embeddings (the audit driver) against independent computations: float64 numpy Pearson matrices on
small Parquet sets (n_train != n_val != n_eval != n_synthetic != n_null, patients of 1-4 images, a training set in
two files), the warnings' rules evaluated at their boundaries by hand, and the planted noise measured from its
definition (no Ray).

Written to pin down behaviour that mutation testing (tools/mutation.sh) found unchecked: the result arrays and
top pairs the report reads, the planted rows of matches.parquet, the counts and warnings of metrics.json, the
errors a user gets for bad inputs or options (each names the thing and says what to do), and the request schedule
of the evaluation pairs."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raymem.audit import embeddings, metrics
from raymem.audit.embeddings import (
    PHASES,
    EmbeddingSource,
    PhaseClock,
    audit_embeddings,
    audit_warnings,
    expected_pairs_above,
    numeric_items,
    read_inputs,
    run_audit,
    write_outputs,
)

D = 10
PERCENTILE = 95.0
TOP_K = 2
SCORE_TOLERANCE = 1e-6  # float32 search scores; decisions are float64


# ---------------------------------------------------------------------------------------------------------- data


def write_set(path, rows, ids, patients=None, embedding_type=None, row_group_size=7) -> str:
    """An embedding-schema Parquet file (fixed-size float32 lists unless embedding_type says otherwise)."""
    embedding_type = embedding_type or pa.list_(pa.float32(), np.shape(rows)[1])
    columns = {"sample_id": pa.array(list(ids), pa.string()),
               "embedding": pa.array([None if row is None else list(np.asarray(row, np.float32)) for row in rows],
                                     embedding_type)}
    if patients is not None:
        columns["patient_id"] = pa.array(list(patients), pa.string())
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path)


def patients_of(sizes, prefix: str) -> np.ndarray:
    return np.concatenate([[f"{prefix}{p}"] * size for p, size in enumerate(sizes)])


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) float64 Pearson correlation of the float32 rows, by centring and normalising each row."""
    def standardised(rows):
        rows = rows.astype(np.float32).astype(np.float64)
        rows = rows - rows.mean(axis=1, keepdims=True)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return standardised(a) @ standardised(b).T


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A train split of 47 images (two files; the generator trained on 40 of them), val 26 (13 patients), test 21
    (7 patients of 3), synthetic 37 (6 noisy copies of its training images), generator-null 17."""
    folder = tmp_path_factory.mktemp("embeddings-mutants")
    rng = np.random.default_rng(31)
    train_patients = patients_of([1, 2, 3, 4] * 5, "tp")[:47]
    train = rng.standard_normal((47, D))
    (folder / "train").mkdir()
    write_set(folder / "train" / "part-0.parquet", train[:20], [f"t{i}" for i in range(20)], train_patients[:20])
    write_set(folder / "train" / "part-1.parquet", train[20:], [f"t{i}" for i in range(20, 47)], train_patients[20:])
    excluded = np.isin(train_patients, ["tp3", "tp6"])  # 4 + 3 images outside the generator's training set
    reference_rows = np.flatnonzero(~excluded)
    reference_ids = [f"t{i}" for i in rng.permutation(reference_rows)] + ["t0"]  # any order, a repeat
    val_patients = patients_of([2] * 13, "vp")
    test_patients = patients_of([3] * 7, "ep")
    val, test = rng.standard_normal((26, D)), rng.standard_normal((21, D))
    copied = reference_rows[[2, 9, 15, 22, 30, 38]]
    synthetic = np.concatenate([train[copied] + 0.05 * rng.standard_normal((6, D)), rng.standard_normal((31, D))])
    synthetic = synthetic[rng.permutation(37)]
    null = rng.standard_normal((17, D))
    uris = {
        "train": str(folder / "train"),
        "val": write_set(folder / "val.parquet", val, [f"v{i}" for i in range(26)], val_patients),
        "test": write_set(folder / "test.parquet", test, [f"e{i}" for i in range(21)], test_patients),
        "synthetic": write_set(folder / "synthetic.parquet", synthetic, [f"s{i}" for i in range(37)]),
        "null": write_set(folder / "null.parquet", null, [f"n{i}" for i in range(17)]),
    }
    return {"folder": folder, "uris": uris, "train": train, "train_patients": train_patients,
            "reference_rows": reference_rows, "reference_ids": reference_ids, "val": val, "val_patients": val_patients,
            "test": test, "test_patients": test_patients, "synthetic": synthetic, "null": null}


@pytest.fixture(scope="module")
def audited(case):
    uris = case["uris"]
    return run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], null_uri=uris["null"],
                     reference_ids=case["reference_ids"], percentile=PERCENTILE, top_k=TOP_K, calibration="matched",
                     plant_copies=4, seed=5, block_rows=8, progress=False)


def reference_scores(case) -> dict:
    reference = case["train"][case["reference_rows"]]
    return {"syn_train": pearson(case["synthetic"], reference), "train_val": pearson(reference, case["val"]),
            "null_train": pearson(case["null"], reference), "test_train": pearson(case["test"], reference)}


# ------------------------------------------------------------------------------------------- the audit's results


def test_result_arrays_are_each_sets_best_training_score(case, audited):
    s = reference_scores(case)

    observed = (audited.synthetic_top1, audited.null_scores, audited.null_scores_matched,
                audited.null_scores_generator)
    expected = (s["syn_train"].max(axis=1), s["train_val"].max(axis=1), s["train_val"].max(axis=0),
                s["null_train"].max(axis=1))
    assert [len(x) for x in observed] == [37, 40, 26, 17]
    assert all(np.abs(o - e).max() < SCORE_TOLERANCE for o, e in zip(observed, expected))


def test_top_pairs_are_the_24_best_generated_samples_with_their_rows_in_each_set(case, audited):
    s = reference_scores(case)
    best = s["syn_train"].max(axis=1)
    order = np.argsort(-best)[:24]
    own = case["reference_rows"]
    expected = [{"synthetic_id": f"s{i}", "train_id": f"t{own[s['syn_train'][i].argmax()]}",
                 "patient_id": str(case["train_patients"][own[s["syn_train"][i].argmax()]]),
                 "synthetic_index": int(i), "train_index": int(s["syn_train"][i].argmax())} for i in order]

    observed = [{key: pair[key] for key in expected[0]} for pair in audited.top_pairs]

    assert observed == expected
    assert [pair["score"] for pair in audited.top_pairs] == pytest.approx(best[order].tolist(), abs=SCORE_TOLERANCE)
    assert [pair["is_copy"] for pair in audited.top_pairs] == (
        best[order] > audited.metrics["threshold_copies"]).tolist()


def test_metrics_name_the_sets_counts_and_thresholds(case, audited):
    s = reference_scores(case)
    paper_tau = np.percentile(s["train_val"].max(axis=1), PERCENTILE)
    matched_tau = np.percentile(s["train_val"].max(axis=0), PERCENTILE)
    figures = audited.metrics

    assert {key: figures[key] for key in ("percentile", "calibration", "top_k", "n_train", "n_val", "n_synthetic",
                                          "n_patients", "n_eval", "n_eval_patients", "fpr_source", "reference",
                                          "n_null")} == {
        "percentile": 95.0, "calibration": "matched", "top_k": 2, "n_train": 40, "n_val": 26, "n_synthetic": 37,
        "n_patients": 18, "n_eval": 21, "n_eval_patients": 7, "fpr_source": "test",
        "reference": {"source": "the generator's training set", "n_train": 40, "n_train_split": 47}, "n_null": 17}
    assert (figures["threshold"], figures["threshold_copies"], figures["implied_fpr"]) == pytest.approx(
        (paper_tau, matched_tau, np.mean(s["train_val"].max(axis=0) > matched_tau)), abs=1e-9)
    assert "validation_split" not in figures


def test_score_distributions_summarise_each_sets_best_scores(case, audited):
    s = reference_scores(case)

    def summary(values):
        return {"mean": values.mean(), **{f"p{p}": np.percentile(values, p) for p in (50, 75, 90, 95, 99)}}

    expected = {"synthetic_top1": summary(s["syn_train"].max(axis=1)),
                "null_train_to_val": summary(s["train_val"].max(axis=1)),
                "null_val_to_train": summary(s["train_val"].max(axis=0)),
                "eval_to_train": summary(s["test_train"].max(axis=1)),
                "generator_null_to_train": summary(s["null_train"].max(axis=1))}

    observed = audited.metrics["distribution"]

    assert sorted(observed) == sorted(expected)
    assert all(observed[name] == pytest.approx(expected[name], abs=SCORE_TOLERANCE) for name in expected)


def test_warnings_count_the_evaluation_draws_without_its_largest_patient(audited):
    """21 test images of 7 patients of 3: 18 measurable draws; 37 generated samples > 2 x 18."""
    assert audited.metrics["warnings"] == [
        "only 7 evaluation patients (fewer than 10): the measured false-positive rates are too uncertain to state; "
        "see their 95 % intervals",
        "the evaluation set measures the memorized false-positive rate at 18 draws; for 37 generated samples it is "
        "carried up by an upper bound, so it reads high: more test patients make it tighter",
        "only 37 generated samples: the intervals of the memorized shares rest on a two-way clustering "
        "approximation that covers less than 95 % this small (docs/statistics.md)",
        "37 generated samples for 40 training images: fewer than the paper's rule (n_synthetic >= n_train), so the "
        "memorized share cannot reach 100 %",
    ]


def test_planted_rows_of_the_matches_table_hold_their_source_and_the_copy_decision(case, audited):
    matches = audited.matches.to_pydict()
    planted = [i for i, kind in enumerate(matches["kind"]) if kind == "planted"]
    rows = {column: [matches[column][i] for i in planted] for column in matches}
    train_ids = {f"t{i}" for i in case["reference_rows"]}

    assert (matches["kind"][:77], planted) == (["synthetic"] * 37 + ["train"] * 40, list(range(77, 85)))
    assert rows["sample_id"] == [f"planted-embedding-{i}" for i in range(4)] + [
        f"planted-novel-embedding-{i}" for i in range(4)]
    assert (rows["patient_id"], rows["is_memorized"], rows["planted_from"][4:]) == ([None] * 8, [None] * 8, [None] * 4)
    assert all(source in train_ids for source in rows["planted_from"][:4])
    assert [ids[0] for ids in rows["neighbour_ids"][:4]] == rows["planted_from"][:4]  # noise 0.1: its own source
    assert rows["is_copy"] == [score > audited.metrics["threshold_copies"] for score in rows["best_score"]]
    assert [len(ids) for ids in rows["neighbour_ids"]] == [TOP_K] * 8


def test_planted_figures_count_the_known_copies_and_novel_samples(audited):
    planted = audited.metrics["planted"]

    assert {key: planted[key] for key in ("n_copies", "n_novel", "embedding_noise", "source_top1_rate",
                                          "sensitivity")} == {"n_copies": 4, "n_novel": 4, "embedding_noise": 0.1,
                                                              "source_top1_rate": 1.0, "sensitivity": 1.0}


def test_the_float64_recount_is_the_number_of_exact_rows_in_the_matches_table(audited):
    """n_scores_recomputed_float64 counts the generated and training rows whose scores were recomputed (the
    matches table's score_exact of those rows): the figure and the column describe the same rows."""
    matches = audited.matches.to_pydict()
    exact = sum(flag for kind, flag in zip(matches["kind"], matches["score_exact"]) if kind != "planted")

    assert audited.metrics["n_scores_recomputed_float64"] == exact


def test_without_a_test_split_the_metrics_give_both_validation_halves(case):
    uris = case["uris"]
    calibrating, evaluating = metrics.split_by_patient(case["val_patients"], np.random.default_rng(4))

    figures = run_audit(uris["train"], uris["val"], uris["synthetic"], seed=4, calibration="paper",
                        progress=False).metrics

    assert {key: figures[key] for key in ("fpr_source", "n_val", "n_eval", "n_eval_patients", "validation_split")} == {
        "fpr_source": "val-half", "n_val": len(calibrating), "n_eval": len(evaluating),
        "n_eval_patients": len(set(case["val_patients"][evaluating])),
        "validation_split": {"n_val": [len(calibrating), len(evaluating)],
                             "n_patients": [len(set(case["val_patients"][calibrating])),
                                            len(set(case["val_patients"][evaluating]))]}}
    assert ("n_null" not in figures, "generator_null_to_train" not in figures["distribution"],
            figures["reference"]) == (True, True, {"source": "train split", "n_train": 47})


def test_the_same_seed_gives_the_same_validation_halves_and_another_seed_others(case):
    uris = case["uris"]

    def halves(seed):
        inputs = read_inputs(uris["train"], uris["val"], uris["synthetic"], test_uri=None, null_uri=None,
                             reference_ids=None, seed=seed)
        return inputs.calibrate.rows.tolist(), inputs.evaluate.rows.tolist()

    first, again, other = halves(7), halves(7), halves(8)

    patients = case["val_patients"]
    assert (first == again, first != other, sorted(first[0] + first[1]) == list(range(26)),
            set(patients[first[0]]) & set(patients[first[1]])) == (True, True, True, set())


def test_with_a_test_split_every_validation_row_calibrates(case):
    uris = case["uris"]

    inputs = read_inputs(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], null_uri=None,
                         reference_ids=None, seed=0)

    assert (inputs.calibrate.rows.tolist(), inputs.evaluate.rows.tolist(), inputs.fpr_source, inputs.null) == (
        list(range(26)), list(range(21)), "test", None)


# ------------------------------------------------------------------------------------- reading the embedding sets


def test_a_folder_of_files_is_read_in_file_order_with_its_patients(case):
    source = EmbeddingSource(case["uris"]["train"], "train", require_patients=True)
    rows = np.concatenate(list(source.batches(batch_rows=6)))

    assert (len(source), source.dim, source.sample_ids.tolist(), source.patient_ids.tolist()) == (
        47, D, [f"t{i}" for i in range(47)], case["train_patients"].tolist())
    assert np.array_equal(rows, case["train"].astype(np.float32))


def test_selected_rows_stream_across_files_and_batches(case):
    source = EmbeddingSource(case["uris"]["train"], "train", require_patients=True)
    rows = np.array([0, 5, 6, 19, 20, 21, 33, 46])

    streamed = np.concatenate(list(source.batches(batch_rows=6, rows=rows)))

    assert np.array_equal(streamed, case["train"][rows].astype(np.float32))


def test_a_subset_gives_its_own_ids_patients_and_rows(case):
    source = EmbeddingSource(case["uris"]["train"], "train", require_patients=True)
    rows = np.array([1, 4, 30])
    subset = embeddings.Subset(source, rows)
    generated = embeddings.Subset.whole(EmbeddingSource(case["uris"]["synthetic"], "synthetic",
                                                        require_patients=False))

    assert (len(subset), subset.sample_ids.tolist(), subset.patient_ids.tolist(), generated.patient_ids,
            len(generated)) == (3, ["t1", "t4", "t30"], case["train_patients"][rows].tolist(), None, 37)
    assert np.array_equal(np.concatenate(list(subset.batches())), case["train"][rows].astype(np.float32))


def test_generated_samples_need_no_patient_column_and_one_file_without_it_drops_them(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "mixed").mkdir()
    write_set(tmp_path / "mixed" / "a.parquet", rng.standard_normal((3, 4)), ["a0", "a1", "a2"], ["p0", "p0", "p1"])
    write_set(tmp_path / "mixed" / "b.parquet", rng.standard_normal((2, 4)), ["b0", "b1"])

    source = EmbeddingSource(str(tmp_path / "mixed"), "synthetic", require_patients=False)

    assert (source.sample_ids.tolist(), source.patient_ids, source.dim) == (["a0", "a1", "a2", "b0", "b1"], None, 4)


def test_variable_length_lists_take_the_size_of_the_first_row(tmp_path):
    rows = np.random.default_rng(2).standard_normal((4, 6))
    uri = write_set(tmp_path / "v.parquet", rows, ["a", "b", "c", "d"], ["p", "p", "q", "q"],
                    embedding_type=pa.large_list(pa.float32()))

    source = EmbeddingSource(uri, "val", require_patients=True)

    assert (source.dim, np.concatenate(list(source.batches())).tolist()) == (6, rows.astype(np.float32).tolist())


def message_of(error) -> str:
    return str(error.value)


def test_no_parquet_files_is_an_error_naming_the_role_and_place(tmp_path):
    with pytest.raises(ValueError) as error:
        EmbeddingSource(str(tmp_path), "val", require_patients=True)

    assert message_of(error) == f"val embeddings: no .parquet files at {tmp_path}"


def test_missing_columns_are_named_with_those_found(tmp_path):
    pq.write_table(pa.table({"sample_id": ["a"], "embedding": pa.array([[1.0, 2.0]], pa.list_(pa.float32(), 2))}),
                   tmp_path / "real.parquet")
    generated = tmp_path / "generated.parquet"
    pq.write_table(pa.table({"sample_id": ["a"], "patient_id": ["p"]}), generated)

    with pytest.raises(ValueError) as real_error:
        EmbeddingSource(str(tmp_path / "real.parquet"), "train", require_patients=True)
    with pytest.raises(ValueError) as generated_error:
        EmbeddingSource(str(generated), "synthetic", require_patients=False)

    assert (message_of(real_error), message_of(generated_error)) == (
        f"train embeddings {tmp_path / 'real.parquet'}: columns sample_id, embedding, patient_id are required "
        "(embedding schema, DESIGN.md); found ['sample_id', 'embedding']",
        f"synthetic embeddings {generated}: columns sample_id, embedding are required (embedding schema, DESIGN.md); "
        "found ['sample_id', 'patient_id']")


def test_a_set_without_rows_is_refused(tmp_path):
    uri = write_set(tmp_path / "empty.parquet", np.zeros((0, 3)), [], [])

    with pytest.raises(ValueError) as error:
        EmbeddingSource(uri, "test", require_patients=True)

    assert message_of(error) == f"test embeddings at {uri} have no rows"


def test_repeated_sample_ids_across_files_are_named(tmp_path):
    rows = np.random.default_rng(3).standard_normal((3, 4))
    write_set(tmp_path / "a.parquet", rows, ["x1", "x2", "x3"], ["p", "p", "p"])
    write_set(tmp_path / "b.parquet", rows, ["x3", "x4", "x1"], ["q", "q", "q"])

    with pytest.raises(ValueError) as error:
        EmbeddingSource(str(tmp_path), "train", require_patients=True)

    assert message_of(error) == f"train sample_id must be unique in {tmp_path}; repeated: x1, x3"


def test_a_null_patient_is_refused_for_a_real_set(tmp_path):
    uri = write_set(tmp_path / "val.parquet", np.random.default_rng(4).standard_normal((3, 4)), ["a", "b", "c"],
                    ["p", None, "q"])

    with pytest.raises(ValueError) as error:
        EmbeddingSource(uri, "val", require_patients=True)

    assert message_of(error) == f"val embeddings at {uri}: patient_id is null in some rows; every row needs one"


def test_files_of_different_embedding_sizes_are_refused(tmp_path):
    rng = np.random.default_rng(5)
    write_set(tmp_path / "a.parquet", rng.standard_normal((2, 8)), ["a", "b"])
    write_set(tmp_path / "b.parquet", rng.standard_normal((2, 6)), ["c", "d"])

    with pytest.raises(ValueError) as error:
        EmbeddingSource(str(tmp_path), "synthetic", require_patients=False)

    assert message_of(error) == f"synthetic embeddings at {tmp_path}: files disagree on the embedding size: [6, 8]"


def test_an_embedding_column_that_is_not_a_list_is_refused(tmp_path):
    pq.write_table(pa.table({"sample_id": ["a"], "embedding": [1.5]}), tmp_path / "flat.parquet")

    with pytest.raises(ValueError) as error:
        EmbeddingSource(str(tmp_path / "flat.parquet"), "synthetic", require_patients=False)

    assert message_of(error) == "embedding column has type double; expected a list of float32 (embedding schema)"


def test_bad_rows_are_named_ten_at_most_with_the_count_of_the_others(tmp_path):
    rows = [list(range(1, 5))] * 3 + [[1.0, 2.0, 3.0]] * 12
    uri = write_set(tmp_path / "s.parquet", rows, [f"s{i}" for i in range(15)], embedding_type=pa.list_(pa.float32()),
                    row_group_size=100)
    source = EmbeddingSource(uri, "synthetic", require_patients=False)

    with pytest.raises(ValueError) as error:
        list(source.batches())

    assert message_of(error) == (
        f"synthetic embeddings at {uri}: embedding length differs from 4: sample_id s3, s4, s5, s6, s7, s8, s9, s10, "
        "s11, s12 and 2 more; fix or drop these rows")


def test_a_null_embedding_is_named(tmp_path):
    uri = write_set(tmp_path / "s.parquet", [[1.0, 2.0, 3.0], None, [3.0, 1.0, 2.0]], ["a", "b", "c"],
                    embedding_type=pa.list_(pa.float32()))
    source = EmbeddingSource(uri, "synthetic", require_patients=False)

    with pytest.raises(ValueError) as error:
        list(source.batches())

    assert message_of(error) == (f"synthetic embeddings at {uri}: has a null embedding: sample_id b; fix or drop "
                                 "these rows")


def test_a_null_embedding_in_a_fixed_size_column_names_the_file_not_only_pyarrows_message(tmp_path):
    # pyarrow writes a null fixed-size list but cannot read it back (a bare "Expected all lists to be of size=3").
    uri = write_set(tmp_path / "s.parquet", [[1.0, 2.0, 3.0], None, [3.0, 1.0, 2.0]], ["a", "b", "c"],
                    embedding_type=pa.list_(pa.float32(), 3))
    source = EmbeddingSource(uri, "synthetic", require_patients=False)

    with pytest.raises(ValueError) as error:
        list(source.batches())

    assert message_of(error).startswith(f"synthetic embeddings {source.file_uris[0]}: the embedding column cannot "
                                        "be read (") and message_of(error).endswith(
        "); a null embedding in a fixed-size list column reads like this: fix or drop the null rows")


def test_a_constant_embedding_is_named(tmp_path):
    uri = write_set(tmp_path / "s.parquet", [[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]], ["a", "b"])
    source = EmbeddingSource(uri, "synthetic", require_patients=False)

    with pytest.raises(ValueError) as error:
        list(source.batches())

    assert message_of(error) == (f"synthetic embeddings at {uri}: embedding is constant or not finite (Pearson "
                                 "correlation undefined): sample_id b; fix or drop these rows")


# ----------------------------------------------------------------------------------- contracts between the sets


def small_sets(folder, sizes=None, dims=None, patients=None) -> dict:
    """train 12, val 8, test 6, synthetic 9 rows (d = 5 unless dims says otherwise), two images per patient."""
    rng = np.random.default_rng(6)
    sizes = sizes or {"train": 12, "val": 8, "test": 6, "synthetic": 9}
    uris = {}
    for name, n in sizes.items():
        d = (dims or {}).get(name, 5)
        default_patients = None if name == "synthetic" else [f"{name}-p{i // 2}" for i in range(n)]
        uris[name] = write_set(folder / f"{name}.parquet", rng.standard_normal((n, d)), [f"{name}{i}" for i in range(n)],
                               (patients or {}).get(name, default_patients))
    return uris


def test_sets_of_different_embedding_sizes_are_named(tmp_path):
    uris = small_sets(tmp_path, dims={"synthetic": 4})

    with pytest.raises(ValueError) as error:
        run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], progress=False)

    assert message_of(error) == ("embedding sizes differ: train 5, val 5, test 5, synthetic 4; embed every set with "
                                 "the same detector")


@pytest.mark.parametrize("first, second", [("val", "test"), ("train", "test"), ("train", "val")])
def test_a_patient_in_two_real_sets_is_refused(tmp_path, first, second):
    shared = [f"{second}-p{i // 2}" for i in range(8)]
    shared[3] = shared[5] = f"{first}-p1"
    uris = small_sets(tmp_path, sizes={"train": 12, "val": 8, "test": 8, "synthetic": 9}, patients={second: shared})

    with pytest.raises(ValueError) as error:
        run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], progress=False)

    assert message_of(error) == (f"{second} patients must not appear in {first} (each role needs unseen patients); "
                                 f"shared patient_id: {first}-p1")


def test_reference_ids_outside_the_training_embeddings_are_named(tmp_path):
    uris = small_sets(tmp_path)

    with pytest.raises(ValueError) as error:
        run_audit(uris["train"], uris["val"], uris["synthetic"], reference_ids=["train3", "gone1", "train1", "gone2"],
                  progress=False)

    assert message_of(error) == ("the generator's training set names 2 sample ids that are not in the training "
                                 f"embeddings {uris['train']}: gone1, gone2")


@pytest.mark.parametrize("options, message", [
    ({"percentile": 0.0}, "percentile must be in (0, 100], got 0.0"),
    ({"percentile": 100.5}, "percentile must be in (0, 100], got 100.5"),
    ({"top_k": 0}, "top_k must be at least 1, got 0"),
    ({"calibration": "strict"}, "calibration must be one of ('paper', 'matched', 'generator'), got 'strict'"),
    ({"calibration": "generator"}, "calibration 'generator' needs the samples of a generator trained on held-out "
                                   "patients (--null-synthetic): train one with `raymem train-ldm --split test`"),
    ({"plant_copies": -1}, "plant_copies must be between 0 and min(12 training, 6 evaluation samples), got -1"),
    ({"plant_copies": 7}, "plant_copies must be between 0 and min(12 training, 6 evaluation samples), got 7"),
])
def test_options_out_of_range_are_refused_naming_the_value(tmp_path, options, message):
    uris = small_sets(tmp_path)

    with pytest.raises(ValueError) as error:
        run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], progress=False, **options)

    assert message_of(error) == message


def test_the_edges_of_the_option_ranges_are_accepted(tmp_path):
    """percentile 100, top_k 1 and as many planted copies as there are evaluation samples."""
    uris = small_sets(tmp_path)

    result = run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], percentile=100.0,
                       top_k=1, plant_copies=6, progress=False)

    assert (result.metrics["percentile"], result.metrics["top_k"], result.metrics["planted"]["n_copies"]) == (
        100.0, 1, 6)


def test_a_matched_null_larger_than_the_driver_holds_is_refused(tmp_path, monkeypatch):
    uris = small_sets(tmp_path)
    needed = metrics.top_pairs_needed(12 * 8, PERCENTILE, 9)
    monkeypatch.setattr(embeddings, "MAX_TOP_PAIRS", needed)
    run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], progress=False)  # at the limit
    monkeypatch.setattr(embeddings, "MAX_TOP_PAIRS", needed - 1)

    with pytest.raises(ValueError) as error:
        run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], progress=False)

    assert message_of(error) == (
        f"the matched calibration's null for 9 synthetic samples needs the {needed:,} largest of 12 x 8 "
        f"train-validation correlations (more than {needed - 1:,}): audit more synthetic samples or use fewer "
        "validation samples")


# ------------------------------------------------------------------------------------ planted and labelled samples


def test_planted_samples_are_training_and_evaluation_rows_plus_a_tenth_of_their_spread():
    rng = np.random.default_rng(8)
    spread = np.linspace(0.5, 4.5, 9)[:, None]  # each row its own std: the noise follows the row's, not the set's
    train, evaluation = spread * rng.normal(0.5, 1.0, (9, 400)), spread[::-1] * rng.normal(-1.0, 1.0, (9, 400))
    engine = embeddings._LocalEngine(block_rows=4, progress=False)
    train_set, eval_set = (engine.put([rows.astype(np.float32)], 400) for rows in (train, evaluation))

    planted = embeddings.plant_embeddings(engine, train_set, eval_set, 9, np.random.default_rng(0))

    originals = np.concatenate([train, evaluation]).astype(np.float32).astype(np.float64)
    relative_noise = (planted.embeddings - originals) / originals.std(axis=1, keepdims=True)
    assert (planted.ids.tolist(), planted.source.tolist(), planted.noise, planted.embeddings.dtype) == (
        [f"planted-embedding-{i}" for i in range(9)] + [f"planted-novel-embedding-{i}" for i in range(9)],
        list(range(9)) + [-1] * 9, 0.1, np.float32)
    assert (abs(relative_noise.mean()) < 0.01, 0.095 < relative_noise.std() < 0.105) == (True, True)


def test_planted_copies_come_from_distinct_sorted_training_rows():
    rng = np.random.default_rng(9)
    engine = embeddings._LocalEngine(block_rows=8, progress=False)
    train_set = engine.put([rng.standard_normal((30, 16)).astype(np.float32)], 16)
    eval_set = engine.put([rng.standard_normal((12, 16)).astype(np.float32)], 16)

    planted = embeddings.plant_embeddings(engine, train_set, eval_set, 10, np.random.default_rng(3))

    copies = planted.source[:10]
    nearest = [int(np.argmin(np.linalg.norm(train_set.raw.numpy() - row, axis=1))) for row in planted.embeddings[:10]]
    assert (copies.tolist() == sorted(set(copies.tolist())), nearest, len(planted.embeddings)) == (
        True, copies.tolist(), 20)


def planted_case(tmp_path):
    uris = small_sets(tmp_path)
    write_set(tmp_path / "planted.parquet", np.random.default_rng(10).standard_normal((3, 5)), ["k0", "k1", "k2"])
    return uris, str(tmp_path / "planted.parquet")


@pytest.mark.parametrize("planted, novel, message", [
    ({"k0": "train1"}, ["k1"], "are neither known copies nor known novel: k2"),
    ({"k0": "train1", "k1": "train2"}, ["k2", "k7", "k5"], "are listed but not embedded: k5, k7"),
    ({"k0": "train1", "k1": "val2"}, ["k2"], "copy training images outside the audited training set: val2"),
])
def test_planted_samples_that_do_not_match_their_list_are_named(tmp_path, planted, novel, message):
    uris, planted_uri = planted_case(tmp_path)

    with pytest.raises(ValueError) as error:
        run_audit(uris["train"], uris["val"], uris["synthetic"], planted_uri=planted_uri, planted=planted,
                  planted_novel=novel, progress=False)

    assert message_of(error) == f"planted samples at {planted_uri} {message}"


def test_known_novel_samples_alone_have_no_source_rate(tmp_path):
    uris, planted_uri = planted_case(tmp_path)

    figures = run_audit(uris["train"], uris["val"], uris["synthetic"], planted_uri=planted_uri,
                        planted_novel=["k0", "k1", "k2"], progress=False).metrics["planted"]

    assert (figures["n_copies"], figures["n_novel"], figures["source_top1_rate"], figures["embedding_noise"]) == (
        0, 3, None, None)


def test_a_planted_copy_of_the_first_training_image_counts_as_a_copy(tmp_path):
    uris, planted_uri = planted_case(tmp_path)

    result = run_audit(uris["train"], uris["val"], uris["synthetic"], planted_uri=planted_uri,
                       planted={"k0": "train0"}, planted_novel=["k1", "k2"], progress=False)

    planted_rows = result.matches.filter(pa.compute.equal(result.matches["kind"], "planted"))
    assert (result.metrics["planted"]["n_copies"], result.metrics["planted"]["n_novel"],
            planted_rows["planted_from"].to_pylist()) == (1, 2, ["train0", None, None])


def test_read_planted_marks_known_novel_samples_with_source_minus_one(tmp_path):
    uris, planted_uri = planted_case(tmp_path)
    train = embeddings.Subset.whole(EmbeddingSource(uris["train"], "train", require_patients=True))

    planted = embeddings.read_planted(planted_uri, {"k2": "train5", "k0": "train0"}, ["k1"], train)

    written = np.stack(pq.read_table(planted_uri)["embedding"].to_numpy(zero_copy_only=False))
    assert (planted.ids.tolist(), planted.source.tolist(), planted.noise, planted.embeddings.tolist()) == (
        ["k0", "k1", "k2"], [0, -1, 5], None, written.tolist())


def test_a_bad_planted_file_is_named_as_the_planted_set(tmp_path):
    uris = small_sets(tmp_path)
    write_set(tmp_path / "planted.parquet", [[1.0, 2.0, 3.0, 4.0, 5.0], [2.0] * 5], ["k0", "k1"])

    with pytest.raises(ValueError) as error:
        run_audit(uris["train"], uris["val"], uris["synthetic"], planted_uri=str(tmp_path / "planted.parquet"),
                  planted_novel=["k0", "k1"], progress=False)

    assert message_of(error).startswith(f"planted embeddings at {tmp_path / 'planted.parquet'}: embedding is constant")


def test_the_planted_auc_interval_follows_the_audits_seed(tmp_path):
    """Known copies under heavy noise overlap the known novel samples (AUC below 1): the bootstrap interval is
    drawn with the audit's seed, the same for the same seed and not for another."""
    rng = np.random.default_rng(13)
    uris = small_sets(tmp_path, sizes={"train": 30, "val": 12, "test": 10, "synthetic": 9})
    train = pq.read_table(uris["train"])["embedding"].to_numpy(zero_copy_only=False)
    copies = np.stack(train[:8]) + 1.2 * rng.standard_normal((8, 5))
    write_set(tmp_path / "planted.parquet", np.concatenate([copies, rng.standard_normal((8, 5))]),
              [f"k{i}" for i in range(16)])

    def interval(seed):
        return run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], seed=seed,
                         planted_uri=str(tmp_path / "planted.parquet"), planted={f"k{i}": f"train{i}" for i in range(8)},
                         planted_novel=[f"k{i}" for i in range(8, 16)], progress=False).metrics["planted"]

    first, again, other = interval(1), interval(1), interval(2)

    assert first["roc_auc"] < 1
    assert (first["ci95"]["roc_auc"] == again["ci95"]["roc_auc"], first["ci95"]["roc_auc"] != other["ci95"]["roc_auc"],
            first["roc_auc"] == other["roc_auc"]) == (True, True, True)


def write_labels(folder, text: str) -> str:
    (folder / "labels.csv").write_text(text)
    return str(folder / "labels.csv")


@pytest.mark.parametrize("text, message", [
    ("synthetic_id,train_id,label\n", "need a header with synthetic_id, train_id, label and at least one row"),
    ("synthetic_id,train_id\nsynthetic0,train1\n",
     "need a header with synthetic_id, train_id, label and at least one row"),
    ("synthetic_id,train_id,label\nsynthetic0,train1,copy\nsynthetic1,train1,maybe\nsynthetic2,train3,Same\n",
     "label must be 'copy' or 'novel', found ['maybe', 'same']"),
    ("synthetic_id,train_id,label\nsynthetic0,train1,copy\nsynthetic99,train1,novel\nsynthetic1,val3,novel\n",
     "sample ids not in the audited sets: synthetic99, val3"),
])
def test_hand_labels_that_cannot_be_used_are_refused(tmp_path, text, message):
    uris = small_sets(tmp_path)
    labels = write_labels(tmp_path, text)

    with pytest.raises(ValueError) as error:
        run_audit(uris["train"], uris["val"], uris["synthetic"], labels_csv=labels, progress=False)

    assert message_of(error) == f"labels {labels}: {message}"


def test_hand_labels_score_generated_and_planted_samples_against_the_named_training_image(tmp_path):
    """Labels are read case- and space-insensitively; a planted sample may be labelled; each pair is scored
    directly (not through the search's top-k)."""
    uris, planted_uri = planted_case(tmp_path)
    labels = write_labels(tmp_path, "synthetic_id,train_id,label\nsynthetic0,train1, Copy\nk0,train4,novel\n"
                                    "synthetic5,train11,NOVEL \nk2,train0,copy\n")
    sets = {name: pq.read_table(uris[name])["embedding"].to_numpy(zero_copy_only=False) for name in uris}
    planted_rows = pq.read_table(planted_uri)["embedding"].to_numpy(zero_copy_only=False)
    pairs = [(sets["synthetic"][0], sets["train"][1]), (planted_rows[0], sets["train"][4]),
             (sets["synthetic"][5], sets["train"][11]), (planted_rows[2], sets["train"][0])]
    scores = np.array([pearson(np.stack([a]), np.stack([b]))[0, 0] for a, b in pairs])

    result = run_audit(uris["train"], uris["val"], uris["synthetic"], planted_uri=planted_uri,
                       planted={"k0": "train2"}, planted_novel=["k1", "k2"], labels_csv=labels, calibration="paper",
                       progress=False)

    decisions = scores > result.metrics["threshold_copies"]
    truth = np.array([True, False, False, True])
    assert (result.metrics["labels"]["n_labels"], result.metrics["labels"]["agreement"]) == (
        4, pytest.approx(np.mean(decisions == truth), abs=1e-12))
    assert result.metrics["labels"]["true_positives"] == int((decisions & truth).sum())


# --------------------------------------------------------------------------------------------- pure functions


def warnings_of(**changes) -> list[str]:
    """audit_warnings of a test-split audit that needs no warning, with the given figures changed."""
    figures = {"fpr_source": "test", "n_eval_patients": 10, "calibration": "paper", "n_train": 100,
               "n_synthetic": 100}
    options = {"n_val_patients": changes.pop("n_val_patients", 10), "measurable_draws": changes.pop("draws", 50)}
    return audit_warnings({**figures, **changes}, **options)


def test_no_warning_at_the_edges_of_every_rule():
    assert warnings_of() == []


@pytest.mark.parametrize("changes, warning", [
    ({"fpr_source": "val-half"}, "no test split: the false-positive rates are measured on half of the validation "
                                 "patients, and the other half alone sets the thresholds"),
    ({"n_eval_patients": 9}, "only 9 evaluation patients (fewer than 10): the measured false-positive rates are too "
                             "uncertain to state; see their 95 % intervals"),
    ({"n_val_patients": 9}, "only 9 calibration (val) patients (fewer than 10): the thresholds are extreme order "
                            "statistics of few values and their false-positive rates vary widely"),
    ({"n_train": 99, "n_synthetic": 150, "draws": 75}, "the paper's tau is a percentile of only 99 values (one per "
                                                       "training image): it moves a lot between training sets; "
                                                       "calibration 'matched' takes one value per validation image"),
    ({"draws": 49}, "the evaluation set measures the memorized false-positive rate at 49 draws; for 100 generated "
                    "samples it is carried up by an upper bound, so it reads high: more test patients make it "
                    "tighter"),
])
def test_each_warning_starts_one_step_past_its_edge(changes, warning):
    assert warnings_of(**changes) == [warning]


def test_few_generated_samples_warn_twice_when_also_fewer_than_the_training_images():
    assert warnings_of(n_synthetic=99, draws=50) == [
        "only 99 generated samples: the intervals of the memorized shares rest on a two-way clustering approximation "
        "that covers less than 95 % this small (docs/statistics.md)",
        "99 generated samples for 100 training images: fewer than the paper's rule (n_synthetic >= n_train), so the "
        "memorized share cannot reach 100 %",
    ]


def test_few_training_images_warn_only_under_the_papers_calibration():
    assert (warnings_of(n_train=99, calibration="matched"), len(warnings_of(n_train=99))) == ([], 1)


def neighbours(best) -> metrics.Neighbours:
    best = np.asarray(best, dtype=np.float64)
    return metrics.Neighbours(best[:, None], np.zeros((len(best), 1), np.int64), lambda rows: None)


def test_the_first_pair_request_is_one_and_a_half_times_the_pairs_expected_above():
    """share 2/5 above 0.6 (0.6 itself is not above): 1 - (1 - p) ** 3 = 0.4, p = 0.15657...; 1.5 p x 5 x 10 =
    11.74 -> 12."""
    p = 1 - 0.6 ** (1 / 3)

    requested = expected_pairs_above(neighbours([0.1, 0.6, 0.7, 0.9, 0.3]), 3, 10, 0.6)

    assert (requested, math.ceil(1.5 * p * 50)) == (12, 12)


def test_every_training_sample_above_asks_for_one_and_a_half_times_all_pairs_and_none_for_none():
    assert (expected_pairs_above(neighbours([0.8, 0.9]), 4, 7, 0.5),
            expected_pairs_above(neighbours([0.1, 0.2]), 4, 7, 0.5)) == (21, 0)


def test_pairs_above_asks_again_for_four_times_as_many_until_the_threshold_is_covered(case):
    """47 x 26 = 1222 train x val pairs, every one above -1: a first request of max(1024, first_request, 4 x the
    pairs held) falls short, the next (four times as many, at most all pairs) covers the threshold."""
    uris = case["uris"]
    inputs = read_inputs(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], null_uri=None,
                         reference_ids=None, seed=0)
    engine = embeddings._LocalEngine(block_rows=8, progress=False)
    requests = []
    search = engine.search

    def counted(a, b, *, k, top_pairs=0):
        requests.append(top_pairs)
        return search(a, b, k=k, top_pairs=top_pairs)

    engine.search = counted
    sets = embeddings._Sets(engine, inputs)
    sets.prepare()
    held = metrics.TopPairs(np.full(300, 0.9), np.zeros(300, np.int64), np.zeros(300, np.int64), 1222, None, 0.9)

    best, pairs = embeddings.pairs_above(sets, sets.calibrate, 26, 47, -1.0, first_request=50)
    embeddings.pairs_above(sets, sets.calibrate, 26, 47, 0.5, pairs=held, first_request=10)
    embeddings.pairs_above(sets, sets.calibrate, 26, 47, -1.0, first_request=1100)

    assert requests == [1024, 1222, 1200, 1100, 1222]
    assert (len(pairs.scores), best.best.tolist()) == (1222, pytest.approx(
        pearson(case["val"], case["train"]).max(axis=1).tolist(), abs=SCORE_TOLERANCE))


def test_numeric_items_keep_finite_numbers_and_skip_flags_text_and_lists():
    figures = {"n": 3, "share": 0.25, "flag": True, "name": "paper", "none": None, "nan": math.nan,
               "inf": -math.inf, "list": [1, 2], "nested": {"x": np.float64(2), "ci95": {"x": [0.5, 4]}}, "ci95": 7}

    assert dict(numeric_items(figures)) == {"n": 3.0, "share": 0.25, "nested.x": 2.0, "nested.x_ci_lo": 0.5,
                                            "nested.x_ci_hi": 4.0, "ci95": 7.0}


def test_a_phase_entered_twice_adds_up_and_keeps_its_first_place():
    clock = PhaseClock()
    for name in ("search", "read", "search"):
        with clock.phase(name):
            pass

    assert (list(clock.seconds), all(seconds >= 0 for seconds in clock.seconds.values())) == (["search", "read"], True)
    with pytest.raises(AssertionError):
        with clock.phase("lunch"):
            pass


def test_write_outputs_adds_its_seconds_to_the_write_phase(tmp_path, audited):
    before = dict(audited.phase_seconds)
    audited.phase_seconds["write"] = 1000.0

    write_outputs(audited, str(tmp_path))

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert (written == json.loads(json.dumps(audited.metrics)), pq.read_table(tmp_path / "matches.parquet").equals(
        audited.matches), 1000.0 < audited.phase_seconds["write"] < 1100.0) == (True, True, True)
    audited.phase_seconds.clear()
    audited.phase_seconds.update(before)


def test_audit_embeddings_writes_what_run_audit_returns(tmp_path):
    uris = small_sets(tmp_path)

    result = audit_embeddings(uris["train"], uris["val"], uris["synthetic"], str(tmp_path / "out"),
                              test_uri=uris["test"], progress=False)

    assert (json.loads((tmp_path / "out" / "metrics.json").read_text())["n_train"], result.metrics["n_train"],
            pq.read_table(tmp_path / "out" / "matches.parquet").num_rows, list(result.phase_seconds)) == (
        12, 12, 9 + 12, list(PHASES))


def test_the_progress_bar_counts_the_tiles_of_the_grid():
    with embeddings._progress_bar(False, 9, 17, 4) as hidden, embeddings._progress_bar(True, 8, 4, 4) as shown:
        assert (hidden.total, hidden.disable, shown.total, shown.disable, shown.desc, shown.unit) == (
            3 * 5, True, 2 * 1, False, "search 8 x 4", "tile")


def test_lists_of_no_values_are_empty_lists():
    column = embeddings._lists(np.zeros((3, 0), np.int64), pa.int64())

    assert column.to_pylist() == [[], [], []]


def test_the_local_engine_holds_float32_rows_and_an_empty_set_as_no_rows():
    engine = embeddings._LocalEngine(block_rows=4, progress=False)
    rows = np.random.default_rng(11).standard_normal((5, 3)).astype(np.float32)

    held, empty = engine.put([rows[:2], rows[2:]], 3), engine.put([], 3)

    assert (held.raw.dtype, held.raw.numpy().tolist(), tuple(empty.raw.shape), empty.n_rows) == (
        torch.float32, rows.tolist(), (0, 3), 0)
    assert engine.rows(held, [4, 1]).tolist() == rows[[4, 1]].tolist()


def test_the_local_engine_keeps_every_pair_within_the_decision_band_below_the_top_pairs_cut():
    """The float64 re-check near a threshold needs the pairs that float32 puts just below the cut: one top pair asked
    for, the pair 5e-4 below it comes too (DECISION_BAND is 1e-3); the pair 2e-3 below and the rest do not."""
    columns = np.random.default_rng(13).standard_normal((8, 6))
    # 6 orthonormal rows of zero mean (centred columns span a space orthogonal to the ones vector): the Pearson
    # correlation of unit combinations of them is their dot product.
    e = np.linalg.qr(columns - columns.mean(axis=0))[0].T
    assert np.abs(e.mean(axis=1)).max() < 1e-12 and np.allclose(e @ e.T, np.eye(len(e)))

    def unit(r, first, second):
        return r * e[first] + np.sqrt(1 - r**2) * e[second]

    queries = np.stack([e[0], e[1]])
    reference = np.stack([unit(0.9, 0, 2), unit(0.8995, 1, 3), unit(0.898, 0, 4), e[5]])
    engine = embeddings._LocalEngine(block_rows=2, progress=False)
    query_set, reference_set = (engine.put([rows.astype(np.float32)], 8) for rows in (queries, reference))
    engine.prepare(query_set), engine.prepare(reference_set)

    result = engine.search(query_set, reference_set, k=1, top_pairs=1)

    pairs = sorted(zip(result.pair_rows.tolist(), result.pair_cols.tolist(), result.pair_scores.tolist()))
    assert [(row, col) for row, col, _ in pairs] == [(0, 0), (1, 1)], pairs
    assert np.allclose([score for _, _, score in pairs], [0.9, 0.8995], atol=1e-6)


def test_the_local_engines_float64_top_k_reads_every_block_of_the_reference():
    rng = np.random.default_rng(12)
    queries, reference = rng.standard_normal((6, 8)), rng.standard_normal((11, 8))
    engine = embeddings._LocalEngine(block_rows=3, progress=False)
    query_set, reference_set = engine.put([queries.astype(np.float32)], 8), engine.put([reference.astype(np.float32)], 8)
    chosen = np.array([1, 4, 5])

    scores, indices = engine.exact_topk(query_set, chosen, reference_set, 2)

    expected = pearson(queries[chosen], reference)
    order = np.argsort(-expected, axis=1)[:, :2]
    assert (indices.tolist(), np.abs(scores - np.take_along_axis(expected, order, axis=1)).max() < 1e-12) == (
        order.tolist(), True)


def test_each_new_pair_request_is_four_times_the_last(tmp_path):
    """70 x 70 = 4900 pairs, every one above -1: requests 1024, 4096, then all 4900."""
    uris = small_sets(tmp_path, sizes={"train": 70, "val": 70, "synthetic": 9})
    inputs = read_inputs(uris["train"], uris["val"], uris["synthetic"], test_uri=None, null_uri=None,
                         reference_ids=None, seed=0)
    engine = embeddings._LocalEngine(block_rows=32, progress=False)
    requests = []
    search = engine.search
    engine.search = lambda a, b, *, k, top_pairs=0: requests.append(top_pairs) or search(a, b, k=k, top_pairs=top_pairs)
    sets = embeddings._Sets(engine, embeddings.AuditInputs(
        inputs.train, embeddings.Subset.whole(inputs.calibrate.source), embeddings.Subset.whole(inputs.calibrate.source),
        inputs.synthetic, None, "test", {}))
    sets.prepare()

    _, pairs = embeddings.pairs_above(sets, sets.calibrate, 70, 70, -1.0)

    assert (requests, len(pairs.scores)) == ([1024, 4096, 4900], 4900)


def test_exactly_ten_bad_rows_are_all_named_with_no_count_of_others(tmp_path):
    rows = [[1.0, 2.0, 3.0, 4.0]] + [[1.0, 2.0, 3.0]] * 10
    uri = write_set(tmp_path / "s.parquet", rows, [f"s{i}" for i in range(11)], embedding_type=pa.list_(pa.float32()),
                    row_group_size=100)

    with pytest.raises(ValueError) as error:
        list(EmbeddingSource(uri, "synthetic", require_patients=False).batches())

    assert message_of(error).endswith(": sample_id s1, s2, s3, s4, s5, s6, s7, s8, s9, s10; fix or drop these rows")


def test_the_first_write_phase_is_the_writes_own_seconds(tmp_path, audited):
    before = dict(audited.phase_seconds)
    audited.phase_seconds.pop("write", None)

    write_outputs(audited, str(tmp_path))

    assert 0 <= audited.phase_seconds["write"] < 0.9  # a few files of a small audit
    audited.phase_seconds.clear()
    audited.phase_seconds.update(before)


# ------------------------------------------------------------- matches.parquet's generated and training rows, patients


MATCHES_COLUMNS = ["kind", "sample_id", "patient_id", "neighbour_ids", "neighbour_indices", "neighbour_scores",
                   "best_score", "score_exact", "is_copy", "is_memorized", "planted_from"]


def test_matches_rows_of_generated_and_training_samples_are_their_brute_force_neighbours(case, audited):
    s, own = reference_scores(case)["syn_train"], case["reference_rows"]
    matches = audited.matches.to_pydict()
    synthetic, train = slice(0, 37), slice(37, 77)
    top = np.argsort(-s, axis=1, kind="stable")[:, :TOP_K]
    tau_copies, tau_memorized = audited.metrics["threshold_copies"], audited.metrics["threshold_memorized"]

    assert audited.matches.column_names == MATCHES_COLUMNS
    assert (matches["sample_id"][synthetic], matches["patient_id"][synthetic], matches["is_memorized"][synthetic],
            matches["planted_from"][synthetic]) == ([f"s{i}" for i in range(37)], [None] * 37, [None] * 37, [None] * 37)
    assert (matches["neighbour_indices"][synthetic], matches["neighbour_ids"][synthetic]) == (
        top.tolist(), [[f"t{own[j]}" for j in row] for row in top])
    assert np.abs(np.array(matches["neighbour_scores"][synthetic]) - np.take_along_axis(s, top, 1)).max() < \
        SCORE_TOLERANCE
    assert matches["is_copy"][synthetic] == (s.max(axis=1) > tau_copies).tolist()
    assert (matches["sample_id"][train], matches["patient_id"][train], matches["is_copy"][train]) == (
        [f"t{i}" for i in own], case["train_patients"][own].tolist(), [None] * 40)
    assert (matches["neighbour_indices"][train], matches["neighbour_ids"][train]) == (
        [[int(i)] for i in s.argmax(axis=0)], [[f"s{i}"] for i in s.argmax(axis=0)])
    assert np.abs(np.array(matches["best_score"][train]) - s.max(axis=0)).max() < SCORE_TOLERANCE
    assert matches["is_memorized"][train] == (s.max(axis=0) > tau_memorized).tolist()
    assert all(isinstance(flag, bool) for flag in matches["score_exact"][:77])


def test_the_patient_rows_count_each_patients_images_and_memorized_images(case, audited):
    s, own = reference_scores(case)["syn_train"], case["reference_rows"]
    memorized = s.max(axis=0) > audited.metrics["threshold_memorized"]
    patients = case["train_patients"][own]
    rows = [{"patient_id": p, "n_train_images": int((patients == p).sum()),
             "n_memorized": int(memorized[patients == p].sum()), "best_score": float(s.max(axis=0)[patients == p].max())}
            for p in sorted(set(patients))]
    expected = sorted(rows, key=lambda row: (-row["n_memorized"], -row["best_score"], row["patient_id"]))

    observed = audited.patients

    assert sum(row["n_memorized"] for row in expected) > 0
    assert [{k: v for k, v in row.items() if k != "best_score"} for row in observed] == [
        {k: v for k, v in row.items() if k != "best_score"} for row in expected]
    assert [row["best_score"] for row in observed] == pytest.approx([row["best_score"] for row in expected],
                                                                    abs=SCORE_TOLERANCE)


def test_validation_embeddings_need_patient_ids(tmp_path):
    uris = small_sets(tmp_path)
    no_patients = write_set(tmp_path / "val-bare.parquet", np.random.default_rng(8).standard_normal((8, 5)),
                            [f"v{i}" for i in range(8)])

    with pytest.raises(ValueError, match=r"^val embeddings .*: columns sample_id, embedding, patient_id are required"):
        run_audit(uris["train"], no_patients, uris["synthetic"], test_uri=uris["test"], progress=False)


def test_a_bad_generator_null_file_is_named_as_the_generator_null_set(tmp_path):
    uris = small_sets(tmp_path)
    null = write_set(tmp_path / "null.parquet", [[1.0, 2.0, 3.0, 4.0, 5.0], [2.0] * 5], ["n0", "n1"])

    with pytest.raises(ValueError, match=r"^generator-null embeddings at .*: embedding is constant"):
        run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], null_uri=null,
                  progress=False)


def test_an_audit_without_a_test_split_splits_validation_with_seed_zero_by_default(case):
    uris = case["uris"]

    def figures(**seed):
        return run_audit(uris["train"], uris["val"], uris["synthetic"], calibration="paper", progress=False,
                         **seed).metrics

    assert figures() == figures(seed=0) != figures(seed=1)


def test_planting_repeats_with_the_audits_seed(case):
    uris = case["uris"]

    def planted(seed):
        result = run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], plant_copies=4,
                           seed=seed, progress=False)
        return result.metrics["planted"], result.matches.filter(pa.compute.equal(result.matches["kind"], "planted"))

    first, again = planted(5), planted(5)

    assert first[0] == again[0] and first[1].equals(again[1])


@pytest.mark.parametrize("role", ["train", "test"])
def test_training_and_test_embeddings_need_patient_ids(tmp_path, role):
    uris = small_sets(tmp_path)
    uris[role] = write_set(tmp_path / f"{role}-bare.parquet", np.random.default_rng(9).standard_normal((6, 5)),
                           [f"{role}-bare{i}" for i in range(6)])

    with pytest.raises(ValueError, match=rf"^{role} embeddings .*: columns sample_id, embedding, patient_id are "
                                         "required"):
        run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], progress=False)


def test_only_parquet_files_of_an_embeddings_folder_are_read(tmp_path):
    folder = tmp_path / "synthetic"
    folder.mkdir()
    write_set(folder / "part-0.parquet", np.random.default_rng(10).standard_normal((4, 5)), ["a", "b", "c", "d"])
    (folder / "_SUCCESS").write_text("")
    (folder / "part-0.parquet.crc").write_bytes(b"\x00\x01")

    source = EmbeddingSource(str(folder), "synthetic", require_patients=False)

    assert (len(source), source.sample_ids.tolist()) == (4, ["a", "b", "c", "d"])


def test_an_audit_keeps_five_neighbours_per_generated_sample_by_default(tmp_path):
    uris = small_sets(tmp_path)

    result = run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], progress=False)

    synthetic = result.matches.filter(pa.compute.equal(result.matches["kind"], "synthetic"))
    assert {len(ids) for ids in synthetic["neighbour_ids"].to_pylist()} == {5}


def test_two_shared_patients_are_listed_with_a_comma(tmp_path):
    val_patients = [f"val-p{i // 2}" for i in range(8)]
    val_patients[0], val_patients[7] = "train-p0", "train-p2"
    uris = small_sets(tmp_path, patients={"val": val_patients})

    with pytest.raises(ValueError, match=r"shared patient_id: train-p0, train-p2$"):
        run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], progress=False)


def test_a_percentile_below_one_is_accepted(tmp_path):
    uris = small_sets(tmp_path)

    result = run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], percentile=0.5,
                       progress=False)

    assert result.metrics["percentile"] == 0.5


# ------------------------------------------------------------- the searches' request schedule and planted rows


@pytest.fixture(scope="module")
def schedule_case(tmp_path_factory):
    """train 300, val 120, test 402 (patients of 3), 5 generated samples, a generator null of 300 noisy training
    rows: a null closer to the training set than the validation set, so its first top pairs stop above the lowest
    threshold and need a second search; enough evaluation pairs above it for a first request beyond 1024."""
    folder = tmp_path_factory.mktemp("schedule")
    rng = np.random.default_rng(41)
    train = rng.standard_normal((300, D))
    rows = {"train": train, "val": rng.standard_normal((120, D)), "test": rng.standard_normal((402, D)),
            "synthetic": rng.standard_normal((5, D)),
            "null": train[rng.permutation(300)] + rng.standard_normal((300, D))}
    uris = {name: write_set(folder / f"{name}.parquet", values, [f"{name}{i}" for i in range(len(values))],
                            None if name in ("synthetic", "null") else patients_of([3] * (len(values) // 3), name))
            for name, values in rows.items()}
    inputs = read_inputs(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], null_uri=uris["null"],
                         reference_ids=None, seed=0)
    return rows, inputs


def recorded_search(inputs, planted=None, percentile=PERCENTILE, top_k=TOP_K):
    """embeddings._search on a local engine that records, per search, the set searched against the training set
    (by name), the number of top pairs asked for and the number it returned."""
    engine = embeddings._LocalEngine(block_rows=64, progress=False)
    sets = embeddings._Sets(engine, inputs)
    calls = []
    search = engine.search

    def recorded(a, b, *, k, top_pairs=0):
        result = search(a, b, k=k, top_pairs=top_pairs)
        name = next(name for name in ("calibrate", "evaluate", "synthetic", "null", "train")
                    if getattr(sets, name) is b) if a is sets.train else "planted"
        calls.append((name, top_pairs, len(result.pair_scores) if top_pairs else 0))
        return result

    engine.search = recorded
    sets.prepare()
    n_pairs = len(inputs.train) * len(inputs.calibrate)
    quantile = (percentile / 100) ** (1 / len(inputs.synthetic))
    top_pairs = n_pairs - math.floor(quantile * (n_pairs - 1))
    searches, planted_to_train = embeddings._search(sets, inputs, percentile, top_k, top_pairs, planted)
    return calls, searches, planted_to_train


def test_evaluation_and_null_pairs_are_first_asked_for_by_the_pairs_expected_above_the_lowest_threshold(
        schedule_case):
    """The lowest threshold any calibration uses, by brute force: the paper's (95th percentile of each training
    image's best validation score), and the matched and generator memorized thresholds (the (0.95 ** (1 / 5))
    quantile of all train x val and train x null pair scores). The evaluation pairs' first request is 1.5 times the
    pairs expected above it (the single-pair tail from the share of training images above it); the null's second
    request is the largest of 1024, its own expectation and four times the pairs its first search returned."""
    rows, inputs = schedule_case
    calls, searches, _ = recorded_search(inputs)
    train_val, train_null = pearson(rows["train"], rows["val"]), pearson(rows["train"], rows["null"])
    quantile = 0.95 ** (1 / 5)
    lowest = min(np.percentile(train_val.max(axis=1), 95), np.quantile(train_val, quantile),
                 np.quantile(train_null, quantile))
    share = np.mean(train_val.max(axis=1) > lowest)
    single_pair_tail = 1 - (1 - share) ** (1 / 120)

    def expected(n_other):
        return math.ceil(1.5 * single_pair_tail * 300 * n_other)

    null_first = 300 * 300 - math.floor(quantile * (300 * 300 - 1))
    requests = {name: [asked for other, asked, _ in calls if other == name] for name in ("evaluate", "null")}
    null_returned = next(returned for other, _, returned in calls if other == "null")

    assert expected(402) > 1024 and 4 * null_returned > max(1024, expected(300))  # the case tests what it should
    assert requests["evaluate"][0] == expected(402)
    assert requests["null"][:2] == [null_first, max(1024, expected(300), 4 * null_returned)]
    # every pair above the lowest threshold is held, so the figures do not depend on the schedule
    test_train = pearson(rows["train"], rows["test"])
    assert (searches.eval_pairs.count_above(lowest), searches.null_pairs.count_above(lowest)) == (
        int((test_train > lowest).sum()), int((train_null > lowest).sum()))


def test_planted_neighbours_recompute_against_the_training_set_in_float64(schedule_case):
    rows, inputs = schedule_case
    planted_rows = rows["train"][[4, 77, 150]] + 0.1 * np.random.default_rng(3).standard_normal((3, D))
    planted = embeddings.Planted(planted_rows.astype(np.float32), np.array(["k0", "k1", "k2"], dtype=object),
                                 np.array([4, 77, 150]))
    _, _, without = recorded_search(inputs, planted=None)
    _, _, planted_to_train = recorded_search(inputs, planted=planted, top_k=3)

    planted_to_train.refine(np.array([0, 2]))

    expected = pearson(planted_rows, rows["train"])
    order = np.argsort(-expected, axis=1)[:, :3]
    assert without is None
    assert planted_to_train.exact.tolist() == [True, False, True]
    assert planted_to_train.indices[[0, 2]].tolist() == order[[0, 2]].tolist()
    assert np.abs(planted_to_train.scores[[0, 2]] - np.take_along_axis(expected, order, axis=1)[[0, 2]]).max() < 1e-12


def test_pairs_above_searches_nothing_when_the_held_pairs_already_cover_the_threshold(case):
    uris = case["uris"]
    inputs = read_inputs(uris["train"], uris["val"], uris["synthetic"], test_uri=None, null_uri=None,
                         reference_ids=None, seed=0)
    engine = embeddings._LocalEngine(block_rows=8, progress=False)
    sets = embeddings._Sets(engine, inputs)
    sets.prepare()
    engine.search = lambda *args, **kwargs: pytest.fail("searched although the held pairs cover the threshold")
    held = metrics.TopPairs(np.full(300, 0.9), np.zeros(300, np.int64), np.zeros(300, np.int64), 1222, None, 0.5)

    best, pairs = embeddings.pairs_above(sets, sets.calibrate, 13, 47, 0.6, pairs=held, first_request=10)

    assert (best, pairs) == (None, held)


@pytest.mark.parametrize("prepared", ["queries", "reference", "neither"])
def test_the_local_engine_refuses_a_set_not_prepared(prepared):
    engine = embeddings._LocalEngine(block_rows=4, progress=False)
    rng = np.random.default_rng(2)
    queries, reference = (engine.put([rng.standard_normal((5, 6)).astype(np.float32)], 6) for _ in range(2))
    for name, rows in (("queries", queries), ("reference", reference)):
        if prepared == name:
            engine.prepare(rows)

    with pytest.raises(AssertionError, match="^prepare both sets first$"):
        engine.search(queries, reference, k=1)


def test_a_bad_row_among_selected_rows_is_named_by_its_own_sample_id(tmp_path):
    rows = [[1.0, 2.0, 3.0], [2.0, 1.0, 3.0], [3.0, 1.0, 2.0], None, [1.0, 3.0, 2.0]]
    uri = write_set(tmp_path / "s.parquet", rows, ["a", "b", "c", "d", "e"], embedding_type=pa.list_(pa.float32()))
    source = EmbeddingSource(uri, "synthetic", require_patients=False)

    with pytest.raises(ValueError) as error:
        list(source.batches(rows=np.array([1, 3, 4])))

    assert message_of(error) == (f"synthetic embeddings at {uri}: has a null embedding: sample_id d; fix or drop "
                                 "these rows")


def test_generated_samples_keep_their_patient_ids_in_the_matches_table(tmp_path):
    uris = small_sets(tmp_path)
    write_set(tmp_path / "synthetic.parquet", np.random.default_rng(8).standard_normal((9, 5)),
              [f"synthetic{i}" for i in range(9)], [f"g{i % 4}" for i in range(9)])

    result = run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], progress=False)

    table = result.matches.to_pydict()
    synthetic_rows = [i for i, kind in enumerate(table["kind"]) if kind == "synthetic"]
    assert [table["patient_id"][i] for i in synthetic_rows] == [f"g{i % 4}" for i in range(9)]
