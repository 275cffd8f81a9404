"""Client-side helpers for calling Drip-metered HTTP APIs with httpx."""

from __future__ import annotations

from collections.abc import Generator

import httpx

from drip.metering.sessions import Session

SESSION_HEADER = "X-Drip-Session"


class DripSessionAuth(httpx.Auth):
    """Sends a budgeted session's token as ``X-Drip-Session`` on every request.

    ``httpx.Client(auth=DripSessionAuth(session))`` (or the token string) bills each call
    to the session; the provider's middleware holds and captures against it.
    """

    def __init__(self, session: Session | str) -> None:
        self._token = session.id if isinstance(session, Session) else session

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[SESSION_HEADER] = self._token
        yield request

    def __repr__(self) -> str:  # never print the token
        return "DripSessionAuth(<session>)"
