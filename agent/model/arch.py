"""Model architecture descriptions.

The 7B PersonaPlex checkpoint uses Moshi's 7B architecture; its Hugging Face `config.json` is
reported empty, so the architecture is never read from it. A model directory may instead carry
`personaplex_arch.json` (format of `shared/golden/personaplex-tiny/`), which lets small test
models load through exactly the same code path as the 7B one.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moshi.models import loaders as _moshi_loaders

from agent.errors import ModelUnavailable
from agent.timebase import AUDIO_CODEBOOKS  # agent and caller each have 8 Mimi codebooks

ARCH_FILE = "personaplex_arch.json"



@dataclass(frozen=True)
class Architecture:
    lm_kwargs: dict[str, Any]
    mimi_config: dict[str, Any]
    num_codebooks: int = AUDIO_CODEBOOKS

    @property
    def delays(self) -> list[int]:
        return list(self.lm_kwargs["delays"])


def default_7b() -> Architecture:
    lm = copy.deepcopy(_moshi_loaders._lm_kwargs)
    mimi = copy.deepcopy(_moshi_loaders._mimi_config)
    return Architecture(lm_kwargs=lm, mimi_config=mimi)


def _mimi_from_arch(raw: dict[str, Any]) -> dict[str, Any]:
    """Turn the arch file's `mimi` block into what `moshi.models.loaders.get_mimi` takes."""
    mimi = copy.deepcopy(raw)
    for key in ("seanet", "quantizer", "transformer", "sample_rate", "frame_rate"):
        if key not in mimi:
            raise ModelUnavailable(f"{ARCH_FILE}: 'mimi' lacks '{key}'")
    mimi.setdefault("channels", mimi["seanet"].get("channels", 1))
    for extra in ("num_codebooks", "resample_method", "note"):
        mimi.pop(extra, None)
    return mimi


def load_architecture(model_dir: Path | None) -> Architecture:
    """The architecture of the model in `model_dir`: its arch file if present, else the 7B."""
    if model_dir is None or not (model_dir / ARCH_FILE).exists():
        return default_7b()
    path = model_dir / ARCH_FILE
    try:
        raw = json.loads(path.read_text())
        lm = dict(raw["lm_kwargs"])
        mimi = _mimi_from_arch(raw["mimi"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelUnavailable(f"{path}: not a valid architecture file ({exc})") from exc
    ncb = int(raw["mimi"].get("num_codebooks", AUDIO_CODEBOOKS))
    return Architecture(lm_kwargs=lm, mimi_config=mimi, num_codebooks=ncb)
