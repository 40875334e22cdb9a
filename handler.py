"""RunPod entry point: `python -u handler.py` (see the README for local modes).

Two modes, chosen by CSM_MODE: `queue` (default) serves RunPod's queue protocol through the
SDK; `http` serves the HTTP API (worker.http_app) on PORT for a load-balancing endpoint.

Thin on purpose: configuration, the model and the voices load once per worker, at start-up
(`worker.startup`: a worker that can't start says why in one line and exits 1); each job goes
to `worker.service.Worker` (or, with `openai_route`, to `worker.openai_api`), which validates
it and never raises.

The SDK streams a generator handler's yields to `/stream` and, with
`return_aggregate_stream`, returns their list from `/run` and `/runsync`; a non-streamed job
yields exactly one item, its whole response. `--test_input` does not iterate generators, so
that local mode gets a plain function running the same job to completion. On RunPod, a long
whole job's progress reaches `/status` through the SDK's `progress_update`.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

from worker.openai_api import openai_job
from worker.service import Progress, Worker
from worker.startup import settings_or_exit, worker_or_exit

settings = settings_or_exit()
worker: Worker | None = None  # http mode: the server loads the model after its port is open
if settings.mode == "queue":
    # The SDK is imported while the model loads, not before: its import waits ~1.1 s on a
    # Python subprocess of its own (runpod.serverless.utils.rp_debugger runs py-cpuinfo).
    # Python's per-module import locks keep the two threads' imports apart; with the modules
    # above loaded they import none in common anyway (checked on 2026-12-07).
    sdk_import = threading.Thread(target=importlib.import_module, args=("runpod",),
                                  name="runpod-import", daemon=True)
    sdk_import.start()
    worker = worker_or_exit(settings)
    sdk_import.join()


def answers(payload: Any, allow_stream: bool = True,
            on_progress: Progress | None = None) -> AsyncIterator[dict[str, Any] | str]:
    if isinstance(payload, dict) and "openai_route" in payload:
        return openai_job(worker, payload, allow_stream)
    return worker.run(payload, allow_stream, on_progress)


def progress_reports(job: dict[str, Any]) -> Progress | None:
    """A long whole job's progress, shown by RunPod's /status while it runs: posted through the
    SDK's `progress_update`, which only RunPod's own service takes (the local server has no
    such route)."""
    if not _on_runpod():
        return None
    from runpod.serverless import progress_update

    return lambda progress: progress_update(job, progress)


async def stream_handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any] | str]:
    async for item in answers(job.get("input"), on_progress=progress_reports(job)):
        if isinstance(item, dict) and item.pop("refresh_worker", False):
            config["refresh_worker"] = True  # the SDK reads it after this job: restart
        yield item


async def test_input_handler(job: dict[str, Any]) -> dict[str, Any] | str:
    result: dict[str, Any] | str = {}
    async for item in answers(job.get("input"), allow_stream=False):
        result = item
    return result


def _local_test_mode() -> bool:
    """The SDK's own rule for `--test_input`/test_input.json runs, checked the same way."""
    return "--rp_serve_api" not in sys.argv and "RUNPOD_WEBHOOK_GET_JOB" not in os.environ


def _on_runpod() -> bool:
    """Serving RunPod's queue (its service sets the webhooks), not the SDK's local server."""
    return "--rp_serve_api" not in sys.argv and "RUNPOD_WEBHOOK_GET_JOB" in os.environ


config: dict[str, Any] = {
    "handler": test_input_handler if _local_test_mode() else stream_handler,
    "return_aggregate_stream": True,
    "concurrency_modifier": lambda _current: settings.max_concurrency,
}

if __name__ == "__main__":
    if settings.mode == "http":
        # Imported here: FastAPI and uvicorn add ~0.3 s to every queue-mode start otherwise.
        from worker.http_app import serve

        sys.exit(serve(settings))
    import runpod  # loaded by now (sdk_import)

    runpod.serverless.start(config)
