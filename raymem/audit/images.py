"""The image-level audit: a dataset, synthetic images (a raymem dataset or any folder of images) and a detector.

    synthetic folder --ingest (same shape/normalisation as the dataset)--> synthetic dataset
    [--plant-copies N: N transformed copies of the generator's training images and N transformed images of
     held-out patients, transforms recorded in planted.parquet]
    [--null-synthetic: samples of a generator trained on held-out patients]
    embed train, val, test, synthetic (+ null, planted) --> the embedding audit (raymem.audit.embeddings)
    --> report.html

The generated samples are compared with the generator's own training set (its LDM run's training_ids.json) and
the headline figures describe them only; planted samples are scored apart. Outputs under ``out``: metrics.json,
matches.parquet, report.html, planted.parquet (when planting), embeddings/, synthetic-dataset/ (when the synthetic
input was a folder of images). One MLflow run per audit. A rerun into the same ``out`` (after a kill or a success)
recomputes the audit, replacing those outputs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from raymem import storage
from raymem.audit import embeddings as embedding_audit
from raymem.audit.embeddings import numeric_items  # noqa: F401 - the sweep reads it from here
from raymem.audit.report import CopyPair, render_report, write_report
from raymem.config import AuditConfig, EmbedConfig, IngestConfig
from raymem.data import shards

log = logging.getLogger(__name__)

PLANTED = "planted"
MIN_HELDOUT_NEGATIVES = 20  # images of held-out patients the held-out copy families need as negatives
PLANT_LEVEL = "copy"  # raymem.models.copy_transforms.TRANSFORM_PRESETS key used for planted copies
# What an audit writes under its output folder, the files a finished audit is read from first: a rerun removes them in
# this order before recomputing, so that a killed run's leftovers (part files named by how Ray Data batched the rows,
# committed datasets an ingest will not overwrite) never mix with the new run's. mlflow.db is kept (the run reopens).
OUTPUTS = ("metrics.json", "matches.parquet", "report.html", "planted.parquet", "embeddings", "planted-dataset",
           "synthetic-dataset", "generator-null")


def _is_dataset(uri: str) -> bool:
    return storage.exists(storage.join(uri, shards.MANIFEST))


def synthetic_as_dataset(synthetic_uri: str, real_manifest: dict, work_uri: str) -> str:
    """The synthetic set as a committed dataset: used as is, or ingested with the real dataset's settings."""
    if _is_dataset(synthetic_uri):
        synthetic = shards.read_manifest(synthetic_uri)
        if synthetic["image_shape"] != real_manifest["image_shape"]:
            raise ValueError(f"synthetic images have shape {synthetic['image_shape']} but the dataset's are "
                             f"{real_manifest['image_shape']}: ingest them with the same --size")
        return synthetic_uri
    return _ingest_synthetic(synthetic_uri, synthetic_ingest_config(real_manifest), work_uri)


def synthetic_ingest_config(real_manifest: dict) -> IngestConfig:
    """How a folder of synthetic images is ingested for an audit: with the real dataset's size and normalisation,
    every image in one train split, and a file that cannot be read set aside rather than stopping the audit."""
    return IngestConfig(**{**real_manifest["config"], "val_fraction": 0.0, "test_fraction": 0.0, "strict": False,
                           "synthetic": True})


def _ingest_synthetic(synthetic_uri: str, cfg: IngestConfig, work_uri: str) -> str:
    """<work_uri>/synthetic-dataset ingested from a folder of images (a Ray Data job)."""
    from raymem.data.ingest import IngestError, ingest

    target = storage.join(work_uri, "synthetic-dataset")
    try:
        summary = ingest(synthetic_uri, target, cfg)
    except IngestError as err:  # e.g. no usable image: say which input of the audit it was
        raise IngestError(f"synthetic images {synthetic_uri}: {err}") from None
    log.info("synthetic images ingested: %d, set aside: %d", summary.ingested, summary.quarantined)
    return target


def generator_training_set(synthetic_dataset_uri: str) -> tuple[list[str] | None, str | None]:
    """(the training sample_ids, the LDM run URI) of the raymem LDM run that made a synthetic dataset, read from its
    training_ids.json; (None, None) for samples of any other generator, (None, run) for a run that predates it."""
    from raymem.train.ldm import TRAINING_IDS_FILE

    run = shards.read_manifest(synthetic_dataset_uri).get("synthetic", {}).get("run")
    if not run:
        return None, None
    ids_uri = storage.join(run, TRAINING_IDS_FILE)
    return (json.loads(storage.read_bytes(ids_uri)) if storage.exists(ids_uri) else None), run


def plant_copies(dataset_uri: str, n: int, seed: int, out_uri: str, *, copy_ids: list[str] | None = None,
                 novel_patients: set[str] | None = None) -> tuple[dict[str, str], list[str]]:
    """Plant known truth: N transformed copies of random training images (of ``copy_ids`` when given: the
    generator's own training set; drawn with replacement when it holds fewer than N), and N images of held-out
    patients under the same transforms as known novel samples (the test split; without one, the validation patients
    in ``novel_patients``, the audit's evaluation half); written as a one-split dataset.

    Returns ({copy id: train id}, [novel ids]). The novel ones are the negatives that specificity is measured on:
    a generator's own samples have no known truth (a memorizing model makes real copies), and the validation
    patients that set the threshold are never used. Transforms come from TRANSFORM_PRESETS[PLANT_LEVEL] (rotation,
    flip, contrast, brightness, noise); every drawn parameter is recorded in <out>/planted.parquet (``train_id``
    null for the novel ones, ``source_id`` the image each was made from).
    """
    from raymem.data.ingest import SYNTHETIC_PATIENT, write_dataset
    from raymem.models.copy_transforms import TRANSFORM_PRESETS, apply_transform, sample_transform

    manifest = shards.read_manifest(dataset_uri)
    columns = ["sample_id", "patient_id", "image", "spacing", "modality"]
    train = shards.load_split(dataset_uri, "train", columns)
    if copy_ids is not None:
        train = train.filter(pc.is_in(train["sample_id"], value_set=pa.array(sorted(copy_ids), pa.string())))
    if manifest["splits"].get("test", {}).get("images"):
        held_out = shards.load_split(dataset_uri, "test", columns)
    else:
        held_out = shards.load_split(dataset_uri, "val", columns)
        if novel_patients is not None:
            held_out = held_out.filter(pc.is_in(held_out["patient_id"],
                                                value_set=pa.array(sorted(novel_patients), pa.string())))
    if n > held_out.num_rows or train.num_rows == 0:
        raise ValueError(f"--plant-copies {n} needs {n} held-out images (test split, else the evaluation half of "
                         f"val) and at least one training image; there are {held_out.num_rows} and {train.num_rows}")
    rng = np.random.default_rng(seed)
    picked = {"copy": (train, np.sort(rng.choice(train.num_rows, size=n, replace=n > train.num_rows))),
              "novel": (held_out, np.sort(rng.choice(held_out.num_rows, size=n, replace=False)))}
    generator = torch.Generator().manual_seed(seed)
    low, high = manifest["intensity_range"]
    samples, record = [], {"synthetic_id": [], "kind": [], "train_id": [], "source_id": []}
    parameters = []
    for kind, (table, rows) in picked.items():
        originals = torch.from_numpy(shards.images_of(table.take(rows)).astype(np.float32))
        params = sample_transform(TRANSFORM_PRESETS[PLANT_LEVEL], n, manifest["spatial_dims"], generator)
        parameters.append(params)
        images = apply_transform(originals, params, generator).clamp(low, high).numpy()
        prefix = PLANTED if kind == "copy" else f"{PLANTED}-novel"
        for i, (r, image) in enumerate(zip(rows, images)):
            source_id = table["sample_id"][int(r)].as_py()
            sample_id = f"{prefix}-{i:05d}"
            samples.append(shards.Sample(
                sample_id=sample_id, patient_id=SYNTHETIC_PATIENT, split="train", image=image,
                spacing_mm=tuple(table["spacing"][int(r)].as_py()), modality=table["modality"][int(r)].as_py(),
                source=f"planted {kind} from {source_id}", content_hash=""))
            record["synthetic_id"].append(sample_id)
            record["kind"].append(kind)
            record["train_id"].append(source_id if kind == "copy" else None)
            record["source_id"].append(source_id)
    write_dataset(storage.join(out_uri, "planted-dataset"), samples, IngestConfig(**manifest["config"]),
                  tuple(manifest["image_shape"]), pseudonym_key=manifest["pseudonym_key"])
    for field in dataclasses.fields(parameters[0]):
        values = np.concatenate([getattr(params, field.name).cpu().numpy().reshape(n, -1) for params in parameters])
        record[field.name] = [list(v) if len(v) > 1 else float(v[0]) for v in values.astype(np.float64)]
    shards.write_table(storage.join(out_uri, "planted.parquet"), pa.table(record))
    copies = {sid: tid for sid, kind, tid in zip(record["synthetic_id"], record["kind"], record["train_id"])
              if kind == "copy"}
    return copies, [sid for sid, kind in zip(record["synthetic_id"], record["kind"]) if kind == "novel"]


def detector_heldout_accuracy(dataset_uri: str, synthetic_dataset_uri: str, detector_uri: str,
                              training_ids: list[str] | None, negative_split: str, seed: int) -> dict:
    """The detector scored on copies it never trained on, for an audit of a raymem LDM's samples: the LDM's own
    autoencoder round trip of its training images (what a generated copy looks like) and the held-out families of
    raymem.models.heldout_copies; negatives are the same families applied to held-out patients' images.
    Sensitivity at 95 % specificity and ROC AUC with 95 % intervals (raymem.audit.accuracy.heldout_copy_accuracy)."""
    from raymem.audit.accuracy import heldout_copy_accuracy
    from raymem.generate import checkpoint_uri
    from raymem.models.detector import embed, load_detector
    from raymem.models.heldout_copies import autoencoder_round_trip
    from raymem.models.ldm import load_ldm

    synthetic = shards.read_manifest(synthetic_dataset_uri)["synthetic"]
    ldm_uri = checkpoint_uri(synthetic["run"], synthetic.get("epoch"))[0]
    ldm, state = load_ldm(storage.read_bytes(ldm_uri), source=ldm_uri)
    detector = load_detector(storage.read_bytes(detector_uri), source=detector_uri)
    train = shards.load_split(dataset_uri, "train", ["sample_id", "patient_id", "image"])
    if training_ids is not None:
        train = train.filter(pc.is_in(train["sample_id"], value_set=pa.array(sorted(training_ids), pa.string())))
    negatives = shards.load_split(dataset_uri, negative_split, ["patient_id", "image"])
    if negatives.num_rows < MIN_HELDOUT_NEGATIVES:
        return {"skipped": f"the {negative_split} split holds {negatives.num_rows} images; scoring held-out copy "
                           f"families needs at least {MIN_HELDOUT_NEGATIVES} negatives"}
    with torch.no_grad():
        figures = heldout_copy_accuracy(
            lambda images: embed(detector, images), shards.images_of(train).astype(np.float32),
            shards.images_of(negatives).astype(np.float32),
            autoencoder_round_trip=autoencoder_round_trip(
                ldm, value_range=tuple(state["metadata"]["intensity_range"])),
            original_patients=train["patient_id"].to_pylist(), negative_patients=negatives["patient_id"].to_pylist(),
            seed=seed)
    return {**figures, "negatives": f"{negative_split} split"}


def images_by_id(dataset_uri: str, split: str, sample_ids: Iterable[str]) -> dict[str, np.ndarray]:
    """Images (1, *spatial) of the given samples, scanning the split's shards (for the report's few pairs)."""
    wanted = pa.array(sorted(set(sample_ids)), pa.string())
    found = {}
    for batch in shards.iter_split(dataset_uri, split, ["sample_id", "image"]):
        table = pa.Table.from_batches([batch])
        hits = table.filter(pc.is_in(table["sample_id"], value_set=wanted))
        if hits.num_rows:
            found.update(zip(hits["sample_id"].to_pylist(), shards.images_of(hits)))
    return found


def audit_images(dataset_uri: str, synthetic_uri: str, detector_uri: str, out_uri: str, cfg: AuditConfig, *,
                 labels_csv: str | None = None, distributed: bool = False, experiment: str = "raymem",
                 run_name: str = "audit", embed_settings: dict | None = None,
                 null_synthetic_uri: str | None = None) -> dict:
    """Embed, audit and report; returns the metrics dict (also in <out>/metrics.json and MLflow).

    The generated samples are compared with the generator's own training set when they come from a raymem LDM run
    (cfg.reference "generator"); the dataset's test split, when it has one, is the evaluation set.
    null_synthetic_uri: samples (a dataset or a folder of images) of a generator trained only on held-out patients
    (``raymem train-ldm --split test``): calibration "generator". embed_settings: EmbedConfig fields other than
    detector/data/out/splits (batch_size, num_actors, use_gpu).
    """
    from raymem.embed import embed_dataset
    from raymem.models.detector import load_detector

    load_detector(storage.read_bytes(detector_uri), source=detector_uri)  # before any long step
    clear_outputs(out_uri, inputs=[dataset_uri, synthetic_uri, detector_uri, null_synthetic_uri, labels_csv])

    def embed(data: str, out: str, splits: tuple[str, ...]) -> str:
        settings = {key: value for key, value in (embed_settings or {}).items() if key != "splits"}
        embed_dataset(EmbedConfig(detector=detector_uri, data=data, out=out, splits=splits, **settings))
        return storage.join(out, splits[0]) if len(splits) == 1 else out

    manifest = shards.read_manifest(dataset_uri)
    has_test = bool(manifest["splits"].get("test", {}).get("images"))
    synthetic_dataset = synthetic_as_dataset(synthetic_uri, manifest, out_uri)
    training_ids, ldm_run = generator_training_set(synthetic_dataset)
    reference_ids = training_ids if cfg.reference == "generator" else None
    emb = storage.join(out_uri, "embeddings")
    embed(dataset_uri, emb, ("train", "val", "test") if has_test else ("train", "val"))
    synthetic_emb = embed(synthetic_dataset, storage.join(emb, "synthetic"), ("train",))
    null_emb = None
    if null_synthetic_uri:
        null_dataset = synthetic_as_dataset(null_synthetic_uri, manifest, storage.join(out_uri, "generator-null"))
        null_emb = embed(null_dataset, storage.join(emb, "generator-null"), ("train",))
    planted, planted_novel, planted_emb = {}, [], None
    if cfg.plant_copies:
        novel_patients = None
        if not has_test:
            from raymem.audit.embeddings import EmbeddingSource, evaluation_split

            val_patients = EmbeddingSource(storage.join(emb, "val"), "val", require_patients=True).patient_ids
            novel_patients = set(val_patients[evaluation_split(val_patients, cfg.seed)[1]].astype(str))
        planted, planted_novel = plant_copies(dataset_uri, cfg.plant_copies, cfg.seed, out_uri,
                                              copy_ids=reference_ids, novel_patients=novel_patients)
        planted_emb = embed(storage.join(out_uri, "planted-dataset"), storage.join(emb, PLANTED), ("train",))

    result = embedding_audit.run_audit(
        storage.join(emb, "train"), storage.join(emb, "val"), synthetic_emb,
        test_uri=storage.join(emb, "test") if has_test else None, null_uri=null_emb, reference_ids=reference_ids,
        percentile=cfg.percentile, top_k=cfg.top_k, calibration=cfg.calibration, planted_uri=planted_emb,
        planted=planted, planted_novel=planted_novel, labels_csv=labels_csv, seed=cfg.seed, distributed=distributed)
    if ldm_run:
        result.metrics["reference"]["ldm_run"] = ldm_run
        result.metrics["detector_heldout"] = detector_heldout_accuracy(
            dataset_uri, synthetic_dataset, detector_uri, training_ids, "test" if has_test else "val", cfg.seed)
    embedding_audit.write_outputs(result, out_uri)

    html = audit_report(result, dataset_uri, synthetic_dataset, cfg.calibration)
    write_report(storage.join(out_uri, "report.html"), html)
    embedding_audit.track_audit(result, out_uri, experiment=experiment, run_name=run_name,
                                params={"dataset": dataset_uri, "synthetic": synthetic_uri, "detector": detector_uri,
                                        "null_synthetic": null_synthetic_uri, **cfg.model_dump()},
                                artifacts={"report.html": html})
    return result.metrics


def clear_outputs(out_uri: str, inputs: Iterable[str | None] = ()) -> None:
    """Remove what an earlier audit (finished or killed) wrote under ``out_uri``; anything else there is kept.

    inputs: the audit's input URIs; one inside an output to remove (the synthetic-dataset/ of an earlier audit given
    as --synthetic) is an error rather than deleted.
    """
    for name in OUTPUTS:
        output = storage.absolute(storage.join(out_uri, name))
        for uri in filter(None, inputs):
            if storage.absolute(uri) == output or storage.absolute(uri).startswith(output.rstrip("/") + "/"):
                raise ValueError(f"{uri} lies inside {output}, which an audit into {out_uri} replaces: copy it "
                                 "elsewhere or choose another output folder")
    previous = [name for name in OUTPUTS if storage.exists(storage.join(out_uri, name))]
    if previous:
        log.info("replacing the earlier audit in %s (%s)", out_uri, ", ".join(previous))
    for name in previous:
        storage.delete(storage.join(out_uri, name))


def audit_report(result: embedding_audit.AuditResult, dataset_uri: str, synthetic_dataset_uri: str,
                 calibration: str) -> str:
    """report.html for an audit: its figures, and the images of its top pairs read back from the datasets."""
    train_images = images_by_id(dataset_uri, "train", [p["train_id"] for p in result.top_pairs])
    synthetic_images = images_by_id(synthetic_dataset_uri, "train", [p["synthetic_id"] for p in result.top_pairs])
    pairs = [CopyPair(synthetic_id=p["synthetic_id"], train_id=p["train_id"], patient_id=p["patient_id"],
                      score=p["score"], synthetic_image=synthetic_images.get(p["synthetic_id"]),
                      train_image=train_images.get(p["train_id"])) for p in result.top_pairs]
    null = {"paper": result.null_scores, "matched": result.null_scores_matched,
            "generator": result.null_scores_generator}[calibration]
    return render_report(metrics=result.metrics, synthetic_top1=result.synthetic_top1, null_scores=null,
                         pairs=pairs, patients=result.patients)


def filter_copies(audit_uri: str, synthetic_uri: str, out_uri: str) -> dict[str, int]:
    """Privacy filter: the synthetic dataset without the samples the audit flagged as copies."""
    from raymem.data.ingest import write_dataset

    matches = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(audit_uri, "matches.parquet"))),
                            columns=["kind", "sample_id", "is_copy"])
    synthetic_rows = matches.filter(pc.equal(matches["kind"], "synthetic"))
    flagged = set(synthetic_rows.filter(pc.fill_null(synthetic_rows["is_copy"], False))["sample_id"].to_pylist())
    manifest = shards.read_manifest(synthetic_uri)
    counts = {"kept": 0, "removed": 0}
    flagged_ids = pa.array(sorted(flagged), pa.string())

    def kept_samples() -> Iterable[shards.Sample]:
        for split in shards.SPLITS:
            if not manifest["splits"].get(split, {}).get("images"):
                continue
            for batch in shards.iter_split(synthetic_uri, split):
                table = pa.Table.from_batches([batch])
                table = table.filter(pc.invert(pc.is_in(table["sample_id"], value_set=flagged_ids)))
                counts["removed"] += batch.num_rows - table.num_rows
                counts["kept"] += table.num_rows
                for row, image in zip(table.drop_columns(["image"]).to_pylist(), shards.images_of(table)):
                    yield shards.Sample(sample_id=row["sample_id"], patient_id=row["patient_id"], split=split,
                                        image=image, spacing_mm=tuple(row["spacing"]), modality=row["modality"],
                                        source=row["source"], content_hash=row["content_hash"])

    write_dataset(out_uri, kept_samples(), IngestConfig(**manifest["config"]), tuple(manifest["image_shape"]),
                  pseudonym_key=manifest["pseudonym_key"], extra={"filtered_from": synthetic_uri,
                                                                  "flagged_copies": len(flagged)})
    return {"synthetic": counts["kept"] + counts["removed"], **counts}
