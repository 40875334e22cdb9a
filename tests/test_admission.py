"""The HTTP mode's admission gate (worker.admission): pure asyncio, fast."""

from __future__ import annotations

import asyncio

import pytest

from worker.admission import Admission, Overloaded
from worker.shutdown import ShuttingDown


def test_slots_then_waiting_places_then_refusal():
    async def scenario():
        gate = Admission(slots=2, max_waiting=1, timeout_s=5)
        first, second = await gate.acquire(), await gate.acquire()
        assert (gate.running, gate.waiting) == (2, 0)
        waiter = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0.01)
        assert gate.waiting == 1 and not waiter.done()
        with pytest.raises(Overloaded, match="2 slots are busy and 1 requests"):
            await gate.acquire()
        first()
        first()  # releasing twice frees one slot, once
        third = await asyncio.wait_for(waiter, 1)
        assert (gate.running, gate.waiting) == (2, 0)
        second()
        third()
        assert gate.running == 0
        for _ in range(2):  # both slots are free again, without waiting
            await asyncio.wait_for(gate.acquire(), 0.1)

    asyncio.run(scenario())


def test_a_wait_ends_in_overloaded_after_the_timeout():
    async def scenario():
        gate = Admission(slots=1, max_waiting=4, timeout_s=0.2)
        await gate.acquire()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Overloaded, match="no slot freed within 0.2 s") as info:
            await gate.acquire()
        assert 0.2 <= loop.time() - started < 1
        assert info.value.retry_after_s == 2 and gate.waiting == 0 and gate.running == 1

    asyncio.run(scenario())


def test_no_waiting_places_refuses_at_once():
    async def scenario():
        gate = Admission(slots=1, max_waiting=0, timeout_s=30)
        await gate.acquire()
        with pytest.raises(Overloaded):
            await asyncio.wait_for(gate.acquire(), 0.1)

    asyncio.run(scenario())


def test_close_refuses_the_waiting_and_the_new_at_once():
    """What a drain needs: nothing starts after close, however long it would have waited."""
    async def scenario():
        gate = Admission(slots=1, max_waiting=4, timeout_s=30)
        release = await gate.acquire()
        waiters = [asyncio.ensure_future(gate.acquire()) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert gate.waiting == 3
        gate.close("stopping")
        for waiter in waiters:
            with pytest.raises(ShuttingDown, match="stopping"):
                await asyncio.wait_for(waiter, 0.5)
        with pytest.raises(ShuttingDown, match="stopping"):
            await gate.acquire()
        assert (gate.running, gate.waiting) == (1, 0)  # the running job keeps its slot
        release()
        assert gate.running == 0

    asyncio.run(scenario())
