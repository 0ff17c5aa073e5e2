"""The call scheduler: real-time loop, snapshots, admission, barge-in, long calls, isolation."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.barge_in import BargeInConfig, BargeInDetector, SileroVad
from agent.personas import load_persona_dir
from agent.scheduler import CallRefused, Scheduler, SchedulerConfig
from agent.session import FRAME
from agent.voices import STOCK_VOICES
from tests.conftest import speechlike
from tests.helpers_server import poll

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def personas():
    return load_persona_dir(ROOT / "personas", STOCK_VOICES)


@pytest.fixture
def make_scheduler(demo_model):
    made = []

    def make(**kw):
        kw.setdefault("barge_in", BargeInConfig(enabled=False))
        s = Scheduler(demo_model, SchedulerConfig(**kw))
        s.start()
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def wait_for(cond, timeout=20.0):
    """Until cond() holds (bounded): tests wait on engine progress, never on fixed sleeps."""
    return poll(cond, bool, timeout, step=0.02)


def caller(sess, seconds, stop, seed=1):
    """Push caller audio in real time (20 ms packets), pull agent frames as an endpoint would."""
    pcm = speechlike(seconds, seed)
    got = []
    t0 = time.monotonic()
    i = 0
    while i < len(pcm) and not stop.is_set() and sess.state != "ended":
        sess.push_audio(pcm[i:i + 480])
        i += 480
        f = sess.pull_frame()
        if f is not None:
            got.append(f)
        delay = t0 + i / 24000 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return got


def test_calls_answer_from_snapshots_and_stream_audio(make_scheduler, personas):
    sch = make_scheduler(max_calls=3)
    citysan = personas.route("1001")
    sch.prewarm([citysan])
    assert sch.wait_idle(30)
    assert len(sch.snapshots) == 1
    sess = sch.place_call(citysan, "1001", "test")
    texts = []
    sess.subscribe(lambda ev: texts.append(ev) if ev.kind == "text" else None)
    stop = threading.Event()
    frames = caller(sess, 2.0, stop)
    assert sess.from_snapshot and sess.answered_at is not None
    # a tick or two, not a prompt phase (counted in engine ticks: wall time varies with CI load)
    assert sess.answer_ticks is not None and sess.answer_ticks <= 3, sess.answer_ticks
    assert len(frames) >= 15 and any(np.abs(f.pcm).max() > 0.01 for f in frames)
    assert sess.stats.frames_in >= 15
    sess.hangup()
    deadline = time.monotonic() + 2
    while sess.state != "ended" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sess.state == "ended" and sess.end_reason == "caller_hangup"
    assert sch.capacity_left == 3
    assert sch.metrics.snapshot_builds._value.get() == 1


def test_cold_persona_builds_its_snapshot_faster_than_real_time(make_scheduler, personas):
    sch = make_scheduler(max_calls=2)
    mars = personas.route("1005")
    sess = sch.place_call(mars, "1005", "test")
    deadline = time.monotonic() + 20
    while sess.answered_at is None and time.monotonic() < deadline:
        sess.push_audio(np.zeros(480, np.float32))
        sess.pull_frame()
        time.sleep(0.02)
    assert sess.answered_at is not None and not sess.from_snapshot
    steps = sch.engine.generator.slots[sess.slot].schedule.steps
    # faster than real time: spare time in each tick runs extra prompt steps (counted in ticks,
    # which do not depend on how loaded the machine is the way wall time does)
    assert 3 < sess.answer_ticks < steps / 2, (sess.answer_ticks, steps)
    assert len(sch.snapshots) == 1  # left behind for the next call
    second = sch.place_call(mars, "1005", "test")
    assert wait_for(lambda: second.state != "preparing", 5)
    assert second.from_snapshot


def test_over_capacity_is_refused_without_hurting_calls(make_scheduler, personas):
    sch = make_scheduler(max_calls=2, retry_after_s=7)
    p = personas.route("1001")
    sch.prewarm([p])
    sch.wait_idle(30)
    a = sch.place_call(p, "1001", "test")
    b = sch.place_call(p, "1001", "test")
    with pytest.raises(CallRefused) as exc:
        sch.place_call(p, "1001", "test")
    assert exc.value.code == "busy" and exc.value.retry_after == 7
    stop = threading.Event()
    out = {}
    threads = [threading.Thread(target=lambda s=s: out.__setitem__(s.call_id, caller(s, 1.2, stop))) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(v) >= 10 for v in out.values())
    a.hangup()
    time.sleep(0.3)
    c = sch.place_call(p, "1001", "test")  # the freed slot is reusable
    deadline = time.monotonic() + 2
    while c.slot is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert c.slot == a.slot
    sch.begin_drain()
    with pytest.raises(CallRefused) as exc:
        sch.place_call(p, "1001", "test")
    assert exc.value.code == "draining"


def test_failing_call_does_not_take_down_the_loop(make_scheduler, personas):
    sch = make_scheduler(max_calls=2)
    p = personas.route("1001")
    good = sch.place_call(p, "1001", "test")
    bad = sch.place_call(p, "1001", "test")

    def boom():
        raise RuntimeError("endpoint bug")
    bad.take_inbound = boom
    stop = threading.Event()
    frames = caller(good, 3.0, stop)
    assert bad.state == "ended" and bad.end_reason == "failed"
    assert good.state != "ended" and len(frames) > 5
    assert sch.running


def test_dead_endpoint_and_long_calls_are_ended(make_scheduler, personas):
    sch = make_scheduler(max_calls=2, idle_timeout_s=0.5, max_call_seconds=1.0)
    p = personas.route("1001")
    sch.prewarm([p])
    sch.wait_idle(30)
    silent = sch.place_call(p, "1001", "test")  # endpoint never pushes nor pulls
    talker = sch.place_call(p, "1001", "test")
    stop = threading.Event()
    caller(talker, 2.0, stop)
    assert wait_for(lambda: silent.state == "ended" and talker.state == "ended", 10)
    assert silent.end_reason == "endpoint_timeout"
    assert talker.end_reason == "max_duration" and 12 <= talker.live_frames <= 14


def test_late_caller_audio_is_silence_and_counted(make_scheduler, personas):
    sch = make_scheduler(max_calls=1)
    p = personas.route("1001")
    sess = sch.place_call(p, "1001", "test")
    deadline = time.monotonic() + 20
    while sess.state != "live" and time.monotonic() < deadline:
        sess.pull_frame()
        time.sleep(0.02)
    assert wait_for(lambda: sess.pull_frame() is None and sess.stats.late_inbound >= 5, 10)
    assert sess.stats.late_inbound >= 5 and sch.metrics.late_inbound._value.get() >= 5


def test_outbound_queue_stays_shallow(make_scheduler, personas):
    sch = make_scheduler(max_calls=1, outbound_depth=2)
    p = personas.route("1001")
    sch.prewarm([p])
    assert sch.wait_idle(60)
    sess = sch.place_call(p, "1001", "test")
    # Push audio but never pull. Bounded by frame count, not by wall time: a loaded CI machine
    # may step slower than real time, and what matters is that the queue never grows.
    deadline = time.monotonic() + 30
    while sess.stats.frames_out < 12 and time.monotonic() < deadline:
        sess.push_audio(np.zeros(FRAME, np.float32))
        time.sleep(0.04)
        assert len(sess._out) <= 2
    assert sess.stats.frames_out >= 12
    assert len(sess._out) <= 2 and sess.stats.outbound_dropped >= sess.stats.frames_out - 2
    assert len(sess._in) <= 3 * FRAME


def test_barge_in_detector_logic():
    cfg = BargeInConfig(min_speech_ms=160, agent_guard_ms=300)
    loud, quiet = np.full(1920, 0.2, np.float32), np.zeros(1920, np.float32)
    d = BargeInDetector(cfg)
    # caller speaks while the agent is silent: plain turn-taking
    assert [d.on_vad(0.9, 0.1 + 0.032 * i) for i in range(10)].count("barge_in") == 0
    d = BargeInDetector(cfg)
    d.on_agent_frame(loud, 0.0)
    # speech starting 100 ms into the agent's speech: echo guard
    verdicts = [d.on_vad(0.9, 0.1 + 0.032 * (i + 1)) for i in range(8)]
    assert verdicts.count("suppressed") == 1 and "barge_in" not in verdicts
    for i in range(5):
        d.on_vad(0.0, 0.5 + 0.032 * i)  # silence resets the segment
    d.on_agent_frame(loud, 1.0)
    verdicts = [d.on_vad(0.9, 1.0 + 0.032 * (i + 1)) for i in range(8)]
    assert verdicts.count("barge_in") == 1
    # too short a blip is ignored
    d2 = BargeInDetector(cfg)
    d2.on_agent_frame(loud, 0.0)
    assert [d2.on_vad(p, 1.0 + 0.032 * i) for i, p in enumerate([0.9, 0.9, 0.1, 0.0])] == [None] * 4
    # agent stops speaking after the release time
    d2.on_agent_frame(quiet, 2.0)
    assert not d2.agent_speaking


def test_barge_in_flushes_playout_and_bumps_generation(make_scheduler, personas):
    sch = make_scheduler(max_calls=1)
    sess = sch.place_call(personas.route("1001"), "1001", "test")
    events = []
    sess.subscribe(events.append)
    deadline = time.monotonic() + 20
    while sess.state != "live" and time.monotonic() < deadline:
        sess.push_audio(np.zeros(960, np.float32))
        time.sleep(0.04)
    assert wait_for(lambda: len(sess._out) > 0, 10)
    gen = sess.generation
    sess.barge_in()
    assert len(sess._out) == 0 and sess.generation == gen + 1
    assert any(e.kind == "barge_in" for e in events)
    assert wait_for(lambda: len(sess._out) > 0, 10)
    f = sess.pull_frame()
    assert f is not None and f.generation == gen + 1  # what plays next follows the model after the barge-in


@pytest.fixture(scope="module")
def spoken_wav(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng (Debian package, installed by scripts/setup.sh) is needed for a speech signal")
    out = tmp_path_factory.mktemp("speech") / "hello.wav"
    subprocess.run(["espeak-ng", "-w", str(out), "Hello, I would like to change my pickup day please."],
                   check=True, capture_output=True)
    return out


def test_silero_vad_hears_speech_not_silence(spoken_wav):
    from agent.audio_io import read_audio

    speech = read_audio(spoken_wav, 24000)
    vad = SileroVad()
    probs = vad.feed(np.zeros(24000, np.float32))
    assert max(probs) < 0.3
    probs = vad.feed(speech)
    assert max(probs) > 0.8


def test_real_barge_in_on_speech(make_scheduler, personas, spoken_wav):
    """Caller speech (espeak) over a speaking agent triggers a barge-in through the real VAD."""
    from agent.audio_io import read_audio

    sch = make_scheduler(max_calls=1, barge_in=BargeInConfig(agent_active_dbfs=-70, agent_guard_ms=0))
    sess = sch.place_call(personas.route("1001"), "1001", "test")
    deadline = time.monotonic() + 20
    while sess.state != "live" and time.monotonic() < deadline:
        sess.push_audio(np.zeros(960, np.float32))
        sess.pull_frame()
        time.sleep(0.04)
    speech = read_audio(spoken_wav, 24000)
    stop = threading.Event()
    t0 = time.monotonic()
    for i in range(0, len(speech), 480):
        sess.push_audio(speech[i:i + 480])
        sess.pull_frame()
        time.sleep(max(0, t0 + (i + 480) / 24000 - time.monotonic()))
        if sess.stats.barge_ins:
            break
    stop.set()
    assert sess.stats.barge_ins >= 1


@pytest.fixture(scope="module")
def short_context_model(demo_dir, tmp_path_factory):
    """The demo model with a 400-frame context, so the context limit comes within seconds."""
    import json

    from agent.model_files import local_model_files
    from agent.model_loader import load_model

    d = tmp_path_factory.mktemp("short")
    for p in demo_dir.iterdir():
        if p.is_dir():
            shutil.copytree(p, d / p.name)
        else:
            shutil.copy(p, d / p.name)
    arch = json.loads((d / "personaplex_arch.json").read_text())
    arch["lm_kwargs"]["context"] = 400
    (d / "personaplex_arch.json").write_text(json.dumps(arch))
    return load_model(local_model_files(d), device="cpu")


@pytest.mark.parametrize("policy", ["hangup", "slide"])
def test_context_limit_policy(short_context_model, personas, policy):
    sch = Scheduler(short_context_model, SchedulerConfig(max_calls=1, realtime=False, context_policy=policy,
                                                         max_call_seconds=None, idle_timeout_s=600,
                                                         barge_in=BargeInConfig(enabled=False)))
    sch.start()
    try:
        sess = sch.place_call(personas.route("1001"), "1001", "test")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sess.state == "ended" or sch.metrics.calls_at_context_limit._value.get() >= 1 and sess.live_frames > 420:
                break
            sess.pull_frame()
            time.sleep(0.01)
        assert sch.metrics.calls_at_context_limit._value.get() == 1
        if policy == "hangup":
            assert sess.end_reason == "context_limit"
            assert sess.live_frames < 400
        else:
            assert sess.state != "ended" and sess.live_frames > 400  # the call slides on
    finally:
        sch.stop()
