"""The KubeRay manifest validates offline against the vendored CRD and carries serve_config.yaml."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from services.config import AppConfig
from tests.conftest import REPO_ROOT

CRD = REPO_ROOT.parent / "shared" / "schemas" / "kuberay" / "ray.io_rayservices.yaml"


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


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((REPO_ROOT / "k8s" / "rayservice.yaml").read_text())
    return document


@pytest.mark.skipif(not CRD.exists(), reason="KubeRay CRDs are vendored in ../shared/schemas")
def test_rayservice_matches_the_crd(manifest: dict[str, Any]) -> None:
    import jsonschema

    crd = yaml.safe_load(CRD.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    jsonschema.validate(manifest, strict(schema))


def test_serve_config_v2_is_serve_config_yaml(manifest: dict[str, Any]) -> None:
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    AppConfig.model_validate(embedded["applications"][0]["args"])


def test_serve_config_v2_passes_ray_schema(manifest: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))


def test_misspelled_key_would_be_caught(manifest: dict[str, Any]) -> None:
    import jsonschema

    if not CRD.exists():
        pytest.skip("no vendored CRD")
    crd = yaml.safe_load(CRD.read_text())
    schema = strict(next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"])
    broken = yaml.safe_load(yaml.safe_dump(manifest))
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(broken, schema)
