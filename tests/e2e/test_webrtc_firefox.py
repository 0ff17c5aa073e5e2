"""Firefox calls the agent too: Debian's Firefox ESR, headless, over Marionette (tests/support/firefox.py).

Firefox differs from Chromium where it matters here: it hides its host addresses behind mDNS
names (the server must still connect), and it keeps an AudioContext made without a user gesture
(or with no output device) suspended (the page must not depend on one to show the agent's audio).
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.support.firefox import FIREFOX
from tests.support import ROOT, require
from tests.support.server import http_json, wait_caller_heard, wait_capacity

ARTIFACTS = ROOT / "artifacts"



@pytest.fixture(scope="module", autouse=True)
def components():
    require("firefox-esr")
    if FIREFOX is None or importlib.util.find_spec("marionette_driver") is None:
        pytest.fail("required test component missing: firefox-esr / marionette_driver (scripts/setup.sh "
                    "installs both)", pytrace=False)


@pytest.fixture
def firefox(tmp_path):
    from tests.support.firefox import Firefox

    ff = Firefox(tmp_path)
    try:
        yield ff
    finally:
        ff.close()


def test_firefox_call_end_to_end(server, firefox):
    m = firefox.m
    m.navigate(server.url + "/")
    firefox.wait_for("document.querySelector('#persona option[value=citysan]') !== null")
    m.execute_script("document.getElementById('persona').value = 'citysan';")
    m.find_element("id", "call").click()  # a real click: the page gets the user's gesture
    firefox.wait_for("w.__call.state === 'live'")
    # the page hears the agent (decoded, non-silent audio) and receives its text events
    firefox.wait_for("w.__call.agentLoudFrames > 5 && w.__call.texts > 3", 40)
    call = wait_caller_heard(server)
    assert call["persona"] == "citysan" and call["endpoint"] == "webrtc" and call["state"] == "live"
    assert call["frames_in"] > 10 and call["caller_peak"] > 0.05  # Firefox's fake microphone tone arrived
    # Firefox offered only mDNS host candidates; the server dropped them and still connected
    dropped = [ln for ln in server.lines() if ln.get("event") == "webrtc_mdns_candidates_dropped"]
    assert dropped and dropped[0]["call_id"] == call["call_id"]
    assert m.find_element("id", "status").text == "In call."
    ARTIFACTS.mkdir(exist_ok=True)
    firefox.screenshot(ARTIFACTS / "webrtc-call-firefox.png")

    m.find_element("id", "hangup").click()
    ready = wait_capacity(server, 1)
    assert ready["capacity_left"] == 1 and http_json(server.ops_url + "/api/calls")[1]["calls"] == []
    ends = [ln for ln in server.lines() if ln.get("event") == "call_end"]
    assert ends and ends[-1]["reason"] == "caller_hangup" and ends[-1]["call_id"] == call["call_id"]
