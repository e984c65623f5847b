"""The engine's one AsyncWeb3 per process, its capped keep-alive session, retried RPCs and nonces.

Two backends, chosen by ``RUNNER_CHAIN_URL``:

* **A node over HTTP** (anvil, hardhat, geth, ...): one :class:`RetryingHTTPProvider` with an aiohttp
  session cached on it, made inside the running loop. Its ``TCPConnector`` keeps connections alive and
  caps them at ``RUNNER_CHAIN_MAX_CONNECTIONS``; web3 8's default session (``force_close=True``) would
  open one TCP connection per request instead. web3's own retries are off; every RPC is retried here
  with tenacity on refused/reset connections, timeouts and HTTP 5xx/429, logged and counted
  (``runner_chain_rpc_retries_total``), and gives up with :class:`ChainUnavailable`.
* **In-process** (``RUNNER_CHAIN_URL`` unset): ``AsyncEthereumTesterProvider`` from
  ``eth-tester[py-evm]``. It is for development only: it computes each request synchronously inside the
  event loop (blocking it for the duration of the EVM work), and the chain lives only as long as the
  process, so anything stored about it (a contract address) is stale after a restart.
  Without that extra :func:`open_chain` raises ``runner.errors.ChainNotConfigured`` (plugins turn off).

Transactions are signed locally with ``RUNNER_CHAIN_PRIVATE_KEY`` (unset: a public development key,
with a warning) and sent raw. :class:`NonceManager` holds one ``asyncio.Lock`` per sender across
"reserve nonce, sign, send": concurrent tasks never reuse or skip a nonce, a failed send gives its
nonce back, and a nonce error from the node re-reads the sender's pending count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import rlp
from eth_account import Account
from eth_account._utils.signing import sign_transaction_dict
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3RPCError
from web3.types import RPCEndpoint, RPCResponse

from runner import metrics
from runner.config import Settings
from runner.errors import ChainNotConfigured, RunnerError
from runner.logs import get_logger

log = get_logger("runner.chain")

# Well-known development keys (public; never for real funds): anvil's/hardhat's account 0, and the
# first account eth-tester funds (private key 1).
DEV_KEY_NODE = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
DEV_KEY_IN_PROCESS = "0x" + "00" * 31 + "01"

KEEPALIVE_S = 30.0  # idle connections are kept this long, then closed by aiohttp
RETRY_INITIAL_S = 0.1
RETRY_MAX_S = 2.0
FEES_TTL_S = 15.0
SEND_ATTEMPTS = 5  # nonce resyncs / fee refreshes before a send gives up
RECEIPT_POLL_MIN_S = 0.002
RECEIPT_POLL_MAX_S = 0.1
GWEI = 10**9
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class ChainError(RunnerError):
    """A chain call failed for a reason retrying the same call will not fix."""


class ChainUnavailable(ChainError):
    """The node kept failing with transient errors (refused, reset, timeout, 5xx) past the retry budget."""


class ChainTimeout(ChainError):
    """A sent transaction was not mined within the wait."""


class TransactionReverted(ChainError):
    pass


def is_transient(error: BaseException) -> bool:
    """Errors after which the same RPC may succeed: the node is restarting, overloaded or far away."""
    if isinstance(error, aiohttp.ClientResponseError):
        return error.status in RETRYABLE_STATUS
    return isinstance(error, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | TimeoutError | OSError)


def safe_url(url: str) -> str:
    """scheme://host:port only: node URLs often carry API keys in the path or query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{parts.port}" if parts.port else f"{parts.scheme}://{host}"


class RetryingHTTPProvider(AsyncHTTPProvider):
    """web3's AsyncHTTPProvider with its own retries off and every RPC retried with tenacity."""

    def __init__(self, url: str, *, timeout_s: float, attempts: int) -> None:
        super().__init__(
            url,
            request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout_s)},
            exception_retry_configuration=None,
        )
        self.attempts = attempts
        self.safe_url = safe_url(url)
        self.session: aiohttp.ClientSession | None = None

    async def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        started = time.monotonic()
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential_jitter(multiplier=RETRY_INITIAL_S, max=RETRY_MAX_S, jitter=RETRY_INITIAL_S),
            before_sleep=lambda state: self._count_retry(method, state),
        )
        try:
            async for attempt in retrying:
                with attempt:
                    response: RPCResponse = await super().make_request(method, params)
        except RetryError as error:
            cause = error.last_attempt.exception()
            metrics.CHAIN_RPC_ERRORS.labels(method).inc()
            log.error("chain node unreachable, giving up", method=method, node=self.safe_url,
                      attempts=self.attempts, error=repr(cause))
            raise ChainUnavailable(
                f"chain node {self.safe_url} did not answer {method} after {self.attempts} attempts: {cause!r}"
            ) from cause
        except Exception:
            metrics.CHAIN_RPC_ERRORS.labels(method).inc()
            raise
        finally:
            metrics.CHAIN_RPC_LATENCY.labels(method).observe(time.monotonic() - started)
            metrics.CHAIN_OPEN_CONNECTIONS.set(self.open_connections())
        return response

    def _count_retry(self, method: str, state: RetryCallState) -> None:
        metrics.CHAIN_RPC_RETRIES.labels(method).inc()
        error = state.outcome.exception() if state.outcome else None
        log.warning("chain rpc retry", method=method, node=self.safe_url, attempt=state.attempt_number,
                    max_attempts=self.attempts, error=repr(error), backoff_s=round(state.upcoming_sleep, 3))

    def open_connections(self) -> int:
        """TCP connections the cached session holds (in use + idle keep-alive)."""
        connector = self.session.connector if self.session is not None else None
        if connector is None:
            return 0
        idle = sum(len(conns) for conns in getattr(connector, "_conns", {}).values())
        return idle + len(getattr(connector, "_acquired", ()))


@dataclass
class NonceReservation:
    sender: str
    nonce: int
    used: bool = False  # the node accepted a transaction with this nonce: advance
    stale: bool = False  # the node disagreed with our count: re-read it before the next reservation


class NonceManager:
    """Per-sender next nonce, handed out under a per-sender lock held across reserve/sign/send.

    A resync that finds the node behind what we handed out (a restarted node lost transactions we sent)
    first fills every nonce from the node's count to ours with ``cancel`` (a no-op transaction), highest
    first: a transaction of ours still queued behind the gap is replaced, never mined after its work was
    given up on and done again under another nonce.
    """

    def __init__(self, fetch: Callable[[str], Awaitable[int]],
                 cancel: Callable[[str, int], Awaitable[None]] | None = None) -> None:
        self._fetch = fetch
        self._cancel = cancel
        self._next: dict[str, int] = {}
        self._handed_out: dict[str, int] = {}  # next nonce before a resync: what the node may hold queued
        self._locks: dict[str, asyncio.Lock] = {}
        self.foreign_sends = 0  # resyncs that found the node ahead of us: another process with our key

    @asynccontextmanager
    async def reserve(self, sender: str) -> AsyncIterator[NonceReservation]:
        lock = self._locks.setdefault(sender, asyncio.Lock())
        async with lock:
            if sender not in self._next:
                self._next[sender] = await self._resync(sender)
            reservation = NonceReservation(sender, self._next[sender])
            try:
                yield reservation
            finally:
                if reservation.used:
                    self._next[sender] = reservation.nonce + 1
                elif reservation.stale:
                    known = self._next.pop(sender, None)
                    if known is not None:
                        self._handed_out[sender] = max(known, self._handed_out.get(sender, 0))
                    metrics.CHAIN_NONCE_RESYNCS.inc()

    async def _resync(self, sender: str) -> int:
        count = await self._fetch(sender)
        handed_out = self._handed_out.pop(sender, count)
        if count > handed_out:  # the node counts transactions of this key that this process never sent
            self.foreign_sends += 1
            log.warning("another process is sending with this signing key: one key belongs to one worker "
                        "process (give each its own RUNNER_CHAIN_PRIVATE_KEY)", sender=sender, node_nonce=count,
                        ours=handed_out)
        if self._cancel is None or handed_out <= count:
            return count
        for nonce in range(handed_out - 1, count - 1, -1):  # highest first: nothing queued can slip through
            await self._cancel(sender, nonce)
        return handed_out

    def peek(self, sender: str) -> int | None:
        return self._next.get(sender)


# "already imported": anvil's word for a raw transaction it holds already (two processes with one key
# signed the very same deployment at start-up, byte for byte)
_NONCE_ERRORS = ("nonce too low", "nonce too high", "invalid nonce", "already known", "already imported",
                 "known transaction",
                 "replacement transaction underpriced", "nonce has already been used")
_FEE_ERRORS = ("max fee per gas less than block base fee", "fee cap less than block base fee",
               "transaction underpriced", "maxfeepergas")


def _int(value: int | str) -> int:
    return int(value, 16) if isinstance(value, str) else int(value)


@dataclass(frozen=True)
class Receipt:
    status: int
    block_number: int
    gas_used: int
    contract_address: str | None
    logs: int
    # (address, topic0, topic1) of each log, lower-case hex: who emitted what (ConsensusMain: the event and
    # its transaction id)
    log_keys: tuple[tuple[str, str, str], ...] = ()


@dataclass
class Fees:
    max_fee: int
    tip: int
    fetched_at: float


@dataclass
class Chain:
    """The process-wide chain handle (stored by the consensus plugin at ``app.resources["chain"]``)."""

    w3: AsyncWeb3
    kind: Literal["node", "in-process"]
    node: str
    account: LocalAccount
    chain_id: int
    provider: Any
    nonces: NonceManager = field(init=False)
    # every key this process signs with, by address: its own, and validators' (each its own nonce lane)
    signers: dict[str, LocalAccount] = field(init=False)
    _fees: Fees | None = None

    def __post_init__(self) -> None:
        self.nonces = NonceManager(self._pending_count, self._cancel_nonce)
        self.signers = {str(self.account.address): self.account}

    def add_signer(self, private_key: str) -> str:
        """Sign with this key too (a validator's own transactions, through this same provider); its
        address. The key stays in memory only."""
        account: LocalAccount = Account.from_key(private_key)
        self.signers[str(account.address)] = account
        return str(account.address)

    @property
    def address(self) -> str:
        return str(self.account.address)

    # --- reads ----------------------------------------------------------------------------------
    async def _pending_count(self, sender: str) -> int:
        return int(await self.w3.eth.get_transaction_count(to_checksum_address(sender), "pending"))

    async def code_at(self, address: str) -> bytes:
        return bytes(await self.w3.eth.get_code(to_checksum_address(address)))

    async def call(self, to: str, data: bytes) -> bytes:
        """eth_call; a revert (or a node refusing the call) is a ChainError."""
        try:
            return bytes(await self.w3.eth.call({"to": to_checksum_address(to), "data": data}))
        except (ContractLogicError, Web3RPCError) as error:
            raise ChainError(f"eth_call to {to} failed: {error}") from error

    async def block_number(self) -> int:
        return int(await self.w3.eth.block_number)

    async def get_logs(self, params: dict[str, Any]) -> list[Any]:
        """Logs by filter. The node refusing the filter (a range past its head: a chain reset under a
        stored deployment) is a ChainError, as an outage is: never the consensus transaction's fault."""
        try:
            return list(await self.w3.eth.get_logs(params))  # type: ignore[arg-type]
        except Web3RPCError as error:
            raise ChainError(f"eth_getLogs failed: {str(error)[:300]}") from None

    async def raw_request(self, method: str, params: list[Any]) -> Any:
        """One RPC straight to the provider (retried like every RPC), skipping web3's middleware and
        formatters, which walk every log of a receipt in Python; for the in-process provider, through
        the middleware (it translates eth-tester's results)."""
        if isinstance(self.provider, RetryingHTTPProvider):
            response = await self.provider.make_request(RPCEndpoint(method), params)
            if "error" in response:
                raise ChainError(f"{method} failed: {response['error']}")
            return response.get("result")
        return await self.w3.manager.coro_request(RPCEndpoint(method), params)

    async def receipt(self, tx_hash: str) -> Receipt | None:
        """The receipt's few fields we use (a ConsensusMain batch's receipt carries hundreds of logs)."""
        raw = await self.raw_request("eth_getTransactionReceipt", [tx_hash])
        if raw is None:
            return None
        return Receipt(status=_int(raw["status"]), block_number=_int(raw["blockNumber"]),
                       gas_used=_int(raw["gasUsed"]), contract_address=raw.get("contractAddress"),
                       logs=len(raw.get("logs") or ()), log_keys=tuple(_log_key(e) for e in raw.get("logs") or ()))

    async def _known(self, tx_hash: str) -> bool:
        try:
            await self.w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
            return True
        except TransactionNotFound:
            return False

    async def _fee_fields(self) -> Fees:
        if self._fees is None or time.monotonic() - self._fees.fetched_at > FEES_TTL_S:
            block = await self.w3.eth.get_block("latest")
            price = int(await self.w3.eth.gas_price)
            base = int(block.get("baseFeePerGas") or price)
            tip = max(price - base, GWEI // 10)
            self._fees = Fees(max_fee=2 * base + tip, tip=tip, fetched_at=time.monotonic())
        return self._fees

    # --- writes ---------------------------------------------------------------------------------
    async def send_transaction(self, *, to: str | None, data: bytes, gas: int, value: int = 0,
                               sender: str | None = None) -> str:
        """Sign with the next nonce of ``sender`` (a key given to add_signer; default this process's own)
        and send; return the transaction hash (0x-hex). Does not wait."""
        account = self.signers[sender] if sender is not None else self.account
        sender = str(account.address)
        for _ in range(SEND_ATTEMPTS):
            fees = await self._fee_fields()
            async with self.nonces.reserve(sender) as slot:
                fields: dict[str, Any] = {
                    "chainId": self.chain_id, "nonce": slot.nonce, "gas": gas, "value": value, "data": data,
                    "maxFeePerGas": fees.max_fee, "maxPriorityFeePerGas": fees.tip, "type": 2,
                }
                if to is not None:
                    fields["to"] = to_checksum_address(to)
                raw = self._sign(fields, account)
                tx_hash = "0x" + keccak(raw).hex()
                try:
                    await self.w3.eth.send_raw_transaction(raw)
                except Web3RPCError as error:
                    text = str(error).lower()
                    if any(marker in text for marker in _NONCE_ERRORS):
                        if await self._known(tx_hash):  # an earlier attempt of this very send got through
                            slot.used = True
                            return tx_hash
                        slot.stale = True
                        log.warning("nonce rejected; re-reading it from the node", sender=sender,
                                    nonce=slot.nonce, error=str(error)[:200])
                        continue
                    if any(marker in text for marker in _FEE_ERRORS):
                        self._fees = None
                        continue
                    raise ChainError(f"the node rejected a transaction: {error}") from error
                slot.used = True
                metrics.CHAIN_SENDS.inc()
                return tx_hash
        raise ChainError(f"could not send a transaction from {sender} after {SEND_ATTEMPTS} attempts")

    async def _cancel_nonce(self, sender: str, nonce: int) -> None:
        """Fill ``nonce`` with a no-op (0 to ourselves) priced to replace whatever of ours the node still
        holds queued at it. Called by the nonce manager under the sender's lock."""
        fees = await self._fee_fields()
        account = self.signers.get(sender, self.account)
        bump = 2
        for _ in range(SEND_ATTEMPTS):
            raw = self._sign(account=account, fields={
                "chainId": self.chain_id, "nonce": nonce, "gas": 21_000, "value": 0,
                "to": to_checksum_address(sender), "data": b"", "type": 2,
                "maxFeePerGas": bump * fees.max_fee, "maxPriorityFeePerGas": bump * fees.tip,
            })
            try:
                await self.w3.eth.send_raw_transaction(raw)
            except Web3RPCError as error:
                text = str(error).lower()
                if "underpriced" in text:
                    bump *= 2
                    continue
                if any(marker in text for marker in ("nonce too low", "already known",
                                                     "nonce has already")):
                    return  # already mined (ours or this very no-op): nothing left to replace
                raise ChainError(f"the node refused the no-op for nonce {nonce}: {error}") from error
            metrics.CHAIN_NONCE_GAP_FILLS.inc()
            log.warning("filled a nonce gap with a no-op", sender=sender, nonce=nonce)
            return
        raise ChainError(f"could not fill nonce {nonce} of {sender} after {SEND_ATTEMPTS} attempts")

    @staticmethod
    def _sign(fields: dict[str, Any], account: LocalAccount) -> bytes:
        """The signed raw transaction. eth_account's Account.sign_transaction re-derives the key pair
        from the private key on every call; signing with the account's key object skips that."""
        *_, encoded = sign_transaction_dict(account._key_obj, fields)
        return bytes(encoded)

    async def wait_receipt(self, tx_hash: str, timeout_s: float, sender: str | None = None) -> Receipt:
        """Poll for the receipt with a short, growing interval; raise on revert or timeout (then the
        nonce of ``sender``, default this process's own key, is read again before its next send)."""
        sender = sender or self.address
        deadline = time.monotonic() + timeout_s
        delay = RECEIPT_POLL_MIN_S
        while True:
            try:
                receipt = await self.receipt(tx_hash)
            except ChainError:
                # The node did not answer: it may come back without what we sent (a restart). Re-read the
                # nonce before the next send, filling any gap it left (see NonceManager).
                async with self.nonces.reserve(sender) as slot:
                    slot.stale = True
                raise
            if receipt is not None:
                if receipt.status != 1:
                    raise TransactionReverted(f"transaction {tx_hash} reverted (gas used {receipt.gas_used})")
                return receipt
            if time.monotonic() >= deadline:
                # It may have been dropped (a nonce gap, a restarted node): count again from the node.
                async with self.nonces.reserve(sender) as slot:
                    slot.stale = True
                raise ChainTimeout(f"transaction {tx_hash} not mined within {timeout_s:g}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECEIPT_POLL_MAX_S)

    async def deploy(self, bytecode: bytes, gas: int, timeout_s: float, *,
                     not_at: str | None = None) -> tuple[str, int]:
        """Deploy a contract; return its address and the block it was mined in.

        ``not_at``: an address the contract must not get. After a reset to a fresh chain our nonces start
        again from 0, so a redeployment would land at the old deployment's address, where a batch signed
        for the old chain (re-sent to the new node by the RPC retries, mined once our nonces catch up)
        would still emit its stale events. A no-op moves the nonce past it first."""
        for _ in range(SEND_ATTEMPTS):
            nonce = self.nonces.peek(self.address)
            if nonce is None:
                nonce = await self._pending_count(self.address)
            if not_at is None or create_address(self.address, nonce) != to_checksum_address(not_at):
                break
            log.info("moving the nonce past the old deployment's address", address=not_at, nonce=nonce)
            await self.wait_receipt(await self.send_transaction(to=self.address, data=b"", gas=21_000), timeout_s)
        tx_hash = await self.send_transaction(to=None, data=bytecode, gas=gas)
        receipt = await self.wait_receipt(tx_hash, timeout_s)
        if receipt.contract_address is None:
            raise ChainError(f"deployment {tx_hash} created no contract")
        return to_checksum_address(receipt.contract_address), receipt.block_number

    def open_connections(self) -> int:
        return self.provider.open_connections() if isinstance(self.provider, RetryingHTTPProvider) else 0

    async def close(self) -> None:
        if isinstance(self.provider, RetryingHTTPProvider):
            await self.provider.disconnect()
            self.provider.session = None


async def _node_provider(settings: Settings, url: str) -> RetryingHTTPProvider:
    provider = RetryingHTTPProvider(url, timeout_s=settings.chain_rpc_timeout, attempts=settings.chain_retry_attempts)
    cap = settings.chain_max_connections
    connector = aiohttp.TCPConnector(limit=cap, limit_per_host=cap, keepalive_timeout=KEEPALIVE_S)
    # Cached on the provider inside the running loop, before the first request: web3 would otherwise
    # make its own session with force_close=True (a new TCP connection for every RPC).
    provider.session = await provider.cache_async_session(aiohttp.ClientSession(connector=connector))
    return provider


# What the in-process chain needs (the `chain` extra): eth-tester and its py-evm backend (module `eth`).
IN_PROCESS_CHAIN_MODULES = ("eth_tester", "eth")
NO_CHAIN = "no RUNNER_CHAIN_URL and no in-process chain (pip install 'runner-pg[chain]')"


def in_process_chain_available() -> bool:
    """Whether the `chain` extra is installed (checked without importing it: py-evm takes a while)."""
    from importlib.util import find_spec

    try:
        return all(find_spec(name) is not None for name in IN_PROCESS_CHAIN_MODULES)
    except (ImportError, ValueError):  # a broken or half-installed package
        return False


def _in_process_provider() -> Any:
    # web3's eth_tester module imports without eth-tester; the provider's constructor is what needs it.
    if not in_process_chain_available():
        raise ChainNotConfigured(NO_CHAIN)
    from web3.providers.eth_tester import AsyncEthereumTesterProvider

    try:
        return AsyncEthereumTesterProvider()
    except ImportError as error:  # pragma: no cover - found, but it does not import (a broken install)
        raise ChainNotConfigured(f"{NO_CHAIN}: {type(error).__name__}: {error}") from error


async def open_chain(settings: Settings) -> Chain:
    """Make the process's one AsyncWeb3 (call inside the running loop) and check the node answers."""
    key = settings.chain_private_key.get_secret_value() if settings.chain_private_key else None
    if settings.chain_url:
        provider: Any = await _node_provider(settings, settings.chain_url)
        kind: Literal["node", "in-process"] = "node"
        node = provider.safe_url
    else:
        provider = _in_process_provider()
        kind, node = "in-process", "in-process eth-tester"
    if key is None:
        key = DEV_KEY_NODE if kind == "node" else DEV_KEY_IN_PROCESS
        log.warning("RUNNER_CHAIN_PRIVATE_KEY is unset; signing with a public development key", node=node)
    try:
        account: LocalAccount = Account.from_key(key)
    except (ValueError, TypeError):
        raise RunnerError("RUNNER_CHAIN_PRIVATE_KEY is not a valid private key (32 bytes, hex)") from None
    w3 = AsyncWeb3(provider)
    try:
        chain_id = int(await w3.eth.chain_id)
    except BaseException:
        if isinstance(provider, RetryingHTTPProvider):
            await provider.disconnect()
        raise
    chain = Chain(w3=w3, kind=kind, node=node, account=account, chain_id=chain_id, provider=provider)
    log.info("chain open", node=node, kind=kind, chain_id=chain_id, sender=chain.address,
             max_connections=settings.chain_max_connections if kind == "node" else None)
    return chain


async def close_chain(chain: Chain | None) -> None:
    if chain is not None:
        await chain.close()


def create_address(sender: str, nonce: int) -> str:
    """The address CREATE gives a contract deployed by ``sender`` with ``nonce``."""
    return to_checksum_address(keccak(rlp.encode([bytes.fromhex(sender.removeprefix("0x")), nonce]))[12:])


def _log_key(entry: dict[str, Any]) -> tuple[str, str, str]:
    topics = [str(t).lower() for t in entry.get("topics") or ()]
    return (str(entry.get("address", "")).lower(), topics[0] if topics else "", topics[1] if len(topics) > 1 else "")
