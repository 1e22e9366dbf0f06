"""Copy-detector throughput on one GPU (issue 4): training images/s and embedding images/s for the paper presets.

Needs torch (CUDA) and monai only: no Ray, no network. Each case trains with ``train_step`` (bf16 autocast, the
paper's augmentation drawn on the GPU, Adam) and embeds with ``embed`` (float32 and bf16 autocast, images coming
from host memory as a Ray Data actor gets them). A case that fails (e.g. out of memory) is reported and the others
still run. Prints a markdown table; ``--out`` also writes JSON.

    python benchmarks/gpu_detector.py [--out results.json]          # about 1-2 minutes on an H100
    python benchmarks/gpu_detector.py --quick --device cpu           # dry run of every code path on CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import monai  # noqa: E402
import torch  # noqa: E402

from raymem.models.copy_transforms import TRANSFORM_PRESETS, random_transform  # noqa: E402
from raymem.models.detector import DETECTOR_PRESETS, build_detector, embed, train_step  # noqa: E402

# (name, preset, spatial shape, training batch, constructor overrides). Batches are the paper's: 64 (2D), 10 (3D).
CASES: list[tuple[str, str, tuple[int, ...], int, dict[str, Any]]] = [
    ("paper2d 512^2", "paper2d", (512, 512), 64, {}),
    ("small2d 256^2", "small2d", (256, 256), 64, {}),
    ("paper3d CT 64^3", "paper3d", (64, 64, 64), 10, {}),
    ("paper3d MRNet 32x256x256", "paper3d", (32, 256, 256), 10, {"backbone_config": {
        **DETECTOR_PRESETS["paper3d"]["backbone_config"],
        "channels": (32, 64, 128, 256, 512, 1024), "strides": ((2, 2, 2),) * 3 + ((1, 2, 2),) * 3,
    }}),
]
QUICK_SHAPE_DIVISOR = 4  # --quick: every axis 4x smaller, so each case still passes through all of its stages


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_per_call(fn, device: torch.device, warmup: int, iterations: int, max_seconds: float) -> tuple[float, int]:
    """Seconds per call of fn after warm-up, over up to ``iterations`` calls or ``max_seconds``."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    started = time.perf_counter()
    calls = 0
    while calls < iterations and (calls == 0 or time.perf_counter() - started < max_seconds):
        fn()
        calls += 1
    _synchronize(device)
    return (time.perf_counter() - started) / calls, calls


def bench_case(name: str, preset: str, shape: tuple[int, ...], batch: int, overrides: dict[str, Any],
               device: torch.device, quick: bool) -> dict[str, Any]:
    spatial_dims = len(shape)
    if quick:
        shape, batch = tuple(n // QUICK_SHAPE_DIVISOR for n in shape), 2
    row: dict[str, Any] = {"case": name, "preset": preset, "input": "x".join(map(str, shape)), "batch": batch}
    warmup, iterations, max_seconds = (1, 2, 5.0) if quick else (5, 30, 6.0)
    embed_images = 4 if quick else 16 * batch
    try:
        torch.manual_seed(0)
        model = build_detector(preset, spatial_dims, **overrides).to(device)
        row["parameters_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        images = torch.rand(batch, 1, *shape, device=device)
        patient_ids = [f"p{i}" for i in range(batch)]
        generator = torch.Generator(device=device).manual_seed(0)
        augment = functools.partial(random_transform, bounds=TRANSFORM_PRESETS["paper"], generator=generator)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, calls = _time_per_call(
            lambda: train_step(model, optimizer, images, patient_ids, augment, autocast_bf16=True),
            device, warmup, iterations, max_seconds)
        row.update(train_step_ms=seconds * 1e3, train_steps_timed=calls, train_images_per_s=batch / seconds)
        if device.type == "cuda":
            row["train_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        del optimizer, images
        host_images = torch.rand(embed_images, 1, *shape)
        embed_batch = 2 * batch
        for label, bf16 in (("fp32", False), ("bf16", True)):
            seconds, _ = _time_per_call(
                lambda bf16=bf16: embed(model, host_images, batch_size=embed_batch, autocast_bf16=bf16),
                device, 1, 1 if quick else 3, max_seconds)
            row[f"embed_{label}_images_per_s"] = embed_images / seconds
        row["status"] = "ok"
    except Exception as error:  # one failing case (out of memory, missing kernel) must not stop the others
        first_line = str(error).splitlines()[0][:160] if str(error) else ""
        row["status"] = f"failed: {type(error).__name__}: {first_line}"
    return row


# (column title, row key, format); a missing key (a failed case) prints "-".
COLUMNS = [
    ("case", "case", "s"), ("input", "input", "s"), ("batch", "batch", "d"), ("params (M)", "parameters_m", ".1f"),
    ("train step (ms)", "train_step_ms", ".1f"), ("train img/s (bf16)", "train_images_per_s", ".1f"),
    ("peak GiB", "train_peak_gib", ".1f"), ("embed img/s fp32", "embed_fp32_images_per_s", ".1f"),
    ("embed img/s bf16", "embed_bf16_images_per_s", ".1f"), ("status", "status", "s"),
]


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = [
        f"Device: {header['device_name']}; torch {header['torch']}, CUDA {header['cuda']}, monai {header['monai']}",
        "",
        "| " + " | ".join(title for title, _, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = [format(row[key], fmt) if key in row else "-" for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and batches: checks every code path")
    parser.add_argument("--out", help="also write the results as JSON to this path")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --device cpu (with --quick for a dry run)")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    header = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "monai": monai.__version__, "quick": args.quick,
    }
    started = time.perf_counter()
    rows = []
    for case in CASES:
        rows.append(bench_case(*case, device=device, quick=args.quick))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the case's model and optimizer are gone: hand their memory back
        print(f"{case[0]}: {rows[-1]['status']} ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    header["seconds"] = time.perf_counter() - started
    print(markdown(rows, header))
    if args.out:
        Path(args.out).write_text(json.dumps({**header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
