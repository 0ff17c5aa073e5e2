"""Turn a voice recording's Mimi codes into a `.pt` voice prompt (the reference's format).

Replaying stored input embeddings is how the stock voices work; recording them once for a
custom voice makes its calls start as cheaply as a stock voice's. The recording runs the voice
frames through the prompt phase and keeps what the transformer was fed at each step plus the
final token ring, exactly what `PromptSchedule` replays.
"""

from __future__ import annotations

from pathlib import Path

import torch

from agent.model.generator import TokenGenerator
from agent.model.prompt import build_schedule
from agent.model.sampling import SamplingParams
from agent.model.voices import VoicePrompt


@torch.no_grad()
def record_voice_prompt(lm: torch.nn.Module, codes: torch.Tensor, name: str = "custom") -> VoicePrompt:
    """codes [frames, 8] -> VoicePrompt with embeddings [frames-1, dim] and cache [17, 4]."""
    schedule = build_schedule(VoicePrompt(name=name, codes=codes), [], silence_frames=0)
    gen = TokenGenerator(lm, 1)
    fed: list[torch.Tensor] = []
    handle = lm.transformer.register_forward_pre_hook(lambda _m, args: fed.append(args[0][0, 0].float().cpu()))
    try:
        gen.start(0, schedule, SamplingParams(greedy=True))
        for _ in range(schedule.steps - 1):
            gen.step({})
        ring = gen.cache[0].cpu().clone()
    finally:
        handle.remove()
        gen.close()
    return VoicePrompt(name=name, embeddings=torch.stack(fed), cache=ring)


def save_voice_pt(voice: VoicePrompt, path: Path) -> None:
    assert voice.embeddings is not None and voice.cache is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"embeddings": voice.embeddings[:, None, None, :].contiguous(), "cache": voice.cache[None]}, tmp)
    tmp.replace(path)
