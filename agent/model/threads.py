"""How many CPU threads torch may use for the model.

On a small machine the engine's intra-op workers are not alone: the asyncio loop, the SIP
thread, the VAD worker and the codecs run beside them. A torch op split over every core waits at
its barrier for whichever worker the OS has just descheduled, so one busy transport thread can
double a step (measured on 2 cores with the demo model: bench_calls step median 35-53 ms with
one torch thread against 49-65 ms with two, in paired runs). Leaving one core to the rest keeps
the step steady. On a GPU the CPU side is light and the rule changes nothing that matters.
"""

from __future__ import annotations

import os

import structlog
import torch

log = structlog.get_logger(__name__)


def auto_threads(cores: int | None = None) -> int:
    """One fewer than the cores this process may run on, at least one."""
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
    return max(1, cores - 1)


def configure_torch_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads: `requested`, or `auto_threads()` when 0. Returns the count."""
    n = requested or auto_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    log.info("torch_threads", threads=n, requested=requested or "auto")
    return n
