"""Two sweep rules, without Ray: a sweep resumes only with the config it started with, and memorization-informed
early stopping stops exactly at its thresholds, with the study file's early_stop section as its arguments."""

from __future__ import annotations

import inspect
import json

import pytest
import yaml

from raymem import storage
from raymem.audit import metrics
from raymem.config import ConfigError, validate
from raymem.sweep import EarlyStop, StudyConfig, _check_same_study, load_study, sweep_uri

BASE = {"study": "s", "data": {"phantoms": {"kind": "xray2d"}},
        "ldm": {"autoencoder_epochs": 3, "diffusion_epochs": 10}, "factors": {"train_size": [8, 16]}}


def study(root, **changes) -> StudyConfig:
    return validate(StudyConfig, {**BASE, "storage_root": str(root), **changes})


def recorded(planned: StudyConfig) -> dict:
    """The sweep's study.json, where run_sweep's check leaves it."""
    return json.loads(storage.read_bytes(storage.join(sweep_uri(planned.root(), planned.study, planned.sweep),
                                                      "study.json")))


def stops(history: list[float], **rules) -> bool:
    return metrics.memorization_stop_reason(history, **rules) is not None


# A sweep resumes only with the config it started with.

def test_first_run_of_a_sweep_records_its_config_and_hash(tmp_path):
    started = study(tmp_path)

    _check_same_study(started, started.root())

    assert recorded(started) == {"config_hash": started.digest(), "config": json.loads(started.model_dump_json())}


@pytest.mark.parametrize("changes", [
    {},
    {"max_concurrent_trials": 3},
    {"trial_cpus": 0.5},
    {"max_trial_failures": 2},
    {"max_concurrent_trials": 1, "trial_cpus": 2.0, "max_trial_failures": 5},
])
def test_rerun_with_the_same_grid_resumes_however_it_is_scheduled(tmp_path, changes):
    started = study(tmp_path)
    _check_same_study(started, started.root())
    resumed = study(tmp_path, **changes)

    _check_same_study(resumed, resumed.root())

    assert recorded(resumed) == recorded(started)  # the record stays the config the sweep started with


@pytest.mark.parametrize(("first", "changes"), [
    ({}, {"factors": {"train_size": [8, 32]}}),
    ({}, {"seeds": [0, 1]}),
    ({"seeds": [0, 1]}, {"seeds": [0, 1, 2]}),
    ({}, {"audit_every": 5}),
    ({}, {"early_stop": {"max_pct_copies": 10.0}}),
])
def test_a_changed_study_under_the_same_sweep_name_is_refused(tmp_path, first, changes):
    started = study(tmp_path, **first)
    _check_same_study(started, started.root())
    changed = study(tmp_path, **{**first, **changes})

    with pytest.raises(ConfigError, match=r"sweep: 'sweep' of study 's' was started with another config .*"
                                          r"rerun it unchanged to resume, or give the new grid its own sweep name"):
        _check_same_study(changed, changed.root())


def test_a_changed_grid_under_a_new_sweep_name_starts_its_own_record(tmp_path):
    started = study(tmp_path)
    _check_same_study(started, started.root())
    larger = study(tmp_path, sweep="larger", factors={"train_size": [8, 32]})

    _check_same_study(larger, larger.root())

    assert recorded(larger)["config_hash"] == larger.digest() != recorded(started)["config_hash"]


# Early stopping: the budget and the rising rule, each at its boundary.

def test_copies_at_the_budget_do_not_stop_and_just_above_do():
    assert [stops([10.0, latest], max_pct_copies=25.0) for latest in (24.0, 25.0, 25.01)] == [False, False, True]


def test_a_zero_budget_stops_at_the_first_copy():
    assert [stops([0.0, latest], max_pct_copies=0.0) for latest in (0.0, 0.5)] == [False, True]


def test_the_budget_is_checked_on_the_latest_audit():
    assert not stops([30.0, 10.0], max_pct_copies=25.0)


@pytest.mark.parametrize(("history", "stopped"), [
    ([9.0, 5.0, 6.0, 7.0], False),  # p - 1 = 2 rises in a row after a fall
    ([9.0, 5.0, 6.0, 7.0, 8.0], True),  # p = 3 rises in a row after a fall
    ([5.0, 6.0, 6.0, 7.0], False),  # an equal audit is not a rise
    ([5.0, 5.0, 5.0, 5.0], False),
    ([5.0, 6.0, 4.0, 7.0, 3.0, 8.0], False),  # 3 rises, never 3 in a row
])
def test_copies_stop_after_rising_in_p_audits_in_a_row(history, stopped):
    assert stops(history, rising_audits=3) is stopped


@pytest.mark.parametrize(("rising_audits", "history"), [
    (1, [5.0]),
    (3, [5.0, 6.0, 7.0]),
    (3, [5.0, 6.0]),
    (2, []),
])
def test_a_history_of_p_audits_or_fewer_has_not_risen_p_times(rising_audits, history):
    assert not stops(history, rising_audits=rising_audits)


def test_no_audit_yet_does_not_stop():
    assert not stops([], max_pct_copies=0.0, rising_audits=1)


def test_the_default_early_stop_never_stops():
    assert not stops([0.0, 50.0, 100.0], **EarlyStop().model_dump())


# The study file's early_stop section is what the sweep passes to memorization_stop_reason.

def test_every_stopping_rule_of_the_function_is_a_field_of_the_early_stop_section():
    rules = [name for name, parameter in inspect.signature(metrics.memorization_stop_reason).parameters.items()
             if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    assert sorted(rules) == sorted(EarlyStop.model_fields)


def test_a_study_files_early_stop_section_drives_both_rules(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**BASE, "storage_root": str(tmp_path),
                                    "early_stop": {"max_pct_copies": 20, "rising_audits": 3}}))
    rules = load_study(str(path)).early_stop.model_dump()

    reasons = [metrics.memorization_stop_reason(history, **rules)
               for history in ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], [5.0, 4.0, 21.0])]

    assert reasons == [None, "% copies rose in 3 consecutive audits", "% copies 21.00 exceeds the budget 20"]


@pytest.mark.parametrize(("early_stop", "field"), [
    ({"max_pct_copies": -1}, "early_stop.max_pct_copies"),
    ({"max_pct_copies": 100.5}, "early_stop.max_pct_copies"),
    ({"rising_audits": 0}, "early_stop.rising_audits"),
    ({"rising_audits": 2.5}, "early_stop.rising_audits"),
    ({"rising_audit": 2}, "early_stop.rising_audit"),  # a misspelt rule is an error, not a rule left off
])
def test_bad_early_stop_names_the_field(tmp_path, early_stop, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        study(tmp_path, early_stop=early_stop)


def test_early_stop_accepts_the_ends_of_its_ranges():
    assert [validate(EarlyStop, values).model_dump() for values in (
        {"max_pct_copies": 0, "rising_audits": 1}, {"max_pct_copies": 100})] == [
        {"max_pct_copies": 0.0, "rising_audits": 1}, {"max_pct_copies": 100.0, "rising_audits": None}]
