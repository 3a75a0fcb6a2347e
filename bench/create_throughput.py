"""Create-pause throughput and latency under concurrent clients, beside a baseline.

Runs two servers on loopback, one after the other, and drives each with the
same client load:
  * baseline: a bare Bottle + waitress handler that does one SQLite insert
    (WAL, synchronous=FULL, as PausePoint uses) per request;
  * pausepoint: POST /v1/pause with a test key (validation, quota-free
    transaction with pause + notification + audit rows, plus the notification
    job simulating each send in the background).

Usage: python bench/create_throughput.py [--clients 16] [--seconds 10]
Prints requests/s, p50 and p99 latency for both. Only loopback traffic.
"""

import argparse
import concurrent.futures
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASELINE_APP = textwrap.dedent("""
    import sqlite3, sys, threading, bottle, waitress
    path, port = sys.argv[1], int(sys.argv[2])
    local = threading.local()
    def db():
        if not hasattr(local, "conn"):
            local.conn = sqlite3.connect(path, isolation_level=None, timeout=30)
            local.conn.execute("PRAGMA journal_mode = WAL")
            local.conn.execute("PRAGMA synchronous = FULL")
        return local.conn
    db().execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body TEXT)")
    app = bottle.Bottle()
    @app.post("/insert")
    def insert():
        cur = db().execute("INSERT INTO t (body) VALUES (?)", (bottle.request.body.read().decode(),))
        bottle.response.status = 201
        return {"id": cur.lastrowid}
    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}
    waitress.serve(app, host="127.0.0.1", port=port, threads=64, _quiet=True)
""")

PAUSE = {"recipient": "+15550100", "channel": "sms", "message": "Your agent wants to send a $340 wire. Approve?",
         "options": ["Approve", "Reject"], "timeout_hours": 4, "timeout_default": "Reject"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc):
    for _ in range(200):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise SystemExit("server did not become healthy")


def drive(url, path, headers, body, clients, seconds):
    """`clients` threads, each with its own keep-alive session, posting for `seconds`."""
    deadline = time.monotonic() + seconds

    def client():
        session, latencies, errors = requests.Session(), [], 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            response = session.post(url + path, json=body, headers=headers, timeout=30)
            latencies.append(time.perf_counter() - started)
            errors += response.status_code != 201
        return latencies, errors

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: client(), range(clients)))
    elapsed = time.monotonic() - started
    latencies = sorted(l for ls, _ in results for l in ls)
    return {"requests": len(latencies), "errors": sum(e for _, e in results),
            "per_second": len(latencies) / elapsed,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000}


def run_baseline(workdir, clients, seconds):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BASELINE_APP, os.path.join(workdir, "baseline.db"), str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        return drive(url, "/insert", {}, PAUSE, clients, seconds)
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def pausepoint_server(workdir, **settings):
    """`python pausepoint.py` on a fresh database with rate limits off; yields (url, test key)."""
    port = free_port()
    env = {**os.environ, "PAUSEPOINT_RATELIMIT_ENABLED": "false", "PAUSEPOINT_SECURITY_BCRYPT_ROUNDS": "4",
           "PAUSEPOINT_PAUSES_MAX_TEST_PENDING": "0", **settings}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "pausepoint.py"), "--db",
                             os.path.join(workdir, "pausepoint.db"), "--port", str(port)],
                            env=env, cwd=workdir, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        keys = requests.post(url + "/v1/auth/register",
                             json={"email": "bench@example.com", "name": "Bench", "password": "benchmark-pw"}).json()
        yield url, keys["test_api_key"]
    finally:
        proc.terminate()
        proc.wait()


def run_pausepoint(workdir, clients, seconds):
    with pausepoint_server(workdir) as (url, key):
        return drive(url, "/v1/pause", {"Authorization": f"Bearer {key}"}, PAUSE, clients, seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        baseline = run_baseline(workdir, args.clients, args.seconds)
        ours = run_pausepoint(workdir, args.clients, args.seconds)
    print(f"create-pause load: {args.clients} concurrent clients, {args.seconds:g} s each, loopback, "
          f"{os.cpu_count()} cores")
    print(f"{'':28}{'requests':>10}{'errors':>8}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, r in (("baseline (bottle+1 insert)", baseline), ("pausepoint POST /v1/pause", ours)):
        print(f"{name:28}{r['requests']:>10}{r['errors']:>8}{r['per_second']:>10.0f}{r['p50_ms']:>10.1f}"
              f"{r['p99_ms']:>10.1f}")
    print(f"pausepoint / baseline throughput: {ours['per_second'] / baseline['per_second']:.2f}")


if __name__ == "__main__":
    main()
