"""Synthetic samples at scale: Ray Data actors run DDIM on a saved LDM epoch and the samples land as a dataset.

Output is a committed dataset in the shard schema (DESIGN.md), every row in the ``train`` split with
``patient_id`` "synthetic", ``sample_id`` ``syn-<run>-e<epoch>-<index>`` and ``source``
``ldm:<run>:epoch-<E>:seed-<seed>``: the seed regenerates that sample exactly (``sample_images`` draws each
sample's noise from its own seed, so batching does not change it). The manifest's ``synthetic`` entry records the
run, epoch, DDIM steps and base seed. One actor per GPU where there are GPUs, CPU actors otherwise.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from raymem import storage
from raymem.config import IngestConfig, SampleConfig
from raymem.data import formats, shards
from raymem.data.ingest import SYNTHETIC_PATIENT, write_dataset
from raymem.data.stream import ordered

_EPOCH_FOLDER = re.compile(r"^epoch-(\d+)/ldm\.pt$")


def sample_seed(base_seed: int, index: int) -> int:
    """The seed of synthetic sample ``index`` (63 bits, distinct for every (base_seed, index) in practice)."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{index}".encode()).digest()[:8], "little") & (2**63 - 1)


def saved_epochs(run_uri: str) -> list[int]:
    """Epochs with a sampling checkpoint (epoch-<E>/ldm.pt) under a training run's folder, ascending."""
    if not storage.exists(run_uri):
        raise FileNotFoundError(f"{run_uri} does not exist; --run takes a training run's folder, <out>/ldm/<run_name>")
    found = (_EPOCH_FOLDER.match(path) for path in storage.list_files(run_uri, suffixes=("ldm.pt",)))
    return sorted(int(match.group(1)) for match in found if match)


def checkpoint_uri(run_uri: str, epoch: int | None) -> tuple[str, int]:
    """(URI of the ldm.pt to sample, its epoch): ``epoch`` or, when None, the latest saved one."""
    epochs = saved_epochs(run_uri)
    if not epochs:
        raise FileNotFoundError(f"{run_uri} holds no epoch-*/ldm.pt checkpoint; train with `raymem train-ldm` first")
    chosen = epochs[-1] if epoch is None else epoch
    if chosen not in epochs:
        raise FileNotFoundError(f"{run_uri} has no checkpoint for epoch {epoch}; saved epochs: {epochs}")
    return storage.join(run_uri, f"epoch-{chosen:05d}", "ldm.pt"), chosen


class _Sampler:
    """A Ray Data actor holding one LDM on its device; maps a batch of sample indices to images."""

    def __init__(self, checkpoint: bytes, base_seed: int, ddim_steps: int):
        import torch

        from raymem.models.ldm import load_ldm

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.state = load_ldm(checkpoint, self.device)
        self.base_seed, self.ddim_steps = base_seed, ddim_steps

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raymem.models.ldm import sample_images

        meta = self.state["metadata"]
        seeds = [sample_seed(self.base_seed, int(index)) for index in batch["id"]]
        images = sample_images(self.model, self.state["image_shape"][1:], seeds, ddim_steps=self.ddim_steps,
                               num_train_timesteps=meta["num_train_timesteps"],
                               value_range=tuple(meta["intensity_range"]), autocast_bf16=self.device.type == "cuda")
        return {"index": batch["id"], "seed": np.array(seeds, dtype=np.int64), "image": images.cpu().numpy()}


def sample_run(cfg: SampleConfig) -> dict[str, Any]:
    """Sample ``cfg.n`` images from a saved epoch into a synthetic dataset at ``cfg.out``; returns a summary."""
    import ray

    from raymem.models.ldm import load_ldm

    uri, epoch = checkpoint_uri(cfg.run, cfg.epoch)
    checkpoint = storage.read_bytes(uri)
    _, state = load_ldm(checkpoint, source=uri)
    meta = state["metadata"]
    if meta["diffusion_epochs_trained"] == 0:
        raise ValueError(f"epoch {epoch} of {cfg.run} is an autoencoder-stage checkpoint (no diffusion training yet); "
                         "sample a later epoch")
    run_name = meta["run_name"]
    # Ordered: the same indices share an actor call in every run (batch composition can move float results) and
    # the samples are written in index order.
    generated = ordered(ray.data.range(cfg.n)).map_batches(
        _Sampler, batch_size=cfg.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"checkpoint": checkpoint, "base_seed": cfg.seed, "ddim_steps": cfg.ddim_steps},
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors), num_gpus=1 if cfg.use_gpu else 0)

    def samples() -> Iterator[shards.Sample]:
        for batch in generated.iter_batches(batch_size=None, batch_format="numpy"):
            for index, seed, image in zip(batch["index"], batch["seed"], batch["image"]):
                yield shards.Sample(
                    sample_id=f"syn-{run_name}-e{epoch}-{int(index):07d}", patient_id=SYNTHETIC_PATIENT,
                    split="train", image=image, spacing_mm=tuple(meta["spacing_mm"]), modality=meta["modality"],
                    source=f"ldm:{run_name}:epoch-{epoch}:seed-{int(seed)}", content_hash=formats.content_hash(image))

    summary = write_dataset(cfg.out, samples(), IngestConfig(**meta["dataset_config"]), tuple(state["image_shape"]),
                            pseudonym_key="none (synthetic samples)",
                            extra={"synthetic": {"run": cfg.run, "epoch": epoch, "ddim_steps": cfg.ddim_steps,
                                                 "base_seed": cfg.seed, "n": cfg.n, "trained_on": meta["dataset"]}})
    return {"out": cfg.out, "epoch": epoch, "n": summary.ingested, "checkpoint": uri}
