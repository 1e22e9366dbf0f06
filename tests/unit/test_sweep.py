"""The sweep's plan, without Ray: the grid, audited epochs, and config errors that name the field."""

from __future__ import annotations

import pytest

from raymem.config import ConfigError, validate
from raymem.sweep import StudyConfig, audit_epochs, trial_key

BASE = {"study": "s", "storage_root": "/tmp/raymem-unit", "data": {"phantoms": {"kind": "xray2d"}},
        "ldm": {"autoencoder_epochs": 3, "diffusion_epochs": 10}, "factors": {"train_size": [8, 16]}}


def study(**changes) -> StudyConfig:
    return validate(StudyConfig, {**BASE, **changes})


def test_grid_has_every_combination_of_the_swept_levels():
    grid = study(factors={"train_size": [8, 16], "augment": [False, True], "preset": ["tiny", "small"]}).trials()
    assert sorted(trial_key(t) for t in grid) == sorted(
        f"n{n}-aug{a}-{p}-e10" for n in (8, 16) for a in (0, 1) for p in ("tiny", "small"))


def test_factor_not_swept_keeps_the_ldm_sections_value():
    assert {t["preset"] for t in study(ldm={"preset": "small", "diffusion_epochs": 4}).trials()} == {"small"}


def test_shared_subset_is_the_smallest_training_size():
    assert study(factors={"train_size": [32, 8, 16]}).shared_size() == 8


def test_images_per_epoch_gives_every_size_the_same_steps_per_epoch():
    planned = study(images_per_epoch=640, factors={"train_size": [16, 64]})
    assert [planned.ldm_config(t, "/r").epoch_repeats * t["train_size"] for t in planned.trials()] == [640, 640]


def test_audited_epochs_are_every_k_diffusion_epochs_and_the_last():
    # 3 autoencoder epochs (0-2); diffusion epochs 1..10 are global epochs 3..12.
    assert audit_epochs(3, 10, 4) == [6, 10, 12]


@pytest.mark.parametrize(("changes", "field"), [
    ({"ldm": {"train_size": 8}}, "ldm.train_size"),
    ({"ldm": {"out": "/x"}}, "ldm.out"),
    ({"factors": {"train_size": [8, 8]}}, "train_size"),
    ({"factors": {"preset": ["huge"]}}, "factors.preset"),
    ({"sample": {"epoch": 3}}, "sample.epoch"),
    ({"ldm": {"batch_size": 0}}, "batch_size"),
    ({"audit_every": 0}, "audit_every"),
    ({"images_per_epoch": 64, "ldm": {"epoch_repeats": 2}}, "ldm.epoch_repeats"),
])
def test_bad_study_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        study(**changes)


def test_config_hash_changes_with_the_grid():
    assert study().digest() != study(factors={"train_size": [8, 32]}).digest()
