import concurrent.futures
import contextlib
import datetime as dt
import threading

import pytest
import requests

from conftest import WIRE, stored, wait_until
from stubs import StallingReceiver, Tarpit
import pausepoint


@pytest.fixture
def sms_api(running_api, twilio):
    return running_api(**twilio.settings())


def test_a_live_sms_pause_is_sent_through_twilio_off_the_request_path(sms_api, twilio):
    key = sms_api.register()["api_key"]
    created = sms_api.create_pause(key)
    assert sms_api.pause(key, created["pause_id"])["notification"]["status"] == "queued" and twilio.messages == []
    sms_api.step("notifications")
    pause = sms_api.pause(key, created["pause_id"])
    assert pause["notification"]["status"] == "sent" and len(twilio.messages) == 1
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
    sms_api.step("notifications")
    assert sms_api.pause(key, created["pause_id"])["notification"]["status"] == "simulated"
    assert twilio.messages == []


def test_a_failed_send_is_recorded_and_queued_again_while_the_pause_stays_pending(sms_api, twilio):
    twilio.fail_next = [500]
    key = sms_api.register()["api_key"]
    created = sms_api.create_pause(key)
    sms_api.step("notifications")
    pause = sms_api.pause(key, created["pause_id"])
    assert pause["status"] == "pending" and pause["notification"]["attempts"] == 1
    assert pause["notification"]["status"] == "queued"
    assert "HTTP 500" in pause["notification"]["last_error"]
    assert twilio.messages == []


def test_a_hung_mail_server_never_delays_sms(spawn_server, tmp_path, twilio):
    tarpit = Tarpit()                   # accepts, never greets: every email send waits out its deadline
    try:
        env = {f"PAUSEPOINT_{key.replace('.', '_').upper()}": str(value) for key, value in twilio.settings().items()}
        env.update(PAUSEPOINT_SMTP_HOST="127.0.0.1", PAUSEPOINT_SMTP_PORT=str(tarpit.port),
                   PAUSEPOINT_SMTP_SECURITY="none", PAUSEPOINT_SMTP_FROM_ADDRESS="approvals@example.org",
                   PAUSEPOINT_OUTBOUND_DEADLINE_SECONDS="3")
        server = spawn_server(env=env)
        keys = requests.post(f"{server.url}/v1/auth/register",
                             json={"email": "m@example.com", "name": "M", "password": "password123"}).json()
        auth = {"Authorization": f"Bearer {keys['api_key']}"}
        for n in range(12):
            requests.post(f"{server.url}/v1/pause", headers=auth,
                          json={**WIRE, "channel": "email", "recipient": f"person{n}@example.com"}).raise_for_status()
        db = {"database.path": str(tmp_path / "pausepoint.db")}
        stuck = "SELECT count(*) FROM notifications WHERE channel = 'email' AND status = 'sending'"
        wait_until(lambda: stored(db, stuck) == [(8,)])         # half of outbound.workers, no more
        sms = requests.post(f"{server.url}/v1/pause", json=WIRE, headers=auth).json()
        wait_until(lambda: len(twilio.messages) == 1, timeout=5)
        # Sent while every email claim is still waiting on the mail server.
        assert stored(db, stuck) == [(8,)]
        assert stored(db, "SELECT count(*) FROM notifications WHERE channel = 'email' AND last_error IS NOT NULL") == [(0,)]
        assert twilio.messages[0]["Body"].startswith(f"\"{WIRE['message']}\"\n")
        assert sms["pause_id"]
        # Each email attempt ends at its deadline and is retried later.
        wait_until(lambda: stored(db, "SELECT count(*) FROM notifications WHERE last_error LIKE '%no answer within 3 s%'")
                   [0][0] >= 8)
    finally:
        tarpit.close()


def test_a_send_and_a_delivery_a_kill_cut_short_are_taken_up_again_just_after_the_next_start(spawn_server, tmp_path):
    """Their claims would hold them for minutes (a crash's claim cannot be told from a slow
    call's): a start, the only server on its database, knows every claim left is a crash's."""
    tarpit, stalling = Tarpit(), StallingReceiver()     # a mail server and a receiver that never finish
    try:
        env = {"PAUSEPOINT_SMTP_HOST": "127.0.0.1", "PAUSEPOINT_SMTP_PORT": str(tarpit.port),
               "PAUSEPOINT_SMTP_SECURITY": "none", "PAUSEPOINT_SMTP_FROM_ADDRESS": "approvals@example.org",
               "PAUSEPOINT_WEBHOOKS_ALLOW_PRIVATE": "true"}
        server = spawn_server(env=env)
        keys = requests.post(f"{server.url}/v1/auth/register",
                             json={"email": "k@example.com", "name": "K", "password": "password123"}).json()
        auth = {"Authorization": f"Bearer {keys['api_key']}"}
        requests.post(f"{server.url}/v1/webhooks", headers=auth,
                      json={"url": stalling.url, "events": ["pause.created"]}).raise_for_status()
        requests.post(f"{server.url}/v1/pause", headers=auth,
                      json={**WIRE, "channel": "email", "recipient": "person@example.com"}).raise_for_status()
        db = {"database.path": str(tmp_path / "pausepoint.db")}
        claimed = ("SELECT (SELECT status FROM notifications), (SELECT status FROM webhook_deliveries),"
                   " (SELECT last_error FROM notifications), (SELECT count(*) FROM webhook_attempts)")
        wait_until(lambda: stored(db, claimed) == [("sending", "delivering", None, 0)])
        server.proc.kill()
        server.proc.wait()
        spawn_server(env=env)
        wait_until(lambda: stored(db, claimed)[0][2:] == (pausepoint.INTERRUPTED_SEND, 1), timeout=8)
        assert stored(db, "SELECT error FROM webhook_attempts") == [(pausepoint.INTERRUPTED,)]
    finally:
        tarpit.close()
        stalling.close()


def claimed_behind_a_long_write(runtime, claim, meanwhile=lambda: None):
    """claim(conn), made while a long write holds the write lock: it waits its turn, the
    clock moves on a tick (and meanwhile() runs), then the lock is let go. Its answer."""
    def claim_it():
        with contextlib.closing(runtime.connect(128)) as conn:
            return claim(conn)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with runtime.write_lock:
            claimed = pool.submit(claim_it)
            wait_until(runtime.write_lock.waiting)      # the claim is made and waits its turn to write
            tick = pausepoint.db_time()
            wait_until(lambda: pausepoint.db_time() > tick, interval=0)
            meanwhile()
        return claimed.result()


def test_a_text_whose_pause_runs_out_while_its_claim_waits_for_the_write_lock_is_not_sent(sms_api, twilio):
    key = sms_api.register()["api_key"]
    created = sms_api.create_pause(key)
    [row] = sms_api.app.runtime.db().execute("SELECT * FROM notifications").fetchall()

    def run_out():                                      # a clock tick after the claim was made
        ran_out = pausepoint.db_time()
        stored(sms_api.config, "UPDATE pauses SET expires_at = ? WHERE id = ?", ran_out, created["pause_id"])
        wait_until(lambda: pausepoint.db_time() > ran_out, interval=0)

    assert claimed_behind_a_long_write(
        sms_api.app.runtime, lambda conn: pausepoint.claim_notification(conn, sms_api.config, row), run_out) is None
    assert stored(sms_api.config, "SELECT status, attempts FROM notifications") == [("queued", 0)]
    sms_api.step("notifications")
    sms_api.step("timeouts")
    assert twilio.messages == [] and sms_api.pause(key, created["pause_id"])["notification"]["status"] == "cancelled"


def test_a_claim_that_waited_for_the_write_lock_lasts_its_whole_length_from_when_it_was_written(
        running_api, twilio, receiver):
    """Measured from before the wait, a claim that waited longer than its length would be
    written lapsed: the next round would take its send or delivery for a crash's, and make it
    again while the first was still under way."""
    api = running_api(**twilio.settings(), **{"webhooks.allow_private": True})
    key = api.register()["api_key"]
    api.post_json("/v1/webhooks", {"url": receiver.url, "events": ["pause.created"]}, headers=api.as_key(key))
    api.create_pause(key)
    length = max(pausepoint.DELIVERY_CLAIM_SECONDS, 3 * api.config["outbound.deadline_seconds"])
    [send] = api.app.runtime.db().execute("SELECT * FROM notifications").fetchall()
    [delivery] = api.app.runtime.db().execute("SELECT * FROM webhook_deliveries").fetchall()
    for claim, table, seconds in (
            (lambda conn: pausepoint.claim_notification(conn, api.config, send), "notifications",
             max(pausepoint.NOTIFICATION_CLAIM_SECONDS, 3 * api.config["outbound.deadline_seconds"])),
            (lambda conn: pausepoint.claim_delivery(conn, api.config, delivery), "webhook_deliveries", length)):
        until = claimed_behind_a_long_write(api.app.runtime, claim)
        [(written, lapses)] = stored(api.config, f"SELECT updated_at, next_attempt_at FROM {table}")
        assert until == lapses
        lasts = pausepoint.parse_db_time(lapses) - pausepoint.parse_db_time(written)
        assert lasts == dt.timedelta(seconds=seconds)


def test_a_send_or_delivery_still_under_way_when_its_claim_runs_out_is_neither_cut_short_nor_made_again(
        running_api, twilio, receiver):
    """A claim runs out by the wall clock, which may step past it while the call is still under
    way (a clock set forward, a virtual machine resumed): the server that holds it is still
    making it, and the next rounds leave it be, rather than record it as a crash's and make it
    again. Its outcome, when it comes, is the one recorded."""
    api = running_api(**twilio.settings(), **{"webhooks.allow_private": True})
    runtime, key = api.app.runtime, api.register()["api_key"]
    api.post_json("/v1/webhooks", {"url": receiver.url, "events": ["pause.created"]}, headers=api.as_key(key))
    api.create_pause(key)
    arrived, answer = threading.Semaphore(0), threading.Event()

    def hold(_):
        arrived.release()
        answer.wait(30)
    twilio.before_answer.append(hold)
    receiver.before_answer.append(hold)
    assert runtime.run_notifications() == 1 and runtime.run_webhooks() == 1
    assert arrived.acquire(timeout=10) and arrived.acquire(timeout=10)        # both calls under way
    claims = {table: stored(api.config, f"SELECT next_attempt_at FROM {table}")[0][0]
              for table in ("notifications", "webhook_deliveries")}
    lapsed = pausepoint.db_time(pausepoint.utcnow() - dt.timedelta(seconds=1))
    for table in claims:                        # as the clock reads them once it has stepped past them
        stored(api.config, f"UPDATE {table} SET next_attempt_at = ?", lapsed)
    runtime.run_notifications()
    runtime.run_webhooks()
    assert stored(api.config, "SELECT status, attempts, last_error FROM notifications") == [("sending", 1, None)]
    assert stored(api.config, "SELECT status, attempts FROM webhook_deliveries") == [("delivering", 1)]
    assert stored(api.config, "SELECT count(*) FROM webhook_attempts") == [(0,)]
    for table, until in claims.items():         # and the clock back where it was
        stored(api.config, f"UPDATE {table} SET next_attempt_at = ?", until)
    answer.set()
    assert runtime.outbound.wait_idle(30)
    assert stored(api.config, "SELECT status, attempts, last_error, may_have_reached FROM notifications") == [
        ("sent", 1, None, 0)]
    assert stored(api.config, "SELECT d.status, a.attempt, a.error FROM webhook_deliveries d JOIN webhook_attempts a"
                              " ON a.delivery_id = d.id") == [("succeeded", 1, None)]
    assert len(twilio.messages) == 1 and len(receiver.calls) == 1
