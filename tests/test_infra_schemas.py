"""Every manifest in infra/ against the schema the API server would apply to it.

- KubeRay resources (RayCluster, RayJob, RayCronJob) against the CustomResourceDefinitions of
  the KubeRay release the project targets (v1.7.0, in ../shared/data/kuberay-crds-v1.7.0/),
  strictly: a field the CRD does not declare is an error here, because the API server would
  silently prune it (that is how a misplaced ``authOptions`` goes unnoticed).
- Built-in resources (Deployment, Service, CronJob, ...) with kubernetes-validate, strict.
- No container command line in infra/ carries a secret (it would show in the process list).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
CRD_FOLDER = "kuberay-crds-v1.7.0"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayCronJob")
#: The Kubernetes version whose built-in schemas the manifests are checked against.
KUBERNETES_VERSION = "1.31.0"


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(INFRA.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc:
                docs.append((path, doc))
    return docs


DOCS = manifests()


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3 structural schema as JSON Schema that rejects what the server prunes."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _strict(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_strict(sub) for sub in value]
        elif key.startswith("x-kubernetes-") or key in ("nullable", "format", "description"):
            continue
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable"):
        kind = out.get("type")
        if isinstance(kind, str):
            out["type"] = [kind, "null"]
    preserve = schema.get("x-kubernetes-preserve-unknown-fields")
    if out.get("type") == "object" and "properties" in out and not preserve:
        out.setdefault("additionalProperties", False)
    return out


def _crd_validators(folder: Path) -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    validators = {}
    for path in sorted(folder.glob("ray.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        kind = crd["spec"]["names"]["kind"]
        group = crd["spec"]["group"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = _strict(version["schema"]["openAPIV3Schema"])
            # the API server owns metadata (ObjectMeta), whatever the CRD says of it
            schema["properties"]["metadata"] = {"type": "object"}
            api = f"{group}/{version['name']}"
            validators[(api, kind)] = jsonschema.Draft7Validator(schema)
    return validators


@pytest.fixture(scope="module")
def crd_validators(shared_data: Path) -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    folder = shared_data / CRD_FOLDER
    validators = _crd_validators(folder)
    assert {kind for _, kind in validators} == set(KUBERAY_KINDS), folder
    return validators


def _errors(validator: jsonschema.Draft7Validator, doc: dict[str, Any]) -> list[str]:
    found = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in error.absolute_path) or "(top)"
        found.append(f"{where}: {error.message[:200]}")
    return found


KUBERAY_DOCS = [(p, d) for p, d in DOCS if d["kind"] in KUBERAY_KINDS]
BUILTIN_DOCS = [(p, d) for p, d in DOCS if d["kind"] not in KUBERAY_KINDS]


def _id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.relative_to(INFRA)}:{doc['kind']}:{doc.get('metadata', {}).get('name', '')}"


def test_every_kuberay_kind_in_infra_is_covered() -> None:
    assert {d["kind"] for _, d in KUBERAY_DOCS} == set(KUBERAY_KINDS)
    assert len(BUILTIN_DOCS) >= 5


@pytest.mark.parametrize("item", KUBERAY_DOCS, ids=_id)
def test_kuberay_resource_matches_the_v1_7_crd_without_pruned_fields(
    item: tuple[Path, dict[str, Any]], crd_validators
) -> None:
    path, doc = item
    validator = crd_validators.get((doc["apiVersion"], doc["kind"]))
    assert validator is not None, f"{path}: {doc['apiVersion']} {doc['kind']} is not served"
    assert _errors(validator, doc) == [], path


def test_the_crd_check_rejects_a_field_the_server_would_prune(crd_validators) -> None:
    """The check can fail: a misplaced authOptions (under headGroupSpec) is reported."""
    ((path, cluster),) = [(p, d) for p, d in KUBERAY_DOCS if d["kind"] == "RayCluster"]
    validator = crd_validators[("ray.io/v1", "RayCluster")]
    broken = copy.deepcopy(cluster)
    broken["spec"]["headGroupSpec"]["authOptions"] = broken["spec"].pop("authOptions")
    assert _errors(validator, broken) == [
        "spec.headGroupSpec: Additional properties are not allowed ('authOptions' was unexpected)"
    ]
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert any("minReplica" in e for e in _errors(validator, typo))
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["authOptions"]["mode"] = "password"
    assert any("spec.authOptions.mode" in e for e in _errors(validator, wrong_type))


def test_every_ray_cluster_authenticates_with_a_token_through_auth_options() -> None:
    """Token auth through spec.authOptions reaches the autoscaler sidecar too (issue 12.8)."""
    specs = []
    for path, doc in KUBERAY_DOCS:
        spec = doc["spec"]
        if doc["kind"] == "RayCronJob":
            spec = spec["jobTemplate"]
        if doc["kind"] in ("RayJob", "RayCronJob"):
            spec = spec.get("rayClusterSpec")
            if spec is None:
                continue
        specs.append((path, spec))
    assert len(specs) >= 5
    for path, spec in specs:
        assert spec.get("authOptions", {}).get("mode") == "token", path


@pytest.mark.parametrize("item", BUILTIN_DOCS, ids=_id)
def test_builtin_resource_is_valid_for_kubernetes(item: tuple[Path, dict[str, Any]]) -> None:
    import kubernetes_validate

    path, doc = item
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:  # pragma: no cover - the failure path
        pytest.fail(f"{path}: {exc.message} at {'.'.join(map(str, exc.path))}")


def test_kubernetes_validate_rejects_an_unknown_field() -> None:
    import kubernetes_validate

    ((_, deployment),) = [(p, d) for p, d in BUILTIN_DOCS if d["kind"] == "Deployment"]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["commands"] = ["mlflow"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# ------------------------------------------------------------------ no secret on a command line

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _containers(node: Any) -> list[dict[str, Any]]:
    """Every container (and init container) anywhere in a manifest."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found.extend(c for c in value if isinstance(c, dict))
            found.extend(_containers(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_containers(value))
    return found


def secret_variables(container: dict[str, Any]) -> set[str]:
    """Env names whose value comes from a Secret, directly or through $(VAR) composition."""
    env = container.get("env", [])
    secret = {e["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    changed = True
    while changed:
        changed = False
        for entry in env:
            uses = set(_VAR.findall(str(entry.get("value", ""))))
            if entry["name"] not in secret and uses & secret:
                secret.add(entry["name"])
                changed = True
    return secret


def command_line_secrets(container: dict[str, Any]) -> list[str]:
    secret = secret_variables(container)
    words = [str(w) for w in (container.get("command") or []) + (container.get("args") or [])]
    return sorted({v for w in words for v in _VAR.findall(w) if v in secret})


def test_no_container_in_infra_puts_a_secret_on_its_command_line() -> None:
    checked = 0
    for path, doc in DOCS:
        for container in _containers(doc):
            checked += 1
            assert command_line_secrets(container) == [], f"{path}: {container.get('name')}"
    assert checked >= 8


def test_the_command_line_check_finds_a_composed_secret() -> None:
    """The check can fail: the first wave's MLflow command line (issue 12.8) is caught."""
    container = {
        "name": "mlflow",
        "env": [
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
            {"name": "HOST", "value": "db"},
            {"name": "URI", "value": "postgresql://u:$(PW)@$(HOST)/mlflow"},
        ],
        "command": ["mlflow", "server", "--backend-store-uri", "$(URI)", "--host", "$(HOST)"],
    }
    assert command_line_secrets(container) == ["URI"]
