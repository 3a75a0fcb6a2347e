"""One tenant's stalling webhook receivers against another tenant's deliveries.

Two runs of `python pausepoint.py`, each on a fresh database, timing developer
B's pause.responded webhooks from the start of each decision request to the
event's arrival at a loopback receiver:
  * baseline: B alone;
  * stalling tenant: developer A has the maximum 16 endpoints, all pointing at
    a receiver that accepts the POST and then answers one byte a second, and
    keeps creating pauses so that every endpoint always has deliveries waiting.

Usage: python bench/webhook_fairness.py [--decisions 100] [--workers 16] [--per-developer 4]
"""

import argparse
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from create_throughput import PAUSE, free_port, pausepoint_server  # noqa: E402
from webhook_latency import Receiver, session, summary  # noqa: E402


def trickle(port, most_open):
    """Accept, read the request, then answer a byte a second, for ever; note the most connections held at once."""
    listener = socket.create_server(("127.0.0.1", port))
    lock, held = threading.Lock(), [0]

    def serve(conn):
        with lock:
            held[0] += 1
            most_open.value = max(most_open.value, held[0])
        try:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" * 100:
                time.sleep(1)
                conn.sendall(bytes([byte]))
        except OSError:
            pass
        finally:
            conn.close()
            with lock:
                held[0] -= 1

    while True:
        threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()


def register(url, email):
    keys = requests.post(url + "/v1/auth/register", json={"email": email, "name": "N", "password": "benchmark-pw"}).json()
    return {"Authorization": f"Bearer {keys['test_api_key']}"}


def deliveries_to_b(url, receiver, decisions):
    """B's decision-to-delivery latencies, one decision at a time."""
    auth = register(url, "b@example.com")
    requests.post(url + "/v1/webhooks", json={"url": receiver.url, "events": ["pause.responded"]},
                  headers=auth).raise_for_status()
    latencies = []
    for _ in range(decisions):
        pause = session().post(url + "/v1/pause", json=PAUSE, headers=auth).json()
        started = time.time()
        session().post(f"{url}/v1/respond/{pause['respond_url'].rsplit('/', 1)[1]}",
                       json={"choice": "Approve"}).raise_for_status()
        latencies.append(receiver.wait(pause["pause_id"]) - started)
    return summary(latencies)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=100)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--per-developer", type=int, default=4)
    args = parser.parse_args()
    settings = {"PAUSEPOINT_WEBHOOKS_ALLOW_PRIVATE": "true", "PAUSEPOINT_OUTBOUND_WORKERS": str(args.workers),
                "PAUSEPOINT_OUTBOUND_PER_DEVELOPER": str(args.per_developer)}
    receiver = Receiver()
    most_open = multiprocessing.Value("i", 0)
    trickle_port = free_port()
    multiprocessing.Process(target=trickle, args=(trickle_port, most_open), daemon=True).start()
    with tempfile.TemporaryDirectory() as workdir:
        for run in ("alone", "stalled"):
            os.mkdir(os.path.join(workdir, run))
        with pausepoint_server(os.path.join(workdir, "alone"), **settings) as (url, _):
            alone = deliveries_to_b(url, receiver, args.decisions)
        with pausepoint_server(os.path.join(workdir, "stalled"), **settings) as (url, _):
            stalling = register(url, "a@example.com")
            for n in range(16):
                requests.post(url + "/v1/webhooks", headers=stalling, json={
                    "url": f"http://127.0.0.1:{trickle_port}/{n}", "events": ["pause.created"]}).raise_for_status()
            stop = threading.Event()

            def keep_creating():
                while not stop.wait(0.5):
                    requests.post(url + "/v1/pause", json=PAUSE, headers=stalling)

            threading.Thread(target=keep_creating, daemon=True).start()
            time.sleep(3)                       # A's calls now hold A's share of the workers
            stalled = deliveries_to_b(url, receiver, args.decisions)
            stop.set()
    print(f"webhook fairness: {args.decisions} decisions by B, one at a time; outbound.workers = {args.workers},"
          f" outbound.per_developer = {args.per_developer}; loopback, {os.cpu_count()} cores")
    print(f"{'':44}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, r in (("B's decision -> webhook, B alone", alone),
                    ("B's decision -> webhook, A's 16 stalling", stalled)):
        print(f"{name:44}{r['n']:>6}{r['p50']:>10.1f}{r['p99']:>10.1f}{r['max']:>10.1f}")
    print(f"A's calls held at once by its stalling receiver, at most: {most_open.value}")


if __name__ == "__main__":
    main()
