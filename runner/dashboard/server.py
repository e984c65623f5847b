"""The dashboard's aiohttp application: pages (Jinja2, autoescaped), their data as JSON under ``/api``,
actions as POSTs, and the vendored static files. See runner.dashboard for the routes."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web

from runner.dashboard import data
from runner.dashboard.security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    REALM,
    SAFE_METHODS,
    SECURITY_HEADERS,
    SESSION_COOKIE,
    Auth,
    browser_id,
    is_https,
    is_loopback,
    same_origin,
    set_cookie,
)
from runner.errors import JobNotFound, RunnerError, UsageError
from runner.logs import get_logger, redact
from runner.queue import STATUSES, JobFilter

if TYPE_CHECKING:
    from runner.app import App

log = get_logger("runner.dashboard")
HERE = Path(__file__).resolve().parent
POLL_MS = 2000
JSON_TYPE = "application/json"
NOTICES = {
    "cancelled": "Job cancelled.",
    "cancel-requested": "Cancel requested: the worker running the job stops it within a second.",
    "retried": "Job pending again, attempts reset.",
    "paused": "Schedule paused.",
    "resumed": "Schedule resumed from its next tick after now.",
    "bulk": "Bulk action done.",
    "logged-out": "Logged out.",
}
APP_KEY = web.AppKey("runner_app", object)
CONFIG_KEY = web.AppKey("dashboard_config", object)
BROWSER_KEY = web.RequestKey("browser_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class DashboardError(RunnerError):
    """The dashboard could not start (the port is taken, say)."""


class Config:
    """What every handler needs: the runner App, the credentials, the mode and the templates."""

    def __init__(self, app: App, auth: Auth, read_only: bool, root: str = "") -> None:
        self.app = app
        self.auth = auth
        self.read_only = read_only
        self.root = root  # the path it is mounted under ("" on its own; "/dashboard" in the worker's server)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,  # every value is HTML-escaped unless a template says otherwise (none does)
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters.update(ts=fmt_ts, num=fmt_num, secs=fmt_secs, pretty=fmt_json, segment=fmt_segment)
        self.templates.globals.update(statuses=STATUSES, poll_ms=POLL_MS, blank=Blank(), root=root)


class Blank(dict[str, Any]):
    """The empty row a <template> is rendered from: every field is "" (the polling script fills them)."""

    def __missing__(self, key: str) -> str:
        return ""


# --- formatting (the pages; the polling script formats the same way) -----------------------------------
def fmt_ts(value: datetime | str | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if isinstance(value, datetime) else ""


def fmt_num(value: int | float | str | None) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def fmt_secs(value: float | str | None) -> str:
    return f"{value:,.1f} s" if isinstance(value, int | float) and not isinstance(value, bool) else ""


def fmt_segment(value: str) -> str:
    """One path segment (a schedule's name may hold a slash or a space)."""
    return quote(str(value), safe="")


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return str(value)


def fmt_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=json_default)


def chart(buckets: list[dict[str, Any]], width: int = 600, height: int = 120) -> dict[str, Any]:
    """Bars of an inline SVG (no script, no style attribute): succeeded stacked under failed per minute."""
    peak = max((int(b["succeeded"]) + int(b["failed"]) + int(b["cancelled"]) for b in buckets), default=0)
    top = peak or 1
    step = width / max(len(buckets), 1)
    bars = []
    for i, bucket in enumerate(buckets):
        ok, failed = int(bucket["succeeded"]), int(bucket["failed"]) + int(bucket["cancelled"])
        ok_h, failed_h = ok / top * height, failed / top * height
        bars.append({"x": round(i * step, 1), "w": round(max(step - 1, 1), 1),
                     "ok_y": round(height - ok_h, 1), "ok_h": round(ok_h, 1),
                     "failed_y": round(height - ok_h - failed_h, 1), "failed_h": round(failed_h, 1),
                     "label": f"{fmt_ts(bucket['minute'])[11:16]}: {ok} succeeded, {failed} failed or cancelled"})
    return {"width": width, "height": height, "peak": peak, "bars": bars,
            "succeeded": sum(int(b["succeeded"]) for b in buckets),
            "failed": sum(int(b["failed"]) for b in buckets),
            "cancelled": sum(int(b["cancelled"]) for b in buckets)}


def count_table(counts: dict[str, Any]) -> list[dict[str, Any]]:
    """The counts by queue and kind as flat rows (what the overview's table and its polling show)."""
    rows = []
    for queue in sorted(counts["by_queue"]):
        kinds = counts["by_queue"][queue]["by_kind"]
        for kind in sorted(kinds):
            rows.append({"queue": queue, "kind": kind, **kinds[kind]})
    return rows


def to_json(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body, default=json_default), status=status, content_type=JSON_TYPE)


# --- middleware ---------------------------------------------------------------------------------------
def config_of(request: web.Request) -> Config:
    config = request.app[CONFIG_KEY]
    assert isinstance(config, Config)
    return config


def local_path(request: web.Request) -> str:
    """The request's path below the dashboard's root (the path itself when it is not mounted)."""
    root = config_of(request).root
    if root and request.path.startswith(root):
        return request.path[len(root):] or "/"
    return request.path


def url_for(request: web.Request, path: str) -> str:
    """A dashboard path (``/jobs/7``) as a link from the browser: under the root when mounted."""
    return config_of(request).root + path


def wants_json(request: web.Request) -> bool:
    return local_path(request).startswith("/api/")


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication, then for a POST: same origin, read-only mode, CSRF token; then errors as pages."""
    config = config_of(request)
    request[BROWSER_KEY], new_browser = browser_id(request)
    response = await _guarded(request, handler, config)
    if new_browser and not local_path(request).startswith("/static/"):
        set_cookie(response, CSRF_COOKIE, request[BROWSER_KEY], secure=is_https(request))
    return response


async def _guarded(request: web.Request, handler: Handler, config: Config) -> web.StreamResponse:
    auth = config.auth
    if not auth.configured and not is_loopback(request.url.host or ""):
        # Without credentials only a loopback name is answered: a page of another site that rebinds its
        # own name to 127.0.0.1 (DNS rebinding) would otherwise read the dashboard and post its forms.
        return error_page(request, config, 403, "this dashboard answers loopback host names only "
                          "(127.0.0.1, localhost, ::1) unless authentication is configured")
    public = local_path(request).startswith("/static/") or local_path(request) == "/login"
    if not public and not auth.allows(request):
        return unauthorized(request, config)
    if request.method not in SAFE_METHODS:
        refused = await _refused_post(request, config)
        if refused is not None:
            return refused
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_page(request, config, error.status, error.reason)
    except JobNotFound as error:
        return error_page(request, config, 404, str(error))
    except UsageError as error:
        return error_page(request, config, 409 if request.method == "POST" else 400, str(error))
    except Exception as error:
        log.error("dashboard request failed", path=request.path, error=redact(f"{type(error).__name__}: {error}"))
        return error_page(request, config, 500, "internal error (see the dashboard's log)")


async def _refused_post(request: web.Request, config: Config) -> web.StreamResponse | None:
    """Why a state-changing request is refused (403), or None when it may go on."""
    if not same_origin(request):
        return error_page(request, config, 403, "cross-origin request refused")
    if config.read_only and local_path(request) not in ("/login", "/logout"):
        return error_page(request, config, 403, "the dashboard is read-only (RUNNER_DASHBOARD_READ_ONLY)")
    if config.auth.bearer(request):
        return None  # a browser never sends this header by itself: no cross-site forgery can carry it
    submitted = request.headers.get(CSRF_HEADER)
    if submitted is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        value = form.get(CSRF_FIELD)
        submitted = value if isinstance(value, str) else None
    if not config.auth.csrf_valid(request, submitted):
        return error_page(request, config, 403, "missing or invalid CSRF token: reload the page and try again")
    return None


def unauthorized(request: web.Request, config: Config) -> web.StreamResponse:
    auth = config.auth
    headers = {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'} if auth.user else {}
    if wants_json(request) or auth.token is None:
        if not auth.user:
            headers = {"WWW-Authenticate": f'Bearer realm="{REALM}"'}
        if wants_json(request):
            response: web.StreamResponse = to_json({"error": "authentication required"}, 401)
        else:
            response = web.Response(text="authentication required", status=401)
        response.headers.update(headers)
        return response
    page = render(request, config, "login.html", {"next": safe_next(request.path_qs, config.root), "wrong": False},
                  title="Log in", api=None)
    page.set_status(401)
    page.headers.update(headers)
    return page


def error_page(request: web.Request, config: Config, status: int, message: str) -> web.StreamResponse:
    if wants_json(request) or "application/json" in request.headers.get("Accept", ""):
        return to_json({"error": message}, status)
    page = render(request, config, "error.html", {"status": status, "message": message}, title=f"Error {status}",
                  api=None)
    page.set_status(status)
    return page


async def add_headers(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    if "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"


def safe_next(target: str | None, root: str = "") -> str:
    """A redirect target on this site only (a path, never //host or a scheme), under the root when mounted."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return root + "/"
    if root and target != root and not target.startswith(root + "/"):
        return root + "/"
    return target


# --- rendering ----------------------------------------------------------------------------------------
def render(request: web.Request, config: Config, template: str, context: dict[str, Any], *, title: str,
           api: str | None) -> web.Response:
    notice = NOTICES.get(request.query.get("notice", ""))
    body = config.templates.get_template(template).render(
        **context, title=title, api=None if api is None else config.root + api, path=local_path(request),
        here=request.path_qs, read_only=config.read_only,
        csrf=config.auth.csrf_for(request[BROWSER_KEY]), csrf_field=CSRF_FIELD, notice=notice,
        logged_in=config.auth.session(request), auth_configured=config.auth.configured,
    )
    return web.Response(text=body, content_type="text/html", charset="utf-8")


def redirect(request: web.Request, target: str, notice: str | None = None) -> web.Response:
    """A 303 to ``target``: a full path (a form's ``next``) kept on this site and under the root."""
    location = safe_next(target, config_of(request).root)
    if notice:
        location += ("&" if "?" in location else "?") + urlencode({"notice": notice})
    return web.Response(status=303, headers={"Location": location})


# --- pages and their JSON -----------------------------------------------------------------------------
async def overview_data(config: Config) -> dict[str, Any]:
    body = await data.overview(config.app)
    body["count_rows"] = count_table(body["counts"])
    body["chart"] = chart(body["throughput"])
    return body


async def overview_page(request: web.Request) -> web.StreamResponse:
    config = config_of(request)
    return render(request, config, "overview.html", await overview_data(config), title="Overview",
                  api="/api/overview")


async def overview_api(request: web.Request) -> web.StreamResponse:
    return to_json(await overview_data(config_of(request)))


def job_filter(request: web.Request) -> tuple[JobFilter, str | None, int | None, int]:
    query = request.query
    statuses = tuple(s for s in query.getall("status", []) if s)
    kinds = tuple(k.strip() for v in query.getall("kind", []) for k in v.split(",") if k.strip())
    queues = tuple(q.strip() for v in query.getall("queue", []) for q in v.split(",") if q.strip())
    before = query.get("before_id") or ""
    if before and (not before.isdigit() or len(before) > 19):
        raise UsageError(f"before_id must be a job id, got {before[:40]!r}")
    before_id = int(before) if before else None
    return JobFilter(statuses, kinds, queues), query.get("error") or None, before_id, data.page_size(
        query.get("limit"))


async def jobs_data(request: web.Request) -> dict[str, Any]:
    where, error, before_id, limit = job_filter(request)
    body = await data.job_list(config_of(request).app, where, error, before_id, limit)
    body["search_window"] = data.SEARCH_WINDOW
    body["filter"] = {"status": list(where.statuses), "kind": ", ".join(where.kinds),
                      "queue": ", ".join(where.queues), "error": error or "", "limit": limit}
    body["next_url"] = next_page(request, url_for(request, "/jobs"), "before_id", body["next_before_id"])
    return body


def next_page(request: web.Request, path: str, key: str, value: int | None) -> str | None:
    """The link to the next keyset page: this request's query with ``key`` set to ``value`` (None: last page)."""
    if value is None:
        return None
    params = [(k, v) for k, v in request.query.items() if k != key]
    return f"{path}?" + urlencode([*params, (key, str(value))])


async def jobs_page(request: web.Request) -> web.StreamResponse:
    body = await jobs_data(request)
    api = "/api/jobs" + (f"?{request.query_string}" if request.query_string else "")
    return render(request, config_of(request), "jobs.html", body, title="Jobs", api=api)


async def jobs_api(request: web.Request) -> web.StreamResponse:
    return to_json(await jobs_data(request))


def job_id_of(request: web.Request) -> int:
    raw = request.match_info["job_id"]
    if not raw.isdigit() or len(raw) > 19:
        raise JobNotFound(f"no job with id {raw[:40]!r}")
    return int(raw)


async def job_page(request: web.Request) -> web.StreamResponse:
    job_id = job_id_of(request)
    body = await data.job_detail(config_of(request).app, job_id)
    return render(request, config_of(request), "job.html", body, title=f"Job {job_id}", api=f"/api/jobs/{job_id}")


async def job_api(request: web.Request) -> web.StreamResponse:
    return to_json(await data.job_detail(config_of(request).app, job_id_of(request)))


async def job_cancel(request: web.Request) -> web.StreamResponse:
    job_id = job_id_of(request)
    status = await config_of(request).app.queue.job_request_cancel(job_id)
    if wants_json(request):
        return to_json({"id": job_id, "status": status})
    return redirect(request, url_for(request, f"/jobs/{job_id}"),
                    "cancelled" if status == "cancelled" else "cancel-requested")


async def job_retry(request: web.Request) -> web.StreamResponse:
    job_id = job_id_of(request)
    await config_of(request).app.queue.job_retry(job_id)
    if wants_json(request):
        return to_json({"id": job_id, "status": "pending"})
    return redirect(request, url_for(request, f"/jobs/{job_id}"), "retried")


async def jobs_bulk(request: web.Request) -> web.StreamResponse:
    """Cancel or retry the selected jobs, one by one through the queue's own methods."""
    form = await request.post()
    action = form.get("action")
    if action not in ("cancel", "retry"):
        raise UsageError("action must be cancel or retry")
    raw_ids = [v for v in form.getall("ids", []) if isinstance(v, str)]
    if not raw_ids or len(raw_ids) > data.MAX_PAGE_SIZE:
        raise UsageError(f"select from 1 to {data.MAX_PAGE_SIZE} jobs")
    queue = config_of(request).app.queue
    done, skipped = [], []
    for raw in raw_ids:
        if not raw.isdigit() or len(raw) > 19:
            raise UsageError(f"not a job id: {raw[:40]!r}")
        try:
            if action == "cancel":
                await queue.job_request_cancel(int(raw))
            else:
                await queue.job_retry(int(raw))
            done.append(int(raw))
        except UsageError as error:  # finished already, or not failed: said, and the rest go on
            skipped.append({"id": int(raw), "reason": str(error)})
    if wants_json(request):
        return to_json({"action": action, "done": done, "skipped": skipped})
    next_url = form.get("next")
    return redirect(request, next_url if isinstance(next_url, str) else url_for(request, "/jobs"), "bulk")


async def backfills_page(request: web.Request) -> web.StreamResponse:
    config = config_of(request)
    return render(request, config, "backfills.html", await data.backfills(config.app), title="Backfills",
                  api="/api/backfills")


async def backfills_api(request: web.Request) -> web.StreamResponse:
    return to_json(await data.backfills(config_of(request).app))


async def schedules_page(request: web.Request) -> web.StreamResponse:
    config = config_of(request)
    return render(request, config, "schedules.html", await data.schedules(config.app), title="Schedules",
                  api=None)  # not polled: a schedule changes when someone pauses it (a reload shows it)


async def schedules_api(request: web.Request) -> web.StreamResponse:
    return to_json(await data.schedules(config_of(request).app))


async def schedule_pause(request: web.Request) -> web.StreamResponse:
    return await _set_paused(request, True)


async def schedule_resume(request: web.Request) -> web.StreamResponse:
    return await _set_paused(request, False)


async def _set_paused(request: web.Request, paused: bool) -> web.StreamResponse:
    name = request.match_info["name"]
    await config_of(request).app.pause_schedule(name, paused)
    if wants_json(request):
        return to_json({"name": name, "paused": paused})
    return redirect(request, url_for(request, "/schedules"), "paused" if paused else "resumed")


def consensus_args(request: web.Request) -> tuple[str | None, str | None, int | None]:
    status = request.query.get("status") or None
    if status is not None and status not in data.CONSENSUS_STATUSES:
        raise UsageError(f"unknown consensus status {status[:40]!r}")
    before = request.query.get("before_seq") or None
    if before is not None and (not before.isdigit() or len(before) > 19):
        raise UsageError("before_seq must be a sequence number")
    return status, request.query.get("contract") or None, int(before) if before else None


async def consensus_data(request: web.Request) -> dict[str, Any]:
    status, contract, before = consensus_args(request)
    body = await data.consensus(config_of(request).app, status, contract, before)
    body["filter"] = {"status": status or "", "contract": contract or ""}
    body["next_url"] = next_page(request, url_for(request, "/consensus"), "before_seq", body.get("next_before_seq"))
    return body


async def consensus_page(request: web.Request) -> web.StreamResponse:
    return render(request, config_of(request), "consensus.html", await consensus_data(request), title="Consensus",
                  api=None)  # not polled (a reload refreshes it); a transaction's own page is


async def consensus_api(request: web.Request) -> web.StreamResponse:
    return to_json(await consensus_data(request))


async def transaction_data(request: web.Request) -> dict[str, Any]:
    tx_hash = request.match_info["tx_hash"]
    body = await data.consensus_transaction(config_of(request).app, tx_hash[:200])
    if body is None:
        raise web.HTTPNotFound(reason=f"no consensus transaction {tx_hash[:80]}")
    return body


async def transaction_page(request: web.Request) -> web.StreamResponse:
    tx_hash = request.match_info["tx_hash"]
    return render(request, config_of(request), "transaction.html", await transaction_data(request),
                  title="Consensus transaction", api=f"/api/consensus/{quote(tx_hash, safe='')}")


async def transaction_api(request: web.Request) -> web.StreamResponse:
    return to_json(await transaction_data(request))


# --- login --------------------------------------------------------------------------------------------
async def login_page(request: web.Request) -> web.StreamResponse:
    config = config_of(request)
    if config.auth.token is None:
        return redirect(request, url_for(request, "/"))
    return render(request, config, "login.html", {"next": safe_next(request.query.get("next"), config.root),
                                                  "wrong": False},
                  title="Log in", api=None)


async def login_submit(request: web.Request) -> web.StreamResponse:
    config = config_of(request)
    form = await request.post()
    token, next_url = form.get("token"), form.get("next")
    target = safe_next(next_url if isinstance(next_url, str) else None, config.root)
    if config.auth.token is None or not isinstance(token, str) or not config.auth.token_matches(token):
        page = render(request, config, "login.html", {"next": target, "wrong": True}, title="Log in", api=None)
        page.set_status(401)
        return page
    response = redirect(request, target)
    set_cookie(response, SESSION_COOKIE, config.auth.session_value(), secure=is_https(request))
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    response = redirect(request, url_for(request, "/login" if config_of(request).auth.token else "/"), "logged-out")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


# --- the application ----------------------------------------------------------------------------------
def build(app: App, auth: Auth, read_only: bool = False, root: str = "") -> web.Application:
    """The dashboard as an aiohttp application; ``root`` is the path it is mounted under, when it is a
    sub-application (``/dashboard`` in the worker's HTTP server): every link and redirect goes under it."""
    application = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    application[CONFIG_KEY] = Config(app, auth, read_only, root.rstrip("/"))
    application.on_response_prepare.append(add_headers)
    application.add_routes([
        web.get("/", overview_page),
        web.get("/jobs", jobs_page),
        web.get("/jobs/{job_id}", job_page),
        web.post("/jobs/bulk", jobs_bulk),
        web.post("/jobs/{job_id}/cancel", job_cancel),
        web.post("/jobs/{job_id}/retry", job_retry),
        web.get("/backfills", backfills_page),
        web.get("/schedules", schedules_page),
        web.post("/schedules/{name}/pause", schedule_pause),
        web.post("/schedules/{name}/resume", schedule_resume),
        web.get("/consensus", consensus_page),
        web.get("/consensus/{tx_hash}", transaction_page),
        web.get("/login", login_page),
        web.post("/login", login_submit),
        web.post("/logout", logout),
        web.get("/api/overview", overview_api),
        web.get("/api/jobs", jobs_api),
        web.post("/api/jobs/bulk", jobs_bulk),
        web.get("/api/jobs/{job_id}", job_api),
        web.post("/api/jobs/{job_id}/cancel", job_cancel),
        web.post("/api/jobs/{job_id}/retry", job_retry),
        web.get("/api/backfills", backfills_api),
        web.get("/api/schedules", schedules_api),
        web.post("/api/schedules/{name}/pause", schedule_pause),
        web.post("/api/schedules/{name}/resume", schedule_resume),
        web.get("/api/consensus", consensus_api),
        web.get("/api/consensus/{tx_hash}", transaction_api),
        web.static("/static", HERE / "static", show_index=False, follow_symlinks=False),
    ])
    return application


async def serve(app: App, host: str, port: int, auth: Auth, read_only: bool = False) -> None:
    """Listen until SIGINT or SIGTERM; print the URL on stderr once listening."""
    runner = web.AppRunner(build(app, auth, read_only), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise DashboardError(f"cannot listen on {host}:{port} ({error.strerror or error}); "
                             "pick another --port (0: a free one)") from None
    bound = next((a[1] for a in runner.addresses if isinstance(a, tuple) and len(a) >= 2), port)
    shown = f"[{host}]" if ":" in host else host
    mode = " (read-only)" if read_only else ""
    print(f"dashboard on http://{shown}:{bound}{mode}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
