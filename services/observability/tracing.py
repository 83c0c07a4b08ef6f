"""OpenTelemetry tracing: one trace per chat request across the four deployments.

Ray Serve carries the trace context itself: its proxy reads an incoming ``traceparent``
header, every handle call passes the caller's current context in the request metadata,
and each replica opens a span for the call it serves. Our spans (pipeline stages, tool
calls, the engine's generation) are made with the global tracer and so nest under
Serve's. Serve installs the tracer provider in each proxy and replica when tracing is on;
otherwise the global provider is OpenTelemetry's no-op one and every span here costs
next to nothing.

Turn tracing on with environment variables in every Ray process (the pod spec in
Kubernetes, the shell of ``serve run`` on a dev box)::

    RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH=services.observability.tracing:otlp_span_processors
    RAY_SERVE_TRACING_SAMPLING_RATIO=0.1
    OTEL_EXPORTER_OTLP_ENDPOINT=http://otel-collector:4318
    OTEL_SERVICE_NAME=cs-platform
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING

from opentelemetry import propagate, trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor

TRACER_NAME = "cs-platform"


def tracer() -> trace.Tracer:
    """The platform's tracer (a proxy until a provider is installed, so safe at import time)."""
    return trace.get_tracer(TRACER_NAME)


def otlp_span_processors() -> list[SpanProcessor]:
    """Span processors for Ray Serve's tracing hook: batched OTLP/HTTP export.

    The exporter reads the standard ``OTEL_EXPORTER_OTLP_*`` variables (endpoint,
    headers, timeout, compression); the batch processor the ``OTEL_BSP_*`` ones.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return [BatchSpanProcessor(OTLPSpanExporter())]


def inject_headers(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Add the current trace context (W3C ``traceparent``) to outgoing HTTP headers."""
    propagate.inject(headers)
    return headers


def current_trace_id() -> str | None:
    """The current trace id as 32 hex digits, or None outside a recorded trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
