"""SIP endpoint: a pjsua2 user agent answering phone lines per dialled number.

pjsua2 runs on one thread of ours (`threadCnt=0`, `mainThreadOnly`), which polls pjsip, pumps
call audio and runs commands posted by other threads; nothing else touches pjsua2. Incoming
INVITE: ACL by source address (403), then the shared admission service (route by Request-URI
user: 404 unless a default persona answers; capacity: `sip.busy_code` 486 or 503 with
Retry-After; draining: 503), else 180 Ringing until the call's first agent frame is ready, then
200 OK.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pjsua2 as pj
import structlog

from agent.commands import run_pending
from agent.events import CallState
from telephony.admission import SIP_STATUS, CallRequest, Refusal, RefusalKind
from telephony.sip import options as sip_options
from telephony.sip import pjlog
from telephony.sip.call import SipCall
from telephony.sip.port import PortPool
from telephony.sip.sipmsg import allowed, caller_user, dialled_user, header_variables, source_ip

log = structlog.get_logger(__name__)
NAME = "sip"


def _quietly(fn) -> None:
    """Teardown steps: a failure must not stop the ones after it."""
    try:
        fn()
    except Exception as exc:
        log.debug("sip_teardown_step_failed", step=getattr(fn, "__name__", str(fn)), error=str(exc))


class _Account(pj.Account):
    def __init__(self, endpoint: "SipEndpoint"):
        super().__init__()
        self.endpoint = endpoint

    def onIncomingCall(self, prm) -> None:
        self.endpoint.incoming(self, prm)

    def onRegState(self, prm) -> None:
        info = self.getInfo()
        log.info("sip_registration", status=prm.code, reason=prm.reason, active=info.regIsActive)


class SipEndpoint:
    name = NAME

    def __init__(self, runtime):
        self.runtime = runtime
        self.cfg = runtime.cfg.sip
        self.port = self.cfg.port
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self.calls: dict[int, SipCall] = {}
        self._dead: list[SipCall] = []
        self.ports = PortPool()
        self._lib_started = False
        self.ep: pj.Endpoint | None = None
        self.account: _Account | None = None

    # -- lifecycle (asyncio side) ---------------------------------------------------------------
    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sip", daemon=True)
        self._thread.start()
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait, 30)
        if self._error is not None:
            raise self._error
        log.info("sip_listening", host=self.cfg.host, port=self.port, transports=self.cfg.transports)

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
        epc.uaConfig.maxCalls = min(4 * self.runtime.cfg.engine.max_calls + 8, 256)
        epc.uaConfig.userAgent = "personaplex-agent"
        self._logwriter = pjlog.LogWriter()
        epc.logConfig.writer = self._logwriter
        epc.logConfig.level = c.pjsip_log_level
        epc.logConfig.consoleLevel = c.pjsip_log_level
        epc.logConfig.decor = 0
        epc.medConfig.clockRate = 16000
        epc.medConfig.sndClockRate = 16000
        epc.medConfig.channelCount = 1
        epc.medConfig.ecTailLen = 0
        epc.medConfig.noVad = True
        ep.libInit(epc)
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
        sip_options.install(self.runtime)  # OPTIONS 503 while draining or full (proxy probes)
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
        try:
            self._init()
        except BaseException as exc:  # e.g. the port is taken: report to start()
            self._error = RuntimeError(f"SIP endpoint failed to start on {self.cfg.host}:{self.port}: "
                                       f"{exc.info() if isinstance(exc, pj.Error) else exc}")
            self._ready.set()
            self._destroy()
            return
        self._ready.set()
        last_check = time.monotonic()
        while not self._stopping.is_set():
            self._run_commands()
            self.ep.libHandleEvents(5)
            self._pump_all()
            now = time.monotonic()
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
            call.check_rtp(self.cfg.rtp_timeout_s)
        self._dead.clear()

    def _drop_calls(self) -> None:
        """Our call objects go (on this thread, before libDestroy). A loop variable in
        `_destroy` itself would keep the last call alive until after libDestroy, and its
        destructor would then abort the process (pjsua_call_set_user_data: Assertion)."""
        for call in list(self.calls.values()):
            call.port = None
        self.calls.clear()
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
        self._drop_calls()
        self.ports.destroy()
        gc.collect()  # anything pjsua2 in a reference cycle goes now, on this thread
        if self.account is not None:
            _quietly(self.account.shutdown)
            self.account = None
        if self.ep is not None:
            _quietly(self.ep.libDestroy)
            self.ep = None

    # -- incoming calls (SIP thread) ----------------------------------------------------------
    def _refuse(self, call: SipCall, refusal: Refusal, status: tuple[int, str] | None = None) -> None:
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
        call.refused = True
        # Answered after onIncomingCall returns, not inside it: a final answer given inside the
        # callback to an INVITE without an SDP offer (late offer, legal SIP) makes pjsua free the
        # request twice and abort the process (pjsip_rx_data_free_cloned: Assertion `rdata').
        call_id = call.getId()
        self.post(lambda: self.with_call(call_id, lambda c: c.answer(op)))

    def incoming(self, account: _Account, prm) -> None:
        rt = self.runtime
        call = SipCall(self, account, prm.callId)
        self.calls[call.getId()] = call
        msg = prm.rdata.wholeMsg
        src = source_ip(prm.rdata.srcAddress)
        number = dialled_user(msg) or ""
        if not allowed(src, self.cfg.allow_from):
            return self._refuse(call, rt.admission.refuse(NAME, RefusalKind.FORBIDDEN,
                                                          f"source {src} is not in sip.allow_from"))
        try:
            admitted = rt.admission.admit(CallRequest(NAME, number or None, caller=caller_user(msg),
                                                      variables=header_variables(msg, self.cfg.context_headers)))
        except Exception:
            log.exception("sip_call_setup_failed", number=number, source=src)
            return self._refuse(call, Refusal(RefusalKind.UNAVAILABLE, "setup failed"), status=(500, "Server Error"))
        if isinstance(admitted, Refusal):
            return self._refuse(call, admitted)
        call.attach(admitted)
        op = pj.CallOpParam()
        op.statusCode = 180
        call.answer(op)
        if admitted.state is CallState.LIVE:  # the first frame was ready before we rang
            call_id = call.getId()  # (after this callback: see _refuse)
            self.post(lambda: self.with_call(call_id, lambda c: c.answer_ok()))
