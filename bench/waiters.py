"""A thousand agents waiting at once: what they cost, and whether everyone else still gets answers.

Against one `python pausepoint.py`:
1. baseline: 8 clients of a third developer create a pause and answer it, in a loop, for
   `--seconds`, with nobody waiting, each pause to a number of its own (a number's reply
   codes are not reused for a week, and thousands of pauses to one number would measure
   the search for a free code); then the server's memory and threads are read from /proc.
2. `--waiters` agents of two other developers start waiting, each on a connection of its
   own from one of 20 loopback addresses (agents on different machines): four in five
   long-poll their own pause (GET /v1/pause/{id}?wait=55), one in five the event feed
   (GET /v1/events?after=…&wait=55). Once they all wait, memory and threads again, and the
   same create-and-answer load as in 1.
3. every waiter's pause is decided, 8 at a time: from each respond call starting to the
   waiting agent's answer arriving.
4. the load of 1 again with nobody waiting: the database has grown meanwhile, and this
   column shows what that alone changed.

The waiters are one selector loop on raw sockets, so the benchmark's own threads stay few.
Usage: python bench/waiters.py [--waiters 1000] [--seconds 10]
"""

import argparse
import itertools
import json
import os
import random
import selectors
import socket
import sys
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from create_throughput import PAUSE, ROOT  # noqa: E402
from table import hammer, latency, machine, memory_mb, respond, server, token  # noqa: E402
from webhook_latency import summary  # noqa: E402

LOAD_CLIENTS = 8
SOURCE_ADDRESSES = 20           # 127.0.0.2 … 127.0.0.21
WAIT_SECONDS = 55
FEED_SHARE = 5                  # one waiter in five waits on the event feed
ENV = {"PAUSEPOINT_RATELIMIT_ENABLED": "false", "PAUSEPOINT_SECURITY_BCRYPT_ROUNDS": "4",
       "PAUSEPOINT_PAUSES_MAX_TEST_PENDING": "0"}


class Waiters:
    """Agents waiting on raw sockets, driven by one selector loop; notes when each is answered."""

    def __init__(self, port):
        self.port, self.selector = port, selectors.DefaultSelector()
        self.answers, self.received, self.lock = {}, {}, threading.Lock()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.stopped = False

    def ask(self, n, path, key):
        sock = socket.socket()
        sock.bind((f"127.0.0.{2 + n % SOURCE_ADDRESSES}", 0))
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
        sock.setblocking(False)
        self.received[n] = b""
        self.selector.register(sock, selectors.EVENT_READ, n)

    def run(self):
        while not self.stopped:
            for selected, _ in self.selector.select(0.1):
                n, sock = selected.data, selected.fileobj
                data = sock.recv(65536)
                self.received[n] += data
                head, _, body = self.received[n].partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if not data or (length is not None and len(body) >= length):
                    with self.lock:
                        self.answers[n] = (time.perf_counter(), int(head.split()[1]), body)
                    self.selector.unregister(sock)
                    sock.close()

    def answered(self):
        with self.lock:
            return dict(self.answers)


def register(url, email):
    return requests.post(url + "/v1/auth/register",
                         json={"email": email, "name": "Bench", "password": "benchmark-pw"}).json()["test_api_key"]


def process_figures(pid):
    with open(f"/proc/{pid}/status") as status:
        threads = next(int(line.split()[1]) for line in status if line.startswith("Threads:"))
    rss, _ = memory_mb(pid)
    return {"rss_mb": rss, "threads": threads}


def create_and_answer(url, auth):
    """A call for hammer(): create a pause, then answer it; both timed, as two requests."""
    timings, numbers = {"create": [], "respond": []}, itertools.count(random.randrange(10**6))

    def call(session):
        started = time.perf_counter()
        body = {**PAUSE, "recipient": f"+1555{next(numbers):07d}"}
        created = session.post(url + "/v1/pause", json=body, headers=auth, timeout=60)
        timings["create"].append(time.perf_counter() - started)
        started = time.perf_counter()
        answered = respond(session, url, token(created.json())) if created.status_code == 201 else None
        timings["respond"].append(time.perf_counter() - started)
        return created.status_code == 201 and answered is not None and answered.status_code == 200
    return call, timings


def load(url, auth, seconds):
    call, timings = create_and_answer(url, auth)
    overall = hammer(call, seconds, LOAD_CLIENTS)
    return {"pairs_per_second": overall["per_second"], "failures": overall["failures"],
            **{name: summary(values) for name, values in timings.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    if args.waiters < FEED_SHARE:
        parser.error(f"--waiters must be at least {FEED_SHARE}")
    workdir = os.path.abspath(os.path.join("/tmp", f"pausepoint-waiters-{os.getpid()}"))
    os.makedirs(workdir)
    db = os.path.join(workdir, "pausepoint.db")
    command = lambda port: [os.path.join(ROOT, "pausepoint.py"), "--db", db, "--port", str(port)]  # noqa: E731
    with server(command, db + ".log", ENV) as (url, proc, _):
        port = int(url.rsplit(":", 1)[1])
        other = {"Authorization": f"Bearer {register(url, 'other@example.com')}"}
        keys = [register(url, f"waiter{n}@example.com") for n in range(2)]

        print("baseline: nobody waiting", file=sys.stderr)
        baseline = load(url, other, args.seconds)
        idle = process_figures(proc.pid)            # after a load, so both columns count what a load leaves

        print(f"{args.waiters} agents start waiting", file=sys.stderr)
        session, waiters = requests.Session(), Waiters(port)
        pauses, after = {}, {}
        for key in keys:
            events = session.get(url + "/v1/events", headers={"Authorization": f"Bearer {key}"}).json()["events"]
            after[key] = events[-1]["id"] if events else None
        for n in range(args.waiters):
            key = keys[n % 2]
            if n % FEED_SHARE == FEED_SHARE - 1:
                continue
            pauses[n] = session.post(url + "/v1/pause", json=PAUSE, headers={"Authorization": f"Bearer {key}"}).json()
        for key in keys:        # the feed waiters start after the creates' events, so they wait
            while events := session.get(url + "/v1/events", headers={"Authorization": f"Bearer {key}"},
                                        params={"after": after[key], "limit": 100}).json()["events"]:
                after[key] = events[-1]["id"]
        waiters.thread.start()
        for n in range(args.waiters):
            key = keys[n % 2]
            path = (f"/v1/pause/{pauses[n]['pause_id']}?wait={WAIT_SECONDS}" if n in pauses
                    else f"/v1/events?after={after[key]}&wait={WAIT_SECONDS}")
            waiters.ask(n, path, key)
        time.sleep(3)
        early = waiters.answered()
        if early:
            statuses = sorted({status for _, status, _ in early.values()})
            raise SystemExit(f"{len(early)} waiters were answered before anything was decided (HTTP {statuses})")
        waiting = process_figures(proc.pid)
        loaded = load(url, other, args.seconds)
        early = waiters.answered()

        print("deciding the waiters' pauses", file=sys.stderr)
        decided_at = {}

        def decide(session):
            with lock:
                if not queue:
                    return None
                n = queue.pop()
            decided_at[n] = time.perf_counter()
            answer = respond(session, url, token(pauses[n]))
            return answer.status_code == 200
        queue, lock = list(pauses), threading.Lock()
        decisions = hammer(decide, 600, LOAD_CLIENTS)
        deadline = time.monotonic() + 30
        while len(waiters.answered()) < args.waiters and time.monotonic() < deadline:
            time.sleep(0.1)
        answered = waiters.answered()
        waiters.stopped = True
        wake = summary([answered[n][0] - decided_at[n] for n in pauses if n in answered] or [0.0])
        statuses = sorted(json.loads(body).get("status", "?") for n, (_, _, body) in answered.items() if n in pauses)
        decided = sum(status == "responded" for status in statuses)
        readers = [answered.get(n) for n in range(args.waiters) if n not in pauses]
        fed = sum(1 for reader in readers if reader and reader[1] == 200 and json.loads(reader[2])["events"])

        print("again with nobody waiting", file=sys.stderr)
        after_load = load(url, other, args.seconds)
        gone = process_figures(proc.pid)

    print(machine())
    print(f"\n{args.waiters} agents waiting at once ({len(pauses)} on their pause, {args.waiters - len(pauses)} on the"
          f" event feed), while {LOAD_CLIENTS} clients of another developer create and answer pauses for"
          f" {args.seconds:g} s:\n")
    columns = (baseline, loaded, after_load)
    print(f"| | nobody waiting (baseline) | {args.waiters} waiting | nobody waiting again (after) |")
    print("|---|---|---|---|")
    print("| POST /v1/pause | %s | %s | %s |" % tuple(latency(c["create"]) for c in columns))
    print("| POST /v1/respond/{token} | %s | %s | %s |" % tuple(latency(c["respond"]) for c in columns))
    print("| create + answer pairs | %.0f/s | %.0f/s | %.0f/s |" % tuple(c["pairs_per_second"] for c in columns))
    print("| failed requests | %d | %d | %d |" % tuple(c["failures"] for c in columns))
    print("| server memory (RSS) | %.0f MB | %.0f MB | %.0f MB |" % tuple(f["rss_mb"] for f in (idle, waiting, gone)))
    print("| server threads | %d | %d | %d |" % tuple(f["threads"] for f in (idle, waiting, gone)))
    print(f"\nWaiters answered before their decision: {len(early)}. Their {len(pauses)} pauses decided at"
          f" {decisions['per_second']:.0f}/s: {decided} waiters answered 'responded', {len(pauses) - len(answered.keys() & pauses.keys())}"
          f" not answered; from the respond call to the waiter's answer: {latency(wake)}, max {wake['max']:.1f} ms."
          f" Feed readers answered with events: {fed} of {len(readers)}.")


if __name__ == "__main__":
    main()
