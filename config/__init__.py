"""Typed settings for runner, read from ``RUNNER_*`` environment variables."""

from runner.config.settings import PoolBudget, Settings, SettingsError, default_home, load_settings

__all__ = ["PoolBudget", "Settings", "SettingsError", "default_home", "load_settings"]
