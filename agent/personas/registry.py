"""A directory of persona files: validation across files, routing, and live reload.

Reload never loses a working persona: a file that fails to parse, or conflicts with another,
keeps serving its last good version (reported in `issues`, counted in `reload_errors`). Persona
objects are immutable, so a call in progress keeps exactly the persona it started with.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import structlog

from agent.personas.numbers import lookup_keys, normalize_number
from agent.personas.safe_yaml import YamlRejected, load_located
from agent.personas.schema import Persona, PersonaError, PersonaIssue, parse_persona

log = structlog.get_logger(__name__)

PATTERNS = ("*.yaml", "*.yml")
#: (persona) -> (prompt tokens, token limit) or None when it cannot be checked
PromptLimit = Callable[[Persona], "tuple[int, int] | None"]


def _parse_file(path: Path, voices: set[str], prompt_limit: PromptLimit | None) -> Persona:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PersonaError([PersonaIssue(str(path), None, None, f"cannot read: {exc.strerror or exc}")]) from None
    try:
        fields, doc_line = load_located(data)
    except YamlRejected as exc:
        raise PersonaError([PersonaIssue(str(path), exc.line, None, str(exc))]) from None
    persona = parse_persona(path, fields, doc_line, voices)
    if prompt_limit is not None:
        counted = prompt_limit(persona)
        if counted is not None and counted[0] > counted[1]:
            tokens, limit = counted
            line = None
            for key in ("prompt", "information", "background", "topic", "instructions"):
                if key in fields:
                    line = fields[key].line
                    break
            raise PersonaError([PersonaIssue(str(path), line, None,
                                             f"the rendered prompt is {tokens} tokens; the model's context allows "
                                             f"at most {limit} for this voice: shorten the information")])
    return persona


@dataclass
class ReloadReport:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    issues: list[PersonaIssue] = field(default_factory=list)

    @property
    def touched(self) -> bool:
        return bool(self.added or self.changed or self.removed)


class PersonaRegistry:
    def __init__(self, directory: str | Path, voices: set[str] | list[str],
                 prompt_limit: PromptLimit | None = None,
                 on_change: Callable[[ReloadReport], None] | None = None):
        self.directory = Path(directory)
        self.voices = set(voices)
        self.prompt_limit = prompt_limit
        self.on_change = on_change
        self.reload_errors = 0
        self.issues: list[PersonaIssue] = []
        self._good: dict[Path, Persona] = {}
        self._seen: dict[Path, tuple[str, list[PersonaIssue]]] = {}  # digest, issues of that version
        self._by_number: dict[str, Persona] = {}
        self._by_id: dict[str, Persona] = {}
        self._default: Persona | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- queries (lock-free: each index is replaced whole) -------------------------------------
    def personas(self) -> list[Persona]:
        return sorted(self._by_id.values(), key=lambda p: p.id)

    def get(self, persona_id: str) -> Persona | None:
        return self._by_id.get(persona_id)

    @property
    def default(self) -> Persona | None:
        return self._default

    def route(self, dialled: str, use_default: bool = True) -> Persona | None:
        """The persona answering `dialled` (number, tel:/sip: URI, or persona id)."""
        by_number = self._by_number
        try:
            number = normalize_number(dialled)
        except ValueError:
            number = None
        if number is not None:
            for key in lookup_keys(number):
                if key in by_number:
                    return by_number[key]
        elif dialled.strip().lower() in self._by_id:
            return self._by_id[dialled.strip().lower()]
        return self._default if use_default else None

    # -- loading -------------------------------------------------------------------------------
    def reload(self) -> ReloadReport:
        with self._lock:
            return self._reload()

    def _reload(self) -> ReloadReport:
        report = ReloadReport()
        files = sorted({p for pat in PATTERNS for p in self.directory.glob(pat) if p.is_file()})
        candidate: dict[Path, Persona | None] = {}
        fresh: list[Path] = []
        issues_of: dict[Path, list[PersonaIssue]] = {}
        for path in files:
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                digest = "unreadable"
            seen = self._seen.get(path)
            if seen is not None and seen[0] == digest:
                candidate[path] = self._good.get(path)
                issues_of[path] = seen[1]
                continue
            try:
                candidate[path] = _parse_file(path, self.voices, self.prompt_limit)
                issues_of[path] = []
                fresh.append(path)
            except PersonaError as exc:
                candidate[path] = self._good.get(path)  # keep serving the last good version
                issues_of[path] = exc.issues
                self.reload_errors += 1
                log.warning("persona_invalid", file=str(path), problems=[str(i) for i in exc.issues],
                            keeps_last_good=path in self._good)
            self._seen[path] = (digest, issues_of[path])

        # Cross-file rules: established files win over freshly changed ones.
        order = [p for p in files if p not in fresh] + fresh
        numbers: dict[str, Path] = {}
        ids: dict[str, Path] = {}
        default_at: Path | None = None
        accepted: dict[Path, Persona] = {}
        for path in order:
            for attempt in (candidate.get(path), self._good.get(path) if path in fresh else None):
                if attempt is None:
                    continue
                clash = self._clashes(attempt, path, numbers, ids, default_at)
                if not clash:
                    accepted[path] = attempt
                    ids[attempt.id] = path
                    for n in attempt.numbers:
                        numbers[n] = path
                    if attempt.default:
                        default_at = path
                    break
                if attempt is candidate.get(path):
                    issues_of[path] = issues_of[path] + clash
                    self._seen[path] = (self._seen[path][0], issues_of[path])
                    self.reload_errors += 1
                    log.warning("persona_conflict", file=str(path), problems=[str(i) for i in clash])

        for path in files:
            if path in accepted and path not in self._good:
                report.added.append(str(path))
            elif path in accepted and accepted[path] is not self._good.get(path):
                report.changed.append(str(path))
        for path in self._good:
            if path not in accepted:
                report.removed.append(str(path))
        for path in list(self._seen):
            if path not in files:
                del self._seen[path]
        self._good = accepted
        self._by_id = {p.id: p for p in accepted.values()}
        self._by_number = {n: p for p in accepted.values() for n in p.numbers}
        self._default = next((p for p in accepted.values() if p.default), None)
        self.issues = [i for p in files for i in issues_of.get(p, [])]
        report.issues = list(self.issues)
        if report.touched:
            log.info("personas_loaded", added=report.added, changed=report.changed, removed=report.removed,
                     personas=len(accepted), problems=len(self.issues))
            if self.on_change is not None:
                try:
                    self.on_change(report)
                except Exception:  # a listener's bug must not stop reloads
                    log.exception("persona_change_listener_failed")
        return report

    @staticmethod
    def _clashes(p: Persona, path: Path, numbers: dict[str, Path], ids: dict[str, Path],
                 default_at: Path | None) -> list[PersonaIssue]:
        out = []
        if p.id in ids:
            out.append(PersonaIssue(str(path), None, "id", f"persona id '{p.id}' is already used by {ids[p.id]}"))
        for n in p.numbers:
            if n in numbers:
                out.append(PersonaIssue(str(path), None, "numbers",
                                        f"number {n} is claimed by both {numbers[n]} and {path}"))
        if p.default and default_at is not None:
            out.append(PersonaIssue(str(path), None, "default",
                                    f"only one persona can be the default; {default_at} already is"))
        return out

    # -- live reload -----------------------------------------------------------------------------
    def start_watching(self, interval: float = 1.0) -> None:
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.reload()
                except Exception:
                    log.exception("persona_reload_failed")

        self._thread = threading.Thread(target=loop, name="persona-watch", daemon=True)
        self._thread.start()

    def stop_watching(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def load_persona_dir(directory: str | Path, voices: set[str] | list[str],
                     prompt_limit: PromptLimit | None = None) -> PersonaRegistry:
    reg = PersonaRegistry(directory, voices, prompt_limit)
    reg.reload()
    return reg
