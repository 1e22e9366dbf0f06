"""Markdown tables of a sweep's audits, every audit of every factor combination, seeds side by side.

    .venv/bin/python tools/study_tables.py out/studies/sweeps/<study>/<sweep>

Reads each trial's epoch-*/figures.json (what the trial logged to MLflow) and prints, per combination and audit,
the memorized and copy percentages of each seed, their mean with a 95 % Student-t interval over seeds (not clipped
to 0-100 %), the false-positive rates measured on the study's test patients at the trial's thresholds, and tau.
docs/reproduction.md's per-audit tables come from it.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from raymem.audit.statistics import seed_interval

SEED = re.compile(r"-s(\d+)$")


def _audits(sweep: Path) -> dict[str, dict[int, dict[str, float]]]:
    """trial key -> diffusion epochs trained at the audit -> figures."""
    audits: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    for path in sorted(sweep.glob("trials/*/epoch-*/figures.json")):
        trial, folder = path.parts[-3], path.parts[-2]
        audits[trial][int(folder.removeprefix("epoch-"))] = json.loads(path.read_text())
    return audits


def _same(values: list[float], form: str) -> str:
    text = form.format(sum(values) / len(values))
    return text if max(values) - min(values) < 1e-9 else f"{text} (differs by seed)"


def _natural(key: str) -> list:
    """n8 before n16: numbers in a trial key compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def table(sweep: Path) -> list[str]:
    audits = _audits(sweep)
    # Checkpoint folders count epochs across both stages from 0: epoch-E holds E + 1 epochs, the autoencoder's first.
    autoencoder_epochs = json.loads((sweep / "study.json").read_text())["config"]["ldm"].get("autoencoder_epochs", 0)
    combos: dict[str, dict[int, str]] = defaultdict(dict)
    for trial in audits:
        combos[SEED.sub("", trial)][int(SEED.search(trial).group(1))] = trial
    lines = ["| combination | audit (diffusion epochs) | % memorized by seed | mean [95 % interval] | % copies by seed "
             "| mean [95 % interval] | test-patient false-positive rate at tau, memorized / copies (%) | tau |",
             "|---|---|---|---|---|---|---|---|"]
    for combo, seeds in sorted(combos.items(), key=lambda item: _natural(item[0])):
        trials = [seeds[seed] for seed in sorted(seeds)]
        epochs = sorted(set.intersection(*(set(audits[trial]) for trial in trials)))
        for epoch in epochs:
            figures = [audits[trial][epoch] for trial in trials]
            row = [combo, str(epoch + 1 - autoencoder_epochs)]
            for name in ("memorization/pct_memorized_train", "memorization/pct_copies"):
                values = [f[name] for f in figures]
                interval = seed_interval(values)
                row += [" / ".join(f"{v:.1f}" for v in values),
                        f"{interval.mean:.1f} [{interval.lo:.1f}, {interval.hi:.1f}]" if interval.n >= 2
                        else f"{interval.mean:.1f}"]
            fpr = [100 * f["audit/measured_fpr_memorized"] for f in figures]
            fpr_copies = [100 * f["audit/measured_fpr_copies"] for f in figures]
            row += [f"{_same(fpr, '{:.1f}')} / {_same(fpr_copies, '{:.1f}')}",
                    _same([f["audit/threshold"] for f in figures], "{:.3f}")]
            lines.append("| " + " | ".join(row) + " |")
    return lines


if __name__ == "__main__":
    print("\n".join(table(Path(sys.argv[1]))))
