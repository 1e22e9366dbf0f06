"""The cluster configs pass Ray's own validation, the KubeRay manifests carry what Ray needs, and every job config
in jobs/configs/ loads into the stages' typed configs. No Ray runtime is started (the autoscaler's config code only).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raymem.config import ConfigError
from raymem.jobconfig import load_job

REPO = Path(__file__).resolve().parents[2]
KUBERAY = {"RayCluster": REPO / "cluster/kuberay-raycluster.yaml", "RayJob": REPO / "cluster/kuberay-rayjob.yaml"}
STUDY_CONFIGS = sorted((REPO / "jobs/configs").glob("study-*.yaml"))  # raymem sweep / jobs/sweep.py
JOB_CONFIGS = sorted(set((REPO / "jobs/configs").glob("*.yaml")) - set(STUDY_CONFIGS))
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def _ray_cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_aws_cluster_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(yaml.safe_load((REPO / "cluster/aws.yaml").read_text()))

    validate_config(prepared)  # raises jsonschema.ValidationError on any schema violation


def test_aws_cluster_has_a_cpu_only_head_and_autoscaling_spot_gpu_workers():
    config = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())
    nodes = config["available_node_types"]
    workers = [node for name, node in nodes.items() if name != config["head_node_type"]]

    assert (nodes[config["head_node_type"]]["resources"], [(w["min_workers"] < w["max_workers"],
            w["node_config"]["InstanceMarketOptions"]["MarketType"], w["node_config"]["InstanceType"][:1])
            for w in workers]) == ({"CPU": 0}, [(True, "spot", "g")])


@pytest.mark.parametrize("kind", sorted(KUBERAY))
def test_kuberay_manifest_has_the_fields_ray_needs(kind):
    manifest = yaml.safe_load(KUBERAY[kind].read_text())
    spec = _ray_cluster_spec(manifest)
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if all("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]

    found = {"apiVersion": manifest["apiVersion"], "kind": manifest["kind"],
             "head rayStartParams": "rayStartParams" in spec["headGroupSpec"],
             "gpu worker groups with rayStartParams": [("rayStartParams" in g) for g in gpu_groups]}
    assert found == {"apiVersion": "ray.io/v1", "kind": kind, "head rayStartParams": True,
                     "gpu worker groups with rayStartParams": [True]}


def test_kuberay_job_submits_the_pipeline_with_a_runtime_env():
    manifest = yaml.safe_load(KUBERAY["RayJob"].read_text())

    assert ("jobs/pipeline.py --config" in manifest["spec"]["entrypoint"],
            isinstance(yaml.safe_load(manifest["spec"]["runtimeEnvYAML"]), dict)) == (True, True)


@pytest.mark.parametrize("kind", sorted(KUBERAY))
def test_kuberay_containers_take_s3_keys_from_a_secret_and_mlflow_uri_from_config(kind):
    containers = _containers(_ray_cluster_spec(yaml.safe_load(KUBERAY[kind].read_text())))
    sources = [{e["name"]: next(iter(e.get("valueFrom", {"literal": None}))) for e in c["env"]} for c in containers]

    assert sources == [{**dict.fromkeys(SECRET_VARIABLES, "secretKeyRef"), "RAYMEM_STORAGE_ROOT": "configMapKeyRef",
                        "MLFLOW_TRACKING_URI": "configMapKeyRef"}] * len(containers)


def test_dockerfile_installs_cuda_torch_then_raymem_with_the_jobs():
    text = (REPO / "cluster/Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line.startswith(("RUN", "COPY"))]
    torch_line = next(i for i, line in enumerate(lines) if "torch==" in line)
    raymem_line = next(i for i, line in enumerate(lines) if "-c constraints.txt ." in line)

    assert ("--index-url" in lines[torch_line], torch_line < raymem_line, any("COPY jobs" in line for line in lines)) \
        == (True, True, True)


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=[p.stem for p in JOB_CONFIGS])
def test_job_config_builds_every_stage_config_under_its_storage_root(path):
    job = load_job(str(path))
    root = "s3://bucket/studies"

    detector, embed, ldm, sample = (job.stage_config(stage, root=root, train_images=10)
                                    for stage in ("train-detector", "embed", "train-ldm", "sample"))
    dataset = f"{root}/datasets/{job.run_name}"
    assert (detector.dataset, embed.data, ldm.dataset, sample.run) == \
        (dataset, dataset, dataset, f"{root}/ldm/{job.run_name}")


def test_sample_count_defaults_to_the_number_of_training_images():
    job = load_job(str(REPO / "jobs/configs/xray2d.yaml"))

    assert job.stage_config("sample", root="s3://b/r", train_images=904).n == 904


def test_a_stage_section_that_sets_a_derived_path_is_rejected_naming_it(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("data: {phantoms: {kind: xray2d}}\ndetector: {out: s3://elsewhere}\n")

    with pytest.raises(ConfigError, match=r"detector\.out: set by the job"):
        load_job(str(path))


def test_missing_storage_root_names_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYMEM_STORAGE_ROOT", raising=False)
    path = tmp_path / "job.yaml"
    path.write_text("data: {phantoms: {kind: xray2d}}\n")

    with pytest.raises(ConfigError, match="RAYMEM_STORAGE_ROOT"):
        load_job(str(path)).root()


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=[p.stem for p in STUDY_CONFIGS])
def test_study_config_builds_every_trials_ldm_config_under_the_sweep_folder(path):
    from raymem.sweep import load_study, trial_key

    study = load_study(str(path))
    root = "s3://bucket/studies"

    outs = {study.ldm_config(factors, root).out for factors in study.trials()}
    assert outs == {f"{root}/sweeps/{study.study}/{study.sweep}/trials/{trial_key(f)}" for f in study.trials()}
