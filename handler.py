"""RunPod entry point: `python -u handler.py` (see the README for local modes).

Thin on purpose: configuration, the model and the preset voices load once per worker, at
start-up; each job goes to `worker.service.Worker`, which validates it and never raises.
"""

from __future__ import annotations

import logging
from typing import Any

import runpod

from worker.service import Worker
from worker.settings import load_settings

settings = load_settings()
logging.basicConfig(level=settings.log_level,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
worker = Worker.start(settings)


def handler(job: dict[str, Any]) -> dict[str, Any]:
    return worker.handle(job.get("input"))


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
