"""Passkey and security-key pages and the JSON endpoints of their ceremonies.

Registered under the /auth blueprint (endpoints ``auth.webauthn.*``). The ceremonies are JSON
(``application/json`` only, the CSRF token in the ``X-CSRFToken`` header, checked by
CSRFProtect like every POST); renaming and removing are plain forms that work without
JavaScript. Every refusal is a JSON 4xx with a message the service chose — never a 500.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from flask import Blueprint, flash, jsonify, redirect, render_template, request, session, url_for
from flask_login import current_user, login_required
from werkzeug.wrappers import Response

from qpki.auth.forms import PostForm
from qpki.auth.services.webauthn import CeremonyRefused
from qpki.web.client import client, set_device_cookie
from qpki.web.limits import VERIFY_LIMIT, per_address
from qpki.web.policy_gate import enrolment_page
from qpki.web.remember import set_remember_cookie
from qpki.web.security import is_safe_next
from qpki.web.services import services
from qpki.web.session_auth import (
    NEXT_KEY,
    current_session_row,
    pending_session_row,
    session_token,
    start_session,
)
from qpki.web.step_up import step_up_required

bp = Blueprint("webauthn", __name__)

# The cookie holds a random value that binds a passwordless ceremony to this browser.
BINDING_KEY = "wa_bind"
CEREMONY_LIMIT = "30 per minute;300 per hour"

# Status of each refusal reason (the rest are a plain 400).
_STATUS = {
    "session": 401,
    "step_up": 403,
    "locked": 403,
    "required_by_policy": 403,
    "throttled": 429,
    "duplicate": 409,
    "limit": 409,
    "confirm_last": 409,
    "not_found": 404,
}

JsonReply = tuple[Response, int] | Response


def _refusal(exc: CeremonyRefused) -> JsonReply:
    body: dict[str, Any] = {"ok": False, "error": exc.message, "reason": exc.reason}
    if exc.reason == "step_up":
        body["reauth"] = url_for("auth.reauth", next=url_for("auth.webauthn.security_keys"))
    reply = jsonify(body)
    if exc.retry_at is not None:
        wait = (exc.retry_at - services().clock()).total_seconds()
        reply.headers["Retry-After"] = str(max(1, int(wait + 0.999)))
    return reply, _STATUS.get(exc.reason, 400)


def _bad_request(message: str, status: int = 400) -> JsonReply:
    return jsonify({"ok": False, "error": message, "reason": "malformed"}), status


def _json_body() -> dict[str, Any] | JsonReply:
    """The request's JSON object, or the 4xx reply that refuses it."""
    if not request.is_json:
        return _bad_request("Send this request as application/json.", 415)
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        return _bad_request("The request body must be a JSON object.")
    return data


def _options(start: Callable[[dict[str, Any]], dict[str, Any]]) -> JsonReply:
    """A ceremony's begin request: the JSON body checked, the options ``start`` makes from
    it, or the reply that refuses it."""
    body = _json_body()
    if not isinstance(body, dict):
        return body
    try:
        options = start(body)
    except CeremonyRefused as exc:
        return _refusal(exc)
    return jsonify({"ok": True, "publicKey": options})


def _done(target: str, token: str, device_token: str | None) -> Response:
    """A new session id for the new authentication level; the page goes to ``target``."""
    start_session(token)
    reply = jsonify({"ok": True, "redirect": target})
    return set_device_cookie(reply, device_token)


def _after_sign_in_target() -> str:
    target = session.get(NEXT_KEY)
    return target if isinstance(target, str) and is_safe_next(target) else url_for("main.index")


# -- templates ---------------------------------------------------------------------------------
@bp.app_context_processor
def _template_helpers() -> dict[str, Any]:
    def webauthn_has_keys() -> bool:
        """Whether the user of this request (signed in, or half-way) has a key."""
        _ = current_user.is_authenticated  # resolves the session row
        row = current_session_row() or pending_session_row()
        return row is not None and services().webauthn.has_keys(row.user_id)

    def webauthn_key_count() -> int:
        """How many keys the signed-in user has (the account page's summary)."""
        if not current_user.is_authenticated:
            return 0
        return len(services().webauthn.keys_of(current_user.id))

    return {"webauthn_has_keys": webauthn_has_keys, "webauthn_key_count": webauthn_key_count}


# -- the security keys page --------------------------------------------------------------------
@bp.get("/security-keys")
@enrolment_page
@login_required
def security_keys() -> str:
    svc = services()
    keys = svc.webauthn.keys_of(current_user.id)
    last = bool(keys) and svc.webauthn.is_last_factor(current_user.id)
    return render_template(
        "auth/security_keys.html",
        keys=keys,
        last_factor=last,
        form=PostForm(),
        fresh=svc.step_up.is_fresh(current_session_row()),
    )


@bp.post("/security-keys/<int:key_id>/rename")
@login_required
def rename_key(key_id: int) -> Response:
    if PostForm().validate_on_submit():
        try:
            name = services().webauthn.rename(current_user.id, key_id, request.form.get("name", ""))
        except CeremonyRefused as exc:
            flash(exc.message, "error")
        else:
            flash(f"Renamed to “{name}”.", "success")
    return redirect(url_for("auth.webauthn.security_keys"))


@bp.post("/security-keys/<int:key_id>/remove")
@step_up_required(lambda **_: url_for("auth.webauthn.security_keys"), inline=False)
def remove_key(key_id: int) -> Response:
    if not PostForm().validate_on_submit():
        return redirect(url_for("auth.webauthn.security_keys"))
    try:
        removed = services().webauthn.remove(
            current_user.id,
            key_id,
            confirm_last=request.form.get("confirm_last") == "1",
            keep_session_token=session_token(),
        )
    except CeremonyRefused as exc:
        flash(exc.message, "error")
    else:
        flash(f"“{removed.name}” was removed.", "success")
        if removed.two_factor_off:
            flash("Two-factor authentication is now off.", "warning")
            return redirect(url_for("auth.profile"))
    return redirect(url_for("auth.webauthn.security_keys"))


# -- registering -------------------------------------------------------------------------------
@bp.post("/webauthn/register/begin")
@enrolment_page
@login_required
@per_address(CEREMONY_LIMIT)
def register_begin() -> JsonReply:
    def start(body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name")
        return services().webauthn.begin_registration(
            session_token() or "", name if isinstance(name, str) else ""
        )

    return _options(start)


@bp.post("/webauthn/register/finish")
@enrolment_page
@login_required
@per_address(CEREMONY_LIMIT)
def register_finish() -> JsonReply:
    body = _json_body()
    if not isinstance(body, dict):
        return body
    try:
        done = services().webauthn.finish_registration(
            session_token() or "", body.get("credential")
        )
    except CeremonyRefused as exc:
        return _refusal(exc)
    message = f"“{done.name}” was added."
    if done.backup_codes:
        message += " Two-factor authentication is now on. Save your backup codes."
    else:
        flash(message, "success")  # the page reloads to list the new key
    return jsonify({"ok": True, "message": message, "backup_codes": done.backup_codes})


# -- the second factor after the password ------------------------------------------------------
def _pending_token() -> str | None:
    _ = current_user.is_authenticated
    token = session_token()
    return token if token and pending_session_row() is not None else None


@bp.post("/webauthn/verify/begin")
@per_address(VERIFY_LIMIT)
def verify_begin() -> JsonReply:
    def start(_body: dict[str, Any]) -> dict[str, Any]:
        token = _pending_token()
        if token is None:
            raise CeremonyRefused("Please sign in first.", "session")
        return services().webauthn.begin_second_factor(token)

    return _options(start)


@bp.post("/webauthn/verify/finish")
@per_address(VERIFY_LIMIT)
def verify_finish() -> JsonReply:
    body = _json_body()
    if not isinstance(body, dict):
        return body
    token = _pending_token()
    if token is None:
        return _refusal(CeremonyRefused("Please sign in first.", "session"))
    try:
        done = services().webauthn.finish_second_factor(
            token,
            body.get("credential"),
            client=client(),
            remember_device=body.get("remember_device") is True,
        )
    except CeremonyRefused as exc:
        return _refusal(exc)
    reply = _done(_after_sign_in_target(), done.token, done.device_token)
    return set_remember_cookie(reply, done.remember_cookie)


# -- passwordless ------------------------------------------------------------------------------
@bp.post("/webauthn/passwordless/begin")
@per_address(CEREMONY_LIMIT)
def passwordless_begin() -> JsonReply:
    def start(_body: dict[str, Any]) -> dict[str, Any]:
        binding = session.get(BINDING_KEY)
        if not isinstance(binding, str):
            binding = secrets.token_urlsafe(32)
            session[BINDING_KEY] = binding
        return services().webauthn.begin_passwordless(binding)

    return _options(start)


@bp.post("/webauthn/passwordless/finish")
@per_address(VERIFY_LIMIT)
def passwordless_finish() -> JsonReply:
    body = _json_body()
    if not isinstance(body, dict):
        return body
    binding = session.get(BINDING_KEY)
    if not isinstance(binding, str):
        return _refusal(CeremonyRefused("This request has expired. Please try again.", "expired"))
    next_url = body.get("next")
    if isinstance(next_url, str) and is_safe_next(next_url):
        session[NEXT_KEY] = next_url
    try:
        done = services().webauthn.finish_passwordless(
            binding, body.get("credential"), client=client(), replaces_token=session_token()
        )
    except CeremonyRefused as exc:
        return _refusal(exc)
    return _done(_after_sign_in_target(), done.token, done.device_token)


# -- step-up -----------------------------------------------------------------------------------
@bp.post("/webauthn/reauth/begin")
@enrolment_page
@login_required
@per_address(VERIFY_LIMIT)
def reauth_begin() -> JsonReply:
    return _options(lambda _body: services().webauthn.begin_step_up(session_token() or ""))


@bp.post("/webauthn/reauth/finish")
@enrolment_page
@login_required
@per_address(VERIFY_LIMIT)
def reauth_finish() -> JsonReply:
    body = _json_body()
    if not isinstance(body, dict):
        return body
    password = body.get("password")
    try:
        services().webauthn.finish_step_up(
            session_token() or "",
            body.get("credential"),
            password=password if isinstance(password, str) and password else None,
            client=client(),
        )
    except CeremonyRefused as exc:
        return _refusal(exc)
    next_url = body.get("next")
    target = next_url if isinstance(next_url, str) and is_safe_next(next_url) else None
    return jsonify({"ok": True, "redirect": target or url_for("auth.profile")})
