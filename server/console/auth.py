"""Console sign-in: the ops bearer token, typed once into a form, buys a server-side session
whose id travels in an HttpOnly, SameSite=Strict cookie (scripts cannot read it, other sites
cannot send it). Every POST also needs the session's CSRF token in `X-CSRF-Token`: a second
line of defence should a browser ignore SameSite.

Sessions live in memory: a restart signs everyone out, which is what an operator expects of a
process that lost its calls too.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import structlog
from aiohttp import web

from server.console.static_page import login_page

log = structlog.get_logger(__name__)

COOKIE = "console_session"
#: the longest name a supervisor may give at sign-in (it goes into action log lines)
MAX_NAME = 64


@dataclass
class Session:
    """One signed-in browser: who it says it is (for the action log), its CSRF token, its expiry."""

    who: str
    csrf: str
    expires: float
    sid: str = field(default_factory=lambda: secrets.token_urlsafe(32))


class Sessions:
    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._by_id: dict[str, Session] = {}

    def create(self, who: str) -> Session:
        self._expire()
        s = Session(who=who, csrf=secrets.token_urlsafe(32), expires=time.monotonic() + self.ttl_s)
        self._by_id[s.sid] = s
        return s

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        s = self._by_id.get(sid)
        if s is None or s.expires < time.monotonic():
            self._by_id.pop(sid, None)
            return None
        return s

    def drop(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [k for k, s in self._by_id.items() if s.expires < now]:
            del self._by_id[sid]


def token_ok(runtime, given: str) -> bool:
    """The ops token, compared in constant time; with no ops token configured the ops listener is
    open (loopback only, `config_check`), and so is the console."""
    env = runtime.cfg.ops.token_env
    token = os.environ.get(env) if env else None
    if not token:
        return True
    return hmac.compare_digest(given.encode(), token.encode())


def session_of(request: web.Request) -> Session | None:
    return request.app["console_sessions"].get(request.cookies.get(COOKIE))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def unauthorized(request: web.Request) -> web.Response:
    if request.path.startswith("/console/api/"):
        return web.json_response({"error": "unauthorized", "reason": "sign in to the console first"}, status=401)
    return login_page(status=401)


def signed_in(handler: Handler) -> Handler:
    """Only for a signed-in browser; a POST also needs the session's CSRF token."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        s = session_of(request)
        if s is None:
            return unauthorized(request)
        if request.method == "POST":
            given = request.headers.get("X-CSRF-Token", "")
            if not hmac.compare_digest(given.encode(), s.csrf.encode()):
                return web.json_response({"error": "forbidden", "reason": "CSRF token missing or wrong"}, status=403)
        request["console_session"] = s
        return await handler(request)
    return wrapped


async def login(request: web.Request) -> web.StreamResponse:
    """POST /console/login (form: name, token)"""
    form = await request.post()
    who = str(form.get("name", "")).strip()[:MAX_NAME] or "supervisor"
    if not token_ok(request.app["runtime"], str(form.get("token", ""))):
        log.warning("console_login_failed", peer=request.remote)
        return login_page(status=401, error="That token is not the ops token.")
    s = request.app["console_sessions"].create(who)
    log.info("console_login", who=who, peer=request.remote)
    resp = web.Response(status=303, headers={"Location": "/console/"})
    resp.set_cookie(COOKIE, s.sid, httponly=True, samesite="Strict", path="/console",
                    secure=request.secure, max_age=int(request.app["console_sessions"].ttl_s))
    return resp


@signed_in
async def logout(request: web.Request) -> web.StreamResponse:
    request.app["console_sessions"].drop(request.cookies.get(COOKIE))
    resp = web.json_response({"ok": True})
    resp.del_cookie(COOKIE, path="/console")
    return resp


def add_routes(app: web.Application, prefix: str) -> None:
    app.router.add_post(prefix + "/login", login)
    app.router.add_post(prefix + "/api/logout", logout)
