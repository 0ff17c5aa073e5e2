"""structlog configuration: JSON lines in production, readable key=value on a terminal.

Library code only ever calls `structlog.get_logger(...)` and binds context (call_id, persona,
number, endpoint) with `structlog.contextvars` or `.bind`; this module decides the rendering.
"""

from __future__ import annotations

import logging
import sys
import threading

import structlog


class _Stderr:
    """Resolves sys.stderr at each write, so a replaced stderr (tests, daemons) is honoured."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(fmt: str = "auto", level: str = "info", stream=None) -> None:
    stream = stream or _Stderr()
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), structlog.processors.format_exc_info,
                    renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Third-party libraries (aiohttp, aiortc, huggingface_hub) log through stdlib logging, and
    # Python warnings through it too: rendered the same way, so a log collector sees one format.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer]))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(lvl, logging.WARNING))
    logging.captureWarnings(True)
    # an exception nobody caught, in any thread, is a log event too (not raw text on stderr)
    crash = structlog.get_logger("crash")
    sys.excepthook = lambda typ, exc, tb: crash.critical("uncaught_exception", exc_info=(typ, exc, tb))
    threading.excepthook = lambda a: crash.error("thread_crashed", thread=getattr(a.thread, "name", None),
                                                 exc_info=(a.exc_type, a.exc_value, a.exc_traceback))
    for noisy in ("huggingface_hub", "aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.ERROR))
