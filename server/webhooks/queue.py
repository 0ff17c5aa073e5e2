"""The webhook queue on disk: one SQLite table, so an event outlives a restart or a `kill -9`.

An event is committed here before its first attempt; only a 2xx deletes it. WAL mode with
`synchronous=NORMAL`: a commit is in the WAL file when `enqueue` returns, which survives the
process being killed at any point (only the operating system crashing can lose the last commits
before a checkpoint). Two connections: the thread that saw a call end (the engine thread) only
inserts, on its own; the delivery worker reads and updates on the other, and moves the WAL
into the database (`checkpoint`, fsyncs included) on its own time. The inserting thread thus
never pays for a checkpoint (automatic checkpoints are off: measured, one costs tens of ms),
and no network I/O is ever done under either lock.

Bounded: at most `max_size` events are kept, dead letters included. Making room deletes the
oldest dead letters first, then the oldest events still pending; each deletion is reported
to the caller (counted by the service), never silent.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,           -- the idempotency key, <call_id>:<event>
    event TEXT NOT NULL,                -- call_end, call_start
    body BLOB NOT NULL,                 -- the JSON exactly as signed and sent
    created REAL NOT NULL,              -- Unix time it was enqueued
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,              -- Unix time of its next attempt
    dead INTEGER NOT NULL DEFAULT 0,    -- 1: a dead letter (kept, never tried again)
    last_error TEXT                     -- why the last attempt failed (a reason, no body)
);
CREATE INDEX IF NOT EXISTS events_due ON events (dead, next_at);
"""


@dataclass(frozen=True)
class QueuedEvent:
    id: int
    key: str
    event: str
    body: bytes
    created: float
    attempts: int


@dataclass(frozen=True)
class Evicted:
    """Events deleted unsent to make room: `dead` dead letters, `pending` not yet delivered."""

    dead: int = 0
    pending: int = 0


class WebhookQueue:
    def __init__(self, path: Path, max_size: int):
        self.path = Path(path)
        self.max_size = max_size
        # owner-only: events hold transcripts and call variables (personal data)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        self._lock = threading.Lock()  # the worker's connection, and the counts below
        self._in_lock = threading.Lock()  # the producer's connection
        self._db = self._connect()
        self._db.executescript(SCHEMA)
        self._in = self._connect()
        (self.pending,) = self._db.execute("SELECT COUNT(*) FROM events WHERE dead = 0").fetchone()
        (self.dead,) = self._db.execute("SELECT COUNT(*) FROM events WHERE dead = 1").fetchone()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=10, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA wal_autocheckpoint=0")  # the worker checkpoints (`checkpoint`)
        return db

    def close(self) -> None:
        self.checkpoint()
        with self._in_lock:
            self._in.close()
        with self._lock:
            self._db.close()

    def checkpoint(self) -> None:
        """Move what the WAL holds into the database file (the worker, now and then)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # -- the producer ------------------------------------------------------------------------------
    def enqueue(self, key: str, event: str, body: bytes, now: float) -> tuple[bool, Evicted]:
        """Store an event, due at once. False when its key is already there (the same event of
        the same call: stored once). Returns what was deleted to stay within `max_size`."""
        with self._in_lock:
            db = self._in
            db.execute("BEGIN IMMEDIATE")
            try:
                cur = db.execute("INSERT OR IGNORE INTO events (key, event, body, created, next_at) "
                                 "VALUES (?, ?, ?, ?, ?)", (key, event, body, now, now))
                added = cur.rowcount == 1
                evicted = Evicted()
                (total,) = db.execute("SELECT COUNT(*) FROM events").fetchone() if added else (0,)
                if total > self.max_size:
                    evicted = self._evict(db, total - self.max_size)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        with self._lock:
            self.pending += int(added) - evicted.pending
            self.dead -= evicted.dead
        return added, evicted

    @staticmethod
    def _evict(db: sqlite3.Connection, n: int) -> Evicted:
        dead = db.execute("DELETE FROM events WHERE id IN (SELECT id FROM events WHERE dead = 1 "
                          "ORDER BY id LIMIT ?)", (n,)).rowcount
        pending = 0
        if n > dead:
            pending = db.execute("DELETE FROM events WHERE id IN (SELECT id FROM events WHERE dead = 0 "
                                 "ORDER BY id LIMIT ?)", (n - dead,)).rowcount
        return Evicted(dead, pending)

    # -- the delivery worker -----------------------------------------------------------------------
    def due(self, now: float, limit: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[QueuedEvent]:
        """Pending events whose time has come, oldest schedule first, not those in `exclude`
        (attempts in flight)."""
        if limit <= 0:
            return []
        skip = ",".join("?" * len(exclude))
        where = "dead = 0 AND next_at <= ?" + (f" AND id NOT IN ({skip})" if exclude else "")
        with self._lock:
            rows = self._db.execute(f"SELECT id, key, event, body, created, attempts FROM events WHERE {where} "
                                    "ORDER BY next_at, id LIMIT ?", (now, *exclude, limit)).fetchall()
        return [QueuedEvent(r[0], r[1], r[2], bytes(r[3]), r[4], r[5]) for r in rows]

    def next_due(self, exclude: set[int] | frozenset[int] = frozenset()) -> float | None:
        """When the next pending event (not in `exclude`) is due; None when none is pending."""
        skip = ",".join("?" * len(exclude))
        where = "dead = 0" + (f" AND id NOT IN ({skip})" if exclude else "")
        with self._lock:
            (at,) = self._db.execute(f"SELECT MIN(next_at) FROM events WHERE {where}", tuple(exclude)).fetchone()
        return at

    def delivered(self, event_id: int) -> bool:
        """Delete a delivered event (False: it was no longer there, e.g. evicted meanwhile)."""
        with self._lock:
            gone = self._db.execute("DELETE FROM events WHERE id = ? AND dead = 0", (event_id,)).rowcount == 1
            self.pending -= int(gone)
        return gone

    def retry(self, event_id: int, next_at: float, error: str) -> None:
        with self._lock:
            self._db.execute("UPDATE events SET attempts = attempts + 1, next_at = ?, last_error = ? "
                             "WHERE id = ? AND dead = 0", (next_at, error, event_id))

    def dead_letter(self, event_id: int, error: str) -> bool:
        """Keep an event but never try it again (False: it was no longer pending)."""
        with self._lock:
            moved = self._db.execute("UPDATE events SET attempts = attempts + 1, dead = 1, last_error = ? "
                                     "WHERE id = ? AND dead = 0", (error, event_id)).rowcount == 1
            self.pending -= int(moved)
            self.dead += int(moved)
        return moved

    # -- operators and tests -----------------------------------------------------------------------
    def rows(self, dead: bool | None = None) -> list[dict]:
        """Every event's bookkeeping (no body), oldest first."""
        where = "" if dead is None else f"WHERE dead = {int(dead)}"
        with self._lock:
            cur = self._db.execute(f"SELECT id, key, event, created, attempts, next_at, dead, last_error "
                                   f"FROM events {where} ORDER BY id")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]
