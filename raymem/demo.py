"""``make demo``: the main job on the embedded default data (phantom patients), on one machine.

phantoms -> real PNG and DICOM files -> ingest (Ray Data) -> a printed summary of what landed where.
"""

from __future__ import annotations

import argparse
import logging
import time

from raymem import config, runtime, storage
from raymem.data import phantoms
from raymem.data.ingest import ingest


def run(out: str, *, patients: int, images_per_patient: int, seed: int) -> None:
    storage.delete(out)
    started = time.perf_counter()
    studies = [
        # (name, phantom kind, file format, ingest settings)
        ("xray2d", "xray2d", "png", {"spatial_dims": 2, "size": (64, 64)}),
        ("ct3d", "ct3d", "dicom", {"spatial_dims": 3, "size": (32, 32, 32)}),
    ]
    runtime.init_ray()
    for name, kind, file_format, settings in studies:
        raw = storage.join(out, "raw", name)
        dataset = storage.join(out, "datasets", name)
        n_patients = patients if kind == "xray2d" else max(4, patients // 5)
        size = 64 if kind == "xray2d" else 32
        print(f"\n== {name}: {n_patients} phantom patients -> {file_format.upper()} files -> ingest")
        phantoms.write_files(raw, kind, patients=n_patients, images_per_patient=images_per_patient if kind == "xray2d"
                             else 1, size=size, seed=seed, file_format=file_format)
        cfg = config.validate(config.IngestConfig, {**settings, "seed": seed})
        summary = ingest(raw, dataset, cfg)
        print("\n".join(summary.lines()))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; datasets under {storage.join(out, 'datasets')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raymem.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-out", help="output folder or s3:// URI (replaced)")
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--images-per-patient", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run(args.out, patients=args.patients, images_per_patient=args.images_per_patient, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
