"""Stateful resampling of mono float32 audio.

Stateful on purpose: a call's audio arrives in packets, and resampling each packet on its own
clicks at every boundary. One resampler per stream keeps the filter's history across packets.

The rates a call moves between (8, 16, 24 and 48 kHz) are small ratios, and a packet is a few
hundred samples: there a polyphase FIR written as one matrix product per packet (`Polyphase`)
takes 5-16 us of interpreter time a packet where PyAV's libswresample took 22-30 us (frame
objects, Fraction time bases), and with 48 calls those wrappers held the interpreter lock for
a third of the media plane's time. Any other ratio (a 44.1 kHz file) goes through PyAV. The
filter is the one libswresample uses by default (a Kaiser-windowed sinc, beta 9, 32 taps per
phase at the lower rate, cutoff 0.97 of its Nyquist frequency): the same audio to within the
filter's ripple, and about the same delay (a millisecond or two).
"""

from __future__ import annotations

import functools
from math import gcd

import av
import numpy as np

MAX_FACTOR = 6  # up or down factor beyond which (after reduction) PyAV resamples
HALF_WIDTH = 16  # filter half-length in samples of the lower rate
KAISER_BETA = 9.0
CUTOFF = 0.97  # of the lower rate's Nyquist frequency


@functools.lru_cache(maxsize=None)
def polyphase_filter(up: int, down: int) -> np.ndarray:
    """The (window, up) filter matrix of `Polyphase`, made once per ratio (read-only, shared by
    every stream: each call, each VAD stream and each barge-in's fresh playout resampler)."""
    taps = 2 * HALF_WIDTH * max(down, up) // up  # input samples one output depends on
    n = taps * up  # the prototype low-pass, at the up-sampled rate
    fc = CUTOFF / (2 * max(up, down))  # cycles per up-sampled sample
    m = np.arange(n) - (n - 1) / 2
    h = 2 * fc * np.sinc(2 * fc * m) * np.kaiser(n, KAISER_BETA) * up
    # phase p of the filter, oldest input first: rev[p, k] = h[p + (taps - 1 - k) * up]
    rev = h[np.arange(up)[:, None] + (taps - 1 - np.arange(taps))[None, :] * up]
    g = np.zeros((taps + down - 1, up), np.float32)
    for q in range(up):  # output q of a block: up-sampled time q*down from the block's start
        offset, phase = divmod(q * down, up)
        g[offset:offset + taps, q] = rev[phase]
    g.setflags(write=False)
    return g


class Polyphase:
    """Rational-ratio resampling (up/down, both small) of one stream, a packet at a time.

    The output comes in blocks of `up` samples per `down` input samples; each block is one row
    of a product of the input's sliding windows (a strided view, no copy) with a (window, up)
    filter matrix. Input that does not yet fill a block waits for the next packet (under `down`
    samples), so a packet of a multiple of `down` samples gives exactly up/down as many out.
    """

    def __init__(self, up: int, down: int):
        self.up, self.down = up, down
        self._g = polyphase_filter(up, down)
        self.window = len(self._g)  # input samples one block of `up` outputs reads
        self._buf = np.zeros(self.window - down, np.float32)  # history (and a partial block) not yet used

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        buf = np.concatenate((self._buf, pcm))
        blocks = (len(buf) - self.window) // self.down + 1
        if blocks <= 0:
            self._buf = buf
            return np.zeros(0, np.float32)
        # the sliding windows, one row per block: a strided view (ndarray over the buffer: as_strided
        # costs ten times as much in interpreter time)
        windows = np.ndarray((blocks, self.window), np.float32, buf, 0, (4 * self.down, 4))
        out = windows.dot(self._g).reshape(-1)  # (dot, not @: matmul copies the overlapping rows first)
        self._buf = buf[blocks * self.down:]
        return out


class Resampler:
    """Mono float32 from `in_rate` to `out_rate`, packet after packet of one stream."""

    def __init__(self, in_rate: int, out_rate: int):
        self.in_rate, self.out_rate = in_rate, out_rate
        g = gcd(in_rate, out_rate)
        up, down = out_rate // g, in_rate // g
        self._poly: Polyphase | None = None
        self._av: av.AudioResampler | None = None
        if in_rate == out_rate:
            pass
        elif max(up, down) <= MAX_FACTOR:
            self._poly = Polyphase(up, down)
        else:
            self._av = av.AudioResampler(format="flt", layout="mono", rate=out_rate)

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        pcm = np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1)
        if self._poly is not None:
            return self._poly(pcm)
        if self._av is None or len(pcm) == 0:
            return pcm
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="flt", layout="mono")
        frame.sample_rate = self.in_rate
        out = [f.to_ndarray().reshape(-1) for f in self._av.resample(frame)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
