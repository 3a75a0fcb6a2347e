"""A plain-Python agent that asks a person before a risky action.

    PAUSEPOINT_URL=http://127.0.0.1:8080 PAUSEPOINT_API_KEY=pp_test_… python examples/plain_agent.py

With a test key nothing is texted. While it waits, answer as the person would: open the
respond_url of the pending pause, which this lists:

    curl -H "Authorization: Bearer $PAUSEPOINT_API_KEY" "$PAUSEPOINT_URL/v1/pause?status=pending"
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client"))
from pausepoint_client import PausePoint  # noqa: E402


def pay_invoice(pausepoint, invoice, recipient, send_wire):
    """Send the wire only if a person approves it; returns what happened."""
    result = pausepoint.request_approval(
        recipient=recipient, channel="sms", title=f"Invoice {invoice['number']}",
        message=f"Your agent wants to send a ${invoice['amount']} wire to {invoice['payee']}. Approve?",
        options=["Approve", "Reject"], timeout_hours=4, timeout_default="Reject",
        metadata={**invoice, "display": ["amount", "payee", "number"]})
    if not result.approved:     # a rejection, a timeout or a cancel: never proceed
        return f"not sent: {result.status} {result.choice or ''} {result.comment or ''}".strip()
    send_wire(invoice)
    return f"sent, approved by {result.decided_by}"


if __name__ == "__main__":
    pp = PausePoint(os.environ["PAUSEPOINT_URL"], os.environ["PAUSEPOINT_API_KEY"])
    invoice = {"number": "INV-7", "amount": "340.00", "payee": "Acme Corp"}
    print(pay_invoice(pp, invoice, os.environ.get("PAUSEPOINT_RECIPIENT", "+15550100"),
                      send_wire=lambda inv: print(f"wiring ${inv['amount']} to {inv['payee']}…")))
