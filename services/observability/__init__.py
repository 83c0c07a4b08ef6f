"""Metrics, traces and logs: what an SRE team needs to see the platform at work.

``metrics`` holds the catalog of every metric the platform exports (the table in docs/observability.md and
the scrape test are checked against it), ``tracing`` the OpenTelemetry spans, ``logs``
the JSON log format, ``gpu`` the NVML sampler of GPU use.
"""
