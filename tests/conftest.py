"""Fixtures: a fresh PausePoint on a fresh SQLite file per test.

`api` drives the WSGI app in-process through WebTest; `live_server` serves the
same app over real HTTP with waitress on a loopback port; `spawn_server` runs
`python pausepoint.py` as its own process (forked, see launcher.py, unless a test asks
for a fresh interpreter), for restarts, signals and the CLI.
"""

import contextlib
import datetime as dt
import gc
import glob
import importlib
import importlib.util
import itertools
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import requests
import webtest
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# A run starts dozens of Python processes (servers, clients, the MCP server, the hook), each
# compiling the same modules. Where the environment asks Python not to write bytecode, they
# write it anyway (it saved a fifth of the suite's CPU time), but never into the interpreter's
# own tree: beside the sources as Python does by default when that tree came compiled and the
# packages are a virtualenv's, so only our modules and the venv's get any; otherwise (as in
# the slim Docker images, which delete theirs) in a tree of its own under .pytest_cache, which
# costs a fresh checkout's first run every library compiled again (9 s of wall time here).
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
    sys.dont_write_bytecode = False
    if sys.prefix == sys.base_prefix or not os.path.exists(importlib.util.cache_from_source(json.__file__)):
        sys.pycache_prefix = os.environ.setdefault("PYTHONPYCACHEPREFIX", os.path.join(ROOT, ".pytest_cache", "bytecode"))

# Hypothesis loads every installed package's Hypothesis plugin when imported; trio's imports
# all of trio, which no test uses: 0.15 s of CPU in each of the seven processes collecting.
os.environ.setdefault("HYPOTHESIS_NO_PLUGINS", "1")

import pausepoint  # noqa: E402
import launcher  # noqa: E402
from stubs import TwilioStub, WebhookReceiver  # noqa: E402

PASSWORD = "correct horse battery"
WIRE = {
    "recipient": "+15550100",
    "channel": "sms",
    "message": "Your agent wants to send a $340 wire to Acme Corp. Approve?",
    "options": ["Approve", "Reject"],
    "timeout_hours": 4,
    "timeout_default": "Reject",
}
# The same question without whom to ask, for a team's `recipients`.
QUESTION = {name: value for name, value in WIRE.items() if name not in ("recipient", "channel")}


def make_config(tmp_path, **overrides):
    settings = {"database.path": str(tmp_path / "pausepoint.db"), "security.bcrypt_rounds": 4}
    settings.update(overrides)
    return pausepoint.load_config(environ={}, overrides=settings)


@pytest.fixture
def stubs():
    """Start loopback stand-ins: stubs(WebhookReceiver, delay=1) starts one; every one is closed after the test."""
    started = []

    def start(kind, *args, **kwargs):
        started.append(kind(*args, **kwargs))
        return started[-1]

    yield start
    for stub in started:
        stub.close()


@pytest.fixture
def twilio(stubs):
    """A loopback stand-in for Twilio's Messages API; .settings() points the sms channel at it."""
    return stubs(TwilioStub)


@pytest.fixture
def receiver(stubs):
    """A webhook receiver on loopback that answers 200 and records every call."""
    return stubs(WebhookReceiver)


@pytest.fixture(scope="session")
def first_start(tmp_path_factory):
    """A database and its signing keys as a first start leaves them, made once per test
    process: making the schema and a key costs an app 8 ms, and the tests build hundreds."""
    config = make_config(tmp_path_factory.mktemp("first-start"))
    pausepoint.create_app(config).runtime.stop()
    with contextlib.closing(sqlite3.connect(config["database.path"])) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")        # all of it in the main file
    return config["database.path"]


@pytest.fixture
def running_api(tmp_path, first_start):
    """Build apps: running_api(**settings) is an Api over a new app on this test's
    database with those settings; every one is stopped after the test. Its scheduler
    stays off and the test steps the jobs itself with api.step("timeouts"), so it sees
    exactly what one run did (and no job runs, on a tick, between its requests); with
    jobs=True the app starts as a server does, jobs and metrics address included. The
    database starts as a copy of first_start's; with fresh=True the app makes it, as a
    first start does."""
    built = []

    def build(jobs=False, remote_addr="192.0.2.10", fresh=False, **settings):
        config = make_config(tmp_path, **settings)
        if not fresh:
            start_from(first_start, config)
        app = pausepoint.create_app(config)
        built.append(app)
        if jobs:
            app.runtime.start()
        return Api(app, extra_environ={"REMOTE_ADDR": remote_addr})

    yield build
    locked = [path for path in {app.runtime.config["database.path"] for app in built} if write_lock_left(path)]
    if locked:
        gc.collect()        # the connection holding it is likely garbage by now: closed, the jobs can stop
    for app in built:
        app.runtime.stop()
    collect_descriptors()
    if locked:
        pytest.fail(f"the test left a write transaction open on {locked}: the server's jobs would wait 30 s for it")


def start_from(first_start, config):
    """Unless config's database is there already, make it a copy of first_start's, keys and all."""
    path = config["database.path"]
    if not os.path.exists(path):
        shutil.copy(first_start, path)
        shutil.copy(pausepoint.signing_keys_path(first_start), pausepoint.signing_keys_path(path))  # 0600 too


def write_lock_left(path):
    """Whether something (a test's connection, outside autocommit, after a refused statement
    say) still holds the database's write lock after 5 s."""
    if not os.path.exists(path):
        return False
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=5, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            return True
        raise
    return False


class Api(webtest.TestApp):
    """WebTest with the helpers every API test needs."""

    def register(self, email="dev@example.com", name="Dev", password=PASSWORD):
        return self.post_json("/v1/auth/register", {"email": email, "name": name, "password": password}).json

    def as_key(self, key):
        return {"Authorization": f"Bearer {key}"}

    def create_pause(self, key, **changes):
        body = {**WIRE, **changes}
        return self.post_json("/v1/pause", body, headers=self.as_key(key)).json

    def pause(self, key, pause_id, **params):
        return self.get(f"/v1/pause/{pause_id}", params, headers=self.as_key(key)).json

    def step(self, job):
        """Run one of the server's jobs once and wait for the calls it started."""
        self.app.runtime.run_once(job)

    @property
    def config(self):
        return self.app.runtime.config


@pytest.fixture
def api(running_api):
    return running_api()


@pytest.fixture
def app(api):
    return api.app


@pytest.fixture
def config(api):
    return api.config


@pytest.fixture
def developer(api):
    """A registered developer: {'developer_id', 'api_key', 'test_api_key', …}."""
    return api.register()


def pytest_configure(config):
    """Test files go to tmpfs when the machine has one with room: the databases are still
    real SQLite files, but their fsyncs cost no disk writes (2.5 s of the run's CPU here)."""
    shm = "/dev/shm"
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        on_tmpfs = any(line.split()[1:3] == [shm, "tmpfs"] for line in mounts)
        if on_tmpfs and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 4 << 30:
            tempfile.tempdir = shm
    if config.getoption("numprocesses", None) and not hasattr(config, "workerinput"):
        rewrite_test_modules_once()


def rewrite_test_modules_once():
    """In the process that starts the test processes, before it starts them: import each test
    module, so that pytest's assertion rewriting writes its bytecode once. On a fresh checkout
    each of the six test processes otherwise rewrote every module itself, all at once on two
    cores: a fresh checkout's whole first run, start-up included, took 41.6-42.5 s against
    38.8-39.3 s (three of each). A module already rewritten since it last changed is not
    imported: on a warm checkout those imports cost this process 0.4-0.6 s of CPU for nothing."""
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        if not rewritten_since_changed(path):
            with contextlib.suppress(Exception, pytest.skip.Exception):    # collection says why, or skips it
                importlib.import_module(os.path.basename(path)[:-3])


def rewritten_since_changed(path):
    """Whether pytest's assertion-rewritten bytecode of the test module at `path` was made from
    the module as it is: pytest writes it as a checked-hash pyc (PEP 552), whose header holds
    the source's hash, and a test process checks that hash again before using it."""
    tag = f"{sys.implementation.cache_tag}-pytest-{pytest.__version__}"
    rewritten = os.path.join(os.path.dirname(importlib.util.cache_from_source(path)),
                             f"{os.path.basename(path)[:-3]}.{tag}.pyc")
    try:
        with open(rewritten, "rb") as pyc, open(path, "rb") as source:
            header, source_hash = pyc.read(16), importlib.util.source_hash(source.read())
    except OSError:
        return False
    return header == importlib.util.MAGIC_NUMBER + b"\x03\x00\x00\x00" + source_hash[:8]


def pytest_collection_finish(session):
    """What is loaded by now (the libraries, the tests) lives to the end of the run: out of
    the collector's way, a full collection takes milliseconds instead of 150 ms, and a test
    process ran some ten of those."""
    gc.collect()
    gc.freeze()


def collect_descriptors(most=256):
    """A stopped app's SQLite connections sit in reference cycles until the collector
    runs; when many descriptors are open, run it, so a test process never reaches its
    limit (a full collection costs tens of milliseconds, too much after every test)."""
    if len(os.listdir("/proc/self/fd")) > most:
        gc.collect()


def register_over_http(url, email="dev@example.com", name="Dev"):
    """A developer registered through the real API: the keys it answers with."""
    response = requests.post(f"{url}/v1/auth/register", json={"email": email, "name": name, "password": PASSWORD})
    assert response.status_code == 201, response.text
    return response.json()


def answer_first_pending(url, key, choice, comment=None, timeout=30):
    """A person who answers the first pending pause they are sent, through its respond
    link, on a thread of their own; join the thread returned."""
    def answer():
        auth = {"Authorization": f"Bearer {key}"}
        pending = wait_until(lambda: requests.get(f"{url}/v1/pause", params={"status": "pending"},
                                                  headers=auth).json()["pauses"], timeout=timeout)
        requests.post(f"{url}/v1/respond/{token_of(pending[0]['respond_url'])}",
                      json={"choice": choice, "comment": comment})
    thread = threading.Thread(target=answer)
    thread.start()
    return thread


def stored(where, sql, *args):
    """Run one statement on the database file (a path, or a config naming it) and return its rows."""
    db = sqlite3.connect(where["database.path"] if isinstance(where, dict) else where)
    try:
        with db:
            return db.execute(sql, args).fetchall()
    finally:
        db.close()


def run_out(where, pause_id):
    """Move a pause's expiry one second into the past, as if its whole timeout had gone by."""
    stored(where, "UPDATE pauses SET expires_at = ? WHERE id = ?",
           pausepoint.db_time(pausepoint.utcnow() - dt.timedelta(seconds=1)), pause_id)


def token_of(respond_url):
    return respond_url.rsplit("/", 1)[1]


def wait_until(predicate, timeout=10.0, interval=0.02):
    """Poll predicate() until it returns something truthy; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


class LiveServer:
    """A waitress server for an app on a free loopback port, run on a thread.

    The loop runs one poll at a time so that it is also closed on its own
    thread: closing waitress's sockets under a running poll breaks it."""

    def __init__(self, app, config):
        self.app = app
        self.server = pausepoint.make_server(app, config, port=0)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stopped.is_set():
            # poll(), as the server itself uses: select() fails on descriptors past 1,024.
            self.server.asyncore.loop(timeout=0.05, use_poll=True, map=self.server._map, count=1)
        # Everything a serving process would give back when it exits: the clients'
        # connections, and the worker threads with their SQLite connections.
        for channel in list(self.server._map.values()):
            channel.close()
        self.server.task_dispatcher.shutdown()

    def __enter__(self):
        self.thread.start()
        return self

    def quiet(self):
        """No request is being served. A request's thread gives back its database connection
        after the answer is sent, so a client can have its answer a moment before that."""
        dispatcher = self.server.task_dispatcher
        with dispatcher.lock:
            return not dispatcher.running

    def __exit__(self, *exc):
        self.app.runtime.stop()
        self.stopped.set()
        self.thread.join(timeout=30)
        collect_descriptors()


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a disk of its own, 4 MiB of tmpfs, that a test may fill (fill_disk()):
    what a full disk does to SQLite is only seen on one."""
    with disk_of_its_own(tmp_path / "small-disk", "4m") as directory:
        yield directory


@contextlib.contextmanager
def disk_of_its_own(directory, size):
    """`directory`, made, on a tmpfs of `size` (mount's spelling: "4m") that nothing else
    writes to, so its free space changes only with what the test does there, not with what
    the tests running beside it write and delete. Mounting needs root; without it, skip."""
    directory.mkdir()
    with mounted(directory, "-t", "tmpfs", "-o", f"size={size}", "tmpfs"):
        yield directory


def cannot_run_here(reason):
    """Skip a test this machine cannot run (no permission to mount, no network namespaces, one
    disk); under CI, whose .ci/run provides all of that, fail instead: a guarantee must not go
    untested without anyone noticing."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must be able to run this test)")
    pytest.skip(reason)


@contextlib.contextmanager
def mounted(target, *how):
    """`mount *how target` for the time of the block, unmounted lazily after (a connection
    the test left to the collector may still hold a file there). Skips the test where
    mounting is not permitted (cannot_run_here())."""
    done = subprocess.run(["mount", *how, str(target)], capture_output=True, text=True)
    if done.returncode:
        cannot_run_here(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "--lazy", str(target)], check=True)


def fill_disk(directory):
    """Fill the disk `directory` is on with one file, up to the last byte; its path, to free the room."""
    filler = os.path.join(directory, "filler")
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"x" * 4096)
    return filler


@pytest.fixture
def live_server(tmp_path, first_start):
    """The app on a real loopback port, served by waitress exactly as in production."""
    with serving(tmp_path, first_start) as server:
        yield server


@pytest.fixture
def metered_server(tmp_path, first_start):
    """A live_server with its metrics at /metrics, which count what clients asked of it."""
    with serving(tmp_path, first_start, **{"metrics.enabled": True, "metrics.listen": ""}) as server:
        yield server


def scraped(text):
    """Prometheus metrics, read with Prometheus's own parser: {(sample name, frozenset of labels): value}."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


def reads_of_one_pause(url):
    """How many GET /v1/pause/{id} a metered_server has answered, from its own metrics."""
    return value(scraped(requests.get(f"{url}/metrics", timeout=10).text), "pausepoint_request_seconds_count",
                 method="GET", route="/v1/pause/<pause_id>")


def serving(tmp_path, first_start=None, **settings):
    """A LiveServer, to enter, for a new app with these settings, its jobs running; on a copy of
    first_start's database if given (making the schema and a key cost 8 ms), else a new one."""
    config = make_config(tmp_path, **{"server.host": "127.0.0.1", "ratelimit.enabled": False, **settings})
    if first_start:
        start_from(first_start, config)
    app = pausepoint.create_app(config)
    app.runtime.start()
    return LiveServer(app, config)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(env=None):
    """The environment of a pausepoint process a test starts: fast password hashing unless it says."""
    return {**os.environ, "PAUSEPOINT_SECURITY_BCRYPT_ROUNDS": "4", **(env or {})}


def run_cli(cwd, *args, env=None, stdin=None, setup=None):
    """What `python pausepoint.py --db <cwd>/pausepoint.db ARGS` does, forked (launcher.py), its output
    captured; setup() runs in the child first (a module-level function: it is pickled to the fork server)."""
    return launcher.run(["--db", str(cwd / "pausepoint.db"), *args], cwd, process_env(env), stdin=stdin, setup=setup)


@contextlib.contextmanager
def read_only_view(directory, view):
    """`directory` seen at `view` through a read-only bind mount, as an operator without write
    permission sees a server's directory (the tests run as root, whom chmod does not stop).
    Skips the test where mounting is not permitted."""
    os.makedirs(view)
    with mounted(view, "--bind", str(directory)):
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True, capture_output=True)
        yield view


class ServerProcess:
    """A server in its own process, on a given database and port: pausepoint.main() forked
    (launcher.py), setup() run in it first, or with fresh_interpreter `python pausepoint.py` itself."""
    started = itertools.count()

    def __init__(self, db_path, port, *extra_args, env=None, fresh_interpreter=False, host="127.0.0.1", setup=None):
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        # Its own log: a later server on the same database may well be given the same free port.
        self.log_path = f"{db_path}.{port}.{next(self.started)}.log"
        argv = ["--db", str(db_path), "--port", str(port), "--host", host, *extra_args]
        cwd, env = os.path.dirname(str(db_path)), process_env(env)
        if fresh_interpreter:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "pausepoint.py"), *argv],
                                             cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        else:
            self.proc = launcher.Launched(argv, cwd, env, self.log_path, setup=setup)
        try:
            wait_until(self.healthy, timeout=20)
        except BaseException:           # not started in time: it is no test's to stop later
            if self.proc.poll() is None:
                self.proc.kill()
            raise

    def healthy(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}: {self.output()}")
        # Its own start line first: a free port can be handed to two test processes at once, and
        # the other's server answer on it while this one fails to listen there.
        if " listening on " not in self.output():
            return False
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        except (requests.ConnectionError, requests.Timeout):    # a loaded machine may take a while to answer
            return False

    def output(self):
        return launcher.read(self.log_path)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


def start_server(db_path, *extra_args, port=None, **options):
    """A ServerProcess on `port`, or on a free one: another, up to twice, when a port found free
    was handed to another test process too, which took it first."""
    for tries_left in reversed(range(3)):
        try:
            return ServerProcess(db_path, port or free_port(), *extra_args, **options)
        except AssertionError as e:
            if port or not tries_left or "Address already in use" not in str(e):
                raise


@pytest.fixture
def spawn_server(tmp_path):
    """Start real server processes; every one still running is stopped after the test."""
    started = []

    def spawn(*extra_args, db_path=None, port=None, **options):
        started.append(start_server(db_path or tmp_path / "pausepoint.db", *extra_args, port=port, **options))
        return started[-1]

    yield spawn
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


# Chromium's headless shell: the same engine without the browser's windows and services
# around it. Driving the browser itself (`chromium --headless`) took 3.5-4.4 times the CPU
# for a start and ten page loads (4.2-4.7 s against 1.1-1.3 s, three runs each). Debian
# installs a wrapper script on PATH that chromedriver would stop without its child: the
# binary is run directly.
HEADLESS_SHELL = shutil.which("chromium-headless-shell", path="/usr/lib/chromium") or shutil.which("chromium-headless-shell")
CHROMEDRIVER = shutil.which("chromedriver")
# CI installs Chromium, so there a missing browser is a failure, not a skip.
needs_chromium = pytest.mark.skipif(not (HEADLESS_SHELL and CHROMEDRIVER) and not os.environ.get("CI"),
                                    reason="needs Debian's chromium-headless-shell and chromium-driver")


def start_chromium():
    """Headless Chromium, with a profile chromedriver makes and deletes: given one, it opens
    no first page, and the shell then offers it none to drive."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = HEADLESS_SHELL
    # One renderer process for every page (the tests' pages are all loopback ones): the browser
    # tests took 10.3-10.8 s of the machine's CPU instead of 11.2-12.1 s (three runs, five).
    for flag in ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--renderer-process-limit=1", "--disable-site-isolation-trials", "--window-size=390,844"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="session")
def chromium():
    """The Chromium of this test process: chromium() is the one running, or a new one if a
    test ended it; chromium(restart=True) is a new one whatever state the last was left in."""
    running = []

    def current(restart=False):
        if running and not restart:
            try:
                running[-1].window_handles
                return running[-1]
            except Exception:       # WebDriverException, or urllib3's once chromedriver is gone
                pass
        if running:
            with contextlib.suppress(Exception):
                running[-1].quit()
        running.append(start_chromium())
        return running[-1]

    yield current
    for driver in running:
        with contextlib.suppress(Exception):
            driver.quit()


@pytest.fixture
def browser(chromium):
    """A fresh window of this process's Chromium, phone-sized (390 x 844) until a test
    resizes it: no history, emulation, dialog, timeouts or cookies from an earlier test
    (each test's server has its own port, so its own origin for everything else, but
    cookies are shared by every port of a host). If what an earlier test left refuses
    that (a dialog in another window, say), a new Chromium."""
    try:
        return fresh_window(chromium())
    except Exception:
        return fresh_window(chromium(restart=True))


def fresh_window(driver):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.timeouts import Timeouts

    with contextlib.suppress(NoAlertPresentException):
        driver.switch_to.alert.dismiss()            # an alert left open refuses every other command
    driver.timeouts = Timeouts(implicit_wait=0, page_load=300, script=30)      # WebDriver's defaults
    earlier = driver.window_handles
    driver.switch_to.new_window("window")
    fresh = driver.current_window_handle
    for handle in earlier:
        driver.switch_to.window(handle)
        driver.close()
    driver.switch_to.window(fresh)
    driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
    driver.set_window_size(390, 844)
    return driver
