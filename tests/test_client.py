"""client/pausepoint_client.py against a live PausePoint on loopback, with a test key."""

import ast
import concurrent.futures
import contextlib
import http.server
import os
import re
import socket
import struct
import sys
import threading
import time

import pytest
import requests

from conftest import (QUESTION, answer_first_pending, reads_of_one_pause, register_over_http, ROOT, WIRE, LiveServer,
                      free_port, make_config, scraped, serving, stored, token_of, value, wait_until)
from stubs import serve_http, serve_stand_in, stop_http
import pausepoint

sys.path.insert(0, os.path.join(ROOT, "client"))
import pausepoint_client  # noqa: E402
from pausepoint_client import PausePoint  # noqa: E402

ASK = {key: WIRE[key] for key in ("recipient", "channel", "message", "options", "timeout_hours", "timeout_default")}


def test_every_public_class_and_function_is_exported():
    public = {name for name, value in vars(pausepoint_client).items() if not name.startswith("_")
              and getattr(value, "__module__", None) == pausepoint_client.__name__}
    assert sorted(public - set(pausepoint_client.__all__)) == [] and "verify_audit_export" in public


def register(url):
    return register_over_http(url, "client@example.com", "C")


@pytest.fixture
def client(live_server):
    return PausePoint(live_server.url, register(live_server.url)["test_api_key"], backoff=0.05)


@pytest.mark.parametrize("choice, approved", [("Approve", True), ("Reject", False)])
def test_request_approval_waits_for_the_persons_answer(live_server, client, choice, approved):
    person = answer_first_pending(live_server.url, client.api_key, choice, "checked the invoice")
    result = client.request_approval(**ASK)
    person.join()
    assert result.approved is approved and result.choice == choice and result.comment == "checked the invoice"
    assert result.decided_by == "recipient:+15550100" and not result.timed_out and not result.pending


def test_options_given_as_any_iterable_are_asked_and_read_the_same(live_server, client):
    """A generator is read once: the first option it gave is still the approving one, not a
    TypeError after the person was already asked."""
    person = answer_first_pending(live_server.url, client.api_key, "Approve")
    result = client.request_approval(**{**ASK, "options": (option for option in ["Approve", "Reject"])})
    person.join()
    assert result.approved and result.choice == "Approve"


def test_a_timeout_default_is_never_an_approval(client):
    result = client.request_approval(**{**ASK, "timeout_hours": 0.0003, "timeout_default": "Approve"})
    assert result.timed_out and result.choice == "Approve" and result.approved is False


def test_a_cancelled_pause_is_not_approved_and_cancelling_twice_is_harmless(client):
    created = client.pause(**ASK)
    assert client.cancel(created["pause_id"])["status"] == "cancelled"
    assert client.cancel(created["pause_id"])["status"] == "cancelled"          # a retried cancel
    assert pausepoint_client.Approval(client.get(created["pause_id"])).approved is False


def test_a_pending_pause_can_be_waited_for_again_later(live_server, client):
    created = client.pause(**ASK)
    started = time.monotonic()
    assert client.wait(created["pause_id"], timeout=1)["status"] == "pending"
    assert time.monotonic() - started < 5
    person = answer_first_pending(live_server.url, client.api_key, "Approve")
    assert client.wait(created["pause_id"])["choice"] == "Approve"
    person.join()


def test_a_wait_that_runs_out_asks_the_server_once_a_wait_not_hundreds_of_times(metered_server):
    """The server waits whole seconds: a wait with a fraction of a second left must not
    become a stream of answers-at-once (400 calls in half a second, counted before)."""
    client = PausePoint(metered_server.url, register(metered_server.url)["test_api_key"])
    created = client.pause(**ASK)
    for timeout, calls in ((0.4, 1), (1.6, 2)):
        before, started = reads_of_one_pause(metered_server.url), time.monotonic()
        assert client.wait(created["pause_id"], timeout=timeout)["status"] == "pending"
        assert time.monotonic() - started >= timeout
        assert reads_of_one_pause(metered_server.url) - before == calls


def test_a_server_that_answers_waits_at_once_is_not_asked_again_at_once(metered_server):
    """A stopping server answers each long poll at once, as things stand, until it closes."""
    client = PausePoint(metered_server.url, register(metered_server.url)["test_api_key"])
    created = client.pause(**ASK)
    metered_server.app.runtime.stop()           # its requests are still answered meanwhile
    before = reads_of_one_pause(metered_server.url)
    assert client.wait(created["pause_id"], timeout=2)["status"] == "pending"
    assert reads_of_one_pause(metered_server.url) - before <= 6


def test_no_wait_asks_past_its_deadline_or_retries_past_it(live_server, client):
    created = client.pause(**ASK)
    started = time.monotonic()
    assert client.get(created["pause_id"], wait=30, deadline=started + 0.6)["status"] == "pending"
    assert time.monotonic() - started < 10          # the server was asked to wait 1 s, not 30
    nowhere = PausePoint(f"http://127.0.0.1:{free_port()}", client.api_key)     # retries 6 times, 31 s in all
    started = time.monotonic()
    with pytest.raises(pausepoint_client.Unreachable):
        nowhere.wait(created["pause_id"], timeout=0.5)                      # its last look, at the deadline
    assert time.monotonic() - started < 10


def test_waiting_comes_back_when_told_while_the_server_has_as_many_waiting_as_it_takes(tmp_path):
    config = make_config(tmp_path, **{"server.waiting_per_developer": 1, "ratelimit.enabled": False})
    app = pausepoint.create_app(config)
    app.runtime.start()
    with LiveServer(app, config) as server:
        client = PausePoint(server.url, register(server.url)["test_api_key"], backoff=0.05)
        first, second = client.pause(**ASK), client.pause(**ASK)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(client.wait, first["pause_id"])
            wait_until(lambda: app.runtime.waiting.count == 1)
            told = pool.submit(client.wait, second["pause_id"])
            with pytest.raises(pausepoint_client.RateLimited) as refused:
                PausePoint(server.url, client.api_key, retries=0).get(second["pause_id"], wait=30)     # what told() hears
            assert refused.value.retry_after == 5
            started = time.monotonic()
            assert client.wait(second["pause_id"], timeout=2)["status"] == "pending"
            # Its own deadline, though told to come back in 5 s; and not at once, which makes a caller spin.
            assert 1.9 <= time.monotonic() - started < 4
            requests.post(f"{server.url}/v1/respond/{token_of(second['respond_url'])}", json={"choice": "Approve"})
            assert told.result(timeout=30)["status"] == "responded"
            requests.post(f"{server.url}/v1/respond/{token_of(first['respond_url'])}", json={"choice": "Reject"})
            assert waiting.result(timeout=30)["status"] == "responded"


def test_waiting_rides_out_a_server_restart(spawn_server, tmp_path):
    """However long the restart takes: here longer than the client's retries of one call."""
    port = free_port()
    server = spawn_server(port=port)
    key = register(server.url)["test_api_key"]
    client = PausePoint(server.url, key, retries=1, backoff=0.05)
    created = client.pause(**ASK)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.wait, created["pause_id"])
        time.sleep(0.5)                            # the client is in a long poll now
        server.stop()
        time.sleep(1)                              # its call's one retry, 0.05 s later, found nobody
        server = spawn_server(port=port)           # the same database, the same address
        requests.post(f"{server.url}/v1/respond/{token_of(created['respond_url'])}", json={"choice": "Reject"})
        assert waiting.result(timeout=60)["choice"] == "Reject"


def whole_request(conn):
    """One HTTP request with a Content-Length body, read in full from `conn`."""
    def more():
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("the client hung up mid-request")
        return chunk
    data = b""
    while b"\r\n\r\n" not in data:
        data += more()
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        body += more()
    return head + b"\r\n\r\n" + body


class DropFirstAnswer:
    """A TCP proxy to `target_port` that passes the first connection's request on, then
    resets that connection as the answer arrives: the server acted, the client cannot
    know. Later connections are relayed whole."""

    def __init__(self, target_port):
        self.target_port, self.dropped = target_port, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            if not self.dropped.is_set():
                self.dropped.set()
                threading.Thread(target=self._drop, args=(conn, upstream), daemon=True).start()
                continue
            for source, sink in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _drop(conn, upstream):
        with conn, upstream:
            upstream.sendall(whole_request(conn))   # all of it, however it arrives: the server must act on it
            upstream.recv(65536)                    # the answer begins: the pause exists
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # close with a reset

    @staticmethod
    def _pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.listener.close()


def test_a_create_retried_after_a_lost_answer_asks_the_person_once(live_server, stubs):
    key = register(live_server.url)["test_api_key"]
    proxy = stubs(DropFirstAnswer, int(live_server.url.rsplit(":", 1)[1]))
    created = PausePoint(proxy.url, key, backoff=0.05).pause(**ASK)
    assert proxy.dropped.is_set()
    config = live_server.app.runtime.config
    assert stored(config, "SELECT id FROM pauses") == [(created["pause_id"],)]
    assert stored(config, "SELECT count(*) FROM notifications") == [(1,)]


def test_refusals_are_typed_and_carry_the_servers_words(live_server, client):
    with pytest.raises(pausepoint_client.InvalidRequest) as refused:
        client.pause(**{**ASK, "options": ["Only one"]})
    assert refused.value.status == 422 and refused.value.field == "options" and "options" in refused.value.message
    with pytest.raises(pausepoint_client.Unauthorized) as unauthorized:
        PausePoint(live_server.url, "pp_test_not_a_key").get("psr_x")
    assert unauthorized.value.code == "unauthorized"
    with pytest.raises(pausepoint_client.NotFound):
        client.get("psr_nothing_here")


@pytest.mark.parametrize("settings, code", [({"pauses.max_test_pending": 1}, "too_many_pending"),
                                            ({"database.min_free_mb": 2**40}, "storage_low")])
def test_a_refusal_that_will_not_clear_in_seconds_is_not_asked_again(tmp_path, first_start, settings, code):
    """Unlike a rate limit's 429, which says when to come back: retried, the hook would outlast its 60 s."""
    with serving(tmp_path, first_start, **{"metrics.enabled": True, "metrics.listen": ""}, **settings) as server:
        keys = pausepoint.register_developer(server.app.runtime.db(), server.app.runtime.config, "c@example.com", "C",
                                             "correct horse battery")
        client = PausePoint(server.url, keys["test_api_key"], backoff=0.01)
        made = 0 if code == "storage_low" else len([client.pause(**ASK)])
        with pytest.raises(pausepoint_client.PausePointError) as refused:
            client.pause(**ASK)
        assert refused.value.code == code
        posts = value(scraped(requests.get(f"{server.url}/metrics", timeout=10).text), "pausepoint_request_seconds_count",
                      method="POST", route="/v1/pause")
        assert posts == made + 1


@pytest.mark.parametrize("answers, posts, refused", [
    ([(429, "rate_limited", {"Retry-After": "1"})], 2, None),      # a rate limit says when
    ([(503, "busy", {})], 2, None),
    ([(429, "rate_limited", {"Retry-After": "3600"})], 1, "rate_limited"),          # longer than a wait between tries
    ([(429, "quota_exceeded", {})], 1, "quota_exceeded"),
    ([(507, "storage_low", {"Retry-After": "60"})], 1, "storage_low")])
def test_a_create_is_tried_again_only_when_trying_again_can_work(answers, posts, refused):
    """Against a stand-in answering as a server does, one answer to each POST in turn."""
    server, url, asked = serve_stand_in(answers)
    try:
        client = PausePoint(url, "pp_test_x", backoff=0.01)
        if refused is None:
            assert client.pause(**ASK)["pause_id"] == "psr_1"
        else:
            with pytest.raises(pausepoint_client.PausePointError) as error:
                client.pause(**ASK)
            assert error.value.code == refused
        keys = [key for method, _, _, key in asked]
        assert len(keys) == posts and len(set(keys)) == 1          # one Idempotency-Key throughout
    finally:
        stop_http(server)


class AnswersInTurn(http.server.BaseHTTPRequestHandler):
    """Something at the server's address answering each request with the next of `answers`
    (status, headers, body bytes), and noting what it was sent; holding the connection open
    `held_for` seconds after each answer, then noting "closed"."""
    answers, seen, held_for = [], [], 0

    def do_GET(self):
        self.seen.append((self.command, self.path, self.headers.get("Authorization")))
        status, headers, body = self.answers.pop(0) if self.answers else (200, {}, b"{}")
        self.send_response(status)
        for name, text in {"Content-Length": str(len(body)), **headers}.items():
            if text is not None:                    # None: not sent
                self.send_header(name, text)
        self.end_headers()
        self.wfile.write(body)
        if self.held_for:
            self.wfile.flush()
            time.sleep(self.held_for)
            self.seen.append("closed")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.do_GET()

    def log_message(self, *args):
        pass


def answering(*answers, held_for=0):
    """(server, its URL, what it was sent) for an AnswersInTurn with these answers; stop_http() it."""
    handler = type("Answers", (AnswersInTurn,), {"answers": list(answers), "seen": [], "held_for": held_for})
    server, url = serve_http(handler)
    return server, url, handler.seen


def test_a_redirect_is_refused_and_the_key_never_follows_it():
    elsewhere, elsewhere_url, reached = answering((200, {}, b'{"pause_id": "psr_1", "status": "responded"}'))
    server, url, seen = answering((302, {"Location": elsewhere_url + "/v1/pause"}, b""))
    try:
        with pytest.raises(pausepoint_client.PausePointError) as refused:
            PausePoint(url, "pp_test_secret", backoff=0.01).pause(**ASK)
    finally:
        stop_http(server)
        stop_http(elsewhere)
    assert refused.value.code == "redirect" and elsewhere_url in refused.value.message
    assert [what[0] for what in seen] == ["POST"] and reached == []


@pytest.mark.parametrize("body, retry_after, kind, tries", [
    (b'{"error": "Unauthorized"}', None, "Unauthorized", 1),        # a proxy's own shape
    (b'{"error": null}', None, "ServerError", 2),
    (b'["error"]', None, "ServerError", 2),
    (b"<html>Bad gateway</html>", "\u00b2", "ServerError", 2),    # superscript two: a digit to str.isdigit()
    (b"<html>Bad gateway</html>", "9" * 5000, "ServerError", 2),   # more digits than int() reads
], ids=["error a string", "error null", "a list", "html and a retry-after of no ascii digits",
        "html and a retry-after of thousands of digits"])
def test_an_answer_in_any_other_shape_is_still_a_typed_error(body, retry_after, kind, tries):
    status = 401 if kind == "Unauthorized" else 503
    headers = {"Retry-After": retry_after} if retry_after else {}      # sent as Latin-1, as HTTP headers are
    server, url, seen = answering(*[(status, headers, body)] * tries)
    try:
        with pytest.raises(getattr(pausepoint_client, kind)) as refused:
            PausePoint(url, "pp_test_x", retries=tries - 1, backoff=0.01).get("psr_1")
    finally:
        stop_http(server)
    assert refused.value.status == status and refused.value.retry_after is None and len(seen) == tries


@pytest.mark.parametrize("body", [b"<html>Sign in to the hotel wifi</html>", b"[1, 2]", b"null", b""],
                         ids=["html", "a list", "null", "nothing"])
def test_a_success_that_is_no_pausepoint_answer_is_said_to_be_none(body):
    server, url, seen = answering((200, {}, body))
    try:
        with pytest.raises(pausepoint_client.PausePointError) as refused:
            PausePoint(url, "pp_test_x").wait("psr_1", timeout=5)
    finally:
        stop_http(server)
    assert refused.value.code == "bad_answer" and url in refused.value.message


@pytest.mark.parametrize("length", [2**20, None], ids=["its length said", "not said"])
def test_an_answer_too_large_to_be_one_is_not_read_whole(length):
    """A JSON object with more spaces after it than any answer holds, and then nothing more
    while the connection stays open: one saying it is longer still is not read at all, one
    that does not say is read one byte past the most, and the client is done while the
    server still holds the connection. Read whole, either would be read to the connection's
    end; a hostile or mistaken server could send gigabytes so."""
    body = b'{"pause_id": "psr_1", "status": "pending"}' + b" " * pausepoint_client.MAX_ANSWER_BYTES
    said = {"Content-Length": str(len(body) + length) if length else None}
    server, url, seen = answering((200, said, body), held_for=15)
    try:
        with pytest.raises(pausepoint_client.PausePointError) as refused:
            PausePoint(url, "pp_test_x", timeout=30, retries=0).get("psr_1")
        assert "closed" not in seen
    finally:
        stop_http(server)
    assert refused.value.code == "bad_answer" and "16,777,216 bytes" in refused.value.message


def test_an_answer_sent_a_byte_at_a_time_is_given_up_on_within_the_calls_time():
    """Each byte comes well within the socket's timeout, so only a limit on the whole answer
    ends the call: the create's deadline holds, the same Idempotency-Key on each try."""
    server, url, asked = serve_stand_in(trickle=0.5)         # a 201 of some 200 bytes, over 100 s
    started = time.monotonic()
    try:
        with pytest.raises(pausepoint_client.Unreachable) as gave_up:
            PausePoint(url, "pp_test_x", timeout=1, backoff=0.05).pause(**ASK, deadline=started + 2.5)
    finally:
        stop_http(server)
    assert time.monotonic() - started < 5 and "not answered in full within 1 s" in gave_up.value.message
    assert len(asked) >= 2 and len({key for _, _, _, key in asked}) == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_server_on_this_machine_is_called_directly_not_through_a_proxy(live_server, monkeypatch, host):
    """A proxy named for plain HTTP would be sent the key in the clear, and answer for the server."""
    key = register(live_server.url)["test_api_key"]
    proxy, proxy_url, seen = answering((200, {}, b'{"pause_id": "psr_1", "status": "responded"}'))
    monkeypatch.setenv("http_proxy", proxy_url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    try:
        url = live_server.url.replace("127.0.0.1", host)
        created = PausePoint(url, key, retries=0).pause(**ASK)
    finally:
        stop_http(proxy)
    assert created["status"] == "pending" and seen == []


def test_a_choice_is_an_approval_only_if_it_is_the_first_option_asked_with():
    """An answer listing the options in another order (a server that is not ours, something in
    between) would otherwise make its first, here Reject, the approval."""
    reordered = b'{"pause_id": "psr_1", "status": "responded", "choice": "Reject", "options": ["Reject", "Approve"]}'
    server, url, seen = answering((201, {}, b'{"pause_id": "psr_1", "status": "pending"}'), (200, {}, reordered))
    try:
        result = PausePoint(url, "pp_test_x").request_approval(**ASK)
    finally:
        stop_http(server)
    assert result.choice == "Reject" and not result.approved


def test_an_answer_about_another_pause_never_decides_the_one_waited_for():
    other = b'{"pause_id": "psr_2", "status": "responded", "choice": "Approve", "options": ["Approve", "Reject"]}'
    server, url, seen = answering((200, {}, b'{"pause_id": "psr_1", "status": "pending"}'), (200, {}, other))
    try:
        with pytest.raises(pausepoint_client.PausePointError) as refused:
            PausePoint(url, "pp_test_x").request_approval(**ASK)
    finally:
        stop_http(server)
    assert refused.value.code == "bad_answer" and "'psr_2'" in refused.value.message
    assert [what[0] for what in seen] == ["POST", "GET"]


@pytest.mark.parametrize("url", ["http//127.0.0.1:8080", "127.0.0.1:8080", "ftp://127.0.0.1", "http://:8080",
                                 "http://127.0.0.1:8080/?x=1", "http://127.0.0.1:8080?", "http://127.0.0.1:8080#"])
def test_an_address_that_is_no_http_url_is_refused_when_the_client_is_made(url):
    with pytest.raises(ValueError, match="http:// or https:// URL"):
        PausePoint(url, "pp_test_x")


def test_the_event_feed_and_the_audit_log(client):
    created = client.pause(**ASK)
    client.cancel(created["pause_id"])
    feed = client.events(wait=0)
    assert [next(feed)["type"], next(feed)["type"]] == ["pause.created", "pause.cancelled"]
    assert [e["event_type"] for e in client.audit(pause_id=created["pause_id"])["events"]][0] == "pause.cancelled"


FIRST_EVENT = (200, {}, b'{"events": [{"id": "evt_1", "type": "pause.created"}]}')


@pytest.mark.parametrize("wait", [30, 0])
def test_a_feed_answered_at_once_with_nothing_is_not_asked_again_at_once(wait):
    """A stopping server answers each long poll at once, as things stand, until it closes;
    with no wait asked, an empty feed is not asked again at once either."""
    server, url, seen = answering(*[(200, {}, b'{"events": []}')] * 3, FIRST_EVENT)
    try:
        started = time.monotonic()
        assert next(PausePoint(url, "pp_test_x", backoff=0.2).events(wait=wait))["id"] == "evt_1"
    finally:
        stop_http(server)
    assert time.monotonic() - started >= 0.5 and len(seen) == 4


def test_a_feed_asked_to_wait_longer_than_the_server_does_asks_for_the_longest_it_does():
    server, url, seen = answering(FIRST_EVENT)
    try:
        assert next(PausePoint(url, "pp_test_x").events(wait=90))["id"] == "evt_1"
    finally:
        stop_http(server)
    assert [path for _, path, _ in seen] == ["/v1/events?limit=100&wait=60"]


@pytest.mark.parametrize("body", [b'{"pause_id": "psr_1"}', b'[{"id": "evt_1"}]'], ids=["object", "list"])
def test_an_answer_without_a_list_of_events_is_said_to_be_none(body):
    server, url, seen = answering((200, {}, body))
    try:
        with pytest.raises(pausepoint_client.PausePointError) as refused:
            next(PausePoint(url, "pp_test_x").events())
    finally:
        stop_http(server)
    assert refused.value.code == "bad_answer"


def test_reading_the_feed_rides_out_a_server_restart(spawn_server):
    """However long the restart takes: here longer than the client's retries of one call."""
    port = free_port()
    server = spawn_server(port=port)
    client = PausePoint(server.url, register(server.url)["test_api_key"], retries=1, backoff=0.05)
    created = client.pause(**ASK)
    feed = client.events(after=next(client.events(wait=0))["id"])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reading = pool.submit(next, feed)
        time.sleep(0.5)                            # the client is in a long poll now
        server.stop()
        time.sleep(1)                              # its call's one retry, 0.05 s later, found nobody
        server = spawn_server(port=port)           # the same database, the same address
        client.cancel(created["pause_id"])
        assert reading.result(timeout=60)["type"] == "pause.cancelled"


@pytest.mark.parametrize("answers, kind", [
    ([(503, {}, b"{}")] * 3, None),
    ([(429, {"Retry-After": "1"}, b'{"error": {"code": "too_many_waiting"}}')] * 2, None),
    ([(507, {"Retry-After": "60"}, b'{"error": {"code": "storage_low"}}')], "ServerError"),
    ([(401, {}, b'{"error": {"code": "unauthorized"}}')], "Unauthorized"),
    ([(404, {}, b'{"error": {"code": "not_found", "field": "after"}}')], "NotFound"),
], ids=["a server fault", "all waiting places taken", "a full disk", "a rotated key", "an after gone"])
def test_a_feed_reader_tries_again_only_when_trying_again_can_work(answers, kind):
    server, url, seen = answering(*answers, FIRST_EVENT)
    try:
        feed = PausePoint(url, "pp_test_x", retries=0, backoff=0.01).events(after="evt_0")
        if kind is None:
            assert next(feed)["id"] == "evt_1"
        else:
            with pytest.raises(getattr(pausepoint_client, kind)):
                next(feed)
    finally:
        stop_http(server)
    assert len(seen) == (len(answers) + 1 if kind is None else 1)


def test_verify_webhook_accepts_what_the_server_signs_and_nothing_else():
    body, now = b'{"id": "evt_1"}', int(time.time())
    header = pausepoint.signature_header(["whsec_new_secret_000", "whsec_old_secret_000"], now, body)
    assert pausepoint_client.verify_webhook("whsec_old_secret_000", header, body)
    assert pausepoint_client.verify_webhook("whsec_new_secret_000", header, body.decode())
    assert not pausepoint_client.verify_webhook("whsec_new_secret_000", header, body + b" ")
    assert not pausepoint_client.verify_webhook("whsec_wrong_secret_0", header, body)
    stale = pausepoint.signature_header(["whsec_new_secret_000"], now - 301, body)
    assert not pausepoint_client.verify_webhook("whsec_new_secret_000", stale, body)


@pytest.mark.parametrize("header", ["t=\u00b2,v1=00", "t=\u0661\u0662,v1=00", "t=,v1=00", ""])
def test_verify_webhook_refuses_a_header_with_an_odd_timestamp_rather_than_raising(header):
    assert pausepoint_client.verify_webhook("whsec_new_secret_000", header, b"{}") is False


def test_verify_webhook_refuses_a_signature_that_is_not_ascii_rather_than_raising():
    assert pausepoint_client.verify_webhook("whsec_new_secret_000", f"t={int(time.time())},v1=\u00e9", b"{}") is False


def test_the_client_needs_only_the_standard_library():
    with open(pausepoint_client.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= set(sys.stdlib_module_names)


def test_an_approval_carries_the_values_as_the_approver_left_them(live_server, client):
    fields = {"amount": {"type": "number", "value": 340, "max": 500, "editable": True}}
    created = client.pause(**ASK, fields=fields)
    requests.post(f"{live_server.url}/v1/respond/{token_of(created['respond_url'])}",
                  json={"choice": "Approve", "fields": {"amount": 300}}).raise_for_status()
    result = pausepoint_client.Approval(client.wait(created["pause_id"]))
    assert result.approved and result.values == {"amount": 300} and result.edited == {"amount": {"old": 340, "new": 300}}


def test_a_team_is_asked_and_its_votes_come_back_with_the_approval(live_server, client):
    team = [{"recipient": "+15550101", "channel": "sms"}, {"recipient": "+15550102", "channel": "sms"}]
    created = client.pause(**QUESTION, recipients=team, quorum={"choice": "Approve", "count": 2})
    for person in created["recipients"]:
        requests.post(f"{live_server.url}/v1/respond/{token_of(person['respond_url'])}",
                      json={"choice": "Approve"}).raise_for_status()
    result = pausepoint_client.Approval(client.wait(created["pause_id"]))
    assert result.approved and [vote["recipient"] for vote in result.votes] == ["+15550101", "+15550102"]


def test_an_address_holding_a_password_is_refused_without_quoting_it_or_looking_it_up():
    """urllib would ask the resolver for 'user:password@host' as a name, and its error would quote it."""
    with pytest.raises(ValueError) as refused:
        PausePoint("http://operator:hunter2-secret@127.0.0.1:8080", "pp_test_x")
    assert "hunter2" not in str(refused.value) and "user name or password" in str(refused.value)


def test_no_answer_at_all_is_told_without_a_made_up_status():
    """A refused connection has no HTTP status: its message starts with what happened, not with "0"."""
    nowhere = PausePoint(f"http://127.0.0.1:{free_port()}", "pp_test_x", retries=0)
    with pytest.raises(pausepoint_client.Unreachable) as gave_up:
        nowhere.get("psr_x")
    assert gave_up.value.status == 0
    assert str(gave_up.value).startswith(f"unreachable: no answer from {nowhere.base_url}: "), gave_up.value


def test_the_readmes_example_runs_as_written(live_server, capsys, monkeypatch):
    """The README's "From Python" example, with the Quickstart's test key in PP_KEY and the
    server's address for the README's: a person's Approve is what sends the wire."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        example = re.search(r"```python\n(import os\nfrom pausepoint_client import PausePoint\n.*?)```", f.read(),
                            re.S).group(1)
    key = register(live_server.url)["test_api_key"]
    monkeypatch.setenv("PP_KEY", key)
    person = answer_first_pending(live_server.url, key, "Approve")
    exec(compile(example.replace("http://127.0.0.1:8080", live_server.url), "README example", "exec"), {})
    person.join()
    assert capsys.readouterr().out == "wiring $340 to Acme Corp\n"
