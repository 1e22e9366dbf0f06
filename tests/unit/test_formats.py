"""Readers, validation and de-identification on real files shipped with pydicom/nibabel and on files built here."""

import gzip
import io
import logging
import logging.handlers
import math
import random
import re
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as nibabel_data_path
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)

from raymem.data.formats import (
    BadInputError,
    RawImage,
    content_hash,
    detect_format,
    patient_key_from_path,
    pseudonym_key_from_env,
    pseudonymize,
    read_dicom_header,
    read_dicom_series,
    read_medmnist,
    read_nifti,
    read_png,
    validate,
)


def pydicom_file(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def nibabel_file(name: str) -> bytes:
    return (Path(nibabel_data_path) / name).read_bytes()


def png_bytes(pixels: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def ct_slice(
    stored_value: int,
    *,
    position_z_mm: float | None,
    instance_number: int = 1,
    rows: int = 4,
    photometric: str = "MONOCHROME2",
    with_pixels: bool = True,
) -> bytes:
    """A one-slice axial CT file, every pixel ``stored_value``, HU = stored - 1024."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = CTImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    dataset.Modality = "CT"
    dataset.PatientID = "SECRET-PATIENT-42"
    dataset.PatientName = "Doe^Jane"
    dataset.InstanceNumber = instance_number
    if position_z_mm is not None:
        dataset.ImagePositionPatient = [0.0, 0.0, position_z_mm]
        dataset.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    dataset.PixelSpacing = [0.7, 0.8]
    dataset.RescaleSlope = 1
    dataset.RescaleIntercept = -1024
    dataset.Rows, dataset.Columns = rows, 4
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
    dataset.PixelRepresentation = 0
    if with_pixels:
        pixels = np.full((rows, 4), stored_value, dtype=np.uint16)
        pixels[0, 0] = stored_value + 1  # not constant, so MONOCHROME1 inversion is visible
        dataset.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def shuffled_series(positions_z_mm: list[float]) -> list[tuple[str, bytes]]:
    """Slice i at positions_z_mm[i] stores 1024 + i (so HU i at most pixels), written in shuffled order."""
    files = [
        (f"case/slice-{index}.dcm", ct_slice(1024 + index, position_z_mm=z, instance_number=index + 1))
        for index, z in enumerate(positions_z_mm)
    ]
    random.Random(0).shuffle(files)
    return files


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("scans/case1/t1.nii.gz", "nifti"),
        ("T1.NII", "nifti"),
        ("series/slice.dcm", "dicom"),
        ("xr/chest.png", "png"),
        ("xr/chest.JPEG", "png"),
        ("chestmnist.npz", "medmnist"),
        ("notes.txt", None),
        ("volume.gz", None),
    ],
)
def test_detect_format_by_extension(name, expected):
    assert detect_format(name, b"") == expected


def test_detect_format_recognises_dicom_named_by_uid():
    assert detect_format("series/1.2.840.113619.2.55", pydicom_file("CT_small.dcm")[:132]) == "dicom"


def test_read_dicom_ct_small_is_in_hounsfield_units():
    image = read_dicom_series([("ct/CT_small.dcm", pydicom_file("CT_small.dcm"))])

    # stored 128..2191 with RescaleIntercept -1024
    assert (image.array.shape, image.spacing_mm, image.modality, image.array.min(), image.array.max()) == (
        (128, 128),
        (0.661468, 0.661468),
        "CT",
        -896.0,
        1167.0,
    )


def test_read_dicom_mr_small():
    image = read_dicom_series([("mr/MR_small.dcm", pydicom_file("MR_small.dcm"))])

    assert (image.array.shape, image.array.dtype, image.spacing_mm, image.modality, image.source) == (
        (64, 64),
        np.float32,
        (0.3125, 0.3125),
        "MR",
        "mr/MR_small.dcm",
    )


def test_read_dicom_header_gives_grouping_fields_without_pixels():
    header = read_dicom_header(pydicom_file("CT_small.dcm"), "ct/CT_small.dcm")

    assert (header.patient_key, header.modality, header.slice_position_mm, header.instance_number, header.has_pixels) == (
        "1CT1",
        "CT",
        pytest.approx(-75.699997),
        1,
        True,
    )


def test_read_dicom_header_gives_study_instance_and_frame_count():
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)

    header = read_dicom_header(pydicom_file("CT_small.dcm"), "ct/CT_small.dcm")

    assert (header.study_uid, header.sop_uid, header.frames) == (dataset.StudyInstanceUID, dataset.SOPInstanceUID, 1)


def test_read_dicom_header_counts_frames_of_a_multi_frame_file():
    header = read_dicom_header(pydicom_file("SC_rgb_2frame.dcm"), "sc/SC_rgb_2frame.dcm")

    assert header.frames == 2


def test_dicom_header_repr_shows_no_identifier():
    header = read_dicom_header(pydicom_file("CT_small.dcm"), "ct/CT_small.dcm")
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)

    identifiers = (dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID, dataset.PatientID)
    assert [identifier in repr(header) for identifier in identifiers] == [False] * 4


def test_read_dicom_header_sees_missing_pixel_data():
    header = read_dicom_header(ct_slice(0, position_z_mm=0.0, with_pixels=False), "case/a.dcm")

    assert header.has_pixels is False


def test_dicom_series_is_sorted_by_slice_position():
    volume = read_dicom_series(shuffled_series([10.0, 12.5, 15.0, 17.5, 20.0]))

    np.testing.assert_array_equal(volume.array[:, 1, 1], [0.0, 1.0, 2.0, 3.0, 4.0])


def test_dicom_series_spacing_is_the_slice_gap_then_pixel_spacing():
    volume = read_dicom_series(shuffled_series([10.0, 12.5, 15.0, 17.5, 20.0]))

    assert volume.spacing_mm == pytest.approx((2.5, 0.7, 0.8))


def test_dicom_series_without_geometry_is_sorted_by_instance_number():
    files = [(f"s/{n}.dcm", ct_slice(1024 + n, position_z_mm=None, instance_number=n)) for n in (3, 1, 2)]

    volume = read_dicom_series(files)

    np.testing.assert_array_equal(volume.array[:, 1, 1], [1.0, 2.0, 3.0])


def test_dicom_series_with_duplicate_positions_is_bad_input():
    files = shuffled_series([10.0, 12.5, 12.5, 15.0])

    with pytest.raises(BadInputError, match="duplicate slice positions"):
        read_dicom_series(files)


def test_dicom_series_with_inconsistent_slice_shapes_is_bad_input():
    files = [("s/a.dcm", ct_slice(0, position_z_mm=0.0)), ("s/b.dcm", ct_slice(0, position_z_mm=1.0, rows=6))]

    with pytest.raises(BadInputError, match="inconsistent slice shapes"):
        read_dicom_series(files)


def test_dicom_without_pixel_data_is_bad_input():
    with pytest.raises(BadInputError, match="DICOM without pixel data"):
        read_dicom_series([("s/a.dcm", ct_slice(0, position_z_mm=0.0, with_pixels=False))])


def test_dicom_monochrome1_is_inverted():
    image = read_dicom_series([("s/a.dcm", ct_slice(1024, position_z_mm=0.0, photometric="MONOCHROME1"))])

    # stored 1025 at [0, 0], 1024 elsewhere: HU 1 and 0, inverted within [0, 1]
    assert (image.array[0, 0], image.array[1, 1]) == (0.0, 1.0)


def computed_radiograph(pixel_spacing: list[float] | None) -> bytes:
    """A 4 x 4 CR file with the given PixelSpacing (None: without one), as CR/DX exports often are."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = ComputedRadiographyImageStorage
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    if pixel_spacing is not None:
        dataset.PixelSpacing = pixel_spacing
    dataset.Rows, dataset.Columns = 4, 4
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    dataset.PixelData = np.arange(16, dtype=np.uint16).reshape(4, 4).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("pixel_spacing", [[0.0, 0.0], [-0.1, 0.1], None], ids=["zero", "negative", "absent"])
def test_radiograph_without_usable_pixel_spacing_has_unknown_spacing(pixel_spacing):
    image = read_dicom_series([("xr/a.dcm", computed_radiograph(pixel_spacing))])

    assert (image.modality, [math.isnan(spacing) for spacing in image.spacing_mm]) == ("XR", [True, True])


def test_radiograph_with_zero_pixel_spacing_validates_as_2d():
    image = read_dicom_series([("xr/a.dcm", computed_radiograph([0.0, 0.0]))])

    validate(image, spatial_dims=2, max_voxels=100)


def test_dicom_error_reason_carries_no_patient_data():
    truncated = ct_slice(1024, position_z_mm=0.0)[:-10]

    with pytest.raises(BadInputError) as error:
        read_dicom_series([("s/a.dcm", truncated)])

    assert "SECRET-PATIENT-42" not in str(error.value) and "Doe" not in str(error.value)


def test_non_dicom_bytes_are_bad_input():
    with pytest.raises(BadInputError, match="not a DICOM file"):
        read_dicom_header(b"plain text, not a DICOM file" * 10, "s/a.dcm")


def test_read_nifti_3d_reverses_axes_to_zyx():
    image = read_nifti(nibabel_file("anatomical.nii"), "mri/anatomical.nii")

    # stored (x, y, z) = (33, 41, 25) with 2 mm voxels
    assert (image.array.shape, image.spacing_mm, image.modality) == ((25, 41, 33), (2.0, 2.0, 2.0), "OT")


def test_read_nifti_gz_with_anisotropic_spacing():
    image = read_nifti(nibabel_file("standard.nii.gz"), "standard.nii.gz", modality="MR")

    # stored (x, y, z) = (4, 5, 7) with pixdim (1, 3, 2)
    assert (image.array.shape, image.spacing_mm, image.modality) == ((7, 5, 4), (2.0, 3.0, 1.0), "MR")


def test_read_nifti_4d_is_returned_and_rejected_for_3d():
    image = read_nifti(nibabel_file("example4d.nii.gz"), "fmri/example4d.nii.gz")
    assert image.array.shape == (2, 24, 96, 128)

    with pytest.raises(BadInputError, match="4D array"):
        validate(image, spatial_dims=3, max_voxels=10**8)


def test_truncated_nifti_gz_is_bad_input():
    data = nibabel_file("example4d.nii.gz")

    with pytest.raises(BadInputError, match="truncated or corrupt gzip stream"):
        read_nifti(data[: len(data) // 2], "fmri/example4d.nii.gz")


def test_text_file_is_not_nifti():
    with pytest.raises(BadInputError, match="not a NIfTI file"):
        read_nifti(gzip.compress(b"just some text\n" * 40), "notes.nii.gz")


def test_16_bit_png_keeps_values_above_255():
    image = read_png(png_bytes(np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)), "xr/a.png")

    np.testing.assert_array_equal(image.array, [[0.0, 1000.0], [40000.0, 65535.0]])


def test_rgb_png_becomes_luminance():
    pixels = np.zeros((2, 2, 3), dtype=np.uint8)
    pixels[..., 0] = 200  # pure red

    image = read_png(png_bytes(pixels), "xr/a.png")

    np.testing.assert_allclose(image.array, np.full((2, 2), 0.299 * 200), rtol=1e-6)


def test_jpeg_is_read_as_xray():
    image = read_png(png_bytes(np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1)), "JPEG"), "xr/a.jpg")

    assert (image.array.shape, image.modality, image.spacing_mm) == ((16, 16), "XR", (1.0, 1.0))


def test_text_file_named_png_is_bad_input():
    with pytest.raises(BadInputError, match="not an image"):
        read_png(b"this is a text file, not a PNG\n", "xr/notes.png")


def medmnist_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_read_medmnist_2d_gives_one_image_per_sample_with_split():
    data = medmnist_bytes(
        train_images=np.zeros((2, 28, 28, 3), np.uint8),
        val_images=np.zeros((1, 28, 28, 3), np.uint8),
        train_labels=np.zeros((2, 1)),
    )

    images = read_medmnist(data, "pneumoniamnist.npz")

    assert [(image.source, image.patient_key, image.split, image.array.shape) for image in images] == [
        ("pneumoniamnist.npz#train/0", "pneumoniamnist.npz#train/0", "train", (28, 28)),
        ("pneumoniamnist.npz#train/1", "pneumoniamnist.npz#train/1", "train", (28, 28)),
        ("pneumoniamnist.npz#val/0", "pneumoniamnist.npz#val/0", "val", (28, 28)),
    ]


def test_read_medmnist_3d_volumes():
    images = read_medmnist(medmnist_bytes(test_images=np.ones((2, 28, 28, 28), np.uint8)), "organmnist3d.npz")

    assert [(image.array.shape, image.spacing_mm, image.split) for image in images] == [
        ((28, 28, 28), (1.0, 1.0, 1.0), "test")
    ] * 2


def test_npz_without_image_arrays_is_bad_input():
    with pytest.raises(BadInputError, match="no train_images"):
        read_medmnist(medmnist_bytes(train_labels=np.zeros(3)), "labels.npz")


def test_pseudonymize_is_deterministic_for_a_key():
    assert pseudonymize("PAT-001", b"key-a") == pseudonymize("PAT-001", b"key-a")


def test_pseudonymize_differs_across_keys():
    assert pseudonymize("PAT-001", b"key-a") != pseudonymize("PAT-001", b"key-b")


def test_pseudonym_contains_no_part_of_the_patient_key():
    pseudonym = pseudonymize("Doe^Jane^PAT-001", b"key-a")

    # 16 hex digits cannot hold "Doe", "Jane", "PAT" or "-00"
    assert pseudonym.startswith("p-") and len(pseudonym) == 18 and set(pseudonym[2:]) <= set("0123456789abcdef")


def test_pseudonym_key_from_env(monkeypatch):
    monkeypatch.setenv("RAYMEM_PSEUDONYM_KEY", "site-secret")

    assert pseudonym_key_from_env() == (b"site-secret", True)


def test_pseudonym_key_without_env_is_random_and_warns(monkeypatch):
    monkeypatch.delenv("RAYMEM_PSEUDONYM_KEY", raising=False)
    records = logging.handlers.BufferingHandler(capacity=10)  # pytest's caplog is off in this project
    formats_logger = logging.getLogger("raymem.data.formats")
    formats_logger.addHandler(records)

    try:
        key, from_env = pseudonym_key_from_env()
    finally:
        formats_logger.removeHandler(records)

    warnings = [record.getMessage() for record in records.buffer if record.levelno == logging.WARNING]
    assert (len(key), from_env, any("RAYMEM_PSEUDONYM_KEY is not set" in message for message in warnings)) == (
        32,
        False,
        True,
    )


def test_empty_pseudonym_key_is_refused(monkeypatch):
    monkeypatch.setenv("RAYMEM_PSEUDONYM_KEY", "")

    with pytest.raises(ValueError, match="RAYMEM_PSEUDONYM_KEY is set but empty"):
        pseudonym_key_from_env()


@pytest.mark.parametrize(
    ("source", "pattern", "expected"),
    [
        ("site-a/PAT-007/scan.nii.gz", r"(?P<patient>[^/]+)/[^/]+$", "PAT-007"),
        ("chest_PAT-9_view2.png", r"chest_(?P<patient>PAT-\d+)_", "PAT-9"),
        ("loose-file.png", r"(?P<patient>[^/]+)/[^/]+$", None),
    ],
)
def test_patient_key_from_path(source, pattern, expected):
    assert patient_key_from_path(source, pattern) == expected


def test_patient_pattern_without_named_group_is_refused():
    with pytest.raises(ValueError, match=r"\(\?P<patient>"):
        patient_key_from_path("a/b.png", r"([^/]+)/")


def raw(array, spacing_mm=None) -> RawImage:
    array = np.asarray(array, dtype=np.float32)
    spacing_mm = (1.0,) * array.ndim if spacing_mm is None else spacing_mm
    return RawImage(array=array, spacing_mm=spacing_mm, modality="OT", patient_key=None, source="x")


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (raw(np.zeros((0, 4))), "empty image"),
        (raw(np.arange(8.0).reshape(2, 2, 2)), "3D array of shape"),
        (raw(np.arange(20.0).reshape(4, 5), spacing_mm=(1.0, 0.0)), "spacing"),
        (raw(np.arange(20.0).reshape(4, 5), spacing_mm=(-1.0, 1.0)), "spacing"),
        (raw(np.arange(20.0).reshape(4, 5), spacing_mm=(1.0, np.inf)), "spacing"),
        (raw([[0.0, np.nan], [1.0, 2.0]]), "NaN or Inf"),
        (raw([[0.0, np.inf], [1.0, 2.0]]), "NaN or Inf"),
        (raw(np.full((3, 3), 7.0)), "constant image"),
    ],
)
def test_validate_rejects(image, reason):
    with pytest.raises(BadInputError, match=reason):
        validate(image, spatial_dims=2, max_voxels=100)


def test_validate_rejects_images_over_max_voxels():
    with pytest.raises(BadInputError, match="more than max_voxels=100"):
        validate(raw(np.arange(121.0).reshape(11, 11)), spatial_dims=2, max_voxels=100)


def test_validate_accepts_a_usable_image():
    validate(raw(np.arange(16.0).reshape(4, 4)), spatial_dims=2, max_voxels=100)


def test_validate_accepts_unknown_spacing():
    validate(raw(np.arange(16.0).reshape(4, 4), spacing_mm=(math.nan, math.nan)), spatial_dims=2, max_voxels=100)


def test_content_hash_matches_equal_arrays_of_any_dtype():
    assert content_hash(np.arange(6, dtype=np.int64).reshape(2, 3)) == content_hash(
        np.arange(6, dtype=np.float32).reshape(2, 3)
    )


def test_content_hash_distinguishes_shapes_with_the_same_bytes():
    values = np.arange(6, dtype=np.float32)

    assert content_hash(values.reshape(2, 3)) != content_hash(values.reshape(3, 2))


# Headers that claim more than the file holds: each must be refused from the header, quickly and without
# allocating what the header claims. tracemalloc sees Python and numpy allocations (PIL's own are not traced,
# so the PNG bomb is a valid image that np.asarray would otherwise turn into 324 MB of float32).
MEMORY_BOUND_BYTES = 64 * 2**20


def reason_peak_bytes_and_seconds(read: Callable[[], object]) -> tuple[str, int, float]:
    """Call ``read``, which must raise BadInputError: (its reason, peak traced bytes, seconds)."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(BadInputError) as error:
            read()
        seconds = time.perf_counter() - started
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(error.value), peak_bytes, seconds


def nifti_header(shape: tuple[int, ...]) -> bytes:
    """A NIfTI-1 header and empty extension flag for int16 voxels of ``shape``, (x, y, z) order."""
    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_data_offset(352)
    return header.binaryblock + b"\0\0\0\0"


def gzip_of_zeros(prefix: bytes, zero_mib: int) -> bytes:
    """A valid gzip of ``prefix`` and ``zero_mib`` MiB of zeros, built without ever holding the zeros.

    After a full flush deflate keeps no history, so every MiB of zeros compresses to the same block.
    """
    zeros = bytes(2**20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    zero_block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(prefix)
    for _ in range(zero_mib):
        crc = zlib.crc32(zeros, crc)
    final_empty_block = b"\x03\x00"
    trailer = struct.pack("<II", crc, (len(prefix) + zero_mib * len(zeros)) % 2**32)
    return head + zero_block * zero_mib + final_empty_block + trailer


def test_gzip_of_zeros_is_a_valid_gzip():
    assert gzip.decompress(gzip_of_zeros(b"head", 3)) == b"head" + bytes(3 * 2**20)


def dicom_claiming(rows: int, columns: int, frames: int) -> bytes:
    """A JPEG baseline DICOM whose header claims rows x columns x frames; its one frame is an 8 x 8 JPEG."""
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(jpeg, format="JPEG")
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = "OT"
    dataset.Rows, dataset.Columns, dataset.NumberOfFrames = rows, columns, frames
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = encapsulate([jpeg.getvalue()])
    dataset["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_claiming(width: int, height: int, rows_of_data: int) -> bytes:
    """A 1-bit grey PNG declaring width x height, with ``rows_of_data`` rows of zeros actually stored."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = bytes(1 + math.ceil(width / 8))  # filter byte, then 8 pixels a byte
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    pixels = zlib.compress(row * rows_of_data)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_png_claiming_is_a_valid_png():
    assert read_png(png_claiming(20, 3, rows_of_data=3), "xr/a.png").array.shape == (3, 20)


@pytest.mark.parametrize(
    ("build", "read", "reason"),
    [
        pytest.param(
            # a 64^3 volume followed by 1 GiB of zeros: 1 MB on disk
            lambda: gzip_of_zeros(nifti_header((64, 64, 64)), 1024),
            lambda data: read_nifti(data, "mri/bomb.nii.gz", max_voxels=512**3),
            r"decompresses to more than the \d+ bytes its NIfTI header declares",
            id="nii.gz-decompressing-to-1-GiB",
        ),
        pytest.param(
            lambda: gzip_of_zeros(nifti_header((30000, 30000, 1000)), 1),
            lambda data: read_nifti(data, "mri/bomb.nii.gz", max_voxels=512**3),
            r"NIfTI header of shape \(30000, 30000, 1000\) declares 900000000000 voxels, more than max_voxels=",
            id="nii.gz-header-claiming-30000x30000x1000",
        ),
        pytest.param(
            lambda: nifti_header((30000, 30000, 1000)) + bytes(64),
            lambda data: read_nifti(data, "mri/bomb.nii", max_voxels=512**3),
            "more than max_voxels=134217728",
            id="nii-header-claiming-30000x30000x1000",
        ),
        pytest.param(
            # without max_voxels: nibabel would allocate the 512 MB its header claims before finding the data short
            lambda: nifti_header((16384, 16384, 1)) + bytes(200),
            lambda data: read_nifti(data, "mri/short.nii"),
            r"truncated NIfTI file: its header declares \d+ bytes, the file has 552",
            id="552-byte-nii-claiming-512-MB",
        ),
        pytest.param(
            lambda: dicom_claiming(65535, 65535, 1000),
            lambda data: read_dicom_series([("ct/bomb.dcm", data)], max_voxels=512**3),
            r"DICOM header \(65535 x 65535 pixels, 1000 frames\) declares \d+ voxels, more than max_voxels=",
            id="jpeg-dicom-claiming-65535x65535x1000",
        ),
        pytest.param(
            # 81 M pixels, under PIL's own limit (89 M): decoding would allocate 81 MB, then 324 MB of float32
            lambda: png_claiming(9000, 9000, rows_of_data=9000),
            lambda data: read_png(data, "xr/bomb.png", max_voxels=4096**2 // 4),
            r"image of 9000 x 9000 pixels declares 81000000 voxels, more than max_voxels=4194304",
            id="png-9000x9000-over-max-voxels",
        ),
        pytest.param(
            lambda: png_claiming(60000, 60000, rows_of_data=1),
            lambda data: read_png(data, "xr/bomb.png", max_voxels=512**3),
            r"image declares more than \d+ pixels, PIL's decompression-bomb limit",
            id="png-claiming-60000x60000",
        ),
    ],
)
def test_header_claiming_too_much_is_refused_quickly_in_bounded_memory(build, read, reason):
    data = build()

    found_reason, peak_bytes, seconds = reason_peak_bytes_and_seconds(lambda: read(data))

    refused = (bool(re.search(reason, found_reason)), peak_bytes < MEMORY_BOUND_BYTES, seconds < 5.0)
    assert refused == (True, True, True), (found_reason, peak_bytes, seconds)


def test_nifti_over_max_voxels_is_refused():
    # anatomical.nii is (x, y, z) = (33, 41, 25): 33825 voxels
    with pytest.raises(BadInputError, match="declares 33825 voxels, more than max_voxels=1000"):
        read_nifti(nibabel_file("anatomical.nii"), "mri/anatomical.nii", max_voxels=1000)


def test_nifti_within_max_voxels_is_read():
    image = read_nifti(nibabel_file("standard.nii.gz"), "standard.nii.gz", max_voxels=4 * 5 * 7)

    assert image.array.shape == (7, 5, 4)


def test_dicom_series_over_max_voxels_is_refused_from_all_its_headers():
    files = shuffled_series([10.0, 12.5, 15.0])  # three 4 x 4 slices: 48 voxels

    with pytest.raises(BadInputError, match=r"\(4 x 4 pixels, 3 frames\) declares 48 voxels, more than max_voxels=47"):
        read_dicom_series(files, max_voxels=47)


def test_medmnist_with_images_over_max_voxels_is_refused_from_the_npy_header():
    data = medmnist_bytes(train_images=np.zeros((2, 28, 28, 28), np.uint8))

    with pytest.raises(BadInputError, match=r"declares 21952 voxels, more than max_voxels=784"):
        read_medmnist(data, "organmnist3d.npz", max_voxels=28 * 28)


def test_medmnist_colour_channels_do_not_count_as_voxels():
    images = read_medmnist(medmnist_bytes(train_images=np.zeros((1, 28, 28, 3), np.uint8)), "a.npz", max_voxels=28 * 28)

    assert images[0].array.shape == (28, 28)
