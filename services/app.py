"""The app builder: ``import_path: services.app:build_app`` in the Serve config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve.deployment import Application

from services.config import AppConfig, ServiceSettings
from services.embedder import build_embedder
from services.ingress import build_orchestrator
from services.llm import build_llm
from services.retriever import build_retriever


def build_app(args: dict[str, Any]) -> Application:
    """Validate the config and compose the four deployments into one application.

    Relative paths in ``args`` (model folders, the Milvus Lite file, adapters) are
    resolved against ``CS_CONFIG_BASE_DIR`` or, unset, the working directory of
    ``serve run``.
    """
    config = AppConfig.model_validate(args)
    base = ServiceSettings().config_base_dir or Path.cwd()
    config = config.resolve_paths(base)
    embedder = build_embedder(config.embedder, config.observability)
    retriever = build_retriever(config.retriever, embedder, config.observability)
    llm = build_llm(config.llm, config.observability)
    return build_orchestrator(
        config.orchestrator,
        embedder=embedder,
        retriever=retriever,
        llm=llm,
        llm_config=config.llm,
        observability=config.observability,
    )
