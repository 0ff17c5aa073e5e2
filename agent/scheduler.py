"""The real-time service endpoints plug calls into: many calls on one model.

One engine thread ticks every 80 ms and steps all active calls together; endpoints never wait
on the model and the model never waits on the network (late caller audio becomes silence, late
engine output becomes silence at the endpoint; both are counted). New calls start from a
snapshot of their persona's prompt phase when one exists (answer latency: one frame); the first
call of a persona runs the prompt itself and leaves the snapshot behind. Spare time inside a
tick runs extra prompt steps, so cold starts finish faster than real time without delaying
live calls. Capacity is fixed at start (the batch size); calls over it are refused at once.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import structlog

from agent.barge_in import BargeInConfig, SileroVad
from agent.commands import run_pending
from agent.engine import Engine
from agent.errors import AgentError
from agent.generator import GeneratorSnapshot, Phase
from agent.metrics import Metrics
from agent.model_loader import LoadedModel
from agent.personas.schema import Persona
from agent.sampling import SamplingParams
from agent.session import FRAME, CallSession

log = structlog.get_logger(__name__)

FRAME_RATE = 12.5


class CallRefused(AgentError):
    """A call that cannot be taken; `code` maps to SIP/HTTP answers at the endpoint."""

    def __init__(self, reason: str, code: str, retry_after: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.code = code  # "busy", "draining", "not_found", "unavailable"
        self.retry_after = retry_after


@dataclass
class SchedulerConfig:
    max_calls: int = 4
    tick_s: float = 0.08
    realtime: bool = True  # False: step as fast as possible (benchmarks)
    max_call_seconds: float | None = 230.0
    context_policy: str = "hangup"  # "hangup" at the context limit, or "slide" (the prompt falls out)
    outbound_depth: int = 2
    inbound_backlog: int = 3
    idle_timeout_s: float = 20.0
    retry_after_s: int = 5
    prewarm: bool = True
    allow_voice_paths: bool = True  # persona files are trusted configuration
    barge_in: BargeInConfig = field(default_factory=BargeInConfig)
    default_sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        if self.context_policy not in ("hangup", "slide"):
            raise ValueError("context_policy must be 'hangup' or 'slide'")
        if self.max_calls < 1:
            raise ValueError("max_calls must be at least 1")


def snapshot_key(persona: Persona) -> tuple[str, str]:
    return (persona.voice, persona.prompt)


class Scheduler:
    def __init__(self, model: LoadedModel, config: SchedulerConfig | None = None, metrics: Metrics | None = None):
        self.model = model
        self.config = config or SchedulerConfig()
        self.metrics = metrics or Metrics()
        self.metrics.capacity.set(self.config.max_calls)
        # one spare row builds snapshots without ever taking a call's place
        self.engine = Engine(model, self.config.max_calls + 1, self.config.default_sampling)
        self.spare = self.config.max_calls
        self.snapshots: dict[tuple[str, str], GeneratorSnapshot] = {}
        self._calls: dict[int, CallSession] = {}
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self._building: tuple[str, str] | None = None
        self._build_queue: list[tuple[tuple[str, str], Persona]] = []
        self._cmds: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        self._vad_q: queue.SimpleQueue = queue.SimpleQueue()
        self._vads: dict[str, SileroVad] = {}
        self._vad_thread: threading.Thread | None = None
        self.draining = False
        self.ticks = 0
        self.overruns = 0
        self._prompt_step_s = 0.0
        self.last_error: str | None = None
        self.on_call_start: list[Callable[[CallSession], None]] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._running.set()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        if self.config.barge_in.enabled:
            self._vad_thread = threading.Thread(target=self._vad_loop, name="vad", daemon=True)
            self._vad_thread.start()

    def stop(self, reason: str = "shutdown") -> None:
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
        if self._vad_thread is not None:
            self._vad_q.put(None)
            self._vad_thread.join(timeout=5)
            self._vad_thread = None
        self.engine.close()

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

    # -- calls ----------------------------------------------------------------------------------
    def place_call(self, persona: Persona, number: str, endpoint: str, seed: int | None = None,
                   call_id: str | None = None) -> CallSession:
        """Admit a call (or raise CallRefused at once). Audio starts within a frame when the
        persona has a snapshot; otherwise after its prompt phase (faster than real time)."""
        if self.draining:
            self.metrics.calls_total.labels(endpoint, "refused_draining").inc()
            raise CallRefused("the agent is shutting down", "draining", self.config.retry_after_s)
        if not self.running:
            raise CallRefused("the engine is not running", "unavailable", self.config.retry_after_s)
        with self._admit_lock:
            if self._admitted >= self.config.max_calls:
                self.metrics.calls_total.labels(endpoint, "refused_busy").inc()
                raise CallRefused(f"all {self.config.max_calls} call slots are busy", "busy",
                                  self.config.retry_after_s)
            self._admitted += 1
        try:
            sess = CallSession(persona, number, endpoint, self.config.barge_in, self.config.outbound_depth,
                               self.config.inbound_backlog, call_id=call_id)
            sess.placed_tick = self.ticks
            key = snapshot_key(persona)
            snap = self.snapshots.get(key)
            sampling = persona.sampling(self.config.default_sampling)
            schedule = rng = None
            if snap is None:
                schedule = self.engine.schedule(persona.voice, persona.prompt,
                                                allow_voice_paths=self.config.allow_voice_paths)
            else:  # the random stream is advanced here, not on the engine thread
                rng = self.engine.generator.prepared_rng(sampling, seed, snap.rows.positions)
        except Exception:
            with self._admit_lock:
                self._admitted -= 1
            raise
        sess.on_hangup = lambda s, reason: self._cmds.put(lambda: self._end(s, reason))
        if self.config.barge_in.enabled:
            sess.on_audio_in = lambda s, pcm: self._vad_q.put((s, pcm))
        self._cmds.put(lambda: self._assign(sess, schedule, sampling, seed, snap, rng))
        self.metrics.active_calls.labels(endpoint).inc()
        for hook in self.on_call_start:
            try:
                hook(sess)
            except Exception:
                sess.log.exception("call_start_hook_failed")
        sess.log.info("call_start", snapshot=schedule is None)
        return sess

    def prewarm(self, personas: list[Persona]) -> None:
        """Build prompt snapshots for these personas in the background (spare row), and drop
        snapshots no persona uses any more. With `prewarm` off, only the dropping happens:
        snapshots are then built by each persona's first call."""
        wanted = {snapshot_key(p): p for p in personas}

        def update():
            for key in list(self.snapshots):
                if key not in wanted:
                    del self.snapshots[key]  # persona changed or removed
            self._build_queue = ([(k, p) for k, p in wanted.items() if k not in self.snapshots]
                                 if self.config.prewarm else [])
        self._cmds.put(update)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no snapshot build is queued or running (tests, start-up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            flag = threading.Event()
            self._cmds.put(lambda: flag.set() if not self._build_queue and self._building is None else None)
            time.sleep(0.05)
            if flag.is_set():
                return True
        return False

    # -- engine thread --------------------------------------------------------------------------
    def _assign(self, sess: CallSession, schedule, sampling: SamplingParams, seed: int | None,
                snap: GeneratorSnapshot | None = None, rng=None) -> None:
        free = [r for r in self.engine.free_slots() if r != self.spare and r not in self._calls]
        if not free:  # cannot happen with admission control; never crash the loop over it
            sess.log.error("no_free_slot")
            self._end(sess, "failed")
            return
        slot = free[0]
        sess.slot = slot
        self._calls[slot] = sess
        if snap is None:
            snap = self.snapshots.get(snapshot_key(sess.persona))
            rng = None
        try:
            if snap is not None:
                self.engine.restore(slot, snap, sampling, seed, rng)
                sess.from_snapshot = True
            else:
                if schedule is None:
                    schedule = self.engine.schedule(sess.persona.voice, sess.persona.prompt,
                                                    allow_voice_paths=self.config.allow_voice_paths)
                self.engine.start(slot, schedule, sampling, seed, hold_before_last=True)
            sess.set_state("answering")
        except Exception as exc:
            sess.log.exception("call_setup_failed")
            self.last_error = str(exc)
            self._end(sess, "failed")

    def _end(self, sess: CallSession, reason: str) -> None:
        if sess.state == "ended":
            return
        slot = sess.slot
        if slot is not None and self._calls.get(slot) is sess:
            del self._calls[slot]
            self.engine.release(slot)
        sess.ended_at = time.monotonic()
        sess.end_reason = reason
        sess.set_state("ended")
        sess.emit("ended", reason=reason)
        self._vad_q.put(("forget", sess.call_id))
        with self._admit_lock:
            self._admitted -= 1
        self.metrics.active_calls.labels(sess.endpoint).dec()
        outcome = "answered" if sess.answered_at else ("failed" if reason == "failed" else "abandoned")
        self.metrics.calls_total.labels(sess.endpoint, outcome).inc()
        st = sess.stats
        sess.log.info("call_end", reason=reason, duration_s=round(sess.duration, 2), frames_in=st.frames_in,
                      frames_out=st.frames_out, late_frames=st.late_inbound, barge_ins=st.barge_ins,
                      barge_ins_suppressed=st.barge_ins_suppressed, caller_peak=round(st.caller_peak, 4),
                      playout_underruns=st.playout_underruns, engine_overruns=st.engine_overruns,
                      from_snapshot=sess.from_snapshot)

    def _run_commands(self) -> None:
        run_pending(self._cmds)

    def _start_builds(self) -> None:
        if self._building is not None or not self._build_queue or self.spare not in self.engine.free_slots():
            return
        key, persona = self._build_queue.pop(0)
        if key in self.snapshots:
            return
        try:
            sch = self.engine.schedule(persona.voice, persona.prompt, allow_voice_paths=self.config.allow_voice_paths)
        except Exception as exc:
            log.warning("snapshot_build_skipped", persona=persona.id, error=str(exc))
            return
        self.engine.start(self.spare, sch, SamplingParams(greedy=True), hold_before_last=True)
        self._building = key

    def _collect_snapshots(self) -> None:
        for slot in range(self.engine.max_slots):
            if not self.engine.held(slot):
                continue
            snap = self.engine.capture(slot)
            sess = self._calls.get(slot)
            key = (snapshot_key(sess.persona) if sess is not None else self._building)
            if key is not None and key not in self.snapshots:
                self.snapshots[key] = snap
                self.metrics.snapshot_builds.inc()
                log.info("snapshot_built", voice=key[0], steps=snap.schedule.steps, mbytes=round(snap.nbytes() / 2**20, 2))
            if slot == self.spare and sess is None:
                self.engine.release(slot)
                self._building = None
            else:
                self.engine.generator.slots[slot].hold_before_last = False

    def _deliver(self, results, now: float, feed: dict | None = None) -> None:
        for slot, out in results.items():
            sess = self._calls.get(slot)
            if sess is None:
                continue
            try:
                if out.first:
                    sess.answered_at = now
                    sess.answer_ticks = self.ticks - sess.placed_tick
                    self.metrics.answer_seconds.labels(str(sess.from_snapshot).lower()).observe(now - sess.created)
                    sess.set_state("live")
                else:
                    sess.live_frames += 1
                sess.deliver(out.pcm, out.text, now)
                if sess.recorder is not None:
                    sess.recorder((feed or {}).get(slot), out.pcm, out.text, sess.stats.frames_out)
            except Exception:
                sess.log.exception("deliver_failed")
                self._end(sess, "failed")

    def _gather_inbound(self) -> dict[int, np.ndarray]:
        feed: dict[int, np.ndarray] = {}
        for slot, sess in list(self._calls.items()):
            if self.engine.phase(slot) is not Phase.LIVE:
                continue
            try:
                frame = sess.take_inbound()
                if frame is None:
                    frame = np.zeros(FRAME, dtype=np.float32)
                    sess.stats.late_inbound += 1
                    self.metrics.late_inbound.inc()
                sess.stats.frames_in += 1
                feed[slot] = frame
            except Exception:
                sess.log.exception("inbound_failed")
                self._end(sess, "failed")
        return feed

    def _police_calls(self, now: float) -> None:
        context = self.model.context
        for slot, sess in list(self._calls.items()):
            steps = self.engine.generator.slots[slot].offset
            limit_frames = None
            if self.config.max_call_seconds:
                limit_frames = int(self.config.max_call_seconds * FRAME_RATE)
            if steps >= context - 1:
                if self.config.context_policy == "hangup":
                    self.metrics.calls_at_context_limit.inc()
                    self._end(sess, "context_limit")
                    continue
                if not getattr(sess, "_context_counted", False):
                    sess._context_counted = True  # type: ignore[attr-defined]
                    self.metrics.calls_at_context_limit.inc()
                    sess.log.warning("context_full_sliding", steps=steps)
            if limit_frames is not None and sess.live_frames >= limit_frames:
                self._end(sess, "max_duration")
                continue
            if now - sess.last_activity > self.config.idle_timeout_s:
                self._end(sess, "endpoint_timeout")

    def _step(self, feed, only=None) -> dict:
        try:
            return self.engine.step(feed, only=only)
        except Exception as exc:
            # the batch is shared: a failing step cannot be pinned on one call, so end them all
            log.exception("engine_step_failed")
            self.last_error = str(exc)
            for sess in list(self._calls.values()):
                self._end(sess, "failed")
            for slot in range(self.engine.max_slots):
                if self.engine.phase(slot) is not Phase.FREE:
                    self.engine.release(slot)
            self._building = None
            return {}

    def _loop(self) -> None:
        cfg = self.config
        next_tick = time.monotonic()
        while self._running.is_set():
            self._run_commands()
            self._start_builds()
            if self.engine.busy():
                feed = self._gather_inbound()
                t0 = time.monotonic()
                results = self._step(feed)
                dt = time.monotonic() - t0
                self.metrics.step_seconds.observe(dt)
                self.ticks += 1
                if dt > cfg.tick_s:
                    self.overruns += 1
                    self.metrics.engine_overruns.inc()
                    for sess in self._calls.values():
                        sess.stats.engine_overruns += 1
                now = time.monotonic()
                self._deliver(results, now, feed)
                self._collect_snapshots()
                self._extra_prompt_steps(next_tick + cfg.tick_s)
                self._police_calls(now)
            if cfg.realtime:
                next_tick += cfg.tick_s
                delay = next_tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -cfg.tick_s:
                    next_tick = time.monotonic()  # fell behind: do not burst to catch up
            elif not self.engine.busy():
                time.sleep(0.005)

    def _extra_prompt_steps(self, deadline: float) -> None:
        """Use the rest of the tick to advance prompt phases (cold calls, snapshot builds)."""
        while True:
            rows = {b for b in self.engine.generator.stepping_rows()
                    if self.engine.phase(b) is Phase.PROMPT}
            if not rows:
                return
            margin = max(self._prompt_step_s * 1.5, 0.002)
            if self.config.realtime and time.monotonic() + margin > deadline - 0.005:
                return
            t0 = time.monotonic()
            results = self._step({}, only=rows)
            self._prompt_step_s = 0.8 * self._prompt_step_s + 0.2 * (time.monotonic() - t0)
            self._deliver(results, time.monotonic())
            self._collect_snapshots()
            self._run_commands()
            self._start_builds()
            if not self.config.realtime:
                return

    # -- VAD thread -----------------------------------------------------------------------------
    def _vad_loop(self) -> None:
        # One model per concurrent call, loaded up front: loading during calls would hold the
        # GIL for tens of ms per call and stall the engine thread.
        pool = [SileroVad() for _ in range(self.config.max_calls)]
        while True:
            item = self._vad_q.get()
            if item is None:
                return
            if item[0] == "forget":
                vad = self._vads.pop(item[1], None)
                if vad is not None:
                    vad.reset()
                    pool.append(vad)
                continue
            sess, pcm = item
            if sess.state == "ended":
                continue
            try:
                vad = self._vads.get(sess.call_id)
                if vad is None:
                    vad = self._vads[sess.call_id] = pool.pop() if pool else SileroVad()
                for prob in vad.feed(pcm):
                    now = time.monotonic()
                    with sess._lock:
                        verdict = sess.detector.on_vad(prob, now)
                    if verdict == "barge_in":
                        sess.barge_in()
                        self.metrics.barge_ins.inc()
                        sess.log.info("barge_in", generation=sess.generation)
                    elif verdict == "suppressed":
                        sess.stats.barge_ins_suppressed += 1
                        self.metrics.barge_ins_suppressed.inc()
                        sess.log.info("barge_in_suppressed")
            except Exception:
                sess.log.exception("vad_failed")
