"""An in-memory OTLP/HTTP trace collector for tests: keeps every span any process exports to it.

It speaks the real protocol (protobuf ``ExportTraceServiceRequest`` on ``POST /v1/traces``),
so the platform's exporter is exercised exactly as in production, from every Ray process.
"""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response


@dataclass(frozen=True)
class CollectedSpan:
    """One exported span, decoded."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    attributes: dict[str, Any]
    service: str


@dataclass
class SpanStore:
    """Spans received so far (thread-safe)."""

    spans: list[CollectedSpan] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, spans: list[CollectedSpan]) -> None:
        with self.lock:
            self.spans.extend(spans)

    def snapshot(self) -> list[CollectedSpan]:
        with self.lock:
            return list(self.spans)

    def wait_for(self, predicate: Any, timeout_s: float = 60) -> list[CollectedSpan]:
        """Spans once ``predicate(spans)`` holds; fails after ``timeout_s`` (exporters batch on their own clock)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.snapshot()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans never satisfied the condition; got {[s.name for s in spans]}")
            time.sleep(0.2)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def create_collector_app(store: SpanStore) -> FastAPI:
    """The collector's HTTP app."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    app = FastAPI()

    @app.post("/v1/traces")
    async def traces(request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest.FromString(body)
        spans = []
        for resource_spans in message.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        CollectedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex() or None,
                            name=span.name,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            service=str(resource.get("service.name", "")),
                        )
                    )
        store.add(spans)
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf")

    return app
