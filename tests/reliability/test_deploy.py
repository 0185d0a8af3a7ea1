"""deploy/kubernetes, checked offline: kustomize renders it, every built-in kind passes
kubernetes-validate's strict schema check, the pods are locked down as the README says,
the PrometheusRule carries exactly the tested alerts, and compose's Caddyfile keeps /metrics
from the world. A slow check of its own:
`pytest -m deploy` (needs kubectl, which has kustomize built in, Debian's promtool and caddy)."""

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from app.destinations import load
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import clean_env, free_port, serving

pytestmark = pytest.mark.deploy
ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy/kubernetes"
KUBERNETES = "1.30.0"


def tool(name: str) -> str:
    beside_python = Path(sys.executable).parent / name  # a console script of the test extra
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed")
    return found


def render(directory: Path, folder: Path) -> tuple[Path, list[dict[str, Any]]]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True, check=True
    ).stdout
    path = folder / "all.yaml"
    path.write_text(out)
    return path, [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    return render(BASE, tmp_path_factory.mktemp("kustomize"))


def validate(path: Path) -> int:
    """How many resources passed kubernetes-validate's strict check (all must)."""
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES, str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.count(" passed for resource ")


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def test_every_built_in_kind_passes_the_kubernetes_schemas(rendered):
    path, docs = rendered
    built_in = [d for d in docs if "monitoring.coreos.com" not in d["apiVersion"]]
    assert (
        validate(path) == len(built_in) == 7
    )  # 2 Services, StatefulSet, PDB, HPA, Job, NetworkPolicy


def env_of(docs: list[dict[str, Any]]) -> dict[str, str | None]:
    (app,) = by_kind(docs, "StatefulSet")
    (container,) = app["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}


def egress_ports(docs: list[dict[str, Any]]) -> set[int]:
    """The policy's ports out, each rule naming its destinations: no rule with a port alone
    (that is every address in the world)."""
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert all(rule.get("from") for rule in policy["spec"]["ingress"])
    assert all(rule.get("to") for rule in policy["spec"]["egress"])
    return {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}


def test_the_base_trusts_no_proxy_and_reaches_only_the_cluster_dns(rendered):
    _, docs = rendered
    assert "FORWARDED_ALLOW_IPS" not in env_of(docs)  # the app's default: loopback only
    assert egress_ports(docs) == {53}


def test_the_example_overlay_says_which_proxy_and_which_destinations(tmp_path):
    path, docs = render(ROOT / "deploy/kubernetes-example", tmp_path)
    assert validate(path) == 7
    assert env_of(docs)["FORWARDED_ALLOW_IPS"] == "10.244.7.0/24"
    assert egress_ports(docs) == {53, 5432, 443}
    assert {doc["metadata"].get("namespace") for doc in docs} == {"coldmail"}


def test_the_outbound_overlay_sends_from_a_dispatcher_deployment_only(tmp_path):
    path, docs = render(ROOT / "deploy/kubernetes-outbound", tmp_path)
    assert validate(path) == 10  # the example's 7, the Deployment, its policy, the ConfigMap
    assert {doc["metadata"].get("namespace") for doc in docs} == {"coldmail"}
    (serve,) = by_kind(docs, "StatefulSet")
    (dispatch,) = by_kind(docs, "Deployment")
    (config,) = by_kind(docs, "ConfigMap")
    env = env_of(docs)
    assert env["OUTBOUND_DISPATCH"] == "false"  # serve writes messages, sends none
    pod = dispatch["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["outbound", "dispatch"]
    assert container["image"] == serve["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["envFrom"] == [{"secretRef": {"name": "coldmail-webhooks"}}]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    # both read the one destinations file, from the generated ConfigMap
    for workload in (serve, dispatch):
        spec = workload["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if "configMap" in v]
        assert volume["configMap"]["name"] == config["metadata"]["name"]
        file = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert file["DESTINATIONS_FILE"] == mounts[volume["name"]] + "/destinations.yaml"
    secrets = {"CRM_WEBHOOK_SECRET": "whsec_" + "A" * 40, "SLACK_WEBHOOK_URL": "https://x.test/"}
    declared = tmp_path / "destinations.yaml"
    declared.write_text(config["data"]["destinations.yaml"])
    assert [d.name for d in load(declared, secrets)] == ["crm", "ops-slack"]
    # the dispatcher's pods, not serve's, get a way out to the destinations
    policies = {p["metadata"]["name"]: p for p in by_kind(docs, "NetworkPolicy")}
    own = policies["coldmail-webhooks-dispatch"]["spec"]
    assert own["podSelector"]["matchLabels"] == dispatch["spec"]["selector"]["matchLabels"]
    assert all(rule.get("to") for rule in own["egress"])
    assert serve["spec"]["selector"]["matchLabels"] != dispatch["spec"]["selector"]["matchLabels"]


def test_the_pods_are_locked_down_and_keep_their_spool(rendered):
    _, docs = rendered
    (app,) = by_kind(docs, "StatefulSet")
    pod = app["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["lifecycle"]["preStop"]
    # uvicorn lets requests in flight finish for 30 s after SIGTERM: the pod waits longer
    assert pod["terminationGracePeriodSeconds"] > 30 + 5
    assert container["envFrom"] == [{"secretRef": {"name": "coldmail-webhooks"}}]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (claim,) = app["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]] == env["SPOOL_DIR"]  # one spool per replica
    assert "--no-migrate" in container["args"]
    (job,) = by_kind(docs, "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]


def test_the_disruption_budget_and_autoscaler_never_leave_no_replica(rendered):
    _, docs = rendered
    (budget,) = by_kind(docs, "PodDisruptionBudget")
    (scaler,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert budget["spec"]["minAvailable"] >= 1
    assert scaler["spec"]["minReplicas"] >= 2
    assert scaler["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"


def test_the_prometheus_rule_is_the_tested_alerts_and_the_monitor_scrapes_them(rendered, tmp_path):
    _, docs = rendered
    (rule,) = by_kind(docs, "PrometheusRule")
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    extracted = tmp_path / "rules.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    subprocess.run([tool("promtool"), "check", "rules", str(extracted)], check=True)
    (monitor,) = by_kind(docs, "ServiceMonitor")
    selected = [
        s
        for s in by_kind(docs, "Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert len(selected) == 1  # each pod scraped once
    ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["port"] in ports
    # the alerts' job="coldmail-webhooks" is the value of the monitor's job label
    assert selected[0]["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "coldmail-webhooks"


def listening(process: subprocess.Popen[bytes], url: str) -> httpx.Response:
    """The first answer of a process that is starting, within 30 s."""
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, "it stopped"
        try:
            return httpx.get(url)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_the_compose_proxy_keeps_metrics_from_the_world(database_url, tmp_path):
    """deploy/caddy/Caddyfile run by Debian's Caddy in front of a real serve, plain HTTP
    (SITE_ADDRESS http://...) and without its admin endpoint, otherwise as compose runs it."""
    caddyfile = (ROOT / "deploy/caddy/Caddyfile").read_text()
    with serving(server_env(database_url), tmp_path) as server:
        adapted = caddyfile.replace("{\n\tservers", "{\n\tadmin off\n\tservers", 1)
        adapted = adapted.replace("app:8000", urlsplit(server.url).netloc)
        (tmp_path / "Caddyfile").write_text(adapted)
        port = free_port()
        env = clean_env(SITE_ADDRESS=f"http://127.0.0.1:{port}", XDG_DATA_HOME=str(tmp_path))
        env |= {"XDG_CONFIG_HOME": str(tmp_path)}
        caddy = subprocess.Popen(
            [tool("caddy"), "run", "--config", str(tmp_path / "Caddyfile")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proxy = f"http://127.0.0.1:{port}"
            assert listening(caddy, proxy + "/healthz").status_code == 200  # the rest passes
            assert httpx.get(proxy + "/docs").status_code == 200
            for path in ("/metrics", "/metrics/", "/METRICS", "/%6Detrics", "/metrics?x=1"):
                answer = httpx.get(proxy + path)
                assert answer.status_code == 404 and "cmr_" not in answer.text, path
            assert "cmr_webhook" in httpx.get(server.url + "/metrics").text  # the host's scraper
        finally:
            caddy.terminate()
            caddy.wait(10)
