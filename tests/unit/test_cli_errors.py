"""CLI errors a user can hit without Ray: unreachable S3 storage is one line naming the URI and what to check, and
paths may be relative to the working directory."""

from __future__ import annotations

import json
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymem import cli


@pytest.fixture
def unreachable_s3(monkeypatch) -> str:
    """AWS_* variables pointing at a closed port on 127.0.0.1; returns the endpoint."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "raymem-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "raymem-test")
    return endpoint


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_an_unreachable_s3_input_is_one_line_naming_the_uri_and_what_to_check(capsys, tmp_path, unreachable_s3):
    code = cli.main(["filter", "--audit", "s3://raymem-audits/audit", "--synthetic", "s3://raymem-audits/synthetic",
                     "--out", str(tmp_path / "released")])

    err = capsys.readouterr().err
    line = _last_line(err)
    assert code == 1 and "Traceback" not in err
    assert line.startswith("raymem filter: cannot read s3://raymem-audits/audit/matches.parquet")
    assert f"AWS_ENDPOINT_URL={unreachable_s3}" in line and "AWS_ACCESS_KEY_ID" in line


def test_an_unreachable_s3_folder_is_one_line_saying_what_to_check(capsys, tmp_path, unreachable_s3):
    code = cli.main(["audit-embeddings", "--train", "s3://raymem-emb/train", "--val", "s3://raymem-emb/val",
                     "--synthetic", "s3://raymem-emb/synthetic", "--out", str(tmp_path / "audit")])

    err = capsys.readouterr().err
    line = _last_line(err)
    assert code == 1 and "Traceback" not in err
    assert line.startswith("raymem audit-embeddings: ") and f"AWS_ENDPOINT_URL={unreachable_s3}" in line


def test_audit_embeddings_takes_paths_relative_to_the_working_directory(capsys, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    train = rng.standard_normal((60, 8)).astype(np.float32)
    sets = {"train": train, "val": rng.standard_normal((30, 8)), "test": rng.standard_normal((30, 8)),
            "synthetic": np.concatenate([train[:3] + 0.01, rng.standard_normal((17, 8))])}
    monkeypatch.chdir(tmp_path)
    for name, rows in sets.items():
        (tmp_path / "emb" / name).mkdir(parents=True)
        pq.write_table(pa.table({"sample_id": [f"{name}{i}" for i in range(len(rows))],
                                 "patient_id": [f"{name}-p{i // 3}" for i in range(len(rows))],
                                 "embedding": pa.array(list(rows.astype(np.float32)), pa.list_(pa.float32(), 8))}),
                       tmp_path / "emb" / name / "part-0.parquet")
    (tmp_path / "ids.json").write_text(json.dumps([f"train{i}" for i in range(30)]))

    code = cli.main(["audit-embeddings", *(f"--{name}=emb/{name}" for name in sets), "--reference-ids=ids.json",
                     "--out=audit"])

    metrics = json.loads((tmp_path / "audit" / "metrics.json").read_text())
    assert code == 0 and (metrics["n_train"], metrics["n_synthetic"]) == (30, 20)
