"""The ``raymem`` command line: one subcommand per stage, every input and output a URI (local path or s3://)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from raymem import config, preflight, runtime

DESCRIPTION = """\
raymem audits generative models of medical images for patient-data memorization.

stages:
  phantoms          generate procedural phantom patients (the embedded default data) as a dataset or as files
  ingest            raw NIfTI / DICOM / PNG / MedMNIST files -> a sharded, de-identified, patient-split dataset
  train-detector    train the contrastive copy detector with Ray Train (checkpoints, resume, MLflow)
  embed             embed a dataset with a trained detector (Ray Data actors) -> embedding Parquet
  train-ldm         train a latent diffusion model (autoencoder, then diffusion) with Ray Train
  sample            synthetic samples from any saved LDM epoch (Ray Data actors) -> a synthetic dataset
  audit             embed a dataset and synthetic images (a dataset or any folder of images) and audit them
  filter            privacy filter: the synthetic dataset without the samples an audit flagged as copies
  audit-embeddings  exact all-pairs search of synthetic vs training embeddings -> memorization figures
  sweep             Ray Tune over the memorization factors (data size, augmentation, model size, training
                    length): an LDM per trial, audited at several epochs; parent/child runs in MLflow
  dashboard         comparison plots and an HTML page of a sweep, built from its MLflow runs
  local-cluster     a Ray head, an MLflow server and an S3 endpoint on 127.0.0.1 running the tiny pipeline as a
                    Ray job: try the cluster workflow on a laptop (docs/cluster.md)

Every stage reads and writes URIs: a local path or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL;
credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, else the AWS default chain: a credentials file, an
instance profile). Ray: joins RAY_ADDRESS when set, else starts a local cluster. -v shows Ray's own progress
bars and logs too.
"""


def _ingest(args: argparse.Namespace) -> int:
    from raymem.data.ingest import ingest

    cfg = config.load(config.IngestConfig, args.config, {
        "format": args.format, "spatial_dims": args.spatial_dims,
        "size": tuple(args.size) if args.size else None, "modality": args.modality, "fit": args.fit,
        "seed": args.seed, "strict": True if args.strict else None, "patient_pattern": args.patient_pattern})
    preflight.run_preflight(args.dst)
    runtime.init_ray()
    summary = ingest(args.src, args.dst, cfg, owner_report=args.owner_report)
    print("\n".join(summary.lines()))
    return 0


def _phantoms(args: argparse.Namespace) -> int:
    from raymem.data import phantoms

    preflight.run_preflight(args.dst)
    if args.as_files:
        n = phantoms.write_files(args.dst, args.kind, patients=args.patients,
                                 images_per_patient=args.images_per_patient, size=args.size, seed=args.seed,
                                 file_format=args.file_format)
        print(f"wrote {n} files to {args.dst}")
        return 0
    from raymem.data.ingest import phantom_dataset

    cfg = config.load(config.IngestConfig, args.config, {"seed": args.seed})
    summary = phantom_dataset(args.dst, args.kind, patients=args.patients,
                              images_per_patient=args.images_per_patient, size=args.size, seed=args.seed, cfg=cfg)
    print("\n".join(summary.lines()))
    return 0


def _train_detector(args: argparse.Namespace) -> int:
    from raymem.train.detector import train_detector

    cfg = config.load(config.DetectorTrainConfig, args.config, {
        "dataset": args.dataset, "out": args.out, "run_name": args.run_name, "preset": args.preset,
        "epochs": args.epochs, "batch_size": args.batch_size, "num_workers": args.num_workers,
        "use_gpu": True if args.use_gpu else None, "augmentation": args.augmentation})
    preflight.run_preflight(cfg.out, experiment=cfg.experiment)
    runtime.init_ray()
    result = train_detector(cfg)
    print(json.dumps({"detector": result["detector"], "mlflow_run_id": result["run_id"],
                      "last_epoch": result["metrics"]}, indent=2, default=str))
    return 0


def _embed(args: argparse.Namespace) -> int:
    from raymem.embed import embed_dataset

    cfg = config.load(config.EmbedConfig, args.config, {
        "detector": args.detector, "data": args.data, "out": args.out,
        "splits": tuple(args.splits) if args.splits else None, "use_gpu": True if args.use_gpu else None})
    preflight.run_preflight(cfg.out)
    runtime.init_ray()
    counts = embed_dataset(cfg)
    print("\n".join(f"{split:<6} {n:>8} embeddings -> {args.out}/{split}" for split, n in counts.items()))
    return 0


def _train_ldm(args: argparse.Namespace) -> int:
    from raymem import tracking
    from raymem.train.ldm import train_ldm

    cfg = config.load(config.LDMTrainConfig, args.config, {
        "dataset": args.dataset, "out": args.out, "run_name": args.run_name, "preset": args.preset,
        "autoencoder_epochs": args.autoencoder_epochs, "diffusion_epochs": args.diffusion_epochs,
        "batch_size": args.batch_size, "num_workers": args.num_workers, "train_size": args.train_size,
        "split": args.split, "use_gpu": True if args.use_gpu else None,
        "augment": {"enabled": args.augment == "on"} if args.augment else None})
    preflight.run_preflight(cfg.out, experiment=cfg.experiment, artifact_location=tracking.artifact_root(cfg.out))
    runtime.init_ray()
    result = train_ldm(cfg)
    print(json.dumps({"run": result["run"], "mlflow_run_id": result["run_id"], "last_epoch": result["metrics"]},
                     indent=2, default=str))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from raymem.generate import sample_run

    cfg = config.load(config.SampleConfig, args.config, {
        "run": args.run, "epoch": args.epoch, "n": args.n, "out": args.out, "ddim_steps": args.ddim_steps,
        "seed": args.seed, "batch_size": args.batch_size, "num_actors": args.num_actors,
        "use_gpu": True if args.use_gpu else None})
    preflight.run_preflight(cfg.out)
    runtime.init_ray()
    print(json.dumps(sample_run(cfg), indent=2))
    return 0


def _audit_config(args: argparse.Namespace) -> config.AuditConfig:
    return config.load(config.AuditConfig, args.config, {
        "percentile": args.percentile, "top_k": args.top_k, "calibration": args.calibration,
        "plant_copies": args.plant_copies, "seed": args.seed, "reference": args.reference})


def _audit(args: argparse.Namespace) -> int:
    from raymem import tracking
    from raymem.audit.images import audit_images

    cfg = _audit_config(args)
    preflight.run_preflight(args.out, experiment=tracking.DEFAULT_EXPERIMENT)
    runtime.init_ray()
    metrics = audit_images(args.dataset, args.synthetic, args.detector, args.out, cfg, labels_csv=args.labels,
                           distributed=args.distributed, experiment=tracking.DEFAULT_EXPERIMENT,
                           run_name=args.run_name, null_synthetic_uri=args.null_synthetic)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2, sort_keys=True))
    print(f"report: {args.out}/report.html")
    return 0


def _filter(args: argparse.Namespace) -> int:
    from raymem.audit.images import filter_copies

    preflight.run_preflight(args.out)
    counts = filter_copies(args.audit, args.synthetic, args.out)
    print(f"synthetic {counts['synthetic']}, removed {counts['removed']} flagged copies, kept {counts['kept']} "
          f"-> {args.out}")
    return 0


def _audit_embeddings(args: argparse.Namespace) -> int:
    from raymem import tracking
    from raymem.audit.embeddings import audit_embeddings, track_audit

    cfg = _audit_config(args)
    experiment = tracking.DEFAULT_EXPERIMENT if args.run_name else None
    preflight.run_preflight(args.out, experiment=experiment)
    if args.distributed:
        runtime.init_ray()
    reference_ids = None
    if args.reference_ids and cfg.reference == "generator":
        from raymem import storage

        reference_ids = json.loads(storage.read_bytes(args.reference_ids))
    result = audit_embeddings(args.train, args.val, args.synthetic, args.out, test_uri=args.test,
                              null_uri=args.null_synthetic, reference_ids=reference_ids, percentile=cfg.percentile,
                              top_k=cfg.top_k, calibration=cfg.calibration, plant_copies=cfg.plant_copies,
                              labels_csv=args.labels, seed=cfg.seed, distributed=args.distributed)
    if args.run_name:
        track_audit(result, args.out, experiment=experiment, run_name=args.run_name, stage="audit-embeddings",
                    params={"train": args.train, "val": args.val, "test": args.test, "synthetic": args.synthetic,
                            "null_synthetic": args.null_synthetic, **cfg.model_dump()})
    print(json.dumps(result.metrics, indent=2, sort_keys=True))
    print("\n".join(f"warning: {warning}" for warning in result.metrics["warnings"]), file=sys.stderr)
    if runtime.verbose():
        print("audit-embeddings phase seconds: " + " ".join(
            f"{phase}={seconds:.3f}" for phase, seconds in result.phase_seconds.items()), file=sys.stderr)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from raymem.sweep import load_study, sweep_command

    study = load_study(args.config, sweep=args.sweep)
    # The sweep's first tracked stage is train-detector, which creates the experiment without an artifact location.
    preflight.run_preflight(study.root(), experiment=study.study, tracking_uri=study.tracking_uri)
    return sweep_command(args.config, args.sweep, out=sys.stdout)


def _dashboard(args: argparse.Namespace) -> int:
    from raymem import tracking
    from raymem.dashboard import build_dashboard

    uri = args.tracking_uri or tracking.tracking_uri()
    preflight.check_tracking(uri)  # reads the experiment's runs: the server answers; nothing is created
    preflight.check_storage(args.out)
    built = build_dashboard(args.experiment, args.out, tracking_uri=uri, sweep=args.sweep)
    print(f"dashboard of {built['trials']} trials: {args.out}/index.html")
    return 0


def _local_cluster(args: argparse.Namespace) -> int:
    from raymem import localcluster

    return localcluster.main(args.out, keep=args.keep)


def _audit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--percentile", type=float, help="threshold percentile (default 95, the paper's)")
    p.add_argument("--top-k", type=int, help="training neighbours kept per synthetic sample (default 5)")
    p.add_argument("--calibration", choices=["paper", "matched", "generator"],
                   help="the headline null (default paper; all available are reported)")
    p.add_argument("--reference", choices=["generator", "all"],
                   help="compare with the generator's own training set (default) or the whole train split")
    p.add_argument("--null-synthetic", help="samples of a generator trained only on held-out patients "
                                            "(`raymem train-ldm --split test`): calibration 'generator'")
    p.add_argument("--plant-copies", type=int, help="mix N known copies into the synthetic set and score them")
    p.add_argument("--labels", help="CSV of hand labels (synthetic_id, train_id, label copy|novel)")
    p.add_argument("--seed", type=int)
    p.add_argument("--distributed", action="store_true", help="search with Ray tasks over tiles")
    p.add_argument("--config", help="AuditConfig YAML; flags override it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymem", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, tracebacks, and Ray's own progress bars and INFO logs (hidden by default; "
                             "they always go to the Ray session's log files)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("phantoms", help="generate phantom patients (embedded default data)",
                       description="Procedural phantom patients: stable anatomy plus patient-specific texture; "
                                   "two images of one patient differ in pose, noise and contrast. Writes a "
                                   "committed dataset, or real image files with --as-files.")
    p.add_argument("dst", help="destination URI (dataset, or folder of files with --as-files)")
    p.add_argument("--kind", choices=["xray2d", "ct3d", "mri3d"], default="xray2d")
    p.add_argument("--patients", type=int, default=100)
    p.add_argument("--images-per-patient", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="pixels per side (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--as-files", action="store_true", help="write NIfTI/PNG/DICOM files instead of a dataset")
    p.add_argument("--file-format", choices=["auto", "png", "nifti", "dicom"], default="auto",
                   help="with --as-files: auto = PNG for 2D, NIfTI for 3D")
    p.add_argument("--config", help="IngestConfig YAML for the dataset's normalisation and splits")
    p.set_defaults(func=_phantoms)

    p = sub.add_parser("ingest", help="raw images -> sharded, de-identified dataset",
                       description="Read NIfTI, DICOM (series grouped by patient, study and series UID; JPEG, "
                                   "JPEG-LS, JPEG 2000 and RLE decoded), PNG/JPEG and MedMNIST .npz files under SRC; "
                                   "validate, de-identify (no original path component is kept), fit to shape, "
                                   "normalise and split by patient into Parquet shards under DST. Every file is "
                                   "counted once; a bad file is set aside in DST/quarantine.parquet with its reason; "
                                   "manifest.json is written last. A rerun after a kill clears what it left.")
    p.add_argument("src", help="input folder or file URI")
    p.add_argument("dst", help="output dataset URI (must not hold a dataset yet)")
    p.add_argument("--format", choices=["auto", "nifti", "dicom", "png", "medmnist"])
    p.add_argument("--spatial-dims", type=int, choices=[2, 3])
    p.add_argument("--size", type=int, nargs="+", help="output shape, e.g. --size 64 64 or --size 32 (all axes)")
    p.add_argument("--modality", choices=["auto", "CT", "MR", "XR", "OT"])
    p.add_argument("--fit", choices=["resize", "crop_or_pad"])
    p.add_argument("--seed", type=int, help="split seed")
    p.add_argument("--strict", action="store_true", help="stop at the first bad file with a non-zero exit")
    p.add_argument("--patient-pattern", help="'auto' (default) or a regex with (?P<patient>...) over the path")
    p.add_argument("--owner-report", metavar="PATH",
                   help="CSV of every input file's raw path, outcome and reason, written outside the dataset for "
                        "the data owner (it holds raw paths: never share it)")
    p.add_argument("--config", help="IngestConfig YAML; flags override it")
    p.set_defaults(func=_ingest)

    p = sub.add_parser("train-detector", help="train the contrastive copy detector (Ray Train)",
                       description="Self-supervised contrastive detector (NT-Xent, temperature 0.07, Adam 1e-4 -> 5e-5, "
                                   "paper augmentation) trained on the training split with Ray Train; patient-aware "
                                   "positives by default. Checkpoints every epoch under OUT/detector/RUN_NAME; rerun "
                                   "with the same OUT and RUN_NAME to resume. Logs to MLflow (MLFLOW_TRACKING_URI, "
                                   "else sqlite in OUT).")
    p.add_argument("--config", help="DetectorTrainConfig YAML; flags override it")
    p.add_argument("--dataset", help="dataset URI")
    p.add_argument("--out", help="output root URI")
    p.add_argument("--run-name")
    p.add_argument("--preset", choices=["tiny", "small2d", "paper2d", "paper3d"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--augmentation", choices=["paper", "strong"])
    p.add_argument("--use-gpu", action="store_true")
    p.set_defaults(func=_train_detector)

    p = sub.add_parser("embed", help="embed a dataset with a trained detector (Ray Data actors)",
                       description="Writes OUT/<split>/part-*.parquet with sample_id, patient_id, embedding.")
    p.add_argument("--detector", help="detector checkpoint URI (detector.pt)")
    p.add_argument("--data", help="dataset URI")
    p.add_argument("--out", help="output URI")
    p.add_argument("--splits", nargs="+", choices=["train", "val", "test"])
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--config", help="EmbedConfig YAML; flags override it")
    p.set_defaults(func=_embed)

    p = sub.add_parser("train-ldm", help="train a latent diffusion model (Ray Train)",
                       description="MONAI AutoencoderKL, then a DiffusionModelUNet in its latent space (DDPM, 1000 "
                                   "steps), with Ray Train over NUM_WORKERS. Epochs count across both stages; every "
                                   "checkpoint is kept as OUT/ldm/RUN_NAME/epoch-<E>/ (ldm.pt is what `raymem sample` "
                                   "loads). Rerun with the same OUT and RUN_NAME to resume. Logs losses and sample "
                                   "grids to MLflow (MLFLOW_TRACKING_URI, else sqlite in OUT).")
    p.add_argument("--config", help="LDMTrainConfig YAML; flags override it")
    p.add_argument("--dataset", help="dataset URI")
    p.add_argument("--out", help="output root URI")
    p.add_argument("--run-name")
    p.add_argument("--preset", choices=["tiny", "small", "paper2d", "paper3d-ct", "paper3d-mri"])
    p.add_argument("--autoencoder-epochs", type=int)
    p.add_argument("--diffusion-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--split", choices=["train", "test"],
                   help="the split trained on (default train); test: the generator-null, the same LDM trained only "
                        "on held-out patients, whose samples are audited against the training set")
    p.add_argument("--train-size", type=int, help="nested subset size of the split (default: all)")
    p.add_argument("--augment", choices=["on", "off"], help="the paper's flips and small rotations (default off)")
    p.add_argument("--use-gpu", action="store_true")
    p.set_defaults(func=_train_ldm)

    p = sub.add_parser("sample", help="synthetic samples from a trained LDM (Ray Data actors)",
                       description="DDIM samples from any saved epoch of a train-ldm run, written as a dataset in the "
                                   "shard schema (split train, patient_id 'synthetic', each sample's seed in its "
                                   "source). RUN is the training run's folder URI, OUT/ldm/RUN_NAME as given to "
                                   "train-ldm.")
    p.add_argument("--run", help="training run folder URI: <out>/ldm/<run_name>")
    p.add_argument("--epoch", type=int, help="checkpoint epoch (default: the latest)")
    p.add_argument("--n", type=int, help="number of samples")
    p.add_argument("--out", help="output dataset URI (must not hold a dataset yet)")
    p.add_argument("--ddim-steps", type=int, help="DDIM steps (default 50)")
    p.add_argument("--seed", type=int, help="base seed (default 0)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-actors", type=int)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--config", help="SampleConfig YAML; flags override it")
    p.set_defaults(func=_sample)

    p = sub.add_parser("audit", help="embed dataset + synthetic images with a detector, then audit",
                       description="Embeds the dataset's train and val splits and the synthetic images with the "
                                   "detector (Ray Data actors), runs the exact audit, and writes metrics.json, "
                                   "matches.parquet and a self-contained report.html to OUT; one MLflow run. "
                                   "--synthetic may be a raymem dataset or a folder of images from any generator "
                                   "(ingested with the dataset's own shape and normalisation). Rerun the command "
                                   "with the same OUT after a failure, a kill or a success: the audit is recomputed "
                                   "and replaces what OUT held of the earlier one (MLflow run RUN_NAME is reopened; "
                                   "give other settings another RUN_NAME).")
    p.add_argument("--dataset", required=True, help="the training dataset URI (train and val splits are used)")
    p.add_argument("--synthetic", required=True, help="synthetic images: a dataset URI or a folder of image files")
    p.add_argument("--detector", required=True, help="detector checkpoint URI (detector.pt)")
    p.add_argument("--out", required=True, help="output folder URI")
    p.add_argument("--run-name", default="audit",
                   help="MLflow run name; a rerun into the same OUT recomputes the audit and reopens this run")
    _audit_options(p)
    p.set_defaults(func=_audit)

    p = sub.add_parser("filter", help="drop the synthetic samples an audit flagged as copies",
                       description="Writes the synthetic dataset without the samples flagged is_copy in "
                                   "AUDIT/matches.parquet, as a new committed dataset with the counts in its manifest.")
    p.add_argument("--audit", required=True, help="the audit's output folder URI")
    p.add_argument("--synthetic", required=True, help="the synthetic dataset URI that was audited")
    p.add_argument("--out", required=True, help="output dataset URI")
    p.set_defaults(func=_filter)

    p = sub.add_parser("audit-embeddings", help="memorization audit from train/val/synthetic embeddings",
                       description="Exact Pearson-correlation search of every synthetic embedding against every "
                                   "training embedding; threshold = P-th percentile of train->val nearest-neighbour "
                                   "correlations; writes metrics.json and matches.parquet to OUT.")
    p.add_argument("--train", required=True, help="training embeddings (Parquet URI: file or folder)")
    p.add_argument("--val", required=True, help="validation embeddings (patients never in training)")
    p.add_argument("--synthetic", required=True, help="the generator's own synthetic embeddings")
    p.add_argument("--test", help="evaluation embeddings: held-out patients in neither train nor val; every "
                                  "false-positive rate is measured on them (without: half of the val patients)")
    p.add_argument("--reference-ids", help="JSON list of the generator's training sample_ids (an LDM run's "
                                           "training_ids.json): the training set it is compared with")
    p.add_argument("--out", required=True, help="output folder URI")
    p.add_argument("--run-name", help="also log the audit to MLflow as this run (MLFLOW_TRACKING_URI, else sqlite in "
                                      "OUT): its figures and each phase's seconds (audit/phase_seconds/<phase>); "
                                      "-v prints the phases' seconds either way")
    _audit_options(p)
    p.set_defaults(func=_audit_embeddings)

    p = sub.add_parser("sweep", help="Ray Tune sweep over the memorization factors, tracked in MLflow",
                       description="Trains the study's data and copy detector once, then one LDM per grid point "
                                   "(Ray Train inside a Ray Tune trial), audits its checkpoints every AUDIT_EVERY "
                                   "diffusion epochs and logs a parent run with a child run per trial. Rerun the "
                                   "same command to resume. See jobs/configs/study-*.yaml.")
    p.add_argument("--config", required=True, help="study YAML (local path or s3://)")
    p.add_argument("--sweep", help="override the file's sweep name (same name: resume; new name: new sweep)")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("dashboard", help="plots and an HTML page of a sweep, from MLflow",
                       description="Memorization against each factor, and memorization, Frechet distance and "
                                   "validation loss against epochs, as PNGs and a self-contained index.html; also "
                                   "logged to the sweep's parent run.")
    p.add_argument("--experiment", required=True, help="the study (MLflow experiment) name")
    p.add_argument("--out", required=True, help="local output folder")
    p.add_argument("--sweep", help="the sweep name (default: the experiment's latest sweep)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.set_defaults(func=_dashboard)

    p = sub.add_parser("local-cluster", help="try it locally: Ray head, MLflow and S3 on 127.0.0.1, tiny pipeline",
                       description="Starts a Ray head (ray start --head), an MLflow server and an S3 endpoint (moto "
                                   "server) on 127.0.0.1, submits jobs/pipeline.py --config "
                                   "jobs/configs/tiny-xray2d.yaml with `ray job submit --working-dir .`, follows its "
                                   "log, prints where to look (dashboard, MLflow UI, bucket and outputs, how to "
                                   "rerun), then stops everything it started; Ctrl-C stops everything too. The S3 "
                                   "keys are in a credentials file the Ray head starts with, never in the job's "
                                   "runtime env. Needs the test extra (make setup).")
    p.add_argument("--out", default="local-cluster-out",
                   help="state folder: the MLflow store, the service logs and each job's log (default "
                        "local-cluster-out)")
    p.add_argument("--keep", action="store_true",
                   help="leave everything running after the job, until Ctrl-C, to browse the dashboard and MLflow")
    p.set_defaults(func=_local_cluster)
    return parser


# The options that take a URI, in every subcommand.
PATH_OPTIONS = ("src", "dst", "config", "dataset", "out", "data", "detector", "run", "synthetic", "null_synthetic",
                "audit", "train", "val", "test", "reference_ids", "labels")


def _absolute_paths(args: argparse.Namespace) -> None:
    """Make relative local paths absolute, once, before any stage runs: Ray workers do not share this process's
    working directory, and Ray Train takes a path without a scheme for a malformed URI."""
    from raymem import storage

    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, storage.absolute(value))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # force: main may run more than once in a process (tests); each run logs to the stderr it has now.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if args.verbose:
        logging.getLogger("raymem").setLevel(logging.DEBUG)
        os.environ[runtime.VERBOSE_ENV] = "1"  # Ray's progress bars and INFO logs too (raymem.runtime)
    _absolute_paths(args)
    try:
        return args.func(args)
    except config.ConfigError as err:
        print(f"raymem {args.command}: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from raymem.data.ingest import IngestError
        from raymem.data.shards import DatasetError
        from raymem.storage import StorageError, access_error

        # Errors a user can cause (bad input, missing files, unreachable storage, values the stages refuse) say what
        # to do in one line; -v shows the traceback.
        if args.verbose:
            raise
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            err = access_error(err)  # a filesystem call outside raymem.storage's own wrapping (pyarrow, Ray Data)
        if isinstance(err, (preflight.PreflightError, IngestError, DatasetError, StorageError, ValueError,
                            FileNotFoundError)):
            print(f"raymem {args.command}: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
