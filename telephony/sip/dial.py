"""A call the agent places over SIP: its progress, its ring timeout, and when its model starts.

Runs on the SIP thread (`SipCall.onCallState` hands each state here first). 180/183 is
ringing; the 200 OK (the dialog confirmed) is the answer, and only then does the call's model
start (`CallLeg.start`), in the slot taken when it was dialled; a final answer other than 2xx
ends it as `telephony.outbound.final_state` says, and the slot goes back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pjsua2 as pj

from telephony.amd import AmdSettings, MachineDetector
from telephony.outbound import DialState, Outbound, final_state

if TYPE_CHECKING:
    from telephony.sip.call import SipCall


@dataclass
class OutboundDial:
    call_id: str  # the API's id (the session's too)
    deadline: float  # monotonic: no answer by then is a CANCEL and `no_answer`
    outbound: Outbound
    answered: bool = False
    timed_out: bool = False
    cancelled: bool = False  # DELETE /api/calls/{id} before the answer
    amd: AmdSettings | None = None  # answering-machine detection after the answer (None: off)
    detector: MachineDetector | None = None

    def callee_audio(self, pcm, rate: int) -> None:
        """The callee's audio after the answer (SIP thread): the machine detector hears it first."""
        if self.amd is None:
            return
        if self.detector is None:
            self.detector = MachineDetector(rate, self.amd)
        if self.detector.verdict is None and self.detector.feed(pcm) is not None:
            self.outbound.amd(self.call_id, self.detector.verdict.value)

    def callee_words(self, text: str) -> None:
        """The callee's words (the caller transcript, SIP thread): the machine detector hears
        them too, once it has started on the audio."""
        if self.detector is not None and self.detector.verdict is None and self.detector.hear(text) is not None:
            self.outbound.amd(self.call_id, self.detector.verdict.value)

    def on_state(self, call: "SipCall", ci) -> None:
        state = ci.state
        report = self.outbound.report
        if state == pj.PJSIP_INV_STATE_EARLY:
            report(self.call_id, DialState.RINGING)
        elif state == pj.PJSIP_INV_STATE_CONFIRMED and not self.answered:
            self.answered = call.answered = True  # (SipLeg.on_live answers nothing: this is the answer)
            report(self.call_id, DialState.ANSWERED, sip_status=ci.lastStatusCode)
            if call.leg is not None:
                call.leg.start()  # the model starts now: its first frame answers the callee's hello
        elif state == pj.PJSIP_INV_STATE_DISCONNECTED and not self.answered:
            code = ci.lastStatusCode
            if self.cancelled:
                report(self.call_id, DialState.ENDED, "cancelled", code)
            elif self.timed_out:
                report(self.call_id, DialState.NO_ANSWER, "ring_timeout", code)
            else:
                report(self.call_id, final_state(code), f"{code} {ci.lastReason}".strip(), code)

    def check_timeout(self, call: "SipCall") -> None:
        """Housekeeping: ringing past the deadline is given up (CANCEL)."""
        if self.answered or self.timed_out or self.cancelled or call.disconnected:
            return
        if time.monotonic() >= self.deadline:
            self.timed_out = True
            self.give_up(call)

    def give_up(self, call: "SipCall") -> None:
        """CANCEL (pjsip sends it once a provisional answer came, as RFC 3261 9.1 requires)."""
        try:
            call.hangup(pj.CallOpParam())
        except pj.Error:
            pass
