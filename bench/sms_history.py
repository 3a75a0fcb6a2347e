"""What a phone number's history costs an incoming SMS and a new pause asking it.

An incoming SMS (record_sms_reply) and every new pause texting a number (new_reply_code)
read that number's open and recent codes while holding the write lock, so their cost must
not grow with how many pauses ever asked it. Baseline: the same number with no history.
Then `--history` decided pauses asking it first (single-recipient), then as many decided
team pauses asking it second, then `--test-tenants` other developers' pending test pauses
to it, as many as each may have (no text answers those), then `--closed-unsent` live pauses
to it cancelled a minute ago before their texts went out. The SMS is a reply without a code
while one live pause is open on the number. Each figure is the median and p99 of `--runs`
calls, on a real SQLite file, through the server's own functions.

Usage: python bench/sms_history.py [--history 100000] [--runs 200] [--test-tenants 10] [--closed-unsent 10000]
"""

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pausepoint  # noqa: E402

NUMBER = "+15550102"
QUESTION = {"message": "Wire $340 to Acme Corp?", "options": ["Approve", "Reject"], "timeout_hours": 4}


def timed(call, runs):
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return statistics.median(took), took[int(len(took) * 0.99) - 1]


def add_history(conn, developer_id, count, as_team):
    """`count` decided live pauses that texted NUMBER: first (as_team false) or second in a team."""
    codes = json.dumps(pausepoint.SHORT_REPLY_CODES + pausepoint.LONG_REPLY_CODES)
    tag = "t" if as_team else "s"
    with pausepoint.transaction(conn):
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)"
            " INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options, status, choice,"
            " decided_at, decided_by, respond_token, reply_code, team, created_at, expires_at)"
            " SELECT 'psr_' || :tag || i, :developer, 1, CASE WHEN :team THEN '+15550101' ELSE :number END, 'sms',"
            " 'm', '[\"Approve\",\"Reject\"]', 'responded', 'Approve', '2025-01-01T00:00:00.000Z', 'x',"
            " 'tok' || :tag || i, json_extract(:codes, '$[' || (i % 4416) || ']'), :team,"
            " '2025-01-01T00:00:00.000Z', '2025-01-01T04:00:00.000Z' FROM n",
            {"count": count, "tag": tag, "developer": developer_id, "team": int(as_team), "number": NUMBER,
             "codes": codes})
        if as_team:
            # (pause_decided_at only where the schema has it, so the script also measures older code.)
            copied = {row[1] for row in conn.execute("PRAGMA table_info(pause_recipients)")} & {"pause_decided_at"}
            conn.execute(
                "INSERT INTO pause_recipients (pause_id, position, livemode, recipient, channel, respond_token,"
                f" reply_code, added_by, added_at{''.join(', ' + c for c in copied)}) SELECT id, 1, 1, :number, 'sms',"
                " 'r' || id, json_extract(:codes, '$[' || (seq % 4416) || ']'), 'request', created_at"
                f"{', decided_at' * len(copied)} FROM pauses WHERE id LIKE 'psr_t%'", {"number": NUMBER, "codes": codes})
    pausepoint.refresh_statistics(conn)


def add_pending_tests(conn, developer_id):
    """A developer's 4,416 pending test pauses to NUMBER, one with each code (the most a
    developer can have: each developer's test codes are their own)."""
    codes = json.dumps(pausepoint.SHORT_REPLY_CODES + pausepoint.LONG_REPLY_CODES)
    with pausepoint.transaction(conn):
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 4415)"
            " INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options, respond_token,"
            " reply_code, created_at, expires_at) SELECT 'psr_' || :developer || i, :developer, 0, :number, 'sms', 'm',"
            " '[\"Approve\",\"Reject\"]', 'tok' || :developer || i, json_extract(:codes, '$[' || i || ']'),"
            " '2025-01-01T00:00:00.000Z', '2999-01-01T00:00:00.000Z' FROM n",
            {"developer": developer_id, "number": NUMBER, "codes": codes})


def add_open_pause(conn, developer_id):
    """The one live pause open on NUMBER, its text sent: a reply without a code is weighed for it."""
    with pausepoint.transaction(conn):
        conn.execute("INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options,"
                     " respond_token, reply_code, created_at, expires_at) VALUES ('psr_open', ?, 1, ?, 'sms', 'm',"
                     " '[\"Approve\",\"Reject\"]', 'tok_open', 'Z9', ?, '2999-01-01T00:00:00.000Z')",
                     (developer_id, NUMBER, pausepoint.db_time()))
        conn.execute("INSERT INTO notifications (id, pause_id, developer_id, channel, recipient, livemode, text,"
                     " status, next_attempt_at, created_at, updated_at) VALUES ('ntf_open', 'psr_open', ?, 'sms', ?,"
                     " 1, 'm', 'sent', '2025-01-01T00:00:00.000Z', '2025-01-01T00:00:00.000Z',"
                     " '2025-01-01T00:00:00.000Z')", (developer_id, NUMBER))


def add_closed_unsent(conn, developer_id, count):
    """`count` live pauses to NUMBER cancelled a minute ago, before their texts went out: all
    within the time a bare reply looks back over, none of them a question the person read."""
    with pausepoint.transaction(conn):
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)"
            " INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options, status,"
            " decided_at, respond_token, reply_code, created_at, expires_at) SELECT 'psr_c' || i, :developer, 1,"
            " :number, 'sms', 'm', '[\"Approve\",\"Reject\"]', 'cancelled', :minute_ago, 'tokc' || i,"
            " json_extract(:codes, '$[' || (i % 4416) || ']'), :minute_ago, '2999-01-01T00:00:00.000Z' FROM n",
            {"count": count, "developer": developer_id, "number": NUMBER,
             "codes": json.dumps(pausepoint.SHORT_REPLY_CODES + pausepoint.LONG_REPLY_CODES),
             "minute_ago": pausepoint.db_time(pausepoint.utcnow() - pausepoint.dt.timedelta(minutes=1))})


def measure(conn, config, label, runs):
    # Each a new message (the same one again is taken once): no code, and an option the open
    # pause lacks, so it reads all a bare reply reads and decides nothing.
    def sms():
        pausepoint.record_sms_reply(conn, config, NUMBER, "9", "SM" + uuid.uuid4().hex)

    # A live code's scope is every developer's (older code took no developer, nor the config).
    given = {"conn": conn, "config": config, "recipient": NUMBER, "livemode": 1, "developer_id": None}
    asked = {name: given[name] for name in inspect.signature(pausepoint.new_reply_code).parameters if name in given}

    def code():
        with pausepoint.transaction(conn):
            pausepoint.new_reply_code(**asked)

    sms_p50, sms_p99 = timed(sms, runs)
    code_p50, code_p99 = timed(code, runs)
    print(f"| {label} | {sms_p50:.2f} / {sms_p99:.2f} | {code_p50:.2f} / {code_p99:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--test-tenants", type=int, default=10)
    parser.add_argument("--closed-unsent", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        config = pausepoint.load_config(environ={}, overrides={
            "database.path": os.path.join(workdir, "bench.db"), "security.bcrypt_rounds": 4})
        app = pausepoint.create_app(config)
        conn = app.runtime.db()
        developer = pausepoint.register_developer(conn, config, "bench@example.com", "Bench", "correct horse battery")
        developer_id = developer["developer_id"]
        add_open_pause(conn, developer_id)
        print("| the number's history | incoming SMS, ms p50 / p99 | new reply code, ms p50 / p99 |")
        print("|---|---|---|")
        measure(conn, config, "none (baseline)", args.runs)
        add_history(conn, developer_id, args.history, as_team=False)
        measure(conn, config, f"{args.history:,} decided pauses asking it first", args.runs)
        add_history(conn, developer_id, args.history, as_team=True)
        measure(conn, config, f"and {args.history:,} decided team pauses asking it second", args.runs)
        for n in range(args.test_tenants):
            add_pending_tests(conn, pausepoint.register_developer(conn, config, f"test{n}@example.com", "Test",
                                                                  "correct horse battery")["developer_id"])
        measure(conn, config, f"and {args.test_tenants * 4416:,} pending test pauses to it, of {args.test_tenants}"
                              " other developers", args.runs)
        add_closed_unsent(conn, developer_id, args.closed_unsent)
        measure(conn, config, f"and {args.closed_unsent:,} live pauses to it cancelled a minute ago, their texts"
                              " unsent", args.runs)
        app.runtime.stop()


if __name__ == "__main__":
    main()
