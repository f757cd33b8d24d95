"""Monitoring for real: the alert rules (deploy/alerts.yml) pass promtool's checks and unit
tests, and a real Prometheus scraping the served bento finds every series that the rules and
the Grafana dashboard use, loads the rules and runs every dashboard query."""

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pytest
import requests
import yaml

from fullstack_ml.bento import Server, free_port
from fullstack_ml.stage import ROOT

DEPLOY = ROOT / "deploy"
ALERTS, ALERTS_TEST = DEPLOY / "alerts.yml", DEPLOY / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana/dashboards/fullstack-ml.json"
# wired into service.py with the outlier detector: rules and dashboard use them
NEW_SERIES = {
    "fullstack_ml_outliers_total",
    "fullstack_ml_outlier_score_bucket",
    "fullstack_ml_outlier_score_count",
    "fullstack_ml_worker_starts_total",
}
DEADLINE_S = 120  # only ends a wait that would never end: a noisy machine is slow, not wrong
T = TypeVar("T")


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found on PATH (apt-get install prometheus)")
    return found


def promtool(*args: str) -> None:
    proc = subprocess.run([tool("promtool"), *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"


def alert_rules() -> list[dict[str, Any]]:
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    return group["rules"]


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels, keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = re.findall(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {n for n in names if n.lower() not in KEYWORDS}


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, endpoint) (rate(a_bucket{endpoint=~"/p|x"}[5m])))'
        " / on (job) b_total offset 1m > 0.25 and count(c == 2) or vector(0) unless up"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "up"}


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool("check", "rules", str(ALERTS))
    promtool("check", "config", str(DEPLOY / "prometheus.yml"))  # and the rule file it loads
    promtool("test", "rules", str(ALERTS_TEST))


def test_every_alert_is_tested_firing_and_quiet_and_shipped_with_prometheus() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names)
    for rule in rules:
        assert rule["for"] and rule["labels"]["severity"] in {"critical", "warning"}, rule
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    assert tests["rule_files"] == [ALERTS.name]
    cases = [c for t in tests["tests"] for c in t["alert_rule_test"]]
    firing = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert firing == quiet == set(names)
    # deploy/compose.yaml's Prometheus loads them
    assert yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["rule_files"] == ["alerts.yml"]
    (prometheus,) = [
        s for s in yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"].values()
        if "prometheus" in s["image"]
    ]  # fmt: skip
    assert "./alerts.yml:/etc/prometheus/alerts.yml:ro" in prometheus["volumes"]


def slo_p99_ms() -> int:
    return yaml.safe_load((ROOT / "params.yaml").read_text())["serve"]["slo"]["p99_ms"]


def test_the_p99_alert_fires_above_the_slo_in_params() -> None:
    slo_ms = slo_p99_ms()
    (rule,) = [r for r in alert_rules() if r["alert"] == "FullstackMLLatencyP99OverSLO"]
    expr = " ".join(rule["expr"].split())
    assert expr.startswith("histogram_quantile(0.99, ")
    threshold = re.fullmatch(r".*\)\s*>\s*([0-9.]+)", expr)
    assert threshold and float(threshold[1]) * 1000 == slo_ms, expr
    assert f"{slo_ms}ms SLO" in rule["annotations"]["summary"]
    assert f"({slo_ms} ms)" in rule["annotations"]["description"]


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells.get((x, y))} and {p['id']} overlap"
                cells[x, y] = p["id"]
    names = set().union(*map(metric_names, dashboard_exprs()))
    assert {"fullstack_ml_outlier_score_bucket", "fullstack_ml_worker_starts_total"} <= names
    assert {"fullstack_ml_outliers_total", "fullstack_ml_outlier_score_count"} <= names


def poll(fetch: Callable[[], T], done: Callable[[T], bool], proc: subprocess.Popen, log: Path) -> T:
    """`fetch()` every half second until `done` says yes or DEADLINE_S pass; the last value."""
    deadline, got = time.monotonic() + DEADLINE_S, None
    while True:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            got = fetch()
            if done(got):
                return got
        except requests.RequestException:
            pass  # not listening yet
        if time.monotonic() > deadline:
            return got  # the caller's assertion says what is missing
        time.sleep(0.5)


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def api(self, path: str, **params: str) -> Any:
        r = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = r.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def poll(self, fetch: Callable[[], T], done: Callable[[T], bool]) -> T:
        return poll(fetch, done, self.proc, self.log)

    def names(self) -> set[str]:
        return set(self.api("label/__name__/values"))


@pytest.fixture(scope="module")
def prometheus(
    server: Server, curated: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """A real Prometheus scraping the session's served bento every second, with the shipped
    rules evaluated every second; the bento has answered predictions (one batch is enough
    for a drift score), a probability request and a rejected one by then."""
    binary = tool("prometheus")
    rows = pd.read_parquet(curated / "test.parquet").drop(columns="target").to_dict("records")
    for path, body in [("predict", rows[:256]), ("predict", rows[:1]), ("predict_proba", rows[:3])]:
        r = requests.post(f"{server.url}/{path}", json={"records": body}, timeout=60)
        assert r.status_code == 200, r.text
    rejected = requests.post(f"{server.url}/predict", json={"records": []}, timeout=60)
    assert rejected.status_code == 400  # fullstack_ml_validation_failures_total{reason}
    assert requests.get(f"{server.url}/drift", timeout=120).json()["status"] == "ok"  # gauges set

    work, port = tmp_path_factory.mktemp("prometheus"), free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "fullstack-ml",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}],
            }
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (work / "log").open("w") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=work,
        )  # fmt: skip
    try:
        yield Prometheus(f"http://127.0.0.1:{port}", proc, work / "log")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_prometheus_scrapes_every_series_the_rules_and_dashboard_use(
    prometheus: Prometheus,
) -> None:
    """The target is up, the series the alert rules and the dashboard select are there (the
    outlier and worker-start ones included), and every alert is loaded and evaluates."""

    def health() -> list[str]:
        return [t["health"] for t in prometheus.api("targets")["activeTargets"]]

    assert prometheus.poll(health, lambda h: h == ["up"]) == ["up"]
    (up,) = prometheus.api("query", query='up{job="fullstack-ml"}')["result"]
    assert up["value"][1] == "1"
    # the p99 SLO is a bucket bound: p99 is over it exactly when over 1% of requests are
    le = slo_p99_ms() / 1000
    slo_bucket = f'bentoml_service_request_duration_seconds_bucket{{le="{le}"}}'
    assert prometheus.api("query", query=slo_bucket)["result"], f"no bucket at {le} s"

    used = {n for r in alert_rules() for n in metric_names(r["expr"])}
    used |= set().union(*map(metric_names, dashboard_exprs()))
    assert used >= NEW_SERIES
    names = prometheus.poll(prometheus.names, lambda got: used <= got)
    assert used <= names, f"not exported by the bento: {sorted(used - names)}"

    def rules() -> dict[str, dict]:  # {} until the rule file is loaded
        groups = prometheus.api("rules", type="alert")["groups"]
        return {r["name"]: r for g in groups for r in g["rules"]}

    def evaluated(got: dict[str, dict]) -> bool:
        return bool(got) and all(not r["lastEvaluation"].startswith("0001") for r in got.values())

    loaded = prometheus.poll(rules, evaluated)
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert not rule["lastEvaluation"].startswith("0001"), f"{name} never evaluated"


@pytest.mark.slow
def test_every_dashboard_query_runs_on_the_scraped_series(prometheus: Prometheus) -> None:
    """Each panel's query parses and runs in Prometheus, and selects only series the bento
    exports (a renamed metric would leave a panel silently empty)."""
    exprs = dashboard_exprs()
    wanted = set().union(*map(metric_names, exprs))
    names = prometheus.poll(prometheus.names, lambda got: wanted <= got)
    problems = []
    for expr in exprs:
        query = expr.replace("$__rate_interval", "1m")
        r = requests.get(f"{prometheus.url}/api/v1/query", params={"query": query}, timeout=30)
        if r.json()["status"] != "success":
            problems.append(f"{expr}: {r.json().get('error')}")
        if not metric_names(expr) or not metric_names(expr) <= names:
            problems.append(f"{expr}: not exported: {sorted(metric_names(expr) - names)}")
    assert not problems, "\n".join(problems)
