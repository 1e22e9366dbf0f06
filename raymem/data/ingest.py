"""Ingest: raw images (NIfTI, DICOM, PNG/JPEG, MedMNIST; local or s3://) -> a committed, sharded dataset.

Ray Data does the per-file work (read, validate, de-identify, fit to shape, normalise); the driver only sees
small metadata columns to assign patient splits, list duplicates and write the manifest last.

Counting: an *item* is one candidate sample: a NIfTI/PNG file, a DICOM series (or single DICOM image), one image
of a MedMNIST array, or a file that could not be read at all. ``found == ingested + quarantined`` always holds.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import posixpath
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raymem import storage
from raymem.config import IngestConfig
from raymem.data import formats, shards, transforms
from raymem.data.stream import ordered

log = logging.getLogger(__name__)

_META_COLUMNS = ["kind", "source", "reason", "sample_id", "patient_id", "split_hint", "content_hash", "modality"]
# Rows between the read and the write: explicit types, since a block of only bad rows has no image to infer from.
_ROW_SCHEMA = pa.schema([*[(name, pa.string()) for name in _META_COLUMNS], ("image", pa.binary()),
                         ("spacing", pa.list_(pa.float64()))])


# The patient_id of every synthetic sample (generated images belong to no patient).
SYNTHETIC_PATIENT = "synthetic"


class IngestError(RuntimeError):
    """The ingest cannot go on: no input, or (with --strict) the first bad file, named with its reason."""


@dataclass
class IngestSummary:
    """What an ingest did; the same figures are in the manifest."""

    dataset_uri: str
    found: int
    ingested: int
    quarantined: int
    duplicates: int
    splits: dict[str, dict[str, int]]
    image_shape: tuple[int, ...]
    quarantine_reasons: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"dataset      {self.dataset_uri}",
               f"found        {self.found}",
               f"ingested     {self.ingested}",
               f"quarantined  {self.quarantined}",
               f"duplicates   {self.duplicates} (kept, listed in {shards.DUPLICATES})",
               f"image shape  {list(self.image_shape)}"]
        for split, counts in self.splits.items():
            out.append(f"  {split:<5} {counts['images']:>6} images  {counts['patients']:>5} patients")
        for reason, count in sorted(self.quarantine_reasons.items(), key=lambda kv: -kv[1]):
            out.append(f"  set aside {count:>4} x {reason}")
        return out


def _keyed_digest(key: bytes, text: str, length: int = 20) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:length]


def _bad(source: str, reason: str) -> dict[str, Any]:
    return {"kind": "bad", "source": source, "reason": reason, "sample_id": None, "patient_id": None,
            "split_hint": None, "content_hash": None, "modality": None, "image": None, "spacing": None}


def _sample_row(image: formats.RawImage, source: str, patient_id: str, cfg: IngestConfig, key: bytes) -> dict:
    """Validate, fit and normalise one raw image into a shard row (image as raw bytes until the write)."""
    formats.validate(image, spatial_dims=cfg.spatial_dims, max_voxels=cfg.max_voxels)
    content_hash = formats.content_hash(image.array)
    array, spacing = transforms.fit_to_shape(image.array, image.spacing_mm, tuple(cfg.size), mode=cfg.fit)
    modality = image.modality if cfg.modality == "auto" else cfg.modality
    array = transforms.normalise_intensity(array, modality, intensity_range=tuple(cfg.intensity_range),
                                           ct_window_hu=tuple(cfg.ct_window_hu), percentiles=tuple(cfg.percentiles))
    if not np.isfinite(array).all():
        raise formats.BadInputError("non-finite values after normalisation")
    return {"kind": "sample", "source": source, "reason": None,
            "sample_id": "s-" + _keyed_digest(key, image.source),
            "patient_id": patient_id, "split_hint": image.split, "content_hash": content_hash,
            "modality": modality, "image": array.astype(cfg.dtype).tobytes(),
            "spacing": [float(s) for s in spacing]}


def _path_patient(source: str, cfg: IngestConfig, key: bytes) -> tuple[str, str]:
    """(pseudonymous patient id, PHI-free source) for path-identified formats."""
    if cfg.synthetic:
        return SYNTHETIC_PATIENT, source
    match = formats.patient_key_from_path(source, cfg.patient_pattern)
    patient_key = match if match is not None else posixpath.splitext(source)[0]
    patient_id = formats.pseudonymize(patient_key, key)
    # Folder names often are patient names: the shard keeps the pseudonym in their place.
    safe_source = source.replace(patient_key, patient_id) if match is not None else f"{patient_id}/{posixpath.basename(source)}"
    return patient_id, safe_source


def _process_unit(unit: dict[str, Any], cfg: IngestConfig, key: bytes) -> list[dict[str, Any]]:
    """Read one unit (a file, or a DICOM series) into sample rows and/or quarantine rows."""
    sources, uris, fmt = unit["sources"], unit["uris"], unit["format"]
    rows: list[dict[str, Any]] = []
    label = sources[0] if len(sources) == 1 else unit["label"]
    try:
        blobs = []
        for source, uri in zip(sources, uris):
            fs, path = storage.filesystem(uri)
            size = fs.get_file_info(path).size
            if size == 0:
                raise formats.BadInputError("empty file")
            if size > cfg.max_file_mb * 1024**2:
                raise formats.BadInputError(f"file larger than max_file_mb={cfg.max_file_mb:g}")
            blobs.append((source, storage.read_bytes(uri)))
        if fmt == "auto":
            fmt = formats.detect_format(sources[0], blobs[0][1][:256])
            if fmt is None:
                raise formats.BadInputError("unrecognised file type")
        if fmt == "dicom":
            header = formats.read_dicom_header(blobs[0][1], sources[0])
            patient_id = SYNTHETIC_PATIENT if cfg.synthetic else \
                formats.pseudonymize(header.patient_key or unit["label"], key)
            image = formats.read_dicom_series(blobs)
            safe_source = f"{patient_id}/series-{unit['series']}" if len(sources) > 1 else \
                f"{patient_id}/{posixpath.basename(label)}"
            rows.append(_sample_row(image, safe_source, patient_id, cfg, key))
        elif fmt == "medmnist":
            for image in formats.read_medmnist(blobs[0][1], label):
                try:
                    rows.append(_sample_row(image, image.source, formats.pseudonymize(image.patient_key, key), cfg, key))
                except formats.BadInputError as err:
                    _strict_check(cfg, image.source, str(err))
                    rows.append(_bad(image.source, str(err)))
        else:
            reader = {"nifti": formats.read_nifti, "png": formats.read_png}[fmt]
            image = reader(blobs[0][1], label)
            patient_id, safe_source = _path_patient(label, cfg, key)
            rows.append(_sample_row(image, safe_source, patient_id, cfg, key))
    except formats.BadInputError as err:
        _strict_check(cfg, label, str(err))
        rows.append(_bad(label, str(err)))
    except IngestError:
        raise
    except Exception as err:  # a library failing on a malformed file: set aside, never abort the ingest
        reason = f"unreadable ({type(err).__name__})"
        _strict_check(cfg, label, reason)
        rows.append(_bad(label, reason))
    return rows


def _process_units(batch: pa.Table, cfg: IngestConfig, key: bytes) -> pa.Table:
    """Ray Data map_batches over units of work -> typed sample/quarantine rows."""
    rows = [row for unit in batch.to_pylist() for row in _process_unit(unit, cfg, key)]
    return pa.Table.from_pylist(rows, schema=_ROW_SCHEMA)


def _strict_check(cfg: IngestConfig, source: str, reason: str) -> None:
    if cfg.strict:
        raise IngestError(f"{source}: {reason} (--strict stops at the first bad file)")


def _dicom_header_row(row: dict[str, Any], key: bytes) -> dict[str, Any]:
    """Series grouping key (a keyed hash of SeriesInstanceUID: UIDs are identifiers) or the reason it failed."""
    try:
        fs, path = storage.filesystem(row["uri"])
        if fs.get_file_info(path).size == 0:
            raise formats.BadInputError("empty file")
        with fs.open_input_stream(path, compression=None) as stream:
            header = formats.read_dicom_header(stream.read(), row["source"])
        if not header.has_pixels:
            raise formats.BadInputError("DICOM without pixel data")
        return {**row, "series": _keyed_digest(key, header.series_uid, 12), "reason": None}
    except formats.BadInputError as err:
        return {**row, "series": None, "reason": str(err)}
    except Exception as err:
        return {**row, "series": None, "reason": f"unreadable ({type(err).__name__})"}


def _plan_units(src_uri: str, cfg: IngestConfig, key: bytes) -> tuple[list[dict], list[dict]]:
    """List SRC and group it into units of work; DICOM headers are read (in parallel) to group series."""
    import ray

    relative = storage.list_files(src_uri)
    if not relative:
        raise IngestError(f"{src_uri} holds no files: nothing to ingest")
    units, dicom_files, bad = [], [], []
    for rel in relative:
        uri = storage.file_uri(src_uri, rel)
        fmt = cfg.format if cfg.format != "auto" else formats.detect_format(rel, b"")
        if fmt == "dicom" or (fmt is None and "." not in posixpath.basename(rel)):
            dicom_files.append({"source": rel, "uri": uri})
        else:
            units.append({"format": fmt or "auto", "sources": [rel], "uris": [uri], "label": rel, "series": None})
    if dicom_files:
        headers = ray.data.from_items(dicom_files).map(_dicom_header_row, fn_kwargs={"key": key}).take_all()
        series: dict[str, list[dict]] = defaultdict(list)
        for row in sorted(headers, key=lambda r: r["source"]):
            if row["reason"] is None:
                series[row["series"]].append(row)
            elif cfg.format == "auto" and row["reason"].startswith("not a DICOM"):
                # No extension and no DICOM magic: let the generic reader name what it is.
                units.append({"format": "auto", "sources": [row["source"]], "uris": [row["uri"]],
                              "label": row["source"], "series": None})
            else:
                _strict_check(cfg, row["source"], row["reason"])
                bad.append(_bad(row["source"], row["reason"]))
        for series_key, files in sorted(series.items()):
            units.append({"format": "dicom", "sources": [f["source"] for f in files], "uris": [f["uri"] for f in files],
                          "label": posixpath.dirname(files[0]["source"]) or files[0]["source"], "series": series_key})
    return units, bad


def assign_splits(patient_ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Patient -> split. Every image of a patient lands in one split; deterministic for (ids, seed)."""
    patients = sorted(set(patient_ids))
    order = np.random.default_rng(seed).permutation(len(patients))
    n_val = int(round(val_fraction * len(patients)))
    n_test = int(round(test_fraction * len(patients)))
    if len(patients) - n_val - n_test < 1:
        n_val, n_test = max(0, min(n_val, len(patients) - 1)), 0
    split_of = {}
    for rank, index in enumerate(order):
        split_of[patients[index]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return split_of


def _write_shard_batch(batch: pa.Table, dataset_uri: str, split_of: dict[str, str], image_shape: tuple[int, ...],
                       dtype: str) -> pa.Table:
    """Ray Data map_batches: write this batch's rows as one shard per split; return (split, file, rows)."""
    written = {"split": [], "file": [], "rows": []}
    rows = batch.to_pylist()
    by_split: dict[str, list[shards.Sample]] = defaultdict(list)
    for row in rows:
        split = split_of[row["sample_id"]]
        image = np.frombuffer(row["image"], dtype=dtype).reshape(image_shape)
        by_split[split].append(shards.Sample(
            sample_id=row["sample_id"], patient_id=row["patient_id"], split=split, image=image,
            spacing_mm=tuple(row["spacing"]), modality=row["modality"], source=row["source"],
            content_hash=row["content_hash"]))
    for split, samples in sorted(by_split.items()):
        table = shards.samples_to_table(samples, image_shape, dtype)
        name = shards.shard_name(table)
        shards.write_table(storage.join(dataset_uri, split, name), table)
        written["split"].append(split)
        written["file"].append(name)
        written["rows"].append(table.num_rows)
    return pa.table(written, schema=pa.schema([("split", pa.string()), ("file", pa.string()), ("rows", pa.int64())]))


def ingest(src_uri: str, dataset_uri: str, cfg: IngestConfig) -> IngestSummary:
    """Ingest every file under ``src_uri`` into a dataset at ``dataset_uri`` (manifest written last).

    Needs a running Ray (``ray.init``) or starts a local one.
    """
    import ray

    if storage.exists(storage.join(dataset_uri, shards.MANIFEST)):
        raise IngestError(f"{dataset_uri} already holds a committed dataset; choose a new destination")
    key, key_from_env = formats.pseudonym_key_from_env()
    units, bad_rows = _plan_units(src_uri, cfg, key)
    log.info("ingest: %d units of work (%d set aside while grouping DICOM series)", len(units), len(bad_rows))

    # Enough blocks to keep every CPU busy, few enough that per-task overhead stays small next to ~1 ms per image.
    # Ordered: the shards hold the same rows in the same (sorted path) order in every run.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n_blocks = min(len(units), max(4 * cpus, len(units) // 256))
    processed = ordered(ray.data.from_items(units, override_num_blocks=n_blocks)).map_batches(
        _process_units, batch_format="pyarrow", batch_size=None, fn_kwargs={"cfg": cfg, "key": key})
    try:
        processed = processed.materialize()
        meta = processed.select_columns(_META_COLUMNS).to_arrow_refs()
        meta_table = pa.concat_tables([ray.get(ref) for ref in meta]) if meta else None
    except Exception as err:  # Ray wraps a worker's IngestError: surface the file and reason only
        message = str(err)
        marker = "IngestError: "
        if marker in message:
            raise IngestError(message[message.rindex(marker) + len(marker):].strip().splitlines()[0]) from None
        raise

    bad = [r for r in bad_rows]
    if meta_table is not None and meta_table.num_rows:
        bad += meta_table.filter(pc.equal(meta_table["kind"], "bad")).select(["source", "reason"]).to_pylist()
        good = meta_table.filter(pc.equal(meta_table["kind"], "sample"))
    else:
        good = pa.table({c: pa.array([], pa.string()) for c in _META_COLUMNS})
    image_shape = (1, *cfg.size)

    # Splits by patient; MedMNIST carries its own split per image.
    hints = good["split_hint"].to_pylist()
    patient_ids = good["patient_id"].to_pylist()
    patient_split = assign_splits([p for p, h in zip(patient_ids, hints) if h is None],
                                  cfg.val_fraction, cfg.test_fraction, cfg.seed)
    sample_ids = good["sample_id"].to_pylist()
    split_of = {sid: (hint if hint is not None else patient_split[pid])
                for sid, pid, hint in zip(sample_ids, patient_ids, hints)}
    if len(split_of) != len(sample_ids):
        raise IngestError("two inputs produced the same sample id; report this with the input layout")

    written = []
    if sample_ids:
        writer = processed.filter(lambda row: row["kind"] == "sample").map_batches(
            _write_shard_batch, batch_format="pyarrow", batch_size=shards.rows_per_row_group(image_shape, cfg.dtype),
            fn_kwargs={"dataset_uri": dataset_uri, "split_of": split_of, "image_shape": image_shape,
                       "dtype": cfg.dtype})
        written = writer.take_all()

    return _commit(dataset_uri, cfg, image_shape, sample_ids=sample_ids, patient_ids=patient_ids,
                   split_of=split_of, content_hashes=good["content_hash"].to_pylist(),
                   modalities=good["modality"].to_pylist(), written=written, bad=bad,
                   pseudonym_key="env" if key_from_env else "random")



def _commit(dataset_uri: str, cfg: IngestConfig, image_shape: tuple[int, ...], *, sample_ids: list[str],
            patient_ids: list[str], split_of: dict[str, str], content_hashes: list[str], modalities: list[str],
            written: list[dict], bad: list[dict], pseudonym_key: str, extra: dict | None = None) -> IngestSummary:
    """After every shard is written: duplicates and quarantine tables, then the manifest (the commit)."""
    counts: dict[str, int] = defaultdict(int)
    for h in content_hashes:
        counts[h] += 1
    duplicate_rows = [{"sample_id": sid, "content_hash": h} for sid, h in zip(sample_ids, content_hashes)
                      if counts[h] > 1]
    shards.write_table(storage.join(dataset_uri, shards.DUPLICATES), pa.Table.from_pylist(
        duplicate_rows, schema=pa.schema([("sample_id", pa.string()), ("content_hash", pa.string())])))
    shards.write_table(storage.join(dataset_uri, shards.QUARANTINE),
                       pa.Table.from_pylist(bad, schema=shards.QUARANTINE_SCHEMA))

    split_summary: dict[str, dict[str, Any]] = {}
    for split in shards.SPLITS:
        members = [(sid, pid) for sid, pid in zip(sample_ids, patient_ids) if split_of[sid] == split]
        split_summary[split] = {"images": len(members), "patients": len({pid for _, pid in members}),
                                "files": sorted(w["file"] for w in written if w["split"] == split)}
    reasons: dict[str, int] = defaultdict(int)
    for row in bad:
        reasons[row["reason"]] += 1
    assert sum(w["rows"] for w in written) == len(sample_ids), "every ingested sample is in exactly one shard"
    found = len(sample_ids) + len(bad)
    manifest = {
        "format_version": 1,
        "found": found, "ingested": len(sample_ids), "quarantined": len(bad),
        "duplicates": len(duplicate_rows),
        "splits": split_summary,
        "image_shape": list(image_shape), "dtype": cfg.dtype, "spatial_dims": cfg.spatial_dims,
        "intensity_range": list(cfg.intensity_range),
        "modalities": sorted(set(modalities)),
        "pseudonym_key": pseudonym_key,
        "config": cfg.model_dump(mode="json"),
        **(extra or {}),
    }
    shards.write_manifest(dataset_uri, manifest)
    return IngestSummary(dataset_uri=dataset_uri, found=found, ingested=len(sample_ids), quarantined=len(bad),
                         duplicates=len(duplicate_rows),
                         splits={k: {"images": v["images"], "patients": v["patients"]} for k, v in split_summary.items()},
                         image_shape=image_shape, quarantine_reasons=dict(reasons))


def write_dataset(dataset_uri: str, samples: Iterable[shards.Sample], cfg: IngestConfig,
                  image_shape: tuple[int, ...], *, pseudonym_key: str, extra: dict | None = None) -> IngestSummary:
    """Write samples (already shaped and normalised, splits set) as a committed dataset, streaming shard by shard."""
    if storage.exists(storage.join(dataset_uri, shards.MANIFEST)):
        raise IngestError(f"{dataset_uri} already holds a committed dataset; choose a new destination")
    pending: dict[str, list[shards.Sample]] = defaultdict(list)
    written, metas = [], []
    per_shard = shards.rows_per_row_group(image_shape, cfg.dtype)

    def flush(split: str) -> None:
        table = shards.samples_to_table(pending.pop(split), image_shape, cfg.dtype)
        name = shards.shard_name(table)
        shards.write_table(storage.join(dataset_uri, split, name), table)
        written.append({"split": split, "file": name, "rows": table.num_rows})

    for sample in samples:
        pending[sample.split].append(sample)
        metas.append((sample.sample_id, sample.patient_id, sample.split, sample.content_hash, sample.modality))
        if len(pending[sample.split]) >= per_shard:
            flush(sample.split)
    for split in list(pending):
        flush(split)
    sample_ids, patient_ids, split_list, hashes, modalities = (list(c) for c in zip(*metas)) if metas else \
        ([], [], [], [], [])
    return _commit(dataset_uri, cfg, image_shape, sample_ids=sample_ids, patient_ids=patient_ids,
                   split_of=dict(zip(sample_ids, split_list)), content_hashes=hashes, modalities=modalities,
                   written=written, bad=[], pseudonym_key=pseudonym_key, extra=extra)


def phantom_dataset(dataset_uri: str, kind: str, *, patients: int, images_per_patient: int, size: int, seed: int,
                    cfg: IngestConfig) -> IngestSummary:
    """Generate phantom patients straight into a committed dataset (no files, no Ray: generation is fast).

    Images are normalised exactly as the ingest would; patient ids are ``phantom-<kind>-<seed>-<index>`` (no PHI).
    """
    from tqdm import tqdm

    from raymem.data import phantoms

    spatial_dims = 2 if kind == "xray2d" else 3
    first = next(phantoms.generate(kind, patients=1, images_per_patient=1, size=size, seed=seed))
    cfg = cfg.model_copy(update={"spatial_dims": spatial_dims, "size": tuple(first.array.shape)})
    patient_ids = [f"phantom-{kind}-{seed}-{p:05d}" for p in range(patients)]
    patient_split = assign_splits(patient_ids, cfg.val_fraction, cfg.test_fraction, cfg.seed)

    def samples() -> Iterator[shards.Sample]:
        images = phantoms.generate(kind, patients=patients, images_per_patient=images_per_patient, size=size,
                                   seed=seed)
        for image in tqdm(images, total=patients * images_per_patient, desc=f"phantoms {kind}", unit="img"):
            patient_id = patient_ids[image.patient_index]
            array = transforms.normalise_intensity(
                image.array, image.modality, intensity_range=tuple(cfg.intensity_range),
                ct_window_hu=tuple(cfg.ct_window_hu), percentiles=tuple(cfg.percentiles))
            yield shards.Sample(
                sample_id=f"{patient_id}-{image.image_index:03d}", patient_id=patient_id,
                split=patient_split[patient_id], image=array[None].astype(cfg.dtype),
                spacing_mm=tuple(image.spacing_mm), modality=image.modality,
                source=f"phantom/{kind}/seed-{seed}/patient-{image.patient_index:05d}/img-{image.image_index:03d}",
                content_hash=formats.content_hash(image.array))

    return write_dataset(dataset_uri, samples(), cfg, (1, *first.array.shape),
                         pseudonym_key="none (phantoms carry no identifiers)")
