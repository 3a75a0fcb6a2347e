"""PausePoint: human approval for AI agents, in one process.

An agent about to do something risky POSTs a *pause*: who to ask, over which
channel, the question, the options, a timeout and the default to apply if
nobody answers. The human opens a small page and taps a choice; the agent
learns the outcome by polling (or, later, by webhook), and every step lands in
an audit log.

The file reads top to bottom: configuration, database, accounts and keys, the
pause lifecycle (the only place states change), channels, scheduler jobs, the
HTTP API and pages, and the command line.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import email.message
import email.utils
import functools
import getpass
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import smtplib
import socket
import sqlite3
import ssl
import string
import sys
import threading
import time
import tomllib
import urllib.parse
import uuid

import apprise
import bcrypt
import bottle
import requests
import twilio.base.exceptions
import twilio.http.http_client
import twilio.request_validator
import twilio.rest
import twilio.twiml.messaging_response
import urllib3
import waitress
from apscheduler.schedulers.background import BackgroundScheduler

VERSION = "0.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA_PATH = os.path.join(HERE, "schema.sql")
TEMPLATES_DIR = os.path.join(HERE, "templates")
STATIC_DIR = os.path.join(HERE, "static")

log = logging.getLogger("pausepoint")


###############################################################################
# Configuration
###############################################################################

@dataclasses.dataclass(frozen=True)
class Setting:
    key: str
    default: object
    help: str


# The one table of settings: every key, its default and what it is for. The
# TOML file, PAUSEPOINT_* environment variables and CLI flags overlay it in
# that order; config.example.toml documents every key (a test checks).
SETTINGS = [
    Setting("server.host", "127.0.0.1", "Address to listen on. Use 0.0.0.0 to accept connections from other machines."),
    Setting("server.port", 8080, "TCP port to listen on."),
    Setting("server.base_url", "", "Public URL of this server, used to build respond_url links. Empty: http://<host>:<port>."),
    Setting("server.threads", 64, "Worker threads. Long-polling agents (?wait=) hold one each; 8 are always kept for other requests."),
    Setting("server.trusted_proxy", "", "IP address of a reverse proxy whose X-Forwarded-For/-Proto headers are believed. Empty: none."),
    Setting("server.max_body_bytes", 65536, "Largest request body accepted; larger ones get 413."),
    Setting("database.path", "pausepoint.db", "SQLite database file. Created from schema.sql on first start."),
    Setting("registration.open", True, "Whether POST /v1/auth/register is open. When false, the operator adds developers with `create-developer`."),
    Setting("security.bcrypt_rounds", 12, "bcrypt cost factor for passwords (4-16). Each step doubles the work."),
    Setting("pauses.max_timeout_hours", 720.0, "Longest timeout_hours a pause may ask for."),
    Setting("twilio.account_sid", "", "Twilio account SID (AC…), for the sms channel."),
    Setting("twilio.auth_token", "", "Twilio auth token, for the sms channel."),
    Setting("twilio.from_number", "", "The Twilio phone number SMS and WhatsApp messages are sent from, in E.164 form (+15550100)."),
    Setting("twilio.messaging_service_sid", "", "A Twilio Messaging Service (MG…) to send through instead of from_number."),
    Setting("twilio.api_base", "https://api.twilio.com", "Base URL of the Twilio REST API; change it to use a Twilio-compatible provider."),
    Setting("smtp.host", "", "SMTP server for the email channel."),
    Setting("smtp.port", 587, "SMTP port: 587 for STARTTLS, 465 for implicit TLS, 25 for none."),
    Setting("smtp.security", "starttls", "starttls, tls (implicit, usually port 465) or none."),
    Setting("smtp.username", "", "SMTP login; empty: no login."),
    Setting("smtp.password", "", "SMTP password."),
    Setting("smtp.from_address", "", "The From address of approval emails, e.g. PausePoint <approvals@example.com>."),
    Setting("smtp.ca_file", "", "PEM file of CA certificates to trust for SMTP TLS instead of the system's (for a private CA)."),
    Setting("webhooks.allow_private", False, "Allow webhook URLs on loopback, private or link-local addresses (for agents on your LAN)."),
    Setting("webhooks.workers", 8, "Webhook calls made at once. Each endpoint gets at most 2, so one slow receiver cannot hold them all."),
    Setting("ratelimit.enabled", True, "Rate-limit registration, key rotation and failed respond-token lookups per client IP."),
    Setting("ratelimit.register_per_hour", 20, "Registrations allowed per client IP per hour."),
    Setting("ratelimit.rotate_per_hour", 20, "Key rotations (attempts, right or wrong) allowed per client IP per hour."),
    Setting("ratelimit.respond_failures_per_hour", 30, "Unknown respond tokens allowed per client IP per hour before it is locked out."),
    Setting("plans.free.monthly_pauses", 100, "Live pauses a developer on the free plan may create per calendar month (UTC). Add plans as [plans.NAME]."),
]
SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}
# Plans are open-ended: an operator adds [plans.team] monthly_pauses = 5000.
PLAN_KEY = re.compile(r"^plans\.([a-z][a-z0-9_-]{0,31})\.monthly_pauses$")
# So are push and chat targets: [channels.ops] url = "ntfy://ntfy.example.org/approvals".
CHANNEL_KEY = re.compile(r"^channels\.([a-z][a-z0-9_-]{0,31})\.url$")
BUILT_IN_CHANNELS = ("sms", "whatsapp", "email", "link")

# Long-polling agents may hold at most this many fewer threads than there are,
# so creating and answering pauses always has threads to run on.
THREADS_KEPT_FOR_OTHER_REQUESTS = 8


class ConfigError(Exception):
    """A setting is unknown or has a bad value; the message names the key."""


def load_config(path=None, environ=None, overrides=None):
    """Defaults, overlaid by the TOML file, then PAUSEPOINT_* variables, then CLI flags."""
    config = {s.key: s.default for s in SETTINGS}
    if path is None and os.path.exists("config.toml"):
        path = "config.toml"
    if path is not None:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        for key, value in flatten(table):
            config[key] = check_setting(key, value, f"in {path}")
    for name, raw in sorted((environ if environ is not None else os.environ).items()):
        if name.startswith("PAUSEPOINT_"):
            key = env_name_to_key(name)
            config[key] = check_setting(key, parse_text_value(key, raw, name), f"in ${name}")
    for key, value in (overrides or {}).items():
        if value is not None:
            config[key] = check_setting(key, value, "on the command line")
    return config


def flatten(table, prefix=""):
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            yield from flatten(value, key + ".")
        else:
            yield key, value


def env_name_to_key(name):
    """PAUSEPOINT_SERVER_BASE_URL -> server.base_url; PAUSEPOINT_PLANS_TEAM_MONTHLY_PAUSES ->
    plans.team.monthly_pauses; PAUSEPOINT_CHANNELS_OPS_URL -> channels.ops.url."""
    for setting in SETTINGS:
        if name == "PAUSEPOINT_" + setting.key.replace(".", "_").upper():
            return setting.key
    for section, leaf in (("PLANS", "MONTHLY_PAUSES"), ("CHANNELS", "URL")):
        match = re.fullmatch(f"PAUSEPOINT_{section}_([A-Z][A-Z0-9_]*)_{leaf}", name)
        if match:
            return f"{section.lower()}.{match.group(1).lower()}.{leaf.lower()}"
    raise ConfigError(f"unknown setting: environment variable {name} names no setting")


def setting_type(key):
    if PLAN_KEY.match(key):
        return int
    if CHANNEL_KEY.match(key):
        return str
    if key not in SETTINGS_BY_KEY:
        raise ConfigError(f"unknown setting: {key}")
    return type(SETTINGS_BY_KEY[key].default)


def open_setting_problem(key, value):
    """Checks for the open-ended [plans.NAME] and [channels.NAME] keys."""
    if PLAN_KEY.match(key) and value < 0:
        return "must not be negative"
    channel = CHANNEL_KEY.match(key)
    if channel and channel.group(1) in BUILT_IN_CHANNELS:
        return f"names a built-in channel; choose another name than {', '.join(BUILT_IN_CHANNELS)}"
    if channel and apprise.Apprise.instantiate(value) is None:
        return "is not a notification URL Apprise understands (e.g. ntfy://host/topic, slack://…, gotify://…)"
    return None


def parse_text_value(key, raw, where):
    kind = setting_type(key)
    if kind is bool:
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false ({where} is {raw!r})")
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise ConfigError(f"{key} must be a number ({where} is {raw!r})") from None
    return raw


def check_setting(key, value, where):
    kind = setting_type(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        expected = {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}[kind]
        raise ConfigError(f"{key} must be {expected} ({where} it is {value!r})")
    problem = SETTING_CHECKS.get(key, lambda v: None)(value) or open_setting_problem(key, value)
    if problem:
        raise ConfigError(f"{key} {problem} ({where} it is {value!r})")
    return value


def _check_base_url(value):
    if value and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
        return "must be empty or an http:// or https:// URL without query"
    return None


def _check_trusted_proxy(value):
    if not value:
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be empty or an IP address"
    return None


SETTING_CHECKS = {
    "server.port": lambda v: None if 1 <= v <= 65535 else "must be between 1 and 65535",
    "server.threads": lambda v: None if 12 <= v <= 1000 else "must be between 12 and 1000",
    "server.base_url": _check_base_url,
    "server.trusted_proxy": _check_trusted_proxy,
    "twilio.api_base": lambda v: None if re.fullmatch(r"https?://[^\s/?#]+/?", v) else "must be an http:// or https:// URL with no path",
    "server.max_body_bytes": lambda v: None if 1024 <= v <= 16 * 1024 * 1024 else "must be between 1024 and 16777216",
    "database.path": lambda v: None if v else "must not be empty",
    "security.bcrypt_rounds": lambda v: None if 4 <= v <= 16 else "must be between 4 and 16",
    "pauses.max_timeout_hours": lambda v: None if 0 < v <= 24 * 366 else "must be above 0 and at most 8784 (a year)",
    "smtp.security": lambda v: None if v in ("starttls", "tls", "none") else "must be starttls, tls or none",
    "smtp.port": lambda v: None if 1 <= v <= 65535 else "must be between 1 and 65535",
    "webhooks.workers": lambda v: None if 1 <= v <= 64 else "must be between 1 and 64",
    "ratelimit.register_per_hour": lambda v: None if v >= 1 else "must be at least 1",
    "ratelimit.rotate_per_hour": lambda v: None if v >= 1 else "must be at least 1",
    "ratelimit.respond_failures_per_hour": lambda v: None if v >= 1 else "must be at least 1",
}


def plans(config):
    """{plan name: live pauses allowed per month}."""
    return {PLAN_KEY.match(k).group(1): v for k, v in config.items() if PLAN_KEY.match(k)}


def base_url(config):
    if config["server.base_url"]:
        return config["server.base_url"].rstrip("/")
    host = config["server.host"]
    if host in ("0.0.0.0", "::"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config['server.port']}"


###############################################################################
# Database
###############################################################################

# Numbered schema changes after schema.sql's first version, as (number, SQL).
# A fresh database gets schema.sql, which is always the newest model, and is
# recorded at the last number here.
MIGRATIONS = [
    (1, "-- schema.sql as first released"),
]


class Connection(sqlite3.Connection):
    """A connection that may share an in-process write lock with its siblings."""
    write_lock = None


def connect(path, write_lock=None):
    """A connection in autocommit mode: transactions are explicit (see transaction())."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False, factory=Connection)
    conn.write_lock = write_lock
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode = WAL")
    # A decision acknowledged to a human must survive a power cut, not only a crash.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


@contextlib.contextmanager
def transaction(conn):
    """A write transaction. BEGIN IMMEDIATE takes SQLite's write lock up front, so
    a compare-and-set never fails half-way with SQLITE_BUSY after reading stale
    state. Threads of one process first queue on a Python lock: SQLite's own
    busy handler sleeps and retries, which under load turns into long tails."""
    with conn.write_lock or contextlib.nullcontext():
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def migrate(conn):
    """Create the schema on a fresh database, or apply the migrations it lacks."""
    with transaction(conn):
        fresh = not conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'").fetchone()
        if fresh:
            with open(SCHEMA_PATH, encoding="utf-8") as f:
                for statement in split_sql(f.read()):
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (MIGRATIONS[-1][0], db_time()))
            return
        done = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]
        for number, sql in MIGRATIONS:
            if number > done:
                for statement in split_sql(sql):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (number, db_time()))


def split_sql(script):
    """Statements of a script, so they run inside our transaction (executescript would COMMIT first)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip() and not all(l.strip().startswith("--") or not l.strip() for l in current.splitlines()):
                statements.append(current)
            current = ""
    return statements


def utcnow():
    return dt.datetime.now(dt.timezone.utc)


def db_time(moment=None):
    """The one stored time format: fixed width, so text order is time order."""
    moment = moment or utcnow()
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_db_time(text):
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)


def api_time(text):
    """Stored time as the API shows it: '2026-05-08T18:00:00Z'."""
    return None if text is None else text[:19] + "Z"


def new_id(prefix):
    return prefix + uuid.uuid4().hex


###############################################################################
# Errors
###############################################################################

class ApiError(Exception):
    """Any refusal the API makes; rendered in the one JSON error shape by error_body()."""

    def __init__(self, status, code, message, field=None, headers=None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.field, self.headers = field, headers or {}


def invalid(field, message):
    return ApiError(422, "invalid_request", message, field=field)


def error_body(status, code, message, field=None):
    """The one JSON error shape: {"error": {"code", "message"[, "field"]}}."""
    error = {"code": code, "message": message}
    if field:
        error["field"] = field
    return json.dumps({"error": error})


###############################################################################
# Accounts and API keys
###############################################################################

KEY_ALPHABET = string.ascii_letters + string.digits
KEY_RANDOM_CHARS = 48                      # 48 * log2(62) = 285 bits
MODES = {"live": 1, "test": 0}
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def new_api_key(livemode):
    return ("pp_live_" if livemode else "pp_test_") + "".join(
        secrets.choice(KEY_ALPHABET) for _ in range(KEY_RANDOM_CHARS))


def key_digest(key):
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_hint(key):
    return key[:8] + "…" + key[-4:]


def issue_key(conn, developer_id, livemode):
    """Create and store a new working key; the caller revokes any old one first."""
    key = new_api_key(livemode)
    conn.execute("INSERT INTO api_keys (key_hash, developer_id, livemode, hint, created_at) VALUES (?, ?, ?, ?, ?)",
                 (key_digest(key), developer_id, livemode, key_hint(key), db_time()))
    return key


def validate_registration(email, name, password):
    if not isinstance(email, str) or len(email) > 254 or not EMAIL.match(email.strip()):
        raise invalid("email", "email must be an email address like you@example.com")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise invalid("name", "name must be 1-200 characters")
    if not isinstance(password, str) or len(password) < 8:
        raise invalid("password", "password must be at least 8 characters")
    if len(password.encode("utf-8")) > 72:
        raise invalid("password", "password must be at most 72 bytes (bcrypt's limit)")


def register_developer(conn, config, email, name, password, plan="free"):
    """Create a developer with one live and one test key; returns the quickstart's response."""
    validate_registration(email, name, password)
    if plan not in plans(config):
        raise invalid("plan", f"plan must be one of: {', '.join(sorted(plans(config)))}")
    password_hash = bcrypt.hashpw(password.encode("utf-8"),
                                  bcrypt.gensalt(config["security.bcrypt_rounds"])).decode()
    developer_id = new_id("dev_")
    with transaction(conn):
        if conn.execute("SELECT 1 FROM developers WHERE email = ?", (email.strip(),)).fetchone():
            raise ApiError(409, "email_taken", "a developer with this email is already registered")
        conn.execute("INSERT INTO developers (id, email, name, password_hash, plan, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                     (developer_id, email.strip(), name.strip(), password_hash, plan, db_time()))
        live_key, test_key = issue_key(conn, developer_id, 1), issue_key(conn, developer_id, 0)
    return {
        "developer_id": developer_id,
        "api_key": live_key,
        "test_api_key": test_key,
        "plan": plan,
        "message": "Save your API keys — they will not be shown again.",
    }


# bcrypt.checkpw against this when the email is unknown, so a wrong email and
# a wrong password take the same time.
_DUMMY_PASSWORD_HASH = bcrypt.hashpw(b"not a password", bcrypt.gensalt(4))


def check_password(conn, email, password):
    """The developer row if email and password match, else None."""
    if not isinstance(email, str) or not isinstance(password, str):
        return None
    row = conn.execute("SELECT * FROM developers WHERE email = ?", (email.strip(),)).fetchone()
    secret = password.encode("utf-8")[:72]
    if row is None:
        bcrypt.checkpw(secret, _DUMMY_PASSWORD_HASH)
        return None
    return row if bcrypt.checkpw(secret, row["password_hash"].encode()) else None


def rotate_key(conn, developer, livemode):
    """Revoke the working key of one mode and return its replacement, in one transaction."""
    with transaction(conn):
        old = conn.execute("SELECT hint FROM api_keys WHERE developer_id = ? AND livemode = ? AND revoked_at IS NULL",
                           (developer["id"], livemode)).fetchone()
        conn.execute("UPDATE api_keys SET revoked_at = ? WHERE developer_id = ? AND livemode = ? AND revoked_at IS NULL",
                     (db_time(), developer["id"], livemode))
        key = issue_key(conn, developer["id"], livemode)
        record_event(conn, developer["id"], livemode, f"developer:{developer['email']}", "key.rotated",
                     data={"mode": "live" if livemode else "test",
                           "revoked_key": old["hint"] if old else None, "new_key": key_hint(key)})
    return key


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who an API request speaks for: a developer, in one mode, through one key."""
    developer_id: str
    livemode: int
    key_hint: str
    plan: str

    @property
    def actor(self):
        return f"api:{self.key_hint}"


def authenticate(conn, authorization):
    """The Caller for an 'Authorization: Bearer pp_…' header, or ApiError 401."""
    scheme, _, key = (authorization or "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise ApiError(401, "unauthorized", "send your API key as 'Authorization: Bearer pp_live_…' or 'pp_test_…'")
    digest = key_digest(key)
    row = conn.execute(
        "SELECT k.key_hash, k.developer_id, k.livemode, k.hint, d.plan FROM api_keys k"
        " JOIN developers d ON d.id = k.developer_id WHERE k.key_hash = ? AND k.revoked_at IS NULL",
        (digest,)).fetchone()
    # The lookup is by digest, so timing reveals nothing about the key; the
    # constant-time compare keeps it that way if the lookup ever changes.
    if row is None or not hmac.compare_digest(row["key_hash"], digest):
        raise ApiError(401, "unauthorized", "this API key is not valid (it may have been rotated)")
    return Caller(row["developer_id"], row["livemode"], row["hint"], row["plan"])


###############################################################################
# The audit log
###############################################################################

def record_event(conn, developer_id, livemode, actor, event_type, pause_id=None, data=None, when=None):
    """Append one audit event. Call inside the transaction of the change it records."""
    conn.execute(
        "INSERT INTO audit_events (developer_id, livemode, timestamp, actor, event_type, pause_id, data)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (developer_id, livemode, when or db_time(), actor, event_type, pause_id,
         json.dumps(data or {}, separators=(",", ":"))))


def audit_event_json(row):
    return {
        "id": f"aud_{row['seq']}",
        "timestamp": api_time(row["timestamp"]),
        "actor": row["actor"],
        "event_type": row["event_type"],
        "pause_id": row["pause_id"],
        "livemode": bool(row["livemode"]),
        "data": json.loads(row["data"]),
    }


###############################################################################
# The pause lifecycle: the only place a pause changes state
###############################################################################

STATUSES = ("pending", "responded", "timed_out", "cancelled")
PAUSE_FIELDS = {"recipient", "channel", "message", "options", "timeout_hours", "timeout_default", "metadata"}
MAX_METADATA_BYTES = 16 * 1024
IDEMPOTENCY_WINDOW = dt.timedelta(hours=24)
MIN_TIMEOUT_SECONDS = 1.0


def validate_pause_request(body, config):
    """Check a POST /v1/pause body; return the clean fields or raise 422 naming the field."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object")
    unknown = sorted(set(body) - PAUSE_FIELDS)
    if unknown:
        raise invalid(unknown[0], f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(PAUSE_FIELDS))}")
    channel, known = body.get("channel"), channels(config)
    if channel is None:
        raise invalid("channel", f"channel is required: one of {', '.join(known)}")
    if channel not in known:
        raise invalid("channel", f"unknown channel {channel!r}; this server knows: {', '.join(known)}")
    recipient = body.get("recipient")
    if not isinstance(recipient, str) or not recipient.strip():
        raise invalid("recipient", "recipient is required")
    problem = known[channel].recipient_problem(recipient.strip())
    if problem:
        raise invalid("recipient", problem)
    message = body.get("message")
    if not isinstance(message, str) or not message.strip() or len(message) > 1600:
        raise invalid("message", "message must be 1-1600 characters")
    options = body.get("options")
    if (not isinstance(options, list) or not 2 <= len(options) <= 10
            or not all(isinstance(o, str) and o.strip() and len(o) <= 100 for o in options)):
        raise invalid("options", "options must be a list of 2-10 non-empty strings of at most 100 characters")
    options = [o.strip() for o in options]
    if len(set(options)) != len(options):
        raise invalid("options", "options must be distinct")
    hours = body.get("timeout_hours")
    limit = config["pauses.max_timeout_hours"]
    if (isinstance(hours, bool) or not isinstance(hours, (int, float)) or not math.isfinite(hours)
            or hours * 3600 < MIN_TIMEOUT_SECONDS - 1e-6 or hours > limit):
        raise invalid("timeout_hours", f"timeout_hours must be a number from one second (0.0003) to {limit:g}")
    default = body.get("timeout_default")
    if default is not None and (not isinstance(default, str) or default.strip() not in options):
        raise invalid("timeout_default", "timeout_default must be one of the options (or left out)")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise invalid("metadata", "metadata must be a JSON object")
        if len(compact_json(metadata).encode("utf-8")) > MAX_METADATA_BYTES:
            raise invalid("metadata", f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return {
        "recipient": recipient.strip(), "channel": channel, "message": message, "options": options,
        "timeout_seconds": hours * 3600, "timeout_default": default.strip() if default is not None else None,
        "metadata": metadata,
    }


def compact_json(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def request_fingerprint(body):
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def month_start(moment):
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def create_pause(conn, config, caller, body, idempotency_key=None):
    """Store a pause, its notification and its audit event in one transaction.

    Returns (pause row, replayed, webhooks_due): replayed is True when an
    Idempotency-Key matched an earlier identical request and nothing new was
    created; webhooks_due when a pause.created delivery was queued.
    """
    fields = validate_pause_request(body, config)
    channel = channels(config)[fields["channel"]]
    if caller.livemode:
        missing = channel.missing_settings(config)
        if missing:
            raise ApiError(422, "channel_not_configured",
                           f"channel {fields['channel']!r} is not configured on this server for live pauses;"
                           f" the operator must set {', '.join(missing)} (test keys work without them)",
                           field="channel")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        raise invalid("Idempotency-Key", "the Idempotency-Key header must be 1-255 characters")
    now = utcnow()
    with transaction(conn):
        if idempotency_key is not None:
            earlier = earlier_idempotent_pause(conn, caller, idempotency_key, request_fingerprint(body), now)
            if earlier is not None:
                return earlier, True, False
        if caller.livemode:
            check_quota(conn, config, caller, now)
        pause_id, token = new_id("psr_"), secrets.token_urlsafe(32)
        created_at = db_time(now)
        expires_at = db_time(now + dt.timedelta(seconds=fields["timeout_seconds"]))
        conn.execute(
            "INSERT INTO pauses (id, developer_id, livemode, recipient, channel, message, options, timeout_default,"
            " metadata, respond_token, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (pause_id, caller.developer_id, caller.livemode, fields["recipient"], fields["channel"],
             fields["message"], compact_json(fields["options"]), fields["timeout_default"],
             None if fields["metadata"] is None else compact_json(fields["metadata"]),
             token, created_at, expires_at))
        pause = conn.execute("SELECT * FROM pauses WHERE id = ?", (pause_id,)).fetchone()
        if channel.render is not None:      # the link channel sends nothing: the agent delivers respond_url
            conn.execute(
                "INSERT INTO notifications (id, pause_id, channel, recipient, livemode, text, next_attempt_at,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (new_id("ntf_"), pause_id, fields["channel"], fields["recipient"], caller.livemode,
                 channel.render(pause, respond_url(config, token)), created_at, created_at, created_at))
        if idempotency_key is not None:
            conn.execute("INSERT INTO idempotency_keys VALUES (?, ?, ?, ?, ?, ?)",
                         (caller.developer_id, caller.livemode, idempotency_key, request_fingerprint(body),
                          pause_id, created_at))
        record_event(conn, caller.developer_id, caller.livemode, caller.actor, "pause.created", pause_id,
                     {"recipient": fields["recipient"], "channel": fields["channel"],
                      "options": fields["options"], "timeout_default": fields["timeout_default"],
                      "expires_at": api_time(expires_at), "metadata": fields["metadata"]}, when=created_at)
        webhooks_due = emit_pause_event(conn, config, pause, "pause.created", when=created_at)
    return pause, False, webhooks_due


def earlier_idempotent_pause(conn, caller, key, fingerprint, now):
    """The pause an identical request with this key made in the last 24 h; 422 if the body differs."""
    row = conn.execute("SELECT * FROM idempotency_keys WHERE developer_id = ? AND livemode = ? AND key = ?",
                       (caller.developer_id, caller.livemode, key)).fetchone()
    if row is None:
        return None
    if parse_db_time(row["created_at"]) < now - IDEMPOTENCY_WINDOW:
        conn.execute("DELETE FROM idempotency_keys WHERE developer_id = ? AND livemode = ? AND key = ?",
                     (caller.developer_id, caller.livemode, key))
        return None
    if not hmac.compare_digest(row["request_hash"], fingerprint):
        raise ApiError(422, "idempotency_key_reused",
                       "this Idempotency-Key was used in the last 24 hours with a different request body",
                       field="Idempotency-Key")
    return conn.execute("SELECT * FROM pauses WHERE id = ?", (row["pause_id"],)).fetchone()


def check_quota(conn, config, caller, now):
    allowed = plans(config).get(caller.plan)
    if allowed is None:
        raise ApiError(403, "unknown_plan", f"your plan {caller.plan!r} is not configured on this server; ask the operator")
    used = conn.execute("SELECT count(*) FROM pauses WHERE developer_id = ? AND livemode = 1 AND created_at >= ?",
                        (caller.developer_id, db_time(month_start(now)))).fetchone()[0]
    if used >= allowed:
        raise ApiError(429, "quota_exceeded",
                       f"the {caller.plan} plan allows {allowed} live pauses per month and this month's are used;"
                       " test keys are not counted, and the operator can change your plan")


def respond_url(config, token):
    return f"{base_url(config)}/respond/{token}"


def decide_pause(conn, config, pause_id, status, decided_by, choice=None, comment=None, data=None, now=None):
    """Move a pending pause to a final status. Call inside a transaction.

    Compare-and-set: only a pause still 'pending' changes, and a response only
    before expires_at, a timeout only after it. Returns True if this call won.
    """
    now = now or db_time()
    time_rule = {"responded": "AND expires_at > :now", "timed_out": "AND expires_at <= :now", "cancelled": ""}[status]
    # A timeout's choice is the pause's own timeout_default.
    choice_sql = "timeout_default" if status == "timed_out" else ":choice"
    changed = conn.execute(
        f"UPDATE pauses SET status = :status, choice = {choice_sql}, comment = :comment, decided_at = :now,"
        f" decided_by = :decided_by WHERE id = :id AND status = 'pending' {time_rule}",
        {"status": status, "choice": choice, "comment": comment, "now": now, "decided_by": decided_by,
         "id": pause_id}).rowcount
    if changed != 1:
        return False
    pause = conn.execute("SELECT * FROM pauses WHERE id = ?", (pause_id,)).fetchone()
    record_event(conn, pause["developer_id"], pause["livemode"], decided_by, f"pause.{status}", pause_id,
                 {"choice": pause["choice"], "comment": comment, "decided_by": decided_by, **(data or {})}, when=now)
    emit_pause_event(conn, config, pause, f"pause.{status}", when=now)
    return True


def respond_to_pause(conn, config, token, choice, comment, client):
    """A human's decision through the respond link: 200 facts, or 404/409/410/422."""
    if comment is not None and (not isinstance(comment, str) or len(comment) > 2000):
        raise invalid("comment", "comment must be text of at most 2000 characters")
    comment = comment.strip() or None if comment else None
    with transaction(conn):
        pause = pause_by_token(conn, token)
        refuse_if_decided(pause)
        if not isinstance(choice, str) or choice.strip() not in json.loads(pause["options"]):
            raise invalid("choice", f"choice must be one of: {', '.join(json.loads(pause['options']))}")
        decided_by = f"recipient:{pause['recipient']}"
        if not decide_pause(conn, config, pause["id"], "responded", decided_by, choice.strip(), comment, data=client):
            # Between the read and the write nothing can change (we hold the write
            # lock), so losing here means the pause expired at this very instant.
            refuse_if_decided(conn.execute("SELECT * FROM pauses WHERE id = ?", (pause["id"],)).fetchone(), expired=True)
        return conn.execute("SELECT * FROM pauses WHERE id = ?", (pause["id"],)).fetchone()


def record_sms_reply(conn, config, sender, text, message_sid=None):
    """An SMS or WhatsApp reply: decide the newest pending live pause sent to that
    number. Returns (the reply to text back, whether a decision was recorded)."""
    channel = "whatsapp" if sender.startswith("whatsapp:") else "sms"
    number = sender.removeprefix("whatsapp:")
    with transaction(conn):
        now = db_time()
        pause = conn.execute(
            "SELECT * FROM pauses WHERE recipient = ? AND status = 'pending' AND channel = ? AND livemode = 1"
            " AND expires_at > ? ORDER BY seq DESC LIMIT 1", (number, channel, now)).fetchone()
        if pause is None:
            return "PausePoint: there is no open request for this number.", False
        choice = reply_choice(text, json.loads(pause["options"]))
        if choice is None:
            return f"PausePoint: {reply_options(pause)}. ({shorten(pause['message'])})", False
        decide_pause(conn, config, pause["id"], "responded", f"recipient:{number}", choice, now=now,
                     data={"via": channel, "message_sid": message_sid})
    return f"PausePoint: recorded {choice} for \"{shorten(pause['message'])}\"", True


def reply_choice(text, options):
    """'2', '2.' or 'reject' -> the option meant, or None."""
    answer = text.strip().rstrip(".!").strip()
    if answer.isdigit() and 1 <= int(answer) <= len(options):
        return options[int(answer) - 1]
    return next((option for option in options if option.casefold() == answer.casefold()), None)


def shorten(text, limit=60):
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def pause_by_token(conn, token):
    pause = conn.execute("SELECT * FROM pauses WHERE respond_token = ?", (token,)).fetchone()
    if pause is None:
        raise ApiError(404, "not_found", "this respond link is not valid")
    return pause


def refuse_if_decided(pause, expired=False):
    """Raise 409 for a pause already decided, 410 for one that timed out or expired."""
    if pause["status"] == "responded":
        raise ApiError(409, "already_decided",
                       f"already decided: {pause['choice']!r} was chosen at {api_time(pause['decided_at'])}")
    if pause["status"] == "cancelled":
        raise ApiError(409, "already_decided", f"the request was cancelled at {api_time(pause['decided_at'])}")
    if pause["status"] == "timed_out" or expired or pause["expires_at"] <= db_time():
        outcome = f"; the default {pause['timeout_default']!r} applies" if pause["timeout_default"] else ""
        raise ApiError(410, "expired", f"this request expired at {api_time(pause['expires_at'])}{outcome}")


def cancel_pause(conn, config, caller, pause_id):
    with transaction(conn):
        pause = owned_pause(conn, caller, pause_id)
        if not decide_pause(conn, config, pause_id, "cancelled", caller.actor):
            raise ApiError(409, "not_pending", f"the pause is already {pause['status']}; only pending pauses can be cancelled")
        return conn.execute("SELECT * FROM pauses WHERE id = ?", (pause_id,)).fetchone()


def owned_pause(conn, caller, pause_id):
    """The caller's pause in the caller's mode; anything else is indistinguishable from absent."""
    pause = conn.execute("SELECT * FROM pauses WHERE id = ? AND developer_id = ? AND livemode = ?",
                         (pause_id, caller.developer_id, caller.livemode)).fetchone()
    if pause is None:
        raise ApiError(404, "not_found", f"no pause {pause_id!r} for this API key")
    return pause


def expire_due_pauses(conn, config, batch=200):
    """Time out every pending pause past its expires_at; returns the ids that timed out."""
    now = db_time()
    due = [r["id"] for r in conn.execute(
        "SELECT id FROM pauses WHERE status = 'pending' AND expires_at <= ? ORDER BY expires_at LIMIT ?",
        (now, batch))]
    if not due:
        return []
    with transaction(conn):
        return [pause_id for pause_id in due if decide_pause(conn, config, pause_id, "timed_out", "timeout", now=now)]


def pause_json(pause, config, notification=None):
    """The whole pause as GET /v1/pause/{id} shows it."""
    body = {
        "pause_id": pause["id"],
        "status": pause["status"],
        "recipient": pause["recipient"],
        "channel": pause["channel"],
        "message": pause["message"],
        "options": json.loads(pause["options"]),
        "timeout_default": pause["timeout_default"],
        "choice": pause["choice"],
        "comment": pause["comment"],
        "decided_at": api_time(pause["decided_at"]),
        "decided_by": pause["decided_by"],
        "metadata": None if pause["metadata"] is None else json.loads(pause["metadata"]),
        "respond_url": respond_url(config, pause["respond_token"]),
        "livemode": bool(pause["livemode"]),
        "expires_at": api_time(pause["expires_at"]),
        "created_at": api_time(pause["created_at"]),
    }
    body["notification"] = None         # the link channel: nothing is sent, the agent delivers respond_url
    if notification is not None:
        body["notification"] = {
            "channel": notification["channel"],
            "status": "queued" if notification["status"] == "sending" else notification["status"],
            "attempts": notification["attempts"],
            "provider_message_id": notification["provider_message_id"],
            "last_error": notification["last_error"],
            "text": notification["text"],
        }
    return body


def created_json(pause, config):
    """POST /v1/pause's answer: exactly the quickstart's fields."""
    return {
        "pause_id": pause["id"],
        "status": pause["status"],
        "respond_url": respond_url(config, pause["respond_token"]),
        "expires_at": api_time(pause["expires_at"]),
        "created_at": api_time(pause["created_at"]),
    }


def respond_facts(pause):
    """What the holder of a respond link may see: the question and its outcome, not the agent's metadata."""
    return {
        "message": pause["message"],
        "options": json.loads(pause["options"]),
        "status": pause["status"],
        "choice": pause["choice"],
        "comment": pause["comment"],
        "decided_at": api_time(pause["decided_at"]),
        "expires_at": api_time(pause["expires_at"]),
        "timeout_default": pause["timeout_default"],
    }


###############################################################################
# Channels
###############################################################################

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
PROVIDER_TIMEOUT_SECONDS = 10


@dataclasses.dataclass(frozen=True)
class Channel:
    """How one kind of notification reaches a human.

    Test-mode pauses never send, so only live pauses need missing_settings()
    to be empty. send(config, notification, pause) returns the provider's
    message id (or None) or raises ChannelError.
    """
    name: str
    kind: str                     # 'twilio', 'email', 'apprise' or 'link'
    recipient_problem: object     # recipient -> None, or a sentence saying what is wrong
    missing_settings: object      # config -> [setting names a live send still needs]
    render: object = None         # (pause, respond_url) -> the exact text sent; None: nothing is sent
    send: object = None


class ChannelError(Exception):
    """A send failed. A transient failure is retried until NOTIFICATION_ATTEMPTS are
    used; a permanent one (the provider refused this message) fails at once."""

    def __init__(self, message, permanent=False):
        super().__init__(message)
        self.permanent = permanent


def channels(config):
    """The channels this server offers: the built-in ones and one per [channels.NAME] target."""
    found = {
        "sms": Channel("sms", "twilio", phone_problem, twilio_missing, sms_text, send_twilio),
        "whatsapp": Channel("whatsapp", "twilio", phone_problem, twilio_missing, sms_text, send_twilio),
        "email": Channel("email", "email", email_problem, smtp_missing, email_text, send_email),
        "link": Channel("link", "link", label_problem, lambda config: []),
    }
    for key, url in config.items():
        match = CHANNEL_KEY.match(key)
        if match:
            found[match.group(1)] = Channel(match.group(1), "apprise", label_problem, lambda config: [],
                                            push_text, functools.partial(send_apprise, url))
    return found


def phone_problem(recipient):
    if not E164.match(recipient):
        return "recipient must be a phone number in E.164 form, like +15550100 (a + and 7-15 digits)"
    return None


def email_problem(recipient):
    if len(recipient) > 254 or not EMAIL.match(recipient):
        return "recipient must be an email address like ada@example.com"
    return None


def label_problem(recipient):
    # Push targets and links are named in config or delivered by the agent;
    # the recipient only says who is expected to answer, for the audit log.
    if len(recipient) > 200:
        return "recipient must be at most 200 characters"
    return None


def twilio_missing(config):
    missing = [key for key in ("twilio.account_sid", "twilio.auth_token") if not config[key]]
    if not config["twilio.from_number"] and not config["twilio.messaging_service_sid"]:
        missing.append("twilio.from_number or twilio.messaging_service_sid")
    return missing


def smtp_missing(config):
    return [key for key in ("smtp.host", "smtp.from_address") if not config[key]]


def reply_options(pause):
    """'Reply 1 for Approve, 2 for Reject': what an SMS reply may say (see record_sms_reply)."""
    options = json.loads(pause["options"])
    return "Reply " + ", ".join(f"{n} for {option}" for n, option in enumerate(options, 1))


def human_time(db_text):
    """'Nov 28 23:51 UTC': short enough for an SMS, plain enough for anyone."""
    return parse_db_time(db_text).strftime("%b %d %H:%M UTC")


def expiry_text(pause):
    return human_time(pause["expires_at"])


def sms_text(pause, url):
    """As few segments as possible: no decoration, GSM-7 characters only in what we add."""
    return f"{pause['message']}\n{reply_options(pause)}, or open {url}\nExpires {expiry_text(pause)}"


def push_text(pause, url):
    options = " / ".join(json.loads(pause["options"]))
    return f"{pause['message']}\n\nOptions: {options}\nAnswer: {url}\nExpires {expiry_text(pause)}"


def email_subject(pause):
    first_line = pause["message"].strip().splitlines()[0]
    return "Approval needed: " + (first_line if len(first_line) <= 80 else first_line[:79] + "…")


def email_text(pause, url):
    options = "\n".join(f"  {option}: {url}?choice={urllib.parse.quote(option)}"
                        for option in json.loads(pause["options"]))
    return (f"Subject: {email_subject(pause)}\n\n{pause['message']}\n\nChoose one (each link opens a page where"
            f" you confirm):\n{options}\n\nThis request expires {expiry_text(pause)}.")


def send_twilio(config, notification, pause):
    """One SMS or WhatsApp message through the Twilio REST API (or a compatible one at twilio.api_base)."""
    client = twilio.rest.Client(config["twilio.account_sid"], config["twilio.auth_token"],
                                http_client=twilio.http.http_client.TwilioHttpClient(timeout=PROVIDER_TIMEOUT_SECONDS))
    client.api.base_url = config["twilio.api_base"].rstrip("/")
    prefix = "whatsapp:" if notification["channel"] == "whatsapp" else ""
    sender = ({"messaging_service_sid": config["twilio.messaging_service_sid"]}
              if config["twilio.messaging_service_sid"] else {"from_": prefix + config["twilio.from_number"]})
    try:
        message = client.messages.create(to=prefix + notification["recipient"], body=notification["text"], **sender)
    except twilio.base.exceptions.TwilioRestException as e:
        # 4xx means Twilio refused this message (bad number, unverified sender…): retrying changes nothing.
        raise ChannelError(f"Twilio answered HTTP {e.status}: {e.msg}",
                           permanent=400 <= e.status < 500 and e.status != 429) from None
    except (twilio.base.exceptions.TwilioException, requests.RequestException) as e:
        raise ChannelError(f"could not reach Twilio: {e}") from None
    return message.sid


def send_email(config, notification, pause):
    """A plain-text and an HTML part; every button opens the respond page, none decides on GET."""
    url = respond_url(config, pause["respond_token"])
    message = email.message.EmailMessage()
    message["Subject"] = email_subject(pause)
    message["From"] = config["smtp.from_address"]
    message["To"] = notification["recipient"]
    message["Message-ID"] = email.utils.make_msgid(idstring=notification["id"])
    message.set_content(notification["text"].split("\n\n", 1)[1])
    message.add_alternative(bottle.template("email", template_lookup=[TEMPLATES_DIR], url=url,
                                            pause=respond_facts(pause), expires=expiry_text(pause),
                                            quote=urllib.parse.quote), subtype="html")
    security, host, port = config["smtp.security"], config["smtp.host"], config["smtp.port"]
    try:
        context = ssl.create_default_context(cafile=config["smtp.ca_file"] or None)
        if security == "tls":
            server = smtplib.SMTP_SSL(host, port, timeout=PROVIDER_TIMEOUT_SECONDS, context=context)
        else:
            server = smtplib.SMTP(host, port, timeout=PROVIDER_TIMEOUT_SECONDS)
        with server:
            if security == "starttls":
                server.starttls(context=context)
            if config["smtp.username"]:
                server.login(config["smtp.username"], config["smtp.password"])
            server.send_message(message)
    except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused) as e:
        raise ChannelError(f"SMTP {host}:{port} refused the message: {e}", permanent=True) from None
    except (smtplib.SMTPException, OSError) as e:
        raise ChannelError(f"SMTP {host}:{port}: {e}") from None
    return message["Message-ID"]


def send_apprise(target_url, config, notification, pause):
    """A push or chat message to an operator-named target (ntfy, Slack, Gotify, Matrix, …)."""
    notifier = apprise.Apprise()
    if not notifier.add(target_url):
        raise ChannelError(f"channel {notification['channel']!r} has a URL Apprise does not understand")
    if not notifier.notify(title="Approval needed", body=notification["text"]):
        scheme = target_url.split("://", 1)[0]
        raise ChannelError(f"Apprise could not deliver to the {scheme}:// target (see the server log)")
    return None


NOTIFICATION_ATTEMPTS = 3
NOTIFICATION_BACKOFF_SECONDS = (5, 30)     # before the 2nd and the 3rd attempt
NOTIFICATION_CLAIM_SECONDS = 120           # a 'sending' claim older than this was abandoned by a crash


def send_due_notifications(conn, config, batch=100):
    """Send (or, in test mode, simulate) every due notification; returns how many were handled."""
    now = db_time()
    due = conn.execute(
        "SELECT * FROM notifications WHERE status IN ('queued', 'sending') AND next_attempt_at <= ?"
        " ORDER BY next_attempt_at LIMIT ?", (now, batch)).fetchall()
    simulate_notifications([row for row in due if not row["livemode"]], conn)
    for row in due:
        if row["livemode"]:
            deliver_notification(conn, config, row)
    return len(due)


def simulate_notifications(rows, conn):
    """Test mode: record each notification as simulated, with its exact text, in one transaction."""
    if not rows:
        return
    with transaction(conn):
        now = db_time()
        for row in rows:
            changed = conn.execute(
                "UPDATE notifications SET status = 'simulated', attempts = attempts + 1, updated_at = ?"
                " WHERE id = ? AND status IN ('queued', 'sending')", (now, row["id"])).rowcount
            if changed:
                developer_id = conn.execute("SELECT developer_id FROM pauses WHERE id = ?",
                                            (row["pause_id"],)).fetchone()[0]
                record_event(conn, developer_id, 0, "system", "notification.simulated", row["pause_id"],
                             {"channel": row["channel"], "recipient": row["recipient"], "text": row["text"]}, when=now)


def deliver_notification(conn, config, row):
    """Claim a live notification, send it outside any transaction, record the outcome."""
    with transaction(conn):
        claim_until = db_time(utcnow() + dt.timedelta(seconds=NOTIFICATION_CLAIM_SECONDS))
        claimed = conn.execute(
            "UPDATE notifications SET status = 'sending', attempts = attempts + 1, next_attempt_at = ?, updated_at = ?"
            " WHERE id = ? AND status = ? AND next_attempt_at = ?",
            (claim_until, db_time(), row["id"], row["status"], row["next_attempt_at"])).rowcount
    if not claimed:
        return      # another worker got there first
    attempt = row["attempts"] + 1
    channel, permanent = channels(config).get(row["channel"]), False
    try:
        if channel is None or channel.send is None or channel.missing_settings(config):
            raise ChannelError(f"channel {row['channel']!r} is not configured on this server")
        pause = conn.execute("SELECT * FROM pauses WHERE id = ?", (row["pause_id"],)).fetchone()
        provider_id, error = channel.send(config, row, pause), None
    except ChannelError as e:
        provider_id, error, permanent = None, str(e)[:500], e.permanent
    except Exception as e:      # a provider library's surprise must not kill the job
        log.exception("sending notification %s failed", row["id"])
        provider_id, error = None, f"{type(e).__name__}: {e}"[:500]
    with transaction(conn):
        now = db_time()
        developer_id = conn.execute("SELECT developer_id FROM pauses WHERE id = ?", (row["pause_id"],)).fetchone()[0]
        if error is None:
            status, next_at, event = "sent", now, "notification.sent"
        elif attempt < NOTIFICATION_ATTEMPTS and not permanent:
            status, event = "queued", None
            next_at = db_time(utcnow() + dt.timedelta(seconds=NOTIFICATION_BACKOFF_SECONDS[attempt - 1]))
        else:
            status, next_at, event = "failed", now, "notification.failed"
        changed = conn.execute(
            "UPDATE notifications SET status = ?, next_attempt_at = ?, provider_message_id = ?, last_error = ?,"
            " updated_at = ? WHERE id = ? AND status = 'sending' AND next_attempt_at = ?",
            (status, next_at, provider_id, error, now, row["id"], claim_until)).rowcount
        if changed and event:
            record_event(conn, developer_id, 1, "system", event, row["pause_id"],
                         {"channel": row["channel"], "recipient": row["recipient"], "attempts": attempt,
                          "provider_message_id": provider_id, "error": error}, when=now)
        if changed and status == "failed":
            pause = conn.execute("SELECT * FROM pauses WHERE id = ?", (row["pause_id"],)).fetchone()
            emit_pause_event(conn, config, pause, "pause.notification_failed", when=now)


###############################################################################
# Webhooks: signed events, an outbox, retries
###############################################################################

WEBHOOK_EVENTS = ("pause.created", "pause.responded", "pause.timed_out", "pause.cancelled",
                  "pause.notification_failed")
WEBHOOK_FIELDS = {"url", "events", "secret"}
MIN_SECRET_LENGTH = 16
SECRET_ROTATION_OVERLAP = dt.timedelta(hours=24)
# Delays before attempts 2..10: about three days in all.
RETRY_DELAYS_SECONDS = (5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 14 * 3600, 20 * 3600, 24 * 3600)
RETRY_JITTER = 0.1                          # each delay varies by up to ±10 %, so retries do not stampede
MAX_RETRY_AFTER_SECONDS = 24 * 3600
DELIVERY_TIMEOUT_SECONDS = 10
DELIVERY_CLAIM_SECONDS = 30                 # a 'delivering' claim older than this was abandoned by a crash
DISABLE_AFTER_FAILING = dt.timedelta(days=3)
DELIVERIES_IN_FLIGHT_PER_WEBHOOK = 2        # so one slow receiver cannot take every worker


def sign(secret, timestamp, body):
    return hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secrets_, timestamp, body):
    """'t=<unix seconds>,v1=<hex>[,v1=<hex>]': one v1 per secret in force."""
    return ",".join([f"t={timestamp}"] + [f"v1={sign(s, timestamp, body)}" for s in secrets_])


def verify_signature(secret, header, body, tolerance=300):
    """True if `header` (X-PausePoint-Signature) signs `body` (the raw bytes) with
    `secret` and its timestamp is within `tolerance` seconds of now.

    Receivers copy this function: it needs only the standard library."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    timestamp, candidates = None, []
    for part in (header or "").split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or abs(time.time() - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


def url_problem(url, allow_private):
    """None if webhooks may be sent to `url`, else a sentence saying why not."""
    if not isinstance(url, str) or len(url) > 2048:
        return "url must be an http:// or https:// URL of at most 2048 characters"
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "url must be an http:// or https:// URL"
    if parts.username or parts.password:
        return "url must not contain credentials; receivers authenticate calls by their signature"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)}
    except (OSError, ValueError) as e:
        return f"url's host {parts.hostname!r} cannot be resolved ({e})"
    if not allow_private:
        for address in sorted(addresses):
            if not is_public_address(address):
                return (f"url's host resolves to {address}, a loopback, private or otherwise non-public address;"
                        " the operator can allow these with webhooks.allow_private = true")
    return None


def is_public_address(address):
    ip = ipaddress.ip_address(address.split("%")[0])
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class PrivateAddressRefused(OSError):
    """The webhook host resolved to a non-public address at connect time."""


def _refuse_private_peer(sock):
    address = sock.getpeername()[0]
    if not is_public_address(address):
        sock.close()
        raise PrivateAddressRefused(f"refused to send to {address}: not a public address "
                                    "(webhooks.allow_private = false)")
    return sock


class _PublicOnlyHTTPConnection(urllib3.connection.HTTPConnection):
    def _new_conn(self):
        return _refuse_private_peer(super()._new_conn())


class _PublicOnlyHTTPSConnection(urllib3.connection.HTTPSConnection):
    def _new_conn(self):
        return _refuse_private_peer(super()._new_conn())


class _PublicOnlyAdapter(requests.adapters.HTTPAdapter):
    """Checks the address actually connected to, after DNS: a name that resolved to a
    public address at registration may point inward by now. Nothing is sent first."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("PublicOnlyHTTPPool", (urllib3.HTTPConnectionPool,),
                         {"ConnectionCls": _PublicOnlyHTTPConnection}),
            "https": type("PublicOnlyHTTPSPool", (urllib3.HTTPSConnectionPool,),
                          {"ConnectionCls": _PublicOnlyHTTPSConnection}),
        }


def webhook_session(allow_private):
    session = requests.Session()
    session.trust_env = False       # an environment proxy would hide the real destination from the guard
    if not allow_private:
        session.mount("http://", _PublicOnlyAdapter())
        session.mount("https://", _PublicOnlyAdapter())
    return session


def validate_webhook_request(body, allow_private, partial=False):
    """Check a POST (or, partial, a PATCH) /v1/webhooks body; returns the clean fields."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object")
    allowed = WEBHOOK_FIELDS | ({"enabled"} if partial else set())
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(unknown[0], f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    fields = {}
    if "url" in body or not partial:
        problem = url_problem(body.get("url"), allow_private)
        if problem:
            raise invalid("url", problem)
        fields["url"] = body["url"].strip()
    if "events" in body or not partial:
        events = body.get("events")
        if (not isinstance(events, list) or not events
                or not all(isinstance(e, str) and e in WEBHOOK_EVENTS for e in events)):
            raise invalid("events", f"events must be a non-empty list drawn from: {', '.join(WEBHOOK_EVENTS)}")
        fields["events"] = sorted(set(events), key=WEBHOOK_EVENTS.index)
    if body.get("secret") is not None:
        if not isinstance(body["secret"], str) or not MIN_SECRET_LENGTH <= len(body["secret"]) <= 256:
            raise invalid("secret", f"secret must be {MIN_SECRET_LENGTH}-256 characters (or left out to have one made)")
        fields["secret"] = body["secret"]
    if "enabled" in body:
        if body["enabled"] is not True and body["enabled"] is not False:
            raise invalid("enabled", "enabled must be true or false")
        fields["enabled"] = body["enabled"]
    return fields


def create_webhook(conn, config, caller, body):
    """Register an endpoint; returns (row, secret if it was generated here)."""
    fields = validate_webhook_request(body, config["webhooks.allow_private"])
    generated = None
    if "secret" not in fields:
        generated = fields["secret"] = "whsec_" + secrets.token_urlsafe(32)
    webhook_id, now = new_id("wh_"), db_time()
    with transaction(conn):
        conn.execute("INSERT INTO webhooks (id, developer_id, livemode, url, events, secret, created_at, updated_at)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (webhook_id, caller.developer_id, caller.livemode, fields["url"], compact_json(fields["events"]),
                      fields["secret"], now, now))
        record_event(conn, caller.developer_id, caller.livemode, caller.actor, "webhook.created",
                     data={"webhook_id": webhook_id, "url": fields["url"], "events": fields["events"]}, when=now)
        return owned_webhook(conn, caller, webhook_id), generated


def update_webhook(conn, config, caller, webhook_id, body):
    """PATCH: change url or events, rotate the secret (the old one signs too for 24 h), enable or disable."""
    fields = validate_webhook_request(body, config["webhooks.allow_private"], partial=True)
    now = utcnow()
    with transaction(conn):
        webhook = owned_webhook(conn, caller, webhook_id)
        changes = {}
        if "url" in fields:
            changes["url"] = fields["url"]
        if "events" in fields:
            changes["events"] = compact_json(fields["events"])
        if "secret" in fields and fields["secret"] != webhook["secret"]:
            changes.update(secret=fields["secret"], previous_secret=webhook["secret"],
                           previous_secret_expires_at=db_time(now + SECRET_ROTATION_OVERLAP))
        if fields.get("enabled") is True and webhook["status"] == "disabled":
            changes.update(status="enabled", disabled_reason=None, failing_since=None)
            conn.execute("UPDATE webhook_deliveries SET next_attempt_at = ? WHERE webhook_id = ? AND status = 'pending'"
                         " AND next_attempt_at IS NULL", (db_time(now), webhook_id))
        if fields.get("enabled") is False and webhook["status"] == "enabled":
            disable_webhook(conn, webhook, "disabled through the API", caller.actor)
        if changes:
            changes["updated_at"] = db_time(now)
            conn.execute(f"UPDATE webhooks SET {', '.join(f'{k} = ?' for k in changes)} WHERE id = ?",
                         (*changes.values(), webhook_id))
        record_event(conn, caller.developer_id, caller.livemode, caller.actor, "webhook.updated",
                     data={"webhook_id": webhook_id, "changed": sorted(set(fields) - {"secret"}) +
                           (["secret"] if "secret" in changes else [])})
        return owned_webhook(conn, caller, webhook_id)


def delete_webhook(conn, caller, webhook_id):
    with transaction(conn):
        webhook = owned_webhook(conn, caller, webhook_id)
        now = db_time()
        conn.execute("UPDATE webhooks SET deleted_at = ?, updated_at = ? WHERE id = ?", (now, now, webhook_id))
        conn.execute("UPDATE webhook_deliveries SET status = 'cancelled', next_attempt_at = NULL, updated_at = ?"
                     " WHERE webhook_id = ? AND status = 'pending'", (now, webhook_id))
        record_event(conn, caller.developer_id, caller.livemode, caller.actor, "webhook.deleted",
                     data={"webhook_id": webhook_id, "url": webhook["url"]}, when=now)


def disable_webhook(conn, webhook, reason, actor):
    """Stop sending to an endpoint; its pending deliveries wait (unscheduled) until it is re-enabled."""
    now = db_time()
    conn.execute("UPDATE webhooks SET status = 'disabled', disabled_reason = ?, updated_at = ? WHERE id = ?",
                 (reason, now, webhook["id"]))
    conn.execute("UPDATE webhook_deliveries SET next_attempt_at = NULL WHERE webhook_id = ? AND status = 'pending'",
                 (webhook["id"],))
    record_event(conn, webhook["developer_id"], webhook["livemode"], actor, "webhook.disabled",
                 data={"webhook_id": webhook["id"], "url": webhook["url"], "reason": reason}, when=now)


def owned_webhook(conn, caller, webhook_id):
    webhook = conn.execute("SELECT * FROM webhooks WHERE id = ? AND developer_id = ? AND livemode = ?"
                           " AND deleted_at IS NULL", (webhook_id, caller.developer_id, caller.livemode)).fetchone()
    if webhook is None:
        raise ApiError(404, "not_found", f"no webhook {webhook_id!r} for this API key")
    return webhook


def webhook_json(webhook):
    return {
        "webhook_id": webhook["id"],
        "url": webhook["url"],
        "events": json.loads(webhook["events"]),
        "status": webhook["status"],
        "disabled_reason": webhook["disabled_reason"],
        "livemode": bool(webhook["livemode"]),
        "created_at": api_time(webhook["created_at"]),
        "updated_at": api_time(webhook["updated_at"]),
    }


def emit_pause_event(conn, config, pause, event_type, when=None):
    """Queue `event_type` about `pause` for every enabled endpoint of its owner, in its
    mode, that subscribed to it. Call inside the transaction of the change.
    Returns whether any delivery was queued."""
    targets = [row["id"] for row in conn.execute(
        "SELECT id, events FROM webhooks WHERE developer_id = ? AND livemode = ? AND deleted_at IS NULL"
        " AND status = 'enabled'", (pause["developer_id"], pause["livemode"]))
        if event_type in json.loads(row["events"])]
    if targets:
        notification = conn.execute("SELECT * FROM notifications WHERE pause_id = ?", (pause["id"],)).fetchone()
        queue_event(conn, pause["developer_id"], pause["livemode"], event_type,
                    pause_json(pause, config, notification), targets, pause["id"], when)
    return bool(targets)


def queue_event(conn, developer_id, livemode, event_type, data, webhook_ids, pause_id=None, when=None):
    """Write an event and one due delivery per endpoint (the outbox); returns the delivery ids."""
    event_id, now = new_id("evt_"), when or db_time()
    body = compact_json({"id": event_id, "type": event_type, "created_at": api_time(now),
                         "livemode": bool(livemode), "data": data})
    conn.execute("INSERT INTO webhook_events (id, developer_id, livemode, type, pause_id, body, created_at)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?)", (event_id, developer_id, livemode, event_type, pause_id, body, now))
    delivery_ids = []
    for webhook_id in webhook_ids:
        delivery_ids.append(new_id("whd_"))
        conn.execute("INSERT INTO webhook_deliveries (id, webhook_id, event_id, next_attempt_at, created_at, updated_at)"
                     " VALUES (?, ?, ?, ?, ?, ?)", (delivery_ids[-1], webhook_id, event_id, now, now, now))
    return delivery_ids


def send_test_event(conn, caller, webhook_id):
    with transaction(conn):
        refuse_if_disabled(owned_webhook(conn, caller, webhook_id))
        [delivery_id] = queue_event(conn, caller.developer_id, caller.livemode, "webhook.test",
                                    {"webhook_id": webhook_id, "message": "A test event from PausePoint."},
                                    [webhook_id])
        return conn.execute("SELECT * FROM webhook_deliveries WHERE id = ?", (delivery_id,)).fetchone()


def redeliver(conn, caller, webhook_id, delivery_id):
    """Send a delivery again now, whatever became of it before."""
    with transaction(conn):
        refuse_if_disabled(owned_webhook(conn, caller, webhook_id))
        changed = conn.execute(
            "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = ?, updated_at = ?"
            " WHERE id = ? AND webhook_id = ? AND status != 'delivering'",
            (db_time(), db_time(), delivery_id, webhook_id)).rowcount
        if not changed:
            exists = conn.execute("SELECT 1 FROM webhook_deliveries WHERE id = ? AND webhook_id = ?",
                                  (delivery_id, webhook_id)).fetchone()
            if not exists:
                raise ApiError(404, "not_found", f"no delivery {delivery_id!r} for this webhook")
            raise ApiError(409, "delivery_in_progress", "this delivery is being attempted right now")
        return conn.execute("SELECT * FROM webhook_deliveries WHERE id = ?", (delivery_id,)).fetchone()


def refuse_if_disabled(webhook):
    """Sending to a disabled endpoint would bypass what disabled it (a 410, three failing days)."""
    if webhook["status"] != "enabled":
        raise ApiError(409, "webhook_disabled", 'the webhook is disabled; enable it with PATCH {"enabled": true}')


def delivery_json(conn, delivery):
    event = conn.execute("SELECT type FROM webhook_events WHERE id = ?", (delivery["event_id"],)).fetchone()
    attempts = conn.execute("SELECT * FROM webhook_attempts WHERE delivery_id = ? ORDER BY attempt",
                            (delivery["id"],)).fetchall()
    return {
        "delivery_id": delivery["id"],
        "event_id": delivery["event_id"],
        "event_type": event["type"],
        "status": delivery["status"],
        "next_attempt_at": api_time(delivery["next_attempt_at"]) if delivery["status"] == "pending" else None,
        "created_at": api_time(delivery["created_at"]),
        "attempts": [{"attempt": a["attempt"], "started_at": api_time(a["started_at"]),
                      "status_code": a["status_code"], "error": a["error"], "duration_ms": a["duration_ms"],
                      "next_attempt_at": api_time(a["next_attempt_at"])} for a in attempts],
    }


def claim_due_deliveries(conn, capacity, in_flight_by_webhook):
    """Claim up to `capacity` due deliveries (compare-and-set, so no row is sent twice
    at once), at most DELIVERIES_IN_FLIGHT_PER_WEBHOOK per endpoint."""
    now = utcnow()
    due = conn.execute(
        "SELECT d.id, d.status, d.attempts, d.next_attempt_at, d.webhook_id FROM webhook_deliveries d"
        " WHERE d.status IN ('pending', 'delivering') AND d.next_attempt_at <= ?"
        " ORDER BY d.next_attempt_at LIMIT 500", (db_time(now),)).fetchall()
    claimed, taken = [], dict(in_flight_by_webhook)
    claim_until = db_time(now + dt.timedelta(seconds=DELIVERY_CLAIM_SECONDS))
    for row in due:
        if len(claimed) >= capacity:
            break
        if taken.get(row["webhook_id"], 0) >= DELIVERIES_IN_FLIGHT_PER_WEBHOOK:
            continue
        with transaction(conn):
            won = conn.execute(
                "UPDATE webhook_deliveries SET status = 'delivering', attempts = attempts + 1, next_attempt_at = ?,"
                " updated_at = ? WHERE id = ? AND status = ? AND next_attempt_at = ?",
                (claim_until, db_time(now), row["id"], row["status"], row["next_attempt_at"])).rowcount
        if won:
            taken[row["webhook_id"]] = taken.get(row["webhook_id"], 0) + 1
            claimed.append((row["id"], row["webhook_id"], row["attempts"] + 1, claim_until))
    return claimed


def attempt_delivery(conn, config, delivery_id, attempt, claim_until):
    """POST one claimed delivery and record the outcome; returns the HTTP status or None."""
    row = conn.execute(
        "SELECT d.webhook_id, w.url, w.secret, w.previous_secret, w.previous_secret_expires_at,"
        " e.id AS event_id, e.type, e.body FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id"
        " JOIN webhook_events e ON e.id = d.event_id WHERE d.id = ?", (delivery_id,)).fetchone()
    body = row["body"].encode("utf-8")
    signing = [row["secret"]]
    if row["previous_secret"] and row["previous_secret_expires_at"] > db_time():
        signing.append(row["previous_secret"])
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"PausePoint-Webhooks/{VERSION}",
        "X-PausePoint-Event": row["type"],
        "X-PausePoint-Event-Id": row["event_id"],
        "X-PausePoint-Signature": signature_header(signing, int(time.time()), body),
    }
    started_at, started = db_time(), time.monotonic()
    status_code, error, retry_after = None, None, None
    try:
        with webhook_session(config["webhooks.allow_private"]) as session:
            response = session.post(row["url"], data=body, headers=headers, timeout=DELIVERY_TIMEOUT_SECONDS,
                                    allow_redirects=False, stream=True)
            response.close()
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}" + (" (redirects are not followed)" if 300 <= status_code < 400 else "")
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
    except requests.RequestException as e:
        error = describe_request_error(e)
    duration_ms = round((time.monotonic() - started) * 1000)
    record_attempt(conn, delivery_id, row["webhook_id"], attempt, claim_until, started_at, status_code, error,
                   duration_ms, retry_after)
    return status_code


def describe_request_error(e):
    refused = find_cause(e, PrivateAddressRefused)
    if refused is not None:
        return str(refused)
    if isinstance(e, requests.Timeout):
        return f"timed out after {DELIVERY_TIMEOUT_SECONDS} s"
    if isinstance(e, requests.ConnectionError):
        return "could not connect"
    return f"{type(e).__name__}: {e}"[:300]


def find_cause(error, kind, depth=0):
    """The `kind` exception somewhere inside `error`: requests and urllib3 wrap
    connection errors several layers deep, in args, .reason or the context."""
    if isinstance(error, kind):
        return error
    if depth > 6 or not isinstance(error, BaseException):
        return None
    for inner in (*error.args, getattr(error, "reason", None), error.__cause__, error.__context__):
        found = find_cause(inner, kind, depth + 1)
        if found is not None:
            return found
    return None


def retry_after_seconds(value):
    if value and value.strip().isdigit():
        return min(int(value.strip()), MAX_RETRY_AFTER_SECONDS)
    return None


def record_attempt(conn, delivery_id, webhook_id, attempt, claim_until, started_at, status_code, error,
                   duration_ms, retry_after):
    with transaction(conn):
        now = utcnow()
        webhook = conn.execute("SELECT * FROM webhooks WHERE id = ?", (webhook_id,)).fetchone()
        next_at = None
        if error is None:
            status = "succeeded"
        elif status_code == 410 or attempt > len(RETRY_DELAYS_SECONDS):
            status = "failed"
        else:
            status = "pending"
            delay = RETRY_DELAYS_SECONDS[attempt - 1] * random.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)
            next_at = db_time(now + dt.timedelta(seconds=max(delay, retry_after or 0)))
        changed = conn.execute(
            "UPDATE webhook_deliveries SET status = ?, next_attempt_at = ?, updated_at = ?"
            " WHERE id = ? AND status = 'delivering' AND next_attempt_at = ?",
            (status, next_at, db_time(now), delivery_id, claim_until)).rowcount
        if not changed:
            return      # the claim expired and another worker took the delivery over; its outcome counts
        conn.execute("INSERT INTO webhook_attempts VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (delivery_id, attempt, started_at, status_code, error, duration_ms, next_at))
        if error is None:
            conn.execute("UPDATE webhooks SET failing_since = NULL WHERE id = ?", (webhook_id,))
            return
        if status == "failed":
            event = conn.execute("SELECT e.id, e.type FROM webhook_deliveries d JOIN webhook_events e"
                                 " ON e.id = d.event_id WHERE d.id = ?", (delivery_id,)).fetchone()
            record_event(conn, webhook["developer_id"], webhook["livemode"], "system", "webhook.delivery_failed",
                         data={"webhook_id": webhook_id, "delivery_id": delivery_id, "event_id": event["id"],
                               "event_type": event["type"], "attempts": attempt, "error": error})
        failing_since = webhook["failing_since"] or db_time(now)
        conn.execute("UPDATE webhooks SET failing_since = ? WHERE id = ?", (failing_since, webhook_id))
        if webhook["status"] == "enabled":
            if status_code == 410:
                disable_webhook(conn, webhook, "the endpoint answered 410 Gone", "system")
            elif parse_db_time(failing_since) <= now - DISABLE_AFTER_FAILING:
                disable_webhook(conn, webhook, "every delivery failed for 3 days", "system")


###############################################################################
# Runtime: connections, waiting agents, the scheduler
###############################################################################

JOB_INTERVAL_SECONDS = 0.25


class Runtime:
    """Everything one running PausePoint holds besides its config: per-thread
    database connections, the condition long-polling agents wait on, the rate
    limiter, the scheduler and the webhook workers."""

    def __init__(self, config):
        self.config = config
        self._local = threading.local()
        self.write_lock = threading.Lock()
        self.decisions = threading.Condition()
        self.decision_count = 0
        self.stopping = False
        waiters = config["server.threads"] - THREADS_KEPT_FOR_OTHER_REQUESTS
        self.wait_slots = threading.BoundedSemaphore(waiters)
        self.limiter = RateLimiter(enabled=config["ratelimit.enabled"])
        self.scheduler = BackgroundScheduler(timezone=dt.timezone.utc,
                                             job_defaults={"coalesce": True, "max_instances": 1,
                                                           "misfire_grace_time": None})
        # Webhook calls run on their own bounded pool, so a slow receiver holds a
        # worker, never the scheduler or an API thread.
        self.webhook_workers = concurrent.futures.ThreadPoolExecutor(
            config["webhooks.workers"], thread_name_prefix="webhook")
        self.in_flight = {}                 # webhook id -> deliveries being attempted now
        self.in_flight_lock = threading.Lock()
        self.wake_lock = threading.Lock()
        migrate(self.db())

    def db(self):
        """This thread's connection (sqlite3 connections are not shared between threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.config["database.path"], self.write_lock)
        return conn

    def decided(self):
        """Wake every agent waiting on ?wait=, and the webhook job: some pause left 'pending'."""
        with self.decisions:
            self.decision_count += 1
            self.decisions.notify_all()
        self.wake_webhooks()

    def wake_webhooks(self):
        """Run the delivery job now rather than at its next tick. Only a hint: the
        tick finds the same rows, so a lost wake-up costs at most one interval."""
        with self.wake_lock:
            if self.stopping:
                return
            with contextlib.suppress(Exception):
                self.scheduler.modify_job("run_webhooks", next_run_time=utcnow())

    def start(self):
        """Start the jobs. The first run is immediate, so pauses that fell due while
        the process was down time out within moments of the start."""
        now = utcnow()
        for job in (self.run_timeouts, self.run_notifications, self.run_webhooks):
            self.scheduler.add_job(job, "interval", seconds=JOB_INTERVAL_SECONDS, id=job.__name__, next_run_time=now)
        self.scheduler.start()

    def stop(self):
        # APScheduler's shutdown holds its job-store lock while it waits for running
        # jobs, and a job that called modify_job() now would wait for that lock
        # forever. Under wake_lock, no wake-up is in progress or can start after this.
        with self.wake_lock:
            self.stopping = True
        with self.decisions:
            self.decisions.notify_all()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        # Attempts under way finish (each is bounded by its timeout) and are recorded;
        # queued ones stay claimed in the database and are retried after the claim expires.
        self.webhook_workers.shutdown(wait=True, cancel_futures=True)

    def run_timeouts(self):
        if expire_due_pauses(self.db(), self.config):
            self.decided()

    def run_notifications(self):
        if send_due_notifications(self.db(), self.config):
            self.wake_webhooks()        # a final failure may have queued pause.notification_failed

    def run_webhooks(self):
        with self.in_flight_lock:
            capacity = self.config["webhooks.workers"] - sum(self.in_flight.values())
            busy = dict(self.in_flight)
        if capacity <= 0 or self.stopping:
            return
        for delivery_id, webhook_id, attempt, claim_until in claim_due_deliveries(self.db(), capacity, busy):
            with self.in_flight_lock:
                self.in_flight[webhook_id] = self.in_flight.get(webhook_id, 0) + 1
            self.webhook_workers.submit(self._deliver, delivery_id, webhook_id, attempt, claim_until)

    def _deliver(self, delivery_id, webhook_id, attempt, claim_until):
        try:
            attempt_delivery(self.db(), self.config, delivery_id, attempt, claim_until)
        except Exception:
            log.exception("webhook delivery %s failed unexpectedly", delivery_id)
        finally:
            with self.in_flight_lock:
                self.in_flight[webhook_id] -= 1
                if not self.in_flight[webhook_id]:
                    del self.in_flight[webhook_id]
            self.wake_webhooks()        # a worker is free: more may be due

    def wait_for_decision(self, load, seconds):
        """Call load() until the pause leaves 'pending' or `seconds` pass, waking on each decision."""
        deadline = time.monotonic() + seconds
        if not self.wait_slots.acquire(blocking=False):
            return load()     # every waiting slot is taken: answer now rather than starve the API
        try:
            while True:
                with self.decisions:
                    seen = self.decision_count
                pause = load()
                remaining = deadline - time.monotonic()
                if pause["status"] != "pending" or remaining <= 0 or self.stopping:
                    return pause
                with self.decisions:
                    if self.decision_count == seen and not self.stopping:
                        self.decisions.wait(remaining)
        finally:
            self.wait_slots.release()


class RateLimiter:
    """Token buckets per (action, client IP), refilled evenly over an hour.

    Held in memory on purpose: limits protect against guessing and floods, and
    losing them on restart loses nothing a client is owed."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.buckets = {}
        self.lock = threading.Lock()

    def _level(self, name, ip, per_hour, now):
        tokens, then = self.buckets.get((name, ip), (per_hour, now))
        return min(per_hour, tokens + (now - then) * per_hour / 3600)

    def retry_after(self, name, ip, per_hour):
        """Seconds until (name, ip) may try again, or 0 if it may now."""
        if not self.enabled:
            return 0
        with self.lock:
            tokens = self._level(name, ip, per_hour, time.monotonic())
        return 0 if tokens >= 1 else math.ceil((1 - tokens) * 3600 / per_hour)

    def spend(self, name, ip, per_hour):
        if not self.enabled:
            return
        with self.lock:
            now = time.monotonic()
            self.buckets[(name, ip)] = (self._level(name, ip, per_hour, now) - 1, now)
            if len(self.buckets) > 100_000:     # forget the fullest buckets rather than grow without bound
                for key in [k for k, (t, _) in self.buckets.items() if t >= per_hour - 1][:50_000]:
                    del self.buckets[key]

    def refuse_if_exhausted(self, name, ip, per_hour, what="attempts"):
        """429 with Retry-After if (name, ip) has no attempts left."""
        wait = self.retry_after(name, ip, per_hour)
        if wait:
            raise ApiError(429, "rate_limited", f"too many {what} from your address; try again in {wait} seconds",
                           headers={"Retry-After": str(wait)})

    def limit(self, name, ip, per_hour):
        """Refuse with 429 if (name, ip) has no attempts left; otherwise spend one."""
        self.refuse_if_exhausted(name, ip, per_hour)
        self.spend(name, ip, per_hour)


###############################################################################
# HTTP: the JSON API
###############################################################################

WAIT_LIMIT_SECONDS = 60
PAGE_LIMIT = 100
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self';"
                               " base-uri 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def create_app(config):
    """The WSGI app for one PausePoint; app.runtime.start() starts its scheduler."""
    app = bottle.Bottle()
    rt = app.runtime = Runtime(config)
    app.install(json_errors)

    for status in (400, 404, 405, 413, 500):
        app.error(status)(bottle_error)

    def read_json():
        limit = config["server.max_body_bytes"]
        # Checked before reading too: bottle spools a whole large body to disk on first access.
        if bottle.request.content_length > limit or len(raw := bottle.request.body.read(limit + 1)) > limit:
            raise ApiError(413, "payload_too_large", f"request bodies are limited to {limit} bytes")
        try:
            return json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None

    def caller():
        return authenticate(rt.db(), bottle.request.get_header("Authorization"))

    def client_ip():
        # REMOTE_ADDR, not bottle's remote_addr: that one believes any client's
        # X-Forwarded-For. waitress rewrites REMOTE_ADDR only for server.trusted_proxy.
        return bottle.request.environ.get("REMOTE_ADDR") or "unknown"

    def int_param(name, default, low, high):
        raw = bottle.request.query.get(name)
        if raw is None or raw == "":
            return default
        if not re.fullmatch(r"[0-9]{1,9}", raw) or not low <= int(raw) <= high:
            raise invalid(name, f"{name} must be a whole number from {low} to {high}")
        return int(raw)

    def cursor_param():
        raw = bottle.request.query.get("cursor")
        if not raw:
            return None
        if not re.fullmatch(r"[0-9]{1,18}", raw):
            raise invalid("cursor", "cursor must be a next_cursor value from an earlier page")
        return int(raw)

    def newest_first(sql, args, limit, cursor):
        """Rows newest first by seq, after `cursor`; returns (rows, next_cursor)."""
        if cursor is not None:
            sql += " AND seq < ?"
            args = (*args, cursor)
        rows = rt.db().execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit + 1)).fetchall()
        return rows[:limit], (str(rows[limit - 1]["seq"]) if len(rows) > limit else None)

    def notification_of(pause_id):
        return rt.db().execute("SELECT * FROM notifications WHERE pause_id = ?", (pause_id,)).fetchone()

    # -- health ---------------------------------------------------------------

    @app.get("/healthz")
    def healthz():
        rt.db().execute("SELECT 1 FROM schema_migrations LIMIT 1").fetchone()
        if not rt.scheduler.running:
            raise ApiError(503, "starting", "the scheduler is not running")
        return {"status": "ok", "version": VERSION, "database": "ok", "scheduler": "running"}

    # -- accounts -------------------------------------------------------------

    @app.post("/v1/auth/register")
    def register():
        if not config["registration.open"]:
            raise ApiError(403, "registration_closed",
                           "registration is closed on this server; the operator adds developers with"
                           " `python pausepoint.py create-developer --email … --name …`")
        rt.limiter.limit("register", client_ip(), config["ratelimit.register_per_hour"])
        body = read_json()
        if not isinstance(body, dict):
            raise invalid(None, "the request body must be a JSON object with email, name and password")
        bottle.response.status = 201
        return register_developer(rt.db(), config, body.get("email"), body.get("name"), body.get("password"))

    @app.post("/v1/auth/keys/rotate")
    def rotate():
        rt.limiter.limit("rotate", client_ip(), config["ratelimit.rotate_per_hour"])
        body = read_json()
        if not isinstance(body, dict):
            raise invalid(None, "the request body must be a JSON object with email, password and key")
        mode = body.get("key")
        if mode not in MODES:
            raise invalid("key", "key must be 'live' or 'test': which key to replace")
        developer = check_password(rt.db(), body.get("email"), body.get("password"))
        if developer is None:
            raise ApiError(401, "unauthorized", "email or password is wrong")
        key = rotate_key(rt.db(), developer, MODES[mode])
        return {"developer_id": developer["id"], ("api_key" if mode == "live" else "test_api_key"): key,
                "message": "Save this key — it will not be shown again. The old key has stopped working."}

    # -- pauses ---------------------------------------------------------------

    @app.post("/v1/pause")
    def post_pause():
        who = caller()
        pause, replayed, webhooks_due = create_pause(rt.db(), config, who, read_json(),
                                                     bottle.request.get_header("Idempotency-Key"))
        if replayed:
            bottle.response.set_header("Idempotent-Replayed", "true")
        if webhooks_due:
            # Waking the delivery job on every create costs half the create throughput
            # (194 vs 367 req/s), so only when there is something to deliver.
            rt.wake_webhooks()
        bottle.response.status = 201
        return created_json(pause, config)

    @app.get("/v1/pause")
    def list_pauses():
        who = caller()
        status = bottle.request.query.get("status") or None
        if status is not None and status not in STATUSES:
            raise invalid("status", f"status must be one of: {', '.join(STATUSES)}")
        sql, args = "SELECT * FROM pauses WHERE developer_id = ? AND livemode = ?", (who.developer_id, who.livemode)
        if status:
            sql, args = sql + " AND status = ?", (*args, status)
        rows, next_cursor = newest_first(sql, args, int_param("limit", 20, 1, PAGE_LIMIT), cursor_param())
        return {"pauses": [pause_json(r, config, notification_of(r["id"])) for r in rows], "next_cursor": next_cursor}

    @app.get("/v1/pause/<pause_id>")
    def get_pause(pause_id):
        who = caller()
        wait = int_param("wait", 0, 0, WAIT_LIMIT_SECONDS)
        pause = owned_pause(rt.db(), who, pause_id)
        if wait and pause["status"] == "pending":
            pause = rt.wait_for_decision(lambda: owned_pause(rt.db(), who, pause_id), wait)
        return pause_json(pause, config, notification_of(pause_id))

    @app.post("/v1/pause/<pause_id>/cancel")
    def post_cancel(pause_id):
        pause = cancel_pause(rt.db(), config, caller(), pause_id)
        rt.decided()
        return pause_json(pause, config, notification_of(pause_id))

    # -- webhooks -------------------------------------------------------------

    @app.post("/v1/webhooks")
    def post_webhook():
        webhook, generated_secret = create_webhook(rt.db(), config, caller(), read_json())
        bottle.response.status = 201
        body = webhook_json(webhook)
        if generated_secret:
            body["secret"] = generated_secret       # shown this once; PausePoint never shows a secret again
        return body

    @app.get("/v1/webhooks")
    def list_webhooks():
        who = caller()
        rows = rt.db().execute("SELECT * FROM webhooks WHERE developer_id = ? AND livemode = ? AND deleted_at IS NULL"
                               " ORDER BY seq DESC", (who.developer_id, who.livemode)).fetchall()
        return {"webhooks": [webhook_json(r) for r in rows]}

    @app.get("/v1/webhooks/<webhook_id>")
    def get_webhook(webhook_id):
        return webhook_json(owned_webhook(rt.db(), caller(), webhook_id))

    @app.route("/v1/webhooks/<webhook_id>", method="PATCH")
    def patch_webhook(webhook_id):
        webhook = update_webhook(rt.db(), config, caller(), webhook_id, read_json())
        rt.wake_webhooks()      # re-enabling reschedules waiting deliveries
        return webhook_json(webhook)

    @app.delete("/v1/webhooks/<webhook_id>")
    def remove_webhook(webhook_id):
        delete_webhook(rt.db(), caller(), webhook_id)
        bottle.response.status = 204

    @app.post("/v1/webhooks/<webhook_id>/test")
    def post_webhook_test(webhook_id):
        delivery = send_test_event(rt.db(), caller(), webhook_id)
        rt.wake_webhooks()
        bottle.response.status = 202
        return delivery_json(rt.db(), delivery)

    @app.get("/v1/webhooks/<webhook_id>/deliveries")
    def list_deliveries(webhook_id):
        owned_webhook(rt.db(), caller(), webhook_id)
        rows, next_cursor = newest_first("SELECT * FROM webhook_deliveries WHERE webhook_id = ?", (webhook_id,),
                                         int_param("limit", 20, 1, PAGE_LIMIT), cursor_param())
        return {"deliveries": [delivery_json(rt.db(), r) for r in rows], "next_cursor": next_cursor}

    @app.post("/v1/webhooks/<webhook_id>/deliveries/<delivery_id>/redeliver")
    def post_redeliver(webhook_id, delivery_id):
        delivery = redeliver(rt.db(), caller(), webhook_id, delivery_id)
        rt.wake_webhooks()
        bottle.response.status = 202
        return delivery_json(rt.db(), delivery)

    # -- audit ----------------------------------------------------------------

    # -- channels -------------------------------------------------------------

    @app.get("/v1/channels")
    def list_channels():
        caller()
        return {"channels": [{"name": c.name, "kind": c.kind, "configured": not c.missing_settings(config)}
                             for c in channels(config).values()]}

    @app.post("/v1/twilio/inbound")
    def twilio_inbound():
        form = {k: bottle.request.forms.getunicode(k) for k in bottle.request.forms.keys()}
        signature = bottle.request.get_header("X-Twilio-Signature") or ""
        url = base_url(config) + bottle.request.fullpath
        if not config["twilio.auth_token"] or not twilio.request_validator.RequestValidator(
                config["twilio.auth_token"]).validate(url, form, signature):
            raise ApiError(403, "bad_signature", "X-Twilio-Signature is missing or wrong for this server's"
                                                 " twilio.auth_token and server.base_url")
        reply, decided = record_sms_reply(rt.db(), config, form.get("From") or "", form.get("Body") or "",
                                          form.get("MessageSid"))
        if decided:
            rt.decided()
        twiml = twilio.twiml.messaging_response.MessagingResponse()
        twiml.message(reply)
        return bottle.HTTPResponse(str(twiml), status=200, headers={"Content-Type": "application/xml"})

    @app.get("/v1/audit")
    def get_audit():
        who = caller()
        sql, args = "SELECT * FROM audit_events WHERE developer_id = ? AND livemode = ?", (who.developer_id, who.livemode)
        for name in ("event_type", "pause_id"):
            value = bottle.request.query.get(name)
            if value:
                sql, args = sql + f" AND {name} = ?", (*args, value)
        rows, next_cursor = newest_first(sql, args, int_param("limit", 20, 1, PAGE_LIMIT), cursor_param())
        return {"events": [audit_event_json(r) for r in rows], "next_cursor": next_cursor}

    # -- responding: JSON --------------------------------------------------------

    def guard_respond_link(lookup):
        """Run lookup(); an unknown token counts against the caller's IP, and an IP
        that has guessed too often is refused before it can guess again."""
        ip, per_hour = client_ip(), config["ratelimit.respond_failures_per_hour"]
        rt.limiter.refuse_if_exhausted("respond", ip, per_hour, what="invalid links")
        try:
            return lookup()
        except ApiError as e:
            if e.status == 404:
                rt.limiter.spend("respond", ip, per_hour)
            raise

    def client_facts():
        return {"ip": client_ip(), "user_agent": (bottle.request.get_header("User-Agent") or "")[:300]}

    def open_respond_link(token, via):
        """The pause behind a respond link, recording that it was opened (GET changes no state)."""
        conn = rt.db()
        pause = guard_respond_link(lambda: pause_by_token(conn, token))
        with transaction(conn):
            record_event(conn, pause["developer_id"], pause["livemode"], "respond_link", "respond_page.opened",
                         pause["id"], {"via": via, **client_facts()})
        return pause

    def respond(token, choice, comment):
        pause = guard_respond_link(lambda: respond_to_pause(rt.db(), config, token, choice, comment, client_facts()))
        rt.decided()
        return pause

    @app.get("/v1/respond/<token>")
    def get_respond_json(token):
        return respond_facts(open_respond_link(token, "api"))

    @app.post("/v1/respond/<token>")
    def post_respond_json(token):
        body = read_json()
        if not isinstance(body, dict):
            raise invalid(None, 'the request body must be a JSON object like {"choice": "Approve"}')
        return respond_facts(respond(token, body.get("choice"), body.get("comment")))

    # -- responding: the page a human sees ----------------------------------------

    @app.get("/respond/<token>")
    def get_respond_page(token):
        try:
            pause = open_respond_link(token, "page")
        except ApiError as e:
            return page_error(e)
        # Email buttons arrive with ?choice=: show it picked, but only the POST decides.
        picked = bottle.request.query.getunicode("choice")
        return respond_page(pause, token, picked=picked if picked in json.loads(pause["options"]) else None)

    @app.post("/respond/<token>")
    def post_respond_page(token):
        form = bottle.request.forms
        try:
            if bottle.request.content_length > config["server.max_body_bytes"]:
                raise ApiError(413, "payload_too_large", "the form is too large")
            respond(token, form.getunicode("choice"), form.getunicode("comment"))
        except ApiError as e:
            if e.status == 422:
                pause = rt.db().execute("SELECT * FROM pauses WHERE respond_token = ?", (token,)).fetchone()
                return respond_page(pause, token, error=e.message, status=422)
            return page_error(e)
        # Post/Redirect/Get: a reload shows the recorded decision instead of re-posting.
        return bottle.HTTPResponse(status=303, headers={"Location": f"/respond/{token}", **PAGE_HEADERS})

    def respond_page(pause, token, error=None, picked=None, status=200):
        times = {name: pause[name] and human_time(pause[name]) for name in ("expires_at", "decided_at")}
        return html_page("respond", status=status, pause=respond_facts(pause), token=token, error=error,
                         picked=picked, times=times)

    def page_error(e):
        return html_page("respond_error", status=e.status, message=e.message, headers=e.headers)

    def html_page(name, status=200, headers=None, **values):
        body = bottle.template(name, template_lookup=[TEMPLATES_DIR], **values)
        return bottle.HTTPResponse(body, status=status, headers={
            "Content-Type": "text/html; charset=utf-8", **PAGE_HEADERS, **(headers or {})})

    @app.get("/static/<name:re:[a-z]+\\.css>")
    def static(name):
        return bottle.static_file(name, root=STATIC_DIR, mimetype="text/css")

    return app


def json_errors(callback):
    """Route plugin: ApiError becomes the one JSON error shape; anything else a logged 500."""
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except ApiError as e:
            return json_error_response(e.status, e.code, e.message, e.field, e.headers)
        except Exception:
            log.exception("unexpected error on %s %s", bottle.request.method, bottle.request.path)
            return json_error_response(500, "internal_error", "something went wrong on the server; it has been logged")
    return wrapper


def json_error_response(status, code, message, field=None, headers=None):
    return bottle.HTTPResponse(error_body(status, code, message, field), status=status,
                               headers={"Content-Type": "application/json", **(headers or {})})


BOTTLE_ERROR_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
                      413: "payload_too_large", 500: "internal_error"}


def bottle_error(error):
    """Errors Bottle raises itself (no such route, wrong method…) in the same JSON shape.
    Serialised here by hand: a dict returned from an error handler is sent broken (bottle #710)."""
    bottle.response.content_type = "application/json"
    message = {404: "no such endpoint", 405: "method not allowed on this endpoint",
               500: "something went wrong on the server; it has been logged"}.get(error.status_code, error.body)
    return error_body(error.status_code, BOTTLE_ERROR_CODES.get(error.status_code, "error"), str(message))


###############################################################################
# Serving and the command line
###############################################################################

def make_server(app, config, port=None):
    """A waitress server for the app, not yet running (port=0 picks a free one)."""
    options = dict(host=config["server.host"], port=config["server.port"] if port is None else port,
                   threads=config["server.threads"], ident=f"PausePoint/{VERSION}",
                   # Long polls hold their connection; keep room for many agents.
                   connection_limit=max(100, config["server.threads"] * 2), channel_timeout=WAIT_LIMIT_SECONDS + 30)
    if config["server.trusted_proxy"]:
        options.update(trusted_proxy=config["server.trusted_proxy"],
                       trusted_proxy_headers={"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
    return waitress.create_server(app, **options)


def serve(config):
    app = create_app(config)
    server = make_server(app, config)
    app.runtime.start()

    def stop(signum, frame):
        # Wake long-polling agents first, so waitress's wait for in-flight
        # requests is not spent on them; then let waitress finish the rest.
        app.runtime.stopping = True
        app.runtime.decided()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("PausePoint %s serving on %s (database %s)", VERSION, base_url(config), config["database.path"])
    if not config["server.base_url"] and config["server.host"] not in ("127.0.0.1", "localhost", "::1"):
        log.warning("server.base_url is not set: respond links will say %s, which humans elsewhere cannot open",
                    base_url(config))
    try:
        server.run()        # returns after SIGTERM/SIGINT, once in-flight requests finished
    finally:
        app.runtime.stop()
        log.info("PausePoint stopped")


def backup(config, destination):
    """An online copy of the database through SQLite's backup API, safe while the server runs."""
    if os.path.exists(destination):
        raise ConfigError(f"{destination} already exists; choose a new file name")
    source = connect(config["database.path"])
    target = sqlite3.connect(destination)
    with target:
        source.backup(target)
    target.close()
    source.close()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="pausepoint.py",
        description="PausePoint: human approval for AI agents. With no command, serves the API.")
    parser.add_argument("--config", help="TOML config file (default: ./config.toml if present)")
    parser.add_argument("--host", help="address to listen on (server.host)")
    parser.add_argument("--port", type=int, help="port to listen on (server.port)")
    parser.add_argument("--db", help="SQLite database file (database.path)")
    parser.add_argument("--base-url", help="public URL for respond links (server.base_url)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="serve the API and respond pages (the default)")
    create = commands.add_parser("create-developer", help="add a developer and print their API keys (works when registration is closed)")
    create.add_argument("--email", required=True)
    create.add_argument("--name", required=True)
    create.add_argument("--plan", default="free", help="a plan named in the config (default: free)")
    create.add_argument("--password-stdin", action="store_true",
                        help="read the developer's password from standard input (default: asked for at a prompt)")
    set_plan = commands.add_parser("set-plan", help="move a developer to another plan")
    set_plan.add_argument("--email", required=True)
    set_plan.add_argument("--plan", required=True)
    take_backup = commands.add_parser("backup", help="write an online backup of the database (safe while serving)")
    take_backup.add_argument("destination", help="file to write; must not exist yet")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The delivery job is woken on demand; APScheduler warns when a wake-up finds it
    # already running, which is harmless (the running pass or the next tick does the work).
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    try:
        config = load_config(args.config, overrides={"server.host": args.host, "server.port": args.port,
                                                     "database.path": args.db, "server.base_url": args.base_url})
        if args.command in (None, "serve"):
            serve(config)
        elif args.command == "create-developer":
            # Never as an argument: it would show in `ps` and in shell history.
            password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass("Password: ")
            conn = connect(config["database.path"])
            migrate(conn)
            print(json.dumps(register_developer(conn, config, args.email, args.name, password, args.plan), indent=2))
        elif args.command == "set-plan":
            set_developer_plan(config, args.email, args.plan)
            print(f"{args.email} is now on the {args.plan} plan")
        elif args.command == "backup":
            backup(config, args.destination)
            print(f"backed up {config['database.path']} to {args.destination}")
    except ConfigError as e:
        print(f"pausepoint: {e}", file=sys.stderr)
        return 2
    except ApiError as e:
        print(f"pausepoint: {e.message}", file=sys.stderr)
        return 1
    return 0


def set_developer_plan(config, email, plan):
    if plan not in plans(config):
        raise ConfigError(f"unknown plan {plan!r}; the config defines: {', '.join(sorted(plans(config)))}")
    conn = connect(config["database.path"])
    migrate(conn)
    with transaction(conn):
        if conn.execute("UPDATE developers SET plan = ? WHERE email = ?", (plan, email)).rowcount != 1:
            raise ApiError(404, "not_found", f"no developer with email {email}")


if __name__ == "__main__":
    sys.exit(main())
