"""Signing in to the console: the API key in a session cookie, and CSRF tokens.

The key is kept in a cookie the browser sends only to `/console` on this server
(`HttpOnly`: no script reads it; `SameSite=Strict`: no other site's page or link makes
the browser send it; `Secure` over HTTPS). Every request authenticates it again through
the key store, so a revoked or narrowed key takes effect at once, on every replica.

Every form that changes something carries a token derived from the key (an HMAC), and
`check_csrf` refuses a POST without the right one, or from another origin: a page
elsewhere can neither read the token nor make the browser post with the cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import Response

from server.errors import PermissionDeniedError

COOKIE = "enclave_console"
PATH = "/console"
MAX_AGE_S = 8 * 3600
CSRF_FIELD = "csrf_token"
# What form tokens derive from when the server has no keys (loopback only): a secret of
# this process, so a page elsewhere still cannot forge one.
ANONYMOUS_SECRET = secrets.token_hex(32)


def is_console(path: str) -> bool:
    return path == PATH or path.startswith(PATH + "/")


def secret(request: Request) -> str | None:
    value = request.cookies.get(COOKIE)
    return value.strip() if value and value.strip() else None


def form_secret(request: Request) -> str:
    """What this page's form tokens derive from: the session's key (as `authorize` took
    it), or the process's own secret when there are no keys or no session."""
    return getattr(request.state, "console_secret", None) or ANONYMOUS_SECRET


def csrf_token(key: str) -> str:
    return hmac.new(key.encode(), b"enclave-console-csrf", hashlib.sha256).hexdigest()


def sign_in(response: Response, request: Request, key: str) -> None:
    response.set_cookie(COOKIE, key, max_age=MAX_AGE_S, path=PATH, httponly=True, samesite="strict", secure=request.url.scheme == "https")


def sign_out(response: Response) -> None:
    response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict")


def same_origin(request: Request) -> bool:
    """A browser's POST names the page it came from; it must be this server's."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null":
        return origin is None  # no header at all: not a browser form post (curl, tests)
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def check_csrf(request: Request, key: str) -> None:
    if not same_origin(request):
        raise PermissionDeniedError("this form was posted from another site", code="csrf_failed")
    form = await request.form()
    sent = form.get(CSRF_FIELD)
    if not isinstance(sent, str) or not hmac.compare_digest(sent, csrf_token(key)):
        raise PermissionDeniedError("the form's security token is missing or wrong; reload the page and try again", code="csrf_failed")
