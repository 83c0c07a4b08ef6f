"""What every config model shares: strict models, Serve options, id patterns and the default data files."""

from __future__ import annotations

import copy
import re
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

    def to_serve_options(self) -> dict[str, Any]:
        """Return keyword arguments for ``Deployment.options``."""
        actor_options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
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
