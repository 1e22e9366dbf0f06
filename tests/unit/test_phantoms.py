"""Phantom patients: determinism, stable patients, identity in the anatomy, native value ranges, real files."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from raymem.data import phantoms


def _images(kind: str, *, patients: int = 2, images_per_patient: int = 2, size: int = 32, seed: int = 0):
    return list(phantoms.generate(kind, patients=patients, images_per_patient=images_per_patient, size=size, seed=seed))


def _band_pass_correlations(images) -> np.ndarray:
    """Pearson correlation of every pair of images after a difference-of-Gaussians band-pass, (N, N)."""
    bands = np.stack([(ndimage.gaussian_filter(im.array, 1.0) - ndimage.gaussian_filter(im.array, 3.0)).ravel()
                      for im in images]).astype(np.float64)
    bands -= bands.mean(axis=1, keepdims=True)
    bands /= np.linalg.norm(bands, axis=1, keepdims=True)
    return bands @ bands.T


@pytest.mark.parametrize("kind", phantoms.KINDS)
def test_same_seed_gives_identical_images(kind):
    first, second = _images(kind), _images(kind)

    assert all(np.array_equal(a.array, b.array) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("kind", phantoms.KINDS)
def test_different_seeds_give_different_patients(kind):
    first, second = _images(kind, seed=0), _images(kind, seed=1)

    assert not any(np.allclose(a.array, b.array) for a, b in zip(first, second, strict=True))


def test_a_patient_is_the_same_whatever_the_number_of_patients():
    few = _images("xray2d", patients=2, images_per_patient=3)
    many = _images("xray2d", patients=5, images_per_patient=3)

    assert all(np.array_equal(a.array, b.array) for a, b in zip(few, many[:len(few)], strict=True))


def test_an_image_is_the_same_whatever_the_number_of_images_per_patient():
    one = _images("mri3d", patients=2, images_per_patient=1)
    three = _images("mri3d", patients=2, images_per_patient=3)

    assert all(np.array_equal(a.array, b.array) for a, b in zip(one, three[0::3], strict=True))


def test_images_made_in_small_batches_equal_images_made_together(monkeypatch):
    together = _images("ct3d", patients=1, images_per_patient=3, size=16)
    monkeypatch.setattr(phantoms, "ACQUIRE_CHUNK_VOXELS", 1)

    one_at_a_time = _images("ct3d", patients=1, images_per_patient=3, size=16)

    assert [im.image_index for im in one_at_a_time] == [0, 1, 2]
    assert all(np.array_equal(a.array, b.array) for a, b in zip(together, one_at_a_time, strict=True))


@pytest.mark.parametrize(("kind", "size"), [("xray2d", 64), ("ct3d", 32), ("mri3d", 64)])
def test_two_images_of_one_patient_correlate_more_than_images_of_two_patients(kind, size):
    images = _images(kind, patients=8, images_per_patient=3, size=size, seed=3)
    patient = np.array([im.patient_index for im in images])
    same_patient = (patient[:, None] == patient[None, :]) & ~np.eye(len(images), dtype=bool)
    other_patient = patient[:, None] != patient[None, :]

    correlations = _band_pass_correlations(images)

    assert correlations[same_patient].mean() > correlations[other_patient].mean() + 0.15


@pytest.mark.parametrize("kind", ["xray2d", "mri3d"])
def test_global_intensity_varies_as_much_within_a_patient_as_between_patients(kind):
    images = _images(kind, patients=12, images_per_patient=4, seed=4)
    means = np.array([im.array.mean() for im in images]).reshape(12, 4)

    within_patient = means.std(axis=1, ddof=1).mean()
    between_patients = means.mean(axis=1).std(ddof=1)

    assert within_patient > 0.5 * between_patients


@pytest.mark.parametrize(("kind", "shape", "spacing_mm", "modality"), [
    ("xray2d", (32, 32), (12.5, 12.5), "XR"),
    ("ct3d", (32, 32, 32), (12.5, 12.5, 12.5), "CT"),
    ("mri3d", (8, 32, 32), (20.0, 5.0, 5.0), "MR"),
])
def test_shape_spacing_and_modality(kind, shape, spacing_mm, modality):
    image = _images(kind, patients=1, images_per_patient=1)[0]

    assert (image.array.shape, image.array.dtype, image.spacing_mm, image.modality) == (
        shape, np.float32, spacing_mm, modality)


def test_xray_is_12_bit_with_bones_brighter_than_lungs():
    values = np.concatenate([im.array.ravel() for im in _images("xray2d", size=64)])

    assert values.min() >= 0 and values.max() <= 4095 and np.percentile(values, 99) > 2000


def test_ct_is_in_hounsfield_units_with_air_and_bone():
    values = np.concatenate([im.array.ravel() for im in _images("ct3d")])

    assert abs(np.percentile(values, 1) + 1000) < 60 and values.max() > 700 and values.min() >= -1024


def test_mr_is_positive():
    values = np.concatenate([im.array.ravel() for im in _images("mri3d")])

    assert values.min() >= 0 and values.max() > 100


def test_png_files_hold_the_rounded_12_bit_values(tmp_path):
    written = phantoms.write_files(str(tmp_path), "xray2d", patients=2, images_per_patient=2, size=32, seed=0,
                                   progress=False)
    last = _images("xray2d")[-1]

    pixels = np.array(Image.open(tmp_path / "patient-0001" / "img-001.png"))

    assert written == 4 and pixels.dtype == np.uint16 and np.array_equal(pixels, np.rint(last.array))


def test_nifti_files_hold_the_volume_in_xyz_order_with_spacing(tmp_path):
    phantoms.write_files(str(tmp_path), "mri3d", patients=1, images_per_patient=1, size=32, seed=0, progress=False)
    image = _images("mri3d", patients=1, images_per_patient=1)[0]

    nifti = nib.load(tmp_path / "patient-0000" / "img-000.nii.gz")

    assert np.array_equal(nifti.get_fdata().transpose(2, 1, 0), image.array)
    assert nifti.header.get_zooms() == image.spacing_mm[::-1]


def test_dicom_radiograph_carries_phi_and_pixels(tmp_path):
    phantoms.write_files(str(tmp_path), "xray2d", patients=1, images_per_patient=1, size=32, seed=7,
                         file_format="dicom", progress=False)
    image = _images("xray2d", patients=1, images_per_patient=1, seed=7)[0]

    ds = pydicom.dcmread(tmp_path / "patient-0000" / "img-000.dcm")

    assert (str(ds.PatientName), ds.PatientID, ds.InstitutionName, ds.Modality) == (
        "PHANTOM^PATIENT0000", "PHID-7-000000", "Phantom General Hospital", "DX")
    assert len(ds.PatientBirthDate) == 8 and len(ds.StudyDate) == 8
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert np.array_equal(ds.pixel_array, np.rint(image.array))


def test_dicom_ct_series_sorted_by_position_gives_back_the_volume_in_hounsfield_units(tmp_path):
    written = phantoms.write_files(str(tmp_path), "ct3d", patients=1, images_per_patient=1, size=16, seed=0,
                                   file_format="dicom", progress=False)
    image = _images("ct3d", patients=1, images_per_patient=1, size=16)[0]
    slices = [pydicom.dcmread(path) for path in sorted((tmp_path / "patient-0000" / "img-000").iterdir())]
    normal = np.cross(slices[0].ImageOrientationPatient[:3], slices[0].ImageOrientationPatient[3:])
    slices.sort(key=lambda ds: float(np.dot(ds.ImagePositionPatient, normal)))

    volume = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])

    assert written == 16 and len({ds.SeriesInstanceUID for ds in slices}) == 1
    assert np.abs(volume - image.array).max() <= 0.5


def test_dicom_uids_are_the_same_when_rewritten(tmp_path):
    for folder in ("a", "b"):
        phantoms.write_files(str(tmp_path / folder), "mri3d", patients=1, images_per_patient=1, size=16, seed=0,
                             file_format="dicom", progress=False)

    uids = [pydicom.dcmread(tmp_path / folder / "patient-0000" / "img-000" / "slice-0000.dcm").SOPInstanceUID
            for folder in ("a", "b")]

    assert uids[0] == uids[1]


@pytest.mark.parametrize(("kind", "file_format"), [("ct3d", "png"), ("xray2d", "nifti"), ("xray2d", "jpeg")])
def test_a_format_that_does_not_fit_the_kind_is_refused(tmp_path, kind, file_format):
    with pytest.raises(ValueError, match=file_format):
        phantoms.write_files(str(tmp_path), kind, patients=1, images_per_patient=1, size=16, seed=0,
                             file_format=file_format, progress=False)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"kind": "pet3d"}, "unknown phantom kind"),
    ({"size": 8}, "size must be at least"),
    ({"patients": 0}, "patients must be at least 1"),
])
def test_bad_arguments_name_the_problem(arguments, message):
    call = {"kind": "xray2d", "patients": 1, "images_per_patient": 1, "size": 32, "seed": 0, **arguments}

    with pytest.raises(ValueError, match=message):
        phantoms.generate(call.pop("kind"), **call)


def test_write_files_counts_every_file_it_writes(tmp_path):
    written = phantoms.write_files(str(tmp_path), "mri3d", patients=2, images_per_patient=1, size=16, seed=0,
                                   file_format="dicom", progress=False)

    assert written == len([path for path in Path(tmp_path).rglob("*.dcm")]) == 2 * 4
