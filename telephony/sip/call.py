"""One SIP call: pjsua2 call callbacks and the audio port; the rest is the shared call leg.

Everything here runs on the SIP thread (the only thread that touches pjsua2). Session events
come from the engine and VAD threads through a hop that names the call by id, never by object:
a pjsua2 object freed on a thread pjlib does not know aborts the process.
"""

from __future__ import annotations

import weakref

import numpy as np
import pjsua2 as pj
import structlog

from agent.calls.events import EndReason, Hold, TransferFailed, TranscriptPiece
from agent.calls.session import CallSession
from telephony.admission import AdmittedCall, Refusal
from telephony.call_queue import Ticket
from telephony.leg import CallLeg, LossKind
from telephony.sip.dial import OutboundDial
from telephony.sip.port import PTIME_US, CallAudioPort

log = structlog.get_logger(__name__)
NAME = "sip"
#: agent audio kept queued at the port, in bridge frames: the SIP thread refills every PUMP_S
#: (transport.py), the bridge takes a frame every 20 ms, so two frames never run dry between refills
OUTBOUND_FRAMES = 2
PTIME_S = PTIME_US / 1e6  # one packet (our SDP's ptime: 20 ms)


class SipLeg(CallLeg):
    """The shared leg with SIP's answers: 200 OK when live, BYE (or a final answer) when the
    agent ends the call, the port's queue dropped on barge-in, blind transfer by REFER.

    It holds its call weakly: a call <-> leg reference cycle would leave the pjsua2 call to the
    garbage collector, which may run on any thread (and a pjsua2 object freed off the SIP
    thread aborts the process)."""

    can_transfer = True

    def __init__(self, call: "SipCall", admitted: AdmittedCall):
        self.sip, self.call_id = call.transport, call.getId()
        sip, call_id = self.sip, self.call_id

        def hop(ev) -> None:  # engine/VAD thread -> SIP thread, by call id
            sip.post(lambda: sip.with_call(call_id, lambda c: c.leg.on_event(ev)))
        ports = sip.ports
        super().__init__(admitted, endpoint=NAME, metrics=sip.metrics, in_rate=ports.rate, out_rate=ports.rate,
                         out_packet=ports.samples, hop=hop)
        self._call = weakref.ref(call)

    def _with_call(self, fn) -> None:
        call = self._call()
        if call is not None:
            fn(call)

    def on_live(self) -> None:
        self._with_call(lambda c: c.answer_ok())

    def forward(self, ev) -> None:
        if isinstance(ev, TranscriptPiece) and ev.who == "caller":  # a callee's words: the machine detector
            self._with_call(lambda c: c.dial.callee_words(ev.text) if c.dial is not None else None)

    def flush_far_end(self) -> None:
        def flush(c) -> None:
            if c.port is not None:
                self.count_flushed(c.port.drop_agent_audio() / c.port.rate)
        self._with_call(flush)

    def close(self, reason: EndReason) -> None:
        self._with_call(lambda c: c.end_by_agent(reason))

    def start_transfer(self, target: str) -> None:
        # after the current callback returns, so the request that carried the digit (INFO) is
        # answered before the REFER goes out
        sip, call_id = self.sip, self.call_id
        sip.post(lambda: sip.with_call(call_id, lambda c: c.start_transfer(target)))


class SipCall(pj.Call):
    def __init__(self, transport, account, call_id: int):
        super().__init__(account, call_id)
        self.transport = transport  # telephony.sip.transport.SipTransport
        self.leg: SipLeg | None = None
        self.port: CallAudioPort | None = None
        self.answered = False
        self.confirmed = False
        self.disconnected = False
        self.on_hold = False
        self.media_index: int | None = None
        self.last_rx_pkt = -1
        self.refused = False
        self._underruns_seen = 0
        self._overruns_seen = 0
        self._loss_seen = (0, 0)  # (RTCP cumulative loss, jitter-buffer discards) already counted
        self.ticket: Ticket | None = None  # on hold in the call queue (no leg, no session yet)
        self.hold = None  # telephony.audio.hold.HoldPlayer while on hold
        self.dial: OutboundDial | None = None  # a call the agent places (telephony.sip.dial)

    @property
    def session(self) -> CallSession | None:
        return self.leg.session if self.leg is not None else None

    def attach(self, admitted: AdmittedCall) -> SipLeg:
        self.leg = SipLeg(self, admitted)
        return self.leg

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
        if not self.answered and self.dial is not None:
            self.dial.cancelled = True  # (a call we placed, not answered yet: CANCEL; it ends `ended`)
        elif not self.answered:
            op.statusCode = 503 if reason is EndReason.SHUTDOWN else 480
        try:
            self.hangup(op)
        except pj.Error:
            pass

    # -- pjsua2 callbacks (SIP thread) ----------------------------------------------------------
    def onCallState(self, prm) -> None:
        ci = self.getInfo()
        if self.dial is not None:
            self.dial.on_state(self, ci)
        if ci.state == pj.PJSIP_INV_STATE_CONFIRMED:
            self.confirmed = True
        elif ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.disconnected = True
            if self.ticket is not None:  # hung up on hold: out of the queue at once (abandoned)
                self.ticket.leave()
                self.ticket = None
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
            self.transport.forget(self)

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
            self.transport.ports.release(self.port)
            self.port = None

    def _connect(self, index: int) -> None:
        if self.port is None:
            self.port = self.transport.ports.acquire()
            self._underruns_seen, self._overruns_seen, _ = self.port.counters()
        self.port.connect(self.getAudioMedia(index).getPortId())

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

    # -- requests the caller may not make of the agent (SIP thread) ----------------------------
    def _refused(self, event: str, method: str, reason: str, status: int) -> None:
        """Log (no URI, no number: they are the caller's data) and count one refused request."""
        (self.session.log if self.session is not None else log).warning(event, method=method, status=status)
        self.transport.metrics.sip_refused_requests.labels(method=method, reason=reason).inc()

    def onCallTransferRequest(self, prm) -> None:
        """A REFER inside the call: whoever can send into the dialog asks the agent to place a
        call to the Refer-To URI from the agent's own account (toll fraud to premium numbers, or
        a way into hosts only the agent can reach). pjsua's default accepts (202) and dials. The
        agent never places calls for anyone; its own transfers go the other way (it sends the
        REFER, `start_transfer`). 603 Decline: pjsua answers the REFER with it and dials nothing."""
        prm.statusCode = pj.PJSIP_SC_DECLINE
        self._refused("sip_refer_refused", "REFER", "refer", pj.PJSIP_SC_DECLINE)

    def onCallReplaceRequest(self, prm) -> None:
        """An INVITE with Replaces naming this call (RFC 3891): a new dialog, from anywhere and
        before any ACL or admission, would take this call over. 403, answered by pjsua.
        `prm.reason` is left as it is: pjsua2 passes pjsua a pointer into that string after
        the parameter is gone, and pjsua uses the code's own phrase only while the text still
        has the default's length (2, "OK")."""
        prm.statusCode = pj.PJSIP_SC_FORBIDDEN
        self._refused("sip_replaces_refused", "INVITE", "replaces", pj.PJSIP_SC_FORBIDDEN)

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
    def pump_held(self) -> None:
        """On hold: take the slot when it comes (the call then starts like any other), leave on
        a refusal (waited too long, draining), else play the next hold packet. The caller's
        audio is dropped: nothing reaches the model before the call starts."""
        ticket = self.ticket
        got = ticket.poll()
        if isinstance(got, AdmittedCall):
            self.ticket, self.hold = None, None
            leg = self.attach(got)
            leg.session.log.info("call_dequeued", queue_wait_s=leg.session.queue_wait_s)
            if self.port is not None:
                self.port.drop_agent_audio()
            leg.start()  # the 200 OK (early_media) comes with its first frame, as for any call
            return
        if isinstance(got, Refusal):
            self.ticket, self.hold = None, None
            self.transport.refuse_held(self, got)
            return
        port = self.port
        if port is None:
            return
        port.drop_caller_audio()
        missing = OUTBOUND_FRAMES * port.samples - port.queued()
        if self.hold is not None and missing > 0:
            port.write(np.concatenate([self.hold.take_packet() for _ in range(-(-missing // port.samples))]))

    def pump(self) -> None:
        """Move audio between the port's rings and the leg (resampling happens there): all the
        caller's samples since the last pump in one piece, the agent's topped up to
        OUTBOUND_FRAMES in one write."""
        if self.ticket is not None and not self.disconnected:
            return self.pump_held()
        port, leg = self.port, self.leg
        if port is None or leg is None or self.disconnected:
            return
        pcm = port.read()
        # a call we placed hears nothing before the answer (ringback in early media is no "hello")
        if pcm is not None and not self.on_hold and (self.dial is None or self.answered):
            if self.dial is not None:
                self.dial.callee_audio(pcm, port.rate)
            leg.audio_in(pcm)
        if not self.answered:
            return
        # (a barge-in empties the port's queue through the leg: flush_far_end)
        queued, want = port.queued(), OUTBOUND_FRAMES * port.samples
        if queued < want:
            pkts = []
            while queued < want:
                pkt = leg.playout.take_packet()
                if pkt is None:
                    break
                pkts.append(pkt)
                queued += len(pkt)
            if pkts:
                port.write(pkts[0] if len(pkts) == 1 else np.concatenate(pkts))
        # underruns happen on the bridge clock (the port sends silence); its counters only grow
        # there, and are read here by difference (no read-and-reset across threads)
        under, over, _ = port.counters()
        for _ in range(under - self._underruns_seen):
            leg.playout.report_underrun()
        self._underruns_seen = under
        if over != self._overruns_seen:
            leg.count_lost(LossKind.BRIDGE_OVERRUN, (over - self._overruns_seen) / port.rate)
            self._overruns_seen = over

    def check_media(self, timeout_s: float) -> None:
        """RTP counts as media (pjmedia's received-packet counter moved), not the port's frames:
        the stream's jitter buffer conceals a silent peer with frames of its own. A call on hold
        is not watched; the clock starts again when it resumes."""
        leg = self.leg
        if leg is None or self.media_index is None or not self.confirmed or self.disconnected:
            return
        if self.on_hold:
            leg.last_media = None
            return
        try:
            stat = self.getStreamStat(self.media_index)
        except pj.Error:
            return
        rx = stat.rtcp.rxStat
        pkts = rx.pkt
        loss, discard = max(rx.loss, 0), max(stat.jbuf.discard, 0)
        seen_loss, seen_discard = self._loss_seen
        if (loss, discard) != self._loss_seen:
            # packets the network lost, and packets too late for the jitter buffer: 20 ms each
            leg.count_lost(LossKind.NETWORK, max(loss - seen_loss, 0) * PTIME_S)
            leg.count_lost(LossKind.JITTER, max(discard - seen_discard, 0) * PTIME_S)
            self._loss_seen = (loss, discard)
        if pkts != self.last_rx_pkt:
            self.last_rx_pkt = pkts
            leg.media_arrived()
        else:
            leg.arm_media_watch()
            leg.media_timed_out(timeout_s)
