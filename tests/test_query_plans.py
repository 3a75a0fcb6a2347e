"""Every query the hot paths run uses an index, on a database big enough for the
planner's choice to matter: read from the statements the server really executes."""

import datetime as dt
import re
import sqlite3

from conftest import stored, QUESTION, WIRE, token_of
import pausepoint

# A query may read from end to end only what it made itself: a recursive CTE's rows or a JSON list.
# Scans that read little: a JSON array (`batch` when it is a job's batch of ids), a CTE's
# rows, a constant, the operator's list of developers (`d`), newest first by rowid,
# which stops after a page, and a team pause's few people (`r`, or a subquery's), read
# through an index first.
SMALL = ("json_each", "batch", "waiting", "CONSTANT ROW", "d", "r", r"\(subquery-[0-9]+")


def fill(config, developer_id, pauses):
    """`pauses` decided test pauses of one developer, each with a notification and
    three audit events, copied from the first pause (as a busy year would leave them)."""
    stored(config, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                   " INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options,"
                   " timeout_default, status, choice, decided_at, decided_by, respond_token, created_at, expires_at)"
                   " SELECT 'psr_' || ? || '_' || i, ?, 0, recipient, channel, message, options, timeout_default, 'responded',"
                   " 'Approve', created_at, 'recipient', 'tok' || ? || '_' || i, created_at, expires_at"
                   " FROM n, (SELECT * FROM pauses ORDER BY seq LIMIT 1)", pauses, developer_id, developer_id, developer_id)
    stored(config, "INSERT INTO notifications (id, pause_id, developer_id, channel, recipient, livemode, text, status,"
                   " next_attempt_at, created_at, updated_at) SELECT 'ntf_' || id, id, developer_id, channel, recipient,"
                   " 0, 'text', 'simulated', created_at, created_at, created_at FROM pauses WHERE developer_id = ?"
                   " AND id LIKE 'psr\\_%' ESCAPE '\\' AND seq > 1", developer_id)
    stored(config, "INSERT INTO audit_events (developer_id, livemode, timestamp, actor, event_type, pause_id, data,"
                   " prev_hash, hash) SELECT developer_id, 0, created_at, 'system', kind, id, '{}', 'copied', 'copied'"
                   " FROM pauses, (SELECT 'pause.created'"
                   " AS kind UNION ALL SELECT 'notification.simulated' UNION ALL SELECT 'pause.responded')"
                   " WHERE developer_id = ? AND seq > 1", developer_id)


def plans(config, statements):
    """{statement: its query plan}, for the statements that read tables."""
    found = {}
    for sql in statements:
        if re.match(r"\s*(SELECT|WITH|UPDATE|DELETE|INSERT .* SELECT)", sql, re.I | re.S) and "sqlite_master" not in sql:
            found[sql] = " / ".join(row[3] for row in stored(config, "EXPLAIN QUERY PLAN " + sql))
    return found


def test_the_hot_queries_use_indexes_on_a_big_database(running_api, receiver, twilio):
    # 30,000 pauses and 90,000 audit events of one developer, 5,000 other developers with a
    # webhook each, 40 of them with 100 pauses.
    api = running_api(**{"webhooks.allow_private": True}, **twilio.settings())
    keys = api.register()
    key, auth = keys["test_api_key"], api.as_key(keys["test_api_key"])
    webhook_id = api.post_json("/v1/webhooks", {"url": receiver.url, "events": ["pause.responded"]},
                               headers=auth).json["webhook_id"]
    created = api.create_pause(key)
    other = api.register(email="other@example.com")["test_api_key"]
    api.create_pause(other)
    fill(api.config, keys["developer_id"], 30_000)
    stored(api.config, "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 4999)"
                       " INSERT INTO developers (id, email, name, password_hash, created_at) SELECT 'dev_small_' || i,"
                       " 'small' || i || '@example.com', 'S', 'x', created_at FROM n, developers WHERE email = ?",
           "dev@example.com")
    stored(api.config, "INSERT INTO webhooks (id, developer_id, livemode, url, events, secret, created_at, updated_at)"
                       " SELECT 'wh_' || id, id, 0, url, events, secret, created_at, created_at FROM developers,"
                       " (SELECT url, events, secret FROM webhooks) WHERE id LIKE 'dev\\_small\\_%' ESCAPE '\\'")
    for n in range(40):                                   # many small tenants beside the big one
        fill(api.config, f"dev_small_{n}", 100)
    pausepoint.refresh_statistics(api.app.runtime.db())  # as the server does at start and daily
    filled = dt.datetime.now(dt.timezone.utc).isoformat()

    stored(api.config, "UPDATE developers SET is_operator = 1 WHERE id = ?", keys["developer_id"])
    token, _ = pausepoint.start_session(api.app.runtime.db(), {"id": keys["developer_id"]})
    api.set_cookie("pp_session", token)

    statements = []
    api.app.runtime.db().set_trace_callback(statements.append)
    api.pause(key, created["pause_id"])
    api.get("/v1/pause", {"limit": 50}, headers=auth)
    api.get("/v1/pause", {"limit": 50, "status": "pending"}, headers=auth)
    api.get("/v1/audit", headers=auth)
    api.get("/v1/audit", {"pause_id": created["pause_id"]}, headers=auth)
    api.get("/v1/audit", {"event_type": "pause.created"}, headers=auth)
    api.get(f"/v1/respond/{token_of(created['respond_url'])}")
    api.post_json(f"/v1/respond/{token_of(created['respond_url'])}", {"choice": "Approve"})
    api.create_pause(key, **{"recipient": WIRE["recipient"]})
    api.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=auth)
    first_event = api.get("/v1/events", {"limit": 1}, headers=auth).json["events"][0]["id"]
    api.get("/v1/events", {"after": first_event, "types": "pause.created"}, headers=auth)
    for page in ("overview", "pauses", f"pauses/{created['pause_id']}", "audit", "keys", "webhooks",
                 f"webhooks/{webhook_id}", "operator", f"audit.csv?pause_id={created['pause_id']}"):
        assert api.get(f"/dashboard/{page}").status_code == 200
    team = api.post_json("/v1/pause", {
        **QUESTION,
        "recipients": [{"recipient": "+15550101", "channel": "sms"}, {"recipient": "+15550102", "channel": "sms"}],
        "quorum": {"choice": "Approve", "count": 2}, "remind_after_minutes": [1],
        "escalation": [{"after_minutes": 2, "recipient": "+15550103", "channel": "sms"}]}, headers=auth).json
    second = token_of(team["recipients"][1]["respond_url"])
    api.get(f"/v1/respond/{second}")
    api.post_json(f"/v1/respond/{second}", {"choice": "Approve"})
    stored(api.config, "UPDATE pause_steps SET due_at = '2000-01-01T00:00:00.000Z'")
    api.pause(key, team["pause_id"])
    pausepoint.record_sms_reply(api.app.runtime.db(), api.config, "+15550101", "1", "SM" + "0" * 32)
    assert pausepoint.record_sms_reply(api.app.runtime.db(), api.config, "+15550188", "hi", "SM" + "2" * 32) is None
    answered = api.create_pause(keys["api_key"], recipient="+15550109")        # live texts, then a bare reply
    api.step("notifications")
    api.post_json(f"/v1/respond/{token_of(answered['respond_url'])}", {"choice": "Approve"})
    api.create_pause(keys["api_key"], recipient="+15550109")
    api.step("notifications")
    assert "could be meant" in pausepoint.record_sms_reply(api.app.runtime.db(), api.config, "+15550109", "1",
                                                          "SM" + "1" * 32)
    [(closed_code,)] = stored(api.config, "SELECT reply_code FROM pauses WHERE id = ?", answered["pause_id"])
    assert "is closed" in pausepoint.record_sms_reply(api.app.runtime.db(), api.config, "+15550109",
                                                      f"{closed_code} 1", "SM" + "3" * 32)
    # Twilio's report that a text went undelivered finds it by its id, among every notification.
    [(sid,)] = stored(api.config, "SELECT provider_message_id FROM notifications WHERE provider_message_id IS NOT NULL"
                                  " ORDER BY created_at DESC LIMIT 1")
    pausepoint.record_delivery_report(api.app.runtime.db(), api.config, sid, "undelivered", "30003")
    # The export's statement whatever its window (without STAT4 statistics, which the server's
    # limited ANALYZE leaves none of even where SQLite can keep them, a bound's value never
    # changes a plan), over the events since the fill, not 90,000.
    assert not stored(api.config, "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat4'") \
        or not stored(api.config, "SELECT 1 FROM sqlite_stat4 LIMIT 1")
    assert api.get("/v1/audit/export", {"since": filled}, headers=auth).text
    api.get("/v1/audit/head", headers=auth)
    for job in ("timeouts", "steps", "notifications", "webhooks"):
        api.step(job)
    pausepoint.lapse_claims_of_a_stopped_server(api.app.runtime.db())
    api.app.runtime.db().set_trace_callback(None)

    scans = {sql: plan for sql, plan in plans(api.config, statements).items()
             # (a partial index of the sends and deliveries not yet done holds only those)
             if re.search(r"\bSCAN (?!(%s)\b)" % "|".join(SMALL), plan)
             and not re.search(r"\bUSING INDEX (notifications_due_live|webhook_deliveries_due)$", plan)
             or re.search(r"\bUSING (COVERING )?INDEX audit_by_owner\b", plan) and "pause_id =" in sql
             # the audit log, the largest table, is read through its owner's or its pause's index,
             # never from some seq on through every developer's events, nor by age
             or re.search(r"\bSEARCH audit_events (?!USING (COVERING )?INDEX audit_by_)", plan)
             # a number's people lead to their pauses by id, not through every pending one, and
             # only those of pending or lately decided pauses are read, not the number's history
             or "pauses_pending_by_expiry" in plan and "pause_recipients" in sql
             or re.search(r"pause_recipients_by_number \(recipient=\? AND livemode=\?(?! AND <expr>=\? AND pause_decided_at)",
                          plan)
             # a new reply code is looked for among the codes of its scope only (CODE_SCOPE)
             or re.search(r"pauses_(pending|recent)_reply_codes? \(recipient=\? AND livemode=\?(?! AND <expr>=\?)", plan)}
    assert scans == {}
    assert len(statements) > 30


def test_the_hot_statements_are_prepared_once_and_reused(running_api, receiver, twilio):
    """SQLite prepares a statement again before each run whose bound values could change its
    plan: one comparing a column that a partial index's WHERE names (livemode, status) to a
    parameter. A pause's JSON took 0.39 ms to prepare against 0.016 ms to run. Once each
    path has run, running it again prepares nothing (PRAGMAs, which SQLite always
    prepares again, and cheap, aside)."""
    api = running_api(**{"webhooks.allow_private": True}, **twilio.settings())
    keys = api.register()
    auth = api.as_key(keys["test_api_key"])
    api.post_json("/v1/webhooks", {"url": receiver.url, "events": ["pause.responded"]}, headers=auth)
    conn, prepared, compiled = api.app.runtime.db(), [], [0]
    conn.set_authorizer(lambda *_: compiled.__setitem__(0, compiled[0] + 1) or sqlite3.SQLITE_OK)

    def started(sql):
        if compiled[0] and not sql.lstrip().upper().startswith("PRAGMA"):
            prepared.append(sql[:120])
        compiled[0] = 0
    conn.set_trace_callback(started)
    for turn in range(2):
        prepared.clear()
        for key, recipient in ((keys["test_api_key"], "+15550100"), (keys["api_key"], "+15550109")):
            auth = api.as_key(key)
            pause = api.create_pause(key, recipient=recipient)
            api.pause(key, pause["pause_id"])
            api.get("/v1/pause", {"limit": 5}, headers=auth)
            api.get("/v1/pause", {"limit": 5, "status": "pending"}, headers=auth)
            api.get("/v1/audit", {"pause_id": pause["pause_id"]}, headers=auth)
            api.get("/v1/events", {"limit": 5}, headers=auth)
            api.step("notifications")
            api.get(f"/v1/respond/{token_of(pause['respond_url'])}")
            api.post_json(f"/v1/respond/{token_of(pause['respond_url'])}", {"choice": "Approve"})
            cancelled = api.create_pause(key, recipient=recipient)
            api.post(f"/v1/pause/{cancelled['pause_id']}/cancel", headers=auth)
        texted = api.create_pause(keys["api_key"], recipient="+15550109")
        api.step("notifications")
        [(code,)] = stored(api.config, "SELECT reply_code FROM pauses WHERE id = ?", texted["pause_id"])
        assert "recorded" in pausepoint.record_sms_reply(conn, api.config, "+15550109", f"{code} 1", f"SM{turn:032}")
        for job in ("timeouts", "steps", "notifications", "webhooks"):
            api.step(job)
    conn.set_trace_callback(None)
    conn.set_authorizer(None)
    assert prepared == [], "\n".join(prepared)
