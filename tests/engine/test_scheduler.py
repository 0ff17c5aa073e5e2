"""The call scheduler: answer within two ticks whatever the prompt, caller audio kept whole, admission,
isolation, long calls, context policy."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.barge_in.detector import BargeInConfig
from agent.calls.events import CallState, EndReason, StateChanged
from agent.personas import load_persona_dir
from agent.calls.scheduler import TICK_MARGIN_S, CallRefused, Scheduler, SchedulerConfig
from agent.calls.session import FRAME
from agent.model.voices import STOCK_VOICES
from tests.support import machine_cannot, poll, speechlike

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def personas():
    return load_persona_dir(ROOT / "personas", STOCK_VOICES)


@pytest.fixture
def make_scheduler(demo_model):
    made = []

    def make(warm: bool = True, **kw):
        kw.setdefault("barge_in", BargeInConfig(enabled=False))
        s = Scheduler(demo_model, SchedulerConfig(**kw))
        s.start()
        made.append(s)
        if warm:
            assert s.warm_up("NATF0", "Hello.")
        return s
    yield make
    for s in made:
        s.stop()


def wait_for(cond, timeout=20.0):
    """Until cond() holds (bounded): tests wait on engine progress, never on fixed sleeps."""
    return poll(cond, bool, timeout, step=0.02)


def record_consumed(sch) -> dict[str, list]:
    """call_id -> the caller frames the model consumed, in order (None: nothing fed)."""
    consumed: dict[str, list] = {}

    def attach(sess):
        frames = consumed.setdefault(sess.call_id, [])
        sess.add_frame_tap(lambda caller, agent, text, index: frames.append(caller))
    sch.on_call_start.append(attach)
    return consumed


class Caller(threading.Thread):
    """Talks from the instant the call is answered: `signal` in 20 ms packets at real-time pace,
    pulling the agent's frames as an endpoint would."""

    def __init__(self, sess, signal: np.ndarray):
        super().__init__(daemon=True)
        self.sess, self.signal = sess, signal
        self.heard = []
        self.pushed = 0

    def run(self) -> None:
        wait_for(lambda: self.sess.state in (CallState.LIVE, CallState.ENDED), 20)
        t0 = time.monotonic()
        i = 0
        while i < len(self.signal) and self.sess.state is not CallState.ENDED:
            self.sess.push_audio(self.signal[i:i + 480])
            i += 480
            self.pushed = i
            f = self.sess.pull_frame()
            if f is not None:
                self.heard.append(f)
            time.sleep(max(0.0, t0 + i / 24000 - time.monotonic()))


def room_for_catch_up(sch: Scheduler) -> bool:
    """Whether a second step fits in a tick on this machine (the scheduler's own step estimate):
    catch-up steps are only promised then. On a slower machine a backlog is consumed one frame
    per tick instead, still whole and in order (the tests check that either way)."""
    return 2 * sch.step_est_s < sch.config.tick_s - TICK_MARGIN_S


def need_room_for_catch_up(sch: Scheduler) -> None:
    """The catch-up promise is checked only where it is made: on a machine where two steps do
    not fit a tick the check skips, saying so (and fails under CI, see `machine_cannot`); the
    test's other assertions have run by then."""
    if not room_for_catch_up(sch):
        machine_cannot(f"catch-up steps are promised only when two steps fit a tick: a step takes "
                       f"{sch.step_est_s * 1000:.0f} ms here, the tick {sch.config.tick_s * 1000:.0f} ms")


def talk(sessions, seconds: float, seed0: int = 1) -> list[Caller]:
    callers = [Caller(s, speechlike(seconds, seed0 + k)) for k, s in enumerate(sessions)]
    for c in callers:
        c.start()
    return callers


def caller_signal(seconds: float, seed: int) -> np.ndarray:
    """Noise with no silent frame, a whole number of frames long: each consumed frame is
    recognisable, and inserted silence cannot be mistaken for it."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 12.5) * FRAME
    return (np.sign(rng.standard_normal(n)) * rng.uniform(0.05, 0.3, n)).astype(np.float32)


def spoken(frames: list) -> np.ndarray:
    """What the model heard of the caller, inserted silence (late ticks) left out."""
    return np.concatenate([f for f in frames if f is not None and np.any(f)] or [np.zeros(0, np.float32)])


def spoken_once_consumed(frames: list, n: int) -> np.ndarray:
    """`spoken(frames)` once `n` samples of speech have been through the model (a frame taken
    from the inbound buffer is recorded when its step is done)."""
    return poll(lambda: spoken(frames), lambda heard: len(heard) >= n, 5, step=0.02)


def assert_signal_less_counted_cuts(heard: np.ndarray, signal: np.ndarray, cut: int) -> None:
    """`heard` is `signal` with `cut` samples taken out, the rest in order and unchanged (a
    greedy subsequence match: the signal's noise values are all but unique)."""
    assert len(heard) == len(signal) - cut, (len(heard), len(signal), cut)
    sig, j = signal.tolist(), 0
    for i, v in enumerate(heard.tolist()):
        while j < len(sig) and sig[j] != v:
            j += 1
        assert j < len(sig), f"heard sample {i} is not the signal's next (reordered or altered)"
        j += 1


def test_any_prompt_answers_within_two_ticks_with_calls_live(make_scheduler, personas):
    sch = make_scheduler(max_calls=6)
    citysan = personas.route("1001")
    background = [sch.place_call(citysan, "1001", "test") for _ in range(3)]
    callers = talk(background, 4.0)
    assert wait_for(lambda: all(s.state is CallState.LIVE for s in background), 10)
    states: list[list] = []
    for k in range(3):  # prompts never seen before, one per caller
        prompt = (f"You work for Acme {k} which is a plumbing service and your name is Sam. "
                  f"Information: Verify customer name Caller Number {k}. Upcoming visit: day {k + 3}.")
        sess = sch.place_call(citysan, "1001", "test", prompt=prompt)
        seen = []
        sess.subscribe(lambda ev, seen=seen: seen.append(ev.state) if isinstance(ev, StateChanged) else None)
        states.append(seen)
        assert wait_for(lambda: sess.state is CallState.LIVE, 10)
        # a tick or two (one more tolerated: a loaded 2-core CI machine can push a prefill over)
        assert sess.answer_ticks is not None and sess.answer_ticks <= 3, sess.answer_ticks
        assert sess.prompt == prompt
        sess.hangup()
    for c in callers:
        c.join()
    assert all(seen[:2] == [CallState.ANSWERING, CallState.LIVE] for seen in states)
    assert all(len(c.heard) >= 30 for c in callers)  # the live calls kept getting frames


def test_calls_placed_during_warm_up_go_live_promptly(make_scheduler, personas):
    """Calls that arrive while the call path is still warming up are not left cold."""
    sch = make_scheduler(warm=False, max_calls=2)
    warming = threading.Thread(target=sch.warm_up, args=("NATF2", personas.route("1001").prompt))
    warming.start()
    calls = [sch.place_call(personas.route(n), n, "test") for n in ("1001", "1002")]
    callers = talk(calls, 1.5)
    warming.join()
    assert sch.warm.is_set()
    for c in callers:
        c.join()
    for s in calls:
        assert s.state is CallState.LIVE and s.answer_ticks <= 4, s.answer_ticks
        assert s.stats.frames_out >= 15


def test_the_first_call_is_no_slower_than_the_tenth(demo_model, personas):
    """As the server starts: voices preloaded and the call path run once before taking calls."""
    sch = Scheduler(demo_model, SchedulerConfig(max_calls=1, barge_in=BargeInConfig(enabled=False)))
    sch.start()
    sch.preload_voices(personas.personas())
    assert sch.warm_up("NATF0", "Hello.")
    ticks = []
    for k in range(10):
        p = personas.route(str(1001 + k % 6))
        sess = sch.place_call(p, "x", "test", prompt=f"{p.prompt} Reference number {k}.")
        assert wait_for(lambda: sess.state is CallState.LIVE, 10)
        ticks.append(sess.answer_ticks)
        sess.hangup()
        assert wait_for(lambda: sch.capacity_left == 1, 5)
    sch.stop()
    # the first is within the bound every call meets (two ticks; three on a loaded machine)
    assert max(ticks) <= 3 and ticks[0] <= max(2, *ticks[1:]), ticks


def test_no_caller_audio_lost_across_a_stalled_tick(make_scheduler, personas):
    """The call record's caller channel (what the model consumed) holds all the caller said, in
    order, though a tick ran 250 ms late while other calls were up."""
    sch = make_scheduler(max_calls=3)
    consumed = record_consumed(sch)
    p = personas.route("1001")
    others = [sch.place_call(p, "1001", "test") for _ in range(2)]
    talk(others, 3.0, seed0=5)
    sess = sch.place_call(p, "1001", "test")
    signal = caller_signal(2.4, 7)
    caller = Caller(sess, signal)
    caller.start()
    assert wait_for(lambda: caller.pushed > 12000, 10)
    sch._cmds.put(lambda: time.sleep(0.25))  # the engine thread stalls: a late tick
    caller.join()
    dropped = sess.stats.caller_dropped_samples
    heard = spoken_once_consumed(consumed[sess.call_id], len(signal) - dropped)
    if dropped:
        # an engine slower than real time throughout (a loaded machine): the latency bound cut
        # audio, and every sample it cut was counted; what the model heard is the rest, in order
        assert_signal_less_counted_cuts(heard, signal, dropped)
        machine_cannot(f"the engine overran {sess.stats.engine_overruns} of {sess.stats.frames_in} ticks "
                       f"besides the stall: too slow here to promise every sample (the cut was counted)")
    np.testing.assert_array_equal(heard, signal)  # every sample, in order
    need_room_for_catch_up(sch)
    assert sess.stats.catch_up_steps >= 2  # the stall's backlog was stepped through, not trimmed


def test_how_late_the_engine_wakes_for_its_tick_is_measured(make_scheduler):
    """Every tick's wake-up, calls or not, goes into personaplex_tick_late_seconds (what
    bench_media compares with transports busy against an idle server); a stalled engine thread
    shows there as lateness."""
    sch = make_scheduler(warm=False, max_calls=1)

    def late(what: str) -> float:
        return sch.metrics.registry.get_sample_value(f"personaplex_tick_late_seconds_{what}") or 0.0
    assert wait_for(lambda: late("count") >= 3, 5)  # no call up: measured all the same
    before = late("sum")
    sch._cmds.put(lambda: time.sleep(0.12))  # the engine thread held up for longer than a tick
    sch._wake.set()
    assert wait_for(lambda: late("sum") - before >= 0.03, 5), late("sum") - before


def test_late_caller_audio_is_silence_then_caught_up(make_scheduler, personas):
    """A frame that has not arrived by its tick: the model hears silence then, and hears the
    audio itself as soon as it arrives (a catch-up step), not a tick per frame later."""
    sch = make_scheduler(max_calls=1)
    consumed = record_consumed(sch)
    sess = sch.place_call(personas.route("1001"), "1001", "test")
    assert wait_for(lambda: sess.state is CallState.LIVE, 10)
    frames = consumed[sess.call_id]
    n0 = len(frames)
    assert wait_for(lambda: len(frames) >= n0 + 3, 5)  # nothing pushed: silence fed, counted
    late = sess.stats.late_inbound
    assert late >= 2 and all(f is not None and not np.any(f) for f in frames[n0 + 1:n0 + 3])
    burst = caller_signal(0.24, 3)  # three frames arrive at once
    at = len(frames)
    ticks0 = sch.ticks
    sess.push_audio(burst)
    assert wait_for(lambda: len(spoken(frames[at:])) >= len(burst), 5)
    np.testing.assert_array_equal(spoken(frames[at:]), burst)
    assert sch.metrics.late_inbound._value.get() >= late
    need_room_for_catch_up(sch)
    assert sch.ticks - ticks0 <= 2  # consumed within a tick or two, not one frame per tick
    assert sess.stats.catch_up_steps >= 1


def test_a_backlog_is_stepped_through_by_catch_up_steps(make_scheduler, personas):
    """The catch-up path itself, whatever this machine's speed: unpaced (no tick deadline), every
    tick gives a call with a whole frame left over one extra step, so a burst is consumed two
    frames a tick, whole and in order."""
    sch = make_scheduler(warm=False, max_calls=1, realtime=False)
    consumed = record_consumed(sch)
    sess = sch.place_call(personas.route("1001"), "1001", "test")
    assert wait_for(lambda: sess.state is CallState.LIVE, 10)
    burst = caller_signal(0.32, 4)  # four frames at once (within the 400 ms latency bound)
    sess.push_audio(burst)
    heard = spoken_once_consumed(consumed[sess.call_id], len(burst))
    np.testing.assert_array_equal(heard, burst)
    assert sess.stats.catch_up_steps >= 2 and sess.stats.caller_dropped_samples == 0


def test_audio_older_than_the_latency_bound_is_dropped_and_counted(make_scheduler, personas):
    sch = make_scheduler(max_calls=1, max_latency_ms=400)
    consumed = record_consumed(sch)
    ends = []
    sess = sch.place_call(personas.route("1001"), "1001", "test")
    assert wait_for(lambda: sess.state is CallState.LIVE, 10)
    stalled = threading.Event()

    def stall():
        stalled.set()
        time.sleep(0.8)
    sch._cmds.put(stall)
    assert wait_for(stalled.is_set, 5)
    signal = caller_signal(0.8, 4)  # 800 ms arrive while the engine is stuck; 400 ms may wait
    for i in range(0, len(signal), 480):
        sess.push_audio(signal[i:i + 480])
    dropped = len(signal) - 9600  # exactly what exceeded 400 ms, to the sample
    np.testing.assert_array_equal(spoken_once_consumed(consumed[sess.call_id], 9600), signal[dropped:])
    assert sess.stats.caller_dropped_samples == dropped
    sess.subscribe(lambda ev: ends.append(ev))
    sess.hangup()
    assert wait_for(lambda: sess.state is CallState.ENDED, 5)
    assert abs(sch.metrics.caller_audio_dropped._value.get() - dropped / 24000) < 1e-6


def test_over_capacity_is_refused_without_hurting_calls(make_scheduler, personas):
    sch = make_scheduler(max_calls=2, retry_after_s=7)
    p = personas.route("1001")
    a = sch.place_call(p, "1001", "test")
    b = sch.place_call(p, "1001", "test")
    with pytest.raises(CallRefused) as exc:
        sch.place_call(p, "1001", "test")
    assert exc.value.code == "busy" and exc.value.retry_after == 7
    callers = talk([a, b], 1.2)
    for c in callers:
        c.join()
    assert all(len(c.heard) >= 10 for c in callers)
    slot_a = sch.binding_of(a).slot
    a.hangup()
    assert wait_for(lambda: sch.capacity_left == 1, 5)
    c = sch.place_call(p, "1001", "test")  # the freed slot is reusable
    assert wait_for(lambda: sch.binding_of(c) is not None and sch.binding_of(c).slot is not None, 5)
    assert sch.binding_of(c).slot == slot_a
    sch.begin_drain()
    with pytest.raises(CallRefused) as exc:
        sch.place_call(p, "1001", "test")
    assert exc.value.code == "draining"


def test_a_call_whose_prompt_cannot_be_prepared_fails_alone(make_scheduler, personas):
    sch = make_scheduler(max_calls=2)
    good = sch.place_call(personas.route("1001"), "1001", "test")
    broken = personas.route("1002")
    import dataclasses

    bad = sch.place_call(dataclasses.replace(broken, voice="NOSUCHVOICE"), "1002", "test")
    assert wait_for(lambda: bad.state is CallState.ENDED, 5)
    assert bad.end_reason is EndReason.FAILED
    assert wait_for(lambda: good.state is CallState.LIVE, 5) and sch.capacity_left == 1


def test_failing_call_does_not_take_down_the_loop(make_scheduler, personas):
    sch = make_scheduler(max_calls=2)
    p = personas.route("1001")
    good = sch.place_call(p, "1001", "test")
    bad = sch.place_call(p, "1001", "test")

    def boom():
        raise RuntimeError("endpoint bug")
    bad.take_inbound = boom
    (caller,) = talk([good], 3.0)
    caller.join()
    assert bad.state is CallState.ENDED and bad.end_reason is EndReason.FAILED
    assert good.state is not CallState.ENDED and len(caller.heard) > 5
    assert sch.running


def test_dead_endpoint_and_long_calls_are_ended(make_scheduler, personas):
    sch = make_scheduler(max_calls=2, idle_timeout_s=0.5, max_call_seconds=1.0)
    p = personas.route("1001")
    silent = sch.place_call(p, "1001", "test")  # endpoint never pushes nor pulls
    talker = sch.place_call(p, "1001", "test")
    talk([talker], 2.0)
    assert wait_for(lambda: silent.state is CallState.ENDED and talker.state is CallState.ENDED, 10)
    assert silent.end_reason is EndReason.ENDPOINT_TIMEOUT
    assert talker.end_reason is EndReason.MAX_DURATION and 12 <= talker.stats.frames_out - 1 <= 14  # live frames


def test_outbound_queue_stays_shallow(make_scheduler, personas):
    sch = make_scheduler(max_calls=1, outbound_depth=2)
    sess = sch.place_call(personas.route("1001"), "1001", "test")
    # Push audio but never pull. Bounded by frame count, not by wall time: a loaded CI machine
    # may step slower than real time, and what matters is that the queue never grows.
    deadline = time.monotonic() + 30
    while sess.stats.frames_out < 12 and time.monotonic() < deadline:
        sess.push_audio(np.zeros(FRAME, np.float32))
        time.sleep(0.04)
        assert sess.outbound_depth <= 2
    assert sess.stats.frames_out >= 12
    assert sess.outbound_depth <= 2 and sess.stats.outbound_dropped >= sess.stats.frames_out - 2


@pytest.fixture(scope="module")
def short_context_model(demo_dir, tmp_path_factory):
    """The demo model with a 400-frame context, so the context limit comes within seconds."""
    from agent.model.files import local_model_files
    from agent.model.loader import load_model
    from tests.support.models import small_context_dir

    return load_model(local_model_files(small_context_dir(demo_dir, tmp_path_factory.mktemp("short"), 400)),
                      device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["hangup", "slide"])
def test_context_limit_policy(short_context_model, personas, policy):
    sch = Scheduler(short_context_model, SchedulerConfig(max_calls=1, realtime=False, context_policy=policy,
                                                         max_call_seconds=None, idle_timeout_s=600,
                                                         barge_in=BargeInConfig(enabled=False)))
    sch.start()
    try:
        sess = sch.place_call(personas.route("1001"), "1001", "test")
        deadline = time.monotonic() + 60
        at_limit = None  # live frames when the context filled
        while time.monotonic() < deadline and sess.state is not CallState.ENDED:
            if at_limit is None and sch.metrics.calls_at_context_limit._value.get() >= 1:
                at_limit = sess.stats.frames_out
            if at_limit is not None and sess.stats.frames_out > at_limit + 25:
                break
            sess.pull_frame()
            time.sleep(0.01)
        assert sch.metrics.calls_at_context_limit._value.get() == 1
        if policy == "hangup":
            assert sess.end_reason is EndReason.CONTEXT_LIMIT
            assert sess.stats.frames_out - 1 < 400
        else:  # the call slides on past its context (the prompt's frames count in it too)
            assert at_limit is not None and sess.state is not CallState.ENDED
            assert sess.stats.frames_out > at_limit + 25
    finally:
        sch.stop()
