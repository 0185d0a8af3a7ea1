"""The observability pack against the real thing: the alert rules pass their promtool unit
tests, and a real Prometheus (Debian's) scraping a real `serve --workers 2` finds every
metric the rules and the Grafana dashboard name, and loads the rules. A slow check of its
own: `pytest -m prometheus`."""

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from app.simulation import traffic
from tests.reliability.test_crash_and_outage import server_env
from tests.reliability.test_edge import post, sign
from tests.servers import Server, free_port

pytestmark = pytest.mark.prometheus
ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/alerts.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboard.json"
METRICS_TOKEN = "scrape-token-0123456789"
PATIENCE = 90


def named_metrics() -> set[str]:
    """Every metric an alert rule or a dashboard panel asks for."""
    rules = [r["expr"] for g in _yaml(RULES)["groups"] for r in g["rules"]]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = rules + [t["expr"] for p in panels for t in p["targets"]]
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"\b(cmr_[a-z_]+|up)\b(?=\s*[{\[)]|\s)", expr + " "))
    return names


def _yaml(path: Path) -> dict:  # type: ignore[type-arg]
    import yaml

    return yaml.safe_load(path.read_text())  # type: ignore[no-any-return]


def promtool(*args: str) -> str:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed (Debian: apt-get install prometheus)")
    result = subprocess.run(
        ["promtool", *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_alert_rules_are_valid_and_pass_their_unit_tests():
    assert "SUCCESS: 14 rules found" in promtool("check", "rules", RULES.name)
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")


def test_the_rules_and_the_dashboard_name_what_an_operator_must_watch():
    names = named_metrics()
    for watched in ("up", "cmr_spool_oldest_seconds", "cmr_webhook_signatures_total"):
        assert watched in names
    assert {"cmr_reconcile_drift", "cmr_subscriptions_at_risk"} <= names
    outbound = ("backlog", "backlog_oldest_seconds", "circuit_state", "dead_letters", "sent_total")
    assert {f"cmr_outbound_{name}" for name in outbound} <= names


@pytest.fixture(scope="module")
def server(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("observed")
    env = server_env(database) | {"METRICS_TOKEN": METRICS_TOKEN, "SPOOL_DIR": str(home / "s")}
    # a destination, so the per-destination cmr_outbound_* series exist (nothing listens)
    destinations = home / "destinations.yaml"
    destinations.write_text(
        "destinations: [{name: crm, url: 'http://127.0.0.1:9/hook', format: standard-webhooks,"
        " events: ['*'], secretEnv: CRM_SECRET, allowPrivateNetwork: true}]\n"
    )
    env |= {"DESTINATIONS_FILE": str(destinations), "CRM_SECRET": "whsec_" + "A" * 44}
    serve = Server(env, home, workers=2)
    serve.start()
    yield serve
    serve.stop()


@pytest.fixture(scope="module")
def prometheus(server: Server) -> Iterator[str]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (Debian: apt-get install prometheus)")
    home = Path(tempfile.mkdtemp(prefix="cmw-prometheus-"))
    config = home / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{RULES}]\n"
        "scrape_configs:\n"
        "  - job_name: coldmail-webhooks\n"
        f"    authorization: {{credentials: {METRICS_TOKEN}}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n"
    )
    port = free_port()
    with (home / "prometheus.log").open("w") as log:
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(PATIENCE)
        shutil.rmtree(home, ignore_errors=True)


def query(prometheus: str, path: str, **params: str) -> Any:
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            return httpx.get(f"{prometheus}{path}", params=params).json()["data"]
        except (httpx.HTTPError, KeyError, ValueError):
            assert time.monotonic() < deadline, f"Prometheus did not answer {path}"
            time.sleep(0.2)


def test_a_real_prometheus_scrapes_every_named_metric_and_loads_the_rules(server, prometheus):
    for payload in (traffic.mailbox_created(), traffic.prewarmup_success(domains=1, per_domain=2)):
        body = orjson.dumps(payload)
        assert post(server, body, sign(body)).status_code == 200
        assert post(server, body, sign(body)).json()["status"] == "duplicate"
    missing: set[str] = set()
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        scraped = set(query(prometheus, "/api/v1/label/__name__/values"))
        up = query(prometheus, "/api/v1/query", query='up{job="coldmail-webhooks"}')
        missing = named_metrics() - scraped
        if not missing and up["result"] and up["result"][0]["value"][1] == "1":
            break
        time.sleep(0.5)
    assert not missing, f"named by rules or dashboard, never scraped: {sorted(missing)}"
    rules = query(prometheus, "/api/v1/rules")["groups"][0]["rules"]
    assert len(rules) == 14
    deadline = time.monotonic() + PATIENCE
    while any(rule.get("health") != "ok" for rule in rules):
        assert time.monotonic() < deadline, [(r["name"], r.get("lastError")) for r in rules]
        time.sleep(0.5)
        rules = query(prometheus, "/api/v1/rules")["groups"][0]["rules"]
