"""The supervisors' console: a browser page on the ops listener (never the public port) to watch
live calls, steer them (hang up, transfer to a configured target), review finished calls from
their records and see which number reaches which persona.

The page is plain HTML plus one small script, served from this package (works offline). It
signs in with the ops bearer token once (`auth`), then talks to its own JSON/SSE endpoints under
`/console/api/` (`api`, `history`), which accept the console's cookie instead of the bearer
header that `server.http`'s guard asks of everything else.
"""

from __future__ import annotations

from aiohttp import web

from server.console import api, auth, history, listen, pages

PREFIX = "/console"


def add_console(app: web.Application, runtime) -> None:
    """Mount the console on the ops app (`server.http.ops_app`)."""
    if not runtime.cfg.console.enabled:
        return
    app["console_sessions"] = auth.Sessions(runtime.cfg.console.session_ttl_s)
    app["console_levels"] = api.LastLevels()
    if runtime.scheduler is not None:
        runtime.scheduler.on_call_start.append(app["console_levels"].attach)
    app["console_viewers"] = api.Viewers(runtime.cfg.console.max_viewers)
    app["console_listen"] = hub = listen.ListenHub()
    if runtime.scheduler is not None:
        runtime.scheduler.on_call_start.append(hub.attach)

    async def close_listeners(app: web.Application) -> None:
        app["console_viewers"].close()
        await hub.close()

    app.on_shutdown.append(close_listeners)
    pages.add_routes(app, PREFIX)
    auth.add_routes(app, PREFIX)
    api.add_routes(app, PREFIX)
    history.add_routes(app, PREFIX)
    listen.add_routes(app, PREFIX)
