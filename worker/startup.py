"""Start the worker, or exit with one line that says why: the entry points' start-up.

A missing model, a broken model folder, a malformed setting or an unusable default voice ends
the process with one ERROR log line and exit status 1, never a stack trace as the only
explanation (the trace is logged at DEBUG, for CSM_LOG_LEVEL=DEBUG).
"""

from __future__ import annotations

import logging
import sys

from .service import Worker
from .settings import Settings, StartupError, load_settings

log = logging.getLogger("worker")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def start_or_exit() -> tuple[Settings, Worker | None]:
    """The settings and, in queue mode, the started worker (http mode starts its own, after
    its port is open: see worker.http_app)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        settings = load_settings()
        logging.getLogger().setLevel(settings.log_level)
        return settings, Worker.start(settings) if settings.mode == "queue" else None
    except StartupError as e:
        log.debug("start-up failed", exc_info=True)
        log.error("the worker cannot start: %s", e)
        sys.exit(1)
