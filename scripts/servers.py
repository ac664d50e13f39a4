"""Redis and PostgreSQL for the Python tools: throwaway servers (bench/) and the compose
stack's containers (tests/e2e/), queried the same way. Standard library only.

    with throwaway(workdir) as (redis, pg):           # free loopback ports, stopped at exit
        redis.cmd("PING"); pg.value("SELECT now()")
    Redis.container("cache").cmd("GET", "visitas")    # `docker exec cache redis-cli ...`
    Postgres.container("db", "admin", "desafio3").value("SELECT 1")
    run(argv, timeout)                                # subprocess.run, bounded, never raising
    http_get(url), wait_for(lambda: ..., timeout)     # one GET; polling until something holds

The one helper of the Python tools (bench/, tests/e2e/); the Rust tests have
tests/integration/support/.
"""

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


def run(argv, timeout=120, **kw):
    """subprocess.run with output captured as text and a deadline: past it, the process is
    killed and the result has returncode 124 and says so on stderr (never an exception)."""
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
    def __init__(self, cli, port=None):
        self.cli, self.port = cli, port

    @classmethod
    def container(cls, name, user=None, password=None):
        """redis-cli in the container; as an ACL user when given (password via the environment
        of the exec, never on a command line)."""
        auth = ["-e", f"REDISCLI_AUTH={password}"] if password else []
        return cls(["docker", "exec", *auth, name, "redis-cli", *(["--user", user] if user else [])])

    def cmd(self, *args, timeout=30):
        return _output([*self.cli, "--raw", *args], timeout)


class Postgres:
    def __init__(self, psql, port=None, password=None, password_file=None, bindir=None):
        self.psql, self.port, self.password, self.password_file, self.bindir = psql, port, password, password_file, bindir

    @classmethod
    def container(cls, name, user, db):
        return cls(["docker", "exec", name, "psql", "-U", user, "-d", db])

    def value(self, sql, timeout=30):
        return _output([*self.psql, "-v", "ON_ERROR_STOP=1", "-tAc", sql], timeout)


def pg_bindir():
    """Directory of initdb/postgres: PATH first, then the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return os.path.dirname(os.path.realpath(found))
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not cands:
        raise RuntimeError("PostgreSQL server binaries (initdb, postgres) not found")
    return os.path.dirname(cands[-1])


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


def unprivileged(argv):
    """initdb and postgres refuse root: run them as `nobody` when we are root."""
    pw = pwd.getpwnam("nobody")
    return argv if os.geteuid() else ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
                                      "--", *argv]


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


@contextlib.contextmanager
def throwaway(workdir, user="admin", db="desafio3", redis_args=(), pg_args=()):
    """redis-server and PostgreSQL on free loopback ports, data in workdir (an empty directory,
    given to `nobody` when run as root). PostgreSQL: superuser `user` with a random password
    (also in workdir/db_password, mode 0644), scram-sha-256 over TCP, trust on its socket in
    workdir, database `db`. Both are stopped when the block ends, also on errors."""
    with contextlib.ExitStack() as stack:
        if os.geteuid() == 0:
            os.chown(workdir, pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
        os.chmod(workdir, 0o755)
        password, pwfile = secrets.token_urlsafe(18), os.path.join(workdir, "db_password")
        with open(pwfile, "w") as f:
            f.write(password + "\n")
        os.chmod(pwfile, 0o644)  # initdb reads it as nobody

        def start(name, argv, sig=signal.SIGTERM):  # stopped when the block ends
            p = spawn(argv, os.path.join(workdir, f"{name}.log"), cwd=workdir)
            stack.callback(stop, p, sig)
            return p

        rport = free_port()
        rproc = start("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", workdir, *redis_args])
        redis = Redis(["redis-cli", "-p", str(rport)], port=rport)

        bindir = pg_bindir()
        subprocess.run(unprivileged([f"{bindir}/initdb", "-D", f"{workdir}/pgdata", "-U", user, "--pwfile", pwfile,
                                     "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8",
                                     "--locale=C", "--no-sync"]), check=True, stdout=subprocess.DEVNULL, cwd=workdir)
        pport = free_port()
        pproc = start("postgres", unprivileged([f"{bindir}/postgres", "-D", f"{workdir}/pgdata", "-p", str(pport),
                                                "-c", "listen_addresses=127.0.0.1",
                                                "-c", f"unix_socket_directories={workdir}", *pg_args]),
                      signal.SIGINT)  # postgres' fast stop
        psql = shutil.which("psql", path=bindir) or "psql"
        socket_psql = [psql, "-h", workdir, "-p", str(pport), "-U", user, "--no-psqlrc"]
        for name, proc, ready in (("redis", rproc, lambda: redis.cmd("PING") == "PONG"),
                                  ("postgres", pproc, lambda: Postgres(socket_psql + ["-d", "postgres"]).value("SELECT 1"))):
            if not wait_for(ready, proc=proc):
                raise RuntimeError(f"{name} did not start (rc {proc.poll()}): see {workdir}/{name}.log")
        Postgres(socket_psql + ["-d", "postgres"]).value(f'CREATE DATABASE "{db}"')
        yield redis, Postgres(socket_psql + ["-d", db], port=pport, password=password, password_file=pwfile,
                              bindir=bindir)
