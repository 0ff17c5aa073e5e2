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

  While the caller waits in the call queue (the offer's answer said {"queued": true, "position": N}
  and there is no call id yet; the outbound track plays the hold audio):
    {"type": "queue", "position": 2}                 its place (1: next), sent when the channel opens and on every change
    {"type": "refused", "error": "busy"|"draining"|"unavailable", "reason": "...", "retry_after": 7}
                                                     no slot will come (waited `queue.max_wait_s`, the agent drains):
                                                     the last message, the server then closes the connection
  When the slot comes the call starts like any other: the first `state` message (with "call_id")
  follows, then the agent's audio on the same track.

Page -> server:
    {"type": "hangup"}                              (while queued: leaves the queue)
    {"type": "dtmf", "digit": "5"}                  one of 0-9 * # A-D

Anything else from the page is ignored. Internal event classes are mapped here explicitly, so a
rename inside the agent cannot change what the page receives.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from agent.calls.events import CallEvent, Ended, TextOut, common_json

DTMF_DIGIT = re.compile(r"^[0-9*#A-D]$")


def encode_event(ev: CallEvent) -> dict | None:
    """The page message for an agent event, or None for events the page does not get."""
    if isinstance(ev, TextOut):
        return {"type": "text", "text": ev.text}
    if isinstance(ev, Ended):
        return {"type": "ended", "reason": ev.reason.value}
    return common_json(ev)


def send(channel, payload: dict) -> None:
    """One message to the page, if its data channel is open: best effort, because a page that
    has gone is noticed by the connection state, not by a failed send."""
    if channel is not None and channel.readyState == "open":
        try:
            channel.send(json.dumps(payload))
        except Exception:
            pass


def queue_position(position: int) -> dict:
    """The waiting caller's place in the queue (1: the next to be answered)."""
    return {"type": "queue", "position": position}


def refused(kind: str, reason: str, retry_after: int | None) -> dict:
    """No slot will come for a waiting caller: the same fields as a refused offer's body."""
    return {"type": "refused", "error": kind, "reason": reason, "retry_after": retry_after}


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
