#!/usr/bin/env python3
"""desafio3 benchmark driver, run through bench/run (which installs what this needs); what it
measures and writes (<out>/<date>.{json,md}, <out>/latest.md pointing at them): bench/README.md.
"""

import argparse
import datetime as dt
import json
import os
import platform
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REFERENCE = os.path.join(HERE, "reference")
VENV_BIN = os.path.dirname(sys.executable)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from servers import free_port, http_get, proc_status, run, spawn, stop, throwaway, wait_for  # noqa: E402 - shared with tests/e2e

SYSTEMS = {"web": "web GET /", "web-3": "web GET / (3 replicas)", "web-healthz": "web GET /healthz",
           "web-info": "web GET / (RUST_LOG=info)", "web-tls": "web GET / (TLS to both)", "nginx": "nginx return 200",
           "flask-dev": "flask-dev GET / (seed)", "gunicorn": "gunicorn GET /", "pgbench": "pgbench SELECT now()"}  # key: label
ORDER = list(SYSTEMS)
HTTP_TIMEOUT_S = 5  # wrk --timeout
REPLICAS = 3  # the web-3 row
# PostgreSQL (15+) publishes a backend's counters in pg_stat_database when it goes idle at most
# once a second, and otherwise after 10 s idle: read xact_commit only after that long without load
PGSTAT_FLUSH_S = 10.5
CONFIRMED = ("ahead", "after", "again")  # visit_counter_confirmations_total{sent=...}
CPB_TARGET = {1: 1.2, REPLICAS: 1.3}  # commits per batch, shown beside the measure (not a pass/fail)

# wrk's report as one line: WRKJSON [requests, duration_us, errors.{connect,read,write,status,timeout},
# p50_us, p99_us, max_us, mean_us]
WRK_LUA = r"""
done = function(s, lat, requests)
  local e = s.errors
  io.write(string.format("WRKJSON [%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%.1f]\n", s.requests, s.duration, e.connect,
    e.read, e.write, e.status, e.timeout, lat:percentile(50), lat:percentile(99), lat.max, lat.mean))
end
"""
WRK_FIELDS = ("requests", "duration_us", "connect", "read", "write", "status", "timeout", "p50_us", "p99_us",
              "max_us", "mean_us")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def settle(port, path):
    """One request after a run: it queues behind whatever the run left in flight, so the next
    run starts on an idle server (matters for the slow reference apps)."""
    return http_get(f"http://127.0.0.1:{port}{path}", timeout=60)


def tree_pids(pid):
    """pid and its descendants."""
    kids = run(["ps", "-o", "pid=", "--ppid", str(pid)], 10).stdout.split()
    return [pid] + [d for k in kids for d in tree_pids(int(k))]


class Bench:
    def __init__(self, args):
        self.args, self.results, self.notes, self.meta, self.round = args, [], [], {}, 0
        self.tmp = tempfile.mkdtemp(prefix="desafio3-bench-")
        self.stack = ExitStack()

    def start(self, name, argv, **kw):
        p = spawn(argv, os.path.join(self.tmp, f"{name}.log"), **kw)
        self.stack.callback(stop, p)  # at the end, also after an error (stopping twice is harmless)
        return p

    def make_certs(self):
        """A throwaway CA and a certificate for `localhost` (no IP), for GET / over TLS."""
        d = os.path.join(self.tmp, "tls")
        os.makedirs(d)
        ossl = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)  # noqa: E731
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"]
        ossl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=bench-ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        ossl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
        with open(os.path.join(d, "ext.cnf"), "w") as f:
            f.write("subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")
        ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
        os.chmod(d, 0o755)
        os.chmod(os.path.join(d, "server.key"), 0o600)  # PostgreSQL's rule; it runs as nobody when we are root
        if os.geteuid() == 0:
            os.chown(os.path.join(d, "server.key"), pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
        return d

    def start_deps(self):
        tls, self.tls_port = self.make_certs(), free_port()
        self.redis, self.pg = self.stack.enter_context(throwaway(
            self.tmp, redis_args=["--maxclients", "10000", "--loglevel", "warning", "--tls-port", str(self.tls_port),
                                  "--tls-cert-file", f"{tls}/server.pem", "--tls-key-file", f"{tls}/server.key",
                                  "--tls-ca-cert-file", f"{tls}/ca.pem", "--tls-auth-clients", "no"],
            pg_args=["-c", "max_connections=600", "-c", "fsync=off", "-c", "log_min_messages=warning",
                     "-c", "TimeZone=UTC", "-c", "ssl=on", "-c", f"ssl_cert_file={tls}/server.pem",
                     "-c", f"ssl_key_file={tls}/server.key"]))
        self.tls_env = {"REDIS_URL": f"rediss://localhost:{self.tls_port}/0", "REDIS_CA_FILE": f"{tls}/ca.pem",
                        "DATABASE_URL": f"postgres://admin@localhost:{self.pg.port}/desafio3"
                                        f"?sslmode=verify-full&sslrootcert={tls}/ca.pem"}
        self.pgbench = shutil.which("pgbench", path=self.pg.bindir) or shutil.which("pgbench")
        ver = int(self.pg.value("SHOW server_version_num"))
        self.meta["postgres_version"] = f"{ver // 10000}.{ver % 10000}"
        self.meta["redis_version"] = self.redis.cmd("INFO", "server").split("redis_version:")[1].split()[0]
        self.env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{self.redis.port}/0",
                        DATABASE_URL=f"postgres://admin@127.0.0.1:{self.pg.port}/desafio3?sslmode=disable",
                        DATABASE_PASSWORD_FILE=self.pg.password_file, RUST_LOG="warn", BIND_HOST="127.0.0.1")
        log(f"redis on :{self.redis.port}, postgres on :{self.pg.port}")
        self.own_commits = -self.pg_commits(idle=0)  # each read commits too (counted after it): measure how many
        self.own_commits += self.pg_commits(idle=0.5)

    def pg_commits(self, idle=PGSTAT_FLUSH_S):
        time.sleep(idle)
        return int(self.pg.value("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))

    def batches(self, procs):
        """visit_batch_size_count and visit_counter_confirmations_total by `sent`, summed over the
        replicas' /metrics (admin port)."""
        tot = dict.fromkeys(("batches", *CONFIRMED), 0)
        for p in procs:
            body = http_get(f"http://127.0.0.1:{p.admin_port}/metrics", timeout=10)[1]
            for name, sent, v in re.findall(r'^visit_(batch_size_count|counter_confirmations_total)'
                                            r'(?:\{sent="(\w+)"\})? (\S+)$', body, re.M):
                tot["batches" if name.startswith("batch") else sent] += int(float(v))
        return tot

    def visits(self):
        v = self.redis.cmd("GET", "visitas")
        return int(v) if v.isdigit() else 0

    # ---------------------------------------------------------------- measurement
    def wrk(self, port, path, c, secs, threads=None):
        script = os.path.join(self.tmp, "report.lua")
        if not os.path.exists(script):
            with open(script, "w") as f:
                f.write(WRK_LUA)
        r = run(["wrk", "-t", str(threads or min(2, c)), "-c", str(c), "-d", f"{secs}s", "--timeout",
                 f"{HTTP_TIMEOUT_S}s", "-s", script, f"http://127.0.0.1:{port}{path}"], secs + 30)
        m = re.search(r"^WRKJSON (.*)$", r.stdout, re.M)
        if not m:
            return {"error": f"wrk failed: {r.stdout[-300:]} {r.stderr[-300:]}"}
        d = dict(zip(WRK_FIELDS, json.loads(m.group(1))))
        dur, kinds = d["duration_us"] / 1e6, ("connect", "read", "write", "status", "timeout")
        res = {"requests": d["requests"], "duration_s": round(dur, 3), "errors": sum(d[k] for k in kinds),
               "error_detail": {k: d[k] for k in kinds if d[k]}}
        if d["requests"] == 0:
            return {**res, "rps": 0.0, "ok_rps": 0.0, "p50_ms": None, "p99_ms": None,
                    "note": f"no response completed within {secs} s"}
        return {**res, "rps": round(d["requests"] / dur, 1), "ok_rps": round((d["requests"] - d["status"]) / dur, 1),
                "p50_ms": d["p50_us"] / 1000, "p99_ms": d["p99_us"] / 1000, "mean_ms": round(d["mean_us"] / 1000, 3),
                "max_ms": d["max_us"] / 1000}

    def wrk_split(self, ports, path, c, secs):
        """One wrk per port, all at once, the c connections split (64: 22/21/21), one thread each:
        requests, req/s and errors summed; latencies the slowest replica's (mean: weighted)."""
        if len(ports) == 1:
            return self.wrk(ports[0], path, c, secs)
        cs = [c // len(ports) + (i < c % len(ports)) for i in range(len(ports))]
        with ThreadPoolExecutor(len(ports)) as pool:
            parts = list(pool.map(lambda pc: self.wrk(pc[0], path, pc[1], secs, threads=1), zip(ports, cs)))
        if any("error" in r for r in parts):
            return {"error": "; ".join(r["error"] for r in parts if "error" in r)}
        add = lambda k: round(sum(r[k] for r in parts), 1)  # noqa: E731
        worst = lambda k: max((r[k] for r in parts if r.get(k) is not None), default=None)  # noqa: E731
        n = add("requests")
        return {"requests": n, "duration_s": worst("duration_s"), "errors": add("errors"),
                "error_detail": {k: sum(r["error_detail"].get(k, 0) for r in parts)
                                 for k in {k for r in parts for k in r["error_detail"]}},
                "rps": add("rps"), "ok_rps": add("ok_rps"), "p50_ms": worst("p50_ms"), "p99_ms": worst("p99_ms"),
                "max_ms": worst("max_ms"), "mean_ms": n and round(sum(r["mean_ms"] * r["requests"] for r in parts
                                                                      if r["requests"]) / n, 3),
                "per_replica": [{"connections": ci, "rps": r["rps"], "p99_ms": r.get("p99_ms")}
                                for ci, r in zip(cs, parts)]}

    def pgbench_run(self, c, secs):
        script = os.path.join(self.tmp, "now.sql")
        with open(script, "w") as f:
            f.write("SELECT now();\n")
        r = run([self.pgbench, "-n", "-M", "prepared", "-c", str(c), "-j", str(min(2, c)), "-T", str(secs),
                 "-f", script, "-h", "127.0.0.1", "-p", str(self.pg.port), "-U", "admin", "desafio3"],
                secs + 60, env=dict(os.environ, PGPASSWORD=self.pg.password, PGSSLMODE="disable"), cwd=self.tmp)
        num = lambda pattern: (lambda g: g and float(g.group(1)))(re.search(pattern, r.stdout, re.M))  # noqa: E731
        tps = num(r"^tps = ([\d.]+) \(without initial connection time\)") or num(r"^tps = ([\d.]+)")
        if not tps:
            return {"error": f"pgbench failed: {r.stdout[-300:]} {r.stderr[-300:]}"}
        n = num(r"number of transactions actually processed: (\d+)")
        return {"rps": round(tps, 1), "requests": n and int(n), "duration_s": secs,
                "errors": int(num(r"number of failed transactions: (\d+)") or 0),
                "mean_ms": num(r"latency average = ([\d.]+) ms")}

    def record(self, key, c, res, extra=None):
        label = SYSTEMS[key]
        self.results.append({"system": key, "label": label, "concurrency": c, "round": self.round, **res, **(extra or {})})
        if "error" in res:
            log(f"  {label:28s} c={c:<4d} FAILED: {res['error']}")
        else:
            log(f"  {label:28s} c={c:<4d} {res['rps']:>10.1f} req/s  p50 {fmt_ms(res.get('p50_ms'))}  "
                f"p99 {fmt_ms(res.get('p99_ms'))}  errors {res.get('errors')}")

    def http_series(self, key, procs, path, pids):
        """procs: the servers (Popen with .port, .admin_port), loaded at once; for web's GET /
        also PostgreSQL's commits per counted batch over the measured run."""
        a, ports = self.args, [p.port for p in procs]
        confirm = key in ("web", "web-3")
        for c in a.concurrency:
            if c < len(ports):
                continue
            if a.warmup:
                self.wrk_split(ports, path, c, a.warmup)
                for port in ports:
                    settle(port, path)
            if confirm:
                x0, b0 = self.pg_commits(), self.batches(procs)
            v0 = self.visits()
            res = self.wrk_split(ports, path, c, a.duration)
            extra = {"replicas": len(ports)}
            if path == "/" and key != "nginx" and "error" not in res:
                # every GET / must have counted one visit in Redis (a request still in flight
                # when wrk stops may count without being reported)
                time.sleep(0.2)
                extra["visits_counted"] = self.visits() - v0
                served = res["requests"] - res["error_detail"].get("status", 0)
                if extra["visits_counted"] < served:
                    self.notes.append(f"{key} c={c}: {served} successful GET / but only "
                                      f"{extra['visits_counted']} counts reached Redis (degraded answers?)")
            if confirm and "error" not in res:
                x1, b1 = self.pg_commits(), self.batches(procs)
                pg = extra["postgres"] = {"commits": x1 - x0 - self.own_commits, "bench_commits": self.own_commits,
                                          **{k: b1[k] - b0[k] for k in b1}}
                pg["commits_per_batch"] = round(pg["commits"] / pg["batches"], 3) if pg["batches"] else None
            if res.get("note"):
                self.notes.append(f"{key} c={c}: {res['note']}")
            extra["peak_rss_kib"] = sum(int(proc_status(p).get("VmHWM", [0])[0]) for p in pids())
            for port in ports:
                settle(port, path)
            self.record(key, c, res, extra)

    def serve(self, name, argv, env=None, **kw):
        """Starts an HTTP server on a free port with the stack's environment; waits for an ok page."""
        port, admin = free_port(), free_port()
        argv = [a.format(port=port) for a in argv]
        p = self.start(name, argv, env=dict(self.env, PORT=str(port), ADMIN_PORT=str(admin), **(env or {})), **kw)
        p.port, p.admin_port = port, admin
        st = []
        if not wait_for(lambda: st.append(http_get(f"http://127.0.0.1:{port}/")) or (st[-1][0] == 200 and '"ok"' in st[-1][1]),
                        proc=p):
            stop(p)
            raise RuntimeError(f"{name} did not become ready: {st[-1]}; log tail:\n{''.join(open(p.log_path).readlines()[-20:])}")
        return p, port

    # ---------------------------------------------------------------- systems
    def run_web(self):
        if not self.args.skip_build:
            log("cargo build --release --bin web")
            subprocess.run(["cargo", "build", "--release", "--bin", "web"], cwd=ROOT, check=True)
        p, port = self.serve("web", [os.path.join(ROOT, "target", "release", "web")])
        self.meta["web_rss_idle_kib"] = int(proc_status(p.pid)["VmRSS"][0])
        for key, path in (("web", "/"), ("web-healthz", "/healthz")):
            if key in self.args.systems:
                self.http_series(key, [p], path, lambda: [p.pid])
        self.meta["web_peak_rss_kib"] = max(self.meta.get("web_peak_rss_kib", 0), int(proc_status(p.pid)["VmHWM"][0]))
        t0 = time.monotonic()
        rc = stop(p, signal.SIGTERM)
        self.meta["web_sigterm_exit"] = {"code": rc, "seconds": round(time.monotonic() - t0, 2)}
        if "web-3" in self.args.systems:  # replicas on the same Redis and PostgreSQL
            ps = [self.serve(f"web-3.{i}", [os.path.join(ROOT, "target", "release", "web")])[0] for i in range(REPLICAS)]
            self.http_series("web-3", ps, "/", lambda: [p.pid for p in ps])
            for p in ps:
                stop(p, signal.SIGTERM)
        # the same binary logging every request (non-blocking); and speaking TLS to both dependencies
        for key, env in (("web-info", {"RUST_LOG": "info"}), ("web-tls", self.tls_env)):
            if key in self.args.systems:
                p, port = self.serve(key, [os.path.join(ROOT, "target", "release", "web")], env=env)
                self.http_series(key, [p], "/", lambda: [p.pid])
                stop(p, signal.SIGTERM)

    def run_reference(self, key):
        """The seed's app under Flask's development server, or the pooled one under gunicorn."""
        argv = {"flask-dev": [sys.executable, "seed_app.py"],
                "gunicorn": [os.path.join(VENV_BIN, "gunicorn"), "-w", str(os.cpu_count() or 1), "-b", "127.0.0.1:{port}",
                             "--backlog", "2048", "--log-level", "warning", "pooled_app:app"]}[key]
        p, port = self.serve(key, argv, cwd=REFERENCE)
        self.http_series(key, [p], "/", lambda: tree_pids(p.pid))  # gunicorn: the master and its workers
        stop(p)

    def run_nginx(self):
        """nginx answering every request with a fixed body of the page's size (bench/nginx.conf)."""
        conf = os.path.join(self.tmp, "nginx.conf")
        sh = (f"sed 's/@PORT@/{{port}}/;s|@TMP@|{self.tmp}|' {HERE}/nginx.conf > {conf} && "
              f"exec nginx -c {conf} -p {self.tmp} -e stderr")
        p, port = self.serve("nginx", ["sh", "-c", sh])
        self.http_series("nginx", [p], "/", lambda: tree_pids(p.pid))  # the master and its workers
        stop(p)

    def run_pgbench(self):
        for c in self.args.concurrency:
            if self.args.warmup:
                self.pgbench_run(c, self.args.warmup)
            self.record("pgbench", c, self.pgbench_run(c, self.args.duration))

    # ---------------------------------------------------------------- driver
    def run(self):
        started = time.time()
        self.start_deps()
        web = [({"web", "web-3", "web-healthz", "web-info", "web-tls"}, self.run_web), ({"nginx"}, self.run_nginx)]
        steps = [({"flask-dev"}, lambda: self.run_reference("flask-dev")),
                 ({"gunicorn"}, lambda: self.run_reference("gunicorn")), ({"pgbench"}, self.run_pgbench)]
        # --rounds N: web and nginx N times in turn (side by side), the slow references once
        for self.round, (keys, fn) in [(i, st) for i in range(self.args.rounds) for st in web] + \
                                      [(0, st) for st in steps]:
            if keys & set(self.args.systems):
                log(f"== {min(keys)}")
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - record and go on with the others
                    self.notes.append(f"{min(keys)}: {e}")
                    log(f"{min(keys)} failed: {e}")
        self.meta["wall_seconds"] = round(time.time() - started, 1)

    def close(self):
        self.stack.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def fmt_ms(v):
    return "—" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def fmt_rps(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


# -------------------------------------------------------------------- reporting
def get(results, system, c, rnd=None):
    """The result of system at c: of round rnd, or with several rounds their medians (errors summed)."""
    rs = [r for r in results if r["system"] == system and r["concurrency"] == c and "error" not in r
          and rnd in (None, r.get("round", 0))]
    med = lambda k: statistics.median(r[k] for r in rs if r.get(k) is not None)  # noqa: E731
    if len(rs) < 2:
        return rs[0] if rs else None
    return {**rs[0], "rps": med("rps"), "p99_ms": med("p99_ms"), "errors": sum(r["errors"] for r in rs)}


def ratios(doc):
    res, out = doc["results"], []

    def ratio(name, num, den, target, better="ge", fmt="{:.2f}×"):
        val = None if (num is None or den in (None, 0)) else num / den
        met = None if val is None else (val >= target if better == "ge" else val <= target)
        out.append({"name": name, "value": val, "target": target, "cmp": better, "met": met,
                    "shown": "—" if val is None else fmt.format(val)})

    w = get(res, "web", 64)
    rps = lambda k, rnd=None: (get(res, k, 64, rnd) or {}).get("rps")  # noqa: E731

    def ratio_rps(name, num, den, target):  # several rounds: the median of each round's ratio
        rounds = sorted({r.get("round", 0) for r in res if r["system"] == num})
        each = [rps(num, i) / rps(den, i) for i in rounds if rps(num, i) and rps(den, i)]
        val = statistics.median(each) if each else None
        out.append({"name": name, "value": val, "target": target, "cmp": "ge", "met": val and val >= target,
                    "rounds": len(each), "shown": "—" if val is None else f"{val:.2f}×"})

    ratio("web GET / ÷ flask-dev (seed), c=64", w and w["rps"], rps("flask-dev"), 100)
    ratio("web GET / ÷ gunicorn, c=64", w and w["rps"], rps("gunicorn"), 5)
    ratio("web GET / ÷ pgbench SELECT now(), c=64", w and w["rps"], rps("pgbench"), 0.9)
    ratio_rps("web GET /healthz ÷ nginx return 200, c=64", "web-healthz", "nginx", 0.85)
    ratio_rps("web GET / ÷ web GET /healthz, c=64", "web", "web-healthz", 0.75)
    ratio_rps("web GET / RUST_LOG=info ÷ warn, c=64", "web-info", "web", 0.9)
    ratio_rps("web GET / TLS to both ÷ plain TCP, c=64", "web-tls", "web", 0.8)
    ratio("web GET / p99 (ms), c=64", w and w.get("p99_ms"), 1, 3, "le", "{:.2f}")
    ratio("web GET / errors, c=64", w and w.get("errors"), 1, 0, "le", "{:.0f}")
    rss = doc["meta"].get("web_peak_rss_kib")
    ratio("web peak RSS (MiB)", rss and rss / 1024, 1, 12, "le", "{:.2f}")
    webs = [r["rps"] for r in res if r["system"] == "web" and "error" not in r]
    w256 = get(res, "web", 256)
    ratio("web GET / c=256 ÷ its best", w256 and w256["rps"], max(webs) if webs else None, 0.9)
    return out


def markdown(doc):
    res, m, cfg = doc["results"], doc["meta"], doc["config"]
    lines = [f"# desafio3 benchmark — {doc['date']}", "",
             f"Machine: {m.get('cpus')} CPUs, {m.get('cpu_model', '?')}, Linux {m.get('kernel')}; Redis "
             f"{m.get('redis_version')}, PostgreSQL {m.get('postgres_version')}; everything (load generator included) "
             f"on the same machine over loopback. Each point: {cfg['warmup_s']} s warm-up, then {cfg['duration_s']} s "
             f"measured; wrk threads = min(2, c) (with {REPLICAS} replicas: one `wrk -t1` per replica, c split), wrk timeout "
             f"{cfg['http_timeout_s']} s.", "",
             "| system | c | req/s | p50 ms | p99 ms | mean ms | errors |", "|---|---:|---:|---:|---:|---:|---:|"]
    rounds = cfg.get("rounds", 1)
    for key in ORDER:
        for r in (r for c in cfg["concurrency"] for r in res if r["system"] == key and r["concurrency"] == c):
            c, label = r["concurrency"], r["label"] + (f" (round {r['round'] + 1})" if rounds > 1 else "")
            if "error" in r:
                lines.append(f"| {label} | {c} | failed | — | — | — | {r['error'][:60]} |")
                continue
            errs = str(r.get("errors", 0))
            if r.get("error_detail"):
                errs += " (" + ", ".join(f"{k} {v}" for k, v in r["error_detail"].items()) + ")"
            lines.append(f"| {label} | {c} | {fmt_rps(r['rps'])} | {fmt_ms(r.get('p50_ms'))} | "
                         f"{fmt_ms(r.get('p99_ms'))} | {fmt_ms(r.get('mean_ms'))} | {errs} |")
    lines += ["", "pgbench reports only its mean latency (why: bench/README.md, step 4).", ""]
    pg = [r for r in res if r.get("postgres")]
    if pg:
        lines += ["## PostgreSQL commits per counted batch (web GET /)", "",
                  f"Commits: `xact_commit` of the database over the measured run, minus the bench's own reads; "
                  f"batches and confirmations: summed over the replicas' `/metrics`. Targets: ≤ {CPB_TARGET[1]:g} "
                  f"with 1 replica, ≤ {CPB_TARGET[REPLICAS]:g} with {REPLICAS}.", "",
                  "| replicas | c | req/s | batches | commits | commits/batch | ÷ target | sent ahead | after | again |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in pg:
            d, t = r["postgres"], CPB_TARGET.get(r["replicas"])
            cpb = d["commits_per_batch"]
            lines.append(f"| {r['replicas']} | {r['concurrency']} | {fmt_rps(r['rps'])} | {d['batches']:,} | "
                         f"{d['commits']:,} | {'—' if cpb is None else f'{cpb:.3f}'} | "
                         f"{'—' if cpb is None or not t else f'{cpb / t:.2f}×'} | "
                         + " | ".join(f"{d[k]:,}" for k in CONFIRMED) + " |")
        one, many = get(res, "web", 64), get(res, "web-3", 64)
        lines += ["", f"GET / at c=64, {REPLICAS} replicas ÷ 1: {many['rps'] / one['rps']:.2f}× the requests per second."
                  if one and many else "", ""]
    lines += [
              "## Targets (c=64 unless noted)", "",
              "| measure | value | target | met |", "|---|---:|---:|:---:|"]
    if rounds > 1:
        lines[-2:-2] = [f"With {rounds} rounds (web and nginx in turn): each ratio of requests per second is the median of "
                        "the rounds' ratios; other values are medians over the rounds (errors: summed).", ""]
    for r in doc["ratios"]:
        tgt = ("≥ " if r["cmp"] == "ge" else "≤ ") + f"{r['target']:g}"
        lines.append(f"| {r['name']} | {r['shown']} | {tgt} | {({True: 'yes', False: '**no**'}).get(r['met'], '—')} |")
    lines.append("")
    extra = [f"web peak RSS (VmHWM) {m['web_peak_rss_kib'] / 1024:.1f} MiB (idle after start "
             f"{(m.get('web_rss_idle_kib') or 0) / 1024:.1f} MiB)"] if m.get("web_peak_rss_kib") else []
    for key, who in (("flask-dev", ""), ("gunicorn", " (master + workers)")):
        rss = [r["peak_rss_kib"] for r in res if r["system"] == key and r.get("peak_rss_kib")]
        extra += [f"{key} peak RSS {max(rss) / 1024:.1f} MiB{who}"] if rss else []
    if m.get("web_sigterm_exit"):
        extra.append("web SIGTERM after the run: exit {code} in {seconds} s".format(**m["web_sigterm_exit"]))
    lines += [f"Also: {'; '.join(extra)}.", ""] if extra else []
    lines += [f"Notes: {'; '.join(doc['notes'])}", ""] if doc.get("notes") else []
    return "\n".join(lines)


def machine_meta():
    m = {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    with open("/proc/cpuinfo") as f:
        m["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    for name, argv in (("wrk", ["wrk", "-v"]), ("rustc", ["rustc", "--version"])):
        r = run(argv, 10)
        if (r.stdout + r.stderr).strip():
            m[name] = (r.stdout + r.stderr).strip().splitlines()[0]
    return m


def plot(doc, path):
    """Requests per second and p99 of each system at c=64 (medians over the rounds), side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(SYSTEMS[k], r) for k in ORDER if (r := get(doc["results"], k, 64))]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.5), sharey=True)
    for ax, key, title in ((axes[0], "rps", "requests per second"), (axes[1], "p99_ms", "p99 latency (ms)")):
        vals = [r.get(key) or 0 for _, r in rows]
        ax.barh([label for label, _ in rows], vals, color="tab:blue" if key == "rps" else "tab:orange")
        ax.bar_label(ax.containers[0], labels=[fmt_rps(v) if key == "rps" else fmt_ms(v) for v in vals], padding=3)
        ax.set_title(f"{title}, c=64"), ax.invert_yaxis(), ax.margins(x=0.25)
    fig.suptitle(f"desafio3 benchmark {doc['date']}: one machine, {doc['meta'].get('cpus')} CPUs, loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(doc, outdir, stamp):
    os.makedirs(outdir, exist_ok=True)
    base = os.path.join(outdir, stamp)
    with open(base + ".json", "w") as f:
        f.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    md = markdown(doc)
    with open(base + ".md", "w") as f:
        f.write(md + "\n")
    plot(doc, base + ".png")
    with open(os.path.join(outdir, "latest.md"), "w") as f:  # a pointer, not a second copy
        f.write(f"Latest run: [{stamp}.md]({stamp}.md) (numbers: [{stamp}.json]({stamp}.json)).\n")
    return md


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="c=64 only, a few seconds each; results to bench/results/quick/")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], help="comma list (default 1,16,64,256)")
    ap.add_argument("--duration", type=int, help="seconds measured per point")
    ap.add_argument("--warmup", type=int, help="seconds of warm-up per point")
    ap.add_argument("--systems", type=lambda s: s.split(","), default=ORDER, help="comma list of: " + ",".join(ORDER))
    ap.add_argument("--skip-build", action="store_true", help="use target/release/web as is")
    ap.add_argument("--rounds", type=int, default=1, help="run web's systems and nginx this many times in turn")
    a = ap.parse_args()
    if set(a.systems) - set(ORDER):
        ap.error(f"unknown systems: {', '.join(sorted(set(a.systems) - set(ORDER)))}")
    defaults = {"concurrency": [64], "duration": 3, "warmup": 1} if a.quick else \
        {"concurrency": [1, 16, 64, 256], "duration": 10, "warmup": 2}
    for k, v in defaults.items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    out = os.path.join(HERE, "results", "quick" if a.quick else "")

    b, today = Bench(a), dt.date.today().isoformat()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the servers as Ctrl-C does
    try:
        b.run()
    except KeyboardInterrupt:
        log("interrupted: stopping the servers")
        sys.exit(130)
    finally:
        b.close()
    doc = {"date": today, "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "config": {"concurrency": a.concurrency, "duration_s": a.duration, "warmup_s": a.warmup,
                      "http_timeout_s": HTTP_TIMEOUT_S, "quick": a.quick, "systems": a.systems, "rounds": a.rounds},
           "meta": {**machine_meta(), **b.meta}, "results": b.results, "notes": b.notes}
    doc["ratios"] = ratios(doc)
    print(write_outputs(doc, out, today))
    log(f"wrote {os.path.join(out, today)}.{{json,md}} and latest.md in {doc['meta']['wall_seconds']} s")
    failed = [r for r in b.results if "error" in r]
    if b.notes or failed:
        log(f"{len(b.notes)} system(s) failed to run, {len(failed)} point(s) failed")


if __name__ == "__main__":
    main()
