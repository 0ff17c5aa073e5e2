"""The calls API on the ops listener: place a call, read any call's state, hang up or cancel.

`POST /api/calls` {to, persona, variables, from, ring_timeout_s} -> 202 {call_id, state:
"dialing"} at once, or 400 (the body), 403 (outbound off, `to`/`from` outside the allow-lists),
404 (no such persona, or one that only answers), 503 {reason: capacity|draining|unavailable}.
`GET /api/calls/{id}` -> the call: outbound ones from dial to some minutes after their end,
inbound ones while in progress and for a while after (`RecentCalls`). `DELETE /api/calls/{id}`
-> 200 with the state once the far end has it and the call's slot is free (`DELETE_WAIT_S` at
most), 404 for an unknown id.
The campaign CLI (server/cli/campaign*) speaks exactly this; README "Outbound calls" documents it.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.calls.events import CallState, Ended
from agent.calls.session import CallSession
from telephony.outbound import FINAL, Outbound, OutboundRefused

#: how long DELETE waits for the far end to take the hang-up or cancel (then answers the state as it is)
DELETE_WAIT_S = 1.5


class PlaceCall(BaseModel):
    """POST /api/calls: unknown fields are refused (a typo must not dial with a default)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    to: str = Field(min_length=1, max_length=256)
    persona: str = Field(min_length=1, max_length=128)
    variables: dict[str, str | int | float] = {}
    from_: str | None = Field(None, alias="from", min_length=1, max_length=256)
    ring_timeout_s: float | None = Field(None, gt=0, le=300)


def session_view(sess: CallSession) -> dict:
    """An inbound (or not yet placed) call as GET /api/calls/{id} shows it: the states of
    outbound calls, so one reader serves both."""
    if sess.state is CallState.ENDED:
        state = "ended"
    elif sess.state is CallState.LIVE:
        state = "answered"
    else:
        state = "ringing"
    inbound = sess.direction == "inbound"
    return {"call_id": sess.call_id, "state": state, "direction": sess.direction, "endpoint": sess.endpoint,
            "to": sess.number if inbound else None, "from": sess.caller, "persona": sess.persona.id,
            "started_at": sess.created_wall, "answered_at": sess.wall_time(sess.answered_at),
            "ended_at": sess.wall_time(sess.ended_at),
            "reason": sess.end_reason.value if sess.end_reason is not None else None}


class RecentCalls:
    """Inbound calls' views after their end, for `keep_s` and at most `keep_max` (a scheduler
    `on_call_start` hook; the view is taken on the engine thread when the call ends)."""

    def __init__(self, keep_s: float, keep_max: int):
        self.keep_s, self.keep_max = keep_s, keep_max
        self._lock = threading.Lock()
        self._ended: collections.OrderedDict[str, tuple[float, dict]] = collections.OrderedDict()

    def attach(self, sess: CallSession) -> None:
        if sess.direction != "inbound":
            return  # outbound calls keep their own record (telephony.outbound)

        def on_event(ev) -> None:
            if isinstance(ev, Ended):
                view = session_view(sess)
                view.update(state="ended", reason=ev.reason.value)
                with self._lock:
                    self._ended[sess.call_id] = (time.monotonic(), view)
                    self._prune()
        sess.subscribe(on_event)

    def get(self, call_id: str) -> dict | None:
        with self._lock:
            self._prune()
            got = self._ended.get(call_id)
            return got[1] if got else None

    def _prune(self) -> None:
        now = time.monotonic()
        while self._ended:
            t, _ = next(iter(self._ended.values()))
            if now - t <= self.keep_s and len(self._ended) <= self.keep_max:
                break
            self._ended.popitem(last=False)


def _outbound(request: web.Request) -> Outbound | None:
    return request.app["runtime"].outbound


def _error(status: int, error: str, reason: str | None = None) -> web.Response:
    return web.json_response({"error": error, **({"reason": reason} if reason else {})}, status=status)


async def place_call(request: web.Request) -> web.Response:
    out = _outbound(request)
    try:
        raw = await request.json()
    except ValueError:
        return _error(400, "the body is not JSON")
    if not isinstance(raw, dict):
        return _error(400, "the body is a JSON object: {to, persona, variables, from, ring_timeout_s}")
    try:
        body = PlaceCall.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        return _error(400, f"{where}: {msg}")
    if out is None:
        return _error(403, "outbound calls are off (outbound.enabled, with sip.enabled)", "disabled")
    try:
        call = out.place(body.to, body.persona, {k: str(v) for k, v in body.variables.items()},
                         body.from_, body.ring_timeout_s)
    except OutboundRefused as exc:
        return web.json_response(exc.body(), status=exc.status)
    return web.json_response({"call_id": call.call_id, "state": "dialing"}, status=202)


def _view(request: web.Request, call_id: str) -> dict | None:
    rt = request.app["runtime"]
    out = rt.outbound
    placed = out.get(call_id) if out is not None else None
    if placed is not None:
        return placed.view()
    for sess in rt.scheduler.active_calls if rt.scheduler is not None else []:
        if sess.call_id == call_id:
            return session_view(sess)
    return rt.recent_calls.get(call_id) if rt.recent_calls is not None else None


async def get_call(request: web.Request) -> web.Response:
    view = _view(request, request.match_info["call_id"])
    if view is None:
        return _error(404, "no such call (or it ended too long ago)")
    return web.json_response(view)


async def delete_call(request: web.Request) -> web.Response:
    call_id = request.match_info["call_id"]
    out = _outbound(request)
    call = out.cancel(call_id) if out is not None else None
    if call is None:
        rt = request.app["runtime"]
        sess = next((s for s in (rt.scheduler.active_calls if rt.scheduler else []) if s.call_id == call_id), None)
        if sess is None:
            view = _view(request, call_id)
            return web.json_response(view) if view is not None else _error(404, "no such call")
        from agent.calls.events import EndReason

        sess.hangup(EndReason.SUPERVISOR)
        deadline = time.monotonic() + DELETE_WAIT_S
        while sess.state is not CallState.ENDED and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return web.json_response(session_view(sess))
    deadline = time.monotonic() + DELETE_WAIT_S
    sess = call.admitted.session if call.admitted is not None else None
    # until its session has ended too: an answer of "ended" means the call's slot is free
    while (call.state not in FINAL or (sess is not None and sess.state is not CallState.ENDED)) \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return web.json_response(call.view())


def add_call_routes(app: web.Application) -> None:
    app.router.add_post("/api/calls", place_call)
    app.router.add_get("/api/calls/{call_id}", get_call)
    app.router.add_delete("/api/calls/{call_id}", delete_call)
