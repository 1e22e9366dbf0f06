"""Embeddings at scale: Ray Data actors run the detector over a dataset's shards and write the embedding schema.

Output (DESIGN.md, embedding schema): ``<out>/<split>/part-*.parquet`` with ``sample_id``, ``patient_id`` and
``embedding`` (fixed_size_list<float32>[d]); one actor per GPU where there are GPUs, CPU actors otherwise. Every
requested split goes through one ordered pipeline (one actor pool: starting actors, not the forward passes, dominates
small splits), so the part files hold the same rows in every run.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
import pyarrow as pa

from raymem import storage
from raymem.config import EmbedConfig
from raymem.data import shards


def embedding_table(sample_ids: list[str], patient_ids: list[str], embeddings: np.ndarray) -> pa.Table:
    """The embedding schema for (N, d) float32 embeddings."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1])
    return pa.table({"sample_id": pa.array(sample_ids, pa.string()), "patient_id": pa.array(patient_ids, pa.string()),
                     "embedding": column})


class _Embedder:
    """A Ray Data actor holding one detector on its device."""

    def __init__(self, detector_bytes: bytes, batch_size: int):
        import torch

        from raymem.models.detector import load_detector

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_detector(detector_bytes).to(self.device)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from raymem.models.detector import embed

        vectors = embed(self.model, np.asarray(batch["image"], dtype=np.float32), self.batch_size,
                        autocast_bf16=self.device.type == "cuda")
        table = embedding_table(list(batch["sample_id"]), list(batch["patient_id"]), vectors)
        return table.append_column("split", pa.array(list(batch["split"]), pa.string()))


def _write_parts(table: pa.Table, out_uri: str) -> dict[str, list[Any]]:
    """map_batches: one part file per split in this batch, at <out>/<split>/part-<digest of its ids>.parquet."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    written: dict[str, list[Any]] = {"split": [], "file": [], "rows": []}
    for split in sorted(set(table["split"].to_pylist())):
        part = table.filter(pc.equal(table["split"], split)).drop_columns(["split"])
        buffer = io.BytesIO()
        pq.write_table(part, buffer)
        name = shards.shard_name(part)
        storage.write_bytes(storage.join(out_uri, split, name), buffer.getvalue())
        written["split"].append(split)
        written["file"].append(name)
        written["rows"].append(part.num_rows)
    return written


def embed_dataset(cfg: EmbedConfig) -> dict[str, int]:
    """Embed each requested split of a committed dataset; returns rows written per split."""
    import ray

    from raymem.data.stream import open_split
    from raymem.models.detector import load_detector

    detector_bytes = storage.read_bytes(cfg.detector)
    load_detector(detector_bytes, source=cfg.detector)  # a file that is no detector fails here, not in every actor
    manifest = shards.read_manifest(cfg.data)
    splits = [split for split in cfg.splits if manifest["splits"].get(split, {}).get("images", 0)]
    if not splits:
        return {}
    columns = ("sample_id", "patient_id", "split", "image")
    data = functools.reduce(lambda first, second: first.union(second),
                            [open_split(cfg.data, split, columns=columns) for split in splits])
    written = (data
               .map_batches(_Embedder, batch_format="numpy", batch_size=cfg.batch_size * 16,
                            fn_constructor_kwargs={"detector_bytes": detector_bytes, "batch_size": cfg.batch_size},
                            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                            num_gpus=1 if cfg.use_gpu else 0)
               .map_batches(_write_parts, batch_format="pyarrow", batch_size=None, fn_kwargs={"out_uri": cfg.out})
               .take_all())
    counts = {split: sum(row["rows"] for row in written if row["split"] == split) for split in splits}
    for split in splits:
        assert counts[split] == manifest["splits"][split]["images"], (split, counts[split])
    return counts
