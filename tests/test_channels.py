"""Notification channels against real loopback peers: Twilio's API, an SMTP server, an Apprise target."""

import asyncio
import concurrent.futures
import datetime as dt
import email
import email.policy
import json
import re
import ssl
import subprocess
import time
import urllib.parse
import uuid
import xml.etree.ElementTree

import bs4
import pytest
import requests
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from twilio.request_validator import RequestValidator

from stubs import HostedService, RefusingProxy, TrickleReceiver, WebhookReceiver
from conftest import (stored, QUESTION, WIRE, Api, LiveServer, free_port, make_config, run_out, scraped, token_of,
                      value, wait_until)
import pausepoint

XSS = '<script>alert(1)</script>'


class Mailbox:
    """aiosmtpd handler keeping every message it is handed. It answers the next recipients
    and messages with what is put in refuse_recipients and refuse_messages, waits
    answer_late seconds before answering a message it kept, and answers QUIT with
    quit_answer."""

    def __init__(self):
        self.messages = []
        self.refuse_recipients, self.refuse_messages = [], []
        self.answer_late, self.quit_answer = 0, "221 Bye"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse_recipients:
            return self.refuse_recipients.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.refuse_messages:
            return self.refuse_messages.pop(0)
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        await asyncio.sleep(self.answer_late)
        return "250 OK"

    async def handle_QUIT(self, server, session, envelope):
        return self.quit_answer


@pytest.fixture
def smtp_server():
    mailbox = Mailbox()
    mailbox.port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=mailbox.port)
    controller.start()
    yield mailbox
    controller.stop()


def skip_the_backoff(config):
    stored(config, "UPDATE notifications SET next_attempt_at = ? WHERE status = 'queued'", pausepoint.db_time())


def sent(api, key, pause_id, status="sent"):
    """Run the send job once; the pause, whose notification must now be in `status`."""
    api.step("notifications")
    pause = api.pause(key, pause_id)
    assert pause["notification"]["status"] == status, pause["notification"]
    return pause



# -- SMS and WhatsApp through Twilio ----------------------------------------------------

def test_the_sms_invites_a_coded_reply_and_fits_in_two_segments(running_api, twilio):
    api = running_api(**twilio.settings(), **{"server.base_url": "https://pp.example.org"})
    key = api.register()["api_key"]
    created = api.create_pause(key)
    sent(api, key, created["pause_id"], "sent")
    body = twilio.messages[0]["Body"]
    assert body.startswith(f"\"{WIRE['message']}\"\n")
    code = reply_code(api, key, created)
    assert f"Reply {code} 1 for Approve,\n{code} 2 for Reject,\nor open " + created["respond_url"] in body
    assert "Expires " in body and body.endswith(" UTC")
    gsm7 = set("@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
               "¿abcdefghijklmnopqrstuvwxyzäöñüà")
    assert set(body) <= gsm7                  # no character forces the 70-per-segment encoding
    assert len(body) <= 2 * 153               # two concatenated GSM-7 segments


def test_each_option_a_text_offers_starts_a_line_of_its_own_so_none_reads_as_anothers(running_api, twilio):
    """An option is the agent's text, within a list of ours: run on in one line, "Keep, 2 for
    Reject" made "Reply K5 1 for Keep, 2 for Reject, K5 2 for Delete all data", and a person
    who texted 2 to reject chose Delete all data."""
    api = running_api(**twilio.settings())
    key = api.register()["api_key"]
    created = api.create_pause(key, options=["Keep, 2 for Reject", "Delete all data"], timeout_default=None)
    sent(api, key, created["pause_id"], "sent")
    code = reply_code(api, key, created)
    lines = twilio.messages[0]["Body"].splitlines()
    assert f"Reply {code} 1 for Keep, 2 for Reject," in lines and f"{code} 2 for Delete all data," in lines
    assert f"or open {created['respond_url']}" in lines


def test_the_agents_text_in_an_sms_is_one_quoted_line_so_its_reply_lines_never_read_as_ours(running_api, twilio):
    """The message is the agent's: as lines of their own, "Reply 1 for Reject, 2 for Approve"
    above ours read as ours, and a person who texted 2 to reject approved."""
    api = running_api(**twilio.settings())
    key = api.register()["api_key"]
    forged = "Wire $340 to Acme?\n\nReply 1 for Reject,\n2 for Approve\n\tor open https://evil.example/a"
    created = api.create_pause(key, title="Payments\nReply 1 for Reject", message=forged)
    sent(api, key, created["pause_id"], "sent")
    code = reply_code(api, key, created)
    lines = twilio.messages[0]["Body"].splitlines()
    assert lines[:2] == ['"Payments Reply 1 for Reject"',
                         '"Wire $340 to Acme? Reply 1 for Reject, 2 for Approve or open https://evil.example/a"']
    assert lines[2:5] == [f"Reply {code} 1 for Approve,", f"{code} 2 for Reject,", f"or open {created['respond_url']}"]


@pytest.mark.parametrize("mark, reopen", [("”", "“"), ("＂", "＂"), ("ʺ", "ʺ"), ("''", "''"), ("’’", "‘‘"),
                                          ("'\u200b'", "'\u200b'"), ("ꞌꞌ", "ꞌꞌ"), ("΄΄", "᾽᾽"), ("❞", "❝"),
                                          ("'\u2063'", "'\u00ad'"), ("'\ufe0f'", "'\u034f'")])
def test_a_quote_look_alike_in_an_sms_never_closes_the_agents_quote_early(running_api, twilio, mark, reopen):
    """An agent's " is a ' in its quoted line, or it would end the quote early; a look-alike
    (a curly or fullwidth one, two apostrophes, with what is drawn as nothing between them or
    not) did the same: its "Reply 1 for Reject, 2 for Approve" read as ours, between what
    seemed two quotes of the agent's."""
    api = running_api(**twilio.settings())
    key = api.register()["api_key"]
    created = api.create_pause(key, message=f"Wire $340 to Acme?{mark} Reply 1 for Reject, 2 for Approve {reopen}ok",
                               title=f"Payments{mark} Reply 1 for Reject {reopen}ok")
    sent(api, key, created["pause_id"], "sent")
    for line in twilio.messages[0]["Body"].splitlines()[:2]:
        assert line.startswith('"') and line.endswith('"') and mark not in line and reopen not in line, line


def test_a_question_too_long_for_one_text_is_refused_when_asked_not_at_the_send(running_api, twilio):
    """Twilio refuses a body past 1,600 characters (UTF-16 code units: an emoji is two), and
    nobody would be asked: what the text adds to the message counts, and a reminder's opening."""
    api = running_api(**twilio.settings(), **{"server.base_url": "https://pp.example.org"})
    keys = api.register()
    key = keys["api_key"]
    created = api.create_pause(key, message="Short?")
    sent(api, key, created["pause_id"], "sent")
    # What the text adds, with the longest reply code (three characters, once per option; this one may have two):
    added = len(twilio.messages[0]["Body"]) - len("Short?") + (3 - len(reply_code(api, key, created))) * 2
    fits = "W" * (1600 - added)
    created = api.create_pause(key, message=fits)
    sent(api, key, created["pause_id"], "sent")
    assert len(twilio.messages[-1]["Body"].encode("utf-16-le")) // 2 <= 1600
    for message, more in ((fits + "W", {}), (fits[:-1] + "\U0001F4B8", {}), (fits, {"remind_after_minutes": [30]})):
        error = api.post_json("/v1/pause", {**WIRE, "message": message, **more}, headers=api.as_key(key),
                              status=422).json["error"]
        assert error["field"] == "message" and "a text holds 1600: shorten the message by " in error["message"]
    emailed = api.create_pause(keys["test_api_key"], message=fits + "W", channel="email", recipient="ada@example.com")
    assert emailed["status"] == "pending"
    assert stored(api.config, "SELECT count(*) FROM pauses") == [(3,)]


@pytest.mark.parametrize("sender, replies", [("PausePoint", False), ("12345", True)])
def test_texts_from_a_sender_id_offer_only_the_link_and_whatsapp_needs_a_number(running_api, twilio, sender,
                                                                                  replies):
    """Nobody can text back a sender ID (a two-way short code takes replies), and WhatsApp
    sends only from a number."""
    api = running_api(**{**twilio.settings(), "twilio.from_number": sender})
    key = api.register()["api_key"]
    created = api.create_pause(key)
    sent(api, key, created["pause_id"], "sent")
    message = twilio.messages[0]
    assert message["From"] == sender and message["Body"].count("Reply ") == replies
    assert f"\n{'Reply' if replies else 'Approve / Reject: open'} " in message["Body"]
    assert created["respond_url"] in message["Body"]
    error = api.post_json("/v1/pause", {**WIRE, "channel": "whatsapp"}, headers=api.as_key(key), status=422).json["error"]
    assert error["code"] == "channel_not_configured" and "twilio.from_number as a WhatsApp-enabled number" in (
        error["message"])


def test_whatsapp_goes_through_twilio_with_the_whatsapp_prefix(running_api, twilio):
    api = running_api(**twilio.settings())
    key = api.register()["api_key"]
    created = api.create_pause(key, channel="whatsapp")
    pause = sent(api, key, created["pause_id"], "sent")
    message = twilio.messages[0]
    assert message["To"] == "whatsapp:+15550100" and message["From"] == "whatsapp:+15559990000"
    assert pause["notification"]["provider_message_id"] == message["sid"]


def test_a_messaging_service_can_send_instead_of_a_number(running_api, twilio):
    settings = {**twilio.settings(), "twilio.from_number": "", "twilio.messaging_service_sid": "MG" + "1" * 32}
    api = running_api(**settings)
    key = api.register()["api_key"]
    sent(api, key, api.create_pause(key)["pause_id"], "sent")
    assert twilio.messages[0]["MessagingServiceSid"] == "MG" + "1" * 32 and "From" not in twilio.messages[0]


def test_transient_failures_are_retried_with_backoff_and_the_third_failure_is_final(running_api, twilio):
    twilio.fail_next = [503, 503, 503]
    api = running_api(**twilio.settings())
    config = api.config
    key = api.register()["api_key"]
    pause_id = api.create_pause(key)["pause_id"]
    for attempts, backoff in zip((1, 2), pausepoint.NOTIFICATION_BACKOFF_SECONDS):
        sent(api, key, pause_id, "queued")          # failed, and queued again after a backoff
        [(tried, next_at, error)] = stored(config, "SELECT attempts, next_attempt_at, last_error FROM notifications")
        wait = (pausepoint.parse_db_time(next_at) - pausepoint.utcnow()).total_seconds()
        assert tried == attempts and backoff - 2 < wait <= backoff and "HTTP 503" in error
        api.step("notifications")
        assert stored(config, "SELECT attempts FROM notifications") == [(attempts,)]      # not before it is due
        skip_the_backoff(config)
    pause = sent(api, key, pause_id, "failed")
    assert pause["status"] == "pending"                # the agent decides what to do
    failed = api.get("/v1/audit", {"event_type": "notification.failed"}, headers=api.as_key(key)).json["events"]
    assert failed[0]["data"]["attempts"] == 3
    assert twilio.messages == []


@pytest.mark.parametrize("left", ["queued", "sending"], ids=["a send that failed as it was decided", "a lost claim"])
def test_a_text_whose_pause_was_decided_while_it_was_sent_is_cancelled_not_sent_again(running_api, twilio, left):
    api = running_api(**twilio.settings())
    key = api.register()["api_key"]
    created = api.create_pause(key)
    api.post(f"/v1/pause/{created['pause_id']}/cancel", headers=api.as_key(key))
    # What a race leaves: a decision cancels the texts still queued, not one being sent, which
    # its failure then queues again (or a crash leaves claimed), due by now.
    stored(api.config, "UPDATE notifications SET status = ?, next_attempt_at = '2000-01-01T00:00:00.000Z'", left)
    pause = sent(api, key, created["pause_id"], "cancelled")
    assert pause["status"] == "cancelled" and twilio.messages == []


def test_a_send_that_fails_after_its_pause_was_decided_ends_cancelled_and_tells_no_one_it_failed(running_api,
                                                                                                   twilio):
    """The decision came while the text was on its way: the agent has its answer, and no
    pause.notification_failed after it."""
    api = running_api(**twilio.settings(), **{"metrics.enabled": True, "metrics.listen": ""})
    key = api.register()["api_key"]
    created = api.create_pause(key)
    conn = api.app.runtime.db()
    [row] = conn.execute("SELECT * FROM notifications").fetchall()
    claim_until = pausepoint.claim_notification(conn, api.config, row)
    api.post(f"/v1/pause/{created['pause_id']}/cancel", headers=api.as_key(key))
    pausepoint.record_send(conn, api.config, row, claim_until, 1, (None, "no answer", False, True))
    assert stored(api.config, "SELECT status, may_have_reached FROM notifications") == [("cancelled", 1)]
    assert stored(api.config, "SELECT count(*) FROM audit_events WHERE event_type = 'notification.failed'") == [(0,)]
    assert stored(api.config, "SELECT count(*) FROM webhook_events WHERE type = 'pause.notification_failed'") == [(0,)]
    samples = scraped(api.get("/metrics").text)
    assert value(samples, "pausepoint_notification_attempts_total", channel="sms", result="cancelled") == 1


def test_a_text_to_a_team_member_who_voted_while_it_was_sent_is_cancelled_not_sent_again(running_api, twilio):
    api = running_api(**twilio.settings())
    key = api.register()["api_key"]
    team = [{"recipient": "+15550101", "channel": "sms"}, {"recipient": "+15550102", "channel": "sms"}]
    created = api.post_json("/v1/pause", {**QUESTION, "recipients": team, "quorum": {"choice": "Approve", "count": 2}},
                            headers=api.as_key(key)).json
    api.post_json(f"/v1/respond/{token_of(created['recipients'][1]['respond_url'])}", {"choice": "Approve"})
    # As a send that failed as they voted leaves it: queued again, and due.
    stored(api.config, "UPDATE notifications SET status = 'queued', next_attempt_at = '2000-01-01T00:00:00.000Z'"
                       " WHERE position = 1")
    api.step("notifications")
    assert stored(api.config, "SELECT position, status FROM notifications ORDER BY position") == [
        (0, "sent"), (1, "cancelled")]
    assert [m["To"] for m in twilio.messages] == ["+15550101"]
    assert api.pause(key, created["pause_id"])["status"] == "pending"


def test_a_retry_that_succeeds_records_the_message(running_api, twilio):
    twilio.fail_next = [500]
    api = running_api(**twilio.settings())
    key = api.register()["api_key"]
    pause_id = api.create_pause(key)["pause_id"]
    sent(api, key, pause_id, "queued")
    skip_the_backoff(api.config)
    pause = sent(api, key, pause_id, "sent")
    assert pause["notification"]["attempts"] == 2 and pause["notification"]["provider_message_id"].startswith("SM")


# -- email ------------------------------------------------------------------------------

def smtp_settings(mailbox):
    return {"smtp.host": "127.0.0.1", "smtp.port": mailbox.port, "smtp.security": "none",
            "smtp.from_address": "PausePoint <approvals@example.org>"}


def test_email_has_a_subject_naming_the_question_and_plain_and_html_parts(running_api, smtp_server):
    api = running_api(**smtp_settings(smtp_server))
    key = api.register()["api_key"]
    created = api.create_pause(key, channel="email", recipient="ada@example.com",
                               message=f"Delete the staging database? {XSS}")
    pause = sent(api, key, created["pause_id"], "sent")
    [message] = smtp_server.messages
    assert message["Subject"].strip() == f"Approval needed: Delete the staging database? {XSS}"
    assert message["To"] == "ada@example.com" and "approvals@example.org" in message["From"]
    plain = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert created["respond_url"] + "?choice=Approve" in plain
    assert f'href="{created["respond_url"]}?choice=Approve"' in html
    assert f'href="{created["respond_url"]}?choice=Reject"' in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert pause["notification"]["text"].startswith("Subject: Approval needed: ")
    assert pause["notification"]["provider_message_id"] == message["Message-ID"]


def test_an_option_padded_with_spaces_pushes_no_answer_link_out_of_sight_in_the_plain_text(running_api,
                                                                                            smtp_server):
    """An option is the agent's text, on a line of ours: "https://evil.example/a" and 60 spaces
    before its last word showed the agent's address where the line's link seems to be, and
    pushed ours past the right edge of the reader's window."""
    api = running_api(**smtp_settings(smtp_server))
    key = api.register()["api_key"]
    padded = "https://evil.example/a" + " " * 60 + "\u3000 \u2003Approve"
    created = api.create_pause(key, channel="email", recipient="ada@example.com", options=[padded, "Reject"],
                               timeout_default=None)
    sent(api, key, created["pause_id"], "sent")
    plain = smtp_server.messages[0].get_body(("plain",)).get_content()
    link = f"{created['respond_url']}?choice={urllib.parse.quote(padded)}"
    assert f"  https://evil.example/a Approve: {link}" in plain.splitlines()
    assert api.pause(key, created["pause_id"])["options"] == [padded, "Reject"]      # kept as the agent wrote it


def test_an_email_is_dated_when_its_question_was_queued_on_every_attempt(running_api, smtp_server):
    # A Date is one of the two headers every message must have (RFC 5322 3.6); mail servers
    # add none to mail relayed for a client, and spam filters count its absence against it.
    smtp_server.answer_late = 3
    api = running_api(**smtp_settings(smtp_server), **{"outbound.deadline_seconds": 1})
    key = api.register()["api_key"]
    pause_id = api.create_pause(key, channel="email", recipient="ada@example.com")["pause_id"]
    sent(api, key, pause_id, "queued")                  # taken, but answered past the deadline
    smtp_server.answer_late = 0
    skip_the_backoff(api.config)
    api = running_api(**smtp_settings(smtp_server))     # the next attempt on the usual deadline, however busy the machine
    sent(api, key, pause_id, "sent")
    [(queued_at,)] = stored(api.config, "SELECT created_at FROM notifications")
    dates = [message["Date"].datetime for message in smtp_server.messages]
    assert dates == [pausepoint.parse_db_time(queued_at).replace(microsecond=0)] * 2


def test_an_encoded_word_in_the_question_writes_no_header_of_its_own(running_api, smtp_server):
    # Decoded, it is a line break and headers of the agent's choosing in our Subject.
    api = running_api(**smtp_settings(smtp_server))
    key = api.register()["api_key"]
    injected = "=?utf-8?q?x=0D=0AX-Injected=3A_yes=0D=0AReply-To=3A_eve=40evil.example?="
    created = api.create_pause(key, channel="email", recipient="ada@example.com", message=f"Deploy? {injected}")
    sent(api, key, created["pause_id"], "sent")
    [message] = smtp_server.messages
    assert "X-Injected" not in message and "Reply-To" not in message
    assert len(message.get_all("Subject")) == 1 and message["Subject"].startswith("Approval needed: Deploy? ")


@pytest.mark.parametrize("word", ["=?utf-8?q?=E2=80=AEevif?=", "=?utf-8?q?x=0D=0AReply-To=3A_eve=40evil.example?=",
                                  "=?utf-8?b?4oCu?="])
def test_the_subject_a_mail_program_shows_is_the_question_as_written(running_api, smtp_server, word):
    # Sent as it was written, such a word is decoded by the reader's mail program into what
    # the server refuses in a question: a right-to-left override, a line break.
    api = running_api(**smtp_settings(smtp_server))
    key = api.register()["api_key"]
    message = f"Pay invoice {word} for 2 {'€' * 60} now?"
    created = api.create_pause(key, channel="email", recipient="ada@example.com", message=message)
    sent(api, key, created["pause_id"], "sent")
    [mailed] = smtp_server.messages
    assert mailed["Subject"] == pausepoint.email_subject({"message": message})
    assert all(len(line) <= 78 for line in mailed.as_bytes().split(b"\n"))


def test_each_team_member_is_mailed_their_own_link_and_a_reminder_says_what_it_is(running_api, smtp_server):
    api = running_api(**smtp_settings(smtp_server))
    key = api.register()["api_key"]
    team = [{"recipient": "ada@example.com", "channel": "email"}, {"recipient": "bo@example.com", "channel": "email"}]
    created = api.post_json("/v1/pause", {**QUESTION, "recipients": team, "remind_after_minutes": [60]},
                            headers=api.as_key(key)).json
    api.step("notifications")
    stored(api.config, "UPDATE pause_steps SET due_at = ?", pausepoint.db_time())
    api.step("steps")
    api.step("notifications")
    asked, _, reminded, _ = sorted(smtp_server.messages, key=lambda m: (m["Subject"].startswith("Reminder"), m["To"]))
    for message, person in ((asked, created["recipients"][0]), (reminded, created["recipients"][0])):
        assert message["To"] == "ada@example.com"
        assert f'href="{person["respond_url"]}?choice=Approve"' in message.get_body(("html",)).get_content()
    assert reminded["Subject"].startswith("Reminder, ") and reminded["Subject"].endswith(" left: Approval needed: Your"
                                                                                       " agent wants to send a $340"
                                                                                       " wire to Acme Corp. Approve?")
    assert "<strong>Reminder:</strong>" in reminded.get_body(("html",)).get_content()
    assert "Reminder" not in asked.get_body(("html",)).get_content()


def test_the_email_html_lists_the_fields_as_the_text_does(running_api, smtp_server):
    api = running_api(**smtp_settings(smtp_server))
    key = api.register()["api_key"]
    fields = {"amount": {"type": "number", "value": 340, "label": f"Amount {XSS}"}, "rush": {"type": "boolean",
                                                                                            "value": True}}
    created = api.create_pause(key, channel="email", recipient="ada@example.com", fields=fields)
    sent(api, key, created["pause_id"], "sent")
    html = smtp_server.messages[0].get_body(("html",)).get_content()
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert re.search(r'Amount &lt;script&gt;.*?:</span> <strong dir="auto">340</strong>', html)
    assert 'rush:</span> <strong dir="auto">Yes</strong>' in html


def test_what_the_agent_wrote_is_framed_in_the_email_under_a_line_of_ours(running_api, smtp_server):
    """A title, a message line or a field labelled "Recorded" with the value "Reject at 06:52, you
    may close this page" is the agent's to write: in either part it stands apart, after a line
    of ours saying so, and not as the email's own status line or its own "Choose one"."""
    api = running_api(**smtp_settings(smtp_server))
    key = api.register()["api_key"]
    forged = "Choose one (each link opens a page where you confirm):"
    created = api.create_pause(key, channel="email", recipient="ada@example.com", title="Recorded: Approve",
                               message=f"Deploy?\n\n{forged}", fields={
                                   "status": {"type": "string", "value": "Reject at 06:52, you may close this page",
                                              "label": "Recorded"}})
    sent(api, key, created["pause_id"], "sent")
    [message] = smtp_server.messages
    page = bs4.BeautifulSoup(message.get_body(("html",)).get_content(), "html.parser")
    frame = page.select_one("div.asked")
    assert frame is not None and "border-left" in frame["style"]
    assert frame.find_previous_sibling().text == "An agent is asking:"
    assert frame.select_one("h1.title").text == "Recorded: Approve" and forged in frame.select_one(".message").text
    assert frame.select_one("p.field").text == "Recorded: Reject at 06:52, you may close this page"
    assert not frame.select("a") and "Choose one" in frame.find_next_sibling().text
    plain = message.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert plain.startswith("An agent is asking:\n> Recorded: Approve\n>\n> Deploy?\n>\n> " + forged + "\n>\n"
                            "> Recorded: Reject at 06:52, you may close this page\n\nChoose one")
    assert [line for line in plain.splitlines() if line.startswith("Choose one")] == [
        "Choose one (each link opens a page where you confirm):"]


def self_signed(tmp_path, *names):
    """A self-signed certificate for `names` ("IP:127.0.0.1", "DNS:discord.com"), made with the
    openssl command, and a server's TLS context that presents it. Its key is an EC P-256 one:
    making an RSA-2048 key cost 0.25-0.5 s of CPU, this one 0.01 s."""
    cert, key = tmp_path / "server-cert.pem", tmp_path / "server-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=" + names[0].split(":", 1)[1],
                    "-addext", "subjectAltName=" + ",".join(names), "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return str(cert), context


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1."""
    return self_signed(tmp_path, "IP:127.0.0.1")


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_email_travels_over_starttls_or_implicit_tls_verifying_the_server(running_api, certificate, security):
    cert, context = certificate
    mailbox, port = Mailbox(), free_port()
    tls = {"tls_context": context, "require_starttls": True} if security == "starttls" else {"ssl_context": context}
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, **tls)
    controller.start()
    try:
        api = running_api(**{"smtp.host": "127.0.0.1", "smtp.port": port, "smtp.security": security,
                                       "smtp.ca_file": cert, "smtp.from_address": "approvals@example.org"})
        key = api.register()["api_key"]
        created = api.create_pause(key, channel="email", recipient="ada@example.com")
        sent(api, key, created["pause_id"], "sent")
        assert len(mailbox.messages) == 1
    finally:
        controller.stop()


def test_an_smtp_server_with_an_untrusted_certificate_is_refused(running_api, certificate):
    cert, context = certificate
    mailbox, port = Mailbox(), free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True)
    controller.start()
    try:
        api = running_api(**{"smtp.host": "127.0.0.1", "smtp.port": port,
                                       "smtp.from_address": "approvals@example.org"})
        key = api.register()["api_key"]
        pause_id = api.create_pause(key, channel="email", recipient="ada@example.com")["pause_id"]
        pause = sent(api, key, pause_id, "queued")             # to be tried again
        assert "CERTIFICATE_VERIFY_FAILED" in pause["notification"]["last_error"]
        assert mailbox.messages == []
    finally:
        controller.stop()


def test_starttls_against_a_relay_without_tls_says_which_setting_to_change(running_api, smtp_server):
    # smtp.security is left at its default, "starttls"; the relay offers no TLS at all.
    api = running_api(**{**smtp_settings(smtp_server), "smtp.security": "starttls"})
    key = api.register()["api_key"]
    pause_id = api.create_pause(key, channel="email", recipient="ada@example.com")["pause_id"]
    notification = sent(api, key, pause_id, "queued")["notification"]
    assert notification["last_error"] == (
        f"SMTP 127.0.0.1:{smtp_server.port}: STARTTLS extension not supported by server. (smtp.security is"
        ' "starttls"; set it to "tls" for a server that speaks TLS from the start, usually on port 465, or to'
        ' "none" for a relay without TLS)')
    assert smtp_server.messages == [] and notification["may_have_reached"] is False


def test_an_email_button_opens_the_page_without_deciding(running_api, smtp_server):
    api = running_api(**smtp_settings(smtp_server))
    key = api.register()["api_key"]
    created = api.create_pause(key, channel="email", recipient="ada@example.com")
    page = api.get("/respond/" + token_of(created["respond_url"]), {"choice": "Reject"})
    page.mustcontain("You picked <strong>Reject</strong>")
    assert api.pause(key, created["pause_id"])["status"] == "pending"
    page.forms[0].submit("choice", index=1).follow().mustcontain("Recorded: <strong>Reject</strong>")


def test_a_bad_email_recipient_is_422(api, developer):
    error = api.post_json("/v1/pause", {**WIRE, "channel": "email", "recipient": "+15550100"},
                          headers=api.as_key(developer["test_api_key"]), status=422).json["error"]
    assert error["field"] == "recipient"


@pytest.mark.parametrize("recipient", ["=?utf-8?q?eve=40evil.example=3E?=.b@example.com",
                                       "=?utf-8?q?bob=40example.com=22=2C_eve=40evil.example=2C_=22x?=@example.com"])
def test_an_email_recipient_that_mail_headers_would_decode_into_other_addresses_is_refused(running_api, smtp_server,
                                                                                          recipient):
    # Mail headers decode an RFC 2047 word even in an address: the first would be mailed to
    # eve@evil.example, the second's To header would list eve@evil.example among three.
    api = running_api(**smtp_settings(smtp_server))
    key = api.register()["api_key"]
    for asked in ({"recipient": recipient, "channel": "email"},
                  {"recipients": [{"recipient": recipient, "channel": "email"}]}):
        body = {name: value for name, value in {**WIRE, **asked}.items() if name not in ("recipient", "channel")
                or "recipients" not in asked}
        error = api.post_json("/v1/pause", body, headers=api.as_key(key), status=422).json["error"]
        assert error["field"].endswith("recipient")
    api.step("notifications")
    assert smtp_server.messages == []


@pytest.mark.parametrize("recipient", ["eve%evil.example@example.com", "evil.example!eve@example.com"])
def test_an_email_recipient_a_relay_would_route_to_another_host_is_refused(running_api, smtp_server, recipient):
    # Relays that honour the old source routes (Postfix's allow_percent_hack, on by default;
    # sendmail's bang paths) mail eve@evil.example, while the audit log names example.com.
    api = running_api(**smtp_settings(smtp_server))
    key = api.register()["api_key"]
    error = api.post_json("/v1/pause", {**WIRE, "channel": "email", "recipient": recipient}, headers=api.as_key(key),
                          status=422).json["error"]
    assert error["field"] == "recipient"
    api.step("notifications")
    assert smtp_server.messages == []


def test_email_without_smtp_settings_is_refused_for_live_keys(api, developer):
    error = api.post_json("/v1/pause", {**WIRE, "channel": "email", "recipient": "ada@example.com"},
                          headers=api.as_key(developer["api_key"]), status=422).json["error"]
    assert error["code"] == "channel_not_configured" and "must set smtp.host and smtp.from_address (" in error["message"]


# -- push and chat through Apprise ----------------------------------------------------------

@pytest.mark.parametrize("refused", ["recipient", "message"])
def test_a_mail_server_refusing_for_now_is_tried_again_and_one_refusing_for_good_is_not(running_api, smtp_server,
                                                                                        refused):
    api = running_api(**smtp_settings(smtp_server))
    key = api.register()["api_key"]
    refusals = smtp_server.refuse_recipients if refused == "recipient" else smtp_server.refuse_messages
    refusals.append("451 4.7.1 Greylisted, try again later")
    greylisted = api.create_pause(key, channel="email", recipient="ada@example.com")["pause_id"]
    assert "451" in sent(api, key, greylisted, "queued")["notification"]["last_error"]
    skip_the_backoff(api.config)
    sent(api, key, greylisted, "sent")
    refusals.append("550 5.1.1 No such mailbox" if refused == "recipient" else "554 5.7.1 Message refused")
    refused_for_good = sent(api, key, api.create_pause(key, channel="email", recipient="bob@example.com")["pause_id"],
                            "failed")["notification"]
    assert refused_for_good["attempts"] == 1 and refused_for_good["may_have_reached"] is False
    assert [message["To"] for message in smtp_server.messages] == ["ada@example.com"]


def test_a_message_the_mail_server_took_but_answered_too_late_may_have_reached_the_person(running_api, smtp_server):
    smtp_server.answer_late = 3
    api = running_api(**smtp_settings(smtp_server), **{"outbound.deadline_seconds": 1})
    key = api.register()["api_key"]
    pause_id = api.create_pause(key, channel="email", recipient="ada@example.com")["pause_id"]
    unanswered = sent(api, key, pause_id, "queued")["notification"]
    assert unanswered["may_have_reached"] is True and unanswered["last_error"].endswith("may have taken it")
    smtp_server.answer_late = 0
    skip_the_backoff(api.config)
    notification = sent(api, key, pause_id, "sent")["notification"]
    # Sent twice; the second time as the same message, which mail systems can tell.
    assert [m["Message-ID"] for m in smtp_server.messages] == [notification["provider_message_id"]] * 2


@pytest.mark.parametrize("answer", ["25O queued", "220 queued"])
def test_a_message_answered_with_no_reply_code_may_have_reached_the_person(running_api, smtp_server, answer):
    smtp_server.refuse_messages.append(answer)
    api = running_api(**smtp_settings(smtp_server))
    key = api.register()["api_key"]
    pause_id = api.create_pause(key, channel="email", recipient="ada@example.com")["pause_id"]
    notification = sent(api, key, pause_id, "queued")["notification"]
    assert notification["may_have_reached"] is True and notification["last_error"].endswith("may have taken it")


def test_a_mail_server_refusing_the_sign_in_fails_the_notification_at_once(running_api):
    mailbox = Mailbox()
    mailbox.port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=mailbox.port, auth_require_tls=False,
                            authenticator=lambda *asked: AuthResult(success=False, handled=False))
    controller.start()
    try:
        api = running_api(**smtp_settings(mailbox), **{"smtp.username": "approvals", "smtp.password": "wrong"})
        key = api.register()["api_key"]
        pause_id = api.create_pause(key, channel="email", recipient="ada@example.com")["pause_id"]
        notification = sent(api, key, pause_id, "failed")["notification"]
    finally:
        controller.stop()
    assert notification["attempts"] == 1 and "535" in notification["last_error"] and mailbox.messages == []


@pytest.mark.parametrize("sender, domain", [("PausePoint <approvals@example.org>", "example.org"),
                                            ("approvals@mail.example.net", "mail.example.net")])
def test_the_message_id_names_the_notification_at_the_senders_domain(running_api, smtp_server, sender, domain):
    api = running_api(**{**smtp_settings(smtp_server), "smtp.from_address": sender})
    key = api.register()["api_key"]
    sent(api, key, api.create_pause(key, channel="email", recipient="ada@example.com")["pause_id"])
    [(notification_id,)] = stored(api.config, "SELECT id FROM notifications")
    assert smtp_server.messages[0]["Message-ID"] == f"<{notification_id}@{domain}>"


def test_a_message_the_mail_server_took_is_sent_however_it_answers_quit(running_api, smtp_server):
    smtp_server.quit_answer = "500 Not now"
    api = running_api(**smtp_settings(smtp_server))
    key = api.register()["api_key"]
    notification = sent(api, key, api.create_pause(key, channel="email", recipient="ada@example.com")["pause_id"],
                        "sent")["notification"]
    assert notification["attempts"] == 1 and len(smtp_server.messages) == 1


def test_an_operator_named_push_target_receives_the_question(running_api, receiver):
    target = receiver.url.replace("http://", "json://") + "/ntfy"
    api = running_api(**{"channels.ops.url": target})
    key = api.register()["api_key"]
    created = api.create_pause(key, channel="ops", recipient="on-call engineer")
    sent(api, key, created["pause_id"], "sent")
    [call] = receiver.wait_for(1)
    assert call["path"] == "/ntfy" and call["json"]["title"] == "Approval needed"
    assert WIRE["message"] in call["json"]["message"] and created["respond_url"] in call["json"]["message"]


def test_a_push_shows_a_start_of_a_long_detail_and_keeps_its_link_within_what_targets_take(running_api, receiver):
    """As the Claude Code hook asks: a 14 KB tool call shown whole would make a push that
    Telegram or Discord refuses, or that ntfy or a cutting target delivers without its link."""
    api = running_api(**{"channels.ops.url": receiver.url.replace("http://", "json://") + "/ntfy"})
    key = api.register()["api_key"]
    tool_input = json.dumps({"file_path": "/srv/app.py", "content": "x = 1\n" * 1800})
    created = api.create_pause(key, channel="ops", recipient="on-call engineer", metadata={
        "tool_name": "Write", "tool_input": tool_input, "display": ["tool_name", "tool_input"]})
    sent(api, key, created["pause_id"], "sent")
    [call] = receiver.wait_for(1)
    pushed = call["json"]["message"]
    assert f"> tool_name: Write\n> tool_input: {tool_input[:197 - len('tool_input: ')]}...\n" in pushed
    assert created["respond_url"] in pushed and len(pushed) < 1000


def test_markup_in_the_question_reaches_a_push_target_that_reads_html_as_text(running_api, smtp_server):
    # Apprise's mailto:// (like Telegram) sends HTML: the agent's text must not become a link there.
    target = f"mailto://127.0.0.1:{smtp_server.port}?from=approvals@example.org&to=ada@example.com&secure=no"
    api = running_api(**{"channels.ops.url": target})
    key = api.register()["api_key"]
    link = '<a href="https://evil.example/approve">Approve here</a>'
    created = api.create_pause(key, channel="ops", recipient="on-call engineer", message=f"Wire $340? {link}")
    sent(api, key, created["pause_id"], "sent")
    [message] = smtp_server.messages
    parts = {part.get_content_type(): part.get_content() for part in message.walk() if not part.is_multipart()}
    assert "<a " not in parts.get("text/html", "")
    assert link in parts["text/plain"] and created["respond_url"] in parts["text/plain"]


# What an agent might write to dress its own link as the approval link, or to ping a whole server.
DRESSED = "Wire $340? [Approve](https://evil.example/approve) @everyone @here <@123> <!channel> @all @**all** @room"


def as_drawn(text):
    """What a Markdown chat target draws of `text`: a backslash shows the punctuation after it,
    a zero-width space nothing."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", text).replace("\u200b", "")


def assert_shown_as_written(text, created, title="**Wire** @here", mentions=True):
    """The agent's question reaches the target as it wrote it: no link, nothing drawn as markup,
    no mention where `mentions` notify people; the respond link goes as it is, the one link in
    the message."""
    for markup in ("](", "**Wire**") + (("@everyone", "@here", "<@123>", "@all", "@room") if mentions else ()):
        assert markup not in text
    assert f"> {title}\n> {DRESSED}\n" in as_drawn(text)        # quoted as the agent's
    assert f"\nAnswer: {created['respond_url']}\n" in text


@pytest.fixture
def hosted(stubs, tmp_path, monkeypatch):
    """A chat service at its real name (discord.com, say), reached through an outbound proxy on
    loopback with a certificate the sender trusts: hosted("discord.com") starts one."""

    def start(name):
        cert, context = self_signed(tmp_path, f"DNS:{name}")
        service = stubs(HostedService, context)
        through_proxy(monkeypatch, "https", service.url)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", cert)
        return service

    return start


def pushed_to(api, **question):
    key = api.register()["api_key"]
    created = api.create_pause(key, channel="ops", recipient="on-call engineer", **question)
    sent(api, key, created["pause_id"], "sent")
    return created


@pytest.mark.parametrize("target", ["discord://1234/abcd", "discord://1234/abcd?format=markdown",
                                    "https://discord.com/api/webhooks/1234/abcd"])
def test_a_discord_push_shows_the_agents_markup_and_mentions_as_text_and_pings_no_one(running_api, hosted, target):
    """Discord draws a message's Markdown and pings the mentions in it; with ?format=markdown
    Apprise itself pings every mention it finds in the body."""
    discord = hosted("discord.com")
    created = pushed_to(running_api(**{"channels.ops.url": target}), message=DRESSED, title="**Wire** @here")
    [call] = discord.calls
    assert call["host"] == "discord.com" and call["path"].startswith("/api/webhooks/1234/abcd")
    payload = call["json"]
    assert "allow_mentions" not in payload and "allowed_mentions" not in payload
    text = payload["embeds"][0]["description"] if "embeds" in payload else payload["content"]
    assert payload.get("content", "").startswith("👉") is False
    assert_shown_as_written(text, created)


def test_a_discord_push_escapes_only_what_discord_reads_so_a_tool_call_keeps_its_length(running_api, hosted):
    """Discord refuses a message over 2000 characters: a backslash before each dot, brace and
    quote of a tool call's JSON would cost a good part of them."""
    discord = hosted("discord.com")
    tool_call = '{"command": "rm -rf build/", "cwd": "/srv/app.example.org", "timeout": 1.5}'
    created = pushed_to(running_api(**{"channels.ops.url": "discord://1234/abcd"}), message=f"Run {tool_call}?")
    [call] = discord.calls
    assert 'Run {"command": "rm \\-rf build/", "cwd": "/srv/app.example.org", "timeout": 1.5}?' in call["json"]["content"]
    assert created["respond_url"] in call["json"]["content"]


LONG_QUESTION = (DRESSED + " ") * 20


@pytest.mark.parametrize("host, target, longest, many_options", [
    ("discord.com", "discord://1234/abcd", 2000, False),
    ("api.pushover.net", "pover://" + "u" * 30 + "@" + "a" * 30, 1024, True),
])
def test_a_question_longer_than_a_push_target_takes_is_cut_short_keeping_the_link(running_api, hosted, host, target,
                                                                                  longest, many_options):
    """The service refuses a longer message (Discord 2000 characters, Pushover 1024): 1600 of
    the agent's, each backslash or zero-width space made to show it as written costing one
    more, would be no push at all. The question is cut short, its options kept while they
    leave it room, and our link goes whole."""
    service = hosted(host)
    service.answer, service.longest = b'{"status": 1, "request": "r1"}', longest
    options = [f"Option {n} " + "x" * 90 for n in range(10)] if many_options else ["Approve", "Reject"]
    created = pushed_to(running_api(**{"channels.ops.url": target}), message=LONG_QUESTION[:1600],
                        title="**Wire** @here", options=options, timeout_default=None)
    [call] = service.calls
    text = call["json"]["content"] if host == "discord.com" else call["json"]["message"]
    assert len(text) <= longest             # Discord's counts the title Apprise puts in it
    drawn = as_drawn(text).removeprefix("Approval needed\r\n")
    assert drawn.startswith(f"> **Wire** @here\n> {DRESSED} ")
    assert "…\n(cut short: the link shows all of it)\n" in drawn
    assert re.search(r"\nAnswer: (\S+)\nExpires [^\n]+$", drawn).group(1) == created["respond_url"]
    assert ("\nOptions: " in drawn) is not many_options


def test_a_reminder_of_a_question_cut_short_still_fits_what_the_push_target_takes(running_api, hosted):
    """Its opening ("Reminder, 30.0 min left:") comes out of the room the question is cut to,
    not on top of a question already cut to the most Discord takes."""
    discord = hosted("discord.com")
    discord.longest = 2000
    api = running_api(**{"channels.ops.url": "discord://1234/abcd"})
    key = api.register()["api_key"]
    created = api.post_json("/v1/pause", {**WIRE, "channel": "ops", "recipient": "on-call engineer",
                                          "message": LONG_QUESTION[:1600], "remind_after_minutes": [30]},
                            headers=api.as_key(key)).json
    api.step("notifications")
    stored(api.config, "UPDATE pause_steps SET due_at = '2000-01-01T00:00:00.000Z' WHERE pause_id = ?",
           created["pause_id"])
    api.step("steps")
    api.step("notifications")
    asked, reminder = [call["json"]["content"] for call in discord.calls]
    assert len(asked) <= 2000 and len(reminder) <= 2000
    assert re.search(r"\nReminder, [^:]+ left:\n\\> ", reminder) and "cut short" in reminder    # ">" escaped for its Markdown
    assert re.search(r"\nAnswer: (\S+)\nExpires [^\n]+$", reminder).group(1) == created["respond_url"]
    assert [row[0] for row in stored(api.config, "SELECT status FROM notifications WHERE pause_id = ? ORDER BY kind",
                                     created["pause_id"])] == ["sent", "sent"]


@pytest.mark.parametrize("host, target, longest, field", [
    ("chat.googleapis.com", "gchat://workspace/key/token", 4000, "text"),
    ("api.pushover.net", "pover://" + "u" * 30 + "@" + "a" * 30 + "?format=html", 1024, "message"),
])
def test_a_question_apprise_writes_longer_still_fits_what_the_target_takes(running_api, hosted, host, target, longest,
                                                                           field):
    """Apprise writes each < and & for Google Chat, and for Pushover sent HTML, as &lt; and
    &amp;: a question that fits as we wrote it would be four times too long as sent."""
    service = hosted(host)
    service.answer, service.longest = b'{"status": 1, "request": "r1"}', longest
    created = pushed_to(running_api(**{"channels.ops.url": target}), message="<&>" * 533)
    [call] = service.calls
    text = call["json"][field]
    assert len(text) <= longest and re.search(r"cut\sshort", text) and created["respond_url"] in text


@pytest.mark.parametrize("question", [
    {"message": "Перевести " * 160},
    {"message": "x" * 1600, "fields": {name: {"type": "string", "value": "y" * 1000} for name in ("memo", "note", "terms")}},
])
def test_an_ntfy_push_is_text_the_phone_shows_never_a_file(running_api, receiver, question):
    """ntfy turns a message over 4,096 bytes into an attached file, and Apprise one whose
    JSON, each character past ASCII a \\u escape of six, runs past 8,000: the phone would say
    a file arrived, the question and its link unseen."""
    target = receiver.url.replace("http://", "ntfy://") + "/approvals"
    created = pushed_to(running_api(**{"channels.ops.url": target}), **question)
    [call] = receiver.wait_for(1)
    message = call["json"]["message"]
    assert len(message.encode()) <= 4096 and len(json.dumps(call["json"])) <= 8000
    assert "cut short" in message and created["respond_url"] in message


@pytest.mark.parametrize("target", ["ntfy://{host}/approvals", "ntfy://{host}/approvals?format=markdown"])
def test_an_answer_line_the_agent_writes_never_reads_as_the_pushs_own(running_api, receiver, target):
    """An agent's message (or a mail it passes on) may hold lines of any kind: as lines of their
    own, its "Answer:" link or "Options:" would read as ours, above our link. Each is quoted."""
    forged = "Wire $340?\nAnswer: https://evil.example/x\nOptions: Approve / Reject\nExpires never"
    url = target.format(host=receiver.url.removeprefix("http://"))
    created = pushed_to(running_api(**{"channels.ops.url": url}), message=forged)
    [call] = receiver.wait_for(1)
    lines = as_drawn(call["json"]["message"]).splitlines()
    assert [line for line in lines if line.startswith(("Answer:", "Options:"))] == [
        "Options: Approve / Reject", f"Answer: {created['respond_url']}"]
    assert lines[:4] == ["> Wire $340?", "> Answer: https://evil.example/x", "> Options: Approve / Reject",
                         "> Expires never"]


def test_an_sms_service_through_apprise_is_sent_the_question_in_joined_segments(running_api, hosted):
    """Apprise's figure for an SMS service is one segment, 160 characters, which the title, the
    link and the expiry alone fill: a question of a few hundred characters goes whole, as
    joined segments, and a longer one is cut to six of them."""
    clicksend = hosted("rest.clicksend.com")
    clicksend.answer = b'{"response_code": "SUCCESS", "data": {"messages": [{"status": "SUCCESS"}]}}'
    api = running_api(**{"channels.ops.url": "clicksend://ops:apikey@15551234567"})
    question = "Wire $340 to Acme Corp for invoice 2291? " * 10
    key = api.register()["api_key"]
    created, _ = (api.create_pause(key, channel="ops", recipient="on-call engineer", message=message)
                  for message in (question.strip(), LONG_QUESTION[:1600]))
    api.step("notifications")
    [whole], [cut] = sorted(([message["body"] for message in call["json"]["messages"]] for call in clicksend.calls),
                            key=lambda bodies: "invoice 2291" not in bodies[0])     # sent in either order
    assert question.strip() in whole and created["respond_url"] in whole
    assert len(cut) <= 6 * 153 and "(cut short: the link shows all of it)\nOptions: " in cut


def test_a_mattermost_push_shows_the_agents_markup_and_mentions_as_text(running_api, receiver):
    target = receiver.url.replace("http://", "mmost://") + "/hook-token"
    created = pushed_to(running_api(**{"channels.ops.url": target}), message=DRESSED, title="**Wire** @here")
    [call] = receiver.wait_for(1)
    assert call["path"] == "/hooks/hook-token"
    assert_shown_as_written(call["json"]["text"], created)


def test_a_zulip_push_shows_the_agents_markup_and_mentions_as_text(running_api, hosted):
    zulip = hosted("acme.zulipchat.com")
    created = pushed_to(running_api(**{"channels.ops.url": "zulip://approvals-bot@acme/" + "t" * 32}),
                        message=DRESSED, title="**Wire** @here")
    [call] = zulip.calls
    assert call["host"] == "acme.zulipchat.com" and call["path"] == "/api/v1/messages"
    assert_shown_as_written(call["json"]["content"], created)


def test_a_matrix_push_names_no_room_or_person_to_notify(running_api, receiver):
    """Matrix sends plain text, but a client notifies the room of an "@room" in it."""
    target = receiver.url.replace("http://", "matrix://hook-token@") + "/?mode=matrix"
    created = pushed_to(running_api(**{"channels.ops.url": target}), message=DRESSED)
    [call] = receiver.wait_for(1)
    text = call["json"]["text"]
    assert "@room" not in text and "@everyone" not in text and DRESSED in text.replace("\u200b", "")
    assert created["respond_url"] in text


@pytest.mark.parametrize("target, path, field, mentions", [
    ("rocket://hook/token@{}/#approvals", "/hooks/hook/token", "text", True),
    ("ntfy://{}/approvals?format=markdown", "/", "message", False),
])
def test_a_push_apprise_sends_as_markdown_shows_the_agents_text_as_written_and_our_link_whole(running_api, receiver,
                                                                                               target, path, field,
                                                                                               mentions):
    """Apprise escapes what Markdown reads when it sends Markdown, our link's dots and
    underscores too; and not Rocket.Chat's @all and @here."""
    target = target.format(receiver.url.removeprefix("http://"))
    created = pushed_to(running_api(**{"channels.ops.url": target}), message=DRESSED, title="**Wire** @here")
    [call] = receiver.wait_for(1)
    assert call["path"] == path
    assert_shown_as_written(call["json"][field], created, mentions=mentions)


def test_a_slack_push_shows_the_agents_links_and_mentions_as_text(running_api, hosted):
    """Apprise escapes what Slack reads in plain text (&, <, >): kept so."""
    slack = hosted("hooks.slack.com")
    slack.answer = b"ok"
    created = pushed_to(running_api(**{"channels.ops.url": "slack://T1/B1/C1"}), message=DRESSED)
    [call] = slack.calls
    [attachment] = call["json"]["attachments"]
    assert "<@123>" not in attachment["text"] and "<!channel>" not in attachment["text"]
    assert call["json"]["mrkdwn"] is False and created["respond_url"] in attachment["text"]


def test_an_unreachable_push_target_is_recorded_as_a_failed_attempt(running_api):
    api = running_api(**{"channels.ops.url": "json://127.0.0.1:9/nothing-listens"})
    key = api.register()["api_key"]
    pause = sent(api, key, api.create_pause(key, channel="ops", recipient="ops")["pause_id"], "queued")
    assert pause["notification"]["attempts"] == 1
    assert "json://" in pause["notification"]["last_error"] and "127.0.0.1" not in pause["notification"]["last_error"]


def test_the_server_log_never_shows_where_a_push_went_past_its_scheme(spawn_server, stubs):
    """An ntfy topic is its password: whoever knows it reads every respond link pushed there.
    Apprise logs the topic of each push it makes (and of each it fails to), at INFO and up."""
    taken, refused = stubs(WebhookReceiver), stubs(WebhookReceiver, answers=[(500, {})] * 3)
    server = spawn_server(env={"PAUSEPOINT_CHANNELS_OPS_URL": taken.url.replace("http://", "ntfy://") + "/t0p1c-ops",
                               "PAUSEPOINT_CHANNELS_ONCALL_URL": refused.url.replace("http://", "ntfy://") + "/t0p1c-oncall"})
    keys = requests.post(f"{server.url}/v1/auth/register",
                         json={"email": "n@example.com", "name": "N", "password": "password123"}).json()
    for channel in ("ops", "oncall"):
        requests.post(f"{server.url}/v1/pause", headers={"Authorization": f"Bearer {keys['api_key']}"},
                      json={**WIRE, "channel": channel, "recipient": channel}).raise_for_status()
    taken.wait_for(1)
    refused.wait_for(1)
    wait_until(lambda: "ntfy" in server.output())       # Apprise has said how each went
    server.stop()
    assert "ntfy" in server.output() and "t0p1c" not in server.output()


def test_api_callers_can_only_name_targets_never_supply_urls(running_api, receiver):
    api = running_api(**{"channels.ops.url": "json://127.0.0.1:9/x"})
    key = api.register()["test_api_key"]
    for channel in (receiver.url.replace("http://", "json://"), "ntfy://evil.example/topic"):
        error = api.post_json("/v1/pause", {**WIRE, "channel": channel}, headers=api.as_key(key), status=422).json
        assert error["error"]["field"] == "channel"
    assert receiver.calls == []


@pytest.mark.parametrize("settings, named", [
    ({"channels.sms.url": "json://127.0.0.1/x"}, "channels.sms.url"),
    ({"channels.ops.url": "not a url"}, "channels.ops.url"),
    ({"smtp.security": "ssl"}, "smtp.security"),
])
def test_bad_channel_settings_stop_start_up_naming_the_key(settings, named):
    with pytest.raises(pausepoint.ConfigError, match=named.replace(".", r"\.")):
        pausepoint.load_config(environ={}, overrides=settings)


def test_push_targets_can_be_set_from_the_environment():
    config = pausepoint.load_config(environ={"PAUSEPOINT_CHANNELS_HOMELAB_URL": "ntfy://ntfy.example.org/x"})
    assert "homelab" in pausepoint.channels(config)


# -- link and the channel list ------------------------------------------------------------------

def test_the_link_channel_sends_nothing_and_leaves_delivery_to_the_agent(api, developer):
    key = developer["api_key"]                      # live: link needs no settings
    created = api.create_pause(key, channel="link", recipient="the user in our chat UI")
    pause = api.pause(key, created["pause_id"])
    assert pause["notification"] is None and pause["respond_url"] == created["respond_url"]
    api.post_json(f"/v1/respond/{token_of(created['respond_url'])}", {"choice": "Approve"})
    kinds = {e["event_type"] for e in api.get("/v1/audit", headers=api.as_key(key)).json["events"]}
    assert not any(kind.startswith("notification.") for kind in kinds)


def test_the_channel_list_names_kinds_and_readiness_but_never_credentials(running_api, twilio):
    api = running_api(**twilio.settings(), **{"channels.ops.url": "ntfy://ntfy.example.org/secret-topic"})
    key = api.register()["test_api_key"]
    response = api.get("/v1/channels", headers=api.as_key(key))
    listed = {c["name"]: c for c in response.json["channels"]}
    assert listed["sms"] == {"name": "sms", "kind": "twilio", "configured": True}
    assert listed["email"]["configured"] is False
    assert listed["ops"]["kind"] == "apprise" and listed["link"]["kind"] == "link"
    assert twilio.auth_token not in response.text and "secret-topic" not in response.text
    api.get("/v1/channels", status=401)


# -- who may use a push target ----------------------------------------------------------------

# The ways a pause names a channel: its own, a team member's, an escalation step's.
NAMING = {
    "channel": lambda channel: {**WIRE, "recipient": "on-call", "channel": channel},
    "recipients": lambda channel: {**QUESTION, "recipients": [{"recipient": "+15550100", "channel": "sms"},
                                                              {"recipient": "on-call", "channel": channel}]},
    "escalation": lambda channel: {**WIRE, "escalation": [{"after_minutes": 60, "recipient": "on-call",
                                                            "channel": channel}]},
}


def listed_target(running_api, developers, **settings):
    """An app whose push target ops is for `developers`, with Ada and a stranger registered:
    (api, Ada's keys, the stranger's keys)."""
    api = running_api(**{"channels.ops.url": "json://127.0.0.1:9/ops", "channels.ops.developers": developers},
                      **settings)
    return api, api.register("ada@example.com"), api.register("stranger@example.com")


def test_a_developer_a_push_target_lists_may_use_it_however_their_email_is_cased(running_api, receiver):
    target = receiver.url.replace("http://", "json://") + "/ops"
    api = running_api(**{"channels.ops.url": target, "channels.ops.developers": ["ada@example.com"]})
    key = api.register("Ada@Example.com")["api_key"]
    created = api.create_pause(key, channel="ops", recipient="on-call engineer")
    sent(api, key, created["pause_id"], "sent")
    [call] = receiver.wait_for(1)
    assert created["respond_url"] in call["json"]["message"]


@pytest.mark.parametrize("naming", NAMING)
def test_a_developer_a_push_target_does_not_list_is_refused_it_as_an_unknown_channel(running_api, naming):
    api, ada, stranger = listed_target(running_api, ["ada@example.com"])
    body = NAMING[naming]
    api.post_json("/v1/pause", body("ops"), headers=api.as_key(ada["test_api_key"]), status=201)
    for key in (stranger["test_api_key"], stranger["api_key"]):
        refused = api.post_json("/v1/pause", body("ops"), headers=api.as_key(key), status=422).json
        unknown = api.post_json("/v1/pause", body("nosuch"), headers=api.as_key(key), status=422).json
        assert refused == unknown and "ops" not in refused["error"]["message"]
    assert stored(api.config, "SELECT developer_id FROM pauses") == [(ada["developer_id"],)]


def test_a_push_target_is_listed_only_to_the_developers_it_lists(running_api):
    api, ada, stranger = listed_target(running_api, ["ada@example.com"])
    for keys, listed in ((ada, True), (stranger, False)):
        response = api.get("/v1/channels", headers=api.as_key(keys["test_api_key"]))
        assert ("ops" in {channel["name"] for channel in response.json["channels"]}) is listed
    assert "ops" not in response.text
    # The API document is anyone's to read: it names only the channels every developer may use.
    channel = api.get("/v1/openapi.json").json["paths"]["/v1/pause"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["properties"]["channel"]
    assert "ops" not in channel["enum"] and "ops" not in channel["x-message"] and "sms" in channel["enum"]


def test_a_star_opens_a_push_target_to_every_developer(running_api):
    api, ada, stranger = listed_target(running_api, ["*"])
    for keys in (ada, stranger):
        api.create_pause(keys["test_api_key"], channel="ops", recipient="on-call")
        listed = api.get("/v1/channels", headers=api.as_key(keys["test_api_key"])).json["channels"]
        assert "ops" in {channel["name"] for channel in listed}
    assert api.get("/v1/openapi.json").json["paths"]["/v1/pause"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["properties"]["channel"]["enum"].count("ops") == 1


def test_a_push_target_open_to_anyone_who_registers_is_warned_of_at_start(running_api):
    api = running_api(**{"channels.ops.url": "json://127.0.0.1:9/ops", "channels.all.url": "json://127.0.0.1:9/all",
                         "channels.all.developers": ["*"]})
    warned = list(pausepoint.stored_state_warnings(api.app.runtime.db(), api.config))
    assert [warning for warning in warned if "push target" in warning] == [
        "push target 'ops' has no developers list, and registration is open: anyone who registers may send questions"
        " to it, and links of their choosing with them; list who may use it ([channels.ops] developers ="
        ' ["you@example.com"], or ["*"] for every developer)']
    closed = running_api(**{"channels.ops.url": "json://127.0.0.1:9/ops", "registration.open": False})
    assert not [w for w in pausepoint.stored_state_warnings(closed.app.runtime.db(), closed.config) if "ops" in w]


def test_an_email_a_push_target_lists_that_no_account_has_is_warned_of_at_start(running_api):
    api, ada, stranger = listed_target(running_api, ["ADA@example.com", "ada@exmaple.com"])
    warned = [w for w in pausepoint.stored_state_warnings(api.app.runtime.db(), api.config) if "ops" in w]
    assert warned == ["channels.ops.developers lists ada@exmaple.com, which no developer's account has: the developer"
                      " meant cannot use the target, and whoever registers with that email can"]


def test_a_push_target_whose_developers_list_is_empty_is_warned_of_at_start(running_api):
    # As an empty $PAUSEPOINT_CHANNELS_OPS_DEVELOPERS makes it, say by a compose file's unset ${OPS_DEVELOPERS}.
    assert pausepoint.load_config(environ={"PAUSEPOINT_CHANNELS_OPS_URL": "json://127.0.0.1:9/ops",
                                           "PAUSEPOINT_CHANNELS_OPS_DEVELOPERS": ""})["channels.ops.developers"] == []
    for registration in (True, False):
        api = running_api(**{"channels.ops.url": "json://127.0.0.1:9/ops", "channels.ops.developers": [],
                             "registration.open": registration})
        warned = [w for w in pausepoint.stored_state_warnings(api.app.runtime.db(), api.config) if "ops" in w]
        assert warned == ["channels.ops.developers is empty: no developer may use push target 'ops'; list who may"
                          ' (developers = ["you@example.com"]), or ["*"] for every developer']


def test_the_server_logs_its_push_target_warnings_as_it_starts(spawn_server):
    server = spawn_server(env={"PAUSEPOINT_CHANNELS_OPS_URL": "json://127.0.0.1:9/ops",
                               "PAUSEPOINT_CHANNELS_TEAM_URL": "json://127.0.0.1:9/team",
                               "PAUSEPOINT_CHANNELS_TEAM_DEVELOPERS": "ada@example.com"})
    wait_until(lambda: "channels.team.developers lists ada@example.com, which no" in server.output())
    assert "push target 'ops' has no developers list, and registration is open" in server.output()
    assert "push target 'team'" not in server.output()


# -- SMS replies ------------------------------------------------------------------------------

INBOUND_PATH = "/v1/twilio/inbound"


def inbound(api, config, body, sender="+15550100", token=None, signature=None, message_sid=None):
    """Twilio's signed webhook for a text; message_sid is its id for it (a new one unless given, "" for none)."""
    params = {"From": sender, "To": "+15559990000", "Body": body,
              **({"MessageSid": message_sid or "SM" + uuid.uuid4().hex} if message_sid != "" else {})}
    url = pausepoint.base_url(config) + INBOUND_PATH
    if signature is None:
        signature = RequestValidator(token or config["twilio.auth_token"]).compute_signature(url, params)
    return api.post(INBOUND_PATH, params, headers={"X-Twilio-Signature": signature}, expect_errors=True)


class SmsApi(Api):
    """Creating a live pause also sends its text (the send job run once), as the scheduler would."""

    def create_pause(self, key, **changes):
        created = super().create_pause(key, **changes)
        if key.startswith("pp_live_"):
            self.step("notifications")
        return created


@pytest.fixture
def sms_setup(running_api, twilio):
    # The reply-code tests hold every code of a number, 4,416 test pauses, pending.
    api = SmsApi(running_api(**twilio.settings(), **{"server.base_url": "https://pp.example.org",
                                                     "pauses.max_test_pending": 0}).app)
    return api, api.config, api.register()


def answered_nothing(response):
    """Twilio's webhook answered with no message to send back."""
    assert response.status_code == 200 and response.content_type == "application/xml"
    return "<Message" not in response.text


def reply_code(api, key, created):
    """The code the pause's SMS asks the human to reply with."""
    text = api.pause(key, created["pause_id"])["notification"]["text"]
    return re.search(r"Reply ([A-Z][2-9][A-Z]?) 1 for ", text).group(1)


def test_a_bare_reply_decides_the_only_pending_pause_for_that_number(sms_setup):
    api, config, keys = sms_setup
    created = api.create_pause(keys["api_key"], message="Only question?")
    response = inbound(api, config, " 2 ")
    assert response.status_code == 200 and response.content_type == "application/xml"
    assert '<Message>PausePoint: recorded Reject for "Only question?"</Message>' in response.text
    pause = api.pause(keys["api_key"], created["pause_id"])
    assert pause["status"] == "responded" and pause["choice"] == "Reject" and pause["decided_by"] == "recipient:+15550100"
    event = api.get("/v1/audit", {"event_type": "pause.responded"}, headers=api.as_key(keys["api_key"])).json["events"][0]
    assert event["data"]["via"] == "sms" and event["data"]["message_sid"].startswith("SM")
    assert event["data"]["reply_code"] == reply_code(api, keys["api_key"], created)


def test_an_answer_quoting_a_question_xml_cannot_carry_is_still_xml_twilio_can_read(sms_setup):
    """U+FFFE and U+FFFF are text to JSON but no character to XML: Twilio could not read the
    answer, and the person, or whoever texts the number about another tenant's pause, got none."""
    api, config, keys = sms_setup
    api.create_pause(keys["api_key"], message="Wire \ufffe\uffff now?")
    response = inbound(api, config, "maybe")
    [message] = xml.etree.ElementTree.fromstring(response.body).iter("Message")
    assert message.text.endswith("(\"Wire \ufffd\ufffd now?\")")


def test_a_message_sent_again_decides_nothing_even_for_a_newer_pause(sms_setup):
    """Twilio's signature carries no time: the same signed message, retried by Twilio or replayed
    by anyone who saw it, is known by its MessageSid, and never answers a pause asked later."""
    api, config, keys = sms_setup
    other = api.register(email="b@example.com")
    first = api.create_pause(keys["api_key"], message="send $10 to the office fund?")
    assert "recorded Approve" in inbound(api, config, "1", message_sid="SM" + "7" * 32).text
    wire = api.create_pause(other["api_key"], message="wire $50,000 to account 998877?")
    again = inbound(api, config, "1", message_sid="SM" + "7" * 32)
    assert again.status_code == 200 and "received already" in again.text
    assert api.pause(other["api_key"], wire["pause_id"])["status"] == "pending"
    assert api.pause(keys["api_key"], first["pause_id"])["choice"] == "Approve"
    unnamed = inbound(api, config, "1", message_sid="")          # Twilio always names it: no id, no decision
    assert "without its MessageSid" in unnamed.text
    assert api.pause(other["api_key"], wire["pause_id"])["status"] == "pending"


def test_a_signed_message_posted_again_with_its_id_run_into_the_next_parameter_decides_nothing(sms_setup):
    """Twilio signs a form's names and values run together: MessageSid=SM…&NumMedia=0 signs as
    MessageSid=SM…NumMedia0 does, the same reply under an id never seen, still signed."""
    api, config, keys = sms_setup
    other = api.register(email="b@example.com")
    api.create_pause(keys["api_key"], message="send $10 to the office fund?")
    url, sid = pausepoint.base_url(config) + INBOUND_PATH, "SM" + uuid.uuid4().hex
    params = {"Body": "1", "From": "+15550100", "MessageSid": sid, "NumMedia": "0", "To": "+15559990000"}
    signature = RequestValidator(config["twilio.auth_token"]).compute_signature(url, params)
    assert "recorded Approve" in api.post(INBOUND_PATH, params, headers={"X-Twilio-Signature": signature}).text
    stored(config, "UPDATE pauses SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', created_at, '-1 hours'),"
                   " decided_at = strftime('%Y-%m-%dT%H:%M:%fZ', decided_at, '-1 hours')")     # long settled
    wire = api.create_pause(other["api_key"], message="wire $50,000 to account 998877?")
    shifted = {"Body": "1", "From": "+15550100", "MessageSid": sid + "NumMedia0", "To": "+15559990000"}
    again = api.post(INBOUND_PATH, shifted, headers={"X-Twilio-Signature": signature})
    assert again.status_code == 200 and "not one Twilio gives" in again.text
    assert api.pause(other["api_key"], wire["pause_id"])["status"] == "pending"
    assert stored(config, "SELECT message_sid FROM sms_replies") == [(sid,)]
    assert inbound(api, config, "1", message_sid="3f2b8c1e-9d4a-4e7b-8a1c-2b3d4e5f6a7b").status_code == 200
    assert api.pause(other["api_key"], wire["pause_id"])["choice"] == "Approve"        # a compatible provider's id


def test_a_text_written_to_be_signed_as_another_numbers_reply_decides_nothing(sms_setup):
    """The Body is the texter's own words, signed run together with the fields after it: a
    stranger who sees the signed post of a text they wrote can split it again into a reply
    'from' another number under an id of their making, still signed as Twilio signed theirs."""
    api, config, keys = sms_setup
    wire = api.create_pause(keys["api_key"], message="wire $50,000 to account 998877?")
    url, real, made_up = pausepoint.base_url(config) + INBOUND_PATH, "SM" + uuid.uuid4().hex, "SM" + uuid.uuid4().hex
    written = {"AccountSid": "AC" + "0" * 32, "ApiVersion": "2010-04-01", "From": "+15550666",
               "Body": f"1From+15550100MessageSid{made_up}NumMedia", "MessageSid": real, "NumMedia": "0",
               "SmsMessageSid": real, "SmsSid": real, "SmsStatus": "received", "To": "+15559990000"}
    signature = RequestValidator(config["twilio.auth_token"]).compute_signature(url, written)
    assert answered_nothing(api.post(INBOUND_PATH, written, headers={"X-Twilio-Signature": signature}))
    split = {"AccountSid": "AC" + "0" * 32, "ApiVersion": "2010-04-01", "Body": "1", "From": "+15550100",
             "MessageSid": made_up, "NumMedia": "From+15550666MessageSid" + real + "NumMedia0",
             "SmsMessageSid": real, "SmsSid": real, "SmsStatus": "received", "To": "+15559990000"}
    forged = api.post(INBOUND_PATH, split, headers={"X-Twilio-Signature": signature}, expect_errors=True)
    assert "recorded" not in forged.text
    assert api.pause(keys["api_key"], wire["pause_id"])["status"] == "pending"
    assert "recorded Approve" in inbound(api, config, "1").text          # the number's own reply still counts


def test_a_text_written_to_be_signed_as_another_numbers_reply_decides_nothing_under_its_own_id(sms_setup):
    """Were the text itself never taken (the server down as Twilio posted it), its own id is
    new: split again through FromCity, a key Twilio sends, it would be a reply from +15550100."""
    api, config, keys = sms_setup
    wire = api.create_pause(keys["api_key"], message="wire $50,000 to account 998877?")
    url, real = pausepoint.base_url(config) + INBOUND_PATH, "SM" + uuid.uuid4().hex
    written = {"Body": "1From+15550100FromC", "From": "+15550666", "FromCity": "SPRINGFIELD", "MessageSid": real,
               "To": "+15559990000"}
    signature = RequestValidator(config["twilio.auth_token"]).compute_signature(url, written)
    split = {"Body": "1", "From": "+15550100", "FromC": "From+15550666", "FromCity": "SPRINGFIELD",
             "MessageSid": real, "To": "+15559990000"}
    forged = api.post(INBOUND_PATH, split, headers={"X-Twilio-Signature": signature}, expect_errors=True)
    assert "recorded" not in forged.text
    assert api.pause(keys["api_key"], wire["pause_id"])["status"] == "pending"
    assert "recorded Approve" in inbound(api, config, "1").text          # the number's own reply still counts


def test_a_whatsapp_reply_quoting_the_question_names_its_message_and_still_counts(sms_setup):
    """WhatsApp lets a reply quote the message it answers: Twilio then names that one too."""
    api, config, keys = sms_setup
    created = api.create_pause(keys["api_key"], channel="whatsapp")
    asked = api.pause(keys["api_key"], created["pause_id"])["notification"]["provider_message_id"]
    url, sid = pausepoint.base_url(config) + INBOUND_PATH, "SM" + uuid.uuid4().hex
    form = {"AccountSid": "AC" + "0" * 32, "Body": "1", "From": "whatsapp:+15550100", "MessageSid": sid,
            "OriginalRepliedMessageSender": "whatsapp:+15559990000", "OriginalRepliedMessageSid": asked,
            "ProfileName": "Ada", "SmsMessageSid": sid, "SmsSid": sid, "To": "whatsapp:+15559990000",
            "WaId": "15550100"}
    signature = RequestValidator(config["twilio.auth_token"]).compute_signature(url, form)
    assert "recorded Approve" in api.post(INBOUND_PATH, form, headers={"X-Twilio-Signature": signature}).text


def test_a_reply_to_a_reminder_counts_when_the_first_text_failed(running_api, twilio):
    """The reminder carries the question and its code: once it was sent, the question reached the number."""
    api = running_api(**twilio.settings())
    key = api.register()["api_key"]
    twilio.fail_next = [400]                                        # the first text is refused for good
    created = api.post_json("/v1/pause", {**WIRE, "remind_after_minutes": [30]}, headers=api.as_key(key)).json
    assert sent(api, key, created["pause_id"], "failed")["status"] == "pending"
    stored(api.config, "UPDATE pause_steps SET due_at = '2000-01-01T00:00:00.000Z' WHERE pause_id = ?",
           created["pause_id"])
    api.step("steps")
    api.step("notifications")
    [reminder] = [m["Body"] for m in twilio.messages]
    code = re.search(r"Reply ([A-Z][2-9][A-Z]?) 1 for Approve", reminder).group(1)
    assert "recorded Approve" in inbound(api, api.config, f"{code} 1").text
    assert api.pause(key, created["pause_id"])["choice"] == "Approve"


def test_a_reminder_text_says_first_that_it_is_one_whatever_the_question_begins_with(running_api, receiver):
    """Only an email's text begins with its Subject line; a question that itself begins
    "Subject: " had its reminder's opening put after those words, in the middle of its own
    (a push and a text quote it)."""
    api = running_api(**{"channels.ops.url": receiver.url.replace("http://", "json://") + "/ntfy"})
    key = api.register()["api_key"]
    created = api.post_json("/v1/pause", {**WIRE, "channel": "ops", "recipient": "on-call engineer",
                                          "message": "Subject: the Q3 budget. Approve?",
                                          "remind_after_minutes": [30]}, headers=api.as_key(key)).json
    api.step("notifications")
    stored(api.config, "UPDATE pause_steps SET due_at = '2000-01-01T00:00:00.000Z' WHERE pause_id = ?",
           created["pause_id"])
    api.step("steps")
    api.step("notifications")
    asked, reminder = [call["json"]["message"] for call in receiver.wait_for(2)]
    assert asked.startswith("> Subject: the Q3 budget. Approve?\n")
    assert re.match(r"Reminder, [^:]+ left:\n> Subject: the Q3 budget\. Approve\?\n", reminder)


def test_a_reply_may_name_the_option_instead_of_its_number(sms_setup):
    api, config, keys = sms_setup
    created = api.create_pause(keys["api_key"])
    inbound(api, config, "approve.")
    assert api.pause(keys["api_key"], created["pause_id"])["choice"] == "Approve"


@pytest.mark.parametrize("texted", ["Ship it!", "ship it", "{code} ship it!", "Hold", "{code}: hold."])
def test_an_option_ending_in_a_stop_or_a_bang_may_be_named_as_written_or_without_it(sms_setup, texted):
    api, config, keys = sms_setup
    created = api.create_pause(keys["api_key"], options=["Ship it!", "Hold."], timeout_default=None)
    code = reply_code(api, keys["api_key"], created)
    response = inbound(api, config, texted.format(code=code))
    chosen = "Ship it!" if "ship" in texted.lower() else "Hold."
    assert f'recorded {chosen} for "' in response.text
    assert api.pause(keys["api_key"], created["pause_id"])["choice"] == chosen


def test_a_text_without_words_never_chooses_an_option_made_of_stops(sms_setup):
    api, config, keys = sms_setup
    created = api.create_pause(keys["api_key"], options=["Go ahead", "!!!"], timeout_default=None)
    code = reply_code(api, keys["api_key"], created)
    for text in ("", " ", ".", f"{code} !"):
        assert f"Reply {code} 1 for Go ahead" in inbound(api, config, text).text
    assert api.pause(keys["api_key"], created["pause_id"])["status"] == "pending"


@pytest.mark.parametrize("options, texted", [(["3", "2", "1"], "3"), (["Go", "Go!"], "Go!"), (["Yes", "1."], "1."),
                                            (["Approve", "Deny B5"], "Deny B5"), (["K7: go", "Stop"], "K7: go")])
def test_options_a_text_reply_would_take_for_another_are_refused_where_someone_may_text_back(api, developer, options,
                                                                                             texted):
    key, asked = developer["test_api_key"], {**WIRE, "options": options, "timeout_default": None}
    error = api.post_json("/v1/pause", asked, headers=api.as_key(key), status=422).json["error"]
    assert error["field"] == "options" and f"a text reply of {texted!r} would" in error["message"]
    escalated = {**QUESTION, "options": options, "timeout_default": None,
                 "recipients": [{"recipient": "ada@example.com", "channel": "email"}],
                 "escalation": [{"after_minutes": 5, "recipient": "+15550199", "channel": "whatsapp"}]}
    assert api.post_json("/v1/pause", escalated, headers=api.as_key(key), status=422).json["error"]["field"] == "options"
    assert stored(api.config, "SELECT count(*) FROM pauses") == [(0,)]
    # Only a text reply reads them so: by email, or in their own places, they are fine.
    api.post_json("/v1/pause", {**asked, "channel": "email", "recipient": "ada@example.com"}, headers=api.as_key(key))
    api.post_json("/v1/pause", {**asked, "options": ["1", "2", "3"]}, headers=api.as_key(key))
    assert stored(api.config, "SELECT count(*) FROM pauses") == [(2,)]


@pytest.mark.parametrize("reply", ["{code} 1", "1 {code}", "{lower} approve", "{code}: 1", "Approve {lower}."])
def test_a_reply_naming_a_code_decides_exactly_that_pause_whoever_asked_later(sms_setup, reply):
    api, config, keys = sms_setup
    other = api.register(email="b@example.com")
    office_fund = api.create_pause(keys["api_key"], message="send $10 to the office fund?")
    wire = api.create_pause(other["api_key"], message="wire $50,000 to account 998877?")
    code = reply_code(api, keys["api_key"], office_fund)
    assert code != reply_code(api, other["api_key"], wire)
    response = inbound(api, config, reply.format(code=code, lower=code.lower()))
    assert 'recorded Approve for "send $10 to the office fund?"' in response.text
    assert api.pause(keys["api_key"], office_fund["pause_id"])["choice"] == "Approve"
    assert api.pause(other["api_key"], wire["pause_id"])["status"] == "pending"


def test_a_bare_reply_with_several_pending_decides_nothing_and_lists_the_codes(sms_setup):
    api, config, keys = sms_setup
    other = api.register(email="b@example.com")
    office_fund = api.create_pause(keys["api_key"], message="send $10 to the office fund?")
    wire = api.create_pause(other["api_key"], message="wire $50,000 to account 998877 for the Q3 supplier invoice?")
    response = inbound(api, config, "1")
    assert "2 requests are open" in response.text
    assert f"{reply_code(api, keys['api_key'], office_fund)}: \"send $10 to the office fund?\"" in response.text
    assert f"{reply_code(api, other['api_key'], wire)}: \"wire $50,000 to account 998877 for th...\"" in response.text
    assert stored(config, "SELECT count(*) FROM pauses WHERE status = 'pending'") == [(2,)]
    assert stored(config, "SELECT count(*) FROM audit_events WHERE event_type = 'pause.responded'") == [(0,)]


OURS, THEIRS = {"recipient": "+15550100", "channel": "sms"}, {"recipient": "+15550101", "channel": "sms"}
# Earlier team pauses that asked +15550100: their people, the approvals they need, and who answered
# by text (None: the first person, on their page).
EARLIER_TEAMS = {
    "vote on a team pause still pending": ([OURS, THEIRS], 2, "+15550100"),
    "later person of a team pause": ([THEIRS, OURS], 1, "+15550101"),
    "later person of a team pause, never sent": ([{"recipient": "ops-lead", "channel": "link"}, OURS], 1, None),
    "later person of a team pause, on whatsapp": ([THEIRS, {**OURS, "channel": "whatsapp"}], 1, "+15550101"),
}


def close_earlier(api, twilio, keys, how):
    """A pause that asked +15550100, closed (or given its vote) `how`."""
    if how.endswith("never sent"):
        twilio.fail_next = [400]                    # refused for good: the text never went out
    if how in EARLIER_TEAMS:
        people, count, replier = EARLIER_TEAMS[how]
        team = {**QUESTION, "recipients": people, "quorum": {"choice": "Approve", "count": count}}
        earlier = api.post_json("/v1/pause", team, headers=api.as_key(keys["api_key"])).json
        api.step("notifications")
        if replier:
            assert "recorded Approve" in inbound(api, api.config, "1", sender=replier).text
        else:
            api.post_json(f"/v1/respond/{token_of(earlier['recipients'][0]['respond_url'])}", {"choice": "Approve"})
        return
    earlier = api.create_pause(keys["test_api_key" if how == "in test mode" else "api_key"],
                               message="send $10 to the office fund?", channel="whatsapp" if how == "on whatsapp" else "sms")
    if how == "from before reply codes":
        stored(api.config, "UPDATE pauses SET reply_code = NULL WHERE id = ?", earlier["pause_id"])
    if how in ("timed out", "out of time, its timeout not yet run"):
        run_out(api.config, earlier["pause_id"])
        if how == "timed out":
            api.step("timeouts")
    else:
        api.post_json(f"/v1/respond/{token_of(earlier['respond_url'])}", {"choice": "Approve"})


@pytest.mark.parametrize("how, in_the_conversation", [
    ("timed out", True), ("out of time, its timeout not yet run", True), ("answered on its page", True),
    ("from before reply codes", True), ("later person of a team pause", True),
    ("vote on a team pause still pending", True), ("never sent", False),
    ("later person of a team pause, never sent", False), ("on whatsapp", False),
    ("later person of a team pause, on whatsapp", False), ("in test mode", False)])
def test_a_bare_reply_answers_the_open_request_only_when_no_other_in_the_conversation_closed_lately(
        sms_setup, twilio, how, in_the_conversation):
    """Just after another closed, the person may be answering that one, late: the reply must name a code."""
    api, config, keys = sms_setup
    close_earlier(api, twilio, keys, how)
    wire = api.create_pause(keys["api_key"], message="wire $50,000 to account 998877?")
    if in_the_conversation:
        response = inbound(api, config, "1")
        assert "could be meant for another request to this number" in response.text
        assert f"{reply_code(api, keys['api_key'], wire)}: \"wire $50,000 to account 998877?\"" in response.text
        assert stored(config, "SELECT count(*) FROM audit_events WHERE pause_id = ? AND event_type = 'pause.responded'",
                      wire["pause_id"]) == [(0,)]
        # Asked long enough after the other closed, it is the only request in the conversation.
        stored(config, "UPDATE pauses SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+16 minutes')"
                       " WHERE id = ?", wire["pause_id"])
    assert 'recorded Reject for "wire $50,000' in inbound(api, config, "2").text
    assert stored(config, "SELECT choice FROM pauses WHERE id = ?", wire["pause_id"]) == [("Reject",)]


@pytest.mark.parametrize("asked_as", [OURS, {"recipients": [THEIRS, OURS]}], ids=["first", "later person of a team"])
def test_a_bare_reply_is_not_taken_for_the_open_request_while_another_text_to_the_number_is_being_sent(sms_setup,
                                                                                                       asked_as):
    """The person may be answering the text arriving now, whose pause a reply cannot decide yet."""
    api, config, keys = sms_setup
    api.create_pause(keys["api_key"], message="wire $50,000 to account 998877?")
    arriving = api.post_json("/v1/pause", {**QUESTION, "message": "send $10 to the office fund?", **asked_as},
                             headers=api.as_key(keys["api_key"])).json
    api.step("notifications")                                       # to the team's first person, if any
    stored(config, "UPDATE notifications SET status = 'sending' WHERE pause_id = ? AND recipient = ?",
           arriving["pause_id"], OURS["recipient"])
    assert "could be meant for another request" in inbound(api, config, "1").text
    api.post_json(f"/v1/pause/{arriving['pause_id']}/cancel", {}, headers=api.as_key(keys["api_key"]))
    assert "could be meant for another request" in inbound(api, config, "1").text       # a text in flight goes out
    stored(config, "UPDATE notifications SET status = 'cancelled' WHERE pause_id = ?", arriving["pause_id"])
    assert 'recorded Approve for "wire $50,000' in inbound(api, config, "1").text       # it never did


def thousands_of_instructions(conn, work):
    """The SQLite instructions (in thousands) that `work()` runs on `conn`."""
    counted = []
    conn.set_progress_handler(lambda: counted.append(1), 1000)
    try:
        work()
    finally:
        conn.set_progress_handler(None, 0)
    return len(counted)


def closed_unsent(config, pause_id, count, team_people=False):
    """`count` more live pauses to the pause's number, like it, cancelled now before any text went
    out (no notification reached the number); with team_people, each with a later person there too."""
    stored(config, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) INSERT INTO pauses"
                   " (id, developer_id, livemode, recipient, channel, message, options, status, decided_at,"
                   " respond_token, created_at, expires_at) SELECT id || '_' || i, developer_id, 1, recipient, channel,"
                   " message, options, 'cancelled', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), respond_token || '_' || i,"
                   " created_at, expires_at FROM n, pauses WHERE id = ?", count, pause_id)
    if team_people:
        stored(config, "INSERT INTO pause_recipients (pause_id, developer_id, position, livemode, recipient, channel,"
                       " respond_token, reply_code, added_by, added_at, pause_decided_at) SELECT id, developer_id, 1,"
                       " 1, recipient, channel, 'r' || respond_token, 'Z9', 'request', created_at, decided_at"
                       " FROM pauses WHERE id LIKE ? || '\\_%' ESCAPE '\\'", pause_id)


@pytest.mark.parametrize("then", ["refused", "cut short each time"])
def test_a_send_a_crash_cut_short_may_have_reached_the_person_and_is_made_again_in_its_turn(sms_setup, twilio, then):
    """The first send may have gone out before the crash: a later refusal does not undo it,
    and the person's reply counts. Nor does a crash loop send the text again and again: a
    cut-short send counts as an attempt, and the next waits out the backoff."""
    api, config, keys = sms_setup
    wire = api.post_json("/v1/pause", WIRE, headers=api.as_key(keys["api_key"])).json
    lapsed = pausepoint.db_time(pausepoint.utcnow() - dt.timedelta(seconds=1))
    for attempt in range(1, pausepoint.NOTIFICATION_ATTEMPTS + 1 if then == "cut short each time" else 2):
        stored(config, "UPDATE notifications SET status = 'sending', attempts = ?, next_attempt_at = ?", attempt, lapsed)
        before = pausepoint.utcnow() - dt.timedelta(milliseconds=1)         # (stored to the millisecond)
        api.step("notifications")
        [(status, reached, due, error)] = stored(
            config, "SELECT status, may_have_reached, next_attempt_at, last_error FROM notifications")
        assert (reached, error) == (1, pausepoint.INTERRUPTED_SEND) and twilio.messages == []
        if attempt < pausepoint.NOTIFICATION_ATTEMPTS:
            backoff = dt.timedelta(seconds=pausepoint.NOTIFICATION_BACKOFF_SECONDS[attempt - 1])
            assert status == "queued" and pausepoint.parse_db_time(due) >= before + backoff
    if then == "refused":
        twilio.fail_next = [400]                            # the text sent again is refused for good
        stored(config, "UPDATE notifications SET next_attempt_at = ?", lapsed)
        api.step("notifications")
    expected_attempts = 2 if then == "refused" else pausepoint.NOTIFICATION_ATTEMPTS
    assert stored(config, "SELECT status, attempts, may_have_reached FROM notifications") == [
        ("failed", expected_attempts, 1)]
    [failed] = stored(config, "SELECT data FROM audit_events WHERE event_type = 'notification.failed'")
    assert json.loads(failed[0])["may_have_reached"] is True
    assert api.pause(keys["api_key"], wire["pause_id"])["notification"]["may_have_reached"] is True
    assert 'recorded Approve for "' in inbound(api, config, "1").text


def test_a_last_send_a_crash_cut_short_for_a_pause_that_ran_out_meanwhile_waits_for_the_timeout(sms_setup):
    """The pause ran out while the server was down: the timeout comes first, and the text's
    end is its pause's, not a pause.notification_failed beside pause.timed_out."""
    api, config, keys = sms_setup
    wire = api.post_json("/v1/pause", WIRE, headers=api.as_key(keys["api_key"])).json
    stored(config, "UPDATE notifications SET status = 'sending', attempts = ?, next_attempt_at = ?",
           pausepoint.NOTIFICATION_ATTEMPTS, pausepoint.db_time(pausepoint.utcnow() - dt.timedelta(seconds=1)))
    run_out(config, wire["pause_id"])
    api.step("notifications")
    assert stored(config, "SELECT status, may_have_reached FROM notifications") == [("queued", 1)]
    api.step("timeouts")
    assert stored(config, "SELECT status, may_have_reached FROM notifications") == [("cancelled", 1)]
    assert stored(config, "SELECT count(*) FROM audit_events WHERE event_type = 'notification.failed'") == [(0,)]
    assert api.pause(keys["api_key"], wire["pause_id"])["status"] == "timed_out"


def test_a_text_whose_sending_a_crash_cut_short_may_have_reached_the_person(sms_setup):
    """Its pause closed before the claim lapsed: the text is not sent again, but it may have gone out."""
    api, config, keys = sms_setup
    api.create_pause(keys["api_key"], message="wire $50,000 to account 998877?")
    crashed = api.post_json("/v1/pause", {**WIRE, "message": "send $10 to the office fund?"},
                            headers=api.as_key(keys["api_key"])).json
    stored(config, "UPDATE notifications SET status = 'sending', attempts = 1, next_attempt_at = ? WHERE pause_id = ?",
           pausepoint.db_time(pausepoint.utcnow() - dt.timedelta(seconds=1)), crashed["pause_id"])
    api.post_json(f"/v1/pause/{crashed['pause_id']}/cancel", {}, headers=api.as_key(keys["api_key"]))
    api.step("notifications")
    assert stored(config, "SELECT status, may_have_reached FROM notifications WHERE pause_id = ?",
                  crashed["pause_id"]) == [("cancelled", 1)]
    assert "could be meant for another request" in inbound(api, config, "1").text


@pytest.mark.parametrize("cancelled, unclear", [(pausepoint.CLOSED_READ_AT_MOST - 1, False),
                                                (pausepoint.CLOSED_READ_AT_MOST, True)])
def test_past_a_bound_of_closed_requests_to_the_number_a_bare_reply_is_asked_for_its_code(sms_setup, cancelled,
                                                                                          unclear):
    """Requests to the number closed before their texts went out never reached the person; but
    past a bound they are not all read under the write lock, and the reply is asked for its code."""
    api, config, keys = sms_setup
    wire = api.create_pause(keys["api_key"], message="wire $50,000 to account 998877?")
    closed_unsent(config, wire["pause_id"], cancelled)
    assert ("could be meant for another request" in inbound(api, config, "1").text) is unclear
    assert stored(config, "SELECT status FROM pauses WHERE id = ?", wire["pause_id"]) == [
        ("pending" if unclear else "responded",)]


def test_a_bare_reply_reads_no_more_of_the_numbers_closed_requests_than_the_bound(sms_setup):
    api, config, keys = sms_setup
    wire = api.create_pause(keys["api_key"], message="wire $50,000 to account 998877?")
    conn = api.app.runtime.db()

    def reply():        # a bare reply that decides nothing whatever it finds: no option 9
        assert "could be meant" in pausepoint.record_sms_reply(conn, config, WIRE["recipient"], "9",
                                                               "SM" + uuid.uuid4().hex)

    def work():
        return thousands_of_instructions(conn, reply)

    closed_unsent(config, wire["pause_id"], pausepoint.CLOSED_READ_AT_MOST, team_people=True)
    at_the_bound = work()
    stored(config, "DELETE FROM pause_recipients")
    stored(config, "DELETE FROM pauses WHERE id != ?", wire["pause_id"])
    closed_unsent(config, wire["pause_id"], 20 * pausepoint.CLOSED_READ_AT_MOST, team_people=True)
    assert work() <= at_the_bound + 1


def test_a_bare_reply_is_not_taken_for_a_request_open_while_another_closed(sms_setup):
    """Asked an hour ago, and open while another to the number closed: which one is meant is unknown."""
    api, config, keys = sms_setup
    wire = api.create_pause(keys["api_key"], message="wire $50,000 to account 998877?")
    stored(config, "UPDATE pauses SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-60 minutes') WHERE id = ?",
           wire["pause_id"])
    office_fund = api.create_pause(keys["api_key"], message="send $10 to the office fund?")
    inbound(api, config, f"{reply_code(api, keys['api_key'], office_fund)} 1")
    assert "could be meant for another request" in inbound(api, config, "1").text
    assert stored(config, "SELECT status FROM pauses WHERE id = ?", wire["pause_id"]) == [("pending",)]
    code = reply_code(api, keys["api_key"], wire)
    assert 'recorded Approve for "wire $50,000' in inbound(api, config, f"{code} 1").text


def test_a_reply_never_decides_a_pause_whose_message_went_to_another_number(sms_setup):
    api, config, keys = sms_setup
    theirs = api.create_pause(keys["api_key"])
    code = reply_code(api, keys["api_key"], theirs)
    assert answered_nothing(inbound(api, config, f"{code} 1", sender="+15550199"))      # never asked: not even told so
    mine = api.create_pause(keys["api_key"], recipient="+15550199")
    mine_code = reply_code(api, keys["api_key"], mine)
    if mine_code != code:       # codes are unique per number; another number may reuse one
        assert f"no open request has the code {code}" in inbound(api, config, f"{code} 1", sender="+15550199").text
    assert stored(config, "SELECT count(*) FROM pauses WHERE status = 'pending'") == [(2,)]


@pytest.mark.parametrize("failure", [400, 503, "unreachable"])
def test_a_reply_never_decides_a_pause_whose_text_was_not_sent(sms_setup, twilio, failure):
    api, config, keys = sms_setup
    other = api.register(email="b@example.com")
    answered = api.create_pause(keys["api_key"], message="A: order lunch?")
    api.post_json(f"/v1/respond/{token_of(answered['respond_url'])}", {"choice": "Approve"})
    if failure == "unreachable":
        twilio.close()                          # nothing listens: no message went anywhere
    else:
        twilio.fail_next = [failure]            # refused for good, or failed and waiting for its retry
    unsent = api.create_pause(other["api_key"], message="B: delete production database?")
    assert api.pause(other["api_key"], unsent["pause_id"])["notification"]["status"] in ("failed", "queued")
    queued = Api(api.app).create_pause(other["api_key"], message="B: and the backups?")   # never sent at all
    assert "no open request" in inbound(api, config, "1").text
    for pause in (unsent, queued):
        assert api.pause(other["api_key"], pause["pause_id"])["status"] == "pending"
    assert stored(config, "SELECT count(*) FROM audit_events WHERE event_type = 'pause.responded'"
                          " AND actor LIKE 'recipient:%' AND data LIKE '%\"via\":\"sms\"%'") == [(0,)]


@pytest.mark.parametrize("people, unanswered", [
    (["+15550100"], "late"), (["+15550101", "+15550102"], "late"), (["+15550100"], "hung up")],
    ids=["its person", "a team's second person", "hung up on"])
def test_a_text_twilio_took_but_never_answered_may_still_be_answered(running_api, twilio, people, unanswered):
    """Twilio's API takes no idempotency key, so a message it took but did not answer for (past the
    deadline, or hanging up) cannot be asked about: it may have been sent, and its reply counts,
    though the send ends failed."""
    api = running_api(**twilio.settings(), **{"outbound.deadline_seconds": 1})
    key = api.register()["api_key"]
    asked = WIRE if len(people) == 1 else {**QUESTION, "quorum": {"choice": "Approve", "count": 2},
                                           "recipients": [{"recipient": number, "channel": "sms"} for number in people]}
    if unanswered == "late":
        twilio.answer_late = [1.5] * len(people)
    else:
        twilio.hang_up = len(people)
    created = api.post_json("/v1/pause", asked, headers=api.as_key(key)).json
    api.step("notifications")
    said = "Twilio did not answer within 1 s" if unanswered == "late" else "no answer from Twilio: "
    assert [(status, error.startswith(said) and error.endswith("; Twilio may have sent it")) for status, error in
            stored(api.config, "SELECT status, last_error FROM notifications")] == [("queued", True)] * len(people)
    twilio.fail_next = [400] * len(people)        # and the retries are refused for good
    skip_the_backoff(api.config)
    api.step("notifications")
    assert stored(api.config, "SELECT DISTINCT status FROM notifications") == [("failed",)]
    # The agent is told the question failed, and that it may have reached the person all the same.
    failed = api.get("/v1/audit", {"event_type": "notification.failed"}, headers=api.as_key(key)).json["events"]
    assert [(e["data"]["may_have_reached"], "HTTP 400" in e["data"]["error"]) for e in failed] == [(True, True)] * len(people)
    shown = api.pause(key, created["pause_id"])
    assert shown["notification"]["may_have_reached"] is True
    assert [person["notification_may_have_reached"] for person in shown.get("recipients", [])] == (
        [True] * len(people) if len(people) > 1 else [])                 # a team shows each person's
    [text] = [m["Body"] for m in twilio.messages if m["To"] == people[-1]]       # the person has it
    code = re.search(r"Reply ([A-Z][2-9][A-Z]?) 1 for Approve", text).group(1)
    assert "recorded Approve" in inbound(api, api.config, f"{code} 1", sender=people[-1]).text
    pause = api.pause(key, created["pause_id"])
    voted = [(vote["recipient"], vote["choice"]) for vote in pause.get("votes", [])]
    assert (pause["status"], voted) == (("responded", []) if len(people) == 1 else ("pending", [(people[1], "Approve")]))


def test_codes_are_unique_among_a_numbers_pending_pauses(sms_setup):
    api, config, keys = sms_setup
    for _ in range(40):
        api.create_pause(keys["test_api_key"])
    codes = [code for (code,) in stored(config, "SELECT reply_code FROM pauses")]
    assert len(set(codes)) == 40 and all(re.fullmatch(r"[A-HJKMNP-Z][2-9]", code) for code in codes)


def test_a_decided_pauses_code_is_not_given_to_the_next_pauses_for_a_week(sms_setup):
    api, config, keys = sms_setup
    key = keys["test_api_key"]
    cancelled = api.create_pause(key, timeout_hours=400)
    stored(config, "UPDATE pauses SET created_at = '2000-01-01T00:00:00.000Z'")     # asked long ago, decided now
    api.post(f"/v1/pause/{cancelled['pause_id']}/cancel", headers=api.as_key(key))
    for _ in range(90):
        api.create_pause(key)
    codes = [code for (code,) in stored(config, "SELECT reply_code FROM pauses ORDER BY seq")]
    assert codes[0] not in codes[1:] and len(set(codes)) == 91


def test_a_text_from_a_number_no_live_pause_asked_lately_gets_no_answer(sms_setup):
    """Every answer is a paid text to the number that wrote: answering strangers would let
    whoever holds premium-rate numbers earn a text from the operator for each text they send."""
    api, config, keys = sms_setup
    assert answered_nothing(inbound(api, config, "hello", sender="+15550177"))
    asked = api.create_pause(keys["api_key"], recipient="+15550177")
    api.post_json(f"/v1/respond/{token_of(asked['respond_url'])}", {"choice": "Approve"})
    assert "no open request for this number" in inbound(api, config, "1", sender="+15550177").text
    stored(config, "UPDATE pauses SET decided_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-6 days') WHERE id = ?",
           asked["pause_id"])
    assert "no open request for this number" in inbound(api, config, "1", sender="+15550177").text
    stored(config, "UPDATE pauses SET decided_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-8 days') WHERE id = ?",
           asked["pause_id"])
    assert answered_nothing(inbound(api, config, "1", sender="+15550177"))
    Api(api.app).create_pause(keys["api_key"], recipient="+15550177")     # its text not sent yet: on its way
    assert "no open request for this number" in inbound(api, config, "1", sender="+15550177").text
    assert stored(config, "SELECT count(*) FROM sms_replies") == [(5,)]         # each taken once all the same


def test_a_number_asked_once_is_answered_a_bounded_number_of_texts_that_decide_nothing(sms_setup):
    """One live pause made a number one the server answers for a week: had every text it sent
    back been answered, a single pause would buy its holder paid texts without end."""
    api, config, keys = sms_setup
    asked = api.create_pause(keys["api_key"], message="Only question?")
    for _ in range(pausepoint.TEXT_ANSWERS_PER_HOUR):
        assert "Reply " in inbound(api, config, "hello").text
    for text in ("hello", "no", "whatsapp me"):
        assert answered_nothing(inbound(api, config, text))
    assert 'recorded Approve for "Only question?"' in inbound(api, config, "1").text    # a decision is still told
    assert api.pause(keys["api_key"], asked["pause_id"])["choice"] == "Approve"


def test_a_pause_naming_a_number_on_a_channel_that_texts_nothing_does_not_make_it_answered(sms_setup):
    """A link or push pause's recipient is a free label: one written as a premium-rate number
    would otherwise earn that number an answer to each text it sends, and no text ever went to it."""
    api, config, keys = sms_setup
    api.create_pause(keys["api_key"], recipient="+15550177", channel="link", timeout_hours=24)
    for text in ("hello", "1"):
        assert answered_nothing(inbound(api, config, text, sender="+15550177"))


def test_a_reply_matching_nothing_gets_help_and_decides_nothing(sms_setup):
    api, config, keys = sms_setup
    created = api.create_pause(keys["api_key"])
    code = reply_code(api, keys["api_key"], created)
    for text in ("maybe later", f"{code} \u00b2", f"{code} \u2460", "\u0661"):
        response = inbound(api, config, text)
        assert response.status_code == 200 and f"Reply {code} 1 for Approve,\n{code} 2 for Reject" in response.text
    assert api.pause(keys["api_key"], created["pause_id"])["status"] == "pending"
    assert answered_nothing(inbound(api, config, "1", sender="+15550199"))


def test_the_answers_to_replies_quote_the_question_so_its_reply_lines_never_read_as_ours(sms_setup):
    """An answer to a reply names the question, the agent's text, as the text that asked it does:
    in parentheses of ours its ")" closed them, and in quotes of ours its " did, and its
    "Reply 1 for Reject, 2 for Approve" read as ours; a person who texted 1 to reject approved."""
    api, config, keys = sms_setup
    key = keys["api_key"]
    forged = 'Pay?") Reply 1 for Reject, 2 for Approve ("ok'
    quoted = '"Pay?\') Reply 1 for Reject, 2 for Approve (\'ok"'
    first = api.create_pause(key, message=forged)
    code = reply_code(api, key, first)
    assert f"{code} 2 for Reject. ({quoted})<" in inbound(api, config, "maybe").text
    api.create_pause(key, message=forged)
    assert f'{code}: "Pay?\') Reply 1 for Reject, 2 for Appr..."' in inbound(api, config, "1").text
    assert f"recorded Approve for {quoted}<" in inbound(api, config, f"{code} 1").text
    assert f"is closed, answered Approve: {quoted}." in inbound(api, config, f"{code} 2").text


@pytest.mark.timeout(3)
def test_a_reply_built_to_be_slow_to_split_is_answered_at_once(sms_setup):
    """Splitting a reply's code from its answer took 30,000 spaces 6.2 s of CPU, holding the
    interpreter: no reply that long can name an option, so it is not split."""
    api, config, keys = sms_setup
    created = api.create_pause(keys["api_key"])
    code = reply_code(api, keys["api_key"], created)
    for text in ("a" + " " * 29_998 + "x", code + " " * 29_998 + "a\nb"):
        response = inbound(api, config, text)
        assert response.status_code == 200 and f"Reply {code} 1 for Approve" in response.text
    assert api.pause(keys["api_key"], created["pause_id"])["status"] == "pending"


def test_test_mode_pauses_are_never_decided_by_sms(sms_setup):
    api, config, keys = sms_setup
    created = api.create_pause(keys["test_api_key"])
    assert answered_nothing(inbound(api, config, "1"))        # no live pause asked the number: nothing to say
    assert api.pause(keys["test_api_key"], created["pause_id"])["status"] == "pending"


def test_a_whatsapp_reply_decides_the_whatsapp_pause(sms_setup):
    api, config, keys = sms_setup
    sms = api.create_pause(keys["api_key"])
    whatsapp = api.create_pause(keys["api_key"], channel="whatsapp", message="Via WhatsApp?")
    assert reply_code(api, keys["api_key"], sms) != reply_code(api, keys["api_key"], whatsapp)
    inbound(api, config, "1", sender="whatsapp:+15550100")
    assert api.pause(keys["api_key"], whatsapp["pause_id"])["choice"] == "Approve"
    assert api.pause(keys["api_key"], sms["pause_id"])["status"] == "pending"


@pytest.mark.parametrize("asked_on, replied_from", [("whatsapp", "+15550100"), ("sms", "whatsapp:+15550100")])
def test_a_reply_on_the_other_channel_decides_nothing_and_says_where_the_request_was_sent(sms_setup, asked_on,
                                                                                          replied_from):
    """Not that the number has no open request: it has one, in the other conversation."""
    api, config, keys = sms_setup
    created = api.create_pause(keys["api_key"], channel=asked_on, message="Via the other app?")
    code = reply_code(api, keys["api_key"], created)
    where = {"sms": "by SMS", "whatsapp": "on WhatsApp"}[asked_on]
    for text in ("1", f"{code} 1"):
        response = inbound(api, config, text, sender=replied_from)
        assert f"PausePoint: the open request to this number was sent {where}; reply there." in response.text
    assert api.pause(keys["api_key"], created["pause_id"])["status"] == "pending"


@pytest.mark.parametrize("signature, token", [("", None), ("bm90IGEgc2lnbmF0dXJl", None), (None, "some-other-token")])
def test_unsigned_or_wrongly_signed_replies_are_refused(sms_setup, signature, token):
    api, config, keys = sms_setup
    created = api.create_pause(keys["api_key"])
    response = inbound(api, config, "1", signature=signature, token=token)
    assert response.status_code == 403 and response.json["error"]["code"] == "bad_signature"
    assert api.pause(keys["api_key"], created["pause_id"])["status"] == "pending"


def test_replies_are_refused_when_twilio_is_not_configured(api, developer, config):
    response = inbound(api, {**config, "twilio.auth_token": "anything"}, "1")
    assert response.status_code == 403 and response.json["error"]["code"] == "twilio_not_configured"
    assert response.json["error"]["message"].startswith("Twilio is not configured on this server")


def test_exactly_one_decision_wins_between_sms_replies_and_the_respond_page(tmp_path, twilio):
    config = make_config(tmp_path, **twilio.settings(), **{"ratelimit.enabled": False})
    app = pausepoint.create_app(config)
    app.runtime.start()
    with LiveServer(app, config) as server:
        keys = requests.post(f"{server.url}/v1/auth/register",
                             json={"email": "r@example.com", "name": "R", "password": "password123"}).json()
        auth = {"Authorization": f"Bearer {keys['api_key']}"}
        created = requests.post(f"{server.url}/v1/pause", json=WIRE, headers=auth).json()
        token = token_of(created["respond_url"])
        def by_sms(_):      # eight messages, each signed for the URL the server believes it has (server.base_url)
            params = {"From": "+15550100", "To": "+15559990000", "Body": "2", "MessageSid": "SM" + uuid.uuid4().hex}
            signature = RequestValidator(config["twilio.auth_token"]).compute_signature(
                pausepoint.base_url(config) + INBOUND_PATH, params)
            answer = requests.post(server.url + INBOUND_PATH, data=params, headers={"X-Twilio-Signature": signature})
            assert answer.status_code == 200, answer.text
            return answer.text

        def by_page(_):
            return requests.post(f"{server.url}/v1/respond/{token}", json={"choice": "Approve"}).status_code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            sms_futures = [pool.submit(by_sms, n) for n in range(8)]
            page_futures = [pool.submit(by_page, n) for n in range(8)]
            sms_answers = [f.result() for f in sms_futures]
            page_answers = [f.result() for f in page_futures]
        wins = sum("recorded" in a for a in sms_answers) + page_answers.count(200)
        assert wins == 1
        pause = requests.get(f"{server.url}/v1/pause/{created['pause_id']}", headers=auth).json()
        assert pause["choice"] == ("Reject" if any("recorded" in a for a in sms_answers) else "Approve")
        responded = requests.get(f"{server.url}/v1/audit", params={"event_type": "pause.responded"},
                                 headers=auth).json()["events"]
        assert len(responded) == 1


def through_proxy(monkeypatch, scheme, url):
    """Outbound calls to `scheme` URLs go through the proxy at `url`, as the environment says."""
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(f"{scheme.upper()}_PROXY", url)


def test_a_text_through_an_outbound_proxy_is_held_to_the_deadline(running_api, twilio, stubs, monkeypatch):
    """Twilio's library takes its proxy from the environment; a proxy that answers a byte at a
    time, each within the socket timeout, must not hold a send past its deadline."""
    proxy = stubs(TrickleReceiver, interval=0.2)
    through_proxy(monkeypatch, "http", proxy.url)       # the stub Twilio is plain http
    api = running_api(**twilio.settings(), **{"outbound.deadline_seconds": 1})
    key = api.register()["api_key"]
    pause = sent(api, key, api.create_pause(key)["pause_id"], "queued")
    assert pause["notification"]["last_error"] == "Twilio did not answer within 1 s; Twilio may have sent it"
    assert proxy.most_open == 1 and twilio.messages == []           # it went to the proxy, which kept it


def test_a_text_a_proxy_would_not_tunnel_never_went_out_and_its_reply_decides_nothing(running_api, twilio, stubs,
                                                                                      monkeypatch):
    """The CONNECT line goes to the proxy, not to Twilio: refused there, nothing was sent."""
    proxy = stubs(RefusingProxy)
    through_proxy(monkeypatch, "https", proxy.url)
    api = running_api(**{**twilio.settings(), "twilio.api_base": "https://api.twilio.example"})
    key = api.register()["api_key"]
    created = api.create_pause(key)
    notification = sent(api, key, created["pause_id"], "queued")["notification"]
    assert proxy.asked == ["CONNECT api.twilio.example:443 HTTP/1.0"]
    assert not notification["may_have_reached"] and "could not reach Twilio" in notification["last_error"]
    assert "no open request" in inbound(api, api.config, "1").text


def test_a_message_twilio_refuses_fails_at_once_without_retries(running_api, twilio):
    twilio.fail_next = [400]
    api = running_api(**twilio.settings())
    key = api.register()["api_key"]
    pause = sent(api, key, api.create_pause(key)["pause_id"], "failed")
    assert pause["notification"]["attempts"] == 1 and "HTTP 400" in pause["notification"]["last_error"]
    assert pause["status"] == "pending"


def test_twilio_rate_limiting_is_retried(running_api, twilio):
    twilio.fail_next = [429]
    api = running_api(**twilio.settings())
    key = api.register()["api_key"]
    pause = sent(api, key, api.create_pause(key)["pause_id"], "queued")
    assert "429" in pause["notification"]["last_error"]


def test_a_second_developers_wire_is_never_approved_by_a_reply_meant_for_the_first(spawn_server, twilio):
    settings = {**twilio.settings(), "server.base_url": "https://pp.example.org"}
    server = spawn_server(env={f"PAUSEPOINT_{k.replace('.', '_').upper()}": v for k, v in settings.items()})

    def developer(email):
        keys = requests.post(f"{server.url}/v1/auth/register",
                             json={"email": email, "name": "N", "password": "password123"}).json()
        return {"Authorization": f"Bearer {keys['api_key']}"}

    def reply(body):
        params = {"From": "+15550123", "To": "+15559990000", "Body": body, "MessageSid": "SM" + uuid.uuid4().hex}
        signature = RequestValidator(twilio.auth_token).compute_signature(settings["server.base_url"] + INBOUND_PATH,
                                                                          params)
        return requests.post(server.url + INBOUND_PATH, data=params, headers={"X-Twilio-Signature": signature}).text

    a, b = developer("a@example.com"), developer("b@example.com")
    fund = requests.post(f"{server.url}/v1/pause", headers=a,
                         json={**WIRE, "recipient": "+15550123", "message": "send $10 to the office fund?"}).json()
    wire = requests.post(f"{server.url}/v1/pause", headers=b,
                         json={**WIRE, "recipient": "+15550123", "message": "wire $50,000 to account 998877?"}).json()
    # Both texts delivered, and recorded as sent (a text still being sent counts for no reply).
    wait_until(lambda: all(requests.get(f"{server.url}/v1/pause/{pause['pause_id']}", headers=who).json()
                           ["notification"]["status"] == "sent" for pause, who in ((fund, a), (wire, b))))
    fund_text = next(m["Body"] for m in twilio.messages if "office fund" in m["Body"])
    code = re.search(r"Reply ([A-Z][2-9]) 1 for Approve", fund_text).group(1)
    assert "2 requests are open" in reply("1")                  # the person answers the first text, bare
    assert "recorded Approve" in reply(f"{code} 1")
    assert requests.get(f"{server.url}/v1/pause/{fund['pause_id']}", headers=a).json()["choice"] == "Approve"
    assert requests.get(f"{server.url}/v1/pause/{wire['pause_id']}", headers=b).json()["status"] == "pending"


def test_a_push_target_that_never_finishes_answering_is_given_up_at_the_deadline(running_api, stubs):
    trickler = stubs(TrickleReceiver, interval=0.2)
    api = running_api(**{"channels.ops.url": "json://" + trickler.url.removeprefix("http://"),
                         "outbound.deadline_seconds": 1})
    key = api.register()["api_key"]
    pause = sent(api, key, api.create_pause(key, channel="ops", recipient="on-call")["pause_id"], "queued")
    assert "no answer within 1 s" in pause["notification"]["last_error"]


def test_a_stop_gives_up_a_push_left_hanging_within_moments_not_at_its_deadline(running_api, stubs):
    """A push runs on a thread the server cannot interrupt, and the stop waited for it until its deadline."""
    trickler = stubs(TrickleReceiver, interval=0.2)
    api = running_api(jobs=True, **{"channels.ops.url": "json://" + trickler.url.removeprefix("http://"),
                                    "outbound.deadline_seconds": 60})
    key = api.register()["api_key"]
    api.create_pause(key, channel="ops", recipient="on-call")
    wait_until(lambda: trickler.open == 1)          # the push is under way
    asked_to_stop = time.monotonic()
    api.app.runtime.stop()
    assert time.monotonic() - asked_to_stop < pausepoint.STOP_CALLS_SECONDS + 5       # not 60 s
    [(status, error)] = stored(api.config, "SELECT status, last_error FROM notifications")
    assert status == "queued" and "as the server stopped" in error


def test_pushes_left_hanging_may_have_arrived_and_say_so_to_the_end(running_api, stubs):
    trickler = stubs(TrickleReceiver, interval=0.2)     # takes each push and holds its answer for minutes
    api = running_api(**{"channels.ops.url": "json://" + trickler.url.removeprefix("http://"),
                         "outbound.deadline_seconds": 1})
    key = api.register()["api_key"]
    for _ in range(3):
        api.create_pause(key, channel="ops", recipient="on-call")
    api.step("notifications")
    # Given up at the deadline, still running: the target has each push, and may act on it.
    assert stored(api.config, "SELECT status, attempts, may_have_reached FROM notifications") == [("queued", 1, 1)] * 3
    assert all(error.endswith("; the target may have it") for [error] in
               stored(api.config, "SELECT last_error FROM notifications"))
    for _ in range(2):      # refused unmade while the first calls still hang: the agent hears within the backoff
        skip_the_backoff(api.config)
        api.step("notifications")
    assert stored(api.config, "SELECT status, attempts, may_have_reached, last_error LIKE '%still hanging%'"
                              " FROM notifications") == [("failed", 3, 1, 1)] * 3
    failed = api.get("/v1/audit", {"event_type": "notification.failed"}, headers=api.as_key(key)).json["events"]
    assert [event["data"]["may_have_reached"] for event in failed] == [True] * 3


def test_a_push_target_slower_than_apprise_alone_waits_is_given_up_at_our_deadline(running_api, stubs):
    """Apprise stops reading an answer after 4 s of its own and says only that it failed, though
    the target has the push: within the deadline (10 s), the push is waited for, or given up on
    as one that may have arrived, never counted as one that did not."""
    slow = stubs(WebhookReceiver, delay=4.5)            # takes each push, answers after 4.5 s
    api = running_api(**{"channels.ops.url": "json://" + slow.url.removeprefix("http://")})
    key = api.register()["api_key"]
    pause = sent(api, key, api.create_pause(key, channel="ops", recipient="on-call")["pause_id"], "sent")
    assert len(slow.calls) == 1 and pause["notification"]["attempts"] == 1


# Every letter A-Z as `c`, and every digit 2-9 as `d`, to make codes of.
LETTERS_AND_DIGITS = ("WITH RECURSIVE letter(c, n) AS (SELECT 'A', 0 UNION ALL SELECT char(unicode(c) + 1), n + 1"
                      " FROM letter WHERE n < 25), digit(d) AS (SELECT 2 UNION ALL SELECT d + 1 FROM digit WHERE d < 9)")


def copies_with_codes(config, status, code, where="1"):
    """Copies of the first pause in `status`, one per reply code that the SQL expression
    `code` makes of a letter a.c, a digit d and a letter b.c (rows `where` allows)."""
    stored(config, f"{LETTERS_AND_DIGITS} INSERT OR IGNORE INTO pauses (id, developer_id, livemode, recipient, channel,"
                   " message, options, status, decided_at, respond_token, reply_code, created_at, expires_at)"
                   f" SELECT 'psr_' || {code}, developer_id, livemode, recipient, 'sms', 'm', options, ?,"
                   f" CASE ? WHEN 'pending' THEN NULL ELSE datetime('now') END, 'tok' || {code}, {code}, created_at,"
                   f" expires_at FROM letter a, digit, letter b, pauses WHERE pauses.seq = 1 AND ({where})",
           status, status)


def members_with_codes(config, code, where="1"):
    """Copies of the first team pause's second person, one per code as copies_with_codes() makes them."""
    stored(config, f"{LETTERS_AND_DIGITS} INSERT OR IGNORE INTO pause_recipients (pause_id, developer_id, position,"
                   " livemode, recipient, channel, respond_token, reply_code, added_by, added_at)"
                   f" SELECT pause_id, developer_id, 2 + unicode(a.c) * 1000 + d * 100 + unicode(b.c), livemode,"
                   f" recipient, channel, 'tok' || {code}, {code}, added_by, added_at"
                   f" FROM letter a, digit, letter b, pause_recipients WHERE position = 1 AND ({where})")


# Rows of letters that codes use (no I, L or O).
REAL_LETTERS = "a.c NOT IN ('I', 'L', 'O') AND b.c NOT IN ('I', 'L', 'O')"
# Codes of two characters, each once.
SHORT_CODES = ("a.c || d", f"b.c = 'A' AND {REAL_LETTERS}")


def code_of(config, created):
    return stored(config, "SELECT reply_code FROM pauses WHERE id = ?", created["pause_id"])[0][0]


@pytest.mark.parametrize("mode", ["api_key", "test_api_key"])
@pytest.mark.parametrize("held_by", ["pauses", "team members"])
def test_a_live_code_differs_from_every_developers_but_a_test_code_only_from_its_own(sms_setup, mode, held_by):
    """Replies from a number all come to the server's one Twilio number, so live codes are
    shared by every tenant. No reply answers a test pause: another tenant's test pauses to
    a number hold none of its codes."""
    api, config, keys = sms_setup
    other = api.register(email="other@example.com")
    if held_by == "pauses":             # the other developer's pauses hold every short code
        api.create_pause(other[mode])
        copies_with_codes(config, "pending", *SHORT_CODES)
    else:                               # the second person of their team pauses does
        api.post_json("/v1/pause", {**QUESTION, "recipients": [{"recipient": "+15550199", "channel": "sms"},
                                                               {"recipient": WIRE["recipient"], "channel": "sms"}]},
                      headers=api.as_key(other[mode]))
        members_with_codes(config, *SHORT_CODES)
        assert len(code_of(config, api.create_pause(other[mode]))) == 3      # theirs, in either mode
    held = stored(config, "SELECT reply_code FROM pauses UNION SELECT reply_code FROM pause_recipients")
    assert set(pausepoint.SHORT_REPLY_CODES) <= {code for (code,) in held}
    mine = code_of(config, api.create_pause(keys[mode]))
    assert len(mine) == (3 if mode == "api_key" else 2)


def test_one_developer_may_hold_only_their_share_of_a_numbers_live_codes(running_api, twilio):
    """A number's live codes are every developer's: one who may create thousands of live
    pauses a month must not hold them all, leaving another's question to it none."""
    api = SmsApi(running_api(**twilio.settings(), **{"pauses.max_pending_per_number": 2,
                                                     "plans.free.monthly_pauses": 10}).app)
    mine, theirs = api.register()["api_key"], api.register(email="other@example.com")["api_key"]
    first = api.create_pause(mine)
    api.post_json("/v1/pause", {**QUESTION, "recipients": [{"recipient": "+15550199", "channel": "sms"},
                                                           {"recipient": WIRE["recipient"], "channel": "sms"}]},
                  headers=api.as_key(mine))             # a team pause's second person holds a code too
    refused = api.post_json("/v1/pause", WIRE, headers=api.as_key(mine), status=429).json["error"]
    assert refused["code"] == "too_many_pending" and refused["field"] == "recipient"
    assert "2 or more live pauses pending to +15550100" in refused["message"]
    assert "pauses.max_pending_per_number" in refused["message"]
    assert stored(api.config, "SELECT live_pauses FROM monthly_usage") == [(2,)]     # the refused one is not spent
    for n, people in enumerate(([WIRE["recipient"], "+15550198"], ["+15550198", WIRE["recipient"]])):
        team = {**QUESTION, "recipients": [{"recipient": number, "channel": "sms"} for number in people]}
        refused = api.post_json("/v1/pause", team, headers=api.as_key(mine), status=429).json["error"]
        assert refused["field"] == f"recipients[{n}].recipient"       # as the body names the person
    api.create_pause(theirs)
    api.create_pause(mine, recipient="+15550198")
    api.create_pause(api.register(email="third@example.com")["test_api_key"])   # test codes are apart
    api.post_json(f"/v1/pause/{first['pause_id']}/cancel", {}, headers=api.as_key(mine))
    api.create_pause(mine)


def test_a_refusal_for_a_numbers_share_never_says_fewer_pending_than_there_are(running_api, twilio):
    """The operator may lower pauses.max_pending_per_number below what a developer holds:
    the refusal must not tell them they have only as many as the new limit."""
    settings = {**twilio.settings(), "plans.free.monthly_pauses": 10}
    api = SmsApi(running_api(**settings, **{"pauses.max_pending_per_number": 3}).app)
    key = api.register()["api_key"]
    for _ in range(3):
        api.create_pause(key)
    api.app.runtime.stop()
    lowered = SmsApi(running_api(**settings, **{"pauses.max_pending_per_number": 2}).app)
    message = lowered.post_json("/v1/pause", WIRE, headers=lowered.as_key(key), status=429).json["error"]["message"]
    assert "you have 2 live pauses" not in message
    assert "2 or more live pauses pending to +15550100" in message


def test_another_developers_test_pauses_never_use_up_a_numbers_codes(sms_setup):
    api, config, keys = sms_setup
    other = api.register(email="other@example.com")["test_api_key"]
    api.create_pause(other)
    copies_with_codes(config, "pending", "a.c || d || b.c", REAL_LETTERS)
    copies_with_codes(config, "pending", *SHORT_CODES)
    assert stored(config, "SELECT count(*) FROM pauses WHERE status = 'pending'") == [(4416,)]      # every code
    refused = api.post_json("/v1/pause", WIRE, headers=api.as_key(other), status=429).json["error"]
    assert refused["code"] == "too_many_pending" and "of your test pauses" in refused["message"]
    assert len(code_of(config, api.create_pause(keys["test_api_key"]))) == 2


def test_a_number_flooded_with_decided_pauses_still_gets_codes(sms_setup):
    api, config, keys = sms_setup
    key = keys["test_api_key"]
    api.create_pause(key)               # a developer, and a pause to copy
    copies_with_codes(config, "cancelled", "a.c || d || b.c")
    copies_with_codes(config, "cancelled", "a.c || d", "b.c = 'A'")
    stored(config, "UPDATE pauses SET decided_at = strftime('%Y-%m-%dT%H:%M:%S.000Z', 'now') WHERE seq > 1")
    stored(config, "UPDATE pauses SET decided_at = strftime('%Y-%m-%dT%H:%M:%S.000Z', 'now', '-6 days')"
                   " WHERE reply_code = 'K7M'")
    created = api.create_pause(key)      # every code was used this week: the one decided longest ago is reused
    assert stored(config, "SELECT reply_code FROM pauses WHERE id = ?", created["pause_id"]) == [("K7M",)]


def test_a_new_live_code_for_a_flooded_number_reads_none_of_its_older_history(sms_setup):
    """With every code decided this week, a new live code reads the number's codes in use, under
    the write lock: those pending or decided this week, not its pauses decided before."""
    api, config, keys = sms_setup
    api.create_pause(keys["api_key"])                                   # a live pause to copy
    copies_with_codes(config, "cancelled", "a.c || d || b.c")
    copies_with_codes(config, "cancelled", "a.c || d", "b.c = 'A'")
    conn = api.app.runtime.db()

    def new_live_code():
        with pausepoint.transaction(conn):
            assert pausepoint.new_reply_code(conn, config, WIRE["recipient"], 1, keys["developer_id"])

    def work():
        return thousands_of_instructions(conn, new_live_code)

    this_week = work()
    stored(config, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) INSERT INTO pauses"
                   " (id, developer_id, livemode, recipient, channel, message, options, status, decided_at,"
                   " respond_token, reply_code, created_at, expires_at) SELECT 'psr_old' || i, developer_id, 1,"
                   " recipient, channel, message, options, 'responded', '2025-01-01T00:00:00.000Z', 'old' || i,"
                   " reply_code, created_at, expires_at FROM n, pauses WHERE seq = 1")
    assert work() <= this_week + 1


def test_an_incoming_text_reads_none_of_the_test_pauses_pending_for_its_number(sms_setup):
    """No text answers a test pause, and any tenant may keep thousands of them pending to a
    number: a text from it, looking for its pauses under the write lock, must not read them."""
    api, config, keys = sms_setup
    api.create_pause(keys["test_api_key"])
    conn = api.app.runtime.db()

    def reply():
        assert pausepoint.record_sms_reply(conn, config, WIRE["recipient"], "1", "SM" + uuid.uuid4().hex) is None

    def work():
        return thousands_of_instructions(conn, reply)

    alone = work()
    copies_with_codes(config, "pending", "a.c || d || b.c")
    assert stored(config, "SELECT count(*) FROM pauses WHERE status = 'pending'") == [(5409,)]
    assert work() <= alone + 1


def test_a_text_not_yet_sent_when_its_pause_is_decided_is_never_sent(sms_setup, twilio):
    api, config, keys = sms_setup
    key = keys["api_key"]
    created = Api(api.app).create_pause(key)            # queued, not sent yet
    api.post(f"/v1/pause/{created['pause_id']}/cancel", headers=api.as_key(key))
    api.step("notifications")
    assert api.pause(key, created["pause_id"])["notification"]["status"] == "cancelled"
    assert stored(config, "SELECT status, attempts FROM notifications") == [("cancelled", 0)]
    assert twilio.messages == []


@pytest.mark.parametrize("mode", ["api_key", "test_api_key"])
def test_a_text_whose_pause_ran_out_unanswered_is_never_sent(sms_setup, twilio, mode):
    """As after a restart: the pause expired while the server was down, its text still queued."""
    api, config, keys = sms_setup
    created = Api(api.app).create_pause(keys[mode])
    run_out(config, created["pause_id"])
    api.step("notifications")
    assert stored(config, "SELECT status, attempts FROM notifications") == [("queued", 0)] and twilio.messages == []
    api.step("timeouts")
    assert stored(config, "SELECT status, attempts FROM notifications") == [("cancelled", 0)]
    api.step("notifications")
    assert twilio.messages == [] and stored(config, "SELECT count(*) FROM audit_events"
                                                    " WHERE event_type LIKE 'notification.%'") == [(0,)]


def test_a_number_with_every_short_code_pending_gets_three_character_ones(sms_setup):
    api, config, keys = sms_setup
    key = keys["test_api_key"]
    api.create_pause(key)               # a developer, and a pause to copy
    copies_with_codes(config, "pending", "a.c || d", "b.c = 'A' AND a.c NOT IN ('I', 'L', 'O')")
    taken = {code for (code,) in stored(config, "SELECT reply_code FROM pauses WHERE status = 'pending'")}
    assert set(pausepoint.SHORT_REPLY_CODES) <= taken
    codes = [stored(config, "SELECT reply_code FROM pauses WHERE id = ?", api.create_pause(key)["pause_id"])[0][0]
             for _ in range(30)]
    assert all(len(code) == 3 for code in codes) and len(set(codes)) == 30 and not set(codes) & taken


def test_when_random_draws_keep_missing_the_few_free_codes_are_found(sms_setup):
    api, config, keys = sms_setup
    key = keys["test_api_key"]
    api.create_pause(key)               # a developer, and a pause to copy
    stored(config, "UPDATE pauses SET reply_code = NULL")     # its code may be one of the free ones
    copies_with_codes(config, "pending", *SHORT_CODES)
    copies_with_codes(config, "pending", "a.c || d || b.c", f"{REAL_LETTERS} AND NOT (a.c = 'K' AND d = 7)")
    free = {code for code in pausepoint.LONG_REPLY_CODES if code.startswith("K7")}
    assert stored(config, "SELECT count(*) FROM pauses WHERE status = 'pending'") == [(1 + 4232 - 23 + 184,)]
    codes = [stored(config, "SELECT reply_code FROM pauses WHERE id = ?", api.create_pause(key)["pause_id"])[0][0]
             for _ in range(5)]
    assert set(codes) <= free and len(set(codes)) == 5

def test_a_question_that_fits_as_a_text_fits_in_each_reminder_whatever_time_it_says_is_left(running_api, twilio):
    """A reminder says the time left as it is sent ('30.0 min' of a one-hour pause, longer than
    '1.0 h'): a question accepted with reminders fits in every one of them."""
    api = running_api(**twilio.settings(), **{"server.base_url": "https://pp.example.org"})
    key = api.register()["api_key"]
    asked = {**WIRE, "timeout_hours": 1, "remind_after_minutes": [30]}
    error = api.post_json("/v1/pause", {**asked, "message": "W" * 1600}, headers=api.as_key(key), status=422).json
    over = int(error["error"]["message"].rsplit(" ", 1)[1])
    created = api.post_json("/v1/pause", {**asked, "message": "W" * (1600 - over)}, headers=api.as_key(key)).json
    sent(api, key, created["pause_id"], "sent")
    half_an_hour = pausepoint.db_time(pausepoint.utcnow() + dt.timedelta(minutes=30))
    stored(api.config, "UPDATE pauses SET expires_at = ?", half_an_hour)
    stored(api.config, "UPDATE pause_steps SET due_at = ?", pausepoint.db_time())
    api.step("steps")
    api.step("notifications")
    reminder = twilio.messages[-1]["Body"]
    assert reminder.startswith("Reminder, 30.0 min left: ")
    assert len(reminder.encode("utf-16-le")) // 2 <= 1600


def test_a_number_that_texted_stop_is_said_to_have_unsubscribed_when_its_texts_fail(sms_setup, twilio):
    """A bare 'Cancel' chooses the option, and carriers take it as unsubscribing the number
    from the server's: what fails after is explained, not only Twilio's 'unsubscribed recipient'."""
    api, config, keys = sms_setup
    first = api.create_pause(keys["api_key"], options=["Continue", "Cancel"], timeout_default="Cancel")
    assert 'recorded Cancel for "' in inbound(api, config, "Cancel").text
    assert api.pause(keys["api_key"], first["pause_id"])["choice"] == "Cancel"
    twilio.unsubscribed.add(WIRE["recipient"])
    later = api.create_pause(keys["api_key"])
    notification = api.pause(keys["api_key"], later["pause_id"])["notification"]
    assert notification["status"] == "failed" and notification["attempts"] == 1
    assert notification["last_error"].startswith("Twilio answered HTTP 400 (error 21610): Unable to create record:"
                                                 " Attempt to send to unsubscribed recipient; the person texted STOP")
    assert notification["last_error"].endswith("until they text START")


def test_a_late_reply_naming_a_closed_request_is_told_how_it_ended(sms_setup):
    """'No open request has the code K5' read as if the question had been lost: the person
    may then answer another thinking theirs vanished."""
    api, config, keys = sms_setup
    key = keys["api_key"]
    answered = api.create_pause(key, message="Wire $340 to Acme?")
    answered_code = reply_code(api, key, answered)
    inbound(api, config, f"{answered_code} 1")
    assert inbound(api, config, f"{answered_code} 2").text.endswith(
        f"<Message>PausePoint: {answered_code} is closed, answered Approve: \"Wire $340 to Acme?\".</Message></Response>")
    assert api.pause(key, answered["pause_id"])["choice"] == "Approve"           # the late 2 changed nothing
    cancelled = api.create_pause(key, message="Delete the logs?")
    cancelled_code = reply_code(api, key, cancelled)
    api.post(f"/v1/pause/{cancelled['pause_id']}/cancel", headers=api.as_key(key))
    timed_out = api.create_pause(key, message="Restart the cluster?")
    timed_out_code = reply_code(api, key, timed_out)
    run_out(config, timed_out["pause_id"])
    api.step("timeouts")
    still_open = api.create_pause(key, message="Order lunch?")
    open_code = reply_code(api, key, still_open)
    said = inbound(api, config, f"{cancelled_code} 1").text
    assert f"{cancelled_code} is closed, cancelled by its sender: \"Delete the logs?\". E.g. {open_code} 1." in said
    assert f"{timed_out_code} is closed, timed out to Reject" in inbound(api, config, f"{timed_out_code} yes").text
    assert api.pause(key, still_open["pause_id"])["status"] == "pending"
    stored(config, "UPDATE pauses SET decided_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-8 days')"
                   " WHERE id = ?", answered["pause_id"])                          # its code is free again by now
    assert f"no open request has the code {answered_code}" in inbound(api, config, f"{answered_code} 1").text


def test_a_telegram_push_is_fitted_by_the_characters_it_shows(running_api):
    """Telegram counts its 4,096 characters as it shows them; Apprise sends each < as &lt;. A
    question of 1,600 characters full of < and & fits whole, though its HTML would not."""
    api = running_api(**{"channels.ops.url": "tgram://123456789:abcdefg_hijklmnop/12315544/"})
    key = api.register()["test_api_key"]
    question = "if a<b&&c>d: " + "<&>" * 529
    api.create_pause(key, channel="ops", recipient="on-call engineer", message=question)
    [(text,)] = stored(api.config, "SELECT text FROM notifications")
    assert question in text and "cut short" not in text


def test_a_telegram_push_mentions_no_one(running_api):
    """Telegram notifies a group's member named by their @username, even in a muted group."""
    api = running_api(**{"channels.ops.url": "tgram://123456789:abcdefg_hijklmnop/12315544/"})
    key = api.register()["test_api_key"]
    api.create_pause(key, channel="ops", recipient="on-call engineer", message="@alice_admin approve the wire?")
    [(text,)] = stored(api.config, "SELECT text FROM notifications")
    assert "@alice_admin" not in text and "@\u200balice_admin approve the wire?" in text
