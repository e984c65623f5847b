// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title ConsensusMain
/// @notice The on-chain record of runner's consensus loops. Every state transition of a consensus
/// transaction emits one event here, indexed by the transaction id (its runner hash) and by the
/// address of the (off-chain) contract the transaction targets.
/// @dev Events are emitted in batches: one chain transaction carries the events of many transitions,
/// in the order given, so one process can keep up with the node. Only the deployer may emit, except a
/// registered validator's own votes: those it signs itself (emitVotes, the validator is msg.sender).
/// Each event is emitted at most once per (transaction, transition, round): a repeated one (a stale
/// worker's late batch, a resend after a receipt timeout, a second process with the same key) is skipped,
/// so the chain's record holds every event exactly once whoever sends it.
contract ConsensusMain {
    /// @notice Bumped when the events or emitBatch change: a worker deploys again over an older one.
    uint256 public constant VERSION = 3;

    // Kinds accepted by emitBatch, one per event.
    uint8 internal constant ACTIVATED = 0;
    uint8 internal constant PROPOSED = 1;
    uint8 internal constant COMMITTED = 2;
    uint8 internal constant REVEALED = 3;
    uint8 internal constant ACCEPTED = 4;
    uint8 internal constant UNDETERMINED = 5;
    uint8 internal constant FINALIZED = 6;
    uint8 internal constant LEADER_ROTATED = 7;
    uint8 internal constant APPEAL_STARTED = 8;

    // Every event carries its round: 0, then one more per new proposal of the same transaction (a
    // leader rotation, a re-run after an appeal).
    event TransactionActivated(bytes32 indexed txId, address indexed contractAddress, address leader, uint256 round);
    event ReceiptProposed(
        bytes32 indexed txId, address indexed contractAddress, address leader, bytes32 receiptHash, uint256 round
    );
    event VoteCommitted(
        bytes32 indexed txId, address indexed contractAddress, address validator, bytes32 commitHash, uint256 round
    );
    event VoteRevealed(
        bytes32 indexed txId, address indexed contractAddress, address validator, bytes32 vote, uint256 round
    );
    event TransactionAccepted(bytes32 indexed txId, address indexed contractAddress, bytes32 receiptHash, uint256 round);
    /// @notice The transaction ended without an accepted receipt; `outcome` names why
    /// (1 UNDETERMINED, 2 LEADER_TIMEOUT, 3 VALIDATORS_TIMEOUT).
    event TransactionUndetermined(bytes32 indexed txId, address indexed contractAddress, uint8 outcome, uint256 round);
    event TransactionFinalized(bytes32 indexed txId, address indexed contractAddress, bytes32 receiptHash, uint256 round);
    /// @notice No majority: a validator that has not led this transaction yet proposes again in `round`.
    event LeaderRotated(bytes32 indexed txId, address indexed contractAddress, address leader, uint256 round);
    /// @notice An appeal of the decision opens `round`; `appealKind` 1: validators (more validators vote on
    /// the accepted receipt), 2: leader (a new leader proposes again).
    event AppealStarted(bytes32 indexed txId, address indexed contractAddress, uint8 appealKind, uint256 round);

    /// @notice The owner registered (true) or removed (false) a validator that signs its own votes.
    event ValidatorSet(address indexed validator, bool active);

    error NotOwner();
    error NotValidator();
    error LengthMismatch();
    error UnknownKind(uint8 kind);

    address public immutable owner;

    /// @notice Validators that may sign their own VoteCommitted and VoteRevealed events (emitVotes).
    mapping(address => bool) public validators;

    /// @notice Whether the event with this key was emitted: keccak256(slot, txId, actor, round), where the
    /// slot is the transition (TransactionAccepted and TransactionUndetermined share one: a transaction
    /// is decided once) and the actor counts only for the per-validator votes.
    mapping(bytes32 => bool) public emitted;

    constructor() {
        owner = msg.sender;
    }

    /// @notice Emit one event per index, skipping any emitted before: kinds[i] picks the event (its low
    /// 8 bits) and the round (the bits above: 0, then one more per re-run after an appeal); actors[i] is
    /// the leader or validator (unused for the other kinds); data[i] is the receipt hash, commit hash,
    /// vote or outcome code.
    function emitBatch(
        uint256[] calldata kinds,
        bytes32[] calldata txIds,
        address[] calldata contracts,
        address[] calldata actors,
        bytes32[] calldata data
    ) external {
        if (msg.sender != owner) revert NotOwner();
        uint256 n = kinds.length;
        if (txIds.length != n || contracts.length != n || actors.length != n || data.length != n) {
            revert LengthMismatch();
        }
        for (uint256 i = 0; i < n; ++i) {
            uint8 kind = uint8(kinds[i]);
            uint256 round = kinds[i] >> 8;
            if (!_first(kind, round, txIds[i], actors[i])) {
                continue;
            }
            if (kind == ACTIVATED) {
                emit TransactionActivated(txIds[i], contracts[i], actors[i], round);
            } else if (kind == PROPOSED) {
                emit ReceiptProposed(txIds[i], contracts[i], actors[i], data[i], round);
            } else if (kind == COMMITTED) {
                emit VoteCommitted(txIds[i], contracts[i], actors[i], data[i], round);
            } else if (kind == REVEALED) {
                emit VoteRevealed(txIds[i], contracts[i], actors[i], data[i], round);
            } else if (kind == ACCEPTED) {
                emit TransactionAccepted(txIds[i], contracts[i], data[i], round);
            } else if (kind == UNDETERMINED) {
                emit TransactionUndetermined(txIds[i], contracts[i], uint8(uint256(data[i])), round);
            } else if (kind == FINALIZED) {
                emit TransactionFinalized(txIds[i], contracts[i], data[i], round);
            } else if (kind == LEADER_ROTATED) {
                emit LeaderRotated(txIds[i], contracts[i], actors[i], round);
            } else if (kind == APPEAL_STARTED) {
                emit AppealStarted(txIds[i], contracts[i], uint8(uint256(data[i])), round);
            } else {
                revert UnknownKind(kind);
            }
        }
    }

    /// @notice Register (active) or remove validators; only the owner.
    function setValidators(address[] calldata list, bool active) external {
        if (msg.sender != owner) revert NotOwner();
        for (uint256 i = 0; i < list.length; ++i) {
            validators[list[i]] = active;
            emit ValidatorSet(list[i], active);
        }
    }

    /// @notice A registered validator's own votes, signed by it: kinds[i] is COMMITTED or REVEALED (low 8
    /// bits) with the round above, as in emitBatch; the validator of each event is msg.sender. Skipped
    /// like emitBatch's when emitted before, whoever sent them.
    function emitVotes(
        uint256[] calldata kinds,
        bytes32[] calldata txIds,
        address[] calldata contracts,
        bytes32[] calldata data
    ) external {
        if (!validators[msg.sender]) revert NotValidator();
        uint256 n = kinds.length;
        if (txIds.length != n || contracts.length != n || data.length != n) {
            revert LengthMismatch();
        }
        for (uint256 i = 0; i < n; ++i) {
            uint8 kind = uint8(kinds[i]);
            uint256 round = kinds[i] >> 8;
            if (kind != COMMITTED && kind != REVEALED) revert UnknownKind(kind);
            if (!_first(kind, round, txIds[i], msg.sender)) {
                continue;
            }
            if (kind == COMMITTED) {
                emit VoteCommitted(txIds[i], contracts[i], msg.sender, data[i], round);
            } else {
                emit VoteRevealed(txIds[i], contracts[i], msg.sender, data[i], round);
            }
        }
    }

    function _first(uint8 kind, uint256 round, bytes32 txId, address actor) internal returns (bool) {
        uint8 slot = kind == UNDETERMINED ? ACCEPTED : kind;
        address who = (kind == COMMITTED || kind == REVEALED) ? actor : address(0);
        bytes32 key = keccak256(abi.encode(slot, txId, who, round));
        if (emitted[key]) {
            return false;
        }
        emitted[key] = true;
        return true;
    }
}
