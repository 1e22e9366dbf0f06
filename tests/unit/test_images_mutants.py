"""raymem.audit.images without Ray: planting known copies, the privacy filter, the generator's training set, the
outputs a rerun replaces and the report's image lookup, on small phantom datasets written to disk, checked against
what the datasets hold (each planted image against its own source, each kept sample by id).

Written so that mutation testing (tools/mutation.sh) can measure these functions with unit tests; the integration
test (tests/integration/test_audit_images.py) runs them inside a real audit on Ray."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raymem.audit import images
from raymem.config import IngestConfig
from raymem.data import shards
from raymem.data.ingest import SYNTHETIC_PATIENT, phantom_dataset, write_dataset
from raymem.models.copy_transforms import TRANSFORM_PRESETS, TransformParams, apply_transform, sample_transform

SIZE = 32


def phantoms(folder, *, patients: int, images_per_patient: int, test_fraction: float = 0.25, seed: int = 3) -> str:
    cfg = IngestConfig(val_fraction=0.25, test_fraction=test_fraction, seed=0)
    phantom_dataset(str(folder), "xray2d", patients=patients, images_per_patient=images_per_patient, size=SIZE,
                    seed=seed, cfg=cfg)
    return str(folder)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 patients of 3 images: 6 train patients (18 images), 3 val, 3 test."""
    return phantoms(tmp_path_factory.mktemp("phantoms"), patients=12, images_per_patient=3)


@pytest.fixture(scope="module")
def no_test_dataset(tmp_path_factory):
    """16 patients of 2 images, train and val only."""
    return phantoms(tmp_path_factory.mktemp("no-test"), patients=16, images_per_patient=2, test_fraction=0.0)


def split_rows(dataset_uri: str, split: str) -> dict[str, tuple[str, np.ndarray]]:
    table = shards.load_split(dataset_uri, split, ["sample_id", "patient_id", "image"])
    return {sid: (pid, image[0].astype(np.float64)) for sid, pid, image in
            zip(table["sample_id"].to_pylist(), table["patient_id"].to_pylist(), shards.images_of(table))}


def planted(out) -> tuple[dict, pa.Table]:
    dataset = split_rows(str(out / "planted-dataset"), "train")
    record = pq.read_table(out / "planted.parquet")
    return dataset, record


# plant_copies


def test_planting_writes_n_copies_of_training_images_and_n_transformed_test_images(dataset, tmp_path):
    copies, novel = images.plant_copies(dataset, 5, seed=7, out_uri=str(tmp_path))

    train, test = split_rows(dataset, "train"), split_rows(dataset, "test")
    written, record = planted(tmp_path)
    assert sorted(copies) == [f"planted-{i:05d}" for i in range(5)]
    assert novel == [f"planted-novel-{i:05d}" for i in range(5)]
    assert set(copies.values()) <= set(train) and len(set(copies.values())) == 5  # drawn without replacement
    assert sorted(written) == sorted([*copies, *novel])
    rows = record.to_pylist()
    assert [r["synthetic_id"] for r in rows] == [*sorted(copies), *novel]
    assert [r["kind"] for r in rows] == ["copy"] * 5 + ["novel"] * 5
    for row in rows:
        if row["kind"] == "copy":
            assert row["train_id"] == row["source_id"] == copies[row["synthetic_id"]]
        else:
            assert row["train_id"] is None and row["source_id"] in test
    # the planted dataset holds one synthetic patient, in the dataset's intensity range, in one train split
    manifest = shards.read_manifest(str(tmp_path / "planted-dataset"))
    assert {pid for pid, _ in written.values()} == {SYNTHETIC_PATIENT}
    assert manifest["splits"]["train"]["images"] == 10 and not manifest["splits"].get("val", {}).get("images")
    low, high = shards.read_manifest(dataset)["intensity_range"]
    assert all(low <= image.min() and image.max() <= high for _, image in written.values())


def test_each_planted_image_is_its_source_under_the_recorded_transform(dataset, tmp_path):
    """Rebuild each planted image from its source and the parameters planted.parquet records, without the noise:
    what is left is the recorded noise (and float16 rounding); a parameter recorded for the wrong image, or not the
    one applied, leaves far more."""
    images.plant_copies(dataset, 6, seed=11, out_uri=str(tmp_path))
    written, record = planted(tmp_path)
    sources = {**split_rows(dataset, "train"), **split_rows(dataset, "test")}
    rows = record.to_pylist()
    names = [field.name for field in dataclasses.fields(TransformParams)]
    shapes = sample_transform(TRANSFORM_PRESETS[images.PLANT_LEVEL], len(rows), 2, torch.Generator())
    params = TransformParams(**{name: torch.tensor([row[name] for row in rows]).reshape(getattr(shapes, name).shape)
                                .to(getattr(shapes, name).dtype) for name in names})
    originals = torch.from_numpy(np.stack([sources[row["source_id"]][1] for row in rows])[:, None]).float()
    noiseless = apply_transform(originals, dataclasses.replace(params, noise_std=torch.zeros(len(rows))),
                                torch.Generator().manual_seed(0)).clamp(0.0, 1.0).numpy()[:, 0]
    bounds = TRANSFORM_PRESETS[images.PLANT_LEVEL]
    for i, row in enumerate(rows):
        assert abs(row["rotation_deg"]) <= bounds.rotation_deg and 0 < row["noise_std"] <= bounds.noise_std
        image = written[row["synthetic_id"]][1]
        residual = float(np.sqrt(np.mean((image - noiseless[i]) ** 2)))
        value_range = float(noiseless[i].max() - noiseless[i].min())
        assert residual < 1.5 * row["noise_std"] * value_range + 2e-3, (row["synthetic_id"], residual)
    assert len({row["rotation_deg"] for row in rows}) == len(rows)  # one draw per image, not one for all


def test_planting_only_copies_the_generators_training_set_drawn_with_replacement_when_smaller(dataset, tmp_path):
    own = sorted(split_rows(dataset, "train"))[:2]
    copies, _ = images.plant_copies(dataset, 4, seed=1, out_uri=str(tmp_path), copy_ids=own)

    assert set(copies.values()) <= set(own) and len(copies) == 4


def test_without_a_test_split_novel_images_come_from_the_given_validation_patients(no_test_dataset, tmp_path):
    val = split_rows(no_test_dataset, "val")
    evaluation_half = sorted({pid for pid, _ in val.values()})[:2]
    _, novel = images.plant_copies(no_test_dataset, 4, seed=2, out_uri=str(tmp_path),
                                   novel_patients=set(evaluation_half))

    record = pq.read_table(tmp_path / "planted.parquet").to_pylist()
    sources = [row["source_id"] for row in record if row["kind"] == "novel"]
    assert len(novel) == 4 and {val[sid][0] for sid in sources} <= set(evaluation_half)
    assert len(set(sources)) == 4  # novel images are drawn without replacement


def test_planting_as_many_images_as_there_are_draws_each_source_once(dataset, tmp_path):
    """n equal to the images to draw from: every training image of copy_ids and every test image exactly once."""
    test = split_rows(dataset, "test")
    own = sorted(split_rows(dataset, "train"))[:len(test)]

    copies, _ = images.plant_copies(dataset, len(test), seed=5, out_uri=str(tmp_path), copy_ids=own)

    novel_sources = [row["source_id"] for row in pq.read_table(tmp_path / "planted.parquet").to_pylist()
                     if row["kind"] == "novel"]
    assert (sorted(copies.values()), sorted(novel_sources)) == (own, sorted(test))


def test_planted_rows_carry_their_sources_modality_and_a_planted_source_and_the_key_is_kept(dataset, tmp_path):
    copies, novel = images.plant_copies(dataset, 3, seed=9, out_uri=str(tmp_path))

    table = shards.load_split(str(tmp_path / "planted-dataset"), "train",
                              ["sample_id", "modality", "source", "content_hash"]).to_pylist()
    record = {row["synthetic_id"]: row for row in pq.read_table(tmp_path / "planted.parquet").to_pylist()}
    modality = set(shards.load_split(dataset, "train", ["modality"])["modality"].to_pylist())
    assert [(row["modality"], row["source"], row["content_hash"]) for row in table] == [
        (next(iter(modality)), f"planted {record[row['sample_id']]['kind']} from "
                               f"{record[row['sample_id']]['source_id']}", "") for row in table]
    assert len(modality) == 1 and len(table) == 6 and {row["sample_id"] for row in table} == {*copies, *novel}
    assert shards.read_manifest(str(tmp_path / "planted-dataset"))["pseudonym_key"] == \
        shards.read_manifest(dataset)["pseudonym_key"]


def test_planting_more_than_the_held_out_images_is_refused_with_the_counts(dataset, no_test_dataset, tmp_path):
    n_test = shards.read_manifest(dataset)["splits"]["test"]["images"]
    with pytest.raises(ValueError, match=rf"--plant-copies {n_test + 1} needs {n_test + 1} held-out .* there are "
                                         rf"{n_test} and 18"):
        images.plant_copies(dataset, n_test + 1, seed=0, out_uri=str(tmp_path))
    with pytest.raises(ValueError, match=f"there are {n_test} and 0"):  # no training image of the generator
        images.plant_copies(dataset, 1, seed=0, out_uri=str(tmp_path), copy_ids=["no-such-sample"])
    val = split_rows(no_test_dataset, "val")
    one_patient = {next(pid for pid, _ in val.values())}
    with pytest.raises(ValueError, match="there are 2 and"):
        images.plant_copies(no_test_dataset, 3, seed=0, out_uri=str(tmp_path), novel_patients=one_patient)


def test_planting_repeats_with_a_seed_and_changes_with_another(dataset, tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        images.plant_copies(dataset, 4, seed=seed, out_uri=str(tmp_path / name))
        written, record = planted(tmp_path / name)
        runs[name] = (np.stack([written[sid][1] for sid in sorted(written)]), record)
    assert np.array_equal(runs["a"][0], runs["b"][0]) and runs["a"][1].equals(runs["b"][1])
    assert not np.array_equal(runs["a"][0], runs["c"][0])


# filter_copies


def synthetic_dataset(folder, n: int, seed: int = 0, test_from: int | None = None) -> str:
    """n samples syn-000..., train, or test from index ``test_from`` on (no val split); patients and modalities
    alternate so that a sample written with the wrong one shows."""
    rng = np.random.default_rng(seed)
    samples = [shards.Sample(sample_id=f"syn-{i:03d}", patient_id=f"gen-{i % 2}",
                             split="test" if test_from is not None and i >= test_from else "train",
                             image=rng.random((1, 8, 8)).astype(np.float16), spacing_mm=(1.0, 0.5 + i),
                             modality=("XR", "CT")[i % 2], source=f"generated {i}", content_hash=f"h{i}")
               for i in range(n)]
    write_dataset(str(folder), samples, IngestConfig(size=(8, 8), spatial_dims=2, synthetic=True), (1, 8, 8),
                  pseudonym_key="key-of-the-source")
    return str(folder)


def write_matches(folder, rows: list[tuple[str, str, bool | None]]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    kinds, ids, flags = zip(*rows)
    pq.write_table(pa.table({"kind": list(kinds), "sample_id": list(ids), "is_copy": pa.array(flags, pa.bool_())}),
                   folder / "matches.parquet")
    return str(folder)


def test_the_privacy_filter_drops_exactly_the_synthetic_samples_flagged_as_copies(tmp_path):
    source = synthetic_dataset(tmp_path / "synthetic", 7)
    audit = write_matches(tmp_path / "audit", [
        ("synthetic", "syn-001", True), ("synthetic", "syn-004", True), ("synthetic", "syn-002", False),
        ("synthetic", "syn-005", None),  # not judged: kept
        ("planted", "syn-006", True),  # another kind that happens to share an id: not a synthetic sample's flag
        ("test", "syn-003", True)])

    counts = images.filter_copies(audit, source, str(tmp_path / "released"))

    released = shards.load_split(str(tmp_path / "released"), "train")
    kept = released["sample_id"].to_pylist()
    assert sorted(kept) == ["syn-000", "syn-002", "syn-003", "syn-005", "syn-006"]
    assert counts == {"synthetic": 7, "kept": 5, "removed": 2}
    original = shards.load_split(source, "train")
    by_id = dict(zip(original["sample_id"].to_pylist(), shards.images_of(original)))
    for sid, image, row in zip(kept, shards.images_of(released), released.drop_columns(["image"]).to_pylist()):
        i = int(sid[-3:])
        assert np.array_equal(image, by_id[sid])
        assert (row["patient_id"], row["modality"], row["spacing"], row["source"], row["content_hash"]) == \
            (f"gen-{i % 2}", ("XR", "CT")[i % 2], [1.0, 0.5 + i], f"generated {i}", f"h{i}")
    manifest = shards.read_manifest(str(tmp_path / "released"))
    assert manifest["filtered_from"] == source and manifest["flagged_copies"] == 2
    assert manifest["pseudonym_key"] == "key-of-the-source"


def test_the_privacy_filter_with_nothing_flagged_releases_every_split_after_an_empty_one(tmp_path):
    source = synthetic_dataset(tmp_path / "synthetic", 6, test_from=4)  # train and test, no val
    audit = write_matches(tmp_path / "audit", [("synthetic", "syn-000", False), ("synthetic", "syn-005", None)])

    counts = images.filter_copies(audit, source, str(tmp_path / "released"))

    assert counts == {"synthetic": 6, "kept": 6, "removed": 0}
    assert shards.load_split(str(tmp_path / "released"), "test")["sample_id"].to_pylist() == ["syn-004", "syn-005"]
    assert shards.read_manifest(str(tmp_path / "released"))["flagged_copies"] == 0


def test_the_privacy_filter_keeps_every_split_and_counts_the_total(dataset, tmp_path):
    val_ids = sorted(split_rows(dataset, "val"))
    audit = write_matches(tmp_path / "audit", [("synthetic", val_ids[0], True)])

    counts = images.filter_copies(audit, dataset, str(tmp_path / "released"))

    total = sum(split["images"] for split in shards.read_manifest(dataset)["splits"].values())
    assert counts == {"synthetic": total, "kept": total - 1, "removed": 1}
    assert sorted(split_rows(str(tmp_path / "released"), "val")) == val_ids[1:]
    assert sorted(split_rows(str(tmp_path / "released"), "test")) == sorted(split_rows(dataset, "test"))


# generator_training_set, synthetic_as_dataset


def test_the_generators_training_set_is_read_from_its_ldm_run(tmp_path):
    other = synthetic_dataset(tmp_path / "other", 2)
    assert images.generator_training_set(other) == (None, None)

    run = tmp_path / "ldm-run"
    run.mkdir()
    manifest = shards.read_manifest(other)
    shards.write_manifest(other, {**manifest, "synthetic": {"run": str(run), "epoch": 3}})
    assert images.generator_training_set(other) == (None, str(run))  # a run from before training_ids.json

    from raymem.train.ldm import TRAINING_IDS_FILE

    (run / TRAINING_IDS_FILE).write_text(json.dumps(["a-000", "b-001"]))
    assert images.generator_training_set(other) == (["a-000", "b-001"], str(run))


def test_only_a_folder_with_a_manifest_is_taken_for_a_dataset(dataset, tmp_path):
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "sample-000.png").write_bytes(b"not read")
    assert images._is_dataset(dataset) and not images._is_dataset(str(tmp_path / "pngs"))


def test_synthetic_images_are_ingested_like_the_dataset_all_into_one_train_split(dataset):
    real = shards.read_manifest(dataset)

    cfg = images.synthetic_ingest_config(real).model_dump(mode="json")

    changed = {"val_fraction": 0.0, "test_fraction": 0.0, "strict": False, "synthetic": True}
    assert {key: value for key, value in cfg.items() if key in changed} == changed
    assert {key: value for key, value in cfg.items() if key not in changed} == \
        {key: value for key, value in real["config"].items() if key not in changed}
    assert real["config"]["val_fraction"] == 0.25 and real["config"]["test_fraction"] == 0.25  # both were changed


def test_a_folder_of_synthetic_images_is_ingested_with_the_datasets_settings_into_the_work_folder(dataset, tmp_path,
                                                                                                  monkeypatch):
    """The Ray Data ingest itself runs in the integration test; here, what it is asked to do."""
    calls = []
    monkeypatch.setattr(images, "_ingest_synthetic", lambda *args: calls.append(args) or "ingested")
    folder = tmp_path / "samples"
    folder.mkdir()
    manifest = shards.read_manifest(dataset)

    uri = images.synthetic_as_dataset(str(folder), manifest, str(tmp_path / "work"))

    assert (uri, calls) == ("ingested", [(str(folder), images.synthetic_ingest_config(manifest), str(tmp_path / "work"))])


def test_a_synthetic_dataset_is_used_as_is_unless_its_image_shape_differs(dataset, tmp_path):
    same = phantoms(tmp_path / "same", patients=4, images_per_patient=1)
    assert images.synthetic_as_dataset(same, shards.read_manifest(dataset), str(tmp_path / "work")) == same
    assert not (tmp_path / "work").exists()

    other = synthetic_dataset(tmp_path / "small", 2)
    with pytest.raises(ValueError, match=r"synthetic images have shape \[1, 8, 8\] but the dataset's are "
                                         r"\[1, 32, 32\]: ingest them with the same --size"):
        images.synthetic_as_dataset(other, shards.read_manifest(dataset), str(tmp_path / "work"))


# clear_outputs, images_by_id


def test_a_rerun_removes_every_earlier_output_and_keeps_everything_else(tmp_path):
    for name in images.OUTPUTS:
        path = tmp_path / name
        if "." in name:
            path.write_text("old")
        else:
            (path / "part").mkdir(parents=True)
            (path / "part" / "x.parquet").write_text("old")
    for keep in ("mlflow.db", "notes.txt", "synthetic-dataset-2"):
        (tmp_path / keep).write_text("keep")

    images.clear_outputs(str(tmp_path), inputs=[None, str(tmp_path / "synthetic-dataset-2")])

    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "notes.txt", "synthetic-dataset-2"]


class Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_rerun_logs_the_earlier_outputs_it_replaces_in_order(tmp_path):
    (tmp_path / "report.html").write_text("old")
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "metrics.json").write_text("old")
    handler, level = Messages(), images.log.level
    images.log.addHandler(handler)
    images.log.setLevel(logging.INFO)
    try:
        images.clear_outputs(str(tmp_path))
        images.clear_outputs(str(tmp_path))  # nothing left: nothing logged
    finally:
        images.log.removeHandler(handler)
        images.log.setLevel(level)

    assert handler.messages == [f"replacing the earlier audit in {tmp_path} (metrics.json, report.html, embeddings)"]


@pytest.mark.parametrize("inside", ["synthetic-dataset", "synthetic-dataset/train", "embeddings/synthetic",
                                    "generator-null"])
def test_an_input_inside_an_output_a_rerun_replaces_is_refused_and_nothing_is_deleted(tmp_path, inside):
    (tmp_path / "metrics.json").write_text("old")
    (tmp_path / inside).mkdir(parents=True)

    with pytest.raises(ValueError, match=rf"{tmp_path / inside} lies inside {tmp_path / inside.split('/')[0]}, "
                                         rf"which an audit into {tmp_path} replaces: copy it elsewhere or choose another output folder$"):
        images.clear_outputs(str(tmp_path), inputs=["/elsewhere/data", str(tmp_path / inside)])
    assert (tmp_path / "metrics.json").exists() and (tmp_path / inside).exists()


def test_the_report_reads_back_exactly_the_images_it_asks_for(dataset):
    train = split_rows(dataset, "train")
    wanted = sorted(train)[::5]

    found = images.images_by_id(dataset, "train", [*wanted, wanted[0], "not-in-the-split"])

    assert sorted(found) == wanted
    for sid in wanted:
        assert found[sid].shape == (1, SIZE, SIZE) and np.array_equal(found[sid][0].astype(np.float64), train[sid][1])
