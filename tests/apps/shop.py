"""An application module with two kinds of its own, as a team would write it (run with --app)."""

from __future__ import annotations

from typing import Any

import runner

app = runner.App(name="shop")


def check_order(payload: dict[str, Any]) -> None:
    if not isinstance(payload.get("order_id"), int):
        raise ValueError("order_id must be an integer")


@app.job("charge_order", queue="shop", max_attempts=2, timeout=30, validate=check_order)
async def charge_order(ctx: runner.JobContext) -> dict[str, Any]:
    await ctx.progress(1, 1)
    return {"charged": ctx.payload["order_id"], "attempt": ctx.attempt}


def explode(order_id: int) -> None:
    raise RuntimeError(f"card declined for order {order_id}")


@app.job("refund_order", queue="shop", max_attempts=1)
async def refund_order(ctx: runner.JobContext) -> None:
    explode(ctx.payload["order_id"])
