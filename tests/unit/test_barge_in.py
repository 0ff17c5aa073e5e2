"""Barge-in decisions (no model): speech over a speaking agent, echo guard, short blips."""

from __future__ import annotations

import numpy as np

from agent.barge_in.detector import BargeInConfig, BargeInDetector


def test_barge_in_detector_logic():
    cfg = BargeInConfig(min_speech_ms=160, agent_guard_ms=300)
    loud, quiet = np.full(1920, 0.2, np.float32), np.zeros(1920, np.float32)
    d = BargeInDetector(cfg)
    # caller speaks while the agent is silent: plain turn-taking
    assert [d.on_vad(0.9, 0.1 + 0.032 * i) for i in range(10)].count("barge_in") == 0
    d = BargeInDetector(cfg)
    d.on_agent_frame(loud, 0.0)
    # speech starting 100 ms into the agent's speech: echo guard
    verdicts = [d.on_vad(0.9, 0.1 + 0.032 * (i + 1)) for i in range(8)]
    assert verdicts.count("suppressed") == 1 and "barge_in" not in verdicts
    for i in range(5):
        d.on_vad(0.0, 0.5 + 0.032 * i)  # silence resets the segment
    d.on_agent_frame(loud, 1.0)
    verdicts = [d.on_vad(0.9, 1.0 + 0.032 * (i + 1)) for i in range(8)]
    assert verdicts.count("barge_in") == 1
    # too short a blip is ignored
    d2 = BargeInDetector(cfg)
    d2.on_agent_frame(loud, 0.0)
    assert [d2.on_vad(p, 1.0 + 0.032 * i) for i, p in enumerate([0.9, 0.9, 0.1, 0.0])] == [None] * 4
    # agent stops speaking after the release time
    d2.on_agent_frame(quiet, 2.0)
    assert not d2.agent_speaking


def test_an_agent_that_starts_talking_over_the_caller_yields():
    """The caller began while the agent was silent (turn-taking, nothing to do) and is still
    talking when the agent starts: that is no echo, the agent must yield."""
    cfg = BargeInConfig(min_speech_ms=160, agent_guard_ms=300)
    d = BargeInDetector(cfg)
    loud = np.full(1920, 0.2, np.float32)
    assert [d.on_vad(0.9, 0.032 * (i + 1)) for i in range(8)] == [None] * 8  # agent silent
    d.on_agent_frame(loud, 0.3)
    assert d.on_vad(0.9, 0.3 + 0.032) == "barge_in"
    # and echo: speech that starts just after the agent did is suppressed, once per segment
    e = BargeInDetector(cfg)
    e.on_agent_frame(loud, 1.0)
    verdicts = [e.on_vad(0.9, 1.06 + 0.032 * (i + 1)) for i in range(10)]
    assert verdicts.count("suppressed") == 1 and "barge_in" not in verdicts
