"""The consensus plugin's settings: ``RUNNER_CONSENSUS_*`` (the engine knows none of them).

Given to ``load_settings(plugin_settings=...)`` (the CLI does, through ``Plugin.settings``) they are
validated at start with the core settings and known to the typo check; the consensus code reads them
with :func:`consensus_settings`, once per App.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from runner.app import App
    from runner.config import Settings

ENV_PREFIX = "RUNNER_CONSENSUS_"
_RESOURCE = "consensus.settings"
MIN_S = 0.001
MAX_S = 365 * 24 * 3600.0


class ConsensusSettings(BaseSettings):
    # Finite values only, and bounded: each duration becomes a timestamp interval or a timer.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", allow_inf_nan=False)

    enabled: bool = True  # run the consensus loops in `runner worker`
    concurrency: int = Field(8, gt=0, le=10_000)  # transactions in the state machine at once (one per contract)
    validators: int = Field(5, gt=0, le=1_000)  # validators per transaction (plus one leader)
    disagree_rate: float = Field(0.0, ge=0, le=1)  # probability each validator disagrees (testing)
    leader_timeout: float = Field(10.0, ge=MIN_S, le=MAX_S)
    validator_timeout: float = Field(10.0, ge=MIN_S, le=MAX_S)
    finality_window: float = Field(5.0, ge=0, le=MAX_S)  # seconds a decided transaction waits before finality
    tx_stuck_after: float = Field(60.0, ge=MIN_S, le=MAX_S)  # no progress for this long: cancelled and recovered
    # no majority: up to this many validators that have not led the transaction yet propose again
    # (LeaderRotated), then it is UNDETERMINED; at most `validators` (each node leads once at most)
    rotations: int = Field(3, ge=0, le=1_000)

    @model_validator(mode="after")
    def _rotations_fit(self) -> ConsensusSettings:
        if self.rotations > self.validators:
            raise ValueError(f"rotations ({self.rotations}) cannot exceed validators ({self.validators}): "
                             "a rotation never repeats a leader")
        return self


def from_settings(settings: Settings) -> ConsensusSettings:
    """Those validated with ``settings`` by load_settings, else read from the environment now.
    Raises SettingsError (one line naming the variable) on a bad value."""
    return settings.plugin_settings(ConsensusSettings)


def consensus_settings(app: App) -> ConsensusSettings:
    """The consensus settings of this App, validated once and kept in ``app.resources``."""
    cached = app.resources.get(_RESOURCE)
    if isinstance(cached, ConsensusSettings):
        return cached
    from runner.config import SettingsError
    from runner.errors import UsageError

    try:
        found = from_settings(app.settings)
    except SettingsError as error:
        raise UsageError(str(error)) from None  # one line and exit 2 from the CLI, as at start-up
    app.resources[_RESOURCE] = found
    return found


def turn_off(app: App) -> None:
    """Consensus off for this App (no chain to run on): no loops, no warning about them, and --drain does
    not wait for consensus work."""
    app.resources[_RESOURCE] = consensus_settings(app).model_copy(update={"enabled": False})
