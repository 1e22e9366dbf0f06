"""The sweep's plan, without Ray: the grid, audited epochs, and config errors that name the field."""

from __future__ import annotations

import pytest

import numpy as np

from raymem.audit.simulation import write_embeddings
from raymem.audit.verdicts import CONFOUNDED
from raymem.config import ConfigError, validate
from raymem.sweep import StudyConfig, _Trial, audit_epochs, trial_key, trials_at_once, verdict_metrics

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
    ({"seeds": [0, 0]}, "seeds"),
    ({"seeds": [0, 1], "ldm": {**BASE["ldm"], "seed": 3}}, "ldm.seed"),
    ({"seeds": [0, 1], "sample": {"seed": 3}}, "sample.seed"),
    ({"sample": {"n": 12}}, "sample.n"),  # fewer samples than the 16-image trial trained on
    ({"trial_cpus": 0}, "trial_cpus"),  # Ray Tune cannot place a trial that holds no resource
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


def test_every_combination_runs_once_per_seed_and_the_seed_names_the_trial():
    grid = study(seeds=[0, 1, 2]).trials()
    assert sorted(trial_key(t) for t in grid) == sorted(f"n{n}-aug0-tiny-e10-s{seed}" for n in (8, 16)
                                                        for seed in (0, 1, 2))


def test_a_study_without_seeds_keeps_its_trial_keys_and_config_hash():
    # The hash of BASE before seeds existed: a sweep started then must resume unchanged.
    assert ([trial_key(t) for t in study().trials()], study().digest()) == (
        ["n8-aug0-tiny-e10", "n16-aug0-tiny-e10"], "89e587e61a7d")


def test_seeds_change_the_config_hash():
    assert study(seeds=[0, 1]).digest() != study(seeds=[0, 1, 2]).digest() != study().digest()


def test_the_trials_seed_drives_the_ldm_and_the_sampling_but_not_the_training_subset():
    planned = study(seeds=[0, 7], ldm={**BASE["ldm"], "subset_seed": 5})
    configs = {(t["train_size"], t["seed"]): (planned.ldm_config(t, "/r"), planned.seeded(t))
               for t in planned.trials()}
    assert {key: (cfg.seed, cfg.subset_seed, sample) for key, (cfg, sample) in configs.items()} == {
        (n, seed): (seed, 5, {"seed": seed}) for n in (8, 16) for seed in (0, 7)}


def test_a_study_without_seeds_keeps_the_ldm_and_sample_sections_seeds():
    planned = study(ldm={**BASE["ldm"], "seed": 3}, sample={"seed": 4})
    assert [(planned.ldm_config(t, "/r").seed, planned.seeded(t)) for t in planned.trials()] == [(3, {}), (3, {})]


def test_each_audit_samples_the_trials_training_set_size_unless_sample_n_is_larger():
    assert (study().samples_per_audit(16), study(sample={"n": 40}).samples_per_audit(16)) == (16, 40)


def test_a_sample_n_below_a_trials_training_set_is_an_error_not_a_smaller_audit():
    # A trial on the whole training split learns its size only at run time; the same rule applies then.
    with pytest.raises(ConfigError, match=r"sample\.n: 32 samples per audit is fewer than a trial's 40 training"):
        study(factors={"augment": [False, True]}, sample={"n": 32}).samples_per_audit(40)


@pytest.fixture
def study_embeddings(tmp_path):
    """The study's embeddings as the embed stage leaves them: train (40 images), val and test (12 each), 2 a patient."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "embeddings" / "s"
    for split, rows in (("train", 40), ("val", 12), ("test", 12)):
        (folder / split).mkdir(parents=True)
        write_embeddings(folder / split / "part-00000.parquet", rng.normal(size=(rows, 8)), f"{split}-",
                         np.repeat(np.arange(rows // 2), 2).astype(str).astype(object) + f"-{split}")
    return str(tmp_path)


def seeded_trials(root: str) -> list[_Trial]:
    """Every trial of a 2 sizes x 3 seeds study."""
    planned = study(seeds=[0, 1, 2], fd_reference_size=8)
    return [_Trial(planned, factors, {"root": root}) for factors in planned.trials()]


def test_every_trial_is_calibrated_and_evaluated_on_the_studys_one_val_and_test_split(study_embeddings):
    shared = [{name: value for name, value in trial.audit_inputs().items() if name != "train_uri"}
              for trial in seeded_trials(study_embeddings)]
    assert shared == [{"val_uri": f"{study_embeddings}/embeddings/s/val",
                       "test_uri": f"{study_embeddings}/embeddings/s/test", "percentile": 95.0, "top_k": 5,
                       "calibration": "paper", "seed": 0}] * 6


def test_every_trial_measures_frechet_distance_against_the_studys_one_reference(study_embeddings):
    references = {trial.frechet_reference([f"train-{i}" for i in range(trial.cfg.train_size)])[0].sample_ids
                  for trial in seeded_trials(study_embeddings)}
    assert len(references) == 1 and len(next(iter(references))) == 8


def test_verdicts_become_parent_run_metrics_with_the_other_factors_in_their_names():
    entry = {"factor": "train_size", "figure": "pct_copies", "direction": "down", "at": {"augment": "False"},
             "from": "8", "to": "16", "mean": -20.0, "lo": None, "hi": None, "n_seeds": 1, "sd": None,
             "verdict": "same direction, not significant"}
    assert verdict_metrics([entry]) == {"verdict/train_size/pct_copies/augment-False/effect_mean": -20.0,
                                        "verdict/train_size/pct_copies/augment-False/n_seeds": 1,
                                        "verdict/train_size/pct_copies/augment-False/shown": 0.5}


def test_a_verdict_confounded_by_an_untrained_trial_logs_no_score_but_the_count_of_such_trials():
    entry = {"factor": "preset", "figure": "pct_copies", "direction": "up", "at": {}, "from": "tiny",
             "to": "paper2d", "mean": -50.0, "lo": -80.0, "hi": -20.0, "n_seeds": 3, "sd": 12.0,
             "verdict": CONFOUNDED, "untrained": ["preset=paper2d, seed 0", "preset=paper2d, seed 2"]}
    assert verdict_metrics([entry]) == {"verdict/preset/pct_copies/all/effect_mean": -50.0,
                                        "verdict/preset/pct_copies/all/effect_lo": -80.0,
                                        "verdict/preset/pct_copies/all/effect_hi": -20.0,
                                        "verdict/preset/pct_copies/all/n_seeds": 3,
                                        "verdict/preset/pct_copies/all/untrained_trials": 2}
