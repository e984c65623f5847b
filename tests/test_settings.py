"""Settings: validation, the pool budget, unknown RUNNER_* names, plugin settings and the embedded home
(pure functions), and the CLI against the test database for what a user sees on stderr."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from runner.config import SettingsError, default_home, load_settings
from runner.config.settings import FOREIGN_VARIABLES, Settings, known_variables, unknown_variables, user_home
from runner.embedded import EmbeddedPostgres
from runner.jobs.consensus.settings import ConsensusSettings
from runner.plugins import load_plugins, plugin_settings
from tests.conftest import run_cli

GITHUB_ACTIONS = {"RUNNER_OS": "Linux", "RUNNER_ARCH": "X64", "RUNNER_TEMP": "/home/runner/work/_temp",
                  "RUNNER_NAME": "GitHub Actions 7", "RUNNER_TOOL_CACHE": "/opt/hostedtoolcache",
                  "RUNNER_WORKSPACE": "/home/runner/work/runner", "RUNNER_ENVIRONMENT": "github-hosted",
                  "RUNNER_DEBUG": "1"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("RUNNER_"):
            monkeypatch.delenv(key)


@pytest.mark.parametrize(
    ("replicas", "expected"),
    [(1, 20), (5, 15), (20, 3)],
)
def test_pool_budget_derived_from_max_connections_and_replicas(replicas: int, expected: int) -> None:
    budget = Settings(worker_replicas=replicas).pool_budget()
    assert budget.derived
    assert budget.max_size == expected
    assert budget.worker_replicas == replicas and budget.db_max_connections == 100


def test_explicit_pool_max_wins() -> None:
    budget = Settings(pool_max_size=7, pool_min_size=1).pool_budget()
    assert (budget.min_size, budget.max_size, budget.derived) == (1, 7, False)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RUNNER_POOL_MAX_SIZE": "0"}, "RUNNER_POOL_MAX_SIZE"),
        ({"RUNNER_CONCURRENCY": "-3"}, "RUNNER_CONCURRENCY"),
        ({"RUNNER_LEASE_TIMEOUT": "abc"}, "RUNNER_LEASE_TIMEOUT"),
        ({"RUNNER_LEASE_TIMEOUT": "2"}, "RUNNER_LEASE_TIMEOUT"),
        ({"RUNNER_DB_MAX_CONNECTIONS": "10", "RUNNER_WORKER_REPLICAS": "8"}, "RUNNER_DB_MAX_CONNECTIONS"),
        ({"RUNNER_LEASE_TIMOUT": "20", "RUNNER_STRICT_SETTINGS": "true"}, "RUNNER_LEASE_TIMEOUT"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    message = str(error.value)
    assert named in message and "\n" not in message


def test_queues_from_comma_separated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_QUEUES", "a, b")
    assert load_settings().queues == ["a", "b"]


def test_redaction_of_dsn_passwords_and_keys() -> None:
    from runner.logs import redact

    text = redact("postgresql://app:s3cret@db:5432/x password=hunter2 key 0x" + "ab" * 32)
    assert "s3cret" not in text and "hunter2" not in text and "ab" * 32 not in text
    assert "postgresql://app:***@db:5432/x" in text


# --- unknown RUNNER_* names ----------------------------------------------------------------------------
def test_ci_variables_are_ignored_and_no_near_miss(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    for key, value in GITHUB_ACTIONS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RUNNER_STRICT_SETTINGS", "true")  # never reported, even when strict
    with caplog.at_level(logging.WARNING, logger="runner.config"):
        load_settings(plugin_settings=plugin_settings(load_plugins()))
    assert caplog.records == []
    # the foreign list is a guard, not what keeps them quiet today: none is a near miss of a setting
    env = {key: "x" for key in FOREIGN_VARIABLES}
    assert {name: likely for name, likely in unknown_variables([ConsensusSettings], env) if likely} == {}


def test_near_miss_warns_naming_the_setting_and_keeps_going(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("RUNNER_CONCURENCY", "5")
    monkeypatch.setenv("RUNNER_SOMETHING_ELSE_ENTIRELY", "1")  # not a near miss: ignored silently
    with caplog.at_level(logging.WARNING, logger="runner.config"):
        settings = load_settings()
    assert settings.concurrency == 200  # the typo sets nothing
    assert [r.getMessage() for r in caplog.records] == [
        "RUNNER_CONCURENCY is not a setting; did you mean RUNNER_CONCURRENCY?"
    ]


def test_strict_settings_makes_any_unknown_name_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_STRICT_SETTINGS", "true")
    monkeypatch.setenv("RUNNER_SOMETHING_ELSE_ENTIRELY", "1")
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert str(error.value) == "RUNNER_SOMETHING_ELSE_ENTIRELY is not a setting (RUNNER_STRICT_SETTINGS is true)"


def test_plugin_settings_are_known_to_the_typo_check(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    classes = plugin_settings(load_plugins())
    assert ConsensusSettings in classes  # declared by the consensus plugin (Plugin.settings)
    assert "RUNNER_CONSENSUS_FINALITY_WINDOW" in known_variables(classes)
    assert "RUNNER_CONSENSUS_FINALITY_WINDOW" not in known_variables()  # the core knows no consensus name
    monkeypatch.setenv("RUNNER_CONSENSUS_ENABLED", "false")
    monkeypatch.setenv("RUNNER_CONSENSUS_FINALITY_WINDOW", "0.5")
    monkeypatch.setenv("RUNNER_CONSENSUS_VALIDATRS", "3")
    with caplog.at_level(logging.WARNING, logger="runner.config"):
        settings = load_settings(plugin_settings=classes)
    assert [r.getMessage() for r in caplog.records] == [
        "RUNNER_CONSENSUS_VALIDATRS is not a setting; did you mean RUNNER_CONSENSUS_VALIDATORS?"
    ]
    consensus = settings.plugin_settings(ConsensusSettings)
    assert (consensus.enabled, consensus.finality_window, consensus.validators) == (False, 0.5, 5)
    monkeypatch.setenv("RUNNER_CONSENSUS_FINALITY_WINDOW", "9")  # validated once: load_settings kept them
    assert settings.plugin_settings(ConsensusSettings) is consensus


@pytest.mark.parametrize(
    ("name", "value"),
    [("RUNNER_CONSENSUS_VALIDATORS", "0"), ("RUNNER_CONSENSUS_DISAGREE_RATE", "2"),
     ("RUNNER_CONSENSUS_TX_STUCK_AFTER", "soon"), ("RUNNER_BACKFILL_CHUNKS_PER_WORKER", "0")],
)
def test_bad_plugin_value_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    load_settings()  # without the plugin's class its values are not read
    with pytest.raises(SettingsError) as error:
        load_settings(plugin_settings=plugin_settings(load_plugins()))
    message = str(error.value)
    assert message.startswith(f"{name}: ") and "\n" not in message


# --- the CLI: what a user sees ---------------------------------------------------------------------------
def test_status_runs_under_github_actions_variables(runner_env: dict[str, str]) -> None:
    result = run_cli(runner_env, "status", **GITHUB_ACTIONS)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_status_warns_about_a_near_miss_and_still_runs(runner_env: dict[str, str]) -> None:
    result = run_cli(runner_env, "status", RUNNER_CONCURENCY="5", RUNNER_OS="Linux")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "warning: RUNNER_CONCURENCY is not a setting; did you mean RUNNER_CONCURRENCY?"
    ]


def test_status_with_strict_settings_exits_2_with_one_line(runner_env: dict[str, str]) -> None:
    result = run_cli(runner_env, "status", RUNNER_CONCURENCY="5", RUNNER_STRICT_SETTINGS="true")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: RUNNER_CONCURENCY is not a setting (RUNNER_STRICT_SETTINGS is true); did you mean "
        "RUNNER_CONCURRENCY?"
    ]


def test_status_knows_the_plugins_settings(runner_env: dict[str, str]) -> None:
    """The CLI passes the loaded plugins' classes: RUNNER_CONSENSUS_* pass strict mode, a typo of one warns,
    a bad value is one line and exit 2."""
    ok = run_cli(runner_env, "status", RUNNER_STRICT_SETTINGS="true", RUNNER_CONSENSUS_FINALITY_WINDOW="1",
                 **GITHUB_ACTIONS)
    assert ok.returncode == 0, ok.stderr
    typo = run_cli(runner_env, "status", RUNNER_CONSENSUS_VALIDATRS="3")
    assert typo.returncode == 0, typo.stderr
    assert typo.stderr.splitlines() == [
        "warning: RUNNER_CONSENSUS_VALIDATRS is not a setting; did you mean RUNNER_CONSENSUS_VALIDATORS?"
    ]
    bad = run_cli(runner_env, "status", RUNNER_CONSENSUS_VALIDATORS="0")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == ["error: RUNNER_CONSENSUS_VALIDATORS: Input should be greater than 0"]


# --- the embedded home -------------------------------------------------------------------------------------
def test_home_is_the_nearest_project_runner_folder_from_any_subfolder(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / ".runner").mkdir(parents=True)
    (project / "src" / "deep").mkdir(parents=True)
    (project / "docs").mkdir()
    homes = {default_home(project / "src" / "deep", {}), default_home(project / "docs", {}), default_home(project, {})}
    assert homes == {(project / ".runner").resolve()}
    # a nested project with its own .runner/ is its own; a .runner *file* (a CI runner's config) is not a home
    inner = project / "src" / "inner"
    (inner / ".runner").mkdir(parents=True)
    assert default_home(inner, {}) == (inner / ".runner").resolve()
    (project / "docs" / "ci").mkdir()
    (project / "docs" / "ci" / ".runner").write_text("{}")
    assert default_home(project / "docs" / "ci", {}) == (project / ".runner").resolve()


def test_home_without_a_project_is_the_per_user_data_dir(tmp_path: Path) -> None:
    here, there = tmp_path / "one", tmp_path / "two" / "three"
    here.mkdir()
    there.mkdir(parents=True)
    assert not any((folder / ".runner").is_dir() for folder in (tmp_path, *tmp_path.parents))
    xdg = {"XDG_DATA_HOME": str(tmp_path / "data"), "HOME": str(tmp_path / "user")}
    assert default_home(here, xdg) == default_home(there, xdg) == tmp_path / "data" / "runner"
    no_xdg = {"HOME": str(tmp_path / "user"), "XDG_DATA_HOME": "relative/ignored"}
    expected = Path("/var/lib/runner") if os.geteuid() == 0 else tmp_path / "user" / ".local" / "share" / "runner"
    assert default_home(here, no_xdg) == default_home(there, no_xdg) == user_home(no_xdg) == expected


def test_explicit_runner_home_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".runner").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_settings().home == tmp_path.resolve() / ".runner"
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "elsewhere"))
    assert load_settings().home == tmp_path / "elsewhere"


@pytest.fixture
def open_project() -> Iterator[Path]:
    """A project folder the embedded server's unprivileged user can enter (pytest's tmp dirs are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="runner-home-"))
    root.chmod(0o755)
    (root / ".runner").mkdir()
    try:
        yield root
    finally:
        try:
            EmbeddedPostgres(root / ".runner").stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


async def test_db_commands_from_two_folders_reach_one_server(open_project: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}  # RUNNER_HOME unset

    def runner(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
        cwd.mkdir(parents=True, exist_ok=True)
        return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)

    started = runner(open_project / "src", "db", "start")
    assert started.returncode == 0, started.stderr
    url = runner(open_project / "docs" / "deep", "db", "url")
    assert url.returncode == 0, url.stderr
    assert url.stdout.strip() == started.stdout.strip()
    assert str(open_project / ".runner") in url.stderr  # `runner db url` says where the server lives
    connection = await asyncpg.connect(url.stdout.strip())
    try:
        assert await connection.fetchval("SELECT current_database()") == "runner"
    finally:
        await connection.close()
