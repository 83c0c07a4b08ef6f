"""The ONNX Runtime embedding backend and ``cs-export-onnx``, with the real MiniLM model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray import serve

from cs_tools import export_onnx
from services.config import EmbedderConfig
from services.embedder import build_embedder, load_embedding_backend
from tests.conftest import REPO_ROOT, embedder_args

pytestmark = pytest.mark.integration

TEXTS = [
    "refund to the original payment method",
    "七天无理由退货",
    "a much longer sentence " * 200,  # cut at max_length by both runtimes
    "x",
    "  odd\twhitespace  ",
]


@pytest.fixture(scope="module")
def minilm_onnx(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx.export_dense_model(minilm_dir, tmp_path_factory.mktemp("export") / "minilm-onnx")


def config_for(model: Path, **overrides: Any) -> EmbedderConfig:
    return EmbedderConfig.model_validate(
        embedder_args(model)
        | {"query_instruction": "query: ", "passage_instruction": "passage: ", "max_batch_size": 4}
        | overrides
    )


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("kind", ["query", "passage"])
def test_onnx_backend_gives_the_torch_backends_vectors_and_token_counts(
    minilm_dir: Path, minilm_onnx: Path, kind: str, pooling: str
) -> None:
    from services.embedder import OnnxEmbeddingBackend

    torch_backend = load_embedding_backend(config_for(minilm_dir, pooling_method=pooling))
    onnx_backend = load_embedding_backend(config_for(minilm_onnx, pooling_method=pooling, runtime="onnxruntime"))
    assert isinstance(onnx_backend, OnnxEmbeddingBackend)
    assert onnx_backend.dimension == torch_backend.dimension == 384
    # Five texts with max_batch_size 4: two passes, longest first, back in the texts' order.
    for mine, reference in zip(onnx_backend.encode(TEXTS, kind), torch_backend.encode(TEXTS, kind), strict=True):
        assert mine.dense == pytest.approx(reference.dense, abs=1e-5)
    assert onnx_backend.count_tokens(TEXTS) == torch_backend.count_tokens(TEXTS)


def test_onnx_backend_runs_without_torch_or_transformers_in_the_process(minilm_onnx: Path) -> None:
    code = (
        "import sys; from services.config import EmbedderConfig; from services.embedder import load_embedding_backend; "
        f"config = EmbedderConfig(model={str(minilm_onnx)!r}, family='dense', runtime='onnxruntime'); "
        "vector = load_embedding_backend(config).encode(['x'], 'query')[0].dense; "
        "print(len(vector), sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "384 []"


def test_onnx_runtime_names_the_export_command_for_a_folder_without_an_export(minilm_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"has no model\.onnx or .*cs-export-onnx MODEL_DIR DEST_DIR"):
        load_embedding_backend(config_for(minilm_dir, runtime="onnxruntime"))


def test_an_export_that_differs_from_torch_is_not_written(
    minilm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "minilm-onnx"
    dest.mkdir()
    (dest / export_onnx.MANIFEST_FILE).write_text("{}")  # an earlier export
    (dest / "kept.txt").write_text("an earlier export")
    # No float32 graph matches torch exactly: with no tolerance the check must refuse.
    monkeypatch.setattr(export_onnx, "TOLERANCE", 0.0)
    with pytest.raises(export_onnx.ExportError, match="differ from torch's"):
        export_onnx.export_dense_model(minilm_dir, dest)
    assert [p.name for p in tmp_path.iterdir()] == ["minilm-onnx"]
    assert (dest / "kept.txt").read_text() == "an earlier export"


def test_export_refuses_destinations_that_would_lose_other_files(minilm_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(export_onnx.ExportError, match="holds the model itself"):
        export_onnx.export_dense_model(minilm_dir, minilm_dir)
    with pytest.raises(export_onnx.ExportError, match="holds the model itself"):
        export_onnx.export_dense_model(minilm_dir, minilm_dir.parent)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("someone's files")
    with pytest.raises(export_onnx.ExportError, match=r"neither empty nor an earlier export \(no export\.json\)"):
        export_onnx.export_dense_model(minilm_dir, other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(export_onnx.ExportError, match="is a file, not a folder"):
        export_onnx.export_dense_model(minilm_dir, tmp_path / "a-file")


def test_onnx_runtime_refuses_a_max_length_beyond_what_the_export_was_checked_for(minilm_onnx: Path) -> None:
    with pytest.raises(ValueError, match=r"embedder\.max_length 1024 is more than the 512 tokens"):
        load_embedding_backend(config_for(minilm_onnx, runtime="onnxruntime", max_length=1024))


def test_e5_export_with_sentencepiece_gives_the_torch_models_vectors() -> None:
    from services.embedding_tokenizer import SentencePieceTokenizer

    export, model = REPO_ROOT / "models" / "multilingual-e5-small-onnx", REPO_ROOT / "models" / "multilingual-e5-small"
    if not (export / "sentencepiece.model").exists() or not (model / "config.json").exists():
        pytest.skip("dev models missing: run `cs-fetch-models --dest models` (scripts/test.sh does)")
    args = {"pooling_method": "mean", "max_length": 512, "max_batch_size": 4}
    onnx_backend = load_embedding_backend(config_for(export, runtime="onnxruntime", **args))
    assert isinstance(onnx_backend._tokenizer, SentencePieceTokenizer)
    torch_backend = load_embedding_backend(config_for(model, **args))
    texts = [*TEXTS, "可以开发票吗？<mask>", "<s>"]
    for mine, reference in zip(onnx_backend.encode(texts, "query"), torch_backend.encode(texts, "query"), strict=True):
        assert mine.dense == pytest.approx(reference.dense, abs=1e-5)
    assert onnx_backend.count_tokens(texts) == torch_backend.count_tokens(texts)


def test_export_command_refuses_a_folder_that_is_no_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_onnx.main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is not a transformers model folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def onnx_embedder(ray_cluster: dict[str, Any], minilm_onnx: Path) -> Iterator[Any]:
    handle = serve.run(
        build_embedder(config_for(minilm_onnx, runtime="onnxruntime")), name="onnx-embedder-test", route_prefix=None
    )
    yield handle
    serve.delete("onnx-embedder-test")


async def test_embedder_deployment_serves_the_onnx_export_with_torchs_vectors(
    onnx_embedder: Any, minilm_dir: Path
) -> None:
    reference = load_embedding_backend(config_for(minilm_dir)).encode(TEXTS[:2], "query")
    served = await onnx_embedder.embed.remote(TEXTS[:2], "query")
    for mine, theirs in zip(served, reference, strict=True):
        assert mine.dense == pytest.approx(theirs.dense, abs=1e-5)
    assert (await onnx_embedder.info.remote())["dimension"] == 384


def sample_texts() -> list[str]:
    """Every text of the sample knowledge bases and evaluation sets, and seeded odd strings."""
    import json
    import random

    import yaml

    texts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for path in sorted((REPO_ROOT / "knowledge_sync" / "samples").glob("*.json")):
        walk(json.loads(path.read_text()))
    for path in sorted((REPO_ROOT / "examples" / "eval").glob("*.yaml")):
        walk(yaml.safe_load(path.read_text()))
    alphabet = "abc XYZ 019 \t\n　，。？！退货发票😀éñß－ＡＢ１<s></s><mask><pad><unk>…“”\u200b\u00a0한국어日本語"
    rng = random.Random(7)
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(2000)]
    return texts


def test_sentencepiece_gives_the_tokenizers_ids_for_an_xlm_r_vocabulary(tmp_path: Path) -> None:
    import tokenizers

    from services.embedding_tokenizer import SentencePieceTokenizer, load_export_tokenizer

    source = REPO_ROOT / "models" / "multilingual-e5-small-onnx" / "tokenizer.json"
    if not source.exists():
        pytest.skip("dev models missing: run `cs-fetch-models --dest models` (scripts/test.sh does)")
    assert export_onnx.write_sentencepiece(source, tmp_path)
    ours = load_export_tokenizer(tmp_path)
    assert isinstance(ours, SentencePieceTokenizer)
    theirs = tokenizers.Tokenizer.from_file(str(source))
    theirs.no_padding()
    theirs.no_truncation()
    texts = sample_texts()
    differ = [
        text
        for text in texts
        if ours.encode(text, add_special_tokens=False).ids != theirs.encode(text, add_special_tokens=False).ids
        or ours.encode(text).ids != theirs.encode(text).ids
    ]
    assert len(texts) > 2500 and differ == []
    assert ours.num_special_tokens_to_add(False) == theirs.num_special_tokens_to_add(False) == 2
    cut = ours.encode("退货 " * 50, add_special_tokens=False)
    cut.truncate(3)
    assert ours.post_process(cut).ids == [0, *theirs.encode("退货 " * 50, add_special_tokens=False).ids[:3], 2]


def test_export_writes_no_sentencepiece_model_for_a_wordpiece_vocabulary(minilm_onnx: Path) -> None:
    import json

    from services.config.embedder import ONNX_SENTENCEPIECE_MODEL_FILE as SENTENCEPIECE_MODEL_FILE

    assert not (minilm_onnx / SENTENCEPIECE_MODEL_FILE).exists()
    assert json.loads((minilm_onnx / export_onnx.MANIFEST_FILE).read_text())["tokenizer"] == "tokenizers"


def test_a_sentencepiece_model_whose_ids_differ_is_dropped_for_the_tokenizers_pipeline(tmp_path: Path) -> None:
    from services.config.embedder import ONNX_SENTENCEPIECE_FRAME_FILE as SENTENCEPIECE_FRAME_FILE
    from services.config.embedder import ONNX_SENTENCEPIECE_MODEL_FILE as SENTENCEPIECE_MODEL_FILE

    source = REPO_ROOT / "models" / "multilingual-e5-small-onnx" / "tokenizer.json"
    if not source.exists():
        pytest.skip("dev models missing: run `cs-fetch-models --dest models` (scripts/test.sh does)")
    shutil.copy(source, tmp_path / "tokenizer.json")
    assert export_onnx.write_sentencepiece(tmp_path / "tokenizer.json", tmp_path)

    import tokenizers

    pipeline = tokenizers.Tokenizer.from_file(str(source))

    class OffByOne:  # stands in for transformers' tokenizer: every id one higher
        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            return {"input_ids": [i + 1 for i in pipeline.encode(text, add_special_tokens=False).ids]}

    assert export_onnx.keep_sentencepiece_if_equal(tmp_path, OffByOne()) is False
    assert not (tmp_path / SENTENCEPIECE_MODEL_FILE).exists() and not (tmp_path / SENTENCEPIECE_FRAME_FILE).exists()
