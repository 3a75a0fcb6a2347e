"""Hostile input: whatever arrives, the answer is a 2xx or a 4xx in the one error shape,
and text a person will read cannot be made to look like something else."""

import gzip
import json
import re
import socket
import sys
import urllib.parse

import pytest
import requests
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import WIRE, Api, make_config, stored, token_of
import pausepoint

HOOK = {"url": "http://127.0.0.1:9/hook", "events": ["pause.responded"], "secret": "s" * 20}


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """One app for the whole module, with a developer, a pause, a webhook and a delivery to aim at."""
    config = make_config(tmp_path_factory.mktemp("fuzz"), **{"ratelimit.enabled": False, "webhooks.allow_private": True})
    app = pausepoint.create_app(config)
    api = Api(app, extra_environ={"REMOTE_ADDR": "192.0.2.99"})
    keys = api.register()
    auth = api.as_key(keys["test_api_key"])
    pause = api.post_json("/v1/pause", WIRE, headers=auth).json
    hook = api.post_json("/v1/webhooks", HOOK, headers=auth).json
    delivery = api.post(f"/v1/webhooks/{hook['webhook_id']}/test", headers=auth).json
    return {"api": api, "auth": auth, "pause": pause["pause_id"], "token": token_of(pause["respond_url"]),
            "webhook": hook["webhook_id"], "delivery": delivery["delivery_id"]}


# Every JSON endpoint: (method, path template, a valid body to mutate, needs the API key).
JSON_ENDPOINTS = [
    ("POST", "/v1/auth/register", {"email": "x@example.com", "name": "X", "password": "password123"}, False),
    ("POST", "/v1/auth/keys/rotate", {"email": "dev@example.com", "password": "wrong-password", "key": "test"}, False),
    ("POST", "/v1/pause", WIRE, True),
    ("POST", "/v1/pause/{pause}/cancel", None, True),
    ("POST", "/v1/webhooks", HOOK, True),
    ("PATCH", "/v1/webhooks/{webhook}", {"events": ["pause.created"], "enabled": True}, True),
    ("POST", "/v1/webhooks/{webhook}/test", None, True),
    ("POST", "/v1/webhooks/{webhook}/deliveries/{delivery}/redeliver", None, True),
    ("POST", "/v1/respond/{token}", {"choice": "Approve", "comment": "fine"}, False),
]
QUERY_ENDPOINTS = [
    ("/v1/pause", ("status", "limit", "cursor")),
    ("/v1/pause/{pause}", ("wait",)),
    ("/v1/webhooks/{webhook}/deliveries", ("limit", "cursor")),
    ("/v1/audit", ("event_type", "pause_id", "limit", "cursor")),
    ("/v1/respond/{token}", ("choice",)),
]

# Any text, lone surrogates and control characters included; any JSON value made of it.
texts = st.sampled_from(["\ud800", "a\udfffb", "\x00", "Reject\u200b", "\u202eevil", "", " ", "1e999"]) | st.text(
    st.characters(codec=None, exclude_categories=[]), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=12)


@st.composite
def bodies(draw, valid):
    """A valid body with one field replaced or added, or any JSON value at all."""
    if valid is None or draw(st.booleans()):
        return draw(json_values)
    field = draw(st.sampled_from(sorted(valid)) | texts)
    return {**valid, field: draw(texts | json_values)}


def assert_one_error_shape(response):
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json["error"]
        assert set(error) <= {"code", "message", "field"} and error["code"] and error["message"]


def quoted(text):
    """Percent-encoded UTF-8, lone surrogates included (as their invalid 3-byte forms)."""
    return urllib.parse.quote_from_bytes(text.encode("utf-8", "surrogatepass"))


FUZZ = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("method, path, valid, keyed", JSON_ENDPOINTS, ids=[e[1] for e in JSON_ENDPOINTS])
def test_no_json_body_gets_a_5xx_and_every_error_has_the_one_shape(fuzz, method, path, valid, keyed):
    @FUZZ
    @given(body=bodies(valid))
    def check(body):
        raw = json.dumps(body).encode()       # ensure_ascii: lone surrogates travel as \\ud800 escapes
        headers = {**(fuzz["auth"] if keyed else {}), "Content-Type": "application/json"}
        assert_one_error_shape(fuzz["api"].request(path.format(**fuzz), method=method, body=raw, headers=headers,
                                                   expect_errors=True))
    check()


@pytest.mark.parametrize("method, path, valid, keyed", [e for e in JSON_ENDPOINTS if e[2] is not None],
                         ids=[e[1] for e in JSON_ENDPOINTS if e[2] is not None])
def test_a_field_no_endpoint_knows_is_422_naming_it_before_anything_happens(fuzz, method, path, valid, keyed):
    """A misspelt or invented field is a mistake the caller wants to hear about: a "plan" given at
    registration, a "reason" given with a choice, would otherwise be dropped in silence."""
    raw = json.dumps({**valid, "zzz_surprise": 1}).encode()
    headers = {**(fuzz["auth"] if keyed else {}), "Content-Type": "application/json"}
    error = fuzz["api"].request(path.format(**fuzz), method=method, body=raw, headers=headers, status=422).json["error"]
    assert error["field"] == "zzz_surprise" and "unknown field" in error["message"]


def test_a_body_sent_to_a_cancel_is_422_naming_its_field_and_the_pause_stays_pending(api, developer):
    """The cancel takes no body: a "reason" sent with it would otherwise be dropped in silence,
    the caller believing it recorded. An empty object is no body."""
    key = api.as_key(developer["test_api_key"])
    pause_id = api.post_json("/v1/pause", WIRE, headers=key).json["pause_id"]
    error = api.post_json(f"/v1/pause/{pause_id}/cancel", {"reason": "wrong payee"}, headers=key, status=422).json["error"]
    assert error == {"code": "invalid_request", "message": "unknown field 'reason'; this takes no body", "field": "reason"}
    assert api.get(f"/v1/pause/{pause_id}", headers=key).json["status"] == "pending"
    assert api.post_json(f"/v1/pause/{pause_id}/cancel", {}, headers=key).json["status"] == "cancelled"


def test_a_body_sent_to_a_read_is_422_naming_its_field_not_a_filter_dropped_in_silence(api, developer):
    """A list takes its filters as query parameters: {"status": "pending"} sent as a body was
    dropped in silence, and the caller handed every pause as if only pending ones."""
    key = {**api.as_key(developer["test_api_key"]), "Content-Type": "application/json"}
    pause_id = api.post_json("/v1/pause", WIRE, headers=key).json["pause_id"]
    api.post(f"/v1/pause/{pause_id}/cancel", headers=key)
    error = api.request("/v1/pause", method="GET", body=b'{"status": "pending"}', headers=key, status=422).json["error"]
    assert error == {"code": "invalid_request", "message": "unknown field 'status'; this takes no body", "field": "status"}
    assert api.request("/v1/pause", method="GET", body=b"{}", headers=key).json["pauses"][0]["status"] == "cancelled"


def test_a_route_that_takes_no_body_is_told_so_whatever_the_body_is_labelled(api, developer):
    """`curl -d '{}'` labels its body a form: an empty object is no body however labelled, and
    any other body is refused as one the route does not take, not as one to send as JSON."""
    key = api.as_key(developer["test_api_key"])
    pause_id = api.post_json("/v1/pause", WIRE, headers=key).json["pause_id"]
    for body, label in ((b"reason=wrong payee", "application/x-www-form-urlencoded"), (b"wrong payee", "text/plain"),
                        (b"[" * 100_000, "application/json"), (b"\xff{", "text/plain")):
        error = api.post(f"/v1/pause/{pause_id}/cancel", body, headers={**key, "Content-Type": label},
                         status=422).json["error"]
        assert error == {"code": "invalid_request", "message": "this takes no body"}, body[:20]
    assert api.get(f"/v1/pause/{pause_id}", headers=key).json["status"] == "pending"
    cancelled = api.post(f"/v1/pause/{pause_id}/cancel", b" { } ", headers={**key, "Content-Type":
                                                                             "application/x-www-form-urlencoded"})
    assert cancelled.json["status"] == "cancelled"


def test_a_body_sent_where_none_is_taken_is_named_only_by_a_field_that_is_text(api, developer):
    """JSON can spell a lone surrogate ('\\ud800'), which no text encoding stores and strict
    JSON readers refuse: named as the field, it made the 422 itself unreadable to them."""
    key = api.as_key(developer["test_api_key"])
    pause_id = api.post_json("/v1/pause", WIRE, headers=key).json["pause_id"]
    for body, said in ((b'{"\\ud800": 1}', None), (b'{"\\ud800": 1, "reason": "x"}', "reason")):
        answer = api.post(f"/v1/pause/{pause_id}/cancel", body, headers={**key, "Content-Type": "application/json"},
                          status=422)
        assert "\\ud800" not in answer.text and answer.json["error"].get("field") == said, body


def test_an_unknown_query_parameter_is_named_as_it_was_written(api, developer):
    """A query arrives as Latin-1 (WSGI); its names are UTF-8 as sent: 'statüs', not 'statÃ¼s'."""
    error = api.get("/v1/pause?stat%C3%BCs=pending", headers=api.as_key(developer["test_api_key"]),
                    status=422).json["error"]
    assert error["field"] == "statüs" and error["message"].startswith("unknown query parameter 'statüs'")


@pytest.mark.parametrize("path, names", QUERY_ENDPOINTS, ids=[e[0] for e in QUERY_ENDPOINTS])
def test_no_query_gets_a_5xx_and_every_error_has_the_one_shape(fuzz, path, names):
    @FUZZ
    @given(query=st.dictionaries(st.sampled_from(names) | texts, texts, max_size=3))
    def check(query):
        raw = "&".join(f"{quoted(name)}={quoted(value)}" for name, value in query.items())
        response = fuzz["api"].get(f"{path.format(**fuzz)}?{raw}", headers=fuzz["auth"], expect_errors=True)
        assert_one_error_shape(response)
    check()


# -- the findings, one by one ------------------------------------------------------------

@pytest.mark.parametrize("channel", [[], {}, ["sms"], 7])
def test_a_channel_that_is_not_a_name_is_422(api, developer, channel):
    response = api.post_json("/v1/pause", {**WIRE, "channel": channel}, headers=api.as_key(developer["test_api_key"]),
                             status=422)
    assert response.json["error"]["field"] == "channel"


def test_a_key_name_that_is_not_a_name_is_422(api, developer):
    assert api.post_json("/v1/auth/keys/rotate", {"email": "dev@example.com", "password": "x" * 8, "key": []},
                         status=422).json["error"]["field"] == "key"


@pytest.mark.parametrize("body, field", [
    ({**WIRE, "message": "Approve?\ud800"}, "message"),
    ({**WIRE, "options": ["Approve", "Re\udc00ject"]}, "options[1]"),
    ({**WIRE, "metadata": {"\ud800": 1}}, "metadata"),
    ({**WIRE, "metadata": {"note": ["ok", "\udfff"]}}, "metadata.note[1]"),
])
def test_a_lone_surrogate_anywhere_in_a_pause_is_400_naming_where(live_server, body, field):
    keys = requests.post(f"{live_server.url}/v1/auth/register",
                         json={"email": "s@example.com", "name": "S", "password": "password123"}).json()
    response = requests.post(f"{live_server.url}/v1/pause", data=json.dumps(body),
                             headers={"Authorization": f"Bearer {keys['test_api_key']}",
                                      "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == {"code": "invalid_json", "field": field,
                                        "message": response.json()["error"]["message"]}


@pytest.mark.parametrize("path, body, field", [
    ("/v1/auth/register", {"email": "a@example.com", "name": "Ada\ud800", "password": "password123"}, "name"),
    ("/v1/webhooks", {**HOOK, "url": "http://127.0.0.1:9/\ud800"}, "url"),
    ("/v1/webhooks", {**HOOK, "secret": "s" * 20 + "\ud800"}, "secret"),
])
def test_a_lone_surrogate_in_any_other_body_is_400(api, developer, path, body, field):
    response = api.post(path, json.dumps(body), headers={**api.as_key(developer["test_api_key"]),
                                                         "Content-Type": "application/json"}, status=400)
    assert response.json["error"]["field"] == field


def test_a_lone_surrogate_in_a_respond_comment_is_400(api, developer):
    created = api.create_pause(developer["test_api_key"])
    body = json.dumps({"choice": "Approve", "comment": "ok\ud800"})
    api.post(f"/v1/respond/{token_of(created['respond_url'])}", body, content_type="application/json", status=400)
    assert api.pause(developer["test_api_key"], created["pause_id"])["status"] == "pending"


@pytest.mark.parametrize("changes, field", [
    ({"message": "Wire $340?\x00"}, "message"),
    ({"message": "Wire $340 to \u202eevil\u202c?"}, "message"),
    ({"message": "Carriage\rreturn"}, "message"),
    ({"options": ["Approve", "Reject\x85"]}, "options"),
    ({"options": ["Approve", "\u2067Reject"]}, "options"),
    ({"options": ["Reject", "Reject\u200b"]}, "options"),
    ({"options": ["Reject", "reject"]}, "options"),
    ({"options": ["Ｒｅｊｅｃｔ", "Reject"]}, "options"),
    ({"options": ["Approve", "\u200b\u2060"]}, "options"),
    ({"options": ["Reject", "R\u0435ject"]}, "options"),          # a Cyrillic е
    ({"options": ["OK", "\u039fK"]}, "options"),                   # a Greek Ο
    ({"options": ["ACME", "\u13aa\u13df\u13b7\u13ac"]}, "options"),  # the same in Cherokee letters
    ({"options": ["Plan I", "Plan l"]}, "options"),               # a capital I, a small L
    ({"options": ["Approve", "Approv\u0117"]}, "options"),        # an ė: a dot faint on a small screen
    ({"options": ["Approve", "Appro\u0301ve"]}, "options"),       # a combining acute over nothing of note
    ({"options": ["Send it", "Send  it"]}, "options"),              # one space or two: one button to a reader
    ({"options": ["Approve", "Approve\u034f"]}, "options"),
    # A line break in what a text message lists within its own line could start a line
    # that seems to be ours: 'K7 2 for Reject\n\nReply 1 to reject'.
    ({"options": ["Approve", "Reject\n\nReply 1 to reject"]}, "options"),
    ({"options": ["Approve", "Reject\tnow"]}, "options"),
    ({"fields": {"n": {"type": "number", "value": 1, "label": "Amount\nReply 1 to reject"}}}, "fields.n"),
    ({"fields": {"n": {"type": "number", "value": 1, "label": "Amount\n"}}}, "fields.n"),
    ({"fields": {"n": {"type": "enum", "value": "a", "choices": ["a", "b\nReply 1"]}}}, "fields.n"),
    ({"message": "Approve?\U000e0041\U000e0042"}, "message"),     # tag characters: invisible ASCII
    ({"message": "Line\u2028separator"}, "message"),
    ({"recipient": "+15550100\x00"}, "recipient"),
])
def test_control_bidi_and_look_alike_text_is_refused(api, developer, changes, field):
    response = api.post_json("/v1/pause", {**WIRE, **changes}, headers=api.as_key(developer["test_api_key"]),
                             status=422)
    assert response.json["error"]["field"] == field


def test_newlines_tabs_and_emoji_are_fine(api, developer):
    created = api.create_pause(developer["test_api_key"], message="Line one\n\tLine two 👨‍👩‍👧",
                               options=["✅ Approve", "❌ Reject"], timeout_default="❌ Reject",
                               fields={"address": {"type": "string", "value": "Acme Corp\n\tSuite 5", "label": "📍 To"}})
    assert created["status"] == "pending"


@pytest.mark.parametrize("name", ["Ada\x00", "Ada\u202e", "Ada\x1b[31m"])
def test_a_registration_name_with_control_characters_is_422(api, name):
    assert api.post_json("/v1/auth/register", {"email": "a@example.com", "name": name, "password": "password123"},
                         status=422).json["error"]["field"] == "name"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_json_bodies_must_say_they_are_json(live_server, content_type):
    # A page anywhere can send text/plain without a CORS preflight.
    body = json.dumps({"email": "c@example.com", "name": "C", "password": "password123"})
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.post(f"{live_server.url}/v1/auth/register", data=body.encode(), headers=headers)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    ok = requests.post(f"{live_server.url}/v1/auth/register", data=body.encode(),
                       headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 201


@pytest.mark.parametrize("encoding, compress", [("gzip", gzip.compress), ("gzip", lambda b: b), ("br", lambda b: b)])
def test_a_compressed_body_is_refused_by_its_content_encoding_not_read_as_if_plain(live_server, encoding, compress):
    body = json.dumps({"email": "z@example.com", "name": "Z", "password": "password123"}).encode()
    response = requests.post(f"{live_server.url}/v1/auth/register", data=compress(body),
                             headers={"Content-Type": "application/json", "Content-Encoding": encoding})
    assert response.status_code == 415 and "without a Content-Encoding" in response.json()["error"]["message"]
    assert requests.post(f"{live_server.url}/v1/auth/register", data=body, headers={
        "Content-Type": "application/json", "Content-Encoding": "identity"}).status_code == 201


@pytest.mark.parametrize("address", [
    "64:ff9b::7f00:1",          # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",       # NAT64 of 169.254.169.254, the cloud metadata service
    "64:ff9b:1::808:808",       # local-use NAT64, whatever it embeds
    "2002:a00:1::",             # 6to4 of 10.0.0.1
    "::127.0.0.1",              # IPv4-compatible
    "::ffff:0:c0a8:1",          # SIIT-translated 192.168.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",     # Teredo, client 127.0.0.1
    "::ffff:127.0.0.1", "::1", "fe80::1%1",
])
def test_ipv6_forms_that_embed_a_private_ipv4_address_are_not_public(address):
    assert not pausepoint.is_public_address(address)


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::", "::ffff:8.8.8.8", "8.8.8.8",
                                     "2606:4700:4700::1111"])
def test_public_addresses_in_any_form_stay_public(address):
    assert pausepoint.is_public_address(address)


def test_a_webhook_url_naming_an_embedded_private_address_is_refused(api, developer):
    response = api.post_json("/v1/webhooks", {**HOOK, "url": "http://[64:ff9b::a9fe:a9fe]/latest/meta-data"},
                             headers=api.as_key(developer["test_api_key"]), status=422)
    assert "webhooks.allow_private" in response.json["error"]["message"]


@pytest.mark.parametrize("rounds", [4, 10])
def test_an_unknown_email_costs_the_same_bcrypt_work_as_a_known_one(rounds):
    assert pausepoint.stand_in_password_hash(rounds).startswith(f"$2b${rounds:02d}$".encode())


# -- headers and bodies that are not what they claim ------------------------------------------

@pytest.mark.parametrize("header, value", [
    ("Authorization", b"Bearer \xff\xfe"),
    ("User-Agent", b"curl/\xff\xfe"),
    ("Idempotency-Key", b"key-\xff"),
])
def test_headers_that_are_not_utf8_are_a_4xx_never_a_500(live_server, header, value):
    keys = requests.post(f"{live_server.url}/v1/auth/register",
                         json={"email": "h@example.com", "name": "H", "password": "password123"}).json()
    headers = {"Authorization": f"Bearer {keys['test_api_key']}".encode(), "Content-Type": "application/json",
               header: value}
    created = requests.post(f"{live_server.url}/v1/pause", data=json.dumps(WIRE), headers=headers)
    assert created.status_code in (201, 401, 422), created.text
    if header == "User-Agent":
        token = token_of(created.json()["respond_url"])
        for method, path in (("GET", f"/v1/respond/{token}"), ("GET", f"/respond/{token}"),
                             ("POST", "/v1/respond/unknown-token")):
            answer = requests.request(method, live_server.url + path, headers={"User-Agent": value,
                                      "Content-Type": "application/json"},
                                      data=b'{"choice": "Approve"}' if method == "POST" else None)
            assert answer.status_code in (200, 404), (path, answer.status_code)


def test_an_unknown_token_is_404_whatever_else_is_wrong_with_the_form(api):
    response = api.post("/respond/not-a-token", {"choice": "Approve", "comment": "\x01" + "x" * 3000}, status=404)
    assert response.content_type == "text/html"


def test_an_idempotency_key_with_control_characters_is_422(api, developer):
    response = api.post_json("/v1/pause", WIRE, headers={**api.as_key(developer["test_api_key"]),
                                                         "Idempotency-Key": "key\x01"}, status=422)
    assert response.json["error"]["field"] == "Idempotency-Key"


@pytest.mark.parametrize("url", ["http://[::1", "http://[::1]:99999/x", "http://exa mple.com/"])
def test_a_webhook_url_that_does_not_parse_is_422(api, developer, url):
    response = api.post_json("/v1/webhooks", {**HOOK, "url": url}, headers=api.as_key(developer["test_api_key"]),
                             status=422)
    assert response.json["error"]["field"] == "url"


def post_pause_text(api, developer, body, status):
    """POST /v1/pause with `body` as JSON text just as written (Python's JSON writer would
    refuse to write some of it, or write it otherwise)."""
    return api.post("/v1/pause", body, headers={**api.as_key(developer["test_api_key"]),
                                                "Content-Type": "application/json"}, status=status)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(api, developer, constant):
    body = json.dumps(WIRE)[:-1] + f', "metadata": {{"x": {constant}}}}}'
    response = post_pause_text(api, developer, body, 400)
    assert response.json["error"]["code"] == "invalid_json"


def test_a_password_with_a_nul_is_refused(api):
    assert api.post_json("/v1/auth/register", {"email": "n@example.com", "name": "N", "password": "\x00" * 10},
                         status=422).json["error"]["field"] == "password"


def test_a_repeated_unexpected_error_logs_one_traceback_a_minute(api, developer, config, caplog):
    created = api.create_pause(developer["test_api_key"])
    stored(config, "UPDATE pauses SET options = 'not json'")
    for _ in range(50):
        api.get(f"/v1/respond/{token_of(created['respond_url'])}", status=500)
    tracebacks = [r for r in caplog.records if r.name == "pausepoint" and r.exc_info]
    assert len(tracebacks) == 1


@pytest.mark.parametrize("depth", [33, 500, 700, 800, 900, 5_000])
def test_metadata_nested_however_deep_is_a_4xx(api, developer, depth):
    """422 past 32 levels; 400 when too deep for Python's JSON reader (near a thousand)."""
    body = json.dumps(WIRE)[:-1] + ', "metadata": {"a": ' + "[" * depth + "]" * depth + "}}"
    response = post_pause_text(api, developer, body, "*")
    assert response.status_int in (400, 422) and "nested" in response.json["error"]["message"]


def test_metadata_nested_near_the_json_readers_limit_is_a_4xx_with_an_idempotency_key_too(api, developer):
    """A keyed create is looked up by its body's fingerprint before the body is checked: the
    JSON writer making it runs out of stack a little before the reader does."""
    headers = {**api.as_key(developer["test_api_key"]), "Content-Type": "application/json"}
    for depth in range(880, 1000):
        body = json.dumps(WIRE)[:-1] + ', "metadata": ' + '{"x":' * depth + "1" + "}" * depth + "}"
        response = api.post("/v1/pause", body, headers={**headers, "Idempotency-Key": f"k{depth}"}, status="*")
        assert response.status_int in (400, 422), depth


def test_a_bad_idempotency_key_is_named_after_what_is_wrong_with_the_body(api, developer):
    headers = {**api.as_key(developer["test_api_key"]), "Idempotency-Key": "x" * 256}
    refused = api.post_json("/v1/pause", {**WIRE, "timeout_default": "Maybe"}, headers=headers, status=422)
    assert refused.json["error"]["field"] == "timeout_default"
    refused = api.post_json("/v1/pause", WIRE, headers=headers, status=422)
    assert refused.json["error"]["field"] == "Idempotency-Key"


def test_metadata_numbers_too_large_to_be_finite_are_400(api, developer):
    body = json.dumps(WIRE)[:-1] + ', "metadata": {"a": 1e400}}'
    response = post_pause_text(api, developer, body, 400)
    assert response.json["error"]["code"] == "invalid_json"


def test_a_text_message_keeps_what_the_agent_wrote_inside_quotes_it_cannot_close(api, developer):
    """A quote mark of the agent's own ended its quotes early, and a field's line had none:
    what followed, "Reply 1 for Reject, 2 for Approve", read as ours, and a person who
    texted 1 to reject approved."""
    fake = "Reply 1 for Reject, 2 for Approve."
    created = api.create_pause(developer["test_api_key"], message=f'Wire $340?" {fake} "Thanks',
                               fields={"note": {"type": "string", "value": "x", "label": fake}})
    text = api.pause(developer["test_api_key"], created["pause_id"])["notification"]["text"]
    agents = [line for line in text.splitlines() if fake in line]
    assert len(agents) == 2
    assert all(line.startswith('"') and line.endswith('"') and line.count('"') == 2 for line in agents), text


def test_a_path_that_is_not_utf8_is_400_not_read_as_another(api, developer):
    """Bottle dropped the bytes of a path that are not UTF-8: /v1/pause/{id}%FF read that
    pause, and /v1/pause/%FF was "no such endpoint: GET /v1/pause/"."""
    created = api.create_pause(developer["test_api_key"])
    auth = api.as_key(developer["test_api_key"])
    for path in (f"/v1/pause/{created['pause_id']}%FF", "/v1/pause/%FF", f"/v1/respond/{token_of(created['respond_url'])}%C3"):
        error = api.get(path, headers=auth, status=400).json["error"]
        assert error["code"] == "bad_request" and "not UTF-8" in error["message"], path


def test_a_whole_number_too_long_to_read_is_400_saying_so_in_our_words(api, developer):
    """Python reads at most 4,300 digits; its own message names a setting of the server's."""
    body = json.dumps(WIRE)[:-1] + ', "metadata": {"a": 1' + "0" * 5_000 + "}}"
    error = post_pause_text(api, developer, body, 400).json["error"]
    assert error["code"] == "invalid_json"
    assert error["message"] == "the request body is not valid JSON: a number of 5001 digits is too long to read"


def test_a_number_too_large_to_be_finite_is_not_echoed_in_full(api, developer):
    body = json.dumps(WIRE)[:-1] + ', "metadata": {"a": 1' + "0" * 3_000 + ".5}}"
    error = post_pause_text(api, developer, body, 400).json["error"]
    assert error["message"] == "the request body is not valid JSON: a number of 3003 characters is too large"


# Lists far past their limit whose items are all distinct only when every pair is compared
# (one item of another type keeps them from being sorted): a check of each pair took 36 s of
# CPU for these options. And visible text far past its limit that then fails its pattern: an
# option of 60,000 characters took the pattern 27 s. The answers now take milliseconds.
@pytest.mark.timeout(5)
@pytest.mark.parametrize("changes, field", [
    ({"options": [*range(11_500), "x"]}, "options"),
    ({"fields": {"f": {"type": "enum", "value": "a", "choices": [*range(10_000), "x"]}}}, "fields.f"),
    ({"options": ["a" * 60_000 + "\n", "b"]}, "options"),
    ({"recipient": "a" * 60_000 + "\x00", "channel": "link"}, "recipient"),
    ({"fields": {"f": {"type": "string", "value": "a", "label": "a" * 60_000 + "\n"}}}, "fields.f"),
])
def test_a_list_or_text_far_past_its_limit_is_refused_without_reading_it_through(api, developer, changes, field):
    body = json.dumps({**WIRE, **changes}, separators=(",", ":"))
    response = post_pause_text(api, developer, body, 422)
    assert response.json["error"]["field"] == field


def test_json_a_person_reads_escapes_each_unsafe_character_without_python_work_for_it():
    """One call per character took an audit export 11.5 s of CPU when each of 999 pauses held
    16 KB of DEL characters in its metadata."""
    value = {"a": "\x7f\x85\u202e\U000e0041 é\n" * 10_000}
    assert python_calls(lambda: pausepoint.json_for_reading(value)) < 100
    text = pausepoint.json_for_reading(value)
    assert json.loads(text) == value and pausepoint.UNSAFE_TEXT.search(text) is None and "é\\n" in text


@pytest.mark.parametrize("options", [5, None, True, "Approve"])
def test_options_that_are_not_a_list_are_422(api, developer, options):
    response = api.post_json("/v1/pause", {**WIRE, "options": options}, headers=api.as_key(developer["test_api_key"]),
                             status=422)
    assert response.json["error"]["field"] == "options"


@pytest.mark.parametrize("query, field", [("status=pending&status=responded", "status"), ("limit=1&limit=2", "limit")])
def test_a_query_parameter_given_twice_is_422_not_one_of_them_taken(api, developer, query, field):
    """Whichever one were taken, the client meant the other too (pending or responded pauses)."""
    error = api.get(f"/v1/pause?{query}", headers=api.as_key(developer["test_api_key"]), status=422).json["error"]
    assert error["field"] == field and "given 2 times" in error["message"]


@pytest.mark.parametrize("recipient", [15550100, None, ["ops"]])
def test_a_link_recipient_that_is_not_text_is_told_it_must_be_text_not_that_it_is_too_long(api, developer, recipient):
    body = {**WIRE, "channel": "link", "recipient": recipient}
    error = api.post_json("/v1/pause", body, headers=api.as_key(developer["test_api_key"]), status=422).json["error"]
    assert error["field"] == "recipient" and "must be text" in error["message"], error["message"]


def test_options_nested_deep_are_refused_not_compared_until_the_stack_runs_out(api, developer):
    deep = "[" * 400 + "]" * 400
    body = json.dumps(WIRE)[:-1].replace('"options": ["Approve", "Reject"]', f'"options": [{deep}, {deep}]') + "}"
    response = post_pause_text(api, developer, body, 422)
    assert response.json["error"]["field"] == "options"


@pytest.mark.parametrize("field", ["recipient", "channel", "options", "recipients", "remind_after_minutes"])
def test_a_value_nested_up_to_the_json_readers_limit_where_another_is_expected_is_a_4xx(api, developer, field):
    """jsonschema writes the refused value into its message, which recursed out of stack (a 500)
    for values the JSON reader had just managed to read: some depth below a thousand, which
    depends on how deep the request already is."""
    answers = set()
    for depth in range(800, 1000, 5):
        body = json.dumps({**WIRE, field: 0}).replace(f'"{field}": 0', f'"{field}": ' + "[" * depth + "]" * depth)
        answers.add(post_pause_text(api, developer, body, "*").status_int)
    assert answers <= {400, 422}


def test_of_several_bad_entries_the_422_names_the_first_by_name(api, developer):
    """Whichever the library found first, which went by the order of a set, and so changed
    from one run of the server to the next."""
    fields = {f"f{n}": {"type": "no such type", "value": 1} for n in (3, 5, 0, 4, 1, 2)}
    response = api.post_json("/v1/pause", {**WIRE, "fields": fields}, headers=api.as_key(developer["test_api_key"]),
                             status=422)
    assert response.json["error"]["field"] == "fields.f0"


def python_calls(work):
    """How many Python functions run while work() does: work the interpreter does, counted
    exactly, where its time would depend on the machine."""
    calls = []
    sys.setprofile(lambda frame, event, arg: calls.append(1) if event == "call" else None)
    try:
        work()
    except pausepoint.ApiError:
        pass
    finally:
        sys.setprofile(None)
    return len(calls)


def deeply(value, depth=140):
    return json.loads("[" * depth + json.dumps(value) + "]" * depth)


# Shapes within the limits, or past an object's, that the library checked item by item and
# pair by pair: 0.67 s of CPU for the first (1.6 million calls), 0.2 s and 0.1 s for the others.
@pytest.mark.parametrize("schema, body, most", [
    ("pause", {**WIRE, "fields": {f"f{k}": {"type": "enum", "value": "a", "choices": [{"x": deeply(n)} for n in range(20)]}
                                  for k in range(10)}}, 50_000),
    ("pause", {**WIRE, "fields": {f"f{k}": {"type": "number", "value": 1} for k in range(6_000)}}, 5_000),
    ("respond", {"choice": "Approve", "fields": {f"f{k}": [] for k in range(6_000)}}, 5_000),
])
def test_no_body_costs_the_validator_work_out_of_proportion_to_its_limits(schema, body, most):
    schema = (pausepoint.pause_request_schema(pausepoint.load_config(environ={})) if schema == "pause"
              else pausepoint.RESPONSE_SCHEMA)
    assert python_calls(lambda: pausepoint.validate_body(schema, body)) < most


def test_past_its_limit_a_list_or_text_is_checked_for_nothing_else():
    validator = pausepoint.SchemaValidator({
        "type": "object", "properties": {
            "list": {"type": "array", "maxItems": 2, "uniqueItems": True, "items": {"type": "string"}},
            "text": {"type": "string", "maxLength": 3, "pattern": "^a*$"}}})
    errors = validator.iter_errors({"list": [1, 1, 1], "text": "bbbb"})
    assert sorted(error.validator for error in errors) == ["maxItems", "maxLength"]


@pytest.mark.timeout(5)
@pytest.mark.parametrize("pattern, text", [
    ("VISIBLE_TEXT", "a" * 60_000 + "\x00"), ("VISIBLE_TEXT", " a" * 30_000 + "\u202e"),
    ("ONE_LINE_TEXT", "a" * 60_000 + "\n"), ("ONE_LINE_TEXT", " a" * 30_000 + "\x00")])
def test_the_text_patterns_read_a_text_that_fails_them_once(pattern, text):
    """Written as a visible character between two runs, they took 27 s for one like these."""
    assert re.search(getattr(pausepoint, pattern), text) is None


def test_every_list_text_with_a_pattern_and_object_of_entries_a_request_may_hold_has_a_limit():
    """What keeps the checks of a list's items, a text's pattern and an object's entries bounded
    (SchemaValidator)."""
    config = pausepoint.load_config(environ={"PAUSEPOINT_CHANNELS_OPS_URL": "json://127.0.0.1:9/hook"})

    def unbounded(schema, where):
        if isinstance(schema, dict):
            types = schema.get("type")
            if (types == "array" or isinstance(types, list) and "array" in types) and "maxItems" not in schema:
                yield where
            if "pattern" in schema and "maxLength" not in schema:
                yield where
            if (isinstance(schema.get("additionalProperties"), dict) or "propertyNames" in schema) \
                    and "maxProperties" not in schema:
                yield where
            for key, value in schema.items():
                yield from unbounded(value, f"{where}.{key}")
        elif isinstance(schema, list):
            for n, value in enumerate(schema):
                yield from unbounded(value, f"{where}[{n}]")
    schemas = [*(route.body(config) if callable(route.body) else route.body for route in pausepoint.ROUTES),
               *(query for route in pausepoint.ROUTES for query in route.query.values())]
    assert [where for schema in schemas if schema for where in unbounded(schema, "body")] == []


@pytest.mark.parametrize("options", [["Approve", "Approve\u2800"], ["Approve", "Appr\u0585ve"], ["\u0410pprove", "Reject"]])
def test_blank_characters_and_words_mixing_alphabets_are_refused_in_options(api, developer, options):
    response = api.post_json("/v1/pause", {**WIRE, "options": options, "timeout_default": None},
                             headers=api.as_key(developer["test_api_key"]), status=422)
    assert response.json["error"]["field"] == "options"


def test_options_mixing_scripts_across_words_or_with_cjk_are_fine(api, developer):
    created = api.create_pause(developer["test_api_key"], options=["Да / Yes", "OKです", "Ψ-test"], timeout_default=None)
    assert created["status"] == "pending"


@pytest.mark.parametrize("recipient", ["ops,ceo@example.com", "a:b,c;d@example.com", "Ada <ada@example.com>",
                                       "ada@example.com, eve@example.com", "ada@localhost"])
def test_an_email_recipient_is_one_plain_address(api, developer, recipient):
    response = api.post_json("/v1/pause", {**WIRE, "channel": "email", "recipient": recipient},
                             headers=api.as_key(developer["test_api_key"]), status=422)
    assert response.json["error"]["field"] == "recipient"


def test_a_twilio_form_that_is_not_utf8_is_400_before_anything_else(api, config):
    response = api.post("/v1/twilio/inbound", b"From=%2B15550100&Body=%FF", status=400,
                        content_type="application/x-www-form-urlencoded")
    assert response.json["error"]["code"] == "bad_request"


def test_the_respond_form_takes_only_url_encoded_utf8(api, developer):
    created = api.create_pause(developer["test_api_key"])
    path = f"/respond/{token_of(created['respond_url'])}"
    multipart = api.post(path, upload_files=[("comment", "c.txt", b"\xff\xfe")], params={"choice": "Approve"},
                         status=415)
    assert multipart.content_type == "text/html"
    assert api.post(path, b"choice=Approve&comment=%FF", content_type="application/x-www-form-urlencoded",
                    status=400).content_type == "text/html"
    assert api.pause(developer["test_api_key"], created["pause_id"])["status"] == "pending"


@pytest.mark.parametrize("url", ["http://2130706433/hook", "http://0x7f.0.0.1/hook", "http://127.1/hook",
                                 "http://printer.local/hook", "http://nas.home.arpa/", "http://db.internal:5432/"])
def test_addresses_written_any_way_and_local_names_are_refused_at_registration(api, developer, url):
    response = api.post_json("/v1/webhooks", {**HOOK, "url": url}, headers=api.as_key(developer["test_api_key"]),
                             status=422)
    assert "webhooks.allow_private" in response.json["error"]["message"]


def test_registering_a_webhook_never_waits_on_a_name_lookup(api, developer, monkeypatch):
    looked_up = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: looked_up.append(args) or [])
    api.post_json("/v1/webhooks", {**HOOK, "url": "https://hooks.example.com/pausepoint"},
                  headers=api.as_key(developer["test_api_key"]), status=201)
    assert looked_up == []              # checked on every delivery instead, on the addresses it then has


def test_a_respond_link_opened_from_ever_new_addresses_is_recorded_a_bounded_number_of_times(app, developer, config):
    created = Api(app).create_pause(developer["api_key"], channel="link", recipient="ops")
    for n in range(130):
        Api(app, extra_environ={"REMOTE_ADDR": f"2001:db8::{n:x}"}).get(f"/v1/respond/{token_of(created['respond_url'])}")
    assert stored(config, "SELECT count(*) FROM audit_events WHERE event_type = 'respond_page.opened'") == [(100,)]


def test_webhook_changes_are_rate_limited_per_developer(tmp_path):
    app = pausepoint.create_app(make_config(tmp_path, **{"ratelimit.webhook_changes_per_hour": 3,
                                                         "webhooks.allow_private": True}))
    api = Api(app)
    auth = api.as_key(api.register()["api_key"])
    webhook = api.post_json("/v1/webhooks", HOOK, headers=auth).json["webhook_id"]
    for events in (["pause.created"], ["pause.cancelled"]):
        api.patch_json(f"/v1/webhooks/{webhook}", {"events": events}, headers=auth)
    refused = api.patch_json(f"/v1/webhooks/{webhook}", {"enabled": False}, headers=auth, status=429)
    assert refused.json["error"]["code"] == "rate_limited" and int(refused.headers["Retry-After"]) > 0
    assert api.get(f"/v1/webhooks/{webhook}", headers=auth).json["status"] == "enabled"


def test_test_webhook_changes_spend_none_of_the_live_keys_budget(tmp_path):
    app = pausepoint.create_app(make_config(tmp_path, **{"ratelimit.webhook_changes_per_hour": 1,
                                                         "webhooks.allow_private": True}))
    api = Api(app)
    keys = api.register()
    api.post_json("/v1/webhooks", HOOK, headers=api.as_key(keys["test_api_key"]))
    api.post_json("/v1/webhooks", HOOK, headers=api.as_key(keys["test_api_key"]), status=429)
    api.post_json("/v1/webhooks", HOOK, headers=api.as_key(keys["api_key"]))


def test_a_field_left_out_is_said_to_be_required_not_wrong(api, developer):
    """"channel must be one of …" alone reads as though a wrong one had been given."""
    key = api.as_key(developer["test_api_key"])
    body = {name: value for name, value in WIRE.items() if name not in ("channel", "recipient")}
    error = api.post_json("/v1/pause", body, headers=key, status=422).json["error"]
    assert error["field"] == "channel" and error["message"].startswith("channel is required, and must be one of")
    wrong = api.post_json("/v1/pause", {**WIRE, "channel": "pigeon"}, headers=key, status=422).json["error"]
    assert wrong["message"].startswith("channel must be one of")


def test_an_empty_cursor_for_the_feed_is_refused_as_no_event_id(api, developer):
    error = api.get("/v1/events?after=", headers=api.as_key(developer["test_api_key"]), status=422).json["error"]
    assert error == {"code": "invalid_request", "message": "after must be an event id (evt_…)", "field": "after"}
