"""Does each preset's diffusion UNet train at a given learning rate? (issue 14: the model-size factor)

A factor study compares model sizes at one ``lr_diffusion``. A rate that suits a small UNet can leave a large one
predicting about zero noise (a diffusion loss near 1), and its low memorization then says the model failed to train,
not that larger models memorize less (raymem.audit.verdicts marks such a verdict "confounded"). This script measures,
for each preset and each learning rate, the fixed-batch diffusion loss (``fixed_diffusion_loss``: evenly spaced
timesteps, seeded noise) on the training images as the UNet trains, the way a study trial trains it: the same
phantom X-rays (32 px), batch 8 of a small training set, Adam, and latents from that preset's own autoencoder, trained
first for ``--autoencoder-steps`` steps and shared by every learning rate. Every learning rate starts from the same
UNet initialisation and draws the same batches, noise and timesteps, so the rates differ in nothing else.

A run counts as trained when its last loss is below raymem.audit.verdicts.UNTRAINED_LOSS (0.5: predicting zero noise
scores 1). Prints a table, writes the curves as JSON (--out) and a plot (--plot).

    .venv/bin/python benchmarks/diffusion_lr.py [--presets tiny small paper2d] [--lrs 2e-3 1e-4] [--steps 200]
        [--train-images 16] [--autoencoder-steps 100] [--threads 2] [--out lr.json] [--plot lr.png]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from raymem import config
from raymem.audit.verdicts import UNTRAINED_LOSS
from raymem.data import shards
from raymem.data.ingest import phantom_dataset
from raymem.models import ldm as core

BATCH = 8
SIZE = 32


def training_images(count: int, root: str) -> torch.Tensor:
    """``count`` phantom X-rays (1, 32, 32), normalised as the ingest normalises them, one per patient."""
    dataset = f"{root}/dataset"
    phantom_dataset(dataset, "xray2d", patients=count, images_per_patient=1, size=SIZE, seed=0,
                    cfg=config.validate(config.IngestConfig, {"val_fraction": 0.0, "test_fraction": 0.0}))
    return torch.from_numpy(shards.images_of(shards.load_split(dataset, "train", ["image"])).astype("float32"))


def batches(count: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The image indices of each step: epochs of shuffled batches of 8 (drawn from their own seed)."""
    generator, order = torch.Generator().manual_seed(seed), []
    while len(order) < steps:
        permutation = torch.randperm(count, generator=generator)
        order += [permutation[start:start + BATCH] for start in range(0, count - BATCH + 1, BATCH)]
    return order[:steps]


def prepared_ldm(preset: str, images: torch.Tensor, steps: int) -> core.LatentDiffusion:
    """The preset's LDM (seed 0) with its autoencoder trained ``steps`` steps on ``images`` and its latent scale set."""
    torch.manual_seed(0)
    ldm = core.build_ldm(preset, 2)
    optimizer = torch.optim.Adam(ldm.autoencoder.parameters(), lr=1e-3)
    for indices in batches(len(images), steps, seed=1):
        core.autoencoder_step(ldm.autoencoder, optimizer, images[indices], kl_weight=1e-6)
    ldm.latent_scale.fill_(core.latent_scale_from_moments(core.latent_moments(ldm, images)))
    return ldm


def loss_curve(ldm: core.LatentDiffusion, images: torch.Tensor, lr: float, steps: int, every: int
               ) -> list[tuple[int, float]]:
    """(step, fixed-batch diffusion loss) every ``every`` steps of training a copy of the UNet at ``lr``."""
    trial = copy.deepcopy(ldm)
    optimizer = torch.optim.Adam(trial.unet.parameters(), lr=lr)
    scheduler, generator = core.noise_scheduler(), torch.Generator().manual_seed(2)
    latents = trial.encode(images)
    curve = [(0, core.fixed_diffusion_loss(trial, scheduler, images))]
    for step, indices in enumerate(batches(len(images), steps, seed=3), start=1):
        core.diffusion_step(trial.unet, optimizer, scheduler, latents[indices], generator)
        if step % every == 0 or step == steps:
            curve.append((step, core.fixed_diffusion_loss(trial, scheduler, images)))
    return curve


def plot(results: list[dict], path: str) -> None:
    """One panel per preset, one line per learning rate (the same colour for a rate in every panel)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    presets = list(dict.fromkeys(result["preset"] for result in results))
    rates = sorted({result["lr"] for result in results}, reverse=True)
    colours = colormaps["viridis"].resampled(max(len(rates), 2))
    figure = Figure(figsize=(4 * len(presets), 4))
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(presets), sharey=True, squeeze=False)[0]
    for axes, preset in zip(panels, presets):
        for result in (result for result in results if result["preset"] == preset):
            steps, losses = zip(*result["curve"])
            axes.plot(steps, losses, marker="o", markersize=3, color=colours(rates.index(result["lr"])),
                      label=f"lr {result['lr']:g}")
            parameters_m = result["parameters_m"]
        axes.axhline(UNTRAINED_LOSS, color="grey", linestyle=":", label=f"untrained at or above {UNTRAINED_LOSS}")
        axes.set(title=f"{preset} UNet ({parameters_m:.1f} M parameters)", xlabel="UNet training steps (batch 8)",
                 ylim=(0, 1.1))
    panels[0].set_ylabel("fixed-batch diffusion loss, training images\n(predicting zero noise scores 1)")
    panels[-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "paper2d"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[2e-3, 1e-4])
    parser.add_argument("--steps", type=int, default=200, help="UNet steps per learning rate")
    parser.add_argument("--every", type=int, default=20, help="steps between loss measurements")
    parser.add_argument("--train-images", type=int, default=16, help="the training set (a study's train_size)")
    parser.add_argument("--autoencoder-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the curves as JSON here")
    parser.add_argument("--plot", help="write the loss curves as a PNG here")
    args = parser.parse_args()
    if args.train_images < BATCH:
        parser.error(f"--train-images must be at least the batch size {BATCH}")
    torch.set_num_threads(args.threads)

    import tempfile

    with tempfile.TemporaryDirectory() as root:
        images = training_images(args.train_images, root)
    results = []
    print(f"{'preset':8} {'params':>8} {'lr':>8} {'loss at 0':>10} {'lowest':>8} {'last':>8} {'s/step':>7}  trained")
    for preset in args.presets:
        ldm = prepared_ldm(preset, images, args.autoencoder_steps)
        parameters_m = sum(p.numel() for p in ldm.unet.parameters()) / 1e6
        for lr in args.lrs:
            started = time.perf_counter()
            curve = loss_curve(ldm, images, lr, args.steps, args.every)
            seconds_per_step = (time.perf_counter() - started) / args.steps
            last = curve[-1][1]
            result = {"preset": preset, "parameters_m": parameters_m, "lr": lr, "curve": curve, "last_loss": last,
                      "lowest_loss": min(loss for _, loss in curve), "trained": last < UNTRAINED_LOSS,
                      "seconds_per_step": seconds_per_step}
            results.append(result)
            print(f"{preset:8} {parameters_m:7.1f}M {lr:8.0e} {curve[0][1]:10.3f} {result['lowest_loss']:8.3f} "
                  f"{last:8.3f} {seconds_per_step:7.2f}  {'yes' if result['trained'] else 'NO'}", flush=True)
    summary = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
               "train_images": args.train_images, "batch": BATCH, "size": SIZE, "steps": args.steps,
               "autoencoder_steps": args.autoencoder_steps, "untrained_loss": UNTRAINED_LOSS,
               "loss_at_zero_prediction": 1.0, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if args.plot:
        plot(results, args.plot)
    if not np.isfinite([result["last_loss"] for result in results]).all():
        raise SystemExit("a loss is not finite")


if __name__ == "__main__":
    main()
