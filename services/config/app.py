"""The whole application's config: the ``args`` of the app builder, and reading it from a Serve config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from services.config.base import StrictModel
from services.config.embedder import EmbedderConfig
from services.config.llm import LLMConfig
from services.config.observability import ObservabilityConfig
from services.config.orchestrator import OrchestratorConfig
from services.config.retriever import RetrieverConfig


class AppConfig(StrictModel):
    """The whole application: the ``args`` of the app builder."""

    embedder: EmbedderConfig = Field(description="The Embedder deployment: the embedding model.")
    retriever: RetrieverConfig = Field(description="The Retriever deployment: Milvus and hybrid search.")
    llm: LLMConfig = Field(description="The LLM deployment: the vLLM engine and its adapters.")
    orchestrator: OrchestratorConfig = Field(description="The ingress: tenants, dialogue, tools, sessions.")
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

    @model_validator(mode="after")
    def _reranking_needs_reranker(self) -> AppConfig:
        if self.orchestrator.reranking is not None and self.embedder.reranker is None:
            raise ValueError("orchestrator.reranking is set but embedder.reranker names no cross-encoder")
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

        reranker = self.embedder.reranker
        if reranker is not None:
            reranker = reranker.model_copy(update={"model": local_model(reranker.model)})
        update: dict[str, Any] = {
            "embedder": self.embedder.model_copy(
                update={"model": local_model(self.embedder.model), "reranker": reranker}
            ),
            "llm": self.llm.model_copy(
                update={
                    "model": local_model(self.llm.model),
                    "adapters_dir": absolute(self.llm.adapters_dir) if self.llm.adapters_dir else None,
                }
            ),
        }
        store = self.orchestrator.control_plane
        if store is not None and store.url.startswith("sqlite:///") and store.url != "sqlite:///:memory:":
            path = store.url.removeprefix("sqlite:///")
            update["orchestrator"] = self.orchestrator.model_copy(
                update={"control_plane": store.model_copy(update={"url": f"sqlite:///{absolute(path)}"})}
            )
        if self.retriever.is_lite:
            update["retriever"] = self.retriever.model_copy(update={"milvus_uri": absolute(self.retriever.milvus_uri)})
        return self.model_copy(update=update)


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
