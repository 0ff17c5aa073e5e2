"""The webhook bodies, built from the call's session at the moment of the event.

`call_end` carries what the company's systems need after a call: who called whom, when, why it
ended, the call's variables, both sides' transcript (the same segments as the call record),
the DTMF keys, the transfer, the re-primes and where the recording is. `call_start` carries who
is calling and the variables the call starts with. README "Webhooks" documents every field.
"""

from __future__ import annotations

import json

from agent.calls.events import EndReason
from agent.calls.session import CallSession
from server import call_summary


def _who(sess: CallSession) -> dict:
    return {"call_id": sess.call_id, "persona": sess.persona.id, "endpoint": sess.endpoint,
            "caller_number": sess.caller, "dialled_number": sess.number, "direction": sess.direction}


def start_state(sess: CallSession) -> str:
    """The call's state at call_start: a placed call starts when the callee answered; an inbound
    one starts while it rings (its 200 OK follows the agent's first frame)."""
    return "answered" if sess.direction == "outbound" else "ringing"


def end_state(sess: CallSession) -> str:
    """The call's final state at call_end (the outbound API's states): a placed call that was
    never answered says why (busy, no_answer, declined, failed; ended when cancelled)."""
    if sess.direction == "outbound" and sess.dial_state not in (None, "dialing", "ringing", "answered"):
        return sess.dial_state
    return "ended"


def call_start(sess: CallSession) -> dict:
    return {"event": "call_start", **_who(sess), "state": start_state(sess),
            "started_at": call_summary.iso_time(sess.created_wall), "variables": dict(sess.variables)}


def call_end(sess: CallSession, reason: EndReason, keep_text: bool = True, recording: dict | None = None) -> dict:
    return {"event": "call_end", **_who(sess), "state": end_state(sess), **call_summary.times(sess),
            "duration_s": round(sess.duration, 2), "reason": reason.value, "variables": dict(sess.variables),
            "transcript": call_summary.transcript(sess, keep_text), "dtmf": call_summary.dtmf_digits(sess),
            "transfer": call_summary.transfer(sess), "reprimes": list(sess.reprimes), "recording": recording,
            "queue_wait_s": sess.queue_wait_s, "amd": sess.amd}


def encode(body: dict) -> bytes:
    """The bytes stored, signed and sent (compact UTF-8 JSON)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
