"""The console's two HTML pages: the sign-in form, and the console itself (one page; the script
switches views by the URL's fragment). Both are static files with a few fields filled in here;
the CSRF token goes into a meta tag the script reads for its POSTs."""

from __future__ import annotations

import html
from pathlib import Path

from aiohttp import web

from server.console.auth import signed_in

STATIC = Path(__file__).with_name("static")
HEADERS = {"Cache-Control": "no-store", "X-Frame-Options": "DENY",
           "Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; img-src 'self' data:; "
                                      "frame-ancestors 'none'"}


def login_page(status: int = 200, error: str = "") -> web.Response:
    text = (STATIC / "login.html").read_text().replace("{{error}}", html.escape(error))
    return web.Response(text=text, content_type="text/html", status=status, headers=HEADERS)


async def login_form(request: web.Request) -> web.Response:
    return login_page()


@signed_in
async def console(request: web.Request) -> web.Response:
    s = request["console_session"]
    text = (STATIC / "console.html").read_text().replace("{{csrf}}", html.escape(s.csrf)) \
        .replace("{{who}}", html.escape(s.who))
    return web.Response(text=text, content_type="text/html", headers=HEADERS)


async def to_console(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/console/"})


def add_routes(app: web.Application, prefix: str) -> None:
    app.router.add_get(prefix, to_console)
    app.router.add_get(prefix + "/", console)
    app.router.add_get(prefix + "/login", login_form)
    app.router.add_static(prefix + "/static", STATIC, show_index=False)
