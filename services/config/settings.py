"""Process settings from the environment (``CS_*``): secrets and URIs that do not belong in a YAML file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    session_secret: SecretStr | None = Field(
        None,
        description="Key that signs session ids (at least 32 characters); every orchestrator replica must share it "
        "when sessions live in Redis. Unset: a random key per replica, for in-process sessions.",
        min_length=32,
    )
    control_plane_url: SecretStr | None = Field(
        None, description="SQLAlchemy URL of the control-plane store, with credentials; overrides control_plane.url."
    )
    record_secret: SecretStr | None = Field(
        None,
        description="Key of the hash that stands for a shopper's user id in conversation records (at least 32 "
        "characters); CS_SESSION_SECRET when unset. Without either, records hold an unkeyed SHA-256 of the id.",
        min_length=32,
    )

    def store_url(self, configured: str) -> str:
        """The control-plane store's URL: ``CS_CONTROL_PLANE_URL`` (with credentials), else the configured one."""
        return self.control_plane_url.get_secret_value() if self.control_plane_url else configured

    config_base_dir: Path | None = Field(None, description="Folder that relative paths in the config start from.")
