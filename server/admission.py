"""Admission control: one worker takes no more work than it can finish; the rest is shed at the door.

A worker is one event loop: calls beyond what it can finish only queue, and every queued call makes all
the others later. Two bounds, both per worker (docs/reliability/processes.md has the measurements):

- max_concurrent_requests, here: a unary call arriving while that many are in their handlers is answered
  at once with RESOURCE_EXHAUSTED (no feature read, no scoring). It bounds handlers that await real I/O
  (a thread, a socket), which would otherwise all be started and all be slow. `asyncio.sleep(0)` is not
  enough for grpc.aio to start another call, so today's handlers rarely overlap (processes.md).
- max_pending_requests, in gRPC core (server.app passes it as grpc.server.max_pending_requests): calls that
  arrived but that the event loop has not taken yet. grpc.aio takes one call at a time from gRPC core, and
  Recommend's handler runs without yielding, so under overload the queue builds there, where no Python
  code can see it; gRPC core cancels what arrives past the bound (the client sees CANCELLED).

grpc.aio's own `maximum_concurrent_rpcs` counts every RPC, health checks and long-lived streams included,
so an overloaded server would fail its health checks and a few idle streams could starve it. Here only
unary calls of the application's services are shed: health, reflection and streams (IngestEvents) pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable

import grpc

from server.interceptors import UNTRACKED_SERVICES, application_unary, rewrapped


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Shed unary calls with RESOURCE_EXHAUSTED while `limit` calls are in their handlers (0: no limit).

    `exempt` services always pass. The counts are per process and only touched on its event loop, so they
    need no lock. Put this interceptor after the observability one: shed calls are then counted and timed
    like any other (code RESOURCE_EXHAUSTED) and still echo their request id.
    """

    def __init__(self, limit: int, exempt: Iterable[str] = UNTRACKED_SERVICES) -> None:
        if limit < 0:
            raise ValueError(f"max_concurrent_requests must be >= 0, got {limit}")
        self.limit = limit
        self.in_flight = 0  # calls in their handlers
        self.shed = 0
        self._exempt = frozenset(exempt)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler, _, _, wrap = await application_unary(continuation, handler_call_details, self._exempt)
        if self.limit == 0 or not wrap:
            return handler
        return rewrapped(handler, self._admit(handler.unary_unary))

    def _admit(self, behavior: Callable) -> Callable:
        async def admitted(request: object, context: grpc.aio.ServicerContext) -> object:
            # Decided when the handler would start (not when the call was first seen): exact, whatever waited in between.
            if self.in_flight >= self.limit:
                self.shed += 1
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server overloaded: this worker has {self.in_flight} calls in progress "
                    f"(server.max_concurrent_requests={self.limit}); retry after a backoff",
                )
            self.in_flight += 1
            try:
                response = behavior(request, context)
                if inspect.isawaitable(response):
                    response = await response
                return response
            finally:
                self.in_flight -= 1

        return admitted
