"""Job configs for ``ray job submit`` entrypoints (jobs/*.py): one YAML file, a section per stage.

A job file names where everything lives once (``storage_root``, or RAYMEM_STORAGE_ROOT from the environment) and
each stage's settings in its own section; the paths between stages are derived here, so a stage section never
names another stage's output::

    storage_root: s3://bucket/studies     # optional: else RAYMEM_STORAGE_ROOT
    tracking_uri: http://mlflow:5000      # optional: else MLFLOW_TRACKING_URI, else sqlite under a local root
    experiment: xray2d
    run_name: paper                       # the job's identity: rerun with the same name to resume
    data: {phantoms: {kind: xray2d, patients: 100, images_per_patient: 4, size: 64}}   # or {source: raw/xray}
    ingest: {...}       IngestConfig
    detector: {...}     DetectorTrainConfig without dataset, out, run_name, experiment
    embed: {...}        EmbedConfig without detector, data, out
    ldm: {...}          LDMTrainConfig without dataset, out, run_name, experiment, split
    sample: {...}       SampleConfig without run, out; n defaults to the training image count (the paper's rule)
    null: {...}         optional: the generator-null, LDMTrainConfig values over the ldm section's, trained on the
                        test split (held-out patients) and sampled like ``sample``; ``null: {}`` = the same LDM
    audit: {...}        AuditConfig, plus ``distributed``

A relative ``data.source`` lies under ``storage_root``. Layout under ``storage_root``: datasets/<run_name>,
detector/<run_name>/detector.pt, embeddings/<run_name>, ldm/<run_name>/epoch-<E>, synthetic/<run_name>,
audits/<run_name>; with a null section also ldm/<run_name>-null and synthetic/<run_name>-null.

Every stage is skipped when its committed output exists and resumes from its checkpoints otherwise, so a job
resubmitted with the same run name picks up where the last one stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from raymem import config, runtime, storage, tracking
from raymem.config import ConfigError, _Strict
from raymem.preflight import PreflightError, run_preflight

STORAGE_ROOT_ENV = "RAYMEM_STORAGE_ROOT"
NULL_STAGES = ("train-null-ldm", "sample-null")  # the generator-null calibration; skipped without a null section
EMBEDDED_MARKER = "rows.json"  # written last by the embed stage: rows per split
TRACKED_STAGES = ("train-detector", "train-ldm", "train-null-ldm", "audit")  # the stages that log to MLflow
# The shared stages (data, train-detector, embed), which a rerun or another sweep of one study reuses when their
# output exists, record the settings they were made from (<root>/stages/<run_name>/<stage>.json) and refuse to be
# reused under others. Not recorded: settings that change how a stage runs, not what it writes.
NOT_RECORDED = {
    "train-detector": {"use_gpu", "cpus_per_worker", "checkpoint_every", "eval_every", "eval_max_images",
                       "max_failures", "fail_at_epoch"},
    "embed": {"batch_size", "num_actors", "use_gpu"},
}


class PhantomSource(_Strict):
    """Phantom patients generated straight into the dataset (the embedded default data)."""

    kind: Literal["xray2d", "ct3d", "mri3d"] = Field(
        default="xray2d", description="'xray2d' chest radiograph; 'ct3d' chest CT (HU); 'mri3d' knee MR "
                                      "(size // 4 slices)")
    patients: int = Field(default=100, ge=2, description="number of phantom patients")
    images_per_patient: int = Field(
        default=4, ge=1, description="images per patient, each a new pose, contrast and noise")
    size: int = Field(default=64, ge=8, description="pixels per side")
    seed: int = Field(default=0, description="the phantoms' anatomy and images (the split seed is ingest.seed)")


class DataSection(_Strict):
    """Where the images come from: phantoms, or a folder of raw files (``source``) to ingest."""

    phantoms: PhantomSource | None = None
    source: str | None = Field(default=None, description="NIfTI / DICOM / PNG / MedMNIST files to ingest: a URI, "
                                                         "or a path relative to storage_root")

    @model_validator(mode="after")
    def _exactly_one(self) -> DataSection:
        if (self.phantoms is None) == (self.source is None):
            raise ValueError("set exactly one of data.phantoms and data.source")
        return self


class AuditSection(config.AuditConfig):
    """The audit's settings, plus where its all-pairs search runs (Ray tasks across the cluster, or in-process)."""

    distributed: bool = Field(
        default=True, description="all-pairs search as Ray tasks across the cluster; false: in the job's process")


class JobConfig(_Strict):
    """A job file, validated; the per-stage typed configs come from the methods below."""

    storage_root: str | None = Field(default=None, description=f"URI; when absent, ${STORAGE_ROOT_ENV}")
    tracking_uri: str | None = Field(default=None, description="when absent, $MLFLOW_TRACKING_URI")
    experiment: str = Field(default="raymem", description="MLflow experiment of every stage's run")
    run_name: str = Field(
        default="raymem", pattern=r"^[A-Za-z0-9_.-]+$",
        description="the job's identity: names every stage's output; rerun with the same name to resume")
    data: DataSection = Field(description="the images: phantoms, or raw files to ingest")
    ingest: dict[str, Any] = Field(
        default_factory=dict,
        description="IngestConfig values; with phantoms, spatial_dims and size come from the phantoms")
    detector: dict[str, Any] = Field(
        default_factory=dict, description="DetectorTrainConfig values without dataset, out, run_name, experiment")
    embed: dict[str, Any] = Field(
        default_factory=dict, description="EmbedConfig values without detector, data, out; the audit embeds with "
                                          "them too")
    ldm: dict[str, Any] = Field(
        default_factory=dict, description="LDMTrainConfig values without dataset, out, run_name, experiment, split")
    sample: dict[str, Any] = Field(
        default_factory=dict, description="SampleConfig values without run, out; n defaults to the training image "
                                          "count (the paper's rule)")
    null: dict[str, Any] | None = Field(
        default=None, description="the generator-null: LDMTrainConfig values over the ldm section's, trained on the "
                                  "test split (held-out patients) as <run_name>-null and sampled with the sample "
                                  "section, for the audit's generator calibration; {}: the same LDM; None: off")
    audit: AuditSection = Field(default=AuditSection(), description="AuditConfig values, plus distributed")

    @model_validator(mode="before")
    @classmethod
    def _yaml_null_key(cls, values: Any) -> Any:
        # YAML reads the key `null:` as None (the null literal); it names the null section all the same.
        if isinstance(values, dict) and None in values:
            return {("null" if key is None else key): value for key, value in values.items()}
        return values

    @model_validator(mode="after")
    def _stage_sections_valid(self) -> JobConfig:
        # Validate every section now, so a typo in the ldm section fails at submit time, not after training.
        ingest = self.ingest_config()
        stages = ("train-detector", "embed", "train-ldm", "sample")
        if self.null is not None:
            if ingest.test_fraction == 0 and ingest.format != "medmnist":  # MedMNIST brings its own test split
                raise ConfigError("ingest.test_fraction: is 0, but the null section trains on the test split "
                                  "(held-out patients); set ingest.test_fraction > 0 or remove the null section")
            stages += NULL_STAGES
        for stage in stages:
            self.stage_config(stage, root=self.storage_root or f"${STORAGE_ROOT_ENV}", train_images=1)
        return self

    def root(self) -> str:
        """The storage root: the file's ``storage_root``, else $RAYMEM_STORAGE_ROOT."""
        root = self.storage_root or os.environ.get(STORAGE_ROOT_ENV)
        if not root:
            raise ConfigError(f"storage_root: not set; put it in the job file, or set {STORAGE_ROOT_ENV}=s3://... "
                              "(locally: export it; for `ray job submit`: in --runtime-env-json's env_vars, or on the "
                              "cluster's nodes)")
        return root.rstrip("/")

    def ingest_config(self) -> config.IngestConfig:
        return config.validate(config.IngestConfig, self.ingest)

    def paths(self, root: str | None = None) -> dict[str, str]:
        """Every stage's input/output URI under the storage root."""
        root = root or self.root()
        name = self.run_name
        source = self.data.source or ""
        return {
            "source": source if "://" in source or source.startswith("/") else storage.join(root, source),
            "dataset": storage.join(root, "datasets", name),
            "detector": storage.join(root, "detector", name, "detector.pt"),
            "embeddings": storage.join(root, "embeddings", name),
            "ldm_run": storage.join(root, "ldm", name),
            "synthetic": storage.join(root, "synthetic", name),
            "null_ldm_run": storage.join(root, "ldm", f"{name}-null"),
            "null_synthetic": storage.join(root, "synthetic", f"{name}-null"),
            "audit": storage.join(root, "audits", name),
        }

    def stage_config(self, stage: str, root: str | None = None, train_images: int | None = None) -> BaseModel:
        """The typed config of a training/embedding/sampling stage with its derived paths filled in.

        ``train_images`` is sample's ``n`` when the sample section leaves it out (as many synthetic samples as
        training images); when None it is read from the dataset's manifest.
        """
        root = root or self.root()
        paths = self.paths(root)
        sample_count = {}
        if stage in ("sample", "sample-null") and "n" not in self.sample:
            sample_count["n"] = train_images or _train_images(paths["dataset"])
        identity = {"run_name": self.run_name, "experiment": self.experiment}
        ldm_derived = {"dataset": paths["dataset"], "out": root, "experiment": self.experiment}
        section, model, derived = {
            "train-detector": (self.detector, config.DetectorTrainConfig,
                               {"dataset": paths["dataset"], "out": root, **identity}),
            "embed": (self.embed, config.EmbedConfig,
                      {"detector": paths["detector"], "data": paths["dataset"], "out": paths["embeddings"]}),
            "train-ldm": (self.ldm, config.LDMTrainConfig,
                          {**ldm_derived, "run_name": self.run_name, "split": "train"}),
            "train-null-ldm": (self.null or {}, config.LDMTrainConfig,
                               {**ldm_derived, "run_name": f"{self.run_name}-null", "split": "test"}),
            "sample": (self.sample, config.SampleConfig,
                       {"run": paths["ldm_run"], "out": paths["synthetic"], **sample_count}),
            "sample-null": (self.sample, config.SampleConfig,
                            {"run": paths["null_ldm_run"], "out": paths["null_synthetic"], **sample_count}),
        }[stage]
        section_name = {"train-detector": "detector", "train-ldm": "ldm", "train-null-ldm": "null",
                        "sample-null": "sample"}.get(stage, stage)
        clashes = sorted(set(section) & set(derived))
        if clashes:
            raise ConfigError(f"{section_name}.{clashes[0]}: set by the job (from storage_root, run_name, experiment "
                              f"and the stage); remove it from the {section_name} section")
        base = self.ldm if stage == "train-null-ldm" else {}  # the null section overrides the ldm section's values
        return config.validate(model, {**base, **section, **derived})


def stage_settings(job: JobConfig, stage: str) -> dict[str, Any]:
    """What a recorded stage's output depends on, as dotted names: its own settings (validated, defaults filled in,
    the derived paths and ``NOT_RECORDED`` left out) and those of the stages it reads from."""
    if stage == "data":
        return _dotted({"data": job.data.model_dump(mode="json"),
                        "ingest": job.ingest_config().model_dump(mode="json")})
    upstream = {"train-detector": "data", "embed": "train-detector"}[stage]
    section = {"train-detector": "detector", "embed": "embed"}[stage]
    derived = {"train-detector": {"dataset", "out", "run_name", "experiment"},
               "embed": {"detector", "data", "out"}}[stage]
    own = job.stage_config(stage, train_images=1).model_dump(mode="json", exclude=derived | NOT_RECORDED[stage])
    return {**stage_settings(job, upstream), **_dotted({section: own})}


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _record_uri(job: JobConfig, stage: str) -> str:
    return storage.join(job.root(), "stages", job.run_name, f"{stage}.json")


def _check_reused(job: JobConfig, stage: str, output_uri: str) -> None:
    """A recorded stage's existing output is reused only under the settings it was made from; else a ConfigError
    names the settings that differ (names only: a value such as data.source may hold a patient's name)."""
    record_uri = _record_uri(job, stage)
    if not storage.exists(record_uri):
        print(f"{stage}: {output_uri} has no record of the settings it was made from (made before raymem recorded "
              "them): reused unchecked", flush=True)
        return
    made_with = json.loads(storage.read_bytes(record_uri))
    now = json.loads(json.dumps(stage_settings(job, stage)))  # through JSON, as recorded: tuples become lists
    changed = sorted(name for name in made_with.keys() | now.keys() if made_with.get(name) != now.get(name))
    if changed:
        raise ConfigError(f"{changed[0]}: {stage} of run {job.run_name!r} was made with other settings "
                          f"({', '.join(changed)} differ), and a rerun reuses its output {output_uri}; rerun with "
                          "the settings it was made with, or give the job (or study) a new name, or delete that "
                          "output and what was made from it")


def _record(job: JobConfig, stage: str) -> None:
    storage.write_bytes(_record_uri(job, stage), json.dumps(stage_settings(job, stage), indent=2).encode())


def _train_images(dataset_uri: str) -> int:
    from raymem.data import shards

    return shards.read_manifest(dataset_uri)["splits"]["train"]["images"]


def load_job(uri: str, *, run_name: str | None = None) -> JobConfig:
    """Read and validate a job file (local or s3://); ``run_name`` overrides the file's."""
    return config.load(JobConfig, uri, {"run_name": run_name})


def _done(marker_uri: str, stage: str, output_uri: str) -> bool:
    """True when the stage committed its output (``marker_uri`` exists); else clears what an interrupted try left.

    Stages without checkpoints (data, embed, sample, audit) write part files whose names depend on how Ray Data
    batched the rows, so a second try over a first one's leftovers could hold a sample twice: it starts clean.
    """
    if storage.exists(marker_uri):
        print(f"{stage}: already done, {marker_uri}", flush=True)
        return True
    storage.delete(output_uri)
    return False


def run_stage(job: JobConfig, stage: str) -> dict[str, Any]:
    """Run one stage of the job (skipped when its committed output exists); returns a printable summary."""
    from raymem.data import shards

    paths = job.paths()
    if stage in NULL_STAGES and job.null is None:
        print(f"{stage}: skipped, the job has no null section (no generator calibration)", flush=True)
        return {"skipped": "no null section"}
    if stage == "data":
        if _done(storage.join(paths["dataset"], shards.MANIFEST), stage, paths["dataset"]):
            _check_reused(job, stage, paths["dataset"])
            return {"dataset": paths["dataset"]}
        from raymem.data.ingest import ingest, phantom_dataset

        _record(job, stage)  # before the output commits: a committed output always has its record
        if job.data.phantoms is not None:
            summary = phantom_dataset(paths["dataset"], **job.data.phantoms.model_dump(), cfg=job.ingest_config())
        else:
            summary = ingest(paths["source"], paths["dataset"], job.ingest_config())
        print("\n".join(summary.lines()), flush=True)
        return {"dataset": paths["dataset"], "ingested": summary.ingested, "quarantined": summary.quarantined}
    if stage == "train-detector":
        if storage.exists(paths["detector"]):
            print(f"{stage}: already done, {paths['detector']}", flush=True)
            _check_reused(job, stage, paths["detector"])
            return {"detector": paths["detector"]}
        from raymem.train.detector import train_detector

        _record(job, stage)
        result = train_detector(job.stage_config(stage))
        return {"detector": result["detector"], "mlflow_run_id": result["run_id"]}
    if stage == "embed":
        from raymem.embed import embed_dataset

        marker = storage.join(paths["embeddings"], EMBEDDED_MARKER)
        if _done(marker, stage, paths["embeddings"]):
            _check_reused(job, stage, paths["embeddings"])
            return {"embeddings": paths["embeddings"]}
        _record(job, stage)
        rows = embed_dataset(job.stage_config(stage))
        storage.write_bytes(marker, json.dumps(rows).encode())
        return {"embeddings": paths["embeddings"], "rows": rows}
    if stage in ("train-ldm", "train-null-ldm"):
        from raymem.generate import saved_epochs
        from raymem.train.ldm import train_ldm

        run = paths["ldm_run" if stage == "train-ldm" else "null_ldm_run"]
        cfg = job.stage_config(stage)
        last_epoch = cfg.autoencoder_epochs + cfg.diffusion_epochs - 1
        if storage.exists(run) and last_epoch in saved_epochs(run):
            print(f"{stage}: already done, {run} has epoch {last_epoch}", flush=True)
            return {"run": run}
        result = train_ldm(cfg)
        return {"run": result["run"], "mlflow_run_id": result["run_id"]}
    if stage in ("sample", "sample-null"):
        out = paths["synthetic" if stage == "sample" else "null_synthetic"]
        if _done(storage.join(out, shards.MANIFEST), stage, out):
            return {"out": out}
        from raymem.generate import sample_run

        return sample_run(job.stage_config(stage))
    if stage == "audit":
        if _done(storage.join(paths["audit"], "metrics.json"), stage, paths["audit"]):
            return {"audit": paths["audit"]}
        from raymem.audit.images import audit_images

        null_synthetic = paths["null_synthetic"] if job.null is not None else None
        if null_synthetic and not storage.exists(storage.join(null_synthetic, shards.MANIFEST)):
            raise ConfigError(f"null: the job has a null section but {null_synthetic} holds no generator-null "
                              "samples; run the train-null-ldm and sample-null stages first (jobs/pipeline.py runs "
                              "them), or remove the null section")
        audit_cfg = config.AuditConfig(**job.audit.model_dump(exclude={"distributed"}))
        metrics = audit_images(paths["dataset"], paths["synthetic"], paths["detector"], paths["audit"], audit_cfg,
                               distributed=job.audit.distributed, experiment=job.experiment,
                               run_name=f"audit/{job.run_name}", embed_settings=job.embed,
                               null_synthetic_uri=null_synthetic)
        return {"audit": paths["audit"], **{k: metrics[k] for k in ("threshold", "pct_memorized_train", "pct_copies")}}
    raise AssertionError(f"unknown stage {stage!r}")


def _preflight(job: JobConfig, stages: tuple[str, ...]) -> None:
    """Before Ray and any stage: the storage root is writable and, when a stage logs, the tracking store answers and
    holds the experiment, created as the first stage to log would create it (train-ldm names its artifact location)."""
    tracked = [stage for stage in stages if stage in TRACKED_STAGES]
    names_artifacts = bool(tracked) and tracked[0] in ("train-ldm", "train-null-ldm")
    run_preflight(job.root(), experiment=job.experiment if tracked else None, tracking_uri=job.tracking_uri,
                  artifact_location=tracking.artifact_root(job.root()) if names_artifacts else None)


def main(stages: tuple[str, ...], argv: list[str] | None = None) -> int:
    """The body of every jobs/*.py entrypoint: parse --config/--run-name, join Ray, run ``stages`` in order."""
    parser = argparse.ArgumentParser(description=f"raymem job: {' -> '.join(stages)}. "
                                                 "Submit with `ray job submit --working-dir . -- python jobs/...`.")
    parser.add_argument("--config", required=True, help="job YAML (local path or s3://), a section per stage")
    parser.add_argument("--run-name", help="override the file's run_name (same name: resume; new name: new run)")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's own progress bars and INFO logs in the job log (or RAYMEM_VERBOSE=1)")
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[runtime.VERBOSE_ENV] = "1"
    # force: main may run more than once in a process (tests); each run logs to the stderr it has now.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        job = load_job(args.config, run_name=args.run_name)
        job.root()
    except ConfigError as err:
        print(f"{args.config}: {err}", file=sys.stderr)
        return 2
    if job.tracking_uri:
        # The stages read MLFLOW_TRACKING_URI (raymem.tracking); the file's value wins for this process.
        os.environ["MLFLOW_TRACKING_URI"] = job.tracking_uri
    try:
        _preflight(job, stages)
    except PreflightError as err:
        print(f"{args.config}: {err}", file=sys.stderr)
        return 1
    runtime.init_ray()
    for stage in stages:
        print(f"== {stage} ({job.run_name})", flush=True)
        started = time.perf_counter()
        summary = run_stage(job, stage)
        print(json.dumps(summary, indent=2, default=str), f"\n== {stage} took {time.perf_counter() - started:.0f} s",
              flush=True)
    return 0
