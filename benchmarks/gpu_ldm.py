"""LDM throughput on one GPU (issues 3 and 17): raymem's training steps and DDIM sampling against the plain
MONAI-tutorial loop for the same network, same card, same run; the paper presets against the card's bf16 peak.

Needs torch (CUDA) and monai only: no Ray, no network. Rows are printed (and the JSON rewritten) as each finishes,
so a time limit loses only what comes after it; a variant that fails (out of memory, a graph capture that MONAI's
code refuses) is reported and the others still run.

Variants of one training step (autoencoder: L1 + KL; diffusion: encode a fresh batch, noise, UNet, MSE):

- ``plain``: the MONAI tutorials' loop: float32, ``torch.optim.Adam`` defaults, each batch copied from pinned host
  memory, the loss read back with ``.item()`` every step (the tutorials' progress bar).
- ``raymem``: ``raymem.models.ldm.autoencoder_step`` / ``diffusion_step`` as raymem/train/ldm.py calls them: bf16
  autocast, the batch already on the GPU.
- ``fast``: the same step with channels-last tensors, fused Adam and no read-back per step.
- ``fast xN``: ``fast`` at N times the batch (these networks leave the card waiting on kernel launches).
- ``graphed xN`` (diffusion only): ``fast xN`` with the UNet's forward and backward captured as CUDA graphs
  (``torch.cuda.make_graphed_callables``), replayed each step.
- ``raymem cuda_graphs`` (xN): raymem's steps through ``raymem.models.ldm.GraphedModule``, as raymem/train/ldm.py
  runs them with ``cuda_graphs: true``; checked first against the eager steps from the same weights and noise.

Sampling: 50 DDIM steps, ``plain`` in float32 at the training batch, raymem's ``sample_images`` (bf16) at that batch
and at 8x. Paper presets: raymem's step time, its FLOPs (torch.utils.flop_counter: convolutions and matrix products,
forward and backward) and the achieved rate against a bf16 8192^3 ``torch.mm`` measured in the same run.

    python benchmarks/gpu_ldm.py [--out results.json]        # about 1-2 minutes on an H100/H200
    python benchmarks/gpu_ldm.py --quick --device cpu         # dry run of every code path on CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from monai.networks.schedulers import DDIMScheduler  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from raymem.models import ldm as core  # noqa: E402

# (name, preset, spatial shape, training batch) compared variant by variant
COMPARED = [("tiny 2D 32^2", "tiny", (32, 32), 64), ("small 2D 64^2", "small", (64, 64), 32)]
# (name, preset, spatial shape, training batch) timed as raymem runs them, against the card's bf16 peak
PAPER = [("paper2d 256^2", "paper2d", (256, 256), 8), ("paper3d-ct 64^3", "paper3d-ct", (64, 64, 64), 4),
         ("paper3d-mri 32x128x128", "paper3d-mri", (32, 128, 128), 4)]
LARGER_BATCH = 4  # fast xN, graphed xN
SAMPLE_BATCH = 8  # DDIM at 8x the training batch
DDIM_STEPS = 50
KL_WEIGHT = 1e-6
QUICK_SHAPE_DIVISOR = 4  # --quick: every axis 4x smaller, but at least 16 (every preset downsamples by up to 16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], Any], device: torch.device, warmup: int, max_calls: int,
                     max_seconds: float) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    started, calls = time.perf_counter(), 0
    while calls < max_calls and (calls == 0 or time.perf_counter() - started < max_seconds):
        fn()
        calls += 1
    synchronize(device)
    return (time.perf_counter() - started) / calls


class Steps:
    """One preset's networks and the step functions of every variant, at a given batch."""

    def __init__(self, preset: str, shape: tuple[int, ...], batch: int, device: torch.device, *, fast: bool) -> None:
        torch.manual_seed(0)
        self.device, self.shape, self.batch, self.fast = device, shape, batch, fast
        self.memory_format = (torch.channels_last if len(shape) == 2 else torch.channels_last_3d) if fast else None
        self.model = core.build_ldm(preset, len(shape)).to(device)
        if fast:
            self.model = self.model.to(memory_format=self.memory_format)
        fused = {"fused": True} if fast and device.type == "cuda" else {}
        self.ae_optimizer = torch.optim.Adam(self.model.autoencoder.parameters(), 1e-4, **fused)
        self.unet_optimizer = torch.optim.Adam(self.model.unet.parameters(), 1e-4, **fused)
        self.scheduler = core.noise_scheduler()
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.images = self._layout(torch.rand(batch, 1, *shape, device=device))
        self.host_images = torch.rand(batch, 1, *shape).pin_memory() if device.type == "cuda" else torch.rand(
            batch, 1, *shape)
        self.bf16 = device.type == "cuda"

    def _layout(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.contiguous(memory_format=self.memory_format) if self.memory_format else tensor

    # plain MONAI-tutorial loop: float32, batch from the host, loss read back each step
    def plain_autoencoder(self) -> float:
        images = self.host_images.to(self.device, non_blocking=True)
        self.model.autoencoder.train()
        reconstruction, z_mu, z_sigma = self.model.autoencoder(images)
        loss = F.l1_loss(reconstruction, images) + KL_WEIGHT * core.kl_divergence(z_mu, z_sigma)
        self.ae_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.ae_optimizer.step()
        return loss.item()

    def plain_diffusion(self) -> float:
        images = self.host_images.to(self.device, non_blocking=True)
        latents = self.model.encode(images)
        self.model.unet.train()
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        timesteps = torch.randint(0, self.scheduler.num_train_timesteps, (self.batch,), generator=self.generator,
                                  device=self.device)
        predicted = self.model.unet(self.scheduler.add_noise(latents, noise, timesteps), timesteps=timesteps)
        loss = F.mse_loss(predicted, noise)
        self.unet_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.unet_optimizer.step()
        return loss.item()

    # raymem's steps (autoencoder_step and diffusion_step read their loss back as a float: one sync per step)
    def raymem_autoencoder(self) -> None:
        core.autoencoder_step(self.model.autoencoder, self.ae_optimizer, self.images, kl_weight=KL_WEIGHT,
                              autocast_bf16=self.bf16)

    def raymem_diffusion(self) -> None:
        core.diffusion_step(self.model.unet, self.unet_optimizer, self.scheduler, self.model.encode(self.images),
                            self.generator, self.bf16)

    # the same arithmetic with no read-back per step
    def fast_autoencoder(self) -> None:
        self.model.autoencoder.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            reconstruction, z_mu, z_sigma = self.model.autoencoder(self.images)
            loss = (F.l1_loss(reconstruction.float(), self.images)
                    + KL_WEIGHT * core.kl_divergence(z_mu.float(), z_sigma.float()))
        self.ae_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.ae_optimizer.step()

    def _noised(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            latents = self.model.encode(self.images).float()
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        timesteps = torch.randint(0, self.scheduler.num_train_timesteps, (self.batch,), generator=self.generator,
                                  device=self.device)
        return self._layout(self.scheduler.add_noise(latents, noise, timesteps)), noise, timesteps

    def fast_diffusion(self, unet: Callable | None = None) -> None:
        self.model.unet.train()
        noisy, noise, timesteps = self._noised()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=unet is None):
            predicted = (unet or self.model.unet)(noisy, timesteps)
        loss = F.mse_loss(predicted.float(), noise)
        self.unet_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.unet_optimizer.step()

    def raymem_graphed(self) -> tuple[Callable[[], None], Callable[[], None]]:
        """raymem's autoencoder_step and diffusion_step through core.GraphedModule (``cuda_graphs: true``)."""
        autoencoder = core.GraphedModule(self.model.autoencoder, self.bf16)
        unet = core.GraphedModule(self.model.unet, self.bf16)
        return (lambda: core.autoencoder_step(autoencoder, self.ae_optimizer, self.images, kl_weight=KL_WEIGHT,
                                              autocast_bf16=self.bf16),
                lambda: core.diffusion_step(unet, self.unet_optimizer, self.scheduler,
                                            self.model.encode(self.images), self.generator, self.bf16))

    def graphed_diffusion(self) -> Callable[[], None]:
        """fast_diffusion with the UNet's forward and backward replayed from CUDA graphs."""
        self.model.unet.train()
        noisy, _, timesteps = self._noised()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            graphed = torch.cuda.make_graphed_callables(self.model.unet, (noisy, timesteps))
        return lambda: self.fast_diffusion(graphed)


def time_variants(name: str, preset: str, shape: tuple[int, ...], batch: int, device: torch.device, quick: bool,
                  emit: Callable[[dict[str, Any]], None]) -> None:
    """Every variant of one compared preset: a row per (stage, variant)."""
    warmup, calls, budget = (1, 1, 1.0) if quick else (3, 30, 1.2)

    def measure(stage: str, variant: str, batch_used: int, make: Callable[[], Callable[[], Any]], per_call: int):
        row = {"case": name, "preset": preset, "shape": list(shape), "stage": stage, "variant": variant,
               "batch": batch_used}
        try:
            fn = make()
            seconds = seconds_per_call(fn, device, warmup, calls, budget)
            row |= {"step_ms": 1000 * seconds, "images_per_s": per_call / seconds}
        except Exception as error:  # report and go on: one variant must not cost the others
            row["error"] = f"{type(error).__name__}: {error}"
        emit(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = Steps(preset, shape, batch, device, fast=False)
    measure("autoencoder", "plain", batch, lambda: base.plain_autoencoder, batch)
    measure("autoencoder", "raymem", batch, lambda: base.raymem_autoencoder, batch)
    measure("diffusion", "plain", batch, lambda: base.plain_diffusion, batch)
    measure("diffusion", "raymem", batch, lambda: base.raymem_diffusion, batch)
    steps = 2 if quick else DDIM_STEPS

    def plain_sampling(n: int) -> Callable[[], Any]:
        scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, **core.NOISE_SCHEDULE)
        scheduler.set_timesteps(steps)
        latent_shape = base.model.latent_shape(shape)

        @torch.no_grad()
        def sample():
            base.model.eval()
            latents = torch.randn(n, *latent_shape, device=device)
            for timestep in scheduler.timesteps.tolist():
                predicted = base.model.unet(latents, timesteps=torch.full((n,), timestep, device=device))
                latents, _ = scheduler.step(predicted, timestep, latents)
            return base.model.decode(latents)
        return sample

    def raymem_sampling(n: int) -> Callable[[], Any]:
        return lambda: core.sample_images(base.model, shape, range(n), ddim_steps=steps, autocast_bf16=base.bf16)

    sample_warmup, sample_calls = (1, 1) if quick else (1, 3)
    for variant, n, make in (("plain", batch, plain_sampling), ("raymem", batch, raymem_sampling),
                             (f"raymem x{SAMPLE_BATCH}", SAMPLE_BATCH * batch, raymem_sampling)):
        row = {"case": name, "preset": preset, "shape": list(shape), "stage": f"DDIM {steps} steps",
               "variant": variant, "batch": n}
        try:
            seconds = seconds_per_call(make(n), device, sample_warmup, sample_calls, budget)
            row |= {"step_ms": 1000 * seconds, "images_per_s": n / seconds}
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"
        emit(row)
    del base

    for factor in (1, LARGER_BATCH):
        fast = Steps(preset, shape, batch * factor, device, fast=True)
        label = "fast" if factor == 1 else f"fast x{factor}"
        measure("autoencoder", label, batch * factor, lambda: fast.fast_autoencoder, batch * factor)
        measure("diffusion", label, batch * factor, lambda: fast.fast_diffusion, batch * factor)
        if factor > 1 and device.type == "cuda":
            measure("diffusion", f"graphed x{factor}", batch * factor, fast.graphed_diffusion, batch * factor)
        del fast
    if device.type == "cuda":
        for factor in (1, LARGER_BATCH):
            graphed = Steps(preset, shape, batch * factor, device, fast=False)
            steps = graphed.raymem_graphed()
            label = "raymem cuda_graphs" + ("" if factor == 1 else f" x{factor}")
            measure("autoencoder", label, batch * factor, lambda: steps[0], batch * factor)
            measure("diffusion", label, batch * factor, lambda: steps[1], batch * factor)
            del graphed


def graphed_matches_eager(preset: str, shape: tuple[int, ...], batch: int, device: torch.device,
                          n_steps: int = 8) -> dict[str, Any]:
    """The same steps, eager and through core.GraphedModule, from the same weights, data and noise: losses per step
    and the largest parameter difference after n_steps of each stage (bf16 autocast on both)."""
    runs = []
    for graphed in (False, True):
        steps = Steps(preset, shape, batch, device, fast=False)
        autoencoder, unet = steps.model.autoencoder, steps.model.unet
        if graphed:
            autoencoder = core.GraphedModule(autoencoder, steps.bf16)
            unet = core.GraphedModule(unet, steps.bf16)
        torch.manual_seed(1)
        torch.cuda.manual_seed(1)
        losses = {"autoencoder": [], "diffusion": []}
        for _ in range(n_steps):
            losses["autoencoder"].append(core.autoencoder_step(autoencoder, steps.ae_optimizer, steps.images,
                                                               kl_weight=KL_WEIGHT, autocast_bf16=steps.bf16)["recon"])
        steps.generator.manual_seed(2)
        for _ in range(n_steps):
            losses["diffusion"].append(core.diffusion_step(unet, steps.unet_optimizer, steps.scheduler,
                                                           steps.model.encode(steps.images), steps.generator,
                                                           steps.bf16))
        runs.append((losses, {name: value.detach().float().clone()
                              for name, value in steps.model.state_dict().items()}))
    (eager_losses, eager_state), (graphed_losses, graphed_state) = runs
    return {"eager_losses": eager_losses, "graphed_losses": graphed_losses,
            "max_param_diff": max(float((eager_state[name] - graphed_state[name]).abs().max())
                                  for name in eager_state)}


def step_flops(steps: Steps) -> dict[str, float]:
    """FLOPs of one raymem autoencoder step and one diffusion step (forward and backward)."""
    flops = {}
    for stage, fn in (("autoencoder", steps.raymem_autoencoder), ("diffusion", steps.raymem_diffusion)):
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        flops[stage] = float(counter.get_total_flops())
    return flops


def bf16_peak(device: torch.device, quick: bool) -> float:
    """FLOP/s of a bf16 n^3 torch.mm on this device (8192 on a GPU)."""
    n = 256 if quick else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = seconds_per_call(lambda: torch.mm(a, b), device, 3, 10 if quick else 20, 2.0)
    return 2 * n**3 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer calls (a dry run)")
    parser.add_argument("--skip-paper", action="store_true", help="leave out the paper presets")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --device cpu --quick for a dry run")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if args.quick:
        torch.set_num_threads(1)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result: dict[str, Any] = {"card": card, "torch": torch.__version__, "rows": [], "paper": []}

    def write() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    def shape_of(shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(max(side // QUICK_SHAPE_DIVISOR, 16) for side in shape) if args.quick else shape

    print(f"LDM steps on {card}, torch {torch.__version__}: raymem against the plain MONAI-tutorial loop\n")
    print("| case | stage | variant | batch | step ms | images/s | x plain |")
    print("|---|---|---|---|---|---|---|", flush=True)
    plain_rate: dict[tuple[str, str], float] = {}

    def emit(row: dict[str, Any]) -> None:
        result["rows"].append(row)
        if "error" in row:
            print(f"| {row['case']} | {row['stage']} | {row['variant']} | {row['batch']} | failed: "
                  f"{row['error'][:120]} | | |", flush=True)
        else:
            key = (row["case"], row["stage"])
            if row["variant"] == "plain":
                plain_rate[key] = row["images_per_s"]
            row["x_plain"] = row["images_per_s"] / plain_rate[key] if key in plain_rate else None
            ratio = f"{row['x_plain']:.2f}" if row["x_plain"] else ""
            print(f"| {row['case']} | {row['stage']} | {row['variant']} | {row['batch']} | {row['step_ms']:.1f} | "
                  f"{row['images_per_s']:,.0f} | {ratio} |", flush=True)
        write()

    if device.type == "cuda":
        print("\nCUDA graphs against eager, same weights, data and noise (8 steps of each stage, bf16):\n")
        result["graph_checks"] = []
        for name, preset, shape, batch in COMPARED:
            try:
                check = {"case": name, **graphed_matches_eager(preset, shape, batch, device)}
                print(f"- {name}: autoencoder L1 eager {check['eager_losses']['autoencoder'][-1]:.5f} vs graphed "
                      f"{check['graphed_losses']['autoencoder'][-1]:.5f}; diffusion loss eager "
                      f"{check['eager_losses']['diffusion'][-1]:.5f} vs graphed "
                      f"{check['graphed_losses']['diffusion'][-1]:.5f}; largest parameter difference "
                      f"{check['max_param_diff']:.2e}", flush=True)
            except Exception as error:
                check = {"case": name, "error": f"{type(error).__name__}: {error}"}
                print(f"- {name}: failed: {check['error'][:200]}", flush=True)
            result["graph_checks"].append(check)
            write()
        print()
    for name, preset, shape, batch in COMPARED:
        time_variants(name, preset, shape_of(shape), 2 if args.quick else batch, device, args.quick, emit)
    if args.skip_paper:
        return

    result["bf16_peak_flops"] = peak = bf16_peak(device, args.quick)
    print(f"\nPaper presets, raymem's steps (bf16 autocast); card's bf16 rate: {peak / 1e12:.0f} TFLOP/s "
          f"({'8192^3' if not args.quick else '256^3'} torch.mm, this run)\n")
    print("| case | batch | stage | step ms | images/s | GFLOP/step | TFLOP/s | % of bf16 mm |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name, preset, shape, batch in PAPER:
        batch = 2 if args.quick else batch
        try:
            steps = Steps(preset, shape_of(shape), batch, device, fast=False)
            flops = step_flops(steps)
            warmup, calls, budget = (1, 1, 1.0) if args.quick else (3, 20, 2.0)
            for stage, fn in (("autoencoder", steps.raymem_autoencoder), ("diffusion", steps.raymem_diffusion)):
                seconds = seconds_per_call(fn, device, warmup, calls, budget)
                row = {"case": name, "batch": batch, "stage": stage, "step_ms": 1000 * seconds,
                       "images_per_s": batch / seconds, "flops": flops[stage], "flops_per_s": flops[stage] / seconds,
                       "pct_of_bf16_mm": 100 * flops[stage] / seconds / peak}
                result["paper"].append(row)
                print(f"| {name} | {batch} | {stage} | {row['step_ms']:.1f} | {row['images_per_s']:,.1f} | "
                      f"{flops[stage] / 1e9:,.1f} | {row['flops_per_s'] / 1e12:.1f} | {row['pct_of_bf16_mm']:.1f} |",
                      flush=True)
            del steps
        except Exception as error:
            result["paper"].append({"case": name, "error": f"{type(error).__name__}: {error}"})
            print(f"| {name} | {batch} | failed: {type(error).__name__}: {str(error)[:120]} ||||||", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write()


if __name__ == "__main__":
    main()
