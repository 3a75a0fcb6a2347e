#!/usr/bin/env python3
"""PausePoint as an MCP server (stdio): lets any MCP host's model ask a person first.

Tools: request_approval (ask, then wait a bounded time), wait_for_approval (wait
again) and cancel_approval. MCP hosts cut tool calls off after about a minute, so a
call waits at most PAUSEPOINT_MCP_WAIT seconds (45) and then answers "pending" with
what to call next; while it waits it reports progress about every 10 s to a host
that asked for it.

The model these tools gate must not be able to approve itself, so it never sees a
respond link, cannot choose who is asked or how, and cannot choose which option
approves: the operator names the person, the first option is always "Approve", and
only that choice, made by that person, is an approval. Nor can it pass off another
approval as its own: the tools speak only of pauses this process asked (so after a
restart a question is asked anew), each answer says what was asked, and a pause that
holds another question than the one asked is an error, never an approval.

Configured by the environment, like the Claude Code hook:
  PAUSEPOINT_URL, PAUSEPOINT_API_KEY          the server and a key, or
  PAUSEPOINT_API_KEY_FILE                     instead of the key, a file (mode 0600) holding it
  PAUSEPOINT_RECIPIENT, PAUSEPOINT_CHANNEL    who is asked and how (channel default: sms; never link,
                                              whose respond link would go to the model)
  PAUSEPOINT_MCP_WAIT                         seconds one call waits for the answer (default 45)
  PAUSEPOINT_MCP_PROGRESS_EVERY               seconds between progress reports while it waits (default 10, at least 1)

Needs the `mcp` package (>=2,<3) and pausepoint_client.py beside it. Logs go to stderr.
"""

import hashlib
import json
import logging
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pausepoint_client import (LONGEST_WAIT, Approval, PausePoint, PausePointError, RateLimited,  # noqa: E402
                               ServerError, Unreachable, _shown, api_key_from, setting_from)

log = logging.getLogger("pausepoint-mcp")


def settings():
    """The operator's settings; ValueError naming one that is missing or no number of seconds
    (checked as the server starts: a tool would only tell the model it failed)."""
    try:
        url, key = setting_from(os.environ, "PAUSEPOINT_URL"), api_key_from(os.environ)
    except ValueError as e:
        raise ValueError(f"{e} (in this server's env, in the MCP host's configuration)") from None
    PausePoint(url, key)        # an address it can call
    return {"url": url, "key": key,
            "recipient": os.environ.get("PAUSEPOINT_RECIPIENT"), "channel": os.environ.get("PAUSEPOINT_CHANNEL", "sms"),
            "wait": seconds("PAUSEPOINT_MCP_WAIT", "45"),
            # At least a second: the server waits whole seconds, and a wait of 0 answers at once.
            "progress_every": max(1.0, seconds("PAUSEPOINT_MCP_PROGRESS_EVERY", "10"))}


def seconds(name, default):
    given = os.environ.get(name, default)
    try:
        value = float(given)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 3600:          # nan and inf too
        raise ValueError(f"{name} must be a number of seconds from 0 to 3600, not {_shown(given)}")
    return value


# A setting it cannot take stops the server before the SDK is imported, which takes over a
# second: the host shows the operator the refusal at once, not after the import.
if __name__ == "__main__":
    try:
        settings()
    except ValueError as e:
        sys.exit(f"pausepoint-mcp: {e}")

try:
    import anyio
    from mcp.server.mcpserver import Context, MCPServer
except ImportError as e:       # run with a Python that lacks the SDK, or holds its 1.x: say what to install
    if __name__ != "__main__":
        raise
    sys.exit(f"pausepoint-mcp: {e}: it needs the mcp package (>=2,<3): install client/requirements-mcp.txt in a"
             " virtual environment and run this server with that environment's python")

ONLY_APPROVAL_IS_PERMISSION = (
    " Only an explicit approval is permission: proceed only when the result says approved is true. A rejection,"
    " a timeout (whatever its default), a cancellation or a pending answer all mean: do not proceed.")
APPROVE = "Approve"


def wait_described():
    """How long a call waits, as the tools tell the model: the wait set when this server started."""
    try:
        return f"up to about {seconds('PAUSEPOINT_MCP_WAIT', '45'):g} s"
    except ValueError:      # imported, not run as a script (which refuses it): settings() refuses it at each call
        return "for a while"


server = MCPServer("PausePoint", instructions=(
    "Ask a person before doing anything risky (spending money, deleting data, contacting people)."
    + ONLY_APPROVAL_IS_PERMISSION))

# This process serves one session: a question asked again while its pause is pending
# finds that pause rather than asking the person twice (asked: the question's latest
# pause), and the tools speak only of the pauses it asked (asked_here: each one's question).
asked, asked_here = {}, {}
# A create whose answer never came (the tool answered with an error) may still have texted
# the person: the same request asked again carries the same Idempotency-Key, so it finds that
# pause instead of texting them twice. The key is forgotten once a create is answered.
unanswered_creates = {}


def client():
    config = settings()
    return PausePoint(config["url"], config["key"], retries=3)


def asked_person():
    """(recipient, channel) from the environment, or an error for the model to read."""
    config = settings()
    if not config["recipient"]:
        return None, "no recipient: the operator sets PAUSEPOINT_RECIPIENT for this server"
    if config["channel"] == "link":
        return None, ("PAUSEPOINT_CHANNEL=link would give the respond link to the model, which could answer it"
                      " itself: the operator sets sms, whatsapp, email or a push channel")
    return (config["recipient"], config["channel"]), None


def outcome(pause, question):
    """What a tool answers about a pause this process asked `question` with: never its respond
    link, and approved only when the person chose "Approve" on that question."""
    if pause["message"] != question:    # another's pause, as a cache in between may answer a create with
        return {"status": "error", "approved": False, "pause_id": pause["pause_id"],
                "error": "PausePoint answered with a pause about another question: ask again"}
    if pause["status"] == "pending":
        return {"status": "pending", "approved": False, "pause_id": pause["pause_id"], "question": pause["message"],
                "expires_at": pause["expires_at"],
                "next": "call wait_for_approval with this pause_id to keep waiting; do not proceed meanwhile"}
    result = Approval(pause, APPROVE)
    # A pause that ran out carries its default as its choice: shown as one, "choice": "Approve"
    # (a default the model may set) could be read as permission. Only a person chooses.
    choice = result.choice if result.status == "responded" else None
    return {"status": result.status, "approved": result.approved, "pause_id": result.pause_id,
            "question": pause["message"], "choice": choice, "comment": result.comment,
            "decided_by": result.decided_by}


def not_asked_here(pause_id):
    """An error for a pause this process did not ask, or None."""
    if pause_id in asked_here:
        return None
    return {"status": "error", "approved": False, "pause_id": pause_id,
            "error": "this server did not ask that: only the pause_id request_approval returned in this session"}


async def wait_reporting(pause_id, ctx, started=None):
    """The pause once decided, or as it stands PAUSEPOINT_MCP_WAIT seconds after the call
    `started` (a time.monotonic() value; now if None), with progress every
    PAUSEPOINT_MCP_PROGRESS_EVERY seconds meanwhile."""
    config, started = settings(), started or time.monotonic()
    total, pause = config["wait"], None
    while True:
        left = total - (time.monotonic() - started)
        step = max(0, min(config["progress_every"], left))
        step_ends = time.monotonic() + step
        try:
            # As long a wait as there is, to the step's end: the client asks for no more than that.
            pause = await anyio.to_thread.run_sync(client().get, pause_id, LONGEST_WAIT, step_ends)
        except (RateLimited, Unreachable, ServerError) as e:
            # Every waiting place taken, or the server stopping or restarting, which can outlast
            # one call's retries: the pause is still there, so look again at the step's end, for
            # as long as the wait lasts. A full disk (507) does not clear so.
            if e.status == 507 or left <= 1:
                raise
        else:
            if pause["status"] != "pending" or left <= 1:
                return pause
        # Each step lasts its time: a server answering at once (one stopping does) is not asked again at once.
        await anyio.sleep(max(0.0, step_ends - time.monotonic()))
        elapsed = time.monotonic() - started
        await ctx.report_progress(elapsed, total, f"waiting for {pause['recipient']} to answer" if pause
                                  else "waiting for PausePoint to answer again")


def create_once(calls, request, deadline):
    """The pause for `request` (pause()'s first six arguments): the one an earlier try of it
    made if that is still pending, else a new one. One decided since is never the answer: a
    question asked again once decided is asked anew."""
    fingerprint = hashlib.sha256(json.dumps(request).encode()).hexdigest()
    for _ in range(2):
        key = unanswered_creates.setdefault(fingerprint, f"pp-mcp-{uuid.uuid4()}")
        created = calls.pause(*request, idempotency_key=key, deadline=deadline)
        unanswered_creates.pop(fingerprint, None)      # (a call asking the same at once may have)
        if created["status"] == "pending":
            return created
    raise PausePointError(200, "bad_answer", f"{calls.base_url} answered a new request with a decided pause")


@server.tool(description=f"Ask a person to approve something before you do it, and wait for the answer"
                         f" ({wait_described()}; if it is still pending, call wait_for_approval). The person is offered"
                         " \"Approve\" and other_options (default: Reject)." + ONLY_APPROVAL_IS_PERMISSION)
async def request_approval(question: str, ctx: Context, other_options: list[str] | None = None,
                           timeout_hours: float = 1.0, default: str | None = None) -> dict:
    person, error = asked_person()
    if error:
        return {"status": "error", "approved": False, "error": error}
    (recipient, channel), options = person, [APPROVE, *(other_options or ["Reject"])]
    fingerprint = hashlib.sha256(json.dumps([question, options, recipient, channel]).encode()).hexdigest()
    # The reads and the create's tries share the call's time with the wait, and end within it,
    # their last call included (a host gives a tool call about a minute), but for a short wait,
    # which keeps half of it for them.
    started, calls, wait = time.monotonic(), client(), settings()["wait"]
    calls_end = started + max(wait - calls.timeout, wait / 2)
    try:
        earlier = asked.get(fingerprint)
        if earlier is not None and (await anyio.to_thread.run_sync(
                calls.get, earlier, 0, calls_end))["status"] == "pending":
            pause_id = earlier
        else:
            created = await anyio.to_thread.run_sync(lambda: create_once(
                calls, (recipient, channel, question, options, timeout_hours, default), calls_end))
            pause_id = asked[fingerprint] = created["pause_id"]
            asked_here[pause_id] = question
        return outcome(await wait_reporting(pause_id, ctx, started), question)
    except PausePointError as e:
        log.warning("request_approval failed: %s", e)
        return {"status": "error", "approved": False, "error": e.message, "field": e.field}


@server.tool(description=f"Keep waiting ({wait_described()}) for the answer to an earlier request_approval."
                         + ONLY_APPROVAL_IS_PERMISSION)
async def wait_for_approval(pause_id: str, ctx: Context) -> dict:
    try:
        return not_asked_here(pause_id) or outcome(await wait_reporting(pause_id, ctx), asked_here[pause_id])
    except PausePointError as e:
        return {"status": "error", "approved": False, "error": e.message}


@server.tool(description="Withdraw a request for approval that is no longer needed.")
async def cancel_approval(pause_id: str) -> dict:
    try:
        return not_asked_here(pause_id) or outcome(await anyio.to_thread.run_sync(client().cancel, pause_id),
                                                   asked_here[pause_id])
    except PausePointError as e:
        return {"status": "error", "approved": False, "error": e.message}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    server.run()
