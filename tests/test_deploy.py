"""
The deployment recipes in docs/deploy/, checked against the code they describe.

Ports, paths and timeouts come from the config schema's defaults (never restated here),
the configs go through the real parser, and every metric name in the dashboard, the
alerts and the autoscaler must be one the gateway registers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import CollectorRegistry

import bungate
from bungate.config import GatewayConfig, parse_config
from bungate.config.policy import RateLimitConfig
from bungate.config.schema import ClusterConfig, HealthConfig, MetricsConfig, ServerConfig
from bungate.master.listeners import wanted_listeners
from bungate.ops import metrics as metrics_module
from bungate.ops.metrics import GatewayMetrics, MasterMetrics

ROOT = Path(bungate.__file__).resolve().parents[1]
DEPLOY = ROOT / "docs" / "deploy"
K8S = DEPLOY / "kubernetes"

PORT = ServerConfig().port
HEALTH = HealthConfig().path
SHUTDOWN = ClusterConfig().shutdown_timeout
#: Measured RSS of one CPython process, master or worker (docs/performance.md).
CPYTHON_RSS_MIB = 55

METRIC = re.compile(r"\bbungate_[a-z0-9_]+\b")


# --- helpers ------------------------------------------------------------------------------


def load_yaml(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def one_yaml(path: Path) -> Any:
    (doc,) = load_yaml(path)
    return doc


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> every value given (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    """A systemd time span (``45``, ``45s``, ``1min 30s``) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[suffix]
    return total


def mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity in MiB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|K|M|G)?", quantity)
    assert match, quantity
    factor = {
        None: 1 / 2**20,
        "Ki": 1 / 1024,
        "Mi": 1,
        "Gi": 1024,
        "K": 1e3 / 2**20,
        "M": 1e6 / 2**20,
        "G": 1e9 / 2**20,
    }
    return float(match.group(1)) * factor[match.group(2)]


def container() -> dict[str, Any]:
    deployment = one_yaml(K8S / "deployment.yaml")
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def configmap_config() -> GatewayConfig:
    configmap = one_yaml(K8S / "configmap.yaml")
    return parse_config(yaml.safe_load(configmap["data"]["gateway.yaml"]), "configmap.yaml")


@pytest.fixture
def registered_metrics(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every series name the gateway and the master register, suffixes included."""
    monkeypatch.delenv(metrics_module.ENV_VAR, raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    registry = CollectorRegistry()
    GatewayMetrics(enabled=True, registry=registry)
    MasterMetrics(registry=registry)
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def exprs_in_dashboard(dashboard: dict[str, Any]) -> Iterator[str]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            yield query["query"]


def alert_rules() -> list[dict[str, Any]]:
    rules = one_yaml(DEPLOY / "prometheus-alerts.yaml")
    return [rule for group in rules["groups"] for rule in group["rules"]]


# --- every file parses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_every_yaml_and_json_file_parses(path):
    if path.suffix == ".json":
        assert isinstance(json.loads(path.read_text()), dict)
    else:
        assert load_yaml(path), f"{path.name} is empty"


def test_the_readme_names_every_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert f"`{path.relative_to(DEPLOY)}`" in readme, path


# --- configs -------------------------------------------------------------------------------


def test_the_sample_config_parses_with_the_default_port_and_health_path():
    config = parse_config(yaml.safe_load((DEPLOY / "gateway.yaml").read_text()), "gateway.yaml")
    assert config.server.port == PORT
    assert config.health.enabled and config.health.path == HEALTH
    assert config.cluster.shutdown_timeout == SHUTDOWN


def test_the_configmap_config_parses():
    config = configmap_config()
    assert config.cluster.enabled
    assert config.server.port == PORT
    assert config.health.enabled and config.health.path == HEALTH
    assert config.metrics.enabled and config.metrics.path == MetricsConfig().path
    assert config.cluster.shutdown_timeout == SHUTDOWN


# --- systemd -------------------------------------------------------------------------------


def test_service_unit():
    service = unit(DEPLOY / "bungate.service")["Service"]

    def value(key: str) -> str:
        (only,) = service[key]
        return only

    assert value("Type") == "notify"
    assert value("NotifyAccess") == "main"
    assert shlex.split(value("ExecStart")) == [
        "/usr/bin/env",
        "twist",
        "bungate",
        "--config",
        "/etc/bungate/gateway.yaml",
    ]
    assert value("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert value("KillSignal") == "SIGTERM"
    assert value("KillMode") == "mixed"
    assert seconds(value("TimeoutStopSec")) > SHUTDOWN
    assert seconds(value("WatchdogSec")) > 0
    assert value("Restart") == "on-failure"
    assert value("User") == "bungate"
    for key, expected in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert value(key) == expected, key
    assert value("ReadWritePaths")
    assert int(value("LimitNOFILE")) >= 4096
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in (DEPLOY / "bungate.service").read_text()


def test_socket_unit_listens_on_the_default_port_as_the_main_listener():
    socket_section = unit(DEPLOY / "bungate.socket")["Socket"]
    (listen,) = socket_section["ListenStream"]
    assert int(listen.rpartition(":")[2]) == PORT
    main_listener = wanted_listeners(GatewayConfig())[0][0]
    assert socket_section["FileDescriptorName"] == [main_listener]
    assert int(socket_section["Backlog"][0]) == ServerConfig().backlog


def run_check_units(script: Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = None if path is None else {"PATH": path}
    return subprocess.run(
        ["/bin/sh", str(script)], capture_output=True, text=True, timeout=120, env=env
    )


needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and not os.environ.get("CI"),  # CI installs it
    reason="systemd-analyze is not installed (apt-get install systemd)",
)


@needs_analyze
def test_check_units_verifies_both_units():
    done = run_check_units(DEPLOY / "check-units")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "check-units: ok" in done.stdout


@needs_analyze
def test_check_units_fails_on_a_mistake(tmp_path):
    for name in ("check-units", "bungate.service", "bungate.socket"):
        shutil.copy(DEPLOY / name, tmp_path / name)
    broken = tmp_path / "bungate.service"
    broken.write_text(broken.read_text().replace("KillMode=mixed", "KillMode=mixed\nKilMode=x"))
    done = run_check_units(tmp_path / "check-units")
    assert done.returncode == 1
    assert "KilMode" in done.stdout and "FAILED" in done.stdout


def test_check_units_skips_without_systemd_analyze():
    done = run_check_units(DEPLOY / "check-units", path="/nonexistent")
    assert done.returncode == 0
    assert done.stdout.startswith("check-units: skipped: systemd-analyze is not installed")


# --- containers ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.pypy"])
def test_dockerfile(name):
    text = (DEPLOY / name).read_text()
    lines = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    instructions = " ".join(lines).replace("\\ ", " ")
    exposed = [line.split()[1:] for line in lines if line.startswith("EXPOSE ")]
    assert [str(PORT)] in exposed
    assert "STOPSIGNAL SIGTERM" in lines
    assert re.search(r"HEALTHCHECK .*CMD .*http://127\.0\.0\.1:" + f"{PORT}{HEALTH}'", instructions)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and not users[-1].startswith(("root", "0"))
    # the config the image starts with is the one it copies in, and it parses
    (copied,) = re.findall(r"COPY docs/deploy/gateway\.yaml (\S+)", instructions)
    assert f'CMD ["--config", "{copied}"]' in lines
    assert 'ENTRYPOINT ["twist", "bungate"]' in lines
    assert re.search(r"pip install [^&]*\.(\s|$)", instructions)
    if name == "Dockerfile.pypy":
        assert "--only-binary=cryptography" in instructions
        assert re.search(r"^FROM pypy:3\.9", text, re.MULTILINE)
    else:
        assert re.search(r"^FROM python:3\.\d+-slim", text, re.MULTILINE)


def _container_engine() -> str | None:
    """A container tool whose engine answers (the client alone cannot build), or None."""
    for tool in ("docker", "podman"):
        path = shutil.which(tool)
        if path is None:
            continue
        try:
            done = subprocess.run([path, "info"], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return path
    return None


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.pypy"])
def test_the_image_builds_where_a_container_engine_runs(name):
    engine = _container_engine()
    if engine is None:
        pytest.skip("no container engine answers `docker info` or `podman info` here")
    tag = f"bungate-test-{name.lower().replace('.', '-')}"
    done = subprocess.run(
        [engine, "build", "-f", str(DEPLOY / name), "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    version = subprocess.run(
        [engine, "run", "--rm", tag, "--version"], capture_output=True, text=True, timeout=120
    )
    assert bungate.__version__ in version.stdout + version.stderr


# --- kubernetes ----------------------------------------------------------------------------


def test_probes_use_the_health_path_and_the_gateway_port():
    spec = container()
    probes = [spec[name] for name in ("readinessProbe", "livenessProbe", "startupProbe")]
    for probe in probes:
        assert probe["httpGet"] == {"path": HEALTH, "port": PORT}
    ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    assert ports["http"] == PORT
    assert ports["metrics"] == configmap_config().metrics.listen[1]  # type: ignore[index]


def test_the_grace_period_covers_the_pre_stop_wait_and_the_drain():
    deployment = one_yaml(K8S / "deployment.yaml")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    command = " ".join(container()["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in command
    (wait,) = (int(n) for n in re.findall(r"sleep (\d+); kill -TERM", command))
    assert grace > SHUTDOWN
    assert grace > wait + configmap_config().cluster.shutdown_timeout


def test_resources_fit_the_measured_memory_of_the_master_and_its_workers():
    config = configmap_config()
    resources = container()["resources"]
    needed = (config.cluster.workers + 1) * CPYTHON_RSS_MIB
    assert config.cluster.workers == 2
    assert mebibytes(resources["requests"]["memory"]) >= needed
    assert mebibytes(resources["limits"]["memory"]) >= mebibytes(resources["requests"]["memory"])
    assert "cpu" in resources["requests"]  # what the HPA's utilization is measured against


def test_the_config_is_a_configmap_mounted_as_a_file():
    deployment = one_yaml(K8S / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    configmap = one_yaml(K8S / "configmap.yaml")
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    (mount,) = [m for m in container()["volumeMounts"] if m["name"] == volume["name"]]
    assert "subPath" not in mount  # a subPath mount never sees a ConfigMap update
    args = container()["args"]
    path = args[args.index("--config") + 1]
    assert path == f"{mount['mountPath']}/gateway.yaml"
    assert "gateway.yaml" in configmap["data"]


def test_service_pdb_and_hpa_point_at_the_deployment():
    deployment = one_yaml(K8S / "deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {port["name"] for port in container()["ports"]}

    service = one_yaml(K8S / "service.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names

    pdb = one_yaml(K8S / "pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] >= 1

    hpa = one_yaml(K8S / "hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (cpu,) = hpa["spec"]["metrics"]
    assert cpu["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= pdb["spec"]["minAvailable"] + 1
    text = (K8S / "hpa.yaml").read_text()
    assert "rate(<<.Series>>{<<.LabelMatchers>>}[1m])" in text
    assert "bungate_requests_total" in text and "type: Pods" in text


# --- monitoring ----------------------------------------------------------------------------


def test_registered_metrics_are_collected(registered_metrics):
    # the collection itself: the names the docs below rely on are all there
    assert {
        "bungate_requests_total",
        "bungate_request_duration_seconds_bucket",
        "bungate_workers_total",
        "bungate_workers_restarts_total",
        "bungate_workers_crashed_total",
        "bungate_circuit_state",
    } <= registered_metrics


def test_dashboard_uses_only_registered_metrics(registered_metrics):
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    used = {name for expr in exprs_in_dashboard(dashboard) for name in METRIC.findall(expr)}
    assert used - registered_metrics == set()
    assert {
        "bungate_workers_total",
        "bungate_workers_restarts_total",
        "bungate_workers_crashed_total",
        "bungate_requests_total",
        "bungate_request_duration_seconds_bucket",
        "bungate_upstream_errors_total",
        "bungate_circuit_state",
    } <= used
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]


def test_alerts_use_only_registered_metrics(registered_metrics):
    rules = alert_rules()
    used = {name for rule in rules for name in METRIC.findall(rule["expr"])}
    assert used - registered_metrics == set()
    assert {
        "bungate_workers_total",
        "bungate_workers_crashed_total",
        "bungate_requests_total",
        "bungate_request_duration_seconds_bucket",
        "bungate_upstream_healthy",
    } <= used
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_hpa_comments_use_only_registered_metrics(registered_metrics):
    used = set(METRIC.findall((K8S / "hpa.yaml").read_text()))
    assert used and used - registered_metrics == set()


# --- the control socket, the shared Redis, per-process metrics ---------------------------


def test_the_sample_config_control_socket_is_in_the_units_runtime_directory():
    config = parse_config(yaml.safe_load((DEPLOY / "gateway.yaml").read_text()), "gateway.yaml")
    socket_path = config.cluster.control_socket
    assert socket_path is not None
    service = unit(DEPLOY / "bungate.service")["Service"]
    (runtime,) = service["RuntimeDirectory"]
    assert os.path.dirname(socket_path) == f"/run/{runtime}"
    assert f"/run/{runtime}" in service["ReadWritePaths"][0].split()
    for name in ("Dockerfile", "Dockerfile.pypy"):
        text = (DEPLOY / name).read_text()
        # the images make the directory, for the gateway's (non-root) user
        assert f"mkdir -p /etc/bungate /run/{runtime}" in text, name
        assert f"chown bungate:bungate /run/{runtime}" in text, name


def test_the_configmap_control_socket_is_on_a_writable_volume():
    path = configmap_config().cluster.control_socket
    assert path is not None
    spec = container()
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    deployment = one_yaml(K8S / "deployment.yaml")
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    empty_dirs = {v["name"] for v in volumes if "emptyDir" in v}
    mounts = [m["mountPath"] for m in spec["volumeMounts"] if m["name"] in empty_dirs]
    assert any(os.path.dirname(path) == mount for mount in mounts), (path, mounts)


def test_the_pods_share_one_redis_for_their_rate_limits():
    config = configmap_config()
    assert config.redis.url is not None
    limited = [r for r in config.routes if r.rate_limit]
    assert limited
    for route in limited:
        assert isinstance(route.rate_limit, RateLimitConfig)
        assert route.rate_limit.backend == "redis"
    deployment, service = load_yaml(K8S / "redis.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    url = urlsplit(config.redis.url)
    (port,) = service["spec"]["ports"]
    assert (url.hostname, url.port) == (service["metadata"]["name"], port["port"])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (redis,) = deployment["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in redis["ports"]}
    # bungate's own pods are not selected by the Redis Service, nor Redis by theirs.
    ours = one_yaml(K8S / "service.yaml")["spec"]["selector"]
    assert not ours.items() <= labels.items()


def test_per_process_metrics_in_the_dashboard_and_alerts_are_collected():
    from bungate.ops.procfs import ProcessUsage
    from bungate.ops.resources import ProcessResources

    collector = ProcessResources(lambda: {"1": 1}, read=lambda pid: ProcessUsage(pid, 1, 1.0, 1))
    suffixes = {"counter": "_total", "gauge": ""}
    collected = {family.name + suffixes[family.type] for family in collector.collect()}
    process = re.compile(r"\bprocess_[a-z_]+\b")
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    used = {name for expr in exprs_in_dashboard(dashboard) for name in process.findall(expr)}
    used |= {name for rule in alert_rules() for name in process.findall(rule["expr"])}
    assert used == collected


# --- docs/deploy.md -------------------------------------------------------------------------


def deploy_guide() -> str:
    return (ROOT / "docs" / "deploy.md").read_text()


def shell_lines(text: str) -> Iterator[str]:
    """The commands of the guide's ``sh`` blocks (comments and continuations joined)."""
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                yield line


def bungate_commands(line: str) -> Iterator[list[str]]:
    """The arguments of every ``bungate`` command in a shell line, behind ``sudo -u X``,
    ``docker exec C`` or ``kubectl exec P --``."""
    for part in re.split(r"\|\||&&|;|\|", line):
        words = shlex.split(part)
        if words[:1] == ["sudo"]:
            words = words[3:] if words[1:2] == ["-u"] else words[1:]
        elif words[:2] == ["docker", "exec"]:
            words = words[3:]
        elif words[:2] == ["kubectl", "exec"]:
            words = words[words.index("--") + 1 :] if "--" in words else words[3:]
        if words[:1] == ["bungate"]:
            yield words[1:]


def test_every_bungate_command_in_the_guide_parses():
    from bungate.cli import _parser

    commands = [argv for line in shell_lines(deploy_guide()) for argv in bungate_commands(line)]
    assert len(commands) >= 4
    parser = _parser()
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.command and (args.socket or args.config), argv
    # The table's commands, too (the socket given once above them).
    table = re.findall(r"^\| `bungate ([^`]+)` \|", deploy_guide(), re.MULTILINE)
    assert len(table) == 6
    for command in table:
        assert parser.parse_args(["--socket", "s", *shlex.split(command)]).command


def test_every_twist_bungate_option_in_the_guide_exists():
    from bungate.tap import Options

    known = {f"--{name}" for name, *_ in Options.optParameters + Options.optFlags}
    used = set()
    for line in shell_lines(deploy_guide()):
        for match in re.finditer(r"twist bungate((?: --?[a-z-]+(?:[ =][^ -][^ ]*)?)*)", line):
            used |= set(re.findall(r"--[a-z-]+", match.group(1)))
    assert used and used <= known, used - known


def test_the_guide_links_only_files_that_exist():
    for link in re.findall(r"\]\(([^)#]+)\)", deploy_guide()):
        if "://" not in link:
            assert (ROOT / "docs" / link).exists(), link
