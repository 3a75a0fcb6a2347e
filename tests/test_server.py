"""The real process: timeouts across restarts, long polls, signals and the operator's commands."""

import concurrent.futures
import datetime as dt
import contextlib
import fcntl
import fnmatch
import functools
import http.server
import json
import logging
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import (register_over_http, stored, PASSWORD, ROOT, WIRE, Api, LiveServer, cannot_run_here, free_port,
                      make_config, process_env, read_only_view, run_cli, run_out, token_of, wait_until)
from stubs import serve_http, stop_http
import launcher
from test_webhooks import add_webhook, send_test_events
import pausepoint


register = register_over_http


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def create(url, key, **changes):
    response = requests.post(f"{url}/v1/pause", json={**WIRE, **changes}, headers=bearer(key))
    assert response.status_code == 201, response.text
    return response.json()



def test_healthz_answers_once_the_database_and_scheduler_are_up(spawn_server):
    server = spawn_server()
    body = requests.get(f"{server.url}/healthz").json()
    assert body["status"] == "ok" and body["scheduler"] == "running" and body["database"] == "ok" and body["disk"] == "ok"


def test_the_start_logs_where_it_listens_and_the_public_url_behind_a_proxy(spawn_server):
    port = free_port()
    server = spawn_server("--base-url", "https://pausepoint.example.org", port=port)
    assert (f"listening on 127.0.0.1:{port}, public URL https://pausepoint.example.org (database"
            in server.output()), server.output()


def test_the_start_logs_where_its_metrics_are_served(spawn_server, tmp_path):
    port = free_port()
    apart = spawn_server(env={"PAUSEPOINT_METRICS_ENABLED": "true", "PAUSEPOINT_METRICS_LISTEN": f"127.0.0.1:{port}"})
    assert f"pausepoint.db); metrics at http://127.0.0.1:{port}/metrics\n" in apart.output(), apart.output()
    assert requests.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
    along = spawn_server(env={"PAUSEPOINT_METRICS_ENABLED": "true", "PAUSEPOINT_METRICS_LISTEN": ""},
                         db_path=tmp_path / "second.db")
    assert "second.db); metrics at /metrics on this address\n" in along.output(), along.output()


def limit_file_size():
    """What a quota or `ulimit -f` does to the server's files: a write past 2 MiB is refused
    (EFBIG; EDQUOT for a quota), which SQLite reports only as a "disk I/O error"."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_quota_or_file_size_limit_is_a_full_disk_not_a_traceback_a_tick(spawn_server):
    """507 for what cannot be stored and one line in the log, as on a disk with no room left."""
    # Heavy test pauses would meet the test allowances first: this is about the disk alone.
    server = spawn_server(env={"PAUSEPOINT_DATABASE_MIN_FREE_MB": "0", "PAUSEPOINT_RATELIMIT_ENABLED": "false",
                               "PAUSEPOINT_PAUSES_MAX_TEST_PENDING": "0"}, setup=limit_file_size)
    key = register(server.url)["test_api_key"]
    answers = [requests.post(f"{server.url}/v1/pause", headers=bearer(key),
                             json={**WIRE, "metadata": {"padding": "x" * 15_000}, "timeout_hours": 1 / 3600})
               for _ in range(300)]             # on past the first refusal: the WAL and the file both fill
    statuses = {answer.status_code for answer in answers}
    assert answers[-1].json()["error"]["code"] == "storage_low", answers[-1].text
    # The timeouts fall due, and the timeout job's round meets the full disk: it says so once.
    wait_until(lambda: "the timeouts job cannot write, the database's disk is full or over a quota or file-size"
                       " limit, or failing" in server.output())
    assert statuses == {201, 507} and "Traceback" not in server.output(), server.output()


def test_a_write_lock_another_process_holds_is_a_503_and_one_line_not_a_traceback_a_tick(spawn_server, tmp_path):
    """A sqlite3 shell with a transaction open, a VACUUM: a write waits database.lock_wait_seconds
    for the lock, then an API write gets 503 and nothing is stored, and a job that cannot write
    says so once, and once when it can again; reads go on."""
    server = spawn_server(env={"PAUSEPOINT_DATABASE_LOCK_WAIT_SECONDS": "1"})
    key = register(server.url)["test_api_key"]
    due = create(server.url, key, timeout_hours=1 / 3600)
    with contextlib.closing(sqlite3.connect(tmp_path / "pausepoint.db", isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")
        try:
            refused = requests.post(f"{server.url}/v1/pause", json=WIRE, headers=bearer(key))
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "60", refused.text
            assert refused.json()["error"]["code"] == "database_busy"
            wait_until(lambda: "the timeouts job cannot write, another process holds the database's write lock"
                               in server.output())
            assert requests.get(f"{server.url}/v1/pause/{due['pause_id']}", headers=bearer(key)).status_code == 200
        finally:
            holder.execute("ROLLBACK")
    wait_until(lambda: "the timeouts job can write again: the other process let go of the database" in server.output())
    assert requests.get(f"{server.url}/v1/pause/{due['pause_id']}", headers=bearer(key)).json()["status"] == "timed_out"
    assert server.output().count("the timeouts job cannot write") == 1 and "Traceback" not in server.output()
    assert stored(tmp_path / "pausepoint.db", "SELECT count(*) FROM pauses") == [(1,)]


def test_writes_queued_behind_one_waiting_on_another_process_are_each_refused_within_the_lock_wait(
        spawn_server, tmp_path):
    """database.lock_wait_seconds bounds a write's whole wait from when it asked: its time in line
    behind this server's other writes, each waiting on the other process's lock, counts too. Six
    creates at once do not wait one, two, ... six lock waits each, holding a worker thread so long."""
    server = spawn_server(env={"PAUSEPOINT_DATABASE_LOCK_WAIT_SECONDS": "1"})
    key = register(server.url)["test_api_key"]

    def timed_create(_):
        sent = time.monotonic()
        response = requests.post(f"{server.url}/v1/pause", json=WIRE, headers=bearer(key))
        return response, time.monotonic() - sent

    with contextlib.closing(sqlite3.connect(tmp_path / "pausepoint.db", isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")
        try:
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(timed_create, range(6)))
        finally:
            holder.execute("ROLLBACK")
    for response, _ in answers:
        assert response.status_code == 503 and response.json()["error"]["code"] == "database_busy", response.text
        assert response.headers["Retry-After"] == "60"
    took = sorted(round(took, 2) for _, took in answers)
    assert took[-1] < 3, took                       # a lock wait of 1 s and room, not six
    assert stored(tmp_path / "pausepoint.db", "SELECT count(*) FROM pauses") == [(0,)]
    assert stored(tmp_path / "pausepoint.db", "SELECT count(*) FROM audit_events WHERE pause_id IS NOT NULL") == [(0,)]
    create(server.url, key)                         # the other process let go: writes go on


def test_a_pause_times_out_to_its_default_within_a_second_of_expiring(live_server):
    key = register(live_server.url)["test_api_key"]
    created = create(live_server.url, key, timeout_hours=1 / 3600)
    pause = requests.get(f"{live_server.url}/v1/pause/{created['pause_id']}", params={"wait": 10},
                         headers=bearer(key)).json()
    assert pause["status"] == "timed_out" and pause["choice"] == "Reject" and pause["decided_by"] == "timeout"
    expires_at, decided_at = stored(live_server.app.runtime.config["database.path"],
                                    "SELECT expires_at, decided_at FROM pauses")[0]
    lateness = pausepoint.parse_db_time(decided_at) - pausepoint.parse_db_time(expires_at)
    assert 0 <= lateness.total_seconds() < 1.0


def test_it_times_out_to_the_default_after_a_restart(spawn_server, tmp_path):
    db_path = tmp_path / "pausepoint.db"
    server = spawn_server()
    key = register(server.url)["test_api_key"]
    created = create(server.url, key)
    server.proc.kill()                     # no chance to clean up: kill -9
    server.proc.wait()
    run_out(db_path, created["pause_id"])  # the pause falls due while nothing runs
    assert stored(db_path, "SELECT status FROM pauses") == [("pending",)]
    server = spawn_server(port=int(server.url.rsplit(":", 1)[1]))
    pause = requests.get(f"{server.url}/v1/pause/{created['pause_id']}", params={"wait": 10}, headers=bearer(key)).json()
    assert pause["status"] == "timed_out" and pause["choice"] == "Reject"
    assert stored(db_path, "SELECT count(*) FROM audit_events WHERE event_type = 'pause.timed_out'") == [(1,)]


def test_a_second_server_on_a_database_is_refused_and_the_first_serves_on(spawn_server, tmp_path):
    first = spawn_server()
    stored(tmp_path / "pausepoint.db", "DELETE FROM sqlite_stat1")      # what a start writes first (ANALYZE)
    second = run_cli(tmp_path, "--port", str(free_port()), "serve")
    assert second.returncode == 2 and stored(tmp_path / "pausepoint.db", "SELECT count(*) FROM sqlite_stat1") == [(0,)]
    assert second.stderr.strip() == (f"pausepoint: another PausePoint server is running on {tmp_path / 'pausepoint.db'}:"
                                     " stop it first, or give this one a database of its own")
    assert register(first.url)["test_api_key"].startswith("pp_test_")
    (tmp_path / "another-name.db").symlink_to(tmp_path / "pausepoint.db")
    assert run_cli(tmp_path, "--db", str(tmp_path / "another-name.db"), "--port", str(free_port()), "serve").returncode == 2
    first.stop()
    assert register(spawn_server().url, email="again@example.com")["test_api_key"]     # the lock went with the first


class AlwaysHealthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_a_server_process_that_cannot_listen_is_not_taken_for_another_that_answers_on_its_port(spawn_server):
    """Two test processes may be handed one free port: the server that gets it answers /healthz
    for the one that could not listen there, which must fail, not go on as if started."""
    other, url = serve_http(AlwaysHealthy)
    try:
        with pytest.raises(AssertionError, match="Address already in use"):
            spawn_server(port=int(url.rsplit(":", 1)[1]))
    finally:
        stop_http(other)


def test_a_start_waits_out_a_command_looking_at_the_lock_but_not_another_server(tmp_path):
    """set-plan asks whether a server runs by taking the lock, shared, for an instant: a server
    starting in that instant is no second server."""
    db = str(tmp_path / "pausepoint.db")
    with open(pausepoint.server_lock_path(db), "w") as looking:
        fcntl.flock(looking, fcntl.LOCK_SH)
        threading.Timer(0.3, fcntl.flock, (looking, fcntl.LOCK_UN)).start()
        pausepoint.only_server(db).close()
    with pausepoint.only_server(db):
        with pytest.raises(pausepoint.ConfigError, match="another PausePoint server is running"):
            pausepoint.only_server(db)


def test_two_runtimes_on_one_database_never_double_fire_a_timeout(running_api, tmp_path):
    """Each runtime's jobs claim work in the database, so two at once (or a job started
    again while one still runs) never send or time out anything twice."""
    first, second = running_api(), running_api()
    key = first.register()["test_api_key"]
    ids = [(first if n % 2 else second).create_pause(key)["pause_id"] for n in range(40)]

    def both(job):
        start = threading.Barrier(2)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda api: (start.wait(), api.step(job)), (first, second)))
    both("notifications")
    stored(first.config, "UPDATE pauses SET expires_at = ?", pausepoint.db_time())     # all fall due at once, in both
    both("timeouts")
    events = dict(stored(first.config, "SELECT event_type, count(*) FROM audit_events WHERE event_type IN"
                                       " ('notification.simulated', 'pause.timed_out') GROUP BY event_type"))
    assert events == {"notification.simulated": 40, "pause.timed_out": 40}
    assert stored(first.config, "SELECT count(DISTINCT pause_id) FROM audit_events WHERE event_type = 'pause.timed_out'") \
        == [(40,)] and len(ids) == 40


def test_a_clock_set_back_never_holds_the_jobs_back_for_as_long(running_api):
    """Set back ten minutes, the wall clock puts every job's next run ten minutes off, as the
    scheduler reckons it: a pause past its expiry would wait that long for its timeout. The
    scheduler sees the wall clock fall behind the monotonic one and runs every job at once."""
    api = running_api(jobs=True)
    key = api.register()["test_api_key"]
    pause_id = api.create_pause(key)["pause_id"]
    scheduler = api.app.runtime.scheduler
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=10)
    for job in scheduler.get_jobs():
        job.modify(next_run_time=later)             # as a clock set back 10 minutes leaves them
    run_out(api.config["database.path"], pause_id)

    def set_back():
        # The wall clock, as the scheduler last looked, 10 min ahead: again until it has looked,
        # since a look under way when it is set writes the clocks as it found them over it. The
        # job on its 0.25 s round again, not only the pause timed out: a round the scheduler
        # handed its thread pool just before the jobs were put off may be what times it out.
        scheduler.clocks = (time.time() + 600, time.monotonic())
        return (scheduler.get_job("run_timeouts").next_run_time < later
                and api.pause(key, pause_id)["status"] == "timed_out")
    wait_until(set_back, timeout=5)


def test_a_long_poll_wakes_as_soon_as_the_human_decides(live_server):
    url = live_server.url
    key = register(url)["test_api_key"]
    created = create(url, key)
    threading.Timer(0.5, lambda: requests.post(f"{url}/v1/respond/{token_of(created['respond_url'])}",
                                               json={"choice": "Approve"})).start()
    started = time.monotonic()
    pause = requests.get(f"{url}/v1/pause/{created['pause_id']}", params={"wait": 30}, headers=bearer(key)).json()
    assert pause["status"] == "responded" and pause["choice"] == "Approve"
    assert time.monotonic() - started < 10          # woken by the decision, not by the 30 s limit


def test_a_long_poll_returns_pending_when_its_wait_runs_out(live_server):
    key = register(live_server.url)["test_api_key"]
    created = create(live_server.url, key)
    started = time.monotonic()
    pause = requests.get(f"{live_server.url}/v1/pause/{created['pause_id']}", params={"wait": 1},
                         headers=bearer(key)).json()
    assert pause["status"] == "pending" and time.monotonic() - started >= 1
    assert requests.get(f"{live_server.url}/v1/pause/{created['pause_id']}", params={"wait": 61},
                        headers=bearer(key)).status_code == 422


def ask(server, path, key, source="127.0.0.1"):
    """Send a GET on a connection of its own, from a loopback address; read its answer later with answer_to()."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(source, 0))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: pausepoint\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    return sock


def answer_to(sock):
    """The status, headers and JSON body of the one answer on `sock`, which it then closes."""
    with sock, sock.makefile("rb") as stream:
        status = int(stream.readline().split()[1])
        headers = dict(line.decode().rstrip().split(": ", 1) for line in iter(stream.readline, b"\r\n"))
        return status, headers, json.loads(stream.read(int(headers["Content-Length"])))


@pytest.fixture
def small_server(tmp_path):
    """A live server with 12 threads, so a few long polls would hold every one if they held threads."""
    def start(**settings):
        config = make_config(tmp_path, **{"server.threads": 12, "ratelimit.enabled": False, **settings})
        app = pausepoint.create_app(config)
        app.runtime.start()
        servers.append(LiveServer(app, config).__enter__())
        return servers[-1]
    servers = []
    yield start
    for server in servers:
        server.__exit__(None, None, None)


def test_a_hundred_waiting_agents_hold_no_thread_and_each_wakes_on_its_own_decision(small_server):
    server = small_server(**{"server.connections_per_ip": 256})     # all from one address, as fast as it can
    key = register(server.url)["test_api_key"]
    pauses = [create(server.url, key) for _ in range(100)]
    waiters = [ask(server, f"/v1/pause/{p['pause_id']}?wait=50", key) for p in pauses]
    waiting, dispatcher = server.app.runtime.waiting, server.server.task_dispatcher
    wait_until(lambda: waiting.count == 100 and dispatcher.active_count == 0, timeout=20)
    # All 12 threads are free: the API still creates and decides, and wakes that one waiter alone.
    fresh = create(server.url, key)
    assert requests.post(f"{server.url}/v1/respond/{token_of(pauses[7]['respond_url'])}",
                         json={"choice": "Approve"}, timeout=5).status_code == 200
    status, _, pause = answer_to(waiters[7])
    assert status == 200 and pause["pause_id"] == pauses[7]["pause_id"] and pause["choice"] == "Approve"
    assert waiting.count == 99 and stored(server.app.runtime.config["database.path"],
                                          "SELECT status FROM pauses WHERE id = ?", fresh["pause_id"]) == [("pending",)]
    for p in pauses[:7] + pauses[8:]:
        requests.post(f"{server.url}/v1/respond/{token_of(p['respond_url'])}", json={"choice": "Reject"}, timeout=5)
    answers = [answer_to(sock) for sock in waiters[:7] + waiters[8:]]
    assert [(status, pause["status"], pause["choice"]) for status, _, pause in answers] == [(200, "responded", "Reject")] * 99
    assert waiting.count == 0 and waiting.topics == {}


def test_a_developer_past_their_share_of_waiting_is_told_when_to_come_back(small_server):
    server = small_server(**{"server.waiting_per_developer": 3, "server.waiting_limit": 5})
    mine = register(server.url)["test_api_key"]
    theirs = register(server.url, email="other@example.com")["test_api_key"]
    my_pauses, their_pauses = [create(server.url, mine) for _ in range(4)], [create(server.url, theirs) for _ in range(3)]
    waiting = server.app.runtime.waiting
    parked = [ask(server, f"/v1/pause/{p['pause_id']}?wait=50", mine) for p in my_pauses[:3]]
    wait_until(lambda: waiting.count == 3)
    status, headers, body = answer_to(ask(server, f"/v1/pause/{my_pauses[3]['pause_id']}?wait=50", mine))
    assert status == 429 and body["error"]["code"] == "too_many_waiting" and headers["Retry-After"] == "5"
    # Another developer still waits, up to what is left of the server's limit.
    parked += [ask(server, f"/v1/pause/{p['pause_id']}?wait=50", theirs) for p in their_pauses[:2]]
    wait_until(lambda: waiting.count == 5)
    assert answer_to(ask(server, f"/v1/pause/{their_pauses[2]['pause_id']}?wait=50", theirs))[0] == 429
    # A decision frees its waiter's place, and the next one waits.
    requests.post(f"{server.url}/v1/respond/{token_of(my_pauses[0]['respond_url'])}", json={"choice": "Approve"})
    assert answer_to(parked[0])[2]["status"] == "responded"
    parked.append(ask(server, f"/v1/pause/{my_pauses[3]['pause_id']}?wait=50", mine))
    wait_until(lambda: waiting.count == 5)
    for p in my_pauses[1:] + their_pauses[:2]:
        requests.post(f"{server.url}/v1/respond/{token_of(p['respond_url'])}", json={"choice": "Approve"})
    assert [answer_to(sock)[2]["status"] for sock in parked[1:]] == ["responded"] * 5


def test_a_test_key_waiting_leaves_the_live_agents_their_places(small_server):
    """Places are counted in each mode: a test key holding its developer's share must not
    keep the live agents from waiting."""
    server = small_server(**{"server.waiting_per_developer": 1})
    keys = register(server.url)
    parked = ask(server, "/v1/events?wait=50", keys["test_api_key"])
    wait_until(lambda: server.app.runtime.waiting.count == 1)
    assert answer_to(ask(server, "/v1/events?wait=50", keys["test_api_key"]))[0] == 429
    live = ask(server, "/v1/events?wait=50", keys["api_key"], source="127.0.0.2")
    wait_until(lambda: server.app.runtime.waiting.count == 2)
    server.app.runtime.stop()                   # a stop answers every waiter
    assert [answer_to(sock)[0] for sock in (parked, live)] == [200, 200]


def test_only_the_trusted_proxy_itself_is_exempt_from_the_waiting_share_of_its_64(tmp_path):
    app = pausepoint.create_app(make_config(tmp_path, **{"server.trusted_proxy": "2001:db8::1",
                                                         "server.waiting_per_ip": 0}))

    def poll(address, email):
        api = Api(app, extra_environ={"REMOTE_ADDR": address})
        key = api.register(email=email)["test_api_key"]
        return api.get("/v1/events", {"wait": 1}, headers=api.as_key(key), expect_errors=True)
    # A neighbour on the proxy's subnet is a client of its own, held to server.waiting_per_ip.
    refused = poll("2001:db8::2", "neighbour@example.com")
    assert refused.status_int == 429 and "server.waiting_per_ip" in refused.json["error"]["message"]
    assert poll("2001:db8::1", "behind@example.com").json == {"events": []}      # waited its second


def test_one_address_cannot_take_every_waiting_place_with_many_accounts(small_server):
    server = small_server(**{"server.waiting_per_ip": 2})
    keys = [register(server.url, email=f"dev{n}@example.com")["test_api_key"] for n in range(2)]
    pauses = [create(server.url, keys[n % 2]) for n in range(4)]
    parked = [ask(server, f"/v1/pause/{p['pause_id']}?wait=50", keys[0]) for p in pauses[::2]]
    wait_until(lambda: server.app.runtime.waiting.count == 2)
    # The second account has its whole share, but its address has not.
    status, _, body = answer_to(ask(server, f"/v1/pause/{pauses[1]['pause_id']}?wait=50", keys[1]))
    assert status == 429 and "server.waiting_per_ip" in body["error"]["message"]
    elsewhere = ask(server, f"/v1/pause/{pauses[3]['pause_id']}?wait=50", keys[1], source="127.0.0.2")
    wait_until(lambda: server.app.runtime.waiting.count == 3)
    for p in pauses[::2] + pauses[3:]:
        requests.post(f"{server.url}/v1/respond/{token_of(p['respond_url'])}", json={"choice": "Approve"})
    assert [answer_to(sock)[0] for sock in parked + [elsewhere]] == [200] * 3


def test_when_every_place_is_taken_the_biggest_holder_gives_one_up(small_server):
    server = small_server(**{"server.waiting_limit": 4, "server.waiting_per_ip": 100})
    mine, theirs, my_other = (register(server.url, email=f"{name}@example.com")["test_api_key"]
                              for name in ("mine", "theirs", "my-other"))
    my_pauses, their_pause = [create(server.url, mine) for _ in range(5)], create(server.url, theirs)
    waiting = server.app.runtime.waiting
    parked = []
    for p in my_pauses[:4]:
        parked.append(ask(server, f"/v1/pause/{p['pause_id']}?wait=50", mine))
        # Parked, not only counted: a request parks once its thread is done with it, so the
        # one asked first could park second, and the oldest parked is the one to give way.
        wait_until(lambda: sum(map(len, list(waiting.parked_of.values()))) == len(parked))
    # Places are levelled between addresses: another account of mine from my address gets none…
    other_pause = create(server.url, my_other)
    assert answer_to(ask(server, f"/v1/pause/{other_pause['pause_id']}?wait=50", my_other))[0] == 429
    # …while another client's long poll still waits, and my oldest answers now.
    theirs_waiting = ask(server, f"/v1/pause/{their_pause['pause_id']}?wait=50", theirs, source="127.0.0.2")
    parked[0].settimeout(10)                    # now, not when its own 50 s run out
    status, _, pause = answer_to(parked[0])
    assert status == 200 and pause["status"] == "pending" and pause["pause_id"] == my_pauses[0]["pause_id"]
    wait_until(lambda: waiting.count == 4)
    [(their_developer,)] = stored(server.app.runtime.config, "SELECT developer_id FROM pauses WHERE id = ?",
                                  their_pause["pause_id"])
    assert waiting.waiting[((their_developer, 0), None)] == 1         # in test mode
    # I hold the most: asking for more gets me told to come back, not someone else's place.
    assert answer_to(ask(server, f"/v1/pause/{my_pauses[4]['pause_id']}?wait=50", mine))[0] == 429
    for p in my_pauses[1:4] + [their_pause]:
        requests.post(f"{server.url}/v1/respond/{token_of(p['respond_url'])}", json={"choice": "Approve"})
    assert [answer_to(sock)[0] for sock in parked[1:] + [theirs_waiting]] == [200] * 4
    assert waiting.count == 0 and waiting.parked_of == {}


def test_waiting_places_are_at_most_half_the_connections(small_server):
    server = small_server(**{"server.connection_limit": 100})
    assert server.app.runtime.waiting.limit == 50


def test_a_feed_reader_waiting_for_some_event_types_is_not_woken_by_others(small_server):
    server = small_server()
    key = register(server.url)["test_api_key"]
    first = create(server.url, key)
    latest = requests.get(f"{server.url}/v1/events", headers=bearer(key)).json()["events"][-1]["id"]
    reader = ask(server, f"/v1/events?after={latest}&types=pause.responded&wait=50", key)
    waiting = server.app.runtime.waiting
    # Admitted first, then parked on its topic: wait for the second.
    [feed] = wait_until(lambda: [topic for name, topic in list(waiting.topics.items())
                                 if name.startswith("events:") and topic.parked])
    parked = feed.parked[0]
    for _ in range(5):
        create(server.url, key)                 # pause.created, five times
    assert feed.changes == 5 and feed.parked == [parked] and not parked.done     # never woken to look
    requests.post(f"{server.url}/v1/respond/{token_of(first['respond_url'])}", json={"choice": "Approve"})
    status, _, body = answer_to(reader)
    assert status == 200 and [event["type"] for event in body["events"]] == ["pause.responded"]


def test_the_answer_to_requests_pipelined_together_says_the_connection_then_closes(live_server):
    """Those behind the first are dropped, for their client to send again once the connection
    closes. An answer begun while the main loop still parsed them kept the connection open,
    and the client waited on it for answers that never came."""
    first = b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n"
    behind = b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n" + b"A: b\r\n" * 90 + b"\r\n"   # slow to parse
    port = int(live_server.url.rsplit(":", 1)[1])
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)     # threads take turns often, as on a busy machine with many threads
    try:
        answers = []
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(first + behind * 14)           # one read's worth, all parsed together
            answers.append(answer_to(sock)[:2])
    finally:
        sys.setswitchinterval(interval)
    assert {(status, headers.get("Connection")) for status, headers in answers} == {(404, "close")}


def test_a_parked_long_poll_is_neither_an_idle_connection_nor_one_waiting_for_a_thread(small_server):
    server = small_server(**{"server.idle_timeout": 1, "server.connections_per_ip": 4})
    key = register(server.url)["test_api_key"]
    pauses = [create(server.url, key) for _ in range(10)]
    started = time.monotonic()
    waiters = []
    for group in (pauses[:4], pauses[4:8], pauses[8:]):       # a burst of new connections has its own limit
        waiters += [ask(server, f"/v1/pause/{p['pause_id']}?wait=3", key) for p in group]
        wait_until(lambda: server.app.runtime.waiting.count == len(waiters))
    # Ten parked from one address, over its share of 4: it may still connect, and nobody is closed as idle.
    assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
    answers = [answer_to(sock) for sock in waiters]
    assert [(status, pause["status"]) for status, _, pause in answers] == [(200, "pending")] * 10
    assert time.monotonic() - started >= 3


def test_a_waiter_that_hangs_up_is_forgotten_at_its_deadline(small_server, caplog):
    server = small_server()
    key = register(server.url)["test_api_key"]
    pause = create(server.url, key)
    latest = requests.get(f"{server.url}/v1/events", headers=bearer(key)).json()["events"][-1]["id"]
    gone = [ask(server, f"/v1/pause/{pause['pause_id']}?wait=1", key), ask(server, f"/v1/events?wait=1&after={latest}", key)]
    wait_until(lambda: server.app.runtime.waiting.count == 2)
    gone[0].close()
    gone[1].shutdown(socket.SHUT_RDWR)
    gone[1].close()
    wait_until(lambda: server.app.runtime.waiting.count == 0)
    assert server.app.runtime.waiting.topics == {}
    assert requests.get(f"{server.url}/v1/pause/{pause['pause_id']}", headers=bearer(key)).json()["status"] == "pending"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_without_waitress_a_long_poll_waits_on_its_thread(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    created = api.create_pause(key)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(api.pause, key, created["pause_id"], wait=30)
        wait_until(lambda: api.app.runtime.waiting.count == 1)
        api.post_json(f"/v1/respond/{token_of(created['respond_url'])}", {"choice": "Approve"})
        assert waiter.result(timeout=10)["status"] == "responded"
    assert api.app.runtime.waiting.count == 0


def test_a_python_without_the_packages_is_told_how_to_set_up_not_shown_a_traceback(tmp_path):
    # -S: without site-packages, as the system's Python is where only .venv has them. Started
    # from another directory, as a service is: the set-up must be done where requirements.txt is.
    result = subprocess.run([sys.executable, "-S", os.path.join(ROOT, "pausepoint.py"), "--db",
                             str(tmp_path / "p.db")], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("PausePoint needs the package ") and ".venv/bin/pip install" in result.stderr
    assert f"run it there: cd {ROOT} && python3 -m venv .venv" in result.stderr
    assert os.listdir(tmp_path) == []


def test_an_older_python_is_told_which_it_needs_not_shown_a_traceback(tmp_path):
    # This interpreter, saying it is 3.10 (the file compiles on 3.9 and 3.10, whose first import
    # it lacks is tomllib's; a test cannot count on one being installed).
    older = ("import runpy, sys; sys.version_info = (3, 10, 13, 'final', 0); sys.argv = sys.argv[1:];"
             " runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", older, os.path.join(ROOT, "pausepoint.py"), "--db",
                             str(tmp_path / "p.db")], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stderr) == (1, f"PausePoint needs Python 3.11 or later; {sys.executable}"
                                                     " is 3.10.13.\n")
    assert os.listdir(tmp_path) == []

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_in_flight_requests_and_stops_cleanly(spawn_server, tmp_path, signum):
    server = spawn_server(fresh_interpreter=True)      # the script as operators run it; the other tests fork it
    key = register(server.url)["test_api_key"]
    created = create(server.url, key)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(requests.get, f"{server.url}/v1/pause/{created['pause_id']}", params={"wait": 30},
                              headers=bearer(key), timeout=40)
        time.sleep(0.5)
        server.proc.send_signal(signum)
        assert server.proc.wait(timeout=15) == 0
        answer = waiting.result(timeout=5)
    assert answer.status_code == 200 and answer.json()["status"] == "pending"
    assert "PausePoint stopped" in server.output() and "Traceback" not in server.output()
    assert stored(tmp_path / "pausepoint.db", "PRAGMA integrity_check") == [("ok",)]


def test_at_a_stop_every_parked_waiter_is_answered_even_behind_queued_requests(spawn_server, tmp_path):
    server = spawn_server(env={"PAUSEPOINT_SERVER_THREADS": "12", "PAUSEPOINT_RATELIMIT_ENABLED": "false"})
    key = register(server.url)["test_api_key"]
    waiters = [ask(server, f"/v1/pause/{create(server.url, key)['pause_id']}?wait=50", key) for _ in range(30)]
    port = int(server.url.rsplit(":", 1)[1])
    time.sleep(1)           # parked by now (a waiter answered early would fail the check below anyway)
    # Registrations wait for the write lock this test holds: they fill the four threads one
    # address may use, and at the stop the other twelve are queued ahead of the woken waiters.
    held = sqlite3.connect(tmp_path / "pausepoint.db", isolation_level=None)
    held.execute("BEGIN IMMEDIATE")
    slow = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(16)]
    for n, sock in enumerate(slow):
        body = json.dumps({"email": f"q{n}@example.com", "name": "Q", "password": PASSWORD})
        sock.sendall(f"POST /v1/auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    time.sleep(0.5)         # four waiting for the lock, the rest queued: none can finish while it is held
    assert stored(tmp_path / "pausepoint.db", "SELECT count(*) FROM developers") == [(1,)]
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    held.rollback()
    held.close()
    assert server.proc.wait(timeout=20) == 0
    answers = [answer_to(sock)[0] for sock in waiters]
    for sock in slow:
        sock.close()
    assert answers == [200] * 30


def send_create(server, key, message, source="127.0.0.1"):
    """POST a pause on a connection of its own; read its answer later with answer_to()."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    body = json.dumps({**WIRE, "message": message})
    sock.sendall(f"POST /v1/pause HTTP/1.1\r\nHost: pausepoint\r\nAuthorization: Bearer {key}\r\nContent-Type:"
                 f" application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    return sock


def test_a_signal_ends_the_loops_wait_at_once_and_the_loop_itself_stops(tmp_path):
    """The stop signal's handler only says to stop: raised out of the loop, as waitress's does,
    it landed wherever the loop was (reading a request, which was then lost). So the loop must
    be woken: with the loop's own wait at an hour, only the signal's byte can end it."""
    config = make_config(tmp_path)
    app = pausepoint.create_app(config)
    server = pausepoint.make_server(app, config, port=0)
    server.adj.asyncore_loop_timeout = 3600
    app.runtime.start()
    stopped, answers = threading.Event(), []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: stopped.set())

    def client():
        answers.append(requests.get(f"http://127.0.0.1:{server.effective_port}/healthz", timeout=10).status_code)
        time.sleep(0.5)         # the loop back in its wait, with nothing else to end it (sooner, the test proves less)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=client).start()
    try:
        pausepoint.run_until_stopped(server, stopped.is_set)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        app.runtime.stop()
    assert answers == [200]
    assert signal.set_wakeup_fd(-1) == -1           # and the wake-up is put back as it was


def test_at_a_stop_every_queued_or_arriving_request_is_answered_503_and_nothing_of_it_is_done(spawn_server, tmp_path):
    """An agent whose create was dropped unanswered cannot tell whether it was stored. The stop
    answers every request no thread has begun, and each one sent during the stop, with 503
    stopping, at once: it waits only for the requests in flight."""
    server = spawn_server(env={"PAUSEPOINT_SERVER_THREADS": "12", "PAUSEPOINT_RATELIMIT_ENABLED": "false"})
    key = register(server.url)["test_api_key"]
    # Creates wait for the write lock this test holds: four fill the threads one address may
    # use, the rest queue for those threads. Which four is the server's to say.
    held = sqlite3.connect(tmp_path / "pausepoint.db", isolation_level=None)
    held.execute("BEGIN IMMEDIATE")
    sent = {send_create(server, key, f"create {n}"): f"create {n}" for n in range(12)}
    time.sleep(0.5)         # read, and on a thread or queued (one still unread is answered as arriving during the stop)
    server.proc.send_signal(signal.SIGTERM)
    try:
        sent[send_create(server, key, "arriving", source="127.0.0.2")] = "arriving"
        # Answered while the lock is still held: the stop waits for no queued request.
        refused = {sock: answer_to(sock) for sock in answered_first(list(sent), at_least=len(sent) - 4)}
    finally:
        held.rollback()
        held.close()
    for status, headers, body in refused.values():
        assert (status, body["error"]["code"]) == (503, "stopping"), body
        assert headers["Retry-After"] == "5" and headers["Connection"] == "close"
    finished = {sent[sock] for sock in set(sent) - set(refused) if answer_to(sock)[0] == 201}
    assert len(finished) == len(sent) - len(refused) and 1 <= len(finished) <= 4 and "arriving" not in finished
    assert server.proc.wait(timeout=20) == 0 and "Traceback" not in server.output(), server.output()
    assert {message for message, in stored(tmp_path / "pausepoint.db", "SELECT message FROM pauses")} == finished


def answered_first(sockets, at_least):
    """The sockets with an answer to read, once `at_least` of them have one."""
    def ready():
        found = select.select(sockets, [], [], 0)[0]
        return found if len(found) >= at_least else None
    return wait_until(ready, timeout=20)


def test_at_a_stop_an_answer_its_thread_has_written_is_sent_whole(spawn_server, tmp_path):
    """A thread is done with an answer once it is in the connection's buffer (up to 16 MB),
    which the loop sends as the client reads: a download under way at the stop was cut off
    when the process ended with most of it unsent."""
    server = spawn_server()
    key = register(server.url)["test_api_key"]
    developer = stored(tmp_path / "pausepoint.db", "SELECT id FROM developers")[0][0]
    stored(tmp_path / "pausepoint.db", "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 6000) INSERT INTO audit_events"
           " (developer_id, livemode, timestamp, actor, event_type, data) SELECT ?, 0, '2026-12-01T00:00:00.000Z',"
           " 'system', 'pause.created', json_object('pad', printf('%.1000c', 'x')) FROM n", developer)
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)     # most of 12 MB waits in the server
    sock.sendall(f"GET /v1/audit/export HTTP/1.1\r\nHost: pausepoint\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    with sock, sock.makefile("rb") as stream:
        assert stream.readline().split()[1] == b"200"           # being answered
        server.proc.send_signal(signal.SIGTERM)
        chunks = []
        while chunk := stream.read1(64 * 1024):       # as a client on a slower link takes it: 2 s or so
            chunks.append(chunk)
            time.sleep(0.01)
        body = b"".join(chunks).partition(b"\r\n\r\n")[2]
    assert body.endswith(b"\r\n0\r\n\r\n") and body.count(b'"seq":') == 6000       # to its last chunk
    assert server.proc.wait(timeout=20) == 0 and "Traceback" not in server.output(), server.output()


def test_a_stop_goes_on_only_once_each_waiter_whose_time_ran_out_is_queued_to_answer():
    """The deadline thread serves a waiter again outside its lock: the stop (wake_waiters(), then
    the threads told to end) must not get past it meanwhile, or the threads end before that
    waiter reaches their queue, where the stop then drops it unanswered."""
    waiting, who, order, release = pausepoint.Waiting(10, 10, 10), ("developer", "127.0.0.1"), [], threading.Event()

    def resume():           # the connection's, held until the stop is under way
        release.wait()
        order.append("queued to answer")
    watch = waiting.watch("pause:p")
    assert waiting.admit(who)
    waiting.park(watch, who, time.monotonic(), resume)          # its time has run out
    wait_until(lambda: watch.done)                              # the deadline thread is in resume()
    stopping = threading.Thread(target=lambda: (waiting.close(), order.append("stop goes on")))
    stopping.start()
    stopping.join(timeout=0.5)
    release.set()
    stopping.join()
    assert order == ["queued to answer", "stop goes on"]


def test_a_second_stop_signal_while_stopping_changes_nothing(spawn_server):
    server = spawn_server()
    key = register(server.url)["test_api_key"]
    waiters = [ask(server, f"/v1/pause/{create(server.url, key)['pause_id']}?wait=50", key) for _ in range(20)]
    time.sleep(1)           # parked by now
    server.proc.send_signal(signal.SIGTERM)
    server.proc.send_signal(signal.SIGINT)          # impatient: a second signal at once
    assert server.proc.wait(timeout=20) == 0
    assert [answer_to(sock)[0] for sock in waiters] == [200] * 20


def test_the_operator_adds_developers_when_registration_is_closed(spawn_server, tmp_path):
    server = spawn_server(env={"PAUSEPOINT_REGISTRATION_OPEN": "false"})
    assert requests.post(f"{server.url}/v1/auth/register",
                         json={"email": "a@example.com", "name": "A", "password": PASSWORD}).status_code == 403
    result = run_cli(tmp_path, "create-developer", "--email", "a@example.com", "--name", "Ada", "--password-stdin",
                     stdin=PASSWORD + "\n")
    assert result.returncode == 0 and "there was no database" not in result.stderr, result.stderr
    keys = json.loads(result.stdout)
    assert keys["api_key"].startswith("pp_live_") and keys["plan"] == "free"
    create(server.url, keys["test_api_key"])
    again = run_cli(tmp_path, "create-developer", "--email", "a@example.com", "--name", "Ada", "--password-stdin",
                    stdin=PASSWORD)
    assert again.returncode == 1 and "already registered" in again.stderr


def test_a_developer_made_where_there_was_no_database_is_said_to_be_in_a_new_one(tmp_path):
    """A mistyped --db would otherwise print keys that work on no server."""
    result = run_cli(tmp_path, "--db", "mistyped.db", "create-developer", "--email", "a@example.com",
                     "--name", "Ada", "--password-stdin", stdin=PASSWORD)
    assert result.returncode == 0 and json.loads(result.stdout)["api_key"].startswith("pp_live_")
    # Named in full: run from another directory than the server's, "pausepoint.db" alone says nothing.
    assert f"there was no database at {tmp_path / 'mistyped.db'}: a new one is made" in result.stderr


@pytest.mark.parametrize("given", [["--plan", "team"], ["--email", "not an email"]])
def test_a_developer_refused_where_there_was_no_database_leaves_none(tmp_path, given):
    """Else the retry, given what was missing, would add the developer to the empty database the
    refusal left at a mistyped path, without a word that it is new."""
    refused = run_cli(tmp_path, "--db", "mistyped.db", "create-developer", "--email", "a@example.com",
                      "--name", "Ada", *given, "--password-stdin", stdin=PASSWORD)
    assert refused.returncode == 1 and refused.stdout == "", refused.stderr
    assert "a new one is made" not in refused.stderr
    assert sorted(os.listdir(tmp_path)) == []
    again = run_cli(tmp_path, "--db", "mistyped.db", "create-developer", "--email", "a@example.com",
                    "--name", "Ada", "--password-stdin", stdin=PASSWORD)
    assert again.returncode == 0 and "there was no database" in again.stderr, again.stderr


def test_the_operator_sets_a_developers_plan(tmp_path):
    run_cli(tmp_path, "create-developer", "--email", "a@example.com", "--name", "Ada", "--password-stdin", stdin=PASSWORD)
    env = {"PAUSEPOINT_PLANS_TEAM_MONTHLY_PAUSES": "5000"}
    result = run_cli(tmp_path, "set-plan", "--email", "a@example.com", "--plan", "team", env=env)
    assert result.returncode == 0, result.stderr
    assert stored(tmp_path / "pausepoint.db", "SELECT plan FROM developers") == [("team",)]
    unknown = run_cli(tmp_path, "set-plan", "--email", "a@example.com", "--plan", "platinum")
    assert unknown.returncode == 2 and "unknown plan 'platinum'" in unknown.stderr
    nobody = run_cli(tmp_path, "set-plan", "--email", "b@example.com", "--plan", "team", env=env)
    assert nobody.returncode == 1 and "no developer" in nobody.stderr


def test_set_plan_beside_a_running_server_says_it_must_be_restarted_to_know_a_new_plan(spawn_server, tmp_path):
    """The server read its config as it started: a plan added since is unknown to it."""
    server = spawn_server()
    key = register(server.url)["api_key"]
    env = {"PAUSEPOINT_PLANS_TEAM_MONTHLY_PAUSES": "5000"}
    result = run_cli(tmp_path, "set-plan", "--email", "dev@example.com", "--plan", "team", env=env)
    assert result.returncode == 0 and "dev@example.com is now on the team plan" in result.stdout, result.stderr
    assert (f"pausepoint: a server is running on {tmp_path / 'pausepoint.db'}, with the config it read when it"
            " started: if plan 'team' was added since, restart the server, or this developer's live pauses get 403"
            " unknown_plan until then") in result.stderr
    refused = requests.post(f"{server.url}/v1/pause", json={**WIRE, "channel": "link"}, headers=bearer(key))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "unknown_plan"      # as it said
    made = run_cli(tmp_path, "create-developer", "--email", "b@example.com", "--name", "B", "--plan", "team",
                   "--password-stdin", stdin=PASSWORD, env=env)
    assert made.returncode == 0 and "if plan 'team' was added since, restart the server" in made.stderr
    server.stop()
    again = run_cli(tmp_path, "set-plan", "--email", "dev@example.com", "--plan", "team", env=env)
    assert again.returncode == 0 and again.stderr == ""
    started = spawn_server(env=env)
    assert requests.post(f"{started.url}/v1/pause", json={**WIRE, "channel": "link"}, headers=bearer(key)).status_code == 201


def test_a_password_piped_with_a_windows_line_ending_is_the_password_without_it(tmp_path):
    # A file saved on Windows, or PowerShell's pipe, ends its line with "\r\n": the "\r" is no
    # part of a password, and none with it could ever be typed into the sign-in form.
    run_cli(tmp_path, "create-developer", "--email", "a@example.com", "--name", "Ada", "--password-stdin",
            stdin=PASSWORD + "\r\n")
    result = run_cli(tmp_path, "set-password", "--email", "a@example.com", "--password-stdin",
                     stdin="a new password\r\n")
    assert result.returncode == 0, result.stderr
    api = Api(pausepoint.create_app(make_config(tmp_path)))
    form = api.get("/dashboard/login").forms[0]
    form["email"], form["password"] = "a@example.com", "a new password"
    form.submit(status=303)
    api.app.runtime.stop()


def test_the_operators_commands_take_the_email_without_the_spaces_around_it(tmp_path):
    run_cli(tmp_path, "create-developer", "--email", "a@example.com", "--name", "Ada", "--password-stdin", stdin=PASSWORD)
    env = {"PAUSEPOINT_PLANS_TEAM_MONTHLY_PAUSES": "5000"}
    plan = run_cli(tmp_path, "set-plan", "--email", " a@example.com ", "--plan", "team", env=env)
    operator = run_cli(tmp_path, "set-operator", "--email", " a@example.com")
    password = run_cli(tmp_path, "set-password", "--email", "a@example.com ", "--password-stdin", stdin="long enough\n")
    assert plan.returncode == 0 and "a@example.com is now on the team plan" in plan.stdout, plan.stderr
    assert operator.returncode == 0 and operator.stdout.startswith("a@example.com may now"), operator.stderr
    assert password.returncode == 0 and password.stdout.startswith("a@example.com has a new password"), password.stderr
    assert stored(tmp_path / "pausepoint.db", "SELECT plan, is_operator FROM developers") == [("team", 1)]


def typed_at_a_terminal(tmp_path, *args, typed):
    """What `python pausepoint.py --db <tmp_path>/pausepoint.db ARGS` does with a terminal for its
    standard input, each line of `typed` typed there once a prompt asks for it: getpass drops what
    was typed before it asks."""
    terminal, its_end = os.openpty()
    command = subprocess.Popen([sys.executable, os.path.join(ROOT, "pausepoint.py"), "--db",
                                str(tmp_path / "pausepoint.db"), *args], stdin=its_end, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True, env=process_env())
    os.close(its_end)
    said = b""
    for prompt, line in zip((b"Password: ", b"The same again: "), typed):
        while prompt not in said:
            said += os.read(command.stderr.fileno(), 4096) or pytest.fail(f"no prompt: {said!r}")
        os.write(terminal, line.encode() + b"\n")
    out, rest = command.communicate(timeout=60)
    os.close(terminal)
    return subprocess.CompletedProcess(args, command.returncode, out.decode(), (said + rest).decode())


def test_the_operator_gives_a_developer_a_new_password_and_every_sign_in_of_theirs_ends(tmp_path):
    run_cli(tmp_path, "create-developer", "--email", "a@example.com", "--name", "Ada", "--password-stdin", stdin=PASSWORD)
    api = Api(pausepoint.create_app(make_config(tmp_path)))
    form = api.get("/dashboard/login").forms[0]
    form["email"], form["password"] = "a@example.com", PASSWORD
    form.submit(status=303)
    assert api.get("/dashboard/overview").status_code == 200
    result = run_cli(tmp_path, "set-password", "--email", " a@example.com", "--password-stdin", stdin="a new password\n")
    assert result.returncode == 0 and "a@example.com has a new password" in result.stdout, result.stderr
    assert api.get("/dashboard/overview").status_code == 303            # that sign-in ended
    assert stored(tmp_path / "pausepoint.db", "SELECT actor FROM audit_events WHERE event_type = 'password.changed'"
                                              " ORDER BY livemode") == [("operator:command line",)] * 2
    for password, status in ((PASSWORD, 401), ("a new password", 303)):
        form = api.get("/dashboard/login").forms[0]
        form["email"], form["password"] = "a@example.com", password
        form.submit(status=status)
    short = run_cli(tmp_path, "set-password", "--email", "a@example.com", "--password-stdin", stdin="short\n")
    nobody = run_cli(tmp_path, "set-password", "--email", "b@example.com", "--password-stdin", stdin="long enough\n")
    assert short.returncode == 1 and "password" in short.stderr
    assert nobody.returncode == 1 and "no developer" in nobody.stderr
    # At the prompt the password is typed twice.
    mistyped = typed_at_a_terminal(tmp_path, "set-password", "--email", "a@example.com",
                                   typed=["one password", "another one"])
    assert mistyped.returncode == 2 and "the two passwords typed differ; nothing was changed" in mistyped.stderr
    assert typed_at_a_terminal(tmp_path, "set-password", "--email", "a@example.com",
                               typed=["typed twice", "typed twice"]).returncode == 0
    form = api.get("/dashboard/login").forms[0]
    form["email"], form["password"] = "a@example.com", "typed twice"
    form.submit(status=303)
    # Needing no old password, the operator's change holds even if the developer's changed meanwhile.
    conn = api.app.runtime.db()
    read_before = conn.execute("SELECT * FROM developers").fetchone()
    pausepoint.change_password(conn, api.config, read_before, "changed meanwhile")
    pausepoint.change_password(conn, api.config, read_before, "the operator's", actor="operator:command line")
    form = api.get("/dashboard/login").forms[0]
    form["email"], form["password"] = "a@example.com", "the operator's"
    form.submit(status=303)
    api.app.runtime.stop()


def test_a_new_password_is_never_asked_for_a_developer_there_is_none_of(tmp_path):
    run_cli(tmp_path, "create-developer", "--email", "a@example.com", "--name", "Ada", "--password-stdin", stdin=PASSWORD)
    nobody = typed_at_a_terminal(tmp_path, "set-password", "--email", "b@example.com", typed=[])
    assert nobody.returncode == 1 and "no developer with email b@example.com" in nobody.stderr
    assert "Password" not in nobody.stderr


def test_a_backup_taken_while_serving_holds_every_committed_pause(spawn_server, tmp_path):
    server = spawn_server()
    key = register(server.url)["test_api_key"]
    ids = {create(server.url, key)["pause_id"] for _ in range(20)}
    result = run_cli(tmp_path, "backup", str(tmp_path / "copy.db"))
    assert result.returncode == 0, result.stderr
    assert {row[0] for row in stored(tmp_path / "copy.db", "SELECT id FROM pauses")} == ids
    assert stored(tmp_path / "copy.db", "PRAGMA integrity_check") == [("ok",)]
    assert run_cli(tmp_path, "backup", str(tmp_path / "copy.db")).returncode == 2    # never overwrites


@pytest.mark.parametrize("first", [(), ("backup", "after.db"), ("create-developer", "--email", "b@example.com",
                                                                   "--name", "B", "--password-stdin")])
def test_a_backup_copied_over_a_database_whose_wal_was_left_is_refused_before_anything_is_mixed(spawn_server,
                                                                                                  tmp_path, first):
    """A backup copied over the database by hand after a crash: SQLite would read the old -wal
    into the copy. The start says what to do, and doing it gives the backup back whole. So does
    a command run first, which would otherwise copy the mix into the file as it closes (or into
    a backup), for the start after it to find nothing amiss."""
    server = spawn_server()
    key = register(server.url)["test_api_key"]
    kept = {create(server.url, key)["pause_id"] for _ in range(5)}
    assert run_cli(tmp_path, "backup", str(tmp_path / "copy.db")).returncode == 0
    for _ in range(60):
        create(server.url, key, metadata={"padding": "x" * 8_000})
    time.sleep(1.5)                                 # the checkpoint job copies them into the file
    create(server.url, key)                         # and this one is only in the WAL
    server.proc.kill()                              # a crash: the -wal stays
    server.proc.wait()
    shutil.copyfile(tmp_path / "copy.db", tmp_path / "pausepoint.db")           # as `cp` does, in place
    result = run_cli(tmp_path, *first, stdin=PASSWORD)
    one_sentence(result, "fails SQLite's check", "put the backup in place with `pausepoint.py restore BACKUP`")
    assert not os.path.exists(tmp_path / "after.db")
    restored = run_cli(tmp_path, "restore", str(tmp_path / "copy.db"))
    assert restored.returncode == 0, restored.stderr
    assert not os.path.exists(tmp_path / "pausepoint.db-wal") and not os.path.exists(tmp_path / "pausepoint.db-shm")
    assert stored(tmp_path / "pausepoint.db", "PRAGMA integrity_check") == [("ok",)]
    assert {row[0] for row in stored(tmp_path / "pausepoint.db", "SELECT id FROM pauses")} == kept
    spawn_server()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_command_that_may_not_read_a_served_database_never_says_to_delete_its_wal(running_api, tmp_path):
    """Run as another user than the server's: the -wal beside the database holds the server's
    latest writes, and deleting it, as a restore is told to, would lose them."""
    if not shutil.which("setpriv"):
        cannot_run_here("no setpriv to run a command as root without its right to read every file")
    api = running_api()                                 # serving, its newest rows in the -wal
    api.register()
    assert os.path.getsize(tmp_path / "pausepoint.db-wal") > 0
    for name in ("pausepoint.db", "pausepoint.db-wal", "pausepoint.db-shm"):
        os.chown(tmp_path / name, 12345, 12346)         # the service's user, say
    unprivileged = "-dac_override,-dac_read_search"
    result = subprocess.run(["setpriv", f"--inh-caps={unprivileged}", f"--bounding-set={unprivileged}", sys.executable,
                             os.path.join(ROOT, "pausepoint.py"), "--db", str(tmp_path / "pausepoint.db"), "backup",
                             str(tmp_path / "copy.db")], env=process_env(), capture_output=True, text=True)
    one_sentence(result, "cannot use the database", "may not read it (it belongs to uid 12345, mode 600): run this"
                                                     " as the user the server runs as")
    assert "delete" not in result.stderr


@pytest.fixture
def listening():
    """A port something else already listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def one_sentence(result, *said):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("pausepoint: "))
    assert all(part in line for part in said), line


@pytest.mark.parametrize("mistake", ["port taken", "metrics port taken", "no such host", "no such directory",
                                     "not a database", "a directory"])
def test_a_server_that_cannot_start_says_why_in_one_sentence(tmp_path, listening, mistake):
    (tmp_path / "config.toml").write_text("[server]\nport = 8080\n")
    db, env, said = str(tmp_path / "pausepoint.db"), {}, ()
    if mistake == "port taken":
        said = (f"cannot listen on 127.0.0.1:{listening} (server.host, server.port): Address already in use",)
    elif mistake == "no such host":         # (.invalid names never resolve)
        env = {"PAUSEPOINT_SERVER_HOST": "nosuch.invalid"}
        said = ("cannot listen on nosuch.invalid:", " (server.host, server.port): Invalid host/port specified.")
    elif mistake == "metrics port taken":
        env = {"PAUSEPOINT_METRICS_ENABLED": "true", "PAUSEPOINT_METRICS_LISTEN": f"127.0.0.1:{listening}"}
        said = (f"cannot serve metrics on 127.0.0.1:{listening} (metrics.listen): Address already in use",)
    else:
        (tmp_path / "adir.db").mkdir(mode=0o755)
        db = {"no such directory": str(tmp_path / "no" / "such.db"), "a directory": str(tmp_path / "adir.db"),
              "not a database": str(tmp_path / "config.toml")}[mistake]
        said = (f"cannot use the database {db}: ", {
            "not a database": "file is not a database",
            "a directory": "unable to open database file; it is a directory: name a file",
            "no such directory": "(No such file or directory); does its directory exist, and may this user write"
                                 " there?"}[mistake])
    due = None
    if "port taken" in mistake:             # a pause that fell due while the server was down
        api = Api(pausepoint.create_app(make_config(tmp_path)))
        due = api.create_pause(api.register()["test_api_key"])["pause_id"]
        run_out(api.config, due)
        api.app.runtime.stop()
    port = listening if mistake == "port taken" else free_port()
    started = run_cli(tmp_path, "--db", db, "--port", str(port), env=env)
    one_sentence(started, *said)
    assert "chmod" not in started.stderr          # (a directory's mode is no database file's)
    assert (tmp_path / "config.toml").read_text() == "[server]\nport = 8080\n"
    if due:                                 # a start that fails runs no job
        assert stored(db, "SELECT status FROM pauses WHERE id = ?", due) == [("pending",)]
        assert stored(db, "SELECT count(*) FROM audit_events WHERE event_type != 'pause.created'") == [(0,)]


def test_a_start_on_a_port_taken_makes_no_database_and_migrates_none(tmp_path, listening):
    """It fails either way: nothing should be left behind to be taken for a server's database,
    nor an old one upgraded that the running release (on that port, say) still reads."""
    said = f"cannot listen on 127.0.0.1:{listening} (server.host, server.port): Address already in use"
    one_sentence(run_cli(tmp_path, "--port", str(listening)), said)
    assert os.listdir(tmp_path) == []
    old = sqlite3.connect(tmp_path / "old.db")
    with open(os.path.join(os.path.dirname(__file__), "schema_v16.sql"), encoding="utf-8") as f:
        old.executescript(f.read())
    old.execute("INSERT INTO schema_migrations VALUES (16, '2026-01-01T00:00:00.000Z')")
    old.commit()
    old.close()
    one_sentence(run_cli(tmp_path, "--db", str(tmp_path / "old.db"), "--port", str(listening)), said)
    assert stored(tmp_path / "old.db", "SELECT max(version) FROM schema_migrations") == [(16,)]
    assert sorted(os.listdir(tmp_path)) == ["old.db"]


@pytest.mark.parametrize("pipe", ["pipe.db", "pausepoint.db-journal", "pausepoint.db.keys.json"])
def test_a_named_pipe_as_the_database_or_beside_it_is_refused_not_waited_on(tmp_path, pipe):
    db = tmp_path / ("pipe.db" if pipe == "pipe.db" else "pausepoint.db")
    if pipe != "pipe.db":
        assert run_cli(tmp_path, "create-developer", "--email", "ops@example.com", "--name", "Ops", "--password-stdin",
                       stdin=PASSWORD + "\n").returncode == 0
    os.mkfifo(tmp_path / pipe)
    for command in (["verify-audit"], ["--port", str(free_port())]):
        one_sentence(run_cli(tmp_path, "--db", str(db), *command), f"{tmp_path / pipe} is no file the database may use")


def test_a_backup_that_fails_leaves_nothing_to_be_taken_for_one(tmp_path):
    """A full disk (here: the file size limit) cuts the copy short: no half copy under its name."""
    assert run_cli(tmp_path, "create-developer", "--email", "ops@example.com", "--name", "Ops", "--password-stdin",
                   stdin=PASSWORD + "\n").returncode == 0
    stored(tmp_path / "pausepoint.db", "CREATE TABLE filler AS SELECT randomblob(400000) AS x")
    copy = tmp_path / "backups" / "copy.db"
    copy.parent.mkdir()
    limited = run_cli(tmp_path, "backup", str(copy),
                      setup=functools.partial(resource.setrlimit, resource.RLIMIT_FSIZE, (100_000, 100_000)))
    one_sentence(limited, f"the backup to {copy} failed: ")
    assert os.listdir(copy.parent) == []
    assert run_cli(tmp_path, "backup", str(copy)).returncode == 0     # room again
    assert stored(copy, "SELECT length(x) FROM filler") == [(400000,)]
    one_sentence(run_cli(tmp_path, "backup", ""), "name a new file to write the backup to, not ''")
    one_sentence(run_cli(tmp_path, "backup", str(copy.parent)), "name a new file to write the backup to")


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_a_backup_or_restore_stopped_by_sigterm_leaves_no_partial_copy_behind(tmp_path, command):
    """`timeout`, cron's limit, systemd or `docker stop` end a long copy with SIGTERM: the copy
    half made, hidden beside its target, goes with it, or each one stopped leaves a file as
    big as the database that nothing else removes."""
    assert run_cli(tmp_path, "create-developer", "--email", "ops@example.com", "--name", "Ops", "--password-stdin",
                   stdin=PASSWORD + "\n").returncode == 0
    stored(tmp_path / "pausepoint.db", "CREATE TABLE filler AS WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL"
           " SELECT i + 1 FROM n WHERE i < 50) SELECT randomblob(1000000) AS x FROM n")
    backups = tmp_path / "backups"
    backups.mkdir()
    if command == "restore":
        assert run_cli(tmp_path, "backup", str(backups / "big.db")).returncode == 0
    copying_into, partial = (backups, ".backup-*") if command == "backup" else (tmp_path, ".restore-*")
    for attempt in range(3):    # again if the copy was done before the signal came (this process stalled)
        target = backups / (f"copy{attempt}.db" if command == "backup" else "big.db")
        out_path, err_path = tmp_path / f"out{attempt}", tmp_path / f"err{attempt}"
        running = launcher.Launched(["--db", str(tmp_path / "pausepoint.db"), command, str(target)],
                                    tmp_path, process_env(), str(out_path), str(err_path))
        wait_until(lambda: fnmatch.filter(os.listdir(copying_into), partial) or running.poll() is not None, timeout=30)
        running.send_signal(signal.SIGTERM)
        running.wait(timeout=60)
        if running.returncode != 0:
            break
    out, err = launcher.read(out_path), launcher.read(err_path)
    assert running.returncode == 128 + signal.SIGTERM, out      # the copy was under way when the signal came
    assert "Traceback" not in err, err
    assert fnmatch.filter(os.listdir(copying_into), partial) == [], sorted(os.listdir(copying_into))
    assert command == "restore" or not os.path.exists(target)
    assert stored(tmp_path / "pausepoint.db", "SELECT email FROM developers") == [("ops@example.com",)]


def test_a_command_run_in_this_process_leaves_the_sigterm_handler_as_it_found_it(tmp_path):
    """A command's SIGTERM handler unwinds it; a program (or test) calling main() keeps its own after."""
    before = signal.getsignal(signal.SIGTERM)
    assert pausepoint.main(["--db", str(tmp_path / "missing.db"), "verify-audit"]) == 2
    assert signal.getsignal(signal.SIGTERM) is before


def ids_in(path):
    return {row[0] for row in stored(path, "SELECT id FROM pauses")}


def crashed_after_a_backup(server, cwd, backup):
    """Pauses, a backup of them to `backup`, more pauses, then the server killed: the -wal it
    leaves holds the latest writes. Returns (the test API key, the pauses backed up, those after)."""
    key = register(server.url)["test_api_key"]
    kept = {create(server.url, key)["pause_id"] for _ in range(3)}
    assert run_cli(cwd, "backup", str(backup)).returncode == 0
    later = {create(server.url, key)["pause_id"] for _ in range(3)}
    server.proc.kill()
    server.proc.wait()
    assert os.path.getsize(os.path.realpath(cwd / "pausepoint.db") + "-wal") > 0
    return key, kept, later


def test_a_restore_puts_the_backup_in_place_and_keeps_the_database_it_replaced(spawn_server, tmp_path):
    """After a crash, as restores happen: the -wal left holds the latest writes, which the copy
    must never read as its own, and which the database put aside keeps."""
    key, kept, later = crashed_after_a_backup(spawn_server(), tmp_path, tmp_path / "copy.db")
    result = run_cli(tmp_path, "restore", str(tmp_path / "copy.db"))
    assert result.returncode == 0, result.stderr
    assert "keeping its signing keys" in result.stdout
    [aside] = fnmatch.filter(os.listdir(tmp_path), "pausepoint.db.replaced-*Z")
    assert ids_in(tmp_path / "pausepoint.db") == kept
    assert ids_in(tmp_path / aside) == kept | later
    assert stat.S_IMODE(os.stat(tmp_path / "pausepoint.db").st_mode) == 0o600
    assert not fnmatch.filter(os.listdir(tmp_path), ".restore-*")
    server = spawn_server()
    assert requests.get(f"{server.url}/v1/pause/{min(later)}", headers=bearer(key)).status_code == 404
    assert requests.get(f"{server.url}/v1/pause/{min(kept)}", headers=bearer(key)).status_code == 200


def test_a_restore_that_fails_puts_the_database_back_with_the_wal_a_crash_left(spawn_server, tmp_path):
    """The restore sets the database aside, then fails (here its keys, lost, cannot be written
    beside its name, a directory this command may not write to): the database is put back
    whole, the -wal with the latest writes beside it, or the next start serves it without them."""
    served, data = tmp_path / "served", tmp_path / "data"
    served.mkdir()
    data.mkdir()
    (served / "pausepoint.db").symlink_to(data / "pausepoint.db")     # its keys beside the name, not the file
    _, kept, later = crashed_after_a_backup(spawn_server(db_path=served / "pausepoint.db"), served, data / "copy.db")
    (served / "pausepoint.db.keys.json").unlink()   # lost: the backup's are to be put in place
    with read_only_view(served, tmp_path / "read-only") as view:
        one_sentence(run_cli(view, "restore", str(data / "copy.db")),
                     f"the restore of {data / 'copy.db'} failed: ", f"; {view / 'pausepoint.db'} is as it was")
    assert sorted(os.listdir(data)) == ["copy.db", "copy.db.keys.json", "pausepoint.db", "pausepoint.db-wal",
                                       "pausepoint.db.server.lock"]
    assert ids_in(data / "pausepoint.db") == kept | later
    result = run_cli(served, "restore", str(data / "copy.db"))     # where it may write: done
    assert result.returncode == 0, result.stderr
    [aside] = fnmatch.filter(os.listdir(data), "pausepoint.db.replaced-*Z")
    assert ids_in(data / aside) == kept | later and ids_in(data / "pausepoint.db") == kept


@pytest.mark.parametrize("replaced", ["readable", "damaged"])
def test_a_restore_cancels_the_pauses_decided_since_the_backup_so_nobody_is_asked_them_again(spawn_server, tmp_path,
                                                                                          replaced):
    """Back from the backup, a pause rejected since would be pending again: its reminder, due
    while the server was down, would ask its person again at the first tick, before anyone
    could cancel it. The restore cancels it in the copy, as a cancel does (receipt, audit event
    saying what the replaced database had, webhook event), or says it cannot tell which."""
    server = spawn_server()
    key = register(server.url)["test_api_key"]
    rejected = create(server.url, key, remind_after_minutes=[1])
    waiting = create(server.url, key)
    assert run_cli(tmp_path, "backup", str(tmp_path / "copy.db")).returncode == 0
    assert requests.post(f"{server.url}/v1/respond/{token_of(rejected['respond_url'])}",
                         json={"choice": "Reject"}).status_code == 200
    server.stop()
    stored(tmp_path / "copy.db", "UPDATE pause_steps SET due_at = '2000-01-01T00:00:00.000Z'")  # due while down
    if replaced == "damaged":
        (tmp_path / "pausepoint.db").write_bytes(b"\xff" * 8192)       # nothing SQLite knows as a database
    result = run_cli(tmp_path, "restore", str(tmp_path / "copy.db"))
    assert result.returncode == 0, result.stderr
    restored = tmp_path / "pausepoint.db"
    if replaced == "damaged":
        assert ("whether pauses decided since the backup are pending again in it could not be told: the database it"
                " replaced could not be read (") in result.stdout
        assert stored(restored, "SELECT status FROM pauses WHERE id = ?", rejected["pause_id"]) == [("pending",)]
        return
    assert (f"1 pause pending in the backup had been decided since ({rejected['pause_id']}): 1 the restore"
            " cancelled, so nobody is asked them again") in result.stdout and waiting["pause_id"] not in result.stdout
    assert stored(restored, "SELECT status, decided_by, receipt IS NOT NULL FROM pauses WHERE id = ?",
                  rejected["pause_id"]) == [("cancelled", "restore", 1)]
    assert stored(restored, "SELECT status FROM pauses WHERE id = ?", waiting["pause_id"]) == [("pending",)]
    assert stored(restored, "SELECT json_extract(data, '$.via'), json_extract(data, '$.since_the_backup')"
                            " FROM audit_events WHERE pause_id = ? AND event_type = 'pause.cancelled'",
                  rejected["pause_id"]) == [("restore", "responded")]
    assert stored(restored, "SELECT count(*) FROM webhook_events WHERE pause_id = ? AND type = 'pause.cancelled'",
                  rejected["pause_id"]) == [(1,)]
    assert run_cli(tmp_path, "verify-audit").returncode == 0            # the chain and the receipt hold
    spawn_server()
    wait_until(lambda: stored(restored, "SELECT status FROM pause_steps WHERE pause_id = ?",
                              rejected["pause_id"]) != [("scheduled",)])
    assert stored(restored, "SELECT status FROM pause_steps WHERE pause_id = ?", rejected["pause_id"]) == [("skipped",)]
    assert stored(restored, "SELECT kind FROM notifications WHERE pause_id = ?", rejected["pause_id"]) == [("ask",)]


def test_a_restore_lists_every_pause_it_reopens_however_many_in_a_file_beside_the_database_it_replaced(
        spawn_server, tmp_path):
    """Past the twenty it names, the operator is told where every one is: whose, its expiry,
    what the replaced database had, and what the restore did. One already past its expiry is
    not cancelled: it times out at the start, as the person it asked was told it would."""
    server = spawn_server()
    keys = register(server.url)
    reopened = [create(server.url, keys["test_api_key"]) for _ in range(22)]
    reopened.append(create(server.url, keys["test_api_key"], timeout_hours=0.0003))       # one second
    assert run_cli(tmp_path, "backup", str(tmp_path / "copy.db")).returncode == 0
    for pause in reopened:
        assert requests.post(f"{server.url}/v1/pause/{pause['pause_id']}/cancel",
                             headers=bearer(keys["test_api_key"])).status_code == 200
    server.stop()
    wait_until(lambda: stored(tmp_path / "pausepoint.db", "SELECT expires_at < strftime('%Y-%m-%dT%H:%M:%fZ')"
                                                          " FROM pauses WHERE id = ?", reopened[-1]["pause_id"]) == [(1,)])
    result = run_cli(tmp_path, "restore", str(tmp_path / "copy.db"))
    assert result.returncode == 0, result.stderr
    [aside] = fnmatch.filter(os.listdir(tmp_path), "pausepoint.db.replaced-*Z")
    listed = tmp_path / f"{aside}.reopened"
    assert "23 pauses pending in the backup had been decided since (" in result.stdout
    assert "and 3 more): 22 the restore cancelled" in result.stdout and "; 1 past their expiry time out" in result.stdout
    assert f"Every one is listed in {listed}, a line each" in result.stdout
    assert listed.read_text().splitlines() == sorted(
        f"{pause['pause_id']}\ttest\tdev@example.com\t{pause['expires_at']}\tcancelled\t"
        + ("times out" if pause is reopened[-1] else "cancelled") for pause in reopened)
    assert stat.S_IMODE(os.stat(listed).st_mode) == 0o600
    assert not any(token_of(pause["respond_url"]) in result.stdout + listed.read_text() for pause in reopened)


def test_a_restore_under_a_running_server_is_refused_and_leaves_it_serving(spawn_server, tmp_path):
    server = spawn_server()
    key = register(server.url)["test_api_key"]
    assert run_cli(tmp_path, "backup", str(tmp_path / "copy.db")).returncode == 0
    later = create(server.url, key)["pause_id"]
    one_sentence(run_cli(tmp_path, "restore", str(tmp_path / "copy.db")), "a server is running on", "stop it first")
    assert requests.get(f"{server.url}/v1/pause/{later}", headers=bearer(key)).status_code == 200
    assert not fnmatch.filter(os.listdir(tmp_path), "*.replaced-*")


def test_a_damaged_backup_is_refused_and_the_database_is_left_as_it_was(tmp_path):
    assert run_cli(tmp_path, "create-developer", "--email", "ops@example.com", "--name", "Ops", "--password-stdin",
                   stdin=PASSWORD + "\n").returncode == 0
    stored(tmp_path / "pausepoint.db", "CREATE TABLE filler AS SELECT randomblob(400000) AS x")
    assert run_cli(tmp_path, "backup", str(tmp_path / "copy.db")).returncode == 0
    with open(tmp_path / "copy.db", "r+b") as f:        # cut short, as a copy to a full disk is
        f.truncate(os.path.getsize(tmp_path / "copy.db") // 2)
    one_sentence(run_cli(tmp_path, "restore", str(tmp_path / "copy.db")), f"the restore of {tmp_path / 'copy.db'}"
                 " failed: database disk image is malformed", "pausepoint.db is as it was")
    assert sorted(os.listdir(tmp_path)) == ["copy.db", "pausepoint.db", "pausepoint.db.server.lock"]
    assert stored(tmp_path / "pausepoint.db", "SELECT length(x) FROM filler") == [(400000,)]
    (tmp_path / "other.db").write_bytes(b"")            # an empty file, which SQLite reads as an empty database
    one_sentence(run_cli(tmp_path, "restore", str(tmp_path / "other.db")), "is no backup of a PausePoint database")


@pytest.mark.parametrize("command", [["backup", "copy.db"], ["verify-audit"]])
def test_a_command_given_a_directory_for_the_database_says_so_not_that_its_copy_failed(tmp_path, command):
    # `--db /data` for `--db /data/pausepoint.db`: a backup said its copy could not be opened.
    one_sentence(run_cli(tmp_path, "--db", str(tmp_path), *command),
                 f"cannot use the database {tmp_path}: it is a directory: name the database file in it")
    assert not os.path.exists(tmp_path / "copy.db")


@pytest.mark.parametrize("output", ["/dev/full", "a pipe closed unread"])
def test_a_developer_whose_keys_cannot_be_written_out_is_told_how_to_get_keys(tmp_path, output):
    """Keys are shown once, on standard output: where they cannot be written the command
    says so in a sentence (not a traceback) and how the developer gets keys after all."""
    command = [sys.executable, os.path.join(ROOT, "pausepoint.py"), "--db", str(tmp_path / "pausepoint.db"),
               "create-developer", "--email", "ops@example.com", "--name", "Ops", "--password-stdin"]
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open("/dev/full", "w") if output == "/dev/full" else open(write_end, "w") as out:
        result = subprocess.run(command, input=PASSWORD + "\n", stdout=out, stderr=subprocess.PIPE, text=True,
                                env=process_env())
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    said = result.stderr.splitlines()[-1]
    assert "the developer was made, but its API keys could not be written to standard output" in said
    assert "sign in to the dashboard with its email and password and rotate both keys" in said
    api = Api(pausepoint.create_app(make_config(tmp_path)))
    page = api.get("/dashboard/login").forms[0]
    page["email"], page["password"] = "ops@example.com", PASSWORD
    page.submit(status=303)
    rotated = next(form for form in api.get("/dashboard/keys").forms.values() if form.action.endswith("/rotate"))
    rotated["key"], rotated["password"] = "live", PASSWORD
    assert rotated.submit(status=303).follow().html.select_one("input.secret")["value"].startswith("pp_live_")


def test_a_command_that_cannot_do_its_work_says_why_in_one_sentence(tmp_path):
    assert run_cli(tmp_path, "verify-audit").returncode == 2                    # no database yet
    assert run_cli(tmp_path, "create-developer", "--email", "ops@example.com", "--name", "Ops", "--password-stdin",
                   stdin=PASSWORD + "\n").returncode == 0
    one_sentence(run_cli(tmp_path, "backup", str(tmp_path / "no" / "copy.db")),
                 f"cannot write {tmp_path / 'no' / 'copy.db'}: the directory {tmp_path / 'no'} does not exist")
    # With no terminal to ask at (cron, docker exec without -t): no session, so no /dev/tty.
    asked = run_cli(tmp_path, "create-developer", "--email", "b@example.com", "--name", "B", setup=os.setsid)
    one_sentence(asked, "no password was given, and there is no terminal to ask for one at: give it on standard"
                        " input with --password-stdin")
    assert "GetPassWarning" not in asked.stderr and "Password:" not in asked.stderr, asked.stderr


@pytest.mark.parametrize("command", [("set-plan", "--email", "ops@example.com", "--plan", "free"),
                                     ("set-operator", "--email", "ops@example.com")])
def test_a_command_behind_another_process_holding_the_write_lock_waits_the_lock_wait_and_says_so(tmp_path, command):
    """A sqlite3 shell left with a transaction open: the command waits database.lock_wait_seconds,
    as the server's writes do, then says what holds it up."""
    operators_database(tmp_path)
    holder = sqlite3.connect(tmp_path / "pausepoint.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    refused = run_cli(tmp_path, *command, env={"PAUSEPOINT_DATABASE_LOCK_WAIT_SECONDS": "1"})
    waited = time.monotonic() - started
    holder.execute("ROLLBACK")
    holder.close()
    one_sentence(refused, "database is locked; another process held its write lock", "database.lock_wait_seconds, 1 s")
    assert waited < 15, waited         # not SQLite's 30 s for a connection that was told nothing
    assert run_cli(tmp_path, *command).returncode == 0


def test_a_password_piped_in_without_password_stdin_is_refused_not_read_as_typed(tmp_path):
    """Without a terminal getpass would warn that the input may be echoed, then take the lines piped in."""
    operators_database(tmp_path)
    asked = run_cli(tmp_path, "create-developer", "--email", "b@example.com", "--name", "B",
                    stdin=f"{PASSWORD}\n{PASSWORD}\n", setup=os.setsid)
    one_sentence(asked, "there is no terminal to ask for one at: give it on standard input with --password-stdin")
    assert "Warning" not in asked.stderr and asked.stdout == "", asked.stderr


def test_the_keys_are_printed_as_written(tmp_path):
    made = run_cli(tmp_path, "create-developer", "--email", "zoe@example.com", "--name", "Zoë", "--password-stdin",
                   stdin=PASSWORD + "\n")
    assert made.returncode == 0 and "\\u" not in made.stdout, made.stdout
    assert "Save your API keys — they will not be shown again." in made.stdout
    assert json.loads(made.stdout)["message"] == "Save your API keys — they will not be shown again."


def test_ctrl_c_at_the_password_prompt_ends_the_command_without_a_traceback(tmp_path):
    terminal, its_end = os.openpty()            # typed at: standard input is a terminal
    # Started as from a terminal, where Ctrl-C reaches it: a shell starts a background job (these
    # tests run with `&`, say) with SIGINT ignored, which the command would inherit.
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        asking = subprocess.Popen([sys.executable, os.path.join(ROOT, "pausepoint.py"), "--db", str(tmp_path / "p.db"),
                                   "create-developer", "--email", "b@example.com", "--name", "B"], stdin=its_end,
                                  stderr=subprocess.PIPE, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, ignored)
    os.close(its_end)
    said = b""
    while b"Password: " not in said:
        said += os.read(asking.stderr.fileno(), 4096) or pytest.fail(f"no prompt: {said!r}")
    # As a person's Ctrl-C comes, once it waits for what is typed: a signal that lands between
    # the prompt and the read is handled only when the read returns, which it never does.
    wait_until(lambda: reading_its_input(asking.pid))
    asking.send_signal(signal.SIGINT)
    assert asking.wait(timeout=30) == 130
    said += asking.stderr.read()
    assert b"Traceback" not in said, said
    os.close(terminal)
    asking.stderr.close()


def reading_its_input(pid):
    """Whether the process is blocked in read() on its standard input (Linux names the call by
    its number, then the descriptor); elsewhere than x86-64 and arm64, whether it sleeps."""
    read = {"x86_64": "0", "aarch64": "63"}.get(platform.machine())
    if read is None:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "S"
    with open(f"/proc/{pid}/syscall") as f:
        return f.read().split()[:2] == [read, "0x0"]


def test_help_explains_each_command(tmp_path):
    result = run_cli(tmp_path, "--help")
    for command in ("serve", "create-developer", "set-plan", "backup"):
        assert command in result.stdout


@pytest.mark.parametrize("command, says", [("serve", "Serve the API and respond pages"),
                                           ("set-password", "every sign-in of theirs ends"),
                                           ("rotate-signing-key", "old public keys stay published"),
                                           ("verify-audit", "every decided pause against its receipt")])
def test_a_commands_own_help_says_what_it_does(tmp_path, command, says):
    assert says in " ".join(run_cli(tmp_path, command, "--help").stdout.split())


def test_a_fresh_database_records_its_schema_version_and_a_second_start_keeps_it(tmp_path):
    config = make_config(tmp_path)
    pausepoint.create_app(config)
    pausepoint.create_app(config)
    versions = stored(config["database.path"], "SELECT version FROM schema_migrations")
    assert versions == [(pausepoint.MIGRATIONS[-1][0],)]
    assert stored(config["database.path"], "PRAGMA journal_mode") == [("wal",)]


def test_behind_a_trusted_proxy_the_forwarded_client_address_is_recorded(tmp_path):
    config = make_config(tmp_path, **{"server.trusted_proxy": "127.0.0.1", "ratelimit.enabled": False})
    app = pausepoint.create_app(config)
    app.runtime.start()
    with LiveServer(app, config) as server:
        key = register(server.url)["test_api_key"]
        created = create(server.url, key)
        requests.get(f"{server.url}/v1/respond/{token_of(created['respond_url'])}",
                     headers={"X-Forwarded-For": "203.0.113.5", "X-Forwarded-Proto": "https"})
        opened = requests.get(f"{server.url}/v1/audit", params={"event_type": "respond_page.opened"},
                              headers=bearer(key)).json()["events"]
        assert opened[0]["data"]["ip"] == "203.0.113.5"


def test_a_trusted_proxy_written_another_way_is_believed_all_the_same(tmp_path):
    config = make_config(tmp_path, **{"server.host": "::1", "server.trusted_proxy": "0:0:0:0:0:0:0:1",
                                      "ratelimit.enabled": False})
    assert config["server.trusted_proxy"] == "::1"
    app = pausepoint.create_app(config)
    app.runtime.start()
    with LiveServer(app, config) as server:
        url = f"http://[::1]:{server.server.effective_port}"
        key = register(url)["test_api_key"]
        created = create(url, key)
        requests.get(f"{url}/v1/respond/{token_of(created['respond_url'])}", headers={"X-Forwarded-For": "203.0.113.5"})
        opened = requests.get(f"{url}/v1/audit", params={"event_type": "respond_page.opened"},
                              headers=bearer(key)).json()["events"]
        assert opened[0]["data"]["ip"] == "203.0.113.5"


def test_without_a_trusted_proxy_forwarded_headers_are_ignored(live_server):
    key = register(live_server.url)["test_api_key"]
    created = create(live_server.url, key)
    requests.get(f"{live_server.url}/v1/respond/{token_of(created['respond_url'])}",
                 headers={"X-Forwarded-For": "203.0.113.5"})
    opened = requests.get(f"{live_server.url}/v1/audit", params={"event_type": "respond_page.opened"},
                          headers=bearer(key)).json()["events"]
    assert opened[0]["data"]["ip"] == "127.0.0.1"


def test_healthz_is_503_until_the_scheduler_runs(tmp_path):
    from conftest import Api
    app = pausepoint.create_app(make_config(tmp_path))
    api = Api(app)
    assert api.get("/healthz", status=503).json["error"]["code"] == "starting"
    app.runtime.start()
    try:
        assert api.get("/healthz").json["status"] == "ok"
    finally:
        app.runtime.stop()


def test_stopping_never_deadlocks_with_a_job_that_is_waking_the_delivery_job(tmp_path, caplog):
    # APScheduler's shutdown holds its job-store lock while waiting for running jobs;
    # a job waking the delivery job at that moment used to wait for that lock forever.
    caplog.set_level(logging.ERROR, logger="apscheduler")     # skipped runs of the 1 ms job are expected
    for cycle in range(20):
        app = pausepoint.create_app(make_config(tmp_path, **{"database.path": str(tmp_path / f"{cycle}.db")}))
        runtime = app.runtime
        runtime.scheduler.add_job(runtime.wake_webhooks, "interval", seconds=0.001, id="waker")
        runtime.start()
        time.sleep(0.05)
        stopper = threading.Thread(target=runtime.stop, daemon=True)
        stopper.start()
        stopper.join(timeout=10)
        assert not stopper.is_alive(), f"stop() hung in cycle {cycle}"


def test_a_stopped_app_leaves_no_thread_behind(running_api, receiver):
    """A process that goes on after an app (a library user's, a test run) gets back every thread
    the app started: its jobs', its outbound calls' and their deadline watch, its metrics'."""
    before = set(threading.enumerate())
    api = running_api(jobs=True, **{"webhooks.allow_private": True, "metrics.enabled": True,
                                    "metrics.listen": f"127.0.0.1:{free_port()}"})
    key = api.register()["test_api_key"]
    webhook_id = add_webhook(api, key, receiver.url)["webhook_id"]
    send_test_events(api, key, webhook_id, 1)
    api.step("webhooks")
    assert len(receiver.calls) == 1          # a call was made, under a watched deadline
    api.app.runtime.stop()
    wait_until(lambda: not set(threading.enumerate()) - before, timeout=10)
    # A call after the stop (a stopped app stepped by a test, say) that its deadline cuts off.
    mine, theirs = socket.socketpair()
    with mine, theirs, api.app.runtime.outbound.deadlines.deadline(0.2) as deadline:
        assert deadline.guard(mine).recv(1) == b""
    wait_until(lambda: not set(threading.enumerate()) - before, timeout=10)


# A request that reads the database (to look the key up) and is refused.
UNKNOWN_KEY = {"Authorization": "Bearer pp_test_" + "0" * 43}


@pytest.fixture
def server_without_jobs(tmp_path):
    """A live server (64 request threads) whose jobs never run: only requests open connections."""
    config = make_config(tmp_path, **{"server.host": "127.0.0.1", "ratelimit.enabled": False})
    with LiveServer(pausepoint.create_app(config), config) as server:
        yield server


def test_request_threads_keep_as_many_database_connections_as_requests_ran_at_once(server_without_jobs):
    database = server_without_jobs.app.runtime.config["database.path"]

    def connections():
        """The process's descriptors on the database file: one per SQLite connection."""
        opened = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                opened += os.readlink(f"/proc/self/fd/{fd}") == database
            except OSError:
                pass                                    # closed meanwhile
        return opened

    before = connections()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(25):                             # 100 requests, 4 at a time, over 64 threads
            assert set(pool.map(lambda _: requests.get(server_without_jobs.url + "/v1/pause",
                                                       headers=UNKNOWN_KEY).status_code, range(4))) == {401}
            wait_until(server_without_jobs.quiet)       # the four connections given back
    assert connections() - before <= 4


def test_a_lent_connection_serves_one_request_at_a_time(live_server):
    auth = {"Authorization": f"Bearer {register_over_http(live_server.url)['test_api_key']}"}

    def client(_):
        with requests.Session() as session:
            statuses = set()
            for _ in range(25):                 # write, then read what was written
                created = session.post(f"{live_server.url}/v1/pause", json=WIRE, headers=auth)
                statuses |= {created.status_code,
                             session.get(f"{live_server.url}/v1/pause/{created.json()['pause_id']}", headers=auth).status_code}
            return statuses

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert set().union(*pool.map(client, range(8))) == {200, 201}


def test_a_job_thread_opens_its_own_connection_and_takes_none_lent_to_requests(server_without_jobs):
    runtime = server_without_jobs.app.runtime
    for _ in range(3):
        requests.get(server_without_jobs.url + "/v1/pause", headers=UNKNOWN_KEY)
    wait_until(server_without_jobs.quiet)
    idle = list(runtime.idle_connections)
    used = []

    def job():
        runtime.run_once("steps")                       # on a thread that serves no requests
        used.append(runtime.db())

    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    assert idle and runtime.idle_connections == idle
    assert used[0] not in idle and used[0].borrower is None


ARENAS_AFTER_EIGHT_THREADS_ALLOCATE = """
import ctypes, sys, threading
sys.path.insert(0, sys.argv[1])
import pausepoint
pausepoint.fewer_malloc_arenas()
start = threading.Barrier(8)

def allocate():
    start.wait()
    kept = [ctypes.create_string_buffer(4096) for _ in range(2000)]

threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
ctypes.CDLL(None).malloc_stats()                # glibc's report, on stderr: a line per arena
"""


@pytest.mark.parametrize("env, arenas", [({}, 2), ({"MALLOC_ARENA_MAX": "6"}, 6),
                                         ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=5"}, 5)],
                         ids=["ours", "the operator's variable", "the operator's tunable"])
def test_the_server_keeps_two_malloc_arenas_unless_the_operator_chose(env, arenas):
    report = subprocess.run([sys.executable, "-c", ARENAS_AFTER_EIGHT_THREADS_ALLOCATE, ROOT], capture_output=True,
                            text=True, timeout=60, env={**{name: value for name, value in os.environ.items()
                                                           if name not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}, **env})
    assert sum(line.startswith("Arena ") for line in report.stderr.splitlines()) == arenas


@pytest.mark.parametrize("listening_on, host_given", [("127.0.0.1", None), ("127.0.0.1", "0.0.0.0"), ("::1", "::"),
                                                      ("127.0.0.2", "127.0.0.2"), ("::1", "::1")],
                         ids=["unset", "every IPv4 address", "every IPv6 address", "one address", "one IPv6 address"])
def test_the_images_health_check_asks_the_server_on_the_address_and_port_it_was_given(spawn_server, listening_on,
                                                                                        host_given):
    """Every address is asked on loopback; one address, on that one (127.0.0.2 is not 127.0.0.1)."""
    server = spawn_server(host=listening_on)
    port = server.url.rsplit(":", 1)[1]

    def health(port):
        return images_health_check({"PAUSEPOINT_SERVER_PORT": port,
                                    **({"PAUSEPOINT_SERVER_HOST": host_given} if host_given else {})})
    assert health(port) == 0
    assert health(str(free_port())) != 0                # nothing listens there


def images_health_check(environ, cwd=None):
    """The exit status of the Dockerfile's HEALTHCHECK, run in `cwd` with these PAUSEPOINT_* variables alone."""
    with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
        check = json.loads(re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", f.read()).group(1))
    assert check[0] == "python"
    env = {name: value for name, value in os.environ.items() if not name.startswith("PAUSEPOINT_")}
    return subprocess.run([sys.executable, *check[1:]], capture_output=True, timeout=30, cwd=cwd,
                          env={**env, **environ}).returncode


def test_the_images_health_check_asks_where_the_mounted_config_file_says_the_server_listens(spawn_server, tmp_path):
    """The image reads ./config.toml (the README mounts it at /app/config.toml); its check, too."""
    server = spawn_server(host="127.0.0.3")
    port = server.url.rsplit(":", 1)[1]
    (tmp_path / "config.toml").write_text(f'[server]\nhost = "127.0.0.3"\nport = {port}\n')
    assert images_health_check({}, cwd=tmp_path) == 0
    assert images_health_check({"PAUSEPOINT_SERVER_PORT": str(free_port())}, cwd=tmp_path) != 0    # the variable wins
    # Saved by Notepad, with a byte order mark, which the server reads past.
    (tmp_path / "config.toml").write_bytes(f'\ufeff[server]\nhost = "127.0.0.3"\nport = {port}\n'.encode())
    assert images_health_check({}, cwd=tmp_path) == 0


class AnswersEveryRequest(http.server.BaseHTTPRequestHandler):
    """A proxy that answers 200 to every request itself, reaching nothing."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_images_health_check_asks_the_server_itself_not_a_proxy_from_the_environment():
    """Docker passes the proxy of the client's config to every container as http_proxy: a
    proxy answering for it must not make a server that is down look healthy."""
    proxy, proxy_url = serve_http(AnswersEveryRequest)
    try:
        nothing_listens = str(free_port())
        assert images_health_check({"PAUSEPOINT_SERVER_PORT": nothing_listens, "http_proxy": proxy_url,
                                    "HTTP_PROXY": proxy_url, "no_proxy": "", "NO_PROXY": ""}) != 0
    finally:
        stop_http(proxy)


def ignored_by(ignore_file, name):
    """Whether `ignore_file` leaves out a file called `name` wherever it is: by a pattern
    without a slash, as .gitignore reads one, or one starting **/, as .dockerignore needs."""
    with open(os.path.join(ROOT, ignore_file), encoding="utf-8") as f:
        patterns = [line.strip().removeprefix("**/") for line in f if line.strip() and not line.startswith("#")]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns if "/" not in pattern)


def test_nothing_a_local_run_leaves_beside_its_database_goes_into_git_or_a_docker_build(spawn_server, tmp_path):
    """Its signing key above all: a private key in a commit or a build context is out of its hands.
    A restore keeps the database it replaced beside it, with that database's keys."""
    server = spawn_server()
    pause = create(server.url, register(server.url)["test_api_key"])
    assert run_cli(tmp_path, "backup", str(tmp_path / "pausepoint-backup.db")).returncode == 0
    answered = requests.post(f"{server.url}/v1/respond/{token_of(pause['respond_url'])}", json={"choice": "Approve"})
    assert answered.status_code == 200, answered.text     # since the backup: the restore cancels it
    server.stop()
    assert run_cli(tmp_path, "restore", str(tmp_path / "pausepoint-backup.db")).returncode == 0
    left = sorted(name for name in os.listdir(tmp_path) if not name.endswith(".log"))   # (the test's own logs)
    assert {"pausepoint.db", "pausepoint.db.keys.json", "pausepoint.db.server.lock",
            "pausepoint-backup.db.keys.json"} <= set(left)
    replaced = [name for name in left if name.startswith("pausepoint.db.replaced-")]
    assert [end for end in (".keys.json", ".reopened") if not any(name.endswith(end) for name in replaced)] == [], left
    for ignore_file in (".gitignore", ".dockerignore"):
        assert [name for name in left if not ignored_by(ignore_file, name)] == [], ignore_file


def operators_database(tmp_path):
    """The path of a database as `create-developer` makes it, with a developer ops@example.com."""
    assert run_cli(tmp_path, "create-developer", "--email", "ops@example.com", "--name", "Ops", "--password-stdin",
                   stdin=PASSWORD + "\n").returncode == 0
    return tmp_path / "pausepoint.db"


# Every way to use a database: serving, and each command.
EVERY_START = [("serve",), ("verify-audit",), ("backup", "copy.db"), ("rotate-signing-key",),
               ("set-plan", "--email", "ops@example.com", "--plan", "team"),
               ("set-operator", "--email", "ops@example.com"),
               ("create-developer", "--email", "b@example.com", "--name", "B", "--password-stdin")]


def test_a_database_from_a_newer_version_is_refused_naming_both_versions(tmp_path):
    db = operators_database(tmp_path)
    stored(db, "INSERT INTO schema_migrations VALUES (99, '2027-01-01T00:00:00.000Z')")
    for start in EVERY_START:
        one_sentence(run_cli(tmp_path, *start, "--port", str(free_port()), stdin=PASSWORD + "\n"),
                     f"{db} was last opened by a newer PausePoint (schema 99; this one knows up to"
                     f" {pausepoint.MIGRATIONS[-1][0]}): run that version, or restore a backup made by this one")
    assert not {"copy.db", "pausepoint.db.keys.json"} & set(os.listdir(tmp_path))     # nothing copied nor made
    assert stored(db, "SELECT max(version) FROM schema_migrations") == [(99,)]


@pytest.mark.parametrize("tables", ["customers", "developers"])
def test_another_applications_database_is_refused_and_left_as_it_was(tmp_path, tables):
    db = tmp_path / "pausepoint.db"
    stored(db, f"CREATE TABLE {tables} (id INTEGER PRIMARY KEY, email TEXT)")
    for start in EVERY_START:
        one_sentence(run_cli(tmp_path, *start, "--port", str(free_port()), stdin=PASSWORD + "\n"),
                     f"{db} is not a PausePoint database (it has tables, but not schema_migrations): name the"
                     " server's with --db or database.path")
    assert stored(db, "SELECT name FROM sqlite_master") == [(tables,)]
    assert not {"copy.db", "pausepoint.db.keys.json"} & set(os.listdir(tmp_path))


@pytest.mark.parametrize("gone", ["emptied", "deleted"])
def test_a_database_gone_from_beside_its_keys_is_refused_and_a_restore_brings_it_back(tmp_path, gone):
    db = operators_database(tmp_path)
    assert run_cli(tmp_path, "rotate-signing-key").returncode == 0        # its keys, as a first start makes them
    assert run_cli(tmp_path, "backup", str(tmp_path / "kept.db")).returncode == 0
    if gone == "emptied":
        db.write_bytes(b"")             # a copy into its place that failed
        said = f"{db} is empty (0 bytes), though the signing keys beside it show a database was made there"
    else:
        db.unlink()                     # a restore by hand gone wrong, an rm of the wrong file
        said = f"there is no database at {db}, though the signing keys beside it show one was made there"
    for start in EVERY_START:
        one_sentence(run_cli(tmp_path, *start, "--port", str(free_port()), stdin=PASSWORD + "\n"),
                     said, ": put the latest backup in place with `pausepoint.py restore BACKUP`")
    assert "copy.db" not in os.listdir(tmp_path)                     # nothing copied, nor made
    assert db.stat().st_size == 0 if gone == "emptied" else not db.exists()
    assert run_cli(tmp_path, "restore", str(tmp_path / "kept.db")).returncode == 0
    assert stored(db, "SELECT email FROM developers") == [("ops@example.com",)]


def test_a_file_of_0_bytes_with_no_keys_beside_it_is_a_new_database(tmp_path):
    (tmp_path / "pausepoint.db").write_bytes(b"")         # touch pausepoint.db
    assert operators_database(tmp_path).stat().st_size > 0


def test_a_first_start_on_a_file_of_0_bytes_that_stops_after_making_its_keys_leaves_a_new_database(tmp_path):
    # A start cut short after the keys were made beside the file it found empty (a bad setting
    # read after them here; a kill there too) left 0 bytes beside keys, refused as emptied.
    (tmp_path / "pausepoint.db").write_bytes(b"")         # touch pausepoint.db
    started = run_cli(tmp_path, "serve", "--port", str(free_port()),
                      env={"PAUSEPOINT_METRICS_ENABLED": "true", "PAUSEPOINT_METRICS_LISTEN": "nowhere"})
    assert started.returncode != 0 and "metrics.listen must be host:port" in started.stderr, started.stderr
    assert (tmp_path / "pausepoint.db.keys.json").exists()
    assert stored(operators_database(tmp_path), "SELECT email FROM developers") == [("ops@example.com",)]


def test_a_proxy_writing_the_client_port_with_an_ipv6_address_does_not_make_each_connection_a_client(tmp_path):
    # "[2001:db8::7]:40001", as some proxies and load balancers write an IPv6 client with its
    # source port: each new connection has another port, and must not bring a fresh budget.
    config = make_config(tmp_path, **{"server.trusted_proxy": "127.0.0.1", "ratelimit.respond_failures_per_hour": 2})
    app = pausepoint.create_app(config)
    app.runtime.start()
    with LiveServer(app, config) as server:
        def guess(n, forwarded_for):
            return requests.get(f"{server.url}/v1/respond/guess{n}", headers={"X-Forwarded-For": forwarded_for})
        assert [guess(n, f"[2001:db8::7]:{40000 + n}").status_code for n in range(2)] == [404, 404]
        assert guess(2, "[2001:db8::7]:40002").status_code == 429
        assert guess(3, "[2001:db8::8]:40003").status_code == 429           # the same /64, as unbracketed
        assert guess(4, "203.0.113.5").status_code == 404


# How the flooding tenant writes its key each time: as sent by a client library, or spelt
# twelve ways that all authenticate (the scheme's case, the spaces before the key).
SAME_SPELLING = "Bearer {}".format
EVERY_SPELLING = [lambda key, n=n: f"{('Bearer', 'bearer', 'BEARER')[n % 3]}{' ' * (1 + n // 3)}{key}"
                  for n in range(12)]


@pytest.fixture
def one_thread_for_the_address(small_server):
    """A small_server that serves its one client address (this test's) one request at a time
    (four, as 12 threads give it, would leave the order in which those waiting on the write
    lock reach it to chance), and a connection of its own to hold the write lock with."""
    server = small_server()
    server.server.task_dispatcher.per_address = 1
    with contextlib.closing(sqlite3.connect(server.app.runtime.config["database.path"], isolation_level=None)) as holder:
        try:
            yield server, holder
        finally:
            if holder.in_transaction:
                holder.execute("ROLLBACK")


def place_of_the_lone_create(server):
    """(Where the tenant with one create had it stored among all the pauses, from 0; the
    pauses' owners in the order stored.)"""
    owners = [owner for owner, in stored(server.app.runtime.config, "SELECT developer_id FROM pauses ORDER BY seq")]
    [second] = [owner for owner in set(owners) if owners.count(owner) == 1]
    return owners.index(second), owners


@pytest.mark.parametrize("spellings", [[SAME_SPELLING] * 12, EVERY_SPELLING], ids=["same", "respelt"])
def test_one_tenant_flooding_from_a_shared_address_delays_another_there_by_a_turn_not_its_queue(
        one_thread_for_the_address, spellings):
    """Two developers' agents on one host, which may have one request served at a time: the
    first's twelve creates wait on the write lock, one on the address's thread and eleven
    queued, when the second's one comes. The second's is taken after the first's next, not
    after all of them: it is stored third (taken in arrival order, it would be thirteenth).
    Writing its one key differently each time does not make the flood twelve tenants."""
    server, holder = one_thread_for_the_address
    flooding, other = (register_over_http(server.url, f"{name}@example.com")["test_api_key"] for name in "ab")
    for key in (flooding, other):         # used before: known good, so a party each (see the test below)
        assert requests.get(f"{server.url}/v1/pause", headers={"Authorization": f"Bearer {key}"}).ok
    dispatcher, link = server.server.task_dispatcher, {**WIRE, "channel": "link", "recipient": "ops"}
    wait_until(server.quiet)                   # the GETs' threads are done: the one running next is a create's
    holder.execute("BEGIN IMMEDIATE")          # each create then holds its thread until the rollback
    with concurrent.futures.ThreadPoolExecutor(13) as pool:
        creates = [pool.submit(requests.post, f"{server.url}/v1/pause", json=link,
                               headers={"Authorization": spelt(flooding)}) for spelt in spellings]
        wait_until(lambda: dispatcher.queued == 11 and sum(dispatcher.running.values()) == 1)
        creates.append(pool.submit(requests.post, f"{server.url}/v1/pause", json=link,
                                   headers={"Authorization": f"Bearer {other}"}))
        wait_until(lambda: dispatcher.queued == 12)
        holder.execute("ROLLBACK")
        assert [create.result().status_code for create in creates] == [201] * 13
    place, owners = place_of_the_lone_create(server)
    assert place == 2, owners


def test_one_tenant_flooding_the_write_lock_from_a_shared_address_delays_another_there_by_a_turn(small_server):
    """Two developers' agents on one host, which may have 16 requests served at once: the
    first's twelve creates all hold threads, one with the write lock and eleven in line for
    it, when the second's one comes. The lock is handed out by party within the address as
    the threads are, so the second's is stored third, not thirteenth, as in arrival order."""
    server = small_server(**{"server.threads": 24})
    flooding, other = (register_over_http(server.url, f"{name}@example.com")["test_api_key"] for name in "ab")
    for key in (flooding, other):         # used before: known good, so a party each
        assert requests.get(f"{server.url}/v1/pause", headers={"Authorization": f"Bearer {key}"}).ok
    lock, link = server.app.runtime.write_lock, {**WIRE, "channel": "link", "recipient": "ops"}

    def create(key):
        return requests.post(f"{server.url}/v1/pause", json=link, headers={"Authorization": f"Bearer {key}"})

    def creates_waiting():
        """The API's writes in line for the lock: the scheduler's jobs come and go there too."""
        with lock._guard:
            return sum(party.startswith("key:") for (_, party), _ in lock._waiters)

    with (contextlib.closing(sqlite3.connect(server.app.runtime.config["database.path"], isolation_level=None)) as holder,
          concurrent.futures.ThreadPoolExecutor(13) as pool):
        holder.execute("BEGIN IMMEDIATE")      # the first create holds the write lock until the rollback
        creates = [pool.submit(create, flooding) for _ in range(12)]
        wait_until(lambda: creates_waiting() == 11)
        creates.append(pool.submit(create, other))
        wait_until(lambda: creates_waiting() == 12)
        holder.execute("ROLLBACK")
        assert [create.result().status_code for create in creates] == [201] * 13
    place, owners = place_of_the_lone_create(server)
    assert place == 2, owners


def test_made_up_keys_flooding_from_a_shared_address_are_one_party_with_no_key_at_all(one_thread_for_the_address):
    """Each made-up key a party of its own would take a turn of its own: a tenant's create
    on the same host then waited behind every one. Made up, they are one party, as requests
    with no key are: in turn order the tenant's create, its key used before, is second to be
    taken, not twenty-fourth."""
    server, holder = one_thread_for_the_address
    first, tenant = (register_over_http(server.url, f"{name}@example.com")["test_api_key"] for name in "ab")
    assert requests.get(f"{server.url}/v1/pause", headers={"Authorization": f"Bearer {tenant}"}).ok
    dispatcher, link = server.server.task_dispatcher, {**WIRE, "channel": "link", "recipient": "ops"}

    def create(key):
        return requests.post(f"{server.url}/v1/pause", json=link, headers={"Authorization": f"Bearer {key}"})

    wait_until(server.quiet)                   # the GET's thread is done: the one running next is the create's
    holder.execute("BEGIN IMMEDIATE")          # the first create holds the address's thread until the rollback
    with concurrent.futures.ThreadPoolExecutor(25) as pool:
        creates = [pool.submit(create, first)]
        wait_until(lambda: dispatcher.queued == 0 and sum(dispatcher.running.values()) == 1)
        creates += [pool.submit(create, f"pp_test_madeup{n}") for n in range(23)]
        wait_until(lambda: dispatcher.queued == 23)
        creates.append(pool.submit(create, tenant))
        wait_until(lambda: dispatcher.queued == 24)
        with dispatcher.lock:           # each party's queue, in the order they take turns
            [parties] = dispatcher.waiting.values()
            turns = [(party, len(channels)) for party, channels in parties.items()]
        holder.execute("ROLLBACK")
        assert [create.result().status_code for create in creates] == [201] + [401] * 23 + [201]
    assert turns == [("", 23), ("key:" + tenant, 1)], turns


def test_a_sign_in_is_one_party_whatever_other_cookies_come_with_it():
    """A browser sends every cookie the site set (and a script may set more, a new one each
    time): the sign-in's token is the party, as an API key is however its header is spelt."""
    party = pausepoint.FairTaskDispatcher(1).party
    party.__self__.vouched.found("abc", True)
    party.__self__.vouched.found("pp_test_k", True)
    signed_in = {party({"COOKIE": f"pp_session=abc; seen={n}"}) for n in range(3)}
    signed_in |= {party({"COOKIE": '__Host-pp_form=x, __Host-pp_session="abc"'})}
    keyed = {party({"AUTHORIZATION": spelt("pp_test_k"), "COOKIE": "pp_session=abc"}) for spelt in EVERY_SPELLING}
    assert len(signed_in) == len(keyed) == 1 and signed_in != keyed
    assert party({"COOKIE": "theme=dark"}) == party({"AUTHORIZATION": "Basic eDp5"}) == party({})
    assert party({"AUTHORIZATION": "Bearer pp_test_made_up"}) == party({"COOKIE": "pp_session=made-up"}) == party({})


def test_behind_a_trusted_proxy_one_client_cannot_take_every_thread(tmp_path):
    config = make_config(tmp_path, **{"server.trusted_proxy": "127.0.0.1", "server.threads": 12,
                                      "ratelimit.enabled": False})
    app = pausepoint.create_app(config)
    app.runtime.start()
    sign_ups = []
    with LiveServer(app, config) as server, contextlib.closing(
            sqlite3.connect(config["database.path"], isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")          # each sign-up then holds its thread until the rollback
        try:
            with concurrent.futures.ThreadPoolExecutor(14) as pool:
                sign_ups = [pool.submit(requests.post, f"{server.url}/v1/auth/register",
                                        json={"email": f"flood{n}@example.com", "name": "F", "password": PASSWORD},
                                        headers={"X-Forwarded-For": "203.0.113.66"}) for n in range(14)]
                dispatcher = server.server.task_dispatcher
                wait_until(lambda: dispatcher.queued + sum(dispatcher.running.values()) == 14)
                # Another client behind the same proxy is served while the first one's requests all
                # still wait (they would give up on the write lock after a while, freeing threads).
                health = requests.get(f"{server.url}/healthz", headers={"X-Forwarded-For": "198.51.100.7"})
                assert health.status_code == 200 and not any(sign_up.done() for sign_up in sign_ups)
                holder.execute("ROLLBACK")
        finally:
            if holder.in_transaction:
                holder.execute("ROLLBACK")
    assert [s.result().status_code for s in sign_ups] == [201] * 14
