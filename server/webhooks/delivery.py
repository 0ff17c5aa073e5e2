"""The delivery worker: one thread with its own asyncio loop and aiohttp client.

It never runs on the engine thread and never on the server's event loop: a receiver that hangs
costs this thread a connection slot (`concurrency` attempts in flight at most) and nothing
else. It takes due events from the queue, posts each signed with the attempt's time, and
applies `policy` to the answer. The thread that enqueues wakes it (`wake`); otherwise it sleeps
until the next event's retry time.

`stop(drain_s)` (a SIGTERM): attempts go on for up to `drain_s` while something is in flight or
due within it; whatever is left stays in the queue for the next start. An attempt cut off then
may have reached the receiver, which then sees the event again later with the same key.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping

import aiohttp
import structlog

from agent.metrics import Metrics
from server.webhooks.policy import Outcome, backoff, classify
from server.webhooks.queue import QueuedEvent, WebhookQueue
from server.webhooks.signing import EVENT_HEADER, IDEMPOTENCY_HEADER, SIGNATURE_HEADER, signature

log = structlog.get_logger(__name__)

#: the longest the worker sleeps without being woken (the queue's schedule is read anyway)
IDLE_POLL_S = 5.0
USER_AGENT = "personaplex-agent-webhooks/1"
#: how often the worker moves the queue's WAL into its database file
CHECKPOINT_S = 2.0


@dataclass(frozen=True)
class DeliverySettings:
    urls: Mapping[str, str]  # event ("call_end", "call_start") -> URL; an event without one waits
    secret: bytes = field(repr=False)
    timeout_s: float = 10.0
    max_age_s: float = 86400.0
    retry_base_s: float = 2.0
    retry_max_s: float = 600.0
    concurrency: int = 4


class Deliverer:
    def __init__(self, queue: WebhookQueue, settings: DeliverySettings, metrics: Metrics,
                 rng: random.Random | None = None):
        self.queue = queue
        self.settings = settings
        self.metrics = metrics
        self.rng = rng or random.Random()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self._drain_deadline: float | None = None
        self.update_gauges()

    # -- any thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def wake(self) -> None:
        """Something was enqueued: look at the queue now (never blocks)."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the worker's loop has closed (stopping)
                pass

    def stop(self, drain_s: float) -> int:
        """Deliver what is due for up to `drain_s`, then stop; returns the events left pending."""
        if self._thread is not None and self._loop is not None:
            deadline = time.time() + drain_s
            try:
                self._loop.call_soon_threadsafe(self._begin_drain, deadline)
            except RuntimeError:
                pass
            self._thread.join(drain_s + 5.0)
            self._thread = None
        return self.queue.pending

    def update_gauges(self) -> None:
        self.metrics.webhooks_queue_depth.set(self.queue.pending)
        self.metrics.webhooks_dead_letters.set(self.queue.dead)

    # -- the worker thread --------------------------------------------------------------------------
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except Exception:
            log.exception("webhook_worker_failed")
        finally:
            self._loop = None
            self._ready.set()
            loop.close()

    def _begin_drain(self, deadline: float) -> None:
        self._drain_deadline = deadline
        if self._wake is not None:
            self._wake.set()

    async def _main(self) -> None:
        s = self.settings
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        inflight: dict[int, asyncio.Task] = {}

        def finished(event_id: int) -> None:
            inflight.pop(event_id, None)
            self._wake.set()

        timeout = aiohttp.ClientTimeout(total=s.timeout_s)
        checkpointed = time.monotonic()
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=s.concurrency),
                                         headers={"User-Agent": USER_AGENT}) as http:
            while True:
                if time.monotonic() - checkpointed >= CHECKPOINT_S:
                    self.queue.checkpoint()  # here, never on the thread that enqueues
                    checkpointed = time.monotonic()
                now = time.time()
                deadline = self._drain_deadline
                if deadline is not None:
                    soonest = self.queue.next_due(set(inflight))
                    if now >= deadline or (not inflight and (soonest is None or soonest > deadline)):
                        break
                for ev in self.queue.due(now, s.concurrency - len(inflight), set(inflight)):
                    task = asyncio.create_task(self._attempt(http, ev))
                    inflight[ev.id] = task
                    task.add_done_callback(lambda _t, i=ev.id: finished(i))
                if len(inflight) >= s.concurrency:
                    wait = IDLE_POLL_S  # a finished attempt wakes us
                else:
                    soonest = self.queue.next_due(set(inflight))
                    wait = IDLE_POLL_S if soonest is None else min(IDLE_POLL_S, max(0.0, soonest - time.time()))
                wait = min(wait, CHECKPOINT_S)
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - time.time()))
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
                self._wake.clear()
            for task in inflight.values():
                task.cancel()
            await asyncio.gather(*inflight.values(), return_exceptions=True)

    async def _attempt(self, http: aiohttp.ClientSession, ev: QueuedEvent) -> None:
        url = self.settings.urls.get(ev.event)
        if not url:  # this config sends no such event: keep it for one that does
            self.queue.retry(ev.id, time.time() + self.settings.retry_max_s, "no_url")
            return
        headers = {"Content-Type": "application/json", EVENT_HEADER: ev.event, IDEMPOTENCY_HEADER: ev.key,
                   SIGNATURE_HEADER: signature(self.settings.secret, ev.body),
                   "X-PersonaPlex-Attempt": str(ev.attempts + 1)}
        status: int | None = None
        failure: str | None = None
        retry_after: str | None = None
        try:
            async with http.post(url, data=ev.body, headers=headers, allow_redirects=False) as resp:
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except TimeoutError:
            failure = "timeout"
        except (aiohttp.ClientError, OSError):
            failure = "connect"
        self._record(ev, classify(status, failure, retry_after), status)

    def _record(self, ev: QueuedEvent, outcome: Outcome, status: int | None) -> None:
        s = self.settings
        attempt = ev.attempts + 1
        if outcome.action == "delivered":
            self.queue.delivered(ev.id)
            self.metrics.webhooks_delivered.labels(ev.event).inc()
            log.info("webhook_delivered", key=ev.key, attempt=attempt, status=status)
        else:
            self.metrics.webhooks_failed.labels(outcome.reason).inc()
            now = time.time()
            if outcome.action == "dead":
                self._dead(ev, "rejected", outcome.reason, status)
            elif now - ev.created > s.max_age_s:
                self._dead(ev, "expired", outcome.reason, status)
            else:
                delay = backoff(attempt, s.retry_base_s, s.retry_max_s, self.rng)
                if outcome.retry_after_s is not None:
                    delay = min(max(delay, outcome.retry_after_s), s.retry_max_s)
                self.queue.retry(ev.id, now + delay, outcome.reason)
                log.warning("webhook_retry", key=ev.key, attempt=attempt, reason=outcome.reason, status=status,
                            retry_in_s=round(delay, 2))
        self.update_gauges()

    def _dead(self, ev: QueuedEvent, why: str, reason: str, status: int | None) -> None:
        if self.queue.dead_letter(ev.id, reason):
            self.metrics.webhooks_dead_lettered.labels(why).inc()
            log.warning("webhook_dead_lettered", key=ev.key, attempts=ev.attempts + 1, why=why, reason=reason,
                        status=status)
