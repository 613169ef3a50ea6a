"""Checks of the rendered deployment manifests that no generic tool makes.

Run by scripts/check-deploy (which renders k8s/ with kustomize first) inside its
tool venv, where PyYAML and kubernetes-validate are installed:

    deploy_checks.py schemas  RENDER_DIR K8S_VERSION...   every object against the
                                                           Kubernetes schemas, strict
    deploy_checks.py rules    RENDER_DIR OUT_DIR          PrometheusRule -> promtool file
    deploy_checks.py contract RENDER_DIR REPO_ROOT        the service contract

RENDER_DIR holds base.yaml, self-hosted.yaml, eks-fargate.yaml and monitoring.yaml.
The contract checks are what DESIGN.md promises and nobody can try on a cluster
here: env names that exist in src/config.rs, probe paths and ports, the timing
relations between probes, grace period and the shutdown phases, the eviction
budget, the datastores of each overlay, and one runbook and one test per alert.
Each check prints one line; the exit status is the number of failures (capped).
"""

from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path

import yaml

APP_RENDERS = ("base", "self-hosted", "eks-fargate")
MONITORING_RENDER = "monitoring"

# Custom resources have no schema in kubernetes-validate. They are skipped by name
# here, never by accident: any other kind without a schema fails.
CUSTOM_RESOURCES = {
    ("postgresql.cnpg.io/v1", "Cluster"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}

# DESIGN.md defaults, used when the ConfigMap leaves a variable unset.
DEFAULT_LISTEN = "0.0.0.0:8080"
DEFAULT_SHUTDOWN_DELAY = "5s"
DEFAULT_DRAIN_TIMEOUT = "20s"
# Env the service needs in every production overlay: without AUTH_DATABASE_URL each
# pod would silently run its own embedded SQLite.
REQUIRED_ENV = ("AUTH_DATABASE_URL", "AUTH_REDIS_URLS", "AUTH_KEY_ENCRYPTION_KEY")

# Fargate: vCPU -> allowed memory sizes in MiB; pods are sized from requests plus
# 256 MiB for kubelet, kube-proxy and containerd.
FARGATE_OVERHEAD_MIB = 256
FARGATE_SIZES = {
    0.25: [512, 1024, 2048],
    0.5: [1024 * g for g in range(1, 5)],
    1.0: [1024 * g for g in range(2, 9)],
    2.0: [1024 * g for g in range(4, 17)],
    4.0: [1024 * g for g in range(8, 31)],
}


class Report:
    """Collects one line per check, prints them as they come."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"  ok    {what}")
        else:
            self.failed += 1
            print(f"  FAIL  {what}" + (f": {detail}" if detail else ""))
        return ok


def load(render_dir: Path, name: str) -> list[dict]:
    with open(render_dir / f"{name}.yaml", encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = find(objs, kind, name)
    if len(found) != 1:
        raise LookupError(f"expected exactly one {kind}/{name}, found {len(found)}")
    return found[0]


def duration_seconds(text: str) -> float:
    """'5s', '500ms', '1m', '1m30s' -> seconds (the humantime forms the service reads)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def cpu_cores(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def mem_mib(q: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "K": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for suffix in sorted(units, key=len, reverse=True):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * units[suffix]
    return float(q) / 2**20


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


# --------------------------------------------------------------------------- schemas


def cmd_schemas(render_dir: Path, versions: list[str]) -> int:
    import kubernetes_validate

    report = Report()
    for render in (*APP_RENDERS, MONITORING_RENDER):
        for obj in load(render_dir, render):
            ident = f"{render}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            if (obj.get("apiVersion"), obj.get("kind")) in CUSTOM_RESOURCES:
                print(f"  skip  {ident} (custom resource {obj['apiVersion']}: no schema in kubernetes-validate)")
                continue
            for version in versions:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                    report.check(True, f"{ident} valid for Kubernetes {version} (strict)")
                except Exception as e:  # SchemaNotFoundError, ValidationError, ...
                    # kubernetes-validate's own errors carry .message and an empty str().
                    message = getattr(e, "message", "") or str(e) or repr(e)
                    report.check(False, f"{ident} valid for Kubernetes {version} (strict)", message.splitlines()[0])
    print(f"schemas: {report.passed} checks passed, {report.failed} failed")
    return min(report.failed, 100)


# --------------------------------------------------------------------------- rules


def cmd_rules(render_dir: Path, out_dir: Path) -> int:
    rules = one(load(render_dir, MONITORING_RENDER), "PrometheusRule", "auth-service")
    out = out_dir / "auth-service.rules.yaml"
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": rules["spec"]["groups"]}, f, sort_keys=False)
    print(f"  wrote {out}")
    return 0


# --------------------------------------------------------------------------- contract


def app_container(objs: list[dict]) -> tuple[dict, dict]:
    deployment = one(objs, "Deployment", "auth-service")
    containers = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "auth-service"]
    if len(containers) != 1:
        raise LookupError("Deployment auth-service has no container named auth-service")
    return deployment, containers[0]


def container_config(objs: list[dict], container: dict) -> dict:
    """The env the ConfigMaps referenced by envFrom provide."""
    config: dict = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            config.update(one(objs, "ConfigMap", ref["name"]).get("data", {}))
    return config


def resolve_port(container: dict, port) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def check_env(report: Report, render: str, objs: list[dict], container: dict, config_rs: str | None) -> None:
    config = container_config(objs, container)
    env = container.get("env", [])
    names = list(config) + [e["name"] for e in env]

    for required in REQUIRED_ENV:
        report.check(required in names, f"{render}: {required} is set")

    # RUST_LOG is read by the tracing filter, not by src/config.rs.
    service_names = [n for n in names if n.startswith("AUTH_")]
    if config_rs is None:
        report.check(False, f"{render}: env names exist in src/config.rs", "src/config.rs is missing")
    else:
        missing = [n for n in service_names if f'"{n}"' not in config_rs]
        report.check(not missing, f"{render}: all {len(service_names)} AUTH_* env names are read by src/config.rs",
                     f"not a string literal in src/config.rs: {', '.join(missing)}")

    # Helper variables (not the service's own) exist only to be expanded into
    # another value, and $(VAR) only expands variables defined before it.
    defined = set(config)
    helpers = {e["name"] for e in env if not (e["name"].startswith("AUTH_") or e["name"] == "RUST_LOG")}
    used: set[str] = set()
    problems = []
    for e in env:
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
            used.add(ref)
            if ref not in defined:
                problems.append(f"{e['name']} uses $({ref}) before it is defined")
        defined.add(e["name"])
    problems += [f"{h} is set but never expanded into an AUTH_ variable" for h in sorted(helpers - used)]
    problems = list(dict.fromkeys(problems))
    report.check(not problems, f"{render}: $(VAR) references resolve, helper variables are used", "; ".join(problems))

    # Behind an ingress every client would otherwise share the ingress's IP, and
    # with it one failed-login budget.
    proxies = [p.strip() for p in config.get("AUTH_TRUSTED_PROXIES", "").split(",") if p.strip()]
    bad = []
    for p in proxies:
        try:
            ipaddress.ip_network(p, strict=False)
        except ValueError:
            bad.append(p)
    report.check(bool(proxies) and not bad,
                 f"{render}: AUTH_TRUSTED_PROXIES names the ingress's CIDRs ({', '.join(proxies) or 'unset'})",
                 f"not CIDRs: {', '.join(bad)}" if bad else "unset")

    for var, default in (("AUTH_SHUTDOWN_DELAY", DEFAULT_SHUTDOWN_DELAY), ("AUTH_DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT)):
        value = config.get(var, default)
        try:
            duration_seconds(value)
            report.check(True, f"{render}: {var}={value} is a duration")
        except ValueError as e:
            report.check(False, f"{render}: {var} is a duration", str(e))


def check_probes_and_ports(report: Report, render: str, objs: list[dict], deployment: dict, container: dict) -> None:
    config = container_config(objs, container)
    listen = config.get("AUTH_LISTEN", DEFAULT_LISTEN)
    listen_port = int(listen.rsplit(":", 1)[1])
    ports = [p["containerPort"] for p in container.get("ports", [])]
    report.check(ports == [listen_port], f"{render}: container port {ports} is AUTH_LISTEN's port ({listen})")

    expected = {"readinessProbe": "/health", "livenessProbe": "/health/live", "startupProbe": "/health/live"}
    for probe, path in expected.items():
        get = container.get(probe, {}).get("httpGet", {})
        report.check(get.get("path") == path and resolve_port(container, get.get("port")) == listen_port,
                     f"{render}: {probe} is GET {path} on port {listen_port}",
                     f"found {get.get('path')} on {get.get('port')}")

    service = one(objs, "Service", "auth-service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    report.check(service["spec"]["selector"].items() <= pod_labels.items(), f"{render}: Service selects the auth-service pods")
    targets = [resolve_port(container, p.get("targetPort", p["port"])) for p in service["spec"]["ports"]]
    report.check(targets == [listen_port], f"{render}: Service targets the container port", f"targets {targets}")

    policy = one(objs, "NetworkPolicy", "auth-service")
    ingress_ports = {resolve_port(container, p["port"]) for rule in policy["spec"].get("ingress", []) for p in rule.get("ports", [])}
    report.check(ingress_ports == {listen_port}, f"{render}: NetworkPolicy admits exactly the service port",
                 f"admits {ingress_ports}")


def check_timings(report: Report, render: str, objs: list[dict], deployment: dict, container: dict) -> None:
    config = container_config(objs, container)
    delay = duration_seconds(config.get("AUTH_SHUTDOWN_DELAY", DEFAULT_SHUTDOWN_DELAY))
    drain = duration_seconds(config.get("AUTH_DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT))
    pod = deployment["spec"]["template"]["spec"]

    readiness = container["readinessProbe"]
    seen_after = readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3)
    report.check(seen_after <= delay / 2,
                 f"{render}: readiness sees draining after <= {seen_after}s, well inside the {delay:g}s shutdown delay",
                 f"periodSeconds x failureThreshold = {seen_after}s must be <= half of AUTH_SHUTDOWN_DELAY")

    grace = pod.get("terminationGracePeriodSeconds", 30)
    report.check(grace >= delay + drain + 10,
                 f"{render}: terminationGracePeriodSeconds {grace} >= delay {delay:g}s + drain {drain:g}s + 10s margin")

    liveness = container["livenessProbe"]
    kill_after = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
    report.check(kill_after > drain,
                 f"{render}: liveness needs {kill_after}s of failures, longer than the {drain:g}s drain")

    startup = container.get("startupProbe", {})
    report.check(startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 30,
                 f"{render}: startup probe allows >= 30s to start serving HTTP")


def check_disruption(report: Report, render: str, objs: list[dict], deployment: dict) -> None:
    spec = deployment["spec"]
    rolling = spec.get("strategy", {}).get("rollingUpdate", {})
    report.check(spec.get("replicas") == 3, f"{render}: Deployment starts with 3 replicas")
    report.check(rolling.get("maxUnavailable") == 0 and rolling.get("maxSurge") == 1,
                 f"{render}: rollouts surge 1 and never go below the replica count", str(rolling))

    pod_labels = spec["template"]["metadata"]["labels"]
    pdbs = [p for p in find(objs, "PodDisruptionBudget") if matches(p["spec"]["selector"], pod_labels)]
    report.check(len(pdbs) == 1 and pdbs[0]["spec"].get("minAvailable") == 2,
                 f"{render}: one PodDisruptionBudget with minAvailable 2 covers the pods")

    hpa = one(objs, "HorizontalPodAutoscaler", "auth-service")
    report.check(hpa["spec"]["scaleTargetRef"]["name"] == "auth-service" and hpa["spec"]["minReplicas"] >= 3,
                 f"{render}: HPA targets the Deployment and never goes below 3")
    report.check(hpa["spec"].get("behavior", {}).get("scaleDown", {}).get("stabilizationWindowSeconds", 0) > 0,
                 f"{render}: HPA scale-down is stabilised")


def check_security(report: Report, render: str, objs: list[dict], deployment: dict, container: dict,
                   dockerfile: str) -> None:
    pod = deployment["spec"]["template"]["spec"]
    psc, csc = pod.get("securityContext", {}), container.get("securityContext", {})
    report.check(pod.get("automountServiceAccountToken") is False, f"{render}: no service account token is mounted")
    report.check(pod.get("enableServiceLinks") is False,
                 f"{render}: enableServiceLinks is off (no service-link variables in the AUTH_ prefix)")
    report.check(psc.get("runAsNonRoot") is True and csc.get("runAsNonRoot", True) is True,
                 f"{render}: runs as non-root")
    report.check(csc.get("readOnlyRootFilesystem") is True, f"{render}: read-only root filesystem")
    report.check(csc.get("allowPrivilegeEscalation") is False and csc.get("capabilities", {}).get("drop") == ["ALL"],
                 f"{render}: no privilege escalation, all capabilities dropped")
    report.check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{render}: seccomp RuntimeDefault")

    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    report.check(bool(user) and user[-1].split(":")[0] == str(uid),
                 f"{render}: runAsUser {uid} is the image's USER", f"Dockerfile USER {user[-1] if user else None}")


def check_fargate(report: Report, objs: list[dict], deployment: dict) -> None:
    pod = deployment["spec"]["template"]["spec"]
    cpu = mem = 0.0
    for c in pod["containers"]:
        res = c.get("resources", {})
        report.check(res.get("requests") == res.get("limits") and {"cpu", "memory"} <= set(res.get("requests", {})),
                     f"eks-fargate: container {c['name']} has cpu and memory requests == limits (Fargate requires it)")
        cpu += cpu_cores(res.get("requests", {}).get("cpu", "0"))
        mem += mem_mib(res.get("requests", {}).get("memory", "0"))
    needed = mem + FARGATE_OVERHEAD_MIB
    fit = next(((v, m) for v, sizes in sorted(FARGATE_SIZES.items()) if v >= cpu for m in sizes if m >= needed), None)
    report.check(fit is not None and fit[0] == cpu and fit[1] == needed,
                 f"eks-fargate: requests {cpu:g} vCPU + {mem:g}Mi (+{FARGATE_OVERHEAD_MIB}Mi) fill the Fargate size "
                 f"{fit[0] if fit else '?'} vCPU / {fit[1] / 1024 if fit else '?'} GB exactly",
                 "round the requests to a Fargate size so no paid capacity is left unused")
    report.check("topologySpreadConstraints" not in pod,
                 "eks-fargate: no topologySpreadConstraints (unsupported on Fargate)")
    datastores = [o for o in objs if o["kind"] in ("StatefulSet", "PersistentVolumeClaim")
                  or o["apiVersion"].startswith("postgresql.cnpg.io")]
    report.check(not datastores, "eks-fargate: no in-cluster datastores (Fargate pods cannot mount EBS)",
                 str([o["metadata"]["name"] for o in datastores]))


def check_self_hosted(report: Report, objs: list[dict], container: dict) -> None:
    redis = one(objs, "StatefulSet", "redis-cluster")
    labels = redis["spec"]["template"]["metadata"]["labels"]
    report.check(redis["spec"]["replicas"] == 6, "self-hosted: Redis Cluster StatefulSet has 6 nodes")
    affinity = redis["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity")
    report.check(bool(affinity), "self-hosted: Redis nodes have pod anti-affinity")
    pdbs = [p for p in find(objs, "PodDisruptionBudget") if matches(p["spec"]["selector"], labels)]
    report.check(len(pdbs) == 1 and pdbs[0]["spec"].get("maxUnavailable") == 1,
                 "self-hosted: a PodDisruptionBudget lets one Redis node go at a time")
    job = one(objs, "Job", "redis-cluster-create")
    report.check("create-cluster.sh" in " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"]),
                 "self-hosted: a Job forms the Redis Cluster")

    pg = one(objs, "Cluster", "auth-postgres")
    report.check(pg["apiVersion"] == "postgresql.cnpg.io/v1" and pg["spec"]["instances"] == 3,
                 "self-hosted: PostgreSQL is a CloudNativePG Cluster with 3 instances")
    env = {e["name"]: e for e in container.get("env", [])}
    db_ref = env.get("AUTH_DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
    report.check(db_ref == {"name": "auth-postgres-app", "key": "uri"},
                 "self-hosted: AUTH_DATABASE_URL comes from the CloudNativePG app secret", str(db_ref))
    redis_urls = env.get("AUTH_REDIS_URLS", {}).get("value", "")
    report.check("redis-cluster-0.redis-cluster:6379" in redis_urls,
                 "self-hosted: AUTH_REDIS_URLS seeds the in-cluster Redis nodes")


def check_monitoring(report: Report, root: Path, render_dir: Path, base: list[dict]) -> None:
    objs = load(render_dir, MONITORING_RENDER)
    monitor = one(objs, "ServiceMonitor", "auth-service")
    service = one(base, "Service", "auth-service")
    report.check(matches(monitor["spec"]["selector"], service["metadata"]["labels"]),
                 "monitoring: ServiceMonitor selects the auth-service Service")
    port_names = {p.get("name") for p in service["spec"]["ports"]}
    report.check(all(e.get("port") in port_names and e.get("path") == "/metrics" for e in monitor["spec"]["endpoints"]),
                 "monitoring: ServiceMonitor scrapes /metrics on a named Service port")

    rules = one(objs, "PrometheusRule", "auth-service")
    alerts = [r for g in rules["spec"]["groups"] for r in g["rules"] if "alert" in r]
    report.check(len(alerts) >= 8, f"monitoring: {len(alerts)} alerts (at least 8)")

    tested: set[str] = set()
    for test_file in sorted((root / "k8s/monitoring/tests").glob("*.yaml")):
        data = yaml.safe_load(test_file.read_text(encoding="utf-8"))
        for test in data.get("tests", []):
            for case in test.get("alert_rule_test", []):
                if case.get("exp_alerts"):
                    tested.add(case["alertname"])

    runbooks = root / "docs/runbooks"
    for alert in alerts:
        name = alert["alert"]
        url = alert.get("annotations", {}).get("runbook_url", "")
        page = runbooks / f"{name}.md"
        report.check(url.endswith(f"/docs/runbooks/{name}.md") and page.is_file(),
                     f"monitoring: {name} has runbook docs/runbooks/{name}.md", f"runbook_url {url!r}")
        report.check(alert.get("labels", {}).get("severity") in ("critical", "warning"),
                     f"monitoring: {name} has severity critical or warning")
        report.check(name in tested, f"monitoring: {name} has a promtool test where it fires")
    orphans = sorted(p.stem for p in runbooks.glob("*.md")
                     if p.stem not in {a["alert"] for a in alerts} and p.name != "README.md")
    report.check(not orphans, "monitoring: every runbook page belongs to an alert", ", ".join(orphans))


def cmd_contract(render_dir: Path, root: Path) -> int:
    report = Report()
    config_path = root / "src/config.rs"
    config_rs = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    if config_rs is None:
        print(f"  FAIL  {config_path} does not exist: cannot check the env names against the service")
    dockerfile = (root / "Dockerfile").read_text(encoding="utf-8")

    # The Dockerfile's own contract: the port and the health check.
    report.check(re.search(r"^EXPOSE\s+8080\b", dockerfile, re.M) is not None, "Dockerfile: EXPOSE 8080 (AUTH_LISTEN's default port)")
    report.check(re.search(r'^HEALTHCHECK\b.*\n?.*CMD \["/usr/local/bin/auth-service", "healthcheck"\]', dockerfile, re.M) is not None,
                 "Dockerfile: HEALTHCHECK runs `auth-service healthcheck` (exec form, no shell)")

    # Every AUTH_ name written anywhere in the deployment files, including comments,
    # examples and docs: a misspelt name in a runbook misleads as much as one in YAML.
    if config_rs is not None:
        sources = [root / "Dockerfile", *sorted((root / "k8s").rglob("*")), *sorted((root / "docs").rglob("*.md"))]
        mentioned: dict[str, set[str]] = {}
        for path in sources:
            if path.is_file():
                for name in re.findall(r"\bAUTH_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8")):
                    mentioned.setdefault(name, set()).add(str(path.relative_to(root)))
        unknown = {n: sorted(p) for n, p in mentioned.items() if f'"{n}"' not in config_rs}
        report.check(not unknown, f"all {len(mentioned)} AUTH_* names in Dockerfile, k8s/ and docs/ exist in src/config.rs",
                     "; ".join(f"{n} ({', '.join(p)})" for n, p in sorted(unknown.items())))

    renders = {name: load(render_dir, name) for name in APP_RENDERS}
    for render, objs in renders.items():
        deployment, container = app_container(objs)
        check_env(report, render, objs, container, config_rs)
        check_probes_and_ports(report, render, objs, deployment, container)
        check_timings(report, render, objs, deployment, container)
        check_disruption(report, render, objs, deployment)
        check_security(report, render, objs, deployment, container, dockerfile)
        if render == "eks-fargate":
            check_fargate(report, objs, deployment)
        if render == "self-hosted":
            check_self_hosted(report, objs, container)
    check_monitoring(report, root, render_dir, renders["base"])

    failed = report.failed + (config_rs is None)
    print(f"contract: {report.passed} checks passed, {failed} failed")
    return min(failed, 100)


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "schemas":
        return cmd_schemas(Path(argv[1]), argv[2:])
    if len(argv) == 3 and argv[0] == "rules":
        return cmd_rules(Path(argv[1]), Path(argv[2]))
    if len(argv) == 3 and argv[0] == "contract":
        return cmd_contract(Path(argv[1]), Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
