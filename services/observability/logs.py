"""Structured logs: one JSON object per line, with the request id and the trace id.

Every replica calls :func:`configure_logging` when it starts. The platform's loggers
(``services.*``, ``knowledge_sync.*``) then write JSON lines to the worker's standard
error, which Ray keeps in ``worker-*.err`` under its session log folder and forwards to
the ``serve run`` console. Each line carries ``request_id`` (Serve's id of the HTTP request,
also sent back as ``X-Request-Id`` and passed along to every deployment the request
reaches), ``trace_id``/``span_id`` when a trace is recorded, and the deployment and replica.

Shoppers' message text and user ids are logged only at DEBUG: at the default INFO level
a request leaves its tenant, outcome, timings and token counts, nothing a shopper wrote.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Literal

from opentelemetry import trace

#: Loggers of the platform's own code; Ray's and the libraries' loggers keep their formats.
PLATFORM_LOGGERS = ("services", "knowledge_sync")
JSON_FIELDS = ("asctime", "levelname", "name", "message")


def serve_request_id() -> str | None:
    """Serve's id of the request being handled in this task, if any."""
    try:
        # Serve keeps the request context in a private contextvar; its public
        # replica context has no request id.
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # outside a replica, or a Ray without it: no id, never a failed log call
        return None


class RequestContextFilter(logging.Filter):
    """Adds ``request_id``, ``trace_id``, ``span_id`` and the Serve component to each record."""

    def __init__(self, component: str | None = None, replica: str | None = None) -> None:
        super().__init__()
        self._component = component
        self._replica = replica

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate the record; never drops it."""
        request_id = serve_request_id()
        if request_id:
            record.request_id = request_id
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        if self._component:
            record.deployment = self._component
        if self._replica:
            record.replica = self._replica
        return True


def configure_logging(
    level: str = "INFO",
    log_format: Literal["json", "text"] = "json",
    *,
    component: str | None = None,
    replica: str | None = None,
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Route the platform's loggers to one handler (replacing any earlier one of ours).

    Args:
        level: Least level written (``DEBUG`` adds shoppers' messages).
        log_format: ``json`` (one object per line) or ``text``.
        component: The deployment name, added to every record.
        replica: The replica id, added to every record.
        stream: Where to write; the process's original standard error by default (Serve
            replaces ``sys.stderr`` in replicas with a writer into its own log).

    Returns:
        The installed handler.

    """
    handler = logging.StreamHandler(stream or sys.__stderr__)
    handler.set_name("cs-platform")
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(list(JSON_FIELDS), rename_fields={"asctime": "time", "levelname": "level"}, timestamp=False)
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(request_id)s: %(message)s"))
        handler.addFilter(_default_request_id)
    handler.addFilter(RequestContextFilter(component, replica))
    for name in PLATFORM_LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == "cs-platform"]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # one line per record, not a second one from Ray's root handler
    return handler


def _default_request_id(record: logging.LogRecord) -> bool:
    if not hasattr(record, "request_id"):
        record.request_id = "-"
    return True


def configure_replica_logging(level: str, log_format: Literal["json", "text"]) -> None:
    """:func:`configure_logging` for the Serve replica this runs in (component and replica filled in)."""
    from ray import serve

    component: str | None = None
    replica: str | None = None
    try:
        context = serve.get_replica_context()
        component, replica = context.deployment, context.replica_id.unique_id
    except Exception:  # not in a replica (unit tests construct deployments directly)
        pass
    configure_logging(level, log_format, component=component, replica=replica)
