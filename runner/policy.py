"""Per-kind run policy: how long an attempt may run, how many attempts, how long between them."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before retry n (n attempts used so far): min(max_s, base_s x 2^n), with +/- jitter."""

    base_s: float
    max_s: float
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.max_s < 0 or not 0 <= self.jitter < 1:
            raise ValueError(f"invalid backoff {self!r}: delays must be >= 0 and jitter in [0, 1)")

    def delay_s(self, attempts_used: int) -> float:
        # 2 ** n grows past float range after ~1000 attempts; the cap applies long before.
        raw = self.max_s if attempts_used >= 64 else min(self.max_s, self.base_s * 2**attempts_used)
        return raw * random.uniform(1 - self.jitter, 1 + self.jitter)
