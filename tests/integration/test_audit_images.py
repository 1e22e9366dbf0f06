"""The image-level audit on a real local Ray cluster: another generator's PNG folder, planted copies, report,
MLflow, and the privacy filter."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raymem import config, storage
from raymem.audit.images import audit_images, filter_copies
from raymem.data import phantoms, shards
from raymem.data.ingest import phantom_dataset
from raymem.models.detector import build_detector, detector_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def audited(ray_cluster, tmp_path_factory):
    """One audit shared by the module's tests: dataset, a 'generator' folder with 3 verbatim copies, 6 planted
    copies and 6 planted novel images."""
    root = tmp_path_factory.mktemp("audit")
    dataset = str(root / "dataset")
    phantom_dataset(dataset, "xray2d", patients=24, images_per_patient=2, size=32, seed=0,
                    cfg=config.validate(config.IngestConfig, {"val_fraction": 0.25, "test_fraction": 0.25}))
    generated = root / "generated"
    phantoms.write_files(str(generated), "xray2d", patients=10, images_per_patient=1, size=32, seed=99,
                         file_format="png", progress=False)
    train = shards.load_split(dataset, "train", ["sample_id", "image"])
    copied = {}
    for i in range(3):  # a generator that memorized three training images, written as 16-bit PNG
        image = shards.images_of(train.slice(i, 1))[0, 0].astype(np.float32)
        path = generated / "copies" / f"copy-{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 65535).round().astype(np.uint16)).save(path)
        copied[f"copies/copy-{i}.png"] = train["sample_id"][i].as_py()
    torch.manual_seed(0)
    detector = str(root / "detector.pt")
    buffer = __import__("io").BytesIO()
    torch.save(detector_checkpoint(build_detector("tiny", 2), "tiny"), buffer)
    storage.write_bytes(detector, buffer.getvalue())
    out = str(root / "audit")
    cfg = config.validate(config.AuditConfig, {"plant_copies": 6, "seed": 1})

    metrics = audit_images(dataset, str(generated), detector, out, cfg)
    return {"metrics": metrics, "out": out, "copied": copied, "dataset": dataset}


def test_metrics_follow_the_contract_and_count_every_sample(audited):
    metrics = json.loads(storage.read_bytes(f"{audited['out']}/metrics.json"))
    splits = shards.read_manifest(audited["dataset"])["splits"]

    # the generator's own samples only (10 novel + 3 copies); the planted ones are counted apart
    assert (metrics["n_synthetic"], metrics["planted"]["n_copies"], metrics["planted"]["n_novel"]) == (13, 6, 6)
    assert (metrics["n_train"], metrics["n_eval"], metrics["fpr_source"]) == (
        splits["train"]["images"], splits["test"]["images"], "test")
    assert {"threshold", "percentile", "pct_memorized_train", "pct_copies", "pct_memorized_patients",
            "measured_fpr_copies", "ci95", "ci_method"} <= set(metrics)


def test_verbatim_copies_from_another_generator_find_their_training_source(audited):
    matches = pq.read_table(f"{audited['out']}/matches.parquet")
    synthetic = matches.filter(pc.equal(matches["kind"], "synthetic")).to_pylist()
    ingested = pq.read_table(f"{audited['out']}/synthetic-dataset/train").to_pylist()
    source_of = {row["sample_id"]: row["source"] for row in ingested}

    best = {source_of[row["sample_id"]]: row["neighbour_ids"][0] for row in synthetic if row["sample_id"] in source_of}

    assert {name: best[name] for name in audited["copied"]} == audited["copied"]


def test_planted_copies_are_recorded_and_scored(audited):
    planted = pq.read_table(f"{audited['out']}/planted.parquet")

    assert planted["kind"].to_pylist() == ["copy"] * 6 + ["novel"] * 6
    assert {"rotation_deg", "flipped", "contrast", "noise_std"} <= set(planted.column_names)


def test_specificity_counts_only_the_planted_novel_images_as_negatives(audited):
    # The generator's 3 verbatim copies are real copies: they must not count as false alarms.
    planted = audited["metrics"]["planted"]
    assert (planted["n_positive"], planted["n_negative"]) == (6, 6)


def test_report_and_mlflow_run_hold_the_audit(audited):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{audited['out']}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("raymem").experiment_id])[0]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    html = storage.read_bytes(f"{audited['out']}/report.html").decode()

    assert run.info.status == "FINISHED" and "report.html" in artifacts
    assert run.data.metrics["pct_copies"] == pytest.approx(audited["metrics"]["pct_copies"])
    assert [run.data.metrics[f"pct_copies_ci_{end}"] for end in ("lo", "hi")] == pytest.approx(
        audited["metrics"]["ci95"]["pct_copies"])
    assert html.count("data:image/png;base64") >= 4


def test_privacy_filter_removes_exactly_the_flagged_copies(audited, tmp_path):
    matches = pq.read_table(f"{audited['out']}/matches.parquet")
    generated_ids = set(pq.read_table(f"{audited['out']}/synthetic-dataset/train")["sample_id"].to_pylist())
    flagged = {r["sample_id"] for r in matches.to_pylist()
               if r["kind"] == "synthetic" and r["is_copy"] and r["sample_id"] in generated_ids}

    counts = filter_copies(audited["out"], f"{audited['out']}/synthetic-dataset", str(tmp_path / "released"))

    released = set(shards.load_split(str(tmp_path / "released"), "train", ["sample_id"])["sample_id"].to_pylist())
    assert (counts["removed"], released) == (len(flagged), generated_ids - flagged)
    # not vacuous: the generator's verbatim copies of training images are among what the filter took out
    ingested = pq.read_table(f"{audited['out']}/synthetic-dataset/train").to_pylist()
    verbatim = {row["sample_id"] for row in ingested if row["source"] in audited["copied"]}
    assert len(verbatim) == len(audited["copied"]) == 3 and verbatim <= flagged and not verbatim & released
