"""Client-side helpers for calling Drip-metered HTTP APIs with httpx.

``session_client(session, base_url=...)`` (or ``async_session_client``) is an httpx client
that sends the session's token as ``X-Drip-Session`` to the origin it was meant for, and
never to another one: with ``base_url``, only to that origin (a request by absolute URL
elsewhere, e.g. to a link the API returned, goes without it); without, only to the
origin of the request it is sent with. httpx copies request headers onto a redirect (it
strips only ``Authorization`` across origins), so a bare ``auth=DripSessionAuth(...)`` on
a client that follows redirects would hand the spending token to whatever site a
response names: these clients drop it from a redirect to another origin.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import httpx

from drip.metering.sessions import Session

SESSION_HEADER = "X-Drip-Session"
#: where the request the token was added to was going (kept on its redirects)
_ORIGIN = "drip_session_origin"


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


class DripSessionAuth(httpx.Auth):
    """Sends a budgeted session's token as ``X-Drip-Session`` on every request.

    ``httpx.Client(auth=DripSessionAuth(session))`` (or the token string) bills each call
    to the session; the provider's middleware holds and captures against it. With
    ``origin`` (a URL: its scheme, host and port count), only requests to that origin
    carry the token. On a client that follows redirects, use :func:`session_client` (or
    add :func:`drop_token_elsewhere` as a request hook) so no redirect carries it away.
    """

    def __init__(self, session: Session | str, *, origin: str | httpx.URL | None = None) -> None:
        self._token = session.id if isinstance(session, Session) else session
        self._origin = None if origin is None else _origin(httpx.URL(origin))

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        here = _origin(request.url)
        if self._origin is None or here == self._origin:
            request.headers[SESSION_HEADER] = self._token
            request.extensions[_ORIGIN] = here
        yield request

    def __repr__(self) -> str:  # never print the token
        return "DripSessionAuth(<session>)"


def drop_token_elsewhere(request: httpx.Request) -> None:
    """httpx request hook: remove the session token from a request (a redirect) going to
    another origin than the one it was added for."""
    origin = request.extensions.get(_ORIGIN)
    if origin is not None and origin != _origin(request.url):
        request.headers.pop(SESSION_HEADER, None)


async def _drop_token_elsewhere(request: httpx.Request) -> None:
    drop_token_elsewhere(request)


def _hooks(kwargs: dict[str, Any], hook: Any) -> dict[str, list[Any]]:
    hooks = {k: list(v) for k, v in (kwargs.pop("event_hooks", None) or {}).items()}
    hooks.setdefault("request", []).append(hook)
    return hooks


def _auth(session: Session | str, kwargs: dict[str, Any]) -> DripSessionAuth:
    """The token for ``base_url``'s origin only, when there is one."""
    base_url = kwargs.get("base_url")
    return DripSessionAuth(session, origin=base_url if base_url else None)


def session_client(session: Session | str, **kwargs: Any) -> httpx.Client:
    """An ``httpx.Client`` (``kwargs`` are its own) that pays with ``session``: with
    ``base_url``, on requests to that origin only."""
    hooks = _hooks(kwargs, drop_token_elsewhere)
    return httpx.Client(auth=_auth(session, kwargs), event_hooks=hooks, **kwargs)


def async_session_client(session: Session | str, **kwargs: Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` (``kwargs`` are its own) that pays with ``session``: with
    ``base_url``, on requests to that origin only."""
    hooks = _hooks(kwargs, _drop_token_elsewhere)
    return httpx.AsyncClient(auth=_auth(session, kwargs), event_hooks=hooks, **kwargs)


__all__ = ["DripSessionAuth", "async_session_client", "drop_token_elsewhere", "session_client"]
