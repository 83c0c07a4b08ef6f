"""The Orchestrator: the Serve ingress deployment, and the wiring of one replica.

A replica builds its dialogue pipeline (clients of the other three deployments, session
memory, answer cache, tools, adapter registry) once, then serves the FastAPI app from
:func:`services.api.factory.create_api` over it. Requests travel down from here:
api -> chat -> the other deployments -> the domain packages.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from services.adapters.admin import AdapterAdmin
from services.adapters.registry import AdapterRegistry
from services.api.factory import create_api
from services.chat.analysis import MessageAnalyzer
from services.chat.answer_cache import open_answer_cache
from services.chat.clients import AdapterResolver, EmbedderClient, LLMClient, RetrieverClient, call_dependency
from services.chat.intents import IntentClassifier
from services.chat.pipeline import ChatPipeline
from services.config import LLMConfig, ObservabilityConfig, OrchestratorConfig, ServiceSettings
from services.control_plane.directory import SeedKeys, TenantDirectory, seed_keys
from services.control_plane.plane import ControlPlane
from services.control_plane.recorder import ConversationRecorder
from services.control_plane.store import ControlPlaneStore
from services.errors import ServiceError
from services.observability.logs import configure_replica_logging
from services.observability.metrics import RayMetrics, names_for
from services.sessions import RedisSessionMemory, SessionIds, open_session_memory
from services.tools import ToolRunner


@serve.ingress()
class Orchestrator:
    """Ray Serve ingress deployment: REST API over the dialogue pipeline."""

    def __init__(
        self,
        config: OrchestratorConfig,
        embedder: DeploymentHandle,
        retriever: DeploymentHandle,
        llm: DeploymentHandle,
        llm_config: LLMConfig,
        observability: ObservabilityConfig | None = None,
    ) -> None:
        observability = observability or ObservabilityConfig()
        configure_replica_logging(observability.log_level, observability.log_format)
        metrics = RayMetrics(names_for("Orchestrator"))
        self._config = config
        settings = ServiceSettings()
        self._adapter_admin: AdapterAdmin | None = None
        resolver: AdapterResolver | None = None
        if llm_config.adapters_dir:
            registry = AdapterRegistry(Path(llm_config.adapters_dir))
            resolver = registry.resolve

            async def load_check(adapter: str) -> None:
                await call_dependency("LLM", lambda: llm.check_adapter.remote(adapter), config.dependency_timeout_s)

            self._adapter_admin = AdapterAdmin(registry, llm_config.model, llm_config.max_lora_rank, load_check)
        self._knowledge = RetrieverClient(
            retriever,
            config.dependency_timeout_s,
            config.ingest_timeout_s,
            metrics,
            generation_cache_s=config.answer_cache.generation_cache_s,
        )
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        self._sessions = open_session_memory(config.session, redis_url)
        if config.session.backend == "redis" and settings.session_secret is None:
            # Each replica would sign with its own random key and refuse the others' session ids.
            raise ValueError("session.backend is redis: set CS_SESSION_SECRET, shared by every orchestrator replica")
        secret = settings.session_secret.get_secret_value().encode() if settings.session_secret else None
        admin_keys = [k.get_secret_value() for k in config.admin_api_keys] + settings.admin_keys
        seed = seed_keys(config.tenants, admin_keys, settings.api_keys)
        self._control_plane = self._open_control_plane(config, settings, metrics, secret, seed)
        self._directory = (
            self._control_plane.directory if self._control_plane else TenantDirectory(config.tenants, seed)
        )
        recorder = None
        if self._control_plane is not None and self._control_plane.config.record_conversations:
            recorder = self._control_plane.recorder
        embedder_client = EmbedderClient(embedder, config.dependency_timeout_s, metrics)
        self._pipeline = ChatPipeline(
            config,
            self._knowledge,
            LLMClient(llm, config.dependency_timeout_s, metrics),
            resolver,
            MessageAnalyzer(
                config.assistant_questions,
                config.assistant_question_threshold,
                embedder_client,
                IntentClassifier(config.intents),
            ),
            self._sessions,
            open_answer_cache(config.answer_cache, redis_url),
            self._knowledge.generation,
            metrics,
            ToolRunner(config.tools, config.tenants, metrics=metrics) if config.tools.enabled else None,
            embedder_client,
            SessionIds(secret),
            recorder,
        )
        self._dependencies: dict[str, DeploymentHandle] = {"embedder": embedder, "retriever": retriever, "llm": llm}

    def __serve_build_asgi_app__(self) -> Any:
        # Serve calls this after __init__: the app is built from this replica's state.
        return create_api(
            self._config,
            self._pipeline,
            self._directory,
            self._check_dependencies,
            adapter_admin=self._adapter_admin,
            knowledge=self._knowledge,
            control_plane=self._control_plane,
            served_by=serve.get_replica_context().replica_id.unique_id,
        )

    def _open_control_plane(
        self,
        config: OrchestratorConfig,
        settings: ServiceSettings,
        metrics: RayMetrics,
        session_secret: bytes | None,
        seed: SeedKeys,
    ) -> ControlPlane | None:
        """Store, directory and recorder; the store is migrated and seeded from the config now, or once it answers."""
        store_config = config.control_plane
        if store_config is None:
            return None
        store = ControlPlaneStore(settings.store_url(store_config.url), store_config.store_timeout_s)

        def setup() -> None:
            store.migrate()
            store.seed(config.tenants, seed)

        directory = TenantDirectory(
            config.tenants,
            seed,
            store,
            refresh_interval_s=store_config.refresh_interval_s,
            metrics=metrics,
            setup=setup,
        )
        directory.load()
        record_secret = settings.record_secret.get_secret_value().encode() if settings.record_secret else session_secret
        recorder = ConversationRecorder(store, store_config, record_secret, metrics)
        return ControlPlane(store, store_config, directory, recorder, self._sessions.forget)

    async def _check_dependencies(self) -> dict[str, str]:
        timeout_s = self._config.health_probe_timeout_s

        async def one(handle: DeploymentHandle) -> str:
            try:
                await call_dependency("health", lambda: handle.check_health.remote(), timeout_s)
                return "ok"
            except ServiceError as err:
                return f"error: {err.message}"

        names = list(self._dependencies)
        results = dict(zip(names, await asyncio.gather(*(one(self._dependencies[n]) for n in names)), strict=True))
        if isinstance(self._sessions, RedisSessionMemory):
            try:
                await self._sessions.ping()
                results["session_memory"] = "ok"
            except ServiceError as err:
                results["session_memory"] = f"error: {err.message}"
        return results


def build_orchestrator(
    config: OrchestratorConfig,
    *,
    embedder: Application,
    retriever: Application,
    llm: Application,
    llm_config: LLMConfig,
    observability: ObservabilityConfig | None = None,
) -> Application:
    """Bind the ingress to the three deployments it calls (``llm_config`` locates the adapter store)."""
    options = config.deployment.to_serve_options(uses_pandas=False)
    deployment = serve.deployment(name="Orchestrator", **options)(Orchestrator)
    return deployment.bind(config, embedder, retriever, llm, llm_config, observability or ObservabilityConfig())
