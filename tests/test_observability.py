"""The Grafana dashboard and the Prometheus alert rules, against the gateway's real metrics.

`promtool` checks and unit-tests the rules; a real Prometheus scrapes a real gateway through a
known mix of traffic and answers every query of every dashboard panel. promtool and prometheus
come from Debian's `prometheus` package (`apt-get install prometheus`).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.metrics import Metrics

from .conftest import (
    ROOT,
    UPSTREAM_KEY,
    GatewayFactory,
    Mock,
    RedisServer,
    RunningGateway,
    free_port,
    team_config,
    wait_port,
)

DASHBOARD = ROOT / "grafana/aio-gateway-dashboard.json"
RULES = ROOT / "prometheus/aio-gateway-rules.yaml"
PROMETHEUS_EXAMPLE = ROOT / "prometheus/prometheus.example.yml"
RULE_TESTS = sorted((ROOT / "prometheus/tests").glob("*.yaml"))
CHART = ROOT / "helm/aio-gateway"
CHART_DASHBOARD = CHART / "files/grafana-dashboard.json"
CHART_RULES = CHART / "files/prometheus-rules.yaml"
SEVERITIES = {"info", "warning", "critical"}
# labels Prometheus adds to every scraped series, and the histogram bucket label
TARGET_LABELS = {"job", "instance", "le"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install prometheus (Debian's package "
                    f"carries prometheus and promtool)")
    return path


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=120,
                          cwd=ROOT, check=False)


# -- the files ---------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panels() -> list[dict[str, Any]]:
    """Every panel that shows data (rows hold no queries), rows' nested panels included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        found.extend(panel.get("panels", []))
        if panel["type"] != "row":
            found.append(panel)
    return found


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def declared_metrics() -> dict[str, set[str]]:
    """Series name -> label names, for every metric gateway/metrics.py declares."""
    names: dict[str, set[str]] = {}
    for declared in Metrics()._families:
        labels = set(declared.labelnames)
        for family in declared.describe():
            if family.type == "counter":
                names[f"{family.name}_total"] = labels
            elif family.type == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    names[family.name + suffix] = labels
            else:
                names[family.name] = labels
    return names


def check_expression(expr: str, where: str) -> None:
    """Every metric the expression reads exists, with the labels it filters and groups by."""
    metrics = declared_metrics()
    used = set(re.findall(r"\b(gateway_[a-z_]+)", expr))
    assert used, f"{where}: reads no gateway metric: {expr}"
    unknown = used - set(metrics)
    assert not unknown, f"{where}: metrics not declared in gateway/metrics.py: {unknown}"
    known = set().union(*(metrics[name] for name in used)) | TARGET_LABELS
    for name, matchers in re.findall(r"\b(gateway_[a-z_]+)\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
            assert label in metrics[name] | TARGET_LABELS, f"{where}: {name} has no {label!r}"
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        for label in filter(None, (part.strip() for part in group.split(","))):
            assert label in known, f"{where}: groups by {label!r}, which {used} do not have"


def test_chart_carries_the_same_files() -> None:
    assert CHART_DASHBOARD.read_bytes() == DASHBOARD.read_bytes()
    assert CHART_RULES.read_bytes() == RULES.read_bytes()


def test_dashboard_imports_anywhere() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    team = variables["team"]
    assert team["type"] == "query"
    assert team["definition"] == "label_values(gateway_requests_total, team)"
    assert team["query"]["query"] == team["definition"]
    assert team["multi"] and team["includeAll"]
    assert team["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    # no datasource is named: every panel and query uses the variable
    uids = {m for m in re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text())}
    assert uids <= {"${datasource}", "-- Grafana --", board["uid"]}
    assert "__inputs" not in board

    nested = [p["id"] for row in board["panels"] for p in row.get("panels", [])]
    ids = [p["id"] for p in board["panels"]] + nested
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            check_expression(target["expr"], panel["title"])
            if "gateway_requests_total" in target["expr"] or "credits" in target["expr"]:
                # every per-team metric follows the team picker
                assert 'team=~"$team"' in target["expr"], panel["title"]


def test_dashboard_has_the_panels_operators_need() -> None:
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels()}
    text = "\n".join(exprs.values())
    for needle in (
        'result=~"hit|coalesced"', 'result=~"hit|coalesced|miss"',  # hit ratio
        "gateway_credits_charged_total", "gateway_credits_saved_total",
        "gateway_budget_remaining_credits", "gateway_budget_limit_credits",
        "histogram_quantile(0.5,", "histogram_quantile(0.99,",
        "gateway_request_duration_seconds_bucket", "gateway_upstream_duration_seconds_bucket",
        'status=~"5..|error"', 'status=~"401|402"', 'reason="quota"',
        "gateway_inflight_requests", "gateway_store_errors_total",
        "gateway_store_fallback_requests_total", "by (team, status)",
        "gateway_store_duration_seconds_bucket",
        "gateway_upstream_account_up", "gateway_upstream_slots_total",
        "gateway_upstream_waiting", "gateway_upstream_wait_seconds_bucket",
        "gateway_upstream_account_slots_free", "gateway_upstream_account_balance_remaining",
    ):
        assert needle in text, needle


# -- alert rules ---------------------------------------------------------------------------------


def test_rules_are_complete() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert "alert" in rule, f"recording rule {rule}: the dashboard does not rely on any"
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert set(rule["annotations"]) >= {"summary", "description"}, rule["alert"]
        check_expression(rule["expr"], rule["alert"])
    reads = " ".join(rule["expr"] for rule in rules())
    for metric in ("gateway_budget_remaining_credits", "gateway_budget_limit_credits",
                   'reason="quota"', 'status=~"5..|error"', 'status=~"401|402"',
                   "gateway_store_errors_total", "gateway_store_fallback_requests_total",
                   "gateway_store_duration_seconds_bucket",
                   "histogram_quantile(0.99,", "gateway_cache_events_total",
                   "gateway_ledger_pending", "gateway_ledger_lag_seconds",
                   "gateway_upstream_account_up", "gateway_upstream_account_slots_free",
                   "gateway_upstream_account_balance_remaining", 'reason=~"pace|waiting"'):
        assert metric in reads, metric


def test_promtool_checks_the_rules() -> None:
    promtool = tool("promtool")
    for path in (RULES, CHART_RULES):
        result = run(promtool, "check", "rules", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    promtool = tool("promtool")
    assert RULE_TESTS, "no rule tests in prometheus/tests/"
    result = run(promtool, "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        spec = yaml.safe_load(path.read_text())
        assert [(path.parent / f).resolve() for f in spec["rule_files"]] == [RULES.resolve()]
        for case in spec["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert names - firing == set(), "never tested firing"
    assert names - quiet == set(), "never tested staying quiet"
    assert (firing | quiet) - names == set(), "tests for alerts that do not exist"


# -- the Helm chart's templates -----------------------------------------------------------------


TEMPLATES = {  # template -> (values key, file it loads)
    "grafana-dashboard-configmap.yaml": ("grafanaDashboard", "files/grafana-dashboard.json"),
    "prometheusrule.yaml": ("prometheusRule", "files/prometheus-rules.yaml"),
    "alert-rules-configmap.yaml": ("alertRulesConfigMap", "files/prometheus-rules.yaml"),
}


def render_without_helm(template: str) -> str:
    """What `helm template` makes of these three small templates, enabled, default values.

    Only the constructs they use: a comment, one `if`, the chart's fullname and labels helpers,
    `with .Values.x.y` + `toYaml . | nindent N`, and `.Files.Get ... | nindent N` (a newline,
    then every line indented).
    """
    text = re.sub(r"\{\{- /\*.*?\*/ -\}\}\n?", "", template, flags=re.S)
    text = re.sub(r"\{\{- if \.Values\.\w+\.enabled \}\}\n", "", text, count=1)
    text = re.sub(r"\n\{\{- end \}\}\n?$", "\n", text)
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def with_values(match: re.Match[str]) -> str:
        value = values[match[1]][match[2]]
        if not value:
            return ""
        lines = yaml.safe_dump(value, default_flow_style=False).splitlines()
        return match[3].rstrip() + "".join("\n" + " " * int(match[4]) + line for line in lines)

    text = re.sub(r"\n *\{\{- with \.Values\.(\w+)\.(\w+) \}\}(.*?)"
                  r"\{\{- toYaml \. \| nindent (\d+) \}\}\n *\{\{- end \}\}",
                  with_values, text, flags=re.S)
    text = text.replace('{{ include "aio-gateway.fullname" . }}', "release-aio-gateway")
    text = re.sub(r'\n *\{\{- include "aio-gateway\.labels" \. \| nindent (\d+) \}\}',
                  lambda m: "\n" + " " * int(m[1]) + "app.kubernetes.io/name: aio-gateway", text)

    loads = re.findall(r'\s*\{\{- \.Files\.Get "([^"]+)" \| nindent (\d+) \}\}', text)
    text = re.sub(r'\s*\{\{- \.Files\.Get "[^"]+" \| nindent \d+ \}\}', "\0", text)
    assert "{{" not in text and len(loads) == 1, text  # nothing this function does not know
    path, indent = loads[0]
    content = "".join("\n" + " " * int(indent) + line
                      for line in (CHART / path).read_text().split("\n"))
    return text.replace("\0", content)


def rendered_objects() -> dict[str, Any]:
    helm = shutil.which("helm")
    if helm is None:
        return {name: yaml.safe_load(render_without_helm((CHART / "templates" / name).read_text()))
                for name in TEMPLATES}
    sets = [f"--set={key}.enabled=true" for key, _ in TEMPLATES.values()]
    result = run(helm, "template", "release", str(CHART), "--set=upstream.apiKey=x", *sets,
                 *(f"--show-only=templates/{name}" for name in TEMPLATES))
    assert result.returncode == 0, result.stderr
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    kinds = {"ConfigMap": None, "PrometheusRule": "prometheusrule.yaml"}
    by_name: dict[str, Any] = {}
    for obj in objects:
        name = kinds[obj["kind"]] or ("grafana-dashboard-configmap.yaml"
                                      if obj["metadata"]["name"].endswith("-dashboard")
                                      else "alert-rules-configmap.yaml")
        by_name[name] = obj
    return by_name


def test_chart_templates_load_the_files() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for name, (key, path) in TEMPLATES.items():
        template = (CHART / "templates" / name).read_text()
        assert values[key]["enabled"] is False, key  # opt-in
        assert f"{{{{- if .Values.{key}.enabled }}}}" in template, name
        assert f'.Files.Get "{path}"' in template, name
        assert (CHART / path).is_file(), path
    assert values["grafanaDashboard"]["labels"] == {"grafana_dashboard": "1"}

    objects = rendered_objects()
    board = objects["grafana-dashboard-configmap.yaml"]
    assert board["kind"] == "ConfigMap"
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["aio-gateway-dashboard.json"]) == dashboard()
    rule = objects["prometheusrule.yaml"]
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    config_map = objects["alert-rules-configmap.yaml"]
    assert config_map["kind"] == "ConfigMap"
    assert yaml.safe_load(config_map["data"]["aio-gateway-rules.yaml"]) == yaml.safe_load(
        RULES.read_text())
    assert "{{ $labels.team }}" in config_map["data"]["aio-gateway-rules.yaml"]


# -- a real Prometheus scraping a real gateway ---------------------------------------------------


def test_gateway_metrics_pass_promtool_check_metrics(make_gateway: GatewayFactory,
                                                     mock: Mock) -> None:
    promtool = tool("promtool")
    gateway = make_gateway(teams={"research": team_config(
        "research", budget={"credits": 100, "period": "month"})})
    assert gateway.chat("one").status_code == 200
    assert gateway.chat("one").headers["x-cache"] == "HIT"
    mock.fault(status=500)
    assert gateway.chat("two").status_code == 500
    assert gateway.chat("three", team="marketing").status_code == 401  # not in this config
    text = gateway.metrics()
    for family in ("counter", "gauge", "histogram"):
        assert f" {family}\n" in text
    result = run(promtool, "check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""  # promtool prints each problem it finds


def scrape_config(targets: list[str], token_file: Path | None) -> dict[str, Any]:
    """prometheus/prometheus.example.yml, pointed at `targets` (1 s intervals, the repository's
    rules, the metrics token read from `token_file`, or none)."""
    config = yaml.safe_load(PROMETHEUS_EXAMPLE.read_text())
    assert config["rule_files"] == [RULES.name]
    config["rule_files"] = [str(RULES)]
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s",
                        "evaluation_interval": "1s"}
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": targets}]
    if token_file is None:
        del job["authorization"]
    else:
        job["authorization"]["credentials_file"] = str(token_file)
    return config  # type: ignore[no-any-return]


class Prometheus:
    """A private Prometheus server on a free port, scraping `targets` every second."""

    def __init__(self, tmp: Path, targets: list[str], token: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        token_file = None
        if token is not None:
            token_file = tmp / "metrics-token"
            token_file.write_text(token)
        config = scrape_config(targets, token_file)
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = tmp / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=10)
        try:
            wait_port(self.port, timeout=30)
            self.wait_for(lambda: self.client.get("/-/ready").status_code == 200, "ready")
        except Exception:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = condition()
            except httpx.HTTPError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline or self.process.poll() is not None:
                pytest.fail(f"Prometheus: {what} did not happen\n{self.log()}")
            time.sleep(0.1)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        answer = self.client.get("/api/v1/query", params=params).json()
        assert answer["status"] == "success", (expr, answer)
        assert answer["data"]["resultType"] == "vector", expr
        return answer["data"]["result"]  # type: ignore[no-any-return]

    def scrape_after(self, moment: float) -> float:
        """Wait for a scrape of the gateway that began after `moment` (and is stored); its time."""
        def scraped() -> float | None:
            # timestamp() of a plain selector is the sample's own time (of anything else, now)
            found = self.query('timestamp(up{job="gateway"})')
            stamp = float(found[0]["value"][1]) if found else 0.0
            return stamp if stamp > moment else None

        stamp = float(self.wait_for(scraped, "a scrape of the gateway"))
        assert self.query('up{job="gateway"}', at=stamp)[0]["value"][1] == "1", self.log()
        return stamp

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    started: list[Prometheus] = []

    def start(targets: list[str], token: str | None = None) -> Prometheus:
        server = Prometheus(tmp_path, targets, token)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def settle(gateway: RunningGateway) -> None:
    """Bookkeeping runs after the answers: wait until no credits are held (the admission that
    timed out while Redis was paused is cancelled in the background) and the counters rest."""
    deadline = time.monotonic() + 10
    previous = ""
    while time.monotonic() < deadline:
        held = [t.get("reserved") for t in gateway.admin("GET", "teams").json()["teams"]]
        text = gateway.metrics()
        if text == previous and not any(held):
            return
        previous = text
        time.sleep(0.3)
    pytest.fail(f"the gateway's bookkeeping did not settle: {held}")


def research_mix(gateway: RunningGateway, mock: Mock, redis: RedisServer, tag: str) -> None:
    """The research team's share of each round (answers asserted, so the counts below hold).

    Upstream failures first: each reserves 2 credits and is refunded before the next one. Each
    round spends 6 credits (two paid answers, and one served while the store is away, charged
    when it is back), which the 14-credit budget holds for two rounds.
    """
    for fault, status in (({"status": 500}, 500), ({"status": 402}, 503),
                          ({"status": 401}, 502), ({"drop": True}, 502)):
        mock.fault(**fault)
        assert gateway.chat(f"{tag} failing {status} {fault}").status_code == status
    first = [gateway.chat(f"{tag} one") for _ in range(4)]
    second = [gateway.chat(f"{tag} two") for _ in range(2)]
    # COALESCED when the previous answer's bookkeeping had not stored it yet: the same saving
    assert [r.headers["x-cache"].replace("COALESCED", "HIT") for r in first + second] == [
        "MISS", "HIT", "HIT", "HIT", "MISS", "HIT"]
    assert all(r.status_code == 200 for r in first + second)
    video = gateway.call("POST", "videos/generations", json={"model": "kling-3", "prompt": "x"})
    assert video.status_code == 402  # 100 credits never fit a budget of 14
    redis.pause()  # store.on_error: open serves it without the store, or its budget
    try:
        assert gateway.chat(f"{tag}, store away").status_code == 200
    finally:
        redis.resume()


def values_by(results: list[dict[str, Any]], *labels: str) -> dict[Any, float]:
    def key(metric: dict[str, str]) -> Any:
        found = tuple(metric.get(label, "") for label in labels)
        return found if len(found) > 1 else found[0] if found else ""
    return {key(r["metric"]): float(r["value"][1]) for r in results}


def test_every_dashboard_query_answers_with_the_traffic_sent(
        private_redis: RedisServer, make_gateway: GatewayFactory, mock: Mock,
        prometheus: Callable[..., Prometheus]) -> None:
    token = "metrics-token-for-prometheus-0123"  # scraped as prometheus.example.yml says
    gateway = make_gateway(private_redis.url, store={"on_error": "open"}, teams={
        "research": team_config("research", budget={"credits": 14, "period": "month"}),
        "marketing": team_config("marketing", requests_per_day=3,
                                 budget={"credits": 1000, "period": "month"}),
    }, metrics={"bearer_token": token}, upstream={"api_key": "", "accounts": [  # one, paced
        {"id": "main", "api_key": UPSTREAM_KEY, "requests_per_minute": 6000, "burst": 100,
         "credits": 1000}]})
    assert gateway.client.get("/metrics").status_code == 401
    prom = prometheus([gateway.url.removeprefix("http://")], token=token)

    # Round one creates every series the checks below read, so that the second round's
    # increase is exact (Prometheus cannot see a counter's rise from nothing to its first value).
    research_mix(gateway, mock, private_redis, "warm-up")
    assert [gateway.chat(c, team="marketing").status_code
            for c in ("m1", "m1", "m2", "m3")] == [200, 200, 200, 429]
    assert gateway.client.post("/api/v1/chat/completions", json={"model": "gemini"},
                               headers={"Authorization": "Bearer nope"}).status_code == 401
    settle(gateway)
    start = prom.scrape_after(time.time())

    # Round two: the traffic the dashboard must show.
    research_mix(gateway, mock, private_redis, "round two")
    assert [gateway.chat(c, team="marketing").status_code for c in ("m4", "m5")] == [429, 429]
    assert gateway.client.post("/api/v1/chat/completions", json={"model": "gemini"},
                               headers={"Authorization": "Bearer nope"}).status_code == 401
    settle(gateway)
    end = prom.scrape_after(time.time())

    # Grafana's substitutions, for a time range from `start` to `end` (both scrapes included)
    window_ms = round((end - start) * 1000) + 1
    window_s = window_ms / 1000
    teams = prom.client.get("/api/v1/label/team/values",
                            params={"match[]": "gateway_requests_total"}).json()["data"]
    assert set(teams) == {"research", "marketing", "unknown"}  # the team variable's choices
    substitutions = {"$__rate_interval": f"{window_ms}ms", "$__range": f"{window_ms}ms",
                     "$team": "(" + "|".join(sorted(teams)) + ")"}

    answers: dict[str, list[list[dict[str, Any]]]] = {}
    for panel in panels():
        answers[panel["title"]] = []
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in substitutions.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, expr
            result = prom.query(expr, at=end)
            assert result, f"{panel['title']}: no data for {expr}"
            finite = [r for r in result if math.isfinite(float(r["value"][1]))]
            assert finite, f"{panel['title']}: only NaN or Inf for {expr}: {result}"
            answers[panel["title"]].append(result)

    def one(title: str, *labels: str, target: int = 0) -> dict[Any, float]:
        return values_by(answers[title][target], *labels)

    approx = pytest.approx
    # round two's research traffic: 4 hits, 7 misses (4 failures, 2 paid, 1 without the store)
    assert one("Cache hit ratio (time range)") == {"": approx(4 / 11, rel=1e-3)}
    by_route = one("Cache hit ratio by route", "route")
    assert by_route == {"chat/completions": approx(4 / 11, rel=1e-3)}
    assert one("Cache hit ratio by team", "team")["research"] == approx(4 / 11, rel=1e-3)
    # 2 paid answers and 1 served without the store at 2 credits; 4 hits saved 2 each
    spent = one("Credits spent vs saved per team (time range)", "team", target=0)
    saved = one("Credits spent vs saved per team (time range)", "team", target=1)
    assert spent == {"research": approx(6, rel=1e-2), "marketing": approx(0, abs=1e-6)}
    assert saved == {"research": approx(8, rel=1e-2), "marketing": approx(0, abs=1e-6)}
    assert one("Credits spent (time range)") == {"": approx(6, rel=1e-2)}
    assert one("Credits saved by the cache (time range)") == {"": approx(8, rel=1e-2)}
    rejected = one("Rejections by team and reason (time range)", "team", "reason")
    assert rejected == {("research", "budget"): approx(1, rel=1e-2),
                        ("marketing", "quota"): approx(2, rel=1e-2),
                        ("unknown", "auth"): approx(1, rel=1e-2)}
    quota = one("Quota rejections by team", "team")
    assert quota["marketing"] * window_s == approx(2, rel=1e-2)
    by_status = one("Requests by team and status", "team", "status")
    assert by_status["research", "200"] * window_s == approx(7, rel=1e-2)
    assert by_status["marketing", "429"] * window_s == approx(2, rel=1e-2)
    account = one("Upstream account problems (time range)", "status")
    assert account == {"401": approx(1, rel=1e-2), "402": approx(1, rel=1e-2)}
    errors = one("Upstream errors (5xx, no answer)", "status")
    assert {k: v * window_s for k, v in errors.items()} == {"500": approx(1, rel=1e-2),
                                                            "error": approx(1, rel=1e-2)}
    # budgets come from the store (Redis), which was told of the request served without it
    assert one("Budget remaining", "team") == {"research": 2, "marketing": 996}
    used = one("Budget used", "team")
    assert used == {"research": approx(12 / 14), "marketing": approx(4 / 1000)}
    assert one("In-flight requests") == {"": 0}
    # every forwarded research request took a slot (4 failures, 2 paid, 1 without the store)
    slots = one("Upstream slots by team", "team")
    assert slots["research"] * window_s == approx(7, rel=1e-2)
    assert one("Upstream accounts in rotation", "account") == {"main": 1}  # back after the 402
    assert one("Requests waiting for an upstream slot", "team") == {"research": 0,
                                                                    "marketing": 0}
    fallback = one("Requests served without the store (open fallback)")
    assert fallback[""] * window_s == approx(1, rel=1e-2)
    assert one("Store errors by operation", "operation")["admit"] * window_s == approx(1, rel=1e-2)
    # both store calls are timed: every admission, and the settlements after the answers
    latency = one("Store latency p50 / p99 by operation", "operation", target=1)
    assert set(latency) == {"admit", "finish"}
    assert all(0 < seconds < 60 for seconds in latency.values()), latency

    # The alert rules, loaded by this Prometheus, evaluate without errors on real series...
    def evaluated() -> list[dict[str, Any]] | None:
        groups = prom.client.get("/api/v1/rules").json()["data"]["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        return loaded if loaded and all(r["health"] != "unknown" for r in loaded) else None

    loaded = prom.wait_for(evaluated, "a first evaluation of the rules")
    assert {r["name"] for r in loaded} == {rule["alert"] for rule in rules()}
    assert [(r["name"], r["lastError"]) for r in loaded if r["health"] != "ok"] == []
    # ...and their conditions hold exactly where this traffic says they should
    alerting = {rule["alert"]: prom.query(rule["expr"], at=end) for rule in rules()}
    assert values_by(alerting["AioGatewayTeamBudgetHigh"], "team") == {
        "research": approx(12 / 14)}
    assert alerting["AioGatewayTeamBudgetExhausted"] == []
    assert set(values_by(alerting["AioGatewayUpstreamAccountNeedsAttention"], "status")) == {
        "401", "402"}
    assert len(alerting["AioGatewayStoreFallbackOpen"]) == 1
    assert alerting["AioGatewayHighLatencyP99"] == []
