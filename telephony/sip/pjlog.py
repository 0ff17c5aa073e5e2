"""pjsip's own log lines as structured log events.

pjsua2 hands its log entries to a `LogWriter` once `libInit` has run; we pass them to structlog
(`event="pjsip"`, the pjsip level kept) so that a log collector sees one JSON stream. Before
that, `libCreate` prints pjlib's start-up lines straight to the process's stdout; `captured`
catches those at the file-descriptor level and replays them through the same writer.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile

import pjsua2 as pj
import structlog

log = structlog.get_logger("pjsip")


def emit(level: int, msg: str) -> None:
    """One pjsip line: pjsip level 1 is an error, 2 a warning, 3 and up are details."""
    msg = msg.rstrip()
    if not msg:
        return
    if level <= 1:
        log.error("pjsip", msg=msg, pj_level=level)
    elif level == 2:
        log.warning("pjsip", msg=msg, pj_level=level)
    else:
        log.debug("pjsip", msg=msg, pj_level=level)


class LogWriter(pj.LogWriter):
    def write(self, entry) -> None:
        emit(entry.level, entry.msg)


@contextlib.contextmanager
def captured(level: int = 4):
    """Route what C code prints to fd 1 meanwhile into `emit` (as pjsip level `level`)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                emit(level, line)
