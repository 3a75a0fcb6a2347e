"""What a month of live pauses costs a developer's next create.

A live create checks the developer's plan quota while holding the write lock, so its cost
must not grow with how many live pauses the developer made this month. Baseline: a
developer with none. Then a second developer with `--month` live pauses created this month
(as a busy integration leaves them: decided, on the link channel). Each figure is the
median and p99 of `--runs` live creates through the app in process (WebTest, no sockets),
on a real SQLite file.

Usage: python bench/month_of_pauses.py [--month 300000] [--runs 300]
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import webtest  # noqa: E402

import pausepoint  # noqa: E402
from sms_history import timed  # noqa: E402

QUESTION = {"recipient": "ops", "channel": "link", "message": "Wire $340 to Acme Corp?",
            "options": ["Approve", "Reject"], "timeout_hours": 4, "timeout_default": "Reject"}


def register(app, email):
    return app.post_json("/v1/auth/register", {"email": email, "name": "Bench", "password": "benchmark-pw"}).json


def fill_month(config, developer_id, count):
    """`count` decided live pauses of the developer, created this month, as the server would count them."""
    now = pausepoint.utcnow()
    conn = pausepoint.connect(config["database.path"])
    try:
        with pausepoint.transaction(conn):
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                " INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options, status,"
                " choice, decided_at, decided_by, respond_token, created_at, expires_at)"
                " SELECT 'psr_m' || i, ?, 1, 'ops', 'link', 'm', '[\"Approve\",\"Reject\"]', 'responded', 'Approve',"
                " ?, 'recipient', 'tok_m' || i, ?, ? FROM n",
                (count, developer_id, pausepoint.db_time(now), pausepoint.db_time(pausepoint.month_start(now)),
                 pausepoint.db_time(now)))
            # (Only where the schema counts a month's pauses as they are made, so this also measures older code.)
            if conn.execute("SELECT 1 FROM sqlite_schema WHERE name = 'monthly_usage'").fetchone():
                conn.execute("INSERT INTO monthly_usage VALUES (?, ?, ?)", (developer_id, now.strftime("%Y-%m"), count))
    finally:
        conn.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--month", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    path = os.path.join(tempfile.mkdtemp(), "bench.db")
    config = pausepoint.load_config(environ={}, overrides={
        "database.path": path, "security.bcrypt_rounds": 4, "ratelimit.enabled": False,
        "plans.free.monthly_pauses": 10 * args.month + 10 * args.runs})
    app = webtest.TestApp(pausepoint.create_app(config))
    quiet, busy = register(app, "quiet@example.com"), register(app, "busy@example.com")
    fill_month(config, pausepoint.connect(path).execute(
        "SELECT id FROM developers WHERE email = 'busy@example.com'").fetchone()[0], args.month)
    print(f"{'':<44}{'p50 ms':>9}{'p99 ms':>9}")
    for name, keys in (("baseline: no live pauses this month", quiet),
                              (f"{args.month:,} live pauses this month", busy)):
        headers = {"Authorization": "Bearer " + keys["api_key"]}
        p50, p99 = timed(lambda: app.post_json("/v1/pause", QUESTION, headers=headers), args.runs)
        print(f"{'create, ' + name:<44}{p50:>9.2f}{p99:>9.2f}")


if __name__ == "__main__":
    main()
