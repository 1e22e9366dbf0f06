"""Copy-detector throughput on one GPU (issues 4 and 17): training and embedding images/s for the paper presets, and
raymem's training step against the plain MONAI-tutorial contrastive loop for the same network, same card, same run.

Needs torch (CUDA) and monai only: no Ray, no network. A case or variant that fails (out of memory, a missing kernel,
a compile error) is reported in its status and the others still run.

Paper presets (issue 4): each case trains with ``train_step`` (bf16 autocast, the paper's augmentation drawn on the
GPU, Adam) and embeds with ``embed`` (float32 and bf16 autocast, images coming from host memory as a Ray Data actor
gets them).

Training-step variants (issue 17), for ``tiny`` at 64^2 (the GPU demo's phantom size) and ``small2d`` at 256^2, each
at the training batch of 64; every variant computes two views (the image and ``random_transform`` with the paper's
bounds), the detector on both and ``nt_xent_loss``, then one Adam step:

- ``plain``: the MONAI tutorials' loop: float32, ``torch.optim.Adam`` (lr 1e-4, as raymem; otherwise defaults), the
  batch copied each step from pinned host memory, the loss read back with ``.item()`` every step (the tutorials'
  progress bar).
- ``raymem``: ``raymem.models.detector.train_step`` with bf16 autocast as raymem/train/detector.py calls it, the batch
  already on the GPU.
- ``fast``: the same arithmetic with channels-last weights and images, fused Adam and no ``.item()`` per step
  (``nt_xent_loss`` still reads back one flag, its one-patient check).
- ``fast xN``: ``fast`` at N times the batch.
- ``compiled xN``: ``fast xN`` with the detector through ``torch.compile`` (inductor; the CPU dry run only traces,
  with dynamo's ``eager`` backend, to stay cheap).

images/s counts training images (each passes the network twice, as itself and as its view); "x plain" is a variant's
images/s over plain's. Before timing, one float32 plain step and one float32 ``train_step`` from the same seeded
weights, batch and augmentation draw are compared: the same network and the same loss give the same first loss
(relative difference at most 1e-5, recorded as ``passed``; the run goes on either way). Prints markdown tables (the
step rows as each finishes); ``--out`` also writes JSON ("rows", "same_loss_checks", "step_rows"), rewritten after
every step row.

    python benchmarks/gpu_detector.py [--out results.json]          # about 3 minutes on an H100
    python benchmarks/gpu_detector.py --quick --device cpu           # dry run of every code path on CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import monai  # noqa: E402
import torch  # noqa: E402

from raymem.models.copy_transforms import TRANSFORM_PRESETS, random_transform  # noqa: E402
from raymem.models.detector import DETECTOR_PRESETS, build_detector, embed, nt_xent_loss, train_step  # noqa: E402

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
# (name, preset, spatial shape, training batch) timed variant by variant against the plain loop (issue 17): tiny at
# the GPU demo's phantom size, small2d at the size it is designed for (PRESET_INPUT_SIZE), the demos' batch of 64.
COMPARED: list[tuple[str, str, tuple[int, ...], int]] = [
    ("tiny 2D 64^2", "tiny", (64, 64), 64),
    ("small2d 256^2", "small2d", (256, 256), 64),
]
LARGER_BATCH = 4  # fast xN, compiled xN
SAME_LOSS_RTOL = 1e-5  # plain against train_step, both float32: only summation order may differ
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


def _failure(error: Exception) -> str:
    first_line = str(error).splitlines()[0][:160] if str(error) else ""
    return f"failed: {type(error).__name__}: {first_line}"


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
        row["status"] = _failure(error)
    return row


class DetectorSteps:
    """One preset's detector, Adam, batch of images (B, 1, *shape) and augmentation, and the training step of each
    compared variant. Every instance starts from the same seeded weights, images and augmentation draws.

    fast: channels-last weights and images, fused Adam on CUDA. compile_backend: run the detector through
    ``torch.compile`` with this backend (inductor compiles the backward too), or None for eager.
    """

    def __init__(self, preset: str, shape: tuple[int, ...], batch: int, device: torch.device, *, fast: bool = False,
                 compile_backend: str | None = None) -> None:
        torch.manual_seed(0)
        self.device = device
        memory_format = torch.contiguous_format
        if fast:
            memory_format = torch.channels_last if len(shape) == 2 else torch.channels_last_3d
        self.model = build_detector(preset, len(shape)).to(device, memory_format=memory_format)
        self.network = torch.compile(self.model, backend=compile_backend) if compile_backend else self.model
        fused = {"fused": True} if fast and device.type == "cuda" else {}
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, **fused)
        self.images = torch.rand(batch, 1, *shape, device=device).contiguous(memory_format=memory_format)
        self.host_images = self.images.cpu().pin_memory() if device.type == "cuda" else self.images.clone()
        self.patient_ids = [f"p{i}" for i in range(batch)]
        generator = torch.Generator(device=device).manual_seed(0)
        self.augment = functools.partial(random_transform, bounds=TRANSFORM_PRESETS["paper"], generator=generator)

    def _step(self, images: torch.Tensor, autocast_bf16: bool) -> torch.Tensor:
        """train_step's arithmetic through ``self.network``; the loss stays on the device."""
        self.model.train()
        with torch.no_grad():
            views = torch.cat([images, self.augment(images)])
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            embeddings = self.network(views)
        z1, z2 = embeddings.float().chunk(2)
        loss = nt_xent_loss(z1, z2, self.patient_ids)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def plain(self) -> float:
        """The tutorial loop: float32, the batch copied from pinned host memory, the loss read back every step."""
        return self._step(self.host_images.to(self.device, non_blocking=True), autocast_bf16=False).item()

    def raymem(self, autocast_bf16: bool = True) -> float:
        """raymem's step as raymem/train/detector.py calls it, the batch already on the device."""
        return train_step(self.model, self.optimizer, self.images, self.patient_ids, self.augment,
                          autocast_bf16=autocast_bf16)

    def fast(self) -> None:
        """bf16 autocast, the batch on the device, no read-back of the loss."""
        self._step(self.images, autocast_bf16=True)


def same_loss_check(name: str, preset: str, shape: tuple[int, ...], batch: int,
                    device: torch.device) -> dict[str, Any]:
    """One plain step and one ``train_step``, both float32, from the same seeded weights, batch and augmentation draw:
    the same network and the same loss give the same first loss."""
    check: dict[str, Any] = {"case": name, "preset": preset, "input": "x".join(map(str, shape)), "batch": batch}
    try:
        plain_loss = DetectorSteps(preset, shape, batch, device).plain()
        raymem_loss = DetectorSteps(preset, shape, batch, device).raymem(autocast_bf16=False)
        relative_difference = abs(plain_loss - raymem_loss) / abs(raymem_loss)
        check.update(plain_loss=plain_loss, raymem_loss=raymem_loss, relative_difference=relative_difference,
                     passed=relative_difference <= SAME_LOSS_RTOL, status="ok")
    except Exception as error:  # record it and go on to the timings
        check.update(passed=False, status=_failure(error))
    return check


def time_variants(name: str, preset: str, shape: tuple[int, ...], batch: int, device: torch.device, quick: bool,
                  emit: Callable[[dict[str, Any]], None]) -> None:
    """Every training-step variant of one compared preset, a row each, handed to ``emit`` as it finishes."""
    warmup, iterations, max_seconds = (1, 1, 1.0) if quick else (5, 500, 2.5)
    compile_backend = "inductor" if device.type == "cuda" else "eager"  # on CPU: trace only, no code generated
    larger = LARGER_BATCH * batch
    variants: list[tuple[str, int, Callable[[], Callable[[], Any]]]] = [
        ("plain", batch, lambda: DetectorSteps(preset, shape, batch, device).plain),
        ("raymem", batch, lambda: DetectorSteps(preset, shape, batch, device).raymem),
        ("fast", batch, lambda: DetectorSteps(preset, shape, batch, device, fast=True).fast),
        (f"fast x{LARGER_BATCH}", larger, lambda: DetectorSteps(preset, shape, larger, device, fast=True).fast),
        (f"compiled x{LARGER_BATCH}", larger,
         lambda: DetectorSteps(preset, shape, larger, device, fast=True, compile_backend=compile_backend).fast),
    ]
    for variant, batch_used, make in variants:
        row: dict[str, Any] = {"case": name, "preset": preset, "input": "x".join(map(str, shape)),
                               "variant": variant, "batch": batch_used}
        try:
            seconds, calls = _time_per_call(make(), device, warmup, iterations, max_seconds)
            row.update(step_ms=seconds * 1e3, steps_timed=calls, images_per_s=batch_used / seconds, status="ok")
        except Exception as error:  # one failing variant (out of memory, compile error) must not stop the others
            row["status"] = _failure(error)
        emit(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()


# (column title, row key, format); a missing key (a failed case) prints "-".
COLUMNS = [
    ("case", "case", "s"), ("input", "input", "s"), ("batch", "batch", "d"), ("params (M)", "parameters_m", ".1f"),
    ("train step (ms)", "train_step_ms", ".1f"), ("train img/s (bf16)", "train_images_per_s", ".1f"),
    ("peak GiB", "train_peak_gib", ".1f"), ("embed img/s fp32", "embed_fp32_images_per_s", ".1f"),
    ("embed img/s bf16", "embed_bf16_images_per_s", ".1f"), ("status", "status", "s"),
]
STEP_COLUMNS = [
    ("case", "case", "s"), ("input", "input", "s"), ("variant", "variant", "s"), ("batch", "batch", "d"),
    ("step ms", "step_ms", ".1f"), ("images/s", "images_per_s", ",.0f"), ("x plain", "x_plain", ".2f"),
    ("status", "status", "s"),
]


def table_lines(columns: list[tuple[str, str, str]], rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format(row[key], fmt) if row.get(key) is not None else "-" for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    return "\n".join([
        f"Device: {header['device_name']}; torch {header['torch']}, CUDA {header['cuda']}, monai {header['monai']}",
        "",
        *table_lines(COLUMNS, rows),
    ])


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
    rows: list[dict[str, Any]] = []
    same_loss_checks: list[dict[str, Any]] = []
    step_rows: list[dict[str, Any]] = []

    def write() -> None:
        header["seconds"] = time.perf_counter() - started
        if args.out:
            Path(args.out).write_text(json.dumps(
                {**header, "rows": rows, "same_loss_checks": same_loss_checks, "step_rows": step_rows}, indent=2))

    def progress(label: str, status: str) -> None:
        print(f"{label}: {status} ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)

    for case in CASES:
        rows.append(bench_case(*case, device=device, quick=args.quick))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the case's model and optimizer are gone: hand their memory back
        progress(case[0], rows[-1]["status"])
    print(markdown(rows, header), flush=True)
    write()

    compared = [(name, preset, tuple(n // QUICK_SHAPE_DIVISOR for n in shape) if args.quick else shape,
                 2 if args.quick else batch) for name, preset, shape, batch in COMPARED]
    print("\nSame network, same loss: one float32 plain step and one float32 train_step from the same start\n")
    for name, preset, shape, batch in compared:
        check = same_loss_check(name, preset, shape, batch, device)
        same_loss_checks.append(check)
        if check["status"] == "ok":
            print(f"- {name}: plain {check['plain_loss']:.6f}, train_step {check['raymem_loss']:.6f}, relative "
                  f"difference {check['relative_difference']:.1e}: {'passed' if check['passed'] else 'FAILED'}",
                  flush=True)
        else:
            print(f"- {name}: {check['status']}", flush=True)
        write()

    print("\nTraining step: raymem against the plain MONAI-tutorial contrastive loop (x plain: images/s over plain's)"
          "\n")
    print("\n".join(table_lines(STEP_COLUMNS, [])), flush=True)
    plain_rate: dict[str, float] = {}

    def emit(row: dict[str, Any]) -> None:
        if row["status"] == "ok" and row["variant"] == "plain":
            plain_rate[row["case"]] = row["images_per_s"]
        row["x_plain"] = (row["images_per_s"] / plain_rate[row["case"]]
                          if row["status"] == "ok" and row["case"] in plain_rate else None)
        step_rows.append(row)
        print(table_lines(STEP_COLUMNS, [row])[-1], flush=True)
        progress(f"{row['case']} {row['variant']}", row["status"])
        write()

    for name, preset, shape, batch in compared:
        time_variants(name, preset, shape, batch, device, args.quick, emit)


if __name__ == "__main__":
    main()
