"""The PersonaPlex prompt phase as data: which tokens are forced at which model step.

Before a conversation the model is conditioned, one step per 80 ms frame, on: the voice prompt,
`silence_frames` of silence, the system text prompt one token per frame, and silence again.
Every stream is forced meanwhile: text to PAD (3) unless a prompt token is due, agent audio to
the Mimi codes of silence, caller audio to the codes of a 440 Hz sine.

Column numbering follows the reference implementation: column `t` holds, for a stream of delay
`d`, the token of frame `t - d`; `items[t]` is what the reference forces at its step `t`
(written at column `t + d`). Column 0 is the initial token everywhere, so `items[0]` is never
used (the reference's first step writes it and then overwrites it with the initial tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.timebase import AGENT, CALLER, NUM_STREAMS, TEXT

if TYPE_CHECKING:  # torch only where a schedule is built: prompt text rules stay light to import
    import torch

    from agent.model.voices import VoicePrompt

SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
TEXT_PAD = 3
SILENCE_FRAMES = 6


def wrap_system_prompt(text: str) -> str:
    return f"<system> {text.strip()} <system>"


def tokenize_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of the wrapped system prompt (empty prompt -> no tokens)."""
    if not text or not text.strip():
        return []
    return list(tokenizer.encode(wrap_system_prompt(text)))


@dataclass(frozen=True)
class PromptSchedule:
    """Everything a slot's prompt phase forces; its result depends on nothing else."""

    items: torch.Tensor  # [steps, 17] int64; items[0] unused
    embeddings: torch.Tensor | None  # [E, dim]: steps 0..E-1 feed these instead of token columns
    restore_cache: torch.Tensor | None  # [17, ring]: token ring restored after the embeddings
    text_tokens: tuple[int, ...]
    voice: str

    @property
    def steps(self) -> int:
        """Model steps the prompt phase takes; the last one emits the call's first frame."""
        return int(self.items.shape[0])

    @property
    def num_embeddings(self) -> int:
        return 0 if self.embeddings is None else int(self.embeddings.shape[0])


def build_schedule(voice: VoicePrompt, text_tokens: list[int],
                   silence_frames: int = SILENCE_FRAMES) -> PromptSchedule:
    """The forced columns of the whole prompt phase, built as one tensor (this runs for every
    call: per-call prompts make each schedule new)."""
    import torch

    # Reference: with embeddings, step 0 is a no-op and steps 1..E replay them; their forced
    # tokens are overwritten by restoring the recorded cache, so placeholders (silence) do.
    n_voice = voice.prompt_steps
    text_at = n_voice + silence_frames
    steps = text_at + len(text_tokens) + silence_frames
    items = torch.empty(steps, NUM_STREAMS, dtype=torch.long)
    items[:, TEXT] = TEXT_PAD
    items[:, AGENT] = torch.tensor(SILENCE_TOKENS, dtype=torch.long)
    items[:, CALLER] = torch.tensor(SINE_TOKENS, dtype=torch.long)
    if voice.embeddings is None:
        assert voice.codes is not None
        items[: voice.steps, AGENT] = voice.codes.to(torch.long)
    if text_tokens:
        items[text_at: text_at + len(text_tokens), TEXT] = torch.tensor(text_tokens, dtype=torch.long)
    return PromptSchedule(items=items, embeddings=voice.embeddings,
                          restore_cache=voice.cache, text_tokens=tuple(text_tokens), voice=voice.name)
