"""Call control: what the caller's keys do (DTMF), shared by every transport.

Today one policy: a persona may name a digit that transfers the caller to a person
(`transfer: {target, dtmf}`). The transport decides how (SIP REFER); a transport that cannot
transfer says so in the log instead of silently ignoring the key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from telephony.leg import CallLeg


class CallControl:
    def on_dtmf(self, leg: "CallLeg", digit: str) -> None:
        transfer = leg.session.persona.transfer
        if transfer is None or digit != transfer.dtmf or leg.transfer_pending:
            return
        if not leg.can_transfer:
            leg.session.log.warning("transfer_unsupported", target=transfer.target, endpoint=leg.endpoint)
            return
        leg.transfer_pending = True
        leg.session.log.info("transfer_requested", target=transfer.target, digit=digit)
        leg.start_transfer(transfer.target)
