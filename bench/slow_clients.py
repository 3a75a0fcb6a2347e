"""What a well-behaved client sees while an attacker holds slow connections open.

Starts `python pausepoint.py` and times GET /healthz, POST /v1/pause and POST
/v1/respond/{token} from 127.0.0.1, each on a new connection, first with nobody
else connected (the baseline), then while an attacker on 127.0.0.2 opens
--connections connections, each sending "GET / HTTP/1.1" and then one header
line every 5 s; with --reconnect it opens a new one whenever the server closes
one, which turns it into a connection flood.

Usage: python bench/slow_clients.py [--connections 2000] [--rounds 200] [--threads 64] [--addresses 1] [--reconnect]
With --addresses N the attack comes from N addresses (127.0.1.1 …), to show
shedding at the connection limit rather than the per-address cap.
"""

import argparse
import os
import resource
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from create_throughput import PAUSE, pausepoint_server  # noqa: E402


class SlowAttack:
    """Keeps `connections` trickling connections open against `port`, from `addresses`."""

    def __init__(self, port, connections, addresses, reconnect):
        self.port, self.connections, self.addresses, self.reconnect = port, connections, addresses, reconnect
        self.selector = selectors.DefaultSelector()
        self.opened = self.dropped = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def connect(self, n):
        sock = socket.socket()
        sock.bind((self.addresses[n % len(self.addresses)], 0))
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        self.selector.register(sock, selectors.EVENT_READ, n)
        self.opened += 1
        return sock

    def run(self):
        socks = {n: self.connect(n) for n in range(self.connections)}
        started, next_line = set(), time.monotonic() + 0.5
        while not self.stop.is_set():
            for key, _ in self.selector.select(timeout=0.2) if socks else time.sleep(0.2) or ():
                # Readable: the server closed it.
                n = key.data
                self.selector.unregister(key.fileobj)
                key.fileobj.close()
                self.dropped += 1
                started.discard(n)
                if self.reconnect:
                    socks[n] = self.connect(n)
                else:
                    del socks[n]
            if time.monotonic() >= next_line:
                next_line += 5
                for n, sock in socks.items():
                    try:
                        sock.send(b"X-Slow: 1\r\n" if n in started else b"GET / HTTP/1.1\r\n")
                        started.add(n)
                    except OSError:
                        pass
        for sock in socks.values():
            sock.close()

    def held(self):
        """Connections not yet seen closed by the server."""
        return self.opened - self.dropped

    def __enter__(self):
        self.thread.start()
        time.sleep(3)               # let the attack build up
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def measure(url, key, rounds):
    """Latency of health, create and respond, each on a fresh connection, `rounds` times."""
    auth = {"Authorization": f"Bearer {key}"}
    timings = {"GET /healthz": [], "POST /v1/pause": [], "POST /v1/respond": [], "failures": 0}
    for _ in range(rounds):
        try:
            started = time.perf_counter()
            requests.get(f"{url}/healthz", timeout=10).raise_for_status()
            timings["GET /healthz"].append(time.perf_counter() - started)
            started = time.perf_counter()
            created = requests.post(f"{url}/v1/pause", json=PAUSE, headers=auth, timeout=10)
            created.raise_for_status()
            timings["POST /v1/pause"].append(time.perf_counter() - started)
            started = time.perf_counter()
            requests.post(f"{url}/v1/respond/{created.json()['respond_url'].rsplit('/', 1)[1]}",
                          json={"choice": "Approve"}, timeout=10).raise_for_status()
            timings["POST /v1/respond"].append(time.perf_counter() - started)
        except requests.RequestException:
            timings["failures"] += 1
    return timings


def row(name, values):
    if not values:
        return f"{name:34}{'-':>8}{'-':>10}{'-':>10}{'-':>10}"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"{name:34}{len(ordered):>8}{statistics.median(ordered) * 1000:>10.1f}{p99 * 1000:>10.1f}"
            f"{ordered[-1] * 1000:>10.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--addresses", type=int, default=1)
    parser.add_argument("--reconnect", action="store_true",
                        help="open a new connection whenever the server closes one (a connection flood)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    addresses = ["127.0.0.2"] if args.addresses == 1 else [f"127.0.1.{n + 1}" for n in range(args.addresses)]
    with tempfile.TemporaryDirectory() as workdir:
        with pausepoint_server(workdir, PAUSEPOINT_SERVER_THREADS=str(args.threads)) as (url, key):
            baseline = measure(url, key, args.rounds)
            with SlowAttack(int(url.rsplit(":", 1)[1]), args.connections, addresses, args.reconnect) as attack:
                attacked = measure(url, key, args.rounds)
                held, opened = attack.held(), attack.opened
    print(f"slow clients: {args.connections} trickling connections from {len(addresses)} address(es)"
          f"{', reopened as soon as closed' if args.reconnect else ''}, "
          f"server.threads = {args.threads}, {args.rounds} rounds, loopback, {os.cpu_count()} cores")
    print(f"{'':34}{'n':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for op in ("GET /healthz", "POST /v1/pause", "POST /v1/respond"):
        print(row(f"{op} (nobody else)", baseline[op]))
        print(row(f"{op} (under attack)", attacked[op]))
    print(f"failed rounds: {baseline['failures']} without the attack, {attacked['failures']} under it")
    print(f"attacker: {opened} connections opened in all, {held} not yet seen closed at the end")


if __name__ == "__main__":
    main()
