"""Webhooks against real receivers on loopback, over real HTTP."""

import base64
import concurrent.futures
import datetime as dt
import email.utils
import functools
import itertools
import os
import re
import socket
import sqlite3
import threading
import time
import tracemalloc

import pytest
import requests

from conftest import stored, ROOT, WIRE, Api, make_config, run_out, token_of, wait_until
from stubs import (Blackhole, HeaderFlood, KeepAliveReceiver, RefusingProxy, StallingReceiver, TrickleReceiver, WebhookReceiver,
                   serve_http, stop_http)
import pausepoint

SECRET = "whsec_test_secret_0123456789"
QUICKSTART_EVENTS = ["pause.responded", "pause.timed_out", "pause.cancelled"]


@pytest.fixture
def hooks_api(running_api, request):
    # Tests of slow receivers mark a short outbound deadline, to wait out 1 s rather than 10.
    deadline = request.node.get_closest_marker("deadline")
    # Its jobs run, as a server's do: these tests wait for deliveries the way a receiver does.
    return running_api(jobs=True, remote_addr="192.0.2.20", **{"webhooks.allow_private": True,
                                                     "outbound.deadline_seconds": deadline.args[0] if deadline else 10})


@pytest.fixture
def hooks_config(hooks_api):
    return hooks_api.config


@pytest.fixture
def keys(hooks_api):
    return hooks_api.register()


def add_webhook(api, key, url, events=QUICKSTART_EVENTS, secret=SECRET, status=201):
    body = {"url": url, "events": events}
    if secret is not None:
        body["secret"] = secret
    return api.post_json("/v1/webhooks", body, headers=api.as_key(key), status=status).json


def deliveries(api, key, webhook_id):
    return api.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=api.as_key(key)).json["deliveries"]


def queued(config, pause_id=None, webhook_id=None):
    """Deliveries in the outbox (about a pause, or to an endpoint). Written in the same
    transaction as the change they report, so a count here is exact the moment the
    change is: nothing to wait for."""
    return stored(config, "SELECT count(*) FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id"
                          " WHERE (? IS NULL OR e.pause_id = ?) AND (? IS NULL OR d.webhook_id = ?)",
                  pause_id, pause_id, webhook_id, webhook_id)[0][0]


def skip_the_backoff(config):
    """Make every delivery waiting for its retry due now."""
    stored(config, "UPDATE webhook_deliveries SET next_attempt_at = ? WHERE status = 'pending'", pausepoint.db_time())



# -- the API -------------------------------------------------------------------

def test_registering_returns_the_webhook_but_never_the_secret(hooks_api, keys, receiver):
    key = keys["test_api_key"]
    webhook = add_webhook(hooks_api, key, receiver.url + "/hook")
    assert webhook["webhook_id"].startswith("wh_") and webhook["url"] == receiver.url + "/hook"
    assert webhook["events"] == QUICKSTART_EVENTS and webhook["created_at"] and webhook["status"] == "enabled"
    assert "secret" not in webhook
    shown = hooks_api.get(f"/v1/webhooks/{webhook['webhook_id']}", headers=hooks_api.as_key(key)).text
    listed = hooks_api.get("/v1/webhooks", headers=hooks_api.as_key(key)).text
    assert SECRET not in shown and SECRET not in listed
    assert webhook["webhook_id"] in listed


def test_an_omitted_secret_is_generated_and_shown_once(hooks_api, keys, receiver):
    key = keys["test_api_key"]
    webhook = add_webhook(hooks_api, key, receiver.url, secret=None)
    assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{43}=", webhook["secret"])      # 256 bits, base64
    assert webhook["secret"] not in hooks_api.get(f"/v1/webhooks/{webhook['webhook_id']}",
                                                  headers=hooks_api.as_key(key)).text
    hooks_api.post(f"/v1/webhooks/{webhook['webhook_id']}/test", headers=hooks_api.as_key(key), status=202)
    call = receiver.wait_for(1)[0]
    assert pausepoint.verify_signature(webhook["secret"], call["headers"]["X-PausePoint-Signature"], call["body"])


@pytest.mark.parametrize("body, field", [
    ({"events": ["pause.approved"]}, "events"),
    ({"events": []}, "events"),
    ({"events": "pause.responded"}, "events"),
    ({"secret": "too-short"}, "secret"),
    ({"url": "ftp://example.com/hook"}, "url"),
    ({"url": "http://user:pw@127.0.0.1/hook"}, "url"),
    ({"url": "https://hooks.example.com:0/hook"}, "url"),      # port 0: nothing can be reached there
    ({"url": None}, "url"),
    ({"colour": "red"}, "colour"),
])
def test_bad_webhook_fields_get_422_naming_them(hooks_api, keys, body, field):
    full = {"url": "http://127.0.0.1:9/hook", "events": QUICKSTART_EVENTS, "secret": SECRET, **body}
    error = hooks_api.post_json("/v1/webhooks", full, headers=hooks_api.as_key(keys["test_api_key"]),
                                status=422).json["error"]
    assert error["field"] == field


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.1.2.3/hook",
                                 "http://192.168.1.20/hook", "http://169.254.169.254/latest", "http://[::1]/hook",
                                 "http://[::ffff:127.0.0.1]/hook", "http://0.0.0.0/hook",
                                 # as requests reads them: escapes decoded, and an address named from the root
                                 "http://%6c%6fcalhost/hook", "http://%31%32%37.0.0.1/hook", "http://127.0.0.1./hook",
                                 # site-local and SRv6 addresses, which Python's ipaddress calls global
                                 "http://[fec0::1]/hook", "http://[5f00::1]/hook"])
def test_private_addresses_are_refused_by_default_naming_the_setting(api, developer, url):
    error = api.post_json("/v1/webhooks", {"url": url, "events": QUICKSTART_EVENTS, "secret": SECRET},
                          headers=api.as_key(developer["test_api_key"]), status=422).json["error"]
    assert error["field"] == "url" and "webhooks.allow_private" in error["message"]


def test_a_live_endpoint_must_be_https_since_its_events_carry_live_respond_links(api, developer):
    live, test = api.as_key(developer["api_key"]), api.as_key(developer["test_api_key"])
    body = {"url": "http://hooks.example.com/pausepoint", "events": QUICKSTART_EVENTS, "secret": SECRET}
    error = api.post_json("/v1/webhooks", body, headers=live, status=422).json["error"]
    assert error["field"] == "url" and "https://" in error["message"]
    webhook_id = api.post_json("/v1/webhooks", {**body, "url": "https://hooks.example.com/pausepoint"},
                               headers=live).json["webhook_id"]
    api.patch_json(f"/v1/webhooks/{webhook_id}", {"url": body["url"]}, headers=live, status=422)
    assert api.get(f"/v1/webhooks/{webhook_id}", headers=live).json["url"] == "https://hooks.example.com/pausepoint"
    api.post_json("/v1/webhooks", body, headers=test)          # a test link answers only a test pause


def test_a_live_endpoint_made_plain_http_before_https_was_required_is_sent_nothing_in_the_clear(api, developer):
    """An endpoint registered before live ones had to be https keeps its URL through the
    upgrade: its events wait, retried, for the developer to PATCH it to https."""
    key = developer["api_key"]
    webhook_id = add_webhook(api, key, "https://hooks.example.com/pausepoint")["webhook_id"]
    stored(api.config, "UPDATE webhooks SET url = 'http://hooks.example.invalid/pausepoint'")   # as it was made
    api.post(f"/v1/webhooks/{webhook_id}/test", headers=api.as_key(key), status=202)
    api.step("webhooks")
    [delivery] = deliveries(api, key, webhook_id)
    assert delivery["status"] == "pending"
    [attempt] = delivery["attempts"]
    assert "https://" in attempt["error"] and "did not resolve" not in attempt["error"]
    warned = list(pausepoint.stored_state_warnings(api.app.runtime.db(), api.config))
    assert [warning for warning in warned if "1 live webhook endpoint (of 1 developer) has an http:// URL" in warning]
    api.patch_json(f"/v1/webhooks/{webhook_id}", {"url": "https://hooks.example.com/fixed"}, headers=api.as_key(key))
    assert not [w for w in pausepoint.stored_state_warnings(api.app.runtime.db(), api.config) if "http://" in w]


def test_a_live_endpoint_on_the_operators_own_network_may_be_plain_http(hooks_api, keys, receiver):
    add_webhook(hooks_api, keys["api_key"], receiver.url)


def test_private_addresses_are_allowed_by_the_setting(hooks_api, keys):
    add_webhook(hooks_api, keys["test_api_key"], "http://192.168.1.20/hook")


def test_the_guard_checks_the_address_again_when_connecting(hooks_config, keys, hooks_api, receiver):
    # Registered where private addresses were allowed; delivered by a server that forbids them.
    key = keys["test_api_key"]
    webhook = add_webhook(hooks_api, key, receiver.url)
    hooks_api.app.runtime.stop()
    strict = pausepoint.create_app({**hooks_config, "webhooks.allow_private": False})
    strict.runtime.start()
    try:
        api = Api(strict)
        api.post(f"/v1/webhooks/{webhook['webhook_id']}/test", headers=api.as_key(key))
        attempt = wait_until(lambda: (d := deliveries(api, key, webhook["webhook_id"]))[0]["attempts"] and
                             d[0]["attempts"][0])
        assert "not a public address" in attempt["error"] and attempt["status_code"] is None
        assert receiver.calls == []
        # Refused for good, not retried for three days.
        [delivery] = deliveries(api, key, webhook["webhook_id"])
        assert delivery["status"] == "failed" and len(delivery["attempts"]) == 1
    finally:
        strict.runtime.stop()


def test_a_refused_name_does_not_say_which_address_of_the_servers_network_it_resolved_to(running_api, monkeypatch):
    api = running_api()         # webhooks.allow_private as it comes: false
    real_getaddrinfo = socket.getaddrinfo

    def resolve(host, port, *args, **kwargs):       # a name only the server's own resolver knows
        if host == "vault.corp.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.20.30.40", port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    key = api.register()["test_api_key"]
    webhook_id = add_webhook(api, key, "http://vault.corp.example/hook")["webhook_id"]
    api.post(f"/v1/webhooks/{webhook_id}/test", headers=api.as_key(key), status=202)
    api.step("webhooks")
    [attempt] = deliveries(api, key, webhook_id)[0]["attempts"]
    assert "not a public address" in attempt["error"] and "10.20.30.40" not in attempt["error"]


def test_deliveries_never_go_through_a_proxy_named_in_the_environment(hooks_api, keys, receiver, stubs, monkeypatch):
    # A proxy would connect for us, past the guard's look at the addresses a name resolves to.
    proxy = stubs(RefusingProxy)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
    hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key), status=202)
    assert receiver.wait_for(1)[0]["json"]["type"] == "webhook.test"
    assert proxy.asked == []


def test_a_host_name_no_connection_could_use_is_refused(hooks_api, keys):
    # Too long, empty, and (valid to Python's IDNA 2003 codec, not to the IDNA 2008 that
    # deliveries use) full-width letters, ideographic full stops and circled digits.
    for host in ("a" * 64 + ".example.com", "a..example.com", "ｌｏｃａｌｈｏｓｔ", "127。0。0。1", "①②⑦.0.0.1",
                 "127.0.0.1%2e%2e", "example.com%20", "localhost%23", "x%40127.0.0.1"):       # escapes, decoded or not
        error = add_webhook(hooks_api, keys["test_api_key"], f"https://{host}/hook", status=422)["error"]
        assert error["field"] == "url" and "not a valid host name" in error["message"]
    add_webhook(hooks_api, keys["test_api_key"], "https://bücher.example/hook")      # a name IDNA 2008 spells


@pytest.mark.parametrize("read", ["the list", "the test event's answer"])
def test_a_delivery_and_its_attempts_are_read_at_one_moment(running_api, receiver, read):
    api = running_api(**{"webhooks.allow_private": True})
    key = api.register()["test_api_key"]
    webhook_id = add_webhook(api, key, receiver.url)["webhook_id"]
    send_test = functools.partial(api.post, f"/v1/webhooks/{webhook_id}/test", headers=api.as_key(key))
    if read == "the list":
        send_test()

    def deliver_meanwhile(statement):       # the attempt lands after the delivery was read, before its attempts
        if "FROM webhook_attempts" in statement and not receiver.calls:
            step = threading.Thread(target=api.app.runtime.run_once, args=("webhooks",))
            step.start()
            step.join()

    api.app.runtime.db().set_trace_callback(deliver_meanwhile)
    delivery = deliveries(api, key, webhook_id)[0] if read == "the list" else send_test().json
    api.app.runtime.db().set_trace_callback(None)
    assert len(receiver.calls) == 1                 # delivered while the list was read
    assert (delivery["status"], len(delivery["attempts"])) == ("pending", 0)
    [delivery] = deliveries(api, key, webhook_id)
    assert (delivery["status"], len(delivery["attempts"])) == ("succeeded", 1)


def test_a_delivery_that_fails_in_an_unexpected_way_is_recorded_not_left_claimed(hooks_api, keys, receiver):
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
    stored(hooks_api.config, "UPDATE webhooks SET url = ?", f"https://{'a' * 64}.example.com/hook")   # an old row
    hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
    hooks_api.step("webhooks")
    [delivery] = deliveries(hooks_api, key, webhook_id)
    assert delivery["status"] == "pending" and len(delivery["attempts"]) == 1
    assert "UnicodeError" in delivery["attempts"][0]["error"]


def test_a_call_a_crash_cut_short_counts_as_an_attempt_and_the_next_waits_its_turn(running_api, receiver):
    """Crashes during calls to a slow receiver spend its attempts no faster than the retry
    schedule: taken up at once, a few restarts could end its three days in minutes."""
    hooks_api = running_api(**{"webhooks.allow_private": True})
    key = hooks_api.register()["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
    hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
    lapsed = pausepoint.db_time(pausepoint.utcnow() - dt.timedelta(seconds=1))
    for attempts in (1, len(pausepoint.RETRY_DELAYS_SECONDS)):
        # As a crash mid-call leaves it: claimed, and the claim since lapsed.
        stored(hooks_api.config, "UPDATE webhook_deliveries SET status = 'delivering', attempts = ?,"
                                 " next_attempt_at = ?, updated_at = '2026-01-02T03:04:05.678Z'", attempts, lapsed)
        before = pausepoint.utcnow()
        hooks_api.step("webhooks")
        [delivery] = deliveries(hooks_api, key, webhook_id)
        assert delivery["status"] == "pending" and receiver.calls == []         # not called again at once
        recorded = delivery["attempts"][-1]
        assert (recorded["attempt"], recorded["error"]) == (attempts, pausepoint.INTERRUPTED)
        assert stored(hooks_api.config, "SELECT started_at FROM webhook_attempts WHERE attempt = ?", attempts) == [
            ("2026-01-02T03:04:05.678Z",)]                                   # when it was claimed
        delay = pausepoint.RETRY_DELAYS_SECONDS[attempts - 1] * (1 - pausepoint.RETRY_JITTER)
        [(due,)] = stored(hooks_api.config, "SELECT next_attempt_at FROM webhook_deliveries")
        assert pausepoint.parse_db_time(due) >= before + dt.timedelta(seconds=delay)
    stored(hooks_api.config, "UPDATE webhook_deliveries SET next_attempt_at = ?", lapsed)
    hooks_api.step("webhooks")
    assert [d["status"] for d in deliveries(hooks_api, key, webhook_id)] == ["succeeded"] and len(receiver.calls) == 1


@pytest.mark.parametrize("change", ["delete", "disable"])
def test_a_claim_that_lapsed_is_not_taken_up_for_a_deleted_or_disabled_endpoint(running_api, receiver, change):
    hooks_api = running_api(**{"webhooks.allow_private": True})
    key = hooks_api.register()["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
    hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
    # As a crash mid-call leaves it: claimed, and the claim since lapsed.
    stored(hooks_api.config, "UPDATE webhook_deliveries SET status = 'delivering', attempts = 1,"
                             " next_attempt_at = '2000-01-01T00:00:00.000Z'")
    if change == "delete":
        hooks_api.delete(f"/v1/webhooks/{webhook_id}", headers=hooks_api.as_key(key), status=204)
    else:
        hooks_api.patch_json(f"/v1/webhooks/{webhook_id}", {"enabled": False}, headers=hooks_api.as_key(key))
    hooks_api.step("webhooks")
    assert stored(hooks_api.config, "SELECT attempts FROM webhook_deliveries") == [(1,)]      # not claimed again
    assert stored(hooks_api.config, "SELECT count(*) FROM webhook_attempts") == [(0,)] and receiver.calls == []
    if change == "delete":
        assert stored(hooks_api.config, "SELECT status FROM webhook_deliveries") == [("cancelled",)]


def test_patch_changes_events_and_url_and_delete_stops_everything(hooks_api, keys, receiver):
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, receiver.url + "/old")["webhook_id"]
    patched = hooks_api.patch_json(f"/v1/webhooks/{webhook_id}", {"url": receiver.url + "/new",
                                                                  "events": ["pause.created"]},
                                   headers=hooks_api.as_key(key)).json
    assert patched["url"] == receiver.url + "/new" and patched["events"] == ["pause.created"]
    hooks_api.create_pause(key)
    assert receiver.wait_for(1)[0]["path"] == "/new"
    hooks_api.delete(f"/v1/webhooks/{webhook_id}", headers=hooks_api.as_key(key), status=204)
    hooks_api.get(f"/v1/webhooks/{webhook_id}", headers=hooks_api.as_key(key), status=404)
    after = hooks_api.create_pause(key)
    assert queued(hooks_api.config, after["pause_id"]) == 0
    assert len(receiver.calls) == 1
    events = hooks_api.get("/v1/audit", headers=hooks_api.as_key(key)).json["events"]
    assert {"webhook.created", "webhook.updated", "webhook.deleted"} <= {e["event_type"] for e in events}
    # Where the events go now, not only that the URL changed: a key that leaked could have sent them anywhere.
    [updated] = [e for e in events if e["event_type"] == "webhook.updated"]
    assert updated["data"] == {"webhook_id": webhook_id, "changed": ["events", "url"], "url": receiver.url + "/new"}


def test_tenants_never_see_or_trigger_each_others_webhooks(hooks_api, keys, receiver):
    mine = add_webhook(hooks_api, keys["test_api_key"], receiver.url, events=["pause.created"])["webhook_id"]
    other = hooks_api.register(email="other@example.com")["test_api_key"]
    for method in ("get", "delete"):
        getattr(hooks_api, method)(f"/v1/webhooks/{mine}", headers=hooks_api.as_key(other), status=404)
    hooks_api.patch_json(f"/v1/webhooks/{mine}", {"events": ["pause.cancelled"]}, headers=hooks_api.as_key(other),
                         status=404)
    hooks_api.post(f"/v1/webhooks/{mine}/test", headers=hooks_api.as_key(other), status=404)
    hooks_api.get(f"/v1/webhooks/{mine}/deliveries", headers=hooks_api.as_key(other), status=404)
    assert hooks_api.get("/v1/webhooks", headers=hooks_api.as_key(other)).json["webhooks"] == []
    created = hooks_api.create_pause(other)
    assert queued(hooks_api.config, created["pause_id"]) == 0 and queued(hooks_api.config, webhook_id=mine) == 0
    assert receiver.calls == []


# -- the call we make ----------------------------------------------------------------

@pytest.mark.parametrize("event", QUICKSTART_EVENTS)
def test_each_quickstart_event_arrives_signed_for_the_right_pause(hooks_api, keys, receiver, event):
    key = keys["test_api_key"]
    add_webhook(hooks_api, key, receiver.url + "/hook")
    other = hooks_api.create_pause(key)       # never decided: must not be reported
    created = hooks_api.create_pause(key, metadata={"run": 42})
    if event == "pause.timed_out":
        run_out(hooks_api.config, created["pause_id"])
        hooks_api.step("timeouts")
    elif event == "pause.responded":
        hooks_api.post_json(f"/v1/respond/{token_of(created['respond_url'])}", {"choice": "Approve"})
    elif event == "pause.cancelled":
        hooks_api.post(f"/v1/pause/{created['pause_id']}/cancel", headers=hooks_api.as_key(key))
    [call] = receiver.wait_for(1)
    body, headers = call["json"], call["headers"]
    assert body["type"] == event and body["id"].startswith("evt_") and body["livemode"] is False
    assert body["data"]["pause_id"] == created["pause_id"] != other["pause_id"]
    assert body["data"]["metadata"] == {"run": 42}
    assert body["data"]["status"] == event.removeprefix("pause.")
    assert body["data"]["choice"] == {"pause.responded": "Approve", "pause.timed_out": "Reject",
                                      "pause.cancelled": None}[event]
    assert headers["X-PausePoint-Event"] == event and headers["X-PausePoint-Event-Id"] == body["id"]
    assert headers["Content-Type"] == "application/json" and headers["User-Agent"].startswith("PausePoint")
    assert pausepoint.verify_signature(SECRET, headers["X-PausePoint-Signature"], call["body"])
    assert not pausepoint.verify_signature("whsec_some_other_secret_000", headers["X-PausePoint-Signature"],
                                           call["body"])
    assert not pausepoint.verify_signature(SECRET, headers["X-PausePoint-Signature"], call["body"] + b" ")
    assert queued(hooks_api.config) == 1


def test_a_stale_signature_is_rejected():
    body = b'{"id": "evt_1"}'
    old = int(time.time()) - 301
    header = pausepoint.signature_header([SECRET], old, body)
    assert not pausepoint.verify_signature(SECRET, header, body)
    assert pausepoint.verify_signature(SECRET, header, body, tolerance=400)
    fresh = pausepoint.signature_header([SECRET], int(time.time()), body)
    assert pausepoint.verify_signature(SECRET, fresh, body)
    assert not pausepoint.verify_signature(SECRET, "v1=" + fresh.split("v1=")[1], body)     # no timestamp


def test_the_signature_is_hmac_sha256_over_timestamp_dot_body(hooks_api, keys, receiver):
    import hashlib
    import hmac
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
    hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
    call = receiver.wait_for(1)[0]
    t, v1 = re.fullmatch(r"t=(\d+),v1=([0-9a-f]{64})", call["headers"]["X-PausePoint-Signature"]).groups()
    assert abs(int(t) - time.time()) < 60
    assert v1 == hmac.new(SECRET.encode(), f"{t}.".encode() + call["body"], hashlib.sha256).hexdigest()
    assert call["json"]["type"] == "webhook.test"


def test_during_secret_rotation_both_secrets_sign_for_24_hours(hooks_api, keys, receiver, hooks_config):
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
    new_secret = "whsec_rotated_secret_987654321"
    hooks_api.patch_json(f"/v1/webhooks/{webhook_id}", {"secret": new_secret}, headers=hooks_api.as_key(key))
    hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
    call = receiver.wait_for(1)[0]
    header = call["headers"]["X-PausePoint-Signature"]
    assert header.count("v1=") == 2
    assert pausepoint.verify_signature(new_secret, header, call["body"])
    assert pausepoint.verify_signature(SECRET, header, call["body"])
    stored(hooks_config, "UPDATE webhooks SET previous_secret_expires_at = '2000-01-01T00:00:00.000Z'")
    hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
    later = receiver.wait_for(2)[1]["headers"]["X-PausePoint-Signature"]
    assert later.count("v1=") == 1 and not pausepoint.verify_signature(SECRET, later, receiver.calls[1]["body"])


def test_a_null_secret_makes_a_new_one_shown_once_and_the_old_one_signs_beside_it_for_a_day(hooks_api, keys,
                                                                                                 receiver):
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
    changed = hooks_api.patch_json(f"/v1/webhooks/{webhook_id}", {"secret": None}, headers=hooks_api.as_key(key)).json
    assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{43}=", changed["secret"])      # 256 bits, base64
    assert changed["secret"] not in hooks_api.get(f"/v1/webhooks/{webhook_id}", headers=hooks_api.as_key(key)).text
    untouched = hooks_api.patch_json(f"/v1/webhooks/{webhook_id}", {"events": ["pause.created"]},
                                     headers=hooks_api.as_key(key)).json
    assert "secret" not in untouched
    hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
    call = receiver.wait_for(1)[0]
    for secret in (changed["secret"], SECRET):
        assert pausepoint.verify_signature(secret, call["headers"]["X-PausePoint-Signature"], call["body"])
    # Changed twice, the first secret (leaked, say) signs nothing more, at once.
    again = hooks_api.patch_json(f"/v1/webhooks/{webhook_id}", {"secret": None}, headers=hooks_api.as_key(key)).json
    hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
    call = receiver.wait_for(2)[1]
    assert pausepoint.verify_signature(again["secret"], call["headers"]["X-PausePoint-Signature"], call["body"])
    assert not pausepoint.verify_signature(SECRET, call["headers"]["X-PausePoint-Signature"], call["body"])


def test_deliveries_verify_with_the_standard_webhooks_library_and_the_pausepoint_scheme(hooks_api, keys, receiver):
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError
    key = keys["test_api_key"]
    generated = add_webhook(hooks_api, key, receiver.url + "/generated", secret=None)
    chosen = add_webhook(hooks_api, key, receiver.url + "/chosen", secret=SECRET)     # not base64 after whsec_
    for webhook in (generated, chosen):
        hooks_api.post(f"/v1/webhooks/{webhook['webhook_id']}/test", headers=hooks_api.as_key(key), status=202)
    calls = {call["path"]: call for call in receiver.wait_for(2)}
    generated_call, chosen_call = calls["/generated"], calls["/chosen"]
    # A generated secret is given to either verifier as it is.
    assert Webhook(generated["secret"]).verify(generated_call["body"], generated_call["headers"])["type"] == "webhook.test"
    assert pausepoint.verify_signature(generated["secret"], generated_call["headers"]["X-PausePoint-Signature"],
                                       generated_call["body"])
    assert generated_call["headers"]["webhook-id"] == generated_call["json"]["id"]
    # A chosen secret: its own bytes, which a Standard Webhooks verifier takes as whsec_ and their base64.
    as_standard = "whsec_" + base64.b64encode(SECRET.encode()).decode()
    assert Webhook(as_standard).verify(chosen_call["body"], chosen_call["headers"])["type"] == "webhook.test"
    assert pausepoint.verify_signature(SECRET, chosen_call["headers"]["X-PausePoint-Signature"], chosen_call["body"])
    with pytest.raises(WebhookVerificationError):
        Webhook(generated["secret"]).verify(chosen_call["body"], chosen_call["headers"])
    tampered = chosen_call["body"].replace(b"webhook.test", b"webhook.tEst")
    with pytest.raises(WebhookVerificationError):
        Webhook(as_standard).verify(tampered, chosen_call["headers"])


def test_during_rotation_standard_webhooks_verifiers_accept_either_secret(hooks_api, keys, receiver):
    from standardwebhooks.webhooks import Webhook
    key = keys["test_api_key"]
    webhook = add_webhook(hooks_api, key, receiver.url, secret=None)
    rotated = "whsec_" + base64.b64encode(b"r" * 32).decode()
    hooks_api.patch_json(f"/v1/webhooks/{webhook['webhook_id']}", {"secret": rotated}, headers=hooks_api.as_key(key))
    hooks_api.post(f"/v1/webhooks/{webhook['webhook_id']}/test", headers=hooks_api.as_key(key), status=202)
    call = receiver.wait_for(1)[0]
    assert len(call["headers"]["webhook-signature"].split(" ")) == 2
    for secret in (webhook["secret"], rotated):
        assert Webhook(secret).verify(call["body"], call["headers"])["type"] == "webhook.test"


def test_test_mode_webhooks_never_see_live_events_and_live_ones_never_see_test_events(running_api, receiver, twilio):
    api = running_api(jobs=True, **{"webhooks.allow_private": True}, **twilio.settings())
    keys = api.register()
    add_webhook(api, keys["test_api_key"], receiver.url + "/test-mode", events=["pause.created"])
    add_webhook(api, keys["api_key"], receiver.url + "/live-mode", events=["pause.created"])
    assert len(api.get("/v1/webhooks", headers=api.as_key(keys["api_key"])).json["webhooks"]) == 1
    test_pause = api.create_pause(keys["test_api_key"])["pause_id"]
    live_pause = api.create_pause(keys["api_key"])["pause_id"]
    calls = receiver.wait_for(2)
    by_path = {c["path"]: c["json"] for c in calls}
    assert by_path["/test-mode"]["data"]["pause_id"] == test_pause and by_path["/test-mode"]["livemode"] is False
    assert by_path["/live-mode"]["data"]["pause_id"] == live_pause and by_path["/live-mode"]["livemode"] is True


# -- delivery guarantees ----------------------------------------------------------------

def test_a_receiver_answering_500_is_retried_with_the_same_event_id(running_api, stubs):
    api = running_api(**{"webhooks.allow_private": True})
    receiver = stubs(WebhookReceiver, answers=[(500, {})])
    key = api.register()["test_api_key"]
    webhook_id = add_webhook(api, key, receiver.url)["webhook_id"]
    created = api.create_pause(key)
    api.post(f"/v1/pause/{created['pause_id']}/cancel", headers=api.as_key(key))
    api.step("webhooks")
    [delivery] = deliveries(api, key, webhook_id)
    assert delivery["status"] == "pending" and delivery["attempts"][0]["error"] == "HTTP 500"
    [(started, took_ms, due)] = stored(api.config, "SELECT a.started_at, a.duration_ms, d.next_attempt_at"
                                                   " FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id")
    retry_in = pausepoint.parse_db_time(due) - pausepoint.parse_db_time(started) - dt.timedelta(milliseconds=took_ms)
    assert 4.4 <= retry_in.total_seconds() <= 5.6       # the first retry comes 5 s ± 10 % after the attempt
    api.step("webhooks")
    assert len(receiver.calls) == 1                   # not before it is due
    skip_the_backoff(api.config)
    api.step("webhooks")
    first, second = receiver.calls
    assert first["status"] == 500 and second["status"] == 200
    assert first["json"]["id"] == second["json"]["id"]
    assert first["headers"]["X-PausePoint-Event-Id"] == second["headers"]["X-PausePoint-Event-Id"]
    assert first["body"] == second["body"]
    [delivery] = deliveries(api, key, webhook_id)
    assert delivery["status"] == "succeeded" and [a["status_code"] for a in delivery["attempts"]] == [500, 200]
    assert delivery["attempts"][0]["next_attempt_at"] and all(a["duration_ms"] >= 0 for a in delivery["attempts"])


def parse_time(text):
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("retry_after, due_within", [("600", (590, 610)), ("\u00b2", (3, 7))],
                         ids=["seconds", "not-ascii-digits"])
def test_retry_after_is_honoured_when_it_is_a_number(hooks_api, keys, retry_after, due_within):
    receiver = WebhookReceiver(answers=[(503, {"Retry-After": retry_after})])
    try:
        key = keys["test_api_key"]
        webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
        hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
        receiver.wait_for(1)
        [delivery] = wait_until(lambda: (d := deliveries(hooks_api, key, webhook_id))[0]["attempts"] and d)
        assert delivery["attempts"][0]["status_code"] == 503 and delivery["status"] == "pending"
        wait = (parse_time(delivery["next_attempt_at"]) - dt.datetime.now(dt.timezone.utc)).total_seconds()
        assert due_within[0] <= wait <= due_within[1]         # a Retry-After that is no number: the usual ~5 s
    finally:
        receiver.close()


def test_retry_after_is_honoured_when_it_is_a_date(running_api, stubs):
    api = running_api(**{"webhooks.allow_private": True})
    in_ten_minutes = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=10)
    receiver = stubs(WebhookReceiver, answers=[(503, {"Retry-After": email.utils.format_datetime(in_ten_minutes,
                                                                                               usegmt=True)})])
    key = api.register()["test_api_key"]
    webhook_id = add_webhook(api, key, receiver.url)["webhook_id"]
    api.post(f"/v1/webhooks/{webhook_id}/test", headers=api.as_key(key))
    api.step("webhooks")
    [delivery] = deliveries(api, key, webhook_id)
    assert delivery["attempts"][0]["status_code"] == 503 and delivery["status"] == "pending"
    # when the receiver asked, not the usual ~5 s later
    assert abs((parse_time(delivery["next_attempt_at"]) - in_ten_minutes).total_seconds()) <= 2


def test_redirects_are_not_followed_and_count_as_failures(hooks_api, keys, receiver):
    redirecting = WebhookReceiver(answers=[(302, {"Location": receiver.url + "/elsewhere"})])
    try:
        key = keys["test_api_key"]
        webhook_id = add_webhook(hooks_api, key, redirecting.url)["webhook_id"]
        hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
        [delivery] = wait_until(lambda: (d := deliveries(hooks_api, key, webhook_id))[0]["attempts"] and d)
        assert delivery["status"] == "pending" and "redirects are not followed" in delivery["attempts"][0]["error"]
        assert receiver.calls == []
    finally:
        redirecting.close()


def test_410_disables_the_endpoint_until_it_is_re_enabled(hooks_api, keys, hooks_config):
    receiver = WebhookReceiver(answers=[(410, {})])
    try:
        key = keys["test_api_key"]
        webhook_id = add_webhook(hooks_api, key, receiver.url, events=["pause.created"])["webhook_id"]
        hooks_api.create_pause(key)
        webhook = wait_until(lambda: (w := hooks_api.get(f"/v1/webhooks/{webhook_id}", headers=hooks_api.as_key(key)).json)
                             ["status"] == "disabled" and w)
        assert "410" in webhook["disabled_reason"]
        assert deliveries(hooks_api, key, webhook_id)[0]["status"] == "failed"
        disabled = hooks_api.get("/v1/audit", {"event_type": "webhook.disabled"}, headers=hooks_api.as_key(key)).json
        assert disabled["events"][0]["data"]["webhook_id"] == webhook_id
        while_disabled = hooks_api.create_pause(key)
        assert queued(hooks_config, while_disabled["pause_id"]) == 0        # no deliveries for a disabled endpoint
        assert len(receiver.calls) == 1
        hooks_api.patch_json(f"/v1/webhooks/{webhook_id}", {"enabled": True}, headers=hooks_api.as_key(key))
        hooks_api.create_pause(key)
        assert receiver.wait_for(2)[1]["status"] == 200
    finally:
        receiver.close()


def test_after_the_last_attempt_the_delivery_fails_and_the_audit_log_says_so(hooks_api, keys, hooks_config):
    receiver = WebhookReceiver(answers=[(500, {})] * 2)
    try:
        key = keys["test_api_key"]
        webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
        hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
        receiver.wait_for(1)
        wait_until(lambda: deliveries(hooks_api, key, webhook_id)[0]["attempts"])
        # Skip the three days: this delivery has had all but its last attempt.
        stored(hooks_config, "UPDATE webhook_deliveries SET attempts = ?, next_attempt_at = ?",
               len(pausepoint.RETRY_DELAYS_SECONDS), pausepoint.db_time())
        [delivery] = wait_until(lambda: (d := deliveries(hooks_api, key, webhook_id))[0]["status"] == "failed" and d)
        assert delivery["attempts"][-1]["attempt"] == len(pausepoint.RETRY_DELAYS_SECONDS) + 1
        assert delivery["next_attempt_at"] is None
        failed = hooks_api.get("/v1/audit", {"event_type": "webhook.delivery_failed"}, headers=hooks_api.as_key(key)).json
        assert failed["events"][0]["data"]["delivery_id"] == delivery["delivery_id"]
    finally:
        receiver.close()


def test_the_retry_schedule_spans_about_three_days():
    assert len(pausepoint.RETRY_DELAYS_SECONDS) == 9
    assert 2.9 <= sum(pausepoint.RETRY_DELAYS_SECONDS) / 86400 <= 3.3


def test_an_endpoint_failing_for_three_days_is_disabled(hooks_api, keys, hooks_config):
    receiver = WebhookReceiver(answers=[(500, {})] * 3)
    try:
        key = keys["test_api_key"]
        webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
        stored(hooks_config, "UPDATE webhooks SET failing_since = ?",
               pausepoint.db_time(pausepoint.utcnow() - dt.timedelta(days=3, minutes=1)))
        hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
        webhook = wait_until(lambda: (w := hooks_api.get(f"/v1/webhooks/{webhook_id}", headers=hooks_api.as_key(key)).json)
                             ["status"] == "disabled" and w)
        assert "3 days" in webhook["disabled_reason"]
    finally:
        receiver.close()


def test_a_success_clears_the_failing_streak(hooks_api, keys, hooks_config, receiver):
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
    stored(hooks_config, "UPDATE webhooks SET failing_since = '2026-01-01T00:00:00.000Z'")
    hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
    receiver.wait_for(1)
    wait_until(lambda: stored(hooks_config, "SELECT failing_since FROM webhooks") == [(None,)])


def test_a_new_url_starts_without_the_old_ones_failing_streak(hooks_api, keys, hooks_config, receiver):
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
    stored(hooks_config, "UPDATE webhooks SET failing_since = '2026-01-01T00:00:00.000Z'")
    hooks_api.patch_json(f"/v1/webhooks/{webhook_id}", {"url": receiver.url}, headers=hooks_api.as_key(key))
    assert stored(hooks_config, "SELECT failing_since FROM webhooks") == [("2026-01-01T00:00:00.000Z",)]
    hooks_api.patch_json(f"/v1/webhooks/{webhook_id}", {"url": receiver.url + "/fixed"}, headers=hooks_api.as_key(key))
    assert stored(hooks_config, "SELECT failing_since FROM webhooks") == [(None,)]


def test_redeliver_sends_a_delivery_again_with_the_same_event_id(hooks_api, keys, receiver):
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
    test = hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key), status=202).json
    receiver.wait_for(1)
    wait_until(lambda: deliveries(hooks_api, key, webhook_id)[0]["status"] == "succeeded")
    hooks_api.post(f"/v1/webhooks/{webhook_id}/deliveries/{test['delivery_id']}/redeliver",
                   headers=hooks_api.as_key(key), status=202)
    first, second = receiver.wait_for(2)
    assert first["json"]["id"] == second["json"]["id"] == test["event_id"]
    hooks_api.post(f"/v1/webhooks/{webhook_id}/deliveries/whd_nope/redeliver", headers=hooks_api.as_key(key),
                   status=404)


def test_a_slow_receiver_does_not_delay_other_receivers(hooks_api, keys, stubs):
    slow, fast = stubs(WebhookReceiver, delay=1), stubs(WebhookReceiver)      # 1 s: within the 10 s deadline
    slow_key = keys["test_api_key"]
    fast_key = hooks_api.register(email="fast@example.com")["test_api_key"]
    add_webhook(hooks_api, slow_key, slow.url, events=["pause.created"])
    add_webhook(hooks_api, fast_key, fast.url, events=["pause.created"])
    for _ in range(8):
        hooks_api.create_pause(slow_key)
    wait_until(lambda: stored(hooks_api.config, "SELECT count(*) FROM webhook_deliveries"
                                                          " WHERE status = 'delivering'") == [(2,)])
    hooks_api.create_pause(fast_key)            # while the slow receiver holds its two calls
    [fast_call] = fast.wait_for(1)
    first_two = slow.wait_for(2)
    # It arrived before the slow receiver had answered even its first two calls.
    assert fast_call["arrived_at"] < min(call["arrived_at"] for call in first_two) + slow.delay


def test_the_notification_failed_event_is_sent_after_the_final_attempt(tmp_path, receiver, twilio):
    twilio.fail_next = [500] * 3
    config = make_config(tmp_path, **{"webhooks.allow_private": True}, **twilio.settings())
    app = pausepoint.create_app(config)
    app.runtime.start()
    try:
        api = Api(app)
        key = api.register()["api_key"]
        add_webhook(api, key, receiver.url, events=["pause.notification_failed"])
        created = api.create_pause(key)
        wait_until(lambda: stored(config, "SELECT status, attempts FROM notifications") == [("queued", 1)])
        # Skip the backoff: this notification has had all but its last attempt.
        stored(config, "UPDATE notifications SET attempts = ?, next_attempt_at = ?",
               pausepoint.NOTIFICATION_ATTEMPTS - 1, pausepoint.db_time())
        [call] = receiver.wait_for(1)
        assert call["json"]["type"] == "pause.notification_failed"
        assert call["json"]["data"]["pause_id"] == created["pause_id"]
        assert call["json"]["data"]["notification"]["status"] == "failed"
        assert call["json"]["data"]["status"] == "pending"
    finally:
        app.runtime.stop()


def test_a_kill_between_decision_and_delivery_still_delivers_after_restart(spawn_server, tmp_path):
    receiver = WebhookReceiver(answers=[(500, {})])
    try:
        env = {"PAUSEPOINT_WEBHOOKS_ALLOW_PRIVATE": "true"}
        server = spawn_server(env=env)
        keys = requests.post(f"{server.url}/v1/auth/register",
                             json={"email": "k@example.com", "name": "K", "password": "password123"}).json()
        auth = {"Authorization": f"Bearer {keys['test_api_key']}"}
        requests.post(f"{server.url}/v1/webhooks", json={"url": receiver.url, "events": QUICKSTART_EVENTS,
                                                         "secret": SECRET}, headers=auth).raise_for_status()
        created = requests.post(f"{server.url}/v1/pause", json=WIRE, headers=auth).json()
        requests.post(f"{server.url}/v1/respond/{token_of(created['respond_url'])}", json={"choice": "Approve"})
        receiver.wait_for(1)
        db = {"database.path": str(tmp_path / "pausepoint.db")}
        # The first attempt failed and is recorded; its retry is due in ~5 s. Kill now.
        wait_until(lambda: stored(db, "SELECT count(*) FROM webhook_attempts") == [(1,)])
        server.proc.kill()
        server.proc.wait()
        skip_the_backoff(db)                    # it falls due while the server is down
        spawn_server(env=env, port=int(server.url.rsplit(":", 1)[1]))
        first, second = receiver.wait_for(2, timeout=20)
        assert second["status"] == 200 and second["json"]["id"] == first["json"]["id"]
        assert second["json"]["data"]["choice"] == "Approve"
    finally:
        receiver.close()


def readme_receiver(monkeypatch):
    """The README's receiver.py, run with SECRET: its namespace."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    snippet = re.search(r"```python\n(# receiver\.py.*?)```", readme, re.S).group(1)
    namespace = {"__name__": "readme_receiver"}
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
    exec(compile(snippet, "README receiver", "exec"), namespace)
    return namespace


def test_the_readme_receiver_handles_what_the_server_sends(hooks_api, keys, monkeypatch):
    namespace = readme_receiver(monkeypatch)
    server, base_url = serve_http(namespace["Handler"])
    try:
        key = keys["test_api_key"]
        url = f"{base_url}/webhook"
        webhook_id = add_webhook(hooks_api, key, url)["webhook_id"]
        hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
        created = hooks_api.create_pause(key)
        hooks_api.post_json(f"/v1/respond/{token_of(created['respond_url'])}", {"choice": "Approve"})
        done = wait_until(lambda: len(d := [x for x in deliveries(hooks_api, key, webhook_id) if x["status"] != "pending"
                                            and x["status"] != "delivering"]) == 2 and d)
        assert sorted((d["event_type"], d["status"], d["attempts"][0]["status_code"]) for d in done) == [
            ("pause.responded", "succeeded", 204), ("webhook.test", "succeeded", 204)]
    finally:
        stop_http(server)
    header = pausepoint.signature_header([SECRET], int(time.time()), b"{}")
    assert namespace["verify_signature"](SECRET, header, b"{}")
    assert not namespace["verify_signature"]("whsec_wrong_secret_00000000", header, b"{}")
    assert not namespace["verify_signature"](SECRET, header, b"{}tampered")


def test_the_readme_receiver_handles_a_delivery_replayed_with_another_event_id_header_once(
        running_api, receiver, monkeypatch, capsys):
    api = running_api(**{"webhooks.allow_private": True})
    key = api.register()["test_api_key"]
    webhook_id = add_webhook(api, key, receiver.url)["webhook_id"]
    api.post(f"/v1/webhooks/{webhook_id}/test", headers=api.as_key(key))
    api.step("webhooks")
    [sent] = receiver.calls
    server, base_url = serve_http(readme_receiver(monkeypatch)["Handler"])
    try:
        # The signature covers the body alone: a replay may carry any X-PausePoint-Event-Id.
        for event_id in (sent["headers"]["X-PausePoint-Event-Id"], "evt_" + "0" * 32):
            headers = {**sent["headers"], "X-PausePoint-Event-Id": event_id}
            assert requests.post(base_url, data=sent["body"], headers=headers, timeout=5).status_code == 204
    finally:
        stop_http(server)
    assert capsys.readouterr().out.count("test event:") == 1


@pytest.mark.deadline(1)
@pytest.mark.parametrize("slow_receiver", [
    (WebhookReceiver, {"delay": 3}),            # says nothing
    (TrickleReceiver, {"interval": 0.2}),       # every read returns within 0.2 s; the whole answer takes minutes
    (StallingReceiver, {}),                     # "HTTP/1.1 200 OK" and then nothing: not a 200
], ids=["silent", "trickling", "stalling"])
def test_an_attempt_ends_at_its_deadline_however_slowly_the_receiver_answers(hooks_api, keys, stubs, slow_receiver):
    slow = stubs(slow_receiver[0], **slow_receiver[1])
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, slow.url)["webhook_id"]
    hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
    hooks_api.step("webhooks")
    [delivery] = deliveries(hooks_api, key, webhook_id)
    attempt = delivery["attempts"][0]
    assert attempt["error"] == "timed out after 1 s" and attempt["status_code"] is None     # outbound.deadline_seconds
    assert 1_000 <= attempt["duration_ms"] < 3_000          # cut at the deadline, with room for a busy machine
    assert delivery["status"] == "pending" and delivery["next_attempt_at"]


@pytest.mark.deadline(60)
def test_a_stop_cuts_a_delivery_waiting_on_its_receiver_short_and_records_it_to_retry(hooks_api, keys, stubs):
    """Not the rest of its deadline: a container's stop kills the process 10 s after asking it to stop."""
    stalling = stubs(StallingReceiver)
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, stalling.url)["webhook_id"]
    hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
    wait_until(lambda: stalling.open == 1)          # the delivery is under way, waiting for the rest of the answer
    asked_to_stop = time.monotonic()
    hooks_api.app.runtime.stop()
    assert time.monotonic() - asked_to_stop < pausepoint.STOP_CALLS_SECONDS + 5      # not 60 s
    [(error, status)] = stored(hooks_api.config, "SELECT a.error, d.status FROM webhook_attempts a"
                                                 " JOIN webhook_deliveries d ON d.id = a.delivery_id")
    assert re.fullmatch(r"timed out after [0-9.]+ s, as the server stopped", error) and status == "pending"


# -- kept-alive connections ---------------------------------------------------------

def send_test_events(api, key, webhook_id, count):
    for _ in range(count):
        api.post(f"/v1/webhooks/{webhook_id}/test", headers=api.as_key(key), status=202)


def attempts_made(config):
    return stored(config, "SELECT status_code, error FROM webhook_attempts ORDER BY started_at")


def test_deliveries_to_one_endpoint_reuse_its_connections(hooks_api, keys, stubs):
    kept = stubs(KeepAliveReceiver)
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, kept.url)["webhook_id"]
    send_test_events(hooks_api, key, webhook_id, 20)
    hooks_api.step("webhooks")
    assert attempts_made(hooks_api.config) == [(200, None)] * 20 and kept.requests == 20
    assert kept.accepted <= hooks_api.config["webhooks.per_endpoint"]       # not one per delivery


def test_a_receivers_cookies_are_neither_kept_nor_sent_back(hooks_api, keys, stubs):
    # Kept, they piled up in the server's memory, a receiver's 100 header lines of 64 KB an
    # answer, and went back with every call after: 6 answers made each call carry 27 MB.
    cookie = "jar=" + "x" * 4000 + "; Max-Age=86400"
    receiver = stubs(WebhookReceiver, answers=[(200, {"Set-Cookie": cookie})] * 2)
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
    for _ in range(2):                   # one at a time: the second goes after the first's answer
        send_test_events(hooks_api, key, webhook_id, 1)
        hooks_api.step("webhooks")
    assert [call["headers"].get("Cookie") for call in receiver.wait_for(2)] == [None, None]


def test_an_answer_with_megabytes_of_headers_is_cut_off_not_held_in_memory(hooks_api, keys, stubs):
    # Parsed whole, 6 MB of headers took 47 MB at once, per call: a tenant's receivers,
    # several calls at a time, could make the server's memory jump by hundreds of megabytes.
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, stubs(HeaderFlood).url)["webhook_id"]
    send_test_events(hooks_api, key, webhook_id, 1)
    tracemalloc.start()
    try:
        hooks_api.step("webhooks")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    [(status_code, error)] = attempts_made(hooks_api.config)
    assert status_code is None and "headers" in error and peak < 5_000_000


def test_a_step_returns_only_when_nothing_is_due_though_other_rounds_run_meanwhile(running_api, stubs):
    # Rounds of the same job on another thread, as the scheduler runs them when a call ends:
    # a step must not return because one of them took the work its next round would have.
    api = running_api(**{"webhooks.allow_private": True, "webhooks.per_endpoint": 1})
    key = api.register()["test_api_key"]
    send_test_events(api, key, add_webhook(api, key, stubs(WebhookReceiver, delay=0.01).url)["webhook_id"], 30)
    stop = threading.Event()

    def other_rounds():
        while not stop.is_set():
            api.app.runtime.run_webhooks()

    with concurrent.futures.ThreadPoolExecutor(1) as other:
        rounds = other.submit(other_rounds)
        try:
            api.step("webhooks")
            attempted = len(attempts_made(api.config))
        finally:
            stop.set()
        rounds.result()
    assert attempted == 30


@pytest.mark.parametrize("close", ["close", "drop"])
def test_a_kept_connection_the_receiver_closed_costs_no_failed_attempt(hooks_api, keys, stubs, close):
    # Closed after an answer: whether the close has arrived or not when the next call takes
    # the connection ("close"), or the close comes as the next call arrives ("drop").
    kept = stubs(KeepAliveReceiver, plan=[close] * 6)
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, kept.url)["webhook_id"]
    for _ in range(6):                   # one at a time: each finds the connection the last one was answered on
        send_test_events(hooks_api, key, webhook_id, 1)
        hooks_api.step("webhooks")
    assert attempts_made(hooks_api.config) == [(200, None)] * 6 and kept.accepted == 6
    assert kept.dropped == (5 if close == "drop" else 0)      # with "drop", each call after the first was sent twice


@pytest.mark.parametrize("second", ["partial", ("hangup", pausepoint.LOST_CALL_SECONDS + 0.2)],
                         ids=["after part of an answer", "late"])
def test_a_call_on_a_kept_connection_hung_up_on_after_it_may_have_been_acted_on_is_not_sent_again(
        hooks_api, keys, stubs, second):
    kept = stubs(KeepAliveReceiver, plan=["ok", second])
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, kept.url)["webhook_id"]
    for _ in range(2):
        send_test_events(hooks_api, key, webhook_id, 1)
        hooks_api.step("webhooks")
    assert [status for status, _ in attempts_made(hooks_api.config)] == [200, None]
    assert kept.requests == 2 and kept.accepted == 1


@pytest.mark.parametrize("earlier, second", [(len(pausepoint.RETRY_DELAYS_SECONDS) - 1, (200, None)),
                                             (len(pausepoint.RETRY_DELAYS_SECONDS), (None, "could not connect"))],
                         ids=["the last but one", "the last"])
def test_a_call_lost_to_a_closing_kept_connection_goes_again_unless_it_was_the_last_attempt(
        running_api, stubs, earlier, second):
    api = running_api(**{"webhooks.allow_private": True})      # nothing delivers until stepped
    kept = stubs(KeepAliveReceiver, plan=["drop"])
    key = api.register()["test_api_key"]
    webhook_id = add_webhook(api, key, kept.url)["webhook_id"]
    send_test_events(api, key, webhook_id, 1)
    api.step("webhooks")
    send_test_events(api, key, webhook_id, 1)
    # Skip the days of retries: this delivery has had `earlier` attempts.
    stored(api.config, "UPDATE webhook_deliveries SET attempts = ? WHERE status = 'pending'", earlier)
    api.step("webhooks")
    assert attempts_made(api.config) == [(200, None), second]
    assert kept.dropped == 1 and kept.accepted == (2 if second[0] == 200 else 1)


def call_endpoint(api, url):
    """One call straight through the server's kept connections to webhook "whk_one", on this
    thread: the HTTP status, or None if the connection failed."""
    runtime = api.app.runtime
    deadline = runtime.outbound.deadlines.deadline(5)
    with deadline:
        try:
            return runtime.webhook_connections.post("whk_one", deadline, url, data=b"{}", resend_lost=True).status_code
        except requests.ConnectionError:
            return None


def test_a_call_on_a_new_connection_after_a_kept_one_on_the_same_thread_is_not_sent_again(hooks_api, stubs):
    # The second call reuses the first's connection, which the receiver then closes; the
    # third, on the same thread, needs a new one and is hung up on.
    kept = stubs(KeepAliveReceiver, plan=["ok", "close", "hangup"])
    outcomes = [call_endpoint(hooks_api, kept.url) for _ in range(2)]
    wait_until(lambda: kept.ended == 1)          # its close has reached this side
    outcomes.append(call_endpoint(hooks_api, kept.url))
    assert outcomes == [200, 200, None] and kept.requests == 3 and kept.accepted == 2


def test_a_call_hung_up_on_over_a_new_connection_is_a_failed_attempt_not_sent_again_at_once(hooks_api, keys, stubs):
    kept = stubs(KeepAliveReceiver, plan=["hangup"])
    key = keys["test_api_key"]
    send_test_events(hooks_api, key, add_webhook(hooks_api, key, kept.url)["webhook_id"], 1)
    hooks_api.step("webhooks")
    assert attempts_made(hooks_api.config) == [(None, "could not connect")] and kept.requests == 1


@pytest.mark.deadline(1)
def test_a_kept_connection_is_held_to_the_deadline_of_the_call_that_reuses_it(hooks_api, keys, stubs):
    kept = stubs(KeepAliveReceiver, plan=["ok", "trickle"])     # the second answer would take 8 s
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, kept.url)["webhook_id"]
    for _ in range(2):
        send_test_events(hooks_api, key, webhook_id, 1)
        hooks_api.step("webhooks")
    assert kept.accepted == 1
    assert attempts_made(hooks_api.config) == [(200, None), (None, "timed out after 1 s")]


def test_a_disabled_endpoint_gets_no_test_events_or_redeliveries(hooks_api, keys, receiver):
    key = keys["test_api_key"]
    webhook_id = add_webhook(hooks_api, key, receiver.url)["webhook_id"]
    test = hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key)).json
    receiver.wait_for(1)
    hooks_api.patch_json(f"/v1/webhooks/{webhook_id}", {"enabled": False}, headers=hooks_api.as_key(key))
    for path in ("test", f"deliveries/{test['delivery_id']}/redeliver"):
        error = hooks_api.post(f"/v1/webhooks/{webhook_id}/{path}", headers=hooks_api.as_key(key), status=409).json
        assert error["error"]["code"] == "webhook_disabled"
    assert queued(hooks_api.config, webhook_id=webhook_id) == 1 and len(receiver.calls) == 1


def test_a_developers_webhooks_are_counted_in_each_mode_apart(running_api):
    """A test key's endpoints, which the live key cannot see or delete, must not stop it."""
    api = running_api(**{"webhooks.max_per_developer": 2})
    developer = api.register()
    test, live = api.as_key(developer["test_api_key"]), api.as_key(developer["api_key"])
    for n in range(2):
        api.post_json("/v1/webhooks", {"url": f"https://hooks.example.com/{n}", "events": ["pause.created"]},
                      headers=test)
    refused = api.post_json("/v1/webhooks", {"url": "https://hooks.example.com/t", "events": ["pause.created"]},
                            headers=test, status=409)
    assert refused.json["error"]["message"] == "a developer may have at most 2 test webhooks; delete one first"
    api.post_json("/v1/webhooks", {"url": "https://hooks.example.com/live", "events": ["pause.created"]}, headers=live)


# -- one tenant's slow receivers against everyone else -----------------------------

def register_on(url, email):
    keys = requests.post(f"{url}/v1/auth/register", json={"email": email, "name": "N", "password": "password123"}).json()
    return {"Authorization": f"Bearer {keys['test_api_key']}"}


def test_one_developers_trickling_receivers_never_delay_anothers_delivery(spawn_server, tmp_path):
    trickler, receiver = TrickleReceiver(interval=1.0), WebhookReceiver()
    try:
        server = spawn_server(env={"PAUSEPOINT_WEBHOOKS_ALLOW_PRIVATE": "true"})
        stalling, other = register_on(server.url, "a@example.com"), register_on(server.url, "b@example.com")
        for n in range(16):
            requests.post(f"{server.url}/v1/webhooks", headers=stalling,
                          json={"url": f"{trickler.url}/{n}", "events": ["pause.created"]}).raise_for_status()
        refused = requests.post(f"{server.url}/v1/webhooks", headers=stalling,
                                json={"url": trickler.url, "events": ["pause.created"]})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "webhook_limit_reached"
        for _ in range(3):                         # 48 deliveries, every one of which will stall
            requests.post(f"{server.url}/v1/pause", json=WIRE, headers=stalling).raise_for_status()
        wait_until(lambda: trickler.open >= 3)      # its test deliveries: one short of its share
        requests.post(f"{server.url}/v1/webhooks", headers=other,
                      json={"url": receiver.url, "events": ["pause.responded"]}).raise_for_status()
        created = requests.post(f"{server.url}/v1/pause", json=WIRE, headers=other).json()
        requests.post(f"{server.url}/v1/respond/{token_of(created['respond_url'])}", json={"choice": "Approve"})
        [call] = receiver.wait_for(1, timeout=9)
        assert call["json"]["data"]["pause_id"] == created["pause_id"]
        # It did not wait for a stalled call to end: none of them has ended yet.
        db = {"database.path": str(tmp_path / "pausepoint.db")}
        assert stored(db, "SELECT count(*) FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id"
                          " WHERE d.event_id IN (SELECT id FROM webhook_events WHERE type = 'pause.created')") == [(0,)]
        assert trickler.most_open == 3             # outbound.per_developer (4), one kept for the tenant's live events
    finally:
        trickler.close()
        receiver.close()


def test_a_developers_test_and_live_deliveries_share_one_share_with_one_call_kept_for_live():
    pool = pausepoint.OutboundPool(16, 4)
    try:
        test = [pool.reserve("dev_a", (pausepoint.TEST_WEBHOOK, f"wh_{n}"), 2, 4) for n in range(4)]
        live = [pool.reserve("dev_a", ("webhook", f"wh_live_{n}"), 2, 4) for n in range(2)]
        assert (test, live) == ([True, True, True, False], [True, False])        # 4 in all, as before
        assert pool.reserve("dev_b", ("webhook", "wh_b"), 2, 4)
    finally:
        pool.executor.shutdown()


def test_a_developers_stalled_test_deliveries_never_hold_up_their_live_ones(spawn_server):
    """Test deliveries take one call fewer than the developer's share, which live and test
    deliveries together never pass: one is always left for the live events."""
    trickler, receiver = TrickleReceiver(interval=1.0), WebhookReceiver()
    try:
        server = spawn_server(env={"PAUSEPOINT_WEBHOOKS_ALLOW_PRIVATE": "true", "PAUSEPOINT_OUTBOUND_DEADLINE_SECONDS": "60"})
        keys = requests.post(f"{server.url}/v1/auth/register",
                             json={"email": "a@example.com", "name": "N", "password": "password123"}).json()
        test, live = ({"Authorization": f"Bearer {keys[name]}"} for name in ("test_api_key", "api_key"))
        for n in range(2):                          # webhooks.per_endpoint (2) each: outbound.per_developer (4) in all
            requests.post(f"{server.url}/v1/webhooks", headers=test,
                          json={"url": f"{trickler.url}/{n}", "events": ["pause.created"]}).raise_for_status()
        for _ in range(3):
            requests.post(f"{server.url}/v1/pause", json=WIRE, headers=test).raise_for_status()
        wait_until(lambda: trickler.open >= 3)      # held for up to a minute each
        requests.post(f"{server.url}/v1/webhooks", headers=live,
                      json={"url": receiver.url, "events": ["pause.created"]}).raise_for_status()
        created = requests.post(f"{server.url}/v1/pause", headers=live,
                                json={**WIRE, "channel": "link", "recipient": "ops"}).json()
        [call] = receiver.wait_for(1, timeout=20)
        assert call["json"]["data"]["pause_id"] == created["pause_id"] and trickler.most_open == 3
    finally:
        trickler.close()
        receiver.close()


@pytest.mark.deadline(1)
def test_an_attempt_to_a_name_with_many_unreachable_addresses_still_ends_at_its_deadline(hooks_api, keys, monkeypatch):
    holes = [Blackhole(f"127.0.0.{n}") for n in (1, 2, 3, 4)]     # each would take a whole connect timeout
    real_getaddrinfo = socket.getaddrinfo

    def resolve(host, port, *args, **kwargs):       # a name with four A records, as DNS could give
        if host == "many.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", hole.address) for hole in holes]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    try:
        key = keys["test_api_key"]
        webhook_id = add_webhook(hooks_api, key, "http://many.example/hook")["webhook_id"]
        hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key))
        hooks_api.step("webhooks")
        [delivery] = deliveries(hooks_api, key, webhook_id)
        attempt = delivery["attempts"][0]
        assert attempt["error"] == "timed out after 1 s" and 1_000 <= attempt["duration_ms"] < 3_000
        assert delivery["status"] == "pending"
    finally:
        for hole in holes:
            hole.close()


@pytest.mark.parametrize("header", ["t=\u00b2,v1=00", "t=\u0661\u0662,v1=00", "v1=00", ""])
def test_a_signature_with_an_odd_timestamp_is_refused_not_a_crash(header):
    assert pausepoint.verify_signature(SECRET, header, b"{}") is False


def test_a_developer_with_nothing_in_flight_finds_a_worker_while_four_others_stall():
    pool = pausepoint.OutboundPool(workers=16, per_developer=4)
    try:
        for developer in ("a", "b", "c", "d"):
            for n in range(8):                          # more than their share: the rest is refused
                pool.reserve(developer, ("webhook", f"{developer}{n % 4}"), 2, 4)
        assert pool.free() == 3
        assert pool.reserve("e", ("webhook", "e0"), 2, 4)          # a newcomer still gets in
        assert not pool.reserve("a", ("webhook", "a-new"), 2, 4)   # the stalling ones do not
    finally:
        pool.shutdown()


@pytest.mark.deadline(1)
def test_one_developers_slow_name_lookups_hold_nobody_elses(hooks_api, keys, receiver, monkeypatch):
    real_getaddrinfo = socket.getaddrinfo

    def resolve(host, port, *args, **kwargs):
        if host.endswith(".slow.test"):
            time.sleep(3)                           # a name server made to answer slowly: past the 1 s deadline
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    slow_key = keys["test_api_key"]
    for n in range(8):
        add_webhook(hooks_api, slow_key, f"http://h{n}.slow.test/hook", events=["pause.created"])
    hooks_api.create_pause(slow_key)                # eight deliveries, each stuck in a lookup
    other = hooks_api.register(email="other@example.com")["test_api_key"]
    webhook_id = add_webhook(hooks_api, other, receiver.url.replace("127.0.0.1", "localhost"),
                             events=["pause.created"])["webhook_id"]
    wait_until(lambda: stored(hooks_api.config, "SELECT count(*) FROM webhook_deliveries WHERE status = 'delivering'")
               == [(3,)])                           # the slow developer's test calls (one short of 4) are stuck
    hooks_api.create_pause(other)
    [call] = receiver.wait_for(1, timeout=5)        # its own lookup, not queued behind theirs
    assert call["json"]["type"] == "pause.created"
    wait_until(lambda: deliveries(hooks_api, other, webhook_id)[0]["status"] == "succeeded")


def test_calls_to_slow_targets_together_get_half_the_pool():
    pool = pausepoint.OutboundPool(workers=16, per_developer=4)
    try:
        for n in range(20):                          # twenty accounts, each with a receiver known to stall
            pool.took(("webhook", f"w{n}"), 10.0)
        taken = sum(pool.reserve(f"d{n}", ("webhook", f"w{n}"), 2, 4) for n in range(20))
        assert taken == 8
        assert pool.reserve("healthy", ("webhook", "fast"), 2, 4)
        pool.took(("webhook", "w0"), 0.1)            # answered quickly again: no longer slow
        assert pool.reserve("d0", ("webhook", "w0"), 2, 4)
    finally:
        pool.shutdown()


def test_a_signature_that_is_not_ascii_is_refused_not_a_crash(monkeypatch):
    # http.server (and most frameworks) hand a header over as Latin-1 text: a forged one may hold any of it.
    header = f"t={int(time.time())},v1=\u00e9"
    assert pausepoint.verify_signature(SECRET, header, b"{}") is False
    assert readme_receiver(monkeypatch)["verify_signature"](SECRET, header, b"{}") is False


def test_a_signature_timestamp_with_thousands_of_digits_is_refused_not_a_crash():
    assert pausepoint.verify_signature(SECRET, "t=" + "9" * 5000 + ",v1=00", b"{}") is False


# -- the delivery job ----------------------------------------------------------------------

def test_an_endpoint_gets_as_many_calls_at_once_as_webhooks_per_endpoint(running_api, stubs):
    trickler = stubs(TrickleReceiver, interval=0.2)        # holds every call it gets until the deadline
    api = running_api(**{"webhooks.allow_private": True, "webhooks.per_endpoint": 3,
                                     "outbound.deadline_seconds": 1})
    key = api.register()["test_api_key"]
    add_webhook(api, key, trickler.url, events=["pause.created"])
    for _ in range(6):
        api.create_pause(key)
    assert api.app.runtime.run_webhooks() == 3
    api.step("webhooks")
    # From the attempts the server recorded: six calls, never more than three at once.
    attempts = stored(api.config, "SELECT started_at, duration_ms FROM webhook_attempts")
    edges = sorted(edge for started_at, duration_ms in attempts for edge in (
        (pausepoint.parse_db_time(started_at), 1),
        (pausepoint.parse_db_time(started_at) + dt.timedelta(milliseconds=duration_ms), -1)))
    assert len(attempts) == 6 and max(itertools.accumulate(change for _, change in edges)) == 3


def test_a_wake_up_during_the_delivery_round_is_not_lost(running_api, receiver):
    api = running_api(**{"webhooks.allow_private": True})
    key = api.register()["test_api_key"]
    webhook_id = add_webhook(api, key, receiver.url, events=["pause.created"])["webhook_id"]
    first = api.create_pause(key)
    runtime = api.app.runtime
    writer = sqlite3.connect(api.config["database.path"], isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")               # the round will wait for this lock to claim the first
    rounds = concurrent.futures.ThreadPoolExecutor(1)
    started = rounds.submit(runtime.run_webhooks)
    wait_until(runtime.write_lock.locked)           # it is in its round, waiting to claim
    # Meanwhile another change queues a second event and wakes the job, as every commit does.
    writer.execute("INSERT INTO webhook_events (id, developer_id, livemode, type, pause_id, body, created_at)"
                   " SELECT 'evt_second', developer_id, 0, 'pause.created', id, '{}', created_at FROM pauses")
    writer.execute("INSERT INTO webhook_deliveries (id, webhook_id, event_id, next_attempt_at, created_at, updated_at)"
                   " VALUES ('whd_second', ?, 'evt_second', ?, ?, ?)", (webhook_id, *[pausepoint.db_time()] * 3))
    runtime.wake_webhooks()
    writer.execute("COMMIT")
    writer.close()
    assert started.result(timeout=10) == 2          # the round looked again: the second went out too
    rounds.shutdown()
    api.step("webhooks")
    assert {call["json"].get("data", {}).get("pause_id") for call in receiver.calls} == {first["pause_id"], None}


def test_a_claim_outlasts_the_calls_deadline_however_long_it_is(running_api):
    api = running_api(**{"outbound.deadline_seconds": 200})
    lapses = pausepoint.parse_db_time(pausepoint.claim_expiry(api.config, 30))
    assert (lapses - pausepoint.utcnow()).total_seconds() > 200 + 60


def test_a_pause_reads_the_same_in_its_page_its_list_and_its_webhook(hooks_api, keys, receiver):
    key = keys["test_api_key"]
    add_webhook(hooks_api, key, receiver.url, events=["pause.cancelled"])
    metadata = {"payee": "Société Générale \u2028 \"quoted\" \\ \t", "amount": 340.25, "big": 12345678901234567890,
                "tiny": 1e-300, "none": None, "nested": {"ok": [True, False, []]}, "emoji": "\U0001F4B8"}
    created = hooks_api.create_pause(key, metadata=metadata)
    hooks_api.step("notifications")
    hooks_api.post(f"/v1/pause/{created['pause_id']}/cancel", headers=hooks_api.as_key(key))
    hooks_api.step("webhooks")
    page = hooks_api.pause(key, created["pause_id"])
    listed = hooks_api.get("/v1/pause", headers=hooks_api.as_key(key)).json["pauses"]
    sent = receiver.wait_for(1)[0]["json"]["data"]
    assert listed == [page] and sent == page
    notification = stored(hooks_api.config, "SELECT text FROM notifications")[0][0]
    decided_at = stored(hooks_api.config, "SELECT decided_at FROM pauses")[0][0]
    assert page == {
        "pause_id": created["pause_id"], "status": "cancelled", "recipient": WIRE["recipient"], "channel": "sms", "title": None,
        "message": WIRE["message"], "options": WIRE["options"], "timeout_default": "Reject", "choice": None,
        "comment": None, "decided_at": decided_at[:19] + "Z", "decided_by": page["decided_by"], "metadata": metadata,
        "respond_url": created["respond_url"], "livemode": False, "expires_at": created["expires_at"],
        "created_at": created["created_at"],
        "notification": {"channel": "sms", "status": "simulated", "attempts": 1, "provider_message_id": None,
                         "last_error": None, "may_have_reached": False, "text": notification},
        "receipt": page["receipt"]}
    assert page["decided_by"].startswith("api:") and page["receipt"].count(".") == 2


def test_a_delivery_that_cannot_connect_says_whether_the_name_or_the_receiver_failed(hooks_api, keys):
    with socket.socket() as probe:          # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    key = keys["test_api_key"]
    unresolved = add_webhook(hooks_api, key, "https://no-such-host.invalid/hook")["webhook_id"]
    refused = add_webhook(hooks_api, key, f"http://127.0.0.1:{closed_port}/hook")["webhook_id"]
    for webhook_id in (unresolved, refused):
        hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(key), status=202)

    def first_error(webhook_id):
        attempts = deliveries(hooks_api, key, webhook_id)[0]["attempts"]
        return attempts and attempts[0]["error"]
    assert wait_until(lambda: first_error(unresolved)) == "could not connect: the host name did not resolve"
    assert wait_until(lambda: first_error(refused)) == ("could not connect: connection refused"
                                                        " (is the receiver running, on that port?)")


def test_a_webhook_used_with_the_other_modes_key_is_404_naming_the_key_that_reads_it(hooks_api, keys):
    webhook_id = add_webhook(hooks_api, keys["test_api_key"], "https://hooks.example.org/pp")["webhook_id"]
    error = hooks_api.post(f"/v1/webhooks/{webhook_id}/test", headers=hooks_api.as_key(keys["api_key"]),
                           status=404).json["error"]
    assert error["message"] == (f"no webhook {webhook_id!r} for this API key: it is one of your test-mode webhook"
                                " endpoints, which only your pp_test_ key reads")
