"""The built-in tiny STT: Kyutai STT's architecture with deterministic random weights.

Next to the built-in demo PersonaPlex (`agent.model.demo`) the caller transcriber needs a model
too, and Kyutai's weights cannot be had everywhere (CI, a laptop offline). This module makes one
on first use, always the same bytes for the same version: moshi's `LMModel` with the layout of
`kyutai/stt-1b-en_fr` (32 Mimi codebooks in, no depth transformer, all delays 0, 4 extra heads of
6 classes, a 0.5 s text delay, no silence prefix) at toy size, in Kyutai's repository format
(`config.json`, weights, tokenizer, Mimi). Its Mimi is a copy of the demo PersonaPlex's, since the
two models share one encode. It transcribes nothing meaningful: random weights put out random
pieces, but every path a real STT takes runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import structlog
import torch
from safetensors.torch import save_file

from agent.model.demo import build_once
from agent.model.files import MIMI_FILE, ModelFiles

log = structlog.get_logger(__name__)

STT_DEMO_VERSION = "stt-tiny-v1"
_SEED = 20260307
_TOKENIZER = "tokenizer_demo_160.model"
_MIMI = "mimi-demo.safetensors"

#: `kyutai/stt-1b-en_fr`'s layout (see `agent.transcribe`), at toy size
STT_DEMO_CONFIG = {
    "dim": 64, "text_card": 160, "existing_text_padding_id": 3, "n_q": 32, "dep_q": 0, "card": 2048,
    "num_heads": 4, "num_layers": 2, "hidden_scale": 4.125, "causal": True, "layer_scale": None,
    "context": 750, "max_period": 100000.0, "gating": "silu", "norm": "rms_norm_f32",
    "positional_embedding": "rope", "delays": [0] * 33, "extra_heads_num_heads": 4, "extra_heads_dim": 6,
    "conditioners": {}, "cross_attention": False,
    "lm_gen_config": {"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50},
    "stt_config": {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
    "model_type": "stt", "moshi_name": "model.safetensors", "mimi_name": _MIMI, "tokenizer_name": _TOKENIZER,
}


def demo_persona_dir(files: ModelFiles) -> Path | None:
    """The demo PersonaPlex folder these files come from, or None for any other model. A folder
    that links the demo's files (tests vary its architecture that way) counts as the demo."""
    from agent.model.demo import DEMO_VERSION

    if files.root is None:
        return None
    marker = files.root / ".complete"
    try:
        if marker.read_text() != DEMO_VERSION:
            return None
    except OSError:
        return None
    return marker.resolve().parent


def _lm_kwargs(config: dict) -> dict:
    """The config minus what is not an `LMModel` argument (what moshi's loader pops)."""
    skip = {"lm_gen_config", "stt_config", "model_type", "moshi_name", "mimi_name", "tokenizer_name",
            "conditioners", "cross_attention"}
    return {k: v for k, v in config.items() if k not in skip}


def _build(dest: Path, persona_demo: Path) -> None:
    from moshi.models.lm import LMModel

    from agent.model.demo import _train_tokenizer

    config = json.loads(json.dumps(STT_DEMO_CONFIG))
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    (dest / _TOKENIZER).write_bytes(_train_tokenizer(config["text_card"]))
    torch.manual_seed(_SEED)
    lm = LMModel(device="cpu", dtype=torch.float32, **_lm_kwargs(config)).eval()
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(dest / config["moshi_name"]))
    shutil.copyfile(persona_demo / MIMI_FILE, dest / _MIMI)
    (dest / "README.txt").write_text(
        f"PersonaPlex agent demo STT {STT_DEMO_VERSION}: Kyutai STT's architecture with deterministic tiny "
        "random weights, made by agent/transcribe/demo.py on the demo PersonaPlex's Mimi. Not a speech "
        "recogniser; delete this folder to rebuild it.\n")


def demo_stt_dir(persona_demo: Path) -> Path:
    """Path of the tiny STT that goes with this demo PersonaPlex folder, building it (once, under
    a lock, atomically) next to it."""
    persona_demo = Path(persona_demo)
    dest = persona_demo.parent / f"demo-{STT_DEMO_VERSION}-{persona_demo.name}"
    return build_once(dest, STT_DEMO_VERSION, lambda tmp: _build(tmp, persona_demo), "demo_stt")
