"""The ``cs-knowledge-sync`` command against real Milvus Lite and MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from knowledge_sync.__main__ import main
from tests.conftest import SAMPLE_KB, embedder_args, llm_args, orchestrator_args, retriever_args

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


def run(config: Path, path: Path, capsys: pytest.CaptureFixture[str], tenant: str = "lumen") -> tuple[int, str]:
    code = main(["--config", str(config), "--tenant", tenant, "--source", "kb", "--path", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_sync_is_idempotent_and_deletes_vanished_documents(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(config_file, SAMPLE_KB, capsys)
    assert code == 0 and "34 documents, 34 chunks (34 embedded, 0 unchanged, 0 deleted)" in out
    code, out = run(config_file, SAMPLE_KB, capsys)
    assert code == 0 and "(0 embedded, 34 unchanged, 0 deleted)" in out

    documents = json.loads(SAMPLE_KB.read_text())["documents"]
    documents[0]["text"] += " Updated."
    smaller = tmp_path / "smaller.json"
    smaller.write_text(json.dumps(documents[:-1]))
    code, out = run(config_file, smaller, capsys)
    assert code == 0 and "33 documents, 33 chunks (1 embedded, 32 unchanged, 1 deleted)" in out


def test_bad_file_fails_with_the_fault_named(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"doc_id": "a", "title": "t", "text": ""}]')
    code, out = run(config_file, bad, capsys)
    assert code == 1
    assert "record 1: text: String should have at least 1 character" in out


def test_bad_tenant_is_a_usage_error(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(config_file, SAMPLE_KB, capsys, tenant="Bad Tenant")
    assert exit_info.value.code == 2
    assert "--tenant 'Bad Tenant'" in capsys.readouterr().err
