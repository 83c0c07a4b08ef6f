"""Function calling: which tools the model sees, and running the calls it makes.

Tools are declared in config (name, description, JSON-schema parameters, HTTP method and
URL template). The shopper's identity is never the model's to choose: ``user_id`` is not
in any schema the model sees, arguments the model adds beyond the schema are dropped, and
the URL and body get the authenticated request's ``user_id``. Arguments are validated
against the schema before anything is called. A failing tool gives the model (and the
reply's actions) a clear error instead of an exception.

Each tenant calls its own storefront (``tenants[].tools``, else the shared
``tools.storefront_url``), with its own credentials, and every call names the tenant
(``X-CS-Tenant``), so a storefront serving several brands scopes the lookup to the brand
whose key made the request. A call that changes something carries an ``Idempotency-Key``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema

from services.config import TenantConfig, ToolConfig, ToolsConfig
from services.observability.metrics import Metrics
from services.observability.tracing import inject_headers, tracer
from services.schemas import ToolCall

logger = logging.getLogger(__name__)

TRANSFER_TO_HUMAN = "transfer_to_human"


@dataclass(frozen=True)
class ToolResult:
    """What a call gave: the content the model reads, the action the reply reports, success."""

    content: str
    action: dict[str, Any]
    ok: bool


def function_spec(tool: ToolConfig) -> dict[str, Any]:
    """The OpenAI-style function spec the chat template renders."""
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
    }


def forced_call_schema(tool: ToolConfig) -> dict[str, Any]:
    """JSON schema of exactly one call of ``tool``: for structured output when a call is required."""
    arguments = dict(tool.parameters) | {"additionalProperties": False}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


class ToolRunner:
    """Offers tools per intent and runs calls against the storefront over HTTP."""

    def __init__(
        self,
        config: ToolsConfig,
        tenants: list[TenantConfig] | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """Tools of ``config`` for ``tenants``.

        Raises:
            ValueError: a tenant's ``credentials_env`` names an unset environment variable.

        """
        self._config = config
        self._tools = {t.name: t for t in config.definitions}
        self._storefronts = {t.tenant: _storefront(config, t) for t in tenants or []}
        self._profiles = {t.tenant: t.tools for t in tenants or []}
        self._client = httpx.AsyncClient(timeout=config.timeout_s, transport=transport)
        self._metrics = metrics or Metrics()

    def know(self, tenant: TenantConfig) -> None:
        """Serve a tenant as its profile is now: one created, or whose storefront changed, at runtime.

        A profile whose ``credentials_env`` is unset in this process gets no tools (logged),
        rather than calls without credentials.
        """
        if self._profiles.get(tenant.tenant) == tenant.tools:
            return
        try:
            storefront = _storefront(self._config, tenant)
        except ValueError as err:
            logger.warning("%s: this tenant's assistant calls no tool", err)
            storefront = _Storefront(False, "", {})
        self._storefronts[tenant.tenant] = storefront
        self._profiles[tenant.tenant] = tenant.tools

    def offered(self, intent: str | None, message: str, tenant: str | None = None) -> list[ToolConfig]:
        """Tools offered for a tenant's message: by its intent or by a pattern it matches.

        Only relevant tools reach the prompt: tool specs there distract small models from
        answering policy questions (seen with the 0.5B dev model).
        """
        storefront = self._storefronts.get(tenant or "")
        if not self._config.enabled or (storefront is not None and not storefront.enabled):
            return []
        return [
            t
            for t in self._config.definitions
            if (intent is not None and intent in t.intents) or any(re.search(p, message) for p in t.patterns)
        ]

    def required(self, intent: str | None) -> ToolConfig | None:
        """The tool the first round must call for this intent, if configured."""
        name = self._config.required_for_intents.get(intent or "")
        return self._tools.get(name) if name and self._config.enabled else None

    def changes_something(self, call: ToolCall) -> bool:
        """Whether this call would change state in the storefront (at most one per message)."""
        tool = self._tools.get(call.name)
        return tool is not None and tool.changes_something

    async def run(
        self, call: ToolCall, user_id: str, tenant: str | None = None, idempotency_key: str | None = None
    ) -> ToolResult:
        """Validate and execute one call for the authenticated shopper of a tenant (a span and a latency sample each).

        Args:
            call: The model's call.
            user_id: The authenticated shopper.
            tenant: Whose storefront is called (and named in ``X-CS-Tenant``).
            idempotency_key: Sent as ``Idempotency-Key`` with calls that change something.

        """
        # A name the model made up must not become a label value: one "unknown" bucket.
        name = call.name if call.name in self._tools else "unknown"
        with tracer().start_as_current_span("cs.tool_call", attributes={"tool": name}) as span:
            started = time.monotonic()
            result = await self._run(call, user_id, tenant, idempotency_key)
            outcome = "ok" if result.ok else "failed"
            span.set_attributes({"outcome": outcome, "action": str(result.action.get("type"))})
            tags = {"tool": name, "outcome": outcome}
            self._metrics.observe("cs_tool_call_seconds", time.monotonic() - started, tags)
            return result

    async def _run(self, call: ToolCall, user_id: str, tenant: str | None, idempotency_key: str | None) -> ToolResult:
        tool = self._tools.get(call.name)
        if tool is None:
            return ToolResult(
                json.dumps({"error": f"unknown tool {call.name}"}), self._failed(call.name, "unknown"), False
            )
        # Only what the schema declares: a model (or a prompt injection) cannot add user_id.
        declared = tool.parameters.get("properties", {})
        arguments = {k: v for k, v in call.arguments.items() if k in declared}
        try:
            jsonschema.validate(arguments, tool.parameters)
        except jsonschema.ValidationError as err:
            message = f"invalid arguments: {err.message}"
            return ToolResult(json.dumps({"error": message}), self._failed(tool.name, message), False)
        if tool.name == TRANSFER_TO_HUMAN or tool.url is None:
            reason = str(arguments.get("reason", "requested by the assistant"))
            return ToolResult(json.dumps({"status": "transferred"}), {"type": "handoff", "reason": reason}, True)
        return await self._http(tool, arguments, user_id, tenant, idempotency_key)

    async def _http(
        self,
        tool: ToolConfig,
        arguments: dict[str, Any],
        user_id: str,
        tenant: str | None,
        idempotency_key: str | None,
    ) -> ToolResult:
        assert tool.url is not None
        storefront = self._storefronts.get(tenant or "") or _storefront(self._config, None)
        fill = {k: quote(str(v), safe="") for k, v in arguments.items()}
        url = tool.url.format_map(fill | {"user_id": quote(user_id, safe=""), "storefront_url": storefront.url})
        # The storefront continues the trace if it speaks W3C trace context.
        headers = dict(inject_headers({})) | storefront.headers
        if tool.changes_something and idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        try:
            if tool.method == "GET":
                reply = await self._client.get(url, headers=headers)
            else:
                reply = await self._client.post(url, json=arguments | {"user_id": user_id}, headers=headers)
        except httpx.HTTPError as err:
            # The error's text can carry the URL, and the URL the shopper's id: name the type only.
            logger.warning("tool %s failed: %s", tool.name, type(err).__name__)
            message = f"{tool.name} is unreachable: {type(err).__name__}"
            return ToolResult(json.dumps({"error": message}), self._failed(tool.name, message), False)
        try:
            body = reply.json()
        except ValueError:
            body = {"text": reply.text[:500]}
        if reply.status_code == 404:
            # Not found (or not this shopper's): a normal answer, the model tells the shopper.
            return ToolResult(json.dumps({"error": "not found"} | _dict(body)), self._done(tool, arguments, {}), True)
        if reply.status_code >= 400:
            message = f"{tool.name} answered {reply.status_code}"
            return ToolResult(json.dumps({"error": message}), self._failed(tool.name, message), False)
        return ToolResult(json.dumps(body, ensure_ascii=False), self._done(tool, arguments, _dict(body)), True)

    @staticmethod
    def _done(tool: ToolConfig, arguments: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        if tool.name == "create_support_ticket":
            return {"type": "ticket_created", "ticket_id": body.get("ticket_id")}
        if tool.name == "get_order_status":
            return {"type": "order_status", "order_id": arguments.get("order_id"), "status": body.get("status")}
        return {"type": "tool_call", "tool": tool.name, "arguments": arguments}

    @staticmethod
    def _failed(name: str, message: str) -> dict[str, Any]:
        return {"type": "tool_failed", "tool": name, "message": message}

    async def close(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


@dataclass(frozen=True)
class _Storefront:
    enabled: bool
    url: str
    headers: dict[str, str]


def _storefront(config: ToolsConfig, tenant: TenantConfig | None) -> _Storefront:
    """Where and how a tenant's tool calls go."""
    if tenant is None:
        return _Storefront(True, (config.storefront_url or "").rstrip("/"), {})
    own = tenant.tools
    headers = {"X-CS-Tenant": tenant.tenant}
    if own.credentials_env:
        token = os.environ.get(own.credentials_env)
        if not token:
            raise ValueError(f"tenant {tenant.tenant}: tools.credentials_env {own.credentials_env} is not set")
        headers["Authorization"] = f"Bearer {token}"
    return _Storefront(own.enabled, (own.storefront_url or config.storefront_url or "").rstrip("/"), headers)


def _dict(body: Any) -> dict[str, Any]:
    return body if isinstance(body, dict) else {"result": body}
