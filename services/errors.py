"""Domain errors shared by every deployment.

Each error carries the HTTP status and a stable machine-readable code. They cross
Ray actor boundaries (a replica raises, the ingress catches), so they must pickle:
every subclass keeps the single ``message`` argument of the base class. Only the
ingress turns them into HTTP responses (see ``services.api.errors``).
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of all errors the platform reports to a client."""

    status_code: int = 500
    code: str = "internal_error"
    retry_after_s: int | None = None  # sent as Retry-After: when trying again may succeed

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[type[ServiceError], tuple[str]]:
        return (type(self), (self.message,))


class InvalidRequestError(ServiceError):
    """The request is well-formed JSON but asks for something we cannot do."""

    status_code = 400
    code = "invalid_request"


class SyncOutcomeUnknownError(ServiceError):
    """A knowledge sync outlived its caller's wait: it goes on and may still commit."""

    status_code = 504
    code = "sync_outcome_unknown"


class PayloadTooLargeError(ServiceError):
    """A request body over the route's size limit (refused before it is parsed or authenticated)."""

    status_code = 413
    code = "payload_too_large"


class AuthenticationError(ServiceError):
    """Missing or unknown API key."""

    status_code = 401
    code = "unauthorized"


class ForbiddenError(ServiceError):
    """A valid key used on a resource of another tenant."""

    status_code = 403
    code = "forbidden"


class NotFoundError(ServiceError):
    """A named resource (adapter, tenant, document) does not exist."""

    status_code = 404
    code = "not_found"


class DependencyUnavailableError(ServiceError):
    """A dependency (Milvus, the LLM engine, the embedder) is down or timed out."""

    status_code = 503
    code = "dependency_unavailable"
    retry_after_s: int | None = 2


class OverloadedError(DependencyUnavailableError):
    """A deployment's queue is full: the request was refused at once rather than left waiting."""

    code = "overloaded"
    retry_after_s = 1


class DeadlineExceededError(ServiceError):
    """The request did not finish within ``orchestrator.request_timeout_s``; its generation was stopped."""

    status_code = 504
    code = "deadline_exceeded"


class KnowledgeBaseUnavailableError(DependencyUnavailableError):
    """The vector store cannot be reached or answered with an error."""

    code = "knowledge_base_unavailable"


class GenerationError(DependencyUnavailableError):
    """The LLM engine failed while generating."""

    code = "generation_failed"


class InvalidAdapterError(InvalidRequestError):
    """A LoRA adapter failed validation; the message names the fault."""

    code = "invalid_adapter"


class ConflictError(ServiceError):
    """The request contradicts the current state (e.g. deleting an adapter version in use)."""

    status_code = 409
    code = "conflict"
