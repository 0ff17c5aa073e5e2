"""Admission's "would a caller be taken?" (Twilio's webhook asks it before the stream exists)
with the call queue: a caller who can wait is taken while the queue has room, refused busy once
it is full; one who cannot wait is refused whenever others wait already (no overtaking)."""

from __future__ import annotations

from dataclasses import dataclass

from agent.metrics import Metrics
from telephony.admission import Admission, CallRequest, Refusal, RefusalKind
from telephony.call_queue import QueueSettings, Ticket


@dataclass(frozen=True)
class P:
    id: str = "citysan"
    direction: str = "both"


@dataclass
class Config:
    max_calls: int = 1


class Engine:
    """The scheduler as admission sees it (the real one needs torch): slots and a drain flag."""

    def __init__(self, free: int):
        self.capacity_left, self.draining, self.running, self.config = free, False, True, Config()


def make(free: int = 0, max_waiting: int = 1) -> tuple[Admission, Engine]:
    eng = Engine(free)
    return Admission(eng, lambda dialled: P(), Metrics(), 7, queue=QueueSettings(max_waiting, 30.0)), eng


def test_a_caller_who_can_wait_is_taken_while_the_queue_has_room():
    adm, _ = make(free=0, max_waiting=1)
    assert isinstance(adm.check("twilio", "+1", can_wait=True), P)
    refused = adm.check("twilio", "+1")
    assert isinstance(refused, Refusal) and refused.kind is RefusalKind.BUSY
    ticket = adm.admit(CallRequest("twilio", "+1", can_wait=True))
    assert isinstance(ticket, Ticket) and adm.queue.full
    full = adm.check("twilio", "+1", can_wait=True)
    assert isinstance(full, Refusal) and full.kind is RefusalKind.BUSY and full.retry_after == 7
    assert adm.availability() is RefusalKind.BUSY
    ticket.leave()
    assert isinstance(adm.check("twilio", "+1", can_wait=True), P) and adm.availability() is None


def test_no_overtaking_a_free_slot_is_the_waiting_callers_and_draining_refuses_everyone():
    adm, eng = make(free=0, max_waiting=2)
    ticket = adm.admit(CallRequest("telnyx", "+1", can_wait=True))
    assert isinstance(ticket, Ticket)
    eng.capacity_left = 1  # a slot frees before the waiting caller's next poll
    refused = adm.check("twilio", "+1")
    assert isinstance(refused, Refusal) and refused.kind is RefusalKind.BUSY
    assert isinstance(adm.check("twilio", "+1", can_wait=True), P)  # it would queue behind
    eng.draining = True
    gone = adm.check("twilio", "+1", can_wait=True)
    assert isinstance(gone, Refusal) and gone.kind is RefusalKind.DRAINING
