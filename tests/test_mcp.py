"""client/pausepoint_mcp.py through the MCP SDK's own client against a live server: once over
stdio, as a host launches it, and otherwise through the SDK's in-memory transport in this
process (the same protocol, without the 0.9 s of CPU a launch costs)."""

import json
import os
import subprocess
import sys
import unittest.mock

import anyio
import pytest
import requests

from conftest import answer_first_pending, reads_of_one_pause, register_over_http, ROOT, run_out, token_of
from stubs import serve_stand_in, stop_http

MCP_SERVER = os.path.join(ROOT, "client", "pausepoint_mcp.py")


def with_mcp(url, key, steps, over_stdio=False, **env):
    """Run `steps(call, mcp)` against a fresh MCP server; call(tool, arguments) returns the
    tool's JSON answer. In this process the server reads these settings from the environment
    while the steps run, and starts its session empty, as a new process would. A setting given
    as None is not set at all."""
    from mcp import Client, StdioServerParameters

    settings = {name: value for name, value in {"PAUSEPOINT_URL": url, "PAUSEPOINT_API_KEY": key,
                                                "PAUSEPOINT_RECIPIENT": "+15550100", "PAUSEPOINT_MCP_WAIT": "20",
                                                **env}.items() if value is not None}

    async def session(server):
        async with Client(server) as mcp:
            async def call(tool, arguments):
                result = await mcp.call_tool(tool, arguments)
                return json.loads(result.content[0].text)
            return await steps(call, mcp)

    if over_stdio:
        return anyio.run(session, StdioServerParameters(command=sys.executable, args=[MCP_SERVER], env=settings))
    if os.path.dirname(MCP_SERVER) not in sys.path:
        sys.path.insert(0, os.path.dirname(MCP_SERVER))
    import pausepoint_mcp
    pausepoint_mcp.asked.clear()
    pausepoint_mcp.asked_here.clear()
    pausepoint_mcp.unanswered_creates.clear()
    with unittest.mock.patch.dict(os.environ, settings):      # restored afterwards, whatever it held
        for name in [name for name in os.environ if name.startswith("PAUSEPOINT_") and name not in settings]:
            del os.environ[name]                                # so the server's defaults apply
        return anyio.run(session, pausepoint_mcp.server)


@pytest.fixture
def setup(live_server):
    return live_server.url, register_over_http(live_server.url, "mcp@example.com", "M")["test_api_key"]


def test_the_tools_are_listed_with_their_schemas_and_the_warning(setup):
    async def steps(call, mcp):
        return {tool.name: tool for tool in (await mcp.list_tools()).tools}
    tools = with_mcp(*setup, steps, over_stdio=True)
    assert set(tools) == {"request_approval", "wait_for_approval", "cancel_approval"}
    schema = tools["request_approval"].input_schema
    # The model may word the question and add choices, never say who answers, how, or what approves.
    assert schema["required"] == ["question"]
    assert set(schema["properties"]) == {"question", "other_options", "timeout_hours", "default"}
    assert "Only an explicit approval is permission" in tools["request_approval"].description


@pytest.mark.parametrize("wait, said", [("20", "about 20 s"), ("7.5", "about 7.5 s"), (None, "about 45 s")])
def test_the_tools_descriptions_say_the_wait_in_force(setup, wait, said):
    async def steps(call, mcp):
        return {tool.name: tool.description for tool in (await mcp.list_tools()).tools}
    descriptions = with_mcp(*setup, steps, over_stdio=True, PAUSEPOINT_MCP_WAIT=wait)
    for name in ("request_approval", "wait_for_approval"):
        assert f"(up to {said}" in descriptions[name], descriptions[name]


@pytest.mark.parametrize("other_options, choice, approved", [
    (None, "Approve", True),
    (["Reject", "Ask me tomorrow"], "Ask me tomorrow", False)])     # the model's own choices come after "Approve"
def test_a_request_is_answered_while_the_tool_waits(setup, other_options, choice, approved):
    url, key = setup
    person = answer_first_pending(url, key, choice)

    async def steps(call, mcp):
        return await call("request_approval", {"question": "Wire $340 to Acme Corp?",
                                                **({"other_options": other_options} if other_options else {})})
    # (Spaces around the operator's number, as a config file may leave them, change nothing.)
    answer = with_mcp(url, key, steps, **({"PAUSEPOINT_RECIPIENT": " +15550100 "} if other_options else {}))
    person.join()
    assert answer["status"] == "responded" and answer["approved"] is approved and answer["choice"] == choice
    assert answer["question"] == "Wire $340 to Acme Corp?"
    [pause] = requests.get(f"{url}/v1/pause", headers={"Authorization": f"Bearer {key}"}).json()["pauses"]
    assert pause["options"] == ["Approve", *(other_options or ["Reject"])]
    assert (pause["recipient"], pause["channel"]) == ("+15550100", "sms")


def test_it_reads_the_key_from_the_file_the_hook_reads_it_from(setup, tmp_path):
    url, key = setup
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n", encoding="utf-8")
    key_file.chmod(0o600)
    person = answer_first_pending(url, key, "Approve")

    async def steps(call, mcp):
        return await call("request_approval", {"question": "Wire $340 to Acme Corp?"})
    answer = with_mcp(url, None, steps, over_stdio=True, PAUSEPOINT_API_KEY_FILE=str(key_file))
    person.join()
    assert answer["status"] == "responded" and answer["approved"] is True


def test_a_pending_request_is_waited_for_again_and_asked_only_once(setup):
    url, key = setup

    async def steps(call, mcp):
        first = await call("request_approval", {"question": "Delete the staging database?"})
        again = await call("request_approval", {"question": "Delete the staging database?"})   # re-attaches
        answer_first_pending(url, key, "Approve").join()       # answered while the agent was away
        decided = await call("wait_for_approval", {"pause_id": first["pause_id"]})
        # Once decided, the same question is a new request; the first is still this server's.
        later = await call("request_approval", {"question": "Delete the staging database?"})
        return first, again, decided, later, await call("wait_for_approval", {"pause_id": first["pause_id"]})
    first, again, decided, later, first_again = with_mcp(url, key, steps, PAUSEPOINT_MCP_WAIT="0.3")
    assert first["status"] == "pending" and first["approved"] is False and "wait_for_approval" in first["next"]
    # The model never sees the link, which would let it answer for the person.
    pauses = requests.get(f"{url}/v1/pause", headers={"Authorization": f"Bearer {key}"}).json()["pauses"]
    told = json.dumps([first, again, decided, later, first_again])
    assert "respond_url" not in told and not any(token_of(p["respond_url"]) in told for p in pauses)
    assert again["pause_id"] == first["pause_id"]
    assert decided["approved"] is True and decided["pause_id"] == first["pause_id"]
    assert later["status"] == "pending" and later["pause_id"] != first["pause_id"] and len(pauses) == 2
    assert first_again == decided


def test_a_create_refused_again_and_again_is_tried_only_within_the_wait():
    """A rate limit's short Retry-After is tried again, but only while the tool's own wait lasts
    (less the 10 s the last try may take, or half of it): a host gives a tool call about a minute
    (three tries, 30 s apart, took 92 s)."""
    async def steps(call, mcp):
        return await call("request_approval", {"question": "Deploy to production?"})

    # Retry-After 2 s waits 1.6-2.4 s (jittered): a second try by 2.4 s, a third not before 3.2 s.
    server, url, asked = serve_stand_in([(429, "rate_limited", {"Retry-After": "2"})] * 5)
    try:
        answer = with_mcp(url, "pp_test_x", steps, PAUSEPOINT_MCP_WAIT="6.2")      # tries until 3.1 s in
    finally:
        stop_http(server)
    assert answer["status"] == "error" and [what[:2] for what in asked] == [("POST", "/v1/pause")] * 2


def test_with_a_short_wait_a_create_is_still_tried_again_and_every_step_still_waits():
    """Half of a wait shorter than a call's timeout is kept for the create's tries; and a step of
    a second asks the server to wait that second, not to answer at once."""
    async def steps(call, mcp):
        return await call("request_approval", {"question": "Deploy to production?"})

    server, url, asked = serve_stand_in(creates=[(503, "busy", {})])
    try:
        answer = with_mcp(url, "pp_test_x", steps, PAUSEPOINT_MCP_WAIT="4", PAUSEPOINT_MCP_PROGRESS_EVERY="1")
    finally:
        stop_http(server)
    assert answer["status"] == "pending" and [what[0] for what in asked[:2]] == ["POST", "POST"]
    assert sum(wait == 0 for method, _, wait, _ in asked if method == "GET") <= 1      # at most the last look


def test_reads_refused_again_and_again_are_tried_only_within_the_wait():
    async def steps(call, mcp):
        return await call("request_approval", {"question": "Deploy to production?"})

    server, url, asked = serve_stand_in(reads=[(429, "too_many_waiting", {"Retry-After": "5"})] * 9)
    try:
        answer = with_mcp(url, "pp_test_x", steps, PAUSEPOINT_MCP_WAIT="3")
    finally:
        stop_http(server)
    assert answer["status"] == "error" and [what[0] for what in asked] == ["POST", "GET", "GET"]


@pytest.mark.parametrize("refusal", [(503, "stopping", {"Retry-After": "5", "Connection": "close"}),
                                     (503, "database_busy", {"Retry-After": "60"})], ids=["stopping", "busy"])
def test_a_wait_rides_out_a_server_refusing_for_longer_than_one_calls_retries(refusal):
    """A stopping server refuses the waiting reads, then is gone until it is back: the tool still
    waits out its time, not answering an error while the pause is there to wait for."""
    async def steps(call, mcp):
        return await call("request_approval", {"question": "Deploy to production?"})

    server, url, asked = serve_stand_in(reads=[refusal] * 2)
    try:
        answer = with_mcp(url, "pp_test_x", steps, PAUSEPOINT_MCP_WAIT="3", PAUSEPOINT_MCP_PROGRESS_EVERY="1")
    finally:
        stop_http(server)
    assert answer["status"] == "pending" and answer["approved"] is False
    assert [what[0] for what in asked].count("GET") >= 3           # the refused two, then one answered


def test_the_read_of_an_earlier_request_is_tried_only_within_the_wait():
    """Asked again, the tool first reads the earlier pause: refused, that read too ends within the call's time."""
    async def steps(call, mcp):
        first = await call("request_approval", {"question": "Deploy to production?"})
        server.RequestHandlerClass.reads[:] = [(429, "too_many_waiting", {"Retry-After": "5"})] * 9
        del asked[:]
        return first, await call("request_approval", {"question": "Deploy to production?"})

    server, url, asked = serve_stand_in()
    try:
        first, again = with_mcp(url, "pp_test_x", steps, PAUSEPOINT_MCP_WAIT="3")     # reads until 1.5 s in
    finally:
        stop_http(server)
    assert first["status"] == "pending" and again["status"] == "error"
    assert [what[:3] for what in asked] == [("GET", "/v1/pause/psr_1", 0)]


def test_a_request_asked_again_after_its_create_went_unanswered_texts_the_person_once():
    """The server may have made the pause whose answer never came: the model's next try of the
    same request carries the same Idempotency-Key, so it finds that pause."""
    async def steps(call, mcp):
        failed = await call("request_approval", {"question": "Deploy to production?"})
        server.RequestHandlerClass.creates[:] = []
        return failed, await call("request_approval", {"question": "Deploy to production?"})

    server, url, asked = serve_stand_in(creates=[(503, "busy", {})] * 20)
    try:
        failed, again = with_mcp(url, "pp_test_x", steps, PAUSEPOINT_MCP_WAIT="1")
    finally:
        stop_http(server)
    assert failed["status"] == "error" and again["status"] == "pending"
    keys = {key for method, _, _, key in asked if method == "POST"}
    assert len(keys) == 1 and len([what for what in asked if what[0] == "POST"]) >= 2


def test_the_pause_of_an_unanswered_create_decided_since_is_never_the_answer(setup):
    """A question asked again once its pause was decided is asked anew, even when that pause was
    made by a create whose answer never came."""
    url, key = setup

    async def steps(call, mcp):
        failed = await call("request_approval", {"question": "Deploy to production?"})
        [(_, _, _, idempotency_key)] = [what for what in asked if what[0] == "POST"][:1]
        made = requests.post(f"{url}/v1/pause", headers={"Authorization": f"Bearer {key}",
                                                          "Idempotency-Key": idempotency_key},
                             json={"recipient": "+15550100", "channel": "sms", "message": "Deploy to production?",
                                   "options": ["Approve", "Reject"], "timeout_hours": 1.0}).json()
        assert requests.post(f"{url}/v1/respond/{token_of(made['respond_url'])}", json={"choice": "Approve"}).ok
        os.environ["PAUSEPOINT_URL"] = url          # the server whose answer was lost, reached again
        return failed, made, await call("request_approval", {"question": "Deploy to production?"})

    lost, lost_url, asked = serve_stand_in(creates=[(503, "busy", {})] * 20)
    try:
        failed, made, again = with_mcp(lost_url, key, steps, PAUSEPOINT_MCP_WAIT="0.3")
    finally:
        stop_http(lost)
    assert failed["status"] == "error"
    assert again["status"] == "pending" and again["approved"] is False and again["pause_id"] != made["pause_id"]


def test_a_cancelled_request_is_not_an_approval(setup):
    async def steps(call, mcp):
        pending = await call("request_approval", {"question": "Email 1,200 customers?"})
        return await call("cancel_approval", {"pause_id": pending["pause_id"]})
    answer = with_mcp(*setup, steps, PAUSEPOINT_MCP_WAIT="0.3")
    assert answer["status"] == "cancelled" and answer["approved"] is False


def test_a_request_that_ran_out_shows_no_choice_whatever_default_the_model_gave_it(setup, live_server):
    """Its default is the server's choice, not the person's: "choice": "Approve" would read as permission."""
    url, key = setup

    async def steps(call, mcp):
        pending = await call("request_approval", {"question": "Drop the prod database?", "default": "Approve"})
        run_out(live_server.app.runtime.config, pending["pause_id"])
        live_server.app.runtime.run_once("timeouts")
        return await call("wait_for_approval", {"pause_id": pending["pause_id"]})
    answer = with_mcp(url, key, steps, PAUSEPOINT_MCP_WAIT="0.3")
    assert answer["status"] == "timed_out" and answer["approved"] is False and answer["choice"] is None


def test_a_waiting_call_reports_progress_to_a_host_that_asks(setup):
    reports = []

    async def steps(call, mcp):
        async def progress(done, total, message):
            reports.append((done, total, message))
        result = await mcp.call_tool("request_approval", {"question": "Rotate the prod database password?"},
                                     progress_callback=progress)
        return json.loads(result.content[0].text)
    # Asked for more often than the server's whole seconds, it reports each second, not in a loop.
    answer = with_mcp(*setup, steps, PAUSEPOINT_MCP_WAIT="3", PAUSEPOINT_MCP_PROGRESS_EVERY="0.2")
    assert answer["status"] == "pending"
    assert 2 <= len(reports) <= 4 and all(total == 3 and "+15550100" in message for _, total, message in reports)


def test_a_server_that_answers_waits_at_once_is_not_asked_again_at_once(metered_server):
    """A stopping server answers each long poll at once, as things stand, until it closes."""
    key = register_over_http(metered_server.url, "mcp@example.com", "M")["test_api_key"]
    metered_server.app.runtime.stop()           # its requests are still answered meanwhile

    async def steps(call, mcp):
        return await call("request_approval", {"question": "Rotate the prod database password?"})
    answer = with_mcp(metered_server.url, key, steps, PAUSEPOINT_MCP_WAIT="2", PAUSEPOINT_MCP_PROGRESS_EVERY="1")
    assert answer["status"] == "pending" and reads_of_one_pause(metered_server.url) <= 4


def test_a_pause_this_server_did_not_ask_is_never_an_approval_and_never_cancelled(setup):
    """Another agent's pause of the same key, even one asked of the same person with the same
    options and approved, tells the model nothing it could pass off as its own approval."""
    url, key = setup
    auth = {"Authorization": f"Bearer {key}"}

    def create(**asked):
        body = {"recipient": "+15550100", "channel": "sms", "message": "Wire $340?", "options": ["Approve", "Reject"],
                "timeout_hours": 1, "timeout_default": "Reject", **asked}
        return requests.post(f"{url}/v1/pause", json=body, headers=auth).json()
    approved, pending = create(message="Another agent's wire"), create(message="Another agent's delete")
    reversed_options = create(options=["Reject", "Approve"], message="Reversed")
    for pause, choice in ((approved, "Approve"), (reversed_options, "Reject")):
        assert requests.post(f"{url}/v1/respond/{token_of(pause['respond_url'])}", json={"choice": choice}).ok

    async def steps(call, mcp):
        return [await call(tool, {"pause_id": pause["pause_id"]}) for tool in ("wait_for_approval", "cancel_approval")
                for pause in (approved, pending, reversed_options)]
    answers = with_mcp(url, key, steps, PAUSEPOINT_MCP_WAIT="1")
    assert all(a["status"] == "error" and a["approved"] is False and "did not ask" in a["error"] for a in answers)
    statuses = {p["pause_id"]: p["status"] for p in requests.get(f"{url}/v1/pause", headers=auth).json()["pauses"]}
    assert statuses == {approved["pause_id"]: "responded", pending["pause_id"]: "pending",
                        reversed_options["pause_id"]: "responded"}


def test_an_approval_of_another_question_is_never_this_requests():
    """A create answered with another request's pause (an answer kept by a cache in between,
    say), approved, tells the model nothing it could take for its own approval."""
    server, url, asked = serve_stand_in(pause={"status": "responded", "choice": "Approve", "decided_by": "+15550100",
                                               "message": "Read the staging logs?"})

    async def steps(call, mcp):
        first = await call("request_approval", {"question": "Delete the prod database?"})
        return first, await call("wait_for_approval", {"pause_id": "psr_1"})
    try:
        answers = with_mcp(url, "pp_test_x", steps, PAUSEPOINT_MCP_WAIT="1")
    finally:
        stop_http(server)
    assert all(a["status"] == "error" and a["approved"] is False and "another question" in a["error"]
               for a in answers)


@pytest.mark.parametrize("env, refused", [({"PAUSEPOINT_CHANNEL": "link"}, "PAUSEPOINT_CHANNEL=link"),
                                          ({"PAUSEPOINT_RECIPIENT": ""}, "no recipient")])
def test_a_server_whose_person_could_be_the_model_asks_nobody(setup, env, refused):
    url, key = setup

    async def steps(call, mcp):
        return await call("request_approval", {"question": "Delete the prod database?"})
    answer = with_mcp(url, key, steps, **env)
    assert answer["status"] == "error" and answer["approved"] is False and refused in answer["error"]
    assert requests.get(f"{url}/v1/pause", headers={"Authorization": f"Bearer {key}"}).json()["pauses"] == []


@pytest.mark.parametrize("env, named", [({"PAUSEPOINT_URL": ""}, "PAUSEPOINT_URL is not set"),
                                        ({"PAUSEPOINT_API_KEY": None}, "no API key: set PAUSEPOINT_API_KEY_FILE"),
                                        ({"PAUSEPOINT_API_KEY": None, "PAUSEPOINT_API_KEY_FILE": "/nonexistent/key"},
                                         "PAUSEPOINT_API_KEY_FILE: cannot read /nonexistent/key"),
                                        ({"PAUSEPOINT_MCP_WAIT": "abc"}, "PAUSEPOINT_MCP_WAIT must be a number"),
                                        ({"PAUSEPOINT_URL": "http//127.0.0.1:8080"}, "must be an http:// or https://"),
                                        ({"PAUSEPOINT_MCP_PROGRESS_EVERY": "inf"}, "PAUSEPOINT_MCP_PROGRESS_EVERY")])
def test_a_setting_it_cannot_take_stops_it_at_start_naming_the_setting(env, named):
    """Found only by a tool, the model would read that the tool failed, and not why."""
    settings = {"PAUSEPOINT_URL": "http://127.0.0.1:9", "PAUSEPOINT_API_KEY": "pp_test_x", **env}
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith("PAUSEPOINT_")},
               **{k: v for k, v in settings.items() if v is not None}}
    done = subprocess.run([sys.executable, MCP_SERVER], input="", capture_output=True, text=True, timeout=60,
                          env=environ)
    assert done.returncode == 1 and named in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("setting", ["PAUSEPOINT_MCP_WAIT", "PAUSEPOINT_MCP_PROGRESS_EVERY"])
def test_a_key_given_as_a_number_of_seconds_is_named_but_never_repeated_in_the_hosts_log(setting):
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith("PAUSEPOINT_")},
               "PAUSEPOINT_URL": "http://127.0.0.1:9", "PAUSEPOINT_API_KEY": "pp_test_x",
               setting: "pp_live_0123456789abcdef"}
    done = subprocess.run([sys.executable, MCP_SERVER], input="", capture_output=True, text=True, timeout=60,
                          env=environ)
    assert done.returncode == 1 and setting in done.stderr and "0123456789abcdef" not in done.stderr


def test_run_by_a_python_without_the_mcp_sdk_it_says_what_to_install():
    """-S: the interpreter without its site-packages, as a system Python without the SDK is."""
    environ = {**os.environ, "PAUSEPOINT_URL": "http://127.0.0.1:9", "PAUSEPOINT_API_KEY": "pp_test_x"}
    done = subprocess.run([sys.executable, "-S", MCP_SERVER], input="", capture_output=True, text=True, timeout=60,
                          env=environ)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "requirements-mcp.txt" in done.stderr and done.stderr.startswith("pausepoint-mcp: ")
