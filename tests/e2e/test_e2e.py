"""desafio3 end-to-end suite (pytest, run by tests/e2e/run; what it proves: tests/e2e/README.md).
The tests run in file order on one stack, started once and removed at the end (also on failure);
each leaves it up and healthy for the next. `-k` selects tests; the stack they need still starts."""

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import urllib.parse
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import servers  # noqa: E402 - shared with bench/
from servers import Postgres, Redis, http_get, proc_status, wait_for  # noqa: E402

PROJECT = os.environ.get("DESAFIO3_E2E_PROJECT", "desafio3-e2e")
FILES = [ROOT / "docker-compose.yml"]  # + compose.test.yml when the stand-ins are used
NAMES, MONITORING = ("web", "cache", "db"), ("prometheus", "grafana")
BACKEND = f"{PROJECT}_backend"  # the network of cache and db, as compose names it
DB = Postgres.container("db", "admin", "desafio3")
# the service's DEPENDENCY_TIMEOUT_MS default (1000) + slack for a busy 2-core machine
ANSWER_LIMIT_S = float(os.environ.get("DESAFIO3_E2E_ANSWER_LIMIT_S", "2.0"))
HEALTHY_TIMEOUT_S, RECOVERY_TIMEOUT_S = 180, 60
FIRST_RUN_TIMEOUT_S = 1800  # the first run builds the image: cargo on 2 cores, crates downloaded
README = ROOT / "README.md"  # its ```sh blocks after "<!-- e2e: ... (test name) -->" run verbatim
# hora_db is checked against the host clock in UTC; the recipe sets DESAFIO3_SECRETS itself
COMPOSE_ENV = {k: v for k, v in os.environ.items() if k not in ("DESAFIO3_SECRETS", "DB_TIMEZONE")}
PROMETHEUS = "http://127.0.0.1:9090"  # README.md "Monitoring": published on 127.0.0.1 only
BROKEN: list[str] = []  # why the stack could not be brought back: every later test fails at once
info = logging.getLogger("e2e").info


def run(cmd, timeout: float = 120, **kw):
    return servers.run([str(c) for c in cmd], timeout, cwd=kw.pop("cwd", ROOT), **kw)


def last_lines(text: str, n: int = 3) -> str:
    return " | ".join([l for l in (text or "").strip().splitlines() if l.strip()][-n:])


def ok(p):
    assert p.returncode == 0, f"{' '.join(p.args)} → rc {p.returncode}: {last_lines(p.stderr or p.stdout)}"
    return p


def compose(*args: str, timeout: float = 300):
    files = [a for f in FILES for a in ("-f", f)]
    return run(["docker", "compose", "-p", PROJECT, *files, *args], timeout, env=COMPOSE_ENV)


def compose_config() -> dict:
    return json.loads(ok(compose("--profile", "monitoring", "config", "--format", "json", timeout=60)).stdout)


def inspect(*names: str) -> dict[str, dict]:
    """docker inspect of the existing ones among names (missing ones are left out)."""
    with contextlib.suppress(json.JSONDecodeError):
        data = json.loads(run(["docker", "inspect", "--type", "container", *names], 30).stdout or "[]")
        return {d["Name"].lstrip("/"): d for d in data}
    return {}


def have_image(image: str) -> bool:
    return run(["docker", "image", "inspect", image], 30).returncode == 0 or \
        run(["docker", "pull", "-q", image], 900).returncode == 0


def assert_recorded(top: int | None):
    """PostgreSQL's counter of record ≥ the highest count answered: ≥, as a batch confirmed after
    its requests timed out raises it further (docs/counting.md)."""
    v = DB.value("SELECT value FROM web.visit_counter WHERE id = 1;")  # in role web's schema
    assert top is not None and int(v) >= top, f"visit_counter.value={v}, the highest count answered {top}"


# ------------------------------------------------------------------------------------------
# HTTP, the visit ledger, the load

class Resp:
    """One GET / of the load or of a test: its HTTP status (None: no answer, the body says why),
    the page as a dict ({} if not JSON), its count if it carries one, and when it was sent and answered."""

    def __init__(self, status: int | None, body: str, t_send: float):
        self.status, self.body, self.t_send, self.t_recv = status, body, t_send, time.time()
        self.latency, self.page = self.t_recv - t_send, {}
        with contextlib.suppress(ValueError):
            self.page = json.loads(body) if status else {}
        self.state, v = self.page.get("status"), self.page.get("visitas_cache")
        self.count = int(v) if isinstance(v, str) and v.isdigit() else None

    def short(self) -> str:
        return f"HTTP {self.status} {self.body[:300]}" if self.status else f"error {self.body}"


# Every GET / of the run, one entry per volume lifetime (`down -v` starts a new one): the counts
# answered, and how many requests got none (no number, an error answer, a transport error or a
# timeout: each may or may not have used a count).
LEDGER: list[dict] = [{"values": [], "nocount": 0}]
LEDGER_LOCK = threading.Lock()


def get(timeout: float = 5.0) -> Resp:
    """GET http://localhost:8080/ (a connection of its own), recorded in the ledger."""
    t_send = time.time()
    r = Resp(*http_get("http://localhost:8080/", timeout), t_send)
    with LEDGER_LOCK:
        if r.count is not None:
            LEDGER[-1]["values"].append(r.count)
        else:
            LEDGER[-1]["nocount"] += 1
    return r


def wait_ok() -> Resp:
    """GET / until an `ok` page (0.25 s apart, 10 s at most): that page, or the last one."""
    last = []
    return wait_for(lambda: last.append(get()) or (last[-1] if last[-1].state == "ok" else None), 10, 0.25) or last[-1]


class Load:
    """Bounded loopback load: 3 threads doing GET / (5 s timeout) with a 50 ms pause, until stopped
    or 30000 requests. records: the requests answered so far (list.append is atomic; copy to iterate)."""

    def __init__(self):
        self.stop_ev, self.records = threading.Event(), []
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(3)]
        for t in self.threads:
            t.start()

    def _work(self):
        while not self.stop_ev.is_set() and len(self.records) < 30000:
            self.records.append(get(5.0))
            self.stop_ev.wait(0.05)

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout=7)  # a request's 5 s timeout, and slack


# ------------------------------------------------------------------------------------------
# the stack

def health(name: str) -> str:
    d = inspect(name).get(name)
    return "missing" if not d else (d["State"].get("Health") or d["State"])["Status"]


def wait_healthy(timeout: float = HEALTHY_TIMEOUT_S) -> bool:
    return bool(wait_for(lambda: all(health(n) == "healthy" for n in NAMES), timeout, 0.5))


def stack_up(up=None) -> float:
    """compose up -d (or up()); the seconds from `up` to all healthy, failing which this test and every
    later one fail. (web waiting for healthy cache and db is depends_on, asserted by ci/check-compose.)"""
    usable()
    t0 = time.time()
    p = up() if up else compose("up", "-d", "--no-build", "--pull", "never", timeout=HEALTHY_TIMEOUT_S + 60)
    if p.returncode != 0:
        BROKEN.append(f"{' '.join(p.args[:3])} → rc {p.returncode}: {last_lines(p.stdout + p.stderr, 6)}")
    elif not wait_healthy():
        BROKEN.append(f"not all healthy after {HEALTHY_TIMEOUT_S} s: { {n: health(n) for n in NAMES} }")
    usable()
    return time.time() - t0


def usable():
    if BROKEN:
        pytest.fail(f"the stack is unusable: {BROKEN[0]}")


LOGS: list[str] = []


def collect_logs():
    p = compose("logs", "--no-color", "--timestamps", timeout=60)
    LOGS.append(p.stdout + p.stderr)


def doc_block(doc: Path, key: str = "") -> str:
    """The ```sh block after the first `<!-- e2e: ... -->` marker of doc that contains key."""
    m = re.search(r"<!-- e2e:[^>]*?" + re.escape(key) + r"[^>]*?-->\n```sh\n(.*?)```", doc.read_text(), re.S)
    assert m, f"{doc}: no ```sh block after an `<!-- e2e:` marker naming {key!r}"
    return m[1]


def doc_env(home: Path) -> dict[str, str]:
    """The environment a documented command runs in: this suite's project and files; the user's own
    Docker configuration and Rust toolchain (scripts/make-secrets runs cargo), not the throwaway $HOME's."""
    return dict(COMPOSE_ENV, HOME=str(home), COMPOSE_PROJECT_NAME=PROJECT, COMPOSE_FILE=os.pathsep.join(map(str, FILES)),
                **{v: os.environ.get(v, str(Path.home() / d)) for v, d in
                   (("DOCKER_CONFIG", ".docker"), ("CARGO_HOME", ".cargo"), ("RUSTUP_HOME", ".rustup"))})


def run_recipe(home: Path, key: str, doc: Path = README, then: str = "", cwd: Path = ROOT):
    """doc's block (doc_block), verbatim, in bash -e with HOME=home, then `then`; the stack it acts
    on is this suite's (COMPOSE_PROJECT_NAME, COMPOSE_FILE)."""
    block = doc_block(doc, key)
    info(f"running {doc.relative_to(ROOT)}'s {key or 'recipe'} block as written (HOME={home}, in {cwd}):\n"
         + "".join(f"  $ {line}\n" for line in block.strip().splitlines()))
    p = run(["bash", "-euo", "pipefail", "-c", block + then], HEALTHY_TIMEOUT_S + 60, env=doc_env(home), cwd=cwd)
    if p.returncode != 0:
        info(f"  → rc {p.returncode}: {last_lines(p.stderr or p.stdout)}")
    return p


def cleanup():
    p = compose("--profile", "monitoring", "down", "-v", "--remove-orphans", "--timeout", "15", timeout=180)
    if p.returncode != 0:
        info(f"cleanup failed: {last_lines(p.stderr)}")


def use_images():
    """The official redis, postgres, prometheus and the Dockerfile's Rust builder when the engine has or
    can pull them, else the stand-ins. desafio3-web:latest is built by the first run."""
    t0, cfg = time.time(), compose_config()
    images = [cfg["services"][n]["image"] for n in ("cache", "db", "prometheus")]
    images.append(re.search(r"^ARG RUST_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.M)[1])
    missing = next((image for image in images if not have_image(image)), None)
    if missing is None:
        return info(f"the official images {', '.join(images)}")
    FILES.append(HERE / "compose.test.yml")
    # the daemon's own words name the registry host: keep them out of the log
    info(f"the stand-ins desafio3-test/redis, /postgres, /prometheus and /rust (builder): `docker pull {missing}` failed")
    p = run([HERE / "images.sh"], 3600)
    info("\n".join(line for line in p.stderr.splitlines() if line.startswith("images:")))
    assert p.returncode == 0, f"images could not be built: {last_lines(p.stderr, 8)}"
    info(f"stand-ins ready in {time.time() - t0:.1f} s")


# ------------------------------------------------------------------------------------------
# fixtures: the engine, the first run, the stack

@pytest.fixture(autouse=True)
def stack_usable(request):  # (the class fixtures below, set up before it, call usable() themselves)
    if request.node.name != "test_no_count_repeated":
        usable()


@pytest.fixture(scope="session")
def home(tmp_path_factory):  # the recipes' $HOME (tests/e2e/run: pytest removes it at the end)
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def engine(request):
    """This project's containers only (docker-compose.yml fixes container_name: one stack at a time),
    a stack left by an interrupted run removed, the images; at the end, the stack removed."""
    p = ok(run(["docker", "ps", "-a", "--format", '{{.Names}}\t{{.Label "com.docker.compose.project"}}'], 30))
    others = [f"{n} (project {proj or '-'})" for n, _, proj in (l.partition("\t") for l in p.stdout.splitlines())
              if n in NAMES + MONITORING and proj != PROJECT]
    assert not others, "remove the containers outside the e2e project first"
    cleanup()
    try:
        use_images()
        yield
    finally:
        if request.session.testsfailed:
            info("last log lines (failure context):\n" + compose("logs", "--no-color", "--tail", "15", timeout=60).stdout[-6000:])
        cleanup()


def secrets_files(home: Path) -> dict[str, str]:
    """The one-shot's files by volume ("db/db_password", ...), read by a container of db's image (web's
    has no cat), and "documented": the output of secrets/README.md's commands that read passwords."""
    vols = [a for c in ("db", "cache", "web") for a in ("-v", f"{PROJECT}_secrets-{c}:/v/{c}:ro")]
    p = ok(run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "grep", *vols,
                inspect("db")["db"]["Config"]["Image"], "-r", "", "/v"], 60))
    files: dict[str, str] = {"documented": ok(run_recipe(home, "test_first_run", ROOT / "secrets/README.md")).stdout}
    for path, _, line in (line.partition(":") for line in p.stdout.splitlines()):
        files[path.removeprefix("/v/")] = files.get(path.removeprefix("/v/"), "") + line + "\n"
    return files


@pytest.fixture(scope="session")
def first_run(engine, home):
    """README's first command as written, in the foreground as a newcomer runs it, its passwords read;
    Ctrl-C; a second `up` (passwords kept); its volumes then removed: the password recipe needs fresh ones."""
    command = doc_block(README, "test_first_run").strip().splitlines()[0]
    info(f"running README.md's first command as written: $ {command}")
    # as on a fresh machine: no web image yet, which the one-shot `secrets` runs too (built, not pulled)
    run(["docker", "rmi", "-f", "desafio3-web:latest"], 60)
    t0 = time.time()
    proc = servers.spawn(["bash", "-c", command], home / "first-run.log", cwd=ROOT, env=doc_env(home))
    try:
        wait_for(lambda: proc.poll() is not None or all(health(n) == "healthy" for n in NAMES), FIRST_RUN_TIMEOUT_S, 1)
        res = SimpleNamespace(command=command, dt=time.time() - t0, up=proc.poll() is None, page=get(),
                              image=inspect("web").get("web", {}).get("Image", ""))
        res.secrets = secrets_files(home) if res.up else {}
        res.whoami = run(["docker", "exec", "cache", "sh", "-c", "redis-cli --user admin --askpass ACL WHOAMI "
                          "< /run/secrets/redis_admin_password"], 30).stdout.strip()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: compose stops the containers, then exits
            wait_for(lambda: proc.poll() is not None, 60, 0.5)
    res.rc, res.output = proc.returncode, last_lines(proc.log_path.read_text(), 8)
    res.running = [n for n, d in inspect(*NAMES).items() if d["State"]["Running"]]
    again = compose("up", "-d", "--no-build", "--pull", "never", timeout=HEALTHY_TIMEOUT_S + 60)
    res.kept = secrets_files(home) if again.returncode == 0 and wait_healthy() else {"up": last_lines(again.stderr)}
    ok(compose("down", "-v", timeout=120))
    LEDGER.append({"values": [], "nocount": 0})
    return res


@pytest.fixture(scope="session")
def stack(engine, home):
    """The stack as secrets/README.md's bring-your-own recipe starts it; returns its passwords by file."""
    recipe = []
    then = 'echo "recipe-dir=$DESAFIO3_SECRETS"\n'
    dt = stack_up(lambda: recipe.append(run_recipe(home, "TestUp", ROOT / "secrets/README.md", then)) or recipe[0])
    secrets_dir = Path(re.search(r"^recipe-dir=(.+)$", recipe[0].stdout, re.M)[1])
    COMPOSE_ENV["DESAFIO3_SECRETS"] = str(secrets_dir)  # for the suite's later `up`s
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in sorted(secrets_dir.iterdir())}
    info(f"the recipe's `docker compose up -d` → web, cache and db all healthy in {dt:.1f} s (fresh volumes, "
         f"first db init); secrets {modes} in a {oct(secrets_dir.stat().st_mode & 0o777)} directory")
    return {n: (secrets_dir / n).read_text().strip()
            for n in ("db_password", "web_db_password", "redis_password", "redis_admin_password")}


class TestFirstRun:
    """README's `docker compose up --build`: the Dockerfile builds, the page counts from 1, Ctrl-C stops."""

    def test_first_run(self, first_run):
        r = first_run.page
        builder = "the stand-in builder" if len(FILES) > 1 else "rust:1-alpine"
        info(f"`{first_run.command}` built the Dockerfile on {builder}; first page after {first_run.dt:.0f} s: {r.short()}; "
             f"web ran image {first_run.image[:19]} (desafio3-web:latest, just built)")
        if not first_run.up:
            BROKEN.append(f"README's first command did not bring the stack up (rc {first_run.rc}): {first_run.output}")
        assert first_run.up, BROKEN[-1]
        assert (r.status, r.state, r.count) == (200, "ok", 1), r.short()

    def test_ctrl_c_stops(self, first_run):
        assert first_run.rc is not None, "compose still runs after Ctrl-C"
        assert first_run.running == [], "still running after Ctrl-C"

    def test_passwords_generated_and_kept(self, first_run):
        """No secrets directory: the one-shot wrote fresh passwords into the volumes, nowhere in git,
        the ACL hashing them, secrets/README.md's commands reading them; a second `up` kept them."""
        files = first_run.secrets
        pw = {f: v.strip() for f, v in files.items() if f.endswith("password")}
        assert sorted(pw) == ["cache/redis_admin_password", "db/db_password", "db/web_db_password",
                              "web/redis_password", "web/web_db_password"], sorted(files)
        assert all(re.fullmatch(r"[0-9a-f]{64}", v) for v in pw.values()) and len(set(pw.values())) == 4
        assert pw["db/web_db_password"] == pw["web/web_db_password"]
        assert files["documented"].split() == [pw["db/db_password"], pw["cache/redis_admin_password"]]
        for user, f in (("web", "web/redis_password"), ("admin", "cache/redis_admin_password")):
            assert f"\nuser {user} on #{hashlib.sha256(pw[f].encode()).hexdigest()} " in files["cache/redis_users.acl"]
        assert first_run.whoami.endswith("admin"), first_run.whoami
        assert run(["git", "grep", "-qF", *(a for v in pw.values() for a in ("-e", v)), "HEAD"], 60).returncode == 1
        history = ok(run(["git", "log", "--all", "-p", "--", "secrets"], 60)).stdout
        assert not [f for f, v in pw.items() if v in history], "a password from git's history"
        assert first_run.kept == files, "a second `up` changed the passwords"


class TestUp:
    """The stack from the bring-your-own recipe: its passwords, db's clock, the seed's checks."""

    def test_up(self, stack, home):  # the passwords brought won over the fresh volumes' own
        vols = {f: v.strip() for f, v in secrets_files(home).items()}
        volume = {"db_password": "db", "web_db_password": "web", "redis_password": "web", "redis_admin_password": "cache"}
        assert all(stack.values()) and stack == {n: vols[f"{v}/{n}"] for n, v in volume.items()}

    def test_db_clock(self, stack):
        """hora_db is db's clock, in UTC when DB_TIMEZONE is unset (the compose file's default); the
        page's format, keys and 1-2-3: tests/integration/api.rs."""
        r = get()
        hora = str(r.page.get("hora_db"))
        assert r.state == "ok", r.short()
        skew = abs(datetime.strptime(hora[:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp() - r.t_send)
        assert skew <= 120, f"hora_db {hora} is {skew:.0f} s from now (UTC)"

    @pytest.mark.parametrize("cmd,output", [  # output: a regular expression the whole (stripped) output matches
        (["cache", "redis-cli", "ping"], "PONG"),
        (["db", "psql", "-U", "admin", "-d", "desafio3", "-c", "SELECT NOW();"], r"(?s).*\(1 row\)")],
        ids=["redis_cli_ping", "psql_select_now"])
    def test_seed(self, stack, cmd, output):
        assert re.fullmatch(output, ok(run(["docker", "exec", *cmd], 30)).stdout.strip())


class TestLeastPrivilege:
    """In the running stack: db's environment, and the counting functions reloaded by cache's healthcheck.
    The roles and users themselves (10-web-role.sh, the ACL file) are checked on real servers, no Docker
    needed: tests/integration/db_role.rs and redis_users.rs."""

    def test_db_server_environment(self, stack):
        """secrets/README.md on db's environment: the official entrypoint exports POSTGRES_PASSWORD (read
        from POSTGRES_PASSWORD_FILE) and the server, PID 1, keeps it; no other password is there; root in
        the container cannot read it (no CAP_SYS_PTRACE), user postgres can; web's and cache's hold none."""
        pids = {n: d["State"]["Pid"] for n, d in inspect(*NAMES).items()}
        assert set(pids) == set(NAMES)
        envs = {n: dict(e.partition("=")[::2] for e in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
                        .split("\0") if e) for n, pid in pids.items()}
        env = envs["db"]
        assert Path(f"/proc/{pids['db']}/comm").read_text().strip() == "postgres"
        assert env.get("POSTGRES_PASSWORD") == stack["db_password"], "POSTGRES_PASSWORD is not admin's password"
        assert not {"POSTGRES_PASSWORD_FILE", "PGPASSWORD"} & set(env)
        assert not {stack["web_db_password"], stack["redis_password"]} & set(env.values()), "web's passwords in db's environment"
        as_root = run(["docker", "exec", "db", "cat", "/proc/1/environ"], 30)
        assert as_root.returncode != 0 and "Permission denied" in as_root.stderr
        assert stack["db_password"] in ok(run(["docker", "exec", "-u", "postgres", "db", "cat", "/proc/1/environ"], 30)).stdout
        assert [n for n in ("web", "cache") if set(stack.values()) & set(envs[n].values())] == []

    def test_redis_functions_reloaded(self, stack):  # lost functions: the cache healthcheck loads them again
        admin = Redis.container("cache", "admin", stack["redis_admin_password"])
        # FLUSH's own answer proves them gone: the healthcheck may load them again before a LIST
        assert admin.cmd("FUNCTION", "FLUSH") == "OK"
        assert wait_for(lambda: get().state == "ok", timeout=20), get().short()
        assert "desafio3_count" in admin.cmd("FUNCTION", "LIST")


# capabilities each container may add (its entrypoint chowns, then drops to a user), and the
# capability sets that must be empty in its running process (the server, after that drop)
HARDENING = {"web": (set(), ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")),
             "cache": ({"CHOWN", "DAC_READ_SEARCH", "SETGID", "SETUID"}, ("CapEff",)),
             "db": ({"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"}, ("CapEff",))}


class TestHardening:
    """Non-root, read-only, the image as built, no port or network more than needed, no secret shown."""

    def test_web_non_root_read_only(self, stack):
        web = inspect("web")["web"]
        pid = web["State"]["Pid"]
        assert web["Config"].get("User") == "65532:65532"
        assert set(proc_status(pid).get("Uid", [])) == {"65532"}  # real, effective, saved, fs
        assert web["HostConfig"].get("ReadonlyRootfs") is True
        root = [f[5] for f in map(str.split, Path(f"/proc/{pid}/mountinfo").read_text().splitlines()) if f[4] == "/"]
        assert root and root[-1].split(",")[0] == "ro", f"/ mounted {root}"
        with pytest.raises(OSError):  # a write into the container's / is refused
            Path(f"/proc/{pid}/root/.e2e-write-probe").write_text("x")

    def test_image_facts(self, stack, tmp_path):
        """The image as built: nix/check-image.py (what `nix flake check` runs on the Nix image) holds
        `docker save` of it to nix/image-facts.json: exactly its files (so no shell) and config."""
        image = inspect("web")["web"]["Config"]["Image"]
        ok(run(["docker", "image", "save", "-o", tmp_path / "web.tar", image], 120))
        ok(run([sys.executable, ROOT / "nix/check-image.py", ROOT / "nix/image-facts.json", tmp_path / "web.tar", "--docker-built"], 120))

    def test_ports_and_networks(self, stack):  # the admin port 9090 is not published; cache and db are internal only
        data = inspect(*NAMES)
        pubs = {n: sorted({f"{b.get('HostIp') or '*'}:{b['HostPort']}->{k}" for k, v in
                           (d["NetworkSettings"].get("Ports") or d["HostConfig"].get("PortBindings") or {}).items()
                           for b in v or []}) for n, d in data.items()}
        assert pubs["cache"] == pubs["db"] == []
        assert pubs["web"] and all(p.endswith("->5000/tcp") and ":8080->" in p for p in pubs["web"]), pubs["web"]
        assert run(["docker", "network", "inspect", "-f", "{{.Internal}}", BACKEND], 30).stdout.strip() == "true"
        assert [sorted(data[n]["NetworkSettings"]["Networks"]) for n in ("cache", "db")] == [[BACKEND]] * 2

    def test_secret_not_in_inspect(self, stack):  # only *_PASSWORD_FILE paths and an --aclfile under /run/secrets
        data = inspect(*NAMES)
        assert [n for n, d in data.items() for v in stack.values() if v in json.dumps(d)] == [], "a password in docker inspect"
        assert [e.split("=")[0] for d in data.values() for e in d["Config"].get("Env") or []
                if re.match(r"[A-Z_]*PASSWORD=", e)] == []

    @pytest.mark.parametrize("name", HARDENING)
    def test_container_hardening(self, stack, name):  # and its logs rotated
        caps, empty = HARDENING[name]
        d = inspect(name)[name]
        hc, status = d["HostConfig"], proc_status(d["State"]["Pid"])
        assert "ALL" in (hc.get("CapDrop") or [])
        assert {c.removeprefix("CAP_") for c in hc.get("CapAdd") or []} == caps
        assert "no-new-privileges:true" in (hc.get("SecurityOpt") or []) and status["NoNewPrivs"] == ["1"]
        assert {k: status[k][0] for k in empty} == {k: "0" * 16 for k in empty}
        assert (hc.get("Memory") or 0) > 0 and (name != "web" or (hc.get("NanoCpus") or 0) > 0), "no memory (or CPU) limit"
        logs = hc.get("LogConfig") or {}
        assert logs.get("Type") == "json-file" and (logs.get("Config") or {}).keys() >= {"max-size", "max-file"}, logs


# ------------------------------------------------------------------------------------------
# stop; faults under load; persistence

def test_stop_web(stack):  # in < 3 s, exit code 0; PostgreSQL's counter then ≥ the last count answered
    last = [get() for _ in range(3)][-1].count
    t0 = time.monotonic()
    try:
        ok(compose("stop", "web", timeout=60))
        dt, state = time.monotonic() - t0, inspect("web")["web"]["State"]
        assert dt < 3 and state["ExitCode"] == 0 and not state["Running"], state
        assert_recorded(last)
    finally:
        stack_up()  # web started again


# "kill -s KILL <container>" is done as a crash: SIGKILL to the container's PID 1 from the host.
# (`docker kill` would mark the container as stopped by hand, and the engine's restart policy
# then leaves it down; a crash is what the restart policy is for.) cache, restarted by hand or by
# its policy, must start again from its append-only file (Redis logs "DB loaded from append only file").
FAULTS = [("restart cache", "restart", "cache"), ("kill -s KILL cache", "kill", "cache"), ("restart db", "restart", "db"),
          ("kill -s KILL web", "kill", "web"), ("disconnect cache", "disconnect", "cache")]


def fault(how: str, target: str):
    """Does one fault; returns (CompletedProcess, label)."""
    if how == "disconnect":  # docker network disconnect, 4 s, connect
        p = run(["docker", "network", "disconnect", BACKEND, "cache"], 60)
        time.sleep(4.0)
        p2 = run(["docker", "network", "connect", "--alias", "cache", BACKEND, "cache"], 60)
        p.returncode, p.stderr = p.returncode or p2.returncode, p.stderr + p2.stderr
        return p, "cache cut from the backend network for 4 s"
    if how == "kill":
        pid = str(inspect(target)[target]["State"]["Pid"])
        p = run(([] if os.geteuid() == 0 else ["sudo", "-n"]) + ["kill", "-s", "KILL", pid], 30)
        return p, f"kill -s KILL {pid} ({target}'s PID 1 on the host: a crash)"
    return run(["docker", "restart", target], 120), f"docker restart {target}"


def acceptable(r: Resp, target: str) -> bool:
    """An answer a fault of target may give: ok or degraded; while db is down also 503 "error"
    naming db (no count rather than one PostgreSQL has not confirmed)."""
    return (r.status == 200 and r.state in ("ok", "degraded")) or (
        target == "db" and r.status == 503 and r.state == "error" and "db" in (r.page.get("erros") or {}))


def wait_recovered(load: Load, since: float) -> float | None:
    """First send time of an ok streak lasting 2 s (after `since`), or None."""
    def streak():
        recs, start = [r for r in list(load.records) if r.t_send >= since], None
        for r in recs:
            start = (start or r.t_send) if r.status == 200 and r.state == "ok" else None
        return start if start is not None and recs[-1].t_send - start >= 2.0 else None
    return wait_for(streak, RECOVERY_TIMEOUT_S, 0.5)


@pytest.fixture(scope="class")
def load(stack):
    usable()
    info(f"fault phase starts at visitas_cache={get().count}; load: 3 loopback workers, 50 ms pause, 5 s client timeout")
    load = Load()
    time.sleep(2)
    yield load
    load.stop()


@pytest.fixture(scope="class")
def final(load):
    load.stop()
    res = SimpleNamespace(healthy=wait_healthy(RECOVERY_TIMEOUT_S), health={n: health(n) for n in NAMES}, page=get(),
                          values=LEDGER[-1]["values"], nocount=LEDGER[-1]["nocount"], threads=len(load.threads))
    info(f"load: {len(load.records)} requests; since the volumes were created: {len(res.values)} answers carried "
         f"a count, {res.nocount} requests got none (no number, an error answer, no answer)")
    return res


class TestFaults:
    """Faults under a bounded loopback load: answers within the timeout (degraded, or while db is
    down a 503 naming it), recovery by itself, and afterwards every count accounted for."""

    @pytest.mark.parametrize("how,target", [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
    def test_fault(self, load, how, target):
        restarts_before, w_start = inspect(target)[target]["RestartCount"], time.time()
        p, label = fault(how, target)
        fault_end = time.time()
        ok(p)
        rec_at = wait_recovered(load, fault_end)  # 2 s of nothing but ok answers sent after the fault ended
        try:
            recs = [r for r in list(load.records) if r.t_recv >= w_start and r.t_send <= (rec_at or time.time())]
            answered = [r for r in recs if r.status is not None]
            degraded = [r for r in answered if r.state == "degraded"]
            bad = [r for r in answered if not acceptable(r, target)]
            errors = [r for r in recs if r.status is None]
            slow = [round(r.latency, 2) for r in answered if r.latency > ANSWER_LIMIT_S]
            restarted = inspect(target)[target]["RestartCount"] > restarts_before
            logs = run(["docker", "logs", "--since", f"{w_start:.3f}", "cache"], 30)
            aof = "DB loaded from append only file" in logs.stdout + logs.stderr
            info(f"{label}: {len(recs)} requests: {len(degraded)} degraded, {sum(r.count is None for r in answered)} "
                 f"answers without a count, {len(bad)} other, {len(errors)} transport errors; slowest "
                 f"{max((r.latency for r in answered), default=0.0) * 1000:.0f} ms; "
                 + (f"recovered after {rec_at - fault_end:.1f} s" if rec_at else "NOT recovered")
                 + (f"; restarted by its policy: {restarted}" if how == "kill" else "")
                 + (f"; started again from its AOF: {aof}" if target == "cache" and how != "disconnect" else "")
                 + "".join(f"\ne.g. {r.short()[:200]}" for r in (errors + bad)[:3])
                 + (f"\ndegraded answer e.g. {degraded[0].body[:220]}" if degraded else ""))
            assert rec_at is not None, "not recovered"
            assert not slow, f"answers slower than {ANSWER_LIMIT_S:.1f} s"
            assert restarted or how != "kill", "not restarted by its policy"
            assert aof or target != "cache" or how == "disconnect", "cache did not start again from its append-only file"
            if target != "web":
                assert not errors and not bad, "transport errors or answers other than ok/degraded"
                assert degraded or how != "disconnect", "no degraded answer while cache was cut off"
        finally:
            if rec_at is None:  # do not let one fault spoil the next ones: bring the stack back by hand
                compose("up", "-d", "--no-build", "--pull", "never", timeout=180)
                info(f"restored by hand (docker compose up -d): {'all healthy' if wait_healthy(90) else 'NOT healthy'}")
            time.sleep(1)

    def test_all_healthy_again(self, final):
        assert final.healthy, final.health

    def test_every_count_accounted_for(self, final):
        """No visit lost: the final count ≥ the highest count handed out and their number; over-counting
        bounded: final − distinct counts handed out ≤ the requests that got no count + those in flight at
        each fault (confirmed ahead, then not counted); PostgreSQL's counter ≥ the highest count."""
        assert final.page.count is not None, final.page.short()
        assert final.page.count >= max(final.values) and final.page.count >= len(final.values)
        assert 0 <= final.page.count - len(set(final.values)) <= final.nocount + final.threads * len(FAULTS)
        assert_recorded(max(final.values))


class TestPersistence:
    """The count survives `down`/`up`, resets after `down -v`; README's upgrade recipe keeps it."""

    def test_count_continues(self, stack):  # volumes kept by `down`
        before = get().count
        collect_logs()
        ok(compose("down", timeout=120))
        info(f"warm start: docker compose up → all healthy in {stack_up():.1f} s (existing volumes)")
        r = get()
        assert before is not None and r.count == before + 1, f"before down {before}; after up {r.short()}"

    def test_reset(self, stack):
        collect_logs()
        ok(compose("down", "-v", timeout=120))
        LEDGER.append({"values": [], "nocount": 0})
        stack_up()
        assert get().count == 1

    def test_upgrade_recipe(self, stack, home):
        """README's "Upgrading an existing volume", as written, on a database laid out as before the
        role web existed (the counter in public, owned by admin, no role web, PostgreSQL's default
        privileges: every role may connect to postgres and template1 and make temporary tables)."""
        before = get().count
        ok(compose("stop", "web", timeout=60))
        DB.value("ALTER TABLE web.visit_counter SET SCHEMA public; ALTER TABLE public.visit_counter OWNER TO admin; "
                 "DROP SCHEMA web; DROP ROLE web; GRANT CONNECT ON DATABASE postgres, template1 TO PUBLIC; "
                 "GRANT TEMPORARY ON DATABASE desafio3 TO PUBLIC; SELECT 1;")
        ok(run(["docker", "exec", "db", "bash", "-c", 'sed -i "/ reject$/d" "$(psql -U admin -d desafio3 -XtAc "SHOW hba_file")"'], 30))
        first_rule = "SELECT array_to_string(user_name, ',') || ' ' || auth_method FROM pg_hba_file_rules ORDER BY line_number LIMIT 1;"
        assert DB.value(first_rule) != "admin reject"
        ok(run_recipe(home, "test_upgrade_recipe"))
        assert DB.value(first_rule) == "admin reject", "admin still allowed over TCP after the upgrade"

        assert wait_healthy(RECOVERY_TIMEOUT_S)
        r = get()
        assert r.state == "ok" and before is not None and r.count == before + 1, f"before {before}, after {r.short()}"
        assert DB.value("SELECT schemaname || '.' || tablename || ' owned by ' || tableowner FROM pg_tables "
                        "WHERE tablename = 'visit_counter';") == "web.visit_counter owned by web"
        # role web's connection limit, CONNECT on postgres and template1, TEMPORARY
        assert DB.value("SELECT concat_ws(',', rolconnlimit, has_database_privilege('web', 'postgres', 'CONNECT'), "
                        "has_database_privilege('web', 'template1', 'CONNECT'), "
                        "has_database_privilege('web', 'desafio3', 'TEMPORARY')) FROM pg_roles WHERE rolname = 'web'") == "64,f,f,f"


class TestReadmeBlocks:
    """README's other command blocks, each run as written."""

    def test_readiness_and_metrics(self, stack, home):
        p = ok(run_recipe(home, "test_readiness_and_metrics"))
        assert 'http_requests_total{method="GET",route="/",status="200"}' in p.stdout

    def test_settings(self, stack, home):  # the block writes .env next to docker-compose.yml, as a user does
        try:
            ok(run_recipe(home, "test_settings"))
            env = dict(v.split("=", 1) for v in inspect("web")["web"]["Config"]["Env"])
            assert (env.get("DB_TIMEZONE"), env.get("RUST_LOG")) == ("Europe/Lisbon", "warn")  # the shell's, .env's
            assert wait_ok().state == "ok"
        finally:
            (ROOT / ".env").unlink(missing_ok=True)
            stack_up()

    def test_poisoned_counter(self, stack, home):
        top = get().count or 0
        assert Redis.container("cache", "web", stack["redis_password"]).cmd("SET", "visitas", "12ab") == "OK"
        poisoned = [get().page.get("erros", {}).get("cache") for _ in range(3)]
        assert "invalid counter value" in poisoned
        ok(run_recipe(home, "test_poisoned_counter"))
        r = wait_ok()
        assert r.state == "ok" and (r.count or 0) > top, r.short()

    def test_backup_and_restore(self, stack, home):  # each count once: test_no_count_repeated
        ok(run_recipe(home, "test_backup_and_restore, backup", cwd=home))
        info(f"backup.sql: {(home / 'backup.sql').stat().st_size} bytes; then counts {[get().count for _ in range(5)]}")
        ok(run_recipe(home, "test_backup_and_restore, restore", cwd=home))
        n = int(re.search(r"^N=(\d+)", doc_block(README, "test_backup_and_restore, restore"), re.M)[1])
        r = wait_ok()
        assert r.state == "ok" and (r.count or 0) > n, r.short()


# ------------------------------------------------------------------------------------------
# README's monitoring profile

def prom_api(path: str, **params) -> dict:
    """Prometheus's HTTP API on its published port; {"error": ...} when it does not answer (yet)."""
    status, body = http_get(f"{PROMETHEUS}/api/v1/{path}?{urllib.parse.urlencode(params)}", 10)
    with contextlib.suppress(ValueError):
        return json.loads(body) if status else {"error": body}
    return {"error": f"HTTP {status}: {body[:200]}"}


def dependency_alerts(dependency: str) -> list[str]:
    return [a["state"] for a in prom_api("alerts").get("data", {}).get("alerts", [])
            if a["labels"].get("alertname") == "WebDependencyDown" and a["labels"].get("dependency") == dependency]


@pytest.fixture(scope="class")
def monitoring(stack, home):
    usable()
    block = doc_block(README, "test_monitoring_up").strip()
    grafana = compose_config()["services"]["grafana"]["image"]
    if have_image(grafana):
        p = run_recipe(home, "test_monitoring_up")
    else:
        info(f"`docker compose --profile monitoring up -d prometheus` (README's `{block}` starts Grafana too, but "
             f"{grafana} cannot be pulled here and has no stand-in: Grafana NOT run)")
        p = compose("--profile", "monitoring", "up", "-d", "--no-build", "--pull", "never", "prometheus", timeout=180)
    yield p
    compose("--profile", "monitoring", "rm", "-s", "-f", *MONITORING, timeout=120)


class TestMonitoring:
    """Prometheus scrapes web, loads the rules, answers web's and the dashboard's queries; stopping cache
    makes the dependency alert pending or firing, then it resolves. Without Grafana's image (no stand-in)
    only Prometheus is started: README's block is then not run as written."""

    def test_monitoring_up(self, monitoring):  # its ports on 127.0.0.1, off the backend network: ci/check-compose
        ok(monitoring)
        assert inspect("prometheus")["prometheus"]["State"]["Running"]

    def test_scrapes_web(self, monitoring):
        up = wait_for(lambda: [t for t in prom_api("targets").get("data", {}).get("activeTargets", [])
                               if t["labels"].get("job") == "web" and t["health"] == "up"], 60, 1)
        assert up, f"target job=web not up: {prom_api('targets')}"[:300]

    def test_rules_loaded(self, monitoring):  # every rule evaluated without error
        def rules():
            rs = [r for g in prom_api("rules").get("data", {}).get("groups", []) for r in g["rules"]]
            return rs if rs and all(r.get("health") == "ok" for r in rs) else None
        assert len(wait_for(rules, 60, 1) or []) >= 14, json.dumps(prom_api("rules"))[:300]

    def test_query(self, monitoring):  # a recording rule and a raw query return web's data
        for _ in range(5):
            get()
        res = wait_for(lambda: [r for r in prom_api("query", query='job:web_page_requests:rate5m{job="web"}')
                                .get("data", {}).get("result", []) if float(r["value"][1]) > 0], 90, 1)
        assert res, "job:web_page_requests:rate5m: no data"
        assert prom_api("query", query='sum(http_requests_total{job="web",route="/"})').get("data", {}).get("result")

    def test_dashboard_queries(self, monitoring):
        dashboard = json.loads((ROOT / "deploy/monitoring/grafana/dashboards/web.json").read_text())
        queries = [t["expr"].replace("$__rate_interval", "1m") for panel in dashboard["panels"] for t in panel["targets"]]
        answers = [prom_api("query", query=q) for q in queries]
        info(f"{len(queries)} dashboard queries, {sum(bool(a.get('data', {}).get('result')) for a in answers)} with data now")
        assert [(q, a.get("error")) for q, a in zip(queries, answers) if a.get("status") != "success"] == []

    def test_dependency_alert(self, monitoring):
        t0 = time.time()
        ok(compose("stop", "cache", timeout=60))
        for _ in range(3):
            get()
        states = wait_for(lambda: dependency_alerts("cache"), 60, 1)
        info(f"docker compose stop cache → WebDependencyDown{{dependency=\"cache\"}} {states} after {time.time() - t0:.0f} s")
        ok(compose("start", "cache", timeout=60))
        assert wait_healthy(RECOVERY_TIMEOUT_S) and wait_ok().state == "ok"
        assert states and set(states) <= {"pending", "firing"}
        assert wait_for(lambda: not dependency_alerts("cache"), 60, 1), "the alert did not go away"


class TestWholeRun:

    def test_secret_not_in_logs(self, stack):
        collect_logs()
        text = "\n".join(LOGS)
        assert text.count("\n") > 0 and not any(v in text for v in stack.values())

    def test_no_count_repeated(self):
        """No count handed out twice in the whole run (each volume lifetime counts from 1 again)."""
        assert any(l["values"] for l in LEDGER), "no count handed out in this run"
        assert [sorted(v for v, n in Counter(l["values"]).items() if n > 1) for l in LEDGER] == [[]] * len(LEDGER)
