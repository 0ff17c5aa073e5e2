"""Call events as the JSON operators' tools read: the live event stream and call records.

The mapping is explicit (like the page's `telephony.webrtc.protocol`), so renaming a class inside
the agent cannot change what a supervisor console or a record reader receives. Every object has
a `type`; README "Live calls" documents each one.
"""

from __future__ import annotations

from agent.calls.events import CallEvent, Ended, Levels, Reprime, TransferRequested, common_json
from agent.calls.transcript import TranscriptPiece


def event_json(ev: CallEvent) -> dict | None:
    """The JSON of an event, or None for events operators' tools do not get (the agent's raw
    text pieces: they arrive as `transcript`; suppressed barge-ins)."""
    if isinstance(ev, TranscriptPiece):
        return {"type": "transcript", **ev.as_dict()}
    if isinstance(ev, Levels):
        return {"type": "levels", "caller": round(ev.caller, 4), "agent": round(ev.agent, 4)}
    if isinstance(ev, TransferRequested):
        return {"type": "transfer", "target": ev.target}
    if isinstance(ev, Reprime):
        return {"type": "reprime", "frame": ev.frame, "window": ev.window, "swap": ev.swap}
    if isinstance(ev, Ended):
        return {"type": "end", "reason": ev.reason.value}
    return common_json(ev)
