"""The console's HTML, served from the package's static files with a few fields filled in (no
CDN: the page works offline). The sign-in form is here, apart from the pages' routes, because
the session check (`auth`) answers with it too."""

from __future__ import annotations

import html
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).with_name("static")
HEADERS = {"Cache-Control": "no-store", "X-Frame-Options": "DENY",
           "Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; img-src 'self' data:; "
                                      "frame-ancestors 'none'"}


def html_page(name: str, status: int = 200, **fields: str) -> web.Response:
    """`static/<name>` with each `{{field}}` replaced by its value, HTML-escaped."""
    text = (STATIC / name).read_text()
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", html.escape(value))
    return web.Response(text=text, content_type="text/html", status=status, headers=HEADERS)


def login_page(status: int = 200, error: str = "") -> web.Response:
    return html_page("login.html", status, error=error)
