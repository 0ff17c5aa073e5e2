"""One SIP call: pjsua2 call callbacks, the audio port, and the bridge to the call session."""

from __future__ import annotations

import time

import numpy as np
import pjsua2 as pj

from agent.events import BargeIn, CallEvent, CallState, Ended, EndReason, Hold, StateChanged, TransferFailed
from agent.session import CallSession
from telephony.audio import Capture, Playout
from telephony.sip.port import RATE, SAMPLES, CallAudioPort

OUTBOUND_PACKETS = 1  # 20 ms of slack at the port: the SIP thread refills every few ms


class SipCall(pj.Call):
    def __init__(self, endpoint, account, call_id: int):
        super().__init__(account, call_id)
        self.endpoint = endpoint
        self.session: CallSession | None = None
        self.port: CallAudioPort | None = None
        self.capture: Capture | None = None
        self.playout: Playout | None = None
        self.answered = False
        self.confirmed = False
        self.disconnected = False
        self.on_hold = False
        self.media_index: int | None = None
        self.last_rx_pkt = -1
        self.last_rx_change = time.monotonic()
        self.transfer_pending = False
        self.refused = False

    # -- set-up --------------------------------------------------------------------------------
    def attach(self, session: CallSession) -> None:
        self.session = session
        self.capture = Capture(session, RATE)
        metrics = self.endpoint.runtime.metrics
        self.playout = Playout(session, RATE, SAMPLES,
                               on_underrun=lambda cause: metrics.playout_underruns.labels("sip", cause).inc())
        # The listener runs on engine/VAD threads. It must not hold this object: a pjsua2 object
        # freed on a thread pjlib does not know aborts the process. It posts work, by call id,
        # to the SIP thread, the only thread that touches pjsua2.
        endpoint, call_id = self.endpoint, self.getId()

        def on_session_event(ev: CallEvent) -> None:
            if isinstance(ev, (StateChanged, Ended, BargeIn)):
                endpoint.post(lambda: endpoint.session_event(call_id, ev))
        session.subscribe(on_session_event)

    def on_session_event(self, ev: CallEvent) -> None:
        """A session event, on the SIP thread."""
        if isinstance(ev, StateChanged) and ev.state is CallState.LIVE:
            self.answer_ok()
        elif isinstance(ev, Ended):
            self.end_by_agent(ev.reason)
        elif isinstance(ev, BargeIn) and self.port is not None:
            self.port.generation = ev.generation
            self.port.outbound.clear()

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
            if self.session is not None:
                self.session.log.info("sip_disconnected", status=ci.lastStatusCode, reason=ci.lastReason)
                reason = EndReason.CALLER_HANGUP if self.confirmed else EndReason.CANCELLED
                if self.confirmed and ci.lastStatusCode == 408:
                    # pjsip ended an established call itself: its session timer (RFC 4028)
                    # expired without a refresh (we send no other in-dialog requests that end it)
                    reason = EndReason.SESSION_EXPIRED
                if self.transfer_pending:
                    reason = EndReason.TRANSFERRED
                self.session.hangup(reason)
            self.endpoint.forget(self)

    def onCallMediaState(self, prm) -> None:
        ci = self.getInfo()
        for mi in ci.media:
            if mi.type != pj.PJMEDIA_TYPE_AUDIO:
                continue
            self.media_index = mi.index
            if mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                self.on_hold = False
                self._connect(mi.index)
            elif mi.status in (pj.PJSUA_CALL_MEDIA_REMOTE_HOLD, pj.PJSUA_CALL_MEDIA_LOCAL_HOLD,
                               pj.PJSUA_CALL_MEDIA_NONE):
                self.on_hold = True
                if self.session is not None:
                    self.session.emit(Hold(True))

    def _connect(self, index: int) -> None:
        if self.port is None:
            self.port = CallAudioPort()
            self.port.create(f"agent{self.getId()}")
        am = self.getAudioMedia(index)
        am.startTransmit(self.port)
        self.port.startTransmit(am)
        self.last_rx_change = time.monotonic()

    def onDtmfDigit(self, prm) -> None:
        digit = str(prm.digit)
        self.endpoint.runtime.metrics.dtmf.labels("sip").inc()
        if self.session is None:
            return
        self.session.dtmf(digit)
        t = self.session.persona.transfer
        if t is not None and digit == t.dtmf and not self.transfer_pending:
            self.transfer_pending = True
            # after this callback returns, so the request that carried the digit (INFO) is
            # answered before the REFER goes out
            call_id, endpoint = self.getId(), self.endpoint
            endpoint.post(lambda: endpoint.with_call(call_id, lambda c: c.start_transfer(t.target)))

    def start_transfer(self, target: str) -> None:
        self.session.log.info("sip_transfer", target=target)
        try:
            self.xfer(target, pj.CallOpParam(True))
        except pj.Error as exc:
            self.transfer_pending = False
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
            self.transfer_pending = False
            self.session.log.warning("sip_transfer_rejected", status=prm.statusCode, reason=prm.reason)
            self.session.emit(TransferFailed(prm.statusCode))

    # -- SIP thread housekeeping ----------------------------------------------------------------
    def pump(self) -> None:
        """Move audio between the port's byte queues and the session (resampling here)."""
        port, sess = self.port, self.session
        if port is None or sess is None or self.disconnected:
            return
        chunks = []
        while port.inbound:
            chunks.append(port.inbound.popleft())
        if chunks and not self.on_hold:
            pcm = np.frombuffer(b"".join(chunks), dtype="<i2").astype(np.float32) / 32768.0
            self.capture.push(pcm)
        if not self.answered:
            return
        port.generation = sess.generation
        while len(port.outbound) < OUTBOUND_PACKETS:
            pkt = self.playout.take_packet()
            if pkt is None:
                break
            port.outbound.append((sess.generation, (np.clip(pkt, -1, 1) * 32767).astype("<i2").tobytes()))
        # underruns happen on the bridge clock (the port plays silence); account for them here
        n, port.underruns = port.underruns, 0
        if sess.state is CallState.LIVE:
            for _ in range(n):
                self.playout.report_underrun()

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
        elif now - self.last_rx_change > timeout_s and self.session is not None:
            self.session.log.warning("sip_rtp_timeout", seconds=timeout_s)
            self.session.hangup(EndReason.RTP_TIMEOUT)
