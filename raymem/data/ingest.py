"""Ingest: raw images (NIfTI, DICOM, PNG/JPEG, MedMNIST; local or s3://) -> a committed, sharded dataset.

Ray Data does the per-file work (read, validate, de-identify, fit to shape, normalise); the driver only sees
small metadata columns to assign patient splits, set aside duplicates and write the manifest last.

Accounting is per input file: every file listed under SRC is counted once, and ends either in a sample (a NIfTI,
PNG or single DICOM file is one sample; a DICOM series of k files is one volume; a MedMNIST archive holds many
images) or set aside with its own row and reason in ``quarantine.parquet``. ``files.found == files.ingested +
files.set_aside`` always holds (checked before the commit).

No original path component reaches the dataset: every ``source`` is ``<patient pseudonym>/f-<keyed hash>.<ext>``
(or ``series-<keyed hash>``); the data owner gets the raw paths, with each file's outcome, only in the owner
report they name (``--owner-report``), which is written outside the dataset.

Commit: shards are written under ``<dataset>/_staging/`` and moved into place after the last one; the manifest
is written last. A rerun after a kill finds no manifest and removes what the killed run left.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import logging
import posixpath
from collections import Counter, defaultdict
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

_META_COLUMNS = ["kind", "source", "reason", "sample_id", "patient_id", "split_hint", "content_hash", "modality",
                 "level", "files"]
# Rows between the read and the write: explicit types, since a block of only bad rows has no image to infer from.
# `files` holds the raw relative paths a row stands for: it feeds the owner report and never reaches the dataset.
_ROW_SCHEMA = pa.schema([*[(name, pa.string()) for name in _META_COLUMNS[:-1]], ("files", pa.list_(pa.string())),
                         ("image", pa.binary()), ("spacing", pa.list_(pa.float64()))])
STAGING = "_staging"
# What an ingest writes at the top of a dataset folder: a folder holding only these (and no manifest) is an
# interrupted ingest that a rerun may clear.
_DATASET_ENTRIES = {*shards.SPLITS, STAGING, shards.QUARANTINE, shards.DUPLICATES}
# Layout checks: fewer patients than this cannot give patient-level splits and intervals worth reading, and one
# patient holding more than this share of the images usually means the layout's patient level was missed.
MIN_PATIENTS = 10
MAX_PATIENT_SHARE = 0.5
AUTO_PATTERN = "auto"


# The patient_id of every synthetic sample (generated images belong to no patient).
SYNTHETIC_PATIENT = "synthetic"


class IngestError(RuntimeError):
    """The ingest cannot go on: no input, no usable image, unfillable splits, or (with --strict) the first bad file."""


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
    files: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    owner_report: str | None = None

    def lines(self) -> list[str]:
        out = [f"dataset      {self.dataset_uri}",
               f"files        {self.files.get('found', self.found)} found = {self.files.get('ingested', '?')} "
               f"in images + {self.files.get('set_aside', '?')} set aside",
               f"ingested     {self.ingested} images",
               f"set aside    {self.quarantined} (rows in {shards.QUARANTINE}, each with its reason)",
               f"duplicates   {self.duplicates} (identical images within a split: kept, listed in "
               f"{shards.DUPLICATES})",
               f"image shape  {list(self.image_shape)}"]
        for split, counts in self.splits.items():
            out.append(f"  {split:<5} {counts['images']:>6} images  {counts['patients']:>5} patients")
        for reason, count in sorted(self.quarantine_reasons.items(), key=lambda kv: -kv[1]):
            out.append(f"  set aside {count:>4} x {reason}")
        out += [f"warning: {warning}" for warning in self.warnings]
        if self.owner_report:
            out.append(f"owner report {self.owner_report} (raw paths: keep it with the data owner, never share it)")
        return out


def _keyed_digest(key: bytes, text: str, length: int = 20) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:length]


def _extension(path: str) -> str:
    """The file's known image extension ('.nii.gz', '.png', ...) or '' (DICOM files are often named by UID)."""
    name = posixpath.basename(path).lower()
    return next((ext for ext, _ in formats.EXTENSION_FORMATS if name.endswith(ext)), "")


def safe_source(raw: str, key: bytes, patient_id: str | None) -> str:
    """PHI-free provenance of a file: '<patient_id>/f-<keyed hash of its relative path><ext>'.

    File and folder names are often patient names or dates, so no component survives; the keyed hash still tells
    two files apart and matches the owner report. A MedMNIST image keeps its '#split/index' suffix.
    """
    path, _, inner = raw.partition("#")
    # 'file:' keeps these hashes apart from patient pseudonyms of the same text.
    name = f"f-{_keyed_digest(key, 'file:' + path, 16)}{_extension(path)}" + (f"#{inner}" if inner else "")
    return f"{patient_id}/{name}" if patient_id else name


def _bad(source: str, reason: str, files: list[str], level: str = "file") -> dict[str, Any]:
    return {"kind": "bad", "source": source, "reason": reason, "sample_id": None, "patient_id": None,
            "split_hint": None, "content_hash": None, "modality": None, "level": level, "files": files,
            "image": None, "spacing": None}


def path_patients(relative: list[str], pattern: str) -> tuple[dict[str, str], list[str]]:
    """Each file's patient key from its path, and warnings about the layout.

    pattern: a regex whose group 'patient' names the patient, or 'auto': the first folder below the folders every
        file shares (patient/image, patient/study/series/image and <wrapper>/patient/... all give the patient
        folder). A file with no such folder (directly in SRC, or not matched by the regex) is its own patient.
    Returns {relative path: patient key}; keys are PHI: pass them only to :func:`formats.pseudonymize`.
    """
    if not relative:
        return {}, []
    patient_of, alone = {}, []
    if pattern == AUTO_PATTERN:
        folders = [path.split("/")[:-1] for path in relative]
        shared = 0
        while all(len(parts) > shared for parts in folders) and len({parts[shared] for parts in folders}) == 1:
            shared += 1
        if shared and all(len(parts) == shared for parts in folders):
            shared -= 1  # every file in one folder: that folder is the (one) patient, not each file
        for path, parts in zip(relative, folders):
            if len(parts) > shared:
                patient_of[path] = "/".join(parts[: shared + 1])
            else:
                patient_of[path], _ = path, alone.append(path)
    else:
        for path in relative:
            match = formats.patient_key_from_path(path, pattern)
            patient_of[path] = match if match is not None else path
            if match is None:
                alone.append(path)
    warnings = []
    if alone:
        warnings.append(f"{len(alone)} of {len(relative)} files lie in no patient folder (patient_pattern "
                        f"{pattern!r}): each is taken as its own patient")
    return patient_of, warnings


def layout_warnings(patient_ids: list[str]) -> list[str]:
    """Warnings when the images map onto too few patients, or one patient holds most of them."""
    if not patient_ids:
        return []
    counts = Counter(patient_ids)
    warnings = []
    if len(counts) < MIN_PATIENTS:
        warnings.append(f"{len(patient_ids)} images come from only {len(counts)} patients (fewer than {MIN_PATIENTS}): "
                        "check patient_pattern or the DICOM PatientID; patient-level splits and intervals need more")
    largest = max(counts.values())
    if len(counts) > 1 and largest > MAX_PATIENT_SHARE * len(patient_ids):
        warnings.append(f"one patient holds {largest} of {len(patient_ids)} images: check that the layout's patient "
                        "level is the patient (not a study, series or wrapper folder)")
    return warnings


def _sample_row(image: formats.RawImage, source: str, patient_id: str, files: list[str], cfg: IngestConfig,
                key: bytes) -> dict:
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
            "modality": modality, "level": "file", "files": files, "image": array.astype(cfg.dtype).tobytes(),
            "spacing": [float(s) for s in spacing]}


def _read_blobs(sources: list[str], uris: list[str], cfg: IngestConfig) -> list[tuple[str, bytes]]:
    blobs = []
    for source, uri in zip(sources, uris):
        fs, path = storage.filesystem(uri)
        size = fs.get_file_info(path).size
        if size == 0:
            raise formats.BadInputError("empty file")
        if size > cfg.max_file_mb * 1024**2:
            raise formats.BadInputError(f"file larger than max_file_mb={cfg.max_file_mb:g}")
        blobs.append((source, storage.read_bytes(uri)))
    return blobs


def _process_unit(unit: dict[str, Any], cfg: IngestConfig, key: bytes) -> list[dict[str, Any]]:
    """Read one unit (a file, or a DICOM series) into sample rows and/or quarantine rows (one per file)."""
    sources, fmt, patient_id = unit["sources"], unit["format"], unit["patient_id"]
    label = sources[0] if len(sources) == 1 else unit["label"]
    safe = unit["safe_source"]
    try:
        blobs = _read_blobs(sources, unit["uris"], cfg)
        if fmt == "auto":
            fmt = formats.detect_format(sources[0], blobs[0][1][:256])
            if fmt is None:
                raise formats.BadInputError("unrecognised file type")
        if fmt == "dicom":
            image = formats.read_dicom_series(blobs, source=label, max_voxels=cfg.max_voxels,
                                              spatial_dims=cfg.spatial_dims)
            return [_sample_row(image, safe, patient_id, sources, cfg, key)]
        if fmt == "medmnist":
            rows = []
            for image in formats.read_medmnist(blobs[0][1], label, max_voxels=cfg.max_voxels):
                inner = image.source.partition("#")[2]
                image_safe = f"{safe}#{inner}" if not cfg.synthetic else image.source
                try:
                    rows.append(_sample_row(image, image_safe, formats.pseudonymize(image.patient_key, key),
                                            sources, cfg, key))
                except formats.BadInputError as err:
                    _strict_check(cfg, image_safe, str(err))
                    rows.append(_bad(image_safe, str(err), sources, level="image"))
            return rows
        reader = {"nifti": formats.read_nifti, "png": formats.read_png}[fmt]
        image = reader(blobs[0][1], label, max_voxels=cfg.max_voxels)
        return [_sample_row(image, safe, patient_id, sources, cfg, key)]
    except IngestError:
        raise
    except formats.BadInputError as err:
        reason = str(err)
    except Exception as err:  # a library failing on a malformed file: set aside, never abort the ingest
        reason = f"unreadable ({type(err).__name__})"
    _strict_check(cfg, safe, reason)
    # One row per file: a series set aside as a whole still accounts for each of its files.
    return [_bad(file_safe, reason, [source]) for source, file_safe in zip(sources, unit["safe_files"])]


def _process_units(batch: pa.Table, cfg: IngestConfig, key: bytes) -> pa.Table:
    """Ray Data map_batches over units of work -> typed sample/quarantine rows."""
    rows = [row for unit in batch.to_pylist() for row in _process_unit(unit, cfg, key)]
    return pa.Table.from_pylist(rows, schema=_ROW_SCHEMA)


class StrictStop(IngestError):
    """--strict met a bad file; the message names it by its PHI-free source (the owner report has its path)."""


def _strict_check(cfg: IngestConfig, source: str, reason: str) -> None:
    if cfg.strict:
        raise StrictStop(f"{source}: {reason} (--strict stops at the first bad file)")


def _dicom_header_row(row: dict[str, Any], key: bytes) -> dict[str, Any]:
    """Grouping keys of one DICOM file (keyed hashes: UIDs and PatientIDs are identifiers) or why it failed.

    patient_id: pseudonym of PatientID, None without one; group: hash of (PatientID, StudyInstanceUID,
    SeriesInstanceUID), so files that share a series UID but not a patient never merge; sop: hash of SOPInstanceUID.
    """
    blank = {"patient_id": None, "group": None, "sop": None}
    try:
        fs, path = storage.filesystem(row["uri"])
        if fs.get_file_info(path).size == 0:
            raise formats.BadInputError("empty file")
        with fs.open_input_stream(path, compression=None) as stream:
            header = formats.read_dicom_header(stream.read(), row["source"])
        if not header.has_pixels:
            raise formats.BadInputError("DICOM without pixel data")
        patient_id = formats.pseudonymize(header.patient_key, key) if header.patient_key else None
        group = _keyed_digest(key, "\0".join([header.patient_key or "", header.study_uid, header.series_uid]), 12)
        sop = _keyed_digest(key, header.sop_uid, 16) if header.sop_uid else None
        return {**row, "patient_id": patient_id, "group": group, "sop": sop, "reason": None}
    except formats.BadInputError as err:
        return {**row, **blank, "reason": str(err)}
    except Exception as err:
        return {**row, **blank, "reason": f"unreadable ({type(err).__name__})"}


@dataclass
class _Plan:
    """SRC as units of work, the files set aside before reading, and the layout's warnings."""

    units: list[dict[str, Any]]
    bad: list[dict[str, Any]]
    found: int
    warnings: list[str]


def _unit(fmt: str, sources: list[str], uris: list[str], patient_id: str, safe: str, key: bytes,
          label: str | None = None) -> dict[str, Any]:
    return {"format": fmt, "sources": sources, "uris": uris, "label": label or sources[0], "patient_id": patient_id,
            "safe_source": safe, "safe_files": [safe_source(s, key, patient_id) for s in sources]}


def _plan_units(src_uri: str, cfg: IngestConfig, key: bytes) -> _Plan:
    """List SRC and group it into units of work; DICOM headers are read (in parallel) to group series."""
    import ray

    relative = storage.list_files(src_uri)
    if not relative:
        raise IngestError(f"{src_uri} holds no files: nothing to ingest")
    patient_keys, warnings = path_patients(relative, cfg.patient_pattern)

    def path_patient(rel: str) -> str:
        return SYNTHETIC_PATIENT if cfg.synthetic else formats.pseudonymize(patient_keys[rel], key)

    def path_safe(rel: str, patient_id: str) -> str:
        return rel if cfg.synthetic else safe_source(rel, key, patient_id)

    units, dicom_files, bad = [], [], []
    for rel in relative:
        uri = storage.file_uri(src_uri, rel)
        fmt = cfg.format if cfg.format != "auto" else formats.detect_format(rel, b"")
        # Any file without a known image extension may be DICOM: exports name files by UID (dots included),
        # IM0001, or *.dicom; the header read tells, and hands the others to the generic reader.
        if fmt == "dicom" or fmt is None:
            dicom_files.append({"source": rel, "uri": uri})
        else:
            patient_id = path_patient(rel)
            units.append(_unit(fmt or "auto", [rel], [uri], patient_id, path_safe(rel, patient_id), key))
    if dicom_files:
        headers = ray.data.from_items(dicom_files).map(_dicom_header_row, fn_kwargs={"key": key}).take_all()
        series: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for row in sorted(headers, key=lambda r: r["source"]):
            patient_id = SYNTHETIC_PATIENT if cfg.synthetic else row["patient_id"] or path_patient(row["source"])
            if row["reason"] is None:
                series[(patient_id, row["group"])].append(row)
            elif cfg.format == "auto" and row["reason"].startswith("not a DICOM"):
                # No extension and no DICOM magic: let the generic reader name what it is.
                units.append(_unit("auto", [row["source"]], [row["uri"]], patient_id,
                                   path_safe(row["source"], patient_id), key))
            else:
                _strict_check(cfg, path_safe(row["source"], patient_id), row["reason"])
                bad.append(_bad(path_safe(row["source"], patient_id), row["reason"], [row["source"]]))
        for (patient_id, group), files in sorted(series.items()):
            files, twins = _distinct_instances(files)
            for twin, kept in twins:
                bad.append(_bad(path_safe(twin["source"], patient_id),
                                f"same SOP instance as {path_safe(kept['source'], patient_id)} (one image exported "
                                "twice): that file is kept", [twin["source"]]))
            # 2D: every file is an image (an X-ray, or one slice); 3D: a series of single-frame files is one volume.
            for part in ([[f] for f in files] if cfg.spatial_dims == 2 else [files]):
                sources = [f["source"] for f in part]
                safe = path_safe(sources[0], patient_id) if len(part) == 1 else \
                    sources[0] if cfg.synthetic else f"{patient_id}/series-{group}"
                units.append(_unit("dicom", sources, [f["uri"] for f in part], patient_id, safe, key,
                                   label=sources[0] if len(part) == 1 else
                                   f"{posixpath.dirname(sources[0]) or '.'} (series of {len(part)} files)"))
    return _Plan(units=units, bad=bad, found=len(relative), warnings=warnings)


def _distinct_instances(files: list[dict]) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """One file per SOP instance (the first by path); the others as (twin, kept) pairs."""
    kept: dict[str, dict] = {}
    distinct, twins = [], []
    for row in files:
        if row["sop"] is not None and row["sop"] in kept:
            twins.append((row, kept[row["sop"]]))
            continue
        if row["sop"] is not None:
            kept[row["sop"]] = row
        distinct.append(row)
    return distinct, twins


def assign_splits(patient_ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Patient -> split. Every image of a patient lands in one split; deterministic for (ids, seed).

    A split asked for (fraction > 0) gets at least one patient; raises IngestError when the patients cannot fill
    train and every split asked for (the audit needs val to calibrate and test to evaluate).
    """
    patients = sorted(set(patient_ids))
    order = np.random.default_rng(seed).permutation(len(patients))
    n_val = max(1, int(round(val_fraction * len(patients)))) if val_fraction > 0 else 0
    n_test = max(1, int(round(test_fraction * len(patients)))) if test_fraction > 0 else 0
    if patients and len(patients) - n_val - n_test < 1:
        asked = ["train"] + ["val"] * bool(n_val) + ["test"] * bool(n_test)
        raise IngestError(
            f"{len(patients)} patient(s) cannot fill {', '.join(asked)} with a patient each: check the layout "
            "(patient_pattern, or the DICOM PatientID) or set val_fraction/test_fraction to 0; nothing was written")
    split_of = {}
    for rank, index in enumerate(order):
        split_of[patients[index]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return split_of


def cross_split_duplicates(sample_ids: list[str], content_hashes: list[str], splits: list[str]) -> dict[str, str]:
    """Identical images in more than one split: sample_id -> the split where the copies are kept.

    An image in train and in val scores 1.0 against itself and corrupts the threshold; one in test inflates the
    measured false-positive rate. The copies in the first split of (train, val, test) that holds one are kept.
    """
    splits_of: dict[str, set[str]] = defaultdict(set)
    for content_hash, split in zip(content_hashes, splits):
        splits_of[content_hash].add(split)
    drop = {}
    for sample_id, content_hash, split in zip(sample_ids, content_hashes, splits):
        keep = min(splits_of[content_hash], key=shards.SPLITS.index)
        if split != keep:
            drop[sample_id] = keep
    return drop


def _write_shard_batch(batch: pa.Table, dataset_uri: str, split_of: dict[str, str], image_shape: tuple[int, ...],
                       dtype: str) -> pa.Table:
    """Ray Data map_batches: write this batch's kept rows as one staged shard per split; return (split, file, rows)."""
    written = {"split": [], "file": [], "rows": []}
    by_split: dict[str, list[shards.Sample]] = defaultdict(list)
    for row in batch.to_pylist():
        split = split_of.get(row["sample_id"])
        if split is None:  # set aside after the read (an identical image kept in another split)
            continue
        image = np.frombuffer(row["image"], dtype=dtype).reshape(image_shape)
        by_split[split].append(shards.Sample(
            sample_id=row["sample_id"], patient_id=row["patient_id"], split=split, image=image,
            spacing_mm=tuple(row["spacing"]), modality=row["modality"], source=row["source"],
            content_hash=row["content_hash"]))
    for split, samples in sorted(by_split.items()):
        table = shards.samples_to_table(samples, image_shape, dtype)
        name = shards.shard_name(table)
        shards.write_table(storage.join(dataset_uri, STAGING, split, name), table)
        written["split"].append(split)
        written["file"].append(name)
        written["rows"].append(table.num_rows)
    return pa.table(written, schema=pa.schema([("split", pa.string()), ("file", pa.string()), ("rows", pa.int64())]))


def prepare_destination(dataset_uri: str) -> None:
    """Refuse a committed dataset or a foreign folder; clear what an interrupted ingest left there."""
    if storage.exists(storage.join(dataset_uri, shards.MANIFEST)):
        raise IngestError(f"{dataset_uri} already holds a committed dataset; choose a new destination")
    if not storage.exists(dataset_uri):
        return
    left = storage.list_files(dataset_uri)
    foreign = [rel for rel in left if rel.split("/")[0] not in _DATASET_ENTRIES]
    if foreign:
        raise IngestError(f"{dataset_uri} holds {len(foreign)} file(s) that are not part of a raymem dataset "
                          "(e.g. the first one by name is not a shard): choose an empty or new destination")
    if left:
        log.warning("ingest: removing %d file(s) an interrupted ingest left in %s", len(left), dataset_uri)
        for entry in _DATASET_ENTRIES:
            storage.delete(storage.join(dataset_uri, entry))


def _fail_without_images(plan_found: int, bad: list[dict]) -> IngestError:
    reasons = Counter(row["reason"] for row in bad).most_common(3)
    listed = "; ".join(f"{count} x {reason}" for reason, count in reasons)
    return IngestError(f"no usable image among {plan_found} file(s), nothing was written: {listed}")


def ingest(src_uri: str, dataset_uri: str, cfg: IngestConfig, *, owner_report: str | None = None) -> IngestSummary:
    """Ingest every file under ``src_uri`` into a dataset at ``dataset_uri`` (manifest written last).

    owner_report: a local path or URI outside the dataset for a CSV of every input file's raw path, outcome and
        reason (the only place raw paths are written: it stays with the data owner).
    Needs a running Ray (``ray.init``) or starts a local one.
    """
    src_uri, dataset_uri = storage.absolute(src_uri), storage.absolute(dataset_uri)
    if owner_report is not None:
        owner_report = storage.absolute(owner_report)
        if owner_report.rstrip("/").startswith(dataset_uri.rstrip("/") + "/"):
            raise IngestError(f"--owner-report {owner_report} lies inside the dataset: it holds raw paths, which "
                              "must never reach the dataset; write it elsewhere")
    prepare_destination(dataset_uri)
    key, key_from_env = formats.pseudonym_key_from_env()
    try:
        plan = _plan_units(src_uri, cfg, key)
        log.info("ingest: %d files, %d units of work (%d set aside while grouping DICOM series)", plan.found,
                 len(plan.units), len(plan.bad))
        processed = _read_units(plan.units, cfg, key) if plan.units else None
    except StrictStop as err:
        # The path is PHI: it goes to the owner's report only, never to the terminal or a log.
        if owner_report is None:
            raise StrictStop(f"{err}; rerun with --owner-report PATH to see its path") from None
        _write_owner_report(owner_report, [], [_bad(safe_source(rel, key, None), "not read: --strict stopped the "
                                                    "ingest", [rel]) for rel in storage.list_files(src_uri)])
        raise StrictStop(f"{err}; {owner_report} maps sources to paths") from None
    meta = _collect_meta(processed)
    bad = plan.bad + meta.filter(pc.equal(meta["kind"], "bad")).drop_columns(["image", "spacing"]).to_pylist() \
        if meta.num_rows else list(plan.bad)
    good = meta.filter(pc.equal(meta["kind"], "sample")) if meta.num_rows else meta
    if good.num_rows == 0:
        _write_owner_report(owner_report, [], bad)
        raise _fail_without_images(plan.found, bad)

    # Splits by patient; MedMNIST carries its own split per image.
    hints, patient_ids = good["split_hint"].to_pylist(), good["patient_id"].to_pylist()
    sample_ids, hashes = good["sample_id"].to_pylist(), good["content_hash"].to_pylist()
    if len(set(sample_ids)) != len(sample_ids):
        raise IngestError("two inputs produced the same sample id; report this with the input layout")
    unhinted = [p for p, h in zip(patient_ids, hints) if h is None]
    patient_split = assign_splits(unhinted, 0.0 if cfg.synthetic else cfg.val_fraction,
                                  0.0 if cfg.synthetic else cfg.test_fraction, cfg.seed)
    splits = [hint if hint is not None else patient_split[pid] for pid, hint in zip(patient_ids, hints)]
    dropped = cross_split_duplicates(sample_ids, hashes, splits)
    rows = good.drop_columns(["image", "spacing"]).to_pylist()
    for row, split in zip(rows, splits):
        row["split"] = split
        if row["sample_id"] in dropped:
            reason = f"identical to an image kept in the {dropped[row['sample_id']]} split (an image in two " \
                     "splits corrupts the threshold)"
            bad += [_bad(row["source"], reason, [f]) for f in row["files"]]
    kept = [row for row in rows if row["sample_id"] not in dropped]
    split_of = {row["sample_id"]: row["split"] for row in kept}
    warnings = plan.warnings + ([] if cfg.synthetic else layout_warnings([r["patient_id"] for r in kept]))
    for warning in warnings:
        log.warning("ingest: %s", warning)

    image_shape = (1, *cfg.size)
    writer = processed.filter(lambda row: row["kind"] == "sample").map_batches(
        _write_shard_batch, batch_format="pyarrow", batch_size=shards.rows_per_row_group(image_shape, cfg.dtype),
        fn_kwargs={"dataset_uri": dataset_uri, "split_of": split_of, "image_shape": image_shape, "dtype": cfg.dtype})
    written = writer.take_all()
    _write_owner_report(owner_report, kept, bad)
    return _commit(dataset_uri, cfg, image_shape, samples=kept, written=written, bad=bad, found=plan.found,
                   pseudonym_key="env" if key_from_env else "random", warnings=warnings,
                   extra={"duplicates_across_splits": len(dropped)}, owner_report=owner_report)


def _read_units(units: list[dict], cfg: IngestConfig, key: bytes):
    """The units read, validated and normalised by Ray Data, materialised (the write reads them again)."""
    import ray

    # Enough blocks to keep every CPU busy, few enough that per-task overhead stays small next to ~1 ms per image.
    # Ordered: the shards hold the same rows in the same (sorted path) order in every run.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n_blocks = min(len(units), max(4 * cpus, len(units) // 256))
    processed = ordered(ray.data.from_items(units, override_num_blocks=n_blocks)).map_batches(
        _process_units, batch_format="pyarrow", batch_size=None, fn_kwargs={"cfg": cfg, "key": key})
    try:
        return processed.materialize()
    except Exception as err:  # Ray wraps a worker's IngestError: surface the file and reason only
        message = str(err)
        for error_class in (StrictStop, IngestError):
            marker = f"{error_class.__name__}: "
            if marker in message:
                raise error_class(message[message.rindex(marker) + len(marker):].strip().splitlines()[0]) from None
        raise


def _collect_meta(processed) -> pa.Table:
    """The small columns of every processed row, on the driver."""
    import ray

    empty = _ROW_SCHEMA.empty_table()
    if processed is None:
        return empty
    refs = processed.select_columns(_META_COLUMNS).to_arrow_refs()
    tables = [ray.get(ref) for ref in refs]
    tables = [t.select(_META_COLUMNS) for t in tables if t.num_rows]
    if not tables:
        return empty
    meta = pa.concat_tables(tables)
    return meta.append_column("image", pa.nulls(meta.num_rows, pa.binary())).append_column(
        "spacing", pa.nulls(meta.num_rows, pa.list_(pa.float64())))


def _write_owner_report(uri: str | None, kept: list[dict], bad: list[dict]) -> None:
    """CSV for the data owner: path (raw, relative to SRC), outcome, reason, source, sample_id, split."""
    if uri is None:
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "outcome", "reason", "source", "sample_id", "split"])
    records = [(f, "ingested", "", row["source"], row["sample_id"], row["split"]) for row in kept for f in row["files"]]
    records += [(f, "set aside", row["reason"], row["source"], "", "") for row in bad for f in row["files"]]
    writer.writerows(sorted(records))
    storage.write_bytes(uri, buffer.getvalue().encode())
    log.info("ingest: owner report (raw paths, keep it private) written to %s", uri)


def _commit(dataset_uri: str, cfg: IngestConfig, image_shape: tuple[int, ...], *, samples: list[dict],
            written: list[dict], bad: list[dict], found: int, pseudonym_key: str, warnings: list[str] = (),
            extra: dict | None = None, owner_report: str | None = None) -> IngestSummary:
    """After every shard is staged: move them into place, write duplicates and quarantine, then the manifest.

    samples: one dict per kept sample with sample_id, patient_id, split, content_hash, modality, files.
    """
    assert sum(w["rows"] for w in written) == len(samples), "every kept sample is in exactly one shard"
    files_in_images = {f for row in samples for f in row["files"]}
    files_set_aside = {f for row in bad for f in row["files"]} - files_in_images
    assert len(files_in_images) + len(files_set_aside) == found, \
        (found, len(files_in_images), len(files_set_aside))
    for w in written:
        storage.move(storage.join(dataset_uri, STAGING, w["split"], w["file"]),
                     storage.join(dataset_uri, w["split"], w["file"]))
    storage.delete(storage.join(dataset_uri, STAGING))

    counts = Counter(row["content_hash"] for row in samples)
    duplicate_rows = [{"sample_id": row["sample_id"], "content_hash": row["content_hash"]} for row in samples
                      if counts[row["content_hash"]] > 1]
    shards.write_table(storage.join(dataset_uri, shards.DUPLICATES), pa.Table.from_pylist(
        duplicate_rows, schema=pa.schema([("sample_id", pa.string()), ("content_hash", pa.string())])))
    shards.write_table(storage.join(dataset_uri, shards.QUARANTINE), pa.Table.from_pylist(
        [{"source": row["source"], "reason": row["reason"], "level": row["level"]} for row in bad],
        schema=shards.QUARANTINE_SCHEMA))

    split_summary: dict[str, dict[str, Any]] = {}
    for split in shards.SPLITS:
        members = [row for row in samples if row["split"] == split]
        split_summary[split] = {"images": len(members), "patients": len({row["patient_id"] for row in members}),
                                "files": sorted(w["file"] for w in written if w["split"] == split)}
    reasons = Counter(row["reason"] for row in bad)
    files = {"found": found, "ingested": len(files_in_images), "set_aside": len(files_set_aside)}
    manifest = {
        "format_version": 2,
        "found": found, "ingested": len(samples), "quarantined": len(bad), "files": files,
        "duplicates": len(duplicate_rows),
        "splits": split_summary,
        "image_shape": list(image_shape), "dtype": cfg.dtype, "spatial_dims": cfg.spatial_dims,
        "intensity_range": list(cfg.intensity_range),
        "modalities": sorted({row["modality"] for row in samples}),
        "pseudonym_key": pseudonym_key,
        "warnings": list(warnings),
        "config": cfg.model_dump(mode="json"),
        **(extra or {}),
    }
    shards.write_manifest(dataset_uri, manifest)
    return IngestSummary(dataset_uri=dataset_uri, found=found, ingested=len(samples), quarantined=len(bad),
                         duplicates=len(duplicate_rows),
                         splits={k: {"images": v["images"], "patients": v["patients"]} for k, v in split_summary.items()},
                         image_shape=image_shape, quarantine_reasons=dict(reasons), files=files,
                         warnings=list(warnings), owner_report=owner_report)


def write_dataset(dataset_uri: str, samples: Iterable[shards.Sample], cfg: IngestConfig,
                  image_shape: tuple[int, ...], *, pseudonym_key: str, extra: dict | None = None) -> IngestSummary:
    """Write samples (already shaped and normalised, splits set) as a committed dataset, streaming shard by shard.

    Each sample counts as one input file (its source).
    """
    prepare_destination(dataset_uri)
    pending: dict[str, list[shards.Sample]] = defaultdict(list)
    written, metas = [], []
    per_shard = shards.rows_per_row_group(image_shape, cfg.dtype)

    def flush(split: str) -> None:
        table = shards.samples_to_table(pending.pop(split), image_shape, cfg.dtype)
        name = shards.shard_name(table)
        shards.write_table(storage.join(dataset_uri, STAGING, split, name), table)
        written.append({"split": split, "file": name, "rows": table.num_rows})

    for sample in samples:
        pending[sample.split].append(sample)
        metas.append({"sample_id": sample.sample_id, "patient_id": sample.patient_id, "split": sample.split,
                      "content_hash": sample.content_hash, "modality": sample.modality, "files": [sample.sample_id]})
        if len(pending[sample.split]) >= per_shard:
            flush(sample.split)
    for split in list(pending):
        flush(split)
    return _commit(dataset_uri, cfg, image_shape, samples=metas, written=written, bad=[], found=len(metas),
                   pseudonym_key=pseudonym_key, extra=extra)


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
