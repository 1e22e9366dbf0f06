"""Copy-detector training on a real 2-worker TorchTrainer (Ray Train V2), resume after a crash, embeddings at scale."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raymem import config, storage
from raymem.embed import embed_dataset
from raymem.train.detector import STATE_FILE, train_detector

pytestmark = pytest.mark.slow


def _train_cfg(dataset: str, out: str, **overrides) -> config.DetectorTrainConfig:
    values = {"dataset": dataset, "out": out, "preset": "tiny", "epochs": 3, "batch_size": 6, "num_workers": 2,
              "cpus_per_worker": 1.0, "eval_every": 3, "eval_max_images": 24, "run_name": "det"}
    return config.validate(config.DetectorTrainConfig, {**values, **overrides})


def _mlflow_runs(out: str):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("raymem")
    return client, client.search_runs([experiment.experiment_id])


def test_2d_training_survives_a_crash_in_epoch_2_and_logs_one_finished_run(ray_cluster, tmp_path,
                                                                        make_phantom_dataset):
    dataset = make_phantom_dataset("xray2d", patients=16, per_patient=3)
    out = str(tmp_path / "out")

    result = train_detector(_train_cfg(dataset, out, fail_at_epoch=1, max_failures=1))

    client, runs = _mlflow_runs(out)
    epochs_logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
    assert storage.exists(str(tmp_path / "out" / "detector" / "det" / ".injected-failure"))
    assert result["metrics"]["epoch"] == 2 and storage.exists(result["detector"])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert sorted(epochs_logged) == [0, 1, 2]  # each epoch once: resumed from epoch 0's checkpoint, not restarted
    assert "detector.copy_strong_auc" in runs[0].data.metrics
    # The optimiser state resumed with the weights: Adam's step count after three epochs is three times the count
    # saved after the first (a fresh optimiser after the restore would hold two epochs' steps).
    adam_steps = [{int(param["step"]) for param in torch.load(
        tmp_path / "out" / "detector" / "det" / f"epoch-{epoch:05d}" / STATE_FILE,
        weights_only=True)["optimizer"]["state"].values()} for epoch in (0, 2)]
    assert len(adam_steps[0]) == 1 and adam_steps[1] == {3 * adam_steps[0].pop()}


def test_3d_training_resumes_after_a_crash_then_embeddings_have_the_schema_and_count(ray_cluster, tmp_path,
                                                                                      make_phantom_dataset):
    dataset = make_phantom_dataset("ct3d", patients=8, per_patient=2)
    out = str(tmp_path / "out")
    trained = train_detector(_train_cfg(dataset, out, epochs=2, batch_size=2, eval_every=2, eval_max_images=8,
                                        fail_at_epoch=1, max_failures=1))

    counts = embed_dataset(config.validate(config.EmbedConfig, {
        "detector": trained["detector"], "data": dataset, "out": str(tmp_path / "emb"), "num_actors": 1}))

    table = pq.read_table(tmp_path / "emb" / "train")
    assert storage.exists(str(tmp_path / "out" / "detector" / "det" / ".injected-failure"))
    assert trained["metrics"]["epoch"] == 1
    assert counts["train"] == table.num_rows > 0
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert table.column_names == ["sample_id", "patient_id", "embedding"]
