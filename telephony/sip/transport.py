"""SIP transport: a pjsua2 user agent answering phone lines per dialled number.

pjsua2 runs on one thread of ours (`threadCnt=0`, `mainThreadOnly`), which polls pjsip, pumps
call audio and runs commands posted by other threads; nothing else touches pjsua2. Incoming
INVITE: ACL by source address (403), then the shared admission service (route by Request-URI
user: 404 unless a default persona answers; capacity: `sip.busy_code` 486 or 503 with
Retry-After; draining: 503), else 180 Ringing, the call started (its leg listens), and 200 OK
once the call's first agent frame is ready.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pjsua2 as pj
import structlog

from agent.calls.commands import run_pending
from telephony.admission import SIP_STATUS, CallRequest, Refusal, RefusalKind
from telephony.call_queue import Ticket
from telephony.sip import options as sip_options
from telephony.sip import pjlog
from agent.calls.events import EndReason
from telephony.amd import AmdSettings
from telephony.outbound import DialState, Outbound, OutboundCall
from telephony.sip.call import SipCall
from telephony.sip.dial import OutboundDial
from telephony.sip.port import PortPool, bridge_rate
from telephony.sip.sipmsg import allowed, caller_user, dialled_user, has_header, header_variables, source_ip
from telephony.transport import TransportContext
from agent.osthread import name_os_thread

log = structlog.get_logger(__name__)
NAME = "sip"
#: how often the SIP thread moves every call's audio between its port and its leg: each pump
#: takes everything since the last (one piece per call), and the port keeps two frames queued
#: (call.OUTBOUND_FRAMES), so a pump late by up to a frame is not heard
PUMP_S = 0.010


def _quietly(fn) -> None:
    """Teardown steps: a failure must not stop the ones after it."""
    try:
        fn()
    except Exception as exc:
        log.debug("sip_teardown_step_failed", step=getattr(fn, "__name__", str(fn)), error=str(exc))


class _Account(pj.Account):
    def __init__(self, transport: "SipTransport"):
        super().__init__()
        self.transport = transport

    def onIncomingCall(self, prm) -> None:
        self.transport.incoming(self, prm)

    def onRegState(self, prm) -> None:
        info = self.getInfo()
        log.info("sip_registration", status=prm.code, reason=prm.reason, active=info.regIsActive)


class SipTransport:
    name = NAME

    def __init__(self, ctx: TransportContext):
        self.cfg = ctx.config
        self.media_timeout_s = ctx.media_timeout_s
        self.admission = ctx.admission
        self.metrics = ctx.metrics
        self.port = self.cfg.port
        self.queue_cfg = ctx.queue  # None or max_waiting 0: no queue (busy callers refused)
        self.hold_audio = ctx.hold_audio
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self.calls: dict[int, SipCall] = {}
        self.placed: dict[str, SipCall] = {}  # calls the agent placed, by the API's call id
        self._dead: list[SipCall] = []
        self.ports = PortPool(bridge_rate(self.cfg.codecs))
        self._lib_started = False
        self.ep: pj.Endpoint | None = None
        self.account: _Account | None = None

    # -- lifecycle (asyncio side) ---------------------------------------------------------------
    def add_routes(self, app) -> None:
        """SIP has no HTTP routes."""

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sip", daemon=True)
        self._thread.start()
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait, 30)
        if self._error is not None:
            raise self._error
        log.info("sip_listening", host=self.cfg.host, port=self.port, transports=self.cfg.transports,
                 bridge_rate=self.ports.rate)

    async def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
            self._thread = None

    def post(self, fn) -> None:
        """Run `fn` on the SIP thread (the only thread that may call pjsua2)."""
        self._cmds.put(fn)

    def with_call(self, call_id: int, fn) -> None:
        """Run fn(call) if the call still exists (SIP thread)."""
        call = self.calls.get(call_id)
        if call is not None and not call.disconnected:
            fn(call)

    def forget(self, call: SipCall) -> None:
        self.calls.pop(call.getId(), None)
        if call.dial is not None:
            self.placed.pop(call.dial.call_id, None)
        call.release_port()
        self._dead.append(call)  # deleted later, never inside its own callback

    # -- SIP thread ---------------------------------------------------------------------------
    def _init(self) -> None:
        c = self.cfg
        ep = self.ep = pj.Endpoint()
        with pjlog.captured():  # pjlib prints its start-up to stdout before our writer is set
            ep.libCreate()
        epc = pj.EpConfig()
        epc.uaConfig.threadCnt = 0
        epc.uaConfig.mainThreadOnly = True
        waiting = self.queue_cfg.max_waiting if self.queue_cfg is not None else 0  # held calls are calls too
        epc.uaConfig.maxCalls = min(4 * self.admission.capacity + waiting + 8, 256)
        epc.uaConfig.userAgent = "personaplex-agent"
        self._logwriter = pjlog.LogWriter()
        epc.logConfig.writer = self._logwriter
        epc.logConfig.level = c.pjsip_log_level
        epc.logConfig.consoleLevel = c.pjsip_log_level
        epc.logConfig.decor = 0
        epc.medConfig.clockRate = self.ports.rate
        epc.medConfig.sndClockRate = self.ports.rate
        epc.medConfig.channelCount = 1
        epc.medConfig.ecTailLen = 0
        epc.medConfig.noVad = True
        # The bridge runs at `bridge_rate` (16 kHz when a wideband codec is offered, else 8 kHz)
        # and resamples every stream of another rate both ways on its clock thread (G.711 calls
        # on a 16 kHz bridge). At pjsua's default quality (8) that is libsamplerate's best sinc filter,
        # most of the clock thread's time per call (bench_media: 74% of a core for 8 calls); at 4
        # pjsua picks the small filter, ample for telephone audio (pjsip's own mobile default)
        epc.medConfig.quality = 4
        ep.libInit(epc)
        self.ports.check()
        ep.audDevManager().setNullDev()
        for t in c.transports:
            tc = pj.TransportConfig()
            tc.port = self.port
            tc.boundAddress = c.host
            if c.public_address:
                tc.publicAddress = c.public_address
            kind = {"udp": pj.PJSIP_TRANSPORT_UDP, "tcp": pj.PJSIP_TRANSPORT_TCP, "tls": pj.PJSIP_TRANSPORT_TLS}[t]
            if t == "tls":
                tc.port = c.tls_port or self.port + 1
                tc.tlsConfig.certFile = str(c.tls_cert_file or "")
                tc.tlsConfig.privKeyFile = str(c.tls_key_file or "")
            ep.transportCreate(kind, tc)
        ep.libStart()
        self._lib_started = True
        # out-of-dialog requests pjsua answers wrongly by itself: OPTIONS (503 while draining or
        # full, 403 from outside sip.allow_from), SUBSCRIBE, REFER, INVITE with Replaces...
        sip_options.install(self.cfg, self.metrics, self.admission)
        self._set_codecs()
        ac = pj.AccountConfig()
        host = c.public_address or c.host
        ac.idUri = f"sip:agent@{host}:{self.port}"
        reg = c.registration
        if reg is not None:
            ac.idUri = f"sip:{reg.user}@{reg.registrar.split(':', 1)[-1]}"
            ac.regConfig.registrarUri = reg.registrar
            ac.regConfig.timeoutSec = reg.expires_s
            pw = reg.password.get_secret_value() if reg.password else ""
            ac.sipConfig.authCreds.append(pj.AuthCredInfo("digest", reg.realm, reg.user, 0, pw))
        ac.callConfig.timerUse = pj.PJSUA_SIP_TIMER_OPTIONAL
        ac.callConfig.timerSessExpiresSec = c.session_timer_s
        ac.mediaConfig.transportConfig.port = c.rtp_port
        ac.mediaConfig.transportConfig.portRange = 2000
        ac.mediaConfig.transportConfig.boundAddress = c.host if c.host not in ("0.0.0.0", "::") else ""
        self.account = _Account(self)
        self.account.create(ac, True)

    def _set_codecs(self) -> None:
        wanted = [w.lower() for w in self.cfg.codecs]
        for info in self.ep.codecEnum2():
            cid = info.codecId
            prio = 0
            for rank, w in enumerate(wanted):
                if cid.lower().startswith(w):
                    prio = 250 - rank * 10
            self.ep.codecSetPriority(cid, prio)

    def _run(self) -> None:
        name_os_thread("sip")
        try:
            self._init()
        except BaseException as exc:  # e.g. the port is taken: report to start()
            self._error = RuntimeError(f"SIP endpoint failed to start on {self.cfg.host}:{self.port}: "
                                       f"{exc.info() if isinstance(exc, pj.Error) else exc}")
            self._ready.set()
            self._destroy()
            return
        self._ready.set()
        last_check = last_pump = time.monotonic()
        while not self._stopping.is_set():
            self._run_commands()
            self.ep.libHandleEvents(5)
            now = time.monotonic()
            if now - last_pump >= PUMP_S:
                last_pump = now
                self._pump_all()
            if now - last_check > 0.5:
                last_check = now
                self._housekeeping()
        self._shutdown()

    # Loops over calls live in their own methods: a loop variable left in `_run`'s frame would
    # keep a pjsua2 call alive past libDestroy, and its destructor would then abort the process.
    def _pump_all(self) -> None:
        for call in list(self.calls.values()):
            try:
                call.pump()
            except Exception:
                log.exception("sip_pump_failed")

    def _housekeeping(self) -> None:
        for call in list(self.calls.values()):
            call.check_media(self.media_timeout_s)
            if call.dial is not None:
                call.dial.check_timeout(call)
        self._dead.clear()

    def _drop_calls(self) -> None:
        """Our call objects go (on this thread, before libDestroy). A loop variable in
        `_destroy` itself would keep the last call alive until after libDestroy, and its
        destructor would then abort the process (pjsua_call_set_user_data: Assertion)."""
        for call in list(self.calls.values()):
            call.port = None
        self.calls.clear()
        self.placed.clear()
        self._dead.clear()

    def _run_commands(self) -> None:
        run_pending(self._cmds, lambda exc: exc.info() if isinstance(exc, pj.Error) else None)

    def _shutdown(self) -> None:
        _quietly(self.ep.hangupAllCalls)
        deadline = time.monotonic() + 2
        while self.calls and time.monotonic() < deadline:
            self.ep.libHandleEvents(20)
        self._destroy()

    def _destroy(self) -> None:
        # pjsua2 objects must go before libDestroy, or pjlib asserts
        import gc

        if self.ep is not None and self._lib_started:
            # stop the bridge clock first (the null sound device's thread): only then can the
            # ports go without a callback landing in a freed one. Not before libStart (a start
            # that failed, e.g. on a taken port): there is no clock to stop yet
            _quietly(lambda: self.ep.audDevManager().setNoDev())
        # pjsua's destroy sleeps up to a second for network goodbyes (unregistration, BYEs of
        # calls still up); with neither, there is nobody to say goodbye to
        quiet = not self.calls and self.cfg.registration is None
        self._drop_calls()
        gc.collect()  # anything pjsua2 in a reference cycle goes now, on this thread
        if self.account is not None:
            _quietly(self.account.shutdown)
            self.account = None
        if self.ep is not None:
            ep = self.ep
            _quietly(lambda: ep.libDestroy(pj.PJSUA_DESTROY_NO_NETWORK if quiet else 0))
            self.ep = None
        self.ports.destroy()  # the bridge is gone: nothing can call into a port any more

    # -- incoming calls (SIP thread) ----------------------------------------------------------
    def _final(self, refusal: Refusal, status: tuple[int, str] | None = None) -> pj.CallOpParam:
        code, reason = status or SIP_STATUS[refusal.kind]
        if status is None and refusal.kind is RefusalKind.BUSY and self.cfg.busy_code != code:
            code, reason = self.cfg.busy_code, "Service Unavailable"
        op = pj.CallOpParam()
        op.statusCode = code
        op.reason = reason
        if refusal.retry_after:
            h = pj.SipHeader()
            h.hName = "Retry-After"
            h.hValue = str(refusal.retry_after)
            op.txOption.headers.append(h)
        return op

    def refuse_held(self, call: SipCall, refusal: Refusal) -> None:
        """A caller on hold who will not get a slot (waited too long, the agent drains): the
        refusal's final answer after 183, or BYE when the hold was answered with 200."""
        call.refused = True
        try:
            call.hangup(self._final(refusal))
        except pj.Error as exc:
            log.warning("sip_hold_refusal_failed", error=exc.info())

    def _hold(self, call: SipCall, ticket: Ticket) -> None:
        """Every slot is busy and the queue has room: the caller waits on hold (SIP thread)."""
        call.ticket = ticket
        call.hold = self.hold_audio.player(self.ports.rate, self.ports.samples) if self.hold_audio is not None else None
        if self.queue_cfg.sip_answer == "answer":
            # 200 after onIncomingCall returns, as final answers are (see `_refuse`)
            call_id = call.getId()
            self.post(lambda: self.with_call(call_id, lambda c: c.answer_ok()))
            return
        op = pj.CallOpParam()
        op.statusCode = 183  # Session Progress with SDP: early media carries the hold audio
        call.answer(op)

    def _refuse(self, call: SipCall, refusal: Refusal, status: tuple[int, str] | None = None) -> None:
        op = self._final(refusal, status)
        call.refused = True
        # Answered after onIncomingCall returns, not inside it: a final answer given inside the
        # callback to an INVITE without an SDP offer (late offer, legal SIP) makes pjsua free the
        # request twice and abort the process (pjsip_rx_data_free_cloned: Assertion `rdata').
        call_id = call.getId()
        self.post(lambda: self.with_call(call_id, lambda c: c.answer(op)))

    def incoming(self, account: _Account, prm) -> None:
        admission = self.admission
        call = SipCall(self, account, prm.callId)
        self.calls[call.getId()] = call
        msg = prm.rdata.wholeMsg
        src = source_ip(prm.rdata.srcAddress)
        number = dialled_user(msg) or ""
        if has_header(msg, "Replaces"):
            # pjsua hands an INVITE with Replaces to onCallReplaceRequest, not here, and our
            # request filter refuses it before pjsua sees it (telephony/sip/options.py); should
            # one still arrive, it is no new call: it would take over another one
            self.metrics.sip_refused_requests.labels(method="INVITE", reason="replaces").inc()
            return self._refuse(call, admission.refuse(NAME, RefusalKind.FORBIDDEN, "INVITE with Replaces"))
        if not allowed(src, self.cfg.allow_from):
            return self._refuse(call, admission.refuse(NAME, RefusalKind.FORBIDDEN,
                                                       f"source {src} is not in sip.allow_from"))
        try:
            admitted = admission.admit(CallRequest(NAME, number or None, caller=caller_user(msg),
                                                   variables=header_variables(msg, self.cfg.context_headers),
                                                   can_wait=self.queue_cfg is not None
                                                   and self.queue_cfg.max_waiting > 0))
        except Exception:
            log.exception("sip_call_setup_failed", number=number, source=src)
            return self._refuse(call, Refusal(RefusalKind.UNAVAILABLE, "setup failed"), status=(500, "Server Error"))
        if isinstance(admitted, Refusal):
            return self._refuse(call, admitted)
        if isinstance(admitted, Ticket):
            return self._hold(call, admitted)
        leg = call.attach(admitted)
        op = pj.CallOpParam()
        op.statusCode = 180
        call.answer(op)
        leg.start()  # its first frame (and our 200 OK) comes a tick or two later

    # -- outgoing calls (telephony.outbound.Dialler) ------------------------------------------
    def number_host(self) -> str | None:
        reg = self.cfg.registration
        return reg.registrar.split(":", 1)[-1] if reg is not None else None

    def from_host(self) -> str:
        return self.number_host() or f"{self.cfg.public_address or self.cfg.host}:{self.port}"

    def dial(self, call: OutboundCall, uri: str, from_uri: str | None, outbound: Outbound) -> None:
        self.post(lambda: self._dial(call, uri, from_uri, outbound))

    def cancel(self, call_id: str) -> None:
        def cancel() -> None:
            placed = self.placed.get(call_id)
            if placed is not None and not placed.disconnected and not placed.answered:
                placed.dial.cancelled = True
                placed.dial.give_up(placed)
        self.post(cancel)

    def _dial(self, call: OutboundCall, uri: str, from_uri: str | None, outbound: Outbound) -> None:
        """INVITE `uri` from the account (the trunk's credentials answer its challenges), From
        `from_uri` when the request named a caller ID (SIP thread)."""
        sess = call.admitted.session
        placed = SipCall(self, self.account, pj.PJSUA_INVALID_ID)
        placed.dial = OutboundDial(call.call_id, time.monotonic() + call.ring_timeout_s, outbound,
                                   amd=AmdSettings() if outbound.settings.amd else None)
        op = pj.CallOpParam(True)
        if from_uri:
            op.txOption.localUri = from_uri
        try:
            placed.makeCall(uri, op)
        except pj.Error as exc:
            sess.log.warning("outbound_dial_failed", status=exc.status, error=exc.reason)
            outbound.report(call.call_id, DialState.FAILED, f"dial failed: {exc.reason}")
            sess.hangup(EndReason.FAILED)
            return
        if placed.disconnected:  # failed at once (no route, no transport): nothing will follow
            outbound.report(call.call_id, DialState.FAILED, "dial failed")
            sess.hangup(EndReason.FAILED)
            return
        self.calls[placed.getId()] = placed
        self.placed[call.call_id] = placed
        placed.attach(call.admitted)
