"""The caller's words: Kyutai's streaming STT on the Mimi codes the engine computes anyway.

PersonaPlex writes down only what the agent says; this package transcribes the caller, batched
like the engine (a row per call slot) and stepped in the same 80 ms tick, on the codes of the one
Mimi encode the engine already runs for every caller frame.

What Kyutai STT is (checked for this design, sources in brackets):
- `kyutai/stt-1b-en_fr`: ~1B parameters, English and French, 0.5 s delay, semantic VAD; Kyutai
  report ~400 real-time streams on one H100 batched [delayed-streams-modeling README].
- It is moshi's `LMModel` with no depth transformer (dep_q 0): text is the only output, the audio
  streams are all input. moshi's loader gives Mimi max(dep_q, n_q - dep_q) codebooks, and
  run_inference.py takes `lm.dep_q == 0` as the STT case [moshi 0.2.13 models/loaders.py
  `CheckpointInfo.get_mimi`, run_inference.py].
- It reads 32 Mimi codebooks a frame (PersonaPlex reads 8): `audio_codebooks = 32`, text vocabulary
  8000 out / 8001 in, transformer d_model 2048, 16 layers, 16 heads, context 750 frames (60 s,
  sliding), rope max_period 100000, 4 extra heads of dim 6 [delayed-streams-modeling
  configs/config-stt-en_fr-hf.toml]; "each audio frame is represented by 32 audio tokens"
  [model card]. Its PyTorch config.json, as third parties quote it: n_q 32, dep_q 0, all 33
  delays 0 (the text delay is trained into the data, not a stream delay), text_card 8000,
  `stt_config` {audio_delay_seconds 0.5, audio_silence_prefix_seconds 0.0}, `model_type` "stt",
  tokenizer `tokenizer_en_fr_audio_8000.model`; the 2.6B English model the same way with delay 2.5 s
  and a 1.0 s silence prefix. The Rust server config says the delay is 6 tokens (0.48 s).
- Its Mimi checkpoint is `mimi-pytorch-e351c8d8@125.safetensors` [the toml above; config
  `mimi_name`]: the same training run and checkpoint (e351c8d8, epoch 125) as moshi's and
  PersonaPlex's `tokenizer-e351c8d8-checkpoint125.safetensors`. Mimi's quantizer is residual, so
  the first 8 of a 32-codebook encode are the 8-codebook encode's codes: the engine encodes 32 once
  and hands PersonaPlex the first 8 (`agent.model.codec`). Whether the two files hold the same
  numbers is not taken on trust: `load_stt` compares them tensor by tensor and refuses an STT whose
  Mimi differs.
- Streaming inference [delayed-streams-modeling scripts/stt_from_file_pytorch.py,
  stt_pytorch.ipynb; moshi run_inference.py]: `LMGen(lm, temp=0, temp_text=0)` (greedy), per 80 ms
  frame `mimi.encode` then `lm_gen.step` (or `step_with_extra_heads`); the input is padded with
  `audio_silence_prefix_seconds` of silence before and `audio_delay_seconds` (+1 s) after; tokens 0
  (end of padding) and 3 (padding) are not words; a token's time is its frame's time less the
  prefix and the delay. The notebook and run_inference step the first frame twice (the first step
  feeds the initial tokens in its place); the file script, which pads 1 s of silence by default,
  does not need to.
- Semantic VAD: `step_with_extra_heads` returns the extra heads' softmaxes; the script's end of turn
  is head 2, class 0 above 0.5. The published PyTorch weights of stt-1b-en_fr reportedly carry no
  extra heads; the script switches to `kyutai/stt-1b-en_fr-candle` for `--vad`, whose LM has them
  (`transcript.caller_hf_repo` can name it; heads found in the weights are built).

Modules: `files` (local folder or the Hub, HF_TOKEN), `demo` (the built-in tiny STT of the same
architecture), `model` (moshi's loader, the Mimi check), `transcriber` (the batched rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from agent.errors import ModelUnavailable

if TYPE_CHECKING:
    from agent.model.loader import LoadedModel
    from agent.transcribe.model import SttModel

log = structlog.get_logger(__name__)


def load_caller_stt(model: LoadedModel, hf_repo: str) -> SttModel | None:
    """The STT for this PersonaPlex model (`agent.transcribe.files.caller_stt_files`), or None
    with one log line saying why the caller will not be transcribed."""
    from agent.transcribe.files import caller_stt_files
    from agent.transcribe.model import load_stt

    try:
        return load_stt(caller_stt_files(model.files, hf_repo), model)
    except ModelUnavailable as exc:
        log.warning("caller_transcript_off", reason=str(exc))
        return None
