"""One command, one table: PausePoint's figures, each beside the bare stack's ceiling, in the same run.

The ceiling is what Bottle + waitress + SQLite do here with nothing of PausePoint's
in the way: BARE_APP, with PausePoint's threads and PRAGMAs and its paths, whose
handlers do one insert, one select by key, one select of 50 rows or one update,
on a table as long as PausePoint's. The same clients drive both, in turn.

PausePoint's database is grown in place: one pause made through the API is
copied straight into the SQLite file, with the server stopped, up to `total`
pauses of which `pending` are pending. Start-up is timed on that file; then the
pending copies are made due within one 10 s window opening a few seconds after
the next start, and the timeout job's lateness (decided_at - expires_at) is read
back from the file. The API load, memory, webhooks and long polls follow on
that same server.

Usage: python bench/table.py [--quick] [--server PATH/pausepoint.py]
--quick uses smaller sizes and takes about a minute; the full run up to about
ten. Progress goes to stderr, the table (GitHub Markdown) to stdout.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import json
import os
import platform
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from create_throughput import PAUSE, ROOT, free_port  # noqa: E402
from webhook_latency import Receiver, run_baseline, summary  # noqa: E402

CLIENTS = 16
THREADS = 64                # PausePoint's server.threads default; the bare server gets as many
WINDOW_SECONDS = 10         # the preloaded pending pauses all fall due within this window…
LEAD_SECONDS = 3            # …which opens about this long after the server is up
LONG_POLLERS = 10           # agents waiting at once in the long-poll row
# Choosing a reply code costs more the more pauses a number has pending: the timeout-burst client
# texts a number of its own, so the create row's number starts with one pending, not thousands.
OTHER_NUMBER = {**PAUSE, "recipient": "+15550199"}
PAUSEPOINT_ENV = {"PAUSEPOINT_RATELIMIT_ENABLED": "false", "PAUSEPOINT_SECURITY_BCRYPT_ROUNDS": "4",
                  "PAUSEPOINT_WEBHOOKS_ALLOW_PRIVATE": "true", "PAUSEPOINT_PAUSES_MAX_TEST_PENDING": "0"}


# Seconds of each load row; decisions timed in the webhook and long-poll rows; preloaded pauses
# pending (all falling due in one window) and in all (the bare server's table is as long).
Sizes = collections.namedtuple("Sizes", "seconds decisions pending total")
FULL, QUICK = Sizes(10, 100, 100_000, 1_000_000), Sizes(3, 30, 10_000, 100_000)

BARE_APP = textwrap.dedent("""
    import json, sqlite3, sys, threading, bottle, waitress
    path, port, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    local = threading.local()
    def db():
        if not hasattr(local, "conn"):
            local.conn = sqlite3.connect(path, isolation_level=None, timeout=30)
            for pragma in ("journal_mode = WAL", "synchronous = FULL", "foreign_keys = ON", "busy_timeout = 30000"):
                local.conn.execute("PRAGMA " + pragma)
        return local.conn
    def pause(row):
        return {"pause_id": row[0], **json.loads(row[1]), "status": row[2], "respond_url": f"/respond/{row[0]}"}
    app = bottle.Bottle()
    @app.post("/v1/pause")
    def create():
        cur = db().execute("INSERT INTO pauses (body) VALUES (?)", (bottle.request.body.read().decode(),))
        bottle.response.status = 201
        return {"pause_id": cur.lastrowid, "respond_url": f"/respond/{cur.lastrowid}"}
    @app.get("/v1/pause/<pause_id:int>")
    def get(pause_id):
        return pause(db().execute("SELECT id, body, status FROM pauses WHERE id = ?", (pause_id,)).fetchone())
    @app.get("/v1/pause")
    def list_pauses():
        rows = db().execute("SELECT id, body, status FROM pauses ORDER BY id DESC LIMIT 50").fetchall()
        return {"pauses": [pause(row) for row in rows]}
    @app.post("/v1/respond/<pause_id:int>")
    def respond(pause_id):
        choice = json.loads(bottle.request.body.read())["choice"]
        db().execute("UPDATE pauses SET status = 'responded', choice = ? WHERE id = ? AND status = 'pending'",
                     (choice, pause_id))
        return {"status": "responded", "choice": choice}
    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}
    waitress.serve(app, host="127.0.0.1", port=port, threads=threads, _quiet=True)
""")
BARE_SCHEMA = """CREATE TABLE pauses (id INTEGER PRIMARY KEY, body TEXT NOT NULL,
                                      status TEXT NOT NULL DEFAULT 'pending', choice TEXT)"""
FILL_BARE = """WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
               INSERT INTO pauses (body, status) SELECT ?, 'responded' FROM n"""

# Copies of the template pause: each with its own id, token and recipient (a reply code is
# unique among one number's pending pauses), decided or pending as asked.
COPY_PAUSES = """
    WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)
    INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options, timeout_default, metadata,
                        status, choice, decided_at, decided_by, respond_token, reply_code, created_at, expires_at)
    -- Ordered ids, as the server makes them: each copy's stands for one made a millisecond after the last.
    SELECT 'psr_' || printf('%012x', :first + i) || lower(hex(randomblob(10))), developer_id, livemode,
           printf('+1555%07d', :first + i), channel,
           message, options, timeout_default, metadata, :status, :choice, :decided_at,
           CASE WHEN :choice IS NOT NULL THEN 'recipient:' || printf('+1555%07d', :first + i) END,
           lower(hex(randomblob(32))), reply_code, created_at, expires_at
    FROM n, pauses WHERE pauses.id = :template
"""
COPY_NOTIFICATIONS = """
    INSERT INTO notifications (id, pause_id, developer_id, channel, recipient, livemode, text, status, attempts,
                               next_attempt_at, created_at, updated_at)
    SELECT 'ntf_' || lower(hex(randomblob(16))), p.id, t.developer_id, t.channel, p.recipient, t.livemode, t.text,
           t.status, t.attempts, t.next_attempt_at, t.created_at, t.updated_at
    FROM pauses p, notifications t WHERE t.pause_id = :template AND p.seq > :after
"""
# Each copy's 'pause.created' audit event, so the owner's audit log is as long as their pauses
# (with a stand-in for the chain's hashes: computing them is the server's job, not the copy's).
COPY_AUDIT = """
    INSERT INTO audit_events (developer_id, livemode, timestamp, actor, event_type, pause_id, data, prev_hash, hash)
    SELECT developer_id, livemode, created_at, 'api_key:test', 'pause.created', id, '{}', 'copied', 'copied'
    FROM pauses WHERE seq > :after
"""
SPREAD_EXPIRY = """
    UPDATE pauses SET expires_at = strftime('%Y-%m-%dT%H:%M:%fZ', :start + :window * (seq - :first) / :count,
                                            'unixepoch')
    WHERE seq BETWEEN :first AND :last
"""
SECONDS_LATE = "(julianday(decided_at) - julianday(expires_at)) * 86400"


###############################################################################
# Servers
###############################################################################

@contextlib.contextmanager
def server(command, log_path, env=None):
    """command(port) run on a free loopback port; yields (url, process, seconds from spawn to /healthz 200)."""
    port = free_port()
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, *command(port)], stdout=log, stderr=log,
                                env={**os.environ, **(env or {})})
    try:
        url = f"http://127.0.0.1:{port}"
        yield url, proc, until_healthy(url, proc, started, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def until_healthy(url, proc, started, log_path, patience=120):
    while time.perf_counter() - started < patience:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as log:
                raise SystemExit(f"server exited with {proc.returncode}:\n{log.read()[-2000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return time.perf_counter() - started
        time.sleep(0.01)
    raise SystemExit(f"server did not answer /healthz within {patience} s")


def bare_server(db):
    return server(lambda port: ["-c", BARE_APP, db, str(port), str(THREADS)], db + ".log")


def pausepoint(db, program):
    return server(lambda port: [program, "--db", db, "--port", str(port), "--host", "127.0.0.1"], db + ".log",
                  PAUSEPOINT_ENV)


def memory_mb(pid):
    """(VmRSS, VmHWM) of a process, in MB."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return tuple(int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM"))


###############################################################################
# Clients: load, decisions seen by a webhook receiver and by a waiting agent
###############################################################################

def hammer(call, seconds, clients=CLIENTS):
    """`clients` threads, each with its own keep-alive session, making call(session) for `seconds`
    or until it returns None (nothing left to do); call returns whether the request worked."""
    deadline = time.monotonic() + seconds

    def client():
        session, latencies, failures = requests.Session(), [], 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            worked = call(session)
            if worked is None:
                break
            latencies.append(time.perf_counter() - started)
            failures += not worked
        return latencies, failures

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: client(), range(clients)))
    latencies = [latency for some, _ in results for latency in some]
    return {**summary(latencies), "per_second": len(latencies) / (time.monotonic() - started),
            "failures": sum(failures for _, failures in results)}


def creating(url, headers, created=None, until=lambda: False, body=PAUSE):
    """A call for hammer(): create a pause (noting its answer in `created`), until until() is true."""
    def create(session):
        if until():
            return None
        answer = session.post(url + "/v1/pause", json=body, headers=headers, timeout=60)
        if answer.status_code == 201 and created is not None:
            created.append(answer.json())
        return answer.status_code == 201
    return create


def token(pause):
    return pause["respond_url"].rsplit("/", 1)[1]


def respond(session, url, respond_token):
    return session.post(f"{url}/v1/respond/{respond_token}", json={"choice": "Approve"})


def api_load(url, headers, seconds):
    """Create, get, list and respond, `seconds` each: the same calls against either server.
    Respond answers the pauses the create row made, each once."""
    created = []
    figures = {"create": hammer(creating(url, headers, created), seconds)}
    ids = [pause["pause_id"] for pause in created]
    figures["get"] = hammer(lambda s: s.get(f"{url}/v1/pause/{random.choice(ids)}", headers=headers).ok, seconds)
    figures["list"] = hammer(lambda s: s.get(url + "/v1/pause?limit=50", headers=headers).ok, seconds)
    tokens, lock = iter([token(pause) for pause in created]), threading.Lock()

    def decide(session):
        with lock:
            next_token = next(tokens, None)
        return None if next_token is None else respond(session, url, next_token).ok

    figures["respond"] = hammer(decide, seconds)
    return figures


def audit_of_one_pause(url, headers, db, seconds):
    """GET /v1/audit?pause_id= for pauses picked at random from the grown database."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        last = conn.execute("SELECT max(seq) FROM pauses").fetchone()[0]
        ids = [conn.execute("SELECT id FROM pauses WHERE seq = ?", (random.randint(2, last),)).fetchone()[0]
               for _ in range(500)]
    return hammer(lambda s: bool(s.get(url + "/v1/audit", params={"pause_id": random.choice(ids)},
                                       headers=headers).json()["events"]), seconds)


def decision_to_webhook(url, auth, receiver, decisions):
    """From each respond call returning to its pause.responded event arriving, one at a time."""
    requests.post(url + "/v1/webhooks", json={"url": receiver.url, "events": ["pause.responded"]},
                  headers=auth).raise_for_status()
    session = requests.Session()
    pauses = [session.post(url + "/v1/pause", json=PAUSE, headers=auth).json() for _ in range(decisions)]
    time.sleep(1)       # let the simulated notifications settle before timing
    latencies = []
    for pause in pauses:
        respond(session, url, token(pause)).raise_for_status()
        answered = time.time()
        latencies.append(receiver.wait(pause["pause_id"]) - answered)
    return summary(latencies)


def decision_to_long_poll(url, auth, decisions):
    """From each respond call returning to the agent's ?wait=30 returning, LONG_POLLERS waiting at once."""
    session, latencies = requests.Session(), []
    for _ in range(0, decisions, LONG_POLLERS):
        pauses = [session.post(url + "/v1/pause", json=PAUSE, headers=auth).json() for _ in range(LONG_POLLERS)]
        with concurrent.futures.ThreadPoolExecutor(LONG_POLLERS) as pool:
            polls = [pool.submit(long_poll, url, auth, pause["pause_id"]) for pause in pauses]
            time.sleep(0.5)     # every agent is waiting by now
            for pause, poll in zip(pauses, polls):
                respond(session, url, token(pause)).raise_for_status()
                answered = time.perf_counter()
                latencies.append(poll.result() - answered)
    return summary(latencies)


def long_poll(url, auth, pause_id):
    """When GET ?wait=30 returned with the pause decided."""
    answer = requests.get(f"{url}/v1/pause/{pause_id}?wait=30", headers=auth, timeout=40)
    returned = time.perf_counter()
    if answer.json()["status"] == "pending":
        raise SystemExit(f"the long poll on {pause_id} returned while the pause was still pending")
    return returned


###############################################################################
# PausePoint's database, grown in place
###############################################################################

def first_pause(url):
    """A developer and one pause made through the API, its notification sent; returns (auth, pause id)."""
    keys = requests.post(url + "/v1/auth/register",
                         json={"email": "bench@example.com", "name": "Bench", "password": "benchmark-pw"}).json()
    auth = {"Authorization": f"Bearer {keys['test_api_key']}"}
    pause_id = requests.post(url + "/v1/pause", json=PAUSE, headers=auth).json()["pause_id"]
    for _ in range(200):
        if requests.get(f"{url}/v1/pause/{pause_id}", headers=auth).json()["notification"]["status"] != "queued":
            break
        time.sleep(0.05)
    return auth, pause_id


def grow(db, template, sizes):
    """Copy the template pause and its notification up to sizes.total pauses, the last
    sizes.pending of them pending; returns the seq range of the pending ones."""
    conn = sqlite3.connect(db, isolation_level=None)
    # One bulk load, with nobody else on the file: no WAL, no fsync, a cache the indexes fit in.
    for pragma in ("journal_mode = DELETE", "synchronous = OFF", "cache_size = -1000000"):
        conn.execute("PRAGMA " + pragma)
    after = conn.execute("SELECT seq FROM pauses WHERE id = ?", (template,)).fetchone()[0]
    decided_at = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    conn.execute("BEGIN")
    conn.execute(COPY_PAUSES, {"count": sizes.total - sizes.pending - 1, "first": 0, "status": "responded",
                               "choice": "Approve", "decided_at": decided_at, "template": template})
    first = conn.execute("SELECT max(seq) FROM pauses").fetchone()[0] + 1
    conn.execute(COPY_PAUSES, {"count": sizes.pending, "first": sizes.total, "status": "pending",
                               "choice": None, "decided_at": None, "template": template})
    conn.execute(COPY_NOTIFICATIONS, {"template": template, "after": after})
    conn.execute(COPY_AUDIT, {"after": after})
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode = WAL")
    last = conn.execute("SELECT max(seq) FROM pauses").fetchone()[0]
    conn.close()
    return first, last


def run_sql(db, *statements):
    """(sql, parameters) pairs, each committed, on a connection of their own."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        for sql, parameters in statements:
            conn.execute(sql, parameters)


def timeout_burst(url, auth, db, first, last, patience):
    """While the pending copies time out, one client creates pauses; returns (lateness in ms,
    timeouts/s, how many were still pending when patience ran out, that client's figures)."""
    conn, stop = sqlite3.connect(db, timeout=30), threading.Event()
    where = f"FROM pauses WHERE seq BETWEEN {first} AND {last}"

    def pending():
        return conn.execute(f"SELECT count(*) {where} AND status = 'pending'").fetchone()[0]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        during = pool.submit(hammer, creating(url, auth, until=stop.is_set, body=OTHER_NUMBER), float("inf"), 1)
        try:
            deadline = time.time() + patience
            while time.time() < deadline and pending():
                time.sleep(0.5)
        finally:
            stop.set()      # also on the way out of an error, or the pool would wait for the client forever
    timed_out = f"{where} AND status = 'timed_out'"
    late = [row[0] for row in conn.execute(f"SELECT {SECONDS_LATE} {timed_out}")]
    span = conn.execute(f"SELECT (julianday(max(decided_at)) - julianday(min(decided_at))) * 86400 {timed_out}")
    timeouts_per_second = len(late) / max(span.fetchone()[0] or 0, 0.001)
    remaining = pending()
    conn.close()
    return summary(late) if late else None, timeouts_per_second, remaining, during.result()


###############################################################################
# The table, and the run that fills it
###############################################################################

def machine():
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return (f"Machine: {model}, {os.cpu_count()} cores, Python {platform.python_version()},"
            f" SQLite {sqlite3.sqlite_version}; loopback only")


def latency(r):
    return f"p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms"


def load_figures(r):
    return f"{r['per_second']:.0f} req/s, {latency(r)}" + (f", {r['failures']} failed" if r["failures"] else "")


def rows(sizes, bare, ours):
    calls = {"create": "POST /v1/pause", "get": "GET /v1/pause/{id}", "list": "GET /v1/pause?limit=50",
             "respond": "POST /v1/respond/{token}, once per pause the create row made"}
    for call, request in calls.items():
        mine, ceiling = ours["load"][call], bare["load"][call]
        yield (f"{call}: {request}; {CLIENTS} clients, {sizes.seconds:g} s", load_figures(mine),
               load_figures(ceiling), f"{mine['per_second'] / ceiling['per_second']:.2f}× req/s")
    for key, what, ceiling in (("webhook", "decision → webhook arrives", "a bare POST to the receiver"),
                               ("long_poll", f"decision → long poll returns ({LONG_POLLERS} waiting)",
                                "a bare GET round trip")):
        mine = ours[key]
        # Below zero: the waiter heard of the decision before the respond call's answer reached us.
        ratio = f"{mine['p50'] / bare[key]['p50']:.1f}× p50" if mine["p50"] > 0 else "heard before respond returned"
        yield f"{what}, {mine['n']} decisions", latency(mine), f"{latency(bare[key])} ({ceiling})", ratio
    mine, ceiling = ours["audit"], bare["load"]["get"]
    yield (f"audit of one pause: GET /v1/audit?pause_id= among {sizes.total:,} pauses' events; {CLIENTS} clients",
           load_figures(mine), f"{load_figures(ceiling)} (get one row by key)",
           f"{mine['per_second'] / ceiling['per_second']:.2f}× req/s")
    late, rate, remaining = ours["lateness"], ours["timeouts_per_second"], ours["still_pending"]
    figures = (f"p50 {late['p50'] / 1000:.2f} s, p99 {late['p99'] / 1000:.2f} s, max {late['max'] / 1000:.2f} s;"
               f" {rate:.0f} timeouts/s" if late else "none timed out")
    note = "target p99 < 2 s" + (f"; {remaining} still pending when the bench gave up" if remaining else "")
    yield f"timeout lateness: {sizes.pending:,} due within {WINDOW_SECONDS} s", figures, "—", note
    during, quiet = ours["create_during"], ours["create_quiet"]
    yield ("create while they time out, 1 client", latency(during), f"{latency(quiet)} (same client, after)",
           f"{during['p99'] / quiet['p99']:.1f}× p99")
    yield (f"start-up to /healthz 200: {sizes.pending:,} pending, {sizes.total:,} in all",
           f"{ours['startup']:.2f} s", f"{ours['startup_empty']:.2f} s (empty database)",
           f"{ours['startup'] / ours['startup_empty']:.1f}×")
    (rss, peak), (bare_rss, bare_peak) = ours["memory"], bare["memory"]
    yield ("memory after the create/get/list/respond load (VmRSS, peak VmHWM)",
           f"{rss:.0f} MB, peak {peak:.0f} MB",
           f"{bare_rss:.0f} MB, peak {bare_peak:.0f} MB", f"{rss / bare_rss:.1f}× RSS")


def print_table(sizes, bare, ours):
    print(machine() + "\n")
    print("| what | PausePoint | ceiling (the bare stack) | ratio or note |")
    print("|---|---|---|---|")
    for row in rows(sizes, bare, ours):
        print("| " + " | ".join(row) + " |")


def progress(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def measure_bare(workdir, sizes, receiver):
    db = os.path.join(workdir, "bare.db")
    run_sql(db, (BARE_SCHEMA, ()), (FILL_BARE, (sizes.total, json.dumps(PAUSE))))
    progress("bare server: create, get, list, respond")
    with bare_server(db) as (url, proc, _):
        figures = {"load": api_load(url, {}, sizes.seconds), "memory": memory_mb(proc.pid),
                   "long_poll": hammer(lambda s: s.get(url + "/healthz").ok, 1, 1)}
    figures["webhook"] = run_baseline(receiver, sizes.decisions, 1)
    return figures


def measure_pausepoint(workdir, sizes, receiver, program):
    db, figures = os.path.join(workdir, "pausepoint.db"), {}
    progress("PausePoint on an empty database: start-up, one pause to copy")
    with pausepoint(db, program) as (url, _, figures["startup_empty"]):
        auth, template = first_pause(url)
    progress(f"copying it to {sizes.total:,} pauses, {sizes.pending:,} pending")
    first, last = grow(db, template, sizes)
    with pausepoint(db, program) as (url, _, figures["startup"]):
        pass
    run_sql(db, (SPREAD_EXPIRY, {"start": time.time() + figures["startup"] + LEAD_SECONDS, "first": first,
                                 "last": last, "count": last - first + 1, "window": float(WINDOW_SECONDS)}))
    progress(f"{sizes.pending:,} pauses timing out")
    with pausepoint(db, program) as (url, proc, _):
        patience = LEAD_SECONDS + WINDOW_SECONDS + max(60, sizes.pending / 200)
        (figures["lateness"], figures["timeouts_per_second"], figures["still_pending"],
         figures["create_during"]) = timeout_burst(url, auth, db, first, last, patience)
        figures["create_quiet"] = hammer(creating(url, auth, body=OTHER_NUMBER), sizes.seconds, 1)
        progress("PausePoint: create, get, list, respond")
        figures["load"] = api_load(url, auth, sizes.seconds)
        figures["memory"] = memory_mb(proc.pid)
        figures["audit"] = audit_of_one_pause(url, auth, db, sizes.seconds)
        progress("PausePoint: decisions to webhooks and long polls")
        figures["webhook"] = decision_to_webhook(url, auth, receiver, sizes.decisions)
        figures["long_poll"] = decision_to_long_poll(url, auth, sizes.decisions)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, about a minute")
    parser.add_argument("--server", default=os.path.join(ROOT, "pausepoint.py"), metavar="PATH",
                        help="the pausepoint.py to measure, e.g. of an earlier release (default: this checkout's)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    # Servers are stopped in `finally` blocks, which a plain SIGTERM would skip.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started, receiver = time.monotonic(), Receiver()
    try:
        with tempfile.TemporaryDirectory() as workdir:
            bare = measure_bare(workdir, sizes, receiver)
            ours = measure_pausepoint(workdir, sizes, receiver, args.server)
    finally:
        receiver.process.terminate()
    progress(f"done in {time.monotonic() - started:.0f} s")
    print_table(sizes, bare, ours)


if __name__ == "__main__":
    main()
