"""The persona file format, its validation and its rendering into the model's text prompt.

Kinds (the prompt styles PersonaPlex was trained on):
- `service`: "You work for {company} which is a {business} and your name is {agent_name}.
  Information: {facts}"
- `assistant`: "You are {role}. {instructions}"
- `casual`: "You enjoy having a good conversation. Have a {topic}. {background}"
- `prompt`: the raw `prompt:` text, for anything else.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.personas import templates as templating
from agent.personas.numbers import normalize_number
from agent.personas.safe_yaml import Located
from agent.model.sampling_params import SAMPLING_FIELDS, SamplingParams

KINDS = ("service", "assistant", "casual", "prompt")
COMMON_FIELDS = {"id", "kind", "numbers", "voice", "sampling", "transfer", "default", "description", "variables",
                 "browser", "direction"}
DIRECTIONS = ("inbound", "outbound", "both")  # which calls a persona takes: answered, placed, or both
LIST_FIELDS = ("information", "background")  # per-call: an item whose placeholders are all unknown is left out
KIND_FIELDS = {
    "service": {"company", "business", "agent_name", "information"},
    "assistant": {"role", "instructions"},
    "casual": {"topic", "background"},
    "prompt": {"prompt"},
}
REQUIRED = {
    "service": ("company", "business", "agent_name", "information"),
    "assistant": ("role",),
    "casual": (),
    "prompt": ("prompt",),
}
TRANSFER_FIELDS = {"target", "dtmf"}
ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_ID = ID_RE
_DTMF = re.compile(r"^[0-9*#A-D]$")
CASUAL_OPENING = "You enjoy having a good conversation."


@dataclass(frozen=True)
class PersonaIssue:
    """One problem in one file, phrased for the person who edits it."""

    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line else "")
        return f"{where}: {self.field + ': ' if self.field else ''}{self.message}"


class PersonaError(ValueError):
    def __init__(self, issues: list[PersonaIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


@dataclass(frozen=True)
class Transfer:
    target: str
    dtmf: str


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    items_left_out: int  # information/background items whose placeholders were all unknown
    items_cut: int  # items dropped from the end to fit a token budget


@dataclass(frozen=True)
class Persona:
    id: str
    kind: str
    numbers: tuple[str, ...]
    voice: str
    prompt: str  # rendered with the variables' defaults (what an unknown caller gets)
    source: str  # file path
    company: str | None = None
    agent_name: str | None = None
    sampling_overrides: dict = field(default_factory=dict, hash=False, compare=True)
    transfer: Transfer | None = None
    default: bool = False
    description: str | None = None
    variables: dict = field(default_factory=dict, hash=False, compare=True)  # name -> default ("" = unknown)
    browser: bool = False  # offered to browser callers on the public page
    direction: str = "both"  # "inbound" (answers), "outbound" (only places calls), "both"
    # the kind's text fields as templates (a tuple for list fields); None: no placeholders anywhere
    templates: dict | None = field(default=None, hash=False, compare=False, repr=False)

    def sampling(self, base: SamplingParams) -> SamplingParams:
        return base.replace(**self.sampling_overrides)

    def render(self, values: dict[str, str] | None = None, max_items: int | None = None) -> RenderedPrompt:
        """The prompt for one call: placeholders filled from `values` over the defaults; list
        items whose placeholders are all unknown left out; at most `max_items` list items kept
        (the last ones go first when a prompt must fit a token budget)."""
        if self.templates is None:
            return RenderedPrompt(self.prompt, 0, 0)
        vals = {**self.variables, **{k: v for k, v in (values or {}).items() if v}}
        fields: dict[str, Any] = {}
        left_out = cut = 0
        for name, tpl in self.templates.items():
            if tpl is None:
                fields[name] = None
            elif isinstance(tpl, tuple):
                items = [t.render(vals) for t in tpl if not t.all_unknown(vals)]
                left_out += len(tpl) - len(items)
                if max_items is not None and len(items) > max_items:
                    cut += len(items) - max_items
                    items = items[:max_items]
                fields[name] = items
            else:
                fields[name] = tpl.render(vals)
        return RenderedPrompt(render_prompt(self.kind, fields), left_out, cut)

    @property
    def list_items(self) -> int:
        """How many list items (information/background) the persona has."""
        if self.templates is None:
            return 0
        return sum(len(t) for t in self.templates.values() if isinstance(t, tuple))


def _sentence(text: str) -> str:
    t = " ".join(str(text).split())
    return t if not t or t[-1] in ".!?" else t + "."


def _words(text: str) -> str:
    return " ".join(str(text).split())


def render_prompt(kind: str, f: dict[str, Any]) -> str:
    if kind == "prompt":
        return " ".join(str(f["prompt"]).split())
    if kind == "service":
        facts = " ".join(_sentence(x) for x in f["information"] if str(x).strip())
        text = (f"You work for {_words(f['company'])} which is a {_words(f['business'])} and your name is "
                f"{_words(f['agent_name'])}. Information: {facts}")
        return text.rstrip()
    if kind == "assistant":
        parts = [_sentence(f"You are {_words(f['role'])}")]
        if f.get("instructions"):
            parts.append(_sentence(f["instructions"]))
        return " ".join(parts)
    if kind == "casual":
        parts = [CASUAL_OPENING]
        topic = (f.get("topic") or "").strip()
        if topic:
            if not topic.lower().startswith("have "):
                article = "an" if topic[:1].lower() in "aeiou" else "a"
                topic = f"Have {article} {topic}"
            parts.append(_sentence(topic))
        bg = f.get("background") or []
        parts.extend(_sentence(x) for x in ([bg] if isinstance(bg, str) else bg) if str(x).strip())
        return " ".join(parts)
    raise ValueError(kind)


def _infer_kind(fields: dict[str, Located]) -> str:
    if "kind" in fields:
        return str(fields["kind"].value)
    for kind in ("prompt", "service", "assistant"):
        if KIND_FIELDS[kind] & fields.keys():
            return kind
    return "casual"


class _Checker:
    def __init__(self, path: Path, fields: dict[str, Located], doc_line: int, voices: set[str]):
        self.path = str(path)
        self.fields = fields
        self.doc_line = doc_line
        self.voices = voices
        self.issues: list[PersonaIssue] = []

    def err(self, field_name: str | None, msg: str, line: int | None = None) -> None:
        if line is None:
            line = self.fields[field_name].line if field_name in self.fields else self.doc_line
        self.issues.append(PersonaIssue(self.path, line, field_name, msg))

    def text(self, name: str, required: bool) -> str | None:
        if name not in self.fields:
            if required:
                self.err(name, f"missing field '{name}' (required)")
            return None
        v = self.fields[name].value
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            self.err(name, f"must be text, got {type(v).__name__}")
            return None
        if not v.strip():
            self.err(name, "must not be empty")
            return None
        return v

    def flag(self, name: str) -> bool:
        if name not in self.fields:
            return False
        if not isinstance(self.fields[name].value, bool):
            self.err(name, "must be true or false")
            return False
        return self.fields[name].value

    def text_list(self, name: str, required: bool) -> list[str] | None:
        if name not in self.fields:
            if required:
                self.err(name, f"missing field '{name}' (required): a list of facts, one per line starting with '- '")
            return None
        v = self.fields[name].value
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            self.err(name, f"must be a list of text items, got {type(v).__name__}")
            return None
        bad = [i for i, x in enumerate(v) if not isinstance(x, (str, int, float)) or isinstance(x, bool)
               or not str(x).strip()]
        if bad:
            self.err(name, f"item {bad[0] + 1} must be non-empty text")
            return None
        if required and not v:
            self.err(name, "is empty: list at least one fact (what the agent must know or verify)")
            return None
        return [str(x) for x in v]


def parse_persona(path: Path, fields: dict[str, Located], doc_line: int, voices: set[str],
                  allow_voice_paths: bool = True) -> Persona:
    c = _Checker(path, fields, doc_line, voices)
    kind = _infer_kind(fields)
    if kind not in KINDS:
        c.err("kind", f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
        raise PersonaError(c.issues)
    allowed = COMMON_FIELDS | KIND_FIELDS[kind]
    all_known = COMMON_FIELDS.union(*KIND_FIELDS.values())
    for key, loc in fields.items():
        if key in allowed:
            continue
        if key in all_known:
            c.err(key, f"field '{key}' does not apply to kind '{kind}' (its fields: "
                       f"{', '.join(sorted(KIND_FIELDS[kind]))})", loc.line)
            continue
        close = difflib.get_close_matches(key, sorted(all_known), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(sorted(allowed))}"
        c.err(key, f"unknown field '{key}'{hint}", loc.line)

    pid = c.text("id", False) or path.stem.lower()
    if not _ID.match(pid):
        c.err("id" if "id" in fields else None,
              f"persona id {pid!r} must be lowercase letters, digits, '-' or '_' (from the file name if no 'id')")

    numbers: list[str] = []
    if "numbers" in fields:
        raw = fields["numbers"].value
        if isinstance(raw, (str, int)):
            raw = [raw]
        if not isinstance(raw, list):
            c.err("numbers", f"must be a list of phone numbers or extensions, got {type(raw).__name__}")
        else:
            for item in raw:
                try:
                    n = normalize_number(str(item))
                except ValueError as exc:
                    c.err("numbers", str(exc))
                    continue
                if n in numbers:
                    c.err("numbers", f"{item!r} is listed twice")
                numbers.append(n)

    voice = c.text("voice", True)
    if voice is not None:
        is_path = "/" in voice or voice.endswith(".wav")
        if is_path:
            vp = Path(voice).expanduser()
            if not vp.is_absolute():
                vp = path.parent / vp
            if not allow_voice_paths:
                c.err("voice", "custom voice paths are not allowed here")
            elif vp.suffix not in (".pt", ".wav"):
                c.err("voice", f"custom voice {voice!r} must be a .pt voice file or a .wav recording")
            elif not vp.is_file():
                c.err("voice", f"custom voice file {vp} does not exist")
            voice = str(vp)
        else:
            name = voice[:-3] if voice.endswith(".pt") else voice
            if name not in voices:
                close = difflib.get_close_matches(name.upper(), sorted(voices), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else ""
                c.err("voice", f"unknown voice {voice!r}{hint}; valid voices: {', '.join(sorted(voices))}, "
                               f"or a path to a custom .pt/.wav")
            voice = name

    kf: dict[str, Any] = {}
    for name in KIND_FIELDS[kind]:
        if name in ("information", "background"):
            kf[name] = c.text_list(name, name in REQUIRED[kind])
        else:
            kf[name] = c.text(name, name in REQUIRED[kind])

    overrides: dict[str, Any] = {}
    if "sampling" in fields:
        s = fields["sampling"].value
        if not isinstance(s, dict):
            c.err("sampling", "must be a mapping, e.g. {temp_audio: 0.8, topk_text: 25}")
        else:
            overrides = _sampling_overrides(s, c)

    transfer = None
    if "transfer" in fields:
        t = fields["transfer"].value
        if not isinstance(t, dict):
            c.err("transfer", "must be a mapping with 'target' (a sip: URI) and 'dtmf' (the digit that triggers it)")
        else:
            extra = set(t) - TRANSFER_FIELDS
            if extra:
                c.err("transfer", f"unknown setting(s) {', '.join(sorted(map(str, extra)))}; allowed: target, dtmf")
            target, dtmf = str(t.get("target", "")), str(t.get("dtmf", ""))
            if not re.match(r"^sips?:[^\s@]+(@[^\s]+)?$", target):
                c.err("transfer", f"target {target!r} must be a SIP URI like sip:queue@pbx.example.com")
            if not _DTMF.match(dtmf):
                c.err("transfer", f"dtmf {dtmf!r} must be one key: 0-9, *, # or A-D")
            transfer = Transfer(target, dtmf)

    is_default = c.flag("default")
    browser = c.flag("browser")
    direction = "both"
    if "direction" in c.fields:
        direction = str(c.fields["direction"].value)
        if direction not in DIRECTIONS:
            c.err("direction", f"{direction!r} must be one of: {', '.join(DIRECTIONS)}")
    description = c.text("description", False)
    if not numbers and not is_default and "numbers" in fields:
        c.err("numbers", "is empty: list the numbers this persona answers (or set default: true)")

    declared = _variables(c)
    templates = _templates(c, kf, declared)
    if c.issues:
        raise PersonaError(c.issues)
    persona = Persona(id=pid, kind=kind, numbers=tuple(numbers), voice=voice or "", prompt="",
                      source=str(path), company=kf.get("company"), agent_name=kf.get("agent_name"),
                      sampling_overrides=overrides, transfer=transfer, default=is_default, description=description,
                      variables=declared, templates=templates, browser=browser, direction=direction)
    default_prompt = persona.render().text if templates is not None else render_prompt(kind, kf)
    return replace(persona, prompt=default_prompt)


def _sampling_overrides(given: dict, c: _Checker) -> dict[str, Any]:
    """A persona's `sampling:` settings, checked by the engine's own model (`SamplingParams`:
    its names, types and bounds); strict, so "0.8" or `yes` is an error, not a number."""
    try:
        checked = SamplingParams.model_validate(given, strict=True)
    except ValidationError as exc:
        for e in exc.errors():
            k = str(e["loc"][0]) if e["loc"] else ""
            if e["type"] == "extra_forbidden":
                close = difflib.get_close_matches(k, SAMPLING_FIELDS, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                c.err("sampling", f"unknown setting '{k}'{hint}; allowed: {', '.join(SAMPLING_FIELDS)}")
            else:
                c.err("sampling", f"'{k}': {e['msg'][0].lower()}{e['msg'][1:]}")
        return {}
    return {k: getattr(checked, k) for k in given}


def _variables(c: _Checker) -> dict[str, str]:
    """`variables: {name: default}` ("" or nothing = unknown until a call says)."""
    if "variables" not in c.fields:
        return {}
    loc = c.fields["variables"]
    raw = loc.value
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        c.err("variables", "must be a mapping of variable names to defaults, e.g. {customer_name: \"\"}")
        return {}
    out: dict[str, str] = {}
    for name, default in raw.items():
        line = (loc.key_lines or {}).get(str(name), loc.line)
        if not isinstance(name, str) or not templating.NAME.match(name):
            c.err("variables", f"variable name {name!r} must be lowercase letters, digits or '_'", line)
            continue
        if default is None:
            default = ""
        if isinstance(default, bool) or not isinstance(default, (str, int, float)):
            c.err("variables", f"default of '{name}' must be text (\"\" for unknown)", line)
            continue
        out[name] = " ".join(str(default).split())[:200]
    return out


def _templates(c: _Checker, kf: dict[str, Any], declared: dict[str, str]) -> dict | None:
    """The kind's text fields as templates, checking every placeholder; None when no field has
    one (the prompt is then the same for every call)."""
    templates: dict[str, Any] = {}
    used: dict[str, None] = {}
    any_placeholder = False
    for name, value in kf.items():
        if value is None:
            templates[name] = None
            continue
        loc = c.fields.get(name)
        items = value if isinstance(value, list) else [value]
        parsed = []
        for i, text in enumerate(items):
            line = loc.item_lines[i] if loc is not None and i < len(loc.item_lines) else (loc.line if loc else None)
            where = f"item {i + 1}: " if isinstance(value, list) else ""
            try:
                tpl = templating.parse(str(text))
            except templating.TemplateError as exc:
                c.err(name, f"{where}{exc}", line)
                continue
            for var in tpl.names:
                any_placeholder = True
                used[var] = None
                if var not in declared and var not in templating.BUILTINS:
                    c.err(name, f"{where}unknown placeholder {{{var}}}: declare it under 'variables:' "
                                f"(built-in: {', '.join(templating.BUILTINS)})", line)
            parsed.append(tpl)
        templates[name] = tuple(parsed) if isinstance(value, list) else (parsed[0] if parsed else None)
    for var in declared:
        if var not in used:
            loc = c.fields["variables"]
            c.err("variables", f"variable '{var}' is declared but no text uses {{{var}}}",
                  (loc.key_lines or {}).get(var, loc.line))
    return templates if any_placeholder else None
