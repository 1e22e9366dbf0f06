"""Where an embedding audit's time goes (its phases, printed by -v and logged to MLflow), and the fast paths of the
whole process giving the results the plain paths give (raymem.audit.embeddings in one process; no Ray)."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymem import cli, runtime
from raymem.audit import embeddings
from raymem.audit.embeddings import PHASES, run_audit, write_outputs


@pytest.fixture(scope="module")
def uris(tmp_path_factory) -> dict[str, str]:
    """train 300, val 120, test 120 (4 rows per patient) and synthetic 200 rows, d = 16, ten synthetic near-copies."""
    folder = tmp_path_factory.mktemp("audit-phases")
    rng = np.random.default_rng(0)
    train = rng.standard_normal((300, 16))
    sets = {"train": train, "val": rng.standard_normal((120, 16)), "test": rng.standard_normal((120, 16)),
            "synthetic": np.concatenate([train[:10] + 0.05 * rng.standard_normal((10, 16)),
                                         rng.standard_normal((190, 16))])}
    for name, rows in sets.items():
        pq.write_table(pa.table({"sample_id": [f"{name}{i}" for i in range(len(rows))],
                                 "patient_id": [f"{name}-p{i // 4}" for i in range(len(rows))],
                                 "embedding": pa.array(list(rows.astype(np.float32)), pa.list_(pa.float32(), 16))}),
                       folder / f"{name}.parquet")
    return {name: str(folder / f"{name}.parquet") for name in sets}


def audit(uris: dict[str, str], **options) -> embeddings.AuditResult:
    return run_audit(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"], progress=False, **options)


def test_every_phase_is_timed_and_the_phases_fit_in_the_wall_time(uris, tmp_path):
    started = time.perf_counter()
    result = audit(uris)
    write_outputs(result, str(tmp_path / "out"))
    wall = time.perf_counter() - started

    seconds = result.phase_seconds
    assert (list(seconds), all(s >= 0 for s in seconds.values()), sum(seconds.values()) <= wall) == (
        list(PHASES), True, True)


def test_the_first_evaluation_pair_request_does_not_change_the_audit(uris, monkeypatch):
    estimated = audit(uris, plant_copies=10)
    monkeypatch.setattr(embeddings, "expected_pairs_above", lambda *args: 0)  # searches again until covered

    searched_again = audit(uris, plant_copies=10)

    assert (estimated.metrics, estimated.matches.to_pylist()) == (searched_again.metrics,
                                                                   searched_again.matches.to_pylist())


def test_the_matches_table_holds_what_row_by_row_lists_would(uris):
    result = audit(uris, plant_copies=10)
    inputs = embeddings.read_inputs(uris["train"], uris["val"], uris["synthetic"], test_uri=uris["test"],
                                    null_uri=None, reference_ids=None, seed=0)
    train_ids, synthetic_ids = inputs.train.sample_ids.astype(str), inputs.synthetic.sample_ids.astype(str)
    matches = result.matches.to_pydict()

    # the plain construction: one Python list of neighbour ids per row, looked up by index
    ids_of = {"synthetic": train_ids, "planted": train_ids, "train": synthetic_ids}
    neighbour_ids = [[str(ids_of[kind][j]) for j in indices]
                     for kind, indices in zip(matches["kind"], matches["neighbour_indices"])]
    n_synthetic, n_train = len(synthetic_ids), len(train_ids)

    assert (matches["neighbour_ids"], matches["kind"][: n_synthetic + n_train], result.matches.schema) == (
        neighbour_ids, ["synthetic"] * n_synthetic + ["train"] * n_train, pa.schema([
            ("kind", pa.string()), ("sample_id", pa.string()), ("patient_id", pa.string()),
            ("neighbour_ids", pa.list_(pa.string())), ("neighbour_indices", pa.list_(pa.int64())),
            ("neighbour_scores", pa.list_(pa.float64())), ("best_score", pa.float64()), ("score_exact", pa.bool_()),
            ("is_copy", pa.bool_()), ("is_memorized", pa.bool_()), ("planted_from", pa.string())]))


def test_verbose_audit_embeddings_prints_and_logs_each_phase(uris, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv(runtime.VERBOSE_ENV, "0")  # restored afterwards: -v sets it for the process
    out = tmp_path / "out"
    started = time.perf_counter()
    code = cli.main(["-v", "audit-embeddings", *(f"--{name}={uri}" for name, uri in uris.items()), f"--out={out}",
                     "--run-name=timed"])
    wall = time.perf_counter() - started

    printed = next(line for line in capsys.readouterr().err.splitlines() if "phase seconds:" in line)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("raymem").experiment_id])[0]
    logged = {key.removeprefix("audit.phase_seconds."): value for key, value in run.data.metrics.items()
              if key.startswith("audit.phase_seconds.")}
    assert (code, [item.split("=")[0] for item in printed.split(": ")[1].split()], sorted(logged),
            all(s >= 0 for s in logged.values()), sum(logged.values()) <= wall,
            json.loads((out / "metrics.json").read_text())["n_train"]) == (
        0, list(PHASES), sorted(PHASES), True, True, 300)
