"""Domain errors of the online path; the servicer maps them to gRPC status codes in one place."""

from __future__ import annotations


class RecommendationError(Exception):
    """Base class: the message is safe to return to the caller."""


class InvalidArgument(RecommendationError):
    """A request field is missing, malformed or out of range."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class UnknownModelVersion(RecommendationError):
    """The request pinned a model version that does not exist."""


class ModelUnavailable(RecommendationError):
    """A model version exists but cannot be served (failed to load or violates its feature contract)."""


class IngestionUnavailable(RecommendationError):
    """Events cannot be ingested by this server (for example the registry lacks the push sources)."""


class StreamIdle(RecommendationError):
    """A client stream sent nothing for longer than the server's idle timeout; what it sent before is kept."""
