"""ConsensusMain: the committed artifact (built by scripts/build_contract.mjs), call encoding, event
topics and decoding, and "deployed on first start when missing"."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from eth_abi import decode, encode
from eth_utils import keccak, to_checksum_address

from runner.chain import Chain, ChainError
from runner.jobs.consensus.store import ConsensusStore
from runner.logs import get_logger

log = get_logger("runner.jobs.consensus.contract")

ARTIFACT_PATH = Path(__file__).with_name("ConsensusMain.json")
CONTRACT_NAME = "ConsensusMain"
DEPLOY_GAS = 1_500_000

VERSION = 3  # ConsensusMain.VERSION: a deployment of another version is replaced (as after a reset)

# emitBatch kinds, as in contracts/ConsensusMain.sol
ACTIVATED, PROPOSED, COMMITTED, REVEALED, ACCEPTED, UNDETERMINED, FINALIZED, LEADER_ROTATED, APPEAL_STARTED = range(9)
EVENT_NAMES = {
    ACTIVATED: "TransactionActivated", PROPOSED: "ReceiptProposed", COMMITTED: "VoteCommitted",
    REVEALED: "VoteRevealed", ACCEPTED: "TransactionAccepted", UNDETERMINED: "TransactionUndetermined",
    FINALIZED: "TransactionFinalized", LEADER_ROTATED: "LeaderRotated", APPEAL_STARTED: "AppealStarted",
}
APPEAL_KINDS = {"validator": 1, "leader": 2}  # AppealStarted's appealKind
KIND_NAMES = {v: k for k, v in EVENT_NAMES.items()}
# the stored column (<kind>_event_tx) each event kind is recorded under
KIND_COLUMNS = {ACTIVATED: "activated", PROPOSED: "proposed", COMMITTED: "committed", REVEALED: "revealed",
                ACCEPTED: "decided", UNDETERMINED: "decided", FINALIZED: "finalized"}
COLUMN_KINDS = {"activated": (ACTIVATED,), "proposed": (PROPOSED,), "committed": (COMMITTED,),
                "revealed": (REVEALED,), "decided": (ACCEPTED, UNDETERMINED), "finalized": (FINALIZED,),
                # not stored in columns: found on chain by their round
                "rotated": (LEADER_ROTATED,), "appealed": (APPEAL_STARTED,)}
BATCH_TYPES = ["uint256[]", "bytes32[]", "address[]", "address[]", "bytes32[]"]
VOTE_TYPES = ["uint256[]", "bytes32[]", "address[]", "bytes32[]"]
VOTE_KINDS = frozenset({COMMITTED, REVEALED})  # the events a validator may sign itself (emitVotes)
ZERO_ADDRESS = "0x" + "00" * 20
ZERO_WORD = b"\x00" * 32


@cache
def artifact() -> dict[str, Any]:
    return json.loads(ARTIFACT_PATH.read_text())  # type: ignore[no-any-return]


def _signature(entry: dict[str, Any]) -> str:
    return f"{entry['name']}({','.join(i['type'] for i in entry['inputs'])})"


@cache
def topics() -> dict[str, bytes]:
    """Event name -> topic0."""
    return {e["name"]: keccak(text=_signature(e)) for e in artifact()["abi"] if e["type"] == "event"}


@cache
def selector(name: str) -> bytes:
    entry = next(e for e in artifact()["abi"] if e["type"] == "function" and e["name"] == name)
    return keccak(text=_signature(entry))[:4]


def word(value: int | str | bytes) -> bytes:
    if isinstance(value, int):
        return value.to_bytes(32, "big")
    if isinstance(value, str):
        return bytes.fromhex(value.removeprefix("0x")).rjust(32, b"\x00")
    return value.rjust(32, b"\x00")


@dataclass(frozen=True)
class Event:
    kind: int
    tx_id: str  # 0x + 64 hex: the consensus transaction hash
    contract: str
    actor: str = ZERO_ADDRESS
    data: bytes = ZERO_WORD
    round: int = 0  # 0, then one more per re-run: the contract emits each (transition, round) once

    @property
    def kind_word(self) -> int:
        """emitBatch's kinds[i]: the kind in the low 8 bits, the round above."""
        return self.kind | (self.round << 8)


def _address_bytes(address: str) -> bytes:
    return bytes.fromhex(address.removeprefix("0x"))  # eth_abi takes 20 raw bytes; no checksum hashing


def _encode_word_arrays(function: str, arrays: tuple[list[bytes], ...], n: int) -> bytes:
    """Calldata of a function taking only arrays of 32-byte words: one offset per array, then per array
    its length and its words (tests check it against eth_abi)."""
    size = 32 * (n + 1)
    head = b"".join(word(32 * len(arrays) + i * size) for i in range(len(arrays)))
    return selector(function) + head + b"".join(word(n) + b"".join(a) for a in arrays)


def encode_batch(events: list[Event]) -> bytes:
    """emitBatch calldata (the owner's batch: any kind, the actor given per event)."""
    arrays = (
        [word(e.kind_word) for e in events], [word(e.tx_id) for e in events],
        [word(_address_bytes(e.contract)) for e in events], [word(_address_bytes(e.actor)) for e in events],
        [e.data.rjust(32, b"\x00") for e in events],
    )
    return _encode_word_arrays("emitBatch", arrays, len(events))


def encode_votes(events: list[Event]) -> bytes:
    """emitVotes calldata (one validator's own votes: the actor is whoever signs the transaction)."""
    arrays = (
        [word(e.kind_word) for e in events], [word(e.tx_id) for e in events],
        [word(_address_bytes(e.contract)) for e in events], [e.data.rjust(32, b"\x00") for e in events],
    )
    return _encode_word_arrays("emitVotes", arrays, len(events))


def encode_votes_abi(events: list[Event]) -> bytes:
    return selector("emitVotes") + encode(VOTE_TYPES, [
        [e.kind_word for e in events], [word(e.tx_id) for e in events],
        [_address_bytes(e.contract) for e in events], [e.data for e in events],
    ])


def encode_set_validators(addresses: list[str], active: bool) -> bytes:
    return selector("setValidators") + encode(["address[]", "bool"], [[_address_bytes(a) for a in addresses], active])


def encode_batch_abi(events: list[Event]) -> bytes:
    """The same calldata through eth_abi (the reference encode_batch is checked against)."""
    return selector("emitBatch") + encode(BATCH_TYPES, [
        [e.kind_word for e in events], [word(e.tx_id) for e in events],
        [_address_bytes(e.contract) for e in events], [_address_bytes(e.actor) for e in events],
        [e.data for e in events],
    ])


def batch_gas(count: int) -> int:
    # ~25,000 + ~4,750 per event for the log, plus ~22,100 per event for the once-only flag's first write
    # and its hash; generous so a batch never runs out
    return 60_000 + 32_000 * count


def carried(events: list[Event], log_keys: tuple[tuple[str, str, str], ...], address: str) -> bool:
    """Whether a mined batch's logs hold any of these events (False: the contract skipped them all, as
    emitted before)."""
    seen = {(topic0, topic1) for emitter, topic0, topic1 in log_keys if emitter == address.lower()}
    return any(("0x" + topics()[EVENT_NAMES[e.kind]].hex(), "0x" + word(e.tx_id).hex()) in seen for e in events)


@dataclass(frozen=True)
class DecodedEvent:
    name: str
    tx_id: str
    contract: str
    args: tuple[Any, ...]
    chain_tx: str
    block: int
    log_index: int


def decode_log(entry: Any) -> DecodedEvent | None:
    """A ConsensusMain log as (name, txId, contract, other args); None for anything else."""
    names = {v: k for k, v in topics().items() if k in KIND_NAMES}  # a transaction's events only
    raw_topics = [bytes(t) for t in entry["topics"]]
    name = names.get(raw_topics[0]) if raw_topics else None
    if name is None:
        return None
    abi = next(e for e in artifact()["abi"] if e["type"] == "event" and e["name"] == name)
    data_types = [i["type"] for i in abi["inputs"] if not i["indexed"]]
    args = decode(data_types, bytes(entry["data"]))
    return DecodedEvent(
        name=name, tx_id="0x" + raw_topics[1].hex(), contract=to_checksum_address(raw_topics[2][12:]),
        args=tuple(args), chain_tx="0x" + bytes(entry["transactionHash"]).hex(), block=int(entry["blockNumber"]),
        log_index=int(entry["logIndex"]),
    )


@dataclass(frozen=True)
class ConsensusMain:
    chain: Chain
    address: str
    deploy_block: int

    async def find_event(self, kinds: tuple[int, ...], tx_id: str, round: int = 0) -> str | None:
        """The chain tx that already carried this transaction's event of one of ``kinds`` in ``round``."""
        logs = await self.chain.get_logs({
            "address": self.address, "fromBlock": self.deploy_block, "toBlock": "latest",
            "topics": [["0x" + topics()[EVENT_NAMES[k]].hex() for k in kinds], "0x" + word(tx_id).hex()],
        })
        for entry in logs:  # every event's data ends with its round
            if int.from_bytes(bytes(entry["data"])[-32:], "big") == round:
                return "0x" + bytes(entry["transactionHash"]).hex()
        return None

    async def logs(self, from_block: int | None = None) -> list[DecodedEvent]:
        entries = await self.chain.get_logs({
            "address": self.address, "fromBlock": self.deploy_block if from_block is None else from_block,
            "toBlock": "latest",
        })
        return [d for d in (decode_log(e) for e in entries) if d is not None]


    async def registered(self, address: str) -> bool:
        """Whether ``address`` is a registered validator (may sign its own votes)."""
        data = selector("validators") + encode(["address"], [_address_bytes(address)])
        return bool(decode(["bool"], await self.chain.call(self.address, data))[0])

    async def register_validators(self, addresses: list[str], receipt_timeout_s: float) -> str | None:
        """Register the validators not registered yet (the owner's transaction); their chain tx or None."""
        missing = [a for a in addresses if not await self.registered(a)]
        if not missing:
            return None
        tx_hash = await self.chain.send_transaction(to=self.address, data=encode_set_validators(missing, True),
                                                    gas=60_000 + 30_000 * len(missing))
        await self.chain.wait_receipt(tx_hash, receipt_timeout_s)
        log.info("validators registered on ConsensusMain", count=len(missing), chain_tx=tx_hash)
        return tx_hash


async def _usable(chain: Chain, address: str) -> bool:
    """Code behind the address, of this VERSION (an older one has no VERSION: the call fails), and
    owned by our signer (only the owner may emit)."""
    if not await chain.code_at(address):
        return False
    try:
        version = decode(["uint256"], await chain.call(address, selector("VERSION")))[0]
    except ChainError:
        return False
    if version != VERSION:
        return False
    owner = decode(["address"], await chain.call(address, selector("owner")))[0]
    return to_checksum_address(owner) == chain.address


async def ensure_deployed(chain: Chain, store: ConsensusStore, receipt_timeout_s: float) -> ConsensusMain:
    """The stored ConsensusMain of this chain, deployed (again) when missing, codeless or not ours."""
    for _ in range(3):
        stored = await store.deployment(chain.chain_id, CONTRACT_NAME)
        if stored is not None and await _usable(chain, stored[0]):
            log.info("ConsensusMain found", address=stored[0], chain_id=chain.chain_id)
            return ConsensusMain(chain, stored[0], stored[1])
        if stored is not None:
            log.warning("stored ConsensusMain has no code or another owner; deploying again "
                        "(a fresh in-process chain or a reset node)", address=stored[0], chain_id=chain.chain_id)
        bytecode = bytes.fromhex(artifact()["bytecode"].removeprefix("0x"))
        address, block = await chain.deploy(bytecode, DEPLOY_GAS, receipt_timeout_s,
                                            not_at=stored[0] if stored else None)
        if await store.save_deployment(chain.chain_id, CONTRACT_NAME, address, block,
                                       replaces=stored[0] if stored else None):
            log.info("ConsensusMain deployed", address=address, block=block, chain_id=chain.chain_id)
            return ConsensusMain(chain, address, block)
        log.info("another worker stored a ConsensusMain first; using it", chain_id=chain.chain_id)
    raise ChainError("could not agree on a ConsensusMain deployment after 3 attempts")
