"""The streaming engine: call slots in, 80 ms of agent audio and text out, per frame.

`Engine.step` takes one 1920-sample frame of caller audio (24 kHz) per live slot, runs Mimi's
encoder, one batched LM step for every busy slot, and Mimi's decoder, and returns each emitting
slot's agent audio frame and text token, and for a slot that fed caller audio the caller's codes
of that frame (all the codebooks the encoder was asked for: `caller_codebooks` > 8 serves a
second model reading the same Mimi, the caller transcriber, from the one encode). It is
synchronous and single-threaded on purpose: the scheduler owns the real-time loop and calls it
from its own thread. Calls start through `prepare` (any thread: prompt tokens, voice, prefill
plan, random generator) and `prefill` (engine thread: the prompt phase as one forward,
`agent.model.prefill`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import structlog
import torch

from agent.model.codec import BatchedCodec
from agent.model.generator import AGENT, CALLER, Phase, TokenGenerator
from agent.model.loader import LoadedModel
from agent.model.prefill import PrefillRun, StartPlan
from agent.model.prompt import PromptSchedule, build_schedule, tokenize_prompt
from agent.model.sampling import SamplingParams
from agent.model.voices import VoicePrompt, encode_voice_wav, load_voice_pt, resolve_voice
from agent.timebase import AUDIO_CODEBOOKS

log = structlog.get_logger(__name__)

SPECIAL_TEXT = {0: "EPAD", 1: "BOS", 2: "EOS", 3: "PAD"}


@dataclass
class SlotOutput:
    """One slot's output for one frame."""

    pcm: np.ndarray  # [frame_size] float32, 24 kHz
    text_token: int
    text: str | None  # the piece ("▁" as space), None for padding/special tokens
    tokens: np.ndarray  # [17]: text, 8 agent codes, 8 caller codes
    first: bool  # the call's first frame (end of the prompt phase)
    fed: np.ndarray | None = None  # [17]: the token column the slot's step fed (a re-prime replays it)
    # [caller_codebooks] int64 (cpu): the Mimi codes of the caller frame this step consumed (its
    # first 8 are what PersonaPlex heard); None when the step fed no caller audio (the answer)
    caller_codes: torch.Tensor | None = None


def text_piece(tokenizer, token: int) -> str | None:
    if token in SPECIAL_TEXT:
        return None
    return tokenizer.id_to_piece(int(token)).replace("▁", " ")


def text_label(tokenizer, token: int) -> str:
    """The upstream offline JSON's label for a text token (special tokens named)."""
    return SPECIAL_TEXT.get(int(token)) or tokenizer.id_to_piece(int(token)).replace("▁", " ")


class Engine:
    def __init__(self, model: LoadedModel, max_slots: int = 1,
                 default_sampling: SamplingParams | None = None, caller_codebooks: int | None = None):
        self.model = model
        self.max_slots = max_slots
        self.default_sampling = default_sampling or SamplingParams()
        self.generator = TokenGenerator(model.lm, max_slots)
        self.caller_codebooks = max(AUDIO_CODEBOOKS, int(caller_codebooks or AUDIO_CODEBOOKS))
        self.codec = BatchedCodec(model.mimi, max_slots, self.caller_codebooks)
        self.frame_size = self.codec.frame_size
        self.sample_rate = self.codec.sample_rate
        self._voice_cache: dict[str, VoicePrompt] = {}
        self._voice_lock = threading.Lock()  # voices load on start-preparation threads
        self._voice_mimi = None

    def close(self) -> None:
        """Release the model's streaming state (a new Engine can then be built on the same model)."""
        self.generator.close()
        self.codec.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- prompts (any thread) -----------------------------------------------------------------
    def voice(self, spec: str, allow_paths: bool = False) -> VoicePrompt:
        """Load (once) a voice by stock name or, from trusted config, by path. A custom wav is
        Mimi-encoded here, once: call it from a worker thread, never an event loop."""
        path = resolve_voice(spec, self.model.files.voices_dir, allow_paths=allow_paths)
        key = str(path.resolve())
        with self._voice_lock:
            cached = self._voice_cache.get(key)
            if cached is None:
                if path.suffix == ".pt":
                    cached = load_voice_pt(path)
                else:
                    cached = encode_voice_wav(path, self._mimi_for_voices, self.sample_rate, self.frame_size)
                self._voice_cache[key] = cached
        return cached

    def _mimi_for_voices(self):
        """A second Mimi, outside the batched streaming state, for encoding custom voices."""
        if self._voice_mimi is None:
            from agent.model.loader import build_mimi

            self._voice_mimi = build_mimi(self.model.files.mimi, self.model.arch, self.model.device)
        return self._voice_mimi

    def schedule(self, voice: str, text_prompt: str, allow_voice_paths: bool = False) -> PromptSchedule:
        tokens = tokenize_prompt(self.model.text_tokenizer, text_prompt)
        sch = build_schedule(self.voice(voice, allow_voice_paths), tokens)
        if sch.steps >= self.model.context:
            raise ValueError(f"prompt needs {sch.steps} model steps; the context holds {self.model.context}")
        return sch

    def prepare(self, schedule: PromptSchedule, sampling: SamplingParams | None = None,
                seed: int | None = None) -> StartPlan:
        """Everything a call's start needs but the model (thread-safe, off the engine thread)."""
        sampling = sampling or self.default_sampling
        plan = self.generator.plan(schedule)
        return StartPlan(plan, sampling, self.generator.prepared_rng(sampling, seed, plan.steps))

    # -- slots (engine thread) ----------------------------------------------------------------
    def free_slots(self) -> list[int]:
        return self.generator.free_rows()

    def prefill(self, starts: list[tuple[int, StartPlan]]) -> PrefillRun:
        """A prefill of these calls' prompt phases into these free slots; run it with
        `advance()` (in chunks if need be), then `install()`."""
        return PrefillRun(self.generator, starts)

    def start(self, slot: int, schedule: PromptSchedule, sampling: SamplingParams | None = None,
              seed: int | None = None) -> None:
        """Start a call now: its prompt phase as one forward; its first frame comes out of the
        next step."""
        run = self.prefill([(slot, self.prepare(schedule, sampling, seed))])
        run.advance()
        run.install()

    def start_stepped(self, slot: int, schedule: PromptSchedule, sampling: SamplingParams | None = None,
                      seed: int | None = None) -> None:
        """Start a call whose prompt phase is stepped frame by frame (the reference path)."""
        self.generator.start(slot, schedule, sampling or self.default_sampling, seed)

    def release(self, slot: int) -> None:
        self.generator.free(slot)

    def phase(self, slot: int) -> Phase:
        return self.generator.slots[slot].phase

    def position(self, slot: int) -> int:
        """Positions the slot's model state holds (prompt phase included): what fills the
        context. Model steps taken, less what a re-prime (`agent.calls.reprime`) left out."""
        return self.generator.slots[slot].position

    def steps_taken(self, slot: int) -> int:
        """Model steps the slot has taken since its call started (a re-prime does not reset it)."""
        return self.generator.slots[slot].offset

    def busy(self) -> bool:
        return any(s.phase is not Phase.FREE for s in self.generator.slots)

    # -- the frame ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, caller_pcm: dict[int, np.ndarray], only: set[int] | None = None) -> dict[int, SlotOutput]:
        """One 80 ms frame for all busy slots (or those in `only`).

        Live slots missing from `caller_pcm` hear silence this frame.
        """
        B, F = self.max_slots, self.frame_size
        live = [b for b in self.generator.stepping_rows(only) if self.generator.slots[b].phase is Phase.LIVE]
        codes: dict[int, torch.Tensor] = {}
        if live:
            pcm = torch.zeros(B, F)
            for b in live:
                frame = caller_pcm.get(b)
                if frame is not None:
                    pcm[b] = torch.as_tensor(np.asarray(frame, dtype=np.float32).reshape(F))
            mask = torch.zeros(B, dtype=torch.bool)
            mask[live] = True
            enc = self.codec.encode(pcm, mask)
            codes = {b: enc[b] for b in live}
        # PersonaPlex hears its 8 codebooks: the first 8 of any encode (residual quantizer)
        out = self.generator.step({b: c[:AUDIO_CODEBOOKS] for b, c in codes.items()}, only)
        if out.finished_prompt:
            # The reference resets Mimi after the prompt phase; the call's audio starts here.
            self.codec.reset(out.finished_prompt)
        result: dict[int, SlotOutput] = {}
        if out.emitting:
            mask = torch.zeros(B, dtype=torch.bool)
            mask[out.emitting] = True
            agent = out.tokens[:, AGENT].clone()
            agent[~mask] = 0
            pcm_out = self.codec.decode(agent, mask)
            tok = self.model.text_tokenizer
            for b in out.emitting:
                t = int(out.tokens[b, 0])
                result[b] = SlotOutput(pcm=pcm_out[b].numpy(), text_token=t, text=text_piece(tok, t),
                                     tokens=out.tokens[b].numpy().copy(), first=b in out.finished_prompt,
                                     fed=out.fed[b].numpy().copy(), caller_codes=codes.get(b))
        return result

    def run_prompt(self, slot: int) -> SlotOutput:
        """Step until `slot` finishes its prompt phase (other busy slots advance too)."""
        while True:
            res = self.step({})
            if slot in res and res[slot].first:
                return res[slot]


__all__ = ["Engine", "SlotOutput", "StartPlan", "text_label", "text_piece", "CALLER"]
