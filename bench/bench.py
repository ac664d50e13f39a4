#!/usr/bin/env python3
"""desafio3 benchmark driver (run through bench/run, which installs what this needs).

Starts a throwaway Redis and PostgreSQL (password auth, scram-sha-256 over TCP on loopback,
as in the compose stack), then measures with wrk, at each concurrency after a warm-up:
  web GET /          the product
  web GET /healthz   the HTTP ceiling of the same binary
  flask-dev GET /    the seed's app (reference/seed_app.py, Flask's development server)
  gunicorn GET /     the same app deployed carefully (reference/pooled_app.py)
and the floors of the two dependencies at the same concurrency:
  pgbench            SELECT now(); -M prepared
  redis-benchmark    INCR
Writes <out>/<date>.{json,md,png} and <out>/latest.{json,md,png}.
"""

import argparse
import datetime as dt
import glob
import json
import os
import platform
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REFERENCE = os.path.join(HERE, "reference")
VENV_BIN = os.path.dirname(sys.executable)

SYSTEMS = {
    # key: (label, kind, path)
    "web": ("web GET /", "wrk", "/"),
    "web-healthz": ("web GET /healthz", "wrk", "/healthz"),
    "flask-dev": ("flask-dev GET / (seed)", "wrk", "/"),
    "gunicorn": ("gunicorn GET /", "wrk", "/"),
    "pgbench": ("pgbench SELECT now()", "pgbench", None),
    "redis": ("redis-benchmark INCR", "redis", None),
}
ORDER = list(SYSTEMS)

WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d," ..
    "\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d," ..
    "\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"max_us\":%d,\"mean_us\":%.1f}\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir():
    """Directory with initdb/postgres: PATH first, then Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return os.path.dirname(os.path.realpath(found))
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                   key=lambda p: int(re.sub(r"\D", "", p.split("/")[-2]) or 0))
    for c in reversed(cands):
        if os.path.exists(os.path.join(c, "initdb")):
            return c
    sys.exit("bench: PostgreSQL server binaries (initdb, postgres) not found")


def find_tool(name, bindir):
    p = os.path.join(bindir, name)
    if os.path.exists(p):
        return p
    p = shutil.which(name)
    if not p:
        sys.exit(f"bench: {name} not found")
    return p


class Procs:
    """Processes started by this script; each in its own process group, stopped at exit."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        p.bench_name = name
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=15):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{p.bench_name} ignored {sig.name} for {timeout}s: SIGKILL")
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        if p in self.procs:
            self.procs.remove(p)
        return p.returncode

    def stop_all(self):
        for p in reversed(list(self.procs)):
            sig = signal.SIGINT if p.bench_name == "postgres" else signal.SIGTERM
            self.stop(p, sig)


def as_unprivileged(argv):
    """initdb/postgres refuse to run as root: drop to `nobody` when we are root."""
    if os.geteuid() != 0:
        return argv
    pw = pwd.getpwnam("nobody")
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
            "--"] + argv


def http_get(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except Exception as e:  # noqa: BLE001 - any failure means "not yet"
        return None, str(e)


def wait_until(pred, timeout, what, proc=None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        ok, last = pred()
        if ok:
            return last
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready after {timeout}s (last: {last})")


def proc_status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def tree_pids(pid):
    """pid and its descendants (for gunicorn's workers)."""
    out = [pid]
    try:
        kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                              text=True).stdout.split()
    except OSError:
        return out
    for k in kids:
        out.extend(tree_pids(int(k)))
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.procs = Procs()
        self.tmp = tempfile.mkdtemp(prefix="desafio3-bench-")
        self.results = []
        self.notes = []
        self.meta = {}

    # ---------------------------------------------------------------- dependencies
    def start_deps(self):
        bindir = pg_bindir()
        self.pg_bindir = bindir
        self.pgbench = find_tool("pgbench", bindir)
        self.password = secrets.token_urlsafe(18)
        self.pwfile = os.path.join(self.tmp, "db_password")
        with open(self.pwfile, "w") as f:
            f.write(self.password + "\n")
        os.chmod(self.pwfile, 0o644)
        pgdata = os.path.join(self.tmp, "pgdata")
        if os.geteuid() == 0:
            pw = pwd.getpwnam("nobody")
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
        os.chmod(self.tmp, 0o755)

        # Redis
        self.redis_port = free_port()
        self.redis = self.procs.start("redis-server", [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--maxclients", "10000",
            "--dir", self.tmp, "--loglevel", "warning"],
            stdout=open(os.path.join(self.tmp, "redis.log"), "w"), stderr=subprocess.STDOUT)
        wait_until(lambda: (self._redis_cli("PING") == "PONG", None), 10, "redis",
                   self.redis)

        # PostgreSQL: initdb as an unprivileged user, scram-sha-256 over TCP.
        log(f"initdb ({bindir})")
        subprocess.run(as_unprivileged([
            os.path.join(bindir, "initdb"), "-D", pgdata, "-U", "admin", "--pwfile",
            self.pwfile, "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8",
            "--locale=C", "--no-sync"]), check=True, stdout=subprocess.DEVNULL,
            cwd=self.tmp)
        self.pg_port = free_port()
        self.pg = self.procs.start("postgres", as_unprivileged([
            os.path.join(bindir, "postgres"), "-D", pgdata, "-p", str(self.pg_port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.tmp}",
            "-c", "max_connections=600", "-c", "fsync=off", "-c", "logging_collector=off",
            "-c", "log_min_messages=warning", "-c", "TimeZone=UTC"]),
            stdout=open(os.path.join(self.tmp, "postgres.log"), "w"),
            stderr=subprocess.STDOUT, cwd=self.tmp)
        import psycopg2  # noqa: PLC0415 - from the venv

        def pg_ready():
            try:
                c = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="admin",
                                     password=self.password, dbname="postgres",
                                     connect_timeout=2)
                c.close()
                return True, None
            except psycopg2.Error as e:
                return False, str(e).strip()

        wait_until(pg_ready, 30, "postgres", self.pg)
        c = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="admin",
                             password=self.password, dbname="postgres")
        c.autocommit = True
        c.cursor().execute("CREATE DATABASE desafio3")
        ver = c.server_version
        c.close()
        self.meta["postgres_version"] = f"{ver // 10000}.{ver % 10000}"
        self.meta["redis_version"] = self._redis_cli("INFO", "server").split(
            "redis_version:")[1].split()[0]
        self.env = dict(os.environ,
                        REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
                        DATABASE_URL=f"postgres://admin@127.0.0.1:{self.pg_port}/desafio3",
                        DATABASE_PASSWORD_FILE=self.pwfile, RUST_LOG="warn",
                        BIND_HOST="127.0.0.1")
        log(f"redis on :{self.redis_port}, postgres on :{self.pg_port}")

    def _redis_cli(self, *cmd):
        r = subprocess.run(["redis-cli", "-p", str(self.redis_port), *cmd],
                           capture_output=True, text=True, timeout=5)
        return r.stdout.strip()

    def visits(self):
        v = self._redis_cli("GET", "visitas")
        return int(v) if v.isdigit() else 0

    # ---------------------------------------------------------------- measurement
    def concurrencies(self):
        return self.args.concurrency

    def wrk(self, port, path, c, secs, timeout_s):
        script = os.path.join(self.tmp, "report.lua")
        if not os.path.exists(script):
            with open(script, "w") as f:
                f.write(WRK_LUA)
        argv = ["wrk", "-t", str(min(2, c)), "-c", str(c), "-d", f"{secs}s",
                "--timeout", f"{timeout_s}s", "-s", script, f"http://127.0.0.1:{port}{path}"]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 30)
        except subprocess.TimeoutExpired:
            return {"error": "wrk did not finish in time"}
        m = re.search(r"^WRKJSON (.*)$", r.stdout, re.M)
        if not m:
            return {"error": f"wrk failed: {r.stdout[-300:]} {r.stderr[-300:]}"}
        d = json.loads(m.group(1))
        if d["requests"] == 0:
            return {"rps": 0.0, "ok_rps": 0.0, "p50_ms": None, "p99_ms": None,
                    "requests": 0, "duration_s": round(d["duration_us"] / 1e6, 3),
                    "errors": d["connect"] + d["read"] + d["write"] + d["timeout"],
                    "error_detail": {k: d[k] for k in ("connect", "read", "write",
                                                       "timeout") if d[k]},
                    "note": f"no response completed within {secs} s"}
        dur = d["duration_us"] / 1e6
        ok = d["requests"] - d["status"]
        errs = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
        return {
            "rps": round(d["requests"] / dur, 1) if dur else 0.0,
            "ok_rps": round(ok / dur, 1) if dur else 0.0,
            "p50_ms": d["p50_us"] / 1000, "p99_ms": d["p99_us"] / 1000,
            "mean_ms": round(d["mean_us"] / 1000, 3), "max_ms": d["max_us"] / 1000,
            "requests": d["requests"], "duration_s": round(dur, 3), "errors": errs,
            "error_detail": {k: d[k] for k in ("connect", "read", "write", "status",
                                               "timeout") if d[k]},
        }

    def pgbench_run(self, c, secs):
        script = os.path.join(self.tmp, "now.sql")
        if not os.path.exists(script):
            with open(script, "w") as f:
                f.write("SELECT now();\n")
        argv = [self.pgbench, "-n", "-M", "prepared", "-c", str(c), "-j", str(min(2, c)),
                "-T", str(secs), "-f", script, "-h", "127.0.0.1", "-p", str(self.pg_port),
                "-U", "admin"]
        argv.append("desafio3")
        env = dict(os.environ, PGPASSWORD=self.password)
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 60,
                               env=env, cwd=self.tmp)
        except subprocess.TimeoutExpired:
            return {"error": "pgbench did not finish in time"}
        m = re.search(r"^tps = ([\d.]+) \(without initial connection time\)", r.stdout, re.M)
        if not m:
            m = re.search(r"^tps = ([\d.]+)", r.stdout, re.M)
        if not m:
            return {"error": f"pgbench failed: {r.stdout[-300:]} {r.stderr[-300:]}"}
        res = {"rps": round(float(m.group(1)), 1)}
        g = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
        res["requests"] = int(g.group(1)) if g else None
        g = re.search(r"number of failed transactions: (\d+)", r.stdout)
        res["errors"] = int(g.group(1)) if g else 0
        g = re.search(r"latency average = ([\d.]+) ms", r.stdout)
        res["mean_ms"] = float(g.group(1)) if g else None
        res["duration_s"] = secs
        return res

    def redis_run(self, c, n):
        argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(self.redis_port), "-t", "incr",
                "-c", str(c), "-n", str(n), "--csv"]
        if c > 1:
            argv += ["--threads", str(min(2, c))]
        t0 = time.monotonic()
        try:
            r = subprocess.run(argv, capture_output=True, text=True,
                               timeout=self.args.duration + 60)
        except subprocess.TimeoutExpired:
            return {"error": "redis-benchmark did not finish in time"}
        wall = time.monotonic() - t0
        rows = [ln for ln in r.stdout.splitlines() if ln.startswith('"INCR"')]
        if not rows:
            return {"error": f"redis-benchmark failed: {r.stdout[-300:]} {r.stderr[-300:]}"}
        head = [h.strip('"') for h in r.stdout.splitlines()[0].split(",")]
        vals = [v.strip('"') for v in rows[0].split(",")]
        d = dict(zip(head, vals))
        return {"rps": round(float(d["rps"]), 1), "p50_ms": float(d["p50_latency_ms"]),
                "p99_ms": float(d["p99_latency_ms"]), "mean_ms": float(d["avg_latency_ms"]),
                "max_ms": float(d["max_latency_ms"]), "requests": n,
                "duration_s": round(wall, 3), "errors": 0}

    def record(self, key, c, res, extra=None):
        label = SYSTEMS[key][0]
        row = {"system": key, "label": label, "concurrency": c}
        row.update(res)
        if extra:
            row.update(extra)
        self.results.append(row)
        if "error" in res:
            log(f"  {label:28s} c={c:<4d} FAILED: {res['error']}")
        else:
            log(f"  {label:28s} c={c:<4d} {res['rps']:>10.1f} req/s  "
                f"p50 {fmt_ms(res.get('p50_ms'))}  p99 {fmt_ms(res.get('p99_ms'))}  "
                f"errors {res.get('errors')}")

    def http_series(self, key, port, path, pids_fn=None):
        a = self.args
        for c in self.concurrencies():
            timeout_s = a.http_timeout
            if a.warmup:
                self.wrk(port, path, c, a.warmup, timeout_s)
                self.settle(port, path)
            v0 = self.visits()
            res = self.wrk(port, path, c, a.duration, timeout_s)
            extra = {}
            if path == "/" and "error" not in res:
                # every GET / must have counted exactly one visit in Redis (a request still
                # in flight when wrk stops may count without being reported)
                time.sleep(0.2)
                extra["visits_counted"] = self.visits() - v0
                served = res["requests"] - res["error_detail"].get("status", 0)
                if extra["visits_counted"] < served:
                    self.notes.append(
                        f"{key} c={c}: {served} successful GET / but only "
                        f"{extra['visits_counted']} INCRs reached Redis (degraded answers?)")
            if res.get("note"):
                self.notes.append(f"{key} c={c}: {res['note']}")
            if pids_fn:
                extra["peak_rss_kib"] = sum(
                    proc_status_kib(p, "VmHWM") or 0 for p in pids_fn())
            st, body = self.settle(port, path)
            extra["check_after"] = {"status": st, "body": body[:200]}
            self.record(key, c, res, extra)

    def settle(self, port, path):
        """One request after a run: it queues behind whatever the run left in flight, so
        the next run starts on an idle server (matters for the slow reference apps)."""
        return http_get(f"http://127.0.0.1:{port}{path}", timeout=60)

    # ---------------------------------------------------------------- systems
    def build_web(self):
        if self.args.skip_build:
            return
        log("cargo build --release --bin web")
        subprocess.run(["cargo", "build", "--release", "--bin", "web"], cwd=ROOT, check=True)

    def run_web(self):
        exe = os.path.join(ROOT, "target", "release", "web")
        port = free_port()
        env = dict(self.env, PORT=str(port))
        out = open(os.path.join(self.tmp, "web.log"), "w")
        p = self.procs.start("web", [exe], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: self._ready_ok(port), 30, "web", p)
        except RuntimeError as e:
            self.notes.append(f"web did not become ready: {e}")
            log(f"web did not become ready: {e}; log tail:\n{tail(out.name)}")
            self.procs.stop(p)
            return
        st, body = http_get(f"http://127.0.0.1:{port}/")
        self.meta["web_sample"] = body
        self.meta["web_rss_idle_kib"] = proc_status_kib(p.pid, "VmRSS")
        if "web" in self.args.systems:
            self.http_series("web", port, "/", lambda: [p.pid])
        if "web-healthz" in self.args.systems:
            self.http_series("web-healthz", port, "/healthz", lambda: [p.pid])
        self.meta["web_peak_rss_kib"] = proc_status_kib(p.pid, "VmHWM")
        self.meta["web_threads"] = proc_status_kib(p.pid, "Threads")
        t0 = time.monotonic()
        rc = self.procs.stop(p, signal.SIGTERM, timeout=15)
        self.meta["web_sigterm_exit"] = {"code": rc, "seconds": round(time.monotonic() - t0, 2)}
        out.close()
        errs = [ln for ln in open(out.name) if '"ERROR"' in ln or '"WARN"' in ln]
        self.meta["web_log_warnings"] = len(errs)
        self.meta["web_log_sample"] = [ln.strip()[:300] for ln in errs[:5]]

    def _ready_ok(self, port):
        st, body = http_get(f"http://127.0.0.1:{port}/")
        return (st == 200 and '"ok"' in body), (st, body[:200])

    def run_flask_dev(self):
        port = free_port()
        env = dict(self.env, PORT=str(port))
        out = open(os.path.join(self.tmp, "flask-dev.log"), "w")
        p = self.procs.start("flask-dev", [sys.executable, "seed_app.py"], env=env,
                             cwd=REFERENCE, stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: self._ready_ok(port), 30, "flask-dev", p)
        self.meta["flask_dev_sample"] = http_get(f"http://127.0.0.1:{port}/")[1]
        self.http_series("flask-dev", port, "/", lambda: [p.pid])
        self.procs.stop(p)
        out.close()

    def run_gunicorn(self):
        port = free_port()
        env = dict(self.env, PORT=str(port))
        out = open(os.path.join(self.tmp, "gunicorn.log"), "w")
        p = self.procs.start("gunicorn", [os.path.join(VENV_BIN, "gunicorn"), "-c",
                                          "gunicorn.conf.py", "pooled_app:app"],
                             env=env, cwd=REFERENCE, stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: self._ready_ok(port), 30, "gunicorn", p)
        self.meta["gunicorn_workers"] = len(tree_pids(p.pid)) - 1
        self.http_series("gunicorn", port, "/", lambda: tree_pids(p.pid))
        self.procs.stop(p)
        out.close()

    def run_pgbench(self):
        a = self.args
        for c in self.concurrencies():
            if a.warmup:
                self.pgbench_run(c, a.warmup)
            self.record("pgbench", c, self.pgbench_run(c, a.duration))

    def run_redis(self):
        a = self.args
        for c in self.concurrencies():
            # redis-benchmark counts requests, not seconds: the warm-up doubles as a rate
            # estimate (a short probe, then ~warm-up seconds) so the measured run lasts
            # about `duration`
            rate = self.redis_run(c, 5000).get("rps") or 10000
            if a.warmup:
                rate = self.redis_run(c, max(5000, int(rate * a.warmup))).get("rps") or rate
            n = max(1000, int(rate * a.duration))
            self.record("redis", c, self.redis_run(c, n))

    # ---------------------------------------------------------------- driver
    def run(self):
        started = time.time()
        with open("/proc/loadavg") as f:
            self.meta["loadavg_at_start"] = f.read().split()[:3]
        self.start_deps()
        if {"web", "web-healthz"} & set(self.args.systems):
            self.build_web()
        steps = [("web", self.run_web), ("flask-dev", self.run_flask_dev),
                 ("gunicorn", self.run_gunicorn), ("pgbench", self.run_pgbench),
                 ("redis", self.run_redis)]
        for key, fn in steps:
            if key == "web":
                if not ({"web", "web-healthz"} & set(self.args.systems)):
                    continue
            elif key not in self.args.systems:
                continue
            log(f"== {key}")
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - record and go on with the others
                self.notes.append(f"{key}: {e}")
                log(f"{key} failed: {e}")
        self.meta["wall_seconds"] = round(time.time() - started, 1)

    def close(self):
        self.procs.stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)


def tail(path, n=20):
    try:
        with open(path) as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def fmt_ms(v):
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_rps(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


# -------------------------------------------------------------------- reporting
def get(results, system, c):
    for r in results:
        if r["system"] == system and r["concurrency"] == c and "error" not in r:
            return r
    return None


def ratios(doc):
    res = doc["results"]
    out = []

    def ratio(name, num, den, target, better="ge"):
        val = None if (num is None or den in (None, 0)) else num / den
        out.append({"name": name, "value": val, "target": target, "cmp": better,
                    "met": None if val is None else (val >= target if better == "ge"
                                                     else val <= target)})

    w = get(res, "web", 64)
    rps = lambda k: (get(res, k, 64) or {}).get("rps")  # noqa: E731
    ratio("web GET / ÷ flask-dev (seed), c=64", w and w["rps"], rps("flask-dev"), 100)
    ratio("web GET / ÷ gunicorn, c=64", w and w["rps"], rps("gunicorn"), 5)
    ratio("web GET / ÷ pgbench SELECT now(), c=64", w and w["rps"], rps("pgbench"), 0.9)
    ratio("web GET / p99 (ms), c=64", w and w.get("p99_ms"), 1, 5, "le")
    ratio("web GET / errors, c=64", w and w.get("errors"), 1, 0, "le")
    rss = doc["meta"].get("web_peak_rss_kib")
    ratio("web peak RSS (MiB)", rss and rss / 1024, 1, 20, "le")
    webs = [r["rps"] for r in res if r["system"] == "web" and "error" not in r]
    w256 = get(res, "web", 256)
    ratio("web GET / c=256 ÷ its best", w256 and w256["rps"], max(webs) if webs else None,
          0.9)
    return out


def markdown(doc):
    res = doc["results"]
    m = doc["meta"]
    lines = [f"# desafio3 benchmark — {doc['date']}", ""]
    lines.append(f"Machine: {m.get('cpus')} CPUs, {m.get('cpu_model', '?')}, "
                 f"Linux {m.get('kernel')}; Redis {m.get('redis_version')}, PostgreSQL "
                 f"{m.get('postgres_version')}; everything (load generator included) on the "
                 f"same machine over loopback. Each point: {doc['config']['warmup_s']} s "
                 f"warm-up, then {doc['config']['duration_s']} s measured; wrk threads = "
                 f"min(2, c), wrk timeout {doc['config']['http_timeout_s']} s.")
    lines.append("")
    lines.append("| system | c | req/s | p50 ms | p99 ms | mean ms | errors |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for key in ORDER:
        for c in doc["config"]["concurrency"]:
            rows = [r for r in res if r["system"] == key and r["concurrency"] == c]
            if not rows:
                continue
            r = rows[0]
            if "error" in r:
                lines.append(f"| {r['label']} | {c} | failed | — | — | — | {r['error'][:60]} |")
                continue
            errs = str(r.get("errors", 0))
            if r.get("error_detail"):
                errs += " (" + ", ".join(f"{k} {v}" for k, v in r["error_detail"].items()) + ")"
            lines.append(f"| {r['label']} | {c} | {fmt_rps(r['rps'])} | "
                         f"{fmt_ms(r.get('p50_ms'))} | {fmt_ms(r.get('p99_ms'))} | "
                         f"{fmt_ms(r.get('mean_ms'))} | {errs} |")
    lines.append("")
    lines.append("wrk and redis-benchmark report latency percentiles. pgbench reports only "
                 "its `latency average` (the mean column): its per-transaction log takes one "
                 "timestamp per event-loop pass for all clients of a thread, so percentiles "
                 "from it are not meaningful at c > 1 (many 0 µs transactions), and logging "
                 "would slow the floor down.")
    lines.append("")
    lines.append("## Targets (c=64 unless noted)")
    lines.append("")
    lines.append("| measure | value | target | met |")
    lines.append("|---|---:|---:|:---:|")
    for r in doc["ratios"]:
        v = r["value"]
        vs = "—" if v is None else (f"{v:.2f}" if abs(v) < 100 else f"{v:,.0f}")
        if r["name"].startswith("web GET / ÷") or "÷ its best" in r["name"]:
            vs = "—" if v is None else f"{v:.2f}×"
        elif "errors" in r["name"] and v is not None:
            vs = f"{v:.0f}"
        tgt = ("≥ " if r["cmp"] == "ge" else "≤ ") + f"{r['target']:g}"
        met = {True: "yes", False: "**no**", None: "—"}[r["met"]]
        lines.append(f"| {r['name']} | {vs} | {tgt} | {met} |")
    lines.append("")
    extra = []
    if m.get("web_peak_rss_kib"):
        extra.append(f"web peak RSS (VmHWM) {m['web_peak_rss_kib'] / 1024:.1f} MiB "
                     f"(idle after start {(m.get('web_rss_idle_kib') or 0) / 1024:.1f} MiB)")
    for key in ("flask-dev", "gunicorn"):
        rss = [r.get("peak_rss_kib") for r in res if r["system"] == key and
               r.get("peak_rss_kib")]
        if rss:
            extra.append(f"{key} peak RSS {max(rss) / 1024:.1f} MiB"
                         + (" (master + workers)" if key == "gunicorn" else ""))
    if m.get("web_sigterm_exit"):
        e = m["web_sigterm_exit"]
        extra.append(f"web SIGTERM after the run: exit {e['code']} in {e['seconds']} s")
    if extra:
        lines.append("Also: " + "; ".join(extra) + ".")
        lines.append("")
    if doc.get("notes"):
        lines.append("Notes: " + "; ".join(doc["notes"]))
        lines.append("")
    return "\n".join(lines)


def plot(doc, path):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"web": ("C0", "o", "-"), "web-healthz": ("C0", "s", ":"),
              "flask-dev": ("C3", "v", "-"), "gunicorn": ("C1", "^", "-"),
              "pgbench": ("C2", "D", "--"), "redis": ("C4", "P", "--")}
    for key in ORDER:
        rows = sorted((r for r in doc["results"] if r["system"] == key and "error" not in r),
                      key=lambda r: r["concurrency"])
        if not rows:
            continue
        color, marker, ls = styles[key]
        xs = [r["concurrency"] for r in rows]
        ax1.plot(xs, [max(r["rps"], 0.1) for r in rows], color=color, marker=marker,
                 linestyle=ls, label=SYSTEMS[key][0])
        p = [(r["concurrency"], r["p99_ms"]) for r in rows if r.get("p99_ms") is not None]
        label = SYSTEMS[key][0]
        if not p:  # pgbench: only its mean latency is meaningful
            p = [(r["concurrency"], r["mean_ms"]) for r in rows if r.get("mean_ms")]
            label += " (mean)"
            ls = ":"
        if p:
            ax2.plot([x for x, _ in p], [y for _, y in p], color=color, marker=marker,
                     linestyle=ls, label=label)
    for ax, title, yl in ((ax1, "throughput", "requests/s (log)"),
                          (ax2, "p99 latency (grey line: 5 ms target)", "p99 ms (log)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent connections (log)")
        ax.set_ylabel(yl)
        ax.set_title(title)
        cs = doc["config"]["concurrency"]
        ax.set_xticks(cs)
        ax.set_xticklabels([str(c) for c in cs])
        ax.grid(True, which="both", alpha=0.3)
    ax2.axhline(5, color="grey", linewidth=0.8, linestyle="-.")
    ax1.legend(fontsize=8, loc="best")
    ax2.legend(fontsize=8, loc="best")
    fig.suptitle(f"desafio3 — web vs the seed's Flask app and the dependency floors "
                 f"({doc['date']}, {doc['meta'].get('cpus')} CPUs, loopback)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_meta():
    m = {"cpus": os.cpu_count(), "kernel": platform.release(),
         "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    m["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for name, argv in (("wrk", ["wrk", "-v"]), ("rustc", ["rustc", "--version"])):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            m[name] = (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            pass
    return m


def write_outputs(doc, outdir, stamp):
    os.makedirs(outdir, exist_ok=True)
    base = os.path.join(outdir, stamp)
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    md = markdown(doc)
    with open(base + ".md", "w") as f:
        f.write(md + "\n")
    try:
        plot(doc, base + ".png")
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {e}")
    for ext in ("json", "md", "png"):
        src = f"{base}.{ext}"
        if os.path.exists(src) and stamp != "latest":
            shutil.copyfile(src, os.path.join(outdir, f"latest.{ext}"))
    return md


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="c=64 only, a few seconds each; results to bench/results/quick/")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                    default=None, help="comma list (default 1,16,64,256)")
    ap.add_argument("--duration", type=int, default=None, help="seconds measured per point")
    ap.add_argument("--warmup", type=int, default=None, help="seconds of warm-up per point")
    ap.add_argument("--http-timeout", type=int, default=5, help="wrk --timeout seconds")
    ap.add_argument("--systems", type=lambda s: s.split(","), default=ORDER,
                    help="comma list of: " + ",".join(ORDER))
    ap.add_argument("--out", default=None, help="output directory")
    ap.add_argument("--skip-build", action="store_true", help="use target/release/web as is")
    a = ap.parse_args()
    unknown = set(a.systems) - set(ORDER)
    if unknown:
        ap.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if a.quick:
        a.concurrency = a.concurrency or [64]
        a.duration = a.duration or 3
        a.warmup = 1 if a.warmup is None else a.warmup
        a.out = a.out or os.path.join(HERE, "results", "quick")
    a.concurrency = a.concurrency or [1, 16, 64, 256]
    a.duration = a.duration or 10
    a.warmup = 2 if a.warmup is None else a.warmup
    a.out = a.out or os.path.join(HERE, "results")

    b = Bench(a)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    today = dt.date.today().isoformat()
    try:
        b.run()
    except KeyboardInterrupt:
        log("interrupted: stopping the servers")
        b.close()
        sys.exit(130)
    finally:
        b.close()
    doc = {
        "date": today,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {"concurrency": a.concurrency, "duration_s": a.duration,
                   "warmup_s": a.warmup, "http_timeout_s": a.http_timeout,
                   "quick": a.quick, "systems": a.systems},
        "meta": {**machine_meta(), **b.meta},
        "results": b.results,
        "notes": b.notes,
    }
    doc["ratios"] = ratios(doc)
    md = write_outputs(doc, a.out, today)
    print(md)
    log(f"wrote {os.path.join(a.out, today)}.{{json,md,png}} and latest.* "
        f"in {doc['meta']['wall_seconds']} s")
    failed = [r for r in b.results if "error" in r]
    if b.notes or failed:
        log(f"{len(b.notes)} system(s) failed to run, {len(failed)} point(s) failed")


if __name__ == "__main__":
    main()
