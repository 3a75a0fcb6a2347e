"""The declared contract: one route table, its OpenAPI document, and a running server
that keeps to that document whatever Schemathesis generates from it."""

import ast
import re

import pytest
import requests
from hypothesis import HealthCheck, given, settings

from conftest import WIRE, start_server, stored
from test_dashboard import log_in, sign_up
import pausepoint


def openapi_path(rule):
    return re.sub(r"<(\w+)>", r"{\1}", rule)


def test_every_route_is_in_the_document_and_every_documented_path_is_a_route(api):
    document = api.get("/v1/openapi.json").json
    documented = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    served = {(route.method, openapi_path(route.rule)) for route in api.app.routes
              if route.rule.startswith(("/v1/", "/.well-known/")) or route.rule == "/healthz"}
    assert documented == served
    assert {(r.method, openapi_path(r.path)) for r in pausepoint.ROUTES if not r.page} == served


def test_the_document_is_valid_openapi_3_1_with_auth_errors_and_webhooks(api):
    from openapi_spec_validator import validate     # here: only the process running this test loads it
    document = api.get("/v1/openapi.json").json
    validate(document)
    create = document["paths"]["/v1/pause"]["post"]
    assert create["security"] == [{"apiKey": []}]
    assert "Idempotency-Key" in [p["name"] for p in create["parameters"]]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["message", "options", "timeout_hours"]
    assert {"if": {"not": {"required": ["recipients"]}}, "then": {"required": ["channel", "recipient"]}} in body["allOf"]
    # Every status the route can answer is listed, and nothing else: a status the server
    # gives that is not here fails the fuzzing below.
    assert set(create["responses"]) == {"201", "400", "401", "403", "413", "415", "422", "429", "500", "503", "507"}
    assert set(document["paths"]["/v1/auth/register"]["post"]["responses"]) >= {"403", "409"}
    assert [code for code, answer in create["responses"].items() if "Retry-After" in answer.get("headers", {})] \
        == ["429", "503", "507"]                    # the README's promise, in the document clients are made from
    assert document["webhooks"]["pause.responded"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "allOf"][1]["properties"]["data"] == {"$ref": "#/components/schemas/Pause"}
    assert [p["name"] for p in document["paths"]["/v1/pause/{pause_id}"]["get"]["parameters"]] == ["pause_id", "wait"]
    signed = document["webhooks"]["pause.responded"]["post"]
    assert "X-PausePoint-Signature" in [p["name"] for p in signed["parameters"]]
    assert document["paths"]["/v1/auth/register"]["post"]["security"] == []


def test_every_route_refuses_a_query_parameter_it_does_not_declare_and_says_so(api, developer):
    """Any route answers 422 to a query parameter it does not take, so every route lists 422;
    before it reads the body, whoever checks that (the create checks its own)."""
    document = api.get("/v1/openapi.json").json
    for route in (r for r in pausepoint.ROUTES if not r.page):
        assert "422" in document["paths"][openapi_path(route.path)][route.method.lower()]["responses"], route.path
        if route.auth in ("key", "none"):
            path = re.sub(r"<(\w+)>", "x", route.path)
            error = api.request(f"{path}?zzz_surprise=1", method=route.method, status=422,
                                **({"body": b'{"zzz_unknown": 1}', "content_type": "application/json"} if route.body
                                   else {}), headers=api.as_key(developer["test_api_key"])).json["error"]
            assert error["field"] == "zzz_surprise", route.path


def test_the_document_names_this_servers_channels(tmp_path):
    app = pausepoint.create_app(pausepoint.load_config(environ={}, overrides={
        "database.path": str(tmp_path / "db"), "channels.ops.url": "json://127.0.0.1:9/hook"}))
    channel = app.runtime.openapi["paths"]["/v1/pause"]["post"]["requestBody"]["content"]["application/json"]
    assert channel["schema"]["properties"]["channel"]["enum"] == ["sms", "whatsapp", "email", "link", "ops"]


def test_create_app_and_every_function_stay_under_60_lines():
    with open(pausepoint.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    long = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 >= 60}
    assert long == {}


# -- Schemathesis against a running server ----------------------------------------------------

@pytest.fixture(scope="module")
def contract_server(tmp_path_factory):
    """`python pausepoint.py` for the whole module, limits off, with a developer and a pause to find."""
    server = start_server(tmp_path_factory.mktemp("contract") / "pausepoint.db",
                          env={"PAUSEPOINT_RATELIMIT_ENABLED": "false", "PAUSEPOINT_WEBHOOKS_ALLOW_PRIVATE": "true"})
    keys = requests.post(f"{server.url}/v1/auth/register",
                         json={"email": "contract@example.com", "name": "C", "password": "password123"}).json()
    auth = {"Authorization": f"Bearer {keys['test_api_key']}"}
    requests.post(f"{server.url}/v1/pause", json=WIRE, headers=auth).raise_for_status()
    yield server, auth
    server.stop()


# The document for a server with the default settings, as the fuzzed server has them;
# the first test below checks that it is the document that server serves.
DOCUMENT = pausepoint.openapi_document(pausepoint.load_config(environ={}))
OPERATIONS = [(method.upper(), path) for path, operations in DOCUMENT["paths"].items() for method in operations]


def test_the_fuzzed_document_is_the_one_the_server_serves(contract_server):
    server, _ = contract_server
    served = requests.get(f"{server.url}/v1/openapi.json").json()
    assert {**served, "servers": None} == {**DOCUMENT, "servers": None}


# Operations with rules past JSON Schema, so data the document calls valid may be refused:
# look-alike options and timeout_default among the options; a webhook host that resolves.
PAST_JSON_SCHEMA = {("POST", "/v1/pause"), ("POST", "/v1/webhooks"), ("PATCH", "/v1/webhooks/{webhook_id}")}


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_the_running_server_keeps_to_its_document(contract_server, method, path):
    # Imported here, not at the top: Schemathesis is heavy to load, and only the
    # process that runs these tests needs it (nor its pytest plugin, which is off).
    import schemathesis
    server, auth = contract_server
    operation = schemathesis.openapi.from_dict(DOCUMENT)[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=10, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    def conforms(case):
        # Every response conforms: no 5xx; documented status, content type, headers and body;
        # data the document calls invalid is refused, and data it calls valid accepted.
        if case.query and isinstance(case.query.get("wait"), int):
            case.query["wait"] = min(case.query["wait"], 1)     # a long poll is a wait, not a finding
        excluded = [schemathesis.checks.positive_data_acceptance] if (method, path) in PAST_JSON_SCHEMA else []
        case.call_and_validate(base_url=server.url, headers=auth, excluded_checks=excluded)

    conforms()


# -- tenants and modes apart, route by route ----------------------------------------------------

def owned_things(api, key):
    """A pause, a webhook and one of its deliveries, made with `key`: their ids by the names
    the routes give them."""
    pause_id = api.create_pause(key, channel="link", recipient="ops")["pause_id"]
    webhook_id = api.post_json("/v1/webhooks", {"url": "http://127.0.0.1:9/hook", "events": ["pause.responded"]},
                               headers=api.as_key(key)).json["webhook_id"]
    delivery_id = api.post(f"/v1/webhooks/{webhook_id}/test", headers=api.as_key(key), status=202).json["delivery_id"]
    return {"pause_id": pause_id, "webhook_id": webhook_id, "delivery_id": delivery_id}


def as_it_stands(config):
    return [stored(config, "SELECT id, status, decided_at FROM pauses"),
            stored(config, "SELECT id, url, status, secret, deleted_at FROM webhooks"),
            stored(config, "SELECT id, status, attempts FROM webhook_deliveries ORDER BY id")]


def sweep_named_routes(api, ids, as_whom, csrf):
    """Every route naming one of `ids`, asked by each of `as_whom` ({name: headers, or None for
    the signed-in session}): 404, however it is asked. Returns the routes asked."""
    asked = []
    for route in pausepoint.ROUTES:
        names = re.findall(r"<(\w+)>", route.path)
        if not names or not set(names) <= set(ids) or route.auth not in ("key", "session"):
            continue
        path = re.sub(r"<(\w+)>", lambda m: ids[m.group(1)], route.path)
        for whom, headers in as_whom[route.auth].items():
            if route.auth == "key":
                body = {"body": b'{"url": "http://127.0.0.1:9/taken"}', "content_type": "application/json"} \
                    if route.body else {}
                answer = api.request(path, method=route.method, headers=headers, status="*", **body)
            elif route.method == "GET":
                answer = api.get(path, status="*")
            else:
                answer = api.post(path, {"csrf": csrf, "action": "delete"}, status="*")
            assert answer.status_int == 404, (route.method, path, whom, answer.status)
            asked.append((route.method, route.path))
    return asked


def test_no_route_shows_or_changes_one_developers_or_modes_data_to_another(running_api):
    """Every route of the table that names a pause, webhook or delivery answers 404 to another
    developer and to the same developer's other mode, and changes nothing; every list shows
    them none of its ids. Swept from the table, so a route added to it is swept too."""
    api = running_api(**{"webhooks.allow_private": True})
    _, owner = sign_up(api)
    api.reset()
    _, stranger = sign_up(api, email="other@example.com")
    ids = owned_things(api, owner["test"])
    before = as_it_stands(api.config)
    csrf = api.get("/dashboard/webhooks").html.select_one("input[name=csrf]")["value"]
    others = {"key": {"another developer": api.as_key(stranger["test"]), "the live key": api.as_key(owner["live"])},
              "session": {"another developer": None}}
    swept = sweep_named_routes(api, ids, others, csrf)
    assert len(swept) == 2 * 8 + 5         # the API's routes naming them, each asked twice; the dashboard's
    lists = [route.path for route in pausepoint.ROUTES
             if route.method == "GET" and "<" not in route.path and route.auth in ("key", "session")]
    seen_by_owner = {path for path in lists if any(i in api.get(path, headers=api.as_key(owner["test"]),
                                                                status="*").text for i in ids.values())}
    assert {"/v1/pause", "/v1/webhooks", "/v1/events", "/v1/audit", "/v1/audit/export"} <= seen_by_owner
    for path in lists:
        for headers in others["key"].values():
            shown = api.get(path, headers=headers, status="*").maybe_follow(status="*").text
            assert not any(i in shown for i in ids.values()), path
    # The owner, signed in, in live mode: the test-mode things are not there either.
    api.reset()
    log_in(api)
    api.post("/dashboard/mode", {"csrf": api.get("/dashboard/webhooks").html.select_one("input[name=csrf]")["value"],
                                 "mode": "live"}, status=303)
    sweep_named_routes(api, ids, {"key": {}, "session": {"the live mode": None}},
                       api.get("/dashboard/webhooks").html.select_one("input[name=csrf]")["value"])
    for path in (p for p in lists if p.startswith("/dashboard")):
        assert not any(i in api.get(path, status="*").maybe_follow(status="*").text for i in ids.values()), path
    assert as_it_stands(api.config) == before
