"""Validators as data: the table's rows, their signing keys, and the stake-weighted draw of each run.

A row of ``runner_consensus_validators`` is (address, stake, key reference). The reference says where the
worker finds the private key; the key itself is never stored, logged or printed:

* ``env:NAME``  the hex key in the environment variable NAME (a Kubernetes or compose secret),
* ``file:PATH`` the hex key in a file (a mounted secret),
* ``dev:N``     account N of anvil's and hardhat's public development mnemonic (tests and demos only),
* none          the validator signs nothing: the worker's own key sends its votes in its batches.

The draw: every run of a transaction (its first round, and each re-run after an appeal) orders all
validators by weighted sampling without replacement (Efraimidis-Spirakis: the smallest ``-ln(u) / stake``
first), ``u`` hashed from the run's seed and the address. The seed is ``keccak(hash, run round)``, recorded
on the transaction with the committee, so anyone holding the table can recompute the draw, and a worker
taking a recovered run back draws the same committee. The first ``validators + 1`` of the order are the
committee: its first member leads, each leader rotation the next one; appeals take the validators after
the committee, in order (new to the transaction).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_hash.auto import keccak

from runner.errors import UsageError
from runner.jobs.consensus.model import address_of_key, node_addresses

DEV_MNEMONIC = "test test test test test test test test test test test junk"  # anvil's and hardhat's, public
SYNTHETIC_POOL = 64  # an empty table: this many unkeyed nodes of equal stake (the demo, and the default)
MAX_STAKE = 10**18
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEX_KEY = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class Validator:
    address: str
    stake: int
    key_ref: str | None = None


def check_key_ref(key_ref: str) -> str:
    """The reference, checked for shape (not resolved); UsageError naming what is wrong."""
    scheme, _, rest = key_ref.partition(":")
    if scheme == "env" and _ENV_NAME.match(rest):
        return key_ref
    if scheme == "file" and rest:
        return key_ref
    if scheme == "dev" and rest.isdigit() and int(rest) < 1000:
        return key_ref
    raise UsageError(f"key reference {key_ref!r}: expected env:NAME, file:PATH or dev:N (0-999)")


def _dev_key(index: int) -> str:
    from eth_account import Account

    Account.enable_unaudited_hdwallet_features()
    account = Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}")
    return "0x" + bytes(account.key).hex()


def resolve_key(key_ref: str, environ: Mapping[str, str] | None = None) -> str:
    """The private key (hex) a reference points at. Errors name the reference, never a key."""
    scheme, _, rest = check_key_ref(key_ref).partition(":")
    if scheme == "dev":
        return _dev_key(int(rest))
    if scheme == "env":
        value = (os.environ if environ is None else environ).get(rest)
        if value is None:
            raise UsageError(f"key reference {key_ref}: the environment variable {rest} is not set")
        where = f"the environment variable {rest}"
    else:
        try:
            value = Path(rest).read_text()
        except OSError as error:
            raise UsageError(f"key reference {key_ref}: cannot read the file ({error.strerror})") from None
        where = f"the file {rest}"
    value = value.strip()
    if not _HEX_KEY.match(value):
        raise UsageError(f"key reference {key_ref}: {where} does not hold a private key (64 hex digits)")
    key = "0x" + value.removeprefix("0x").lower()
    if int(key, 16) == 0 or int(key, 16) >= 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141:
        raise UsageError(f"key reference {key_ref}: {where} does not hold a valid secp256k1 private key")
    return key


def key_address(key_ref: str) -> str:
    return address_of_key(resolve_key(key_ref))


def synthetic_validators() -> list[Validator]:
    return [Validator(a, 1) for a in node_addresses(0, SYNTHETIC_POOL)]


def draw_seed(tx_hash: str, run_round: int) -> str:
    return "0x" + keccak(f"runner-consensus-draw:{tx_hash.lower()}:{run_round}".encode()).hex()


def _priority(seed: bytes, validator: Validator) -> tuple[float, str]:
    # u in (0, 1] from the top 53 bits of keccak(seed, address): exact in a double on every platform
    u = ((int.from_bytes(keccak(seed + bytes.fromhex(validator.address[2:])), "big") >> 203) + 1) / 2**53
    return -math.log(u) / validator.stake, validator.address


def draw_order(validators: Sequence[Validator], seed: str, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Every validator not excluded, in the order a stake-weighted draw without replacement takes them."""
    raw = bytes.fromhex(seed.removeprefix("0x"))
    ranked = sorted((_priority(raw, v), v.address) for v in validators if v.address not in exclude)
    return [address for _, address in ranked]


@dataclass(frozen=True)
class Draw:
    """One run's committee: ``order[:size]`` (leader first, then one more leader per rotation) and the
    appeal validators after it."""

    seed: str
    run_round: int
    order: tuple[str, ...]
    size: int
    excluded: tuple[str, ...] = ()

    @property
    def committee(self) -> list[str]:
        return list(self.order[:self.size])

    def leader(self, rotation: int) -> str:
        return self.order[min(rotation, self.size - 1)]

    def validators(self, rotation: int) -> list[str]:
        leader = self.leader(rotation)
        return [a for a in self.committee if a != leader]

    def appeal(self, number: int, growth: Callable[[int], int]) -> list[str]:
        """The validators of appeal ``number`` (0: the first): the next ones in the draw's order; fewer
        (or none) when the table runs out."""
        start = self.size + sum(growth(k) for k in range(number))
        return list(self.order[start:start + growth(number)])

    def record(self, stakes: Mapping[str, int]) -> dict[str, Any]:
        """What the transaction row keeps: enough to recompute and check the draw."""
        return {"seed": self.seed, "run_round": self.run_round, "committee": self.committee,
                "stakes": {a: stakes[a] for a in self.committee}, "excluded": list(self.excluded)}


def draw(validators: Sequence[Validator], tx_hash: str, run_round: int, size: int,
         exclude: frozenset[str] = frozenset()) -> Draw:
    seed = draw_seed(tx_hash, run_round)
    order = draw_order(validators, seed, exclude)
    if len(order) < 2:
        raise UsageError(f"only {len(order)} validator(s) to draw from for {tx_hash[:10]}: a run needs a "
                         "leader and a validator")
    return Draw(seed, run_round, tuple(order), min(size, len(order)), tuple(sorted(exclude)))
