import pytest

from conftest import Api, make_config, wait_until
import pausepoint


@pytest.fixture
def sms_api(tmp_path, twilio):
    app = pausepoint.create_app(make_config(tmp_path, **twilio.settings()))
    app.runtime.start()
    yield Api(app)
    app.runtime.stop()


def test_a_live_sms_pause_is_sent_through_twilio_off_the_request_path(sms_api, twilio):
    key = sms_api.register()["api_key"]
    created = sms_api.create_pause(key)
    pause = wait_until(lambda: (p := sms_api.pause(key, created["pause_id"]))["notification"]["status"] == "sent" and p)
    assert len(twilio.messages) == 1
    message = twilio.messages[0]
    assert message["To"] == "+15550100" and message["From"] == "+15559990000"
    assert message["Body"] == pause["notification"]["text"] and created["respond_url"] in message["Body"]
    assert pause["notification"]["provider_message_id"] == message["sid"]
    assert pause["notification"]["attempts"] == 1
    sent = sms_api.get("/v1/audit", {"event_type": "notification.sent"}, headers=sms_api.as_key(key)).json["events"]
    assert sent[0]["data"]["provider_message_id"] == message["sid"]


def test_test_keys_never_reach_twilio(sms_api, twilio):
    key = sms_api.register()["test_api_key"]
    created = sms_api.create_pause(key)
    wait_until(lambda: sms_api.pause(key, created["pause_id"])["notification"]["status"] == "simulated")
    assert twilio.messages == []


def test_a_failed_send_is_recorded_and_queued_again_while_the_pause_stays_pending(sms_api, twilio):
    twilio.fail_next = [500]
    key = sms_api.register()["api_key"]
    created = sms_api.create_pause(key)
    pause = wait_until(lambda: (p := sms_api.pause(key, created["pause_id"]))["notification"]["attempts"] == 1
                       and p["notification"]["last_error"] and p)
    assert pause["status"] == "pending"
    assert pause["notification"]["status"] == "queued"
    assert "HTTP 500" in pause["notification"]["last_error"]
    assert twilio.messages == []
