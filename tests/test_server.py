"""The real process: timeouts across restarts, long polls, signals and the operator's commands."""

import concurrent.futures
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import (register_over_http, stored, PASSWORD, ROOT, WIRE, LiveServer, make_config, run_out, token_of,
                      wait_until)
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
    assert body["status"] == "ok" and body["scheduler"] == "running" and body["database"] == "ok"


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


def test_two_processes_on_one_database_never_double_fire_a_timeout(spawn_server, tmp_path):
    db_path = tmp_path / "pausepoint.db"
    first = spawn_server()
    second = spawn_server()
    key = register(first.url)["test_api_key"]
    ids = [create(first.url if n % 2 else second.url, key)["pause_id"] for n in range(40)]
    simulated = "SELECT count(*) FROM audit_events WHERE event_type = 'notification.simulated'"
    wait_until(lambda: stored(db_path, simulated) == [(40,)])       # each text once, by one of the two
    stored(db_path, "UPDATE pauses SET expires_at = ?", pausepoint.db_time())     # all fall due at once, in both
    wait_until(lambda: stored(db_path, "SELECT count(*) FROM pauses WHERE status = 'timed_out'") == [(40,)], timeout=20)
    per_pause = dict(stored(db_path, "SELECT pause_id, count(*) FROM audit_events WHERE event_type = 'pause.timed_out'"
                                     " GROUP BY pause_id"))
    assert per_pause == {pause_id: 1 for pause_id in ids}
    assert stored(db_path, simulated) == [(40,)]


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


def test_fifty_waiting_agents_do_not_starve_creating_and_answering(live_server):
    url = live_server.url
    key = register(url)["test_api_key"]
    waiting = [create(url, key) for _ in range(50)]

    def wait_for(created):
        return requests.get(f"{url}/v1/pause/{created['pause_id']}", params={"wait": 40},
                            headers=bearer(key), timeout=60).json()["status"]

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        waiters = [pool.submit(wait_for, created) for created in waiting]
        wait_until(lambda: live_server.app.runtime.wait_slots._value <= 56 - 50, timeout=20)
        # With every waiter parked, the API still creates and records decisions.
        fresh = create(url, key)
        answered = requests.post(f"{url}/v1/respond/{token_of(fresh['respond_url'])}", json={"choice": "Approve"},
                                 timeout=5)
        assert answered.status_code == 200
        assert not any(w.done() for w in waiters)
        for created in waiting:
            requests.post(f"{url}/v1/respond/{token_of(created['respond_url'])}", json={"choice": "Reject"}, timeout=5)
        assert [w.result(timeout=30) for w in waiters] == ["responded"] * 50


def test_agents_beyond_the_waiting_slots_get_an_immediate_answer(tmp_path):
    config = make_config(tmp_path, **{"server.threads": 12, "ratelimit.enabled": False})
    app = pausepoint.create_app(config)
    app.runtime.start()
    with LiveServer(app, config) as server:
        key = register(server.url)["test_api_key"]
        pauses = [create(server.url, key) for _ in range(5)]
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            parked = [pool.submit(requests.get, f"{server.url}/v1/pause/{p['pause_id']}", params={"wait": 30},
                                  headers=bearer(key)) for p in pauses[:4]]
            wait_until(lambda: app.runtime.wait_slots._value == 0)
            started = time.monotonic()
            extra = requests.get(f"{server.url}/v1/pause/{pauses[4]['pause_id']}", params={"wait": 30},
                                 headers=bearer(key))
            assert extra.json()["status"] == "pending" and time.monotonic() - started < 10
            for p in pauses[:4]:
                requests.post(f"{server.url}/v1/respond/{token_of(p['respond_url'])}", json={"choice": "Approve"})
            assert all(f.result().json()["status"] == "responded" for f in parked)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_in_flight_requests_and_stops_cleanly(spawn_server, tmp_path, signum):
    server = spawn_server()
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
    assert "PausePoint stopped" in server.output()
    assert stored(tmp_path / "pausepoint.db", "PRAGMA integrity_check") == [("ok",)]


def run_cli(tmp_path, *args, env=None, stdin=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "pausepoint.py"), "--db", str(tmp_path / "pausepoint.db"),
                           *args], capture_output=True, text=True, timeout=60, cwd=tmp_path, input=stdin,
                          env={**os.environ, "PAUSEPOINT_SECURITY_BCRYPT_ROUNDS": "4", **(env or {})})


def test_the_operator_adds_developers_when_registration_is_closed(spawn_server, tmp_path):
    server = spawn_server(env={"PAUSEPOINT_REGISTRATION_OPEN": "false"})
    assert requests.post(f"{server.url}/v1/auth/register",
                         json={"email": "a@example.com", "name": "A", "password": PASSWORD}).status_code == 403
    result = run_cli(tmp_path, "create-developer", "--email", "a@example.com", "--name", "Ada", "--password-stdin",
                     stdin=PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    keys = json.loads(result.stdout)
    assert keys["api_key"].startswith("pp_live_") and keys["plan"] == "free"
    create(server.url, keys["test_api_key"])
    again = run_cli(tmp_path, "create-developer", "--email", "a@example.com", "--name", "Ada", "--password-stdin",
                    stdin=PASSWORD)
    assert again.returncode == 1 and "already registered" in again.stderr


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


def test_a_backup_taken_while_serving_holds_every_committed_pause(spawn_server, tmp_path):
    server = spawn_server()
    key = register(server.url)["test_api_key"]
    ids = {create(server.url, key)["pause_id"] for _ in range(20)}
    result = run_cli(tmp_path, "backup", str(tmp_path / "copy.db"))
    assert result.returncode == 0, result.stderr
    assert {row[0] for row in stored(tmp_path / "copy.db", "SELECT id FROM pauses")} == ids
    assert stored(tmp_path / "copy.db", "PRAGMA integrity_check") == [("ok",)]
    assert run_cli(tmp_path, "backup", str(tmp_path / "copy.db")).returncode == 2    # never overwrites


def test_help_explains_each_command():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "pausepoint.py"), "--help"],
                            capture_output=True, text=True, timeout=30)
    for command in ("serve", "create-developer", "set-plan", "backup"):
        assert command in result.stdout


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
