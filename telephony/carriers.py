"""The carriers' HTTP side: Twilio's voice webhook and the media-stream WebSocket routes.

Twilio: `POST /twilio/voice` is the number's voice webhook; it answers with TwiML that connects
the call to `wss://HOST/twilio/media` (passing the dialled `To`, the caller `From` and any
configured parameters), or `<Reject reason="busy"/>` when no slot is free. With an auth token in
the environment (`twilio.auth_token_env`), every request must carry a valid
`X-Twilio-Signature` (the webhook's over its URL and form fields, the WebSocket's over its URL):
a bad one gets 403. Telnyx: `/telnyx/media` takes streams set up by call control or TeXML.
Both streams run on the shared transport (`telephony.media_stream`).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from telephony.admission import Admission, Refusal, RefusalKind
from telephony.media_stream import MediaStreamTransport, StreamSettings
from telephony.streams import AudioFormat
from telephony.telnyx import TelnyxStream
from telephony.twilio import SIGNATURE_HEADER, TwilioStream, connect_stream_twiml, reject_twiml, valid_signature

log = structlog.get_logger(__name__)

TWIML = "application/xml"


class TwilioEndpoint:
    name = "twilio"

    def __init__(self, cfg, admission: Admission, metrics):
        self.cfg = cfg  # ServerConfig.twilio
        self.admission = admission
        self.metrics = metrics
        self.stream = MediaStreamTransport(admission, metrics, TwilioStream,
                                           StreamSettings(idle_timeout_s=cfg.idle_timeout_s), self.name)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/twilio/voice", self.voice)
        app.router.add_get("/twilio/media", self.media)

    @property
    def auth_token(self) -> str | None:
        return os.environ.get(self.cfg.auth_token_env) or None

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
            return True
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
        checked = self.admission.check(self.name, dialled)
        if isinstance(checked, Refusal):
            reason = "rejected" if checked.kind in (RefusalKind.NOT_FOUND, RefusalKind.FORBIDDEN) else "busy"
            return web.Response(text=reject_twiml(reason), content_type=TWIML)
        parameters = dict(self.cfg.parameters)
        if dialled:
            parameters["to"] = dialled
        if caller:
            parameters["from"] = caller
        twiml = connect_stream_twiml(self.public_url(request, "/twilio/media", scheme="wss"), parameters)
        log.info("twilio_call_connected", call_sid=params.get("CallSid"), persona=checked.id)
        return web.Response(text=twiml, content_type=TWIML)

    async def media(self, request: web.Request) -> web.StreamResponse:
        if not self._signed(request, self.public_url(request, request.path, scheme="wss"), {}):
            return web.Response(status=403, text="invalid X-Twilio-Signature")
        return await self.stream.handle(request)

    async def stop(self) -> None:
        await self.stream.stop()


class TelnyxEndpoint:
    name = "telnyx"

    def __init__(self, cfg, admission: Admission, metrics):
        outbound = AudioFormat(cfg.outbound_encoding, cfg.outbound_rate) if cfg.outbound_encoding else None
        self.stream = MediaStreamTransport(
            admission, metrics, lambda: TelnyxStream(l16_byteorder=cfg.l16_byteorder, outbound=outbound),
            StreamSettings(idle_timeout_s=cfg.idle_timeout_s), self.name)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/telnyx/media", self.stream.handle)

    async def stop(self) -> None:
        await self.stream.stop()
