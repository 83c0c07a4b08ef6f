"""Validation of a PEFT LoRA adapter folder before anything is served from it.

Checks, in order, each failing with a message that names the fault: the folder and
``adapter_config.json`` exist and parse, it is a LoRA adapter, its base model is the
engine's, its rank fits the engine's ``max_lora_rank``, its target modules exist in the
base model, and its weights file opens with LoRA A/B tensors of that rank for those modules.
Loading the weights into the running engine is the final check, done by the LLM deployment.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel

from services.errors import InvalidAdapterError

#: Linear layers LoRA can target in Qwen2 / Llama-style decoders (what vLLM supports there).
QWEN2_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_KEY = re.compile(r"\.(?P<module>[A-Za-z0-9_]+)\.lora_(?P<kind>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


class AdapterSpec(BaseModel):
    """What validation learned about an adapter."""

    rank: int
    target_modules: list[str]
    base_model: str


def same_base_model(adapter_base: str, engine_model: str) -> bool:
    """Whether an adapter trained on ``adapter_base`` fits an engine serving ``engine_model``.

    Hub ids and local folders both occur (an engine may serve a local copy of a hub
    model), so the last path component is compared, case-insensitively.
    """

    def name(value: str) -> str:
        return value.rstrip("/").rsplit("/", 1)[-1].lower()

    return bool(adapter_base) and name(adapter_base) == name(engine_model)


def validate_adapter_folder(
    path: Path, *, engine_model: str, max_rank: int, known_modules: frozenset[str] = QWEN2_LORA_MODULES
) -> AdapterSpec:
    """Validate a PEFT LoRA folder for an engine.

    Args:
        path: The adapter folder.
        engine_model: The engine's base model (hub id or folder).
        max_rank: The engine's ``max_lora_rank``.
        known_modules: Module names of the base model that LoRA may target.

    Raises:
        InvalidAdapterError: the first fault found, named.

    """
    if not path.is_dir():
        raise InvalidAdapterError(f"adapter folder {path.name!r} does not exist")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise InvalidAdapterError("adapter_config.json is missing")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidAdapterError(f"adapter_config.json is not valid JSON: {err}") from err
    except RecursionError as err:  # nested thousands deep: no PEFT config looks like that
        raise InvalidAdapterError("adapter_config.json is nested too deeply") from err
    if not isinstance(config, dict):
        raise InvalidAdapterError("adapter_config.json must hold a JSON object")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InvalidAdapterError(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are served")

    if config.get("use_dora"):
        raise InvalidAdapterError("use_dora is true; vLLM serves plain LoRA only")
    base = str(config.get("base_model_name_or_path") or "")
    if not same_base_model(base, engine_model):
        raise InvalidAdapterError(f"base model {base!r} does not match the engine's {engine_model!r}")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise InvalidAdapterError(f"rank r={rank!r} is not a positive integer")
    if rank > max_rank:
        raise InvalidAdapterError(f"rank r={rank} exceeds the engine's max_lora_rank {max_rank}")
    targets = config.get("target_modules")
    modules = [targets] if isinstance(targets, str) else targets
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise InvalidAdapterError(f"target_modules {targets!r} must be a non-empty list of module names")
    unknown = sorted(set(modules) - known_modules)
    if unknown:
        raise InvalidAdapterError(f"target_modules {unknown} do not exist in the base model")

    _check_weights(path, rank, set(modules))
    return AdapterSpec(rank=rank, target_modules=sorted(modules), base_model=base)


def _check_weights(path: Path, rank: int, modules: set[str]) -> None:
    weights = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise InvalidAdapterError(f"no weights file ({' or '.join(_WEIGHT_FILES)})")
    if weights.suffix != ".safetensors":
        return  # pickled .bin weights are checked by the engine when it loads them
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as tensors:
            shapes = {key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise InvalidAdapterError(f"{weights.name} cannot be read: {err}") from err
    lora = [(key, shape, match) for key, shape in shapes.items() if (match := _LORA_KEY.search(key))]
    if not lora:
        raise InvalidAdapterError(f"{weights.name} holds no LoRA A/B tensors")
    for key, shape, match in lora:
        module, kind = match["module"], match["kind"]
        if module not in modules:
            raise InvalidAdapterError(f"{weights.name} has weights for {module!r}, which target_modules does not list")
        rank_dim = shape[0] if kind == "A" else shape[-1]
        if len(shape) != 2 or rank_dim != rank:
            raise InvalidAdapterError(f"{key} has shape {list(shape)}; rank {rank} was declared")
