"""Holds the rendered Kubernetes manifests (K8S_RENDERED_DIR/{base,dev,managed}.yaml, made by
ci/check-kubernetes) and the committed deploy/kubernetes/ (K8S_SOURCE_DIR) to what
deploy/kubernetes/README.md promises ("Offline checks", item 3). unittest plus PyYAML; closes
with the line `k8s: N passed, M failed`."""

import base64
import hashlib
import os
import re
import subprocess
import sys
import unittest
from pathlib import Path
from urllib.parse import urlsplit

import yaml

RENDERED = Path(os.environ.get("K8S_RENDERED_DIR", "."))
SOURCE = Path(os.environ.get("K8S_SOURCE_DIR", Path(__file__).resolve().parent.parent))

# The service's variables the manifests set (README); the connection limits keep their defaults.
CONTRACT_ENV = {"PORT", "ADMIN_PORT", "REDIS_URL", "REDIS_PASSWORD_FILE", "DATABASE_URL",
                "DATABASE_PASSWORD_FILE", "DB_TIMEZONE", "DEPENDENCY_TIMEOUT_MS", "RUST_LOG"}
WEB_UID = 65532
# the effective securityContext of every container (Pod Security "restricted", and a read-only root)
RESTRICTED = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
              "capabilities.drop": ["ALL"], "seccompProfile.type": "RuntimeDefault"}
# git-ignored secret material: what scripts/make-secrets writes into an overlay's secrets/, and
# files copied from the committed <file>.example beside them
MADE_SECRETS = [f"overlays/{o}/secrets/{f}" for o in ("dev", "managed")
                for f in ("db_password", "web_db_password", "redis_password", "redis_users.acl")]
EXAMPLES = ["overlays/managed/dependencies.env"]
PLACEHOLDER = re.compile(r"change[-_]?me", re.IGNORECASE)
# NetworkPolicy peers as flows() spells them
DNS = {("ns kubernetes.io/metadata.name=kube-system pod k8s-app=kube-dns", 53, proto) for proto in ("UDP", "TCP")}
MONITORING = "ns kubernetes.io/metadata.name=monitoring pod *"
# dev's cache and db: image, Service port, data mount (a PersistentVolumeClaim), the compose file's probe
STATEFULSETS = {
    "cache": ("redis:8.2", 6379, "/data", ["redis-cli", "ping"]),
    "db": ("postgres:17", 5432, "/var/lib/postgresql/data", ["pg_isready", "-U", "admin", "-d", "desafio3"]),
}


def load(name):
    with open(RENDERED / f"{name}.yaml", encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


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
    eff = dict(workload["spec"]["template"]["spec"].get("securityContext", {}))
    eff.update(c.get("securityContext", {}))
    return eff


def port_number(c, port):
    names = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    return port if isinstance(port, int) else names[port]


def mounted_secrets(objs, workload, c):
    """{file path in the container: (Secret, key)} for every Secret key its mounts show, from
    `secret` volumes and the Secret sources of `projected` ones."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    files = {}
    for m in c.get("volumeMounts", []):
        vol = volumes.get(m["name"], {})  # none: a volumeClaimTemplate
        sources = [vol["secret"]] if "secret" in vol else [
            src["secret"] for src in vol.get("projected", {}).get("sources", []) if "secret" in src]
        for src in sources:
            assert m.get("readOnly") is True, f"secret mount {m['mountPath']} must be readOnly"
            secret = one(objs, "Secret", src.get("secretName") or src.get("name"))
            items = src.get("items") or [{"key": k, "path": k} for k in secret.get("data", {})]
            files.update({m["mountPath"].rstrip("/") + "/" + i["path"]: (secret, i["key"]) for i in items})
    return files


def mounted_secret_file(objs, workload, c, path):
    """(Secret object, key) of a file path inside the container, or fail."""
    files = mounted_secrets(objs, workload, c)
    assert path in files, f"{path} is not a mounted Secret key of {c['name']} ({sorted(files)})"
    secret, key = files[path]
    assert key in secret.get("data", {}), f"Secret {secret['metadata']['name']} has no key {key}"
    return secret, key


def secret_text(objs, workload, c, path):
    secret, key = mounted_secret_file(objs, workload, c, path)
    return base64.b64decode(secret["data"][key]).decode()


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


class WebChecks:
    """Checks of the web workload, run against each overlay."""

    overlay = None

    @classmethod
    def setUpClass(cls):
        cls.objs = load(cls.overlay)
        cls.dep = one(cls.objs, "Deployment", "web")
        cls.c = container(cls.dep)
        cls.pod_labels = cls.dep["spec"]["template"]["metadata"]["labels"]
        cls.env = web_env(cls.objs, cls.dep)

    def test_prometheus_rules_configmap(self):  # README.md "Monitoring": the compose profile's rules
        rules = (SOURCE.parent / "monitoring/rules/web.rules.yml").read_text()
        self.assertEqual(one(self.objs, "ConfigMap", "web-prometheus-rules")["data"], {"web.rules.yml": rules})

    def test_image_ports_resources(self):
        self.assertRegex(self.c["image"], r"(^|/)desafio3-web(:[\w.-]+)?$")
        self.assertEqual((port_number(self.c, "http"), port_number(self.c, "admin")), (5000, 9090))
        for part in ("requests", "limits"):
            self.assertLessEqual({"cpu", "memory"}, set(self.c["resources"].get(part, {})), part)

    def test_env_follows_the_contract(self):
        env = self.env
        self.assertEqual(set(env), CONTRACT_ENV, "env names must be exactly the service's contract")
        self.assertEqual((env["PORT"][1], env["ADMIN_PORT"][1]), ("5000", "9090"))
        for name, (kind, value) in env.items():
            self.assertNotEqual(kind, "env", f"{name}: set inline, expected from ConfigMap/Secret")

    def test_password_is_a_mounted_secret_file(self):
        env = self.env
        for var in ("DATABASE_URL", "REDIS_URL"):  # web's own users; each password from its file
            url = urlsplit(env[var][1])
            self.assertEqual((url.username, url.password), ("web", None), var)
            mounted_secret_file(self.objs, self.dep, self.c, env[var.replace("URL", "PASSWORD_FILE")][1])
        self.assertFalse(any("PASSWORD" in n and not n.endswith("_FILE") for n in env))
        # and no other secret: not the admin's database password, not the Redis ACL
        keys = {key for _, key in mounted_secrets(self.objs, self.dep, self.c).values()}
        self.assertEqual(keys, {"web_db_password", "redis_password"})

    def test_probes_and_scrapes_on_the_admin_port(self):  # readiness never follows the shared /readyz
        probes = [k for k in ("livenessProbe", "readinessProbe", "startupProbe") if k in self.c]
        self.assertEqual(probes[:2], ["livenessProbe", "readinessProbe"])
        for kind in probes:
            self.assertEqual(self.c[kind]["httpGet"]["path"], "/healthz", kind)
            self.assertEqual(port_number(self.c, self.c[kind]["httpGet"]["port"]), 9090, kind)
        ann = self.dep["spec"]["template"]["metadata"]["annotations"]
        self.assertEqual((ann["prometheus.io/port"], ann["prometheus.io/path"]), ("9090", "/metrics"))

    def test_security_context(self):  # beyond what test_every_pod_meets_restricted asserts of every pod
        sc = effective_security(self.dep, self.c)
        self.assertEqual((sc.get("runAsUser"), sc.get("runAsGroup")), (WEB_UID, WEB_UID))
        self.assertFalse(sc.get("capabilities", {}).get("add"))
        self.assertIs(self.dep["spec"]["template"]["spec"].get("automountServiceAccountToken"), False)

    def test_selectors_pick_the_web_pods(self):
        spread = self.dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
        self.assertIn("kubernetes.io/hostname", {t["topologyKey"] for t in spread})
        selectors = [("Service", {"matchLabels": one(self.objs, "Service", "web")["spec"]["selector"]}),
                     ("PodDisruptionBudget", one(self.objs, "PodDisruptionBudget", "web")["spec"]["selector"]),
                     ("NetworkPolicy", one(self.objs, "NetworkPolicy", "web")["spec"]["podSelector"])]
        for what, selector in selectors + [(t["topologyKey"], t["labelSelector"]) for t in spread]:
            self.assertTrue(matches(selector, self.pod_labels), what)

    def test_service(self):
        for p in one(self.objs, "Service", "web")["spec"]["ports"]:  # the public port only, never the admin port
            self.assertEqual(port_number(self.c, p["targetPort"]), 5000)
            self.assertNotEqual(p["port"], 9090)

    def test_default_deny(self):
        deny = [np for np in find(self.objs, "NetworkPolicy") if np["spec"]["podSelector"] == {}]
        self.assertEqual(len(deny), 1, "one NetworkPolicy selecting every pod")
        self.assertEqual(sorted(deny[0]["spec"]["policyTypes"]), ["Egress", "Ingress"])
        self.assertFalse(deny[0]["spec"].get("ingress") or deny[0]["spec"].get("egress"))

    def test_web_network_policy(self):
        np = one(self.objs, "NetworkPolicy", "web")
        self.assertEqual(sorted(np["spec"]["policyTypes"]), ["Egress", "Ingress"])
        self.assertEqual(flows(np["spec"]["ingress"], "from"), {("any", 5000, "TCP"), (MONITORING, 9090, "TCP")})
        egress = flows(np["spec"]["egress"], "to")
        self.assertLessEqual(DNS, egress)
        self.check_dependency_egress(egress - DNS)

    def test_replicas_budget_and_autoscaling(self):
        replicas, pdb = self.dep["spec"]["replicas"], one(self.objs, "PodDisruptionBudget", "web")["spec"]
        self.assertGreaterEqual(replicas, 2)
        self.assertTrue(1 <= int(pdb.get("maxUnavailable", pdb.get("minAvailable"))) < replicas)
        hpa = one(self.objs, "HorizontalPodAutoscaler", "web")
        spec, ref = hpa["spec"], hpa["spec"]["scaleTargetRef"]
        self.assertEqual((hpa["apiVersion"], ref["kind"], ref["name"]), ("autoscaling/v2", "Deployment", "web"))
        self.assertTrue(2 <= spec["minReplicas"] < spec["maxReplicas"])
        self.assertIn("cpu", [m.get("resource", {}).get("name") for m in spec["metrics"]], "no CPU metric")

    def test_namespace_enforces_restricted(self):
        ns = one(self.objs, "Namespace", "desafio3")
        self.assertEqual(ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted")
        for o in self.objs:
            if o["kind"] != "Namespace":
                self.assertEqual(o["metadata"].get("namespace"), "desafio3", o["metadata"]["name"])

    def test_every_pod_meets_restricted(self):
        for w in find(self.objs, "Deployment") + find(self.objs, "StatefulSet"):
            for c in w["spec"]["template"]["spec"]["containers"]:
                sc, where = effective_security(w, c), f"{w['metadata']['name']}/{c['name']}"
                for path, want in RESTRICTED.items():
                    outer, _, inner = path.partition(".")
                    got = sc.get(outer, {}).get(inner) if inner else sc.get(outer)
                    (self.assertIs if isinstance(want, bool) else self.assertEqual)(got, want, f"{where} {path}")
                self.assertNotEqual(sc.get("runAsUser"), 0, where)
                self.assertIn("limits", c.get("resources", {}), where)


class Dev(WebChecks, unittest.TestCase):
    overlay = "dev"

    def test_web_points_at_in_cluster_services(self):
        self.assertEqual(self.env["REDIS_URL"], ("ConfigMap", "redis://web@cache:6379/0"))
        self.assertEqual(self.env["DATABASE_URL"], ("ConfigMap", "postgres://web@db:5432/desafio3"))

    def check_dependency_egress(self, egress):
        self.assertEqual(egress, {(f"app.kubernetes.io/name={n}", p, "TCP") for n, p in (("cache", 6379), ("db", 5432))})

    def test_statefulsets(self):
        """cache and db: headless Service, the image, the port, data on a PersistentVolumeClaim,
        the compose file's probe; a NetworkPolicy that admits only web and lets them reach nothing."""
        for name, (image, port, mount, probe) in STATEFULSETS.items():
            sts, svc, np = (one(self.objs, kind, name) for kind in ("StatefulSet", "Service", "NetworkPolicy"))
            labels, c = sts["spec"]["template"]["metadata"]["labels"], container(sts)
            self.assertEqual(svc["spec"].get("clusterIP"), "None", f"Service {name} must be headless")
            self.assertEqual(sts["spec"]["serviceName"], name)
            self.assertTrue(matches({"matchLabels": svc["spec"]["selector"]}, labels), name)
            self.assertEqual([p["port"] for p in svc["spec"]["ports"]], [port])
            self.assertEqual(c["image"], image)
            self.assertEqual(port_number(c, svc["spec"]["ports"][0]["targetPort"]), port)
            claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
            data = [m for m in c["volumeMounts"] if m["mountPath"] == mount]
            self.assertEqual(len(data), 1, f"{name}: nothing mounted at {mount}")
            self.assertIn(data[0]["name"], claims, f"{name}: {mount} is not a PersistentVolumeClaim")
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                self.assertEqual(c[kind]["exec"]["command"], probe, f"{name} {kind}")
            self.assertTrue(matches(np["spec"]["podSelector"], labels), name)
            self.assertEqual(np["spec"]["policyTypes"], ["Ingress", "Egress"], name)
            self.assertFalse(np["spec"].get("egress"), f"{name} must reach nothing")
            self.assertEqual(flows(np["spec"]["ingress"], "from"), {("app.kubernetes.io/name=web", port, "TCP")})

    def test_cache_statefulset(self):
        sts = one(self.objs, "StatefulSet", "cache")
        c = container(sts)
        # compose's `command:` is the image's CMD, i.e. Kubernetes `args` (keeps the entrypoint)
        self.assertNotIn("command", c)
        self.assertEqual(c["args"], ["redis-server", "--appendonly", "yes", "--appendfsync", "everysec",
                                     "--dir", "/data", "--aclfile", "/run/secrets/redis_acl"])
        self.assertNotIn("env", c)  # the passwords are in the ACL file only, mounted there (test_secrets_agree)

    def test_db_statefulset(self):
        sts = one(self.objs, "StatefulSet", "db")
        c, mount = container(sts), STATEFULSETS["db"][2]
        env = {e["name"]: e for e in c["env"]}
        self.assertEqual(env["POSTGRES_USER"]["value"], "admin")
        self.assertEqual(env["POSTGRES_DB"]["value"], "desafio3")
        self.assertNotIn("POSTGRES_PASSWORD", env)
        pgdata = env["PGDATA"]["value"]
        self.assertTrue(pgdata.startswith(mount + "/") and len(pgdata) > len(mount) + 1, pgdata)
        # the admin's password, and role web's for the init script (run on an empty volume's first start)
        for var, key in (("POSTGRES_PASSWORD_FILE", "db_password"), ("WEB_DB_PASSWORD_FILE", "web_db_password")):
            self.assertEqual(mounted_secret_file(self.objs, sts, c, env[var]["value"])[1], key)
        init = [m for m in c["volumeMounts"] if m["mountPath"] == "/docker-entrypoint-initdb.d"]
        self.assertEqual(len(init), 1, "no /docker-entrypoint-initdb.d")
        ref = next(v["configMap"] for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == init[0]["name"])
        self.assertTrue(ref["defaultMode"] & 0o111, "not executable: the entrypoint would source it, not run it")
        script = (SOURCE / "base/db/initdb/10-web-role.sh").read_text()
        self.assertEqual(one(self.objs, "ConfigMap", ref["name"])["data"], {"10-web-role.sh": script})

    def test_secrets_agree(self):
        """One scripts/make-secrets run feeds all three: web's Redis password is the one the ACL
        hashes, web's database password the one db gives role web, the admin's another."""
        web = lambda var: secret_text(self.objs, self.dep, self.c, self.env[var][1])  # noqa: E731
        db, cache = one(self.objs, "StatefulSet", "db"), one(self.objs, "StatefulSet", "cache")
        db_env = {e["name"]: e.get("value") for e in container(db)["env"]}
        in_db = lambda var: secret_text(self.objs, db, container(db), db_env[var])  # noqa: E731
        self.assertEqual(in_db("WEB_DB_PASSWORD_FILE"), web("DATABASE_PASSWORD_FILE"))
        self.assertNotEqual(in_db("POSTGRES_PASSWORD_FILE"), web("DATABASE_PASSWORD_FILE"))
        args = container(cache)["args"]
        acl = secret_text(self.objs, cache, container(cache), args[args.index("--aclfile") + 1])
        password = web("REDIS_PASSWORD_FILE").strip()
        self.assertRegex(acl, rf"(?m)^user web on #{hashlib.sha256(password.encode()).hexdigest()} ")
        self.assertRegex(acl, r"(?m)^user default on nopass .*-@all \+ping$")
        self.assertNotIn(password, acl + " ".join(args))


class Managed(WebChecks, unittest.TestCase):
    overlay = "managed"

    def test_only_web(self):
        self.assertEqual(find(self.objs, "StatefulSet"), [])
        self.assertEqual(find(self.objs, "Service", "cache") + find(self.objs, "Service", "db"), [])
        self.assertEqual({d["metadata"]["name"] for d in find(self.objs, "Deployment")}, {"web"})

    def test_dependencies_come_from_a_secret(self):
        for var, scheme in (("REDIS_URL", r"^rediss?://"), ("DATABASE_URL", r"^postgres(ql)?://")):
            self.assertEqual(self.env[var][0], "Secret", var)
            self.assertRegex(self.env[var][1], scheme)
            for cm in find(self.objs, "ConfigMap"):
                self.assertNotIn(var, cm.get("data", {}))

    def check_dependency_egress(self, egress):  # the managed services' addresses, not anywhere
        self.assertEqual({port for _, port, _ in egress}, {6379, 5432})
        for who, _, _ in egress:
            self.assertRegex(who, r"^ip (?!0\.0\.0\.0/0$)", "egress to pods, or to anywhere")


def git(*args):
    return subprocess.run(["git", "-C", str(SOURCE), *args], capture_output=True, text=True)


class Committed(unittest.TestCase):
    """No plaintext secret values in the files that are committed (git's view of SOURCE)."""

    def test_base_renders_no_secret(self):
        self.assertEqual(find(load("base"), "Secret"), [])

    def test_no_secret_objects_with_values_in_sources(self):
        for rel in git("ls-files", "*.yaml", "*.yml").stdout.split():
            for doc in yaml.safe_load_all((SOURCE / rel).read_text()):
                if isinstance(doc, dict) and doc.get("kind") == "Secret":
                    self.assertFalse(doc.get("data") or doc.get("stringData"), rel)
                if isinstance(doc, dict) and doc.get("kind") == "Kustomization":
                    for gen in doc.get("secretGenerator", []):
                        self.assertNotIn("literals", gen, f"{rel}: secret literal committed")
                        for f in gen.get("files", []) + gen.get("envs", []):
                            src = (Path(rel).parent / f.split("=", 1)[-1]).as_posix()
                            self.assertEqual(git("check-ignore", "-q", src).returncode, 0,
                                             f"{rel}: a Secret from committed {src}")

    def test_real_secret_files_are_git_ignored(self):  # check-ignore also fails for a tracked file
        for rel in MADE_SECRETS + EXAMPLES:
            self.assertEqual(git("check-ignore", "-q", rel).returncode, 0, f"git does not ignore {rel} (or tracks it)")

    def test_examples_hold_placeholders_only(self):
        for rel in EXAMPLES:
            text = (SOURCE / (rel + ".example")).read_text()
            lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
            values = [line.split("=", 1)[1] if rel.endswith(".env") else line for line in lines]
            self.assertTrue(values, rel)
            for v in values:
                self.assertRegex(v, PLACEHOLDER, f"{rel}.example: not an obvious placeholder")


def main():
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    verbose = bool(os.environ.get("K8S_VERBOSE"))
    stream = sys.stderr if verbose else open(os.devnull, "w")
    result = unittest.TextTestRunner(stream=stream, verbosity=2 * verbose).run(suite)
    for test, tb in result.failures + result.errors:
        print(f"FAIL {test.id()}\n{tb}", file=sys.stderr)
    failed = len(result.failures) + len(result.errors)
    passed = result.testsRun - failed - len(result.skipped)
    print(f"k8s: {passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
