"""The process an operator runs: model, personas, scheduler, transports, HTTP, signals, drain."""

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

from agent.calls.events import EndReason
from agent.metrics import Metrics
from agent.model.loader import LoadedModel
from agent.personas.registry import PersonaRegistry, ReloadReport
from agent.personas.schema import Persona
from agent.personas.tools import make_prompt_limit
from agent.calls.scheduler import Scheduler
from server.config import ServerConfig
from server.model_choice import choose_model
from telephony.transport import Catalog, Transport, TransportContext
from agent.model.voices import available_voices

log = structlog.get_logger(__name__)


def choose_model_files(cfg: ServerConfig):
    """The configured model's files (see server/model_choice.py for the rule): on a machine
    without CUDA, `source: auto` serves the demo model and says so in one line."""
    from agent.errors import ModelUnavailable
    from agent.model.demo import demo_model_dir
    from agent.model.files import hub_model_files, local_model_files

    m = cfg.model
    if m.hf_token is not None:
        os.environ.setdefault("HF_TOKEN", m.hf_token.get_secret_value())

    def hub_missing() -> str | None:
        if os.environ.get("HF_TOKEN"):
            return None
        try:
            _cached_hub(m.hf_repo)
        except ModelUnavailable as exc:
            return str(exc)
        return None

    choice = choose_model(m.source, m.dir is not None, _cuda_usable(m.device), hub_missing)
    if choice.not_realtime:
        log.warning("model_not_realtime", source=m.source, reason=choice.note)
    elif choice.note:  # one line: why auto did not take the 7B
        log.info("model_auto_choice", using=choice.load, reason=choice.note)
    if choice.load == "demo":
        return local_model_files(demo_model_dir())
    if choice.load == "dir":
        if m.dir is None:
            raise ModelUnavailable("model.source is 'dir' but model.dir is not set")
        return local_model_files(m.dir)
    if m.source == "auto" and not os.environ.get("HF_TOKEN"):
        return _cached_hub(m.hf_repo)
    return hub_model_files(m.hf_repo)


def _cuda_usable(device: str) -> bool:
    """Whether the model would run on a CUDA device (model.device auto or cuda*, and one there)."""
    if device != "auto" and not device.startswith("cuda"):
        return False
    import torch

    return torch.cuda.is_available()


def _cached_hub(repo: str):
    from agent.errors import ModelUnavailable
    from agent.model.files import LM_FILE

    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo, LM_FILE), str):
        raise ModelUnavailable("no PersonaPlex weights in the local Hugging Face cache and no HF_TOKEN set")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from agent.model.files import hub_model_files

    return hub_model_files(repo)


@dataclass
class Ready:
    model: bool = False
    transports: bool = False  # every transport listens
    warm: bool = False  # the call path has run once


class Runtime:
    def __init__(self, cfg: ServerConfig, model: LoadedModel | None = None):
        self.cfg = cfg
        self.metrics = Metrics()
        self.model = model
        self.stt = None  # the caller transcriber's model (agent.transcribe.model.SttModel), if any
        self.ready = Ready()
        self.registry: PersonaRegistry | None = None
        self.scheduler: Scheduler | None = None
        self.admission = None  # telephony.admission.Admission, built with the scheduler
        self.context = None  # agent.calls.context.ContextResolver, built with the scheduler
        self.live = None  # server.live_events.LiveEvents: the ops listener's live call events
        self.webhooks = None  # server.webhooks.service.Webhooks, when a webhook URL is set
        self.outbound = None  # telephony.outbound.Outbound: calls the agent places (outbound.enabled)
        self.recent_calls = None  # server.outbound_api.RecentCalls: inbound calls just ended (GET /api/calls/{id})
        self.transports: list[Transport] = []
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._ops_runner: web.AppRunner | None = None
        self.ops_url: str | None = None
        self._signals = 0
        self.http_urls: list[str] = []
        self.started_at = time.time()
        self._reload_errors_seen = 0
        # called once the call path is warm, before the transports listen (extensions, test doubles)
        self.on_warm: list = []
        self._replay = None  # telephony.security.replay store: made with the first transport's context

    # -- set-up ------------------------------------------------------------------------------------
    def load_model(self) -> LoadedModel:
        if self.model is None:
            from agent.model.loader import load_model
            from agent.model.threads import configure_torch_threads

            configure_torch_threads(self.cfg.model.cpu_threads)
            files = choose_model_files(self.cfg)
            self.model = load_model(files, device=self.cfg.model.device, cpu_offload=self.cfg.model.cpu_offload)
        if self.cfg.transcript.caller == "kyutai" and self.stt is None:
            from agent.transcribe import load_caller_stt

            self.stt = load_caller_stt(self.model, self.cfg.transcript.caller_hf_repo)
        self.ready.model = True
        return self.model

    def build(self) -> None:
        model = self.load_model()
        self.scheduler = Scheduler(model, self.cfg.engine.to_scheduler_config(), self.metrics, stt=self.stt)
        from agent.calls.context import ContextLookup, ContextResolver
        from telephony.admission import Admission

        scheduler = self.scheduler
        self.context = ContextResolver(ContextLookup(self.cfg.context.to_settings(), self.metrics),
                                       start=lambda sess, values: scheduler.start_call(sess, variables=values))
        from telephony.call_queue import QueueSettings

        self.admission = Admission(self.scheduler, self.route, self.metrics, self.cfg.engine.retry_after_s,
                                   start=self.context.begin_request,
                                   queue=QueueSettings(self.cfg.queue.max_waiting, self.cfg.queue.max_wait_s))
        voices_dir = model.files.voices_dir
        self.registry = PersonaRegistry(self.cfg.personas.dir, available_voices(voices_dir),
                                        prompt_limit=make_prompt_limit(model.text_tokenizer, model.context, voices_dir),
                                        on_change=self._personas_changed)
        from server.live_events import LiveEvents

        streams = self.cfg.ops.event_stream
        self.live = LiveEvents(self.metrics, streams.queue, streams.buffer_bytes, streams.keepalive_s)
        self.scheduler.on_call_start.append(self.live.attach)
        from server.outbound_api import RecentCalls

        self.recent_calls = RecentCalls(self.cfg.outbound.keep_ended_s, self.cfg.outbound.keep_ended_max)
        self.scheduler.on_call_start.append(self.recent_calls.attach)
        rec = None
        if self.cfg.recording.enabled:
            from server.recording import CallRecorder

            rec = CallRecorder(self.cfg.recording.dir, self.cfg.recording.max_files, keep_text=self.cfg.transcript.keep)
            self.scheduler.on_call_start.append(rec.attach)
        if self.cfg.webhooks.enabled:
            from server.webhooks.service import Webhooks
            from telephony.security.secrets import env_secret

            wh = self.cfg.webhooks
            secret = env_secret(wh.secret_env)
            assert secret is not None  # `start` refused to run without it (config_check)
            self.webhooks = Webhooks(wh, self.cfg.state_dir, secret, self.metrics, keep_text=self.cfg.transcript.keep,
                                     recording_paths=rec.paths if rec is not None else None)
            self.scheduler.on_call_start.append(self.webhooks.attach)

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

    # -- transports ------------------------------------------------------------------------------
    def transport_context(self, section) -> TransportContext:
        """What a transport is given: admission, metrics, its own settings, a few process facts."""
        from agent.model.voices import available_voices

        voices_dir = self.model.files.voices_dir if self.model is not None else None
        return TransportContext(self.admission, self.metrics, section,
                                trusted_proxies=tuple(self.cfg.http.trusted_proxies),
                                media_timeout_s=self.cfg.media_timeout_s,
                                catalog=Catalog(voices=lambda: available_voices(voices_dir),
                                                sampling=self.cfg.engine.sampling),
                                queue=self.cfg.queue, hold_audio=self._hold_audio(),
                                replay_store=self._replay_store())

    def _replay_store(self):
        """One used-credential store for every transport (made once; closed at the stop)."""
        if self._replay is None:
            from telephony.security.replay import make_replay_store

            self._replay = make_replay_store(self.cfg.webrtc.tokens.replay_store)
        return self._replay

    def _hold_audio(self):
        """The hold audio, decoded once (None without a queue); a file that cannot be read stops
        the start with what is wrong."""
        if self.cfg.queue.max_waiting <= 0:
            return None
        if getattr(self, "_hold", None) is None:
            from telephony.audio.hold import HoldAudio

            self._hold = HoldAudio.load(self.cfg.queue.hold_audio)
        return self._hold

    def build_transports(self) -> list[Transport]:
        """Every enabled transport, from its context (SIP only where pjsua2 can be imported)."""
        cfg = self.cfg
        made: list[Transport] = []
        if cfg.http.enabled and cfg.webrtc.enabled:
            from telephony.webrtc.transport import WebRtcTransport

            made.append(WebRtcTransport(self.transport_context(cfg.webrtc)))
        if cfg.http.enabled and cfg.twilio.enabled:
            from telephony.streams.carriers import TwilioTransport

            made.append(TwilioTransport(self.transport_context(cfg.twilio)))
        if cfg.http.enabled and cfg.telnyx.enabled:
            from telephony.streams.carriers import TelnyxTransport

            made.append(TelnyxTransport(self.transport_context(cfg.telnyx)))
        if cfg.sip.enabled:
            try:
                from telephony.sip.transport import SipTransport
            except ImportError as exc:
                # the others still work; say exactly how to get SIP
                log.error("sip_unavailable", reason=f"pjsua2 cannot be imported ({exc})",
                          fix="run scripts/build_pjsua2.sh (make run does), or set sip.enabled: false")
            else:
                made.append(SipTransport(self.transport_context(cfg.sip)))
        return made

    def build_outbound(self):
        """The outbound calls service, dialling through the SIP transport (None: outbound off)."""
        o = self.cfg.outbound
        sip = next((t for t in self.transports if t.name == "sip"), None)
        if not o.enabled or sip is None:
            return None
        from telephony.outbound import Outbound, OutboundSettings

        settings = OutboundSettings(True, tuple(o.allowed_to), tuple(o.allowed_from), o.max_concurrent,
                                    o.reserve_inbound, o.default_ring_timeout_s, o.keep_ended_s, o.keep_ended_max,
                                    o.amd, o.on_machine)
        outbound = Outbound(settings, self.admission, self.registry.get, sip)
        if self.webhooks is not None:
            outbound.on_dial.append(self.webhooks.attach_dialled)
        return outbound

    def build_app(self) -> web.Application:
        """The public app: the page, calls, carriers, health and readiness (nothing for ops)."""
        from server.http import add_public_routes

        app = web.Application(client_max_size=self.cfg.webrtc.limits.max_offer_bytes)  # bigger: 413
        app["runtime"] = self
        add_public_routes(app)
        for transport in self.transports:
            transport.add_routes(app)
        self.app = app
        return app

    def ssl_context(self) -> ssl.SSLContext | None:
        h = self.cfg.http
        if h.cert_file and h.key_file:
            cert, key = h.cert_file, h.key_file
        elif h.ssl_dir is not None:
            from server.tls import self_signed

            cert, key = self_signed(Path(h.ssl_dir))
        else:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    async def start(self) -> None:
        from server.config import ConfigError
        from server.config_check import errors

        problems = errors(self.cfg)  # fail closed, whoever embeds the runtime (the CLI says it first)
        if problems:
            raise ConfigError(" ".join(problems))
        self.build()
        self.context.loop = asyncio.get_running_loop()
        self.live.loop = asyncio.get_running_loop()
        if self.webhooks is not None:
            self.webhooks.start()  # what an earlier run left in the queue goes out now
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
        self.transports = self.build_transports()
        self.outbound = self.build_outbound()
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
            from server.http import ops_app

            self._ops_runner = web.AppRunner(ops_app(self), handle_signals=False, access_log=None)
            await self._ops_runner.setup()
            await web.TCPSite(self._ops_runner, self.cfg.ops.host, self.cfg.ops.port).start()
            self.ops_url = f"http://{self.cfg.ops.host}:{self.cfg.ops.port}"
        for transport in self.transports:
            await transport.start()
        self.ready.transports = True
        personas = self.registry.personas()
        log.info("ready", model=self.model.files.source, max_calls=self.cfg.engine.max_calls,
                 personas=len(personas), web=self.http_urls or None, ops=self.ops_url,
                 sip=[f"{t}:{self.cfg.sip.host}:{tr.port}" for tr in self.transports if tr.name == "sip"
                      for t in self.cfg.sip.transports] or None)

    async def _warm_up(self) -> None:
        """Run the call path once before reporting ready, so the first call is no slower than the
        tenth (first-use costs: kernels, Mimi, the VAD model)."""
        assert self.scheduler is not None and self.registry is not None
        persona = self.registry.default or next(iter(self.registry.personas()), None)
        if persona is not None:
            voice, prompt = persona.voice, persona.prompt
        else:
            from agent.model.voices import available_voices

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
        port), so the engine thread and the transports that did start end cleanly before the
        CLI exits with the error (see `cmd_serve`)."""
        if self.scheduler is not None:
            self.scheduler.stop(EndReason.SHUTDOWN)  # remaining calls get a polite hang-up (BYE / page notice)
            await asyncio.sleep(0.2)
        if self.webhooks is not None:
            # every call has ended, so every call_end is queued: deliver for a few seconds, leave
            # the rest on disk for the next start
            webhooks, self.webhooks = self.webhooks, None
            await asyncio.get_running_loop().run_in_executor(None, webhooks.stop, self.cfg.webhooks.drain_timeout_s)
        if self.live is not None:
            self.live.close()
        for transport in reversed(self.transports):  # (stop is safe for one that never started)
            try:
                await transport.stop()
            except Exception:
                log.exception("transport_stop_failed", transport=transport.name)
        if self._replay is not None:
            self._replay.close()
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
