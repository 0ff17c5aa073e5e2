"""Finished calls, from their records (`server.recording`): a search over the JSON records in
`recording.dir`, each record whole, and its stereo wav for the page's player.

Records are named `<UTC stamp>-<call id>`; a name from the browser is checked against that
shape and must resolve inside the directory, so the console serves nothing else from disk.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from aiohttp import web

from server.console.auth import signed_in

#: the newest records a search looks at, and the most it returns
SCAN_LIMIT = 2000
RESULT_LIMIT = 200
NAME = re.compile(r"^\d{8}T\d{6}Z-[A-Za-z0-9_.:-]{1,128}$")


def _dir(request: web.Request) -> Path:
    return Path(request.app["runtime"].cfg.recording.dir).resolve()


def _record_path(request: web.Request, name: str, suffix: str) -> Path | None:
    if not NAME.match(name) or ".." in name:
        return None
    d = _dir(request)
    path = d / f"{name}{suffix}"
    if path.resolve().parent != d or not path.is_file():
        return None
    return path


def summary(name: str, rec: dict) -> dict:
    """What the list shows of a record (no words, no variables)."""
    return {"name": name, "call_id": rec.get("call_id"), "persona": rec.get("persona"),
            "endpoint": rec.get("endpoint"), "direction": rec.get("direction"), "caller_number": rec.get("caller_number"),
            "dialled_number": rec.get("dialled_number"), "started_at": rec.get("started_at"),
            "duration_s": rec.get("duration_s"), "reason": rec.get("reason"),
            "transfer": rec.get("transfer")}


def matches(rec: dict, persona: str, number: str, date: str, reason: str) -> bool:
    """Search: persona and reason exactly, number as a substring of either number, date as a
    prefix of the start time (`2026-12-05`, or `2026-12` for a month)."""
    if persona and rec.get("persona") != persona:
        return False
    if reason and rec.get("reason") != reason:
        return False
    if number and not any(number in str(rec.get(k) or "") for k in ("caller_number", "dialled_number")):
        return False
    if date and not str(rec.get("started_at") or "").startswith(date):
        return False
    return True


@signed_in
async def search(request: web.Request) -> web.Response:
    """GET /console/api/history?persona=&number=&date=&reason="""
    q = {k: request.query.get(k, "").strip() for k in ("persona", "number", "date", "reason")}
    d = _dir(request)
    out: list[dict] = []
    files = sorted(d.glob("*.json"), reverse=True)[:SCAN_LIMIT] if d.is_dir() else []
    for path in files:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written, or not a record
        if matches(rec, **q):
            out.append(summary(path.stem, rec))
            if len(out) >= RESULT_LIMIT:
                break
    return web.json_response({"records": out, "recording": request.app["runtime"].cfg.recording.enabled})


@signed_in
async def record(request: web.Request) -> web.Response:
    """GET /console/api/history/{name}: the whole record (transcript, prompt, variables, events)."""
    path = _record_path(request, request.match_info["name"], ".json")
    if path is None:
        return web.json_response({"error": "not_found"}, status=404)
    return web.json_response(json.loads(path.read_text()))


@signed_in
async def audio(request: web.Request) -> web.StreamResponse:
    """GET /console/api/history/{name}/audio: the stereo wav (caller left, agent right)."""
    path = _record_path(request, request.match_info["name"], ".wav")
    if path is None:
        return web.json_response({"error": "not_found"}, status=404)
    return web.FileResponse(path, headers={"Content-Type": "audio/wav", "Cache-Control": "no-store"})


def add_routes(app: web.Application, prefix: str) -> None:
    app.router.add_get(prefix + "/api/history", search)
    app.router.add_get(prefix + "/api/history/{name}", record)
    app.router.add_get(prefix + "/api/history/{name}/audio", audio)
