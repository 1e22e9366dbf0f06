"""Ingest of data as hospitals hand it over, on a real local Ray cluster: real encoded DICOM, PHI in file and
folder names, nested layouts, duplicates across splits, symlink loops, interrupted ingests."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from raymem import config, storage
from raymem.data import phantoms, shards
from raymem.data.ingest import IngestError, ingest

pytestmark = pytest.mark.slow

NAMES = ["Doe-John", "Roe-Jane", "Smith-Anna", "Meier-Paul", "Rossi-Luca", "Dupont-Marie", "Kowalski-Jan",
         "Silva-Ana", "Nakamura-Yui", "Okafor-Chidi", "Larsen-Ida", "Novak-Petr"]


@pytest.fixture(autouse=True)
def _fixed_key(monkeypatch):
    monkeypatch.setenv("RAYMEM_PSEUDONYM_KEY", "clinical-test-key")


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _random_image(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 65535, (40, 48), dtype=np.uint16)


def _cfg(**values) -> config.IngestConfig:
    return config.validate(config.IngestConfig, {"size": (16, 16), **values})


def _dataset_strings(root: Path) -> str:
    """Everything a dataset folder says in text: file names, raw bytes, and the decoded Parquet string columns."""
    text = [str(p.relative_to(root)) for p in root.rglob("*")]
    for path in root.rglob("*"):
        if path.is_file() and path.suffix != ".parquet":
            text.append(path.read_text(errors="replace"))
    for path in root.rglob("*.parquet"):
        table = pq.read_table(path)
        for name in table.column_names:
            if table.schema.field(name).type in (pa.string(), pa.large_string()):
                text.extend(str(v) for v in table.column(name).to_pylist())
    return "\n".join(text)


def _owner_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_no_original_path_component_reaches_the_dataset_and_the_owner_report_keeps_them(ray_cluster, tmp_path):
    src, dst, report = tmp_path / "src", tmp_path / "ds", tmp_path / "private" / "owner.csv"
    rng = np.random.default_rng(0)
    for k, name in enumerate(NAMES):
        _png(src / f"{name}-1970-01-{k + 1:02d}" / f"{name}-1970-01-{k + 1:02d}_chest_0.png", _random_image(rng))
    (src / "Doe-John-1970-01-01" / "Doe-John_referral_letter.png").write_text("not an image")
    raw_components = {part for p in src.rglob("*") for part in re.split(r"[/_.]", str(p.relative_to(src)))
                      if len(part) > 3 and part not in ("chest", "png")}

    summary = ingest(str(src), str(dst), _cfg(), owner_report=str(report))

    text = _dataset_strings(dst)
    leaked = sorted(part for part in raw_components if part in text)
    owner = _owner_rows(report)
    outcome = {row["path"]: row["outcome"] for row in owner}
    assert leaked == []
    assert outcome == {**{str(p.relative_to(src)): "ingested" for p in src.rglob("*chest_0.png")},
                       "Doe-John-1970-01-01/Doe-John_referral_letter.png": "set aside"}
    assert summary.files == {"found": 13, "ingested": 12, "set_aside": 1}


def test_an_owner_report_inside_the_dataset_is_refused_before_anything_is_written(ray_cluster, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "ds"
    _png(src / "a" / "x.png", _random_image(np.random.default_rng(1)))

    with pytest.raises(IngestError, match="inside the dataset"):
        ingest(str(src), str(dst), _cfg(), owner_report=str(dst / "owner.csv"))
    assert not dst.exists()


def test_a_patient_study_series_layout_finds_every_patient(ray_cluster, tmp_path):
    src, dst = tmp_path / "export", tmp_path / "ds"
    rng = np.random.default_rng(2)
    for name in NAMES[:10]:
        for k in range(2):
            _png(src / "PACS_EXPORT" / name / "CT_CHEST_2020" / "series-001" / f"img{k}.png", _random_image(rng))

    summary = ingest(str(src), str(dst), _cfg(val_fraction=0.2, test_fraction=0.2))

    patients = {split: counts["patients"] for split, counts in summary.splits.items()}
    assert patients == {"train": 6, "val": 2, "test": 2}
    assert summary.warnings == []


def test_a_layout_with_too_few_patients_is_refused_and_nothing_is_written(ray_cluster, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "ds"
    rng = np.random.default_rng(3)
    for k in range(8):
        _png(src / "ward" / f"img{k}.png", _random_image(rng))  # every image in one folder: one patient

    with pytest.raises(IngestError, match=r"1 patient\(s\) cannot fill train, val, test"):
        ingest(str(src), str(dst), _cfg(val_fraction=0.1, test_fraction=0.1))
    assert not dst.exists() or storage.list_files(str(dst)) == []


def test_an_image_in_two_splits_is_kept_in_train_only(ray_cluster, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "ds"
    rng = np.random.default_rng(4)
    shared = _random_image(rng)
    for name in NAMES:
        _png(src / name / "own.png", _random_image(rng))
        _png(src / name / "template.png", shared)  # the same image exported for every patient

    summary = ingest(str(src), str(dst), _cfg(val_fraction=0.25, test_fraction=0.25))

    splits_of_hash: dict[str, set[str]] = {}
    for split in shards.SPLITS:
        for h in shards.load_split(str(dst), split, ["content_hash"])["content_hash"].to_pylist():
            splits_of_hash.setdefault(h, set()).add(split)
    quarantine = pq.read_table(dst / shards.QUARANTINE).to_pylist()
    held_out = summary.splits["val"]["patients"] + summary.splits["test"]["patients"]
    assert all(len(s) == 1 for s in splits_of_hash.values())
    assert sum("kept in the train split" in row["reason"] for row in quarantine) == held_out == 6
    assert summary.files == {"found": 24, "ingested": 18, "set_aside": 6}


def test_a_directory_symlink_loop_counts_each_real_file_once(ray_cluster, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "ds"
    rng = np.random.default_rng(5)
    _png(src / "p1" / "a.png", _random_image(rng))
    _png(src / "p2" / "b.png", _random_image(rng))
    os.symlink(src, src / "p1" / "loop")
    os.symlink(src / "p2", src / "p2-again")

    summary = ingest(str(src), str(dst), _cfg(val_fraction=0.0, test_fraction=0.0))

    assert (summary.found, summary.ingested) == (2, 2)


def test_a_rerun_after_a_killed_ingest_removes_what_it_left(ray_cluster, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "ds"
    rng = np.random.default_rng(6)
    for name in NAMES[:6]:
        _png(src / name / "img.png", _random_image(rng))
    # What a kill leaves: staged shards, and (from a layout before staging) a shard in a split folder; no manifest.
    (dst / "_staging" / "train").mkdir(parents=True)
    (dst / "_staging" / "train" / "part-0123456789abcdef.parquet").write_bytes(b"partial")
    (dst / "train").mkdir()
    shutil.copy(dst / "_staging" / "train" / "part-0123456789abcdef.parquet", dst / "train" / "part-orphan.parquet")

    summary = ingest(str(src), str(dst), _cfg(val_fraction=0.2, test_fraction=0.2))

    rows = pq.read_table(dst / "train").num_rows  # plain pyarrow, as a user would read the folder
    assert rows == summary.splits["train"]["images"] > 0
    assert not (dst / "_staging").exists()


def test_a_destination_holding_other_files_is_refused(ray_cluster, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "home"
    _png(src / "a" / "x.png", _random_image(np.random.default_rng(7)))
    dst.mkdir()
    (dst / "thesis.docx").write_text("keep me")

    with pytest.raises(IngestError, match="not part of a raymem dataset"):
        ingest(str(src), str(dst), _cfg(val_fraction=0.0, test_fraction=0.0))
    assert (dst / "thesis.docx").read_text() == "keep me"


def test_a_folder_of_only_bad_files_fails_and_writes_nothing(ray_cluster, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "ds"
    for k in range(3):
        (src / f"p{k}").mkdir(parents=True)
        (src / f"p{k}" / "scan.png").write_text("not an image")

    with pytest.raises(IngestError, match=r"no usable image among 3 file\(s\).*3 x not an image"):
        ingest(str(src), str(dst), _cfg())
    assert not (dst / shards.MANIFEST).exists()


# Real encoded DICOM from pydicom's and pydicom-data's test files: one per transfer syntax, each with its own SOP
# instance (2D ingest: every file is an image).
REAL_DICOM = {
    "CT_small.dcm": "1.2.840.10008.1.2.1",  # explicit VR little endian
    "JPGExtended.dcm": "1.2.840.10008.1.2.4.51",  # JPEG extended, 12-bit
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG baseline, YBR_FULL colour
    "JPEG-LL.dcm": "1.2.840.10008.1.2.4.70",  # JPEG lossless, process 14 SV1
    "JPEGLSNearLossless_16.dcm": "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "emri_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless (multi-frame: 3D only)
    "MR2_J2KR.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "RG1_J2KI.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000, a CR with PixelSpacing 0\0 and MONOCHROME1
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE lossless
}


def _real_dicom(name: str) -> Path:
    import data_store

    bundled = get_testdata_file(name)
    return Path(bundled) if bundled else Path(data_store.__file__).parent / "data" / name


def test_real_encoded_dicom_of_every_transfer_syntax_is_ingested(ray_cluster, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "ds"
    for k, (name, syntax) in enumerate(REAL_DICOM.items()):
        path = _real_dicom(name)
        assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax, name
        (src / f"folder{k}").mkdir(parents=True)
        shutil.copy(path, src / f"folder{k}" / name)

    summary = ingest(str(src), str(dst), _cfg(val_fraction=0.0, test_fraction=0.0))

    quarantine = pq.read_table(dst / shards.QUARANTINE).to_pylist()
    assert [row["reason"] for row in quarantine] == ["multi-frame DICOM (10 frames) where 2D images are expected: "
                                                     "ingest it with spatial_dims=3"]
    assert summary.ingested == len(REAL_DICOM) - 1


def test_one_image_exported_in_several_encodings_is_kept_once(ray_cluster, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "ds"
    twins = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
    for name in twins:  # one SOP instance, four transfer syntaxes
        (src / name.removesuffix(".dcm")).mkdir(parents=True)
        shutil.copy(get_testdata_file(name), src / name.removesuffix(".dcm") / name)

    summary = ingest(str(src), str(dst), _cfg(val_fraction=0.0, test_fraction=0.0))

    reasons = [row["reason"] for row in pq.read_table(dst / shards.QUARANTINE).to_pylist()]
    assert summary.ingested == 1
    assert len(reasons) == 3 and all("same SOP instance as" in r and "that file is kept" in r for r in reasons)


def _set_uid(folder: Path, keyword: str, value: str) -> None:
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        setattr(ds, keyword, value)
        ds.save_as(path)


def test_series_are_grouped_by_patient_study_and_series_and_counted_per_file(ray_cluster, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "ds"
    phantoms.write_files(str(src), "ct3d", patients=3, images_per_patient=1, size=16, seed=3, file_format="dicom",
                         progress=False)
    folders = sorted(p for p in src.iterdir())
    # Two patients' series share a SeriesInstanceUID (a PACS that reuses UIDs); the third has a slice of another shape.
    _set_uid(folders[1], "SeriesInstanceUID", pydicom.dcmread(next(folders[0].rglob("*.dcm"))).SeriesInstanceUID)
    slices = sorted(folders[2].rglob("*.dcm"))
    odd = pydicom.dcmread(slices[3])
    odd.Rows, odd.Columns = 4, 4
    odd.PixelData = np.zeros((4, 4), dtype=odd.pixel_array.dtype).tobytes()
    odd.save_as(slices[3])

    summary = ingest(str(src), str(dst), _cfg(spatial_dims=3, size=(8, 8, 8), val_fraction=0.0,
                                              test_fraction=0.0))

    quarantine = pq.read_table(dst / shards.QUARANTINE).to_pylist()
    n_files = sum(1 for _ in src.rglob("*.dcm"))
    assert summary.ingested == 2
    assert len(quarantine) == len(slices) and len({row["source"] for row in quarantine}) == len(slices)
    assert summary.files == {"found": n_files, "ingested": n_files - len(slices), "set_aside": len(slices)}


def test_files_named_by_uid_without_extension_are_grouped_into_their_series(ray_cluster, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "ds"
    phantoms.write_files(str(src), "ct3d", patients=2, images_per_patient=1, size=16, seed=4, file_format="dicom",
                         progress=False)
    for path in src.rglob("*.dcm"):  # as PACS exports name them: the SOP Instance UID, dots and no extension
        path.rename(path.with_name(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)))

    summary = ingest(str(src), str(dst), _cfg(spatial_dims=3, size=(8, 8, 8), val_fraction=0.0,
                                              test_fraction=0.0))

    assert (summary.ingested, summary.quarantined) == (2, 0)
