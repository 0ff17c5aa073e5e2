"""The model's clock and token layout: the one place these numbers live.

PersonaPlex (like Moshi) runs Mimi at 24 kHz and the language model at 12.5 Hz: one 80 ms frame
of 1920 samples per model step. Each step's token column holds 17 streams: the text token, the
agent's 8 audio codebooks and the caller's 8.
"""

from __future__ import annotations

SAMPLE_RATE = 24000  # Hz, Mimi's rate: every session speaks this
FRAME = 1920  # samples per model frame
FRAME_S = FRAME / SAMPLE_RATE  # 0.08 s
FRAME_MS = 80
FRAME_RATE = SAMPLE_RATE / FRAME  # 12.5 Hz

AUDIO_CODEBOOKS = 8
NUM_STREAMS = 1 + 2 * AUDIO_CODEBOOKS  # 17
TEXT = 0
AGENT = slice(1, 1 + AUDIO_CODEBOOKS)  # 1..8
CALLER = slice(1 + AUDIO_CODEBOOKS, NUM_STREAMS)  # 9..16


def frames_for(seconds: float) -> int:
    """Model frames in `seconds` (rounded down)."""
    return int(seconds * FRAME_RATE)


def ms_to_samples(ms: float) -> int:
    return int(round(ms * SAMPLE_RATE / 1000))
