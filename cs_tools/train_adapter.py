"""Training a brand LoRA adapter with peft from an alpaca-format JSON file, then registering it.

Records are ``{"instruction", "input", "output"}``. Each becomes the chat the assistant
will see when it answers without knowledge entries: the tenant's persona and grounding
rules as the system message (built by the same :func:`services.chat.grounding.build_messages`
the orchestrator uses), the instruction (plus input) as the user message, and the output
as the assistant reply. Every record is trained in both reply modes of the app: as plain
text, and as the structured reply object under the reply instruction (what the model writes
with ``structured_replies`` on, as in both shipped configs), so the adapter serves either.
Loss is computed on the reply tokens only.

Several datasets are mixed as a brand-identity recipe mixes them: each ``--data`` is
``PATH`` (every record once) or ``PATH:COUNT`` (COUNT records drawn from it: a sample when
it holds more, every record repeated and the rest sampled when it holds fewer), so a few
dozen identity records can weigh as much as hundreds of reviewed answers or general
instruction data. The draw is seeded (``--seed``); every epoch trains on all of them in a
fresh random order.

Usage::

    cs-train-adapter --config serve_config.dev.yaml --tenant lumen \
        --data knowledge_sync/samples/lumen_identity.json:200 --data lumen-reviewed.json \
        --data general-instructions.json:300 --name lumen-voice --version v2
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.adapters.registry import NAME_PATTERN, AdapterRegistry, AdapterVersion
from services.adapters.validation import QWEN2_LORA_MODULES, validate_adapter_folder
from services.chat.grounding import Grounding, build_messages
from services.chat.structured_reply import reply_json, with_reply_instruction
from services.config import AppConfig, TenantConfig
from services.errors import ServiceError

logger = logging.getLogger(__name__)


class AlpacaRecord(BaseModel):
    """One training example."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    instruction: str = Field(min_length=1)
    input: str = ""
    output: str = Field(min_length=1)

    @property
    def question(self) -> str:
        """The user message: the instruction, followed by the input when there is one."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


class TrainingSettings(BaseModel):
    """Hyper-parameters of one run."""

    rank: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    epochs: int = Field(3, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    max_length: int = Field(512, ge=16)
    seed: int = 0


def load_records(path: Path) -> list[AlpacaRecord]:
    """Read and validate an alpaca JSON file (a list of records).

    Raises:
        ValueError: unreadable file or an invalid record, named by its position.

    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON: {err}") from err
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of instruction/input/output records")
    records = []
    for n, item in enumerate(data, start=1):
        try:
            records.append(AlpacaRecord.model_validate(item))
        except ValidationError as err:
            first = err.errors()[0]
            raise ValueError(f"{path}: record {n}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from err
    return records


@dataclass(frozen=True)
class DatasetSpec:
    """One ``--data`` argument: a file, and how many records to draw from it (None: each once)."""

    path: Path
    count: int | None = None

    @classmethod
    def parse(cls, value: str) -> DatasetSpec:
        """``PATH`` or ``PATH:COUNT``.

        Raises:
            ValueError: COUNT is not a positive whole number.

        """
        path, colon, count = value.rpartition(":")
        if not colon or not count.strip().isdigit() or not path:
            return cls(Path(value))
        if int(count) < 1:
            raise ValueError(f"{value}: the record count must be at least 1")
        return cls(Path(path), int(count))


def mix_datasets(specs: list[DatasetSpec], seed: int) -> tuple[list[AlpacaRecord], dict[str, int]]:
    """The training records of several datasets, each drawn to its count; also how many came from each file.

    Raises:
        ValueError: a file is unreadable or holds an invalid record.

    """
    rng = random.Random(seed)
    mixed: list[AlpacaRecord] = []
    drawn: dict[str, int] = {}
    for spec in specs:
        records = load_records(spec.path)
        if spec.count is None:
            chosen = list(records)
        else:
            repeats, rest = divmod(spec.count, len(records))
            chosen = records * repeats + rng.sample(records, rest)
        mixed += chosen
        drawn[str(spec.path)] = drawn.get(str(spec.path), 0) + len(chosen)
    # Kept in file order: training draws a fresh permutation of all examples every epoch.
    return mixed, drawn


#: The model's confidence written into the structured training replies: trained answers are certain.
TRAINED_CONFIDENCE = 1.0


def chat_prompt(persona: str, question: str, *, structured: bool = False) -> list[dict[str, str]]:
    """The messages the assistant sees for ``question`` when no knowledge entry applies."""
    messages = build_messages(persona, Grounding(chunks=[], confidence=0.0), [], question)
    return [m.model_dump() for m in (with_reply_instruction(messages) if structured else messages)]


def train_adapter(
    base_model: str, persona: str, records: list[AlpacaRecord], out_dir: Path, settings: TrainingSettings
) -> list[float]:
    """Train a LoRA adapter on ``records`` and save it as a PEFT folder in ``out_dir``.

    Returns:
        The mean loss of each epoch.

    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = sorted(QWEN2_LORA_MODULES & present)
    peft_model = get_peft_model(
        model, LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=targets)
    )

    examples = [
        _encode(tokenizer, persona, r, settings.max_length, structured=structured)
        for r in records
        for structured in (False, True)
    ]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=settings.learning_rate)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses = []
    peft_model.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(len(examples)).tolist()
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            batch = [examples[i] for i in order[start : start + settings.batch_size]]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
            loss = peft_model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item() * len(batch)
        losses.append(total / len(examples))
        logger.info("epoch %d/%d: loss %.4f", epoch + 1, settings.epochs, losses[-1])
    peft_model.save_pretrained(str(out_dir))
    return losses


def _encode(
    tokenizer: Any, persona: str, record: AlpacaRecord, max_length: int, *, structured: bool
) -> tuple[list[int], list[int]]:
    prompt: Any = tokenizer.apply_chat_template(
        chat_prompt(persona, record.question, structured=structured), tokenize=True, add_generation_prompt=True
    )
    prompt_ids = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    reply = reply_json(record.output, TRAINED_CONFIDENCE) if structured else record.output
    # The reply ends with the end-of-turn token, so the adapter learns to stop.
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + reply_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + reply_ids)[:max_length]
    return ids, labels


def _stored_tenant(config: AppConfig, tenant: str) -> TenantConfig | None:
    """A tenant created at runtime: its profile from the app's control-plane store, if it has one."""
    from services.config import ServiceSettings
    from services.control_plane.store import ControlPlaneStore

    store_config = config.orchestrator.control_plane
    if store_config is None:
        return None
    store = ControlPlaneStore(ServiceSettings().store_url(store_config.url), store_config.store_timeout_s)
    try:
        return store.tenant(tenant)
    except ServiceError:
        return None
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    """Train, save under the adapter store as ``<name>/<version>``, validate and register."""
    from services.config import ServiceSettings, load_app_config

    parser = argparse.ArgumentParser(prog="cs-train-adapter", description="Train and register a brand LoRA adapter.")
    parser.add_argument("--config", type=Path, required=True, help="Serve config of the app (base model, store).")
    parser.add_argument("--tenant", required=True, help="Tenant whose persona frames the training chats.")
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="PATH[:COUNT]",
        help="Alpaca JSON (instruction/input/output records); repeat to mix datasets, COUNT records drawn from each.",
    )
    parser.add_argument("--name", required=True, help="Adapter name.")
    parser.add_argument("--version", required=True, help="Version to create (a new folder).")
    for field, info in TrainingSettings.model_fields.items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(info.default), default=info.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for value, what in ((args.name, "--name"), (args.version, "--version")):
        if not re.fullmatch(NAME_PATTERN, value):
            parser.error(f"{what} {value!r}: use letters, digits, '.', '_' and '-' (max 64)")
    config = load_app_config(args.config).resolve_paths(ServiceSettings().config_base_dir or Path.cwd())
    tenant = next((t for t in config.orchestrator.tenants if t.tenant == args.tenant), None)
    if tenant is None:
        tenant = _stored_tenant(config, args.tenant)
    if tenant is None:
        parser.error(f"--tenant {args.tenant!r} is neither in {args.config} nor in its control-plane store")
    if not config.llm.adapters_dir:
        parser.error(f"{args.config}: llm.adapters_dir is not set")
    settings = TrainingSettings(**{f: getattr(args, f) for f in TrainingSettings.model_fields})
    if settings.rank > config.llm.max_lora_rank:
        parser.error(f"--rank {settings.rank} exceeds the engine's max_lora_rank {config.llm.max_lora_rank}")
    registry = AdapterRegistry(Path(config.llm.adapters_dir))
    out_dir = registry.version_path(args.name, args.version)
    if out_dir.exists():
        parser.error(f"{out_dir} exists already: pick a new --version")
    try:
        records, drawn = mix_datasets([DatasetSpec.parse(d) for d in args.data], settings.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    logger.info("training records: %s", ", ".join(f"{n} from {path}" for path, n in drawn.items()))

    losses = train_adapter(config.llm.model, tenant.persona, records, out_dir, settings)
    try:
        spec = validate_adapter_folder(out_dir, engine_model=config.llm.model, max_rank=config.llm.max_lora_rank)
        registry.register(AdapterVersion.validated(args.name, args.version, spec))
    except ServiceError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 3
    sources = ", ".join(f"{n} from {Path(path).name}" for path, n in drawn.items())
    print(
        f"trained {args.name}@{args.version} on {len(records)} records ({sources}; "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}); "
        f"registered in {registry.store}. Activate it with the admin API: "
        f"PUT /admin/tenants/{args.tenant}/adapter {{'adapter': '{args.name}', 'version': '{args.version}'}}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
