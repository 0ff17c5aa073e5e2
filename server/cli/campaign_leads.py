"""A campaign's input: the leads CSV (a `number` column, every other column a call variable) and
the do-not-call list, both read into plain values before anything is dialled, so a malformed file
stops the campaign at its start rather than halfway through the day."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import BadInput
from agent.personas.numbers import lookup_keys, normalize_number

NUMBER_COLUMN = "number"


@dataclass(frozen=True)
class Lead:
    """One row of the list. `key` is the normalised number: what duplicates and the do-not-call
    list are matched on; `to` is the number as written, which the server normalises itself (a
    SIP URI keeps its host)."""

    row: int  # 1-based position among the data rows: the identity a resumed campaign relies on
    to: str
    key: str | None  # None: not a number (outcome `invalid`, never dialled)
    variables: dict[str, str] = field(default_factory=dict)


def number_key(raw: str) -> str | None:
    """The canonical form duplicates and do-not-call entries are compared on, None when `raw` is
    not a phone number or extension."""
    try:
        return normalize_number(raw)
    except ValueError:
        return None


def read_leads(path: Path) -> tuple[list[Lead], list[str]]:
    """The rows of `path` and the variable column names, in file order. Blank lines are skipped;
    a file without a `number` column, or with a column named twice, is refused (BadInput)."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets save a BOM
    except OSError as exc:
        raise BadInput(f"cannot read the leads file {path}: {exc.strerror}") from exc
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header:
        raise BadInput(f"{path} is empty: the first line must name the columns, one of them `number`")
    names = [h.strip() for h in header]
    if NUMBER_COLUMN not in names:
        raise BadInput(f"{path} has no `{NUMBER_COLUMN}` column (its columns: {', '.join(names)})")
    if len(set(names)) != len(names) or "" in names:
        raise BadInput(f"{path}: every column needs a name of its own (its columns: {', '.join(names)})")
    at = names.index(NUMBER_COLUMN)
    variables = [n for n in names if n != NUMBER_COLUMN]
    leads: list[Lead] = []
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        cells = cells + [""] * (len(names) - len(cells))
        if len(cells) > len(names):
            raise BadInput(f"{path}: data row {len(leads) + 1} has {len(cells)} cells for {len(names)} columns")
        raw = cells[at].strip()
        leads.append(Lead(row=len(leads) + 1, to=raw, key=number_key(raw),
                          variables={n: cells[i].strip() for i, n in enumerate(names) if i != at}))
    return leads, variables


def fingerprint(leads: list[Lead]) -> str:
    """A digest of the rows a campaign dials: a state file is only resumed with the same list
    (re-ordered or edited rows would pair old outcomes with other people)."""
    h = hashlib.sha256()
    for lead in leads:
        h.update(repr((lead.row, lead.to, sorted(lead.variables.items()))).encode())
    return h.hexdigest()


class DoNotCall:
    """Numbers never to dial, normalised like the leads, matched with and without the leading
    `+` (lists mix `+44...` and `44...`)."""

    def __init__(self, numbers: set[str] | None = None):
        self._keys: set[str] = set()
        self._count = len(numbers or ())
        for n in numbers or ():
            self._keys.update(lookup_keys(n))

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: str | None) -> bool:
        return key is not None and key in self._keys

    @classmethod
    def read(cls, path: Path) -> "DoNotCall":
        """One number per line (`#` starts a comment), or a CSV whose first column, or whose
        `number` column, holds them. A line that is not a number is refused: a do-not-call list
        that silently dropped an entry would dial someone who asked not to be called."""
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise BadInput(f"cannot read the do-not-call file {path}: {exc.strerror}") from exc
        lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
        rows = list(csv.reader([ln for ln in lines if ln]))
        col = 0
        if rows and NUMBER_COLUMN in [c.strip() for c in rows[0]]:
            col = [c.strip() for c in rows[0]].index(NUMBER_COLUMN)
            rows = rows[1:]
        numbers = set()
        for i, cells in enumerate(rows, 1):
            raw = cells[col].strip() if col < len(cells) else ""
            key = number_key(raw)
            if key is None:
                raise BadInput(f"{path}: entry {i} ({raw!r}) is not a phone number")
            numbers.add(key)
        return cls(numbers)
