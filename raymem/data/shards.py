"""The dataset on disk: Parquet shards per split, a quarantine table, and a manifest written last.

Layout of a dataset URI (local path or s3://)::

    <dataset>/train/part-*.parquet  val/part-*.parquet  test/part-*.parquet
    <dataset>/quarantine.parquet    (source, reason, level)   files set aside, one row each, with why
    <dataset>/duplicates.parquet    (sample_id, content_hash)   exact duplicate images, kept but listed
    <dataset>/manifest.json         written last: a dataset without it is incomplete and is refused

Shard schema (one row per image or volume), see DESIGN.md: ``sample_id``, ``patient_id`` (pseudonymous),
``split``, ``image`` (arrow.fixed_shape_tensor, channel-first (1, H, W) or (1, D, H, W), float16/float32 in the
manifest's ``intensity_range``), ``shape``, ``spacing`` (mm per spatial axis), ``modality``, ``source`` (PHI-free
provenance), ``content_hash`` (sha256 of the source pixels, for duplicate detection).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymem import storage

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.parquet"
DUPLICATES = "duplicates.parquet"
# Ray Data's target block size; row groups near it keep one block per row group when streaming.
TARGET_ROW_GROUP_BYTES = 128 * 1024**2

# level: "file" (a whole input file set aside) or "image" (one image inside a MedMNIST archive).
QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("level", pa.string())])


class DatasetError(RuntimeError):
    """A dataset URI that is missing, incomplete (no manifest) or inconsistent."""


def shard_schema(image_shape: Sequence[int], dtype: str) -> pa.Schema:
    """The Parquet schema of a shard for channel-first ``image_shape`` (1, *spatial)."""
    return pa.schema([
        ("sample_id", pa.string()),
        ("patient_id", pa.string()),
        ("split", pa.string()),
        ("image", pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(dtype)), tuple(image_shape))),
        ("shape", pa.list_(pa.int32())),
        ("spacing", pa.list_(pa.float32())),
        ("modality", pa.string()),
        ("source", pa.string()),
        ("content_hash", pa.string()),
    ])


def rows_per_row_group(image_shape: Sequence[int], dtype: str) -> int:
    """Rows per row group so one group stays near Ray Data's 128 MiB block target."""
    bytes_per_image = int(np.prod(image_shape)) * np.dtype(dtype).itemsize
    return max(1, TARGET_ROW_GROUP_BYTES // bytes_per_image)


@dataclass(frozen=True)
class Sample:
    """One image or volume ready for a shard. ``image`` is channel-first (1, *spatial)."""

    sample_id: str
    patient_id: str
    split: str
    image: np.ndarray
    spacing_mm: tuple[float, ...]
    modality: str
    source: str
    content_hash: str


def samples_to_table(samples: Sequence[Sample], image_shape: Sequence[int], dtype: str) -> pa.Table:
    """Stack samples into a shard table; every image must already have ``image_shape``."""
    images = np.stack([s.image for s in samples]).astype(dtype, copy=False) if samples else \
        np.zeros((0, *image_shape), dtype=dtype)
    assert images.shape[1:] == tuple(image_shape), (images.shape, image_shape)
    schema = shard_schema(image_shape, dtype)
    columns = {
        "sample_id": [s.sample_id for s in samples],
        "patient_id": [s.patient_id for s in samples],
        "split": [s.split for s in samples],
        "image": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(images)),
        "shape": [list(image_shape)] * len(samples),
        "spacing": [list(s.spacing_mm) for s in samples],
        "modality": [s.modality for s in samples],
        "source": [s.source for s in samples],
        "content_hash": [s.content_hash for s in samples],
    }
    return pa.Table.from_pydict(columns, schema=schema)


def shard_name(table: pa.Table) -> str:
    """A deterministic part file name from the sample ids it holds."""
    digest = hashlib.sha256("\n".join(table.column("sample_id").to_pylist()).encode()).hexdigest()[:16]
    return f"part-{digest}.parquet"


def write_table(uri: str, table: pa.Table, row_group_rows: int | None = None) -> None:
    """Write one Parquet file (a shard, the quarantine, ...) to a URI."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_rows or max(1, table.num_rows), compression="zstd")
    storage.write_bytes(uri, buffer.getvalue())


def read_table(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    fs, path = storage.filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=list(columns) if columns else None)


def write_manifest(dataset_uri: str, manifest: dict) -> None:
    """Commit the dataset: called after every shard is written."""
    storage.write_bytes(storage.join(dataset_uri, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())


def read_manifest(dataset_uri: str) -> dict:
    """The dataset's manifest; a dataset without one was never committed and is refused."""
    uri = storage.join(dataset_uri, MANIFEST)
    if not storage.exists(uri):
        raise DatasetError(f"{dataset_uri} has no {MANIFEST}: the dataset is missing or its ingest did not finish; "
                           "rerun the ingest into a fresh destination")
    return json.loads(storage.read_bytes(uri))


def require_images(dataset_uri: str, split: str, needed: int, purpose: str) -> None:
    """DatasetError unless the committed split holds at least ``needed`` images; the message says what ``purpose``
    needs them and, when files were set aside at ingest, where they are listed."""
    manifest = read_manifest(dataset_uri)
    held = manifest["splits"].get(split, {}).get("images", 0)
    if held >= needed:
        return
    set_aside = f"; {manifest['quarantined']} files were set aside at ingest, see " \
                f"{storage.join(dataset_uri, QUARANTINE)}" if manifest.get("quarantined") else ""
    raise DatasetError(f"{dataset_uri} has {held} {split} images; {purpose} needs at least {needed}{set_aside}")


def split_files(dataset_uri: str, split: str) -> list[str]:
    """URIs of a committed split's shards, as listed in the manifest (not whatever lies in the folder)."""
    manifest = read_manifest(dataset_uri)
    if split not in manifest["splits"]:
        raise DatasetError(f"{dataset_uri} has no split {split!r}; it has {sorted(manifest['splits'])}")
    return [storage.join(dataset_uri, split, name) for name in manifest["splits"][split]["files"]]


def iter_split(dataset_uri: str, split: str, columns: Sequence[str] | None = None,
               batch_rows: int = 1024) -> Iterator[pa.RecordBatch]:
    """Stream a split's rows as record batches with pyarrow alone (no Ray)."""
    for uri in split_files(dataset_uri, split):
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=columns)


def images_of(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """The ``image`` column as one (N, 1, *spatial) array."""
    column = batch.column("image")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy_ndarray()


def load_split(dataset_uri: str, split: str, columns: Sequence[str] | None = None) -> pa.Table:
    """A whole split in memory (small datasets, tests and reports)."""
    tables = [read_table(uri, columns) for uri in split_files(dataset_uri, split)]
    if not tables:
        manifest = read_manifest(dataset_uri)
        return shard_schema(manifest["image_shape"], manifest["dtype"]).empty_table().select(
            list(columns) if columns else shard_schema(manifest["image_shape"], manifest["dtype"]).names)
    return pa.concat_tables(tables)
