"""The examples in examples/, run offline against a live PausePoint with a test key."""

import os
import sys

import pytest
import requests

from conftest import answer_first_pending, register_over_http, ROOT, run_out

sys.path.insert(0, os.path.join(ROOT, "client"))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from pausepoint_client import PausePoint  # noqa: E402


@pytest.fixture
def pp(live_server):
    keys = register_over_http(live_server.url, "ex@example.com", "Ex")
    return PausePoint(live_server.url, keys["test_api_key"], backoff=0.05)


def person(pp, choice):
    return answer_first_pending(pp.base_url, pp.api_key, choice)


@pytest.mark.parametrize("choice, sent", [("Approve", True), ("Reject", False)])
def test_the_plain_agent_wires_only_with_approval(pp, choice, sent):
    import plain_agent
    wires = []
    answering = person(pp, choice)
    outcome = plain_agent.pay_invoice(pp, {"number": "INV-7", "amount": "340.00", "payee": "Acme Corp"},
                                      "+15550100", send_wire=wires.append)
    answering.join()
    assert bool(wires) is sent and outcome.startswith("sent" if sent else "not sent")


@pytest.mark.parametrize("choice, result", [("Approve", "did: delete the staging database"), ("Reject", "not done (Reject)")])
def test_the_langgraph_thread_stops_at_the_interrupt_and_resumes_on_the_answer(pp, choice, result):
    import langgraph_agent
    done = []
    graph = langgraph_agent.build_graph(lambda action: done.append(action) or f"did: {action}")
    pause = langgraph_agent.start(graph, pp, "thread-42", "delete the staging database", "+15550100")
    assert pause["status"] == "pending" and done == []            # stopped at the interrupt, nothing done
    retried = langgraph_agent.start(graph, pp, "thread-42", "delete the staging database", "+15550100")
    assert retried["pause_id"] == pause["pause_id"]              # the same question: asked once
    person(pp, choice).join()
    [(thread_id, state)] = list(langgraph_agent.resume_from_events(graph, pp, wait=5, once=True))
    assert thread_id == "thread-42" and state["result"] == result
    assert done == (["delete the staging database"] if choice == "Approve" else [])


def test_an_answer_to_an_earlier_question_on_the_thread_id_never_resumes_a_later_one(pp):
    """A second run on the same thread id (a new process, so a new checkpointer) asks again."""
    import langgraph_agent
    earlier = langgraph_agent.build_graph(lambda action: f"did: {action}")
    langgraph_agent.start(earlier, pp, "thread-7", "delete the staging database", "+15550100")
    person(pp, "Reject").join()
    assert [state["result"] for _, state in langgraph_agent.resume_from_events(earlier, pp, wait=5, once=True)] == [
        "not done (Reject)"]
    done = []
    later = langgraph_agent.build_graph(lambda action: done.append(action) or f"did: {action}")
    pause = langgraph_agent.start(later, pp, "thread-7", "delete the staging database", "+15550100")
    assert pause["status"] == "pending"                 # asked anew, not the earlier answer replayed
    person(pp, "Approve").join()
    [(_, state)] = list(langgraph_agent.resume_from_events(later, pp, wait=5, once=True))    # the feed from the start
    assert state["result"] == "did: delete the staging database" and done == ["delete the staging database"]


def test_a_langgraph_question_nobody_answered_is_never_acted_on_whatever_its_default(pp, live_server):
    import langgraph_agent
    done = []
    graph = langgraph_agent.build_graph(lambda action: done.append(action) or f"did: {action}")
    asked = langgraph_agent.start(graph, pp, "thread-9", "delete the staging database", "+15550100",
                                  timeout_default="Approve")
    run_out(live_server.app.runtime.config, asked["pause_id"])
    live_server.app.runtime.run_once("timeouts")
    [(_, state)] = list(langgraph_agent.resume_from_events(graph, pp, wait=10, once=True))
    assert state["result"] == "not done (timed_out)" and done == []


@pytest.mark.parametrize("choice", ["Approve", "Reject"])
def test_the_pydantic_ai_tool_runs_only_when_a_person_approves(pp, choice):
    from pydantic_ai.models.test import TestModel
    import pydantic_ai_agent
    deleted = []
    agent = pydantic_ai_agent.build_agent(TestModel(), lambda name: deleted.append(name) or f"deleted {name}")
    answering = person(pp, choice)
    output = pydantic_ai_agent.run_with_approvals(agent, pp, "Drop the staging database.", "+15550100")
    answering.join()
    assert bool(deleted) is (choice == "Approve") and isinstance(output, str)
    pauses = requests.get(f"{pp.base_url}/v1/pause", headers={"Authorization": f"Bearer {pp.api_key}"}).json()["pauses"]
    assert len(pauses) == 1 and pauses[0]["message"].startswith("Your agent wants to call drop_database(")
