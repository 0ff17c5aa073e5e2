"""The supervisor console (issue 24) in headless Chromium against a real server: sign in with the
ops token, watch a SIP call (pjsua2 caller) and a browser call live, a third caller (sipp) waiting
in the queue with its place and its wait counting up, watch the transcript grow, hang the SIP
call up (its peer gets a BYE; the queued caller gets the slot), then find it in History and play
its recording; transfer another SIP call to a configured target (the caller gets the agent's
REFER naming it); break a persona file and see its problem, with file and line, in Personas.
Screenshots of each view go to artifacts/ (the README's tour, docs/console/, is copied from them)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import components_fixture, poll, ROOT, speech_wav, rtp_ports
from tests.support.server import ServerProcess
from tests.support.sip_trace import Sipp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "artifacts"
SIP_CLIENT = ROOT / "tests" / "support" / "sip_client.py"
SCENARIOS = Path(__file__).parent / "sipp"
TOKEN = "console-test-ops-token"
TARGETS = ["sip:desk@127.0.0.1", "+14155550199"]


components = components_fixture("chromium", "pjsua2", "espeak-ng", "sox", "sipp")


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    d = tmp_path_factory.mktemp("consoleaudio")
    wav8 = speech_wav(d / "sipp8k.wav", "Hello, I am still waiting to speak to someone.", 8000)
    ulaw = d / "sipp_ulaw.wav"
    subprocess.run(["sox", str(wav8), "-e", "u-law", str(ulaw)], check=True)
    return {"sip": speech_wav(d / "sip.wav", "Hello, this is Omar Torres. When is my next pickup?", 16000),
            "mic": speech_wav(d / "mic.wav", "Hi, I would like to book a lesson for my son please.", 48000),
            "ulaw": str(ulaw)}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, demo_dir):
    tmp = tmp_path_factory.mktemp("consoleserver")
    s = ServerProcess(tmp, demo_dir.parent, {
        "engine": {"max_calls": 2},
        "sip": {"enabled": True, "rtp_port": rtp_ports()},
        "queue": {"max_waiting": 1, "max_wait_s": 90},
        "ops": {"token_env": "OPS_TOKEN"},
        "recording": {"enabled": True, "dir": str(tmp / "records")},
        "console": {"transfer_targets": TARGETS},
    }, env={"OPS_TOKEN": TOKEN})
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser(audio):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={audio['mic']}", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


def status_of(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"console-{name}.png"), full_page=True)


def console_context(browser):
    """A browser context for the console. Playwright's string predicates are evaluated with
    eval(), which the console's Content-Security-Policy (rightly) forbids: the test's context
    bypasses it, the page itself does not need it."""
    return browser.new_context(bypass_csp=True)


def sign_in(ctx, s, token: str = TOKEN):
    page = ctx.new_page()
    page.goto(s.ops_url + "/console/login")
    page.fill("#name", "Dana (shift lead)")
    page.fill("#token", token)
    page.click("#signin")
    return page


def test_no_token_no_data(srv, browser):
    # every console data route answers 401 without a session, and the page is the sign-in form
    for path in ("/console/api/now", "/console/api/history", "/console/api/personas", "/console/api/now/stream",
                 "/console/api/calls/x"):
        code, body = status_of(srv.ops_url + path)
        assert code == 401 and "calls" not in body and "personas\"" not in body, (path, code, body)
    code, body = status_of(srv.ops_url + "/console/")
    assert code == 401 and 'id="login"' in body and "csrf" not in body
    # a forged cookie is no session
    code, _ = status_of(srv.ops_url + "/console/api/now", headers={"Cookie": "console_session=forged"})
    assert code == 401
    # a wrong token does not sign in (no cookie)
    ctx = console_context(browser)
    page = sign_in(ctx, srv, "wrong")
    assert "not the ops token" in page.inner_text("#error")
    shot(page, "login")
    assert not [c for c in ctx.cookies() if c["name"] == "console_session"]
    ctx.close()
    # nothing of the console on the public port
    assert status_of(srv.url + "/console/")[0] == 404
    assert status_of(srv.url + "/console/login")[0] == 404


@pytest.mark.slow
def test_console_watch_steer_and_review(srv, browser, audio, tmp_path):
    ctx = console_context(browser)
    page = sign_in(ctx, srv)
    page.wait_for_selector("#view-now:not([hidden])")
    cookie = next(c for c in ctx.cookies() if c["name"] == "console_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # scripts cannot read it
    # an action without the CSRF token is refused, with the cookie
    code, _ = status_of(srv.ops_url + "/console/api/calls/x/hangup", data=b"{}",
                        headers={"Cookie": f"console_session={cookie['value']}"})
    assert code == 403

    # two live calls: a SIP caller (pjsua2) and a browser (the public call page)
    sip = subprocess.Popen([sys.executable, str(SIP_CLIENT), f"sip:+14155550100@127.0.0.1:{srv.sip_port}",
                            str(audio["sip"]), str(tmp_path / "sip-heard.wav"), "--seconds", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    caller_ctx = browser.new_context()
    queued = None
    try:
        caller = caller_ctx.new_page()
        caller.goto(srv.url + "/")
        caller.wait_for_selector("#persona option[value=teacher]", state="attached")
        caller.select_option("#persona", "teacher")
        caller.click("#call")
        page.wait_for_function("document.querySelectorAll('#calls tbody tr.call-row').length === 2", timeout=60_000)
        page.wait_for_function("document.querySelector('#slots').textContent.startsWith('2 of 2')")
        rows = page.inner_text("#calls tbody")
        assert "sip" in rows and "webrtc" in rows and "citysan" in rows and "teacher" in rows
        assert page.eval_on_selector_all("#calls tbody tr.call-row", "rows => rows.map(r => r.children[3].textContent)") \
            == ["inbound", "inbound"]  # both calls came in
        assert page.inner_text("#queue-depth") == "0 waiting of at most 1"

        # a third caller waits on hold: the Now view shows it in the queue, its wait counting up
        queued = Sipp(srv.sip_port, SCENARIOS / "uac_queue.xml", "1001", tmp_path,
                      {"@RTP_FILE@": audio["ulaw"], "@PAUSE@": "2000", "@OPT183@": "false"}, timeout=90).start()
        page.wait_for_function("document.querySelectorAll('#queue tbody tr.queue-row').length === 1", timeout=20_000)
        assert page.inner_text("#queue-depth") == "1 waiting of at most 1"
        position, waited, persona, endpoint, _, dialled = (
            c.strip() for c in page.inner_text("#queue tbody tr.queue-row").split("\t"))
        assert (position, persona, endpoint, dialled) == ("1", "citysan", "sip", "1001"), (position, persona)
        page.wait_for_function(f"(() => {{ const c = document.querySelector('#queue tbody tr.queue-row td:nth-child(2)');"
                               f" return c && c.textContent !== '{waited}'; }})()", timeout=5_000)  # live
        shot(page, "now")

        # the SIP call's own view: its transcript grows live
        sip_id = page.eval_on_selector_all(
            "#calls tbody tr.call-row", "rows => rows.find(r => r.children[2].textContent === 'sip').dataset.callId")
        page.click(f"#calls tbody tr[data-call-id='{sip_id}']")
        page.wait_for_selector("#view-call:not([hidden])")
        page.wait_for_function("document.querySelector('#transcript').textContent.length > 0", timeout=30_000)
        n = len(page.text_content("#transcript"))
        page.wait_for_function(f"document.querySelector('#transcript').textContent.length > {n + 5}",
                               timeout=30_000)
        assert page.inner_text("#prompt").strip()
        assert page.eval_on_selector_all("#transfer-target option", "o => o.map(x => x.value)") == TARGETS
        shot(page, "call")

        # listen in, two supervisors at once: each page hears the call (non-silent WebRTC audio),
        # and each connection only receives (the server takes no audio from a supervisor)
        second_ctx = console_context(browser)
        second = sign_in(second_ctx, srv)
        second.wait_for_selector("#view-now:not([hidden])")
        second.goto(srv.ops_url + f"/console/#call/{sip_id}")
        second.wait_for_selector("#view-call:not([hidden])")
        for p in (page, second):
            p.click("#listen")
        for p in (page, second):
            p.wait_for_function("window.__listen.state === 'connected' && window.__listen.loudFrames > 5",
                                timeout=30_000)
            assert p.evaluate("listening.getTransceivers().map(t => t.currentDirection)") == ["recvonly"]
        assert len([ln for ln in srv.lines() if ln.get("event") == "console_listen"]) == 2
        second_ctx.close()

        # transfer only to a configured target (no free text)
        bad = page.evaluate(f"post('/console/api/calls/{sip_id}/transfer', {{target: 'sip:elsewhere@example.com'}})")
        assert bad["status"] == 400 and bad["body"]["error"] == "bad_target"

        # hang it up from the console (after a confirmation): the SIP peer gets a BYE
        page.once("dialog", lambda d: d.accept())
        t0 = time.monotonic()
        page.click("#hangup")
        out, _ = sip.communicate(timeout=30)
        assert time.monotonic() - t0 < 20  # long before its own 60 s hang-up
        summary = json.loads([ln for ln in out.splitlines() if ln.startswith('{"answered"')][-1])
        assert summary["answered"] and summary["remote_hangup"], summary
        page.wait_for_function("document.querySelector('#call-state').textContent.includes('supervisor')")
        end = poll(lambda: [ln for ln in srv.lines() if ln.get("event") == "call_end" and ln.get("call_id") == sip_id],
                   bool, 10)[0]
        assert end["reason"] == "supervisor"
        who = [ln for ln in srv.lines() if ln.get("event") == "console_hangup"]
        assert who and who[0]["by"] == "Dana (shift lead)" and who[0]["call_id"] == sip_id
        # the freed slot goes to the caller on hold: answered, it talks 2 s and hangs up
        rc, trace = queued.wait()
        assert rc == 0, trace[-3000:]

        # History: the finished call, its transcript, and its stereo recording playing in the page
        page.goto(srv.ops_url + "/console/#history")
        page.fill("#q-number", "4155550100")
        page.click("#search button")
        page.wait_for_selector(f"#records tr[data-call-id='{sip_id}']", timeout=20_000)
        assert page.inner_text(f"#records tr[data-call-id='{sip_id}'] td:nth-child(4)") == "inbound"
        shot(page, "history")
        page.click(f"#records tr[data-call-id='{sip_id}']")
        page.wait_for_selector("#view-record:not([hidden])")
        page.wait_for_function("document.querySelectorAll('#record-transcript li').length >= 1")
        assert "supervisor" in page.inner_text("#record-meta")
        page.evaluate("document.querySelector('#record-audio').play()")
        page.wait_for_function("document.querySelector('#record-audio').currentTime > 0.5", timeout=20_000)
        assert page.evaluate("document.querySelector('#record-audio').duration") > 1.0
        shot(page, "record")

        # Personas: which number reaches which persona
        page.goto(srv.ops_url + "/console/#personas")
        page.wait_for_function("document.querySelectorAll('#personas tbody tr').length > 1")
        assert "citysan" in page.inner_text("#personas tbody")
        assert set(page.eval_on_selector_all("#personas tbody tr", "rows => rows.map(r => r.children[1].textContent)")) \
            <= {"inbound", "outbound", "both"}
        shot(page, "personas")
    finally:
        if sip.poll() is None:
            sip.kill()
            sip.communicate()
        if queued is not None:
            queued.kill()
        caller_ctx.close()
        ctx.close()
    # the browser call ends with its page (the server stops with no call in flight)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert poll(lambda: json.loads(status_of(srv.ops_url + "/api/calls", headers=auth)[1])["calls"],
                lambda c: c == [], 45) == []


def test_console_transfer_after_confirmation_sends_the_agents_refer_to_the_target(srv, browser, audio, tmp_path):
    """A SIP call transferred from the console: a dismissed confirmation does nothing; once
    confirmed, the agent's blind transfer (a REFER to the caller naming the target, as
    `telephony.sip.call` implements it) reaches the caller, the call ends `transferred`, and the
    action is logged with who did it."""
    target = TARGETS[0]
    caller = Sipp(srv.sip_port, SCENARIOS / "uac_refer_console.xml", "1001", tmp_path,
                  {"@RTP_FILE@": audio["ulaw"], "@TARGET@": target}, timeout=90).start()
    ctx = console_context(browser)
    try:
        page = sign_in(ctx, srv)
        page.wait_for_selector("#view-now:not([hidden])")
        page.wait_for_function("document.querySelectorAll('#calls tbody tr.call-row').length === 1", timeout=30_000)
        call_id = page.get_attribute("#calls tbody tr.call-row", "data-call-id")
        page.click(f"#calls tbody tr[data-call-id='{call_id}']")
        page.wait_for_selector("#view-call:not([hidden])")
        page.wait_for_function("document.querySelector('#call-state').textContent === 'live'", timeout=20_000)
        page.select_option("#transfer-target", target)
        asked: list[str] = []

        def answer(accept: bool):
            def on_dialog(d):
                asked.append(d.message)
                d.accept() if accept else d.dismiss()
            return on_dialog
        # dismissed: nothing is sent, the call goes on
        page.once("dialog", answer(False))
        page.click("#transfer")
        assert poll(lambda: asked, bool, 5) == [f"Transfer call {call_id} to {target}?"]
        assert page.inner_text("#action-result") == "" and caller.proc.poll() is None
        assert not [ln for ln in srv.lines() if ln.get("event") == "console_transfer"]
        # confirmed: the caller gets the REFER to the target, accepts, and the agent hangs up
        page.once("dialog", answer(True))
        page.click("#transfer")
        page.wait_for_function("document.querySelector('#action-result').textContent.includes('requested')")
        assert page.inner_text("#action-result") == f"Transfer to {target} requested."
        rc, trace = caller.wait()
        assert rc == 0, trace[-3000:]
        refer = [m for m in caller.trace if m.method == "REFER" and not m.sent]
        assert len(refer) == 1 and target in refer[0].header("Refer-To"), refer
        page.wait_for_function("document.querySelector('#call-state').textContent.includes('transferred')",
                               timeout=10_000)
        shot(page, "transfer")
    finally:
        caller.kill()
        ctx.close()
    end = poll(lambda: [ln for ln in srv.lines() if ln.get("event") == "call_end" and ln.get("call_id") == call_id],
               bool, 10)
    assert end and end[0]["reason"] == "transferred", end
    (logged,) = [ln for ln in srv.lines() if ln.get("event") == "console_transfer"]
    assert logged["call_id"] == call_id and logged["by"] == "Dana (shift lead)" and logged["target"] == target
    assert [(ln["target"], ln["by"]) for ln in srv.lines() if ln.get("event") == "transfer_requested"
            and ln.get("call_id") == call_id] == [(target, "Dana (shift lead)")]


def test_personas_view_shows_the_last_reloads_problems_with_file_and_line(srv, browser):
    """A persona file broken while the server runs: the Personas view lists its problem with the
    file and line (the good personas stay), and the list clears once the file is fixed."""
    broken = srv.config.parent / "personas" / "zz-broken.yaml"
    broken.write_text("kind: service\nnumbers: ['1077']\ncompany: Broken Co\nvoice: [not, a, voice\n")
    ctx = console_context(browser)
    try:
        page = sign_in(ctx, srv)
        page.wait_for_selector("#view-now:not([hidden])")

        page.goto(srv.ops_url + "/console/#personas")

        def problems() -> list[str]:
            page.reload()  # a fresh page: the view as a supervisor opening it now sees it
            page.wait_for_function("document.querySelectorAll('#problems li').length > 0")
            return page.eval_on_selector_all("#problems li", "li => li.map(x => x.textContent)")
        got = poll(problems, lambda ps: any("zz-broken.yaml" in p for p in ps), 15)
        (mine,) = [p for p in got if "zz-broken.yaml" in p]
        assert re.match(rf"{re.escape(str(broken))}:\d+: YAML syntax error", mine), mine  # file and line
        assert "citysan" in page.inner_text("#personas tbody")
        shot(page, "personas")
        broken.unlink()
        assert poll(problems, lambda ps: ps == ["none"], 15) == ["none"]
    finally:
        broken.unlink(missing_ok=True)
        ctx.close()
