"""The results CSV: one line per input row, in input order, rewritten whole (atomically) at the
end of every run, so it always matches the state file, interrupted runs included."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from server.cli.campaign_state import DONE, RowState

COLUMNS = ["number", "outcome", "attempts", "duration_s", "call_id"]


def outcome_column(st: RowState) -> str:
    """The final outcome, or where an unfinished row stands (`pending`, `active`)."""
    return (st.outcome or "") if st.status == DONE else st.status


def write_results(path: Path, rows: list[RowState], variables: list[str]) -> None:
    """Write through a temporary file and rename: a reader never sees half a file. Variable
    columns that clash with ours are prefixed `var_`."""
    names = [v if v not in COLUMNS else f"var_{v}" for v in variables]
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS + names)
        for st in rows:
            duration = "" if st.duration_s is None else f"{st.duration_s:.1f}"
            w.writerow([st.lead.to, outcome_column(st), st.attempts, duration, st.call_id or ""]
                       + [st.lead.variables.get(v, "") for v in variables])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
