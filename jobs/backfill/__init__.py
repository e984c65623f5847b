"""The backfill job kind (placeholder until it lands)."""

from runner.plugins import Plugin

plugin = Plugin(name="backfill")
