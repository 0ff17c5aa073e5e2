"""The campaign loop: dial due rows through the ops API at most `concurrency` at once and
`rate` per second, inside the calling window, one call per number at a time; follow each call
to its final state; schedule retries. Every change of a row is committed to the state store
before the next step relies on it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

import structlog

from server.cli.campaign_leads import DoNotCall
from server.cli.campaign_ops import CallStatus, CampaignAborted, OpsClient
from server.cli.campaign_state import ACTIVE, DIALING, DONE, PENDING, RowState, StateStore
from server.cli.campaign_timing import FINAL_STATES, RetryPolicy, Window

#: longest nap of the loop: it re-reads the clock at least this often (window, retries)
MAX_NAP_S = 30.0
#: seconds before an unreachable server is asked again about a call in flight
UNREACHABLE_POLL_S = 5.0


@dataclass(frozen=True)
class Settings:
    persona: str
    concurrency: int = 1
    rate: float = 1.0  # dials per second, at most
    policy: RetryPolicy = RetryPolicy()
    window: Window = Window.parse(None)
    caller: str | None = None  # the `from` of every call (None: the server's default)
    ring_timeout_s: float | None = None
    poll_s: float = 1.0  # how often a call in flight is looked up


def outcome_of(st: CallStatus) -> tuple[str, float | None]:
    """A final call state as a results outcome, with the talk time of an answered call. An
    answering machine (the server's verdict) is not a person reached: `machine`, retried."""
    if st.state == "ended":
        if st.answered_at is None:
            return "cancelled", None  # hung up (DELETE) before anyone answered
        end = st.ended_at if st.ended_at is not None else time.time()
        talk = round(max(0.0, end - st.answered_at), 3)
        return ("machine" if st.amd == "machine" else "completed"), talk
    return str(st.state), None


class Campaign:
    """One run over a store's rows. `stop()` (the signal handlers) ends it at the next step:
    no dial is cut in half, calls in progress go on and stay recorded as active, so the next
    run looks them up instead of dialling them again."""

    def __init__(self, store: StateStore, client: OpsClient, settings: Settings, dnc: DoNotCall,
                 clock: Callable[[], float] = time.time, local_now: Callable[[], datetime] = datetime.now):
        self.store, self.client, self.cfg, self.dnc = store, client, settings, dnc
        self.clock, self.local_now = clock, local_now
        self.rows = store.rows()
        self.log = structlog.get_logger("campaign").bind(persona=settings.persona)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._follow: dict[int, asyncio.Task] = {}  # row -> task following its call
        self._next_dial = 0.0
        self._capacity_until = 0.0
        self._capacity_refusals = 0
        self._window_logged = False
        self.dialled = 0  # POSTs that placed a call in this run
        self._aborted: CampaignAborted | None = None  # a refusal while following a call (401)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _save(self, st: RowState) -> None:
        st.updated_at = self.clock()
        self.store.save(st)

    def _settle_at_start(self) -> None:
        """Rows no dial may reach (not a number, do-not-call), and rows a previous run left half
        way: a POST whose answer was never recorded (a crash) could have placed a call, so it is
        not repeated: its outcome is `unknown` (look the number up in the server's records)."""
        for st in self.rows:
            if st.status == DONE:
                continue
            if st.status == PENDING and st.lead.key is None:
                st.status, st.outcome = DONE, "invalid"
            elif st.status == PENDING and st.lead.key in self.dnc:
                st.status, st.outcome = DONE, "dnc"
            elif st.status == DIALING:
                st.status, st.outcome = DONE, "unknown"
                self.log.warning("campaign_dial_unknown", row=st.lead.row, attempts=st.attempts)
            else:
                continue
            self._save(st)

    def summary(self) -> Counter:
        return Counter(st.outcome if st.status == DONE else st.status for st in self.rows)

    async def run(self) -> bool:
        """True when every row is done, False when stopped first."""
        self._settle_at_start()
        for st in self.rows:
            if st.status == ACTIVE:  # in flight when the last run stopped: look it up again
                self.log.info("campaign_recheck", row=st.lead.row, call_id=st.call_id)
                self._start_following(st)
        try:
            while not self.stopped:
                if self._aborted is not None:
                    raise self._aborted
                if all(st.status == DONE for st in self.rows):
                    return True
                nap = await self._step()
                if nap > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=min(nap, MAX_NAP_S))
                    except asyncio.TimeoutError:
                        pass
            return False
        finally:
            for task in self._follow.values():
                task.cancel()
            if self._follow:
                await asyncio.gather(*self._follow.values(), return_exceptions=True)

    def _due(self, now: float) -> tuple[RowState | None, float]:
        """The next row to dial now (None if none) and, when none, seconds until one may be due."""
        busy = {st.lead.key for st in self.rows if st.status in (ACTIVE, DIALING)}
        waits = []
        for st in self.rows:
            if st.status != PENDING or st.lead.key in busy:
                continue
            if st.next_at <= now:
                return st, 0.0
            waits.append(st.next_at - now)
        return None, min(waits) if waits else MAX_NAP_S

    async def _step(self) -> float:
        """Dial one row if everything allows it now; else how long to wait (s)."""
        now = self.clock()
        if len(self._follow) >= self.cfg.concurrency:
            return MAX_NAP_S  # a call ending wakes the loop
        st, wait = self._due(now)
        if st is None:
            return wait
        local = self.local_now()
        opens = self.cfg.window.next_open(local)
        if opens > local:
            if not self._window_logged:
                self.log.info("campaign_waiting_window", opens_at=opens.isoformat(timespec="minutes"))
                self._window_logged = True
            return (opens - local).total_seconds()
        self._window_logged = False
        gate = max(self._next_dial, self._capacity_until)
        if now < gate:
            return gate - now
        await self._dial(st)
        return 0.0

    async def _dial(self, st: RowState) -> None:
        st.status, st.attempts = DIALING, st.attempts + 1
        self._save(st)  # committed before the POST: a crash now leaves `dialing`, never a blind re-dial
        self._next_dial = self.clock() + 1.0 / self.cfg.rate
        try:
            got = await self.client.dial(st.lead.to, self.cfg.persona, st.lead.variables, self.cfg.caller,
                                         self.cfg.ring_timeout_s)
        except CampaignAborted:
            st.status, st.attempts = PENDING, st.attempts - 1  # refused before anything was placed
            self._save(st)
            raise
        if got.kind == "placed":
            self._capacity_refusals = 0
            st.status, st.call_id, st.outcome = ACTIVE, got.call_id, None
            self._save(st)
            self.dialled += 1
            self.log.info("campaign_dial", row=st.lead.row, call_id=got.call_id, attempt=st.attempts)
            self._start_following(st)
            return
        if got.kind in ("capacity", "unreachable"):
            # nothing was placed: not an attempt; the row waits for a slot (or the server)
            self._capacity_refusals += 1
            wait = self.cfg.policy.capacity_wait(self._capacity_refusals)
            self._capacity_until = self.clock() + wait
            st.status, st.attempts = PENDING, st.attempts - 1
            self._save(st)
            self.log.info("campaign_no_slot" if got.kind == "capacity" else "campaign_server_unreachable",
                          row=st.lead.row, retry_in_s=wait, detail=got.detail)
            return
        self.log.warning("campaign_dial_refused", row=st.lead.row, outcome=got.kind, detail=got.detail)
        self._finish(st, got.kind, None)

    def _finish(self, st: RowState, outcome: str, duration: float | None) -> None:
        """Record an attempt's outcome: done, or pending again at the retry time."""
        now = self.clock()
        again = self.cfg.policy.next_attempt(outcome, st.attempts, now)
        st.outcome, st.duration_s = outcome, duration
        st.status, st.next_at = (PENDING, again) if again is not None else (DONE, st.next_at)
        self._save(st)
        if again is not None:
            self.log.info("campaign_retry_scheduled", row=st.lead.row, outcome=outcome, attempts=st.attempts,
                          retry_in_s=round(again - now, 1))
        self._wake.set()

    def _start_following(self, st: RowState) -> None:
        task = asyncio.get_running_loop().create_task(self._follow_call(st))
        self._follow[st.lead.row] = task
        task.add_done_callback(lambda _t, row=st.lead.row: (self._follow.pop(row, None), self._wake.set()))

    async def _follow_call(self, st: RowState) -> None:
        """Poll the call until it reaches a final state; a call the server no longer knows (it
        restarted) ends as `unknown`: whether it was answered cannot be told, so it is not redialled."""
        assert st.call_id is not None
        warned = False
        while True:
            try:
                status = await self.client.status(st.call_id)
            except CampaignAborted as exc:
                self._aborted = exc
                self._wake.set()
                return
            if status.state in FINAL_STATES:
                outcome, duration = outcome_of(status)
                self.log.info("campaign_call_end", row=st.lead.row, call_id=st.call_id, outcome=outcome,
                              attempts=st.attempts, duration_s=duration, reason=status.reason)
                self._finish(st, outcome, duration)
                return
            if status.state is None and not status.unreachable:
                self.log.warning("campaign_call_unknown", row=st.lead.row, call_id=st.call_id)
                self._finish(st, "unknown", None)
                return
            if status.unreachable and not warned:
                self.log.warning("campaign_server_unreachable", row=st.lead.row, call_id=st.call_id)
                warned = True
            await asyncio.sleep(UNREACHABLE_POLL_S if status.unreachable else self.cfg.poll_s)
