"""The call page's data-channel protocol: the documented wire format between server and page.

One data channel, label "events", carries JSON text messages, each an object with a "type".

Server -> page:
    {"type": "state", "state": "preparing"|"answering"|"live"|"ended"}   call state changes
        (the first one, sent when the channel opens, also has "call_id" and "persona")
    {"type": "text", "text": " hello"}             a piece of the agent's words (leading space = new word)
    {"type": "barge_in", "generation": 3}           the caller talked over the agent; its queued audio was dropped
    {"type": "dtmf", "digit": "5"}                  a key the caller pressed reached call control
    {"type": "hold", "on": true}
    {"type": "transfer_failed", "status": 486}
    {"type": "ended", "reason": "caller_hangup"}    the last message; `reason` is an EndReason value

Page -> server:
    {"type": "hangup"}
    {"type": "dtmf", "digit": "5"}                  one of 0-9 * # A-D

Anything else from the page is ignored. Internal event classes are mapped here explicitly, so a
rename inside the agent cannot change what the page receives.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from agent.events import BargeIn, CallEvent, Dtmf, Ended, Hold, StateChanged, TextOut, TransferFailed

DTMF_DIGIT = re.compile(r"^[0-9*#A-D]$")


def encode_event(ev: CallEvent) -> dict | None:
    """The page message for an agent event, or None for events the page does not get."""
    if isinstance(ev, StateChanged):
        return {"type": "state", "state": ev.state.value}
    if isinstance(ev, TextOut):
        return {"type": "text", "text": ev.text}
    if isinstance(ev, BargeIn):
        return {"type": "barge_in", "generation": ev.generation}
    if isinstance(ev, Dtmf):
        return {"type": "dtmf", "digit": ev.digit}
    if isinstance(ev, Hold):
        return {"type": "hold", "on": ev.on}
    if isinstance(ev, TransferFailed):
        return {"type": "transfer_failed", "status": ev.status}
    if isinstance(ev, Ended):
        return {"type": "ended", "reason": ev.reason.value}
    return None


def hello(state: str, call_id: str, persona: str) -> dict:
    """The first message on a newly opened channel."""
    return {"type": "state", "state": state, "call_id": call_id, "persona": persona}


@dataclass(frozen=True)
class PageHangup:
    pass


@dataclass(frozen=True)
class PageDtmf:
    digit: str


def decode_page_message(message) -> PageHangup | PageDtmf | None:
    """A message from the page, or None when it is not one we understand (ignored)."""
    if not isinstance(message, str):
        return None
    try:
        msg = json.loads(message)
    except (ValueError, RecursionError):
        return None
    if not isinstance(msg, dict):
        return None
    kind = msg.get("type")
    if kind == "hangup":
        return PageHangup()
    if kind == "dtmf":
        digit = msg.get("digit")
        if isinstance(digit, str) and DTMF_DIGIT.match(digit):
            return PageDtmf(digit)
    return None
