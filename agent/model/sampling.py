"""Token sampling with one random generator per call slot.

Each slot owns a `torch.Generator`, so a call's sampled output depends on its seed alone, not on
which other calls share the batch. Random draws follow the reference's order and shapes exactly
(per step: text noise `[1, topk_text]`, then depformer noise `[16, topk_audio]`: the reference
samples 16 depformer codebooks, 8 of which only predict the caller and are discarded), including
on prompt steps whose tokens are all forced. That keeps a seeded run identical to the reference's.
The sampler itself is moshi's: softmax with temperature, top-k, then an exponential-race draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agent.model.sampling_params import SamplingParams

__all__ = ["REFERENCE_DEP_Q", "SamplingParams", "StepNoise", "draw_noise", "noise_per_step", "sample_rows"]

#: Depformer codebooks the reference samples per step (agent 8 + caller 8); we draw its noise
#: for all of them to keep the random stream aligned, but compute only the agent's 8.
REFERENCE_DEP_Q = 16


@dataclass
class StepNoise:
    """Random draws of one slot for one model step."""

    text: torch.Tensor | None  # [1, k_text]
    audio: torch.Tensor | None  # [16, k_audio]


def _topks(params: SamplingParams, text_card: int, audio_card: int) -> tuple[int | None, int | None]:
    """Noise widths per step (text, audio); None where that stream is not sampled."""
    if params.greedy:
        return None, None
    kt = (min(params.topk_text, text_card) if params.topk_text > 0 else text_card) if params.temp_text > 0 else None
    ka = (min(params.topk_audio, audio_card) if params.topk_audio > 0 else audio_card) \
        if params.temp_audio > 0 else None
    return kt, ka


def noise_per_step(params: SamplingParams, text_card: int, audio_card: int) -> int:
    """Random numbers one slot draws per step (to skip the prompt steps a snapshot replaces)."""
    kt, ka = _topks(params, text_card, audio_card)
    return (kt or 0) + REFERENCE_DEP_Q * (ka or 0)


def draw_noise(gen: torch.Generator | None, params: SamplingParams, text_card: int, audio_card: int,
               device: torch.device) -> StepNoise:
    """One step's noise for one slot, in the reference's order and shapes."""
    kt, ka = _topks(params, text_card, audio_card)
    if gen is None:
        return StepNoise(None, None)
    text = torch.empty(1, kt, device=device).exponential_(1, generator=gen) if kt else None
    audio = torch.empty(REFERENCE_DEP_Q, ka, device=device).exponential_(1, generator=gen) if ka else None
    return StepNoise(text, audio)


def sample_rows(logits: torch.Tensor, rows: list[int], temps: list[float], topks: list[int],
                noises: list[torch.Tensor | None]) -> torch.Tensor:
    """Sample one token per row of `logits` [B, V]; rows not in `rows` get argmax.

    `noises[i]` is the row's exponential noise `[k]` (None: greedy). Rows sharing temperature
    and top-k are computed together.
    """
    logits = logits.float()
    out = logits.argmax(dim=-1)
    groups: dict[tuple[float, int], list[int]] = {}
    for i, r in enumerate(rows):
        if noises[i] is None or temps[i] <= 0:
            continue
        groups.setdefault((temps[i], topks[i]), []).append(i)
    for (temp, k), members in groups.items():
        idx = torch.tensor([rows[i] for i in members], device=logits.device)
        probs = torch.softmax(logits[idx] / temp, dim=-1)
        if k > 0:  # as moshi: top-k even when k covers the vocabulary (sorts the candidates)
            probs, indices = torch.topk(probs, min(k, probs.shape[-1]), dim=-1)
        else:
            indices = None
        q = torch.stack([noises[i] for i in members])
        choice = (probs / q).argmax(dim=-1, keepdim=True)
        tok = indices.gather(-1, choice)[:, 0] if indices is not None else choice[:, 0]
        out[idx] = tok
    return out
