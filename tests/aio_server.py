"""A real grpc.aio server on a free port, on its own event loop in a background thread, for sync tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence

import grpc


class ThreadedAioServer:
    """Build with `configure(server)` (add servicers; may be async), serve on 127.0.0.1:<free port>, stop()."""

    def __init__(self, configure: Callable[[grpc.aio.Server], Awaitable[None] | None], interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self._run(self._start(configure, interceptors))

    def _run(self, coroutine: Awaitable) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _start(self, configure: Callable, interceptors: Sequence[grpc.aio.ServerInterceptor]) -> int:
        self._server = grpc.aio.server(interceptors=list(interceptors))
        configured = configure(self._server)
        if asyncio.iscoroutine(configured):
            await configured
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def stop(self) -> None:
        self._run(self._server.stop(None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
