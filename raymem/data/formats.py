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

import gzip
import hashlib
import hmac
import logging
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
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

logger = logging.getLogger(__name__)

FORMATS = ("nifti", "dicom", "png", "medmnist")  # "png" covers PNG and JPEG
MODALITIES = ("CT", "MR", "XR", "OT")
MEDMNIST_SPLITS = ("train", "val", "test")
DEFAULT_PATIENT_PATTERN = r"(?P<patient>[^/]+)/[^/]+$"  # the file's parent directory name

_EXTENSION_FORMATS = (
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
# What the image libraries raise on malformed input. Only library calls run under this net,
# so a bug in this module still surfaces as itself.
_LIBRARY_ERRORS = (
    InvalidDicomError,
    ImageFileError,
    Image.DecompressionBombError,
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
    spacing_mm: voxel size per array axis.
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
    patient_key: PatientID or None. PHI: pass only to :func:`pseudonymize`.
    modality: one of MODALITIES.
    slice_position_mm: ImagePositionPatient projected on the slice normal, None without geometry.
    instance_number: InstanceNumber or None.
    has_pixels: whether a (Float/Double Float) Pixel Data element follows the header.
    """

    series_uid: str = field(repr=False)  # kept out of repr, like patient_key: never logged
    patient_key: str | None = field(repr=False)
    modality: str
    slice_position_mm: float | None
    instance_number: int | None
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
    for extension, file_format in _EXTENSION_FORMATS:
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


def read_nifti(data: bytes, source: str, *, modality: str = "OT") -> RawImage:
    """Read a .nii or .nii.gz file.

    The voxels are fully decoded here, so a truncated or corrupt file fails now, not later.
    NIfTI stores (x, y, z[, t]); the result reverses the axes to (z, y, x) (a 4D file gives
    (t, z, y, x)) after dropping trailing singleton axes, so a single-slice file is (H, W).
    No reorientation is applied: axes are the file's voxel axes. Spacing comes from pixdim,
    converted to mm where the header states metres or microns. NIfTI has no modality or patient
    field: ``modality`` is the caller's, patient_key is None (take it from the path).
    """
    if data[:2] == b"\x1f\x8b":
        with _library_errors_as("truncated or corrupt gzip stream"):
            data = gzip.decompress(data)
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


def read_png(data: bytes, source: str, *, modality: str = "XR") -> RawImage:
    """Read an 8- or 16-bit PNG or a JPEG as an (H, W) image.

    Grey values are kept as stored (a 16-bit PNG keeps 0..65535); colour becomes luma. PNG and
    JPEG carry no reliable pixel spacing, so spacing is 1.0 per axis (pixel units).
    """
    with _library_errors_as("not an image (PNG/JPEG decoder failed)"):
        with Image.open(BytesIO(data)) as image:
            image.load()
            if image.mode in ("1", "L", "I", "F") or image.mode.startswith("I;16"):
                pixels = np.asarray(image, dtype=np.float32)
            else:
                pixels = _luminance(np.asarray(image.convert("RGB")))
    return RawImage(array=pixels, spacing_mm=(1.0, 1.0), modality=modality, patient_key=None, source=source)


def _read_dicom(stream: BytesIO, *, with_pixels: bool) -> pydicom.Dataset:
    with _library_errors_as("not a DICOM file (no 'DICM' marker at byte 128, or a corrupt header)"):
        return pydicom.dcmread(stream, stop_before_pixels=not with_pixels)


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


def read_dicom_header(data: bytes, source: str) -> DicomHeader:
    """Read the header of one DICOM file, stopping before the pixel data."""
    stream = BytesIO(data)
    with pydicom.config.disable_value_validation():  # its warnings would quote header values
        dataset = _read_dicom(stream, with_pixels=False)
        with _library_errors_as("malformed DICOM header"):
            return DicomHeader(
                series_uid=str(dataset.get("SeriesInstanceUID", "")) or source,
                patient_key=_dicom_patient_key(dataset),
                modality=_dicom_modality(dataset),
                slice_position_mm=_slice_position_mm(dataset, dataset.get("ImagePositionPatient")),
                instance_number=_instance_number(dataset),
                # stop_before_pixels leaves the stream at the pixel data element, or at the end without one
                has_pixels=stream.tell() < len(data),
            )


def _dicom_pixels(dataset: pydicom.Dataset) -> np.ndarray:
    """Decoded pixels with the modality LUT / rescale applied: (H, W) or (frames, H, W) float32."""
    if not any(keyword in dataset for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise BadInputError("DICOM without pixel data")
    transfer_syntax = dataset.file_meta.get("TransferSyntaxUID")
    syntax_name = transfer_syntax.name if transfer_syntax is not None else "unknown transfer syntax"
    with _library_errors_as(f"DICOM pixel data could not be decoded, transfer syntax {syntax_name}"):
        pixels = dataset.pixel_array
    with _library_errors_as("malformed DICOM rescale attributes"):
        if int(dataset.get("SamplesPerPixel", 1)) > 1:
            return _luminance(pixels)
        if "ModalityLUTSequence" in dataset:
            return apply_modality_lut(pixels, dataset).astype(np.float32)
        slope = float(_dicom_attribute(dataset, "RescaleSlope", 1.0))
        intercept = float(_dicom_attribute(dataset, "RescaleIntercept", 0.0))
        return (pixels.astype(np.float64) * slope + intercept).astype(np.float32)


def _pixel_spacing_mm(dataset: pydicom.Dataset) -> tuple[float, float]:
    """(row spacing, column spacing) = (y, x); projection X-ray stores ImagerPixelSpacing instead."""
    spacing = _dicom_attribute(dataset, "PixelSpacing") or _dicom_attribute(dataset, "ImagerPixelSpacing")
    if spacing is None or len(spacing) != 2:
        return (1.0, 1.0)
    return (float(spacing[0]), float(spacing[1]))


def _slice_gap_mm(dataset: pydicom.Dataset, sorted_positions_mm: Sequence[float] | None) -> float:
    """Median gap between sorted slice positions; without them SpacingBetweenSlices, SliceThickness or 1.0."""
    if sorted_positions_mm is not None and len(sorted_positions_mm) > 1:
        return float(np.median(np.abs(np.diff(sorted_positions_mm))))
    declared = _dicom_attribute(dataset, "SpacingBetweenSlices") or _dicom_attribute(dataset, "SliceThickness")
    return float(declared) if declared else 1.0


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


def read_dicom_series(files: Sequence[tuple[str, bytes]], *, source: str | None = None) -> RawImage:
    """Read one DICOM series: a single file or the files of one series, as (source, bytes) pairs.

    One single-frame file gives an (H, W) image; one multi-frame file gives (frames, H, W) in
    stored frame order; several single-frame files give a (D, H, W) volume sorted by position
    along the slice normal (InstanceNumber without geometry). Spacing is (slice gap, PixelSpacing):
    the median gap between positions, else SpacingBetweenSlices/SliceThickness, else 1.0 mm.
    Values are RescaleSlope * stored + RescaleIntercept (HU for CT); MONOCHROME1 is inverted
    within the volume's value range so bright always means dense. patient_key is the first
    file's PatientID. ``source`` labels the result (e.g. "<dir>/series-<n>"); by default the
    first file's source.
    """
    assert files, "read_dicom_series needs at least one file"
    with pydicom.config.disable_value_validation():  # its warnings would quote header values
        datasets = [_read_dicom(BytesIO(data), with_pixels=True) for _, data in files]
        slices = [_dicom_pixels(dataset) for dataset in datasets]
        first = datasets[0]
        with _library_errors_as("malformed DICOM geometry attributes"):
            if len(datasets) == 1:
                volume = slices[0]
                sorted_positions = _frame_positions_mm(first) if volume.ndim == 3 else None
            else:
                if len({str(dataset.get("SeriesInstanceUID", "")) for dataset in datasets}) > 1:
                    raise BadInputError("files from more than one DICOM series")
                if any(pixels.ndim != 2 for pixels in slices):
                    raise BadInputError("multi-frame DICOM files cannot be stacked into one series")
                if len({pixels.shape for pixels in slices}) > 1:
                    raise BadInputError("inconsistent slice shapes in DICOM series")
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


def read_medmnist(data: bytes, source: str, *, modality: str = "OT") -> list[RawImage]:
    """Read a MedMNIST .npz: every image of its train_images/val_images/test_images arrays.

    Arrays are (N, H, W) or (N, H, W, C) for 2D (colour becomes luma) and (N, D, H, W) for 3D; a
    4-axis array whose last axis is 1, 3 or 4 long is read as channels. Labels are ignored. Each image is its own patient (MedMNIST has no patient ids): source and
    patient_key are f"{source}#{split}/{index}". Values stay as stored (0..255), spacing 1.0.
    """
    with _library_errors_as("not a MedMNIST .npz file"):
        archive = np.load(BytesIO(data), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise BadInputError("not a MedMNIST .npz file (a single .npy array)")
        with archive:
            images_by_split = {
                split: archive[f"{split}_images"] for split in MEDMNIST_SPLITS if f"{split}_images" in archive.files
            }
    if not images_by_split:
        raise BadInputError("no train_images/val_images/test_images array in .npz (not a MedMNIST file)")
    raw_images = []
    for split, images in images_by_split.items():
        if images.ndim == 4 and images.shape[-1] in (1, 3, 4):
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
    non-positive or non-finite spacing, NaN or Inf values, a constant image.
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
    if not all(np.isfinite(spacing) and spacing > 0 for spacing in image.spacing_mm):
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
