"""Holds the rendered Kubernetes manifests (K8S_RENDERED_DIR/{base,dev,managed}.yaml, made by
ci/check-kubernetes) and the committed deploy/kubernetes/ (K8S_SOURCE_DIR) to what
deploy/kubernetes/README.md promises ("Offline checks", item 3). Left to them: what Kubernetes
does anyway (Secret volumes are read-only) and the schemas (`kubernetes-validate --strict`, API
versions included). pytest plus PyYAML."""

import base64
import hashlib
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import yaml

RENDERED = Path(os.environ.get("K8S_RENDERED_DIR", "."))
SOURCE = Path(os.environ.get("K8S_SOURCE_DIR", Path(__file__).resolve().parent.parent))

# The service's variables the manifests set (README); the connection limits keep their defaults.
CONTRACT_ENV = {"PORT", "ADMIN_PORT", "REDIS_URL", "REDIS_PASSWORD_FILE", "DATABASE_URL",
                "DATABASE_PASSWORD_FILE", "DB_TIMEZONE", "DEPENDENCY_TIMEOUT_MS", "RUST_LOG"}
# git-ignored secret material: what scripts/make-secrets writes into an overlay's secrets/, and
# files copied from the committed <file>.example beside them
MADE_SECRETS = [f"overlays/{o}/secrets/{f}" for o in ("dev", "managed")
                for f in ("db_password", "web_db_password", "redis_password", "redis_users.acl")]
EXAMPLES = ["overlays/managed/dependencies.env"]
PLACEHOLDER = re.compile(r"change[-_]?me", re.IGNORECASE)
# NetworkPolicy peers as flows() spells them
DNS = {("ns kubernetes.io/metadata.name=kube-system pod k8s-app=kube-dns", 53, proto) for proto in ("UDP", "TCP")}
MONITORING = "ns kubernetes.io/metadata.name=monitoring pod *"
# dev's cache and db: image (the compose file's, pinned by digest), Service port, data mount (a
# PersistentVolumeClaim), the compose file's probe
COMPOSE = yaml.safe_load((Path(__file__).resolve().parents[3] / "docker-compose.yml").read_text())["services"]
STATEFULSETS = {
    "cache": (COMPOSE["cache"]["image"], 6379, "/data", COMPOSE["cache"]["healthcheck"]["test"][1:]),
    "db": (COMPOSE["db"]["image"], 5432, "/var/lib/postgresql/data", ["pg_isready", "-U", "admin", "-d", "desafio3"]),
}


def load(name):
    return [d for d in yaml.safe_load_all((RENDERED / f"{name}.yaml").read_text(encoding="utf-8")) if d]


def find(objs, kind, name=None):
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs, kind, name):
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def matches(selector, labels):
    ml = selector.get("matchLabels")
    return bool(ml) and all(labels.get(k) == v for k, v in ml.items())


def container(workload):
    cs = workload["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1, f"{workload['metadata']['name']}: expected one container"
    return cs[0]


def effective_security(workload, c):
    """Container securityContext over the pod's (the container's fields win)."""
    return {**workload["spec"]["template"]["spec"].get("securityContext", {}), **c.get("securityContext", {})}


def port_number(c, port):
    names = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    return port if isinstance(port, int) else names[port]


def secret_files(objs, workload):
    """{file path in the container: (key, text)} for every Secret key its mounts show, from
    `secret` volumes and the Secret sources of `projected` ones."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    files = {}
    for m in container(workload).get("volumeMounts", []):
        vol = volumes.get(m["name"], {})  # none: a volumeClaimTemplate
        sources = [vol["secret"]] if "secret" in vol else [
            src["secret"] for src in vol.get("projected", {}).get("sources", []) if "secret" in src]
        for src in sources:
            data = one(objs, "Secret", src.get("secretName") or src.get("name")).get("data", {})
            for i in src.get("items") or [{"key": k, "path": k} for k in data]:
                assert i["key"] in data, f"{m['mountPath']}: the Secret has no key {i['key']}"
                files[f"{m['mountPath'].rstrip('/')}/{i['path']}"] = (i["key"], base64.b64decode(data[i["key"]]).decode())
    return files


def secret_file(objs, workload, path):
    """(key, text) of the Secret mounted at a file path inside the container, or fail."""
    files = secret_files(objs, workload)
    assert path in sorted(files), f"{path} is not a mounted Secret key"  # a failure shows paths, not passwords
    return files[path]


def flows(rules, side):
    """NetworkPolicy rules flattened to {(peer, port, protocol)}; "any" where a rule leaves one open."""
    def labels(sel):
        return ",".join(f"{k}={v}" for k, v in sorted((sel or {}).get("matchLabels", {}).items())) or "*"
    out = set()
    for rule in rules or []:
        for peer in rule.get(side) or [None]:
            if peer is None:
                who = "any"
            elif "ipBlock" in peer:
                who = "ip " + peer["ipBlock"]["cidr"]
            elif "namespaceSelector" in peer:
                who = f"ns {labels(peer['namespaceSelector'])} pod {labels(peer.get('podSelector'))}"
            else:
                who = labels(peer["podSelector"])
            out |= {(who, p.get("port", "any"), p.get("protocol", "TCP")) for p in rule.get("ports") or [{}]}
    return out


def web_env(objs, dep):
    """The environment web sees from envFrom (later sources win), as name -> (kind, value)."""
    env = {}
    for src in container(dep).get("envFrom", []):
        if "configMapRef" in src:
            cm = one(objs, "ConfigMap", src["configMapRef"]["name"])
            env.update({k: ("ConfigMap", v) for k, v in cm.get("data", {}).items()})
        if "secretRef" in src:
            s = one(objs, "Secret", src["secretRef"]["name"])
            env.update({k: ("Secret", base64.b64decode(v).decode()) for k, v in s.get("data", {}).items()})
    for e in container(dep).get("env", []):
        env[e["name"]] = ("env", e.get("value"))
    return env


def overlay(name):
    objs = load(name)
    dep = one(objs, "Deployment", "web")
    return SimpleNamespace(name=name, objs=objs, dep=dep, c=container(dep), env=web_env(objs, dep),
                           pod_labels=dep["spec"]["template"]["metadata"]["labels"])


@pytest.fixture(scope="module", params=["dev", "managed"])
def web(request):
    """The web workload, checked in each overlay."""
    return overlay(request.param)


@pytest.fixture(scope="module")
def dev():
    return overlay("dev")


def test_prometheus_rules_configmap(web):  # README.md "Monitoring": the compose profile's rules
    rules = (SOURCE.parent / "monitoring/rules/web.rules.yml").read_text()
    assert one(web.objs, "ConfigMap", "web-prometheus-rules")["data"] == {"web.rules.yml": rules}


def test_image_ports_and_env(web):  # the same two ports in the container and in its env
    assert re.search(r"(^|/)desafio3-web(:[\w.-]+)?$", web.c["image"])
    assert (port_number(web.c, "http"), port_number(web.c, "admin")) == (5000, 9090)
    assert set(web.env) == CONTRACT_ENV, "env names must be exactly the service's contract"
    assert (web.env["PORT"][1], web.env["ADMIN_PORT"][1]) == ("5000", "9090")
    assert [n for n, (kind, _) in web.env.items() if kind == "env"] == [], "set inline, expected from ConfigMap/Secret"


def test_password_is_a_mounted_secret_file(web):
    for var in ("DATABASE_URL", "REDIS_URL"):  # web's own users; each password from its file
        url = urlsplit(web.env[var][1])
        assert (url.username, url.password) == ("web", None), var
        secret_file(web.objs, web.dep, web.env[var.replace("URL", "PASSWORD_FILE")][1])
    # and no other secret: not the admin's database password, not the Redis ACL
    assert {key for key, _ in secret_files(web.objs, web.dep).values()} == {"web_db_password", "redis_password"}


def test_probes_and_scrapes_on_the_admin_port(web):  # readiness never follows the shared /readyz
    probes = [k for k in ("livenessProbe", "readinessProbe", "startupProbe") if k in web.c]
    assert probes[:2] == ["livenessProbe", "readinessProbe"]
    for kind in probes:
        assert web.c[kind]["httpGet"]["path"] == "/healthz", kind
        assert port_number(web.c, web.c[kind]["httpGet"]["port"]) == 9090, kind
    ann = web.dep["spec"]["template"]["metadata"]["annotations"]
    assert (ann["prometheus.io/port"], ann["prometheus.io/path"]) == ("9090", "/metrics")


def test_user_and_no_token(web):  # the image's user; no service account token
    sc = effective_security(web.dep, web.c)
    assert (sc.get("runAsUser"), sc.get("runAsGroup")) == (65532, 65532)
    assert not sc.get("capabilities", {}).get("add"), "restricted allows NET_BIND_SERVICE; web needs none"
    assert web.dep["spec"]["template"]["spec"].get("automountServiceAccountToken") is False


def test_service_and_selectors(web):  # the Service: the public port only, never the admin port
    service = one(web.objs, "Service", "web")["spec"]
    for p in service["ports"]:
        assert port_number(web.c, p["targetPort"]) == 5000 and p["port"] != 9090
    spread = web.dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert "kubernetes.io/hostname" in {t["topologyKey"] for t in spread}
    selectors = [("Service", {"matchLabels": service["selector"]}),
                 ("PodDisruptionBudget", one(web.objs, "PodDisruptionBudget", "web")["spec"]["selector"]),
                 ("NetworkPolicy", one(web.objs, "NetworkPolicy", "web")["spec"]["podSelector"])]
    for what, selector in selectors + [(t["topologyKey"], t["labelSelector"]) for t in spread]:
        assert matches(selector, web.pod_labels), what


def test_network_policies(web):  # the default-deny (one policy, every pod, no rule), then web's
    deny = [np for np in find(web.objs, "NetworkPolicy") if np["spec"]["podSelector"] == {}]
    assert len(deny) == 1, "one NetworkPolicy selecting every pod"
    assert not (deny[0]["spec"].get("ingress") or deny[0]["spec"].get("egress"))
    np = one(web.objs, "NetworkPolicy", "web")
    for policy in (deny[0], np):
        assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"], policy["metadata"]["name"]
    assert flows(np["spec"]["ingress"], "from") == {("any", 5000, "TCP"), (MONITORING, 9090, "TCP")}
    egress = flows(np["spec"]["egress"], "to")
    assert DNS <= egress
    if web.name == "dev":  # cache and db in the cluster
        assert egress - DNS == {(f"app.kubernetes.io/name={n}", p, "TCP") for n, p in (("cache", 6379), ("db", 5432))}
    else:  # the managed services' addresses, not pods, not anywhere
        assert {port for _, port, _ in egress - DNS} == {6379, 5432}
        for who, _, _ in egress - DNS:
            assert re.match(r"^ip (?!0\.0\.0\.0/0$)", who), "egress to pods, or to anywhere"


def test_replicas_budget_and_autoscaling(web):
    replicas, pdb = web.dep["spec"]["replicas"], one(web.objs, "PodDisruptionBudget", "web")["spec"]
    assert replicas >= 2
    assert 1 <= int(pdb.get("maxUnavailable", pdb.get("minAvailable"))) < replicas
    spec = one(web.objs, "HorizontalPodAutoscaler", "web")["spec"]
    assert (spec["scaleTargetRef"]["kind"], spec["scaleTargetRef"]["name"]) == ("Deployment", "web")
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]
    assert "cpu" in [m.get("resource", {}).get("name") for m in spec["metrics"]], "no CPU metric"
    assert "cpu" in web.c["resources"]["requests"], "CPU utilisation is a share of the request"


def test_namespace_enforces_restricted(web):  # so every pod meets Pod Security "restricted" at admission
    ns = one(web.objs, "Namespace", "desafio3")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert [o["metadata"]["name"] for o in web.objs if o["kind"] != "Namespace"
            and o["metadata"].get("namespace") != "desafio3"] == []


def test_every_container_meets_restricted_read_only_with_limits(web):
    """What "restricted" asks (no cluster admits these pods here: checked as it would) and what it
    does not: a read-only root, CPU and memory limits."""
    for w in find(web.objs, "Deployment") + find(web.objs, "StatefulSet"):
        pod = w["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc, who = effective_security(w, c), f"{w['metadata']['name']}/{c['name']}"
            assert sc.get("runAsNonRoot") is True and sc.get("runAsUser") != 0, who
            assert sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged"), who
            caps = sc.get("capabilities", {})
            assert "ALL" in caps.get("drop", []) and set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}, who
            assert sc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), who
            assert sc.get("readOnlyRootFilesystem") is True, who
            assert {"cpu", "memory"} <= set(c.get("resources", {}).get("limits", {})), who


def test_dependencies(web):  # dev: cache and db in the cluster; managed: web only, their addresses in a Secret
    if web.name == "dev":
        assert web.env["REDIS_URL"] == ("ConfigMap", "redis://web@cache:6379/0")
        assert web.env["DATABASE_URL"] == ("ConfigMap", "postgres://web@db:5432/desafio3")
        return
    assert find(web.objs, "StatefulSet") == []
    assert find(web.objs, "Service", "cache") + find(web.objs, "Service", "db") == []
    assert {d["metadata"]["name"] for d in find(web.objs, "Deployment")} == {"web"}
    for var, scheme in (("REDIS_URL", r"^rediss?://"), ("DATABASE_URL", r"^postgres(ql)?://")):
        assert web.env[var][0] == "Secret", var
        assert re.match(scheme, web.env[var][1])
        assert [cm for cm in find(web.objs, "ConfigMap") if var in cm.get("data", {})] == []


@pytest.mark.parametrize("name", STATEFULSETS)
def test_dev_statefulset(dev, name):
    """cache and db: headless Service, the image, the port, data on a PersistentVolumeClaim, the
    compose file's probe; a NetworkPolicy that admits only web and lets them reach nothing."""
    image, port, mount, probe = STATEFULSETS[name]
    sts, svc, np = (one(dev.objs, kind, name) for kind in ("StatefulSet", "Service", "NetworkPolicy"))
    labels, c = sts["spec"]["template"]["metadata"]["labels"], container(sts)
    assert svc["spec"].get("clusterIP") == "None", f"Service {name} must be headless"
    assert sts["spec"]["serviceName"] == name
    assert matches({"matchLabels": svc["spec"]["selector"]}, labels)
    assert [p["port"] for p in svc["spec"]["ports"]] == [port]
    assert c["image"] == image
    assert port_number(c, svc["spec"]["ports"][0]["targetPort"]) == port
    data = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == mount]
    assert data and data[0] in {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}, \
        f"{mount} is not a PersistentVolumeClaim"
    for kind in ("startupProbe", "readinessProbe"):
        assert c[kind]["exec"]["command"] == probe, kind
    # liveness asks for an answer only (cache: not its functions, which readiness loads)
    assert c["livenessProbe"]["exec"]["command"] == (["redis-cli", "ping"] if name == "cache" else probe)
    assert matches(np["spec"]["podSelector"], labels)
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert not np["spec"].get("egress"), f"{name} must reach nothing"
    assert flows(np["spec"]["ingress"], "from") == {("app.kubernetes.io/name=web", port, "TCP")}


def test_dev_cache_statefulset(dev):
    sts = one(dev.objs, "StatefulSet", "cache")
    c = container(sts)
    # compose's `command:` is the image's CMD, i.e. Kubernetes `args` (keeps the entrypoint)
    assert "command" not in c
    assert c["args"] == ["redis-server", "--appendonly", "yes", "--appendfsync", "everysec",
                         "--dir", "/data", "--aclfile", "/run/secrets/redis_acl"]
    # the passwords: admin's for the probes; web's (from the same make-secrets run) and admin's hashed
    # in the ACL file, which holds no password, nor do the arguments
    assert c["env"] == [{"name": "REDIS_ADMIN_PASSWORD_FILE", "value": "/run/secrets/redis_admin_password"}]
    key, admin = secret_file(dev.objs, sts, c["env"][0]["value"])
    assert key == "redis_admin_password"
    acl = secret_file(dev.objs, sts, "/run/secrets/redis_acl")[1]
    password = secret_file(dev.objs, dev.dep, dev.env["REDIS_PASSWORD_FILE"][1])[1].strip()
    for user, pw in (("web", password), ("admin", admin.strip())):
        assert re.search(rf"(?m)^user {user} on #{hashlib.sha256(pw.encode()).hexdigest()} ", acl), user
    assert re.search(r"(?m)^user default on nopass .*-@all \+ping$", acl)
    assert password not in acl + " ".join(c["args"]) and admin.strip() != password
    # the counting functions and their loader, the files compose mounts, where compose mounts them
    functions = next(m for m in c["volumeMounts"] if m["mountPath"] == "/usr/local/lib/desafio3")
    ref = next(v["configMap"] for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == functions["name"])
    folder = SOURCE / "base/cache/functions"
    assert one(dev.objs, "ConfigMap", ref["name"])["data"] == {f.name: f.read_text() for f in folder.iterdir()}


def test_dev_db_statefulset(dev):
    sts = one(dev.objs, "StatefulSet", "db")
    c, mount = container(sts), STATEFULSETS["db"][2]
    env = {e["name"]: e for e in c["env"]}
    assert (env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"]) == ("admin", "desafio3")
    assert "POSTGRES_PASSWORD" not in env
    pgdata = env["PGDATA"]["value"]
    assert pgdata.startswith(mount + "/") and len(pgdata) > len(mount) + 1, pgdata
    # the admin's password, and role web's for the init script (run on an empty volume's first start),
    # which is web's own, from the same make-secrets run; the admin's is another
    admin, role_web = (secret_file(dev.objs, sts, env[var]["value"])
                       for var in ("POSTGRES_PASSWORD_FILE", "WEB_DB_PASSWORD_FILE"))
    assert (admin[0], role_web[0]) == ("db_password", "web_db_password")
    web = secret_file(dev.objs, dev.dep, dev.env["DATABASE_PASSWORD_FILE"][1])[1]
    assert role_web[1] == web != admin[1]
    init = [m for m in c["volumeMounts"] if m["mountPath"] == "/docker-entrypoint-initdb.d"]
    assert len(init) == 1, "no /docker-entrypoint-initdb.d"
    ref = next(v["configMap"] for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == init[0]["name"])
    assert ref["defaultMode"] & 0o111, "not executable: the entrypoint would source it, not run it"
    script = (SOURCE / "base/db/initdb/10-web-role.sh").read_text()
    assert one(dev.objs, "ConfigMap", ref["name"])["data"] == {"10-web-role.sh": script}


# No plaintext secret values in the files that are committed (git's view of SOURCE).

def git(*args):
    return subprocess.run(["git", "-C", str(SOURCE), *args], capture_output=True, text=True)


def test_no_secret_objects_with_values_in_sources():  # nor any Secret in base
    assert find(load("base"), "Secret") == []
    for rel in git("ls-files", "*.yaml", "*.yml").stdout.split():
        for doc in yaml.safe_load_all((SOURCE / rel).read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                assert not (doc.get("data") or doc.get("stringData")), rel
            if isinstance(doc, dict) and doc.get("kind") == "Kustomization":
                for gen in doc.get("secretGenerator", []):
                    assert "literals" not in gen, f"{rel}: secret literal committed"
                    for f in gen.get("files", []) + gen.get("envs", []):
                        src = (Path(rel).parent / f.split("=", 1)[-1]).as_posix()
                        assert git("check-ignore", "-q", src).returncode == 0, f"{rel}: a Secret from committed {src}"


def test_real_secret_files_git_ignored_examples_placeholders():  # check-ignore also fails for a tracked file
    for rel in MADE_SECRETS + EXAMPLES:
        assert git("check-ignore", "-q", rel).returncode == 0, f"git does not ignore {rel} (or tracks it)"
    for rel in EXAMPLES:
        text = (SOURCE / (rel + ".example")).read_text()
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        values = [line.split("=", 1)[1] if rel.endswith(".env") else line for line in lines]
        assert values, rel
        for v in values:
            assert PLACEHOLDER.search(v), f"{rel}.example: not an obvious placeholder"
