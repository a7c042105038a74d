"""``/api/v1``: verify a second factor, manage users, read the audit trail — JSON in and out.

Every view is short: the guard (:func:`qpki.api.auth.operation`) has checked the key, its
scope, the per-key limit and the body's form; spectree has checked the body or query against
its schema; the view calls one service of :mod:`qpki.auth.services` — the same ones the pages
call, so no rule is written twice — and shapes the answer. Failures of the service layer
become problem documents in :func:`_service_call`.

This module is imported by the first request that reaches one of its views, not at start-up:
its URL rules are declared in :mod:`qpki.api.routes`, each with a
:class:`qpki.api.lazy.LazyView` named after the function here (see that module for why).
A view added here needs its row in ``routes.RULES``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Response, jsonify, render_template, request

from qpki.api.auth import current_principal, operation
from qpki.api.openapi import document, operations, responses, spec
from qpki.api.problems import PROBLEMS, TYPE_PREFIX, abort_problem
from qpki.api.schemas import (
    AuditEventOut,
    AuditPageOut,
    AuditQuery,
    ChainStatus,
    CreatedUser,
    CreateUserRequest,
    ResetRequest,
    RoleRequest,
    UnlockResult,
    UserList,
    UserListQuery,
    UserOut,
    VerifyRequest,
    VerifyResponse,
)
from qpki.auth.errors import (
    AuthError,
    MFAError,
    NotFound,
    PermissionDenied,
    SecretUnavailable,
)
from qpki.auth.models import User
from qpki.auth.services.accounts import UserSummary
from qpki.auth.services.audit_trail import AuditFilters, AuditTrailService, InvalidAuditFilter
from qpki.web.services import services

T = TypeVar("T")


def _service_call(call: Callable[[], T]) -> T:
    """Run a use case; its refusals become problem documents (never a 500)."""
    try:
        return call()
    except NotFound as exc:
        raise abort_problem("not-found", exc.message) from None
    except PermissionDenied as exc:
        raise abort_problem("forbidden", exc.message) from None
    except MFAError as exc:
        raise abort_problem("conflict", exc.message) from None
    except InvalidAuditFilter as exc:
        raise abort_problem("invalid-request", exc.message) from None
    except AuthError as exc:
        raise abort_problem("rejected", exc.message) from None


def _ctx() -> Any:
    return request.context  # type: ignore[attr-defined]


# -- verify ---------------------------------------------------------------------------------------
@operation("verify", body=True)
@spec.validate(json=VerifyRequest, resp=responses(200, VerifyResponse, 403, 415, 423))
def verify() -> Response:
    """Check a user's TOTP or backup code.

    The same rules as the sign-in page: single use across processes and machines, the
    account's throttle (429 with Retry-After while it backs off, 423 once locked), and an
    audit record whose actor is the service key. A wrong code, a user without 2FA or an
    unknown user is a 200 with result "reject" and a message.
    """
    body: VerifyRequest = _ctx().json
    svc = services()
    from qpki.api.metrics import THROTTLED, VERIFICATIONS

    now = svc.clock()
    checked = svc.signin.verify_for_service(
        body.username, body.code, actor_name=current_principal().actor_name, now=now
    )
    if checked.unknown_user:
        VERIFICATIONS.labels("unknown", "reject").inc()
        return jsonify(result="reject", message="Unknown user")
    if checked.overdue is not None:
        raise abort_problem("enrolment-overdue", checked.overdue)
    outcome = checked.outcome
    assert outcome is not None  # a known user whose policy is met: the code was checked
    method = outcome.method or "unknown"
    if outcome.locked:
        THROTTLED.labels("account").inc()
        request._qpki_account_throttle = True  # type: ignore[attr-defined]
        raise abort_problem("account-locked", outcome.message)
    if outcome.retry_at is not None:
        THROTTLED.labels("account").inc()
        request._qpki_account_throttle = True  # type: ignore[attr-defined]
        wait = max(1, math.ceil((outcome.retry_at - now).total_seconds()))
        raise abort_problem(
            "throttled",
            outcome.message,
            headers={"Retry-After": str(wait)},
            extra={"retry_after": wait},
        )
    VERIFICATIONS.labels(method, "accept" if outcome.success else "reject").inc()
    answer = VerifyResponse(
        result="accept" if outcome.success else "reject",
        message=outcome.message,
        method=outcome.method if outcome.method in ("totp", "backup_code") else None,  # type: ignore[arg-type]
        backup_codes_remaining=outcome.backup_codes_remaining,
    )
    return jsonify(answer.model_dump(mode="json", exclude_none=True))


# -- users ----------------------------------------------------------------------------------------
def _user_out(summary: UserSummary, *, detail: bool = False) -> dict[str, Any]:
    user = summary.user
    remaining = None
    if detail and user.two_factor_enabled:
        try:
            remaining = services().factors.backup_codes_info(user.id).remaining
        except SecretUnavailable:
            remaining = None  # undecryptable: reported as unknown, logged by the service
    out = UserOut(
        id=user.id,
        username=user.username,
        email=user.email or "",
        role=user.role,  # type: ignore[arg-type]
        is_active=user.is_active,
        two_factor_enabled=user.two_factor_enabled,
        methods=["totp", "backup_codes"] if user.two_factor_enabled else [],
        backup_codes_remaining=remaining,
        locked=summary.locked,
        throttled_until=summary.throttled_until,
        failed_attempts=summary.failures,
        last_sign_in_at=user.last_login_at,
        created_at=user.created_at,
        must_change_password=bool(user.must_change_password),
    )
    return out.model_dump(mode="json")


def _summary(user_id: int) -> UserSummary:
    found = services().accounts.list_users(user_id=user_id)
    if not found:
        raise abort_problem("not-found", "There is no user with this id.")
    return found[0]


def _existing(user_id: int) -> User:
    return _summary(user_id).user


@operation("users:read")
@spec.validate(query=UserListQuery, resp=responses(200, UserList))
def list_users() -> Response:
    """Users by username, with their role, 2FA and lock state; cursor-paginated."""
    q: UserListQuery = _ctx().query
    mfa = None if q.two_factor is None else q.two_factor == "enabled"
    rows = services().accounts.list_users(mfa=mfa, role=q.role, after=q.cursor, limit=q.limit + 1)
    next_cursor = rows[q.limit - 1].user.username_key if len(rows) > q.limit else None
    return jsonify(users=[_user_out(r) for r in rows[: q.limit]], next_cursor=next_cursor)


@operation("users:read")
@spec.validate(resp=responses(200, UserOut, 404))
def get_user(user_id: int) -> Response:
    """One user: 2FA methods and backup codes left, lock state, last sign-in."""
    return jsonify(_user_out(_summary(user_id), detail=True))


@operation("users:write", body=True)
@spec.validate(json=CreateUserRequest, resp=responses(201, CreatedUser, 415))
def create_user() -> tuple[Response, int]:
    """Create an active user. Without a password, a temporary one is returned (once) and must
    be changed at the first sign-in."""
    body: CreateUserRequest = _ctx().json
    accounts = services().accounts
    temporary = None if body.password else accounts.generate_temporary_password()
    user = _service_call(
        lambda: accounts.create_user(
            body.username,
            body.password or temporary or "",
            body.email,
            body.role,
            actor=None,
            actor_name=current_principal().actor_name,
            must_change_password=temporary is not None,
        )
    )
    return jsonify(user=_user_out(_summary(user.id)), temporary_password=temporary), 201


@operation("users:write", body=True)
@spec.validate(json=RoleRequest, resp=responses(200, UserOut, 404, 415))
def set_role(user_id: int) -> Response:
    """Change a user's role."""
    body: RoleRequest = _ctx().json
    _existing(user_id)
    _service_call(
        lambda: services().accounts.set_role(
            None, user_id, body.role, actor_name=current_principal().actor_name
        )
    )
    return jsonify(_user_out(_summary(user_id)))


def _set_active(user_id: int, active: bool) -> Response:
    _existing(user_id)
    _service_call(
        lambda: services().accounts.set_active(
            None, user_id, active, actor_name=current_principal().actor_name
        )
    )
    return jsonify(_user_out(_summary(user_id)))


@operation("users:write")
@spec.validate(resp=responses(200, UserOut, 404, 415))
def deactivate(user_id: int) -> Response:
    """Deactivate a user: they cannot sign in, and every session of theirs ends."""
    return _set_active(user_id, False)


@operation("users:write")
@spec.validate(resp=responses(200, UserOut, 404, 415))
def reactivate(user_id: int) -> Response:
    """Reactivate a deactivated user."""
    return _set_active(user_id, True)


@operation("users:write")
@spec.validate(resp=responses(200, UnlockResult, 404, 415))
def unlock(user_id: int) -> Response:
    """Lift the lock or back-off after failed attempts."""
    _existing(user_id)
    lifted = _service_call(
        lambda: services().accounts.unlock_user(
            None, user_id, actor_name=current_principal().actor_name
        )
    )
    return jsonify(was_locked=lifted)


@operation("users:write", body=True)
@spec.validate(json=ResetRequest, resp=responses(200, UserOut, 404, 409, 415))
def reset_mfa(user_id: int) -> Response:
    """Emergency 2FA reset (lost phone and codes): needs a reason, ends every session; the user
    enrols again. Verify their identity by other means first. 409 when 2FA is already off."""
    body: ResetRequest = _ctx().json
    _existing(user_id)
    _service_call(
        lambda: services().factors.admin_disable(
            None, user_id, body.reason, actor_name=current_principal().actor_name
        )
    )
    return jsonify(_user_out(_summary(user_id)))


# -- audit ----------------------------------------------------------------------------------------
def _trail() -> AuditTrailService:
    svc = services()
    return AuditTrailService(svc.db, svc.audit, svc.clock)


def _details(raw: str) -> dict[str, Any]:
    try:
        parsed = json.loads(raw or "{}")
    except ValueError:
        return {"unparsed": raw[:500]}
    return parsed if isinstance(parsed, dict) else {"value": parsed}


@operation("audit:read")
@spec.validate(query=AuditQuery, resp=responses(200, AuditPageOut))
def audit_events() -> Response:
    """Audit events, newest first, with the audit page's filters (event, outcome, user,
    since, until); page with ``before``. An unknown event name means every event."""
    q: AuditQuery = _ctx().query
    args = {
        k: str(v)
        for k, v in q.model_dump(include={"event", "outcome", "user", "since", "until"}).items()
        if v is not None
    }
    filters = _service_call(lambda: AuditFilters.parse(args))
    page = _trail().page(filters, before_id=q.before, limit=q.limit)
    events = [
        AuditEventOut(
            id=e.id,
            time=e.occurred_at,
            event=e.event,
            outcome=e.outcome,
            actor=e.actor_name,
            target=e.target_name,
            ip=e.ip,
            user_agent=e.user_agent,
            details=_details(e.details),
            hash=e.hash,
        ).model_dump(mode="json")
        for e in page.events
    ]
    return jsonify(
        events=events,
        next_before=page.next_before_id,
        total=page.total,
        total_capped=page.total_capped,
    )


@operation("audit:read")
@spec.validate(resp=responses(200, ChainStatus))
def audit_chain() -> Response:
    """Walk the audit hash chain and compare it with its head (as ``qpki audit verify``)."""
    result = _trail().verify()
    return jsonify(
        ok=result.ok,
        checked=result.checked,
        broken_id=result.broken_id,
        reason=result.reason,
        missing=result.missing,
    )


# -- the document and its reference page ----------------------------------------------------------
def openapi_json() -> Response:
    """The OpenAPI 3.1 document (no key needed: it holds no secret)."""
    response = jsonify(document())
    response.headers["Cache-Control"] = "no-cache"
    return response


def reference() -> str:
    """The API reference, rendered here from the same document (no script, no CDN)."""
    doc = document()
    problems = [
        {"type": TYPE_PREFIX + slug, "status": status, "title": title}
        for slug, (status, title) in PROBLEMS.items()
    ]
    return render_template(
        "api/reference.html",
        doc=doc,
        operations=operations(doc),
        schemas=doc["components"]["schemas"],
        problems=problems,
    )
