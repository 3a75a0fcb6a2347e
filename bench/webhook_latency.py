"""Decision-to-delivery latency of pause.responded webhooks, beside a baseline.

Starts `python pausepoint.py` (webhooks.allow_private on, rate limits off) and a
webhook receiver on loopback, creates N pauses with a test key, then records a
decision for each through POST /v1/respond/{token} and times how long after the
decision request *started* its signed webhook arrives. That start is before the
decision commits, so the figure is an upper bound; the time the decision request
itself took is printed beneath it.

Baseline, in the same run: the same receiver getting the same number of POSTs
straight from this process (one loopback HTTP round trip, no PausePoint).
The receiver runs in a process of its own, so the deciding threads do not
delay it.

Usage: python bench/webhook_latency.py [--decisions 1000] [--concurrency 1]
"""

import argparse
import concurrent.futures
import http.server
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from create_throughput import PAUSE, free_port, pausepoint_server  # noqa: E402


class Receiver:
    """A webhook receiver in its own process, so the load generator's threads do
    not delay it. It notes when each pause's event arrived (wall clock, same
    machine); GET /arrival/<key> waits for that moment and returns it."""

    def __init__(self):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/hook"
        self.process = multiprocessing.Process(target=self.serve, args=(port,), daemon=True)
        self.process.start()
        for _ in range(100):
            try:
                requests.get(f"http://127.0.0.1:{port}/arrival/ready", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.05)

    @staticmethod
    def serve(port):
        arrivals, cond = {"ready": 0.0}, threading.Condition()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                arrived = time.time()
                key = json.loads(body).get("data", {}).get("pause_id") or self.headers.get("X-Probe")
                with cond:
                    arrivals[key] = arrived
                    cond.notify_all()
                self.answer(b"")

            def do_GET(self):
                key = self.path.rsplit("/", 1)[1]
                with cond:
                    cond.wait_for(lambda: key in arrivals, 30)
                    self.answer(repr(arrivals.get(key, -1.0)).encode())

            def answer(self, data):
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()

    def wait(self, key):
        arrived = float(session().get(self.url.replace("/hook", f"/arrival/{key}"), timeout=40).text)
        if arrived < 0:
            raise SystemExit(f"no delivery for {key} within 30 s")
        return arrived


_sessions = threading.local()


def session():
    """One keep-alive session per client thread."""
    if not hasattr(_sessions, "session"):
        _sessions.session = requests.Session()
    return _sessions.session


def summary(latencies):
    ordered = sorted(latencies)
    return {"n": len(ordered), "p50": statistics.median(ordered) * 1000,
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, "max": ordered[-1] * 1000}


def run_baseline(receiver, count, concurrency):
    def probe(n):
        started = time.time()
        session().post(receiver.url, data=b'{"data": {}}', headers={"X-Probe": f"probe-{n}"})
        return receiver.wait(f"probe-{n}") - started

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return summary(list(pool.map(probe, range(count))))


def run_pausepoint(receiver, workdir, count, concurrency):
    with pausepoint_server(workdir, PAUSEPOINT_WEBHOOKS_ALLOW_PRIVATE="true") as (url, key):
        auth = {"Authorization": f"Bearer {key}"}
        requests.post(url + "/v1/webhooks", json={"url": receiver.url, "events": ["pause.responded"],
                                                  "secret": "whsec_benchmark_secret_000"}, headers=auth).raise_for_status()
        pauses = [session().post(url + "/v1/pause", json=PAUSE, headers=auth).json() for _ in range(count)]
        time.sleep(1)        # let the simulated notifications settle before timing

        def decide(pause):
            started = time.time()
            session().post(f"{url}/v1/respond/{pause['respond_url'].rsplit('/', 1)[1]}",
                           json={"choice": "Approve"}).raise_for_status()
            answered = time.time()
            return answered - started, receiver.wait(pause["pause_id"]) - started

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            timings = list(pool.map(decide, pauses))
        return summary([t[0] for t in timings]), summary([t[1] for t in timings])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    receiver = Receiver()
    with tempfile.TemporaryDirectory() as workdir:
        baseline = run_baseline(receiver, args.decisions, args.concurrency)
        decision, delivery = run_pausepoint(receiver, workdir, args.decisions, args.concurrency)
    print(f"decision-to-delivery, {args.decisions} decisions, {args.concurrency} at a time, loopback, "
          f"{os.cpu_count()} cores")
    print(f"{'':36}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    rows = (("baseline (direct POST to receiver)", baseline), ("pausepoint decision -> webhook", delivery),
            ("  of which the decision request", decision))
    for name, r in rows:
        print(f"{name:36}{r['n']:>6}{r['p50']:>10.1f}{r['p99']:>10.1f}{r['max']:>10.1f}")


if __name__ == "__main__":
    main()
