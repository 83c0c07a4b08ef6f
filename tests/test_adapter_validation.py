"""Adapter validation: a real PEFT adapter passes; each kind of broken one is named."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from services.adapters.validation import same_base_model, validate_adapter_folder
from services.errors import InvalidAdapterError


@pytest.fixture()
def adapter(adapters_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "candidate"
    shutil.copytree(adapters_dir / "brand-a", copy)
    return copy


def validate(path: Path, engine_model: str, max_rank: int = 16) -> object:
    return validate_adapter_folder(path, engine_model=engine_model, max_rank=max_rank)


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_a_real_peft_adapter_passes(adapter: Path, tiny_llm_dir: Path) -> None:
    spec = validate_adapter_folder(adapter, engine_model=str(tiny_llm_dir), max_rank=8)
    assert spec.rank == 8
    assert "q_proj" in spec.target_modules


BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing config": (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    "bad json": (lambda p: (p / "adapter_config.json").write_text("{r: 8"), "not valid JSON"),
    "not lora": (lambda p: edit_config(p, peft_type="IA3"), "only LORA adapters"),
    "dora": (lambda p: edit_config(p, use_dora=True), "use_dora is true"),
    "other base": (lambda p: edit_config(p, base_model_name_or_path="Qwen/Qwen2.5-7B-Instruct"), "does not match"),
    "rank too big": (lambda p: edit_config(p, r=64), "exceeds the engine's max_lora_rank 16"),
    "unknown module": (lambda p: edit_config(p, target_modules=["q_proj", "attn.c_attn"]), "['attn.c_attn']"),
    "no weights": (lambda p: (p / "adapter_model.safetensors").unlink(), "no weights file"),
    "corrupt weights": (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 64), "cannot be read"),
    "rank lies": (lambda p: edit_config(p, r=4), "rank 4 was declared"),
    "undeclared module": (lambda p: edit_config(p, target_modules=["q_proj"]), "which target_modules does not list"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_broken_adapter_is_rejected_by_name(adapter: Path, tiny_llm_dir: Path, breakage: str) -> None:
    break_it, message = BREAKAGES[breakage]
    break_it(adapter)
    with pytest.raises(InvalidAdapterError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(adapter, str(tiny_llm_dir))


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapterError, match="does not exist"):
        validate(tmp_path / "nope", "m")


def test_base_model_names_compare_by_last_component() -> None:
    assert same_base_model("Qwen/Qwen2.5-7B-Instruct", "/models/qwen2.5-7b-instruct/")
    assert not same_base_model("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")
    assert not same_base_model("", "anything")
