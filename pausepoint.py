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

import sys

# Run by an older Python (the system's, on many a server), it says which it needs in one line,
# not with a traceback from the first import that Python lacks (tomllib).
if sys.version_info < (3, 11) and __name__ == "__main__":
    sys.exit(f"PausePoint needs Python 3.11 or later; {sys.executable} is {'.'.join(map(str, sys.version_info[:3]))}.")

import argparse
import base64
import bisect
import binascii
import collections
import concurrent.futures
import contextlib
import csv
import ctypes
import dataclasses
import datetime as dt
import decimal
import difflib
import email.errors
import email.message
import email.utils
import errno
import fcntl
import functools
import getpass
import hashlib
import heapq
import hmac
import html
import http.client
import http.cookiejar
import inspect
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import resource
import secrets
import shlex
import signal
import smtplib
import socket
import socketserver
import sqlite3
import ssl
import stat
import string
import struct
import tempfile
import threading
import time
import tomllib
import unicodedata
import urllib.parse
import uuid
import weakref
import wsgiref.simple_server

# Started by a Python without PausePoint's packages (the system's, say, not .venv's), it says
# how to set up rather than ending in a traceback.
try:
    import bcrypt
    import bottle
    import jsonschema
    import requests
    import twilio.base.exceptions
    import twilio.http.http_client
    import twilio.request_validator
    import twilio.rest
    import twilio.twiml.messaging_response
    import urllib3
    import waitress
    import waitress.adjustments
    import waitress.channel
    import waitress.parser
    import waitress.server
    import waitress.task
    import waitress.utilities
    import waitress.wasyncore
    from apscheduler.schedulers.background import BackgroundScheduler
    from cryptography.hazmat.primitives import serialization
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
except ModuleNotFoundError as missing:
    if __name__ != "__main__":
        raise
    home = shlex.quote(os.path.dirname(os.path.abspath(__file__)))     # where requirements.txt is, not the cwd
    sys.exit(f"PausePoint needs the package {missing.name!r}, which this Python ({sys.executable}) does not have.\n"
             f"Set up an environment of its own and run it there: cd {home} && python3 -m venv .venv"
             " && .venv/bin/pip install -q -r requirements.txt && .venv/bin/python pausepoint.py")

VERSION = "0.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA_PATH = os.path.join(HERE, "schema.sql")
TEMPLATES_DIR = os.path.join(HERE, "templates")
# Bottle caches a compiled template under the id of the lookup list it was given: one list for
# every render, or each render reads, parses and compiles its template again (and the cache
# gains an entry each time).
TEMPLATE_LOOKUP = [TEMPLATES_DIR]
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
    Setting("server.base_url", "", "Public URL of this server (scheme, host and port, no path), used to build respond_url links. Empty: http://<host>:<port>."),
    Setting("server.threads", 64, "Worker threads. One client address may use all but 8 of them at once. Long-polling agents (?wait=) hold none while they wait."),
    Setting("server.waiting_limit", 2000, "Long polls (?wait=) that may wait at once, all developers together. Each holds a connection, not a thread; beyond the limit they get 429 with Retry-After."),
    Setting("server.waiting_per_developer", 1000, "Long polls one developer's agents may have waiting at once in each mode (test and live keys apart, so a test key cannot crowd out live agents)."),
    Setting("server.waiting_per_ip", 1000, "Long polls one client address may have waiting at once, whatever accounts they use (server.trusted_proxy is exempt)."),
    Setting("server.trusted_proxy", "", "IP address of a reverse proxy whose X-Forwarded-For/-Proto headers are believed. Empty: none."),
    Setting("server.max_body_bytes", 65536, "Largest request body accepted; larger ones are refused with 413 as soon as their size is known."),
    Setting("server.max_header_bytes", 32768, "Largest request line and headers accepted, in bytes (as nginx's default); larger ones, or more than 100 header lines, get 431."),
    Setting("server.connection_limit", 4096, "Open client connections at most. Near the limit, the quietest connections that are not being served are closed to make room."),
    Setting("server.connections_per_ip", 64, "Connections one client address (an IPv6 one by its /64) may hold open while not being served (idle, or still sending); beyond it its new connections are answered 503 (Retry-After: 1) and closed at once, or its quietest idle keep-alive one makes room. server.trusted_proxy is exempt."),
    Setting("server.header_timeout", 10, "Seconds a client has to send a request's headers in full once it starts; slower ones are disconnected."),
    Setting("server.body_timeout", 30, "Seconds a client has to send a request's body in full after its headers."),
    Setting("server.idle_timeout", 60, "Seconds an idle keep-alive connection stays open."),
    Setting("server.send_timeout", 20, "Seconds an answer may wait for the client to read another 64 KiB of it before the connection is closed."),
    Setting("database.path", "pausepoint.db", "SQLite database file. Created from schema.sql on first start."),
    Setting("database.cache_kib", 128, "SQLite's page cache per connection, in KiB. There is a connection for each request running at once and for each job thread (at most about 90 with the defaults), so this counts that many times; the operating system's file cache, shared by all, holds the rest."),
    Setting("database.lock_wait_seconds", 30, "How long a write waits for the database's write lock while another process holds it (a sqlite3 shell with a transaction open, a VACUUM), counted from when it asked, its time in line behind this server's other writes included: past it, an API write gets 503 database_busy and a job tries again on its next round, each job saying so once in the log."),
    Setting("database.min_free_mb", 256, "Free space, in MiB, kept on the database's disk for the pauses already made, counted once the WAL is copied into the database file: below it, new pauses and registrations get 507, while decisions, timeouts and sends go on. 0: only the room the WAL needs (a disk with none left is short of it still)."),
    Setting("registration.open", True, "Whether registration (POST /v1/auth/register and the dashboard's sign-up) is open. When false, the operator adds developers with `create-developer`. The operator page's switch, once used, overrides this."),
    Setting("dashboard.session_idle_minutes", 60, "Minutes a dashboard sign-in lasts without use."),
    Setting("dashboard.session_max_hours", 168, "Hours a dashboard sign-in lasts at most, however often it is used."),
    Setting("security.bcrypt_rounds", 12, "bcrypt cost factor for passwords (4-16). Each step doubles the work. A password hashed at another cost is hashed again at this one when next given."),
    Setting("pauses.max_timeout_hours", 720.0, "Longest timeout_hours a pause may ask for."),
    Setting("pauses.max_pending_per_number", 1000, "Live pauses one developer may have pending to one phone number at once (sms and whatsapp; a team pause counts for each of its people there): a number's 4,416 reply codes are every developer's, so one alone cannot hold them all. Beyond it, new ones to that number get 429 until some are decided. 0: no limit."),
    Setting("pauses.max_test_pending", 1000, "Test-mode pauses one developer may have pending at once, each weighing the messages it may send times each 4 KiB the agent wrote (a question to one person weighs 1); beyond it, new ones get 429 until some are decided, cancelled or time out (one alone is always allowed). 0: no limit."),
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
    Setting("webhooks.allow_private", False, "Allow webhook URLs on loopback, private or link-local addresses, and http:// for live ones"
            " (for agents on your LAN)."),
    Setting("webhooks.max_per_developer", 16, "Webhook endpoints one developer may have in each mode (test and live apart)."),
    Setting("webhooks.per_endpoint", 2, "Deliveries to one endpoint in flight at once (within outbound.per_developer), and connections kept alive to it between them. More keeps a slow receiver's backlog moving; with more than 1, events to an endpoint may arrive out of order."),
    Setting("outbound.workers", 16, "Threads for outbound calls: webhook deliveries and notification sends."),
    Setting("outbound.deadline_seconds", 10.0, "Seconds one outbound call (a webhook delivery or a notification send) may take in all, from the name lookup to the last byte of the answer; a slower one is cut off and retried later."),
    Setting("outbound.per_developer", 4, "Outbound calls one developer's work may have in flight at once, so one tenant's slow receivers cannot hold every worker (test webhook deliveries one fewer, so they leave live ones a call, unless this is 1)."),
    Setting("ratelimit.enabled", True, "Enforce every ratelimit.* limit: registrations, failed password checks, key rotations, unknown respond tokens, webhook changes and test-mode pauses per hour. Turn off only for benchmarks."),
    Setting("ratelimit.register_per_hour", 20, "Registrations allowed per client IP per hour."),
    Setting("ratelimit.login_per_hour", 20, "Failed password checks (dashboard sign-in, key rotation) allowed per hour per client IP, and per email (or, for a browser that signed in as that developer before, per browser)."),
    Setting("ratelimit.rotate_per_hour", 20, "Key rotations (attempts, right or wrong) allowed per client IP per hour through the API, and per developer from the dashboard (password changes and webhook endpoints added there included; there, only those with the right password count)."),
    Setting("ratelimit.respond_failures_per_hour", 30, "Unknown respond tokens allowed per client IP per hour; beyond it unknown tokens get 429 (valid ones always work)."),
    Setting("ratelimit.webhook_changes_per_hour", 200, "Webhook creations, changes, deletions, tests and redeliveries one developer may make per hour in each mode (each writes an audit event that is kept)."),
    Setting("ratelimit.test_pauses_per_hour", 1000, "Test-mode pauses one developer may create per hour, by weight as pauses.max_test_pending (the first hour's worth at once, then evenly)."),
    Setting("metrics.enabled", False, "Serve Prometheus metrics (see metrics.listen)."),
    Setting("metrics.listen", "127.0.0.1:9464", "Where metrics are served, host:port, apart from the API; empty:"
            " at /metrics on the API's own address, where anyone who reaches it can read them."),
    Setting("retention.test_days", 30, "Days test-mode pauses, notifications and audit events are kept after they are decided; an hourly job deletes older ones."),
    Setting("retention.test_pauses_kept", 2000, "Test-mode pauses kept per developer, newest first, by weight as pauses.max_test_pending: the hourly job deletes their older ones sooner than retention.test_days, an hour after their decision at the earliest, with the older part of their test audit log and event feed."),
    Setting("retention.delivery_log_days", 30, "Days webhook events, deliveries and attempts are kept after they finish."),
    Setting("plans.free.monthly_pauses", 100, "Live pauses a developer on the free plan may create per calendar month (UTC). Add plans as [plans.NAME]."),
]
SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}
# Keys that were renamed: an old config keeps working, with a warning naming the new key.
RENAMED_SETTINGS = {"webhooks.workers": "outbound.workers"}
# Plans are open-ended: an operator adds [plans.team] monthly_pauses = 5000.
PLAN_KEY = re.compile(r"^plans\.([a-z][a-z0-9_-]{0,31})\.monthly_pauses$")
# So are push and chat targets: [channels.ops] url = "ntfy://ntfy.example.org/approvals".
CHANNEL_KEY = re.compile(r"^channels\.([a-z][a-z0-9_-]{0,31})\.url$")
# And who may use each: developers = ["ada@example.com"] (their accounts' emails), or ["*"]
# for all. Without the list every developer may, as before there was one.
CHANNEL_DEVELOPERS_KEY = re.compile(r"^channels\.([a-z][a-z0-9_-]{0,31})\.developers$")
BUILT_IN_CHANNELS = ("sms", "whatsapp", "email", "link")

# One client address may hold at most this many fewer threads than there are, so
# everyone else's requests always have threads to run on.
THREADS_KEPT_FOR_OTHER_REQUESTS = 8
# When to come back, said to an agent whose long poll finds every place it may take taken.
WAITING_FULL_RETRY_SECONDS = 5


class ConfigError(Exception):
    """A setting is unknown or has a bad value; the message names the key."""


def load_config(path=None, environ=None, overrides=None):
    """Defaults, overlaid by the TOML file at `path` (if any), then PAUSEPOINT_*
    variables, then CLI flags. Only main() looks for ./config.toml."""
    config, in_file = {s.key: s.default for s in SETTINGS}, {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                # A byte order mark, as Notepad may write one, is no part of the settings.
                table = tomllib.loads(f.read().decode("utf-8-sig"))
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text: save it as UTF-8 (byte {e.start} is"
                              f" {e.object[e.start]:#04x})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        for key, value in flatten(table):
            key = renamed_setting(key, f"in {path}")
            config[key] = in_file[key] = check_setting(key, value, f"in {path}")
        warn_if_credentials_shown_to_others(path, in_file)
    for name, raw in sorted((environ if environ is not None else os.environ).items()):
        if name.startswith("PAUSEPOINT_") and name not in AGENT_SIDE_VARIABLES:
            key = as_named_in_file(env_name_to_key(name), in_file, name, path)
            config[key] = check_setting(key, parse_text_value(key, raw, name), f"in ${name}")
            if key in in_file and in_file[key] != config[key]:
                # Said, since it may not be meant: a container's image sets some by its environment.
                log.warning("%s in %s is overridden by $%s (%s)", key, path, name, shown_value(key, config[key]))
    for key, value in (overrides or {}).items():
        if value is not None:
            config[key] = check_setting(key, value, "on the command line")
    if config["server.trusted_proxy"]:
        # As the socket writes it: waitress believes the proxy's headers only from that text, and
        # "2001:DB8::1" was exempt from the per-client shares here but never believed there.
        config["server.trusted_proxy"] = as_a_socket_writes(config["server.trusted_proxy"])
    twilio_complete(config)
    refuse_developers_without_a_target(config)
    return config


def as_a_socket_writes(address):
    """An IP address as the socket writes a peer's: an IPv4 client of a dual-stack listener
    as '::ffff:10.0.0.1', which Python's ipaddress writes '::ffff:a00:1' (before 3.13)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return str(ip)
    text = socket.inet_ntop(socket.AF_INET6, ip.packed)
    return f"{text}%{ip.scope_id}" if ip.scope_id else text


def flatten(table, prefix=""):
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            yield from flatten(value, key + ".")
        else:
            yield key, value


def renamed_setting(key, where):
    if key in RENAMED_SETTINGS:
        log.warning("setting %s (%s) is now called %s; please rename it", key, where, RENAMED_SETTINGS[key])
        return RENAMED_SETTINGS[key]
    return key


# What the agents' tools beside the server (client/, examples/) are configured by: an
# operator may well have them set where the server runs too, and they are no misspelt
# settings. (tests/test_config.py checks this against every name those tools read.)
AGENT_SIDE_VARIABLES = frozenset({"PAUSEPOINT_URL", "PAUSEPOINT_API_KEY", "PAUSEPOINT_API_KEY_FILE",
                                  "PAUSEPOINT_TEST_KEY", "PAUSEPOINT_RECIPIENT", "PAUSEPOINT_CHANNEL",
                                  "PAUSEPOINT_HOOK_WAIT", "PAUSEPOINT_HOOK_ON_TIMEOUT", "PAUSEPOINT_MCP_WAIT",
                                  "PAUSEPOINT_MCP_PROGRESS_EVERY"})


def env_name_to_key(name):
    """PAUSEPOINT_SERVER_BASE_URL -> server.base_url; PAUSEPOINT_PLANS_TEAM_MONTHLY_PAUSES ->
    plans.team.monthly_pauses; PAUSEPOINT_CHANNELS_OPS_URL -> channels.ops.url (and _DEVELOPERS)."""
    for key in [s.key for s in SETTINGS] + list(RENAMED_SETTINGS):
        if name == "PAUSEPOINT_" + key.replace(".", "_").upper():
            return renamed_setting(key, f"${name}")
    for section, leaf in (("PLANS", "MONTHLY_PAUSES"), ("CHANNELS", "URL"), ("CHANNELS", "DEVELOPERS")):
        match = re.fullmatch(f"PAUSEPOINT_{section}_([A-Z][A-Z0-9_]*)_{leaf}", name)
        if match:
            return f"{section.lower()}.{match.group(1).lower()}.{leaf.lower()}"
    raise ConfigError(f"unknown setting: environment variable {name} names no setting"
                      + did_you_mean(name, ["PAUSEPOINT_" + s.key.replace(".", "_").upper() for s in SETTINGS]))


def did_you_mean(name, known):
    """" (did you mean X?)" for the known name closest to a misspelt one, or nothing."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""


def as_named_in_file(key, in_file, name, path):
    """A variable's name has no hyphen: $PAUSEPOINT_CHANNELS_TEAM_CHAT_URL sets the file's
    [channels.team-chat] where the file defines it (by any of its keys), not a second channel team_chat."""
    if not (PLAN_KEY.match(key) or CHANNEL_KEY.match(key) or CHANNEL_DEVELOPERS_KEY.match(key)):
        return key
    section, asked, leaf = key.split(".")
    names = {written.split(".")[1] for written in in_file if written.startswith(section + ".")}
    spellings = sorted(f"{section}.{named}.{leaf}" for named in names if named.replace("-", "_") == asked)
    if len(spellings) > 1:
        raise ConfigError(f"${name} could set {' or '.join(spellings)} in {path}: rename one of them")
    return spellings[0] if spellings else key


def setting_type(key):
    if PLAN_KEY.match(key):
        return int
    if CHANNEL_KEY.match(key):
        return str
    if CHANNEL_DEVELOPERS_KEY.match(key):
        return list
    if key not in SETTINGS_BY_KEY:
        raise ConfigError(f"unknown setting: {key}" + did_you_mean(key, list(SETTINGS_BY_KEY)))
    return type(SETTINGS_BY_KEY[key].default)


def load_prometheus():
    """prometheus_client, imported only when metrics are enabled: 5 MB most servers never use."""
    import prometheus_client.core
    return prometheus_client


def load_apprise():
    """Apprise, imported the first time a push or chat channel needs it: it is a fifth
    of the start-up time, and most servers have no such channel."""
    import apprise
    return apprise


def open_setting_problem(key, value):
    """Checks for the open-ended [plans.NAME] and [channels.NAME] keys."""
    if PLAN_KEY.match(key) and value < 0:
        return "must not be negative"
    channel = CHANNEL_KEY.match(key)
    if channel and channel.group(1) in BUILT_IN_CHANNELS:
        return f"names a built-in channel; choose another name than {', '.join(BUILT_IN_CHANNELS)}"
    if channel and not apprise_understands(value):
        return "is not a notification URL Apprise understands (e.g. ntfy://host/topic, slack://…, gotify://…)"
    if CHANNEL_DEVELOPERS_KEY.match(key):
        return developers_list_problem(value)
    return None


def developers_list_problem(value):
    """What is wrong with a [channels.NAME] developers list, or None."""
    if not all(isinstance(item, str) and (item == "*" or EMAIL.fullmatch(item)) for item in value):
        return 'must be a list of developers\' account emails (["ada@example.com"]), or ["*"] for every developer'
    if "*" in value and len(value) > 1:
        return 'must be ["*"] alone or a list of emails: "*" lets every developer use the target already'
    return None


def refuse_developers_without_a_target(config):
    """A developers list for a target with no url is one for a target misnamed, or removed, or
    for a built-in channel, which has none: every developer may use those."""
    for key in config:
        listed = CHANNEL_DEVELOPERS_KEY.match(key)
        if listed and listed.group(1) in BUILT_IN_CHANNELS:
            raise ConfigError(f"{key} is set, but {listed.group(1)} is a built-in channel, which every developer may"
                              " use: a developers list is for a push target ([channels.NAME] url = …)")
        if listed and f"channels.{listed.group(1)}.url" not in config:
            raise ConfigError(f"{key} is set, but channels.{listed.group(1)}.url is not: there is no such target")


def apprise_understands(url):
    """Whether Apprise makes a target of `url`, without its log: one it cannot read it logs
    whole, tokens and passwords included ("Unparseable URL slak://T0k3n/…")."""
    apprise_log = logging.getLogger("apprise")
    was_disabled, apprise_log.disabled = apprise_log.disabled, True
    try:
        return load_apprise().Apprise.instantiate(url) is not None
    finally:
        apprise_log.disabled = was_disabled


# Settings whose values are credentials, as are push targets' URLs (a Slack token, a mail
# password): a message or the log names the key, and shows no more of the value than a
# URL's scheme, which is what is usually mistyped. Logs and start-up errors are read and
# kept by more people than the config file.
SECRET_SETTINGS = frozenset({"smtp.password", "twilio.auth_token"})


def shown_value(key, value):
    """A setting's value as a message or the log may show it."""
    if CHANNEL_KEY.match(key) and isinstance(value, str) and "://" in value:
        return repr(value.split("://", 1)[0] + "://…")
    if CHANNEL_KEY.match(key):
        return "a value not shown, which may hold a credential"
    return "a credential, not shown" if key in SECRET_SETTINGS else repr(value)


def warn_if_credentials_shown_to_others(path, in_file):
    """Log that others may read the config file at `path` when its settings (`in_file`) hold a
    credential. The advice names the user the server runs as: in the container that is uid
    10001, and a mounted file keeps the owner and mode it has on the host, where they are set."""
    held = sorted(key for key, value in in_file.items() if value and (key in SECRET_SETTINGS or CHANNEL_KEY.match(key)))
    if held:
        warn_if_others_may_read(path, "the config file", f", owned by the user the server runs as (chown {os.getuid()}"
                                f" it; a file mounted into a container, on the host): it holds {', '.join(held)}")


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
            expected = "a whole number" if kind is int else "a number"
            raise ConfigError(f"{key} must be {expected} ({where} is {raw!r})") from None
    if kind is list:            # comma-separated, as a TOML list can say nothing a variable cannot
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def check_setting(key, value, where):
    kind = setting_type(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        expected = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
                    list: "a list"}[kind]
        raise ConfigError(f"{key} must be {expected} ({where} it is {shown_value(key, value)})")
    if kind is str and "\0" in value:      # TOML can spell one; a path holding it fails as no sentence says
        raise ConfigError(f"{key} must not contain a NUL character ({where} it is {shown_value(key, value)})")
    problem = SETTING_CHECKS.get(key, lambda v: None)(value) or open_setting_problem(key, value)
    if problem:
        raise ConfigError(f"{key} {problem} ({where} it is {shown_value(key, value)})")
    return value


HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _check_host(value):
    """An address or a name to listen on, not a URL or host:port (which would otherwise be
    looked up as a name, and fail only after the lookup)."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(value)
        return None
    if HOST_NAME.fullmatch(value) and len(value) <= 253:
        return None
    return "must be an address or a host name, without a port or scheme (e.g. 127.0.0.1, 0.0.0.0 or ::)"


def _check_base_url(value):
    # No path: the pages' forms, links and redirects name paths from the root, so behind a
    # proxy serving PausePoint under a path a tapped choice would go to whatever the root is.
    if re.fullmatch(r"https?://[^\s/?#]+/?", value, re.IGNORECASE) and not value.startswith(("http://", "https://")):
        return "must begin http:// or https:// in lower case (https://approvals.example.org)"
    if value and not re.fullmatch(r"https?://[^\s/?#]+/?", value):
        return ("must be empty or an http:// or https:// address with no path, query or fragment"
                " (https://approvals.example.org): serve PausePoint at the root of a host name, not under a path")
    if value and not base_url_names_a_host(value):
        # A link to user@host reads as one to the host and opens whoever "user" is.
        return ("must be a host name or address, with a port from 1 to 65535 if any, and nothing before the host"
                " (https://approvals.example.org:8443)")
    return None


def base_url_names_a_host(value):
    """Whether the server.base_url `value` names a host, and a port a link can reach, and no user."""
    parts = urllib.parse.urlsplit(value)
    try:
        port = parts.port
    except ValueError:          # not a number, or past 65535
        return False
    return "@" not in parts.netloc and bool(parts.hostname) and port != 0


# Twilio's ids: AC (an account) or MG (a Messaging Service) and 32 hex digits. A compatible
# provider at twilio.api_base may name its accounts by UUID (as it may its messages: MESSAGE_SID).
TWILIO_ACCOUNT_SID = re.compile("AC[0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
TWILIO_MESSAGING_SERVICE_SID = re.compile("MG[0-9a-fA-F]{32}")
# Those that together let the server send a text: set some without the rest, and every text fails.
TWILIO_SENDING = ("twilio.account_sid", "twilio.auth_token", "twilio.from_number", "twilio.messaging_service_sid")


# What else Twilio sends texts from: a short code, or an alphanumeric sender ID (one way: a
# reply cannot reach it, but the link in the text can be tapped). A number without its +
# (5550100) is the mistake to catch: it is neither.
SHORT_CODE = re.compile("[0-9]{3,6}")
ALPHANUMERIC_SENDER = re.compile("(?!\\+)(?=[^A-Za-z]*[A-Za-z])[A-Za-z0-9 +_&-]{1,11}")     # (+1555O100: a typo)


def _check_from_number(value):
    if not value or E164.fullmatch(value) or SHORT_CODE.fullmatch(value) or ALPHANUMERIC_SENDER.fullmatch(value):
        return None
    return ("must be empty, a phone number in E.164 form like +15550100 (a + and 7-15 digits; without whatsapp:,"
            " which WhatsApp messages get added), a short code or an alphanumeric sender ID")


def _check_from_address(value):
    """One address, a display name allowed: the From header of every approval email."""
    if not value:
        return None
    header = email.message.EmailMessage()
    with contextlib.suppress(ValueError, LookupError, email.errors.MessageError):    # a line break; 'a@'
        header["From"] = value
    parsed = header["From"]
    # An address, not a list of them nor a group ('Team: a@example.org;'), read without a flaw.
    if parsed is not None and not parsed.defects and [group.display_name for group in parsed.groups] == [None]:
        address = parsed.addresses[0]
        if address.username and address.domain and address.addr_spec.isascii():
            return None
        if address.username.isascii() and address.domain:
            # Sent as is, it needs a mail server that takes SMTPUTF8, and most refuse it. (Not
            # converted here: Python's codec follows IDNA 2003, which makes straße.de strasse.de.)
            return "must name its domain as DNS does, in ASCII: a name with other letters in its xn-- form"
    return "must be empty or one email address, like approvals@example.org or PausePoint <approvals@example.org>"


def twilio_complete(config):
    """Some of Twilio's settings without the rest would start, and then fail every text as it is sent."""
    given, missing = [key for key in TWILIO_SENDING if config[key]], twilio_missing(config)
    if given and missing:
        raise ConfigError(f"the Twilio settings are incomplete: with {all_of(given)} set, the sms and whatsapp"
                          f" channels also need {all_of(missing)}")


def _check_trusted_proxy(value):
    if not value:
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be empty or an IP address"
    return None


SETTING_CHECKS = {
    "server.host": _check_host,
    "server.port": lambda v: None if 1 <= v <= 65535 else "must be between 1 and 65535",
    "server.threads": lambda v: None if 12 <= v <= 1000 else "must be between 12 and 1000",
    "server.waiting_limit": lambda v: None if 0 <= v <= 100_000 else "must be between 0 and 100000",
    "server.waiting_per_developer": lambda v: None if 0 <= v <= 100_000 else "must be between 0 and 100000",
    "server.waiting_per_ip": lambda v: None if 0 <= v <= 100_000 else "must be between 0 and 100000",
    "server.base_url": _check_base_url,
    "server.trusted_proxy": _check_trusted_proxy,
    "twilio.account_sid": lambda v: None if not v or TWILIO_ACCOUNT_SID.fullmatch(v) else (
        "must be empty or Twilio's account SID, AC and 32 hex digits"),
    "twilio.from_number": _check_from_number,
    "twilio.messaging_service_sid": lambda v: None if not v or TWILIO_MESSAGING_SERVICE_SID.fullmatch(v) else (
        "must be empty or a Twilio Messaging Service SID, MG and 32 hex digits"),
    "smtp.from_address": _check_from_address,
    "twilio.api_base": lambda v: None if re.fullmatch(r"https?://[^\s/?#]+/?", v) else "must be an http:// or https:// URL with no path",
    "server.max_body_bytes": lambda v: None if 1024 <= v <= 16 * 1024 * 1024 else "must be between 1024 and 16777216",
    "server.max_header_bytes": lambda v: None if 4096 <= v <= 262_144 else "must be between 4096 and 262144",
    "database.path": lambda v: None if v else "must not be empty",
    "database.lock_wait_seconds": lambda v: None if 1 <= v <= 3600 else "must be between 1 and 3600",
    "database.cache_kib": lambda v: None if 64 <= v <= 1_048_576 else "must be between 64 and 1048576",
    "database.min_free_mb": lambda v: None if v >= 0 else "must be 0 or more",
    "security.bcrypt_rounds": lambda v: None if 4 <= v <= 16 else "must be between 4 and 16",
    "pauses.max_timeout_hours": lambda v: None if 0 < v <= 24 * 366 else "must be above 0 and at most 8784 (a year)",
    "pauses.max_test_pending": lambda v: None if v >= 0 else "must be 0 (no limit) or more",
    "pauses.max_pending_per_number": lambda v: None if v >= 0 else "must be 0 (no limit) or more",
    "smtp.security": lambda v: None if v in ("starttls", "tls", "none") else "must be starttls, tls or none",
    "smtp.port": lambda v: None if 1 <= v <= 65535 else "must be between 1 and 65535",
    "server.connection_limit": lambda v: None if 100 <= v <= 100_000 else "must be between 100 and 100000",
    "server.connections_per_ip": lambda v: None if v >= 4 else "must be at least 4",
    "server.header_timeout": lambda v: None if 1 <= v <= 300 else "must be between 1 and 300 seconds",
    "server.body_timeout": lambda v: None if 1 <= v <= 3600 else "must be between 1 and 3600 seconds",
    "server.idle_timeout": lambda v: None if 1 <= v <= 3600 else "must be between 1 and 3600 seconds",
    "server.send_timeout": lambda v: None if 1 <= v <= 3600 else "must be between 1 and 3600 seconds",
    "webhooks.max_per_developer": lambda v: None if v >= 1 else "must be at least 1",
    "webhooks.per_endpoint": lambda v: None if 1 <= v <= 64 else "must be between 1 and 64",
    "outbound.workers": lambda v: None if 2 <= v <= 256 else "must be between 2 and 256",
    "outbound.per_developer": lambda v: None if v >= 1 else "must be at least 1",
    "smtp.ca_file": lambda v: v and ca_file_problem(v),
    "outbound.deadline_seconds": lambda v: None if 1 <= v <= 300 else "must be between 1 and 300",
    "ratelimit.test_pauses_per_hour": lambda v: None if v >= 1 else "must be at least 1",
    "ratelimit.webhook_changes_per_hour": lambda v: None if v >= 1 else "must be at least 1",
    # Retries run for about three days: a shorter log would delete deliveries still being retried.
    # At most a century, or a cutoff before year 1 would fail the hourly pruning job on every run.
    "retention.test_days": lambda v: None if 1 <= v <= 36500 else "must be between 1 and 36500 (a hundred years)",
    "retention.test_pauses_kept": lambda v: None if 1 <= v <= 10**9 else "must be between 1 and 1000000000",
    "retention.delivery_log_days": lambda v: None if 4 <= v <= 36500 else (
        "must be between 4 (retries run for about 3 days) and 36500 (a hundred years)"),
    "ratelimit.register_per_hour": lambda v: None if v >= 1 else "must be at least 1",
    "ratelimit.rotate_per_hour": lambda v: None if v >= 1 else "must be at least 1",
    "ratelimit.login_per_hour": lambda v: None if v >= 1 else "must be at least 1",
    "dashboard.session_idle_minutes": lambda v: None if 1 <= v <= 43200 else "must be between 1 and 43200 (30 days)",
    "dashboard.session_max_hours": lambda v: None if 1 <= v <= 8760 else "must be between 1 and 8760 (a year)",
    "ratelimit.respond_failures_per_hour": lambda v: None if v >= 1 else "must be at least 1",
}


def ca_file_problem(path):
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError:        # (an OSError too)
        return "holds no PEM certificate"
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    return None


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
    (2, """
        ALTER TABLE pauses ADD COLUMN reply_code TEXT;
        CREATE UNIQUE INDEX pauses_pending_reply_code ON pauses(recipient, livemode, reply_code)
            WHERE status = 'pending' AND reply_code IS NOT NULL;
        CREATE INDEX pauses_decided_test ON pauses(decided_at) WHERE livemode = 0 AND status != 'pending';
        CREATE INDEX pauses_recent_reply_codes ON pauses(recipient, livemode, decided_at) WHERE reply_code IS NOT NULL;
        -- schema.sql's notifications, which documents it; a rebuild, since SQLite cannot alter a CHECK.
        CREATE TABLE notifications_rebuilt (
            id                   TEXT PRIMARY KEY,
            pause_id             TEXT NOT NULL UNIQUE REFERENCES pauses(id),
            developer_id         TEXT NOT NULL REFERENCES developers(id),
            channel              TEXT NOT NULL,
            recipient            TEXT NOT NULL,
            livemode             INTEGER NOT NULL CHECK (livemode IN (0, 1)),
            text                 TEXT NOT NULL,
            status               TEXT NOT NULL DEFAULT 'queued'
                                 CHECK (status IN ('queued', 'sending', 'sent', 'simulated', 'failed', 'cancelled')),
            attempts             INTEGER NOT NULL DEFAULT 0,
            next_attempt_at      TEXT NOT NULL,
            provider_message_id  TEXT,
            last_error           TEXT,
            created_at           TEXT NOT NULL,
            updated_at           TEXT NOT NULL
        );
        INSERT INTO notifications_rebuilt (id, pause_id, developer_id, channel, recipient, livemode, text, status,
                                           attempts, next_attempt_at, provider_message_id, last_error, created_at,
                                           updated_at)
            SELECT n.id, n.pause_id, p.developer_id, n.channel, n.recipient, n.livemode, n.text, n.status, n.attempts,
                   n.next_attempt_at, n.provider_message_id, n.last_error, n.created_at, n.updated_at
            FROM notifications n JOIN pauses p ON p.id = n.pause_id;
        DROP TABLE notifications;
        ALTER TABLE notifications_rebuilt RENAME TO notifications;
        CREATE INDEX notifications_due_test ON notifications(next_attempt_at)
            WHERE status IN ('queued', 'sending') AND livemode = 0;
        CREATE INDEX notifications_due_live ON notifications(channel, developer_id, next_attempt_at)
            WHERE status IN ('queued', 'sending') AND livemode = 1;
        CREATE INDEX audit_test_without_pause ON audit_events(timestamp) WHERE livemode = 0 AND pause_id IS NULL;
        DROP TRIGGER audit_events_are_never_deleted;
        CREATE TRIGGER live_audit_events_are_never_deleted BEFORE DELETE ON audit_events WHEN OLD.livemode = 1
        BEGIN SELECT RAISE(ABORT, 'live audit events are append-only'); END;
        CREATE INDEX idempotency_keys_by_age ON idempotency_keys(created_at);
        CREATE INDEX webhook_events_by_age ON webhook_events(created_at);
        DROP INDEX webhook_deliveries_due;
        CREATE INDEX webhook_deliveries_due ON webhook_deliveries(webhook_id, next_attempt_at)
            WHERE status IN ('pending', 'delivering');
        CREATE INDEX webhook_deliveries_by_event ON webhook_deliveries(event_id);
    """),
    (3, """
        DROP INDEX pauses_recent_reply_codes;
        CREATE INDEX pauses_recent_reply_codes ON pauses(recipient, livemode, reply_code, decided_at)
            WHERE reply_code IS NOT NULL;
    """),
    (4, """
        CREATE TABLE dashboard_sessions (
            token_hash    TEXT PRIMARY KEY,
            developer_id  TEXT NOT NULL REFERENCES developers(id),
            csrf_token    TEXT NOT NULL,
            livemode      INTEGER NOT NULL DEFAULT 0 CHECK (livemode IN (0, 1)),
            created_at    TEXT NOT NULL,
            last_seen_at  TEXT NOT NULL
        );
        CREATE INDEX dashboard_sessions_by_developer ON dashboard_sessions(developer_id);
        CREATE INDEX dashboard_sessions_by_last_seen ON dashboard_sessions(last_seen_at);
    """),
    (5, """
        ALTER TABLE developers ADD COLUMN is_operator INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE pauses ADD COLUMN title TEXT;
        CREATE TABLE server_settings (
            key         TEXT PRIMARY KEY,
            value       TEXT NOT NULL,
            changed_by  TEXT NOT NULL,
            changed_at  TEXT NOT NULL
        );
    """),
    (6, """
        CREATE TABLE dashboard_devices (
            token_hash    TEXT PRIMARY KEY,
            developer_id  TEXT NOT NULL REFERENCES developers(id),
            created_at    TEXT NOT NULL
        );
        CREATE INDEX dashboard_devices_by_age ON dashboard_devices(created_at);
    """),
    # Devices once per developer they signed in as (browsers re-register at their next sign-in).
    (7, """
        DROP TABLE dashboard_devices;
        CREATE TABLE dashboard_devices (
            token_hash    TEXT NOT NULL,
            developer_id  TEXT NOT NULL REFERENCES developers(id),
            created_at    TEXT NOT NULL,
            PRIMARY KEY (token_hash, developer_id)
        );
        CREATE INDEX dashboard_devices_by_developer ON dashboard_devices(developer_id, created_at);
        CREATE INDEX dashboard_devices_by_age ON dashboard_devices(created_at);
    """),
    (8, "CREATE INDEX webhook_events_feed ON webhook_events(developer_id, livemode);"),
    # A browser is kept for a year after it last signed in, and the last ten are kept.
    (9, """
        ALTER TABLE dashboard_devices RENAME COLUMN created_at TO signed_in_at;
        DROP INDEX dashboard_devices_by_developer;
        DROP INDEX dashboard_devices_by_age;
        CREATE INDEX dashboard_devices_by_developer ON dashboard_devices(developer_id, signed_in_at);
        CREATE INDEX dashboard_devices_by_age ON dashboard_devices(signed_in_at);
    """),
    (10, """
        ALTER TABLE pauses ADD COLUMN fields TEXT;
        ALTER TABLE pauses ADD COLUMN edited TEXT;
    """),
    # Teams: several people per pause, so notifications are no longer one per pause.
    (11, """
        ALTER TABLE pauses ADD COLUMN team INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE pauses ADD COLUMN quorum TEXT;
        CREATE TABLE pause_recipients (
            pause_id       TEXT NOT NULL REFERENCES pauses(id),
            position       INTEGER NOT NULL,
            livemode       INTEGER NOT NULL CHECK (livemode IN (0, 1)),
            recipient      TEXT NOT NULL,
            channel        TEXT NOT NULL,
            respond_token  TEXT NOT NULL UNIQUE,
            reply_code     TEXT,
            added_by       TEXT NOT NULL CHECK (added_by IN ('request', 'escalation')),
            added_at       TEXT NOT NULL,
            opened_at      TEXT,
            choice         TEXT,
            comment        TEXT,
            edits          TEXT,
            voted_at       TEXT,
            PRIMARY KEY (pause_id, position)
        );
        CREATE INDEX pause_recipients_by_number ON pause_recipients(recipient, livemode, reply_code)
            WHERE position > 0 AND reply_code IS NOT NULL;
        CREATE TABLE pause_steps (
            id           INTEGER PRIMARY KEY,
            pause_id     TEXT NOT NULL REFERENCES pauses(id),
            kind         TEXT NOT NULL CHECK (kind IN ('reminder', 'escalation')),
            due_at       TEXT NOT NULL,
            recipient    TEXT,
            channel      TEXT,
            status       TEXT NOT NULL DEFAULT 'scheduled' CHECK (status IN ('scheduled', 'done', 'skipped')),
            done_at      TEXT
        );
        CREATE INDEX pause_steps_due ON pause_steps(due_at) WHERE status = 'scheduled';
        CREATE INDEX pause_steps_by_pause ON pause_steps(pause_id);
        -- schema.sql's notifications; a rebuild, since SQLite cannot drop a UNIQUE.
        CREATE TABLE notifications_rebuilt (
            id                   TEXT PRIMARY KEY,
            pause_id             TEXT NOT NULL REFERENCES pauses(id),
            position             INTEGER NOT NULL DEFAULT 0,
            kind                 TEXT NOT NULL DEFAULT 'ask' CHECK (kind IN ('ask', 'reminder')),
            developer_id         TEXT NOT NULL REFERENCES developers(id),
            channel              TEXT NOT NULL,
            recipient            TEXT NOT NULL,
            livemode             INTEGER NOT NULL CHECK (livemode IN (0, 1)),
            text                 TEXT NOT NULL,
            status               TEXT NOT NULL DEFAULT 'queued'
                                 CHECK (status IN ('queued', 'sending', 'sent', 'simulated', 'failed', 'cancelled')),
            attempts             INTEGER NOT NULL DEFAULT 0,
            next_attempt_at      TEXT NOT NULL,
            provider_message_id  TEXT,
            last_error           TEXT,
            created_at           TEXT NOT NULL,
            updated_at           TEXT NOT NULL
        );
        INSERT INTO notifications_rebuilt (id, pause_id, developer_id, channel, recipient, livemode, text, status,
                                           attempts, next_attempt_at, provider_message_id, last_error, created_at,
                                           updated_at)
            SELECT id, pause_id, developer_id, channel, recipient, livemode, text, status, attempts, next_attempt_at,
                   provider_message_id, last_error, created_at, updated_at FROM notifications;
        DROP TABLE notifications;
        ALTER TABLE notifications_rebuilt RENAME TO notifications;
        CREATE INDEX notifications_by_pause ON notifications(pause_id, position);
        CREATE INDEX notifications_due_test ON notifications(next_attempt_at)
            WHERE status IN ('queued', 'sending') AND livemode = 0;
        CREATE INDEX notifications_due_live ON notifications(channel, developer_id, next_attempt_at)
            WHERE status IN ('queued', 'sending') AND livemode = 1;
    """),
    # A number's people of pending team pauses, found without reading its whole history.
    (12, """
        ALTER TABLE pause_recipients ADD COLUMN pause_decided_at TEXT;
        UPDATE pause_recipients SET pause_decided_at = (SELECT decided_at FROM pauses WHERE id = pause_id);
        DROP INDEX pause_recipients_by_number;
        CREATE INDEX pause_recipients_by_number ON pause_recipients(recipient, livemode, pause_decided_at)
            WHERE position > 0 AND reply_code IS NOT NULL;
    """),
    # The audit log becomes tamper-evident: each event chained to the one before (Python: SHA-256).
    (13, lambda conn: chain_audit_events(conn)),
    (14, "ALTER TABLE pauses ADD COLUMN receipt TEXT;"),        # (RECEIPTS_SINCE_SCHEMA)
    (15, "CREATE TABLE sms_replies (message_sid TEXT PRIMARY KEY, received_at TEXT NOT NULL) WITHOUT ROWID;"),
    (16, "ALTER TABLE notifications ADD COLUMN may_have_reached INTEGER NOT NULL DEFAULT 0"
         " CHECK (may_have_reached IN (0, 1));"),
    # Test-mode reply codes are each developer's own (see CODE_SCOPE): another tenant's test
    # pauses to a number took its codes from everyone's.
    (17, """
        ALTER TABLE pause_recipients ADD COLUMN developer_id TEXT REFERENCES developers(id);
        UPDATE pause_recipients SET developer_id = (SELECT developer_id FROM pauses WHERE id = pause_id);
        DROP INDEX pauses_pending_reply_code;
        CREATE UNIQUE INDEX pauses_pending_reply_code ON pauses(recipient, livemode, iif(livemode, '', developer_id), reply_code)
            WHERE status = 'pending' AND reply_code IS NOT NULL;
        DROP INDEX pauses_recent_reply_codes;
        CREATE INDEX pauses_recent_reply_codes ON pauses(recipient, livemode, iif(livemode, '', developer_id), reply_code, decided_at)
            WHERE reply_code IS NOT NULL;
        DROP INDEX pause_recipients_by_number;
        CREATE INDEX pause_recipients_by_number ON pause_recipients(recipient, livemode, iif(livemode, '', developer_id), pause_decided_at)
            WHERE position > 0 AND reply_code IS NOT NULL;
        -- Which also lets any tenant keep thousands of test pauses pending to a number: a text
        -- from it, looking for its pauses under the write lock, must not read through them.
        DROP INDEX pauses_pending_by_recipient;
        CREATE INDEX pauses_pending_by_recipient ON pauses(recipient, seq) WHERE status = 'pending' AND livemode = 1;
    """),
    # A reply without a code looks for the number's requests that closed lately (BARE_REPLY_QUIET).
    (18, "CREATE INDEX pauses_closed_by_recipient ON pauses(recipient, decided_at)"
         " WHERE livemode = 1 AND channel IN ('sms', 'whatsapp');"),
    # The event feed starts after the newest event pruned from it (schema.sql).
    (19, "CREATE TABLE event_feed_pruned (developer_id TEXT NOT NULL REFERENCES developers(id),"
         " livemode INTEGER NOT NULL CHECK (livemode IN (0, 1)), through_rowid INTEGER NOT NULL,"
         " PRIMARY KEY (developer_id, livemode)) WITHOUT ROWID;"),
    # Live pauses are counted per month as they are made (schema.sql), from the ones made so far.
    (20, """
        CREATE TABLE monthly_usage (developer_id TEXT NOT NULL REFERENCES developers(id), month TEXT NOT NULL,
            live_pauses INTEGER NOT NULL, PRIMARY KEY (developer_id, month)) WITHOUT ROWID;
        INSERT INTO monthly_usage SELECT developer_id, substr(created_at, 1, 7), count(*) FROM pauses
            WHERE livemode = 1 GROUP BY developer_id, substr(created_at, 1, 7);
    """),
    # Twilio's delivery reports: what became of a text it took, found by its MessageSid (schema.sql).
    (21, """
        ALTER TABLE notifications ADD COLUMN delivery_status TEXT
            CHECK (delivery_status IN ('delivered', 'read', 'undelivered', 'failed'));
        CREATE INDEX notifications_by_provider_message_id ON notifications(provider_message_id)
            WHERE provider_message_id IS NOT NULL;
    """),
    # Twilio's reports on a text whose send is not recorded yet (schema.sql).
    (22, """
        CREATE TABLE early_delivery_reports (seq INTEGER PRIMARY KEY, message_sid TEXT NOT NULL,
            reported TEXT NOT NULL, error_code TEXT NOT NULL, received_at TEXT NOT NULL);
        CREATE INDEX early_delivery_reports_by_sid ON early_delivery_reports(message_sid);
    """),
    # Test pauses weighed by what they keep on disk, not counted (weight_in_test_mode(), schema.sql).
    (23, """
        ALTER TABLE pauses ADD COLUMN test_weight INTEGER NOT NULL DEFAULT 1;
        CREATE INDEX pauses_test_weights ON pauses(developer_id, status, seq, test_weight) WHERE livemode = 0;
    """),
    # An early report is kept once per text and word (schema.sql): the first of those that came.
    (24, """
        DELETE FROM early_delivery_reports WHERE seq NOT IN
            (SELECT min(seq) FROM early_delivery_reports GROUP BY message_sid, reported);
        DROP INDEX early_delivery_reports_by_sid;
        CREATE UNIQUE INDEX early_delivery_reports_by_sid ON early_delivery_reports(message_sid, reported);
    """),
]


class TurnOrder:
    """Waiters in turn order: client address by address in rotation, and within an address
    party by party (FairTaskDispatcher.party(): the API key or sign-in a request carries),
    each party's in the order they came. A client is an address, or an (address, party)
    pair. By address alone, a tenant's one write on a host shared with another's flood
    waited behind every write of the flood from there: the threads took the two in turn,
    then this lock's queue put them back in arrival order."""

    def __init__(self):
        self._queues = collections.OrderedDict()    # address -> party -> deque of waiters

    @staticmethod
    def _split(client):
        return client if isinstance(client, tuple) else (client, "")

    def append(self, client, waiter):
        address, party = self._split(client)
        self._queues.setdefault(address, collections.OrderedDict()).setdefault(party, collections.deque()).append(waiter)

    def popleft(self):
        """The first waiter whose turn it is; its party and address then wait for the others'."""
        address, parties = next(iter(self._queues.items()))
        party, queue = next(iter(parties.items()))
        waiter = queue.popleft()
        self._rotate(address, party)
        return waiter

    def remove(self, client, waiter):
        """Whether `waiter` was waiting for `client` and is now taken out."""
        address, party = self._split(client)
        queue = self._queues.get(address, {}).get(party)
        if queue is None or waiter not in queue:
            return False
        queue.remove(waiter)
        self._rotate(address, party, to_end=False)
        return True

    def _rotate(self, address, party, to_end=True):
        """Drop an emptied queue; after a turn taken, its party and address go last."""
        parties = self._queues[address]
        if not parties[party]:
            del parties[party]
        elif to_end:
            parties.move_to_end(party)
        if not parties:
            del self._queues[address]
        elif to_end:
            self._queues.move_to_end(address)

    def __bool__(self):
        return bool(self._queues)

    def __iter__(self):
        """(client, waiter) for every waiter."""
        for address, parties in self._queues.items():
            for party, queue in parties.items():
                yield from (((address, party), waiter) for waiter in queue)


class Turns:
    """At most `size` requests run their Python at once; the others wait for a turn.
    Under the GIL, many threads each doing some Python and many short SQLite calls
    (each lets go of the GIL and must win it back) mostly wait on one another: at 16
    clients on two cores a list of 50 pauses took 5.8-6.2 ms of CPU a request, and
    2.9-3.2 ms with two turns (1.7 ms at one client).

    Turns go to the waiting client addresses in rotation, as threads do, and within an
    address to its parties (TurnOrder), so one address's or tenant's many slow requests
    hold nobody else's for longer than one of them takes.
    A thread gives its turn up while it waits on something else (the write lock, a
    commit's fsync, a password hash, a long poll): only one writes at a time anyway.
    (Password hashes have turns of their own, taken with take() and give().)"""

    def __init__(self, size):
        self.size = size
        self._guard = threading.Lock()
        self._running = 0
        self._waiting = TurnOrder()                 # the waiting threads' turn locks
        self._mine = threading.local()              # .address: the client this thread holds a turn for

    def take(self, address, timeout=None):
        """Whether `address` got a turn (within `timeout` seconds, if given); give() it back."""
        with self._guard:
            if self._running < self.size and not self._waiting:
                self._running += 1
                return True
            turn = threading.Lock()
            turn.acquire()
            self._waiting.append(address, turn)
        try:
            # released by a thread handing its turn over to us
            if turn.acquire(timeout=-1 if timeout is None else timeout):
                return True
        except BaseException:           # interrupted while waiting (a signal): give up our place
            if self._leave(address, turn):
                raise
            self.give()                 # it was handed to us meanwhile: pass it on
            raise
        return not self._leave(address, turn)      # still queued: none came; else one just did

    def _leave(self, address, turn):
        """Take a waiter's turn lock out of the queue; False if a giver took it out first."""
        with self._guard:
            return self._waiting.remove(address, turn)

    def give(self):
        with self._guard:
            if not self._running:
                raise RuntimeError("give() without a turn taken")
            if not self._waiting:
                self._running -= 1
                return
            turn = self._waiting.popleft()      # its client's next request waits for the others' turn
        turn.release()                  # handed over: as many run as before

    def waiting(self, address=None):
        """How many wait for a turn (of `address`, if given)."""
        with self._guard:
            return sum(address in (None, who, who[0]) for who, _ in self._waiting)

    @contextlib.contextmanager
    def taken(self, address):
        self.take(address)
        self._mine.address = address
        try:
            yield
        finally:
            if self._mine.address is not None:      # None: taking it back after a give-up was interrupted
                self._mine.address = None
                self.give()

    def each_in_turn(self, chunks, address):
        """Each of `chunks` made in a turn of `address`'s, given back between them. A
        download's body is made after its handler returns, while waitress writes it out:
        without turns, 32 audit exports at once from one address made another
        developer's create take 293 ms at the median instead of 5."""
        chunks = iter(chunks)
        try:
            while True:
                with self.taken(address):
                    chunk = next(chunks, None)
                if chunk is None:
                    return
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:       # a client that went away: the reads stop here
                close()

    @contextlib.contextmanager
    def given_up(self):
        """The block runs without this thread's turn, if it held one, given whose turn it was (or None)."""
        address = getattr(self._mine, "address", None)
        if address is None:
            yield None
            return
        self._mine.address = None
        self.give()
        try:
            yield address       # whose turn it was: the write lock takes turns by it too
        finally:
            self.take(address)
            self._mine.address = address


class Connection(sqlite3.Connection):
    """A connection that may share an in-process write lock and request turns with its
    siblings, and tell its runtime what to wake once a transaction commits."""
    write_lock = None
    turns = Turns(1)        # command-line connections: one thread, never holding a turn
    on_commit = None        # the runtime's on_commit({what: {ids}}); None for command-line connections
    _woken = None           # what the open transaction will wake once it commits
    borrower = None         # the thread a request connection is lent to (Runtime.db())
    lock_wait_seconds = 30  # its busy_timeout: database.lock_wait_seconds (see begin_immediate())


def connect(path, write_lock=None, cache_kib=128, same_thread=True, lock_wait_seconds=30):
    """A connection in autocommit mode: transactions are explicit (see transaction()).
    sqlite3's same-thread check stays on, but for a job's own connection, which its round
    lock keeps to one thread at a time, and those lent to request threads one request at a
    time (Runtime.db())."""
    create_private(path)
    conn = sqlite3.connect(path, isolation_level=None, timeout=lock_wait_seconds, factory=Connection,
                           check_same_thread=same_thread)
    conn.write_lock, conn.lock_wait_seconds = write_lock, lock_wait_seconds
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode = WAL")
    # A decision acknowledged to a human must survive a power cut, not only a crash.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA busy_timeout = {int(lock_wait_seconds * 1000)}")
    # SQLite's default 2 MB cache per connection, times every thread's connection, was most
    # of the server's memory (215 MB after load on a million pauses; 94 MB at 128 KiB).
    conn.execute(f"PRAGMA cache_size = -{int(cache_kib)}")
    # Once checkpointed, a WAL grown by a burst is cut back to this size rather than kept.
    conn.execute(f"PRAGMA journal_size_limit = {64 * 1024 * 1024}")
    return conn


def create_private(path):
    """A new database file, made readable and writable by its owner only before SQLite makes
    it as the umask has it (0644, as a rule): it holds respond tokens, each enough to decide
    a pause. SQLite gives the -wal and -shm files the database file's mode. A file of 0 bytes
    found there (`touch pausepoint.db`, a volume's placeholder) is a new one too."""
    if path in ("", ":memory:"):
        return
    real = os.path.realpath(path)       # the file a symbolic link names: O_EXCL would not make it through the link
    try:
        fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        # `sudo … create-developer` before the first start: the server runs as the directory's
        # owner. (SQLite gives the -wal and -shm files the database file's owner.)
        take_owner(fd, os.path.dirname(real))
        os.close(fd)
        made = True
    except FileExistsError:
        made = False
    except OSError:      # no directory for it, or none we may write in: SQLite says which
        return
    if not made and not (os.path.isfile(real) and os.path.getsize(real) == 0):
        return
    try:
        # Its header now, before its signing keys are made beside it (into a file found empty
        # too, which a start stopped before its first write would leave so): a file of 0 bytes
        # beside them is then never one a start made, but one emptied (refuse_a_database_gone()).
        with contextlib.closing(sqlite3.connect(real)) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
    except sqlite3.Error:
        if made:
            os.unlink(real)     # (a full disk, say) as it was: the open that follows says why


def warn_if_others_may_read(path, what, also=""):
    """Log that the file at `path` (`what`, named) is readable or writable by others; `also`
    ends the advice."""
    with contextlib.suppress(OSError):
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode) and mode & 0o077:        # (a directory named by mistake is refused after)
            log.warning("others than its owner may read or write %s %s: chmod 600 it%s", what, path, also)


# Locks of SQLite's (its unix VFS's) that a connection to a database in WAL mode holds, shared,
# for as long as it is open: on bytes of the database file past its pending byte (0x40000000),
# and on a byte of the wal-index (-shm) beside the name it opened the file by.
SQLITE_OPEN_BYTES = (0x40000002, 510)
SQLITE_SHM_IN_USE_BYTE = (128, 1)


def locked_by_another(path, span):
    """Whether another process holds a lock on the bytes `span` (start, length) of the regular
    file at `path`; None where this cannot tell (no such file to open, a file system without
    locks). A lock belongs to the file itself: this sees one taken through any name, bind
    mount or link. Closing a descriptor of a file lets go of every lock this process holds
    on it, its SQLite connections' too: never called where one is open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)     # (a FIFO named by mistake opens at once)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        asked = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, *span, 0)      # Linux's struct flock
        return struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, asked))[0] != fcntl.F_UNLCK
    except OSError:
        return None
    finally:
        os.close(fd)


def refuse_if_open_by_another_name(path):
    """Refuse the database at `path` if a process has it open by another name (a file mounted
    on its own into a container, a hard link): its connections hold the file's lock but not
    that of the wal-index beside this name, since theirs is beside the name they opened. Used
    by this name, its newest writes (in the log beside that one) would go unseen, and a write
    would start a second log of the same file. A connection opening or closing by this name
    holds the first lock a moment before (or after) the second, so only a state that lasts is
    refused. Called as a process starts or a command begins, before it opens the database."""
    real = os.path.realpath(path)
    for _ in range(OPEN_ELSEWHERE_LOOKS):
        # No wal-index here is one not used by this name; one that cannot be read tells nothing.
        # A log here with frames in it is this name's (a reader that may not write the wal-index
        # reads it without locking that): nothing says the file is used by another.
        here = locked_by_another(real + "-shm", SQLITE_SHM_IN_USE_BYTE) if os.path.lexists(real + "-shm") else False
        if not (here is False and not log_with_frames(real + "-wal") and locked_by_another(real, SQLITE_OPEN_BYTES)):
            return
        time.sleep(0.02)
    raise ConfigError(f"{path} is open in a process that reaches it by another name (a file mounted on its own,"
                      " a hard link), with its write-ahead log beside that name: use the database by that name")


OPEN_ELSEWHERE_LOOKS = 10
WAL_HEADER_BYTES = 32


def log_with_frames(wal):
    """Whether the write-ahead log at `wal` holds frames (more than its header)."""
    with contextlib.suppress(OSError):
        return os.stat(wal).st_size > WAL_HEADER_BYTES
    return False


# What SQLite keeps beside a database file: its write-ahead log, wal-index and rollback journal.
BESIDE_A_DATABASE = ("-wal", "-shm", "-journal")


def refuse_before_opening(path):
    """What a process checks before it first opens the database at `path` (a server as it
    starts, a command as it begins): no process may have it open by another name, and none of
    its files may be a pipe to wait on."""
    refuse_if_no_file(path)
    refuse_if_open_by_another_name(path)


def refuse_a_database_gone(path):
    """No database file, or one of 0 bytes, beside the signing keys of one that was made
    there. A first start makes the file, with its header (the switch to WAL is written into
    it), before the keys (create_private()), so this one was deleted or emptied: a restore by
    hand gone wrong, a copy into its place that failed, a mistaken `> pausepoint.db` or `rm`.
    Opened, it would get a fresh schema, and every pause, key and decision would be silently
    gone. (Without keys beside it, it is a new database.)"""
    def size(name):
        return os.path.getsize(name) if os.path.isfile(name) else None

    if not os.path.exists(signing_keys_path(path)) or os.path.isdir(path):
        return
    if not os.path.lexists(path):
        raise ConfigError(f"there is no database at {path}, though the signing keys beside it show one was made there:"
                          " put the latest backup in place with `pausepoint.py restore BACKUP`; to start afresh"
                          f" instead, remove {signing_keys_path(path)} too")
    # (Pages still only in a -wal beside it are the database's: SQLite reads them into it.)
    if size(path) == 0 and not size(os.path.realpath(path) + "-wal"):
        raise ConfigError(f"{path} is empty (0 bytes), though the signing keys beside it show a database was made"
                          " there: put the latest backup in place with `pausepoint.py restore BACKUP`; to start"
                          " afresh instead, remove it and its keys file")


def quick_check(conn, most):
    """SQLite's quick_check of the database: ['ok'], or up to `most` problems, one a line, past
    the "*** in database main ***" heading it puts first."""
    return [line for row in conn.execute(f"PRAGMA quick_check({int(most)})") for line in row[0].splitlines()
            if not line.startswith("***")]


def refuse_if_mixed_with_another_wal(path):
    """A non-empty WAL beside the database at a server's start, or at a command's with no
    process on the database, means the last process did not stop cleanly (a clean stop
    removes it) or that the file was replaced under it: a backup copied over a database whose
    -wal was left, which SQLite reads into the copy as the copy's own, so pages of two
    databases would be served and then checkpointed into one. Before anything writes, while
    the file is still the backup as copied, SQLite's quick_check finds pages that do not fit
    together (it reads every page, 0.1 s for 20 MB, and only after such a stop). Not every
    mix: a -wal of the same database from after the backup may fit it page for page."""
    wal = os.path.realpath(path) + "-wal"
    if not os.path.isfile(path) or not os.path.isfile(wal) or os.path.getsize(wal) == 0:
        return
    try:
        with contextlib.closing(connect_read_only(path)) as conn:       # a reader never checkpoints
            found = quick_check(conn, 2)
    except sqlite3.DatabaseError as e:
        if getattr(e, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_CANTOPEN:
            # Not this user's to read (a command run as another than the server's, which may be
            # running): no sign of a mix, and deleting the -wal would lose what is only in it.
            # The open that follows says what is wrong.
            return
        found = [str(e)]
    if found != ["ok"]:
        raise ConfigError(f"the database {path} read with the {wal} beside it fails SQLite's check ({found[0]}): if a"
                          " backup was just copied into its place, that -wal and the -shm belong to the database it"
                          " replaced: put the backup in place with `pausepoint.py restore BACKUP`, which sets them"
                          " aside. Otherwise restore the latest backup that way")


def refuse_if_no_file(path):
    """A named pipe or a device given as the database, or put where its log, wal-index, journal
    or keys file go: SQLite (or the keys' reader) would wait on it for ever."""
    real = os.path.realpath(path)
    for name in (path, *(real + suffix for suffix in BESIDE_A_DATABASE), signing_keys_path(path)):
        with contextlib.suppress(OSError):
            mode = os.stat(name).st_mode
            if not (stat.S_ISREG(mode) or name == path and stat.S_ISDIR(mode)):    # (a directory: its own answer)
                raise ConfigError(f"{name} is no file the database may use: name the server's with --db or"
                                  " database.path, or remove it")


def connect_read_only(path, immutable=False):
    """A connection that cannot write to the database (SQLite's mode=ro): not even the
    journal mode, as connect() sets it. An immutable one takes no locks and reads no WAL."""
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro{'&immutable=1' * immutable}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30, factory=Connection)
    conn.row_factory = sqlite3.Row
    return conn


class WriteLockWaitOver(sqlite3.OperationalError):
    """A write refused for having waited its database.lock_wait_seconds in line for the
    in-process write lock while the writer holding it waited on another process's: SQLite's
    SQLITE_BUSY, as waiting on that lock itself would have ended (database_locked())."""
    sqlite_errorcode = sqlite3.SQLITE_BUSY


class FairLock:
    """A lock handed to its waiters client by client in rotation (an address and, within
    it, a party, as Turns counts them: TurnOrder; the jobs are one client), and to each
    client's in the order they asked. threading.Lock favours the thread that just released it, so a job writing
    batch after batch took it straight back and an API write could wait out a dozen
    batches. In the order asked alone, one address's flood of writes (a create refused
    for its rate is a write too) queued every other client's behind all of it: 32 of
    them made another developer's create take 56 ms at the median instead of 5.

    A waiter may have a deadline (time.monotonic()): past it, it is refused while the holder
    waits on another process's lock (waiting_outside()), and only then. Behind this server's
    own writes alone it waits its turn however long that takes."""

    class Waiter:
        __slots__ = ("turn", "deadline", "refused")

        def __init__(self, deadline):
            self.turn, self.deadline, self.refused = threading.Lock(), deadline, False
            self.turn.acquire()         # released by the holder, handing the lock over (or refusing it)

    def __init__(self):
        self._guard = threading.Lock()
        self._waiters = TurnOrder()                    # the waiting threads' Waiters
        self._held = False
        self._outside = False           # the holder waits on another process's lock (waiting_outside())

    def __enter__(self):
        return self.taken_by(None)

    def taken_by(self, client, deadline=None):
        """Take the lock for `client` (None: not a request's); release it with __exit__(). Raises
        WriteLockWaitOver once past `deadline`, if given, while the holder waits outside."""
        with self._guard:
            if not self._held:
                self._held = True
                return self
            waiter = self.Waiter(deadline)
            self._waiters.append(client, waiter)
        try:
            timeout = -1 if deadline is None else max(0, deadline - time.monotonic())
            if not waiter.turn.acquire(timeout=timeout) and not self._refused_overdue(client, waiter):
                waiter.turn.acquire()       # handed the lock, or refused once a holder waits outside
        except BaseException:       # interrupted while waiting (a signal): give up our turn
            with self._guard:
                if self._leave(client, waiter) or waiter.refused:
                    raise
            self.__exit__()         # it was handed to us meanwhile: pass it on
            raise
        if waiter.refused:
            raise WriteLockWaitOver("database is locked: waited database.lock_wait_seconds in line behind a write"
                                    " waiting for another process's lock")
        return self

    def _refused_overdue(self, client, waiter):
        """Whether a waiter past its deadline is refused now: if still in line, and the holder waits outside."""
        with self._guard:
            if self._outside and self._leave(client, waiter):
                waiter.refused = True
            return waiter.refused

    def _leave(self, client, waiter):
        """Take a waiter out of the queue (the guard held); False if the holder took it out first."""
        return self._waiters.remove(client, waiter)

    def __exit__(self, *exc):
        with self._guard:
            if not self._waiters:
                self._held = False
                return
            # Still held: now by the first waiter whose turn it is; its client's next write waits for the others'.
            self._waiters.popleft().turn.release()

    @contextlib.contextmanager
    def held_by(self, client, deadline=None):
        """The lock, taken for `client` (waiting until `deadline` at most: see taken_by()), for a with block."""
        self.taken_by(client, deadline)
        try:
            yield self
        finally:
            self.__exit__()

    @contextlib.contextmanager
    def waiting_outside(self):
        """The holder waits on another process's lock for the block: each waiter past its
        deadline is refused now, and each other as its deadline passes meanwhile."""
        now = time.monotonic()
        with self._guard:
            self._outside = True
            overdue = [(client, waiter) for client, waiter in self._waiters
                       if waiter.deadline is not None and waiter.deadline <= now]
            for client, waiter in overdue:
                self._leave(client, waiter)
                waiter.refused = True
                waiter.turn.release()
        try:
            yield
        finally:
            with self._guard:
                self._outside = False

    def locked(self):
        return self._held

    def waiting(self):
        return sum(1 for _ in self._waiters)


@contextlib.contextmanager
def transaction(conn):
    """A write transaction. BEGIN IMMEDIATE takes SQLite's write lock up front, so
    a compare-and-set never fails half-way with SQLITE_BUSY after reading stale
    state. Threads of one process first queue on a Python lock: SQLite's own
    busy handler sleeps and retries, which under load turns into long tails.

    While another process holds SQLite's write lock, a write waits for it, in line for
    the Python lock and then on SQLite's, database.lock_wait_seconds in all from when it
    asked, then fails with SQLITE_BUSY (database_locked()). Counted on SQLite's lock
    alone, the k-th of a queue of writes waited out the k-1 lock waits ahead of its own,
    holding its worker thread as long.

    What the transaction's changes should wake (waiting agents, the delivery job)
    is registered with wake_after_commit() and woken only once COMMIT succeeds."""
    if conn.in_transaction:
        # The write lock is not reentrant: nesting would wait on ourselves forever.
        raise RuntimeError("transaction() called inside a transaction on the same connection")
    deadline = time.monotonic() + conn.lock_wait_seconds
    with (conn.turns.given_up() as client,
          contextlib.nullcontext() if conn.write_lock is None else conn.write_lock.held_by(client, deadline)):
        begin_immediate(conn, deadline)
        conn._woken, conn.audit_heads = {}, {}      # audit_heads: each chain's head as this transaction leaves it
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:     # a COMMIT that failed leaves it open: never to the next user
                conn.execute("ROLLBACK")
            conn._woken = None
            raise
    woken, conn._woken = conn._woken, None
    if woken and conn.on_commit is not None:
        conn.on_commit(woken)


def begin_immediate(conn, deadline):
    """BEGIN IMMEDIATE, waiting for SQLite's write lock until `deadline` (time.monotonic()) at
    most. Tried first without waiting, so that a lock another process holds is known as such:
    the writes in line behind this one are then refused as their own deadlines pass
    (FairLock.waiting_outside()) rather than each waiting its lock wait in turn after it."""
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        left = deadline - time.monotonic()
        if not database_locked(e) or left <= 0:
            raise
        with contextlib.nullcontext() if conn.write_lock is None else conn.write_lock.waiting_outside():
            conn.execute(f"PRAGMA busy_timeout = {max(1, int(left * 1000))}")
            conn.execute("BEGIN IMMEDIATE")
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(conn.lock_wait_seconds * 1000)}")


def require_transaction(conn):
    """For functions whose writes must share the caller's transaction."""
    if not conn.in_transaction or conn._woken is None:
        raise RuntimeError("this must run inside transaction()")


@contextlib.contextmanager
def snapshot(conn):
    """Reads that must agree with one another: in one read transaction, a write committed
    between two of them is seen by both or neither. (In WAL mode a reader never waits
    for the writer, nor the writer for it.)"""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


# Rows a job changes in one transaction; it takes batch after batch while work is
# due, and API writers get the write lock between them.
JOB_BATCH = 500


def in_batches(conn, claim, then):
    """Run `claim` (an UPDATE … RETURNING * of at most :batch rows due by :now) and
    then(rows, now) in a transaction of their own, again while a whole JOB_BATCH came
    back; returns how many rows were claimed in all."""
    claimed = JOB_BATCH
    total = 0
    while claimed == JOB_BATCH:
        with transaction(conn):
            now = db_time()
            rows = conn.execute(claim, {"now": now, "batch": JOB_BATCH}).fetchall()
            then(rows, now)
        claimed = len(rows)
        total += claimed
    return total


def wake_after_commit(conn, what, *ids):
    """Once the open transaction commits, wake `what` ('decisions', 'webhooks') for `ids`."""
    require_transaction(conn)
    conn._woken.setdefault(what, set()).update(ids)


# A parameter compared with livemode or status is written `+?` (`+:livemode`): compared bare
# with a column that a partial index's WHERE names with a value, it has SQLite prepare the
# statement again before every run, in case the value bound opens that index. A pause's JSON
# took 0.39 ms to prepare so and 0.016 ms to run. The `+` keeps the value from the planner;
# the column's other indexes are used as before.
def query_db(conn, sql, args=(), one=False):
    """Rows of a query, or with one=True its first row (None if there is none)."""
    cursor = conn.execute(sql, args)
    return cursor.fetchone() if one else cursor.fetchall()


def newest_first(conn, sql, args, limit, cursor, table=""):
    """Rows newest first by `table`'s seq (which `sql` selects), after `cursor`;
    returns (rows, next_cursor). `args` are named."""
    if cursor is not None:
        sql, args = sql + f" AND {table}seq < :cursor", {**args, "cursor": int(cursor)}
    rows = conn.execute(sql + f" ORDER BY {table}seq DESC LIMIT :limit", {**args, "limit": limit + 1}).fetchall()
    return rows[:limit], (str(rows[limit - 1]["seq"]) if len(rows) > limit else None)


def rows_in(conn, table, column, values):
    """The rows of `table` whose `column` is one of `values`, in one query."""
    if not values:
        return []
    marks = ", ".join("?" * len(values))
    return query_db(conn, f"SELECT * FROM {table} WHERE {column} IN ({marks})", tuple(values))


def pause_by_id(conn, pause_id):
    return query_db(conn, "SELECT * FROM pauses WHERE id = ?", (pause_id,), one=True)


def migrate(conn):
    """Create the schema on a fresh database, or apply the migrations it lacks."""
    with transaction(conn):
        done = applied_schema(conn)
        if done is None:
            with open(SCHEMA_PATH, encoding="utf-8") as f:
                for statement in split_sql(f.read()):
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (MIGRATIONS[-1][0], db_time()))
            return
        for number, sql in MIGRATIONS:
            if number <= done:
                continue
            if callable(sql):           # one that SQL alone cannot do
                sql(conn)
            else:
                for statement in split_sql(sql):
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (number, db_time()))
    if done < MIGRATIONS[-1][0]:        # once it is committed: an operator looking back finds when, and from what
        log.warning("upgraded the database %s from schema %d to %d", database_file(conn), done, MIGRATIONS[-1][0])


def applied_schema(conn):
    """The newest migration the database has had, or None for a fresh one. One a newer
    PausePoint has migrated is refused: this code would misread tables it does not know,
    and write rows the newer one would misread in turn. So is another application's: every
    PausePoint database has had schema_migrations since the first (migration 1), so one
    with tables but not that one is not ours to write our tables into."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'").fetchone():
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchone():
            raise ConfigError(f"{database_file(conn)} is not a PausePoint database (it has tables, but not"
                              " schema_migrations): name the server's with --db or database.path")
        return None
    done = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]
    if done > MIGRATIONS[-1][0]:
        raise ConfigError(f"{database_file(conn)} was last opened by a newer PausePoint (schema {done}; this one"
                          f" knows up to {MIGRATIONS[-1][0]}): run that version, or restore a backup made by this one")
    return done


def check_database(path):
    """applied_schema() of the database at `path` (None if there is none yet), read without
    changing it: before anything is made beside it, or a command copies or rotates for it."""
    if not os.path.isfile(path):       # none yet, or a directory: opening it says so (main())
        return None
    if os.path.exists(os.path.realpath(path) + "-journal"):     # beside the file, whatever link names it
        # A process stopped in the middle of a write in rollback-journal mode (a first start's
        # switch to WAL, killed) left its journal: only a connection that may write rolls it
        # back, as SQLite does on first reading the file. Read-only, every start failed.
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    with contextlib.closing(connect_read_only(path)) as conn:
        return applied_schema(conn)


def database_file(conn):
    """The file `conn` has open."""
    return conn.execute("PRAGMA database_list").fetchone()[2]


def refresh_statistics(conn):
    """ANALYZE, each index sampled rather than read whole (milliseconds, even for
    millions of rows). Without statistics the planner guesses, and on a big database
    it guessed a developer's whole audit log over the index of one pause. A failure (a
    full disk) is logged, not raised: the statistics help, and the server is needed more."""
    try:
        with transaction(conn):
            conn.execute("PRAGMA analysis_limit = 1000")
            conn.execute("ANALYZE")
    except sqlite3.OperationalError as e:
        log.warning("the query planner's statistics were not refreshed: %s", e)


def disk_short_of_room(config, wal):
    """Whether the database's disk has less free space than database.min_free_mb, once what
    its WAL holds uncopied (`wal`, a WalBacklog) is in the database file: the checkpoint may
    need that much for pages new to the file, and a full disk fails every write. No room at
    all is short of it whatever the reserve, 0 included."""
    disk = os.statvfs(os.path.dirname(wal.path))        # where SQLite writes: beside the file a link names
    room = disk.f_bavail * disk.f_frsize - wal.bytes()
    return room <= 0 or room < config["database.min_free_mb"] * 2**20


class WalBacklog:
    """What the database's WAL holds not yet copied into the database file: as the
    checkpoint job last found it (wal_checkpoint's frame counts), plus what the WAL file
    has grown by since; before any checkpoint, the whole file. Not the file's size alone:
    once copied, its frames are written over and it keeps its size. (Nor the wal-index in
    the -shm file: opening and closing it in this process would release SQLite's locks on
    it.) Frames written over the WAL's start after a checkpoint are counted at the next,
    a second later: so the reserve should exceed a second of writes, as 256 MiB does."""

    def __init__(self, database_path):
        self.path = os.path.realpath(database_path) + "-wal"
        self.uncopied, self.size_then = None, 0

    def size(self):
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def checkpointed(self, size_before, busy, frames, copied, frame_bytes):
        """What a checkpoint left, the file's size taken before it (so growth meanwhile counts).
        One that another connection's checkpoint kept from running (-1 frames) says nothing."""
        if not busy and frames >= 0:
            self.uncopied, self.size_then = max(frames - copied, 0) * frame_bytes, size_before

    def bytes(self):
        size = self.size()
        return size if self.uncopied is None else self.uncopied + max(0, size - self.size_then)


def require_room(short_of_room):
    """Refuse (507) what would add lasting data while the disk is short of room (as
    disk_short_of_room() found it). What is left is kept for the pauses already made: a full
    disk fails every write, a decision's too."""
    if short_of_room:
        raise ApiError(507, "storage_low", "the server's disk is nearly full, so it takes no new pauses or accounts"
                                           " until its operator frees space (database.min_free_mb); pauses already"
                                           " made are still decided", headers={"Retry-After": "60"})


# Why a write finds no room: a full disk (ENOSPC), a user's or a dataset's quota (EDQUOT: ZFS,
# XFS project quotas, a sized volume), a file-size limit (EFBIG: ulimit -f, LimitFSIZE=).
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def disk_is_full(error):
    """Whether `error` is a write refused for want of room: SQLite's SQLITE_FULL ("database
    or disk is full"), or its SQLITE_IOERR_WRITE ("disk I/O error"), which is all SQLite says
    of a write refused by a quota or a file-size limit (only ENOSPC is SQLITE_FULL to it), or
    its SQLITE_IOERR_SHMSIZE (the same words), a wal-index with no room to grow (as the first
    open after a clean stop makes it), or the system's NO_ROOM_ERRNOS. Not a bug to trace
    back, and it passes once the operator frees space (a failing disk says the same, and is
    better told in one line than a traceback a tick)."""
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        return (code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_WRITE, sqlite3.SQLITE_IOERR_SHMSIZE)
                or "disk is full" in str(error))
    return isinstance(error, OSError) and error.errno in NO_ROOM_ERRNOS


def database_locked(error):
    """Whether `error` is a write that waited lock_wait_seconds (see transaction()) for the
    database's write lock while another process held it (a sqlite3 shell with a transaction
    open, a VACUUM): not a bug to trace back, and it passes once that process lets go."""
    return (isinstance(error, sqlite3.OperationalError)
            and getattr(error, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED))


def write_refused(error):
    """Why the database refused a write, when that is no fault of ours: 'disk' (disk_is_full())
    or 'locked' (database_locked()); None for anything else."""
    return "disk" if disk_is_full(error) else "locked" if database_locked(error) else None


class WriteRefusals:
    """Which of the server's jobs cannot write, for a full disk or a write lock another
    process holds (write_refused()). Each says so in one line when it starts failing and one
    when it can write again, not a traceback a tick: on a full disk the log is often on that
    disk too."""

    FAILING = {"disk": "the database's disk is full or over a quota or file-size limit, or failing",
               "locked": "another process holds the database's write lock (a sqlite3 shell with a transaction"
                         " open, a VACUUM)"}
    RECOVERED = {"disk": "the database's disk has room", "locked": "the other process let go of the database"}

    def __init__(self):
        self.failing, self.lock = {}, threading.Lock()

    def failed(self, what, error):
        why = write_refused(error)
        with self.lock:
            new = self.failing.get(what) != why
            self.failing[what] = why
        if new:
            log.warning("%s cannot write, %s (%s): it tries again each time and says here when it can",
                        what, self.FAILING[why], error)

    def succeeded(self, what):
        with self.lock:
            why = self.failing.pop(what, None)
        if why is not None:
            log.warning("%s can write again: %s", what, self.RECOVERED[why])


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
    # isoformat() and fromisoformat(): strftime() and strptime() cost 5 and 13 µs, a
    # create formats four times and reads one back.
    return moment.isoformat(timespec="milliseconds")[:23] + "Z"


def parse_db_time(text):
    return dt.datetime.fromisoformat(text)


def api_time(text):
    """Stored time as the API shows it: '2026-05-08T18:00:00Z'."""
    return None if text is None else text[:19] + "Z"


def new_id(prefix):
    return prefix + uuid.uuid4().hex


def new_ordered_id(prefix):
    """An id of the same form whose first 12 hex digits are the time in milliseconds (the
    other 80 bits random): for rows written in bursts, each new key lands at the end of
    its index instead of on a random page of it."""
    return f"{prefix}{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


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


# C0 and C1 controls but newline and tab, the line and paragraph separators, the
# Bidi_Control characters, which make text read differently from what it is (the
# "Trojan Source" trick), and the tag characters, invisible copies of ASCII that can
# smuggle text past a reader.
UNSAFE_CHARACTERS = ("\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                     "\U000e0000-\U000e007f")
UNSAFE_TEXT = re.compile(f"[{UNSAFE_CHARACTERS}]")
# Each of them as its JSON escape (\\u007f), for str.translate(): a call per character
# took an audit export with 16 KB of DEL characters in each pause's metadata 11.5 s of CPU.
UNSAFE_ESCAPES = {code: json.dumps(chr(code))[1:-1]
                  for first, last in re.findall("(.)(?:-(.))?", UNSAFE_CHARACTERS, re.DOTALL)
                  for code in range(ord(first), ord(last or first) + 1)}
# The same, for JSON Schema: text with none of those, and text with something visible too,
# read as spaces, the first visible character, the rest. (Written as a visible character
# between two runs of any, they took time quadratic in the length of a text that then
# failed: 27 s of CPU for an option of 60,000 characters. Written with a look-ahead, they
# made Schemathesis's run against POST /v1/pause take 9.7 s instead of 0.9 s.)
SAFE_TEXT = f"^[^{UNSAFE_CHARACTERS}]*$"
VISIBLE_TEXT = f"^[^\\S{UNSAFE_CHARACTERS}]*[^\\s{UNSAFE_CHARACTERS}][^{UNSAFE_CHARACTERS}]*$"
# And on one line, for what a text message lists inside a line of its own (options, field
# labels and choices), where a line break could start a line that seems to be ours. ((?!\n)
# because Python's $, unlike JavaScript's, also matches before a final line break.)
ONE_LINE_TEXT = f"^[^\\S\\n\\t{UNSAFE_CHARACTERS}]*[^\\s{UNSAFE_CHARACTERS}][^\\n\\t{UNSAFE_CHARACTERS}]*(?!\\n)$"
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(value, path=""):
    """Where in a parsed JSON value a string holds a lone UTF-16 surrogate ('\\ud800'),
    which JSON can spell but no text encoding can store: 'options[1]', or None."""
    if isinstance(value, str):
        return path or "body" if LONE_SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            at = f"{path}.{key}" if path else key
            if LONE_SURROGATE.search(key):
                return path or "body"
            found = lone_surrogate_at(item, at)
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate_at(item, f"{path}[{index}]")
            if found:
                return found
    return None


def not_json(constant):
    """json.loads accepts NaN and Infinity, which are not JSON: stored, they would make
    every answer and webhook that echoes them unreadable to strict parsers."""
    raise ValueError(f"{constant} is not JSON")


# The longest number a JSON error quotes back: one longer is named by its length.
NUMBER_QUOTED_AT_MOST = 40


def finite_float(text):
    """A JSON number, which 1e400 is not once read: it would come back out as Infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large a number" if len(text) <= NUMBER_QUOTED_AT_MOST
                         else f"a number of {len(text)} characters is too large")
    return value


def whole_number(text):
    """A JSON whole number. Python reads at most so many digits (4,300), and its own refusal
    tells the sender to change a setting of the server's."""
    digits, most = len(text.lstrip("-")), sys.get_int_max_str_digits()
    if most and digits > most:
        raise ValueError(f"a number of {digits} digits is too long to read")
    return int(text)


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


def mode_name(livemode):
    return "live" if livemode else "test"


# One plain address: no display names, groups, comments or lists, which mail headers
# would read as several recipients or none. Nor "=?" in its local part: Python's mail
# headers decode an RFC 2047 word there ('=?utf-8?q?eve=40evil.example=3E?=.b@example.com'
# is mailed to eve@evil.example), which an address never holds. Nor % or !, which relays that
# honour the old source routes (Postfix's percent hack, on by default; bang paths) read as
# another host to send it on to: 'eve%evil.example@example.com' may reach eve@evil.example.
EMAIL = re.compile(r"^(?![^@]*=\?)[A-Za-z0-9.#$&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$")


def new_api_key(livemode):
    return ("pp_live_" if livemode else "pp_test_") + "".join(
        secrets.choice(KEY_ALPHABET) for _ in range(KEY_RANDOM_CHARS))


def key_digest(key):
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_hint(key):
    return key[:8] + "…" + key[-4:]


def issue_key(conn, developer_id, livemode):
    """Create and store a new working key; the caller revokes any old one first."""
    require_transaction(conn)
    key = new_api_key(livemode)
    conn.execute("INSERT INTO api_keys (key_hash, developer_id, livemode, hint, created_at) VALUES (?, ?, ?, ?, ?)",
                 (key_digest(key), developer_id, livemode, key_hint(key), db_time()))
    return key


def check_registration(email, name, password):
    """REGISTRATION_SCHEMA, and what it cannot say: bcrypt reads 72 bytes at most."""
    validate_body(REGISTRATION_SCHEMA, {"email": email, "name": name, "password": password})
    check_new_password(password)


def check_new_password(password):
    """A password as registration takes it. One that replaces another is checked alone: the
    developer's name and email met the rules of the day they registered."""
    validate_body({"type": "object", "properties": {"password": REGISTRATION_SCHEMA["properties"]["password"]}},
                  {"password": password})
    if len(password.encode("utf-8")) > 72:
        raise invalid("password", "password must be at most 72 bytes (bcrypt's limit)")


def check_new_developer(config, email, name, password, plan):
    """What registering a developer refuses without looking at the database."""
    check_registration(email, name, password)
    if plan not in plans(config):
        raise invalid("plan", f"plan must be one of: {', '.join(sorted(plans(config)))}")


def register_developer(conn, config, email, name, password, plan="free"):
    """Create a developer with one live and one test key; returns the quickstart's response."""
    check_new_developer(config, email, name, password, plan)
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


@functools.lru_cache(maxsize=None)
def stand_in_password_hash(rounds):
    """Checked when the email is unknown, at the configured cost, so a wrong email and
    a wrong password take the same time."""
    return bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds))


def check_password(conn, config, email, password):
    """The developer row if email and password match, else None."""
    if not isinstance(email, str) or not isinstance(password, str):
        return None
    row = conn.execute("SELECT * FROM developers WHERE email = ?", (email.strip(),)).fetchone()
    secret = password.encode("utf-8")[:72]
    if row is None:
        bcrypt.checkpw(secret, stand_in_password_hash(config["security.bcrypt_rounds"]))
        return None
    # A hash made before security.bcrypt_rounds was raised checks faster than the stand-in, or
    # the time would tell who has an account. Stand-ins at each cost from its own up to the
    # setting's make up the difference exactly (2^c + 2^c + 2^(c+1) + … + 2^(s-1) = 2^s): one at
    # the setting's cost on top took half as long again as an unknown email (c = s - 1). One made
    # at a higher cost still takes longer, until its password is next given and hashed again.
    for cost in range(bcrypt_cost(row["password_hash"]), config["security.bcrypt_rounds"]):
        bcrypt.checkpw(secret, stand_in_password_hash(cost))
    if not bcrypt.checkpw(secret, row["password_hash"].encode()):
        return None
    checked = row["password_hash"]
    if bcrypt_cost(checked) != config["security.bcrypt_rounds"]:
        checked = rehash_password(conn, config, row, secret)
    # With the hash the password was checked against: a sign-in made with it holds only while
    # it is still the developer's (start_session()).
    return None if checked is None else {**dict(row), "password_hash": checked}


def rehash_password(conn, config, developer, secret):
    """Hash a developer's password again at security.bcrypt_rounds, once they have given
    it: a raised cost then protects them too, and their checks take the stand-in's time
    alone. Unless the hash changed meanwhile; returns the hash `secret` opens the account
    with now, or None: a password change made while this one was hashed ended every
    sign-in, and the old password must not make a new one."""
    password_hash = bcrypt.hashpw(secret, bcrypt.gensalt(config["security.bcrypt_rounds"])).decode()
    with transaction(conn):
        if conn.execute("UPDATE developers SET password_hash = ? WHERE id = ? AND password_hash = ?",
                        (password_hash, developer["id"], developer["password_hash"])).rowcount:
            return password_hash
        current = query_db(conn, "SELECT password_hash FROM developers WHERE id = ?", (developer["id"],), one=True)
    # By a password change, or by another sign-in hashing the same password again: only the
    # first turns it away.
    if current is None or not bcrypt.checkpw(secret, current["password_hash"].encode()):
        return None
    return current["password_hash"]


def password_unchanged(conn, developer_id, password_hash):
    """Whether the developer's password is still the one hashed as `password_hash`: a change
    committed while the old one was checked (bcrypt takes its time) ended every sign-in, and
    what the old password was given for must not come after it."""
    return conn.execute("SELECT 1 FROM developers WHERE id = ? AND password_hash = ?",
                        (developer_id, password_hash)).fetchone() is not None


def require_password_unchanged(conn, developer):
    """401, inside the caller's transaction, unless `developer` (as check_password() returned
    it) still has the password that was checked."""
    require_transaction(conn)
    if not password_unchanged(conn, developer["id"], developer["password_hash"]):
        raise ApiError(401, "unauthorized", "email or password is wrong")


def bcrypt_cost(password_hash):
    """The cost factor a bcrypt hash was made with ('$2b$12$…' -> 12)."""
    return int(password_hash.split("$")[2])


def working_key_hints(conn, developer_id):
    """{livemode: the hint of that mode's working key}."""
    return {row["livemode"]: row["hint"] for row in query_db(
        conn, "SELECT livemode, hint FROM api_keys WHERE developer_id = ? AND revoked_at IS NULL", (developer_id,))}


def rotate_key(conn, developer, livemode):
    """Revoke the working key of one mode and return its replacement, in one transaction,
    with the webhook endpoints the revoked key pointed (see endpoints_set_by()); 401 if
    the password checked for it (`developer`'s password_hash) was changed since."""
    with transaction(conn):
        require_password_unchanged(conn, developer)
        old = conn.execute("SELECT hint FROM api_keys WHERE developer_id = ? AND livemode = +? AND revoked_at IS NULL",
                           (developer["id"], livemode)).fetchone()
        conn.execute("UPDATE api_keys SET revoked_at = ? WHERE developer_id = ? AND livemode = +? AND revoked_at IS NULL",
                     (db_time(), developer["id"], livemode))
        key = issue_key(conn, developer["id"], livemode)
        endpoints = endpoints_set_by(conn, developer["id"], livemode, f"api:{old['hint']}") if old else []
        record_event(conn, developer["id"], livemode, f"developer:{developer['email']}", "key.rotated",
                     data={"mode": mode_name(livemode), "revoked_key": old["hint"] if old else None,
                           "new_key": key_hint(key), "endpoints_it_set": [e["webhook_id"] for e in endpoints]})
    return key, endpoints


# Who last set an endpoint's {field} (made the endpoint, or changed it), by the audit log.
LAST_SET_BY = (
    "(SELECT a.actor FROM audit_events a WHERE a.developer_id = :developer AND a.livemode = +:livemode"
    " AND a.event_type IN ('webhook.created', 'webhook.updated') AND json_extract(a.data, '$.webhook_id') = w.id"
    " AND (a.event_type = 'webhook.created' OR EXISTS (SELECT 1 FROM json_each(a.data, '$.changed')"
    "  WHERE value = '{field}')) ORDER BY a.seq DESC LIMIT 1)")
ENDPOINTS_SET_BY = (
    "SELECT w.id AS webhook_id, w.url FROM webhooks w WHERE w.developer_id = :developer AND w.livemode = +:livemode"
    f" AND w.deleted_at IS NULL AND :actor IN ({LAST_SET_BY.format(field='url')},"
    f" {LAST_SET_BY.format(field='secret')}) ORDER BY w.seq")


def endpoints_set_by(conn, developer_id, livemode, actor):
    """The developer's endpoints in a mode whose URL or secret `actor` (an API key) set last:
    once that key is rotated, perhaps because it leaked, whoever held it may have pointed them
    anywhere, where they go on receiving the mode's events with the links that answer its
    pauses, or know the secret that signs them, and so send their receiver events of their own."""
    return [dict(row) for row in conn.execute(ENDPOINTS_SET_BY, {"developer": developer_id, "livemode": livemode,
                                                                  "actor": actor})]


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who a request speaks for: a developer (whose account's email is `email`), in one mode,
    through one API key or (with key_hint None) signed in to the dashboard."""
    developer_id: str
    livemode: int
    key_hint: str
    plan: str
    email: str = None

    @property
    def actor(self):
        return f"api:{self.key_hint}" if self.key_hint else f"dashboard:{self.email}"

    @property
    def whose(self):
        """Where a 404 looked, as the caller knows it."""
        return "for this API key" if self.key_hint else f"in your account's {MODE_NAMES[self.livemode]} mode"


def bearer_key(authorization):
    """The key an 'Authorization: Bearer pp_…' header carries (the scheme in any case), or ''."""
    scheme, _, key = (authorization or "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def authenticated(rt):
    """authenticate() this request's Authorization, telling rt.vouched what it found."""
    header = request_header("Authorization")
    key = bearer_key(header)
    try:
        caller = authenticate(rt.db(), header)
    except ApiError:
        if key:
            rt.vouched.found(key, False)
        raise
    rt.vouched.found(key, True)
    return caller


def authenticate(conn, authorization):
    """The Caller for an 'Authorization: Bearer pp_…' header, or ApiError 401."""
    key = bearer_key(authorization)
    if not key:
        raise ApiError(401, "unauthorized", "send your API key as 'Authorization: Bearer pp_live_…' or 'pp_test_…'")
    digest = key_digest(key)
    row = conn.execute(
        "SELECT k.key_hash, k.developer_id, k.livemode, k.hint, d.plan, d.email FROM api_keys k"
        " JOIN developers d ON d.id = k.developer_id WHERE k.key_hash = ? AND k.revoked_at IS NULL",
        (digest,)).fetchone()
    # The lookup is by digest, so timing reveals nothing about the key; the
    # constant-time compare keeps it that way if the lookup ever changes.
    if row is None or not hmac.compare_digest(row["key_hash"], digest):
        raise ApiError(401, "unauthorized", unknown_key_message(key))
    return Caller(row["developer_id"], row["livemode"], row["hint"], row["plan"], row["email"])


def unknown_key_message(key):
    """Why a key was refused, saying what to send instead: a pasted webhook secret, a quoted
    key or another service's key is told apart from one of ours that was rotated or is another
    server's (the prefix is public, so saying which reveals nothing)."""
    if not key.startswith(("pp_live_", "pp_test_")):
        return ("this is not a PausePoint API key: keys start with pp_live_ or pp_test_, as"
                " POST /v1/auth/register returned them (send the key alone, without quotes)")
    return ("this API key is not one this server issued, or it was rotated: send the api_key or"
            " test_api_key this server gave you")


###############################################################################
# Dashboard sign-ins and passwords
###############################################################################

# A sign-in's last_seen_at is written at most this often, so reading pages is not a write each.
SESSION_TOUCH_EVERY = dt.timedelta(minutes=1)


def start_session(conn, developer, livemode=0, password_hash=None, replacing=None):
    """Sign a developer in: (cookie token, CSRF token). Given the password_hash a password
    was checked against, None unless it is still theirs: a password change committed while
    the old one was checked ended every sign-in, this one too. Only the token's digest is stored.
    The sign-in whose token the browser held (`replacing`) ends: its cookie is overwritten, and
    it would otherwise stay good, unseen, until its time ran out."""
    token, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), db_time()
    with transaction(conn):
        if password_hash is not None and not password_unchanged(conn, developer["id"], password_hash):
            return None
        if replacing:
            conn.execute("DELETE FROM dashboard_sessions WHERE token_hash = ?", (key_digest(replacing),))
        conn.execute("INSERT INTO dashboard_sessions (token_hash, developer_id, csrf_token, livemode, created_at,"
                     " last_seen_at) VALUES (?, ?, ?, ?, ?, ?)", (key_digest(token), developer["id"], csrf, livemode,
                                                                  now, now))
    return token, csrf


def session_for(conn, config, token):
    """The sign-in behind a cookie token, joined with its developer, or None: unknown,
    ended, or past the idle or absolute limit (then deleted)."""
    if not token:
        return None
    digest, now = key_digest(token), utcnow()
    row = query_db(conn, "SELECT s.*, d.email, d.name, d.plan, d.is_operator FROM dashboard_sessions s"
                         " JOIN developers d ON d.id = s.developer_id WHERE s.token_hash = ?", (digest,), one=True)
    if row is None or not hmac.compare_digest(row["token_hash"], digest):
        return None
    idle = dt.timedelta(minutes=config["dashboard.session_idle_minutes"])
    lifetime = dt.timedelta(hours=config["dashboard.session_max_hours"])
    if parse_db_time(row["last_seen_at"]) + idle <= now or parse_db_time(row["created_at"]) + lifetime <= now:
        end_session(conn, token)
        return None
    if parse_db_time(row["last_seen_at"]) + SESSION_TOUCH_EVERY <= now:
        with transaction(conn):
            conn.execute("UPDATE dashboard_sessions SET last_seen_at = ? WHERE token_hash = ?", (db_time(now), digest))
    return row


def end_session(conn, token):
    with transaction(conn):
        conn.execute("DELETE FROM dashboard_sessions WHERE token_hash = ?", (key_digest(token),))


def set_session_mode(conn, token, livemode):
    with transaction(conn):
        conn.execute("UPDATE dashboard_sessions SET livemode = ? WHERE token_hash = ?", (livemode, key_digest(token)))


DEVICE_LIFETIME = dt.timedelta(days=365)


def remember_device(conn, token, developer_id, password_hash=None):
    """Note that the browser with device cookie `token` (a new one if None) signed in as
    this developer; returns the token. Only its digest is kept, and only the developer's
    DEVICES_PER_DEVELOPER that signed in last: a stolen cookie cannot be multiplied into budgets.
    Given the password_hash a password was checked against, None unless it is still theirs:
    a change committed since the sign-in started forgot their browsers, and ended that sign-in."""
    with transaction(conn):
        if password_hash is not None and not password_unchanged(conn, developer_id, password_hash):
            return None
        # Only a token this server gave out is kept: not one from elsewhere, or long forgotten.
        if not (token and query_db(conn, "SELECT 1 FROM dashboard_devices WHERE token_hash = ?",
                                   (key_digest(token),), one=True)):
            token = secrets.token_urlsafe(32)
        conn.execute("INSERT INTO dashboard_devices (token_hash, developer_id, signed_in_at) VALUES (?, ?, ?)"
                     " ON CONFLICT DO UPDATE SET signed_in_at = excluded.signed_in_at",
                     (key_digest(token), developer_id, db_time()))
        conn.execute("DELETE FROM dashboard_devices WHERE developer_id = :developer AND token_hash NOT IN"
                     " (SELECT token_hash FROM dashboard_devices WHERE developer_id = :developer"
                     "  ORDER BY signed_in_at DESC LIMIT :kept)", {"developer": developer_id, "kept": DEVICES_PER_DEVELOPER})
    return token


DEVICES_PER_DEVELOPER = 10


def device_knows(conn, token, email):
    """Whether the device cookie `token` signed in as the developer with this email before."""
    if not token:
        return False
    return query_db(conn, "SELECT 1 FROM dashboard_devices v JOIN developers d ON d.id = v.developer_id"
                          " WHERE v.token_hash = ? AND d.email = ? AND v.signed_in_at > ?",
                    (key_digest(token), email.strip(), db_time(utcnow() - DEVICE_LIFETIME)), one=True) is not None


def change_password(conn, config, developer, new_password, device=None, turn=None, actor=None):
    """Set a new password (the old one already checked), end every sign-in of the developer
    and forget the browsers they used but `device`, the one that changed it; `actor` says
    who, if not the developer. The hash is made in `turn` (a context manager: a server's
    hashing turn), the checks before it."""
    check_new_password(new_password)
    with turn or contextlib.nullcontext():
        password_hash = bcrypt.hashpw(new_password.encode("utf-8"), bcrypt.gensalt(config["security.bcrypt_rounds"]))
    with transaction(conn):
        if actor is None:       # the developer, by their old password; an operator's change needs none
            require_password_unchanged(conn, developer)
        conn.execute("UPDATE developers SET password_hash = ? WHERE id = ?", (password_hash.decode(), developer["id"]))
        conn.execute("DELETE FROM dashboard_sessions WHERE developer_id = ?", (developer["id"],))
        # Browsers that knew the old password start again with the email's budget.
        conn.execute("DELETE FROM dashboard_devices WHERE developer_id = ? AND token_hash != ?",
                     (developer["id"], key_digest(device or "")))
        for livemode in (0, 1):
            record_event(conn, developer["id"], livemode, actor or f"developer:{developer['email']}",
                         "password.changed")


###############################################################################
# The operator: plans, who may register, who operates
###############################################################################

def registration_open(conn, config):
    """(open?, where that comes from: 'dashboard' when the operator set it there, else 'config')."""
    row = query_db(conn, "SELECT value FROM server_settings WHERE key = 'registration.open'", one=True)
    return (json.loads(row[0]), "dashboard") if row else (config["registration.open"], "config")


def set_registration_open(conn, is_open, operator_id, operator_email):
    """Open or close sign-up, as the operator did on the dashboard, noting it in their live audit log."""
    actor = f"operator:{operator_email}"
    with transaction(conn):
        record_event(conn, operator_id, 1, actor, "registration.changed", data={"open": bool(is_open)})
        conn.execute("INSERT INTO server_settings (key, value, changed_by, changed_at)"
                     " VALUES ('registration.open', ?, ?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                     " changed_by = excluded.changed_by, changed_at = excluded.changed_at",
                     (json.dumps(bool(is_open)), actor, db_time()))


def change_plan(conn, config, email, plan, actor):
    """Move a developer to another plan, noting it in their live audit log."""
    if plan not in plans(config):
        raise invalid("plan", f"unknown plan {plan!r}; the config defines: {', '.join(sorted(plans(config)))}")
    with transaction(conn):
        row = query_db(conn, "UPDATE developers SET plan = ? WHERE email = ? RETURNING id", (plan, email), one=True)
        if row is None:
            raise ApiError(404, "not_found", f"no developer with email {email}")
        record_event(conn, row["id"], 1, actor, "plan.changed", data={"plan": plan})


def set_operator(conn, email, is_operator):
    with transaction(conn):
        if conn.execute("UPDATE developers SET is_operator = ? WHERE email = ?", (int(is_operator), email)).rowcount != 1:
            raise ApiError(404, "not_found", f"no developer with email {email}")


def developers_with_usage(conn, limit, cursor, now=None):
    """Developers, newest first, with their live and test pauses this month: (rows, next_cursor)."""
    now = now or utcnow()
    return newest_first(conn, "SELECT rowid AS seq, id, email, name, plan, is_operator, created_at,"
                              " coalesce((SELECT live_pauses FROM monthly_usage u WHERE u.developer_id = d.id"
                              "  AND u.month = :usage_month), 0) AS live_this_month,"
                              " (SELECT count(*) FROM pauses p WHERE p.developer_id = d.id AND p.livemode = 0"
                              "  AND p.created_at >= :month) AS test_this_month"
                              " FROM developers d WHERE 1",
                        {"month": db_time(month_start(now)), "usage_month": usage_month(now)}, limit, cursor)


###############################################################################
# The audit log
###############################################################################

# Every event_type record_event() writes, for the audit log's filter: a misspelt one is
# refused, not answered with no events. (tests/test_audit_chain.py checks the calls.)
AUDIT_EVENT_TYPES = (
    "pause.created", "pause.responded", "pause.timed_out", "pause.cancelled", "pause.vote", "pause.reminded",
    "pause.escalated", "pause.reminder_skipped", "pause.escalation_skipped", "respond_page.opened",
    "notification.sent", "notification.failed", "notification.simulated", "webhook.created", "webhook.updated",
    "webhook.deleted", "webhook.disabled", "webhook.delivery_failed", "key.rotated", "password.changed",
    "registration.changed", "plan.changed")


def record_event(conn, developer_id, livemode, actor, event_type, pause_id=None, data=None, when=None):
    """Append one audit event, inside the transaction of the change it records, chained to
    the developer's previous event in that mode (see audit_hash())."""
    record_events(conn, [(developer_id, livemode, actor, event_type, pause_id, data, when)])


def record_events(conn, events):
    """Append audit events, each (developer_id, livemode, actor, event_type, pause_id, data,
    when) as record_event() takes them, in that order, in one statement: a round of
    timeouts writes hundreds, and a statement each let the thread signing the next round's
    receipts take the interpreter from it between each two."""
    require_transaction(conn)
    rows = []
    for developer_id, livemode, actor, event_type, pause_id, data, when in events:
        chain = (developer_id, livemode)
        # A batch (a round of timeouts) writes many events to one chain: the head is read once.
        prev_hash, prev_time = conn.audit_heads.get(chain) or audit_chain_head(conn, developer_id, livemode)
        # Never before the event before it (a create reads the clock before it takes the write
        # lock), so a window of time is always an unbroken stretch of the chain.
        event = (developer_id, livemode, max(when or db_time(), prev_time or ""), actor, event_type, pause_id,
                 audit_data_json(data or {}))
        event_hash = audit_hash(prev_hash, *event)
        rows.append((*event, prev_hash, event_hash))
        conn.audit_heads[chain] = (event_hash, event[2])
    conn.executemany(
        "INSERT INTO audit_events (developer_id, livemode, timestamp, actor, event_type, pause_id, data, prev_hash,"
        " hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def audit_data_json(data):
    """An event's data as stored: other scripts as UTF-8, not as \\u escapes, which take an
    emoji 12 bytes instead of 4 (a simulated email's event was three times its text), but what
    would make an export read as something else still escaped (json_for_reading()). ASCII only
    for a lone surrogate (an older version let some into pauses), which UTF-8 cannot hold."""
    text = json_for_reading(data)
    return json.dumps(data, separators=(",", ":")) if LONE_SURROGATE.search(text) else text


# Each developer's events in each mode form one chain: every event carries the hash of the one
# before it (the first, this) and its own, so a changed, removed or reordered event breaks the
# chain where it was, and a truncated log no longer reaches a head noted earlier.
AUDIT_GENESIS = "0" * 64


def audit_hash(prev_hash, developer_id, livemode, timestamp, actor, event_type, pause_id, data):
    """An audit event's hash: the hex SHA-256 of its fields as netstrings, one after another:
    each field's UTF-8 bytes preceded by their length in decimal and ':' and followed by ','
    ('5:hello,'), in this order: prev_hash, developer_id, livemode ('1' or '0'), timestamp (as
    stored and exported: '2026-11-29T15:04:05.123Z'), actor, event_type, pause_id ('' for none),
    data (the event's JSON text exactly as stored, exported as data_json). Any language can
    rebuild it from an export, and no two different events give the same bytes."""
    fields = (prev_hash, developer_id, str(livemode), timestamp, actor, event_type, pause_id or "", data)
    encoded = [field.encode("utf-8", "surrogatepass") for field in fields]
    return hashlib.sha256(b"".join(b"%d:%s," % (len(field), field) for field in encoded)).hexdigest()


def audit_chain_head(conn, developer_id, livemode):
    """(The hash of the chain's latest event, or AUDIT_GENESIS before its first; its time)."""
    latest = query_db(conn, "SELECT hash, timestamp FROM audit_events WHERE developer_id = ? AND livemode = +?"
                            " ORDER BY seq DESC LIMIT 1", (developer_id, livemode), one=True)
    if latest is None:
        return AUDIT_GENESIS, None
    # An event written around record_event() (by hand) has no hash: chain on from nothing, which
    # verify-audit then reports there, rather than refuse every change of that developer's.
    return latest[0] or "", latest[1]


def chain_audit_events(conn):
    """Migration 13: give every existing audit event its place in its chain, oldest first."""
    conn.execute("ALTER TABLE audit_events ADD COLUMN prev_hash TEXT")
    conn.execute("ALTER TABLE audit_events ADD COLUMN hash TEXT")
    conn.execute("DROP TRIGGER audit_events_are_never_updated")
    heads, chained = {}, []
    for row in audit_events_in_order(conn):
        chain = (row["developer_id"], row["livemode"])
        prev_hash = heads.get(chain, AUDIT_GENESIS)
        heads[chain] = audit_hash(prev_hash, *hashed_fields(row))
        chained.append((prev_hash, heads[chain], row["seq"]))
        if len(chained) >= AUDIT_READ_PAGE:
            conn.executemany("UPDATE audit_events SET prev_hash = ?, hash = ? WHERE seq = ?", chained)
            chained = []
    conn.executemany("UPDATE audit_events SET prev_hash = ?, hash = ? WHERE seq = ?", chained)
    conn.execute("CREATE TRIGGER audit_events_are_never_updated BEFORE UPDATE ON audit_events"
                 " BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END")
    # Test-mode events are now pruned as the oldest part of their chain (prune_expired_data).
    conn.execute("DROP INDEX audit_test_without_pause")
    conn.execute("CREATE INDEX audit_test_by_age ON audit_events(timestamp) WHERE livemode = 0")


def audit_chain_breaks(conn, events=None):
    """Check every chain in the database (or `events`, as audit_events_in_order() reads
    them): [(seq, developer_id, livemode, why)] for the first event that breaks each broken
    one; empty when all hold. A live chain must start at AUDIT_GENESIS; a test chain may
    start later, its oldest events pruned past retention, also while it is read."""
    breaks, heads, broken = [], {}, set()
    for row in audit_events_in_order(conn) if events is None else events:
        chain = (row["developer_id"], row["livemode"])
        if chain in broken:
            continue
        expected, before = heads.get(chain, (AUDIT_GENESIS if row["livemode"] else row["prev_hash"], None))
        if row["prev_hash"] != expected and not row["livemode"] and before is not None and query_db(
                conn, "SELECT 1 FROM audit_events WHERE seq = ?", (before,), one=True) is None:
            # The event read before is gone too: pruning took the chain's oldest part while it
            # was read in pages (a prefix: had it taken only what came after, that would be here).
            expected = row["prev_hash"]
        why = ("its prev_hash is not the hash of the event before it: an event was removed or moved"
               if row["prev_hash"] != expected else
               "its content does not give its hash: it was changed"
               if audit_hash(row["prev_hash"], *hashed_fields(row)) != row["hash"] else None)
        if why:
            breaks.append((row["seq"], *chain, why))
            broken.add(chain)
        heads[chain] = (row["hash"], row["seq"])
    return breaks


def hashed_fields(row):
    """An audit row's fields that audit_hash() takes after prev_hash, in its order."""
    return tuple(row[name] for name in ("developer_id", "livemode", "timestamp", "actor", "event_type", "pause_id",
                                        "data"))


def audit_events_in_order(conn, where="1", args=()):
    """The audit events matching `where`, oldest first, read a page at a time: a whole log is
    never held in memory, nor one read kept open while it is written out."""
    after = 0
    while rows := query_db(conn, f"SELECT * FROM audit_events WHERE {where} AND seq > ? ORDER BY seq LIMIT ?",
                           (*args, after, AUDIT_READ_PAGE)):
        yield from rows
        after = rows[-1]["seq"]


def audit_page(conn, caller, event_type=None, pause_id=None, limit=50, cursor=None):
    """The caller's audit events, newest first, optionally of one type or pause:
    (rows, next_cursor)."""
    # One pause's events are a handful: their own index, whatever the statistics say
    # (a guess from stale ones could read the owner's millions of rows instead).
    table = "audit_events INDEXED BY audit_by_pause" if pause_id else "audit_events"
    sql = f"SELECT * FROM {table} WHERE developer_id = :developer AND livemode = +:livemode"
    args = {"developer": caller.developer_id, "livemode": caller.livemode}
    for name, value in (("event_type", event_type), ("pause_id", pause_id)):
        if value:
            sql, args[name] = sql + f" AND {name} = :{name}", value
    return newest_first(conn, sql, args, limit, cursor)


def all_audit_events(conn, caller, event_type=None, pause_id=None):
    """Every such event, newest first, read a page at a time: a download of a year's
    events holds neither them all in memory nor one read transaction throughout."""
    cursor = None
    while True:
        rows, cursor = audit_page(conn, caller, event_type, pause_id, AUDIT_READ_PAGE, cursor)
        yield from rows
        if cursor is None:
            return


AUDIT_READ_PAGE = 1000


def audit_event_json(row):
    return {
        "id": f"aud_{row['seq']}",
        "timestamp": api_time(row["timestamp"]),
        "actor": row["actor"],
        "event_type": row["event_type"],
        "pause_id": row["pause_id"],
        "livemode": bool(row["livemode"]),
        "data": json.loads(row["data"]),
        "prev_hash": row["prev_hash"],
        "hash": row["hash"],
    }


###############################################################################
# The pause lifecycle: the only place a pause changes state
###############################################################################

STATUSES = ("pending", "responded", "timed_out", "cancelled")
MAX_METADATA_BYTES = 16 * 1024
IDEMPOTENCY_WINDOW = dt.timedelta(hours=24)
MIN_TIMEOUT_SECONDS = 1.0


# Deeper than anyone writes by hand, well inside what SQLite's JSON functions read (1,000).
MAX_METADATA_NESTING = 32


def nesting(value):
    """How deep objects and arrays go in a JSON value: 0 for a scalar. A level at a time, not
    by recursion, which ran out of stack (a 500) on metadata nested 900 deep."""
    depth, level = 0, [value]
    while containers := [item for item in level if isinstance(item, (dict, list))]:
        depth += 1
        level = [child for item in containers for child in (item.values() if isinstance(item, dict) else item)]
    return depth


def pause_fields(body, config):
    """What pause_request_schema cannot say about a POST /v1/pause body already checked
    against it; returns the clean fields or raises 422 naming the field."""
    message = body["message"]
    options = distinct_options(body["options"])
    default = body.get("timeout_default")
    if default is not None and default.strip() not in options:
        raise invalid("timeout_default", f"timeout_default {shorten(default)!r} must be one of the options, exactly as"
                                         f" written: {', '.join(options)} (or left out)")
    metadata = body.get("metadata")
    if metadata is not None and nesting(metadata) > MAX_METADATA_NESTING:     # first: writing JSON recurses
        raise invalid("metadata", f"metadata must be nested at most {MAX_METADATA_NESTING} levels deep")
    if metadata is not None and len(compact_json(metadata).encode("utf-8")) > MAX_METADATA_BYTES:
        raise invalid("metadata", f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")
    shown = (metadata or {}).get("display", [])
    if not (isinstance(shown, list) and len(shown) <= 10 and all(isinstance(key, str) and key in metadata
                                                                  and key != "display" for key in shown)):
        raise invalid("metadata", 'metadata\'s "display" must list up to 10 of its other keys, to show the human')
    minutes = body["timeout_hours"] * 60
    people, escalations = asked_people(body, config), escalation_steps(body.get("escalation"), config, minutes)
    everyone = [*people, *((recipient, channel) for _, recipient, channel in escalations)]
    different_people(people, "recipients", config)
    different_people(everyone, "escalation", config)
    if any(channels(config)[channel].kind == "twilio" for _, channel in everyone):
        refuse_options_a_reply_misreads(options)
    if len(everyone) > MAX_PEOPLE:
        raise invalid("escalation", f"a pause may ask at most {MAX_PEOPLE} people, escalation targets included")
    quorum = body.get("quorum")
    if quorum is not None:
        quorum = {"choice": quorum["choice"].strip(), "count": int(quorum["count"])}
        if quorum["choice"] not in options:
            raise invalid("quorum", f"quorum's choice {shorten(quorum['choice'])!r} must be one of the options, exactly"
                                    f" as written: {', '.join(options)}")
        if quorum["count"] > len(everyone):
            raise invalid("quorum", f"quorum's count must be at most the {len(everyone)} people asked"
                                    " (escalation targets included)")
    reminders = sorted(set(body.get("remind_after_minutes") or ()))
    if reminders and reminders[-1] >= minutes:
        raise invalid("remind_after_minutes", "remind_after_minutes must each be before the timeout"
                                              f" ({minutes:g} minutes)")
    return {"recipient": people[0][0], "channel": people[0][1], "message": message, "options": options,
            "timeout_seconds": body["timeout_hours"] * 3600,
            "timeout_default": default.strip() if default is not None else None, "metadata": metadata,
            "title": body.get("title"), "fields": declared_fields(body.get("fields"), config),
            # A team pause keeps its people, and their votes, in pause_recipients.
            "team": "recipients" in body or quorum is not None or bool(escalations),
            # Where the body names each person's recipient, for a refusal of one of them.
            "named_as": [f"recipients[{n}].recipient" for n in range(len(people))] if "recipients" in body
            else ["recipient"],
            "people": people, "quorum": quorum, "reminders": reminders, "escalations": escalations}


def asked_people(body, config):
    """[(recipient, channel)]: the one person a pause asks, or its `recipients`."""
    if "recipients" not in body:
        return [(body["recipient"].strip(), body["channel"])]
    if "recipient" in body or "channel" in body:
        raise invalid("recipients", "give recipient and channel, or recipients, not both")
    return [checked_person(person, config, f"recipients[{n}]") for n, person in enumerate(body["recipients"])]


def escalation_steps(escalation, config, minutes):
    """[(after_minutes, recipient, channel)], earliest first, each before the timeout."""
    steps = []
    for n, step in enumerate(escalation or ()):
        if step["after_minutes"] >= minutes:
            raise invalid(f"escalation[{n}].after_minutes", f"an escalation must come before the timeout ({minutes:g}"
                                                            " minutes)")
        recipient, channel = checked_person(step, config, f"escalation[{n}]")
        if channels(config)[channel].render is None:
            raise invalid(f"escalation[{n}].channel", "an escalation must send its target the question; the link"
                                                      " channel sends nothing")
        steps.append((step["after_minutes"], recipient, channel))
    return sorted(steps, key=lambda step: step[0])


def refuse_options_a_reply_misreads(options):
    """422 for options that a text reply naming one would take for another (reply_choice()):
    a reply of '3' is the third option, so with options '3', '2', '1' the person who texts
    back 3 gets 1; and 'Go!' is read as 'Go'. Nor may one begin or end with what reads as a
    reply code (split_reply_code()): 'Deny B5' texted back is 'Deny' for the pause coded B5,
    which may be another's."""
    for option in options:
        taken = reply_choice(option, options)
        if taken is not None and taken != option:
            raise invalid("options", f"a text reply of {option!r} would choose {taken!r}: an option that is a"
                                     f" number must be in its own place (\"1\" first), and none may differ from"
                                     " another only by a final . or !")
        code, rest = split_reply_code(option)
        if code is not None:
            raise invalid("options", f"a text reply of {option!r} would be read as {rest!r} for the pause whose"
                                     f" reply code is {code}: an option may not begin or end with a letter and a"
                                     " digit standing apart, as reply codes do")


def checked_person(person, config, where):
    """(recipient, channel) of one of a list's people, checked as a lone recipient is."""
    try:
        validate_body(person_schema(config), person)
    except ApiError as e:
        raise invalid(f"{where}.{e.field}", e.message) from None
    return person["recipient"].strip(), person["channel"]


def different_people(people, field, config):
    """Refuse the same person twice: one person must not cast two votes. A push target is
    one place whoever reads it reads every link sent there, whatever recipient names
    it: two people on it would be two votes in the hands of each of its readers."""
    seen = set()
    for recipient, channel in people:
        pushed = channels(config)[channel].kind == "apprise"
        reached = ("push", push_target(config[f"channels.{channel}.url"])) if pushed else recipient.casefold()
        if reached in seen:
            raise invalid(field, f"push target {channel!r} is asked twice; whoever reads it would hold both links,"
                                 " so it may be asked once" if pushed
                          else f"{recipient} is asked twice; each person may be asked once")
        seen.add(reached)


@functools.lru_cache(maxsize=64)
def push_target(url):
    """Where a push target's URL sends, however it is spelt: two channels the operator named
    apart may be one place (discord://ID/TOKEN and https://discord.com/api/webhooks/ID/TOKEN
    are one webhook). Apprise's own URL for it, without its options (?format=… and the like)."""
    return load_apprise().Apprise.instantiate(url).url(privacy=False).partition("?")[0]


def declared_fields(fields, config):
    """A pause's fields as FIELDS_SCHEMA lets them through, checked for what it cannot say:
    limits that fit the type, values within them, and a respond form that fits in a
    request. Returns them with `editable` said."""
    if not fields:
        return None
    for name, field in fields.items():
        def refuse(problem):
            return invalid(f"fields.{name}", f"fields.{name}: {problem}")
        wrong = sorted(set(field) - {"type", "value", "editable", "label"} - FIELD_LIMITS[field["type"]])
        if wrong:
            raise refuse(f"a {field['type']} field takes no {', '.join(wrong)}")
        if field["type"] == "enum" and "choices" not in field:
            raise refuse("an enum field needs its choices")
        if any(choice != choice.strip() for choice in field.get("choices", ())):
            raise refuse("choices must not begin or end with spaces")
        problem = look_alike_problem(field.get("choices", ()), "choices")
        if problem:
            raise refuse(problem)
        for bound in ("min", "max"):
            if bound in field and number_problem(field["type"], field[bound]):
                raise refuse(f"{bound} {number_problem(field['type'], field[bound])}")
        if field.get("min", -math.inf) > field.get("max", math.inf):
            raise refuse("min must not be above max")
        problem = field_value_problem(field, field["value"])
        if problem:
            raise refuse(f"value {problem}")
    fields = {name: {**field, "value": typed_value(field, field["value"]), "editable": field.get("editable", False)}
              for name, field in fields.items()}
    if respond_form_bytes(fields) > config["server.max_body_bytes"]:
        raise invalid("fields", "fields: the respond page's form for these fields could be larger than the server"
                                f" takes ({config['server.max_body_bytes']} bytes); give editable text fields a"
                                " smaller max_length, or fewer of them")
    return fields


# Whole numbers a field may hold: the ones a double, and so any JSON reader, holds exactly.
MAX_SAFE_INTEGER = 2 ** 53 - 1


def number_problem(kind, value):
    """What is wrong with `value` as a number of a field of type `kind`, or None."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole and not (isinstance(value, float) and math.isfinite(value)):
        return "must be a whole number" if kind == "integer" else "must be a number"
    # A whole number too big to hold exactly, as given or as a form's text read into a double.
    if abs(value) > MAX_SAFE_INTEGER and (whole or kind == "integer" and value.is_integer()):
        return f"must be a number between -{MAX_SAFE_INTEGER} and {MAX_SAFE_INTEGER}"
    if kind == "integer" and not (whole or value.is_integer()):
        return "must be a whole number"
    return None


def field_value_problem(field, value):
    """What is wrong with `value` for `field`, as the end of a sentence, or None."""
    kind = field["type"]
    if kind == "boolean":
        return None if isinstance(value, bool) else "must be true or false"
    if kind == "enum":
        return None if value in field["choices"] else f"must be one of: {', '.join(field['choices'])}"
    if kind == "string":
        limit = field.get("max_length", MAX_FIELD_TEXT)
        if not isinstance(value, str) or len(value) > limit or UNSAFE_TEXT.search(value):
            return f"must be text of at most {limit} characters, without control characters"
        return None
    problem = number_problem(kind, value)
    if problem:
        return problem
    low, high = field.get("min"), field.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            return f"must be from {plain_number(low)} to {plain_number(high)}"
        return f"must be at least {plain_number(low)}" if low is not None else f"must be at most {plain_number(high)}"
    return None


def plain_number(number):
    return str(typed_value({"type": "number"}, number))


def typed_value(field, value):
    """A number's 300.0 (from a form, say) is 300, while it is a whole number a double holds exactly."""
    numeric = field["type"] in ("number", "integer") and isinstance(value, float)
    return int(value) if numeric and value.is_integer() and abs(value) <= MAX_SAFE_INTEGER else value


def form_text(value):
    """A field's value as the respond page's form carries it."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


# The most a browser sends for one character of a text field: a 3-byte UTF-8 character, percent-encoded.
FORM_BYTES_PER_CHARACTER = 9
# The rest of the respond form: a choice, a comment of up to 2,000 characters, the separators.
RESPOND_FORM_BYTES = 2000 * FORM_BYTES_PER_CHARACTER + 1024


def respond_form_bytes(fields):
    """The most the respond page's form can weigh with these fields, as a browser encodes it."""
    total = RESPOND_FORM_BYTES
    for name, field in fields.items():
        if field["editable"]:
            longest = max(map(len, [form_text(field["value"]), *field.get("choices", ())])) + 30
            text = field.get("max_length", MAX_FIELD_TEXT) if field["type"] == "string" else longest
            total += len(urllib.parse.quote(f"field.{name}")) + 2 + text * FORM_BYTES_PER_CHARACTER
    return total


def edit_fields(fields, edits):
    """The fields after the approver's `edits` ({name: value}), and what changed
    ({name: {"old", "new"}}); 422 naming the field for a field that is not there or
    not editable, or a value outside its bounds."""
    final, edited = {name: dict(field) for name, field in (fields or {}).items()}, {}
    for name, value in (edits or {}).items():
        field = final.get(name)
        if field is None:
            raise invalid(f"fields.{name}", f"this request has no field {name!r}")
        problem = field_value_problem(field, value)
        if not problem and typed_value(field, value) == field["value"]:
            continue                    # sent back as it was: no change, whether it may change or not
        if not field["editable"]:
            raise invalid(f"fields.{name}", f"{field.get('label', name)} may not be changed")
        if problem:
            raise invalid(f"fields.{name}", f"{field.get('label', name)} {problem}")
        refuse_a_look_alike(name, field, value, [field["value"]])
        edited[name] = {"old": field["value"], "new": typed_value(field, value)}
        field["value"] = edited[name]["new"]
    return final, edited


def refuse_a_look_alike(name, field, value, values):
    """422 for a text field's new `value` that reads as one of `values` (its value as asked,
    or another approval's) without being it: 'Acme Cоrp' with a Cyrillic о, or a space
    more. Whoever reads it takes it for that value: shown as an earlier approval's change
    ("changed payee from Acme Corp to Acme Cоrp") and filled in, it would be approved as
    the value it mimics."""
    if field["type"] != "string":
        return
    mixed = mixed_script_word(value)
    if mixed:
        raise invalid(f"fields.{name}", f"{field.get('label', name)} must not mix alphabets within a word ({mixed!r}"
                                        " does), which makes look-alikes")
    seen = text_as_seen(value)
    if any(value != other and seen == text_as_seen(other) for other in values):
        raise invalid(f"fields.{name}", f"{field.get('label', name)} must differ visibly from the value it"
                                        " replaces or another approval's, not only in look-alike letters, invisible"
                                        " characters or spaces")


# Alphabets with letters drawn alike; words mixing CJK and Latin ('OKです') are ordinary.
LOOK_ALIKE_SCRIPTS = {"LATIN", "CYRILLIC", "GREEK", "ARMENIAN", "CHEROKEE", "COPTIC"}


def mixed_script_word(text):
    """A word with letters of more than one script ('Apprօve' with an Armenian օ): the
    usual way to make one option look like another past any fixed list of look-alikes."""
    for word in re.findall(r"[^\W\d_]+", text):
        scripts = {unicodedata.name(c, "?").split()[0] for c in word} & LOOK_ALIKE_SCRIPTS
        if len(scripts) > 1:
            return word
    return None


def distinct_options(options):
    """The options, stripped, if each shows something in one script a word and no two
    look alike; else 422."""
    problem = look_alike_problem(options, "options")
    if problem:
        raise invalid("options", problem)
    return [option.strip() for option in options]


def look_alike_problem(texts, what):
    """Why some of `texts` (`what`: the options, or a field's choices) would not each show
    something, in one script a word, unlike the others; or None."""
    seen = [option_identity(text) for text in texts]
    if not all(seen):
        return f"{what} must be visible text, not only invisible characters"
    mixed = next(filter(None, map(mixed_script_word, texts)), None)
    if mixed:
        return f"{what} must not mix alphabets within a word ({mixed!r} does), which makes look-alikes"
    if len(set(seen)) != len(seen):
        return (f"{what} must be distinct, and look distinct: they may not differ only in case, accents,"
                " invisible characters or Unicode look-alike forms")
    return None


# Characters drawn as nothing that are not format characters (the rest of Unicode's
# Default_Ignorable_Code_Point).
INVISIBLE = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2800\u3164\ufe00-\ufe0f\uffa0"
                       "\U000e0100-\U000e01ef]")
# Letters, digits and signs drawn as a Latin letter or a digit, under the one they are drawn as:
# every character that Unicode's confusables data (UTS #39) maps to one alone, less those NFKC
# already turns into it. Not only Cyrillic and Greek: 'ᎪᏟᎷᎬ' is ACME in Cherokee letters, a word
# of one alphabet, and Lisu's capitals are Latin ones drawn again ('ACMꓰ' is not even mixed).
# The ASCII ones drawn alike are folded as the standard folds them: I, 1 and | into l, 0 into O.
LOOK_ALIKES = str.maketrans({look_alike: drawn_as for drawn_as, look_alikes in {
    "A": "ΑАᎪᗅꓮ𐊠𖽀", "a": "ɑαа⍺", "B": "ΒВᏴᗷꓐꞴ𐊂𐊡𐌁", "b": "ƄЬᏏᑲᖯ", "C": "СᏟⲤꓚ𐊢𐌂𐐕𐔜𑣩𑣲🝌", "c": "сᴄⲥꮯ𐐽", "D": "Ꭰᗞᗪꓓ",
    "d": "ԁᏧᑯꓒ", "E": "ΕЕᎬ⋿ⴹꓰ𐊆𑢦𑢮", "e": "еҽ℮ꬲ", "F": "ϜᖴꓝꞘ𐊇𐊥𐔥𑢢𑣂𝈓", "f": "քẝꞙꬵ", "G": "ԌᏀᏳꓖ", "g": "ƍɡցᶃ",
    "H": "ΗНᎻᕼⲎꓧ𐋏", "h": "һհᏂ", "i": "ıɩɪιіӏᎥ⍳ꙇꭵ𑣃", "J": "ͿЈᎫᒍꓙꞲ", "j": "ϳј", "K": "ΚКᏦᛕⲔꓗ𐔘", "k": "κ",
    "L": "ᏞᒪⳐꓡ𐐛𐔦𑢣𑢲𖼖𝈪", "l": "1I|ƖǀΙІӀ۱ᛁ∣⏽Ⲓⵏꓲ𐊊𐌉𐌠𖼨", "M": "ΜϺМᎷᗰᛖⲘꓟ𐊰𐌑", "N": "ΝⲚꓠ𐔓", "n": "ոռ",
    "O": "0ΟОՕ০ଠ୦ዐⲞⵔ〇ꓳ𐊒𐊫𐐄𐓂𐔖𑓐𑢵𑣠", "o": "οσоօ۵०੦૦௦\u0c02౦\u0c82೦\u0d02ഠ൦\u0d82๐໐ဝ၀ჿᴏᴑⲟꬽ𐐬𐓪𑣈𑣗", "P": "ΡРᏢᑭⲢꓑ𐊕",
    "p": "ρр⍴ⲣ", "Q": "ⵕ", "q": "ԛգզ", "R": "ƦᎡᏒᖇꓣ𐒴𖼵𝈖", "r": "гᴦⲅꭇꭈꮁ", "S": "ЅՏᏕᏚꓢ𐊖𐐠𖼺", "s": "ƽѕꜱꮪ𐑈𑣁",
    "T": "ΤТᎢ⊤⟙Ⲧꓔ𐊗𐊱𐌕𑢼𖼊🝨", "U": "Սሀᑌ∪⋃ꓴ𐓎𑢸𖽂", "u": "ʋυսᴜꞟꭎꭒ𐓶𑣘", "V": "Ѵ۷Ꮩᐯⴸꓦꛟ𐔝𑢠𖼈𝈍", "v": "νѵᴠ∨⋁ꮩ𑜆𑣀", "W": "ԜᎳᏔꓪ𑣦𑣯",
    "w": "ɯѡԝաᴡꮃ𑜊𑜎𑜏", "X": "ΧХ᙭ᚷ╳ⲬⵝꓫꞳ𐊐𐊴𐌗𐌢𐔧𑣬", "x": "×хᕁᕽ᙮⤫⤬⨯", "Y": "ΥУҮᎩᎽⲨꓬ𐊲𑢤𖽃", "y": "ɣʏγуүყᶌỿꭚ𑣜", "Z": "ΖᏃꓜ𐋵𑢩𑣥",
    "z": "ᴢꮓ𑣄", "2": "ƧϨᒿꙄꛯꝚ", "3": "ƷȜЗӠⳌꝪꞫ𑣊𖼻𝈆", "4": "Ꮞ𑢯", "5": "Ƽ𑢻", "6": "бᏮⳒ𑣕", "7": "𐓒𑣆𝈒",
    "8": "Ȣȣ৪੪\u0b03𐌚", "9": "৭੧୨൭ⳊꝮ𑢬𑣌𑣖"
}.items() for look_alike in look_alikes})


def option_identity(option):
    """What a person sees an option as: 'Reject', 'reject', 'Reject' with a zero-width
    space, 'Rеject' with a Cyrillic е and 'Rejėct' with a dot above its ė look alike on a
    button and to an SMS reply, so they are the same option. (Only options and choices lose
    their marks: a field's value edited from Jose to José is another value.)"""
    marked = unicodedata.normalize("NFD", text_as_seen(option))
    return "".join(c for c in marked if unicodedata.category(c) != "Mn").casefold()


def text_as_seen(text):
    """Text as a reader tells it apart: without invisible characters, compatibility forms
    (a fullwidth Ａ is A), letters drawn as others (LOOK_ALIKES: a Cyrillic а is a, a 1 is l),
    or runs of spaces and line breaks, which a page shows as one space."""
    visible = INVISIBLE.sub("", "".join(c for c in text if unicodedata.category(c) != "Cf"))
    return " ".join(unicodedata.normalize("NFKC", visible).translate(LOOK_ALIKES).split())


def compact_json(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def readable_text(text):
    """Free-form text a person reads, with what would make it read as something else
    (UNSAFE_TEXT) shown as U+FFFD."""
    return UNSAFE_TEXT.sub("\ufffd", text)


def json_for_reading(value, indent=None):
    """JSON a person reads: other scripts as themselves, but what would make it read as
    something else (UNSAFE_TEXT) as its escape, which says the same and is not obeyed."""
    text = json.dumps(value, indent=indent, separators=None if indent else (",", ":"), ensure_ascii=False)
    return text.translate(UNSAFE_ESCAPES)


def request_fingerprint(body):
    """What tells one create's body from another's, for its Idempotency-Key: the JSON's values,
    not how they were written. 4 and 4.0 are one number in JSON (and in the request's schema),
    though Python reads them as int and float: a retry that a client library wrote again as
    4.0 is the same request, not one to refuse as another body."""
    def alike(value):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, dict):
            return {name: alike(item) for name, item in value.items()}
        return [alike(item) for item in value] if isinstance(value, list) else value

    return hashlib.sha256(json.dumps(alike(body), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def month_start(moment):
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def create_pause(conn, config, caller, body, idempotency_key, limiter, wal):
    """Store a pause, its notification and its audit event in one transaction; `body` is
    the request's UncheckedBody, `wal` the database's WalBacklog.

    Returns (pause row, replayed): replayed is True when an Idempotency-Key
    matched an earlier identical request and nothing new was created.
    """
    fingerprint, replayed = idempotent_replay(conn, caller, idempotency_key, body.value)
    if replayed is not None:
        return replayed, True
    asked = checked_request(config, caller, body.check(), idempotency_key)
    # Everything that needs no database is done before the write lock is taken: other
    # writers wait for it, so only the reads and writes that must be atomic go inside.
    now = utcnow()
    pause_id, token = new_ordered_id("psr_"), secrets.token_urlsafe(32)
    created_at = db_time(now)
    expires_at = db_time(now + dt.timedelta(seconds=asked["timeout_seconds"]))
    short_of_room = disk_short_of_room(config, wal)     # system calls, kept off the write lock too
    row = (pause_id, caller.developer_id, caller.livemode, asked["recipient"], asked["channel"], asked["title"],
           asked["message"], compact_json(asked["options"]), asked["timeout_default"],
           None if asked["metadata"] is None else compact_json(asked["metadata"]),
           None if asked["fields"] is None else compact_json(asked["fields"]), token, int(asked["team"]),
           None if asked["quorum"] is None else compact_json(asked["quorum"]))
    weight = 1 if caller.livemode else weight_in_test_mode(asked, row)
    audited = {"recipient": asked["recipient"], "channel": asked["channel"], "options": asked["options"],
               "timeout_default": asked["timeout_default"], "expires_at": api_time(expires_at),
               "metadata": asked["metadata"], **team_request(asked)}
    with transaction(conn):
        if idempotency_key is not None:
            earlier = earlier_idempotent_pause(conn, caller, idempotency_key, fingerprint, now)
            if earlier is not None:
                return earlier, True
        require_room(short_of_room)     # after the replay: a client whose answer was lost still learns its pause
        # Live pauses are bounded by the plan's quota, test pauses otherwise; replays by neither.
        if caller.livemode:
            spend_quota(conn, config, caller, now)
        else:
            check_test_allowance(conn, config, caller, limiter, weight)
        reply_code = (new_reply_code(conn, config, asked["recipient"], caller.livemode, caller.developer_id,
                                     asked["named_as"][0])      # SMS and WhatsApp replies name their pause by it
                      if channels(config)[asked["channel"]].kind == "twilio" else None)
        pause = conn.execute(
            "INSERT INTO pauses (id, developer_id, livemode, recipient, channel, title, message, options,"
            " timeout_default, metadata, fields, respond_token, team, quorum, reply_code, created_at, expires_at,"
            " test_weight) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " RETURNING *", (*row, reply_code, created_at, expires_at, weight)).fetchone()
        for position, ((recipient, channel_name), named_as) in enumerate(zip(asked["people"], asked["named_as"])):
            ask_person(conn, config, pause, position, recipient, channel_name, "request", created_at, named_as)
        conn.executemany("INSERT INTO pause_steps (pause_id, due_at, kind, recipient, channel) VALUES (?, ?, ?, ?, ?)",
                         [(pause_id, *step) for step in scheduled_steps(asked, now)])
        if idempotency_key is not None:
            # (Replacing the record of a request made with the key more than 24 hours ago.)
            conn.execute("INSERT OR REPLACE INTO idempotency_keys VALUES (?, ?, ?, ?, ?, ?)",
                         (caller.developer_id, caller.livemode, idempotency_key, fingerprint, pause_id, created_at))
        record_event(conn, caller.developer_id, caller.livemode, caller.actor, "pause.created", pause_id, audited,
                     when=created_at)
        wake_after_commit(conn, "created", (pause_id, caller.livemode))
        emit_pause_events(conn, config, [pause], "pause.created", when=created_at)
    return pause, False


# What one unit of a test pause's weight stands for: one message of up to this much of what
# the agent wrote (its question, title, options, fields and metadata, as stored). Each message
# is kept twice (its notification and its notification.simulated event), and an email shows
# nearly all of it: a ten-person pause with five reminders and a full 64 KiB body kept 10 MB.
TEST_WEIGHT_BYTES = 4 * 1024


def weight_in_test_mode(asked, row):
    """How much of a developer's test allowance a pause takes (pauses.max_test_pending,
    retention.test_pauses_kept, ratelimit.test_pauses_per_hour): the messages it may send
    (each person asked, escalations too, and reminded) times the 4 KiB units of what the
    agent wrote, so those bound what a developer's test pauses keep on disk, not only their
    count, and the 4 KiB units its answers may write (answer_room()). A question to one
    person, reminded never, with under 4 KiB written and no editable text field weighs 1."""
    messages = (len(asked["people"]) + len(asked["escalations"])) * (1 + len(asked["reminders"]))
    written = sum(len(value.encode("utf-8")) for value in row if isinstance(value, str))
    votes, room = answer_room(asked)
    return messages * (1 + written // TEST_WEIGHT_BYTES) + votes * -(-room // TEST_WEIGHT_BYTES)


def answer_room(asked):
    """(answers, bytes each may write) for a pause's decision: whoever holds a test pause's
    links, the agent that asked too, may answer it, filling each editable text field to its
    max_length with 4-byte characters, and what they write is kept in the pause, its edits,
    receipt, audit and webhook events (five nearly empty fields so filled kept 235 KiB of a
    pause weighing 1). A quorum takes up to its count of votes, each kept with its comment,
    and each vote's webhook event carries every vote before it (ten people commenting kept
    776 KiB of a pause weighing 10); a lone answer's comment fits in its pause's first unit."""
    fields = (asked["fields"] or {}).values()
    room = sum(max(0, 4 * field.get("max_length", MAX_FIELD_TEXT) - len(field["value"].encode("utf-8")))
               for field in fields if field["editable"] and field["type"] == "string")
    if asked["quorum"] is None or asked["quorum"]["count"] == 1:
        return 1, room
    return asked["quorum"]["count"], room + 4 * RESPONSE_SCHEMA["properties"]["comment"]["maxLength"]


def scheduled_steps(asked, now):
    """[(due_at, kind, recipient, channel)]: the reminders and escalations a pause asked for."""
    return [*((db_time(now + dt.timedelta(minutes=after)), "reminder", None, None) for after in asked["reminders"]),
            *((db_time(now + dt.timedelta(minutes=after)), "escalation", recipient, channel)
              for after, recipient, channel in asked["escalations"])]


def team_request(asked):
    """What a pause asked for beyond one question to one person, as its audit event says it."""
    return {**({"fields": asked["fields"]} if asked["fields"] else {}),
            **({"recipients": [{"recipient": r, "channel": c} for r, c in asked["people"]],
                "quorum": asked["quorum"]} if asked["team"] else {}),
            **({"remind_after_minutes": asked["reminders"]} if asked["reminders"] else {}),
            **({"escalation": [{"after_minutes": after, "recipient": r, "channel": c}
                               for after, r, c in asked["escalations"]]} if asked["escalations"] else {})}


def ask_person(conn, config, pause, position, recipient, channel_name, added_by, now, field="recipient"):
    """Ask one of a pause's people, inside the caller's transaction: a team pause gets their
    row (the first person's link and code are the pause's own), and their question is
    queued unless the channel is the link the agent delivers itself. `field` names the
    person in a refusal."""
    require_transaction(conn)
    if position == 0:
        token, code = pause["respond_token"], pause["reply_code"]
    else:
        token = secrets.token_urlsafe(32)
        code = (new_reply_code(conn, config, recipient, pause["livemode"], pause["developer_id"], field)
                if known_channel(config, channel_name).kind == "twilio" else None)
    if pause["team"]:
        conn.execute("INSERT INTO pause_recipients (pause_id, developer_id, position, livemode, recipient, channel,"
                     " respond_token, reply_code, added_by, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (pause["id"], pause["developer_id"], position, pause["livemode"], recipient, channel_name, token,
                      code, added_by, now))
    person = {**dict(pause), "recipient": recipient, "channel": channel_name, "respond_token": token,
              "reply_code": code, "position": position}
    queue_notification(conn, config, person, "ask", now)
    return person


def queue_notification(conn, config, person, kind, now, render=None):
    """Queue a message to one of a pause's people (as asked_of() shows them): the question,
    or what render(channel, person, url) makes of it. Returns False, having queued nothing,
    for the link channel, which the agent delivers itself."""
    channel = channel_of(conn, config, person["channel"], person["developer_id"])
    if channel.render is None:
        return False
    url = respond_url(config, person["respond_token"])
    text = render(channel, person, url) if render else channel.render(person, url)
    conn.execute("INSERT INTO notifications (id, pause_id, position, kind, developer_id, channel, recipient, livemode,"
                 " text, next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (new_id("ntf_"), person["id"], person["position"], kind, person["developer_id"], person["channel"],
                  person["recipient"], person["livemode"], text, now, now, now))
    return True


def asked_of(conn, pause, position):
    """The pause as its person at `position` was asked it (a dict): their recipient, channel,
    link and reply code in place of the first person's, and for a team pause their `vote`
    ({choice, voted_at} or None)."""
    asked = {**dict(pause), "position": position}
    if not pause["team"]:
        return asked
    person = query_db(conn, "SELECT * FROM pause_recipients WHERE pause_id = ? AND position = ?",
                      (pause["id"], position), one=True)
    asked.update({name: person[name] for name in ("recipient", "channel", "respond_token", "reply_code")},
                 vote=person["voted_at"] and {"choice": person["choice"], "comment": person["comment"],
                                              "voted_at": person["voted_at"]})
    return asked


def usable_channel(config, caller, name):
    """The named channel; 422 for a live pause on one the operator has not set up."""
    channel = channels(config)[name]
    missing = channel.missing_settings(config) if caller.livemode else None
    if missing:
        raise ApiError(422, "channel_not_configured",
                       f"channel {name!r} is not configured on this server for live pauses;"
                       f" the operator must set {all_of(missing)} (test keys work without them)", field="channel")
    return channel


def current_idempotency_key(conn, caller, key, now):
    """The record of the request made with this key in the last 24 h, or None."""
    row = conn.execute("SELECT * FROM idempotency_keys WHERE developer_id = ? AND livemode = +? AND key = ?",
                       (caller.developer_id, caller.livemode, key)).fetchone()
    return row if row is not None and parse_db_time(row["created_at"]) >= now - IDEMPOTENCY_WINDOW else None


def checked_request(config, caller, body, idempotency_key):
    """A create's body as pause_fields() makes it, once its channels are usable by the caller
    and its Idempotency-Key (or None) is one the header may carry; else 422."""
    asked = pause_fields(body, config)
    # Each channel once, in the order asked: the first refused is named.
    for name in dict.fromkeys(name for _, name in asked["people"] + [step[1:] for step in asked["escalations"]]):
        usable_channel(config, caller, name)
        refuse_a_text_too_long(config, asked, name)
    if idempotency_key is not None and not re.fullmatch("[\x20-\x7e]{1,255}", idempotency_key):
        raise invalid("Idempotency-Key", "the Idempotency-Key header must be 1-255 printable ASCII characters")
    return asked


# What Twilio takes in one message's body, in UTF-16 code units (an emoji counts two);
# past it every send of the question is refused (error 21617) and nobody is asked.
TEXT_MESSAGE_LIMIT = 1600


def refuse_a_text_too_long(config, asked, channel_name):
    """422 for a pause whose text on this SMS or WhatsApp channel, as sent with its options,
    fields, link and the longest reply code, and as a reminder repeats it, would not fit in
    one message: refused now, while the agent can shorten it, not at the send."""
    channel = channels(config)[channel_name]
    if channel.kind != "twilio":
        return
    timeout = dt.timedelta(seconds=asked["timeout_seconds"])
    longest = {"title": asked["title"], "message": asked["message"], "options": compact_json(asked["options"]),
               "reply_code": "X" * 3, "fields": None if asked["fields"] is None else compact_json(asked["fields"]),
               "expires_at": db_time(utcnow() + timeout)}
    text = channel.render(longest, respond_url(config, "x" * 43))
    if asked["reminders"]:
        # The first reminder says the most time left; the job may send it late, saying less.
        text = reminder_text(channel, longest, respond_url(config, "x" * 43),
                             longest_time_left(asked["timeout_seconds"] - 60 * min(asked["reminders"])))
    length = len(text.encode("utf-16-le")) // 2
    if length > TEXT_MESSAGE_LIMIT:
        sent = "as a reminder repeats it" if asked["reminders"] else "as a text"
        raise invalid("message", f"{sent} on {channel_name}, with its options, fields, link and reply instructions,"
                                 f" this question takes {length} characters, and a text holds {TEXT_MESSAGE_LIMIT}:"
                                 f" shorten the message by {length - TEXT_MESSAGE_LIMIT}")


def longest_time_left(seconds):
    """The longest human_duration() of any time up to `seconds`: less time can take more
    characters ('60.0 min' is less than '1.0 h')."""
    return max((human_duration(min(seconds, below)) for below in (seconds, 3599, 599, 59)), key=len)


def idempotent_replay(conn, caller, key, body):
    """For a create with an Idempotency-Key `key` (or None): the body's fingerprint, and the
    pause an identical request with it made in the last 24 h, or None. Looked up before any
    check of the body, its schema's included: a retry gets its pause even where this server
    would now refuse the request (its channel since unconfigured, or its timeout past a
    lowered pauses.max_timeout_hours, say), since the person was asked. Reads only:
    a request racing its retry is settled under the write lock (earlier_idempotent_pause()).
    A key or body no pause could have been made with finds none, and is refused afterwards."""
    if key is None:
        return None, None
    try:
        fingerprint = request_fingerprint(body)
    except RecursionError:      # nested past what the JSON writer takes, so past pause_fields()'s limit
        return None, None
    row = current_idempotency_key(conn, caller, key, utcnow())
    if row is None or not hmac.compare_digest(row["request_hash"], fingerprint):
        return fingerprint, None
    return fingerprint, pause_by_id(conn, row["pause_id"])


def earlier_idempotent_pause(conn, caller, key, fingerprint, now):
    """The pause an identical request with this key made in the last 24 h; 422 if the body differs."""
    row = current_idempotency_key(conn, caller, key, now)
    if row is None:
        return None
    if not hmac.compare_digest(row["request_hash"], fingerprint):
        raise ApiError(422, "idempotency_key_reused",
                       "this Idempotency-Key was used in the last 24 hours with a different request body",
                       field="Idempotency-Key")
    return pause_by_id(conn, row["pause_id"])


def spend_quota(conn, config, caller, now):
    """Count one more live pause this month for the caller, or refuse it: 429 once its
    plan's are used. Inside the create's transaction, so a create that fails counts none."""
    allowed = plans(config).get(caller.plan)
    if allowed is None:
        raise ApiError(403, "unknown_plan", f"your plan {caller.plan!r} is not configured on this server; ask the operator")
    used = live_pauses_this_month(conn, caller.developer_id, now)
    if used >= allowed:
        raise ApiError(429, "quota_exceeded",
                       f"the {caller.plan} plan allows {allowed} live pause{'' if allowed == 1 else 's'} per month"
                       " and this month's are used;"
                       " test keys are not counted, and the operator can change your plan")
    conn.execute("INSERT INTO monthly_usage VALUES (?, ?, 1)"
                 " ON CONFLICT DO UPDATE SET live_pauses = live_pauses + 1", (caller.developer_id, usage_month(now)))


def check_test_allowance(conn, config, caller, limiter=None, weight=1):
    """429 past the developer's test-pause rate (ratelimit.test_pauses_per_hour), or with
    pauses.max_test_pending test pauses pending: those are never pruned, and may wait up to
    pauses.max_timeout_hours. Both count a pause by its weight_in_test_mode(); one alone is always
    allowed, however much it weighs. The rate first: summing the pending takes the write lock
    for about 0.13 ms a thousand of them, so a refusal for them spends the rate too."""
    if limiter is not None:
        limiter.limit("test_pauses", caller.developer_id, config["ratelimit.test_pauses_per_hour"],
                      "test pauses for this developer (ratelimit.test_pauses_per_hour)", cost=weight)
    allowed = config["pauses.max_test_pending"]
    if not allowed:
        return
    pending = query_db(conn, "SELECT coalesce(sum(test_weight), 0) FROM pauses INDEXED BY pauses_test_weights"
                             " WHERE developer_id = ? AND livemode = 0 AND status = 'pending'",
                       (caller.developer_id,), one=True)[0]
    if pending and pending + weight > allowed:
        raise ApiError(429, "too_many_pending",
                       f"your test pauses pending weigh {pending}, and this one {weight}: more than the"
                       f" {allowed} allowed (pauses.max_test_pending; a pause weighs the messages it may send"
                       " times each 4 KiB it carries): cancel some, or wait for them to be decided or to time out")


def live_pauses_this_month(conn, developer_id, now):
    counted = query_db(conn, "SELECT live_pauses FROM monthly_usage WHERE developer_id = ? AND month = ?",
                       (developer_id, usage_month(now)), one=True)
    return counted[0] if counted else 0


def usage_month(moment):
    """The calendar month (UTC) a usage count is kept under: '2026-05', as db_time() begins."""
    return db_time(moment)[:7]


OVERVIEW_DAYS = 30
OUTCOMES = ("approved", "rejected", "timed_out", "cancelled", "pending")


def overview_figures(conn, config, caller, now=None):
    """The dashboard's overview of the caller's last OVERVIEW_DAYS days of pauses, by the
    day they were created: per day and outcome (a human's answer counts as approved
    when it is the first option, the affirmative one by convention, else rejected);
    seconds from creation to a human's answer (median, p90); the share of decided
    pauses decided by their timeout; live pauses this month against the plan."""
    now = now or utcnow()
    first_day = (now - dt.timedelta(days=OVERVIEW_DAYS - 1)).date()
    since, until = (db_time(dt.datetime.combine(day, dt.time(), dt.timezone.utc))
                    for day in (first_day, now.date() + dt.timedelta(days=1)))
    # Up to the end of now's day, and no further: a pause made just past midnight, or stamped
    # ahead by a clock set back since, has no day of its own in the chart.
    owner = {"developer": caller.developer_id, "livemode": caller.livemode, "since": since, "until": until}
    per_day = {first_day + dt.timedelta(days=n): dict.fromkeys(OUTCOMES, 0) for n in range(OVERVIEW_DAYS)}
    for row in query_db(conn, """
            SELECT substr(created_at, 1, 10) AS day,
                   CASE status WHEN 'responded' THEN
                       CASE WHEN choice = json_extract(options, '$[0]') THEN 'approved' ELSE 'rejected' END
                   ELSE status END AS outcome, count(*) AS n
            FROM pauses WHERE developer_id = :developer AND livemode = +:livemode AND created_at >= :since
              AND created_at < :until
            GROUP BY day, outcome""", owner):
        per_day[dt.date.fromisoformat(row["day"])][row["outcome"]] += row["n"]
    answered = "FROM pauses WHERE developer_id = :developer AND livemode = +:livemode AND created_at >= :since" \
               " AND created_at < :until AND status = 'responded'"
    count = query_db(conn, f"SELECT count(*) {answered}", owner, one=True)[0]

    def seconds_at(share):          # nearest-rank percentile, read from the sorted durations
        if not count:
            return None
        return query_db(conn, f"SELECT (julianday(decided_at) - julianday(created_at)) * 86400 AS s {answered}"
                              " ORDER BY s LIMIT 1 OFFSET :n", {**owner, "n": math.ceil(share * count) - 1},
                        one=True)[0]

    totals = {outcome: sum(day[outcome] for day in per_day.values()) for outcome in OUTCOMES}
    decided = sum(totals.values()) - totals["pending"]
    return {"per_day": per_day, "totals": totals, "answered": count,
            "median_seconds": seconds_at(0.5), "p90_seconds": seconds_at(0.9),
            "timed_out_share": totals["timed_out"] / decided if decided else None,
            "live_this_month": live_pauses_this_month(conn, caller.developer_id, now),
            "live_allowed": plans(config).get(caller.plan)}


def respond_url(config, token):
    return f"{base_url(config)}/respond/{token}"


# What a decision that changed no fields (a timeout, a cancel, an answer without edits)
# says was edited: nothing, or NULL for a pause without fields.
EDITED_NOTHING = "CASE WHEN fields IS NULL THEN NULL ELSE '{}' END"


def decide_pause(conn, config, pause_id, status, decided_by, choice=None, comment=None, data=None, now=None,
                 edits=None):
    """Move a pending pause to a final status, inside the caller's transaction; `edits`,
    from edit_fields(), are the approver's changes to its fields.

    Compare-and-set: only a pause still 'pending' changes, and a response or a cancel
    only before expires_at, a timeout only after it. Returns True if this call won;
    agents waiting on the pause wake once the transaction commits.
    """
    require_transaction(conn)
    now = now or db_time()
    final, edited = edits or (None, None)
    # Past expires_at the timeout is the outcome, as the person is told (refuse_if_decided()),
    # though the timeout job may not have recorded it yet: nothing else may decide it then.
    time_rule = "AND expires_at > :now"
    decided = conn.execute(
        f"UPDATE pauses SET status = :status, choice = :choice, comment = :comment, decided_at = :now,"
        f" decided_by = :decided_by, fields = coalesce(:fields, fields), edited = coalesce(:edited, {EDITED_NOTHING})"
        f" WHERE id = :id AND status = 'pending' {time_rule} RETURNING *",
        {"status": status, "choice": choice, "comment": comment, "now": now, "decided_by": decided_by,
         "id": pause_id, "fields": final and compact_json(final),
         "edited": compact_json(edited) if edited else None}).fetchall()
    record_decisions(conn, config, decided, data, now)
    return bool(decided)


def record_decisions(conn, config, decided, data, now):
    """What follows pauses leaving 'pending', inside the transaction that decided them:
    their receipts (but for those signed ahead), their unsent texts cancelled, an audit
    event each, webhook events, waiters woken."""
    if not decided:
        return              # nothing changed: nobody to wake (a wake-up makes every waiting agent look)
    ids = [pause["id"] for pause in decided]
    unsigned = [pause for pause in decided if pause["receipt"] is None]
    if unsigned and getattr(conn, "signer", None) is not None:
        receipts = conn.signer.sign_all([receipt_claims(pause, votes_of(conn, pause)) for pause in unsigned])
        conn.executemany("UPDATE pauses SET receipt = ? WHERE id = ?",
                         zip(receipts, (pause["id"] for pause in unsigned)))
    teams = [pause["id"] for pause in decided if pause["team"]]
    if teams:               # their people no longer await an answer (see schema.sql)
        conn.execute("UPDATE pause_recipients SET pause_decided_at = ? WHERE pause_id IN (SELECT value FROM json_each(?))",
                     (now, json.dumps(teams)))
    # A text not sent yet would ask a question that is already answered.
    conn.execute("UPDATE notifications SET status = 'cancelled', updated_at = ? WHERE status = 'queued'"
                 " AND pause_id IN (SELECT value FROM json_each(?))", (now, json.dumps(ids)))
    record_events(conn, [(pause["developer_id"], pause["livemode"], pause["decided_by"], f"pause.{pause['status']}",
                          pause["id"], {"choice": pause["choice"], "comment": pause["comment"],
                                        "decided_by": pause["decided_by"], **(data or {})}, now) for pause in decided])
    emit_pause_events(conn, config, decided, when=now)
    wake_after_commit(conn, "decisions", *ids)
    wake_after_commit(conn, "decided", *((pause["id"], pause["status"], pause["livemode"], pause["created_at"],
                                          pause["decided_at"], pause["expires_at"]) for pause in decided))


def receipt_claims(pause, votes=()):
    """What a decided pause's receipt says: that it is one (type), which question (by the
    SHA-256 of its message), its title and the details the respond page showed beside it,
    the options and any quorum, the outcome with its final fields, changes, the comment
    that came with it (by its SHA-256: a long one kept whole in every receipt would be kept
    twice more) and `votes` (votes_of()), who decided it and when, and whose it is (developer
    and mode). Whatever the agent reads as the answer is signed: a comment left out could be
    rewritten in the database ("only for staging" taken away) and the receipt still check."""
    return {"type": "receipt", "pause_id": pause["id"], "developer_id": pause["developer_id"],
            "message_sha256": hashlib.sha256(pause["message"].encode()).hexdigest(), "title": pause["title"],
            "details": shown_details(pause), "options": json.loads(pause["options"]),
            "quorum": json.loads(pause["quorum"] or "null"), "status": pause["status"], "choice": pause["choice"],
            "fields": json.loads(pause["fields"] or "null"), "edited": json.loads(pause["edited"] or "null"),
            "comment_sha256": comment_sha256(pause["comment"]), "votes": list(votes),
            "decided_by": pause["decided_by"], "decided_at": api_time(pause["decided_at"]),
            "livemode": bool(pause["livemode"])}


def comment_sha256(comment):
    """A comment as a receipt signs it: the hex SHA-256 of its UTF-8, or None for none."""
    return None if comment is None else hashlib.sha256(comment.encode("utf-8", "surrogatepass")).hexdigest()


def votes_of(conn, pause):
    """A team pause's votes as its receipt lists them, in the order they came; none for a
    pause asking one person."""
    if not pause["team"]:
        return []
    return [{"recipient": vote["recipient"], "choice": vote["choice"], "edits": json.loads(vote["edits"] or "null"),
             "comment_sha256": comment_sha256(vote["comment"]), "voted_at": api_time(vote["voted_at"])}
            for vote in query_db(conn, "SELECT * FROM pause_recipients WHERE pause_id = ? AND voted_at IS NOT NULL"
                                       " ORDER BY voted_at, position", (pause["id"],))]


def respond_to_pause(conn, config, token, choice, comment, client, edits=None):
    """A human's answer through their respond link, with their `edits` to the pause's
    fields ({name: value}): the pause as they were asked it (asked_of()), or 404/409/410/422.
    An unknown token is 404 whatever else is wrong, so every guess counts as one."""
    refuse_if_closed(pause_by_token(conn, token))
    validate_body(COMMENT_SCHEMA, {"comment": comment})     # the page's form comes unchecked
    comment = comment_kept(comment)
    with transaction(conn):
        pause = pause_by_token(conn, token)
        refuse_if_decided(pause)
        refuse_if_voted(pause)
        if not isinstance(choice, str) or choice.strip() not in json.loads(pause["options"]):
            raise invalid("choice", f"choice must be one of: {', '.join(json.loads(pause['options']))}")
        if not answer_pause(conn, config, pause, choice.strip(), comment, client, edits):
            # Between the read and the write nothing can change (we hold the write
            # lock), so losing here means the pause expired at this very instant.
            refuse_if_decided(pause_by_id(conn, pause["id"]), expired=True)
        return pause_by_token(conn, token)


def answer_pause(conn, config, pause, choice, comment, data, edits=None, now=None):
    """One of a pause's people (`pause` as asked_of() shows it) chooses, inside the caller's
    transaction, the pause read under it and still pending. A pause asking one person is
    decided; a team pause records the vote, then is decided when the quorum rule says so.
    Returns False when the pause could no longer be answered: it expired at this instant."""
    now = now or db_time()
    declared = json.loads(pause["fields"] or "null")
    final, edited = edit_fields(declared, edits)            # 422 for an edit out of bounds, before anything
    decided_by = f"recipient:{pause['recipient']}"
    if edited:
        data = {**data, "edited": edited}
    if not pause["team"]:
        return decide_pause(conn, config, pause["id"], "responded", decided_by, choice, comment, data=data, now=now,
                            edits=(final if declared else None, edited))
    if pause["expires_at"] <= now:
        return False
    if pause["quorum"] and choice == json.loads(pause["quorum"])["choice"]:
        approved = approved_values(conn, pause)     # this approval counts with theirs only if the same
        for name, change in edited.items():
            refuse_a_look_alike(name, declared[name], change["new"], approved.get(name, ()))
    record_vote(conn, config, pause, choice, comment, edited, data, now)
    votes = deciding_votes(conn, pause, choice, edited)
    if votes is None:
        return True                 # the quorum waits for more
    data = {**data, "votes": [{"recipient": vote["recipient"], "choice": vote["choice"],
                               "voted_at": api_time(vote["voted_at"])} for vote in votes]}
    return decide_pause(conn, config, pause["id"], "responded", decided_by, choice, comment, data=data, now=now,
                        edits=(final if declared else None, edited))


def record_vote(conn, config, pause, choice, comment, edited, data, now):
    """A team pause's person votes (once: refuse_if_voted() came first), with the audit event
    and the pause.vote event in the same transaction."""
    edits = approved_changes(edited)
    voted = conn.execute("UPDATE pause_recipients SET choice = ?, comment = ?, edits = ?, voted_at = ?"
                         " WHERE pause_id = ? AND position = ? AND voted_at IS NULL",
                         (choice, comment, edits and compact_json(edits), now, pause["id"], pause["position"])).rowcount
    if not voted:
        raise RuntimeError(f"{pause['id']} position {pause['position']} voted twice")
    # A reminder not sent yet would ask them a question they answered.
    conn.execute("UPDATE notifications SET status = 'cancelled', updated_at = ? WHERE pause_id = ? AND position = ?"
                 " AND status = 'queued'", (now, pause["id"], pause["position"]))
    record_event(conn, pause["developer_id"], pause["livemode"], f"recipient:{pause['recipient']}", "pause.vote",
                 pause["id"], {"recipient": pause["recipient"], "channel": pause["channel"], "choice": choice,
                               "comment": comment, **data}, when=now)
    emit_pause_events(conn, config, [pause], "pause.vote", when=now)


def deciding_votes(conn, pause, choice, edited):
    """The votes that decide a team pause on this vote (`edited`: its changes to the fields),
    oldest first, or None while its quorum waits for more: without a quorum the first vote
    decides; with one, `count` votes for its choice that approved the same values (so every
    value decided was approved by that many people), or at once any vote for something else
    (a veto)."""
    quorum = json.loads(pause["quorum"] or "null")
    votes = query_db(conn, "SELECT * FROM pause_recipients WHERE pause_id = ? AND choice = ? AND voted_at IS NOT NULL"
                           " ORDER BY voted_at, position", (pause["id"], choice))
    if quorum is None or choice != quorum["choice"]:
        return [vote for vote in votes if vote["position"] == pause["position"]]
    changes = approved_changes(edited) or {}
    alike = [vote for vote in votes if json.loads(vote["edits"] or "{}") == changes]
    return alike if len(alike) >= quorum["count"] else None


def latest_approved_changes(conn, pause):
    """For a pending team pause with fields and a quorum: the changes the latest vote for the
    quorum's choice made ({name: new value}; {} for none, or no such vote)."""
    if not (pause["team"] and pause["quorum"] and pause["fields"] and pause["status"] == "pending"):
        return {}
    latest = query_db(conn, "SELECT edits FROM pause_recipients WHERE pause_id = ? AND choice = ?"
                            " ORDER BY voted_at DESC, position DESC LIMIT 1",
                      (pause["id"], json.loads(pause["quorum"])["choice"]), one=True)
    return json.loads(latest["edits"] or "{}") if latest else {}


def approved_values(conn, pause):
    """For a pending team pause with fields and a quorum: {name: [each value an approval for the
    quorum's choice gave it]}, those the respond page may have filled in since."""
    if not (pause["team"] and pause["quorum"] and pause["fields"] and pause["status"] == "pending"):
        return {}
    offered = collections.defaultdict(list)
    for row in query_db(conn, "SELECT edits FROM pause_recipients WHERE pause_id = ? AND choice = ?"
                              " AND edits IS NOT NULL", (pause["id"], json.loads(pause["quorum"])["choice"])):
        for name, value in json.loads(row["edits"]).items():
            offered[name].append(value)
    return offered


def approved_changes(edited):
    """{name: new value} from edit_fields()'s record of changes; None for none."""
    return {name: change["new"] for name, change in edited.items()} if edited else None


def comment_kept(comment):
    """A human's comment as it is recorded: stripped, and None for none."""
    return comment.strip() or None if comment else None


def answered_alike(pause, choice, comment):
    """Whether this link's own recorded answer (`pause` as asked_of() shows it) is `choice`
    with `comment`: then an answer refused as too late repeats it (a double tap's second
    post, one sent again after a lost reply), and the first counted."""
    choice = choice.strip() if isinstance(choice, str) else choice
    if pause["team"]:
        mine = pause.get("vote")
        return bool(mine) and (mine["choice"], mine["comment"]) == (choice, comment_kept(comment))
    return (pause["status"] == "responded" and pause["decided_by"] == f"recipient:{pause['recipient']}"
            and (pause["choice"], pause["comment"]) == (choice, comment_kept(comment)))


def refuse_if_closed(pause):
    """409 or 410 for a pause its person can no longer answer, before anything is said of their
    answer: asked to correct a comment, they would try again on a request nobody can answer."""
    refuse_if_decided(pause)
    refuse_if_voted(pause)


def refuse_if_voted(pause):
    """409 for one of a team pause's people answering again."""
    if pause.get("vote"):
        raise ApiError(409, "already_voted", f"you already chose {pause['vote']['choice']!r} at"
                                             f" {api_time(pause['vote']['voted_at'])}; the request waits for the others")


# Reply codes name one pause in an SMS conversation: a letter and a digit ('K7'),
# a third letter only when a number has very many pauses pending. No I, L, O, 0
# or 1, which people misread.
REPLY_CODE_LETTERS = "ABCDEFGHJKMNPQRSTUVWXYZ"
REPLY_CODE_DIGITS = "23456789"
SHORT_REPLY_CODES = [a + b for a in REPLY_CODE_LETTERS for b in REPLY_CODE_DIGITS]                # 184
LONG_REPLY_CODES = [code + c for code in SHORT_REPLY_CODES for c in REPLY_CODE_LETTERS]            # 4,232
REPLY_CODE = re.compile(f"[{REPLY_CODE_LETTERS}][{REPLY_CODE_DIGITS}][{REPLY_CODE_LETTERS}]?", re.IGNORECASE)
REPLY_SEPARATORS = r"[\s,:;.\-]+"
# Longer than a code and any option (at most 100 characters) written out. The patterns that
# split a reply take time quadratic in its length: 30,000 spaces cost them 6.2 s of CPU.
MAX_SPLIT_REPLY = 160
MAX_CODES_LISTED = 5


REPLY_CODE_QUARANTINE = dt.timedelta(days=7)
# Random codes tried, this many short then as many long, in one query: while at most half
# of a length are taken, its draws all miss one time in 256. Then, before the number's codes
# are all read (13 ms for a number with 3,000 pending, under the write lock), this many more
# long ones: while five in six are taken, they all miss one time in 100,000.
REPLY_CODE_DRAWS, MORE_REPLY_CODE_DRAWS = 8, 64
# Whose codes a new one must differ from: for a live pause, those of every developer's live
# pauses to the number, since replies from it come to the server's one Twilio number; for a
# test pause, only those of its own developer's test pauses, which no reply ever answers, so
# another tenant's test pauses can never use up a number's codes. (The expression of the
# indexes that serve it: ':scope' is '' for live, else the developer's id.)
CODE_SCOPE = "recipient = :recipient AND livemode = +:livemode AND iif(livemode, '', developer_id) = :scope"
# A number's codes in use (pending, or decided in the last week), by mode: those of pauses
# that asked it first, and of team pauses that asked it later. Those of live pauses decided
# lately are found by decision time (pauses_closed_by_recipient), and pending ones through
# their own index, not by reading every code of the number's history (INDEXED BY: the
# planner chose that): with 100,000 decided pauses to it, that took 375 ms.
NUMBER_CODES = {livemode: (
    f"SELECT reply_code, status, decided_at FROM pauses INDEXED BY pauses_pending_reply_code WHERE {CODE_SCOPE}"
    f" AND reply_code IS NOT NULL AND status = 'pending' UNION ALL {decided_lately} UNION ALL"
    f" SELECT reply_code, 'pending', NULL FROM pause_recipients WHERE {CODE_SCOPE}"
    " AND position > 0 AND reply_code IS NOT NULL AND pause_decided_at IS NULL UNION ALL"
    f" SELECT reply_code, 'decided', pause_decided_at FROM pause_recipients WHERE {CODE_SCOPE}"
    " AND position > 0 AND reply_code IS NOT NULL AND pause_decided_at > :week_ago")
    for livemode, decided_lately in (
        (1, "SELECT reply_code, status, decided_at FROM pauses INDEXED BY pauses_closed_by_recipient"
            " WHERE recipient = :recipient AND livemode = 1 AND channel IN ('sms', 'whatsapp')"
            " AND reply_code IS NOT NULL AND decided_at > :week_ago"),
        (0, f"SELECT reply_code, status, decided_at FROM pauses WHERE {CODE_SCOPE}"
            " AND reply_code IS NOT NULL AND decided_at > :week_ago"))}
# How many of a number's pending codes (in a scope) a developer holds, counted up to :allowed.
# (+developer_id: SQLite would put :developer in place of developer_id in CODE_SCOPE's iif(),
# which then no longer matches the indexes' expression.)
DEVELOPERS_PENDING_CODES = (
    "SELECT count(*) FROM (SELECT 1 FROM pauses INDEXED BY pauses_pending_reply_code"
    f" WHERE {CODE_SCOPE} AND reply_code IS NOT NULL AND status = 'pending' AND +developer_id = :developer UNION ALL"
    f" SELECT 1 FROM pause_recipients WHERE {CODE_SCOPE} AND position > 0 AND reply_code IS NOT NULL"
    " AND pause_decided_at IS NULL AND +developer_id = :developer LIMIT :allowed)")
# The first of some candidate codes (a JSON array) that is free for a number, or none.
FIRST_FREE_REPLY_CODE = (
    f"SELECT value FROM json_each(:candidates) WHERE NOT EXISTS (SELECT 1 FROM pauses WHERE {CODE_SCOPE}"
    " AND reply_code = value AND status = 'pending') AND NOT EXISTS (SELECT 1 FROM pauses"
    f" WHERE {CODE_SCOPE} AND reply_code = value AND reply_code IS NOT NULL"
    f" AND decided_at > :week_ago) AND NOT EXISTS (SELECT 1 FROM pause_recipients WHERE {CODE_SCOPE}"
    " AND position > 0 AND reply_code = value AND pause_decided_at IS NULL)"
    f" AND NOT EXISTS (SELECT 1 FROM pause_recipients WHERE {CODE_SCOPE}"
    " AND position > 0 AND reply_code = value AND pause_decided_at > :week_ago) ORDER BY key LIMIT 1")


def new_reply_code(conn, config, recipient, livemode, developer_id, field="recipient"):
    """A code no pending pause for this number uses (of those in CODE_SCOPE), preferring
    one no pause sent to it was decided with in the last week, so a late reply to a decided
    pause names no newer one. Short codes while a few random draws find one free, then long
    ones; only when the draws keep failing are the number's codes read. When every code is
    taken that way, the one decided longest ago: a flood of pauses to a number must never
    make it unreachable. `field` names the number in a refusal, as the request did."""
    require_transaction(conn)
    scope = {"recipient": recipient, "livemode": livemode, "scope": "" if livemode else developer_id,
             "week_ago": db_time(utcnow() - REPLY_CODE_QUARANTINE)}
    if livemode:
        refuse_more_than_a_share_of_codes(conn, config, scope, developer_id, field)
    # Not secrets (a reply counts only from the number the pause was sent to), so the
    # fast generator: the system one cost a fifth of a create.
    # The second draw only when the first found nothing: drawn up front, it cost 27 µs a create.
    for draw in (lambda: [*random.sample(SHORT_REPLY_CODES, REPLY_CODE_DRAWS),
                          *random.sample(LONG_REPLY_CODES, REPLY_CODE_DRAWS)],
                 lambda: random.sample(LONG_REPLY_CODES, MORE_REPLY_CODE_DRAWS)):
        free = query_db(conn, FIRST_FREE_REPLY_CODE, {"candidates": json.dumps(draw()), **scope}, one=True)
        if free is not None:
            return free[0]
    pending, recent = reply_codes_in_use(conn, scope)
    for codes in (SHORT_REPLY_CODES, LONG_REPLY_CODES):
        unused = [code for code in codes if code not in pending and code not in recent]
        if unused:
            return secrets.choice(unused)
    reusable = [code for code in recent if code not in pending]
    if not reusable:
        held = "pending pauses" if livemode else "of your test pauses pending"
        raise ApiError(429, "too_many_pending", f"{recipient} has too many {held}; wait for some to be decided",
                       field=field)
    return min(reusable, key=recent.get)


def refuse_more_than_a_share_of_codes(conn, config, scope, developer_id, field):
    """429 when the developer has pauses.max_pending_per_number live pauses pending to the
    number already: its live codes are every developer's, and one who may create thousands
    of live pauses must not hold them all. Reads the number's pending codes, a few for most
    numbers, at most all 4,416 of one that is flooded."""
    allowed = config["pauses.max_pending_per_number"]
    if not allowed:
        return
    held = query_db(conn, DEVELOPERS_PENDING_CODES, {**scope, "developer": developer_id, "allowed": allowed},
                    one=True)[0]
    if held >= allowed:     # (counted up to the limit, which the operator may have lowered below what is held)
        raise ApiError(429, "too_many_pending", f"you have {held:,} or more live pauses pending to {scope['recipient']},"
                       " the most one developer may (pauses.max_pending_per_number), since every developer's texts to a"
                       " number share its reply codes; wait for some to be decided", field=field)


def reply_codes_in_use(conn, scope):
    """The number's codes in a scope (new_reply_code()'s): ({those of pending pauses}, {code:
    when a pause with it was last decided, for those decided in the last week})."""
    codes = query_db(conn, NUMBER_CODES[scope["livemode"]], scope)
    pending = {code for code, status, _ in codes if status == "pending"}
    recent = {}
    for code, status, decided_at in codes:
        if status != "pending":
            recent[code] = max(recent.get(code, decided_at), decided_at)
    return pending, recent


def nothing_open_reply(conn, number, channel, voted, now):
    """What a reply hears when no request of this number's awaits its answer, or None: a
    number never asked lately is not answered at our cost. `voted`: the number's people who
    voted on a request still open, for a bare reply (none for one with a code)."""
    # A bare reply from someone who voted on a request still open for the others: their
    # vote stands, which "no open request" would read as lost.
    if voted:
        return " ".join(answered_already(conn, number, person["reply_code"], voted)
                        for person in voted[:MAX_CODES_LISTED])
    elsewhere = sent_elsewhere(conn, number, channel, now)
    if elsewhere:
        return elsewhere
    asked_lately = query_db(conn, ASKED_LATELY, {"number": number, "week_ago": db_time(
        utcnow() - REPLY_CODE_QUARANTINE)}, one=True)[0]
    return "PausePoint: there is no open request for this number." if asked_lately else None


def split_reply_code(text):
    """'K7 1', '1 k7', 'K7: approve' -> ('K7', '1'…); a reply without a code, or too long
    to hold a code and an option, -> (None, text)."""
    text = text.strip()
    if len(text) > MAX_SPLIT_REPLY:
        return None, text
    first = re.fullmatch(f"({REPLY_CODE.pattern}){REPLY_SEPARATORS}(.+)", text, re.IGNORECASE)
    if first:
        return first.group(1).upper(), first.group(2)
    last = re.fullmatch(f"(.+?){REPLY_SEPARATORS}({REPLY_CODE.pattern})[.!]?", text, re.IGNORECASE)
    if last:
        return last.group(2).upper(), last.group(1)
    return None, text


# The id Twilio gives a message: SM (MM for a picture) and 32 hex digits; a compatible provider's
# may be a UUID. Only ids of a fixed form are taken: the signature runs the form's names and values
# together without separators, so whoever holds one signed post can move the end of MessageSid's
# value into the next parameter's name ('MessageSid=SM…&NumMedia=0' signs as 'MessageSid=SM…NumMedia0')
# and post the same reply, still signed, under an id never seen, to answer a pause asked since.
MESSAGE_SID = re.compile("[SM]M[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# Whether any live pause asked a number in the last week, or asks it now (its text perhaps
# still being sent). A text from any other number gets no answer at all: each answer is a
# paid message to whichever number texted, and answering every one would let whoever holds
# premium-rate numbers earn from the operator's account a text at a time (SMS pumping).
# Only by text: a link or push pause's recipient is a label the agent writes, which may be
# any number, and costs nothing to hold pending for months.
ASKED_LATELY = (
    "SELECT EXISTS (SELECT 1 FROM pauses INDEXED BY pauses_pending_by_recipient WHERE recipient = :number"
    "   AND status = 'pending' AND livemode = 1 AND channel IN ('sms', 'whatsapp'))"
    " OR EXISTS (SELECT 1 FROM pauses INDEXED BY pauses_closed_by_recipient WHERE recipient = :number"
    "   AND livemode = 1 AND channel IN ('sms', 'whatsapp') AND decided_at > :week_ago)"
    + "".join(" OR EXISTS (SELECT 1 FROM pause_recipients WHERE recipient = :number AND livemode = 1"
              "   AND iif(livemode, '', developer_id) = '' AND position > 0 AND reply_code IS NOT NULL"
              f"   AND pause_decided_at {decided})" for decided in ("IS NULL", "> :week_ago")))


# The number's live pause decided in the last week with a code (its first person's, or a later
# one's in a team): a late reply naming it is told how it ended, not that no request has its
# code, which reads as if the question had been lost. Codes stay theirs that week (new_reply_code()).
DECIDED_WITH_CODE = (
    "SELECT status, choice, message FROM pauses INDEXED BY pauses_recent_reply_codes WHERE recipient = :number"
    " AND livemode = 1 AND iif(livemode, '', developer_id) = '' AND reply_code = :code AND decided_at > :week_ago"
    " UNION ALL SELECT p.status, p.choice, p.message FROM pause_recipients r CROSS JOIN pauses p ON p.id = r.pause_id"
    " WHERE r.recipient = :number AND r.livemode = 1 AND iif(r.livemode, '', r.developer_id) = '' AND r.position > 0"
    " AND r.reply_code = :code AND r.pause_decided_at > :week_ago LIMIT 1")


def answered_already(conn, number, code, voted):
    """What a reply naming `code`, of no open request to the number, is told when the code is
    of one it voted on (`voted`, still open for others' votes) or of one decided lately; else None."""
    vote = next((p for p in voted if p["reply_code"] == code), None)
    if vote is not None:
        return f"PausePoint: your answer to {code} was recorded already: {vote['vote']['choice']}."
    closed = query_db(conn, DECIDED_WITH_CODE, {"number": number, "code": code, "week_ago": db_time(
        utcnow() - REPLY_CODE_QUARANTINE)}, one=True)
    if closed is None:
        return None
    choice = closed["choice"]
    outcome = {"responded": f"answered {choice}", "cancelled": "cancelled by its sender",
               "timed_out": f"timed out to {choice}" if choice else "timed out"}[closed["status"]]
    return f"PausePoint: {code} is closed, {outcome}: {quoted_line(shorten(closed['message']))}."


def record_sms_reply(conn, config, sender, text, message_sid):
    """An SMS or WhatsApp reply; returns the text to send back, or None for none.

    A reply naming a pause's code answers that pause: decides it, or for a team
    pause casts the number's vote. A bare reply answers only when exactly one
    live pause awaits this number's answer in this conversation, whoever sent it,
    and no other is in the way (bare_reply_unclear()); otherwise it decides
    nothing and lists the codes. Only pauses whose message
    was sent to this number, on this channel, count: one whose send failed or is
    still queued was never read, whatever its code (one Twilio took but reported
    not delivered may have been: its code counts). A message is taken once, by
    Twilio's id for it (see sms_replies)."""
    channel = "whatsapp" if sender.startswith("whatsapp:") else "sms"
    number = sender.removeprefix("whatsapp:")
    code, answer = split_reply_code(text)
    with transaction(conn):
        now = db_time()
        if not message_sid:
            return "PausePoint: this message came without its MessageSid, so it was not recorded."
        if not MESSAGE_SID.fullmatch(message_sid):
            return "PausePoint: this message's MessageSid is not one Twilio gives, so it was not recorded."
        if not conn.execute("INSERT INTO sms_replies VALUES (?, ?) ON CONFLICT DO NOTHING", (message_sid, now)).rowcount:
            return "PausePoint: this message was received already; it counts once."
        asked, awaiting = asked_on_number(conn, number, channel, now)
        pending = [person for person in awaiting if person["reached"]]
        # A text reported not delivered is answered by its code: the code came in that text.
        coded = next((p for p in awaiting if p["reply_code"] == code), None) if code is not None else None
        voted = [person for person in asked if person.get("vote")]
        answered = code is not None and coded is None and answered_already(conn, number, code, voted)
        if answered:
            return answered + (" " + open_codes(pending) if pending else "")
        if not pending and coded is None:
            return nothing_open_reply(conn, number, channel, voted if code is None else [], now)
        if code is not None:
            pause = coded
            if pause is None:
                return f"PausePoint: no open request has the code {code}. " + open_codes(pending)
        elif len(pending) > 1:
            return f"PausePoint: {len(pending)} requests are open; start your reply with its code. " + open_codes(pending)
        elif bare_reply_unclear(conn, pending[0], [other for other in asked if other is not pending[0]],
                                number, channel, now):
            return ("PausePoint: a reply without a code could be meant for another request to this number,"
                    " so start it with the open one's code. " + open_codes(pending))
        else:
            pause = pending[0]
        choice = reply_choice(answer, json.loads(pause["options"]))
        if choice is None:
            return f"PausePoint: {reply_options(pause)}. ({quoted_line(shorten(pause['message']))})"
        answer_pause(conn, config, pause, choice, None, now=now,
                     data={"via": channel, "message_sid": message_sid, "reply_code": pause["reply_code"]})
    return f"{RECORDED_REPLY}{choice} for {quoted_line(shorten(pause['message']))}"


RECORDED_REPLY = "PausePoint: recorded "
# Answers a number is sent per hour to texts that decide nothing (help, codes, "no open
# request"): one live pause makes its number answered for a week (ASKED_LATELY), and without
# a bound each text its holder sends would buy them a paid one back. A decision is always told.
TEXT_ANSWERS_PER_HOUR = 10


def asked_on_number(conn, number, channel, now):
    """The number's people on a channel (ASKED_ON_NUMBER's, as asked_of() shows them), and
    those of them whose answer is awaited: their question reached them, or was reported not
    delivered, and they have neither voted nor run out of time."""
    asked = [asked_of(conn, row, row["position"]) for row in conn.execute(
        ASKED_ON_NUMBER, {"number": number, "channel": channel})]
    return asked, [person for person in asked if (person["reached"] or person["reported"])
                   and person["expires_at"] > now and not person.get("vote")]


def sent_elsewhere(conn, number, channel, now):
    """What a reply is told when no request awaits it in its conversation (SMS or WhatsApp)
    but some do in the number's other one; else None. It decides nothing: the person may be
    answering another text than they think."""
    other = "whatsapp" if channel == "sms" else "sms"
    count = len(asked_on_number(conn, number, other, now)[1])
    where = "on WhatsApp" if other == "whatsapp" else "by SMS"
    if count == 1:
        return f"PausePoint: the open request to this number was sent {where}; reply there."
    return f"PausePoint: the {count} open requests to this number were sent {where}; reply there." if count else None


# The live pending pauses whose question reached a number on a channel (a text sent, or one
# that may have been: the question itself, or a reminder, which repeats it and its code), or is
# being sent now, or was reported not delivered, newest first, each with the position it asked
# the number at (as a pause's first person, or later in a team), whether it `reached` the
# number (0: only being sent, or reported not delivered), and whether a text of it was
# `reported` on. A carrier's report can be wrong, and 'delivered' come after it, so the person
# may be answering a text reported not delivered: it takes a reply with its code (which only
# that text gave them), not a bare one, and it holds a bare one, as one being sent does.
# Those past their expiry that the timeout job has yet to close are among them.
# (INDEXED BY: the planner took the pending pauses by expiry, all of them, when no live ones
# were pending as statistics were last gathered. CROSS JOIN, and + to keep the pending pauses'
# indexes out: from the number's few people to their pauses by id, never through every pending
# pause. The live CODE_SCOPE, '', lets the number's index reach past it to the pending ones.)
REACHED = "(n.status = 'sent' OR n.may_have_reached)"
MAY_BE_READ = f"(n.status = 'sending' OR {REACHED} OR n.delivery_status IS NOT NULL)"
SENT_TO = (f"(SELECT max({REACHED}) FROM notifications n WHERE n.pause_id = p.id AND n.position = {{position}}"
           f" AND {MAY_BE_READ})")
REPORTED_TO = ("EXISTS (SELECT 1 FROM notifications n WHERE n.pause_id = p.id AND n.position = {position}"
               " AND n.delivery_status IS NOT NULL)")
ASKED_ON_NUMBER = (
    f"SELECT p.*, 0 AS position, {SENT_TO.format(position='0')} AS reached, {REPORTED_TO.format(position='0')}"
    " AS reported"
    " FROM pauses p INDEXED BY pauses_pending_by_recipient WHERE p.recipient = :number AND p.status = 'pending'"
    " AND p.channel = :channel AND p.livemode = 1 AND reached IS NOT NULL"
    f" UNION ALL SELECT p.*, r.position, {SENT_TO.format(position='r.position')} AS reached,"
    f" {REPORTED_TO.format(position='r.position')} AS reported"
    " FROM pause_recipients r CROSS JOIN pauses p ON p.id = r.pause_id"
    " WHERE r.recipient = :number AND r.livemode = 1 AND iif(r.livemode, '', r.developer_id) = ''"
    " AND r.position > 0 AND r.reply_code IS NOT NULL AND r.pause_decided_at IS NULL AND r.channel = :channel"
    " AND +p.status = 'pending' AND reached IS NOT NULL ORDER BY seq DESC")


# A reply without a code is meant for the last question the person read, which may not be the
# one now open: another to the same number may have timed out, or been answered on its page,
# just before this one arrived, or while it waited; or another's text may be arriving as the
# person writes. So a bare reply answers the open request only when no other in the
# conversation closed (or took this number's vote, or ran out of time) after a time this long
# before the open one was asked, and none is being sent or reported not delivered (which the
# person may have read even so: see MAY_BE_READ); otherwise the person is asked for its
# code, which every text gives. (A late reply naming a code does not go astray: a code is
# not given again for a week, unless every one of the number's codes was in use that week.)
BARE_REPLY_QUIET = dt.timedelta(minutes=15)
# Of the live pauses that asked a number and were decided since a time, whether each one's
# question reached it on a channel (or is reaching it: a text in flight as its pause was
# decided still goes out; or may have, though reported not delivered): those that asked it
# first (pauses_closed_by_recipient), then those that asked it later in a team, at most :most
# of each. Only that many are read under the write lock, whatever a tenant does to the number
# (paused and cancelled before any text went out, say): a full count is taken as "closed
# lately", the safe side.
CLOSED_ON_NUMBER = (
    f"SELECT * FROM (SELECT p.channel = :channel AND EXISTS (SELECT 1 FROM notifications n WHERE n.pause_id = p.id"
    f" AND n.position = 0 AND {MAY_BE_READ}) AS reached FROM pauses p"
    " INDEXED BY pauses_closed_by_recipient WHERE p.recipient = :number AND p.livemode = 1"
    " AND p.channel IN ('sms', 'whatsapp') AND p.decided_at > :since LIMIT :most)"
    " UNION ALL SELECT * FROM (SELECT r.channel = :channel AND EXISTS (SELECT 1 FROM notifications n"
    f" WHERE n.pause_id = r.pause_id AND n.position = r.position AND {MAY_BE_READ})"
    " AS reached FROM pause_recipients r"
    " WHERE r.recipient = :number AND r.livemode = 1 AND iif(r.livemode, '', r.developer_id) = ''"
    " AND r.position > 0 AND r.reply_code IS NOT NULL AND r.pause_decided_at > :since LIMIT :most)")
CLOSED_READ_AT_MOST = 50


def bare_reply_unclear(conn, person, others, number, channel, now):
    """Whether a reply without a code from `number` could be meant for another request than
    the one open pause `person` (as asked_of() shows it) was asked: `others` (the rest of
    ASKED_ON_NUMBER's pauses) hold one being sent or reported not delivered, or one that had
    this number's vote or ran out of time after BARE_REPLY_QUIET before `person` was asked; or
    one decided since then had reached the number."""
    asked_at = person["created_at"] if person["position"] == 0 else query_db(
        conn, "SELECT added_at FROM pause_recipients WHERE pause_id = ? AND position = ?",
        (person["id"], person["position"]), one=True)[0]
    since = db_time(parse_db_time(asked_at) - BARE_REPLY_QUIET)
    if any(not other["reached"] or since < other["expires_at"] <= now
           or other.get("vote") and other["vote"]["voted_at"] > since for other in others):
        return True
    closed = query_db(conn, CLOSED_ON_NUMBER, {"number": number, "channel": channel, "since": since,
                                               "most": CLOSED_READ_AT_MOST})
    return any(row["reached"] for row in closed) or len(closed) >= CLOSED_READ_AT_MOST


def open_codes(pending):
    """'E.g. K7 1. K7: "send $10 to the office fund?"; M3: "wire $50,000 to…"': the open codes
    and their questions, shortened and quoted as a text quotes them (quoted_line())."""
    listed = [f"{p['reply_code']}: {quoted_line(shorten(p['message'], 40))}"
              for p in pending[:MAX_CODES_LISTED] if p["reply_code"]]
    more = len(pending) - MAX_CODES_LISTED
    example = next((p for p in pending if p["reply_code"]), None)
    hint = f"E.g. {example['reply_code']} 1. " if example else ""
    return hint + "; ".join(listed) + (f" (+{more} more)" if more > 0 else "")


def reply_choice(text, options):
    """'2', '2.' or 'reject' -> the option meant, or None."""
    answer = without_final_stop(text)
    if not answer:          # a picture without words, or only '!': no option is nothing but stops
        return None
    if re.fullmatch("[0-9]{1,3}", answer) and 1 <= int(answer) <= len(options):
        return options[int(answer) - 1]
    # An option's own final . or ! goes too: the reply loses it, so 'Ship it!' texted back
    # as it was offered must still be 'Ship it!'.
    return next((option for option in options if without_final_stop(option).casefold() == answer.casefold()), None)


def without_final_stop(text):
    """'Approve. ' -> 'Approve': how a reply ends says nothing about what it chose."""
    return text.strip().rstrip(".!").strip()


def shorten(text, limit=60):
    """`text` on one line, cut to `limit` characters (None: whole)."""
    text = " ".join(text.split())
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def pause_by_token(conn, token):
    """The pause behind a respond link, as its person was asked it (asked_of()), with what the
    latest approval `proposed` for them to approve too (latest_approved_changes()); 404 for none."""
    pause = conn.execute("SELECT * FROM pauses WHERE respond_token = ?", (token,)).fetchone()
    position = 0
    if pause is None:
        person = conn.execute("SELECT pause_id, position FROM pause_recipients WHERE respond_token = ?",
                              (token,)).fetchone()
        if person is None:
            raise ApiError(404, "not_found", "this respond link is not valid")
        pause, position = pause_by_id(conn, person["pause_id"]), person["position"]
    return {**asked_of(conn, pause, position), "proposed": latest_approved_changes(conn, pause)}


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


LINK_OPENED_EVERY = dt.timedelta(minutes=1)
LINK_OPENINGS_RECORDED = 100    # per pause: from ever new addresses, openings would be endless
# Per unit of a test pause's weight, whose agent may open its links as often: each opening kept
# up to 1.2 KiB (a user agent of control characters, each shown as a 3-byte U+FFFD), and 100
# kept 119 KiB of a pause weighing 1, past what a unit is meant to keep (weight_in_test_mode()).
TEST_LINK_OPENINGS_PER_UNIT = 3


def record_link_opened(conn, pause, via, client):
    """Audit that a respond link was opened: once per pause, client address and minute, and
    LINK_OPENINGS_RECORDED times per pause at most, so reloads, scanners and floods from
    many addresses cannot grow the log without bound; a test pause, TEST_LINK_OPENINGS_PER_UNIT
    times its weight. A team pause's person (`pause` as asked_of() shows it) also has the
    first opening of their link noted."""
    most = LINK_OPENINGS_RECORDED if pause["livemode"] else min(
        LINK_OPENINGS_RECORDED, TEST_LINK_OPENINGS_PER_UNIT * pause["test_weight"])

    def recorded_lately():
        return conn.execute(
            "SELECT 1 FROM audit_events WHERE pause_id = ? AND event_type = 'respond_page.opened' AND timestamp > ?"
            " AND json_extract(data, '$.ip') = ? LIMIT 1",
            (pause["id"], db_time(utcnow() - LINK_OPENED_EVERY), client["ip"])).fetchone()

    def recorded_enough():
        return query_db(conn, "SELECT count(*) FROM audit_events WHERE pause_id = ? AND event_type = 'respond_page.opened'",
                        (pause["id"],), one=True)[0] >= most

    first_time = pause["team"] and not query_db(
        conn, "SELECT opened_at FROM pause_recipients WHERE pause_id = ? AND position = ?",
        (pause["id"], pause["position"]), one=True)[0]
    if recorded_lately() and not first_time:       # the common reload: no write lock needed
        return
    with transaction(conn):
        if first_time:
            conn.execute("UPDATE pause_recipients SET opened_at = ? WHERE pause_id = ? AND position = ?"
                         " AND opened_at IS NULL", (db_time(), pause["id"], pause["position"]))
        if not recorded_lately() and not recorded_enough():
            record_event(conn, pause["developer_id"], pause["livemode"], "respond_link", "respond_page.opened",
                         pause["id"], {"via": via, **client})


def cancel_pause(conn, config, caller, pause_id):
    with transaction(conn):
        pause = owned_pause(conn, caller, pause_id)
        if not decide_pause(conn, config, pause_id, "cancelled", caller.actor):
            if pause["status"] == "pending":        # expired, its timeout about to be recorded
                default = f"its default {pause['timeout_default']!r}" if pause["timeout_default"] else "no choice"
                raise ApiError(409, "not_pending", f"the pause expired at {api_time(pause['expires_at'])} and times"
                                                   f" out to {default}; only pending pauses can be cancelled")
            raise ApiError(409, "not_pending", f"the pause is already {pause['status']}; only pending pauses can be cancelled")
        return pause_by_id(conn, pause_id)


def owned_pause(conn, caller, pause_id):
    """The caller's pause in the caller's mode; anything else is indistinguishable from absent."""
    pause = conn.execute("SELECT * FROM pauses WHERE id = ? AND developer_id = ? AND livemode = +?",
                         (pause_id, caller.developer_id, caller.livemode)).fetchone()
    if pause is None:
        raise no_such_pause(pause_id, caller, conn)
    return pause


def no_such_pause(pause_id, caller=None, conn=None):
    """The 404 for a pause the caller cannot see. One of their own in the other mode is named
    as such (a test key's pause read with the live key, say): it is theirs to know of."""
    message = f"no pause {shorten(pause_id)!r}" + (f" {caller.whose}" if caller else "")
    if caller is not None and conn is not None:
        message += in_the_other_mode(conn, caller, "SELECT 1 FROM pauses WHERE id = ? AND developer_id = ?"
                                     " AND livemode = +?", pause_id, "pauses")
    return ApiError(404, "not_found", message)


def in_the_other_mode(conn, caller, sql, thing_id, things):
    """What to add to a 404 when `sql` (taking the id, the developer and a mode) finds the
    thing among the caller's own in the other mode: which key, or which dashboard data, shows it."""
    if not conn.execute(sql, (thing_id, caller.developer_id, 1 - caller.livemode)).fetchone():
        return ""
    other = MODE_NAMES[1 - caller.livemode]
    return (f": it is one of your {other}-mode {things}, which only your pp_{other}_ key reads" if caller.key_hint
            else f": it is one of your {other}-mode {things}; switch to {other} data to see it")


# What a timeout sets: its claim writes it, and the batch read ahead reads it as it will be.
TIMED_OUT = {"status": "'timed_out'", "choice": "timeout_default", "comment": "NULL", "decided_at": ":now",
             "decided_by": "'timeout'", "edited": EDITED_NOTHING}

# A batch of due pauses read ahead of its transaction: the rows as timing out at `now` will
# leave them, and a future of their receipts, {pause id: receipt, or None to sign in the
# transaction}.
DueBatch = collections.namedtuple("DueBatch", "rows now receipts")


def expire_due_pauses(conn, config):
    """Time out every pending pause past its expires_at, the earliest first, batch after batch
    in a transaction each; returns how many.

    A receipt's Ed25519 signature costs more than the rest of a timeout, so the signer's own
    thread signs each batch's receipts while the batch before it is written: only the
    writing holds the write lock. A batch is read before the one ahead of it commits, so it
    starts after that one's last pause; whatever that leaves behind, the next round finds.
    Its decided_at, the time its receipts say, is when it was read: before it commits by
    the writing of the batch ahead of it and any wait for the write lock (tens of
    milliseconds, hundreds behind a slow writer)."""
    total, batch = 0, due_batch(conn, ("", 0))
    while batch.rows:
        last = batch.rows[-1]
        following = due_batch(conn, (last["expires_at"], last["seq"])) if len(batch.rows) == JOB_BATCH else None
        total += time_out(conn, config, batch)
        if following is None:
            break
        batch = following
    return total


def due_batch(conn, after):
    """Up to JOB_BATCH pending pauses due now, after (expires_at, seq) `after`, earliest first,
    with their receipts as timed out now being signed. A team pause's receipt lists its
    votes, and one may still come in before its timeout commits: it is signed then."""
    now = db_time()
    timed_out = ", ".join(f"{value} AS {column}" for column, value in TIMED_OUT.items())
    rows = query_db(conn, "SELECT seq, id, developer_id, team, expires_at, message, title, metadata, options,"
                          f" quorum, fields, livemode, {timed_out}"
                          " FROM pauses WHERE status = 'pending' AND expires_at <= :now"
                          " AND (expires_at, seq) > (:after_expiry, :after_seq) ORDER BY expires_at, seq LIMIT :batch",
                    {"now": now, "after_expiry": after[0], "after_seq": after[1], "batch": JOB_BATCH})
    signer, alone = getattr(conn, "signer", None), [row for row in rows if not row["team"]]

    def receipts():
        signed = signer.sign_all([receipt_claims(row) for row in alone]) if signer and alone else []
        return {**{row["id"]: None for row in rows}, **dict(zip((row["id"] for row in alone), signed))}

    return DueBatch(rows, now, signer.helper.submit(receipts) if signer else completed(receipts()))


def completed(result):
    """A future already holding `result`."""
    future = concurrent.futures.Future()
    future.set_result(result)
    return future


def time_out(conn, config, batch):
    """Time out those of `batch` still pending, by compare-and-set in one transaction, with the
    receipts signed ahead; a pause decided since it was read keeps its own decision and
    receipt. Returns how many."""
    signed = json.dumps(batch.receipts.result())        # before the write lock: it never waits on signing
    with transaction(conn):
        decided = conn.execute(
            f"UPDATE pauses SET {', '.join(f'{column} = {value}' for column, value in TIMED_OUT.items())},"
            " receipt = signed.value FROM json_each(:signed) AS signed"
            " WHERE pauses.id = signed.key AND status = 'pending' AND expires_at <= :now RETURNING *",
            {"signed": signed, "now": batch.now}).fetchall()
        record_decisions(conn, config, decided, None, batch.now)
    return len(decided)


def take_due_steps(conn, config):
    """Do every reminder and escalation that fell due, the earliest first; returns how many
    were claimed. Each is claimed once by compare-and-set, so one that fell due while the
    server was down happens once at the next start. One whose pause was decided (or ran
    out) is skipped, and so is a reminder when a later one is due too: one is enough."""
    def take(steps, now):
        for step in sorted(steps, key=lambda step: (step["due_at"], step["id"])):   # RETURNING keeps no order
            pause = pause_by_id(conn, step["pause_id"])
            reminded_later = step["kind"] == "reminder" and query_db(
                conn, "SELECT 1 FROM pause_steps WHERE pause_id = ? AND kind = 'reminder' AND (due_at, id) > (?, ?)"
                      " AND due_at <= ?", (pause["id"], step["due_at"], step["id"], now), one=True)
            if pause["status"] != "pending" or pause["expires_at"] <= now or reminded_later:
                conn.execute("UPDATE pause_steps SET status = 'skipped' WHERE id = ?", (step["id"],))
            else:
                take_step(conn, config, pause, step, now)

    return in_batches(conn, "UPDATE pause_steps SET status = 'done', done_at = :now WHERE id IN (SELECT id FROM"
                            " pause_steps WHERE status = 'scheduled' AND due_at <= :now ORDER BY due_at LIMIT :batch)"
                            " RETURNING *", take)


def take_step(conn, config, pause, step, now):
    """Remind or escalate. A step that fails (its channel was removed from the config, say)
    is undone and skipped alone, so it never holds back the others due with it."""
    conn.execute("SAVEPOINT step")
    heads = dict(conn.audit_heads)
    try:
        (remind if step["kind"] == "reminder" else escalate)(conn, config, pause, step, now)
    except Exception as e:
        conn.execute("ROLLBACK TO step")
        conn.audit_heads = heads            # the events the step wrote are gone: so are the heads they made
        conn.execute("UPDATE pause_steps SET status = 'skipped' WHERE id = ?", (step["id"],))
        why = getattr(e, "message", None) or str(e) or repr(e)
        record_event(conn, pause["developer_id"], pause["livemode"], "system", f"pause.{step['kind']}_skipped",
                     pause["id"], {"due_at": api_time(step["due_at"]), "recipient": step["recipient"], "error": why},
                     when=now)
        log.warning("the %s of %s due at %s was skipped: %s", step["kind"], pause["id"], step["due_at"], why)
    conn.execute("RELEASE step")


def remind(conn, config, pause, step, now):
    """Remind each of a pending pause's people who has not answered, on the channel that
    asked them, saying how long is left."""
    if pause["team"]:
        people = [asked_of(conn, pause, row[0]) for row in query_db(
            conn, "SELECT position FROM pause_recipients WHERE pause_id = ? AND voted_at IS NULL ORDER BY position",
            (pause["id"],))]
    else:
        people = [asked_of(conn, pause, 0)]
    left = human_duration((parse_db_time(pause["expires_at"]) - parse_db_time(now)).total_seconds())
    reminded, missed = [], []
    for person in people:
        try:
            if queue_notification(conn, config, person, "reminder", now,
                                  render=functools.partial(reminder_text, left=left)):
                reminded.append(person["recipient"])
        except ChannelError as e:       # their channel was removed from the config since
            missed.append({"recipient": person["recipient"], "error": str(e)})
    if reminded or missed:
        record_event(conn, pause["developer_id"], pause["livemode"], "system", "pause.reminded", pause["id"],
                     {"recipients": reminded, "left": left, **({"not_reminded": missed} if missed else {})}, when=now)


def reminder_text(channel, person, url, left):
    """The question to `person` again, on `channel` with their link `url`, saying first that it
    is a reminder and how long is left: in an email's Subject line (email_text()). Only an
    email's text begins with one: a question may begin "Subject: " too. A push's first line is
    the agent's, quoted: ours goes on a line above it, within what the target takes."""
    said = f"Reminder, {left} left:"
    if channel.kind == "apprise":
        return channel.render(person, url, opening=said + "\n")
    text = channel.render(person, url)
    return f"Subject: {said} {text.removeprefix('Subject: ')}" if channel.kind == "email" else f"{said} {text}"


def escalate(conn, config, pause, step, now):
    """Add an escalation's target to a pending team pause's people and ask them too."""
    position = query_db(conn, "SELECT max(position) + 1 FROM pause_recipients WHERE pause_id = ?", (pause["id"],),
                        one=True)[0]
    ask_person(conn, config, pause, position, step["recipient"], step["channel"], "escalation", now)
    record_event(conn, pause["developer_id"], pause["livemode"], "system", "pause.escalated", pause["id"],
                 {"recipient": step["recipient"], "channel": step["channel"], "due_at": api_time(step["due_at"])},
                 when=now)
    emit_pause_events(conn, config, [pause], "pause.escalated", when=now)


# A pause as the API shows it, written by SQLite from `pauses p {FIRST_ASKED}`
# with :base the server's base URL: a page of 50 costs one query and no Python per row.
# Times show whole seconds ('2026-05-08T18:00:00Z'); a notification being sent shows as queued.
FIRST_ASKED = "LEFT JOIN notifications n ON n.pause_id = p.id AND n.position = 0 AND n.kind = 'ask'"
SHOWN_TIME = "substr({0}, 1, 19) || 'Z'"
SHOWN_BOOL = "json(CASE {0} WHEN 1 THEN 'true' WHEN 0 THEN 'false' END)"      # NULL stays null
SHOWN_SENDING = "CASE {0} WHEN 'sending' THEN 'queued' ELSE {0} END"
PAUSE_OBJECT = f"""json_object(
    'pause_id', p.id, 'status', p.status, 'recipient', p.recipient, 'channel', p.channel, 'title', p.title,
    'message', p.message,
    'options', json(p.options), 'timeout_default', p.timeout_default, 'choice', p.choice, 'comment', p.comment,
    'decided_at', {SHOWN_TIME.format('p.decided_at')}, 'decided_by', p.decided_by, 'metadata', json(p.metadata),
    'respond_url', :base || '/respond/' || p.respond_token,
    'livemode', {SHOWN_BOOL.format('p.livemode')},
    'expires_at', {SHOWN_TIME.format('p.expires_at')}, 'created_at', {SHOWN_TIME.format('p.created_at')},
    'notification', json(CASE WHEN n.id IS NOT NULL THEN json_object(
        'channel', n.channel, 'status', {SHOWN_SENDING.format('n.status')},
        'attempts', n.attempts, 'provider_message_id', n.provider_message_id, 'last_error', n.last_error,
        'may_have_reached', {SHOWN_BOOL.format('n.may_have_reached')},
        'text', n.text) END), 'receipt', p.receipt)"""
# A pause with fields also shows them, and once decided what the approver changed; one
# without is shown exactly as before fields existed.
PAUSE_WITH_FIELDS = (f"CASE WHEN p.fields IS NULL THEN {PAUSE_OBJECT} ELSE json_patch({PAUSE_OBJECT},"
                     " json_object('fields', json(p.fields), 'edited', json(p.edited))) END")
# A team pause also shows its quorum, its people (whether their question was sent, when they
# opened their link and answered) and the votes cast, oldest first.
TEAM_PARTS = f"""'$.quorum', json(coalesce(p.quorum, 'null')),
    '$.recipients', (SELECT json_group_array(json_object(
        'recipient', r.recipient, 'channel', r.channel, 'respond_url', :base || '/respond/' || r.respond_token,
        'added_by', r.added_by, 'added_at', {SHOWN_TIME.format('r.added_at')},
        'notification_status', {SHOWN_SENDING.format('rn.status')},
        'notification_may_have_reached', {SHOWN_BOOL.format('rn.may_have_reached')},
        'opened_at', {SHOWN_TIME.format('r.opened_at')}, 'answered_at', {SHOWN_TIME.format('r.voted_at')},
        'choice', r.choice)) FROM (SELECT * FROM pause_recipients WHERE pause_id = p.id ORDER BY position) r
        LEFT JOIN notifications rn ON rn.pause_id = r.pause_id AND rn.position = r.position AND rn.kind = 'ask'),
    '$.votes', (SELECT json_group_array(json_object(
        'recipient', recipient, 'choice', choice, 'comment', comment, 'edits', json(edits),
        'voted_at', {SHOWN_TIME.format('voted_at')})) FROM (SELECT * FROM pause_recipients
        WHERE pause_id = p.id AND voted_at IS NOT NULL ORDER BY voted_at, position))"""
PAUSE_JSON = f"CASE WHEN p.team THEN json_set({PAUSE_WITH_FIELDS}, {TEAM_PARTS}) ELSE {PAUSE_WITH_FIELDS} END"


def pause_json(conn, config, pause_id, caller=None):
    """The whole pause as GET /v1/pause/{id} shows it, as JSON text; with `caller`, only
    if it is the caller's pause in the caller's mode (else 404, as owned_pause())."""
    sql, args = (f"SELECT {PAUSE_JSON} FROM pauses p {FIRST_ASKED}"
                 " WHERE p.id = :id"), {"base": base_url(config), "id": pause_id}
    if caller is not None:
        sql += " AND p.developer_id = :developer AND p.livemode = +:livemode"
        args.update(developer=caller.developer_id, livemode=caller.livemode)
    row = query_db(conn, sql, args, one=True)
    if row is None:
        raise no_such_pause(pause_id, caller, conn)
    return row[0]


def pauses_json(conn, config, caller, status, limit, cursor):
    """A page of the caller's pauses, newest first, after `cursor`, as GET /v1/pause shows it."""
    sql = (f"SELECT p.seq, {PAUSE_JSON} FROM pauses p {FIRST_ASKED}"
           " WHERE p.developer_id = :developer AND p.livemode = +:livemode")
    args = {"base": base_url(config), "developer": caller.developer_id, "livemode": caller.livemode}
    if status:
        sql, args["status"] = sql + " AND p.status = +:status", status
    rows, next_cursor = newest_first(conn, sql, args, limit, cursor, "p.")
    return '{"pauses": [%s], "next_cursor": %s}' % (", ".join(row[1] for row in rows), json.dumps(next_cursor))


def created_json(conn, pause, config):
    """POST /v1/pause's answer: exactly the quickstart's fields, and a team pause's people
    with a respond_url each."""
    created = {
        "pause_id": pause["id"],
        "status": pause["status"],
        "respond_url": respond_url(config, pause["respond_token"]),
        "expires_at": api_time(pause["expires_at"]),
        "created_at": api_time(pause["created_at"]),
    }
    if pause["team"]:
        created["recipients"] = [
            {"recipient": person["recipient"], "channel": person["channel"],
             "respond_url": respond_url(config, person["respond_token"])}
            for person in query_db(conn, "SELECT * FROM pause_recipients WHERE pause_id = ? AND added_by = 'request'"
                                         " ORDER BY position", (pause["id"],))]
    return created


def shown_details(pause):
    """The metadata a respond page shows: the keys the agent listed in its "display", each
    [{name, value}] as text."""
    metadata = json.loads(pause["metadata"]) if pause["metadata"] else {}
    return [{"name": readable_text(key), "value": readable_text(
                metadata[key] if isinstance(metadata[key], str) else compact_json(metadata[key]))}
            for key in metadata.get("display", [])]


def asker_name(conn, pause):
    """Who is asking, as the respond page says it: the developer's name."""
    return query_db(conn, "SELECT name FROM developers WHERE id = ?", (pause["developer_id"],), one=True)["name"]


def respond_facts(pause, asked_by=None):
    """What the holder of a respond link may see: who asks, the question and its outcome,
    and of the agent's metadata only the keys it listed in "display": free-form, so made
    readable_text(), as the question already is by refusing what it would replace. Past
    expires_at its timeout is the outcome (refuse_if_decided()), though the job may not have
    recorded it yet: offering the options would ask for an answer that can no longer count."""
    expired = pause["status"] == "pending" and pause["expires_at"] <= db_time()
    return {
        "asked_by": asked_by,
        "title": pause["title"],
        "message": pause["message"],
        "details": shown_details(pause),
        "options": json.loads(pause["options"]),
        "status": "timed_out" if expired else pause["status"],
        "choice": pause["timeout_default"] if expired else pause["choice"],
        "comment": pause["comment"],
        "decided_at": api_time(pause["decided_at"]),
        "expires_at": api_time(pause["expires_at"]),
        "timeout_default": pause["timeout_default"],
        **({"fields": json.loads(pause["fields"])} if pause["fields"] else {}),
        **({"edited": json.loads(pause["edited"])} if pause["edited"] else {}),
        **({"your_vote": {"choice": pause["vote"]["choice"], "voted_at": api_time(pause["vote"]["voted_at"])}}
           if pause.get("vote") else {}),
        # With a quorum, approvals count together only with the same values: these are the latest's.
        **({"proposed_fields": pause["proposed"]} if pause.get("proposed") else {}),
    }


###############################################################################
# Outbound calls: total deadlines and one fair, bounded pool
###############################################################################

class DeadlineWatch:
    """One thread that shuts down the sockets of outbound calls that outlive their
    deadline. A socket timeout bounds each read, not the call: a peer that sends
    a byte every few seconds would hold a worker for ever. shutdown() makes the
    blocked read or write return at once, whatever library is above it."""

    def __init__(self):
        self._changed = threading.Condition()
        self._watched = {}          # key -> (monotonic deadline, fd, inode, Deadline)
        self._keys = itertools.count()
        self._thread = None
        self._closed = False
        self._stop_at = None        # once the server stops: when every call ends at the latest
        self._calls = weakref.WeakSet()     # the deadlines of calls under way, sockets guarded or not
        # Calls that cannot be interrupted (a name lookup, a library that opens its own
        # sockets) run on threads of their own; those that outlive their deadline are
        # counted here, by owner, until they end.
        self.stragglers = collections.Counter()

    def deadline(self, seconds, owner=None):
        deadline = Deadline(self, seconds, owner)
        with self._changed:
            self._calls.add(deadline)
            if self._stop_at is not None:
                deadline.end_by(self._stop_at)
        return deadline

    def end_by_stop(self, seconds):
        """Every call, under way or still to start, ends within `seconds`: the server is stopping."""
        with self._changed:
            self._stop_at = time.monotonic() + seconds
            for deadline in list(self._calls):
                deadline.end_by(self._stop_at)
            for key, (at, fd, inode, deadline) in self._watched.items():
                self._watched[key] = (deadline.at, fd, inode, deadline)
            self._changed.notify()

    def _watch(self, deadline, sock):
        fd = sock.fileno()
        inode = os.fstat(fd).st_ino
        with self._changed:
            key = next(self._keys)
            self._watched[key] = (deadline.at, fd, inode, deadline)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()
            self._changed.notify()
        return key

    def _forget(self, keys):
        # Under the same lock as the shutdown: once this returns, none of these
        # descriptors can be shut down, even if their numbers are reused.
        with self._changed:
            for key in keys:
                self._watched.pop(key, None)

    def close(self):
        """The thread ends once no call is watched (a call after this starts another)."""
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _run(self):
        with self._changed:
            while True:
                now = time.monotonic()
                for key, (at, fd, inode, deadline) in list(self._watched.items()):
                    if at <= now:
                        del self._watched[key]
                        deadline.expired = True
                        shut_down_socket(fd, inode)
                if self._closed and not self._watched:
                    self._thread = None
                    return
                soonest = min((entry[0] for entry in self._watched.values()), default=None)
                self._changed.wait(None if soonest is None else soonest - now)


def shut_down_socket(fd, inode):
    """shutdown() the socket behind descriptor `fd`, if it still is the one with `inode`.
    A duplicate descriptor is used, so the caller's own close() stays the only close."""
    try:
        duplicate = os.dup(fd)
    except OSError:
        return
    with socket.socket(fileno=duplicate) as sock:
        with contextlib.suppress(OSError):
            if os.fstat(duplicate).st_ino == inode:
                sock.shutdown(socket.SHUT_RDWR)


LOOKUPS_LEFT_HANGING = 4      # per owner: a developer's endpoints, or a channel's provider
HANGING_CALLS_MOST = 2        # other calls that cannot be interrupted, per key (a push channel)


class StillHanging(TimeoutError):
    """A call not made: too many earlier ones like it still run past their deadline."""


class Abandoned(TimeoutError):
    """A call given up on at its deadline, still running: it may yet do what it was for."""


class Deadline:
    """The time limit of one outbound call, from the name lookup to the last byte.
    Sockets passed to guard() are shut down if the call is still running when it
    passes; `expired` then says so."""

    def __init__(self, watch, seconds, owner=None):
        self.watch, self.seconds, self.owner = watch, seconds, owner    # owner: whose lookups may hang
        self.at = time.monotonic() + seconds
        self.stopping = False           # cut short by the server's stop (DeadlineWatch.end_by_stop())
        self.woken = threading.Event()  # set when `at` comes sooner, or a call run_abandonable() waits on ends
        self.expired = False
        self.began_sending = False      # part of a request went out: the far end may act on it, answered or not
        self._keys = []

    def __str__(self):
        return f"{self.seconds:g} s, as the server stopped" if self.stopping else f"{self.seconds:g} s"

    def end_by(self, at):
        """End at `at` if it is sooner than the deadline (its watch's lock held)."""
        if at < self.at:
            self.seconds = round(max(0.0, self.seconds - (self.at - at)), 1)
            self.at, self.stopping = at, True
            self.woken.set()

    def remaining(self):
        return max(0.001, self.at - time.monotonic())

    def passed(self):
        return self.expired or time.monotonic() >= self.at

    def guard(self, sock):
        self._keys.append(self.watch._watch(self, sock))
        return sock

    def resolve(self, host, port):
        """getaddrinfo() for a TCP connection, within the time left. Each lookup has its own
        thread, so one owner's slow names hold no one else's lookups; an owner with
        LOOKUPS_LEFT_HANGING lookups still hanging gets no new one until they end."""
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(host)
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)     # a literal: nothing to wait for
        return self.run_abandonable(("lookup", self.owner), socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM,
                                    most=LOOKUPS_LEFT_HANGING, doing=f"looking up {host}")

    def run_abandonable(self, key, call, *args, most=HANGING_CALLS_MOST, doing="the call"):
        """call(*args) on a thread of its own, waited for until the deadline: for what cannot
        be interrupted. Past the deadline the thread is left to end on its own, and while
        `most` such threads for `key` still run, no new call for it starts (StillHanging)."""
        with self.watch._changed:
            if self.watch.stragglers[key] >= most:
                raise StillHanging(f"earlier calls like {doing} are still hanging after {self.seconds} s")
        outcome = {}

        def run():
            try:
                outcome["value"] = call(*args)
            except BaseException as e:
                outcome["error"] = e
            finally:
                with self.watch._changed:
                    outcome["done"] = True
                    if outcome.get("abandoned"):
                        self.watch.stragglers[key] -= 1
                        self.watch.stragglers += collections.Counter()
                self.woken.set()

        threading.Thread(target=run, name="abandonable", daemon=True).start()
        # Until the call ends or the deadline passes, which a stop may bring closer (end_by()).
        while not outcome.get("done") and not self.passed():
            self.woken.wait(self.remaining())
            self.woken.clear()
        with self.watch._changed:
            if not outcome.get("done"):
                outcome["abandoned"] = True
                self.watch.stragglers[key] += 1
                self.expired = True
                raise Abandoned(f"no answer within {self} ({doing})")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.watch._forget(self._keys)


class PrivateAddressRefused(OSError):
    """An outbound call's host resolved to a non-public address, and those are not allowed."""


class CleartextRefused(OSError):
    """A live endpoint's URL is http:// where it must be https:// (cleartext_problem())."""


def open_connection(deadline, host, port, allow_private=True):
    """A TCP connection to host:port within the deadline: the name looked up with what
    time is left, each address tried in turn with what time is then left, and (unless
    allowed) non-public addresses skipped before anything reaches them."""
    last_error = None
    for family, kind, proto, _, address in deadline.resolve(host, port):
        if not allow_private and not is_public_address(address[0]):
            # Not naming the address: whoever registers a URL reads this, and the names of the
            # operator's own network would resolve for them here, one delivery at a time.
            last_error = PrivateAddressRefused(f"refused to connect to {host}: it resolves to an address that is"
                                               " not a public address (webhooks.allow_private = false)")
            continue
        if deadline.passed():
            raise TimeoutError(f"could not connect to {host} within {deadline}")
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(deadline.remaining())
            deadline.guard(sock).connect(address)
            return sock
        except OSError as e:
            sock.close()
            last_error = e
    raise last_error or OSError(f"{host} has no address to connect to")


# The most of an answer's status lines and headers that is read. A receiver needs a few hundred
# bytes; http.client alone takes 100 lines of 64 KiB, which it parses with 8 times their size.
ANSWER_HEAD_BYTES = 64 * 1024


class AnswerHeadTooLarge(http.client.HTTPException):
    """An answer's status lines and headers ran past ANSWER_HEAD_BYTES."""


class BoundedHeadResponse(http.client.HTTPResponse):
    """An answer whose head (interim 100 Continue ones included) is read only up to
    ANSWER_HEAD_BYTES; its body is read as any other's."""

    def begin(self):
        whole, self.fp = self.fp, HeadBudget(self.fp, ANSWER_HEAD_BYTES)
        try:
            super().begin()
        finally:
            if self.fp is not None:     # None: begin() closed it, the answer having no body
                self.fp = whole


class HeadBudget:
    """A response's file whose lines, together, may not run past `budget` bytes."""

    def __init__(self, fp, budget):
        self._fp, self._left = fp, budget

    def readline(self, limit=-1):
        line = self._fp.readline(self._left + 1 if limit < 0 else min(limit, self._left + 1))
        self._left -= len(line)
        if self._left < 0:
            raise AnswerHeadTooLarge(f"the answer's headers ran past {ANSWER_HEAD_BYTES // 1024} KiB")
        return line

    def __getattr__(self, name):
        return getattr(self._fp, name)


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """Opens every connection with open_connection(), so connecting and the SSRF check
    happen within the call's deadline and its sockets are watched by it. With `keep`
    above one, up to that many connections are kept alive between calls: one taken
    from the pool is watched by the deadline of the call that takes it (set per
    thread in .calls), and one idle for KEEP_ALIVE_IDLE is closed, not reused."""

    def __init__(self, deadline=None, allow_private=True, keep=1):
        self.fixed_deadline, self.allow_private = deadline, allow_private
        self.calls = threading.local()
        super().__init__(pool_connections=1, pool_maxsize=keep)

    def deadline(self):
        return self.fixed_deadline or self.calls.deadline

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        adapter = self

        def watched(connection_class):
            class Watched(connection_class):
                tunnelling = False
                response_class = BoundedHeadResponse

                def _new_conn(self):
                    return open_connection(adapter.deadline(), self._dns_host, self.port, adapter.allow_private)

                def _tunnel(self):
                    self.tunnelling = True      # a CONNECT to a proxy: nothing went to the far end yet
                    try:
                        super()._tunnel()
                    finally:
                        self.tunnelling = False

                def send(self, data):
                    super().send(data)          # connecting first, if it has not yet
                    if not self.tunnelling:
                        adapter.deadline().began_sending = True

            Watched.__name__ = "Deadline" + connection_class.__name__
            return Watched

        class KeptAlive:
            def _get_conn(self, timeout=None):
                conn = super()._get_conn(timeout)
                if conn.sock is not None:
                    if time.monotonic() - conn.idle_since > KEEP_ALIVE_IDLE:
                        conn.close()            # the server may be closing it right now
                    else:
                        adapter.deadline().guard(conn.sock)
                        adapter.calls.reused = True
                return conn

            def _put_conn(self, conn):
                if conn is not None:
                    conn.idle_since = time.monotonic()
                super()._put_conn(conn)

        self.poolmanager.pool_classes_by_scheme = {
            "http": type("DeadlineHTTPPool", (KeptAlive, urllib3.HTTPConnectionPool),
                         {"ConnectionCls": watched(urllib3.connection.HTTPConnection)}),
            "https": type("DeadlineHTTPSPool", (KeptAlive, urllib3.HTTPSConnectionPool),
                          {"ConnectionCls": watched(urllib3.connection.HTTPSConnection)}),
        }

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        # An outbound proxy from the environment (Twilio's library honours HTTPS_PROXY): its
        # connections, to the proxy, are made and watched the same way. (Not a SOCKS proxy's,
        # whose connections are of a kind of their own.)
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, urllib3.ProxyManager):
            manager.pool_classes_by_scheme = self.poolmanager.pool_classes_by_scheme
        return manager


# A kept-alive connection is reused only this long after its last answer: servers close idle
# ones after 5 s (Node) to 75 s (nginx), and a request sent as the server closes is lost.
KEEP_ALIVE_IDLE = 4.0


def under_deadline(session, deadline, allow_private=True):
    """`session`, with every connection it opens made by open_connection()."""
    adapter = _DeadlineAdapter(deadline, allow_private)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def claim_expiry(config, at_least_seconds, now=None):
    """When a claim on a send or a delivery made `now` (a datetime) lapses, so that it may be
    claimed again: well past the call's whole deadline, so only a crash ever leaves one to be
    taken twice."""
    seconds = max(at_least_seconds, 3 * config["outbound.deadline_seconds"])
    return db_time((now or utcnow()) + dt.timedelta(seconds=seconds))


def lapse_claims_of_a_stopped_server(conn):
    """At a start, under only_server()'s lock: every claim still held on a send or a delivery
    was held by a server that stopped without finishing it (a crash, a kill), as no other
    serves this database. Lapsed now, the jobs record each as cut short and try it again on
    its schedule, seconds later instead of after the rest of the claim: a kill during a
    slow send left the person unasked for two minutes, and a short pause timed out first."""
    now = db_time()
    with transaction(conn):
        # Each written with its partial index's own terms, so that is the index scanned.
        for livemode in (0, 1):
            conn.execute("UPDATE notifications SET next_attempt_at = ? WHERE status IN ('queued', 'sending')"
                         f" AND livemode = {livemode} AND status = 'sending' AND next_attempt_at > ?", (now, now))
        conn.execute("UPDATE webhook_deliveries SET next_attempt_at = ? WHERE status IN ('pending', 'delivering')"
                     " AND status = 'delivering' AND next_attempt_at > ?", (now, now))


SLOW_FOR = dt.timedelta(minutes=10)
# The kind of outbound call a test-mode webhook delivery is (a live one's is "webhook").
TEST_WEBHOOK = "test webhook"


class OutboundPool:
    """The bounded pool every outbound call runs on: webhook deliveries and live
    notification sends. Each call holds a slot counted against its target (one
    webhook endpoint, or one channel's provider) and its developer, and claims go
    to the developers with the fewest calls in flight. Webhook calls are capped
    per developer, because a developer chooses their receivers and a slow one is
    theirs to fix; sends go to the operator's providers, so they are capped per
    channel instead: a hung mail server holds half the workers at most, and a
    developer's emails never wait behind their own stuck webhooks.

    The last quarter of the workers is kept for developers and targets with nothing
    in flight, so even several stalling tenants (or two hung providers) leave room
    for everyone else's first call. And a target whose last call took half its
    deadline or more is slow for SLOW_FOR: all slow targets together get half the
    workers, so many accounts with stalling receivers cannot take the rest."""

    def __init__(self, workers, per_developer, deadline_seconds=10.0, disk_full=None):
        self.workers, self.per_developer = workers, per_developer
        self.slow_call_seconds = deadline_seconds / 2
        # A hung provider may hold half the workers; the rest keep other channels and webhooks moving.
        self.per_channel = max(1, workers // 2)
        self.kept_for_newcomers = max(1, workers // 4)
        self.executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="outbound")
        self.disk_full = disk_full or WriteRefusals()    # to say once when calls cannot record their end
        self.deadlines = DeadlineWatch()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        self._by_developer = collections.Counter()    # calls in flight per developer: who goes first
        self._by_target = collections.Counter()       # per ('webhook', id) or ('channel', name)
        self._capped = collections.Counter()          # per (developer, kind) for calls with a developer limit
        self.slow_share = max(1, workers // 2)
        self._slow_until = {}                         # target -> monotonic time it stops counting as slow
        self._slow_calls = collections.Counter()      # calls in flight to targets that were slow when they began

    def free(self):
        with self._lock:
            return self.workers - self._busy

    def fair_order(self, due):
        """Items of {developer id: [items]}, one developer at a time, starting with
        those that have the fewest calls in flight (ties in random order)."""
        with self._lock:
            order = sorted(due, key=lambda developer_id: (self._by_developer[developer_id], random.random()))
        queues = [collections.deque(due[developer_id]) for developer_id in order]
        while queues:
            for queue in list(queues):
                yield queue.popleft()
                if not queue:
                    queues.remove(queue)

    def reserve(self, developer_id, target, target_limit, developer_limit=None):
        """Take a slot for one call if the pool and the target have room and, for a call
        with a developer_limit, the developer's calls of that kind have room too."""
        with self._lock:
            caps = self._caps(developer_id, target, developer_limit)
            newcomer = not self._by_developer[developer_id] and not self._by_target[target]
            free = self.workers - self._busy
            slow = self._slow_until.get(target, 0) > time.monotonic()
            if (free <= (0 if newcomer else self.kept_for_newcomers) or self._by_target[target] >= target_limit
                    or any(self._capped[key] >= limit for key, limit in caps)
                    or slow and sum(self._slow_calls.values()) >= self.slow_share):
                return False
            self._slow_calls[target] += slow
            self._busy += 1
            self._by_developer[developer_id] += 1
            self._by_target[target] += 1
            self._capped.update(key for key, _ in caps)
            return True

    @staticmethod
    def _caps(developer_id, target, developer_limit):
        """The developer's counts a call with a developer_limit counts in, with their limits:
        its kind's (a test webhook's are a webhook's too), and for a test webhook, its own,
        one short of that, so a developer's stalled test endpoints always leave their live
        events a call."""
        if developer_limit is None:
            return []
        if target[0] != TEST_WEBHOOK:
            return [((developer_id, target[0]), developer_limit)]
        return [((developer_id, "webhook"), developer_limit),
                ((developer_id, TEST_WEBHOOK), max(1, developer_limit - 1))]

    def release(self, developer_id, target, developer_limit=None):
        with self._lock:
            self._busy -= 1
            self._by_developer[developer_id] -= 1
            self._by_target[target] -= 1
            self._capped.subtract(key for key, _ in self._caps(developer_id, target, developer_limit))
            self._slow_calls[target] -= self._slow_calls[target] > 0
            for counter in (self._by_developer, self._by_target, self._capped, self._slow_calls):
                counter += collections.Counter()        # drop zero counts
            if not self._busy:
                self._idle.notify_all()

    def wait_idle(self, timeout):
        """Wait until no call is in flight; False if some still are after `timeout` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._busy, timeout)

    def took(self, target, seconds):
        """Note how long a call to `target` took: a slow one marks it slow for SLOW_FOR."""
        with self._lock:
            if seconds >= self.slow_call_seconds:
                if len(self._slow_until) > 10_000:
                    self._slow_until = {t: u for t, u in self._slow_until.items() if u > time.monotonic()}
                self._slow_until[target] = time.monotonic() + SLOW_FOR.total_seconds()
            elif seconds < self.slow_call_seconds / 5:
                self._slow_until.pop(target, None)

    def run(self, slot, call, *args, then=None):
        """Run call(*args) on a worker in a slot taken with reserve(*slot); the slot is freed after, then then()."""
        def work():
            started = time.monotonic()
            name = getattr(call, "__name__", call)
            try:
                call(*args)
            except Exception as e:
                if not write_refused(e):
                    log.exception("outbound call %s failed unexpectedly", name)
                else:
                    self.disk_full.failed(f"outbound call {name}", e)
            else:
                self.disk_full.succeeded(f"outbound call {name}")
            finally:
                self.took(slot[1], time.monotonic() - started)
                self.release(*slot)
                if then is not None:
                    then()
        self.executor.submit(work)

    def shutdown(self):
        # Calls under way finish (each is bounded by its deadline) and are recorded.
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.deadlines.close()


###############################################################################
# Channels
###############################################################################

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


@dataclasses.dataclass(frozen=True)
class Channel:
    """How one kind of notification reaches a human.

    Test-mode pauses never send, so only live pauses need missing_settings()
    to be empty. send(config, notification, pause, deadline) returns the
    provider's message id (or None) or raises ChannelError; it hands its sockets
    to deadline.guard() where the library lets it.
    """
    name: str
    kind: str                     # 'twilio', 'email', 'apprise' or 'link'
    recipient: dict               # JSON Schema for the recipient, beyond being visible text
    missing_settings: object      # config -> [setting names a live send still needs]
    render: object = None         # (pause, respond_url) -> the exact text sent; None: nothing is sent
    send: object = None


class ChannelError(Exception):
    """A send failed. A transient failure is retried until NOTIFICATION_ATTEMPTS are
    used; a permanent one (the provider refused this message) fails at once. One that
    may_have_reached the person failed after its request went out and before the
    provider answered: the provider may have sent it."""

    def __init__(self, message, permanent=False, may_have_reached=False):
        super().__init__(message)
        self.permanent, self.may_have_reached = permanent, may_have_reached


def channels(config):
    """The channels this server offers: the built-in ones and one per [channels.NAME] target."""
    found = {
        "sms": Channel("sms", "twilio", PHONE_RECIPIENT, twilio_missing,
                       sms_text if takes_replies(config) else functools.partial(sms_text, replies=False), send_twilio),
        "whatsapp": Channel("whatsapp", "twilio", PHONE_RECIPIENT, whatsapp_missing, sms_text, send_twilio),
        "email": Channel("email", "email", EMAIL_RECIPIENT, smtp_missing, email_text, send_email),
        "link": Channel("link", "link", LABEL_RECIPIENT, lambda config: []),
    }
    for key, url in config.items():
        match = CHANNEL_KEY.match(key)
        if match:
            found[match.group(1)] = Channel(match.group(1), "apprise", LABEL_RECIPIENT, lambda config: [],
                                            functools.partial(push_text, target_url=url),
                                            functools.partial(send_apprise, url))
    return found


PHONE_RECIPIENT = {"type": "string", "maxLength": 320, "pattern": "^\\s*" + E164.pattern[1:-1] + "\\s*$",
                   "x-message": "recipient must be a phone number in E.164 form, like +15550100 (a + and 7-15 digits)"}
EMAIL_RECIPIENT = {"type": "string", "maxLength": 254, "pattern": EMAIL.pattern,
                   "x-message": "recipient must be an email address like ada@example.com"}
# Push targets and links are named in config or delivered by the agent; the
# recipient only says who is expected to answer, for the audit log.
LABEL_RECIPIENT = {"type": "string", "maxLength": 200,
                   "x-message": "recipient must be text of at most 200 characters: who is expected to answer"}


def may_use_channel(config, name, email):
    """Whether the developer whose account has `email` (None: no one known) may name channel
    `name`: every built-in channel and every push target without a developers list they may.
    Emails are told apart as accounts are, without regard to ASCII case."""
    allowed = config.get(f"channels.{name}.developers")
    return allowed is None or "*" in allowed or (email or "").lower() in (item.lower() for item in allowed)


def as_seen_by(config, email):
    """The config as the developer with `email` may use it (None: as every developer may):
    without the push targets whose developers list leaves them out. To them such a target is
    no channel at all, so naming it is refused as an unknown name is, and nothing lists it."""
    hidden = tuple(f"channels.{listed.group(1)}." for listed in map(CHANNEL_DEVELOPERS_KEY.match, config)
                   if listed and not may_use_channel(config, listed.group(1), email))
    return {key: value for key, value in config.items() if not key.startswith(hidden)} if hidden else config


def known_channel(config, name):
    """The named channel; ChannelError once the operator has removed it from the config."""
    channel = channels(config).get(name)
    if channel is None:
        raise ChannelError(f"channel {name!r} is not configured on this server")
    return channel


def channel_of(conn, config, name, developer_id):
    """The named channel as a pause's developer may use it now: ChannelError once the operator
    has removed it, or has since left the developer off its developers list, so that a list
    added later stops what pauses made before it would still send through the target."""
    if f"channels.{name}.developers" in config:
        email = query_db(conn, "SELECT email FROM developers WHERE id = ?", (developer_id,), one=True)
        config = as_seen_by(config, email and email[0])
    return known_channel(config, name)


def twilio_missing(config):
    missing = [key for key in ("twilio.account_sid", "twilio.auth_token") if not config[key]]
    if not config["twilio.from_number"] and not config["twilio.messaging_service_sid"]:
        missing.append("either twilio.from_number or twilio.messaging_service_sid")
    return missing


def takes_replies(config):
    """Whether texts go out from something a person can text back: a number or a short code,
    not an alphanumeric sender ID (a Messaging Service is taken to)."""
    return bool(config["twilio.messaging_service_sid"]
                or not ALPHANUMERIC_SENDER.fullmatch(config["twilio.from_number"]))


def whatsapp_missing(config):
    """WhatsApp sends only from a number: a short code or sender ID set for texts is none."""
    missing = twilio_missing(config)
    if not missing and not config["twilio.messaging_service_sid"] and not E164.fullmatch(config["twilio.from_number"]):
        missing.append("twilio.from_number as a WhatsApp-enabled number in E.164 form (or"
                       " twilio.messaging_service_sid)")
    return missing


def all_of(needed):
    """'a', 'a and b', 'a, b and c': settings that are each needed, not one of them."""
    return " and ".join(filter(None, [", ".join(needed[:-1]), needed[-1]]))


def smtp_missing(config):
    return [key for key in ("smtp.host", "smtp.from_address") if not config[key]]


def reply_options(pause):
    """'Reply K7 1 for Approve,\nK7 2 for Reject': what an SMS reply may say (see record_sms_reply).
    Each option starts a line: run on in one, an option of "Keep, 2 for Reject" read as our
    words, and whoever texted 2 to reject chose the next option."""
    options = json.loads(pause["options"])
    code = f"{pause['reply_code']} " if pause["reply_code"] else ""
    return "Reply " + ",\n".join(f"{code}{n} for {option}" for n, option in enumerate(options, 1))


def human_duration(seconds):
    """'1.5 h', '12.0 min', '40 s': the overview's times and the respond page's time left."""
    if seconds is None:
        return "—"
    seconds = round(seconds)            # julianday() arithmetic is a few microseconds off
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def human_share(share):
    """'25%', '<1%', '>99%': the overview's timeout share, in whole percent. A share that is
    neither none nor all never reads as 0% or 100%: one timeout in 300 is not none."""
    if share is None:
        return "—"
    shown = f"{share:.0%}"
    if shown == "0%" and share > 0:
        return "<1%"
    return ">99%" if shown == "100%" and share < 1 else shown


def human_time(db_text):
    """'Nov 28 23:51 UTC': short enough for an SMS, plain enough for anyone."""
    return parse_db_time(db_text).strftime("%b %d %H:%M UTC")


def expiry_text(pause):
    return human_time(pause["expires_at"])


# Long numbers are shown with their digits in threes, spaced as SI writes them, which no reader
# takes for a decimal point: in much of Europe "340,000" is 340 and "340.000" is 340,000, and
# an approver who misreads an amount approves the wrong one. Texts take a plain space (GSM-7).
NARROW_SPACE = "\u202f"


def field_display(value, separator=NARROW_SPACE):
    """A field's value as a person reads it: Yes/No, 1250000 -> '1 250 000', text as it is."""
    if isinstance(value, bool):
        return "Yes" if value else "No"
    return grouped_number(value, separator) if isinstance(value, (int, float)) else value


def grouped_number(number, separator):
    """12000000.5 -> '12 000 000.5'; numbers of four digits or fewer before the point as they are.
    Never in exponent notation, which Python writes for a float below 0.0001 or from 1e16 on:
    '5e-05' BTC reads as 5 BTC to many, and '1.5e+21' as 1.5."""
    text = format(decimal.Decimal(repr(number)), "f") if isinstance(number, float) else str(number)
    whole, point, fraction = text.partition(".")
    if len(whole.lstrip("-")) < 5 or not whole.lstrip("-").isdigit():
        return text
    return f"{int(whole):,}".replace(",", separator) + point + fraction


def fields_text(pause, separator=NARROW_SPACE):
    """A line for each of the pause's fields, so whoever answers from a text sees what they
    approve; the respond page is where editable ones change. A text value's line breaks are
    spaces here, as a detail's are (shown_lines()): it is data the agent may have read
    elsewhere (an invoice's payee), and broken into lines it would read as lines we wrote
    ("Reply 1 for Reject", an answer link)."""
    fields = json.loads(pause["fields"] or "{}")
    return "".join(f"{field.get('label', name)}: {field_line(field['value'], separator)}\n"
                   for name, field in fields.items())


def field_line(value, separator):
    """A field's value as field_display() shows it, on one line."""
    return shorten(value, None) if isinstance(value, str) else field_display(value, separator)


def title_line(pause):
    """The title on one line, as the page's heading shows it: broken into lines, it could read
    as lines the server wrote ("Reply K5 1 for Reject")."""
    return f"{shorten(pause['title'], None)}\n" if pause["title"] else ""


def shown_lines(pause, longest=None):
    """What the respond page shows beside the question, a line each: the details its agent
    listed in "display", then its fields, for an email or a push. Not in a text message:
    details may be up to 16 KB (a whole tool call, say), which no text holds; its link shows them.
    A detail's line breaks are spaces here, as in the page's table: free-form text (a mail
    read by the agent, say) broken into lines would read as the message's own lines, an
    "Answer:" link of its choosing among them. Each cut to `longest` characters, if given."""
    lines = (f"{shorten(detail['name'], None)}: {shorten(detail['value'], None)}" for detail in shown_details(pause))
    return "".join(f"{shorten(line, longest)}\n" for line in lines) + fields_text(pause)


# What a push shows of each displayed detail. Push targets take a few thousand characters at
# most (Telegram 4096, Discord 2000, ntfy 4 KB, else an attachment) and refuse or cut a longer
# message: a 15 KB tool call shown whole would lose the question's link, or the push. The
# page the link opens shows each detail whole.
PUSH_DETAIL_CHARACTERS = 200


def sms_text(pause, url, replies=True):
    """As few segments as possible: no decoration, GSM-7 characters only in what we add. From
    a sender that takes no replies, only the link. The agent's title and message are each one
    line in quotes, as an email quotes them with "> ": as lines of their own, its "Reply 1 for
    Reject, 2 for Approve" read as ours, and a person who texted 2 to reject approved."""
    answer = (f"{reply_options(pause)},\nor open {url}" if replies
              else f"{' / '.join(json.loads(pause['options']))}: open {url}")
    # Its fields' lines (label and value, both the agent's) are quoted too.
    asked = [pause["title"], pause["message"], *fields_text(pause, " ").splitlines()]
    return "".join(f"{quoted_line(text)}\n" for text in asked if text) + f"{answer}\nExpires {expiry_text(pause)}"


# What a reader takes for a double quote: the mark and its look-alikes (Unicode's confusables
# of ", as "'' ", and the quotation mark ornaments), which become one single quote in a quoted
# line, and single quotes side by side (with what is drawn as nothing between them or not: any
# of Unicode's Default_Ignorable_Code_Point), which become one. Of the confusables of ' the
# letters of scripts (a Hebrew yod) are left out: "יי" is a word.
DOUBLE_QUOTES = str.maketrans(dict.fromkeys('"“”„‟″‶ʺ˝ˮ˶״＂〃〝〞〟᳓❝❞⹂🙶🙷🙸', "'"))
SINGLE_QUOTES = "'‘’‚‛′‵ʹʻʼʽʾˈˊˋ˴`´＇׳΄՚՝ߴߵ᾽᾿῾ꞌ｀\u0374\u1fef\u1ffd"   # (escaped: an editor may save them as ʹ ` ´)
DRAWN_AS_NOTHING = ("[\u00ad\u061c\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff\ufff0-\ufff8\U0001bca0-\U0001bca3"
                    f"\U0001d173-\U0001d17a\U000e0000-\U000e0fff{INVISIBLE.pattern[1:-1]}]")
QUOTES_SIDE_BY_SIDE = re.compile(f"[{SINGLE_QUOTES}](?:{DRAWN_AS_NOTHING}*[{SINGLE_QUOTES}])+")


def quoted_line(text):
    """`text` on one line in double quotes it cannot close: a quote mark of its own would end
    them early, and what follows read as ours, so its own are single ones (GSM-7 too), as are
    its look-alikes of one ("”", "＂", "''")."""
    return '"' + QUOTES_SIDE_BY_SIDE.sub("'", shorten(text, None).translate(DOUBLE_QUOTES)) + '"'


def push_text(pause, url, target_url=None, opening=""):
    """What the agent wrote, quoted and shown as written on the push target at target_url, then
    our link, after an `opening` of ours if any: within what one message to the target may hold,
    the question cut short if it must be (its options too, if they alone would leave it little
    room), never the link nor the opening. Each of the
    agent's lines is quoted, "> " before it as an email quotes them (email_text()): as lines of
    their own, its "Answer: https://evil.example/…" or "Options: …" read as ours, above our link.
    Quoted before it is cut, so the part cut short is quoted too; written for a Markdown target
    the ">" is escaped, shown as the mark it is rather than drawn as a quote block, which a line
    of ours right after it would be drawn inside of (CommonMark's lazy continuation)."""
    options = f"Options: {' / '.join(shorten(option, None) for option in json.loads(pause['options']))}\n"
    listed = shown_lines(pause, PUSH_DETAIL_CHARACTERS)
    asked = quoted_lines(f"{title_line(pause)}{pause['message']}" + (listed and f"\n\n{listed}")) + "\n"
    ours = f"Answer: {url}\nExpires {expiry_text(pause)}"
    dialect = push_dialect(target_url) if target_url else PLAIN_PUSH
    whole = opening + as_written(dialect, asked + options) + ours
    if dialect.takes is None or dialect.takes(whole):
        return whole
    listed = as_written(dialect, options)
    if dialect.takes(opening + listed + listed + ours):     # the options leave the question half the room or more
        return cut_to_fit(dialect, opening, asked, listed + ours)
    return cut_to_fit(dialect, opening, asked + options, ours)


def quoted_lines(text):
    """Each line of `text` after "> ", as a mail reply quotes it; a blank one a lone ">"."""
    return "\n".join(f"> {line}".rstrip() for line in text.rstrip("\n").split("\n"))


# What ends a question cut short to fit a push target's longest message.
CUT_SHORT = "…\n(cut short: the link shows all of it)\n"


def cut_to_fit(dialect, before, text, after):
    """The longest beginning of `text`, as written for `dialect`, with CUT_SHORT and then
    `after`, and `before` ahead of it all (both ours, as they go), that the target takes in one message."""
    def message(length):
        return before + as_written(dialect, text[:length].rstrip() + CUT_SHORT) + after
    too_long = bisect.bisect_left(range(len(text) + 1), True, key=lambda length: not dialect.takes(message(length)))
    return message(max(too_long - 1, 0))


# Chat services draw the text of a push. Discord, Mattermost and Zulip read it as Markdown, and
# they, Rocket.Chat, Matrix and Telegram notify whoever it mentions. Apprise escapes a plain-text body only
# for a service it sends Markdown or HTML (Telegram, Rocket.Chat; Slack's &, < and >), so on
# these an agent's "[Approve](https://evil.example)" would be a live link dressed as ours, and
# its "@everyone" would ping a whole server (with ?format=markdown, Apprise's Discord plugin
# itself turns each mention it finds in the body into a ping). The agent's text goes to them
# with each character their Markdown reads escaped, and said to be Markdown, so that Apprise
# escapes nothing twice; a zero-width space after each @ mentions no one.
#   Where Apprise does escape for Markdown (Rocket.Chat, Google Chat, Teams, ntfy or Gotify with
# ?format=markdown) it escapes the whole text, our link too: "https://pp\.example/respond/a\_b",
# which an app that links bare addresses may cut at the first backslash, or keep the backslashes
# in (Google Chat keeps "\_"). There too we escape only the agent's text; our link goes whole.
COMMONMARK_MARKUP = "\\`*_~|[]()<>#+-=.!{}&"    # CommonMark takes a backslash before any of them
PYTHON_MARKDOWN_MARKUP = "\\`*_[]()>#+-.!{}"    # Zulip's Python-Markdown shows "\~" as written: not escaped
# Discord takes a backslash before any punctuation, but reads fewer of them, and every
# backslash costs one of the 2000 characters a message may have: a tool call's JSON stays short.
DISCORD_MARKUP = "\\`*_~|[]()<>#-"
MARKDOWN_PUSH_SERVICES = {"Discord": DISCORD_MARKUP, "Mattermost": COMMONMARK_MARKUP,
                          "Zulip": PYTHON_MARKDOWN_MARKUP}
# Telegram notifies a group's member named by @username, even where the group is muted.
MENTIONING_PUSH_SERVICES = {"Discord", "Mattermost", "Zulip", "Rocket.Chat", "Matrix", "Telegram"}


# How a push target draws what it is sent: `markup`, the characters it reads as Markdown ("" for
# none); `mentions`, whether an @ there may notify people; `takes`, whether one message to it
# may hold a text we hand Apprise (None: any), which a longer one would be refused or cut for.
PushDialect = collections.namedtuple("PushDialect", "markup mentions takes")
PLAIN_PUSH = PushDialect("", False, None)
PUSH_TITLE = "Approval needed"
# ntfy makes a message of more than 4,096 bytes a file attached to the push, which the phone
# shows as "attachment.txt": the question and its link out of sight. Apprise does the same
# with one whose JSON runs past 8,000 characters, each character past ASCII a \u escape of six
# (twelve for an emoji): 1,600 of Cyrillic are 9,600.
NTFY_MESSAGE_BYTES = 4096
# Apprise's figure for an SMS service (Twilio, Vonage, ClickSend, Sinch and some twenty more)
# is one segment, 160 characters (Plivo's 140 bytes): they send a longer text as joined
# segments, as carriers do. Held to one segment, a push held the title, the link and the
# expiry, and none of the question; it may hold six joined segments (153 characters each).
SMS_SEGMENT_FIGURES = (140, 160)
SMS_JOINED = 6 * 153


@functools.lru_cache(maxsize=64)
def push_dialect(target_url):
    """The PushDialect of the push target at target_url. By the service Apprise picks, however
    the URL names it (discord://… or https://discord.com/api/webhooks/…). Its longest message
    is Apprise's figure for the service (Discord 2000, Pushover 1024, Rocket.Chat 1000,
    Telegram 4096), less our title where Apprise puts that in the message or the service
    counts it in; on ntfy, 4,096 bytes too."""
    apprise = load_apprise()
    target = apprise.Apprise.instantiate(target_url)
    service = str(target.service_name)
    markup = MARKDOWN_PUSH_SERVICES.get(service)
    if markup is None and target.resolve_format(apprise.NotifyFormat.TEXT) == apprise.NotifyFormat.MARKDOWN:
        markup = COMMONMARK_MARKUP
    mentions = service in MENTIONING_PUSH_SERVICES
    if not target.body_maxlen:
        return PushDialect(markup or "", mentions, None)
    titled = target.title_maxlen <= 0 or target.overflow_amalgamate_title
    most = SMS_JOINED if SMS_SEGMENT_FIGURES[0] <= target.body_maxlen <= SMS_SEGMENT_FIGURES[1] else target.body_maxlen
    longest = most - (len(PUSH_TITLE) + len("# \n") if titled else 0)
    limits = (((json_length, longest), (utf8_length, NTFY_MESSAGE_BYTES)) if service == "ntfy" else
              ((shown_length, longest),) if service == "Telegram" else ((len, longest),))
    return PushDialect(markup or "", mentions, functools.partial(apprise_takes, target, push_format(markup), limits))


def json_length(text):
    """How long `text` is in JSON as Apprise writes it: past ASCII, a \\u escape of six a character."""
    return len(json.dumps(text)) - 2


def utf8_length(text):
    return len(text.encode())


def shown_length(html_text):
    """How long HTML is as shown, which Telegram counts its 4,096 characters by: Apprise sends it
    each < of the agent's as &lt;, four characters that show as one."""
    return len(html.unescape(re.sub("<[^>]*>", "", html_text)))


def push_format(markup):
    """The format a push's text is handed to Apprise in: Markdown where push_text escaped the
    agent's text for a target that reads it, else text."""
    return load_apprise().NotifyFormat.MARKDOWN if markup else load_apprise().NotifyFormat.TEXT


def apprise_takes(target, body_format, limits, text):
    """Whether `target` (an Apprise plugin) takes one message of `text`, handed to it in
    body_format, within each of `limits` ((measure, most) pairs). Measured as Apprise sends
    it: written in the service's format and dialect, which may be longer (Google Chat's
    &lt; for <, Pushover's <br> for a line break when sent HTML)."""
    sent_as = target.resolve_format(body_format)
    sent = target.dialect_convert(load_apprise().conversion.convert_between(body_format, sent_as, text), sent_as)
    return all(measure(sent) <= most for measure, most in limits)


def as_written(dialect, text):
    """Text the agent wrote, such that a target of `dialect` (a PushDialect) shows it as written."""
    if dialect.markup:
        text = re.sub(f"([{re.escape(dialect.markup)}])", r"\\\1", text)
    return text.replace("@", "@\u200b") if dialect.mentions else text


def email_subject(pause):
    first_line = pause["message"].strip().splitlines()[0]
    return "Approval needed: " + (first_line if len(first_line) <= 80 else first_line[:79] + "…")


def email_text(pause, url):
    """The plain-text part. What the agent wrote is quoted, "> " before each of its lines as a
    mail reply quotes, under a line of ours: its message may hold lines of any kind, and
    unquoted "Choose one:" or "Recorded: Reject, you may close this" read as ours, as on the
    page outside its frame. An option's runs of spaces are one space, as on the page: "https://evil.example/a"
    and 60 spaces before its last word would sit where its line's link seems to be, ours pushed out of sight."""
    options = "\n".join(f"  {shorten(option, None)}: {url}?choice={urllib.parse.quote(option)}"
                        for option in json.loads(pause["options"]))
    listed = shown_lines(pause).rstrip()
    fields = listed and f"\n\n{listed}"
    title = title_line(pause) and title_line(pause) + "\n"
    asked = quoted_lines(f"{title}{pause['message']}{fields}")
    return (f"Subject: {email_subject(pause)}\n\nAn agent is asking:\n{asked}\n\nChoose one (each link opens a page"
            f" where you confirm):\n{options}\n\nThis request expires {expiry_text(pause)}.")


# What Twilio's own words for an error leave the operator to find out.
TWILIO_ERROR_HINTS = {
    21610: "; the person texted STOP (or CANCEL, END, QUIT, UNSUBSCRIBE, STOPALL) to the server's number,"
           " which Twilio and carriers take as unsubscribing them from it: nothing reaches them from it until"
           " they text START",
}


def delivery_reports(config):
    """Where Twilio is to report what became of a text (twilio_status()): Twilio takes a text
    and may fail to deliver it later. Only to server.base_url: the address made up without it
    is one Twilio cannot reach, nor sign for as it is checked."""
    return {"status_callback": base_url(config) + TWILIO_STATUS_PATH} if config["server.base_url"] else {}


def send_twilio(config, notification, pause, deadline):
    """One SMS or WhatsApp message through the Twilio REST API (or a compatible one at twilio.api_base)."""
    http_client = twilio.http.http_client.TwilioHttpClient(timeout=deadline.remaining())
    under_deadline(http_client.session, deadline)
    client = twilio.rest.Client(config["twilio.account_sid"], config["twilio.auth_token"], http_client=http_client)
    client.api.base_url = config["twilio.api_base"].rstrip("/")
    prefix = "whatsapp:" if notification["channel"] == "whatsapp" else ""
    sender = ({"messaging_service_sid": config["twilio.messaging_service_sid"]}
              if config["twilio.messaging_service_sid"] else {"from_": prefix + config["twilio.from_number"]})
    try:
        with http_client.session:
            message = client.messages.create(to=prefix + notification["recipient"], body=notification["text"],
                                             **sender, **delivery_reports(config))
    except twilio.base.exceptions.TwilioRestException as e:
        # 4xx means Twilio refused this message (bad number, unverified sender…): retrying changes nothing.
        said = f"Twilio answered HTTP {e.status}" + (f" (error {e.code})" if e.code else "") + f": {e.msg}"
        raise ChannelError(said + TWILIO_ERROR_HINTS.get(e.code, ""),
                           permanent=400 <= e.status < 500 and e.status != 429) from None
    except (twilio.base.exceptions.TwilioException, requests.RequestException) as e:
        # Twilio's API takes no idempotency key, so a message sent but unanswered cannot be
        # asked about: the person may have it, and a retry may send it again.
        if deadline.passed():
            what = f"Twilio did not answer within {deadline}"
        else:
            what = f"no answer from Twilio: {e}" if deadline.began_sending else f"could not reach Twilio: {e}"
        raise ChannelError(what + ("; Twilio may have sent it" if deadline.began_sending else ""),
                           may_have_reached=deadline.began_sending) from None
    return message.sid


def send_email(config, notification, pause, deadline):
    """The question by email (email_message()), under the deadline from the moment it connects."""
    message = email_message(config, notification, pause)
    security, host, port = config["smtp.security"], config["smtp.host"], config["smtp.port"]
    try:
        context = ssl.create_default_context(cafile=config["smtp.ca_file"] or None)

        class DeadlineSMTP(smtplib.SMTP_SSL if security == "tls" else smtplib.SMTP):
            """Under the deadline from the moment it connects, greeting and TLS handshake included."""
            def _get_socket(self, host, port, timeout):
                sock = open_connection(deadline, host, port)
                return context.wrap_socket(sock, server_hostname=host) if security == "tls" else sock

            def getreply(self):
                code, text = super().getreply()
                if code == 354:     # DATA's go-ahead: from here the server may take the message, answered or not
                    deadline.began_sending = True
                return code, text

        server = DeadlineSMTP(host, port, timeout=deadline.remaining(),
                              **({"context": context} if security == "tls" else {}))
        try:
            if security == "starttls":
                server.starttls(context=context)
            if config["smtp.username"]:
                server.login(config["smtp.username"], config["smtp.password"])
            server.send_message(message)
        finally:
            # Once the server answered the message with 250 it is sent: how QUIT goes changes nothing.
            with contextlib.suppress(smtplib.SMTPException, OSError):
                server.quit()
            server.close()
    except smtplib.SMTPNotSupportedError as e:
        if security != "starttls" or "STARTTLS" not in str(e):
            raise smtp_failure(e, f"SMTP {host}:{port}", deadline) from None
        # The default setting against a relay without TLS: say which setting to change.
        raise ChannelError(f"SMTP {host}:{port}: {e} (smtp.security is \"starttls\"; set it to \"tls\" for a"
                           " server that speaks TLS from the start, usually on port 465, or to \"none\" for a"
                           " relay without TLS)") from None
    except (smtplib.SMTPException, OSError) as e:
        raise smtp_failure(e, f"SMTP {host}:{port}", deadline) from None
    return message["Message-ID"]


def email_message(config, notification, pause):
    """A plain-text and an HTML part; every button opens the respond page, none decides on GET."""
    message = email.message.EmailMessage()
    # Raw: given as text, it would be folded again, and the agent's characters written in the clear.
    message.set_raw("Subject", as_header_text(notification["text"].split("\n", 1)[0].removeprefix("Subject: ")))
    message["From"] = config["smtp.from_address"]
    message["To"] = notification["recipient"]
    # The same on every attempt, so a mail system that got an earlier one can tell this is it again.
    message["Message-ID"] = f"<{notification['id']}@{message['From'].addresses[0].domain}>"
    # Required of every message (RFC 5322), and added by no mail server to what a client relays.
    message["Date"] = email.utils.format_datetime(parse_db_time(notification["created_at"]), usegmt=True)
    message.set_content(notification["text"].split("\n\n", 1)[1])
    message.add_alternative(bottle.template("email", template_lookup=TEMPLATE_LOOKUP, **TEMPLATE_HELPERS,
                                            url=respond_url(config, pause["respond_token"]),
                                            pause=respond_facts(pause), expires=expiry_text(pause),
                                            reminder=notification["kind"] == "reminder",
                                            quote=urllib.parse.quote), subtype="html")
    return message


# The most of a header's UTF-8 that one encoded word of ours holds: "Subject: =?utf-8?b?", 56
# characters of base64 and "?=" make 77, within the 78 a header line keeps to (longer, Python
# folds the header again, writing its text in the clear).
HEADER_WORD_BYTES = 42


def as_header_text(text):
    """`text` as a folded header value that every mail program reads as exactly that text:
    all of it in RFC 2047 words of our own, one a line. Mail programs decode a word in what
    they are sent: the agent's '=?utf-8?q?=E2=80=AE?=' left in the clear shows as a
    right-to-left override, and '=?utf-8?q?x=0D=0AReply-To=3A_eve=40evil.example?=' as a line
    break, which questions may not hold (and, given to Python's mail headers as text, became
    a header line of its own before 3.11.10)."""
    words, word = [], b""
    for character in text:
        encoded = character.encode("utf-8")
        if len(word) + len(encoded) > HEADER_WORD_BYTES:       # a character is never split between words
            words.append(word)
            word = b""
        word += encoded
    return "\n ".join("=?utf-8?b?" + base64.b64encode(chunk).decode("ascii") + "?=" for chunk in words + [word])


def smtp_failure(e, server, deadline):
    """The ChannelError for how a send to a mail server failed. A refusal (4xx, 5xx) is an
    answer: 5xx refuses the message for good (or the sign-in: the operator's to mend), 4xx
    (greylisting, a mailbox full for now) asks for another try. Anything else after DATA's
    go-ahead (no answer, a broken connection, a reply that is no SMTP code) leaves the
    message perhaps taken."""
    codes = ([code for code, _ in e.recipients.values()] if isinstance(e, smtplib.SMTPRecipientsRefused) else
             [e.smtp_code] if isinstance(e, smtplib.SMTPResponseException) else [])
    if codes and all(400 <= code < 600 for code in codes):
        return ChannelError(f"{server} refused: {e}", permanent=min(codes) >= 500)
    unanswered = "; the mail server may have taken it" if deadline.began_sending else ""
    what = f"no answer within {deadline}" if deadline.passed() or isinstance(e, TimeoutError) else str(e)
    return ChannelError(f"{server}: {what}{unanswered}", may_have_reached=deadline.began_sending)


# The shortest piece of a push target's URL that the log hides: a shorter one is guessed as
# soon as read, and hidden wherever it occurs it would garble Apprise's words.
SHORTEST_HIDDEN = 4


class PushTargetsHidden(logging.Filter):
    """Apprise's own log, with what the push targets' URLs hold past their scheme written as
    '…', as shown_value() shows them: Apprise names where each push went, or failed to go,
    and an ntfy topic is its password (whoever knows it reads every respond link pushed there)."""

    def __init__(self, config):
        super().__init__()
        pieces = {piece for key, url in config.items() if CHANNEL_KEY.match(key) for piece in url_pieces(url)}
        self.pieces = sorted(pieces, key=len, reverse=True)        # one inside another goes with the longer

    def filter(self, record):
        text = record.getMessage()
        for piece in self.pieces:
            text = text.replace(piece, "…")
        record.msg, record.args = text, None
        return True


def url_pieces(url):
    """What a URL holds past its scheme that may be secret, as written and decoded: its user,
    password, host and port, each step of its path, each option's value."""
    parts = urllib.parse.urlsplit(url)
    written = [*re.split("[@:]", parts.netloc), *parts.path.split("/"),
               *(value for _, value in urllib.parse.parse_qsl(parts.query))]
    return {form for piece in written for form in (piece, urllib.parse.unquote(piece)) if len(form) >= SHORTEST_HIDDEN}


def hide_push_targets_in_the_log(config):
    """Have Apprise's log hide this config's push targets (PushTargetsHidden), and no longer
    those of a config served before in this process."""
    apprise_log = logging.getLogger("apprise")
    for earlier in [f for f in apprise_log.filters if isinstance(f, PushTargetsHidden)]:
        apprise_log.removeFilter(earlier)
    apprise_log.addFilter(PushTargetsHidden(config))


def send_apprise(target_url, config, notification, pause, deadline):
    """A push or chat message to an operator-named target (ntfy, Slack, Gotify, Matrix, …).
    Apprise opens its own connections, out of the deadline's reach, so it runs on a
    thread of its own that is waited for only until the deadline: a push still running
    then may yet arrive."""
    apprise = load_apprise()
    notifier = apprise.Apprise()
    if not notifier.add(target_url):
        raise ChannelError(f"channel {notification['channel']!r} has a URL Apprise does not understand")
    # Apprise stops reading an answer after 4 s (its `rto`) and then says only that it failed,
    # though the target has the push: a retry pushed it again and it was recorded as never
    # arrived. Waiting past our deadline, the call ends there, as one that may have arrived.
    for target in notifier:
        target.socket_read_timeout = max(target.socket_read_timeout, deadline.remaining() + 1)
    # Said to be text, or a target that reads HTML or Markdown (mailto://, Telegram) would take
    # the agent's message as markup: a link of its own choosing drawn as an "Approve" button.
    # Markdown for a target that reads Markdown: push_text escaped the agent's text for it.
    body_format = push_format(push_dialect(target_url).markup)
    try:
        delivered = deadline.run_abandonable(("channel", notification["channel"]), functools.partial(
            notifier.notify, body_format=body_format), notification["text"], PUSH_TITLE, doing="the push")
    except StillHanging as e:
        raise ChannelError(f"channel {notification['channel']!r}: {e}") from None
    except Abandoned as e:
        raise ChannelError(f"channel {notification['channel']!r}: {e}; the target may have it",
                           may_have_reached=True) from None
    if not delivered:
        scheme = target_url.split("://", 1)[0]
        raise ChannelError(f"Apprise could not deliver to the {scheme}:// target (see the server log)")
    return None


NOTIFICATION_ATTEMPTS = 3
NOTIFICATION_BACKOFF_SECONDS = (5, 30)     # before the 2nd and the 3rd attempt
NOTIFICATION_CLAIM_SECONDS = 120           # a 'sending' claim older than this was abandoned by a crash


def notification_kind(row):
    """What an audit event about a message says of its kind: nothing for the question itself."""
    return {"kind": row["kind"]} if row["kind"] != "ask" else {}


def simulate_due_notifications(conn):
    """Test mode: record each due notification as simulated, with its exact text; returns
    how many. Nothing leaves the process, so no worker is needed."""
    def record(rows, now):
        for row in rows:
            wake_after_commit(conn, "notified", (row["id"], row["attempts"], row["channel"], "simulated"))
            record_event(conn, row["developer_id"], 0, "system", "notification.simulated", row["pause_id"],
                         {"channel": row["channel"], "recipient": row["recipient"], "text": row["text"],
                          **notification_kind(row)}, when=now)
    return in_batches(conn, "UPDATE notifications SET status = 'simulated', attempts = attempts + 1, updated_at = :now"
                            " WHERE id IN (SELECT id FROM notifications WHERE status IN ('queued', 'sending')"
                            " AND livemode = 0 AND next_attempt_at <= :now AND " + STILL_OPEN +
                            " ORDER BY next_attempt_at LIMIT :batch) RETURNING *", record)


# A notification is sent only while its pause can still be answered, by its person: one
# whose pause ran out (while the server was down, say) waits for the timeout job, which
# cancels it; one whose pause was decided, or whose person voted, while it was being sent
# is cancelled when next claimed.
STILL_AWAITED = ("(SELECT status = 'pending' FROM pauses p WHERE p.id = notifications.pause_id) AND NOT EXISTS"
                 " (SELECT 1 FROM pause_recipients r WHERE r.pause_id = notifications.pause_id"
                 " AND r.position = notifications.position AND r.voted_at IS NOT NULL)")
STILL_OPEN = f"(SELECT expires_at FROM pauses p WHERE p.id = notifications.pause_id) > :now AND {STILL_AWAITED}"


def due_live_notifications(conn, per_developer):
    """{developer id: their due live notifications, up to `per_developer` per channel,
    the channels taking turns}. One index seek per channel and developer with unsent
    notifications, however many they have, so neither a developer's flood nor a
    backlog on a hung channel hides anything else from the job."""
    now = db_time()
    unsent = "status IN ('queued', 'sending') AND livemode = 1"
    by_developer, channel = {}, ""
    while (channel := conn.execute(f"SELECT min(channel) FROM notifications WHERE {unsent} AND channel > ?",
                                   (channel,)).fetchone()[0]) is not None:
        developer_id = ""
        while (developer_id := conn.execute(
                f"SELECT min(developer_id) FROM notifications WHERE {unsent} AND channel = ? AND developer_id > ?",
                (channel, developer_id)).fetchone()[0]) is not None:
            rows = conn.execute(
                f"SELECT * FROM notifications WHERE {unsent} AND channel = ? AND developer_id = ? AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at LIMIT ?", (channel, developer_id, now, per_developer)).fetchall()
            if rows:
                by_developer.setdefault(developer_id, []).append(rows)
    return {developer_id: taking_turns(lists) for developer_id, lists in by_developer.items()}


def taking_turns(lists):
    """[[a1, a2], [b1]] -> [a1, b1, a2]."""
    return [item for turn in itertools.zip_longest(*lists) for item in turn if item is not None]


def claim_notification(conn, config, row):
    """Compare-and-set a due queued notification to 'sending'; returns the claim's expiry,
    or None when another worker got there first, or its pause was answered meanwhile (its
    send failed, and is not made again)."""
    as_read = {"id": row["id"], "due": row["next_attempt_at"]}
    unchanged = "WHERE id = :id AND status = 'queued' AND next_attempt_at = :due"
    with transaction(conn):
        # The time once the write lock is ours: read before a wait for it, a pause that ran out
        # meanwhile would still look open, and its question go out after it expired; and a
        # claim that waited longer than its length would be written lapsed, taken by the next
        # round as a crash's while its send went on, and the message sent twice.
        now = utcnow()          # one reading for both: the claim lasts its whole length from when it is written
        as_read.update(now=db_time(now), until=claim_expiry(config, NOTIFICATION_CLAIM_SECONDS, now))
        claimed = conn.execute("UPDATE notifications SET status = 'sending', attempts = attempts + 1,"
                               f" next_attempt_at = :until, updated_at = :now {unchanged} AND {STILL_OPEN}",
                               as_read).rowcount
        if not claimed:
            conn.execute(f"UPDATE notifications SET status = 'cancelled', updated_at = :now {unchanged}"
                         f" AND NOT ({STILL_AWAITED})", as_read)
    return as_read["until"] if claimed else None


INTERRUPTED_SEND = "the server stopped during this attempt (the message may have gone out)"


def record_interrupted_send(conn, config, row):
    """A lapsed claim (`row`, still 'sending') is a send a crash cut short: the message may
    have gone out, which holds bare replies (see CLOSED_ON_NUMBER) and lets the person's
    reply count. Recorded as an attempt that failed (record_send()), so the message is made
    again after the backoff within NOTIFICATION_ATTEMPTS, as after any failure. (Taken up
    at once, a crash loop sent the message again and again.)"""
    record_send(conn, config, row, row["next_attempt_at"], row["attempts"], (None, INTERRUPTED_SEND, False, True))


def send_notification(conn, config, deadlines, row, claim_until):
    """Send a claimed live notification (outside any transaction) and record the outcome."""
    permanent = may_have_reached = False
    try:
        channel = channel_of(conn, config, row["channel"], row["developer_id"])
        if channel.send is None or channel.missing_settings(config):
            raise ChannelError(f"channel {row['channel']!r} is not configured on this server")
        pause = asked_of(conn, pause_by_id(conn, row["pause_id"]), row["position"])
        with deadlines.deadline(config["outbound.deadline_seconds"], owner=("channel", row["channel"])) as deadline:
            provider_id, error = channel.send(config, row, pause, deadline), None
    except ChannelError as e:
        provider_id, error, permanent, may_have_reached = None, str(e)[:500], e.permanent, e.may_have_reached
    except Exception as e:      # a provider library's surprise must not kill the worker
        log.exception("sending notification %s failed", row["id"])
        provider_id, error = None, f"{type(e).__name__}: {e}"[:500]
    record_send(conn, config, row, claim_until, row["attempts"] + 1, (provider_id, error, permanent, may_have_reached))


def record_send(conn, config, row, claim_until, attempt, outcome):
    """Record how the send `attempt` of a notification (`row`, as due) went, if its claim
    (ending `claim_until`) still holds: outcome is (provider's id, error, permanent,
    may_have_reached). Sent; or, failed, cancelled if its pause no longer awaits this
    person (answered meanwhile); left queued for the timeout job if it ran out of time;
    queued again after the backoff; or failed for good."""
    provider_id, error, permanent, may_have_reached = outcome
    with transaction(conn):
        now = db_time()
        # (status, the metric's result, the next attempt's time, the audit event)
        if error is None:
            status, result, next_at, event = "sent", "sent", now, "notification.sent"
        else:
            awaited, still_open = conn.execute(f"SELECT {STILL_AWAITED}, {STILL_OPEN} FROM notifications"
                                               " WHERE id = :id", {"id": row["id"], "now": now}).fetchone()
            if not awaited:
                status, result, next_at, event = "cancelled", "cancelled", now, None
            elif not still_open:        # claimed by no one now: the timeout job cancels it with its pause
                status, result, next_at, event = "queued", "cancelled", now, None
            elif attempt < NOTIFICATION_ATTEMPTS and not permanent:
                next_at = db_time(utcnow() + dt.timedelta(seconds=NOTIFICATION_BACKOFF_SECONDS[attempt - 1]))
                status, result, event = "queued", "retried", None
            else:
                status, result, next_at, event = "failed", "failed", now, "notification.failed"
        changed = conn.execute(
            "UPDATE notifications SET status = ?, next_attempt_at = ?, provider_message_id = ?, last_error = ?,"
            " may_have_reached = may_have_reached OR ?, updated_at = ? WHERE id = ? AND status = 'sending'"
            " AND next_attempt_at = ?",
            (status, next_at, provider_id, error, may_have_reached, now, row["id"], claim_until)).rowcount
        if changed:
            wake_after_commit(conn, "notified", (row["id"], attempt, row["channel"], result))
        if changed and event:
            record_event(conn, row["developer_id"], 1, "system", event, row["pause_id"],
                         {"channel": row["channel"], "recipient": row["recipient"], "attempts": attempt,
                          "provider_message_id": provider_id, "error": error,
                          **notification_kind(row),
                          **({"may_have_reached": True} if error and (may_have_reached or row["may_have_reached"])
                             else {})}, when=now)
        # Agents hear of a question that could not be asked (or may not have been: the pause's
        # notification says which); a lost reminder is in the audit log.
        if changed and status == "failed" and row["kind"] == "ask":
            pause = pause_by_id(conn, row["pause_id"])
            emit_pause_events(conn, config, [pause], "pause.notification_failed", when=now)
        if changed and status == "sent" and provider_id:        # after its notification.sent
            apply_early_delivery_reports(conn, config, provider_id, now)


# What Twilio's status callbacks say became of a text it took, in the words that are final.
# The others ('queued', 'sending', 'sent', …) say no more than that it was taken, and may come
# after a final one: they change nothing.
DELIVERED = ("delivered", "read")           # 'read': WhatsApp's, after 'delivered'
NOT_DELIVERED = ("undelivered", "failed")
# A report on a text whose send is not recorded yet waits for it this long: the send's record
# comes as soon as Twilio's answer, or its claim runs out, within minutes.
EARLY_REPORT_KEPT = dt.timedelta(days=1)
# What Twilio's error code in a report of a text not delivered means for the person asked.
TWILIO_DELIVERY_ERRORS = {
    30003: "the phone is unreachable (switched off, or out of coverage)",
    30004: "the person, or their carrier, blocks texts from this number",
    30005: "the number is unknown to its carrier, or no longer in service",
    30006: "the number is a landline, or its carrier takes no texts",
    30007: "the carrier filtered the text as spam",
    30008: "the carrier gave no reason",
}


def record_delivery_report(conn, config, message_sid, reported, error_code):
    """Record what Twilio's status callback says became of a live text (found by its
    MessageSid). Not delivered fails its notification, as a failed send does
    (tell_undelivered()); delivered only notes it. A report on an id not stored yet waits
    for the send's record (record_send()): Twilio may post it before its answer to the
    send reaches us, and posts it once."""
    if reported not in DELIVERED + NOT_DELIVERED:
        return
    with transaction(conn):
        now = db_time()
        if not apply_delivery_report(conn, config, message_sid, reported, error_code, now):
            conn.execute("INSERT INTO early_delivery_reports (message_sid, reported, error_code, received_at)"
                         " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", (message_sid, reported, error_code, now))


def apply_delivery_report(conn, config, message_sid, reported, error_code, now):
    """Apply a final report to the live text it names, inside the caller's transaction;
    False if no text of ours has that id (yet). The first final word stands but for 'read'
    after 'delivered', set by compare-and-set, so a report that comes again or out of order
    changes nothing and tells no one twice."""
    row = query_db(conn, "SELECT * FROM notifications WHERE provider_message_id = ? AND livemode = 1"
                         " AND channel IN ('sms', 'whatsapp')", (message_sid,), one=True)
    if row is None:
        return False
    was = row["delivery_status"]
    if was in NOT_DELIVERED and reported in DELIVERED:
        # Twilio said both: the person may have it after all, so their reply counts (REACHED).
        # The agent was told of the failure once, and is not told again.
        conn.execute("UPDATE notifications SET may_have_reached = 1, updated_at = ? WHERE id = ?"
                     " AND NOT may_have_reached", (now, row["id"]))
        return True
    if was is not None and (was, reported) != ("delivered", "read"):
        return True
    failed = reported in NOT_DELIVERED
    error = undelivered_error(reported, error_code) if failed else row["last_error"]
    changed = conn.execute(
        "UPDATE notifications SET delivery_status = ?, status = ?, last_error = ?, updated_at = ?"
        " WHERE id = ? AND status = 'sent' AND delivery_status IS ?",
        (reported, "failed" if failed else "sent", error, now, row["id"], was)).rowcount
    if changed:
        wake_after_commit(conn, "reported", (row["id"], row["channel"], reported))
    if changed and failed:
        tell_undelivered(conn, config, row, reported, error, now)
    return True


def apply_early_delivery_reports(conn, config, message_sid, now):
    """The reports that came for a text before its send was recorded, in the order they came
    (inside record_send()'s transaction, once the text's id is stored)."""
    for reported, error_code in conn.execute("SELECT reported, error_code FROM early_delivery_reports"
                                             " WHERE message_sid = ? ORDER BY seq", (message_sid,)).fetchall():
        apply_delivery_report(conn, config, message_sid, reported, error_code, now)
    conn.execute("DELETE FROM early_delivery_reports WHERE message_sid = ?", (message_sid,))


def undelivered_error(reported, error_code):
    """A notification's last_error for a text Twilio reports `reported` with its ErrorCode."""
    # Only ASCII digits, as Twilio's codes are: int() refuses '²', which isdigit() takes, and
    # more than 4,300 digits; either failed the report with a 500, or the send of the text
    # it waited for (apply_early_delivery_reports()).
    code = int(error_code) if re.fullmatch("[0-9]{1,9}", error_code) else None
    return (f"Twilio reported the text {reported}" + (f" (error {code})" if code else "")
            + (f": {TWILIO_DELIVERY_ERRORS[code]}" if code in TWILIO_DELIVERY_ERRORS else ""))


def tell_undelivered(conn, config, row, reported, error, now):
    """The audit event of a sent text (`row`) that Twilio reports it did not deliver, and the
    agent's pause.notification_failed, as a failed send gives them, when its pause is still
    open and awaiting its person and nothing else sent to them may have reached them: the
    question and its reminders each repeat it, so the agent hears when the last that may
    have reached them fails. Once per person: a reminder to a number that never took the
    question fails as it did, and is news to no one."""
    unreached = conn.execute(
        f"SELECT {STILL_OPEN} AND NOT EXISTS (SELECT 1 FROM notifications n WHERE n.pause_id = notifications.pause_id"
        f" AND n.position = notifications.position AND n.id != notifications.id AND {REACHED})"
        " FROM notifications WHERE id = :id", {"id": row["id"], "now": now}).fetchone()[0]
    tell = unreached and not conn.execute(TOLD_UNDELIVERED, {"pause": row["pause_id"],
                                                             "recipient": row["recipient"]}).fetchone()[0]
    record_event(conn, row["developer_id"], 1, "system", "notification.failed", row["pause_id"],
                 {"channel": row["channel"], "recipient": row["recipient"], "attempts": row["attempts"],
                  "provider_message_id": row["provider_message_id"], "error": error, "reported": reported,
                  **notification_kind(row), **({"may_have_reached": True} if row["may_have_reached"] else {}),
                  **({"agent_told": True} if tell else {})},
                 when=now)
    if tell:
        emit_pause_events(conn, config, [pause_by_id(conn, row["pause_id"])], "pause.notification_failed", when=now)


# Whether the agent has heard that a person of a pause was not reached: from the failed send of
# their question (record_send() tells it of every one), or from a report that says agent_told.
TOLD_UNDELIVERED = ("SELECT EXISTS (SELECT 1 FROM audit_events WHERE pause_id = :pause"
                    " AND event_type = 'notification.failed' AND json_extract(data, '$.recipient') = :recipient"
                    " AND (json_extract(data, '$.agent_told')"
                    "  OR (json_extract(data, '$.reported') IS NULL AND json_extract(data, '$.kind') IS NULL)))")


###############################################################################
# Webhooks: signed events, an outbox, retries
###############################################################################

WEBHOOK_EVENTS = ("pause.created", "pause.responded", "pause.timed_out", "pause.cancelled",
                  "pause.notification_failed", "pause.vote", "pause.escalated")
# What the dashboard's form ticks for a new endpoint: the outcomes, not every step on the way.
OUTCOME_EVENTS = ("pause.responded", "pause.timed_out", "pause.cancelled", "pause.notification_failed")
MIN_SECRET_LENGTH = 16
SECRET_ROTATION_OVERLAP = dt.timedelta(hours=24)
# Delays before attempts 2..10: about three days in all.
RETRY_DELAYS_SECONDS = (5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 14 * 3600, 20 * 3600, 24 * 3600)
RETRY_JITTER = 0.1                          # each delay varies by up to ±10 %, so retries do not stampede
MAX_RETRY_AFTER_SECONDS = 24 * 3600
DELIVERY_CLAIM_SECONDS = 30                 # a 'delivering' claim older than this was abandoned by a crash
DISABLE_AFTER_FAILING = dt.timedelta(days=3)


def sign(secret, timestamp, body):
    return hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def standard_webhook_key(secret):
    """The key the Standard Webhooks signature uses for `secret`: the bytes a `whsec_<base64>`
    secret stands for, or else the secret's own UTF-8 bytes (which verifiers are given as
    `whsec_` + their base64)."""
    if secret.startswith("whsec_"):
        encoded = secret.removeprefix("whsec_").rstrip("=")
        with contextlib.suppress(binascii.Error, ValueError):      # padding optional, as the verifiers take it
            return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    return secret.encode("utf-8")


def standard_signature(secrets_, message_id, timestamp, body):
    """'v1,<base64>[ v1,<base64>]': the Standard Webhooks webhook-signature header, one per
    secret in force, over '<webhook-id>.<webhook-timestamp>.<raw body>'."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(standard_webhook_key(secret), signed, hashlib.sha256).digest())
                    .decode() for secret in secrets_)


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
        if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif name == "v1" and value.isascii():      # compare_digest() raises on other text: a forged header
            candidates.append(value)
    if timestamp is None or abs(time.time() - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


# Names that only ever mean this machine or the local network.
LOCAL_NAMES = re.compile(r"(^|\.)(localhost|local|internal|home\.arpa)\.?$", re.IGNORECASE)


def url_problem(url, allow_private):
    """None if webhooks may be sent to `url`, else a sentence saying why not.

    Names are not looked up here: a lookup can take as long as its name server likes,
    and a client could hold request threads with names made to resolve slowly. An
    address written in the URL, or a name that can only be local, is refused now; any
    other name is checked on every delivery, on the addresses it then resolves to."""
    if not isinstance(url, str) or len(url) > 2048 or UNSAFE_TEXT.search(url):
        return "url must be an http:// or https:// URL of at most 2048 characters"
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError:          # '[::1' and the like
        return "url must be an http:// or https:// URL"
    if port == 0:               # no server listens there: every delivery would fail
        return "url's port must be from 1 to 65535"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "url must be an http:// or https:// URL"
    if parts.username or parts.password:
        return "url must not contain credentials; receivers authenticate calls by their signature"
    try:
        # The host as deliveries will reach it: requests decodes some %-escapes and applies
        # IDNA 2008; then labels of 1-63 characters, and nothing left of an escape or a space.
        host = urllib.parse.urlsplit(requests.Request("POST", url.strip()).prepare().url).hostname
        host.encode("idna")
    except (UnicodeError, requests.RequestException):
        host = None
    if host is None or not (":" in host or re.fullmatch("[a-z0-9_.-]+", host)):
        return f"url's host {parts.hostname[:100]} is not a valid host name"
    address = literal_address(host.removesuffix("."))      # '127.0.0.1.' is that address, named from the root
    if not allow_private and (address and not is_public_address(address) or LOCAL_NAMES.search(host)):
        return (f"url's host {host} is a loopback, private or otherwise non-public address;"
                " the operator can allow these with webhooks.allow_private = true")
    return None


def literal_address(host):
    """The IP address `host` spells, in any form connecting would accept ('127.1',
    '2130706433', '0x7f.0.0.1' included), or None for a name."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    with contextlib.suppress(OSError):
        return socket.inet_ntoa(socket.inet_aton(host))
    return None


# IPv6 forms that carry an IPv4 address, which is what such a packet reaches in the end.
NAT64 = ipaddress.ip_network("64:ff9b::/96")                 # RFC 6052, well-known NAT64 prefix
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")         # RFC 8215, local-use NAT64: never public
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")              # deprecated ::a.b.c.d
IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")    # SIIT ::ffff:0:a.b.c.d


def embedded_ipv4(ip):
    """The IPv4 addresses inside an IPv6 address: NAT64, 6to4, Teredo, compatible, translated."""
    if ip.version == 4:
        return []
    found = [*(ip.teredo or ()), *([ip.sixtofour] if ip.sixtofour else [])]
    if ip in NAT64 or ip in IPV4_COMPATIBLE or ip in IPV4_TRANSLATED:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


# Not globally reachable, yet is_global to Python 3.11's ipaddress (which the image runs): site-local
# addresses, deprecated but still routed inside networks that kept them (RFC 3879); SRv6
# segment ids, which address nodes inside an operator's network (RFC 9602); and IPv6
# documentation's second prefix (RFC 9637).
NOT_GLOBAL = [ipaddress.ip_network(net) for net in ("fec0::/10", "5f00::/16", "3fff::/20")]


def is_public_address(address):
    ip = ipaddress.ip_address(address.split("%")[0])
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped
    if ip.version == 6 and (ip in NAT64_LOCAL or any(ip in net for net in NOT_GLOBAL)):
        return False
    return all(each.is_global and not each.is_multicast for each in [ip, *embedded_ipv4(ip)])


class EndpointConnections:
    """Kept-alive connections per webhook endpoint, so a burst to one endpoint does not
    open (and for https, handshake) a connection per delivery. Each call still runs
    within its own deadline, and connections are only opened by open_connection(),
    which checks the address. Bounded: webhooks.per_endpoint idle connections per
    endpoint, for as many of the endpoints used most recently as KEPT_ALIVE_SOCKETS allows."""

    def __init__(self, allow_private, per_endpoint):
        self.allow_private, self.per_endpoint = allow_private, per_endpoint
        self._lock = threading.Lock()
        self._sessions = collections.OrderedDict()      # webhook id -> (session, adapter), least recent first

    def post(self, webhook_id, deadline, url, *, resend_lost, **kwargs):
        """POST within the deadline over the endpoint's kept connections. With resend_lost, a
        call lost to a kept connection the receiver closed as it went out goes once more."""
        session, adapter = self._session(webhook_id)
        adapter.calls.deadline, adapter.calls.reused, sent = deadline, False, time.monotonic()
        send = functools.partial(session.post, url, stream=True, allow_redirects=False, **kwargs)
        try:
            try:
                response = send()
            except requests.ConnectionError as e:
                # A receiver's idle timeout can close a kept connection just as a call goes out
                # on it: the call is hung up on (closed or reset) at once, and goes once more (on
                # the new connection urllib3 puts in the dead one's place) rather than as a failed
                # attempt. Delivery is at-least-once, and that attempt would have been retried
                # anyway; but not the last attempt, nor a call hung up on late or after a status
                # line began (the receiver was working on it), nor past the deadline. (A reset
                # after part of a status line looks like an idle close: it is sent once more.)
                if not (resend_lost and adapter.calls.reused and time.monotonic() - sent < LOST_CALL_SECONDS
                        and not deadline.passed() and find_cause(e, (ConnectionResetError, BrokenPipeError))):
                    raise
                response = send()
            # Read a short answer whole, so its connection can carry the next call.
            response.raw.read(ANSWER_KEPT_BYTES, decode_content=False)
            response.close()
            return response
        finally:
            adapter.calls.deadline = None

    def _session(self, webhook_id):
        with self._lock:
            if webhook_id in self._sessions:
                self._sessions.move_to_end(webhook_id)
                return self._sessions[webhook_id]
            session = requests.Session()
            session.trust_env = False       # an environment proxy would hide the real destination from the guard
            # A receiver's cookies are not kept: they would pile up here for as long as the
            # endpoint is used (an answer may set megabytes), and go back with every call.
            session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            adapter = _DeadlineAdapter(allow_private=self.allow_private, keep=self.per_endpoint)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._sessions[webhook_id] = session, adapter
            while len(self._sessions) > max(1, KEPT_ALIVE_SOCKETS // self.per_endpoint):
                self._sessions.popitem(last=False)[1][0].close()
            return session, adapter

    def close(self):
        with self._lock:
            for session, _ in self._sessions.values():
                session.close()
            self._sessions.clear()


# Idle webhook connections kept at most (descriptors, counted in fitted_connection_limit).
KEPT_ALIVE_SOCKETS = 256
# An answer longer than this is not read: its connection is closed rather than kept.
ANSWER_KEPT_BYTES = 64 * 1024
# A call on a kept connection hung up on sooner than this was lost to the receiver's idle
# timeout (which closes at once), not cut off while the receiver worked on it.
LOST_CALL_SECONDS = 1.0


def webhook_fields(body, allow_private, livemode):
    """What WEBHOOK_SCHEMA (or WEBHOOK_CHANGE_SCHEMA) cannot say about a body already checked
    against it: the URL is one we may call; returns the clean fields."""
    fields = {}
    if "url" in body:
        problem = url_problem(body["url"], allow_private) or cleartext_problem(body["url"], allow_private, livemode)
        if problem:
            raise invalid("url", problem)
        fields["url"] = body["url"].strip()
    if "events" in body:
        fields["events"] = sorted(set(body["events"]), key=WEBHOOK_EVENTS.index)
    if "secret" in body:
        fields["secret"] = body["secret"]       # None: one is to be made (new_webhook_secret())
    if "enabled" in body:
        fields["enabled"] = body["enabled"]
    return fields


def cleartext_problem(url, allow_private, livemode):
    """A live endpoint's events carry the respond links of live pauses, and whoever reads one
    can answer its pause: plain http would show them to every network on the way. Receivers
    on the operator's own network (webhooks.allow_private) may take them so."""
    if livemode and not allow_private and urllib.parse.urlsplit(url.strip()).scheme != "https":
        return ("a live endpoint's url must be https://: its events carry the links that answer live pauses,"
                " which http:// would send readable to every network on the way")
    return None


def create_webhook(conn, config, caller, body, password_checked=None):
    """Register an endpoint; returns (row, secret if it was generated here). 401 if given
    `password_checked` (the developer as check_password() returned them) and that password
    was changed since."""
    fields = webhook_fields(body, config["webhooks.allow_private"], caller.livemode)
    generated = None
    if fields.get("secret") is None:
        generated = fields["secret"] = new_webhook_secret()
    webhook_id, now = new_id("wh_"), db_time()
    with transaction(conn):
        if password_checked is not None:
            require_password_unchanged(conn, password_checked)
        limit = config["webhooks.max_per_developer"]
        # Counted in the caller's mode: a key must never be stopped by webhooks it cannot see.
        held = conn.execute("SELECT count(*) FROM webhooks WHERE developer_id = ? AND livemode = +?"
                            " AND deleted_at IS NULL", (caller.developer_id, caller.livemode)).fetchone()[0]
        if held >= limit:
            raise ApiError(409, "webhook_limit_reached",
                           f"a developer may have at most {limit} {mode_name(caller.livemode)} webhooks; delete one"
                           " first")
        conn.execute("INSERT INTO webhooks (id, developer_id, livemode, url, events, secret, created_at, updated_at)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (webhook_id, caller.developer_id, caller.livemode, fields["url"], compact_json(fields["events"]),
                      fields["secret"], now, now))
        record_event(conn, caller.developer_id, caller.livemode, caller.actor, "webhook.created",
                     data={"webhook_id": webhook_id, "url": fields["url"], "events": fields["events"]}, when=now)
        return owned_webhook(conn, caller, webhook_id), generated


def new_webhook_secret():
    """whsec_ and base64, as Standard Webhooks verifiers take a secret, of 256 random bits."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def update_webhook(conn, config, caller, webhook_id, body):
    """PATCH: change url or events, rotate the secret (the old one signs too for 24 h; a null
    one is made here), enable or disable; returns (row, the secret if it was made here)."""
    fields = webhook_fields(body, config["webhooks.allow_private"], caller.livemode)
    generated = None
    if "secret" in fields and fields["secret"] is None:
        generated = fields["secret"] = new_webhook_secret()
    now = utcnow()
    with transaction(conn):
        webhook = owned_webhook(conn, caller, webhook_id)
        changes = {}
        if "url" in fields and fields["url"] != webhook["url"]:
            # A new address starts with a clean record: the old one's failures must not
            # disable it in its first hours (DISABLE_AFTER_FAILING).
            changes.update(url=fields["url"], failing_since=None)
        if "events" in fields:
            changes["events"] = compact_json(fields["events"])
        if "secret" in fields and fields["secret"] != webhook["secret"]:
            changes.update(secret=fields["secret"], previous_secret=webhook["secret"],
                           previous_secret_expires_at=db_time(now + SECRET_ROTATION_OVERLAP))
        if fields.get("enabled") is True and webhook["status"] == "disabled":
            changes.update(status="enabled", disabled_reason=None, failing_since=None)
            conn.execute("UPDATE webhook_deliveries SET next_attempt_at = ? WHERE webhook_id = ? AND status = 'pending'"
                         " AND next_attempt_at IS NULL", (db_time(now), webhook_id))
            wake_after_commit(conn, "webhooks")
        if fields.get("enabled") is False and webhook["status"] == "enabled":
            disable_webhook(conn, webhook, f"disabled by {caller.actor}", caller.actor)
        if changes:
            changes["updated_at"] = db_time(now)
            conn.execute(f"UPDATE webhooks SET {', '.join(f'{k} = ?' for k in changes)} WHERE id = ?",
                         (*changes.values(), webhook_id))
        # The new URL, as webhook.created names the first: where respond links now go is what
        # someone checking the log after a leaked key needs to see.
        record_event(conn, caller.developer_id, caller.livemode, caller.actor, "webhook.updated",
                     data={"webhook_id": webhook_id, "changed": sorted(set(fields) - {"secret"}) +
                           (["secret"] if "secret" in changes else []),
                           **({"url": fields["url"]} if "url" in fields else {})})
        return owned_webhook(conn, caller, webhook_id), generated


def delete_webhook(conn, caller, webhook_id):
    with transaction(conn):
        webhook = owned_webhook(conn, caller, webhook_id)
        now = db_time()
        conn.execute("UPDATE webhooks SET deleted_at = ?, updated_at = ? WHERE id = ?", (now, now, webhook_id))
        conn.execute("UPDATE webhook_deliveries SET status = 'cancelled', next_attempt_at = NULL, updated_at = ?"
                     " WHERE webhook_id = ? AND status IN ('pending', 'delivering')", (now, webhook_id))
        record_event(conn, caller.developer_id, caller.livemode, caller.actor, "webhook.deleted",
                     data={"webhook_id": webhook_id, "url": webhook["url"]}, when=now)


def disable_webhook(conn, webhook, reason, actor):
    """Stop sending to an endpoint; its pending deliveries wait (unscheduled) until it is re-enabled."""
    require_transaction(conn)
    now = db_time()
    conn.execute("UPDATE webhooks SET status = 'disabled', disabled_reason = ?, updated_at = ? WHERE id = ?",
                 (reason, now, webhook["id"]))
    conn.execute("UPDATE webhook_deliveries SET next_attempt_at = NULL WHERE webhook_id = ? AND status = 'pending'",
                 (webhook["id"],))
    record_event(conn, webhook["developer_id"], webhook["livemode"], actor, "webhook.disabled",
                 data={"webhook_id": webhook["id"], "url": webhook["url"], "reason": reason}, when=now)


def owned_webhook(conn, caller, webhook_id):
    webhook = conn.execute("SELECT * FROM webhooks WHERE id = ? AND developer_id = ? AND livemode = +?"
                           " AND deleted_at IS NULL", (webhook_id, caller.developer_id, caller.livemode)).fetchone()
    if webhook is None:
        raise ApiError(404, "not_found", f"no webhook {shorten(webhook_id)!r} {caller.whose}" + in_the_other_mode(
            conn, caller, "SELECT 1 FROM webhooks WHERE id = ? AND developer_id = ? AND livemode = +?"
                          " AND deleted_at IS NULL", webhook_id, "webhook endpoints"))
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


def webhooks_of(conn, caller):
    """The caller's endpoints in its mode, newest first."""
    return query_db(conn, "SELECT * FROM webhooks WHERE developer_id = ? AND livemode = +? AND deleted_at IS NULL"
                          " ORDER BY seq DESC", (caller.developer_id, caller.livemode))


def deliveries_page(conn, caller, webhook_id, limit, cursor):
    """An endpoint's deliveries, newest first, each with every attempt: (list, next_cursor),
    read at one moment (an attempt recorded meanwhile must not join a delivery read before it)."""
    with snapshot(conn):
        owned_webhook(conn, caller, webhook_id)
        rows, next_cursor = newest_first(conn, "SELECT * FROM webhook_deliveries WHERE webhook_id = :webhook",
                                         {"webhook": webhook_id}, limit, cursor)
        return deliveries_json(conn, rows), next_cursor


def delivery_as_it_stands(conn, delivery_id):
    """One delivery with its attempts, read at one moment (the job may be sending it already)."""
    with snapshot(conn):
        return deliveries_json(conn, query_db(conn, "SELECT * FROM webhook_deliveries WHERE id = ?", (delivery_id,)))[0]


def emit_pause_events(conn, config, pauses, event_type=None, when=None):
    """Record the event about each of `pauses` (of `event_type`, or 'pause.<its status>'),
    for the feed, and queue it for every enabled endpoint of its owner, in its mode, that
    subscribed to it: inside the transaction of the change, two statements for a whole
    batch (a burst of timeouts writes thousands)."""
    require_transaction(conn)
    if not pauses:
        return
    now = when or db_time()
    events = json.dumps({pause["id"]: new_ordered_id("evt_") for pause in pauses})
    kind = "coalesce(:type, 'pause.' || p.status)"
    conn.execute(
        "INSERT INTO webhook_events (id, developer_id, livemode, type, pause_id, body, created_at)"
        f" SELECT batch.value, p.developer_id, p.livemode, {kind}, p.id, json_object('id', batch.value, 'type', {kind},"
        f"  'created_at', :shown_now, 'livemode', {SHOWN_BOOL.format('p.livemode')},"
        f"  'data', json({PAUSE_JSON})), :now"
        # CROSS JOIN: the batch's few ids drive the lookups, whatever the statistics suggest.
        f" FROM json_each(:events) batch CROSS JOIN pauses p ON p.id = batch.key {FIRST_ASKED} ORDER BY batch.id",
        {"events": events, "type": event_type, "now": now, "shown_now": api_time(now), "base": base_url(config)})
    queued = conn.execute(
        "INSERT INTO webhook_deliveries (id, webhook_id, event_id, next_attempt_at, created_at, updated_at)"
        " SELECT 'whd_' || lower(hex(randomblob(16))), w.id, batch.value, :now, :now, :now"
        " FROM json_each(:events) batch CROSS JOIN pauses p ON p.id = batch.key"
        " CROSS JOIN webhooks w ON w.developer_id = p.developer_id AND w.livemode = p.livemode"
        f" WHERE w.deleted_at IS NULL AND w.status = 'enabled'"
        f" AND EXISTS (SELECT 1 FROM json_each(w.events) WHERE value = {kind})",
        {"events": events, "type": event_type, "now": now}).rowcount
    if queued:
        wake_after_commit(conn, "webhooks")
    wake_after_commit(conn, "events", *{(pause["developer_id"], pause["livemode"],
                                         event_type or f"pause.{pause['status']}") for pause in pauses})


def queue_event(conn, developer_id, livemode, event_type, data, webhook_ids, pause_id=None, when=None):
    """Write an event and one due delivery per endpoint (the outbox); returns the delivery
    ids. The delivery job and the feed's waiting readers are woken once the transaction
    commits."""
    require_transaction(conn)
    event_id, now = new_ordered_id("evt_"), when or db_time()
    body = compact_json({"id": event_id, "type": event_type, "created_at": api_time(now),
                         "livemode": bool(livemode), "data": data})
    conn.execute("INSERT INTO webhook_events (id, developer_id, livemode, type, pause_id, body, created_at)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?)", (event_id, developer_id, livemode, event_type, pause_id, body, now))
    delivery_ids = []
    for webhook_id in webhook_ids:
        delivery_ids.append(new_id("whd_"))
        conn.execute("INSERT INTO webhook_deliveries (id, webhook_id, event_id, next_attempt_at, created_at, updated_at)"
                     " VALUES (?, ?, ?, ?, ?, ?)", (delivery_ids[-1], webhook_id, event_id, now, now, now))
    if delivery_ids:
        wake_after_commit(conn, "webhooks")
    wake_after_commit(conn, "events", (developer_id, livemode, event_type))
    return delivery_ids


def events_after(conn, caller, after, types, limit):
    """The caller's events (their bodies, as JSON text) after the event `after` (None: from
    the oldest kept), oldest first, of `types` (None: all). The feed starts after the newest
    event pruned from it (event_feed_pruned): one kept from before that (for a delivery still
    pending) is no longer in it, and an `after` from before that is refused as if it were
    gone, since events after it went. Read at one moment: a prune between its reads would
    lead a reader past a gap."""
    with snapshot(conn):
        pruned = query_db(conn, "SELECT through_rowid FROM event_feed_pruned WHERE developer_id = ?"
                                " AND livemode = +?", (caller.developer_id, caller.livemode), one=True)
        since = pruned[0] if pruned else 0
        if after is not None:
            row = query_db(conn, "SELECT rowid FROM webhook_events WHERE id = ? AND developer_id = ? AND livemode = +?"
                                 " AND rowid > ?", (after, caller.developer_id, caller.livemode, since), one=True)
            if row is None:
                raise ApiError(404, "not_found", f"no event {shorten(after)!r} in the feed {caller.whose}, or"
                                                 " events after it are gone; events are kept"
                                                 " retention.delivery_log_days after their deliveries end (test events"
                                                 " also go with test pauses past retention.test_pauses_kept): read"
                                                 " again without after", field="after")
            since = row[0]
        sql = ("SELECT body FROM webhook_events INDEXED BY webhook_events_feed WHERE developer_id = :developer"
               " AND livemode = +:livemode AND rowid > :since")
        args = {"developer": caller.developer_id, "livemode": caller.livemode, "since": since, "limit": limit}
        if types:
            sql, args["types"] = sql + " AND type IN (SELECT value FROM json_each(:types))", json.dumps(types)
        return [row[0] for row in query_db(conn, sql + " ORDER BY rowid LIMIT :limit", args)]


def send_test_event(conn, caller, webhook_id):
    with transaction(conn):
        refuse_if_disabled(owned_webhook(conn, caller, webhook_id))
        [delivery_id] = queue_event(conn, caller.developer_id, caller.livemode, "webhook.test",
                                    {"webhook_id": webhook_id, "message": "A test event from PausePoint."},  # TEST_EVENT_DATA
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
                raise ApiError(404, "not_found", f"no delivery {shorten(delivery_id)!r} for this webhook")
            raise ApiError(409, "delivery_in_progress", "this delivery is being attempted right now")
        wake_after_commit(conn, "webhooks")
        return conn.execute("SELECT * FROM webhook_deliveries WHERE id = ?", (delivery_id,)).fetchone()


def refuse_if_disabled(webhook):
    """Sending to a disabled endpoint would bypass what disabled it (a 410, three failing days)."""
    if webhook["status"] != "enabled":
        raise ApiError(409, "webhook_disabled", 'the webhook is disabled; enable it with PATCH {"enabled": true}')


def deliveries_json(conn, deliveries):
    """Deliveries as the API shows them, each with its event type and every attempt:
    two queries for the whole page, not two per delivery."""
    ids = [delivery["id"] for delivery in deliveries]
    types = {row["id"]: row["type"] for row in rows_in(conn, "webhook_events", "id",
                                                         [delivery["event_id"] for delivery in deliveries])}
    attempts = collections.defaultdict(list)
    for a in sorted(rows_in(conn, "webhook_attempts", "delivery_id", ids), key=lambda row: row["attempt"]):
        attempts[a["delivery_id"]].append({
            "attempt": a["attempt"], "started_at": api_time(a["started_at"]), "status_code": a["status_code"],
            "error": a["error"], "duration_ms": a["duration_ms"], "next_attempt_at": api_time(a["next_attempt_at"])})
    return [{
        "delivery_id": delivery["id"],
        "event_id": delivery["event_id"],
        "event_type": types[delivery["event_id"]],
        "status": delivery["status"],
        "next_attempt_at": api_time(delivery["next_attempt_at"]) if delivery["status"] == "pending" else None,
        "created_at": api_time(delivery["created_at"]),
        "attempts": attempts[delivery["id"]],
    } for delivery in deliveries]


def due_deliveries(conn, per_webhook):
    """{developer id: their due deliveries, up to `per_webhook` per endpoint, taking
    the endpoints in turn}. One index seek per endpoint with deliveries pending,
    however many it has, so one tenant's backlog cannot hide another's."""
    now = db_time()
    waiting = conn.execute(
        "WITH RECURSIVE waiting(webhook_id) AS ("
        " SELECT min(webhook_id) FROM webhook_deliveries WHERE status IN ('pending', 'delivering')"
        " UNION ALL SELECT (SELECT min(webhook_id) FROM webhook_deliveries WHERE status IN ('pending', 'delivering')"
        "  AND webhook_id > waiting.webhook_id) FROM waiting WHERE webhook_id IS NOT NULL)"
        " SELECT w.id, w.developer_id, w.livemode FROM waiting JOIN webhooks w ON w.id = waiting.webhook_id"
        " WHERE w.status = 'enabled' AND w.deleted_at IS NULL").fetchall()
    by_developer = {}
    for webhook_id, developer_id, livemode in waiting:
        rows = conn.execute(
            "SELECT id, status, attempts, next_attempt_at, updated_at, webhook_id, ? AS developer_id, ? AS livemode"
            " FROM webhook_deliveries"
            " WHERE webhook_id = ? AND status IN ('pending', 'delivering') AND next_attempt_at <= ?"
            " ORDER BY next_attempt_at LIMIT ?", (developer_id, livemode, webhook_id, now, per_webhook)).fetchall()
        if rows:
            by_developer.setdefault(developer_id, []).append(rows)
    return {developer_id: taking_turns(lists) for developer_id, lists in by_developer.items()}


def claim_delivery(conn, config, row):
    """Compare-and-set a due delivery to 'delivering', so no row is sent twice at once;
    returns the claim's expiry, or None when another worker got there first."""
    with transaction(conn):
        now = utcnow()          # from when the write lock is ours (as texts'), one reading for both
        claim_until = claim_expiry(config, DELIVERY_CLAIM_SECONDS, now)
        won = conn.execute(
            "UPDATE webhook_deliveries SET status = 'delivering', attempts = attempts + 1, next_attempt_at = ?,"
            " updated_at = ? WHERE id = ? AND status = +? AND next_attempt_at = ? AND EXISTS (SELECT 1 FROM webhooks w"
            " WHERE w.id = webhook_deliveries.webhook_id AND w.status = 'enabled' AND w.deleted_at IS NULL)",
            (claim_until, db_time(now), row["id"], row["status"], row["next_attempt_at"])).rowcount
    return claim_until if won else None


INTERRUPTED = "the server stopped during this attempt (it may have been delivered)"


def record_interrupted_attempt(conn, row):
    """A lapsed claim (`row`, from due_deliveries()) is an attempt whose outcome nobody
    saw: recorded as one that failed, and tried again on the retry schedule. Taken up at
    once instead, every crash during a call to a slow receiver spent one of its attempts
    within a minute, and the schedule's three days could end after a few restarts."""
    record_attempt(conn, row["id"], row["webhook_id"], row["attempts"], row["next_attempt_at"],
                   row["updated_at"], None, INTERRUPTED, 0, None)      # (updated as it was claimed)


def attempt_delivery(conn, config, deadlines, connections, delivery_id, attempt, claim_until):
    """POST one claimed delivery and record the outcome; returns the HTTP status or None.
    The attempt, from connecting to the last byte of the answer, ends after
    outbound.deadline_seconds however slowly the receiver trickles."""
    row = conn.execute(
        "SELECT d.webhook_id, w.developer_id, w.livemode, w.url, w.secret, w.previous_secret, w.previous_secret_expires_at,"
        " e.id AS event_id, e.type, e.body FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id"
        " JOIN webhook_events e ON e.id = d.event_id WHERE d.id = ?", (delivery_id,)).fetchone()
    body = row["body"].encode("utf-8")
    signing = [row["secret"]]
    if row["previous_secret"] and row["previous_secret_expires_at"] > db_time():
        signing.append(row["previous_secret"])
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"PausePoint-Webhooks/{VERSION}",
        "X-PausePoint-Event": row["type"],
        "X-PausePoint-Event-Id": row["event_id"],
        "X-PausePoint-Signature": signature_header(signing, timestamp, body),
        # The same signed, as Standard Webhooks says, for its maintained verifiers.
        "webhook-id": row["event_id"],
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard_signature(signing, row["event_id"], timestamp, body),
    }
    started_at, started = db_time(), time.monotonic()
    status_code, error, retry_after, final = None, None, None, False
    deadline = deadlines.deadline(config["outbound.deadline_seconds"], owner=row["developer_id"])
    # An endpoint made before live ones had to be https keeps its URL through the upgrade: its
    # respond links are not sent in the clear, and wait, retried, for a PATCH to https.
    cleartext = cleartext_problem(row["url"], config["webhooks.allow_private"], row["livemode"])
    try:
        if cleartext:
            raise CleartextRefused(cleartext)
        with deadline:
            response = connections.post(row["webhook_id"], deadline, row["url"], data=body, headers=headers,
                                        timeout=(deadline.remaining(), deadline.remaining()),
                                        resend_lost=attempt <= len(RETRY_DELAYS_SECONDS))
        if deadline.expired:
            # The socket was shut down mid-answer: what arrived is not an answer.
            raise requests.Timeout(f"timed out after {deadline}")
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}" + (" (redirects are not followed)" if 300 <= status_code < 400 else "")
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
    except Exception as e:      # whatever failed (a host name IDNA cannot encode, say), the attempt is recorded
        error = f"timed out after {deadline}" if deadline.passed() else describe_request_error(e, deadline)
        # An address the server may not call will not become one by retrying for three days.
        final = find_cause(e, PrivateAddressRefused) is not None
    duration_ms = round((time.monotonic() - started) * 1000)
    record_attempt(conn, delivery_id, row["webhook_id"], attempt, claim_until, started_at, status_code, error,
                   duration_ms, retry_after, final)
    return status_code


def describe_request_error(e, deadline):
    refused = find_cause(e, (PrivateAddressRefused, CleartextRefused, AnswerHeadTooLarge))
    if refused is not None:
        return str(refused)
    if isinstance(e, requests.Timeout):
        return f"timed out after {deadline}"
    if isinstance(e, requests.ConnectionError):
        # Which of the usual two it was tells the developer where to look: their DNS, or their receiver.
        if find_cause(e, socket.gaierror) is not None:
            return "could not connect: the host name did not resolve"
        if find_cause(e, ConnectionRefusedError) is not None:
            return "could not connect: connection refused (is the receiver running, on that port?)"
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
    """A Retry-After's delay: seconds, or an HTTP date (RFC 9110 allows either), up to a day."""
    value = (value or "").strip()
    if re.fullmatch("[0-9]{1,12}", value):
        return min(int(value), MAX_RETRY_AFTER_SECONDS)
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        # Every HTTP date is GMT, asctime's form too, which names no zone (parsed as naive).
        when = email.utils.parsedate_to_datetime(value)
        when = when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
        return min(max(0, math.ceil((when - utcnow()).total_seconds())), MAX_RETRY_AFTER_SECONDS)
    return None


def record_attempt(conn, delivery_id, webhook_id, attempt, claim_until, started_at, status_code, error,
                   duration_ms, retry_after, final=False):
    with transaction(conn):
        now = utcnow()
        webhook = conn.execute("SELECT * FROM webhooks WHERE id = ?", (webhook_id,)).fetchone()
        next_at = None
        if error is None:
            status = "succeeded"
        elif final or status_code == 410 or attempt > len(RETRY_DELAYS_SECONDS):
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
        wake_after_commit(conn, "attempted", (delivery_id, attempt, "succeeded" if error is None else
                                              "failed" if status == "failed" else "retried", webhook["livemode"]))
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
# Retention: what may be deleted, and when
###############################################################################

# The pruning job deletes in batches, a transaction each, so other writers never wait long for it.
# A batch's size is counted in what it selects (pauses, events), and what goes with one varies
# (a ten-person test pause with reminders takes some 50 rows with it): so sizes adapt, halving
# while a batch holds the write lock longer than PRUNE_BATCH_SECONDS and doubling while it
# takes under half that, from PRUNE_BATCH_FIRST up to PRUNE_BATCH.
PRUNE_BATCH, PRUNE_BATCH_FIRST, PRUNE_BATCH_SECONDS = 500, 16, 0.05
# A test pause past retention.test_pauses_kept stays this long after its decision, for the agent
# that asked to learn it (and a retried create to replay it) before it goes.
KEPT_AFTER_DECISION = dt.timedelta(hours=1)
# What goes with a test pause (by its id), and with a webhook event (by its id).
PAUSE_ROWS = ["DELETE FROM notifications WHERE pause_id = ?", "DELETE FROM pause_recipients WHERE pause_id = ?",
              "DELETE FROM pause_steps WHERE pause_id = ?", "DELETE FROM idempotency_keys WHERE pause_id = ?",
              "DELETE FROM pauses WHERE id = ? AND livemode = 0"]
EVENT_ROWS = ["INSERT INTO event_feed_pruned SELECT developer_id, livemode, rowid FROM webhook_events WHERE id = ?"
              " ON CONFLICT DO UPDATE SET through_rowid = max(through_rowid, excluded.through_rowid)",
              "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries WHERE event_id = ?)",
              "DELETE FROM webhook_deliveries WHERE event_id = ?", "DELETE FROM webhook_events WHERE id = ?"]


def prune_expired_data(conn, config, now=None):
    """Delete what is past its retention (see schema.sql); returns {kind: rows deleted}.
    Live pauses and live audit events are never deleted."""
    now = now or utcnow()
    test_cutoff = db_time(now - dt.timedelta(days=config["retention.test_days"]))
    log_cutoff = db_time(now - dt.timedelta(days=config["retention.delivery_log_days"]))
    deleted = collections.Counter()
    delete = functools.partial(delete_in_batches, conn, deleted)
    delete("test pauses", "SELECT id FROM pauses WHERE livemode = 0 AND status != 'pending' AND decided_at < ?",
           (test_cutoff,), PAUSE_ROWS)
    audit_since = {developer_id: test_cutoff for developer_id, in query_db(
        conn, "SELECT DISTINCT developer_id FROM audit_events INDEXED BY audit_test_by_age"
              " WHERE livemode = 0 AND timestamp < ?", (test_cutoff,))}
    for developer_id, since in prune_test_pauses_past_kept(conn, config, delete, now):
        audit_since[developer_id] = max(audit_since.get(developer_id, test_cutoff), since)
    # A test chain loses only its oldest events, up to the first one it keeps, so what is kept
    # still verifies link by link (audit_chain_breaks()).
    for developer_id, since in audit_since.items():
        # (With none kept, up to the newest one now: not one written while the batches run.)
        kept = query_db(conn, "SELECT coalesce((SELECT seq FROM audit_events WHERE developer_id = :developer"
                              " AND livemode = 0 AND timestamp >= :since ORDER BY seq LIMIT 1), (SELECT max(seq) + 1"
                              " FROM audit_events WHERE developer_id = :developer AND livemode = 0))",
                        {"developer": developer_id, "since": since}, one=True)[0]
        delete("test audit events", "SELECT seq FROM audit_events WHERE developer_id = ? AND livemode = 0 AND seq < ?",
               (developer_id, kept if kept is not None else 0), ["DELETE FROM audit_events WHERE seq = ? AND livemode = 0"])
    # An event goes once its deliveries ended that long ago, but never its feed's newest: a reader
    # whose cursor it is has missed nothing (a 404 would tell it otherwise, event_feed_pruned), and
    # the table's newest stays, so no later event takes its rowid. Those it keeps (a delivery still
    # pending, as to a disabled endpoint) are passed over once, batch after batch resuming after
    # the last row it read, not read again by each.
    newest_old = query_db(conn, "SELECT max(rowid) FROM webhook_events INDEXED BY webhook_events_by_age"
                                " WHERE created_at < ?", (log_cutoff,), one=True)[0]
    delete("webhook events", "SELECT id, 0, rowid FROM webhook_events e WHERE rowid > ? AND rowid <= ?"
                             " AND created_at < ? AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE"
                             " d.event_id = e.id AND (d.status IN ('pending', 'delivering') OR d.updated_at >= ?))"
                             " AND rowid < (SELECT max(rowid) FROM webhook_events f INDEXED BY webhook_events_feed"
                             " WHERE f.developer_id = e.developer_id AND f.livemode = e.livemode) ORDER BY rowid",
           lambda last: (last[2] if last else 0, newest_old or 0, log_cutoff, log_cutoff), EVENT_ROWS)
    # A report no send claimed: for a text whose send's record was lost (a claim that ran out).
    delete("early delivery reports", "SELECT seq FROM early_delivery_reports WHERE received_at < ?",
           (db_time(now - EARLY_REPORT_KEPT),), ["DELETE FROM early_delivery_reports WHERE seq = ?"])
    delete("idempotency keys", "SELECT rowid FROM idempotency_keys WHERE created_at < ?",
           (db_time(now - IDEMPOTENCY_WINDOW),), ["DELETE FROM idempotency_keys WHERE rowid = ?"])
    delete("dashboard devices", "SELECT rowid FROM dashboard_devices WHERE signed_in_at < ?",
           (db_time(now - DEVICE_LIFETIME),), ["DELETE FROM dashboard_devices WHERE rowid = ?"])
    # Sign-ins past either limit, which session_for() would refuse anyway.
    delete("dashboard sign-ins", "SELECT token_hash FROM dashboard_sessions WHERE last_seen_at < ? OR created_at < ?",
           (db_time(now - dt.timedelta(minutes=config["dashboard.session_idle_minutes"])),
            db_time(now - dt.timedelta(hours=config["dashboard.session_max_hours"]))),
           ["DELETE FROM dashboard_sessions WHERE token_hash = ?"])
    if any(deleted.values()):
        log.info("pruned past retention: %s", ", ".join(f"{n} {kind}" for kind, n in deleted.items() if n))
    return dict(deleted)


def prune_test_pauses_past_kept(conn, config, delete, now):
    """Past retention.test_pauses_kept, a developer's oldest test pauses decided at least
    KEPT_AFTER_DECISION ago go before their time, and their test event feed from before the
    oldest decided test pause kept (deliveries still pending with it, as to a disabled
    endpoint, which would keep it for good), so one developer's test data is bounded by a
    weight (weight_in_test_mode(): messages times what they carry), not only by their rate times
    retention.test_days. Yields (developer, the time from
    which their events are kept), for their audit chain."""
    kept, decided_before = config["retention.test_pauses_kept"], db_time(now - KEPT_AFTER_DECISION)
    for developer_id, in query_db(conn, "SELECT developer_id FROM pauses WHERE livemode = 0 GROUP BY developer_id"
                                        " HAVING sum(test_weight) > ?", (kept,)):
        # The newest pauses that begin within `kept` of weight, counted from the newest (which
        # is always kept, however much it weighs).
        oldest_kept = query_db(conn, "SELECT seq FROM (SELECT seq, test_weight, sum(test_weight) OVER (ORDER BY"
                                     " seq DESC) AS heavier FROM pauses INDEXED BY pauses_test_weights"
                                     " WHERE developer_id = ? AND livemode = 0) WHERE heavier - test_weight < ?"
                                     " ORDER BY seq LIMIT 1", (developer_id, kept), one=True)
        delete("test pauses", "SELECT id FROM pauses WHERE developer_id = ? AND livemode = 0 AND seq < ?"
                              " AND status != 'pending' AND decided_at < ?",
               (developer_id, oldest_kept["seq"], decided_before), PAUSE_ROWS)
        # A pause kept for the hour after its decision keeps its events, its decision's above all.
        # What goes is a prefix of the feed, so a reader's cursor is either kept with everything
        # after it or gone (404), never past a gap: it stops at an event being delivered, looked
        # at batch by batch under the write lock the delivery job claims with, and before the
        # feed's newest (webhook_events_feed).
        since = query_db(conn, "SELECT min(created_at) FROM pauses WHERE developer_id = ? AND livemode = 0"
                               " AND (seq >= ? OR status != 'pending')", (developer_id, oldest_kept["seq"]),
                         one=True)[0]
        feed_kept = query_db(conn, "SELECT coalesce((SELECT rowid FROM webhook_events WHERE developer_id = :developer"
                                   " AND livemode = 0 AND created_at >= :since ORDER BY rowid LIMIT 1),"
                                   " (SELECT max(rowid) FROM webhook_events WHERE developer_id = :developer"
                                   " AND livemode = 0))", {"developer": developer_id, "since": since}, one=True)[0]
        delete("webhook events", "SELECT id, EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id"
                                 " AND d.status = 'delivering') FROM webhook_events e WHERE developer_id = ?"
                                 " AND livemode = 0 AND rowid < ? ORDER BY rowid",
               (developer_id, feed_kept if feed_kept is not None else -1), EVENT_ROWS)
        yield developer_id, since


def delete_in_batches(conn, deleted, kind, select, args, delete):
    """Run `select` (… LIMIT ? appended) for ids, and each `delete` statement for each id, a
    transaction a batch (sized as PRUNE_BATCH says), until a batch comes short; counts them
    in deleted[kind]. A second column the select gives, true, stops it at that row, which is
    kept. `args` may be a function of the last row the batch before read (None at first),
    for a select that resumes after it."""
    size, last = PRUNE_BATCH_FIRST, None
    while True:
        with transaction(conn):
            started = time.monotonic()
            rows = conn.execute(select + " LIMIT ?", (*(args(last) if callable(args) else args), size)).fetchall()
            stop = next((n for n, row in enumerate(rows) if len(row) > 1 and row[1]), None)
            ids = [row[0] for row in rows[:stop]]
            for statement in delete:
                conn.executemany(statement, [(i,) for i in ids])
        took = time.monotonic() - started       # its COMMIT too, which writes what it changed
        deleted[kind] += len(ids)
        last = rows[-1] if rows else last
        if stop is not None or len(rows) < size:
            return
        size = (max(1, size // 2) if took > PRUNE_BATCH_SECONDS else
                min(PRUNE_BATCH, size * 2) if took < PRUNE_BATCH_SECONDS / 2 else size)


###############################################################################
# Signed receipts: the server's Ed25519 keys
###############################################################################

def signing_keys_path(database_path):
    """The server's signing keys live beside its database, and go with it into a backup."""
    return database_path + ".keys.json"


def from_b64url(text):
    """The bytes of unpadded base64url text (b64url()'s inverse)."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def receipt_payload(claims):
    """A receipt's claims as the bytes it signs: UTF-8 JSON, as RFC 8259 says JSON is. (ASCII
    escapes took an emoji 12 bytes, 16 once in base64, and a receipt is kept twice, in its
    pause and its decision's event.) ASCII only for a lone surrogate an older version let
    into a pause's fields, which UTF-8 cannot hold, so that it still signs."""
    text = compact_json(claims)
    return (json.dumps(claims, separators=(",", ":")) if LONE_SURROGATE.search(text) else text).encode()


class Signer:
    """Compact JWS (EdDSA) with the server's Ed25519 key. The keys file (mode 0600) is made
    on first start; `rotate-signing-key` adds a new key and keeps only the public half of
    the old, still published in the JWKS, so receipts signed before stay checkable. A
    rotation made while the server runs is picked up at its next signature; a keys file
    that becomes unreadable meanwhile leaves the server signing with the key it has, since
    a decision must never wait on it."""

    def __init__(self, path, signed_by=lambda: None):
        self.path, self.signed_by = path, signed_by()
        # The file as last read, and as last refused (stamp()): a refusal is logged once a version.
        self.keys, self.current, self.read_at, self.refused_at = [], None, None, None
        # Signs a round of timeouts' receipts while the timeout job writes (expire_due_pauses()).
        self.helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="signing")
        if not os.path.exists(path):
            if self.signed_by:
                raise ConfigError(f"{path} is missing, but this database holds receipts signed with the keys it"
                                  " held: restore it from the backup beside the database's (see the README); with"
                                  " no backup that holds it, rotate-signing-key --keys-lost makes a new one")
            create_signing_keys(path)
        self.read_at = self.stamp()
        self.keys, self.current = self.read()
        warn_if_others_may_read(path, "the signing keys file")

    def stamp(self):
        """What tells one version of the keys file from another: a rotation writes a new
        file, with a new inode (which a filesystem may hand back two rotations later), a
        new time (coarse on some filesystems) and one key more; a chmod or chown that makes
        it readable changes its ctime."""
        try:
            found = os.stat(self.path)
        except OSError as e:
            return e.strerror
        return found.st_ino, found.st_mtime_ns, found.st_ctime_ns, found.st_size

    def read(self):
        """(keys, (kid, private key) of the one that signs); ConfigError naming the file if unusable,
        or if it would unpublish a key this process published or signs with (an older copy put back)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                keys = json.load(f)["keys"]
            published = {key["kid"]: key["public"] for key in keys if "lost_at" not in key}
            gone = {key["kid"] for key in keys if "lost_at" in key}      # replace_lost_signing_keys()
            named = all(kid == signing_key_id(base64.urlsafe_b64decode(public + "=="))
                        for kid, public in published.items())
            signing = next(key for key in reversed(keys) if key.get("private"))
            private = Ed25519PrivateKey.from_private_bytes(base64.urlsafe_b64decode(signing["private"] + "=="))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration) as e:
            raise ConfigError(f"the signing keys file {self.path} cannot be used ({type(e).__name__}: {e}); restore"
                              " it from a backup") from None
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if b64url(public) != signing["public"]:         # (its kid names its public key: `named`)
            raise ConfigError(f"in the signing keys file {self.path}, the private key of {signing['kid']} is not the"
                              " one its public key and kid name: restore the file from a backup")
        if not named:
            raise ConfigError(f"in the signing keys file {self.path}, a kid does not name its public key: restore"
                              " the file from a backup")
        if self.signed_by and self.signed_by not in published and self.signed_by not in gone:
            raise ConfigError(f"the signing keys file {self.path} does not hold the key {self.signed_by} that signed"
                              " this database's latest receipt: restore the keys file from a backup made after that"
                              " key was made (or add {\"kid\": that kid, \"public\": its \"x\" in"
                              " /.well-known/jwks.json} to its keys)")
        lost = [key["kid"] for key in self.keys if "lost_at" not in key and published.get(key["kid"]) != key["public"]]
        if lost:
            raise ConfigError(f"the signing keys file {self.path} does not hold the key {lost[0]} as this server"
                              " published it: put the file back as it was (the server would not start with it:"
                              " its receipts need that key)")
        if self.current and signing["kid"] != self.current[0] and signing["kid"] in {key["kid"] for key in self.keys}:
            raise ConfigError(f"the signing keys file {self.path} would sign again with {signing['kid']}, a key"
                              " already retired: restore the keys file from the database's backup")
        return keys, (signing["kid"], private)

    def reload(self):
        """Take up a changed keys file; one that cannot be taken is logged once, and the
        keys already loaded go on signing."""
        stamp = self.stamp()
        if stamp == self.read_at:
            return
        try:
            self.keys, self.current = self.read()       # one assignment: a kid never meets another's key
            self.read_at = stamp
        except ConfigError as e:        # read again next time: it may be a moment's trouble (EMFILE, say)
            if stamp != self.refused_at:
                log.error("signing with the key already loaded: %s", e)
                self.refused_at = stamp

    def sign(self, claims):
        return self.sign_all([claims])[0]

    def sign_all(self, many):
        """A compact JWS of each of `many` claims."""
        self.reload()
        kid, private = self.current
        header = b64url(json.dumps({"alg": "EdDSA", "kid": kid, "typ": "JWT"}, separators=(",", ":")).encode())
        signed = [f"{header}.{b64url(receipt_payload(claims))}" for claims in many]
        return [f"{text}.{b64url(private.sign(text.encode('ascii')))}" for text in signed]

    def jwks(self):
        self.reload()
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": key["public"], "kid": key["kid"], "use": "sig",
                          "alg": "EdDSA"} for key in self.keys if "lost_at" not in key]}


# The audit events that record a pause leaving pending.
DECISION_EVENTS = ("pause.responded", "pause.timed_out", "pause.cancelled")


def sql_list(values):
    """A tuple of constant strings as an SQL list: ('a', 'b')."""
    return "(" + ", ".join(f"'{value}'" for value in values) + ")"


RECEIPT_LOOKBACK = 10_000       # audit events read for the latest decision: about 5 ms


def latest_receipt_kid(database_path):
    """The kid that signed the database's latest receipt, or None when it holds none (read
    before any migration: a database from before receipts holds none). Latest as decided, not
    as asked: a pause asked before a rotation may be decided after it, with the new key, while
    the newest pause was decided before it. A decision's audit event is written with its receipt,
    so the log, newest first, answers from a busy database's last few events. It reads at most
    RECEIPT_LOOKBACK of them, so a start never reads a whole log that has no decision lately
    (20M events took 3 s); beyond them (or where a test pause's events were pruned before the
    pause), the newest pause with a receipt."""
    db = sqlite3.connect(database_path)
    try:
        receipt = db.execute("SELECT coalesce((SELECT p.receipt FROM (SELECT seq, pause_id, event_type"
                             " FROM audit_events ORDER BY seq DESC LIMIT ?) a CROSS JOIN pauses p ON p.id = a.pause_id"
                             f" WHERE a.event_type IN {sql_list(DECISION_EVENTS)}"
                             " AND p.receipt IS NOT NULL ORDER BY a.seq DESC LIMIT 1),"
                             " (SELECT receipt FROM pauses WHERE receipt IS NOT NULL ORDER BY seq DESC LIMIT 1))",
                             (RECEIPT_LOOKBACK,)).fetchone()[0]
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()
    return receipt and json.loads(base64.urlsafe_b64decode(receipt.split(".")[0] + "==")).get("kid")


def receipt_breaks(conn, published):
    """Check every decided pause's receipt against the public keys of the keys file ({kid:
    public key}, as published): ([(pause id, developer_id, livemode, why)] for each that does
    not hold, how many were checked, how many a key not published signed). The audit chain
    says nothing of a pause's row, and whoever can write the database can rewrite a chain
    from end to end, but cannot sign: a decided pause changed (its choice, its comment) no
    longer says what its receipt does. A receipt signed before a claim was added (the
    comment, the developer) vouches for the claims it has."""
    breaks, checked, unknown, after = unsigned_since_receipts(conn), 0, 0, 0
    while pauses := query_db(conn, "SELECT * FROM pauses WHERE receipt IS NOT NULL AND seq > ? ORDER BY seq LIMIT ?",
                             (after, AUDIT_READ_PAGE)):
        for pause in pauses:
            why = receipt_problem(pause, published, votes_of(conn, pause))
            if why == KEY_NOT_PUBLISHED:
                unknown += 1
            elif why:
                breaks.append((pause["id"], pause["developer_id"], pause["livemode"], why))
            else:
                checked += 1
        after = pauses[-1]["seq"]
    return breaks, checked, unknown


KEY_NOT_PUBLISHED = "signed with a key the keys file does not publish"
RECEIPTS_SINCE_SCHEMA = 14         # the migration that brought receipts: every decision since is signed


def unsigned_since_receipts(conn):
    """Decided pauses without a receipt, though decided once every decision was signed (since
    the database took migration RECEIPTS_SINCE_SCHEMA, or was made at a later schema): a
    receipt cleared along with a change to its pause. Those decided before have none by right."""
    since = query_db(conn, "SELECT min(applied_at) FROM schema_migrations WHERE version >= ?",
                     (RECEIPTS_SINCE_SCHEMA,), one=True)[0]
    # Decided since then by its own decided_at, or by its decision's event: the chain holds the
    # time the decision was made, which a decided_at moved back to before receipts cannot change.
    return [(pause_id, developer_id, livemode, "it has none, though every decision since"
             f" {api_time(since)} is signed: its receipt was removed")
            for pause_id, developer_id, livemode in conn.execute(
                "SELECT id, developer_id, livemode FROM pauses WHERE receipt IS NULL AND status != 'pending'"
                " AND (decided_at >= :since OR EXISTS (SELECT 1 FROM audit_events WHERE pause_id = pauses.id"
                f" AND event_type IN {sql_list(DECISION_EVENTS)} AND timestamp >= :since)) ORDER BY seq",
                {"since": since})] if since else []


def decision_breaks(conn):
    """Pauses that no longer agree with the decisions the audit chain records of them: [(pause
    id, developer_id, livemode, why)]. A pause is decided once, and its decision's event
    holds its status, choice, comment and decided_by, so a decision undone (the pause put
    back to pending and its receipt cleared, to be decided otherwise with a receipt of its
    own) or rewritten shows against the chain, which whoever holds a noted head can trust."""
    breaks, after = [], 0
    while pauses := query_db(conn, "SELECT seq, id, developer_id, livemode, status, choice, comment, decided_by"
                                   " FROM pauses WHERE seq > ? ORDER BY seq LIMIT ?", (after, AUDIT_READ_PAGE)):
        recorded = collections.defaultdict(list)
        for event in query_db(conn, "SELECT seq, pause_id, event_type, data FROM audit_events WHERE pause_id IN"
                                    " (SELECT value FROM json_each(?)) AND event_type IN"
                                    f" {sql_list(('pause.created', *DECISION_EVENTS))} ORDER BY seq",
                              (json.dumps([pause["id"] for pause in pauses]),)):
            recorded[event["pause_id"]].append(event)
        for pause in pauses:
            why = decision_problem(pause, recorded[pause["id"]])
            if why:
                breaks.append((pause["id"], pause["developer_id"], pause["livemode"], why))
        after = pauses[-1]["seq"]
    return breaks


def decision_problem(pause, events):
    """Why a pause disagrees with its creation and decision `events` in the audit chain, or None."""
    created = [event for event in events if event["event_type"] == "pause.created"]
    events = [event for event in events if event["event_type"] != "pause.created"]
    if len(events) > 1:
        seqs = ", ".join(f"aud_{event['seq']}" for event in events)
        return f"the audit log records {len(events)} decisions of it ({seqs}): it was decided again"
    if not events:
        # Pruning takes a chain's oldest events first: where its creation is still recorded,
        # so is any decision that came after it.
        return (f"it is {pause['status']}, though the audit log records its creation (aud_{created[0]['seq']}) and"
                " no decision of it: it was changed" if created and pause["status"] != "pending" else None)
    event = events[0]
    if pause["status"] == "pending":
        return f"it is pending, though aud_{event['seq']} records it {event['event_type'].split('.')[1]}: it was changed"
    try:
        data = json.loads(event["data"])
    except ValueError:
        data = {}
    recorded = {"status": event["event_type"].split(".")[1],
                **{name: data[name] for name in ("choice", "comment", "decided_by") if name in data}}
    changed = [name for name, value in recorded.items() if pause[name] != value]
    return (f"it no longer says what aud_{event['seq']} records of its decision ({', '.join(changed)}): it was changed"
            if changed else None)


def receipt_problem(pause, published, votes):
    """Why a decided pause's receipt does not hold (KEY_NOT_PUBLISHED when it cannot be
    checked here: a key lost with its file), or None when it does."""
    try:
        header, payload, signature = pause["receipt"].split(".")
        algorithm, kid = (json.loads(from_b64url(header))[name] for name in ("alg", "kid"))
        claims = json.loads(from_b64url(payload))
        if algorithm != "EdDSA" or not isinstance(claims, dict):
            return "it is not a receipt this server signs"
        if kid not in published:
            return KEY_NOT_PUBLISHED
        Ed25519PublicKey.from_public_bytes(from_b64url(published[kid])).verify(
            from_b64url(signature), f"{header}.{payload}".encode("ascii"))
    except InvalidSignature:
        return "its signature does not check: the receipt was changed"
    except (ValueError, KeyError, TypeError, AttributeError):
        return "it is not a receipt this server signs"
    try:
        expected = receipt_claims(pause, votes)
    except (ValueError, TypeError, AttributeError):     # its JSON columns no longer JSON, a number for text
        return "the pause holds what this server never writes: it was changed"
    # Compared as JSON text: as Python values 1, 1.0 and true are equal, and an agent would not take them so.
    changed = [name for name in claims
               if name not in expected or json.dumps(claims[name], sort_keys=True) != json.dumps(expected[name],
                                                                                                sort_keys=True)]
    return f"the pause no longer says what its receipt does ({', '.join(changed)}): it was changed" if changed else None


def new_signing_key():
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    return {"kid": signing_key_id(public), "public": b64url(public), "private": b64url(raw),
            "created_at": api_time(db_time())}


def signing_key_id(public):
    return "ppk_" + hashlib.sha256(public).hexdigest()[:16]


def write_signing_keys(path, keys, replace=True):
    """Write the keys file readable by its owner only, whole or not at all: to a file of its
    own first, then moved into place (or, with replace=False, linked there only if nothing
    is there yet: two processes starting at once end up with one file, whole). A file it
    replaces keeps its owner: `sudo … rotate-signing-key` must not leave the server's keys
    to root."""
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".keys-")
    try:
        with open(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            take_owner(f.fileno(), path)
            json.dump({"keys": keys}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
        sync_directory(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def sync_directory(path):
    """Make the name `path` was just given last through a power cut, as the file's own fsync
    does not: a database kept by the disk with receipts signed by a key file the disk lost
    would refuse to start. (Where a file system cannot sync a directory, it does not need to.)"""
    with contextlib.suppress(OSError):      # nor where this user may write it but not read it
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def take_owner(fd, path):
    """Give `fd` the owner of the file at `path`, or else of the database beside which the
    keys file at `path` is, or else, with no database yet, of the directory it is made in: a
    command run with sudo must not leave the server's files to root. (Not root: nothing to
    give, and the file is the caller's own.)"""
    for owner in (path, path.removesuffix(".keys.json"), os.path.dirname(os.path.abspath(path))):
        with contextlib.suppress(OSError):
            found = os.stat(owner)
            with contextlib.suppress(PermissionError):
                os.fchown(fd, found.st_uid, found.st_gid)
            return


def open_lock_file(path, owner):
    """The lock file at `path`, made if need be, with the owner of the file at `owner` (see
    take_owner()) when this call made it. Never through a symbolic link, never a file that
    was there given away, nor anything but a plain file waited on: whoever may write the
    directory could otherwise have root, running a command with sudo, hand them any file (a
    hard link to it), or hang (a FIFO). OSError if it cannot be had."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        take_owner(fd, owner)
    except FileExistsError:
        # ELOOP for a symbolic link; ENXIO at once for a FIFO nobody reads.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a plain file") from None
    return os.fdopen(fd, "a")


def create_signing_keys(path):
    """The first keys file. One that cannot be written (a full disk, a quota) stops start-up
    with a sentence naming it, not a traceback: nothing has been signed yet, so nothing is lost."""
    try:
        with contextlib.suppress(FileExistsError):      # another process made it first
            write_signing_keys(path, [new_signing_key()], replace=False)
    except OSError as e:
        raise ConfigError(f"the signing keys file {path} cannot be made ({e.strerror}): free space on its disk,"
                          " or let this user write to its directory, then start again") from None


def rotate_signing_key(path):
    """A new signing key; the old ones keep only their public half. Returns the new kid.
    One rotation at a time (a lock beside the file), so none is lost. A directory this user
    may not write to (the lock, the new file) leaves the old file as it was."""
    try:
        with open_lock_file(path + ".lock", path) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with open(path, encoding="utf-8") as f:
                keys = json.load(f)["keys"]
            retired = [{name: value for name, value in key.items() if name != "private"} for key in keys]
            for key in retired:
                key.setdefault("retired_at", api_time(db_time()))
            fresh = new_signing_key()
            write_signing_keys(path, retired + [fresh])
    except OSError as e:
        raise ConfigError(f"the signing keys file {path} was not rotated: {e.filename or path}: {e.strerror}") from None
    return fresh["kid"]


def replace_lost_signing_keys(database_path):
    """A new keys file for a database whose own is lost, with no backup to restore it from
    (without one a start is refused for good). The key of the latest receipt is recorded as
    lost, by its kid alone, and a new one signs from now on: receipts signed before can no
    longer be checked against this server's keys. Returns (new kid, lost kid or None)."""
    path = signing_keys_path(database_path)
    if os.path.lexists(path):
        raise ConfigError(f"{path} exists: --keys-lost makes a keys file only where there is none. Keep the one there"
                          " (it may yet be mended) by moving it aside, then run this again")
    real = os.path.realpath(database_path)
    if os.path.lexists(signing_keys_path(real)):
        # Named by a link, the database looks for its keys beside the link: they are beside the file.
        raise ConfigError(f"{path} is missing, but {signing_keys_path(real)}, beside the file this names, is there:"
                          f" name the database {real} (--db or database.path), and its keys are not lost")
    running = server_running(database_path)
    if running is not False:        # None: its lock file cannot be read to tell
        raise ConfigError(("a server is running on this database" if running else f"whether a server runs on this"
                           f" database cannot be told ({server_lock_path(database_path)} cannot be read)")
                          + ", signing with the keys it read as it started: stop it first (run this as the user the"
                          " server runs as), or its next receipts would be signed with a key no file holds")
    lost = latest_receipt_kid(database_path)
    fresh = new_signing_key()
    try:
        write_signing_keys(path, ([{"kid": lost, "lost_at": api_time(db_time())}] if lost else []) + [fresh],
                           replace=False)
    except OSError as e:
        raise ConfigError(f"the signing keys file {path} cannot be made ({e.strerror})") from None
    return fresh["kid"], lost


###############################################################################
# Metrics for operators (Prometheus)
###############################################################################

class Metrics:
    """What an operator graphs and alerts on, in a registry of this runtime's own: counts
    taken from what each committed transaction registered (so a rolled-back change is never
    counted), request times from the route plugin, and the backlogs read from the database
    at each scrape."""

    def __init__(self, rt):
        self.rt = rt
        self.prometheus = prometheus_client = load_prometheus()
        self.registry = registry = prometheus_client.CollectorRegistry()
        counter, histogram = (functools.partial(kind, registry=registry)
                              for kind in (prometheus_client.Counter, prometheus_client.Histogram))
        self.created = counter("pausepoint_pauses_created", "Pauses created", ["mode"])
        self.decided = counter("pausepoint_pauses_decided", "Pauses decided, by outcome", ["outcome", "mode"])
        self.decision_seconds = histogram("pausepoint_decision_seconds", "From a pause's creation to a person's answer",
                                          ["mode"], buckets=(10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 24 * 3600))
        self.lateness = histogram("pausepoint_timeout_lateness_seconds", "How long after its expiry a timeout was applied",
                                  buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))
        self.notifications = counter("pausepoint_notification_attempts", "Notification sends, by channel and result"
                                     " (sent, retried, failed, simulated; cancelled: failed once its pause was"
                                     " answered or out of time)", ["channel", "result"])
        self.webhooks = counter("pausepoint_webhook_attempts", "Webhook delivery attempts, by result"
                                " (succeeded, retried, failed) and mode", ["result", "mode"])
        self.reports = counter("pausepoint_delivery_reports", "Texts Twilio reported on after taking them, by the"
                               " first final word for each (delivered, read, undelivered, failed)",
                               ["channel", "status"])
        self.rate_limited = counter("pausepoint_rate_limit_refusals", "Requests refused by a rate limit", ["limit"])
        self.requests = histogram("pausepoint_request_seconds", "Time to answer a request, by route",
                                  ["method", "route"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        registry.register(self)

    def committed(self, woken):
        now = None
        for _, mode in woken.get("created", ()):
            self.created.labels(MODE_NAMES[mode]).inc()
        for _, status, mode, created_at, decided_at, expires_at in woken.get("decided", ()):
            self.decided.labels(status, MODE_NAMES[mode]).inc()
            if status == "responded":
                self.decision_seconds.labels(MODE_NAMES[mode]).observe(seconds_between(created_at, decided_at))
            elif status == "timed_out":
                # At the commit: a batch of timeouts says the time it was read (expire_due_pauses()).
                now = now or db_time()          # read only for commits with timeouts
                self.lateness.observe(max(0.0, seconds_between(expires_at, now)))
        for _, _, channel, result in woken.get("notified", ()):
            self.notifications.labels(channel, result).inc()
        for _, _, result, mode in woken.get("attempted", ()):
            self.webhooks.labels(result, MODE_NAMES[mode]).inc()
        for _, channel, status in woken.get("reported", ()):
            self.reports.labels(channel, status).inc()

    def collect(self):
        """The backlogs, read at each scrape through the indexes the jobs use, each mode apart:
        any free account's test pauses and test endpoints would otherwise move what an operator
        alerts on (a slow test receiver paging them for a webhook backlog live ones never had)."""
        conn, now, gauge = self.rt.db(), db_time(), self.prometheus.core.GaugeMetricFamily
        pending = gauge("pausepoint_pauses_pending", "Pauses waiting for an answer", labels=["mode"])
        live = query_db(conn, "SELECT count(*) FROM pauses INDEXED BY pauses_pending_by_recipient"
                              " WHERE status = 'pending' AND livemode = 1", one=True)[0]
        every = query_db(conn, "SELECT count(*) FROM pauses WHERE status = 'pending'", one=True)[0]
        pending.add_metric(["test"], every - live)
        pending.add_metric(["live"], live)
        depth = gauge("pausepoint_outbox_depth", "Messages and deliveries not sent yet", labels=["outbox", "mode"])
        oldest = gauge("pausepoint_outbox_oldest_due_seconds", "How long the oldest due one has waited",
                       labels=["outbox", "mode"])
        for mode in (0, 1):
            backlogs = {"notifications": query_db(conn, "SELECT count(*), min(next_attempt_at) FROM notifications"
                                                        " WHERE status IN ('queued', 'sending') AND livemode = +?",
                                                  (mode,), one=True),
                        "webhooks": query_db(conn, "SELECT count(*), min(d.next_attempt_at) FROM webhook_deliveries d"
                                                   " JOIN webhooks w ON w.id = d.webhook_id WHERE d.status IN"
                                                   " ('pending', 'delivering') AND w.livemode = +?", (mode,), one=True)}
            for outbox, (count, first) in backlogs.items():
                depth.add_metric([outbox, MODE_NAMES[mode]], count)
                oldest.add_metric([outbox, MODE_NAMES[mode]], seconds_between(first, now) if first and first <= now else 0)
        return [pending, depth, oldest]

    def timed(self, method, route, started):
        self.requests.labels(method, route).observe(time.monotonic() - started)

    def page(self):
        return bottle.HTTPResponse(self.prometheus.generate_latest(self.registry),
                                   headers={"Content-Type": self.prometheus.CONTENT_TYPE_LATEST})


MODE_NAMES = {0: "test", 1: "live"}


def metrics_at(runtime):
    """Where the start says its metrics are, if it serves them: their own address is not the API's."""
    if runtime.metrics is None:
        return ""
    if runtime.metrics_address is None:
        return "; metrics at /metrics on this address"
    host, port = runtime.metrics_address
    return f"; metrics at http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


# The metrics' own address serves a scraper or two, not the world: this many connections at
# once, each on a thread of its own, and a new one beyond them closed at once (the scraper tries
# again at its next interval). prometheus_client's own server started a thread for every
# connection and waited on it for ever: connections opened and left silent took a thread and a
# descriptor each, until the API's connections and the database's files found none.
METRICS_CONNECTIONS = 4
# Seconds a connection to the metrics' address is served at most, however it trickles its request.
METRICS_CLIENT_SECONDS = 10


class MetricsRequest(wsgiref.simple_server.WSGIRequestHandler):
    """One scrape, not logged."""

    def log_message(self, format, *args):
        pass


class MetricsServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    """The HTTP server at metrics.listen: at most METRICS_CONNECTIONS connections served at once."""

    daemon_threads = True
    # Connections past those are closed as soon as taken. A burst waits in the kernel's queue to
    # be taken meanwhile: at socketserver's 5 the rest were dropped, and retried a second later.
    request_queue_size = 64

    def __init__(self, host, port, app):
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.address_family, self.places = family, threading.BoundedSemaphore(METRICS_CONNECTIONS)
        self.deadlines = DeadlineWatch()        # each connection's socket is shut down at its time
        super().__init__(address[:2], MetricsRequest)
        self.set_app(app)

    def process_request(self, request, client_address):
        if not self.places.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:       # no thread to give the place back
            self.places.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.places.release()

    def finish_request(self, request, client_address):
        with self.deadlines.deadline(METRICS_CLIENT_SECONDS) as deadline:      # forgotten before it is closed
            deadline.guard(request)
            super().finish_request(request, client_address)

    def server_close(self):
        super().server_close()
        self.deadlines.close()

    def handle_error(self, request, client_address):
        """A client that went silent or hung up: nothing for the operator's log."""


def serve_metrics(runtime, host, port):
    """The metrics at http://host:port/metrics, served on threads of their own; returns the server.
    A scrape borrows a database connection as a request does, and gives it back."""
    page = runtime.metrics.prometheus.make_wsgi_app(runtime.metrics.registry)

    def app(environ, start_response):
        runtime.serves_requests()
        try:
            return page(environ, start_response)
        finally:
            runtime.give_back_db()

    server = MetricsServer(host, port, app)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def metrics_address(config):
    """(host, port) of metrics.listen, or None to serve them at /metrics on the API's address."""
    listen = config["metrics.listen"].strip()
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics.listen must be host:port, like 127.0.0.1:9464 (or empty), not {listen!r}")
    return host.strip("[]"), int(port)


def seconds_between(earlier, later):
    return (parse_db_time(later) - parse_db_time(earlier)).total_seconds()


###############################################################################
# Runtime: connections, waiting agents, the scheduler
###############################################################################

JOB_INTERVAL_SECONDS = 0.25
CHECKPOINT_INTERVAL_SECONDS = 1.0
DISK_CHECK_SECONDS = 10
WAL_CHECKPOINT_PAGES = 250_000          # about 1 GB of 4 KiB pages: only if the job could not keep up
CHECKPOINT_PASSES = 5
CHECKPOINT_TAIL_FRAMES = 1_000          # left for the pass under the write lock
WAL_FRAME_HEADER_BYTES = 24             # before each page in the WAL
HASH_WAIT_SECONDS = 5
STOP_CALLS_SECONDS = 2
# Hourly: test data is bounded by a weight (retention.test_pauses_kept), which a developer
# at the test-pause rate could pass 24 times over in a day.
PRUNE_INTERVAL = dt.timedelta(hours=1)
TIMEOUTS_CACHE_KIB = 4096                   # the timeout job's page cache (see run_timeouts)


# How far the wall clock may fall behind the monotonic one between two looks of the scheduler
# before it is taken to have been set back, and how long the scheduler sleeps at most.
CLOCK_STEP_SECONDS = 1.0
SCHEDULER_LOOK_SECONDS = 1.0


class SteadyScheduler(BackgroundScheduler):
    """APScheduler's background scheduler times each interval job's next run by the wall
    clock: set back N minutes (an NTP step, a virtual machine restored from a snapshot), it
    would run none for N minutes, timeouts included. This one looks at least every
    SCHEDULER_LOOK_SECONDS, and when the wall clock has gone back against the monotonic one
    since it last looked, runs every job now (the jobs find due work in the database, so a
    run too many finds nothing to do)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.clocks = None          # (wall, monotonic) as it last looked

    def _process_jobs(self):
        wall, steady = time.time(), time.monotonic()
        if self.clocks is not None and wall - self.clocks[0] < steady - self.clocks[1] - CLOCK_STEP_SECONDS:
            now = dt.datetime.now(dt.timezone.utc)
            for job in self.get_jobs():
                job.modify(next_run_time=now)
        self.clocks = (wall, steady)
        wait = super()._process_jobs()
        return SCHEDULER_LOOK_SECONDS if wait is None else min(wait, SCHEDULER_LOOK_SECONDS)


def one_round_at_a_time(job):
    """A job method whose runs on one Runtime never overlap, whether the scheduler or
    run_once() runs it (run_once() holds the lock across all its rounds, so it is re-entrant).

    A round that fails for a full disk or another process's write lock is logged once for the
    episode (see WriteRefusals) and counts as a round that started nothing."""
    @functools.wraps(job)
    def run(self):
        what = f"the {job.__name__.removeprefix('run_')} job"
        with self.round_locks[job.__name__]:
            try:
                started = job(self)
            except Exception as e:
                if not write_refused(e):
                    raise
                self.disk_full.failed(what, e)
                return 0
            self.disk_full.succeeded(what)
            return started
    return run


class Runtime:
    """Everything one running PausePoint holds besides its config: database
    connections (see db()), the long polls waiting (see Waiting), the rate
    limiter, the scheduler and the outbound pool."""

    def __init__(self, config):
        # Made (as its owner's alone) and checked before anything starts, or reads it, or is made beside it.
        create_private(config["database.path"])
        check_database(config["database.path"])
        warn_if_others_may_read(config["database.path"], "the database",
                                ", and its -wal and -shm files (a respond token in them decides a pause)")
        self.config = config
        self._local = threading.local()
        self.idle_connections, self.idle_lock = [], threading.Lock()    # see db()
        self.write_lock = FairLock()
        self.waiting = Waiting(config["server.waiting_limit"], config["server.waiting_per_developer"],
                               config["server.waiting_per_ip"])
        self.stopping = False
        self.disk_short = False         # as run_disk() last found it
        self.disk_full = WriteRefusals()
        self.wal = WalBacklog(config["database.path"])         # for the disk's reserve
        self.limiter = RateLimiter(enabled=config["ratelimit.enabled"])
        self.error_log = ErrorLog()
        self.cookies = DashboardCookies(secure=base_url(config).startswith("https://"))
        # bcrypt is the one costly thing a client without a key can make us compute: at most
        # half the cores hash at once, so the other half keep answering everyone else, and
        # client addresses take those turns in rotation (a flood from one, in the order it
        # asked, made every other address's sign-in wait behind all of it and give up).
        self.hashing = Turns(max(1, (os.cpu_count() or 2) // 2))
        stand_in_password_hash(config["security.bcrypt_rounds"])      # now, not on the first unknown email
        self.scheduler = SteadyScheduler(timezone=dt.timezone.utc,
                                         job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None})
        # Webhook calls and notification sends run on their own bounded pool, so a
        # slow receiver or provider holds a worker, never the scheduler or an API thread.
        self.outbound = OutboundPool(config["outbound.workers"], config["outbound.per_developer"],
                                     config["outbound.deadline_seconds"], self.disk_full)
        self.webhook_connections = EndpointConnections(config["webhooks.allow_private"], config["webhooks.per_endpoint"])
        # The ids of the sends and deliveries this process has claimed and is making now. A claim
        # lapses by the wall clock, but a claim held here is not a crash's, however long the call
        # or whatever the clock did meanwhile (a step forward, a virtual machine resumed): taken as
        # one, it was recorded as cut short, and the message made again.
        self.claims_held = set()
        self.wake_lock = threading.Lock()
        self.webhooks_woken = threading.Event()
        # As many requests run at once as there are cores (at least two), so one that waits
        # on the database's disk still leaves a turn for another.
        self.turns = Turns(max(2, os.cpu_count() or 2))
        self.shown_once = ShownOnce()
        self.vouched = Vouched()        # credentials lately found good, for the HTTP front's turns
        self.timeouts_db = None
        self.signer = Signer(signing_keys_path(config["database.path"]),
                             functools.partial(latest_receipt_kid, config["database.path"]))
        self.metrics = Metrics(self) if config["metrics.enabled"] else None
        self.metrics_address, self.metrics_server = None, None
        if self.metrics is not None:
            self.limiter.refused = self.metrics.rate_limited.labels
            self.metrics_address = metrics_address(config)
        self.round_locks = {f"run_{job}": threading.RLock()
                            for job in ("timeouts", "steps", "notifications", "webhooks", "pruning", "checkpoint",
                                        "disk")}
        migrate(self.db())
        refresh_statistics(self.db())

    @functools.cached_property
    def openapi(self):
        """This server's OpenAPI document, built when first asked for: it takes 6 ms. Anyone
        may read it, so it names only the channels every developer may use."""
        return openapi_document(as_seen_by(self.config, None))

    def db(self):
        """This thread's connection. A job's thread keeps its own, which sqlite3 keeps to
        it. A request thread (serves_requests()) is lent one for the request and gives it
        back after (give_back_db()): a warm connection holds about 0.8 MB of page cache and
        prepared statements, and the server needs as many as requests run at once, not one
        for every thread."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            if conn.borrower not in (None, threading.get_ident()):
                # A lent connection is one thread's until given back; two at once would corrupt
                # both requests' statements (sqlite3's same-thread check is off for these).
                raise RuntimeError("a database connection lent to another thread")
            return conn
        if not getattr(self._local, "lent", False):
            conn = self._local.conn = self.connect(self.config["database.cache_kib"])
            return conn
        with self.idle_lock:
            conn = self.idle_connections.pop() if self.idle_connections else None
        conn = self._local.conn = conn or self.connect(self.config["database.cache_kib"], same_thread=False)
        conn.borrower = threading.get_ident()
        return conn

    def serves_requests(self):
        """Called on each request thread as it starts: its connections are lent (see db())."""
        self._local.lent = True

    def give_back_db(self):
        """After a request: the thread's connection, if it took one, goes back to be lent
        again, the last given back first (its cache is the warmest)."""
        conn, self._local.conn = getattr(self._local, "conn", None), None
        if conn is not None:
            conn.borrower = None
            with self.idle_lock:
                self.idle_connections.append(conn)

    def connect(self, cache_kib, same_thread=True):
        """A new connection to the database, its commits waking what they registered."""
        conn = connect(self.config["database.path"], self.write_lock, cache_kib, same_thread,
                       self.config["database.lock_wait_seconds"])
        conn.turns = self.turns
        conn.signer = self.signer
        # SQLite checkpoints the WAL inside whichever COMMIT fills it past 1,000 pages,
        # holding the write lock: a create's commit averaged 2.4 ms with that, 0.5 ms
        # without. The checkpoint job does it instead, every second; a commit still
        # does if the WAL ever reaches WAL_CHECKPOINT_PAGES (the job stopped, say).
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        conn.on_commit = self.on_commit
        return conn

    def on_commit(self, woken):
        """What a committed transaction registered with wake_after_commit()."""
        if self.metrics is not None:
            self.metrics.committed(woken)
        feeds = collections.defaultdict(set)       # each feed's new event types
        for developer, mode, event_type in woken.get("events", ()):
            feeds[f"events:{developer}:{mode}"].add(event_type)
        self.waiting.changed([f"pause:{pause_id}" for pause_id in woken.get("decisions", ())] + list(feeds), feeds)
        if "webhooks" in woken:
            self.wake_webhooks()

    @contextlib.contextmanager
    def hashing_turn(self, client):
        """A turn for `client` (an address) to hash a password, waited for at most
        HASH_WAIT_SECONDS (then 503). Hashing has its own bound on the cores it takes, so it
        gives the request's turn up."""
        with self.turns.given_up():
            if not self.hashing.take(client, HASH_WAIT_SECONDS):
                raise ApiError(503, "busy", "the server is busy checking passwords; try again in a few seconds",
                               headers={"Retry-After": str(HASH_WAIT_SECONDS)})
            try:
                yield
            finally:
                self.hashing.give()

    def wake_waiters(self):
        """Wake every agent waiting on ?wait=: we are stopping."""
        self.waiting.close()

    def wake_webhooks(self):
        """Run the delivery job now rather than at its next tick. Only a hint: the
        tick finds the same rows, so a lost wake-up costs at most one interval. A
        wake-up while the job runs (APScheduler would skip the extra run) makes the
        running job look again before it returns."""
        self.webhooks_woken.set()
        with self.wake_lock:
            if self.stopping:
                return
            with contextlib.suppress(Exception):
                self.scheduler.modify_job("run_webhooks", next_run_time=utcnow())

    def start(self):
        """Start the jobs, once the metrics' address (if any) is ours: a start that fails
        runs none of them. The first run is immediate, so pauses that fell due while
        the process was down time out within moments of the start."""
        if self.metrics_address:
            host, port = self.metrics_address
            try:
                self.metrics_server = serve_metrics(self, host, port)
            except OSError as e:
                raise ConfigError(f"cannot serve metrics on {host}:{port} (metrics.listen): {e.strerror}") from None
        now = utcnow()
        for job in (self.run_timeouts, self.run_steps, self.run_notifications, self.run_webhooks):
            self.scheduler.add_job(job, "interval", seconds=JOB_INTERVAL_SECONDS, id=job.__name__, next_run_time=now)
        self.scheduler.add_job(self.run_checkpoint, "interval", seconds=CHECKPOINT_INTERVAL_SECONDS,
                               id="run_checkpoint", next_run_time=now)
        self.scheduler.add_job(self.run_disk, "interval", seconds=DISK_CHECK_SECONDS, id="run_disk", next_run_time=now)
        # Pruning deletes only what is past its retention, so a run missed while the
        # process was down is simply done at the next start.
        self.scheduler.add_job(self.run_pruning, "interval", seconds=PRUNE_INTERVAL.total_seconds(),
                               id="run_pruning", next_run_time=now + dt.timedelta(seconds=5))
        self.scheduler.start()

    def stop(self):
        # APScheduler's shutdown holds its job-store lock while it waits for running
        # jobs, and a job that called modify_job() now would wait for that lock
        # forever. Under wake_lock, no wake-up is in progress or can start after this.
        with self.wake_lock:
            self.stopping = True
        self.wake_waiters()
        # Outbound calls under way, and any a job starts yet, end within STOP_CALLS_SECONDS, each
        # recorded as cut at its deadline (and retried after the start): a receiver or provider that
        # never answers would hold the stop for the rest of outbound.deadline_seconds, up to 300 s,
        # and a container's stop kills the process 10 s after asking it to stop.
        self.outbound.deadlines.end_by_stop(STOP_CALLS_SECONDS)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        with self.round_locks["run_timeouts"]:
            if self.timeouts_db is not None:
                self.timeouts_db.close()
                self.timeouts_db = None
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self.signer.helper.shutdown()
        with self.idle_lock:
            for conn in self.idle_connections:
                conn.close()
            self.idle_connections.clear()
        # Calls under way finish and are recorded; claims not yet started expire and are retried.
        self.outbound.shutdown()
        self.webhook_connections.close()

    def run_once(self, job):
        """Run one job ("timeouts", "steps", "notifications", "webhooks", "pruning", "checkpoint",
        "disk") now, on this thread, after the outbound calls under way, and wait for the calls it
        starts; again while it starts some (only a few per target go at once). A step of the server
        that a test can take instead of waiting for ticks, and then see exactly what it did."""
        patience = self.config["outbound.deadline_seconds"] * 3 + 5

        def wait_for_calls():
            if not self.outbound.wait_idle(patience):
                raise TimeoutError(f"outbound calls still running {patience:g} s into {job}")

        # The scheduler's rounds of the job wait until this returns: one that took the work
        # between two rounds here would leave the next starting nothing (its calls busy
        # every slot), and this returning while work was still due.
        with self.round_locks[f"run_{job}"]:            # after a scheduled round under way, if any
            wait_for_calls()
            while True:
                started = getattr(self, f"run_{job}")()
                wait_for_calls()
                if not started:
                    return

    @one_round_at_a_time
    def run_timeouts(self):
        # Its own connection, on whichever thread runs it, with a page cache for the index
        # pages a burst touches all over pauses and the audit log: 100,000 timeouts due
        # within 10 s on a million pauses were p99 1.4 s late at 8,800/s with the API
        # threads' 128 KiB, and 0.3 s at 10,000/s with 4 MiB, for 16 MB more memory
        # (16 MiB: no faster, and 50 MB more).
        if self.timeouts_db is None:
            self.timeouts_db = self.connect(TIMEOUTS_CACHE_KIB, same_thread=False)
        return expire_due_pauses(self.timeouts_db, self.config)

    @one_round_at_a_time
    def run_steps(self):
        """Reminders and escalations that fell due; what they send goes out with the next
        round of notifications."""
        return take_due_steps(self.db(), self.config)

    @one_round_at_a_time
    def run_notifications(self):
        """Simulate test-mode sends here; hand live ones to the pool, fairly across developers."""
        conn = self.db()
        simulate_due_notifications(conn)
        started = 0
        if self.stopping or not self.outbound.free():
            return started
        due = due_live_notifications(conn, self.config["outbound.per_developer"])
        for row in self.outbound.fair_order(due):
            if row["status"] == "sending":      # a claim past its time: a crash's, unless ours
                if row["id"] not in self.claims_held:
                    record_interrupted_send(conn, self.config, row)
                continue
            if not self.outbound.free():
                break
            slot = (row["developer_id"], ("channel", row["channel"]))
            if not self.outbound.reserve(*slot, self.outbound.per_channel):
                continue
            claim_until = claim_notification(conn, self.config, row)
            if claim_until is None:
                self.outbound.release(*slot)
                continue
            self.claims_held.add(row["id"])
            self.outbound.run(slot, self._send_notification, row, claim_until, then=self.wake_webhooks)
            started += 1
        return started

    def _send_notification(self, row, claim_until):
        try:
            send_notification(self.db(), self.config, self.outbound.deadlines, row, claim_until)
        finally:
            self.claims_held.discard(row["id"])

    @one_round_at_a_time
    def run_webhooks(self):
        """Claim due deliveries into the pool, again while wake-ups arrive during a round."""
        started = 0
        while not self.stopping:
            self.webhooks_woken.clear()
            started += self._claim_deliveries()
            if not self.webhooks_woken.is_set():
                return started
        return started

    def _claim_deliveries(self):
        """One round: at most webhooks.per_endpoint calls per endpoint and
        outbound.per_developer per developer in flight, developers taking turns."""
        started = 0
        if not self.outbound.free():
            return started
        conn, per_endpoint = self.db(), self.config["webhooks.per_endpoint"]
        for row in self.outbound.fair_order(due_deliveries(conn, per_endpoint)):
            if row["status"] == "delivering":       # a claim past its time: a crash's, unless ours
                if row["id"] not in self.claims_held:
                    record_interrupted_attempt(conn, row)
                continue
            if not self.outbound.free():
                break
            kind = "webhook" if row["livemode"] else TEST_WEBHOOK
            slot = (row["developer_id"], (kind, row["webhook_id"]), self.config["outbound.per_developer"])
            if not self.outbound.reserve(slot[0], slot[1], per_endpoint, slot[2]):
                continue
            claim_until = claim_delivery(conn, self.config, row)
            if claim_until is None:
                self.outbound.release(*slot)
                continue
            # When the worker is free, more may be due: look again at once.
            self.claims_held.add(row["id"])
            self.outbound.run(slot, self._deliver, row["id"], row["attempts"] + 1, claim_until, then=self.wake_webhooks)
            started += 1
        return started

    def _deliver(self, delivery_id, attempt, claim_until):
        try:
            attempt_delivery(self.db(), self.config, self.outbound.deadlines, self.webhook_connections, delivery_id,
                             attempt, claim_until)
        finally:
            self.claims_held.discard(delivery_id)

    @one_round_at_a_time
    def run_checkpoint(self):
        """Copy what the WAL holds into the database file, off every request's path (see db()).
        The bulk goes while writers go on appending, in passes until little is left; that
        rest under the write lock, so that it is all copied and the next commit starts the
        WAL over. (Left to race the jobs' commits, the copy never caught up and the WAL
        grew by megabytes a second.)"""
        conn = self.db()
        frame_bytes = conn.execute("PRAGMA page_size").fetchone()[0] + WAL_FRAME_HEADER_BYTES

        def checkpoint():
            size_before = self.wal.size()
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.wal.checkpointed(size_before, busy, frames, copied, frame_bytes)
            return frames - copied

        for _ in range(CHECKPOINT_PASSES):        # each pass copies what was written during the last
            if checkpoint() < CHECKPOINT_TAIL_FRAMES:
                break
        else:
            return      # a reader holds the rest back, or writes outpace the copy: try again next second
        with self.write_lock:                     # a short tail, so writers wait for it only briefly
            for _ in range(CHECKPOINT_PASSES):    # a reader on an older snapshot may hold a frame back a moment
                if checkpoint() == 0:
                    break

    @one_round_at_a_time
    def run_disk(self):
        """Say in the log when the database's disk falls short of database.min_free_mb, and when
        it has room again: meanwhile new pauses and registrations get 507."""
        short = disk_short_of_room(self.config, self.wal)
        if short and not self.disk_short:
            log.warning("the database's disk has less than database.min_free_mb (%s MiB) free: new pauses and"
                        " registrations get 507 until there is room again", self.config["database.min_free_mb"])
        elif self.disk_short and not short:
            log.info("the database's disk has room again: new pauses and registrations are taken")
        self.disk_short = short

    @one_round_at_a_time
    def run_pruning(self):
        prune_expired_data(self.db(), self.config)
        refresh_statistics(self.db())

    def wait_for(self, caller, topic, load, done, seconds, environ, wants=None):
        """Call load() until done(what it returned) or `seconds` pass, looking again each time
        `topic` changes. Under waitress the request parks meanwhile (see Waiting) and is
        served again with the same deadline; elsewhere it waits on this thread. A developer
        with their share of requests waiting already is told when to come back (429 with
        Retry-After), rather than answered at once, which would make a fleet poll. With
        `wants`, only changes of those kinds (see Waiting.changed) wake a parked request."""
        park, wait_until = environ.get("pausepoint.park"), environ.get("pausepoint.wait_until")
        # Places are a developer's in each mode: a test key must not crowd out live agents.
        served_before = wait_until is not None
        # The trusted proxy by its own address only: its /64 holds others (a neighbour on its subnet).
        who = ((caller.developer_id, caller.livemode),
               connection_client(client_address(environ), self.config["server.trusted_proxy"]))
        wait_until = time.monotonic() + seconds if wait_until is None else wait_until
        watch = self.waiting.watch(topic, wants)       # before the read: a change after it is not missed
        try:
            found = load()
            if done(found) or self.stopping or time.monotonic() >= wait_until:
                return found
            if not self.waiting.admit(who, first=not served_before):
                raise ApiError(429, "too_many_waiting",
                               "as many long polls wait already as this server takes from your account, your"
                               " address or everyone (server.waiting_per_developer, server.waiting_per_ip,"
                               f" server.waiting_limit); try again in {WAITING_FULL_RETRY_SECONDS} seconds",
                               headers={"Retry-After": str(WAITING_FULL_RETRY_SECONDS)})
            if park is not None:
                park(wait_until, functools.partial(self.waiting.park, watch, who, wait_until))
                watch = None                    # the parked request's now
                raise Parked()
            try:
                with self.turns.given_up():
                    while not (done(found) or self.stopping) and (left := wait_until - time.monotonic()) > 0:
                        self.waiting.wait(watch, left)
                        found = load()
                return found
            finally:
                self.waiting.leave(who)
        finally:
            if watch is not None:
                self.waiting.unwatch(watch)


class Parked(bottle.HTTPResponse):
    """What a request that parked answers for now: nothing, which ParkableTask does not send.
    The request is served again later, and that answer is the one the client gets."""


class Waiting:
    """Long polls (?wait=) waiting for a topic ('pause:<id>', 'events:<developer>:<mode>') to
    change. Under waitress a waiting request is parked: it gives its thread back and keeps
    only its connection and a record here, and it is served again when its topic changes
    or its time runs out, so a thousand agents can wait while the threads serve everyone
    else. A change wakes only its own topic's waiters. Under a WSGI server that cannot park,
    a waiting request holds its thread and waits on its topic's condition.

    Each developer may have server.waiting_per_developer requests waiting in each mode, and all together
    server.waiting_limit; one over its share is told when to come back (see wait_for)."""

    class Topic:
        __slots__ = ("changes", "watchers", "parked", "condition")

        def __init__(self):
            self.changes, self.watchers, self.parked, self.condition = 0, 0, [], None

    class Watch:
        """One request's look at a topic: the changes it had seen when it last read."""
        __slots__ = ("name", "topic", "seen", "wants", "who", "resume", "done")

        def __init__(self, name, topic, wants):
            self.name, self.topic, self.seen, self.wants = name, topic, topic.changes, wants
            self.who = self.resume = None
            self.done = False

    def __init__(self, limit, per_developer, per_address):
        self.limit, self.per_developer, self.per_address = limit, per_developer, per_address
        self.lock = threading.Lock()
        self.topics = {}                                # name -> Topic, while anyone watches it
        self.waiting = collections.Counter()            # (developer, None) and (None, address) -> requests waiting
        self.count = 0                                  # all of them together
        self.parked_of = {}                             # holder (see _holder) -> its parked watches, oldest first
        self.deadlines = []                             # heap of (monotonic time, sequence, Watch) parked
        self.sequence = itertools.count()
        self.clock = threading.Condition(self.lock)     # the deadline thread sleeps on it
        self.clock_thread = None
        self.closed = False

    def watch(self, name, wants=None):
        """Start counting `name`'s changes; before a read, so a change after the read is not
        missed. A parked watcher that `wants` some kinds of change only (event types) is not
        woken by others."""
        with self.lock:
            topic = self.topics.get(name)
            if topic is None:
                topic = self.topics[name] = self.Topic()
            topic.watchers += 1
            return self.Watch(name, topic, wants)

    def unwatch(self, watch):
        with self.lock:
            self._unwatch(watch)

    def _unwatch(self, watch):
        watch.topic.watchers -= 1
        if not watch.topic.watchers:
            del self.topics[watch.name]

    def admit(self, who, first=True):
        """Count one more waiting request of `who` (developer, client address), if within the
        limits: per developer, per address (so accounts made by one client cannot take every
        place) and in all. When every place is taken, the client holding the most gives one
        up (see _make_room), so no tenant can keep the others out. One served again after
        waiting (not `first`) is counted whatever the limits: it was counted a moment ago,
        and its client is owed the rest of its wait."""
        developer, address = who
        evicted = None
        with self.lock:
            if first and (self.waiting[(developer, None)] >= self.per_developer
                          or (address != TRUSTED_PROXY and self.waiting[(None, address)] >= self.per_address)):
                return False
            if first and self.count >= self.limit:
                evicted = self._make_room(who)
                if evicted is None:
                    return False
            self.waiting.update([(developer, None), (None, address)])
            self.count += 1
        if evicted is not None:
            evicted(end_now=True)
        return True

    def _holder(self, who):
        """Whom places are levelled between: client addresses, which cost more to come by
        than accounts; developers behind the trusted proxy, where every client has its address."""
        developer, address = who
        return (developer, None) if address == TRUSTED_PROXY else (None, address)

    def _make_room(self, who):
        """The oldest parked waiter of the holder with the most, released, if it holds at least
        two more than `who`'s; returns its resume(), for it to answer now as things stand
        (its agent asks again, and then waits its turn)."""
        holder = max(self.parked_of, key=lambda name: len(self.parked_of[name]), default=None)
        if holder is None or len(self.parked_of[holder]) < self.waiting[self._holder(who)] + 2:
            return None
        return self._unpark(next(iter(self.parked_of[holder])))

    def leave(self, who):
        with self.lock:
            self._leave(who)

    def _leave(self, who):
        self.count -= 1
        self.waiting.subtract([(who[0], None), (None, who[1])])
        for key in ((who[0], None), (None, who[1])):
            if not self.waiting[key]:
                del self.waiting[key]

    def wait(self, watch, timeout):
        """Block this thread until the watched topic changes, `timeout` passes or we close."""
        with self.lock:
            topic = watch.topic
            topic.condition = topic.condition or threading.Condition(self.lock)
            topic.condition.wait_for(lambda: topic.changes != watch.seen or self.closed, timeout)
            watch.seen = topic.changes

    def park(self, watch, who, wait_until, resume):
        """Hold an admitted request until its topic changes or `wait_until` (time.monotonic()),
        then call resume(), once, on some other thread. Takes over the watch and the count."""
        with self.lock:
            watch.who, watch.resume = who, resume
            if watch.topic.changes == watch.seen and not self.closed:
                watch.topic.parked.append(watch)
                self.parked_of.setdefault(self._holder(who), {})[watch] = None
                heapq.heappush(self.deadlines, (wait_until, next(self.sequence), watch))
                if self.clock_thread is None:
                    self.clock_thread = threading.Thread(target=self._tick, name="pausepoint-waiting", daemon=True)
                    self.clock_thread.start()
                elif self.deadlines[0][2] is watch:
                    self.clock.notify()
                return
            self._release(watch)                # it changed while the request was parking
        resume()

    def _unpark(self, watch, listed=True):
        """Release a parked watch (taking it off its topic's list, unless the caller does);
        returns its resume(), cleared from the watch, whose entry in the deadline heap stays
        a while and must not hold the connection."""
        if listed:
            watch.topic.parked.remove(watch)
        self._release(watch)
        resume, watch.resume = watch.resume, None
        return resume

    def _release(self, watch):
        watch.done = True
        self._unwatch(watch)
        self._leave(watch.who)
        holder = self._holder(watch.who)
        parked = self.parked_of.get(holder, {})
        parked.pop(watch, None)
        if not parked:
            self.parked_of.pop(holder, None)

    def changed(self, names, kinds=None):
        """Wake the waiters of each topic named; with `kinds` ({name: event types}), not the
        parked ones that want none of those (a feed reader asking for pause.responded only
        is not made to look again at every pause.created)."""
        woken = []
        with self.lock:
            for name in names:
                topic = self.topics.get(name)
                if topic is None:
                    continue
                topic.changes += 1
                if topic.condition is not None:
                    topic.condition.notify_all()
                change, still = (kinds or {}).get(name), []
                for watch in topic.parked:
                    if change and watch.wants and not change & watch.wants:
                        still.append(watch)
                        continue
                    woken.append(self._unpark(watch, listed=False))
                topic.parked = still
        for resume in woken:
            resume()

    def close(self):
        """Wake every waiter, who answers as things stand (we are stopping). Returns once the
        deadline thread has ended: it serves again outside the lock those whose time ran out,
        and the stop, going on meanwhile, could end the worker threads before they came back."""
        with self.lock:
            self.closed = True
            self.clock.notify()
            names, ticking = list(self.topics), self.clock_thread
        self.changed(names)
        if ticking is not None and ticking is not threading.current_thread():
            ticking.join()

    def _tick(self):
        """Serve again each parked request whose time has run out."""
        while True:
            due = []
            with self.lock:
                while not self.closed and (not self.deadlines or self.deadlines[0][0] > time.monotonic()):
                    self.clock.wait(self.deadlines[0][0] - time.monotonic() if self.deadlines else None)
                if self.closed:
                    return
                while self.deadlines and self.deadlines[0][0] <= time.monotonic():
                    watch = heapq.heappop(self.deadlines)[2]
                    if not watch.done:
                        due.append(self._unpark(watch))
            for resume in due:
                resume()


class ShownOnce:
    """Secrets a dashboard page shows once (new keys, a generated webhook secret), held in
    memory from a form's POST to the GET it redirects to, so reloading the page cannot
    repeat the POST; by sign-in and kind ('keys', 'webhook:<id>'), so pages in two tabs
    keep their own, for at most SHOWN_ONCE_FOR seconds, and never written anywhere."""

    def __init__(self):
        self.lock, self.held = threading.Lock(), {}

    def put(self, session_token, kind, value):
        self._hold(session_token, kind, lambda held: value)

    def add(self, session_token, kind, items):
        """Put `items` after those of `kind` not yet shown (two rotations before the page loads)."""
        self._hold(session_token, kind, lambda held: [*(held or []), *items])

    def _hold(self, session_token, kind, value_from):
        with self.lock:
            now = time.monotonic()
            self.held = {k: v for k, v in self.held.items() if v[0] > now}
            key = (key_digest(session_token), kind)
            self.held[key] = (now + SHOWN_ONCE_FOR, value_from(self.held.get(key, (0, None))[1]))

    def take(self, session_token, kind):
        with self.lock:
            until, value = self.held.pop((key_digest(session_token), kind), (0, None))
        return value if until > time.monotonic() else None


SHOWN_ONCE_FOR = 600


class RateLimiter:
    """Token buckets per (action, who), refilled evenly over an hour; `who` is a
    client IP or, for test pauses, a developer id.

    Held in memory on purpose: limits protect against guessing and floods, and
    losing them on restart loses nothing a client is owed. Each limit's buckets are
    kept with a heap of when each will be full again: a full one is forgotten (it says
    nothing an absent one does not). A new bucket past MAX_BUCKETS makes room by
    forgetting the one soonest full, so ever new addresses cannot grow a limit without
    bound, nor one limit's flood touch another's. Not so for limits spent with
    make_room=False, the password failures: forgetting any spent bucket there gives a
    guesser budget back (whichever goes, a flood can make it the one being guessed
    at), and each bucket costs a password hash to make, which bounds how many there
    can be. (Looking through all buckets for full ones took 4.8 ms a request, under
    the lock, once 100,000 addresses had come.)"""

    MAX_BUCKETS = 20_000        # per limit: about 5 MB

    def __init__(self, enabled):
        self.enabled = enabled
        self.buckets = collections.defaultdict(dict)    # name -> {who: (tokens, then)}
        self.refills = collections.defaultdict(list)    # name -> heap of (full again at, who); some stale
        self.lock = threading.Lock()
        self.refused = None         # name -> a counter of refusals, when metrics are on

    def _level(self, name, who, per_hour, now):
        tokens, then = self.buckets[name].get(who, (per_hour, now))
        return min(per_hour, tokens + (now - then) * per_hour / 3600)

    def _set(self, name, who, tokens, per_hour, now, make_room):
        def full_at(tokens, then):
            return then + (per_hour - tokens) * 3600 / per_hour
        buckets, refills = self.buckets[name], self.refills[name]
        make_room = make_room and tokens < per_hour
        # Out while room is made: the bucket being spent is never the one forgotten for it
        # (or a table full of buckets spent twice left every new one unlimited).
        buckets.pop(who, None)
        while refills and (refills[0][0] <= now or make_room and len(buckets) >= self.MAX_BUCKETS):
            full, soonest = heapq.heappop(refills)
            if soonest in buckets and full_at(*buckets[soonest]) == full:      # else spent since: stale
                del buckets[soonest]
        if tokens < per_hour:
            buckets[who] = (tokens, now)
            heapq.heappush(refills, (full_at(tokens, now), who))
        if len(refills) > 2 * len(buckets) + 64:
            refills[:] = [(full_at(*bucket), who) for who, bucket in buckets.items()]
            heapq.heapify(refills)

    def retry_after(self, name, who, per_hour):
        """Seconds until (name, who) may try again, or 0 if it may now."""
        if not self.enabled:
            return 0
        with self.lock:
            tokens = self._level(name, who, per_hour, time.monotonic())
        return 0 if tokens >= 1 else math.ceil((1 - tokens) * 3600 / per_hour)

    def spend(self, name, who, per_hour, make_room=True, cost=1):
        """Take `cost` from (name, who)'s bucket: past empty, it owes the rest, and waits for it."""
        if not self.enabled:
            return
        with self.lock:
            now = time.monotonic()
            self._set(name, who, self._level(name, who, per_hour, now) - cost, per_hour, now, make_room)

    def give_back(self, name, who, per_hour):
        """Undo one spend() (an attempt that turned out not to count)."""
        if not self.enabled:
            return
        with self.lock:
            now = time.monotonic()
            self._set(name, who, min(per_hour, self._level(name, who, per_hour, now) + 1), per_hour, now,
                      make_room=False)

    def refuse_if_exhausted(self, name, who, per_hour, what="attempts"):
        """429 with Retry-After if (name, who) has nothing left."""
        wait = self.retry_after(name, who, per_hour)
        if wait:
            if self.refused is not None:
                self.refused(name).inc()
            raise ApiError(429, "rate_limited", f"too many {what}; try again in {wait} seconds",
                           headers={"Retry-After": str(wait)})

    def limit(self, name, who, per_hour, what="attempts", cost=1):
        """Refuse with 429 if (name, who) has nothing left; otherwise spend `cost`."""
        self.refuse_if_exhausted(name, who, per_hour, what)
        self.spend(name, who, per_hour, cost=cost)


###############################################################################
# The API's contract: request and response bodies as JSON Schema
###############################################################################

# Every request body is declared here once, as JSON Schema (draft 2020-12), and
# validated with the jsonschema library before a handler sees it; the same
# schemas feed the OpenAPI document. What JSON Schema cannot say (a phone number
# for sms, timeout_default among the options, options that look alike) is
# checked by small named functions beside the domain code. "x-message" is the
# sentence a 422 gives when the field is wrong.
TIME = {"type": "string", "format": "date-time"}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}}},
}


def nullable(schema):
    return {**schema, "type": [schema["type"], "null"]}


def person_schema(config):
    """Whom to ask: a channel this server knows and a recipient as that channel takes it."""
    known = channels(config)
    by_kind = collections.defaultdict(list)
    for channel in known.values():
        by_kind[json.dumps(channel.recipient, sort_keys=True)].append(channel.name)
    return {
        "type": "object",
        "allOf": [{"if": {"required": ["channel"], "properties": {"channel": {"enum": names}}},
                   "then": {"properties": {"recipient": json.loads(recipient)}}} for recipient, names in by_kind.items()],
        "properties": {
            "channel": {"type": "string", "enum": list(known),
                        "x-message": f"channel must be one of the channels this server knows: {', '.join(known)}"},
            "recipient": {"type": "string", "minLength": 1, "maxLength": 320, "pattern": VISIBLE_TEXT,
                          "x-message": "recipient is required: who answers, as the channel takes it, in visible text"
                                       " without control or bidirectional-override characters"},
        },
    }


MAX_PEOPLE = 10             # per pause, escalation targets included
MAX_REMINDERS = 5


def pause_request_schema(config):
    """POST /v1/pause. Channels, what each takes as a recipient, and the longest timeout
    come from the server's config."""
    person, limit = person_schema(config), config["pauses.max_timeout_hours"]
    someone = {"type": "object", "required": ["recipient", "channel"],
               "properties": {"recipient": {"type": "string"}, "channel": {"type": "string"}}}
    return {
        "type": "object", "additionalProperties": False,
        "required": ["message", "options", "timeout_hours"],
        # recipient and channel, unless recipients names everyone
        "allOf": [*person["allOf"], {"if": {"not": {"required": ["recipients"]}},
                                     "then": {"required": ["channel", "recipient"]}}],
        "properties": {
            **person["properties"],
            "message": {"type": "string", "minLength": 1, "maxLength": 1600, "pattern": VISIBLE_TEXT,
                        "x-message": "message must be 1-1600 characters of visible text; newlines and tabs are fine,"
                                     " other control and bidirectional-override characters are not"},
            "options": {"type": "array", "minItems": 2, "maxItems": 10, "uniqueItems": True,
                        "items": {"type": "string", "minLength": 1, "maxLength": 100, "pattern": ONE_LINE_TEXT},
                        "x-message": "options must be a list of 2-10 distinct strings of at most 100 characters"
                                     " of visible text on one line, without control or bidirectional-override"
                                     " characters"},
            "timeout_hours": {"type": "number", "minimum": MIN_TIMEOUT_SECONDS / 3600 - 1e-9, "maximum": limit,
                              "x-message": f"timeout_hours must be a number from one second (0.0003) to {limit:g}"},
            "timeout_default": {"type": ["string", "null"],
                                "x-message": "timeout_default must be one of the options (or left out)"},
            "metadata": {"type": ["object", "null"], "x-message": "metadata must be a JSON object; its \"display\""
                                                                  " may list up to 10 of its keys to show the human"},
            "title": {"type": ["string", "null"], "minLength": 1, "maxLength": 120, "pattern": VISIBLE_TEXT,
                      "x-message": "title must be 1-120 characters of visible text: what the request is about,"
                                   " shown above the question"},
            "fields": FIELDS_SCHEMA,
            "recipients": {"type": "array", "minItems": 1, "maxItems": MAX_PEOPLE,
                           "items": {**someone, "additionalProperties": False},
                           "x-message": f"recipients must be a list of 1-{MAX_PEOPLE} people, each"
                                        ' {"recipient": …, "channel": …}, given instead of recipient and channel'},
            "quorum": {"type": ["object", "null"], "required": ["choice", "count"], "additionalProperties": False,
                       "properties": {"choice": {"type": "string"},
                                      "count": {"type": "integer", "minimum": 1, "maximum": MAX_PEOPLE}},
                       "x-message": 'quorum must be like {"choice": "Approve", "count": 2}: the option, and how many'
                                    " different people must choose it; anyone choosing otherwise decides at once"},
            "remind_after_minutes": {"type": ["array", "null"], "maxItems": MAX_REMINDERS,
                                     "items": {"type": "number", "exclusiveMinimum": 0},
                                     "x-message": f"remind_after_minutes must be a list of up to {MAX_REMINDERS}"
                                                  " numbers of minutes after creation, each before the timeout"},
            "escalation": {"type": ["array", "null"], "maxItems": MAX_PEOPLE - 1, "items": {
                               **someone, "additionalProperties": False,
                               "required": ["after_minutes", *someone["required"]],
                               "properties": {**someone["properties"],
                                              "after_minutes": {"type": "number", "exclusiveMinimum": 0}}},
                           "x-message": 'escalation must be a list like [{"after_minutes": 60, "recipient":'
                                        ' "+15550199", "channel": "sms"}]: whom to ask too while still pending'},
        },
    }


# Named values the approver sees and may change before approving (the amount, the payee).
FIELD_TYPES = ("string", "number", "integer", "boolean", "enum")
FIELD_LIMITS = {"string": {"max_length"}, "number": {"min", "max"}, "integer": {"min", "max"}, "boolean": set(),
                "enum": {"choices"}}
MAX_FIELD_TEXT = 1000
FIELDS_SCHEMA = {
    "type": ["object", "null"], "maxProperties": 10, "propertyNames": {"maxLength": 40, "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,39}$"},
    "additionalProperties": {
        "type": "object", "required": ["type", "value"], "additionalProperties": False,
        "properties": {
            "type": {"enum": list(FIELD_TYPES)}, "value": {"type": ["string", "number", "boolean"]},
            "editable": {"type": "boolean"},
            "label": {"type": "string", "minLength": 1, "maxLength": 100, "pattern": ONE_LINE_TEXT},
            "min": {"type": "number"}, "max": {"type": "number"},
            "max_length": {"type": "integer", "minimum": 1, "maximum": MAX_FIELD_TEXT},
            "choices": {"type": "array", "minItems": 1, "maxItems": 20, "uniqueItems": True,
                        "items": {"type": "string", "minLength": 1, "maxLength": 100, "pattern": ONE_LINE_TEXT}}}},
    "x-message": "fields must be an object of up to 10 named values (names of letters, digits and _), each like"
                 ' {"type": "number", "value": 340, "min": 0, "max": 500, "editable": true, "label": "Amount"};'
                 " type is string (max_length), number or integer (min, max), boolean or enum (choices)"}


REGISTRATION_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["email", "name", "password"],
    "x-message": "the request body must be a JSON object with email, name and password",
    "properties": {
        "email": {"type": "string", "maxLength": 254, "pattern": EMAIL.pattern,
                  "x-message": "email must be an email address like you@example.com"},
        # Shown as "Asked by …" on every respond page: one line, as the sign-up form takes it.
        "name": {"type": "string", "minLength": 1, "maxLength": 100, "pattern": ONE_LINE_TEXT,
                 "x-message": "name must be 1-100 characters of visible text on one line, without control"
                              " characters"},
        "password": {"type": "string", "minLength": 8, "maxLength": 72, "pattern": SAFE_TEXT,
                     "x-message": "password must be at least 8 characters and at most 72 bytes (bcrypt's limit),"
                                  " without control characters"},
    },
}
ROTATION_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["key", "email", "password"],
    "x-message": "the request body must be a JSON object with email, password and key",
    "properties": {
        "key": {"type": "string", "enum": list(MODES), "x-message": "key must be 'live' or 'test': which key to replace"},
        "email": {"type": "string", "maxLength": 254, "x-message": "email must be the email you registered with"},
        "password": {"type": "string", "maxLength": 1024, "x-message": "password must be your password"},
    },
}
WEBHOOK_PROPERTIES = {
    "url": {"type": "string", "maxLength": 2048, "pattern": "^https?://[^\\s/?#]+([/?#]\\S*)?$",
            "x-message": "url must be an http:// or https:// URL of at most 2048 characters"},
    "events": {"type": "array", "minItems": 1, "maxItems": len(WEBHOOK_EVENTS),
               "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
               "x-message": f"events must be a list of 1-{len(WEBHOOK_EVENTS)} drawn from: {', '.join(WEBHOOK_EVENTS)}"},
    "secret": {"type": ["string", "null"], "minLength": MIN_SECRET_LENGTH, "maxLength": 256, "pattern": SAFE_TEXT,
               "x-message": f"secret must be {MIN_SECRET_LENGTH}-256 characters (or null to have one made)"},
}
WEBHOOK_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["url", "events"],
                  "properties": WEBHOOK_PROPERTIES}
WEBHOOK_CHANGE_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {
    **WEBHOOK_PROPERTIES, "enabled": {"type": "boolean", "x-message": "enabled must be true or false"}}}
RESPONSE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["choice"],
    "x-message": 'the request body must be a JSON object like {"choice": "Approve"}',
    "properties": {
        "choice": {"type": "string", "x-message": "choice must be one of the pause's options"},
        "comment": {"type": ["string", "null"], "maxLength": 2000, "pattern": SAFE_TEXT,
                    "x-message": "comment must be text of at most 2000 characters, without control characters"},
        "fields": {"type": "object", "maxProperties": 10, "additionalProperties": {"type": ["string", "number", "boolean"]},
                   "x-message": 'fields must be an object of the changed values, like {"amount": 300}'},
    },
}

COMMENT_SCHEMA = {"type": "object", "properties": {"comment": RESPONSE_SCHEMA["properties"]["comment"]}}
# An answer's form, which the program sending it got wrong (an unknown field, a number for a
# choice) whatever the request's state. The comment's text is the person's, and is judged
# (COMMENT_SCHEMA) only on a request still open: told to correct it, they would try again on
# one nobody can answer any more.
RESPONSE_FORM_SCHEMA = {**RESPONSE_SCHEMA, "properties": {**RESPONSE_SCHEMA["properties"], "comment": {
    name: rule for name, rule in RESPONSE_SCHEMA["properties"]["comment"].items() if name not in ("pattern", "maxLength")}}}

# Query parameters: the same, with whole numbers arriving as text.
LIMIT = {"type": "integer", "minimum": 1, "maximum": 100, "default": 20,
         "x-message": "limit must be a whole number from 1 to 100"}
CURSOR = {"type": "string", "maxLength": 18, "pattern": "^[0-9]{1,18}$",
          "x-message": "cursor must be a next_cursor value from an earlier page"}
PAGE_QUERY = {"limit": LIMIT, "cursor": CURSOR}

# Answers.
PAUSE_CREATED = {"type": "object", "required": ["pause_id", "status", "respond_url", "expires_at", "created_at"],
                 "properties": {"pause_id": {"type": "string"}, "status": {"type": "string", "enum": list(STATUSES)},
                                "respond_url": {"type": "string", "description": "The first person's link."},
                                "expires_at": TIME, "created_at": TIME,
                                "recipients": {"type": "array", "description": "Only for a team pause: each person"
                                                                               " asked, with their own link.",
                                               "items": {"type": "object", "properties": {
                                                   name: {"type": "string"}
                                                   for name in ("recipient", "channel", "respond_url")}}}}}
NOTIFICATION = {"type": ["object", "null"], "properties": {
    "channel": {"type": "string"},
    "status": {"type": "string", "enum": ["queued", "sent", "simulated", "failed", "cancelled"]},
    "attempts": {"type": "integer"}, "provider_message_id": {"type": ["string", "null"]},
    "last_error": {"type": ["string", "null"]}, "text": {"type": "string"},
    "may_have_reached": {"type": "boolean", "description": "An attempt failed after its request went out and before"
                                                          " the provider answered: the person may have it."}}}
PERSON_ASKED = {"type": "object", "required": ["recipient", "channel", "respond_url", "added_by"], "properties": {
    "recipient": {"type": "string"}, "channel": {"type": "string"}, "respond_url": {"type": "string"},
    "added_by": {"type": "string", "enum": ["request", "escalation"]}, "added_at": TIME,
    "notification_status": {"type": ["string", "null"], "enum": ["queued", "sent", "simulated", "failed", "cancelled",
                                                                 None]},
    "notification_may_have_reached": {"type": ["boolean", "null"], "description": "As a notification's"
                                                                                  " may_have_reached."},
    "opened_at": nullable(TIME), "answered_at": nullable(TIME), "choice": {"type": ["string", "null"]}}}
VOTE = {"type": "object", "required": ["recipient", "choice", "voted_at"], "properties": {
    "recipient": {"type": "string"}, "choice": {"type": "string"}, "comment": {"type": ["string", "null"]},
    "edits": {"type": ["object", "null"], "description": "The fields this vote changed: {name: new value}."},
    "voted_at": TIME}}
PAUSE = {"type": "object", "required": ["pause_id", "status", "options", "livemode", "expires_at", "created_at"],
         "properties": {
             **PAUSE_CREATED["properties"], "recipient": {"type": "string"}, "channel": {"type": "string"},
             "title": {"type": ["string", "null"]}, "message": {"type": "string"}, "options": {"type": "array", "items": {"type": "string"}},
             "timeout_default": {"type": ["string", "null"]}, "choice": {"type": ["string", "null"]},
             "comment": {"type": ["string", "null"]}, "decided_at": nullable(TIME),
             "decided_by": {"type": ["string", "null"]}, "metadata": {"type": ["object", "null"]},
             "livemode": {"type": "boolean"}, "notification": NOTIFICATION,
             "fields": {"type": "object", "description": "Only when the pause has fields: each with its final value."},
             "edited": {"type": "object", "description": "Only once a pause with fields is decided: the fields the"
                                                         " approver changed, each {\"old\": …, \"new\": …}."},
             "quorum": {"type": ["object", "null"], "description": "Only for a team pause (asked with recipients,"
                                                                   " a quorum or an escalation).",
                        "properties": {"choice": {"type": "string"}, "count": {"type": "integer"}}},
             "recipients": {"type": "array", "description": "Only for a team pause: everyone asked, in order.",
                            "items": PERSON_ASKED},
             "votes": {"type": "array", "description": "Only for a team pause: the votes cast, oldest first.",
                       "items": VOTE},
             "receipt": {"type": ["string", "null"], "description": "Once decided: a compact JWS (EdDSA) of the"
                                                                    " outcome, checkable with /.well-known/jwks.json"}}}
WEBHOOK = {"type": "object", "required": ["webhook_id", "url", "events", "status", "livemode"], "properties": {
    "webhook_id": {"type": "string"}, "url": {"type": "string"}, "events": {"type": "array", "items": {"type": "string"}},
    "status": {"type": "string", "enum": ["enabled", "disabled"]}, "disabled_reason": {"type": ["string", "null"]},
    "livemode": {"type": "boolean"}, "created_at": TIME, "updated_at": TIME,
    "secret": {"type": "string", "description": "Only when it was generated, and only in this answer."}}}
DELIVERY = {"type": "object", "required": ["delivery_id", "event_id", "event_type", "status", "attempts"], "properties": {
    "delivery_id": {"type": "string"}, "event_id": {"type": "string"}, "event_type": {"type": "string"},
    "status": {"type": "string", "enum": ["pending", "delivering", "succeeded", "failed", "cancelled"]},
    "next_attempt_at": nullable(TIME), "created_at": TIME,
    "attempts": {"type": "array", "items": {"type": "object", "properties": {
        "attempt": {"type": "integer"}, "started_at": TIME, "status_code": {"type": ["integer", "null"]},
        "error": {"type": ["string", "null"]}, "duration_ms": {"type": "integer"},
        "next_attempt_at": nullable(TIME)}}}}}
AUDIT_EVENT = {"type": "object", "required": ["id", "timestamp", "actor", "event_type", "livemode", "data"], "properties": {
    "id": {"type": "string"}, "timestamp": TIME, "actor": {"type": "string"}, "event_type": {"type": "string"},
    "pause_id": {"type": ["string", "null"]}, "livemode": {"type": "boolean"}, "data": {"type": "object"},
    "prev_hash": {"type": "string", "description": "The hash of the event before it in this developer's and mode's"
                                                   " chain (64 zeros for the first)."},
    "hash": {"type": "string", "description": "SHA-256 of this event chained to prev_hash: see the README."}}}
AUDIT_HEAD = {"type": "object", "required": ["livemode", "hash", "count", "signature"], "properties": {
    "type": {"const": "audit_head", "description": "So the signature cannot pass for a receipt's"},
    "developer_id": {"type": "string"}, "livemode": {"type": "boolean"},
    "hash": {"type": "string", "description": "The latest event's hash"},
    "count": {"type": "integer", "description": "Events in the chain (test chains lose their oldest to retention)"},
    "at": TIME, "signature": {"type": "string", "description": "A compact JWS (EdDSA) of the other fields, with the"
                                                                " server's key (/.well-known/jwks.json)"}}}
JWKS = {"type": "object", "required": ["keys"], "properties": {"keys": {"type": "array", "items": {
    "type": "object", "required": ["kty", "crv", "x", "kid"], "properties": {
        name: {"type": "string"} for name in ("kty", "crv", "x", "kid", "use", "alg")}}}}}
RESPOND_FACTS = {"type": "object", "required": ["message", "options", "status"], "properties": {
    "asked_by": {"type": ["string", "null"], "description": "The name of the developer whose agent asks"},
    "details": {"type": "array", "description": "The metadata keys the agent listed in its \"display\"",
                "items": {"type": "object", "properties": {"name": {"type": "string"}, "value": {"type": "string"}}}},
    **{name: PAUSE["properties"][name] for name in ("title", "message", "options", "status", "choice", "comment",
                                                    "decided_at", "expires_at", "timeout_default", "fields", "edited")},
    "your_vote": {"type": "object", "description": "Only for a team pause's person who voted: their choice and when.",
                  "properties": {"choice": {"type": "string"}, "voted_at": TIME}}}}
REGISTERED = {"type": "object", "required": ["developer_id", "api_key", "test_api_key", "plan", "message"],
              "properties": {"developer_id": {"type": "string"}, "api_key": {"type": "string"},
                             "test_api_key": {"type": "string"}, "plan": {"type": "string"}, "message": {"type": "string"}}}
ROTATED = {"type": "object", "required": ["developer_id", "endpoints_to_check", "message"], "properties": {
    "developer_id": {"type": "string"}, "api_key": {"type": "string"}, "test_api_key": {"type": "string"},
    "endpoints_to_check": {"type": "array", "items": {"type": "object", "required": ["webhook_id", "url"], "properties": {
        "webhook_id": {"type": "string"}, "url": {"type": "string"}}}},
    "message": {"type": "string"}}}
CHANNELS = {"type": "object", "required": ["channels"], "properties": {"channels": {"type": "array", "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                     "configured": {"type": "boolean"}}}}}}
HEALTH = {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string"}, "version": {"type": "string"}, "database": {"type": "string"},
    "scheduler": {"type": "string"}, "disk": {
        "enum": ["ok", "short of room"],
        "description": "short of room: less free than database.min_free_mb, so new pauses and accounts get 507"}}}
EVENT_TYPES = (*WEBHOOK_EVENTS, "webhook.test")
EVENT = {"type": "object", "required": ["id", "type", "created_at", "livemode", "data"], "properties": {
    "id": {"type": "string", "description": "The same on every retry: drop duplicates by it."},
    "type": {"type": "string", "enum": list(EVENT_TYPES)}, "created_at": TIME,
    "livemode": {"type": "boolean"}, "data": {"description": "The whole pause, as GET /v1/pause/{id} shows it."}}}
TEST_EVENT_DATA = {"type": "object", "required": ["webhook_id", "message"],
                   "properties": {"webhook_id": {"type": "string"}, "message": {"type": "string"}}}


def page_of(name, item):
    return {"type": "object", "required": [name, "next_cursor"],
            "properties": {name: {"type": "array", "items": item}, "next_cursor": {"type": ["string", "null"]}}}


def within_limits(check):
    """A JSON Schema keyword check that passes over an array longer than its maxItems, a
    string longer than its maxLength or an object with more than its maxProperties, errors
    reported anyway: uniqueItems compares every pair of items (58 KB of options took 36 s
    of CPU), items and additionalProperties check each of thousands, and a pattern reads
    every character, or worse."""
    limits = {"array": "maxItems", "string": "maxLength", "object": "maxProperties"}

    def bounded(validator, value, instance, schema):
        kind = next((kind for kind in limits if validator.is_type(instance, kind)), None)
        if kind is None or len(instance) <= schema.get(limits[kind], math.inf):
            yield from check(validator, value, instance, schema)
    return bounded


def unique_texts(check):
    """uniqueItems for lists of texts (all of ours): a list holding anything else is refused
    by its items anyway, and comparing nested items pair by pair went on for 0.67 s."""
    def unique(validator, value, instance, schema):
        if not validator.is_type(instance, "array") or all(
                isinstance(item, (str, int, float, bool)) or item is None for item in instance):
            yield from check(validator, value, instance, schema)
    return unique


# Every array in a request body's schema has a maxItems, every string with a pattern a
# maxLength, and every object of named entries a maxProperties; nothing is checked past them.
SchemaValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {
    **{keyword: within_limits(jsonschema.Draft202012Validator.VALIDATORS[keyword])
       for keyword in ("items", "pattern", "additionalProperties", "propertyNames")},
    "uniqueItems": within_limits(unique_texts(jsonschema.Draft202012Validator.VALIDATORS["uniqueItems"]))})


def validate_body(schema, body, validator=None):
    """`body` if it fits `schema`; else the 422 for the first way it does not, naming the
    field. Fields are taken in the schema's order, so the same body always gets the same
    answer whatever order the library finds the errors in."""
    try:
        errors = list((validator or SchemaValidator(schema)).iter_errors(body))
    except RecursionError:      # jsonschema writes a refused value into its message with repr(), which recurses
        raise ApiError(400, "invalid_json", "the request body is nested too deeply to read") from None
    if errors:
        # By where it is too: fields' entries come in the order of a set, which varies by process.
        raise schema_error(schema, min(errors, key=lambda e: (schema_error_rank(schema, e),
                                                             [str(step) for step in e.absolute_path])))
    return body


def schema_error_rank(schema, error):
    fields = list(schema.get("properties", {}))
    field = error_field(error)
    if field is None:
        return -1 if error.validator == "additionalProperties" else -2
    return fields.index(field) if field in fields else len(fields)


def error_field(error):
    """The top-level field an error is about, or None for the body as a whole."""
    if error.absolute_path:
        return error.absolute_path[0]
    if error.validator == "required" and isinstance(error.instance, dict):
        return next(name for name in error.validator_value if name not in error.instance)
    return None


def schema_error(schema, error):
    properties, field = schema.get("properties", {}), error_field(error)
    if field is None and error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(properties))[0]
        return invalid(extra, f"unknown field {extra!r}; allowed: {', '.join(sorted(properties))}")
    if field is None:
        return invalid(None, schema.get("x-message", "the request body must be a JSON object"))
    # A conditional (the recipient for this channel) says what it wants itself.
    message = error.schema.get("x-message") if isinstance(error.schema, dict) and len(error.absolute_path) == 1 else None
    message = message or properties.get(field, {}).get("x-message", f"{field} is not valid")
    if error.validator == "required" and not message.startswith(f"{field} is required"):
        # Missing, not wrong: "channel must be one of …" alone reads as if a value had been given.
        message = f"{field} is required" + (f", and {message.removeprefix(field + ' ')}"
                                            if message.startswith(field + " ") else f": {message}")
    # In a map of named entries (fields), name the entry too.
    if isinstance(properties.get(field, {}).get("additionalProperties"), dict) and len(error.absolute_path) > 1:
        field = f"{field}.{error.absolute_path[1]}"
    return invalid(field, message)


###############################################################################
# HTTP: reading requests
###############################################################################

WAIT_LIMIT_SECONDS = 60
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self';"
                               " base-uri 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
STATUS_QUERY = {"type": "string", "enum": list(STATUSES), "x-message": f"status must be one of: {', '.join(STATUSES)}"}
WAIT_QUERY = {"type": "integer", "minimum": 0, "maximum": WAIT_LIMIT_SECONDS, "default": 0,
              "description": "Seconds to wait for a change before answering (a long poll). Beyond the server's"
                             " share of waiting requests for your account, 429 too_many_waiting says in"
                             " Retry-After when to come back.",
              "x-message": f"wait must be a whole number of seconds from 0 to {WAIT_LIMIT_SECONDS}"}
AUDIT_QUERY = {"event_type": {"type": "string", "enum": ["", *AUDIT_EVENT_TYPES],
                              "x-message": f"event_type must be one of: {', '.join(AUDIT_EVENT_TYPES)}"},
               "pause_id": {"type": "string", "maxLength": 100, "x-message": "pause_id must be a pause id"},
               **PAGE_QUERY}
# Event types joined by commas (or none: every type). (?!\n) as in ONE_LINE_TEXT: Python's $
# also matches before a final newline, which the document's (ECMA-262) $ does not.
EVENT_TYPE_LIST = "^(?:{0}(?:,{0})*)?(?!\\n)$".format("(?:" + "|".join(re.escape(name) for name in EVENT_TYPES) + ")")
EVENTS_QUERY = {"after": {"type": "string", "minLength": 1, "maxLength": 100,
                          "x-message": "after must be an event id (evt_…)"},
                "types": {"type": "string", "maxLength": 500, "pattern": EVENT_TYPE_LIST,
                          "x-message": f"types must be a comma-separated list drawn from: {', '.join(EVENT_TYPES)}"},
                "limit": LIMIT, "wait": WAIT_QUERY}
EXPORT_QUERY = {"format": {"type": "string", "enum": ["jsonl", "csv"], "default": "jsonl",
                           "x-message": "format must be jsonl or csv"},
                "since": {"type": "string", "format": "date-time", "maxLength": 40,
                          "description": "Events at or after this time (RFC 3339)",
                          "x-message": "since must be a time like 2026-11-29T00:00:00Z"},
                "until": {"type": "string", "format": "date-time", "maxLength": 40,
                          "description": "Events before this time (RFC 3339)",
                          "x-message": "until must be a time like 2026-11-29T00:00:00Z"}}
DASHBOARD_AUDIT_QUERY = {name: AUDIT_QUERY[name] for name in ("event_type", "pause_id", "cursor")}
# The longest address the log-in page goes on to once signed in (its next=).
LOGIN_NEXT_MOST = 500
LOGIN_QUERY = {"next": {"type": "string", "maxLength": LOGIN_NEXT_MOST, "x-message": "next must be a dashboard path"},
               "notice": {"type": "string", "enum": ["password"], "x-message": "notice is not known"}}


def media_type():
    """The request's Content-Type without its parameters, in lower case: 'application/json'."""
    return bottle.request.content_type.split(";")[0].strip().lower()


def read_json(config):
    """The request body as JSON: 413 past the size limit, 415 unless it says it is JSON,
    400 unless it is JSON (NaN and lone surrogates included)."""
    limit = config["server.max_body_bytes"]
    # waitress refuses larger bodies before they are read; this is for other servers.
    if bottle.request.content_length > limit or len(raw := bottle.request.body.read(limit + 1)) > limit:
        raise ApiError(413, "payload_too_large", f"request bodies are limited to {limit} bytes")
    # A JSON body must say so: a page elsewhere can send text/plain without a CORS preflight.
    if raw and media_type() != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with 'Content-Type: application/json'")
    # Bodies are read as sent: a gzipped one would be "not valid JSON", one merely labelled so read as if plain.
    if raw and bottle.request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        raise ApiError(415, "unsupported_media_type", "send the body uncompressed, without a Content-Encoding header")
    try:
        body = json.loads(raw or b"null", parse_constant=not_json, parse_float=finite_float,
                          parse_int=whole_number)
        where = lone_surrogate_at(body)
    except RecursionError:
        raise ApiError(400, "invalid_json", "the request body is nested too deeply to read") from None
    except json.JSONDecodeError as error:
        # Say where, as a JSON reader would: a trailing comma or a single quote is then found at once.
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {error.msg} at line {error.lineno}"
                                            f" column {error.colno}") from None
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "the request body is not valid JSON: it is not UTF-8") from None
    except ValueError as error:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {error}") from None
    if where:
        raise ApiError(400, "invalid_json", "the request body holds a lone UTF-16 surrogate (like \\ud800),"
                                            " which is not text", field=where)
    return body


def read_query(specs, validator):
    """The route's declared query parameters, checked against their schemas (`validator`
    holds them as one object schema); an absent one takes its default. Whole numbers
    arrive as text and must be digits."""
    values = {}
    for name, schema in specs.items():
        given = bottle.request.query.getall(name)
        if len(given) > 1:          # one would be taken silently: ?status=pending&status=responded is not both
            raise invalid(name, f"{name} is given {len(given)} times; give it once")
        raw = as_sent(given[0]) if given else None
        if raw is None:
            values[name] = schema.get("default")
        elif schema["type"] == "integer" and not re.fullmatch("[0-9]{1,9}", raw):
            raise invalid(name, schema["x-message"])
        else:
            values[name] = int(raw) if schema["type"] == "integer" else raw
    validate_body(validator.schema, {k: v for k, v in values.items() if v is not None}, validator)
    return values


def as_sent(text):
    """Text of the request line as its client wrote it: WSGI hands it over as Latin-1, so
    'statüs', sent as UTF-8, arrives as 'statÃ¼s'. Bytes that are not UTF-8 read as '\ufffd'."""
    return text.encode("latin-1").decode("utf-8", "replace")


def refuse_a_body(config):
    """422 for a body sent to a route that takes none, naming its first field if it is a JSON
    object: a "reason" sent with a cancel would otherwise be dropped in silence, the caller
    believing it recorded. An empty one, {} or null is no body, however it is labelled (curl's
    -d '{}' says it is a form); any other is refused as a body, not as one to send as JSON."""
    try:
        unasked = json.loads(bottle.request.body.read(config["server.max_body_bytes"] + 1) or b"null")
    except (ValueError, RecursionError):        # not JSON, not UTF-8, or nested past reading
        unasked = "a body"
    if unasked not in (None, {}):
        # (Not by a key with a lone surrogate: JSON readers that refuse one could not read the 422.)
        named = [key for key in unasked if not LONE_SURROGATE.search(key)] if isinstance(unasked, dict) else []
        field = min(named, default=None)
        raise invalid(field, (f"unknown field {field!r}; " if field else "") + "this takes no body")


def request_header(name):
    """A request header as the client sent it (latin-1, as WSGI hands it over). Bottle's
    get_header() re-decodes it as UTF-8 and raises on bytes that are not."""
    return bottle.request.environ.get("HTTP_" + name.upper().replace("-", "_"))


def request_cookie(name):
    """The value of this request's cookie `name` (the first that is a token, if it came
    twice), or None. Read here, not by Bottle, whose parser (http.cookies) takes time
    quadratic in the backslashes of a quoted value on Pythons before 3.11.10 and 3.12.6:
    one 120 KB Cookie header held a thread and a core for 20 s, four froze every other
    request for 80 s. PausePoint's cookies hold URL-safe tokens, so a value with anything
    else is not one (a client may send one in double quotes, which the cookie syntax
    allows). Pairs are split at commas too: waitress joins two Cookie headers with one."""
    return cookie_token(request_header("Cookie"), name)


def cookie_token(cookies, name):
    """The token cookie `name` holds in a Cookie header, as request_cookie() reads it, or None."""
    for pair in re.split("[;,]", cookies or ""):
        key, _, value = pair.partition("=")
        token = re.fullmatch(r'\s*("?)([\w-]{1,128})\1\s*', value, re.ASCII) if key.strip() == name else None
        if token:
            return token[2]
    return None


def client_ip():
    return client_address(bottle.request.environ)


# An IPv6 client as some proxies and load balancers forward it, with its source port.
BRACKETED_ADDRESS = re.compile(r"\[([^\]]*)\](?::[0-9]*)?")


def client_address(environ):
    """The client's address: REMOTE_ADDR, not bottle's remote_addr, which believes any
    client's X-Forwarded-For (waitress rewrites REMOTE_ADDR only for server.trusted_proxy).
    waitress takes the port off a forwarded IPv4 address but leaves "[2001:db8::7]:40001"
    whole, which would make each of a client's connections a client of its own."""
    address = environ.get("REMOTE_ADDR") or "unknown"
    bracketed = BRACKETED_ADDRESS.fullmatch(address)
    return bracketed[1] if bracketed else address


# Where a NAT64 gateway puts each IPv4 address it stands for (RFC 6052's well-known prefix).
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


def limited_as(address):
    """Whom a per-address limit counts `address` as: an IPv6 address by its /64, which is one
    subscriber's (a provider hands out at least that, and its holder may use any address in
    it), so one client cannot take a budget per address; any other address as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:              # an IPv4 client of a dual-stack listener
        return str(ip.ipv4_mapped)
    if ip in NAT64_PREFIX:                      # an IPv4 client through a NAT64 gateway: its /64 is everyone's
        return str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


# The client a connection from the trusted proxy is counted as, which has no share to keep
# to (no address is written so).
TRUSTED_PROXY = "server.trusted_proxy"


def connection_client(address, trusted_proxy):
    """Whose shares of connections and threads a connection from `address` takes: those of
    limited_as(address), or none if it is the trusted proxy (TRUSTED_PROXY), behind which
    every client has its one address. Compared as text, as waitress does to believe its
    headers: load_config() writes the setting as the socket writes addresses."""
    return TRUSTED_PROXY if trusted_proxy and address == trusted_proxy else limited_as(address)


def client_limited_as():
    return limited_as(client_ip())


def client_facts():
    """Who is on the other end, for rate limits and the audit log."""
    return {"ip": client_ip(), "user_agent": readable_text(request_header("User-Agent") or "")[:300]}


def json_answer(text):
    """An answer SQLite wrote as JSON, sent as it is."""
    bottle.response.content_type = "application/json"
    return text


###############################################################################
# HTTP: the handlers
###############################################################################

# Each handler is named by the route table below and is handed what its
# parameters name: rt, caller (the API key's developer and mode), body (checked
# against the route's schema), query (the route's parameters, checked), client,
# and the parameters of the path.

def healthz(rt):
    """Health: 200 once the database answers and the scheduler runs."""
    rt.db().execute("SELECT 1 FROM schema_migrations LIMIT 1").fetchone()
    if not rt.scheduler.running:
        raise ApiError(503, "starting", "the scheduler is not running")
    return {"status": "ok", "version": VERSION, "database": "ok", "scheduler": "running",
            "disk": "short of room" if disk_short_of_room(rt.config, rt.wal) else "ok"}


def get_openapi(rt):
    """This API, described in OpenAPI 3.1."""
    return rt.openapi


def registration_allowed(rt, caller):
    if not registration_open(rt.db(), rt.config)[0]:
        raise ApiError(403, "registration_closed",
                       "registration is closed on this server; the operator adds developers with"
                       " `python pausepoint.py create-developer --email … --name …`")
    require_room(disk_short_of_room(rt.config, rt.wal))
    rt.limiter.limit("register", client_limited_as(), rt.config["ratelimit.register_per_hour"],
                     "registrations from your address")


def register(rt, body):
    """Register a developer: a live key and a test key, shown this once."""
    with rt.hashing_turn(client_limited_as()):
        return register_developer(rt.db(), rt.config, body["email"], body["name"], body["password"])


def password_of(rt, email, password, device=None):
    """The developer if the password is theirs, else None, wherever a password is checked
    (sign-in, key rotation, the password form). Failures only are limited, per address
    and per email (ratelimit.login_per_hour each), so many addresses cannot guess at one
    account; a browser whose device cookie signed in as this developer before is held to
    its own budget instead, so failing on purpose (from anywhere, or from its own office's
    address) cannot lock anyone out of the browser they use."""
    per_hour, email = rt.config["ratelimit.login_per_hour"], (email or "").strip().lower()
    if device_knows(rt.db(), device, email):
        budgets = [("password_failures_device", key_digest(device), "failed sign-ins from this browser")]
    else:       # the email by digest: a bucket costs the same memory whatever was typed
        budgets = [("password_failures", client_limited_as(), "failed sign-ins from your address"),
                   ("password_failures_email", key_digest(email),
                    "failed sign-ins for this email (a browser that has signed in as you before is not held to"
                    " this: sign in or rotate keys there)")]
    for name, who, what in budgets:
        rt.limiter.refuse_if_exhausted(name, who, per_hour, what)
    # Counted as a failure before the check and given back after a success, so guesses
    # sent all at once cannot each pass the check above before any is counted.
    for name, who, _ in budgets:
        rt.limiter.spend(name, who, per_hour, make_room=False)
    failed = False      # given back unless the password was checked and was wrong (a 503 checked none)
    try:
        with rt.hashing_turn(client_limited_as()):
            developer = check_password(rt.db(), rt.config, email, password or "")
            failed = developer is None
    finally:
        if not failed:
            for name, who, _ in budgets:
                rt.limiter.give_back(name, who, per_hour)
    return developer


def rotation_allowed(rt, caller):
    rt.limiter.limit("rotate", client_limited_as(), rt.config["ratelimit.rotate_per_hour"],
                     "key rotations from your address")


def rotate(rt, body):
    """Replace the live or the test key; the old one stops working at once."""
    developer = password_of(rt, body["email"], body["password"])
    if developer is None:
        raise ApiError(401, "unauthorized", "email or password is wrong")
    key, endpoints = rotate_key(rt.db(), developer, MODES[body["key"]])
    return {"developer_id": developer["id"], ("api_key" if body["key"] == "live" else "test_api_key"): key,
            "endpoints_to_check": endpoints,
            "message": "Save this key — it will not be shown again. The old key has stopped working."
                       + (f" It set the URL or secret of {len(endpoints)} webhook endpoint"
                          f"{'s' if len(endpoints) > 1 else ''} (endpoints_to_check), which still receive your events"
                          " and their respond links: if the key leaked, check where they point and change their"
                          " secrets" if endpoints else "")}


def post_pause(rt, caller, config, unchecked_body):
    """Ask a human: create a pause and send its notification."""
    pause, replayed = create_pause(rt.db(), config, caller, unchecked_body, request_header("Idempotency-Key"),
                                   rt.limiter, rt.wal)
    if replayed:
        bottle.response.set_header("Idempotent-Replayed", "true")
    return created_json(rt.db(), pause, rt.config)


def list_pauses(rt, caller, query):
    """The caller's pauses, newest first, optionally of one status."""
    return json_answer(pauses_json(rt.db(), rt.config, caller, query["status"], query["limit"], query["cursor"]))


def get_pause(rt, caller, query, pause_id):
    """One pause; with ?wait=N, answered as soon as it is decided or after N seconds."""
    if query["wait"]:
        pause = owned_pause(rt.db(), caller, pause_id)
        if pause["status"] == "pending":
            rt.wait_for(caller, f"pause:{pause['id']}", lambda: owned_pause(rt.db(), caller, pause_id),
                        lambda found: found["status"] != "pending", query["wait"], bottle.request.environ)
    return json_answer(pause_json(rt.db(), rt.config, pause_id, caller))       # one read when not waiting


def post_cancel(rt, caller, pause_id):
    """Cancel a pending pause."""
    pause = cancel_pause(rt.db(), rt.config, caller, pause_id)
    return json_answer(pause_json(rt.db(), rt.config, pause["id"]))


def webhook_change_allowed(rt, caller):
    """Every webhook change writes an audit event that is kept for good (in live mode): a
    developer makes so many an hour."""
    rt.limiter.limit("webhook_changes", (caller.developer_id, caller.livemode),
                     rt.config["ratelimit.webhook_changes_per_hour"],
                     f"{mode_name(caller.livemode)} webhook changes for this developer"
                     " (ratelimit.webhook_changes_per_hour)")


def post_webhook(rt, caller, body):
    """Register a webhook endpoint; a generated secret is shown this once."""
    return webhook_with_secret(*create_webhook(rt.db(), rt.config, caller, body))


def webhook_with_secret(webhook, generated_secret):
    answer = webhook_json(webhook)
    if generated_secret:
        answer["secret"] = generated_secret         # shown this once; PausePoint never shows a secret again
    return answer


def list_webhooks(rt, caller):
    """The caller's webhook endpoints, newest first."""
    return {"webhooks": [webhook_json(row) for row in webhooks_of(rt.db(), caller)]}


def get_webhook(rt, caller, webhook_id):
    """One webhook endpoint."""
    return webhook_json(owned_webhook(rt.db(), caller, webhook_id))


def patch_webhook(rt, caller, body, webhook_id):
    """Change a webhook's url or events, rotate its secret, enable or disable it."""
    return webhook_with_secret(*update_webhook(rt.db(), rt.config, caller, webhook_id, body))


def remove_webhook(rt, caller, webhook_id):
    """Delete a webhook endpoint; its pending deliveries are cancelled."""
    delete_webhook(rt.db(), caller, webhook_id)


def post_webhook_test(rt, caller, webhook_id):
    """Send a signed webhook.test event to the endpoint."""
    return delivery_as_it_stands(rt.db(), send_test_event(rt.db(), caller, webhook_id)["id"])


def list_deliveries(rt, caller, query, webhook_id):
    """A webhook's deliveries, newest first, each with every attempt."""
    deliveries, next_cursor = deliveries_page(rt.db(), caller, webhook_id, query["limit"], query["cursor"])
    return {"deliveries": deliveries, "next_cursor": next_cursor}


def post_redeliver(rt, caller, webhook_id, delivery_id):
    """Send a delivery again now, with the same event id."""
    return delivery_as_it_stands(rt.db(), redeliver(rt.db(), caller, webhook_id, delivery_id)["id"])


def list_events(rt, caller, query):
    """Your events after a given one, oldest first, as webhooks send them; with ?wait=N,
    answered as soon as there is one or after N seconds."""
    types = query["types"].split(",") if query["types"] else None
    read = functools.partial(events_after, rt.db(), caller, query["after"], types, query["limit"])
    events = read()
    if query["wait"] and not events:
        events = rt.wait_for(caller, f"events:{caller.developer_id}:{caller.livemode}", read, bool, query["wait"],
                             bottle.request.environ, wants=set(types or ()))
    return json_answer('{"events": [%s]}' % ", ".join(events))


def list_channels(caller, config):
    """The channels this server can notify through for the caller, and whether each is configured."""
    return {"channels": [{"name": c.name, "kind": c.kind, "configured": not c.missing_settings(config)}
                         for c in channels(config).values()]}


def get_audit(rt, caller, query):
    """The caller's audit log, newest first, optionally of one event type or pause."""
    rows, next_cursor = audit_page(rt.db(), caller, query["event_type"], query["pause_id"], query["limit"],
                                   query["cursor"])
    return {"events": [audit_event_json(row) for row in rows], "next_cursor": next_cursor}


def export_audit(rt, caller, query):
    """The caller's audit events, oldest first, with their hashes, as JSON lines or CSV,
    written as they are read."""
    since, until = (query_time(query, name) for name in ("since", "until"))

    def events():
        # The window runs from the chain's first event at or after `since` up to its first at or
        # after `until`, so it is always an unbroken stretch of the chain that verifies. That is
        # the events between the two times, as times never go back along a chain; but a log from
        # before the chain, chained on upgrade, may hold times that do (an older release stamped
        # a create before it waited for the write lock), and filtering those by time left gaps.
        # The end is found as the chain is read, not looked up first: with `until` still to come,
        # none is there yet, and the events written after it while the export is read are not its.
        first = first_event_at(rt.db(), caller, since)
        for row in audit_events_in_order(rt.db(), "developer_id = ? AND livemode = +? AND seq >= ?",
                                         (caller.developer_id, caller.livemode, first or SEQ_BEYOND)):
            if row["timestamp"] >= until:
                return
            yield row

    if query["format"] == "csv":
        def lines():
            yield csv_line(EXPORT_COLUMNS)
            for row in events():
                yield csv_line([f"aud_{row['seq']}", row["seq"], row["developer_id"], row["livemode"],
                                *(row[name] for name in EXPORT_COLUMNS[4:])])
        media = "text/csv; charset=utf-8"
    else:
        def lines():
            for row in events():
                # ASCII, so data an older version let through (a lone surrogate) still exports
                yield json.dumps({"id": f"aud_{row['seq']}", "seq": row["seq"], "developer_id": row["developer_id"],
                                  "livemode": bool(row["livemode"]), **{name: row[name] for name in EXPORT_COLUMNS[4:-3]},
                                  "data": json.loads(row["data"]), "data_json": row["data"], "prev_hash": row["prev_hash"],
                                  "hash": row["hash"]}, separators=(",", ":")) + "\n"
        media = "application/x-ndjson"
    mode = mode_name(caller.livemode)
    return bottle.HTTPResponse(in_chunks(lines()), headers={
        "Content-Type": media, "Cache-Control": "no-store",
        "Content-Disposition": f'attachment; filename="pausepoint-audit-{mode}.{query["format"]}"'})


def first_event_at(conn, caller, moment):
    """The seq of the caller's chain's first event at or after `moment` (stored time), or None."""
    first = query_db(conn, "SELECT seq FROM audit_events WHERE developer_id = ? AND livemode = +? AND timestamp >= ?"
                           " ORDER BY seq LIMIT 1", (caller.developer_id, caller.livemode, moment), one=True)
    return first and first[0]


SEQ_BEYOND = 2 ** 63 - 1        # past every seq SQLite hands out


# An exported event: its chain's fields exactly as stored and hashed (timestamp to the millisecond;
# in CSV, data is the hashed JSON text, which JSON lines give as data_json beside the parsed data).
EXPORT_COLUMNS = ("id", "seq", "developer_id", "livemode", "timestamp", "actor", "event_type", "pause_id", "data",
                  "prev_hash", "hash")


def csv_line(cells):
    """One CSV row. What anyone wrote is inside the JSON data cell: no cell can start a formula."""
    out = io.StringIO()
    csv.writer(out).writerow(["" if cell is None else cell for cell in cells])
    return out.getvalue()


def in_chunks(lines, size=16384):
    """A download's lines as UTF-8 chunks of about `size` bytes, written as they are read."""
    out, held = [], 0
    for line in lines:
        out.append(line)
        held += len(line)
        if held > size:
            yield "".join(out).encode()
            out, held = [], 0
    yield "".join(out).encode()


def query_time(query, name):
    """A since/until query parameter as stored time (the earliest or latest there is if absent)."""
    if query[name] is None:
        return "0000" if name == "since" else "9999"
    # RFC 3339 allows a lower-case t and z, and a leap second: 23:59:60 is the moment the
    # next minute starts, as no stored time falls within it.
    # So is year 0000, which Python has not: read as 2000, of the same calendar (a leap year),
    # to check the date; whatever its offset, it is before every stored time.
    text = query[name].upper().replace("Z", "+00:00")
    year_zero = text.startswith("0000")
    text = "2000" + text[4:] if year_zero else text
    leap_second = re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:60", text) is not None
    try:
        moment = dt.datetime.fromisoformat(text[:17] + "59" + text[19:] if leap_second else text)
    except ValueError:
        raise invalid(name, f"{name} must be a time like 2026-11-29T00:00:00Z") from None
    if year_zero:
        return "0000"
    try:
        moment = (moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)
        moment += dt.timedelta(seconds=leap_second)
    except OverflowError:       # in UTC, before year 1 or after 9999: before or after every stored time
        return "0000" if moment.year < 5000 else "9999"
    return db_time(moment) if moment.year >= 1000 else "0000"       # stored times compare as text


def get_audit_head(rt, caller):
    """The latest hash of the caller's audit chain and how many events it holds: note it
    somewhere else, and an export can later prove that nothing before it changed."""
    # One statement, so the count and the hash are of the same moment.
    count, latest = query_db(rt.db(), "SELECT count(*), (SELECT hash FROM audit_events WHERE developer_id = :developer"
                                      " AND livemode = +:livemode ORDER BY seq DESC LIMIT 1) FROM audit_events"
                                      " WHERE developer_id = :developer AND livemode = +:livemode",
                             {"developer": caller.developer_id, "livemode": caller.livemode}, one=True)
    head = {"type": "audit_head", "developer_id": caller.developer_id, "livemode": bool(caller.livemode),
            "hash": latest or AUDIT_GENESIS,
            "count": count, "at": api_time(db_time())}
    return {**head, "signature": rt.signer.sign(head)}


def get_jwks(rt):
    """The public keys that sign receipts and audit heads, retired ones included."""
    return rt.signer.jwks()


def read_form():
    """A form post as text: 415 unless url-encoded (a multipart upload has no business
    here), 400 if it is not UTF-8."""
    if media_type() != "application/x-www-form-urlencoded":
        raise ApiError(415, "unsupported_media_type", "send the form as application/x-www-form-urlencoded")
    try:
        form = bottle.request.forms
        return {name.encode("latin-1").decode("utf-8"): form.get(name).encode("latin-1").decode("utf-8")
                for name in form.keys()}
    except (UnicodeError, ValueError):
        raise ApiError(400, "bad_request", "the form is not UTF-8 text") from None


def read_page_form(config):
    """A page's form, as read_form(), after refusing one over the body size limit."""
    if bottle.request.content_length > config["server.max_body_bytes"]:
        raise ApiError(413, "payload_too_large", "the form is too large")
    return read_form()


def twilio_form(rt, what):
    """The form Twilio posted, refused with 403 unless X-Twilio-Signature signs it for this
    server's URL; `what` names what the route takes, for a server without Twilio settings."""
    form = read_form()
    token, url = rt.config["twilio.auth_token"], base_url(rt.config) + bottle.request.fullpath
    if not token:       # nothing could be signed for this server: say so, not that the signature is wrong
        raise ApiError(403, "twilio_not_configured", f"Twilio is not configured on this server: it takes no {what}"
                                                     " until the operator sets the twilio settings")
    if not twilio.request_validator.RequestValidator(token).validate(
            url, form, request_header("X-Twilio-Signature") or ""):
        raise ApiError(403, "bad_signature", "X-Twilio-Signature is missing or wrong for this server's"
                                             " twilio.auth_token and server.base_url")
    return form


# Visible text a pause may hold, which XML 1.0 has no character for: an answer quoting it
# would not be XML, and Twilio, unable to read it, would text nothing back.
NOT_IN_XML = {0xFFFE: "\ufffd", 0xFFFF: "\ufffd"}


def twilio_inbound(rt):
    """An SMS or WhatsApp reply, as Twilio posts it (signed); answered in TwiML, a decision always,
    anything else TEXT_ANSWERS_PER_HOUR times per number. One whose signed text names another
    message or sender is not recorded, nor answered (names_another_message())."""
    form = twilio_form(rt, "text replies")
    sender = form.get("From") or ""
    reply = None if names_another_message(form) else record_sms_reply(
        rt.db(), rt.config, sender, form.get("Body") or "", form.get("MessageSid"))
    if reply is not None and not reply.startswith(RECORDED_REPLY):
        number = sender.removeprefix("whatsapp:")
        if rt.limiter.retry_after("text_answers", number, TEXT_ANSWERS_PER_HOUR):
            reply = None
        else:
            rt.limiter.spend("text_answers", number, TEXT_ANSWERS_PER_HOUR)
    twiml = twilio.twiml.messaging_response.MessagingResponse()
    if reply is not None:
        twiml.message(reply.translate(NOT_IN_XML))
    return bottle.HTTPResponse(str(twiml), status=200, headers={"Content-Type": "application/xml"})


def names_another_message(form):
    """Whether the text Twilio signed (each name and value run together, in name order) names
    a message other than MessageSid, or a sender other than From. The Body is the texter's own
    words, signed between the fields before and after it: a body of
    '1From+15550100MessageSidSM…NumMedia', once its signed post is seen, splits again into
    Body '1', From +15550100 and a MessageSid never recorded, the rest run into NumMedia; or,
    were the text never taken, '1From+15550100FromC' into Body '1', From +15550100 and FromC,
    under its own id. Twilio names one sender, after From, and one message (MessageSid and
    SmsMessageSid), or two in a WhatsApp reply quoting ours (OriginalRepliedMessageSid): such
    a split holds two senders, or two messages, the one made up and Twilio's. (A MessageSid
    not of an id's form is refused, and said to be, by record_sms_reply().)"""
    sid, signed = form.get("MessageSid") or "", "".join(name + form[name] for name in sorted(form))
    messages = set(re.findall(f"MessageSid(?=({MESSAGE_SID.pattern}))", signed))
    senders = set(re.findall(r"From((?:whatsapp:)?\+[0-9]*)", signed))
    return bool(MESSAGE_SID.fullmatch(sid)) and bool(
        messages - {sid, form.get("OriginalRepliedMessageSid")} or senders - {form.get("From")})


TWILIO_STATUS_PATH = "/v1/twilio/status"
# What the API document says of the forms Twilio posts: the fields read of each (Twilio sends more).
TWILIO_FORM_FIELDS = {"/v1/twilio/inbound": ("From", "To", "Body", "MessageSid"),
                      TWILIO_STATUS_PATH: ("MessageSid", "MessageStatus", "ErrorCode")}


def twilio_status(rt):
    """Twilio's report of what became of a text it took (signed): one not delivered fails."""
    form = twilio_form(rt, "delivery reports")
    # Only an id of Twilio's form, as for a reply (MESSAGE_SID): anything else names no text of ours.
    if MESSAGE_SID.fullmatch(form.get("MessageSid") or ""):
        record_delivery_report(rt.db(), rt.config, form["MessageSid"], form.get("MessageStatus") or "",
                               form.get("ErrorCode") or "")


def guard_respond_link(rt, lookup):
    """Run lookup(). Only an unknown token spends the caller's guessing budget, and
    once it is spent unknown tokens get 429; a valid token always works, so
    guesses from a shared address never lock out the people behind it."""
    try:
        return lookup()
    except ApiError as e:
        if e.status == 404:
            rt.limiter.limit("respond", client_limited_as(), rt.config["ratelimit.respond_failures_per_hour"],
                             "unknown respond links from your address")
        raise


def open_respond_link(rt, client, token, via):
    """The pause behind a respond link, recording that it was opened (GET changes no state)."""
    pause = guard_respond_link(rt, lambda: pause_by_token(rt.db(), token))
    # No browser opens a page with HEAD; link checkers and mail scanners do, and would
    # otherwise mark a team's person as having opened a link they never saw.
    if bottle.request.method != "HEAD":
        record_link_opened(rt.db(), pause, via, client)
    return pause


def get_respond_json(rt, client, token):
    """What the holder of a respond link may see: the question and its outcome."""
    pause = open_respond_link(rt, client, token, "api")
    return respond_facts(pause, asker_name(rt.db(), pause))


def post_respond_json(rt, client, unchecked_body, token):
    """Answer a pause, as its human: {"choice": …, "comment": …}. The body's form first, the
    comment's text once respond_to_pause() has found the request still open."""
    body = validate_body(RESPONSE_FORM_SCHEMA, unchecked_body.value)
    pause = guard_respond_link(rt, lambda: respond_to_pause(rt.db(), rt.config, token, body["choice"],
                                                            body.get("comment"), client, body.get("fields")))
    return respond_facts(pause, asker_name(rt.db(), pause))


def get_respond_page(rt, client, query, token):
    """The page a human opens from the notification."""
    pause = open_respond_link(rt, client, token, "page")
    # Email buttons arrive with ?choice=: show it picked, but only the POST decides.
    picked = bottle.request.query.getunicode("choice")
    return respond_page(rt, pause, token, picked=picked if picked in json.loads(pause["options"]) else None)


def post_respond_page(rt, client, token):
    """The page's form: record the choice, then show it (Post/Redirect/Get)."""
    if media_type() == "application/json":
        # A program that took respond_url for the API: it reads JSON, and is told where JSON goes.
        return error_response(ApiError(415, "unsupported_media_type", "this is the page a person answers on, which"
                                       f" takes its form; POST your JSON to /v1/respond/{token}"), page=False)
    form = read_page_form(rt.config)
    # A textarea sends its line breaks as CRLF, and a lone carriage return is a control character.
    comment = form.get("comment") and form["comment"].replace("\r\n", "\n")
    try:
        guard_respond_link(rt, lambda: respond_to_pause(rt.db(), rt.config, token, form.get("choice"),
                                                        comment, client,
                                                        page_edits(rt.db(), pause_by_token(rt.db(), token), form)))
    except ApiError as e:
        if e.code not in NOT_RECORDED:
            if e.status != 422:
                raise
            return respond_page(rt, pause_by_token(rt.db(), token), token, error=e.message, status=422, entered=form)
        pause = pause_by_token(rt.db(), token)
        # A double tap posts twice, and the browser shows the answer to the second: saying
        # that did not count would tell the person their own first tap was someone else's.
        if not answered_alike(pause, form.get("choice"), comment):
            # Decided meanwhile, or answered already: the page as it now stands, its times as a
            # person reads them, saying that this answer did not count.
            why = NOT_RECORDED["cancelled" if pause["status"] == "cancelled" else e.code]
            return respond_page(rt, pause, token, status=e.status, error=f"Your answer was not recorded: {why}")
    # A reload then shows the recorded decision instead of posting again.
    return bottle.HTTPResponse(status=303, headers={"Location": f"/respond/{token}", **PAGE_HEADERS})


# Why an answer on the respond page did not count, by the refusal's code.
# A cancel is refused as already_decided too; "decided" beside "The agent cancelled" reads as two outcomes.
NOT_RECORDED = {"already_decided": "the request had already been decided.",
                "cancelled": "the agent had cancelled the request.",
                "already_voted": "you had answered it already.", "expired": "the request had expired."}


# A number as a person types it: ASCII digits, an optional fraction and exponent.
NUMBER_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def page_edits(conn, pause, form):
    """The respond page's edits (form_edits()), less the values it may have filled in from an
    approval when the person chose something else: those are not their changes. Any
    approval's, not only the latest's: another may have come since the page was shown."""
    edits = form_edits(pause, form)
    offered = approved_values(conn, pause)
    # The choice as respond_to_pause() reads it: 'Approve ' is an approval, not a veto.
    if not offered or (form.get("choice") or "").strip() == json.loads(pause["quorum"])["choice"]:
        return edits
    fields = json.loads(pause["fields"])
    return {name: value for name, value in edits.items()
            if not (name in offered and not field_value_problem(fields[name], value)
                    and typed_value(fields[name], value) in offered[name])}


def form_edits(pause, form):
    """The page form's values of the pause's editable fields ('field.<name>'), typed as the
    field is, without losing a digit or a space: a form sent back untouched edits nothing.
    Text that is no number stays text, for edit_fields() to refuse by name."""
    edits = {}
    for name, field in json.loads(pause["fields"] or "{}").items():
        text = form.get(f"field.{name}")
        if not field["editable"] or text is None:
            continue
        if field["type"] == "string":
            text = text.replace("\r\n", "\n")         # a textarea sends its line breaks as CRLF
        value = text
        if field["type"] in ("number", "integer") and NUMBER_TEXT.fullmatch(text.strip()):
            value = float(text)             # exact for every whole number a field may hold
        elif field["type"] == "boolean":
            value = {"true": True, "false": False}.get(text, text)
        edits[name] = value
    return edits


def respond_page(rt, pause, token, error=None, picked=None, status=200, entered=None):
    """The respond page; after a refused form, `entered` keeps what the person typed."""
    facts = respond_facts(pause, asker_name(rt.db(), pause))
    times = {name: pause[name] and human_time(pause[name]) for name in ("expires_at", "decided_at")}
    left = parse_db_time(pause["expires_at"]) - utcnow()
    # A quorum counts approvals of the same values: offer the values the last approval chose.
    proposed = {f"field.{name}": form_text(value) for name, value in (pause.get("proposed") or {}).items()}
    # In a team, whoever opens a link decided by another must not read that answer as their own.
    yours = pause["decided_by"] == f"recipient:{pause['recipient']}"
    return html_page("respond", status=status, pause=facts, token=token, team=bool(pause["team"]),
                     quorum=json.loads(pause["quorum"] or "null"), decided_by_you=yours,
                     error=error, picked=picked, times=times, left=human_duration(left.total_seconds()),
                     entered={**proposed, **(entered or {})})


def static_file(name):
    """The pages' stylesheet and their one small script (copy buttons)."""
    return bottle.static_file(name, root=STATIC_DIR,
                              mimetype="text/css" if name.endswith(".css") else "text/javascript")


###############################################################################
# HTTP: the dashboard
###############################################################################

# The dashboard's pages call the same domain functions as the API, as the signed-in
# developer in the mode the sign-in shows. The sign-up and log-in forms, which come
# before any sign-in, are guarded by a token both in a cookie and in the form (a
# cross-site form can set neither). A third cookie marks a browser that has signed in
# before (see password_of). Their names and scope: DashboardCookies.
SESSION_COOKIE, FORM_COOKIE, DEVICE_COOKIE, SHOWN_COOKIE = "pp_session", "pp_form", "pp_device", "pp_shown"
DASHBOARD_PAGE = 25


@dataclasses.dataclass(frozen=True)
class SignedIn:
    """A dashboard request's sign-in: its row (with the developer's email, name, plan) and cookie token."""
    row: sqlite3.Row
    token: str

    @property
    def caller(self):
        return Caller(self.row["developer_id"], self.row["livemode"], None, self.row["plan"], self.row["email"])


def signed_in(rt):
    """The SignedIn behind this request's cookie; otherwise a redirect to the log-in page."""
    token = rt.cookies.read(SESSION_COOKIE)
    row = session_for(rt.db(), rt.config, token)
    if token:
        rt.vouched.found(token, row is not None)
    if row is None:
        query = bottle.request.query_string
        back = bottle.request.fullpath + ("?" + query if query else "") if bottle.request.method == "GET" else "/dashboard"
        if len(back) > LOGIN_NEXT_MOST:     # the log-in page would refuse it, and show no form
            back = "/dashboard"
        raise redirect(f"/dashboard/login?{urllib.parse.urlencode({'next': back})}")
    return SignedIn(row, token)


def shows_secrets():
    """Whether this request may take a secret held to be shown once: a GET that the browser
    does not say another site started. A link from elsewhere, followed while the redirect
    to the page was on its way, would use the secret up where nobody sees it."""
    return bottle.request.method == "GET" and request_header("Sec-Fetch-Site") in (None, "same-origin", "none")


def check_form_token(expected, form):
    """403 unless the form carries `expected`, which a form from another site cannot, and the
    browser does not say another site sent it (Sec-Fetch-Site), a sibling host name included:
    the token alone cannot tell, since a page on another name under the same domain may set
    this site's form cookie (cookies are shared across a domain's names) and post the token
    it chose, signing a visitor in to an account of its own. Browsers that do not say rely
    on the token alone."""
    sent_from = request_header("Sec-Fetch-Site")
    if (sent_from not in (None, "same-origin", "none") or not expected
            or not hmac.compare_digest(expected.encode(), (form.get("csrf") or "").encode())):
        raise ApiError(403, "forbidden", "this form has expired or did not come from this site;"
                                         " go back, reload the page and try again")


@dataclasses.dataclass(frozen=True)
class DashboardCookies:
    """The dashboard's cookies as this server names and scopes them. Over https each has the
    __Host- prefix: a browser takes such a cookie only from this very host name, Secure, for
    the whole site (Path=/) and with no Domain, so a page on a sibling host name, which may
    set cookies for the whole domain, can plant neither a sign-in of its own (the visitor
    would then work in its account) nor a form token. Over plain http no prefix can say
    that, and they go only to /dashboard."""
    secure: bool

    def name(self, cookie):
        return "__Host-" + cookie if self.secure else cookie

    def read(self, cookie):
        return request_cookie(self.name(cookie))

    def set(self, response, cookie, value, samesite="lax", **more):
        response.set_cookie(self.name(cookie), value, **self.scope(), samesite=samesite, httponly=True, **more)

    def delete(self, response, cookie):
        response.delete_cookie(self.name(cookie), **self.scope(), samesite="lax", httponly=True)

    def scope(self):
        return {"path": "/" if self.secure else "/dashboard", "secure": self.secure}


# The sign-in cookie's name on a server behind https and on one without: the thread
# dispatcher tells parties apart before any request reaches the app that knows which.
SESSION_COOKIE_NAMES = (DashboardCookies(secure=True).name(SESSION_COOKIE), SESSION_COOKIE)


def redirect(location):
    """A 303 to `location` (DashboardCookies may set cookies on it)."""
    return bottle.HTTPResponse(status=303, headers={"Location": location, **PAGE_HEADERS})


def safe_next(target):
    """Where to go after logging in: a dashboard path of this site, never another site."""
    target = target or ""
    # Checked as the browser will read it too: %2e%2e is a '..' once it is decoded.
    decoded = urllib.parse.unquote(target)
    if re.fullmatch(r"/dashboard(/[\w\-./?=&%]*)?", target, re.ASCII) and not any(
            step in decoded for step in ("//", "..", "\\")):
        return target
    return "/dashboard"


# A server whose base_url is https tells browsers to use nothing else for its host name for a
# year (they heed it only over https): a typed address or an old http link is then never sent
# in the clear, where a network could answer it in the server's place. Its sibling host names
# are not the server's to speak for.
HSTS = "max-age=31536000"


# The dashboard's pages may run its one script (copy buttons); the respond page runs none.
DASHBOARD_HEADERS = {"Cache-Control": "no-store", "Content-Security-Policy":
                     PAGE_HEADERS["Content-Security-Policy"] + "; script-src 'self'"}


def dashboard_page(rt, name, session, status=200, secret_shown=False, **values):
    page = html_page(name, status=status, headers=DASHBOARD_HEADERS, session=session,
                     caller=session.caller, csrf=session.row["csrf_token"], **values)
    # Chromium keeps even no-store pages for the Back button unless a cookie changed since:
    # a page that shows a secret sets one, and the next page clears it.
    if secret_shown:
        rt.cookies.set(page, SHOWN_COOKIE, "1")
    elif rt.cookies.read(SHOWN_COOKIE):
        rt.cookies.delete(page, SHOWN_COOKIE)
    return page


def form_page(rt, name, status=200, **values):
    """A sign-up or log-in page, with the form token it must post back (a new one if needed)."""
    token = rt.cookies.read(FORM_COOKIE) or secrets.token_urlsafe(32)
    page = html_page(name, status=status, headers={"Cache-Control": "no-store"}, csrf=token,
                     registration_open=registration_open(rt.db(), rt.config)[0], **values)
    rt.cookies.set(page, FORM_COOKIE, token, samesite="strict")
    return page


def home(rt):
    """The front page: where the dashboard and the API's description are."""
    return html_page("home", registration_open=registration_open(rt.db(), rt.config)[0])


def dashboard_home(rt, session):
    return redirect("/dashboard/overview")


def signup_form(rt):
    """Sign up: a developer and both API keys."""
    return form_page(rt, "signup", status=200 if registration_open(rt.db(), rt.config)[0] else 403, error=None,
                     values={})


def signup(rt, form):
    """Create the developer, sign them in, and show their keys this once."""
    if not registration_open(rt.db(), rt.config)[0]:
        return form_page(rt, "signup", status=403, error=None, values={})
    try:
        registration_allowed(rt, None)
        with rt.hashing_turn(client_limited_as()):
            keys = register_developer(rt.db(), rt.config, form.get("email"), form.get("name"), form.get("password"))
    except ApiError as e:
        if e.status not in (409, 422, 507):
            raise
        return form_page(rt, "signup", status=e.status, error=e.message, values=form)
    return signed_in_redirect(rt, keys["developer_id"], "/dashboard/keys/shown",
                              shown={"keys": [("Live key", keys["api_key"]), ("Test key", keys["test_api_key"])]})


def login_form(rt, query):
    if session_for(rt.db(), rt.config, rt.cookies.read(SESSION_COOKIE)) is not None:
        return redirect(safe_next(query["next"]))         # signed in already
    return form_page(rt, "login", error=None, email="", next=safe_next(query["next"]), notice=query["notice"])


def login(rt, form):
    """Sign in. A wrong email and a wrong password get the same answer in the same time."""
    device = rt.cookies.read(DEVICE_COOKIE)
    developer = password_of(rt, form.get("email"), form.get("password"), device)
    signed_in = None if developer is None else signed_in_redirect(
        rt, developer["id"], safe_next(form.get("next")), password_hash=developer["password_hash"])
    if signed_in is None:
        return form_page(rt, "login", status=401, error="Email or password is wrong.", email=form.get("email") or "",
                         next=safe_next(form.get("next")), notice=None)
    return signed_in


def signed_in_redirect(rt, developer_id, location, shown=None, password_hash=None):
    """Start a sign-in and go to `location`, remembering this browser (its device cookie,
    made now if it has none) as one the developer uses; `shown` is for the sign-in's next
    page to show once. None if the password checked (its password_hash) was changed since."""
    started = start_session(rt.db(), {"id": developer_id}, password_hash=password_hash,
                            replacing=rt.cookies.read(SESSION_COOKIE))
    if started is None:
        return None
    token, _ = started
    device = remember_device(rt.db(), rt.cookies.read(DEVICE_COOKIE), developer_id, password_hash=password_hash)
    if device is None:
        return None
    for kind, value in (shown or {}).items():
        rt.shown_once.put(token, kind, value)
    answer = redirect(location)
    rt.cookies.set(answer, SESSION_COOKIE, token, max_age=rt.config["dashboard.session_max_hours"] * 3600)
    rt.cookies.set(answer, DEVICE_COOKIE, device, max_age=int(DEVICE_LIFETIME.total_seconds()))
    return answer


def logout_page(rt):
    """A link or a typed address cannot sign anyone out (a GET changes nothing): it asks."""
    token = rt.cookies.read(SESSION_COOKIE)
    row = session_for(rt.db(), rt.config, token)
    if row is None:
        return redirect("/dashboard/login")
    return dashboard_page(rt, "logout", SignedIn(row, token))


def logout(rt, session):
    end_session(rt.db(), session.token)
    answer = redirect("/dashboard/login")
    rt.cookies.delete(answer, SESSION_COOKIE)
    rt.cookies.delete(answer, SHOWN_COOKIE)
    return answer


def switch_mode(rt, session, form):
    """Show test or live data from now on."""
    set_session_mode(rt.db(), session.token, 1 if form.get("mode") == "live" else 0)
    return redirect(safe_next(form.get("back")))


def pauses_page(rt, session, query):
    """The signed-in developer's pauses in the shown mode, newest first."""
    page = json.loads(pauses_json(rt.db(), rt.config, session.caller, query["status"], DASHBOARD_PAGE,
                                  query["cursor"]))
    return dashboard_page(rt, "pauses", session, page=page, status_filter=query["status"])


# A pause's page shows its latest events; one with more (a team's many openings and reminders)
# says so and links to its whole history in the audit log.
TIMELINE_EVENTS = 200


def pause_page(rt, session, pause_id):
    """One pause: what was asked, of whom, what happened, and its timeline."""
    pause = owned_pause(rt.db(), session.caller, pause_id)
    events, earlier = audit_page(rt.db(), session.caller, pause_id=pause["id"], limit=TIMELINE_EVENTS)
    return dashboard_page(rt, "pause", session, pause=json.loads(pause_json(rt.db(), rt.config, pause["id"])),
                          timeline=[audit_event_json(row) for row in reversed(events)], earlier=bool(earlier),
                          expired=pause["expires_at"] <= db_time())     # (its timeout then decides: no cancel)


def cancel_from_dashboard(rt, session, pause_id):
    cancel_pause(rt.db(), rt.config, session.caller, pause_id)
    return redirect(f"/dashboard/pauses/{pause_id}")


def audit_log_page(rt, session, query):
    rows, next_cursor = audit_page(rt.db(), session.caller, query["event_type"], query["pause_id"], DASHBOARD_PAGE,
                                   query["cursor"])
    return dashboard_page(rt, "audit", session, events=[audit_event_json(row) for row in rows], next_cursor=next_cursor,
                          filters={name: query[name] or "" for name in ("event_type", "pause_id")},
                          event_types=AUDIT_EVENT_TYPES)


def audit_csv(rt, session, query):
    """The audit log as CSV, written as it is read."""
    caller = session.caller

    def lines():
        yield csv_line(["id", "timestamp", "actor", "event_type", "pause_id", "livemode", "data"])
        for row in all_audit_events(rt.db(), caller, query["event_type"], query["pause_id"]):
            event = audit_event_json(row)
            yield csv_line([event["id"], event["timestamp"], event["actor"], event["event_type"], event["pause_id"],
                            "true" if event["livemode"] else "false", json_for_reading(event["data"])])

    mode = mode_name(caller.livemode)
    return bottle.HTTPResponse(in_chunks(lines()), headers={
        "Content-Type": "text/csv; charset=utf-8", "Cache-Control": "no-store", **PAGE_HEADERS,
        "Content-Disposition": f'attachment; filename="pausepoint-audit-{mode}.csv"'})


def keys_page(rt, session, error=None, status=200):
    """The working keys (their hints), rotation and the password."""
    return dashboard_page(rt, "keys", session, status=status,
                          hints=working_key_hints(rt.db(), session.row["developer_id"]), error=error)


def with_password(rt, session, form):
    """The developer, if the form's password is theirs; None otherwise (rate-limited). The
    rotate budget is the signed-in developer's here, not the address's: anyone sharing the
    address (an office, a carrier's NAT) could spend that one with bogus API rotations and
    so stop a developer replacing a leaked key or password in the browser they use. Only
    a right password spends it (wrong ones have password_of()'s budgets): whoever took a
    sign-in could otherwise spend it with wrong ones, and keep the developer from the
    password change that ends that sign-in."""
    budget = ("rotate_signed_in", session.row["developer_id"], rt.config["ratelimit.rotate_per_hour"])
    # Spent before the check and given back after a wrong password, as password_of() does,
    # so right ones sent all at once cannot each pass before any is counted.
    rt.limiter.limit(*budget, "key rotations, password changes and endpoints added for your account")
    developer = None
    try:
        developer = password_of(rt, session.row["email"], form.get("password"), rt.cookies.read(DEVICE_COOKIE))
    finally:
        if developer is None:
            rt.limiter.give_back(*budget)
    return developer


def rotate_from_dashboard(rt, session, form):
    """Replace the live or test key, after the password is confirmed; the new key is shown once."""
    developer = with_password(rt, session, form)
    if developer is None:
        return keys_page(rt, session, error="That password is wrong; no key was changed.", status=401)
    if form.get("key") not in MODES:
        raise invalid("key", "key must be 'live' or 'test': which key to replace")
    livemode = MODES[form["key"]]
    key, endpoints = rotate_key(rt.db(), developer, livemode)
    rt.shown_once.add(session.token, "keys", [("New live key" if livemode else "New test key", key)])
    rt.shown_once.add(session.token, "endpoints", endpoints)
    return redirect("/dashboard/keys/shown")


def keys_shown_page(rt, session):
    """New keys, this once; a reload finds them gone and goes back to the keys page."""
    keys = rt.shown_once.take(session.token, "keys") if shows_secrets() else None
    if not keys:
        return redirect("/dashboard/keys")
    test_key = next((key for label, key in keys if key.startswith("pp_test_")), None)
    return dashboard_page(rt, "keys_shown", session, secret_shown=True, keys=keys, base=base_url(rt.config),
                          test_key=test_key, endpoints=rt.shown_once.take(session.token, "endpoints") or [])


def password_from_dashboard(rt, session, form):
    """A new password; every sign-in ends, this one too. One that could not be is said so
    at once, without waiting for a turn to check the old one."""
    new_password = form.get("new_password") or ""
    try:
        check_new_password(new_password)
    except ApiError as e:
        return keys_page(rt, session, error=e.message, status=e.status)
    developer = with_password(rt, session, form)
    if developer is None:
        return keys_page(rt, session, error="That password is wrong; the password was not changed.", status=401)
    change_password(rt.db(), rt.config, developer, new_password, rt.cookies.read(DEVICE_COOKIE),
                    turn=rt.hashing_turn(client_limited_as()))
    answer = redirect("/dashboard/login?notice=password")
    rt.cookies.delete(answer, SESSION_COOKIE)
    return answer


def webhooks_page(rt, session, error=None, status=200, values=None):
    """The endpoints of the shown mode, and a form to add one."""
    return dashboard_page(rt, "webhooks", session, status=status, error=error, values=values or {},
                          webhooks=[webhook_json(row) for row in webhooks_of(rt.db(), session.caller)],
                          events=WEBHOOK_EVENTS, ticked=OUTCOME_EVENTS)


def add_webhook_from_dashboard(rt, session, form):
    """Add an endpoint, after the password is confirmed: it will be sent respond links, so a
    sign-in someone took over must not leave one behind that outlives a password change.
    A secret made here is shown this once."""
    webhook_change_allowed(rt, session.caller)
    developer = with_password(rt, session, form)
    body = {"url": (form.get("url") or "").strip(),
            "events": [event for event in WEBHOOK_EVENTS if form.get(f"event:{event}")]}
    if form.get("secret"):
        body["secret"] = form["secret"]
    try:
        if developer is None:
            raise ApiError(401, "unauthorized", "email or password is wrong")
        # Added only while the password checked is still the developer's: a change committed
        # meanwhile ended this sign-in, and an endpoint added after it would outlive that.
        webhook, secret = create_webhook(rt.db(), rt.config, session.caller, validate_body(WEBHOOK_SCHEMA, body),
                                         password_checked=developer)
    except ApiError as e:
        if e.status not in (401, 409, 422):
            raise
        error = "That password is wrong; no endpoint was added." if e.status == 401 else e.message
        return webhooks_page(rt, session, error=error, status=e.status, values=form)
    if secret:
        rt.shown_once.put(session.token, f"webhook:{webhook['id']}", secret)
    return redirect(f"/dashboard/webhooks/{webhook['id']}")


def webhook_page(rt, session, query, webhook_id):
    """One endpoint: its settings, its deliveries with every attempt (and a secret made
    for it just now, this once)."""
    with snapshot(rt.db()):
        webhook = webhook_json(owned_webhook(rt.db(), session.caller, webhook_id))
        deliveries, next_cursor = deliveries_page(rt.db(), session.caller, webhook_id, DASHBOARD_PAGE, query["cursor"])
    # Only once the page can be shown: a secret taken for a page that failed would be lost.
    secret = rt.shown_once.take(session.token, f"webhook:{webhook_id}") if shows_secrets() else None
    return dashboard_page(rt, "webhook", session, secret_shown=bool(secret), webhook=webhook, secret=secret,
                          deliveries=deliveries, next_cursor=next_cursor, back="/dashboard/webhooks")


def change_webhook_from_dashboard(rt, session, form, webhook_id):
    """Enable, disable, delete, send a test event."""
    webhook_change_allowed(rt, session.caller)
    action, caller = form.get("action"), session.caller
    if action == "delete":
        delete_webhook(rt.db(), caller, webhook_id)
        return redirect("/dashboard/webhooks")
    if action == "test":
        send_test_event(rt.db(), caller, webhook_id)
    elif action in ("enable", "disable"):
        update_webhook(rt.db(), rt.config, caller, webhook_id, {"enabled": action == "enable"})
    else:
        raise invalid("action", "action must be enable, disable, delete or test")
    return redirect(f"/dashboard/webhooks/{webhook_id}")


def redeliver_from_dashboard(rt, session, webhook_id, delivery_id):
    webhook_change_allowed(rt, session.caller)
    redeliver(rt.db(), session.caller, webhook_id, delivery_id)
    return redirect(f"/dashboard/webhooks/{webhook_id}")


def operator_only(session):
    """404 for a developer who is not an operator: the page is not theirs to know about."""
    if not session.row["is_operator"]:
        raise ApiError(404, "not_found", "no such page")


def operator_page(rt, session, query):
    """For operators: every developer with this month's usage, their plans, and registration."""
    operator_only(session)
    developers, next_cursor = developers_with_usage(rt.db(), DASHBOARD_PAGE * 4, query["cursor"])
    is_open, source = registration_open(rt.db(), rt.config)
    # Shown here as well as at start, so that opening registration on this page warns at once.
    warnings = list(push_target_warnings(rt.db(), rt.config, is_open))
    return dashboard_page(rt, "operator", session, developers=developers, next_cursor=next_cursor,
                          plans=plans(rt.config), registration=is_open, registration_source=source,
                          registration_warnings=warnings)


def change_plan_from_dashboard(rt, session, form):
    operator_only(session)
    change_plan(rt.db(), rt.config, form.get("email") or "", form.get("plan") or "", f"operator:{session.row['email']}")
    return redirect("/dashboard/operator")


def registration_from_dashboard(rt, session, form):
    operator_only(session)
    set_registration_open(rt.db(), form.get("open") == "true", session.row["developer_id"], session.row["email"])
    return redirect("/dashboard/operator")


def overview_page(rt, session):
    """The last 30 days in figures and a chart."""
    return dashboard_page(rt, "overview", session, figures=overview_figures(rt.db(), rt.config, session.caller),
                          duration=human_duration, share=human_share)


###############################################################################
# HTTP: the route table, the plugin that serves it, the app
###############################################################################

@dataclasses.dataclass(frozen=True)
class Route:
    """One endpoint, declared once: the app, the OpenAPI document and the tests read it."""
    method: str
    path: str                   # Bottle's form: /v1/pause/<pause_id>
    handler: object
    status: int = 200           # the answer's status when all goes well
    auth: str = "key"           # 'key': Authorization: Bearer pp_…; 'none'; 'twilio': X-Twilio-Signature;
                                # 'session': a dashboard sign-in (and on a POST its form's CSRF token);
                                # 'form': a POST whose form carries the form cookie's token (sign-up, log-in)
    body: object = None         # the request body's JSON Schema, or config -> schema
    query: dict = dataclasses.field(default_factory=dict)      # name -> JSON Schema of each query parameter
    answer: dict = None         # the JSON Schema of a 2xx answer; None: no body
    guard: object = None        # (rt, caller) -> raises ApiError before the body is read (rate limits)
    page: bool = False          # a page a person opens: HTML errors, not in the API document
    refusals: tuple = ()        # error statuses beyond those its auth, path, body and query imply
    media: tuple = ("application/json",)    # what a 2xx answer's body may be

    @property
    def refuses_a_body(self):
        """A call that declares no body, which refuses one sent anyway (refuse_a_body())."""
        return self.body is None and self.auth != "twilio" and not self.page


ROUTES = [
    Route("GET", "/healthz", healthz, auth="none", answer=HEALTH),
    Route("GET", "/v1/openapi.json", get_openapi, auth="none", answer={"type": "object"}),
    Route("POST", "/v1/auth/register", register, 201, "none", REGISTRATION_SCHEMA, answer=REGISTERED,
          guard=registration_allowed, refusals=(403, 409)),
    Route("POST", "/v1/auth/keys/rotate", rotate, 200, "none", ROTATION_SCHEMA, answer=ROTATED, guard=rotation_allowed,
          refusals=(401,)),
    Route("POST", "/v1/pause", post_pause, 201, body=pause_request_schema, answer=PAUSE_CREATED,
          refusals=(403,)),
    Route("GET", "/v1/pause", list_pauses, query={"status": STATUS_QUERY, **PAGE_QUERY}, answer=page_of("pauses", PAUSE)),
    Route("GET", "/v1/pause/<pause_id>", get_pause, query={"wait": WAIT_QUERY}, answer=PAUSE),
    Route("POST", "/v1/pause/<pause_id>/cancel", post_cancel, answer=PAUSE),
    Route("POST", "/v1/webhooks", post_webhook, 201, body=WEBHOOK_SCHEMA, answer=WEBHOOK,
          guard=webhook_change_allowed, refusals=(409,)),
    Route("GET", "/v1/webhooks", list_webhooks, answer={
        "type": "object", "required": ["webhooks"], "properties": {"webhooks": {"type": "array", "items": WEBHOOK}}}),
    Route("GET", "/v1/webhooks/<webhook_id>", get_webhook, answer=WEBHOOK),
    Route("PATCH", "/v1/webhooks/<webhook_id>", patch_webhook, body=WEBHOOK_CHANGE_SCHEMA, answer=WEBHOOK,
          guard=webhook_change_allowed),
    Route("DELETE", "/v1/webhooks/<webhook_id>", remove_webhook, 204, guard=webhook_change_allowed),
    Route("POST", "/v1/webhooks/<webhook_id>/test", post_webhook_test, 202, answer=DELIVERY,
          guard=webhook_change_allowed),
    Route("GET", "/v1/webhooks/<webhook_id>/deliveries", list_deliveries, query=PAGE_QUERY,
          answer=page_of("deliveries", DELIVERY)),
    Route("POST", "/v1/webhooks/<webhook_id>/deliveries/<delivery_id>/redeliver", post_redeliver, 202,
          answer=DELIVERY, guard=webhook_change_allowed),
    Route("GET", "/v1/channels", list_channels, answer=CHANNELS),
    Route("GET", "/v1/events", list_events, query=EVENTS_QUERY, refusals=(404,), answer={
        "type": "object", "required": ["events"], "properties": {"events": {"type": "array", "items": EVENT}}}),
    Route("GET", "/v1/audit", get_audit, query=AUDIT_QUERY, answer=page_of("events", AUDIT_EVENT)),
    Route("GET", "/v1/audit/export", export_audit, query=EXPORT_QUERY, answer={"type": "string"},
          media=("application/x-ndjson", "text/csv")),
    Route("GET", "/v1/audit/head", get_audit_head, answer=AUDIT_HEAD),
    Route("GET", "/.well-known/jwks.json", get_jwks, auth="none", answer=JWKS),
    Route("POST", "/v1/twilio/inbound", twilio_inbound, auth="twilio", answer={"type": "string"},
          refusals=(400, 403, 413, 415)),
    Route("POST", TWILIO_STATUS_PATH, twilio_status, 204, auth="twilio", refusals=(400, 403, 413, 415)),
    Route("GET", "/v1/respond/<token>", get_respond_json, auth="none", answer=RESPOND_FACTS),
    Route("POST", "/v1/respond/<token>", post_respond_json, auth="none", body=RESPONSE_SCHEMA, answer=RESPOND_FACTS),
    Route("GET", "/respond/<token>", get_respond_page, auth="none", page=True),
    Route("POST", "/respond/<token>", post_respond_page, auth="none", page=True),
    Route("GET", "/static/<name:re:[a-z]+\\.(css|js)>", static_file, auth="none", page=True),
    Route("GET", "/", home, auth="none", page=True),
    Route("GET", "/dashboard", dashboard_home, auth="session", page=True),
    Route("GET", "/dashboard/signup", signup_form, auth="none", page=True),
    Route("POST", "/dashboard/signup", signup, auth="form", page=True),
    Route("GET", "/dashboard/login", login_form, auth="none", page=True, query=LOGIN_QUERY),
    Route("POST", "/dashboard/login", login, auth="form", page=True),
    Route("GET", "/dashboard/logout", logout_page, auth="none", page=True),
    Route("POST", "/dashboard/logout", logout, auth="session", page=True),
    Route("POST", "/dashboard/mode", switch_mode, auth="session", page=True),
    Route("GET", "/dashboard/overview", overview_page, auth="session", page=True),
    Route("GET", "/dashboard/pauses", pauses_page, auth="session", page=True,
          query={"status": STATUS_QUERY, "cursor": CURSOR}),
    Route("GET", "/dashboard/pauses/<pause_id>", pause_page, auth="session", page=True),
    Route("POST", "/dashboard/pauses/<pause_id>/cancel", cancel_from_dashboard, auth="session", page=True),
    Route("GET", "/dashboard/audit", audit_log_page, auth="session", page=True, query=DASHBOARD_AUDIT_QUERY),
    Route("GET", "/dashboard/audit.csv", audit_csv, auth="session", page=True, query=DASHBOARD_AUDIT_QUERY),
    Route("GET", "/dashboard/webhooks", webhooks_page, auth="session", page=True),
    Route("POST", "/dashboard/webhooks", add_webhook_from_dashboard, auth="session", page=True),
    Route("GET", "/dashboard/webhooks/<webhook_id>", webhook_page, auth="session", page=True, query={"cursor": CURSOR}),
    Route("POST", "/dashboard/webhooks/<webhook_id>", change_webhook_from_dashboard, auth="session", page=True),
    Route("POST", "/dashboard/webhooks/<webhook_id>/deliveries/<delivery_id>/redeliver", redeliver_from_dashboard,
          auth="session", page=True),
    Route("GET", "/dashboard/operator", operator_page, auth="session", page=True, query={"cursor": CURSOR}),
    Route("POST", "/dashboard/operator/plan", change_plan_from_dashboard, auth="session", page=True),
    Route("POST", "/dashboard/operator/registration", registration_from_dashboard, auth="session", page=True),
    Route("GET", "/dashboard/keys", keys_page, auth="session", page=True),
    Route("GET", "/dashboard/keys/shown", keys_shown_page, auth="session", page=True),
    Route("POST", "/dashboard/keys/rotate", rotate_from_dashboard, auth="session", page=True),
    Route("POST", "/dashboard/password", password_from_dashboard, auth="session", page=True),
]


# A request body as sent, for a handler that must look at it before it is checked: its
# value, and check(), which gives the value if it fits the route's schema, else the 422.
UncheckedBody = collections.namedtuple("UncheckedBody", "value check")


class Handlers:
    """The Bottle plugin between each route and its handler. It hands the handler what
    its parameters name, as bottle-sqlite hands `db`: rt; caller, from the API key;
    config, the settings as the caller sees them (as_seen_by()); body, the JSON body
    checked against the route's schema as made of those (or unchecked_body, an
    UncheckedBody); query, the route's parameters, checked; client, the address and user
    agent. A refusal becomes the one JSON error shape (or a page, on pages); anything
    unexpected a logged 500."""

    name, api = "pausepoint", 2

    def __init__(self, rt):
        self.rt = rt

    def apply(self, callback, route):
        spec = route.config.get("spec")
        if spec is None:
            return callback
        wanted = set(inspect.signature(callback).parameters)
        query_validator = SchemaValidator({"type": "object", "properties": spec.query})
        # Made once for each set of settings callers do not see (the push targets their developers
        # lists leave them out of): as few as the lists that differ.
        body_schemas = {}

        def body_schema(config):
            """(schema, validator) of the route's body for a caller who sees `config`."""
            # (as_seen_by() hands back the config itself when it hides nothing: no keys to compare.)
            hidden = (frozenset(self.rt.config.keys() - config.keys())
                      if callable(spec.body) and config is not self.rt.config else frozenset())
            if hidden not in body_schemas:
                schema = spec.body(config) if callable(spec.body) else spec.body
                body_schemas[hidden] = schema, schema and SchemaValidator(schema)
            return body_schemas[hidden]

        def handler(**path):
            # A long poll that parks is served again later: it is timed once, when answered,
            # from when it was first served.
            started, answered = bottle.request.environ.get("pausepoint.started") or time.monotonic(), True
            if not spec.page:       # API keys, webhook secrets, respond links: for the caller only, kept nowhere
                bottle.response.set_header("Cache-Control", "no-store")
            # Turns and the write lock go to the address, and there to the party (see TurnOrder).
            address = (client_limited_as(), bottle.request.environ.get("pausepoint.party", ""))
            try:
                with self.rt.turns.taken(address):
                    answer = callback(**path, **self.given(spec, wanted, body_schema, query_validator))
                if isinstance(answer, bottle.HTTPResponse) and inspect.isgenerator(answer.body):
                    answer.body = self.rt.turns.each_in_turn(answer.body, address)     # a download
            except ApiError as e:
                return error_response(e, spec.page)
            except Parked:
                answered = False
                raise
            except bottle.HTTPResponse:
                raise
            except Exception as e:
                refused = write_refused(e)
                if refused:                 # the scheduler's jobs say so in the log, once
                    return error_response(write_refusal(refused, bottle.request.method, bottle.request.path), spec.page)
                self.rt.error_log.error(bottle.request.method, spec.path, e)
                return error_response(ApiError(500, "internal_error", UNEXPECTED), spec.page)
            finally:
                if self.rt.metrics is not None and answered:
                    self.rt.metrics.timed(spec.method, spec.path, started)
            if spec.status != 200:
                bottle.response.status = spec.status
            return answer
        return handler

    def given(self, spec, wanted, body_schema, query_validator):
        """What the handler's parameters name, in the order refusals should come: an
        unknown key (401) before a rate limit (429) before an unknown query parameter
        before a bad body (4xx), on every route."""
        rt, given = self.rt, {}
        if "rt" in wanted:
            given["rt"] = rt
        if "caller" in wanted:
            given["caller"] = authenticated(rt)
        config = rt.config      # as the caller sees it, where it matters: as_seen_by() takes 26 µs
        if "config" in wanted or callable(spec.body):
            config = given["config"] = as_seen_by(rt.config, given["caller"].email if "caller" in given else None)
        if spec.auth == "session":
            session = given["session"] = signed_in(rt)
        if spec.method == "POST" and spec.auth in ("session", "form"):
            form = given["form"] = read_page_form(rt.config)
            check_form_token(session.row["csrf_token"] if spec.auth == "session" else
                             rt.cookies.read(FORM_COOKIE), form)
        if spec.guard is not None:
            spec.guard(rt, given.get("caller"))
        if not spec.page:
            unknown = sorted(as_sent(name) for name in set(bottle.request.query) - set(spec.query))
            if unknown:
                raise invalid(unknown[0], f"unknown query parameter {unknown[0]!r}"
                                          + (f"; allowed: {', '.join(spec.query)}" if spec.query else "; this takes none"))
        schema, validator = body_schema(config)
        if "body" in wanted:
            given["body"] = validate_body(schema, read_json(rt.config), validator)
        if "unchecked_body" in wanted:      # checked by the handler, after what it must do first
            body = read_json(rt.config)
            given["unchecked_body"] = UncheckedBody(body, lambda: validate_body(schema, body, validator))
        # (Read only when one was sent: reading none costs a GET about 5 µs.)
        if spec.refuses_a_body and (bottle.request.content_length > 0 or "chunked" in bottle.request.environ.get(
                "HTTP_TRANSFER_ENCODING", "").lower()):
            refuse_a_body(rt.config)
        if "query" in wanted:
            given["query"] = read_query(spec.query, query_validator)
        if "client" in wanted:
            given["client"] = client_facts()
        return {name: value for name, value in given.items() if name in wanted}


def create_app(config):
    """The WSGI app for one PausePoint; app.runtime.start() starts its scheduler."""
    app = bottle.Bottle()
    rt = app.runtime = Runtime(config)
    app.install(Handlers(rt))
    # Every error Bottle makes itself, not only the usual ones: its own page for the rest
    # (static_file()'s 416 for a Range past the end, say) has none of the pages' headers.
    app.default_error_handler = bottle_error
    app.add_hook("before_request", refuse_a_path_not_utf8)
    for spec in ROUTES:
        app.route(spec.path, spec.method, spec.handler, spec=spec)
    if rt.cookies.secure:
        # Set on the answer Bottle sends, an error's or a redirect's too (it shares their headers).
        app.add_hook("after_request", lambda: bottle.response.set_header("Strict-Transport-Security", HSTS))
    if rt.metrics is not None and rt.metrics_address is None:
        app.route("/metrics", "GET", rt.metrics.page)
    return app


###############################################################################
# HTTP: answers that are errors
###############################################################################

UNEXPECTED = "something went wrong on the server; it has been logged"
BOTTLE_ERROR_CODES = {400: "bad_request", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                      413: "payload_too_large", 416: "range_not_satisfiable", 500: "internal_error"}


# What templates may call besides the values a page hands them.
TEMPLATE_HELPERS = {"urlencode": urllib.parse.urlencode,
                    "json_text": functools.partial(json_for_reading, indent=2),
                    "field_text": field_display, "form_text": form_text}


def write_refusal(why, method, path):
    """What a write the database refused (write_refused()'s `why`) answers, not a fault in the
    server: for a full disk 507, as the reserve's refusals do; for another process's write
    lock 503. Nothing of it was stored, so the same request may be sent again later; a person
    answering is told their answer was not recorded, and one opening the page (whose opening
    is recorded) that it cannot be shown."""
    respond = path.startswith(("/respond/", "/v1/respond/"))
    what = ("this question cannot be shown now" if respond and method == "GET" else
            "your answer was not recorded" if respond else "nothing was stored")
    if why == "locked":
        return ApiError(503, "database_busy", f"{what}, because the server's database is held by maintenance; try"
                                              " again in a minute", headers={"Retry-After": "60"})
    return ApiError(507, "storage_low", f"{what}, because the server's disk is full; try again in a few minutes",
                    headers={"Retry-After": "60"})


def html_page(name, status=200, headers=None, **values):
    body = bottle.template(name, template_lookup=TEMPLATE_LOOKUP, **TEMPLATE_HELPERS, **values)
    return bottle.HTTPResponse(body, status=status, headers={
        "Content-Type": "text/html; charset=utf-8", **PAGE_HEADERS, **(headers or {})})


def error_response(e, page):
    """An ApiError as the one JSON error shape, or as a page for a person."""
    if page:
        message = sentence(e.message if e.status != 500 else UNEXPECTED)
        back = "/dashboard" if bottle.request.path.startswith("/dashboard") else None
        return html_page("respond_error", status=e.status, message=message, headers=e.headers, back=back)
    # A response of its own, so the handler's Cache-Control is not on it: said again here.
    return bottle.HTTPResponse(error_body(e.status, e.code, e.message, e.field), status=e.status,
                               headers={"Content-Type": "application/json", "Cache-Control": "no-store", **e.headers})


def sentence(text):
    """'the link has expired' -> 'The link has expired.'"""
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def is_page_path(path):
    """Pages a person opens get their errors as a page; everything else as JSON. For the
    errors Bottle and waitress answer before any route is found."""
    return path.startswith(("/respond/", "/dashboard")) or path == "/"


def error_page(message, back=None):
    """The error page's HTML for a refusal whose message is not yet a sentence."""
    return bottle.template("respond_error", template_lookup=TEMPLATE_LOOKUP, message=sentence(message), back=back)


class ErrorLog:
    """Logs an unexpected error's traceback once a minute per route and kind of error,
    and counts the rest: a client that found a way to cause one must not be able to
    fill the disk by repeating it."""

    def __init__(self, every=60.0):
        self.every = every
        self.lock = threading.Lock()
        self.seen = {}                  # (method, route, error type) -> (last logged, repeats since)

    def error(self, method, route, error):
        key = (method, route, type(error).__name__)
        with self.lock:
            last, repeats = self.seen.get(key, (None, 0))
            if last is not None and time.monotonic() - last < self.every:
                self.seen[key] = (last, repeats + 1)
                return
            if len(self.seen) > 10_000:
                self.seen.clear()
            self.seen[key] = (time.monotonic(), 0)
        log.error("unexpected error on %s %s%s", method, route,
                  f" ({repeats} more like it in the last minute)" if repeats else "", exc_info=error)


def refuse_a_path_not_utf8():
    """400 for a path that is not UTF-8 once its %-escapes are decoded. Bottle drops the bytes
    that are not ('ignore'), so /v1/pause/psr_…%FF read the pause psr_…, and /v1/pause/%FF
    was "no such endpoint: GET /v1/pause/"."""
    try:
        bottle.request.environ["bottle.raw_path"].encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise bottle.HTTPError(400, "the request's path is not UTF-8 once its %-escapes are decoded") from None


def bottle_error(error):
    """Errors Bottle raises itself (no such route, wrong method…) in the same JSON shape,
    or as a page under /respond/. Serialised here by hand: a dict returned from an
    error handler is sent broken (bottle #710)."""
    message = {404: "no such endpoint", 405: "method not allowed on this endpoint",
               500: UNEXPECTED}.get(error.status_code, error.body)
    if is_page_path(bottle.request.path):
        bottle.response.content_type = "text/html; charset=utf-8"
        for name, value in PAGE_HEADERS.items():
            bottle.response.set_header(name, value)
        # A mistyped dashboard address (/dashboard/, say) still leads back to it.
        return error_page(str(message), back="/dashboard" if bottle.request.path.startswith("/dashboard") else None)
    asked = f"{bottle.request.method} {shorten(bottle.request.path, 200)}"
    if error.status_code == 404:
        # A client given a base URL ending in /v1, say, asks for /v1/v1/pause: show it what it asked for.
        message = f"no such endpoint: {asked} (every path is listed in /v1/openapi.json)"
    elif error.status_code == 405 and error.headers.get("Allow"):
        message = f"method not allowed on this endpoint: {asked}; it takes {error.headers['Allow'].replace(',', ', ')}"
    bottle.response.content_type = "application/json"
    bottle.response.set_header("Cache-Control", "no-store")
    return error_body(error.status_code, BOTTLE_ERROR_CODES.get(error.status_code, "error"), str(message))


###############################################################################
# HTTP: the OpenAPI document, built from the route table
###############################################################################

ERROR_STATUSES = {400: "Malformed JSON, or a lone surrogate in it", 401: "No valid API key (or password)",
                  403: "Not allowed on this server (registration closed, an unknown plan, a bad signature)",
                  404: "No such thing for this key", 409: "It is not in a state that allows this",
                  410: "The respond link expired", 413: "The body is over server.max_body_bytes",
                  415: "The body is not sent as application/json", 422: "A field is wrong; `field` names it",
                  429: "A quota, a rate limit or too many pending (too_many_pending); rate limits say when to"
                       " come back in Retry-After",
                  500: "A fault in the server, logged there",
                  503: "Busy (or starting, or its database held by maintenance: database_busy, nothing stored; or"
                       " stopping: stopping, the request not begun, nothing done): try again shortly, after"
                       " Retry-After when given",
                  507: "The server's disk is short of room (storage_low, database.min_free_mb): no new pauses or"
                       " accounts for now; or full, and nothing of this request was stored. Try again after"
                       " Retry-After"}


def openapi_document(config):
    """OpenAPI 3.1 for every /v1 route in ROUTES (and /healthz), with the webhooks sent."""
    paths = {}
    for route in ROUTES:
        if not route.page:
            paths.setdefault(re.sub(r"<(\w+)>", r"{\1}", route.path), {})[route.method.lower()] = operation(route, config)
    return {
        "openapi": "3.1.0",
        "info": {"title": "PausePoint", "version": VERSION,
                 "description": "Human approval for AI agents: an agent asks, a person answers, the agent learns the"
                                " outcome by webhook or by polling. Every error has the shape of Error."},
        "servers": [{"url": base_url(config)}],
        "paths": paths,
        "webhooks": {event: webhook_operation(event, config) for event in EVENT_TYPES},
        "components": {
            "schemas": {"Error": ERROR_SCHEMA, "Pause": PAUSE, "Event": EVENT},
            "securitySchemes": {"apiKey": {
                "type": "http", "scheme": "bearer",
                "description": "pp_live_… or pp_test_…; each sees only its own mode's data."}},
        },
    }


def operation(route, config):
    """One route as an OpenAPI operation."""
    summary, _, more = (route.handler.__doc__ or "").strip().partition("\n")
    found = {"operationId": route.handler.__name__, "summary": summary,
             "security": [{"apiKey": []}] if route.auth == "key" else [],
             "parameters": [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                            for name in re.findall(r"<(\w+)>", route.path)]
             + [{"name": name, "in": "query", "required": False, "schema": schema}
                for name, schema in route.query.items()],
             "responses": responses(route)}
    if route.path == "/v1/pause" and route.method == "POST":
        found["parameters"].append({"name": "Idempotency-Key", "in": "header", "required": False,
                                    "description": "Retrying with the same key and body within 24 h returns the"
                                                   " original pause (with Idempotent-Replayed: true).",
                                    "schema": {"type": "string", "pattern": "^[\\x20-\\x7e]{1,255}$"}})
    if route.auth == "twilio":
        found["parameters"].append({"name": "X-Twilio-Signature", "in": "header", "required": True,
                                    "schema": {"type": "string"}})
        found["requestBody"] = {"required": True, "content": {"application/x-www-form-urlencoded": {
            "schema": {"type": "object", "properties": {name: {"type": "string"}
                                                        for name in TWILIO_FORM_FIELDS[route.path]}}}}}
    if route.body is not None:
        schema = route.body(config) if callable(route.body) else route.body
        found["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    return found


def responses(route):
    """The success answer, the error answers this route can give, and any other as Error."""
    media = ("application/xml",) if route.auth == "twilio" else route.media
    success = {"description": "Done"}
    if route.answer is not None:
        success["content"] = {content: {"schema": route.answer} for content in media}
    # 422 on every route: each refuses query parameters it does not declare.
    possible = {422, 429} | ({401} if route.auth == "key" else set()) | ({404} if "<" in route.path else set())
    if route.body is not None:
        possible |= {400, 413, 415}
    elif route.refuses_a_body:      # any body is 422 (refuse_a_body()), past server.max_body_bytes 413
        possible |= {413}
    if route.method in ("POST", "PATCH", "DELETE") and "<" in route.path:
        possible |= {409, 410} if "respond" in route.path else {409}
    possible |= {*route.refusals, 500, 503, 507}      # any write, a read's audit event too, may find the disk full
    return {str(route.status): success, **{str(code): error_answer(code) for code in sorted(possible)}}


# Error answers that say when to come back (a quota's 429 does not: it does not clear in seconds).
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before asking again", "schema": {"type": "integer"}}}


def error_answer(code):
    answer = {"description": ERROR_STATUSES[code],
              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {**answer, "headers": RETRY_AFTER} if code in (429, 503, 507) else answer


def webhook_operation(event, config):
    """What PausePoint POSTs to an endpoint for `event`."""
    headers = [("X-PausePoint-Signature", "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<raw body>' keyed with the"
                                          " secret>; a second v1 for 24 h after the secret changes"),
               ("X-PausePoint-Event", f"{event}"), ("X-PausePoint-Event-Id", "The event's id, the same on every retry"),
               ("webhook-id", "Standard Webhooks: the event's id"),
               ("webhook-timestamp", "Standard Webhooks: the unix seconds signed"),
               ("webhook-signature", "Standard Webhooks: v1,<base64 HMAC-SHA256 of '<id>.<timestamp>.<raw body>'"
                                     " keyed with the secret's bytes (see the README)>; a second for 24 h after the"
                                     " secret changes")]
    return {"post": {
        "summary": f"{event}, signed",
        "parameters": [{"name": name, "in": "header", "required": True, "description": text,
                        "schema": {"type": "string"}} for name, text in headers],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"allOf": [
            {"$ref": "#/components/schemas/Event"},
            {"properties": {"data": TEST_EVENT_DATA if event == "webhook.test" else {"$ref": "#/components/schemas/Pause"}}}]}}}},
        "responses": {"2XX": {"description": f"Received. Anything else, or no whole answer within"
                                             f" {config['outbound.deadline_seconds']:g} s, is retried for about"
                                             f" three days."}}}}


###############################################################################
# Serving and the command line
###############################################################################

# Shedding starts when open connections pass this share of server.connection_limit
# and stops below the second, so it runs now and then, not on every loop.
SHED_ABOVE, SHED_TO = 0.9, 0.8
ACCEPTS_PER_WAKE = 256          # drain the listen backlog quickly, so a flood does not queue others behind it
# A listen queue that does not overflow under a connection flood: an overflow drops the
# SYN of whoever comes next, who then waits out TCP's one-second retry (the kernel caps
# this at net.core.somaxconn).
LISTEN_BACKLOG = 4096
# Descriptors besides client connections: at most a SQLite connection (database, WAL,
# shared memory) per thread that touches the database, the outbound sockets in use and
# kept alive, the scheduler's threads, log files and the like.
FDS_PER_THREAD, SCHEDULER_THREADS, SPARE_FDS = 3, 10, 64
WAITRESS_ERROR_CODES = {400: "bad_request", 413: "payload_too_large", 431: "headers_too_large",
                        501: "not_implemented", 503: "stopping"}
# When to ask again, told to a request refused because the server is stopping: a restart
# takes a few seconds.
STOPPING_RETRY_SECONDS = 5
# How long the loop waits for its connections during a stop, before answering the requests
# refused meanwhile (FairTaskDispatcher.refusals()).
STOP_TURN_SECONDS = 0.05


class ServerStopping(waitress.utilities.Error):
    """The answer to a request no thread had begun when the server was told to stop."""
    code, reason = 503, "Service Unavailable"
    headers = [("Retry-After", str(STOPPING_RETRY_SECONDS))]

    def __init__(self):
        super().__init__("the server is stopping and did nothing with this request; send it again in a few"
                         " seconds")


class JsonErrorTask(waitress.task.ErrorTask):
    """Errors waitress answers before the app sees the request (413 for a body over
    the limit, 431, a malformed request's 400) in the one JSON error shape."""

    def execute(self):
        error = self.request.error
        limits = self.channel.server.limits
        messages = {413: f"request bodies are limited to {limits['server.max_body_bytes']} bytes",
                    431: f"the request's headers are too large: at most {limits['server.max_header_bytes']} bytes"
                         f" in {MAX_HEADER_LINES} lines",
                    400: f"malformed HTTP request: {error.body}"}
        message = messages.get(error.code, str(error.body))
        # For headers too large to read, waitress invents the request "GET /"; the real
        # request line is in what arrived first.
        first_line = self.channel.request_start.split(b"\r\n", 1)[0].split(b" ")
        path = (first_line[1].decode("latin-1") if len(first_line) > 2 and error.code == 431
                else getattr(self.request, "path", None) or "")
        if is_page_path(path):
            body = error_page(message)
            self.response_headers.extend([("Content-Type", "text/html; charset=utf-8"), *PAGE_HEADERS.items()])
        else:
            body = error_body(error.code, WAITRESS_ERROR_CODES.get(error.code, "bad_request"), message)
            self.response_headers.append(("Content-Type", "application/json"))
        if base_url(limits).startswith("https://"):       # as the app's answers say (create_app())
            self.response_headers.append(("Strict-Transport-Security", HSTS))
        self.response_headers.extend(getattr(error, "headers", ()))
        body = body.encode()
        self.status = f"{error.code} {error.reason}"
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class ParkableTask(waitress.task.WSGITask):
    """A request that can park: a long poll that must wait calls environ['pausepoint.park'],
    answers Parked, and gives its thread back. Nothing is sent for it; its connection keeps
    the request, and HardenedChannel.resume() serves it again later, when the app's
    environ['pausepoint.wait_until'] is the deadline it parked with and
    environ['pausepoint.started'] when it was first served."""

    register = None         # set when the request parked: called with resume() once waitress is done with it

    def get_environment(self):
        environ = super().get_environment()
        environ["pausepoint.park"] = self.park
        environ["pausepoint.wait_until"] = getattr(self.request, "wait_until", None)
        environ["pausepoint.started"] = vars(self.request).setdefault("started", time.monotonic())
        environ["pausepoint.party"] = getattr(self.channel, "party", "")    # FairTaskDispatcher.add_task()
        return environ

    def park(self, wait_until, register):
        self.request.wait_until, self.register = wait_until, register
        self.channel.parked_request = self.request     # from now on nothing more is read from this client

    def write(self, data):
        if self.register is None:
            super().write(data)

    def build_response_header(self):
        # Requests pipelined behind this one are dropped once the main loop has parsed all
        # that came with it (HardenedChannel.received), and this answer may be begun before
        # then: it would keep the connection open, and their client wait on it for answers
        # that never come. The main loop holds the lock while it parses.
        with self.channel.requests_lock:
            if len(self.channel.requests) > 1:
                self.request.headers["CONNECTION"] = "close"
        return super().build_response_header()

    def finish(self):
        if self.register is None:
            super().finish()
        else:
            self.channel.register_parked = self.register


# Apache's default, and http.client's: a browser sends some twenty.
MAX_HEADER_LINES = 100


class BoundedRequestParser(waitress.parser.HTTPRequestParser):
    """waitress's request parser, refusing more than MAX_HEADER_LINES header lines with 431.
    It joins a repeated header's values by copying the whole value so far, on the main loop
    that serves every connection: 65,000 empty ones (260 KB) cost it 189 ms, 8,000 (32 KB) 19 ms."""

    def parse_header(self, header_plus):
        if header_plus.rstrip().count(b"\n") > MAX_HEADER_LINES:      # one before each header line
            super().parse_header(b"GET / HTTP/1.0\r\n")      # as waitress does for headers too large
            self.error = waitress.utilities.RequestHeaderFieldsTooLarge(f"more than {MAX_HEADER_LINES} lines")
            return
        super().parse_header(header_plus)


class HardenedChannel(waitress.channel.HTTPChannel):
    """A client connection that knows when its current request began, so the server
    can drop clients that send headers or bodies too slowly."""

    error_task_class = JsonErrorTask
    task_class = ParkableTask
    parser_class = BoundedRequestParser
    request_began = request_headers_done = output_waiting_since = 0.0
    queued = False              # a whole request waits in the dispatcher for a thread
    request_start = b""
    served = False              # has sent at least one whole request: a kept-alive client, not a trickler
    parked_request = None       # a long poll waiting without a thread (see ParkableTask)
    register_parked = None
    resumed = False             # queued for a thread by resume(), not by its client
    sent_unclocked = 0          # bytes the client has taken since its send deadline last started again

    def service(self):
        super().service()
        self.resumed = False
        register, self.register_parked = self.register_parked, None
        if register is not None:
            # Out of the main loop's map while it waits: the loop asks every connection in its
            # map whether to poll it, on every turn, and a thousand parked ones halved throughput.
            self.server.parked[self._fileno] = self
            self._map.pop(self._fileno, None)
            register(self.resume)   # only now: waitress is done with the request, so another thread may take it

    def resume(self, end_now=False):
        """Serve the parked request again (its topic changed or its time ran out); any thread.
        With end_now it answers as things stand, whatever is left of its wait."""
        with self.requests_lock:
            request, self.parked_request = self.parked_request, None
            if request is None:
                return
            if end_now:
                request.wait_until = -math.inf
            self.server.parked.pop(self._fileno, None)
            if not self.connected:
                return
            self._map[self._fileno] = self
            self.requests.insert(0, request)
            self.resumed = True
        self.server.add_task(self)

    def readable(self):
        return self.parked_request is None and super().readable()

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map=map)
        self.client = connection_client(addr[0], server.limits["server.trusted_proxy"])
        server.by_client[self.client].add(self)

    def served_for(self):
        """Whose share of worker threads serving this channel's request takes: its connection's
        client, or behind the trusted proxy the client the request is forwarded for, read as
        waitress reads it for the app; otherwise one client there could take every thread."""
        forwarded = self.requests[0].headers.get("X_FORWARDED_FOR") if self.requests else None
        if self.client != TRUSTED_PROXY or not forwarded:
            return self.client
        hop = forwarded.rsplit(",", 1)[-1].strip().strip('"')
        if hop.count(":") == 1:                     # an IPv4 address with its port
            hop = hop.partition(":")[0]
        return connection_client(client_address({"REMOTE_ADDR": hop}), self.server.limits["server.trusted_proxy"])

    def writable(self):
        # While its task runs, output the main loop could not send now is not asked about:
        # less than send_bytes (waitress leaves that for the task to add to), or any while
        # the task holds the buffer to write and send. A socket is nearly always writable,
        # so asking made the loop spin, about a hundred turns per answer of 40 KB. The task
        # pulls the trigger when it leaves output behind and when it ends.
        if self.requests and not (self.will_close or self.close_when_flushed):
            if self.total_outbufs_len < self.adj.send_bytes or not self.outbuf_lock.acquire(False):
                return False
            self.outbuf_lock.release()
        return super().writable()

    def send(self, data, do_close=True):
        sent = super().send(data, do_close=do_close)
        # A client taking a long answer slowly is still reading it: server.send_timeout counts
        # from the last SEND_PROGRESS_BYTES it took, not from when output began to wait, or
        # every answer bigger than the socket buffers that takes longer to read is cut off.
        self.sent_unclocked += sent or 0
        if self.sent_unclocked >= SEND_PROGRESS_BYTES:
            self.sent_unclocked, self.output_waiting_since = 0, time.time()
        return sent

    def received(self, data):
        before, now = self.request, time.time()
        if before is None:
            self.request_start = data[:256]     # names the path even if the headers are refused unread
        result = super().received(data)
        with self.requests_lock:
            if len(self.requests) > 1:
                # Pipelined requests: each one's answer would queue behind the last, and a
                # client that never reads would pin a thread once 16 MB are queued. Answer
                # the first and close; HTTP/1.1 clients send the rest again.
                for extra in self.requests[1:]:
                    extra.close()
                del self.requests[1:]
                self.request = None
                self.requests[0].headers["CONNECTION"] = "close"
        if self.request is not None and self.request is not before:
            self.request_began, self.request_headers_done = now, 0.0
        if self.request is not None and self.request.headers_finished and not self.request_headers_done:
            self.request_headers_done = now
        self.served = self.served or bool(self.requests)
        return result

    def send_continue(self):
        # waitress would say "100 Continue" to a request it has already refused (a body
        # over the limit, say), and then wait for the body after all.
        if self.request.error is None:
            super().send_continue()

    def del_channel(self, map=None):
        peers = self.server.by_client.get(self.client)
        if peers is not None:
            peers.discard(self)
            if not peers:
                del self.server.by_client[self.client]
        super().del_channel(map)

    def waiting(self):
        """Holding the connection without a thread serving it: idle, still sending, or with a
        whole request still waiting for a thread. A parked long poll is not: it waits for us."""
        return (not self.will_close and self.parked_request is None
                and (not self.requests or (self.queued and not self.resumed)))

    def fresh(self, now):
        """Made a moment ago, with nothing sent yet: it has had no time to."""
        return not self.served and self.request is None and now - self.creation_time < FRESH_SECONDS

    def unproductive(self, now=None):
        return self.waiting() and not self.fresh(now or time.time())

    def overdue(self, now, limits):
        if self.total_outbufs_len:
            # An answer the client is not reading: it may sit in memory or a temporary file
            # only so long. Closing also frees a thread that is waiting to write more.
            self.output_waiting_since = self.output_waiting_since or now
            if now - self.output_waiting_since > limits["server.send_timeout"]:
                return True
        else:
            self.output_waiting_since = 0.0
        if self.requests or self.parked_request is not None:
            return False                    # being served, or a long poll waiting
        if self.request is None:
            return now - self.last_activity > limits["server.idle_timeout"]
        if not self.request.headers_finished:
            return now - self.request_began > limits["server.header_timeout"]
        return now - self.request_headers_done > limits["server.body_timeout"]


BUSY_ANSWER = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
               "Connection: close\r\nContent-Length: {length}\r\n\r\n{body}")
FRESH_SECONDS = 1.0             # a new connection's grace to start sending before it counts as waiting
# What a client must take of an answer within server.send_timeout to keep its connection: a
# trickle of a segment now and then does not hold a thread that waits to write more.
SEND_PROGRESS_BYTES = 64 * 1024


def say_busy(sock):
    """Answer 503 in the one error shape, whatever was asked: a client over its address's
    share learns to come back in a second, instead of seeing a reset."""
    body = error_body(503, "busy", "this address has too many connections waiting; try again in a second")
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(BUSY_ANSWER.format(length=len(body), body=body).encode())


def drop(channel, busy=False):
    """Close a connection from the server's loop. Marking it will_close is not enough when
    the client stopped reading: the socket never turns writable, so that close would
    never run. The close runs through the loop's trigger, between polls, so no socket
    closes while the loop is still collecting which ones to poll; a thread blocked
    writing to it wakes and gives up. With `busy`, a whole request still waiting for a
    thread is answered 503 first, so its client learns to come back."""
    channel.will_close = True

    def close():
        if busy and channel.queued and not channel.total_outbufs_len:
            say_busy(channel.socket)
        channel.handle_close()
    channel.server.trigger.pull_trigger(close)


class HardenedServer(waitress.server.TcpWSGIServer):
    """waitress's server, made to hold against clients that connect and then trickle.

    waitress closes only connections that are completely silent, and stops accepting
    at its connection limit, so a few hundred connections sending a header line
    every few seconds lock everyone else out. Here every request has deadlines for
    its headers and its body, one address may hold only so many connections that are
    not being served, and near the limit the quietest such connections are closed to
    make room: under pressure, incomplete requests are dropped, not new clients."""

    channel_class = HardenedChannel

    def __init__(self, *args, limits, parked, **kwargs):
        self.limits = limits
        self.parked = parked        # fd -> channel of a parked long poll, out of the loop's map (shared by servers)
        self.by_client = collections.defaultdict(set)         # connection_client() -> its connections
        self.accept_errors_logged_at = self.full_logged_at = 0.0
        super().__init__(*args, **kwargs)

    def maintenance(self, now):
        """Runs every second (cleanup_interval): close connections past a deadline, and an
        address's quietest waiting connections beyond its share, counting the ones that
        arrived together in a burst now that their grace to start sending is over."""
        for channel in list(self.active_channels.values()):
            if channel.overdue(now, self.limits):
                drop(channel)
        share = self.limits["server.connections_per_ip"]
        for client, peers in list(self.by_client.items()):
            if len(peers) > share and client != TRUSTED_PROXY:
                waiting = [channel for channel in peers if channel.unproductive(now)]
                for channel in heapq.nsmallest(len(waiting) - share, waiting, key=lambda c: c.last_activity):
                    drop(channel, busy=True)

    def readable(self):
        """Whether to accept now. Like waitress's, but it sheds before the limit is reached,
        and says that the limit was reached at most once a minute, not on every swing."""
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        if not self.accepting:
            return False
        connections = self.connections()
        if connections > self.adj.connection_limit * SHED_ABOVE:
            self.shed(connections - int(self.adj.connection_limit * SHED_TO))
        full = connections >= self.adj.connection_limit
        if full and time.monotonic() - self.full_logged_at > 60:
            self.full_logged_at = time.monotonic()
            log.warning("server.connection_limit (%d) reached: new connections wait until some close",
                        self.adj.connection_limit)
        return not full

    def connections(self):
        """Open sockets, as waitress counts them (its own too), parked long polls included."""
        return len(self._map) + len(self.parked)

    def shed(self, count):
        """Close the `count` unproductive connections that have been quiet longest."""
        candidates = [channel for channel in self.active_channels.values() if channel.unproductive()]
        for channel in heapq.nsmallest(count, candidates, key=lambda channel: channel.last_activity):
            drop(channel)

    def handle_accept(self):
        counted = {}
        for _ in range(min(ACCEPTS_PER_WAKE, self.adj.connection_limit - self.connections())):
            try:
                pair = self.accept()
            except OSError as e:            # EMFILE and the like: the descriptor budget is spent
                if time.monotonic() - self.accept_errors_logged_at > 60:
                    self.accept_errors_logged_at = time.monotonic()
                    log.warning("cannot accept connections: %s (see server.connection_limit)", e)
                return
            if pair is None:
                return
            sock, addr = pair
            try:
                self.set_socket_options(sock)
            except OSError:
                sock.close()
                continue
            addr = self.fix_addr(addr)
            if not self.room_for(connection_client(addr[0], self.limits["server.trusted_proxy"]), counted):
                say_busy(sock)          # cheaper than a channel: this address holds its share already
                sock.close()
                continue
            self.channel_class(self, sock, addr, self.adj, map=self._map)

    def room_for(self, client, counted):
        """Whether `client` (a connection_client()) may open another connection: it holds
        fewer than server.connections_per_ip that no thread serves (counting only a second
        share of ones too new to have sent anything), or one of those is a kept-alive
        client's idle connection, which is closed to make room. A client whose connections
        are all unfinished requests waits for their deadlines. `counted` keeps each client's
        counts for one round of accepts, so a flood costs one look at its connections a
        round, not one a connection."""
        if client == TRUSTED_PROXY:
            return True
        now, share = time.time(), self.limits["server.connections_per_ip"]
        if client not in counted:
            waiting = [channel for channel in self.by_client.get(client, ()) if channel.waiting()]
            counted[client] = [len(waiting), sum(not channel.fresh(now) for channel in waiting)]
        waiting, settled = counted[client]
        # A burst of new connections may take a second share for a second; no more.
        if waiting < 2 * share and settled < share:
            counted[client][0] += 1
            return True
        idle = [channel for channel in self.by_client.get(client, ())
                if channel.waiting() and channel.served and channel.request is None and not channel.requests]
        if not idle:
            return False
        drop(min(idle, key=lambda channel: channel.last_activity))
        return True


class Vouched:
    """The API keys and sign-ins this server has lately found good (their digests, the `most`
    recently used), so that the HTTP front, which checks nothing, can tell a tenant's requests
    from made-up credentials: each made-up key would otherwise be a party of its own and take
    a turn of its own (FairTaskDispatcher.party()). A key that fails (rotated since, say) is
    forgotten at once."""

    def __init__(self, most=4096):
        self.most, self.digests, self.lock = most, collections.OrderedDict(), threading.Lock()

    def found(self, credential, good):
        """Say that `credential` (an API key, a sign-in token) was just found good or not."""
        digest = key_digest(credential)
        with self.lock:
            if not good:
                self.digests.pop(digest, None)
                return
            self.digests[digest] = True
            self.digests.move_to_end(digest)
            if len(self.digests) > self.most:
                self.digests.popitem(last=False)

    def __contains__(self, credential):
        with self.lock:
            return key_digest(credential) in self.digests


class FairTaskDispatcher(waitress.task.ThreadedTaskDispatcher):
    """waitress's worker threads, shared out by client (connection_client()). Waiting
    requests are taken one client at a time, and one client holds at most `per_address`
    threads (as many as long polls may take), so one sending many requests waits for its
    own turn while everyone else's requests keep being taken. Behind the trusted proxy a
    request counts as the client it is forwarded for (HardenedChannel.served_for); the
    proxy's own, forwarded for no one, are exempt. Within a client's turns, the parties its
    requests come from (the API key or sign-in each carries: several tenants' agents on one
    host, say) take turns too, so one tenant flooding from a shared address delays another
    there by a request at most, not by its whole queue."""

    def __init__(self, per_address, wake_waiters=lambda: None, thread_started=lambda: None,
                 after_task=lambda: None, vouched=None):
        super().__init__()
        self.per_address = per_address
        self.vouched = Vouched() if vouched is None else vouched      # the app's: see party()
        self.wake_waiters = wake_waiters              # at shutdown, so parked long polls get their answer
        self.thread_started = thread_started          # on each worker thread, before its first channel
        self.after_task = after_task                  # on the thread, once it has served a channel
        # client -> party -> its channels with a request; each order is turn order
        self.waiting = collections.OrderedDict()
        self.running = collections.Counter()        # client -> threads serving it now
        self.queued = 0                             # channels in `waiting`, all addresses together
        self.stopping = False                       # no request is begun but a woken long poll's
        self.refusing = []                          # channels for the loop to answer 503 (run_until_stopped())

    def party(self, headers):
        """Whom a request with these headers is on behalf of, as far as they say before anything
        is checked: the API key or sign-in it carries, read as the app reads them, once the app
        has found it good (Vouched); a request with none, or with one made up, is on behalf of
        nobody in particular. Not the headers as written: one key spelt anew each time (the
        scheme's case, the spaces before it), or one sign-in sent with other cookies that
        change, would be a party a request; nor any credential sent: made-up keys would be."""
        key = bearer_key(headers.get("AUTHORIZATION"))
        if key:
            return "key:" + key if key in self.vouched else ""
        cookies = headers.get("COOKIE")
        sign_in = cookies and next(filter(None, (cookie_token(cookies, name) for name in SESSION_COOKIE_NAMES)), None)
        return "sign-in:" + sign_in if sign_in and sign_in in self.vouched else ""

    def _queue(self, client, channel, first=False):
        """Put a channel in its client's and party's queue: last, or `first` (given back)."""
        parties = self.waiting.setdefault(client, collections.OrderedDict())
        channels = parties.setdefault(channel.party, collections.deque())
        channels.appendleft(channel) if first else channels.append(channel)
        channel.queued = True
        self.queued += 1
        if first:
            parties.move_to_end(channel.party, last=False)
            self.waiting.move_to_end(client, last=False)

    def _unqueue(self, client, channel):
        """Take a queued channel out to serve; its party's and client's next wait for the others' turns."""
        self._dequeue(client, channel)
        self.running[client] += 1
        return client, channel

    def _dequeue(self, client, channel):
        parties = self.waiting[client]
        channels = parties[channel.party]
        channels.remove(channel)
        if channels:
            parties.move_to_end(channel.party)
        else:
            del parties[channel.party]
        if parties:
            self.waiting.move_to_end(client)
        else:
            del self.waiting[client]
        channel.queued = False
        self.queued -= 1

    def add_task(self, channel):
        with self.lock:
            if self.stopping and not channel.resumed:
                self.refusing.append(channel)
                return
            channel.party = self.party(channel.requests[0].headers)
            self._queue(channel.served_for(), channel)
            self.queue_cv.notify()
            idle = len(self.threads) - self.stop_count - self.active_count
            if self.queued > idle:
                self.queue_logger.warning("Task queue depth is %d", self.queued - idle)

    def _take(self):
        """The next channel to serve: of the first client in turn that has a thread to spare,
        its first party's first."""
        for client, parties in self.waiting.items():
            if client == TRUSTED_PROXY or self.running[client] < self.per_address:
                return self._unqueue(client, next(iter(parties.values()))[0])
        return None

    def handler_thread(self, thread_no):
        self.thread_started()
        while True:
            with self.lock:
                while (taken := self._take()) is None and self.stop_count == 0:
                    self.active_count -= 1
                    self.queue_cv.wait()
                    self.active_count += 1
                # Stopping: the parked long polls woken to answer how things stand are still
                # served, wherever they queue; other requests are the loop's to refuse (shutdown()).
                if self.stop_count > 0 and not (taken is not None and taken[1].resumed):
                    if taken is not None:
                        self._give_back(*taken)
                    taken = self._take_resumed()
                if self.stop_count > 0 and taken is None:
                    self.active_count -= 1
                    self.stop_count -= 1
                    self.threads.discard(thread_no)
                    self.thread_exit_cv.notify()
                    break
            client, channel = taken
            try:
                channel.service()
            except BaseException:
                self.logger.exception("Exception when servicing %r", channel)
            finally:
                self.after_task()
                with self.lock:
                    self.running[client] -= 1
                    self.running += collections.Counter()
                    self.queue_cv.notify()          # the client's next request may run now

    def _take_resumed(self):
        """A woken long poll from anywhere in the queue, or None."""
        for client, parties in self.waiting.items():
            for channels in parties.values():
                for channel in channels:
                    if channel.resumed:
                        return self._unqueue(client, channel)
        return None

    def _give_back(self, client, channel):
        self.running[client] -= 1
        self.running += collections.Counter()
        self._queue(client, channel, first=True)

    def shutdown(self, cancel_pending=True, timeout=5):
        """Let the requests in flight finish and the waiting agents have their answer, and
        refuse every other request, queued or still to come, at once: it waits for no thread
        to free. Each refused channel is handed to the server's loop (refusals()), which
        answers it 503 stopping: a client whose connection closed unanswered could not tell
        whether its request was done."""
        with self.lock:
            self.stopping = True
        # Here, not in the signal handler: that runs on the main thread, which may be inside
        # add_task() holding self.lock, and waking a waiter takes it.
        self.wake_waiters()
        with self.lock:
            self._refuse_queued(keep=lambda channel: channel.resumed)
        done = super().shutdown(cancel_pending, timeout)
        if cancel_pending:
            with self.lock:
                self._refuse_queued()
        return done

    def _refuse_queued(self, keep=lambda channel: False):
        """Hand the queued channels but those `keep` keeps to the loop to refuse."""
        for client, parties in list(self.waiting.items()):
            for channels in list(parties.values()):
                for channel in [channel for channel in channels if not keep(channel)]:
                    self._dequeue(client, channel)
                    self.refusing.append(channel)

    def refusals(self):
        """The channels refused since last asked, each with a whole request no thread will serve."""
        with self.lock:
            refusing, self.refusing = self.refusing, []
        return refusing


class QueueDepthSummary(logging.Filter):
    """waitress warns "Task queue depth is N" for every request that finds no idle
    thread: a thousand lines a second under load. Let one line a minute through,
    saying how often it happened and the deepest queue seen."""

    def __init__(self, every=60.0):
        super().__init__()
        self.every = every
        self.lock = threading.Lock()
        self.count, self.deepest, self.since, self.let_through_at = 0, 0, time.monotonic(), None

    def filter(self, record):
        with self.lock:
            now = time.monotonic()
            self.count += 1
            self.deepest = max(self.deepest, record.args[0] if record.args else 0)
            if self.let_through_at is not None and now - self.let_through_at < self.every:
                return False
            record.msg = ("requests waited for a free thread %d times in %d s (deepest queue %d);"
                          " if this persists, raise server.threads or put a buffering proxy in front")
            record.args = (self.count, max(1, round(now - self.since)), self.deepest)
            self.count, self.deepest, self.since, self.let_through_at = 0, 0, now, now
            return True


def refuse(channel):
    """Answer a channel's request 503 stopping (ServerStopping) and close its connection. Not
    on the loop while it reads: that holds the channel's requests_lock, which this takes."""
    with channel.requests_lock:
        if not channel.requests:
            return
        channel.requests[0].error = ServerStopping()
    channel.service()


class SignalWakeUp(waitress.wasyncore.dispatcher):
    """One end of a socket pair in the loop's map, Python writing a byte to the other as each
    signal arrives (signal.set_wakeup_fd()): the loop's poll ends at once on SIGTERM, and the
    loop sees that it is to stop. A signal handler raising out of the loop instead (as
    waitress's does) lands wherever the loop is: inside reading a request, say, which was
    then lost, its client answered nothing."""

    def __init__(self, connections):
        reader, self.writer = socket.socketpair()
        for end in (reader, self.writer):
            end.setblocking(False)
        super().__init__(reader, map=connections)
        self.previous = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)

    def writable(self):
        return False

    def handle_read(self):
        with contextlib.suppress(OSError):
            self.socket.recv(4096)

    def close(self):
        signal.set_wakeup_fd(self.previous)
        super().close()
        self.writer.close()


def run_until_stopped(server, stopped):
    """Serve until `stopped()` (SIGTERM or SIGINT, serve()), then go on serving while the stop
    is under way (see FairTaskDispatcher.shutdown), on this thread: the requests in flight
    finish and the waiting agents get their answer on the worker threads, while this loop
    answers every other request, queued or arriving, 503 stopping, so none is closed
    unanswered. Once the threads are done the listening sockets close: a client connecting
    after that is refused the connection, which says as plainly that nothing was done."""
    connections = server._map if isinstance(server, HardenedServer) else server.map
    loop = functools.partial(server.asyncore.loop, map=connections, use_poll=True)
    with contextlib.closing(SignalWakeUp(connections)):
        while not stopped():
            loop(timeout=server.adj.asyncore_loop_timeout, count=1)
    stopping = threading.Thread(target=server.task_dispatcher.shutdown, name="stop")
    stopping.start()
    turn = functools.partial(stopping_turn, loop, server.task_dispatcher)
    while True:
        threads_done = not stopping.is_alive()
        turn()
        if threads_done:        # after one more turn, for what the last ones handed over
            break
    listening = [each for each in list(connections.values()) if isinstance(each, HardenedServer)]
    for each in listening:
        each.close()
    send_answers_left(turn, connections, listening[0].limits["server.send_timeout"])


def stopping_turn(loop, dispatcher):
    """One turn of the loop while the server stops, then a 503 stopping to each request
    refused meanwhile (on a kept-alive connection too)."""
    loop(timeout=STOP_TURN_SECONDS, count=1)
    for channel in dispatcher.refusals():
        refuse(channel)


def send_answers_left(turn, connections, seconds):
    """Go on with the stop's turns, `seconds` at most, until every answer the threads wrote,
    and every 503 stopping, is sent. A thread is done with an answer once it is in its
    connection's buffer, up to 16 MB of it, which the loop sends as the client reads: the
    process ending first cut a download short, or left a refusal written in the last turn unsent."""
    def unsent(each):       # (a request still on a thread the stop gave up waiting for is not waited for here)
        return getattr(each, "total_outbufs_len", 0) and not each.requests

    until = time.monotonic() + seconds
    while time.monotonic() < until and any(unsent(each) for each in list(connections.values())):
        turn()


def fitted_connection_limit(config):
    """server.connection_limit, after raising the process's open-file limit to fit it
    and the threads' SQLite files; lowered, with a warning, when the hard limit is lower.
    Running out of descriptors would make accept() fail on every loop."""
    threads = config["server.threads"] + config["outbound.workers"] + SCHEDULER_THREADS
    others = threads * FDS_PER_THREAD + config["outbound.workers"] + KEPT_ALIVE_SOCKETS + SPARE_FDS
    wanted = config["server.connection_limit"] + others
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    room = config["server.connection_limit"] if soft == resource.RLIM_INFINITY else soft - others
    if room < config["server.connection_limit"]:
        log.warning("the open-file limit (%s) leaves room for %d connections, not server.connection_limit = %d;"
                    " raise it (ulimit -n, LimitNOFILE=, docker --ulimit nofile=) or lower the setting",
                    soft, max(room, 32), config["server.connection_limit"])
    return max(min(room, config["server.connection_limit"]), 32)


def make_server(app, config, port=None):
    """A waitress server for the app, not yet running (port=0 picks a free one)."""
    options = dict(host=config["server.host"], port=config["server.port"] if port is None else port,
                   threads=config["server.threads"], ident=f"PausePoint/{VERSION}",
                   connection_limit=fitted_connection_limit(config),
                   # poll() instead of select(), which fails outright on a descriptor above 1023.
                   asyncore_use_poll=True,
                   channel_timeout=config["server.idle_timeout"], cleanup_interval=1,
                   # Refused from the Content-Length (or the chunked size so far), before upload.
                   max_request_body_size=config["server.max_body_bytes"] + 1,
                   max_request_header_size=config["server.max_header_bytes"] + 1,
                   # A reset from each of a flood of clients would log a traceback apiece.
                   log_socket_errors=False, backlog=LISTEN_BACKLOG)
    if config["server.trusted_proxy"]:
        options.update(trusted_proxy=config["server.trusted_proxy"],
                       trusted_proxy_headers={"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
    cannot_listen = cannot_listen_on(options["host"], options["port"])
    try:
        adjustments = waitress.adjustments.Adjustments(**options)
    except ValueError as e:     # a name that could not be looked up: waitress's own words
        raise ConfigError(f"{cannot_listen}: {e}") from None
    # Parked long polls hold connections that are never shed to make room: at most half of
    # them, so the respond page still opens for the people they wait on.
    app.runtime.waiting.limit = min(config["server.waiting_limit"], adjustments.connection_limit // 2)
    if app.runtime.waiting.limit < config["server.waiting_limit"]:
        log.warning("server.waiting_limit lowered to %d, half the connections there is room for",
                    app.runtime.waiting.limit)
    dispatcher = FairTaskDispatcher(config["server.threads"] - THREADS_KEPT_FOR_OTHER_REQUESTS,
                                    app.runtime.wake_waiters,
                                    app.runtime.serves_requests, app.runtime.give_back_db, app.runtime.vouched)
    dispatcher.set_thread_count(adjustments.threads)
    queue_log = logging.getLogger("waitress.queue")
    if not any(isinstance(f, QueueDepthSummary) for f in queue_log.filters):
        queue_log.addFilter(QueueDepthSummary())
    shared_map, parked = {}, {}
    try:
        servers = [HardenedServer(app, shared_map, dispatcher=dispatcher, adj=adjustments, sockinfo=info,
                                  limits=config, parked=parked)
                   for info in adjustments.listen]
    except OSError as e:
        raise ConfigError(f"{cannot_listen}: {e.strerror}") from None
    if len(servers) == 1:
        return servers[0]
    return waitress.server.MultiSocketServer(shared_map, adjustments,
                                             [(s.effective_host, s.effective_port) for s in servers],
                                             dispatcher, servers[0].log_info)


def start_up_warnings(config):
    """Settings that work, but likely not as the operator meant."""
    if not config["server.base_url"] and config["server.host"] not in ("127.0.0.1", "localhost", "::1"):
        yield (f"server.base_url is not set: respond links will say {base_url(config)}, which humans elsewhere"
               " cannot open")
    elif not config["server.base_url"]:
        # Listening on loopback is right behind a proxy, but the links sent must then name the proxy.
        sending = [name for name, channel in channels(config).items()
                   if channel.send is not None and not channel.missing_settings(config)]
        if sending:
            yield (f"server.base_url is not set: live {', '.join(sending)} messages will carry respond links to"
                   f" {base_url(config)}, which only this machine can open; set it to the address people's"
                   " phones reach")
    if config["webhooks.per_endpoint"] > config["outbound.per_developer"]:
        yield (f"webhooks.per_endpoint = {config['webhooks.per_endpoint']} is more than outbound.per_developer ="
               f" {config['outbound.per_developer']}: at most {config['outbound.per_developer']} deliveries to one"
               " endpoint run at once")


def stored_state_warnings(conn, config):
    """What the database holds that the config does not say, where the operator should know."""
    is_open, source = registration_open(conn, config)
    if source == "dashboard" and is_open != config["registration.open"]:
        row = query_db(conn, "SELECT changed_by, changed_at FROM server_settings WHERE key = 'registration.open'",
                       one=True)
        yield (f"registration.open is {str(config['registration.open']).lower()} in the config, but the switch on the"
               f" dashboard's operator page ({row['changed_by']}, {api_time(row['changed_at'])}) has registration"
               f" {'open' if is_open else 'closed'}, and the switch wins: change it there (/dashboard/operator),"
               " not in the config")
    yield from push_target_warnings(conn, config, is_open)
    unconfigured = query_db(conn, "SELECT plan, count(*) AS developers FROM developers GROUP BY plan")
    unconfigured = [row for row in unconfigured if row["plan"] not in plans(config)]
    if unconfigured:
        named = ", ".join(f"{row['plan']} ({row['developers']} developer{'s' * (row['developers'] != 1)})"
                          for row in unconfigured)
        yield (f"developers are on plans this config does not define: {named}. Their live pauses get 403"
               " unknown_plan until the config defines each again (plans.<name>.monthly_pauses) or set-plan"
               " moves them to a plan it does")
    if not config["webhooks.allow_private"]:
        endpoints, developers = conn.execute(
            "SELECT count(*), count(DISTINCT developer_id) FROM webhooks WHERE livemode = 1 AND deleted_at IS NULL"
            " AND url LIKE 'http://%'").fetchone()
        if endpoints:
            yield (f"{endpoints} live webhook endpoint{'s' * (endpoints != 1)} (of {developers}"
                   f" developer{'s' * (developers != 1)}) {'have' if endpoints != 1 else 'has'} an http:// URL, made"
                   " before live endpoints had to be https://: nothing is sent to them, since their events carry"
                   " respond links, until each is changed to https:// (or webhooks.allow_private is set, for"
                   " receivers on your own network); their deliveries are retried meanwhile, and an endpoint failing"
                   " for three days is disabled")


def push_target_warnings(conn, config, registration_is_open):
    """Push targets anyone who registers may use, or no one may (an empty list, as an empty
    variable makes one), and developers lists naming an email no account has: a typo there
    locks out the developer meant, and lets in whoever takes it."""
    targets = [name for name, channel in channels(config).items() if channel.kind == "apprise"]
    for name in targets:
        listed = config.get(f"channels.{name}.developers")
        if listed is None and registration_is_open:
            yield (f"push target {name!r} has no developers list, and registration is open: anyone who registers may"
                   " send questions to it, and links of their choosing with them; list who may use it"
                   f' ([channels.{name}] developers = ["you@example.com"], or ["*"] for every developer)')
        if listed == []:
            yield (f"channels.{name}.developers is empty: no developer may use push target {name!r}; list who may"
                   ' (developers = ["you@example.com"]), or ["*"] for every developer')
        unheld = [email for email in listed or () if email != "*"
                  and not conn.execute("SELECT 1 FROM developers WHERE email = ?", (email,)).fetchone()]
        if unheld:
            yield (f"channels.{name}.developers lists {', '.join(unheld)}, which no developer's account has: the"
                   " developer meant cannot use the target"
                   + (", and whoever registers with that email can" if registration_is_open else ""))


def cannot_listen_on(host, port):
    return f"cannot listen on {host}:{port} (server.host, server.port)"


def refuse_a_port_taken(config):
    """The ConfigError make_server() would give for server.host and server.port, found by binding
    each address as waitress does and letting it go: before a start makes, locks or migrates a
    database, then fails all the same (another server, of an older release say, on the port)."""
    host, port = config["server.host"], config["server.port"]
    try:
        addresses = waitress.adjustments.Adjustments(host=host, port=port).listen
    except ValueError as e:     # a name that could not be looked up: waitress's own words
        raise ConfigError(f"{cannot_listen_on(host, port)}: {e}") from None
    for family, kind, protocol, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                raise ConfigError(f"{cannot_listen_on(host, port)}: {e.strerror}") from None


def serve(config):
    fewer_malloc_arenas()
    refuse_a_port_taken(config)
    lock = only_server(config["database.path"])     # before anything reads or migrates the database
    refuse_before_opening(config["database.path"])
    refuse_a_database_gone(config["database.path"])
    # Looked for before this process opens the database: closing a connection would let go of its locks.
    open_elsewhere = locked_by_another(os.path.realpath(config["database.path"]), SQLITE_OPEN_BYTES)
    refuse_to_upgrade_under_a_server(config["database.path"], check_database(config["database.path"]),
                                     open_elsewhere, "then start this version's server again")
    refuse_if_mixed_with_another_wal(config["database.path"])
    app = create_app(config)
    server = make_server(app, config)
    lapse_claims_of_a_stopped_server(app.runtime.db())
    app.runtime.start()

    def stop(signum, frame):
        # The loop, woken (SignalWakeUp), then shuts the threads down (run_until_stopped()),
        # first waking long-polling agents, who answer at once from now on, and refusing every
        # request not yet begun. A second signal meanwhile changes nothing.
        app.runtime.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("PausePoint %s listening on %s, public URL %s (database %s)%s", VERSION, listening_on(server),
             base_url(config), config["database.path"], metrics_at(app.runtime))
    with contextlib.closing(connect(config["database.path"])) as conn:
        stored = list(stored_state_warnings(conn, config))
    for warning in [*start_up_warnings(config), *stored]:
        log.warning(warning)
    try:
        # Returns after SIGTERM/SIGINT, once in-flight requests finished.
        run_until_stopped(server, lambda: app.runtime.stopping)
    finally:
        app.runtime.stop()
        lock.close()            # only now may another server start on the database
        log.info("PausePoint stopped")


def listening_on(server):
    """Where the server listens, as host:port (a name may give more than one address): with
    server.base_url set, respond links name the proxy instead, and say nothing of it."""
    addresses = getattr(server, "effective_listen", None) or [(server.effective_host, server.effective_port)]
    return ", ".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in addresses)


def only_server(database_path):
    """The lock that makes this the one server on its database, held by the open file it
    returns until the process ends (a crash or kill -9 too). Two would each wake only their
    own long polls, hold their own limits, and apply their own settings to work the other
    made; the database keeps a decision from being taken twice, not those. Beside the file
    itself, so another name for it (a symbolic link) finds the same lock."""
    path = server_lock_path(database_path)
    try:
        held = open_lock_file(path, database_path)
    except OSError as e:
        raise ConfigError(f"cannot use the database {database_path}: cannot make {path} beside it ({e.strerror});"
                          " does its directory exist, and may this user write there?") from None
    # A command checking whether a server runs (server_running()) holds the lock for an instant:
    # only a lock still held after a second is another server's.
    for _ in range(ONLY_SERVER_TRIES):
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return held
        except BlockingIOError:
            time.sleep(1 / ONLY_SERVER_TRIES)
    held.close()
    raise ConfigError(f"another PausePoint server is running on {database_path}: stop it first, or give this one"
                      " a database of its own")


ONLY_SERVER_TRIES = 20


def server_lock_path(database_path):
    return os.path.realpath(database_path) + ".server.lock"


def server_running(database_path):
    """Whether a server holds the database's lock (see only_server()); None where its lock
    file cannot be read to tell. The lock is tried, shared, and let go at once (a server
    starting in that instant waits for it)."""
    try:
        fd = os.open(server_lock_path(database_path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False            # no server ever ran on it
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)            # which lets go of the lock, if it was had
    return False


def refuse_to_upgrade_under_a_server(database_path, applied, open_elsewhere, then):
    """A newer PausePoint would upgrade the schema under an older server still serving: which
    then writes on, by tables it does not know, what the newer one misreads, as a start refuses
    to (applied_schema()). So would its command, run before its server was restarted (`git
    pull`, then set-plan), and so would its start while the older server still runs, if that
    one is from before the server lock (only_server()), which it holds none of: but its
    connections hold SQLite's lock on the file (`open_elsewhere`, locked_by_another()'s answer,
    or for a command also whether a server holds the lock). `then` ends the advice."""
    if applied is None or applied >= MIGRATIONS[-1][0]:
        return
    if not open_elsewhere:
        return
    raise ConfigError(f"{database_path} has schema {applied}, older than this PausePoint's {MIGRATIONS[-1][0]},"
                      " and another process has it open, most likely an earlier version's server: stop it, take"
                      f" a backup, {then}")


def say_a_running_server_may_not_know(database_path, plan):
    """A server reads its config once, as it starts: a plan added to it since is one the server
    does not know, and moving a developer to it gets their live pauses 403 unknown_plan."""
    running = plan != "free" and server_running(database_path)        # free is always defined
    if running is False:
        return
    server = (f"a server is running on {database_path}" if running else
              f"a server may be running on {database_path} (its lock file cannot be read to tell)")
    print(f"pausepoint: {server}, with the config it read when it started: if plan {plan!r} was added since,"
          " restart the server, or this developer's live pauses get 403 unknown_plan until then", file=sys.stderr)


# glibc's mallopt() option for the most arenas it makes.
M_ARENA_MAX = -8


def fewer_malloc_arenas():
    """glibc gives threads that allocate at once arenas of their own, up to eight per core,
    and each keeps what was freed in it: the server's 64 request threads held 8 MB more
    after a load than with two (102 MB against 94). Set before the threads start, unless
    the operator chose (MALLOC_ARENA_MAX, or glibc.malloc.arena_max in GLIBC_TUNABLES); a
    libc without the option (musl) has no such arenas."""
    if os.environ.get("MALLOC_ARENA_MAX") or "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 2)      # the C library this process runs on
    except (OSError, AttributeError, TypeError):
        pass


def backup(config, destination):
    """An online copy of the database through SQLite's backup API, safe while the server runs,
    and of its signing keys; returns whether there were keys to copy. Written beside
    `destination` and linked there once whole: a failed backup (a full disk, say) leaves
    nothing behind under that name to be taken for a backup, or to refuse the next."""
    if not destination or os.path.isdir(destination):
        raise ConfigError(f"name a new file to write the backup to, not {destination!r}")
    keys, keys_copy = signing_keys_path(config["database.path"]), signing_keys_path(destination)
    for taken in (destination, keys_copy):
        if os.path.lexists(taken):
            raise ConfigError(f"{taken} already exists; choose a new file name")
    directory = os.path.dirname(os.path.abspath(destination))
    try:
        fd, partial = tempfile.mkstemp(dir=directory, prefix=".backup-")
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"cannot write {destination}: the directory {directory} does not exist; make it first,"
                          " or name a file in one that does") from None
    except OSError as e:
        raise ConfigError(f"cannot write {destination}: {e.strerror}") from None
    take_owner(fd, destination)     # the directory's owner, as its keys beside it
    os.close(fd)
    try:
        copy_database(config["database.path"], partial)
        # Its keys before its name, checked against the copy: a backup by that name has them,
        # whenever the command is stopped (a kill, a power cut) or fails.
        copied_keys = backup_signing_keys(keys, keys_copy, partial)
        try:
            os.link(partial, destination)
        except BaseException:           # (Ctrl-C too)
            if copied_keys:
                os.unlink(keys_copy)
            raise
        sync_directory(destination)
        return copied_keys
    except (sqlite3.Error, OSError) as e:
        raise ConfigError(f"the backup to {destination} failed: {e}") from None
    finally:
        for leftover in (partial, partial + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def copy_database(path, partial):
    """The database at `path` copied into the file `partial`, through SQLite's backup API."""
    source, target = connect(path), sqlite3.connect(partial)
    try:
        with target:
            source.backup(target)
    finally:
        target.close()
        source.close()


def backup_signing_keys(keys, keys_copy, copy):
    """Copy the signing keys to `keys_copy`, beside the backup, and check them as a start on
    the database's `copy` would: they must be whole and hold the key of its latest receipt.
    Returns False for a database with neither keys nor receipts (create-developer before the
    first start)."""
    if not os.path.exists(keys):
        if latest_receipt_kid(copy):
            raise ConfigError(f"the signing keys beside the database ({keys}) are missing, and it holds receipts"
                              " signed with them: restore them from a backup first")
        return False
    try:
        with open(keys, encoding="utf-8") as f:
            write_signing_keys(keys_copy, json.load(f)["keys"], replace=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"the backup's signing keys could not be copied from {keys}: {e}") from None
    try:
        Signer(keys_copy, functools.partial(latest_receipt_kid, copy)).helper.shutdown()
    except BaseException as e:
        os.unlink(keys_copy)
        if isinstance(e, ConfigError):
            raise ConfigError(f"the backup would not start with {keys}: {str(e).replace(keys_copy, 'them')}") from None
        raise
    return True


def restore(config, source):
    """Put the backup at `source` in the database's place, with no server on it (its lock is
    held meanwhile, so none starts). Returns (the name the database it replaced is kept under,
    or None where there was none; whether the backup's keys were put in place; the pauses it
    reopens, decided_since_the_backup(), each with what the restore did; the file listing them,
    or None)."""
    database = config["database.path"]
    real = os.path.realpath(database)
    if os.path.isdir(real):
        raise ConfigError(f"cannot use the database {database}: it is a directory: name the database file in it")
    if not os.path.isfile(source):
        raise ConfigError(f"there is no backup at {source}: name a file the backup command wrote")
    if os.path.exists(real) and os.path.samefile(source, real):
        raise ConfigError(f"{source} is the database itself: name a backup of it")
    running = server_running(database)
    if running is not False:
        raise ConfigError((f"a server is running on {database}" if running else f"whether a server runs on {database}"
                           f" cannot be told ({server_lock_path(database)} cannot be read)")
                          + ": stop it first (run this as the user the server runs as); a backup put under a running"
                          " server is mixed with what it writes")
    with contextlib.closing(only_server(database)):
        if locked_by_another(real, SQLITE_OPEN_BYTES):
            raise ConfigError(f"another process has {database} open (a command, or a server of a version from before"
                              " the lock that refuses a second server): stop it first")
        fd, copy = tempfile.mkstemp(dir=os.path.dirname(real), prefix=".restore-")
        try:
            take_owner(fd, real)
            os.close(fd)
            return replace_with_copy(config, source, copy)
        finally:
            for leftover in (copy, *(copy + suffix for suffix in BESIDE_A_DATABASE)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)


def replace_with_copy(config, source, copy):
    """restore()'s work, the server's lock held: the backup copied whole into `copy`, beside
    the database, and checked (and the pauses it reopens cancelled) before it takes the
    database's name, so a copy cut short (a full disk) or a damaged backup never does. The
    database it replaces, with its -wal (an unclean stop's last writes) and its keys, is kept
    under a name of its own (put back, should the restore fail before the copy takes its name);
    its -shm goes, which SQLite would otherwise read into the copy."""
    database = config["database.path"]
    try:
        copy_backup(source, copy)
        checked_backup(copy, source)
        keys = restored_keys(database, source, copy)
        reopened = decided_since_the_backup(database, copy)
        known = isinstance(reopened, list) and reopened         # not the error that kept them from being told
        if known:
            cancelled = cancel_reopened(config, copy, reopened, signing_keys_path(source if keys else database))
            reopened = [(*pause, "cancelled" if pause[0] in cancelled else "times out") for pause in reopened]
    except (sqlite3.Error, OSError) as e:
        raise ConfigError(f"the restore of {source} failed: {e}; {database} is as it was") from None
    aside, had_keys = aside_name(database), os.path.lexists(signing_keys_path(database))
    try:
        put_aside(database, aside)
        listed = list_reopened(aside, reopened) if known else None
        if keys is not None:
            write_signing_keys(signing_keys_path(database), keys)
        os.replace(copy, os.path.realpath(database))
    except BaseException as e:          # (Ctrl-C too)
        kept = put_back(database, aside, had_keys)
        if isinstance(e, OSError):
            raise ConfigError(f"the restore of {source} failed: {e}; {kept}") from None
        raise
    sync_directory(os.path.realpath(database))
    return aside, keys is not None, reopened, listed


def decided_since_the_backup(database, copy):
    """The pauses pending in the backup's `copy` that the database it replaces had decided,
    timed out or cancelled since: back from the backup, they would be pending again, and the
    people asked could answer them again (another way, say) and their agents hear of it. Each as
    (id, 'live' or 'test', its developer's email, expires_at, its status in the database),
    by id. Or the error that kept the database from being read to tell (a damaged one, likely
    why it is restored)."""
    if not os.path.exists(database):
        return []
    try:
        with contextlib.closing(connect_read_only(copy)) as restored:
            pending = {row[0]: tuple(row) for row in restored.execute(
                "SELECT pauses.id, iif(pauses.livemode, 'live', 'test'), developers.email, pauses.expires_at"
                " FROM pauses JOIN developers ON developers.id = pauses.developer_id WHERE status = 'pending'")}
        with contextlib.closing(connect_read_only(database)) as current:
            return [(*pending[pause_id], status) for pause_id, status in current.execute(
                "SELECT id, status FROM pauses WHERE status != 'pending' AND id IN (SELECT value FROM json_each(?))"
                " ORDER BY id",
                (json.dumps(list(pending)),))]
    except sqlite3.Error as e:
        return e


def cancel_reopened(config, copy, reopened, keys_path):
    """Cancel, in the restored `copy` and before it takes the database's name, each pause the
    restore reopens that is still before its expiry: at the server's first tick, a reminder or
    escalation that fell due meanwhile, or a text queued when the backup was taken, would ask
    its people again before anyone could. Each is cancelled as any cancel is (decide_pause()),
    with the receipt signed by the keys at `keys_path`, its audit event saying what the
    replaced database had, its webhook event. One past its expiry times out at the start, to
    its timeout_default, as any does. Returns the ids cancelled."""
    signer = Signer(keys_path, functools.partial(latest_receipt_kid, copy))
    try:
        with contextlib.closing(connect(copy)) as conn:
            migrate(conn)
            conn.signer = signer
            with transaction(conn):
                now = db_time()
                cancelled = {pause_id for pause_id, *_, status in reopened if decide_pause(
                    conn, config, pause_id, "cancelled", "restore", now=now,
                    data={"via": "restore", "since_the_backup": status})}
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")     # all of it in the file that is put in place
    finally:
        signer.helper.shutdown()
    return cancelled


def list_reopened(aside, reopened):
    """Every pause the restore reopened, one a line in a file beside the database it replaced
    (`aside`), tab-separated: its id, mode (live or test: whose key reads it), developer's
    email, expiry, status in the replaced database, and whether the restore cancelled it or it
    times out at the start. The command's output names only the first few. Returns its name."""
    path = f"{aside}.reopened"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    take_owner(fd, aside)
    with open(fd, "w", encoding="utf-8") as f:
        f.writelines(f"{pause_id}\t{mode}\t{email}\t{api_time(expires_at)}\t{was}\t{now}\n"
                     for pause_id, mode, email, expires_at, was, now in reopened)
    return path


def copy_backup(source, copy):
    """The backup at `source` copied into the file `copy` through SQLite's backup API: read as
    immutable where it is whole in its file, as the backup command writes it, so that nothing
    is made beside it, in a directory this user may not write to either."""
    with (contextlib.closing(connect_read_only(source, immutable=whole_in_its_file(source) is not None)) as conn,
          contextlib.closing(sqlite3.connect(copy)) as target):
        conn.backup(target)


def checked_backup(copy, source):
    """Refuse a copy whose pages do not fit together (a backup cut short, or damaged since), or
    that holds no PausePoint database this version may run."""
    with contextlib.closing(sqlite3.connect(copy)) as conn:
        try:
            found = quick_check(conn, 1)
        except sqlite3.DatabaseError as e:
            found = [str(e)]
        if found != ["ok"]:
            raise ConfigError(f"the backup {source} fails SQLite's check ({found[0]}): restore an earlier one")
        try:
            applied = applied_schema(conn)
        except ConfigError as e:
            raise ConfigError(str(e).replace(copy, source)) from None
    if applied is None:
        raise ConfigError(f"{source} is no backup of a PausePoint database: name a file the backup command wrote")


def restored_keys(database, source, copy):
    """The keys the restored database is to start with: None to keep the database's own, when
    they hold every key the backup's do (and those made since, which receipts handed out since
    the backup was taken were signed with), else the backup's. Either is checked against the
    copy as a start would check them."""
    own, theirs = signing_keys_path(database), signing_keys_path(source)
    if os.path.exists(own) and published_keys(theirs).items() <= published_keys(own).items():
        with contextlib.suppress(ConfigError):
            Signer(own, functools.partial(latest_receipt_kid, copy)).helper.shutdown()
            return None
    if not os.path.exists(theirs):
        if os.path.exists(own) or latest_receipt_kid(copy):
            raise ConfigError(f"the backup's signing keys ({theirs}) are missing, and {own} is missing too or does"
                              " not hold the key of its latest receipt: put the keys file that went with the backup"
                              " beside it, then run this again")
        return None         # neither has keys yet: the next start makes them
    try:
        Signer(theirs, functools.partial(latest_receipt_kid, copy)).helper.shutdown()
    except ConfigError as e:
        raise ConfigError(f"the backup would not start with its keys: {e}") from None
    with open(theirs, encoding="utf-8") as f:
        return json.load(f)["keys"]


def published_keys(path):
    """{kid: public key} of the keys file at `path` ({} if it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as f:
            return {key["kid"]: key["public"] for key in json.load(f)["keys"] if "lost_at" not in key}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def aside_name(database):
    """The name put_aside() keeps the database under, or None where there is no database."""
    real = os.path.realpath(database)
    return f"{real}.replaced-{utcnow():%Y%m%dT%H%M%S.%fZ}" if os.path.exists(real) else None


def put_aside(database, aside):
    """Keep the database about to be replaced, its -wal and its keys, under the name `aside`
    beside it (none where it is None)."""
    if aside is None:
        return
    real = os.path.realpath(database)
    os.link(real, aside)            # the file keeps its name until the copy takes it
    for suffix in ("-wal", "-journal"):
        if os.path.lexists(real + suffix):
            os.rename(real + suffix, aside + suffix)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(real + "-shm")
    if os.path.exists(signing_keys_path(database)):
        os.link(signing_keys_path(database), signing_keys_path(aside))     # a rotation writes a new file


def put_back(database, aside, had_keys):
    """Undo put_aside() and the keys written after it, for a restore that failed before the
    copy took the database's name: its -wal goes back beside it, or the next start would
    serve it without the last writes an unclean stop left there, and the file kept as
    `aside` (the same file, which the next writes would change under that -wal) goes. (Its
    -shm is rebuilt from the -wal.) Returns what is to be said of the database."""
    real, keys = os.path.realpath(database), signing_keys_path(database)
    try:
        if aside and os.path.exists(aside):
            if not os.path.samefile(aside, real):
                return f"the database as it was is kept as {aside}"        # the copy took its name
            for suffix in ("-wal", "-journal"):
                if os.path.lexists(aside + suffix):
                    os.rename(aside + suffix, real + suffix)
            if os.path.exists(signing_keys_path(aside)):
                os.replace(signing_keys_path(aside), keys)      # the database's own, over the backup's
            for made in (signing_keys_path(aside), f"{aside}.reopened", aside):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(made)
        if not had_keys and os.path.lexists(keys):
            os.unlink(keys)                                     # the backup's, written beside none
    except OSError as e:
        if aside and os.path.lexists(aside + "-wal"):
            return (f"putting it back failed too ({e}): the last writes of {real} are in {aside}-wal; rename that"
                    f" {real}-wal before the server starts, or it starts without them")
        return f"{database} is back with its -wal, but putting the rest back failed ({e})"
    return f"{database} is as it was"


def refuse_an_unknown_option_first(parser, argv):
    """`--bind 0.0.0.0` (an option no command takes) is said to be one: argparse would take its
    value for the command, and answer that 0.0.0.0 is no command."""
    server_options = argparse.ArgumentParser(prog=parser.prog, usage=parser.format_usage()[len("usage: "):],
                                             add_help=False, allow_abbrev=False)
    add_server_options(server_options, None)
    rest = server_options.parse_known_args(argv)[1]
    if rest and rest[0].startswith("-") and rest[0] not in ("-", "--", "-h", "--help"):
        parser.error(f"unrecognized option {rest[0]} (the options, and the commands: --help)")


def add_server_options(parser, default):
    """The options every command takes, before the command or after it."""
    parser.add_argument("--config", default=default, help="TOML config file (default: ./config.toml if present)")
    parser.add_argument("--host", default=default, help="address to listen on (server.host)")
    parser.add_argument("--port", default=default, type=int, help="port to listen on (server.port)")
    parser.add_argument("--db", default=default, help="SQLite database file (database.path)")
    parser.add_argument("--base-url", default=default, help="public URL for respond links (server.base_url)")


def command_line():
    """The parser of the command line: server options, then a command and its own options.
    No abbreviated options: an abbreviation in an operator's script would change its
    meaning, or stop working, when a later release adds an option sharing its start."""
    parser = argparse.ArgumentParser(
        prog="pausepoint.py", allow_abbrev=False,
        description="PausePoint: human approval for AI agents. With no command, serves the API.")
    add_server_options(parser, None)
    # After a command too (`verify-audit --db x.db`); given there, they leave those given before alone.
    after_command = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_server_options(after_command, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help):
        # Said again atop the command's own --help, which otherwise lists its options alone.
        return commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                   parents=[after_command], allow_abbrev=False)

    def developer_email(parser, help="the developer's sign-in email"):
        # Without the spaces around it, as sign-in takes it: a pasted " a@example.com" is theirs.
        parser.add_argument("--email", required=True, type=str.strip, help=help)

    command("serve", help="serve the API and respond pages (the default)")
    create = command("create-developer", help="add a developer and print their API keys (works when registration is closed)")
    developer_email(create, help="their sign-in email")
    create.add_argument("--name", required=True, help="their name, which people asked see as who asks")
    create.add_argument("--plan", default="free", help="a plan named in the config (default: free)")
    create.add_argument("--password-stdin", action="store_true",
                        help="read the developer's password from standard input (default: asked for at a prompt)")
    set_plan = command("set-plan", help="move a developer to another plan")
    developer_email(set_plan)
    set_plan.add_argument("--plan", required=True, help="a plan named in the config")
    new_password = command("set-password", help="give a developer a new password (one forgotten, or in someone"
                                                " else's hands): every sign-in of theirs ends")
    developer_email(new_password)
    new_password.add_argument("--password-stdin", action="store_true",
                              help="read the new password from standard input (default: asked for at a prompt)")
    operator = command("set-operator", help="let a developer use the dashboard's operator page")
    developer_email(operator)
    operator.add_argument("--remove", action="store_true", help="take the operator page away instead")
    take_backup = command("backup", help="write an online backup of the database (safe while serving)")
    take_backup.add_argument("destination", help="file to write; must not exist yet")
    put_back = command("restore", help="put a backup in the database's place, the server stopped; the database it"
                                       " replaces is kept beside it")
    put_back.add_argument("backup", help="a file the backup command wrote")
    command("verify-audit", help="check every audit chain, and every decided pause against its receipt; exits 1"
                                  " naming the first event that breaks each chain and each pause unlike its receipt")
    rotate = command("rotate-signing-key", help="sign from now on with a new key; old public keys stay published")
    rotate.add_argument("--keys-lost", action="store_true",
                        help="the keys file is gone and no backup holds it: make a new one (receipts signed before"
                             " can no longer be checked)")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM to a command: `timeout`, a cron or systemd limit, `docker stop`."""


def stop_command(signum, frame):
    # Unwound as Ctrl-C is, not ended where it stands: a backup's or a restore's copy, half
    # made and hidden beside its target, is removed on the way out instead of left for good.
    raise Terminated


def main(argv=None):
    parser = command_line()
    refuse_an_unknown_option_first(parser, sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    # A server takes its signals itself, to stop serving cleanly; a command is unwound (stop_command()).
    previous = signal.signal(signal.SIGTERM, stop_command) if args.command not in (None, "serve") else None

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The delivery job is woken on demand; APScheduler warns when a wake-up finds it
    # already running, which is harmless (the running pass or the next tick does the work).
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    # The Twilio library logs every request and response at INFO, a dozen lines per SMS.
    logging.getLogger("twilio.http_client").setLevel(logging.WARNING)
    try:
        # ./config.toml is read only here, by the command line: library callers and
        # tests pass their config explicitly and never pick up a stray file.
        path = args.config or ("config.toml" if os.path.exists("config.toml") else None)
        config = load_config(path, overrides={"server.host": args.host, "server.port": args.port,
                                                     "database.path": args.db, "server.base_url": args.base_url})
        if args.command in (None, "serve"):
            hide_push_targets_in_the_log(config)
            serve(config)
        else:
            return run_command(args, config)
    except ConfigError as e:
        print(f"pausepoint: {e}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as e:      # only starting or a command gets here: requests and jobs catch theirs
        path = config["database.path"]
        print(f"pausepoint: cannot use the database {path}: {e}{open_failure_hint(config, e)}", file=sys.stderr)
        return 2
    except Terminated:
        print("pausepoint: stopped by SIGTERM before it finished", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:               # Ctrl-C at a prompt, or before the server took its signals
        print(file=sys.stderr)
        return 130
    except ApiError as e:
        print(f"pausepoint: {e.message}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:        # as it was, for a caller in this process
            signal.signal(signal.SIGTERM, previous)
    return 0


def open_failure_hint(config, error):
    """What likely kept SQLite from opening or writing the database, after `error`'s text."""
    path = config["database.path"]
    if disk_is_full(error):
        return ("; its disk has no room left (or the file is over a quota or size limit): free space on it, then"
                " try again")
    if "database is locked" in str(error):
        return (f"; another process held its write lock (a sqlite3 shell with a transaction open, a VACUUM) past"
                f" database.lock_wait_seconds, {config['database.lock_wait_seconds']:g} s: let it finish, then try again")
    journal = os.path.realpath(path) + "-journal"
    if "readonly database" in str(error) and os.path.exists(journal):      # verify-audit only reads
        return (f"; a process stopped while writing it left {journal}, which only one that may write it"
                " undoes: start the server on it once")
    if "unable to open" not in str(error):
        return ""
    if os.path.isdir(path):
        return "; it is a directory: name a file"
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(path) and not os.access(path, os.R_OK):
        owner = os.stat(path)
        return (f"; this user (uid {os.getuid()}) may not read it (it belongs to uid {owner.st_uid}, mode"
                f" {stat.S_IMODE(owner.st_mode):o}): run this as the user the server runs as")
    if os.path.isfile(path) and not os.path.exists(path + "-shm") and not os.access(directory, os.W_OK):
        # A reader of a database in WAL mode shares its wal-index (the -shm file) with the
        # other connections: a first reader makes it, in the database's directory.
        return (f"; reading it needs {path}-shm, which only a server that has it open, or a user who may write"
                " to its directory, provides: copy it somewhere writable")
    return "; does its directory exist, and may this user write there?"


def terminal_to_ask_at():
    """Whether getpass can ask without showing what is typed: the process has a terminal, or
    standard input is one. Without either it would read standard input, warning that it may
    echo (GetPassWarning), and take two lines of whatever is piped there as the password."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
        return True
    except OSError:
        return sys.stdin is not None and sys.stdin.isatty()


def asked_password():
    """A new password typed twice at the prompt: a typo, unseen, would set one nobody knows."""
    if not terminal_to_ask_at():     # cron, a pipe, docker exec without -t
        raise ConfigError("no password was given, and there is no terminal to ask for one at: give it on standard"
                          " input with --password-stdin")
    try:
        password = getpass.getpass("Password: ")
        again = getpass.getpass("The same again: ")
    except EOFError:        # Ctrl-D, or no terminal to ask at and nothing on standard input
        print(file=sys.stderr)      # ends the prompt's line
        raise ConfigError("no password was given: type it at the prompt, or give it on standard input with"
                          " --password-stdin") from None
    if password != again:
        raise ConfigError("the two passwords typed differ; nothing was changed")
    return password


def refuse_a_path_no_command_can_use(command, path):
    """A command's database is a file that exists; only create-developer makes one. Whether
    there is none yet."""
    if os.path.isdir(path):     # opened, SQLite blames the disk, or a backup's copy
        raise ConfigError(f"cannot use the database {path}: it is a directory: name the database file in it")
    new = not os.path.exists(path)
    if command != "create-developer" and new:
        # A mistyped path would otherwise get a new, empty database that "verifies".
        raise ConfigError(f"there is no database at {path}; name the server's with --db or database.path")
    return new


def password_given(args):
    """The password of create-developer or set-password: from standard input, or asked for."""
    # Its line ends in "\n" or, from a file saved on Windows or PowerShell's pipe, "\r\n": neither is part of it.
    return sys.stdin.readline().rstrip("\r\n") if args.password_stdin else asked_password()


def check_before_making_a_database(args, config):
    """create-developer where there is no database: what it would refuse is refused before one is
    made, or a mistyped path would keep an empty database, and the retry would not say it is new.
    Returns the password."""
    password = password_given(args)
    check_new_developer(config, args.email, args.name, password, args.plan)
    # On standard error: the keys on standard output stay JSON for scripts.
    print(f"pausepoint: there was no database at {os.path.abspath(config['database.path'])}: a new one is made"
          " for this developer (if the server's is elsewhere, name it with --db or database.path)", file=sys.stderr)
    return password


def run_command(args, config):
    """The operator's commands besides serving; returns the exit status."""
    password = None
    if args.command == "restore":       # over a database that may be gone, damaged or mixed: that is what it is for
        return restore_command(config, args.backup)
    refuse_a_database_gone(config["database.path"])
    if refuse_a_path_no_command_can_use(args.command, config["database.path"]):
        password = check_before_making_a_database(args, config)
    refuse_before_opening(config["database.path"])
    if args.command == "verify-audit":       # it checks the schema itself, read-only
        return verify_audit(config["database.path"])
    open_elsewhere = locked_by_another(os.path.realpath(config["database.path"]), SQLITE_OPEN_BYTES)
    if not open_elsewhere:
        # With no process on it, a -wal is one left as a start finds it: a command's connection,
        # closing last, would copy it into the file (a backup, into its copy), and the next
        # start would find nothing amiss. While a server has it open the -wal is the server's.
        # (verify-audit only reads, and copies nothing into the file.)
        refuse_if_mixed_with_another_wal(config["database.path"])
    applied = check_database(config["database.path"])
    if args.command == "backup":
        with_keys = backup(config, args.destination)
        print(f"backed up {config['database.path']} to {args.destination}"
              + (f" (its signing keys to {signing_keys_path(args.destination)})" if with_keys else
                 " (no signing keys beside it: the server makes them at its next start)"))
        return 0
    if args.command == "rotate-signing-key":
        return rotate_command(config["database.path"], args.keys_lost)
    refuse_to_upgrade_under_a_server(config["database.path"], applied,
                                     server_running(config["database.path"]) or open_elsewhere,
                                     f"start this version's server (which upgrades the database), then run"
                                     f" {args.command} again")
    conn = connect(config["database.path"], lock_wait_seconds=config["database.lock_wait_seconds"])
    migrate(conn)
    # A password is never an argument: it would show in `ps` and in shell history.
    if args.command == "create-developer":
        password = password_given(args) if password is None else password
        print_new_keys(register_developer(conn, config, args.email, args.name, password, args.plan))
        say_a_running_server_may_not_know(config["database.path"], args.plan)
    elif args.command == "set-password":
        developer = query_db(conn, "SELECT * FROM developers WHERE email = ?", (args.email,), one=True)
        if developer is None:       # said before a new password is typed twice for nobody
            raise ApiError(404, "not_found", f"no developer with email {args.email}")
        change_password(conn, config, developer, password_given(args), actor="operator:command line")
        print(f"{args.email} has a new password; every sign-in of theirs has ended")
    elif args.command == "set-plan":
        if args.plan not in plans(config):
            raise ConfigError(f"unknown plan {args.plan!r}; the config defines: {', '.join(sorted(plans(config)))}")
        change_plan(conn, config, args.email, args.plan, "operator:command line")
        print(f"{args.email} is now on the {args.plan} plan")
        say_a_running_server_may_not_know(config["database.path"], args.plan)
    elif args.command == "set-operator":
        set_operator(conn, args.email, not args.remove)
        print(f"{args.email} {'may no longer' if args.remove else 'may now'} use the operator page (/dashboard/operator)")
    return 0


def print_new_keys(registered):
    """A new developer's keys on standard output, the one place they are shown. Where they
    cannot be written (a full disk, a pipe closed early) the developer is made all the same
    (the write lock is not held on a reader), and can sign in and rotate both keys."""
    try:
        # As written, not escaped: the keys' message has a dash, a name may have accents.
        print(json.dumps(registered, indent=2, ensure_ascii=False), flush=True)
    except OSError as e:
        # What is still buffered goes nowhere, rather than failing again as the process exits.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise ConfigError(f"the developer was made, but its API keys could not be written to standard output"
                          f" ({e.strerror}): sign in to the dashboard with its email and password and rotate both"
                          " keys to get new ones") from None


def restore_command(config, source):
    refuse_before_opening(config["database.path"])
    aside, with_keys, reopened, listed = restore(config, source)
    kept = os.path.exists(signing_keys_path(config["database.path"]))
    print(f"restored {config['database.path']} from {source}"
          + (f" and its signing keys from {signing_keys_path(source)}" if with_keys else ", keeping its signing keys"
             if kept else ", with no signing keys beside either: the server makes them at its next start")
          + (f"; the database it replaced is kept as {aside}" if aside else "") + ": start the server")
    if isinstance(reopened, Exception):
        print(f"whether pauses decided since the backup are pending again in it could not be told: the database it"
              f" replaced could not be read ({reopened})")
    elif reopened:
        shown = ", ".join(pause[0] for pause in reopened[:20]) + (f" and {len(reopened) - 20} more"
                                                                  if len(reopened) > 20 else "")
        cancelled = sum(pause[-1] == "cancelled" for pause in reopened)
        print(f"{len(reopened)} {'pauses' if len(reopened) != 1 else 'pause'} pending in the backup had been decided"
              f" since ({shown}): {cancelled} the restore cancelled, so nobody is asked them again and their agents"
              f" hear pause.cancelled; {len(reopened) - cancelled} past their expiry time out at the start, to their"
              f" timeout_default. Every one is listed in {listed}, a line each: its id, live or test, its developer's"
              " email, its expiry, its status in the database replaced, and what the restore did")
    return 0


def rotate_command(database_path, keys_lost):
    if keys_lost:
        kid, lost = replace_lost_signing_keys(database_path)
        print(f"receipts are now signed with {kid}" + (f"; those signed with {lost} and earlier keys can no longer be"
                                                       " checked against /.well-known/jwks.json" if lost else ""))
        return 0
    signer = Signer(signing_keys_path(database_path),
                    functools.partial(latest_receipt_kid, database_path))      # checked as a start would
    signer.helper.shutdown()
    kid = rotate_signing_key(signer.path)
    print(f"receipts are now signed with {kid}; earlier keys stay in /.well-known/jwks.json")
    return 0


def verify_audit(path):
    """The verify-audit command; returns its exit status. It reads the database without
    changing it, a read-only copy too, and never migrates it: migration 13 would chain a
    log from before chaining as it stands now, tampered or not, and then find it holds."""
    real = os.path.realpath(path)       # as checked, not as abspath() reads "link/.." (the link's parent)
    read_whole = whole_in_its_file(real)
    with contextlib.closing(connect_read_only(real, immutable=read_whole is not None)) as conn:
        applied = applied_schema(conn)
        if applied != MIGRATIONS[-1][0]:
            raise ConfigError(f"{path} has schema {applied or 0}, older than this PausePoint's"
                              f" {MIGRATIONS[-1][0]}: start the server on it (or on a copy of it) first, which"
                              " migrates it, then verify it")
        breaks = audit_chain_breaks(conn)
        chains, events = query_db(conn, "SELECT count(DISTINCT developer_id || livemode), count(*) FROM audit_events",
                                  one=True)
        # Beside the name the server was given, or else beside the file it names (a link).
        published = published_keys(signing_keys_path(path)) or published_keys(signing_keys_path(real))
        receipts = receipt_breaks(conn, published) if published else None
        decisions = decision_breaks(conn)
    if read_whole is not None and whole_in_its_file(real) != read_whole:    # what it read may have changed under it
        raise ConfigError(f"{path} was written to while it was being read: run verify-audit again")
    for seq, developer_id, livemode, why in breaks:
        print(f"aud_{seq} ({developer_id}, {mode_name(livemode)}): {why}")
    if not breaks:
        print(f"every audit chain holds: {counted(events, 'event')} in {counted(chains, 'chain')}")
    for pause_id, developer_id, livemode, why in decisions:
        print(f"{pause_id} ({developer_id}, {mode_name(livemode)}): {why}")
    return 1 if print_receipt_breaks(path, receipts) or breaks or decisions else 0


def print_receipt_breaks(path, receipts):
    """What verify-audit found of the receipts (receipt_breaks(), or None without a keys file
    to check them against); returns whether any does not hold."""
    if receipts is None:
        keys = signing_keys_path(path)
        if not (os.path.exists(keys) or os.path.exists(signing_keys_path(os.path.realpath(path)))):
            print(f"receipts not checked: there is no {keys} (a server makes it at its first start; put one lost back"
                  " from the latest backup, beside which `backup` copies it)")
        else:
            print(f"receipts not checked: {keys} cannot be read (run this as the server's user, or keep the keys"
                  " file beside a copy)")
        return False
    breaks, checked, unknown = receipts
    for pause_id, developer_id, livemode, why in breaks:
        print(f"{pause_id} ({developer_id}, {mode_name(livemode)}): its receipt does not hold: {why}")
    if not breaks:
        print("every receipt checks: " + counted(checked, "decided pause says what its receipt does",
                                                 "decided pauses say what their receipts do"))
    if unknown:
        print(f"{counted(unknown, 'receipt was', 'receipts were')} signed with a key the keys file no longer holds"
              " (lost: see --keys-lost), and cannot be checked")
    return bool(breaks)


def counted(count, singular, plural=None):
    """'1 chain', '2 chains': a count and what it counts, in the singular for one."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


def whole_in_its_file(path):
    """Whether the database at `path` can be read without SQLite's shared wal-index (the -shm
    file), which a first reader makes beside it (and cannot, in a directory this user may not
    write) and a reader that may not write leaves there, with an empty -wal: when it has no
    write-ahead log (nor a rollback journal), nothing is waiting to be copied into the file
    and no connection has it open (a backup, or a copy a stopped server left), so the file is
    all of it. Then the file's state (inode, size, times), to compare after a read as
    immutable, which takes no locks and looks for no -shm; else None. Looked for beside the
    file itself, where SQLite keeps them, whatever link names it; a file with other names
    (hard links) may have its log beside one of those."""
    real = os.path.realpath(path)
    try:
        found = os.stat(real)
    except OSError:
        return None
    if not stat.S_ISREG(found.st_mode) or found.st_nlink > 1:
        return None
    if any(os.path.lexists(real + suffix) for suffix in BESIDE_A_DATABASE):
        return None
    if locked_by_another(real, SQLITE_OPEN_BYTES) is not False:     # open somewhere, or no telling
        return None
    return found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns


if __name__ == "__main__":
    sys.exit(main())
