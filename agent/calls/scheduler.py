"""The real-time service endpoints plug calls into: many calls on one model, one tick per frame.

One engine thread ticks every 80 ms and steps all calls together; endpoints never wait on the
model and the model never waits on the network. Each tick:
1. runs commands other threads posted (calls placed, hung up);
2. steps every busy slot once: live calls consume a frame of their caller's audio (silence if it
   has not all arrived yet, counted as late; the audio that did arrive is kept for later), and
   calls whose prompt was just prefilled emit their first frame;
3. in the time left before the next tick: starts calls (`agent.calls.starts`: the prompt phase as one
   forward), then catches up calls whose caller audio is waiting (an extra step for just those
   calls), so a late tick costs latency for a moment, never the caller's words, then advances a
   re-prime of a call nearing the context and swaps it in (`agent.calls.reprime`);
4. applies the call policy (`agent.calls.policy`).
Capacity is fixed at start (the batch size); calls over it are refused at once. Barge-in VAD
runs on its own thread for all calls as one batch (`agent.barge_in.vad`); end-of-call accounting lives in
`agent.calls.ledger`. With an STT model, every step that consumed caller audio is followed by a step
of the caller transcriber on the same codes (`agent.transcribe`, `_transcribe`): its cost is part of
the step's.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import numpy as np
import structlog

from agent.calls.commands import run_pending
from agent.model.engine import Engine, SlotOutput
from agent.errors import CallRefused  # noqa: F401  (CallRefused raised here; importers may name it here)
from agent.calls.events import BargeInSuppressed, CallState, Ended, EndReason, Reprime
from agent.model.generator import Phase
from agent.calls.ledger import Ledger
from agent.metrics import Metrics
from agent.model.loader import LoadedModel
from agent.personas.schema import Persona
from agent.calls.policy import CallPolicy, PolicyConfig
from agent.calls.reprime import ReprimeConfig, ReprimeLane, Reprimed
from agent.model.sampling import SamplingParams
from agent.calls.binding import CallBinding
from agent.calls.session import CallSession
from agent.calls.settings import CallSettings
from agent.barge_in.detector import BargeInConfig
from agent.calls.starts import StartLane, StartRequest
from agent.calls.transcript import TranscriptPiece
from agent.timebase import FRAME, FRAME_S, SAMPLE_RATE
from agent.barge_in.vad import VadVerdicts, VadWorker
from agent.transcribe.model import SttModel
from agent.transcribe.transcriber import BatchedTranscriber
from agent.osthread import name_os_thread

log = structlog.get_logger(__name__)

TICK_MARGIN_S = 0.004  # spare-time work stops this long before the next tick is due
PHASE_MARGIN_S = 0.025  # caller audio kept ahead of the tick: more than a 20 ms packet, for jitter
PHASE_STEP_S = 0.005  # the tick moves at most this much earlier per tick


class SchedulerConfig(CallSettings):
    """The operator's settings (`CallSettings`, the server's `engine:` section) plus what only code
    and tests set."""

    tick_s: float = FRAME_S
    realtime: bool = True  # False: step as fast as possible (benchmarks, long-call tests)
    outbound_depth: int = 2
    inbound_wait_ticks: int = 2  # ticks a call waits for its caller frame before hearing silence
    allow_voice_paths: bool = True  # persona files are trusted configuration


class Scheduler:
    def __init__(self, model: LoadedModel, config: SchedulerConfig | None = None, metrics: Metrics | None = None,
                 stt: SttModel | None = None):
        """`stt`: transcribe the callers with it (None: the agent's words only)."""
        self.model = model
        self.config = cfg = config or SchedulerConfig()
        self.metrics = metrics or Metrics()
        self.metrics.capacity.set(cfg.max_calls)
        self.transcriber = BatchedTranscriber(stt, cfg.max_calls) if stt is not None else None
        self.engine = Engine(model, cfg.max_calls, cfg.sampling,
                             caller_codebooks=stt.codebooks if stt is not None else None)
        self._wake = threading.Event()  # a start was prepared: prefill it before the next tick
        self.starts = StartLane(self.engine, cfg.prefill_batch, cfg.allow_voice_paths,
                                on_prefill=self.metrics.prefill_seconds.observe, on_prepared=self._wake.set,
                                on_prompt_cut=lambda sess, n: self.metrics.prompt_items_dropped.inc(n))
        self.policy = CallPolicy(PolicyConfig(model.context, cfg.context_policy, cfg.max_call_seconds,
                                              cfg.idle_timeout_s),
                                 on_context_limit=lambda s: self.metrics.calls_at_context_limit.inc())
        # raises ReprimeConfigError (a ValueError) at start when reprime_keep_s cannot fit
        self.reprime = ReprimeLane(self.engine, ReprimeConfig.from_seconds(model.context, cfg.reprime_keep_s),
                                   cost_hint=lambda: self.starts.step_cost_s, on_reprime=self._on_reprime,
                                   on_fallback=lambda slot: self.metrics.reprime_fallbacks.inc(),
                                   parallel=cfg.reprime_parallel) \
            if cfg.context_policy == "reprime" else None
        self.ledger = Ledger(self.metrics)
        self.vad = VadWorker(VadVerdicts(self._on_barge_in, self._on_barge_in_suppressed)) \
            if cfg.barge_in.enabled else None
        self._calls: dict[int, CallBinding] = {}  # slot -> the call in it
        self._bindings: dict[str, CallBinding] = {}  # call id -> binding, from admission to the end
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self._cmds: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        self.warm = threading.Event()  # the call path has run once (readiness)
        self.draining = False
        self.ticks = 0  # clock ticks since start
        self.steps = 0  # batched steps run on the clock
        self.overruns = 0
        self.step_est_s = 0.0  # recent batched-step time, for spare-time decisions
        self.last_error: str | None = None
        self.on_call_start: list[Callable[[CallSession], None]] = []
        self._dropped_seen: dict[str, int] = {}
        self._min_slack_s: float | None = None  # least caller audio left after a frame this tick
        self._uncounted: set[str] = set()  # the warm-up call: not a call anyone placed

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._running.set()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        if self.vad is not None:
            self.vad.start()

    def stop(self, reason: EndReason = EndReason.SHUTDOWN) -> None:
        """End every call and stop the engine thread."""
        if self._thread is None:
            return
        done = threading.Event()

        def end_all():
            for b in list(self._bindings.values()):
                self._end(b.session, reason)
            done.set()
        self._cmds.put(end_all)
        done.wait(timeout=5)
        self._running.clear()
        self._thread.join(timeout=5)
        self._thread = None
        if self.vad is not None:
            self.vad.stop()
        self.starts.close()
        self.engine.close()
        if self.transcriber is not None:
            self.transcriber.close()

    def warm_up(self, voice: str, prompt: str, timeout: float = 120.0) -> bool:
        """Run the call path before taking calls (readiness): two calls that are not counted go
        through preparation, prefill, their first frame and live frames with catch-up steps (the
        second measures the warm costs the spare-time decisions use); the VAD model and the
        voices asked for by `preload_voices` are loaded. Returns when done, so the first real
        call is no slower than the tenth."""
        deadline = time.monotonic() + timeout
        ok = all(self._warm_call(voice, prompt, k, deadline) for k in range(2))
        ok = self.starts.wait_prepared(max(0.0, deadline - time.monotonic())) and ok
        if self.vad is not None:
            ok = self.vad.wait_loaded(max(0.0, deadline - time.monotonic())) and ok
        if ok:
            self.warm.set()
            log.info("call_path_warm", prefill_step_us=round(1e6 * self.starts.step_cost_s, 1),
                     step_ms=round(1000 * self.step_est_s, 1))
        else:
            log.error("warm_up_failed", error=self.last_error)
        return ok

    def _warm_call(self, voice: str, prompt: str, k: int, deadline: float) -> bool:
        persona = Persona(id="warm-up", kind="prompt", numbers=(), voice=voice, prompt=prompt, source="<warm-up>")
        sess = CallSession(persona, "-", "warm-up", BargeInConfig(enabled=False), call_id=f"warm-up-{k}", owner=self)
        sess.log = log.bind(call_id=sess.call_id)
        sess.push_audio(np.zeros(3 * FRAME, np.float32))  # consumed by a live step and catch-ups
        self._uncounted.add(sess.call_id)
        binding = CallBinding(sess, placed_tick=self.ticks)
        self._bindings[sess.call_id] = binding
        self.starts.submit(StartRequest(binding, voice, prompt, SamplingParams(), None))

        def warmed() -> bool:  # by our own call, or by real calls that came first
            return any(b.session.stats.frames_out >= 3 for b in [binding, *self._calls.values()])
        ended = threading.Event()

        def end() -> None:  # never waits for a slot; leaves nothing behind
            self._end(sess, EndReason.SHUTDOWN)
            ended.set()
        released = False
        while not warmed() and time.monotonic() < deadline:
            if not released and self._admitted > 0:
                # real calls came during warm-up: they warm the path themselves, and ours gives
                # its slot up at once rather than make one of them wait for it
                self._cmds.put(end)
                released = True
            time.sleep(0.01)
        if not released:
            self._cmds.put(end)
        return ended.wait(max(0.0, deadline - time.monotonic())) and warmed()

    def begin_drain(self) -> None:
        """Refuse new calls from now on; calls in progress continue."""
        self.draining = True

    @property
    def active_calls(self) -> list[CallSession]:
        """Calls in a slot (answering or live)."""
        return [b.session for b in self._calls.values()]

    def binding_of(self, session: CallSession) -> CallBinding | None:
        """How the scheduler runs `session` (tests, tools: read-only)."""
        return self._bindings.get(session.call_id)

    @property
    def capacity_left(self) -> int:
        return self.config.max_calls - self._admitted

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- calls (any thread) ---------------------------------------------------------------------
    def admit(self, persona: Persona, number: str, endpoint: str, call_id: str | None = None,
              caller: str | None = None) -> CallSession:
        """Take a call slot for a call (or raise CallRefused at once). The call starts when
        `start_call` gives it its prompt; until then it holds its slot, answering nothing."""
        if self.draining:
            raise CallRefused("the agent is shutting down", "draining", self.config.retry_after_s)
        if not self.running:
            raise CallRefused("the engine is not running", "unavailable", self.config.retry_after_s)
        with self._admit_lock:
            if self._admitted >= self.config.max_calls:
                raise CallRefused(f"all {self.config.max_calls} call slots are busy", "busy",
                                  self.config.retry_after_s)
            self._admitted += 1
        cfg = self.config
        sess = CallSession(persona, number, endpoint, cfg.barge_in, cfg.outbound_depth, cfg.max_latency_ms,
                           call_id=call_id, caller=caller, owner=self)
        self._bindings[sess.call_id] = CallBinding(sess, placed_tick=self.ticks)
        self.ledger.started(sess)
        return sess

    # -- CallOwner: what a session passes on -------------------------------------------------------
    def hang_up(self, session: CallSession, reason: EndReason) -> None:
        self._cmds.put(lambda: self._end(session, reason))

    def caller_audio(self, session: CallSession, pcm: np.ndarray) -> None:
        if self.vad is not None:
            self.vad.audio(session, pcm)

    def start_call(self, sess: CallSession, prompt: str | None = None, seed: int | None = None,
                   variables: dict[str, str] | None = None) -> None:
        """Start an admitted call: with `prompt` as given, or its persona rendered with the call's
        `variables` (on the preparation thread). Its first agent frame comes a frame or two
        later, whatever the prompt."""
        if prompt is not None:
            sess.prompt = prompt
        for hook in self.on_call_start:  # before any frame: a recorder sees the call whole
            try:
                hook(sess)
            except Exception:
                sess.log.exception("call_start_hook_failed")
        binding = self._bindings.get(sess.call_id)
        if binding is None:  # hung up before it started
            return
        persona = sess.persona
        sampling = persona.sampling(self.config.sampling)
        sess.log.info("call_start", direction=sess.direction, voice=persona.voice,
                      sampling=sampling.model_dump())
        self.starts.submit(StartRequest(binding, persona.voice, prompt, sampling, seed, variables))

    def place_call(self, persona: Persona, number: str, endpoint: str, seed: int | None = None,
                   call_id: str | None = None, prompt: str | None = None) -> CallSession:
        """`admit` and `start_call` in one (tests, benchmarks)."""
        sess = self.admit(persona, number, endpoint, call_id=call_id)
        self.start_call(sess, prompt, seed)
        return sess

    def preload_voices(self, personas: list[Persona]) -> None:
        """Load the voices these personas use (custom wavs are encoded) before their first call."""
        self.starts.preload(sorted({p.voice for p in personas}))

    # -- engine thread --------------------------------------------------------------------------
    def _on_started(self, slot: int, binding: CallBinding) -> None:
        sess = binding.session
        if sess.state is CallState.ENDED:  # hung up while its prompt was being prefilled
            self.engine.release(slot)
            return
        binding.slot = slot
        self._calls[slot] = binding
        if self.reprime is not None and binding.prompt_plan is not None:
            vad = self.vad is not None and self.config.barge_in.enabled
            self.reprime.track(slot, binding.prompt_plan, sess.log, reprimes=sess.reprimes,
                               caller_silent=(lambda: sess.detector.speech_ms == 0.0) if vad else None)
        sess.set_state(CallState.ANSWERING)

    def _on_start_failed(self, binding: CallBinding, reason: EndReason, error: str) -> None:
        binding.session.log.error("call_setup_failed", error=error)
        self.last_error = error
        self._end(binding.session, reason)

    def _end(self, sess: CallSession, reason: EndReason) -> None:
        if sess.state is CallState.ENDED:
            return
        binding = self._bindings.pop(sess.call_id, None)
        slot = binding.slot if binding is not None else None
        if slot is not None and self._calls.get(slot) is binding:
            del self._calls[slot]
            if self.reprime is not None:
                self.reprime.forget(slot)
            self.engine.release(slot)
            if self.transcriber is not None:
                self.transcriber.leave(slot)
        counted = sess.call_id not in self._uncounted
        self._uncounted.discard(sess.call_id)
        if counted:  # before anyone sees ENDED: a call seen ended has given its slot back
            with self._admit_lock:
                self._admitted -= 1
        sess.ended_at = time.monotonic()
        sess.end_reason = reason
        sess.set_state(CallState.ENDED)
        sess.emit(Ended(reason))
        if self.vad is not None:
            self.vad.forget(sess.call_id)
        if not counted:
            return
        self._account_dropped(sess)
        self._dropped_seen.pop(sess.call_id, None)
        self.ledger.ended(sess, reason)

    def _account_dropped(self, sess: CallSession) -> None:
        now = sess.stats.caller_dropped_samples
        before = self._dropped_seen.get(sess.call_id, 0)
        if now > before:
            self._dropped_seen[sess.call_id] = now
            self.metrics.caller_audio_dropped.inc((now - before) / SAMPLE_RATE)

    def _deliver(self, results: dict[int, SlotOutput], now: float, feed: dict[int, np.ndarray]) -> None:
        for slot, out in results.items():
            binding = self._calls.get(slot)
            if binding is None:
                continue
            sess = binding.session
            try:
                if out.first:
                    sess.answered_at = now
                    sess.answer_ticks = self.ticks - binding.placed_tick
                    if sess.call_id not in self._uncounted:
                        self.metrics.answer_seconds.observe(now - sess.created)
                    sess.set_state(CallState.LIVE)
                else:
                    binding.live_frames += 1
                index = sess.stats.frames_out
                sess.deliver(out.pcm, out.text, now)
                if self.reprime is not None:
                    self.reprime.observe(slot, out, feed.get(slot))
                sess.tap_frame(feed.get(slot), out.pcm, out.text, index)
            except Exception:
                sess.log.exception("deliver_failed")
                self._end(sess, EndReason.FAILED)

    def _gather_inbound(self) -> tuple[dict[int, np.ndarray], set[int]]:
        """Each live call's next caller frame. A call whose frame has not all arrived waits (is
        not stepped this tick: the model follows the caller's clock, and its frame is consumed
        at the next tick) for up to `inbound_wait_ticks`; past that the caller's stream counts as
        paused and the model hears silence (counted as late), its agent talking on."""
        feed: dict[int, np.ndarray] = {}
        waiting: set[int] = set()
        for slot, binding in list(self._calls.items()):
            if self.engine.phase(slot) is not Phase.LIVE:
                continue
            sess = binding.session
            try:
                frame = sess.take_inbound()
                if frame is None and binding.waited_ticks < self.config.inbound_wait_ticks:
                    binding.waited_ticks += 1
                    waiting.add(slot)
                    continue
                if frame is None:
                    frame = np.zeros(FRAME, dtype=np.float32)
                    sess.stats.late_inbound += 1
                    if sess.call_id not in self._uncounted:
                        self.metrics.late_inbound.inc()
                else:
                    binding.waited_ticks = 0
                    left = sess.inbound_samples / SAMPLE_RATE  # arrived before this tick, beyond the frame
                    self._min_slack_s = left if self._min_slack_s is None else min(self._min_slack_s, left)
                sess.stats.frames_in += 1
                feed[slot] = frame
            except Exception:
                sess.log.exception("inbound_failed")
                self._end(sess, EndReason.FAILED)
        return feed, waiting

    def _catch_up(self, deadline: float, fed: set[int]) -> None:
        """Extra steps for calls that still have a whole caller frame waiting after this tick's
        step consumed one (a late tick, a burst after a network stall): consume it now rather
        than let it age into standing latency or be dropped. Only calls stepped this tick: a call
        waiting for its frame to complete stays on the tick, in the main batch."""
        while True:
            rows = [slot for slot, b in self._calls.items()
                    if slot in fed and self.engine.phase(slot) is Phase.LIVE and b.session.inbound_samples >= FRAME]
            if not rows:
                return
            if self.config.realtime and time.monotonic() + self.step_est_s > deadline:
                return
            feed = {}
            for slot in rows:
                sess = self._calls[slot].session
                feed[slot] = sess.take_inbound()
                sess.stats.frames_in += 1
                sess.stats.catch_up_steps += 1
            self.metrics.catch_up_steps.inc(len(rows))
            results = self._step(feed, only=set(rows))
            self._deliver(results, time.monotonic(), feed)
            if not self.config.realtime:
                return

    def _police(self, now: float) -> None:
        for slot, binding in list(self._calls.items()):
            reason = self.policy.verdict(binding, self.engine.position(slot), now)
            if reason is not None:
                self._end(binding.session, reason)
            else:
                self._account_dropped(binding.session)

    def _step(self, feed, only=None) -> dict:
        try:
            results = self.engine.step(feed, only=only)
        except Exception as exc:
            # the batch is shared: a failing step cannot be pinned on one call, so end them all
            log.exception("engine_step_failed")
            self.last_error = str(exc)
            for binding in list(self._calls.values()):
                self._end(binding.session, EndReason.FAILED)
            if self.reprime is not None:
                self.reprime.clear()
            for slot in range(self.engine.max_slots):
                if self.engine.phase(slot) is not Phase.FREE and slot not in self.starts.reserved():
                    self.engine.release(slot)
            return {}
        if self.transcriber is not None:
            self._transcribe(results)
        return results

    def _transcribe(self, results: dict[int, SlotOutput]) -> None:
        """The caller's words: one transcriber step for the calls that fed caller audio in this
        engine step, on the codes the engine's Mimi encode made for both models. A call joins the
        transcriber at its first caller frame, placed on its clock where the recorder puts it
        (the frame after the answer's), and gets its pieces as `TranscriptPiece("caller", ...)`
        and the model's end-of-turn probability as `sess.end_of_turn`. A failing transcriber is
        switched off; the calls go on."""
        tr = self.transcriber
        assert tr is not None
        codes = {}
        for slot, out in results.items():
            binding = self._calls.get(slot)
            if binding is None or out.caller_codes is None:
                continue
            sess = binding.session
            if tr.call_in(slot) != sess.call_id:
                tr.join(slot, sess.call_id, t_first=sess.stats.frames_out * FRAME_S)
            codes[slot] = out.caller_codes
        try:
            heard = tr.step(codes)
        except Exception as exc:
            log.exception("caller_transcript_failed")
            self.last_error = str(exc)
            self.transcriber = None
            tr.close()
            return
        for slot, h in heard.items():
            sess = self._calls[slot].session
            sess.end_of_turn = h.end_of_turn
            for piece in h.pieces:
                sess.said(TranscriptPiece("caller", piece.t0, piece.t1, piece.text))

    def _free_slots(self) -> list[int]:
        reserved = self.starts.reserved()
        return [s for s in self.engine.free_slots() if s not in reserved]

    def _tick(self, deadline: float) -> None:
        cfg = self.config
        run_pending(self._cmds)
        fed: set[int] = set()
        if self.engine.busy():
            feed, waiting = self._gather_inbound()
            fed = set(feed)
            t0 = time.monotonic()
            results = self._step(feed, only=set(self.engine.generator.stepping_rows()) - waiting if waiting else None)
            dt = time.monotonic() - t0
            self.step_est_s = dt if self.steps == 0 else 0.8 * self.step_est_s + 0.2 * dt
            self.steps += 1
            self.metrics.step_seconds.observe(dt)
            if dt > cfg.tick_s:
                self.overruns += 1
                self.metrics.engine_overruns.inc()
                for binding in self._calls.values():
                    binding.session.stats.engine_overruns += 1
            self._deliver(results, time.monotonic(), feed)
        if self.starts.busy:
            self.starts.run(deadline, self._free_slots(), self._on_started, self._on_start_failed)
        self._catch_up(deadline, fed)
        if self.reprime is not None:
            self._reprime(deadline)
        self._police(time.monotonic())

    def _reprime(self, deadline: float) -> None:
        """Re-prime work in what is left of the tick, then (at most) one swap, before the next
        tick steps. Off the clock (`realtime` False) it gets a bounded slice per tick."""
        try:
            self.reprime.run(deadline if self.config.realtime else time.monotonic() + 0.02)
        except Exception as exc:
            # a failed rebuild costs that call its persona for a while (it slides), never the call
            log.exception("reprime_failed")
            self.last_error = str(exc)
            for slot in self.reprime.rebuilding:
                self.reprime.forget(slot)

    def _on_reprime(self, info: Reprimed) -> None:
        self.metrics.reprimes.labels(info.swap).inc()
        self.metrics.reprime_seconds.observe(info.build_s)
        binding = self._calls.get(info.slot)
        if binding is not None:
            binding.session.emit(Reprime(info.frame, info.window, info.swap))

    def _loop(self) -> None:
        name_os_thread("engine")
        cfg = self.config
        next_tick = time.monotonic()
        while self._running.is_set():
            self.ticks += 1
            self._tick(next_tick + cfg.tick_s - TICK_MARGIN_S)
            if cfg.realtime:
                next_tick += cfg.tick_s - self._phase_advance()
                if next_tick - time.monotonic() < -cfg.tick_s:
                    next_tick = time.monotonic()  # fell behind: do not burst to catch up
                self._wait_for_tick(next_tick)
                self.metrics.tick_late_seconds.observe(max(0.0, time.monotonic() - next_tick))
            elif not self.engine.busy() and not self.starts.busy:
                time.sleep(0.005)

    def _phase_advance(self) -> float:
        """How much earlier the next tick may come. Every live call's caller audio arrives on its
        own clock; a frame that completes just after a tick waits a whole tick (standing latency,
        up to 80 ms). When even the call with the least audio left over after this tick's frame
        (`_min_slack_s`) had more than PHASE_MARGIN_S of it, every call's frames complete that much
        before the tick: tick earlier, a few ms at a time, and all calls answer sooner. Nothing
        is dropped; with many calls of random phases the least slack is small and this does
        little, with few calls it saves up to most of a frame."""
        slack, self._min_slack_s = self._min_slack_s, None
        if slack is None or slack <= PHASE_MARGIN_S:
            return 0.0
        return min(slack - PHASE_MARGIN_S, PHASE_STEP_S)

    def _wait_for_tick(self, next_tick: float) -> None:
        """Sleep until the next tick; a start prepared meanwhile is prefilled at once, so it joins
        that tick's step (answer within a tick or two of the call being placed)."""
        while True:
            delay = next_tick - time.monotonic()
            if delay <= 0:
                return
            if not self._wake.wait(delay):
                return
            self._wake.clear()
            run_pending(self._cmds)
            if self.starts.busy:
                self.starts.run(next_tick - TICK_MARGIN_S, self._free_slots(), self._on_started,
                                self._on_start_failed)

    # -- VAD verdicts (VAD thread) -------------------------------------------------------------
    def _on_barge_in(self, sess: CallSession) -> None:
        sess.barge_in()
        self.metrics.barge_ins.inc()
        sess.log.info("barge_in", generation=sess.generation)

    def _on_barge_in_suppressed(self, sess: CallSession) -> None:
        sess.stats.barge_ins_suppressed += 1
        self.metrics.barge_ins_suppressed.inc()
        sess.emit(BargeInSuppressed())
        sess.log.info("barge_in_suppressed")
