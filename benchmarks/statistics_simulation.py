"""The audit's figures on simulated embeddings with a known truth (docs/statistics.md, "Simulations").

For each scenario of raymem.audit.simulation.SCENARIOS, R repetitions: draw the audit's sets, run the audit's
own calibrations on them, compute the true rates at its thresholds from fresh samples; print, per calibration and
figure, the mean true rate, the mean measured rate, the mean error, the mean 95 % interval width and the share of
intervals that hold the truth (coverage), as a Markdown table. Variants (other estimators on the same draws,
broken on purpose, and the test patients' copy rate held against a shifted generator's) are listed with
--variants. The tests (tests/unit/test_statistics_simulation.py)
run the same code with fewer repetitions.

    .venv/bin/python benchmarks/statistics_simulation.py [--repetitions 200] [--calibrations matched paper]
        [--scenarios iid patients ...] [--variants] [--out results.json]

No Ray, one core (BLAS limited to one thread); about 0.06-0.18 s of CPU per repetition and scenario (about
160 s for all ten at 200 repetitions).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from raymem.audit import simulation

FIGURE_ORDER = ["measured_fpr_copies", "measured_fpr_memorized", "measured_fpr_memorized_patients", "pct_copies",
                "pct_memorized_train", "pct_memorized_patients", "generator_fpr_copies", "generator_fpr_memorized"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=200)
    parser.add_argument("--scenarios", nargs="+", default=list(simulation.SCENARIOS),
                        choices=list(simulation.SCENARIOS), metavar="SCENARIO")
    parser.add_argument("--calibrations", nargs="+", default=["paper", "matched", "generator"])
    parser.add_argument("--variants", action="store_true", help="also simulation.VARIANTS (not audit figures)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write every row as JSON here too")
    args = parser.parse_args()

    print("| scenario | calibration | figure | true rate | mean measured | mean error | mean CI width | coverage |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.scenarios:
        scenario = simulation.SCENARIOS[name]
        start = time.process_time()
        variants = tuple(simulation.VARIANTS) if args.variants else ()
        summaries = simulation.simulate_variants(scenario, args.repetitions, variants, seed=args.seed)
        order = {figure: i for i, figure in enumerate(FIGURE_ORDER + list(variants))}
        for row in sorted(summaries, key=lambda r: (args.calibrations.index(r.calibration)
                                                    if r.calibration in args.calibrations else 99,
                                                    order[r.figure])):
            if row.calibration not in args.calibrations:
                continue
            rows.append(asdict(row))
            print(f"| {row.scenario} | {row.calibration} | {row.figure} | {row.true_rate:.4f} | {row.measured:.4f} | "
                  f"{row.bias:+.4f} | {row.width:.4f} | {row.coverage:.2f} |", flush=True)
        rows.append({"scenario": name, "cpu_s": time.process_time() - start})
    print(f"\n{args.repetitions} repetitions per scenario, seed {args.seed}; rates in 0-1 (pct_* too).")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
