"""The ``runner`` command's entry point: the CLI and its plugins are imported with the cyclic garbage
collector paused (the import makes ~10% of start-up otherwise go to collections that free nothing)."""

from __future__ import annotations

import gc


def main() -> None:
    gc.disable()
    try:
        from runner.cli import load_cli

        command = load_cli()
    finally:
        gc.enable()
    command()
