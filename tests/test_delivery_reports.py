"""Twilio's delivery reports: a text Twilio took and then could not deliver fails, and the agent hears of it once."""

import json
import urllib.parse
import uuid

import pytest
from twilio.request_validator import RequestValidator

from conftest import WIRE, scraped, stored, value
import pausepoint

STATUS_PATH = "/v1/twilio/status"
BASE_URL = "https://pp.example.org"


@pytest.fixture
def texted(running_api, twilio):
    """A live SMS pause whose text Twilio took: (api, its key, the pause's id, the message's sid)."""
    api = running_api(**twilio.settings(), **{"server.base_url": BASE_URL})
    key = api.register()["api_key"]
    pause_id = api.create_pause(key)["pause_id"]
    api.step("notifications")
    [message] = twilio.messages
    return api, key, pause_id, message["sid"]


def report(api, twilio, sid, status, error_code=None, auth_token=None):
    """Post Twilio's signed status callback for the message `sid` to the server, as Twilio would."""
    url, form, headers = twilio.status_callback(sid, status, error_code, auth_token)
    return api.post(urllib.parse.urlsplit(url).path, form, headers=headers, expect_errors=True)


def told(api):
    """How many notification.failed audit events and pause.notification_failed webhook events there are."""
    return stored(api.config, "SELECT (SELECT count(*) FROM audit_events WHERE event_type = 'notification.failed'),"
                              " (SELECT count(*) FROM webhook_events WHERE type = 'pause.notification_failed')")[0]


def test_a_text_is_sent_asking_twilio_to_report_to_this_servers_status_route(texted, twilio):
    assert twilio.messages[0]["StatusCallback"] == BASE_URL + STATUS_PATH


def test_without_a_base_url_twilio_is_asked_for_no_reports_it_could_not_deliver(running_api, twilio):
    api = running_api(**twilio.settings())
    key = api.register()["api_key"]
    api.create_pause(key)
    api.step("notifications")
    assert "StatusCallback" not in twilio.messages[0]


def test_a_text_twilio_could_not_deliver_fails_and_the_agent_is_told_once(texted, twilio):
    api, key, pause_id, sid = texted
    answer = report(api, twilio, sid, "undelivered", 30007)
    assert answer.status_code == 204
    notification = api.pause(key, pause_id)["notification"]
    assert notification["status"] == "failed" and notification["provider_message_id"] == sid
    assert notification["last_error"] == ("Twilio reported the text undelivered (error 30007):"
                                          " the carrier filtered the text as spam")
    assert told(api) == (1, 1)
    [event] = stored(api.config, "SELECT body FROM webhook_events WHERE type = 'pause.notification_failed'")
    assert json.loads(event[0])["data"]["notification"]["status"] == "failed"
    audit = api.get("/v1/audit", {"event_type": "notification.failed"}, headers=api.as_key(key)).json["events"]
    assert audit[0]["data"]["error"] == notification["last_error"] and audit[0]["data"]["reported"] == "undelivered"
    assert api.pause(key, pause_id)["status"] == "pending"           # the agent decides what to do
    # Twilio posts again, and says more, in any order: nobody is told twice.
    for status in ("undelivered", "failed", "sent", "delivered", "read"):
        assert report(api, twilio, sid, status, 30003).status_code == 204
    assert told(api) == (1, 1)
    assert api.pause(key, pause_id)["notification"]["last_error"] == notification["last_error"]


def test_operators_count_the_reports_by_their_first_final_word(running_api, twilio):
    api = running_api(**twilio.settings(), **{"server.base_url": BASE_URL, "metrics.enabled": True,
                                              "metrics.listen": ""})
    key = api.register()["api_key"]
    for _ in range(3):
        api.create_pause(key)
    api.step("notifications")
    first, second, third = (message["sid"] for message in twilio.messages)
    for sid, statuses in ((first, ["undelivered", "failed", "delivered"]), (second, ["delivered", "read", "failed"]),
                          (third, ["sent"])):
        for status in statuses:
            report(api, twilio, sid, status, 30003)
    samples = scraped(api.get("/metrics").text)
    assert value(samples, "pausepoint_delivery_reports_total", channel="sms", status="undelivered") == 1
    assert value(samples, "pausepoint_delivery_reports_total", channel="sms", status="delivered") == 1
    assert value(samples, "pausepoint_delivery_reports_total", channel="sms", status="read") == 1
    assert value(samples, "pausepoint_delivery_reports_total", channel="sms", status="failed") == 0


def test_a_delivered_text_changes_nothing_the_agent_sees_nor_does_a_failure_reported_after(texted, twilio):
    api, key, pause_id, sid = texted
    before = api.pause(key, pause_id)
    for status in ("sent", "delivered", "undelivered", "failed"):
        assert report(api, twilio, sid, status, 30005).status_code == 204
    assert api.pause(key, pause_id) == before and told(api) == (0, 0)
    assert stored(api.config, "SELECT status, delivery_status FROM notifications") == [("sent", "delivered")]


def test_a_delivery_reported_after_a_failure_lets_the_persons_reply_count_and_tells_no_one_again(texted, twilio):
    api, key, pause_id, sid = texted
    report(api, twilio, sid, "failed", 30006)
    report(api, twilio, sid, "delivered")
    assert stored(api.config, "SELECT status, delivery_status, may_have_reached FROM notifications") == [
        ("failed", "failed", 1)]
    assert told(api) == (1, 1)


@pytest.mark.parametrize("signature", ["", "bm90IGEgc2lnbmF0dXJl", "another auth token"])
def test_an_unsigned_or_forged_report_is_refused_and_changes_nothing(texted, twilio, signature):
    api, key, pause_id, sid = texted
    url, form, headers = twilio.status_callback(sid, "undelivered", 30007,
                                                auth_token="some-other-token" if signature == "another auth token"
                                                else None)
    if signature != "another auth token":
        headers = {"X-Twilio-Signature": signature}
    answer = api.post(STATUS_PATH, form, headers=headers, expect_errors=True)
    assert answer.status_code == 403 and answer.json["error"]["code"] == "bad_signature"
    assert api.pause(key, pause_id)["notification"]["status"] == "sent" and told(api) == (0, 0)


def test_a_report_on_a_message_the_server_never_sent_changes_nothing(texted, twilio):
    api, key, pause_id, sid = texted
    twilio.messages.append({**twilio.messages[0], "sid": "SM" + "f" * 32})      # another sender's text
    before = stored(api.config, "SELECT * FROM notifications")
    assert report(api, twilio, "SM" + "f" * 32, "undelivered", 30003).status_code == 204
    assert stored(api.config, "SELECT * FROM notifications") == before and told(api) == (0, 0)


def test_a_text_not_delivered_after_its_pause_was_decided_fails_but_tells_the_agent_nothing(texted, twilio):
    api, key, pause_id, sid = texted
    api.post(f"/v1/pause/{pause_id}/cancel", headers=api.as_key(key))
    report(api, twilio, sid, "undelivered", 30003)
    assert api.pause(key, pause_id)["notification"]["status"] == "failed"
    assert told(api) == (1, 0)                          # in the audit log; the agent has its outcome


def test_a_test_mode_notification_is_never_changed_by_a_report(texted, twilio):
    """Test keys text nobody: no report can be about their messages, even one naming the id."""
    api, key, pause_id, sid = texted
    test_key = api.register(email="t@example.com")["test_api_key"]
    api.create_pause(test_key)
    api.step("notifications")
    stored(api.config, "UPDATE notifications SET provider_message_id = ? WHERE livemode = 0", "SM" + "e" * 32)
    twilio.messages.append({**twilio.messages[0], "sid": "SM" + "e" * 32})
    report(api, twilio, "SM" + "e" * 32, "undelivered", 30003)
    assert stored(api.config, "SELECT status FROM notifications WHERE livemode = 0") == [("simulated",)]
    assert told(api) == (0, 0)


def test_reports_are_refused_when_twilio_is_not_configured(api):
    answer = api.post(STATUS_PATH, {"MessageSid": "SM" + "0" * 32, "MessageStatus": "failed"},
                      headers={"X-Twilio-Signature": "x"}, expect_errors=True)
    assert answer.status_code == 403 and answer.json["error"]["code"] == "twilio_not_configured"
    assert "takes no delivery reports" in answer.json["error"]["message"]


def test_the_agent_is_told_when_the_last_text_that_may_have_reached_the_person_fails(running_api, twilio):
    """The reminder repeats the question and its code: while it may have reached the person,
    the question's failing tells the agent nothing; once it fails too, the agent is told."""
    api = running_api(**twilio.settings(), **{"server.base_url": BASE_URL})
    key = api.register()["api_key"]
    pause_id = api.post_json("/v1/pause", {**WIRE, "remind_after_minutes": [30]}, headers=api.as_key(key)).json[
        "pause_id"]
    api.step("notifications")
    stored(api.config, "UPDATE pause_steps SET due_at = ?", pausepoint.db_time())
    api.step("steps")
    api.step("notifications")
    ask, reminder = (message["sid"] for message in twilio.messages)
    report(api, twilio, ask, "undelivered", 30003)
    assert told(api) == (1, 0)
    report(api, twilio, reminder, "undelivered", 30003)
    assert stored(api.config, "SELECT kind, status FROM notifications ORDER BY created_at, kind") == [
        ("ask", "failed"), ("reminder", "failed")]
    assert told(api) == (2, 1) and api.pause(key, pause_id)["status"] == "pending"


def test_a_reminder_to_a_number_that_never_took_the_question_tells_the_agent_nothing_new(running_api, twilio):
    """The question was reported undelivered and the agent told; the reminder fails as it
    did (the same number): it is in the audit log, and the agent is not told again."""
    api = running_api(**twilio.settings(), **{"server.base_url": BASE_URL})
    key = api.register()["api_key"]
    api.post_json("/v1/pause", {**WIRE, "remind_after_minutes": [30, 60]}, headers=api.as_key(key))
    api.step("notifications")
    report(api, twilio, twilio.messages[0]["sid"], "undelivered", 30003)
    assert told(api) == (1, 1)
    for reminder in (1, 2):
        stored(api.config, "UPDATE pause_steps SET due_at = ? WHERE id = (SELECT min(id) FROM pause_steps"
                           " WHERE status = 'scheduled')", pausepoint.db_time())
        api.step("steps")
        api.step("notifications")
        report(api, twilio, twilio.messages[reminder]["sid"], "failed", 30003)
    assert told(api) == (3, 1)


def test_a_reminder_reported_undelivered_after_the_question_could_not_be_sent_tells_the_agent_nothing_new(
        running_api, twilio):
    api = running_api(**twilio.settings(), **{"server.base_url": BASE_URL})
    key = api.register()["api_key"]
    api.post_json("/v1/pause", {**WIRE, "remind_after_minutes": [30]}, headers=api.as_key(key))
    twilio.fail_next = [400]                # Twilio refuses the question: failed for good, and the agent told
    api.step("notifications")
    assert told(api) == (1, 1)
    stored(api.config, "UPDATE pause_steps SET due_at = ?", pausepoint.db_time())
    api.step("steps")
    api.step("notifications")
    report(api, twilio, twilio.messages[-1]["sid"], "undelivered", 30003)
    assert stored(api.config, "SELECT kind, status FROM notifications ORDER BY kind") == [
        ("ask", "failed"), ("reminder", "failed")]
    assert told(api) == (2, 1)


def reply(api, twilio, body):
    """A signed text from the pause's number, as Twilio posts it to the inbound route."""
    form = {"From": WIRE["recipient"], "To": "+15559990000", "Body": body, "MessageSid": "SM" + uuid.uuid4().hex}
    signature = RequestValidator(twilio.auth_token).compute_signature(BASE_URL + "/v1/twilio/inbound", form)
    return api.post("/v1/twilio/inbound", form, headers={"X-Twilio-Signature": signature}).text


def test_a_reply_counts_for_a_text_reported_undelivered_only_once_it_is_reported_delivered_too(texted, twilio):
    api, key, pause_id, sid = texted
    report(api, twilio, sid, "undelivered", 30003)
    assert "no open request" in reply(api, twilio, "1")
    report(api, twilio, sid, "delivered")
    assert "recorded Approve" in reply(api, twilio, "1")
    assert api.pause(key, pause_id)["choice"] == "Approve"


@pytest.mark.parametrize("word", ["undelivered", "failed"])
def test_a_reply_with_its_code_counts_for_a_text_reported_not_delivered(texted, twilio, word):
    """The code came only in that text: whoever replies with it from the number read it,
    whatever the carrier said."""
    api, key, pause_id, sid = texted
    report(api, twilio, sid, word, 30003)
    [(code,)] = stored(api.config, "SELECT reply_code FROM pauses WHERE id = ?", pause_id)
    assert "recorded Approve" in reply(api, twilio, f"{code} 1")
    assert api.pause(key, pause_id)["choice"] == "Approve"


@pytest.mark.parametrize("decided", [False, True], ids=["still open", "cancelled since"])
def test_a_bare_reply_decides_nothing_while_a_text_reported_undelivered_may_be_the_one_it_answers(
        running_api, twilio, decided):
    """A carrier's word can be wrong (Twilio may say 'delivered' after it): the person may have
    read the text reported undelivered, and their bare '1' may answer it, not the other pause."""
    api = running_api(**twilio.settings(), **{"server.base_url": BASE_URL})
    key = api.register()["api_key"]
    first, second = (api.create_pause(key)["pause_id"] for _ in range(2))
    api.step("notifications")
    [(second_sid,)] = stored(api.config, "SELECT provider_message_id FROM notifications WHERE pause_id = ?", second)
    report(api, twilio, second_sid, "undelivered", 30008)        # the texts may go out in either order
    if decided:
        api.post(f"/v1/pause/{second}/cancel", headers=api.as_key(key))
    assert "could be meant for another request" in reply(api, twilio, "1")
    assert api.pause(key, first)["status"] == "pending"
    [(code,)] = stored(api.config, "SELECT reply_code FROM pauses WHERE id = ?", first)
    assert "recorded Approve" in reply(api, twilio, code + " 1")


def test_a_failure_reported_before_twilio_answers_the_send_fails_the_text_once_it_is_recorded(running_api, twilio):
    """Twilio may post a text's report before its answer to the send reaches the server, when
    the text's id is not stored yet: the report waits for the send's record, and is not lost."""
    api = running_api(**twilio.settings(), **{"server.base_url": BASE_URL})
    key = api.register()["api_key"]
    pause_id = api.create_pause(key)["pause_id"]
    answers = []
    twilio.before_answer = [lambda sid: answers.append(report(api, twilio, sid, "undelivered", 30003).status_code)]
    api.step("notifications")
    assert answers == [204]
    notification = api.pause(key, pause_id)["notification"]
    assert notification["status"] == "failed" and notification["provider_message_id"] == twilio.messages[0]["sid"]
    assert notification["last_error"].startswith("Twilio reported the text undelivered (error 30003)")
    assert told(api) == (1, 1)
    report(api, twilio, twilio.messages[0]["sid"], "undelivered", 30003)       # again, now on time
    assert told(api) == (1, 1)


def test_a_report_posted_again_and_again_about_a_text_no_send_claims_is_kept_once(texted, twilio):
    """Whoever saw a signed report can post it again: each time it would wait for a send, a row more."""
    api, key, pause_id, sid = texted
    twilio.messages.append({**twilio.messages[0], "sid": "SM" + "f" * 32})
    for status in ("failed", "failed", "delivered", "failed", "delivered"):
        assert report(api, twilio, "SM" + "f" * 32, status, 30003).status_code == 204
    assert stored(api.config, "SELECT message_sid, reported FROM early_delivery_reports ORDER BY seq") == [
        ("SM" + "f" * 32, "failed"), ("SM" + "f" * 32, "delivered")]


def test_a_report_no_send_claims_is_kept_a_day_and_then_pruned(texted, twilio):
    api, key, pause_id, sid = texted
    twilio.messages.append({**twilio.messages[0], "sid": "SM" + "f" * 32})      # a send whose record was lost
    report(api, twilio, "SM" + "f" * 32, "failed", 30003)
    assert stored(api.config, "SELECT message_sid, reported FROM early_delivery_reports") == [("SM" + "f" * 32, "failed")]
    db, now = api.app.runtime.db(), pausepoint.utcnow()
    assert pausepoint.prune_expired_data(db, api.config, now=now)["early delivery reports"] == 0
    pruned = pausepoint.prune_expired_data(db, api.config, now=now + pausepoint.dt.timedelta(days=1, seconds=1))
    assert pruned["early delivery reports"] == 1 and stored(api.config, "SELECT * FROM early_delivery_reports") == []


@pytest.mark.parametrize("error_code", ["²", "9" * 5000], ids=["superscript two", "5000 digits"])
def test_an_error_code_that_is_not_a_number_fails_the_text_without_one(texted, twilio, error_code):
    api, key, pause_id, sid = texted
    assert report(api, twilio, sid, "undelivered", error_code).status_code == 204
    assert api.pause(key, pause_id)["notification"]["last_error"] == "Twilio reported the text undelivered"
    assert told(api) == (1, 1)


def test_an_early_report_with_an_odd_error_code_does_not_stop_the_send_being_recorded(running_api, twilio):
    api = running_api(**twilio.settings(), **{"server.base_url": BASE_URL})
    key = api.register()["api_key"]
    pause_id = api.create_pause(key)["pause_id"]
    twilio.before_answer = [lambda sid: report(api, twilio, sid, "failed", "²")]
    api.step("notifications")
    notification = api.pause(key, pause_id)["notification"]
    assert (notification["status"], notification["last_error"]) == ("failed", "Twilio reported the text failed")
    assert notification["provider_message_id"] == twilio.messages[0]["sid"] and told(api) == (1, 1)
