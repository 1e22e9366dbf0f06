"""The CLI: every subcommand is explained, and user errors end in one line naming the problem."""

import pytest

from raymem import cli


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])

    text = capsys.readouterr().out
    assert all(name in text for name in ("phantoms", "ingest", "train-detector", "embed", "train-ldm", "sample",
                                         "audit", "filter", "audit-embeddings", "sweep", "dashboard"))


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
