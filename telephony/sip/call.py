"""One SIP call: pjsua2 call callbacks and the audio port; the rest is the shared call leg.

Everything here runs on the SIP thread (the only thread that touches pjsua2). Session events
come from the engine and VAD threads through a hop that names the call by id, never by object:
a pjsua2 object freed on a thread pjlib does not know aborts the process.
"""

from __future__ import annotations

import time
import weakref

import numpy as np
import pjsua2 as pj

from agent.events import EndReason, Hold, TransferFailed
from agent.session import CallSession
from telephony.leg import CallLeg
from telephony.sip.port import RATE, SAMPLES, CallAudioPort

NAME = "sip"
OUTBOUND_PACKETS = 1  # 20 ms of slack at the port: the SIP thread refills every few ms


class SipLeg(CallLeg):
    """The shared leg with SIP's answers: 200 OK when live, BYE (or a final answer) when the
    agent ends the call, the port's queue dropped on barge-in, blind transfer by REFER.

    It holds its call weakly: a call <-> leg reference cycle would leave the pjsua2 call to the
    garbage collector, which may run on any thread (and a pjsua2 object freed off the SIP
    thread aborts the process)."""

    can_transfer = True

    def __init__(self, call: "SipCall", session: CallSession):
        self.sip, self.call_id = call.endpoint, call.getId()
        endpoint, call_id = self.sip, self.call_id

        def hop(ev) -> None:  # engine/VAD thread -> SIP thread, by call id
            endpoint.post(lambda: endpoint.with_call(call_id, lambda c: c.leg.on_event(ev)))
        super().__init__(session, endpoint=NAME, metrics=endpoint.runtime.metrics, in_rate=RATE, out_rate=RATE,
                         out_packet=SAMPLES, hop=hop)
        self._call = weakref.ref(call)

    def _with_call(self, fn) -> None:
        call = self._call()
        if call is not None:
            fn(call)

    def on_live(self) -> None:
        self._with_call(lambda c: c.answer_ok())

    def flush_far_end(self) -> None:
        def flush(c) -> None:
            if c.port is not None:
                c.port.generation = self.session.generation
                c.port.outbound.clear()
        self._with_call(flush)

    def close(self, reason: EndReason) -> None:
        self._with_call(lambda c: c.end_by_agent(reason))

    def start_transfer(self, target: str) -> None:
        # after the current callback returns, so the request that carried the digit (INFO) is
        # answered before the REFER goes out
        endpoint, call_id = self.sip, self.call_id
        endpoint.post(lambda: endpoint.with_call(call_id, lambda c: c.start_transfer(target)))


class SipCall(pj.Call):
    def __init__(self, endpoint, account, call_id: int):
        super().__init__(account, call_id)
        self.endpoint = endpoint
        self.leg: SipLeg | None = None
        self.port: CallAudioPort | None = None
        self.answered = False
        self.confirmed = False
        self.disconnected = False
        self.on_hold = False
        self.media_index: int | None = None
        self.last_rx_pkt = -1
        self.last_rx_change = time.monotonic()
        self.refused = False
        self._underruns_seen = 0

    @property
    def session(self) -> CallSession | None:
        return self.leg.session if self.leg is not None else None

    def attach(self, session: CallSession) -> None:
        self.leg = SipLeg(self, session)

    def answer_ok(self) -> None:
        if self.answered or self.disconnected:
            return
        op = pj.CallOpParam()
        op.statusCode = 200
        self.answer(op)
        self.answered = True

    def end_by_agent(self, reason: EndReason) -> None:
        """The agent side ended the call (max duration, drain, failure): BYE, or a final answer."""
        if self.disconnected:
            return
        op = pj.CallOpParam()
        if not self.answered:
            op.statusCode = 503 if reason is EndReason.SHUTDOWN else 480
        try:
            self.hangup(op)
        except pj.Error:
            pass

    # -- pjsua2 callbacks (SIP thread) ----------------------------------------------------------
    def onCallState(self, prm) -> None:
        ci = self.getInfo()
        if ci.state == pj.PJSIP_INV_STATE_CONFIRMED:
            self.confirmed = True
        elif ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.disconnected = True
            if self.leg is not None:
                self.session.log.info("sip_disconnected", status=ci.lastStatusCode, reason=ci.lastReason)
                reason = EndReason.CALLER_HANGUP if self.confirmed else EndReason.CANCELLED
                if self.confirmed and ci.lastStatusCode == 408:
                    # pjsip ended an established call itself: its session timer (RFC 4028)
                    # expired without a refresh (we send no other in-dialog requests that end it)
                    reason = EndReason.SESSION_EXPIRED
                if self.leg.transfer_pending:
                    reason = EndReason.TRANSFERRED
                self.leg.hangup(reason)
            self.endpoint.forget(self)

    def onCallMediaState(self, prm) -> None:
        ci = self.getInfo()
        for mi in ci.media:
            if mi.type != pj.PJMEDIA_TYPE_AUDIO:
                continue
            self.media_index = mi.index
            if mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                if self.on_hold and self.session is not None:
                    self.session.emit(Hold(False))
                self.on_hold = False
                self._connect(mi.index)
            elif mi.status in (pj.PJSUA_CALL_MEDIA_REMOTE_HOLD, pj.PJSUA_CALL_MEDIA_LOCAL_HOLD,
                               pj.PJSUA_CALL_MEDIA_NONE):
                if not self.on_hold and self.session is not None:
                    self.session.emit(Hold(True))
                self.on_hold = True

    def release_port(self) -> None:
        """Give the port back to the pool (call ended: pjsua has removed its stream's slot)."""
        if self.port is not None:
            self.endpoint.ports.release(self.port)
            self.port = None

    def _connect(self, index: int) -> None:
        if self.port is None:
            self.port = self.endpoint.ports.acquire()
            self._underruns_seen = self.port.underruns
        am = self.getAudioMedia(index)
        am.startTransmit(self.port)
        self.port.startTransmit(am)
        self.last_rx_change = time.monotonic()

    def onDtmfDigit(self, prm) -> None:
        if self.leg is not None:
            self.leg.dtmf_in(str(prm.digit))

    def start_transfer(self, target: str) -> None:
        self.session.log.info("sip_transfer", target=target)
        try:
            self.xfer(target, pj.CallOpParam(True))
        except pj.Error as exc:
            self.leg.transfer_pending = False
            self.session.log.warning("sip_transfer_failed", error=exc.info())

    def onCallTransferStatus(self, prm) -> None:
        if not prm.finalNotify:
            return
        prm.cont = False
        if 200 <= prm.statusCode < 300:
            self.session.log.info("sip_transferred", status=prm.statusCode)
            op = pj.CallOpParam()
            self.hangup(op)  # the person has the caller now; free the slot
        else:
            self.leg.transfer_pending = False
            self.session.log.warning("sip_transfer_rejected", status=prm.statusCode, reason=prm.reason)
            self.session.emit(TransferFailed(prm.statusCode))

    # -- SIP thread housekeeping ----------------------------------------------------------------
    def pump(self) -> None:
        """Move audio between the port's byte queues and the leg (resampling happens there)."""
        port, leg = self.port, self.leg
        if port is None or leg is None or self.disconnected:
            return
        chunks = []
        while port.inbound:
            chunks.append(port.inbound.popleft())
        if chunks and not self.on_hold:
            leg.audio_in(np.frombuffer(b"".join(chunks), dtype="<i2").astype(np.float32) / 32768.0)
        if not self.answered:
            return
        sess = leg.session
        port.generation = sess.generation
        while len(port.outbound) < OUTBOUND_PACKETS:
            pkt = leg.playout.take_packet()
            if pkt is None:
                break
            port.outbound.append((sess.generation, (np.clip(pkt, -1, 1) * 32767).astype("<i2").tobytes()))
        # underruns happen on the bridge clock (the port plays silence); its counter only grows
        # there, and is read here by difference (no read-and-reset across threads)
        total = port.underruns
        n, self._underruns_seen = total - self._underruns_seen, total
        for _ in range(n):
            leg.playout.report_underrun()

    def check_rtp(self, timeout_s: float) -> None:
        if self.media_index is None or self.on_hold or not self.confirmed or self.disconnected:
            return
        try:
            pkts = self.getStreamStat(self.media_index).rtcp.rxStat.pkt
        except pj.Error:
            return
        now = time.monotonic()
        if pkts != self.last_rx_pkt:
            self.last_rx_pkt = pkts
            self.last_rx_change = now
        elif now - self.last_rx_change > timeout_s and self.leg is not None:
            self.session.log.warning("sip_rtp_timeout", seconds=timeout_s)
            self.leg.hangup(EndReason.RTP_TIMEOUT)
