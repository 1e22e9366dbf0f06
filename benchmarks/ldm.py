"""LDM throughput on this machine (issue 3): the Ray Train loop against a plain single-process loop, and sampling.

Both training loops run the same tiny model, batch size and torch threads on the same phantom dataset in the same
process run; the Ray figure is the worker's own images/s over its training batches (data streaming included,
start-up excluded). Each figure is the median over epochs after the first (warm-up) of each stage, and the plain loop
runs once before and once after the Ray run, so load from other processes drifting during the run weighs on both
sides alike. An epoch holds enough batches (--patients) that Ray Data's per-epoch pipeline start is amortised as in a
real run rather than dominating a sub-second epoch; its wait for each epoch's first batch is shown, and the Ray
figure is also given without it (the steady-state step loop). Overhead = plain / Ray - 1.
Sampling: ``raymem sample`` end to end (one CPU actor, start-up included) against ``sample_images`` in-process.

    .venv/bin/python benchmarks/ldm.py [--epochs 4] [--patients 160] [--threads 1] [--samples 32] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from raymem import config, runtime
from raymem.data import shards
from raymem.data.ingest import phantom_dataset
from raymem.generate import sample_run
from raymem.models import ldm as core
from raymem.train.ldm import train_ldm

BATCH = 8


def _plain_epoch_images_per_s(images: torch.Tensor, stage: str, epochs: int) -> list[float]:
    """Images/s of each epoch after the first, the Ray loop's steps on in-memory batches (last partial one dropped)."""
    torch.manual_seed(0)
    model = core.build_ldm("tiny", 2)
    optimizer = torch.optim.Adam(model.autoencoder.parameters() if stage == "autoencoder" else model.unet.parameters())
    scheduler, generator = core.noise_scheduler(), torch.Generator().manual_seed(0)
    rates = []
    for _ in range(epochs):
        started, seen = time.perf_counter(), 0
        for batch in images.split(BATCH):
            if len(batch) < BATCH:
                continue
            if stage == "autoencoder":
                core.autoencoder_step(model.autoencoder, optimizer, batch, kl_weight=1e-6)
            else:
                core.diffusion_step(model.unet, optimizer, scheduler, model.encode(batch), generator)
            seen += len(batch)
        rates.append(seen / (time.perf_counter() - started))
    return rates[1:]


def _ray_epoch_metric(out: str, key: str) -> list[float]:
    """The Ray worker's logged metric (images/s, first-batch wait) of each epoch after the first of the stage."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{Path(out).absolute()}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("raymem").experiment_id])[0]
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)][1:]


def _range(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per stage (the first is warm-up)")
    parser.add_argument("--patients", type=int, default=160, help="2 images each; 90%% train")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of both loops (the Ray worker's CPUs); on 2 cores a second thread gains "
                             "the plain loop nothing and the Ray worker loses ~40%% to Ray's own processes (measured)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runtime.init_ray()
    with tempfile.TemporaryDirectory() as root:
        dataset = f"{root}/ds"
        phantom_dataset(dataset, "xray2d", patients=args.patients, images_per_patient=2, size=32, seed=0,
                        cfg=config.validate(config.IngestConfig, {"val_fraction": 0.1, "test_fraction": 0.0}))
        images = torch.from_numpy(shards.images_of(shards.load_split(dataset, "train", ["image"])).astype("float32"))
        out = f"{root}/out"
        plain_before = {stage: _plain_epoch_images_per_s(images, stage, args.epochs)
                        for stage in ("autoencoder", "diffusion")}
        trained = train_ldm(config.validate(config.LDMTrainConfig, {
            "dataset": dataset, "out": out, "preset": "tiny", "autoencoder_epochs": args.epochs,
            "diffusion_epochs": args.epochs, "batch_size": BATCH, "num_workers": 1, "cpus_per_worker": args.threads,
            "grid_every": 10_000, "checkpoint_every": 10_000, "eval_max_images": 8}))
        rows = []
        figures: dict[str, dict[str, float]] = {}  # --out: the table's numbers
        for stage in ("autoencoder", "diffusion"):
            ray_epochs = _ray_epoch_metric(out, f"{stage}.images_per_s")
            first_batch_s = _ray_epoch_metric(out, f"{stage}.first_batch_s")
            seen = len(images) // BATCH * BATCH
            ray_steady = [seen / (seen / ips - wait_s) for ips, wait_s in zip(ray_epochs, first_batch_s)]
            plain_epochs = plain_before[stage] + _plain_epoch_images_per_s(images, stage, args.epochs)
            plain_ips = statistics.median(plain_epochs)
            figures[stage] = {"ray_images_per_s": statistics.median(ray_epochs),
                              "ray_images_per_s_after_first_batch": statistics.median(ray_steady),
                              "plain_images_per_s": plain_ips, "first_batch_s": statistics.median(first_batch_s),
                              "ray_epochs": len(ray_epochs), "plain_epochs": len(plain_epochs)}
            for name, ray_values in (("", ray_epochs), (", after the first batch", ray_steady)):
                ray_ips = statistics.median(ray_values)
                rows.append((f"train {stage}{name} (images/s; epochs' range)", f"{ray_ips:.1f} ({_range(ray_values)})",
                             f"{plain_ips:.1f} ({_range(plain_epochs)})", f"{plain_ips / ray_ips - 1:+.1%}"))
            rows.append((f"train {stage}: wait for an epoch's first batch (s)",
                         f"{statistics.median(first_batch_s):.2f}", "0", ""))
        started = time.perf_counter()
        sample_run(config.validate(config.SampleConfig, {"run": trained["run"], "n": args.samples,
                                                         "out": f"{root}/syn", "ddim_steps": 50, "num_actors": 1}))
        ray_sps = args.samples / (time.perf_counter() - started)
        model, _ = core.load_ldm(Path(root, "out", "ldm", "ldm",
                                      f"epoch-{2 * args.epochs - 1:05d}", "ldm.pt").read_bytes())
        started = time.perf_counter()
        for first in range(0, args.samples, 16):
            core.sample_images(model, (32, 32), range(first, min(first + 16, args.samples)), ddim_steps=50)
        plain_sps = args.samples / (time.perf_counter() - started)
        figures["sample"] = {"ray_samples_per_s": ray_sps, "plain_samples_per_s": plain_sps, "samples": args.samples}
        rows.append(("sample, 50 DDIM steps (samples/s)", f"{ray_sps:.1f}", f"{plain_sps:.1f}",
                     f"{plain_sps / ray_sps - 1:+.1%}"))
    print(f"tiny preset, 32x32 phantoms, {len(images)} training images, batch {BATCH}, {args.threads} torch threads, "
          f"1 Ray worker / actor, median images/s of epochs 2-{args.epochs} per stage\n")
    print("| measure | Ray | plain PyTorch | overhead |\n|---|---|---|---|")
    for name, ray_value, plain_value, overhead in rows:
        print(f"| {name} | {ray_value} | {plain_value} | {overhead} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"training_images": len(images), "batch": BATCH, "threads": args.threads,
                                              "epochs": args.epochs, **figures}, indent=2))


if __name__ == "__main__":
    main()
