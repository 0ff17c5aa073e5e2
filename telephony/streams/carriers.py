"""The carriers' HTTP side: Twilio's voice webhook and the media-stream WebSocket routes.

Twilio: `POST /twilio/voice` is the number's voice webhook; it answers with TwiML that connects
the call to `wss://HOST/twilio/media` (passing the dialled `To`, the caller `From`, any
configured parameters and a per-call grant), or `<Reject reason="busy"/>` when no slot is free
(and, with the call queue on, the queue is full: a caller who can wait is connected and holds).
Every request must carry a valid `X-Twilio-Signature` (the webhook's over its URL and form
fields, the WebSocket's over its URL; 403 otherwise), and every stream's `start` the grant the
webhook gave its call (single use, within `twilio.stream_grant_ttl_s`) and, when
`twilio.account_sid` is set, that account. Without the auth token the server does not start,
unless `twilio.allow_unsigned` (loopback tests). Telnyx: `/telnyx/media` takes streams set up by
call control or TeXML, each proving the `stream_auth_token` configured there (header
`x-telnyx-streaming-auth-token` or the `connected` frame's field of that name, constant-time
compare) before its `start` is admitted. Both streams run on the shared transport
(`telephony.streams.base`).
"""

from __future__ import annotations

import hmac
import time
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from telephony.security.replay import ReplayStoreUnavailable
from telephony.security.secrets import env_secret
from telephony.admission import Refusal, RefusalKind
from telephony.streams.base import MediaStreamHandler, StreamSettings
from telephony.transport import TransportContext
from telephony.streams.events import AudioFormat, Connected, Started
from telephony.streams.telnyx import AUTH_TOKEN_FIELD, TelnyxStream
from telephony.streams.twilio import (GRANT_PARAMETER, SIGNATURE_HEADER, TwilioStream, connect_stream_twiml, grant_problem,
                              reject_twiml, stream_grant, valid_signature)

log = structlog.get_logger(__name__)

TWIML = "application/xml"


def queue_on(ctx: TransportContext) -> bool:
    """The call queue is on: busy callers wait on hold (Twilio's webhook connects them too)."""
    return ctx.queue is not None and ctx.queue.max_waiting > 0


def stream_settings(ctx: TransportContext) -> StreamSettings:
    return StreamSettings(media_timeout_s=ctx.media_timeout_s, can_wait=queue_on(ctx), hold_audio=ctx.hold_audio)


#: a used grant's key in the replay store (apart from call-token ids, which share the store)
GRANT_KEY = "twilio-grant:"


class TwilioTransport:
    name = "twilio"

    def __init__(self, ctx: TransportContext):
        self.cfg = ctx.config  # ServerConfig.twilio
        self.admission = admission = ctx.admission
        self.metrics = metrics = ctx.metrics
        self.can_wait = queue_on(ctx)
        self.stream = MediaStreamHandler(admission, metrics, TwilioStream, stream_settings(ctx), self.name,
                                           check_start=self.check_start, credentials=(GRANT_PARAMETER,))
        # a grant opens one stream (the call's own), on every agent of a farm that shares a store
        self.grants_used = ctx.replay_store

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/twilio/voice", self.voice)
        app.router.add_get("/twilio/media", self.media)

    async def start(self) -> None:
        """Streams arrive on the public app's routes."""

    @property
    def auth_token(self) -> str | None:
        return env_secret(self.cfg.auth_token_env)

    def public_url(self, request: web.Request, path: str, scheme: str | None = None) -> str:
        """The URL Twilio used (and signed): from `twilio.public_url` when set (behind a proxy
        the request's own URL differs), else the request's."""
        if self.cfg.public_url:
            base = urlsplit(self.cfg.public_url)
            s = scheme or base.scheme
            if scheme in ("ws", "wss"):
                s = "wss" if base.scheme == "https" else "ws"
            return f"{s}://{base.netloc}{path}"
        url = request.url
        s = scheme or url.scheme
        if scheme in ("ws", "wss"):
            s = "wss" if url.scheme == "https" else "ws"
        return f"{s}://{url.raw_authority}{path}"

    def _signed(self, request: web.Request, url: str, params) -> bool:
        token = self.auth_token
        if token is None:
            return self.cfg.allow_unsigned  # fail closed (the start check refuses this config)
        ok = valid_signature(token, url, params, request.headers.get(SIGNATURE_HEADER))
        if not ok:
            self.metrics.calls_total.labels(self.name, "refused_bad_signature").inc()
            log.warning("twilio_bad_signature", url=url, peer=request.remote)
        return ok

    async def voice(self, request: web.Request) -> web.Response:
        form = await request.post()
        params = {k: str(v) for k, v in form.items()}
        query = f"?{request.query_string}" if request.query_string else ""
        if not self._signed(request, self.public_url(request, request.path) + query, params):
            return web.Response(status=403, text="invalid X-Twilio-Signature")
        dialled, caller = params.get("To") or None, params.get("From") or None
        checked = self.admission.check(self.name, dialled, can_wait=self.can_wait)
        if isinstance(checked, Refusal):
            reason = "rejected" if checked.kind in (RefusalKind.NOT_FOUND, RefusalKind.FORBIDDEN) else "busy"
            return web.Response(text=reject_twiml(reason), content_type=TWIML)
        parameters = dict(self.cfg.parameters)
        if dialled:
            parameters["to"] = dialled
        if caller:
            parameters["from"] = caller
        token = self.auth_token
        if token is not None:
            expires = int(time.time()) + self.cfg.stream_grant_ttl_s
            parameters[GRANT_PARAMETER] = stream_grant(token, params.get("CallSid", ""), parameters, expires)
        twiml = connect_stream_twiml(self.public_url(request, "/twilio/media", scheme="wss"), parameters)
        log.info("twilio_call_connected", call_sid=params.get("CallSid"), persona=checked.id)
        return web.Response(text=twiml, content_type=TWIML)

    async def media(self, request: web.Request) -> web.StreamResponse:
        if not self._signed(request, self.public_url(request, request.path, scheme="wss"), {}):
            return web.Response(status=403, text="invalid X-Twilio-Signature")
        return await self.stream.handle(request)

    def check_start(self, request: web.Request, connected: Connected | None, started: Started) -> str | None:
        """This stream's `start` is one our webhook answered (see the module doc)."""
        token = self.auth_token
        if token is None:
            return None if self.cfg.allow_unsigned else "no auth token configured"
        if self.cfg.account_sid and started.account_id != self.cfg.account_sid:
            return "the stream is for another Twilio account"
        now = time.time()
        problem = grant_problem(token, started.call_id, started.parameters, now)
        if problem is None:
            try:
                if not self.grants_used.claim(GRANT_KEY + started.call_id, now + self.cfg.stream_grant_ttl_s):
                    problem = "this call's stream was already started"
            except ReplayStoreUnavailable:  # fail closed: a replay cannot be ruled out
                problem = "used stream grants cannot be checked right now (the replay store did not answer)"
        if problem is not None:
            log.warning("twilio_stream_refused", reason=problem, peer=request.remote)
        return problem

    async def stop(self) -> None:
        await self.stream.stop()


class TelnyxTransport:
    name = "telnyx"

    def __init__(self, ctx: TransportContext):
        self.cfg = cfg = ctx.config  # ServerConfig.telnyx
        outbound = AudioFormat(cfg.outbound_encoding, cfg.outbound_rate) if cfg.outbound_encoding else None
        self.stream = MediaStreamHandler(
            ctx.admission, ctx.metrics, lambda: TelnyxStream(l16_byteorder=cfg.l16_byteorder, outbound=outbound),
            stream_settings(ctx), self.name, check_start=self.check_start)

    def check_start(self, request: web.Request, connected: Connected | None, started: Started) -> str | None:
        """The stream proves the `stream_auth_token` configured at Telnyx (header or `connected`)."""
        token = env_secret(self.cfg.stream_auth_token_env)
        if token is None:
            return None if self.cfg.allow_unauthenticated else "no stream token configured"
        given = request.headers.get(AUTH_TOKEN_FIELD) or (connected.auth_token if connected else None)
        if not given:
            problem = "the stream carries no x-telnyx-streaming-auth-token"
        elif not hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8")):
            problem = "the stream's x-telnyx-streaming-auth-token is wrong"
        else:
            return None
        log.warning("telnyx_stream_refused", reason=problem, peer=request.remote)
        return problem

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/telnyx/media", self.stream.handle)

    async def start(self) -> None:
        """Streams arrive on the public app's routes."""

    async def stop(self) -> None:
        await self.stream.stop()
