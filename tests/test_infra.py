"""Checks of the deployment files (infra/, jobs/) and of the cluster commands in infra/README.md.

No cluster, container engine, kubectl or helm is needed: every manifest is parsed and checked
for the fields its kind requires, every file, Secret, ConfigMap and Service a manifest or a
README command names must exist, the job scripts' own parser and Ray's own CLI and config
validators check the commands, and no file may carry something that looks like a credential.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import typer
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before Python 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
JOBS = REPO / "jobs"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
SECRETS_TEMPLATE = INFRA / "secrets" / "secrets.template.yaml"
OPERATOR_VALUES = INFRA / "kuberay" / "operator-values.yaml"
AWS_CLUSTER = INFRA / "aws" / "cluster.yaml"
JOB_NAMES = ("embed", "calibrate", "evaluate", "recalibrate")
#: The ConfigMap made from jobs/configs/ (README: kubectl create configmap ... --from-file=).
JOB_CONFIGMAP = "qmag-ray-job-configs"
PROJECT_IMAGE = "registry.example.com/qmag-ray"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT_VERSION = PYPROJECT["project"]["version"]


# ----------------------------------------------------------------------------- helpers


def dependency_spec(name: str) -> SpecifierSet:
    """The version range pyproject.toml gives for ``name``."""
    for dep in PYPROJECT["project"]["dependencies"]:
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$", dep)
        if match and match.group(1).lower() == name:
            return SpecifierSet(match.group(3))
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def manifest_docs() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object (a YAML document with a ``kind``) under infra/."""
    docs = []
    for path in sorted(INFRA.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "kind" in doc:
                docs.append((path, doc))
    return docs


DOCS = manifest_docs()


def objects(kind: str, *, templates: bool = False) -> list[tuple[Path, dict[str, Any]]]:
    """Objects of ``kind``; the Secret template only when ``templates``."""
    return [(p, d) for p, d in DOCS if d["kind"] == kind and (templates or p != SECRETS_TEMPLATE)]


def doc_id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.relative_to(REPO)}:{doc['kind']}/{doc.get('metadata', {}).get('name')}"


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec of every workload, Ray cluster and job in the manifests."""
    for path, doc in DOCS:
        spec = doc.get("spec", {})
        where = doc_id((path, doc))
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield where, spec["template"]["spec"]
        elif doc["kind"] == "CronJob":
            yield where, spec["jobTemplate"]["spec"]["template"]["spec"]
        for cluster in ray_cluster_specs(doc):
            yield where, cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster.get("workerGroupSpecs", []):
                yield where, group["template"]["spec"]


def ray_job_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] == "RayJob":
        return doc["spec"]
    if doc["kind"] == "RayCronJob":
        return doc["spec"]["jobTemplate"]
    return None


def ray_cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    job = ray_job_spec(doc)
    return [job["rayClusterSpec"]] if job and "rayClusterSpec" in job else []


def containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for where, pod in pod_specs():
        for container in pod.get("containers", []):
            yield where, pod, container


def secret_template_keys() -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    for _, doc in objects("Secret", templates=True):
        values = {**doc.get("data", {}), **doc.get("stringData", {})}
        keys.setdefault(doc["metadata"]["name"], set()).update(values)
    return keys


def configmap_keys() -> dict[str, set[str]]:
    keys = {d["metadata"]["name"]: set(d.get("data", {})) for _, d in objects("ConfigMap")}
    keys[JOB_CONFIGMAP] = {p.name for p in (JOBS / "configs").glob("*.yaml")}
    return keys


def load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JOBS_COMMON = load_module("qmag_ray_jobs_common", JOBS / "_common.py")


def dockerfile_args(path: Path) -> dict[str, str]:
    args = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^ARG\s+(\w+)(?:=(\S+))?", line)
        if match and match.group(2) is not None:
            args.setdefault(match.group(1), match.group(2))
    return args


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], text)


def dockerfile_from(path: Path, overrides: dict[str, str] | None = None) -> str:
    variables = {**dockerfile_args(path), **(overrides or {})}
    lines = [line for line in path.read_text().splitlines() if line.startswith("FROM ")]
    assert len(lines) == 1, f"{path}: expected one FROM line, got {lines}"
    return expand(lines[0].split()[1], variables)


def image_dir() -> str:
    """Where the image holds the project (ARG APP_DIR, the WORKDIR of infra/docker)."""
    return dockerfile_args(DOCKERFILE)["APP_DIR"]


def config_mounts() -> dict[str, str]:
    """mountPath -> ConfigMap name, over every ConfigMap volume mounted in a container."""
    mounts = {}
    for _, pod, container in containers():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"])
            if volume and "configMap" in volume:
                mounts[mount["mountPath"].rstrip("/")] = volume["configMap"]["name"]
    return mounts


def repo_path_of_config(path: str) -> Path:
    """A config path as a job sees it -> the repository file it comes from."""
    for mount, configmap in config_mounts().items():
        if path.startswith(mount + "/"):
            assert configmap == JOB_CONFIGMAP, f"{path} is mounted from {configmap}"
            return JOBS / "configs" / path[len(mount) + 1 :]
    assert not path.startswith("/"), f"{path} is neither in the repository nor mounted"
    return REPO / path


def repo_path_of_script(path: str) -> Path:
    """A job script path (relative, or absolute inside the image) -> the repository file."""
    if path.startswith(image_dir() + "/"):
        return REPO / path[len(image_dir()) + 1 :]
    assert not path.startswith("/"), f"{path} is not under the image's project {image_dir()}"
    return REPO / path


def check_job_command(argv: list[str]) -> None:
    """``python jobs/X.py --config Y ...``: files exist and the job's own parser accepts it."""
    assert argv[0] == "python" and len(argv) >= 2, f"not a job command: {argv}"
    script = repo_path_of_script(argv[1])
    assert script.is_file(), f"{argv[1]} -> {script} does not exist"
    assert script.parent == JOBS and script.stem in JOB_NAMES, f"{script} is not a job script"
    args = JOBS_COMMON.build_parser(script.stem, "check").parse_args(argv[2:])
    config = repo_path_of_config(args.config)
    assert config.is_file(), f"--config {args.config} -> {config} does not exist"
    from qmag_ray.config import parse_override

    for override in args.overrides:
        parse_override(override)


def ray_command(args: list[str]) -> Any:
    """Resolve and parse ``ray <args>`` with Ray's own click CLI (raises on a bad option)."""
    import click
    from ray.scripts.scripts import cli

    command: click.Command = cli
    rest = list(args)
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    assert not isinstance(command, click.Group), f"ray {' '.join(args)}: incomplete command"
    return command.make_context(command.name or "ray", rest) if rest else None


CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def check_cron(schedule: str) -> None:
    fields = schedule.split()
    assert len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields), schedule


# ----------------------------------------------------------------------------- credentials

CREDENTIAL_KEYS = (
    r"aws_secret_access_key|aws_access_key_id|aws_session_token|password|passwd|secret_key|"
    r"api_key|auth_token|ray_auth_token|mlflow_tracking_password|token"
)
ASSIGNMENT = re.compile(
    rf"(?i)(?<![\w./-])({CREDENTIAL_KEYS})[\"']?\s*[:=]\s*[\"']?([^\s\"'#,}}]+)"
)
URL_PASSWORD = re.compile(r"://[^/\s:@]+:([^/\s@]+)@")
ACCESS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
PLACEHOLDER = re.compile(r"^(<[^>]*>?|\$\(.*|\$\{.*|\$\w+.*)$")


def find_credentials(text: str) -> list[str]:
    """Things in ``text`` that look like credentials (placeholders and references are fine)."""
    found = [m.group(0) for m in ACCESS_KEY_ID.finditer(text)]
    found += [m.group(0) for m in PRIVATE_KEY.finditer(text)]
    for match in ASSIGNMENT.finditer(text):
        if not PLACEHOLDER.match(match.group(2)):
            found.append(match.group(0))
    for match in URL_PASSWORD.finditer(text):
        if not PLACEHOLDER.match(match.group(1)):
            found.append(match.group(0))
    return found


def test_credential_scanner_finds_planted_credentials() -> None:
    key_id = "AKIA" + "Q" * 16
    planted = [
        f"aws_access_key_id = {key_id}",
        "aws_secret_access_key: wJalrXUtnFEMI",
        "  password: hunter2",
        'AWS_SECRET_ACCESS_KEY="abc123"',
        "backend: postgresql://mlflow:s3cret@db:5432/mlflow",
        "-----BEGIN RSA PRIVATE KEY-----",
        'auth_token: "0123abcd"',
    ]
    for text in planted:
        assert find_credentials(text), f"not flagged: {text}"
    clean = [
        'auth_token: "<set me>"',
        '--from-literal=password="$(openssl rand -hex 24)"',
        "postgresql://$(MLFLOW_DB_USER):$(MLFLOW_DB_PASSWORD)@$(MLFLOW_DB_HOST)/mlflow",
        "key: auth_token",
        "export RAY_AUTH_MODE=token",
        '--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"',
    ]
    for text in clean:
        assert not find_credentials(text), f"flagged: {text}"


def deployment_files() -> list[Path]:
    files = [p for root in (INFRA, JOBS) for p in root.rglob("*") if p.is_file()]
    return sorted(p for p in files if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", deployment_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_credentials_in_deployment_files(path: Path) -> None:
    assert not find_credentials(path.read_text()), f"{path}: looks like a credential"


def test_secrets_hold_placeholders_only_and_cover_every_reference() -> None:
    secrets = objects("Secret", templates=True)
    assert secrets, "no Secret template"
    for path, doc in secrets:
        assert path == SECRETS_TEMPLATE, f"{path}: a Secret outside the template"
        values = {**doc.get("data", {}), **doc.get("stringData", {})}
        assert values, f"{doc_id((path, doc))} lists no keys"
        for key, value in values.items():
            assert re.fullmatch(r"<[^>]+>", str(value)), f"{doc_id((path, doc))}: {key} has a value"
    known = secret_template_keys()
    refs = 0
    for where, _, container in containers():
        for env in container.get("env", []):
            if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", env["name"]):
                assert "value" not in env, f"{where}: {env['name']} given as a literal"
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs += 1
                assert ref["key"] in known.get(ref["name"], set()), f"{where}: {ref}"
    assert refs


def test_configmap_references_resolve() -> None:
    known = configmap_keys()
    for where, pod, container in containers():
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in known.get(ref["name"], set()), f"{where}: {ref}"
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in known, f"{where}: {source}"
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in known, f"{where}: {volume}"


# ----------------------------------------------------------------------------- manifests


def test_every_yaml_file_parses() -> None:
    paths = sorted([*INFRA.rglob("*.yaml"), *JOBS.rglob("*.yaml")])
    assert len(paths) >= 15
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: empty or not a mapping"


@pytest.mark.parametrize("item", DOCS, ids=doc_id)
def test_object_has_required_fields(item: tuple[Path, dict[str, Any]]) -> None:
    path, doc = item
    assert doc.get("apiVersion") and doc.get("kind"), path
    name = doc.get("metadata", {}).get("name", "")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
    check = KIND_CHECKS.get(doc["kind"])
    assert check is not None, f"{doc_id(item)}: no check for kind {doc['kind']}"
    check(doc)


def check_ray_cluster_spec(spec: dict[str, Any]) -> None:
    ray_version = importlib.metadata.version("ray")
    assert spec["rayVersion"] == ray_version, "rayVersion must be the tested Ray version"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and all(c["name"] and c["image"] for c in head_containers)
    assert not any("nvidia.com/gpu" in str(c.get("resources")) for c in head_containers)
    kinds = set()
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        group_containers = group["template"]["spec"]["containers"]
        assert group_containers and all(c["name"] and c["image"] for c in group_containers)
        gpus = group_containers[0]["resources"].get("limits", {}).get("nvidia.com/gpu")
        kinds.add("gpu" if gpus else "cpu")
        if gpus:
            assert int(gpus) >= 1 and group_containers[0]["image"].endswith("-gpu")
    assert "cpu" in kinds, "a CPU worker group is required"
    assert spec.get("enableInTreeAutoscaling") is True
    # token auth through the operator, so that the autoscaler sidecar gets the token too
    assert spec.get("authOptions", {}).get("mode") == "token"


def check_ray_cluster(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "ray.io/v1"
    check_ray_cluster_spec(doc["spec"])
    groups = doc["spec"]["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in str(g["template"]) for g in groups), "no GPU worker group"


def check_ray_job_spec(spec: dict[str, Any]) -> None:
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
    if "rayClusterSpec" in spec:
        check_ray_cluster_spec(spec["rayClusterSpec"])
    check_job_command(shlex.split(spec["entrypoint"]))


def check_ray_job(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "ray.io/v1"
    check_ray_job_spec(doc["spec"])


def check_ray_cron_job(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "ray.io/v1"
    check_cron(doc["spec"]["schedule"])
    check_ray_job_spec(doc["spec"]["jobTemplate"])


def check_cron_job(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "batch/v1"
    check_cron(doc["spec"]["schedule"])
    pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure") and pod["containers"]


def check_workload(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "apps/v1"
    selector = doc["spec"]["selector"]["matchLabels"]
    labels = doc["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items(), "selector must match pod labels"
    assert doc["spec"]["template"]["spec"]["containers"]


def check_service(doc: dict[str, Any]) -> None:
    selector = doc["spec"]["selector"]
    targets = [
        d
        for _, d in DOCS
        if d["kind"] in ("Deployment", "StatefulSet")
        and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(targets) == 1, f"Service {doc['metadata']['name']} selects {len(targets)} workloads"
    ports = {
        p.get("name"): p["containerPort"]
        for c in targets[0]["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    }
    for port in doc["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        assert target in ports or target in ports.values(), f"targetPort {target} not exposed"


def check_configmap(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "v1"
    assert all(isinstance(v, str) for v in doc["data"].values()), "ConfigMap values are strings"


def check_secret(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "v1" and doc.get("type", "Opaque") == "Opaque"


KIND_CHECKS = {
    "RayCluster": check_ray_cluster,
    "RayJob": check_ray_job,
    "RayCronJob": check_ray_cron_job,
    "CronJob": check_cron_job,
    "Deployment": check_workload,
    "StatefulSet": check_workload,
    "Service": check_service,
    "ConfigMap": check_configmap,
    "Secret": check_secret,
}


def test_every_job_has_a_rayjob_and_recalibration_is_scheduled_both_ways() -> None:
    entrypoints = {Path(shlex.split(d["spec"]["entrypoint"])[1]).stem for _, d in objects("RayJob")}
    assert entrypoints == set(JOB_NAMES)
    ((cron_path, cron),) = objects("RayCronJob")
    ((_, plain),) = objects("CronJob")
    assert cron["spec"]["schedule"] == plain["spec"]["schedule"], "the two schedules differ"
    text = cron_path.read_text()
    assert "ALPHA" in text and "RayCronJob=true" in text, "state the alpha feature gate"
    values = yaml.safe_load(OPERATOR_VALUES.read_text())
    assert {"name": "RayCronJob", "enabled": True} in values["featureGates"]


def test_cronjob_submits_to_the_long_lived_cluster_with_its_token() -> None:
    ((_, cluster),) = objects("RayCluster")
    ((_, cron),) = objects("CronJob")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:3] == ["ray", "job", "submit"]
    ctx = ray_command(command[1:])
    address = ctx.params["address"]
    assert address == f"http://{cluster['metadata']['name']}-head-svc:8265"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert 8265 in [p["containerPort"] for p in head["ports"]]
    check_job_command(list(ctx.params["entrypoint"]))
    env = {e["name"]: e for e in container["env"]}
    # the cluster's token comes from spec.authOptions: the operator injects it into every Ray
    # container (head, workers, autoscaler sidecar) from the Secret it names
    auth = cluster["spec"]["authOptions"]
    assert auth["mode"] == env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": auth["secretName"],
        "key": "auth_token",  # the key KubeRay reads from a user-provided Secret
    }
    head_env = {e["name"] for e in head.get("env", [])}
    assert not head_env & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, "set once, by authOptions"


def test_project_images_are_the_built_variants() -> None:
    seen = set()
    for where, _, container in containers():
        image = container["image"]
        if not image.startswith(PROJECT_IMAGE + ":"):
            continue
        tag = image.split(":", 1)[1]
        assert tag in (f"{PROJECT_VERSION}-gpu", f"{PROJECT_VERSION}-cpu"), f"{where}: {image}"
        gpu = "nvidia.com/gpu" in str(container.get("resources"))
        assert tag.endswith("-gpu") == gpu, f"{where}: GPU containers take the -gpu image"
        seen.add(tag)
    assert seen == {f"{PROJECT_VERSION}-gpu", f"{PROJECT_VERSION}-cpu"}


def test_mlflow_server_command_and_image(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.cli import server

    ((_, deployment),) = [
        (p, d) for p, d in objects("Deployment") if d["metadata"]["name"] == "mlflow"
    ]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env_names = {e["name"] for e in container["env"]}
    args = [re.sub(r"\$\((\w+)\)", lambda m: f"<{m.group(1)}>", a) for a in container["command"]]
    for ref in re.findall(r"<(\w+)>", " ".join(args)):
        assert ref in env_names, f"$({ref}) is not an env entry of the container"
    # the store URIs come from the environment (mlflow server's own env vars), never from the
    # command line, where the database password would show in the process list
    assert not any("STORE_URI" in a or "backend-store" in a for a in args), args
    for name in env_names:
        monkeypatch.setenv(name, f"<{name}>")
    ctx = server.make_context("server", args[2:])
    assert ctx.params["backend_store_uri"] == "<MLFLOW_BACKEND_STORE_URI>"
    assert ctx.params["artifacts_destination"] == "<MLFLOW_ARTIFACTS_DESTINATION>"
    assert ctx.params["serve_artifacts"] is True
    uri = next(e["value"] for e in container["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    assert uri.startswith("postgresql://")
    ((_, config),) = [
        (p, d) for p, d in objects("ConfigMap") if d["metadata"]["name"] == "mlflow-server"
    ]
    assert config["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    version = importlib.metadata.version("mlflow")
    assert dockerfile_args(MLFLOW_DOCKERFILE)["MLFLOW_VERSION"] == version
    assert Version(version) in dependency_spec("mlflow")
    assert dockerfile_from(MLFLOW_DOCKERFILE) == f"ghcr.io/mlflow/mlflow:v{version}"
    assert container["image"].endswith(f":{version}")


def test_dockerfile_base_matches_pinned_ray_and_python() -> None:
    args = dockerfile_args(DOCKERFILE)
    ray_version = importlib.metadata.version("ray")
    assert args["RAY_VERSION"] == ray_version
    assert Version(ray_version) in dependency_spec("ray")
    python_tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert args["PYTHON_TAG"] == python_tag
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in SpecifierSet(
        PYPROJECT["project"]["requires-python"]
    )
    for accelerator in ("cu128", "cpu"):
        base = dockerfile_from(DOCKERFILE, {"ACCELERATOR": accelerator})
        assert base == f"rayproject/ray:{ray_version}-{python_tag}-{accelerator}"
    assert args["ACCELERATOR"].startswith("cu"), "the default image is the GPU variant"
    torch_version = importlib.metadata.version("torch").split("+")[0]
    assert args["TORCH_VERSION"] == torch_version
    text = DOCKERFILE.read_text()
    assert "pip install -c /home/ray/constraints.txt ." in text
    assert "WORKDIR ${APP_DIR}" in text and args["APP_DIR"].startswith("/home/ray/")
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, flags=re.M):
        for item in source.split():
            assert (REPO / item).exists(), f"COPY source {item} is missing"
    assert not re.search(r"^(ENV|ARG)\s+\S*(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", text, re.M | re.I)


def test_runtime_env_is_valid_for_ray_and_secret_free() -> None:
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**data)
    assert ".venv/" in env["excludes"] and ".git/" in env["excludes"]
    for name in data.get("env_vars", {}):
        assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", name), name


def test_cluster_launcher_config_is_valid_for_ray() -> None:
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(AWS_CLUSTER.read_text())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    assert raw["provider"]["type"] == "aws"
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head schedules no work"
    gpu = [
        t for t in types.values() if t.get("docker", {}).get("worker_image", "").endswith("-gpu")
    ]
    assert len(gpu) == 1 and 0 <= gpu[0]["min_workers"] <= gpu[0]["max_workers"]
    assert raw["docker"]["image"] == f"{PROJECT_IMAGE}:{PROJECT_VERSION}-cpu"
    assert raw["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())
    starts = " ".join(raw["head_start_ray_commands"] + raw["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token ray start") == 2
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["ray.worker.gpu"]["max_wrokers"] = 1
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(bad))


# ----------------------------------------------------------------------------- jobs


@pytest.mark.parametrize("job", JOB_NAMES)
def test_job_help_runs(job: str) -> None:
    result = subprocess.run(
        [sys.executable, str(JOBS / f"{job}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "--set" in result.stdout and job in result.stdout


def recording_app(seen: dict[str, Any]) -> typer.Typer:
    """A stand-in ``qmag-ray`` with one command that records what the job handed over."""
    app = typer.Typer()

    @app.callback()
    def main(verbose: bool = typer.Option(False, "--verbose")) -> None:
        seen["verbose"] = verbose

    @app.command()
    def embed(
        config: str = typer.Option(...),
        overrides: list[str] = typer.Option([], "--set"),
        ray_address: str | None = typer.Option(None),
        overwrite: bool = typer.Option(False, "--overwrite"),
    ) -> None:
        from qmag_ray.config import read_config_file  # local paths and s3:// alike

        seen.update(path=config, config=read_config_file(config))
        seen.update(overrides=overrides, ray_address=ray_address, overwrite=overwrite)
        if seen["config"].get("fail"):
            raise typer.Exit(code=3)

    return app


def test_job_hands_the_users_config_and_its_overrides_to_the_command(tmp_path: Path) -> None:
    config = tmp_path / "embed.yaml"
    config.write_text("images: s3://b/faces/\nactors: 2\ngate:\n  tolerance: 0.01\n")
    seen: dict[str, Any] = {}
    argv = [
        "--config", str(config), "--set", "actors=8", "--set", "gate.tolerance=2e-3",
        "--set", "grid.fmrs=[1e-3, 1e-4]", "--ray-address", "10.0.0.1:6379", "-v",
        "--", "--overwrite",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        JOBS_COMMON.run("embed", "test", argv=argv, app=recording_app(seen))
    assert exit_info.value.code == 0
    # no merged copy: the command reads the user's file and applies the overrides itself
    assert seen["path"] == str(config)
    assert seen["overrides"] == ["actors=8", "gate.tolerance=2e-3", "grid.fmrs=[1e-3, 1e-4]"]
    assert seen["ray_address"] == "10.0.0.1:6379" and seen["overwrite"] and seen["verbose"]
    assert yaml.safe_load(config.read_text())["actors"] == 2, "the source config is untouched"


def test_job_errors_name_the_users_config_file_and_the_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the real command: a bad key in the file names that file, a bad override is
    said to come from the command line (no temporary merged file appears anywhere)."""
    config = tmp_path / "my-recal.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "images": str(tmp_path / "images"),
                "embeddings": str(tmp_path / "emb"),
                "model": str(tmp_path / "model.pth"),
                "arch": "iresnet-demo",
                "output": str(tmp_path / "runs"),
                "holdout": {"embeddings": "h", "pairs": "p.csv"},
                "method": "sigmoid",
            }
        )
    )
    argv = ["--config", str(config), "--set", "embed.actors=-3", "--set", "grid.n_fmr=40"]
    with pytest.raises(SystemExit) as exit_info:
        JOBS_COMMON.run("recalibrate", "test", argv=argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert f"got 'sigmoid' (from {config})" in err
    assert "embed.actors (--actors) must be >= 1, got -3 (from the command line)" in err
    assert "overrides.yaml" not in err and "qmag-ray-recalibrate-" not in err
    assert "Traceback" not in err


def test_job_without_overrides_passes_the_config_uri_and_the_exit_code(tmp_path: Path) -> None:
    config = tmp_path / "embed.yaml"
    config.write_text("fail: true\n")
    seen: dict[str, Any] = {}
    with pytest.raises(SystemExit) as exit_info:
        JOBS_COMMON.run("embed", "test", argv=["--config", str(config)], app=recording_app(seen))
    assert exit_info.value.code == 3, "the command's failure is the job's exit code"
    assert seen["path"] == str(config) and seen["ray_address"] is None


@pytest.mark.s3
def test_job_reads_its_config_from_s3(s3_bucket: str) -> None:
    import fsspec

    uri = f"{s3_bucket}/configs/embed.yaml"
    with fsspec.open(uri, "w") as f:
        f.write("images: s3://b/x/\noutput: s3://b/out/\n")
    seen: dict[str, Any] = {}
    with pytest.raises(SystemExit):
        JOBS_COMMON.run(
            "embed",
            "t",
            argv=["--config", uri, "--set", "output=s3://b/o2/"],
            app=recording_app(seen),
        )
    assert seen["config"] == {"images": "s3://b/x/", "output": "s3://b/out/"}
    assert seen["path"] == uri and seen["overrides"] == ["output=s3://b/o2/"]
    from qmag_ray.config import load_config, parse_override
    from qmag_ray.embedding.config import EmbedConfig

    given = dict([parse_override("output=s3://b/o2/")], model="m.pth", arch="iresnet-demo")
    cfg = load_config(EmbedConfig, uri, given)
    assert (cfg.images, cfg.output) == ("s3://b/x/", "s3://b/o2/")


@pytest.mark.parametrize(
    ("override", "message"),
    [("actors", "key=value"), ("=3", "key=value"), ("a..b=1", "key=value"), ("k=[1,", "YAML")],
)
def test_bad_override_is_refused_with_its_text(override: str, message: str) -> None:
    from qmag_ray.config import ConfigError, parse_override

    with pytest.raises(ConfigError, match=message) as info:
        parse_override(override)
    assert repr(override) in str(info.value)


def test_override_below_a_scalar_names_the_key(tmp_path: Path) -> None:
    from qmag_ray.config import ConfigError, load_config
    from qmag_ray.embedding.config import EmbedConfig

    config = tmp_path / "embed.yaml"
    config.write_text("actors: 2\n")
    with pytest.raises(ConfigError, match=r"actors is a value, not a section \(actors.x\)"):
        load_config(EmbedConfig, str(config), {"actors.x": 1})


def test_missing_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SystemExit) as exit_info:
        JOBS_COMMON.run("embed", "t", argv=["--config", str(missing), "--set", "actors=1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"config file not found: {missing} (--config)" in err


def test_embed_job_config_is_a_valid_embed_config() -> None:
    from qmag_ray.config import load_config
    from qmag_ray.embedding.config import EmbedConfig

    cfg = load_config(EmbedConfig, str(JOBS / "configs" / "embed.yaml"))
    assert cfg.output.startswith("s3://") and cfg.gpus_per_actor >= 1


def command_options(name: str) -> set[str]:
    """Long option names of ``qmag-ray <name>`` (the real application)."""
    from qmag_ray.cli import app

    group = typer.main.get_command(app)
    assert name in group.commands, f"qmag-ray {name} is not registered in qmag_ray.cli"
    params = group.commands[name].params
    return {opt for p in params for opt in [*p.opts, *p.secondary_opts] if opt.startswith("--")}


@pytest.mark.parametrize("job", JOB_NAMES)
def test_job_config_keys_are_options_of_the_command(job: str) -> None:
    """Each job hands its config to ``qmag-ray <job> --config``; its keys must be known there."""
    options = command_options(job)
    assert {"--config", "--ray-address"} <= options
    config = yaml.safe_load((JOBS / "configs" / f"{job}.yaml").read_text())
    flat = {key for key, value in config.items() if not isinstance(value, dict)}
    unknown = {key for key in flat if "--" + key.replace("_", "-") not in options}
    assert not unknown, f"jobs/configs/{job}.yaml: no option of qmag-ray {job} for {unknown}"


def test_every_job_has_a_config() -> None:
    assert {p.stem for p in (JOBS / "configs").glob("*.yaml")} == set(JOB_NAMES)


# ----------------------------------------------------------------------------- README commands

COMMAND_WORDS = ("docker", "kubectl", "helm", "ray", "python", "export")


def readme_commands(text: str) -> list[list[str]]:
    """Shell commands of the ```bash blocks and of inline code spans that start with a command."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", outside):
        span = " ".join(span.split())
        if span.split()[0] in COMMAND_WORDS and len(span.split()) > 1:
            commands.append(span)
    return [shlex.split(c.rstrip(" &")) for c in commands]


def readme_sections() -> list[tuple[str, str]]:
    sections = [("infra/README.md", (INFRA / "README.md").read_text())]
    top = (REPO / "README.md").read_text()
    match = re.search(r"^## Run on a cluster\n.*?(?=^## |\Z)", top, flags=re.S | re.M)
    if match:
        sections.append(("README.md", match.group(0)))
    return sections


class CommandChecker:
    """Checks README commands against the repository and the manifests."""

    def __init__(self) -> None:
        self.built: set[str] = set()
        self.applied: set[Path] = set()
        self.secrets = secret_template_keys()
        self.names = {(d["kind"], d["metadata"]["name"]) for _, d in DOCS}
        ((_, cluster),) = objects("RayCluster")
        self.head_svc = f"{cluster['metadata']['name']}-head-svc"

    def check(self, argv: list[str]) -> None:
        handler = getattr(self, f"cmd_{argv[0]}", None)
        assert handler is not None, f"no check for the command {argv[0]}"
        handler(argv[1:])

    def cmd_docker(self, args: list[str]) -> None:
        if args[0] == "push":
            assert args[1] in self.built, f"docker push {args[1]}: not built above"
            return
        assert args[0] == "build"
        opts = {"-f": None, "-t": None, "--build-arg": []}
        rest = []
        it = iter(args[1:])
        for arg in it:
            if arg == "--build-arg":
                opts["--build-arg"].append(next(it))
            elif arg in opts:
                opts[arg] = next(it)
            else:
                rest.append(arg)
        (context,) = rest
        dockerfile = REPO / (opts["-f"] or f"{context}/Dockerfile")
        assert dockerfile.is_file() and (REPO / context).is_dir()
        declared = dockerfile_args(dockerfile)
        build_args = dict(a.split("=", 1) for a in opts["--build-arg"])
        assert set(build_args) <= set(declared), f"unknown build args {build_args}"
        tag = opts["-t"]
        if dockerfile == DOCKERFILE:
            variant = "gpu" if build_args["ACCELERATOR"].startswith("cu") else "cpu"
            assert tag == f"{PROJECT_IMAGE}:{PROJECT_VERSION}-{variant}", tag
        else:
            images = {c["image"] for _, _, c in containers()}
            assert tag in images, f"{tag} is used by no manifest"
        self.built.add(tag)

    def cmd_helm(self, args: list[str]) -> None:
        if args[:2] == ["repo", "add"]:
            assert args[2:] == ["kuberay", "https://ray-project.github.io/kuberay-helm/"]
            return
        if args == ["repo", "update"]:
            return
        assert args[0] == "install" and args[2] == "kuberay/kuberay-operator", args
        version = Version(args[args.index("--version") + 1])
        assert version >= Version("1.6.0"), "RayCronJob needs KubeRay 1.6+"
        assert REPO / args[args.index("-f") + 1] == OPERATOR_VALUES

    def cmd_kubectl(self, args: list[str]) -> None:
        verb = args[0]
        if verb == "apply":
            paths = [REPO / args[i + 1] for i, a in enumerate(args) if a == "-f"]
            assert paths and all(p.exists() for p in paths), args
            for path in paths:
                assert SECRETS_TEMPLATE not in (path.rglob("*") if path.is_dir() else [path])
                self.applied.add(path)
        elif verb == "create" and args[1] == "secret":
            assert args[2] == "generic"
            keys = self.secrets[args[3]]
            given = dict(a.split("=", 1)[1].split("=", 1) for a in args[4:])
            assert set(given) <= keys and given, f"secret {args[3]}: {given} vs {keys}"
            for key, value in given.items():
                if re.search(r"(?i)password|token|secret", key):
                    assert value.startswith("$"), f"{key} must not be a literal"
        elif verb == "create" and args[1] == "configmap":
            assert args[2] == JOB_CONFIGMAP and args[3] == "--from-file=jobs/configs/"
        elif verb in ("get", "delete") and args[1] in ("rayjob", "configmap"):
            kind = {"rayjob": "RayJob", "configmap": "ConfigMap"}[args[1]]
            assert (kind, args[2]) in self.names or args[2] == JOB_CONFIGMAP, args
        elif verb == "get" and args[1] == "secret":
            key = re.fullmatch(r"jsonpath=\{\.data\.(\w+)\}", args[4])
            assert args[3] == "-o" and key and key.group(1) in self.secrets[args[2]], args
        elif verb == "port-forward":
            service = args[1].removeprefix("svc/")
            port = int(args[2].split(":")[1])
            if service == self.head_svc:
                assert port == 8265
            else:
                (svc,) = [d for _, d in objects("Service") if d["metadata"]["name"] == service]
                assert port in [p["port"] for p in svc["spec"]["ports"]]
        else:
            raise AssertionError(f"no check for kubectl {' '.join(args)}")

    def cmd_export(self, args: list[str]) -> None:
        (assignment,) = args
        name, value = assignment.split("=", 1)
        if name == "RAY_AUTH_MODE":
            assert value == "token"
            return
        assert name == "RAY_AUTH_TOKEN", assignment
        inner = re.fullmatch(r"\$\((.*)\| base64 -d\)", value)
        assert inner, value
        self.check(shlex.split(inner.group(1)))

    def cmd_ray(self, args: list[str]) -> None:
        ctx = ray_command(args)
        if ctx is None:
            return
        params = ctx.params
        if args[:2] == ["job", "submit"]:
            assert params["address"].startswith("http://127.0.0.1:8265")
            assert (REPO / params["working_dir"]).resolve() == REPO
            runtime_env = REPO / params["runtime_env"]
            assert runtime_env == JOBS / "runtime_env.yaml"
            check_job_command(list(params["entrypoint"]))
        elif args[0] in ("up", "down", "dashboard"):
            assert REPO / params["cluster_config_file"] == AWS_CLUSTER

    def cmd_python(self, args: list[str]) -> None:
        check_job_command(["python", *args])


@pytest.mark.parametrize("section", readme_sections(), ids=lambda s: s[0])
def test_readme_cluster_commands_match_the_repository(section: tuple[str, str]) -> None:
    name, text = section
    commands = readme_commands(text)
    assert len(commands) >= 25, f"{name}: too few commands found"
    checker = CommandChecker()
    for argv in commands:
        try:
            checker.check(argv)
        except Exception as exc:
            raise AssertionError(f"{name}: `{shlex.join(argv)}`: {exc}") from exc
    manifests = {p for p, d in DOCS if p != SECRETS_TEMPLATE}
    covered = {p for p in manifests if any(p == a or a in p.parents for a in checker.applied)}
    assert covered == manifests, f"never applied: {sorted(map(str, manifests - covered))}"
