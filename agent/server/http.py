"""Operations endpoints: health, readiness, Prometheus metrics, calls and personas as JSON."""

from __future__ import annotations

from aiohttp import web


def _rt(request: web.Request):
    return request.app["runtime"]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = _rt(request)
    sch = rt.scheduler
    body = {"model_loaded": rt.ready.model, "endpoints_listening": rt.ready.endpoints,
            "engine_running": bool(sch and sch.running), "warm": rt.ready.warm, "draining": rt.draining,
            "capacity_left": sch.capacity_left if sch else 0,
            "max_calls": rt.cfg.engine.max_calls}
    ok = body["model_loaded"] and body["endpoints_listening"] and body["engine_running"] and body["warm"] \
        and not body["draining"] and body["capacity_left"] > 0
    body["ready"] = ok
    return web.json_response(body, status=200 if ok else 503)


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
              "numbers": list(p.numbers), "default": p.default, "description": p.description}
             for p in (reg.personas() if reg else [])]
    return web.json_response({"personas": items, "problems": [str(i) for i in (reg.issues if reg else [])]})


def add_ops_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/calls", calls)
    app.router.add_get("/api/personas", personas)
