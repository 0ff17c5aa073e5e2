"""`personaplex-agent personas check|show|new`: tools for the people who write personas."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.personas.registry import load_persona_dir
from agent.personas.tools import find_tokenizer, make_prompt_limit
from agent.model.prompt import tokenize_prompt
from agent.model.voice_names import STOCK_VOICES

DEFAULT_DIR = Path("personas")

TEMPLATES = {
    "service": """\
# A customer-service persona. Rendered prompt:
#   "You work for <company> which is a <business> and your name is <agent_name>. Information: <facts>"
kind: service
numbers:                       # dialled numbers (E.164 or extensions) this persona answers
  - "+1 415 555 0199"
company: Example Plumbing
business: plumbing repair service   # as in "which is a plumbing repair service"
agent_name: Sam Rivera
information:                   # facts the agent knows or must verify, one sentence each
  - "Verify the customer's address before booking."
  - "Emergency call-out costs $120."
voice: NATF2                   # NATF0-3, NATM0-3, VARF0-4, VARM0-4, or a path to a custom .pt/.wav
# sampling: {temp_audio: 0.8, temp_text: 0.7, topk_audio: 250, topk_text: 25}
# transfer: {target: "sip:agents@pbx.example.com", dtmf: "0"}   # press 0 -> a person
# default: true                # answer numbers no other persona claims
""",
    "assistant": """\
kind: assistant                # "You are <role>. <instructions>"
numbers: ["2000"]
role: a wise and friendly teacher
instructions: Answer questions or provide advice in a clear and engaging way.
voice: NATF1
""",
    "casual": """\
kind: casual                   # "You enjoy having a good conversation. Have a <topic>. <background>"
numbers: ["2001"]
topic: casual discussion about favorite foods and cooking experiences
background:
  - You are David Green, a former baker now living in Boston.
voice: VARM0
""",
    "prompt": """\
kind: prompt                   # any text prompt, used as written
numbers: ["2002"]
prompt: You enjoy having a good conversation.
voice: NATM0
""",
}


def _registry(args):
    from server.logging_setup import configure_logging

    configure_logging(level="error")  # problems are printed by the command itself
    voices_dir = Path(args.model_dir) / "voices" if args.model_dir else None
    if voices_dir and voices_dir.is_dir():
        from agent.model.voices import available_voices  # torch: only with a model folder

        voices = available_voices(voices_dir)
    else:
        voices = list(STOCK_VOICES)
    tok = find_tokenizer(args.model_dir)
    reg = load_persona_dir(args.dir, voices, make_prompt_limit(tok, args.context, voices_dir))
    return reg, tok


def cmd_check(args) -> int:
    d = Path(args.dir)
    if not d.is_dir():
        sys.stderr.write(f"error: {d} is not a directory\n")
        return 2
    reg, tok = _registry(args)
    out = sys.stdout
    rows = [(n, p.id, p.voice, Path(p.source).name) for p in reg.personas() for n in p.numbers]
    if reg.default:
        rows.append(("(any other)", reg.default.id, reg.default.voice, Path(reg.default.source).name))
    w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("NUMBER", "PERSONA", "VOICE", "FILE"))]
    out.write("  ".join(h.ljust(w[i]) for i, h in enumerate(("NUMBER", "PERSONA", "VOICE", "FILE"))).rstrip() + "\n")
    for r in rows:
        out.write("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() + "\n")
    if tok is None:
        out.write("note: prompt lengths NOT checked: no tokenizer found (pass --model-dir, or have the "
                  "PersonaPlex weights in the Hugging Face cache)\n")
    if reg.issues:
        sys.stderr.write(f"{len(reg.issues)} problem(s):\n")
        for issue in reg.issues:
            sys.stderr.write(f"  {issue}\n")
        return 1
    out.write(f"ok: {len(reg.personas())} personas\n")
    return 0


def _vars(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: --var {pair!r}: write NAME=VALUE")
        out[name.strip()] = value
    return out


def cmd_show(args) -> int:
    from agent.calls.context import builtin_variables, clean_variables
    from agent.model.prompt import wrap_system_prompt

    reg, tok = _registry(args)
    p = reg.route(args.number)
    if p is None:
        sys.stderr.write(f"no persona answers {args.number}\n")
        return 1
    routed = "default persona" if p.default and args.number not in p.numbers else "matched"
    sys.stdout.write(f"number:  {args.number}\npersona: {p.id} ({routed}, {p.source})\nvoice:   {p.voice}\n")
    given = _vars(args.var)
    values = {**builtin_variables(args.number, None), **clean_variables(given)}
    unknown = sorted(set(given) - set(p.variables) - {"caller_number", "dialled_number"})
    if unknown:
        sys.stderr.write(f"note: {p.id} uses no variable named {', '.join(unknown)}\n")
    rendered = p.render(values)
    if p.variables:
        shown = ", ".join(f"{k}={values.get(k) or p.variables[k] or '(unknown)'}" for k in sorted(p.variables))
        sys.stdout.write(f"variables: {shown}\n")
    if rendered.items_left_out:
        sys.stdout.write(f"left out: {rendered.items_left_out} item(s) whose variables are all unknown\n")
    if tok is not None:
        sys.stdout.write(f"tokens:  {len(tokenize_prompt(tok, rendered.text))}\n")
    else:
        sys.stdout.write("tokens:  (no tokenizer found; pass --model-dir)\n")
    sys.stdout.write(f"prompt:\n{rendered.text}\nmodel input (one token per frame):\n"
                     f"{wrap_system_prompt(rendered.text)}\n")
    return 0


def cmd_new(args) -> int:
    text = TEMPLATES[args.kind]
    if args.output:
        path = Path(args.output)
        if path.exists():
            sys.stderr.write(f"error: {path} exists; not overwriting\n")
            return 2
        path.write_text(text)
        sys.stdout.write(f"wrote {path}\n")
    else:
        sys.stdout.write(text)
    return 0


def register(sub) -> None:
    p = sub.add_parser("personas", help="check, show and create persona files")
    psub = p.add_subparsers(dest="personas_command", required=True)

    def common(q):
        q.add_argument("--model-dir", type=Path, help="model folder (tokenizer and voices for exact checks)")
        q.add_argument("--context", type=int, default=3000, help="model context in frames")

    c = psub.add_parser("check", help="validate a persona folder; table of numbers -> persona -> voice")
    c.add_argument("dir", nargs="?", default=str(DEFAULT_DIR))
    common(c)
    c.set_defaults(func=cmd_check)
    s = psub.add_parser("show", help="which persona answers NUMBER and the exact prompt it gets")
    s.add_argument("number")
    s.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="a per-call variable, as a caller, the CRM or a carrier would give it (repeatable)")
    s.add_argument("--dir", default=str(DEFAULT_DIR))
    common(s)
    s.set_defaults(func=cmd_show)
    n = psub.add_parser("new", help="print (or write) a commented persona template")
    n.add_argument("--kind", choices=sorted(TEMPLATES), default="service")
    n.add_argument("-o", "--output")
    n.set_defaults(func=cmd_new)


__all__ = ["register", "argparse"]
