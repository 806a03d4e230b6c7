"""A grpc.aio server interceptor: request ids (in, out and in logs), the serving process, and per-RPC latency and status metrics."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar

import grpc

log = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"
# The pid of the worker process that answered: with several workers on one port (SO_REUSEPORT) it tells
# operators and tests which process holds a client's connection.
SERVED_BY_HEADER = "x-served-by"
# Infrastructure services pass through untouched: health probes would drown the request metrics.
UNTRACKED_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
# A client-supplied id ends up in logs and files: accept only short, plain tokens, else make a new one.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

request_id_var: ContextVar[str] = ContextVar("request_id", default="")


def current_request_id() -> str:
    """The id of the RPC this code runs for, or "" outside an RPC."""
    return request_id_var.get()


async def application_unary(
    continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
    handler_call_details: grpc.HandlerCallDetails,
    untracked: frozenset[str],
) -> tuple[grpc.RpcMethodHandler | None, str, str, bool]:
    """The next handler, its service and method, and whether an interceptor should wrap it: only unary-unary
    calls of services not in `untracked` (streams, health and reflection pass through unchanged)."""
    handler = await continuation(handler_call_details)
    service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
    wrap = handler is not None and handler.unary_unary is not None and service not in untracked
    return handler, service, method, wrap


def rewrapped(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A unary-unary handler running `behavior` with `handler`'s (de)serialisers."""
    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """For every unary-unary RPC: set and echo `x-request-id`, send `x-served-by`, then record latency and final status code.

    `observe` is called as observe(method, code, seconds), e.g. Metrics.observe_request; method is the
    short name ("Recommend"), code the StatusCode name ("OK", "INVALID_ARGUMENT"). Streaming handlers
    (reflection) and the services in `untracked` are returned unchanged.
    """

    def __init__(
        self,
        observe: Callable[[str, str, float], None],
        untracked: Iterable[str] = UNTRACKED_SERVICES,
    ) -> None:
        self._observe = observe
        self._untracked = frozenset(untracked)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler, _, method, wrap = await application_unary(continuation, handler_call_details, self._untracked)
        if not wrap:
            return handler
        return rewrapped(handler, self._wrap(handler.unary_unary, method, _request_id(handler_call_details.invocation_metadata)))

    def _wrap(self, behavior: Callable, method: str, request_id: str) -> Callable:
        observe = self._observe

        async def observed(request: object, context: grpc.aio.ServicerContext) -> object:
            start = time.perf_counter()
            token = request_id_var.set(request_id)
            error: BaseException | None = None
            try:
                await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id), (SERVED_BY_HEADER, str(os.getpid()))))
                response = behavior(request, context)
                if inspect.isawaitable(response):
                    response = await response
                return response
            except BaseException as raised:
                error = raised
                raise
            finally:
                request_id_var.reset(token)
                try:
                    observe(method, final_code(context, error).name, time.perf_counter() - start)
                except Exception:  # metrics must never fail a request
                    log.exception("recording metrics for %s failed", method)

        return observed


def final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status code a unary handler ended with, given what it raised (None: it returned)."""
    if error is None:
        return context.code() or grpc.StatusCode.OK  # a handler may set_code() without aborting
    if isinstance(error, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(error, asyncio.CancelledError):
        # The client went away or its deadline passed; gRPC answers nobody, but the time was spent.
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # what grpc.aio answers for an unhandled exception


def _request_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _VALID_REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex
