"""Reading and writing audio files for the offline CLI and tools (not the live path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.errors import BadInput


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Any file sphn can decode, any rate and channel count -> mono float32 at `sample_rate`."""
    import sphn

    p = Path(path)
    if not p.is_file():
        raise BadInput(f"input audio {p} does not exist")
    try:
        pcm, sr = sphn.read(str(p))
    except Exception as exc:
        raise BadInput(f"cannot read audio file {p}: {exc}") from exc
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim == 1:
        pcm = pcm[None]
    if pcm.size == 0 or pcm.shape[-1] == 0:
        raise BadInput(f"audio file {p} is empty")
    if pcm.shape[0] > 1:
        pcm = pcm.mean(axis=0, keepdims=True)
    if sr != sample_rate:
        # the resampler pads its tail; keep exactly the input's duration
        n_out = int(round(pcm.shape[-1] * sample_rate / sr))
        pcm = sphn.resample(pcm, src_sample_rate=sr, dst_sample_rate=sample_rate)[..., :n_out]
    return np.ascontiguousarray(pcm[0], dtype=np.float32)


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int) -> None:
    import sphn

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sphn.write_wav(str(path), np.asarray(pcm, dtype=np.float32), sample_rate)
