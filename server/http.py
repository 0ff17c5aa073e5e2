"""Health, readiness, metrics, calls and personas: what the public port shows, and what only ops see.

The public port (where browsers and load balancers come) answers `/healthz`, `/readyz` (ready or
not, and free slots: what a balancer needs, nothing more) and `/api/personas` (the personas
offered to browsers, only what the picker shows). Everything operators read — Prometheus
`/metrics`, the calls in progress (`/api/calls`: numbers, personas, durations, latest transcript
lines) and each call's live events (`/api/calls/{id}/events`, `server.live_events`), every persona
with its problems and file paths, the detailed readiness — is on the ops listener
(`ops.host`/`ops.port`, localhost by default), behind a bearer token when `ops.token_env` is set.
"""

from __future__ import annotations

import hmac
import os

from aiohttp import web


def _rt(request: web.Request):
    return request.app["runtime"]


def readiness(rt) -> dict:
    sch = rt.scheduler
    body = {"model_loaded": rt.ready.model, "endpoints_listening": rt.ready.transports,
            "engine_running": bool(sch and sch.running), "warm": rt.ready.warm, "draining": rt.draining,
            "capacity_left": sch.capacity_left if sch else 0, "max_calls": rt.cfg.engine.max_calls}
    adm = rt.admission
    # with a queue, "full" means every slot busy and the queue full too (a caller would wait)
    body["queue_waiting"] = adm.queue.depth if adm is not None else 0
    can_take = adm.availability() is None if adm is not None else body["capacity_left"] > 0
    body["ready"] = bool(body["model_loaded"] and body["endpoints_listening"] and body["engine_running"]
                         and body["warm"] and not body["draining"] and can_take)
    return body


# -- public ----------------------------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    body = readiness(_rt(request))
    return web.json_response({"ready": body["ready"], "capacity_left": body["capacity_left"]},
                             status=200 if body["ready"] else 503)


async def browser_personas(request: web.Request) -> web.Response:
    reg = _rt(request).registry
    items = [{"id": p.id, "kind": p.kind, "company": p.company, "agent_name": p.agent_name,
              "description": p.description}
             for p in (reg.personas() if reg else []) if p.browser]
    return web.json_response({"personas": items})


def add_public_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/personas", browser_personas)


# -- ops -------------------------------------------------------------------------------------------
async def ops_readyz(request: web.Request) -> web.Response:
    body = readiness(_rt(request))
    return web.json_response(body, status=200 if body["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    rt = _rt(request)
    rt._sync_reload_errors()
    if rt.scheduler is not None:
        rt.metrics.observe_slots(rt.scheduler)
    from prometheus_client import CONTENT_TYPE_LATEST

    return web.Response(body=rt.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


#: transcript segments each call in the call list shows (its latest lines)
CALL_LIST_SEGMENTS = 3


async def calls(request: web.Request) -> web.Response:
    """The calls in progress, each with its latest transcript lines (README "Live calls")."""
    from server.call_summary import live_call

    sch = _rt(request).scheduler
    return web.json_response({"calls": [live_call(s, CALL_LIST_SEGMENTS) for s in (sch.active_calls if sch else [])]})


async def personas(request: web.Request) -> web.Response:
    reg = _rt(request).registry
    items = [{"id": p.id, "kind": p.kind, "company": p.company, "agent_name": p.agent_name, "voice": p.voice,
              "numbers": list(p.numbers), "default": p.default, "browser": p.browser,
              "description": p.description, "source": p.source}
             for p in (reg.personas() if reg else [])]
    return web.json_response({"personas": items, "problems": [str(i) for i in (reg.issues if reg else [])]})


def _console_path(path: str) -> bool:
    """The console (server.console) signs its browsers in with the same token and a cookie: its
    own guard checks every one of its routes."""
    return path == "/console" or path.startswith("/console/")


def bearer_guard(token_env: str | None):
    """Middleware: with a token in $token_env, every request needs `Authorization: Bearer <it>`
    (constant-time compare; 401 otherwise)."""
    @web.middleware
    async def guard(request: web.Request, handler):
        token = os.environ.get(token_env) if token_env else None
        if token and not _console_path(request.path):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {token}".encode()):
                return web.json_response({"error": "unauthorized", "reason": "ops token missing or wrong"},
                                         status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)
    return guard


def ops_app(runtime) -> web.Application:
    app = web.Application(middlewares=[bearer_guard(runtime.cfg.ops.token_env)])
    app["runtime"] = runtime
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", ops_readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/calls", calls)
    app.router.add_get("/api/calls/{call_id}/events", runtime.live.handle)
    from server.outbound_api import add_call_routes

    add_call_routes(app)  # POST /api/calls, GET and DELETE /api/calls/{id}
    app.router.add_get("/api/personas", personas)
    from server.console import add_console

    add_console(app, runtime)
    return app
