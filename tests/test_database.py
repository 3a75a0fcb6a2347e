"""The database layer: migrations, transactions and what they wake, retention."""

import concurrent.futures
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest
import webtest

from conftest import PASSWORD, QUESTION, WIRE, Api, free_port, make_config, run_cli, stored, token_of, wait_until
import pausepoint

HERE = os.path.dirname(os.path.abspath(__file__))


def shape(path):
    """What a database's model is made of: each table's columns (name, type, NOT NULL,
    default, key; in any order, since ALTER TABLE appends), CHECK constraints, foreign
    keys and unique constraints; each index's table, columns (or expressions), uniqueness
    and WHERE; each trigger's SQL."""
    db = sqlite3.connect(path)
    try:
        found = {}
        for kind, name, table, sql in db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"
                                                 " WHERE name NOT LIKE 'sqlite_%'"):
            if kind == "table":
                found[name] = (sorted(tuple(row[1:]) for row in db.execute(f"PRAGMA table_info({name})")),
                               checks(sql),
                               sorted(tuple(row[2:5]) for row in db.execute(f"PRAGMA foreign_key_list({name})")),
                               sorted(tuple(row[1] for row in db.execute(f"PRAGMA index_info({index[1]})"))
                                      for index in db.execute(f"PRAGMA index_list({name})") if index[3] == "u"))
            elif kind == "index":
                unique = next(row[2] for row in db.execute(f"PRAGMA index_list({table})") if row[1] == name)
                head, _, where = sql.partition(" WHERE ")
                # The columns as written, whitespace aside: an expression's is named only there.
                found[name] = (table, "".join(head.split(" ON ", 1)[1].split()), unique, " ".join(where.split()) or None)
            else:
                found[name] = (kind, table, " ".join(sql.split()))
        return found
    finally:
        db.close()


def checks(sql):
    """The CHECK constraints in a CREATE TABLE, whitespace and comments aside."""
    sql = " ".join(line.split("--")[0] for line in sql.splitlines())
    found, start = [], 0
    while (start := sql.find("CHECK (", start)) >= 0:
        depth, end = 0, start + len("CHECK ")
        for end in range(end, len(sql)):
            depth += {"(": 1, ")": -1}.get(sql[end], 0)
            if depth == 0:
                break
        found.append(" ".join(sql[start:end + 1].split()))
        start = end
    return sorted(found)


def make_database(path, schema_file, version):
    """A database as an earlier release made it, from its recorded schema."""
    db = sqlite3.connect(path)
    with open(os.path.join(HERE, schema_file), encoding="utf-8") as f:
        db.executescript(f.read())
    db.execute("INSERT INTO schema_migrations VALUES (?, '2026-01-01T00:00:00.000Z')", (version,))
    return db


def v16_database_with_a_key(path, key):
    """A database as schema 16 made it, with developer dev_1 and API key `key` (live or test by its prefix)."""
    db = make_database(path, "schema_v16.sql", 16)
    db.execute("INSERT INTO developers (id, email, name, password_hash, created_at)"
               " VALUES ('dev_1', 'dev@example.com', 'A', 'x', '2026-01-01T00:00:00.000Z')")
    db.execute("INSERT INTO api_keys VALUES (?, 'dev_1', ?, ?, '2026-01-01T00:00:00.000Z', NULL)",
               (pausepoint.key_digest(key), int(key.startswith("pp_live_")), key[:8] + "…" + key[-4:]))
    return db


def migrate_like_fresh(db, old, tmp_path):
    """Migrate the earlier release's database at `old` (`db`, its connection, is closed
    first), and check that it comes out with a fresh database's model."""
    db.commit()
    db.close()
    pausepoint.migrate(pausepoint.connect(old))
    fresh = str(tmp_path / "fresh.db")
    pausepoint.migrate(pausepoint.connect(fresh))
    assert shape(old) == shape(fresh)


def test_a_database_made_by_the_first_release_migrates_to_the_same_model_as_a_fresh_one(tmp_path, caplog):
    old = str(tmp_path / "old.db")
    db = make_database(old, "schema_v1.sql", 1)
    db.execute("INSERT INTO developers VALUES ('dev_1', 'a@example.com', 'A', 'x', 'free', '2026-01-01T00:00:00.000Z')")
    db.execute("INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options, respond_token,"
               " created_at, expires_at) VALUES ('psr_1', 'dev_1', 1, '+15550100', 'sms', 'Old?', '[\"Yes\",\"No\"]',"
               " 'tok', '2026-01-01T00:00:00.000Z', '2999-01-01T00:00:00.000Z')")
    db.execute("INSERT INTO notifications (id, pause_id, channel, recipient, livemode, text, next_attempt_at, created_at,"
               " updated_at) VALUES ('ntf_1', 'psr_1', 'sms', '+15550100', 1, 'Old?', 'x', 'x', 'x')")
    migrate_like_fresh(db, old, tmp_path)
    assert stored(old, "SELECT max(version) FROM schema_migrations") == [(pausepoint.MIGRATIONS[-1][0],)]
    # Said once, and only of the upgraded database (the fresh one beside it was made, not upgraded).
    assert [r.getMessage() for r in caplog.records if "upgraded" in r.getMessage()] == [
        f"upgraded the database {old} from schema 1 to {pausepoint.MIGRATIONS[-1][0]}"]
    assert stored(old, "SELECT developer_id FROM notifications") == [("dev_1",)]
    # The old pending pause has no reply code, and still answers to a bare reply.
    assert stored(old, "SELECT reply_code, status FROM pauses") == [(None, "pending")]


@contextlib.contextmanager
def serving_as_before_the_server_lock(path):
    """What an older server's process holds: its connections to the database (in another
    process, as a server is: SQLite's locks are per process), and no server lock."""
    code = ("import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); db.execute('PRAGMA journal_mode = WAL');"
            " db.execute('SELECT count(*) FROM developers').fetchone(); print('open', flush=True); sys.stdin.read()")
    with subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as older:
        assert older.stdout.readline() == "open\n"
        yield
        older.stdin.close()


@pytest.mark.parametrize("older", ["with the server lock", "from before the server lock"])
def test_a_command_never_upgrades_a_database_an_older_server_is_serving(tmp_path, older):
    """The new version's set-plan, run before its server was restarted: the old server would go
    on writing by a schema it does not know. Once the old one stops, the command upgrades it."""
    old = str(tmp_path / "pausepoint.db")
    db = make_database(old, "schema_v16.sql", 16)
    db.execute("INSERT INTO developers (id, email, name, password_hash, created_at)"
               " VALUES ('dev_1', 'a@example.com', 'A', 'x', '2026-01-01T00:00:00.000Z')")
    db.commit()
    db.close()
    serving = pausepoint.only_server if older == "with the server lock" else serving_as_before_the_server_lock
    with serving(old):
        refused = run_cli(tmp_path, "set-plan", "--email", "a@example.com", "--plan", "free")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert ("has schema 16, older than this PausePoint's" in refused.stderr
            and "an earlier version's server: stop it, take a backup, start this version's server" in refused.stderr), refused.stderr
    assert stored(old, "SELECT max(version) FROM schema_migrations") == [(16,)]
    done = run_cli(tmp_path, "set-plan", "--email", "a@example.com", "--plan", "free")
    assert done.returncode == 0, done.stderr
    assert stored(old, "SELECT max(version) FROM schema_migrations") == [(pausepoint.MIGRATIONS[-1][0],)]


def test_a_start_never_upgrades_a_database_an_older_server_from_before_the_server_lock_is_serving(tmp_path,
                                                                                                  spawn_server):
    """The new version started while the old one still serves (a second unit, a forgotten
    terminal): that one takes no server lock to be found by, and would go on writing by a schema
    it does not know, beside a second server. Once the old one stops, the start upgrades it."""
    old = str(tmp_path / "pausepoint.db")
    db = make_database(old, "schema_v16.sql", 16)
    db.commit()
    db.close()
    with serving_as_before_the_server_lock(old):
        refused = run_cli(tmp_path, "--port", str(free_port()), "serve")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.strip() == (
        f"pausepoint: {old} has schema 16, older than this PausePoint's {pausepoint.MIGRATIONS[-1][0]}, and another"
        " process has it open, most likely an earlier version's server: stop it, take a backup, then start this"
        " version's server again")
    assert stored(old, "SELECT max(version) FROM schema_migrations") == [(16,)]
    spawn_server()
    assert stored(old, "SELECT max(version) FROM schema_migrations") == [(pausepoint.MIGRATIONS[-1][0],)]


def test_a_database_from_before_teams_migrates_to_the_same_model_as_a_fresh_one_keeping_its_texts(tmp_path):
    old = str(tmp_path / "old.db")
    db = make_database(old, "schema_v10.sql", 10)
    db.execute("INSERT INTO developers (id, email, name, password_hash, created_at)"
               " VALUES ('dev_1', 'a@example.com', 'A', 'x', '2026-01-01T00:00:00.000Z')")
    db.execute("INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options, respond_token,"
               " created_at, expires_at) VALUES ('psr_1', 'dev_1', 1, '+15550100', 'sms', 'Old?', '[\"Yes\",\"No\"]',"
               " 'tok', '2026-01-01T00:00:00.000Z', '2999-01-01T00:00:00.000Z')")
    db.execute("INSERT INTO notifications (id, pause_id, developer_id, channel, recipient, livemode, text, status,"
               " next_attempt_at, created_at, updated_at) VALUES ('ntf_1', 'psr_1', 'dev_1', 'sms', '+15550100', 1,"
               " 'Old?', 'sent', 'x', 'x', 'x')")
    for livemode, event_type in ((1, "pause.created"), (0, "webhook.created"), (1, "pause.responded")):
        db.execute("INSERT INTO audit_events (developer_id, livemode, timestamp, actor, event_type, data)"
                   " VALUES ('dev_1', ?, '2026-01-01T00:00:00.000Z', 'system', ?, '{\"k\":\"caf\\u00e9\"}')",
                   (livemode, event_type))
    migrate_like_fresh(db, old, tmp_path)
    assert stored(old, "SELECT id, pause_id, position, kind, status, text FROM notifications") == \
        [("ntf_1", "psr_1", 0, "ask", "sent", "Old?")]
    assert stored(old, "SELECT team, quorum FROM pauses") == [(0, None)]
    # The events it had are chained, each developer's mode apart, in order.
    chained = stored(old, "SELECT livemode, prev_hash, hash FROM audit_events ORDER BY seq")
    assert [prev for _, prev, _ in chained] == ["0" * 64, "0" * 64, chained[0][2]]
    assert pausepoint.audit_chain_breaks(pausepoint.connect(old)) == []


def test_a_database_from_before_test_codes_were_each_developers_own_migrates_to_the_same_model(tmp_path):
    old = str(tmp_path / "old.db")
    db = make_database(old, "schema_v16.sql", 16)
    for developer in ("dev_1", "dev_2"):
        db.execute("INSERT INTO developers (id, email, name, password_hash, created_at)"
                   " VALUES (?, ?, 'A', 'x', '2026-01-01T00:00:00.000Z')", (developer, developer + "@example.com"))
        db.execute("INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options, respond_token,"
                   " reply_code, team, created_at, expires_at) VALUES (?, ?, 0, '+15550199', 'sms', 'Old?',"
                   " '[\"Yes\",\"No\"]', ?, ?, 1, '2026-01-01T00:00:00.000Z', '2999-01-01T00:00:00.000Z')",
                   ("psr_" + developer, developer, "tok_" + developer, "K" + developer[-1]))
        db.execute("INSERT INTO pause_recipients (pause_id, position, livemode, recipient, channel, respond_token,"
                   " reply_code, added_by, added_at) VALUES (?, 1, 0, '+15550100', 'sms', ?, ?, 'request',"
                   " '2026-01-01T00:00:00.000Z')", ("psr_" + developer, "second_" + developer, "M" + developer[-1]))
    migrate_like_fresh(db, old, tmp_path)
    assert stored(old, "SELECT pause_id, developer_id FROM pause_recipients ORDER BY pause_id") == \
        [("psr_dev_1", "dev_1"), ("psr_dev_2", "dev_2")]
    # Each developer's test codes are their own now: the second's pending pause may have the first's.
    stored(old, "UPDATE pauses SET reply_code = 'K7'")
    assert stored(old, "SELECT count(DISTINCT developer_id) FROM pauses WHERE reply_code = 'K7'") == [(2,)]
    with pytest.raises(sqlite3.IntegrityError):     # live codes are still every developer's
        stored(old, "UPDATE pauses SET livemode = 1")


def test_a_database_from_before_usage_was_counted_keeps_this_months_live_pauses_against_the_plan(tmp_path):
    """Live pauses are counted per month as they are made; an older database's count starts
    from the pauses it holds, each in the month it was made, test pauses apart."""
    old = str(tmp_path / "pausepoint.db")
    live_key = "pp_live_" + "k" * 43
    db = v16_database_with_a_key(old, live_key)
    this_month = pausepoint.db_time(pausepoint.month_start(pausepoint.utcnow()))
    for number, (livemode, created_at) in enumerate([(1, this_month), (1, this_month), (0, this_month),
                                                     (1, "2026-01-31T23:59:59.999Z")]):
        db.execute("INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options, status,"
                   " respond_token, created_at, expires_at) VALUES (?, 'dev_1', ?, 'ops', 'link', 'Old?',"
                   " '[\"Yes\",\"No\"]', 'cancelled', ?, ?, ?)",
                   (f"psr_{number}", livemode, f"tok_{number}", created_at, created_at))
    migrate_like_fresh(db, old, tmp_path)
    assert sorted(stored(old, "SELECT month, live_pauses FROM monthly_usage")) == [
        ("2026-01", 1), (this_month[:7], 2)]
    api = Api(pausepoint.create_app(make_config(tmp_path, **{"plans.free.monthly_pauses": 3})))
    api.create_pause(live_key, channel="link", recipient="ops")
    refused = api.post_json("/v1/pause", {**QUESTION, "channel": "link", "recipient": "ops"},
                            headers=api.as_key(live_key), status=429).json["error"]
    assert refused["code"] == "quota_exceeded"
    assert stored(old, "SELECT live_pauses FROM monthly_usage WHERE month = ?", this_month[:7]) == [(3,)]


def test_a_database_from_before_early_reports_were_kept_once_keeps_the_first_of_each(tmp_path):
    """Schema 23 kept a delivery report posted again as a row more; 24 keeps one per text and word."""
    old = str(tmp_path / "pausepoint.db")
    pausepoint.migrate(pausepoint.connect(old))
    db = sqlite3.connect(old)
    db.executescript("DROP INDEX early_delivery_reports_by_sid;"
                     " CREATE INDEX early_delivery_reports_by_sid ON early_delivery_reports(message_sid);"
                     " UPDATE schema_migrations SET version = 23;")
    for sid, reported, code in (("SM1", "failed", "30003"), ("SM1", "failed", "30005"), ("SM2", "failed", ""),
                                ("SM1", "delivered", ""), ("SM1", "failed", "30007")):
        db.execute("INSERT INTO early_delivery_reports (message_sid, reported, error_code, received_at)"
                   " VALUES (?, ?, ?, '2026-01-01T00:00:00.000Z')", (sid, reported, code))
    migrate_like_fresh(db, old, tmp_path)
    assert stored(old, "SELECT message_sid, reported, error_code FROM early_delivery_reports ORDER BY seq") == [
        ("SM1", "failed", "30003"), ("SM2", "failed", ""), ("SM1", "delivered", "")]


def test_what_fell_due_under_an_older_server_happens_once_after_the_upgrade(tmp_path):
    """An older server stopped with a pause past its deadline and a team pause's two reminders
    due: the upgraded one times the first out to its default and sends the latest reminder
    alone, each once, however often its jobs run."""
    old = str(tmp_path / "pausepoint.db")
    test_key = "pp_test_" + "k" * 43
    db = v16_database_with_a_key(old, test_key)
    past, future = "2026-01-01T00:00:00.000Z", "2999-01-01T00:00:00.000Z"
    for pause_id, team, expires_at in (("psr_due", 0, past), ("psr_team", 1, future)):
        db.execute("INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options,"
                   " timeout_default, respond_token, reply_code, team, created_at, expires_at) VALUES (?, 'dev_1', 0,"
                   " '+15550100', 'sms', 'Old?', '[\"Yes\",\"No\"]', 'No', ?, ?, ?, ?, ?)",
                   (pause_id, "tok_" + pause_id, f"K{team}", team, past, expires_at))
    for position, recipient in enumerate(("+15550100", "+15550101")):
        db.execute("INSERT INTO pause_recipients (pause_id, position, livemode, recipient, channel, respond_token,"
                   " reply_code, added_by, added_at) VALUES ('psr_team', ?, 0, ?, 'sms', ?, 'K1', 'request', ?)",
                   (position, recipient, f"tok_{position}", past))
    for due_at in ("2026-01-01T00:30:00.000Z", "2026-01-01T01:00:00.000Z"):
        db.execute("INSERT INTO pause_steps (pause_id, kind, due_at) VALUES ('psr_team', 'reminder', ?)", (due_at,))
    db.commit()
    db.close()
    api = Api(pausepoint.create_app(make_config(tmp_path)))
    try:
        for _ in range(2):
            for job in ("timeouts", "steps", "notifications"):
                api.step(job)
    finally:
        api.app.runtime.stop()
    due = api.pause(test_key, "psr_due")
    assert (due["status"], due["choice"], due["decided_by"]) == ("timed_out", "No", "timeout") and due["receipt"]
    assert stored(old, "SELECT event_type, count(*) FROM audit_events GROUP BY event_type ORDER BY 1") == [
        ("notification.simulated", 2), ("pause.reminded", 1), ("pause.timed_out", 1)]
    assert stored(old, "SELECT due_at, status FROM pause_steps ORDER BY due_at") == [
        ("2026-01-01T00:30:00.000Z", "skipped"), ("2026-01-01T01:00:00.000Z", "done")]
    assert stored(old, "SELECT recipient, status FROM notifications WHERE kind = 'reminder' ORDER BY 1") == [
        ("+15550100", "simulated"), ("+15550101", "simulated")]
    with contextlib.closing(pausepoint.connect(old)) as db:
        assert pausepoint.audit_chain_breaks(db) == []


def test_a_nested_transaction_raises_instead_of_waiting_on_itself(tmp_path):
    conn = pausepoint.connect(str(tmp_path / "t.db"), pausepoint.FairLock())
    pausepoint.migrate(conn)
    with pausepoint.transaction(conn):
        with pytest.raises(RuntimeError, match="inside a transaction"):
            with pausepoint.transaction(conn):
                pass


def test_functions_that_must_share_a_transaction_refuse_to_run_outside_one(tmp_path):
    conn = pausepoint.connect(str(tmp_path / "t.db"))
    pausepoint.migrate(conn)
    with pytest.raises(RuntimeError, match="inside transaction"):
        pausepoint.record_event(conn, "dev_1", 0, "system", "nothing.happened")
    with pytest.raises(RuntimeError, match="inside transaction"):
        pausepoint.decide_pause(conn, {}, "psr_1", "cancelled", "system")


def test_wake_ups_run_after_commit_and_never_after_a_rollback(tmp_path):
    conn = pausepoint.connect(str(tmp_path / "t.db"))
    pausepoint.migrate(conn)
    woken = []
    conn.on_commit = woken.append
    with pytest.raises(ValueError):
        with pausepoint.transaction(conn):
            pausepoint.wake_after_commit(conn, "decisions", "psr_1")
            raise ValueError("the change failed")
    assert woken == []
    with pausepoint.transaction(conn):
        pausepoint.wake_after_commit(conn, "decisions", "psr_1")
        pausepoint.wake_after_commit(conn, "webhooks")
        assert woken == []                                  # not before COMMIT
    assert woken == [{"decisions": {"psr_1"}, "webhooks": set()}]


# -- retention ------------------------------------------------------------------------------

def test_the_daily_job_deletes_only_what_is_past_its_retention(running_api, receiver):
    api = running_api(**{"webhooks.allow_private": True})
    config, app = api.config, api.app
    keys = api.register()
    test, live = api.as_key(keys["test_api_key"]), api.as_key(keys["api_key"])
    api.post_json("/v1/webhooks", {"url": receiver.url, "events": ["pause.created"]}, headers=test)
    old = api.post_json("/v1/pause", WIRE, headers={**test, "Idempotency-Key": "k1"}).json
    api.get(f"/v1/respond/{token_of(old['respond_url'])}")
    api.post_json(f"/v1/respond/{token_of(old['respond_url'])}", {"choice": "Approve"})
    recent = api.post_json("/v1/pause", WIRE, headers=test).json
    api.post(f"/v1/pause/{recent['pause_id']}/cancel", headers=test)
    pending = api.post_json("/v1/pause", {**WIRE, "timeout_hours": 720}, headers=test).json
    kept_live = api.post_json("/v1/pause", {**WIRE, "channel": "link", "recipient": "ops"}, headers=live).json
    api.post(f"/v1/pause/{kept_live['pause_id']}/cancel", headers=live)
    api.step("notifications")
    api.step("webhooks")
    assert stored(config, "SELECT count(*) FROM webhook_deliveries WHERE status = 'succeeded'") == [(3,)]
    # The finished deliveries, and one still being retried.
    stored(config, "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = '2999-01-01T00:00:00.000Z'"
                   " WHERE event_id = (SELECT id FROM webhook_events WHERE pause_id = ?)", pending["pause_id"])
    stored(config, "UPDATE pauses SET decided_at = ? WHERE id = ?",
           pausepoint.db_time(pausepoint.utcnow() + dt.timedelta(days=20)), recent["pause_id"])

    deleted = pausepoint.prune_expired_data(app.runtime.db(), config, now=pausepoint.utcnow() + dt.timedelta(days=31))

    assert {row[0] for row in stored(config, "SELECT id FROM pauses")} == {
        recent["pause_id"], pending["pause_id"], kept_live["pause_id"]}
    assert stored(config, "SELECT count(*) FROM audit_events WHERE pause_id = ?", old["pause_id"]) == [(0,)]
    assert stored(config, "SELECT count(*) FROM notifications WHERE pause_id = ?", old["pause_id"]) == [(0,)]
    assert stored(config, "SELECT count(*) FROM idempotency_keys") == [(0,)]
    # Live audit rows are all still there; test rows not about a pause (webhook.created) are gone.
    assert stored(config, "SELECT event_type FROM audit_events WHERE livemode = 1 ORDER BY seq") == [
        ("pause.created",), ("pause.cancelled",)]
    assert stored(config, "SELECT count(*) FROM audit_events WHERE livemode = 0 AND pause_id IS NULL") == [(0,)]
    # The delivery log: only the event whose delivery is still being retried remains, with its delivery,
    # and the newest event (the live cancel), whose rowid a later event would otherwise take.
    assert stored(config, "SELECT pause_id, type FROM webhook_events ORDER BY rowid") == [
        (pending["pause_id"], "pause.created"), (kept_live["pause_id"], "pause.cancelled")]
    assert stored(config, "SELECT count(*) FROM webhook_deliveries") == [(1,)]
    assert stored(config, "SELECT count(*) FROM webhook_attempts a LEFT JOIN webhook_deliveries d"
                          " ON d.id = a.delivery_id WHERE d.id IS NULL") == [(0,)]
    # Every event about a pause is kept for the feed, sent or not: 7 in all, the pending one's and the newest stay.
    assert deleted["test pauses"] == 1 and deleted["webhook events"] == 5


def test_pruning_runs_with_the_longest_retention_the_settings_allow(running_api):
    """An operator keeping test data as long as can be: the hourly job still runs, and keeps it."""
    api = running_api(**{"retention.test_days": 36500, "retention.delivery_log_days": 36500,
                         "retention.test_pauses_kept": 1_000_000_000})
    test = api.as_key(api.register()["test_api_key"])
    cancelled = api.post_json("/v1/pause", WIRE, headers=test).json["pause_id"]
    api.post(f"/v1/pause/{cancelled}/cancel", headers=test)
    pausepoint.prune_expired_data(api.app.runtime.db(), api.config, now=pausepoint.utcnow() + dt.timedelta(days=365))
    assert stored(api.config, "SELECT id, status FROM pauses") == [(cancelled, "cancelled")]


def test_pruning_works_through_any_backlog_in_batches(running_api):
    api = running_api()
    config, app = api.config, api.app
    api.register()
    stored(config, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1234)"
                   " INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options, status,"
                   " decided_at, respond_token, created_at, expires_at) SELECT 'psr_' || i, id, 0, 'x', 'link', 'm',"
                   " '[\"a\",\"b\"]', 'cancelled', '2000-01-01T00:00:00.000Z', 'tok' || i, '2000-01-01T00:00:00.000Z',"
                   " '2000-01-01T00:00:01.000Z' FROM n, developers")
    assert pausepoint.prune_expired_data(app.runtime.db(), config)["test pauses"] == 1234
    assert stored(config, "SELECT count(*) FROM pauses") == [(0,)]


def test_pruning_is_scheduled_hourly(running_api):
    job = running_api(jobs=True).app.runtime.scheduler.get_job("run_pruning")
    assert job.trigger.interval == dt.timedelta(hours=1)


# Rows that belong to a pause, or to an event, whose pause or event is gone.
ORPHANS = ["SELECT count(*) FROM {table} WHERE pause_id NOT IN (SELECT id FROM pauses)".format(table=table)
           for table in ("notifications", "pause_recipients", "pause_steps", "idempotency_keys")] + [
    "SELECT count(*) FROM webhook_deliveries WHERE event_id NOT IN (SELECT id FROM webhook_events)",
    "SELECT count(*) FROM webhook_attempts WHERE delivery_id NOT IN (SELECT id FROM webhook_deliveries)"]


def test_each_developer_keeps_their_newest_test_pauses_and_what_goes_with_them(running_api, receiver):
    api = running_api(**{"webhooks.allow_private": True, "retention.test_pauses_kept": 3})
    config = api.config

    def developer(email, decided, team=True):
        """A cancelled live pause, then test pauses: a pending one, then `decided` cancelled
        ones (the first, if `team`, a team pause with a reminder, which weighs 4), each with an
        Idempotency-Key."""
        keys = api.register(email=email)
        test, live = api.as_key(keys["test_api_key"]), api.as_key(keys["api_key"])
        kept_live = api.post_json("/v1/pause", {**WIRE, "channel": "link", "recipient": "ops"}, headers=live).json
        api.post(f"/v1/pause/{kept_live['pause_id']}/cancel", headers=live)
        api.post_json("/v1/webhooks", {"url": receiver.url, "events": ["pause.created"]}, headers=test)
        bodies = [{**WIRE, "timeout_hours": 720}, {**QUESTION, "remind_after_minutes": [60], "recipients": [
            {"recipient": "+15550101", "channel": "sms"}, {"recipient": "+15550102", "channel": "sms"}]}]
        made = []
        for n, body in enumerate(bodies[:1 + team] + [WIRE] * (decided - team)):
            made.append(api.post_json("/v1/pause", body, headers={**test, "Idempotency-Key": f"{email}{n}"}).json["pause_id"])
            if n:
                api.post(f"/v1/pause/{made[-1]}/cancel", headers=test)
        return keys["developer_id"], made, kept_live["pause_id"]

    def theirs(developer_id):
        """Every row of a developer's, and every live row."""
        return [stored(config, f"SELECT count(*) FROM {table} WHERE developer_id = ? OR livemode = 1", developer_id)
                for table in ("pauses", "notifications", "audit_events", "webhook_events")]

    quiet, quiet_pauses, quiet_live = developer("quiet@example.com", decided=2, team=False)      # weighs 3
    busy, busy_pauses, busy_live = developer("busy@example.com", decided=6)
    api.step("notifications")
    api.step("webhooks")
    pending, first, answered, delivering = busy_pauses[:4]
    created_event = "SELECT id, created_at FROM webhook_events WHERE pause_id = ? AND type = 'pause.created'"
    # The first's delivery waits on a disabled endpoint; one was answered half an hour before
    # the job runs; one's delivery is being made.
    stored(config, "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = NULL WHERE event_id = ?",
           stored(config, created_event, first)[0][0])
    stored(config, "UPDATE webhook_deliveries SET status = 'delivering' WHERE event_id = ?",
           stored(config, created_event, delivering)[0][0])
    later = pausepoint.utcnow() + dt.timedelta(hours=2)
    stored(config, "UPDATE pauses SET decided_at = ? WHERE id = ?",
           pausepoint.db_time(later - dt.timedelta(minutes=30)), answered)
    before = theirs(quiet)

    def feed_from(pause_id):
        """The busy developer's test events from the creation of `pause_id` on."""
        return stored(config, "SELECT id FROM webhook_events WHERE developer_id = ? AND livemode = 0 AND rowid >="
                              " (SELECT rowid FROM webhook_events WHERE pause_id = ? AND type = 'pause.created')"
                              " ORDER BY rowid", busy, pause_id)

    def audit_from(pause_id):
        return stored(config, "SELECT min(timestamp) FROM audit_events WHERE developer_id = ? AND livemode = 0",
                      busy) == [(stored(config, "SELECT created_at FROM pauses WHERE id = ?", pause_id)[0][0],)]

    kept_feed = feed_from(answered)
    deleted = pausepoint.prune_expired_data(api.app.runtime.db(), config, now=later)

    # The busy developer's newest three, the pending one and the one answered within the hour stay,
    # and their feed and audit chain from the answered one's creation: its answer with them.
    assert {row[0] for row in stored(config, "SELECT id FROM pauses")} == {
        *quiet_pauses, quiet_live, busy_live, pending, answered, *busy_pauses[-3:]}
    assert deleted["test pauses"] == 2 and theirs(quiet) == before
    assert [stored(config, sql) for sql in ORPHANS] == [[(0,)]] * len(ORPHANS)
    assert stored(config, "SELECT id FROM webhook_events WHERE developer_id = ? AND livemode = 0 ORDER BY rowid",
                  busy) == kept_feed and audit_from(answered)
    assert stored(config, "SELECT status FROM webhook_deliveries WHERE status != 'succeeded'") == [("delivering",)]

    # An hour on, the answered one goes too, and the feed now stops at the event being delivered.
    kept_feed = feed_from(delivering)
    pausepoint.prune_expired_data(api.app.runtime.db(), config, now=later + dt.timedelta(hours=1))
    assert answered not in {row[0] for row in stored(config, "SELECT id FROM pauses")}
    assert stored(config, "SELECT id FROM webhook_events WHERE developer_id = ? AND livemode = 0 ORDER BY rowid",
                  busy) == kept_feed
    assert [stored(config, sql) for sql in ORPHANS] == [[(0,)]] * len(ORPHANS)
    assert pausepoint.audit_chain_breaks(api.app.runtime.db()) == []


def test_a_developer_keeps_their_newest_test_pauses_up_to_a_weight_not_a_count(running_api):
    """Counted, three ten-person pauses with five reminders kept as much as 180 plain ones."""
    api = running_api(**{"retention.test_pauses_kept": 10})
    keys = api.register()
    test = api.as_key(keys["test_api_key"])
    team = {**QUESTION, "remind_after_minutes": [60, 120],       # nine messages: weighs 9
            "recipients": [{"recipient": f"p{n}@example.com", "channel": "email"} for n in range(3)]}
    made = [api.post_json("/v1/pause", body, headers=test).json["pause_id"] for body in (team, team, WIRE)]
    for pause_id in made:
        api.post(f"/v1/pause/{pause_id}/cancel", headers=test)
    deleted = pausepoint.prune_expired_data(api.app.runtime.db(), api.config,
                                            now=pausepoint.utcnow() + dt.timedelta(hours=2))
    # The newest (1), and the one before, which begins within the 10 kept (1 + 9); not the first.
    assert deleted["test pauses"] == 1
    assert [row[0] for row in stored(api.config, "SELECT id FROM pauses ORDER BY seq")] == made[1:]
    assert [stored(api.config, sql) for sql in ORPHANS] == [[(0,)]] * len(ORPHANS)


EMOJI = "\U0001F600"


@pytest.mark.parametrize("body", [
    {**WIRE},
    {**WIRE, "channel": "email", "recipient": "a@example.com", "metadata": {"a": EMOJI * 960, "display": ["a"]}},
    {**QUESTION, "message": EMOJI * 1600, "options": [EMOJI * 99 + str(n) for n in range(10)], "timeout_default": None,
     "recipients": [{"recipient": f"p{n}@example.com", "channel": "email"} for n in range(10)],
     "remind_after_minutes": [1, 2, 3, 4, 5],
     "metadata": {**{f"k{n}": EMOJI * 380 for n in range(10)}, "display": [f"k{n}" for n in range(10)]},
     "fields": {f"f{n}": {"type": "string", "value": EMOJI * 840, "max_length": 1000, "label": EMOJI * 100}
                for n in range(10)}},
], ids=["plain", "one-email-just-under-a-unit", "ten-people-five-reminders-full-body"])
def test_a_decided_test_pause_keeps_at_most_48_kib_on_disk_for_each_unit_of_its_weight(running_api, body):
    """What bounds a developer's test data on disk: the weight allowed (pending, kept, and
    created in the hour before pruning) times this. Counted by pauses, one of the last kind
    kept 10 MB, and a developer's 6,000 some 60 GB."""
    api = running_api()
    key = api.register()["test_api_key"]
    raw = json.dumps(body, ensure_ascii=False).encode()
    created = api.post("/v1/pause", raw, headers={**api.as_key(key), "Content-Type": "application/json"}).json
    api.step("notifications")
    for step, in stored(api.config, "SELECT id FROM pause_steps ORDER BY id"):
        stored(api.config, "UPDATE pause_steps SET due_at = ? WHERE id = ?",
               pausepoint.db_time(pausepoint.utcnow()), step)
        api.step("steps")
        api.step("notifications")
    api.post_json(f"/v1/respond/{created['respond_url'].rsplit('/', 1)[1]}", {"choice": body["options"][0]})
    [(weight,)] = stored(api.config, "SELECT test_weight FROM pauses")
    assert bytes_kept(api.config) <= 48 * 1024 * weight


def bytes_kept(config):
    """What a database's pauses and all that goes with them take, in bytes of their values."""
    kept = 0
    for table in ("pauses", "notifications", "audit_events", "webhook_events", "pause_recipients", "pause_steps"):
        columns = [row[1] for row in stored(config, f"PRAGMA table_info({table})")]
        row_bytes = " + ".join(f"coalesce(length(CAST({column} AS BLOB)), 0)" for column in columns)
        kept += stored(config, f"SELECT coalesce(sum({row_bytes}), 0) FROM {table}")[0][0]
    return kept


FILLABLE = {f"f{n}": {"type": "string", "value": "x", "max_length": 1000, "editable": True} for n in range(5)}


@pytest.mark.parametrize("body", [
    {**WIRE, "channel": "email", "recipient": "a@example.com", "fields": FILLABLE},
    {**QUESTION, "recipients": [{"recipient": f"p{n}@example.com", "channel": "email"} for n in range(10)],
     "quorum": {"choice": "Approve", "count": 10}},
], ids=["editable-fields-filled", "ten-votes-each-commenting"])
def test_a_test_pause_weighs_what_its_answers_may_write(running_api, body):
    """Whoever holds a test pause's links, the agent that made it too, may answer it: weighed
    by what the agent wrote alone, five nearly empty fields filled with emoji kept 235 KiB for
    a weight of 1, and ten votes with a long comment each 776 KiB for a weight of 10."""
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.post_json("/v1/pause", body, headers=api.as_key(key)).json
    api.step("notifications")
    people = api.pause(key, created["pause_id"]).get("recipients") or [created]
    answer = {"choice": "Approve", "comment": EMOJI * 2000, **({"fields": {name: EMOJI * 1000 for name in FILLABLE}}
                                                               if "fields" in body else {})}
    for person in people:
        api.post(f"/v1/respond/{token_of(person['respond_url'])}", json.dumps(answer, ensure_ascii=False).encode(),
                 headers={"Content-Type": "application/json"})
    assert stored(api.config, "SELECT status FROM pauses") == [("responded",)]
    [(weight,)] = stored(api.config, "SELECT test_weight FROM pauses")
    assert bytes_kept(api.config) <= 48 * 1024 * weight


def test_a_test_pause_opened_from_ever_new_addresses_keeps_its_openings_within_its_weight(running_api):
    """Each opening of a link is audited with its client's address and user agent: at 100 a
    pause, a plain test pause opened by its agent from new addresses, with a user agent of
    control characters each kept as a 3-byte U+FFFD, kept 119 KiB for a weight of 1."""
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.create_pause(key, channel="link", recipient="ops")
    for n in range(130):
        api.get(f"/v1/respond/{token_of(created['respond_url'])}", headers={"User-Agent": "\x85" * 400},
                extra_environ={"REMOTE_ADDR": f"2001:db8::{n:x}"})
    answer = {"choice": "Approve", "comment": EMOJI * 2000}
    api.post(f"/v1/respond/{token_of(created['respond_url'])}", json.dumps(answer, ensure_ascii=False).encode(),
             headers={"Content-Type": "application/json"})
    [(weight,)] = stored(api.config, "SELECT test_weight FROM pauses")
    assert weight == 1 and bytes_kept(api.config) <= 48 * 1024 * weight
    assert stored(api.config, "SELECT count(*) FROM audit_events WHERE event_type = 'respond_page.opened'") == [
        (pausepoint.TEST_LINK_OPENINGS_PER_UNIT,)]


def test_an_event_whose_delivery_starts_while_the_feed_is_pruned_stays(running_api, receiver):
    """The delivery job may claim an event's delivery between the job's look at the feed and its
    batches: its event and delivery must stay for the attempt to be recorded, and with them every
    later event, so that a reader whose cursor is that event misses none."""
    api = running_api(**{"webhooks.allow_private": True, "retention.test_pauses_kept": 1})
    auth = api.as_key(api.register()["test_api_key"])
    api.post_json("/v1/webhooks", {"url": receiver.url, "events": ["pause.created"]}, headers=auth)
    made = [api.post_json("/v1/pause", WIRE, headers=auth).json["pause_id"] for _ in range(3)]
    for pause_id in made:
        api.post(f"/v1/pause/{pause_id}/cancel", headers=auth)
    api.step("webhooks")
    [(event,)] = stored(api.config, "SELECT id FROM webhook_events WHERE pause_id = ? AND type = 'pause.created'",
                        made[0])
    stored(api.config, "UPDATE webhook_deliveries SET status = 'pending' WHERE event_id = ?", event)
    feed = "SELECT id FROM webhook_events ORDER BY rowid"
    from_the_claimed_one = stored(api.config, feed)
    claimed = []

    def claim_between(frame, what, arg):
        if what == "call" and frame.f_code.co_name == "delete_in_batches" and not claimed \
                and frame.f_locals.get("kind") == "webhook events":
            claimed.append(stored(api.config, "UPDATE webhook_deliveries SET status = 'delivering' WHERE event_id = ?",
                                  event))

    sys.setprofile(claim_between)
    try:
        pausepoint.prune_expired_data(api.app.runtime.db(), api.config, now=pausepoint.utcnow() + dt.timedelta(hours=2))
    finally:
        sys.setprofile(None)
    assert claimed and stored(api.config, "SELECT status FROM webhook_deliveries WHERE event_id = ?", event) == [
        ("delivering",)]
    assert stored(api.config, feed) == from_the_claimed_one          # it is the first: nothing before it to go


def test_events_written_while_a_chain_is_pruned_are_not_pruned_with_it(running_api):
    """A chain with no event left within retention is deleted up to its newest event when the
    job looked, not up to whatever is newest batch after batch: an API write may come between."""
    api = running_api()
    key = api.register()["test_api_key"]
    api.create_pause(key)
    written = []

    def write_between(frame, event, arg):      # as an API write taking the lock before the job's first batch
        if event == "call" and frame.f_code.co_name == "delete_in_batches" and not written \
                and frame.f_locals.get("kind") == "test audit events":
            written.append(api.create_pause(key)["pause_id"])

    sys.setprofile(write_between)
    try:
        pausepoint.prune_expired_data(api.app.runtime.db(), api.config,
                                      now=pausepoint.utcnow() + dt.timedelta(days=31))
    finally:
        sys.setprofile(None)
    assert stored(api.config, "SELECT event_type FROM audit_events WHERE pause_id = ?", written[0]) == [
        ("pause.created",)]


def test_a_burst_of_due_pauses_all_time_out_in_one_run_each_exactly_once(running_api, receiver):
    api = running_api(**{"webhooks.allow_private": True})
    key = api.register()["test_api_key"]
    api.post_json("/v1/webhooks", {"url": receiver.url, "events": ["pause.timed_out"]}, headers=api.as_key(key))
    api.create_pause(key)
    burst = pausepoint.JOB_BATCH * 2 + 34                  # more than one transaction's worth
    stored(api.config, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                       " INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options,"
                       " timeout_default, status, respond_token, created_at, expires_at)"
                       " SELECT 'psr_' || i, developer_id, 0, recipient, channel, message, options, timeout_default,"
                       " 'pending', 'tok' || i, created_at, ? FROM n, pauses WHERE pauses.seq = 1",
           burst, pausepoint.db_time())
    stored(api.config, "INSERT INTO notifications (id, pause_id, developer_id, channel, recipient, livemode, text,"
                       " next_attempt_at, created_at, updated_at) SELECT 'ntf_' || id, id, developer_id, channel,"
                       " recipient, 0, 'text', '2999-01-01T00:00:00.000Z', created_at, created_at FROM pauses WHERE seq > 1")
    with contextlib.closing(api.app.runtime.connect(128)) as conn:
        assert pausepoint.expire_due_pauses(conn, api.config) == burst     # one call, batch after batch
    assert stored(api.config, "SELECT status, choice, count(*) FROM pauses WHERE seq > 1 GROUP BY 1, 2") == [
        ("timed_out", "Reject", burst)]
    assert stored(api.config, "SELECT count(*), count(DISTINCT pause_id) FROM audit_events"
                              " WHERE event_type = 'pause.timed_out'") == [(burst, burst)]
    assert stored(api.config, "SELECT count(*) FROM webhook_events WHERE type = 'pause.timed_out'") == [(burst,)]
    assert stored(api.config, "SELECT status, count(*) FROM notifications WHERE pause_id IN"
                              " (SELECT id FROM pauses WHERE seq > 1) GROUP BY 1") == [("cancelled", burst)]
    assert stored(api.config, "SELECT status FROM pauses WHERE seq = 1") == [("pending",)]     # not yet due
    api.step("timeouts")
    assert stored(api.config, "SELECT count(*) FROM audit_events WHERE event_type = 'pause.timed_out'") == [(burst,)]


def test_a_backlog_of_test_mode_texts_is_simulated_in_one_run_each_exactly_once(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    api.create_pause(key)
    backlog = pausepoint.JOB_BATCH * 2 + 34
    stored(api.config, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                       " INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options,"
                       " respond_token, created_at, expires_at) SELECT 'psr_' || i, developer_id, 0, recipient, channel,"
                       " message, options, 'tok' || i, created_at, expires_at FROM n, (SELECT * FROM pauses)", backlog)
    stored(api.config, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                       " INSERT INTO notifications (id, pause_id, developer_id, channel, recipient, livemode, text,"
                       " next_attempt_at, created_at, updated_at) SELECT 'ntf_' || i, 'psr_' || i, developer_id, channel,"
                       " recipient, 0, text, next_attempt_at, created_at, updated_at FROM n, (SELECT * FROM notifications)",
           backlog)
    api.step("notifications")
    assert stored(api.config, "SELECT status, attempts, count(*) FROM notifications GROUP BY 1, 2") == [
        ("simulated", 1, backlog + 1)]
    assert stored(api.config, "SELECT count(*), count(DISTINCT pause_id) FROM audit_events"
                              " WHERE event_type = 'notification.simulated'") == [(backlog + 1, backlog + 1)]


def test_the_write_lock_goes_to_waiters_in_the_order_they_asked():
    lock, order = pausepoint.FairLock(), []

    def write(name):
        with lock:
            order.append(name)

    lock.__enter__()                                # a job's batch holds it
    writers = []
    for n, name in enumerate(("create", "respond", "cancel"), start=1):
        writers.append(threading.Thread(target=write, args=(name,)))
        writers[-1].start()
        wait_until(lambda: lock.waiting() == n)
    lock.__exit__(None, None, None)
    write("the job's next batch")                   # asks again at once, and comes last
    for writer in writers:
        writer.join()
    assert order == ["create", "respond", "cancel", "the job's next batch"] and not lock.locked()


def test_a_write_past_its_lock_wait_is_refused_only_while_the_writer_ahead_waits_on_another_process():
    lock, outcomes = pausepoint.FairLock(), []

    def write(name):
        try:
            with lock.held_by("198.51.100.1", deadline=time.monotonic() - 1):       # asked long ago
                outcomes.append(f"{name} written")
        except pausepoint.WriteLockWaitOver as e:
            outcomes.append(f"{name} refused")
            assert pausepoint.write_refused(e) == "locked"                         # a 503 database_busy

    def queue(name):
        writer = threading.Thread(target=write, args=(name,))
        writer.start()
        wait_until(lambda: lock.waiting() == 1)
        return writer

    with lock:                                      # this server's own write: the one ahead waits its turn
        behind_ours = queue("behind ours")
    behind_ours.join(10)
    with lock:
        behind_outside = queue("behind one waiting outside")
        with lock.waiting_outside():                # its BEGIN IMMEDIATE found another process's lock
            behind_outside.join(10)
    assert outcomes == ["behind ours written", "behind one waiting outside refused"]
    assert not lock.locked() and lock.waiting() == 0


def test_one_address_flooding_creates_holds_another_developers_create_back_one_write_at_most(running_api):
    flood = running_api(remote_addr="198.51.100.1")
    other = Api(flood.app, extra_environ={"REMOTE_ADDR": "203.0.113.7"})
    flooder, victim = flood.register("flood@example.com")["test_api_key"], other.register()["test_api_key"]
    lock, creates = flood.app.runtime.write_lock, []

    def create(api, key, message):
        creates.append(threading.Thread(target=api.create_pause, args=(key,), kwargs={"message": message}))
        creates[-1].start()
        wait_until(lambda: lock.waiting() == len(creates))

    with lock:                                          # a write is under way
        for n in range(5):
            create(flood, flooder, f"flood {n}")
        create(other, victim, "the other developer's")
    for thread in creates:
        thread.join(10)
    written = [message for (message,) in stored(flood.config, "SELECT message FROM pauses ORDER BY rowid")]
    assert len(written) == 6 and written.index("the other developer's") <= 1      # not behind the flood's five


def test_a_writer_interrupted_while_waiting_for_the_lock_does_not_take_it_with_it(running_api):
    assert isinstance(running_api().app.runtime.write_lock, pausepoint.FairLock)
    lock, held, release = pausepoint.FairLock(), threading.Event(), threading.Event()

    def holder():
        with lock:
            held.set()
            release.wait(10)

    threading.Thread(target=holder).start()
    held.wait(10)
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(InterruptedError()))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)   # a signal arrives while this thread waits its turn
        with pytest.raises(InterruptedError):
            with lock:
                pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    release.set()
    later = threading.Thread(target=lambda: lock.__enter__() and lock.__exit__())
    later.start()
    later.join(10)
    assert not later.is_alive() and lock.waiting() == 0 and not lock.locked()


def test_nothing_due_wakes_no_waiting_agent(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    decided = api.create_pause(key)
    api.post(f"/v1/pause/{decided['pause_id']}/cancel", headers=api.as_key(key))
    pending = api.create_pause(key)
    developer = stored(api.config, "SELECT id FROM developers")[0][0]
    topics = [f"pause:{decided['pause_id']}", f"pause:{pending['pause_id']}", f"events:{developer}:0"]
    watches = [api.app.runtime.waiting.watch(topic) for topic in topics]
    api.step("timeouts")                                        # nothing is due
    api.post_json(f"/v1/respond/{token_of(decided['respond_url'])}", {"choice": "Approve"}, status=409)
    assert [watch.topic.changes for watch in watches] == [0, 0, 0]      # so no waiting agent was made to look


def test_every_connection_keeps_a_small_page_cache_of_its_own(running_api):
    # Each of the ~90 threads has a connection: SQLite's 2 MB default each was most of the memory.
    for settings, kib in (({}, 128), ({"database.cache_kib": 512}, 512)):
        api = running_api(**settings)
        caches = concurrent.futures.ThreadPoolExecutor(4).map(
            lambda _: api.app.runtime.db().execute("PRAGMA cache_size").fetchone()[0], range(4))
        assert set(caches) == {-kib}


def test_the_timeout_job_has_a_connection_with_a_page_cache_of_its_own(running_api):
    api = running_api()
    api.step("timeouts")
    assert api.app.runtime.timeouts_db.execute("PRAGMA cache_size").fetchone()[0] == -pausepoint.TIMEOUTS_CACHE_KIB
    assert api.app.runtime.db().execute("PRAGMA cache_size").fetchone()[0] == -128


def test_the_wal_is_checkpointed_by_its_job_never_inside_a_request(running_api, tmp_path):
    api = running_api()
    key = api.register()["test_api_key"]
    assert api.app.runtime.db().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == pausepoint.WAL_CHECKPOINT_PAGES
    for _ in range(150):                                     # well past SQLite's 1,000-page automatic checkpoint
        api.create_pause(key, metadata={"note": "x" * 3000})
    wal = api.config["database.path"] + "-wal"
    frames = os.path.getsize(wal) // 4096
    assert frames > 1000                                     # no request's commit checkpointed it

    def pauses_in_the_file_alone():
        """Pauses a copy of the database file holds without its WAL."""
        copy = str(tmp_path / f"without-wal-{time.monotonic_ns()}.db")
        shutil.copyfile(api.config["database.path"], copy)
        if not stored(copy, "SELECT 1 FROM sqlite_master WHERE name = 'pauses'"):
            return 0
        return stored(copy, "SELECT count(*) FROM pauses")[0][0]

    assert pauses_in_the_file_alone() < 150                  # still only in the WAL
    api.step("checkpoint")
    assert pauses_in_the_file_alone() == 150


def test_the_checkpoint_job_runs_every_second(running_api):
    job = running_api(jobs=True).app.runtime.scheduler.get_job("run_checkpoint")
    assert job.trigger.interval == dt.timedelta(seconds=1)


def test_the_checkpoint_finishes_under_the_write_lock_so_the_wal_starts_over(running_api):
    # Racing the jobs' commits, a checkpoint never copied the last frames, so the WAL was
    # never started over and grew by megabytes a second under steady writes.
    api = running_api()
    key = api.register()["test_api_key"]
    for _ in range(20):
        api.create_pause(key)
    runtime = api.app.runtime
    with runtime.write_lock:                              # a writer is committing
        checkpoint = threading.Thread(target=runtime.run_checkpoint)
        checkpoint.start()
        wait_until(lambda: runtime.write_lock.waiting() == 1)     # its last step waits for the lock
    checkpoint.join(10)
    api.create_pause(key)                                 # the first commit after a whole checkpoint
    assert stored(api.config, "PRAGMA wal_checkpoint(PASSIVE)")[0][1] < 100   # the WAL started over (20 creates: 400+)


def test_at_most_so_many_requests_run_at_once_and_a_waiting_one_gives_its_turn_up():
    turns, lock, running, most = pausepoint.Turns(2), threading.Lock(), [0], [0]
    release, waiting = threading.Event(), threading.Event()

    def request(waits):
        with turns.taken("192.0.2.1"):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            if waits:
                with turns.given_up():            # a long poll, or the write lock's queue
                    waiting.set()
                    release.wait(10)
            else:
                release.wait(0.05)
            with lock:
                running[0] -= 1

    waiter = threading.Thread(target=request, args=(True,))
    waiter.start()
    waiting.wait(10)
    others = [threading.Thread(target=request, args=(False,)) for _ in range(6)]
    for thread in others:
        thread.start()
    for thread in others:
        thread.join(10)
    assert not any(thread.is_alive() for thread in others)      # they ran while the waiter waited
    release.set()
    waiter.join(10)
    assert most[0] == 2 + 1                                     # two with turns, and the one that gave its up


def test_one_address_with_many_requests_waiting_holds_another_address_back_one_turn_at_most(running_api):
    assert isinstance(running_api().app.runtime.turns, pausepoint.Turns)
    turns, order, held, release, lock = pausepoint.Turns(1), [], threading.Event(), threading.Event(), threading.Lock()

    def request(address, name, hold=False):
        with turns.taken(address):
            with lock:
                order.append(name)
            if hold:
                held.set()
                release.wait(10)

    threads = [threading.Thread(target=request, args=("198.51.100.1", "flood 0", True))]
    threads[0].start()
    held.wait(10)
    for n, (address, name) in enumerate([("198.51.100.1", f"flood {n}") for n in range(1, 6)]
                                        + [("203.0.113.7", "health check")], start=1):
        threads.append(threading.Thread(target=request, args=(address, name)))
        threads[-1].start()
        wait_until(lambda: turns.waiting() == n)
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(order) == 7 and order.index("health check") <= 2     # not behind the flood's five waiting


def test_a_request_gives_its_turn_up_while_it_waits_for_the_write_lock(running_api):
    runtime = running_api().app.runtime
    turns, taken, release = runtime.turns, threading.Semaphore(0), threading.Event()

    def write():
        with turns.taken("198.51.100.9"), pausepoint.transaction(runtime.db()):
            pass

    def hold_a_turn():
        with turns.taken("203.0.113.7"):
            taken.release()
            release.wait(10)

    writer = threading.Thread(target=write)
    try:
        with runtime.write_lock:                                # another write is under way
            writer.start()
            wait_until(lambda: runtime.write_lock.waiting() == 1)
            for _ in range(turns.size):                         # every turn is free for others meanwhile
                threading.Thread(target=hold_a_turn).start()
                assert taken.acquire(timeout=10)
    finally:
        release.set()
    writer.join(10)
    assert not writer.is_alive()


def test_every_request_waits_for_a_turn_when_all_are_taken(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    turns, taken, release = api.app.runtime.turns, threading.Semaphore(0), threading.Event()

    def hold_a_turn():
        with turns.taken("203.0.113.7"):
            taken.release()
            release.wait(10)

    try:
        for _ in range(turns.size):
            threading.Thread(target=hold_a_turn).start()
            assert taken.acquire(timeout=10)
        listing = threading.Thread(target=api.get, args=("/v1/pause",), kwargs={"headers": api.as_key(key)})
        listing.start()
        wait_until(lambda: turns.waiting() == 1)
    finally:
        release.set()
    listing.join(10)
    assert not listing.is_alive() and turns.waiting() == 0


def test_a_download_is_written_out_in_turns_like_any_other_request(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    for _ in range(40):                                         # an export of several chunks
        api.create_pause(key)
    turns, taken, release = api.app.runtime.turns, threading.Semaphore(0), threading.Event()
    environ = webtest.TestRequest.blank("/v1/audit/export", headers=api.as_key(key),
                                        environ={"REMOTE_ADDR": "198.51.100.1"}).environ
    body = iter(api.app(environ, lambda status, headers, exc_info=None: None))
    chunks = [next(body)]                                       # its first chunk, made as the answer began

    def hold_a_turn():
        with turns.taken("203.0.113.7"):
            taken.release()
            release.wait(10)

    def release_once_the_download_waits():
        while not release.is_set():
            if turns.waiting("198.51.100.1") == 1:
                waited.append(True)
                release.set()
            time.sleep(0.01)

    waited = []
    for _ in range(turns.size):
        threading.Thread(target=hold_a_turn).start()
        assert taken.acquire(timeout=10)
    threading.Thread(target=release_once_the_download_waits).start()
    try:
        chunks.extend(body)                                     # written out on the thread that began it
    finally:
        release.set()
    assert waited and b"".join(chunks).count(b'"event_type":"pause.created"') == 40     # it waited for a turn


def test_a_checkpoint_held_back_by_a_reader_leaves_the_write_lock_alone(running_api):
    # With a long backlog the step under the lock would copy all of it while every writer waits.
    api = running_api()
    key = api.register()["test_api_key"]
    runtime = api.app.runtime
    reader = sqlite3.connect(api.config["database.path"], isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM pauses").fetchone()       # a read snapshot from before the backlog
    for _ in range(120):
        api.create_pause(key, metadata={"note": "x" * 2000})
    try:
        with runtime.write_lock:
            checkpoint = threading.Thread(target=runtime.run_checkpoint)
            checkpoint.start()
            checkpoint.join(5)
            assert not checkpoint.is_alive() and runtime.write_lock.waiting() == 0
    finally:
        reader.close()


def test_pruning_deletes_sign_ins_past_either_limit(running_api):
    api = running_api(**{"dashboard.session_idle_minutes": 60, "dashboard.session_max_hours": 24})
    developer = {"id": api.register()["developer_id"]}
    conn = api.app.runtime.db()
    tokens = [pausepoint.start_session(conn, developer)[0] for _ in range(3)]
    now = pausepoint.utcnow()
    digest = [pausepoint.key_digest(token) for token in tokens]
    stored(api.config, "UPDATE dashboard_sessions SET last_seen_at = ? WHERE token_hash = ?",
           pausepoint.db_time(now - dt.timedelta(minutes=61)), digest[0])              # idle too long
    stored(api.config, "UPDATE dashboard_sessions SET created_at = ? WHERE token_hash = ?",
           pausepoint.db_time(now - dt.timedelta(hours=25)), digest[1])                # too old, though in use
    assert pausepoint.prune_expired_data(conn, api.config)["dashboard sign-ins"] == 2
    assert stored(api.config, "SELECT token_hash FROM dashboard_sessions") == [(digest[2],)]


def test_a_commit_that_fails_leaves_no_transaction_open_for_the_next_user(app):
    conn = app.runtime.db()
    with pytest.raises(sqlite3.IntegrityError):
        with pausepoint.transaction(conn):
            conn.execute("PRAGMA defer_foreign_keys = ON")         # the constraint is checked at COMMIT
            conn.execute("INSERT INTO dashboard_sessions (token_hash, developer_id, csrf_token, created_at,"
                         " last_seen_at) VALUES ('t', 'dev_nobody', 'c', 'now', 'now')")
    assert not conn.in_transaction
    with pausepoint.transaction(conn):                              # the connection is good for the next
        conn.execute("DELETE FROM dashboard_sessions")
    assert stored(app.runtime.config, "SELECT count(*) FROM dashboard_sessions") == [(0,)]


def test_a_new_database_and_its_wal_files_are_readable_by_their_owner_only(running_api, tmp_path):
    umask = os.umask(0o022)         # as most systems have it: SQLite alone would make them 0644
    try:
        api = running_api(fresh=True)
        api.register()
        path = api.config["database.path"]
        assert {name: stat.S_IMODE(os.stat(path + name).st_mode) for name in ("", "-wal", "-shm")} == \
            {"": 0o600, "-wal": 0o600, "-shm": 0o600}
        (tmp_path / "by-command").mkdir()
        assert run_cli(tmp_path / "by-command", "create-developer", "--email", "ops@example.com", "--name", "Ops",
                       "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
        assert stat.S_IMODE(os.stat(tmp_path / "by-command" / "pausepoint.db").st_mode) == 0o600
        (tmp_path / "real").mkdir()
        (tmp_path / "linked.db").symlink_to(tmp_path / "real" / "pausepoint.db")      # to a file not made yet
        pausepoint.create_app(make_config(tmp_path, **{"database.path": str(tmp_path / "linked.db")})).runtime.stop()
        assert stat.S_IMODE(os.stat(tmp_path / "real" / "pausepoint.db").st_mode) == 0o600
    finally:
        os.umask(umask)


def test_a_database_others_may_read_is_warned_of_once_at_start(running_api, caplog):
    api = running_api()
    api.app.runtime.stop()
    os.chmod(api.config["database.path"], 0o644)
    pausepoint.create_app(api.config).runtime.stop()
    warned = [record.getMessage() for record in caplog.records if "the database" in record.getMessage()]
    assert warned == [f"others than its owner may read or write the database {api.config['database.path']}: chmod 600"
                      " it, and its -wal and -shm files (a respond token in them decides a pause)"]


# A process that dies halfway through a write in rollback-journal mode, as a first start does
# while it switches the new file to WAL.
KILLED_MIDWAY = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size = 1")             # so the change reaches the file before a commit
db.execute("BEGIN")
db.execute("CREATE TABLE half_written (x)")
for _ in range(50):
    db.execute("INSERT INTO half_written VALUES (randomblob(3000))")
os._exit(9)
"""


@pytest.mark.parametrize("named_by", ["its own name", "a symbolic link"])
def test_a_write_killed_halfway_is_undone_by_the_next_start_which_then_serves(tmp_path, capsys, named_by):
    path = str(tmp_path / "pausepoint.db")
    real = path if named_by == "its own name" else str(tmp_path / "real.db")
    if real != path:
        os.symlink(real, path)                      # the journal is beside the file SQLite opens
    subprocess.run([sys.executable, "-c", KILLED_MIDWAY, real], timeout=60)
    assert os.path.getsize(real + "-journal") > 0 and os.path.getsize(real) > 4096
    assert pausepoint.main(["--db", path, "verify-audit"]) == 2           # it only reads: it cannot undo it
    assert capsys.readouterr().err == (
        f"pausepoint: cannot use the database {path}: attempt to write a readonly database; a process stopped while"
        f" writing it left {real}-journal, which only one that may write it undoes: start the server on it once\n")
    app = pausepoint.create_app(make_config(tmp_path))
    try:
        assert Api(app).register()["api_key"].startswith("pp_live_")
    finally:
        app.runtime.stop()
    assert not stored(path, "SELECT 1 FROM sqlite_master WHERE name = 'half_written'")


def test_a_new_database_file_has_its_header_before_anything_is_made_beside_it(tmp_path):
    # So that a file of 0 bytes beside signing keys is one emptied, never one a start was making.
    path = str(tmp_path / "pausepoint.db")
    pausepoint.create_private(path)
    assert os.path.getsize(path) > 0 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stored(path, "PRAGMA journal_mode") == [("wal",)]


@pytest.mark.parametrize("what", [("serve",), ("set-operator", "--email", "a@example.com")])
def test_a_start_or_a_command_on_a_full_disk_says_the_disk_is_full(small_disk, what):
    """With no room left even for the wal-index SQLite makes at the first open, SQLite says
    only "disk I/O error": the operator is told to free space, not left to suspect the disk."""
    from conftest import fill_disk
    assert run_cli(small_disk, "create-developer", "--email", "a@example.com", "--name", "A", "--password-stdin",
                   stdin=PASSWORD + "\n").returncode == 0
    # As the command leaves it run on its own, closing: its -wal and -shm gone with its last connection.
    assert stored(str(small_disk / "pausepoint.db"), "SELECT count(*) FROM developers") == [(1,)]
    assert sorted(os.listdir(small_disk)) == ["pausepoint.db"]
    filler = fill_disk(small_disk)
    done = run_cli(small_disk, "--port", str(free_port()), *what)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "its disk has no room left" in done.stderr and "free space on it, then try again" in done.stderr
    os.unlink(filler)
    assert stored(str(small_disk / "pausepoint.db"), "SELECT is_operator FROM developers") == [(0,)]
