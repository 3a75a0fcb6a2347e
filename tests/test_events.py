"""GET /v1/events: the webhook-shaped events of agents that cannot receive webhooks."""

import concurrent.futures
import datetime as dt
import json
import time

import requests

from conftest import register_over_http, WIRE, run_out, stored, token_of
import pausepoint


def events(api, key, status=200, **params):
    return api.get("/v1/events", params, headers=api.as_key(key), status=status).json


def test_every_event_is_in_the_feed_oldest_first_as_a_webhook_would_carry_it(running_api, receiver):
    api = running_api(**{"webhooks.allow_private": True})
    key = api.register()["test_api_key"]
    api.post_json("/v1/webhooks", {"url": receiver.url, "events": ["pause.responded"]}, headers=api.as_key(key))
    answered, cancelled, expired = (api.create_pause(key) for _ in range(3))
    api.post_json(f"/v1/respond/{token_of(answered['respond_url'])}", {"choice": "Approve"})
    api.post(f"/v1/pause/{cancelled['pause_id']}/cancel", headers=api.as_key(key))
    run_out(api.config, expired["pause_id"])
    api.step("timeouts")
    api.step("webhooks")
    feed = events(api, key, limit=100)["events"]
    assert [(e["type"], e["data"]["pause_id"]) for e in feed] == [
        ("pause.created", answered["pause_id"]), ("pause.created", cancelled["pause_id"]),
        ("pause.created", expired["pause_id"]), ("pause.responded", answered["pause_id"]),
        ("pause.cancelled", cancelled["pause_id"]), ("pause.timed_out", expired["pause_id"])]
    assert receiver.wait_for(1)[0]["json"] == feed[3]             # the same id, type and body as the webhook
    assert events(api, key, types="pause.cancelled,pause.timed_out")["events"] == feed[4:]
    assert events(api, key, types="", limit=100)["events"] == feed       # no types named: all of them
    assert events(api, key, after=feed[3]["id"], limit=1)["events"] == [feed[4]]


def test_the_feed_keeps_developers_and_modes_apart(running_api):
    api = running_api()
    mine, other = api.register(), api.register(email="other@example.com")
    created = api.create_pause(mine["test_api_key"])
    [event] = events(api, mine["test_api_key"])["events"]
    assert event["data"]["pause_id"] == created["pause_id"]
    for key in (other["test_api_key"], mine["api_key"]):
        assert events(api, key)["events"] == []
        error = events(api, key, status=404, after=event["id"])["error"]
        assert error["field"] == "after"


def test_bad_feed_queries_are_422_naming_the_parameter(api, developer):
    key = developer["test_api_key"]
    for params, field in (({"types": "pause.created,pause.exploded"}, "types"), ({"limit": 0}, "limit"),
                          ({"wait": 61}, "wait"), ({"after": "e" * 101}, "after")):
        assert events(api, key, status=422, **params)["error"]["field"] == field


def test_a_type_with_a_newline_after_it_is_refused_as_the_document_refuses_it(api, developer):
    # The document's pattern is ECMA-262, whose $ is the end of the text; Python's $ also
    # matches before a final newline, which once read no event at all for an answer.
    key = developer["test_api_key"]
    assert events(api, key, status=422, types="pause.created\n")["error"]["field"] == "types"
    assert events(api, key, status=422, types="pause.created,pause.cancelled\n")["error"]["field"] == "types"


def test_a_waiting_reader_gets_the_next_event_as_it_is_recorded(live_server):
    url = live_server.url
    keys = register_over_http(url, "w@example.com", "W")
    auth = {"Authorization": f"Bearer {keys['test_api_key']}"}
    first = requests.post(f"{url}/v1/pause", json=WIRE, headers=auth).json()
    [seen] = requests.get(f"{url}/v1/events", headers=auth).json()["events"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(requests.get, f"{url}/v1/events", params={"after": seen["id"], "wait": 30},
                              headers=auth, timeout=40)
        time.sleep(0.3)                            # it is waiting now (were it not, it would answer [] at once)
        requests.post(f"{url}/v1/pause/{first['pause_id']}/cancel", headers=auth)
        started = time.monotonic()
        answer = waiting.result()
    assert [e["type"] for e in answer.json()["events"]] == ["pause.cancelled"]
    assert time.monotonic() - started < 10        # woken by the event, not by the end of the wait
    empty = requests.get(f"{url}/v1/events", params={"after": answer.json()["events"][0]["id"], "wait": 1},
                         headers=auth)
    assert empty.json() == {"events": []}


def test_a_reader_misses_and_repeats_nothing_across_a_restart(spawn_server, tmp_path):
    server = spawn_server()
    keys = register_over_http(server.url, "r@example.com", "R")
    auth = {"Authorization": f"Bearer {keys['test_api_key']}"}
    pause = requests.post(f"{server.url}/v1/pause", json=WIRE, headers=auth).json()
    requests.post(f"{server.url}/v1/pause/{pause['pause_id']}/cancel", headers=auth)
    # 998 more like them, written as the server writes them, one commit each.
    db = tmp_path / "pausepoint.db"
    for n in range(998):
        stored(db, "INSERT INTO webhook_events (id, developer_id, livemode, type, pause_id, body, created_at)"
                   " SELECT ?1, developer_id, livemode, type, pause_id, json_set(body, '$.id', ?1), created_at"
                   " FROM webhook_events WHERE rowid = ?2", f"evt_copy{n:04d}", 1 + n % 2)

    seen, after = [], None
    for page in range(20):
        if page == 4:                              # the server restarts while the reader is half-way
            server.stop()
            server = spawn_server(db_path=tmp_path / "pausepoint.db")
        params = {"limit": 100, **({"after": after} if after else {})}
        batch = requests.get(f"{server.url}/v1/events", params=params, headers=auth).json()["events"]
        if not batch:
            break
        seen.extend(event["id"] for event in batch)
        after = batch[-1]["id"]
    recorded = [row[0] for row in stored(tmp_path / "pausepoint.db", "SELECT id FROM webhook_events ORDER BY rowid")]
    assert len(recorded) == 1000 and seen == recorded


def test_a_change_wakes_only_those_waiting_on_it(running_api):
    api = running_api()
    mine, other = api.register(), api.register(email="other@example.com")
    first, second = api.create_pause(mine["test_api_key"]), api.create_pause(mine["test_api_key"])
    waiting = api.app.runtime.waiting
    watched = [f"pause:{first['pause_id']}", f"pause:{second['pause_id']}",
               f"events:{mine['developer_id']}:0", f"events:{other['developer_id']}:0", f"events:{mine['developer_id']}:1"]
    watches = [waiting.watch(topic) for topic in watched]
    api.post_json(f"/v1/respond/{token_of(first['respond_url'])}", {"choice": "Approve"})
    # Counted as the decision committed: the first pause and its owner's test-mode feed, nothing else.
    assert [watch.topic.changes for watch in watches] == [1, 0, 1, 0, 0]
    api.post(f"/v1/pause/{second['pause_id']}/cancel", headers=api.as_key(mine["test_api_key"]))
    assert [watch.topic.changes for watch in watches] == [1, 1, 2, 0, 0]
    for watch in watches:
        waiting.unwatch(watch)
    assert waiting.topics == {}                     # nobody watches: nothing kept


def test_events_go_a_delivery_log_after_their_deliveries_end_and_the_feed_starts_after_the_last_gone(running_api):
    api = running_api(**{"webhooks.allow_private": True})
    key = api.register()["test_api_key"]
    api.post_json("/v1/webhooks", {"url": "http://127.0.0.1:9/hook", "events": ["pause.created"]},
                  headers=api.as_key(key))
    pending, just_delivered, failed_long_ago = (api.create_pause(key, channel="link", recipient="ops")
                                                for _ in range(3))
    for pause in (pending, just_delivered, failed_long_ago):
        api.post(f"/v1/pause/{pause['pause_id']}/cancel", headers=api.as_key(key))     # events without deliveries
    newest = api.create_pause(key, channel="link", recipient="ops")                    # its delivery pending too
    month_ago = pausepoint.db_time(pausepoint.utcnow() - dt.timedelta(days=40))
    stored(api.config, "UPDATE webhook_events SET created_at = ?", month_ago)
    for pause, status, ended in ((just_delivered, "succeeded", pausepoint.db_time()),
                                 (failed_long_ago, "failed", month_ago)):
        stored(api.config, "UPDATE webhook_deliveries SET status = ?, updated_at = ? WHERE event_id ="
                           " (SELECT id FROM webhook_events WHERE pause_id = ? AND type = 'pause.created')",
               status, ended, pause["pause_id"])
    [first, second, *_] = events(api, key, limit=100)["events"]
    pausepoint.prune_expired_data(api.app.runtime.db(), api.config)
    # Kept: the events still to deliver, and the one whose delivery ended lately; the rest went.
    assert stored(api.config, "SELECT pause_id FROM webhook_events ORDER BY rowid") == [
        (pending["pause_id"],), (just_delivered["pause_id"],), (newest["pause_id"],)]
    # The feed starts after the last one gone: a reader before it is told to start again, not led past a gap.
    [after_the_gap] = events(api, key)["events"]
    assert after_the_gap["data"]["pause_id"] == newest["pause_id"]
    for event in (first, second):
        assert events(api, key, status=404, after=event["id"])["error"]["field"] == "after"
    # However old, a cursor with nothing gone after it reads on.
    assert events(api, key, after=after_the_gap["id"])["events"] == []


def test_when_every_event_is_past_retention_the_newest_stays_and_later_ones_are_all_in_the_feed(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    *_, newest = [api.create_pause(key, channel="link", recipient="ops")["pause_id"] for _ in range(3)]
    stored(api.config, "UPDATE webhook_events SET created_at = ?",
           pausepoint.db_time(pausepoint.utcnow() - dt.timedelta(days=40)))
    pausepoint.prune_expired_data(api.app.runtime.db(), api.config)
    # A later event would take a pruned newest row's rowid, at the feed's new start, and never be seen.
    assert stored(api.config, "SELECT pause_id FROM webhook_events") == [(newest,)]
    later = [api.create_pause(key, channel="link", recipient="ops")["pause_id"] for _ in range(3)]
    assert [e["data"]["pause_id"] for e in events(api, key)["events"]] == [newest, *later]


def test_a_prune_between_the_reads_of_one_page_never_leads_a_reader_past_a_gap(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    for _ in range(2):
        api.create_pause(key, channel="link", recipient="ops")
    cursor, following = events(api, key)["events"]
    stored(api.config, "UPDATE webhook_events SET created_at = ?",
           pausepoint.db_time(pausepoint.utcnow() - dt.timedelta(days=40)))
    newer = api.create_pause(key, channel="link", recipient="ops")
    reader, pruner = (pausepoint.connect(api.config["database.path"]) for _ in range(2))
    caller = pausepoint.authenticate(reader, f"Bearer {key}")

    def prune_before_the_page_is_read(sql):     # SQLite's own hook: as the reader's last statement starts
        if "webhook_events_feed" in sql and not pruner.in_transaction:
            reader.set_trace_callback(None)
            pausepoint.prune_expired_data(pruner, api.config)
    reader.set_trace_callback(prune_before_the_page_is_read)
    page = [json.loads(body)["id"] for body in pausepoint.events_after(reader, caller, cursor["id"], None, 50)]
    assert stored(api.config, "SELECT count(*) FROM webhook_events WHERE id IN (?, ?)", cursor["id"],
                  following["id"]) == [(0,)]          # the prune ran, taking the cursor and the event after it
    # The page as it stood when the read began: the event after the cursor is in it, not skipped.
    assert page[0] == following["id"] and json.loads(stored(api.config, "SELECT body FROM webhook_events WHERE"
                                                            " pause_id = ?", newer["pause_id"])[0][0])["id"] == page[1]
    reader.close()
    pruner.close()


def test_a_quiet_reader_whose_last_event_is_past_retention_reads_on_while_others_write(running_api):
    api = running_api()
    quiet, busy = api.register()["test_api_key"], api.register(email="busy@example.com")["test_api_key"]
    api.create_pause(quiet, channel="link", recipient="ops")
    [last_handled] = events(api, quiet)["events"]
    for _ in range(2):
        api.create_pause(busy, channel="link", recipient="ops")
    stored(api.config, "UPDATE webhook_events SET created_at = ?",
           pausepoint.db_time(pausepoint.utcnow() - dt.timedelta(days=40)))
    pausepoint.prune_expired_data(api.app.runtime.db(), api.config)
    # Each feed keeps its newest event: nothing after the quiet reader's went, so it is not told so.
    assert stored(api.config, "SELECT count(*) FROM webhook_events") == [(2,)]
    assert events(api, quiet, after=last_handled["id"])["events"] == []
