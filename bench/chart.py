"""Bar chart of a bench/queue.py result: ``chart.py RESULT.json OUT.png``.

Runs in bench/.venv-competitors (matplotlib lives there, not in the runner venv).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLOURS = {"runner": "#2a7ab9", "pgqueuer": "#e08a2c", "procrastinate": "#7a9a3a"}


def bars(ax: Any, systems: list[str], values: list[float | None], title: str, unit: str, digits: int = 0) -> None:
    shown = [v if v is not None else 0 for v in values]
    rects = ax.bar(systems, shown, color=[COLOURS.get(s, "grey") for s in systems])
    for rect, value in zip(rects, values, strict=True):
        label = "-" if value is None else f"{value:,.{digits}f}"
        ax.annotate(label, (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(unit, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.margins(y=0.15)


def target(ax: Any, value: float, label: str, left: bool = False) -> None:
    ax.axhline(value, color="crimson", linestyle="--", linewidth=1)
    ax.set_ylim(top=max(ax.get_ylim()[1], value * 1.25))
    ax.annotate(label, (0.01 if left else 0.99, value), xycoords=("axes fraction", "data"),
                ha="left" if left else "right", va="bottom", fontsize=7, color="crimson")


def main() -> None:
    report = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    systems: list[str] = report["systems"]
    summary = report["summary"]
    config = report["config"]

    def get(system: str, phase: str, key: str) -> float | None:
        return summary.get(system, {}).get(phase, {}).get(key)

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    ax = axes[0][0]
    bars(ax, systems, [get(s, "p1", "drain_jobs_per_s") for s in systems],
         f"P1 drain, {config['p1_jobs']:,} no-op jobs, 1 process", "jobs/s (higher is better)")
    pgq = get("pgqueuer", "p1", "drain_jobs_per_s")
    if pgq:
        target(ax, 2 * pgq, "target: 2x pgqueuer", left=True)
    bars(axes[0][1], systems, [get(s, "p1", "enqueue_jobs_per_s") for s in systems],
         "P1 enqueue (bulk, whole process)", "jobs/s (higher is better)")

    ax = axes[0][2]
    width = 0.27
    for i, q in enumerate(("p50_ms", "p95_ms", "p99_ms")):
        values = [get(s, "p2", q) or 0 for s in systems]
        xs = [x + (i - 1) * width for x in range(len(systems))]
        rects = ax.bar(xs, values, width, label=q.removesuffix("_ms"), alpha=0.55 + 0.2 * i,
                       color=[COLOURS.get(s, "grey") for s in systems], edgecolor="black", linewidth=0.3)
        for rect, value in zip(rects, values, strict=True):
            ax.annotate(f"{value:.1f}", (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center",
                        va="bottom", fontsize=6, xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(range(len(systems)), systems)
    ax.set_yscale("log")
    ax.set_title(f"P2 enqueue -> handler start, {config['p2_rate']:g} jobs/s: p50 / p95 / p99", fontsize=9)
    ax.set_ylabel("ms, log scale (lower is better)", fontsize=8)
    ax.tick_params(labelsize=8)
    target(ax, 5, "p50 target 5 ms")
    target(ax, 25, "p99 target 25 ms")

    ax = axes[1][0]
    bars(ax, systems, [get(s, "p3", "max_connections_any_round") for s in systems],
         f"P3 peak server connections, pool max {config['p3_pool_max']}, {config['p3_concurrency']} sleeping jobs",
         "connections (lower is better)")
    target(ax, config["p3_pool_max"] + 1, "target: pool max + 1 listener", left=True)
    ax = axes[1][1]
    bars(ax, systems, [get(s, "p7", "worker_maxrss_mib") for s in systems],
         f"P7 peak RSS, {config['p7_concurrency']:,} sleeping jobs", "MiB (lower is better)")
    target(ax, 150, "target 150 MiB")

    ax = axes[1][2]
    ax.axis("off")
    m, pg = report["machine"], report["server"]
    lines = [
        f"median of {config['rounds']} rounds, {report['started_at']}",
        f"runner {report['runner_commit']}",
        f"{m['nproc']} cores, {m['ram_gib']} GiB RAM",
        f"PostgreSQL {pg['server_version']}, same host",
        f"Python {m['python']}",
        "",
        *[f"{t['target']}: {t['value']} ({'met' if t['met'] else 'NOT met'})" for t in report["targets"]],
        "",
        f"command: {report['command']}",
    ]
    ax.text(0, 1, "\n".join(lines), va="top", fontsize=8, family="monospace", wrap=True)
    fig.suptitle("runner vs pgqueuer 1.6 vs procrastinate 3.10 (one PostgreSQL, one worker process each)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
