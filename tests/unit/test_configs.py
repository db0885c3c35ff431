"""Deployment configuration is checked by the real tools and against the repository.

- prometheus/prom.yml passes `promtool check config` (which also checks the rule
  file), the rule file passes `promtool check rules`, and the alert unit tests
  pass `promtool test rules`;
- the loopback rendering scripts/run_stack.py makes of prom.yml passes too;
- docker-compose.yml, railway.toml, the Dockerfile and the Grafana provisioning
  parse and only reference files, modules and routes that exist.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.tools import needs

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

needs_promtool_only = needs("promtool")


def needs_promtool(f: Any) -> Any:
    """Calls the real promtool: an integration test (the fast selection needs no promtool)."""
    return pytest.mark.integration(needs_promtool_only(f))


def _run_stack_module() -> Any:
    spec = importlib.util.spec_from_file_location("run_stack", ROOT / "scripts" / "run_stack.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_stack"] = mod
    spec.loader.exec_module(mod)
    return mod


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, check=False)


def _prom_config() -> dict[str, Any]:
    return dict(yaml.safe_load((PROM / "prom.yml").read_text()))


def _with_secret_files(config: dict[str, Any], tmp_path: Path) -> dict[str, Path]:
    """Local stand-ins for every credential file the config names."""
    files: dict[str, Path] = {}

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("credentials_file", "bearer_token_file", "password_file"):
                    p = tmp_path / "secrets" / Path(v).name
                    p.parent.mkdir(exist_ok=True)
                    p.write_text("test-token\n")
                    files[v] = p
                else:
                    visit(v)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(config)
    return files


# ----------------------------------------------------------------- Prometheus


@needs_promtool
def test_promtool_check_config(tmp_path: Path) -> None:
    """prom.yml as shipped (with its secret files present) and its rule file."""
    config = _prom_config()
    files = _with_secret_files(config, tmp_path)
    assert files, "the backend scrape must authenticate with a credentials file"
    text = (PROM / "prom.yml").read_text()
    for original, local in files.items():
        text = text.replace(original, str(local))
    (tmp_path / "prom.yml").write_text(text)
    for rule in config["rule_files"]:
        shutil.copy(PROM / rule, tmp_path / rule)
    result = _promtool("check", "config", str(tmp_path / "prom.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", str(PROM / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_test_rules() -> None:
    result = _promtool("test", "rules", "alerts_test.yml", cwd=PROM / "tests")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_silent_test() -> None:
    alerts = {r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROM / "tests" / "alerts_test.yml").read_text())["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for group in tests:
        for case in group.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    assert alerts - fired == set(), f"alerts never tested firing: {alerts - fired}"
    assert alerts - silent == set(), f"alerts without a negative case: {alerts - silent}"
    required = {"GatewayUpstreamPrometheusDown", "GatewayDataStale", "HighServerErrorRatio",
                "SlowRequestsP95", "ProviderUnavailable", "QueueDepthGrowing",
                "NoActiveWorkers", "VropsCollectionStale"}
    assert required <= alerts


def test_scrape_jobs_and_no_inline_secrets() -> None:
    config = _prom_config()
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    paths = {name: j.get("metrics_path", "/metrics") for name, j in jobs.items()}
    assert paths["backend"] == "/metrics"
    assert paths["gateway"] == "/metrics"
    assert paths["gateway-catalog"] == "/prometheus/metrics/all"
    assert "/vrops/jobs/metrics" in paths.values()
    assert "/vrops/metrics" in paths.values()
    # The catalog job is scraped at the cache TTL (15-30 s): faster only re-reads the cache.
    run_stack = _run_stack_module()
    interval = jobs["gateway-catalog"].get("scrape_interval",
                                           config["global"]["scrape_interval"])
    assert 15 <= run_stack.parse_duration(interval) <= 30
    text = (PROM / "prom.yml").read_text()
    for key in ("bearer_token:", "credentials:", "password:"):
        assert not re.search(rf"^\s*{key}", text, re.M), f"inline secret ({key}) in prom.yml"


def _app_paths() -> set[str]:
    """Paths the app serves: plain routes plus every documented API route."""
    app = importlib.import_module("app.main").create_app()
    paths = {str(r.path) for r in app.routes if getattr(r, "path", None)}
    return paths | set(app.openapi()["paths"])


def test_scrape_paths_are_routes_of_the_app() -> None:
    routes = _app_paths()
    for job in _prom_config()["scrape_configs"]:
        if "api:8000" in str(job.get("static_configs")):
            path = job.get("metrics_path", "/metrics")
            assert path in routes, f"{job['job_name']}: the app has no route {path}"


@needs_promtool
def test_loopback_rendering_passes_promtool(tmp_path: Path) -> None:
    """What scripts/run_stack.py gives the local Prometheus is a valid config too."""
    run_stack = _run_stack_module()
    token = tmp_path / "token"
    token.write_text("t\n")
    rendered = run_stack.render_prometheus_config(
        PROM / "prom.yml", {"api:8000": "127.0.0.1:18000", "backend:8000": "127.0.0.1:18001"},
        PROM, {run_stack.BACKEND_TOKEN_PATH: token}, "2s")
    targets = [t for j in rendered["scrape_configs"] for s in j["static_configs"]
               for t in s["targets"]]
    assert targets and all(t.startswith("127.0.0.1:") for t in targets)
    assert all(Path(f).is_absolute() for f in rendered["rule_files"])
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(rendered))
    result = _promtool("check", "config", str(cfg))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendering_rejects_unknown_targets() -> None:
    run_stack = _run_stack_module()
    with pytest.raises(ValueError, match="no local service"):
        run_stack.render_prometheus_config(PROM / "prom.yml", {}, PROM,
                                           {run_stack.BACKEND_TOKEN_PATH: Path("/dev/null")})


# -------------------------------------------------------------- Compose / Railway


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_compose_services_and_references() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"api", "worker", "beat", "redis", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            assert (context / "Dockerfile").exists(), name
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: volume source {source} missing"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} not on loopback"
        for secret in svc.get("secrets", []):
            assert secret in compose["secrets"], f"{name}: undeclared secret {secret}"
    # Celery commands name the module that defines the Celery app.
    for name in ("worker", "beat"):
        cmd = services[name]["command"]
        module = cmd[cmd.index("-A") + 1]
        assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
    # Prometheus in compose reads the same prom.yml and the secret it names.
    prom_cmd = " ".join(services["prometheus"]["command"])
    assert "--config.file=/etc/prometheus/prom.yml" in prom_cmd
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    creds = re.findall(r"credentials_file:\s*(\S+)", (PROM / "prom.yml").read_text())
    for path in creds:
        assert path.startswith("/run/secrets/")
        assert Path(path).name in services["prometheus"]["secrets"]
    # Targets in prom.yml are compose services.
    for job in _prom_config()["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                assert target.split(":")[0] in services, f"{job['job_name']}: {target}"


def test_compose_environments_differ_only_by_variables() -> None:
    """No per-environment service or file: staging/production come from the environment."""
    compose = _compose()
    text = (ROOT / "docker-compose.yml").read_text()
    assert "staging" not in " ".join(compose["services"])
    assert "production" not in " ".join(compose["services"])
    assert "${PROMETHEUS_URL" in text and "${REDIS_URL" in text


def test_railway_toml() -> None:
    data = tomllib.loads((ROOT / "railway.toml").read_text())
    deploy = data["deploy"]
    assert deploy["healthcheckPath"] == "/health"
    assert deploy["restartPolicyType"] in ("ON_FAILURE", "ALWAYS")
    cmd = deploy["startCommand"]
    assert "gunicorn -c gunicorn.conf.py" in cmd and "app.main:app" in cmd
    assert "0.0.0.0:${PORT" in cmd or "0.0.0.0:$PORT" in cmd
    assert (ROOT / "gunicorn.conf.py").exists()
    assert data["build"]["builder"] == "DOCKERFILE"
    assert (ROOT / data["build"]["dockerfilePath"]).exists()
    assert "/health" in _app_paths()


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"^USER (?!root)\S+", text, re.M), "image must not run as root"
    assert "pip install" in text
    for src in re.findall(r"^COPY (\S+)", text, re.M):
        if not src.startswith("--"):
            assert (ROOT / src).exists() or src == "README.md", f"COPY source {src} missing"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".stack" in ignored and ".env" in ignored


def test_grafana_provisioning() -> None:
    ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["apiVersion"] == 1
    assert [d["type"] for d in ds["datasources"]] == ["prometheus"]
    prov = yaml.safe_load(
        (ROOT / "grafana/provisioning/dashboards/metrics-gateway.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    grafana = _compose()["services"]["grafana"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    assert path in mounted, "dashboard provider path is not where compose mounts the JSON"
    assert list((ROOT / mounted[path]).glob("*.json"))
