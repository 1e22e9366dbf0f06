"""The sweep's plan, without Ray: the grid, audited epochs, and config errors that name the field."""

from __future__ import annotations

import pytest

from raymem.config import ConfigError, validate
from raymem.sweep import StudyConfig, audit_epochs, trial_key, trials_at_once

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


def test_a_trial_keeps_its_audited_checkpoints_and_the_latest_only():
    planned = study(audit_every=4, ldm={"autoencoder_epochs": 3, "diffusion_epochs": 10})
    cfg = planned.ldm_config(planned.trials()[0], "/r")
    assert (cfg.keep_epochs, cfg.keep_checkpoints) == ([6, 10, 12], 1)
    assert study(ldm={"autoencoder_epochs": 3, "diffusion_epochs": 10, "keep_checkpoints": 3}).ldm_config(
        planned.trials()[0], "/r").keep_checkpoints == 3


@pytest.mark.parametrize(("changes", "field"), [
    ({"ldm": {"keep_epochs": [1]}}, "ldm.keep_epochs"),
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


def test_config_hash_changes_with_the_grid_not_with_the_scheduling():
    assert study().digest() != study(factors={"train_size": [8, 32]}).digest()
    assert study().digest() == study(max_concurrent_trials=3, trial_cpus=0.5, max_trial_failures=2).digest()


def small_trials(use_gpu: bool = False, **changes) -> StudyConfig:
    """2 sizes x augmentation = 4 trials, each: a 1-CPU driver, 1 LDM worker or 1 sampling / embedding actor."""
    return study(ldm={**BASE["ldm"], "num_workers": 1, "use_gpu": use_gpu}, sample={"num_actors": 1},
                 embed={"num_actors": 1}, factors={"train_size": [8, 16], "augment": [False, True]}, **changes)


def test_a_trial_holds_its_driver_its_largest_stage_and_a_cpu_for_ray_data():
    planned = study(ldm={**BASE["ldm"], "num_workers": 2, "cpus_per_worker": 1.5}, sample={"num_actors": 2},
                    embed={"num_actors": 1})
    assert planned.trial_resources() == {"CPU": 1 + 2 * 1.5 + 1, "GPU": 0}


def test_a_gpu_trial_holds_a_gpu_per_ldm_worker_or_per_actor_of_its_largest_stage():
    planned = study(ldm={**BASE["ldm"], "num_workers": 2, "use_gpu": True}, sample={"num_actors": 3, "use_gpu": True},
                    embed={"num_actors": 1, "use_gpu": True})
    assert planned.trial_resources() == {"CPU": 1 + 2 + 1, "GPU": 3}


@pytest.mark.parametrize(("cluster", "at_once"), [
    ({"CPU": 8.0, "GPU": 0.0}, 2),  # 3 CPU a trial: driver 1 + LDM worker 1 + Ray Data 1
    ({"CPU": 12.0}, 4),
    ({"CPU": 64.0}, 4),  # no more than the grid's 4 trials
    ({"CPU": 2.0}, 1),  # smaller than one trial: one runs, waiting for the cluster to grow
])
def test_trials_at_once_fill_the_clusters_cpus(cluster, at_once):
    assert trials_at_once(small_trials(), cluster)[0] == at_once


def test_gpu_trials_at_once_are_bounded_by_the_clusters_gpus():
    assert trials_at_once(small_trials(use_gpu=True), {"CPU": 64.0, "GPU": 2.0})[0] == 2


def test_an_explicit_max_concurrent_trials_wins_over_the_cluster():
    assert trials_at_once(small_trials(max_concurrent_trials=3), {"CPU": 3.0}) == (3, "set by max_concurrent_trials")
