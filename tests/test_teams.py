"""Team pauses: several people, each with their own link; quorum and veto; reminders and
escalation, claimed from the database like every other job."""

import concurrent.futures
import json

import pytest
import requests

from conftest import QUESTION, WIRE, LiveServer, make_config, run_out, stored, token_of
from test_channels import SmsApi, inbound
import pausepoint

TEAM = [{"recipient": "+15550101", "channel": "sms"}, {"recipient": "+15550102", "channel": "sms"},
        {"recipient": "ops-lead", "channel": "link"}]
TWO_APPROVALS = {**QUESTION, "recipients": TEAM, "quorum": {"choice": "Approve", "count": 2}}


@pytest.fixture
def team(running_api, receiver):
    """An api with its jobs stepped by hand, a test key, and an endpoint taking every event."""
    api = running_api(**{"webhooks.allow_private": True})
    key = api.register()["test_api_key"]
    api.post_json("/v1/webhooks", {"url": receiver.url, "events": list(pausepoint.WEBHOOK_EVENTS)},
                  headers=api.as_key(key))
    return api, key


def approved_at_300(api, key):
    """A two-approval pause with an editable amount of 340, whose first person approved 300,
    as created."""
    fields = {"amount": {"type": "number", "value": 340, "max": 500, "editable": True}}
    created = api.post_json("/v1/pause", {**TWO_APPROVALS, "fields": fields}, headers=api.as_key(key)).json
    answer(api, created["recipients"][0], "Approve", fields={"amount": 300})
    return created


def answer(api, person, choice, status=200, **more):
    return api.post_json(f"/v1/respond/{token_of(person['respond_url'])}", {"choice": choice, **more}, status=status)


def audited(api, pause_id, event_type):
    return audited_in(api.config, pause_id, event_type)


def fall_due(api, pause_id, kind):
    """Move a pause's scheduled steps of one kind a day back, as if their time had come (in the
    order they were due)."""
    stored(api.config, "UPDATE pause_steps SET due_at = strftime('%Y-%m-%dT%H:%M:%fZ', due_at, '-1 days')"
                       " WHERE pause_id = ? AND kind = ? AND status = 'scheduled'", pause_id, kind)


def texts(api, pause_id, kind):
    return stored(api.config, "SELECT position, recipient, text FROM notifications WHERE pause_id = ? AND kind = ?"
                              " ORDER BY position, created_at", pause_id, kind)


def test_each_person_gets_their_own_message_and_link_and_the_first_link_stays_on_top(team):
    api, key = team
    created = api.post_json("/v1/pause", TWO_APPROVALS, headers=api.as_key(key)).json
    people = created["recipients"]
    assert [(p["recipient"], p["channel"]) for p in people] == [(p["recipient"], p["channel"]) for p in TEAM]
    assert created["respond_url"] == people[0]["respond_url"]
    assert len({token_of(p["respond_url"]) for p in people}) == 3
    assert all(len(token_of(p["respond_url"])) >= 43 for p in people)        # 256 bits each
    api.step("notifications")
    sent = texts(api, created["pause_id"], "ask")
    # The link person is told by the agent; each texted person's message carries their own link and code.
    assert [(position, recipient) for position, recipient, _ in sent] == [(0, "+15550101"), (1, "+15550102")]
    for (position, _, text), person in zip(sent, people):
        assert token_of(person["respond_url"]) in text
    codes = [row[0] for row in stored(api.config, "SELECT reply_code FROM pause_recipients WHERE channel = 'sms'")]
    assert codes[0] == stored(api.config, "SELECT reply_code FROM pauses")[0][0] and all(codes)
    shown = api.pause(key, created["pause_id"])
    assert shown["quorum"] == {"choice": "Approve", "count": 2} and shown["votes"] == []
    assert [(p["respond_url"], p["added_by"], p["notification_status"]) for p in shown["recipients"]] == [
        (people[0]["respond_url"], "request", "simulated"), (people[1]["respond_url"], "request", "simulated"),
        (people[2]["respond_url"], "request", None)]


def test_two_of_three_approvals_decide_it_naming_the_votes_that_made_it(team, receiver):
    api, key = team
    created = api.post_json("/v1/pause", TWO_APPROVALS, headers=api.as_key(key)).json
    first, second, third = created["recipients"]
    voted = answer(api, first, "Approve", comment="fine by me").json
    assert voted["status"] == "pending" and voted["your_vote"]["choice"] == "Approve"
    assert api.pause(key, created["pause_id"])["status"] == "pending"
    answer(api, second, "Approve")
    decided = api.pause(key, created["pause_id"])
    assert (decided["status"], decided["choice"], decided["decided_by"]) == ("responded", "Approve",
                                                                             "recipient:+15550102")
    assert [(v["recipient"], v["choice"], v["comment"]) for v in decided["votes"]] == [
        ("+15550101", "Approve", "fine by me"), ("+15550102", "Approve", None)]
    assert [p["choice"] for p in decided["recipients"]] == ["Approve", "Approve", None]
    assert answer(api, third, "Reject", status=409).json["error"]["code"] == "already_decided"
    [decision] = audited(api, created["pause_id"], "pause.responded")
    assert [vote["recipient"] for vote in decision["votes"]] == ["+15550101", "+15550102"]
    assert [vote["recipient"] for vote in audited(api, created["pause_id"], "pause.vote")] == ["+15550101",
                                                                                              "+15550102"]
    events = api.get("/v1/events", headers=api.as_key(key)).json["events"]
    assert [event["type"] for event in events] == ["pause.created", "pause.vote", "pause.vote", "pause.responded"]
    assert [len(event["data"]["votes"]) for event in events] == [0, 1, 2, 2]
    api.step("webhooks")
    assert sorted(json.loads(call["body"])["id"] for call in receiver.calls) == sorted(e["id"] for e in events)


def test_one_veto_among_three_decides_at_once(team):
    api, key = team
    created = api.post_json("/v1/pause", TWO_APPROVALS, headers=api.as_key(key)).json
    first, second, _ = created["recipients"]
    answer(api, first, "Approve")
    answer(api, second, "Reject", comment="not this vendor")
    decided = api.pause(key, created["pause_id"])
    assert (decided["status"], decided["choice"], decided["comment"]) == ("responded", "Reject", "not this vendor")
    [decision] = audited(api, created["pause_id"], "pause.responded")
    assert [(vote["recipient"], vote["choice"]) for vote in decision["votes"]] == [("+15550102", "Reject")]


def test_a_page_decided_by_another_person_says_so_beside_the_readers_own_vote(team):
    """Someone who tapped Approve, then outvoted by a veto, must not read "Recorded: Reject"
    with the vetoer's comment, as if that were their own answer; nor may someone who never answered."""
    api, key = team
    created = api.post_json("/v1/pause", TWO_APPROVALS, headers=api.as_key(key)).json
    first, second, third = created["recipients"]
    answer(api, first, "Approve", comment="fine by me")
    api.post(f"/respond/{token_of(second['respond_url'])}", {"choice": "Reject", "comment": "not this vendor"},
             status=303).follow().mustcontain("Recorded: <strong>Reject</strong>", "Comment: <bdi>not this vendor")
    page = api.get(f"/respond/{token_of(first['respond_url'])}").html
    outvoted = page.select_one("#outcome").text
    assert outvoted.startswith("Decided by another person asked: Reject at ") and outvoted.endswith(" Your vote was Approve.")
    assert page.select_one("p.comment").text == "Their comment: not this vendor"
    # Their first tap, sent again, is shown the same way, not as the vetoer's answer.
    again = api.post(f"/respond/{token_of(first['respond_url'])}", {"choice": "Approve", "comment": "fine by me"},
                     status=303).follow().html.select_one("#outcome").text
    assert again == outvoted
    silent = api.get(f"/respond/{token_of(third['respond_url'])}").html.select_one("#outcome").text
    assert silent.startswith("Decided by another person asked: Reject at ") and "Your vote" not in silent


def test_without_a_quorum_the_first_answer_of_a_team_decides(team):
    api, key = team
    created = api.post_json("/v1/pause", {**QUESTION, "recipients": TEAM}, headers=api.as_key(key)).json
    answer(api, created["recipients"][2], "Reject")
    decided = api.pause(key, created["pause_id"])
    assert (decided["status"], decided["choice"], decided["decided_by"]) == ("responded", "Reject", "recipient:ops-lead")
    assert decided["quorum"] is None and [v["recipient"] for v in decided["votes"]] == ["ops-lead"]


def test_a_person_votes_once_and_their_page_says_so(team):
    api, key = team
    created = api.post_json("/v1/pause", TWO_APPROVALS, headers=api.as_key(key)).json
    first = created["recipients"][0]
    answer(api, first, "Approve")
    assert answer(api, first, "Reject", status=409).json["error"]["code"] == "already_voted"
    page = api.get(f"/respond/{token_of(first['respond_url'])}")
    assert "Your vote, <strong>Approve</strong>, is recorded" in page.text and "<form" not in page.text
    # The others still see the question.
    assert "<form" in api.get(f"/respond/{token_of(created['recipients'][1]['respond_url'])}").text
    assert stored(api.config, "SELECT count(*) FROM pause_recipients WHERE voted_at IS NOT NULL") == [(1,)]


def test_a_team_members_page_says_what_their_answer_does(team):
    api, key = team
    quorum = api.post_json("/v1/pause", TWO_APPROVALS, headers=api.as_key(key)).json
    page = api.get(f"/respond/{token_of(quorum['recipients'][1]['respond_url'])}")
    assert ("It takes 2 people choosing <strong>Approve</strong> to decide it that way; any other choice, from anyone"
            " asked, decides it at once.") in page.text
    fields = {"amount": {"type": "number", "value": 340, "min": 0, "max": 500, "editable": True}}
    with_fields = api.post_json("/v1/pause", {**TWO_APPROVALS, "fields": fields}, headers=api.as_key(key)).json
    page = api.get(f"/respond/{token_of(with_fields['recipients'][1]['respond_url'])}")
    assert ("choosing <strong>Approve</strong> with the same values to decide it that way (one with other values"
            " starts a count of its own); any other choice") in page.text
    fixed = {"amount": {**fields["amount"], "editable": False}}
    fixed = api.post_json("/v1/pause", {**TWO_APPROVALS, "fields": fixed}, headers=api.as_key(key)).json
    page = api.get(f"/respond/{token_of(fixed['recipients'][1]['respond_url'])}")
    assert "choosing <strong>Approve</strong> to decide it that way; any other choice" in page.text
    first_decides = api.post_json("/v1/pause", {**QUESTION, "recipients": TEAM}, headers=api.as_key(key)).json
    page = api.get(f"/respond/{token_of(first_decides['recipients'][2]['respond_url'])}")
    assert "the first answer, yours or theirs, decides it for everyone" in page.text
    alone = api.post_json("/v1/pause", WIRE, headers=api.as_key(key)).json
    assert 'id="quorum"' not in api.get(f"/respond/{token_of(alone['respond_url'])}").text


def test_opening_a_link_is_noted_for_that_person_only(team):
    api, key = team
    created = api.post_json("/v1/pause", TWO_APPROVALS, headers=api.as_key(key)).json
    api.get(f"/respond/{token_of(created['recipients'][1]['respond_url'])}")
    opened = [p["opened_at"] for p in api.pause(key, created["pause_id"])["recipients"]]
    assert opened[0] is None and opened[1] is not None and opened[2] is None


def test_a_quorum_decides_only_values_that_many_people_approved(team):
    api, key = team
    fields = {"amount": {"type": "number", "value": 340, "min": 0, "max": 500, "editable": True}}
    created = api.post_json("/v1/pause", {**TWO_APPROVALS, "fields": fields}, headers=api.as_key(key)).json
    first, second, third = created["recipients"]
    refused = answer(api, first, "Approve", status=422, fields={"amount": 900}).json["error"]
    assert refused["field"] == "fields.amount"
    assert stored(api.config, "SELECT count(*) FROM pause_recipients WHERE voted_at IS NOT NULL") == [(0,)]
    answer(api, first, "Approve", fields={"amount": 300})
    # The next approvers are offered the amount the first one approved, on the page and in the JSON…
    page = api.get(f"/respond/{token_of(second['respond_url'])}")
    assert page.html.select_one("#field-amount")["value"] == "300"
    assert "changed “amount” from 340 to 300" in page.html.select_one("#proposed").text
    assert api.get(f"/v1/respond/{token_of(third['respond_url'])}").json["proposed_fields"] == {"amount": 300}
    # …and approving the amount asked instead is a different approval: no quorum yet.
    answer(api, second, "Approve", fields={"amount": 340})
    assert api.pause(key, created["pause_id"])["status"] == "pending"
    answer(api, third, "Approve", fields={"amount": 300})
    decided = api.pause(key, created["pause_id"])
    assert decided["status"] == "responded" and decided["fields"]["amount"]["value"] == 300
    assert decided["edited"] == {"amount": {"old": 340, "new": 300}}
    assert [vote["edits"] for vote in decided["votes"]] == [{"amount": 300}, None, {"amount": 300}]
    [decision] = audited(api, created["pause_id"], "pause.responded")
    assert [vote["recipient"] for vote in decision["votes"]] == ["+15550101", "ops-lead"]


def test_a_reminder_goes_to_exactly_those_who_have_not_answered_and_never_after_the_decision(team):
    api, key = team
    created = api.post_json("/v1/pause", {**TWO_APPROVALS, "quorum": {"choice": "Approve", "count": 3},
                                          "remind_after_minutes": [30, 120]}, headers=api.as_key(key)).json
    first, second, third = created["recipients"]
    answer(api, first, "Approve")
    stored(api.config, "UPDATE pause_steps SET due_at = ? WHERE due_at = (SELECT min(due_at) FROM pause_steps)",
           pausepoint.db_time(pausepoint.utcnow() - pausepoint.dt.timedelta(seconds=1)))
    api.step("steps")
    reminded = texts(api, created["pause_id"], "reminder")
    assert [(position, recipient) for position, recipient, _ in reminded] == [(1, "+15550102")]   # not the link
    assert reminded[0][2].startswith("Reminder, ") and " left: " in reminded[0][2]
    assert audited(api, created["pause_id"], "pause.reminded")[0]["recipients"] == ["+15550102"]
    answer(api, second, "Reject")
    fall_due(api, created["pause_id"], "reminder")
    api.step("steps")
    assert len(texts(api, created["pause_id"], "reminder")) == 1
    assert stored(api.config, "SELECT status FROM pause_steps ORDER BY id") == [("done",), ("skipped",)]
    assert len(audited(api, created["pause_id"], "pause.reminded")) == 1


def test_a_lone_recipient_is_reminded_and_the_pause_reads_as_before(team):
    api, key = team
    created = api.post_json("/v1/pause", {**WIRE, "remind_after_minutes": [0.5]}, headers=api.as_key(key)).json
    fall_due(api, created["pause_id"], "reminder")
    api.step("steps")
    assert [recipient for _, recipient, _ in texts(api, created["pause_id"], "reminder")] == ["+15550100"]
    shown = api.pause(key, created["pause_id"])
    assert "recipients" not in shown and "votes" not in shown and not shown["notification"]["text"].startswith("Rem")


def test_an_escalation_adds_and_asks_the_deputy_whose_vote_then_counts(team, receiver):
    api, key = team
    body = {**QUESTION, "recipients": TEAM[:1], "quorum": {"choice": "Approve", "count": 2},
            "escalation": [{"after_minutes": 60, "recipient": "+15550199", "channel": "sms"}]}
    created = api.post_json("/v1/pause", body, headers=api.as_key(key)).json
    answer(api, created["recipients"][0], "Approve")
    fall_due(api, created["pause_id"], "escalation")
    api.step("steps")
    shown = api.pause(key, created["pause_id"])
    deputy = shown["recipients"][1]
    assert (deputy["recipient"], deputy["added_by"], shown["status"]) == ("+15550199", "escalation", "pending")
    assert [recipient for _, recipient, _ in texts(api, created["pause_id"], "ask")] == ["+15550101", "+15550199"]
    assert audited(api, created["pause_id"], "pause.escalated")[0]["recipient"] == "+15550199"
    answer(api, deputy, "Approve")
    decided = api.pause(key, created["pause_id"])
    assert decided["status"] == "responded" and [v["recipient"] for v in decided["votes"]] == ["+15550101",
                                                                                               "+15550199"]
    api.step("webhooks")
    assert "pause.escalated" in [json.loads(call["body"])["type"] for call in receiver.calls]


def test_a_reminder_and_an_escalation_due_while_the_server_was_down_each_happen_once(running_api, tmp_path):
    api = running_api()
    key = api.register()["test_api_key"]
    body = {**QUESTION, "recipients": TEAM[:2], "remind_after_minutes": [10, 20],
            "escalation": [{"after_minutes": 30, "recipient": "+15550199", "channel": "sms"}]}
    created = api.post_json("/v1/pause", body, headers=api.as_key(key)).json
    api.app.runtime.stop()
    for kind in ("reminder", "escalation"):
        fall_due(api, created["pause_id"], kind)
    # The server starts again on the same database, and its jobs run several times.
    restarted = running_api()
    for _ in range(3):
        restarted.step("steps")
    reminders = texts(restarted, created["pause_id"], "reminder")
    assert sorted(recipient for _, recipient, _ in reminders) == ["+15550101", "+15550102"]     # one reminder
    assert len(audited(restarted, created["pause_id"], "pause.escalated")) == 1
    assert stored(restarted.config, "SELECT kind, status FROM pause_steps ORDER BY due_at") == [
        ("reminder", "skipped"), ("reminder", "done"), ("escalation", "done")]
    assert [recipient for _, recipient, _ in texts(restarted, created["pause_id"], "ask")] == [
        "+15550101", "+15550102", "+15550199"]


def test_ten_people_answering_at_once_with_a_quorum_of_three_decide_it_once(tmp_path):
    config = make_config(tmp_path, **{"server.host": "127.0.0.1", "ratelimit.enabled": False})
    app = pausepoint.create_app(config)
    with LiveServer(app, config) as server:
        key = requests.post(f"{server.url}/v1/auth/register", json={"email": "t@example.com", "name": "T",
                                                                   "password": "correct horse battery"}).json()
        auth = {"Authorization": f"Bearer {key['test_api_key']}"}
        people = [{"recipient": f"person-{n}", "channel": "link"} for n in range(10)]
        outcomes = []
        for _ in range(3):
            created = requests.post(f"{server.url}/v1/pause", headers=auth, json={
                **QUESTION, "recipients": people, "quorum": {"choice": "Approve", "count": 3}}).json()
            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                answers = list(pool.map(lambda person: requests.post(
                    f"{server.url}/v1/respond/{token_of(person['respond_url'])}", json={"choice": "Approve"}),
                    created["recipients"]))
            outcomes.append(sorted(a.status_code for a in answers))
            pause_id = created["pause_id"]
            votes = stored(config, "SELECT recipient FROM pause_recipients WHERE pause_id = ? AND voted_at IS NOT NULL"
                                   " ORDER BY voted_at, position", pause_id)
            [decision] = audited_in(config, pause_id, "pause.responded")
            assert [vote["recipient"] for vote in decision["votes"]] == [row[0] for row in votes]
            assert len(votes) == 3 and len(audited_in(config, pause_id, "pause.vote")) == 3
            assert stored(config, "SELECT count(*) FROM webhook_events WHERE pause_id = ? AND type = 'pause.responded'",
                          pause_id) == [(1,)]
        assert outcomes == [[200] * 3 + [409] * 7] * 3


def audited_in(config, pause_id, event_type):
    return [json.loads(row[0]) for row in stored(config, "SELECT data FROM audit_events WHERE pause_id = ?"
                                                         " AND event_type = ? ORDER BY seq", pause_id, event_type)]


def test_a_vote_racing_the_timeout_either_counts_or_is_refused_never_both(team):
    api, key = team
    created = api.post_json("/v1/pause", {**TWO_APPROVALS, "timeout_default": "Reject"},
                            headers=api.as_key(key)).json
    first, second, _ = created["recipients"]
    answer(api, first, "Approve")                       # counts: the timeout applies the default over it
    run_out(api.config, created["pause_id"])
    assert answer(api, second, "Approve", status=410).json["error"]["code"] == "expired"
    api.step("timeouts")
    timed_out = api.pause(key, created["pause_id"])
    assert (timed_out["status"], timed_out["choice"]) == ("timed_out", "Reject")
    assert [v["recipient"] for v in timed_out["votes"]] == ["+15550101"]
    # Many at once: each vote either stands with the pause undecided by it, or was refused and left no trace.
    races = []
    for _ in range(20):
        pause = api.post_json("/v1/pause", {**TWO_APPROVALS, "timeout_hours": 0.0003},
                              headers=api.as_key(key)).json
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            vote = pool.submit(lambda: api.post_json(f"/v1/respond/{token_of(pause['recipients'][0]['respond_url'])}",
                                                     {"choice": "Approve"}, expect_errors=True).status_code)
            pool.submit(lambda: api.step("timeouts"))
        races.append((pause["pause_id"], vote.result()))
    for pause_id, status in races:
        counted = stored(api.config, "SELECT count(*) FROM pause_recipients WHERE pause_id = ? AND voted_at IS NOT NULL",
                         pause_id)[0][0]
        assert (status, counted) in ((200, 1), (410, 0))


def test_an_sms_reply_votes_for_the_number_that_replied(running_api, twilio):
    api = SmsApi(running_api(**twilio.settings(), **{"server.base_url": "https://pp.example.org"}).app)
    key = api.register()["api_key"]
    created = api.post_json("/v1/pause", TWO_APPROVALS, headers=api.as_key(key)).json
    api.step("notifications")
    assert len(twilio.messages) == 2
    assert "no open request" not in inbound(api, api.config, "1", sender="+15550102").text
    shown = api.pause(key, created["pause_id"])
    assert shown["status"] == "pending" and [v["recipient"] for v in shown["votes"]] == ["+15550102"]
    [(code,)] = stored(api.config, "SELECT reply_code FROM pause_recipients WHERE recipient = '+15550102'")
    # Voted already, on a request still open for the others: told so, with or without its code,
    # never that no request is open, which reads as if their vote had been lost.
    for again in ("1", f"{code} 2"):
        assert inbound(api, api.config, again, sender="+15550102").text.endswith(
            f"<Message>PausePoint: your answer to {code} was recorded already: Approve.</Message></Response>")
    assert [v["recipient"] for v in api.pause(key, created["pause_id"])["votes"]] == ["+15550102"]
    inbound(api, api.config, "1", sender="+15550101")
    assert api.pause(key, created["pause_id"])["status"] == "responded"


@pytest.mark.parametrize("change, field", [
    ({"recipient": "+15550100"}, "recipients"),
    ({"recipients": [TEAM[0], {"recipient": "12", "channel": "sms"}]}, "recipients[1].recipient"),
    ({"recipients": [TEAM[0], {"recipient": "x", "channel": "fax"}]}, "recipients[1].channel"),
    ({"recipients": [TEAM[0], TEAM[0]]}, "recipients"),
    ({"quorum": {"choice": "Approve", "count": 4}}, "quorum"),
    ({"quorum": {"choice": "Maybe", "count": 2}}, "quorum"),
    ({"remind_after_minutes": [10, 240]}, "remind_after_minutes"),
    ({"remind_after_minutes": [0]}, "remind_after_minutes"),
    ({"escalation": [{"after_minutes": 300, "recipient": "+15550199", "channel": "sms"}]}, "escalation[0].after_minutes"),
    ({"escalation": [{"after_minutes": 30, "recipient": "+15550101", "channel": "sms"}]}, "escalation"),
    ({"recipients": []}, "recipients"),
    ({"recipients": [TEAM[0], TEAM[0]], "escalation": [{"after_minutes": 9, "recipient": "+15550199",
                                                        "channel": "sms"}]}, "recipients"),
    ({"recipients": [{"recipient": f"p{n}", "channel": "link"} for n in range(10)],
      "escalation": [{"after_minutes": 9, "recipient": "+15550199", "channel": "sms"}]}, "escalation"),
    ({"escalation": [{"after_minutes": 9, "recipient": "deputy", "channel": "link"}]}, "escalation[0].channel"),
])
def test_a_team_request_that_cannot_work_is_refused_naming_the_field(team, change, field):
    api, key = team
    refused = api.post_json("/v1/pause", {**TWO_APPROVALS, **change}, headers=api.as_key(key), status=422).json
    assert refused["error"]["field"] == field
    assert stored(api.config, "SELECT count(*) FROM pauses") == [(0,)]


def test_decided_test_team_pauses_are_pruned_with_their_people_and_steps(team):
    api, key = team
    created = api.post_json("/v1/pause", {**TWO_APPROVALS, "remind_after_minutes": [5]}, headers=api.as_key(key)).json
    api.post(f"/v1/pause/{created['pause_id']}/cancel", headers=api.as_key(key))
    pausepoint.prune_expired_data(api.app.runtime.db(), api.config, now=pausepoint.utcnow() + pausepoint.dt.timedelta(days=400))
    assert stored(api.config, "SELECT (SELECT count(*) FROM pause_recipients) + (SELECT count(*) FROM pause_steps)"
                              " + (SELECT count(*) FROM pauses)") == [(0,)]


def test_the_dashboard_shows_who_was_asked_and_what_each_chose_escaped(running_api):
    from test_dashboard import sign_up
    api = running_api()
    _, keys = sign_up(api)
    xss = '<script>alert("pwned")</script>'
    created = api.post_json("/v1/pause", {**TWO_APPROVALS, "recipients": [*TEAM[:2], {"recipient": xss,
                                                                                      "channel": "link"}],
                                          "fields": {"amount": {"type": "number", "value": 340, "editable": True,
                                                                "label": "Amount"}}},
                            headers=api.as_key(keys["test"])).json
    answer(api, created["recipients"][2], "Approve", comment=f"Fine by me {xss}", fields={"amount": 300})
    api.get(f"/respond/{token_of(created['recipients'][1]['respond_url'])}")
    page = api.get(f"/dashboard/pauses/{created['pause_id']}")
    people = [item.text for item in page.html.select("#people li")]
    assert people == ["+15550101 over sms: queued", "+15550102 over sms: opened the link",
                      f"{xss} over link: chose Approve"]
    # Each vote with its comment and changes: the pause's own comment is only the deciding one's.
    votes = [" ".join(item.text.split()) for item in page.html.select("#votes li")]
    assert len(votes) == 1 and votes[0].startswith(f"{xss} chose Approve at ")
    assert votes[0].endswith(f"· Amount set to 300 Fine by me {xss}")
    assert "<script>alert" not in page.text


def test_a_quorum_count_is_kept_as_a_whole_number(team):
    api, key = team
    created = api.post_json("/v1/pause", {**TWO_APPROVALS, "quorum": {"choice": "Approve", "count": 2.0}},
                            headers=api.as_key(key)).json
    assert json.dumps(api.pause(key, created["pause_id"])["quorum"]) == '{"choice": "Approve", "count": 2}'


def test_steps_due_together_are_taken_in_the_order_they_fell_due(team):
    api, key = team
    body = {**QUESTION, "recipients": TEAM[:1], "remind_after_minutes": [20],
            "escalation": [{"after_minutes": 10, "recipient": "+15550199", "channel": "sms"}]}
    created = api.post_json("/v1/pause", body, headers=api.as_key(key)).json
    for kind in ("reminder", "escalation"):
        fall_due(api, created["pause_id"], kind)
    api.step("steps")
    # The deputy, added first, is reminded with the others, as if the server had been up.
    assert [recipient for _, recipient, _ in texts(api, created["pause_id"], "reminder")] == ["+15550101",
                                                                                              "+15550199"]


def test_a_step_on_a_channel_since_removed_holds_back_no_other(running_api):
    chat = {"channels.chat.url": "json://127.0.0.1:9/hook"}
    api = running_api(**chat)
    mine, theirs = api.register()["test_api_key"], api.register(email="other@example.com")["test_api_key"]
    reminded = api.post_json("/v1/pause", {**QUESTION, "recipient": "ops", "channel": "chat",
                                           "remind_after_minutes": [5]}, headers=api.as_key(mine)).json
    escalated = api.post_json("/v1/pause", {**QUESTION, "recipients": TEAM[:1], "escalation": [
        {"after_minutes": 5, "recipient": "ops", "channel": "chat"}]}, headers=api.as_key(mine)).json
    other = api.post_json("/v1/pause", {**WIRE, "remind_after_minutes": [5]}, headers=api.as_key(theirs)).json
    api.app.runtime.stop()
    restarted = running_api()                   # the operator removed [channels.chat]
    for pause in (reminded, escalated, other):
        fall_due(restarted, pause["pause_id"], "reminder")
        fall_due(restarted, pause["pause_id"], "escalation")
    restarted.step("steps")
    assert [recipient for _, recipient, _ in texts(restarted, other["pause_id"], "reminder")] == ["+15550100"]
    [missed] = audited(restarted, reminded["pause_id"], "pause.reminded")
    assert missed["recipients"] == [] and missed["not_reminded"][0]["recipient"] == "ops"
    assert stored(restarted.config, "SELECT pause_id, status FROM pause_steps WHERE kind = 'escalation'") == [
        (escalated["pause_id"], "skipped")]
    assert audited(restarted, escalated["pause_id"], "pause.escalated") == []
    [skipped] = audited(restarted, escalated["pause_id"], "pause.escalation_skipped")
    assert skipped["recipient"] == "ops" and "'chat' is not configured" in skipped["error"]
    assert len(restarted.pause(mine, escalated["pause_id"])["recipients"]) == 1


def test_a_developer_left_off_a_push_target_since_is_sent_nothing_more_through_it(running_api, receiver):
    targets = {f"channels.{name}.url": receiver.url.replace("http://", "json://") + f"/{name}"
               for name in ("ops", "lead")}
    api = running_api(**targets)
    keys = {email: api.register(email=email)["api_key"] for email in ("ada@example.com", "eve@example.com")}
    steps = {"recipient": "on-call", "channel": "ops", "remind_after_minutes": [5],
             "escalation": [{"after_minutes": 10, "recipient": "lead", "channel": "lead"}]}
    created = {email: api.post_json("/v1/pause", {**QUESTION, **steps}, headers=api.as_key(key)).json
               for email, key in keys.items()}
    api.app.runtime.stop()
    # The operator lists who may use the target: Eve's pauses, made while anyone could, are
    # still pending, and nothing more of theirs may go through it.
    restarted = running_api(**targets, **{f"channels.{name}.developers": ["ada@example.com"]
                                          for name in ("ops", "lead")})
    restarted.step("notifications")
    [call] = receiver.wait_for(1)
    assert created["ada@example.com"]["respond_url"] in call["json"]["message"]
    eve = created["eve@example.com"]["pause_id"]
    unsent = stored(restarted.config, "SELECT status, provider_message_id, last_error FROM notifications"
                                      " WHERE pause_id = ?", eve)
    assert unsent == [("queued", None, "channel 'ops' is not configured on this server")]
    for pause in created.values():
        fall_due(restarted, pause["pause_id"], "reminder")
        fall_due(restarted, pause["pause_id"], "escalation")
    restarted.step("steps")
    [missed] = audited(restarted, eve, "pause.reminded")
    assert missed["recipients"] == [] and missed["not_reminded"][0]["recipient"] == "on-call"
    [skipped] = audited(restarted, eve, "pause.escalation_skipped")
    assert skipped["recipient"] == "lead" and "'lead' is not configured" in skipped["error"]
    messages = "SELECT kind, position FROM notifications WHERE pause_id = ? ORDER BY kind, position"
    assert stored(restarted.config, messages, eve) == [("ask", 0)]
    assert stored(restarted.config, messages, created["ada@example.com"]["pause_id"]) == [
        ("ask", 0), ("ask", 1), ("reminder", 0)]


def test_a_reminder_that_cannot_be_sent_is_audited_but_is_no_failed_question(running_api, twilio):
    api = running_api(**twilio.settings())
    key = api.register()["api_key"]
    created = api.post_json("/v1/pause", {**WIRE, "remind_after_minutes": [5]}, headers=api.as_key(key)).json
    api.step("notifications")
    twilio.fail_next = [400]
    fall_due(api, created["pause_id"], "reminder")
    api.step("steps")
    api.step("notifications")
    assert [kind for kind, in stored(api.config, "SELECT kind FROM notifications WHERE status = 'failed'")] == ["reminder"]
    assert audited(api, created["pause_id"], "notification.failed")[0]["kind"] == "reminder"
    assert stored(api.config, "SELECT count(*) FROM webhook_events WHERE type = 'pause.notification_failed'") == [(0,)]
    assert api.pause(key, created["pause_id"])["notification"]["status"] == "sent"


def test_a_veto_on_the_filled_in_page_is_not_an_edit_by_the_person_who_vetoed(team):
    api, key = team
    fields = {"amount": {"type": "number", "value": 340, "max": 500, "editable": True},
              "memo": {"type": "string", "value": "Invoice 1", "editable": True}}
    created = api.post_json("/v1/pause", {**TWO_APPROVALS, "fields": fields}, headers=api.as_key(key)).json
    first, second, _ = created["recipients"]
    answer(api, first, "Approve", fields={"amount": 300, "memo": "Invoice 1\nAttn: Billing"})
    form = api.get(f"/respond/{token_of(second['respond_url'])}").forms[0]
    assert form["field.memo"].value == "Invoice 1\nAttn: Billing"       # a text area keeps the line break
    assert api.get(f"/respond/{token_of(second['respond_url'])}").html.select_one("textarea#field-memo")
    form.submit("choice", value="Reject", status=303)
    decided = api.pause(key, created["pause_id"])
    assert (decided["status"], decided["choice"], decided["edited"]) == ("responded", "Reject", {})
    assert decided["fields"]["amount"]["value"] == 340 and decided["votes"][1]["edits"] is None


def test_a_veto_on_a_page_filled_in_before_another_approval_is_not_an_edit_either(team):
    api, key = team
    created = approved_at_300(api, key)
    _, second, third = created["recipients"]
    form = api.get(f"/respond/{token_of(second['respond_url'])}").forms[0]
    assert form["field.amount"].value == "300"
    answer(api, third, "Approve", fields={"amount": 250})        # while the page is open: 250 is the latest
    form.submit("choice", value="Reject", status=303)
    decided = api.pause(key, created["pause_id"])
    assert (decided["status"], decided["choice"], decided["edited"]) == ("responded", "Reject", {})
    assert decided["fields"]["amount"]["value"] == 340 and decided["votes"][2]["edits"] is None
    [decision] = audited(api, created["pause_id"], "pause.responded")
    assert "edited" not in decision


def test_in_test_mode_a_reminders_simulated_text_is_audited_as_a_reminder_as_in_live_mode(team):
    api, key = team
    created = api.post_json("/v1/pause", {**WIRE, "remind_after_minutes": [5]}, headers=api.as_key(key)).json
    api.step("notifications")
    fall_due(api, created["pause_id"], "reminder")
    api.step("steps")
    api.step("notifications")
    simulated = audited(api, created["pause_id"], "notification.simulated")
    assert [event.get("kind") for event in simulated] == [None, "reminder"]


@pytest.mark.parametrize("change, field", [
    ({"recipients": [{"recipient": "alice", "channel": "ops"}, {"recipient": "bob", "channel": "ops"}]}, "recipients"),
    ({"recipients": [TEAM[0], {"recipient": "alice", "channel": "ops"}],
      "escalation": [{"after_minutes": 30, "recipient": "bob", "channel": "ops"}]}, "escalation"),
])
def test_a_push_target_is_one_person_however_many_names_it_is_given(running_api, change, field):
    # Each message to a push target carries its own link, and whoever reads the target reads them all.
    api = running_api(**{"channels.ops.url": "json://127.0.0.1:9/hook"})
    key = api.register()["test_api_key"]
    refused = api.post_json("/v1/pause", {**TWO_APPROVALS, **change}, headers=api.as_key(key), status=422).json
    assert refused["error"]["field"] == field and "'ops' is asked twice" in refused["error"]["message"]
    assert stored(api.config, "SELECT count(*) FROM pauses") == [(0,)]
    # One person on it, among others, is asked as before.
    api.post_json("/v1/pause", {**TWO_APPROVALS, "recipients": [TEAM[0], {"recipient": "alice", "channel": "ops"}]},
                  headers=api.as_key(key), status=201)


def test_a_push_target_under_two_channel_names_is_one_person(running_api):
    """Two channels the operator pointed at the same target, however each URL spells it, are
    one place: whoever reads it would hold both links."""
    api = running_api(**{"channels.ops.url": "discord://4174216298/JHMHI8qBe7bk2ZwO5U711o3dV_js",
                         "channels.oncall.url": "https://discord.com/api/webhooks/4174216298/JHMHI8qBe7bk2ZwO5U711o3dV_js"
                                                "?format=markdown"})
    key = api.register()["test_api_key"]
    both = {"recipients": [{"recipient": "alice", "channel": "ops"}, {"recipient": "bob", "channel": "oncall"}]}
    refused = api.post_json("/v1/pause", {**TWO_APPROVALS, **both}, headers=api.as_key(key), status=422).json
    assert refused["error"]["field"] == "recipients" and "'oncall' is asked twice" in refused["error"]["message"]
    assert stored(api.config, "SELECT count(*) FROM pauses") == [(0,)]


def test_the_label_an_earlier_approval_changed_is_quoted_as_the_agents_words(team):
    """In the page's own sentence "An earlier approval changed …", a label run in unquoted
    ("Recorded: Reject at 06:52, you may close this page") read as the page's outcome."""
    api, key = team
    spoof = "Recorded: Reject at 06:52, you may close this page. Amount"
    fields = {"amount": {"type": "number", "value": 340, "editable": True, "label": spoof},
              "payee": {"type": "string", "value": "Acme", "editable": True, "label": "Payee"}}
    created = api.post_json("/v1/pause", {**TWO_APPROVALS, "fields": fields}, headers=api.as_key(key)).json
    first, second, _ = created["recipients"]
    answer(api, first, "Approve", fields={"amount": 300, "payee": "Bob"})
    proposed = api.get(f"/respond/{token_of(second['respond_url'])}").html.select_one("#proposed")
    labels = proposed.select("bdi.field-label")
    assert [label.text for label in labels] == [spoof, "Payee"]
    assert all(label.previous_sibling.endswith("“") and label.next_sibling.startswith("”") for label in labels)
    assert [value.text for value in proposed.select("strong")] == ["340", "300", "Acme", "Bob"]
    assert proposed.text == (f"An earlier approval changed “{spoof}” from 340 to 300; “Payee” from Acme to Bob."
                             " Those values are filled in below: your approval counts with theirs when the values"
                             " are the same.")


def test_an_approval_may_not_offer_a_value_that_only_looks_like_another(team):
    """A changed text is shown to the next approvers as the earlier approval's and filled in
    for them: one that reads as the value asked, or as another approval's, would be
    approved by people who took it for that value."""
    api, key = team
    fields = {"payee": {"type": "string", "value": "Acme Corp", "editable": True}}
    created = api.post_json("/v1/pause", {**TWO_APPROVALS, "fields": fields}, headers=api.as_key(key)).json
    first, second, third = created["recipients"]
    for look_alike in ("Acme C\u043erp", "Acme  Corp", "Acme Corp\u200b", "\uff21cme Corp"):
        refused = answer(api, first, "Approve", status=422, fields={"payee": look_alike}).json["error"]
        assert refused["field"] == "fields.payee"
    assert answer(api, first, "Approve", status=422,
                  fields={"payee": "\u0410cme Holdings"}).json["error"]["field"] == "fields.payee"
    answer(api, first, "Approve", fields={"payee": "Acme Holdings"})
    refused = answer(api, second, "Approve", status=422, fields={"payee": "Acme  Holdings"}).json["error"]
    assert refused["field"] == "fields.payee"
    assert stored(api.config, "SELECT count(*) FROM pause_recipients WHERE voted_at IS NOT NULL") == [(1,)]
    # A change anyone can see counts, an accent too (an option's is not: see option_identity()),
    # as does the same value again.
    answer(api, second, "Approve", fields={"payee": "Acmé Holdings"})
    answer(api, third, "Approve", fields={"payee": "Acme Holdings"})
    decided = api.pause(key, created["pause_id"])
    assert (decided["status"], decided["fields"]["payee"]["value"]) == ("responded", "Acme Holdings")
    # One person asked alone may not make such a change either.
    alone = api.post_json("/v1/pause", {**WIRE, "fields": fields}, headers=api.as_key(key)).json
    assert answer(api, alone, "Approve", status=422, fields={"payee": "Acme C\u043erp"}).json["error"]["field"] == (
        "fields.payee")
    assert api.pause(key, alone["pause_id"])["status"] == "pending"


def test_an_approval_from_the_filled_in_page_keeps_its_values_however_its_choice_is_spaced(team):
    api, key = team
    created = approved_at_300(api, key)
    second = created["recipients"][1]
    api.post(f"/respond/{token_of(second['respond_url'])}", {"choice": "Approve ", "field.amount": "300"}, status=303)
    decided = api.pause(key, created["pause_id"])
    assert (decided["status"], decided["choice"], decided["fields"]["amount"]["value"]) == ("responded", "Approve", 300)
    assert [vote["edits"] for vote in decided["votes"]] == [{"amount": 300}, {"amount": 300}]
