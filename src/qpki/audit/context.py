"""Who is asking, for the audit trail, without the service layer importing Flask.

The web layer sets the client address and user agent once per request; the CLI sets its own
actor name. AuditLog reads them when it writes an event.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestContext:
    """Where a use case was triggered from."""

    ip: str = ""
    user_agent: str = ""
    channel: str = "web"


_EMPTY = RequestContext()
_current: ContextVar[RequestContext] = ContextVar("qpki_request_context", default=_EMPTY)


def current_context() -> RequestContext:
    """The context of the request being served (empty outside a request)."""
    return _current.get()


def set_context(ctx: RequestContext) -> object:
    """Set the context; returns a token for :func:`reset_context`."""
    return _current.set(ctx)


def reset_context(token: object) -> None:
    """Undo :func:`set_context`."""
    _current.reset(token)  # type: ignore[arg-type]


@contextmanager
def request_context(ip: str = "", user_agent: str = "", channel: str = "web") -> Iterator[None]:
    """Run a block with the given context (CLI commands and tests)."""
    token = _current.set(RequestContext(ip=ip, user_agent=user_agent, channel=channel))
    try:
        yield
    finally:
        _current.reset(token)
