#!/usr/bin/env python3
"""A Claude Code PreToolUse hook: ask a person on their phone before a tool runs.

Claude Code runs this with the tool call as JSON on stdin; it creates a pause that
says in one line what is about to run and where, waits for the answer, and prints
the hook's decision as JSON: allow on Allow, deny (with the person's comment as the
reason) on Deny. When nobody answers in time it hands the call back to Claude Code's
own prompt ("ask", the default) or denies it, as PAUSEPOINT_HOOK_ON_TIMEOUT says,
and cancels the pause so a late answer decides nothing. So it does when no person
could be asked there (PausePoint unreachable or failing, a call too long to show):
it never allows on its own.

Configured by the environment, like the MCP server:
  PAUSEPOINT_URL, PAUSEPOINT_API_KEY     the server and a key (pp_live_… to really text), or
  PAUSEPOINT_API_KEY_FILE                instead of the key, a file (mode 0600) holding it
  PAUSEPOINT_RECIPIENT, PAUSEPOINT_CHANNEL   who to ask and how (default channel: sms)
  PAUSEPOINT_HOOK_WAIT                   seconds to wait for the answer (default 50; keep it
                                         below the hook's own timeout in settings.json)
  PAUSEPOINT_HOOK_ON_TIMEOUT             ask (default) or deny: the answer to a call no person
                                         allowed or denied on PausePoint

A call whose tool input is too long for the page to show whole (about 15 KB) is asked
about here, not on PausePoint: a person must see all of what they allow.

Standard library only, with pausepoint_client.py beside it.
"""

import hashlib
import json
import os
import re
import sys
import threading
import time
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from pausepoint_client import (PausePoint, PausePointError, RateLimited, ServerError,  # noqa: E402
                                   Unreachable, _shown, api_key_from, setting_from)
    CLIENT_MISSING = None
except Exception as e:          # copied without it, or a broken one: main() asks here, never leaves the call
    CLIENT_MISSING = e          # to Claude Code's own rules

LONGEST_LINE = 160          # a text message's worth of the command
LONGEST_PLACE = 200         # of a path, or of the directory it runs in
LONGEST_TOOL = 60           # of a tool's name
METADATA_BYTES = 15000      # the metadata as UTF-8 JSON, as the server counts it (it takes 16 KB)
CALL_SECONDS = 5            # the longest one call to the server may take…
CANCEL_SECONDS = 2          # …and the cancel after the wait (and the read it makes if it was answered meanwhile)
OVERRUN_SECONDS = 6         # past the wait, whatever the server does, the hook answers "ask" and ends
# What the server refuses in text a person reads (C0 and C1 controls but newline and tab,
# line and paragraph separators, bidirectional controls, tag characters), and lone
# surrogates, which no JSON reader takes: each shown as U+FFFD, so the person is still asked.
# Drawn as nothing, though neither spaces nor format characters: fillers, blanks, selectors.
DRAWN_AS_NOTHING = {*"\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180e\u180f\u2800\u3164\uffa0",
                    *map(chr, range(0xFE00, 0xFE10))}
UNREADABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                        "\U000e0000-\U000e007f\ud800-\udfff]")


def shorten(text, limit=LONGEST_LINE):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def readable(text):
    return UNREADABLE.sub("\ufffd", str(text))


def as_a_shell_reads(text):
    """Text for one line: a line break as ⏎ (to a shell, another command), and as U+FFFD
    each character a shell reads as one but a person would not: those shorten() would fold
    into a space (a carriage return, a no-break space…), those drawn as nothing (a
    zero-width space…), and a ⏎ already there. So a '#' after one does not seem to start
    a comment, a backslash before '\\r\\n' does not seem to join two lines, and no line
    break is forged."""
    return "".join(" ⏎ " if character == "\n" else "\ufffd" if character == "⏎" or unseen(character) else character
                   for character in str(text))


def unseen(character):
    return (character.isspace() and character not in " \t" or unicodedata.category(character) == "Cf"
            or character in DRAWN_AS_NOTHING)


def home_relative(path):
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if path and path.startswith(home + os.sep) else path


def describe(call):
    """One line: what Claude Code is about to do, and where. A person may answer by text
    message without opening the page, which shows the whole tool input (ask_person() asks
    nobody a call too long for it), so a line cut short says so: a harmless start must not
    hide what follows it."""
    tool, given = str(call.get("tool_name", "a tool")), call.get("tool_input", {})
    fields = given if isinstance(given, dict) else {}
    path = fields.get("file_path") or fields.get("notebook_path")
    if tool == "Bash" and isinstance(fields.get("command"), str):
        # Anything beside the command and the model's own description of it (a sandbox
        # switched off, say) is on the page only.
        verb, what, limit, whole = "run:", given["command"], LONGEST_LINE, set(given) <= {"command", "description"}
    elif tool in ("Write", "Edit", "MultiEdit", "NotebookEdit") and path:
        # What it writes is on the page only.
        verb, what, limit, whole = "write" if tool == "Write" else "edit", home_relative(path), LONGEST_PLACE, False
    else:
        verb, what, limit, whole = (f"use {shorten(tool, LONGEST_TOOL)}:", json.dumps(given, ensure_ascii=False),
                                    100, True)
    what, where = as_a_shell_reads(what), as_a_shell_reads(home_relative(str(call.get("cwd", ""))))
    cut = any(len(" ".join(str(text).split())) > most
              for text, most in ((what, limit), (where, LONGEST_PLACE), (tool, LONGEST_TOOL)))
    line = (f"Claude Code wants to {verb} {shorten(what, limit)}"
            + (f" (in {shorten(where, LONGEST_PLACE)})" if where else "")
            + (" [cut short: the link shows all of it]" if cut else "" if whole else " [the link shows all of it]"))
    return readable(line)


def metadata_bytes(metadata):
    """The metadata's size as the server counts it: bytes of JSON, since an accent takes
    two and a quote, escaped inside a JSON string inside JSON, four."""
    return len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode())


def decision(kind, reason):
    return {"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": kind,
                                   "permissionDecisionReason": reason}}


def hook_wait(environ):
    given = environ.get("PAUSEPOINT_HOOK_WAIT", "50")
    try:
        wait = float(given)
    except ValueError:
        wait = float("nan")
    if not 0 <= wait <= 3600:           # nan and inf too: the watchdog needs a time
        raise ValueError(f"PAUSEPOINT_HOOK_WAIT must be between 0 and 3600 seconds, not {_shown(given)}")
    return wait


def hook_settings(environ):
    """(channel, what to answer on no answer), or ValueError naming the setting: a mistyped
    one is not taken for another."""
    channel = environ.get("PAUSEPOINT_CHANNEL", "sms")
    if channel.strip().lower() == "link":
        raise ValueError("PAUSEPOINT_CHANNEL=link notifies nobody: set sms, whatsapp, email or a push channel")
    on_timeout = environ.get("PAUSEPOINT_HOOK_ON_TIMEOUT", "ask").strip().lower()
    if on_timeout not in ("ask", "deny"):
        raise ValueError(f"PAUSEPOINT_HOOK_ON_TIMEOUT must be ask or deny, not {_shown(on_timeout)}")
    return channel, on_timeout


def ask_person(call, environ):
    """The hook's answer for one tool call."""
    # The create and the wait end by the wait's end, their last call included, and one try at a
    # cancel comes after: about 55 s at most with the default wait of 50 s, within the 60 s hook
    # timeout the README suggests (past it Claude Code goes on under its own rules), unless
    # something holds the hook past its calls' own limits: main()'s watchdog answers at 56 s.
    recipient = setting_from(environ, "PAUSEPOINT_RECIPIENT")
    # Three tries with no answer, and then PausePoint is not there to ask (the local prompt comes
    # in seconds, not at the wait's end); a 503 saying when to come back (a server stopping to
    # restart) uses up none (the client's _call()), so the person is still asked, once.
    client = PausePoint(setting_from(environ, "PAUSEPOINT_URL"), api_key_from(environ), timeout=CALL_SECONDS,
                        retries=2)
    wait = hook_wait(environ)
    channel, on_timeout = hook_settings(environ)
    tool_input = json.dumps(call.get("tool_input"), ensure_ascii=False)
    metadata = ({name: None if call.get(name) is None else readable(call[name])
                 for name in ("tool_name", "cwd", "session_id")}
                | {"tool_input": readable(tool_input), "display": ["tool_name", "cwd", "tool_input"]})
    if (size := metadata_bytes(metadata)) > METADATA_BYTES:     # the page would show a part: a harmless start, say
        return unasked(on_timeout, f"the call is too long to show whole on PausePoint ({size} bytes,"
                                   f" {METADATA_BYTES} at most)")
    deadline = time.monotonic() + wait - CALL_SECONDS       # for the create's tries and the wait's together
    message = describe(call)
    created = client.pause(
        recipient=recipient, channel=channel,
        message=message, options=["Allow", "Deny"], timeout_hours=max(wait, 60) / 3600,
        timeout_default="Deny", metadata=metadata, title="Claude Code",
        # The same call asked again (the hook re-run) finds the same pause. One without an id is
        # asked anew: the same command later, or elsewhere, is another call, not this one's answer.
        idempotency_key=call.get("tool_use_id") and "claude-code-" + hashlib.sha256(json.dumps(
            [call["tool_use_id"], call.get("session_id"), call.get("cwd"), tool_input]).encode()).hexdigest()[:40],
        deadline=deadline)
    pause = answer_by(client, created, deadline)
    if pause["status"] == "responded" and not asked_about(pause, message, metadata):
        return unasked(on_timeout, f"PausePoint answered with {pause['pause_id']}, a pause about another call")
    if pause["status"] == "responded" and pause["choice"] == "Allow":
        return decision("allow", f"allowed on PausePoint by {pause['decided_by']}")
    if pause["status"] == "responded":
        return decision("deny", pause.get("comment") or f"denied on PausePoint by {pause['decided_by']}")
    reason = ("the pause was cancelled on PausePoint" if pause["status"] == "cancelled"
              else f"no answer on PausePoint within {wait:g} s")
    if pause["status"] == "pending":            # a late answer must decide nothing: one try at cancelling it
        try:
            PausePoint(client.base_url, client.api_key, timeout=CANCEL_SECONDS, retries=0).cancel(pause["pause_id"])
        except PausePointError as e:            # answered as the wait ran out, or the server not answering
            reason += f" (nor could it be cancelled: {e}; an answer given there now is used by nothing)"
    return unasked(on_timeout, reason)


def answer_by(client, created, deadline):
    """The pause as waiting for it until `deadline` left it. One whose answer could not be read
    by then (the server stopped and not back yet, say) counts as still pending: the person was
    asked, so it is cancelled as one nobody answered is, not left to be answered for nothing."""
    try:
        return client.wait(created["pause_id"], timeout=max(0.0, deadline - time.monotonic()))
    except (RateLimited, ServerError, Unreachable):
        return {**created, "status": "pending"}


def asked_about(pause, message, metadata):
    """Whether `pause` is the one asked about this call: a create answered with another call's
    (kept by a cache in between, say) must not pass off the answer given there as this one's.
    Its line alone is not enough: two commands may differ only past where it is cut short."""
    return pause.get("message") == message and (pause.get("metadata") or {}).get("tool_input") == metadata["tool_input"]


def unasked(on_timeout, reason):
    """The answer to a call no person answered on PausePoint, for `reason`: asked here, or
    denied (PAUSEPOINT_HOOK_ON_TIMEOUT). Where nobody is at hand to be asked (a headless run,
    say), deny is what keeps such a call from running."""
    return decision(on_timeout, reason + ("; asking here instead" if on_timeout == "ask" else ""))


def unanswered_setting(environ):
    """PAUSEPOINT_HOOK_ON_TIMEOUT as far as it can be read, for the answers given when asking
    fails: ask unless it says deny (one it cannot take is named by ask_person(), asking here)."""
    return "deny" if environ.get("PAUSEPOINT_HOOK_ON_TIMEOUT", "").strip().lower() == "deny" else "ask"


def main(stdin=sys.stdin, stdout=sys.stdout, environ=os.environ):
    answered = threading.Lock()

    def give(answer, blocking):
        """Write the hook's one answer; False if one was (or is being) written already. The
        watchdog's is final: it keeps the lock, and a blocking give() waits for its exit."""
        if not answered.acquire(blocking=blocking):
            return False
        json.dump(answer, stdout)
        stdout.write("\n")
        stdout.flush()
        return True

    def too_late():
        # Each call ends within its time, but the calls and the cancel after the wait together
        # can outlast it (and a resolver may hang): past the hook's own limit, ask here, and end
        # the process with its calls.
        if give(unasked(on_timeout, "PausePoint took too long to answer"), blocking=False):
            os._exit(0)

    on_timeout = unanswered_setting(environ)
    try:
        limit = hook_wait(environ) + OVERRUN_SECONDS
    except ValueError:
        limit = OVERRUN_SECONDS         # ask_person() answers the bad setting at once
    watchdog = threading.Timer(limit, too_late)
    watchdog.daemon = True
    watchdog.start()
    try:
        if CLIENT_MISSING is not None:
            raise CLIENT_MISSING
        call = json.load(stdin)
        answer = ask_person(call, environ)
    except Exception as e:      # whatever it was (a call nested too deep to read, say): never Claude Code's own rules
        print(f"pausepoint hook: {e!r}", file=sys.stderr)
        answer = unasked(on_timeout, f"PausePoint could not be asked ({e})")
    watchdog.cancel()
    give(answer, blocking=True)     # (and keep the lock: a watchdog already running writes nothing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
