"""The embedding writer: one Ray Data batch of several splits lands as one embedding-schema part per split."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymem.embed import _write_parts, embedding_table


def test_a_batch_of_two_splits_is_written_as_one_part_per_split_in_row_order(tmp_path):
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    batch = embedding_table(["t1", "v1", "t2", "v2"], ["p1", "p2", "p1", "p2"], vectors).append_column(
        "split", pa.array(["train", "val", "train", "val"]))

    written = _write_parts(batch, str(tmp_path))

    parts = {split: pq.read_table(tmp_path / split / name) for split, name in zip(written["split"], written["file"])}
    assert {split: (part.column_names, part["sample_id"].to_pylist()) for split, part in parts.items()} == {
        "train": (["sample_id", "patient_id", "embedding"], ["t1", "t2"]),
        "val": (["sample_id", "patient_id", "embedding"], ["v1", "v2"])}
