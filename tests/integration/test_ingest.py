"""Ingest end to end on a real local Ray cluster: bad-input corpus, PHI, patient splits, S3, streaming."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raymem import config, storage
from raymem.data import phantoms, shards
from raymem.data.ingest import IngestError, ingest

pytestmark = pytest.mark.slow


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _nifti_bytes(array: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, np.eye(4)).to_bytes())


def _good_images(root: Path, patients: int = 6, per_patient: int = 2) -> int:
    rng = np.random.default_rng(0)
    for p in range(patients):
        for k in range(per_patient):
            _png(root / f"patient{p:02d}" / f"img{k}.png", rng.integers(0, 65535, (40, 48), dtype=np.uint16))
    return patients * per_patient


def _bad_corpus(root: Path) -> dict[str, str]:
    """Twelve kinds of bad file; returns {relative path: expected reason fragment}."""
    bad = root / "bad"
    bad.mkdir(parents=True)
    rng = np.random.default_rng(1)
    volume = rng.random((16, 16, 8)).astype(np.float32)
    (bad / "truncated.nii.gz").write_bytes(_nifti_bytes(volume)[:300])
    (bad / "notes.png").write_text("this is not an image\n")
    (bad / "empty.png").write_bytes(b"")
    nan = rng.random((32, 32)).astype(np.float32)
    nan[3, 4] = np.nan
    (bad / "nan.nii.gz").write_bytes(_nifti_bytes(nan))
    inf = rng.random((32, 32)).astype(np.float32)
    inf[0, 0] = np.inf
    (bad / "inf.nii.gz").write_bytes(_nifti_bytes(inf))
    _png(bad / "constant.png", np.full((32, 32), 7, dtype=np.uint8))
    (bad / "volume.nii.gz").write_bytes(_nifti_bytes(volume))  # 3D where 2D was asked for
    (bad / "huge.nii.gz").write_bytes(_nifti_bytes(rng.random((300, 300)).astype(np.float32)))  # > max_voxels
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(png, format="PNG")
    (bad / "cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (bad / "random.dcm").write_bytes(rng.bytes(2048))
    (bad / "labels.npz").write_bytes(b"PK\x03\x04 broken zip")
    _dicom_without_pixels(bad / "nopixels.dcm")
    return {
        "bad/truncated.nii.gz": "gzip", "bad/notes.png": "not an image", "bad/empty.png": "empty",
        "bad/nan.nii.gz": "NaN", "bad/inf.nii.gz": "Inf", "bad/constant.png": "constant",
        "bad/volume.nii.gz": "2D images are expected", "bad/huge.nii.gz": "max_voxels", "bad/cut.png": "not an image",
        "bad/random.dcm": "not a DICOM", "bad/labels.npz": "MedMNIST", "bad/nopixels.dcm": "without pixel data",
    }


def _dicom_without_pixels(path: Path) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.PatientID = "NOPIX-1"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


def test_bad_inputs_are_quarantined_with_reasons_and_counts_conserved(ray_cluster, tmp_path):
    src = tmp_path / "src"
    n_good = _good_images(src)
    _png(src / "patient00" / "copy.png", np.asarray(Image.open(src / "patient00" / "img0.png")))  # exact duplicate
    expected_bad = _bad_corpus(src)
    cfg = config.validate(config.IngestConfig, {"spatial_dims": 2, "size": (32, 32), "max_voxels": 200 * 200})

    summary = ingest(str(src), str(tmp_path / "ds"), cfg, owner_report=str(tmp_path / "owner.csv"))

    quarantine = pq.read_table(tmp_path / "ds" / shards.QUARANTINE).to_pylist()
    owner = list(csv.DictReader((tmp_path / "owner.csv").open()))
    reasons = {row["path"]: row["reason"] for row in owner if row["outcome"] == "set aside"}
    manifest = shards.read_manifest(str(tmp_path / "ds"))
    duplicates = pq.read_table(tmp_path / "ds" / shards.DUPLICATES)
    assert set(reasons) == set(expected_bad)
    assert all(fragment.lower() in reasons[src_].lower() for src_, fragment in expected_bad.items())
    assert sorted(row["reason"] for row in quarantine) == sorted(reasons.values())
    assert (summary.ingested, summary.quarantined) == (n_good + 1, len(expected_bad))
    assert manifest["files"] == {"found": n_good + 1 + len(expected_bad), "ingested": n_good + 1,
                                 "set_aside": len(expected_bad)}
    assert duplicates.num_rows == 2 and manifest["duplicates"] == 2


def test_strict_stops_at_the_first_bad_file_naming_it_without_its_path(ray_cluster, tmp_path):
    src, report = tmp_path / "src", tmp_path / "owner.csv"
    _good_images(src, patients=2, per_patient=1)
    (src / "Doe-John-broken.png").write_text("not a png")
    cfg = config.validate(config.IngestConfig, {"size": (32, 32), "strict": True})

    with pytest.raises(IngestError, match=r"f-[0-9a-f]{16}\.png: not an image") as stopped:
        ingest(str(src), str(tmp_path / "ds"), cfg, owner_report=str(report))
    named = re.search(r"f-[0-9a-f]{16}", str(stopped.value)).group()
    paths = [row["path"] for row in csv.DictReader(report.open()) if named in row["source"]]
    assert "Doe" not in str(stopped.value) and paths == ["Doe-John-broken.png"]
    assert not (tmp_path / "ds" / shards.MANIFEST).exists()


def test_no_patient_is_in_two_splits_and_splits_repeat_for_a_seed(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYMEM_PSEUDONYM_KEY", "a-fixed-study-key")
    src = tmp_path / "src"
    _good_images(src, patients=20, per_patient=3)
    cfg = config.validate(config.IngestConfig, {"size": (16, 16), "val_fraction": 0.2, "test_fraction": 0.2})

    ingest(str(src), str(tmp_path / "a"), cfg)
    ingest(str(src), str(tmp_path / "b"), cfg)

    def patients_by_split(root: Path) -> dict[str, set[str]]:
        return {split: set(shards.load_split(str(root), split, ["patient_id"])["patient_id"].to_pylist())
                for split in shards.SPLITS}

    a, b = patients_by_split(tmp_path / "a"), patients_by_split(tmp_path / "b")
    assert a == b
    assert not (a["train"] & a["val"] or a["train"] & a["test"] or a["val"] & a["test"])


def test_dicom_phi_and_phi_in_paths_never_reach_outputs_or_logs(ray_cluster, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "ds"
    phantoms.write_files(str(src), "ct3d", patients=3, images_per_patient=1, size=16, seed=7, file_format="dicom",
                         progress=False)
    phi = _phi_strings(src)
    assert phi, "the phantom DICOM files must carry PHI for this test to mean anything"
    # Folder and file names as exports write them: names and dates.
    for k, folder in enumerate(sorted(src.iterdir())):
        folder.rename(src / f"Doe-John{k}_1970-01-0{k + 1}")
    (src / "Doe-John0_1970-01-01" / "Roe-Jane_1980-02-02_letter.png").write_text("not an image")
    phi |= {f"Doe-John{k}" for k in range(3)} | {"1970-01-01", "Roe-Jane", "1980-02-02"}

    ray_tmp = Path(tempfile.mkdtemp(prefix="rayphi"))  # short: Ray's socket paths must fit 107 bytes
    result = subprocess.run(
        [sys.executable, "-m", "raymem.cli", "-v", "ingest", str(src), str(dst), "--spatial-dims", "3",
         "--size", "16"], capture_output=True, text=True,
        env={**_env(), "RAYMEM_PSEUDONYM_KEY": "k", "RAY_TMPDIR": str(ray_tmp)})

    assert result.returncode == 0, result.stderr[-2000:]
    outputs = b"".join(p.read_bytes() for p in dst.rglob("*") if p.is_file())
    outputs += _decompressed_parquet_text(dst)
    ray_logs = [p for p in ray_tmp.rglob("logs/*") if p.is_file() and p.suffix in (".out", ".err", ".log")]
    assert ray_logs, "the Ray session's worker logs should be searched too"
    logs = (result.stdout + result.stderr).encode() + b"".join(p.read_bytes() for p in ray_logs)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    leaked = [s for s in phi if s.encode() in outputs or s.encode() in logs]
    assert leaked == []


def _phi_strings(src: Path) -> set[str]:
    import pydicom

    found = set()
    for path in src.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "StudyDate",
                        "SeriesInstanceUID", "StudyInstanceUID"):
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 4:
                found.add(value)
    return found


def _decompressed_parquet_text(root: Path) -> bytes:
    """Parquet pages are compressed: also search the decoded string columns."""
    text = []
    for path in root.rglob("*.parquet"):
        table = pq.read_table(path)
        for name in table.column_names:
            if table.schema.field(name).type in (pa.string(), pa.large_string()):
                text.extend(str(v) for v in table.column(name).to_pylist())
    return "\n".join(text).encode()


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}


def test_ingest_from_and_to_s3_then_stream_through_ray_data(ray_cluster, s3_bucket, tmp_path):
    local = tmp_path / "src"
    n_good = _good_images(local, patients=8, per_patient=2)
    src = f"{s3_bucket}/raw"
    for path in local.rglob("*.png"):
        storage.write_bytes(f"{src}/{path.relative_to(local).as_posix()}", path.read_bytes())
    dst = f"{s3_bucket}/datasets/pngs"
    cfg = config.validate(config.IngestConfig, {"size": (24, 24), "val_fraction": 0.25, "test_fraction": 0.0})

    ingest(src, dst, cfg)
    from raymem.data.stream import open_split

    manifest = json.loads(storage.read_bytes(f"{dst}/manifest.json"))
    ds = open_split(dst, "train", augment=config.AugmentConfig())
    batches = list(ds.iter_torch_batches(batch_size=4, dtypes=None))
    streamed = sum(len(b["image"]) for b in batches)
    assert streamed == manifest["splits"]["train"]["images"] > 0
    assert tuple(batches[0]["image"].shape[1:]) == (1, 24, 24)
    assert manifest["ingested"] == n_good


def test_reader_refuses_a_dataset_without_manifest(tmp_path):
    (tmp_path / "ds" / "train").mkdir(parents=True)

    with pytest.raises(shards.DatasetError, match="no manifest.json"):
        shards.read_manifest(str(tmp_path / "ds"))


def test_streamed_images_are_the_stored_ones_in_stored_order_with_or_without_ids(ray_cluster, tmp_path,
                                                                                  monkeypatch):
    # open_split reads sample_id only where it is used; every path must give the stored images, in stored order.
    from raymem.data.ingest import phantom_dataset
    from raymem.data.stream import open_split

    monkeypatch.setattr(shards, "TARGET_ROW_GROUP_BYTES", 32 * 16 * 16 * 2)  # 32 float16 16x16 images per shard
    dataset = str(tmp_path / "ds")
    phantom_dataset(dataset, "xray2d", patients=30, images_per_patient=3, size=16, seed=4,
                    cfg=config.IngestConfig(spatial_dims=2, size=(16, 16), val_fraction=0.0, test_fraction=0.0))
    stored = [batch for batch in shards.iter_split(dataset, "train", ["sample_id", "image"])]
    ids = [sample_id for batch in stored for sample_id in batch.column("sample_id").to_pylist()]
    images = np.concatenate([shards.images_of(batch).astype(np.float32) for batch in stored])
    subset = ids[5:70:3]

    def streamed(**options) -> dict[str, np.ndarray]:
        batches = list(open_split(dataset, "train", **options).iter_batches(batch_size=16, batch_format="numpy"))
        return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}

    images_only = streamed()
    with_ids = streamed(columns=("image", "sample_id"))
    of_subset = streamed(columns=("image", "sample_id"), sample_ids=subset)

    assert len(shards.split_files(dataset, "train")) > 1  # several shards: order across files is checked too
    assert set(images_only) == {"image"} and images_only["image"].dtype == np.float32
    np.testing.assert_array_equal(images_only["image"], images)
    np.testing.assert_array_equal(with_ids["image"], images)
    assert list(with_ids["sample_id"]) == ids
    assert list(of_subset["sample_id"]) == subset
    np.testing.assert_array_equal(of_subset["image"], images[[ids.index(i) for i in subset]])
