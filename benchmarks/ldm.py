"""LDM throughput on this machine (issue 3): the Ray Train loop against a plain single-process loop, and sampling.

Both training loops run the same tiny model, batch size and torch threads on the same phantom dataset in the same
process run; the Ray figure is the worker's own images/s over its training batches (data streaming included,
start-up excluded; the first epoch of each stage is warm-up and skipped). Overhead = plain / Ray - 1.
Sampling: ``raymem sample`` end to end (one CPU actor, start-up included) against ``sample_images`` in-process.

    .venv/bin/python benchmarks/ldm.py [--epochs 4] [--samples 32]
"""

from __future__ import annotations

import argparse
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

THREADS = 2
BATCH = 8


def _plain_images_per_s(images: torch.Tensor, stage: str, epochs: int) -> float:
    torch.manual_seed(0)
    model = core.build_ldm("tiny", 2)
    optimizer = torch.optim.Adam(model.autoencoder.parameters() if stage == "autoencoder" else model.unet.parameters())
    scheduler, generator = core.noise_scheduler(), torch.Generator().manual_seed(0)
    seen, started = 0, 0.0
    for epoch in range(epochs):
        if epoch == 1:
            seen, started = 0, time.perf_counter()
        for batch in images.split(BATCH):
            if len(batch) < BATCH:
                continue
            if stage == "autoencoder":
                core.autoencoder_step(model.autoencoder, optimizer, batch, kl_weight=1e-6)
            else:
                core.diffusion_step(model.unet, optimizer, scheduler, model.encode(batch), generator)
            seen += len(batch)
    return seen / (time.perf_counter() - started)


def _ray_images_per_s(out: str, key: str) -> float:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{Path(out).absolute()}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("raymem").experiment_id])[0]
    values = [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)][1:]
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per stage (the first is warm-up)")
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    runtime.init_ray()
    with tempfile.TemporaryDirectory() as root:
        dataset = f"{root}/ds"
        phantom_dataset(dataset, "xray2d", patients=40, images_per_patient=2, size=32, seed=0,
                        cfg=config.validate(config.IngestConfig, {"val_fraction": 0.1, "test_fraction": 0.0}))
        images = torch.from_numpy(shards.images_of(shards.load_split(dataset, "train", ["image"])).astype("float32"))
        out = f"{root}/out"
        trained = train_ldm(config.validate(config.LDMTrainConfig, {
            "dataset": dataset, "out": out, "preset": "tiny", "autoencoder_epochs": args.epochs,
            "diffusion_epochs": args.epochs, "batch_size": BATCH, "num_workers": 1, "cpus_per_worker": THREADS,
            "grid_every": 10_000, "checkpoint_every": 10_000, "eval_max_images": 8}))
        rows = []
        for stage in ("autoencoder", "diffusion"):
            ray_ips = _ray_images_per_s(out, f"{stage}.images_per_s")
            plain_ips = _plain_images_per_s(images, stage, args.epochs)
            rows.append((f"train {stage} (images/s)", ray_ips, plain_ips, f"{plain_ips / ray_ips - 1:+.1%}"))
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
        rows.append(("sample, 50 DDIM steps (samples/s)", ray_sps, plain_sps, f"{plain_sps / ray_sps - 1:+.1%}"))
    print(f"tiny preset, 32x32 phantoms, batch {BATCH}, {THREADS} torch threads, 1 Ray worker / actor\n")
    print("| measure | Ray | plain PyTorch | overhead |\n|---|---|---|---|")
    for name, ray_value, plain_value, overhead in rows:
        print(f"| {name} | {ray_value:.1f} | {plain_value:.1f} | {overhead} |")


if __name__ == "__main__":
    main()
