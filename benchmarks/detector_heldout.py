"""Copy-detector accuracy on copies it never trained on (issue 13): held-out copy families and the LDM's autoencoder.

The detector trains on positive pairs made by ``TRANSFORM_PRESETS`` transforms, and ``benchmarks/detector_accuracy.py``
scores it on copies made by the same family. This script scores it, and the raw-pixel baseline, on copies made by
families it never sees (``raymem.models.heldout_copies``: elastic deformation, resolution loss, local texture loss)
and by the round trip through a trained LDM autoencoder (what an LDM's copy of a training image looks like), beside the
training families, with ``raymem.audit.accuracy.heldout_copy_accuracy``: per family, sensitivity at 95 % specificity
(Wilson interval, and a bootstrap interval that also re-estimates the threshold) and ROC AUC (bootstrap interval).

Layout, as an audit sees it: phantom X-ray patients (32x32); the detector trains on every image of the training
patients (tiny preset, strong augmentation, patient-aware NT-Xent, as ``raymem train-detector`` trains on the train
split); the originals are one image each of the first ``--originals`` training patients, and the tiny LDM autoencoder
trains on those originals only (the generator's training set); the negatives are one image each of ``--negatives``
patients that neither model saw. Both models are trained here with the step functions the Ray Train loops call
(``raymem.models.detector.train_step``, ``raymem.models.ldm.autoencoder_step``) in plain loops: no Ray, so the script
also runs on a bare GPU machine.

    .venv/bin/python benchmarks/detector_heldout.py [--originals 100] [--negatives 150] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raymem.audit.accuracy import flatten_pixels, heldout_copy_accuracy, training_copy_family  # noqa: E402
from raymem.audit.statistics import BOOTSTRAP_DRAWS  # noqa: E402
from raymem.data import phantoms  # noqa: E402
from raymem.data.transforms import normalise_intensity  # noqa: E402
from raymem.models import ldm as core  # noqa: E402
from raymem.models.copy_transforms import TRANSFORM_PRESETS, random_transform  # noqa: E402
from raymem.models.detector import build_detector, cosine_lr, embed, train_step  # noqa: E402
from raymem.models.heldout_copies import (  # noqa: E402
    AUTOENCODER_FAMILY,
    HELDOUT_FAMILIES,
    autoencoder_round_trip,
    deterministic_family,
)

TRAINING_FAMILIES = ("copy", "copy_strong")
DETECTOR_LR = (1e-3, 5e-4)  # benchmarks/detector_accuracy.py's short CPU run (paper: 1e-4 -> 5e-5)
AUTOENCODER_LR = 1e-3  # the demo's
KL_WEIGHT = 1e-6  # LDMTrainConfig's default
VALUE_RANGE = (0.0, 1.0)  # X-rays after ingest's normalisation


def log(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)


def phantom_split(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Detector training images (all images of the training patients) with their patients, the originals (image 0 of
    the first ``originals`` training patients) and the negatives (image 0 of ``negatives`` unseen patients)."""
    images, patients, image_index = [], [], []
    for image in phantoms.generate("xray2d", patients=args.train_patients + args.negatives,
                                   images_per_patient=args.images_per_patient, size=args.size, seed=args.seed):
        images.append(normalise_intensity(image.array, image.modality)[None])
        patients.append(image.patient_index)
        image_index.append(image.image_index)
    images, patients, image_index = torch.from_numpy(np.stack(images)), np.array(patients), np.array(image_index)
    is_train = patients < args.train_patients
    first = image_index == 0
    return {
        "train_images": images[is_train], "train_patients": torch.from_numpy(patients[is_train]),
        "originals": images[first & (patients < args.originals)],
        "negatives": images[first & ~is_train],
    }


def train_detector(images: torch.Tensor, patients: torch.Tensor, args: argparse.Namespace) -> torch.nn.Module:
    """The tiny detector, ``args.detector_epochs`` epochs of ``train_step`` as raymem/train/detector.py runs them."""
    torch.manual_seed(args.seed)
    model = build_detector("tiny", spatial_dims=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=DETECTOR_LR[0])
    generator = torch.Generator().manual_seed(args.seed)
    augment = functools.partial(random_transform, bounds=TRANSFORM_PRESETS["strong"], generator=generator)
    for epoch in range(args.detector_epochs):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(epoch, args.detector_epochs, *DETECTOR_LR)
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            rows = order[start:start + args.batch_size]
            train_step(model, optimizer, images[rows], patients[rows], augment)
    return model.eval()


def train_autoencoder(images: torch.Tensor, args: argparse.Namespace,
                      started: float) -> dict[int, core.LatentDiffusion]:
    """The tiny LDM's autoencoder trained with ``autoencoder_step`` on ``images`` only, as it was after each of
    ``args.autoencoder_snapshots`` steps and after ``args.autoencoder_steps``: {steps: model}."""
    torch.manual_seed(args.seed)
    ldm = core.build_ldm("tiny", spatial_dims=2)
    optimizer = torch.optim.Adam(ldm.autoencoder.parameters(), lr=AUTOENCODER_LR)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.zeros(0, dtype=torch.int64)
    snapshots = {}
    for step in range(1, args.autoencoder_steps + 1):
        if len(order) < args.autoencoder_batch:
            order = torch.cat([order, torch.randperm(len(images), generator=generator)])
        rows, order = order[:args.autoencoder_batch], order[args.autoencoder_batch:]
        terms = core.autoencoder_step(ldm.autoencoder, optimizer, images[rows], kl_weight=KL_WEIGHT)
        if step % 100 == 0:
            log(started, f"autoencoder step {step}: L1 {terms['recon']:.4f}")
        if step in args.autoencoder_snapshots or step == args.autoencoder_steps:
            snapshot = copy.deepcopy(ldm)
            snapshot.latent_scale.fill_(core.latent_scale_from_moments(core.latent_moments(snapshot, images)))
            snapshots[step] = snapshot.eval()
    return snapshots


def interval(figures: dict[str, Any], name: str, *also: str) -> str:
    """"0.45 (0.35-0.55)": the figure and its intervals, ``name``'s own and then each of ``also``, in ci95."""
    bounds = "; ".join("{:.2f}-{:.2f}".format(*figures["ci95"][key]) for key in (name, *also))
    return f"{figures[name]:.2f} ({bounds})"


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    embeddings = list(results)
    lines = ["| family | kind | " + " | ".join(f"{e} sens. at 95 % spec. (Wilson; bootstrap) | {e} AUC (bootstrap)"
                                               for e in embeddings) + " |",
             "|---|---|" + "---|---|" * len(embeddings)]
    for family in results[embeddings[0]]["families"]:
        kind = "training" if family in TRAINING_FAMILIES else "held-out"
        cells = []
        for embedding in embeddings:
            figures = results[embedding]["families"][family]
            cells += [interval(figures, "sensitivity_at_95_specificity", "sensitivity_at_95_specificity_bootstrap"),
                      interval(figures, "roc_auc")]
        lines.append(f"| {family} | {kind} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-patients", type=int, default=225, help="the detector's training patients")
    parser.add_argument("--images-per-patient", type=int, default=4)
    parser.add_argument("--originals", type=int, default=100,
                        help="training patients whose first image is an original (the autoencoder's training set)")
    parser.add_argument("--negatives", type=int, default=150, help="unseen patients, one image each")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--detector-epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--autoencoder-steps", type=int, default=600)
    parser.add_argument("--autoencoder-batch", type=int, default=16)
    parser.add_argument("--autoencoder-snapshots", type=int, nargs="*", default=[150],
                        help="also score the autoencoder as it was after these steps (a less trained generator)")
    parser.add_argument("--n-bootstrap", type=int, default=BOOTSTRAP_DRAWS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; one, as tests/unit/test_ldm.py found two slower on a loaded 2-core box")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the figures as JSON here too")
    args = parser.parse_args()
    if args.originals > args.train_patients:
        parser.error("--originals must not exceed --train-patients: the originals are training patients' images")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = phantom_split(args)
    log(started, f"phantoms: {len(data['train_images'])} detector training images, {len(data['originals'])} "
                 f"originals, {len(data['negatives'])} negatives")
    detector = train_detector(data["train_images"], data["train_patients"], args)
    detector_s = time.perf_counter() - started
    log(started, "detector trained")
    autoencoders = train_autoencoder(data["originals"], args, started)
    autoencoder_s = time.perf_counter() - started - detector_s
    round_trips = {steps: autoencoder_round_trip(ldm, value_range=VALUE_RANGE) for steps, ldm in autoencoders.items()}
    reconstruction_l1 = {steps: {role: float((round_trip(data[role]) - data[role]).abs().mean())
                                 for role in ("originals", "negatives")} for steps, round_trip in round_trips.items()}
    log(started, f"autoencoder trained; reconstruction L1 by steps {reconstruction_l1}")
    families = {**{level: training_copy_family(level) for level in TRAINING_FAMILIES}, **HELDOUT_FAMILIES}
    families |= {f"{AUTOENCODER_FAMILY}_{steps}_steps": deterministic_family(round_trips[steps])
                 for steps in sorted(round_trips) if steps != args.autoencoder_steps}
    embedders = {"detector": functools.partial(embed, detector, batch_size=256), "raw_pixel": flatten_pixels}
    results = {name: heldout_copy_accuracy(embed_fn, data["originals"], data["negatives"], families,
                                           autoencoder_round_trip=round_trips[args.autoencoder_steps],
                                           seed=args.seed, n_bootstrap=args.n_bootstrap)
               for name, embed_fn in embedders.items()}
    seconds = time.perf_counter() - started
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} "
          f"thread(s); {len(data['train_images'])} detector training images of {args.train_patients} patients, "
          f"{args.detector_epochs} epochs ({detector_s:.0f} s); autoencoder {args.autoencoder_steps} steps on "
          f"{len(data['originals'])} originals ({autoencoder_s:.0f} s), reconstruction L1 (originals, negatives) "
          + ", ".join(f"after {steps} steps {l1['originals']:.4f}, {l1['negatives']:.4f}"
                      for steps, l1 in reconstruction_l1.items())
          + f"; {len(data['negatives'])} negatives; {seconds:.0f} s in all\n")
    print("\n".join(table(results)))
    print(f"\n{AUTOENCODER_FAMILY}: the tiny LDM autoencoder's round trip after {args.autoencoder_steps} steps; "
          f"ci_method: {results['detector']['ci_method']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"seconds": seconds, "args": vars(args), "reconstruction_l1":
                                              reconstruction_l1, "results": results}, indent=2))


if __name__ == "__main__":
    main()
