"""Call control: what the caller's keys do (DTMF), shared by every transport.

Today one policy: a persona may name a digit that transfers the caller to a person
(`transfer: {target, dtmf}`). The transport decides how (SIP REFER); a transport that cannot
transfer says so in the log instead of silently ignoring the key.
"""

from __future__ import annotations

from typing import Protocol

from agent.calls.events import TransferRequested
from agent.calls.session import CallSession


class Transferable(Protocol):
    """What call control needs of a call's leg (`telephony.leg.CallLeg` is one)."""

    session: CallSession
    endpoint: str
    can_transfer: bool
    transfer_pending: bool

    def start_transfer(self, target: str) -> None: ...


class CallControl:
    def on_dtmf(self, leg: Transferable, digit: str) -> None:
        transfer = leg.session.persona.transfer
        if transfer is None or digit != transfer.dtmf or leg.transfer_pending:
            return
        if not leg.can_transfer:
            leg.session.log.warning("transfer_unsupported", target=transfer.target, endpoint=leg.endpoint)
            return
        leg.transfer_pending = True
        leg.session.log.info("transfer_requested", target=transfer.target, digit=digit)
        leg.session.emit(TransferRequested(transfer.target))
        leg.start_transfer(transfer.target)

    def order_transfer(self, leg: Transferable, target: str, by: str) -> None:
        """A supervisor's transfer (the console): the target was checked against the configured
        list before it got here."""
        if leg.transfer_pending:
            leg.session.log.warning("transfer_ignored", reason="already_pending", by=by)
            return
        if not leg.can_transfer:
            leg.session.log.warning("transfer_unsupported", target=target, endpoint=leg.endpoint, by=by)
            return
        leg.transfer_pending = True
        leg.session.log.info("transfer_requested", target=target, by=by)
        leg.session.emit(TransferRequested(target))
        leg.start_transfer(target)
