"""How many jobs the HTTP server takes at once: never a hang, never an unbounded backlog.

Up to CSM_MAX_CONCURRENCY jobs run (the batch the engine's frame loop is built for); up to
CSM_MAX_QUEUED more wait for a slot, each at most CSM_QUEUE_TIMEOUT_S; anything beyond is
refused at once as Overloaded (HTTP 503 with Retry-After). A RunPod load balancer sends the
refused request to another worker or back to the client; the queue mode needs none of this
(RunPod's queue holds jobs and `concurrency_modifier` caps them). Once the server stops
(worker/shutdown.py), `close` refuses every new request and every waiting one at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .shutdown import ShuttingDown

# What a refused caller is told to wait: about one short job.
RETRY_AFTER_S = 2


class Overloaded(Exception):
    """No slot now, and no room (or no time left) to wait for one."""

    retry_after_s = RETRY_AFTER_S


class Admission:
    def __init__(self, slots: int, max_waiting: int, timeout_s: float):
        self.slots = slots
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.running = 0
        self.waiting = 0
        self.closed: str | None = None  # why no slot is handed out any more
        self._free = asyncio.Semaphore(slots)

    def close(self, reason: str) -> None:
        """From now on every acquire, the waiting ones included, raises ShuttingDown(reason)."""
        self.closed = reason
        # No slot is handed out after this, so the semaphore's count no longer matters: one
        # extra permit per waiter wakes each of them to see the close.
        for _ in range(self.waiting):
            self._free.release()

    async def acquire(self) -> Callable[[], None]:
        """A slot, or Overloaded (or ShuttingDown); returns its release (safe to call more
        than once)."""
        if self.closed:
            raise ShuttingDown(self.closed)
        if self._free.locked():
            if self.waiting >= self.max_waiting:
                raise Overloaded(f"all {self.slots} slots are busy and {self.waiting} requests "
                                 "are already waiting")
            self.waiting += 1
            try:
                await asyncio.wait_for(self._free.acquire(), self.timeout_s)
            except TimeoutError:
                raise Overloaded(f"no slot freed within {self.timeout_s:g} s") from None
            finally:
                self.waiting -= 1
            if self.closed:
                raise ShuttingDown(self.closed)
        else:
            await self._free.acquire()  # free: returns without waiting
        self.running += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.running -= 1
                self._free.release()

        return release
