"""``make demo``: the whole study on the embedded default data (phantom patients), on one machine.

phantom X-rays written as real 16-bit PNG files -> ingest (Ray Data) -> copy detector (Ray Train) -> a tiny
latent diffusion model trained long on deliberately few images (Ray Train) -> synthetic samples (Ray Data) ->
the same LDM trained on held-out (test) patients, the generator null -> the exact audit of the LDM's own samples
against its own training images, planted copies scored apart -> report.html, an MLflow store and a printed
summary with 95 % intervals.
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

STAGES = ("data", "train-detector", "train-ldm", "sample", "train-null-ldm", "sample-null", "audit")
CONFIGS = Path(__file__).resolve().parent.parent / "jobs" / "configs"
DEMO_PSEUDONYM_KEY = "raymem-demo-phantoms"
SCALES = {  # --scale: (job config, phantom image side in pixels, default patients)
    "cpu": (CONFIGS / "demo-xray2d.yaml", 32, 200),
    "gpu": (CONFIGS / "demo-xray2d-gpu.yaml", 64, 2000),
    "smoke": (CONFIGS / "demo-xray2d-smoke.yaml", 32, 40),  # every stage, least work: checks the pipeline (CI)
}


def run(out: str, *, patients: int, images_per_patient: int, seed: int, scale: str = "cpu") -> None:
    out = str(Path(out).absolute())
    storage.delete(out)
    os.environ["RAYMEM_STORAGE_ROOT"] = out
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out}/mlflow.db"
    # Phantoms hold no identifiers, so a fixed key is safe; a random one (the default) would give new patient ids,
    # hence a new patient split and LDM training subset, in every run: one seed would not give one result.
    os.environ.setdefault("RAYMEM_PSEUDONYM_KEY", DEMO_PSEUDONYM_KEY)
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
    """What a person wants to read after the demo: data, detector accuracy, the generator's memorization with
    95 % intervals, every calibration's measured false-positive rates, the planted truth, where to look next."""
    from raymem.audit.report import with_interval

    paths = job.paths(out)
    manifest = shards.read_manifest(paths["dataset"])
    metrics = json.loads(storage.read_bytes(storage.join(paths["audit"], "metrics.json")))
    ci95 = metrics["ci95"]
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
        f"LDM       trained on {metrics['n_train']} images of {metrics['n_patients']} patients for "
        f"{job.ldm.get('diffusion_epochs')} diffusion epochs ({_diffusion_steps(job)} steps); its "
        f"{metrics['n_synthetic']} own samples audited against those images ({metrics['reference']['source']})",
    ]
    if "n_null" in metrics:
        lines.append(f"null      the same LDM trained on held-out (test) patients: its {metrics['n_null']} samples "
                     "measure false positives under the generator's own shift")
    lines += [
        f"threshold tau = {metrics['threshold_copies']:.4f} (calibration {metrics['calibration']}, "
        f"P{metrics['percentile']:g}); false-positive rates measured on {metrics['n_eval']} images of "
        f"{metrics['n_eval_patients']} {'test' if metrics['fpr_source'] == 'test' else 'held-out validation'} "
        "patients",
        f"copies    {metrics['n_copies']} of the LDM's {metrics['n_synthetic']} samples: "
        + with_interval(metrics["pct_copies"], ci95["pct_copies"]),
        f"memorized {metrics['n_memorized_train']} of its {metrics['n_train']} training images: "
        + with_interval(metrics["pct_memorized_train"], ci95["pct_memorized_train"])
        + f"; {metrics['n_memorized_patients']} of {metrics['n_patients']} patients: "
        + with_interval(metrics["pct_memorized_patients"], ci95["pct_memorized_patients"]),
        "calibrations (copies; false-positive rate of copies on test patients; of memorized images; "
        "null-generator samples flagged):",
    ]
    for name, figures in metrics["calibrations"].items():
        rates = [with_interval(figures[key], figures["ci95"][key], "{:.3f}", "")
                 for key in ("measured_fpr_copies", "measured_fpr_memorized", "generator_fpr_copies")
                 if key in figures]
        lines.append(f"  {name:<9} tau {figures['threshold_copies']:.4f}: copies "
                     + with_interval(figures["pct_copies"], figures["ci95"]["pct_copies"]) + "; FPR " + "; ".join(rates))
    planted = metrics.get("planted")
    if planted:
        lines.append(f"planted   (apart from the figures above) sensitivity "
                     + with_interval(planted["sensitivity"], planted["ci95"].get("sensitivity"), "{:.3f}", "")
                     + f" on {planted['n_copies']} known copies, specificity "
                     + with_interval(planted["specificity"], planted["ci95"].get("specificity"), "{:.3f}", "")
                     + f" on {planted['n_novel']} known novel images of held-out patients, ROC AUC "
                     + with_interval(planted["roc_auc"], planted["ci95"].get("roc_auc"), "{:.3f}", ""))
    heldout = metrics.get("detector_heldout")
    if heldout and "families" in heldout:
        lines.append("detector  on copies it never trained on, sensitivity at 95 % specificity: " + "; ".join(
            f"{name} " + with_interval(f["sensitivity_at_95_specificity"],
                                       f["ci95"].get("sensitivity_at_95_specificity"), "{:.2f}", "")
            for name, f in heldout["families"].items()))
    lines += [f"warning   {warning}" for warning in metrics["warnings"]]
    lines += ["", "look next:",
              f"  report    {storage.join(paths['audit'], 'report.html')}",
              f"  matches   {storage.join(paths['audit'], 'matches.parquet')}",
              f"  MLflow    mlflow ui --backend-store-uri sqlite:///{out}/mlflow.db   (then http://127.0.0.1:5000)"]
    return lines


def _diffusion_steps(job) -> int:
    """Optimisation steps of the diffusion stage (one worker): batches per pass x passes per epoch x epochs."""
    ldm = job.stage_config("train-ldm", root="/")
    return (ldm.train_size or 0) // ldm.batch_size * ldm.epoch_repeats * ldm.diffusion_epochs


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
                             "models, 2000 patients, GPU workers; smoke: every stage with the least work (about 2 "
                             "min; its figures mean nothing)")
    parser.add_argument("--patients", type=int, help="phantom patients (default: 200 cpu, 2000 gpu)")
    parser.add_argument("--images-per-patient", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="Ray's own progress bars and INFO logs too")
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[runtime.VERBOSE_ENV] = "1"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    run(args.out, patients=args.patients or SCALES[args.scale][2], images_per_patient=args.images_per_patient, seed=args.seed,
        scale=args.scale)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
