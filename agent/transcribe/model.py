"""Build a Kyutai STT model with moshi's own loader, checked against the engine's Mimi.

The LM, its text tokenizer and its `stt_config` come from `moshi.models.loaders.CheckpointInfo`
on the local files (`agent.transcribe.files` fetched them), so the model is moshi's `LMModel` as
Kyutai's scripts build it. What is ours:
- the Mimi check: the transcriber reads the codes of the engine's one Mimi encode, which is only
  right if the STT was trained on the same Mimi. Its Mimi checkpoint is compared tensor by
  tensor with the engine's loaded Mimi; any difference refuses the STT (`ModelUnavailable`).
- extra heads found in the weights (the semantic VAD) are built even when the config does not
  declare them: Kyutai's `-candle` repository ships the same LM plus these heads.
- bfloat16 on CUDA, float32 on CPU, like PersonaPlex.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sentencepiece
import structlog
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from agent.errors import ModelUnavailable
from agent.model.loader import LoadedModel, default_dtype, weights_not_initialised
from agent.timebase import FRAME, FRAME_RATE
from agent.transcribe.files import SttFiles

log = structlog.get_logger(__name__)

#: Kyutai's end-of-turn signal: extra head 2, class 0 (delayed-streams-modeling,
#: scripts/stt_from_file_pytorch.py: `vad_heads[2][0, 0, 0] > 0.5` -> "end of turn detected")
VAD_HEAD = 2
VAD_CLASS = 0


@dataclass
class SttModel:
    """A loaded STT: what the batched transcriber needs."""

    lm: torch.nn.Module  # moshi LMModel, dep_q == 0
    text_tokenizer: sentencepiece.SentencePieceProcessor
    codebooks: int  # Mimi codebooks it reads (n_q)
    delay_s: float  # how far its text runs behind the audio (stt_config.audio_delay_seconds)
    # silence its streams start with (stt_config.audio_silence_prefix_seconds), as Mimi codes
    prefix_codes: torch.Tensor  # [frames, codebooks] int64 on the device; 0 frames for stt-1b-en_fr
    padding_ids: tuple[int, ...]  # text tokens that are not words (padding, end of padding)
    source: str

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def has_vad(self) -> bool:
        return len(self.lm.extra_heads) > VAD_HEAD


def _extra_heads(path) -> dict:
    """`extra_heads_*` arguments for the heads present in the weights (none: {})."""
    with safe_open(str(path), framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith("extra_heads.") and k.endswith(".weight")]
        if not keys:
            return {}
        dim = f.get_slice(keys[0]).get_shape()[0]
    return {"extra_heads_num_heads": len(keys), "extra_heads_dim": int(dim)}


def check_same_mimi(files: SttFiles, mimi: torch.nn.Module) -> None:
    """Refuse an STT whose Mimi is not the engine's (one encode cannot serve both)."""
    try:
        theirs = load_file(str(files.mimi), device="cpu")
    except Exception as exc:
        raise ModelUnavailable(f"cannot read the STT's Mimi weights {files.mimi}: {exc}") from exc
    ours = mimi.state_dict()
    differ = sorted(set(ours) ^ set(theirs))
    if not differ:
        differ = [k for k, v in ours.items()
                  if v.shape != theirs[k].shape or not torch.equal(v.detach().cpu().float(), theirs[k].float())]
    if differ:
        raise ModelUnavailable(f"the STT's Mimi ({files.mimi.name}) is not PersonaPlex's ({len(differ)} tensors "
                               f"differ, e.g. {differ[0]}): the caller's codes cannot be shared")


def _prefix_codes(model: LoadedModel, frames: int, codebooks: int) -> torch.Tensor:
    """Mimi codes of `frames` frames of silence from a fresh encoder state: the silence prefix a
    Kyutai STT stream starts with, the same for every call, so encoded once."""
    if frames == 0:
        return torch.zeros(0, codebooks, dtype=torch.long, device=model.device)
    from agent.model.loader import build_mimi

    mimi = build_mimi(model.files.mimi, model.arch, model.device)
    mimi.set_num_codebooks(codebooks)
    with torch.no_grad(), mimi.streaming(1):
        codes = [mimi.encode(torch.zeros(1, 1, FRAME, device=model.device))[0, :, 0] for _ in range(frames)]
    return torch.stack(codes).long()


def load_stt(files: SttFiles, model: LoadedModel, dtype: torch.dtype | None = None) -> SttModel:
    """The STT in `files` on PersonaPlex's device, reading the codes of PersonaPlex's Mimi."""
    from moshi.models import loaders

    check_same_mimi(files, model.mimi)
    try:
        info = loaders.CheckpointInfo.from_hf_repo(
            "-", moshi_weights=files.lm, mimi_weights=files.mimi, tokenizer=files.text_tokenizer,
            config_path=files.config)
    except Exception as exc:
        raise ModelUnavailable(f"{files.config}: cannot read the STT config: {exc}") from exc
    raw = info.raw_config or {}
    if info.model_type != "stt" or int(raw.get("dep_q", -1)) != 0:
        raise ModelUnavailable(f"{files.source} is not a Kyutai STT model (model_type {info.model_type!r}, "
                               f"dep_q {raw.get('dep_q')}; a speech-to-text model has model_type 'stt' and dep_q 0)")
    n_q = int(raw["n_q"])
    if n_q > model.mimi.total_codebooks:
        raise ModelUnavailable(f"the STT reads {n_q} Mimi codebooks; PersonaPlex's Mimi has "
                               f"{model.mimi.total_codebooks}")
    dt = dtype or default_dtype(model.device)
    log.info("model_loading", source=files.source, device=str(model.device), dtype=str(dt).removeprefix("torch."))
    try:
        with weights_not_initialised():  # moshi builds on meta, then loads the checkpoint
            lm = info.get_moshi(device=model.device, dtype=dt, lm_kwargs_overrides=_extra_heads(files.lm))
        tok = info.get_text_tokenizer()
    except Exception as exc:
        raise ModelUnavailable(f"cannot load the STT {files.source}: {exc}") from exc
    stt = info.stt_config or {}
    prefix = math.ceil(float(stt.get("audio_silence_prefix_seconds", 0.0)) * FRAME_RATE)
    padding = {int(raw.get("existing_text_padding_id", 3)), int(raw.get("existing_text_end_padding_id", 0))}
    out = SttModel(lm=lm, text_tokenizer=tok, codebooks=n_q, delay_s=float(stt.get("audio_delay_seconds", 0.0)),
                   prefix_codes=_prefix_codes(model, prefix, n_q), padding_ids=tuple(sorted(padding)),
                   source=files.source)
    log.info("model_loaded", source=files.source, codebooks=n_q, delay_s=out.delay_s, vad=out.has_vad)
    return out
