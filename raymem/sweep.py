"""Memorization factor sweeps: Ray Tune over training-set size, augmentation, model size and training length.

    study (once; shared by every sweep of the study): data -> copy detector -> train/val embeddings
    sweep: tune.Tuner(trial) over the factor grid times the study's seeds, a parent MLflow run; each trial (a child
    run, its seed a param), the same for every seed but its LDM initialisation, data order and sampling noise:
        train the LDM in segments of ``audit_every`` diffusion epochs (one TorchTrainer per segment, each resuming
        from the last checkpoint, TuneReportCallback forwarding its reports), and after each segment audit that
        checkpoint: sample as many images as the trial trained on -> embed them with the study's detector -> exact
        audit against the trial's own training subset -> memorization over the subset and over the subset every
        trial shares, Frechet distance in the detector's space against the study's fixed held-out reference (beside
        a real sample of the same size against it: the small-sample floor), MS-SSIM diversity, validation loss.
        Optional early stop when % copies passes a budget or rises for P audits in a row.
    after the trials: dashboards from MLflow, logged to the parent run, and the verdicts on the paper's directions
    (raymem.audit.verdicts: each factor's effect over seeds with its 95 % interval) in the summary and as parent
    run metrics.

What every trial of a study shares, so that trials differ only by their factors and seed: the detector, the val
split (the calibration null, so tau differs only through the trial's own training subset), the test split (the
evaluation set; without one the val split's patient halves, drawn with audit.seed), the Frechet reference, and, for
one training-set size, the training subset (ldm.subset_seed, not the trial's seed).

Layout under storage_root: the study's datasets/<study>, detector/<study>/detector.pt and embeddings/<study> (the
job layout of raymem.jobconfig, run_name = study), then sweeps/<study>/tune/<sweep> (Ray Tune's state) and
sweeps/<study>/<sweep>/: study.json (the config it ran with), trials/<trial>/ldm/<trial>/epoch-E (checkpoints),
trials/<trial>/epoch-E/{synthetic, embeddings, audit, figures.json}, trials/<trial>/trial.json (written last),
dashboard/.

Resume: rerun the same command. Finished trials (trial.json written) return their recorded figures without
training; unfinished and failed ones continue from their last checkpoint and skip every sample and audit already
written. MLflow runs are reopened by key, so a rerun never makes a second parent or child run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from raymem import config, storage, tracking
from raymem.audit import metrics
from raymem.config import ConfigError, _Strict
from raymem.jobconfig import STORAGE_ROOT_ENV, AuditSection, DataSection, JobConfig

if TYPE_CHECKING:
    from raymem.audit.quality import FrechetReference

log = logging.getLogger(__name__)

FACTORS = ("train_size", "augment", "preset", "diffusion_epochs")
SEED = "seed"  # the trial's seed: a Tune grid axis beside the factors, and an MLflow param of each child run
TRIAL_DONE = "trial.json"
FIGURES = "figures.json"
_DERIVED_LDM_FIELDS = ("dataset", "out", "run_name", "experiment", "keep_epochs")
SWEEP_KEEP_CHECKPOINTS = 1  # besides the audited epochs: the latest, which a continued trial resumes from
RAY_DATA_CPUS_PER_TRIAL = 1.0  # kept free for a trial's Ray Data tasks: Train workers on every CPU starve them
SCHEDULING_FIELDS = ("max_concurrent_trials", "trial_cpus", "max_trial_failures")  # not in the config hash


class Factors(_Strict):
    """The grid: every combination of these levels is a trial. A factor left out keeps the ldm section's value."""

    train_size: list[int] | None = Field(default=None, description="nested training subsets (images)")
    augment: list[bool] | None = Field(default=None, description="the paper's flip + rotation, on/off")
    preset: list[Literal["tiny", "small", "paper2d", "paper3d-ct", "paper3d-mri"]] | None = Field(
        default=None, description="model size")
    diffusion_epochs: list[int] | None = Field(
        default=None, description="training length; shorter lengths are also audited inside each trial "
                                  "(every audit_every epochs), without retraining")

    @model_validator(mode="after")
    def _levels(self) -> Factors:
        for name in FACTORS:
            levels = getattr(self, name)
            if levels is not None and (not levels or len(set(levels)) != len(levels)):
                raise ValueError(f"{name}: needs distinct levels, got {levels}")
        if self.train_size and min(self.train_size) < 2:
            raise ValueError(f"train_size: every level must be at least 2, got {self.train_size}")
        if self.diffusion_epochs and min(self.diffusion_epochs) < 1:
            raise ValueError(f"diffusion_epochs: every level must be at least 1, got {self.diffusion_epochs}")
        return self

    def swept(self) -> list[str]:
        return [name for name in FACTORS if getattr(self, name) is not None]


class EarlyStop(_Strict):
    """Memorization-informed early stopping (beyond the paper); off unless a rule is set."""

    max_pct_copies: float | None = Field(default=None, ge=0, le=100,
                                         description="stop when % copies exceeds this budget")
    rising_audits: int | None = Field(default=None, ge=1,
                                      description="stop when % copies rose in this many consecutive audits")


class StudyConfig(_Strict):
    """A study file, validated: the shared data and detector, the factor grid, and how each trial is audited."""

    study: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="MLflow experiment, and the study's data/detector")
    sweep: str = Field(default="sweep", pattern=r"^[A-Za-z0-9_.-]+$", description="the parent run; rerun to resume")
    storage_root: str | None = Field(default=None, description=f"URI; when absent, ${STORAGE_ROOT_ENV}")
    tracking_uri: str | None = Field(default=None, description="when absent, $MLFLOW_TRACKING_URI, else sqlite")
    data: DataSection = Field(description="the study's images: phantoms, or raw files to ingest (as in job files)")
    ingest: dict[str, Any] = Field(default_factory=dict, description="IngestConfig values")
    detector: dict[str, Any] = Field(default_factory=dict, description="DetectorTrainConfig values: the copy "
                                                                      "detector trained once per study")
    embed: dict[str, Any] = Field(default_factory=dict, description="EmbedConfig values (batch size, actors, GPU)")
    ldm: dict[str, Any] = Field(default_factory=dict, description="LDMTrainConfig values shared by every trial")
    factors: Factors = Field(description="the grid: a list of levels per factor")
    seeds: list[int] | None = Field(
        default=None,
        description="every factor combination runs once per seed (a Tune grid axis); the seed sets the trial's "
                    "ldm.seed (initial weights, data order, augmentation and noise draws) and sample.seed (sampling "
                    "noise), nothing else: the training subset (ldm.subset_seed), the val/test split, the detector and "
                    "the Frechet reference are the study's. None: one trial per combination, with ldm.seed and "
                    "sample.seed as set (trial keys without a seed)")
    audit_every: int = Field(default=10, ge=1, description="diffusion epochs between audited checkpoints")
    images_per_epoch: int | None = Field(
        default=None, ge=1,
        description="an epoch of every trial sees about this many images (each trial's epoch_repeats = "
                    "images_per_epoch / train_size), so trials of every size take the same optimisation steps per "
                    "epoch; None: an epoch is one pass, as in the paper, and larger subsets train more steps")
    sample: dict[str, Any] = Field(default_factory=dict, description="SampleConfig values; n: samples per audit, at "
                                                                    "least every trial's training-set size (fewer is "
                                                                    "an error); absent: each trial's training images "
                                                                    "(the paper's rule)")
    fd_reference_size: int | None = Field(
        default=None, ge=2,
        description="rows of the fixed reference every trial's Frechet distance is measured against: a subset drawn "
                    "with audit.seed from the study's test embeddings (val without a test split); None: all of them. "
                    "Rows left out serve the real-vs-real baseline")
    audit: AuditSection = Field(default=AuditSection(), description="AuditConfig values, plus distributed")
    early_stop: EarlyStop = Field(default=EarlyStop(), description="memorization-informed early stopping (off)")
    max_concurrent_trials: int | None = Field(
        default=None, ge=1,
        description="trials run at once; None: as many as the cluster's CPUs and GPUs hold when the sweep starts, "
                    "each trial counted at its peak: its driver (trial_cpus), the largest of its stages (LDM Train "
                    "workers, sampling actors, embedding actors) and one CPU for its Ray Data tasks "
                    "(docs/cluster.md)")
    trial_cpus: float = Field(default=1.0, gt=0, description="CPUs held by each trial's driver (audit, sampling); more "
                                                             "than 0 (Ray Tune places no trial that holds nothing), "
                                                             "fractions allowed")
    max_trial_failures: int = Field(default=0, ge=0, description="Tune retries of a crashed trial")

    @model_validator(mode="after")
    def _sections_valid(self) -> StudyConfig:
        clashes = sorted(set(self.ldm) & {*_DERIVED_LDM_FIELDS, *self.factors.swept()})
        if clashes:
            raise ValueError(f"ldm.{clashes[0]}: set by the sweep (a factor or a derived path); remove it from ldm")
        if self.images_per_epoch is not None:
            if "epoch_repeats" in self.ldm:
                raise ValueError("ldm.epoch_repeats: derived from images_per_epoch; set one of the two")
            if None in self.levels()["train_size"]:
                raise ValueError("images_per_epoch: needs a train_size for every trial (factors.train_size levels)")
        if self.audit.plant_copies:
            raise ValueError("audit.plant_copies: not used in sweeps (each trial is audited on its own samples)")
        for clash in sorted(set(self.sample) & {"run", "out", "epoch"}):
            raise ValueError(f"sample.{clash}: set by the sweep for each audited checkpoint; remove it")
        if self.seeds is not None:
            if not self.seeds or len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"seeds: needs distinct seeds, got {self.seeds}")
            for section, values in (("ldm", self.ldm), ("sample", self.sample)):
                if "seed" in values:
                    raise ValueError(f"{section}.seed: set from each trial's seed (the seeds field); remove it")
        sizes = [size for size in self.levels()["train_size"] if size is not None]
        if sizes and self.sample.get("n") is not None:
            self.samples_per_audit(max(sizes))
        self.job()
        for factors in self.trials():
            self.ldm_config(factors, root="/validation")
            config.validate(config.SampleConfig, {"run": "-", "out": "-", "n": 1, **self.sample})
        return self

    def root(self) -> str:
        root = self.storage_root or os.environ.get(STORAGE_ROOT_ENV)
        if not root:
            raise ConfigError(f"storage_root: not set; put it in the study file, or set {STORAGE_ROOT_ENV} (locally: "
                              "export it; for `ray job submit`: in --runtime-env-json's env_vars, or on the nodes)")
        return storage.absolute(root.rstrip("/"))

    def job(self) -> JobConfig:
        """The study's shared stages as a job (run_name = study): data, detector and embeddings."""
        return config.validate(JobConfig, {
            "storage_root": storage.absolute(self.storage_root) if self.storage_root else None,
            "tracking_uri": self.tracking_uri, "experiment": self.study,
            "run_name": self.study, "data": self.data.model_dump(exclude_none=True), "ingest": self.ingest,
            "detector": self.detector, "embed": self.embed, "audit": self.audit.model_dump()})

    def levels(self) -> dict[str, list[Any]]:
        """Every factor's levels (a factor not swept has one: the ldm section's value or the default)."""
        defaults = config.LDMTrainConfig(dataset="-", out="-", **self.ldm)
        fixed = {"train_size": defaults.train_size, "augment": defaults.augment.enabled, "preset": defaults.preset,
                 "diffusion_epochs": defaults.diffusion_epochs}
        return {name: getattr(self.factors, name) or [fixed[name]] for name in FACTORS}

    def param_space(self) -> dict[str, list[Any]]:
        """Tune's grid axes: every factor's levels, and the seeds when the study has them."""
        return {**self.levels(), **({} if self.seeds is None else {SEED: self.seeds})}

    def trials(self) -> list[dict[str, Any]]:
        """Every trial's factor levels (and seed, when the study has seeds): the grid of ``param_space``."""
        grid = [{}]
        for name, levels in self.param_space().items():
            grid = [{**point, name: level} for point in grid for level in levels]
        return grid

    def samples_per_audit(self, n_train: int) -> int:
        """Samples each audit of a trial trained on ``n_train`` images generates: sample.n, else n_train (the
        paper's rule, n_synthetic >= n_train, so memorized shares can reach 100 %); never fewer than n_train."""
        n = self.sample.get("n")
        if n is None:
            return n_train
        if n < n_train:
            raise ConfigError(f"sample.n: {n} samples per audit is fewer than a trial's {n_train} training images; "
                              "each audit samples at least as many images as its trial trained on (the paper's "
                              "rule): raise sample.n, or remove it to sample each trial's training-set size")
        return n

    def seeded(self, factors: dict[str, Any]) -> dict[str, int]:
        """{"seed": the trial's seed} for the ldm and sample sections; empty for a study without seeds."""
        return {} if SEED not in factors else {"seed": factors[SEED]}

    def ldm_config(self, factors: dict[str, Any], root: str) -> config.LDMTrainConfig:
        key = trial_key(factors)
        augment = {**self.ldm.get("augment", {}), "enabled": factors["augment"]}
        repeats = {} if self.images_per_epoch is None else {
            "epoch_repeats": max(1, round(self.images_per_epoch / factors["train_size"]))}
        values = {
            "keep_checkpoints": SWEEP_KEEP_CHECKPOINTS, **self.ldm, **repeats, **self.seeded(factors),
            "train_size": factors["train_size"], "preset": factors["preset"], "augment": augment,
            "diffusion_epochs": factors["diffusion_epochs"], "dataset": storage.join(root, "datasets", self.study),
            "out": trial_uri(root, self.study, self.sweep, key), "run_name": key, "experiment": self.study}
        cfg = config.validate(config.LDMTrainConfig, values)
        # The checkpoints a trial audits are kept (they can be sampled again); the rest go as training moves on.
        return cfg.model_copy(update={"keep_epochs": audit_epochs(cfg.autoencoder_epochs, cfg.diffusion_epochs,
                                                                  self.audit_every)})

    def shared_size(self) -> int | None:
        """The training subset every trial trained on (the smallest nested subset); None when all used all."""
        sizes = self.levels()["train_size"]
        return None if None in sizes else min(sizes)

    def trial_stages(self) -> dict[str, dict[str, float]]:
        """The Ray resources ({"CPU", "GPU"}) each stage of a trial holds; the stages run one after another."""
        ldm = config.LDMTrainConfig(dataset="-", out="-", **self.ldm)
        sample = config.validate(config.SampleConfig, {"run": "-", "out": "-", "n": 1, **self.sample})
        embed = config.validate(config.EmbedConfig, {"detector": "-", "data": "-", "out": "-", **self.embed})

        def actors(count: int, use_gpu: bool) -> dict[str, float]:  # Ray Data's actors: 1 GPU, else 1 CPU, each
            return {"CPU": 0.0 if use_gpu else float(count), "GPU": float(count) if use_gpu else 0.0}

        return {"ldm_workers": {"CPU": ldm.num_workers * ldm.cpus_per_worker,
                                "GPU": float(ldm.num_workers) if ldm.use_gpu else 0.0},
                "sampling_actors": actors(sample.num_actors, sample.use_gpu),
                "embedding_actors": actors(embed.num_actors, embed.use_gpu)}

    def trial_resources(self) -> dict[str, float]:
        """What one trial holds at its peak: its driver, its largest stage, and a CPU kept for its Ray Data tasks
        (reads, the Train ingest; DESIGN.md, stack decisions: Train workers on every CPU starve Ray Data)."""
        stages = self.trial_stages().values()
        return {"CPU": self.trial_cpus + max(stage["CPU"] for stage in stages) + RAY_DATA_CPUS_PER_TRIAL,
                "GPU": max(stage["GPU"] for stage in stages)}

    def digest(self) -> str:
        """The hash a resumed sweep must match: everything that shapes its results, not how it is scheduled (a rerun
        on a larger cluster may run more trials at once, or retry crashed ones more often)."""
        what = self.model_dump(exclude=set(SCHEDULING_FIELDS))
        if self.seeds is None:  # a study without seeds keeps the hash it had before seeds existed, and resumes
            del what["seeds"]
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def load_study(uri: str, *, sweep: str | None = None) -> StudyConfig:
    """Read and validate a study file (local or s3://); ``sweep`` overrides the file's sweep name."""
    return config.load(StudyConfig, uri, {"sweep": sweep})


def trials_at_once(study: StudyConfig, cluster: dict[str, float]) -> tuple[int, str]:
    """How many trials run together on a cluster offering ``cluster`` (ray.cluster_resources()), and why.

    study.max_concurrent_trials when set; else as many trials as the cluster's CPUs (and GPUs, when trials use them)
    hold at each trial's peak (StudyConfig.trial_resources), at least 1 (a larger trial waits for the cluster to
    grow) and at most the grid.
    """
    trials = len(study.trials())
    if study.max_concurrent_trials is not None:
        return study.max_concurrent_trials, "set by max_concurrent_trials"
    need = study.trial_resources()
    fits = [int(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in need.items() if amount > 0]
    stages = ", ".join(f"{name.replace('_', ' ')} {_resources(held)}" for name, held in study.trial_stages().items())
    why = (f"cluster: {_resources(cluster, gpu=True)}; each trial holds {_resources(need, gpu=True)} at its peak: "
           f"driver {study.trial_cpus:g} CPU + its largest stage ({stages}) + {RAY_DATA_CPUS_PER_TRIAL:g} CPU for "
           f"Ray Data; {trials} trials")
    return max(1, min(trials, *fits)), why


def _resources(held: dict[str, float], gpu: bool = False) -> str:
    """``"3 CPU"``, ``"3 CPU 1 GPU"``; with ``gpu``, GPUs also when there are none."""
    cpus, gpus = held.get("CPU", 0.0), held.get("GPU", 0.0)
    return f"{cpus:g} CPU" + (f" {gpus:g} GPU" if gpus or gpu else "")


def trial_key(factors: dict[str, Any]) -> str:
    """A trial's stable name, e.g. ``n16-aug0-tiny-e40`` (``nall`` for the whole training split), with ``-s<seed>``
    when the study has seeds (``n16-aug0-tiny-e40-s2``)."""
    size = "all" if factors["train_size"] is None else factors["train_size"]
    key = f"n{size}-aug{int(factors['augment'])}-{factors['preset']}-e{factors['diffusion_epochs']}"
    return key if SEED not in factors else f"{key}-s{factors[SEED]}"


def sweep_uri(root: str, study: str, sweep: str) -> str:
    return storage.join(root, "sweeps", study, sweep)


def trial_uri(root: str, study: str, sweep: str, key: str) -> str:
    return storage.join(sweep_uri(root, study, sweep), "trials", key)


def audit_epochs(autoencoder_epochs: int, diffusion_epochs: int, audit_every: int) -> list[int]:
    """The global epochs (0-based, autoencoder epochs first) whose checkpoints are audited: every ``audit_every``
    diffusion epochs, and the last."""
    counts = sorted({*range(audit_every, diffusion_epochs + 1, audit_every), diffusion_epochs})
    return [autoencoder_epochs + count - 1 for count in counts]


def _embedding_table(uri: str) -> pa.Table:
    files = storage.list_files(uri, (".parquet",))
    return pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(storage.file_uri(uri, name))))
                             for name in files])


def _subset_embeddings(source_uri: str, sample_ids: Sequence[str] | None, out_uri: str) -> None:
    """The embeddings of ``sample_ids`` (all when None) as one Parquet file."""
    table = _embedding_table(source_uri)
    if sample_ids is not None:
        table = table.filter(pc.is_in(table["sample_id"], value_set=pa.array(sorted(sample_ids), pa.string())))
        assert table.num_rows == len(set(sample_ids)), (table.num_rows, len(set(sample_ids)))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(storage.join(out_uri, "part-00000.parquet"), buffer.getvalue())


def _embedding_rows(uri: str, role: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample_ids (m,), patient_ids (m,), embeddings (m, d)) of an embedding-schema folder, in file order."""
    from raymem.audit.embeddings import EmbeddingSource

    source = EmbeddingSource(uri, role, require_patients=True)
    return source.sample_ids, source.patient_ids, np.concatenate(list(source.batches()))


def _fd_reference(study: StudyConfig, embeddings_uri: str) -> FrechetReference:
    """The study's fixed Frechet reference from its held-out embeddings (the splits that were embedded): the same
    for every trial and for the driver, which records it on the parent run."""
    from raymem.audit.quality import FD_REFERENCE_SPLITS, fixed_reference

    held_out = {split: _embedding_rows(storage.join(embeddings_uri, split), split)
                for split in FD_REFERENCE_SPLITS if storage.exists(storage.join(embeddings_uri, split))}
    return fixed_reference(held_out, study.fd_reference_size, study.audit.seed)


class _Trial:
    """One trial: its config, its folders, and the audit of one checkpoint. Runs inside a Tune trial actor."""

    def __init__(self, study: StudyConfig, factors: dict[str, Any], context: dict[str, Any]):
        self.study, self.factors, self.context = study, factors, context
        self.key = trial_key(factors)
        self.cfg = study.ldm_config(factors, context["root"])
        self.folder = trial_uri(context["root"], study.study, study.sweep, self.key)
        self.paths = study.job().paths(context["root"])
        self.train_embeddings = storage.join(self.folder, "train-embeddings")  # the trial's own training subset

    def training_ids(self) -> list[str] | None:
        from raymem.data import shards
        from raymem.train.ldm import nested_subset

        if self.cfg.train_size is None:
            return None
        all_ids = shards.load_split(self.cfg.dataset, "train", ["sample_id"])["sample_id"].to_pylist()
        return nested_subset(all_ids, self.cfg.train_size, self.cfg.subset_seed)

    def n_synthetic(self, training_ids: list[str] | None) -> int:
        """Samples per audit: sample.n, else as many as the trial trained on; never fewer (the paper's rule)."""
        from raymem.data import shards

        n_train = len(training_ids) if training_ids is not None else \
            shards.read_manifest(self.cfg.dataset)["splits"]["train"]["images"]
        return self.study.samples_per_audit(n_train)

    def audit_inputs(self) -> dict[str, Any]:
        """run_audit's arguments but the synthetic samples: the trial's own training subset, and what every trial
        of the study shares: the val split (the calibration null), the test split (the evaluation set; None without
        one: the val split's patient halves, drawn with audit.seed) and the audit settings. The trial's seed is
        not among them, so tau differs between trials only through their training subsets."""
        audit = self.study.audit
        test = storage.join(self.paths["embeddings"], "test")
        return {"train_uri": self.train_embeddings, "val_uri": storage.join(self.paths["embeddings"], "val"),
                "test_uri": test if storage.exists(test) else None, "percentile": audit.percentile,
                "top_k": audit.top_k, "calibration": audit.calibration, "seed": audit.seed}

    def frechet_reference(self, training_ids: list[str] | None) -> tuple[FrechetReference, np.ndarray, str]:
        """The study's fixed Frechet reference, and this trial's real-vs-real baseline sample (as many rows as each
        audit samples) with where it was drawn from ("held-out" or "train"); see raymem.audit.quality."""
        from raymem.audit.quality import real_baseline_sample

        reference = _fd_reference(self.study, self.paths["embeddings"])
        train_ids, _, train_rows = _embedding_rows(storage.join(self.paths["embeddings"], "train"), "train")
        baseline, source = real_baseline_sample(reference, self.n_synthetic(training_ids), (train_ids, train_rows),
                                                self.study.audit.seed)
        return reference, baseline, source

    def audit(self, epoch: int, training_ids: list[str] | None, shared_ids: list[str] | None,
              reference: FrechetReference, baseline: np.ndarray) -> dict[str, float]:
        """Sample, embed and audit the checkpoint of ``epoch``; the figures (cached in figures.json)."""
        from raymem.audit.embeddings import EmbeddingSource, run_audit, write_outputs
        from raymem.audit.images import audit_report, numeric_items
        from raymem.audit.quality import frechet_figures, ms_ssim_diversity
        from raymem.audit.report import write_report
        from raymem.data import shards
        from raymem.embed import embed_dataset
        from raymem.generate import sample_run
        from raymem.train.ldm import run_uri

        folder = storage.join(self.folder, f"epoch-{epoch:05d}")
        figures_uri = storage.join(folder, FIGURES)
        if storage.exists(figures_uri):
            return json.loads(storage.read_bytes(figures_uri))
        synthetic = storage.join(folder, "synthetic")
        if not storage.exists(storage.join(synthetic, shards.MANIFEST)):
            storage.delete(synthetic)
            sample_run(config.validate(config.SampleConfig, {
                **self.study.sample, **self.study.seeded(self.factors), "n": self.n_synthetic(training_ids),
                "run": run_uri(self.cfg), "epoch": epoch, "out": synthetic}))
        embeddings = storage.join(folder, "embeddings")
        storage.delete(embeddings)
        embed_dataset(config.validate(config.EmbedConfig, {
            **self.study.embed, "detector": self.paths["detector"], "data": synthetic, "out": embeddings,
            "splits": ("train",)}))
        audit = self.study.audit
        result = run_audit(**self.audit_inputs(), synthetic_uri=storage.join(embeddings, "train"),
                           distributed=audit.distributed, progress=False)
        out = storage.join(folder, "audit")
        write_outputs(result, out)
        write_report(storage.join(out, "report.html"),
                     audit_report(result, self.cfg.dataset, synthetic, audit.calibration))

        train_rows = result.matches.filter(pc.equal(result.matches["kind"], "train"))
        memorized = train_rows.filter(pc.fill_null(train_rows["is_memorized"], False))["sample_id"].to_pylist()
        shared = shared_ids if shared_ids is not None else train_rows["sample_id"].to_pylist()
        synthetic_images = shards.images_of(shards.load_split(synthetic, "train", ["image"])).astype(np.float32)
        synthetic_matrix = np.concatenate(list(EmbeddingSource(storage.join(embeddings, "train"), "synthetic",
                                                               require_patients=False).batches()))
        value_range = tuple(shards.read_manifest(self.cfg.dataset)["intensity_range"])
        audited = result.metrics
        figures = {
            "memorization/pct_memorized_train": audited["pct_memorized_train"],
            "memorization/pct_copies": audited["pct_copies"],
            "memorization/pct_memorized_patients": audited["pct_memorized_patients"],
            "memorization/pct_memorized_shared": metrics.pct_memorized_of_subset(memorized, shared),
            "memorization/threshold": audited["threshold"],
            **{f"quality/{name}": value for name, value in frechet_figures(synthetic_matrix, reference,
                                                                           baseline).items()},
            "quality/ms_ssim_diversity": ms_ssim_diversity(synthetic_images, value_range),
            **{f"audit/{name}": value for name, value in numeric_items(audited)},
        }
        storage.write_bytes(figures_uri, json.dumps(figures, indent=2).encode())
        return figures


def _run_trial(factors: dict[str, Any], study: StudyConfig, context: dict[str, Any]) -> None:
    """The Tune trial: train in segments, audit each segment's checkpoint, log, report, maybe stop early."""
    import ray.tune
    from ray.data import DataContext
    from ray.tune.integration.ray_train import TuneReportCallback

    from raymem.generate import saved_epochs
    from raymem.train.ldm import run_uri, train_ldm

    # Tune's trial table reports progress; a Ray Data bar per stage of every trial would bury it.
    DataContext.get_current().enable_progress_bars = False
    trial = _Trial(study, factors, context)
    done_uri = storage.join(trial.folder, TRIAL_DONE)
    run_key = f"trial/{study.sweep}/{trial.key}"
    tags = {"raymem.kind": "trial", "raymem.sweep": study.sweep, "raymem.trial": trial.key,
            "raymem.dataset": trial.cfg.dataset, "raymem.git_revision": context["git_revision"],
            "raymem.config_hash": context["config_hash"]}
    if storage.exists(done_uri):  # finished before the sweep's state was lost: report, do not redo
        record = json.loads(storage.read_bytes(done_uri))
        ray.tune.report({name.replace("/", "."): value for name, value in record["final"].items()})
        return
    with tracking.run(study.study, run_key, uri=context["tracking_uri"], parent_run_id=context["parent_run_id"],
                      tags=tags) as tracked:
        tracking.log_params(tracked, {
            **{f"factor.{name}": factors[name] for name in FACTORS}, SEED: trial.cfg.seed,
            "config_hash": context["config_hash"],
            "autoencoder_epochs": trial.cfg.autoencoder_epochs, "audit_every": study.audit_every,
            **{f"ldm.{name}": value for name, value in trial.cfg.model_dump().items()
               if name not in ("fail_at_epoch", *_DERIVED_LDM_FIELDS)}})
        training_ids = trial.training_ids()
        if not storage.exists(trial.train_embeddings):
            _subset_embeddings(storage.join(trial.paths["embeddings"], "train"), training_ids, trial.train_embeddings)
        shared_ids = training_ids[:study.shared_size()] if training_ids is not None else None
        reference, baseline, baseline_source = trial.frechet_reference(training_ids)
        tracking.log_params(tracked, {"quality.fd_reference_split": reference.split,
                                      "quality.fd_reference_size": reference.size,
                                      "quality.fd_real_baseline_source": baseline_source})
        history: list[float] = []
        stopped = None
        for epoch in audit_epochs(trial.cfg.autoencoder_epochs, trial.cfg.diffusion_epochs, study.audit_every):
            segment = trial.cfg.model_copy(update={"diffusion_epochs": epoch + 1 - trial.cfg.autoencoder_epochs})
            if not (storage.exists(run_uri(segment)) and epoch in saved_epochs(run_uri(segment))):
                train_ldm(segment, tracked=tracked, callbacks=[TuneReportCallback()])
            figures = trial.audit(epoch, training_ids, shared_ids, reference, baseline)
            tracking.log_metrics(tracked, figures, step=epoch)
            tracked.client.log_artifact(tracked.run_id, _local_copy(
                storage.join(trial.folder, f"epoch-{epoch:05d}", "audit", "report.html")),
                artifact_path=f"audits/epoch-{epoch:05d}")
            history.append(figures["memorization/pct_copies"])
            diffusion_trained = epoch + 1 - trial.cfg.autoencoder_epochs
            ray.tune.report({**{name.replace("/", "."): value for name, value in figures.items()},
                             "epoch": epoch, "diffusion_epochs_trained": diffusion_trained})
            reason = metrics.memorization_stop_reason(history, **study.early_stop.model_dump())
            if reason:
                stopped = {"epoch": epoch, "reason": reason}
                tracked.client.set_tag(tracked.run_id, "raymem.early_stopped_epoch", str(epoch))
                tracked.client.set_tag(tracked.run_id, "raymem.early_stop_reason", reason)
                tracking.log_metrics(tracked, {"early_stopped_epoch": epoch}, step=epoch)
                break
    # The done marker only once the MLflow run has ended FINISHED: a driver killed in between leaves no marker, and
    # the rerun reopens the run, finds every checkpoint and audit written, and ends it; a marker written inside the
    # run would leave a killed trial's run RUNNING for good.
    storage.write_bytes(done_uri, json.dumps({"trial": trial.key, "factors": factors, "early_stop": stopped,
                                              "final": figures}, indent=2, default=str).encode())


def _local_copy(uri: str) -> str:
    """A local path holding ``uri``'s bytes (the file itself when local), for MLflow's log_artifact."""
    if not storage.is_s3(uri):
        return uri
    folder = tempfile.mkdtemp(prefix="raymem-artifact-")
    path = Path(folder) / uri.rsplit("/", 1)[-1]
    path.write_bytes(storage.read_bytes(uri))
    return str(path)


def _check_same_study(study: StudyConfig, root: str) -> None:
    """A sweep resumes only with the config it started with: otherwise its trials would mix two studies."""
    record = storage.join(sweep_uri(root, study.study, study.sweep), "study.json")
    if storage.exists(record):
        started = json.loads(storage.read_bytes(record))
        if started["config_hash"] != study.digest():
            raise ConfigError(f"sweep: {study.sweep!r} of study {study.study!r} was started with another config "
                              f"(hash {started['config_hash']}, now {study.digest()}); rerun it unchanged to resume, "
                              "or give the new grid its own sweep name")
    else:
        storage.write_bytes(record, json.dumps({"config_hash": study.digest(), "config": study.model_dump()},
                                               indent=2, default=str).encode())


def run_sweep(study: StudyConfig) -> dict[str, Any]:
    """Prepare the study's shared stages, run (or resume) the sweep's trials, build the dashboard.

    Returns {"parent_run_id", "trials": [{trial, seed, status, final figures, early_stop}], "failed": [keys],
    "dashboard": folder URI, "verdicts": [raymem.audit.verdicts entries]}.
    """
    import ray.tune

    from raymem.jobconfig import run_stage

    root = study.root()
    job = study.job()
    for stage in ("data", "train-detector", "embed"):
        print(f"== study {study.study}: {stage}", flush=True)
        run_stage(job, stage)
    _check_same_study(study, root)
    if None in study.levels()["train_size"]:  # a trial on the whole split: its size is known once the data is
        from raymem.data import shards

        study.samples_per_audit(shards.read_manifest(job.paths(root)["dataset"])["splits"]["train"]["images"])
    uri = study.tracking_uri or (tracking.tracking_uri() if storage.is_s3(root) or os.environ.get(
        "MLFLOW_TRACKING_URI") else tracking.tracking_uri(root))
    artifacts = storage.join(root, "mlartifacts")
    context = {"root": root, "tracking_uri": uri, "git_revision": tracking.git_revision(),
               "config_hash": study.digest()}
    levels = study.levels()
    with tracking.run(study.study, f"sweep/{study.sweep}", uri=uri, artifact_location=artifacts,
                      tags={"raymem.kind": "sweep", "raymem.sweep": study.sweep,
                            "raymem.dataset": job.paths(root)["dataset"],
                            "raymem.git_revision": context["git_revision"],
                            "raymem.config_hash": context["config_hash"]}) as parent:
        tracking.log_params(parent, {
            "factors": ",".join(study.factors.swept()), "config_hash": context["config_hash"],
            "audit_every": study.audit_every, "trials": len(study.trials()),
            **({} if study.seeds is None else {"seeds": ",".join(map(str, study.seeds))}),
            **{f"levels.{name}": ",".join(map(str, values)) for name, values in levels.items()},
            **{f"early_stop.{name}": value for name, value in study.early_stop.model_dump().items()}})
        reference = _fd_reference(study, job.paths(root)["embeddings"])
        tracking.log_params(parent, {"quality.fd_reference_split": reference.split,
                                     "quality.fd_reference_size": reference.size})
        context["parent_run_id"] = parent.run_id
        at_once, why = trials_at_once(study, ray.cluster_resources())
        print(f"== sweep {study.sweep}: trials at once: {at_once} ({why})", flush=True)
        tracking.log_params(parent, {"max_concurrent_trials": at_once})

        def trial(factors: dict[str, Any]) -> None:
            _run_trial(factors, study, context)

        trainable = ray.tune.with_resources(trial, {"CPU": study.trial_cpus})
        # A rerun starts a fresh Tuner, not Tuner.restore. Measured with Ray 2.58 (a grid of 4, max_concurrent_trials
        # 1, trial 1 failed, the driver killed during trial 2, restore with resume_errored): restore keeps the trial
        # ids, but ran trials 1 and 2 together, as only trials it has not created yet wait for the limit, so a rerun
        # after failures would start every failed trial at once (their Train workers can take every CPU and starve
        # Ray Data). It also keeps the first run's limit (restore takes no TuneConfig) and writes a second
        # experiment state file all the same. The trials themselves resume: a finished one returns its recorded
        # figures, an unfinished one continues from its last checkpoint and skips every audit already written.
        finished = [trial_key(f) for f in study.trials() if storage.exists(
            storage.join(trial_uri(root, study.study, study.sweep, trial_key(f)), TRIAL_DONE))]
        if finished:
            print(f"== sweep {study.sweep}: resuming, {len(finished)} of {len(study.trials())} trials already "
                  f"finished ({', '.join(finished)})", flush=True)
        tuner = ray.tune.Tuner(
            trainable,
            param_space={name: ray.tune.grid_search(values) for name, values in study.param_space().items()},
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=at_once),
            run_config=ray.tune.RunConfig(name=study.sweep, storage_path=storage.join(root, "sweeps", study.study,
                                                                                      "tune"),
                                          failure_config=ray.tune.FailureConfig(max_failures=study.max_trial_failures)))
        results = tuner.fit()
        summary = _summarise(study, root, results, parent)
        summary["dashboard"], summary["verdicts"] = _dashboard(study, root, uri)
        tracking.log_metrics(parent, verdict_metrics(summary["verdicts"]))
        if summary["failed"]:
            # The parent run ends FAILED too: the sweep is incomplete until its failed trials are rerun.
            raise SweepIncomplete(summary)
    return summary


class SweepIncomplete(RuntimeError):
    """Some trials failed; the summary says which. Rerunning the same sweep retries them."""

    def __init__(self, summary: dict[str, Any]):
        super().__init__(f"{len(summary['failed'])} trial(s) failed: {', '.join(summary['failed'])}; their MLflow "
                         "runs are FAILED and their errors are in the Tune output above. Rerun the same command to "
                         "retry them (finished trials are kept).")
        self.summary = summary


def _summarise(study: StudyConfig, root: str, results, parent: tracking.TrackedRun) -> dict[str, Any]:
    """Per-trial outcomes; a failed trial's MLflow run is ended FAILED if its process died before it could."""
    trials, failed = [], []
    for result in results:
        key = trial_key(result.config)
        done_uri = storage.join(trial_uri(root, study.study, study.sweep, key), TRIAL_DONE)
        if result.error is not None or not storage.exists(done_uri):
            failed.append(key)
            run = tracking.find_run(parent.client, parent.client.get_run(parent.run_id).info.experiment_id,
                                    f"trial/{study.sweep}/{key}")
            if run is not None and run.info.status == "RUNNING":
                parent.client.set_terminated(run.info.run_id, status="FAILED")
            trials.append({"trial": key, "status": "FAILED", "error": str(result.error)[:500]})
            continue
        record = json.loads(storage.read_bytes(done_uri))
        trials.append({"trial": key, SEED: result.config.get(SEED), "status": "FINISHED",
                       "early_stop": record["early_stop"],
                       **{name: record["final"][f"memorization/{name}"]
                          for name in ("pct_memorized_train", "pct_copies", "pct_memorized_shared")}})
    return {"parent_run_id": parent.run_id, "trials": trials, "failed": failed}


def verdict_metrics(verdicts: list[dict[str, Any]]) -> dict[str, float]:
    """Parent run metrics of the verdicts: verdict/<factor>/<figure>/<other factors>/{effect_mean, effect_lo,
    effect_hi, n_seeds, shown, untrained_trials} (shown: 1 for "shown", 0.5 for "same direction, not significant", 0
    for "not shown", absent where the verdict is confounded by a trial that did not train; untrained_trials: how many
    compared trials did not train, only where some did; other factors as name-level joined by "_", "all" when there
    are none); bounds only where they exist."""
    from raymem.audit.statistics import NOT_SHOWN, SAME_DIRECTION, SHOWN
    from raymem.audit.verdicts import CONFOUNDED

    scores = {SHOWN: 1.0, SAME_DIRECTION: 0.5, NOT_SHOWN: 0.0, CONFOUNDED: None}
    figures = {}
    for entry in verdicts:
        at = "_".join(f"{name}-{level}" for name, level in entry["at"].items()) or "all"
        prefix = f"verdict/{entry['factor']}/{entry['figure']}/{at}"
        values = {"effect_mean": entry["mean"], "effect_lo": entry["lo"], "effect_hi": entry["hi"],
                  "n_seeds": entry["n_seeds"], "shown": scores[entry["verdict"]],
                  "untrained_trials": len(entry.get("untrained", [])) or None}
        figures.update({f"{prefix}/{name}": value for name, value in values.items() if value is not None})
    return figures


def _dashboard(study: StudyConfig, root: str, uri: str) -> tuple[str, list[dict[str, Any]]]:
    """Build the dashboard from MLflow (also logged to the parent run); written under the sweep's folder. Returns
    its folder and the verdicts."""
    from raymem.dashboard import build_dashboard

    target = storage.join(sweep_uri(root, study.study, study.sweep), "dashboard")
    with tempfile.TemporaryDirectory() as folder:
        local = folder if storage.is_s3(target) else target
        built = build_dashboard(study.study, local, tracking_uri=uri, sweep=study.sweep)
        if storage.is_s3(target):
            for path in built["files"]:
                storage.write_bytes(storage.join(target, Path(path).name), Path(path).read_bytes())
    return target, built["verdicts"]


def sweep_command(config_uri: str, sweep: str | None, out) -> int:
    """``raymem sweep`` (and jobs/sweep.py): load the study, join Ray, run the sweep, print the summary."""
    from raymem import runtime

    study = load_study(config_uri, sweep=sweep)
    study.root()
    if study.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = study.tracking_uri
    runtime.init_ray()
    started = time.perf_counter()
    try:
        summary = run_sweep(study)
        code = 0
    except SweepIncomplete as incomplete:
        summary, code = incomplete.summary, 1
        print(str(incomplete), file=out)
    print(json.dumps(summary, indent=2, default=str), file=out)
    print(f"== sweep {study.sweep} took {time.perf_counter() - started:.0f} s; dashboard: "
          f"{summary.get('dashboard')}/index.html", file=out, flush=True)
    return code
