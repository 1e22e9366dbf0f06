"""Copy-detector accuracy on phantom data (issue 4): the Ray-trained detector against its two baselines.

Trains the tiny 2D detector with Ray Train on phantom X-rays (patients never seen at evaluation are in the val
split), then the training loop's last epoch scores, on held-out patients, copy retrieval under the "copy" and
"copy_strong" transforms (top-1 and ROC AUC) and re-identification AUC for: the detector, raw-pixel Pearson
correlation, and a randomly initialised encoder of the same architecture. The same figures are in MLflow.

    .venv/bin/python benchmarks/detector_accuracy.py [--epochs 12] [--patients 300] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from raymem import config, runtime
from raymem.data.ingest import phantom_dataset
from raymem.train.detector import train_detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--images-per-patient", type=int, default=4)
    parser.add_argument("--augmentation", choices=["paper", "strong"], default="strong")
    parser.add_argument("--out", help="write the figures as JSON here too")
    args = parser.parse_args()
    runtime.init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = str(Path(tmp) / "phantoms")
        phantom_dataset(dataset, "xray2d", patients=args.patients, images_per_patient=args.images_per_patient,
                        size=32, seed=0, cfg=config.validate(config.IngestConfig, {"val_fraction": 0.25,
                                                                                   "test_fraction": 0.0}))
        cfg = config.validate(config.DetectorTrainConfig, {
            "dataset": dataset, "out": str(Path(tmp) / "out"), "preset": "tiny", "epochs": args.epochs,
            "batch_size": 64, "lr_initial": 1e-3, "lr_final": 5e-4, "augmentation": args.augmentation,
            "num_workers": 2, "eval_every": args.epochs, "eval_max_images": 400})
        started = time.perf_counter()
        result = train_detector(cfg)
        seconds = time.perf_counter() - started
    metrics = result["metrics"]
    rows = ["copy_top1", "copy_auc", "copy_strong_top1", "copy_strong_auc", "reid_auc"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.epochs} epochs, {args.patients} patients x "
          f"{args.images_per_patient} images, 32x32, augmentation {args.augmentation}; {seconds:.0f} s\n")
    print("| embedding | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows))
    for name in ("detector", "raw_pixel", "random_encoder"):
        print(f"| {name} | " + " | ".join(f"{metrics[f'{name}/{r}']:.3f}" for r in rows) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"seconds": seconds, "metrics": metrics, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
