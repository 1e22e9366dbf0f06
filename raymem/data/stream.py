"""Stream a committed dataset split through Ray Data, augmented, ready for ``iter_torch_batches`` in Ray Train.

Ordered execution (``ordered``, ``ordered_ingest``): Ray Data runs tasks in parallel and by default hands blocks on
in completion order, so which rows share a batch, which Train worker gets which rows and the order rows are written
in change from run to run, and with them every trained weight and figure. Every pipeline whose order reaches a result
runs ordered (one seed, one result); the tasks still run in parallel, only their outputs wait for their turn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from raymem import storage
from raymem.config import AugmentConfig
from raymem.data import shards, transforms


def _batch_seed(seed: int, epoch: int, sample_ids: Sequence[str]) -> int:
    """A seed per (study seed, epoch, batch content): reproducible wherever and in whatever order batches run."""
    text = f"{seed}:{epoch}:{sample_ids[0] if len(sample_ids) else ''}:{len(sample_ids)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _to_float_and_augment(batch: dict[str, np.ndarray], augment: AugmentConfig, spatial_dims: int, seed: int,
                          epoch: int) -> dict[str, np.ndarray]:
    """map_batches: images to float32 (B, 1, *spatial) and, when enabled, the paper's augmentation."""
    images = np.asarray(batch["image"], dtype=np.float32)
    if augment.enabled:
        images = transforms.make_augment(
            spatial_dims=spatial_dims, flip_prob=augment.flip_prob, rotate_prob=augment.rotate_prob,
            max_rotation_deg=augment.max_rotation_deg,
            seed=_batch_seed(seed, epoch, list(batch["sample_id"])))(images)
    return {**batch, "image": images}


def ordered(ds):
    """``ds`` (a ``ray.data.Dataset``, changed in place and returned) with ordered execution: blocks and batches in
    input order, so batch composition and output order repeat exactly from run to run."""
    ds.context.execution_options.preserve_order = True
    return ds


def ordered_ingest():
    """Ray Train's ``dataset_config``: each worker's shard streamed in order, and the split between workers fixed.

    With ``preserve_order`` Ray Data's ``streaming_split`` drops its locality hints and deals blocks in order, so
    every rank gets the same rows in the same order in every run (the default deals them as they finish).
    """
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


def open_split(dataset_uri: str, split: str, *, augment: AugmentConfig | None = None, seed: int = 0, epoch: int = 0,
               columns: Sequence[str] = ("image",), sample_ids: Sequence[str] | None = None):
    """A committed split as an ordered ``ray.data.Dataset`` of float32 images (B, 1, *spatial), augmented on the fly.

    Rows come in stored order (ordered execution); a Ray Train trainer keeps that order with ``ordered_ingest()``.

    ``augment=None`` or ``augment.enabled=False`` streams the images as stored (augmentation is a study factor).
    ``columns`` default to the image alone, which `iter_torch_batches` needs (strings do not become tensors).
    ``sample_ids`` restricts the split to a subset (nested training-set sizes). Pass a new ``epoch`` for new
    augmentation draws; the same (seed, epoch) repeats them exactly.
    """
    import ray

    manifest = shards.read_manifest(dataset_uri)
    files = shards.split_files(dataset_uri, split)
    if not files:
        raise shards.DatasetError(f"{dataset_uri} split {split!r} is empty")
    fs, _ = storage.filesystem(files[0])
    paths = [storage.filesystem(uri)[1] for uri in files]
    augment = augment or AugmentConfig(enabled=False)
    # sample_id is read only where it is used (the subset filter, the augmentation's batch seeds, or asked for):
    # reading and dropping it cost a 2D image stream about a sixth of its rate (docs/benchmarks.md).
    needs_ids = sample_ids is not None or augment.enabled or "sample_id" in columns
    needed = list(dict.fromkeys([*columns, *(["sample_id"] if needs_ids else [])]))
    ds = ordered(ray.data.read_parquet(paths, filesystem=fs, columns=needed))
    if sample_ids is not None:
        wanted = set(sample_ids)
        ds = ds.filter(lambda row: row["sample_id"] in wanted)
    if "image" in needed:
        ds = ds.map_batches(_to_float_and_augment, batch_format="numpy",
                            fn_kwargs={"augment": augment, "spatial_dims": manifest["spatial_dims"], "seed": seed,
                                       "epoch": epoch})
    if needs_ids and "sample_id" not in columns:
        ds = ds.drop_columns(["sample_id"])
    return ds
