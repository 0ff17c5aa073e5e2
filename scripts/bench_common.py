"""Helpers shared by the benchmark scripts (not part of the product)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden" / "personaplex-tiny"


def tiny_model(device: str = "cpu"):
    """The golden tiny model when present (same as the tests), else the built-in demo model."""
    from agent.model.demo import demo_model_dir
    from agent.model.files import local_model_files
    from agent.model.loader import load_model

    src = GOLDEN if (GOLDEN / "model.safetensors").exists() else demo_model_dir()
    return load_model(local_model_files(src), device=device), src


class _IdTokenizer:
    """Stands in for the 7B tokenizer in the random-weight benchmark: pieces are just ids."""

    def id_to_piece(self, i: int) -> str:
        return f"<{i}>"

    def encode(self, text: str) -> list[int]:
        return [4 + (ord(c) % 100) for c in text]


def random_7b(device: str):
    """The PersonaPlex 7B architecture with random weights (no download) on `device`."""
    from agent.model.arch import AUDIO_CODEBOOKS, default_7b
    from agent.model.files import ModelFiles
    from agent.model.loader import LoadedModel
    from moshi.models import loaders
    from moshi.models.lm import LMModel

    arch = default_7b()
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    kw = dict(arch.lm_kwargs)
    kw["dep_q"] = AUDIO_CODEBOOKS
    lm = LMModel(device=dev, dtype=dtype, **kw).eval()
    mimi = loaders.get_mimi(None, arch.mimi_config, device=dev).eval()
    files = ModelFiles(root=None, lm=Path("-"), mimi=Path("-"), text_tokenizer=Path("-"), voices_dir=Path("-"),
                       source="random-7b")
    return LoadedModel(lm=lm, mimi=mimi, text_tokenizer=_IdTokenizer(), arch=arch, files=files, device=dev,
                       dtype=dtype)


def synthetic_schedule(model, n_text: int = 60, voice_frames: int = 20):
    from agent.model.prompt import build_schedule
    from agent.model.voices import VoicePrompt

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2048, (voice_frames, 8), generator=g)
    text = torch.randint(4, int(model.lm.text_card), (n_text,), generator=g).tolist()
    return build_schedule(VoicePrompt(name="synthetic", codes=codes), text)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def p99_ms(samples: list[float]) -> float:
    s = sorted(samples)
    return 1000 * s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def speech_frames(n: int, seed: int = 0, frame: int = 1920) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(n * frame) / 24000
    x = 0.2 * np.sin(2 * np.pi * (140 + 40 * seed % 100) * t) * (np.sin(2 * np.pi * 1.3 * t) > 0)
    x = (x + 0.02 * rng.standard_normal(len(t))).astype(np.float32)
    return [x[i * frame:(i + 1) * frame] for i in range(n)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0

