"""Barge-in: noticing that the caller talks over the agent, without being fooled by echo.

Caller speech is detected with Silero VAD (16 kHz, 32 ms chunks, `agent.barge_in.vad`). A barge-in is
declared when the caller has spoken for `min_speech_ms` while the agent is speaking, unless that
speech began less than `agent_guard_ms` after the agent started speaking (a phone line's echo of
the agent's own voice arrives then); such speech is counted as suppressed. Speech that began
before the agent started (the caller had the floor) is never taken for echo.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class BargeInConfig(BaseModel):
    """The detector's settings: their one model, defaults and bounds (the server's `barge_in:`
    config section is this model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    vad_threshold: float = Field(0.5, gt=0, lt=1)
    min_speech_ms: int = Field(160, ge=0, le=5000)
    agent_guard_ms: int = Field(300, ge=0, le=5000)
    agent_active_dbfs: float = Field(-42.0, le=0)  # agent frames louder than this count as "speaking"
    agent_release_ms: int = Field(240, ge=0, le=5000)  # agent counts as silent after this long below the threshold


class BargeInDetector:
    """Pure decision logic (no model), fed with VAD probabilities and agent frame levels."""

    def __init__(self, cfg: BargeInConfig):
        self.cfg = cfg
        self.speech_ms = 0.0
        self.fired = False  # one decision per caller speech segment
        self.agent_speaking = False
        self.agent_start_t = -1e9
        self.agent_last_loud_t = -1e9

    def on_agent_frame(self, pcm: np.ndarray, t: float) -> None:
        rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if len(pcm) else 0.0
        loud = rms > 10 ** (self.cfg.agent_active_dbfs / 20)
        if loud:
            if not self.agent_speaking:
                self.agent_speaking = True
                self.agent_start_t = t
            self.agent_last_loud_t = t
        elif self.agent_speaking and (t - self.agent_last_loud_t) * 1000 > self.cfg.agent_release_ms:
            self.agent_speaking = False

    def on_vad(self, prob: float, t: float, chunk_ms: float = 32.0) -> str | None:
        """Returns "barge_in", "suppressed" or None for one VAD chunk ending at time t."""
        if prob >= self.cfg.vad_threshold:
            self.speech_ms += chunk_ms
        elif prob < self.cfg.vad_threshold - 0.15:
            self.speech_ms = 0.0
            self.fired = False
        if self.fired or self.speech_ms < self.cfg.min_speech_ms or not self.cfg.enabled:
            return None
        if not self.agent_speaking:
            # ordinary turn-taking, nothing to interrupt; decided again while this speech lasts,
            # so an agent that starts (or resumes) talking over the caller still yields
            return None
        self.fired = True
        speech_start = t - self.speech_ms / 1000
        if 0 <= (speech_start - self.agent_start_t) * 1000 < self.cfg.agent_guard_ms:
            return "suppressed"  # began just after the agent did: its echo on the line
        return "barge_in"
