"""Sign-in latency of one client while another address floods the password check, beside
the same sign-ins with no flood.

Runs `python pausepoint.py` on loopback with production bcrypt cost (12, unless --rounds),
rate limits off (so the flood is not simply refused), and:
  * quiet: one client on 127.0.0.1 rotates its key (a password check) --signins times;
  * flood: the same, while --flooders connections from 127.0.0.2 send key rotations with
    a wrong password as fast as they are answered.

Usage: python bench/sign_in_during_flood.py [--rounds 12] [--flooders 32] [--signins 20]
Prints p50 and max latency and how many sign-ins were refused (503) in each case.
"""

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from create_throughput import pausepoint_server  # noqa: E402


def rotate(connection, email, password):
    body = json.dumps({"email": email, "password": password, "key": "test"})
    connection.request("POST", "/v1/auth/keys/rotate", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response.status


def sign_ins(port, count):
    """(latencies in seconds, statuses) of `count` sign-ins, one after another, from 127.0.0.1."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies, statuses = [], []
    for _ in range(count):
        started = time.perf_counter()
        statuses.append(rotate(connection, "bench@example.com", "benchmark-pw"))
        latencies.append(time.perf_counter() - started)
    return latencies, statuses


def flood(port, stop):
    """Wrong-password rotations from 127.0.0.2 on one kept-alive connection until `stop`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=("127.0.0.2", 0))
    while not stop.is_set():
        try:
            rotate(connection, "flood@example.com", "not-the-password")
        except (OSError, http.client.HTTPException):
            connection.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--flooders", type=int, default=32)
    parser.add_argument("--signins", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir, \
            pausepoint_server(workdir, PAUSEPOINT_SECURITY_BCRYPT_ROUNDS=str(args.rounds)) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        quiet = sign_ins(port, args.signins)
        stop = threading.Event()
        flooders = [threading.Thread(target=flood, args=(port, stop)) for _ in range(args.flooders)]
        for thread in flooders:
            thread.start()
        time.sleep(2)                                   # the flood's requests fill their share first
        flooded = sign_ins(port, args.signins)
        stop.set()
        for thread in flooders:
            thread.join()
    print(f"sign-in (key rotation) latency, bcrypt cost {args.rounds}, {args.flooders} flooding connections from"
          f" another address, {os.cpu_count()} cores")
    print(f"{'':24}{'sign-ins':>10}{'refused':>9}{'p50 ms':>10}{'max ms':>10}")
    for name, (latencies, statuses) in (("quiet", quiet), ("during the flood", flooded)):
        print(f"{name:24}{len(latencies):>10}{sum(s == 503 for s in statuses):>9}"
              f"{statistics.median(latencies) * 1000:>10.0f}{max(latencies) * 1000:>10.0f}")


if __name__ == "__main__":
    main()
