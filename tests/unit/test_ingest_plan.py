"""The ingest's planning steps without Ray: patient layouts, split assignment, duplicates across splits, PHI-free
sources."""

import pytest

from raymem.data.ingest import (IngestError, assign_splits, cross_split_duplicates, layout_warnings, path_patients,
                                safe_source)


@pytest.mark.parametrize("paths, expected", [
    (["p1/a.png", "p1/b.png", "p2/a.png"], {"p1/a.png": "p1", "p1/b.png": "p1", "p2/a.png": "p2"}),
    (["p1/CT/s1/1.dcm", "p1/CT/s2/1.dcm", "p2/CT/s1/1.dcm"],
     {"p1/CT/s1/1.dcm": "p1", "p1/CT/s2/1.dcm": "p1", "p2/CT/s1/1.dcm": "p2"}),
    (["export/p1/x/a.png", "export/p2/y/b.png"], {"export/p1/x/a.png": "export/p1", "export/p2/y/b.png": "export/p2"}),
    (["ward/a.png", "ward/b.png"], {"ward/a.png": "ward", "ward/b.png": "ward"}),
])
def test_auto_layout_takes_the_first_folder_below_the_shared_ones(paths, expected):
    patients, warnings = path_patients(paths, "auto")

    assert (patients, warnings) == (expected, [])


def test_files_outside_any_patient_folder_are_their_own_patients_with_a_warning():
    patients, warnings = path_patients(["a.png", "b.png", "p1/c.png"], "auto")

    assert patients == {"a.png": "a.png", "b.png": "b.png", "p1/c.png": "p1"}
    assert len(warnings) == 1 and "2 of 3 files lie in no patient folder" in warnings[0]


def test_a_regex_pattern_names_the_patient():
    patients, _ = path_patients(["site/P-17_scan.png"], r"/(?P<patient>P-\d+)_")

    assert patients == {"site/P-17_scan.png": "P-17"}


def test_layout_warnings_flag_few_patients_and_one_dominant_patient():
    warnings = layout_warnings(["a"] * 30 + ["b"] * 3 + [f"p{k}" for k in range(10)])

    assert len(warnings) == 1 and "one patient holds 30 of 43 images" in warnings[0]
    assert "only 3 patients" in layout_warnings(["a", "b", "c"])[0]


def test_every_split_asked_for_gets_a_patient():
    split_of = assign_splits([f"p{k}" for k in range(4)], 0.1, 0.1, seed=0)

    assert sorted(split_of.values()) == ["test", "train", "train", "val"]


def test_splits_that_cannot_be_filled_are_refused():
    with pytest.raises(IngestError, match=r"2 patient\(s\) cannot fill train, val, test"):
        assign_splits(["a", "b", "a"], 0.1, 0.1, seed=0)


def test_without_held_out_splits_a_single_patient_is_fine():
    assert assign_splits(["a", "a"], 0.0, 0.0, seed=0) == {"a": "train"}


def test_identical_images_across_splits_are_kept_in_the_first_split_only():
    dropped = cross_split_duplicates(["s1", "s2", "s3", "s4", "s5"], ["h", "h", "h", "g", "g"],
                                     ["test", "train", "val", "val", "test"])

    assert dropped == {"s1": "train", "s3": "train", "s5": "val"}


def test_safe_source_keeps_no_path_component():
    source = safe_source("Doe-John-1970/Doe-John_chest.nii.gz", b"k", "p-0123")

    assert source.startswith("p-0123/f-") and source.endswith(".nii.gz")
    assert "Doe" not in source and "1970" not in source and "chest" not in source


def test_safe_source_keeps_a_medmnist_index_and_tells_files_apart():
    assert safe_source("a.npz#train/3", b"k", None).endswith(".npz#train/3")
    assert safe_source("x/a.png", b"k", None) != safe_source("y/a.png", b"k", None)


def test_png_and_nifti_folder_and_file_names_leave_no_trace_in_patient_ids_or_sources():
    from raymem.data import formats
    from raymem.data.ingest import path_patients, safe_source

    # exports name folders and files after patients and dates
    relative = ["export/Doe-John_1970-01-01/Doe-John_1970-01-01_chest.png",
                "export/Doe-John_1970-01-01/Doe-John_1970-01-01_chest_lateral.png",
                "export/Roe-Jane_19800202/ct_2020-03-04.nii.gz"]
    phi = ["Doe", "John", "1970-01-01", "Roe", "Jane", "19800202", "2020-03-04", "chest", "lateral", "ct_"]
    key = b"site key"

    patient_of, _ = path_patients(relative, "auto")
    ids = {path: formats.pseudonymize(patient_of[path], key) for path in relative}
    sources = [safe_source(path, key, ids[path]) for path in relative]

    assert not [s for s in phi for text in [*ids.values(), *sources] if s in text]
    # one patient per folder, two files of one patient told apart, the format still readable from the source
    assert len(set(ids.values())) == 2 and len(set(sources)) == 3
    assert sources[0].endswith(".png") and sources[2].endswith(".nii.gz")
    assert all(source.startswith(ids[path] + "/f-") for path, source in zip(relative, sources))
    # keyed: the same key gives the same pseudonyms, another key others (no dictionary attack without the key)
    assert formats.pseudonymize(patient_of[relative[0]], key) == ids[relative[0]]
    assert formats.pseudonymize(patient_of[relative[0]], b"other key") != ids[relative[0]]
