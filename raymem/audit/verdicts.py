"""The factor study's verdicts: each of the paper's directions, as an effect over seeds with its 95 % interval (no Ray).

A study runs every combination of its factors' levels once per seed; trials of one combination differ only in
their seed. Each ``SeedRun`` is one trial as the verdicts read it: its levels, its seed, and its headline figures
at its first and last audit. ``factor_verdicts`` then says, for each swept factor and each combination of the other
factors' levels, how a figure moved from the factor's first level to its last: the paired effect seed by seed
(``statistics.factor_effect``: last minus first for each seed measured at both), its mean with the 95 % Student-t
interval, and ``statistics.verdict`` against the paper's direction (``PAPER_DIRECTIONS``). Training length is also
read inside each trial (``TRAINING_LENGTH``: its last audit minus its first, seed by seed), as the sweep audits
shorter lengths without retraining.

A comparison is only read as evidence where every trial in it trained: a diffusion UNet whose fixed-batch training
loss is still at or above ``UNTRAINED_LOSS`` at its last audit did not fit its training set (a study's lr too high
for a large preset does this), and its low memorization says the model failed, not that it memorizes less. Such an
entry's verdict is ``CONFOUNDED`` and names the trials.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from raymem import config
from raymem.audit import statistics

# The headline figures the verdicts are given for (metrics.json keys, percentages 0-100).
VERDICT_FIGURES = ("pct_memorized_train", "pct_copies")
TRAINING_LENGTH = "training_length"  # first against last audit inside each trial
# The paper's directions (Dar et al.): more data and augmentation reduce memorization; larger models and longer
# training increase it. "down": the figure falls from the factor's first level to its last.
PAPER_DIRECTIONS = {"train_size": "down", "augment": "down", "preset": "up", "diffusion_epochs": "up",
                    TRAINING_LENGTH: "up"}
# Model sizes from smallest to largest: the order of the preset names in the typed config.
PRESET_ORDER = get_args(config.LDMTrainConfig.model_fields["preset"].annotation)
# The noise a diffusion UNet predicts has unit variance, so predicting zero scores a loss of 1, and shrinking the
# noisy latent x_t by a per-timestep scalar (sqrt(1 - alpha_bar_t) x_t) scores the mean of alpha_bar_t: 0.28 on
# raymem's noise schedule (tests/unit/test_verdicts.py computes it). A trial still at or above UNTRAINED_LOSS at its
# last audit has learnt less than that scalar: it did not train.
UNTRAINED_LOSS = 0.5
CONFOUNDED = "confounded: a compared trial did not train"


def did_not_train(loss: float | None) -> bool:
    """A fixed-batch training diffusion loss at a trial's last audit at or above UNTRAINED_LOSS; None or NaN (not
    logged) is not judged."""
    return loss is not None and loss >= UNTRAINED_LOSS


@dataclass(frozen=True)
class SeedRun:
    """One trial as the verdicts read it.

    levels: factor -> level, as logged ("16", "True", "tiny"), the seed excluded. seed: None when not logged (one
    trial per combination). first, last: figure name -> value at the trial's first and last audit, with
    first_epochs, last_epochs the diffusion epochs trained at each.
    """

    levels: Mapping[str, str]
    seed: int | None
    first: Mapping[str, float]
    last: Mapping[str, float]
    first_epochs: int
    last_epochs: int
    last_loss: float = math.nan

    @property
    def untrained(self) -> bool:
        """The trial's fixed-batch training diffusion loss at its last audit (``last_loss``; NaN when not logged:
        not judged) is at or above UNTRAINED_LOSS."""
        return did_not_train(self.last_loss)

    @property
    def label(self) -> str:
        """The trial as a verdict names it: its levels and seed."""
        levels = ", ".join(f"{name}={level}" for name, level in self.levels.items())
        return levels if self.seed is None else f"{levels}, seed {self.seed}"


def ordered_levels(factor: str, values: Iterable[Any]) -> list[str]:
    """The distinct levels of ``factor`` (as strings), smallest first: presets by model size, False before True,
    numbers in numeric order, else sorted as text."""
    distinct = {str(value) for value in values if value is not None}
    if factor == "preset":
        return sorted(distinct, key=lambda name: (PRESET_ORDER.index(name) if name in PRESET_ORDER
                                                  else len(PRESET_ORDER), name))
    if distinct <= {"False", "True"}:
        return sorted(distinct, key=lambda level: level == "True")
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return sorted(distinct)


def _by_seed(values: Iterable[tuple[int | None, float]]) -> dict[int | None, float]:
    """seed -> value; two trials with one seed at one level would be a sweep bug."""
    found: dict[int | None, float] = {}
    for seed, value in values:
        assert seed not in found, f"two trials with seed {seed} at one level of one combination"
        found[seed] = value
    return found


def _effect(before: Mapping[int | None, float], after: Mapping[int | None, float]) -> statistics.SeedMean:
    """statistics.factor_effect over the seeds of either level (NaN where one level lacks a seed: left out)."""
    seeds = sorted({*before, *after}, key=str)
    return statistics.factor_effect([before.get(seed, math.nan) for seed in seeds],
                                    [after.get(seed, math.nan) for seed in seeds])


def _entry(factor: str, figure: str, at: dict[str, str], first: str, last: str, effect: statistics.SeedMean,
           compared: Iterable[SeedRun]) -> dict[str, Any]:
    direction = PAPER_DIRECTIONS[factor]
    untrained = sorted({run.label for run in compared if run.untrained})
    verdict = CONFOUNDED if untrained else statistics.verdict(effect, direction)
    return {"factor": factor, "figure": figure, "direction": direction, "at": at, "from": first, "to": last,
            **effect.as_dict(), "verdict": verdict, "untrained": untrained}


def factor_verdicts(runs: Sequence[SeedRun], factors: Sequence[str],
                    figures: Sequence[str] = VERDICT_FIGURES) -> list[dict[str, Any]]:
    """Every swept factor's paired effect on each figure, per combination of the other factors' levels, and the
    effect of training length inside the trials.

    factors: the swept factors, in order (one with a single level among ``runs``, or without a paper direction, is
    skipped). A factor's effect compares its first and last level (``ordered_levels``) at the trials' last audit;
    training length compares each trial's first audit with its last (trials audited once are left out).
    Returns, factor by factor (training length last), combination by combination, figure by figure:
    {"factor", "figure", "direction" ("up" / "down"), "at" {other factor: level}, "from", "to" (the levels, or
    for training length the diffusion epochs trained, compared), "mean", "lo", "hi" (the effect, to minus from,
    in the figure's units, with its 95 % interval), "n_seeds", "sd", "verdict", "untrained" (the compared trials
    that did not train, by ``SeedRun.label``: the verdict is then CONFOUNDED)}. Only combinations measured at both
    ends are listed.
    """
    order = {name: ordered_levels(name, (run.levels.get(name) for run in runs)) for name in factors}
    entries = []
    for factor in factors:
        if factor in PAPER_DIRECTIONS and len(order[factor]) >= 2:
            entries += _level_effects(runs, factor, factors, order, figures)
    return entries + _length_effects(runs, factors, order, figures)


def _combinations(runs: Sequence[SeedRun], names: Sequence[str], order: Mapping[str, list[str]]
                  ) -> list[tuple[dict[str, str], list[SeedRun]]]:
    """The runs grouped by their levels of ``names``: ({name: level}, runs), in the levels' order."""
    grouped: dict[tuple[str | None, ...], list[SeedRun]] = {}
    for run in runs:
        grouped.setdefault(tuple(run.levels.get(name) for name in names), []).append(run)
    ranked = sorted(grouped, key=lambda combo: tuple(order[name].index(level) if level in order[name] else -1
                                                      for name, level in zip(names, combo)))
    return [({name: level for name, level in zip(names, combo) if level is not None}, grouped[combo])
            for combo in ranked]


def _level_effects(runs: Sequence[SeedRun], factor: str, factors: Sequence[str], order: Mapping[str, list[str]],
                   figures: Sequence[str]) -> list[dict[str, Any]]:
    """The factor's effect (last level minus first, at the last audit) at each combination of the others."""
    first, last = order[factor][0], order[factor][-1]
    entries = []
    for at, members in _combinations(runs, [name for name in factors if name != factor], order):
        compared = [run for run in members if run.levels.get(factor) in (first, last)]
        for figure in figures:
            before, after = (_by_seed((run.seed, run.last.get(figure, math.nan)) for run in members
                                      if run.levels.get(factor) == level) for level in (first, last))
            if before and after:
                entries.append(_entry(factor, figure, at, first, last, _effect(before, after), compared))
    return entries


def _length_effects(runs: Sequence[SeedRun], factors: Sequence[str], order: Mapping[str, list[str]],
                    figures: Sequence[str]) -> list[dict[str, Any]]:
    """Training length's effect (each trial's last audit minus its first) at each combination of every factor."""
    entries = []
    for at, members in _combinations([run for run in runs if run.last_epochs > run.first_epochs], factors, order):
        span = [_epochs({run.first_epochs for run in members}), _epochs({run.last_epochs for run in members})]
        for figure in figures:
            before = _by_seed((run.seed, run.first.get(figure, math.nan)) for run in members)
            after = _by_seed((run.seed, run.last.get(figure, math.nan)) for run in members)
            entries.append(_entry(TRAINING_LENGTH, figure, at, *span, _effect(before, after), members))
    return entries


def _epochs(counts: set[int]) -> str:
    """The diffusion epochs of an audit as a label: one number, or a range where seeds stopped at different
    lengths (early stopping)."""
    return str(min(counts)) if len(counts) == 1 else f"{min(counts)}-{max(counts)}"


def verdicts_json(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The entries with NaN as None (JSON has no NaN): bounds are NaN with fewer than 2 seeds."""
    return [{key: None if isinstance(value, float) and not math.isfinite(value) else value
             for key, value in entry.items()} for entry in entries]
