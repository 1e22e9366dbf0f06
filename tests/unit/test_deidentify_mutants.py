"""De-identification, pinned exactly: pseudonyms and keyed file hashes against hmac/hashlib computed here, patient
keys from paths against keys written out by hand, layout warnings against their full text.

Written to kill the mutants that survived ``tools/mutation.sh`` on formats.pseudonymize / pseudonym_key_from_env /
patient_key_from_path and ingest._keyed_digest / safe_source / path_patients / layout_warnings.
"""

import hashlib
import hmac
import logging
import logging.handlers

import pytest

from raymem.data.formats import patient_key_from_path, pseudonym_key_from_env, pseudonymize
from raymem.data.ingest import _keyed_digest, layout_warnings, path_patients, safe_source

KEY = b"site secret"


def hmac_hex(key: bytes, text: str) -> str:
    """HMAC-SHA256 of the UTF-8 text, in hex, computed with the standard library only."""
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


# --- pseudonymize ----------------------------------------------------------------------------------------------


def test_pseudonym_is_p_dash_and_the_first_16_hex_digits_of_hmac_sha256():
    pseudonym = pseudonymize("Doe^John^1970-01-01", KEY)

    assert pseudonym == "p-" + hmac_hex(KEY, "Doe^John^1970-01-01")[:16]


def test_pseudonym_of_a_non_ascii_name_hashes_its_utf8_bytes():
    expected = "p-" + hmac.new(KEY, b"M\xc3\xbcller^J\xc3\xb6rg", hashlib.sha256).hexdigest()[:16]

    assert pseudonymize("Müller^Jörg", KEY) == expected


def test_a_patient_name_and_birth_date_never_appear_in_the_pseudonym():
    pseudonym = pseudonymize("Doe^John^19700101", KEY)

    assert not [part for part in ("Doe", "John", "1970", "0101") if part in pseudonym]


# --- pseudonym_key_from_env ------------------------------------------------------------------------------------


def test_the_key_is_the_utf8_bytes_of_the_variable_named(monkeypatch):
    monkeypatch.setenv("SITE_KEY", "clé-secrète")

    assert pseudonym_key_from_env("SITE_KEY") == ("clé-secrète".encode("utf-8"), True)


def test_without_the_variable_each_ingest_draws_another_random_key(monkeypatch):
    monkeypatch.delenv("SITE_KEY", raising=False)

    (first, _), (second, _) = pseudonym_key_from_env("SITE_KEY"), pseudonym_key_from_env("SITE_KEY")

    assert first != second


def test_the_missing_key_warning_names_the_variable_to_set(monkeypatch):
    monkeypatch.delenv("SITE_KEY", raising=False)
    records = logging.handlers.BufferingHandler(capacity=10)  # pytest's caplog is off in this project
    formats_logger = logging.getLogger("raymem.data.formats")
    formats_logger.addHandler(records)
    try:
        pseudonym_key_from_env("SITE_KEY")
    finally:
        formats_logger.removeHandler(records)

    (message,) = [record.getMessage() for record in records.buffer if record.levelno == logging.WARNING]
    assert message == (
        "SITE_KEY is not set: using a random pseudonym key, so patient ids will not match those of any other ingest "
        "(a later audit cannot link the same patient across datasets, and the patient split changes with every "
        "ingest). Set SITE_KEY to a fixed secret.")


def test_an_empty_variable_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("SITE_KEY", "")

    with pytest.raises(ValueError, match="^SITE_KEY is set but empty"):
        pseudonym_key_from_env("SITE_KEY")


# --- patient_key_from_path -------------------------------------------------------------------------------------


def test_by_default_the_patient_is_the_files_parent_folder():
    assert patient_key_from_path("export/Doe-John_1970/study/chest.png") == "study"


def test_by_default_a_file_in_no_folder_has_no_patient():
    assert patient_key_from_path("Doe-John_chest.png") is None


def test_an_empty_patient_group_is_no_patient():
    assert patient_key_from_path("scans/chest.png", r"^(?P<patient>\d*)scans/") is None


# --- _keyed_digest and safe_source -----------------------------------------------------------------------------


def test_keyed_digest_is_20_hex_digits_of_hmac_sha256_by_default():
    assert _keyed_digest(KEY, "series/1.2.840.1") == hmac_hex(KEY, "series/1.2.840.1")[:20]


def test_safe_source_is_patient_id_slash_f_dash_16_hex_digits_of_the_keyed_path_and_the_extension():
    source = safe_source("Doe-John_1970-01-01/Doe-John_chest.nii.gz", KEY, "p-0123456789abcdef")

    expected = "p-0123456789abcdef/f-" + hmac_hex(KEY, "file:Doe-John_1970-01-01/Doe-John_chest.nii.gz")[:16] + ".nii.gz"
    assert source == expected


def test_safe_source_of_a_medmnist_image_hashes_the_archive_path_and_keeps_split_and_index():
    source = safe_source("site/Doe-John.npz#train/3", KEY, None)

    assert source == "f-" + hmac_hex(KEY, "file:site/Doe-John.npz")[:16] + ".npz#train/3"


def test_safe_source_of_a_file_without_index_ends_with_its_extension():
    source = safe_source("Roe-Jane/1980-02-02.png", KEY, None)

    assert source == "f-" + hmac_hex(KEY, "file:Roe-Jane/1980-02-02.png")[:16] + ".png"


def test_no_folder_or_file_name_nor_date_reaches_patient_ids_or_sources():
    relative = ["Doe-John_1970-01-01/2020-03-04_chest.png", "Roe-Jane_1980-02-02/2021-05-06_knee.png"]
    patient_of, _ = path_patients(relative, "auto")

    published = [text for path in relative
                 for text in (pseudonymize(patient_of[path], KEY),
                              safe_source(path, KEY, pseudonymize(patient_of[path], KEY)))]

    phi = ["Doe", "John", "Roe", "Jane", "1970", "1980", "2020", "2021", "03-04", "chest", "knee"]
    assert [part for part in phi for text in published if part in text] == []


# --- path_patients ---------------------------------------------------------------------------------------------


def test_no_files_have_no_patients_and_no_warnings():
    assert path_patients([], "auto") == ({}, [])


def test_auto_layout_below_two_shared_folders_takes_the_third():
    paths = ["hospital/export/Doe-John/a.png", "hospital/export/Roe-Jane/b.png"]

    patients, _ = path_patients(paths, "auto")

    assert patients == {paths[0]: "hospital/export/Doe-John", paths[1]: "hospital/export/Roe-Jane"}


def test_auto_layout_with_every_file_in_one_deep_folder_is_that_folder():
    paths = ["hospital/Doe-John/a.png", "hospital/Doe-John/b.png"]

    patients, _ = path_patients(paths, "auto")

    assert patients == {paths[0]: "hospital/Doe-John", paths[1]: "hospital/Doe-John"}


def test_auto_layout_with_patient_study_series_keeps_only_the_patient_level():
    paths = ["Doe-John/study1/series1/1.dcm", "Roe-Jane/study1/series1/1.dcm"]

    patients, _ = path_patients(paths, "auto")

    assert patients == {paths[0]: "Doe-John", paths[1]: "Roe-Jane"}


def test_auto_layout_of_loose_files_makes_each_its_own_patient():
    patients, _ = path_patients(["a.png", "b.png"], "auto")

    assert patients == {"a.png": "a.png", "b.png": "b.png"}


def test_loose_files_are_counted_in_the_warning_with_the_pattern():
    _, warnings = path_patients(["a.png", "b.png", "p1/c.png"], "auto")

    assert warnings == ["2 of 3 files lie in no patient folder (patient_pattern 'auto'): each is taken as its own "
                        "patient"]


def test_a_regex_that_misses_a_file_makes_it_its_own_patient_with_a_warning():
    pattern = r"^(?P<patient>P-\d+)/"

    result = path_patients(["P-1/a.png", "P-2/b.png", "scan.png"], pattern)

    assert result == ({"P-1/a.png": "P-1", "P-2/b.png": "P-2", "scan.png": "scan.png"},
                      ["1 of 3 files lie in no patient folder (patient_pattern '^(?P<patient>P-\\\\d+)/'): each is "
                       "taken as its own patient"])


# --- layout_warnings -------------------------------------------------------------------------------------------


def test_no_images_give_no_layout_warning():
    assert layout_warnings([]) == []


def test_ten_patients_with_at_most_half_of_the_images_each_give_no_warning():
    patient_ids = ["a"] * 9 + [f"p{k}" for k in range(9)]  # 10 patients, "a" holds exactly half of 18 images

    assert layout_warnings(patient_ids) == []


def test_nine_patients_are_too_few():
    patient_ids = [f"p{k}" for k in range(9)]

    assert layout_warnings(patient_ids) == [
        "9 images come from only 9 patients (fewer than 10): check patient_pattern or the DICOM PatientID; "
        "patient-level splits and intervals need more"
    ]


def test_a_single_patient_is_too_few_but_not_called_dominant():
    assert len(layout_warnings(["a", "a", "a"])) == 1


def test_one_of_two_patients_holding_most_images_is_flagged():
    warnings = layout_warnings(["a", "a", "b"])

    assert warnings[1] == ("one patient holds 2 of 3 images: check that the layout's patient level is the patient "
                           "(not a study, series or wrapper folder)")
