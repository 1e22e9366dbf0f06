"""The factor study's verdicts, against effects and intervals computed by hand (no Ray, no MLflow)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raymem.audit.statistics import NOT_SHOWN, SAME_DIRECTION, SHOWN
from raymem.audit.verdicts import CONFOUNDED, UNTRAINED_LOSS, SeedRun, factor_verdicts, ordered_levels

T_975_2DF = 4.302652729749464  # Student-t 97.5 % quantile, 2 degrees of freedom (3 seeds)
T_975_1DF = 12.706204736174696  # 1 degree of freedom (2 seeds)


def run(seed: int | None, last: float, first: float = 0.0, **levels: str) -> SeedRun:
    """A trial audited after 10 and 40 diffusion epochs; both figures take the same values."""
    return SeedRun(levels=levels, seed=seed, first={"pct_memorized_train": first, "pct_copies": first},
                   last={"pct_memorized_train": last, "pct_copies": last}, first_epochs=10, last_epochs=40)


def only(entries: list[dict], factor: str, figure: str = "pct_memorized_train") -> list[dict]:
    return [entry for entry in entries if entry["factor"] == factor and entry["figure"] == figure]


def test_more_data_lowering_memorization_in_every_seed_is_shown_with_its_t_interval():
    # Memorized at 8 images: 100, 90, 95; at 32: 60, 55, 65. Paired effects -40, -35, -30: mean -35, sd 5.
    runs = [run(seed, value, train_size=size) for size, values in (("8", (100, 90, 95)), ("32", (60, 55, 65)))
            for seed, value in enumerate(values)]
    half = T_975_2DF * 5 / math.sqrt(3)

    [entry] = only(factor_verdicts(runs, ["train_size"]), "train_size")

    assert (entry["from"], entry["to"], entry["n_seeds"], entry["verdict"]) == ("8", "32", 3, SHOWN)
    assert (entry["mean"], entry["lo"], entry["hi"]) == pytest.approx((-35, -35 - half, -35 + half))


def test_an_interval_that_crosses_zero_is_same_direction_not_significant():
    # Two seeds, effects -40 and -30: mean -35, sd 7.07, half-width 12.71 * 5 = 63.5 reaches above 0.
    runs = [run(0, 80, train_size="8"), run(1, 60, train_size="8"), run(0, 40, train_size="16"),
            run(1, 30, train_size="16")]

    [entry] = only(factor_verdicts(runs, ["train_size"]), "train_size")

    assert (entry["hi"], entry["verdict"]) == (pytest.approx(-35 + T_975_1DF * 5), SAME_DIRECTION)


def test_augmentation_raising_memorization_on_average_is_not_shown():
    runs = [run(seed, value, augment=level) for level, values in (("False", (50, 50, 50)), ("True", (51, 47, 55)))
            for seed, value in enumerate(values)]

    [entry] = only(factor_verdicts(runs, ["augment"]), "augment")

    assert (entry["mean"], entry["verdict"]) == (pytest.approx(1.0), NOT_SHOWN)


def test_effects_pair_seeds_and_leave_out_a_seed_missing_at_one_level():
    # Seed 2 failed at 32 images: only seeds 0 and 1 are paired (effects -40 and -30).
    runs = [run(0, 100, train_size="8"), run(1, 90, train_size="8"), run(2, 10, train_size="8"),
            run(0, 60, train_size="32"), run(1, 60, train_size="32")]

    [entry] = only(factor_verdicts(runs, ["train_size"]), "train_size")

    assert (entry["mean"], entry["n_seeds"]) == (pytest.approx(-35.0), 2)


def test_each_combination_of_the_other_factors_gets_its_own_effect():
    runs = [run(seed, value + (seed if augment == "False" else 0), train_size=size, augment=augment)
            for size, value in (("8", 90.0), ("16", 70.0), ("32", 30.0)) for augment in ("False", "True")
            for seed in (0, 1)]

    found = {(entry["at"]["augment"], entry["from"], entry["to"]): entry["mean"]
             for entry in only(factor_verdicts(runs, ["train_size", "augment"]), "train_size")}

    assert found == {("False", "8", "32"): pytest.approx(-60.0), ("True", "8", "32"): pytest.approx(-60.0)}


def test_training_length_compares_each_trials_first_and_last_audit():
    # Memorized after 10 epochs: 20, 30, 25; after 40: 80, 70, 90. Effects 60, 40, 65: mean 55.
    runs = [run(seed, last, first, train_size="8") for seed, (first, last) in enumerate(((20, 80), (30, 70),
                                                                                          (25, 90)))]

    [entry] = only(factor_verdicts(runs, ["train_size"]), "training_length")

    assert (entry["from"], entry["to"], entry["mean"], entry["direction"], entry["verdict"]) == (
        "10", "40", pytest.approx(55.0), "up", SHOWN)


def test_model_sizes_are_ordered_by_size_not_by_name():
    assert ordered_levels("preset", ["paper2d", "tiny", "small"]) == ["tiny", "small", "paper2d"]


def test_a_factor_with_one_level_gets_no_verdict():
    assert only(factor_verdicts([run(0, 50, preset="tiny"), run(1, 60, preset="tiny")], ["preset"]), "preset") == []


# --- trials that did not train ------------------------------------------------------------------------------------


def sized(seed: int, last: float, preset: str, loss: float) -> SeedRun:
    """A model-size trial with its fixed-batch training diffusion loss at its last audit."""
    return SeedRun(levels={"preset": preset}, seed=seed, first={"pct_copies": 0.0}, last={"pct_copies": last},
                   first_epochs=10, last_epochs=40, last_loss=loss)


def test_the_untrained_loss_lies_between_a_per_timestep_shrinkage_and_predicting_zero_noise():
    # Predicting zero unit-variance noise scores 1; eps_hat = sqrt(1 - alpha_bar_t) x_t scores alpha_bar_t, whose
    # mean over raymem's schedule is what a UNet that learnt anything beats.
    from raymem.models.ldm import noise_scheduler

    shrinkage = float(noise_scheduler().alphas_cumprod.mean())

    assert shrinkage == pytest.approx(0.2754, abs=1e-4) and shrinkage < UNTRAINED_LOSS < 1.0


def test_a_larger_model_that_did_not_train_confounds_the_model_size_verdict_and_is_named():
    # paper2d "memorizes less" in both seeds, but seed 1's UNet stayed at a loss of 0.98 (predicting ~zero noise).
    runs = [sized(0, 60, "tiny", 0.02), sized(1, 70, "tiny", 0.03),
            sized(0, 10, "paper2d", 0.2), sized(1, 0, "paper2d", 0.98)]

    [entry] = factor_verdicts(runs, ["preset"], ("pct_copies",))[:1]

    assert (entry["factor"], entry["verdict"], entry["untrained"], entry["mean"]) == (
        "preset", CONFOUNDED, ["preset=paper2d, seed 1"], pytest.approx(-60.0))


@pytest.mark.parametrize("loss, untrained", [(UNTRAINED_LOSS, True), (np.nextafter(UNTRAINED_LOSS, 0), False),
                                             (math.nan, False)])
def test_a_trial_is_untrained_from_the_threshold_up_and_not_judged_without_a_loss(loss, untrained):
    runs = [sized(0, 60, "tiny", 0.02), sized(1, 70, "tiny", 0.03),
            sized(0, 80, "paper2d", 0.02), sized(1, 95, "paper2d", loss)]  # effects +20, +25

    [entry] = factor_verdicts(runs, ["preset"], ("pct_copies",))[:1]

    assert (entry["verdict"], entry["untrained"]) == ((CONFOUNDED, ["preset=paper2d, seed 1"]) if untrained
                                                      else (SAME_DIRECTION, []))


def test_training_length_is_confounded_only_in_the_combination_whose_trial_did_not_train():
    runs = [sized(0, 60, "tiny", 0.02), sized(1, 70, "tiny", 0.03),
            sized(0, 10, "paper2d", 0.97), sized(1, 5, "paper2d", 0.99)]

    entries = [entry for entry in factor_verdicts(runs, ["preset"], ("pct_copies",))
               if entry["factor"] == "training_length"]

    assert [(entry["at"], entry["verdict"], entry["untrained"]) for entry in entries] == [
        ({"preset": "tiny"}, SHOWN, []),  # +60 and +70 copies from 10 to 40 epochs
        ({"preset": "paper2d"}, CONFOUNDED, ["preset=paper2d, seed 0", "preset=paper2d, seed 1"])]
