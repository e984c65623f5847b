"""The backfill plugin's settings: ``RUNNER_BACKFILL_*`` (the engine knows none of them), validated at start
with the core settings (``Plugin.settings``) and read with :func:`backfill_settings`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from runner.app import App

ENV_PREFIX = "RUNNER_BACKFILL_"


class BackfillSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", allow_inf_nan=False)

    # Chunks of parallel backfills one worker runs at once; the rest wait for a worker with room, so a
    # --parallel 8 over 4 replicas at 2 each runs on all four. Each chunk holds up to two connections and
    # four batches (at most 4 x --batch-bytes) while it runs.
    chunks_per_worker: int = Field(4, gt=0, le=1_000)


def backfill_settings(app: App) -> BackfillSettings:
    return app.settings.plugin_settings(BackfillSettings)
