"""The dashboard's protections: who may look (a bearer token, a login cookie or basic auth), what a
request may change (POSTs with a CSRF token; none in read-only mode) and what a browser may do with a page
(security headers: no inline script, no framing, no sniffing, no referrer).

- Loopback only by default; another address needs authentication (``check_bind``: the CLI's exit 2).
- ``RUNNER_DASHBOARD_TOKEN``: ``Authorization: Bearer <token>`` (scripts), or the login form, which sets
  an HttpOnly, SameSite=Strict cookie holding an HMAC of the token (never the token itself).
- ``RUNNER_DASHBOARD_USER`` / ``RUNNER_DASHBOARD_PASSWORD``: HTTP basic auth.
- Secrets are compared with ``hmac.compare_digest``.
- CSRF: a random cookie per browser (HttpOnly, SameSite=Strict) and, in each form and in the page's meta
  tag for the polling script, an HMAC of it under a key of this process. A POST must carry that HMAC (the
  ``csrf`` form field or an ``X-CSRF-Token`` header) or it is refused with 403 before anything is read or
  written. A request authenticated by an ``Authorization: Bearer`` header is exempt: a browser never adds
  that header by itself, so another site cannot forge one. A POST whose ``Origin`` is another site is
  refused as well.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web

from runner.errors import UsageError

if TYPE_CHECKING:
    from pydantic import SecretStr

    from runner.config import Settings

SESSION_COOKIE = "runner_dashboard_session"
CSRF_COOKIE = "runner_dashboard_csrf"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
REALM = "runner dashboard"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make Chromium send `Origin: null` on our own POSTs
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class DashboardBindError(UsageError):
    """The dashboard would listen beyond this machine without authentication."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``; any other name or address may be reachable from elsewhere."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Auth:
    """The configured credentials (none: only a loopback bind is allowed)."""

    token: str | None = None
    user: str | None = None
    password: str | None = None
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)  # this process's HMAC key

    @classmethod
    def of(cls, token: str | None = None, user: str | None = None, password: str | None = None) -> Auth:
        """Credentials whose CSRF key is derived from the secrets when there are any, so that dashboards
        behind one load balancer with the same settings accept each other's forms (else a random key)."""
        if token is None and password is None:
            return cls(token, user, password)
        material = "\0".join(["runner-dashboard-csrf", token or "", user or "", password or ""]).encode()
        return cls(token, user, password, hashlib.sha256(material).digest())

    @property
    def configured(self) -> bool:
        return self.token is not None or self.user is not None

    def __repr__(self) -> str:  # never the secrets
        return f"Auth(token={'set' if self.token else 'unset'}, basic={'set' if self.user else 'unset'})"

    # --- credentials ------------------------------------------------------------------------------
    def session_value(self) -> str:
        """The login cookie: an HMAC of the token (the token itself never leaves the server)."""
        assert self.token is not None
        return hmac.new(self.token.encode(), b"runner-dashboard-session", hashlib.sha256).hexdigest()

    def token_matches(self, candidate: str) -> bool:
        return self.token is not None and hmac.compare_digest(candidate.encode(), self.token.encode())

    def bearer(self, request: web.Request) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    def basic(self, request: web.Request) -> bool:
        if self.user is None or self.password is None:
            return False
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user_ok = hmac.compare_digest(user.encode(), self.user.encode())
        password_ok = hmac.compare_digest(password.encode(), self.password.encode())
        return bool(sep) and user_ok and password_ok

    def session(self, request: web.Request) -> bool:
        cookie = request.cookies.get(SESSION_COOKIE)
        return self.token is not None and cookie is not None and hmac.compare_digest(
            cookie.encode(), self.session_value().encode())

    def allows(self, request: web.Request) -> bool:
        return not self.configured or self.bearer(request) or self.basic(request) or self.session(request)

    # --- CSRF -------------------------------------------------------------------------------------
    def csrf_for(self, browser_id: str) -> str:
        return hmac.new(self.key, f"csrf:{browser_id}".encode(), hashlib.sha256).hexdigest()

    def csrf_valid(self, request: web.Request, submitted: str | None) -> bool:
        browser_id = request.cookies.get(CSRF_COOKIE)
        if not browser_id or not submitted:
            return False
        return hmac.compare_digest(submitted.encode(), self.csrf_for(browser_id).encode())


def check_bind(host: str, auth: Auth, where: str = "the dashboard") -> None:
    if not is_loopback(host) and not auth.configured:
        raise DashboardBindError(
            f"{where} would listen on {host}, beyond this machine, without authentication: set "
            "RUNNER_DASHBOARD_TOKEN (or RUNNER_DASHBOARD_USER and RUNNER_DASHBOARD_PASSWORD), or bind 127.0.0.1")


MOUNTED_WHERE = "the dashboard mounted in the worker's HTTP server (RUNNER_DASHBOARD_MOUNT, RUNNER_HTTP_HOST)"


def auth_from_settings(settings: Settings) -> Auth:
    """The credentials RUNNER_DASHBOARD_TOKEN / _USER / _PASSWORD configure (none: loopback only)."""
    def secret(value: SecretStr | None) -> str | None:
        return None if value is None else value.get_secret_value()

    return Auth.of(secret(settings.dashboard_token), settings.dashboard_user, secret(settings.dashboard_password))


def browser_id(request: web.Request) -> tuple[str, bool]:
    """This browser's CSRF id (its cookie), and whether it is new (then the response sets the cookie)."""
    existing = request.cookies.get(CSRF_COOKIE)
    if existing and 16 <= len(existing) <= 128 and existing.isalnum():
        return existing, False
    return secrets.token_hex(16), True


def same_origin(request: web.Request) -> bool:
    """False when the browser says the request comes from another site: an ``Origin`` header whose host
    (and port) is neither this request's ``Host`` nor, behind a reverse proxy, its ``X-Forwarded-Host``. The
    scheme is not compared: a proxy that ends TLS talks plain HTTP to the dashboard. (A cross-site form
    cannot set X-Forwarded-Host; the CSRF token is the defence that matters, this one is a second.)"""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    netloc = urlsplit(origin).netloc.lower()
    hosts = {request.host.lower(), *(h.strip().lower() for h in request.headers.get("X-Forwarded-Host", "").split(","))}
    return bool(netloc) and netloc in hosts


def is_https(request: web.Request) -> bool:
    """Served over TLS here or at the reverse proxy in front (X-Forwarded-Proto): cookies are Secure then."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower() == "https"


def set_cookie(response: web.StreamResponse, name: str, value: str, *, secure: bool) -> None:
    response.set_cookie(name, value, httponly=True, samesite="Strict", secure=secure, path="/")
