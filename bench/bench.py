#!/usr/bin/env python3
"""desafio3 benchmark driver, run through bench/run (which installs what this needs); what it
measures and writes (<out>/<date>.{json,md,png}, <out>/latest.md pointing at them): bench/README.md.
"""

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WEB = os.path.join(ROOT, "target", "release", "web")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from servers import Postgres, Redis, free_port, http_get, proc_status, run, spawn, stop, wait_for  # noqa: E402 - shared with tests/e2e

HTTP_TIMEOUT_S = 5  # wrk --timeout
REPLICAS = 3  # the web-3 row
SYSTEMS = {  # key: (label, path, processes loaded at once, their environment); nginx: bench/nginx.conf
    "web": ("web GET /", "/", 1, {}),
    "web-3": ("web GET / (3 replicas)", "/", REPLICAS, {}),  # on the same Redis and PostgreSQL
    "web-healthz": ("web GET /healthz", "/healthz", 1, {}),
    "web-info": ("web GET / (RUST_LOG=info)", "/", 1, {"RUST_LOG": "info"}),  # a log line per request
    "nginx": ("nginx return 200", "/", 1, {}),
}
# PostgreSQL (15+) publishes a backend's counters in pg_stat_database when it goes idle at most
# once a second, and otherwise after 10 s idle: read xact_commit only after that long without load
PGSTAT_FLUSH_S = 10.5
CONFIRMED = ("ahead", "after", "again")  # visit_counter_confirmations_total{sent=...}
CPB_TARGET = {1: 1.2, REPLICAS: 1.3}  # commits per batch, shown beside the measure (not a pass/fail)
WRK_ERRORS = ("connect", "read", "write", "status", "timeout")
# wrk's report as one line of JSON (latencies in µs)
WRK_LUA = r"""
done = function(s, lat, requests)
  local e = s.errors
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n', s.requests, s.duration, e.connect, e.read,
    e.write, e.status, e.timeout, lat:percentile(50), lat:percentile(99), lat.max, lat.mean))
end
"""


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args):
        self.args, self.results, self.notes, self.meta, self.round = args, [], [], {}, 0
        self.tmp = tempfile.mkdtemp(prefix="desafio3-bench-")
        self.stack = ExitStack()  # closed last: the servers stopped, then the directory removed
        self.stack.callback(shutil.rmtree, self.tmp, ignore_errors=True)
        self.lua = os.path.join(self.tmp, "report.lua")  # written once: web-3 runs its wrks at once
        with open(self.lua, "w") as f:
            f.write(WRK_LUA)

    def start_deps(self):
        """redis-server here; PostgreSQL is pg_virtualenv's (bench/run), which names it in PG* variables."""
        port = free_port()
        admin = secrets.token_hex(16)  # the stack's loader of the counting functions, as in the Rust harness
        redis = spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                       "--dir", self.tmp, "--maxclients", "10000", "--loglevel", "warning",
                       "--user", "admin", "on", f">{admin}", "~*", "&*", "+@all"], os.path.join(self.tmp, "redis.log"))
        self.stack.callback(stop, redis)
        self.redis, self.pg = Redis(["redis-cli", "-p", str(port)]), Postgres(["psql", "--no-psqlrc"])
        if not wait_for(lambda: self.redis.cmd("PING") == "PONG", proc=redis):
            raise RuntimeError(f"redis-server did not start: see {redis.log_path}")
        with open(os.path.join(self.tmp, "redis_admin_password"), "w") as f:
            f.write(admin)
        load = run(["sh", os.path.join(ROOT, "deploy/kubernetes/base/cache/functions/healthcheck.sh"), "-p", str(port)],
                   60, env=dict(os.environ, REDIS_ADMIN_PASSWORD_FILE=f.name))
        if load.returncode:
            raise RuntimeError(f"the cache healthcheck did not load the counting functions: {load.stdout}{load.stderr}")
        self.meta["postgres_version"] = self.pg.value("SHOW server_version").split()[0]
        self.meta["redis_version"] = self.redis.cmd("INFO", "server").split("redis_version:")[1].split()[0]
        with open(os.path.join(self.tmp, "db_password"), "w") as f:
            f.write(os.environ["PGPASSWORD"])
        self.env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{port}/0",
                        DATABASE_URL=f"postgres://{os.environ['PGUSER']}@127.0.0.1:{os.environ['PGPORT']}/"
                                     f"{os.environ['PGDATABASE']}?sslmode=disable",
                        DATABASE_PASSWORD_FILE=f.name, RUST_LOG="warn", BIND_HOST="127.0.0.1")
        log(f"redis on :{port}, postgres on :{os.environ['PGPORT']}")
        before = self.pg_commits(idle=0)  # each read commits too (counted after it): measure how many
        self.own_commits = self.pg_commits(idle=0.5) - before

    def pg_commits(self, idle=PGSTAT_FLUSH_S):
        time.sleep(idle)
        return int(self.pg.value("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))

    def batches(self, procs):
        """visit_batch_size_count and visit_counter_confirmations_total{sent}, summed over the replicas' /metrics."""
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
        r = run(["wrk", "-t", str(threads or min(2, c)), "-c", str(c), "-d", f"{secs}s", "--timeout",
                 f"{HTTP_TIMEOUT_S}s", "-s", self.lua, f"http://127.0.0.1:{port}{path}"], secs + 30)
        m = re.search(r"^WRKJSON (.*)$", r.stdout, re.M)
        if not m:
            return {"error": f"wrk failed: {r.stdout[-300:]} {r.stderr[-300:]}"}
        d = json.loads(m.group(1))
        n, dur = d["requests"], d["duration_us"] / 1e6
        res = {"requests": n, "duration_s": round(dur, 3), "errors": sum(d[k] for k in WRK_ERRORS),
               "error_detail": {k: d[k] for k in WRK_ERRORS if d[k]}, "rps": round(n / dur, 1)}
        if n == 0:
            return {**res, "p50_ms": None, "p99_ms": None, "note": f"no response completed within {secs} s"}
        return {**res, "p50_ms": d["p50_us"] / 1000, "p99_ms": d["p99_us"] / 1000,
                "mean_ms": round(d["mean_us"] / 1000, 3), "max_ms": d["max_us"] / 1000}

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
        n = sum(r["requests"] for r in parts)
        worst = lambda k: max((r[k] for r in parts if r.get(k) is not None), default=None)  # noqa: E731
        return {"requests": n, "duration_s": worst("duration_s"), "errors": sum(r["errors"] for r in parts),
                "error_detail": dict(sum((Counter(r["error_detail"]) for r in parts), Counter())),
                "rps": round(sum(r["rps"] for r in parts), 1), "p50_ms": worst("p50_ms"), "p99_ms": worst("p99_ms"),
                "max_ms": worst("max_ms"),
                "mean_ms": n and round(sum(r["mean_ms"] * r["requests"] for r in parts if r["requests"]) / n, 3)}

    def serve(self, name, argv, env):
        """Starts an HTTP server on a free port with the stack's environment; waits for an ok page."""
        port, admin = free_port(), free_port()
        p = spawn([a.format(port=port) for a in argv], os.path.join(self.tmp, f"{name}.log"),
                  env=dict(self.env, PORT=str(port), ADMIN_PORT=str(admin), **env))
        self.stack.callback(stop, p)  # at the end, also after an error (stopping twice is harmless)
        p.port, p.admin_port = port, admin
        st = []
        if not wait_for(lambda: st.append(http_get(f"http://127.0.0.1:{port}/")) or (st[-1][0] == 200 and '"ok"' in st[-1][1]),
                        proc=p):
            stop(p)
            raise RuntimeError(f"{name} did not become ready: {st[-1]}; log tail:\n{''.join(open(p.log_path).readlines()[-20:])}")
        return p

    def run_system(self, key):
        """Starts the system's servers (Popen with .port, .admin_port), loads them at once at every
        concurrency, stops them; for web's GET /, also PostgreSQL's commits per counted batch."""
        a, (label, path, n, env), argv = self.args, SYSTEMS[key], [WEB]
        if key == "nginx":  # every request answered with a fixed body of the page's size
            conf = os.path.join(self.tmp, "nginx.conf")
            argv = ["sh", "-c", f"sed 's/@PORT@/{{port}}/;s|@TMP@|{self.tmp}|' {HERE}/nginx.conf > {conf} && "
                                f"exec nginx -c {conf} -p {self.tmp} -e stderr"]
        procs = [self.serve(f"{key}.{i}", argv, env) for i in range(n)]
        ports = [p.port for p in procs]
        product = key in ("web", "web-healthz")  # web's RSS: the higher of these processes' (one each)
        if product:
            self.meta.setdefault("web_rss_idle_kib", int(proc_status(procs[0].pid)["VmRSS"][0]))
        # a request after each run waits behind what that run left in flight: the next starts on an idle server
        settle = lambda: [http_get(f"http://127.0.0.1:{port}{path}", timeout=60) for port in ports]  # noqa: E731
        confirm = key in ("web", "web-3")
        for c in a.concurrency:
            if c < len(ports):
                continue
            if a.warmup:
                self.wrk_split(ports, path, c, a.warmup)
                settle()
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
            # every process of each server's group (spawn makes one per server): nginx's workers too
            pids = [pid for p in procs for pid in run(["pgrep", "-g", str(p.pid)], 10).stdout.split()]
            extra["peak_rss_kib"] = sum(int(proc_status(pid).get("VmHWM", [0])[0]) for pid in pids)
            settle()
            self.results.append({"system": key, "label": label, "concurrency": c, "round": self.round, **res, **extra})
            if "error" in res:
                log(f"  {label:28s} c={c:<4d} FAILED: {res['error']}")
            else:
                log(f"  {label:28s} c={c:<4d} {res['rps']:>10.1f} req/s  p50 {fmt_ms(res.get('p50_ms'))}  "
                    f"p99 {fmt_ms(res.get('p99_ms'))}  errors {res.get('errors')}")
        if product:
            hwm = int(proc_status(procs[0].pid)["VmHWM"][0])
            self.meta["web_peak_rss_kib"] = max(self.meta.get("web_peak_rss_kib", 0), hwm)
        for p in procs:
            stop(p)

    # ---------------------------------------------------------------- driver
    def run(self):
        started = time.time()
        if not self.args.skip_build and any(k.startswith("web") for k in self.args.systems):
            log("cargo build --release --bin web")
            subprocess.run(["cargo", "build", "--release", "--bin", "web"], cwd=ROOT, check=True)
        self.start_deps()
        # --rounds N: the systems N times in turn, so that each ratio compares runs minutes apart
        for self.round in range(self.args.rounds):
            for key in (k for k in SYSTEMS if k in self.args.systems):
                log(f"== {key}")
                try:
                    self.run_system(key)
                except Exception as e:  # noqa: BLE001 - record and go on with the others
                    self.notes.append(f"{key}: {e}")
                    log(f"{key} failed: {e}")
        self.meta["wall_seconds"] = round(time.time() - started, 1)


def fmt_ms(v):
    return "—" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def fmt_num(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


# -------------------------------------------------------------------- reporting
def get(results, system, c, rnd=None):
    """The result of system at c: of round rnd, or with several rounds their medians (errors summed)."""
    rs = [r for r in results if r["system"] == system and r["concurrency"] == c and "error" not in r
          and rnd in (None, r["round"])]
    if len(rs) < 2:
        return rs[0] if rs else None
    med = lambda k: statistics.median(r[k] for r in rs if r.get(k) is not None)  # noqa: E731
    return {**rs[0], "rps": med("rps"), "p99_ms": med("p99_ms"), "errors": sum(r["errors"] for r in rs)}


def ratios(doc):
    """Each measure against its target (bench/README.md "Targets"), at c=64 unless noted."""
    res = doc["results"]
    rps = lambda key, rnd=None, c=64: (get(res, key, c, rnd) or {}).get("rps")  # noqa: E731

    def rps_ratio(num, den):  # the median of the ratios within each round both ran in
        each = [rps(num, i) / rps(den, i) for i in range(doc["config"]["rounds"]) if rps(num, i) and rps(den, i)]
        return statistics.median(each) if each else None

    web, rss = get(res, "web", 64) or {}, doc["meta"].get("web_peak_rss_kib")
    best = max((r["rps"] for r in res if r["system"] == "web" and "error" not in r), default=None)
    measures = [  # (measure, value, "≥" or "≤", target)
        ("web GET /healthz ÷ nginx return 200, c=64", rps_ratio("web-healthz", "nginx"), "≥", 0.85),
        ("web GET / ÷ web GET /healthz, c=64", rps_ratio("web", "web-healthz"), "≥", 0.75),
        ("web GET / RUST_LOG=info ÷ warn, c=64", rps_ratio("web-info", "web"), "≥", 0.9),
        ("web GET / p99 (ms), c=64", web.get("p99_ms"), "≤", 3),
        ("web GET / errors, c=64", web.get("errors"), "≤", 0),
        ("web peak RSS (MiB)", rss and rss / 1024, "≤", 12),
        ("web GET / c=256 ÷ its best", rps("web", c=256) and best and rps("web", c=256) / best, "≥", 0.9),
    ]
    return [{"name": name, "value": v, "cmp": cmp, "target": target,
             "met": None if v is None else v >= target if cmp == "≥" else v <= target}
            for name, v, cmp, target in measures]


def table(head, rows):
    """Markdown table lines; a column whose name starts with '>' is right-aligned."""
    return [f"| {' | '.join(h.lstrip('>') for h in head)} |",
            "|" + "|".join("---:" if h.startswith(">") else "---" for h in head) + "|",
            *(f"| {' | '.join(map(str, row))} |" for row in rows)]


def markdown(doc):
    res, m, cfg = doc["results"], doc["meta"], doc["config"]
    rounds = cfg["rounds"]
    lines = [f"# desafio3 benchmark — {doc['date']}", "",
             f"Machine: {m.get('cpus')} CPUs, {m.get('cpu_model', '?')}, Linux {m.get('kernel')}; Redis "
             f"{m.get('redis_version')}, PostgreSQL {m.get('postgres_version')}; everything (load generator included) "
             f"on the same machine over loopback. Each point: {cfg['warmup_s']} s warm-up, then {cfg['duration_s']} s "
             f"measured; wrk threads = min(2, c) (with {REPLICAS} replicas: one `wrk -t1` per replica, c split), wrk timeout "
             f"{cfg['http_timeout_s']} s.", ""]
    rows = []
    for r in sorted(res, key=lambda r: (list(SYSTEMS).index(r["system"]), r["concurrency"], r["round"])):
        label = r["label"] + (f" (round {r['round'] + 1})" if rounds > 1 else "")
        if "error" in r:
            rows.append([label, r["concurrency"], "failed", "—", "—", "—", " ".join(r["error"].split())[:60], "—"])
        else:
            errors = ", ".join([str(r["errors"]), *(f"{k} {v}" for k, v in r["error_detail"].items())])
            rows.append([label, r["concurrency"], fmt_num(r["rps"]), *(fmt_ms(r.get(k)) for k in ("p50_ms", "p99_ms", "mean_ms")),
                         errors, f"{r['peak_rss_kib'] / 1024:.1f}"])
    lines += table(["system", ">c", ">req/s", ">p50 ms", ">p99 ms", ">mean ms", ">errors", ">peak RSS MiB"], rows)
    pg = [r for r in res if r.get("postgres")]
    if pg:
        lines += ["", "## PostgreSQL commits per counted batch (web GET /)", "",
                  f"Commits: `xact_commit` of the database over the measured run, minus the bench's own reads; "
                  f"batches and confirmations: summed over the replicas' `/metrics`. Targets: ≤ {CPB_TARGET[1]:g} "
                  f"with 1 replica, ≤ {CPB_TARGET[REPLICAS]:g} with {REPLICAS}.", ""]
        lines += table([">replicas", ">c", ">req/s", ">batches", ">commits", ">commits/batch", ">÷ target",
                        ">sent ahead", ">after", ">again"],
                       [[r["replicas"], r["concurrency"], fmt_num(r["rps"]), f"{d['batches']:,}", f"{d['commits']:,}",
                         "—" if cpb is None else f"{cpb:.3f}", "—" if cpb is None else f"{cpb / CPB_TARGET[r['replicas']]:.2f}×",
                         *(f"{d[k]:,}" for k in CONFIRMED)]
                        for r in pg for d in [r["postgres"]] for cpb in [d["commits_per_batch"]]])
        one, many = get(res, "web", 64), get(res, "web-3", 64)
        if one and many:
            lines += ["", f"GET / at c=64, {REPLICAS} replicas ÷ 1: {many['rps'] / one['rps']:.2f}× the requests per second."]
    lines += ["", "## Targets (c=64 unless noted)", ""]
    if rounds > 1:
        lines += [f"With {rounds} rounds (web and nginx in turn): each ratio of requests per second is the median of "
                  "the rounds' ratios; other values are medians over the rounds (errors: summed).", ""]
    lines += table(["measure", ">value", ">target", "met"],
                   [[r["name"], "—" if r["value"] is None else fmt_num(r["value"]) + ("×" if "÷" in r["name"] else ""),
                     f"{r['cmp']} {r['target']:g}", {True: "yes", False: "**no**"}.get(r["met"], "—")]
                    for r in doc["ratios"]])
    if m.get("web_peak_rss_kib"):
        lines += ["", f"web peak RSS (VmHWM) {m['web_peak_rss_kib'] / 1024:.1f} MiB (idle after start "
                  f"{m['web_rss_idle_kib'] / 1024:.1f} MiB)."]
    if doc["notes"]:
        lines += ["", f"Notes: {'; '.join(doc['notes'])}"]
    return "\n".join(lines) + "\n"


def machine_meta():
    m = {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    with open("/proc/cpuinfo") as f:
        m["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    for name, argv in (("wrk", ["wrk", "-v"]), ("rustc", ["rustc", "--version"])):
        r = run(argv, 10)
        m[name] = ((r.stdout + r.stderr).strip().splitlines() or ["?"])[0]
    return m


def plot(doc, path):
    """Requests per second and p99 of each system at c=64 (medians over the rounds), side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(SYSTEMS[k][0], r) for k in SYSTEMS if (r := get(doc["results"], k, 64))]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.5), sharey=True)
    for ax, key, title in ((axes[0], "rps", "requests per second"), (axes[1], "p99_ms", "p99 latency (ms)")):
        vals = [r.get(key) or 0 for _, r in rows]
        ax.barh([label for label, _ in rows], vals, color="tab:blue" if key == "rps" else "tab:orange")
        ax.bar_label(ax.containers[0], labels=[fmt_num(v) if key == "rps" else fmt_ms(v) for v in vals], padding=3)
        ax.set_title(f"{title}, c=64")
        if key == "rps":  # thousands, so that six-digit ticks do not run into each other
            ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1000:.0f}k")
        ax.margins(x=0.25)
    axes[0].invert_yaxis()  # the first system on top (the axis is shared: inverting each undid it)
    fig.suptitle(f"desafio3 benchmark {doc['date']}: one machine, {doc['meta'].get('cpus')} CPUs, loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="c=64 only, a few seconds each; results to bench/results/quick/")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], help="comma list (default 1,16,64,256)")
    ap.add_argument("--duration", type=int, help="seconds measured per point")
    ap.add_argument("--warmup", type=int, help="seconds of warm-up per point")
    ap.add_argument("--systems", type=lambda s: s.split(","), default=list(SYSTEMS),
                    help="comma list of: " + ",".join(SYSTEMS))
    ap.add_argument("--skip-build", action="store_true", help="use target/release/web as is")
    ap.add_argument("--rounds", type=int, default=1, help="run the systems this many times in turn")
    a = ap.parse_args()
    if set(a.systems) - set(SYSTEMS):
        ap.error(f"unknown systems: {', '.join(sorted(set(a.systems) - set(SYSTEMS)))}")
    for k, full, quick in (("concurrency", [1, 16, 64, 256], [64]), ("duration", 10, 3), ("warmup", 2, 1)):
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)

    b = Bench(a)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the servers as Ctrl-C does
    try:
        b.run()
    except KeyboardInterrupt:
        log("interrupted: stopping the servers")
        sys.exit(130)
    finally:
        b.stack.close()
    today, out = dt.date.today().isoformat(), os.path.join(HERE, "results", "quick" if a.quick else "")
    doc = {"date": today, "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "config": {"concurrency": a.concurrency, "duration_s": a.duration, "warmup_s": a.warmup,
                      "http_timeout_s": HTTP_TIMEOUT_S, "quick": a.quick, "systems": a.systems, "rounds": a.rounds},
           "meta": {**machine_meta(), **b.meta}, "results": b.results, "notes": b.notes}
    doc["ratios"] = ratios(doc)
    os.makedirs(out, exist_ok=True)
    md = markdown(doc)
    files = {f"{today}.json": json.dumps(doc, indent=2, ensure_ascii=False), f"{today}.md": md,  # latest.md: a pointer
             "latest.md": f"Latest run: [{today}.md]({today}.md) (numbers: [{today}.json]({today}.json)).\n"}
    for name, text in files.items():
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    plot(doc, os.path.join(out, f"{today}.png"))
    print(md)
    log(f"wrote {today}.{{json,md,png}} and latest.md in {out} ({b.meta['wall_seconds']} s, {len(b.notes)} notes)")


if __name__ == "__main__":
    main()
