"""A real browser (Debian's chromium, headless, fake microphone from a wav) calls the agent."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.support import ROOT, speech_wav
from tests.support.server import http_json, wait_caller_heard, wait_capacity

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "artifacts"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or shutil.which("espeak-ng") is None or shutil.which("sox") is None,
    reason="needs Debian's chromium, espeak-ng and sox (installed by scripts/setup.sh)")


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
    wait_for(page, "window.__call.state === 'connected'")
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
    assert ready["capacity_left"] == 1 and http_json(server.url + "/api/calls")[1]["calls"] == []
    ends = [ln for ln in server.lines() if ln.get("event") == "call_end"]
    assert ends and ends[-1]["reason"] == "caller_hangup" and ends[-1]["call_id"] == call["call_id"]
    ctx.close()


def test_closing_the_tab_frees_the_slot(server, browser):
    ctx = browser.new_context()
    page = open_and_call(ctx, server, "teacher")
    wait_for(page, "window.__call.state === 'connected'")
    wait_for(page, "window.__call.agentLoudFrames > 2", 40)
    ctx.close()  # no hang-up message: the peer connection just goes away
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        if http_json(server.url + "/api/calls")[1]["calls"] == []:
            break
        time.sleep(0.5)
    assert http_json(server.url + "/api/calls")[1]["calls"] == []


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
