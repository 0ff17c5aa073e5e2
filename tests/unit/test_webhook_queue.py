"""The webhook signature and the queue on disk, on their own (no server, no network)."""

from __future__ import annotations

import hashlib
import hmac
import random
import sqlite3

import pytest

from server.webhooks.policy import backoff, classify
from server.webhooks.queue import WebhookQueue
from server.webhooks.signing import signature, verify

SECRET = b"k" * 32


# ---- signing ------------------------------------------------------------------------------------------

def test_signature_is_hmac_sha256_over_time_dot_body():
    body = b'{"event":"call_end","call_id":"x"}'
    header = signature(SECRET, body, t=1700000000)
    want = hmac.new(SECRET, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={want}"
    assert verify(SECRET, header, body, now=1700000000)


def test_verify_refuses_tampering_other_keys_replays_and_junk():
    body = b'{"a":1}'
    header = signature(SECRET, body, t=1700000000)
    assert not verify(SECRET, header, b'{"a":2}', now=1700000000)  # body changed
    assert not verify(b"x" * 32, header, body, now=1700000000)  # another secret
    assert not verify(SECRET, header, body, now=1700000000 + 301)  # outside the replay window
    assert not verify(SECRET, header, body, now=1700000000 - 301)  # from the future
    assert verify(SECRET, header, body, now=1700000000 + 299)
    # the time is inside the MAC: moving it to pass the window breaks the signature
    moved = header.replace("t=1700000000", "t=1700000290")
    assert not verify(SECRET, moved, body, now=1700000290)
    for junk in (None, "", "v1=abc", "t=abc,v1=" + "0" * 64, "t=1700000000", "garbage"):
        assert not verify(SECRET, junk, body, now=1700000000)
    # a rotation: two v1 entries, one of them from the current key
    rotated = header + ",v1=" + "0" * 64
    assert verify(SECRET, rotated, body, now=1700000000)


# ---- policy -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status,action,reason", [
    (200, "delivered", ""), (204, "delivered", ""), (500, "retry", "status_5xx"), (503, "retry", "status_5xx"),
    (408, "retry", "status_408"), (429, "retry", "status_429"), (400, "dead", "status_4xx"),
    (401, "dead", "status_4xx"), (404, "dead", "status_4xx"), (301, "dead", "redirect")])
def test_what_each_answer_means(status, action, reason):
    out = classify(status)
    assert (out.action, out.reason) == (action, reason)


def test_no_answer_retries_and_retry_after_is_read():
    assert (classify(None, "timeout").action, classify(None, "timeout").reason) == ("retry", "timeout")
    assert classify(None, "connect").reason == "connect"
    assert classify(429, retry_after="7").retry_after_s == 7.0
    assert classify(503, retry_after="Wed, 21 Oct 2015 07:28:00 GMT").retry_after_s is None


def test_backoff_doubles_with_jitter_up_to_the_cap():
    rng = random.Random(1)
    for attempts, full in ((1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0), (40, 60.0)):
        delays = [backoff(attempts, 2.0, 60.0, rng) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays), (attempts, min(delays), max(delays))
        assert max(delays) - min(delays) > full / 4  # jittered, not in step


# ---- the queue ----------------------------------------------------------------------------------------

def test_enqueue_is_idempotent_per_key_and_due_in_order(tmp_path):
    q = WebhookQueue(tmp_path / "state" / "wh.sqlite3", max_size=100)
    assert q.enqueue("x", "call_end", b"", now=0.0)[0]
    assert q.enqueue("c1:call_end", "call_end", b"one", now=100.0)[0]
    added, _ = q.enqueue("c1:call_end", "call_end", b"again", now=101.0)
    assert not added  # the same call's same event: stored once
    q.enqueue("c2:call_end", "call_end", b"two", now=102.0)
    assert q.pending == 3
    due = q.due(now=101.5, limit=10)
    assert [e.key for e in due] == ["x", "c1:call_end"] and due[1].body == b"one"
    assert [e.key for e in q.due(now=200, limit=10, exclude={due[0].id})] == ["c1:call_end", "c2:call_end"]
    assert q.due(now=200, limit=1)[0].key == "x"


def test_retry_reschedules_and_delivered_deletes(tmp_path):
    q = WebhookQueue(tmp_path / "wh.sqlite3", max_size=100)
    q.enqueue("a:call_end", "call_end", b"a", now=10.0)
    (ev,) = q.due(now=10.0, limit=5)
    q.retry(ev.id, next_at=50.0, error="status_5xx")
    assert q.due(now=49.0, limit=5) == [] and q.next_due() == 50.0
    (again,) = q.due(now=50.0, limit=5)
    assert again.attempts == 1
    assert q.next_due(exclude={again.id}) is None
    assert q.delivered(again.id) and q.pending == 0 and q.next_due() is None
    assert not q.delivered(again.id)  # already gone: no double count
    assert q.pending == 0


def test_dead_letters_are_kept_and_never_due(tmp_path):
    q = WebhookQueue(tmp_path / "wh.sqlite3", max_size=100)
    q.enqueue("a:call_end", "call_end", b"a", now=10.0)
    (ev,) = q.due(now=10.0, limit=5)
    assert q.dead_letter(ev.id, "status_4xx")
    assert (q.pending, q.dead) == (0, 1)
    assert q.due(now=1e12, limit=5) == [] and q.next_due() is None
    (row,) = q.rows(dead=True)
    assert row["key"] == "a:call_end" and row["last_error"] == "status_4xx" and row["attempts"] == 1


def test_bound_evicts_dead_letters_first_then_the_oldest_pending(tmp_path):
    q = WebhookQueue(tmp_path / "wh.sqlite3", max_size=5)
    for i in range(3):
        q.enqueue(f"d{i}:call_end", "call_end", b"d", now=float(i))
    for ev in q.due(now=10, limit=10):
        q.dead_letter(ev.id, "status_4xx")
    for i in range(2):
        q.enqueue(f"p{i}:call_end", "call_end", b"p", now=20.0 + i)
    assert (q.pending, q.dead) == (2, 3)
    _, evicted = q.enqueue("p2:call_end", "call_end", b"p", now=30.0)
    assert (evicted.dead, evicted.pending) == (1, 0)  # the oldest dead letter made room
    _, evicted = q.enqueue("p3:call_end", "call_end", b"p", now=31.0)
    _, evicted2 = q.enqueue("p4:call_end", "call_end", b"p", now=32.0)
    assert (evicted.dead, evicted2.dead) == (1, 1) and q.dead == 0
    _, evicted = q.enqueue("p5:call_end", "call_end", b"p", now=33.0)
    assert (evicted.dead, evicted.pending) == (0, 1)  # no dead letter left: the oldest pending goes
    assert [r["key"] for r in q.rows()] == [f"p{i}:call_end" for i in range(1, 6)]
    assert q.pending + q.dead == 5


def test_reopened_queue_finds_what_was_committed(tmp_path):
    """Another process opening the file (the next start) sees committed events as they were;
    the file is WAL and owner-only. (`kill -9` of a real server: tests/e2e/test_webhooks.py.)"""
    path = tmp_path / "state" / "wh.sqlite3"
    first = WebhookQueue(path, max_size=10)
    first.enqueue("k:call_end", "call_end", b'{"x": 1}', now=5.0)
    first.enqueue("d:call_end", "call_end", b"d", now=6.0)
    first.dead_letter(first.due(now=6.0, limit=5, exclude={1})[0].id, "status_4xx")
    second = WebhookQueue(path, max_size=10)  # the first one is never closed
    (ev,) = second.due(now=5.0, limit=5)
    assert ev.key == "k:call_end" and ev.body == b'{"x": 1}' and (second.pending, second.dead) == (1, 1)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert path.stat().st_mode & 0o077 == 0 and path.parent.stat().st_mode & 0o077 == 0
