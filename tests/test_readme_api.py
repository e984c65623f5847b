"""The README's "Use runner from your application" runs as written: its files, its commands, its output."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from tests import pg
from tests.conftest import cli_env, wait_exit

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Use runner from your application"


def section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(), re.S)


def python_files() -> dict[str, str]:
    files = {}
    for block in blocks("python"):
        first = block.splitlines()[0]
        assert first.startswith("# ") and first.endswith(".py"), f"a README python block names no file: {first!r}"
        files[first[2:]] = block
    return files


def console_steps() -> tuple[list[str], list[str]]:
    (block,) = blocks("console")
    commands = [line[2:] for line in block.splitlines() if line.startswith("$ ")]
    output = [line for line in block.splitlines() if line and not line.startswith("$ ")]
    return commands, output


async def test_the_readme_application_example_runs_as_written(
    runner_env: dict[str, str], tmp_path: Path, pg_server: pg.TestServer
) -> None:
    files = python_files()
    assert set(files) == {"notes.py", "enqueue_notes.py"}
    for name, source in files.items():
        (tmp_path / name).write_text(source)
    commands, expected_output = console_steps()
    assert commands == ["runner migrate", "runner worker --app notes:app &", "python enqueue_notes.py"]
    # A database of its own, empty (the tests' template also holds the test kinds' tables), and none of
    # the test suite's RUNNER_APP: only what the README sets.
    database = await pg_server.create_empty_database("readme")
    env = {k: v for k, v in cli_env(runner_env).items() if k != "RUNNER_APP"}
    env["RUNNER_DATABASE_URL"] = pg_server.url(database)
    runner = [sys.executable, "-m", "runner"]

    migrate = subprocess.run([*runner, "migrate"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120, stdin=subprocess.DEVNULL)
    assert migrate.returncode == 0, migrate.stderr
    log = tmp_path / "worker.log"
    with open(log, "w") as sink:
        worker = subprocess.Popen([*runner, "worker", "--app", "notes:app"], cwd=tmp_path, env=env, stdout=sink,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        producer = subprocess.run([sys.executable, "enqueue_notes.py"], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert producer.returncode == 0, producer.stderr[-3000:] + log.read_text()[-3000:]
        assert producer.stdout.splitlines() == expected_output
        assert producer.stderr == ""  # no debug line, no warning: a library stays quiet at info
    finally:
        worker.send_signal(signal.SIGTERM)
        assert await wait_exit(worker, 60) == 0, log.read_text()[-3000:]
        await pg_server.drop(database)
