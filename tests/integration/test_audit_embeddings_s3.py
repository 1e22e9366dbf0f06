"""audit_embeddings reads its three inputs from S3 and writes its outputs there (a moto server on 127.0.0.1 speaking
the S3 protocol), with the same results as from local files."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymem import storage
from raymem.audit.embeddings import audit_embeddings

pytestmark = pytest.mark.slow


def embedding_parts(name: str, n: int, d: int, rng) -> list[bytes]:
    """An embedding set as three Parquet parts (part-00000.parquet ...), variable-length list column."""
    table = pa.table({
        "sample_id": [f"{name}{i}" for i in range(n)],
        "patient_id": [f"{name}-patient{i // 2}" for i in range(n)],
        "embedding": pa.array(list(rng.standard_normal((n, d)).astype(np.float32)), type=pa.list_(pa.float32())),
    })
    parts = []
    for start in range(0, n, -(-n // 3)):
        buffer = io.BytesIO()
        pq.write_table(table.slice(start, -(-n // 3)), buffer)
        parts.append(buffer.getvalue())
    return parts


def test_audit_with_inputs_and_outputs_on_s3_equals_the_local_audit(s3_bucket, tmp_path):
    rng = np.random.default_rng(0)
    inputs = {}
    for name, n in (("train", 300), ("val", 90), ("synthetic", 200)):
        for i, part in enumerate(embedding_parts(name, n, 16, rng)):
            for root in (f"{s3_bucket}/embeddings/{name}", str(tmp_path / name)):
                storage.write_bytes(storage.join(root, f"part-{i:05d}.parquet"), part)
        inputs[name] = (f"{s3_bucket}/embeddings/{name}", str(tmp_path / name))
    # Hand labels (the CLI's --labels) from S3 too: pairs of generated samples and training images.
    labels = "synthetic_id,train_id,label\n" + "".join(
        f"synthetic{i},train{3 * i},{'copy' if i % 2 else 'novel'}\n" for i in range(12))
    for uri in (f"{s3_bucket}/labels.csv", str(tmp_path / "labels.csv")):
        storage.write_bytes(uri, labels.encode())
    options = {"plant_copies": 10, "block_rows": 64, "progress": False}

    audit_embeddings(*(inputs[name][0] for name in ("train", "val", "synthetic")), f"{s3_bucket}/audit",
                     labels_csv=f"{s3_bucket}/labels.csv", **options)
    audit_embeddings(*(inputs[name][1] for name in ("train", "val", "synthetic")), str(tmp_path / "audit"),
                     labels_csv=str(tmp_path / "labels.csv"), **options)

    outputs = [
        (json.loads(storage.read_bytes(storage.join(root, "metrics.json"))),
         pq.read_table(io.BytesIO(storage.read_bytes(storage.join(root, "matches.parquet")))).to_pylist())
        for root in (f"{s3_bucket}/audit", str(tmp_path / "audit"))
    ]
    assert outputs[0] == outputs[1]
    assert outputs[0][0]["labels"]["n_labels"] == 12, outputs[0][0]["labels"]
