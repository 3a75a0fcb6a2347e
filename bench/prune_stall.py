"""How long other writers wait while the hourly prune deletes a big developer's test data.

One developer makes `--pauses` ten-person test pauses (email, two reminders, some
metadata), which all time out; the server is stopped and its file kept. Then the
same file is served twice, while four clients of another developer create pauses
for `--seconds`:
  * baseline: the pauses were decided just now, so the prune, 5 s after start,
    finds nothing past retention;
  * prune: every decision is moved two hours back first, so the prune takes all
    but the newest retention.test_pauses_kept (2,000) of them, with their people,
    notifications, steps, audit events and event feed.
Prints, for each, the creates made, their p50, p99 and slowest, the slowest within
the prune's run, and what the prune deleted and how long it took.

Usage: python bench/prune_stall.py [--pauses 6000] [--seconds 40] [--server PATH/pausepoint.py]
Only loopback traffic.
"""

import argparse
import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"PAUSEPOINT_SECURITY_BCRYPT_ROUNDS": "4", "PAUSEPOINT_RATELIMIT_ENABLED": "false",
       "PAUSEPOINT_PAUSES_MAX_TEST_PENDING": "0", "PAUSEPOINT_DATABASE_MIN_FREE_MB": "1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(server, db_path):
    """The server on `db_path`, its log beside it; yields (url, the log's path)."""
    port, log_path = free_port(), db_path + ".log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, server, "--db", db_path, "--port", str(port)], stdout=log,
                                stderr=log, cwd=os.path.dirname(db_path), env={**os.environ, **ENV})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}; see {log_path}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.05)
        yield url, log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def register(url, email):
    answer = requests.post(url + "/v1/auth/register", json={"email": email, "name": "Bench", "password": "benchmark-pw"})
    answer.raise_for_status()
    return answer.json()["test_api_key"]


def team_pause(n):
    return {"recipients": [{"recipient": f"p{k}-{n}@example.com", "channel": "email"} for k in range(10)],
            "message": f"Team question {n}: " + "x" * 200, "options": ["Approve", "Reject"],
            "timeout_hours": 2 / 3600, "timeout_default": "Reject", "remind_after_minutes": [0.01, 0.02],
            "metadata": {"n": n, "padding": "y" * 500}}


def build(server, db_path, pauses):
    """The file, with `pauses` decided team pauses of one developer; returns the other's key."""
    with serving(server, db_path) as (url, _):
        big, other = register(url, "big@example.com"), register(url, "other@example.com")

        def make(n):
            with requests.Session() as session:
                for m in range(n, pauses, 4):
                    session.post(url + "/v1/pause", json=team_pause(m),
                                 headers={"Authorization": f"Bearer {big}"}).raise_for_status()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(make, range(4)))
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            while conn.execute("SELECT count(*) FROM pauses WHERE status = 'pending'").fetchone()[0]:
                time.sleep(1)
    return other


def creates_while_serving(server, db_path, key, seconds):
    """[(seconds since start, latency)] of four clients' creates, and the prune's log line."""
    latencies = []
    with serving(server, db_path) as (url, log_path):
        started, served_at = time.monotonic(), time.time()

        def client(n):
            with requests.Session() as session:
                while time.monotonic() - started < seconds:
                    before = time.monotonic()
                    session.post(url + "/v1/pause", json={"recipient": f"c{n}@example.com", "channel": "email",
                                                          "message": "Approve?", "options": ["Yes", "No"],
                                                          "timeout_hours": 1},
                                 headers={"Authorization": f"Bearer {key}"}).raise_for_status()
                    latencies.append((before - started, time.monotonic() - before))
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(client, range(4)))
    with open(log_path, errors="replace") as log:
        pruned = [(took_since(served_at, at), what) for at, what in
                  re.findall(r"(\d\d:\d\d:\d\d,\d+) \S+ \S+ pruned past retention: (.*)", log.read())]
    return latencies, pruned


def took_since(served_at, logged_at):
    """Seconds from the server's fifth (when it starts pruning) to a log line's time of day."""
    clock, millis = logged_at.split(",")
    day = time.strftime("%Y-%m-%d", time.localtime(served_at))
    at = time.mktime(time.strptime(f"{day} {clock}", "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
    return at - served_at - 5


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pauses", type=int, default=6000)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--server", default=os.path.join(ROOT, "pausepoint.py"), metavar="PATH")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        base = os.path.join(workdir, "base.db")
        started = time.monotonic()
        key = build(args.server, base, args.pauses)
        print(f"built {args.pauses} ten-person test pauses in {time.monotonic() - started:.0f} s", file=sys.stderr)
        results = {}
        for run in ("baseline", "prune"):
            db_path = os.path.join(workdir, f"{run}.db")
            shutil.copy(base, db_path)
            shutil.copy(base + ".keys.json", db_path + ".keys.json")
            if run == "prune":
                with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
                    conn.execute("UPDATE pauses SET decided_at = strftime('%Y-%m-%dT%H:%M:%fZ', decided_at, '-2 hours')")
            results[run] = creates_while_serving(args.server, db_path, key, args.seconds)
    print(f"creates by 4 clients of another developer for {args.seconds:g} s, the prune starting 5 s in; "
          f"{args.pauses} ten-person test pauses; {os.cpu_count()} cores")
    print(f"{'':10}{'creates':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'max 5-25 s':>12}  pruned")
    for run, (latencies, pruned) in results.items():
        times = sorted(latency for _, latency in latencies)
        during = [latency for at, latency in latencies if 5 <= at < 25]
        print(f"{run:10}{len(times):>9}{statistics.median(times) * 1000:>9.1f}"
              f"{times[int(len(times) * 0.99)] * 1000:>9.1f}{times[-1] * 1000:>9.0f}{max(during) * 1000:>12.0f}  "
              + ("; ".join(f"in {took:.1f} s: {what}" for took, what in pruned) or "nothing"))


if __name__ == "__main__":
    main()
