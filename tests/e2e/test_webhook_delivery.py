"""The delivery worker against a real aiohttp receiver on 127.0.0.1 (real sockets and real waits,
hence not a unit test): the queue, the policy and
the signature together, at the speed of short backoffs (no server process; the same paths
through the real server: tests/e2e/test_webhooks.py)."""

from __future__ import annotations

import json
import time

import pytest

from agent.metrics import Metrics
from server.webhooks.delivery import Deliverer, DeliverySettings
from server.webhooks.queue import WebhookQueue
from tests.support import poll
from tests.support.webhook_receiver import Receiver

SECRET = b"s" * 32


@pytest.fixture
def receiver():
    r = Receiver(SECRET).start()
    yield r
    r.close()


class Worker:
    """A queue on disk and a started deliverer posting to `url`."""

    def __init__(self, path, url: str, **settings):
        self.metrics = Metrics()
        self.queue = WebhookQueue(path, settings.pop("max_queue", 1000))
        opts = dict(timeout_s=2.0, max_age_s=3600, retry_base_s=0.05, retry_max_s=0.2, concurrency=4)
        opts.update(settings)
        self.deliverer = Deliverer(self.queue, DeliverySettings({"call_end": url}, SECRET, **opts), self.metrics)
        self.deliverer.start()

    def put(self, call_id: str, **fields) -> str:
        body = json.dumps({"event": "call_end", "call_id": call_id, **fields}).encode()
        self.queue.enqueue(f"{call_id}:call_end", "call_end", body, time.time())
        self.deliverer.update_gauges()
        self.deliverer.wake()
        return f"{call_id}:call_end"

    def value(self, name: str, **labels) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def stop(self, drain_s: float = 0.0) -> int:
        return self.deliverer.stop(drain_s)


@pytest.fixture
def worker(tmp_path, receiver):
    made = []

    def make(**settings) -> Worker:
        w = Worker(tmp_path / "state" / "webhooks.sqlite3", receiver.url, **settings)
        made.append(w)
        return w
    yield make
    for w in made:
        w.stop()


def test_delivered_once_signed_with_its_idempotency_key(worker, receiver):
    w = worker()
    key = w.put("call-1", transcript=[{"who": "agent", "text": "hello"}])
    (got,) = poll(lambda: receiver.delivered(), bool, 10)
    assert got.valid and got.key == key == "call-1:call_end" and got.event == "call_end" and got.attempt == 1
    assert got.json["transcript"] == [{"who": "agent", "text": "hello"}]
    assert poll(lambda: w.queue.pending, lambda n: n == 0, 5) == 0
    assert w.value("personaplex_webhooks_delivered_total", event="call_end") == 1
    assert w.value("personaplex_webhooks_queue_depth") == 0
    assert len(receiver.of(key)) == 1  # and nothing more: a 2xx deleted it


def test_500s_are_retried_until_accepted(worker, receiver):
    w = worker()
    receiver.answer(500, 503)
    key = w.put("call-2")
    assert len(poll(lambda: receiver.delivered(), bool, 10)) == 1
    attempts = receiver.of(key)
    assert [r.status for r in attempts] == [500, 503, 200] and [r.attempt for r in attempts] == [1, 2, 3]
    assert all(r.valid for r in attempts)  # each attempt signed anew
    assert w.value("personaplex_webhooks_failed_total", reason="status_5xx") == 2
    assert poll(lambda: w.queue.pending, lambda n: n == 0, 5) == 0


def test_a_hang_past_the_timeout_is_retried(worker, receiver):
    w = worker(timeout_s=0.5)
    receiver.answer("hang")
    key = w.put("call-3")
    assert len(poll(lambda: receiver.delivered(), bool, 10)) == 1
    assert [r.status for r in receiver.of(key)] == [None, 200]
    assert w.value("personaplex_webhooks_failed_total", reason="timeout") == 1


def test_a_400_is_dead_lettered_and_never_retried(worker, receiver):
    w = worker()
    receiver.answer(400)
    key = w.put("call-4")
    assert poll(lambda: w.queue.dead, lambda n: n == 1, 10) == 1
    assert w.queue.pending == 0 and w.queue.next_due() is None  # nothing left that could be tried again
    assert [r.status for r in receiver.of(key)] == [400]
    (row,) = w.queue.rows(dead=True)
    assert row["key"] == key and row["last_error"] == "status_4xx"
    assert w.value("personaplex_webhooks_dead_lettered_total", reason="rejected") == 1
    assert w.value("personaplex_webhooks_dead_letters") == 1


def test_429_waits_as_long_as_the_receiver_asks(worker, receiver):
    w = worker(retry_max_s=5.0)
    receiver.answer(429)  # with Retry-After: 1
    key = w.put("call-5")
    assert len(poll(lambda: receiver.delivered(), bool, 10)) == 1
    first, second = receiver.of(key)
    assert first.status == 429 and second.at - first.at >= 0.95  # not the 0.05 s backoff


def test_receiver_down_for_a_while_then_up_gets_it_late_once(worker, receiver):
    receiver.stop()
    w = worker()
    key = w.put("call-6")
    # retried while down: connection refused, several times
    assert poll(lambda: w.value("personaplex_webhooks_failed_total", reason="connect"), lambda n: n >= 3, 10) >= 3
    assert w.queue.pending == 1
    receiver.start()
    (got,) = poll(lambda: receiver.delivered(), bool, 10)
    assert got.key == key and got.valid and got.attempt >= 4
    assert poll(lambda: w.queue.pending, lambda n: n == 0, 5) == 0 and len(receiver.of(key)) == 1


def test_an_event_older_than_max_age_is_dead_lettered(worker, receiver):
    receiver.mode = 500
    w = worker(max_age_s=0.3)
    w.put("call-7")
    assert poll(lambda: w.queue.dead, lambda n: n == 1, 10) == 1
    assert w.value("personaplex_webhooks_dead_lettered_total", reason="expired") == 1
    assert len(receiver.requests) >= 2  # retried until then


def test_drain_waits_then_leaves_the_rest_for_the_next_start(tmp_path, receiver):
    receiver.mode = "hang"
    path = tmp_path / "webhooks.sqlite3"
    w = Worker(path, receiver.url, timeout_s=10.0)
    key = w.put("call-8")
    poll(lambda: receiver.of(key), bool, 10)
    t0 = time.monotonic()
    assert w.stop(drain_s=0.5) == 1  # still pending: left on disk
    assert time.monotonic() - t0 < 3.0  # not the 10 s timeout
    w.queue.close()
    receiver.mode = "ok"
    nxt = Worker(path, receiver.url)
    try:
        assert len(poll(lambda: receiver.delivered(), bool, 10)) == 1
        assert [r.key for r in receiver.of(key)] == [key, key]  # the same key, again, after the restart
    finally:
        nxt.stop()


def test_1000_calls_with_a_slow_receiver_all_delivered_once_within_the_bound(worker, receiver):
    receiver.mode, receiver.delay_s = "slow", 0.01
    w = worker(max_queue=1000, concurrency=4)
    keys = [w.put(f"call-{i:04d}") for i in range(1000)]
    assert w.queue.pending + len(receiver.delivered()) >= 1000 - 4  # enqueued faster than it drains
    assert poll(lambda: len(receiver.delivered()), lambda n: n >= 1000, 60) == 1000
    delivered = [r.key for r in receiver.delivered()]
    assert sorted(delivered) == keys  # each once, none lost
    assert all(r.valid for r in receiver.delivered())
    assert poll(lambda: w.queue.pending, lambda n: n == 0, 5) == 0
    assert w.value("personaplex_webhooks_evicted_total", was="pending") == 0


def test_over_the_bound_the_oldest_are_evicted_and_counted(worker, receiver):
    receiver.mode = "hang"  # nothing gets through while the queue fills
    w = worker(max_queue=100, concurrency=1, timeout_s=30.0)
    evicted = 0
    for i in range(250):
        body = json.dumps({"event": "call_end", "call_id": f"c{i}"}).encode()
        _, ev = w.queue.enqueue(f"c{i}:call_end", "call_end", body, time.time())
        evicted += ev.pending
    assert w.queue.pending == 100 and evicted == 150
    assert [r["key"] for r in w.queue.rows()] == [f"c{i}:call_end" for i in range(150, 250)]  # the newest kept
