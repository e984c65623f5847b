"""The consensus plugin's settings: ``RUNNER_CONSENSUS_*`` (the engine knows none of them).

Given to ``load_settings(plugin_settings=...)`` (the CLI does, through ``Plugin.settings``) they are
validated at start with the core settings and known to the typo check; the consensus code reads them
with :func:`consensus_settings`, once per App.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import Field, field_validator, model_validator
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
    # each appeal that changed nothing shortens the next window: finality_window x factor ^ failed appeals
    appeal_window_factor: float = Field(0.8, gt=0, le=1)
    # validators added by the 1st, 2nd, ... appeal, as terms in n (the validators per transaction): "n+2",
    # "2n", "7"; past the list, its last term again
    appeal_growth: str = "n+2,n+1,2n"

    @field_validator("appeal_growth")
    @classmethod
    def _growth_parses(cls, value: str) -> str:
        growth_terms(value)
        return value

    def appeal_validators(self, appeal: int) -> int:
        """Validators added by appeal number ``appeal`` (0: the first)."""
        terms = growth_terms(self.appeal_growth)
        multiple, constant = terms[min(appeal, len(terms) - 1)]
        return max(1, multiple * self.validators + constant)

    @model_validator(mode="after")
    def _rotations_fit(self) -> ConsensusSettings:
        if self.rotations > self.validators:
            raise ValueError(f"rotations ({self.rotations}) cannot exceed validators ({self.validators}): "
                             "a rotation never repeats a leader")
        return self


_TERM = re.compile(r"^(?:(\d*)\s*\*?\s*n)?\s*(?:([+-]?)\s*(\d+))?$")


def growth_terms(text: str) -> list[tuple[int, int]]:
    """ "n+2,n+1,2n" -> [(1, 2), (1, 1), (2, 0)]: each term is multiple x n + constant."""
    terms = []
    for raw in text.split(","):
        term = raw.strip().replace(" ", "")
        match = _TERM.match(term) if term else None
        if match is None or not (match.group(3) or "n" in term):
            raise ValueError(f"appeal growth term {raw.strip()!r} is not like n+2, n, 2n or 7")
        has_n = "n" in term
        multiple = int(match.group(1) or 1) if has_n else 0
        constant = int(match.group(3) or 0) * (-1 if match.group(2) == "-" else 1)
        if has_n and match.group(3) and not match.group(2):
            raise ValueError(f"appeal growth term {raw.strip()!r} is not like n+2, n, 2n or 7")
        if multiple > 100 or constant > 10_000:
            raise ValueError(f"appeal growth term {raw.strip()!r} is too large")
        terms.append((multiple, constant))
    return terms


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
