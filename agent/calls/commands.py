"""Work handed to a thread that owns something (the engine, pjsua2) by other threads."""

from __future__ import annotations

import queue
from typing import Callable

import structlog

log = structlog.get_logger(__name__)


def run_pending(q: queue.SimpleQueue, describe_error: Callable[[Exception], str | None] | None = None) -> None:
    """Run every queued callable now; one failing command is logged and does not stop the rest."""
    while True:
        try:
            cmd = q.get_nowait()
        except queue.Empty:
            return
        try:
            cmd()
        except Exception as exc:
            detail = describe_error(exc) if describe_error else None
            if detail is not None:
                log.warning("command_failed", error=detail)
            else:
                log.exception("command_failed")
