"""The ``cs-knowledge-sync`` command against real Milvus Lite and MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cs_testing.knowledge import SAMPLE_KB
from knowledge_sync.__main__ import main
from tests.conftest import embedder_args, llm_args, orchestrator_args, retriever_args

pytestmark = pytest.mark.integration


@pytest.fixture()
def config_file(tmp_path: Path, minilm_dir: Path) -> Path:
    args = {
        "embedder": embedder_args(minilm_dir),
        "retriever": retriever_args(tmp_path / "kb.db"),
        "llm": llm_args(tmp_path / "unused-model"),
        "orchestrator": orchestrator_args(),
    }
    document = {"applications": [{"name": "cs", "import_path": "services.app:build_app", "args": args}]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def run(
    config: Path, path: Path, capsys: pytest.CaptureFixture[str], tenant: str = "lumen", *extra: str
) -> tuple[int, str]:
    argv = ["--config", str(config), "--tenant", tenant, "--source", "kb", "--path", str(path), "--no-progress"]
    code = main([*argv, *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_sync_is_idempotent_and_deletes_vanished_documents(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(config_file, SAMPLE_KB, capsys)
    assert code == 0 and "lumen/kb (complete): 34 added, 0 updated, 0 deleted, 0 unchanged, 0 rejected" in out
    code, out = run(config_file, SAMPLE_KB, capsys)
    assert code == 0 and "0 added, 0 updated, 0 deleted, 34 unchanged, 0 rejected; 0 chunks embedded" in out

    documents = json.loads(SAMPLE_KB.read_text())["documents"]
    documents[0]["text"] += " Updated."
    smaller = tmp_path / "smaller.json"
    smaller.write_text(json.dumps(documents[:-1]))
    code, out = run(config_file, smaller, capsys)
    assert code == 0 and "0 added, 1 updated, 1 deleted, 32 unchanged, 0 rejected; 1 chunks embedded" in out


def test_bad_records_are_rejected_with_the_reason_and_the_rest_syncs(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mixed = tmp_path / "mixed.json"
    mixed.write_text('[{"doc_id": "a", "title": "t", "text": ""}, {"doc_id": "b", "title": "Hours", "text": "9-22."}]')
    rejects = tmp_path / "rejects.jsonl"
    code, out = run(config_file, mixed, capsys, "lumen", "--rejects", str(rejects))
    assert code == 1
    assert "1 added" in out and "1 rejected" in out
    [reject] = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert reject == {"tenant": "lumen", "source": "kb", "record": 1, "doc_id": "a",
                      "reason": "text: String should have at least 1 character"}  # fmt: skip


def test_unreadable_file_fails_the_source_and_changes_nothing(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, out = run(config_file, bad, capsys)
    assert code == 3 and "lumen/kb: FAILED:" in out and "not readable JSON" in out


def test_bad_tenant_is_a_usage_error(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(config_file, SAMPLE_KB, capsys, tenant="Bad Tenant")
    assert exit_info.value.code == 2
    assert "--tenant 'Bad Tenant'" in capsys.readouterr().err
