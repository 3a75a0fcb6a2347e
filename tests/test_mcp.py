"""client/pausepoint_mcp.py through the MCP SDK's own client, over stdio, against a live server."""

import json
import os
import sys

import anyio
import pytest
import requests

from conftest import answer_first_pending, register_over_http, ROOT

MCP_SERVER = os.path.join(ROOT, "client", "pausepoint_mcp.py")


def with_mcp(url, key, steps, **env):
    """Run `steps(call)` against the MCP server; call(tool, arguments) returns the tool's JSON answer."""
    from mcp import Client, StdioServerParameters

    settings = {"PAUSEPOINT_URL": url, "PAUSEPOINT_API_KEY": key, "PAUSEPOINT_RECIPIENT": "+15550100",
                "PAUSEPOINT_MCP_WAIT": "20", **env}

    async def session():
        async with Client(StdioServerParameters(command=sys.executable, args=[MCP_SERVER], env=settings)) as mcp:
            async def call(tool, arguments):
                result = await mcp.call_tool(tool, arguments)
                return json.loads(result.content[0].text)
            return await steps(call, mcp)

    return anyio.run(session)


@pytest.fixture
def setup(live_server):
    return live_server.url, register_over_http(live_server.url, "mcp@example.com", "M")["test_api_key"]


def test_the_tools_are_listed_with_their_schemas_and_the_warning(setup):
    async def steps(call, mcp):
        return {tool.name: tool for tool in (await mcp.list_tools()).tools}
    tools = with_mcp(*setup, steps)
    assert set(tools) == {"request_approval", "wait_for_approval", "cancel_approval"}
    schema = tools["request_approval"].input_schema
    assert schema["required"] == ["question"] and "options" in schema["properties"]
    assert "Only an explicit approval is permission" in tools["request_approval"].description


@pytest.mark.parametrize("choice, approved", [("Approve", True), ("Reject", False)])
def test_a_request_is_answered_while_the_tool_waits(setup, choice, approved):
    url, key = setup
    person = answer_first_pending(url, key, choice)

    async def steps(call, mcp):
        return await call("request_approval", {"question": "Wire $340 to Acme Corp?"})
    answer = with_mcp(url, key, steps)
    person.join()
    assert answer["status"] == "responded" and answer["approved"] is approved and answer["choice"] == choice


def test_a_pending_request_is_waited_for_again_and_asked_only_once(setup):
    url, key = setup

    async def steps(call, mcp):
        first = await call("request_approval", {"question": "Delete the staging database?"})
        again = await call("request_approval", {"question": "Delete the staging database?"})   # re-attaches
        answer_first_pending(url, key, "Approve").join()       # answered while the agent was away
        decided = await call("wait_for_approval", {"pause_id": first["pause_id"]})
        return first, again, decided
    first, again, decided = with_mcp(url, key, steps, PAUSEPOINT_MCP_WAIT="1")
    assert first["status"] == "pending" and first["approved"] is False and "wait_for_approval" in first["next"]
    assert again["pause_id"] == first["pause_id"]
    assert decided["approved"] is True and decided["pause_id"] == first["pause_id"]
    pauses = requests.get(f"{url}/v1/pause", headers={"Authorization": f"Bearer {key}"}).json()["pauses"]
    assert len(pauses) == 1


def test_a_cancelled_request_is_not_an_approval(setup):
    async def steps(call, mcp):
        pending = await call("request_approval", {"question": "Email 1,200 customers?"})
        return await call("cancel_approval", {"pause_id": pending["pause_id"]})
    answer = with_mcp(*setup, steps, PAUSEPOINT_MCP_WAIT="1")
    assert answer["status"] == "cancelled" and answer["approved"] is False


def test_a_waiting_call_reports_progress_to_a_host_that_asks(setup):
    reports = []

    async def steps(call, mcp):
        async def progress(done, total, message):
            reports.append((done, total, message))
        result = await mcp.call_tool("request_approval", {"question": "Rotate the prod database password?"},
                                     progress_callback=progress)
        return json.loads(result.content[0].text)
    answer = with_mcp(*setup, steps, PAUSEPOINT_MCP_WAIT="3", PAUSEPOINT_MCP_PROGRESS_EVERY="1")
    assert answer["status"] == "pending"
    assert len(reports) >= 2 and all(total == 3 and "+15550100" in message for _, total, message in reports)
