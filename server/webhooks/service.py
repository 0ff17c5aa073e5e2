"""The webhooks as the runtime sees them: a call-start hook, a queue, a worker, a drain.

`attach` (a scheduler `on_call_start` hook) enqueues `call_start` at once and `call_end` when the
call's `Ended` event comes, on the thread that emits it (the engine thread): the event is on
disk before the call's end has been handed to anyone else, and nothing there waits on the
network. The delivery worker is woken and does the rest on its own thread.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import structlog

from agent.calls.events import CallEvent, Ended
from agent.calls.session import CallSession
from agent.metrics import Metrics
from server.webhooks import payload
from server.webhooks.delivery import Deliverer, DeliverySettings
from server.webhooks.queue import WebhookQueue

log = structlog.get_logger(__name__)

QUEUE_FILE = "webhooks.sqlite3"


class Webhooks:
    def __init__(self, cfg, state_dir: Path, secret: str, metrics: Metrics, keep_text: bool = True,
                 recording_paths: Callable[[CallSession], dict | None] | None = None):
        """`cfg`: the `webhooks` section (server.config.WebhooksConfig); `secret`: the signing key."""
        self.cfg = cfg
        self.metrics = metrics
        self.keep_text = keep_text
        self.recording_paths = recording_paths
        self.queue = WebhookQueue(Path(state_dir) / QUEUE_FILE, cfg.max_queue)
        self.urls = {name: target.url for name, target in (("call_end", cfg.call_end), ("call_start", cfg.call_start))
                     if target.url}
        self.deliverer = Deliverer(self.queue, DeliverySettings(
            self.urls, secret.encode(), timeout_s=cfg.timeout_s, max_age_s=cfg.max_age_s,
            retry_base_s=cfg.retry_base_s, retry_max_s=cfg.retry_max_s, concurrency=cfg.concurrency), metrics)

    def start(self) -> None:
        self.deliverer.start()
        log.info("webhooks_started", events=sorted(self.urls), pending=self.queue.pending,
                 dead_letters=self.queue.dead, queue=str(self.queue.path))

    def stop(self, drain_s: float) -> int:
        """Deliver what is due for up to `drain_s`, then close; returns the events left for the
        next start (blocking: call it off the event loop)."""
        left = self.deliverer.stop(drain_s)
        self.queue.close()
        log.info("webhooks_stopped", left_pending=left, dead_letters=self.queue.dead)
        return left

    # -- calls ----------------------------------------------------------------------------------------
    def attach(self, sess: CallSession) -> None:
        """A scheduler `on_call_start` hook. A placed call's call_end is subscribed when it is
        dialled (`attach_dialled`): a call nobody answers never starts, and has its call_end too."""
        if "call_start" in self.urls:
            self._enqueue(sess, payload.call_start(sess))
        if "call_end" in self.urls and sess.direction != "outbound":
            sess.subscribe(lambda ev: self._on_event(sess, ev))

    def attach_dialled(self, sess: CallSession) -> None:
        """An outbound call's dial hook (telephony.outbound.Outbound.on_dial): its call_end, with
        the final state (busy, no_answer, declined, failed, ended), whether or not it was answered."""
        if "call_end" in self.urls:
            sess.subscribe(lambda ev: self._on_event(sess, ev))

    def _on_event(self, sess: CallSession, ev: CallEvent) -> None:
        if isinstance(ev, Ended):
            recording = self.recording_paths(sess) if self.recording_paths is not None else None
            self._enqueue(sess, payload.call_end(sess, ev.reason, self.keep_text, recording))

    def _enqueue(self, sess: CallSession, body: dict) -> None:
        event = body["event"]
        added, evicted = self.queue.enqueue(f"{sess.call_id}:{event}", event, payload.encode(body), time.time())
        if evicted.dead or evicted.pending:
            self.metrics.webhooks_evicted.labels("dead").inc(evicted.dead)
            self.metrics.webhooks_evicted.labels("pending").inc(evicted.pending)
            sess.log.warning("webhooks_evicted", dead=evicted.dead, pending=evicted.pending,
                             max_queue=self.queue.max_size)
        if added:
            sess.log.info("webhook_queued", webhook=event)
        self.deliverer.update_gauges()
        self.deliverer.wake()
