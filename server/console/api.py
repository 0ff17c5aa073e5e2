"""The console's live data and actions: the Now stream (slots and every live call, as one
snapshot a second over SSE), a call's details and events, hang-up and transfer.

The Now stream is bounded per viewer by construction: a viewer holds at most one snapshot in
flight; one whose socket stops taking bytes (more than `BUFFER_BYTES` waiting) is cut, and at most
`console.max_viewers` streams are open at once.
"""

from __future__ import annotations

import asyncio
import json

import structlog
from aiohttp import web

from agent.calls.events import EndReason, Levels, TransferOrdered
from agent.calls.session import CallSession
from server.call_summary import journal, live_call
from server.console.auth import signed_in

log = structlog.get_logger(__name__)

#: how often the Now stream sends a snapshot
NOW_PERIOD_S = 1.0
#: bytes a Now viewer may leave unread before it is cut
BUFFER_BYTES = 256 * 1024


class LastLevels:
    """Each live call's latest levels (caller, agent), kept from its `Levels` events: the Now view
    shows them without subscribing a viewer to every call's event stream."""

    def __init__(self) -> None:
        self._levels: dict[str, tuple[float, float]] = {}

    def attach(self, sess: CallSession) -> None:
        call_id = sess.call_id

        def on_event(ev) -> None:
            if isinstance(ev, Levels):
                self._levels[call_id] = (ev.caller, ev.agent)

        sess.subscribe(on_event)

    def of(self, call_id: str) -> tuple[float, float]:
        return self._levels.get(call_id, (0.0, 0.0))

    def forget_except(self, live: set[str]) -> None:
        for cid in [c for c in self._levels if c not in live]:
            self._levels.pop(cid, None)


class Viewers:
    """How many Now streams are open (bounded)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open = 0
        self.transports: set = set()

    def close(self) -> None:
        """At shutdown: end every Now stream (they would otherwise hold the listener open)."""
        for t in list(self.transports):
            t.close()
        self.transports.clear()


def _sessions(rt) -> list[CallSession]:
    return list(rt.scheduler.active_calls) if rt.scheduler else []


def _find(rt, call_id: str) -> CallSession | None:
    return next((s for s in _sessions(rt) if s.call_id == call_id), None)


def now_snapshot(app: web.Application) -> dict:
    rt = app["runtime"]
    levels: LastLevels = app["console_levels"]
    sessions = _sessions(rt)
    levels.forget_except({s.call_id for s in sessions})
    calls = []
    for s in sessions:
        row = live_call(s, last_segments=1)
        row["level_caller"], row["level_agent"] = (round(v, 4) for v in levels.of(s.call_id))
        row["reprimes"] = len(s.reprimes)
        row["direction"] = s.direction
        calls.append(row)
    max_calls = rt.cfg.engine.max_calls
    free = rt.scheduler.capacity_left if rt.scheduler else 0
    return {"slots": {"max": max_calls, "free": free, "used": max_calls - free}, "draining": rt.draining,
            "queue": queue_snapshot(rt), "calls": calls}


def queue_snapshot(rt) -> dict:
    """The callers on hold (`queue.*`): how many may wait, and each one's place and wait so far."""
    adm = getattr(rt, "admission", None)
    queue = adm.queue if adm is not None else None
    if queue is None:
        return {"enabled": False, "max_waiting": 0, "depth": 0, "waiting": []}
    waiting = [{"position": w.position, "waited_s": w.waited_s, "endpoint": w.endpoint, "caller_number": w.caller,
                "dialled_number": w.dialled, "persona": w.persona} for w in queue.waiting()]
    return {"enabled": queue.enabled, "max_waiting": queue.settings.max_waiting, "depth": len(waiting),
            "waiting": waiting}


@signed_in
async def now_json(request: web.Request) -> web.Response:
    return web.json_response(now_snapshot(request.app))


@signed_in
async def now_stream(request: web.Request) -> web.StreamResponse:
    """GET /console/api/now/stream: `event: now` with a snapshot, every `NOW_PERIOD_S`."""
    viewers: Viewers = request.app["console_viewers"]
    if viewers.open >= viewers.limit:
        return web.json_response({"error": "busy", "reason": "too many console viewers"}, status=503)
    viewers.open += 1
    try:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        transport = request.transport
        if transport is not None:
            viewers.transports.add(transport)
        while transport is not None and not transport.is_closing():
            if transport.get_write_buffer_size() > BUFFER_BYTES:
                log.warning("console_viewer_dropped", reason="reader_behind")
                transport.abort()
                break
            data = json.dumps(now_snapshot(request.app), separators=(",", ":"))
            await resp.write(f"event: now\ndata: {data}\n\n".encode())
            await asyncio.sleep(NOW_PERIOD_S)
        return resp
    except (ConnectionError, RuntimeError):
        return resp
    finally:
        viewers.open -= 1
        viewers.transports.discard(request.transport)


@signed_in
async def call_detail(request: web.Request) -> web.Response:
    """GET /console/api/calls/{call_id}: the call, its whole transcript, prompt, variables, events."""
    sess = _find(request.app["runtime"], request.match_info["call_id"])
    if sess is None:
        return web.json_response({"error": "not_found", "reason": "no call in progress has this id"}, status=404)
    body = live_call(sess, last_segments=1_000_000)
    body.update(direction=sess.direction, prompt=sess.prompt, variables=sess.variables, events=journal(sess), reprimes=len(sess.reprimes))
    return web.json_response(body)


@signed_in
async def call_events(request: web.Request) -> web.StreamResponse:
    """GET /console/api/calls/{call_id}/events: the ops live event stream, behind the cookie."""
    return await request.app["runtime"].live.handle(request)


@signed_in
async def hang_up(request: web.Request) -> web.Response:
    """POST /console/api/calls/{call_id}/hangup"""
    who = request["console_session"].who
    sess = _find(request.app["runtime"], request.match_info["call_id"])
    if sess is None:
        return web.json_response({"error": "not_found", "reason": "no call in progress has this id"}, status=404)
    sess.log.info("console_hangup", by=who)
    sess.hangup(EndReason.SUPERVISOR)
    return web.json_response({"ok": True, "call_id": sess.call_id})


@signed_in
async def transfer(request: web.Request) -> web.Response:
    """POST /console/api/calls/{call_id}/transfer {"target": one of console.transfer_targets}"""
    rt = request.app["runtime"]
    who = request["console_session"].who
    try:
        target = (await request.json()).get("target")
    except (ValueError, AttributeError):
        target = None
    if target not in rt.cfg.console.transfer_targets:
        return web.json_response({"error": "bad_target", "reason": "not one of console.transfer_targets"},
                                 status=400)
    sess = _find(rt, request.match_info["call_id"])
    if sess is None:
        return web.json_response({"error": "not_found", "reason": "no call in progress has this id"}, status=404)
    sess.log.info("console_transfer", target=target, by=who)
    sess.emit(TransferOrdered(target, who))
    return web.json_response({"ok": True, "call_id": sess.call_id, "target": target}, status=202)


@signed_in
async def personas(request: web.Request) -> web.Response:
    """GET /console/api/personas: which number reaches which persona; the last reload's problems."""
    reg = request.app["runtime"].registry
    items = [{"id": p.id, "direction": p.direction, "company": p.company, "agent_name": p.agent_name, "numbers": list(p.numbers),
              "default": p.default, "browser": p.browser, "source": p.source}
             for p in (reg.personas() if reg else [])]
    return web.json_response({"personas": items, "problems": [str(i) for i in (reg.issues if reg else [])]})


@signed_in
async def whoami(request: web.Request) -> web.Response:
    s = request["console_session"]
    return web.json_response({"who": s.who, "transfer_targets": request.app["runtime"].cfg.console.transfer_targets})


def add_routes(app: web.Application, prefix: str) -> None:
    p = prefix + "/api"
    app.router.add_get(p + "/me", whoami)
    app.router.add_get(p + "/now", now_json)
    app.router.add_get(p + "/now/stream", now_stream)
    app.router.add_get(p + "/calls/{call_id}", call_detail)
    app.router.add_get(p + "/calls/{call_id}/events", call_events)
    app.router.add_post(p + "/calls/{call_id}/hangup", hang_up)
    app.router.add_post(p + "/calls/{call_id}/transfer", transfer)
    app.router.add_get(p + "/personas", personas)
