"""Packaging and deployment files: the wheel works in a clean venv; the Dockerfile, compose and k8s files are
consistent with the code (no Docker engine runs here, so these are read, not built)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from runner.config import Settings
from runner.migrate import head_revision
from runner.plugins import load_plugins
from tests import pg

ROOT = Path(__file__).resolve().parent.parent
# What the Docker build context copies; the wheel is built from exactly this (like the image's first stage).
BUILD_INPUTS = ("pyproject.toml", "README.md", "config", "runner", "jobs")
SETTINGS_FIELDS = {f"RUNNER_{name.upper()}" for name in Settings.model_fields}
FREE_FORM = ("RUNNER_SOURCE_", "RUNNER_TEST_", "RUNNER_BENCH_")
INSTALL_TIMEOUT_S = 600


def clean_env(**extra: str) -> dict[str, str]:
    """No RUNNER_*, no PYTHONPATH, no venv of ours on PATH: only what a fresh shell would have."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("RUNNER_", "PYTHON", "VIRTUAL_ENV", "PIP_REQUIRE"))}
    keep["PATH"] = os.pathsep.join(p for p in keep.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return {**keep, **extra}


def run(argv: list[str], cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{output}"
    return result


def tracked_package_files() -> set[str]:
    """Package files as the wheel names them: config/ and jobs/ are installed as runner/config, runner/jobs."""
    listed = subprocess.run(["git", "ls-files", "runner", "jobs", "config"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    linked = {"runner/config", "runner/jobs"}  # the links themselves; their targets are listed as config/, jobs/
    return {name if name.startswith("runner/") else f"runner/{name}"
            for name in listed if "__pycache__" not in name and name not in linked}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("context")
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(source)], cwd=source,
        timeout=INSTALL_TIMEOUT_S)
    (built,) = out.glob("runner_pg-*.whl")
    return built


def test_wheel_holds_every_package_file(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = sorted(tracked_package_files() - names)
    assert not missing, f"files in git but not in the wheel (package data or __init__.py missing?): {missing}"
    metadata = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        entry_points = archive.read(metadata).decode()
    assert "runner = runner._entry:main" in entry_points
    for plugin in ("builtins", "backfill", "consensus", "operate"):
        assert re.search(rf"^{plugin} = runner\.jobs\.", entry_points, re.M), plugin


async def test_wheel_in_a_clean_venv_runs_help_and_migrate(
    wheel: Path, tmp_path: Path, pg_server: pg.TestServer
) -> None:
    venv = tmp_path / "venv"
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    run([python, "-m", "venv", str(venv)], cwd=tmp_path)
    run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-compile", "--only-binary", ":all:", str(wheel)],
        cwd=tmp_path, timeout=INSTALL_TIMEOUT_S)
    runner = str(venv / "bin" / "runner")

    python_in_venv = str(venv / "bin" / "python")
    where = run([python_in_venv, "-c", "import runner.config, runner.jobs; print(runner.config.__file__, "
                 "runner.jobs.__file__)"], cwd=tmp_path).stdout
    assert all(path.startswith(str(venv)) for path in where.split()), where  # the wheel, not the checkout
    for top_level in ("config", "jobs"):  # nothing of runner's shadows an application's own module
        absent = subprocess.run([python_in_venv, "-c", f"import {top_level}"], cwd=tmp_path, env=clean_env(),
                                capture_output=True, text=True)
        assert absent.returncode != 0 and "No module named" in absent.stderr, absent

    help_text = run([runner, "--help"], cwd=tmp_path).stdout
    for command in ("migrate", "worker", "enqueue", "status", "demo"):
        assert re.search(rf"│ {command}\s", help_text), f"{command!r} missing from runner --help:\n{help_text}"

    database = await pg_server.create_empty_database("pkg")
    url = pg_server.url(database)
    try:
        for _ in range(2):  # idempotent
            run([runner, "migrate"], cwd=tmp_path, RUNNER_DATABASE_URL=url, RUNNER_HOME=str(tmp_path / "home"))
        connection = await asyncpg.connect(url)
        try:
            version = await connection.fetchval("SELECT version_num FROM alembic_version")
            tables = {r["tablename"] for r in await connection.fetch("SELECT tablename FROM pg_tables")}
        finally:
            await connection.close()
        assert version == head_revision(load_plugins())
        assert {"runner_jobs", "runner_workers"} <= tables
    finally:
        await pg_server.drop(database)


# --- Dockerfile ----------------------------------------------------------------------------------------
def dockerfile_stages() -> list[list[tuple[str, str]]]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, rest.strip()))
    return stages


def dockerfile_stages_args() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    return [("ARG", line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("ARG ")]


def test_dockerfile_final_stage_is_slim_non_root_with_healthcheck() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build the wheel, then the runtime"
    final = stages[-1]
    args = dict(line.split("=", 1) for kind, line in dockerfile_stages_args() if "=" in line)
    base = final[0][1].split()[0].replace("${PYTHON_VERSION}", args.get("PYTHON_VERSION", ""))
    assert base == "python:3.12-slim"

    users = [rest for kind, rest in final if kind == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]

    health = [rest for kind, rest in final if kind == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0] and "CMD" in health[0]
    assert ("ENTRYPOINT", '["runner"]') in final
    assert ("CMD", '["worker"]') in final
    assert ("STOPSIGNAL", "SIGTERM") in final
    env = " ".join(rest for kind, rest in final if kind == "ENV")
    assert "RUNNER_HTTP_HOST=0.0.0.0" in env
    runtime_runs = " ".join(rest for kind, rest in final if kind == "RUN")
    for tool in ("build-essential", "gcc", "apt-get install"):
        assert tool not in runtime_runs, f"the runtime stage installs {tool}"
    # the variables the image sets are real settings (an unknown RUNNER_* stops the worker)
    for name in re.findall(r"\b(RUNNER_[A-Z0-9_]+)=", env):
        assert name in SETTINGS_FIELDS, name


def test_docker_context_has_what_the_build_copies() -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for needed in BUILD_INPUTS:
        assert needed not in ignored, f".dockerignore drops {needed}, which the build copies"
    for heavy in (".venv", ".git", ".runner", "node_modules"):
        assert heavy in ignored, f".dockerignore should drop {heavy}"
    copied = [rest for stage in dockerfile_stages() for kind, rest in stage if kind == "COPY" and "--from" not in rest]
    sources = {word for rest in copied for word in rest.split()[:-1]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= sources, f"packages the wheel needs but the image does not copy: {packages - sources}"
    assert {"pyproject.toml", "README.md"} <= sources


# --- compose ------------------------------------------------------------------------------------------
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def runner_names(environment: dict[str, Any]) -> set[str]:
    return {k for k in environment if k.startswith("RUNNER_") and not k.startswith(FREE_FORM)}


def test_compose_parses_and_names_the_services() -> None:
    services = compose()["services"]
    assert {"postgres", "anvil", "migrate", "worker", "pgbouncer", "worker-pgbouncer", "prometheus"} <= set(services)
    assert "healthcheck" in services["postgres"]
    assert "anvil" in " ".join(services["anvil"].get("entrypoint", []) + services["anvil"].get("command", []))
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    worker = services["worker"]
    assert worker["command"] == ["worker"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "ports" not in worker, "a fixed host port stops --scale worker=N"
    assert "container_name" not in worker
    assert services["pgbouncer"]["profiles"] == ["pgbouncer"]
    assert services["prometheus"]["profiles"] == ["prometheus"]


def test_compose_workers_are_consistent_with_the_settings() -> None:
    services = compose()["services"]
    grace = int(Settings(database_url="postgresql://x@h/db").shutdown_grace)
    for name in ("worker", "worker-pgbouncer", "migrate"):
        environment = services[name]["environment"]
        unknown = runner_names(environment) - SETTINGS_FIELDS
        assert not unknown, f"{name}: unknown settings would stop the process: {unknown}"
    for name in ("worker", "worker-pgbouncer"):
        service = services[name]
        environment = service["environment"]
        # the replica count and the pool budget's replica count come from one variable
        assert environment["RUNNER_WORKER_REPLICAS"] == service["deploy"]["replicas"] == "${WORKER_REPLICAS:-2}"
        shutdown_grace = float(environment.get("RUNNER_SHUTDOWN_GRACE", grace))
        assert int(service["stop_grace_period"].rstrip("s")) >= shutdown_grace + 15
        assert service["stop_signal"] == "SIGTERM"
        assert "ports" not in service
    behind = services["worker-pgbouncer"]["environment"]
    assert "@pgbouncer:6432/" in behind["RUNNER_DATABASE_URL"]
    assert "@postgres:5432/" in behind["RUNNER_LISTEN_DATABASE_URL"]
    assert behind["RUNNER_STATEMENT_CACHE_SIZE"] == "0"
    assert "@postgres:5432/" in services["migrate"]["environment"]["RUNNER_DATABASE_URL"]
    ini = (ROOT / "deploy" / "pgbouncer" / "pgbouncer.ini").read_text()
    assert re.search(r"^pool_mode = transaction$", ini, re.M)
    assert re.search(r"^ignore_startup_parameters = .*statement_timeout", ini, re.M)
    client_conn = re.search(r"^max_client_conn = (\d+)$", ini, re.M)
    assert client_conn and behind["RUNNER_DB_MAX_CONNECTIONS"] == client_conn.group(1)
    postgres_max = re.search(r"max_connections=(\d+)", " ".join(services["postgres"]["command"]))
    assert postgres_max and services["worker"]["environment"]["RUNNER_DB_MAX_CONNECTIONS"] == postgres_max.group(1)


# --- Kubernetes and alerts ----------------------------------------------------------------------------
def k8s(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((ROOT / "deploy" / "k8s" / name).read_text()) if doc]


def test_k8s_deployment_probes_resources_and_grace() -> None:
    (deployment,) = k8s("deployment.yaml")
    (config,) = k8s("configmap.yaml")
    (secret,) = k8s("secret.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    settings = config["data"]
    assert pod["terminationGracePeriodSeconds"] >= float(settings["RUNNER_SHUTDOWN_GRACE"]) + 15
    assert settings["RUNNER_HTTP_HOST"] == "0.0.0.0"
    assert container["ports"][0]["containerPort"] == int(settings["RUNNER_HTTP_PORT"])
    assert secret["kind"] == "Secret" and "RUNNER_DATABASE_URL" in secret["stringData"]
    for names in (settings, secret["stringData"]):
        unknown = runner_names(names) - SETTINGS_FIELDS
        assert not unknown, f"unknown settings would stop the worker: {unknown}"
    # the configured pool budget must be one the worker accepts
    Settings(database_url="postgresql://x@h/db", db_max_connections=int(settings["RUNNER_DB_MAX_CONNECTIONS"]),
             worker_replicas=int(settings["RUNNER_WORKER_REPLICAS"])).pool_budget()


def test_keda_scales_on_runnable_jobs_within_the_pool_budget() -> None:
    scaled, auth = k8s("scaledobject.yaml")
    (config,) = k8s("configmap.yaml")
    assert scaled["kind"] == "ScaledObject" and auth["kind"] == "TriggerAuthentication"
    assert scaled["spec"]["scaleTargetRef"]["name"] == k8s("deployment.yaml")[0]["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    query = " ".join(trigger["metadata"]["query"].split())
    assert "FROM runner_jobs" in query and "status = 'pending'" in query and "run_at <= now()" in query
    assert int(trigger["metadata"]["targetQueryValue"]) > 0
    assert scaled["spec"]["maxReplicaCount"] == int(config["data"]["RUNNER_WORKER_REPLICAS"])
    assert auth["spec"]["secretTargetRef"][0]["name"] == k8s("secret.yaml")[0]["metadata"]["name"]


async def test_keda_query_runs_against_the_schema(conn: asyncpg.Connection) -> None:
    scaled, _auth = k8s("scaledobject.yaml")
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    await conn.execute(
        "INSERT INTO runner_jobs (kind, status, run_at) VALUES ('noop', 'pending', now() - interval '1 s'), "
        "('noop', 'pending', now() + interval '1 h'), ('noop', 'running', now()), ('noop', 'succeeded', now())")
    assert await conn.fetchval(query) == 2  # due pending + running; not the delayed one, not the finished one


def test_alert_rules_cover_the_issue_and_match_the_operator_copy() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    (operator_rule,) = k8s("prometheusrule.yaml")
    assert operator_rule["kind"] == "PrometheusRule"
    assert operator_rule["spec"] == rules, "deploy/k8s/prometheusrule.yaml drifted from deploy/prometheus/alerts.yml"
    by_name = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    pool = by_name["RunnerPoolNearlyExhausted"]
    assert "runner_pool_in_use" in pool["expr"] and "runner_pool_max" in pool["expr"] and "> 0.8" in pool["expr"]
    assert pool["for"] == "5m"
    assert "runner_pool_give_ups_total" in by_name["RunnerPoolGaveUp"]["expr"]
    assert "runner_heartbeat_lag_seconds" in by_name["RunnerHeartbeatLagging"]["expr"]
    assert "runner_consensus_nonfinal_age_window_ratio" in by_name["RunnerConsensusTransactionStuck"]["expr"]
    # every runner_* series an alert uses is one the worker exports
    from runner import metrics

    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name")}  # type: ignore[attr-defined]
    for rule in by_name.values():
        for series in re.findall(r"\b(runner_[a-z_]+)", rule["expr"]):
            assert series.removesuffix("_total") in exported, f"{rule['alert']} uses unknown series {series}"
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert scrape["scrape_configs"][0]["dns_sd_configs"][0]["port"] == 9187
