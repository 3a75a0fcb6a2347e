"""`python pausepoint.py …` as its own process, without paying for the interpreter's start-up.

Importing pausepoint and its libraries costs a new interpreter about 0.3 s of CPU, and the suite
starts dozens of servers and commands. Each one here is forked instead from a helper process that
imported pausepoint once (multiprocessing's fork server), then runs `pausepoint.main()` with its own
arguments, environment, working directory and output files: its own pid, signals, database handles
and exit code, and its threads are joined before it exits.

What a fork does not do as the command line would: the interpreter's own shutdown is skipped
(atexit handlers, and the SQLite connections Python closes as it exits), settings read only as a
process starts (MALLOC_ARENA_MAX, PYTHONHASHSEED, TZ) come from the fork server, and every child
has the same hash seed. test_server.py's test of the real script covers what that leaves out.

The scripts in client/ (the Claude Code hook) are launched the same way, as `python script …`
runs them (runpy, as __main__, its directory first on the path, its input on descriptor 0),
without the 0.1 s of CPU their interpreter and its imports of http.client and json cost. What
the fork server imported is already loaded, so test_claude_hook.py still runs the real script
for what a fork cannot show (the script's imports, as a copy of it alone finds them).
"""

import locale
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading

import pausepoint

FORK_SERVER = multiprocessing.get_context("forkserver")
# The locales Python 3.7+ coerces the C locale to (PEP 538), in which it reads standard input
# with surrogateescape as in the C locale itself.
COERCED_C_LOCALES = ("C.UTF-8", "C.utf8", "UTF-8")
FORK_SERVER.set_forkserver_preload([__name__])
FORK_SERVER_STARTING, FORK_SERVER_STARTED = threading.Lock(), []


def start_fork_server():
    """Python 3.11's fork server starts with the default sys.path (later versions take the
    tests'), whose first entry is the directory pytest ran in, and a preload it cannot import
    is skipped in silence: it could preload another checkout's pausepoint, or none. So it
    starts without that entry (PYTHONSAFEPATH) and with this module's directory and
    pausepoint's on PYTHONPATH, set only while it starts; each child sets its own environment."""
    with FORK_SERVER_STARTING:
        if FORK_SERVER_STARTED:
            return
        here = os.path.dirname(os.path.abspath(__file__))
        given = {name: os.environ.get(name) for name in ("PYTHONPATH", "PYTHONSAFEPATH")}
        paths = [here, os.path.dirname(here)] + ([given["PYTHONPATH"]] if given["PYTHONPATH"] else [])
        os.environ["PYTHONPATH"] = os.pathsep.join(paths)
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            multiprocessing.forkserver.ensure_running()
            FORK_SERVER_STARTED.append(True)
        finally:
            for name, value in given.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value


def run_main(expected_file, argv, cwd, env, stdout_path, stderr_path, stdin_path, script=None, setup=None):
    """In the forked child: what `python pausepoint.py argv` (or `python script argv`) does,
    its output appended to the files; setup() first, as subprocess's preexec_fn would."""
    if setup is not None:
        setup()
    for fd, path, flags in ((0, stdin_path or os.devnull, os.O_RDONLY),
                            (1, stdout_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND),
                            (2, stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    if pausepoint.__file__ != expected_file:        # said in the output the test reports
        raise RuntimeError(f"the fork server loaded {pausepoint.__file__}, not {expected_file}")
    # Standard input as a new interpreter reads it: from descriptor 0, in the locale's encoding,
    # undecodable bytes kept (surrogateescape) in UTF-8 mode, in the C locale and in the ones
    # Python coerces that to (C.UTF-8, as containers set it), as Python does; and with its line
    # endings as they are (newline="\n", as Python opens it outside Windows): "\r\n" stays "\r\n".
    plain = sys.flags.utf8_mode or locale.setlocale(locale.LC_CTYPE) in ("C", "POSIX", *COERCED_C_LOCALES)
    sys.stdin = open(0, closefd=False, newline="\n", errors="surrogateescape" if plain else "strict")
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [script or pausepoint.__file__, *argv]
    if script:
        # Its own directory first on the path, as `python script` puts it, not the tests'.
        here = os.path.dirname(os.path.abspath(__file__))
        sys.path[:] = [os.path.dirname(os.path.abspath(script))] + [
            entry for entry in sys.path if entry not in ("", here, os.path.dirname(here))]
        runpy.run_path(script, run_name="__main__")
        return
    sys.exit(pausepoint.main(argv))


class Launched:
    """The part of subprocess.Popen's interface the tests use, for a forked pausepoint (or script)."""

    def __init__(self, argv, cwd, env, stdout_path, stderr_path=None, stdin_path=None, script=None, setup=None):
        self.args = argv
        start_fork_server()
        self.process = FORK_SERVER.Process(target=run_main, args=(
            pausepoint.__file__, argv, str(cwd), env, stdout_path, stderr_path or stdout_path, stdin_path, script, setup))
        self.process.start()
        self.pid = self.process.pid

    @property
    def returncode(self):
        return self.process.exitcode

    def poll(self):
        return self.process.exitcode

    def wait(self, timeout=None):
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.process.exitcode

    def send_signal(self, signum):
        if self.process.exitcode is None:
            os.kill(self.pid, signum)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def run(argv, cwd, env, stdin=None, timeout=60, script=None, setup=None):
    """Like subprocess.run(capture_output=True, text=True) for a forked pausepoint (or script)."""
    with tempfile.TemporaryDirectory() as files:
        paths = [os.path.join(files, name) for name in ("stdin", "stdout", "stderr")]
        with open(paths[0], "w", encoding="utf-8") as f:
            f.write(stdin or "")
        launched = Launched(argv, cwd, env, paths[1], paths[2], paths[0], script, setup)
        try:
            launched.wait(timeout)
        finally:
            launched.kill()
        return subprocess.CompletedProcess(argv, launched.returncode, *map(read, paths[1:]))


def read(path):
    """A process's output so far ('' before it wrote any)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
