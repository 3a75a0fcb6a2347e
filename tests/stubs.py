"""Loopback stand-ins for the outside world, speaking the real protocols."""

import base64
import http.server
import json
import socket
import threading
import time
import urllib.parse
import uuid

from twilio.request_validator import RequestValidator


def serve_http(handler_class):
    """A threading HTTP server for handler_class on a free loopback port, serving on
    a thread of its own: (server, its base URL)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    # A short poll interval, so that closing a stub takes a moment rather than half a second.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def stop_http(server):
    server.shutdown()
    server.server_close()


class TwilioStub:
    """A local HTTP server that speaks enough of Twilio's Messages API for the
    real twilio library: it checks HTTP Basic auth, records each message and
    answers like Twilio, or fails on demand (`fail_next`), or takes a message and
    answers only after a while (`answer_late`) or not at all (`hang_up`), or does something
    with a message taken before it answers (`before_answer`: Twilio's status callbacks do not
    wait for its answer); and makes the signed status callbacks Twilio posts about a message
    (`status_callback`)."""

    def __init__(self, account_sid="AC" + "0" * 32, auth_token="stub-auth-token"):
        self.account_sid, self.auth_token = account_sid, auth_token
        self.messages = []
        self.fail_next = []            # HTTP statuses to answer with, one per coming request
        self.answer_late = []          # seconds to wait before answering a message taken, one per coming message
        self.hang_up = 0               # how many coming messages to take and then hang up on, unanswered
        self.unsubscribed = set()      # numbers that texted STOP: Twilio refuses to send to them
        self.before_answer = []        # callables, one per coming message taken, called with its sid
        self.lock = threading.Lock()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                expected = "Basic " + base64.b64encode(f"{stub.account_sid}:{stub.auth_token}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    return self.answer(401, {"code": 20003, "message": "Authenticate", "status": 401})
                if self.path != f"/2010-04-01/Accounts/{stub.account_sid}/Messages.json":
                    return self.answer(404, {"code": 20404, "message": "Not found", "status": 404})
                if form.get("To") in stub.unsubscribed:
                    return self.answer(400, {"code": 21610, "message": "Attempt to send to unsubscribed recipient",
                                             "status": 400})
                with stub.lock:
                    failure = stub.fail_next.pop(0) if stub.fail_next else None
                    if failure is None:
                        sid = "SM" + uuid.uuid4().hex
                        stub.messages.append({**form, "sid": sid})
                        late = stub.answer_late.pop(0) if stub.answer_late else 0
                        hang_up, stub.hang_up = stub.hang_up > 0, max(0, stub.hang_up - 1)
                        before = stub.before_answer.pop(0) if stub.before_answer else None
                if failure is not None:
                    return self.answer(failure, {"code": 30001, "message": "Queue overflow", "status": failure})
                if hang_up:
                    self.close_connection = True
                    return
                time.sleep(late)
                if before is not None:
                    before(sid)
                self.answer(201, {"sid": sid, "account_sid": stub.account_sid, "to": form.get("To"),
                                  "from": form.get("From"), "body": form.get("Body"), "status": "queued",
                                  "num_segments": "1", "direction": "outbound-api", "api_version": "2010-04-01"})

            def answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server, self.url = serve_http(Handler)

    def status_callback(self, sid, status, error_code=None, auth_token=None):
        """What Twilio posts to report the message `sid`'s `status`, and where: (the StatusCallback
        it was sent with, the form, the headers), signed as Twilio signs it, with the account's
        auth token unless another is given."""
        [message] = [message for message in self.messages if message["sid"] == sid]
        url = message["StatusCallback"]
        form = {"AccountSid": self.account_sid, "ApiVersion": "2010-04-01", "From": message.get("From", ""),
                "To": message["To"], "MessageSid": sid, "SmsSid": sid, "MessageStatus": status, "SmsStatus": status,
                **({"ErrorCode": str(error_code)} if error_code is not None else {})}
        signature = RequestValidator(auth_token or self.auth_token).compute_signature(url, form)
        return url, form, {"X-Twilio-Signature": signature}

    def settings(self, from_number="+15559990000"):
        """The PausePoint settings that point the sms channel at this stub."""
        return {"twilio.account_sid": self.account_sid, "twilio.auth_token": self.auth_token,
                "twilio.from_number": from_number, "twilio.api_base": self.url}

    def close(self):
        stop_http(self.server)


class WebhookReceiver:
    """A real HTTP receiver on loopback that records every call. `answers` is a
    list of (status, headers) to give, one per call, then 200s; `delay` seconds
    are slept before answering; `before_answer` holds callables, one per coming call, each
    called (with the call's body) before it is answered."""

    def __init__(self, answers=(), delay=0.0):
        self.calls = []
        self.answers = list(answers)
        self.delay = delay
        self.before_answer = []
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                arrived_at = time.monotonic()
                if receiver.delay:
                    time.sleep(receiver.delay)
                with receiver.lock:
                    before = receiver.before_answer.pop(0) if receiver.before_answer else None
                if before is not None:
                    before(body)
                with receiver.lock:
                    status, headers = receiver.answers.pop(0) if receiver.answers else (200, {})
                    receiver.calls.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                           "json": json.loads(body), "status": status, "arrived_at": arrived_at})
                    receiver.arrived.notify_all()
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except (BrokenPipeError, ConnectionResetError):
                    pass        # the sender gave up waiting (the timeout tests make it)

        self.server, self.url = serve_http(Handler)

    def wait_for(self, count, timeout=15):
        """The first `count` calls, waiting up to `timeout` seconds for them."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len(self.calls) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"expected {count} webhook calls, got {len(self.calls)}")
                self.arrived.wait(remaining)
            return list(self.calls[:count])

    def close(self):
        stop_http(self.server)


class LoopbackServer:
    """A TCP server on a free loopback port that hands each connection to
    self._serve(conn) on a thread of its own, counting them in `accepted`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def close(self):
        self.closed.set()
        self.listener.close()


class RefusingProxy(LoopbackServer):
    """An outbound proxy that refuses every CONNECT (403), recording the request lines."""

    def __init__(self):
        self.asked = []
        super().__init__()

    def _serve(self, conn):
        with conn:
            self.asked.append(conn.recv(65536).split(b"\r\n")[0].decode())
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


class HeaderFlood(LoopbackServer):
    """A receiver that answers 200 with `lines` header lines of 64,000 bytes each, within
    what http.client takes (100 lines of 64 KiB): megabytes of head for a 2-byte body.
    The answer is made once, here, so that what the sender reads is all a call allocates."""

    def __init__(self, lines=90):
        flood = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"x" * 64000) for n in range(lines))
        self.answer = b"HTTP/1.1 200 OK\r\n" + flood + b"Content-Length: 2\r\n\r\nok"
        super().__init__()

    def _serve(self, conn):
        with conn, conn.makefile("rb") as request:
            try:
                while request.readline() not in (b"\r\n", b""):
                    pass
                conn.sendall(self.answer)
            except OSError:
                pass            # the sender stopped reading


class TrickleReceiver(LoopbackServer):
    """A receiver that reads a request, then answers one byte every `interval`
    seconds, for as long as the sender waits: each read finishes quickly, the whole
    answer never does. Counts the connections it holds at once."""

    def __init__(self, interval=1.0):
        self.interval = interval
        self.open = self.most_open = 0
        super().__init__()

    def _serve(self, conn):
        with self.lock:
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        try:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" * 100:
                if self.closed.wait(self.interval):
                    break
                conn.sendall(bytes([byte]))
        except OSError:
            pass                # the sender gave up: what the deadline is for
        finally:
            conn.close()
            with self.lock:
                self.open -= 1


class HostedService(LoopbackServer):
    """A chat service's own host (discord.com, say), reached as the sender reaches any
    host through an outbound proxy: it takes the CONNECT, then speaks TLS with
    `tls_context` (a certificate the sender is told to trust) as that host would. Records
    each request as {"host", "path", "json"}, a form's fields as its JSON; answers 200 with `answer`,
    or 400, as the service refuses it, for a request holding a text longer than `longest` characters."""

    def __init__(self, tls_context, answer=b'{"id": "1", "result": "success"}'):
        self.tls_context, self.answer = tls_context, answer
        self.calls, self.longest = [], None
        super().__init__()

    def _serve(self, conn):
        try:
            with conn, conn.makefile("rb") as incoming:
                host = incoming.readline().split()[1].decode().rsplit(":", 1)[0]
                while incoming.readline() not in (b"\r\n", b""):
                    pass
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                with self.tls_context.wrap_socket(conn, server_side=True) as tls, tls.makefile("rb") as request:
                    path = request.readline().split()[1].decode()
                    headers = dict(line.decode().split(":", 1) for line in iter(request.readline, b"\r\n"))
                    headers = {name.strip().lower(): value.strip() for name, value in headers.items()}
                    body = request.read(int(headers.get("content-length", 0))).decode()
                    sent = (dict(urllib.parse.parse_qsl(body)) if "form" in headers.get("content-type", "")
                            else json.loads(body))
                    with self.lock:
                        self.calls.append({"host": host, "path": path, "json": sent})
                    too_long = self.longest is not None and max(map(len, texts_in(sent))) > self.longest
                    tls.sendall(b"HTTP/1.1 " + (b"400 Bad Request" if too_long else b"200 OK")
                                + b"\r\nContent-Type: application/json\r\nContent-Length: "
                                + str(len(self.answer)).encode() + b"\r\nConnection: close\r\n\r\n" + self.answer)
        except OSError:
            pass            # the sender gave up


def texts_in(sent):
    """Every string in a request's JSON."""
    if isinstance(sent, str):
        return [sent]
    inside = sent.values() if isinstance(sent, dict) else sent if isinstance(sent, list) else []
    return [text for value in inside for text in texts_in(value)] or [""]


class Tarpit:
    """A TCP server that accepts connections and never says a word (a hung SMTP host)."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self):
        self.listener.close()
        for conn in self.held:
            conn.close()


class Blackhole:
    """A listening address whose queue is full: a connection attempt to it neither
    succeeds nor fails, it just waits (as an unreachable host does)."""

    def __init__(self, address="127.0.0.1"):
        self.listener = socket.socket()
        self.listener.bind((address, 0))
        self.listener.listen(0)
        self.address = self.listener.getsockname()
        self.queued = []
        for _ in range(3):
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.connect(self.address)
            except BlockingIOError:
                pass
            self.queued.append(sock)
        time.sleep(0.1)

    def close(self):
        for sock in self.queued:
            sock.close()
        self.listener.close()


class StallingReceiver(TrickleReceiver):
    """Sends a status line, then nothing: an answer that never finishes."""

    def _serve(self, conn):
        with self.lock:
            self.open += 1
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            self.closed.wait(60)
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.open -= 1


class KeepAliveReceiver(LoopbackServer):
    """An HTTP/1.1 receiver that keeps connections open between requests and counts
    them. `plan` says what each request gets, in order, then "ok" for the rest:
    "ok" answers 200; "close" answers 200, then closes the connection without saying
    so; "drop" answers 200, then closes the connection, unanswered, as the next request
    arrives on it (a server's idle timeout firing just as a client reuses it: counted in
    .dropped, not .requests); "hangup" closes the connection unanswered, and ("hangup", s)
    does after s seconds; "partial" sends the start of a status line and closes; "trickle"
    answers one byte every 0.2 s, 8 s for the whole answer. .ended counts the
    connections it has closed."""

    def __init__(self, plan=()):
        self.plan = list(plan)
        self.requests = self.dropped = self.ended = 0
        super().__init__()

    def _serve(self, conn):
        try:
            self._answer(conn)
        finally:
            with self.lock:
                self.ended += 1

    def _answer(self, conn):
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        with conn, conn.makefile("rb") as incoming:
            try:
                dropping = False
                while self._read_request(incoming):
                    with self.lock:
                        if dropping:
                            self.dropped += 1
                            return
                        self.requests += 1
                        what = self.plan.pop(0) if self.plan else "ok"
                        dropping = what == "drop"
                    if what == "hangup" or what[0] == "hangup":
                        self.closed.wait(0 if what == "hangup" else what[1])
                        return
                    if what == "partial":
                        conn.sendall(answer[:10])
                        return
                    if what == "trickle":
                        for byte in answer:
                            if self.closed.wait(0.2):
                                return
                            conn.sendall(bytes([byte]))
                        return
                    conn.sendall(answer)
                    if what == "close":
                        return
            except OSError:
                pass            # the sender gave up

    @staticmethod
    def _read_request(incoming):
        length = None
        line = incoming.readline()
        if not line:
            return False
        while line not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            line = incoming.readline()
        incoming.read(length or 0)
        return True


class PausePointStandIn(http.server.BaseHTTPRequestHandler):
    """A PausePoint as its clients meet it, for the clients' own tests: each create answered in
    turn from `creates`, as (status, error code, headers), then 201, its body a byte every
    `trickle` seconds; reads in turn from `reads`, then 200 after the wait they ask for and
    `late` seconds more, with `read` (JSON) as the pause; a cancel with the status `cancel`;
    every pause pending otherwise. `asked` records each request as (method, path, the wait
    asked for, its Idempotency-Key). serve_stand_in() sets these."""
    creates, reads, cancel, asked, late, trickle, read = [], [], 200, [], 0, 0, None
    pending = json.dumps({"pause_id": "psr_1", "status": "pending", "choice": None, "decided_by": None,
                          "recipient": "+15550100", "message": "Deploy to production?",
                          "expires_at": "2999-01-01T00:00:00.000Z"})

    def answer(self, status, code=None, headers=None, trickle=0, body=None):
        refusal = json.dumps({"error": {"code": code or "refused", "message": "no"}})
        body = (body or self.pending) if status < 300 else refusal
        self.send_response(status)
        for name, value in {**(headers or {}), "Content-Type": "application/json",
                            "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            for start in range(0, len(body), 1 if trickle else len(body)):
                self.wfile.write(body[start:start + (1 if trickle else len(body))].encode())
                self.wfile.flush()
                time.sleep(trickle)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a trickle at its deadline, as the test meant it to

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.asked.append(("POST", self.path, None, self.headers.get("Idempotency-Key")))
        if self.path.endswith("/cancel"):
            return self.answer(self.cancel)
        self.answer(*(self.creates.pop(0) if self.creates else (201,)), trickle=self.trickle)

    def do_GET(self):
        query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        wait = int(query.get("wait", ["0"])[0])
        self.asked.append(("GET", self.path, wait, None))
        if self.reads:
            return self.answer(*self.reads.pop(0))
        time.sleep(wait + self.late if wait else 0)
        self.answer(200, body=self.read)

    def log_message(self, *args):
        pass


def serve_stand_in(creates=(), reads=(), cancel=200, late=0, trickle=0, pause=None):
    """A PausePointStandIn on loopback: (server, its URL, what it was asked); stop_http() it.
    `pause` changes what reads say of its one pause (its status, choice, message…)."""
    read = json.dumps({**json.loads(PausePointStandIn.pending), **(pause or {})})
    handler = type("StandIn", (PausePointStandIn,), {"creates": list(creates), "reads": list(reads),
                                                     "cancel": cancel, "asked": [], "late": late, "trickle": trickle,
                                                     "read": read})
    server, url = serve_http(handler)
    return server, url, handler.asked
