from __future__ import annotations

from runner.app import App
from runner.queue import NewJob
from runner.worker import Worker


async def test_worker_drains_noop_jobs(app: App) -> None:
    ids = await app.queue.job_enqueue_many([NewJob("noop", {"i": i}) for i in range(50)])
    await Worker(app, drain=True, install_signal_handlers=False).run()
    counts = await app.queue.job_counts_by_status()
    assert counts == {"succeeded": 50}
    assert len(ids) == 50
