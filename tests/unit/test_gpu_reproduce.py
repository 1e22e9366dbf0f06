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


def test_the_dry_run_reports_every_factor_combination_at_every_audited_step(quick_result):
    # the quick plan: centre n=16, no augmentation, tiny; sizes 8 and 32, augmentation on, and the small preset
    runs = [(16, False, "tiny"), (8, False, "tiny"), (32, False, "tiny"), (16, True, "tiny"), (16, False, "small")]

    reported = sorted((row["train_size"], row["augment"], row["preset"], row.get("diffusion_steps"))
                      for row in quick_result["rows"])

    assert len(quick_result["audit_steps"]) >= 2 and reported == sorted(
        (*run, step) for run in runs for step in quick_result["audit_steps"])


def test_every_percentage_is_finite_and_between_0_and_100(quick_result):
    percentages = [value for row in quick_result["rows"] for key, value in row.items() if key.startswith("pct_")]

    # four figures per row (memorized, memorized in the shared subset, copies, validation above tau); NaN fails too
    assert len(percentages) == 4 * len(quick_result["rows"]) and all(0.0 <= value <= 100.0 for value in percentages)


def test_the_direction_summary_covers_every_factor(quick_result):
    summarised = {comparison["factor"] for comparison in quick_result["directions"]
                  if comparison["direction"] in {"up", "down", "flat", "mixed"}}

    assert summarised == FACTORS


def test_diffusion_steps_are_scaled_down_together_when_the_plan_would_not_fit(gpu_reproduce):
    plan = gpu_reproduce.QUICK  # 4 tiny runs and 1 small one, each 2 autoencoder and 2 diffusion steps, 2 audits
    costs = {"tiny": gpu_reproduce.StepCosts(autoencoder_step_s=1.0, diffusion_step_s=1.0, audit_s=1.0),
             "small": gpu_reproduce.StepCosts(autoencoder_step_s=2.0, diffusion_step_s=2.0, audit_s=1.0)}
    # kept: autoencoder 4 x 2 s + 1 x 4 s and audits 5 x 2 x 1 s, 22 s; diffusion 4 x 2 s + 1 x 4 s = 12 s, 6 s left
    seconds_left = (22.0 + 6.0) / gpu_reproduce.SAFETY

    scale = gpu_reproduce.step_scale(plan, costs, seconds_left)

    assert scale == pytest.approx(0.5)


def test_a_plan_scaled_far_down_still_audits_every_training_length_at_its_own_step(gpu_reproduce):
    plan = gpu_reproduce.FULL  # audits at 1/8, 1/4, 1/2 and all of the diffusion steps

    scaled = plan.scaled(gpu_reproduce.MIN_STEP_SCALE / 100)

    assert scaled.audit_steps() == [1, 2, 4, 8]
