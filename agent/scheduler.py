"""The real-time service endpoints plug calls into: many calls on one model, one tick per frame.

One engine thread ticks every 80 ms and steps all calls together; endpoints never wait on the
model and the model never waits on the network. Each tick:
1. runs commands other threads posted (calls placed, hung up);
2. steps every busy slot once: live calls consume a frame of their caller's audio (silence if it
   has not all arrived yet, counted as late; the audio that did arrive is kept for later), and
   calls whose prompt was just prefilled emit their first frame;
3. in the time left before the next tick: starts calls (`agent.starts`: the prompt phase as one
   forward), then catches up calls whose caller audio is waiting (an extra step for just those
   calls), so a late tick costs latency for a moment, never the caller's words;
4. applies the call policy (`agent.policy`).
Capacity is fixed at start (the batch size); calls over it are refused at once. Barge-in VAD
runs on its own thread for all calls as one batch (`agent.vad`); end-of-call accounting lives in
`agent.ledger`.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import structlog

from agent.barge_in import BargeInConfig
from agent.commands import run_pending
from agent.engine import Engine, FrameOut
from agent.errors import AgentError
from agent.events import BargeInSuppressed, CallState, Ended, EndReason
from agent.generator import Phase
from agent.ledger import Ledger
from agent.metrics import Metrics
from agent.model_loader import LoadedModel
from agent.personas.schema import Persona
from agent.policy import CallPolicy, PolicyConfig
from agent.sampling import SamplingParams
from agent.session import CallSession
from agent.starts import StartLane, StartRequest
from agent.timebase import FRAME, FRAME_S, SAMPLE_RATE
from agent.vad import VadVerdicts, VadWorker

log = structlog.get_logger(__name__)

TICK_MARGIN_S = 0.004  # spare-time work stops this long before the next tick is due
PHASE_MARGIN_S = 0.025  # caller audio kept ahead of the tick: more than a 20 ms packet, for jitter
PHASE_STEP_S = 0.005  # the tick moves at most this much earlier per tick


class CallRefused(AgentError):
    """A call that cannot be taken; `code` maps to SIP/HTTP answers at the endpoint."""

    def __init__(self, reason: str, code: str, retry_after: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.code = code  # "busy", "draining", "unavailable"
        self.retry_after = retry_after


@dataclass
class SchedulerConfig:
    max_calls: int = 4
    tick_s: float = FRAME_S
    realtime: bool = True  # False: step as fast as possible (benchmarks, long-call tests)
    max_call_seconds: float | None = 230.0
    context_policy: str = "hangup"  # "hangup" at the context limit, or "slide" (the prompt falls out)
    outbound_depth: int = 2
    max_latency_ms: float = 400.0  # caller audio older than this is dropped (counted)
    idle_timeout_s: float = 20.0
    retry_after_s: int = 5
    prefill_batch: int = 4  # calls prefilled together in one forward
    inbound_wait_ticks: int = 2  # ticks a call waits for its caller frame before hearing silence
    allow_voice_paths: bool = True  # persona files are trusted configuration
    barge_in: BargeInConfig = field(default_factory=BargeInConfig)
    default_sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        if self.context_policy not in ("hangup", "slide"):
            raise ValueError("context_policy must be 'hangup' or 'slide'")
        if self.max_calls < 1:
            raise ValueError("max_calls must be at least 1")


class Scheduler:
    def __init__(self, model: LoadedModel, config: SchedulerConfig | None = None, metrics: Metrics | None = None):
        self.model = model
        self.config = cfg = config or SchedulerConfig()
        self.metrics = metrics or Metrics()
        self.metrics.capacity.set(cfg.max_calls)
        self.engine = Engine(model, cfg.max_calls, cfg.default_sampling)
        self._wake = threading.Event()  # a start was prepared: prefill it before the next tick
        self.starts = StartLane(self.engine, cfg.prefill_batch, cfg.allow_voice_paths,
                                on_prefill=self.metrics.prefill_seconds.observe, on_prepared=self._wake.set,
                                on_prompt_cut=lambda sess, n: self.metrics.prompt_items_dropped.inc(n))
        self.policy = CallPolicy(PolicyConfig(model.context, cfg.context_policy, cfg.max_call_seconds,
                                              cfg.idle_timeout_s),
                                 on_context_limit=lambda s: self.metrics.calls_at_context_limit.inc())
        self.ledger = Ledger(self.metrics)
        self.vad = VadWorker(VadVerdicts(self._on_barge_in, self._on_barge_in_suppressed)) \
            if cfg.barge_in.enabled else None
        self._calls: dict[int, CallSession] = {}  # slot -> call
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
            for sess in list(self._calls.values()):
                self._end(sess, reason)
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
        sess = CallSession(persona, "-", "warm-up", BargeInConfig(enabled=False), call_id=f"warm-up-{k}")
        sess.log = log.bind(call_id=sess.call_id)
        sess.push_audio(np.zeros(3 * FRAME, np.float32))  # consumed by a live step and catch-ups
        self._uncounted.add(sess.call_id)
        self.starts.submit(StartRequest(sess, voice, prompt, SamplingParams(), None))

        def warmed() -> bool:  # by our own call, or by real calls that came first
            return any(s.stats.frames_out >= 3 for s in [sess, *self._calls.values()])
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
        return list(self._calls.values())

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
                           call_id=call_id, caller=caller)
        sess.placed_tick = self.ticks
        sess.on_hangup = lambda s, reason: self._cmds.put(lambda: self._end(s, reason))
        if self.vad is not None:
            vad = self.vad
            sess.on_audio_in = lambda s, pcm: vad.audio(s, pcm)
        self.ledger.started(sess)
        return sess

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
        persona = sess.persona
        sampling = persona.sampling(self.config.default_sampling)
        sess.log.info("call_start", voice=persona.voice, sampling=dataclasses.asdict(sampling))
        self.starts.submit(StartRequest(sess, persona.voice, prompt, sampling, seed, variables))

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
    def _on_started(self, slot: int, sess: CallSession) -> None:
        if sess.state is CallState.ENDED:  # hung up while its prompt was being prefilled
            self.engine.release(slot)
            return
        sess.slot = slot
        self._calls[slot] = sess
        sess.set_state(CallState.ANSWERING)

    def _on_start_failed(self, sess: CallSession, reason: EndReason, error: str) -> None:
        sess.log.error("call_setup_failed", error=error)
        self.last_error = error
        self._end(sess, reason)

    def _end(self, sess: CallSession, reason: EndReason) -> None:
        if sess.state is CallState.ENDED:
            return
        slot = sess.slot
        if slot is not None and self._calls.get(slot) is sess:
            del self._calls[slot]
            self.engine.release(slot)
        sess.ended_at = time.monotonic()
        sess.end_reason = reason
        sess.set_state(CallState.ENDED)
        sess.emit(Ended(reason))
        if self.vad is not None:
            self.vad.forget(sess.call_id)
        if sess.call_id in self._uncounted:
            self._uncounted.discard(sess.call_id)
            return
        with self._admit_lock:
            self._admitted -= 1
        self._account_dropped(sess)
        self._dropped_seen.pop(sess.call_id, None)
        self.ledger.ended(sess, reason)

    def _account_dropped(self, sess: CallSession) -> None:
        now = sess.stats.caller_dropped_samples
        before = self._dropped_seen.get(sess.call_id, 0)
        if now > before:
            self._dropped_seen[sess.call_id] = now
            self.metrics.caller_audio_dropped.inc((now - before) / SAMPLE_RATE)

    def _deliver(self, results: dict[int, FrameOut], now: float, feed: dict[int, np.ndarray]) -> None:
        for slot, out in results.items():
            sess = self._calls.get(slot)
            if sess is None:
                continue
            try:
                if out.first:
                    sess.answered_at = now
                    sess.answer_ticks = self.ticks - sess.placed_tick
                    if sess.call_id not in self._uncounted:
                        self.metrics.answer_seconds.observe(now - sess.created)
                    sess.set_state(CallState.LIVE)
                else:
                    sess.live_frames += 1
                sess.deliver(out.pcm, out.text, now)
                if sess.recorder is not None:
                    sess.recorder(feed.get(slot), out.pcm, out.text, sess.stats.frames_out)
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
        for slot, sess in list(self._calls.items()):
            if self.engine.phase(slot) is not Phase.LIVE:
                continue
            try:
                frame = sess.take_inbound()
                if frame is None and sess.waited_ticks < self.config.inbound_wait_ticks:
                    sess.waited_ticks += 1
                    waiting.add(slot)
                    continue
                if frame is None:
                    frame = np.zeros(FRAME, dtype=np.float32)
                    sess.stats.late_inbound += 1
                    if sess.call_id not in self._uncounted:
                        self.metrics.late_inbound.inc()
                else:
                    sess.waited_ticks = 0
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
            rows = [slot for slot, sess in self._calls.items()
                    if slot in fed and self.engine.phase(slot) is Phase.LIVE and sess.inbound_samples >= FRAME]
            if not rows:
                return
            if self.config.realtime and time.monotonic() + self.step_est_s > deadline:
                return
            feed = {}
            for slot in rows:
                sess = self._calls[slot]
                feed[slot] = sess.take_inbound()
                sess.stats.frames_in += 1
                sess.stats.catch_up_steps += 1
            self.metrics.catch_up_steps.inc(len(rows))
            results = self._step(feed, only=set(rows))
            self._deliver(results, time.monotonic(), feed)
            if not self.config.realtime:
                return

    def _police(self, now: float) -> None:
        for slot, sess in list(self._calls.items()):
            reason = self.policy.verdict(sess, self.engine.position(slot), now)
            if reason is not None:
                self._end(sess, reason)
            else:
                self._account_dropped(sess)

    def _step(self, feed, only=None) -> dict:
        try:
            return self.engine.step(feed, only=only)
        except Exception as exc:
            # the batch is shared: a failing step cannot be pinned on one call, so end them all
            log.exception("engine_step_failed")
            self.last_error = str(exc)
            for sess in list(self._calls.values()):
                self._end(sess, EndReason.FAILED)
            for slot in range(self.engine.max_slots):
                if self.engine.phase(slot) is not Phase.FREE and slot not in self.starts.reserved():
                    self.engine.release(slot)
            return {}

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
                for sess in self._calls.values():
                    sess.stats.engine_overruns += 1
            self._deliver(results, time.monotonic(), feed)
        if self.starts.busy:
            self.starts.run(deadline, self._free_slots(), self._on_started, self._on_start_failed)
        self._catch_up(deadline, fed)
        self._police(time.monotonic())

    def _loop(self) -> None:
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
