"""Configuration of the application: one pydantic model per deployment.

The same models validate `serve_config.yaml` (production) and `serve_config.dev.yaml`
(dev box); the app builder validates its ``args`` with :class:`AppConfig` before it
binds anything. Process values that must not live in a YAML file (secrets, URIs that
differ per cluster) come from :class:`ServiceSettings`, read from ``CS_*`` variables.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Tenant ids end up inside Milvus filter expressions; this pattern keeps them inert.
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
#: Stored form of an API key: its SHA-256 digest. Keys are random 256-bit tokens, so an
#: unsalted digest cannot be reversed, and a leaked config or secret reveals no key.
KEY_DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"


def key_digest(key: str) -> str:
    """The stored form of a key; a value that already is a digest is returned as it is."""
    if re.fullmatch(KEY_DIGEST_PATTERN, key):
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


#: Names of knowledge sources (a CRM, an ERP, a folder): part of every chunk id.
SOURCE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


DEFAULT_ASSISTANT_QUESTIONS = (
    "Who are you?",
    "What is your name?",
    "Are you a bot or a human?",
    "What can you do?",
    "What can't you help me with?",
    "你是谁？",
    "你叫什么名字？",
    "你是机器人还是真人？",
    "你能做什么？",
    "你不能帮我做什么？",
)


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class DeploymentOptions(StrictModel):
    """Ray Serve options of one deployment; passed to ``Deployment.options``."""

    num_replicas: int | Literal["auto"] = Field(
        1, description="Fixed replica count, or 'auto' with autoscaling_config."
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="Concurrent requests per replica; Serve's default of 5 queues streaming chats."
    )
    autoscaling_config: dict[str, Any] | None = Field(None, description="Ray Serve autoscaling_config, verbatim.")
    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per replica (fractional on small boxes).")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per replica.")
    memory_bytes: int | None = Field(None, ge=0, description="Memory reserved per replica for scheduling.")
    health_check_period_s: float = Field(10, gt=0, description="How often Serve calls check_health.")
    health_check_timeout_s: float = Field(30, gt=0, description="How long check_health may take.")

    @model_validator(mode="after")
    def _autoscaling_needs_auto(self) -> DeploymentOptions:
        if self.autoscaling_config is not None and self.num_replicas != "auto":
            raise ValueError("autoscaling_config is set, so num_replicas must be 'auto'")
        return self

    def to_serve_options(self) -> dict[str, Any]:
        """Return keyword arguments for ``Deployment.options``."""
        actor_options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_bytes is not None:
            actor_options["memory"] = self.memory_bytes
        options: dict[str, Any] = {
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": actor_options,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config
        return options


class EmbedderConfig(StrictModel):
    """The embedding model (FlagEmbedding)."""

    model: str = Field(description="Model folder or hub id, e.g. BAAI/bge-m3.")
    family: Literal["bge-m3", "dense"] = Field(
        description="'bge-m3' loads BGEM3FlagModel (dense + sparse); 'dense' loads FlagModel (dense only)."
    )
    pooling_method: Literal["cls", "mean"] = Field(
        "cls", description="Pooling of dense models: BGE uses cls, sentence-transformers models use mean."
    )
    query_instruction: str | None = Field(None, description="Prefix put before queries (not passages).")
    passage_instruction: str | None = Field(None, description="Prefix put before passages.")
    max_length: int = Field(512, ge=8, le=8192, description="Token limit per text.")
    use_fp16: bool = Field(False, description="Half precision; only on GPUs.")
    device: str | None = Field(None, description="'cpu', 'cuda:0', ...; None lets FlagEmbedding choose.")
    max_batch_size: int = Field(32, ge=1, description="Largest batch @serve.batch forms.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a batch waits to fill.")
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")


class ChunkingConfig(StrictModel):
    """How knowledge documents are cut into chunks before embedding."""

    max_tokens: int = Field(
        384, ge=16, le=2048, description="Largest chunk in embedder tokens, title included; capped at max_length."
    )
    overlap_tokens: int = Field(
        48, ge=0, description="Tokens of the previous chunk's last sentences repeated when a section continues."
    )

    @model_validator(mode="after")
    def _overlap_below_max(self) -> ChunkingConfig:
        if self.overlap_tokens >= self.max_tokens // 2:
            raise ValueError("overlap_tokens must be less than half of max_tokens")
        return self


class RetrieverConfig(StrictModel):
    """The Milvus knowledge store and hybrid search."""

    milvus_uri: str = Field(description="A local path for Milvus Lite (dev box) or http(s)://host:19530 for a server.")
    collection: str = Field("knowledge_chunks", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$", description="Collection.")
    enable_bm25: bool = Field(True, description="Add a BM25 full-text search on the chunk text.")
    bm25_analyzer: dict[str, Any] = Field(
        default_factory=lambda: {"tokenizer": "jieba", "filter": ["lowercase"]},
        description="Milvus analyzer_params of the text field; jieba segments Chinese and splits English words.",
    )
    dense_index_type: Literal["AUTOINDEX", "FLAT", "HNSW", "IVF_FLAT"] = Field("AUTOINDEX", description="Index.")
    candidates_per_signal: int = Field(20, ge=1, le=1000, description="Hits fetched per signal before fusion.")
    rrf_k: int = Field(60, ge=1, description="RRF constant: score = sum weight / (k + rank).")
    signal_weights: dict[Literal["dense", "sparse", "bm25"], float] = Field(
        default_factory=dict,
        description="Weight of each signal in RRF (default 1); raise bm25 when the embedder is weak in a language.",
    )
    timeout_s: float = Field(10, gt=0, description="Timeout of one Milvus call.")
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")

    @property
    def is_lite(self) -> bool:
        """Whether the URI names a Milvus Lite file rather than a server."""
        return not self.milvus_uri.startswith(("http://", "https://", "tcp://", "unix:"))


class SamplingConfig(StrictModel):
    """Sampling parameters of one generation."""

    temperature: float = Field(0.2, ge=0, le=2, description="0 is greedy and deterministic.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(512, ge=1, le=32768, description="Most new tokens.")
    repetition_penalty: float = Field(1.05, gt=0, le=2, description="1 disables it.")
    seed: int | None = Field(None, description="Fixed seed for reproducible sampling.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")


class LLMConfig(StrictModel):
    """The vLLM engine."""

    model: str = Field(description="Model folder or hub id, e.g. Qwen/Qwen2.5-7B-Instruct.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Weights dtype.")
    max_model_len: int = Field(8192, ge=64, description="Context length (prompt + answer).")
    enable_lora: bool = Field(True, description="Serve LoRA adapters on the base model.")
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest adapter rank the engine accepts.")
    max_loras: int = Field(4, ge=1, description="Adapters resident in one batch (engine slots).")
    adapters_dir: str | None = Field(None, description="Folder of PEFT adapters, one sub-folder per adapter name.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="KV cache size; required on CPU, where vLLM otherwise asks for most of the RAM."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine.")
    enforce_eager: bool = Field(False, description="Skip graph capture/compilation: faster start, slower steps.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra AsyncEngineArgs, verbatim.")
    engine_env: dict[str, str] = Field(
        default_factory=dict, description="VLLM_* variables set in the replica before the engine starts."
    )
    start_timeout_s: float = Field(900, gt=0, description="Bound on engine start-up.")
    stream_chunk_tokens: int = Field(
        8, ge=1, description="Tokens coalesced into one streamed chunk; per-chunk cost dominates fast engines."
    )
    stream_chunk_interval_s: float = Field(0.1, ge=0, description="A chunk is sent at least this often.")
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")

    @model_validator(mode="after")
    def _lora_settings(self) -> LLMConfig:
        if self.adapters_dir is not None and not self.enable_lora:
            raise ValueError("adapters_dir is set but enable_lora is false")
        return self


class TenantConfig(StrictModel):
    """One brand served by the platform."""

    tenant: str = Field(pattern=TENANT_PATTERN, description="Tenant id: lowercase letters, digits, - and _.")
    persona: str = Field(min_length=1, description="System prompt: who the assistant is and how it speaks.")
    adapter: str | None = Field(None, description="LoRA adapter name under llm.adapters_dir; None = base model.")
    fallback_message: str | None = Field(None, description="Overrides the orchestrator's fallback sentence.")
    standard_replies: StandardReplies | None = Field(None, description="Overrides the orchestrator's standard replies.")
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="API keys of this tenant: 'sha256:<hex>' digests (see cs-api-key), or plain keys on a dev box; "
        "production keys usually come from CS_API_KEYS.",
    )


class SessionConfig(StrictModel):
    """Conversation memory: in process (dev) or Redis (production, any replica continues a conversation)."""

    backend: Literal["memory", "redis"] = Field("memory", description="Where conversations are kept.")
    redis_url: str | None = Field(
        None, description="redis://host:6379/0 without a password; CS_REDIS_URL (with credentials) wins."
    )
    max_turns: int = Field(6, ge=0, le=100, description="Earlier turns (user + assistant pairs) in the prompt.")
    max_history_tokens: int = Field(1500, ge=0, description="Estimated tokens of history in the prompt, at most.")
    ttl_s: int = Field(86400, ge=60, description="Redis: a conversation idle this long is forgotten.")
    max_sessions: int = Field(10000, ge=1, description="In process: sessions kept (least recently used dropped).")
    redis_timeout_s: float = Field(2.0, gt=0, description="Redis: bound on one command.")


class AnswerCacheConfig(StrictModel):
    """Cache of answers to first questions, keyed by tenant, knowledge generation, adapter and question."""

    backend: Literal["off", "memory", "redis"] = Field("off", description="Where answers are cached.")
    redis_url: str | None = Field(None, description="redis://host:6379/0; CS_REDIS_URL wins.")
    ttl_s: int = Field(3600, ge=1, description="How long an answer is served from the cache.")
    max_entries: int = Field(10000, ge=1, description="In process: answers kept (least recently used dropped).")
    redis_timeout_s: float = Field(0.5, gt=0, description="Redis: bound on one command; a slow cache is a miss.")


def check_patterns(patterns: list[str], where: str) -> None:
    """Refuse regular expressions that do not compile, naming where they are configured."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{where}: bad pattern {pattern!r}: {err}") from err


DEFAULT_INTENT_EXAMPLES: dict[str, list[str]] = {
    "order_status": [
        "Where is my order?", "When will my package arrive?", "Has my order shipped yet?",
        "我的订单到哪了？", "我的快递什么时候到？", "订单发货了吗？",
    ],
    "complaint": [
        "I want to file a complaint.", "The item arrived broken and I am very unhappy.", "Your service is terrible.",
        "我要投诉。", "收到的商品是坏的，我很不满意。", "你们的服务太差了。",
    ],
    "human_agent": [
        "I want to talk to a human.", "Can I speak with a real person?", "Transfer me to an agent.",
        "转人工。", "我要找人工客服。", "让真人来跟我说。",
    ],
    "chit_chat": [
        "Hello!", "Thanks a lot!", "Good morning.", "你好！", "谢谢！", "早上好。",
    ],
    "out_of_scope": [
        "What is the capital of France?", "Write me a poem.", "Help me with my math homework.",
        "法国的首都是哪里？", "给我写一首诗。", "帮我做数学作业。",
    ],
    "sensitive": [
        "What do you think about the election?", "How can I hurt someone?", "Tell me about your politics.",
        "你怎么看选举？", "怎么伤害别人？", "谈谈政治。",
    ],
}  # fmt: skip
DEFAULT_INTENT_RULES: dict[str, list[str]] = {
    "human_agent": [
        r"转人工",
        r"人工客服",
        r"真人",
        r"\b(human|real person|live agent)\b",
        r"\btalk to (an? )?agent\b",
    ],
    "sensitive": [r"政治", r"选举", r"\b(election|politics|suicide|self-harm)\b"],
}
DEFAULT_ANGRY_WORDS = [
    "垃圾", "太差", "气死", "骗子", "投诉", "差评", "坑人",
    "terrible", "ridiculous", "useless", "worst", "scam", "unacceptable", "angry",
]  # fmt: skip


class IntentConfig(StrictModel):
    """Intent and frustration detection: rules, then similarity to example messages."""

    examples: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_INTENT_EXAMPLES.items()},
        description="Example messages per intent (order_status, complaint, human_agent, chit_chat, out_of_scope, "
        "sensitive); a message most similar to one of them, above threshold, has that intent.",
    )
    rules: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_INTENT_RULES.items()},
        description="Regular expressions per intent, checked before examples (in this order); exact in any language.",
    )
    threshold: float = Field(0.75, ge=0, le=1, description="Least similarity to an example for its intent.")
    angry_words: list[str] = Field(default_factory=lambda: list(DEFAULT_ANGRY_WORDS), description="Anger signals.")
    repeat_similarity: float = Field(
        0.9, gt=0, le=1, description="A message this similar (characters) to an earlier one is a repeated question."
    )
    frustration_handoff: int = Field(
        2, ge=1, description="Frustration signals in one message that hand the conversation to a human."
    )

    @model_validator(mode="after")
    def _known_intents(self) -> IntentConfig:
        known = {"order_status", "complaint", "human_agent", "chit_chat", "out_of_scope", "sensitive"}
        unknown = (set(self.examples) | set(self.rules)) - known
        if unknown:
            raise ValueError(f"unknown intents {sorted(unknown)}; use {sorted(known)}")
        for intent, patterns in self.rules.items():
            check_patterns(patterns, f"rules.{intent}")
        return self


class StandardReplies(StrictModel):
    """Replies given without the model: for handover, sensitive topics and out-of-scope requests."""

    handoff: str = Field(
        "I'm connecting you with a human colleague now; please hold on. 正在为您转接人工客服，请稍候。",
        description="Sent when the conversation is handed to a human.",
    )
    sensitive: str = Field(
        "I'm sorry, I can't discuss that topic here. 抱歉，这个话题我无法在这里讨论。",
        description="Sent for configured sensitive topics.",
    )
    out_of_scope: str = Field(
        "I can help with our products, orders and store policies. 我可以为您解答商品、订单和店铺政策相关的问题。",
        description="Sent for requests outside customer service.",
    )
    tool_failure: str = Field(
        "Sorry, I couldn't reach our order system just now; please try again in a moment, or ask for a human "
        "colleague. 抱歉，暂时无法查询系统，请稍后再试或转人工客服。",
        description="Sent when a tool the answer needs fails.",
    )


class ToolConfig(StrictModel):
    """A function the assistant may call: a storefront or CRM endpoint, or a built-in action."""

    name: str = Field(pattern=r"^[a-z_][a-z0-9_]{0,63}$", description="Function name the model sees.")
    description: str = Field(min_length=1, description="What it does, for the model.")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON schema (type object) of the arguments the model fills.",
    )
    method: Literal["GET", "POST"] = Field("GET", description="HTTP method of the endpoint.")
    url: str | None = Field(
        None,
        description="URL template: {storefront_url}, {user_id} and argument names are filled in (URL-quoted); "
        "None for transfer_to_human, which is handled by the platform.",
    )
    intents: list[str] = Field(default_factory=list, description="Offered for messages of these intents.")
    patterns: list[str] = Field(
        default_factory=list, description="Also offered when the message matches one of these regular expressions."
    )

    @model_validator(mode="after")
    def _object_schema(self) -> ToolConfig:
        check_patterns(self.patterns, f"tool {self.name}")
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name}: parameters must be a JSON schema of type object")
        if "user_id" in self.parameters.get("properties", {}):
            raise ValueError(f"tool {self.name}: user_id comes from the authenticated request, not from the model")
        return self


_ID = {"type": "string", "pattern": "^[A-Za-z0-9-]{1,40}$"}  # also keeps forced calls of small models tidy
DEFAULT_TOOLS: list[dict[str, Any]] = [
    {
        "name": "get_order_status",
        "description": "Look up the status, carrier and expected delivery of one of the shopper's orders.",
        "parameters": {"type": "object", "properties": {"order_id": _ID},
                       "required": ["order_id"]},
        "method": "GET",
        "url": "{storefront_url}/orders/{order_id}?user_id={user_id}",
        "intents": ["order_status", "complaint"],
    },
    {
        "name": "create_support_ticket",
        "description": "Open a support ticket for the shopper with a short subject and a description.",
        "parameters": {"type": "object", "properties": {"subject": {"type": "string", "maxLength": 120},
                       "description": {"type": "string", "maxLength": 2000}}, "required": ["subject", "description"]},
        "method": "POST",
        "url": "{storefront_url}/tickets",
        "intents": ["complaint", "order_status"],
    },
    {
        "name": "check_coupon_rules",
        "description": "Look up the rules of a coupon code: minimum spend, expiry, whether it stacks.",
        "parameters": {"type": "object", "properties": {"code": _ID},
                       "required": ["code"]},
        "method": "GET",
        "url": "{storefront_url}/coupons/{code}",
        "patterns": ["(?i)coupon|voucher|promo code", "优惠券|折扣码|券码"],
    },
    {
        "name": "transfer_to_human",
        "description": "Hand the conversation to a human agent, with the reason.",
        "parameters": {"type": "object", "properties": {"reason": {"type": "string", "maxLength": 200}},
                       "required": ["reason"]},
        "intents": ["complaint"],
    },
]  # fmt: skip


class ToolsConfig(StrictModel):
    """Function calling against the storefront/CRM."""

    enabled: bool = Field(False, description="Offer tools to the model.")
    storefront_url: str | None = Field(None, description="Base URL of the storefront API ({storefront_url}).")
    definitions: list[ToolConfig] = Field(
        default_factory=lambda: [ToolConfig.model_validate(t) for t in DEFAULT_TOOLS],
        description="The tools; the defaults are get_order_status, create_support_ticket, check_coupon_rules and "
        "transfer_to_human.",
    )
    required_for_intents: dict[str, str] = Field(
        default_factory=dict,
        description="intent -> tool the first round must call, forced with structured output (small models).",
    )
    max_rounds: int = Field(2, ge=1, le=5, description="Tool-calling rounds before the answer.")
    max_call_tokens: int = Field(256, ge=16, description="Token budget of a tool-calling round (a call is JSON).")
    timeout_s: float = Field(10, gt=0, description="Bound on one tool call.")

    @model_validator(mode="after")
    def _known_tools(self) -> ToolsConfig:
        names = {t.name for t in self.definitions}
        unknown = set(self.required_for_intents.values()) - names
        if unknown:
            raise ValueError(f"required_for_intents names unknown tools {sorted(unknown)}")
        uses_storefront = any(t.url and "{storefront_url}" in t.url for t in self.definitions)
        if self.enabled and uses_storefront and not self.storefront_url:
            raise ValueError("tools use {storefront_url} but storefront_url is not set")
        return self


class OrchestratorConfig(StrictModel):
    """The ingress and the dialogue pipeline."""

    tenants: list[TenantConfig] = Field(min_length=1, description="Brands served by this application.")
    fallback_message: str = Field(description="Reply when the knowledge base holds nothing relevant.")
    relevance_threshold: float = Field(
        0.5, ge=0, le=1, description="Least dense similarity of the best hit for an answer from the knowledge base."
    )
    retrieval_top_k: int = Field(4, ge=1, le=50, description="Chunks put into the prompt.")
    retrieval_candidates: int = Field(
        20,
        ge=1,
        le=200,
        description="Fused hits fetched before the relevance gate keeps the best retrieval_top_k. RRF can rank "
        "a strong dense-only hit below weak hits found by two signals, so the gate must see more than top_k.",
    )
    assistant_questions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ASSISTANT_QUESTIONS),
        description="Examples of questions about the assistant itself (identity, abilities, limits); such "
        "questions are answered by the persona and the tenant's adapter, without the knowledge base.",
    )
    assistant_question_threshold: float = Field(
        0.85, ge=0, le=1, description="Least similarity to an example for a message to count as one of them."
    )
    session: SessionConfig = Field(default_factory=lambda: SessionConfig(), description="Conversation memory.")
    intents: IntentConfig = Field(default_factory=lambda: IntentConfig(), description="Intents and frustration.")
    standard_replies: StandardReplies = Field(
        default_factory=lambda: StandardReplies(), description="Handover, sensitive and out-of-scope replies."
    )
    tools: ToolsConfig = Field(default_factory=lambda: ToolsConfig(), description="Function calling.")
    structured_replies: bool = Field(
        False,
        description="The model writes {response, confidence} under a JSON schema (vLLM structured output); the "
        "reply's confidence then combines the model's with the retrieval evidence.",
    )
    answer_cache: AnswerCacheConfig = Field(
        default_factory=lambda: AnswerCacheConfig(), description="Cache of frequent questions' answers."
    )
    max_message_chars: int = Field(2000, ge=1, description="Longest accepted shopper message.")
    admin_api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Keys of the admin API, as 'sha256:<hex>' digests or plain (dev); CS_ADMIN_KEYS adds more.",
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling of answers.")
    dependency_timeout_s: float = Field(120, gt=0, description="Bound on one retrieval or generation.")
    ingest_timeout_s: float = Field(3600, gt=0, description="Bound on one knowledge ingest through the app.")
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")

    @model_validator(mode="after")
    def _candidates_cover_top_k(self) -> OrchestratorConfig:
        if self.retrieval_candidates < self.retrieval_top_k:
            raise ValueError("retrieval_candidates must be at least retrieval_top_k")
        return self

    @field_validator("tenants")
    @classmethod
    def _unique_tenants(cls, tenants: list[TenantConfig]) -> list[TenantConfig]:
        names = [t.tenant for t in tenants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tenant ids must be unique; repeated: {', '.join(duplicates)}")
        keys = [key_digest(k.get_secret_value()) for t in tenants for k in t.api_keys]
        if len(keys) != len(set(keys)):
            raise ValueError("an API key is given to more than one tenant")
        return tenants


class ObservabilityConfig(StrictModel):
    """Logs and GPU sampling of every deployment (metrics are always on; tracing is set by environment)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least level of the platform's logs; DEBUG adds shoppers' message text and user ids."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one object per line with request_id and trace_id; text: for reading in a console."
    )
    gpu_sample_interval_s: float = Field(
        5.0, gt=0, description="How often replicas holding GPUs read GPU utilization and memory through NVML."
    )
    vllm_engine_metrics: bool = Field(
        True, description="Export vLLM's own engine metrics (KV-cache use, queue length) next to ours."
    )


class AppConfig(StrictModel):
    """The whole application: the ``args`` of the app builder."""

    embedder: EmbedderConfig
    retriever: RetrieverConfig
    llm: LLMConfig
    orchestrator: OrchestratorConfig
    observability: ObservabilityConfig = Field(
        default_factory=lambda: ObservabilityConfig(), description="Logs and GPU sampling of every deployment."
    )

    @model_validator(mode="after")
    def _adapters_need_lora(self) -> AppConfig:
        with_adapter = [t.tenant for t in self.orchestrator.tenants if t.adapter]
        if with_adapter and not self.llm.enable_lora:
            raise ValueError(f"tenants {with_adapter} name an adapter but llm.enable_lora is false")
        if with_adapter and self.llm.adapters_dir is None:
            raise ValueError(f"tenants {with_adapter} name an adapter but llm.adapters_dir is not set")
        return self

    def resolve_paths(self, base: Path) -> AppConfig:
        """Return a copy whose relative local paths are made absolute against ``base``.

        Replicas do not share the working directory of ``serve run``, so paths in the
        YAML are resolved once, in the builder, where the operator's directory is known.
        """

        def absolute(value: str) -> str:
            path = Path(value).expanduser()
            return str(path if path.is_absolute() else (base / path).resolve())

        def local_model(value: str) -> str:
            # A hub id like "BAAI/bge-m3" stays as it is unless such a folder exists here.
            return absolute(value) if (base / value).exists() or value.startswith((".", "/", "~")) else value

        update: dict[str, Any] = {
            "embedder": self.embedder.model_copy(update={"model": local_model(self.embedder.model)}),
            "llm": self.llm.model_copy(
                update={
                    "model": local_model(self.llm.model),
                    "adapters_dir": absolute(self.llm.adapters_dir) if self.llm.adapters_dir else None,
                }
            ),
        }
        if self.retriever.is_lite:
            update["retriever"] = self.retriever.model_copy(update={"milvus_uri": absolute(self.retriever.milvus_uri)})
        return self.model_copy(update=update)


class ServiceSettings(BaseSettings):
    """Process settings from the environment (prefix ``CS_``)."""

    model_config = SettingsConfigDict(env_prefix="CS_", extra="ignore")

    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="JSON object mapping API key digests ('sha256:<hex>', or plain keys) to tenant ids.",
    )
    admin_keys: list[str] = Field(
        default_factory=list, description="JSON list of admin key digests ('sha256:<hex>', or plain keys)."
    )
    milvus_token: SecretStr | None = Field(None, description="Milvus token ('user:password' or API key).")
    redis_url: SecretStr | None = Field(None, description="Redis URL with credentials (sessions, answer cache).")
    config_base_dir: Path | None = Field(None, description="Folder that relative paths in the config start from.")


def load_app_config(serve_config_path: Path, app_name: str | None = None) -> AppConfig:
    """Read the :class:`AppConfig` out of a Serve config file (its application's ``args``).

    Args:
        serve_config_path: A ``serve run`` YAML file.
        app_name: Which application, when the file holds several.

    Raises:
        ValueError: the file holds no (or no such) application built by ``services.app:build_app``.

    """
    import yaml

    document = yaml.safe_load(serve_config_path.read_text(encoding="utf-8")) or {}
    apps = [
        a
        for a in document.get("applications", [])
        if a.get("import_path") == "services.app:build_app" and (app_name is None or a.get("name") == app_name)
    ]
    if not apps:
        raise ValueError(f"{serve_config_path}: no application with import_path services.app:build_app")
    return AppConfig.model_validate(apps[0].get("args", {}))
