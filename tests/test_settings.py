"""Unit tests of settings validation and the pool budget (pure functions, no database)."""

from __future__ import annotations

import pytest

from runner.config import SettingsError, load_settings
from runner.config.settings import Settings


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
        ({"RUNNER_LEASE_TIMOUT": "20"}, "RUNNER_LEASE_TIMOUT"),
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
