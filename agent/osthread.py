"""The OS-level name of the calling thread (Linux), so that `top -H`, /proc/PID/task/*/comm and
`scripts/bench_media.py` can tell the engine, VAD and SIP threads apart: Python 3.11 names its
threads only for itself, and every one of them reads "python" to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_PR_SET_NAME = 15


def name_os_thread(name: str) -> None:
    """Best effort: a failure leaves the name as it was (the name is only for operators)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
