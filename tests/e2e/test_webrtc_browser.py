"""A real browser (Debian's chromium, headless, fake microphone from a wav) calls the agent."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.support import components_fixture, poll, ROOT, speech_wav
from tests.support.server import http_json, wait_caller_heard, wait_capacity

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "artifacts"



components = components_fixture("chromium", "espeak-ng", "sox")


@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory):
    d = tmp_path_factory.mktemp("mic")
    return speech_wav(d / "mic.wav", "Hello, this is Omar Torres. When is my next pickup? "
                      "Can I add the compost bin service?", 48000)


@pytest.fixture(scope="module")
def browser(mic_wav):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic_wav}", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


def wait_for(page, expr: str, timeout: float = 30.0):
    page.wait_for_function(expr, timeout=timeout * 1000)


def open_and_call(ctx, server, persona: str):
    """A page in `ctx` that picked `persona` and pressed Call."""
    page = ctx.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector(f"#persona option[value={persona}]", state="attached")
    page.select_option("#persona", persona)
    page.click("#call")
    return page


def test_browser_call_end_to_end(server, browser):
    ctx = browser.new_context()
    page = open_and_call(ctx, server, "citysan")
    wait_for(page, "['connected', 'answering', 'live'].includes(window.__call.state)")
    # the page hears the agent (non-silent WebRTC audio) and receives its text events
    wait_for(page, "window.__call.agentLoudFrames > 5 && window.__call.texts > 3", 40)
    call = wait_caller_heard(server)
    assert call["persona"] == "citysan" and call["endpoint"] == "webrtc" and call["state"] == "live"
    assert call["frames_in"] > 10 and call["caller_peak"] > 0.05  # the fake microphone's speech arrived
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webrtc-call.png"), full_page=True)
    assert page.inner_text("#status") == "In call."
    assert len(page.inner_text("#transcript")) > 3

    # a second caller while the only slot is taken gets "server busy" on the page
    page2 = open_and_call(ctx, server, "citysan")
    wait_for(page2, "window.__call.state === 'busy'")
    assert "Server busy" in page2.inner_text("#status")

    # hanging up frees the slot
    page.click("#hangup")
    ready = wait_capacity(server, 1)
    assert ready["capacity_left"] == 1 and http_json(server.ops_url + "/api/calls")[1]["calls"] == []
    ends = [ln for ln in server.lines() if ln.get("event") == "call_end"]
    assert ends and ends[-1]["reason"] == "caller_hangup" and ends[-1]["call_id"] == call["call_id"]
    ctx.close()


def test_closing_the_tab_frees_the_slot(server, browser):
    ctx = browser.new_context()
    page = open_and_call(ctx, server, "teacher")
    wait_for(page, "['connected', 'answering', 'live'].includes(window.__call.state)")
    wait_for(page, "window.__call.agentLoudFrames > 2", 40)
    ctx.close()  # no hang-up message: the peer connection just goes away
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        if http_json(server.ops_url + "/api/calls")[1]["calls"] == []:
            break
        time.sleep(0.5)
    assert http_json(server.ops_url + "/api/calls")[1]["calls"] == []


def test_microphone_blocked_message(server, browser):
    ctx = browser.new_context()
    page = ctx.new_page()
    page.add_init_script("navigator.mediaDevices.getUserMedia = () => Promise.reject("
                         "new DOMException('denied', 'NotAllowedError'));")
    page.goto(server.url + "/")
    page.wait_for_selector("#persona option", state="attached")
    page.click("#call")
    page.wait_for_function("document.getElementById('status').textContent.includes('Microphone blocked')")
    ctx.close()


def test_playground_drafts_calls_and_saves_a_persona(tmp_path, demo_dir, browser):
    """Ops staff try a prompt of their own: the form's persona, voice and sampling reach the call,
    the agent answers, and "Save as persona YAML" gives a file `personas check` accepts."""
    import json
    import subprocess
    import sys

    from tests.support.server import ServerProcess

    srv = ServerProcess(tmp_path, demo_dir.parent, {"engine": {"max_calls": 1},
                                                     "recording": {"enabled": True, "dir": str(tmp_path / "rec")}})
    try:
        srv.wait_ready()
        ctx = browser.new_context(accept_downloads=True)
        page = ctx.new_page()
        page.goto(srv.url + "/")
        page.wait_for_selector("#playground:not([hidden])")
        page.click("#playground summary")
        page.wait_for_selector("#pg-voice option[value=VARF1]", state="attached")
        # the kinds and each kind's inputs are the server's list, not the page's own
        info = http_json(srv.url + "/api/playground")[1]
        assert page.eval_on_selector_all("#pg-kind option", "els => els.map((e) => e.value)") == info["kinds"]
        for kind in info["kinds"]:
            for field in info["fields"][kind]:
                assert page.query_selector(f"fieldset[data-kind={kind}] #pg-{field}"), (kind, field)
        page.select_option("#pg-kind", "service")
        page.fill("#pg-company", "Lumen Plumbing")
        page.fill("#pg-business", "plumbing repair service")
        page.fill("#pg-agent_name", "Sam Rivera")
        page.fill("#pg-information", "Emergency call-out costs $120.\n\nVerify the address before booking.")
        page.select_option("#pg-voice", "VARF1")
        for slider, value in (("temp_text", "0.35"), ("topk_text", "7"), ("temp_audio", "0.6")):
            page.eval_on_selector(f"#pg-{slider}", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                                  value)
        assert page.inner_text("output[for=pg-topk_text]") == "7"
        page.click("#pg-call")
        wait_for(page, "['connected', 'answering', 'live'].includes(window.__call.state)")
        wait_for(page, "window.__call.agentLoudFrames > 5 && window.__call.texts > 3", 40)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        start = next(ln for ln in srv.lines() if ln.get("event") == "call_start")
        assert start["persona"] == "playground" and start["voice"] == "VARF1"
        assert start["sampling"]["temp_text"] == 0.35 and start["sampling"]["topk_text"] == 7
        assert start["sampling"]["temp_audio"] == 0.6
        page.click("#hangup")
        wait_capacity(srv, 1)
        record = poll(lambda: list((tmp_path / "rec").glob("*.json")), bool, 10)
        meta = json.loads(record[0].read_text())
        assert meta["prompt"] == ("You work for Lumen Plumbing which is a plumbing repair service and your name "
                                  "is Sam Rivera. Information: Emergency call-out costs $120. Verify the address "
                                  "before booking.")
        # the draft as a persona file
        page.fill("#pg-id", "lumen")
        page.fill("#pg-numbers", "+1 415 555 0199, 2077")
        with page.expect_download() as dl:
            page.click("#pg-save")
        drafts = tmp_path / "drafts"
        drafts.mkdir()
        saved = drafts / dl.value.suggested_filename
        dl.value.save_as(saved)
        assert saved.name == "lumen.yaml"
        check = subprocess.run([sys.executable, "-m", "server", "personas", "check", str(drafts)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        assert "lumen" in check.stdout and "+14155550199" in check.stdout
        show = subprocess.run([sys.executable, "-m", "server", "personas", "show", "2077", "--dir", str(drafts)],
                              capture_output=True, text=True, timeout=60)
        assert meta["prompt"] in show.stdout and "VARF1" in show.stdout
        # a broken form is refused with its problems named, nothing is called
        page.fill("#pg-company", "")
        page.click("#pg-call")
        page.wait_for_selector("#pg-problems li")
        assert "company" in page.inner_text("#pg-problems")
        ctx.close()
    finally:
        srv.stop()
