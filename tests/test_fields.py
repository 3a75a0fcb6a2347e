"""Fields: named values the approver sees and may change before approving (approve with edits)."""

import json
import re

import pytest

from conftest import WIRE, run_out, stored, token_of
import pausepoint

XSS = '<script>alert("pwned")</script>'
FIELDS = {"amount": {"type": "number", "value": 340, "min": 0, "max": 500, "editable": True, "label": "Amount (USD)"},
          "payee": {"type": "string", "value": "Acme Corp", "editable": False}}

# What a pause without fields looked like before fields existed, byte for byte (with the receipt
# every pause has had since, null until decided), the parts that differ from run to run as
# {placeholders}: created, then pending, then decided.
RECORDED = [
    '{"pause_id": "{pause_id}", "status": "pending", "respond_url": "http://127.0.0.1:8080/respond/{token}",'
    ' "expires_at": "{expires_at}", "created_at": "{created_at}"}',
    '{"pause_id":"{pause_id}","status":"pending","recipient":"+15550100","channel":"sms","title":null,'
    '"message":"Your agent wants to send a $340 wire to Acme Corp. Approve?","options":["Approve","Reject"],'
    '"timeout_default":"Reject","choice":null,"comment":null,"decided_at":null,"decided_by":null,"metadata":{"k":1},'
    '"respond_url":"http://127.0.0.1:8080/respond/{token}","livemode":false,"expires_at":"{expires_at}",'
    '"created_at":"{created_at}","notification":{"channel":"sms","status":"queued","attempts":0,'
    '"provider_message_id":null,"last_error":null,"may_have_reached":false,"text":"\\"Your agent wants to send a'
    ' $340 wire to Acme Corp.'
    ' Approve?\\"\\nReply {code} 1 for Approve,\\n{code} 2 for Reject,\\nor open http://127.0.0.1:8080/respond/{token}'
    '\\nExpires {expires_text} UTC"},"receipt":null}',
    '{"pause_id":"{pause_id}","status":"responded","recipient":"+15550100","channel":"sms","title":null,'
    '"message":"Your agent wants to send a $340 wire to Acme Corp. Approve?","options":["Approve","Reject"],'
    '"timeout_default":"Reject","choice":"Approve","comment":"ok","decided_at":"{decided_at}",'
    '"decided_by":"recipient:+15550100","metadata":{"k":1},"respond_url":"http://127.0.0.1:8080/respond/{token}",'
    '"livemode":false,"expires_at":"{expires_at}","created_at":"{created_at}","notification":{"channel":"sms",'
    '"status":"simulated","attempts":1,"provider_message_id":null,"last_error":null,"may_have_reached":false,'
    '"text":"\\"Your agent wants to'
    ' send a $340 wire to Acme Corp. Approve?\\"\\nReply {code} 1 for Approve,\\n{code} 2 for Reject,\\nor open'
    ' http://127.0.0.1:8080/respond/{token}\\nExpires {expires_text} UTC"},"receipt":"{receipt}"}',
]


def filled(template, values):
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def test_a_pause_without_fields_is_shown_byte_for_byte_as_before(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.post_json("/v1/pause", {**WIRE, "metadata": {"k": 1}}, headers=api.as_key(key))
    pending = api.get(f"/v1/pause/{created.json['pause_id']}", headers=api.as_key(key)).text
    api.step("notifications")
    api.post_json(f"/v1/respond/{token_of(created.json['respond_url'])}", {"choice": "Approve", "comment": "ok"})
    decided = api.get(f"/v1/pause/{created.json['pause_id']}", headers=api.as_key(key))
    values = {"pause_id": created.json["pause_id"], "token": token_of(created.json["respond_url"]),
              "expires_at": created.json["expires_at"], "created_at": created.json["created_at"],
              "decided_at": decided.json["decided_at"], "code": re.search(r"Reply (\w+) 1", pending).group(1),
              "expires_text": re.search(r"Expires (.+?) UTC", pending).group(1), "receipt": decided.json["receipt"]}
    assert [created.text, pending, decided.text] == [filled(template, values) for template in RECORDED]


def test_an_edit_within_bounds_reaches_the_agent_with_what_changed(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.create_pause(key, fields=FIELDS)
    assert api.pause(key, created["pause_id"])["fields"] == {**FIELDS, "payee": {**FIELDS["payee"]}}
    assert "edited" not in api.pause(key, created["pause_id"])          # nothing decided yet
    facts = api.post_json(f"/v1/respond/{token_of(created['respond_url'])}",
                          {"choice": "Approve", "fields": {"amount": 300, "payee": "Acme Corp"}}).json
    edited = {"amount": {"old": 340, "new": 300}}
    assert facts["fields"]["amount"]["value"] == 300 and facts["edited"] == edited
    pause = api.pause(key, created["pause_id"])
    assert pause["fields"]["amount"]["value"] == 300 and pause["fields"]["payee"]["value"] == "Acme Corp"
    assert pause["edited"] == edited            # an unchanged value, even if sent, is not an edit
    event = api.get("/v1/events", params={"types": "pause.responded"}, headers=api.as_key(key)).json["events"][0]
    assert event["data"]["fields"] == pause["fields"] and event["data"]["edited"] == edited
    audited = stored(api.config, "SELECT data FROM audit_events WHERE event_type = 'pause.responded'")
    assert json.loads(audited[0][0])["edited"] == edited


@pytest.mark.parametrize("edits, field, says", [
    ({"amount": 501}, "fields.amount", "Amount (USD) must be from 0 to 500"),
    ({"amount": "300"}, "fields.amount", "Amount (USD) must be a number"),
    ({"payee": "Mallory"}, "fields.payee", "payee may not be changed"),
    ({"iban": "X"}, "fields.iban", "this request has no field 'iban'"),
])
def test_an_edit_out_of_bounds_or_to_a_fixed_field_is_refused_by_name(running_api, edits, field, says):
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.create_pause(key, fields=FIELDS)
    refused = api.post_json(f"/v1/respond/{token_of(created['respond_url'])}", {"choice": "Approve", "fields": edits},
                            status=422).json["error"]
    assert refused["field"] == field and refused["message"] == says
    assert api.pause(key, created["pause_id"])["status"] == "pending"
    assert stored(api.config, "SELECT count(*) FROM audit_events WHERE event_type = 'pause.responded'") == [(0,)]


@pytest.mark.parametrize("fields, field, says", [
    ({"n": {"type": "number", "value": 5, "max_length": 3}}, "fields.n", "a number field takes no max_length"),
    ({"n": {"type": "enum", "value": "a"}}, "fields.n", "an enum field needs its choices"),
    ({"n": {"type": "enum", "value": "c", "choices": ["a", "b"]}}, "fields.n", "value must be one of: a, b"),
    ({"n": {"type": "integer", "value": 2.5}}, "fields.n", "value must be a whole number"),
    ({"n": {"type": "number", "value": 5, "min": 6}}, "fields.n", "value must be at least 6"),
    ({"n": {"type": "number", "value": 1, "min": 3, "max": 2}}, "fields.n", "min must not be above max"),
    ({"n": {"type": "string", "value": "abcd", "max_length": 3}}, "fields.n", "value must be text of at most 3"),
    ({"n": {"type": "boolean", "value": "yes"}}, "fields.n", "value must be true or false"),
    ({"a b": {"type": "boolean", "value": True}}, "fields", "fields must be an object of up to 10 named values"),
    ({f"f{n}": {"type": "boolean", "value": True} for n in range(11)}, "fields", "up to 10"),
    ({"n": {"type": "date", "value": "2026-01-01"}}, "fields.n", "type is string (max_length)"),
    ({"n": {"type": "enum", "value": "a", "choices": ["a", "b" * 101]}}, "fields.n", "each like"),
])
def test_fields_are_declared_with_types_and_bounds_that_fit(api, developer, fields, field, says):
    refused = api.post_json("/v1/pause", {**WIRE, "fields": fields}, headers=api.as_key(developer["test_api_key"]),
                            status=422).json["error"]
    assert refused["field"] == field and says in refused["message"]


def test_the_respond_page_lets_the_approver_change_what_may_change(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    fields = {**FIELDS, "rush": {"type": "boolean", "value": False, "editable": True, "label": XSS},
              "tier": {"type": "enum", "value": "b", "choices": ["a", "b"], "editable": True}}
    created = api.create_pause(key, fields=fields)
    page = api.get(f"/respond/{token_of(created['respond_url'])}")
    assert XSS not in page.text and "&lt;script&gt;" in page.text
    assert page.html.select_one("label[for=field-amount]").text == "Amount (USD) (from 0 to 500)"
    form = page.forms[0]
    assert "field.payee" not in form.fields and "Acme Corp" in page.text         # shown, not offered
    form["field.amount"] = "lots"
    refused = form.submit("choice", value="Approve", status=422)
    assert "Amount (USD) must be a number" in refused.text
    form = refused.forms[0]
    form["field.amount"], form["field.rush"] = "250.0", "true"
    shown = form.submit("choice", value="Approve", status=303).follow()
    # Each label the agent's, quoted and set apart in the page's sentence that tells of the change.
    assert ('“<bdi class="field-label">Amount (USD)</bdi>” changed from <bdi>340</bdi> to <strong>250</strong>.'
            in shown.text)
    assert [label.text for label in shown.html.select("p.comment bdi.field-label")] == ["Amount (USD)", XSS]
    assert api.pause(key, created["pause_id"])["edited"] == {"amount": {"old": 340, "new": 250},
                                                            "rush": {"old": False, "new": True}}


def test_a_decision_that_is_not_the_approvers_keeps_the_fields_as_asked(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    expiring, cancelled = api.create_pause(key, fields=FIELDS), api.create_pause(key, fields=FIELDS)
    run_out(api.config["database.path"], expiring["pause_id"])
    api.step("timeouts")
    api.post(f"/v1/pause/{cancelled['pause_id']}/cancel", headers=api.as_key(key))
    for created in (expiring, cancelled):
        pause = api.pause(key, created["pause_id"])
        assert pause["fields"] == {name: {**field} for name, field in FIELDS.items()} and pause["edited"] == {}


def test_the_dashboard_shows_the_fields_and_what_the_approver_changed(running_api):
    api = running_api()
    signed_up = api.get("/dashboard/signup").forms[0]
    signed_up["email"], signed_up["name"], signed_up["password"] = "ada@example.com", "Ada", "correct horse battery"
    key = re.search(r"pp_test_[A-Za-z0-9_-]+", signed_up.submit().follow().text).group(0)
    created = api.create_pause(key, fields={**FIELDS, "memo": {"type": "string", "value": XSS, "editable": True}})
    api.post_json(f"/v1/respond/{token_of(created['respond_url'])}", {"choice": "Approve", "fields": {"amount": 300}})
    page = api.get(f"/dashboard/pauses/{created['pause_id']}").text
    assert "<dt>Amount (USD)</dt><dd>300, changed from 340</dd>" in page and "<dt>payee</dt><dd>Acme Corp</dd>" in page
    assert XSS not in page


def test_a_form_sent_back_untouched_changes_nothing(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    fields = {"account": {"type": "integer", "value": 2 ** 53 - 1, "editable": True},
              "ratio": {"type": "number", "value": 0.1, "editable": True},
              "invoice": {"type": "string", "value": " INV-1 ", "editable": True},
              "address": {"type": "string", "value": "\nAcme Corp\nSuite 5", "editable": True},
              "tier": {"type": "enum", "value": "b", "choices": ["a", "b"], "editable": True},
              "rush": {"type": "boolean", "value": True, "editable": True}}
    created = api.create_pause(key, fields=fields)
    page = api.get(f"/respond/{token_of(created['respond_url'])}")
    page.forms[0].submit("choice", value="Approve", status=303)
    pause = api.pause(key, created["pause_id"])
    assert pause["edited"] == {} and {name: f["value"] for name, f in pause["fields"].items()} == {
        name: field["value"] for name, field in fields.items()}


def test_a_refused_form_comes_back_with_what_the_person_typed(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.create_pause(key, fields={**FIELDS, "note": {"type": "string", "value": "", "max_length": 5,
                                                               "editable": True}})
    form = api.get(f"/respond/{token_of(created['respond_url'])}").forms[0]
    form["field.amount"], form["field.note"], form["comment"] = "300", "far too long", "Checked <the> invoice\ntwice"
    again = form.submit("choice", value="Approve", status=422).forms[0]
    assert again["field.amount"].value == "300" and again["field.note"].value == "far too long"
    assert again["comment"].value == "Checked <the> invoice\ntwice"


def test_a_whole_number_too_big_to_hold_exactly_is_told_so_not_called_fractional(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.create_pause(key, fields={"account": {"type": "integer", "value": 7, "editable": True}})
    form = api.get(f"/respond/{token_of(created['respond_url'])}").forms[0]
    form["field.account"] = str(2 ** 53 + 1)
    assert "must be a number between" in form.submit("choice", value="Approve", status=422).text
    refused = api.post_json(f"/v1/respond/{token_of(created['respond_url'])}",
                            {"choice": "Approve", "fields": {"account": float(2 ** 53 + 2)}}, status=422).json["error"]
    assert "must be a number between" in refused["message"]


@pytest.mark.parametrize("fields, says", [
    ({"n": {"type": "number", "value": 10 ** 400}}, "value must be a number between"),
    ({"n": {"type": "number", "value": 1, "max": 10 ** 400}}, "max must be a number between"),
    ({"n": {"type": "integer", "value": 2 ** 53}}, "value must be a number between"),
    ({"n": {"type": "integer", "value": 3, "min": 0.5}}, "min must be a whole number"),
    ({"n": {"type": "enum", "value": "sp", "choices": [" sp ", "sp"]}}, "choices must not begin or end with spaces"),
    # Choices an approver could take for one another, as options may not be.
    ({"n": {"type": "enum", "value": "a", "choices": ["a", "A"]}}, "choices must be distinct, and look distinct"),
    ({"n": {"type": "enum", "value": "Ace", "choices": ["Ace", "\u0410\u0441\u0435"]}}, "look distinct"),
    ({"n": {"type": "enum", "value": "Ok", "choices": ["Ok", "Ok\u200b"]}}, "look distinct"),
    ({"n": {"type": "enum", "value": "si", "choices": ["si", "s\u00ed"]}}, "differ only in case, accents"),
    ({"n": {"type": "enum", "value": "x", "choices": ["x", "\u200b"]}}, "choices must be visible text"),
    ({"n": {"type": "enum", "value": "x", "choices": ["x", "Appr\u0585ve"]}}, "must not mix alphabets"),
])
def test_declarations_a_page_or_a_reader_could_not_hold_are_refused(api, developer, fields, says):
    refused = api.post_json("/v1/pause", {**WIRE, "fields": fields}, headers=api.as_key(developer["test_api_key"]),
                            status=422).json["error"]
    assert refused["field"] == "fields.n" and says in refused["message"]


def test_fields_whose_form_could_outgrow_a_request_are_refused(api, developer):
    many = {f"text{n}": {"type": "string", "value": "", "editable": True} for n in range(6)}
    refused = api.post_json("/v1/pause", {**WIRE, "fields": many}, headers=api.as_key(developer["test_api_key"]),
                            status=422).json["error"]
    assert refused["field"] == "fields" and "smaller max_length" in refused["message"]
    fitting = {name: {**field, "max_length": 200} for name, field in many.items()}
    api.post_json("/v1/pause", {**WIRE, "fields": fitting}, headers=api.as_key(developer["test_api_key"]))


@pytest.mark.parametrize("look_alike", [
    "\u13aa\u13df\u13b7\u13ac INC",        # ACME in Cherokee letters: a word of one alphabet
    "ACM\ua4f0 INC",                         # a Lisu E, of an alphabet drawn as Latin capitals
    "ACME 1NC",                              # a one for an I
    "ACME lNC",                              # a small L for an I
    "ACME \u06f1NC",                         # an Arabic-Indic one for an I
])
def test_an_edit_drawn_as_the_value_asked_in_other_letters_is_refused(running_api, look_alike):
    """Whoever approves reads the edit as the value they were asked about, while the agent
    is given another: a different payee's name, say."""
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.create_pause(key, fields={"payee": {"type": "string", "value": "ACME INC", "editable": True}})
    refused = api.post_json(f"/v1/respond/{token_of(created['respond_url'])}",
                            {"choice": "Approve", "fields": {"payee": look_alike}}, status=422).json["error"]
    assert refused["field"] == "fields.payee" and "differ visibly" in refused["message"]
    assert api.pause(key, created["pause_id"])["status"] == "pending"


def test_a_huge_number_as_an_edit_is_refused_by_name(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.create_pause(key, fields=FIELDS)
    body = '{"choice": "Approve", "fields": {"payee": %s}}' % ("9" * 400)
    refused = api.post(f"/v1/respond/{token_of(created['respond_url'])}", body,
                       content_type="application/json", status=422).json["error"]
    assert refused["field"] == "fields.payee"


def test_whoever_answers_by_text_is_shown_the_fields(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.create_pause(key, fields={**FIELDS, "rush": {"type": "boolean", "value": True}})
    text = api.pause(key, created["pause_id"])["notification"]["text"]
    assert text.startswith(f"\"{WIRE['message']}\"\n\"Amount (USD): 340\"\n\"payee: Acme Corp\"\n\"rush: Yes\"\nReply ")
    assert "edited" not in api.get(f"/v1/respond/{token_of(created['respond_url'])}").json      # nothing decided yet


def test_texts_show_the_title_and_emails_and_pushes_the_details_the_page_shows_beside_the_question(running_api):
    """Details may be 16 KB (a whole tool call), which no text message holds: its link shows them."""
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.create_pause(key, title="Wire\n$340", fields=FIELDS,
                               metadata={"invoice": "INV-7", "amount": 340, "display": ["invoice", "amount"]})
    shown = "invoice: INV-7\namount: 340\nAmount (USD): 340\npayee: Acme Corp\n"
    text = api.pause(key, created["pause_id"])["notification"]["text"]
    assert text.startswith(f"\"Wire $340\"\n\"{WIRE['message']}\"\n\"Amount (USD): 340\"\n\"payee: Acme Corp\"\nReply ")
    pause = api.app.runtime.db().execute("SELECT * FROM pauses WHERE id = ?", (created["pause_id"],)).fetchone()
    quoted = "".join(f"> {line}\n" for line in shown.splitlines())
    assert pausepoint.push_text(pause, "u").startswith(f"> Wire $340\n> {WIRE['message']}\n>\n{quoted}Options: ")
    email = pausepoint.email_text(pause, created["respond_url"])
    assert f"An agent is asking:\n> Wire $340\n>\n> {WIRE['message']}\n>\n{quoted}\nChoose one" in email
    html = pausepoint.email_message({**api.config, "smtp.from_address": "pp@example.org"},
                                    {"id": "ntf_1", "recipient": "ada@example.com", "text": email, "kind": "ask",
                                     "created_at": pause["created_at"]},
                                    dict(pause)).get_body(("html",)).get_content()
    assert ">Wire\n$340</h1>" in html and 'invoice:</span> <span dir="auto">INV-7</span></p>' in html


def test_a_detail_on_several_lines_is_one_line_in_emails_and_pushes_and_forges_no_link(running_api):
    """A detail is data the page shows in a cell of its table: in a push or an email's text it
    must not read as lines of the message, an answer link of its own among them."""
    api = running_api()
    key = api.register()["test_api_key"]
    forged = "INV-7\n\nChoose one:\n  Approve: https://evil.example/a\nAnswer: https://evil.example/a"
    created = api.create_pause(key, metadata={"invoice": forged, "display": ["invoice"]})
    pause = api.app.runtime.db().execute("SELECT * FROM pauses WHERE id = ?", (created["pause_id"],)).fetchone()
    line = "invoice: INV-7 Choose one: Approve: https://evil.example/a Answer: https://evil.example/a\n"
    for text in (pausepoint.push_text(pause, "u"), pausepoint.email_text(pause, created["respond_url"])):
        assert f"> {line}" in text                   # quoted as the agent's
        assert not any(said.startswith(("Answer: https://evil", "  Approve: https://evil"))
                       for said in text.splitlines())


def test_a_text_field_on_several_lines_is_one_line_in_every_message_and_forges_no_reply(running_api):
    """A field's text is data, often read by the agent from elsewhere (an invoice's payee, say), as a
    detail is: in a text, an email or a push its lines must not read as the message's own, a reply
    instruction or an answer link of its choosing among them."""
    api = running_api()
    key = api.register()["test_api_key"]
    forged = "Acme Corp\n\nReply 1 for Reject\n  Approve: https://evil.example/a"
    created = api.create_pause(key, fields={"payee": {"type": "string", "value": forged}})
    pause = api.app.runtime.db().execute("SELECT * FROM pauses WHERE id = ?", (created["pause_id"],)).fetchone()
    line = "payee: Acme Corp Reply 1 for Reject Approve: https://evil.example/a"
    for text in (api.pause(key, created["pause_id"])["notification"]["text"], pausepoint.push_text(pause, "u"),
                 pausepoint.email_text(pause, created["respond_url"])):
        assert f"> {line}\n" in text or f'"{line}"\n' in text         # a text message quotes it in "…"
        assert not any(said.startswith(("Reply 1 for Reject", "  Approve: https://evil")) for said in text.splitlines())
    assert json.loads(pause["fields"])["payee"]["value"] == forged          # kept as written, for the agent


def test_emails_and_pushes_list_the_fields_too(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.create_pause(key, fields=FIELDS)
    conn = api.app.runtime.db()
    pause = conn.execute("SELECT * FROM pauses WHERE id = ?", (created["pause_id"],)).fetchone()
    email = pausepoint.email_text(pause, created["respond_url"])
    assert f"> {WIRE['message']}\n>\n> Amount (USD): 340\n> payee: Acme Corp\n\nChoose one" in email
    pushed = pausepoint.push_text(pause, "u")
    assert f"> {WIRE['message']}\n>\n> Amount (USD): 340\n> payee: Acme Corp\nOptions: " in pushed
    plain = conn.execute("SELECT * FROM pauses WHERE id = ?", (api.create_pause(key)["pause_id"],)).fetchone()
    assert f"An agent is asking:\n> {WIRE['message']}\n\nChoose one" in pausepoint.email_text(plain, "u")


def test_a_number_is_shown_in_its_digits_never_in_exponent_notation(running_api):
    """5e-05 BTC is easily read as 5 BTC, and 1.5e+21 as 1.5: what JSON writers send for very
    small and very large numbers is shown as the digits a person reads."""
    api = running_api()
    key = api.register()["test_api_key"]
    fields = {"btc": {"type": "number", "value": 5e-05}, "units": {"type": "number", "value": 1.5e21}}
    created = api.create_pause(key, fields=fields)
    page = api.get(f"/respond/{token_of(created['respond_url'])}")
    assert [p.text for p in page.html.select("p.field strong")] == [
        "0.00005", "1\u202f500\u202f000\u202f000\u202f000\u202f000\u202f000\u202f000"]
    text = api.pause(key, created["pause_id"])["notification"]["text"]
    assert '"btc: 0.00005"\n"units: 1 500 000 000 000 000 000 000"\n' in text
    assert api.pause(key, created["pause_id"])["fields"]["btc"]["value"] == 5e-05      # the agent's number as sent


def test_long_numbers_are_shown_in_groups_of_three_no_reader_takes_for_a_decimal_point(running_api):
    """In much of Europe "1,250,000" reads as 1.25 and "340.000" as 340,000: the digits are
    spaced instead, as SI writes them (a narrow space; in texts a plain one, which GSM-7 has)."""
    api = running_api()
    key = api.register()["test_api_key"]
    fields = {"amount": {"type": "integer", "value": 1250000, "min": 10000, "max": 2000000, "editable": True},
              "rate": {"type": "number", "value": -12345.675}, "fee": {"type": "integer", "value": 9999}}
    created = api.create_pause(key, fields=fields)
    page = api.get(f"/respond/{token_of(created['respond_url'])}")
    assert page.html.select_one("input[name='field.amount']")["value"] == "1250000"      # the form keeps the number
    label = page.html.select_one("label[for='field-amount']").text
    assert label == "amount (from 10\u202f000 to 2\u202f000\u202f000)"
    assert [p.text for p in page.html.select("p.field strong")] == ["-12\u202f345.675", "9999"]
    text = api.pause(key, created["pause_id"])["notification"]["text"]
    assert '"amount: 1 250 000"\n"rate: -12 345.675"\n"fee: 9999"\n' in text
    pause = api.app.runtime.db().execute("SELECT * FROM pauses WHERE id = ?", (created["pause_id"],)).fetchone()
    shown = "amount: 1\u202f250\u202f000\nrate: -12\u202f345.675\nfee: 9999\n"
    for text in (pausepoint.push_text(pause, "u"), pausepoint.email_text(pause, "u")):
        assert shown.replace("\n", "\n> ")[:-2] in text      # quoted as the agent's
    api.post_json(f"/v1/respond/{token_of(created['respond_url'])}", {"choice": "Approve", "fields": {"amount": 1200000}})
    decided = api.get(f"/respond/{token_of(created['respond_url'])}").text
    assert "amount</bdi>” changed from <bdi>1\u202f250\u202f000</bdi> to <strong>1\u202f200\u202f000</strong>" in (
        decided)
