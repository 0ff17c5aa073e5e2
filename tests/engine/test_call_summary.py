"""What a session tells the outside about its call, with no model: levels on the engine's frames,
the journal, the transcript closed at the end, and the record/webhook documents built from them
(`server.call_summary`, `server.webhooks.payload`)."""

from __future__ import annotations

import json
import time

import numpy as np

from agent.barge_in.detector import BargeInConfig
from agent.calls.events import (CallState, Dtmf, Ended, EndReason, Levels, TransferFailed, TransferRequested)
from agent.calls.session import LEVEL_FRAMES, CallSession
from agent.calls.transcript import TranscriptPiece
from agent.personas.schema import Persona
from agent.timebase import FRAME
from server import call_summary
from server.event_json import event_json
from server.webhooks import payload


def session() -> CallSession:
    persona = Persona(id="p", kind="prompt", numbers=("1001",), voice="NATF0", prompt="Be kind.", source="<test>")
    sess = CallSession(persona, "1001", "sip", BargeInConfig(enabled=False), call_id="call-x", caller="+15550001")
    sess.variables = {"customer_name": "Omar"}
    return sess


def live(sess: CallSession, frames: int, caller_amp: float, agent_amp: float, texts: dict[int, str]) -> list:
    """Feed `frames` frames as the engine does (caller frame taken, agent frame delivered)."""
    events: list = []
    sess.subscribe(events.append)
    sess.answered_at = time.monotonic()
    sess.set_state(CallState.LIVE)
    for i in range(frames):
        sess.push_audio(np.full(FRAME, caller_amp, np.float32))
        assert sess.take_inbound() is not None
        sess.deliver(np.full(FRAME, agent_amp, np.float32), texts.get(i), time.monotonic())
    return events


def end(sess: CallSession, reason: EndReason) -> None:
    sess.ended_at = time.monotonic()
    sess.end_reason = reason
    sess.set_state(CallState.ENDED)
    sess.emit(Ended(reason))


def test_levels_are_each_sides_rms_every_few_frames():
    sess = session()
    events = live(sess, 4 * LEVEL_FRAMES, 0.1, 0.25, {})
    levels = [e for e in events if isinstance(e, Levels)]
    assert len(levels) == 4  # one per LEVEL_FRAMES frames: about 4 a second
    assert all(abs(lv.caller - 0.1) < 1e-6 and abs(lv.agent - 0.25) < 1e-6 for lv in levels)
    assert event_json(levels[0]) == {"type": "levels", "caller": 0.1, "agent": 0.25}


def test_the_transcript_closes_at_the_end_and_documents_agree():
    sess = session()
    live(sess, 20, 0.0, 0.1, {0: " Hello", 1: " there", 15: " Bye"})  # a pause of more than 0.8 s
    sess.said(TranscriptPiece("caller", 0.3, 0.6, " hi"))
    sess.dtmf("4")
    sess.emit(TransferRequested("sip:desk@pbx"))
    sess.emit(TransferFailed(486))
    end(sess, EndReason.CALLER_HANGUP)
    sess.said(TranscriptPiece("caller", 0.9, 1.0, " late"))  # after the end: not kept
    assert sess.transcript.late == 1
    segments = call_summary.transcript(sess)
    assert segments == [{"who": "agent", "t0": 0.0, "t1": 0.16, "text": "Hello there"},
                        {"who": "caller", "t0": 0.3, "t1": 0.6, "text": "hi"},
                        {"who": "agent", "t0": 1.2, "t1": 1.28, "text": "Bye"}]
    body = payload.call_end(sess, EndReason.CALLER_HANGUP, recording={"wav": "/r/x.wav", "json": "/r/x.json"})
    assert body["transcript"] == segments and body["dtmf"] == "4"
    assert body["transfer"] == {"target": "sip:desk@pbx", "attempts": 1, "outcome": "failed", "status": 486}
    assert body["caller_number"] == "+15550001" and body["dialled_number"] == "1001"
    assert body["variables"] == {"customer_name": "Omar"} and body["reason"] == "caller_hangup"
    assert body["started_at"].endswith("Z") and body["started_at"] <= body["answered_at"] <= body["ended_at"]
    assert json.loads(payload.encode(body)) == body
    kinds = [(e["type"], e["t"]) for e in call_summary.journal(sess)]
    assert kinds == [("dtmf", 1.6), ("transfer", 1.6), ("transfer_failed", 1.6)]


def test_a_live_reader_tells_the_snapshots_pieces_by_number_not_time():
    """The caller's pieces of the recogniser's first delay all carry the call's first instant: a
    reader that subscribed between two of them must still get the second (README: the event
    stream's `transcript_pieces` and `n`)."""
    sess = session()
    events = live(sess, 2, 0.0, 0.1, {0: " Hi"})
    sess.said(TranscriptPiece("caller", 0.08, 0.16, " 2"))
    snapshot = call_summary.live_call(sess, last_segments=1_000_000)  # what a reader gets first
    sess.said(TranscriptPiece("caller", 0.08, 0.16, "at"))  # same times, after the snapshot
    sess.said(TranscriptPiece("caller", 0.08, 0.16, ""))  # empty: not kept, no number used
    sess.said(TranscriptPiece("agent", 0.16, 0.24, " there"))
    pieces = [event_json(e) for e in events if isinstance(e, TranscriptPiece)]
    assert [(p["who"], p["text"], p["n"]) for p in pieces] == [
        ("agent", " Hi", 1), ("caller", " 2", 2), ("caller", "at", 3), ("agent", " there", 4)]
    assert snapshot["transcript_pieces"] == 2
    new = [p for p in pieces if p["n"] > snapshot["transcript_pieces"]]
    assert [p["text"] for p in new] == ["at", " there"]  # by t1 ("at" is not after 0.16) it was lost
    assert call_summary.live_call(sess)["transcript_pieces"] == 4


def test_keep_false_leaves_the_words_out():
    sess = session()
    live(sess, 3, 0.0, 0.1, {0: " secret", 1: " words"})
    end(sess, EndReason.TRANSFERRED)
    segments = call_summary.transcript(sess, keep_text=False)
    assert segments == [{"who": "agent", "t0": 0.0, "t1": 0.16}]
    body = payload.call_end(sess, EndReason.TRANSFERRED, keep_text=False)
    assert "secret" not in payload.encode(body).decode() and body["transfer"] is None


def test_a_transfer_that_went_through():
    sess = session()
    live(sess, 2, 0.0, 0.1, {})
    sess.emit(TransferRequested("sip:desk@pbx"))
    end(sess, EndReason.TRANSFERRED)
    assert call_summary.transfer(sess) == {"target": "sip:desk@pbx", "attempts": 1, "outcome": "transferred",
                                           "status": None}
    assert isinstance(sess.journal[0][1], TransferRequested) and not any(isinstance(e, Dtmf) for _, e in sess.journal)
