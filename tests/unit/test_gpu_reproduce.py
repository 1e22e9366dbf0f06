"""benchmarks/gpu_reproduce.py: its CPU dry run, without the packages the bare GPU machine lacks, and its budget."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_reproduce.py"
# Not installed on the GPU machine the script is written for: in the dry run, importing any of them fails.
ABSENT_ON_DEVICE = ("ray", "pyarrow", "pydantic", "yaml", "nibabel", "pydicom", "PIL", "mlflow", "tqdm", "fsspec",
                    "s3fs", "boto3")
FACTORS = {"train_size", "augment", "preset", "diffusion_steps"}


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_reproduce") / "quick.json"
    runner = (f"import runpy, sys; sys.modules.update(dict.fromkeys({ABSENT_ON_DEVICE!r})); "
              f"sys.argv = [{str(SCRIPT)!r}, '--quick', '--device', 'cpu', '--out', {str(out)!r}]; "
              f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    completed = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def gpu_reproduce():
    spec = importlib.util.spec_from_file_location("gpu_reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_reports_every_factor_combination_and_seed_at_every_audited_step(quick_result):
    # the quick plan: centre n=16, no augmentation, tiny; sizes 8 and 32, augmentation on, and the small preset
    runs = [(16, False, "tiny"), (8, False, "tiny"), (32, False, "tiny"), (16, True, "tiny"), (16, False, "small")]

    reported = sorted((row["train_size"], row["augment"], row["preset"], row["seed"], row.get("diffusion_steps"))
                      for row in quick_result["rows"])

    assert quick_result["plan"]["seeds"] == [0, 1] and len(quick_result["audit_steps"]) >= 2
    assert reported == sorted((*run, seed, step) for run in runs for seed in (0, 1)
                              for step in quick_result["audit_steps"])


def test_every_share_is_a_percentage_inside_its_wilson_interval(quick_result):
    shares = ("pct_memorized_train", "pct_memorized_shared", "pct_copies", "pct_test_above_tau")
    for row in quick_result["rows"]:
        for key in shares:
            lo, hi = row[f"{key}_ci"]
            # NaN fails every comparison; an interval that misses its own estimate is wrong
            assert 0.0 <= lo <= row[key] <= hi <= 100.0, (key, row)
        # as many samples as training images, at least (the paper's rule)
        assert row["n_synthetic"] >= row["n_train"] == row["train_size"]


def test_seeds_share_the_calibration_and_differ_in_what_they_generate(quick_result):
    by_run_step: dict[tuple, dict[int, dict]] = {}
    for row in quick_result["rows"]:
        by_run_step.setdefault((row["run"], row["diffusion_steps"]), {})[row["seed"]] = row

    for seeds in by_run_step.values():
        # tau depends only on the training subset and the shared validation set: the seed must not move it
        assert seeds[0]["tau"] == seeds[1]["tau"]
        assert seeds[0]["pct_test_above_tau"] == seeds[1]["pct_test_above_tau"]
    # the seed sets the LDM's weights and noise: its samples, hence their best matches, differ
    assert any(seeds[0]["synthetic_top1_median"] != seeds[1]["synthetic_top1_median"]
               for seeds in by_run_step.values())


def test_the_summary_gives_every_factor_a_verdict_from_its_interval_over_seeds(quick_result):
    verdicts = quick_result["verdicts"]

    assert {comparison["factor"] for comparison in verdicts} == FACTORS
    for comparison in verdicts:
        effect = comparison["effect"]
        assert comparison["verdict"] in {"shown", "same direction, not significant", "not shown"}
        assert effect["n_seeds"] == 2 and len(comparison["per_seed"]) == 2
        assert effect["mean"] == pytest.approx(sum(b - a for a, b in comparison["per_seed"]) / 2)
    assert all(entry["pct_copies"]["n_seeds"] == 2 for entry in quick_result["across_seeds"])


def test_diffusion_steps_are_scaled_down_together_when_the_plan_would_not_fit(gpu_reproduce):
    plan = gpu_reproduce.QUICK  # 2 seeds x (4 tiny runs + 1 small), each 2 autoencoder and 2 diffusion steps, 2 audits
    costs = {"tiny": gpu_reproduce.StepCosts(autoencoder_step_s=1.0, diffusion_step_s=1.0, audit_s=1.0),
             "small": gpu_reproduce.StepCosts(autoencoder_step_s=2.0, diffusion_step_s=2.0, audit_s=1.0)}
    # kept: 2 x (autoencoder 4 x 2 s + 1 x 4 s and audits 5 x 2 x 1 s) = 44 s; diffusion 2 x (4 x 2 s + 1 x 4 s) = 24 s
    seconds_left = (44.0 + 12.0) / gpu_reproduce.SAFETY

    assert gpu_reproduce.step_scale(plan, costs, seconds_left) == pytest.approx(0.5)


def test_runs_spread_over_workers_fit_by_the_longest_first_bound(gpu_reproduce):
    plan = gpu_reproduce.QUICK
    costs = {preset: gpu_reproduce.StepCosts(autoencoder_step_s=1.0, diffusion_step_s=1.0, audit_s=1.0)
             for preset in ("tiny", "small")}
    # 10 equal runs of 4 kept + 2 diffusion seconds on 5 workers: 10/5 + (1 - 1/5) x 1 = 2.8 runs in a row,
    # 11.2 kept seconds, 5.6 s of diffusion at scale 1
    seconds_left = (11.2 + 0.5 * 5.6) / gpu_reproduce.SAFETY

    assert gpu_reproduce.step_scale(plan, costs, seconds_left, workers=5) == pytest.approx(0.5)


def test_seeds_are_dropped_before_runs_become_too_short_to_memorize(gpu_reproduce):
    plan = gpu_reproduce.FULL  # 3 seeds, at least 2, 3000 diffusion steps planned, at least 1200 wanted
    costs = {preset: gpu_reproduce.StepCosts(autoencoder_step_s=0.0, diffusion_step_s=0.01, audit_s=0.0)
             for preset in plan.presets}
    # 5 runs a seed, 1 worker: 3 seeds x 5 x 3000 x 0.01 s = 450 s at full length
    roomy, _ = gpu_reproduce.fit_plan(plan, costs, 450 / gpu_reproduce.SAFETY, workers=1)
    # 260 s: 3 seeds would get 1733 steps (kept), and 170 s: 3 seeds 1133 (< 1200) so a seed goes, 2 seeds 1700
    tight, _ = gpu_reproduce.fit_plan(plan, costs, 260 / gpu_reproduce.SAFETY, workers=1)
    tighter, _ = gpu_reproduce.fit_plan(plan, costs, 170 / gpu_reproduce.SAFETY, workers=1)
    # 50 s: below 1200 even with 2 seeds, which stay (min_seeds)
    floor, _ = gpu_reproduce.fit_plan(plan, costs, 50 / gpu_reproduce.SAFETY, workers=1)

    assert (roomy.seeds, roomy.diffusion_steps) == ((0, 1, 2), 3000)
    assert (tight.seeds, tight.diffusion_steps) == ((0, 1, 2), 1734)
    assert (tighter.seeds, tighter.diffusion_steps) == ((0, 1), 1700)
    assert floor.seeds == (0, 1) and floor.diffusion_steps == 500


def test_a_plan_scaled_far_down_still_audits_every_training_length_at_its_own_step(gpu_reproduce):
    plan = gpu_reproduce.FULL  # audits at 1/8, 1/4, 1/2 and all of the diffusion steps

    scaled = plan.scaled(gpu_reproduce.MIN_STEP_SCALE / 100)

    assert scaled.audit_steps() == [1, 2, 4, 8]
