"""The console's pure parts: history search, record names, sessions (no server, no browser)."""

from __future__ import annotations

import time

from server.config import ServerConfig
from server.console import history
from server.console.auth import Sessions

REC = {"persona": "citysan", "caller_number": "tester", "dialled_number": "+14155550100",
       "started_at": "2026-12-05T10:10:10.000Z", "reason": "supervisor"}


def test_history_search_fields():
    assert history.matches(REC, "", "", "", "")
    assert history.matches(REC, "citysan", "4155550100", "2026-12", "supervisor")
    assert history.matches(REC, "", "tester", "", "")
    assert not history.matches(REC, "teacher", "", "", "")
    assert not history.matches(REC, "", "999", "", "")
    assert not history.matches(REC, "", "", "2026-11", "")
    assert not history.matches(REC, "", "", "", "caller_hangup")


def test_record_names_stay_in_the_directory():
    assert history.NAME.match("20261205T101010Z-3f2a9c")
    for bad in ("../etc/passwd", "20261205T101010Z-../x", "x.json", "20261205T101010Z-a/b", ""):
        assert not history.NAME.match(bad) or ".." in bad, bad


def test_sessions_expire_and_drop():
    s = Sessions(ttl_s=60)
    a = s.create("dana")
    assert s.get(a.sid) is a and a.csrf and a.csrf != a.sid
    assert s.get("forged") is None and s.get(None) is None
    s.drop(a.sid)
    assert s.get(a.sid) is None
    b = s.create("lee")
    b.expires = time.monotonic() - 1
    assert s.get(b.sid) is None


def test_console_config_defaults():
    c = ServerConfig().console
    assert c.enabled and c.transfer_targets == [] and c.max_viewers == 16
