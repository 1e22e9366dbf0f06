"""Ingest and streaming throughput (issue 2): figures for docs/benchmarks.md.

1. Ingest throughput (images/s, input MB/s) of real files through the Ray Data ingest, 2D (PNG) and 3D (NIfTI).
2. Streaming read throughput of phantom shards (20,000 2D images 64x64, 300 CT volumes 64^3) through Ray Data
   (``open_split``, no augmentation, float32 numpy batches) against reading the same shards directly with pyarrow
   (also to float32), same run.

3. The same stream dealt to 1, 2 and 4 consumer actors at once (``streaming_split``, as Ray Train deals it).

    .venv/bin/python benchmarks/ingest.py [--quick] [--stream-only] [--consumers 1 2 4] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from raymem import config, runtime
from raymem.data import phantoms, shards
from raymem.data.ingest import ingest, phantom_dataset
from raymem.data.stream import open_split


def _folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def bench_ingest(work: Path, kind: str, patients: int, per_patient: int, size: int, file_format: str) -> dict:
    raw = work / f"raw-{kind}"
    phantoms.write_files(str(raw), kind, patients=patients, images_per_patient=per_patient, size=size, seed=0,
                         file_format=file_format, progress=False)
    n_images = patients * per_patient
    spatial_dims = 2 if kind == "xray2d" else 3
    cfg = config.validate(config.IngestConfig, {"spatial_dims": spatial_dims, "size": size})
    mb = _folder_bytes(raw) / 1e6
    result = {"kind": kind, "format": file_format, "images": n_images}
    # First ingest of the session pays Ray worker start-up (imports of torch etc.); the second shows steady state.
    for attempt in ("cold", "warm"):
        started = time.perf_counter()
        summary = ingest(str(raw), str(work / f"ds-{kind}-{attempt}"), cfg)
        seconds = time.perf_counter() - started
        assert summary.ingested == n_images, summary
        result[attempt] = {"seconds": seconds, "images_per_s": n_images / seconds, "input_mb_per_s": mb / seconds}
    result["shape"] = list(summary.image_shape)
    return result


def bench_stream(dataset: Path, repeats: int = 3) -> dict:
    manifest = shards.read_manifest(str(dataset))
    n = manifest["splits"]["train"]["images"]
    image_bytes = int(np.prod(manifest["image_shape"])) * np.dtype(manifest["dtype"]).itemsize

    def direct() -> int:  # what a training loop gets: float32 batches
        return sum(len(shards.images_of(b).astype(np.float32))
                   for b in shards.iter_split(str(dataset), "train", ["image"], 1024))

    def through_ray() -> int:
        ds = open_split(str(dataset), "train")
        return sum(len(b["image"]) for b in ds.iter_batches(batch_size=1024, batch_format="numpy"))

    timings = {}
    for name, fn in (("pyarrow", direct), ("ray_data", through_ray)):
        fn()  # warm-up: file cache, Ray workers
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            assert fn() == n
            best = min(best, time.perf_counter() - started)
        timings[name] = {"seconds": best, "images_per_s": n / best, "mb_per_s": n * image_bytes / best / 1e6}
    return {"images": n, **timings, "ray_over_pyarrow": timings["ray_data"]["images_per_s"]
            / timings["pyarrow"]["images_per_s"]}


def bench_stream_consumers(dataset: Path, consumers: list[int], repeats: int = 3) -> dict:
    """Images/s of one ``open_split`` stream dealt to k consumers as Ray Train deals it to k workers
    (``streaming_split``, ordered), each a Ray actor that turns its batches into float32 numpy, for each k."""
    import ray

    @ray.remote(num_cpus=0.25)
    class Consumer:
        def count(self, part) -> int:
            return sum(len(batch["image"]) for batch in part.iter_batches(batch_size=1024, batch_format="numpy"))

    n = shards.read_manifest(str(dataset))["splits"]["train"]["images"]
    results = {}
    for k in consumers:
        actors = [Consumer.remote() for _ in range(k)]
        best = float("inf")
        for attempt in range(repeats + 1):  # the first pass warms the workers and the file cache
            started = time.perf_counter()
            parts = open_split(str(dataset), "train").streaming_split(k, equal=False)
            assert sum(ray.get([actor.count.remote(part) for actor, part in zip(actors, parts)])) == n
            if attempt:
                best = min(best, time.perf_counter() - started)
        for actor in actors:
            ray.kill(actor)
        results[str(k)] = {"seconds": best, "images_per_s": n / best}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="write the figures as JSON here too")
    parser.add_argument("--stream-only", action="store_true", help="skip the ingest figures")
    parser.add_argument("--consumers", type=int, nargs="*", default=[1, 2, 4],
                        help="stream to k consumers at once (streaming_split), for each k")
    args = parser.parse_args()
    runtime.init_ray()
    scale = 0.1 if args.quick else 1.0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   "load_average_before": os.getloadavg()}
        if not args.stream_only:
            results["ingest_2d"] = bench_ingest(work, "xray2d", int(500 * scale), 4, 64, "png")
            results["ingest_3d"] = bench_ingest(work, "ct3d", int(100 * scale), 1, 64, "nifti")
        # Streaming on larger sets (generated straight to shards) so pipeline start-up does not dominate.
        for key, kind, patients, size in (("stream_2d", "xray2d", int(5000 * scale), 64),
                                          ("stream_3d", "ct3d", int(300 * scale), 64)):
            dataset = work / f"stream-{kind}"
            phantom_dataset(str(dataset), kind, patients=patients, images_per_patient=4 if kind == "xray2d" else 1,
                            size=size, seed=1, cfg=config.IngestConfig(val_fraction=0.0, test_fraction=0.0))
            results[key] = bench_stream(dataset)
            if args.consumers:
                results[key]["consumers"] = bench_stream_consumers(dataset, args.consumers)
        results["load_average_after"] = os.getloadavg()
    print(f"machine: {results['machine']}; load average before {results['load_average_before']}, "
          f"after {results['load_average_after']}")
    print("| figure | value |\n|---|---|")
    for key in ("ingest_2d", "ingest_3d") if not args.stream_only else ():
        r = results[key]
        for attempt in ("cold", "warm"):
            a = r[attempt]
            print(f"| ingest {r['kind']} {r['format']} {r['shape']} ({r['images']} images), {attempt} Ray workers | "
                  f"{a['images_per_s']:.1f} images/s, {a['input_mb_per_s']:.2f} input MB/s ({a['seconds']:.1f} s) |")
    for key in ("stream_2d", "stream_3d"):
        r = results[key]
        print(f"| {key} pyarrow direct | {r['pyarrow']['images_per_s']:.0f} images/s "
              f"({r['pyarrow']['mb_per_s']:.0f} MB/s) |")
        print(f"| {key} Ray Data open_split | {r['ray_data']['images_per_s']:.0f} images/s "
              f"({r['ray_data']['mb_per_s']:.0f} MB/s); ratio {r['ray_over_pyarrow']:.2f}x |")
        for k, c in r.get("consumers", {}).items():
            print(f"| {key} open_split dealt to {k} consumer actor(s) | {c['images_per_s']:.0f} images/s "
                  f"({c['images_per_s'] / r['pyarrow']['images_per_s']:.2f}x pyarrow) |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
