"""The audit log as a hash chain: whoever changes, removes, reorders or cuts off events is caught,
by the server's verify-audit command and by the client's check of an export."""

import ast
import contextlib
import datetime as dt
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading

import pytest
import webtest

from conftest import QUESTION, ROOT, WIRE, free_port, mounted, read_only_view, run_cli, stored, token_of, wait_until
from test_database import make_database
import pausepoint

sys.path.insert(0, os.path.join(ROOT, "client"))
from pausepoint_client import AuditChainBroken, verify_audit_export  # noqa: E402


@pytest.fixture
def logged(running_api):
    """An api whose live and test chains hold a few events each, and the live key."""
    api = running_api()
    keys = api.register()
    for key in (keys["api_key"], keys["test_api_key"]):
        for _ in range(3):
            created = api.post_json("/v1/pause", {**WIRE, "channel": "link", "recipient": "ops",
                                                  "metadata": {"note": "café ✓"}}, headers=api.as_key(key)).json
            api.post_json(f"/v1/respond/{token_of(created['respond_url'])}", {"choice": "Approve"})
    return api, keys["api_key"]


def export(api, key, tmp_path, **query):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(api.get("/v1/audit/export", query, headers=api.as_key(key)).body)
    return str(path)


def tamper(config, sql, *args):
    """Change the log behind the server's back, its append-only triggers dropped first."""
    db = sqlite3.connect(config["database.path"])
    with db:
        db.execute("DROP TRIGGER IF EXISTS audit_events_are_never_updated")
        db.execute("DROP TRIGGER IF EXISTS live_audit_events_are_never_deleted")
        db.execute(sql, args)
    db.close()


def verify_audit(config):
    """The operator's command, run as the command line runs it: (exit status, what it printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = pausepoint.main(["--db", config["database.path"], "verify-audit"])
    return status, printed.getvalue()


def live_seqs(config):
    return [seq for seq, in stored(config, "SELECT seq FROM audit_events WHERE livemode = 1 ORDER BY seq")]


def test_every_event_is_chained_to_the_one_before_in_its_developers_chain_for_its_mode(logged, tmp_path):
    api, key = logged
    events = [json.loads(line) for line in open(export(api, key, tmp_path), encoding="utf-8")]
    assert events[0]["prev_hash"] == "0" * 64 and all(e["livemode"] for e in events)
    assert [e["prev_hash"] for e in events[1:]] == [e["hash"] for e in events[:-1]]
    assert verify_audit_export(export(api, key, tmp_path)) == len(events) == len(live_seqs(api.config))
    listed = api.get("/v1/audit", headers=api.as_key(key)).json["events"][0]
    assert (listed["hash"], listed["prev_hash"]) == (events[-1]["hash"], events[-1]["prev_hash"])
    assert verify_audit(api.config) == (0, "every audit chain holds: 12 events in 2 chains\n"
                                           "every receipt checks: 6 decided pauses say what their receipts do\n")


def test_a_changed_event_is_caught_and_named(logged, tmp_path):
    api, key = logged
    changed = live_seqs(api.config)[2]
    tamper(api.config, "UPDATE audit_events SET data = replace(data, 'Approve', 'Reject') WHERE seq = ?", changed)
    status, said = verify_audit(api.config)
    assert status == 1 and said.startswith(f"aud_{changed} (") and "it was changed" in said
    with pytest.raises(AuditChainBroken, match=f"aud_{changed} .*it was changed"):
        verify_audit_export(export(api, key, tmp_path))


@pytest.mark.parametrize("shown", [True, 1.0, "1"])
def test_an_export_whose_data_shows_another_value_than_was_hashed_fails_even_if_python_calls_them_equal(
        running_api, tmp_path, shown):
    api = running_api()
    key = api.register()["api_key"]
    api.post_json("/v1/pause", {**WIRE, "channel": "link", "recipient": "ops", "metadata": {"n": 1}},
                  headers=api.as_key(key))
    path = export(api, key, tmp_path)
    assert verify_audit_export(path) == 1
    with open(path, encoding="utf-8") as f:
        [event] = [json.loads(line) for line in f]
    event["data"]["metadata"]["n"] = shown
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")
    with pytest.raises(AuditChainBroken, match="its data is not the data it was hashed with"):
        verify_audit_export(path)


def test_a_removed_event_is_caught_at_the_one_after_it(logged, tmp_path):
    api, key = logged
    seqs = live_seqs(api.config)
    tamper(api.config, "DELETE FROM audit_events WHERE seq = ?", seqs[3])
    status, said = verify_audit(api.config)
    assert status == 1 and f"aud_{seqs[4]} (" in said and "removed or moved" in said
    with pytest.raises(AuditChainBroken, match=f"aud_{seqs[4]} .*removed or moved"):
        verify_audit_export(export(api, key, tmp_path))


def test_two_events_swapped_are_caught(logged, tmp_path):
    api, key = logged
    first, second = live_seqs(api.config)[1:3]
    columns = "timestamp, actor, event_type, pause_id, data, prev_hash, hash"
    rows = stored(api.config, f"SELECT seq, {columns} FROM audit_events WHERE seq IN (?, ?) ORDER BY seq", first, second)
    for seq, (_, *content) in zip((first, second), reversed(rows)):
        tamper(api.config, "UPDATE audit_events SET timestamp = ?, actor = ?, event_type = ?, pause_id = ?, data = ?,"
                           " prev_hash = ?, hash = ? WHERE seq = ?", *content, seq)
    status, said = verify_audit(api.config)
    assert status == 1 and said.startswith(f"aud_{first} (") and "removed or moved" in said
    with pytest.raises(AuditChainBroken, match=f"aud_{first} "):
        verify_audit_export(export(api, key, tmp_path))


def test_a_tail_cut_off_is_caught_against_a_head_noted_earlier(logged, tmp_path):
    api, key = logged
    noted = api.get("/v1/audit/head", headers=api.as_key(key)).json
    assert noted["count"] == len(live_seqs(api.config)) and noted["livemode"] is True
    api.post_json("/v1/pause", {**WIRE, "channel": "link", "recipient": "ops"}, headers=api.as_key(key))
    assert verify_audit_export(export(api, key, tmp_path), head=noted) == noted["count"] + 1
    # Everything from the noted head on is cut off: what is left still chains, but misses the head.
    # On the server, the pause whose decision went with it still shows it was decided.
    tamper(api.config, "DELETE FROM audit_events WHERE livemode = 1 AND seq >= ?", live_seqs(api.config)[-2])
    status, said = verify_audit(api.config)
    assert status == 1 and said.startswith("every audit chain holds") and "and no decision of it" in said
    with pytest.raises(AuditChainBroken, match="never reaches the noted head"):
        verify_audit_export(export(api, key, tmp_path), head=noted)
    # Without the noted head, what is left looks whole: the head is what proves the cut.
    assert verify_audit_export(export(api, key, tmp_path)) == noted["count"] - 1


def test_an_export_streams_a_window_as_json_lines_or_csv(logged, tmp_path):
    api, key = logged
    everything = [json.loads(line) for line in open(export(api, key, tmp_path), encoding="utf-8")]
    middle = everything[3]["timestamp"]
    later = [json.loads(line) for line in open(export(api, key, tmp_path, since=middle), encoding="utf-8")]
    assert later == [e for e in everything if e["timestamp"] >= middle] and len(later) < len(everything)
    assert verify_audit_export(export(api, key, tmp_path, since=middle)) == len(later)
    earlier = [json.loads(line) for line in open(export(api, key, tmp_path, until=middle), encoding="utf-8")]
    assert earlier == [e for e in everything if e["timestamp"] < middle]
    csv_lines = api.get("/v1/audit/export", {"format": "csv"}, headers=api.as_key(key)).text.splitlines()
    assert csv_lines[0] == "id,seq,developer_id,livemode,timestamp,actor,event_type,pause_id,data,prev_hash,hash"
    assert len(csv_lines) == len(everything) + 1 and csv_lines[-1].endswith(everything[-1]["hash"])
    refused = api.get("/v1/audit/export", {"since": "yesterday"}, headers=api.as_key(key), status=422).json
    assert refused["error"]["field"] == "since"


def test_a_misspelt_event_type_is_refused_naming_the_ones_there_are(logged):
    api, key = logged
    error = api.get("/v1/audit", {"event_type": "pause.approved"}, headers=api.as_key(key), status=422).json["error"]
    assert error["field"] == "event_type" and "pause.responded, pause.timed_out" in error["message"]
    assert len(api.get("/v1/audit", {"event_type": "pause.responded"}, headers=api.as_key(key)).json["events"]) == 3
    assert len(api.get("/v1/audit", {"event_type": ""}, headers=api.as_key(key)).json["events"]) == 6


# What f-strings and names given to record_event() stand for: a pause's end, a step's kind.
WRITTEN_AS = {"f\"pause.{pause['status']}\"": {"pause.responded", "pause.timed_out", "pause.cancelled"},
              "f\"pause.{step['kind']}_skipped\"": {"pause.reminder_skipped", "pause.escalation_skipped"},
              "event": {"notification.sent", "notification.failed"}}


def test_the_audit_filter_knows_every_event_type_the_server_writes():
    with open(pausepoint.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    written, types = set(), []
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "record_event":
            types.append(call.args[4])
        elif (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "record_events"
              and isinstance(call.args[1], ast.ListComp)):       # record_event()'s own call gives a list
            types.append(call.args[1].elt.elts[3])              # [(developer, mode, actor, event_type, …) for …]
    for given in types:
        written |= WRITTEN_AS.get(ast.unparse(given)) or {ast.literal_eval(given)}
    assert written == set(pausepoint.AUDIT_EVENT_TYPES)


def test_each_developer_and_mode_sees_only_its_own_chain(logged, tmp_path):
    api, key = logged
    other = api.register(email="other@example.com")["api_key"]
    assert api.get("/v1/audit/export", headers=api.as_key(other)).body == b""
    assert api.get("/v1/audit/head", headers=api.as_key(other)).json["hash"] == "0" * 64
    test_events = [json.loads(line) for line in open(export(api, api.register(email="x@example.com")["test_api_key"],
                                                            tmp_path), encoding="utf-8")]
    assert test_events == []


def test_pruning_takes_only_the_oldest_part_of_a_test_chain_so_the_rest_still_verifies(running_api, tmp_path):
    api = running_api()
    key = api.register()["test_api_key"]
    for _ in range(4):
        api.post_json("/v1/pause", {**WIRE, "channel": "link", "recipient": "ops"}, headers=api.as_key(key))
    seqs = [seq for seq, in stored(api.config, "SELECT seq FROM audit_events ORDER BY seq")]
    # The first two events are past retention, the rest not.
    stored(api.config, "DROP TRIGGER audit_events_are_never_updated")
    stored(api.config, "UPDATE audit_events SET timestamp = '2000-01-01T00:00:00.000Z' WHERE seq IN (?, ?)", *seqs[:2])
    pausepoint.prune_expired_data(api.app.runtime.db(), api.config)
    assert [seq for seq, in stored(api.config, "SELECT seq FROM audit_events ORDER BY seq")] == seqs[2:]
    assert pausepoint.audit_chain_breaks(api.app.runtime.db()) == []


def one_by_one(config):
    """The events as a reader that pages through them sees them: each read anew."""
    with contextlib.closing(sqlite3.connect(config["database.path"])) as conn:
        conn.row_factory = sqlite3.Row
        after = 0
        while row := conn.execute("SELECT * FROM audit_events WHERE seq > ? ORDER BY seq LIMIT 1", (after,)).fetchone():
            yield row
            after = row["seq"]


def test_a_test_chain_pruned_while_it_is_verified_still_verifies_and_a_gap_still_breaks_it(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    for _ in range(8):
        api.post_json("/v1/pause", {**WIRE, "channel": "link", "recipient": "ops"}, headers=api.as_key(key))
    seqs = [seq for seq, in stored(api.config, "SELECT seq FROM audit_events WHERE livemode = 0 ORDER BY seq")]
    events = one_by_one(api.config)
    read = [next(events)]           # the verifier has read the oldest event when the hourly prune runs
    stored(api.config, "DROP TRIGGER audit_events_are_never_updated")
    stored(api.config, "UPDATE audit_events SET timestamp = '2000-01-01T00:00:00.000Z' WHERE seq <= ? AND livemode = 0",
           seqs[3])
    pausepoint.prune_expired_data(api.app.runtime.db(), api.config)
    assert stored(api.config, "SELECT min(seq) FROM audit_events WHERE livemode = 0") == [(seqs[4],)]
    assert pausepoint.audit_chain_breaks(api.app.runtime.db(), itertools.chain(read, events)) == []
    stored(api.config, "DELETE FROM audit_events WHERE seq = ?", seqs[6])       # not a prefix: a gap
    [(seq, _, livemode, why)] = pausepoint.audit_chain_breaks(api.app.runtime.db())
    assert (seq, livemode) == (seqs[7], 0) and "removed or moved" in why


def test_a_live_chain_missing_its_first_event_is_caught(logged):
    api, _ = logged
    first = live_seqs(api.config)[0]
    tamper(api.config, "DELETE FROM audit_events WHERE seq = ?", first)
    status, said = verify_audit(api.config)
    assert status == 1 and f"aud_{live_seqs(api.config)[0]} (" in said and "(dev_" in said and ", live)" in said


def netstring_hash(event):
    """The README's hash, written here from its words alone, as another language would."""
    fields = [event["prev_hash"], event["developer_id"], "1" if event["livemode"] else "0", event["timestamp"],
              event["actor"], event["event_type"], event["pause_id"] or "", event["data_json"]]
    return hashlib.sha256(b"".join(b"%d:%s," % (len(f.encode()), f.encode()) for f in fields)).hexdigest()


def test_the_documented_hash_rebuilds_every_exported_event_whatever_its_data(running_api, tmp_path):
    api = running_api()
    key = api.register()["api_key"]
    metadata = {"small": 0.00001, "whole": 1.0, "big": 12345678901234567890, "10": "numeric key", "emoji": "💸",
                "separator": "\u2028", "nested": {"a": [1, None, True]}}
    api.post_json("/v1/pause", {**WIRE, "channel": "link", "recipient": "ops\nline two", "metadata": metadata},
                  headers=api.as_key(key))
    events = [json.loads(line) for line in open(export(api, key, tmp_path), encoding="utf-8")]
    assert events and all(netstring_hash(event) == event["hash"] for event in events)


def test_an_events_data_stores_other_scripts_as_utf8_not_as_escapes_three_times_their_size(running_api, tmp_path):
    api = running_api()
    key = api.register()["test_api_key"]
    message = "💸" * 1600           # 6,400 bytes of UTF-8; escaped, each took 12
    api.post_json("/v1/pause", {**WIRE, "channel": "email", "recipient": "ops@example.com", "message": message,
                                "metadata": {"note": "‮evil"}}, headers=api.as_key(key))
    api.step("notifications")
    [(text_bytes, data_bytes)] = stored(api.config, "SELECT length(CAST(n.text AS BLOB)), length(CAST(a.data AS BLOB))"
                                                    " FROM notifications n JOIN audit_events a ON a.pause_id = n.pause_id"
                                                    " AND a.event_type = 'notification.simulated'")
    assert data_bytes < text_bytes + 1000
    # What would make an export read as something else is still escaped, and it all still verifies.
    [(created,)] = stored(api.config, "SELECT data FROM audit_events WHERE event_type = 'pause.created'")
    assert "\\u202e" in created and "\u202e" not in created
    path = tmp_path / "audit.jsonl"
    path.write_bytes(api.get("/v1/audit/export", headers=api.as_key(key)).body)
    assert verify_audit_export(str(path)) == 2


def test_a_head_and_its_count_are_read_at_one_moment_while_events_are_written(running_api):
    api = running_api()
    keys = api.register()
    writer = pausepoint.connect(api.config["database.path"], api.app.runtime.write_lock, same_thread=False)
    stop = threading.Event()

    def write():
        while not stop.is_set():
            with pausepoint.transaction(writer):
                pausepoint.record_event(writer, keys["developer_id"], 1, "system", "load.test")

    thread = threading.Thread(target=write)
    thread.start()
    try:
        heads = [api.get("/v1/audit/head", headers=api.as_key(keys["api_key"])).json for _ in range(200)]
    finally:
        stop.set()
        thread.join()
    positions = {row[0]: n for n, row in enumerate(stored(api.config, "SELECT hash FROM audit_events WHERE livemode = 1"
                                                                      " ORDER BY seq"), 1)}
    assert len({head["count"] for head in heads}) > 5            # the log grew while the heads were read
    assert [head["count"] for head in heads] == [positions.get(head["hash"], 0) for head in heads]


def test_a_live_export_missing_its_oldest_events_fails_against_a_head(logged, tmp_path):
    api, key = logged
    noted = api.get("/v1/audit/head", headers=api.as_key(key)).json
    tamper(api.config, "DELETE FROM audit_events WHERE seq IN (SELECT seq FROM audit_events WHERE livemode = 1"
                       " ORDER BY seq LIMIT 3)")
    assert verify_audit_export(export(api, key, tmp_path)) == noted["count"] - 3      # alone, it looks whole
    with pytest.raises(AuditChainBroken, match="does not start at the chain's first event"):
        verify_audit_export(export(api, key, tmp_path), head=noted)


def test_times_never_go_back_along_a_chain_so_any_window_verifies(running_api, tmp_path):
    api = running_api()
    keys = api.register()
    conn = api.app.runtime.db()
    with pausepoint.transaction(conn):
        pausepoint.record_event(conn, keys["developer_id"], 1, "system", "first", when="2026-11-29T12:00:00.500Z")
        pausepoint.record_event(conn, keys["developer_id"], 1, "system", "late", when="2026-11-29T12:00:00.100Z")
        pausepoint.record_event(conn, keys["developer_id"], 1, "system", "third", when="2026-11-29T12:00:00.700Z")
    assert [t for t, in stored(api.config, "SELECT timestamp FROM audit_events ORDER BY seq")] == [
        "2026-11-29T12:00:00.500Z", "2026-11-29T12:00:00.500Z", "2026-11-29T12:00:00.700Z"]
    window = export(api, keys["api_key"], tmp_path, since="2026-11-29T17:00:00.600+05:00")      # 12:00:00.6 UTC
    assert [json.loads(line)["event_type"] for line in open(window, encoding="utf-8")] == ["third"]
    assert verify_audit_export(export(api, keys["api_key"], tmp_path, since="2026-11-29T12:00:00.300Z")) == 3
    # Any RFC 3339 time, as the document says: a lower-case t and z, a leap second (the moment the
    # next minute starts), offsets that take a time past the years there are, and year 0000
    # (before every event, whatever its offset).
    everything = ["first", "late", "third"]
    for window, expected in (({"since": "2026-11-29t12:00:00.600z"}, ["third"]),
                             ({"since": "2026-11-29T11:59:60.600Z"}, ["third"]),
                             ({"until": "2026-11-29T11:59:60.600Z"}, ["first", "late"]),
                             ({"since": "0001-01-01T00:00:00+05:00", "until": "9999-12-31T23:59:59-23:59"}, everything),
                             ({"since": "0000-01-01T00:00:00Z"}, everything),
                             ({"since": "0000-02-29T23:59:60+23:59", "until": "2026-11-30T00:00:00Z"}, everything),
                             ({"until": "0000-12-31T23:59:59-23:59"}, [])):
        lines = open(export(api, keys["api_key"], tmp_path, **window), encoding="utf-8")
        assert [json.loads(line)["event_type"] for line in lines] == expected, window
    refused = api.get("/v1/audit/export", {"since": "0000-02-30T00:00:00Z"}, headers=api.as_key(keys["api_key"]),
                      status=422).json
    assert refused["error"]["field"] == "since"


def test_data_an_older_version_let_through_still_exports_and_verifies(running_api, tmp_path):
    api = running_api()
    keys = api.register()
    conn = api.app.runtime.db()
    with pausepoint.transaction(conn):
        pausepoint.record_event(conn, keys["developer_id"], 1, "system", "old", data={"note": "\ud800 alone"})
    assert verify_audit_export(export(api, keys["api_key"], tmp_path)) == 1


def test_verify_audit_on_a_path_with_no_database_says_so_instead_of_making_one(tmp_path, capsys):
    missing = str(tmp_path / "typo.db")
    assert pausepoint.main(["--db", missing, "verify-audit"]) == 2
    assert "there is no database at" in capsys.readouterr().err and not os.path.exists(missing)


def test_the_database_may_be_named_after_the_command_too(logged, tmp_path, capsys):
    path, typo = logged[0].config["database.path"], str(tmp_path / "typo.db")
    assert pausepoint.main(["verify-audit", "--db", path]) == 0
    assert pausepoint.main(["verify-audit", "--db", typo]) == 2
    assert pausepoint.main(["--db", typo, "verify-audit", "--db", path]) == 0         # the later one
    assert pausepoint.main(["--db", path, "verify-audit"]) == 0                       # not undone by the command's
    assert capsys.readouterr().err.count("there is no database at") == 1


def test_an_event_written_around_the_server_breaks_the_chain_visibly_but_stops_nothing(running_api):
    api = running_api()
    keys = api.register()
    stored(api.config, "INSERT INTO audit_events (developer_id, livemode, timestamp, actor, event_type, data)"
                       " VALUES (?, 1, '2026-01-01T00:00:00.000Z', 'someone', 'by.hand', '{}')", keys["developer_id"])
    created = api.create_pause(keys["api_key"], channel="link", recipient="ops")      # still recorded, chained on
    assert api.pause(keys["api_key"], created["pause_id"])["status"] == "pending"
    [by_hand] = stored(api.config, "SELECT seq FROM audit_events WHERE event_type = 'by.hand'")
    status, said = verify_audit(api.config)
    assert status == 1 and said.startswith(f"aud_{by_hand[0]} (")


def test_a_step_undone_after_writing_its_event_leaves_the_chain_whole(running_api):
    api = running_api()
    keys = api.register()
    created = api.post_json("/v1/pause", {**QUESTION, "recipients": [{"recipient": "+15550101", "channel": "sms"}],
                                          "escalation": [{"after_minutes": 5, "recipient": "+15550199",
                                                          "channel": "sms"}]},
                            headers=api.as_key(keys["test_api_key"])).json
    # The database refuses the escalation's webhook event, after its audit event was written.
    stored(api.config, "CREATE TRIGGER no_escalation_events BEFORE INSERT ON webhook_events"
                       " WHEN NEW.type = 'pause.escalated' BEGIN SELECT RAISE(ABORT, 'refused'); END")
    stored(api.config, "UPDATE pause_steps SET due_at = '2000-01-01T00:00:00.000Z'")
    api.step("steps")
    assert [e for e, in stored(api.config, "SELECT event_type FROM audit_events WHERE pause_id = ? ORDER BY seq",
                                created["pause_id"])] == ["pause.created", "pause.escalation_skipped"]
    assert verify_audit(api.config)[0] == 0


def test_an_empty_chain_checks_against_its_empty_head(logged, tmp_path):
    api, _ = logged
    newcomer = api.register(email="new@example.com")["api_key"]
    head = api.get("/v1/audit/head", headers=api.as_key(newcomer)).json
    assert (head["hash"], head["count"]) == ("0" * 64, 0)
    assert verify_audit_export(export(api, newcomer, tmp_path), head=head) == 0


def test_options_are_taken_only_whole(logged, capsys):
    path = logged[0].config["database.path"]
    with pytest.raises(SystemExit) as refused:
        pausepoint.main(["verify-audit", "--d", path])
    assert refused.value.code == 2 and "unrecognized arguments: --d" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        pausepoint.main(["--d", path, "verify-audit"])     # before the command: its value is no command either
    assert refused.value.code == 2 and "unrecognized option --d (the options, and the commands: --help)" in (
        capsys.readouterr().err)


def test_verify_audit_never_migrates_an_older_database_and_says_to_start_the_server_first(tmp_path, capsys):
    old = str(tmp_path / "old.db")
    db = make_database(old, "schema_v10.sql", 10)      # from before the chain, which migrating would build
    db.execute("INSERT INTO developers (id, email, name, password_hash, created_at)"
               " VALUES ('dev_1', 'a@example.com', 'A', 'x', '2026-01-01T00:00:00.000Z')")
    db.execute("INSERT INTO audit_events (developer_id, livemode, timestamp, actor, event_type, data)"
               " VALUES ('dev_1', 1, '2026-01-01T00:00:00.000Z', 'system', 'pause.created', '{}')")
    db.commit()
    db.close()
    with open(old, "rb") as f:
        before = hashlib.sha256(f.read()).hexdigest()
    assert pausepoint.main(["--db", old, "verify-audit"]) == 2
    assert capsys.readouterr().err == (
        f"pausepoint: {old} has schema 10, older than this PausePoint's {pausepoint.MIGRATIONS[-1][0]}: start the"
        " server on it (or on a copy of it) first, which migrates it, then verify it\n")
    with open(old, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == before
    assert stored(old, "SELECT max(version) FROM schema_migrations") == [(10,)]


def test_verify_audit_reads_a_database_it_may_not_write(logged, tmp_path, capsys):
    (tmp_path / "backups").mkdir()
    backup = str(tmp_path / "backups" / "copy.db")
    assert pausepoint.main(["--db", logged[0].config["database.path"], "backup", backup]) == 0
    with read_only_view(tmp_path / "backups", tmp_path / "read-only") as view:
        seen = str(view / "copy.db")
        # While a connection has it open (a server's, say), its -shm file is there to share.
        with contextlib.closing(sqlite3.connect(tmp_path / "backups" / "copy.db")) as db:
            db.execute("SELECT count(*) FROM audit_events").fetchone()
            assert pausepoint.main(["--db", seen, "verify-audit"]) == 0
        assert "every audit chain holds: 12 events in 2 chains" in capsys.readouterr().out
        assert not os.path.exists(seen + "-shm")        # the last connection took it away
        # With no write-ahead log either, the file holds it all and is read as it is.
        assert pausepoint.main(["--db", seen, "verify-audit"]) == 0
        assert "every audit chain holds: 12 events in 2 chains" in capsys.readouterr().out


@contextlib.contextmanager
def forged_in_the_log_only(path):
    """An event forged into the database at `path`, kept in its write-ahead log (not yet in the
    file) for the block: the file alone says every chain holds, only the log says otherwise."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("INSERT INTO audit_events (developer_id, livemode, timestamp, actor, event_type, pause_id, data,"
                   " prev_hash, hash) SELECT developer_id, livemode, timestamp, 'forged', event_type, pause_id, data,"
                   " hash, 'forged' FROM audit_events ORDER BY seq DESC LIMIT 1")
        db.commit()
        yield


@pytest.mark.parametrize("left_beside_it", [(), ("-wal", "-shm")])
def test_nothing_uses_a_database_its_server_reaches_by_another_name(logged, tmp_path, left_beside_it):
    """A database file mounted on its own (into a container, say) has its write-ahead log beside
    the name its server opened: used by this name, the file alone would be read (an earlier
    reader's empty log and wal-index left beside it change nothing), and a second server or a
    command's write would start a second log of the same file."""
    live = logged[0].config["database.path"]
    (tmp_path / "mounted").mkdir()
    seen = tmp_path / "mounted" / "pausepoint.db"
    seen.touch()
    for suffix in left_beside_it:
        (tmp_path / "mounted" / f"pausepoint.db{suffix}").touch()
    with forged_in_the_log_only(live), mounted(seen, "--bind", live):
        # From processes of their own, as an operator's are: a lock is seen by other processes.
        for command in (["verify-audit"], ["backup", str(tmp_path / "copy.db")], ["--port", str(free_port())]):
            refused = run_cli(tmp_path, "--db", str(seen), *command)
            assert refused.returncode == 2 and refused.stderr.endswith(
                f"pausepoint: {seen} is open in a process that reaches it by another name (a file mounted on its own,"
                " a hard link), with its write-ahead log beside that name: use the database by that name\n"), command
    assert not (tmp_path / "copy.db").exists()


# A reader that may not write the wal-index beside the database: it holds the file's lock
# and none on the wal-index (SQLite reads the log without one then).
READER_WITHOUT_A_WAL_INDEX = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.lockf(fd, fcntl.LOCK_SH, 510, 0x40000002, os.SEEK_SET)
print("held", flush=True)
time.sleep(60)
"""


def test_a_reader_by_the_same_name_that_shares_no_wal_index_is_not_taken_for_another_name(logged, tmp_path):
    """Its log is beside this name, with the frames in it: a command by this name reads them."""
    live = logged[0].config["database.path"]
    (tmp_path / "stopped").mkdir()
    with forged_in_the_log_only(live):
        for name in ("pausepoint.db", "pausepoint.db-wal"):
            shutil.copy(os.path.join(os.path.dirname(live), name), tmp_path / "stopped")
    copy = tmp_path / "stopped" / "pausepoint.db"
    reader = subprocess.Popen([sys.executable, "-c", READER_WITHOUT_A_WAL_INDEX, str(copy)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert reader.stdout.readline() == "held\n"
        verified = run_cli(tmp_path, "--db", str(copy), "verify-audit")
    finally:
        reader.kill()
        reader.wait()
    assert verified.returncode == 1 and "it was changed" in verified.stdout, verified.stderr      # the log was read


def test_verify_audit_reads_the_file_a_path_through_a_link_leads_to(logged, tmp_path, capsys):
    """"link/../x.db" is, to the kernel, x.db beside what the link points to, not beside the link."""
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a" / "sub")
    assert pausepoint.main(["--db", logged[0].config["database.path"], "backup", str(tmp_path / "a" / "x.db")]) == 0
    stored(str(tmp_path / "a" / "x.db"), "CREATE TABLE not_ours (x)")        # so the other is ...
    shutil.copy(tmp_path / "a" / "x.db", tmp_path / "x.db")
    stored(str(tmp_path / "x.db"), "DELETE FROM schema_migrations")         # ... told apart
    assert pausepoint.main(["--db", str(tmp_path / "link" / ".." / "x.db"), "verify-audit"]) == 0
    assert "every audit chain holds: 12 events in 2 chains" in capsys.readouterr().out


@pytest.mark.parametrize("named_by", ["a copy", "a symbolic link", "a hard link"])
def test_verify_audit_never_reads_the_file_alone_of_a_database_with_a_write_ahead_log(logged, tmp_path, capsys,
                                                                                     named_by):
    """A copy taken beside a writer, or a live database named by a link, holds changes in its
    -wal that only a wal-index (-shm) finds: reading the file alone would check an older log
    and say it holds. A symbolic link leads SQLite to the log beside the file; a hard link or
    a copy whose directory it may not write is refused."""
    live = logged[0].config["database.path"]
    with forged_in_the_log_only(live):
        (tmp_path / "named").mkdir()
        if named_by == "a copy":
            for name in ("pausepoint.db", "pausepoint.db-wal"):
                shutil.copy(os.path.join(os.path.dirname(live), name), tmp_path / "named")
        else:
            (os.symlink if named_by == "a symbolic link" else os.link)(live, tmp_path / "named" / "pausepoint.db")
        with read_only_view(tmp_path / "named", tmp_path / "read-only") as view:
            seen = str(view / "pausepoint.db")
            assert pausepoint.main(["--db", seen, "verify-audit"]) == (1 if named_by == "a symbolic link" else 2)
    if named_by == "a symbolic link":       # the forged event, in the log only, was read and caught
        assert re.fullmatch(r"aud_\d+ \(dev_\w+, test\): its content does not give its hash: it was changed\n"
                            r"psr_\w+ \(dev_\w+, test\): the audit log records 2 decisions of it \(aud_\d+, aud_\d+\):"
                            r" it was decided again\n"
                            r"every receipt checks: 6 decided pauses say what their receipts do\n",
                            capsys.readouterr().out)      # its keys read beside the file the link names
        return
    assert capsys.readouterr().err == (
        f"pausepoint: cannot use the database {seen}: unable to open database file; reading it needs {seen}-shm,"
        " which only a server that has it open, or a user who may write to its directory, provides: copy it"
        " somewhere writable\n")


def test_a_window_of_a_log_chained_on_upgrade_is_an_unbroken_stretch_though_its_older_times_went_back(
        running_api, tmp_path):
    old = str(tmp_path / "old.db")
    db = make_database(old, "schema_v10.sql", 10)
    db.execute("INSERT INTO developers (id, email, name, password_hash, created_at)"
               " VALUES ('dev_1', 'a@example.com', 'A', 'x', '2026-01-01T00:00:00.000Z')")
    # An older release stamped a create with the time it read before it waited for the write lock.
    db.executemany("INSERT INTO audit_events (developer_id, livemode, timestamp, actor, event_type, data)"
                   " VALUES ('dev_1', 1, ?, 'system', ?, '{}')",
                   [("2026-11-29T12:00:00.500Z", "first"), ("2026-11-29T12:00:00.100Z", "late"),
                    ("2026-11-29T12:00:00.700Z", "third"), ("2026-11-29T12:00:00.900Z", "fourth")])
    db.commit()
    db.close()
    api = running_api(**{"database.path": old})
    conn = api.app.runtime.db()
    with pausepoint.transaction(conn):
        key = pausepoint.issue_key(conn, "dev_1", 1)
    for window, expected in (({"since": "2026-11-29T12:00:00.300Z"}, ["first", "late", "third", "fourth"]),
                             ({"until": "2026-11-29T12:00:00.300Z"}, []),
                             ({"until": "2026-11-29T12:00:00.600Z"}, ["first", "late"]),
                             ({"since": "2026-11-29T12:00:00.600Z", "until": "2026-11-29T12:00:00.800Z"}, ["third"])):
        path = export(api, key, tmp_path, **window)
        assert [json.loads(line)["event_type"] for line in open(path, encoding="utf-8")] == expected, window
        assert verify_audit_export(path) == len(expected)


def test_an_export_cut_short_in_the_middle_of_an_event_is_named_as_broken(logged, tmp_path):
    api, key = logged
    noted = api.get("/v1/audit/head", headers=api.as_key(key)).json
    path = export(api, key, tmp_path)
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "wb") as f:
        f.write(whole[:len(whole) - 40])              # the connection dropped inside the last event
    with pytest.raises(AuditChainBroken, match="line 6 is not a whole event: the export was cut short"):
        verify_audit_export(path, head=noted)
    with pytest.raises(AuditChainBroken, match="line 6 is not a whole event: the export was cut short"):
        verify_audit_export(path)


def test_an_export_until_a_moment_to_come_leaves_out_events_written_after_it_while_it_is_read(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    for _ in range(40):                                         # an export of several chunks
        api.create_pause(key)
    until = pausepoint.utcnow() + dt.timedelta(milliseconds=300)
    environ = webtest.TestRequest.blank(f"/v1/audit/export?until={pausepoint.db_time(until)}", headers=api.as_key(key),
                                        environ={"REMOTE_ADDR": "198.51.100.1"}).environ
    body = iter(api.app(environ, lambda status, headers, exc_info=None: None))
    chunks = [next(body)]                                       # the export has begun: its window is set
    wait_until(lambda: pausepoint.utcnow() > until, timeout=5)
    late = api.create_pause(key, message="Asked after the window closed?")
    chunks.extend(body)
    events = [json.loads(line) for line in b"".join(chunks).decode().splitlines()]
    assert late["pause_id"] not in {event["pause_id"] for event in events}
    assert len(events) == 40 and all(event["timestamp"] < pausepoint.db_time(until) for event in events)


def test_verify_audit_leaves_nothing_beside_a_backup_it_checks(logged, tmp_path, capsys):
    """Backups kept on storage that keeps every file once written would keep an empty -wal and
    -shm beside each one checked: a database with no log, open nowhere, is read as its file."""
    backup = str(tmp_path / "copy.db")
    assert pausepoint.main(["--db", logged[0].config["database.path"], "backup", backup]) == 0
    capsys.readouterr()
    assert pausepoint.main(["--db", backup, "verify-audit"]) == 0
    assert "every audit chain holds: 12 events in 2 chains" in capsys.readouterr().out
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("copy.db")) == ["copy.db",
                                                                                         "copy.db.keys.json"]
