"""Statuses, submission checks, hashing, state patches and the fault-injection flags of consensus."""

from __future__ import annotations

import copy
import json
import math
import secrets
from dataclasses import dataclass
from typing import Any

from eth_hash.auto import keccak

from runner.config import Settings
from runner.errors import UsageError

# This module stays light (no web3, eth_account or eth_utils: together ~1.5 s of imports) because the
# CLI loads it for every command; addresses are checked and checksummed here (EIP-55).
_HEX = frozenset("0123456789abcdefABCDEF")
# = runner.chain.DEV_KEY_NODE / DEV_KEY_IN_PROCESS (public development keys), repeated here so that
# `runner submit` does not import web3 to learn the default sender; a test keeps them equal.
DEV_KEY_NODE = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
DEV_KEY_IN_PROCESS = "0x" + "00" * 31 + "01"


def to_checksum_address(address: str) -> str:
    """EIP-55 checksum of a 0x-prefixed 20-byte hex address (any case in)."""
    body = address.removeprefix("0x").lower()
    if len(body) != 40 or not set(body) <= _HEX:
        raise ValueError(f"not an address: {address!r}")
    digest = keccak(body.encode()).hex()
    return "0x" + "".join(c.upper() if c.isalpha() and int(digest[i], 16) >= 8 else c for i, c in enumerate(body))


def is_address(text: str) -> bool:
    """0x + 40 hex digits; mixed case must be a valid EIP-55 checksum."""
    body = text.removeprefix("0x")
    if not text.startswith("0x") or len(body) != 40 or not set(body) <= _HEX:
        return False
    if body == body.lower() or body == body.upper():
        return True
    return to_checksum_address(text) == text


def address_of_key(key: str) -> str:
    """The address of a secp256k1 private key (hex), via coincurve (no eth_account import)."""
    import coincurve

    secret = bytes.fromhex(key.removeprefix("0x"))
    public = coincurve.PublicKey.from_secret(secret).format(compressed=False)[1:]
    return to_checksum_address("0x" + keccak(public)[-20:].hex())

PENDING = "PENDING"
ACTIVATED = "ACTIVATED"
PROPOSING = "PROPOSING"
COMMITTING = "COMMITTING"
REVEALING = "REVEALING"
ACCEPTED = "ACCEPTED"
UNDETERMINED = "UNDETERMINED"
LEADER_TIMEOUT = "LEADER_TIMEOUT"
VALIDATORS_TIMEOUT = "VALIDATORS_TIMEOUT"
FINALIZED = "FINALIZED"
CANCELED = "CANCELED"

STATUSES = (PENDING, ACTIVATED, PROPOSING, COMMITTING, REVEALING, ACCEPTED, UNDETERMINED, LEADER_TIMEOUT,
            VALIDATORS_TIMEOUT, FINALIZED, CANCELED)
IN_MACHINE = (ACTIVATED, PROPOSING, COMMITTING, REVEALING)
DECIDED = (ACCEPTED, UNDETERMINED, LEADER_TIMEOUT, VALIDATORS_TIMEOUT)
# outcome code carried by the TransactionUndetermined event
OUTCOME_CODES = {UNDETERMINED: 1, LEADER_TIMEOUT: 2, VALIDATORS_TIMEOUT: 3}
# vote code carried by the VoteRevealed event
# "cancelled": still running when the majority was already certain (early quorum); it decides nothing
VOTE_CODES = {"agree": 1, "disagree": 2, "timeout": 3, "cancelled": 4}

FAULTS_KEY = "consensus"  # reserved input key: fault injection for tests, stripped before execution
MAX_INPUT_BYTES = 64 * 1024


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def hash_hex(data: bytes | str) -> str:
    return "0x" + keccak(data.encode() if isinstance(data, str) else data).hex()


def default_sender(settings: Settings) -> str:
    """The --from default: the address the worker signs with (a development key when none is set)."""
    if settings.chain_private_key is not None:
        key = settings.chain_private_key.get_secret_value()
    else:
        key = DEV_KEY_NODE if settings.chain_url else DEV_KEY_IN_PROCESS
    try:
        return address_of_key(key)
    except (ValueError, TypeError):
        raise UsageError("RUNNER_CHAIN_PRIVATE_KEY is not a valid private key (32 bytes, hex)") from None


def parse_address(value: str, flag: str) -> str:
    text = value.strip()
    if not is_address(text):
        raise UsageError(f"{flag}: {value!r} is not an address (0x and 40 hex digits, checksum if mixed case)")
    return to_checksum_address(text)


SHORT_HASH = 18  # 0x + 16 hex digits


def short_hash(tx_hash: str) -> str:
    """The prefix logs carry: runner.logs redacts any 64-hex string as a possible private key, so full
    transaction hashes never reach a log line; ``runner tx PREFIX`` finds the transaction again."""
    return tx_hash[:SHORT_HASH]


def parse_tx_hash(value: str) -> str:
    """A full hash or a prefix of at least 0x + 8 hex digits (lower-cased)."""
    text = value.strip().lower()
    if not 10 <= len(text) <= 66 or not text.startswith("0x") or any(c not in "0123456789abcdef" for c in text[2:]):
        raise UsageError(f"{value!r} is not a transaction hash (0x and 64 hex digits, or a prefix of 8 or more)")
    return text


@dataclass(frozen=True)
class Submission:
    hash: str
    from_address: str
    to_address: str
    input: dict[str, Any]


def new_submission(from_address: str, to_address: str, data: dict[str, Any]) -> Submission:
    """A fresh transaction; its hash (the on-chain id) covers the sender, target, input and a random salt."""
    salt = secrets.token_hex(16)
    digest = hash_hex(canonical_json({"from": from_address, "to": to_address, "input": data, "salt": salt}))
    return Submission(digest, from_address, to_address, data)


def parse_input(text: str) -> dict[str, Any]:
    """A transaction's input: the same checks as a job's payload (size, depth, NUL; one line each)."""
    from runner.inputs import parse_json_object

    return parse_json_object(text, "--input", MAX_INPUT_BYTES, noun="the input", limit=None)


# --- state patches: what one accepted transaction changed, applied again in order at finality ------
Path = list[str]


def diff_state(old: dict[str, Any], new: dict[str, Any], prefix: Path | None = None) -> dict[str, list[Any]]:
    """Paths set and deleted between two states (recursing into nested objects)."""
    prefix = prefix or []
    patch: dict[str, list[Any]] = {"set": [], "del": []}
    for key in old.keys() - new.keys():
        patch["del"].append([*prefix, key])
    for key, value in new.items():
        before = old.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(before, dict):
            inner = diff_state(before, value, [*prefix, key])
            patch["set"] += inner["set"]
            patch["del"] += inner["del"]
        elif before is _MISSING or before != value or type(before) is not type(value):
            patch["set"].append([[*prefix, key], value])
    return patch


_MISSING = object()


def apply_patch(state: dict[str, Any], patch: dict[str, list[Any]] | None) -> dict[str, Any]:
    result = copy.deepcopy(state)
    if not patch:
        return result
    for path in patch.get("del", []):
        parent = _walk(result, path[:-1], create=False)
        if parent is not None:
            parent.pop(path[-1], None)
    for path, value in patch.get("set", []):
        parent = _walk(result, path[:-1], create=True)
        assert parent is not None
        parent[path[-1]] = copy.deepcopy(value)
    return result


def _walk(state: dict[str, Any], path: Path, *, create: bool) -> dict[str, Any] | None:
    node = state
    for key in path:
        child = node.get(key)
        if not isinstance(child, dict):
            if not create:
                return None
            child = node[key] = {}
        node = child
    return node


# --- fault injection -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Faults:
    """``input["consensus"]``: make validators disagree or nodes time out, so every path is testable.

    ``disagree``: how many validators return a different receipt (in the first ``disagree_rounds``
    rounds only, when given: a leader rotation then succeeds); ``validator_timeouts``: how many never
    answer (they sleep past RUNNER_CONSENSUS_VALIDATOR_TIMEOUT); ``leader_delay``/``validator_delay``:
    seconds each node sleeps before executing. RUNNER_CONSENSUS_DISAGREE_RATE adds random disagreement.
    """

    disagree: int = 0
    disagree_rounds: int = 0  # 0: every round
    appeal_disagree: int = 0  # validators of an appeal that disagree with the leader's receipt
    appeal_delay: float = 0.0  # seconds each validator of an appeal takes (a worker killed mid-appeal)
    appeal_error: bool = False  # the appeal's settlement raises (a poisoned appeal)
    validator_timeouts: int = 0
    leader_delay: float = 0.0
    validator_delay: float = 0.0

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Faults:
        raw = data.get(FAULTS_KEY)
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise UsageError(f"input.{FAULTS_KEY}: must be an object")
        unknown = raw.keys() - {"disagree", "disagree_rounds", "appeal_disagree", "appeal_delay", "appeal_error",
                                "validator_timeouts",
                                "leader_delay", "validator_delay"}
        if unknown:
            raise UsageError(f"input.{FAULTS_KEY}: unknown flag {sorted(unknown)[0]!r}")
        return cls(
            disagree=_count(raw, "disagree"),
            disagree_rounds=_count(raw, "disagree_rounds"),
            appeal_disagree=_count(raw, "appeal_disagree"),
            appeal_delay=_seconds(raw, "appeal_delay"),
            appeal_error=_flag(raw, "appeal_error"),
            validator_timeouts=_count(raw, "validator_timeouts"),
            leader_delay=_seconds(raw, "leader_delay"),
            validator_delay=_seconds(raw, "validator_delay"),
        )


def _count(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"input.{FAULTS_KEY}.{key}: must be a non-negative integer")
    return value


def _seconds(raw: dict[str, Any], key: str) -> float:
    value = raw.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise UsageError(f"input.{FAULTS_KEY}.{key}: must be a non-negative number of seconds")
    return float(value)


def _flag(raw: dict[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise UsageError(f"input.{FAULTS_KEY}.{key}: must be true or false")
    return value


def strip_faults(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != FAULTS_KEY}


def validator_set(count: int) -> list[str]:
    """count + 1 deterministic node addresses: one leads each transaction, the other ``count`` validate."""
    return node_addresses(0, count + 1)


def node_addresses(start: int, count: int) -> list[str]:
    """Deterministic node addresses ``start`` .. ``start + count - 1`` (appeals draw theirs past the base set)."""
    return [to_checksum_address("0x" + keccak(f"runner-consensus-node-{i}".encode())[12:].hex())
            for i in range(start, start + count)]


def pick_leader(tx_hash: str, nodes: list[str], round: int = 0) -> int:
    """The leader of a round: the next node on from the last round's, so a rotation (at most
    len(nodes) - 1 of them) never repeats a leader."""
    return (int(tx_hash, 16) + round) % len(nodes)
