"""Redis, PostgreSQL and processes for the Python tools (standard library only): the compose stack's
containers (tests/e2e/) and bench/'s throwaway servers, queried alike (Redis.container("cache").cmd(...)
or Redis(["redis-cli", "-p", port]).cmd(...)). The Rust tests have their own, tests/integration/support/."""

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


def run(argv, timeout=120, **kw):
    """subprocess.run, output captured as text; past the deadline the process is killed and the
    result has returncode 124 and says so on stderr (never an exception)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
        return subprocess.CompletedProcess(argv, 124, out, f"{err}\n{os.path.basename(argv[0])}: timeout after {timeout} s")


def http_get(url, timeout=2.0):
    """(HTTP status, body) of GET url; (None, the error) when there is no HTTP answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except Exception as e:  # noqa: BLE001 - refused, reset, timeout, ...: no answer (yet)
        return None, str(e)


def wait_for(what, timeout=30, pause=0.1, proc=None):
    """what() until it returns something true, then that; else its last result once timeout
    seconds have passed or proc has exited. A RuntimeError from what() counts as None."""
    end = time.monotonic() + timeout
    while True:
        try:
            got = what()
        except RuntimeError:
            got = None
        if got or time.monotonic() > end or (proc is not None and proc.poll() is not None):
            return got
        time.sleep(pause)


def _output(argv, timeout):
    p = run(argv, timeout)
    if p.returncode != 0 or p.stdout.startswith("ERR"):  # redis-cli says ERR on stdout, rc 0
        raise RuntimeError(f"{argv[-1]}: {(p.stderr or p.stdout).strip()}")
    return p.stdout.strip()


class Redis:
    def __init__(self, cli):
        self.cli = cli

    @classmethod
    def container(cls, name, user=None, password=None):
        """redis-cli in the container; as an ACL user when given (password via the environment
        of the exec, never on a command line)."""
        auth = ["-e", f"REDISCLI_AUTH={password}"] if password else []
        return cls(["docker", "exec", *auth, name, "redis-cli", *(["--user", user] if user else [])])

    def cmd(self, *args, timeout=30):
        return _output([*self.cli, "--raw", *args], timeout)


class Postgres:
    def __init__(self, psql):
        self.psql = psql

    @classmethod
    def container(cls, name, user, db):
        return cls(["docker", "exec", name, "psql", "-U", user, "-d", db])

    def value(self, sql, timeout=30):
        return _output([*self.psql, "-v", "ON_ERROR_STOP=1", "-tAc", sql], timeout)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid):
    """/proc/<pid>/status as {field: [words]} (memory in kB); {} once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: v.split() for k, _, v in (line.partition(":") for line in f)}
    except OSError:
        return {}


def spawn(argv, log_path, **kw):
    """Popen in its own process group (stop() signals the whole group), output to log_path."""
    with open(log_path, "w") as log:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, **kw)
    p.log_path = log_path
    return p


def stop(p, sig=signal.SIGTERM, timeout=15):
    """Signal p's process group, wait, SIGKILL after timeout seconds; returns the exit code.
    Once p has been waited for, only returns its code (its pid may be another process's by now)."""
    if p.returncode is not None:
        return p.returncode
    for s in (sig, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, s)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    return p.wait()
