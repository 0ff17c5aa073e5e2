"""The built-in demo model: deterministic tiny random weights, tokenizer and voices.

Users without PersonaPlex weights (and CI) still get a working server: this module builds a
tiny model of the PersonaPlex architecture on first use, into a cache folder, always the same
bytes for the same version. It speaks noise, not words; it exercises every code path the 7B
model does (prompt phase, voices, batching, codec).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import structlog
import torch
from safetensors.torch import save_file

from agent.timebase import AUDIO_CODEBOOKS, FRAME, FRAME_RATE, SAMPLE_RATE
from agent.model.voices import STOCK_VOICES

log = structlog.get_logger(__name__)

DEMO_VERSION = "tiny-v1"
_SEED = 20260211

DEMO_ARCH = {
    "lm_kwargs": {
        "dim": 64, "text_card": 160, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8, "card": 2048,
        "num_heads": 4, "num_layers": 2, "hidden_scale": 4.125, "causal": True, "layer_scale": None,
        "context": 3000, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
        "positional_embedding": "rope", "depformer_dim": 64, "depformer_dim_feedforward": 264,
        "depformer_num_heads": 4, "depformer_num_layers": 2, "depformer_multi_linear": True,
        "depformer_context": 8, "depformer_max_period": 10000, "depformer_gating": "silu",
        "depformer_pos_emb": "none", "depformer_weights_per_step": True,
        "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
    },
    "mimi": {
        "seanet": {"channels": 1, "dimension": 32, "causal": True, "n_filters": 4, "n_residual_layers": 1,
                   "activation": "ELU", "compress": 2, "dilation_base": 2, "disable_norm_outer_blocks": 0,
                   "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 3, "norm": "none",
                   "pad_mode": "constant", "ratios": [8, 6, 5, 4], "true_skip": True},
        "quantizer": {"dimension": 16, "n_q": 32, "bins": 2048, "input_dimension": 32, "output_dimension": 32},
        "transformer": {"d_model": 32, "num_heads": 2, "num_layers": 1, "causal": True, "layer_scale": 0.01,
                        "context": 250, "conv_layout": True, "max_period": 10000, "gating": "none",
                        "norm": "layer_norm", "positional_embedding": "rope", "dim_feedforward": 64,
                        "input_dimension": 32, "output_dimensions": [32]},
        "sample_rate": SAMPLE_RATE, "frame_rate": FRAME_RATE, "num_codebooks": AUDIO_CODEBOOKS,
    },
}

# Text the demo tokenizer is trained on: the prompt styles PersonaPlex was trained with.
_CORPUS = """<system> You work for CitySan Services which is a waste management and your name is Ayelen Lucero. <system>
Information: Verify customer name Omar Torres. Current schedule: every other week. Upcoming pickup: April 12th.
Compost bin service available for $8/month add-on.
You work for Jerusalem Shakshuka which is a restaurant and your name is Owen Foster.
There are two shakshuka options: Classic (poached eggs, $9.50) and Spicy (scrambled eggs with jalapenos, $10.25).
Sides include warm pita ($2.50) and Israeli salad ($3). No combo offers. Available for drive-through until 9 PM.
You work for AeroRentals Pro which is a drone rental company and your name is Tomaz Novak.
PhoenixDrone X ($65/4 hours, $110/8 hours), and the premium SpectraDrone 9 ($95/4 hours, $160/8 hours).
Deposit required: $150 for standard models, $300 for premium.
You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way.
You enjoy having a good conversation. Have a casual discussion about eating at home versus dining out.
You are an astronaut on a Mars mission. Your name is Alex. Several ship systems are failing.
Hello, how can I help you today? Thank you for calling. Let me check that for you. Goodbye!
0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz .,:;!?'"-()/$%&+@#*=
"""


def default_cache_dir() -> Path:
    env = os.environ.get("PERSONAPLEX_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "personaplex-agent"


def _train_tokenizer(vocab_size: int) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    lines = [ln for ln in _CORPUS.splitlines() if ln.strip()] * 4
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, character_coverage=1.0,
        minloglevel=2, hard_vocab_limit=True, seed_sentencepiece_size=10000, shuffle_input_sentence=False)
    return buf.getvalue()


def _build_lm(kwargs: dict) -> torch.nn.Module:
    from moshi.models.lm import LMModel

    torch.manual_seed(_SEED)
    lm = LMModel(device="cpu", dtype=torch.float32, **kwargs)
    lm.eval()
    return lm


def _build_mimi(cfg: dict) -> torch.nn.Module:
    from moshi.models import loaders

    from agent.model.arch import _mimi_from_arch

    torch.manual_seed(_SEED + 1)
    mimi = loaders.get_mimi(None, _mimi_from_arch(cfg), device="cpu", num_codebooks=cfg["num_codebooks"])
    gen = torch.Generator().manual_seed(_SEED + 2)
    for name, buf in mimi.named_buffers():
        if name.endswith("_codebook.embedding_sum"):
            buf.copy_(torch.randn(buf.shape, generator=gen))
        elif name.endswith("_codebook.cluster_usage"):
            buf.fill_(1.0)
        elif name.endswith("_codebook._initialized"):
            buf.fill_(1.0)
    mimi.eval()
    return mimi


def _voice_audio(index: int, seconds: float = 2.0, sr: int = SAMPLE_RATE) -> np.ndarray:
    """A distinct synthetic 'voice' per stock name: a glottal-ish pulse train with vibrato."""
    rng = np.random.default_rng(_SEED + 100 + index)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 95.0 + 12.0 * index
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))) / sr
    sig = sum(np.sin(k * phase) / k for k in range(1, 8))
    sig = sig * (0.6 + 0.4 * np.sin(2 * np.pi * 2.5 * t) ** 2) + 0.02 * rng.standard_normal(len(t))
    return (0.2 * sig / np.abs(sig).max()).astype(np.float32)


def _encode(mimi: torch.nn.Module, pcm: np.ndarray, frame: int = FRAME) -> torch.Tensor:
    n = len(pcm) // frame
    out = []
    with torch.no_grad(), mimi.streaming(1):
        for i in range(n):
            x = torch.from_numpy(pcm[i * frame:(i + 1) * frame]).view(1, 1, -1)
            out.append(mimi.encode(x)[0, :, 0])
    return torch.stack(out).long()


def _build(dest: Path) -> None:
    from agent.model.voice_record import record_voice_prompt, save_voice_pt

    (dest / "voices").mkdir()
    arch = json.loads(json.dumps(DEMO_ARCH))
    (dest / "personaplex_arch.json").write_text(json.dumps(arch, indent=1))
    (dest / "tokenizer_spm_32k_3.model").write_bytes(_train_tokenizer(arch["lm_kwargs"]["text_card"]))
    lm = _build_lm(arch["lm_kwargs"])
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(dest / "model.safetensors"))
    mimi = _build_mimi(arch["mimi"])
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()},
              str(dest / "tokenizer-e351c8d8-checkpoint125.safetensors"))
    for i, name in enumerate(STOCK_VOICES):
        codes = _encode(mimi, _voice_audio(i))
        save_voice_pt(record_voice_prompt(lm, codes, name), dest / "voices" / f"{name}.pt")
    (dest / "README.txt").write_text(
        f"PersonaPlex agent demo model {DEMO_VERSION}: deterministic tiny random weights made by "
        "agent/demo_model.py. Not a speech model; delete this folder to rebuild it.\n")


def build_once(dest: Path, version: str, build, what: str) -> Path:
    """`dest`, made by `build(tmp)` once: under a lock (several test workers or servers may ask at
    the same time), into a temporary folder renamed into place when complete, so a build killed
    half-way is never taken for a model. Random weights come from torch's generator, forked so
    the caller's stream is untouched. `what` names the log events (`<what>_building`, `_ready`)."""
    if (dest / ".complete").exists():
        return dest
    root = dest.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / ".complete").exists():
            return dest
        log.info(f"{what}_building", path=str(dest))
        tmp = root / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with torch.random.fork_rng(devices=[]):
            build(tmp)
        (tmp / ".complete").write_text(version)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        log.info(f"{what}_ready", path=str(dest))
    return dest


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    """Path of the demo model, building it (once, under a lock, atomically) if needed."""
    root = cache_dir or default_cache_dir()
    return build_once(root / f"demo-{DEMO_VERSION}", DEMO_VERSION, _build, "demo_model")
