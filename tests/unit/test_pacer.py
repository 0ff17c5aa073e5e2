"""The shared real-time pacer, on a scripted clock: schedule, lead, and recovery from a stall."""

from __future__ import annotations

import asyncio

from telephony.audio.pacer import Pacer


class Clock:
    def __init__(self) -> None:
        self.t = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.slept.append(round(s, 6))
        self.t += s


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_packets_leave_on_an_absolute_schedule_lead_packets_early():
    clock = Clock()
    pacer = Pacer(0.02, lead=2, clock=clock, sleep=clock.sleep)

    async def go():
        times = []
        for _ in range(6):
            await pacer.wait()
            times.append(round(clock.t - 100.0, 6))
            clock.t += 0.003  # the work of sending a packet does not push the schedule back
        return times
    assert run(go()) == [0.0, 0.003, 0.006, 0.02, 0.04, 0.06]  # lead packets at once, then on time


def test_a_stall_reanchors_instead_of_bursting_and_numbers_keep_counting():
    clock = Clock()
    pacer = Pacer(0.02, clock=clock, sleep=clock.sleep)

    async def go():
        nums = [await pacer.wait() for _ in range(3)]
        clock.t += 0.5  # the event loop was blocked for half a second
        nums.append(await pacer.wait())  # due now: no sleep
        start = clock.t
        nums.append(await pacer.wait())  # then one period later, not a burst of 25 packets
        return nums, round(clock.t - start, 6)
    nums, gap = run(go())
    assert nums == [0, 1, 2, 3, 4] and gap == 0.02 and pacer.reanchored == 1
