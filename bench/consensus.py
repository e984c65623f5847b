"""Consensus throughput against anvil: ``python bench/consensus.py``.

Two figures, on one fresh anvil (finality window 0):

- **raw**: the node's rate of signed sends from one process: ``--raw`` value transfers signed and sent
  one after another through runner.chain (the same capped keep-alive session and nonce manager the
  worker uses, a second dev account), until the last one's receipt; sends/s. Measured just before and
  just after the consensus run, and averaged, so load on the machine drifting during a round skews
  the ratio less.
- **consensus**: ``--txs`` transactions over ``--contracts`` contracts (key-value ops), inserted up
  front, then ONE ``runner worker --drain`` process (RUNNER_CONSENSUS_FINALITY_WINDOW=0,
  RUNNER_CONSENSUS_CONCURRENCY=``--concurrency``) takes them all to FINALIZED. Reported: finalized
  transactions/s over the consensus window (first activation to last finalization, from the rows) and
  over the whole worker process (start-up, deployment and drain included); chain transactions sent; the
  worker's peak TCP connections to the node (ESTABLISHED sockets it owns, from /proc/net/tcp).

- **appealed** (``--appealed 0.1``): one more round per ``--appeal-rounds`` (1) with the finality window at
  ``--appeal-window`` (5 s) and that fraction of transactions appealed by the bench as soon as each is
  decided on chain (``runner.jobs.consensus`` SQL, as ``runner appeal`` does); half of them succeed (the
  appeal's validators disagree: a rollback of the newer transactions of the contract), half fail (the
  window restarts, x 0.8). The window itself is then part of the time to the last finalization.

- **keyed** (``--keyed 8``): after each of the first ``--keyed-rounds`` plain rounds, the same round with
  that many validators in the table, holding anvil's development keys 2.. (stakes 1..n): every validator
  signs its own votes (one chain transaction per key per batch), so the chain carries many more
  transactions; reported side by side with the plain rounds of the same run.

Each round uses a fresh database and a fresh anvil; the median of ``--rounds`` (5) is reported, with the
ratio consensus/raw (target >= 50%). The database is RUNNER_BENCH_DATABASE_URL or the embedded
PostgreSQL under RUNNER_BENCH_HOME; anvil comes from node_modules (``npm ci``). Results go to
bench/results/consensus.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402

from bench._common import (  # noqa: E402
    RESULTS,
    RUNNER_CLI,
    SCRATCH,
    Server,
    base_env,
    fresh_name,
    git_commit,
    log,
    machine,
    median,
    start_server,
)
from runner.app import App  # noqa: E402
from runner.chain import close_chain, open_chain  # noqa: E402
from runner.config import load_settings  # noqa: E402
from runner.errors import UsageError  # noqa: E402
from runner.jobs.consensus.model import address_of_key, new_submission, to_checksum_address  # noqa: E402
from runner.jobs.consensus.store import ConsensusStore  # noqa: E402
from runner.jobs.consensus.validators import resolve_key  # noqa: E402
from tests.chain_fixtures import Anvil, anvil_binary, established_to, free_port  # noqa: E402

RAW_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"  # anvil account 1 (public)
SENDER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
# Raw sends wait for a receipt every RAW_WINDOW sends. Unbounded, anvil's pool grew to 1,578 unmined
# transactions after a consensus run, a send's RPC timed out and was retried, and anvil kept the retried
# copy of an already-mined nonce at the head of its pool: it stopped mining for good (seen 2026-12-02).
RAW_WINDOW = 100


@dataclass
class Round:
    raw_sends_per_s: float
    raw_before: float
    raw_after: float
    finalized_per_s_window: float
    finalized_per_s_process: float
    worker_wall_s: float
    chain_txs: int
    peak_node_connections: int
    statuses: dict[str, int]
    appealed: int = 0  # appeals the bench requested
    appeals_succeeded: int = 0
    rolled_back_runs: int = 0  # re-runs: rounds above 0 of transactions that were not appealed themselves
    keyed_validators: int = 0
    validator_chain_txs: int = 0  # sent by the validators' own keys

    @property
    def ratio(self) -> float:
        return self.finalized_per_s_window / self.raw_sends_per_s


async def raw_rate(url: str, count: int) -> float:
    settings = load_settings(database_url="postgresql://unused@127.0.0.1/unused", chain_url=url,
                             chain_private_key=RAW_KEY)
    chain = await open_chain(settings)
    try:
        await chain.send_transaction(to=chain.address, data=b"", gas=21_000)  # warm the session and nonce
        started = time.perf_counter()
        last = ""
        for i in range(count):
            last = await chain.send_transaction(to=chain.address, data=b"", gas=21_000, value=i)
            if i % RAW_WINDOW == RAW_WINDOW - 1:  # at most RAW_WINDOW unmined: see RAW_WINDOW
                await chain.wait_receipt(last, 600)
        # the node accepts sends faster than it mines them once its chain and state are big (after a
        # consensus run: a once-only flag per event in ConsensusMain's storage): wait for it to catch up
        await chain.wait_receipt(last, 600)
        return count / (time.perf_counter() - started)
    finally:
        await close_chain(chain)


def plan(txs: int, contracts: int, appealed: float = 0.0) -> list[tuple[str, dict[str, Any]]]:
    """Key-value ops round-robin over the contracts; with ``appealed``, every 1/appealed-th transaction of
    each contract is marked for an appeal (on odd contracts the appeal's validators disagree, so it
    succeeds and rolls back the contract's newer transactions)."""
    out = []
    every = round(1 / appealed) if appealed else 0
    for i in range(txs):
        to = to_checksum_address("0x" + f"{0xB0000 + i % contracts:040x}")
        n = i // contracts
        data: dict[str, Any] = {"op": "set", "key": f"k{n % 5}", "value": n}
        if n == 0:
            data = {"op": "mint", "amount": 10_000}
        elif n % 3 == 0:
            data = {"op": "transfer", "to": SENDER, "amount": 1}
        if every and n % every == every - 1:
            data["consensus"] = {"appeal_disagree": 7} if (i % contracts) % 2 else {"appeal_delay": 0}
        out.append((to, data))
    return out


def worker_env(db_url: str, chain_url: str, concurrency: int, window: float = 0) -> dict[str, str]:
    return base_env(RUNNER_DATABASE_URL=db_url, RUNNER_CHAIN_URL=chain_url,
                    RUNNER_CONSENSUS_FINALITY_WINDOW=str(window),
                    RUNNER_CONSENSUS_CONCURRENCY=str(concurrency), RUNNER_HTTP_ENABLED="false",
                    RUNNER_LOG_LEVEL="warning", RUNNER_LOG_FORMAT="json")


class Watch:
    def __init__(self, port: int, pid: int) -> None:
        self.port, self.pid, self.peak = port, pid, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, established_to(self.port, self.pid))
            time.sleep(0.01)

    def finish(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


async def appeal_marked(db_url: str, window: float, stop: asyncio.Event) -> int:
    """Appeal each marked transaction (input.consensus set) once it is decided on chain, as `runner appeal`
    does (the request and the contract job that settles it); returns how many."""
    app = await App.open(load_settings(database_url=db_url))
    store = ConsensusStore(app)
    asked: set[str] = set()
    try:
        while not stop.is_set():
            ready = await app.db.fetch(
                "SELECT hash FROM runner_consensus_transactions WHERE input ? 'consensus' AND status = 'ACCEPTED' "
                "AND decided_event_tx IS NOT NULL AND appeal_requested IS NULL AND jsonb_array_length(appeals) = 0")
            for row in ready:
                if row["hash"] in asked:
                    continue
                try:
                    await store.request_appeal(row["hash"], window, 0.8)
                    asked.add(row["hash"])
                except UsageError:  # its window closed meanwhile
                    asked.add(row["hash"])
            await asyncio.sleep(0.05)
    finally:
        await app.close()
    return len(asked)


async def submit_all(db_url: str, subs: list[Any]) -> None:
    app = await App.open(load_settings(database_url=db_url))
    try:
        await ConsensusStore(app).insert(subs)
    finally:
        await app.close()


async def one_round(server: Server, args: argparse.Namespace, index: int, appealed: float = 0.0,
                    keyed: int = 0) -> Round:
    binary = anvil_binary()
    if binary is None:
        raise SystemExit("anvil is not installed: run `npm ci` at the repository root")
    node = Anvil(binary, free_port())
    node.start()
    name = fresh_name("consensus")
    db_url = await server.create(name)
    logs = SCRATCH / f"consensus-{index}"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        raw_before = await raw_rate(node.url, args.raw)
        window = args.appeal_window if appealed else 0.0
        env = worker_env(db_url, node.url, args.concurrency, window)
        subprocess.run([str(RUNNER_CLI), "migrate"], env=env, check=True, capture_output=True)
        connection = await asyncpg.connect(db_url)
        try:
            validators = [(address_of_key(resolve_key(f"dev:{i + 2}")), i + 1, f"dev:{i + 2}") for i in range(keyed)]
            if validators:
                await connection.executemany(
                    "INSERT INTO runner_consensus_validators (address, stake, key_ref) VALUES ($1, $2, $3)", validators)
            subs = [new_submission(SENDER, to, data) for to, data in plan(args.txs, args.contracts, appealed)]
            await submit_all(db_url, subs)  # the product's path: each transaction and its contract job
            settings = load_settings(database_url="postgresql://unused@127.0.0.1/unused", chain_url=node.url)
            reader = await open_chain(settings)
            sent_before = await reader.w3.eth.get_transaction_count(reader.address)
            validator_before = [await reader.w3.eth.get_transaction_count(a) for a, _, _ in validators]
            started = time.perf_counter()
            stop = asyncio.Event()
            appealer = asyncio.create_task(appeal_marked(db_url, window, stop)) if appealed else None
            with open(logs / "worker.log", "w") as sink:
                proc = subprocess.Popen([str(RUNNER_CLI), "worker", "--drain"], env=env, stdout=sink,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                watch = Watch(node.port, proc.pid)
                code = await asyncio.to_thread(proc.wait)
                wall = time.perf_counter() - started
                peak = watch.finish()
            stop.set()
            asked = await appealer if appealer is not None else 0
            if code != 0:
                raise SystemExit(f"worker exited {code}; see {logs / 'worker.log'}")
            chain_txs = await reader.w3.eth.get_transaction_count(reader.address) - sent_before
            validator_txs = sum([await reader.w3.eth.get_transaction_count(a) for a, _, _ in validators]) \
                - sum(validator_before)
            await close_chain(reader)
            busy_s = await connection.fetchval(
                "SELECT extract(epoch FROM max(finalized_at) - min(activated_at)) FROM runner_consensus_transactions")
            statuses = {r["status"]: r["n"] for r in await connection.fetch(
                "SELECT coalesce(outcome, status) AS status, count(*) AS n FROM runner_consensus_transactions "
                "WHERE status = 'FINALIZED' GROUP BY 1")}
            unfinished = await connection.fetchval(
                "SELECT count(*) FROM runner_consensus_transactions WHERE status <> 'FINALIZED'")
            if unfinished:
                raise SystemExit(f"{unfinished} transactions not finalized")
            appeal_rows = await connection.fetch(
                "SELECT appeals, round, input ? 'consensus' AS marked FROM runner_consensus_transactions")
            succeeded = sum('"succeeded"' in str(r["appeals"]) for r in appeal_rows)
            reruns = sum(r["round"] > 0 for r in appeal_rows if not r["marked"])
        finally:
            await connection.close()
        raw_after = await raw_rate(node.url, args.raw)
        raw = (raw_before + raw_after) / 2
        result = Round(raw_sends_per_s=raw, raw_before=raw_before, raw_after=raw_after,
                       finalized_per_s_window=args.txs / float(busy_s),
                       finalized_per_s_process=args.txs / wall, worker_wall_s=wall, chain_txs=chain_txs,
                       peak_node_connections=peak, statuses=statuses, appealed=asked,
                       appeals_succeeded=succeeded, rolled_back_runs=reruns, keyed_validators=keyed,
                       validator_chain_txs=validator_txs)
        log(f"round {index}: raw {raw:.0f} sends/s ({raw_before:.0f} before, {raw_after:.0f} after); "
            f"consensus {result.finalized_per_s_window:.0f} finalized/s "
            f"(window), {result.finalized_per_s_process:.0f}/s (whole process, {wall:.1f}s); {chain_txs} chain "
            f"txs; peak node connections {peak}; ratio {100 * result.ratio:.0f}%"
            + (f"; {asked} appealed ({succeeded} succeeded, {reruns} newer transactions rolled back), window "
               f"{window:g}s" if appealed else "")
            + (f"; {keyed} keyed validators sent {validator_txs} chain txs" if keyed else ""))
        return result
    finally:
        node.stop()
        await server.drop(name)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--txs", type=int, default=2000)
    parser.add_argument("--contracts", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--raw", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--appealed", type=float, default=0.1, help="fraction appealed in the appeal rounds")
    parser.add_argument("--appeal-rounds", type=int, default=1)
    parser.add_argument("--appeal-window", type=float, default=5.0)
    parser.add_argument("--keyed", type=int, default=0, help="validators with their own keys in the keyed rounds")
    parser.add_argument("--keyed-rounds", type=int, default=1)
    parser.add_argument("--name", default="consensus", help="file stem under bench/results")
    parser.add_argument("--quick", action="store_true", help="one small round (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.txs, args.contracts, args.raw, args.rounds = 200, 20, 300, 1
    server = start_server()
    try:
        rounds: list[Round] = []
        keyed_rounds: list[Round] = []
        for i in range(args.rounds):  # a keyed round after each of the first plain ones: side by side
            rounds.append(await one_round(server, args, i))
            if args.keyed and i < args.keyed_rounds:
                keyed_rounds.append(await one_round(server, args, 100 + i, keyed=args.keyed))
        appeal_rounds = [await one_round(server, args, args.rounds + i, args.appealed)
                         for i in range(args.appeal_rounds if args.appealed else 0)]
    finally:
        server.stop_if_started_here()
    summary: dict[str, Any] = {} if not rounds else {
        "raw_sends_per_s": median([r.raw_sends_per_s for r in rounds]),
        "finalized_per_s_window": median([r.finalized_per_s_window for r in rounds]),
        "finalized_per_s_process": median([r.finalized_per_s_process for r in rounds]),
        "ratio_window_to_raw": median([r.ratio for r in rounds]),
        "peak_node_connections": max(r.peak_node_connections for r in rounds),
        "chain_txs_per_round": [r.chain_txs for r in rounds],
    }
    if appeal_rounds:
        summary["appealed"] = {
            "fraction": args.appealed, "window_s": args.appeal_window,
            "finalized_per_s_window": median([r.finalized_per_s_window for r in appeal_rounds]),
            "ratio_window_to_raw": median([r.ratio for r in appeal_rounds]),
            "appeals": [r.appealed for r in appeal_rounds],
            "succeeded": [r.appeals_succeeded for r in appeal_rounds],
            "rolled_back_runs": [r.rolled_back_runs for r in appeal_rounds],
        }
    if keyed_rounds:
        summary["keyed"] = {
            "validators": args.keyed,
            "finalized_per_s_window": median([r.finalized_per_s_window for r in keyed_rounds]),
            "ratio_window_to_raw": median([r.ratio for r in keyed_rounds]),
            "worker_chain_txs": [r.chain_txs for r in keyed_rounds],
            "validator_chain_txs": [r.validator_chain_txs for r in keyed_rounds],
            "plain_rounds_finalized_per_s": [r.finalized_per_s_window for r in rounds[:len(keyed_rounds)]],
            "keyed_rounds_finalized_per_s": [r.finalized_per_s_window for r in keyed_rounds],
        }
    report = {"command": " ".join(["python", "bench/consensus.py", *sys.argv[1:]]), "config": vars(args),
              "machine": machine(), "commit": git_commit(), "summary": summary,
              "rounds": [asdict(r) | {"ratio": r.ratio} for r in rounds],
              "appeal_rounds": [asdict(r) | {"ratio": r.ratio} for r in appeal_rounds],
              "keyed_rounds": [asdict(r) | {"ratio": r.ratio} for r in keyed_rounds]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
