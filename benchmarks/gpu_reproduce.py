"""The paper's factor study in one GPU call (issue 8, item 3): memorization against training-set size, augmentation,
model size and training length, on phantom chest X-rays, with plain PyTorch loops over raymem's compute core.

Needs python3, torch (CUDA), numpy, scipy (the phantom generator's pose warp, raymem.data.transforms and
raymem.audit.metrics import it) and monai: no Ray, pyarrow, pydantic, MLflow or network. bf16 autocast on CUDA.

1. Data: phantom patients (raymem.data.phantoms, xray2d) mapped to [0, 1] as ingest maps X-rays; the first patients
   train, the rest are the validation set (phantom patients are independent draws, so this is a patient-level split).
2. Detector: the ``tiny`` copy detector, trained once on the whole training split (patient-aware NT-Xent, the strong
   augmentation, cosine learning rate: the demo's short-run settings), scored on the validation set.
3. Factors, one at a time around a centre run (the paper studies each factor on its own): training-set size (nested
   subsets: the first n of one seeded order, so every run trains on the smallest subset too), augmentation off/on,
   model size (LDM preset). Every LDM starts from the same seed and is trained from scratch with raymem.models.ldm as
   raymem/train/ldm.py's loop uses it: autoencoder steps, latent scale from the moments of the training latents,
   diffusion steps on freshly encoded batches. Training length: each run is audited at several diffusion step
   counts, without retraining. The augmentation is the paper's (flip p=0.5, rotation within +-5 degrees p=0.5) drawn
   on the device by raymem.models.copy_transforms (``TRANSFORM_PRESETS["paper"]``): the MONAI version in
   raymem.data.transforms.make_augment goes image by image on the CPU (about 20 ms an image on the loaded dev box),
   which would cost more than the training step it feeds.
4. Audit at each checkpoint: as many DDIM samples as training images (at least ``min_synthetic``), embedded with the
   detector like the training subset and the validation set; the paper's calibration with raymem.search.kernel and
   raymem.audit.metrics (tau = P95 of each training image's best validation correlation; memorized training images
   and copies strictly above tau), over the run's training subset and over the subset every run trained on; and the
   share of validation images above tau, which is what a generator of only new images would score as copies.
5. A markdown table on stdout as rows finish, ``--out`` JSON (rewritten after every row) with every figure, the card
   and versions, and per factor the direction the figures move in, next to the paper's.

Every run takes the same number of steps, so the factors stay comparable. ``--budget-s`` bounds the script from the
start of main (imports come before it): the step costs of each preset are measured on the device before the first
run, and the diffusion steps of every run are scaled down together when the plan would not fit (autoencoder steps and
audits are kept). A run that fails is reported and the others still run.

    python benchmarks/gpu_reproduce.py --out results.json                 # --budget-s 270 by default
    bash benchmarks/gpu_device_run.sh gpu_reproduce:330                   # the same on the bare GPU machine
    python benchmarks/gpu_reproduce.py --quick --device cpu --out q.json  # every code path, ~10 s on the dev box
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import importlib.util
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if importlib.util.find_spec("scipy") is None:  # checked before the imports below, which need it
    sys.exit("gpu_reproduce needs scipy: raymem.data.phantoms warps each image's pose with scipy.ndimage, and "
             "raymem.data.transforms and raymem.audit.metrics import it; install it, or carry its wheel in .whl/ "
             "for benchmarks/gpu_device_run.sh")

import monai  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from raymem.audit import metrics  # noqa: E402
from raymem.audit.accuracy import accuracy_with_baselines  # noqa: E402
from raymem.data import phantoms  # noqa: E402
from raymem.data.transforms import normalise_intensity  # noqa: E402
from raymem.models import ldm as core  # noqa: E402
from raymem.models.copy_transforms import TRANSFORM_PRESETS, random_transform  # noqa: E402
from raymem.models.detector import build_detector, cosine_lr, embed, train_step  # noqa: E402
from raymem.search import kernel  # noqa: E402

PERCENTILE = 95.0  # the paper's threshold percentile
DETECTOR_PRESET = "tiny"
DETECTOR_LR = (1e-3, 5e-4)  # cosine from, to: jobs/configs/demo-xray2d.yaml's short-run values (paper: 1e-4, 5e-5)
DETECTOR_AUGMENTATION = "strong"  # as the demo: the detector then also finds copies that are not pixel-exact
LR_AUTOENCODER = 1e-3  # the demo's
LR_DIFFUSION = 1e-3
KL_WEIGHT = 1e-6  # LDMTrainConfig's default (MONAI's tutorials)
SAFETY = 0.85  # the share of the seconds left that the predicted step and audit time may fill
MIN_STEP_SCALE = 0.05  # steps are never scaled below this share of the plan
TIMED_STEPS = 5  # steps timed per stage and preset, after WARMUP_STEPS
WARMUP_STEPS = 2
PAPER_DIRECTIONS = {"train_size": "down", "augment": "down", "preset": "up", "diffusion_steps": "up"}
DIRECTION_METRICS = ("pct_memorized_train", "pct_memorized_shared", "pct_copies")


@dataclasses.dataclass(frozen=True)
class Factors:
    """One LDM of the study: its training-set size, augmentation and preset (model size)."""

    train_size: int
    augment: bool
    preset: str

    @property
    def name(self) -> str:
        return f"n={self.train_size} aug={'on' if self.augment else 'off'} {self.preset}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every size and step count of one study. Levels are in the order the paper's directions read them: sizes and
    presets ascending, augmentation off then on. ``audit_fractions`` of ``diffusion_steps`` are the audited steps."""

    image_size: int
    patients: int
    val_patients: int
    images_per_patient: int
    detector_steps: int
    detector_batch: int
    sizes: tuple[int, ...]
    presets: tuple[str, ...]
    centre: Factors
    autoencoder_steps: int
    autoencoder_batch: int
    diffusion_steps: int
    diffusion_batch: int
    audit_fractions: tuple[float, ...]
    ddim_steps: int
    min_synthetic: int
    seed: int = 0

    def runs(self) -> list[Factors]:
        """The centre first, then each factor's other levels with the rest at the centre."""
        others = ([dataclasses.replace(self.centre, train_size=size) for size in self.sizes]
                  + [dataclasses.replace(self.centre, augment=augment) for augment in (False, True)]
                  + [dataclasses.replace(self.centre, preset=preset) for preset in self.presets])
        return [self.centre] + [run for run in others if run != self.centre]

    def audit_steps(self) -> list[int]:
        return sorted({max(1, round(fraction * self.diffusion_steps)) for fraction in self.audit_fractions})

    def scaled(self, scale: float) -> Plan:
        """The plan with its diffusion steps times ``scale``, rounded up, and at least enough that each audit fraction
        (multiples of the smallest) has a step of its own."""
        return dataclasses.replace(self, diffusion_steps=max(math.ceil(1 / min(self.audit_fractions)),
                                                             math.ceil(scale * self.diffusion_steps)))

    def n_synthetic(self, train_size: int) -> int:
        return max(train_size, self.min_synthetic)


# 300 training patients (600 images) and 100 validation patients (200 images) at 32^2: the tiny presets' size, which
# the small preset accepts too. On the dev box the tiny LDM memorized about half as fast per step at 64^2 (32 images,
# 200 autoencoder steps, diffusion batches of 64: 9 % of them memorized after 600 diffusion steps, against 41 % at
# 32^2), and the budget buys a few thousand diffusion steps at most. The centre trains on the smallest subset, so
# the augmentation and model-size comparisons are made where there is memorization to change. Diffusion batches of
# 256: on a GPU these networks' steps are bound by kernel launches (docs/benchmarks.md: the tiny UNet took 35 ms a
# step at batch 64 on the H200), so a larger batch costs little.
FULL = Plan(image_size=32, patients=400, val_patients=100, images_per_patient=2, detector_steps=800, detector_batch=64,
            sizes=(32, 128, 512), presets=("tiny", "small"), centre=Factors(32, False, "tiny"),
            autoencoder_steps=400, autoencoder_batch=64, diffusion_steps=3000, diffusion_batch=256,
            audit_fractions=(0.125, 0.25, 0.5, 1.0), ddim_steps=50, min_synthetic=64)
QUICK = Plan(image_size=16, patients=24, val_patients=8, images_per_patient=2, detector_steps=3, detector_batch=16,
             sizes=(8, 16, 32), presets=("tiny", "small"), centre=Factors(16, False, "tiny"),
             autoencoder_steps=2, autoencoder_batch=8, diffusion_steps=2, diffusion_batch=8,
             audit_fractions=(0.5, 1.0), ddim_steps=2, min_synthetic=8)


@dataclasses.dataclass(frozen=True)
class Data:
    """The phantom X-rays on the device, intensities in [0, 1].

    train_images (N_train, 1, S, S) in subset order (the subset of size n is the first n rows), train_patients
    (N_train,) int64 patient indices (device); val_images (N_val, 1, S, S), val_patients (N_val,) numpy."""

    train_images: torch.Tensor
    train_patients: torch.Tensor
    val_images: torch.Tensor
    val_patients: np.ndarray


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """Seconds per autoencoder step, per diffusion step (encoding and augmentation included) and per audit."""

    autoencoder_step_s: float
    diffusion_step_s: float
    audit_s: float


def phantom_data(plan: Plan, device: torch.device) -> Data:
    """The plan's phantom chest X-rays, normalised as ingest normalises X-rays, split by patient."""
    images, patients = [], []
    for image in phantoms.generate("xray2d", patients=plan.patients, images_per_patient=plan.images_per_patient,
                                   size=plan.image_size, seed=plan.seed):
        images.append(normalise_intensity(image.array, image.modality)[None])
        patients.append(image.patient_index)
    images, patients = torch.from_numpy(np.stack(images)), np.array(patients)
    is_train = patients < plan.patients - plan.val_patients
    # a seeded order of the training images: the nested subsets are its prefixes (raymem.train.ldm.nested_subset)
    order = np.random.default_rng(plan.seed).permutation(int(is_train.sum()))
    return Data(train_images=images[is_train][order].to(device),
                train_patients=torch.from_numpy(patients[is_train][order]).to(device),
                val_images=images[~is_train].to(device), val_patients=patients[~is_train])


def index_batches(n_images: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless (batch_size,) index batches: epochs of seeded permutations of range(n_images), one after another, so
    every image is seen equally often and a subset smaller than the batch fills it with repeats."""
    generator = torch.Generator().manual_seed(seed)
    pending = torch.zeros(0, dtype=torch.int64)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n_images, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_detector(plan: Plan, data: Data, device: torch.device) -> torch.nn.Module:
    """The copy detector trained on the whole training split, as raymem/train/detector.py's loop does per step."""
    torch.manual_seed(plan.seed)
    model = build_detector(DETECTOR_PRESET, spatial_dims=2).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=DETECTOR_LR[0])
    generator = torch.Generator(device=device).manual_seed(plan.seed)
    augment = functools.partial(random_transform, bounds=TRANSFORM_PRESETS[DETECTOR_AUGMENTATION], generator=generator)
    batches = index_batches(len(data.train_images), plan.detector_batch, plan.seed)
    for step in range(plan.detector_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, plan.detector_steps, *DETECTOR_LR)
        rows = next(batches).to(device)
        train_step(model, optimizer, data.train_images[rows], data.train_patients[rows], augment,
                   autocast_bf16=device.type == "cuda")
    return model.eval()


def ldm_augment(factors: Factors, seed: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LDM's training augmentation: the paper's flip + rotation when the run has it, else the identity."""
    if not factors.augment:
        return lambda images: images
    generator = torch.Generator(device=device).manual_seed(seed)
    return functools.partial(random_transform, bounds=TRANSFORM_PRESETS["paper"], generator=generator)


class LDMTraining:
    """One LDM of the study, trained in steps as raymem/train/ldm.py's loop trains it, on ``images`` (n, 1, S, S)."""

    def __init__(self, factors: Factors, images: torch.Tensor, plan: Plan, seed: int) -> None:
        self.images, self.plan = images, plan
        self.device = images.device
        self.bf16 = self.device.type == "cuda"
        torch.manual_seed(seed)  # the same initial weights for every run of a preset
        self.model = core.build_ldm(factors.preset, spatial_dims=2).to(self.device)
        self.augment = ldm_augment(factors, seed, self.device)
        self.autoencoder_batches = index_batches(len(images), plan.autoencoder_batch, seed)
        self.diffusion_batches = index_batches(len(images), plan.diffusion_batch, seed + 1)
        self.autoencoder_optimizer = torch.optim.Adam(self.model.autoencoder.parameters(), lr=LR_AUTOENCODER)
        self.unet_optimizer = torch.optim.Adam(self.model.unet.parameters(), lr=LR_DIFFUSION)
        self.scheduler = core.noise_scheduler()
        self.noise_generator = torch.Generator(device=self.device).manual_seed(seed)

    def autoencoder_step(self) -> None:
        batch = self.augment(self.images[next(self.autoencoder_batches).to(self.device)])
        core.autoencoder_step(self.model.autoencoder, self.autoencoder_optimizer, batch, kl_weight=KL_WEIGHT,
                              autocast_bf16=self.bf16)

    def set_latent_scale(self) -> None:
        """1 / std of the training latents, from one augmented pass over the training images."""
        moments = sum((core.latent_moments(self.model, self.augment(chunk))
                       for chunk in self.images.split(self.plan.autoencoder_batch)),
                      torch.zeros(3, dtype=torch.float64, device=self.device))
        self.model.latent_scale.fill_(core.latent_scale_from_moments(moments))

    def diffusion_step(self) -> None:
        batch = self.augment(self.images[next(self.diffusion_batches).to(self.device)])
        core.diffusion_step(self.model.unet, self.unet_optimizer, self.scheduler, self.model.encode(batch),
                            self.noise_generator, self.bf16)

    def sample(self, n_synthetic: int) -> torch.Tensor:
        """n_synthetic DDIM samples (n_synthetic, 1, S, S) in [0, 1], seeds 0..n_synthetic-1."""
        return core.sample_images(self.model, self.images.shape[2:], range(n_synthetic),
                                  ddim_steps=self.plan.ddim_steps, autocast_bf16=self.bf16)


def measure_step_costs(preset: str, plan: Plan, data: Data, quick: bool) -> StepCosts:
    """Step and audit costs of a preset on this device, on a throwaway LDM with augmentation on (the dearer case);
    the audit is timed by sampling the largest synthetic set once."""
    device = data.train_images.device
    training = LDMTraining(Factors(len(data.train_images), True, preset), data.train_images, plan, plan.seed)
    timed, warmup = (1, 1) if quick else (TIMED_STEPS, WARMUP_STEPS)
    seconds = []
    for step in (training.autoencoder_step, training.diffusion_step):
        for _ in range(warmup):
            step()
        synchronize(device)
        started = time.perf_counter()
        for _ in range(timed):
            step()
        synchronize(device)
        seconds.append((time.perf_counter() - started) / timed)
    started = time.perf_counter()
    training.sample(plan.n_synthetic(max(plan.sizes)))
    synchronize(device)
    return StepCosts(*seconds, audit_s=time.perf_counter() - started)


def step_scale(plan: Plan, costs: dict[str, StepCosts], seconds_left: float) -> float:
    """The share of the plan's diffusion steps (at most 1, at least MIN_STEP_SCALE) whose predicted time, after every
    run's autoencoder steps and audits, fits SAFETY * seconds_left. The autoencoder steps are kept: they cost a
    fraction of the diffusion steps, and copies are only recognisable through a decoder that reconstructs well.
    Runs of presets without costs are not counted."""
    runs = [run for run in plan.runs() if run.preset in costs]
    fixed_s = sum(plan.autoencoder_steps * costs[run.preset].autoencoder_step_s
                  + len(plan.audit_steps()) * costs[run.preset].audit_s for run in runs)
    diffusion_s = sum(plan.diffusion_steps * costs[run.preset].diffusion_step_s for run in runs)
    if diffusion_s == 0:
        return 1.0
    return min(1.0, max(MIN_STEP_SCALE, (SAFETY * seconds_left - fixed_s) / diffusion_s))


def _exact_top1(queries: torch.Tensor, rows: np.ndarray, references: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    scores, indices = kernel.exact_topk(queries[torch.from_numpy(rows)], [(0, references)], 1)
    return scores.numpy(), indices.numpy()


def nearest_both_ways(queries: torch.Tensor, references: torch.Tensor) -> tuple[metrics.Neighbours, metrics.Neighbours]:
    """Each query's best reference and each reference's best query (Pearson, float64 near decisions), as the audit
    (raymem.audit.embeddings.run_audit) builds them: queries (n, d), references (m, d) float32 on the CPU."""
    found = kernel.search(queries, references, k=1)
    return (metrics.Neighbours(found.row_scores.numpy(), found.row_indices.numpy(),
                               functools.partial(_exact_top1, queries, references=references)),
            metrics.Neighbours(found.col_scores.numpy()[:, None], found.col_indices.numpy()[:, None],
                               functools.partial(_exact_top1, references, references=queries)))


def memorization_figures(train: np.ndarray, val: np.ndarray, synthetic: np.ndarray, n_shared: int) -> dict[str, float]:
    """The paper's calibration on embeddings train (n, d), val (m, d), synthetic (s, d).

    tau: PERCENTILE of each training image's best validation correlation. pct_memorized_train: training images with
    a synthetic sample strictly above tau; pct_memorized_shared: the same over the first n_shared training images
    (those every run trained on); pct_copies: synthetic samples whose best training match is above tau;
    pct_val_above_tau: validation images whose best training match is above tau (new images counted as copies).
    """
    invalid = kernel.find_invalid_rows(torch.from_numpy(synthetic))
    if bool(invalid.any()):
        raise ValueError(f"{int(invalid.sum())} synthetic samples have constant or non-finite embeddings: the LDM's "
                         "training diverged; lower LR_DIFFUSION")
    train_t, val_t, synthetic_t = (torch.from_numpy(np.ascontiguousarray(x)) for x in (train, val, synthetic))
    train_to_val, val_to_train = nearest_both_ways(train_t, val_t)
    tau = metrics.percentile_threshold(train_to_val, PERCENTILE)
    synthetic_to_train, train_to_synthetic = nearest_both_ways(synthetic_t, train_t)
    is_memorized = train_to_synthetic.exceeds(tau)
    return {
        "tau": tau,
        "pct_memorized_train": metrics.percent(is_memorized.sum(), len(is_memorized)),
        "pct_memorized_shared": metrics.percent(is_memorized[:n_shared].sum(), n_shared),
        "pct_copies": metrics.percent(synthetic_to_train.exceeds(tau).sum(), len(synthetic_to_train)),
        "pct_val_above_tau": metrics.percent(val_to_train.exceeds(tau).sum(), len(val_to_train)),
        "synthetic_top1_median": float(np.median(synthetic_to_train.best)),
    }


def run_factors(factors: Factors, plan: Plan, data: Data, detector: torch.nn.Module, val_embeddings: np.ndarray,
                report: Callable[[dict[str, Any]], None]) -> None:
    """Train one LDM and report a row (factors, steps, figures, wall_s since the run began) at every audited step."""
    started = time.perf_counter()
    images = data.train_images[:factors.train_size]
    training = LDMTraining(factors, images, plan, plan.seed)
    train_embeddings = embed(detector, images)
    for _ in range(plan.autoencoder_steps):
        training.autoencoder_step()
    training.set_latent_scale()
    fixed_images = {"train": images[:plan.diffusion_batch], "val": data.val_images[:plan.diffusion_batch]}
    audit_steps = plan.audit_steps()
    for step in range(1, audit_steps[-1] + 1):
        training.diffusion_step()
        if step not in audit_steps:
            continue
        synthetic = training.sample(plan.n_synthetic(factors.train_size))
        row = {**dataclasses.asdict(factors), "run": factors.name, "diffusion_steps": step,
               "n_train": len(images), "n_synthetic": len(synthetic), "n_shared": min(plan.sizes)}
        row |= memorization_figures(train_embeddings, val_embeddings, embed(detector, synthetic), min(plan.sizes))
        row |= {f"diffusion_loss_{split}": core.fixed_diffusion_loss(training.model, training.scheduler, fixed,
                                                                     plan.seed, training.bf16)
                for split, fixed in fixed_images.items()}
        row["wall_s"] = time.perf_counter() - started
        report(row)


def direction(values: list[float]) -> str:
    """"up", "down" or "flat" when every step moves that way (or stays), else "mixed"."""
    steps = np.diff(values)
    if not steps.any():
        return "flat"
    if (steps <= 0).all():
        return "down"
    return "up" if (steps >= 0).all() else "mixed"


def direction_summary(rows: list[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """Per factor and metric, every comparison the rows allow: the levels of one factor with the others fixed (for
    the data, augmentation and model factors at each audited step, so a ceiling or floor at one training length
    does not hide the others), the metric's values in level order, the direction they move in and the paper's."""
    level_rank = {"train_size": list(plan.sizes).index, "augment": [False, True].index,
                  "preset": list(plan.presets).index, "diffusion_steps": int}
    comparisons = []
    for factor, rank in level_rank.items():
        fixed_keys = tuple(key for key in level_rank if key != factor)
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for row in rows:
            if "error" not in row:
                groups.setdefault(tuple(row[key] for key in fixed_keys), []).append(row)
        for fixed, group in groups.items():
            if len(group) < 2:
                continue
            group.sort(key=lambda row: rank(row[factor]))
            for metric in DIRECTION_METRICS:
                values = [row[metric] for row in group]
                moved = direction(values)
                comparisons.append({"factor": factor, "metric": metric, "fixed": dict(zip(fixed_keys, fixed)),
                                    "levels": [row[factor] for row in group], "values": values, "direction": moved,
                                    "paper_direction": PAPER_DIRECTIONS[factor],
                                    "agrees": moved == PAPER_DIRECTIONS[factor]})
    return comparisons


# (column title, row key, format; "b": on/off)
COLUMNS = [("run", "run", "s"), ("n train", "train_size", "d"), ("aug", "augment", "b"), ("preset", "preset", "s"),
           ("diffusion steps", "diffusion_steps", "d"), ("tau", "tau", ".4f"),
           ("% memorized", "pct_memorized_train", ".1f"), ("% memorized (shared)", "pct_memorized_shared", ".1f"),
           ("% copies", "pct_copies", ".1f"), ("% val above tau", "pct_val_above_tau", ".1f"),
           ("synthetic top-1 median", "synthetic_top1_median", ".4f"),
           ("val diffusion loss", "diffusion_loss_val", ".4f"), ("wall s", "wall_s", ".1f")]


def table_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"| {row['run']} | failed: {row['error'][:160]} |" + " |" * (len(COLUMNS) - 2)
    cells = [("on" if row[key] else "off") if fmt == "b" else format(row[key], fmt) for _, key, fmt in COLUMNS]
    return "| " + " | ".join(cells) + " |"


def summary_lines(comparisons: list[dict[str, Any]]) -> list[str]:
    """One line per factor and metric: how many comparisons moved which way, against the paper, and their values."""
    lines = ["", "Direction per factor, computed from the rows above (paper: more data and augmentation lower "
             "memorization, longer training and larger models raise it):", ""]
    by_factor_metric: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for comparison in comparisons:
        by_factor_metric.setdefault((comparison["factor"], comparison["metric"]), []).append(comparison)
    for (factor, metric), group in by_factor_metric.items():
        moved = collections.Counter(comparison["direction"] for comparison in group)
        values = " | ".join(" -> ".join(f"{value:.1f}" for value in comparison["values"]) for comparison in group)
        lines.append(f"- {factor} ({' -> '.join(map(str, group[0]['levels']))}), {metric}: "
                     + ", ".join(f"{name} {count}" for name, count in moved.most_common())
                     + f" of {len(group)}; paper: {group[0]['paper_direction']}, agrees in "
                     f"{sum(comparison['agrees'] for comparison in group)} of {len(group)}: {values}")
    return lines


def log(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few steps: checks every code path")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="seconds main may take; diffusion steps are scaled down to fit (default 270)")
    parser.add_argument("--out", help="also write the results as JSON to this path")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --device cpu (with --quick for a dry run)")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if args.quick:
        # The dry run's tensors are tiny: on the loaded 2-core dev box two intra-op threads waiting on each other
        # made it 100x slower than one (400 s against 4 s).
        torch.set_num_threads(1)
    plan = QUICK if args.quick else FULL
    result: dict[str, Any] = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "monai": monai.__version__, "numpy": np.__version__,
        "quick": args.quick, "budget_s": args.budget_s, "phases_s": {}, "rows": [],
    }

    def write_json() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    def phase_done(name: str, since: float) -> None:
        result["phases_s"][name] = time.perf_counter() - since
        log(started, f"{name}: {result['phases_s'][name]:.1f} s")

    since = time.perf_counter()
    data = phantom_data(plan, device)
    phase_done("data", since)

    since = time.perf_counter()
    detector = train_detector(plan, data, device)
    result["detector"] = {"preset": DETECTOR_PRESET, "steps": plan.detector_steps,
                          **accuracy_with_baselines(detector, data.val_images, data.val_patients.tolist(),
                                                    seed=plan.seed)}
    val_embeddings = embed(detector, data.val_images)
    phase_done("detector", since)

    since = time.perf_counter()
    costs, cost_errors = {}, {}
    for preset in plan.presets:
        try:
            costs[preset] = measure_step_costs(preset, plan, data, args.quick)
        except Exception as error:  # a preset that cannot run here (e.g. out of memory) loses only its own runs
            cost_errors[preset] = f"{type(error).__name__}: {error}"
    scale = step_scale(plan, costs, args.budget_s - (time.perf_counter() - started))
    planned = plan.scaled(scale)
    result |= {"step_costs": {preset: dataclasses.asdict(cost) for preset, cost in costs.items()},
               "step_scale": scale, "plan": dataclasses.asdict(planned), "audit_steps": planned.audit_steps()}
    phase_done("step costs", since)
    log(started, f"diffusion steps scaled by {scale:.3f}: {planned.autoencoder_steps} autoencoder, "
                 f"{planned.diffusion_steps} diffusion steps per run, audits at {planned.audit_steps()}")
    write_json()

    print(f"Memorization factor study on {result['card']}, torch {torch.__version__}, monai {monai.__version__}, "
          f"bf16 autocast: {device.type == 'cuda'}; detector {DETECTOR_PRESET} "
          f"(copy_strong AUC {result['detector']['detector/copy_strong_auc']:.3f}, "
          f"re-identification AUC {result['detector'].get('detector/reid_auc', float('nan')):.3f})\n")
    print("| " + " | ".join(title for title, _, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS), flush=True)

    def report(row: dict[str, Any]) -> None:
        result["rows"].append(row)
        print(table_row(row), flush=True)
        write_json()

    for factors in planned.runs():
        since = time.perf_counter()
        try:
            if factors.preset in cost_errors:
                raise RuntimeError(f"the step-cost measurement failed: {cost_errors[factors.preset]}")
            run_factors(factors, planned, data, detector, val_embeddings, report)
        except Exception as error:  # one failing run (out of memory, divergence) must not stop the others
            report({**dataclasses.asdict(factors), "run": factors.name, "error": f"{type(error).__name__}: {error}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        phase_done(factors.name, since)

    result["directions"] = direction_summary(result["rows"], planned)
    result["seconds"] = time.perf_counter() - started
    print("\n".join(summary_lines(result["directions"])))
    print(f"\nwhole script {result['seconds']:.0f} s; phases: "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result["phases_s"].items()))
    write_json()


if __name__ == "__main__":
    main()
