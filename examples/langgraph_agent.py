"""A LangGraph agent that stops for a person's approval and is resumed by PausePoint.

The graph's `approve` node calls interrupt(); the runner then creates a pause whose
metadata names the LangGraph thread and the interrupt, and the run ends there (no
process waits). A consumer of PausePoint's event feed (or a webhook receiver) resumes
the thread with Command(resume=...) when the person answers, whichever process that is,
but only while the thread still waits on that very interrupt: an answer to an earlier
question (a run before, on the same thread id) never resumes a later one.

    python3 -m venv .venv-examples && .venv-examples/bin/pip install -r examples/requirements.txt
    PAUSEPOINT_URL=http://127.0.0.1:8080 PAUSEPOINT_API_KEY=pp_test_… .venv-examples/bin/python examples/langgraph_agent.py
"""

import os
import sys
import uuid
from typing import TypedDict

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client"))
from pausepoint_client import PausePoint  # noqa: E402


class State(TypedDict, total=False):
    action: str
    decision: str
    result: str


def build_graph(do_action, checkpointer=None):
    """plan -> approve (interrupts for a person) -> act, or stop when not approved."""
    def plan(state):
        return {"action": state["action"]}

    def approve(state):
        return {"decision": interrupt({"question": f"Your agent wants to {state['action']}. Approve?"})}

    def act(state):
        if state["decision"] != "Approve":
            return {"result": f"not done ({state['decision']})"}
        return {"result": do_action(state["action"])}

    graph = StateGraph(State)
    graph.add_node("plan", plan)
    graph.add_node("approve", approve)
    graph.add_node("act", act)
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "approve")
    graph.add_edge("approve", "act")
    graph.add_edge("act", END)
    return graph.compile(checkpointer=checkpointer or InMemorySaver())


def start(graph, pausepoint, thread_id, action, recipient, timeout_hours=1, timeout_default="Reject"):
    """Run the graph until it asks; create the pause for that question. Returns the pause.
    Called again for a thread already waiting (a retry after a lost answer, or a crash once
    the pause was made), it asks about the same interrupt, so the same pause comes back."""
    config = {"configurable": {"thread_id": thread_id}}
    if not graph.get_state(config).interrupts:
        graph.invoke({"action": action}, config)
    [pending] = graph.get_state(config).interrupts
    return pausepoint.pause(recipient=recipient, channel="sms", message=pending.value["question"],
                            options=["Approve", "Reject"], timeout_hours=timeout_hours, timeout_default=timeout_default,
                            metadata={"langgraph_thread_id": thread_id, "langgraph_interrupt_id": pending.id},
                            idempotency_key=f"langgraph-{thread_id}-{pending.id}")


def resume_from_events(graph, pausepoint, after=None, wait=30, once=False):
    """Resume each thread as the pause for the interrupt it waits on is decided; yields
    (thread id, final state)."""
    for event in pausepoint.events(after=after, wait=wait,
                                   types=["pause.responded", "pause.timed_out", "pause.cancelled"]):
        metadata = event["data"].get("metadata") or {}
        thread_id, interrupt_id = metadata.get("langgraph_thread_id"), metadata.get("langgraph_interrupt_id")
        waiting_on = [] if thread_id is None else graph.get_state({"configurable": {"thread_id": thread_id}}).interrupts
        if any(pending.id == interrupt_id for pending in waiting_on):
            # Only a person's choice decides: a timed-out pause's event carries its timeout_default
            # as its choice, which must not pass for an approval when that default is "Approve".
            decision = event["data"]["choice"] if event["type"] == "pause.responded" else event["data"]["status"]
            config = {"configurable": {"thread_id": thread_id}}
            yield thread_id, graph.invoke(Command(resume=decision or "Reject"), config)
            if once:
                return


if __name__ == "__main__":
    pp = PausePoint(os.environ["PAUSEPOINT_URL"], os.environ["PAUSEPOINT_API_KEY"])
    graph = build_graph(lambda action: f"did: {action}")
    pause = start(graph, pp, f"thread-{uuid.uuid4().hex[:12]}", "delete the staging database",
                  os.environ.get("PAUSEPOINT_RECIPIENT", "+15550100"))
    print("asked:", pause["respond_url"])
    for thread_id, state in resume_from_events(graph, pp, once=True):
        print(thread_id, "->", state["result"])
