"""Job files with a null section: the generator-null is the ldm section's LDM trained on the test split, under its own
run name and folders, sampled like the main samples; without a null section its stages are skipped. No Ray runtime."""

from __future__ import annotations

import pytest

from raymem import storage
from raymem.config import ConfigError
from raymem.data.ingest import IngestError
from raymem.jobconfig import load_job, run_stage
from raymem.train.ldm import run_uri

JOB = """
run_name: demo
data: {phantoms: {kind: xray2d, patients: PATIENTS, images_per_patient: 1, size: 32}}
ingest: INGEST
ldm: {preset: tiny, train_size: 16, diffusion_epochs: 5, batch_size: 8}
sample: {n: 48, ddim_steps: 20}
"""


def _job(tmp_path, extra: str = "", patients: int = 2, ingest: str = "{val_fraction: 0.2, test_fraction: 0.2}"):
    path = tmp_path / "job.yaml"
    job = JOB.replace("PATIENTS", str(patients)).replace("INGEST", ingest)
    path.write_text(f"storage_root: {tmp_path / 'root'}\n{job}{extra}")
    return load_job(str(path))


def test_the_null_ldm_is_the_ldm_sections_model_with_the_null_overrides_on_the_test_split(tmp_path):
    job = _job(tmp_path, "null: {diffusion_epochs: 7}\n")

    null = job.stage_config("train-null-ldm")

    assert (null.split, null.run_name, null.train_size, null.diffusion_epochs, run_uri(null)) == \
        ("test", "demo-null", 16, 7, job.paths()["null_ldm_run"])


def test_the_main_ldm_still_trains_on_the_train_split_under_the_jobs_run_name(tmp_path):
    job = _job(tmp_path, "null: {}\n")

    ldm = job.stage_config("train-ldm")

    assert (ldm.split, run_uri(ldm)) == ("train", job.paths()["ldm_run"])


def test_the_null_samples_are_drawn_like_the_main_samples_from_the_null_run_into_their_own_folder(tmp_path):
    job = _job(tmp_path, "null: {}\n")
    root = str(tmp_path / "root")

    main, null = job.stage_config("sample"), job.stage_config("sample-null")

    assert (null.model_dump(exclude={"run", "out"}), null.run, null.out) == \
        (main.model_dump(exclude={"run", "out"}), f"{root}/ldm/demo-null", f"{root}/synthetic/demo-null")


def test_the_null_section_cannot_choose_another_split(tmp_path):
    with pytest.raises(ConfigError, match=r"null\.split: set by the job"):
        _job(tmp_path, "null: {split: train}\n")


def test_a_null_section_without_a_test_split_is_refused_naming_ingest_test_fraction(tmp_path):
    with pytest.raises(ConfigError, match=r"ingest\.test_fraction"):
        _job(tmp_path, "null: {}\n", patients=10, ingest="{val_fraction: 0.2, test_fraction: 0.0}")


def test_the_null_stages_are_skipped_without_a_null_section(tmp_path):
    job = _job(tmp_path)

    summaries = [run_stage(job, stage) for stage in ("train-null-ldm", "sample-null")]

    assert (summaries, storage.exists(str(tmp_path / "root"))) == ([{"skipped": "no null section"}] * 2, False)


def test_too_few_patients_for_the_splits_asked_for_are_refused_at_the_data_stage(tmp_path):
    job = _job(tmp_path, "null: {}\n")  # 2 patients cannot fill train, val and test

    with pytest.raises(IngestError, match=r"2 patient\(s\) cannot fill train, val, test.*test_fraction"):
        run_stage(job, "data")


def test_the_null_ldm_refuses_a_test_split_smaller_than_one_batch_naming_batch_size(tmp_path):
    job = _job(tmp_path, "null: {train_size: null}\n", patients=10)  # 2 test patients, 1 image each; batch_size 8
    run_stage(job, "data")

    with pytest.raises(ValueError, match=r"2 test images to train on, fewer than batch_size"):
        run_stage(job, "train-null-ldm")


def test_the_audit_of_a_job_with_a_null_section_refuses_missing_null_samples_naming_the_stages(tmp_path):
    job = _job(tmp_path, "null: {}\n")

    with pytest.raises(ConfigError, match="null: the job has a null section .* run the train-null-ldm and sample-null"):
        run_stage(job, "audit")
