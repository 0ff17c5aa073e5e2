"""The campaign CLI's pure parts: the leads and do-not-call files, the calling window, the retry
rule, the state file across runs, the results file."""

from __future__ import annotations

import csv
import sqlite3
from datetime import datetime, time, timedelta, timezone

import pytest

from agent.errors import BadInput
from server.cli.campaign_leads import DoNotCall, fingerprint, read_leads
from server.cli.campaign_results import write_results
from server.cli.campaign_state import ACTIVE, DIALING, DONE, PENDING, StateStore
from server.cli.campaign_timing import RetryPolicy, Window, parse_duration


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# -- leads ----------------------------------------------------------------------------------------
def test_leads_number_column_anywhere_and_the_rest_are_variables(tmp_path):
    leads, names = read_leads(write(tmp_path / "l.csv", "\ufefffirst_name,number,balance\n"
                                    "Dana, +1 (415) 555-0100 ,12.50\n\n"
                                    "Avi,0044 20 7946 0000,\n"
                                    "Noa,not a number,3\n"
                                    "Eli,sip:1002@127.0.0.1:5070,4\n"))
    assert names == ["first_name", "balance"]
    assert [ld.row for ld in leads] == [1, 2, 3, 4]
    assert leads[0].to == "+1 (415) 555-0100" and leads[0].key == "+14155550100"
    assert leads[0].variables == {"first_name": "Dana", "balance": "12.50"}
    assert leads[1].key == "+442079460000" and leads[1].variables["balance"] == ""
    assert leads[2].key is None  # never dialled: outcome `invalid`
    assert leads[3].to == "sip:1002@127.0.0.1:5070" and leads[3].key == "1002"


def test_leads_short_rows_padded_long_rows_refused(tmp_path):
    leads, _ = read_leads(write(tmp_path / "a.csv", "number,name\n1001\n"))
    assert leads[0].variables == {"name": ""}
    with pytest.raises(BadInput, match="3 cells for 2 columns"):
        read_leads(write(tmp_path / "b.csv", "number,name\n1001,a,b\n"))


@pytest.mark.parametrize("text,match", [("", "empty"), ("phone,name\n1,2\n", "no `number` column"),
                                        ("number,name,name\n1,2,3\n", "name of its own")])
def test_leads_bad_headers_refused(tmp_path, text, match):
    with pytest.raises(BadInput, match=match):
        read_leads(write(tmp_path / "l.csv", text))


def test_missing_leads_file_is_a_sentence(tmp_path):
    with pytest.raises(BadInput, match="cannot read the leads file"):
        read_leads(tmp_path / "nope.csv")


def test_fingerprint_changes_with_any_row(tmp_path):
    a, _ = read_leads(write(tmp_path / "a.csv", "number,name\n1001,Dana\n1002,Avi\n"))
    b, _ = read_leads(write(tmp_path / "b.csv", "number,name\n1001,Dana\n1002,Avi\n"))
    c, _ = read_leads(write(tmp_path / "c.csv", "number,name\n1002,Avi\n1001,Dana\n"))
    d, _ = read_leads(write(tmp_path / "d.csv", "number,name\n1001,Dana\n1002,Ava\n"))
    assert fingerprint(a) == fingerprint(b)
    assert len({fingerprint(a), fingerprint(c), fingerprint(d)}) == 3


# -- do not call ----------------------------------------------------------------------------------
def test_dnc_plain_list_normalised_and_plus_insensitive(tmp_path):
    dnc = DoNotCall.read(write(tmp_path / "dnc.txt", "# opted out\n+1 415-555-0100\n\n"
                               "0044 20 7946 0000  # by phone\n972501234567\n"))
    assert len(dnc) == 3
    assert "+14155550100" in dnc and "14155550100" in dnc
    assert "+442079460000" in dnc
    assert "+972501234567" in dnc and "972501234567" in dnc
    assert "+14155550101" not in dnc and None not in dnc


def test_dnc_csv_with_number_column(tmp_path):
    dnc = DoNotCall.read(write(tmp_path / "dnc.csv", "name,number\nDana,(415) 555 0100\n"))
    assert "4155550100" in dnc and len(dnc) == 1


def test_dnc_junk_entry_refused(tmp_path):
    with pytest.raises(BadInput, match="entry 2 .*not a phone number"):
        DoNotCall.read(write(tmp_path / "dnc.txt", "1001\ncall me maybe\n"))


# -- timing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,seconds", [("90", 90), ("30s", 30), ("10m", 600), ("1.5h", 5400),
                                          ("1d", 86400), ("250ms", 0.25), (" 2 m ", 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "ten minutes", "10 min", "-5s"])
def test_bad_durations(text):
    with pytest.raises(BadInput):
        parse_duration(text)


def at(h: int, m: int = 0, day: int = 7) -> datetime:
    return datetime(2026, 12, day, h, m, tzinfo=timezone(timedelta(hours=2)))


def test_day_window():
    w = Window.parse("09:00-18:00")
    assert (w.start, w.end) == (time(9), time(18))
    assert w.contains(at(9)) and w.contains(at(17, 59)) and not w.contains(at(18)) and not w.contains(at(8, 59))
    assert w.next_open(at(12)) == at(12)
    assert w.next_open(at(7, 30)) == at(9)  # later the same day
    assert w.next_open(at(18, 0)) == at(9, day=8)  # tomorrow
    assert w.next_open(at(23, 59)) == at(9, day=8)
    assert w.next_open(at(7)).tzinfo == at(7).tzinfo


def test_window_across_midnight_and_all_day():
    w = Window.parse("20:00-02:00")
    assert w.contains(at(23)) and w.contains(at(1, 59)) and not w.contains(at(2)) and not w.contains(at(19))
    assert w.next_open(at(12)) == at(20)
    assert w.next_open(at(1)) == at(1)
    assert Window.parse("08:00-24:00").contains(at(23, 59))
    everywhere = Window.parse(None)
    assert everywhere.all_day and all(everywhere.contains(at(h)) for h in range(24))


@pytest.mark.parametrize("text", ["9-18", "09:00", "25:00-26:00", "09:60-10:00", "morning"])
def test_bad_windows(text):
    with pytest.raises(BadInput, match="--window"):
        Window.parse(text)


def test_retry_schedule():
    p = RetryPolicy(retries=2, retry_after=600)
    assert p.max_attempts == 3
    assert p.next_attempt("busy", 1, 1000.0) == 1600.0
    assert p.next_attempt("no_answer", 2, 2000.0) == 2600.0
    assert p.next_attempt("machine", 1, 100.0) == 700.0  # a voicemail is not the person
    assert p.next_attempt("busy", 3, 3000.0) is None  # no retries left
    for final in ("completed", "declined", "failed", "cancelled", "unknown", "rejected", "not_allowed"):
        assert p.next_attempt(final, 1, 1000.0) is None
    assert RetryPolicy(retries=0).next_attempt("busy", 1, 0.0) is None


def test_capacity_backoff_doubles_to_a_ceiling():
    p = RetryPolicy(capacity_backoff=2, capacity_backoff_max=30)
    assert [p.capacity_wait(n) for n in (1, 2, 3, 4, 5, 6)] == [2, 4, 8, 16, 30, 30]


# -- state ----------------------------------------------------------------------------------------
def test_state_resumes_with_each_rows_progress(tmp_path):
    leads, _ = read_leads(write(tmp_path / "l.csv", "number,name\n1001,Dana\n1002,Avi\n1003,Noa\n"))
    meta = {"list": fingerprint(leads), "persona": "citysan"}
    db = tmp_path / "state" / "c.sqlite"
    store, resumed = StateStore.open(db, leads, meta)
    assert not resumed
    rows = store.rows()
    assert [(r.lead.row, r.lead.to, r.status, r.attempts) for r in rows] == [
        (1, "1001", PENDING, 0), (2, "1002", PENDING, 0), (3, "1003", PENDING, 0)]
    rows[0].status, rows[0].attempts, rows[0].call_id = ACTIVE, 1, "c-1"
    rows[1].status, rows[1].attempts, rows[1].outcome, rows[1].next_at = PENDING, 1, "busy", 1234.5
    rows[2].status, rows[2].attempts = DIALING, 1
    for r in rows:
        store.save(r)
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()  # as a killed process would leave it: nothing written at exit

    again, resumed = StateStore.open(db, leads, meta)
    assert resumed
    got = {r.lead.row: r for r in again.rows()}
    assert (got[1].status, got[1].call_id, got[1].attempts) == (ACTIVE, "c-1", 1)
    assert (got[2].outcome, got[2].next_at) == ("busy", 1234.5)
    assert got[3].status == DIALING
    assert got[1].lead.variables == {"name": "Dana"}
    again.close()


def test_state_of_another_list_or_persona_refused(tmp_path):
    leads, _ = read_leads(write(tmp_path / "l.csv", "number\n1001\n"))
    other, _ = read_leads(write(tmp_path / "m.csv", "number\n1002\n"))
    db = tmp_path / "c.sqlite"
    StateStore.open(db, leads, {"list": fingerprint(leads), "persona": "citysan"})[0].close()
    with pytest.raises(BadInput, match="another campaign .list differs"):
        StateStore.open(db, other, {"list": fingerprint(other), "persona": "citysan"})
    with pytest.raises(BadInput, match="persona differs"):
        StateStore.open(db, leads, {"list": fingerprint(leads), "persona": "teacher"})


def test_results_file_in_input_order_with_variables(tmp_path):
    leads, names = read_leads(write(tmp_path / "l.csv", "number,name,outcome\n1001,Dana,x\n1002,Avi,y\n"))
    store, _ = StateStore.open(tmp_path / "c.sqlite", leads, {"list": "f", "persona": "p"})
    rows = store.rows()
    rows[0].status, rows[0].outcome, rows[0].attempts, rows[0].duration_s, rows[0].call_id = \
        DONE, "completed", 2, 12.345, "c-9"
    out = tmp_path / "results.csv"
    write_results(out, rows, names)
    with open(out, newline="") as f:
        got = list(csv.reader(f))
    assert got == [["number", "outcome", "attempts", "duration_s", "call_id", "name", "var_outcome"],
                   ["1001", "completed", "2", "12.3", "c-9", "Dana", "x"],
                   ["1002", "pending", "0", "", "", "Avi", "y"]]
    assert not (tmp_path / "results.csv.tmp").exists()
    store.close()


# -- the loop's decisions that need no server ---------------------------------------------------
def test_outcomes_of_final_call_states():
    from server.cli.campaign_ops import CallStatus
    from server.cli.campaign_run import outcome_of

    assert outcome_of(CallStatus("ended", answered_at=100.0, ended_at=112.5)) == ("completed", 12.5)
    assert outcome_of(CallStatus("ended", answered_at=None, ended_at=101.0)) == ("cancelled", None)
    assert outcome_of(CallStatus("ended", 100.0, 104.0, amd="machine")) == ("machine", 4.0)
    assert outcome_of(CallStatus("ended", 100.0, 104.0, amd="human")) == ("completed", 4.0)
    assert outcome_of(CallStatus("ended", 100.0, 104.0, amd="unknown")) == ("completed", 4.0)
    for state in ("busy", "no_answer", "declined", "failed"):
        assert outcome_of(CallStatus(state)) == (state, None)


async def test_rows_no_dial_may_reach_are_settled_before_the_first_dial(tmp_path):
    """Not a number: `invalid`; on the do-not-call list: `dnc`; a POST a killed run never
    recorded the answer of: `unknown`, not dialled again. With only such rows the campaign
    ends without asking the server anything (its URL here has no listener)."""
    from server.cli.campaign_ops import OpsClient
    from server.cli.campaign_run import Campaign, Settings

    leads, _ = read_leads(write(tmp_path / "l.csv", "number\nnot a number\n+1 415 555 0100\n1003\n"))
    store, _ = StateStore.open(tmp_path / "c.sqlite", leads, {"list": fingerprint(leads), "persona": "p"})
    rows = store.rows()
    rows[2].status, rows[2].attempts = DIALING, 1
    store.save(rows[2])
    client = OpsClient("http://127.0.0.1:9", None)
    try:
        campaign = Campaign(store, client, Settings(persona="p"), DoNotCall({"14155550100"}))
        assert await campaign.run() is True
    finally:
        await client.close()
    assert [(r.status, r.outcome, r.attempts) for r in store.rows()] == [
        (DONE, "invalid", 0), (DONE, "dnc", 0), (DONE, "unknown", 1)]
    assert campaign.dialled == 0
    store.close()


def test_cli_refuses_bad_settings_with_one_sentence(tmp_path, capsys):
    from server.cli.main import main

    leads = write(tmp_path / "l.csv", "number\n1001\n")
    assert main(["campaign", "run", str(leads), "--persona", "p", "--window", "9-18"]) == 2
    assert "error: --window '9-18': write it as HH:MM-HH:MM" in capsys.readouterr().err
    assert main(["campaign", "run", str(write(tmp_path / "m.csv", "phone\n1\n")), "--persona", "p"]) == 2
    assert "has no `number` column" in capsys.readouterr().err
    assert main(["campaign", "run", str(leads), "--persona", "p", "--retry-after", "soon"]) == 2
    assert "'soon' is not a duration" in capsys.readouterr().err
    assert not (tmp_path / "l.campaign.sqlite").exists()  # refused before any state was written


def test_cli_never_sends_the_ops_token_in_clear_off_loopback(tmp_path, capsys, monkeypatch):
    from server.cli.main import main

    leads = write(tmp_path / "l.csv", "number\n1001\n")
    monkeypatch.setenv("CAMPAIGN_TEST_TOKEN", "t" * 32)
    base = ["campaign", "run", str(leads), "--persona", "p", "--ops-token-env", "CAMPAIGN_TEST_TOKEN"]
    assert main(base + ["--ops-url", "http://ops.example.com:9100"]) == 2
    assert "the ops token would cross the network in clear" in capsys.readouterr().err
    assert main(base + ["--ops-url", "127.0.0.1:9100"]) == 2
    assert "give the ops listener's address" in capsys.readouterr().err
    assert not (tmp_path / "l.campaign.sqlite").exists()
