"""Which weights a server loads, decided from its config and the machine, before anything loads.

Kept apart from server/runtime.py (which imports torch) so the rule is a plain function the unit
tests check on every combination: the 7B PersonaPlex serves calls in real time only on a CUDA
device, so `source: auto` takes it only there; an explicit `source: hf` is the operator's call
(offline work, a trial) and is honoured on CPU with a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Source = Literal["auto", "hf", "dir", "demo"]


@dataclass(frozen=True)
class ModelChoice:
    load: Literal["demo", "dir", "hf"]
    #: why, in one sentence for the start log; None when the config named exactly this
    note: str | None = None
    #: the 7B on a machine without CUDA: it loads, but calls will not keep up with real time
    not_realtime: bool = False


def choose_model(source: Source, has_dir: bool, cuda: bool, hub_missing: Callable[[], str | None]) -> ModelChoice:
    """The weights to load. `hub_missing()` says why the Hub weights cannot be had (no token and
    nothing cached), or None when they can; it is asked only where the answer matters (auto on
    a CUDA machine), so a CPU-only start never touches the Hub."""
    if source == "demo":
        return ModelChoice("demo")
    if source == "dir" or (source == "auto" and has_dir):
        return ModelChoice("dir")
    if source == "hf":
        return ModelChoice("hf", None if cuda else
                           "no CUDA device: the 7B model runs on CPU, far slower than real time", not cuda)
    if not cuda:
        return ModelChoice("demo", "no CUDA device, so not the 7B model (it cannot keep up with calls on CPU); "
                                   "serving the built-in demo model (model.source: hf loads the 7B anyway)")
    missing = hub_missing()
    if missing is not None:
        return ModelChoice("demo", f"{missing}; serving the built-in demo model")
    return ModelChoice("hf")
