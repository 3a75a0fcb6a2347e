"""A LangGraph agent that stops for a person's approval and is resumed by PausePoint.

The graph's `approve` node calls interrupt(); the runner then creates a pause whose
metadata carries the LangGraph thread id, and the run ends there (no process waits). A
consumer of PausePoint's event feed (or a webhook receiver) resumes the thread with
Command(resume=...) when the person answers, whichever process that is.

    pip install -r examples/requirements.txt
    PAUSEPOINT_URL=… PAUSEPOINT_API_KEY=pp_test_… python examples/langgraph_agent.py
"""

import os
import sys
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


def start(graph, pausepoint, thread_id, action, recipient):
    """Run the graph until it asks; create the pause for that question. Returns the pause."""
    config = {"configurable": {"thread_id": thread_id}}
    graph.invoke({"action": action}, config)
    [pending] = graph.get_state(config).interrupts
    return pausepoint.pause(recipient=recipient, channel="sms", message=pending.value["question"],
                            options=["Approve", "Reject"], timeout_hours=1, timeout_default="Reject",
                            metadata={"langgraph_thread_id": thread_id}, idempotency_key=f"langgraph-{thread_id}")


def resume_from_events(graph, pausepoint, after=None, wait=30, once=False):
    """Resume each waiting thread as its pause is decided; yields (thread id, final state)."""
    for event in pausepoint.events(after=after, wait=wait,
                                   types=["pause.responded", "pause.timed_out", "pause.cancelled"]):
        thread_id = (event["data"].get("metadata") or {}).get("langgraph_thread_id")
        if thread_id is not None:
            decision = event["data"]["choice"] if event["type"] != "pause.cancelled" else "Cancelled"
            config = {"configurable": {"thread_id": thread_id}}
            yield thread_id, graph.invoke(Command(resume=decision or "Reject"), config)
            if once:
                return


if __name__ == "__main__":
    pp = PausePoint(os.environ["PAUSEPOINT_URL"], os.environ["PAUSEPOINT_API_KEY"])
    graph = build_graph(lambda action: f"did: {action}")
    pause = start(graph, pp, "thread-1", "delete the staging database", os.environ.get("PAUSEPOINT_RECIPIENT", "+15550100"))
    print("asked:", pause["respond_url"])
    for thread_id, state in resume_from_events(graph, pp, once=True):
        print(thread_id, "->", state["result"])
