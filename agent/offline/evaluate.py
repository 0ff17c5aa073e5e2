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
from agent.model.engine import Engine, SlotOutput, text_label
from agent.model.loader import LoadedModel
from agent.model.sampling import SamplingParams

log = structlog.get_logger(__name__)


@dataclass
class OfflineResult:
    pcm: np.ndarray  # agent audio, input duration, 24 kHz
    tokens: np.ndarray  # [frames, 17]
    text: list[str]  # one label per frame, as the upstream JSON
    reprimes: int = 0  # model state rebuilds past the context (`context_policy: reprime`)


CONTEXT_POLICIES = ("reprime", "slide", "hangup")


def run_offline(model: LoadedModel, input_audio: np.ndarray, voice: str, text_prompt: str,
                sampling: SamplingParams, seed: int | None = None, progress: bool = False,
                allow_voice_paths: bool = True, context_policy: str = "reprime",
                reprime_keep_s: float | None = None) -> OfflineResult:
    """`context_policy` past the model's context: `reprime` rebuilds the model state from the
    prompt and the latest frames (as live calls do, `agent.calls.reprime`, with no time limit per
    rebuild), `slide` lets the prompt fall out, `hangup` ends the agent's turn there (silence
    and PAD for the rest of the input)."""
    if context_policy not in CONTEXT_POLICIES:
        raise ValueError(f"context_policy must be one of {', '.join(CONTEXT_POLICIES)}")
    from agent.calls.reprime import ReprimeConfig, ReprimeLane

    with Engine(model, max_slots=1, default_sampling=sampling) as engine:
        F = engine.frame_size
        total = len(input_audio)
        n = max(1, -(-total // F))
        padded = np.zeros(n * F, dtype=np.float32)
        padded[:total] = input_audio
        start = engine.prepare(engine.schedule(voice, text_prompt, allow_voice_paths=allow_voice_paths),
                               seed=seed)
        run = engine.prefill([(0, start)])
        run.advance()
        run.install()
        lane = None
        if context_policy == "reprime":
            lane = ReprimeLane(engine, ReprimeConfig.from_seconds(model.context, reprime_keep_s))
            lane.track(0, start.plan)
        frames = [engine.run_prompt(0)]
        for i in tqdm(range(n - 1), disable=not progress, desc="frames", unit="frame"):
            if context_policy == "hangup" and engine.position(0) >= model.context - 1:
                frames.extend(_silence(engine, frames[-1]) for _ in range(n - 1 - i))
                break
            caller = padded[i * F:(i + 1) * F]
            out = engine.step({0: caller})[0]
            frames.append(out)
            if lane is not None:
                lane.observe(0, out, caller)
                lane.run(None)
        reprimes = lane.reprimes if lane is not None else 0
    pcm = np.concatenate([f.pcm for f in frames])[:total]
    tok = model.text_tokenizer
    log.info("offline_context", policy=context_policy, reprimes=reprimes)
    return OfflineResult(pcm=pcm, tokens=np.stack([f.tokens for f in frames]),
                         text=[text_label(tok, f.text_token) for f in frames], reprimes=reprimes)


def _silence(engine: Engine, last: SlotOutput) -> SlotOutput:
    """What `hangup` writes after the context is full: silence, text PAD, no tokens."""
    from agent.model.prompt import TEXT_PAD

    return SlotOutput(pcm=np.zeros(engine.frame_size, np.float32), text_token=TEXT_PAD, text=None,
                    tokens=np.full_like(last.tokens, -1), first=False)


def offline_files(model: LoadedModel, input_wav: Path, output_wav: Path, output_text: Path | None,
                  voice: str, text_prompt: str, sampling: SamplingParams, seed: int | None,
                  tokens_out: Path | None = None, progress: bool = True, context_policy: str = "reprime",
                  reprime_keep_s: float | None = None) -> OfflineResult:
    audio = read_audio(input_wav, model.sample_rate)
    res = run_offline(model, audio, voice, text_prompt, sampling, seed, progress=progress,
                      context_policy=context_policy, reprime_keep_s=reprime_keep_s)
    write_wav(output_wav, res.pcm, model.sample_rate)
    if output_text is not None:
        output_text.parent.mkdir(parents=True, exist_ok=True)
        output_text.write_text(json.dumps(res.text, ensure_ascii=False))
    if tokens_out is not None:
        np.save(tokens_out, res.tokens)
    log.info("offline_done", frames=len(res.tokens), output_wav=str(output_wav))
    return res
