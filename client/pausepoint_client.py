"""PausePoint's Python client: ask a human before your agent acts.

One file, the standard library only: copy it into your project. Python 3.9+.

    from pausepoint_client import PausePoint

    pp = PausePoint("http://127.0.0.1:8080", "pp_test_…")
    result = pp.request_approval(recipient="+15550100", channel="sms",
                                 message="Wire $340 to Acme Corp?", options=["Approve", "Reject"],
                                 timeout_hours=4, timeout_default="Reject")
    if result.approved:
        ...

Only an explicit approval is permission: `result.approved` is False for a rejection,
a timeout (whatever its default) and a cancellation.
"""

import functools
import hashlib
import hmac
import http.client
import ipaddress
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

__all__ = ["PausePoint", "Approval", "verify_webhook", "verify_audit_export", "audit_event_hash", "AuditChainBroken",
           "setting_from", "api_key_from",
           "PausePointError", "BadRequest", "Unauthorized", "NotFound", "Conflict", "Gone", "PayloadTooLarge",
           "UnsupportedMediaType", "InvalidRequest", "RateLimited", "ServerError", "Unreachable"]

LONGEST_WAIT = 60           # the server answers ?wait= after at most this many seconds
LONGEST_RETRY_WAIT = 30     # seconds between tries at most; a 429 asking for longer is not retried
KEY_PREFIXES = ("pp_live_", "pp_test_")
# The most of an answer that is read: a page of 100 of the largest pauses is some 5 MB. More (a
# misdirected download, a hostile server) is no PausePoint answer, and held whole in memory it
# could exhaust the agent's.
MAX_ANSWER_BYTES = 16 * 2**20


###############################################################################
# Errors: one class per status, each with the server's code, message and field
###############################################################################

class PausePointError(Exception):
    """An answer that was not a success: status, code, message and field as the server gave them."""

    def __init__(self, status, code, message, field=None, retry_after=None):
        said = f"{status} {code}" if status else code      # no status: there was no answer to have one
        super().__init__(f"{said}: {message}" + (f" (field: {field})" if field else ""))
        self.status, self.code, self.message, self.field, self.retry_after = status, code, message, field, retry_after


class BadRequest(PausePointError): """400: the body is not valid JSON."""
class Unauthorized(PausePointError): """401: the API key is wrong or was rotated."""
class NotFound(PausePointError): """404: no such thing for this key."""
class Conflict(PausePointError): """409: not in a state that allows this (already decided, say)."""
class Gone(PausePointError): """410: the respond link expired."""
class PayloadTooLarge(PausePointError): """413: the body is over the server's limit."""
class UnsupportedMediaType(PausePointError): """415: not sent as JSON."""
class InvalidRequest(PausePointError): """422: a field is wrong; .field names it."""
class RateLimited(PausePointError): """429: a quota or rate limit; .retry_after says when to come back."""
class ServerError(PausePointError): """5xx: the server could not answer (retried first, for safe calls, but 507)."""
class Unreachable(PausePointError): """No answer at all: connection refused or reset, or timed out (retried first)."""


ERRORS = {400: BadRequest, 401: Unauthorized, 404: NotFound, 409: Conflict, 410: Gone, 413: PayloadTooLarge,
          415: UnsupportedMediaType, 422: InvalidRequest, 429: RateLimited}


###############################################################################
# The outcome of an approval
###############################################################################

class Approval:
    """A decided (or still pending) pause, read the safe way round."""

    def __init__(self, pause, approve_option=None):
        self.pause = pause
        self.approve_option = approve_option or pause["options"][0]

    pause_id = property(lambda self: self.pause["pause_id"])
    status = property(lambda self: self.pause["status"])
    choice = property(lambda self: self.pause.get("choice"))
    comment = property(lambda self: self.pause.get("comment"))
    decided_by = property(lambda self: self.pause.get("decided_by"))
    pending = property(lambda self: self.status == "pending")
    timed_out = property(lambda self: self.status == "timed_out")
    cancelled = property(lambda self: self.status == "cancelled")
    # With fields: their values as decided (the approver may have changed some), and which changed.
    values = property(lambda self: {name: field["value"] for name, field in (self.pause.get("fields") or {}).items()})
    edited = property(lambda self: self.pause.get("edited") or {})
    # For a team pause: who chose what, oldest first ([] otherwise).
    votes = property(lambda self: self.pause.get("votes") or [])

    @property
    def approved(self):
        """True only when a person chose the approving option (by default the first)."""
        return self.status == "responded" and self.choice == self.approve_option

    def __repr__(self):
        return f"Approval({self.pause_id}, status={self.status!r}, choice={self.choice!r})"


###############################################################################
# The client
###############################################################################

class PausePoint:
    """Calls to one PausePoint server with one API key.

    Safe calls (reads, and creates, which always carry an Idempotency-Key) are retried
    with growing, jittered waits on no answer and 5xx, and after its Retry-After on a 429
    that gives one (a rate limit), up to `retries` times; not on a quota or a full disk."""

    def __init__(self, base_url, api_key, timeout=10.0, retries=6, backoff=0.5):
        parts = urllib.parse.urlsplit(str(base_url))
        # A user name and password in the address is never quoted, nor sent: urllib would take
        # "user:password@host" for the host's name and ask the resolver (over the network) for it.
        if "@" in parts.netloc:
            raise ValueError("the server's address holds a user name or password (before an '@'), which the client"
                             " never sends: give the address without it")
        if parts.scheme not in ("http", "https") or not parts.hostname or "?" in base_url or "#" in base_url:
            raise ValueError(f"the server's address must be an http:// or https:// URL, not {_shown(base_url)}")
        api_key = str(api_key).strip()
        # Checked here, not left to http.client, whose refusal of a line break in a header quotes
        # the header, key and all, into errors that reach logs and a hook's answer.
        if not api_key.isascii() or not api_key.isprintable() or " " in api_key:
            raise ValueError("the API key holds a character no key has (a line break, a space or a non-ASCII"
                             " character): copy it again from where it was first shown")
        self.base_url, self.api_key = base_url.rstrip("/"), api_key
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        # A server on this machine is never reached through a proxy from http_proxy: the
        # proxy would be sent the key (over plain HTTP, in the clear) and could answer for it.
        direct = [urllib.request.ProxyHandler({})] if _is_loopback(parts.hostname) else []
        self._opener = urllib.request.build_opener(_RedirectsRefused, _AnsweredByHTTP, _AnsweredByHTTPS, *direct)

    # -- the API ---------------------------------------------------------------------------

    def pause(self, recipient=None, channel=None, message=None, options=None, timeout_hours=None, timeout_default=None,
              metadata=None, title=None, idempotency_key=None, fields=None, recipients=None, quorum=None,
              remind_after_minutes=None, escalation=None, deadline=None):
        """Create a pause; returns the server's answer (pause_id, status, respond_url, …).
        Ask a team with `recipients` ([{"recipient", "channel"}, …]) instead of recipient and channel.
        A retried create never asks twice: the same Idempotency-Key returns the first pause. With
        a `deadline` (a time.monotonic() value), it is not retried past it."""
        given = {"recipient": recipient, "channel": channel, "message": message,
                 "options": None if options is None else list(options), "timeout_hours": timeout_hours,
                 "timeout_default": timeout_default, "metadata": metadata, "title": title, "fields": fields,
                 "recipients": recipients, "quorum": quorum, "remind_after_minutes": remind_after_minutes,
                 "escalation": escalation}
        body = {name: value for name, value in given.items() if value is not None}
        key = idempotency_key or f"pp-client-{uuid.uuid4()}"
        return self._call("POST", "/v1/pause", body, headers={"Idempotency-Key": key}, safe=True, deadline=deadline)

    def get(self, pause_id, wait=0, deadline=None):
        """The whole pause; with wait=N seconds (up to 60), answered when it is decided or after N.
        With a `deadline` (a time.monotonic() value), retries never wait past it, and no attempt
        asks the server to wait past it (by more than half a second: it waits whole seconds)."""
        def query():
            asked = wait if deadline is None else min(wait, max(0, round(deadline - time.monotonic())))
            return {"wait": asked} if asked else None
        pause = self._call("GET", f"/v1/pause/{_quote(pause_id)}", query=query, safe=True, deadline=deadline)
        return _the_pause_asked_about(pause, pause_id, self.base_url)

    def wait(self, pause_id, timeout=None):
        """The pause once decided, or as it stands after `timeout` seconds (None: until decided).
        Rides out dropped connections and server restarts, however long, until then."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def rest(seconds):
            time.sleep(seconds if deadline is None else max(0.0, min(seconds, deadline - time.monotonic())))

        # Never a question asked again at once: the server waits whole seconds and answers a
        # wait of 0 at once, so asking again and again would be hundreds of calls a second.
        failures = 0            # in a row, of whole calls (each with its retries): the longer, the rarer the next
        while True:
            left = LONGEST_WAIT if deadline is None else deadline - time.monotonic()
            if left < 1:
                rest(left)          # the fraction of a second left, then one last look
                return self.get(pause_id, deadline=deadline)
            asked, asked_at = min(LONGEST_WAIT, int(left)), time.monotonic()
            try:
                pause = self.get(pause_id, wait=asked, deadline=deadline)
            except (RateLimited, Unreachable, ServerError) as e:
                # get() gave up after its retries (a restart can take longer): the pause is still
                # there to wait for, until the deadline. As many agents wait as the server takes:
                # come back when told or, if that is past our deadline, at it for one last look.
                if not isinstance(e, RateLimited) and deadline is not None and time.monotonic() >= deadline:
                    raise
                failures += 1
                rest(self._time_to_come_back(e, failures))
                continue
            failures = 0
            if pause["status"] != "pending":
                return pause
            if deadline is not None and time.monotonic() >= deadline:
                return pause        # answered at the deadline or after it: as fresh as a last look would be
            if time.monotonic() - asked_at < asked / 2:
                rest(self.backoff)  # answered long before its wait (a server stopping answers every waiter)

    def cancel(self, pause_id):
        """Cancel a pending pause; returns it. Cancelling one already cancelled returns it too."""
        try:
            pause = self._call("POST", f"/v1/pause/{_quote(pause_id)}/cancel", safe=True)
            return _the_pause_asked_about(pause, pause_id, self.base_url)
        except Conflict:
            pause = self.get(pause_id)
            if pause["status"] == "cancelled":
                return pause            # our own cancel, retried after its answer was lost
            raise

    def request_approval(self, recipient=None, channel=None, message=None, options=("Approve", "Reject"),
                         timeout_hours=1, timeout_default=None, metadata=None, title=None, idempotency_key=None,
                         wait_timeout=None, approve_option=None, fields=None, **team):
        """Ask, then wait for the answer: an Approval (check .approved, then use .values).
        `team` takes pause()'s recipients, quorum, remind_after_minutes and escalation."""
        options = None if options is None else list(options)       # a generator is read once, here
        created = self.pause(recipient, channel, message, options, timeout_hours, timeout_default, metadata, title,
                             idempotency_key, fields, **team)
        # The first option as asked (as the server keeps it, stripped), not as an answer lists
        # them: one listing them in another order must not make another choice the approval.
        approve_option = approve_option or options[0].strip()
        return Approval(self.wait(created["pause_id"], wait_timeout), approve_option)

    def audit(self, pause_id=None, event_type=None, limit=50, cursor=None):
        """A page of the audit log, newest first: {"events": [...], "next_cursor": …}."""
        query = {"pause_id": pause_id, "event_type": event_type, "limit": limit, "cursor": cursor}
        return self._call("GET", "/v1/audit", query={k: v for k, v in query.items() if v is not None}, safe=True)

    def events(self, after=None, types=None, wait=30):
        """Every event after the one with id `after`, oldest first, as webhooks carry them,
        waiting for new ones for ever: as wait() does, it rides out dropped connections, server
        restarts and a server with every waiting place taken, however long. Store the last id
        you handled to resume after it (an `after` the server no longer keeps is NotFound)."""
        failures = 0            # in a row, of whole calls (each with its retries)
        while True:
            query = {"limit": 100, "wait": min(wait, LONGEST_WAIT)}        # the longest the server waits
            if after:
                query["after"] = after
            if types:
                query["types"] = ",".join(types)
            asked_at = time.monotonic()
            try:
                answer = self._call("GET", "/v1/events", query=query, safe=True)
            except (RateLimited, Unreachable, ServerError) as e:
                failures += 1
                time.sleep(self._time_to_come_back(e, failures))
                continue
            failures = 0
            events = answer.get("events") if isinstance(answer, dict) else None
            if not isinstance(events, list):
                raise PausePointError(200, "bad_answer", f"{self.base_url} answered the event feed without a list"
                                                         f" of events: {str(answer)[:80]}")
            for event in events:
                after = event["id"]
                yield event
            # Never asked again at once: a stopping server answers every waiter at once, and with
            # no wait asked the server answers at once too; hundreds of calls a second otherwise.
            if not events and (not wait or time.monotonic() - asked_at < wait / 2):
                time.sleep(self.backoff)

    def _time_to_come_back(self, error, failures):
        """Seconds to rest before a long poll is asked again, after a call that failed
        `failures` times in a row, its retries spent (a restart can take longer than they
        do, and every waiting place may stay taken): when a rate limit says, within the
        longest wait between tries, else longer the more failed. Raises `error` when trying
        again cannot work: a full disk (507) does not clear so."""
        if error.status == 507:
            raise error
        told = error.retry_after if isinstance(error, RateLimited) else None
        return min(told or self.backoff * 2 ** min(failures, 10), LONGEST_RETRY_WAIT)

    # -- HTTP ------------------------------------------------------------------------------

    def _call(self, method, path, body=None, query=None, headers=None, safe=False, deadline=None):
        """`query`: a dict, or a function giving each attempt's. Each attempt may take `timeout`
        seconds beyond the wait it asks for (which, with a `deadline`, ends by then)."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json",
                   "User-Agent": "pausepoint-client/1", **(headers or {})}
        if data is not None:
            headers["Content-Type"] = "application/json"
        failures = 0
        while True:
            asked = query() if callable(query) else query
            url = self.base_url + path + ("?" + urllib.parse.urlencode(asked) if asked else "")
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            limit = self.timeout + (asked or {}).get("wait", 0)
            with _AnswerBy(limit) as request.answer_by:
                try:
                    with self._opener.open(request, timeout=limit) as answer:
                        raw = _body_of(answer, self.base_url)
                    return _answer_from(raw, self.base_url)
                except urllib.error.HTTPError as e:
                    error = _error_from(e)
                except (urllib.error.URLError, http.client.HTTPException, OSError) as e:     # no whole answer
                    reason = (f"not answered in full within {limit:g} s" if request.answer_by.ended
                              else getattr(e, "reason", e))
                    error = Unreachable(0, "unreachable", f"no answer from {self.base_url}: {reason}")
            # A quota, a cap on pending pauses or a full disk (507) does not clear in seconds: what
            # may is tried again (no answer, a server fault, a rate limit that says when, within
            # the longest wait between tries).
            retryable = (isinstance(error, (Unreachable, ServerError)) and error.status != 507
                         or isinstance(error, RateLimited) and error.retry_after is not None
                         and error.retry_after <= LONGEST_RETRY_WAIT)
            pause = min(error.retry_after or self.backoff * 2 ** failures, LONGEST_RETRY_WAIT) * random.uniform(0.8, 1.2)
            late = deadline is not None and time.monotonic() + pause >= deadline
            # A server answering 503 with when to come back (stopping for a restart, its database
            # held by maintenance) is there, and did nothing: by a deadline, that uses up no try,
            # while a server not there at all is given up on after `retries` more.
            told = deadline is not None and error.status == 503 and error.retry_after is not None
            if not (safe and retryable) or late or not told and failures >= self.retries:
                raise error
            failures += 0 if told else 1
            time.sleep(pause)


def _is_loopback(hostname):
    try:
        return hostname == "localhost" or ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def _looks_like_a_key(text):
    return any(prefix in str(text) for prefix in KEY_PREFIXES)


def _shown(value):
    """`value` quoted for a message, unless it holds what looks like an API key (given in the
    wrong setting): messages reach logs, and a hook's answer, which the model reads."""
    return "what looks like an API key (not shown)" if _looks_like_a_key(value) else repr(str(value))


def _quote(part):
    return urllib.parse.quote(str(part), safe="")


class _AnswerBy:
    """Ends a call not answered in full within `seconds`, by shutting its socket: a socket's
    timeout bounds each read, not the answer, and a server sending a byte every few seconds
    would otherwise hold the call (and a wait's deadline) for as long as it liked."""

    def __init__(self, seconds):
        self.sock, self.ended, self.lock = None, False, threading.Lock()
        self.timer = threading.Timer(seconds, self.end)
        self.timer.daemon = True

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()

    def watch(self, sock):
        with self.lock:
            self.sock = sock
            if self.ended:              # connected only after the time was up
                self._shut()

    def end(self):
        with self.lock:
            self.ended = True
            self._shut()

    def _shut(self):
        if self.sock is not None:
            try:        # the plain socket's shutdown, on a TLS one too: it wakes a read blocked in another thread
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
            except OSError:
                pass


class _Watched:
    """A connection whose socket its request's _AnswerBy may shut."""

    def __init__(self, *args, answer_by, **kwargs):
        super().__init__(*args, **kwargs)
        self.answer_by = answer_by

    def connect(self):
        super().connect()
        self.answer_by.watch(self.sock)


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):
    pass


class _AnsweredByHTTP(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTP, answer_by=req.answer_by), req)


class _AnsweredByHTTPS(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTPS, answer_by=req.answer_by), req, context=self._context)


class _RedirectsRefused(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as an error, not followed: urllib would send the API key on to
    wherever it points (another host too), turn a POST into a GET there, and hand back that
    host's answer as the server's."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _body_of(answer, base_url):
    """A success's body, unless it is longer than any answer is: then not read past that."""
    if answer.length is None:           # chunked, or up to the connection's end: one byte over at most
        raw = answer.read(MAX_ANSWER_BYTES + 1)
    else:                               # read(n) would take one that ends short for whole
        raw = answer.read() if answer.length <= MAX_ANSWER_BYTES else None
    if raw is None or len(raw) > MAX_ANSWER_BYTES:
        raise PausePointError(200, "bad_answer", f"{base_url} answered with more than {MAX_ANSWER_BYTES:,} bytes,"
                                                 " which no PausePoint answer is; the rest was not read")
    return raw


def _answer_from(raw, base_url):
    """A success's body, a JSON object as every PausePoint answer is, or an error saying what
    answered instead (a captive portal's page, say), not a bare JSONDecodeError or TypeError later."""
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise PausePointError(200, "bad_answer", f"{base_url} answered with something other than a PausePoint"
                                                 f" answer (a JSON object): {raw[:80]!r}")
    return answer


def _the_pause_asked_about(pause, pause_id, base_url):
    """`pause`, when it is the one asked about: an answer about another (a cache or a proxy
    mixing up answers, a server that is not ours) must not decide this one, whatever it says."""
    if pause.get("pause_id") != str(pause_id):
        raise PausePointError(200, "bad_answer", f"{base_url} answered about {pause.get('pause_id')!r} when asked"
                                                 f" about {str(pause_id)!r}")
    return pause


def _error_from(http_error):
    """The typed error for a non-2xx answer, whatever its body: the server's one error shape,
    or anything else something in between answered with."""
    try:
        detail = json.loads(http_error.read(MAX_ANSWER_BYTES) or b"{}")["error"]
    except (ValueError, KeyError, TypeError, IndexError, OSError, http.client.HTTPException):
        detail = {}
    detail = detail if isinstance(detail, dict) else {}
    status, headers = http_error.code, http_error.headers
    if 300 <= status < 400:
        return PausePointError(status, "redirect", f"the server answered with a redirect to {headers.get('Location')};"
                               " the client does not follow one (your key would go with it): use the address it"
                               " names as the base URL if it is your server's")
    retry_after = headers.get("Retry-After") or ""
    # Whole seconds, as the server says them: not an HTTP date, nor more digits than int() reads
    # (it refuses over 4,300; nine are 30 years).
    readable = retry_after.isascii() and retry_after.isdigit() and len(retry_after) <= 9
    kind = ERRORS.get(status, ServerError if status >= 500 else PausePointError)
    return kind(status, str(detail.get("code") or "error"), str(detail.get("message") or http_error.reason),
                detail.get("field"), int(retry_after) if readable else None)


###############################################################################
# Settings from the environment, as the Claude Code hook and the MCP server read them
###############################################################################

def setting_from(environ, name):
    """The value of the variable `name` in `environ`; ValueError saying it is not set when it is
    missing or blank."""
    if not environ.get(name, "").strip():
        raise ValueError(f"{name} is not set")
    return environ[name]


def api_key_from(environ):
    """The first line of the file PAUSEPOINT_API_KEY_FILE names, or else PAUSEPOINT_API_KEY;
    ValueError saying which to set, or what is wrong with the file. A file keeps the key off
    command lines, which every local user sees in `ps`."""
    path = environ.get("PAUSEPOINT_API_KEY_FILE", "")
    if not path:
        if not environ.get("PAUSEPOINT_API_KEY", "").strip():
            raise ValueError("no API key: set PAUSEPOINT_API_KEY_FILE to a file holding it (or PAUSEPOINT_API_KEY)")
        return environ["PAUSEPOINT_API_KEY"].strip()
    if _looks_like_a_key(path):
        raise ValueError("PAUSEPOINT_API_KEY_FILE is set to what looks like an API key (not shown), not to a file"
                         " holding one: put the key in a file only you may read and set the file's path")
    try:
        with open(path, encoding="utf-8-sig") as f:
            line = f.readline(201)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"PAUSEPOINT_API_KEY_FILE: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    key = line.strip()
    if not key or len(line) > 200:
        raise ValueError(f"{path} holds no key on its first line")
    return key


###############################################################################
# Receiving webhooks
###############################################################################

def verify_webhook(secret, header, body, tolerance=300):
    """Whether an X-PausePoint-Signature `header` signs the raw `body` (bytes) with your
    endpoint's `secret`, made within `tolerance` seconds. During the day after a secret
    changes the header carries a signature by each; either will do."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    fields = [part.strip().partition("=") for part in (header or "").split(",")]
    # isdigit() alone takes '²' and '١', which int() refuses or reads: a forged header must get
    # False, not an exception in the receiver.
    stamps = [value for name, _, value in fields
              if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12]
    if len(stamps) != 1 or abs(time.time() - int(stamps[0])) > tolerance:
        return False
    mac = hmac.new(secret.encode("utf-8"), stamps[0].encode() + b"." + body, hashlib.sha256).hexdigest()
    # compare_digest() raises on text that is not ASCII, which only a forged header holds.
    return any(hmac.compare_digest(mac, value) for name, _, value in fields if name == "v1" and value.isascii())


###############################################################################
# Checking an exported audit log
###############################################################################

AUDIT_GENESIS = "0" * 64


class AuditChainBroken(Exception):
    """An exported audit log that does not hold: the message names the first event that breaks."""


def audit_event_hash(event):
    """The hash an exported audit event must carry, computed as the README says: SHA-256 of
    its fields as netstrings (length in UTF-8 bytes, ':', the bytes, ','), in the order
    prev_hash, developer_id, livemode ('1'/'0'), timestamp, actor, event_type, pause_id ('' for
    none), data_json."""
    fields = (event["prev_hash"], event["developer_id"], "1" if event["livemode"] else "0", event["timestamp"],
              event["actor"], event["event_type"], event["pause_id"] or "", event["data_json"])
    encoded = [field.encode("utf-8", "surrogatepass") for field in fields]
    return hashlib.sha256(b"".join(b"%d:%s," % (len(field), field) for field in encoded)).hexdigest()


def _as_json_text(value):
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def verify_audit_export(path, head=None):
    """Check a JSON-lines export (GET /v1/audit/export): every event's hash, and that each
    links to the one before it. With `head` ({"hash", "count"} as GET /v1/audit/head gave it,
    noted somewhere safe earlier), also that the export still reaches that event and that
    exactly `count` events lead up to it from the chain's first: nothing up to the head was
    changed, removed or cut off (a live chain's export must then be whole, without since; a
    test chain's oldest events go with retention, so only its reaching the head is checked).
    Returns how many events were checked; raises AuditChainBroken naming the first that
    breaks."""
    empty_head = head is not None and head["hash"] == AUDIT_GENESIS and head["count"] == 0
    previous, checked, starts_chain, reached = None, 0, False, head is None or empty_head
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                event = json.loads(line)
            except ValueError:
                # The server writes whole lines: a part of one is an export whose download was cut off.
                raise AuditChainBroken(f"line {number} is not a whole event: the export was cut short") from None
            where = f"{event.get('id')} (line {number})"
            # Compared as JSON text: as Python values 1, 1.0 and true are equal, and a reader of data would
            # take one for another.
            if _as_json_text(json.loads(event["data_json"])) != _as_json_text(event["data"]):
                raise AuditChainBroken(f"{where}: its data is not the data it was hashed with")
            if previous is None:
                starts_chain = event["prev_hash"] == AUDIT_GENESIS
                if head is not None and event["livemode"] and not starts_chain:
                    raise AuditChainBroken(f"{where}: the export does not start at the chain's first event, so it"
                                           " cannot be checked against a head: export the whole log, or events"
                                           " before it were removed")
            elif event["prev_hash"] != previous:
                raise AuditChainBroken(f"{where}: its prev_hash is not the hash of the event before it:"
                                       " an event was removed or moved")
            if audit_event_hash(event) != event["hash"]:
                raise AuditChainBroken(f"{where}: its content does not give its hash: it was changed")
            previous, checked = event["hash"], checked + 1
            if head is not None and event["hash"] == head["hash"]:
                reached = True
                if starts_chain and checked != head["count"]:
                    raise AuditChainBroken(f"{where} is the noted head, but {checked} events lead up to it, not"
                                           f" {head['count']}")
    if not reached:
        raise AuditChainBroken(f"the export never reaches the noted head {head['hash']}: events up to it were"
                               " cut off")
    return checked
