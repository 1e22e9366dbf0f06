"""raymem.audit.verdicts: level order, grouping of combinations, trials that lack a level or a seed, early-stopped
training lengths and the JSON form of the entries, against hand-computed effects (no Ray, no MLflow).

Written to pin down behaviour that mutation testing (tools/mutation.sh) found unchecked."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from raymem.audit.verdicts import SeedRun, factor_verdicts, ordered_levels, verdicts_json


def run(seed: int | None, last: float, first: float = 0.0, first_epochs: int = 10, last_epochs: int = 40,
        **levels: str) -> SeedRun:
    """A trial whose one figure, pct_copies, is `first` at its first audit and `last` at its last."""
    return SeedRun(levels=levels, seed=seed, first={"pct_copies": first}, last={"pct_copies": last},
                   first_epochs=first_epochs, last_epochs=last_epochs)


def entries(runs, factors, factor):
    return [entry for entry in factor_verdicts(runs, factors, ("pct_copies",)) if entry["factor"] == factor]


# --- ordered_levels ---------------------------------------------------------------------------------------------

def test_false_comes_before_true_whatever_order_string_hashing_gives_the_two():
    """Python iterates a set of strings in an order set by the per-process hash seed: under PYTHONHASHSEED=2,
    {"True", "False"} iterates "True" first (checked below); the levels must still come False, True."""
    script = ("import raymem.audit.verdicts as v; "
              "print(list({'True', 'False'}), v.ordered_levels('augment', [True, False, 'True']))")
    env = {**os.environ, "PYTHONHASHSEED": "2", "PYTHONPATH": os.pathsep.join(sys.path)}

    printed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                             check=True).stdout.strip()

    assert (printed, ordered_levels("augment", [True, False])) == ("['True', 'False'] ['False', 'True']",
                                                                   ["False", "True"])


def test_an_unknown_preset_sorts_after_the_known_model_sizes():
    assert ordered_levels("preset", ["custom-big", "small", "another", "tiny"]) == ["tiny", "small", "another",
                                                                                    "custom-big"]


def test_levels_that_are_not_numbers_sort_as_text():
    assert ordered_levels("sampler", ["ddpm", "ddim", None, "ancestral"]) == ["ancestral", "ddim", "ddpm"]


def test_numeric_levels_sort_by_value_not_as_text():
    assert ordered_levels("train_size", [16, "8", 128, 8]) == ["8", "16", "128"]


# --- factor_verdicts: which levels and combinations ---------------------------------------------------------------

def test_the_preset_effect_runs_from_the_smallest_model_to_the_largest():
    """tiny -> paper2d (not 'paper2d' -> 'tiny', the text order): copies 10, 20 then 30, 50; effect +25."""
    runs = [run(0, 10, preset="tiny"), run(1, 20, preset="tiny"),
            run(0, 30, preset="paper2d"), run(1, 50, preset="paper2d")]

    [entry] = entries(runs, ["preset"], "preset")

    assert (entry["from"], entry["to"], entry["mean"]) == ("tiny", "paper2d", pytest.approx(25.0))


def test_combinations_of_the_other_factors_are_listed_in_their_levels_order():
    """Trials listed 32 before 8: the augment effects come at 8 images, then 16, then 32."""
    runs = [run(seed, value + seed, train_size=size, augment=augment)
            for size, value in (("32", 1.0), ("8", 5.0), ("16", 3.0)) for augment in ("True", "False")
            for seed in (0, 1)]

    found = [entry["at"]["train_size"] for entry in entries(runs, ["augment", "train_size"], "augment")]

    assert found == ["8", "16", "32"]


def test_a_trial_without_a_level_of_a_factor_forms_its_own_combination_listed_first():
    """Two trials never logged train_size: their augment effect (+4) comes first, with no train_size in "at"."""
    runs = [run(0, 10, augment="False", train_size="8"), run(0, 11, augment="True", train_size="8"),
            run(0, 20, augment="False", train_size="16"), run(0, 22, augment="True", train_size="16"),
            run(0, 30, augment="False"), run(0, 34, augment="True")]

    found = [(entry["at"], entry["mean"]) for entry in entries(runs, ["augment", "train_size"], "augment")]

    assert found == [({}, pytest.approx(4.0)), ({"train_size": "8"}, pytest.approx(1.0)),
                     ({"train_size": "16"}, pytest.approx(2.0))]


def test_a_combination_measured_at_one_end_only_gets_no_entry():
    """At augment True the 32-image trials failed: only augment False has a train_size effect (-30)."""
    runs = [run(0, 60, train_size="8", augment="False"), run(0, 30, train_size="32", augment="False"),
            run(0, 50, train_size="8", augment="True")]

    found = [(entry["at"], entry["mean"]) for entry in entries(runs, ["train_size", "augment"], "train_size")]

    assert found == [({"augment": "False"}, pytest.approx(-30.0))]


def test_a_trial_without_a_logged_seed_pairs_only_with_another_without_one():
    """Seeds None and 0 at 8 images, seed 0 only at 32: the one pair is seed 0's, 90 -> 60."""
    runs = [run(None, 100, train_size="8"), run(0, 90, train_size="8"), run(0, 60, train_size="32")]

    [entry] = entries(runs, ["train_size"], "train_size")

    assert (entry["mean"], entry["n_seeds"]) == (pytest.approx(-30.0), 1)


# --- training length ----------------------------------------------------------------------------------------------

def test_trials_audited_once_are_left_out_of_the_training_length_effect():
    """Seed 2 was audited only at 40 epochs (first == last): seeds 0 and 1 give effects 10 and 20."""
    runs = [run(0, 30, 20, train_size="8"), run(1, 50, 30, train_size="8"),
            run(2, 99, 0, first_epochs=40, last_epochs=40, train_size="8")]

    [entry] = entries(runs, ["train_size"], "training_length")

    assert (entry["mean"], entry["n_seeds"]) == (pytest.approx(15.0), 2)


def test_the_training_length_effect_says_at_which_levels_it_was_read():
    runs = [run(0, 30, 20, train_size="8", augment="True"), run(1, 50, 30, train_size="8", augment="True")]

    [entry] = entries(runs, ["train_size", "augment"], "training_length")

    assert entry["at"] == {"train_size": "8", "augment": "True"}


def test_seeds_stopped_early_at_different_lengths_give_a_range_of_epochs():
    runs = [run(0, 30, 20, last_epochs=30, train_size="8"), run(1, 50, 30, last_epochs=45, train_size="8"),
            run(2, 40, 30, last_epochs=40, train_size="8")]

    [entry] = entries(runs, ["train_size"], "training_length")

    assert (entry["from"], entry["to"]) == ("10", "30-45")


# --- verdicts_json ------------------------------------------------------------------------------------------------

def test_verdicts_json_writes_missing_bounds_as_null_and_keeps_every_other_value():
    """One seed: lo, hi and sd are NaN (and an infinite bound is no number either); JSON gets null for them."""
    entry = {"factor": "train_size", "at": {"augment": "True"}, "from": "8", "mean": -30.0, "lo": math.nan,
             "hi": math.inf, "n_seeds": 1, "sd": math.nan, "verdict": "same direction, not significant"}

    written = json.loads(json.dumps(verdicts_json([entry]), allow_nan=False))

    assert written == [{"factor": "train_size", "at": {"augment": "True"}, "from": "8", "mean": -30.0, "lo": None,
                        "hi": None, "n_seeds": 1, "sd": None, "verdict": "same direction, not significant"}]
