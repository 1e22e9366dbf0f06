"""Medical image readers, input validation and patient de-identification.

Every reader takes the file's bytes (the caller fetches them, locally or from S3) and a ``source``
string, the file's path relative to the ingest root, which is the only provenance ever recorded.
Readers return spatial-only float32 arrays: 2D ``(H, W)`` = ``[y, x]``, 3D ``(D, H, W)`` =
``[z, y, x]``, with ``spacing_mm`` in the same axis order.

A file that cannot be read raises :class:`BadInputError` whose message is a short reason free of
patient data (PHI): no names, IDs, dates, institutions or UIDs ever appear in a reason or a log
line. Library exceptions are replaced, not chained, because their messages may quote header
values.
"""

import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO

import nibabel
import numpy as np
import pydicom
import pydicom.config
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder

logger = logging.getLogger(__name__)

FORMATS = ("nifti", "dicom", "png", "medmnist")  # "png" covers PNG and JPEG
MODALITIES = ("CT", "MR", "XR", "OT")
MEDMNIST_SPLITS = ("train", "val", "test")
DEFAULT_PATIENT_PATTERN = r"(?P<patient>[^/]+)/[^/]+$"  # the file's parent directory name

EXTENSION_FORMATS = (
    (".nii.gz", "nifti"),
    (".nii", "nifti"),
    (".dcm", "dicom"),
    (".png", "png"),
    (".jpg", "png"),
    (".jpeg", "png"),
    (".npz", "medmnist"),
)
_DICOM_MODALITIES = {"CT": "CT", "MR": "MR", "CR": "XR", "DX": "XR", "DR": "XR", "MG": "XR"}
# ITU-R 601-2 luma, the weights PIL uses for RGB -> "L".
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# NIfTI spatial units (header xyzt_units) converted to millimetres; "mm" and "unknown" stay as stored.
_NIFTI_UNIT_TO_MM = {"meter": 1000.0, "micron": 0.001}
# Slices closer than this along the slice normal are the same position.
_SAME_POSITION_TOLERANCE_MM = 1e-3
# Gzip is decompressed in pieces of this size, so a reader can stop before a gzip bomb fills memory.
_GZIP_CHUNK_BYTES = 1 << 20
# Bytes a .nii.gz may decompress to beyond what its header declares (padding some writers add).
_NIFTI_TRAILING_SLACK_BYTES = 1 << 20
# The larger of the two NIfTI header sizes (NIfTI-1: 348, NIfTI-2: 540).
_NIFTI_MAX_HEADER_BYTES = 540
# What the image libraries raise on malformed input. Only library calls run under this net,
# so a bug in this module still surfaces as itself.
_LIBRARY_ERRORS = (
    InvalidDicomError,
    ImageFileError,
    HeaderDataError,
    WrapStructError,
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    TypeError,
    NotImplementedError,
    RuntimeError,
)


class BadInputError(ValueError):
    """A file that cannot become a training image; ``str(error)`` is a short, PHI-free reason."""


@dataclass(frozen=True, eq=False)
class RawImage:
    """One image or volume as read, before resampling and normalisation.

    array: float32, (H, W) or (D, H, W) (a reader may return other ranks; :func:`validate`
        rejects them). CT values are in Hounsfield units.
    spacing_mm: voxel size per array axis; NaN where the file gives none (unknown).
    modality: one of MODALITIES.
    patient_key: the source's own patient identifier (DICOM PatientID, or taken from the path).
        May be PHI: pass it only to :func:`pseudonymize`, never log or write it.
    source: PHI-free provenance, the relative path plus "#<n>" for one of several samples in a file.
    split: "train"/"val"/"test" where the file assigns one (MedMNIST), else None.
    """

    array: np.ndarray
    spacing_mm: tuple[float, ...]
    modality: str
    patient_key: str | None = field(repr=False)  # PHI: kept out of repr so a logged image never shows it
    source: str
    split: str | None = None

    def __post_init__(self) -> None:
        assert self.array.dtype == np.float32, self.array.dtype
        assert len(self.spacing_mm) == self.array.ndim, (self.spacing_mm, self.array.shape)
        assert self.modality in MODALITIES, self.modality


@dataclass(frozen=True)
class DicomHeader:
    """What grouping a DICOM file into series needs, read without the pixel data.

    series_uid: SeriesInstanceUID, or the file's source when absent (the file stands alone).
        A UID is PHI-adjacent: use it for grouping only, never log or write it.
    study_uid: StudyInstanceUID, or "" when absent. PHI-adjacent, like series_uid.
    sop_uid: SOPInstanceUID, or "" when absent: the same value in two files is one image exported
        twice. PHI-adjacent, like series_uid.
    patient_key: PatientID or None. PHI: pass only to :func:`pseudonymize`.
    modality: one of MODALITIES.
    slice_position_mm: ImagePositionPatient projected on the slice normal, None without geometry.
    instance_number: InstanceNumber or None.
    frames: NumberOfFrames, 1 when absent (a multi-frame file is a volume or a cine by itself).
    has_pixels: whether a (Float/Double Float) Pixel Data element follows the header.
    """

    series_uid: str = field(repr=False)  # kept out of repr, like patient_key: never logged
    study_uid: str = field(repr=False)
    sop_uid: str = field(repr=False)
    patient_key: str | None = field(repr=False)
    modality: str
    slice_position_mm: float | None
    instance_number: int | None
    frames: int
    has_pixels: bool


@contextmanager
def _library_errors_as(reason: str) -> Iterator[None]:
    """Turn a library's exception for a malformed file into ``BadInputError(reason)``."""
    try:
        yield
    except BadInputError:
        raise
    except _LIBRARY_ERRORS as error:
        raise BadInputError(f"{reason} ({type(error).__name__})") from None


def _luminance(pixels: np.ndarray) -> np.ndarray:
    """(..., C) channels-last pixels -> (...) float32: RGB(A) to luma, one or two channels to the first."""
    if pixels.shape[-1] < 3:
        return pixels[..., 0].astype(np.float32)
    return pixels[..., :3].astype(np.float32) @ _LUMA_WEIGHTS


def detect_format(name: str, head: bytes) -> str | None:
    """One of FORMATS for a file, or None when it is none of them.

    name: the file name or path; its extension decides (.nii, .nii.gz, .dcm, .png, .jpg, .jpeg, .npz).
    head: the file's first bytes (at least 132); a file with any other extension is DICOM when it
        carries the "DICM" marker at byte 128 (DICOM files are often named by UID, without ".dcm").
    """
    file_name = name.rsplit("/", 1)[-1].lower()
    for extension, file_format in EXTENSION_FORMATS:
        if file_name.endswith(extension):
            return file_format
    if head[128:132] == b"DICM":
        return "dicom"
    return None


def _nifti_image_class(header: bytes) -> type[nibabel.Nifti1Image] | type[nibabel.Nifti2Image]:
    """The nibabel class for a single-file NIfTI by its header size (348: NIfTI-1, 540: NIfTI-2)."""
    if len(header) < 4:
        raise BadInputError("not a NIfTI file (shorter than a header)")
    header_sizes = {struct.unpack("<i", header[:4])[0], struct.unpack(">i", header[:4])[0]}
    if 540 in header_sizes:
        return nibabel.Nifti2Image
    if 348 not in header_sizes:
        raise BadInputError("not a NIfTI file (header size is neither 348 nor 540)")
    if header[344:348] == b"ni1\x00":
        raise BadInputError("NIfTI header/image pair (.hdr/.img) is not supported: convert it to one .nii file")
    return nibabel.Nifti1Image


def _too_many_voxels(what: str, voxels: int, max_voxels: int | None) -> None:
    """Raise BadInputError when a header declares more than max_voxels voxels (None: no limit)."""
    if max_voxels is not None and voxels > max_voxels:
        raise BadInputError(
            f"{what} declares {voxels} voxels, more than max_voxels={max_voxels}: raise max_voxels or crop the input"
        )


def _nifti_file_bytes(header: bytes, max_voxels: int | None) -> int:
    """The bytes a single-file NIfTI needs by its header: data offset + voxels x bytes per voxel.

    Raises BadInputError when the header declares more than ``max_voxels`` voxels (every axis,
    including time, counts, as in :func:`validate`).
    """
    image_class = _nifti_image_class(header)
    header_bytes = image_class.header_class.template_dtype.itemsize
    if len(header) < header_bytes:
        raise BadInputError("not a NIfTI file (shorter than a header)")
    with _library_errors_as("corrupt NIfTI header"):
        nifti_header = image_class.header_class(header[:header_bytes], check=False)
        shape = nifti_header.get_data_shape()
        voxel_bytes = nifti_header.get_data_dtype().itemsize
        data_offset = int(nifti_header.get_data_offset())
    if any(size < 0 for size in shape):
        raise BadInputError("corrupt NIfTI header (negative dimension)")
    voxels = math.prod(shape)
    _too_many_voxels(f"NIfTI header of shape {shape}", voxels, max_voxels)
    return max(data_offset, header_bytes) + voxels * voxel_bytes


def _gunzip_chunks(data: bytes) -> Iterator[bytes]:
    """Decompress gzip ``data`` in pieces of at most _GZIP_CHUNK_BYTES (every member of a multi-member file).

    Raises BadInputError for a truncated stream, zlib.error for a corrupt one (or a CRC mismatch,
    checked at the end of each member).
    """
    remaining = data
    while remaining:
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)  # 16: gzip header and trailer
        pending = remaining
        while not decompressor.eof:
            chunk = decompressor.decompress(pending, _GZIP_CHUNK_BYTES)
            pending = decompressor.unconsumed_tail
            if not (chunk or pending or decompressor.eof):
                raise BadInputError("truncated or corrupt gzip stream")
            yield chunk
        # gzip allows zero padding after the last member
        remaining = decompressor.unused_data.lstrip(b"\x00")


def _gunzip_nifti(data: bytes, max_voxels: int | None) -> bytes:
    """Decompress a .nii.gz no further than its header declares, so a gzip bomb never fills memory."""
    chunks = _gunzip_chunks(data)
    pieces, size = [], 0
    with _library_errors_as("truncated or corrupt gzip stream"):
        for chunk in chunks:
            pieces.append(chunk)
            size += len(chunk)
            if size >= _NIFTI_MAX_HEADER_BYTES:
                break
        limit = _nifti_file_bytes(b"".join(pieces), max_voxels) + _NIFTI_TRAILING_SLACK_BYTES
        for chunk in chunks:
            pieces.append(chunk)
            size += len(chunk)
            if size > limit:
                raise BadInputError(
                    f"gzip stream decompresses to more than the {limit} bytes its NIfTI header declares "
                    "(a corrupt file or a decompression bomb)"
                )
    return b"".join(pieces)


def read_nifti(data: bytes, source: str, *, modality: str = "OT", max_voxels: int | None = None) -> RawImage:
    """Read a .nii or .nii.gz file.

    The voxels are fully decoded here, so a truncated or corrupt file fails now, not later.
    NIfTI stores (x, y, z[, t]); the result reverses the axes to (z, y, x) (a 4D file gives
    (t, z, y, x)) after dropping trailing singleton axes, so a single-slice file is (H, W).
    No reorientation is applied: axes are the file's voxel axes. Spacing comes from pixdim,
    converted to mm where the header states metres or microns. NIfTI has no modality or patient
    field: ``modality`` is the caller's, patient_key is None (take it from the path).

    Memory is bounded by the header before any voxel is decoded: more than ``max_voxels`` voxels
    (None: no limit) is refused, a .nii.gz is decompressed no further than the header's size, and
    a file shorter than its header declares is refused before the voxels are allocated.
    """
    if data[:2] == b"\x1f\x8b":
        data = _gunzip_nifti(data, max_voxels)
    file_bytes = _nifti_file_bytes(data[:_NIFTI_MAX_HEADER_BYTES], max_voxels)
    if len(data) < file_bytes:
        raise BadInputError(f"truncated NIfTI file: its header declares {file_bytes} bytes, the file has {len(data)}")
    image_class = _nifti_image_class(data[:348])
    with _library_errors_as("corrupt NIfTI file"):
        image = image_class.from_bytes(data)
        voxels = image.get_fdata(dtype=np.float32)
        zooms = tuple(float(zoom) for zoom in image.header.get_zooms())
        spatial_unit = image.header.get_xyzt_units()[0]
    while voxels.ndim > 2 and voxels.shape[-1] == 1:
        voxels = voxels[..., 0]
    unit_to_mm = _NIFTI_UNIT_TO_MM.get(spatial_unit, 1.0)
    spacing_xyz = [zoom * unit_to_mm if axis < 3 else zoom for axis, zoom in enumerate(zooms[: voxels.ndim])]
    return RawImage(
        array=np.ascontiguousarray(voxels.T),
        spacing_mm=tuple(reversed(spacing_xyz)),
        modality=modality,
        patient_key=None,
        source=source,
    )


def read_png(data: bytes, source: str, *, modality: str = "XR", max_voxels: int | None = None) -> RawImage:
    """Read an 8- or 16-bit PNG or a JPEG as an (H, W) image.

    Grey values are kept as stored (a 16-bit PNG keeps 0..65535); colour becomes luma. PNG and
    JPEG carry no reliable pixel spacing, so spacing is 1.0 per axis (pixel units). An image whose
    header declares more than ``max_voxels`` pixels (None: no limit) is refused before decoding.
    """
    try:
        with _library_errors_as("not an image (PNG/JPEG decoder failed)"), Image.open(BytesIO(data)) as image:
            width, height = image.size
            _too_many_voxels(f"image of {height} x {width} pixels", width * height, max_voxels)
            image.load()
            if image.mode in ("1", "L", "I", "F") or image.mode.startswith("I;16"):
                pixels = np.asarray(image, dtype=np.float32)
            else:
                pixels = _luminance(np.asarray(image.convert("RGB")))
    except Image.DecompressionBombError:  # PIL refuses at open, before max_voxels can be checked
        raise BadInputError(
            f"image declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels, PIL's decompression-bomb limit"
        ) from None
    return RawImage(array=pixels, spacing_mm=(1.0, 1.0), modality=modality, patient_key=None, source=source)


# Little-endian or not, implicit VR or not -> the transfer syntax a file without one in its meta was written in.
_ENCODING_SYNTAX = {(True, True): pydicom.uid.ImplicitVRLittleEndian, (False, True): pydicom.uid.ExplicitVRLittleEndian,
                    (False, False): pydicom.uid.ExplicitVRBigEndian}


def _read_dicom(stream: BytesIO, *, with_pixels: bool) -> pydicom.Dataset:
    """A DICOM file, also one written without the 128-byte preamble and file meta (older systems and some export
    tools write bare datasets): those are read when they carry an image's identity (SOPClassUID, or Rows and
    Columns). A file whose meta names no transfer syntax is decoded in the encoding it was read with."""
    reason = "not a DICOM file (no 'DICM' marker at byte 128, or a corrupt header)"
    try:
        with _library_errors_as(reason):
            dataset = pydicom.dcmread(stream, stop_before_pixels=not with_pixels)
    except BadInputError:
        stream.seek(0)
        with _library_errors_as(reason):
            dataset = pydicom.dcmread(stream, stop_before_pixels=not with_pixels, force=True)
        if "SOPClassUID" not in dataset and not ("Rows" in dataset and "Columns" in dataset):
            raise BadInputError(reason) from None
    if "TransferSyntaxUID" not in dataset.file_meta and dataset.original_encoding in _ENCODING_SYNTAX:
        dataset.file_meta.TransferSyntaxUID = _ENCODING_SYNTAX[dataset.original_encoding]
    return dataset


def _dicom_attribute(dataset: pydicom.Dataset, keyword: str, default: object = None) -> object:
    """An attribute from the top level, else from the Shared Functional Groups (enhanced multi-frame)."""
    if keyword in dataset:
        return dataset.data_element(keyword).value
    for shared_group in dataset.get("SharedFunctionalGroupsSequence", []):
        for element in shared_group:
            if element.VR == "SQ":
                for item in element.value:
                    if keyword in item:
                        return item.data_element(keyword).value
    return default


def _dicom_modality(dataset: pydicom.Dataset) -> str:
    return _DICOM_MODALITIES.get(str(dataset.get("Modality", "")).upper(), "OT")


def _dicom_patient_key(dataset: pydicom.Dataset) -> str | None:
    return str(dataset.get("PatientID", "")).strip() or None


def _slice_position_mm(dataset: pydicom.Dataset, image_position: Sequence[float] | None) -> float | None:
    """ImagePositionPatient . (row direction x column direction), None without full geometry."""
    orientation = _dicom_attribute(dataset, "ImageOrientationPatient")
    if image_position is None or orientation is None or len(image_position) != 3 or len(orientation) != 6:
        return None
    direction_cosines = np.asarray(orientation, dtype=np.float64)
    slice_normal = np.cross(direction_cosines[:3], direction_cosines[3:])
    return float(np.dot(np.asarray(image_position, dtype=np.float64), slice_normal))


def _instance_number(dataset: pydicom.Dataset) -> int | None:
    value = dataset.get("InstanceNumber")
    return None if value is None or value == "" else int(value)


def _frame_count(dataset: pydicom.Dataset) -> int:
    value = dataset.get("NumberOfFrames")
    return 1 if value is None or value == "" else int(value)


def read_dicom_header(data: bytes, source: str) -> DicomHeader:
    """Read the header of one DICOM file, stopping before the pixel data."""
    stream = BytesIO(data)
    with pydicom.config.disable_value_validation():  # its warnings would quote header values
        dataset = _read_dicom(stream, with_pixels=False)
        with _library_errors_as("malformed DICOM header"):
            return DicomHeader(
                series_uid=str(dataset.get("SeriesInstanceUID", "")) or source,
                study_uid=str(dataset.get("StudyInstanceUID", "")),
                sop_uid=str(dataset.get("SOPInstanceUID", "")),
                patient_key=_dicom_patient_key(dataset),
                modality=_dicom_modality(dataset),
                slice_position_mm=_slice_position_mm(dataset, dataset.get("ImagePositionPatient")),
                instance_number=_instance_number(dataset),
                frames=_frame_count(dataset),
                # stop_before_pixels leaves the stream at the pixel data element, or at the end without one
                has_pixels=stream.tell() < len(data),
            )


def _check_decodable(dataset: pydicom.Dataset) -> None:
    """Raise BadInputError for a file without pixel data, or whose transfer syntax has no installed decoder."""
    if not any(keyword in dataset for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise BadInputError("DICOM without pixel data")
    transfer_syntax = dataset.file_meta.get("TransferSyntaxUID")
    if transfer_syntax is None:
        return  # pydicom guesses the syntax from the data set itself
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        raise BadInputError(f"no DICOM decoder exists for transfer syntax {transfer_syntax.name}") from None
    if not decoder.is_available:
        raise BadInputError(
            f"no decoder installed for DICOM transfer syntax {transfer_syntax.name}: install raymem's DICOM "
            "decoders (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle)"
        )


def _dicom_pixels(dataset: pydicom.Dataset) -> np.ndarray:
    """Decoded pixels with the modality LUT / rescale applied: (H, W) or (frames, H, W) float32.

    Colour becomes luma: pydicom converts YBR_FULL / YBR_FULL_422 (and the JPEG 2000 YBR_ICT /
    YBR_RCT) to RGB while decoding; PALETTE COLOR goes through its lookup table first.
    """
    transfer_syntax = dataset.file_meta.get("TransferSyntaxUID")
    syntax_name = transfer_syntax.name if transfer_syntax is not None else "unknown transfer syntax"
    with _library_errors_as(f"DICOM pixel data could not be decoded, transfer syntax {syntax_name}"):
        pixels = dataset.pixel_array
    with _library_errors_as("malformed DICOM colour or rescale attributes"):
        if str(dataset.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
            return _luminance(apply_color_lut(pixels, dataset))
        if int(dataset.get("SamplesPerPixel", 1)) > 1:
            return _luminance(pixels)
        if "ModalityLUTSequence" in dataset:
            return apply_modality_lut(pixels, dataset).astype(np.float32)
        slope = float(_dicom_attribute(dataset, "RescaleSlope", 1.0))
        intercept = float(_dicom_attribute(dataset, "RescaleIntercept", 0.0))
        return (pixels.astype(np.float64) * slope + intercept).astype(np.float32)


def _spacing_value_mm(value: object) -> float:
    """A spacing attribute's value in mm; NaN (unknown) unless it is a positive, finite number."""
    try:
        spacing_mm = float(value)
    except (TypeError, ValueError):  # absent, empty, or text that is not a number
        return math.nan
    return spacing_mm if math.isfinite(spacing_mm) and spacing_mm > 0 else math.nan


def _pixel_spacing_mm(dataset: pydicom.Dataset) -> tuple[float, float]:
    """(row spacing, column spacing) = (y, x), NaN (unknown) when the file gives no usable pair.

    PixelSpacing, else ImagerPixelSpacing (projection X-ray often stores only that), each used only
    when both values are positive and finite: CR/DX exports carry "0\\0" or nothing, and a 2D resize
    never needs the spacing.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = _dicom_attribute(dataset, keyword)
        if isinstance(spacing, Sequence) and not isinstance(spacing, str) and len(spacing) == 2:
            row_spacing_mm, column_spacing_mm = _spacing_value_mm(spacing[0]), _spacing_value_mm(spacing[1])
            if not (math.isnan(row_spacing_mm) or math.isnan(column_spacing_mm)):
                return (row_spacing_mm, column_spacing_mm)
    return (math.nan, math.nan)


def _slice_gap_mm(dataset: pydicom.Dataset, sorted_positions_mm: Sequence[float] | None) -> float:
    """Median gap between sorted slice positions; without them SpacingBetweenSlices, SliceThickness or NaN."""
    if sorted_positions_mm is not None and len(sorted_positions_mm) > 1:
        return _spacing_value_mm(np.median(np.abs(np.diff(sorted_positions_mm))))
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        declared_mm = _spacing_value_mm(_dicom_attribute(dataset, keyword))
        if not math.isnan(declared_mm):
            return declared_mm
    return math.nan


def _frame_positions_mm(dataset: pydicom.Dataset) -> list[float] | None:
    """Per-frame slice positions of an enhanced multi-frame file, None when any frame lacks them."""
    positions = []
    for frame in dataset.get("PerFrameFunctionalGroupsSequence", []):
        plane_position = frame.get("PlanePositionSequence")
        image_position = plane_position[0].get("ImagePositionPatient") if plane_position else None
        positions.append(_slice_position_mm(dataset, image_position))
    if not positions or None in positions:
        return None
    return positions


def _series_order(datasets: Sequence[pydicom.Dataset]) -> tuple[list[int], list[float] | None]:
    """Slice order of single-frame files by position along the normal, else by InstanceNumber.

    Returns the file indices in slice order and, when ordered by position, the sorted positions.
    """
    positions = [_slice_position_mm(dataset, dataset.get("ImagePositionPatient")) for dataset in datasets]
    if None not in positions:
        order = sorted(range(len(datasets)), key=lambda index: positions[index])
        sorted_positions = [positions[index] for index in order]
        if np.any(np.diff(sorted_positions) < _SAME_POSITION_TOLERANCE_MM):
            raise BadInputError("duplicate slice positions in DICOM series")
        return order, sorted_positions
    instance_numbers = [_instance_number(dataset) for dataset in datasets]
    if None in instance_numbers:
        raise BadInputError(
            "cannot order DICOM slices: not every file has ImagePositionPatient/ImageOrientationPatient "
            "or InstanceNumber"
        )
    if len(set(instance_numbers)) < len(instance_numbers):
        raise BadInputError("duplicate InstanceNumber in DICOM series without slice positions")
    return sorted(range(len(datasets)), key=lambda index: instance_numbers[index]), None


def _check_series_header(
    datasets: Sequence[pydicom.Dataset], *, spatial_dims: int | None, max_voxels: int | None
) -> None:
    """Refuse, from the headers alone, what decoding would only waste time or memory on."""
    for dataset in datasets:
        _check_decodable(dataset)
    with _library_errors_as("malformed DICOM image attributes"):
        frames = [_frame_count(dataset) for dataset in datasets]
        slice_shapes = {(int(dataset.Rows), int(dataset.Columns)) for dataset in datasets}
        samples_per_pixel = {int(dataset.get("SamplesPerPixel", 1)) for dataset in datasets}
    if spatial_dims == 2 and len(datasets) == 1 and frames[0] > 1:
        raise BadInputError(
            f"multi-frame DICOM ({frames[0]} frames) where 2D images are expected: ingest it with spatial_dims=3"
        )
    if len(datasets) > 1:
        if len({str(dataset.get("SeriesInstanceUID", "")) for dataset in datasets}) > 1:
            raise BadInputError("files from more than one DICOM series")
        if max(frames) > 1:
            raise BadInputError("multi-frame DICOM files cannot be stacked into one series")
        if len(slice_shapes) > 1:
            raise BadInputError("inconsistent slice shapes in DICOM series")
    # Colour is decoded with all its samples before it becomes luma: bound them too.
    if not samples_per_pixel <= {1, 3, 4}:
        raise BadInputError("DICOM with a number of samples per pixel other than 1 (grey), 3 or 4 (colour)")
    rows, columns = next(iter(slice_shapes))
    voxels = rows * columns * sum(frames)
    _too_many_voxels(f"DICOM header ({rows} x {columns} pixels, {sum(frames)} frames)", voxels, max_voxels)


def read_dicom_series(
    files: Sequence[tuple[str, bytes]],
    *,
    source: str | None = None,
    spatial_dims: int | None = None,
    max_voxels: int | None = None,
) -> RawImage:
    """Read one DICOM series: a single file or the files of one series, as (source, bytes) pairs.

    One single-frame file gives an (H, W) image; one multi-frame file gives (frames, H, W) in
    stored frame order; several single-frame files give a (D, H, W) volume sorted by position
    along the slice normal (InstanceNumber without geometry). patient_key is the first file's
    PatientID. ``source`` labels the result (e.g. "<dir>/series-<n>"); by default the first
    file's source.

    Reading DICOM:
      - Transfer syntaxes: uncompressed, deflated, RLE, JPEG baseline and extended (8/12-bit),
        JPEG lossless (process 14, SV1), JPEG-LS lossless and near-lossless, JPEG 2000 lossless
        and lossy, decoded by pydicom's plugins (pylibjpeg). A file that fails to decode is
        BadInputError naming its transfer syntax; one without an installed decoder says so.
      - Values are the modality LUT, else RescaleSlope * stored + RescaleIntercept (HU for CT).
      - MONOCHROME1 is inverted within the volume's value range, so bright always means dense.
      - Colour (RGB, YBR_FULL/YBR_FULL_422 converted to RGB by pydicom, YBR_ICT/YBR_RCT, PALETTE
        COLOR through its lookup table, e.g. ultrasound) becomes luma (ITU-R 601-2).
      - Spacing is (slice gap, PixelSpacing). The slice gap is the median gap between positions,
        else SpacingBetweenSlices/SliceThickness; the pixel spacing is PixelSpacing, else
        ImagerPixelSpacing. A value that is absent, zero, negative or not finite is NaN (unknown):
        CR/DX files often carry "0\\0", and :func:`validate` accepts NaN spacing.
      - With ``spatial_dims=2`` a multi-frame file is refused before decoding ("multi-frame DICOM
        (N frames) where 2D images are expected"); without it, it is returned as (frames, H, W).
      - More than ``max_voxels`` voxels (Rows x Columns x frames over all files) is refused from
        the headers, before any pixel is decoded; None: no limit.
    """
    assert files, "read_dicom_series needs at least one file"
    with pydicom.config.disable_value_validation():  # its warnings would quote header values
        datasets = [_read_dicom(BytesIO(data), with_pixels=True) for _, data in files]
        _check_series_header(datasets, spatial_dims=spatial_dims, max_voxels=max_voxels)
        slices = [_dicom_pixels(dataset) for dataset in datasets]
        first = datasets[0]
        with _library_errors_as("malformed DICOM geometry attributes"):
            if len(datasets) == 1:
                volume = slices[0]
                sorted_positions = _frame_positions_mm(first) if volume.ndim == 3 else None
            else:
                order, sorted_positions = _series_order(datasets)
                volume = np.stack([slices[index] for index in order])
            slice_gap = (_slice_gap_mm(first, sorted_positions),) if volume.ndim == 3 else ()
            spacing_mm = slice_gap + _pixel_spacing_mm(first)
            if str(first.get("PhotometricInterpretation", "")) == "MONOCHROME1":
                volume = volume.max() + volume.min() - volume
            return RawImage(
                array=volume,
                spacing_mm=spacing_mm,
                modality=_dicom_modality(first),
                patient_key=_dicom_patient_key(first),
                source=files[0][0] if source is None else source,
            )


def _has_channels(shape: tuple[int, ...]) -> bool:
    """Whether a MedMNIST array (N, ...) ends in a channel axis: 4 axes, the last 1, 3 or 4 long."""
    return len(shape) == 4 and shape[-1] in (1, 3, 4)


def _npz_array_shape(archive: np.lib.npyio.NpzFile, key: str) -> tuple[int, ...]:
    """The shape an .npz array declares in its .npy header, read without its data."""
    with archive.zip.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(member)[0]
        return np.lib.format.read_array_header_2_0(member)[0]


def read_medmnist(data: bytes, source: str, *, modality: str = "OT", max_voxels: int | None = None) -> list[RawImage]:
    """Read a MedMNIST .npz: every image of its train_images/val_images/test_images arrays.

    Arrays are (N, H, W) or (N, H, W, C) for 2D (colour becomes luma) and (N, D, H, W) for 3D; a
    4-axis array whose last axis is 1, 3 or 4 long is read as channels. Labels are ignored. Each
    image is its own patient (MedMNIST has no patient ids): source and patient_key are
    f"{source}#{split}/{index}". Values stay as stored (0..255), spacing 1.0. An array whose .npy
    header declares images of more than ``max_voxels`` voxels (None: no limit) is refused before
    it is loaded; the number of images, and so the memory of the whole file, is not bounded here.
    """
    with _library_errors_as("not a MedMNIST .npz file"):
        archive = np.load(BytesIO(data), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise BadInputError("not a MedMNIST .npz file (a single .npy array)")
        with archive:
            keys = [f"{split}_images" for split in MEDMNIST_SPLITS if f"{split}_images" in archive.files]
            for key in keys:
                shape = _npz_array_shape(archive, key)
                image_shape = shape[1:-1] if _has_channels(shape) else shape[1:]
                _too_many_voxels(f"MedMNIST {key} of shape {shape}", math.prod(image_shape), max_voxels)
            images_by_split = {key.removesuffix("_images"): archive[key] for key in keys}
    if not images_by_split:
        raise BadInputError("no train_images/val_images/test_images array in .npz (not a MedMNIST file)")
    raw_images = []
    for split, images in images_by_split.items():
        if _has_channels(images.shape):
            images = _luminance(images)
        if images.ndim not in (3, 4):
            raise BadInputError(
                f"MedMNIST {split}_images has shape {images.shape}; expected (N, H, W), (N, H, W, C) or (N, D, H, W)"
            )
        for index, image in enumerate(images):
            sample = f"{source}#{split}/{index}"
            raw_images.append(
                RawImage(
                    array=np.asarray(image, dtype=np.float32),
                    spacing_mm=(1.0,) * image.ndim,
                    modality=modality,
                    patient_key=sample,
                    source=sample,
                    split=split,
                )
            )
    return raw_images


def pseudonymize(patient_key: str, key: bytes) -> str:
    """A stable, non-reversible patient id: "p-" + the first 16 hex digits of HMAC-SHA256(key, patient_key)."""
    return "p-" + hmac.new(key, patient_key.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def pseudonym_key_from_env(var: str = "RAYMEM_PSEUDONYM_KEY") -> tuple[bytes, bool]:
    """The pseudonymization key from environment variable ``var`` (its UTF-8 bytes), and whether it came from there.

    Unset: a random 32-byte key, with a warning, because ids then match within this ingest only.
    """
    value = os.environ.get(var)
    if value is None:
        logger.warning(
            "%s is not set: using a random pseudonym key, so patient ids will not match those of any other "
            "ingest (a later audit cannot link the same patient across datasets, and the patient split changes "
            "with every ingest). Set %s to a fixed secret.",
            var,
            var,
        )
        return secrets.token_bytes(32), False
    if not value:
        raise ValueError(f"{var} is set but empty: set it to a fixed secret, or unset it for a random per-ingest key")
    return value.encode("utf-8"), True


def patient_key_from_path(source: str, pattern: str = DEFAULT_PATIENT_PATTERN) -> str | None:
    """The named group "patient" of regex ``pattern`` searched in the relative path ``source``; None if no match."""
    compiled = re.compile(pattern)
    if "patient" not in compiled.groupindex:
        raise ValueError(f"patient pattern {pattern!r} has no named group: write it with (?P<patient>...)")
    match = compiled.search(source)
    if match is None:
        return None
    return match.group("patient") or None


def validate(image: RawImage, *, spatial_dims: int, max_voxels: int) -> None:
    """Raise BadInputError unless ``image`` is a usable ``spatial_dims``-D image.

    Rejects: an empty array, another number of axes than spatial_dims, more than max_voxels voxels,
    zero, negative or infinite spacing, NaN or Inf values, a constant image. NaN spacing is accepted:
    it means unknown (a DICOM without a usable PixelSpacing), which resizing does not need.
    """
    assert spatial_dims in (2, 3), spatial_dims
    array = image.array
    if array.size == 0:
        raise BadInputError(f"empty image (shape {array.shape})")
    if array.ndim != spatial_dims:
        raise BadInputError(f"{array.ndim}D array of shape {array.shape} where {spatial_dims}D images are expected")
    if array.size > max_voxels:
        raise BadInputError(
            f"image of shape {array.shape} has {array.size} voxels, more than max_voxels={max_voxels}: "
            "raise max_voxels or crop the input"
        )
    if not all(math.isnan(spacing) or (math.isfinite(spacing) and spacing > 0) for spacing in image.spacing_mm):
        raise BadInputError(f"voxel spacing {image.spacing_mm} mm is not positive and finite")
    low, high = float(array.min()), float(array.max())  # NaN propagates through min/max
    if not (np.isfinite(low) and np.isfinite(high)):
        raise BadInputError("image contains NaN or Inf values")
    if low == high:
        raise BadInputError(f"constant image (every voxel is {low:g})")


def content_hash(array: np.ndarray) -> str:
    """SHA-256 hex digest of the shape and the float32 C-order bytes, to find exact duplicates."""
    contiguous = np.ascontiguousarray(array, dtype=np.float32)
    digest = hashlib.sha256(repr(contiguous.shape).encode("ascii"))
    digest.update(contiguous.data)
    return digest.hexdigest()
