"""The call queue on its own: first come, first served; full, timed out, abandoned, draining."""

from __future__ import annotations

from dataclasses import dataclass

from agent.metrics import Metrics
from telephony.call_queue import CallQueue, QueueSettings


@dataclass
class Req:
    endpoint: str = "sip"


class Slots:
    """The queue's view of the engine: free slots and a draining flag, taken for real."""

    def __init__(self, free: int = 0):
        self.free, self.draining, self.taken = free, False, []

    def why_not(self) -> str | None:
        return "draining" if self.draining else ("busy" if self.free <= 0 else None)

    def take(self, req, persona):
        if self.free <= 0:
            return None
        self.free -= 1
        call = Taken(Session())
        self.taken.append(persona)
        return call


@dataclass
class Session:
    queue_wait_s: float | None = None


@dataclass
class Taken:
    session: Session


@dataclass
class Refused:
    kind: str
    reason: str


def make(max_waiting=2, max_wait_s=60.0, free=0):
    slots, m = Slots(free), Metrics()
    q = CallQueue(QueueSettings(max_waiting, max_wait_s), m, slots.take,
                  lambda ep, kind, reason, retry: Refused(kind, reason), slots.why_not, 5)
    return q, slots, m


def value(m: Metrics, name: str, **labels) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_first_come_first_served_and_a_full_queue_says_so():
    q, slots, m = make()
    first, second = q.join(Req(), "p1"), q.join(Req(), "p2")
    assert q.join(Req(), "p3") is None and q.full
    assert (first.position, second.position) == (1, 2)
    assert second.poll() is None and first.poll() is None  # no slot yet
    slots.free = 1
    assert second.poll() is None  # the slot is the first caller's
    got = first.poll()
    assert isinstance(got, Taken) and got.session.queue_wait_s is not None and slots.taken == ["p1"]
    assert second.position == 1 and q.depth == 1
    slots.free = 1
    assert isinstance(second.poll(), Taken) and slots.taken == ["p1", "p2"]
    assert value(m, "personaplex_queue_outcomes_total", endpoint="sip", outcome="answered") == 2
    assert value(m, "personaplex_queue_depth") == 0


def test_a_caller_who_hangs_up_leaves_at_once_and_the_next_moves_up():
    q, slots, m = make()
    first, second = q.join(Req(), "p1"), q.join(Req(), "p2")
    first.leave()
    first.leave()  # once only
    assert second.position == 1 and first.position == 0
    assert value(m, "personaplex_queue_outcomes_total", endpoint="sip", outcome="abandoned") == 1
    slots.free = 1
    assert isinstance(second.poll(), Taken)


def test_over_max_wait_and_draining_are_refusals():
    q, slots, m = make(max_wait_s=0.01)
    t = q.join(Req(), "p1")
    t.joined -= 1.0
    got = t.poll()
    assert isinstance(got, Refused) and got.kind == "busy" and q.depth == 0
    assert value(m, "personaplex_queue_outcomes_total", endpoint="sip", outcome="timed_out") == 1
    q2, slots2, m2 = make()
    t2 = q2.join(Req(), "p1")
    slots2.draining = True
    got = t2.poll()
    assert isinstance(got, Refused) and got.kind == "draining"
    assert t2.poll() is None  # done: polled again, nothing more happens
    assert value(m2, "personaplex_queue_wait_seconds_count", outcome="refused") == 1


def test_off_at_max_waiting_zero():
    q, _, _ = make(max_waiting=0)
    assert not q.enabled and q.join(Req(), "p") is None


def test_waiting_lists_each_caller_head_first_with_place_and_wait():
    from agent.personas.schema import Persona
    from telephony.admission import CallRequest

    q, slots, _ = make()
    assert q.waiting() == []
    persona = Persona(id="citysan", kind="prompt", numbers=("1001",), voice="NATF0", prompt="Hi.", source="<test>")
    first = q.join(CallRequest("sip", "1001", caller="+14155550100"), persona)
    q.join(CallRequest("sip", "1002", caller="+14155550101"), persona)
    got = q.waiting()
    assert [(w.position, w.caller, w.dialled, w.persona, w.endpoint) for w in got] == [
        (1, "+14155550100", "1001", "citysan", "sip"), (2, "+14155550101", "1002", "citysan", "sip")]
    assert got[0].waited_s >= got[1].waited_s >= 0
    first.leave()
    assert [(w.position, w.dialled) for w in q.waiting()] == [(1, "1002")]
