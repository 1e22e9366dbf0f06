"""The CLI: every subcommand is explained, and user errors end in one line naming the problem."""

import pytest

from raymem import cli


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])

    text = capsys.readouterr().out
    assert all(name in text for name in ("phantoms", "ingest", "train-detector", "embed", "train-ldm", "sample",
                                         "audit", "filter", "audit-embeddings", "sweep", "dashboard",
                                         "local-cluster"))


def test_a_bad_config_value_names_the_field_and_exits_2(capsys, tmp_path):
    code = cli.main(["ingest", str(tmp_path), str(tmp_path / "out"), "--size", "2", "64"])

    assert code == 2 and "size" in capsys.readouterr().err


def test_a_missing_audit_folder_is_a_one_line_error_not_a_traceback(capsys, tmp_path):
    code = cli.main(["filter", "--audit", str(tmp_path / "audit"), "--synthetic", str(tmp_path), "--out",
                     str(tmp_path / "released")])

    err = capsys.readouterr().err
    assert code == 1 and err.startswith("raymem filter: ") and "does not exist" in err and "Traceback" not in err


def test_a_bad_study_file_names_the_field_and_exits_2(capsys, tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("study: s\nstorage_root: /tmp/x\ndata: {phantoms: {kind: xray2d}}\nfactors: {augment: [yes]}\n"
                     "audit_every: 0\n")

    code = cli.main(["sweep", "--config", str(study)])

    assert code == 2 and "audit_every" in capsys.readouterr().err


def test_a_dashboard_of_a_missing_experiment_is_a_one_line_error(capsys, tmp_path):
    code = cli.main(["dashboard", "--experiment", "no-such-study", "--out", str(tmp_path / "dash"),
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])

    err = capsys.readouterr().err  # MLflow may log its store setup first; the error is the last line
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("raymem dashboard: ") and "no-such-study" in last and "Traceback" not in err


def test_train_ldm_help_offers_the_test_split_as_the_generator_null(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train-ldm", "--help"])

    text = " ".join(capsys.readouterr().out.split())
    assert "--split {train,test}" in text and "test: the generator-null" in text


def test_audit_embeddings_with_a_test_split_writes_the_design_keys(capsys, tmp_path):
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    train = rng.standard_normal((120, 16)).astype(np.float32)
    sets = {"train": train, "val": rng.standard_normal((60, 16)), "test": rng.standard_normal((60, 16)),
            "synthetic": np.concatenate([train[:6] + 0.01, rng.standard_normal((34, 16))])}
    for name, rows in sets.items():
        pq.write_table(pa.table({"sample_id": [f"{name}{i}" for i in range(len(rows))],
                                 "patient_id": [f"{name}-p{i // 3}" for i in range(len(rows))],
                                 "embedding": pa.array(list(rows.astype(np.float32)), pa.list_(pa.float32(), 16))}),
                       tmp_path / f"{name}.parquet")
    (tmp_path / "ids.json").write_text(json.dumps([f"train{i}" for i in range(60)]))

    code = cli.main(["audit-embeddings", *(f"--{name}={tmp_path / name}.parquet" for name in sets),
                     f"--reference-ids={tmp_path / 'ids.json'}", "--calibration=matched", f"--out={tmp_path / 'out'}"])

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    design = {"threshold", "percentile", "n_train", "n_val", "n_synthetic", "n_memorized_train", "pct_memorized_train",
              "n_copies", "pct_copies", "n_patients", "pct_memorized_patients", "measured_fpr_copies", "fpr_source",
              "n_eval", "ci95", "ci_method", "calibrations"}
    assert (code, design - set(metrics), metrics["n_train"], metrics["n_synthetic"], metrics["fpr_source"]) == (
        0, set(), 60, 40, "test")
    assert metrics["n_copies"] >= 6
