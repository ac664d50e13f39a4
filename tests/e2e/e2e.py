#!/usr/bin/env python3
"""desafio3 end-to-end suite, driven by tests/e2e/run; what it proves: tests/e2e/README.md.
One line per check ("PASS"/"FAIL"), then "e2e: N passed, M failed"; exit status 1 on any failure.
Standard library only (Python 3.11+)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import servers  # noqa: E402 - shared with bench/
from servers import Postgres, Redis, proc_status  # noqa: E402

PROJECT = os.environ.get("DESAFIO3_E2E_PROJECT", "desafio3-e2e")
FILES = [ROOT / "docker-compose.yml"]  # + compose.test.yml when the stand-ins are used
NAMES = ("web", "cache", "db")
DB = Postgres.container("db", "admin", "desafio3")
# the service's DEPENDENCY_TIMEOUT_MS default (1000) + slack for a busy 2-core machine
ANSWER_LIMIT_S = float(os.environ.get("DESAFIO3_E2E_ANSWER_LIMIT_S", "2.0"))
HEALTHY_TIMEOUT_S, RECOVERY_TIMEOUT_S = 180, 60
FIRST_RUN_TIMEOUT_S = 1800  # the first run builds the image: cargo on 2 cores, crates downloaded
RECIPE_DOC = ROOT / "secrets/README.md"  # its ```sh block after "<!-- e2e:" runs verbatim
PASSED = FAILED = 0
COMPOSE: list[str] = []
COMPOSE_ENV = dict(os.environ)


def check(name: str, ok: bool, detail: str = "") -> bool:
    global PASSED, FAILED
    PASSED, FAILED = PASSED + bool(ok), FAILED + (not ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name:<22} {detail}".rstrip(), flush=True)
    return ok


def info(msg: str) -> None:
    print(f"      {msg}", flush=True)


class Abort(Exception):
    """The stack is unusable: the remaining sections cannot run."""


def run(cmd: list[str], timeout: float = 120, check_rc: bool = False, env=None, **kw):
    p = servers.run(cmd, timeout, env=env, cwd=ROOT, **kw)
    if check_rc and p.returncode != 0:
        raise Abort(f"{' '.join(cmd)} → rc {p.returncode}: {last_lines(p.stderr or p.stdout)}")
    return p


def last_lines(text: str, n: int = 3) -> str:
    return " | ".join([l for l in (text or "").strip().splitlines() if l.strip()][-n:])


def compose(*args: str, timeout: float = 300, check_rc: bool = False):
    return run(COMPOSE + list(args), timeout=timeout, check_rc=check_rc, env=COMPOSE_ENV)


def inspect(*names: str) -> dict[str, dict]:
    """docker inspect of the existing ones among names (missing ones are left out)."""
    try:
        data = json.loads(run(["docker", "inspect", "--type", "container", *names], timeout=30).stdout or "[]")
    except json.JSONDecodeError:
        return {}
    return {d["Name"].lstrip("/"): d for d in data}


def check_recorded(name: str, top: int | None, when: str) -> None:
    """PostgreSQL's counter of record ≥ the highest count answered: each count is confirmed there
    before it is answered, and a batch confirmed after its requests timed out raises it further
    (docs/counting.md), so ≥, not =."""
    try:
        v = DB.value("SELECT value FROM web.visit_counter WHERE id = 1;")  # in role web's schema
    except RuntimeError as e:
        v = str(e)
    check(name, top is not None and v.isdigit() and int(v) >= top,
          f"{when}: Postgres visit_counter.value={v} ≥ the highest count answered ({top})")


# ------------------------------------------------------------------------------------------
# HTTP, the visit ledger, the load

class Resp:
    """One GET / of the load or of a check."""
    status, ctype, body, json, err, t_send, t_recv = None, "", b"", None, None, 0.0, 0.0

    latency = property(lambda self: self.t_recv - self.t_send)
    state = property(lambda self: self.json.get("status") if isinstance(self.json, dict) else None)

    @property
    def count(self) -> int | None:
        v = self.json.get("visitas_cache") if isinstance(self.json, dict) else None
        return int(v) if isinstance(v, str) and v.isdigit() else None

    def short(self) -> str:
        return f"error {self.err}" if self.err else f"HTTP {self.status} {self.body[:300].decode(errors='replace')}"


# Every GET / of the run, one entry per volume lifetime (`down -v` starts a new one): the counts
# answered, and how many requests got none (no number, an error answer, a transport error or a
# timeout: each may or may not have used a count).
LEDGER: list[dict] = [{"values": [], "nocount": 0}]
LEDGER_LOCK = threading.Lock()


def get(timeout: float = 5.0) -> Resp:
    """GET http://localhost:8080/, recorded in the ledger."""
    r = Resp()
    r.t_send = time.time()
    conn = http.client.HTTPConnection("localhost", 8080, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close", "Accept": "application/json"})
        resp = conn.getresponse()
        r.body, r.status, r.ctype = resp.read(), resp.status, resp.getheader("Content-Type", "")
        if "json" in r.ctype:
            with contextlib.suppress(ValueError):
                r.json = json.loads(r.body)
    except Exception as e:  # connection refused/reset, timeout, ...
        r.err = f"{type(e).__name__}: {e}"
    finally:
        r.t_recv = time.time()
        conn.close()
    with LEDGER_LOCK:
        if r.count is not None:
            LEDGER[-1]["values"].append(r.count)
        else:
            LEDGER[-1]["nocount"] += 1
    return r


class Load:
    """Bounded loopback load: 3 threads doing GET / with a 50 ms pause, until stopped."""

    def __init__(self, workers=3, pause=0.05, max_requests=30000, timeout=5.0):
        self.pause, self.max, self.timeout = pause, max_requests, timeout
        self.stop_ev, self.lock, self.records = threading.Event(), threading.Lock(), []
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def _work(self):
        while not self.stop_ev.is_set() and len(self.records) < self.max:
            r = get(self.timeout)
            with self.lock:
                self.records.append(r)
            self.stop_ev.wait(self.pause)

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout=self.timeout + 2)

    def snapshot(self) -> list[Resp]:
        with self.lock:
            return list(self.records)


# ------------------------------------------------------------------------------------------
# the stack

def health(name: str) -> str:
    d = inspect(name).get(name)
    return "missing" if not d else (d["State"].get("Health") or d["State"])["Status"]


def wait_healthy(timeout: float = HEALTHY_TIMEOUT_S) -> bool:
    end = time.time() + timeout
    while not all(health(n) == "healthy" for n in NAMES):
        if time.time() > end:
            return False
        time.sleep(0.5)
    return True


def stack_up(label: str, up=None) -> float:
    """compose up -d (or up(), which must start the stack); returns the seconds from `up` to all
    healthy, or fails `label` and aborts the suite. That web starts only once cache and db are
    healthy is the compose file's depends_on, asserted by ci/check-compose."""
    t0 = time.time()
    p = up() if up else compose("up", "-d", "--no-build", "--pull", "never", timeout=HEALTHY_TIMEOUT_S + 60)
    if p.returncode != 0:
        check(label, False, f"{' '.join(p.args[:3])} → rc {p.returncode}: {last_lines(p.stdout + p.stderr, 6)}")
    elif not wait_healthy():
        check(label, False, f"not all healthy after {HEALTHY_TIMEOUT_S} s: { {n: health(n) for n in NAMES} }")
    else:
        return time.time() - t0
    raise Abort("the stack did not come up")


LOGS: list[str] = []


def collect_logs():
    p = compose("logs", "--no-color", "--timestamps", timeout=60)
    LOGS.append(p.stdout + p.stderr)


def network_id(logical: str) -> str:
    p = run(["docker", "network", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
             "--filter", f"label=com.docker.compose.network={logical}"], timeout=30)
    return (p.stdout.split() or [""])[0]


# ------------------------------------------------------------------------------------------
# sections

def sec_images():
    """The official images (redis, postgres, the monitoring profile's prometheus, and the Dockerfile's
    Rust builder) when the engine has them or can pull them, else the stand-ins. desafio3-web:latest
    is built by the first run."""
    t0, why = time.time(), ""
    cfg = json.loads(compose("--profile", "monitoring", "config", "--format", "json", timeout=60, check_rc=True).stdout)
    images = [cfg["services"][n]["image"] for n in ("cache", "db", "prometheus")]
    images.append(re.search(r"^ARG RUST_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.M)[1])
    for image in images:
        if run(["docker", "image", "inspect", image], timeout=30).returncode != 0:
            p = run(["docker", "pull", "-q", image], timeout=900)
            if p.returncode != 0:
                # the daemon's own words name the registry host: keep them out of the log
                why = f"`docker pull {image}` failed (rc {p.returncode})"
                break
    if not why:
        info(f"the official images {', '.join(images)}")
        return
    FILES.append(HERE / "compose.test.yml")
    COMPOSE.extend(["-f", str(FILES[-1])])
    info(f"the stand-ins desafio3-test/redis, /postgres, /prometheus and /rust (builder), because {why}")
    p = run([str(HERE / "images.sh"), "standins"], timeout=3600)
    for line in p.stderr.splitlines():
        if line.startswith("images:"):
            info(line)
    if p.returncode != 0:
        raise Abort(f"images could not be built: {last_lines(p.stderr, 8)}")
    info(f"stand-ins ready in {time.time() - t0:.1f} s")


def doc_block(doc: Path, key: str = "") -> str:
    """The ```sh block after the first `<!-- e2e: ... -->` marker of doc that contains key."""
    m = re.search(r"<!-- e2e:[^>]*?" + re.escape(key) + r"[^>]*?-->\n```sh\n(.*?)```", doc.read_text(), re.S)
    if not m:
        raise Abort(f"{doc}: no ```sh block after an `<!-- e2e:` marker naming {key!r}")
    return m[1]


def doc_env(home: Path) -> dict[str, str]:
    """The environment a documented command runs in: this suite's project and files."""
    return dict(COMPOSE_ENV, HOME=str(home), COMPOSE_PROJECT_NAME=PROJECT, COMPOSE_FILE=os.pathsep.join(map(str, FILES)),
                DOCKER_CONFIG=os.environ.get("DOCKER_CONFIG", str(Path.home() / ".docker")))


def run_recipe(home: Path, doc: Path = RECIPE_DOC, key: str = "", then: str = 'echo "recipe-dir=$DESAFIO3_SECRETS"\n',
               cwd: Path = ROOT):
    """doc's block (doc_block), verbatim, in bash -e with HOME=home, then `then`; the stack it acts
    on is this suite's (COMPOSE_PROJECT_NAME, COMPOSE_FILE)."""
    block = doc_block(doc, key)
    info(f"running {doc.relative_to(ROOT)}'s {key or 'recipe'} block as written (HOME={home}, in {cwd}):")
    for line in block.strip().splitlines():
        info(f"  $ {line}")
    p = servers.run(["bash", "-euo", "pipefail", "-c", block + then], HEALTHY_TIMEOUT_S + 60, env=doc_env(home), cwd=cwd)
    if p.returncode != 0:
        info(f"  → rc {p.returncode}: {last_lines(p.stderr or p.stdout)}")
    return p


def sec_first_run(home: Path):
    """README's first command exactly as written, in the foreground as a newcomer runs it: it builds
    desafio3-web:latest from the Dockerfile and starts the stack; the page then counts from 1, and
    Ctrl-C stops the stack. Its volumes are then removed: the password recipe needs fresh ones."""
    command = doc_block(ROOT / "README.md", "0.first run").strip().splitlines()[0]
    info(f"running README.md's first command as written: $ {command}")
    log, t0 = (home / "first-run.log").open("w"), time.time()
    proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=doc_env(home), stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while proc.poll() is None and not all(health(n) == "healthy" for n in NAMES) and time.time() - t0 < FIRST_RUN_TIMEOUT_S:
            time.sleep(1)
        dt, built = time.time() - t0, inspect("web").get("web", {}).get("Image", "")
        r = get()
        ok = proc.poll() is None and r.status == 200 and r.state == "ok" and r.count == 1
        builder = "the stand-in builder" if len(FILES) > 1 else "rust:1-alpine"
        check("0.first run", ok, (f"`{command}` built the Dockerfile on {builder} and started the stack" if ok else
                                  f"`{command}` did not bring the stack up (rc {proc.poll()})") +
              f"; first page after {dt:.0f} s: {r.short()}" +
              ("" if ok else f"; its output: {last_lines((home / 'first-run.log').read_text(), 8)}"))
        if not ok:
            raise Abort("README's first command did not bring the stack up")
        info(f"web runs image {built[:19]} (desafio3-web:latest, just built)")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: compose stops the containers, then exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
        log.close()
    running = [n for n, d in inspect(*NAMES).items() if d["State"]["Running"]]
    check("0.ctrl-c stops", proc.returncode is not None and not running,
          f"Ctrl-C → compose exited (rc {proc.returncode}); still running: {running or 'none'}")
    compose("down", "-v", timeout=120, check_rc=True)
    LEDGER.append({"values": [], "nocount": 0})


def sec_up(home: Path) -> dict[str, str]:
    """Starts the stack with the password recipe; returns the passwords it made, by file."""
    recipe = []
    dt = stack_up("1.up", lambda: recipe.append(run_recipe(home)) or recipe[0])
    secrets_dir = Path(re.search(r"^recipe-dir=(.+)$", recipe[0].stdout, re.M)[1])  # the recipe ran: printed
    COMPOSE_ENV["DESAFIO3_SECRETS"] = str(secrets_dir)  # for the suite's later `up`s
    secrets = {n: (secrets_dir / n).read_text().strip() for n in ("db_password", "web_db_password", "redis_password")}
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in sorted(secrets_dir.iterdir())}
    check("1.up", True, f"the recipe's `docker compose up -d` → web, cache and db all healthy in {dt:.1f} s "
          f"(fresh volumes, first db init); secrets {modes} in a {oct(secrets_dir.stat().st_mode & 0o777)} directory")

    r1 = get()
    j = r1.json if isinstance(r1.json, dict) else {}
    hora = j.get("hora_db")
    problems = [msg for bad, msg in (
        (r1.status != 200, f"HTTP {r1.status}"),
        (not r1.ctype.startswith("application/json"), f"Content-Type {r1.ctype!r}"),
        (set(j) != {"status", "visitas_cache", "hora_db"}, f"keys {sorted(j)}"),
        (j.get("status") != "ok", f"status {j.get('status')!r}"),
        (not str(j.get("visitas_cache")).isdigit() or not isinstance(j.get("visitas_cache"), str),
         f"visitas_cache {j.get('visitas_cache')!r} is not a decimal string"),
        (not re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{1,6})?", str(hora)),
         f"hora_db {hora!r} is not 'YYYY-MM-DD HH:MM:SS[.ffffff]'")) if bad]
    if not problems:
        skew = abs(datetime.strptime(hora[:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp() - r1.t_send)
        if skew > 120:
            problems.append(f"hora_db {hora} is {skew:.0f} s from now (UTC)")
    check("1.contract", not problems, "after the recipe, GET http://localhost:8080/ → " + (
        "; ".join(problems) + f" — {r1.short()}" if problems else f"200 application/json {r1.body.decode()}"))
    seq = [r.json.get("visitas_cache") if isinstance(r.json, dict) else r.short() for r in (r1, get(), get())]
    check("1.sequence", seq == ["1", "2", "3"], f"three requests gave {seq} (want ['1', '2', '3'])")
    rz = run(["docker", "exec", "web", "/bin/web", "healthcheck", "--ready"], timeout=30)
    check("1.readyz", rz.returncode == 0, "docker exec web /bin/web healthcheck --ready (GET /readyz on the "
          f"unpublished admin port) → rc {rz.returncode} {last_lines(rz.stderr, 1)}")
    return secrets


def sec_least_privilege(secrets: dict[str, str]):
    """web's own users can do what web does and nothing more; the seed's admin checks still work."""
    web_sql = lambda sql: run(["docker", "exec", "db", "psql", "-q", "-U", "web", "-d", "desafio3",  # noqa: E731
                               "-v", "ON_ERROR_STOP=1", "-tAc", sql], timeout=30)
    p = web_sql("SELECT rolsuper, current_schema() FROM pg_roles WHERE rolname = current_user")
    check("8.db role", p.returncode == 0 and p.stdout.strip() == "f|web",
          f"role web: superuser|schema → {p.stdout.strip() or last_lines(p.stderr)!r} (want 'f|web')")
    p = web_sql("COPY (SELECT 1) TO PROGRAM 'id'")
    check("8.db no programs", p.returncode != 0 and "pg_execute_server_program" in p.stderr,
          f"as web: COPY (SELECT 1) TO PROGRAM 'id' → {last_lines(p.stderr, 1) or 'ran!'}")
    # web stays in its own database, makes no temporary tables, and its sessions are bounded
    refused = {d: last_lines(run(["docker", "exec", "db", "psql", "-U", "web", "-d", d, "-tAc", "SELECT 1"],
                                 timeout=30).stderr, 2) for d in ("postgres", "template1")}
    check("8.db other databases", all(f'permission denied for database "{d}"' in v and "CONNECT privilege" in v
                                      for d, v in refused.items()),
          f"as web: psql -d postgres / -d template1 → {refused}")
    p = web_sql("CREATE TEMP TABLE e2e_probe (x int)")
    check("8.db no temp tables", p.returncode != 0 and "permission denied to create temporary tables" in p.stderr,
          f"as web: CREATE TEMP TABLE → {(p.stderr.strip().splitlines() or ['created!'])[0]}")
    p = web_sql("SELECT rolconnlimit FROM pg_roles WHERE rolname = 'web'; "
                "SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting "
                "WHERE setrole = 'web'::regrole AND setdatabase = 0; SHOW statement_timeout; SHOW temp_file_limit")
    q = web_sql("SET temp_file_limit = -1")
    got, want = p.stdout.split(), ["64", "statement_timeout=5s,temp_file_limit=16MB", "5s", "16MB"]
    check("8.db role limits", p.returncode == 0 and got == want and q.returncode != 0 and "permission denied" in q.stderr,
          f"pg_roles.rolconnlimit, pg_db_role_setting, SHOW statement_timeout, SHOW temp_file_limit → {got} "
          f"(want {want}); as web: SET temp_file_limit = -1 → {last_lines(q.stderr, 1) or 'accepted!'}")
    # the init script refuses an empty password file (one line, rc 1) and changes nothing; a path
    # with quotes and spaces is read as it is (it used to clear the password)
    verifier = lambda: DB.value("SELECT rolpassword FROM pg_authid WHERE rolname = 'web'")  # noqa: E731
    before = verifier()
    script = "bash /docker-entrypoint-initdb.d/10-web-role.sh"
    p = run(["docker", "exec", "db", "bash", "-c", f": >/tmp/e2e-empty; WEB_DB_PASSWORD_FILE=/tmp/e2e-empty {script}"],
            timeout=60)
    lines = p.stderr.strip().splitlines()
    check("8.db init script empty", p.returncode == 1 and len(lines) == 1 and lines[0].startswith("10-web-role.sh: ")
          and "empty" in lines[0] and verifier() == before,
          f"10-web-role.sh with an empty WEB_DB_PASSWORD_FILE → rc {p.returncode}, stderr {lines}; "
          f"role web's password {'unchanged' if verifier() == before else 'CHANGED'}")
    quoted = "/tmp/e2e it's \"quoted\"/web_db_password"
    p = run(["docker", "exec", "-e", f"F={quoted}", "db", "bash", "-c",
             f'mkdir -p "${{F%/*}}" && cp /run/secrets/web_db_password "$F" && WEB_DB_PASSWORD_FILE=$F {script} && '
             'PGPASSWORD=$(cat "$F") psql -h 127.0.0.1 -U web -d desafio3 -tAc "SELECT current_user"; rm -rf "${F%/*}"'],
            timeout=60)
    check("8.db init script quotes", p.returncode == 0 and p.stdout.split()[-1:] == ["web"] and verifier() != before,
          f"10-web-role.sh with WEB_DB_PASSWORD_FILE={quoted!r} (web's password) → rc {p.returncode} "
          f"{last_lines(p.stdout + p.stderr, 2)!r}; then web logs in over TCP with that password")
    sec_db_environment(secrets)
    got = run([*Redis.container("cache").cli, "GET", "visitas"]).stdout.strip()
    check("8.redis default user", got.startswith("NOPERM"), f"redis-cli without a user: GET visitas → {got!r}")
    cli = Redis.container("cache", "web", secrets["redis_password"]).cli
    web = lambda *args: run([*cli, *args], timeout=30).stdout.strip()  # noqa: E731
    got = {"GET visitas": web("GET", "visitas"), "GET other": web("GET", "other"),
           "FLUSHALL": web("FLUSHALL"), "CONFIG GET dir": web("CONFIG", "GET", "dir")}
    check("8.redis web user", got["GET visitas"].isdigit() and all(v.startswith("NOPERM") for k, v in got.items()
                                                                   if k != "GET visitas"),
          f"redis-cli --user web: {got}")


def sec_db_environment(secrets: dict[str, str]):
    """What secrets/README.md says of db's environment: the official entrypoint exports
    POSTGRES_PASSWORD (read from POSTGRES_PASSWORD_FILE) and the server, PID 1, keeps it; no other
    password is there; root in the container cannot read it (no CAP_SYS_PTRACE), user postgres can."""
    pids = {n: d["State"]["Pid"] for n, d in inspect(*NAMES).items()}
    envs = {n: dict(e.partition("=")[::2] for e in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
                    .split("\0") if e) for n, pid in pids.items()}
    env, comm = envs["db"], Path(f"/proc/{pids['db']}/comm").read_text().strip()
    values = set(env.values())
    elsewhere = [n for n in ("web", "cache") if set(secrets.values()) & set(envs.get(n, {}).values())]
    as_root = run(["docker", "exec", "db", "cat", "/proc/1/environ"], timeout=30)
    as_pg = run(["docker", "exec", "-u", "postgres", "db", "cat", "/proc/1/environ"], timeout=30)
    check("8.db server environment", comm == "postgres" and env.get("POSTGRES_PASSWORD") == secrets["db_password"]
          and "POSTGRES_PASSWORD_FILE" not in env and "PGPASSWORD" not in env
          and secrets["web_db_password"] not in values and secrets["redis_password"] not in values
          and as_root.returncode != 0 and "Permission denied" in as_root.stderr
          and as_pg.returncode == 0 and secrets["db_password"] in as_pg.stdout and set(envs) == set(NAMES) and not elsewhere,
          f"/proc/<db PID 1, {comm}>/environ: POSTGRES_PASSWORD is admin's password: "
          f"{env.get('POSTGRES_PASSWORD') == secrets['db_password']}; names {sorted(env)}; web's passwords absent: "
          f"{not ({secrets['web_db_password'], secrets['redis_password']} & values)}; in the container, "
          f"root reads it: {as_root.returncode == 0} ({last_lines(as_root.stderr, 1)}), postgres reads it: "
          f"{as_pg.returncode == 0}; a password in the environment of web's or cache's PID 1: {elsewhere or 'none'}")


def sec_seed():
    p = run(["docker", "exec", "cache", "redis-cli", "ping"], timeout=30)
    check("2.redis-cli ping", p.returncode == 0 and p.stdout.strip() == "PONG",
          f"docker exec cache redis-cli ping → {p.stdout.strip() or last_lines(p.stderr)!r}")
    p = run(["docker", "exec", "db", "psql", "-U", "admin", "-d", "desafio3", "-c", "SELECT NOW();"], timeout=30)
    check("2.psql SELECT NOW()", p.returncode == 0 and re.search(r"\(1 row\)", p.stdout) is not None,
          'docker exec db psql -U admin -d desafio3 -c "SELECT NOW();" → '
          + (" / ".join(l.strip() for l in p.stdout.strip().splitlines()) if p.returncode == 0 else last_lines(p.stderr)))


# capabilities each container may add (its entrypoint chowns, then drops to a user), and the
# capability sets that must be empty in its running process (the server, after that drop)
HARDENING = {"web": (set(), ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")),
             "cache": ({"CHOWN", "DAC_READ_SEARCH", "SETGID", "SETUID"}, ("CapEff",)),
             "db": ({"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"}, ("CapEff",))}


def sec_hardening(secrets: dict[str, str]):
    data = inspect(*NAMES)
    web = data["web"]
    hc, cfg, pid = web["HostConfig"], web["Config"], web["State"]["Pid"]
    # uid and the root mount: from the running process (/proc of the host)
    uids = proc_status(pid).get("Uid", [])
    check("5.non-root", cfg.get("User") == "65532:65532" and set(uids) == {"65532"},
          f"Config.User {cfg.get('User')!r}; process uids (real, effective, saved, fs) {uids}")
    ro_mount = [f[5] for f in map(str.split, Path(f"/proc/{pid}/mountinfo").read_text().splitlines()) if f[4] == "/"]
    probe = Path(f"/proc/{pid}/root/.e2e-write-probe")
    try:
        probe.write_text("x")
        probe.unlink()
        blocked = "no (write succeeded!)"
    except OSError as e:
        blocked = f"yes ({os.strerror(e.errno) if e.errno else e})"
    check("5.read-only rootfs", hc.get("ReadonlyRootfs") is True and ro_mount[-1:] != [] and
          ro_mount[-1].split(",")[0] == "ro" and blocked.startswith("yes"),
          f"HostConfig.ReadonlyRootfs={hc.get('ReadonlyRootfs')}; / mounted {(ro_mount or ['?'])[-1]}; "
          f"write into the container's / refused: {blocked}")
    # the image as built: nix/check-image.py (what `nix flake check` runs on the Nix image) holds
    # `docker save` of it to nix/image-facts.json: exactly its files (so no shell) and config
    with tempfile.TemporaryDirectory() as d:
        run(["docker", "image", "save", "-o", f"{d}/web.tar", cfg["Image"]], timeout=120, check_rc=True)
        p = run([sys.executable, str(ROOT / "nix/check-image.py"), str(ROOT / "nix/image-facts.json"),
                 f"{d}/web.tar", "--docker-built"], timeout=120)
    check("5.image facts", p.returncode == 0, f"nix/check-image.py on {cfg['Image']}: {last_lines(p.stdout + p.stderr, 2)}")
    pubs = {n: sorted({f"{b.get('HostIp') or '*'}:{b['HostPort']}->{k}" for k, v in
                       (d["NetworkSettings"].get("Ports") or d["HostConfig"].get("PortBindings") or {}).items()
                       for b in v or []}) for n, d in data.items()}
    check("5.ports", not pubs["cache"] and not pubs["db"] and pubs["web"] and
          all(p.endswith("->5000/tcp") and ":8080->" in p for p in pubs["web"]),
          f"published (the admin port 9090 is not): web {pubs['web']}, cache {pubs['cache'] or 'none'}, db {pubs['db'] or 'none'}")
    backend = network_id("backend")
    nets = {n: sorted(d["NetworkSettings"]["Networks"]) for n, d in data.items()}
    internal = run(["docker", "network", "inspect", "-f", "{{.Internal}}", backend], timeout=30).stdout.strip()
    check("5.networks", internal == "true" and nets["cache"] == nets["db"] == [f"{PROJECT}_backend"],
          f"backend internal={internal}; {nets}")
    leaked = [n for n, d in data.items() for v in secrets.values() if v in json.dumps(d)]
    pw_env = [e.split("=")[0] for d in data.values() for e in d["Config"].get("Env") or []
              if re.match(r"[A-Z_]*PASSWORD=", e)]
    check("5.secret not in inspect", not leaked and not pw_env,
          f"no password value ({', '.join(secrets)}) in docker inspect of {', '.join(NAMES)}"
          + (f"; FOUND in {leaked}" if leaked else "") + (f"; password variables {pw_env}" if pw_env else "")
          + "; only *_PASSWORD_FILE paths and an --aclfile under /run/secrets")
    for name, (caps, empty) in HARDENING.items():
        hc, status = data[name]["HostConfig"], proc_status(data[name]["State"]["Pid"])
        added = {c.removeprefix("CAP_") for c in hc.get("CapAdd") or []}
        sets = {k: status.get(k, ["?"])[0] for k in empty}
        nnp = status.get("NoNewPrivs", ["?"])[0]
        check(f"5.{name} hardening", "ALL" in (hc.get("CapDrop") or []) and added == caps
              and "no-new-privileges:true" in (hc.get("SecurityOpt") or []) and nnp == "1"
              and all(v == "0" * 16 for v in sets.values()) and (hc.get("Memory") or 0) > 0
              and (name != "web" or (hc.get("NanoCpus") or 0) > 0),
              f"CapDrop {hc.get('CapDrop')} CapAdd {sorted(added)}; process uid {status.get('Uid', ['?'])[0]} "
              + " ".join(f"{k}={v}" for k, v in sets.items())
              + f" NoNewPrivs={nnp}; limits {(hc.get('Memory') or 0) // 2**20} MiB, {(hc.get('NanoCpus') or 0) / 1e9} CPUs")
    logs = {n: d["HostConfig"].get("LogConfig") or {} for n, d in data.items()}
    check("5.log rotation", all(c.get("Type") == "json-file" and (c.get("Config") or {}).get("max-size")
                                and (c.get("Config") or {}).get("max-file") for c in logs.values()),
          "; ".join(f"{n}: {c.get('Type')} {c.get('Config')}" for n, c in logs.items()) + " (max-size, max-file)")


def sec_stop():
    last = [get() for _ in range(3)][-1].count
    t0 = time.monotonic()
    p = compose("stop", "web", timeout=60)
    dt = time.monotonic() - t0
    st = inspect("web").get("web", {}).get("State", {})
    check("6.stop web", p.returncode == 0 and dt < 3 and st.get("ExitCode") == 0 and not st.get("Running"),
          f"docker compose stop web → rc {p.returncode} in {dt:.2f} s (< 3 s), container exit code {st.get('ExitCode')}")
    check_recorded("6.recorded", last, "web stopped")
    p = compose("start", "web", timeout=120)
    if p.returncode != 0 or not wait_healthy(120):
        raise Abort(f"web did not come back after `docker compose start web`: {last_lines(p.stderr)}")


# "kill -s KILL <container>" is done as a crash: SIGKILL to the container's PID 1 from the host.
# (`docker kill` would mark the container as stopped by hand, and the engine's restart policy
# then leaves it down; a crash is what the restart policy is for.) cache, restarted by hand or by
# its policy, must start again from its append-only file (Redis logs "DB loaded from append only file").
FAULTS = [("restart cache", "restart", "cache"), ("kill -s KILL cache", "kill", "cache"), ("restart db", "restart", "db"),
          ("kill -s KILL web", "kill", "web"), ("disconnect cache", "disconnect", "cache")]


def fault(how: str, target: str, backend: str):
    """Does one fault; returns (CompletedProcess, label)."""
    if how == "disconnect":  # docker network disconnect, 4 s, connect
        p = run(["docker", "network", "disconnect", backend, "cache"], timeout=60)
        time.sleep(4.0)
        p2 = run(["docker", "network", "connect", "--alias", "cache", backend, "cache"], timeout=60)
        p.returncode, p.stderr = p.returncode or p2.returncode, p.stderr + p2.stderr
        return p, "cache cut from the backend network for 4 s"
    if how == "kill":
        pid = str(inspect(target)[target]["State"]["Pid"])
        p = run(([] if os.geteuid() == 0 else ["sudo", "-n"]) + ["kill", "-s", "KILL", pid], timeout=30)
        return p, f"kill -s KILL {pid} ({target}'s PID 1 on the host: a crash)"
    return run(["docker", "restart", target], timeout=120), f"docker restart {target}"


def acceptable(r: Resp, target: str) -> bool:
    """An answer a fault of target may give: ok or degraded; while db is down also 503 "error"
    naming db (no count rather than one PostgreSQL has not confirmed)."""
    return (r.status == 200 and r.state in ("ok", "degraded")) or (
        target == "db" and r.status == 503 and r.state == "error" and "db" in (r.json.get("erros") or {}))


def sec_faults():
    backend = network_id("backend")
    if not backend:
        raise Abort("backend network not found")
    info(f"fault phase starts at visitas_cache={get().count}; load: 3 loopback workers, 50 ms pause, "
         "5 s client timeout")
    load = Load()
    time.sleep(2)
    try:
        for name, how, target in FAULTS:
            restarts_before = inspect(target)[target]["RestartCount"]
            w_start = time.time()
            p, label = fault(how, target, backend)
            fault_end = time.time()
            if p.returncode != 0:
                check(f"4.{name}", False, f"fault command failed: {last_lines(p.stderr)}")
                continue
            # recovery: 2 s of nothing but ok answers sent after the fault ended
            rec_at = wait_recovered(load, fault_end)
            recs = [r for r in load.snapshot() if r.t_recv >= w_start and r.t_send <= (rec_at or time.time())]
            answered = [r for r in recs if r.status is not None]
            degraded = [r for r in answered if r.state == "degraded"]
            bad = [r for r in answered if not acceptable(r, target)]
            errors = [r for r in recs if r.status is None]
            slow = [r for r in answered if r.latency > ANSWER_LIMIT_S]
            slowest = max((r.latency for r in answered), default=0.0)
            recovered = f"recovered after {rec_at - fault_end:.1f} s" if rec_at else "NOT recovered"
            restarted = inspect(target)[target]["RestartCount"] > restarts_before
            aof = None
            if target == "cache" and how != "disconnect":
                logs = run(["docker", "logs", "--since", f"{w_start:.3f}", "cache"], timeout=30)
                aof = "DB loaded from append only file" in logs.stdout + logs.stderr
            figures = (f"{len(recs)} requests: {len(degraded)} degraded, {sum(r.count is None for r in answered)} "
                       f"answers without a count, {len(bad)} other, {len(errors)} transport errors; slowest "
                       f"{slowest * 1000:.0f} ms; {recovered}"
                       + (f"; restarted by its policy: {restarted}" if how == "kill" else "")
                       + (f"; started again from its AOF: {aof}" if aof is not None else ""))
            good = rec_at is not None and not slow and (how != "kill" or restarted) and aof is not False
            if target != "web":
                good = good and not errors and not bad and (how != "disconnect" or len(degraded) > 0)
            check(f"4.{name}", good, f"{label}: {figures}")
            if slow:
                info(f"answers slower than {ANSWER_LIMIT_S:.1f} s: {[round(r.latency, 2) for r in slow[:10]]}")
            for r in (errors + bad)[:3]:
                info(f"e.g. {r.short()[:200]}")
            if degraded:
                info(f"degraded answer e.g. {degraded[0].body.decode(errors='replace')[:220]}")
            if rec_at is None:  # do not let one fault spoil the next ones: bring the stack back by hand
                compose("up", "-d", "--no-build", "--pull", "never", timeout=180)
                info(f"restored by hand (docker compose up -d): {'all healthy' if wait_healthy(90) else 'NOT healthy'}")
            time.sleep(1)
    finally:
        load.stop()
    check("4.all healthy again", wait_healthy(RECOVERY_TIMEOUT_S), "{" + ", ".join(f"{n}: {health(n)}" for n in NAMES) + "}")
    final, values, nocount = get(), LEDGER[-1]["values"], LEDGER[-1]["nocount"]
    info(f"load: {len(load.snapshot())} requests; since the volumes were created: {len(values)} answers carried "
         f"a count, {nocount} requests got none (no number, an error answer, no answer)")
    if final.count is None:
        check("4.no visit lost", False, f"final GET / → {final.short()}")
        return
    cf, top, distinct = final.count, max(values), len(set(values))
    check("4.no visit lost", cf >= top and cf >= len(values), f"final counter {cf} ≥ the highest count handed "
          f"out ({top}) and ≥ the {len(values)} answers that carried one")
    # A number may also be skipped for each request in flight at a fault (confirmed ahead, then not counted).
    bound = nocount + len(load.threads) * len(FAULTS)
    check("4.over-count bounded", 0 <= cf - distinct <= bound, f"final counter {cf} − {distinct} distinct counts "
          f"handed out = {cf - distinct} ≤ {nocount} requests that got no count + {len(load.threads)} in flight "
          f"at each of {len(FAULTS)} faults")
    check_recorded("4.recorded", top, "right away")


def sec_unique():
    """No count handed out twice in the whole run (each volume lifetime counts from 1 again)."""
    repeated = [sorted(v for v, n in Counter(l["values"]).items() if n > 1) for l in LEDGER]
    check("9.no count repeated", not any(repeated), f"{' and '.join(str(len(l['values'])) for l in LEDGER)} counts "
          f"handed out in {len(LEDGER)} volume lifetime(s)" + (f"; more than once: {repeated}" if any(repeated)
                                                                 else ", each exactly once"))


def wait_recovered(load: Load, since: float) -> float | None:
    """First send time of an ok streak lasting 2 s (after `since`), or None."""
    end = time.time() + RECOVERY_TIMEOUT_S
    while time.time() < end:
        time.sleep(0.5)
        recs, streak = [r for r in load.snapshot() if r.t_send >= since], None
        for r in recs:
            streak = (streak or r.t_send) if r.status == 200 and r.state == "ok" else None
        if streak is not None and recs[-1].t_send - streak >= 2.0:
            return streak
    return None


def sec_persistence():
    before = get().count
    collect_logs()
    compose("down", timeout=120, check_rc=True)  # volumes kept
    dt = stack_up("3.up again")
    info(f"warm start: docker compose up → all healthy in {dt:.1f} s (existing volumes)")
    r = get()
    check("3.count continues", before is not None and r.count == before + 1, f"before down {before}; after up {r.short()}")
    collect_logs()
    compose("down", "-v", timeout=120, check_rc=True)
    LEDGER.append({"values": [], "nocount": 0})
    stack_up("3.up fresh")
    r = get()
    check("3.reset", r.count == 1, f"after down -v and up: {r.short()}")


def sec_upgrade(home: Path):
    """README's "Upgrading an existing volume", as written, on a database laid out as before the
    role web existed (the counter in public, owned by admin, no role web, PostgreSQL's default
    privileges: every role may connect to postgres and template1 and make temporary tables)."""
    before = get().count
    compose("stop", "web", timeout=60, check_rc=True)
    DB.value("ALTER TABLE web.visit_counter SET SCHEMA public; ALTER TABLE public.visit_counter OWNER TO admin; "
             "DROP SCHEMA web; DROP ROLE web; GRANT CONNECT ON DATABASE postgres, template1 TO PUBLIC; "
             "GRANT TEMPORARY ON DATABASE desafio3 TO PUBLIC; SELECT 1;")
    p = run_recipe(home, ROOT / "README.md", "3.upgrade recipe", then="")
    healthy = p.returncode == 0 and wait_healthy(RECOVERY_TIMEOUT_S)
    r = get()
    owner = DB.value("SELECT schemaname || '.' || tablename || ' owned by ' || tableowner FROM pg_tables "
                     "WHERE tablename = 'visit_counter';")
    limits = DB.value("SELECT concat_ws(',', rolconnlimit, has_database_privilege('web', 'postgres', 'CONNECT'), "
                      "has_database_privilege('web', 'template1', 'CONNECT'), "
                      "has_database_privilege('web', 'desafio3', 'TEMPORARY')) FROM pg_roles WHERE rolname = 'web'")
    check("3.upgrade recipe", healthy and r.state == "ok" and before is not None and r.count == before + 1
          and owner == "web.visit_counter owned by web" and limits == "64,f,f,f",
          f"README's upgrade recipe → rc {p.returncode} {last_lines(p.stderr, 1)}; {owner}; role web's connection "
          f"limit, CONNECT on postgres and template1, TEMPORARY: {limits} (want 64,f,f,f); before {before}, "
          f"after {r.short()}")


def wait_ok(above: int, tries: int = 40) -> Resp:
    """GET / until an `ok` page (0.25 s apart); its count must then be above `above`."""
    for _ in range(tries):
        r = get()
        if r.state == "ok":
            break
        time.sleep(0.25)
    return r


def sec_readme_blocks(home: Path):
    """README's other command blocks, each run as written: readiness and metrics, the settings
    from .env and the shell, and the runbook's repairs (a poisoned counter, a restored backup)."""
    p = run_recipe(home, ROOT / "README.md", "7.readiness and metrics", then="")
    series = 'http_requests_total{method="GET",route="/",status="200"}'
    check("7.readiness and metrics", p.returncode == 0 and series in p.stdout,
          f"rc {p.returncode}; `web metrics` printed {p.stdout.count(chr(10))} lines, {series} among them: {series in p.stdout}")

    try:  # the settings block writes .env next to docker-compose.yml, as a user does
        p = run_recipe(home, ROOT / "README.md", "7.settings", then="")
        env = dict(v.split("=", 1) for v in inspect("web")["web"]["Config"]["Env"])
        r = wait_ok(0)
        check("7.settings", p.returncode == 0 and env.get("DB_TIMEZONE") == "Europe/Lisbon" and env.get("RUST_LOG") == "warn"
              and r.state == "ok", f"rc {p.returncode}; web then has DB_TIMEZONE={env.get('DB_TIMEZONE')} (the shell's), "
              f"RUST_LOG={env.get('RUST_LOG')} (.env's); {r.short()}")
    finally:
        (ROOT / ".env").unlink(missing_ok=True)
        stack_up("7.settings undone")

    web_redis = lambda *cmd: run(["docker", "exec", "-i", "cache", "redis-cli", "--user", "web", "--askpass", *cmd],  # noqa: E731
                                 timeout=30, input=(Path(COMPOSE_ENV["DESAFIO3_SECRETS"]) / "redis_password").read_text())
    top = get().count or 0
    web_redis("SET", "visitas", "12ab")
    poisoned = [get() for _ in range(3)]
    p = run_recipe(home, ROOT / "README.md", "7.poisoned counter", then="")
    r = wait_ok(top)
    check("7.poisoned counter", any((x.json or {}).get("erros", {}).get("cache") == "invalid counter value" for x in poisoned)
          and p.returncode == 0 and r.state == "ok" and (r.count or 0) > top,
          f"visitas set to '12ab' → {poisoned[-1].short()}; the runbook's block → rc {p.returncode}; then {r.short()}")

    p = run_recipe(home, ROOT / "README.md", "7.backup", then="", cwd=home)
    answered = [get().count for _ in range(5)]
    q = run_recipe(home, ROOT / "README.md", "7.restore", then="", cwd=home)
    r = wait_ok(0)
    n = int(re.search(r"^N=(\d+)", doc_block(ROOT / "README.md", "7.restore"), re.M)[1])
    check("7.backup and restore", p.returncode == 0 and q.returncode == 0 and r.state == "ok" and (r.count or 0) > n,
          f"backup → rc {p.returncode} ({(home / 'backup.sql').stat().st_size if (home / 'backup.sql').exists() else 0} bytes); "
          f"then counts {answered}; restore with N={n} → rc {q.returncode}; then {r.short()} (each count once: 9.)")


PROMETHEUS = "http://127.0.0.1:9090"  # README.md "Monitoring": published on 127.0.0.1 only
MONITORING = ("prometheus", "grafana")


def prom_api(path: str, **params) -> dict:
    """GET Prometheus's HTTP API on its published port; {} when it does not answer (yet)."""
    url = f"{PROMETHEUS}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except (OSError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def poll(what, timeout: float = 60, pause: float = 1.0):
    """what() until it returns something true, or the last result after timeout seconds."""
    end = time.time() + timeout
    while True:
        got = what()
        if got or time.time() > end:
            return got
        time.sleep(pause)


def dependency_alerts(dependency: str) -> list[str]:
    alerts = prom_api("alerts").get("data", {}).get("alerts", [])
    return [a["state"] for a in alerts
            if a["labels"].get("alertname") == "WebDependencyDown" and a["labels"].get("dependency") == dependency]


def sec_monitoring(home: Path):
    """README's monitoring profile: Prometheus scrapes web, loads the rules, answers queries over
    web's series and the dashboard's queries, and stopping cache makes the dependency alert
    pending or firing (then it resolves). Grafana's image cannot be pulled here and has no
    stand-in: then only Prometheus is started, and the README block is not run as written."""
    block = doc_block(ROOT / "README.md", "10.monitoring up").strip()  # aborts if README lost it
    cfg = json.loads(compose("--profile", "monitoring", "config", "--format", "json", timeout=60, check_rc=True).stdout)
    grafana = cfg["services"]["grafana"]["image"]
    have_grafana = (run(["docker", "image", "inspect", grafana], timeout=30).returncode == 0
                    or run(["docker", "pull", "-q", grafana], timeout=900).returncode == 0)
    if have_grafana:
        p = run_recipe(home, ROOT / "README.md", "10.monitoring up", then="")
        how = "README's block as written"
    else:
        p = compose("--profile", "monitoring", "up", "-d", "--no-build", "--pull", "never", "prometheus", timeout=180)
        how = (f"`docker compose --profile monitoring up -d prometheus` (README's `{block}` starts Grafana too, but "
               f"{grafana} cannot be pulled here and has no stand-in: Grafana NOT run)")
    data = inspect(*MONITORING)
    pubs = {n: sorted({f"{b.get('HostIp')}:{b['HostPort']}" for v in (d["NetworkSettings"].get("Ports") or {}).values()
                       for b in v or []}) for n, d in data.items()}
    nets = {n: sorted(d["NetworkSettings"]["Networks"]) for n, d in data.items()}
    check("10.monitoring up", p.returncode == 0 and "prometheus" in data and data["prometheus"]["State"]["Running"]
          and all(h.startswith("127.0.0.1:") for v in pubs.values() for h in v)
          and all(f"{PROJECT}_backend" not in v for v in nets.values()),
          f"{how} → rc {p.returncode} {last_lines(p.stderr, 1)}; published {pubs}; networks {nets}")

    def web_target():
        ts = prom_api("targets").get("data", {}).get("activeTargets", [])
        return [t for t in ts if t["labels"].get("job") == "web" and t["health"] == "up"]
    up = poll(web_target)
    check("10.scrapes web", bool(up), f"Prometheus at {PROMETHEUS}: target job=web "
          + (f"{up[0]['scrapeUrl']} up" if up else f"not up: {prom_api('targets')}"[:300]))

    def rules():
        groups = prom_api("rules").get("data", {}).get("groups", [])
        rs = [r for g in groups for r in g["rules"]]
        return (groups, rs) if rs and all(r.get("health") == "ok" for r in rs) else None
    got = poll(rules)
    groups, rs = got or ([], [])
    check("10.rules loaded", bool(got) and len(rs) >= 14,
          f"{len(rs)} rules in groups {[g['name'] for g in groups]}, every one evaluated without error"
          if got else f"rules not all healthy: {json.dumps(prom_api('rules'))[:300]}")

    for _ in range(5):
        get()

    def recorded():
        res = prom_api("query", query='job:web_page_requests:rate5m{job="web"}').get("data", {}).get("result", [])
        return res if res and float(res[0]["value"][1]) > 0 else None
    res = poll(recorded, timeout=90)
    raw = prom_api("query", query='sum(http_requests_total{job="web",route="/"})').get("data", {}).get("result", [])
    check("10.query", bool(res) and bool(raw), f"job:web_page_requests:rate5m{{job=\"web\"}} = "
          f"{res[0]['value'][1] if res else 'no data'} req/s; sum(http_requests_total{{job=\"web\",route=\"/\"}}) = "
          f"{raw[0]['value'][1] if raw else 'no data'}")

    dashboard = json.loads((ROOT / "deploy/monitoring/grafana/dashboards/web.json").read_text())
    queries = [t["expr"].replace("$__rate_interval", "1m") for panel in dashboard["panels"] for t in panel["targets"]]
    answers = [prom_api("query", query=q) for q in queries]
    failed = [(q, a.get("error")) for q, a in zip(queries, answers) if a.get("status") != "success"]
    with_data = sum(bool(a.get("data", {}).get("result")) for a in answers)
    check("10.dashboard queries", not failed, f"{len(queries)} dashboard queries run on Prometheus, {with_data} "
          f"with data now" + (f"; FAILED: {failed[:3]}" if failed else ""))

    t0 = time.time()
    compose("stop", "cache", timeout=60, check_rc=True)
    for _ in range(3):
        get()
    states = poll(lambda: dependency_alerts("cache"), timeout=60)
    dt = time.time() - t0
    compose("start", "cache", timeout=60, check_rc=True)
    healthy, r = wait_healthy(RECOVERY_TIMEOUT_S), wait_ok(0)
    resolved = poll(lambda: not dependency_alerts("cache"), timeout=60)
    check("10.dependency alert", bool(states) and set(states) <= {"pending", "firing"} and healthy and resolved,
          f"docker compose stop cache → WebDependencyDown{{dependency=\"cache\"}} {states or 'NOT raised'} after "
          f"{dt:.0f} s; cache started again → healthy {healthy}, {r.short()[:80]}; alert gone: {bool(resolved)}")
    compose("--profile", "monitoring", "rm", "-s", "-f", *MONITORING, timeout=120)


def sec_logs(secrets: dict[str, str]):
    collect_logs()
    text = "\n".join(LOGS)
    check("5.secret not in logs", not any(v in text for v in secrets.values()) and text.count("\n") > 0,
          f"no password value in {text.count(chr(10))} log lines of web, cache and db (whole run)")


# ------------------------------------------------------------------------------------------

def preflight():
    global COMPOSE
    COMPOSE = ["docker", "compose", "-p", PROJECT] + sum((["-f", str(f)] for f in FILES), [])
    p = run(["docker", "ps", "-a", "--format", '{{.Names}}\t{{.Label "com.docker.compose.project"}}'], timeout=30)
    others = [f"{n} (project {proj or '-'})" for n, _, proj in (l.partition("\t") for l in p.stdout.splitlines())
              if n in NAMES + MONITORING and proj != PROJECT]
    if p.returncode != 0 or others:  # docker-compose.yml fixes container_name: one stack at a time
        raise Abort(f"docker does not answer ({last_lines(p.stderr)})" if p.returncode else
                    f"remove the containers outside the e2e project first: {', '.join(others)}")


def cleanup():
    p = compose("--profile", "monitoring", "down", "-v", "--remove-orphans", "--timeout", "15", timeout=180)
    if p.returncode != 0:
        print(f"e2e: cleanup failed: {last_lines(p.stderr)}", file=sys.stderr)


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="desafio3-e2e-home-"))  # the recipe's $HOME
    COMPOSE_ENV.pop("DESAFIO3_SECRETS", None)
    COMPOSE_ENV.pop("DB_TIMEZONE", None)  # hora_db is checked against the host clock in UTC
    created, t_start = False, time.time()
    try:
        preflight()
        info(f"project {PROJECT}: {' '.join(COMPOSE)}")
        cleanup()  # a stack left by an interrupted run
        created = True
        sec_images()
        sec_first_run(home)
        secrets = sec_up(home)
        sec_seed()
        sec_least_privilege(secrets)
        sec_hardening(secrets)
        sec_stop()
        sec_faults()
        sec_persistence()
        sec_upgrade(home)
        sec_readme_blocks(home)
        sec_monitoring(home)
        sec_logs(secrets)
    except Abort as e:
        check("aborted", False, str(e))
    except BaseException as e:  # a bug in the suite, an unexpected answer, Ctrl-C: fail, still clean up
        import traceback
        traceback.print_exc()
        check("aborted", False, f"{type(e).__name__}: {e}")
    finally:
        if any(l["values"] for l in LEDGER):
            sec_unique()
        if created:
            if FAILED:
                print("---- last log lines (failure context) ----", file=sys.stderr)
                print(compose("logs", "--no-color", "--tail", "15", timeout=60).stdout[-6000:], file=sys.stderr)
            cleanup()
        shutil.rmtree(home, ignore_errors=True)
    info(f"suite took {time.time() - t_start:.0f} s")
    print(f"e2e: {PASSED} passed, {FAILED} failed", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
