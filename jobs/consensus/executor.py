"""The executor protocol (where a real GenVM would plug in) and the deterministic key-value built-in.

An executor gets a read-only view of the transaction and the contract's accepted state, and returns an
:class:`Execution`: an output and the contract's new state. It must be deterministic: validators
re-execute and vote by comparing receipt hashes with the leader's.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Protocol

from runner.errors import UsageError
from runner.jobs.consensus.model import FAULTS_KEY, Faults, canonical_json, hash_hex, is_address, to_checksum_address


@dataclass(frozen=True)
class TxView:
    hash: str
    from_address: str
    to_address: str
    input: dict[str, Any]  # without the fault-injection key


@dataclass(frozen=True)
class Execution:
    output: Any
    state: dict[str, Any]

    @property
    def receipt_hash(self) -> str:
        return hash_hex(canonical_json({"output": self.output, "state": self.state}))

    @property
    def state_hash(self) -> str:
        return hash_hex(canonical_json(self.state))


class ContractExecutor(Protocol):
    def validate(self, data: dict[str, Any]) -> None:
        """Raise UsageError for input this executor can never run (checked at submit)."""

    async def execute(self, tx: TxView, contract_state: dict[str, Any]) -> Execution: ...


class KeyValueExecutor:
    """A key-value contract with balances. State: ``{"storage": {K: V}, "balances": {ADDRESS: N}}``.

    Inputs: ``{"op": "set", "key": K, "value": V}``, ``{"op": "delete", "key": K}``,
    ``{"op": "transfer", "to": ADDRESS, "amount": N}`` (from the sender's balance) and
    ``{"op": "mint", "amount": N}`` (credits the sender; the only way balances start). A transfer
    beyond the sender's balance is a deterministic failed receipt ``{"ok": false, "error": ...}`` that
    changes nothing.
    """

    OPS = {"set": {"key", "value"}, "delete": {"key"}, "transfer": {"to", "amount"}, "mint": {"amount"}}

    def validate(self, data: dict[str, Any]) -> None:
        op = data.get("op")
        if op not in self.OPS:
            raise UsageError(f"input.op: must be one of {', '.join(sorted(self.OPS))}, got {op!r}")
        fields = set(data) - {"op", FAULTS_KEY}
        missing = self.OPS[op] - fields
        if missing:
            raise UsageError(f"input: {op!r} needs {', '.join(sorted(missing))}")
        extra = fields - self.OPS[op]
        if extra:
            raise UsageError(f"input: {op!r} does not take {', '.join(sorted(extra))}")
        if "key" in data and (not isinstance(data["key"], str) or not data["key"]):
            raise UsageError("input.key: must be a non-empty string")
        if "to" in data and (not isinstance(data["to"], str) or not is_address(data["to"])):
            raise UsageError(f"input.to: {data['to']!r} is not an address")
        if "amount" in data:
            amount = data["amount"]
            if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
                raise UsageError("input.amount: must be a positive integer")
        if "value" in data and isinstance(data["value"], float) and not math.isfinite(data["value"]):
            raise UsageError("input.value: must be finite")
        Faults.parse(data)

    async def execute(self, tx: TxView, contract_state: dict[str, Any]) -> Execution:
        data = tx.input
        state = copy.deepcopy(contract_state)
        storage: dict[str, Any] = state.setdefault("storage", {})
        balances: dict[str, int] = state.setdefault("balances", {})
        op = data.get("op")
        if op == "set":
            storage[data["key"]] = data["value"]
            return Execution({"ok": True}, state)
        if op == "delete":
            existed = storage.pop(data["key"], _GONE) is not _GONE
            return Execution({"ok": True, "existed": existed}, state)
        if op == "mint":
            sender = to_checksum_address(tx.from_address)
            balances[sender] = balances.get(sender, 0) + int(data["amount"])
            return Execution({"ok": True, "balance": balances[sender]}, state)
        if op == "transfer":
            sender, target, amount = to_checksum_address(tx.from_address), to_checksum_address(data["to"]), \
                int(data["amount"])
            have = balances.get(sender, 0)
            if have < amount:
                return Execution({"ok": False, "error": f"insufficient balance: {have} < {amount}"},
                                 copy.deepcopy(contract_state))
            balances[sender] = have - amount
            balances[target] = balances.get(target, 0) + amount
            return Execution({"ok": True}, state)
        return Execution({"ok": False, "error": f"unknown op {op!r}"}, copy.deepcopy(contract_state))


_GONE = object()
