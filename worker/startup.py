"""Start the worker, or exit with one line that says why: the entry points' start-up.

A missing model, a broken model folder, a malformed setting or an unusable default voice ends
the process with one ERROR log line and exit status 1, never a stack trace as the only
explanation (the trace is logged at DEBUG, for CSM_LOG_LEVEL=DEBUG).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from .service import Worker
from .settings import Settings, StartupError, load_settings

log = logging.getLogger("worker")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def settings_or_exit() -> Settings:
    """The settings, with logging set up at their level."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    with _exit_on_startup_error():
        settings = load_settings()
    logging.getLogger().setLevel(settings.log_level)
    return settings


def worker_or_exit(settings: Settings) -> Worker:
    """The started worker of queue mode (http mode starts its own, after its port is open:
    see worker.http_app)."""
    with _exit_on_startup_error():
        return Worker.start(settings)


@contextlib.contextmanager
def _exit_on_startup_error() -> Iterator[None]:
    try:
        yield
    except StartupError as e:
        report_startup_error(e)
        sys.exit(1)


def report_startup_error(error: StartupError) -> None:
    """The one line that says what to do; the trace only at DEBUG."""
    log.debug("start-up failed", exc_info=error)
    log.error("the worker cannot start: %s", error)
