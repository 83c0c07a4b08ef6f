"""What every config model shares: strict models, Serve options, id patterns and the default data files."""

from __future__ import annotations

import copy
import re
import sys
from functools import cache
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


@cache
def _load_defaults(name: str) -> Any:
    import yaml

    text = (resources.files("services.config") / "defaults" / f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def defaults(name: str) -> Any:
    """A fresh copy of a default data set shipped in ``services/config/defaults/<name>.yaml``.

    Default texts (intent examples, rules, standard replies, tools) are data, not code: a
    brand's operator reads and overrides them in the same shape in its serve config.
    """
    return copy.deepcopy(_load_defaults(name))


#: Tenant ids end up inside Milvus filter expressions; this pattern keeps them inert.
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"

#: Names of knowledge sources (a CRM, an ERP, a folder): part of every chunk id.
SOURCE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


#: Ray runs the function this variable names (``module.function``) in a worker process before
#: the process takes its first task. Ray sets it itself only from a job's runtime env
#: (``worker_process_setup_hook``, ignored in an actor's, Ray 2.60); a deployment sets it in
#: its replicas' ``env_vars``. The name is Ray's own (``ray_constants``); a test fails if it stops working.
RAY_WORKER_SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"


def skip_pandas_and_pyarrow() -> None:
    """Worker setup hook: ``import pandas`` and ``import pyarrow`` fail in this process.

    Ray imports both in every worker process whenever they are installed: Serve for a
    DataFrame JSON encoder (``ray/serve/_private/utils.py``, and pandas imports pyarrow), and
    Ray's serialization for Ray Data's Arrow serializers (``ray/_private/arrow_serialization.py``).
    Both go without them when the import fails: ~30-130 MB of each process's memory
    (benchmarks/README.md). They are installed for pymilvus, Milvus Lite and FlagEmbedding,
    which only the Retriever and a FlagEmbedding Embedder run. Code that does need them in
    such a process fails at its import, loudly, rather than going without.
    """
    # None is Python's own marker for "this import fails" (typeshed types the mapping as modules only).
    for name in ("pandas", "pyarrow"):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


#: ``env_vars`` of a Ray process that starts without pandas and pyarrow: the replicas of
#: deployments that do not use them, and Serve's controller (``controller_options`` in the serve configs), whose
#: proxies and HAProxy manager inherit them.
SKIP_PANDAS_ENV_VARS = {RAY_WORKER_SETUP_HOOK_ENV: f"{__name__}.{skip_pandas_and_pyarrow.__name__}"}

#: ``env_vars`` of a replica that keeps pandas and pyarrow: replicas, too, inherit the controller's, and Ray
#: runs no hook for an empty name.
KEEP_PANDAS_ENV_VARS = {RAY_WORKER_SETUP_HOOK_ENV: ""}


class DeploymentOptions(StrictModel):
    """Ray Serve options of one deployment; passed to ``Deployment.options``."""

    num_replicas: int | Literal["auto"] = Field(
        1, description="Fixed replica count, or 'auto' with autoscaling_config."
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="Concurrent requests per replica; Serve's default of 5 queues streaming chats."
    )
    max_queued_requests: int = Field(
        -1,
        ge=-1,
        description="Requests waiting for a replica beyond max_ongoing_requests, at most; more are refused at once "
        "(a 503 with Retry-After) instead of waiting. -1: no bound.",
    )
    autoscaling_config: dict[str, Any] | None = Field(None, description="Ray Serve autoscaling_config, verbatim.")
    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per replica (fractional on small boxes).")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per replica.")
    memory_bytes: int | None = Field(None, ge=0, description="Memory reserved per replica for scheduling.")
    health_check_period_s: float = Field(10, gt=0, description="How often Serve calls check_health.")
    health_check_timeout_s: float = Field(30, gt=0, description="How long check_health may take.")

    @model_validator(mode="after")
    def _autoscaling_needs_auto(self) -> DeploymentOptions:
        if self.autoscaling_config is not None and self.num_replicas != "auto":
            raise ValueError("autoscaling_config is set, so num_replicas must be 'auto'")
        return self

    def to_serve_options(self, *, uses_pandas: bool = True) -> dict[str, Any]:
        """Return keyword arguments for ``Deployment.options``.

        Args:
            uses_pandas: whether the deployment's code imports pandas or pyarrow; if not, its
                replicas start without them (:func:`skip_pandas_and_pyarrow`).

        """
        actor_options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        env_vars = KEEP_PANDAS_ENV_VARS if uses_pandas else SKIP_PANDAS_ENV_VARS
        actor_options["runtime_env"] = {"env_vars": dict(env_vars)}
        if self.memory_bytes is not None:
            actor_options["memory"] = self.memory_bytes
        options: dict[str, Any] = {
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": actor_options,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config
        return options


def check_patterns(patterns: list[str], where: str) -> None:
    """Refuse regular expressions that do not compile, naming where they are configured."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, OverflowError, RecursionError) as err:  # "a{99999999999}" overflows, not a re.error
            raise ValueError(f"{where}: bad pattern {pattern!r}: {err}") from err
