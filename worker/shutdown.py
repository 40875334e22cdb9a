"""Stopping the HTTP server (CSM_MODE=http) without dropping what it is saying.

A platform stops a worker with SIGTERM and kills it some seconds later (RunPod, Docker and
Kubernetes alike). uvicorn alone stops listening at once (a health check on the same port is
refused, one on PORT_HEALTH still says healthy), waits without limit for streamed responses
and cuts WebSockets off mid-sentence. Here the first SIGTERM or SIGINT drains instead:

1. /ping answers 503 {"status": "stopping"}, so the load balancer sends nothing more; new
   jobs, and those waiting for a slot, are refused at once (503; a WebSocket closes with 1012).
2. What runs carries on for up to CSM_SHUTDOWN_GRACE_S: HTTP jobs to their end, a WebSocket
   session to the end of the sentence it is speaking (then it closes with 1012).
3. What still runs then is cut off with a clear error (an SSE `error` event, an NDJSON error
   line, WebSocket close 1012; raw audio can only break off), and the process exits with 0.

A second signal stops at once, as uvicorn does; so does a signal while the model is still
loading (no job can be running yet).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from types import FrameType
from typing import TypeVar

import uvicorn

log = logging.getLogger("worker.http")

T = TypeVar("T")

POLL_S = 0.05
# After the cut-off: how long the jobs cut off get to send their error and end.
SETTLE_S = 2.0
# uvicorn's own last wait for connections to finish, once it stops (then it cancels them).
UVICORN_CLOSE_S = 3.0


async def next_unless(items: AsyncIterator[T], other: asyncio.Future) -> asyncio.Future:
    """The future of `items`' next item, raced against `other`: cancelled (its step stopped
    and awaited) when `other` ends first or this wait is itself cancelled."""
    nxt = asyncio.ensure_future(anext(items))
    try:
        await asyncio.wait({nxt, other}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not nxt.done():
            nxt.cancel()
            with suppress(asyncio.CancelledError, StopAsyncIteration):
                await nxt
    return nxt


class ShuttingDown(Exception):
    """The worker is stopping: this job can't run (or run on) here; retry it on another."""


class Shutdown:
    """The one owner of the stopping state: `asked` once a signal came, `cut` once the grace
    period is over."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.asked = asyncio.Event()
        self.cut = asyncio.Event()

    @property
    def stopping(self) -> bool:
        return self.asked.is_set()

    async def drain(self, busy: Callable[[], dict[str, int]]) -> None:
        """Wait until nothing is `busy` (what still runs, by kind), for at most the grace
        period; then cut off what is left and give it SETTLE_S to end."""
        self.asked.set()
        log.info("stopping: no new jobs; waiting up to %g s (CSM_SHUTDOWN_GRACE_S) for %s",
                 self.grace_s, counted(busy()))
        if not await self._until_idle(busy, self.grace_s):
            log.warning("stopping: cutting off %s still running after %g s", counted(busy()),
                        self.grace_s)
            self.cut.set()
            await self._until_idle(busy, SETTLE_S)

    @staticmethod
    async def _until_idle(busy: Callable[[], dict[str, int]], seconds: float) -> bool:
        deadline = asyncio.get_running_loop().time() + seconds
        while any(busy().values()) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(POLL_S)
        return not any(busy().values())

    def cut_off_error(self) -> ShuttingDown:
        return ShuttingDown(f"the worker is shutting down: this job was cut off after the "
                            f"{self.grace_s:g} s it is given to finish (CSM_SHUTDOWN_GRACE_S); "
                            "retry it")

    async def until_cut_off(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """`items`, until the grace period is over: then ShuttingDown instead of the next."""
        async with aclosing(items):
            cut = asyncio.ensure_future(self.cut.wait())
            try:
                while True:
                    nxt = await next_unless(items, cut)
                    if nxt.cancelled():
                        raise self.cut_off_error()
                    try:
                        item = nxt.result()
                    except StopAsyncIteration:
                        return
                    yield item
            finally:
                cut.cancel()


def counted(busy: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in busy.items() if n) or "nothing"


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM or SIGINT runs `drain` (once one is given) before
    the server stops; a second signal, or one before `drain_on_signal`, stops it as uvicorn
    does (and the process then ends by that signal)."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self._drain: Callable[[], Awaitable[None]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task | None = None  # held: the loop keeps tasks weakly

    def drain_on_signal(self, drain: Callable[[], Awaitable[None]]) -> None:
        """From now on a signal drains first (call this on the server's event loop)."""
        self._loop = asyncio.get_running_loop()
        self._drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is None or self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        # A signal handler runs between any two bytecodes of the loop's thread: it only hands
        # the drain to the loop.
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        async def drain_then_stop() -> None:
            try:
                await self._drain()
            finally:
                self.should_exit = True

        self._drain_task = asyncio.ensure_future(drain_then_stop())
