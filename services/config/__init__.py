"""Configuration of the application: one pydantic model per component, one module per owner.

The same models validate ``serve_config.yaml`` (production) and ``serve_config.dev.yaml``
(dev box); the app builder validates its ``args`` with :class:`AppConfig` before it binds
anything. Process values that must not live in a YAML file (secrets, URIs that differ per
cluster) come from :class:`ServiceSettings`, read from ``CS_*`` variables. Default texts
(intent examples and rules, standard replies, tools) are data in ``defaults/``.
"""

from services.config.app import AppConfig, load_app_config
from services.config.base import SOURCE_PATTERN, TENANT_PATTERN, DeploymentOptions, StrictModel, check_patterns
from services.config.control_plane import ControlPlaneConfig
from services.config.embedder import EmbedderConfig, RerankerConfig
from services.config.intents import IntentConfig, StandardReplies
from services.config.llm import LLMConfig, SamplingConfig
from services.config.observability import ObservabilityConfig
from services.config.orchestrator import OrchestratorConfig, RequestLimits, RerankingConfig, TenantConfig
from services.config.retriever import ChunkingConfig, RetrieverConfig
from services.config.sessions import AnswerCacheConfig, SessionConfig
from services.config.settings import ServiceSettings
from services.config.tools import ToolConfig, ToolsConfig

__all__ = [
    "SOURCE_PATTERN",
    "TENANT_PATTERN",
    "AnswerCacheConfig",
    "AppConfig",
    "ChunkingConfig",
    "ControlPlaneConfig",
    "DeploymentOptions",
    "EmbedderConfig",
    "IntentConfig",
    "LLMConfig",
    "ObservabilityConfig",
    "OrchestratorConfig",
    "RequestLimits",
    "RerankerConfig",
    "RerankingConfig",
    "RetrieverConfig",
    "SamplingConfig",
    "ServiceSettings",
    "SessionConfig",
    "StandardReplies",
    "StrictModel",
    "TenantConfig",
    "ToolConfig",
    "ToolsConfig",
    "check_patterns",
    "load_app_config",
]
