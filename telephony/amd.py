"""Answering-machine detection: is the callee who answered a person or a recorded greeting?

A person answers with a short word ("Hello?", "Yes?") and waits; a voicemail greeting talks on
for seconds ("Hi, you've reached ... please leave a message after the tone"). From the callee's
audio after the 200 OK (its own sample count is the clock, so the verdict does not depend on
thread timing): speech is 20 ms windows louder than `speech_dbfs` and than the quietest window
so far (the line's noise floor) by `noise_margin_db`; the first utterance runs
from the first speech window until a pause of `pause_s`. Longer than `machine_s`: `machine` (said
as soon as it is that long); ended shorter: `human`; no speech within `window_s`, or an utterance
still undecided when the window closes: `unknown`.

Words, when the caller transcript is on (`hear`): a phrase only recorded greetings say ("leave a
message", "after the tone", "not available") in the callee's words decides `machine` while the
audio has not decided yet. The transcript runs about 0.5 s behind the audio, so words help with
a greeting whose first sentence is long and slow, not with one that pauses early (by then the
pause has said `human`, and a verdict is final).
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

import numpy as np


class Verdict(str, enum.Enum):
    HUMAN = "human"
    MACHINE = "machine"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class AmdSettings:
    window_s: float = 5.0  # audio after the answer the verdict is taken from, at most
    machine_s: float = 2.0  # a first utterance this long is a greeting
    pause_s: float = 0.6  # silence that ends an utterance (pauses between a greeting's sentences are shorter)
    speech_dbfs: float = -40.0  # a 20 ms window louder than this is speech ...
    noise_margin_db: float = 10.0  # ... and than the line's noise floor by this much
    max_floor_dbfs: float = -34.0  # the noise floor counts up to this (a louder "floor" is a talker)


WINDOW_S = 0.02

#: what recorded greetings say and people answering a call do not (lower case, whole words)
GREETING_PHRASES = ("leave a message", "leave your message", "leave me a message", "after the tone",
                    "after the beep", "at the tone", "not available", "unable to take your call",
                    "can't take your call", "cannot take your call", "can't come to the phone",
                    "record your message", "voice mail", "voicemail box", "reached the voicemail",
                    "get back to you")


class MachineDetector:
    """Fed the callee's audio (any thread, one at a time); `verdict` is None until decided."""

    def __init__(self, rate: int, settings: AmdSettings = AmdSettings()):
        self.s = settings
        self.rate = rate
        self._win = max(1, int(rate * WINDOW_S))
        self._threshold = 10 ** (settings.speech_dbfs / 20)
        self._margin = 10 ** (settings.noise_margin_db / 20)
        self._max_floor = 10 ** (settings.max_floor_dbfs / 20)
        self._floor = math.inf  # the quietest window's RMS so far
        self._pending = np.zeros(0, dtype=np.float32)
        self._t = 0.0  # seconds of audio seen (window starts)
        self._speech_start: float | None = None
        self._last_speech: float | None = None
        self.verdict: Verdict | None = None
        self.decided_at: float | None = None  # seconds of callee audio the verdict took
        self.by_words = False  # the verdict came from a greeting's phrase
        self._words = ""  # the callee's words so far (the last few hundred characters)

    def feed(self, pcm: np.ndarray) -> Verdict | None:
        """Float samples at `rate`; returns the verdict once there is one (then ignores audio)."""
        if self.verdict is not None:
            return self.verdict
        buf = np.concatenate([self._pending, np.asarray(pcm, dtype=np.float32).reshape(-1)])
        n = len(buf) // self._win
        self._pending = buf[n * self._win:]
        for w in buf[: n * self._win].reshape(n, self._win) if n else ():
            rms = math.sqrt(float(np.dot(w, w)) / len(w))
            self._floor = min(self._floor, rms)
            self._window(rms > max(self._threshold, min(self._floor, self._max_floor) * self._margin))
            if self.verdict is not None:
                break
        return self.verdict

    def hear(self, text: str) -> Verdict | None:
        """A piece of the callee's words (its leading space marks a new word); a greeting's
        phrase decides `machine` while undecided."""
        if self.verdict is not None:
            return self.verdict
        self._words = (self._words + text.lower())[-500:]
        said = " " + " ".join(re.sub(r"[^a-z']+", " ", self._words.replace("\u2019", "'")).split()) + " "
        if any(f" {p} " in said for p in GREETING_PHRASES):
            self.by_words = True
            self._decide(Verdict.MACHINE)
        return self.verdict

    def _window(self, speech: bool) -> None:
        s, t = self.s, self._t
        self._t += WINDOW_S
        if speech:
            if self._speech_start is None:
                self._speech_start = t
            self._last_speech = t + WINDOW_S
            if self._last_speech - self._speech_start >= s.machine_s:
                return self._decide(Verdict.MACHINE)
        elif self._last_speech is not None and self._t - self._last_speech >= s.pause_s:
            return self._decide(Verdict.HUMAN)
        if self._t >= s.window_s:
            self._decide(Verdict.UNKNOWN)

    def _decide(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.decided_at = round(self._t, 2)

    def close(self) -> Verdict:
        """The call ended (or the audio stopped) undecided: unknown."""
        if self.verdict is None:
            self._decide(Verdict.UNKNOWN)
        return self.verdict
