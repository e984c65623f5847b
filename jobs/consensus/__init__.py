"""The consensus loops (placeholder until they land)."""

from runner.plugins import Plugin

plugin = Plugin(name="consensus")
