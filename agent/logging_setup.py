"""structlog configuration: JSON lines in production, readable key=value on a terminal.

Library code only ever calls `structlog.get_logger(...)` and binds context (call_id, persona,
number, endpoint) with `structlog.contextvars` or `.bind`; this module decides the rendering.
"""

from __future__ import annotations

import logging
import sys

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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Third-party libraries (aiohttp, aiortc, huggingface_hub) log through stdlib logging.
    logging.basicConfig(stream=sys.stderr, level=max(lvl, logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("huggingface_hub", "aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.ERROR))
