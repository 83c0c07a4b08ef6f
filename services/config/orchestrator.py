"""Config of the ingress and the dialogue pipeline, and of the tenants it serves."""

from __future__ import annotations

import re

from pydantic import Field, SecretStr, field_validator, model_validator

from services.config.base import TENANT_PATTERN, DeploymentOptions, StrictModel, check_patterns, defaults
from services.config.control_plane import ControlPlaneConfig
from services.config.intents import IntentConfig, StandardReplies
from services.config.llm import SamplingConfig
from services.config.sessions import AnswerCacheConfig, SessionConfig
from services.config.tools import TenantTools, ToolsConfig
from services.security import key_digest


class TenantWidget(StrictModel):
    """The storefront chat widget of one tenant: who may embed it, and how shoppers are vouched for."""

    secret_env: str | None = Field(
        None,
        pattern=r"^[A-Z_][A-Z0-9_]{0,127}$",
        description="Environment variable holding the secret (at least 32 bytes) with which the storefront backend "
        "signs its shoppers' widget tokens (JWT, HS256); unset: no widget for this tenant.",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Origins (scheme://host[:port]) of the pages that may embed the widget; requests from other "
        "origins are refused (403) and get no CORS headers.",
    )
    max_token_ttl_s: int = Field(
        3600, ge=60, le=86400, strict=True, description="Longest lifetime (exp - iat) accepted in a widget token."
    )

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"allowed_origins: {origin!r} is not an origin (scheme://host[:port], no path)")
        return [o.lower() for o in origins]


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
    tools: TenantTools = Field(
        default_factory=TenantTools, description="This tenant's storefront for tools (URL, credentials)."
    )
    ingest_api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Keys that may sync this tenant's knowledge (GET/PUT /admin/knowledge/<tenant>/...) and nothing "
        "else: for a tenant's knowledge-sync job, instead of the platform admin key. Digests or plain (dev).",
    )
    operator_api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Keys of this tenant's operators: its insights, conversation records, reviews and exports, and "
        "chat as its assistant. Digests or plain (dev).",
    )
    relevance_threshold: float | None = Field(
        None, ge=0, le=1, description="Overrides the orchestrator's relevance_threshold for this tenant."
    )
    retention_days: int | None = Field(
        None,
        ge=1,
        le=36_500,
        description="Days this tenant's conversation records are kept; the store's default otherwise.",
    )
    order_id_patterns: list[str] = Field(
        default_factory=list,
        description="Regular expressions of this tenant's order ids, redacted from conversation records.",
    )
    widget: TenantWidget = Field(default_factory=TenantWidget, description="The storefront chat widget.")

    @field_validator("order_id_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        check_patterns(patterns, "order_id_patterns")
        for pattern in patterns:
            try:  # the redactor compiles them ASCII-only ("(?u)" is refused there)
                re.compile(pattern, re.ASCII)
            except (re.error, ValueError) as err:
                raise ValueError(f"order_id_patterns: bad pattern {pattern!r}: {err}") from err
        return patterns


class RerankingConfig(StrictModel):
    """Reranking of the fused hits by the Embedder's cross-encoder (embedder.reranker), before the gate."""

    candidates: int = Field(
        20, ge=1, le=200, description="Best fused hits the cross-encoder scores; the rest are dropped."
    )
    threshold: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Least cross-encoder score (sigmoid, 0..1) of a usable hit. A cross-encoder reads question and "
        "passage together, so its score says whether the passage answers the question, not only whether both "
        "are about the same thing.",
    )


class RequestLimits(StrictModel):
    """Bounds on what one HTTP request may send, enforced before the body is parsed or the key checked."""

    max_body_bytes: int = Field(
        1024**2, ge=1024, description="Largest body of the public API (/v1/*); a larger one is a 413."
    )
    max_admin_body_bytes: int = Field(
        64 * 1024**2, ge=1024, description="Largest body of an admin request (a knowledge source's batch)."
    )
    max_archive_bytes: int = Field(
        2 * 1024**3, ge=1024, description="Largest adapter archive upload (PUT /admin/adapters/.../archive)."
    )
    max_openai_messages: int = Field(
        64, ge=1, description="Most messages of one OpenAI-compatible request (its conversation so far)."
    )


class OrchestratorConfig(StrictModel):
    """The ingress and the dialogue pipeline."""

    tenants: list[TenantConfig] = Field(min_length=1, description="Brands served by this application.")
    fallback_message: str = Field(description="Reply when the knowledge base holds nothing relevant.")
    relevance_threshold: float = Field(
        0.5, ge=0, le=1, description="Least dense similarity of the best hit for an answer from the knowledge base."
    )
    relevance_margin: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Least lead of the best hit's dense similarity over the median of the dense signal's own "
        "candidates (retriever.candidates_per_signal, or retrieval_candidates where that is more) for an answer "
        "from the knowledge base; 0 turns the check off. "
        "For embedders that score all text alike (e5).",
    )
    retrieval_top_k: int = Field(4, ge=1, le=50, description="Chunks put into the prompt.")
    retrieval_candidates: int = Field(
        20,
        ge=1,
        le=200,
        description="Fused hits fetched before the relevance gate keeps the best retrieval_top_k. RRF can rank "
        "a strong dense-only hit below weak hits found by two signals, so the gate must see more than top_k.",
    )
    reranking: RerankingConfig | None = Field(
        None, description="Rerank the fused hits with the cross-encoder before the gate; None: no reranking."
    )
    assistant_questions: list[str] = Field(
        default_factory=lambda: defaults("assistant_questions"),
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
    cite_sources: bool = Field(
        True,
        description="With structured replies, an answer from knowledge entries first cites the entries it rests on; "
        "one that cites none is replaced by the fallback. Off only for a model that cannot cite (a random test model).",
    )
    check_numbers: bool = Field(
        True,
        description="An answer from knowledge entries is released sentence by sentence, each once every number it "
        "states (digits, Chinese numerals, English number words) is found in what the model was shown; at the "
        "first that is not, generation stops and the fallback follows.",
    )
    check_form: bool = Field(
        True,
        description="Before anything is shown, a reply must be an answer: not a bare value, a single word or an "
        "entry's title, and in the shopper's language; one that is not is asked for once more in plain text, then "
        "replaced by the fallback. Off only for a model that writes random text (a test model).",
    )
    answer_cache: AnswerCacheConfig = Field(
        default_factory=lambda: AnswerCacheConfig(), description="Cache of frequent questions' answers."
    )
    max_message_chars: int = Field(2000, ge=1, description="Longest accepted shopper message.")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Bounds on one HTTP request.")
    api_docs: bool = Field(
        True, description="Serve /docs, /redoc and /openapi.json; off in production (they map every route)."
    )
    admin_api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Keys of the admin API, as 'sha256:<hex>' digests or plain (dev); CS_ADMIN_KEYS adds more.",
    )
    control_plane: ControlPlaneConfig | None = Field(
        default_factory=ControlPlaneConfig,
        description="The store of tenants, keys, conversation records and feedback; null: tenants and keys come "
        "from this file only and nothing is recorded.",
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling of answers.")
    dependency_timeout_s: float = Field(
        120, gt=0, description="Bound on one call of another deployment (a retrieval, one generated chunk)."
    )
    request_timeout_s: float = Field(
        300,
        gt=0,
        description="Bound on a whole chat request, first byte to last; past it the generation is stopped and the "
        "request ends with a 504 (or, when streaming, an error event).",
    )
    ingest_timeout_s: float = Field(3600, gt=0, description="Bound on one knowledge ingest through the app.")
    health_probe_interval_s: float = Field(
        5, gt=0, description="How often each orchestrator replica probes the deployments for /healthz."
    )
    health_probe_timeout_s: float = Field(
        3, gt=0, description="How long one deployment's health check may take before it counts as down."
    )
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")

    @model_validator(mode="after")
    def _every_tenant_has_a_storefront(self) -> OrchestratorConfig:
        if not (self.tools.enabled and self.tools.uses_storefront) or self.tools.storefront_url:
            return self
        missing = [t.tenant for t in self.tenants if t.tools.enabled and not t.tools.storefront_url]
        if missing:
            raise ValueError(
                f"tools use {{storefront_url}} but neither tools.storefront_url nor tenants' tools.storefront_url "
                f"is set for {', '.join(missing)}"
            )
        return self

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
