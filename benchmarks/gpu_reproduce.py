"""The paper's factor study in one GPU call (issues 8 and 14): memorization against training-set size, augmentation,
model size and training length, on phantom chest X-rays, over several seeds, with plain PyTorch loops over raymem's
compute core and 95 % intervals on every figure.

Needs python3, torch (CUDA), numpy, scipy (the phantom generator's pose warp, raymem.data.transforms and
raymem.audit.metrics import it) and monai: no Ray, pyarrow, pydantic, MLflow or network. bf16 autocast on CUDA.

1. Data: phantom patients (raymem.data.phantoms, xray2d) mapped to [0, 1] as ingest maps X-rays, split by patient:
   the first patients train, the next are the validation set (the threshold's null), the last the test set (the
   false-positive rate at that threshold, on patients that neither trained nor calibrated anything).
2. Detector: the ``tiny`` copy detector, trained once on the whole training split (patient-aware NT-Xent, the strong
   augmentation, cosine learning rate: the demo's short-run settings), scored on the validation set. Every run shares
   it, the validation and the test set: the calibration is fixed across the study, so differences between runs come
   from the factor.
3. Factors, one at a time around a centre run (the paper studies each factor on its own): training-set size (nested
   subsets: the first n of one seeded order, so every run trains on the smallest subset too), augmentation off/on,
   model size (LDM preset). Each combination runs once per seed: the seed sets the LDM's initial weights, its data
   order, its diffusion noise and its sampling noise, and nothing else (the subsets and the calibration are shared).
   Every LDM is trained from scratch with raymem.models.ldm as raymem/train/ldm.py's loop uses it: autoencoder
   steps, latent scale from the moments of the training latents, diffusion steps on freshly encoded batches.
   Training length: each run is audited at several diffusion step counts, without retraining. The augmentation is
   the paper's (flip p=0.5, rotation within +-5 degrees p=0.5) drawn on the device by raymem.models.copy_transforms.
4. Audit at each checkpoint: as many DDIM samples as training images (the paper's rule; at least ``min_synthetic``),
   embedded with the detector like the training subset and the held-out sets; the paper's calibration with
   raymem.search.kernel and raymem.audit.metrics (tau = P95 of each training image's best validation correlation;
   memorized training images and copies strictly above tau), over the run's training subset and over the subset
   every run trained on; and the share of test images above tau (what a generator of only new images would score as
   copies). Each share carries its 95 % Wilson interval.
5. Across seeds: each figure's mean with its 95 % Student-t interval, and per factor the paired effect (last level
   minus first, seed by seed) with its interval and the verdict it allows (raymem.audit.statistics.verdict: "shown",
   "same direction, not significant" or "not shown") next to the paper's direction.

Runs go to ``--workers`` processes on the one device at once (spawned; these small networks leave a GPU waiting on
kernel launches, so several trainings share it better than one). Every run takes the same number of steps, so the
factors stay comparable. ``--budget-s`` bounds the script from the start of main (imports come before it): the step
costs of each preset are measured with every worker busy at once, and the diffusion steps of every run are scaled
down together when the plan would not fit (autoencoder steps and audits are kept); seeds are dropped, down to
``min_seeds``, before the steps fall below ``min_diffusion_steps``. A run that fails is reported and the others go
on. Rows are printed and the JSON (``--out``) rewritten as each run ends, so a run cut short keeps what it finished.

    python benchmarks/gpu_reproduce.py --out results.json                 # --budget-s 270 by default
    bash benchmarks/gpu_device_run.sh gpu_reproduce:330                   # the same on the bare GPU machine
    python benchmarks/gpu_reproduce.py --quick --device cpu --out q.json  # every code path, ~20 s on the dev box
    python benchmarks/gpu_reproduce.py --rehearse --device cpu            # the full plan's shapes, a few steps each
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import importlib.util
import json
import math
import multiprocessing
import os
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

from raymem.audit import metrics, statistics  # noqa: E402
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
SAMPLE_SEED_STRIDE = 1_000_000  # run seed s samples with noise seeds s * stride + 0, 1, ...
PAPER_DIRECTIONS = {"train_size": "down", "augment": "down", "preset": "up", "diffusion_steps": "up"}
DIRECTION_METRICS = ("pct_memorized_train", "pct_memorized_shared", "pct_copies")
SHARES = {"pct_memorized_train": "n_train", "pct_memorized_shared": "n_shared", "pct_copies": "n_synthetic",
          "pct_test_above_tau": "n_test"}  # each share and its denominator


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
    test_patients: int
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
    seeds: tuple[int, ...]
    min_seeds: int
    min_diffusion_steps: int
    data_seed: int = 0  # phantoms, the split, the subset order and the detector: shared by every run

    def runs(self) -> list[Factors]:
        """The centre first, then each factor's other levels with the rest at the centre."""
        others = ([dataclasses.replace(self.centre, train_size=size) for size in self.sizes]
                  + [dataclasses.replace(self.centre, augment=augment) for augment in (False, True)]
                  + [dataclasses.replace(self.centre, preset=preset) for preset in self.presets])
        return [self.centre] + [run for run in dict.fromkeys(others) if run != self.centre]

    def jobs(self) -> list[tuple[Factors, int]]:
        """Every run once per seed."""
        return [(run, seed) for seed in self.seeds for run in self.runs()]

    def audit_steps(self) -> list[int]:
        return sorted({max(1, round(fraction * self.diffusion_steps)) for fraction in self.audit_fractions})

    def scaled(self, scale: float) -> Plan:
        """The plan with its diffusion steps times ``scale``, rounded up, and at least enough that each audit fraction
        (multiples of the smallest) has a step of its own."""
        return dataclasses.replace(self, diffusion_steps=max(math.ceil(1 / min(self.audit_fractions)),
                                                             math.ceil(scale * self.diffusion_steps)))

    def n_synthetic(self, train_size: int) -> int:
        return max(train_size, self.min_synthetic)

    @property
    def n_shared(self) -> int:
        return min(self.sizes + (self.centre.train_size,))


# 64x64 phantom X-rays: 256 training patients (512 images, the largest subset), 50 validation and 50 test patients
# (100 images each). The centre trains on the smallest subset, so the augmentation and model-size comparisons are
# made where there is memorization to change. Diffusion batches of 256: on a GPU these networks' steps are bound by
# kernel launches (docs/benchmarks.md: the tiny UNet took 35 ms a step at batch 64 on the H200), so a larger batch
# costs little, and several runs share the card at once.
FULL = Plan(image_size=64, patients=356, val_patients=50, test_patients=50, images_per_patient=2, detector_steps=800,
            detector_batch=64, sizes=(32, 128, 512), presets=("tiny", "small"), centre=Factors(32, False, "tiny"),
            autoencoder_steps=300, autoencoder_batch=64, diffusion_steps=3000, diffusion_batch=256,
            audit_fractions=(0.125, 0.25, 0.5, 1.0), ddim_steps=50, min_synthetic=64, seeds=(0, 1, 2), min_seeds=2,
            min_diffusion_steps=1200)
QUICK = Plan(image_size=16, patients=32, val_patients=8, test_patients=8, images_per_patient=2, detector_steps=3,
             detector_batch=16, sizes=(8, 16, 32), presets=("tiny", "small"), centre=Factors(16, False, "tiny"),
             autoencoder_steps=2, autoencoder_batch=8, diffusion_steps=2, diffusion_batch=8,
             audit_fractions=(0.5, 1.0), ddim_steps=2, min_synthetic=8, seeds=(0, 1), min_seeds=2,
             min_diffusion_steps=1)


@dataclasses.dataclass(frozen=True)
class Data:
    """The phantom X-rays, intensities in [0, 1], on the CPU until a worker moves them to its device.

    train_images (N_train, 1, S, S) in subset order (the subset of size n is the first n rows), train_patients
    (N_train,) int64 patient indices; val_images / test_images (N, 1, S, S) with their patients as numpy."""

    train_images: torch.Tensor
    train_patients: torch.Tensor
    val_images: torch.Tensor
    val_patients: np.ndarray
    test_images: torch.Tensor
    test_patients: np.ndarray

    def to(self, device: torch.device) -> Data:
        return dataclasses.replace(self, train_images=self.train_images.to(device),
                                   train_patients=self.train_patients.to(device),
                                   val_images=self.val_images.to(device), test_images=self.test_images.to(device))


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """Seconds per autoencoder step, per diffusion step (encoding and augmentation included) and per audit."""

    autoencoder_step_s: float
    diffusion_step_s: float
    audit_s: float


@dataclasses.dataclass(frozen=True)
class Shared:
    """What every worker needs: the plan, the data, the detector's weights and the held-out embeddings."""

    plan: Plan
    data: Data
    detector_state: dict[str, torch.Tensor]
    val_embeddings: np.ndarray
    test_embeddings: np.ndarray
    device: str
    quick: bool


def phantom_data(plan: Plan) -> Data:
    """The plan's phantom chest X-rays, normalised as ingest normalises X-rays, split by patient (train, val, test)."""
    images, patients = [], []
    for image in phantoms.generate("xray2d", patients=plan.patients, images_per_patient=plan.images_per_patient,
                                   size=plan.image_size, seed=plan.data_seed):
        images.append(normalise_intensity(image.array, image.modality)[None])
        patients.append(image.patient_index)
    images, patients = torch.from_numpy(np.stack(images)), np.array(patients)
    first_val = plan.patients - plan.val_patients - plan.test_patients
    first_test = plan.patients - plan.test_patients
    is_train, is_test = patients < first_val, patients >= first_test
    is_val = ~is_train & ~is_test
    # a seeded order of the training images: the nested subsets are its prefixes (raymem.train.ldm.nested_subset)
    order = np.random.default_rng(plan.data_seed).permutation(int(is_train.sum()))
    return Data(train_images=images[is_train][order], train_patients=torch.from_numpy(patients[is_train][order]),
                val_images=images[is_val], val_patients=patients[is_val],
                test_images=images[is_test], test_patients=patients[is_test])


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
    torch.manual_seed(plan.data_seed)
    model = build_detector(DETECTOR_PRESET, spatial_dims=2).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=DETECTOR_LR[0])
    generator = torch.Generator(device=device).manual_seed(plan.data_seed)
    augment = functools.partial(random_transform, bounds=TRANSFORM_PRESETS[DETECTOR_AUGMENTATION], generator=generator)
    batches = index_batches(len(data.train_images), plan.detector_batch, plan.data_seed)
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
    """One LDM of the study, trained in steps as raymem/train/ldm.py's loop trains it, on ``images`` (n, 1, S, S).
    ``seed`` sets its initial weights, data order, diffusion noise, augmentation draws and sampling noise."""

    def __init__(self, factors: Factors, images: torch.Tensor, plan: Plan, seed: int) -> None:
        self.images, self.plan, self.seed = images, plan, seed
        self.device = images.device
        self.bf16 = self.device.type == "cuda"
        torch.manual_seed(seed)  # the same initial weights for every run of a preset and seed
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
        """n_synthetic DDIM samples (n_synthetic, 1, S, S) in [0, 1], noise seeds seed * stride + 0, 1, ..."""
        first = self.seed * SAMPLE_SEED_STRIDE
        return core.sample_images(self.model, self.images.shape[2:], range(first, first + n_synthetic),
                                  ddim_steps=self.plan.ddim_steps, autocast_bf16=self.bf16)


def measure_step_costs(preset: str, plan: Plan, data: Data, quick: bool) -> StepCosts:
    """Step and audit costs of a preset on this device, on a throwaway LDM with augmentation on (the dearer case);
    the audit is timed by sampling the largest synthetic set once."""
    device = data.train_images.device
    training = LDMTraining(Factors(len(data.train_images), True, preset), data.train_images, plan, plan.data_seed)
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


def job_seconds(run: Factors, plan: Plan, costs: dict[str, StepCosts]) -> tuple[float, float]:
    """(kept, diffusion) predicted seconds of one run: autoencoder steps and audits, and its diffusion steps."""
    cost = costs[run.preset]
    return (plan.autoencoder_steps * cost.autoencoder_step_s + len(plan.audit_steps()) * cost.audit_s,
            plan.diffusion_steps * cost.diffusion_step_s)


def step_scale(plan: Plan, costs: dict[str, StepCosts], seconds_left: float, workers: int = 1) -> float:
    """The share of the plan's diffusion steps (at most 1, at least MIN_STEP_SCALE) whose predicted time fits
    SAFETY * seconds_left, with every run's autoencoder steps and audits kept. The runs are spread over ``workers``
    processes longest first, whose finish is at most total / workers + (1 - 1 / workers) * longest; costs are per
    step while every worker runs. The autoencoder steps are kept: copies are only recognisable through a decoder that
    reconstructs well. Runs of presets without costs are not counted."""
    jobs = [job_seconds(run, plan, costs) for run, _ in plan.jobs() if run.preset in costs]
    if not jobs:
        return 1.0
    workers = max(1, min(workers, len(jobs)))
    tail = 1 - 1 / workers
    longest = max(jobs, key=sum)
    kept = sum(job[0] for job in jobs) / workers + tail * longest[0]
    diffusion = sum(job[1] for job in jobs) / workers + tail * longest[1]
    if diffusion == 0:
        return 1.0
    return min(1.0, max(MIN_STEP_SCALE, (SAFETY * seconds_left - kept) / diffusion))


def fit_plan(plan: Plan, costs: dict[str, StepCosts], seconds_left: float, workers: int) -> tuple[Plan, float]:
    """The plan that fits: its diffusion steps scaled down, and seeds dropped (down to min_seeds) while the steps
    would otherwise fall below min_diffusion_steps. Returns the plan and the scale applied."""
    seeds = plan.seeds
    while True:
        trial = dataclasses.replace(plan, seeds=seeds)
        scale = step_scale(trial, costs, seconds_left, workers)
        if scale * plan.diffusion_steps >= plan.min_diffusion_steps or len(seeds) <= plan.min_seeds:
            return trial.scaled(scale), scale
        seeds = seeds[:-1]


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


def memorization_figures(train: np.ndarray, val: np.ndarray, test: np.ndarray, synthetic: np.ndarray,
                         n_shared: int) -> dict[str, float]:
    """The paper's calibration on embeddings train (n, d), val (m, d), test (t, d), synthetic (s, d).

    tau: PERCENTILE of each training image's best validation correlation. pct_memorized_train: training images with
    a synthetic sample strictly above tau; pct_memorized_shared: the same over the first n_shared training images
    (those every run trained on); pct_copies: synthetic samples whose best training match is above tau;
    pct_test_above_tau: test images (patients outside training and calibration) whose best training match is above
    tau, the rate at which this tau calls new images copies. Each share gets its 95 % Wilson interval ``<key>_ci``.
    """
    invalid = kernel.find_invalid_rows(torch.from_numpy(synthetic))
    if bool(invalid.any()):
        raise ValueError(f"{int(invalid.sum())} synthetic samples have constant or non-finite embeddings: the LDM's "
                         "training diverged; lower LR_DIFFUSION")
    train_t, val_t, test_t, synthetic_t = (torch.from_numpy(np.ascontiguousarray(x))
                                           for x in (train, val, test, synthetic))
    train_to_val, _ = nearest_both_ways(train_t, val_t)
    tau = metrics.percentile_threshold(train_to_val, PERCENTILE)
    test_to_train, _ = nearest_both_ways(test_t, train_t)
    synthetic_to_train, train_to_synthetic = nearest_both_ways(synthetic_t, train_t)
    is_memorized = train_to_synthetic.exceeds(tau)
    counts = {"pct_memorized_train": (int(is_memorized.sum()), len(is_memorized)),
              "pct_memorized_shared": (int(is_memorized[:n_shared].sum()), n_shared),
              "pct_copies": (int(synthetic_to_train.exceeds(tau).sum()), len(synthetic_to_train)),
              "pct_test_above_tau": (int(test_to_train.exceeds(tau).sum()), len(test_to_train))}
    figures: dict[str, Any] = {"tau": tau, "synthetic_top1_median": float(np.median(synthetic_to_train.best))}
    for key, (flagged, total) in counts.items():
        figures[key] = metrics.percent(flagged, total)
        figures[f"{key}_ci"] = [100 * bound for bound in statistics.wilson_interval(flagged, total)]
    return figures


# --- worker processes -------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _worker_start(shared: Shared, barrier) -> None:
    """Each worker's own copy of the data on the device and of the detector; the barrier lines the workers up so
    that step costs are measured with all of them busy."""
    device = torch.device(shared.device)
    torch.set_num_threads(1 if shared.quick or device.type == "cuda" else 2)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    detector = build_detector(DETECTOR_PRESET, spatial_dims=2)
    detector.load_state_dict(shared.detector_state)
    _WORKER.update(shared=shared, data=shared.data.to(device), detector=detector.to(device).eval(), barrier=barrier)


def _worker_costs(presets: tuple[str, ...]) -> dict[str, Any]:
    """Step costs of each preset measured here while every other worker measures the same one."""
    shared, costs, errors = _WORKER["shared"], {}, {}
    for preset in presets:
        _WORKER["barrier"].wait()
        try:
            costs[preset] = measure_step_costs(preset, shared.plan, _WORKER["data"], shared.quick)
        except Exception as error:  # a preset that cannot run here (e.g. out of memory) loses only its own runs
            errors[preset] = f"{type(error).__name__}: {error}"
        if _WORKER["data"].train_images.is_cuda:
            torch.cuda.empty_cache()
    return {"costs": costs, "errors": errors}


def _worker_run(factors: Factors, seed: int, plan: Plan) -> list[dict[str, Any]]:
    """Train one LDM and return a row (factors, seed, steps, figures, wall_s since the run began) per audited step;
    a run that fails returns one row with its error."""
    started = time.perf_counter()
    data, detector, shared = _WORKER["data"], _WORKER["detector"], _WORKER["shared"]
    rows: list[dict[str, Any]] = []
    base = {**dataclasses.asdict(factors), "run": factors.name, "seed": seed}
    try:
        images = data.train_images[:factors.train_size]
        training = LDMTraining(factors, images, plan, seed)
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
            row = {**base, "diffusion_steps": step, "n_train": len(images), "n_synthetic": len(synthetic),
                   "n_shared": plan.n_shared, "n_test": len(shared.test_embeddings)}
            row |= memorization_figures(train_embeddings, shared.val_embeddings, shared.test_embeddings,
                                        embed(detector, synthetic), plan.n_shared)
            row |= {f"diffusion_loss_{split}": core.fixed_diffusion_loss(training.model, training.scheduler, fixed,
                                                                         plan.data_seed, training.bf16)
                    for split, fixed in fixed_images.items()}
            row["wall_s"] = time.perf_counter() - started
            rows.append(row)
    except Exception as error:  # one failing run (out of memory, divergence) must not stop the others
        rows.append({**base, "error": f"{type(error).__name__}: {error}"})
    if data.train_images.is_cuda:
        torch.cuda.empty_cache()
    return rows


# --- across seeds -----------------------------------------------------------------------------------------------

LEVEL_ORDER = {"train_size": "sizes", "augment": None, "preset": "presets"}


def seed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run and audited step: each share's mean over seeds with its 95 % Student-t interval."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault((row["run"], row["diffusion_steps"]), []).append(row)
    summary = []
    for (run, steps), group in groups.items():
        entry = {key: group[0][key] for key in ("run", "train_size", "augment", "preset")}
        entry |= {"diffusion_steps": steps, "seeds": sorted(row["seed"] for row in group)}
        for key in (*SHARES, "tau"):
            entry[key] = statistics.seed_interval([row[key] for row in group]).as_dict()
        summary.append(entry)
    return summary


def _levels(plan: Plan, factor: str) -> list[Any]:
    if factor == "augment":
        return [False, True]
    if factor == "diffusion_steps":
        return plan.audit_steps()
    return list(getattr(plan, LEVEL_ORDER[factor]))


def verdicts(rows: list[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """Per factor and metric, the paired effect over seeds of going from the factor's first level to its last (the
    other factors at the centre; data, augmentation and model size at every audited step, training length for every
    run), its 95 % interval and the verdict it allows against the paper's direction."""
    by_key = {(row["train_size"], row["augment"], row["preset"], row["diffusion_steps"], row["seed"]): row
              for row in rows if "error" not in row}
    centre, steps, seeds = plan.centre, plan.audit_steps(), plan.seeds
    comparisons = []

    def compare(factor: str, fixed: dict[str, Any], first: Callable, last: Callable, levels: list[Any]) -> None:
        for metric in DIRECTION_METRICS:
            values = [(first(seed), last(seed)) for seed in seeds]
            pairs = [(a[metric] if a else math.nan, b[metric] if b else math.nan) for a, b in values]
            effect = statistics.factor_effect([a for a, _ in pairs], [b for _, b in pairs])
            comparisons.append({"factor": factor, "metric": metric, "fixed": fixed, "levels": [levels[0], levels[-1]],
                                "per_seed": [[a, b] for a, b in pairs], "effect": effect.as_dict(),
                                "paper_direction": PAPER_DIRECTIONS[factor],
                                "verdict": statistics.verdict(effect, PAPER_DIRECTIONS[factor])})

    for factor in ("train_size", "augment", "preset"):
        levels = _levels(plan, factor)
        if len(levels) < 2:
            continue
        for step in steps:
            def at(level, seed, step=step, factor=factor):
                run = dataclasses.replace(centre, **{factor: level})
                return by_key.get((run.train_size, run.augment, run.preset, step, seed))
            compare(factor, {"diffusion_steps": step}, functools.partial(at, levels[0]),
                    functools.partial(at, levels[-1]), levels)
    for run in plan.runs():
        def at_step(step, seed, run=run):
            return by_key.get((run.train_size, run.augment, run.preset, step, seed))
        compare("diffusion_steps", {"run": run.name}, functools.partial(at_step, steps[0]),
                functools.partial(at_step, steps[-1]), steps)
    return comparisons


# (column title, row key, format; "b": on/off, "%": a share with its interval)
COLUMNS = [("run", "run", "s"), ("seed", "seed", "d"), ("diffusion steps", "diffusion_steps", "d"),
           ("tau", "tau", ".4f"), ("% memorized [95 % CI]", "pct_memorized_train", "%"),
           ("% memorized (shared)", "pct_memorized_shared", "%"), ("% copies", "pct_copies", "%"),
           ("% test above tau", "pct_test_above_tau", "%"), ("synthetic top-1 median", "synthetic_top1_median", ".4f"),
           ("val diffusion loss", "diffusion_loss_val", ".4f"), ("wall s", "wall_s", ".1f")]


def _share_cell(row: dict[str, Any], key: str) -> str:
    lo, hi = row[f"{key}_ci"]
    return f"{row[key]:.1f} [{lo:.1f}, {hi:.1f}]"


def table_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"| {row['run']} | {row['seed']} | failed: {row['error'][:160]} |" + " |" * (len(COLUMNS) - 3)
    cells = [_share_cell(row, key) if fmt == "%" else format(row[key], fmt) for _, key, fmt in COLUMNS]
    return "| " + " | ".join(cells) + " |"


def _interval(figure: dict[str, float], sign: str = "+") -> str:
    """mean [lo, hi] of a seed_interval dict, one decimal; ``sign`` "+" for effects, "" for levels."""
    if figure["n_seeds"] < 2:
        return f"{figure['mean']:{sign}.1f} (1 seed, no interval)"
    return f"{figure['mean']:{sign}.1f} [{figure['lo']:{sign}.1f}, {figure['hi']:{sign}.1f}]"


def summary_lines(summary: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> list[str]:
    """The across-seed table, then one line per factor comparison: effect, interval, verdict, the paper's direction."""
    lines = ["", "Across seeds (mean [95 % Student-t interval]):", "",
             "| run | diffusion steps | seeds | % memorized | % copies | % test above tau | tau |", "|---|---|---|---|---|---|---|"]
    for entry in summary:
        cells = [_interval(entry[key], sign="") for key in ("pct_memorized_train", "pct_copies",
                                                               "pct_test_above_tau")]
        lines.append(f"| {entry['run']} | {entry['diffusion_steps']} | {len(entry['seeds'])} | " + " | ".join(cells)
                     + f" | {entry['tau']['mean']:.4f} |")
    lines += ["", "Effect of each factor, last level minus first, paired by seed (percentage points, 95 % interval); "
              "paper: more data and augmentation lower memorization, longer training and larger models raise it:", ""]
    for comparison in comparisons:
        fixed = ", ".join(f"{key} {value}" for key, value in comparison["fixed"].items())
        lines.append(f"- {comparison['factor']} {comparison['levels'][0]} -> {comparison['levels'][1]} ({fixed}), "
                     f"{comparison['metric']}: {_interval(comparison['effect'])}; paper: "
                     f"{comparison['paper_direction']}; **{comparison['verdict']}**")
    return lines


def log(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few steps: checks every code path")
    parser.add_argument("--rehearse", action="store_true",
                        help="the full plan's images, sizes, presets and seeds with a few steps of each: checks the "
                             "full-size shapes before GPU time is spent on them")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="seconds main may take; diffusion steps are scaled down to fit (default 270)")
    parser.add_argument("--workers", type=int, default=None,
                        help="runs at once on the device (default: 6 on CUDA, capped by CPUs and runs; 2 for --quick)")
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
    if args.rehearse:
        plan = dataclasses.replace(FULL, detector_steps=2, detector_batch=8, autoencoder_steps=2, autoencoder_batch=8,
                                   diffusion_steps=8, diffusion_batch=8, ddim_steps=2, min_diffusion_steps=1)
    workers = args.workers or (2 if args.quick or device.type != "cuda" else 6)
    workers = max(1, min(workers, len(plan.jobs()), os.cpu_count() or 1))
    result: dict[str, Any] = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "monai": monai.__version__, "numpy": np.__version__,
        "quick": args.quick, "budget_s": args.budget_s, "workers": workers, "phases_s": {}, "rows": [],
    }

    def write_json() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    def phase_done(name: str, since: float) -> None:
        result["phases_s"][name] = time.perf_counter() - since
        log(started, f"{name}: {result['phases_s'][name]:.1f} s")

    since = time.perf_counter()
    data = phantom_data(plan)
    phase_done("data", since)

    since = time.perf_counter()
    on_device = data.to(device)
    detector = train_detector(plan, on_device, device)
    result["detector"] = {"preset": DETECTOR_PRESET, "steps": plan.detector_steps,
                          **accuracy_with_baselines(detector, on_device.val_images, data.val_patients.tolist(),
                                                    seed=plan.data_seed)}
    shared = Shared(plan=plan, data=data, detector_state={k: v.cpu() for k, v in detector.state_dict().items()},
                    val_embeddings=embed(detector, on_device.val_images),
                    test_embeddings=embed(detector, on_device.test_images), device=str(device), quick=args.quick)
    del on_device, detector
    phase_done("detector", since)

    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    barrier = context.Barrier(workers)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start,
                                                initargs=(shared, barrier)) as pool:
        since = time.perf_counter()
        measured = [future.result() for future in [pool.submit(_worker_costs, plan.presets) for _ in range(workers)]]
        costs = {preset: StepCosts(*(float(np.mean([getattr(m["costs"][preset], field.name) for m in measured]))
                                     for field in dataclasses.fields(StepCosts)))
                 for preset in plan.presets if all(preset in m["costs"] for m in measured)}
        cost_errors = {preset: error for m in measured for preset, error in m["errors"].items()}
        planned, scale = fit_plan(plan, costs, args.budget_s - (time.perf_counter() - started), workers)
        result |= {"step_costs": {preset: dataclasses.asdict(cost) for preset, cost in costs.items()},
                   "cost_errors": cost_errors, "step_scale": scale, "plan": dataclasses.asdict(planned),
                   "audit_steps": planned.audit_steps()}
        phase_done("step costs", since)
        log(started, f"{workers} workers; seeds {list(planned.seeds)}; diffusion steps scaled by {scale:.3f}: "
                     f"{planned.autoencoder_steps} autoencoder, {planned.diffusion_steps} diffusion steps per run, "
                     f"audits at {planned.audit_steps()}")
        write_json()

        print(f"Memorization factor study on {result['card']}, torch {torch.__version__}, monai {monai.__version__}, "
              f"bf16 autocast: {device.type == 'cuda'}; {workers} runs at once; seeds {list(planned.seeds)}; "
              f"detector {DETECTOR_PRESET} (copy_strong AUC {result['detector']['detector/copy_strong_auc']:.3f}, "
              f"re-identification AUC {result['detector'].get('detector/reid_auc', float('nan')):.3f}); "
              f"{len(data.train_images)} training, {len(data.val_images)} validation, {len(data.test_images)} test "
              f"images at {plan.image_size}x{plan.image_size}\n")
        print("| " + " | ".join(title for title, _, _ in COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS), flush=True)

        # longest first, so the last runs to finish are short ones
        jobs = sorted(planned.jobs(), key=lambda job: -sum(job_seconds(job[0], planned, costs))
                      if job[0].preset in costs else 0.0)
        futures = {}
        for factors, seed in jobs:
            if factors.preset in cost_errors:
                row = {**dataclasses.asdict(factors), "run": factors.name, "seed": seed,
                       "error": f"the step-cost measurement failed: {cost_errors[factors.preset]}"}
                result["rows"].append(row)
                print(table_row(row), flush=True)
                continue
            futures[pool.submit(_worker_run, factors, seed, planned)] = (factors, seed)
        since = time.perf_counter()
        for future in concurrent.futures.as_completed(futures):
            factors, seed = futures[future]
            try:
                rows = future.result()
            except Exception as error:  # the worker process itself died (e.g. killed out of memory)
                rows = [{**dataclasses.asdict(factors), "run": factors.name, "seed": seed,
                         "error": f"{type(error).__name__}: {error}"}]
            for row in rows:
                result["rows"].append(row)
                print(table_row(row), flush=True)
            log(started, f"{factors.name} seed {seed} done")
            write_json()
        phase_done("runs", since)

    result["rows"].sort(key=lambda row: (row["run"], row["seed"], row.get("diffusion_steps", 0)))
    result["across_seeds"] = seed_summary(result["rows"])
    result["verdicts"] = verdicts(result["rows"], planned)
    result["seconds"] = time.perf_counter() - started
    print("\n".join(summary_lines(result["across_seeds"], result["verdicts"])))
    print(f"\nwhole script {result['seconds']:.0f} s; phases: "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result["phases_s"].items()))
    write_json()


if __name__ == "__main__":
    main()
