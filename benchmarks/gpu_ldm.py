"""LDM throughput on one GPU (issue 3): autoencoder and diffusion step time and DDIM samples/s per preset, bf16.

Needs torch (CUDA) and monai only: no Ray, no network. Each case times ``autoencoder_step`` and ``diffusion_step``
(bf16 autocast, Adam) and ``sample_images`` (50 DDIM steps, bf16). A case that fails (e.g. out of memory) is
reported and the others still run. Prints a markdown table with the card's name; ``--out`` also writes JSON.

    python benchmarks/gpu_ldm.py [--out results.json]        # about 1-2 minutes on an H100
    python benchmarks/gpu_ldm.py --quick --device cpu         # dry run of every code path on CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from raymem.models import ldm as core  # noqa: E402

# (name, preset, spatial shape, training batch, sampling batch)
CASES: list[tuple[str, str, tuple[int, ...], int, int]] = [
    ("tiny 2D 32^2", "tiny", (32, 32), 64, 64),
    ("small 2D 64^2", "small", (64, 64), 32, 64),
    ("paper2d 256^2", "paper2d", (256, 256), 8, 16),
    ("paper3d-ct 64^3", "paper3d-ct", (64, 64, 64), 4, 8),
    ("paper3d-mri 32x128x128", "paper3d-mri", (32, 128, 128), 4, 8),
]
QUICK_SHAPE_DIVISOR = 4  # --quick: every axis 4x smaller, but at least 16 (every preset downsamples by up to 16)
DDIM_STEPS = 50


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_call(fn, device: torch.device, warmup: int, max_calls: int, max_seconds: float) -> float:
    for _ in range(warmup):
        fn()
    _synchronize(device)
    started, calls = time.perf_counter(), 0
    while calls < max_calls and (calls == 0 or time.perf_counter() - started < max_seconds):
        fn()
        calls += 1
    _synchronize(device)
    return (time.perf_counter() - started) / calls


def run_case(preset: str, shape: tuple[int, ...], batch: int, sample_batch: int, device: torch.device,
             quick: bool) -> dict[str, float]:
    bf16 = device.type == "cuda"
    torch.manual_seed(0)
    model = core.build_ldm(preset, len(shape)).to(device)
    images = torch.rand(batch, 1, *shape, device=device)
    ae_optimizer = torch.optim.Adam(model.autoencoder.parameters(), 1e-4)
    unet_optimizer = torch.optim.Adam(model.unet.parameters(), 1e-4)
    scheduler, generator = core.noise_scheduler(), torch.Generator(device=device).manual_seed(0)
    latents = model.encode(images)
    warmup, calls, budget = (1, 1, 1.0) if quick else (3, 20, 4.0)
    ae_s = _seconds_per_call(lambda: core.autoencoder_step(model.autoencoder, ae_optimizer, images, kl_weight=1e-6,
                                                           autocast_bf16=bf16), device, warmup, calls, budget)
    unet_s = _seconds_per_call(lambda: core.diffusion_step(model.unet, unet_optimizer, scheduler, latents, generator,
                                                           bf16), device, warmup, calls, budget)
    steps = 2 if quick else DDIM_STEPS
    sample_s = _seconds_per_call(lambda: core.sample_images(model, shape, range(sample_batch), ddim_steps=steps,
                                                            autocast_bf16=bf16), device, 1, 2, budget)
    return {"autoencoder_step_ms": 1000 * ae_s, "autoencoder_images_per_s": batch / ae_s,
            "diffusion_step_ms": 1000 * unet_s, "diffusion_images_per_s": batch / unet_s,
            "ddim_steps": steps, "samples_per_s": sample_batch / sample_s,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer calls (a dry run)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    results = []
    # Rows are printed (and the JSON rewritten) as each case finishes, so a time limit loses only the cases after it.
    print(f"LDM throughput on {card}, torch {torch.__version__}, bf16 autocast: {device.type == 'cuda'}\n")
    print("| case | batch | AE step ms | AE img/s | UNet step ms | UNet img/s | DDIM steps | samples/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for name, preset, shape, batch, sample_batch in CASES:
        if args.quick:
            shape = tuple(max(side // QUICK_SHAPE_DIVISOR, 16) for side in shape)
            batch, sample_batch = 2, 2
        try:
            row = {"case": name, "shape": list(shape), "batch": batch,
                   **run_case(preset, shape, batch, sample_batch, device, args.quick)}
            print(f"| {row['case']} | {row['batch']} | {row['autoencoder_step_ms']:.1f} | "
                  f"{row['autoencoder_images_per_s']:.1f} | {row['diffusion_step_ms']:.1f} | "
                  f"{row['diffusion_images_per_s']:.1f} | {row['ddim_steps']} | {row['samples_per_s']:.2f} | "
                  f"{row['peak_memory_gib']:.1f} |", flush=True)
        except Exception as err:  # report the failing case (e.g. out of memory) and go on
            row = {"case": name, "shape": list(shape), "batch": batch, "error": f"{type(err).__name__}: {err}"}
            print(f"| {name} | {batch} | failed: {row['error'][:80]} ||||||| ", flush=True)
        results.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        if args.out:
            Path(args.out).write_text(json.dumps({"card": card, "torch": torch.__version__, "results": results},
                                                 indent=2))


if __name__ == "__main__":
    main()
