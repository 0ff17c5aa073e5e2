"""What is said about a call outside the process: the same fields for the call list, the live
stream's first event, the call record and the webhooks, so that they always agree.

Transcripts (and call variables) are personal data: they go into these documents, never into a
log line. `transcript.keep: false` leaves the words out of records and webhooks (who spoke when
stays).
"""

from __future__ import annotations

from datetime import datetime, timezone

from agent.calls.events import Dtmf, EndReason, TransferFailed, TransferRequested
from agent.calls.session import CallSession
from server.event_json import event_json


def iso_time(unix: float | None) -> str | None:
    """UTC, ISO 8601 with milliseconds and a Z (what JSON readers parse everywhere)."""
    if unix is None:
        return None
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def times(sess: CallSession) -> dict:
    """When the call came in, was answered (its first agent frame) and ended, on the wall clock."""
    return {"started_at": iso_time(sess.created_wall), "answered_at": iso_time(sess.wall_time(sess.answered_at)),
            "ended_at": iso_time(sess.wall_time(sess.ended_at))}


def transcript(sess: CallSession, keep_text: bool = True) -> list[dict]:
    """Both sides' segments `{who, t0, t1, text}`; without `text` when words are not kept."""
    segments = sess.transcript.segments()
    if not keep_text:
        for seg in segments:
            seg.pop("text", None)
    return segments


def journal(sess: CallSession) -> list[dict]:
    """Barge-ins, DTMF, hold, transfers and re-primes, each with `t` on the call's clock."""
    out = []
    for t, ev in list(sess.journal):
        body = event_json(ev)
        if body is not None:
            out.append({"t": round(t, 2), **body})
    return out


def dtmf_digits(sess: CallSession) -> str:
    """The keys the caller pressed, in order."""
    return "".join(ev.digit for _, ev in list(sess.journal) if isinstance(ev, Dtmf))


def transfer(sess: CallSession) -> dict | None:
    """The call's transfer to a person, if call control asked for one: its target, how many times
    it was asked, and how it went ("transferred", "failed" with the refusing status, or
    "not_completed": the call ended first)."""
    events = [ev for _, ev in list(sess.journal)]
    asked = [ev for ev in events if isinstance(ev, TransferRequested)]
    if not asked:
        return None
    failed = [ev for ev in events if isinstance(ev, TransferFailed)]
    if sess.end_reason is EndReason.TRANSFERRED:
        outcome, status = "transferred", None
    elif failed:
        outcome, status = "failed", failed[-1].status
    else:
        outcome, status = "not_completed", None
    return {"target": asked[-1].target, "attempts": len(asked), "outcome": outcome, "status": status}


def live_call(sess: CallSession, last_segments: int = 3) -> dict:
    """A call in progress, as the call list and the live stream's first event show it."""
    segments, pieces = sess.transcript.snapshot(last_segments)
    st = sess.stats
    return {"call_id": sess.call_id, "persona": sess.persona.id, "endpoint": sess.endpoint,
            "direction": sess.direction,
            "caller_number": sess.caller, "dialled_number": sess.number, "number": sess.number,
            "state": sess.state.value, **times(sess), "duration_s": round(sess.duration, 2),
            "answer_ticks": sess.answer_ticks, "queue_wait_s": sess.queue_wait_s, "frames_in": st.frames_in,
            "caller_peak": round(st.caller_peak, 4),
            "frames_out": st.frames_out, "late_inbound": st.late_inbound,
            "caller_audio_dropped_s": round(st.caller_dropped_s, 3),
            "caller_audio_lost_s": round(st.caller_lost_s, 3), "caller_audio_lost": st.lost(),
            "playout_underruns": st.playout_underruns,
            "barge_ins": st.barge_ins, "transcript": segments, "transcript_pieces": pieces}
