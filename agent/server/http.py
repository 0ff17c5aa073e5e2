"""Health, readiness, metrics, calls and personas: what the public port shows, and what only ops see.

The public port (where browsers and load balancers come) answers `/healthz`, `/readyz` (ready or
not, and free slots: what a balancer needs, nothing more) and `/api/personas` (the personas
offered to browsers, only what the picker shows). Everything operators read — Prometheus
`/metrics`, the calls in progress (`/api/calls`: numbers, personas, durations), every persona
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
    body = {"model_loaded": rt.ready.model, "endpoints_listening": rt.ready.endpoints,
            "engine_running": bool(sch and sch.running), "warm": rt.ready.warm, "draining": rt.draining,
            "capacity_left": sch.capacity_left if sch else 0, "max_calls": rt.cfg.engine.max_calls}
    body["ready"] = bool(body["model_loaded"] and body["endpoints_listening"] and body["engine_running"]
                         and body["warm"] and not body["draining"] and body["capacity_left"] > 0)
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


async def calls(request: web.Request) -> web.Response:
    sch = _rt(request).scheduler
    out = []
    for s in (sch.active_calls if sch else []):
        st = s.stats
        out.append({"call_id": s.call_id, "persona": s.persona.id, "number": s.number, "endpoint": s.endpoint,
                    "state": s.state.value, "duration_s": round(s.duration, 2), "answer_ticks": s.answer_ticks,
                    "frames_in": st.frames_in, "caller_peak": round(st.caller_peak, 4),
                    "frames_out": st.frames_out, "late_inbound": st.late_inbound,
                    "caller_audio_dropped_s": round(st.caller_dropped_s, 3),
                    "playout_underruns": st.playout_underruns, "barge_ins": st.barge_ins})
    return web.json_response({"calls": out})


async def personas(request: web.Request) -> web.Response:
    reg = _rt(request).registry
    items = [{"id": p.id, "kind": p.kind, "company": p.company, "agent_name": p.agent_name, "voice": p.voice,
              "numbers": list(p.numbers), "default": p.default, "browser": p.browser,
              "description": p.description, "source": p.source}
             for p in (reg.personas() if reg else [])]
    return web.json_response({"personas": items, "problems": [str(i) for i in (reg.issues if reg else [])]})


def bearer_guard(token_env: str | None):
    """Middleware: with a token in $token_env, every request needs `Authorization: Bearer <it>`
    (constant-time compare; 401 otherwise)."""
    @web.middleware
    async def guard(request: web.Request, handler):
        token = os.environ.get(token_env) if token_env else None
        if token:
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
    app.router.add_get("/api/personas", personas)
    return app
