"""The start lane: from an admitted call to a slot whose next step is the call's first frame.

Two stages, so that neither the engine thread nor an endpoint's thread waits on the other:
1. preparation, on a worker thread: the prompt's tokens, the voice (a custom wav is Mimi-encoded
   here, once), the prefill plan and the call's random generator (`Engine.prepare`);
2. the prefill, on the engine thread, in the time a tick leaves after its live step: the
   prompt phases of every call prepared by then, as one forward in a state of their own, then
   copied into free slots (`agent.model.prefill`). A prompt too long for the time left is cut into
   chunks over the next ticks; live calls are never delayed past their tick for it.

A prepared call joins the next tick's batched step, which runs its final prompt step and emits
its first frame: about one or two frames after the call was placed, whatever its prompt.
"""

from __future__ import annotations

import collections
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import structlog

from agent.model.engine import Engine
from agent.calls.events import CallState, EndReason
from agent.model.generator import Phase
from agent.personas.tools import fit_to_budget, prompt_budget
from agent.model.prefill import PrefillRun, StartPlan
from agent.model.prompt import tokenize_prompt
from agent.model.sampling import SamplingParams
from agent.calls.binding import CallBinding
from agent.calls.session import CallSession

log = structlog.get_logger(__name__)

MIN_PREFILL_S = 0.010  # prefill work a tick always gets, spare time or not


@dataclass
class StartRequest:
    binding: CallBinding
    voice: str
    prompt: str | None  # None: the persona rendered with `variables` (fitted to the token budget)
    sampling: SamplingParams
    seed: int | None
    variables: dict[str, str] | None = None

    @property
    def session(self) -> CallSession:
        return self.binding.session


@dataclass
class _Prepared:
    binding: CallBinding
    plan: StartPlan

    @property
    def session(self) -> CallSession:
        return self.binding.session


@dataclass
class _Failed:
    binding: CallBinding
    error: Exception


class StartLane:
    """Owned by the scheduler; `submit` from any thread, everything else on the engine thread."""

    def __init__(self, engine: Engine, max_batch: int, allow_voice_paths: bool,
                 min_chunk: int = 16, on_prefill: Callable[[float], None] | None = None,
                 on_prepared: Callable[[], None] | None = None,
                 on_prompt_cut: Callable[[CallSession, int], None] | None = None):
        self.engine = engine
        self.max_batch = max(1, max_batch)
        self.allow_voice_paths = allow_voice_paths
        self.min_chunk = min_chunk
        self.on_prefill = on_prefill  # (seconds from a prefill's start to its rows installed)
        self.on_prepared = on_prepared  # a start is ready for its prefill (wakes the engine thread)
        self.on_prompt_cut = on_prompt_cut  # (call, items dropped to fit the context)
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self._done: queue.SimpleQueue[_Prepared | _Failed] = queue.SimpleQueue()
        self._waiting: list[_Prepared] = []
        self._run: PrefillRun | None = None
        self._batch: list[tuple[int, CallBinding]] = []
        self._started_at = 0.0
        # seconds per prefilled (row x step): the lowest of the recent measurements, so that one
        # slow (cold, preempted) run does not make every later prefill needlessly chunked
        self._costs: collections.deque[float] = collections.deque(maxlen=8)
        self.prefills = 0

    def close(self) -> None:
        self._prep.shutdown(wait=False, cancel_futures=True)

    # -- any thread ---------------------------------------------------------------------------
    def submit(self, req: StartRequest) -> None:
        self._prep.submit(self._prepare, req)

    def preload(self, voices: list[str]) -> None:
        """Load (and for custom wavs, encode) voices ahead of their first call."""
        def load() -> None:
            for v in voices:
                try:
                    self.engine.voice(v, self.allow_voice_paths)
                except Exception as exc:
                    log.warning("voice_preload_failed", voice=v, error=str(exc))
        self._prep.submit(load)

    def wait_prepared(self, timeout: float) -> bool:
        """Wait until everything submitted so far (voice preloads included) has been prepared."""
        try:
            self._prep.submit(lambda: None).result(timeout)
            return True
        except Exception:
            return False

    def _render(self, req: StartRequest) -> str:
        """The call's prompt: its persona with the call's variables, fitted to the token budget
        left after its voice."""
        voice = self.engine.voice(req.voice, self.allow_voice_paths)
        model = self.engine.model
        budget = prompt_budget(model.context, voice.prompt_steps)
        rendered = fit_to_budget(req.session.persona, req.variables or {},
                                 lambda text: len(tokenize_prompt(model.text_tokenizer, text)), budget)
        if rendered.items_cut:
            req.session.log.warning("prompt_items_dropped", items=rendered.items_cut, budget_tokens=budget)
            if self.on_prompt_cut is not None:
                self.on_prompt_cut(req.session, rendered.items_cut)
        return rendered.text

    def _prepare(self, req: StartRequest) -> None:
        try:
            if req.prompt is None:
                req.session.prompt = self._render(req)
            schedule = self.engine.schedule(req.voice, req.session.prompt, allow_voice_paths=self.allow_voice_paths)
            self._done.put(_Prepared(req.binding, self.engine.prepare(schedule, req.sampling, req.seed)))
        except Exception as exc:
            self._done.put(_Failed(req.binding, exc))
        if self.on_prepared is not None:
            self.on_prepared()

    @property
    def step_cost_s(self) -> float:
        return min(self._costs, default=2e-4)

    # -- engine thread --------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._run is not None or bool(self._waiting) or not self._done.empty()

    def reserved(self) -> set[int]:
        """Slots a prefill in progress will fill."""
        return {slot for slot, _ in self._batch}

    def run(self, deadline: float, free_slots: list[int], on_started: Callable[[int, CallBinding], None],
            on_failed: Callable[[CallBinding, EndReason, str], None]) -> None:
        """Use the time until `deadline` to advance starts; at least one chunk of an open
        prefill always runs, so a start cannot starve under load."""
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Failed):
                on_failed(item.binding, EndReason.FAILED, str(item.error))
            elif item.binding.session.state is not CallState.ENDED:
                self._waiting.append(item)
        self._waiting = [p for p in self._waiting if p.session.state is not CallState.ENDED]
        if self._run is None and self._waiting and free_slots:
            take = self._waiting[: min(self.max_batch, len(free_slots))]
            self._waiting = self._waiting[len(take):]
            self._batch = [(slot, p.binding) for slot, p in zip(free_slots, take)]
            try:
                self._run = self.engine.prefill([(slot, p.plan) for slot, p in zip(free_slots, take)])
            except Exception as exc:
                self._fail_batch(on_failed, exc)
                return
            self._started_at = time.monotonic()
        if self._run is None:
            return
        rows = len(self._batch)
        left = self._run.total - self._run.done_steps
        # what fits before the next tick; and at least MIN_PREFILL_S of work even when the tick
        # has no time left (an overloaded engine must still start calls, and a short prefill
        # finished now beats one spread over many late ticks)
        budget = max(deadline - time.monotonic(), MIN_PREFILL_S)
        chunk = min(max(self.min_chunk, int(budget / (self.step_cost_s * rows))), left)
        t0 = time.monotonic()
        try:
            done = self._run.advance(chunk)
        except Exception as exc:
            self._fail_batch(on_failed, exc)
            return
        dt = time.monotonic() - t0
        if chunk >= 8:  # tiny chunks are dominated by fixed costs: they would skew the estimate
            self._costs.append(dt / (chunk * rows))
        if not done:
            return
        try:
            slots = self._run.install()
        except Exception as exc:
            self._fail_batch(on_failed, exc)
            return
        self.prefills += 1
        took = time.monotonic() - self._started_at
        if self.on_prefill is not None:
            self.on_prefill(took)
        batch, self._batch, run, self._run = self._batch, [], self._run, None
        for (_, sp), (_, binding) in zip(run.starts, batch):
            binding.prompt_plan = sp.plan  # kept: a re-prime replays exactly this prompt phase
        for slot, (_, binding) in zip(slots, batch):
            on_started(slot, binding)

    def _fail_batch(self, on_failed, exc: Exception) -> None:
        log.exception("prefill_failed")
        batch, self._batch, self._run = self._batch, [], None
        for slot, binding in batch:
            if self.engine.phase(slot) is not Phase.FREE:
                self.engine.release(slot)
            on_failed(binding, EndReason.FAILED, str(exc))
