"""The process an operator runs: model, personas, scheduler, endpoints, HTTP, signals, drain."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from agent.events import EndReason
from agent.metrics import Metrics
from agent.model_loader import LoadedModel
from agent.personas.registry import PersonaRegistry, ReloadReport
from agent.personas.schema import Persona
from agent.personas.tools import make_prompt_limit
from agent.scheduler import Scheduler
from agent.server.config import ServerConfig
from agent.voices import available_voices

log = structlog.get_logger(__name__)


def choose_model_files(cfg: ServerConfig):
    """The configured model, or the built-in demo model when no PersonaPlex weights are present."""
    from agent.demo_model import demo_model_dir
    from agent.errors import ModelUnavailable
    from agent.model_files import hub_model_files, local_model_files

    m = cfg.model
    if m.hf_token is not None:
        os.environ.setdefault("HF_TOKEN", m.hf_token.get_secret_value())
    if m.source == "demo":
        return local_model_files(demo_model_dir())
    if m.source == "dir" or (m.source == "auto" and m.dir is not None):
        if m.dir is None:
            raise ModelUnavailable("model.source is 'dir' but model.dir is not set")
        return local_model_files(m.dir)
    if m.source == "hf":
        return hub_model_files(m.hf_repo)
    # auto: the Hub model if it is cached or a token is there to fetch it; else the demo model
    try:
        return hub_model_files(m.hf_repo) if os.environ.get("HF_TOKEN") else _cached_hub(m.hf_repo)
    except ModelUnavailable as exc:
        log.warning("personaplex_weights_unavailable", reason=str(exc), using="built-in demo model")
    return local_model_files(demo_model_dir())


def _cached_hub(repo: str):
    from agent.errors import ModelUnavailable
    from agent.model_files import LM_FILE

    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo, LM_FILE), str):
        raise ModelUnavailable("no PersonaPlex weights in the local Hugging Face cache and no HF_TOKEN set")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from agent.model_files import hub_model_files

    return hub_model_files(repo)


@dataclass
class Ready:
    model: bool = False
    endpoints: bool = False
    warm: bool = False  # the call path has run once


class Runtime:
    def __init__(self, cfg: ServerConfig, model: LoadedModel | None = None):
        self.cfg = cfg
        self.metrics = Metrics()
        self.model = model
        self.ready = Ready()
        self.registry: PersonaRegistry | None = None
        self.scheduler: Scheduler | None = None
        self.admission = None  # telephony.admission.Admission, built with the scheduler
        self.context = None  # agent.context.ContextResolver, built with the scheduler
        self.endpoints: list = []
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._ops_runner: web.AppRunner | None = None
        self.ops_url: str | None = None
        self._signals = 0
        self.http_urls: list[str] = []
        self.started_at = time.time()
        self._reload_errors_seen = 0
        # called once the call path is warm, before the endpoints listen (extensions, test doubles)
        self.on_warm: list = []

    # -- set-up ------------------------------------------------------------------------------------
    def load_model(self) -> LoadedModel:
        if self.model is None:
            from agent.model_loader import load_model
            from agent.threads import configure_torch_threads

            configure_torch_threads(self.cfg.model.cpu_threads)
            files = choose_model_files(self.cfg)
            self.model = load_model(files, device=self.cfg.model.device, cpu_offload=self.cfg.model.cpu_offload)
        self.ready.model = True
        return self.model

    def build(self) -> None:
        model = self.load_model()
        self.scheduler = Scheduler(model, self.cfg.engine.to_scheduler_config(), self.metrics)
        from agent.context import ContextLookup, ContextResolver
        from telephony.admission import Admission

        scheduler = self.scheduler
        self.context = ContextResolver(ContextLookup(self.cfg.context.to_settings(), self.metrics),
                                       start=lambda sess, values: scheduler.start_call(sess, variables=values))
        self.admission = Admission(self.scheduler, self.route, self.metrics, self.cfg.engine.retry_after_s,
                                   start=self.context.begin_request)
        voices_dir = model.files.voices_dir
        self.registry = PersonaRegistry(self.cfg.personas.dir, available_voices(voices_dir),
                                        prompt_limit=make_prompt_limit(model.text_tokenizer, model.context, voices_dir),
                                        on_change=self._personas_changed)
        if self.cfg.recording.enabled:
            from agent.server.recording import CallRecorder

            rec = CallRecorder(self.cfg.recording.dir, self.cfg.recording.max_files)
            self.scheduler.on_call_start.append(rec.attach)

    def _personas_changed(self, report: ReloadReport) -> None:
        self._sync_reload_errors()
        if self.scheduler is not None and self.registry is not None and self.cfg.engine.prewarm:
            self.scheduler.preload_voices(self.registry.personas())

    def _sync_reload_errors(self) -> None:
        if self.registry is None:
            return
        new = self.registry.reload_errors - self._reload_errors_seen
        if new > 0:
            self.metrics.persona_reload_errors.inc(new)
            self._reload_errors_seen = self.registry.reload_errors

    def route(self, dialled: str | None) -> Persona | None:
        """The persona for a dialled number / persona id, honouring the unknown-number policy
        (which also decides for calls that name no number at all)."""
        assert self.registry is not None
        use_default = self.cfg.personas.unknown_numbers == "default"
        if not dialled:
            return self.registry.default if use_default else None
        return self.registry.route(dialled, use_default=use_default)

    # -- HTTP ----------------------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        """The public app: the page, calls, carriers, health and readiness (nothing for ops)."""
        from agent.server.http import add_public_routes

        app = web.Application(client_max_size=self.cfg.webrtc.limits.max_offer_bytes)  # bigger: 413
        app["runtime"] = self
        add_public_routes(app)
        if self.cfg.webrtc.enabled:
            from telephony.webrtc.endpoint import WebRtcEndpoint

            ep = WebRtcEndpoint(self)
            ep.add_routes(app)
            self.endpoints.append(ep)
        if self.cfg.twilio.enabled or self.cfg.telnyx.enabled:
            from telephony.carriers import TelnyxEndpoint, TwilioEndpoint

            for enabled, cls, section in ((self.cfg.twilio.enabled, TwilioEndpoint, self.cfg.twilio),
                                          (self.cfg.telnyx.enabled, TelnyxEndpoint, self.cfg.telnyx)):
                if enabled:
                    carrier = cls(section, self.admission, self.metrics)
                    carrier.add_routes(app)
                    self.endpoints.append(carrier)
        self.app = app
        return app

    def ssl_context(self) -> ssl.SSLContext | None:
        h = self.cfg.http
        if h.cert_file and h.key_file:
            cert, key = h.cert_file, h.key_file
        elif h.ssl_dir is not None:
            from agent.server.tls import self_signed

            cert, key = self_signed(Path(h.ssl_dir))
        else:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    async def start(self) -> None:
        self.build()
        self.context.loop = asyncio.get_running_loop()
        assert self.scheduler is not None and self.registry is not None
        self.scheduler.start()
        self.registry.reload()
        self._sync_reload_errors()
        self.registry.start_watching(self.cfg.personas.reload_interval_s)
        if self.cfg.engine.prewarm:
            self.scheduler.preload_voices(self.registry.personas())
        await self._warm_up()
        for hook in self.on_warm:
            hook(self)
        if self.cfg.http.enabled:
            app = self.build_app()
            self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await self._runner.setup()
            ctx = self.ssl_context()
            site = web.TCPSite(self._runner, self.cfg.http.host, self.cfg.http.port, ssl_context=ctx)
            await site.start()
            for s in self._runner.sites:
                for sock in getattr(s._server, "sockets", []) or []:
                    host, port = sock.getsockname()[:2]
                    shown = "localhost" if host in ("127.0.0.1", "::1") else host
                    self.http_urls.append(f"{'https' if ctx else 'http'}://{shown}:{port}/")
        if self.cfg.ops.port:
            from agent.server.http import ops_app

            self._ops_runner = web.AppRunner(ops_app(self), handle_signals=False, access_log=None)
            await self._ops_runner.setup()
            await web.TCPSite(self._ops_runner, self.cfg.ops.host, self.cfg.ops.port).start()
            self.ops_url = f"http://{self.cfg.ops.host}:{self.cfg.ops.port}"
        if self.cfg.sip.enabled:
            try:
                from telephony.sip.endpoint import SipEndpoint
            except ImportError as exc:
                # WebRTC still works; say exactly how to get SIP
                log.error("sip_unavailable", reason=f"pjsua2 cannot be imported ({exc})",
                          fix="run scripts/build_pjsua2.sh (make run does), or set sip.enabled: false")
            else:
                sip = SipEndpoint(self)
                await sip.start()
                self.endpoints.append(sip)
        self.ready.endpoints = True
        personas = self.registry.personas()
        log.info("ready", model=self.model.files.source, max_calls=self.cfg.engine.max_calls,
                 personas=len(personas), web=self.http_urls or None, ops=self.ops_url,
                 sip=[f"{t}:{self.cfg.sip.host}:{ep.port}" for ep in self.endpoints if hasattr(ep, "port")
                      for t in self.cfg.sip.transports] or None)

    async def _warm_up(self) -> None:
        """Run the call path once before reporting ready, so the first call is no slower than the
        tenth (first-use costs: kernels, Mimi, the VAD model)."""
        assert self.scheduler is not None and self.registry is not None
        persona = self.registry.default or next(iter(self.registry.personas()), None)
        if persona is not None:
            voice, prompt = persona.voice, persona.prompt
        else:
            from agent.voices import available_voices

            voice = next(iter(available_voices(self.model.files.voices_dir)), "NATF0")
            prompt = "You enjoy having a good conversation."
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.scheduler.warm_up, voice, prompt)
        self.ready.warm = self.scheduler.warm.is_set()

    @property
    def draining(self) -> bool:
        return self.scheduler is not None and self.scheduler.draining

    async def drain_and_stop(self) -> None:
        """Stop taking calls, let calls finish up to the drain timeout, then hang up the rest."""
        assert self.scheduler is not None
        self.scheduler.begin_drain()
        log.info("draining", active_calls=len(self.scheduler.active_calls), timeout_s=self.cfg.drain_timeout_s)
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while self.scheduler.active_calls and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        left = len(self.scheduler.active_calls)
        await self._teardown()
        log.info("stopped", hung_up=left)

    async def _teardown(self) -> None:
        """Stop what was started, in reverse: also after a start that failed half-way (a taken
        port), so the engine thread and the endpoints that did start end cleanly before the
        CLI exits with the error (see `cmd_serve`)."""
        if self.scheduler is not None:
            self.scheduler.stop(EndReason.SHUTDOWN)  # remaining calls get a polite hang-up (BYE / page notice)
            await asyncio.sleep(0.2)
        for ep in reversed(self.endpoints):
            try:
                await ep.stop()
            except Exception:
                log.exception("endpoint_stop_failed", endpoint=type(ep).__name__)
        if self.registry is not None:
            self.registry.stop_watching()
        if self.context is not None:
            await self.context.lookup.close()
        for runner in (self._runner, self._ops_runner):
            if runner is not None:
                await runner.cleanup()

    async def serve_forever(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signame: str) -> None:
            self._signals += 1
            if self._signals > 1:
                log.warning("second_signal_exit_now", signal=signame)
                os._exit(1)
            log.info("signal", signal=signame)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        try:
            await self.start()
        except BaseException:
            await self._teardown()
            raise
        await stop.wait()
        await self.drain_and_stop()
        return 0
