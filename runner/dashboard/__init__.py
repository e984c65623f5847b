"""The operators' web dashboard: ``runner dashboard [--host 127.0.0.1] [--port 9188] [--read-only]``.

Pages (server-rendered, Jinja2 with autoescaping) and the same data as JSON under ``/api``:

- ``/`` (``/api/overview``): counts by queue, kind and status (never scanning history: the counts of
  ``runner status``), jobs finished per minute over the last hour, workers with heartbeat age and
  concurrency, running jobs with rate and ETA, the newest jobs.
- ``/jobs`` (``/api/jobs``): filters ``status``, ``kind``, ``queue`` (repeatable), ``error`` (text in the
  last error), keyset paging with ``before_id``; ``POST /jobs/bulk`` cancels or retries the selected ones.
- ``/jobs/ID`` (``/api/jobs/ID``): one job in full; ``POST /jobs/ID/cancel`` and ``POST /jobs/ID/retry``.
- ``/backfills``, ``/schedules`` (``POST /schedules/NAME/pause`` and ``/resume``), ``/consensus`` and
  ``/consensus/HASH``, each with its ``/api/...`` twin.

``RUNNER_DASHBOARD_MOUNT=true`` serves the same application under ``/dashboard/`` on the worker's HTTP
server (``runner.http``), with the same rules (its bind address counts).

Pages update themselves by polling their ``/api`` twin (``static/dashboard.js``, vendored: no build step,
no CDN). Security: see :mod:`runner.dashboard.security`.
"""

from __future__ import annotations

from runner.dashboard.security import (
    MOUNTED_WHERE,
    Auth,
    DashboardBindError,
    auth_from_settings,
    check_bind,
    is_loopback,
)
from runner.dashboard.server import DashboardError, build, serve

__all__ = ["MOUNTED_WHERE", "Auth", "DashboardBindError", "DashboardError", "auth_from_settings", "build",
           "check_bind", "is_loopback", "serve"]
