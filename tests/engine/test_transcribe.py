"""The caller transcriber: Kyutai STT batched with the engine on the engine's own caller codes.

The reference is moshi's single-stream STT inference written out here as Kyutai's streaming
PyTorch example runs it (delayed-streams-modeling stt_pytorch.ipynb): moshi's loader, a Mimi and
an `LMGen` in streaming mode at batch 1, greedy, per 80 ms frame `mimi.encode` then a step, the
first frame stepped twice. The transcriber must give each call exactly its tokens, however calls
join and leave around it.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from agent.barge_in.detector import BargeInConfig
from agent.calls.scheduler import Scheduler, SchedulerConfig
from agent.calls.transcript import TranscriptPiece
from agent.model.codec import BatchedCodec
from agent.model.engine import Engine
from agent.model.generator import Phase
from agent.model.loader import build_mimi
from agent.model.sampling import SamplingParams
from agent.personas.schema import Persona
from agent.timebase import FRAME, FRAME_S
from agent.transcribe.demo import demo_stt_dir
from agent.transcribe.files import local_stt_files
from agent.transcribe.model import load_stt
from agent.transcribe.transcriber import BatchedTranscriber
from tests.support import frames_of, poll, speechlike

GREEDY = SamplingParams(greedy=True)


@pytest.fixture(scope="module")
def stt_files(demo_dir):
    return local_stt_files(demo_stt_dir(demo_dir))


@pytest.fixture(scope="module")
def stt(stt_files, demo_model):
    return load_stt(stt_files, demo_model)


def kyutai_reference(stt_files, demo_model, pcm: np.ndarray) -> tuple[list[int], list[float]]:
    """Text tokens and end-of-turn probabilities of moshi's own single-stream STT run on `pcm`."""
    from moshi.models import LMGen, loaders

    info = loaders.CheckpointInfo.from_hf_repo(
        "-", moshi_weights=stt_files.lm, mimi_weights=stt_files.mimi, tokenizer=stt_files.text_tokenizer,
        config_path=stt_files.config)
    lm = info.get_moshi(device="cpu", dtype=torch.float32)
    # the demo's Mimi is tiny: moshi's get_mimi with its architecture, all 32 codebooks
    mimi = loaders.get_mimi(stt_files.mimi, demo_model.arch.mimi_config, device="cpu", num_codebooks=32)
    lm_gen = LMGen(lm, temp=0, temp_text=0, use_sampling=False)
    tokens, eot = [], []
    with torch.no_grad(), mimi.streaming(1), lm_gen.streaming(1):
        first = True
        for chunk in frames_of(pcm):
            codes = mimi.encode(torch.from_numpy(chunk).view(1, 1, -1))
            if first:
                lm_gen.step_with_extra_heads(codes)
                first = False
            out, heads = lm_gen.step_with_extra_heads(codes)
            tokens.append(int(out[0, 0, 0]))
            eot.append(float(heads[2][0, 0, 0]))
    return tokens, eot


def expected_pieces(stt, tokens: list[int], t_first: float) -> list[tuple[float, float, str]]:
    """The pieces those tokens make: the token of a call's k-th frame is the text of the audio
    0.5 s (the demo STT's delay) before that frame's end."""
    out = []
    for k, tok in enumerate(tokens):
        if tok not in (0, 3):
            t0 = t_first + max(0.0, (k + 1) * FRAME_S - 0.5)
            out.append((t0, t0 + FRAME_S, stt.text_tokenizer.id_to_piece(tok).replace("▁", " ")))
    return out


def test_first_8_of_32_codebooks_are_the_8_codebook_encode(demo_model):
    """Mimi's quantizer is residual: one 32-codebook encode serves PersonaPlex (first 8) and the STT."""
    pcm = np.concatenate([speechlike(1.2, 3), np.zeros(FRAME, np.float32), speechlike(0.8, 4)])
    other = speechlike(2.08, 5)
    runs = {}
    for n in (8, 32):
        codec = BatchedCodec(build_mimi(demo_model.files.mimi, demo_model.arch, demo_model.device), 2, n)
        mask = torch.ones(2, dtype=torch.bool)
        runs[n] = torch.stack([codec.encode(torch.from_numpy(np.stack([a, b])), mask)
                               for a, b in zip(frames_of(pcm), frames_of(other))])
        codec.close()
    assert runs[32].shape[-1] == 32 and runs[8].shape[-1] == 8
    assert torch.equal(runs[32][..., :8], runs[8])
    assert not torch.equal(runs[32][..., 8:16], runs[32][..., :8])  # the extra levels are codes of their own


def test_personaplex_output_is_unchanged_by_the_wider_encode(demo_model):
    pcm = speechlike(1.6, 9)
    got = {}
    for n in (None, 32):
        with Engine(demo_model, 2, caller_codebooks=n) as eng:
            eng.start(1, eng.schedule("NATF1", "You enjoy having a good conversation."), GREEDY)
            outs = [eng.run_prompt(1)]
            outs += [eng.step({1: f})[1] for f in frames_of(pcm)]
        got[n] = outs
    assert all(o.caller_codes is None for o in got[None][:1]) and got[32][1].caller_codes.shape == (32,)
    assert got[None][1].caller_codes.shape == (8,)
    for a, b in zip(got[None], got[32]):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.pcm, b.pcm)
    for a, b in zip(got[None][1:], got[32][1:]):
        assert torch.equal(a.caller_codes, b.caller_codes[:8])


# (voice, clip seconds, clip seed, tick the call is placed at: None = when call 0 has left, in its slot)
CALLS = [("NATF0", 3.0, 11, 0), ("VARM1", 2.4, 12, 4), ("NATM2", 3.2, 13, 9), ("NATF3", 2.0, 14, None)]


def test_batched_rows_joining_and_leaving_give_moshis_single_stream_tokens(demo_model, stt, stt_files):
    clips = [frames_of(speechlike(sec, seed)) for _, sec, seed, _ in CALLS]
    expected = [kyutai_reference(stt_files, demo_model, np.concatenate(c)) for c in clips]
    tokens: dict[int, list[int]] = {i: [] for i in range(len(CALLS))}
    eot: dict[int, list[float]] = {i: [] for i in range(len(CALLS))}
    pieces: dict[int, list] = {i: [] for i in range(len(CALLS))}
    slot_of: dict[int, int] = {}  # calls up now
    done: set[int] = set()
    tr = BatchedTranscriber(stt, 4)
    try:
        with Engine(demo_model, 4, caller_codebooks=stt.codebooks) as eng:
            # slot 3: a neighbour whose prompt phase and live steps never feed the transcriber
            eng.start(3, eng.schedule("VARF4", "Noise neighbour."), SamplingParams(), seed=5)
            for tick in range(500):
                for i, (voice, _, _, at) in enumerate(CALLS):
                    if i not in slot_of and i not in done and (tick == at or at is None and 0 in done):
                        slot_of[i] = i if at is not None else 0
                        eng.start(slot_of[i], eng.schedule(voice, f"Caller {i}."), GREEDY)
                live = {i: b for i, b in slot_of.items() if eng.phase(b) is Phase.LIVE}
                waiting = {live[1]} if 1 in live and tick % 5 == 0 else set()  # its audio is late
                feed = {b: clips[i][len(tokens[i])] for i, b in live.items() if b not in waiting}
                res = eng.step(feed, only=set(eng.generator.stepping_rows()) - waiting)
                codes = {}
                for i, b in live.items():
                    if b in feed:
                        if tr.call_in(b) != f"call-{i}":
                            tr.join(b, f"call-{i}", t_first=0.08 * (i + 1))  # any clock: pieces follow it
                        codes[b] = res[b].caller_codes
                for b, heard in tr.step(codes).items():
                    i = next(i for i, s in slot_of.items() if s == b)
                    tokens[i].append(heard.token)
                    eot[i].append(heard.end_of_turn)
                    pieces[i] += [(p.t0, p.t1, p.text) for p in heard.pieces]
                for i, b in list(slot_of.items()):
                    if len(tokens[i]) == len(clips[i]):  # the call hangs up: its row leaves
                        eng.release(b)
                        tr.leave(b)
                        del slot_of[i]
                        done.add(i)
                if len(done) == len(CALLS):
                    break
    finally:
        tr.close()
    assert len(done) == len(CALLS)
    for i, (ref_tokens, ref_eot) in enumerate(expected):
        assert len(set(ref_tokens)) > 3, "a check of token equality needs tokens that vary"
        assert tokens[i] == ref_tokens, f"call {i}"
        np.testing.assert_allclose(eot[i], ref_eot, atol=1e-5, err_msg=f"call {i}")
        want = expected_pieces(stt, ref_tokens, t_first=0.08 * (i + 1))
        assert [p[2] for p in pieces[i]] == [w[2] for w in want]
        np.testing.assert_allclose([p[:2] for p in pieces[i]], [w[:2] for w in want], atol=1e-9)


def test_callers_pieces_reach_their_transcript_on_the_calls_clock(demo_model, stt, stt_files):
    """Through the real-time scheduler: a call's caller pieces are the tokens moshi's reference
    gives on the very frames the model consumed, each at the time of the audio it belongs to."""
    persona = Persona(id="t", kind="prompt", numbers=(), voice="NATF0", prompt="Hello.", source="<test>")
    sch = Scheduler(demo_model, SchedulerConfig(max_calls=2, barge_in=BargeInConfig(enabled=False)), stt=stt)
    consumed: dict[str, list] = {}
    heard: dict[str, list] = {}

    def attach(sess):
        frames, got = consumed.setdefault(sess.call_id, []), heard.setdefault(sess.call_id, [])
        sess.add_frame_tap(lambda caller, agent, text, index: frames.append(caller))
        sess.subscribe(lambda ev: got.append(ev) if isinstance(ev, TranscriptPiece) and ev.who == "caller" else None)
    sch.on_call_start.append(attach)
    sch.start()
    try:
        assert sch.warm_up("NATF0", "Hello.")
        other = sch.place_call(persona, "1", "test")  # a neighbour that talks too
        sess = sch.place_call(persona, "1", "test")
        signal = np.concatenate([np.zeros(12000, np.float32), speechlike(2.0, 21), np.zeros(12000, np.float32)])

        def talk(s, x):
            poll(lambda: s.state.value, lambda v: v in ("live", "ended"), 20, step=0.01)
            for k in range(0, len(x), 480):
                s.push_audio(x[k:k + 480])
                threading.Event().wait(0.02)
        talkers = [threading.Thread(target=talk, args=(s, x)) for s, x in ((sess, signal), (other, speechlike(3, 2)))]
        for t in talkers:
            t.start()
        for t in talkers:
            t.join()
        frames = consumed[sess.call_id]
        poll(lambda: len(frames), lambda n: n > len(signal) // FRAME, 10, step=0.02)
        sess.hangup()
        other.hangup()
        poll(lambda: sch.capacity_left, lambda n: n == 2, 10, step=0.02)
    finally:
        sch.stop()
    assert frames[0] is None  # the answer frame fed no caller audio
    fed = np.concatenate(frames[1:])
    assert np.any(fed)  # the caller's audio reached the model
    ref_tokens, _ = kyutai_reference(stt_files, demo_model, fed)
    want = expected_pieces(stt, ref_tokens, t_first=FRAME_S)  # caller frame 0 lies with agent frame 1
    got = heard[sess.call_id]
    assert got
    assert [p.text for p in got] == [w[2] for w in want]
    np.testing.assert_allclose([(p.t0, p.t1) for p in got], [w[:2] for w in want], atol=1e-9)
    assert all(b.t0 >= a.t0 for a, b in zip(got, got[1:]))
    assert FRAME_S <= got[0].t0 and got[-1].t1 <= len(frames) * FRAME_S
    assert sess.end_of_turn is not None and 0.0 <= sess.end_of_turn <= 1.0
    assert any(s["who"] == "caller" for s in sess.transcript.segments())  # in the call's transcript


def linked_copy(src, dest, leave_out=()):
    """A folder holding `src`'s files as links, but those named in `leave_out`."""
    dest.mkdir()
    for p in src.iterdir():
        if p.name not in leave_out:
            (dest / p.name).symlink_to(p.resolve())
    return dest


def test_the_demo_model_gets_the_tiny_stt_and_off_means_off(demo_dir):
    from server.config import ServerConfig
    from server.runtime import Runtime

    cfg = ServerConfig.model_validate({"model": {"source": "dir", "dir": str(demo_dir), "device": "cpu"}})
    rt = Runtime(cfg)
    rt.load_model()
    assert rt.stt is not None and rt.stt.source.startswith("demo:") and rt.stt.codebooks == 32 and rt.stt.has_vad
    cfg = ServerConfig.model_validate({"model": {"source": "dir", "dir": str(demo_dir), "device": "cpu"},
                                       "transcript": {"caller": "off"}})
    rt = Runtime(cfg, model=rt.model)
    rt.load_model()
    assert rt.stt is None


def test_without_its_weights_the_caller_transcript_is_off_with_one_log_line(demo_dir, tmp_path, monkeypatch):
    """A model that is not the demo needs Kyutai's STT; offline and not cached: off, one line."""
    import structlog

    from agent.model.files import local_model_files
    from agent.model.loader import load_model
    from agent.transcribe import load_caller_stt

    other = load_model(local_model_files(linked_copy(demo_dir, tmp_path / "other", {".complete"})), device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with structlog.testing.capture_logs() as logs:
        assert load_caller_stt(other, "kyutai/stt-1b-en_fr") is None
    off = [e for e in logs if e["event"] == "caller_transcript_off"]
    assert len(off) == 1 and off[0]["log_level"] == "warning", logs
    assert "transcript.caller: off" in off[0]["reason"] or "Mimi" in off[0]["reason"]  # cached: its Mimi differs


def test_an_stt_on_another_mimi_is_refused(stt_files, demo_model, tmp_path):
    """The STT reads the engine's codes: only an STT trained on that very Mimi may."""
    from safetensors.torch import load_file, save_file

    from agent.errors import ModelUnavailable

    folder = linked_copy(stt_files.config.parent, tmp_path / "stt", {stt_files.mimi.name})
    state = load_file(str(stt_files.mimi))
    key = next(k for k in state if k.endswith("_codebook.embedding_sum"))
    state[key] = state[key] + 1e-3
    save_file(state, str(folder / stt_files.mimi.name))
    with pytest.raises(ModelUnavailable, match="not PersonaPlex's"):
        load_stt(local_stt_files(folder), demo_model)


def test_caller_off_in_yaml_means_off(tmp_path):
    """YAML reads a bare `off` as false: the setting still means what it says."""
    from server.config import ConfigError, load_config

    p = tmp_path / "c.yaml"
    p.write_text("transcript:\n  caller: off\n")
    assert load_config(p).transcript.caller == "off"
    p.write_text("transcript:\n  caller: kyutai\n")
    assert load_config(p).transcript.caller == "kyutai"
    p.write_text("transcript:\n  caller: whisper\n")
    with pytest.raises(ConfigError, match="transcript.caller"):
        load_config(p)
