"""Persona files: rendering, routing, validation messages, hostile input, live reload, CLI."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest

from agent.personas import PersonaRegistry, load_persona_dir, normalize_number
from agent.model.voice_names import STOCK_VOICES

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "personas"

UPSTREAM_PROMPTS = {
    "citysan": "You work for CitySan Services which is a waste management and your name is Ayelen Lucero. "
               "Information: Verify customer name Omar Torres. Current schedule: every other week. Upcoming "
               "pickup: April 12th. Compost bin service available for $8/month add-on.",
    "jerusalem-shakshuka": "You work for Jerusalem Shakshuka which is a restaurant and your name is Owen Foster. "
                           "Information: There are two shakshuka options: Classic (poached eggs, $9.50) and Spicy "
                           "(scrambled eggs with jalapenos, $10.25). Sides include warm pita ($2.50) and Israeli "
                           "salad ($3). No combo offers. Available for drive-through until 9 PM.",
    "aerorentals-pro": "You work for AeroRentals Pro which is a drone rental company and your name is Tomaz Novak. "
                       "Information: AeroRentals Pro has the following availability: PhoenixDrone X ($65/4 hours, "
                       "$110/8 hours), and the premium SpectraDrone 9 ($95/4 hours, $160/8 hours). Deposit "
                       "required: $150 for standard models, $300 for premium.",
    "teacher": "You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way.",
    "casual-conversation": "You enjoy having a good conversation. Have a casual discussion about eating at home "
                           "versus dining out.",
    "mars-astronaut": "You enjoy having a good conversation. Have a technical discussion about fixing a reactor "
                      "core on a spaceship to Mars. You are an astronaut on a Mars mission. Your name is Alex. You "
                      "are already dealing with a reactor core meltdown on a Mars mission. Several ship systems "
                      "are failing, and continued instability will lead to catastrophic failure. You explain what "
                      "is happening and you urgently ask for help thinking through how to stabilize the reactor.",
}


def write(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.write_text(text)
    return p


def one_problem(tmp_path, text, name="p.yaml", **kw):
    write(tmp_path, name, text)
    reg = load_persona_dir(tmp_path, STOCK_VOICES, **kw)
    assert reg.issues, "expected a validation problem"
    return reg.issues


def test_shipped_personas_render_upstream_prompts():
    reg = load_persona_dir(SHIPPED, STOCK_VOICES)
    assert reg.issues == []
    assert {p.id: p.prompt for p in reg.personas()} == UPSTREAM_PROMPTS


@pytest.mark.parametrize("raw,norm", [
    ("+1 (415) 555-0100", "+14155550100"), ("sip:+14155550100@host", "+14155550100"),
    ("tel:+1-415-555-0100", "+14155550100"), ("sips:1001@pbx;transport=tls", "1001"),
    ("0044 20 7946 0000", "+442079460000"), (" 1001 ", "1001"), ("+1.415.555.0100", "+14155550100"),
])
def test_number_normalisation(raw, norm):
    assert normalize_number(raw) == norm


def test_routing_by_any_formatting_and_default():
    reg = load_persona_dir(SHIPPED, STOCK_VOICES)
    for dialled in ("+1 (415) 555-0100", "sip:+14155550100@agent.example", "14155550100", "1001", "tel:1001"):
        assert reg.route(dialled).id == "citysan", dialled
    assert reg.route("5550000").id == "teacher"  # default persona
    assert reg.route("5550000", use_default=False) is None
    assert reg.route("citysan").id == "citysan"  # WebRTC may address a persona by id
    assert reg.route("+14155550101").id == "jerusalem-shakshuka"


def test_unknown_key_with_did_you_mean(tmp_path):
    (issue,) = one_problem(tmp_path, "kind: service\nnumbers: ['1']\ncompany: A\nbusiness: b\nagent_nme: C\n"
                                     "agent_name: C\ninformation: [x]\nvoice: NATF0\n")
    assert issue.line == 5 and "unknown field 'agent_nme'" in issue.message and "did you mean 'agent_name'" in \
        issue.message and str(issue).startswith(str(tmp_path / "p.yaml") + ":5:")


def test_missing_field_names_it(tmp_path):
    issues = one_problem(tmp_path, "kind: service\nnumbers: ['1']\ncompany: A\nbusiness: b\n"
                                   "information: [x]\nvoice: NATF0\n")
    assert any(i.field == "agent_name" and "missing field 'agent_name'" in i.message for i in issues)


def test_wrong_type(tmp_path):
    issues = one_problem(tmp_path, "kind: service\nnumbers: ['1']\ncompany: {a: 1}\nbusiness: b\n"
                                   "agent_name: C\ninformation: [x]\nvoice: NATF0\n")
    assert issues[0].field == "company" and "must be text, got dict" in issues[0].message and issues[0].line == 3


def test_unknown_voice_lists_valid_ones(tmp_path):
    (issue,) = one_problem(tmp_path, "kind: assistant\nnumbers: ['1']\nrole: a teacher\nvoice: NATF7\n")
    assert issue.line == 4 and "unknown voice 'NATF7'" in issue.message
    for v in ("NATF0", "NATM3", "VARF4", "VARM4"):
        assert v in issue.message


def test_number_claimed_twice_names_both_files(tmp_path):
    write(tmp_path, "a.yaml", "kind: assistant\nnumbers: ['+1 415 555 0100']\nrole: a teacher\nvoice: NATF0\n")
    write(tmp_path, "b.yaml", "kind: assistant\nnumbers: ['tel:+14155550100']\nrole: a cook\nvoice: NATF0\n")
    reg = load_persona_dir(tmp_path, STOCK_VOICES)
    (issue,) = reg.issues
    assert str(tmp_path / "a.yaml") in issue.message and str(tmp_path / "b.yaml") in issue.message
    assert "+14155550100" in issue.message
    assert reg.route("+14155550100").id == "a"


def test_empty_information_list(tmp_path):
    (issue,) = one_problem(tmp_path, "kind: service\nnumbers: ['1']\ncompany: A\nbusiness: b\nagent_name: C\n"
                                     "information: []\nvoice: NATF0\n")
    assert issue.field == "information" and "is empty" in issue.message


def _long_service(facts: int) -> str:
    items = "\n".join(f"  - Fact number {i} about the service." for i in range(facts))
    return f"kind: service\nnumbers: ['1']\ncompany: A\nbusiness: b\nagent_name: C\ninformation:\n{items}\nvoice: NATF0\n"


def test_other_field_errors(tmp_path):
    cases = {
        "kind: robot\nvoice: NATF0\n": "unknown kind 'robot'",
        "kind: assistant\nrole: x\nvoice: NATF0\nnumbers: ['12ab']\n": "not a phone number",
        "kind: assistant\nrole: x\nvoice: NATF0\nnumbers: ['1']\nsampling: {temp_audoi: 1}\n": "did you mean 'temp_audio'",
        # the engine's own bounds and types (SamplingParams), strictly: a quoted number is not one
        "kind: assistant\nrole: x\nvoice: NATF0\nnumbers: ['1']\nsampling: {temp_audio: 6}\n": "'temp_audio': input should be less than or equal to 5",
        "kind: assistant\nrole: x\nvoice: NATF0\nnumbers: ['1']\nsampling: {temp_text: '0.5'}\n": "'temp_text': input should be a valid number",
        "kind: assistant\nrole: x\nvoice: NATF0\nnumbers: ['1']\nsampling: {topk_text: true}\n": "'topk_text': input should be a valid integer",
        "kind: assistant\nrole: x\nvoice: NATF0\nnumbers: ['1']\nsampling: {greedy: 1}\n": "'greedy': input should be a valid boolean",
        "kind: assistant\nrole: x\nvoice: NATF0\nnumbers: ['1']\ntransfer: {target: bob, dtmf: '0'}\n": "SIP URI",
        "kind: assistant\nrole: x\nvoice: NATF0\nnumbers: ['1']\ntransfer: {target: 'sip:a@b', dtmf: '00'}\n": "one key",
        "kind: assistant\nrole: x\nvoice: NATF0\nnumbers: ['1']\ncompany: A\n": "does not apply to kind 'assistant'",
        "kind: assistant\nrole: x\nvoice: NATF0\nnumbers: ['1', '1']\n": "listed twice",
        "kind: assistant\nrole: x\nvoice: ./missing.wav\nnumbers: ['1']\n": "does not exist",
    }
    for text, msg in cases.items():
        d = tmp_path / str(abs(hash(text)))
        d.mkdir()
        issues = one_problem(d, text)
        assert any(msg in i.message for i in issues), (text, [str(i) for i in issues])


@pytest.mark.parametrize("payload,msg", [
    (b"a: &a [1,2,3]\nb: &b [*a,*a,*a,*a]\nc: [*b,*b,*b,*b]\n", "anchors and aliases"),
    (b"voice: NATF0\n" + b"# pad\n" * 100000, "limited to"),
    (bytes(range(256)) * 10, "NUL bytes"),
    (b"\xff\xfe\xfa not utf8", "not UTF-8"),
    (b"- just\n- a list\n", "must be a mapping"),
    (b"kind: assistant\nkind: casual\n", "appears twice"),
    (b"kind: assistant\nvariables:\n  name: a\n  name: b\n", "'name' appears twice (first on line 3)"),
    (b"role: [unclosed\n", "YAML syntax error"),
    (b"!!python/object/apply:os.system ['echo pwned']\n", "YAML"),
    (b"a: !!python/name:os.system\n", "YAML"),
    (b"", "empty"),
    (b"[" * 200, "nesting deeper"),
])
def test_hostile_yaml_rejected_quickly(tmp_path, payload, msg):
    (tmp_path / "x.yaml").write_bytes(payload)
    t0 = time.monotonic()
    reg = load_persona_dir(tmp_path, STOCK_VOICES)
    assert time.monotonic() - t0 < 2.0
    assert len(reg.issues) == 1 and msg in reg.issues[0].message, [str(i) for i in reg.issues]
    assert reg.personas() == []


def test_fuzzed_yaml_never_escapes_as_an_exception(tmp_path):
    base = (SHIPPED / "citysan.yaml").read_bytes()
    rng = random.Random(1234)
    alphabet = b" :-[]{}'\"#&*!|>%@`\n\t,?0123456789abcxyz\x00\xff"
    for i in range(300):
        data = bytearray(base)
        for _ in range(rng.randint(1, 12)):
            op = rng.random()
            pos = rng.randrange(len(data) + 1)
            if op < 0.4 and data:
                del data[pos % len(data)]
            elif op < 0.8:
                data.insert(pos, rng.choice(alphabet))
            else:
                data[pos % len(data)] = rng.choice(alphabet)
        (tmp_path / "f.yaml").write_bytes(bytes(data))
        reg = PersonaRegistry(tmp_path, STOCK_VOICES)
        reg.reload()  # must not raise, whatever the bytes
        for issue in reg.issues:
            assert str(tmp_path / "f.yaml") in str(issue)


def test_live_reload_keeps_last_good_and_calls_keep_their_persona(tmp_path):
    for name in ("citysan.yaml", "teacher.yaml"):
        shutil.copy(SHIPPED / name, tmp_path / name)
    changes = []
    reg = PersonaRegistry(tmp_path, STOCK_VOICES, on_change=changes.append)
    reg.reload()
    in_call = reg.route("1001")  # a call in progress holds this object
    # a valid edit is picked up
    text = (tmp_path / "citysan.yaml").read_text().replace("Upcoming pickup: April 12th.", "Upcoming pickup: May 3rd.")
    (tmp_path / "citysan.yaml").write_text(text)
    reg.start_watching(interval=0.05)
    try:
        deadline = time.monotonic() + 5
        while "May 3rd" not in reg.route("1001").prompt and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "May 3rd" in reg.route("1001").prompt
        assert "April 12th" in in_call.prompt  # unchanged for the call that started before
        # a broken edit is reported and the last good version keeps serving
        # written whole (rename): a watcher that read it half-written would count the empty file too
        (tmp_path / "citysan.yaml.tmp").write_text(text.replace("voice: NATF2", "voice: NOPE\nbad: [1"))
        os.replace(tmp_path / "citysan.yaml.tmp", tmp_path / "citysan.yaml")
        deadline = time.monotonic() + 5
        while not reg.issues and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reg.issues and reg.reload_errors == 1
        assert "May 3rd" in reg.route("1001").prompt
        # a new file is added, a file removed
        (tmp_path / "mars.yaml").write_text((SHIPPED / "mars-astronaut.yaml").read_text())
        os.remove(tmp_path / "teacher.yaml")
        deadline = time.monotonic() + 5
        while (reg.get("mars") is None or reg.get("teacher") is not None) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reg.get("mars") is not None and reg.get("teacher") is None
        assert reg.route("1005").id == "mars" and reg.route("1000") is None
        assert reg.reload_errors == 1  # the unchanged broken file is not counted again
    finally:
        reg.stop_watching()
    assert any(c.changed for c in changes) and any(c.removed for c in changes)


def test_conflicting_edit_keeps_previous_version(tmp_path):
    write(tmp_path, "a.yaml", "kind: assistant\nnumbers: ['100']\nrole: a teacher\nvoice: NATF0\n")
    write(tmp_path, "b.yaml", "kind: assistant\nnumbers: ['200']\nrole: a cook\nvoice: NATF0\n")
    reg = load_persona_dir(tmp_path, STOCK_VOICES)
    write(tmp_path, "b.yaml", "kind: assistant\nnumbers: ['100', '300']\nrole: a chef\nvoice: NATF0\n")
    reg.reload()
    assert reg.route("100").id == "a" and reg.route("200").prompt.endswith("a cook.")
    assert reg.route("300") is None
    assert any("claimed by both" in i.message for i in reg.issues)


def test_cli_check_show_new(tmp_path, capsys):
    from server.cli.main import main

    assert main(["personas", "check", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert "+14155550100  citysan" in out and "NATF2" in out and "ok: 6 personas" in out
    assert main(["personas", "show", "+1 (415) 555-0101", "--dir", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert "jerusalem-shakshuka" in out and UPSTREAM_PROMPTS["jerusalem-shakshuka"] in out
    assert main(["personas", "new", "-o", str(tmp_path / "new.yaml")]) == 0
    capsys.readouterr()
    # the scaffold is itself a valid persona
    assert main(["personas", "check", str(tmp_path)]) == 0
    capsys.readouterr()
    (tmp_path / "bad.yaml").write_text("kind: service\nvoice: NATF0\n")
    assert main(["personas", "check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "missing field 'company'" in err


def test_direction_defaults_to_both_and_is_checked(tmp_path):
    base = "kind: service\nnumbers: ['1']\ncompany: A\nbusiness: b\nagent_name: C\ninformation: [x]\nvoice: NATF0\n"
    write(tmp_path, "a.yaml", "id: a\n" + base)
    write(tmp_path, "b.yaml", "id: b\n" + base.replace("'1'", "'2'") + "direction: outbound\n")
    reg = load_persona_dir(tmp_path, STOCK_VOICES)
    assert not reg.issues, reg.issues
    assert {p.id: p.direction for p in reg.personas()} == {"a": "both", "b": "outbound"}
    bad = tmp_path / "bad"
    bad.mkdir()
    (issue,) = one_problem(bad, "id: c\n" + base + "direction: sideways\n")
    assert issue.field == "direction" and "inbound, outbound, both" in issue.message
