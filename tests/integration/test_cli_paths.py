"""The CLI on a real local Ray cluster, as the README runs it: every stage with paths relative to the working directory
(Ray workers and Ray Train's storage do not share it), an audit rerun into the same folder, and errors that end in
one line rather than a Ray traceback: a pickled checkpoint, a synthetic folder without one usable image, a dataset
without training images."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raymem import cli, config, storage
from raymem.data import shards
from raymem.data.ingest import write_dataset

pytestmark = pytest.mark.slow

DETECTOR = "out/detector/detector/detector.pt"
AUDIT = ["audit", "--dataset", "ds", "--synthetic", "generated", "--detector", DETECTOR, "--out", "audit",
         "--top-k", "3"]


@pytest.fixture(scope="module")
def stages(ray_cluster, tmp_path_factory):
    """The README's stages run once from a working directory of their own, with relative paths only (input files,
    dataset, config files, training outputs, samples, audits); yields that directory and each stage's exit code.
    12 patients x 3 images of 32 px, one epoch each, 4 samples."""
    root = tmp_path_factory.mktemp("relative")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        Path("ingest.yaml").write_text("val_fraction: 0.25\ntest_fraction: 0.25\n")
        Path("ldm.yaml").write_text("ddim_steps: 3\ngrid_samples: 2\neval_max_images: 4\n")
        commands = {
            "phantoms": ["phantoms", "raw", "--patients", "12", "--images-per-patient", "3", "--size", "32",
                         "--as-files"],
            "generator": ["phantoms", "generated", "--patients", "4", "--images-per-patient", "1", "--size", "32",
                          "--seed", "9", "--as-files"],
            "ingest": ["ingest", "raw", "ds", "--size", "32", "32", "--config", "ingest.yaml"],
            "train-detector": ["train-detector", "--dataset", "ds", "--out", "out", "--epochs", "1",
                               "--batch-size", "8", "--num-workers", "1"],
            "train-ldm": ["train-ldm", "--dataset", "ds", "--out", "out", "--config", "ldm.yaml",
                          "--autoencoder-epochs", "1", "--diffusion-epochs", "1", "--batch-size", "4",
                          "--num-workers", "1", "--train-size", "8"],
            "sample": ["sample", "--run", "out/ldm/ldm", "--n", "4", "--out", "synthetic", "--ddim-steps", "3",
                       "--batch-size", "4", "--num-actors", "1"],
            "audit": AUDIT,
            "audit-embeddings": ["audit-embeddings", *(f"--{name}=audit/embeddings/{name}" for name in
                                                       ("train", "val", "test", "synthetic")), "--out", "audit-emb"],
            "filter": ["filter", "--audit", "audit", "--synthetic", "audit/synthetic-dataset", "--out", "released"],
        }
        codes = {name: cli.main(argv) for name, argv in commands.items()}
    yield root, codes


def _stderr_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_every_stage_takes_paths_relative_to_the_working_directory(stages):
    root, codes = stages

    assert codes == dict.fromkeys(codes, 0)
    assert (root / "synthetic" / "manifest.json").exists() and (root / "audit" / "report.html").exists()


def test_an_audit_rerun_after_success_recomputes_into_the_same_folder(stages, monkeypatch):
    root, _ = stages
    monkeypatch.chdir(root)
    first = json.loads((root / "audit" / "metrics.json").read_text())

    code = cli.main(AUDIT)

    again = json.loads((root / "audit" / "metrics.json").read_text())
    assert (code, again["n_train"], again["n_synthetic"]) == (0, first["n_train"], first["n_synthetic"])


HEADLINE = ("n_train", "n_val", "n_synthetic", "n_copies", "n_memorized_train", "n_memorized_patients",
            "threshold_copies", "threshold_memorized", "pct_copies", "pct_memorized_train", "pct_memorized_patients")


def _embeddings(uri: str) -> dict[str, np.ndarray]:
    """sample_id -> embedding of an embedding folder's Parquet parts (local or S3)."""
    parts = [pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, name))), columns=["sample_id", "embedding"])
             for name in storage.list_files(uri, (".parquet",))]
    return {row["sample_id"]: np.asarray(row["embedding"]) for part in parts for row in part.to_pylist()}


def test_phantom_files_the_image_audit_embed_and_filter_on_s3_give_the_local_results(stages, s3_bucket,
                                                                                       monkeypatch):
    """The README's stages with their images and outputs on S3 (the moto server): the same phantom files, the
    same audit figures, embeddings and filtered dataset as the same stages run on local folders above."""
    root, _ = stages
    monkeypatch.chdir(root)
    s3 = f"{s3_bucket}/stages"
    codes = [cli.main(argv) for argv in (
        ["phantoms", f"{s3}/generated", "--patients", "4", "--images-per-patient", "1", "--size", "32",
         "--seed", "9", "--as-files"],
        ["audit", "--dataset", "ds", "--synthetic", f"{s3}/generated", "--detector", DETECTOR, "--out",
         f"{s3}/audit", "--top-k", "3"],
        ["embed", "--detector", DETECTOR, "--data", "ds", "--out", f"{s3}/embeddings", "--splits", "train"],
        ["filter", "--audit", f"{s3}/audit", "--synthetic", f"{s3}/audit/synthetic-dataset", "--out",
         f"{s3}/released"],
    )]

    assert codes == [0, 0, 0, 0]
    files = storage.list_files(f"{s3}/generated")
    assert files == storage.list_files(str(root / "generated"))
    assert all(storage.read_bytes(storage.join(f"{s3}/generated", name)) ==
               (root / "generated" / name).read_bytes() for name in files)
    on_s3, local = (json.loads(storage.read_bytes(storage.join(folder, "metrics.json")))
                    for folder in (f"{s3}/audit", str(root / "audit")))
    assert {key: on_s3[key] for key in HEADLINE} == pytest.approx({key: local[key] for key in HEADLINE}, rel=1e-6)
    embedded, audited = _embeddings(f"{s3}/embeddings/train"), _embeddings(str(root / "audit" / "embeddings" / "train"))
    assert sorted(embedded) == sorted(audited)
    assert all(np.allclose(embedded[key], audited[key], atol=1e-5) for key in audited)
    # The released images, by content (sample ids are keyed pseudonyms: each ingest of the samples draws its own).
    on_s3, local = ({split: (info["images"], info["patients"],
                             sorted(shards.load_split(folder, split, ["content_hash"]).column(0).to_pylist()))
                     for split, info in shards.read_manifest(folder)["splits"].items()}
                    for folder in (f"{s3}/released", str(root / "released")))
    assert on_s3 == local and sum(images for images, _, _ in local.values()) > 0


def test_an_audit_killed_while_embedding_restarts_cleanly(stages, monkeypatch):
    # A kill while embedding leaves the ingested synthetic images and some embedding part files, whose names depend
    # on how Ray Data batched the rows: a rerun must not count the old parts next to the new ones.
    root, _ = stages
    monkeypatch.chdir(root)
    for name in ("metrics.json", "matches.parquet", "report.html"):
        (root / "audit" / name).unlink()
    train_parts = root / "audit" / "embeddings" / "train"
    shutil.copy(next(train_parts.glob("part-*.parquet")), train_parts / "part-from-the-killed-run.parquet")

    code = cli.main(AUDIT)

    metrics = json.loads((root / "audit" / "metrics.json").read_text())
    assert (code, metrics["n_train"]) == (0, shards.read_manifest("ds")["splits"]["train"]["images"])


def test_a_synthetic_folder_without_one_usable_image_fails_before_embedding(stages, monkeypatch, capsys):
    root, _ = stages
    monkeypatch.chdir(root)
    for patient in ("p1", "p2"):
        Path("junk", patient).mkdir(parents=True)
        Path("junk", patient, "img.png").write_text("not an image")

    code = cli.main(["audit", "--dataset", "ds", "--synthetic", "junk", "--detector", DETECTOR, "--out", "audit-junk"])

    line = _stderr_line(capsys)
    assert (code, line.startswith(f"raymem audit: synthetic images {root / 'junk'}: no usable image")) == (1, True)
    assert not (root / "audit-junk" / "embeddings").exists()


class _RunsCode:
    """What a malicious checkpoint holds: unpickling it would call print()."""

    def __reduce__(self):
        return print, ("unpickled code ran",)


def _pickled_checkpoint(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"model": _RunsCode()}, buffer)
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("command", [
    ["audit", "--dataset", "ds", "--synthetic", "generated", "--detector", "evil/detector.pt", "--out", "audit-evil"],
    ["sample", "--run", "evil", "--n", "2", "--out", "synthetic-evil"],
], ids=["audit-detector", "sample-ldm"])
def test_a_checkpoint_that_needs_pickle_is_refused_in_one_line(stages, monkeypatch, capsys, command):
    root, _ = stages
    monkeypatch.chdir(root)
    _pickled_checkpoint(root / "evil" / "detector.pt")
    _pickled_checkpoint(root / "evil" / "epoch-00001" / "ldm.pt")

    code = cli.main(command)

    line = _stderr_line(capsys)
    assert (code, "is not a raymem checkpoint: it needs pickle to load" in line, "weights_only" in line) == \
        (1, True, False)


@pytest.mark.parametrize("command, says", [
    (["train-detector", "--dataset", "no-train", "--out", "out-no-train", "--epochs", "1", "--batch-size", "2",
      "--num-workers", "1"], "has 0 train images"),
    (["train-ldm", "--dataset", "no-train", "--out", "out-no-train", "--autoencoder-epochs", "1",
      "--diffusion-epochs", "1", "--batch-size", "2", "--num-workers", "1"], "has no train images"),
], ids=["train-detector", "train-ldm"])
def test_training_on_a_dataset_without_training_images_is_one_line(stages, monkeypatch, capsys, command, says):
    root, _ = stages
    monkeypatch.chdir(root)
    if not Path("no-train").exists():  # the dataset's val images alone
        manifest = shards.read_manifest("ds")
        val = shards.load_split("ds", "val")
        samples = [shards.Sample(sample_id=row["sample_id"], patient_id=row["patient_id"], split="val", image=image,
                                 spacing_mm=tuple(row["spacing"]), modality=row["modality"], source=row["source"],
                                 content_hash=row["content_hash"])
                   for row, image in zip(val.drop_columns(["image"]).to_pylist(), shards.images_of(val))]
        write_dataset(str(root / "no-train"), samples, config.IngestConfig(**manifest["config"]),
                      tuple(manifest["image_shape"]), pseudonym_key="none (test)")

    code = cli.main(command)

    line = _stderr_line(capsys)
    assert (code, line.startswith(f"raymem {command[0]}: {root / 'no-train'} {says}")) == (1, True)
