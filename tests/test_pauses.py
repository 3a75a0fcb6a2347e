import contextlib
import datetime as dt
import logging
import json
import os
import shutil
import sqlite3
import tempfile

import pytest
import requests

from conftest import PASSWORD, QUESTION, WIRE, Api, cannot_run_here, disk_of_its_own, fill_disk, make_config, run_out, stored, token_of
import pausepoint


def parse(ts):
    return dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def test_creating_a_pause_returns_exactly_the_quickstarts_fields(api, developer):
    response = api.post_json("/v1/pause", WIRE, headers=api.as_key(developer["test_api_key"]), status=201)
    body = response.json
    assert set(body) == {"pause_id", "status", "respond_url", "expires_at", "created_at"}
    assert body["pause_id"].startswith("psr_") and body["status"] == "pending"
    assert body["respond_url"].startswith("http://127.0.0.1:8080/respond/")
    assert len(token_of(body["respond_url"])) >= 43          # 32 random bytes, base64url
    assert parse(body["expires_at"]) - parse(body["created_at"]) == dt.timedelta(hours=4)


def test_the_whole_pause_shows_status_choice_metadata_and_notification(api, developer):
    key = developer["test_api_key"]
    created = api.create_pause(key, metadata={"invoice": "INV-7", "amount_cents": 34000})
    api.step("notifications")
    pause = api.pause(key, created["pause_id"])
    assert pause["notification"]["status"] == "simulated"
    assert pause["status"] == "pending" and pause["choice"] is None and pause["decided_by"] is None
    assert pause["metadata"] == {"invoice": "INV-7", "amount_cents": 34000}
    assert pause["livemode"] is False
    assert pause["respond_url"] == created["respond_url"]
    assert pause["notification"]["channel"] == "sms"
    assert created["respond_url"] in pause["notification"]["text"]
    assert WIRE["message"] in pause["notification"]["text"]


@pytest.mark.parametrize("changes, field", [
    ({"recipient": None}, "recipient"),
    ({"recipient": "555-0100"}, "recipient"),
    ({"recipient": "+0123"}, "recipient"),
    ({"channel": "carrier-pigeon"}, "channel"),
    ({"channel": None}, "channel"),
    ({"message": ""}, "message"),
    ({"message": "x" * 1601}, "message"),
    ({"options": ["Only"]}, "options"),
    ({"options": [str(n) for n in range(11)]}, "options"),
    ({"options": ["Yes", "Yes"]}, "options"),
    ({"options": ["Yes", ""]}, "options"),
    ({"options": ["Yes", "x" * 101]}, "options"),
    ({"options": "Yes,No"}, "options"),
    ({"timeout_hours": 0}, "timeout_hours"),
    ({"timeout_hours": -1}, "timeout_hours"),
    ({"timeout_hours": "4"}, "timeout_hours"),
    ({"timeout_hours": True}, "timeout_hours"),
    ({"timeout_hours": 721}, "timeout_hours"),
    ({"timeout_hours": 0.0001}, "timeout_hours"),
    ({"timeout_default": "Maybe"}, "timeout_default"),
    ({"metadata": ["not", "an", "object"]}, "metadata"),
    ({"metadata": {"blob": "x" * 17000}}, "metadata"),
    ({"timeout_hour": 4}, "timeout_hour"),
])
def test_every_bad_field_gets_422_naming_it(api, developer, changes, field):
    body = {**WIRE, **changes}
    error = api.post_json("/v1/pause", body, headers=api.as_key(developer["test_api_key"]), status=422).json["error"]
    assert error["code"] == "invalid_request" and error["field"] == field, error


def test_a_pause_without_a_timeout_default_times_out_deciding_nothing(api, developer):
    key = developer["test_api_key"]
    body = {k: v for k, v in WIRE.items() if k != "timeout_default"}
    created = api.post_json("/v1/pause", body, headers=api.as_key(key)).json
    run_out(api.config, created["pause_id"])
    api.step("timeouts")
    pause = api.pause(key, created["pause_id"])
    assert pause["status"] == "timed_out" and pause["choice"] is None and pause["decided_by"] == "timeout"


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 422, "invalid_request"),
])
def test_malformed_bodies_get_a_clear_4xx(api, developer, body, status, code):
    response = api.post("/v1/pause", body, headers={**api.as_key(developer["test_api_key"]),
                                                   "Content-Type": "application/json"}, status=status)
    assert response.json["error"]["code"] == code


@pytest.mark.parametrize("body, where", [
    (b'{"recipient": "+15550100", "channel": "sms",}', "Expecting property name enclosed in double quotes at line 1 column 45"),
    (b"{'recipient': '+15550100'}", "Expecting property name enclosed in double quotes at line 1 column 2"),
    (b'{\n  "message": "wire $340"\n  "options": ["Approve", "Reject"]\n}', "Expecting ',' delimiter at line 3 column 3"),
])
def test_a_body_that_is_not_json_is_told_where_it_stops_being_json(api, developer, body, where):
    response = api.post("/v1/pause", body, headers={**api.as_key(developer["test_api_key"]),
                                                   "Content-Type": "application/json"}, status=400)
    assert response.json["error"] == {"code": "invalid_json", "message": f"the request body is not valid JSON: {where}"}


def test_a_default_or_quorum_choice_not_among_the_options_is_refused_listing_them(api, developer):
    headers = api.as_key(developer["test_api_key"])
    error = api.post_json("/v1/pause", {**WIRE, "timeout_default": "reject"}, headers=headers, status=422).json["error"]
    assert error == {"code": "invalid_request", "field": "timeout_default",
                     "message": "timeout_default 'reject' must be one of the options, exactly as written: Approve, Reject"
                                " (or left out)"}
    team = {**QUESTION, "recipients": [{"recipient": "+15550101", "channel": "sms"},
                                       {"recipient": "+15550102", "channel": "sms"}],
            "quorum": {"choice": "approve", "count": 2}}
    error = api.post_json("/v1/pause", team, headers=headers, status=422).json["error"]
    assert error == {"code": "invalid_request", "field": "quorum",
                     "message": "quorum's choice 'approve' must be one of the options, exactly as written: Approve, Reject"}


def test_bodies_over_the_configured_size_get_413(tmp_path):
    app = pausepoint.create_app(make_config(tmp_path, **{"server.max_body_bytes": 2048}))
    api = Api(app)
    key = api.register()["test_api_key"]
    response = api.post_json("/v1/pause", {**WIRE, "metadata": {"x": "y" * 3000}}, headers=api.as_key(key), status=413)
    assert response.json["error"]["code"] == "payload_too_large"


def test_unknown_endpoints_and_methods_answer_in_the_json_error_shape(api):
    assert api.get("/v1/nothing-here", status=404).json["error"]["code"] == "not_found"
    assert api.delete("/v1/pause", status=405).json["error"]["code"] == "method_not_allowed"


def test_an_unknown_endpoint_or_method_is_named_in_the_answer(api):
    # As a client given "http://host:8080/v1" for its base URL asks.
    assert api.get("/v1/v1/pause", status=404).json["error"]["message"] == (
        "no such endpoint: GET /v1/v1/pause (every path is listed in /v1/openapi.json)")
    assert api.delete("/v1/pause", status=405).json["error"]["message"] == (
        "method not allowed on this endpoint: DELETE /v1/pause; it takes GET, POST")


@pytest.mark.parametrize("path", ["/static/pausepoint.css", "/static/dashboard.js"])
def test_a_range_past_the_end_of_a_static_file_answers_in_the_json_error_shape(api, path):
    refused = api.get(path, headers={"Range": "bytes=999999-"}, status=416)
    assert refused.content_type == "application/json" and "<html" not in refused.text
    assert refused.json["error"]["code"] == "range_not_satisfiable"


def test_listing_is_newest_first_filtered_by_status_and_paginated(api, developer):
    key = developer["test_api_key"]
    ids = [api.create_pause(key, message=f"question {n}")["pause_id"] for n in range(5)]
    api.post(f"/v1/pause/{ids[1]}/cancel", headers=api.as_key(key))
    first = api.get("/v1/pause", {"limit": 2}, headers=api.as_key(key)).json
    assert [p["pause_id"] for p in first["pauses"]] == [ids[4], ids[3]]
    second = api.get("/v1/pause", {"limit": 2, "cursor": first["next_cursor"]}, headers=api.as_key(key)).json
    third = api.get("/v1/pause", {"limit": 2, "cursor": second["next_cursor"]}, headers=api.as_key(key)).json
    assert [p["pause_id"] for p in second["pauses"] + third["pauses"]] == [ids[2], ids[1], ids[0]]
    assert third["next_cursor"] is None
    cancelled = api.get("/v1/pause", {"status": "cancelled"}, headers=api.as_key(key)).json["pauses"]
    assert [p["pause_id"] for p in cancelled] == [ids[1]]
    assert api.get("/v1/pause", {"status": "done"}, headers=api.as_key(key), status=422).json["error"]["field"] == "status"
    assert api.get("/v1/pause", {"limit": 0}, headers=api.as_key(key), status=422).json["error"]["field"] == "limit"
    assert api.get("/v1/pause", {"cursor": "abc"}, headers=api.as_key(key), status=422).json["error"]["field"] == "cursor"


def test_cancelling_decides_a_pending_pause_once(api, developer):
    key = developer["test_api_key"]
    pause_id = api.create_pause(key)["pause_id"]
    cancelled = api.post(f"/v1/pause/{pause_id}/cancel", headers=api.as_key(key)).json
    assert cancelled["status"] == "cancelled" and cancelled["choice"] is None
    assert cancelled["decided_by"].startswith("api:pp_test_") and cancelled["decided_at"]
    again = api.post(f"/v1/pause/{pause_id}/cancel", headers=api.as_key(key), status=409).json["error"]
    assert "cancelled" in again["message"]
    api.post("/v1/pause/psr_nope/cancel", headers=api.as_key(key), status=404)


def test_a_cancel_after_the_deadline_is_refused_and_the_timeout_the_person_was_told_of_decides(api, developer):
    """Between expires_at and the timeout job's next run, the person's answer is refused as
    expired, the default applying: a cancel then must not become the outcome instead."""
    key = developer["test_api_key"]
    pause_id = api.create_pause(key)["pause_id"]
    run_out(api.config, pause_id)
    refused = api.post(f"/v1/pause/{pause_id}/cancel", headers=api.as_key(key), status=409).json["error"]
    assert refused["code"] == "not_pending" and "times out to its default 'Reject'" in refused["message"]
    api.step("timeouts")
    assert api.pause(key, pause_id)["status"] == "timed_out"
    assert stored(api.config, "SELECT event_type FROM audit_events WHERE pause_id = ? AND event_type LIKE 'pause.%'"
                              " AND event_type != 'pause.created'", pause_id) == [("pause.timed_out",)]


def test_the_same_idempotency_key_and_body_replays_the_original_pause(api, developer, config):
    key = developer["test_api_key"]
    headers = {**api.as_key(key), "Idempotency-Key": "wire-340-acme"}
    first = api.post_json("/v1/pause", WIRE, headers=headers, status=201)
    second = api.post_json("/v1/pause", WIRE, headers=headers, status=201)
    assert second.json == first.json
    assert second.headers["Idempotent-Replayed"] == "true"
    db = sqlite3.connect(config["database.path"])
    assert db.execute("SELECT count(*) FROM pauses").fetchone()[0] == 1
    assert db.execute("SELECT count(*) FROM notifications").fetchone()[0] == 1
    different = api.post_json("/v1/pause", {**WIRE, "message": "Wire $3400?"}, headers=headers, status=422)
    assert different.json["error"]["code"] == "idempotency_key_reused"


def test_a_retry_writing_its_numbers_another_way_is_the_same_request(api, developer):
    headers = {**api.as_key(developer["test_api_key"]), "Idempotency-Key": "wire-340-acme"}
    body = json.dumps({**WIRE, "metadata": {"amount": 340, "legs": [1, 2]}})
    first = api.post("/v1/pause", body, headers=headers, content_type="application/json", status=201)
    for written in (body.replace('"timeout_hours": 4', '"timeout_hours": 4.0'), body.replace('"amount": 340', '"amount": 3.4e2'),
                    body.replace("[1, 2]", "[1.0, 2e0]")):
        again = api.post("/v1/pause", written, headers=headers, content_type="application/json", status=201)
        assert again.json == first.json and again.headers["Idempotent-Replayed"] == "true"
    assert stored(api.config, "SELECT count(*) FROM pauses") == [(1,)]
    other = json.dumps({**WIRE, "metadata": {"amount": 340.5, "legs": [1, 2]}})
    refused = api.post("/v1/pause", other, headers=headers, content_type="application/json", status=422)
    assert refused.json["error"]["code"] == "idempotency_key_reused"


def test_a_retry_gets_its_pause_even_where_the_server_would_now_refuse_the_request(running_api, twilio):
    """Its text went out under the settings of the first try: a 422 now would tell the agent
    nothing was asked, while the person was."""
    api = running_api(**twilio.settings())
    key = api.register()["api_key"]
    headers = {**api.as_key(key), "Idempotency-Key": "wire-340-acme"}
    first = api.post_json("/v1/pause", WIRE, headers=headers, status=201)
    restarted = running_api()                                   # the operator took Twilio's settings out
    retried = restarted.post_json("/v1/pause", WIRE, headers=headers, status=201)
    assert retried.json == first.json and retried.headers["Idempotent-Replayed"] == "true"
    refused = restarted.post_json("/v1/pause", WIRE, headers={**headers, "Idempotency-Key": "new"}, status=422)
    assert refused.json["error"]["code"] == "channel_not_configured"
    other_body = restarted.post_json("/v1/pause", {**WIRE, "message": "Wire $3400?"}, headers=headers, status=422)
    assert other_body.json["error"]["code"] == "channel_not_configured"     # another body: a new request


@pytest.mark.parametrize("asked, restarted_with, refused_field", [
    ({"timeout_hours": 48}, {"pauses.max_timeout_hours": 24}, "timeout_hours"),
    ({"recipient": "ops-room", "channel": "ops"}, {}, "channel")], ids=["timeout since lowered", "channel since removed"])
def test_a_retry_gets_its_pause_even_where_the_servers_schema_would_now_refuse_it(running_api, asked, restarted_with,
                                                                                  refused_field):
    """The request schema comes from the config too: a retry is looked up before it is checked against it."""
    api = running_api(**{"channels.ops.url": "json://127.0.0.1:9/x"})
    headers = {**api.as_key(api.register()["test_api_key"]), "Idempotency-Key": "wire-340-acme"}
    first = api.post_json("/v1/pause", {**WIRE, **asked}, headers=headers, status=201)
    restarted = running_api(**restarted_with)
    retried = restarted.post_json("/v1/pause", {**WIRE, **asked}, headers=headers, status=201)
    assert retried.json == first.json and retried.headers["Idempotent-Replayed"] == "true"
    for refused in ({**headers, "Idempotency-Key": "new"}, {name: value for name, value in headers.items()
                                                            if name != "Idempotency-Key"}):
        answer = restarted.post_json("/v1/pause", {**WIRE, **asked}, headers=refused, status=422)
        assert answer.json["error"]["field"] == refused_field
    assert stored(api.config, "SELECT count(*) FROM pauses") == [(1,)]


def test_an_idempotency_key_can_be_reused_after_24_hours(api, developer, config):
    key = developer["test_api_key"]
    headers = {**api.as_key(key), "Idempotency-Key": "daily-report"}
    first = api.post_json("/v1/pause", WIRE, headers=headers).json
    db = sqlite3.connect(config["database.path"])
    with db:
        db.execute("UPDATE idempotency_keys SET created_at = '2000-01-01T00:00:00.000Z'")
    second = api.post_json("/v1/pause", {**WIRE, "message": "another day"}, headers=headers, status=201).json
    assert second["pause_id"] != first["pause_id"]
    with db:
        db.execute("UPDATE idempotency_keys SET created_at = '2000-01-01T00:00:00.000Z'")
    third = api.post_json("/v1/pause", {**WIRE, "message": "another day"}, headers=headers, status=201)
    assert third.json["pause_id"] not in (first["pause_id"], second["pause_id"])      # the same body, a new day
    assert "Idempotent-Replayed" not in third.headers


def test_idempotency_keys_are_per_developer(api, developer):
    other = api.register(email="other@example.com")
    mine = api.post_json("/v1/pause", WIRE, headers={**api.as_key(developer["test_api_key"]), "Idempotency-Key": "k"}).json
    theirs = api.post_json("/v1/pause", WIRE, headers={**api.as_key(other["test_api_key"]), "Idempotency-Key": "k"}).json
    assert mine["pause_id"] != theirs["pause_id"]


def test_a_live_pause_on_an_unconfigured_channel_is_refused_and_stores_nothing(api, developer, config):
    error = api.post_json("/v1/pause", WIRE, headers=api.as_key(developer["api_key"]), status=422).json["error"]
    assert error["code"] == "channel_not_configured" and error["field"] == "channel"
    assert error["message"].endswith("the operator must set twilio.account_sid, twilio.auth_token and either"
                                     " twilio.from_number or twilio.messaging_service_sid (test keys work without"
                                     " them)")
    db = sqlite3.connect(config["database.path"])
    assert db.execute("SELECT count(*) FROM pauses").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM audit_events WHERE event_type = 'pause.created'").fetchone()[0] == 0


def test_live_pauses_count_against_the_plan_and_test_pauses_never_do(tmp_path, twilio):
    config = make_config(tmp_path, **{"plans.free.monthly_pauses": 2}, **twilio.settings())
    api = Api(pausepoint.create_app(config))
    keys = api.register()
    for _ in range(5):
        api.create_pause(keys["test_api_key"])
    for _ in range(2):
        api.create_pause(keys["api_key"])
    error = api.post_json("/v1/pause", WIRE, headers=api.as_key(keys["api_key"]), status=429).json["error"]
    assert error["code"] == "quota_exceeded" and "2 live pauses per month" in error["message"]
    api.create_pause(keys["test_api_key"])


def test_a_plan_change_by_the_operator_raises_the_quota(tmp_path, twilio):
    config = make_config(tmp_path, **{"plans.free.monthly_pauses": 1, "plans.team.monthly_pauses": 3},
                         **twilio.settings())
    api = Api(pausepoint.create_app(config))
    keys = api.register()
    api.create_pause(keys["api_key"])
    refused = api.post_json("/v1/pause", WIRE, headers=api.as_key(keys["api_key"]), status=429).json["error"]
    assert "the free plan allows 1 live pause per month and" in refused["message"]
    pausepoint.change_plan(api.app.runtime.db(), config, "dev@example.com", "team", "operator:test")
    api.create_pause(keys["api_key"])


def test_developers_never_see_each_others_pauses(api, developer):
    other = api.register(email="other@example.com")
    mine = api.create_pause(developer["test_api_key"])["pause_id"]
    theirs_key = other["test_api_key"]
    api.get(f"/v1/pause/{mine}", headers=api.as_key(theirs_key), status=404)
    api.post(f"/v1/pause/{mine}/cancel", headers=api.as_key(theirs_key), status=404)
    assert api.get("/v1/pause", headers=api.as_key(theirs_key)).json["pauses"] == []
    assert api.get("/v1/audit", {"pause_id": mine}, headers=api.as_key(theirs_key)).json["events"] == []
    assert api.pause(developer["test_api_key"], mine)["status"] == "pending"


def test_test_and_live_keys_see_only_their_own_modes_data(api, developer):
    test_pause = api.create_pause(developer["test_api_key"])["pause_id"]
    live = developer["api_key"]
    api.get(f"/v1/pause/{test_pause}", headers=api.as_key(live), status=404)
    assert api.get("/v1/pause", headers=api.as_key(live)).json["pauses"] == []
    assert api.get("/v1/audit", headers=api.as_key(live)).json["events"] == []
    assert api.get("/v1/audit", headers=api.as_key(developer["test_api_key"])).json["events"]


def test_a_pause_read_with_the_other_modes_key_is_404_naming_the_key_that_reads_it(api, developer):
    test_pause = api.create_pause(developer["test_api_key"])["pause_id"]
    live_pause = api.create_pause(developer["api_key"], recipient="ops", channel="link")["pause_id"]
    error = api.get(f"/v1/pause/{test_pause}", headers=api.as_key(developer["api_key"]), status=404).json["error"]
    assert error["message"] == (f"no pause {test_pause!r} for this API key: it is one of your test-mode pauses,"
                                " which only your pp_test_ key reads")
    error = api.post(f"/v1/pause/{live_pause}/cancel", headers=api.as_key(developer["test_api_key"]),
                     status=404).json["error"]
    assert error["message"].endswith("it is one of your live-mode pauses, which only your pp_live_ key reads")
    assert api.pause(developer["api_key"], live_pause)["status"] == "pending"
    # Another developer's pause stays as unknown as one that never was.
    theirs = api.register(email="other@example.com")["api_key"]
    error = api.get(f"/v1/pause/{test_pause}", headers=api.as_key(theirs), status=404).json["error"]
    assert error["message"] == f"no pause {test_pause!r} for this API key"


def test_the_audit_log_is_newest_first_filterable_and_paginated(api, developer):
    key = developer["test_api_key"]
    first = api.create_pause(key)
    second = api.create_pause(key)
    api.post_json(f"/v1/respond/{token_of(first['respond_url'])}", {"choice": "Approve"})
    api.post(f"/v1/pause/{second['pause_id']}/cancel", headers=api.as_key(key))
    events = api.get("/v1/audit", {"limit": 100}, headers=api.as_key(key)).json["events"]
    ids = [int(e["id"].removeprefix("aud_")) for e in events]
    assert ids == sorted(ids, reverse=True)
    for event in events:
        assert set(event) >= {"id", "timestamp", "actor", "event_type", "pause_id", "data"}
    of_first = api.get("/v1/audit", {"pause_id": first["pause_id"]}, headers=api.as_key(key)).json["events"]
    assert [e["event_type"] for e in of_first][-1] == "pause.created"
    assert "pause.responded" in [e["event_type"] for e in of_first]
    responded = [e for e in of_first if e["event_type"] == "pause.responded"][0]
    assert responded["actor"] == "recipient:+15550100" and responded["data"]["choice"] == "Approve"
    cancelled = api.get("/v1/audit", {"event_type": "pause.cancelled"}, headers=api.as_key(key)).json["events"]
    assert [e["pause_id"] for e in cancelled] == [second["pause_id"]]
    page1 = api.get("/v1/audit", {"limit": 2}, headers=api.as_key(key)).json
    page2 = api.get("/v1/audit", {"limit": 2, "cursor": page1["next_cursor"]}, headers=api.as_key(key)).json
    assert [e["id"] for e in page1["events"] + page2["events"]] == [e["id"] for e in events[:4]]


def test_the_notification_is_simulated_with_the_exact_text_and_audited(api, developer):
    key = developer["test_api_key"]
    created = api.create_pause(key)
    api.step("notifications")
    events = api.get("/v1/audit", {"event_type": "notification.simulated"}, headers=api.as_key(key)).json["events"]
    pause = api.pause(key, created["pause_id"])
    assert events[0]["data"]["text"] == pause["notification"]["text"]
    assert created["respond_url"] in events[0]["data"]["text"]


def test_live_audit_rows_can_never_be_updated_or_deleted(api, developer, config):
    api.post_json("/v1/auth/keys/rotate", {"email": "dev@example.com", "password": PASSWORD, "key": "live"})
    api.create_pause(developer["test_api_key"])
    # In autocommit, so that a refused statement leaves no transaction open: one left open
    # would hold the write lock, and the server's jobs would wait out their 30 s for it.
    with contextlib.closing(sqlite3.connect(config["database.path"], isolation_level=None)) as db:
        for statement in ("UPDATE audit_events SET actor = 'someone else'",
                          "DELETE FROM audit_events WHERE livemode = 1", "DELETE FROM audit_events"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(statement)
        assert db.execute("SELECT count(*) FROM audit_events WHERE livemode = 1").fetchone()[0] == 1


def test_absurdly_nested_json_is_a_400_not_a_crash(api, developer):
    body = b"[" * 30_000 + b"]" * 30_000           # under the size limit, beyond the parser's depth
    response = api.post("/v1/pause", body, headers={**api.as_key(developer["test_api_key"]),
                                                    "Content-Type": "application/json"}, status=400)
    assert response.json["error"]["code"] == "invalid_json" and "nested too deeply" in response.json["error"]["message"]


def test_metadata_nested_past_32_levels_is_refused_and_32_are_kept(api, developer):
    key = developer["test_api_key"]
    deep = {"x": 1}
    for _ in range(31):
        deep = {"x": deep}
    created = api.create_pause(key, metadata=deep)
    assert api.pause(key, created["pause_id"])["metadata"] == deep
    error = api.post_json("/v1/pause", {**WIRE, "metadata": {"x": deep}}, headers=api.as_key(key), status=422).json
    assert error["error"]["field"] == "metadata" and "32 levels" in error["error"]["message"]


def test_a_404_does_not_echo_a_long_id(api, developer):
    error = api.get("/v1/pause/" + "p" * 10_000, headers=api.as_key(developer["test_api_key"]), status=404).json
    assert len(error["error"]["message"]) < 200


def test_test_pauses_are_rate_limited_per_developer_and_replays_cost_nothing(spawn_server, tmp_path):
    server = spawn_server(env={"PAUSEPOINT_RATELIMIT_TEST_PAUSES_PER_HOUR": "5", "PAUSEPOINT_SERVER_THREADS": "16"})

    def register(email):
        keys = requests.post(f"{server.url}/v1/auth/register",
                             json={"email": email, "name": "N", "password": "password123"}).json()
        return {"Authorization": f"Bearer {keys['test_api_key']}"}

    flooder, other = register("flood@example.com"), register("other@example.com")
    for n in range(5):
        requests.post(f"{server.url}/v1/pause", json=WIRE, headers={**flooder, "Idempotency-Key": f"k{n}"}
                      ).raise_for_status()
    refused = requests.post(f"{server.url}/v1/pause", json=WIRE, headers=flooder)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
    assert 600 <= int(refused.headers["Retry-After"]) <= 720          # one pause per 12 minutes from now on
    replay = requests.post(f"{server.url}/v1/pause", json=WIRE, headers={**flooder, "Idempotency-Key": "k0"})
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert requests.post(f"{server.url}/v1/pause", json=WIRE, headers=other).status_code == 201
    assert stored(str(tmp_path / "pausepoint.db"), "SELECT count(*) FROM pauses") == [(6,)]


def test_a_disk_short_of_room_takes_no_new_pauses_or_accounts_but_decides_those_it_has(running_api, tmp_path):
    """Its free space is kept for the pauses already made: a full disk would fail every write,
    a decision's too."""
    roomy = running_api()
    keys = roomy.register()
    key, auth = keys["test_api_key"], roomy.as_key(keys["test_api_key"])
    answered, running_out = roomy.create_pause(key), roomy.create_pause(key)
    replayed = roomy.post_json("/v1/pause", WIRE, headers={**auth, "Idempotency-Key": "k1"}).json
    # The same database, served with a reserve bigger than its whole disk.
    short = running_api(jobs=True, **{"database.min_free_mb": shutil.disk_usage(tmp_path).total // 2**20 + 1})
    before = stored(short.config, "SELECT count(*) FROM pauses"), stored(short.config, "SELECT count(*) FROM developers")

    refused = short.post_json("/v1/pause", WIRE, headers=auth, status=507)
    assert refused.json["error"]["code"] == "storage_low" and refused.headers["Retry-After"] == "60"
    assert "min_free_mb" in short.post_json("/v1/auth/register", {"email": "new@example.com", "name": "N",
                                                                  "password": PASSWORD}, status=507).json["error"]["message"]
    form = short.get("/dashboard/signup").forms[0]
    form["email"], form["name"], form["password"] = "new@example.com", "N", PASSWORD
    assert "nearly full" in form.submit(status=507).text
    assert short.get("/healthz").json["disk"] == "short of room"
    assert (stored(short.config, "SELECT count(*) FROM pauses"), stored(short.config, "SELECT count(*) FROM developers")) \
        == before
    # What was made before is answered, replayed, decided and timed out as ever.
    again = short.post_json("/v1/pause", WIRE, headers={**auth, "Idempotency-Key": "k1"}, status=201)
    assert again.json["pause_id"] == replayed["pause_id"] and again.headers["Idempotent-Replayed"] == "true"
    short.post_json(f"/v1/respond/{token_of(answered['respond_url'])}", {"choice": "Approve"})
    run_out(short.config, running_out["pause_id"])
    short.step("timeouts")
    assert [short.pause(key, p["pause_id"])["status"] for p in (answered, running_out)] == ["responded", "timed_out"]


def test_the_log_says_once_when_the_disk_falls_short_of_room_and_when_it_has_room_again(running_api, tmp_path,
                                                                                         caplog):
    api = running_api(**{"database.min_free_mb": shutil.disk_usage(tmp_path).total // 2**20 + 1})
    with caplog.at_level(logging.INFO, logger="pausepoint"):
        api.step("disk")
        api.step("disk")
        api.config["database.min_free_mb"] = 0              # the operator made room
        api.step("disk")
    said = [record.getMessage() for record in caplog.records if "disk" in record.getMessage()]
    assert len(said) == 2 and "get 507" in said[0] and "room again" in said[1]


def test_the_disk_watched_is_the_one_a_linked_database_is_written_on(running_api, tmp_path):
    """SQLite follows a symbolic link to write the database and its WAL beside the file it names."""
    homes = sorted({tmp_path, "/dev/shm", "/var/tmp"}, key=lambda home: shutil.disk_usage(home).total)
    small, large = homes[0], homes[-1]
    reserve = shutil.disk_usage(small).total // 2**20 + 1          # more than all of the small disk
    if shutil.disk_usage(large).free // 2**20 <= reserve:
        cannot_run_here("no two disks here of which one has more free than the other holds")
    with tempfile.TemporaryDirectory(dir=small) as on_small, tempfile.TemporaryDirectory(dir=large) as on_large:
        link = os.path.join(on_large, "pausepoint.db")
        os.symlink(os.path.join(on_small, "pausepoint.db"), link)
        api = running_api(fresh=True, **{"database.path": link, "database.min_free_mb": reserve})
        refused = api.post_json("/v1/auth/register", {"email": "a@example.com", "name": "A", "password": PASSWORD},
                                status=507)
        assert refused.json["error"]["code"] == "storage_low"
        api.app.runtime.stop()


def test_the_reserve_keeps_room_for_the_wal_to_be_copied_into_the_database(running_api, tmp_path):
    """A checkpoint may grow the database file by as much as the WAL holds uncopied: the reserve
    must still be there after it, or the server fills the disk itself and decisions fail. Once
    copied, the WAL's frames are written over, so the file's size no longer counts; what it
    grew by since the last checkpoint does. (Each reserve is free space less a few MiB: on a
    disk others write to, one freeing that much between would let a refused create through.)"""
    with disk_of_its_own(tmp_path / "disk", "256m") as disk:
        the_reserve_keeps_room_for_the_wal(running_api, str(disk / "pausepoint.db"))


def the_reserve_keeps_room_for_the_wal(running_api, path):
    api = running_api(**{"database.path": path, "database.min_free_mb": 0})
    key = api.register()["test_api_key"]

    def held_back_and_filled(rows):
        """A reader's snapshot from before (nothing after it is copied, and the WAL is not begun
        again from its start under it), then rows of 4,000 bytes."""
        with contextlib.closing(sqlite3.connect(path)) as writer, writer:
            writer.execute("CREATE TABLE IF NOT EXISTS filler (x)")
            writer.execute("INSERT INTO filler VALUES (NULL)")
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM pauses").fetchone()
        with contextlib.closing(sqlite3.connect(path)) as writer, writer:
            writer.execute("INSERT INTO filler WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n"
                           " WHERE i < ?) SELECT randomblob(4000) FROM n", (rows,))
        return reader

    def reserve_for(wal):
        """Free space now, less half the WAL: enough as free space goes, not once the WAL is copied."""
        return (shutil.disk_usage(path).free - wal // 2) // 2**20

    def uncopied_as_sqlite_says():
        with contextlib.closing(sqlite3.connect(path)) as conn:
            _, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return (frames - copied) * (conn.execute("PRAGMA page_size").fetchone()[0] + 24)

    reader = held_back_and_filled(8192)                     # 32 MiB
    wal = os.path.getsize(path + "-wal")
    server = running_api(**{"database.path": path, "database.min_free_mb": reserve_for(wal)})   # checkpoints stepped here
    refused = server.post_json("/v1/pause", WIRE, headers=server.as_key(key), status=507).json["error"]
    assert refused["code"] == "storage_low"                 # before any checkpoint: the whole WAL counts
    server.step("checkpoint")
    assert server.app.runtime.wal.bytes() == uncopied_as_sqlite_says() > 32 * 2**20
    server.post_json("/v1/pause", WIRE, headers=server.as_key(key), status=507)
    reader.execute("COMMIT")                                # now it can all be copied
    reader.close()
    server.step("checkpoint")
    assert server.app.runtime.wal.bytes() == 0 and os.path.getsize(path + "-wal") >= wal   # the file stays as big
    server.config["database.min_free_mb"] = reserve_for(wal)
    server.create_pause(key)
    # Written over from the WAL's start, 64 MiB more between two checkpoints: the file grows by half.
    reader = held_back_and_filled(16384)
    grown = os.path.getsize(path + "-wal") - wal
    assert grown > 16 * 2**20
    server.config["database.min_free_mb"] = reserve_for(grown)
    server.post_json("/v1/pause", WIRE, headers=server.as_key(key), status=507)
    reader.close()


def test_a_checkpoint_that_another_kept_from_running_leaves_the_wal_backlog_as_it_was(tmp_path):
    """Another connection checkpointing at the time answers (1, -1, -1): it says nothing of what is left."""
    (tmp_path / "p.db-wal").write_bytes(b"w" * 10_000)
    backlog = pausepoint.WalBacklog(str(tmp_path / "p.db"))
    assert backlog.bytes() == 10_000                                # before any checkpoint: the whole file
    backlog.checkpointed(10_000, 0, 100, 40, 100)
    assert backlog.bytes() == 6_000
    backlog.checkpointed(10_000, 1, -1, -1, 100)
    assert backlog.bytes() == 6_000
    (tmp_path / "p.db-wal").write_bytes(b"w" * 12_000)
    assert backlog.bytes() == 8_000                                 # and what the file grew by since


def test_a_job_that_cannot_write_for_a_full_disk_says_so_once_and_again_when_it_can(running_api, small_disk,
                                                                                     caplog):
    """Not a traceback a tick through the scheduler: on a full disk the log is often on that disk too."""
    api = running_api(fresh=True, **{"database.path": str(small_disk / "pausepoint.db"), "database.min_free_mb": 0})
    key = api.register()["test_api_key"]
    for _ in range(10):                 # pages the checkpoint must add to the database file, sends to simulate
        api.create_pause(key)
    filler = fill_disk(small_disk)
    with caplog.at_level("INFO", logger="pausepoint"):
        for job in ("checkpoint", "checkpoint", "notifications", "notifications"):
            api.step(job)
        os.remove(filler)
        api.step("checkpoint")
    said = [record.getMessage() for record in caplog.records]
    assert [line.split(",")[0].split(":")[0] for line in said] == [
        "the checkpoint job cannot write", "the notifications job cannot write", "the checkpoint job can write again"]
    assert "database or disk is full" in said[0] and not any(record.exc_info for record in caplog.records)


def test_health_says_the_disk_is_short_of_room_when_it_is_full_even_with_no_reserve(running_api, small_disk):
    """A reserve of 0 keeps no room beyond the WAL's, but a disk with no room at all is not ok."""
    api = running_api(jobs=True, fresh=True, **{"database.path": str(small_disk / "pausepoint.db"),
                                                "database.min_free_mb": 0})
    api.step("checkpoint")                  # the WAL all copied: it needs no room in the database file
    assert api.get("/healthz").json["disk"] == "ok"
    fill_disk(small_disk)
    assert shutil.disk_usage(small_disk).free == 0
    assert api.get("/healthz").json["disk"] == "short of room"


def test_a_failed_refresh_of_the_planners_statistics_is_logged_not_raised(running_api, caplog):
    """At start on a full disk, say: the server is needed to answer more than the statistics are."""
    conn = pausepoint.connect(running_api().config["database.path"])
    conn.execute("DROP TABLE sqlite_stat1")
    conn.execute("VACUUM")
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")     # no room to grow
    with caplog.at_level("WARNING", logger="pausepoint"):
        pausepoint.refresh_statistics(conn)
    assert "statistics were not refreshed: database or disk is full" in caplog.text
    conn.close()


def test_a_developer_with_as_many_test_pauses_pending_as_allowed_gets_429_for_another(running_api):
    """Pending pauses are never pruned, so the count pending is what bounds them."""
    api = running_api(**{"pauses.max_test_pending": 2})
    keys, other = api.register(), api.register(email="other@example.com")
    test = api.as_key(keys["test_api_key"])
    first = api.post_json("/v1/pause", WIRE, headers={**test, "Idempotency-Key": "k1"}).json
    api.create_pause(keys["test_api_key"])
    refused = api.post_json("/v1/pause", WIRE, headers=test, status=429).json["error"]
    assert refused["code"] == "too_many_pending" and "pauses.max_test_pending" in refused["message"]
    assert api.post_json("/v1/pause", WIRE, headers={**test, "Idempotency-Key": "k1"}).json == first    # a replay
    api.create_pause(keys["api_key"], channel="link", recipient="ops")       # live pauses have their quota instead
    api.create_pause(other["test_api_key"])                                  # another developer's count is theirs
    api.post(f"/v1/pause/{first['pause_id']}/cancel", headers=test)
    api.create_pause(keys["test_api_key"])
    assert stored(api.config, "SELECT count(*) FROM pauses WHERE developer_id = ? AND livemode = 0 AND status = ?",
                  keys["developer_id"], "pending") == [(2,)]
    unlimited = running_api(**{"pauses.max_test_pending": 0})             # the same database, no limit
    unlimited.create_pause(keys["test_api_key"])


# Three people, each asked and reminded twice: nine messages of under 4 KiB each.
TEAM_REMINDED = {**QUESTION, "remind_after_minutes": [60, 120],
                 "recipients": [{"recipient": f"p{n}@example.com", "channel": "email"} for n in range(3)]}


def test_a_test_pause_counts_against_the_pending_allowance_as_the_messages_it_may_send(running_api):
    """What a test pause keeps on disk grows with its messages, each kept twice (its
    notification and its simulated event): counted as one, ten-person pauses with five
    reminders each kept 60 times what a plain one does within the same allowance."""
    api = running_api(**{"pauses.max_test_pending": 20})
    keys = api.register()
    test = api.as_key(keys["test_api_key"])
    for _ in range(2):
        api.post_json("/v1/pause", TEAM_REMINDED, headers=test)
    refused = api.post_json("/v1/pause", TEAM_REMINDED, headers=test, status=429).json["error"]
    assert refused["code"] == "too_many_pending" and "weigh 18, and this one 9" in refused["message"]
    api.create_pause(keys["test_api_key"])
    assert stored(api.config, "SELECT test_weight FROM pauses ORDER BY seq") == [(9,), (9,), (1,)]
    # One alone is allowed, whatever it weighs, and what it carries counts by the 4 KiB.
    small = running_api(**{"pauses.max_test_pending": 5})
    alone = small.register(email="alone@example.com")
    small.post_json("/v1/pause", {**TEAM_REMINDED, "metadata": {"note": "x" * 5000}},
                    headers=small.as_key(alone["test_api_key"]))
    assert stored(api.config, "SELECT test_weight FROM pauses WHERE developer_id = ?", alone["developer_id"]) == [(18,)]


def test_a_test_pause_spends_the_hourly_test_allowance_by_its_weight(running_api):
    api = running_api(**{"ratelimit.test_pauses_per_hour": 10})
    keys = api.register()
    test = api.as_key(keys["test_api_key"])
    api.post_json("/v1/pause", TEAM_REMINDED, headers=test)
    api.create_pause(keys["test_api_key"])
    refused = api.post_json("/v1/pause", WIRE, headers=test, status=429)
    assert refused.json["error"]["code"] == "rate_limited" and int(refused.headers["Retry-After"]) > 0
    assert stored(api.config, "SELECT count(*) FROM pauses") == [(2,)]


def test_with_rate_limits_off_test_pauses_are_not_held_to_the_hourly_allowance(running_api):
    api = running_api(**{"ratelimit.test_pauses_per_hour": 1, "ratelimit.enabled": False})
    keys = api.register()
    for _ in range(3):
        api.create_pause(keys["test_api_key"])
    assert stored(api.config, "SELECT count(*) FROM pauses") == [(3,)]
