"""A Pydantic AI agent whose risky tool needs a person's approval, given through PausePoint.

The tool is declared with requires_approval=True, so the run stops with the calls it
wants approved (DeferredToolRequests); each becomes a pause, and the run continues with
the answers (DeferredToolResults): the tool runs only for an approval, and a rejection's
comment goes back to the model as the reason.

    python3 -m venv .venv-examples && .venv-examples/bin/pip install -r examples/requirements.txt
    PAUSEPOINT_URL=http://127.0.0.1:8080 PAUSEPOINT_API_KEY=pp_test_… .venv-examples/bin/python examples/pydantic_ai_agent.py
"""

import json
import os
import sys

from pydantic_ai import Agent, DeferredToolRequests, DeferredToolResults, ToolDenied

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client"))
from pausepoint_client import PausePoint  # noqa: E402


def build_agent(model, delete_database):
    agent = Agent(model, output_type=[str, DeferredToolRequests],
                  instructions="You maintain our databases. Deleting one needs a person's approval.")

    @agent.tool_plain(requires_approval=True)
    def drop_database(name: str) -> str:
        """Delete a database for good."""
        return delete_database(name)

    return agent


def run_with_approvals(agent, pausepoint, prompt, recipient, wait_timeout=None):
    """Run the agent; ask a person through PausePoint for every call that needs approval."""
    result = agent.run_sync(prompt)
    while isinstance(result.output, DeferredToolRequests):
        answers = DeferredToolResults()
        for call in result.output.approvals:
            approval = pausepoint.request_approval(
                recipient=recipient, channel="sms", title="Your agent",
                message=f"Your agent wants to call {call.tool_name}({json.dumps(call.args_as_dict())}). Approve?",
                options=["Approve", "Reject"], timeout_hours=1, timeout_default="Reject",
                metadata={"tool_call_id": call.tool_call_id}, wait_timeout=wait_timeout)
            answers.approvals[call.tool_call_id] = True if approval.approved else ToolDenied(
                approval.comment or f"not approved ({approval.status})")
        result = agent.run_sync(message_history=result.all_messages(), deferred_tool_results=answers)
    return result.output


if __name__ == "__main__":
    from pydantic_ai.models.test import TestModel
    pp = PausePoint(os.environ["PAUSEPOINT_URL"], os.environ["PAUSEPOINT_API_KEY"])
    agent = build_agent(TestModel(), lambda name: f"deleted {name}")
    print(run_with_approvals(agent, pp, "Drop the staging database.", os.environ.get("PAUSEPOINT_RECIPIENT", "+15550100")))
