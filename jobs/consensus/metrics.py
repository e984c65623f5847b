"""The consensus plugin's Prometheus metric families (the chain RPC ones stay in runner.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Set when transactions are sampled (the operate plugin, jobs/demo.py); the alert "non-final for longer
# than N x its finality window" (deploy/prometheus/alerts.yml) fires on it.
CONSENSUS_NONFINAL_AGE_RATIO = Gauge(
    "runner_consensus_nonfinal_age_window_ratio",
    "Largest age / finality window among consensus transactions that are not final yet (0 when none)",
)
CONSENSUS_TRANSACTIONS = Gauge("runner_consensus_transactions", "Consensus transactions by status", ["status"])
CONSENSUS_TRANSITIONS = Counter(
    "runner_consensus_transitions_total", "Consensus state transitions written by this worker", ["status"]
)
CONSENSUS_RECOVERED = Counter(
    "runner_consensus_recovered_total", "Consensus transactions recovered, by where they went", ["to", "why"]
)
CONSENSUS_EVENTS = Counter("runner_consensus_events_total", "ConsensusMain events emitted by this worker", ["kind"])
CONSENSUS_EVENTS_SKIPPED = Counter(
    "runner_consensus_events_skipped_total", "Events not re-emitted because the chain already has them", ["kind"]
)
CONSENSUS_EVENTS_FENCED = Counter(
    "runner_consensus_events_fenced_total", "Events not sent: the lease they were sent under was taken"
)
CONSENSUS_EVENT_BATCH = Histogram(
    "runner_consensus_event_batch_size", "Events per ConsensusMain chain transaction",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)
CONSENSUS_ROTATIONS = Counter(
    "runner_consensus_leader_rotations_total", "Leaders rotated in after a round without a majority"
)
CONSENSUS_VALIDATORS_CANCELLED = Counter(
    "runner_consensus_validators_cancelled_total", "Validators cancelled because the majority was already certain"
)
CONSENSUS_APPEALS = Counter("runner_consensus_appeals_total", "Appeals settled by this worker, by kind", ["kind"])
