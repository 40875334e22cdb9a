"""RunPod entry point: `python -u handler.py` (see the README for local modes).

Thin on purpose: configuration, the model and the voices load once per worker, at start-up
(`worker.startup`: a worker that can't start says why in one line and exits 1); each job goes
to `worker.service.Worker`, which validates it and never raises.

The SDK streams a generator handler's yields to `/stream` and, with
`return_aggregate_stream`, returns their list from `/run` and `/runsync`; a non-streamed job
yields exactly one item, its whole response. `--test_input` does not iterate generators, so
that local mode gets a plain function running the same job to completion.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import runpod

from worker.startup import start_or_exit

settings, worker = start_or_exit()


async def stream_handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    async for item in worker.run(job.get("input")):
        if item.pop("refresh_worker", False):
            config["refresh_worker"] = True  # the SDK reads it after this job: restart
        yield item


async def test_input_handler(job: dict[str, Any]) -> dict[str, Any]:
    return await worker.run_to_completion(job.get("input"))


def _local_test_mode() -> bool:
    """The SDK's own rule for `--test_input`/test_input.json runs, checked the same way."""
    return "--rp_serve_api" not in sys.argv and "RUNPOD_WEBHOOK_GET_JOB" not in os.environ


config: dict[str, Any] = {
    "handler": test_input_handler if _local_test_mode() else stream_handler,
    "return_aggregate_stream": True,
    "concurrency_modifier": lambda _current: settings.max_concurrency,
}

if __name__ == "__main__":
    runpod.serverless.start(config)
