"""The Kubernetes manifests validate offline, in strict mode, as each overlay renders them.

Custom resources are checked against the KubeRay CRDs vendored in ``k8s/crds/kuberay``
(unknown keys rejected), built-in kinds against the Kubernetes schemas that
``kubernetes-validate`` ships (strict), and the Prometheus Operator's PodMonitor against the
part of its API the manifests use. Overlays are rendered with ``kubectl kustomize``.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from typing import Any

import jsonschema
import pytest
import yaml

from cs_testing.cluster import SERVING_RAY_ENV
from services.config import AppConfig
from tests.conftest import REPO_ROOT

K8S = REPO_ROOT / "k8s"
#: Vendored from kuberay's ray-operator/config/crd/bases (see the README there); in no kustomization.
KUBERAY_CRDS = K8S / "crds" / "kuberay"
KUBERAY_KINDS = ["RayService", "RayCluster", "RayJob", "RayCronJob"]
KUBERNETES_VERSION = "1.32"  # the oldest Kubernetes the manifests are written for (podFailurePolicy GA: 1.31)
OVERLAYS = ["base", "overlays/dev", "overlays/prod"]
#: Secrets the deployment manual tells the operator to create; everything else must be rendered.
HAND_MADE_SECRETS = {"customer-service-secrets", "redis-auth", "postgres-auth", "knowledge-sync-credentials"}

# The PodMonitor fields these manifests use (monitoring.coreos.com/v1 API reference), closed
# to unknown keys like the CRD checks.
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
}
_RELABELING = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "action": {"type": "string"},
        "separator": {"type": "string"},
    },
}
PODMONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string"},
                            "relabelings": {"type": "array", "items": _RELABELING},
                            "metricRelabelings": {"type": "array", "items": _RELABELING},
                        },
                    },
                },
            },
        },
    },
}


def strict(schema: Any) -> Any:
    """Forbid unknown keys wherever the CRD lists properties, to catch misspellings."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@cache
def kuberay_schema(kind: str) -> Any:
    """The strict JSON schema of a KubeRay kind (ray.io/v1) from the vendored CRD."""
    crd = yaml.safe_load((KUBERAY_CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    return strict(next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"])


def validate(document: dict[str, Any]) -> None:
    """Validate one manifest by its kind; raise on any schema error or an unknown kind."""
    import kubernetes_validate

    api_version, kind = document["apiVersion"], document["kind"]
    if api_version == "ray.io/v1":
        jsonschema.validate(document, kuberay_schema(kind))
    elif api_version == "monitoring.coreos.com/v1" and kind == "PodMonitor":
        jsonschema.validate(document, PODMONITOR_SCHEMA)
    else:
        # Raises SchemaNotFoundError for a kind it does not know: no kind passes unchecked.
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """The documents `kubectl kustomize` renders for an overlay (or the base)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed (scripts/test.sh installs it; kustomize needs kubectl >= 1.27)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def by_kind(documents: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc["kind"] == kind]


def pod_specs(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every pod spec a workload or a RayService carries."""
    spec = document.get("spec", {})
    if document["kind"] == "RayService":
        cluster = spec["rayClusterConfig"]
        yield cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster["workerGroupSpecs"]:
            yield group["template"]["spec"]
    elif document["kind"] == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]
    elif "template" in spec:
        yield spec["template"]["spec"]


@pytest.mark.parametrize("kind", KUBERAY_KINDS)
def test_the_vendored_crds_are_complete_and_stay_out_of_the_rendered_manifests(kind: str) -> None:
    schema = kuberay_schema(kind)  # fails loudly when a file is missing or has no ray.io/v1 schema
    assert schema["properties"]["spec"]["additionalProperties"] is False
    for overlay in OVERLAYS:
        assert "CustomResourceDefinition" not in {doc["kind"] for doc in rendered(overlay)}, overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_manifest_validates_strictly(overlay: str) -> None:
    documents = rendered(overlay)
    kinds = {doc["kind"] for doc in documents}
    assert {"RayService", "CronJob", "StatefulSet", "Service", "ConfigMap", "PodMonitor"} <= kinds
    for document in documents:
        validate(document)


@pytest.mark.parametrize(
    ("kind", "path", "misspelled"),
    [
        ("RayService", ["spec", "rayClusterConfig", "workerGroupSpecs", 0], "maxReplica"),
        ("RayService", ["spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0], "envFrm"),
        ("CronJob", ["spec"], "concurencyPolicy"),
        ("StatefulSet", ["spec", "template", "spec", "containers", 0], "readinesProbe"),
        ("PodMonitor", ["spec", "podMetricsEndpoints", 0], "intervall"),
    ],
)
def test_a_misspelled_key_fails_validation(kind: str, path: list[str | int], misspelled: str) -> None:
    document = copy.deepcopy(by_kind(rendered("overlays/prod"), kind)[0])
    validate(document)
    node: Any = document
    for step in path:
        node = node[step]
    node[misspelled] = 4
    with pytest.raises(jsonschema.ValidationError, match=misspelled):
        validate(document)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_v2_is_serve_config_yaml_and_passes_ray_schema(overlay: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    (rayservice,) = by_kind(rendered(overlay), "RayService")
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text()), (
        "serveConfigV2 differs from serve_config.yaml: run `python scripts/sync_rayservice.py`"
    )
    ServeDeploySchema.model_validate(embedded)
    AppConfig.model_validate(embedded["applications"][0]["args"])
    # Everything is in the image: nothing is installed when the cluster starts.
    assert all("runtime_env" not in app for app in embedded["applications"])


def test_the_sync_script_rewrites_a_stale_serve_config() -> None:
    from scripts.sync_rayservice import RAYSERVICE, render

    current = RAYSERVICE.read_text()
    assert render(current, (REPO_ROOT / "serve_config.yaml").read_text()) == current
    stale = render(current, "applications: []\n")
    assert yaml.safe_load(yaml.safe_load(stale)["spec"]["serveConfigV2"]) == {"applications": []}
    assert render(stale, (REPO_ROOT / "serve_config.yaml").read_text()) == current


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_gpus_only_in_the_gpu_group_and_every_pod_has_limits(overlay: str) -> None:
    documents = rendered(overlay)
    (rayservice,) = by_kind(documents, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    gpu_pod = groups["gpu"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])
    assert groups["gpu"]["minReplicas"] <= groups["gpu"]["maxReplicas"]
    for name, spec in [
        ("head", cluster["headGroupSpec"]["template"]["spec"]),
        ("cpu", groups["cpu"]["template"]["spec"]),
    ]:
        assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"], name
    for document in documents:
        for pod in pod_specs(document):
            for container in pod["containers"]:
                assert {"requests", "limits"} <= container["resources"].keys(), (document["kind"], container["name"])
    # The GPU replicas of serveConfigV2 fit the GPU group's nodes.
    args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["llm"]["deployment"]["num_gpus"] <= 1 and args["embedder"]["deployment"]["num_gpus"] <= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_pod_declares_the_metrics_port_that_the_podmonitor_scrapes(overlay: str) -> None:
    documents = rendered(overlay)
    (rayservice,) = by_kind(documents, "RayService")
    (monitor,) = by_kind(documents, "PodMonitor")
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        number = int(group["rayStartParams"]["metrics-export-port"])
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert ports[port] == number


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve_and_no_secret_value_is_in_git(overlay: str) -> None:
    documents = rendered(overlay)
    assert not by_kind(documents, "Secret"), "secret values do not belong in git"
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in documents}
    secrets: set[str] = set()
    for document in documents:
        for pod in pod_specs(document):
            for volume in pod.get("volumes", []):
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in names
                if "persistentVolumeClaim" in volume:
                    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
            for container in pod["containers"]:
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        assert ("ConfigMap", source["configMapRef"]["name"]) in names
                    if "secretRef" in source:
                        secrets.add(source["secretRef"]["name"])
                for variable in container.get("env", []):
                    ref = variable.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        secrets.add(ref["name"])
    assert secrets == HAND_MADE_SECRETS
    manual = (REPO_ROOT / "docs" / "deploying.md").read_text()
    for secret in secrets:
        assert f"kubectl create secret generic {secret}" in manual


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_sync_cronjob_never_overlaps_and_calls_the_serve_service(overlay: str) -> None:
    documents = rendered(overlay)
    (cronjob,) = [c for c in by_kind(documents, "CronJob") if c["metadata"]["name"].endswith("knowledge-sync")]
    (rayservice,) = by_kind(documents, "RayService")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["cs-knowledge-sync"]
    # KubeRay's Service in front of the Serve proxies is <RayService name>-serve-svc.
    port = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["http_options"]["port"]
    assert f"--app-url=http://{rayservice['metadata']['name']}-serve-svc:{port}" in container["args"]
    (sources,) = [
        d for d in by_kind(documents, "ConfigMap") if d["metadata"]["name"].startswith("knowledge-sync-sources")
    ]
    from knowledge_sync.sources import SourcesFile

    SourcesFile.model_validate(yaml.safe_load(sources["data"]["sources.yaml"]))


def test_the_image_builds_on_the_ray_llm_image_of_the_pinned_ray() -> None:
    pins = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_version = next(re.fullmatch(r"ray\[serve\]==(.+)", pin) for pin in pins if pin.startswith("ray[")).group(1)
    dockerfile = (K8S / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_LLM_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert base and base.group(1).startswith(f"rayproject/ray-llm:{ray_version}-py311-")
    assert 'pip install --no-cache-dir ".[gpu]"' in dockerfile
    (rayservice,) = by_kind(rendered("base"), "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray_version
    ignored = (K8S / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignored and "!services/" in ignored  # no venv or model folders in the context


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_pod_and_the_dev_script_serve_with_the_ray_settings_the_tests_run_under(overlay: str) -> None:
    documents = rendered(overlay)
    [env] = [c for c in by_kind(documents, "ConfigMap") if c["metadata"]["name"].startswith("customer-service-env")]
    assert SERVING_RAY_ENV.items() <= env["data"].items()
    dev_script = (REPO_ROOT / "scripts" / "run-dev.sh").read_text()
    assert all(f"{key}={value}" in dev_script for key, value in SERVING_RAY_ENV.items())


def test_the_handles_the_tests_bind_call_over_grpc_as_deployed_handles_do() -> None:
    # Serve reads its settings on import: set too late, the suite's handles would keep Ray
    # actor calls while every deployment's calls go over gRPC (the throughput-optimized mode).
    from ray.serve._private.handle_options import DynamicHandleOptions

    assert DynamicHandleOptions()._by_reference is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_control_ports_admit_only_ray_pods_and_the_operator_and_the_public_routes_skip_admin(
    overlay: str,
) -> None:
    documents = rendered(overlay)
    [policy] = [p for p in by_kind(documents, "NetworkPolicy") if p["metadata"]["name"] == "ray-cluster"]
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if not ports:  # every port: only from the cluster's own Ray pods
            assert [set(f) for f in rule["from"]] == [{"podSelector"}]
        else:
            assert not ports & {6379, 10001}, rule  # GCS and client ports: Ray pods only
    [ingress] = by_kind(documents, "Ingress")
    paths = [p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert paths and not any(p.startswith(("/admin", "/docs", "/openapi")) for p in paths)
    [env] = [c for c in by_kind(documents, "ConfigMap") if c["metadata"]["name"].startswith("customer-service-env")]
    assert env["data"]["RAY_AUTH_MODE"] == "token"
