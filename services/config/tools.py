"""Config of function calling: the tools the assistant may call."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from services.config.base import StrictModel, check_patterns, defaults


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
    side_effect: bool | None = Field(
        None,
        description="The call changes something (opens a ticket): at most one such call per message, sent with an "
        "Idempotency-Key. Default: true for POST, false for GET.",
    )
    intents: list[str] = Field(default_factory=list, description="Offered for messages of these intents.")
    patterns: list[str] = Field(
        default_factory=list, description="Also offered when the message matches one of these regular expressions."
    )

    @property
    def changes_something(self) -> bool:
        """Whether a call of this tool changes state in the storefront (not a lookup)."""
        return self.side_effect if self.side_effect is not None else self.method == "POST"

    @model_validator(mode="after")
    def _object_schema(self) -> ToolConfig:
        check_patterns(self.patterns, f"tool {self.name}")
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name}: parameters must be a JSON schema of type object")
        if "user_id" in self.parameters.get("properties", {}):
            raise ValueError(f"tool {self.name}: user_id comes from the authenticated request, not from the model")
        return self


class TenantTools(StrictModel):
    """A tenant's own storefront: where its tools call and with which credentials."""

    enabled: bool = Field(True, strict=True, description="False: this tenant's assistant calls no tool.")
    storefront_url: str | None = Field(None, description="This tenant's storefront API; the shared one otherwise.")
    credentials_env: str | None = Field(
        None,
        pattern=r"^[A-Z_][A-Z0-9_]{0,127}$",
        description="Name of the environment variable holding the token sent as 'Authorization: Bearer' to this "
        "tenant's storefront (the secret itself never goes into the config).",
    )


class ToolsConfig(StrictModel):
    """Function calling against the storefront/CRM."""

    enabled: bool = Field(False, description="Offer tools to the model.")
    storefront_url: str | None = Field(
        None, description="Base URL of the storefront API ({storefront_url}) of tenants without their own."
    )
    definitions: list[ToolConfig] = Field(
        default_factory=lambda: [ToolConfig.model_validate(t) for t in defaults("tools")],
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
        return self

    @property
    def uses_storefront(self) -> bool:
        """Whether some tool's URL is under ``{storefront_url}``."""
        return any(t.url and "{storefront_url}" in t.url for t in self.definitions)
