"""Stateful resampling of mono float32 audio (PyAV / libswresample).

Stateful on purpose: a call's audio arrives in packets, and resampling each packet on its own
clicks at every boundary. One resampler per stream keeps the filter's history across packets.
"""

from __future__ import annotations

import av
import numpy as np


class Resampler:
    """Mono float32 from `in_rate` to `out_rate`, packet after packet of one stream."""

    def __init__(self, in_rate: int, out_rate: int):
        self.in_rate, self.out_rate = in_rate, out_rate
        self._r = None if in_rate == out_rate else av.AudioResampler(format="flt", layout="mono", rate=out_rate)

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        pcm = np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1)
        if self._r is None or len(pcm) == 0:
            return pcm
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="flt", layout="mono")
        frame.sample_rate = self.in_rate
        out = [f.to_ndarray().reshape(-1) for f in self._r.resample(frame)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
