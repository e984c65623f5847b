"""Prometheus metric families of the engine. Defined once here so every loop counts into the same series
(plugins define their own, e.g. runner.jobs.consensus.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

POOL_SIZE = Gauge("runner_pool_size", "Connections open in the pool", ["pool"])
POOL_IDLE = Gauge("runner_pool_idle", "Idle connections in the pool", ["pool"])
POOL_IN_USE = Gauge("runner_pool_in_use", "Connections checked out of the pool", ["pool"])
POOL_WAITERS = Gauge("runner_pool_waiters", "Tasks waiting to acquire a connection", ["pool"])
POOL_MAX = Gauge("runner_pool_max", "Configured pool maximum", ["pool"])
POOL_ACQUIRE_WAIT = Histogram(
    "runner_pool_acquire_wait_seconds",
    "Time to acquire a pooled connection, retries included",
    ["pool"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
POOL_EXHAUSTION_RETRIES = Counter(
    "runner_pool_exhaustion_retries_total", "Acquire attempts retried after a timeout or transient error", ["pool"]
)
POOL_RELEASE_FAILURES = Counter(
    "runner_pool_release_failures_total", "Connections terminated because their reset failed on release", ["pool"]
)
POOL_GIVE_UPS = Counter("runner_pool_give_ups_total", "Acquires that gave up with PoolExhausted", ["pool"])

JOBS_CLAIMED = Counter("runner_jobs_claimed_total", "Jobs claimed by this worker", ["kind"])
JOBS_FINISHED = Counter("runner_jobs_finished_total", "Jobs finished, by outcome", ["kind", "outcome"])
JOBS_RECOVERED = Counter("runner_jobs_recovered_total", "Stale jobs recovered by this worker", ["kind", "to"])
JOBS_RELEASED = Counter(
    "runner_jobs_released_total", "Jobs handed back to pending without using an attempt, by reason", ["kind", "reason"]
)
JOBS_LEASE_LOST = Counter("runner_jobs_lease_lost_total", "Jobs dropped because their lease was lost", ["kind"])
JOB_DURATION = Histogram(
    "runner_job_duration_seconds",
    "Handler run time",
    ["kind"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600, 3600),
)
JOBS_RUNNING = Gauge("runner_jobs_running", "Jobs running in this worker")
QUEUE_DEPTH = Gauge(
    "runner_queue_depth",
    "Jobs by status, sampled on an interval: pending and running exact; succeeded, failed and cancelled exact "
    "up to 10,000 finished jobs, estimated from the planner's statistics past that",
    ["status"],
)
HEARTBEAT_LAG = Gauge("runner_heartbeat_lag_seconds", "Seconds since the last successful heartbeat")
LOOP_ERRORS = Counter("runner_loop_errors_total", "Errors raised by a worker loop's run_once", ["loop"])
EVENT_LOOP_LAG = Gauge("runner_event_loop_lag_seconds", "Measured event loop scheduling lag")

CHAIN_RPC_LATENCY = Histogram(
    "runner_chain_rpc_seconds", "Chain RPC latency", ["method"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
CHAIN_RPC_ERRORS = Counter("runner_chain_rpc_errors_total", "Chain RPC errors", ["method"])
CHAIN_RPC_RETRIES = Counter("runner_chain_rpc_retries_total", "Chain RPC retries", ["method"])
CHAIN_OPEN_CONNECTIONS = Gauge("runner_chain_open_connections", "Open TCP connections to the chain node")
CHAIN_NONCE_RESYNCS = Counter(
    "runner_chain_nonce_resyncs_total", "Times a sender's next nonce was re-read from the node after a nonce error"
)
CHAIN_NONCE_GAP_FILLS = Counter(
    "runner_chain_nonce_gap_fills_total",
    "No-op transactions sent to fill nonces a restarted node lost (replacing anything of ours queued there)",
)
CHAIN_SENDS = Counter("runner_chain_sends_total", "Signed transactions accepted by the node")
