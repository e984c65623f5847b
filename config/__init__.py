"""Typed settings for runner, read from ``RUNNER_*`` environment variables."""

from runner.config.settings import PoolBudget, Settings, SettingsError, load_settings

__all__ = ["PoolBudget", "Settings", "SettingsError", "load_settings"]
