"""The ``runner`` command's entry point: the CLI and its plugins are imported with the cyclic garbage
collector paused (the import makes ~10% of start-up otherwise go to collections that free nothing).

Typer runs in non-standalone mode so that its own usage errors (a bad option, an id that is not a
number) are one ``error:`` line and exit 2, like runner's, instead of a framework box."""

from __future__ import annotations

import gc
import sys


def main() -> None:
    gc.disable()
    try:
        from runner.cli import load_cli

        command = load_cli()
    finally:
        gc.enable()
    from typer.exceptions import Abort, TyperException

    try:
        code = command(standalone_mode=False)
    except TyperException as error:
        from runner.logs import redact

        message = " ".join(error.format_message().split())  # one line, whatever the framework wrote
        if message:  # empty after `runner` alone: the help it printed says it all
            print(f"error: {redact(message)}", file=sys.stderr)
        sys.exit(error.exit_code)
    except Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
