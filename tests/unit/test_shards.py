"""Shard tables round-trip through plain pyarrow, and a dataset is only readable once committed."""

import numpy as np
import pytest

from raymem import storage
from raymem.data import shards


def _samples(n: int, shape=(1, 8, 8)) -> list[shards.Sample]:
    rng = np.random.default_rng(0)
    return [shards.Sample(sample_id=f"s{i}", patient_id=f"p{i // 2}", split="train",
                          image=rng.random(shape, dtype=np.float32), spacing_mm=(1.0, 1.0), modality="XR",
                          source=f"p{i // 2}/img{i}.png", content_hash=f"h{i}") for i in range(n)]


def test_images_round_trip_through_a_shard_file(tmp_path):
    samples = _samples(5)
    table = shards.samples_to_table(samples, (1, 8, 8), "float32")
    uri = str(tmp_path / "train" / shards.shard_name(table))

    shards.write_table(uri, table)
    images = shards.images_of(shards.read_table(uri))

    np.testing.assert_array_equal(images, np.stack([s.image for s in samples]))


def test_split_files_come_from_the_manifest_not_the_folder(tmp_path):
    table = shards.samples_to_table(_samples(2), (1, 8, 8), "float16")
    shards.write_table(str(tmp_path / "train" / "part-a.parquet"), table)
    shards.write_table(str(tmp_path / "train" / "part-stray.parquet"), table)  # e.g. from an interrupted run
    shards.write_manifest(str(tmp_path), {"splits": {"train": {"files": ["part-a.parquet"]}}})

    assert shards.split_files(str(tmp_path), "train") == [storage.join(str(tmp_path), "train", "part-a.parquet")]


def test_an_uncommitted_dataset_is_refused(tmp_path):
    shards.write_table(str(tmp_path / "train" / "part-a.parquet"),
                       shards.samples_to_table(_samples(1), (1, 8, 8), "float16"))

    with pytest.raises(shards.DatasetError, match="manifest"):
        shards.split_files(str(tmp_path), "train")


def test_row_groups_stay_near_the_ray_block_target():
    rows = shards.rows_per_row_group((1, 64, 64, 64), "float16")

    assert rows * 64**3 * 2 <= shards.TARGET_ROW_GROUP_BYTES < (rows + 1) * 64**3 * 2
