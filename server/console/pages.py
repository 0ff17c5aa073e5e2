"""The console's two HTML pages: the sign-in form, and the console itself (one page; the script
switches views by the URL's fragment). Both are static files with a few fields filled in here;
the CSRF token goes into a meta tag the script reads for its POSTs."""

from __future__ import annotations

from aiohttp import web

from server.console.auth import signed_in
from server.console.static_page import STATIC, html_page, login_page


async def login_form(request: web.Request) -> web.Response:
    return login_page()


@signed_in
async def console(request: web.Request) -> web.Response:
    s = request["console_session"]
    return html_page("console.html", csrf=s.csrf, who=s.who)


async def to_console(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/console/"})


def add_routes(app: web.Application, prefix: str) -> None:
    app.router.add_get(prefix, to_console)
    app.router.add_get(prefix + "/", console)
    app.router.add_get(prefix + "/login", login_form)
    app.router.add_static(prefix + "/static", STATIC, show_index=False)
