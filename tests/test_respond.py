import concurrent.futures
import os
import re
import sqlite3

import requests

from conftest import QUESTION, WIRE, Api, fill_disk, make_config, run_out, stored, token_of
import pausepoint

XSS = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'


def respond_path(created, page=False):
    return ("/respond/" if page else "/v1/respond/") + token_of(created["respond_url"])


def test_the_quickstart_flow_records_the_humans_choice(api, developer):
    key = developer["test_api_key"]
    created = api.create_pause(key)
    facts = api.get(respond_path(created)).json
    assert facts["message"] == WIRE["message"] and facts["options"] == ["Approve", "Reject"]
    assert facts["status"] == "pending"
    decided = api.post_json(respond_path(created), {"choice": "Approve", "comment": "ok, known vendor"}).json
    assert decided["status"] == "responded" and decided["choice"] == "Approve"
    pause = api.pause(key, created["pause_id"])
    assert pause["status"] == "responded" and pause["choice"] == "Approve"
    assert pause["comment"] == "ok, known vendor"
    assert pause["decided_by"] == "recipient:+15550100" and pause["decided_at"]


def test_the_respond_view_does_not_leak_the_agents_metadata(api, developer):
    created = api.create_pause(developer["test_api_key"], metadata={"internal_account": "ACME-42"})
    assert "ACME-42" not in api.get(respond_path(created)).text
    assert "ACME-42" not in api.get(respond_path(created, page=True)).text


def test_get_never_changes_state(api, developer, config):
    created = api.create_pause(developer["test_api_key"])
    for _ in range(3):
        api.get(respond_path(created))
        api.get(respond_path(created, page=True))
        api.head(respond_path(created, page=True))
    db = sqlite3.connect(config["database.path"])
    assert db.execute("SELECT status, choice, decided_at FROM pauses").fetchone() == ("pending", None, None)


def test_opening_a_link_is_audited_once_per_client_and_minute(app, developer, config):
    one, other = (Api(app, extra_environ={"REMOTE_ADDR": ip}) for ip in ("198.51.100.1", "198.51.100.2"))
    created = one.create_pause(developer["test_api_key"])
    for _ in range(20):
        one.get(respond_path(created))
        one.get(respond_path(created, page=True))
        one.head(respond_path(created, page=True))
    other.get(respond_path(created, page=True))
    opened = stored(config, "SELECT json_extract(data, '$.ip') FROM audit_events WHERE event_type = 'respond_page.opened'")
    assert sorted(ip for (ip,) in opened) == ["198.51.100.1", "198.51.100.2"]
    # A minute later the same client is recorded again.
    stored(config, "DROP TRIGGER audit_events_are_never_updated")
    stored(config, "UPDATE audit_events SET timestamp = '2000-01-01T00:00:00.000Z'")
    one.get(respond_path(created, page=True))
    assert len(stored(config, "SELECT 1 FROM audit_events WHERE event_type = 'respond_page.opened'")) == 3


def test_a_link_checkers_head_request_is_not_recorded_as_the_link_opened(api, developer, config):
    team = api.post_json("/v1/pause", {**QUESTION, "recipients": [
        {"recipient": "+15550101", "channel": "sms"}, {"recipient": "+15550102", "channel": "sms"}]},
        headers=api.as_key(developer["test_api_key"])).json
    person = team["recipients"][1]
    api.head(respond_path(person, page=True))
    api.head(respond_path(person))
    assert stored(config, "SELECT opened_at FROM pause_recipients WHERE position = 1") == [(None,)]
    assert stored(config, "SELECT count(*) FROM audit_events WHERE event_type = 'respond_page.opened'") == [(0,)]
    api.get(respond_path(person, page=True))
    assert stored(config, "SELECT opened_at IS NOT NULL FROM pause_recipients WHERE position = 1") == [(1,)]


def test_an_unknown_token_is_404(api):
    assert api.get("/v1/respond/not-a-token", status=404).json["error"]["code"] == "not_found"
    assert api.post_json("/v1/respond/not-a-token", {"choice": "Approve"}, status=404).json["error"]["code"] == "not_found"
    assert "not valid" in api.get("/respond/not-a-token", status=404).text


def test_a_second_decision_is_409_and_says_what_was_decided(api, developer):
    created = api.create_pause(developer["test_api_key"])
    api.post_json(respond_path(created), {"choice": "Reject"})
    error = api.post_json(respond_path(created), {"choice": "Approve"}, status=409).json["error"]
    assert error["code"] == "already_decided" and "'Reject'" in error["message"]
    assert api.pause(developer["test_api_key"], created["pause_id"])["choice"] == "Reject"


def test_a_cancelled_pause_cannot_be_answered(api, developer):
    key = developer["test_api_key"]
    created = api.create_pause(key)
    api.post(f"/v1/pause/{created['pause_id']}/cancel", headers=api.as_key(key))
    assert "cancelled" in api.post_json(respond_path(created), {"choice": "Approve"}, status=409).json["error"]["message"]


def test_a_tap_on_a_page_the_agent_cancelled_meanwhile_says_cancelled_not_decided(api, developer):
    key = developer["test_api_key"]
    created = api.create_pause(key)
    form = api.get(respond_path(created, page=True)).forms[0]
    api.post(f"/v1/pause/{created['pause_id']}/cancel", headers=api.as_key(key))
    page = form.submit("choice", value="Approve", status=409).html
    assert page.select_one("[role=alert]").text == "Your answer was not recorded: the agent had cancelled the request."
    assert page.select_one("#outcome").text.startswith("The agent cancelled this request at ")


def run_out_before_the_timeout_job(running_api):
    """(api, key, a pause past its expiry): still 'pending' in the database until the job runs."""
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.create_pause(key)
    run_out(api.config, created["pause_id"])
    return api, key, created


def test_an_expired_pause_is_410_even_before_the_timeout_job_runs(running_api):
    api, key, created = run_out_before_the_timeout_job(running_api)
    error = api.post_json(respond_path(created), {"choice": "Approve"}, status=410).json["error"]
    assert error["code"] == "expired" and "'Reject'" in error["message"]
    assert api.pause(key, created["pause_id"])["status"] == "pending"


def test_the_page_of_a_pause_past_its_expiry_offers_no_options_before_the_timeout_job_runs(running_api):
    api, key, created = run_out_before_the_timeout_job(running_api)
    page = api.get(respond_path(created, page=True))
    assert not page.html.select("button[name=choice]") and "left)" not in page.text
    assert "This request expired at" in page.text and "The default <strong>Reject</strong> was applied." in page.text
    assert api.pause(key, created["pause_id"])["status"] == "pending"


def test_the_links_json_reads_a_pause_past_its_expiry_as_timed_out_before_the_timeout_job_runs(running_api):
    api, key, created = run_out_before_the_timeout_job(running_api)
    # What the page says, and what an answer would be told (410): not "pending", inviting one.
    facts = api.get(respond_path(created)).json
    assert (facts["status"], facts["choice"]) == ("timed_out", "Reject")
    api.step("timeouts")
    recorded = api.get(respond_path(created)).json
    assert (recorded["status"], recorded["choice"]) == ("timed_out", "Reject")


def test_a_timed_out_pause_is_410(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.create_pause(key)
    run_out(api.config, created["pause_id"])
    api.step("timeouts")
    assert api.pause(key, created["pause_id"])["status"] == "timed_out"
    api.post_json(respond_path(created), {"choice": "Approve"}, status=410)
    assert "expired" in api.get(respond_path(created, page=True)).text


def test_the_page_says_when_a_pause_expired_not_when_its_timeout_was_recorded(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.create_pause(key)
    # It ran out three hours ago, while the server was down: the timeout is recorded only now.
    expired_at = pausepoint.utcnow() - pausepoint.dt.timedelta(hours=3)
    stored(api.config, "UPDATE pauses SET expires_at = ? WHERE id = ?", pausepoint.db_time(expired_at),
           created["pause_id"])
    before = api.get(respond_path(created, page=True)).html.select_one("#outcome").text
    api.step("timeouts")
    after = api.get(respond_path(created, page=True)).html.select_one("#outcome").text
    assert f"expired at {expired_at.strftime('%b %d %H:%M UTC')}" in after
    assert after == before


def test_a_choice_not_among_the_options_is_422(api, developer):
    created = api.create_pause(developer["test_api_key"])
    for body in ({"choice": "Maybe"}, {"choice": None}, {}, {"choice": "Approve", "comment": 7}):
        api.post_json(respond_path(created), body, status=422)
    page = api.post(respond_path(created, page=True), {"choice": "Maybe"}, status=422)
    assert "must be one of" in page.text
    assert api.pause(developer["test_api_key"], created["pause_id"])["status"] == "pending"


def test_the_page_posts_the_choice_and_then_shows_what_was_recorded(api, developer):
    created = api.create_pause(developer["test_api_key"])
    page = api.get(respond_path(created, page=True))
    form = page.forms[0]
    result = form.submit("choice", index=1).follow()       # the "Reject" button
    assert "Recorded: <strong>Reject</strong>" in result.text
    assert api.pause(developer["test_api_key"], created["pause_id"])["choice"] == "Reject"


def test_json_posted_to_the_page_is_refused_in_json_pointing_at_the_api_path(api, developer):
    created = api.create_pause(developer["test_api_key"])
    refused = api.post_json(respond_path(created, page=True), {"choice": "Approve"}, status=415)
    assert refused.content_type == "application/json"
    error = refused.json["error"]
    assert error["code"] == "unsupported_media_type" and respond_path(created) in error["message"]
    assert api.pause(developer["test_api_key"], created["pause_id"])["status"] == "pending"


def test_an_answer_on_the_page_after_the_decision_shows_the_decision_and_that_it_did_not_count(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    decided, late = api.create_pause(key), api.create_pause(key)
    forms = [api.get(respond_path(created, page=True)).forms[0] for created in (decided, late)]
    api.post_json(respond_path(decided), {"choice": "Approve"})
    run_out(api.config, late["pause_id"])
    pages = []
    for form, status, why in ((forms[0], 409, "had already been decided"), (forms[1], 410, "had expired")):
        pages.append(form.submit("choice", value="Reject", status=status))
        assert pages[-1].html.select_one("[role=alert]").text == f"Your answer was not recorded: the request {why}."
        assert not pages[-1].html.select("button[name=choice]") and not re.search(r"\d\dT\d\d:", pages[-1].text)
    assert "Recorded: <strong>Approve</strong> at " in pages[0].text and "The default <strong>Reject" in pages[1].text
    assert [api.pause(key, p["pause_id"])["status"] for p in (decided, late)] == ["responded", "pending"]


def test_a_comment_with_a_control_character_on_a_closed_request_is_told_it_is_closed(running_api):
    """Asked to correct their comment, a person would try again on a request nobody can answer any more."""
    api = running_api()
    key = api.register()["test_api_key"]
    decided, cancelled, late = api.create_pause(key), api.create_pause(key), api.create_pause(key)
    forms = [api.get(respond_path(created, page=True)).forms[0] for created in (decided, cancelled, late)]
    api.post_json(respond_path(decided), {"choice": "Approve"})
    api.post(f"/v1/pause/{cancelled['pause_id']}/cancel", headers=api.as_key(key))
    run_out(api.config, late["pause_id"])
    comment = "ok\x07"
    for created, form, status, code, why in ((decided, forms[0], 409, "already_decided", "had already been decided"),
                                             (cancelled, forms[1], 409, "already_decided", "the agent had cancelled"),
                                             (late, forms[2], 410, "expired", "the request had expired")):
        error = api.post_json(respond_path(created), {"choice": "Reject", "comment": comment}, status=status).json
        assert error["error"]["code"] == code
        form["comment"] = comment
        page = form.submit("choice", value="Reject", status=status).html
        assert page.select_one("[role=alert]").text.startswith("Your answer was not recorded: ")
        assert why in page.select_one("[role=alert]").text
    pending = api.create_pause(key)
    error = api.post_json(respond_path(pending), {"choice": "Reject", "comment": comment}, status=422).json["error"]
    assert error["field"] == "comment"


def test_a_double_tap_on_the_page_shows_the_answer_recorded_not_refused(api, developer):
    key = developer["test_api_key"]
    single = api.create_pause(key)
    team = api.post_json("/v1/pause", {**QUESTION, "quorum": {"choice": "Approve", "count": 2}, "recipients": [
        {"recipient": "+15550101", "channel": "sms"}, {"recipient": "+15550102", "channel": "sms"}]},
        headers=api.as_key(key)).json
    for path, says in ((respond_path(single, page=True), "Recorded: <strong>Approve</strong>"),
                       (respond_path(team["recipients"][0], page=True), "Your vote, <strong>Approve</strong>, is")):
        form = api.get(path).forms[0]
        form["comment"] = "Known vendor. "
        form.submit("choice", value="Approve", status=303)
        # The second tap's post, whose answer the browser shows: the first tap counted.
        again = form.submit("choice", value="Approve", status=303).follow()
        again.mustcontain(says, no="not recorded")
        assert not again.html.select("[role=alert]")
    # Another answer, or the same choice with other words, is still told it did not count.
    for choice, comment in (("Reject", "Known vendor."), ("Approve", "Changed my mind")):
        api.post(respond_path(single, page=True), {"choice": choice, "comment": comment}, status=409).mustcontain(
            "Your answer was not recorded: the request had already been decided.")
    assert api.pause(key, single["pause_id"])["comment"] == "Known vendor."
    assert stored(api.config, "SELECT count(*) FROM audit_events WHERE event_type IN ('pause.responded', 'pause.vote')"
                              " AND pause_id IN (?, ?)", single["pause_id"], team["pause_id"]) == [(2,)]


def test_every_respond_page_has_one_heading_for_a_screen_reader_to_find(api, developer):
    untitled = api.get(respond_path(api.create_pause(developer["test_api_key"]), page=True))
    titled = api.get(respond_path(api.create_pause(developer["test_api_key"], title="Wire $340"), page=True))
    assert [h.text for h in untitled.html.select("h1")] == ["Approval request"]
    assert [h.text for h in titled.html.select("h1")] == ["Wire $340"]


def test_a_comment_of_several_lines_typed_on_the_page_is_recorded(api, developer):
    created = api.create_pause(developer["test_api_key"])
    # A browser sends a textarea's line breaks as CRLF, and a carriage return alone is a control character.
    api.post(respond_path(created, page=True), {"choice": "Reject", "comment": "Not this week.\r\nAsk again Monday."},
             status=303).follow().mustcontain("Recorded: <strong>Reject</strong>")
    assert api.pause(developer["test_api_key"], created["pause_id"])["comment"] == "Not this week.\nAsk again Monday."


def test_the_page_sends_noindex_no_referrer_and_a_strict_csp(api, developer):
    created = api.create_pause(developer["test_api_key"])
    for response in (api.get(respond_path(created, page=True)), api.get("/respond/bad-token", status=404)):
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp and "frame-ancestors 'none'" in csp
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "noindex" in response.headers["X-Robots-Tag"]
        assert response.headers["Cache-Control"] == "no-store"
    assert '<meta name="robots" content="noindex' in api.get(respond_path(created, page=True)).text


def test_everything_the_agent_wrote_is_escaped_on_the_page(api, developer):
    created = api.create_pause(developer["test_api_key"], message=f"Wire? {XSS}", title=f"T {XSS}",
                               metadata={f"k {XSS}": XSS, "display": [f"k {XSS}"]},
                               options=[f"Yes {XSS}", '"><b>No</b>'], timeout_default='"><b>No</b>')
    page = api.get(respond_path(created, page=True))
    page.mustcontain("&lt;script&gt;alert(", "&lt;img src=x onerror=alert(1)&gt;", no=["<script>", "<img", "<b>No"])
    api.post(respond_path(created, page=True), {"choice": '"><b>No</b>', "comment": XSS}).follow().mustcontain(
        "&lt;b&gt;No&lt;/b&gt;", no=["<script>", "<b>No"])


def test_exactly_one_of_many_simultaneous_decisions_wins(live_server):
    url = live_server.url
    keys = requests.post(f"{url}/v1/auth/register",
                         json={"email": "race@example.com", "name": "R", "password": "password123"}).json()
    created = requests.post(f"{url}/v1/pause", json=WIRE, headers={"Authorization": f"Bearer {keys['test_api_key']}"}).json()
    token = token_of(created["respond_url"])
    choices = ["Approve", "Reject"] * 12

    def decide(choice):
        return choice, requests.post(f"{url}/v1/respond/{token}", json={"choice": choice}, timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(len(choices)) as pool:
        results = list(pool.map(decide, choices))
    winners = [choice for choice, status in results if status == 200]
    assert len(winners) == 1
    assert sorted(status for _, status in results) == [200] + [409] * (len(choices) - 1)
    pause = requests.get(f"{url}/v1/pause/{created['pause_id']}",
                         headers={"Authorization": f"Bearer {keys['test_api_key']}"}).json()
    assert pause["choice"] == winners[0]
    audit = requests.get(f"{url}/v1/audit", params={"event_type": "pause.responded"},
                         headers={"Authorization": f"Bearer {keys['test_api_key']}"}).json()["events"]
    assert len(audit) == 1


def test_guessing_spends_only_failures_and_never_refuses_a_valid_link(tmp_path):
    app = pausepoint.create_app(make_config(tmp_path, **{"ratelimit.respond_failures_per_hour": 5}))
    office = Api(app, extra_environ={"REMOTE_ADDR": "203.0.113.66"})    # a guesser and a human behind one NAT
    created = office.create_pause(office.register()["test_api_key"])
    for _ in range(40):
        office.get(respond_path(created), status=200)      # valid links spend nothing
    for n in range(5):
        office.get(f"/v1/respond/guess{n}", status=404)
    refused = office.get("/v1/respond/guess-more", status=429)
    assert int(refused.headers["Retry-After"]) > 0
    assert office.get("/respond/guess-more", status=429).content_type == "text/html"
    office.get(respond_path(created), status=200)
    office.get(respond_path(created, page=True), status=200)
    office.post_json(respond_path(created), {"choice": "Reject"}, status=200)


def test_a_forged_forwarded_for_header_does_not_escape_the_guessing_limit(tmp_path):
    app = pausepoint.create_app(make_config(tmp_path, **{"ratelimit.respond_failures_per_hour": 2}))
    guesser = Api(app, extra_environ={"REMOTE_ADDR": "203.0.113.66"})
    for n in range(2):
        guesser.get(f"/v1/respond/guess{n}", headers={"X-Forwarded-For": f"10.0.0.{n}"}, status=404)
    guesser.get("/v1/respond/guess9", headers={"X-Forwarded-For": "10.0.0.9"}, status=429)


def test_an_unexpected_error_shows_a_person_a_page_and_an_agent_json(api, developer, config):
    created = api.create_pause(developer["test_api_key"])
    stored(config, "UPDATE pauses SET options = 'not json'")       # a row no code path can read
    page = api.get(respond_path(created, page=True), status=500)
    assert page.content_type == "text/html" and "Something went wrong" in page.text
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert api.get(respond_path(created), status=500).json["error"]["code"] == "internal_error"
    missing = api.get("/respond/", status=404)
    assert missing.content_type == "text/html"


def test_an_answer_the_full_disk_cannot_store_is_507_and_the_person_is_told_to_try_again(running_api, small_disk):
    """Not 500 "something went wrong": the answer was not recorded, and may be sent again once there is room."""
    api = running_api(fresh=True, **{"database.path": str(small_disk / "pausepoint.db"), "database.min_free_mb": 0})
    key = api.register()["test_api_key"]
    created = [api.create_pause(key) for _ in range(2)]
    form = api.get(respond_path(created[1], page=True)).forms[0]
    filler = fill_disk(small_disk)
    refused = api.post_json(respond_path(created[0]), {"choice": "Approve"}, status=507)
    assert refused.json["error"]["code"] == "storage_low" and refused.headers["Retry-After"] == "60"
    assert "not recorded" in refused.json["error"]["message"]
    page = form.submit("choice", index=0, status=507)
    assert page.content_type == "text/html" and "Your answer was not recorded" in page.text
    assert "try again in a few minutes" in page.text
    opened = api.get(respond_path(created[0], page=True), status=507)          # its first opening is recorded
    assert "This question cannot be shown now" in opened.text and "answer" not in opened.text
    os.remove(filler)
    api.post_json(respond_path(created[0]), {"choice": "Approve"})
    assert [api.pause(key, p["pause_id"])["status"] for p in created] == ["responded", "pending"]


def test_the_page_says_who_asks_about_what_with_the_details_the_agent_chose(api):
    key = api.register(name="Acme Finance Bot")["test_api_key"]
    created = api.create_pause(key, title="Wire to Acme Corp", timeout_hours=4, metadata={
        "amount": "$340.00", "payee": "Acme Corp", "invoice": {"id": 7}, "internal_ref": "secret-123",
        "display": ["amount", "payee", "invoice"]})
    page = api.get(respond_path(created, page=True)).html
    assert page.select_one(".label").text == "Asked by Acme Finance Bot:"
    assert page.select_one("h1.title").text == "Wire to Acme Corp"
    assert [(row.th.text, row.td.text) for row in page.select("table.details tr")] == [
        ("amount", "$340.00"), ("payee", "Acme Corp"), ("invoice", '{"id":7}')]
    assert "secret-123" not in str(page)                          # only what "display" names
    expiry = page.select_one("#expiry").text
    assert re.search(r"Open until \w{3} \d\d \d\d:\d\d UTC \((3\.9|4\.0) h left\)", expiry), expiry
    facts = api.get(respond_path(created)).json
    assert facts["asked_by"] == "Acme Finance Bot" and facts["title"] == "Wire to Acme Corp"
    assert facts["details"][0] == {"name": "amount", "value": "$340.00"} and "metadata" not in facts
    assert api.pause(key, created["pause_id"])["title"] == "Wire to Acme Corp"


def test_a_title_dressed_as_the_pages_own_outcome_stays_framed_as_the_agents_words(api):
    """A title such as "Recorded: Approve" is the agent's to write; what the page itself says
    (the outcome, the options) stands outside the framed section that holds the agent's text."""
    key = api.register()["test_api_key"]
    created = api.create_pause(key, title="Recorded: Approve", metadata={"note": "Done", "display": ["note"]})
    page = api.get(respond_path(created, page=True)).html
    asked = page.select_one("section.asked")
    assert [element.name for element in asked.find_all(recursive=False)] == ["p", "h1", "blockquote", "table"]
    assert asked.select_one("h1.title").text == "Recorded: Approve" and not asked.select("form, .outcome, button")
    api.post(respond_path(created, page=True), {"choice": "Approve"}, status=303)
    decided = api.get(respond_path(created, page=True)).html
    assert decided.select_one("#outcome") is not None and decided.select_one("section.asked #outcome") is None


def test_a_value_the_approver_may_not_change_stays_framed_as_the_agents_words(api):
    """A fixed field is the agent's text alone, label and value: "Recorded:" and "Approve at 14:02,
    you may close this page" read, outside the frame, as the page's own outcome."""
    key = api.register()["test_api_key"]
    created = api.create_pause(key, timeout_default="Approve", fields={
        "status": {"type": "string", "value": "Approve at 14:02, you may close this page", "label": "Recorded:"},
        "amount": {"type": "number", "value": 340, "editable": True, "label": "Amount"}})
    page = api.get(respond_path(created, page=True)).html
    assert page.select_one("section.asked p.field").text == "Recorded: Approve at 14:02, you may close this page"
    assert len(page.select("p.field")) == 1 and page.select_one("form input[name='field.amount']") is not None
    api.post(respond_path(created, page=True), {"choice": "Reject"}, status=303)
    assert "Recorded: Approve at 14:02" in api.get(respond_path(created, page=True)).html.select_one("section.asked").text


def test_a_value_the_approver_may_change_is_framed_as_the_agents_words_too(api):
    """An editable field's label and choices are the agent's text as well: unframed, above the
    buttons and in the page's own grey, "Recorded: Reject at 06:52; you may close this page"
    read as the page's outcome, and a person who closed it left the timeout to approve."""
    key = api.register()["test_api_key"]
    spoof = "Recorded: Reject at 06:52. Nothing more is needed; you may close this page."
    created = api.create_pause(key, timeout_default="Approve", fields={
        "note": {"type": "enum", "value": "Recorded: Reject", "choices": ["Recorded: Reject", "b"], "editable": True,
                 "label": spoof},
        "amount": {"type": "number", "value": 340, "editable": True, "label": "Recorded: Reject", "max": 500}})
    page = api.get(respond_path(created, page=True)).html
    frame = page.select_one("form .fields.asked")
    assert frame is not None and frame.get("aria-label")
    assert [label.text for label in frame.select("label")] == [spoof, "Recorded: Reject (at most 500)"]
    assert frame.select_one("option").text == "Recorded: Reject"
    assert not frame.select("button, .outcome, p")         # the page's own words stand outside it
    lead = frame.find_previous_sibling()
    assert lead.name == "p" and "may change" in lead.text and "asked" not in (lead.get("class") or [])
    form = api.get(respond_path(created, page=True)).forms[0]
    answered = form.submit("choice", value="Reject", status=303).follow()
    assert answered.html.select_one("#outcome").text.startswith("Recorded: Reject")


def test_details_cannot_be_made_to_read_as_something_else(api):
    """Metadata is free-form, unlike the question: what it shows is made plain instead of refused."""
    key = api.register()["test_api_key"]
    created = api.create_pause(key, metadata={"amount\u202e": "\u202e043$", "note": "a\x1b[8mhidden\tb\nc",
                                              "display": ["amount\u202e", "note"]})
    for details in (api.get(respond_path(created)).json["details"],
                    [{"name": row.th.text, "value": row.td.text}
                     for row in api.get(respond_path(created, page=True)).html.select("table.details tr")]):
        assert details == [{"name": "amount\ufffd", "value": "\ufffd043$"},
                           {"name": "note", "value": "a\ufffd[8mhidden\tb\nc"}]


def test_display_must_name_keys_of_the_metadata(api, developer):
    for display in (["missing"], "amount", ["display"], [1], ["amount"] * 11):
        error = api.post_json("/v1/pause", {**WIRE, "metadata": {"amount": 1, "display": display}},
                              headers=api.as_key(developer["test_api_key"]), status=422).json["error"]
        assert error["field"] == "metadata" and "display" in error["message"]
