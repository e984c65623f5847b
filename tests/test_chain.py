"""runner.chain against a real anvil (and the in-process chain): connection cap, retries, nonces."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from eth_utils import to_checksum_address
from web3 import AsyncHTTPProvider, AsyncWeb3

from runner import metrics
from runner.chain import Chain, ChainTimeout, ChainUnavailable, close_chain, open_chain
from runner.config import Settings, load_settings
from tests.chain_fixtures import Anvil, anvil, client_ports_seen, connections_to, free_port  # noqa: F401

TIME_WAIT = "06"

ARTIFACT = json.loads((Path(__file__).resolve().parent.parent / "jobs/consensus/ConsensusMain.json").read_text())


def chain_settings(url: str | None, **extra: object) -> Settings:
    return load_settings(database_url="postgresql://unused@127.0.0.1/unused", chain_url=url, **extra)


@pytest.fixture
async def node_chain(anvil: Anvil, runner_env: dict[str, str]) -> AsyncIterator[Chain]:  # noqa: F811
    chain = await open_chain(chain_settings(anvil.url, chain_max_connections=4))
    yield chain
    await close_chain(chain)


class Sampler:
    """Samples, from a thread, the client sockets this process holds to the node's port while RPCs run.

    ``peak``: most live (non TIME_WAIT) connections at once; ``ports``: every client port this process
    opened since sampling began, as the kernel lists them on either end (TIME_WAIT included).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.peak = 0
        self.ports: set[int] = set()
        self.samples = 0
        self.baseline = client_ports_seen(port)
        self.stopped = threading.Event()

    def sample(self) -> None:
        live = [p for p, s in connections_to(self.port, os.getpid()) if s != TIME_WAIT]
        self.peak = max(self.peak, len(live))
        self.ports.update(client_ports_seen(self.port) - self.baseline)
        self.samples += 1

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            time.sleep(0.002)


async def hammer(w3: AsyncWeb3, sampler: Sampler, total: int, parallel: int) -> int:
    done = 0
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    semaphore = asyncio.Semaphore(parallel)

    async def one(i: int) -> None:
        nonlocal done
        async with semaphore:
            if i % 2:
                await w3.eth.block_number
            else:
                await w3.eth.get_balance(to_checksum_address("0x" + f"{i:040x}"))
            done += 1

    try:
        await asyncio.gather(*(one(i) for i in range(total)))
    finally:
        sampler.stopped.set()
        await asyncio.to_thread(thread.join)
    sampler.sample()
    return done


async def test_connections_to_the_node_never_exceed_the_cap(node_chain: Chain, anvil: Anvil) -> None:  # noqa: F811
    sampler = Sampler(anvil.port)
    before = metrics.CHAIN_RPC_LATENCY.labels("eth_blockNumber")._sum.get()
    done = await hammer(node_chain.w3, sampler, total=2000, parallel=32)
    assert done == 2000
    assert sampler.samples > 20
    assert 1 <= sampler.peak <= 4, sampler.peak
    # the fixture's open_chain already holds one connection, so new ports are at most cap - 1... or cap
    assert len(sampler.ports) <= 4, f"{len(sampler.ports)} new client ports: connections were not reused"
    assert node_chain.open_connections() <= 4
    assert metrics.CHAIN_RPC_LATENCY.labels("eth_blockNumber")._sum.get() > before
    print(f"capped session: 2000 RPCs, peak {sampler.peak} connections, {len(sampler.ports)} client ports")

    # Contrast: web3 8's default session opens a new TCP connection per request.
    default = AsyncWeb3(AsyncHTTPProvider(anvil.url))
    contrast = Sampler(anvil.port)
    await hammer(default, contrast, total=200, parallel=32)
    await default.provider.disconnect()
    assert len(contrast.ports) > 50, f"web3's default session used only {len(contrast.ports)} ports for 200 RPCs"
    print(f"web3 default session: 200 RPCs, peak {contrast.peak} connections, {len(contrast.ports)} client ports")


async def test_rpcs_retry_transient_errors_then_succeed(runner_env: dict[str, str]) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        body = await request.json()
        if calls <= 2:
            return web.Response(status=503, text="warming up")
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": "0x7a69"})

    server = web.Application()
    server.router.add_post("/", handler)
    runner_ = web.AppRunner(server)
    await runner_.setup()
    port = free_port()
    await web.TCPSite(runner_, "127.0.0.1", port).start()
    retries = metrics.CHAIN_RPC_RETRIES.labels("eth_chainId")._value.get()
    try:
        chain = await open_chain(chain_settings(f"http://127.0.0.1:{port}", chain_retry_attempts=4))
        assert chain.chain_id == 31337
        assert calls == 3
        assert metrics.CHAIN_RPC_RETRIES.labels("eth_chainId")._value.get() == retries + 2
        await close_chain(chain)
    finally:
        await runner_.cleanup()


async def test_refused_connections_give_up_with_a_typed_error(runner_env: dict[str, str]) -> None:
    port = free_port()  # nothing listens there
    retries = metrics.CHAIN_RPC_RETRIES.labels("eth_chainId")._value.get()
    with pytest.raises(ChainUnavailable, match="did not answer eth_chainId after 3 attempts") as caught:
        await open_chain(chain_settings(f"http://127.0.0.1:{port}/secret-api-key", chain_retry_attempts=3))
    assert "secret-api-key" not in str(caught.value)
    assert metrics.CHAIN_RPC_RETRIES.labels("eth_chainId")._value.get() == retries + 2


async def test_rpcs_survive_a_node_restart(anvil: Anvil, runner_env: dict[str, str]) -> None:  # noqa: F811
    chain = await open_chain(chain_settings(anvil.url, chain_retry_attempts=30))
    try:
        first = await chain.block_number()
        anvil.stop()

        async def restart_later() -> None:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(anvil.start)

        restarting = asyncio.create_task(restart_later())
        assert await chain.block_number() >= first  # refused while down, retried until it is back
        await restarting
    finally:
        await close_chain(chain)


async def test_nonces_stay_contiguous_under_concurrency_and_resync(
    node_chain: Chain, anvil: Anvil,  # noqa: F811
) -> None:
    start = await node_chain.w3.eth.get_transaction_count(node_chain.address)

    async def send(i: int) -> str:
        return await node_chain.send_transaction(to=node_chain.address, data=b"", gas=21_000, value=i)

    hashes = await asyncio.gather(*(send(i) for i in range(60)))
    for tx_hash in hashes:
        await node_chain.wait_receipt(tx_hash, 30)

    # Another process signs with the same key: our cached next nonce is now stale.
    other = await open_chain(chain_settings(anvil.url))
    try:
        await other.wait_receipt(await other.send_transaction(to=other.address, data=b"", gas=21_000), 30)
    finally:
        await close_chain(other)
    resyncs = metrics.CHAIN_NONCE_RESYNCS._value.get()
    hashes += await asyncio.gather(*(send(i) for i in range(10)))
    assert metrics.CHAIN_NONCE_RESYNCS._value.get() > resyncs
    for tx_hash in hashes[-10:]:
        await node_chain.wait_receipt(tx_hash, 30)

    nonces = sorted([int((await node_chain.w3.eth.get_transaction(h))["nonce"]) for h in hashes])
    assert len(set(nonces)) == len(nonces) == 70
    end = await node_chain.w3.eth.get_transaction_count(node_chain.address)
    assert end == await node_chain.w3.eth.get_transaction_count(node_chain.address, "pending")
    assert end - start == 71  # ours and the other process's, no gap and no reuse
    assert len(set(range(start, end)) - set(nonces)) == 1  # the other process's transaction


async def test_in_process_chain_lives_with_the_process(runner_env: dict[str, str]) -> None:
    chain = await open_chain(chain_settings(None))
    try:
        assert chain.kind == "in-process"
        address, _ = await chain.deploy(bytes.fromhex(ARTIFACT["bytecode"][2:]), 1_500_000, 10)
        assert await chain.code_at(address)
    finally:
        await close_chain(chain)
    again = await open_chain(chain_settings(None))
    try:
        assert await again.code_at(address) == b""  # a new process (or provider) starts a new chain
    finally:
        await close_chain(again)


async def test_the_cached_session_caps_and_keeps_connections_alive(node_chain: Chain) -> None:
    session = node_chain.provider.session
    assert isinstance(session, aiohttp.ClientSession)
    assert session.connector is not None and session.connector.limit == 4
    assert not session.connector.force_close


async def test_a_nonce_gap_left_by_the_node_is_filled_and_nothing_queued_behind_it_mines(
    node_chain: Chain, anvil: Anvil,  # noqa: F811
) -> None:
    """The node loses a transaction we sent (a restart): ours queued behind the gap must never mine once
    its work was given up on and redone; the resync fills the gap with no-ops, highest nonce first."""
    lost_to, queued_to, redone_to = (to_checksum_address(f"0x{n:040x}") for n in (0xA1, 0xA2, 0xA3))
    start = await node_chain.w3.eth.get_transaction_count(node_chain.address)
    await node_chain.raw_request("evm_setAutomine", [False])
    lost = await node_chain.send_transaction(to=lost_to, data=b"", gas=21_000, value=1)
    await node_chain.send_transaction(to=queued_to, data=b"", gas=21_000, value=2)
    await node_chain.raw_request("anvil_dropTransaction", [lost])  # nonce `start` is gone; `start + 1` waits
    await node_chain.raw_request("evm_setAutomine", [True])
    await node_chain.raw_request("evm_mine", [])
    with pytest.raises(ChainTimeout):
        await node_chain.wait_receipt(lost, 0.5)  # given up on: the next send re-reads the nonce

    fills = metrics.CHAIN_NONCE_GAP_FILLS._value.get()
    redone = await node_chain.send_transaction(to=redone_to, data=b"", gas=21_000, value=3)
    await node_chain.wait_receipt(redone, 30)
    assert metrics.CHAIN_NONCE_GAP_FILLS._value.get() == fills + 2
    balances = [await node_chain.w3.eth.get_balance(a) for a in (lost_to, queued_to, redone_to)]
    assert balances == [0, 0, 3]  # the queued transaction was replaced, not mined behind the no-op
    end = await node_chain.w3.eth.get_transaction_count(node_chain.address)
    assert end == start + 3 == await node_chain.w3.eth.get_transaction_count(node_chain.address, "pending")


async def test_a_node_ahead_of_our_nonces_warns_of_a_second_process_with_the_key(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A resync that finds more transactions of our key than this process sent: another process holds the
    key (nonces stay right, but every clash costs a resync), so say so once per such resync."""
    from runner.chain import NonceManager

    node = {"count": 3}

    async def fetch(_sender: str) -> int:
        return node["count"]

    nonces = NonceManager(fetch)
    async with nonces.reserve("0xA") as first:
        assert first.nonce == 3
        first.used = True
    node["count"] = 6  # 4 was ours; 4 and 5 came from elsewhere
    async with nonces.reserve("0xA") as clash:
        assert clash.nonce == 4
        clash.stale = True  # the node said "nonce too low"
    async with nonces.reserve("0xA") as again:
        assert again.nonce == 6
        again.used = True
    assert nonces.foreign_sends == 1
    shown = capsys.readouterr()  # structlog's console output, wherever this process configured it
    assert "another process is sending with this signing key" in shown.out + shown.err


async def test_a_deployment_never_takes_an_address_it_must_avoid(node_chain: Chain) -> None:
    """After a reset to a fresh chain the redeployed ConsensusMain must not get the old address (batches
    signed for the old chain may still be mined there): the nonce that would give it is spent on a no-op."""
    from runner.chain import create_address
    from runner.jobs.consensus.contract import DEPLOY_GAS, artifact

    bytecode = bytes.fromhex(artifact()["bytecode"].removeprefix("0x"))
    nonce = await node_chain.w3.eth.get_transaction_count(node_chain.address, "pending")
    old = create_address(node_chain.address, nonce)
    address, _ = await node_chain.deploy(bytecode, DEPLOY_GAS, 30, not_at=old)
    assert address != old and address == create_address(node_chain.address, nonce + 1)
    assert await node_chain.code_at(old) == b""
    plain, _ = await node_chain.deploy(bytecode, DEPLOY_GAS, 30)  # CREATE's address, as the node computes it
    assert plain == create_address(node_chain.address, nonce + 2)


async def test_two_processes_sending_the_same_signed_transaction_both_get_its_hash(
    node_chain: Chain, anvil: Anvil,  # noqa: F811
) -> None:
    """Two processes with one key sign the very same transaction (the same deployment at the same nonce and
    fees, byte for byte): the node answers the second "transaction already imported", which is that very
    transaction, not a failure (seen when two workers started at once under CPU load)."""
    other = await open_chain(chain_settings(anvil.url))
    try:
        await asyncio.gather(node_chain._fee_fields(), other._fee_fields())
        other._fees = node_chain._fees  # same fees, so the same bytes
        # the same nonce: both read the node's count before either sends (read at the send, one saw the
        # other's transaction mined and signed the next nonce: two transactions, seen under two CPU hogs)
        for chain_ in (node_chain, other):
            async with chain_.nonces.reserve(chain_.address):
                pass
        assert node_chain.nonces.peek(node_chain.address) == other.nonces.peek(other.address)
        first, second = await asyncio.gather(
            node_chain.send_transaction(to=node_chain.address, data=b"same", gas=30_000),
            other.send_transaction(to=node_chain.address, data=b"same", gas=30_000))
        assert first == second
        assert (await node_chain.wait_receipt(first, 30)).status == 1
    finally:
        await close_chain(other)
