"""`runner demo` (placeholder until it lands)."""

from runner.plugins import Plugin

plugin = Plugin(name="operate")
