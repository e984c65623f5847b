"""``runner submit`` and ``runner tx``: database only (the chain is the worker's business)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from runner.cli import fail, json_default, settings_or_exit, with_app
from runner.errors import UsageError

if TYPE_CHECKING:
    from runner.app import App

EVENT_COLUMNS = ("activated", "proposed", "committed", "revealed", "decided", "finalized")


def submit_command(
    to: Annotated[str, typer.Option("--to", help="Address of the contract the transaction targets")],
    input_: Annotated[str, typer.Option("--input", help='JSON object, e.g. {"op":"set","key":"a","value":1}')],
    from_: Annotated[str | None, typer.Option("--from", help="Sender address (default: the chain signer)")] = None,
) -> None:
    """Submit a consensus transaction (prints its hash); a worker takes it through consensus."""
    from runner.jobs.consensus.executor import KeyValueExecutor
    from runner.jobs.consensus.model import default_sender, new_submission, parse_address, parse_input
    from runner.jobs.consensus.store import ConsensusStore

    settings = settings_or_exit()
    try:
        to_address = parse_address(to, "--to")
        from_address = parse_address(from_, "--from") if from_ is not None else default_sender(settings)
        data = parse_input(input_)
        KeyValueExecutor().validate(data)
    except UsageError as error:
        raise fail(str(error), 2) from None
    submission = new_submission(from_address, to_address, data)

    async def body(app: App) -> None:
        await ConsensusStore(app).insert([submission])

    with_app(settings, body)
    print(submission.hash)


def tx_command(
    args: Annotated[list[str], typer.Argument(
        metavar="[cancel] HASH", help="The hash `runner submit` printed (or a prefix of 8+ hex digits); with "
                                      "`cancel` first, cancel that PENDING transaction instead of showing it")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable")] = False,
) -> None:
    """One consensus transaction: status, leader, votes, result and the chain tx of each event.
    `runner tx cancel HASH` cancels a PENDING one (its contract's next transaction goes on)."""
    from runner.jobs.consensus.model import parse_tx_hash
    from runner.jobs.consensus.store import ConsensusStore

    settings = settings_or_exit()
    cancel = len(args) == 2 and args[0] == "cancel"
    if len(args) != 1 and not cancel:
        raise fail("give one transaction hash, or `cancel` and one hash", 2)
    try:
        key = parse_tx_hash(args[-1])
    except UsageError as error:
        raise fail(str(error), 2) from None
    if cancel:
        async def cancel_body(app: App) -> str:
            store = ConsensusStore(app)
            return await store.cancel(key, "cancelled by `runner tx cancel`")

        full_hash = with_app(settings, cancel_body)  # not found or past PENDING: one line, exit 2
        print(json.dumps({"hash": full_hash, "status": "CANCELED"}) if as_json else f"{full_hash} CANCELED")
        return

    async def body(app: App) -> dict[str, Any] | None:
        return await ConsensusStore(app).get(key)

    row = with_app(settings, body)  # a prefix matching several transactions exits 2 (UsageError)
    if row is None:
        raise fail(f"no consensus transaction with hash {key}", 2)
    row["events"] = {kind: row.pop(f"{kind}_event_tx") for kind in EVENT_COLUMNS}
    if as_json:
        print(json.dumps(row, default=json_default))
        return
    for line in describe(row):
        print(line)


def appeal_command(
    tx_hash: Annotated[str, typer.Argument(help="The decided transaction (hash, or a prefix of 8+ hex digits)")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable")] = False,
) -> None:
    """Appeal a decided transaction inside its window: ACCEPTED gets more validators (a validator appeal),
    UNDETERMINED or a timeout a new leader (a leader appeal). A worker settles it; `runner tx` shows it."""
    from runner.jobs.consensus import appeal
    from runner.jobs.consensus.model import parse_tx_hash

    settings = settings_or_exit()
    try:
        key = parse_tx_hash(tx_hash)
    except UsageError as error:
        raise fail(str(error), 2) from None
    full_hash, kind = with_app(settings, lambda app: appeal(app, key))  # not appealable: one line, exit 2
    print(json.dumps({"hash": full_hash, "appeal": kind}) if as_json else f"{full_hash} {kind} appeal requested")


def describe(row: dict[str, Any]) -> list[str]:
    """Plain lines (greppable, never wrapped mid-hash)."""
    status = row["status"] + (f" (outcome {row['outcome']})" if row.get("outcome") else "")
    lines = [f"hash            {row['hash']}", f"status          {status}",
             f"from            {row['from_address']}", f"to              {row['to_address']}",
             f"input           {json.dumps(row['input'])}", f"leader          {row['leader'] or '-'}",
             f"recoveries      {row['recovery_count']}", f"reason          {row['reason'] or '-'}",
             f"created         {row['created_at'].isoformat()}"]
    if row.get("finalized_at"):
        lines.append(f"finalized       {row['finalized_at'].isoformat()}")
    if row.get("result"):
        lines.append(f"result          {json.dumps(row['result'].get('output'))}")
        lines.append(f"receipt hash    {row['result'].get('receipt_hash')}")
    for vote in row.get("votes") or []:
        lines.append(f"vote            {vote['validator']} {vote.get('vote', 'committed')} {vote['commit']}")
    for kind, chain_tx in row["events"].items():
        lines.append(f"event {kind:<10}{chain_tx or '-'}")
    lines.append(f"round           {row.get('round', 0)}")
    if row.get("draw"):
        draw = row["draw"]
        lines.append(f"draw            seed {draw.get('seed')} (run round {draw.get('run_round')}), committee "
                     + " ".join(draw.get("committee") or []))
    for appeal in row.get("appeals") or []:
        lines.append(f"appeal          {appeal.get('kind')} round {appeal.get('round')} {appeal.get('outcome')} "
                     f"({len(appeal.get('validators') or [])} validators)")
    if row.get("appeal_requested"):
        lines.append(f"appeal          {row['appeal_requested']} requested, not settled yet")
    return lines


validators_cli = typer.Typer(no_args_is_help=True, help="The consensus validators: address, stake and where "
                                                         "each one's signing key is (never the key itself).")


@validators_cli.command("add")
def validators_add(
    stake: Annotated[int, typer.Option("--stake", help="Its weight in the draw of leaders and validators (1 or more)")],
    key: Annotated[str | None, typer.Option(
        "--key", help="Where a worker finds its private key: env:NAME, file:PATH or dev:N (anvil's public "
                      "development account N); its votes are then signed by it. The address is the key's")] = None,
    address: Annotated[str | None, typer.Option(
        "--address", help="Without --key: a validator whose votes the worker's own key sends")] = None,
) -> None:
    """Add a validator, or change an existing one's stake and key reference. Workers read the table when they
    start (restart them to apply a change)."""
    from runner.jobs.consensus.model import parse_address
    from runner.jobs.consensus.store import ConsensusStore
    from runner.jobs.consensus.validators import MAX_STAKE, Validator, check_key_ref, key_address

    settings = settings_or_exit()
    try:
        if not 1 <= stake <= MAX_STAKE:
            raise UsageError(f"--stake must be 1 to {MAX_STAKE}, got {stake}")
        if key is None and address is None:
            raise UsageError("give --key (a validator that signs its votes) or --address (one that does not)")
        chosen = parse_address(address, "--address") if address is not None else None
        if key is not None:
            of_key = key_address(check_key_ref(key))  # resolved here: a reference that points nowhere fails now
            if chosen is not None and chosen.lower() != of_key.lower():
                raise UsageError(f"--address {chosen} is not the address of the key {key} ({of_key})")
            chosen = of_key
    except UsageError as error:
        raise fail(str(error), 2) from None
    assert chosen is not None
    validator = Validator(chosen, stake, key)

    async def body(app: App) -> bool:
        return await ConsensusStore(app).put_validator(validator)

    added = with_app(settings, body)
    print(f"{chosen} {'added' if added else 'updated'} (stake {stake}, key {key or 'none: the worker signs'})")


@validators_cli.command("list")
def validators_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable")] = False) -> None:
    """Every validator: address, stake, share of the total stake, key reference."""
    from runner.jobs.consensus.store import ConsensusStore

    settings = settings_or_exit()

    async def body(app: App) -> list[dict[str, Any]]:
        return await ConsensusStore(app).validator_rows()

    rows = with_app(settings, body)
    total = sum(r["stake"] for r in rows)
    for row in rows:
        row["share"] = round(row["stake"] / total, 6) if total else 0.0
    if as_json:
        print(json.dumps(rows, default=json_default))
        return
    if not rows:
        print("no validators: workers draw from 64 synthetic ones of equal stake whose votes they sign")
    for row in rows:
        print(f"{row['address']}  stake {row['stake']:>8} ({100 * row['share']:5.1f}%)  key {row['key_ref'] or '-'}")


@validators_cli.command("remove")
def validators_remove(address: Annotated[str, typer.Argument(help="The validator's address")]) -> None:
    """Remove a validator (workers stop drawing it once restarted; its past votes stay on chain)."""
    from runner.jobs.consensus.model import parse_address
    from runner.jobs.consensus.store import ConsensusStore

    settings = settings_or_exit()
    try:
        checked = parse_address(address, "ADDRESS")
    except UsageError as error:
        raise fail(str(error), 2) from None

    async def body(app: App) -> bool:
        return await ConsensusStore(app).remove_validator(checked)

    if not with_app(settings, body):
        raise fail(f"no validator {checked}", 2)
    print(f"{checked} removed")


def register_commands(cli: typer.Typer) -> None:
    cli.command("submit")(submit_command)
    cli.command("tx")(tx_command)
    cli.command("appeal")(appeal_command)
    cli.add_typer(validators_cli, name="validators")
