"""Attacks on the server itself, each against a real `python pausepoint.py` process:
slow and idle connections, floods that fill the log, oversized uploads, and
requests waitress refuses before the app sees them."""

import concurrent.futures
import contextlib
import ctypes
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import ROOT, WIRE, cannot_run_here, free_port, process_env, start_server, token_of, wait_until

ATTACKER = "127.0.0.2"          # one address for the attack; the well-behaved client stays on 127.0.0.1


@pytest.fixture(autouse=True)
def enough_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def settings(**values):
    """PAUSEPOINT_* environment variables for a spawned server."""
    return {f"PAUSEPOINT_{key.replace('.', '_').upper()}": str(value) for key, value in values.items()}


def connect_from(address, port, first_bytes=b"", receive_buffer=None):
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)    # before connecting: a small window
    sock.bind((address, 0))
    sock.connect(("127.0.0.1", port))
    if first_bytes:
        sock.sendall(first_bytes)
    return sock


def port_of(server):
    return int(server.url.rsplit(":", 1)[1])


def closed_by_server(sock):
    """True once the server has closed this connection, after whatever it said first
    (a 503 to a client over its address's share): what is buffered is read, without blocking."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def read_to_the_end(sock, within):
    """Read until the server closes the connection (True), or for `within` seconds (False)."""
    deadline = time.monotonic() + within
    sock.setblocking(True)
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(65536):
                return True
        return False
    except TimeoutError:
        return False
    except OSError:
        return True                             # reset: closed all the same


def still_serves_others(server, within=5):
    """Health, a create and a respond from a well-behaved client, each within `within` seconds."""
    assert requests.get(f"{server.url}/healthz", timeout=within).status_code == 200
    keys = requests.post(f"{server.url}/v1/auth/register", timeout=within,
                         json={"email": f"ok{time.monotonic_ns()}@example.com", "name": "OK", "password": "password123"})
    auth = {"Authorization": f"Bearer {keys.json()['test_api_key']}"}
    created = requests.post(f"{server.url}/v1/pause", json=WIRE, headers=auth, timeout=within)
    assert created.status_code == 201
    answered = requests.post(f"{server.url}/v1/respond/{token_of(created.json()['respond_url'])}",
                             json={"choice": "Approve"}, timeout=within)
    assert answered.status_code == 200


def test_two_thousand_trickling_connections_from_one_address_leave_others_served(spawn_server):
    # 600 threads and 2,000 sockets: descriptors far above 1023, where select() gives up.
    server = spawn_server(env=settings(**{"server.threads": 600}))
    attack = [connect_from(ATTACKER, port_of(server), b"GET / HTTP/1.1\r\n") for _ in range(2000)]
    try:
        still_serves_others(server)
        for sock in attack:                            # the next header line, as a slow client sends them
            if not closed_by_server(sock):
                with contextlib.suppress(OSError):
                    sock.send(b"X-Slow: 1\r\n")
        still_serves_others(server)
        held = wait_until(lambda: (n := sum(not closed_by_server(s) for s in attack)) <= 64 and n)
        assert held == 64                              # server.connections_per_ip
        assert server.proc.poll() is None
    finally:
        for sock in attack:
            sock.close()


def test_a_request_whose_headers_or_body_trickle_is_dropped_at_its_deadline(spawn_server):
    server = spawn_server(env=settings(**{"server.header_timeout": 1, "server.body_timeout": 1}))
    headers = connect_from(ATTACKER, port_of(server), b"GET /healthz HTTP/1.1\r\n")
    body = connect_from(ATTACKER, port_of(server), b"POST /v1/auth/register HTTP/1.1\r\nHost: x\r\n"
                                                   b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    started = time.monotonic()
    while not (closed_by_server(headers) and closed_by_server(body)):
        assert time.monotonic() - started < 6, "a trickling request outlived its deadline"
        for sock in (headers, body):
            if not closed_by_server(sock):
                sock.send(b"X-Slow: 1\r\n" if sock is headers else b" ")
        time.sleep(0.3)
    headers.close()
    body.close()
    still_serves_others(server)


def test_near_the_connection_limit_idle_connections_make_room_for_new_clients(spawn_server):
    server = spawn_server(env=settings(**{"server.connection_limit": 100}))
    idle = [connect_from(f"127.0.1.{n % 20 + 1}", port_of(server)) for n in range(150)]   # 20 addresses, 7-8 each
    try:
        still_serves_others(server)
        assert sum(not closed_by_server(sock) for sock in idle) <= 90
        log = server.output()
        assert log.count("connection_limit (100) reached") <= 1 and "listening again" not in log
    finally:
        for sock in idle:
            sock.close()


def test_a_queue_for_threads_logs_one_line_not_one_per_request(spawn_server):
    # Each request hashes a password for ~15 ms: 40 clients keep the address's 4 threads busy and the rest queued.
    server = spawn_server(env=settings(**{"server.threads": 12, "security.bcrypt_rounds": 8,
                                          "ratelimit.enabled": "false"}))

    requests.post(f"{server.url}/v1/auth/register",
                  json={"email": "q@example.com", "name": "Q", "password": "password123"}).raise_for_status()

    def rotate(_):
        return requests.post(f"{server.url}/v1/auth/keys/rotate", timeout=60,
                             json={"email": "q@example.com", "password": "wrong password", "key": "live"}).status_code

    with concurrent.futures.ThreadPoolExecutor(40) as pool:     # fewer than the address may have waiting
        assert set(pool.map(rotate, range(80))) == {401}
    log = server.output()
    assert "Task queue depth" not in log
    assert log.count("waited for a free thread") == 1     # the first; the next folds a minute's worth into one


def raw_request(server, data, read_timeout=5):
    """Send bytes as they are; return (status, headers, body) of the answer."""
    sock = connect_from("127.0.0.1", port_of(server))
    sock.settimeout(read_timeout)
    try:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < content_length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def content_length(answer):
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    """One server with the default settings for the tests of single refused requests,
    which change nothing that another such test could see."""
    server = start_server(tmp_path_factory.mktemp("plain") / "pausepoint.db")
    yield server
    server.stop()


def assert_error_shape(headers, body, status, code):
    assert headers["Content-Type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"], (status, error)


def test_an_oversized_upload_is_refused_from_its_declared_size_before_it_is_sent(plain_server):
    status, headers, body = raw_request(plain_server, b"POST /v1/auth/register HTTP/1.1\r\nHost: x\r\n"
                                                      b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
    assert status == 413
    assert_error_shape(headers, body, 413, "payload_too_large")
    assert "65536 bytes" in json.loads(body)["error"]["message"]


def test_a_chunked_upload_is_refused_once_it_passes_the_limit(plain_server):
    chunk = b"%x\r\n%s\r\n" % (16384, b" " * 16384)
    status, headers, body = raw_request(plain_server, b"POST /v1/auth/register HTTP/1.1\r\nHost: x\r\n"
                                                      b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                                                      + chunk * 5)
    assert status == 413
    assert_error_shape(headers, body, 413, "payload_too_large")


@pytest.mark.parametrize("request_bytes, status, code", [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"POST /v1/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "bad_request"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "bad_request"),
    (b"POST /v1/pause HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "not_implemented"),
])
def test_errors_waitress_answers_itself_use_the_json_error_shape(plain_server, request_bytes, status, code):
    got, headers, body = raw_request(plain_server, request_bytes)
    assert got == status
    assert_error_shape(headers, body, status, code)


# waitress joins a repeated header by copying all of it so far, on the loop that serves every
# connection: 65,000 empty ones (260 KB) cost it 189 ms, and a few senders held /healthz 25 s.
@pytest.mark.parametrize("extra_lines, size, status", [
    (98, 0, 200), (99, 0, 431), (0, 32_768, 200), (0, 32_769, 431)])
def test_a_request_may_have_100_header_lines_and_32_kb_of_headers(plain_server, extra_lines, size, status):
    """`size`: the whole request line and headers, the blank line after them included."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"A:\r\n" * extra_lines
    if size:
        head += b"X-Big: " + b"a" * (size - len(head) - len(b"X-Big: \r\n\r\n")) + b"\r\n"
    request_bytes = head + b"\r\n"
    assert not size or len(request_bytes) == size
    got, headers, body = raw_request(plain_server, request_bytes)
    assert got == status
    if status == 431:
        assert_error_shape(headers, body, 431, "headers_too_large")
        assert "at most 32768 bytes in 100 lines" in json.loads(body)["error"]["message"]


def test_clients_that_pipeline_requests_and_never_read_hold_no_thread(spawn_server):
    server = spawn_server(env=settings(**{"server.threads": 12, "server.send_timeout": 3}))
    keys = requests.post(f"{server.url}/v1/auth/register",
                         json={"email": "slow@example.com", "name": "S", "password": "password123"}).json()
    auth = f"Bearer {keys['test_api_key']}"
    for _ in range(100):                        # ~17 KB of JSON each: a page of 100 is ~1.7 MB
        requests.post(f"{server.url}/v1/pause", json={**WIRE, "metadata": {"x": "😀" * 4000}},
                      headers={"Authorization": auth}).raise_for_status()
    page = f"GET /v1/pause?limit=100 HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n".encode()
    readers = []
    for _ in range(12):                         # as many connections as threads, 12 answers asked of each: 20 MB,
                                                # past the 16 MB waitress buffers before it makes a thread wait
        readers.append(connect_from(ATTACKER, port_of(server), page * 12, receive_buffer=4096))
    try:
        time.sleep(2)                               # long enough to pin every thread, were that possible
        still_serves_others(server, within=2)       # sooner than server.send_timeout: no thread waits on them
        # Each was answered once and closed: read now, its one answer ends in EOF.
        assert all(read_to_the_end(sock, within=10) for sock in readers)
    finally:
        for sock in readers:
            sock.close()


def test_a_client_reading_a_long_export_steadily_gets_all_of_it(spawn_server):
    """server.send_timeout is for clients that stop reading: one taking an 8 MB export at
    1 MB/s, four times the timeout and past what the socket buffers hold, is not cut off.
    (At 2 MB/s a 1 s timeout cut it off on a loaded machine, where this process or the
    server's I/O loop can stall for a second; a 2 s one no longer told a server that never
    sets its clock back apart, as the kernel's buffers leave the answer's queue empty.)"""
    server = spawn_server(env=settings(**{"server.send_timeout": 2}))
    keys = requests.post(f"{server.url}/v1/auth/register",
                         json={"email": "export@example.com", "name": "E", "password": "password123"}).json()
    auth = f"Bearer {keys['test_api_key']}"
    for _ in range(250):                        # a pause.created event of ~32 KB each in the export
        requests.post(f"{server.url}/v1/pause", json={**WIRE, "metadata": {"x": "v" * 15_000}},
                      headers={"Authorization": auth}).raise_for_status()
    sock = connect_from(ATTACKER, port_of(server), f"GET /v1/audit/export HTTP/1.1\r\nHost: x\r\n"
                        f"Authorization: {auth}\r\nConnection: close\r\n\r\n".encode(), receive_buffer=4096)
    got, started = bytearray(), time.monotonic()
    with sock:
        sock.settimeout(10)
        while data := sock.recv(16384):
            got += data
            time.sleep(len(data) / 1_000_000)
    assert time.monotonic() - started > 6       # well past server.send_timeout, reading all along
    assert got.endswith(b"\r\n0\r\n\r\n")         # the last chunk: the answer is whole
    assert got.count(b'"event_type":"pause.created"') == 250


def test_a_client_asking_to_upload_too_much_is_told_no_before_it_sends_anything(plain_server):
    status, headers, body = raw_request(plain_server, b"POST /v1/auth/register HTTP/1.1\r\nHost: x\r\n"
                                                      b"Expect: 100-continue\r\nContent-Type: application/json\r\n"
                                                      b"Content-Length: 1000000000\r\n\r\n")
    assert status == 413                        # not "100 Continue", which would invite the upload
    assert_error_shape(headers, body, 413, "payload_too_large")


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /respond/some-token HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n", 413),
    (b"GET /respond/some-token HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", 431),
], ids=["body too large", "headers too large"])
def test_a_person_gets_waitress_refusals_as_a_page(plain_server, request_bytes, status):
    got, headers, body = raw_request(plain_server, request_bytes)
    assert got == status and headers["Content-Type"].startswith("text/html")
    assert headers["X-Frame-Options"] == "DENY"
    if status == 413:
        assert b"65536 bytes" in body



def test_a_cookie_header_built_to_be_slow_to_read_is_read_at_once(spawn_server):
    """Python's own cookie parser takes time quadratic in a quoted value's backslashes before
    3.11.10: a 200 KB header like this one, as an operator may allow, took it about a minute,
    a thread and a core."""
    server = spawn_server(env=settings(**{"server.max_header_bytes": 262_144}))
    token = "f" * 43
    cookie = 'pp_other="' + "\\0" * 100_000 + f'"; pp_form={token}'
    page = requests.get(f"{server.url}/dashboard/login", headers={"Cookie": cookie}, timeout=10)
    # The form token it was sent, past the other cookie, is the one the page asks to be posted back.
    assert page.status_code == 200 and f'name="csrf" value="{token}"' in page.text

def test_requests_waiting_for_a_thread_count_toward_the_addresses_share(spawn_server):
    server = spawn_server(env=settings(**{"server.threads": 12, "security.bcrypt_rounds": 11,
                                          "ratelimit.enabled": "false"}))
    body = b'{"email": "n@example.com", "password": "password1", "key": "live"}'
    rotate = (b"POST /v1/auth/keys/rotate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    flood = [connect_from(ATTACKER, port_of(server), rotate) for _ in range(150)]   # each hashes for ~120 ms
    try:
        time.sleep(0.5)                         # read by now; its threads take seconds to work through the rest
        still_serves_others(server)
        answers = {}

        def refusals():                         # sent at the server's once-a-second shedding; the rest still wait
            for sock in flood:
                if sock not in answers:
                    with contextlib.suppress(BlockingIOError):
                        answers[sock] = sock.recv(200, socket.MSG_DONTWAIT)
            # Not those that got a thread and, on a slow machine, were told hashing is busy (Retry-After: 5).
            return [answer for answer in answers.values()
                    if answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1\r\n" in answer]

        # Past its share waiting and its threads: 503, not queued.
        turned_away = wait_until(lambda: len(found := refusals()) >= 150 - 64 - 4 - 1 and found, timeout=10)
        assert b'"code": "busy"' in turned_away[0]
    finally:
        for sock in flood:
            sock.close()


def test_the_smaller_findings_hold_against_a_real_server_process(spawn_server, tmp_path):
    server = spawn_server(env=settings(**{"ratelimit.respond_failures_per_hour": 3}))
    keys = requests.post(f"{server.url}/v1/auth/register",
                         json={"email": "low@example.com", "name": "L", "password": "password123"}).json()
    auth = {"Authorization": f"Bearer {keys['test_api_key']}"}

    def create(body, **headers):
        return requests.post(f"{server.url}/v1/pause", data=json.dumps(body), headers={**auth, **headers})

    json_body = {"Content-Type": "application/json"}
    assert create({**WIRE, "channel": []}, **json_body).status_code == 422                     # 8: unhashable
    assert create({**WIRE, "message": "Wire?\ud800"}, **json_body).status_code == 400          # 8: lone surrogate
    assert create({**WIRE, "message": "Wire?\x00"}, **json_body).status_code == 422            # 10: control
    assert create({**WIRE, "options": ["Reject", "Reject\u200b"]}, **json_body).status_code == 422
    assert create({**WIRE, "options": ["\u202eApprove", "Reject"]}, **json_body).status_code == 422
    assert create(WIRE, **{"Content-Type": "text/plain"}).status_code == 415                   # 11
    hook = requests.post(f"{server.url}/v1/webhooks", headers=auth,                             # 9: NAT64 of 127.0.0.1
                         json={"url": "http://[64:ff9b::7f00:1]/hook", "events": ["pause.created"]})
    assert hook.status_code == 422
    token = create(WIRE, **json_body).json()["respond_url"].rsplit("/", 1)[1]
    for n in range(3):                                                                          # 6: spend the budget
        assert requests.get(f"{server.url}/v1/respond/guess{n}").status_code == 404
    assert requests.get(f"{server.url}/v1/respond/guess-more").status_code == 429
    for _ in range(5):                                                                          # 6, 12
        assert requests.get(f"{server.url}/respond/{token}").status_code == 200
    opened = requests.get(f"{server.url}/v1/audit", params={"event_type": "respond_page.opened"}, headers=auth)
    assert len(opened.json()["events"]) == 1
    assert server.proc.poll() is None and "Traceback" not in server.output()


CLONE_NEWNET = 0x40000000
IPV6_FREEBIND = 78              # Linux: bind an address no interface has (the namespace's loopback takes it)


@contextlib.contextmanager
def server_on_a_network_of_its_own(tmp_path, **values):
    """`python pausepoint.py` on [::1] in a network namespace of its own, whose loopback takes
    every address in 2001:db8:1::/64, 2001:db8:2::/64 and 2001:db8:3::/64 as its own, so
    clients can come from many IPv6 addresses;
    yields (in_its_network, port): in_its_network(fn) runs fn on a thread that joined the
    namespace, where the sockets it makes stay. Skips where namespaces are not permitted."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        cannot_run_here("needs unshare and ip (util-linux, iproute2)")
    port, log_path = free_port(), tmp_path / "server.log"
    setup = "ip link set lo up && " + "".join(f"ip -6 route add local 2001:db8:{n}::/64 dev lo && " for n in (1, 2, 3))
    setup += 'exec "$0" "$@"'
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["unshare", "--net", "sh", "-c", setup, sys.executable, os.path.join(ROOT, "pausepoint.py"),
                                 "--db", str(tmp_path / "pausepoint.db"), "--host", "::1", "--port", str(port)],
                                env=process_env(settings(**values)), stdout=log, stderr=subprocess.STDOUT)

    def in_its_network(fn):
        outcome = {}

        def run():
            try:
                with open(f"/proc/{proc.pid}/ns/net") as namespace:
                    if ctypes.CDLL(None, use_errno=True).setns(namespace.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                outcome["value"] = fn()
            except BaseException as e:
                outcome["error"] = e
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def in_its_own_network():      # not before unshare has made it
        with contextlib.suppress(FileNotFoundError):
            return os.readlink(f"/proc/{proc.pid}/ns/net") != os.readlink("/proc/self/ns/net")

    def healthy():
        if proc.poll() is not None:
            output = log_path.read_text()
            if "unshare failed" in output or "Operation not permitted" in output:
                cannot_run_here(f"cannot make a network namespace here: {output.strip()}")
            raise AssertionError(f"server exited with {proc.returncode}: {output}")
        return b" 200 " in answer_from("2001:db8:2::1", port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")

    try:
        wait_until(lambda: in_its_own_network() and in_its_network(healthy), timeout=20)
        yield in_its_network, port
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def connect_v6(address, port, first_bytes=b""):
    sock = socket.socket(socket.AF_INET6)
    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    sock.bind((address, 0))
    sock.settimeout(5)
    sock.connect(("::1", port))
    sock.sendall(first_bytes)
    return sock


def answer_from(address, port, request):
    """What the server answers `request` from `address` (b"" if it cannot be reached)."""
    try:
        with connect_v6(address, port, request) as sock:
            return sock.recv(200)
    except OSError:
        return b""


def test_an_ipv6_client_has_one_share_of_connections_however_many_of_its_addresses_it_uses(tmp_path):
    with server_on_a_network_of_its_own(tmp_path, **{"server.connections_per_ip": 4,
                                                     "server.trusted_proxy": "2001:db8:3::1"}) as (in_its_network, port):
        def attack():
            started = b"GET / HTTP/1.1\r\n"
            one_subscriber = [connect_v6(f"2001:db8:1::{n:x}", port, started) for n in range(1, 41)]
            proxy = [connect_v6("2001:db8:3::1", port, started) for _ in range(40)]
            beside_proxy = [connect_v6("2001:db8:3::2", port, started) for _ in range(40)]
            try:
                # Forty addresses of one /64 keep one share of connections between them, as one address does,
                held = wait_until(lambda: (n := sum(not closed_by_server(s) for s in one_subscriber)) <= 4 and n)
                assert held == 4
                healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                assert answer_from("2001:db8:1::ff", port, healthz).startswith(b"HTTP/1.1 503")
                # and another /64 is served. The trusted proxy is exempt; the rest of its /64 is not
                # (trimmed by a look at connections made after the proxy's, which passed over those).
                assert answer_from("2001:db8:2::1", port, healthz).startswith(b"HTTP/1.1 200")
                wait_until(lambda: sum(not closed_by_server(s) for s in beside_proxy) <= 4)
                assert sum(not closed_by_server(s) for s in proxy) == 40
            finally:
                for sock in one_subscriber + proxy + beside_proxy:
                    sock.close()
        in_its_network(attack)
