"""A shared stage (data, detector, embeddings) is reused by a rerun, or by another sweep of the same study, only
under the settings it was made from: each records them, and a reuse under other settings is refused with the names
of the settings that differ. No Ray runtime: the outputs are stand-in files, so only the reuse path runs."""

from __future__ import annotations

import json

import pytest

from raymem import storage
from raymem.config import ConfigError
from raymem.jobconfig import _record, load_job, run_stage, stage_settings

JOB = """
run_name: study
data: {phantoms: {kind: xray2d, patients: 20, images_per_patient: 2, size: 32, seed: 0}}
ingest: {val_fraction: 0.2, test_fraction: 0.2}
detector: {preset: tiny, epochs: 3, num_workers: 1}
embed: {batch_size: 32, num_actors: 1}
"""


def _job(tmp_path, **sections: str):
    text = JOB
    for name, value in sections.items():
        text = "\n".join(f"{name}: {value}" if line.startswith(f"{name}:") else line for line in text.splitlines())
    path = tmp_path / "job.yaml"
    path.write_text(f"storage_root: {tmp_path / 'root'}\n{text}\n")
    return load_job(str(path))


def _made(job, *stages: str) -> None:
    """Stand-ins for committed outputs, each with the record its stage writes."""
    paths = job.paths()
    outputs = {"data": storage.join(paths["dataset"], "manifest.json"), "train-detector": paths["detector"],
               "embed": storage.join(paths["embeddings"], "rows.json")}
    for stage in stages:
        storage.write_bytes(outputs[stage], b"{}")
        _record(job, stage)


@pytest.mark.parametrize("stage", ["data", "train-detector", "embed"])
def test_an_output_is_reused_under_the_settings_it_was_made_from(tmp_path, stage):
    job = _job(tmp_path)
    _made(job, "data", "train-detector", "embed")

    assert run_stage(job, stage)  # skipped: nothing is run, nothing raised


@pytest.mark.parametrize("changes, stage, named", [
    ({"ingest": "{val_fraction: 0.2, test_fraction: 0.0}"}, "data", "ingest.test_fraction"),
    ({"data": "{phantoms: {kind: xray2d, patients: 30, images_per_patient: 2, size: 32, seed: 0}}"}, "data",
     "data.phantoms.patients"),
    ({"detector": "{preset: tiny, epochs: 5, num_workers: 1}"}, "train-detector", "detector.epochs"),
    # a detector is made from the data: a changed split refuses the detector too, even with the data deleted
    ({"ingest": "{val_fraction: 0.3, test_fraction: 0.2}"}, "train-detector", "ingest.val_fraction"),
    ({"detector": "{preset: tiny, epochs: 3, num_workers: 1, seed: 7}"}, "embed", "detector.seed"),
])
def test_an_output_made_under_other_settings_is_refused_naming_them(tmp_path, changes, stage, named):
    _made(_job(tmp_path), "data", "train-detector", "embed")

    with pytest.raises(ConfigError, match=rf"^{named}: {stage} of run 'study' was made with other settings"):
        run_stage(_job(tmp_path, **changes), stage)


def test_the_message_names_every_changed_setting_and_how_to_go_on(tmp_path):
    _made(_job(tmp_path), "data")

    with pytest.raises(ConfigError) as refused:
        run_stage(_job(tmp_path, ingest="{val_fraction: 0.1, test_fraction: 0.1}"), "data")

    message = str(refused.value)
    assert "(ingest.test_fraction, ingest.val_fraction differ)" in message
    assert "give the job (or study) a new name" in message and "delete that output" in message


def test_a_setting_spelled_out_at_its_default_is_the_same_setting(tmp_path):
    _made(_job(tmp_path), "data", "train-detector")

    same = _job(tmp_path, ingest="{val_fraction: 0.2, test_fraction: 0.2, seed: 0, dtype: float16}")

    assert run_stage(same, "train-detector")


@pytest.mark.parametrize("section, value", [
    ("detector", "{preset: tiny, epochs: 3, num_workers: 1, eval_every: 2, checkpoint_every: 2, max_failures: 3}"),
    ("embed", "{batch_size: 128, num_actors: 2}"),
])
def test_settings_that_change_how_a_stage_runs_not_what_it_writes_do_not_refuse(tmp_path, section, value):
    _made(_job(tmp_path), "data", "train-detector", "embed")

    assert run_stage(_job(tmp_path, **{section: value}), "embed")


def test_the_paths_between_stages_are_not_settings(tmp_path):
    settings = stage_settings(_job(tmp_path), "embed")

    assert not {"detector.dataset", "detector.out", "detector.run_name", "embed.detector", "embed.data",
                "embed.out"} & set(settings)
    assert {"data.phantoms.patients", "ingest.val_fraction", "detector.epochs", "embed.splits"} <= set(settings)


def test_a_data_source_that_changed_is_named_but_its_value_is_not_printed(tmp_path):
    # A source folder may carry a patient's name: the refusal names the setting, never the old or new value.
    made = _job(tmp_path, data="{source: raw/Doe_John_1970-01-01}")
    _made(made, "data")

    with pytest.raises(ConfigError) as refused:
        run_stage(_job(tmp_path, data="{source: raw/Roe_Jane_1980-02-02}"), "data")

    assert str(refused.value).startswith("data.source: data of run 'study'")
    assert not any(part in str(refused.value) for part in ("Doe", "Roe", "1970", "1980"))


def test_an_output_made_before_records_existed_is_reused_with_a_notice(tmp_path, capsys):
    job = _job(tmp_path)
    storage.write_bytes(storage.join(job.paths()["dataset"], "manifest.json"), b"{}")  # no record beside it

    run_stage(job, "data")

    assert "has no record of the settings it was made from" in capsys.readouterr().out


def test_the_record_holds_the_settings_as_json(tmp_path):
    job = _job(tmp_path)
    _made(job, "data")

    record = json.loads((tmp_path / "root" / "stages" / "study" / "data.json").read_text())

    assert record == json.loads(json.dumps(stage_settings(job, "data")))
    assert record["ingest.test_fraction"] == 0.2 and record["data.phantoms.kind"] == "xray2d"
