"""``make demo``: the whole study on the embedded default data (phantom patients), on one machine.

phantom X-rays written as real 16-bit PNG files -> ingest (Ray Data) -> copy detector (Ray Train) -> a tiny
latent diffusion model trained long on deliberately few images (Ray Train) -> synthetic samples (Ray Data) ->
the exact audit with planted copies -> report.html, an MLflow store and a printed summary.
It runs the same stages as ``jobs/pipeline.py`` with ``jobs/configs/demo-xray2d.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from raymem import runtime, storage
from raymem.data import phantoms, shards
from raymem.jobconfig import load_job, run_stage

STAGES = ("data", "train-detector", "train-ldm", "sample", "audit")
CONFIGS = Path(__file__).resolve().parent.parent / "jobs" / "configs"
SCALES = {  # --scale: (job config, phantom image side in pixels, default patients)
    "cpu": (CONFIGS / "demo-xray2d.yaml", 32, 200),
    "gpu": (CONFIGS / "demo-xray2d-gpu.yaml", 64, 2000),
}


def run(out: str, *, patients: int, images_per_patient: int, seed: int, scale: str = "cpu") -> None:
    out = str(Path(out).absolute())
    storage.delete(out)
    os.environ["RAYMEM_STORAGE_ROOT"] = out
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out}/mlflow.db"
    started = time.perf_counter()
    config_path, size, _ = SCALES[scale]
    job = load_job(str(config_path))
    print(f"== phantoms: {patients} patients x {images_per_patient} X-rays -> PNG files")
    phantoms.write_files(storage.join(out, "raw", "xray2d"), "xray2d", patients=patients,
                         images_per_patient=images_per_patient, size=size, seed=seed, file_format="png")
    runtime.init_ray()
    results = {}
    for stage in STAGES:
        print(f"== {stage}", flush=True)
        stage_started = time.perf_counter()
        results[stage] = run_stage(job, stage)
        print(f"   {stage} took {time.perf_counter() - stage_started:.0f} s", flush=True)
    print("\n".join(summary_lines(job, out, time.perf_counter() - started)))


def summary_lines(job, out: str, seconds: float) -> list[str]:
    """What a person wants to read after the demo: data, detector accuracy, memorization, where to look next."""
    paths = job.paths(out)
    manifest = shards.read_manifest(paths["dataset"])
    metrics = json.loads(storage.read_bytes(storage.join(paths["audit"], "metrics.json")))
    detector = _last_metrics(f"detector/{job.run_name}")
    lines = ["", "=" * 72, f"raymem demo finished in {seconds / 60:.1f} min", "=" * 72,
             f"data      {manifest['found']} PNG files found, {manifest['ingested']} ingested, "
             f"{manifest['quarantined']} set aside; "
             + ", ".join(f"{s} {v['images']} images / {v['patients']} patients" for s, v in manifest["splits"].items()
                         if v["images"])]
    if detector:
        lines.append("detector  strong-copy AUC {:.3f} (raw pixels {:.3f}, random encoder {:.3f}); "
                     "re-identification AUC {:.3f}".format(
                         detector.get("detector.copy_strong_auc", float("nan")),
                         detector.get("raw_pixel.copy_strong_auc", float("nan")),
                         detector.get("random_encoder.copy_strong_auc", float("nan")),
                         detector.get("detector.reid_auc", float("nan"))))
    lines += [
        f"LDM       trained on {job.ldm.get('train_size')} images for {job.ldm.get('diffusion_epochs')} diffusion "
        f"epochs ({_diffusion_steps(job)} steps); {metrics['n_synthetic']} synthetic samples audited (incl. "
        f"{job.audit.plant_copies} planted copies and {job.audit.plant_copies} planted novel images)",
        f"threshold tau = {metrics['threshold']:.4f} (P{metrics['percentile']:g} of train->val nearest neighbours, "
        f"calibration {metrics['calibration']})",
        f"memorized {metrics['n_memorized_train']} of {metrics['n_train']} training images "
        f"({metrics['pct_memorized_train']:.1f} %), {metrics['pct_memorized_patients']:.1f} % of patients",
        f"copies    {metrics['n_copies']} of {metrics['n_synthetic']} synthetic samples ({metrics['pct_copies']:.1f} %)",
    ]
    for name, figures in metrics.get("calibrations", {}).items():
        lines.append(f"  {name:<8} copies {figures['pct_copies']:.1f} %, memorized {figures['pct_memorized_train']:.1f} %,"
                     f" measured false-positive rate on held-out patients {figures['measured_fpr_copies']:.3f}")
    lines += _generated_copy_lines(paths)
    if "sensitivity" in metrics:
        lines.append(f"planted   sensitivity {metrics['sensitivity']:.3f} on {metrics['n_positive']} known copies, "
                     f"specificity {metrics['specificity']:.3f} on {metrics['n_negative']} known novel images "
                     f"(held-out patients, same transforms), ROC AUC {metrics['roc_auc']:.3f}")
    lines += ["", "look next:",
              f"  report    {storage.join(paths['audit'], 'report.html')}",
              f"  matches   {storage.join(paths['audit'], 'matches.parquet')}",
              f"  MLflow    mlflow ui --backend-store-uri sqlite:///{out}/mlflow.db   (then http://127.0.0.1:5000)"]
    return lines


def _diffusion_steps(job) -> int:
    """Optimisation steps of the diffusion stage (one worker): batches per pass x passes per epoch x epochs."""
    ldm = job.stage_config("train-ldm", root="/")
    return (ldm.train_size or 0) // ldm.batch_size * ldm.epoch_repeats * ldm.diffusion_epochs


def _generated_copy_lines(paths: dict[str, str]) -> list[str]:
    """The LDM's own copies (planted copies left out), and how many of the images it trained on it gives back."""
    import io

    import pyarrow.parquet as pq

    from raymem.audit.images import PLANTED
    from raymem.train.ldm import TRAINING_IDS_FILE

    matches = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(paths["audit"], "matches.parquet"))),
                            columns=["kind", "sample_id", "is_copy", "neighbour_ids"]).to_pylist()
    generated = [row for row in matches if row["kind"] == "synthetic" and not row["sample_id"].startswith(PLANTED)]
    copies = [row for row in generated if row["is_copy"]]
    lines = [f"generated {len(copies)} of the LDM's {len(generated)} own samples are copies of training images "
             f"({100 * len(copies) / max(1, len(generated)):.1f} %)"]
    ids_uri = storage.join(paths["ldm_run"], TRAINING_IDS_FILE)
    if storage.exists(ids_uri):
        seen = set(json.loads(storage.read_bytes(ids_uri)))
        copied = {row["neighbour_ids"][0] for row in copies} & seen
        lines.append(f"          they copy {len(copied)} of the {len(seen)} images it trained on "
                     f"({100 * len(copied) / len(seen):.1f} %)")
    return lines


def _last_metrics(run_key: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from raymem import tracking

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    for experiment in client.search_experiments():
        found = tracking.find_run(client, experiment.experiment_id, run_key)
        if found is not None:
            return dict(found.data.metrics)
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raymem.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-out", help="output folder (replaced)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                        help="cpu: 32x32, tiny models, 200 patients (minutes on 2 cores); gpu: 64x64, larger "
                             "models, 2000 patients, GPU workers")
    parser.add_argument("--patients", type=int, help="phantom patients (default: 200 cpu, 2000 gpu)")
    parser.add_argument("--images-per-patient", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run(args.out, patients=args.patients or SCALES[args.scale][2], images_per_patient=args.images_per_patient, seed=args.seed,
        scale=args.scale)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
