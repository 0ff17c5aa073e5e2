"""The campaign's own state file (sqlite3, WAL): every row's status, attempts and call id,
committed before and after each dial, so a campaign stopped by a signal, a crash or a reboot
resumes where it was, and a call that was in flight is looked up again, not dialled again."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from agent.errors import BadInput
from server.cli.campaign_leads import Lead

#: a row's life: waiting to be dialled (at `next_at`), a POST under way (no call id yet), a call
#: placed (its id known), finished (its outcome final)
PENDING, DIALING, ACTIVE, DONE = "pending", "dialing", "active", "done"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leads (
    row INTEGER PRIMARY KEY,
    dest TEXT NOT NULL,
    number_key TEXT,
    variables TEXT NOT NULL,
    status TEXT NOT NULL,
    outcome TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    call_id TEXT,
    duration_s REAL,
    updated_at REAL
);
"""


@dataclass
class RowState:
    """One lead and where the campaign stands with it."""

    lead: Lead
    status: str = PENDING
    outcome: str | None = None  # the latest attempt's outcome (final once status is DONE)
    attempts: int = 0  # dials the server accepted (or may have: see DIALING on resume)
    next_at: float = 0.0  # epoch seconds before which it is not dialled
    call_id: str | None = None
    duration_s: float | None = None
    updated_at: float | None = None


class StateStore:
    """One campaign per file. `open` creates it for a list, or resumes it when it already holds
    the same list (same rows, same persona); another list's state file is refused."""

    def __init__(self, path: Path, conn: sqlite3.Connection):
        self.path = path
        self._db = conn

    @classmethod
    def open(cls, path: Path, leads: list[Lead], meta: dict[str, str]) -> tuple["StateStore", bool]:
        """The store and whether it resumes an earlier run. `meta` (the list's fingerprint, the
        persona) must equal what the file recorded."""
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=5.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a committed dial survives a power cut too
        conn.executescript(_SCHEMA)
        store = cls(path, conn)
        known = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if known:
            for k, v in meta.items():
                if known.get(k) != v:
                    conn.close()
                    raise BadInput(f"the state file {path} belongs to another campaign ({k} differs); "
                                   "give this one its own --state, or delete that file to start over")
            return store, True
        with store._tx():
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", sorted(meta.items()))
            conn.executemany(
                "INSERT INTO leads (row, dest, number_key, variables, status) VALUES (?, ?, ?, ?, ?)",
                [(ld.row, ld.to, ld.key, json.dumps(ld.variables), PENDING) for ld in leads])
        return store, False

    def _tx(self):
        return _Transaction(self._db)

    def rows(self) -> list[RowState]:
        out = []
        for (row, dest, key, variables, status, outcome, attempts, next_at, call_id, duration_s,
             updated_at) in self._db.execute(
                "SELECT row, dest, number_key, variables, status, outcome, attempts, next_at, call_id, "
                "duration_s, updated_at FROM leads ORDER BY row"):
            out.append(RowState(Lead(row, dest, key, json.loads(variables)), status, outcome, attempts, next_at,
                                call_id, duration_s, updated_at))
        return out

    def save(self, st: RowState) -> None:
        """Commit one row's state (durably: the dial that follows relies on it)."""
        with self._tx():
            self._db.execute(
                "UPDATE leads SET status=?, outcome=?, attempts=?, next_at=?, call_id=?, duration_s=?, updated_at=? "
                "WHERE row=?", (st.status, st.outcome, st.attempts, st.next_at, st.call_id, st.duration_s,
                                st.updated_at, st.lead.row))

    def meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def close(self) -> None:
        self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): autocommit mode with explicit bounds."""

    def __init__(self, conn: sqlite3.Connection):
        self._db = conn

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
