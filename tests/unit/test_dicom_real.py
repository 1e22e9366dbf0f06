"""The DICOM reader on real encoded files: pydicom's own test files and the pydicom-data package.

Each compressed transfer syntax is decoded through ``read_dicom_series`` and compared with a twin
holding the same image uncompressed: equal for lossless encodings, close for lossy ones.
"""

import math
from pathlib import Path

import data_store
import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, pixel_array

from raymem.data import formats
from raymem.data.formats import BadInputError, read_dicom_series, validate
from raymem.data.transforms import fit_to_shape

PYDICOM_DATA = Path(data_store.__file__).parent / "data"
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])

# (encoded file, its transfer syntax, the same image stored uncompressed)
LOSSLESS = [
    ("MR_small_RLE.dcm", uid.RLELossless, "MR_small.dcm"),
    ("SC_rgb_rle.dcm", uid.RLELossless, "SC_rgb.dcm"),
    ("emri_small_RLE.dcm", uid.RLELossless, "emri_small.dcm"),
    ("SC_rgb_jpeg_gdcm.dcm", uid.JPEGLosslessSV1, "SC_rgb.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", uid.JPEGLSLossless, "MR_small.dcm"),
    ("emri_small_jpeg_ls_lossless.dcm", uid.JPEGLSLossless, "emri_small.dcm"),
    ("MR_small_jp2klossless.dcm", uid.JPEG2000Lossless, "MR_small.dcm"),
    ("emri_small_jpeg_2k_lossless.dcm", uid.JPEG2000Lossless, "emri_small.dcm"),
    ("MR2_J2KR.dcm", uid.JPEG2000Lossless, "MR2_UNCR.dcm"),
    ("US1_J2KR.dcm", uid.JPEG2000Lossless, "US1_UNCR.dcm"),  # colour, YBR_RCT
]
# (encoded file, its transfer syntax, its source image, largest mean |difference| from it)
LOSSY = [
    ("SC_rgb_jpeg_dcmtk.dcm", uid.JPEGBaseline8Bit, "SC_rgb.dcm", 1.0),  # YBR_FULL
    ("SC_rgb_jpeg_lossy_gdcm.dcm", uid.JPEGBaseline8Bit, "SC_rgb.dcm", 1.0),
    ("JPGExtended.dcm", uid.JPEGExtended12Bit, "JPEG-LL.dcm", 5.0),  # 12-bit, values 0..278
    ("SC_rgb_jls_lossy_line.dcm", uid.JPEGLSNearLossless, "SC_rgb.dcm", 2.0),
    # the *_UNC* files hold the lossy JPEG 2000 image decoded and stored uncompressed
    ("JPEG2000.dcm", uid.JPEG2000, "JPEG2000_UNC.dcm", 0.0),
    ("MR2_J2KI.dcm", uid.JPEG2000, "MR2_UNCI.dcm", 0.0),
]
# (encoded file, its transfer syntax): no uncompressed twin shipped
WITHOUT_TWIN = [
    ("JPEGLSNearLossless_16.dcm", uid.JPEGLSNearLossless),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", uid.JPEGLosslessSV1),
    ("JPEG-LL.dcm", uid.JPEGLosslessSV1),
]
COMPRESSED_SYNTAXES = [
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
]


def dicom_path(name: str) -> Path:
    """A test file from pydicom-data, else from pydicom's own test files."""
    path = PYDICOM_DATA / name
    return path if path.exists() else Path(get_testdata_file(name))


def read(name: str, **options) -> formats.RawImage:
    return read_dicom_series([(f"case/{name}", dicom_path(name).read_bytes())], **options)


@pytest.mark.parametrize(("name", "transfer_syntax"), [case[:2] for case in LOSSLESS + LOSSY + WITHOUT_TWIN])
def test_test_file_has_the_transfer_syntax_it_stands_for(name, transfer_syntax):
    assert pydicom.dcmread(dicom_path(name), stop_before_pixels=True).file_meta.TransferSyntaxUID == transfer_syntax


@pytest.mark.parametrize("transfer_syntax", COMPRESSED_SYNTAXES, ids=lambda syntax: syntax.name)
def test_pydicom_has_a_decoder_for_every_compressed_transfer_syntax(transfer_syntax):
    # JPEG lossless and JPEG-LS have no decoder but pylibjpeg-libjpeg: this fails where it is missing
    assert pydicom.pixels.get_decoder(transfer_syntax).is_available


@pytest.mark.parametrize(("name", "transfer_syntax", "twin"), LOSSLESS, ids=[case[0] for case in LOSSLESS])
def test_lossless_encoding_decodes_to_its_uncompressed_twin(name, transfer_syntax, twin):
    np.testing.assert_array_equal(read(name).array, read(twin).array)


@pytest.mark.parametrize(("name", "transfer_syntax", "source", "tolerance"), LOSSY, ids=[case[0] for case in LOSSY])
def test_lossy_encoding_decodes_close_to_its_source(name, transfer_syntax, source, tolerance):
    decoded, expected = read(name).array, read(source).array

    assert (decoded.shape, float(np.abs(decoded - expected).mean()) <= tolerance) == (expected.shape, True)


@pytest.mark.parametrize(("name", "transfer_syntax"), WITHOUT_TWIN, ids=[case[0] for case in WITHOUT_TWIN])
def test_encoding_without_twin_decodes_within_its_bit_depth(name, transfer_syntax):
    header = pydicom.dcmread(dicom_path(name), stop_before_pixels=True)

    image = read(name)

    within_bit_depth = 0 <= image.array.min() < image.array.max() < 2**header.BitsStored
    assert (image.array.shape, within_bit_depth) == ((header.Rows, header.Columns), True)


def test_broken_jpeg_is_bad_input_naming_its_transfer_syntax():
    # pydicom's JPEG-lossy.dcm has a marker in the wrong place: libjpeg cannot decode it
    with pytest.raises(BadInputError, match=r"could not be decoded, transfer syntax JPEG Extended \(Process 2 and 4\)"):
        read("JPEG-lossy.dcm")


def test_missing_decoder_is_bad_input_saying_what_to_install(monkeypatch):
    class NoPlugins:
        is_available = False

    monkeypatch.setattr(formats, "get_decoder", lambda transfer_syntax: NoPlugins())

    with pytest.raises(BadInputError, match="no decoder installed for DICOM transfer syntax JPEG-LS .* pylibjpeg"):
        read("MR_small_jpeg_ls_lossless.dcm")


def test_ybr_full_422_becomes_the_luma_of_its_rgb_source():
    luma_of_rgb = pixel_array(dicom_path("SC_rgb.dcm")) @ LUMA_WEIGHTS

    # pydicom converts YBR to RGB; luma of the raw (Y, Cb, Cr) would be off by up to 141
    np.testing.assert_allclose(read("SC_ybr_full_422_uncompressed.dcm").array, luma_of_rgb, atol=2.0)


def test_ybr_jpeg_ultrasound_frame_becomes_its_y_channel():
    y_channel = pixel_array(dicom_path("examples_ybr_color.dcm"), index=0, as_rgb=False)[..., 0]

    cine = read("examples_ybr_color.dcm")

    # luma of the RGB pydicom converts to is Y again; luma of the raw channels would be off by up to 97
    np.testing.assert_allclose(cine.array[0], y_channel, atol=8.0)


def test_palette_colour_ultrasound_becomes_luma_of_its_lookup_table():
    path = dicom_path("OBXXXX1A.dcm")
    luma_of_palette = apply_color_lut(pixel_array(path), pydicom.dcmread(path)) @ LUMA_WEIGHTS

    np.testing.assert_allclose(read("OBXXXX1A.dcm").array, luma_of_palette, rtol=1e-5)


def test_monochrome1_radiograph_is_inverted():
    stored = pixel_array(dicom_path("RG3_UNCR.dcm")).astype(np.float32)  # CR, MONOCHROME1, no rescale

    np.testing.assert_array_equal(read("RG3_UNCR.dcm").array, stored.max() + stored.min() - stored)


def test_radiograph_with_zero_pixel_spacing_has_unknown_spacing_and_is_usable_in_2d():
    image = read("RG1_UNCR.dcm")  # a real CR with PixelSpacing "0\0"

    validate(image, spatial_dims=2, max_voxels=512**3)
    assert all(math.isnan(spacing) for spacing in image.spacing_mm)


def test_image_with_unknown_spacing_resizes_and_keeps_spacing_unknown():
    image = read("RG3_UNCR.dcm")  # a real CR without PixelSpacing

    resized, spacing_mm = fit_to_shape(image.array, image.spacing_mm, (64, 64), mode="resize")

    assert (resized.shape, bool(np.isfinite(resized).all()), [math.isnan(s) for s in spacing_mm]) == (
        (64, 64),
        True,
        [True, True],
    )


def test_volume_with_unknown_in_plane_spacing_resamples_in_3d():
    volume = read("emri_small.dcm", spatial_dims=3)  # multi-frame MR, SpacingBetweenSlices 1.2, no PixelSpacing
    validate(volume, spatial_dims=3, max_voxels=512**3)

    resampled, spacing_mm = fit_to_shape(volume.array, volume.spacing_mm, (8, 32, 32), mode="resize")

    finite = bool(np.isfinite(resampled).all())
    assert (resampled.shape, finite, spacing_mm[0], [math.isnan(s) for s in spacing_mm[1:]]) == (
        (8, 32, 32),
        True,
        pytest.approx(1.5),
        [True, True],
    )


def test_multi_frame_file_where_2d_images_are_expected_is_bad_input_before_decoding():
    expected = r"multi-frame DICOM \(10 frames\) where 2D images are expected: .*spatial_dims=3"

    with pytest.raises(BadInputError, match=expected):
        read("emri_small.dcm", spatial_dims=2)


@pytest.mark.parametrize("name, implicit_vr, little_endian", [
    ("MR_small_implicit.dcm", True, True), ("MR_small.dcm", False, True), ("MR_small_bigendian.dcm", False, False)])
def test_a_bare_dataset_without_preamble_or_file_meta_reads_like_the_file(name, implicit_vr, little_endian):
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    path = get_testdata_file(name)
    stream = DicomBytesIO()
    stream.is_implicit_VR, stream.is_little_endian = implicit_vr, little_endian
    write_dataset(stream, pydicom.dcmread(path))  # what older systems write: no preamble, no 'DICM', no meta

    bare = formats.read_dicom_series([("bare", stream.getvalue())], spatial_dims=2)
    full = formats.read_dicom_series([("full", Path(path).read_bytes())], spatial_dims=2)

    assert np.array_equal(bare.array, full.array)


def test_bytes_that_are_no_dataset_are_still_not_dicom():
    with pytest.raises(formats.BadInputError, match="not a DICOM file"):
        formats.read_dicom_header(b"hello world\n" * 50, "notes")
