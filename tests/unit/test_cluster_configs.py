"""The cluster configs pass Ray's own validation, the KubeRay manifests carry what Ray needs, no runtime env carries a
secret, the image builds from a pinned base and a small context, and every job config in jobs/configs/ loads into the
stages' typed configs. No Ray runtime is started (the autoscaler's config code only).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from raymem.config import ConfigError
from raymem.jobconfig import load_job

REPO = Path(__file__).resolve().parents[2]
KUBERAY = {"RayCluster": REPO / "cluster/kuberay-raycluster.yaml", "RayJob": REPO / "cluster/kuberay-rayjob.yaml"}
STUDY_CONFIGS = sorted((REPO / "jobs/configs").glob("study-*.yaml"))  # raymem sweep / jobs/sweep.py
JOB_CONFIGS = sorted(set((REPO / "jobs/configs").glob("*.yaml")) - set(STUDY_CONFIGS))
GUIDE = REPO / "docs/cluster.md"
# Ray shows a job's runtime env in plain text (`ray job list`, the dashboard, runtime_env_agent.log).
RUNTIME_ENV_SECRETS = {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                       "MLFLOW_TRACKING_TOKEN"}
# What Ray's autoscaler on the head calls when the head names its own instance profile (Ray's then is not created).
AUTOSCALER_ACTIONS = {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances",
                      "ec2:DescribeInstanceTypes", "ec2:DescribeImages", "iam:PassRole"}
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
GPU_NODES = {"g5.2xlarge": {"cpu": 8, "memory": 32 * 2**30, "nvidia.com/gpu": 1}}  # AWS's published sizes
NODE_HEADROOM = {"cpu": 1, "memory": 4 * 2**30, "nvidia.com/gpu": 0}  # kubelet, system reserve, daemonsets


def _ray_cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def _pod_templates(spec: dict) -> dict[str, dict]:
    """Each group's pod spec by group name ('head' for the head group)."""
    return {"head": spec["headGroupSpec"]["template"]["spec"],
            **{g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]}}


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity in base units: '7' -> 7, '500m' -> 0.5, '28Gi' -> 28 * 2**30."""
    number, suffix = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * {"": 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
                            "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[suffix]


def _guide_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)


def _guide_runtime_envs() -> list[dict]:
    """The env_vars of every `--runtime-env-json` in the guide's shell blocks, parsed as the shell would quote them
    (command substitutions stay literal: '$(git rev-parse HEAD)')."""
    envs = []
    for block in _guide_blocks("bash"):
        words = shlex.split(block.replace("\\\n", " "), comments=True)
        envs += [json.loads(value).get("env_vars", {}) for flag, value in itertools.pairwise(words)
                 if flag == "--runtime-env-json"]
    return envs


def _manifest_runtime_envs(node) -> list[dict]:
    """The env_vars of every runtime env in a parsed cluster file: `env_vars` mappings and RayJob runtimeEnvYAML."""
    if isinstance(node, list):
        return [env for item in node for env in _manifest_runtime_envs(item)]
    if not isinstance(node, dict):
        return []
    envs = [node["env_vars"]] if isinstance(node.get("env_vars"), dict) else []
    if "runtimeEnvYAML" in node:
        envs.append(yaml.safe_load(node["runtimeEnvYAML"]).get("env_vars", {}))
    return envs + [env for value in node.values() for env in _manifest_runtime_envs(value)]


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether .dockerignore patterns keep `path` (relative to the context, '/'-separated) out of the build context,
    as Docker reads them: a pattern matches the path or one of its parent folders, the last matching pattern wins,
    `!` lets a path back in, and `**/` matches any depth, the top level included."""
    prefixes = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 2)]
    excluded = False
    for pattern in patterns:
        glob = pattern.removeprefix("!").strip("/")
        globs = [glob, glob.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(prefix, g) for prefix in prefixes for g in globs):
            excluded = not pattern.startswith("!")
    return excluded


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


def test_aws_head_names_its_profile_and_the_guide_gives_that_profile_the_autoscalers_permissions():
    config = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    statements = [s for block in _guide_blocks("json") for s in json.loads(block).get("Statement", [])]
    granted = {a for s in statements if s["Effect"] == "Allow"
               for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}

    assert ("IamInstanceProfile" in head, AUTOSCALER_ACTIONS - granted) == (True, set())


def test_aws_nodes_log_in_to_the_private_image_registry_before_pulling():
    config = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())
    registry = config["docker"]["image"].split("/")[0]

    assert [c for c in config["initialization_commands"] if "docker login" in c and registry in c] != []


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


def test_kuberay_job_submits_the_pipeline_without_progress_bars():
    manifest = yaml.safe_load(KUBERAY["RayJob"].read_text())
    env_vars = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["env_vars"]

    assert ("jobs/pipeline.py --config" in manifest["spec"]["entrypoint"],
            env_vars.get("RAY_DATA_DISABLE_PROGRESS_BARS")) == (True, "1")


def test_kuberay_job_is_retried_a_bounded_number_of_times_within_a_deadline():
    spec = yaml.safe_load(KUBERAY["RayJob"].read_text())["spec"]

    assert [isinstance(spec.get(field), int) and spec[field] > 0
            for field in ("backoffLimit", "activeDeadlineSeconds")] == [True, True]


@pytest.mark.parametrize("kind", sorted(KUBERAY))
def test_kuberay_containers_take_credentials_from_secrets_and_settings_from_config(kind):
    containers = _containers(_ray_cluster_spec(yaml.safe_load(KUBERAY[kind].read_text())))
    sources = [{e["name"]: next(iter(e.get("valueFrom", {"literal": None}))) for e in c["env"]} for c in containers]

    secrets = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    settings = ("AWS_ENDPOINT_URL", "AWS_REGION", "RAYMEM_STORAGE_ROOT", "MLFLOW_TRACKING_URI")
    assert sources == [{**dict.fromkeys(secrets, "secretKeyRef"), **dict.fromkeys(settings, "configMapKeyRef")}] \
        * len(containers)


@pytest.mark.parametrize("kind", sorted(KUBERAY))
def test_kuberay_pods_start_without_the_secrets_as_irsa_users_have_none(kind):
    containers = _containers(_ray_cluster_spec(yaml.safe_load(KUBERAY[kind].read_text())))
    refs = [e["valueFrom"]["secretKeyRef"] for c in containers for e in c["env"]
            if "secretKeyRef" in e.get("valueFrom", {})]

    assert [ref.get("optional") for ref in refs] == [True] * len(refs) != []


@pytest.mark.parametrize("kind", sorted(KUBERAY))
def test_kuberay_gpu_workers_fit_the_node_type_they_select(kind):
    spec = _ray_cluster_spec(yaml.safe_load(KUBERAY[kind].read_text()))

    too_large = {}
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        node = GPU_NODES.get(pod.get("nodeSelector", {}).get(INSTANCE_TYPE_LABEL), {})  # unknown node: no budget
        amounts = [(resource, value) for c in pod["containers"] for requests_or_limits in c["resources"].values()
                   for resource, value in requests_or_limits.items()]
        too_large[group["groupName"]] = [(resource, value) for resource, value in amounts
                                         if _quantity(value) > node.get(resource, 0) - NODE_HEADROOM[resource]]
    assert too_large == {g["groupName"]: [] for g in spec["workerGroupSpecs"]}


def test_guide_names_the_gpu_node_type_the_kuberay_workers_select():
    selected = {g["template"]["spec"].get("nodeSelector", {}).get(INSTANCE_TYPE_LABEL)
                for path in KUBERAY.values()
                for g in _ray_cluster_spec(yaml.safe_load(path.read_text()))["workerGroupSpecs"]}
    kuberay_section = GUIDE.read_text().split("## Kubernetes with KubeRay")[1].split("\n## ")[0]

    assert [node for node in selected if f"`{node}`" not in kuberay_section] == []


@pytest.mark.parametrize("kind", sorted(KUBERAY))
def test_kuberay_pods_mount_a_memory_backed_dev_shm(kind):
    pods = _pod_templates(_ray_cluster_spec(yaml.safe_load(KUBERAY[kind].read_text())))

    mounted = {}
    for group, pod in pods.items():
        in_memory = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
        mounted[group] = all(any(m["name"] in in_memory and m["mountPath"] == "/dev/shm"
                                 for m in c.get("volumeMounts", [])) for c in pod["containers"])
    assert mounted == dict.fromkeys(pods, True)


def test_no_runtime_env_in_the_cluster_files_or_the_guide_carries_a_secret():
    envs = _guide_runtime_envs() + [env for path in sorted((REPO / "cluster").glob("*.yaml"))
                                    for env in _manifest_runtime_envs(yaml.safe_load(path.read_text()))]

    assert sorted({name for env in envs for name in env} & RUNTIME_ENV_SECRETS) == []


def test_guide_says_never_to_pass_secrets_through_the_runtime_env():
    prose = re.sub(r"[*`]", "", GUIDE.read_text()).lower()

    assert re.search(r"never (pass|put) secrets (through|in) the runtime env", prose) is not None


def test_guide_submit_command_sets_the_storage_root_and_revision_without_progress_bars():
    envs = _guide_runtime_envs()

    assert [(env.get("RAYMEM_GIT_REVISION"), env.get("RAY_DATA_DISABLE_PROGRESS_BARS"))
            for env in envs if "RAYMEM_STORAGE_ROOT" in env] == [("$(git rev-parse HEAD)", "1")]


def test_dockerfile_installs_cuda_torch_then_raymem_with_the_jobs():
    text = (REPO / "cluster/Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line.startswith(("RUN", "COPY"))]
    torch_line = next(i for i, line in enumerate(lines) if "torch==" in line)
    raymem_line = next(i for i, line in enumerate(lines) if "-c constraints.txt ." in line)

    assert ("--index-url" in lines[torch_line], torch_line < raymem_line, any("COPY jobs" in line for line in lines)) \
        == (True, True, True)


def test_dockerfile_base_image_is_an_exact_python_release():
    base = next(line.split()[1] for line in (REPO / "cluster/Dockerfile").read_text().splitlines()
                if line.startswith("FROM"))

    assert re.fullmatch(r"python:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", base) is not None, base


def test_docker_build_context_holds_what_the_image_copies_and_nothing_heavy():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [source for line in (REPO / "cluster/Dockerfile").read_text().splitlines() if line.startswith("COPY")
              for source in line.split()[1:-1]]
    copied += [str(path.relative_to(REPO)) for source in copied if (REPO / source).is_dir()
               for path in sorted((REPO / source).rglob("*.py"))[:1]]
    heavy = [".venv/bin/python", ".git/HEAD", "out/x.parquet", "demo-out/report.html", "mlruns/0/meta.yaml",
             "mlflow.db", "build/lib/raymem/cli.py", "raymem/__pycache__/cli.cpython-311.pyc", "docs/report-demo.png"]

    assert ([p for p in copied if _dockerignore_excludes(patterns, p)],
            [p for p in heavy if not _dockerignore_excludes(patterns, p)]) == ([], [])


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
