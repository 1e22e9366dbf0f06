"""Every MLflow run names the code that made it (a real sqlite tracking store, no server)."""

from mlflow.tracking import MlflowClient

from raymem import tracking


def test_every_run_is_tagged_with_the_revision_set_at_submit_time(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYMEM_GIT_REVISION", "0123abcd")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    with tracking.run("exp", "detector/demo", uri=uri) as run:
        run_id = run.run_id

    assert MlflowClient(uri).get_run(run_id).data.tags[tracking.GIT_REVISION_TAG] == "0123abcd"

