"""Offline wav-to-wav evaluation (the upstream `moshi.offline` equivalent).

Output layout matches the PersonaPlex reference: frame 0 is the last prompt step's (forced)
frame, frame i>0 is the model's frame after hearing input frames 0..i-1; the output wav has the
input's duration and `--tokens-out` holds those frames' tokens [input frames, 17].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
from tqdm.auto import tqdm

from agent.audio_io import read_audio, write_wav
from agent.engine import Engine, text_label
from agent.model_loader import LoadedModel
from agent.sampling import SamplingParams

log = structlog.get_logger(__name__)


@dataclass
class OfflineResult:
    pcm: np.ndarray  # agent audio, input duration, 24 kHz
    tokens: np.ndarray  # [frames, 17]
    text: list[str]  # one label per frame, as the upstream JSON


def run_offline(model: LoadedModel, input_audio: np.ndarray, voice: str, text_prompt: str,
                sampling: SamplingParams, seed: int | None = None, progress: bool = False,
                allow_voice_paths: bool = True) -> OfflineResult:
    with Engine(model, max_slots=1, default_sampling=sampling) as engine:
        F = engine.frame_size
        total = len(input_audio)
        n = max(1, -(-total // F))
        padded = np.zeros(n * F, dtype=np.float32)
        padded[:total] = input_audio
        engine.start(0, engine.schedule(voice, text_prompt, allow_voice_paths=allow_voice_paths), seed=seed)
        frames = [engine.run_prompt(0)]
        for i in tqdm(range(n - 1), disable=not progress, desc="frames", unit="frame"):
            frames.append(engine.step({0: padded[i * F:(i + 1) * F]})[0])
    pcm = np.concatenate([f.pcm for f in frames])[:total]
    tok = model.text_tokenizer
    return OfflineResult(pcm=pcm, tokens=np.stack([f.tokens for f in frames]),
                         text=[text_label(tok, f.text_token) for f in frames])


def offline_files(model: LoadedModel, input_wav: Path, output_wav: Path, output_text: Path | None,
                  voice: str, text_prompt: str, sampling: SamplingParams, seed: int | None,
                  tokens_out: Path | None = None, progress: bool = True) -> OfflineResult:
    audio = read_audio(input_wav, model.sample_rate)
    res = run_offline(model, audio, voice, text_prompt, sampling, seed, progress=progress)
    write_wav(output_wav, res.pcm, model.sample_rate)
    if output_text is not None:
        output_text.parent.mkdir(parents=True, exist_ok=True)
        output_text.write_text(json.dumps(res.text, ensure_ascii=False))
    if tokens_out is not None:
        np.save(tokens_out, res.tokens)
    log.info("offline_done", frames=len(res.tokens), output_wav=str(output_wav))
    return res
