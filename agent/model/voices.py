"""Voice prompts: the stock PersonaPlex voices (`.pt`) and custom voices (`.pt` or a wav).

A `.pt` voice holds per-step input embeddings recorded while the model listened to the voice,
plus the token cache at the end; replaying them is much cheaper than re-encoding audio. Voice
files are pickles, so they are loaded with `weights_only=True`, and a client-supplied voice name
is only ever matched against the names on disk, never joined into a path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agent.errors import BadInput, VoiceNotFound
from agent.model.voice_names import STOCK_VOICES

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
VOICE_LUFS = -24.0


@dataclass(frozen=True)
class VoicePrompt:
    """What the prompt phase replays for a voice: embeddings+cache, or Mimi codes of a wav."""

    name: str
    embeddings: torch.Tensor | None = None  # [steps, dim] float32
    cache: torch.Tensor | None = None  # [17, ring] int64, the reference's token cache layout
    codes: torch.Tensor | None = None  # [frames, 8] int64 (custom wav voices)

    @property
    def steps(self) -> int:
        if self.embeddings is not None:
            return int(self.embeddings.shape[0])
        assert self.codes is not None
        return int(self.codes.shape[0])

    @property
    def prompt_steps(self) -> int:
        """Model steps the voice takes in the prompt phase (the reference spends one more step
        before replaying embeddings)."""
        return self.steps + 1 if self.embeddings is not None else self.steps


def available_voices(voices_dir: Path | None) -> list[str]:
    names = set()
    if voices_dir is not None and voices_dir.is_dir():
        names.update(p.stem for p in voices_dir.glob("*.pt") if _NAME_RE.match(p.stem))
    return sorted(names)


def normalize_voice_name(name: str) -> str:
    base = name[:-3] if name.endswith(".pt") else name
    if not _NAME_RE.match(base):
        raise VoiceNotFound(f"voice {name!r} is not a valid voice name (letters, digits, '-' and '_').")
    return base


def resolve_voice(spec: str, voices_dir: Path | None, allow_paths: bool = False) -> Path:
    """Map a voice spec to a file. Names are looked up among the files present; paths (a custom
    `.pt` or wav) are only accepted from trusted configuration (`allow_paths`)."""
    if allow_paths and ("/" in spec or spec.endswith(".wav")):
        path = Path(spec).expanduser()
        if path.suffix not in (".pt", ".wav"):
            raise BadInput(f"custom voice {spec}: must be a .pt voice file or a .wav recording")
        if not path.is_file():
            raise VoiceNotFound(f"custom voice file {spec} does not exist")
        return path
    base = normalize_voice_name(spec)
    present = {p: voices_dir / f"{p}.pt" for p in available_voices(voices_dir)} if voices_dir else {}
    if base not in present:
        listed = ", ".join(sorted(present)) or "none installed"
        raise VoiceNotFound(f"unknown voice {spec!r}; available voices: {listed}")
    return present[base]


def load_voice_pt(path: Path) -> VoicePrompt:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        emb = state["embeddings"]
        cache = state["cache"]
    except Exception as exc:
        raise BadInput(f"voice file {path} is not a PersonaPlex voice prompt ({exc})") from exc
    if emb.dim() != 4 or emb.shape[1:3] != (1, 1) or cache.dim() != 3 or cache.shape[0] != 1:
        raise BadInput(f"voice file {path}: unexpected shapes embeddings={tuple(emb.shape)} "
                       f"cache={tuple(cache.shape)}")
    return VoicePrompt(name=path.stem, embeddings=emb[:, 0, 0].float().contiguous(),
                       cache=cache[0].long().contiguous())


def normalize_loudness(pcm: np.ndarray, sample_rate: int, target_lufs: float = VOICE_LUFS) -> np.ndarray:
    import pyloudnorm

    meter = pyloudnorm.Meter(sample_rate)
    loudness = meter.integrated_loudness(pcm.astype(np.float64))
    if not np.isfinite(loudness):
        raise BadInput("voice recording is silent; cannot normalise it")
    return pyloudnorm.normalize.loudness(pcm.astype(np.float64), loudness, target_lufs).astype(np.float32)


def encode_voice_wav(path: Path, mimi_factory, sample_rate: int, frame_size: int) -> VoicePrompt:
    """Normalise a custom voice recording to -24 LUFS and Mimi-encode it one frame at a time,
    as the reference does (frame-by-frame streaming, last frame zero-padded)."""
    from agent.audio_io import read_audio

    pcm = normalize_loudness(read_audio(path, sample_rate), sample_rate)
    n = -(-len(pcm) // frame_size)
    pcm = np.pad(pcm, (0, n * frame_size - len(pcm)))
    mimi = mimi_factory()
    codes = []
    with torch.no_grad(), mimi.streaming(1):
        dev = next(mimi.parameters()).device
        for i in range(n):
            frame = torch.from_numpy(pcm[i * frame_size:(i + 1) * frame_size]).to(dev).view(1, 1, -1)
            codes.append(mimi.encode(frame)[0, :, 0].cpu())
    return VoicePrompt(name=path.stem, codes=torch.stack(codes).long())
